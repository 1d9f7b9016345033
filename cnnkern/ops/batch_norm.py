"""torch.library glue of the batch-norm family: fake impls of cnnkern::bn_*, cnnkern::batch_norm
and their triton_ twins, and the Triton kernels' registration.

Autograd is in C++ (csrc/autograd/batch_norm.cpp): cnnkern::batch_norm and
cnnkern::triton_batch_norm run a backend's forward op and take its bn_backward op,
dispatched by device like the forward, as their derivative.
"""
import torch

from .. import _extension
from ..backends import TRITON_IMPORT_ERROR
from ..reference import param_grad_dtype, stat_dtype

# Ops per backend: the C++ ops serve "cpu" and "cuda", the triton_ ones "triton".
_PREFIX = {"cpu": "", "cuda": "", "triton": "triton_"}

# The input dtypes for which a backend's bn_backward recomputes the ReLU mask from the input
# (output None), as its forward computed the output. cuda: float32 and float64 only
# (csrc/cuda/bn_device.cuh, kRecomputesReluMask: its 16-bit recomputing kernels spilled
# registers). Triton's forward normalizes around a pivot its backward does not have
# (cnnkern/triton/batch_norm.py), so it reads the output in every dtype.
RECOMPUTES_RELU_MASK = {
    "cpu": frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    "cuda": frozenset({torch.float32, torch.float64}),
    "triton": frozenset(),
}


def op(backend: str, name: str):
    """The op `name` of `backend` ("cpu", "cuda" or "triton")."""
    return getattr(torch.ops.cnnkern, _PREFIX[backend] + name)


def _fake_forward_train(input, weight, bias, residual, running_mean, running_var, momentum, eps, relu):
    stats = input.new_empty(input.shape[1], dtype=stat_dtype(input.dtype))
    return torch.empty_like(input), stats, torch.empty_like(stats)


def _fake_forward_eval(input, weight, bias, residual, running_mean, running_var, eps, relu):
    return torch.empty_like(input)


def _fake_batch_norm(input, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu,
                     backward_recomputes_relu_mask):
    return torch.empty_like(input)


def _fake_backward(grad_output, input, output, weight, bias, mean, invstd, training, relu, output_mask):
    param_dtype = param_grad_dtype(weight, bias, input.dtype)
    return (
        torch.empty_like(input) if output_mask[0] else None,
        mean.new_empty(mean.shape, dtype=param_dtype) if output_mask[1] else None,
        mean.new_empty(mean.shape, dtype=param_dtype) if output_mask[2] else None,
        torch.empty_like(input) if output_mask[3] else None,
    )


def _register() -> None:
    if not _extension.loaded():
        return  # no schemas; cnnkern.backends() reports why
    for prefix in sorted(set(_PREFIX.values())):
        torch.library.register_fake(f"cnnkern::{prefix}bn_forward_train")(_fake_forward_train)
        torch.library.register_fake(f"cnnkern::{prefix}bn_forward_eval")(_fake_forward_eval)
        torch.library.register_fake(f"cnnkern::{prefix}bn_backward")(_fake_backward)
        torch.library.register_fake(f"cnnkern::{prefix}batch_norm")(_fake_batch_norm)
    if TRITON_IMPORT_ERROR is None:
        from ..triton import batch_norm as kernels

        # CPU too: triton runs CPU tensors under TRITON_INTERPRET=1.
        for name in ("bn_forward_train", "bn_forward_eval", "bn_backward"):
            torch.library.impl(f"cnnkern::triton_{name}", ("CPU", "CUDA"), getattr(kernels, name))


_register()
