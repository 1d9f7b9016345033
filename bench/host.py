"""Host time per call of each layer of the batch-norm stack, against eager PyTorch's.

    python -m bench.host [--shape 8,64,14,14] [--dtype fp32] [--calls 2000]

A small tensor, so that the host, not the device, sets the pace: the time per call is
what the Python and C++ layers above the kernels cost. Layers, innermost first: the
Triton kernels' wrapper (cnnkern.triton.batch_norm), the registered op, the functional
API without autograd, and with it (forward; forward + backward through autograd.grad).
On a GPU every backend runs for real, and the calls queue without a synchronization
until the last. Without one, the Triton kernels are replaced by no-ops (the interpreter
would time itself), so the triton rows are the host time of the Triton backend's Python
alone (`python tests/triton_aot.py --arch 90 --host-time` adds Triton's own launch work,
as on a GPU); the cpu and eager rows include their kernels' time (a small --shape leaves
the host's).
"""
import argparse
import contextlib
import os
import statistics
import time
from typing import Callable, Dict, Iterator

import torch

if not torch.cuda.is_available():  # the triton backend on CPU tensors: its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import cnnkern  # noqa: E402  (after TRITON_INTERPRET)
from cnnkern.backends import refuses  # noqa: E402

from .cli import DTYPES, shape_arg  # noqa: E402

KERNELS = ("_bn_stats_kernel", "_bn_fwd_kernel", "_bn_bwd_reduce_kernel", "_bn_bwd_kernel")


class _NoLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **meta)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **meta: None


@contextlib.contextmanager
def no_triton_launches() -> Iterator[None]:
    """Within the block, the Triton wrappers launch nothing."""
    from cnnkern.triton import batch_norm as kernels

    saved = {name: getattr(kernels, name) for name in KERNELS}
    try:
        for name in KERNELS:
            setattr(kernels, name, _NoLaunch())
        yield
    finally:
        for name, kernel in saved.items():
            setattr(kernels, name, kernel)


def per_call_us(fn: Callable[[], object], calls: int, device: torch.device, repeats: int = 5) -> float:
    """Microseconds per call: the median over `repeats` runs of calls / repeats calls in a row,
    after a warm-up (compiles, fills caches)."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(max(calls // repeats, 1)):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / max(calls // repeats, 1) * 1e6)
    return statistics.median(times)


def layers(backend: str, shape, dtype, device) -> Dict[str, Callable[[], object]]:
    """{layer name: one training forward (+ backward) through it} for `backend`, or eager
    PyTorch (F.batch_norm then ReLU) for backend "eager"."""
    C = shape[1]
    p = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = torch.randn(shape, device=device, dtype=dtype)
    g = torch.randn_like(x)
    w, b = torch.rand(C, device=device, dtype=p) + 0.5, torch.randn(C, device=device, dtype=p)
    rm, rv = torch.zeros(C, device=device, dtype=p), torch.ones(C, device=device, dtype=p)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    if backend == "eager":
        def forward(x, w, b):
            return F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))
    else:
        def forward(x, w, b):
            return cnnkern.functional.batch_norm(x, rm, rv, w, b, True, activation="relu", backend=backend)
    out = {}
    if backend != "eager":
        prefix = "triton_" if backend == "triton" else ""
        op_forward = getattr(torch.ops.cnnkern, prefix + "bn_forward_train")
        op_backward = getattr(torch.ops.cnnkern, prefix + "bn_backward")
        y, mean, invstd = op_forward(x, w, b, None, rm, rv, 0.1, 1e-5, True)
        mask = [True, True, True, False]
        if backend == "triton":
            from cnnkern.triton import batch_norm as kernels

            out["wrapper forward"] = lambda: kernels.bn_forward_train(x, w, b, None, rm, rv, 0.1, 1e-5, True)
            out["wrapper backward"] = lambda: kernels.bn_backward(g, x, y, w, b, mean, invstd, True, True, mask)
        out["op forward"] = lambda: op_forward(x, w, b, None, rm, rv, 0.1, 1e-5, True)
        out["op backward"] = lambda: op_backward(g, x, y, w, b, mean, invstd, True, True, mask)
    with torch.no_grad():
        forward(x, w, b)  # an error here names the backend, before any timing
    out["functional, no grad"] = lambda: forward(x, w, b)
    out["autograd forward"] = lambda: forward(xg, wg, bg)
    out["autograd forward + backward"] = lambda: torch.autograd.grad(forward(xg, wg, bg), (xg, wg, bg), g)
    return out


def table(shape, dtype, calls: int) -> Iterator[str]:
    """The table's lines, one row per (backend, layer), each as soon as it is measured (a run cut
    short by a time limit still shows what it measured)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    yield (f"host time per call, {'x'.join(map(str, shape))} {str(dtype)[6:]} on "
           f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'the CPU (Triton launches stubbed out)'}")
    yield f"{'backend':<8} {'layer':<30} {'us/call':>8}"
    if device.type == "cuda":
        backends, stub = [b for b in ("triton", "cuda") if not refuses(b, device, dtype, "bn_forward_train")], False
        backends.append("eager")
    else:
        backends, stub = ["triton", "cpu", "eager"], True
    for backend in backends:
        with no_triton_launches() if stub and backend == "triton" else contextlib.nullcontext():
            for layer, fn in layers(backend, shape, dtype, device).items():
                yield f"{backend:<8} {layer:<30} {per_call_us(fn, calls, device):>8.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=shape_arg, default=(8, 64, 14, 14), metavar="N,C,H,W")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    for line in table(args.shape, DTYPES[args.dtype], args.calls):
        print(line, flush=True)


if __name__ == "__main__":
    main()
