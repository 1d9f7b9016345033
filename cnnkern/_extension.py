"""Loads the compiled extension once and remembers why it could not be loaded."""
import torch

try:
    from . import _C  # noqa: F401  (registers the cnnkern:: ops and their C++ kernels)

    IMPORT_ERROR = None
except ImportError as e:  # not built: `pip install --no-build-isolation -e .`
    IMPORT_ERROR = f"cnnkern._C did not import ({e}); build it with `pip install --no-build-isolation -e .`"


def loaded() -> bool:
    return IMPORT_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether cnnkern::`op` has a kernel for `dispatch_key` ("CPU", "CUDA")."""
    return loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"cnnkern::{op}", dispatch_key)
