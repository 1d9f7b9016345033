"""cnnkern: fused Triton / CUDA / C++ kernels for classic CNNs."""
from . import functional, nn, reference
from .backends import BackendError, BackendInfo, backends

__all__ = ["functional", "nn", "reference", "backends", "BackendError", "BackendInfo"]
__version__ = "0.1.0"
