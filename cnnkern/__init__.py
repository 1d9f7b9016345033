"""cnnkern: fused Triton / CUDA / C++ kernels for classic CNNs."""
from . import functional, nn, reference
from .backends import BackendError, BackendInfo, backends, explain

__all__ = ["functional", "nn", "reference", "backends", "BackendError", "BackendInfo", "explain"]
__version__ = "0.1.0"
