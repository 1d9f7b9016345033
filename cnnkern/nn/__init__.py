"""Modules built on cnnkern's fused kernels."""
from .batch_norm import BatchNorm1d, BatchNorm2d

__all__ = ["BatchNorm1d", "BatchNorm2d"]
