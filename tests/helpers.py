"""Shared test helpers: which (backend, device) pairs to run, tolerances, inputs, and one
call of the batch-norm family compared with PyTorch and the float64 oracle."""
import os
import platform
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import cnnkern
from cnnkern import reference
from cnnkern.reference import error_bound, max_error
from cnnkern.backends import refuses

# (backend, device): every backend on each device it serves. CUDA ones carry the
# `cuda` marker; a pair that cannot run here skips with the backend's own reason
# (test_backends.py asserts that the ones this machine must run do run).
_PAIRS = [("cpu", "cpu"), ("triton", "cpu"), ("reference", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]


def cpu_flags() -> frozenset:
    """The x86 feature flags of this machine's CPU, as /proc/cpuinfo names them (none elsewhere)."""
    if platform.machine() not in ("x86_64", "AMD64") or not os.path.exists("/proc/cpuinfo"):
        return frozenset()
    with open("/proc/cpuinfo") as f:
        return frozenset(next((line.split()[2:] for line in f if line.startswith("flags")), []))


# What the CPU kernels' loops need from the CPU: AVX2 and F16C to convert 16-bit values in
# registers (csrc/cpu/in_registers.h), AVX512-BF16 with BW, DQ and VL to round bfloat16 outputs
# in one instruction (csrc/cpu/bfloat16_outputs.h).
IN_REGISTERS_FLAGS = frozenset({"avx2", "f16c"})
AVX512_BF16_FLAGS = frozenset({"avx512_bf16", "avx512bw", "avx512dq", "avx512vl"})


def cpu_converts_in_registers() -> bool:
    """Whether the CPU kernels convert 16-bit values in registers here (not switched off)."""
    return IN_REGISTERS_FLAGS <= cpu_flags() and os.environ.get("CNNKERN_CPU_IN_REGISTERS") != "0"


def cpu_rounds_bfloat16_natively() -> bool:
    """Whether the CPU kernels round bfloat16 outputs by AVX512-BF16 here (not switched off)."""
    return (cpu_converts_in_registers() and AVX512_BF16_FLAGS <= cpu_flags()
            and os.environ.get("CNNKERN_CPU_AVX512_BF16") != "0")


def backend_params(names=("cpu", "triton", "cuda", "reference")):
    params = [
        pytest.param(name, device, marks=[pytest.mark.cuda] if device == "cuda" else [], id=f"{name}-{device}")
        for name, device in _PAIRS
        if name in names
    ]
    if "cuda" in names:
        # csrc/cuda's kernels and op wrappers, run on the CPU by tests/cuda_emu behind the cpu
        # backend's ops (the `cuda_emulated` marker swaps them in: conftest.py).
        params.append(pytest.param("cpu", "cpu", marks=[pytest.mark.cuda_emulated], id="cuda-emulated"))
    return params


# The registered ops' backends, for tests that call the ops themselves: the prefix of each
# one's ops (torch.ops.cnnkern.<prefix>bn_*) and the device its tensors go on here.
OP_PREFIX = {"cpu": "", "triton": "triton_", "cuda": ""}
OP_DEVICE = {"cpu": "cpu", "triton": "cpu" if not torch.cuda.is_available() else "cuda", "cuda": "cuda"}


def op_backend_params(names=tuple(OP_PREFIX)):
    """pytest params of the op backends `names`; with "cuda", also the cpu ops run by
    csrc/cuda's kernels and wrappers, emulated on the CPU (the `cuda_emulated` marker)."""
    params = [pytest.param(name, marks=[pytest.mark.cuda] if name == "cuda" else [], id=name) for name in names]
    if "cuda" in names:
        params.append(pytest.param("cpu", marks=[pytest.mark.cuda_emulated], id="cuda-emulated"))
    return params


def kernels_of(param) -> str:
    """The backend whose kernels an op_backend_params param runs: "cuda" for the emulated one."""
    return "cuda" if any(mark.name == "cuda_emulated" for mark in param.marks) else param.values[0]


def require(backend: str, device: str, dtype: torch.dtype, op: str = "bn_forward_train") -> None:
    reason = refuses(backend, torch.device(device), dtype, op)
    if reason:
        pytest.skip(f"{backend} cannot run on {device}/{dtype} here: {reason}")


def assert_close_to_oracle(ours: torch.Tensor, theirs: torch.Tensor, oracle: torch.Tensor, dtype, what: str,
                           their_oracle: Optional[torch.Tensor] = None) -> None:
    """`ours` is no further from the float64 oracle than PyTorch's `theirs` is from its own
    (`their_oracle`, the same one where not given) allows."""
    assert ours.shape == oracle.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    e_ours = max_error(ours, oracle)
    e_torch = max_error(theirs, oracle if their_oracle is None else their_oracle)
    bound = error_bound(dtype, e_torch)
    assert e_ours <= bound, f"{what}: error {e_ours:.3g} > bound {bound:.3g} (PyTorch's error {e_torch:.3g})"


LAYOUTS = ("nchw", "channels_last", "slice", "slice_cl")


def make_input(shape, dtype, device, layout="nchw", mean=0.0):
    """Random input, each channel with its own mean around `mean`, in `layout`:
    "nchw", "channels_last", or a channel slice of a larger tensor in either
    ("slice", "slice_cl": non-contiguous, as DenseNet/Inception buffers are)."""
    N, C, *spatial = shape
    channel_mean = mean + torch.randn(C, dtype=torch.float64).view(1, C, *[1] * len(spatial))
    x = (torch.randn(shape, dtype=torch.float64) + channel_mean).to(device=device, dtype=dtype)
    channels_last = layout in ("channels_last", "slice_cl") and x.dim() == 4
    if layout in ("slice", "slice_cl"):
        big = torch.randn((N, C + 3, *spatial), device=device, dtype=dtype)
        if channels_last:
            big = big.contiguous(memory_format=torch.channels_last)
        big[:, 1 : C + 1] = x
        return big[:, 1 : C + 1]
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def meta_tensor(shape, dtype, layout):
    """A tensor of `shape` and `layout` ("nchw" or "channels_last") with no storage: for plans."""
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def param_dtype(dtype):
    """Half inputs get float32 parameters, as under autocast; others their own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def run_and_compare(backend, device, x, *, affine=True, residual=False, activation=None, training=True,
                    running_stats=True, momentum=0.1, eps=1e-5, pdtype=None, operands_like_input=False):
    """One call of cnnkern.functional.batch_norm vs F.batch_norm (+ add, + relu) in the
    same dtype vs the float64 oracle: output, gradients and running stats. The residual and
    grad_output are NCHW, or of x's layout with `operands_like_input` (x dense)."""
    dtype, C = x.dtype, x.shape[1]
    pdtype = pdtype or param_dtype(dtype)

    def operand():
        if operands_like_input:
            return torch.empty_like(x).normal_()
        return torch.randn(x.shape, dtype=dtype, device=device)

    w = (torch.rand(C, dtype=pdtype, device=device) + 0.5) if affine else None
    b = torch.randn(C, dtype=pdtype, device=device) if affine else None
    r = operand() if residual else None
    rm = torch.randn(C, dtype=pdtype, device=device) if running_stats else None
    rv = (torch.rand(C, dtype=pdtype, device=device) + 0.5) if running_stats else None
    grad_out = operand()

    def leaves(to=None):
        ts = [t if t is None else (t.detach().to(to) if to else t.detach().clone()) for t in (x, w, b, r)]
        if to is None:
            ts[0] = x.detach()  # keep the layout under test (clone would densify a slice)
        return [t if t is None else t.requires_grad_() for t in ts]

    def stats(to=None):
        return [t if t is None else (t.to(to) if to else t.clone()) for t in (rm, rv)]

    def run(name, relu_mask=None):
        """[output, gradients..., running stats...] of one run: "ours", "torch" or "oracle"
        (float64; through the ReLU mask `relu_mask` where given)."""
        xs, ws, bs, rs = leaves(torch.float64 if name == "oracle" else None)
        rms, rvs = stats(torch.float64 if name == "oracle" else None)
        if name == "ours":
            y = cnnkern.functional.batch_norm(xs, rms, rvs, ws, bs, training, momentum, eps, residual=rs,
                                              activation=activation, backend=backend)
        elif name == "torch":
            y = F.batch_norm(xs, rms, rvs, ws, bs, training, momentum, eps)
            y = y + rs if rs is not None else y
            y = F.relu(y) if activation == "relu" else y
        else:
            y = reference.batch_norm_ref(xs, rms, rvs, ws, bs, training, momentum, eps, rs, activation,
                                         relu_mask=relu_mask)
        inputs = [t for t in (xs, ws, bs, rs) if t is not None]
        go = grad_out.double() if name == "oracle" else grad_out
        grads = torch.autograd.grad(y, inputs, go) if y.numel() else [torch.zeros_like(t) for t in inputs]
        return [y.detach()] + list(grads) + [t for t in (rms, rvs) if t is not None]

    results = {name: run(name) for name in ("ours", "torch", "oracle")}
    # Each result's gradients against the oracle's through that result's ReLU mask
    # (reference.ATOL says why); its output and running stats against the plain oracle's.
    oracle_grads = {name: run("oracle", results[name][0] > 0) if activation == "relu" else results["oracle"]
                    for name in ("ours", "torch")}
    n_grads = sum(t is not None for t in (x, w, b, r))

    what = ["output"] + [n for n, t in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), (x, w, b, r))
                         if t is not None] + (["running_mean", "running_var"] if running_stats else [])
    for i, name in enumerate(what):
        ours, theirs = results["ours"][i], results["torch"][i]
        assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != {theirs.dtype}"
        truth = oracle_grads if 1 <= i <= n_grads else dict.fromkeys(("ours", "torch"), results["oracle"])
        assert_close_to_oracle(ours, theirs, truth["ours"][i], dtype, f"{backend}/{name}", truth["torch"][i])
    return results
