"""The (N, C, L) strided view every kernel reads tensors through (as csrc/bn_checks.h)."""
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor


class Strided3d(NamedTuple):
    N: int
    C: int
    L: int  # all spatial dims collapsed into one
    sN: int  # element strides
    sC: int
    sL: int


def try_view3d(t: Tensor) -> Optional[Strided3d]:
    """`t` (dim >= 2) as (N, C, L) with one stride per dim, or None when its spatial
    dims cannot be addressed with one stride (e.g. x[:, :, ::2, :])."""
    return strided3d(t.shape, t.stride())


def strided3d(shape: Sequence[int], strides: Sequence[int]) -> Optional[Strided3d]:
    """try_view3d of a tensor of this shape and these strides."""
    L, sL = 1, 1
    inner_seen = False
    for size, stride in zip(reversed(shape[2:]), reversed(strides[2:])):
        if size == 1:
            continue
        if not inner_seen:
            sL, inner_seen = stride, True
        elif stride != L * sL:
            return None
        L *= size
    return Strided3d(shape[0], shape[1], L, strides[0], strides[1], sL)


def view3d_of(shape: Sequence[int], strides: Sequence[int], name: str = "tensor") -> Strided3d:
    """strided3d, or a ValueError naming the tensor."""
    v = strided3d(shape, strides)
    if v is None:
        raise ValueError(
            f"{name}: spatial dims must collapse into one strided dim (sizes {tuple(shape)}, "
            f"strides {tuple(strides)}); pass a contiguous or channels_last tensor"
        )
    return v


def view_layout(v: Strided3d) -> str:
    """How the kernels walk a tensor of view `v`: "channels_last" (lanes along C) when channels
    are adjacent in memory and each has more than one position, else "nchw" (lanes along
    positions)."""
    return "channels_last" if v.C > 1 and v.L > 1 and v.sC == 1 else "nchw"


def kernel_layout(t: Tensor) -> Optional[str]:
    """view_layout of `t`, or None where `t` has no (N, C, L) view (try_view3d). Dense NCHW and
    channels_last tensors are answered without walking their strides: this runs on every call."""
    if t.is_contiguous():
        return "nchw"  # sC = L: lanes along positions
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"  # not contiguous as well, so C > 1 and H * W > 1
    v = try_view3d(t)
    return None if v is None else view_layout(v)
