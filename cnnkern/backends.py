"""Which backend runs a call, and why the others cannot.

Each backend declares what it supports; `select` takes the one asked for (the
`backend=` argument, else $CNNKERN_BACKEND) or, when none is, the first of the
op's preference list that can run the call. A backend that cannot run a call
is never used quietly: an explicit one raises its reason, and automatic
selection raises every backend's reason when none of its candidates can run.
"""
import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from . import _extension
from .layout import kernel_layout

NAMES = ("triton", "cuda", "cpu", "reference")


def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); pip install 'cnnkern[triton]'"
    return None


TRITON_IMPORT_ERROR = _triton_import_error()


def triton_interpreted() -> bool:
    """Triton runs kernels on the CPU under TRITON_INTERPRET=1 (read when triton loads)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_refuses(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if TRITON_IMPORT_ERROR:
        return TRITON_IMPORT_ERROR
    if not _extension.loaded():
        return _extension.IMPORT_ERROR + " (it holds the op schemas)"
    if device.type == "cuda":
        if triton_interpreted():
            return "TRITON_INTERPRET=1 is set: triton runs kernels on the CPU only"
        return None
    if device.type == "cpu":
        if not triton_interpreted():
            return "triton runs CPU tensors only under TRITON_INTERPRET=1 (set before import)"
        return None
    return f"triton does not run {device.type} tensors"


def _compiled_refuses(device: torch.device, op: str) -> Optional[str]:
    """The C++ backends: cnnkern::`op` needs a kernel for the tensor's device."""
    if not _extension.loaded():
        return _extension.IMPORT_ERROR
    key = device.type.upper()
    if not _extension.has_kernel(op, key):
        if key == "CUDA":
            return "cnnkern._C was built without CUDA kernels (rebuild with a CUDA torch and nvcc, or FORCE_CUDA=1)"
        return f"cnnkern._C has no {key} kernel for {op}"
    return None


def _cuda_refuses(device: torch.device, dtype: torch.dtype, op: str) -> Optional[str]:
    if device.type != "cuda":
        return f"the cuda backend runs CUDA tensors, got a {device.type} tensor"
    return _compiled_refuses(device, op)


def _cpu_refuses(device: torch.device, dtype: torch.dtype, op: str) -> Optional[str]:
    if device.type != "cpu":
        return f"the cpu backend runs CPU tensors, got a {device.type} tensor"
    return _compiled_refuses(device, op)


# name -> (device, dtype, C++ op name) -> reason it cannot run, or None.
_REFUSES: Dict[str, Callable[[torch.device, torch.dtype, str], Optional[str]]] = {
    "triton": lambda device, dtype, op: _triton_refuses(device, dtype),
    "cuda": _cuda_refuses,
    "cpu": _cpu_refuses,
    "reference": lambda device, dtype, op: None,
}

# Automatic choice per (device type, kernel layout), fastest first. Neither the
# triton interpreter nor the reference is ever chosen automatically: both are slow.
# CUDA, from bench/results/nvidia-h200-quick-2026-12-04T17-32-48.json (H200,
# 128x256x56x56, fwd_relu and bwd_add_relu in bf16 and fp32): on NCHW the cuda
# kernels take 0.53-0.90x triton's time; along channels triton's take 0.59-1.0x
# the cuda ones' (their 128-byte rows write faster than the cuda kernels' 32-byte ones).
_PREFERENCE: Dict[Tuple[str, str], Tuple[str, ...]] = {
    ("cuda", "nchw"): ("cuda", "triton"),
    ("cuda", "channels_last"): ("triton", "cuda"),
    ("cpu", "nchw"): ("cpu",),
    ("cpu", "channels_last"): ("cpu",),
}


class BackendError(RuntimeError):
    """No backend can run this call, or the one asked for cannot."""


def refuses(name: str, device: torch.device, dtype: torch.dtype, op: str) -> Optional[str]:
    """Why backend `name` cannot run `op` on (device, dtype); None if it can."""
    if name not in _REFUSES:
        raise ValueError(f"backend must be one of {NAMES} or None, got {name!r}")
    return _REFUSES[name](device, dtype, op)


@torch.compiler.assume_constant_result  # torch.compile: decided once, at trace time
def select(requested: Optional[str], device: torch.device, dtype: torch.dtype, op: str, layout: str = "nchw") -> str:
    """The backend that runs `op` on (device, dtype), for an input the kernels walk as
    `layout` (layout.kernel_layout: "nchw" or "channels_last")."""
    requested = requested or os.environ.get("CNNKERN_BACKEND") or None
    return _select(requested, device.type, dtype, op, layout)


@functools.lru_cache(maxsize=None)
def _select(requested: Optional[str], device_type: str, dtype: torch.dtype, op: str, layout: str) -> str:
    # Cached: what can run depends only on the key and on this process's imports.
    device = torch.device(device_type)
    if requested is not None:
        reason = refuses(requested, device, dtype, op)
        if reason:
            raise BackendError(f"backend {requested!r} cannot run {op} on {device_type}/{dtype}: {reason}")
        return requested
    for name in _PREFERENCE.get((device_type, layout), ()):
        if refuses(name, device, dtype, op) is None:
            return name
    reasons = "; ".join(f"{n}: {refuses(n, device, dtype, op) or 'not chosen automatically (slow)'}" for n in NAMES)
    raise BackendError(
        f"no fast backend can run {op} on {device_type}/{dtype} ({reasons}). "
        "Pass backend='reference' to run the pure-PyTorch version on purpose."
    )


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str  # why not, or what it runs

    def __str__(self) -> str:
        return f"{self.name:<10} {'yes' if self.available else 'no ':<4} {self.reason}"


def backends() -> Dict[str, BackendInfo]:
    """Which backends can run here, and why not (judged in float32 on the device
    each backend is for: CUDA, or the CPU for cpu and interpreted triton); for cpu, which
    loops its kernels take on this CPU."""
    cuda = torch.device("cuda")
    gpu_reason = None if torch.cuda.is_available() else "no CUDA device here (torch.cuda.is_available() is False)"
    cpu = torch.device("cpu")
    info = {}
    for name in NAMES:
        on_cpu = name == "cpu" or (gpu_reason is not None and (name == "reference" or
                                                               (name == "triton" and triton_interpreted())))
        device = cpu if on_cpu else cuda
        # What is missing from the install (triton, the extension) comes first: it holds on any machine.
        reason = refuses(name, device, torch.float32, "bn_forward_train") or (None if on_cpu else gpu_reason)
        runs = f"runs {device.type} tensors" + (f": {_extension.cpu_features()}" if name == "cpu" else "")
        info[name] = BackendInfo(name, reason is None, reason or runs)
    return info


def explain(input: torch.Tensor, op: str = "bn_forward_train") -> str:
    """Which backends can run `op` on a tensor like `input`, why the others cannot,
    and which one the automatic choice takes."""
    lines = []
    for name in NAMES:
        reason = refuses(name, input.device, input.dtype, op)
        lines.append(f"{name:<10} {'can run' if reason is None else 'cannot: ' + reason}")
    try:
        layout = kernel_layout(input) or "nchw"  # no (N, C, L) view: copied to contiguous first
        lines.append(f"automatic: {select(None, input.device, input.dtype, op, layout)}")
    except BackendError as e:
        lines.append(f"automatic: none ({e})")
    return "\n".join(lines)
