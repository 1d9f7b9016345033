"""torch.library glue of the batch-norm family: fake impls of cnnkern::bn_* and
cnnkern::triton_bn_*, the Triton kernels' registration, and autograd.

Autograd is one torch.autograd.Function rather than register_autograd:
bn_forward_train updates the running stats in place inside its kernel (saving
the launches a separate update would cost), and register_autograd refuses ops
that mutate. The backward is its own op, dispatched by device like the forward.
"""
from typing import List, Optional

import torch
from torch import Tensor

from .. import _extension
from ..backends import TRITON_IMPORT_ERROR
from ..layout import try_view3d
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


def _op(backend: str, name: str):
    return getattr(torch.ops.cnnkern, _PREFIX[backend] + name)


def _fake_forward_train(input, weight, bias, residual, running_mean, running_var, momentum, eps, relu):
    stats = input.new_empty(input.shape[1], dtype=stat_dtype(input.dtype))
    return torch.empty_like(input), stats, torch.empty_like(stats)


def _fake_forward_eval(input, weight, bias, residual, running_mean, running_var, eps, relu):
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
    if TRITON_IMPORT_ERROR is None:
        from ..triton import batch_norm as kernels

        # CPU too: triton runs CPU tensors under TRITON_INTERPRET=1.
        for name in ("bn_forward_train", "bn_forward_eval", "bn_backward"):
            torch.library.impl(f"cnnkern::triton_{name}", ("CPU", "CUDA"), getattr(kernels, name))


_register()


def forward_ops(backend: str, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                residual: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                training: bool, momentum: float, eps: float, relu: bool):
    """(output, mean, invstd) of backend's forward op; the statistics are None in eval. Calls
    that no gradient flows through take it directly, outside BatchNormFunction: its
    bookkeeping costs more host time than the kernels of small layers take."""
    if training:
        return _op(backend, "bn_forward_train")(input, weight, bias, residual, running_mean, running_var,
                                                momentum, eps, relu)
    output = _op(backend, "bn_forward_eval")(input, weight, bias, residual, running_mean, running_var, eps, relu)
    return output, None, None


class BatchNormFunction(torch.autograd.Function):
    """act(batch_norm(input) + residual) on one backend's ops."""

    @staticmethod
    def forward(ctx, backend: str, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                residual: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                training: bool, momentum: float, eps: float, relu: bool) -> Tensor:
        output, mean, invstd = forward_ops(backend, input, weight, bias, residual, running_mean, running_var,
                                           training, momentum, eps, relu)
        if not training and any(ctx.needs_input_grad):
            # Eval-mode backward normalizes with the running stats as they are now.
            acc = stat_dtype(input.dtype)
            mean = running_mean.to(acc, copy=True)
            invstd = torch.rsqrt(running_var.to(acc) + eps)
        ctx.backend, ctx.training, ctx.relu = backend, training, relu
        # The output serves only the ReLU mask. Where the backward can recompute the mask
        # from the input instead (no residual; the batch statistics, which it gets as the
        # forward saved them) it is not kept: the backward reads a tensor fewer, and the
        # output is free for in-place ops (torchvision's `out += identity`) and the allocator.
        keeps_output = relu and not (training and residual is None and input.dtype in RECOMPUTES_RELU_MASK[backend])
        ctx.save_for_backward(input, output if keeps_output else None, weight, bias, mean, invstd)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, output, weight, bias, mean, invstd = ctx.saved_tensors
        _, need_input, need_weight, need_bias, need_residual = ctx.needs_input_grad[:5]
        mask: List[bool] = [need_input, need_weight, need_bias, need_residual and ctx.relu]
        grads = [None, None, None, None]
        if try_view3d(grad_output) is None:
            grad_output = grad_output.contiguous()  # a layout no kernel can address (see functional)
        if any(mask):
            grads = list(_op(ctx.backend, "bn_backward")(
                grad_output, input, output, weight, bias, mean, invstd, ctx.training, ctx.relu, mask))
        grad_input, grad_weight, grad_bias, grad_residual = grads
        if need_residual and not ctx.relu:
            grad_residual = grad_output  # d(x + r)/dr = 1: no kernel, no copy
        return None, grad_input, grad_weight, grad_bias, grad_residual, None, None, None, None, None, None
