"""Pure-PyTorch oracles: the "reference" backend and the tests' ground truth.

Written from the definitions (no F.batch_norm), differentiable by autograd, in
the accumulation dtype (float32 for half inputs, float64 for float64): the tests
(and the benchmark's accuracy check) call them on float64 copies of their inputs, and
hold a result in a dtype to error_bound: no further from the oracle than PyTorch's own
result in that dtype allows.
"""
from typing import Optional

import torch
from torch import Tensor


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and arithmetic use for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def param_grad_dtype(weight: Optional[Tensor], bias: Optional[Tensor], dtype: torch.dtype) -> torch.dtype:
    """The dtype bn_backward gives grad_weight and grad_bias for input of `dtype`: the
    parameters' (they share one), or the statistics' without either."""
    param = weight if weight is not None else bias
    return param.dtype if param is not None else stat_dtype(dtype)


def batch_norm_ref(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = None,
    *,
    relu_mask: Optional[Tensor] = None,
) -> Tensor:
    """act(batch_norm(input) + residual); updates the running stats in place when training.

    relu_mask (bool, input's shape; with activation "relu"): where the ReLU passes, in place
    of where the value is positive. Given a result's own mask (its output > 0), the oracle's
    gradients are those of the function that result computed: an element whose value rounds
    across zero in one dtype and not in another then costs neither a gradient error."""
    acc = stat_dtype(input.dtype)
    x = input.to(acc)
    shape = [1, -1] + [1] * (input.dim() - 2)
    dims = [0] + list(range(2, input.dim()))
    if training:
        mean = x.mean(dims)
        var = (x - mean.view(shape)).square().mean(dims)
        count = input.numel() // max(input.shape[1], 1)
        if count > 0:
            with torch.no_grad():
                if running_mean is not None:
                    running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
                if running_var is not None:
                    unbiased = var.detach() * (count / (count - 1))
                    running_var.lerp_(unbiased.to(running_var.dtype), momentum)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.to(acc).view(shape)
    if bias is not None:
        y = y + bias.to(acc).view(shape)
    if residual is not None:
        y = y + residual.to(acc)
    if activation == "relu":
        y = torch.relu(y) if relu_mask is None else torch.where(relu_mask, y, 0)
    return y.to(input.dtype)


# Against the float64 oracle, a result in `dtype` may err by at most
#   2 * (PyTorch's own error in that dtype) + ATOL[dtype]
# (max_error: max abs error, over tensors normalized to unit scale). The factor 2 leaves room
# for a different summation order; ATOL covers cases where PyTorch is exact. Gradients through
# a ReLU are held to the oracle given the result's own mask (batch_norm_ref's relu_mask): where
# a value rounds across zero in one dtype the mask flips, which is rounding, not an error, yet
# costs about one |grad_output| there and would loosen the bound on every element.
ATOL = {
    torch.float64: 1e-9,  # reductions in another order: rounding only
    torch.float32: 2e-5,  # fp32 statistics over up to ~1e4 values per channel
    torch.bfloat16: 1e-2,  # one bf16 rounding of the output is ~4e-3 relative
    torch.float16: 2e-3,  # one fp16 rounding of the output is ~5e-4 relative
}


def max_error(t: Tensor, oracle: Tensor) -> float:
    """Max abs error of `t` against `oracle`, relative to the oracle's scale (at least 1)."""
    if oracle.numel() == 0:
        return 0.0
    scale = max(oracle.abs().max().item(), 1.0)
    return (t.to(oracle.dtype) - oracle).abs().max().item() / scale


def error_bound(dtype: torch.dtype, torch_error: float) -> float:
    """How far from the oracle a result in `dtype` may lie, where PyTorch's lies `torch_error` away."""
    return 2 * torch_error + ATOL[dtype]
