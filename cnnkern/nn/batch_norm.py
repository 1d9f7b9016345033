"""Drop-in torch.nn.BatchNorm1d/2d with a fused residual add and ReLU.

Subclasses of the torch modules: same parameters, buffers, state_dict keys,
momentum=None (cumulative average), affine / track_running_stats and eval
behaviour, and isinstance(m, torch.nn.BatchNorm2d) holds. forward takes an
optional residual added before the activation.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import functional


class _FusedBatchNormMixin:
    def _init_fused(self, activation: Optional[str], backend: Optional[str]) -> None:
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        self.activation = activation
        self.backend = backend

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        # Running-stat bookkeeping exactly as torch.nn.modules.batchnorm._BatchNorm.
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_stats = not self.training or self.track_running_stats
        return functional.batch_norm(
            input,
            self.running_mean if keep_stats else None,
            self.running_var if keep_stats else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            residual=residual,
            activation=self.activation,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        if self.activation is not None:
            extra += f", activation={self.activation!r}"
        if self.backend is not None:
            extra += f", backend={self.backend!r}"
        return extra


class BatchNorm2d(_FusedBatchNormMixin, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d + optional residual + activation, fused. Input (N, C, H, W)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: Optional[str] = None, *,
                 backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self._init_fused(activation, backend)


class BatchNorm1d(_FusedBatchNormMixin, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d + optional residual + activation, fused. Input (N, C) or (N, C, L)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: Optional[str] = None, *,
                 backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self._init_fused(activation, backend)
