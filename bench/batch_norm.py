"""Batch-norm benchmarks: providers x modes x shapes.

Bandwidth model (bytes that must move, n = numel, e = element size): a training
forward reads x (and residual) and writes y; the backward reads grad_output, x and
(for the ReLU mask) y and writes grad_input (and grad_residual). Statistics and
parameters are O(C) and left out. Two-pass kernels read x twice, so they can
reach at most 2/3 of the copy bandwidth on the forward by this count.
"""
import itertools
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

import cnnkern
from cnnkern.backends import refuses
from cnnkern.reference import batch_norm_ref, error_bound, max_error

GPU_SHAPES = [(128, 64, 112, 112), (128, 256, 56, 56), (128, 512, 28, 28), (128, 1024, 14, 14), (128, 2048, 7, 7)]
# One shape: the quick run must fit one GPU call (10 minutes) with the build and the
# cuda tests, and torch.compile costs seconds per case. Stage 1's block output: as
# large as any of them (205 MB in bf16), far beyond L2.
GPU_QUICK_SHAPES = [(128, 256, 56, 56)]
CPU_SHAPES = [(32, 64, 56, 56), (16, 256, 28, 28), (16, 1024, 7, 7)]
CPU_QUICK_SHAPES = [(32, 64, 56, 56)]

# mode -> (training, residual, run backward, run forward, tensors moved in units of n*e); the
# modes with performance targets first, so that a run cut short has measured them.
MODES = {
    "fwd_relu": dict(training=True, residual=False, fwd=True, bwd=False, units=2),
    "bwd_add_relu": dict(training=True, residual=True, fwd=False, bwd=True, units=5),
    "fwd_add_relu": dict(training=True, residual=True, fwd=True, bwd=False, units=3),
    # x, y forward; dy, x, dx backward, whose ReLU mask can come from x (the output is not
    # needed: csrc/ops.cpp, bn_backward). A backend that reads the output moves 6.
    "fwd_bwd_relu": dict(training=True, residual=False, fwd=True, bwd=True, units=5),
    "eval_relu": dict(training=False, residual=False, fwd=True, bwd=False, units=2),
}
# cnnkern-cuda-two-pass: the cuda backend with its one-pass kernels switched off
# (CNNKERN_CUDA_ONE_PASS=0), to measure what they gain.
PROVIDERS = ("cnnkern-triton", "cnnkern-cuda", "cnnkern-cuda-two-pass", "cnnkern-cpu", "eager", "compile")

# The performance targets of issue 2 on a GPU (bf16 and fp32, either layout), per mode; and
# every mode's kernels at 80% of the copy bandwidth on the bytes they must move.
_GPU_TARGETS = {
    "fwd_relu": {"speedup_vs_eager": 1.5, "speedup_vs_compile": 1.1},
    "bwd_add_relu": {"speedup_vs_eager": 1.5},
}
_GPU_PCT_OF_COPY = 80.0


@dataclass(frozen=True)
class Case:
    mode: str
    shape: tuple
    dtype: torch.dtype
    layout: str

    @property
    def tensor_bytes(self) -> int:
        """One activation-sized tensor."""
        return torch.Size(self.shape).numel() * self.dtype.itemsize

    @property
    def bytes(self) -> int:
        """What must move: `units` activation-sized tensors."""
        return MODES[self.mode]["units"] * self.tensor_bytes

    @property
    def label(self) -> str:
        return f"{self.mode} {'x'.join(map(str, self.shape))} {str(self.dtype)[6:]} {self.layout}"


def cases(device: torch.device, quick: bool, dtypes, layouts, modes, shapes=None) -> List[Case]:
    """Every (mode, shape, dtype, layout); `shapes` (N, C, H, W) tuples replace the device's defaults."""
    if shapes is None and device.type == "cuda":
        shapes = GPU_QUICK_SHAPES if quick else GPU_SHAPES
    elif shapes is None:
        shapes = CPU_QUICK_SHAPES if quick else CPU_SHAPES
    return [Case(m, s, d, l) for m, s, d, l in itertools.product(modes, shapes, dtypes, layouts)]


def _backend(provider: str) -> str:
    """The cnnkern backend a cnnkern-* provider runs."""
    return provider.split("-")[1]


def provider_refuses(provider: str, device: torch.device, dtype: torch.dtype):
    """Why `provider` is not benchmarked on (device, dtype), or None."""
    if not provider.startswith("cnnkern-"):
        return None
    backend = _backend(provider)
    if backend == "triton" and device.type == "cpu":
        return "the triton interpreter is a test tool, not a benchmark"
    return refuses(backend, device, dtype, "bn_forward_train")


def accuracy(ours, eager, ours_oracle, eager_oracle, dtype: torch.dtype) -> Tuple[float, bool]:
    """How far a cnnkern provider's outputs (a list of tensors) lie from the float64 oracle's
    (reference.max_error, the largest over the outputs), and whether each lies within
    reference.error_bound of eager's error against its own oracle: the tests' rule."""
    errors = [(max_error(o, truth), max_error(e, their_truth))
              for o, e, truth, their_truth in zip(ours, eager, ours_oracle, eager_oracle)]
    worst = max((o for o, _ in errors), key=lambda e: math.inf if math.isnan(e) else e)  # NaN first
    return worst, all(o <= error_bound(dtype, e) for o, e in errors)


