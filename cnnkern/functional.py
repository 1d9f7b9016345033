"""The functional API, torch.nn.functional-style: checks arguments, picks the
backend, calls the op."""
import math
from typing import Optional

import torch
from torch import Tensor

from . import reference
from .backends import select
from .layout import kernel_layout
from .ops.batch_norm import RECOMPUTES_RELU_MASK, op

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ACTIVATIONS = (None, "relu")


# Per input dtype, the dtypes its parameters and running stats may have.
_PARAM_DTYPES = {dtype: {dtype, torch.float32} if dtype in (torch.float16, torch.bfloat16) else {dtype}
                 for dtype in _FLOAT_DTYPES}


def _check_batch_norm_args(input, running_mean, running_var, weight, bias, training, residual, activation):
    # Every call runs these checks: each tensor property is read once (host time).
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    dtype, device, shape = input.dtype, input.device, input.shape
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {dtype}")
    if len(shape) < 2:
        raise ValueError(f"input must have at least 2 dims (N, C, ...), got shape {tuple(shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    C = shape[1]
    param_dtype = None
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        t_dtype, t_device = t.dtype, t.device
        if t.shape != (C,):
            raise ValueError(f"{name} must have shape ({C},) to match input's {C} channels, got {tuple(t.shape)}")
        if t_device != device:
            raise ValueError(f"{name} is on {t_device} but input is on {device}")
        if t_dtype not in _PARAM_DTYPES[dtype]:
            raise TypeError(f"{name} must be {dtype} (or float32 for float16/bfloat16 input), got {t_dtype}")
        if param_dtype is not None and t_dtype != param_dtype:
            raise TypeError(f"{name} is {t_dtype} but an earlier parameter is {param_dtype}; "
                            "weight, bias and running stats must share one dtype")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        param_dtype = t_dtype
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are required when training=False")
    if residual is not None:
        if residual.shape != shape:
            raise ValueError(f"residual must have input's shape {tuple(shape)}, got {tuple(residual.shape)}")
        if residual.dtype != dtype:
            raise TypeError(f"residual must be {dtype} like input, got {residual.dtype}")
        if residual.device != device:
            raise ValueError(f"residual is on {residual.device} but input is on {device}")
    if training and math.prod(shape) == C > 0:  # one value per channel
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """act(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) + residual).

    Fused into one kernel per pass, forward and backward; running stats are updated
    in place exactly as F.batch_norm does. input is (N, C, *) of float16,
    bfloat16, float32 or float64, NCHW or channels_last (any strides whose spatial
    dims collapse into one; other inputs are copied to contiguous first).
    Parameters and running stats are of input's dtype, or float32 for
    float16/bfloat16 input. activation: None or "relu". backend: None
    (automatic), "triton", "cuda", "cpu" or "reference" (also $CNNKERN_BACKEND).
    """
    _check_batch_norm_args(input, running_mean, running_var, weight, bias, training, residual, activation)
    layout = kernel_layout(input)
    name = select(backend, input.device, input.dtype, "bn_forward_train", layout or "nchw")
    if name == "reference":
        return reference.batch_norm_ref(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                        residual, activation)
    # Kernels address every tensor as (N, C, L) with one stride per dim; the rare
    # layout that cannot be (a spatial dim sliced with a step) is copied here, visibly.
    if layout is None:
        input = input.contiguous()
    if residual is not None and kernel_layout(residual) is None:
        residual = residual.contiguous()
    return op(name, "batch_norm")(input, weight, bias, residual, running_mean, running_var, training,
                                  float(momentum), float(eps), activation == "relu",
                                  input.dtype in RECOMPUTES_RELU_MASK[name])
