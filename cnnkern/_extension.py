"""Loads the compiled extension once and remembers why it could not be loaded."""
import importlib.util

import torch

_BUILD = "pip install --no-build-isolation -e ."

try:
    from . import _C  # noqa: F401  (registers the cnnkern:: ops and their C++ kernels)

    IMPORT_ERROR = None
except ImportError as e:
    # Python words a missing submodule as a circular import; say which case this is.
    if importlib.util.find_spec(f"{__package__}._C") is None:
        IMPORT_ERROR = f"cnnkern._C is not built; build it with `{_BUILD}`"
    else:  # e.g. built against another torch: undefined symbols
        IMPORT_ERROR = f"cnnkern._C is built but did not load ({e}); rebuild it with `{_BUILD}`"


def loaded() -> bool:
    return IMPORT_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether cnnkern::`op` has a kernel for `dispatch_key` ("CPU", "CUDA")."""
    return loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"cnnkern::{op}", dispatch_key)


def cpu_features() -> str:
    """Which loops the C++ CPU kernels take on this machine (by its CPU and the CNNKERN_CPU_*
    variables), in words; empty where the extension did not load."""
    return _C.cpu_features() if loaded() else ""