def checker(case: Case, device: torch.device) -> Callable[[str], Tuple[float, bool]]:
    """check(provider) -> accuracy() of the provider's outputs on `case`: the forward's output,
    or the gradients, these against the oracle's through the result's own ReLU mask (as the
    tests hold them: reference.ATOL says why). Eager's side is computed once, here."""
    backward = MODES[case.mode]["bwd"]

    def outputs(provider, relu_mask=None):
        y, grads = make_fn(provider, case, device, relu_mask=relu_mask, with_output=True)()
        return list(grads) if backward else [y], y.detach() > 0

    eager, eager_mask = outputs("eager")
    eager_oracle = outputs("reference", eager_mask if backward else None)[0]

    def check(provider):
        ours, mask = outputs(provider)
        ours_oracle = outputs("reference", mask)[0] if backward else eager_oracle
        return accuracy(ours, eager, ours_oracle, eager_oracle, case.dtype)
    return check


def _eager(x, running_mean, running_var, weight, bias, training, residual):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)
    return F.relu(y + residual if residual is not None else y)


def make_fn(provider: str, case: Case, device: torch.device, *, relu_mask=None,
            with_output=False) -> Callable[[], object]:
    """A no-argument callable running `case` once with `provider`, or with "reference": the
    float64 oracle (cnnkern.reference, through `relu_mask` where given) on the same inputs.
    It gives what the mode times (the output, or the gradients); `with_output`: (output,
    gradients), with an empty tuple of gradients for a forward-only mode."""
    mode = MODES[case.mode]
    N, C = case.shape[:2]
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    grad = mode["bwd"]
    pdtype = torch.float32 if case.dtype in (torch.float16, torch.bfloat16) else case.dtype

    # Every provider of a case gets the same inputs: the benchmark compares their outputs.
    generator = torch.Generator(device=device).manual_seed(0)

    def random(shape, dtype, uniform=False):
        sample = torch.rand if uniform else torch.randn
        return sample(shape, device=device, dtype=dtype, generator=generator).contiguous(
            memory_format=fmt if len(shape) == 4 else torch.contiguous_format)

    x = random(case.shape, case.dtype).requires_grad_(grad)
    r = random(case.shape, case.dtype).requires_grad_(grad) if mode["residual"] else None
    w = (random((C,), pdtype, uniform=True) + 0.5).requires_grad_(grad)
    b = random((C,), pdtype).requires_grad_(grad)
    rm, rv = torch.zeros(C, device=device, dtype=pdtype), torch.ones(C, device=device, dtype=pdtype)
    g = random(case.shape, case.dtype)
    training = mode["training"]
    if provider == "reference":
        x, r, w, b, rm, rv, g = (t if t is None else t.detach().double().requires_grad_(t.requires_grad)
                                 for t in (x, r, w, b, rm, rv, g))

    if provider.startswith("cnnkern-"):
        backend = _backend(provider)
        # Read by the cuda launchers at each launch; set here, as the provider's calls come next.
        os.environ["CNNKERN_CUDA_ONE_PASS"] = "0" if provider.endswith("-two-pass") else "1"

        def f():
            return cnnkern.functional.batch_norm(x, rm, rv, w, b, training, residual=r, activation="relu",
                                                 backend=backend)
    elif provider == "eager":
        def f():
            return _eager(x, rm, rv, w, b, training, r)
    elif provider == "reference":
        def f():
            return batch_norm_ref(x, rm, rv, w, b, training, 0.1, 1e-5, r, "relu", relu_mask=relu_mask)
    else:
        torch._dynamo.reset()  # a fresh cache per case: never the recompile limit's eager fallback
        compiled = torch.compile(_eager, fullgraph=True)

        def f():
            return compiled(x, rm, rv, w, b, training, r)

    inputs = [t for t in (x, w, b, r) if t is not None]
    if with_output:
        def outputs():
            y = f()
            return y, torch.autograd.grad(y, inputs, g) if grad else ()
        return outputs
    if mode["fwd"] and not mode["bwd"]:
        return f
    if mode["fwd"]:
        return lambda: torch.autograd.grad(f(), inputs, g)
    y = f()
    return lambda: torch.autograd.grad(y, inputs, g, retain_graph=True)


def targets(case: Case, device: torch.device) -> Dict[str, float]:
    """The performance targets of issue 2 that apply to `case`: {metric: its least value} for a
    cnnkern provider."""
    if device.type == "cuda":
        if case.dtype not in (torch.bfloat16, torch.float32):
            return {}
        return {**_GPU_TARGETS.get(case.mode, {}), "pct_of_copy": _GPU_PCT_OF_COPY}
    if case.mode == "fwd_bwd_relu" and case.dtype == torch.float32 and case.shape == (32, 64, 56, 56):
        return {"speedup_vs_eager": 1.5}  # the CPU's: 2 cores, fp32
    return {}


def summarize(results: List[Dict], device: torch.device, cases_by_label: Dict[str, Case]) -> List[Dict]:
    """Adds speedups against eager and torch.compile of the same case and, to the cnnkern
    providers' results, the targets that apply: {metric: {"want", "got", "met"}}, "got" None
    where the run lacks what the metric compares with; none is met by a result whose outputs
    were not found "correct" (accuracy)."""
    by_case = {}
    for r in results:
        by_case.setdefault(r["case"], {})[r["provider"]] = r
    for r in results:
        peers = by_case[r["case"]]
        for other in ("eager", "compile"):
            if other in peers:
                r[f"speedup_vs_{other}"] = peers[other]["median_ms"] / r["median_ms"]
        if r["provider"].startswith("cnnkern-"):
            case = cases_by_label[r["case"]]
            # A result whose outputs are wrong meets no target, however fast.
            correct = r.get("correct", False)
            r["targets"] = {metric: dict(want=want, got=r.get(metric), met=correct and
                                         r.get(metric) is not None and r[metric] >= want)
                            for metric, want in targets(case, device).items()}
    return results
