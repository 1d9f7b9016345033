"""Triton kernels of the batch-norm family: y = act(batch_norm(x) + residual), and its backward.

Every tensor is read as (N, C, L) through its own strides (`layout.strided3d`), so NCHW,
channels_last, channel slices of a larger buffer and stride-0 gradients all run
without a copy. Program (c_block, split) of every kernel handles channels
[c_block * BLOCK_C, +BLOCK_C) and a contiguous range of [BLOCK_L, BLOCK_C] tiles,
numbered over (sample, L-block): its split of the channels' N*L values. Where every
tensor of a call lets samples and positions merge into one axis (channels_last,
N == 1, L == 1, stride 0), the kernels see N = 1 and L = N*L: no tile is cut short
at a sample's end, and no lane idles there.

Launches, all on the same (channel block, split) grid:
  training forward  _bn_stats_kernel      per-split (count, mean, M2) of x - pivot (Welford)
                    _bn_fwd_kernel        merges its channels' partials (Chan), normalizes;
                                          split 0 writes save_mean/invstd, running stats
  eval forward      _bn_fwd_kernel        running statistics, one pass
  backward          _bn_bwd_reduce_kernel per-split sum(dy), sum(dy * (x - mean))
                    _bn_bwd_kernel        merges them, writes grad_input / grad_residual;
                                          split 0 writes grad_weight / grad_bias
Where every second-pass program merging all its channels' partials would cap the splits
so low that the grid fills the GPU only with channel blocks too narrow for whole-line rows
(channels_last training), _bn_merge_partials_kernel merges them once per channel between
the passes, on a small grid of its own, and the second pass reads one partial a channel.
The second passes walk everything backwards (programs in reverse launch order, each
one's tiles last to first): they start on the tiles the first pass read last, which
are still in L2, so a tensor that fits in L2 is read from DRAM once, and a larger one
saves the part that does.
All arithmetic happens in ACC_DTYPE: float64 for float64 input, else float32.

The tiling (_plan_geometry) is worked out once per call geometry and kept, with the
compiled kernels, in a launch.PlanCache, which sizes the grid to the compiled kernels'
occupancy; calls then launch those kernels directly (launch.run).
"""
import math
import os
import types
import warnings
from typing import Callable, Dict, Hashable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..layout import Strided3d, view3d_of
from ..reference import param_grad_dtype, stat_dtype
from . import launch

__all__ = ["bn_forward_train", "bn_forward_eval", "bn_backward"]


# ---- kernels ----------------------------------------------------------------------


@triton.jit
def _tile(tile, l_blocks, L, BLOCK_L: tl.constexpr):
    """Sample index, first position and [BLOCK_L, 1] in-bounds mask of the positions of
    tile `tile` (tiles run over the L-blocks of sample 0, then of sample 1, ...)."""
    n = tile // l_blocks
    l_start = (tile - n * l_blocks) * BLOCK_L
    return n, l_start, (l_start + tl.arange(0, BLOCK_L) < L)[:, None]


@triton.jit
def _tile_ptrs(ptr, n, l_start, c_start, stride_n, stride_c, stride_l,
               BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pointers of the [BLOCK_L, BLOCK_C] tile at (n, c_start.., l_start..). The tile's
    origin is computed in 64 bits (a tensor may span more than 2**31 elements), the
    offsets inside it in 32. A stride of 1 is specialized by Triton, so the tile is
    known contiguous along that axis and its loads vectorize.
    A kernel over several tensors of one layout (the common case) takes them all at x's
    strides (SAME_STRIDES): the compiler cannot tell equal stride arguments apart, and would
    keep one set of the tile's offsets per tensor live across the loop. One set saves up to
    32 registers a thread (sm_90: the float32 backward reduction 124 -> 92, bench/NOTES.md)."""
    origin = n.to(tl.int64) * stride_n + c_start.to(tl.int64) * stride_c + l_start.to(tl.int64) * stride_l
    l = tl.arange(0, BLOCK_L)[:, None]
    c = tl.arange(0, BLOCK_C)[None, :]
    return ptr + origin + (l * stride_l + c * stride_c)


@triton.jit
def _program(C, BACKWARDS: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's split, its channel block's first channel, the block's [BLOCK_C] channels
    and which of them are < C. Programs are (channel block, split); a second pass takes them
    BACKWARDS."""
    c_block, split = tl.program_id(0), tl.program_id(1)
    if BACKWARDS:
        c_block, split = tl.num_programs(0) - 1 - c_block, tl.num_programs(1) - 1 - split
    c_start = c_block * BLOCK_C
    channels = c_start + tl.arange(0, BLOCK_C)
    return split, c_start, channels, channels < C


@triton.jit
def _split_partials(partials_ptr, j, first, num_splits, C, channels, c_ok, SPLITS_BLOCK: tl.constexpr):
    """[SPLITS_BLOCK, BLOCK_C] array j of the (arrays, num_splits, C) partials, at `channels`:
    one row per split from split `first` on, zeros past num_splits and C."""
    splits = first + tl.arange(0, SPLITS_BLOCK)[:, None]
    return tl.load(partials_ptr + (j * num_splits + splits) * C + channels[None, :],
                   mask=(splits < num_splits) & c_ok[None, :], other=0.0)


@triton.jit
def _summed_partials(partials_ptr, j, num_splits, C, channels, c_ok, SPLITS_BLOCK: tl.constexpr):
    """[BLOCK_C] sum over the splits of array j of the (arrays, num_splits, C) partials,
    SPLITS_BLOCK splits at a time."""
    total = tl.sum(_split_partials(partials_ptr, j, 0, num_splits, C, channels, c_ok, SPLITS_BLOCK), 0)
    for first in range(SPLITS_BLOCK, num_splits, SPLITS_BLOCK):
        total += tl.sum(_split_partials(partials_ptr, j, first, num_splits, C, channels, c_ok, SPLITS_BLOCK), 0)
    return total


@triton.jit
def _load_pivot(x_ptr, channels, c_ok, x_stride_c, ACC_DTYPE: tl.constexpr):
    """x[0, c, 0] for each channel: the statistics are taken of x - pivot. A value of the
    channel is typically within a few std of its mean, so x - pivot is of the order of the
    std however large the mean (and exact when |mean| >> std): no float32 bits go to
    the mean's magnitude, which would cost the variance and the output their precision."""
    return tl.load(x_ptr + channels.to(tl.int64) * x_stride_c, mask=c_ok, other=0.0).to(ACC_DTYPE)


@triton.jit
def _welford_merge(count, mean, m2):
    """The (count, mean, M2) summary, per channel, of the rows of [R, BLOCK_C] summaries whose
    counts, one per row, are `count` ([R, 1]; empty rows, of count 0, add nothing): the pooled
    mean, and M2 as the rows' M2 plus their spread about it (Chan et al.'s merge, for R groups
    at once). Plain sums, not a tl.reduce over a pairwise combine: the same on the GPU, and
    the interpreter evaluates a custom combine element by element in Python (30x the time of
    the rest of the kernel). The total count is [1]."""
    total = tl.sum(count, 0)
    pooled = tl.sum(count * mean, 0) / tl.maximum(total, 1.0)
    spread = mean - pooled[None, :]
    return total, pooled, tl.sum(m2 + count * spread * spread, 0)


@triton.jit
def _merged_welford(partials_ptr, num_splits, C, c_start, channels, c_ok, SPLITS_BLOCK: tl.constexpr):
    """The (count, mean, M2) summary, per channel, of all splits of the (3, num_splits, C)
    Welford partials, merged SPLITS_BLOCK splits at a time, each block into the summary of
    those before it (Chan et al.'s merge of two). A split's count is the same for all its
    channels: channel c_start's serves."""
    count, mean, m2 = _welford_block(partials_ptr, 0, num_splits, C, c_start, channels, c_ok, SPLITS_BLOCK)
    for first in range(SPLITS_BLOCK, num_splits, SPLITS_BLOCK):
        block_count, block_mean, block_m2 = _welford_block(partials_ptr, first, num_splits, C, c_start, channels,
                                                           c_ok, SPLITS_BLOCK)
        total = count + block_count
        block_weight = block_count / total  # no block is empty: each holds a split
        delta = block_mean - mean
        mean += delta * block_weight
        m2 += block_m2 + delta * delta * count * block_weight
        count = total
    return count, mean, m2


@triton.jit
def _welford_block(partials_ptr, first, num_splits, C, c_start, channels, c_ok, SPLITS_BLOCK: tl.constexpr):
    """_welford_merge of splits [first, first + SPLITS_BLOCK) of the (3, num_splits, C) partials."""
    splits = first + tl.arange(0, SPLITS_BLOCK)[:, None]
    counts = tl.load(partials_ptr + splits * C + c_start, mask=splits < num_splits, other=0.0)
    return _welford_merge(counts, _split_partials(partials_ptr, 1, first, num_splits, C, channels, c_ok, SPLITS_BLOCK),
                          _split_partials(partials_ptr, 2, first, num_splits, C, channels, c_ok, SPLITS_BLOCK))


# The split counts (num_splits, num_partials) and the tiles per split are not specialized on
# (divisible by 16, equal to 1): they gain nothing from it (loop bounds, never strides), and a
# plan with fewer splits (_plan) would compile kernels of its own. (l_blocks == 1, by contrast,
# spares every 7x7 NCHW tile a division: 30 registers in the backward's reduction.)
_kernel = triton.jit(do_not_specialize=["tiles_per_split", "num_splits", "num_partials"])


@_kernel
def _bn_stats_kernel(
    x_ptr,  # input (N, C, L)
    partials_ptr,  # out: (3, num_splits, C), ACC_DTYPE: count, mean - pivot, M2 of each (split, channel)
    C,  # channels
    L,  # positions per sample
    x_stride_n, x_stride_c, x_stride_l,  # input's element strides
    l_blocks,  # cdiv(L, BLOCK_L): tiles per sample
    num_tiles,  # N * l_blocks: tiles per channel block
    tiles_per_split,  # consecutive tiles one program reduces
    num_splits,  # programs per channel block
    ACC_DTYPE: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    split, c_start, channels, c_ok = _program(C, BACKWARDS=False, BLOCK_C=BLOCK_C)
    pivot = _load_pivot(x_ptr, channels, c_ok, x_stride_c, ACC_DTYPE)[None, :]
    # Welford per lane on x - pivot: each lane folds in one value per tile, and the lanes
    # merge at the end (unlike plain sums, robust even to a pivot far out in the tail).
    # All lanes of a row see the same positions, so they share one count; and a row misses
    # a tile only where the tile is a sample's last L-block and the row lies past L. So two
    # scalar counts give every row's: the per-row work is a select, not a division, and
    # the update per value is three FMAs and two adds (it was twice that).
    tail_rows = (tl.arange(0, BLOCK_L) < L - (l_blocks - 1) * BLOCK_L)[:, None]  # rows of a last L-block
    tiles = tl.zeros([], ACC_DTYPE)  # tiles folded in so far
    last_blocks = tl.zeros([], ACC_DTYPE)  # of them, samples' last L-blocks
    mean = tl.zeros([BLOCK_L, BLOCK_C], ACC_DTYPE)
    m2 = tl.zeros([BLOCK_L, BLOCK_C], ACC_DTYPE)
    first_tile = split * tiles_per_split
    for tile in range(first_tile, tl.minimum(first_tile + tiles_per_split, num_tiles)):
        n, l_start, l_ok = _tile(tile, l_blocks, L, BLOCK_L)
        x = tl.load(_tile_ptrs(x_ptr, n, l_start, c_start, x_stride_n, x_stride_c, x_stride_l, BLOCK_L, BLOCK_C),
                    mask=l_ok & c_ok[None, :], other=0.0).to(ACC_DTYPE) - pivot
        is_last = l_start + BLOCK_L >= L
        tiles += 1.0
        last_blocks += is_last.to(ACC_DTYPE)
        # 1 / the row's count: rows of a last L-block have seen every tile, the others all but
        # the last L-blocks; 0 for rows past L (their mean stays as it is).
        other_weight = tl.where(is_last, 0.0, 1.0 / tl.maximum(tiles - last_blocks, 1.0))
        weight = tl.where(tail_rows, 1.0 / tiles, other_weight)
        # M2 += delta * (x - new mean) = delta^2 * (1 - weight); nothing for rows past L.
        delta = x - mean
        mean += delta * weight
        m2 += delta * delta * tl.where(l_ok, 1.0 - weight, 0.0)
    count = tl.where(tail_rows, tiles, tiles - last_blocks)
    count, mean, m2 = _welford_merge(count, mean, m2)
    out = partials_ptr + split * C + channels
    tl.store(out, tl.broadcast_to(count, [BLOCK_C]), mask=c_ok)
    tl.store(out + num_splits * C, mean, mask=c_ok)
    tl.store(out + 2 * num_splits * C, m2, mask=c_ok)


@_kernel
def _bn_fwd_kernel(
    x_ptr,  # input (N, C, L)
    r_ptr,  # residual (N, C, L), input's dtype; None unless HAS_RESIDUAL
    y_ptr,  # out: output (N, C, L), input's dtype
    w_ptr,  # weight (C,), param dtype; None unless HAS_WEIGHT
    b_ptr,  # bias (C,), param dtype; None unless HAS_BIAS
    running_mean_ptr,  # (C,), param dtype: read in eval, updated in training; None unless HAS_RUNNING_MEAN
    running_var_ptr,  # (C,), param dtype: read in eval, updated in training; None unless HAS_RUNNING_VAR
    partials_ptr,  # training: (3, num_partials, C) from _bn_stats_kernel or _bn_merge_partials_kernel
    save_mean_ptr,  # training out: (C,), ACC_DTYPE
    save_invstd_ptr,  # training out: (C,), ACC_DTYPE
    C,  # channels
    L,  # positions per sample
    M,  # values per channel, N * L
    x_stride_n, x_stride_c, x_stride_l,  # element strides of input,
    r_stride_n, r_stride_c, r_stride_l,  # residual,
    y_stride_n, y_stride_c, y_stride_l,  # and output
    l_blocks,  # cdiv(L, BLOCK_L): tiles per sample
    num_tiles,  # N * l_blocks: tiles per channel block
    tiles_per_split,  # consecutive tiles one program normalizes
    num_partials,  # partials per channel: the first pass's splits, or 1 once merged
    momentum: tl.float64,  # running-stats update weight (float64: exact for float64 stats)
    eps: tl.float64,  # added to the variance
    TRAINING: tl.constexpr,  # batch statistics from the partials; else the running ones
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_RUNNING_MEAN: tl.constexpr,
    HAS_RUNNING_VAR: tl.constexpr,
    RELU: tl.constexpr,
    SAME_STRIDES: tl.constexpr,  # every tensor has x's strides: one set of tile offsets serves all
    ACC_DTYPE: tl.constexpr,
    SPLITS_BLOCK: tl.constexpr,  # partials merged at a time: next_power_of_2(num_partials) in one plan
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    split, c_start, channels, c_ok = _program(C, BACKWARDS=True, BLOCK_C=BLOCK_C)
    if SAME_STRIDES:  # see _tile_ptrs
        r_stride_n, r_stride_c, r_stride_l = x_stride_n, x_stride_c, x_stride_l
        y_stride_n, y_stride_c, y_stride_l = x_stride_n, x_stride_c, x_stride_l
    # tl.full converts the float64 scalars exactly (tl.cast would round through float32
    # in the interpreter), and keeps float32 kernels in float32.
    eps = tl.full([], eps, ACC_DTYPE)
    momentum = tl.full([], momentum, ACC_DTYPE)
    # y = (x - mean) * scale + bias, computed as (x - pivot) * scale + shift: with the
    # pivot within a few std of the mean, neither term is large (no cancellation) and
    # x - pivot is exact, where mean itself would be rounded to ACC_DTYPE.
    if TRAINING:
        # Every program merges its channels' partials itself: few, or one each where
        # _bn_merge_partials_kernel merged them.
        _, mean_from_pivot, m2 = _merged_welford(partials_ptr, num_partials, C, c_start, channels, c_ok,
                                                 SPLITS_BLOCK)
        pivot = _load_pivot(x_ptr, channels, c_ok, x_stride_c, ACC_DTYPE)
        invstd = 1.0 / tl.sqrt(m2 / M + eps)
        if split == 0:
            mean = pivot + mean_from_pivot
            tl.store(save_mean_ptr + channels, mean, mask=c_ok)
            tl.store(save_invstd_ptr + channels, invstd, mask=c_ok)
            if HAS_RUNNING_MEAN:
                old = tl.load(running_mean_ptr + channels, mask=c_ok).to(ACC_DTYPE)
                new = (1.0 - momentum) * old + momentum * mean
                tl.store(running_mean_ptr + channels, new.to(running_mean_ptr.dtype.element_ty), mask=c_ok)
            if HAS_RUNNING_VAR:
                old = tl.load(running_var_ptr + channels, mask=c_ok).to(ACC_DTYPE)
                new = (1.0 - momentum) * old + momentum * (m2 / (M - 1))  # unbiased variance
                tl.store(running_var_ptr + channels, new.to(running_var_ptr.dtype.element_ty), mask=c_ok)
    else:
        pivot = tl.load(running_mean_ptr + channels, mask=c_ok, other=0.0).to(ACC_DTYPE)
        mean_from_pivot = tl.zeros([BLOCK_C], ACC_DTYPE)
        invstd = 1.0 / tl.sqrt(tl.load(running_var_ptr + channels, mask=c_ok, other=1.0).to(ACC_DTYPE) + eps)
    scale = invstd
    if HAS_WEIGHT:
        scale *= tl.load(w_ptr + channels, mask=c_ok).to(ACC_DTYPE)
    shift = -mean_from_pivot * scale
    if HAS_BIAS:
        shift += tl.load(b_ptr + channels, mask=c_ok).to(ACC_DTYPE)
    pivot, scale, shift = pivot[None, :], scale[None, :], shift[None, :]

    first_tile = split * tiles_per_split
    end_tile = tl.minimum(first_tile + tiles_per_split, num_tiles)
    for k in range(first_tile, end_tile):
        tile = first_tile + end_tile - 1 - k  # backwards (module docstring)
        n, l_start, l_ok = _tile(tile, l_blocks, L, BLOCK_L)
        mask = l_ok & c_ok[None, :]
        x = tl.load(_tile_ptrs(x_ptr, n, l_start, c_start, x_stride_n, x_stride_c, x_stride_l, BLOCK_L, BLOCK_C),
                    mask=mask, other=0.0).to(ACC_DTYPE)
        y = (x - pivot) * scale + shift
        if HAS_RESIDUAL:
            y += tl.load(_tile_ptrs(r_ptr, n, l_start, c_start, r_stride_n, r_stride_c, r_stride_l, BLOCK_L, BLOCK_C),
                         mask=mask, other=0.0).to(ACC_DTYPE)
        if RELU:
            y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch.relu
        tl.store(_tile_ptrs(y_ptr, n, l_start, c_start, y_stride_n, y_stride_c, y_stride_l, BLOCK_L, BLOCK_C),
                 y.to(y_ptr.dtype.element_ty), mask=mask)


@_kernel
def _bn_merge_partials_kernel(
    partials_ptr,  # (arrays, num_splits, C), ACC_DTYPE: a first pass's partials, one row per split
    merged_ptr,  # out: (arrays, 1, C), ACC_DTYPE: the same merged over the splits, as one split's
    C,  # channels
    num_splits,  # partials per channel
    WELFORD: tl.constexpr,  # (count, mean, M2) partials of _bn_stats_kernel; else _bn_bwd_reduce_kernel's 2 sums
    SPLITS_BLOCK: tl.constexpr,  # partials merged at a time
    BLOCK_C: tl.constexpr,
):
    """Merges a first pass's partials once per channel, between the passes, where the plan
    has too many splits for every second-pass program to merge its channels' own (_Plan.merge)."""
    c_start = tl.program_id(0) * BLOCK_C
    channels = c_start + tl.arange(0, BLOCK_C)
    c_ok = channels < C
    if WELFORD:
        count, mean, m2 = _merged_welford(partials_ptr, num_splits, C, c_start, channels, c_ok, SPLITS_BLOCK)
        tl.store(merged_ptr + channels, tl.broadcast_to(count, [BLOCK_C]), mask=c_ok)
        tl.store(merged_ptr + C + channels, mean, mask=c_ok)
        tl.store(merged_ptr + 2 * C + channels, m2, mask=c_ok)
    else:
        for j in tl.static_range(2):
            tl.store(merged_ptr + j * C + channels,
                     _summed_partials(partials_ptr, j, num_splits, C, channels, c_ok, SPLITS_BLOCK), mask=c_ok)


@_kernel
def _bn_bwd_reduce_kernel(
    dy_ptr,  # grad_output (N, C, L)
    x_ptr,  # input (N, C, L)
    y_ptr,  # output (N, C, L), for the ReLU mask; None unless RELU
    dr_ptr,  # out: grad_residual (N, C, L), the masked dy; None unless HAS_DR
    mean_ptr,  # (C,), ACC_DTYPE: the mean the forward normalized with
    partials_ptr,  # out: (2, num_splits, C), ACC_DTYPE: sum(dy), sum(dy * (x - mean)) of each (split, channel)
    C,  # channels
    L,  # positions per sample
    dy_stride_n, dy_stride_c, dy_stride_l,  # element strides of grad_output,
    x_stride_n, x_stride_c, x_stride_l,  # input,
    y_stride_n, y_stride_c, y_stride_l,  # output,
    dr_stride_n, dr_stride_c, dr_stride_l,  # and grad_residual
    l_blocks,  # cdiv(L, BLOCK_L): tiles per sample
    num_tiles,  # N * l_blocks: tiles per channel block
    tiles_per_split,  # consecutive tiles one program reduces
    num_splits,  # programs per channel block
    RELU: tl.constexpr,
    HAS_DR: tl.constexpr,  # write grad_residual here, so that _bn_bwd_kernel reads it instead of dy and y
    SAME_STRIDES: tl.constexpr,  # every tensor has x's strides: one set of tile offsets serves all
    ACC_DTYPE: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    split, c_start, channels, c_ok = _program(C, BACKWARDS=False, BLOCK_C=BLOCK_C)
    if SAME_STRIDES:  # see _tile_ptrs
        dy_stride_n, dy_stride_c, dy_stride_l = x_stride_n, x_stride_c, x_stride_l
        y_stride_n, y_stride_c, y_stride_l = x_stride_n, x_stride_c, x_stride_l
        dr_stride_n, dr_stride_c, dr_stride_l = x_stride_n, x_stride_c, x_stride_l
    mean = tl.load(mean_ptr + channels, mask=c_ok, other=0.0)[None, :]
    sum_dy = tl.zeros([BLOCK_L, BLOCK_C], ACC_DTYPE)
    sum_dy_xmu = tl.zeros([BLOCK_L, BLOCK_C], ACC_DTYPE)
    first_tile = split * tiles_per_split
    for tile in range(first_tile, tl.minimum(first_tile + tiles_per_split, num_tiles)):
        n, l_start, l_ok = _tile(tile, l_blocks, L, BLOCK_L)
        mask = l_ok & c_ok[None, :]
        dy = tl.load(_tile_ptrs(dy_ptr, n, l_start, c_start, dy_stride_n, dy_stride_c, dy_stride_l, BLOCK_L, BLOCK_C),
                     mask=mask, other=0.0).to(ACC_DTYPE)
        if RELU:  # the ReLU let gradient through only where it let the value through
            y = tl.load(_tile_ptrs(y_ptr, n, l_start, c_start, y_stride_n, y_stride_c, y_stride_l, BLOCK_L, BLOCK_C),
                        mask=mask, other=0.0)
            dy = tl.where(y > 0, dy, 0.0)
        if HAS_DR:
            tl.store(_tile_ptrs(dr_ptr, n, l_start, c_start, dr_stride_n, dr_stride_c, dr_stride_l, BLOCK_L, BLOCK_C),
                     dy.to(dr_ptr.dtype.element_ty), mask=mask)
        x = tl.load(_tile_ptrs(x_ptr, n, l_start, c_start, x_stride_n, x_stride_c, x_stride_l, BLOCK_L, BLOCK_C),
                    mask=mask, other=0.0).to(ACC_DTYPE)
        sum_dy += dy
        sum_dy_xmu += dy * (x - mean)
    out = partials_ptr + split * C + channels
    tl.store(out, tl.sum(sum_dy, 0), mask=c_ok)
    tl.store(out + num_splits * C, tl.sum(sum_dy_xmu, 0), mask=c_ok)


@_kernel
def _bn_bwd_kernel(
    dy_ptr,  # grad_output (N, C, L), or grad_residual where _bn_bwd_reduce_kernel wrote the masked dy there
    x_ptr,  # input (N, C, L), read for training grad_input
    y_ptr,  # output (N, C, L), for the ReLU mask; None unless RELU
    dx_ptr,  # out: grad_input (N, C, L), input's dtype; None unless HAS_DX
    dr_ptr,  # out: grad_residual, strides of grad_input (both are empty_like(input)); None unless HAS_DR
    w_ptr,  # weight (C,); None unless HAS_WEIGHT
    mean_ptr,  # (C,), ACC_DTYPE: the statistics the forward normalized with
    invstd_ptr,  # (C,), ACC_DTYPE
    partials_ptr,  # (2, num_partials, C) from _bn_bwd_reduce_kernel or _bn_merge_partials_kernel;
    # None unless HAS_SUMS
    dw_ptr,  # out: grad_weight (C,); None unless HAS_DW
    db_ptr,  # out: grad_bias (C,); None unless HAS_DB
    C,  # channels
    L,  # positions per sample
    M,  # values per channel, N * L
    dy_stride_n, dy_stride_c, dy_stride_l,  # element strides of grad_output,
    x_stride_n, x_stride_c, x_stride_l,  # input,
    y_stride_n, y_stride_c, y_stride_l,  # output,
    dx_stride_n, dx_stride_c, dx_stride_l,  # and grad_input / grad_residual
    l_blocks,  # cdiv(L, BLOCK_L): tiles per sample
    num_tiles,  # N * l_blocks: tiles per channel block
    tiles_per_split,  # consecutive tiles one program writes
    num_partials,  # partials per channel: the first pass's splits, or 1 once merged
    TRAINING: tl.constexpr,  # mean/invstd were batch statistics: grad_input flows through them too
    RELU: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SUMS: tl.constexpr,  # partials were computed (grad_weight, grad_bias or training grad_input need them)
    HAS_DX: tl.constexpr,
    HAS_DR: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    SAME_STRIDES: tl.constexpr,  # every tensor has x's strides: one set of tile offsets serves all
    ACC_DTYPE: tl.constexpr,
    SPLITS_BLOCK: tl.constexpr,  # partials merged at a time: next_power_of_2(num_partials) in one plan
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    split, c_start, channels, c_ok = _program(C, BACKWARDS=True, BLOCK_C=BLOCK_C)
    if SAME_STRIDES:  # see _tile_ptrs
        dy_stride_n, dy_stride_c, dy_stride_l = x_stride_n, x_stride_c, x_stride_l
        y_stride_n, y_stride_c, y_stride_l = x_stride_n, x_stride_c, x_stride_l
        dx_stride_n, dx_stride_c, dx_stride_l = x_stride_n, x_stride_c, x_stride_l
    invstd = tl.load(invstd_ptr + channels, mask=c_ok, other=0.0)
    if HAS_SUMS:
        sum_dy = _summed_partials(partials_ptr, 0, num_partials, C, channels, c_ok, SPLITS_BLOCK)
        sum_dy_xmu = _summed_partials(partials_ptr, 1, num_partials, C, channels, c_ok, SPLITS_BLOCK)
        if split == 0:
            if HAS_DW:
                tl.store(dw_ptr + channels, (sum_dy_xmu * invstd).to(dw_ptr.dtype.element_ty), mask=c_ok)
            if HAS_DB:
                tl.store(db_ptr + channels, sum_dy.to(db_ptr.dtype.element_ty), mask=c_ok)

    if HAS_DX or HAS_DR:
        scale = invstd
        if HAS_WEIGHT:
            scale *= tl.load(w_ptr + channels, mask=c_ok).to(ACC_DTYPE)
        if HAS_DX and TRAINING:
            # dx = (dy - mean(dy) - (x - mean) * invstd**2 * mean(dy * (x - mean))) * weight * invstd
            mean = tl.load(mean_ptr + channels, mask=c_ok, other=0.0)[None, :]
            mean_dy = (sum_dy / M)[None, :]
            xmu_coef = (invstd * invstd * sum_dy_xmu / M)[None, :]
        scale = scale[None, :]
        first_tile = split * tiles_per_split
        end_tile = tl.minimum(first_tile + tiles_per_split, num_tiles)
        for k in range(first_tile, end_tile):
            tile = first_tile + end_tile - 1 - k  # backwards (module docstring)
            n, l_start, l_ok = _tile(tile, l_blocks, L, BLOCK_L)
            mask = l_ok & c_ok[None, :]
            dy = tl.load(_tile_ptrs(dy_ptr, n, l_start, c_start, dy_stride_n, dy_stride_c, dy_stride_l,
                                    BLOCK_L, BLOCK_C), mask=mask, other=0.0).to(ACC_DTYPE)
            if RELU:  # the ReLU let gradient through only where it let the value through
                y = tl.load(_tile_ptrs(y_ptr, n, l_start, c_start, y_stride_n, y_stride_c, y_stride_l,
                                       BLOCK_L, BLOCK_C), mask=mask, other=0.0)
                dy = tl.where(y > 0, dy, 0.0)
            if HAS_DR:
                tl.store(_tile_ptrs(dr_ptr, n, l_start, c_start, dx_stride_n, dx_stride_c, dx_stride_l,
                                    BLOCK_L, BLOCK_C), dy.to(dr_ptr.dtype.element_ty), mask=mask)
            if HAS_DX:
                if TRAINING:
                    x = tl.load(_tile_ptrs(x_ptr, n, l_start, c_start, x_stride_n, x_stride_c, x_stride_l,
                                           BLOCK_L, BLOCK_C), mask=mask, other=0.0).to(ACC_DTYPE)
                    dx = (dy - mean_dy - (x - mean) * xmu_coef) * scale
                else:  # eval: mean and invstd are constants
                    dx = dy * scale
                tl.store(_tile_ptrs(dx_ptr, n, l_start, c_start, dx_stride_n, dx_stride_c, dx_stride_l,
                                    BLOCK_L, BLOCK_C), dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---- host wrappers ----------------------------------------------------------------

_TILE_BYTES = 8192  # of ACC_DTYPE per [BLOCK_L, BLOCK_C] tile: 2048 float32 values, 16 per thread at
# 4 warps; 1024 float64 ones, whose accumulators would otherwise spill registers (tests/triton_aot.py)
_NUM_WARPS = 4
_THREADS = 32 * _NUM_WARPS
_PROGRAMS_PER_SM = 8  # at most: 32 warps per SM are enough loads in flight for a memory-bound pass
_ROW_BYTES = 128  # a cache line: channels_last rows (lanes along C) of fewer bytes cost the writing
# kernels speed (bench/NOTES.md: with 32-byte rows the forward's second pass took 157 us to NCHW's 113)
_MERGE_BLOCK_C = 8  # channels per program of _bn_merge_partials_kernel: float32 rows of a 32-byte sector,
# and C / 8 programs to share the partials (up to 8 * 132 splits of 64 channels at the stem)
_MERGE_TILE_BYTES = 4096  # of each partials array per step of _bn_merge_partials_kernel: 128 float32 splits


def _merge_launch_enabled(value: Optional[str]) -> bool:
    """CNNKERN_TRITON_MERGE_LAUNCH: 0 plans no merge launch (the in-kernel merge's narrower rows,
    as before it: an experiment's knob, for bench.dram to time both side by side); unset or 1,
    the plans as documented."""
    if value in (None, "1"):
        return True
    if value == "0":
        return False
    warnings.warn(f"CNNKERN_TRITON_MERGE_LAUNCH={value} ignored (0 or 1): merge launches stay on")
    return True


# Read once per process: the plan cache would keep plans made under another value.
_MERGE_LAUNCH = _merge_launch_enabled(os.environ.get("CNNKERN_TRITON_MERGE_LAUNCH"))


def _pow2_block(extent: int, lo: int, hi: int) -> int:
    """The largest power of two in [lo, hi] that pads `extent` by at most 1/8 (padded
    lanes idle), else the one that pads it least; never above next_power_of_2(extent)."""
    hi = min(hi, triton.next_power_of_2(extent))
    blocks = [b for b in (1 << k for k in range(hi.bit_length())) if b >= min(lo, hi)]
    padding = {b: triton.cdiv(extent, b) * b - extent for b in blocks}
    fitting = [b for b in blocks if 8 * padding[b] <= extent]
    return max(fitting) if fitting else min(blocks, key=lambda b: (padding[b], -b))


def _merged_stride_l(v: Strided3d) -> Optional[int]:
    """The stride of position n*L + l when samples and positions merge into one axis
    (offset(n, l) == (n*L + l) * stride for all n, l), else None."""
    if v.L == 1:
        return v.sN
    if v.N == 1 or v.sN == v.L * v.sL:
        return v.sL
    return None


class _Merge(NamedTuple):
    """The launch of _bn_merge_partials_kernel between a plan's passes."""

    grid: Tuple[int, int]  # (channel blocks of _MERGE_BLOCK_C, 1)
    meta: Mapping[str, int]


class _Plan(NamedTuple):
    """How one call's (N, C, L) tensors are cut into tiles and programs, as the launches take it.
    Everything is computed once per geometry (see _plan): a call only unpacks it.
    (In Triton 3.9, triton.cdiv and next_power_of_2 are constexpr functions: about 2 us per host call
    on the project's CPU machine.)"""

    L: int  # positions per sample as the kernels see them (N * L when merged)
    strides: Mapping[str, Tuple[int, int, int]]  # per tensor name: element strides (n, c, l); zeros when absent
    num_splits: int  # programs per channel block
    grid: Tuple[int, int]  # (channel blocks, splits)
    tiling: Tuple[int, int, int]  # the kernels' (l_blocks, num_tiles, tiles_per_split)
    splits_block: int  # SPLITS_BLOCK of the second pass: the partials it merges at a time
    meta: Mapping[str, int]  # the block sizes and launch options every pass's kernel takes
    merge: Optional[_Merge]  # a launch that merges the partials between the passes; None: the second pass does
    same_strides: bool  # every tensor present has input's strides (SAME_STRIDES: see _tile_ptrs)

    @property
    def partials_per_channel(self) -> int:
        """What the second pass reads: one merged partial per channel, or one per split."""
        return 1 if self.merge else self.num_splits


_PLANS: launch.PlanCache[_Plan] = launch.PlanCache(_PROGRAMS_PER_SM)


def _plan(tensors: Dict[str, Optional[Tensor]], merges_partials: bool, variant: Hashable,
          launches: Callable[[_Plan], List[launch.Launch]]) -> Tuple[_Plan, Optional[tuple]]:
    """Tile shape, split count and per-tensor strides for a call over `tensors` (all of
    input's shape, "input" among them; None for absent ones), and the compiled kernels of its
    launches (see launch.PlanCache). `merges_partials`: the first pass leaves partials per split,
    which each program of the second pass merges for its channels (which caps the splits), or a
    launch between the passes (_Plan.merge). `variant`: all else that selects the
    compiled kernels (launch.variant_of every tensor the caller did not allocate, and the
    flags); `launches`: the pass's launches for a plan. Together the geometry (which fixes
    every integer argument) and the variant key all the JIT would specialize on: the tensors
    allocated here are always 16-byte aligned."""
    input = tensors["input"]
    geometry = tuple((name, None if t is None else (t.shape, t.stride())) for name, t in tensors.items())
    return _PLANS.get((geometry, variant), input.device,
                      lambda sms, programs_per_sm: _plan_geometry(
                          geometry, input.element_size(), stat_dtype(input.dtype).itemsize, sms, merges_partials,
                          programs_per_sm),
                      launches)


Geometry = Tuple[Tuple[str, Optional[Tuple[Sequence[int], Sequence[int]]]], ...]  # (name, (shape, strides) or None)


def _plan_geometry(geometry: Geometry, itemsize: int, acc_itemsize: int, sms: int, merges_partials: bool,
                   programs_per_sm: int) -> _Plan:
    """_plan for tensors of these shapes and strides (read off the tensors: they cost a third of
    their (N, C, L) views) and of `itemsize` bytes an element, on a device of `sms`
    multiprocessors that each hold `programs_per_sm` programs at once. Not cached itself: _plan
    caches what it returns."""
    named_views = [(name, None if g is None else view3d_of(*g, name)) for name, g in geometry]
    views = {name: v for name, v in named_views if v is not None}
    tile = _TILE_BYTES // acc_itemsize  # elements per tile
    N, C, L = views["input"].N, views["input"].C, views["input"].L
    M = N * L  # values per channel
    merged = {name: _merged_stride_l(v) for name, v in views.items()}
    if all(s is not None for s in merged.values()):
        num_samples, L = 1, N * L
        strides = {name: (0, v.sC, merged[name]) for name, v in views.items()}
    else:
        num_samples = N
        strides = {name: (v.sN, v.sC, v.sL) for name, v in views.items()}
    strides.update({name: (0, 0, 0) for name, v in named_views if v is None})

    # Lanes run along the input's stride-1 axis: channels for channels_last, else
    # positions; the other axis fills the tile, with at least one value per thread where
    # the extents allow: padding idles fewer threads than a tile smaller than the block
    # (a channels_last 5x65x7x7 with an NCHW residual, whose samples do not merge, got
    # [4, 8] tiles, 13 per sample with 3/4 of the threads idle; now one [64, 8] tile).
    def across(extent: int, lanes: int) -> int:
        return _pow2_block(extent, max(1, _THREADS // lanes), tile // lanes)

    channels_major = C > 1 and strides["input"][1] == 1

    def max_splits(block_c: int, block_l: int, capped: bool) -> int:
        num_tiles = num_samples * triton.cdiv(L, block_l)
        if not capped:
            return num_tiles
        # A second-pass program reads S partials per channel next to its own M/S values:
        # S <= sqrt(M/48) keeps those (2 or 3 arrays) under 1/16 of its traffic, and
        # S <= tile // block_c keeps the [SPLITS_BLOCK, BLOCK_C] merge no larger than a tile.
        return max(1, min(num_tiles, math.isqrt(M // 48), tile // block_c))

    def blocks(capped: bool) -> Tuple[int, int]:
        """(BLOCK_C, BLOCK_L), the splits `capped` or not. More channel blocks cost nothing, more
        splits cost merging: the channel block narrows until the grid can fill the GPU (e.g.
        C = 64 at 112x112, C = 2048 at 7x7). The tile shape is chosen for _PROGRAMS_PER_SM
        whatever the kernels' occupancy: it decides their registers, and so their occupancy (_plan)."""
        if channels_major:
            block_c = _pow2_block(C, 8, 64)
            block_l = across(L, block_c)
        else:
            block_l = _pow2_block(L, 32, 1024)
            block_c = across(C, block_l)
        while (triton.cdiv(C, block_c) * max_splits(block_c, block_l, capped) < _PROGRAMS_PER_SM * sms
               and block_c > (8 if channels_major else 1)):
            block_c //= 2
            if channels_major:
                block_l = across(L, block_c)
        return block_c, block_l

    block_c, block_l = blocks(capped=merges_partials)
    merge_launch = False
    if _MERGE_LAUNCH and merges_partials and channels_major:
        # Along channels the cap on the splits narrows the rows the lanes read (to 32 bytes in
        # bf16 at 128x256x56x56); a launch of its own merges the partials of any number of
        # splits, for a few microseconds, and keeps the rows a cache line wide.
        wide_c, wide_l = blocks(capped=False)
        if block_c < wide_c and block_c * itemsize < _ROW_BYTES:
            block_c, block_l, merge_launch = wide_c, wide_l, True
    capped = merges_partials and not merge_launch
    num_tiles = num_samples * triton.cdiv(L, block_l)

    def splits(programs_per_sm: int) -> int:
        # Rounded down: one split more than fits would start a second wave for a few programs.
        num_splits = min(max(1, programs_per_sm * sms // triton.cdiv(C, block_c)),
                         max_splits(block_c, block_l, capped))
        return triton.cdiv(num_tiles, triton.cdiv(num_tiles, num_splits))  # no empty split

    num_splits = splits(programs_per_sm)
    # Sized for the most splits any occupancy gives, so that a plan with fewer (_plan) compiles
    # no kernel of its own.
    most_splits_block = triton.next_power_of_2(splits(_PROGRAMS_PER_SM))
    # FMA contraction pinned on (as nvcc does for the CUDA kernels): Triton 3.10 turns its
    # default off, so the same kernels would round differently from one version to the next.
    options = dict(num_warps=_NUM_WARPS, enable_fp_fusion=True)
    merge = None
    if merge_launch:
        merge = _Merge(grid=(triton.cdiv(C, _MERGE_BLOCK_C), 1), meta=types.MappingProxyType(dict(
            SPLITS_BLOCK=min(most_splits_block, _MERGE_TILE_BYTES // (acc_itemsize * _MERGE_BLOCK_C)),
            BLOCK_C=_MERGE_BLOCK_C, **options)))
    return _Plan(L, types.MappingProxyType(strides), num_splits,
                 grid=(triton.cdiv(C, block_c), num_splits),
                 tiling=(triton.cdiv(L, block_l), num_tiles, triton.cdiv(num_tiles, num_splits)),
                 splits_block=1 if merge_launch else most_splits_block,
                 meta=types.MappingProxyType(dict(BLOCK_L=block_l, BLOCK_C=block_c, **options)), merge=merge,
                 same_strides=all(strides[name] == strides["input"] for name in views))


def _tl_acc_dtype(input: Tensor) -> tl.dtype:
    return tl.float64 if input.dtype == torch.float64 else tl.float32


def _merge_launches(plan: _Plan, partials: Tensor, merged: Tensor, welford: bool) -> List[launch.Launch]:
    """The plan's launch that merges a first pass's `partials` into `merged`, if it has one. Its
    small grid is not sized to fill the GPU: the plan's occupancy is not fitted to it."""
    if plan.merge is None:
        return []
    args = (partials, merged, partials.shape[2], plan.num_splits)
    return [launch.Launch(_bn_merge_partials_kernel, plan.merge.grid, args, dict(WELFORD=welford, **plan.merge.meta),
                          fills_gpu=False)]


def _bn_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float,
                relu: bool, training: bool) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Both forwards: (output, save_mean, save_invstd), the statistics None in eval."""
    C = input.shape[1]
    acc = stat_dtype(input.dtype)
    output = torch.empty_like(input)
    save_mean = save_invstd = None
    if input.numel() == 0:  # empty batch: nothing to normalize, running stats untouched
        if training:
            save_mean, save_invstd = input.new_zeros(C, dtype=acc), input.new_zeros(C, dtype=acc)
        return output, save_mean, save_invstd
    if training:
        save_mean, save_invstd = input.new_empty(C, dtype=acc), input.new_empty(C, dtype=acc)

    def launches(plan: _Plan) -> List[launch.Launch]:
        partials = input.new_empty((3, plan.num_splits, C), dtype=acc) if training else None
        merged = input.new_empty((3, 1, C), dtype=acc) if training and plan.merge else partials
        normalize = launch.Launch(_bn_fwd_kernel, plan.grid, (
            input, residual, output, weight, bias, running_mean, running_var, merged, save_mean, save_invstd,
            C, plan.L, input.numel() // C,
            *plan.strides["input"], *plan.strides["residual"], *plan.strides["output"],
            *plan.tiling, plan.partials_per_channel, momentum, eps), dict(
            TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None, HAS_RUNNING_MEAN=running_mean is not None,
            HAS_RUNNING_VAR=running_var is not None, RELU=relu, SAME_STRIDES=plan.same_strides,
            ACC_DTYPE=_tl_acc_dtype(input),
            SPLITS_BLOCK=plan.splits_block, **plan.meta))
        if not training:
            return [normalize]
        stats = launch.Launch(_bn_stats_kernel, plan.grid,
                              (input, partials, C, plan.L, *plan.strides["input"], *plan.tiling, plan.num_splits),
                              dict(ACC_DTYPE=_tl_acc_dtype(input), **plan.meta))
        return [stats, *_merge_launches(plan, partials, merged, welford=True), normalize]

    with torch.cuda.device_of(input):  # Triton compiles for and launches on the current device
        plan, compiled = _plan({"input": input, "residual": residual, "output": output}, training,
                               launch.variant_of(input, weight, bias, residual, running_mean, running_var, relu,
                                                 training),
                               launches)
        launch.run(launches(plan), compiled)
    return output, save_mean, save_invstd


def bn_forward_train(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float,
                     relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """cnnkern::bn_forward_train: act(batch_norm(input) + residual) with batch statistics,
    returned as (output, save_mean, save_invstd); running stats (if given) are updated in place."""
    if input.numel() == input.shape[1] > 0:  # the unbiased variance needs two values
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    return _bn_forward(input, weight, bias, residual, running_mean, running_var, momentum, eps, relu, training=True)


def bn_forward_eval(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                    running_mean: Tensor, running_var: Tensor, eps: float, relu: bool) -> Tensor:
    """cnnkern::bn_forward_eval: act(batch_norm(input) + residual) with the running statistics."""
    return _bn_forward(input, weight, bias, residual, running_mean, running_var, 0.0, eps, relu, training=False)[0]


def bn_backward(grad_output: Tensor, input: Tensor, output: Optional[Tensor], weight: Optional[Tensor],
                bias: Optional[Tensor], mean: Tensor, invstd: Tensor, training: bool, relu: bool,
                output_mask: List[bool]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """cnnkern::bn_backward: (grad_input, grad_weight, grad_bias, grad_residual), None where
    output_mask is False. `output` is read (for the ReLU mask) only when relu, and is then
    required: the forward normalizes around a pivot (each channel's first value, with the
    mean's offset from it unrounded) that the backward, given the rounded mean, cannot
    reproduce to the bit, so it does not recompute the mask (`bias` goes unread)."""
    if relu and output is None:
        raise ValueError("triton's bn_backward reads the ReLU mask from output and cannot recompute it "
                         "(its forward normalizes around a pivot the backward does not have): pass output")
    need_dx, need_dw, need_db, need_dr = output_mask
    C = input.shape[1]
    grad_dtype = param_grad_dtype(weight, bias, input.dtype)
    grad_input = torch.empty_like(input) if need_dx else None
    grad_residual = torch.empty_like(input) if need_dr else None
    grad_weight = mean.new_empty(C, dtype=grad_dtype) if need_dw else None
    grad_bias = mean.new_empty(C, dtype=grad_dtype) if need_db else None
    grads = grad_input, grad_weight, grad_bias, grad_residual
    has_sums = need_dw or need_db or (need_dx and training)
    if input.numel() == 0:  # empty batch: the sums are zero
        for g in (grad_weight, grad_bias):
            if g is not None:
                g.zero_()
        return grads
    if not (has_sums or need_dx or need_dr):
        return grads
    if not relu:
        output = None  # may be stale or absent; only the ReLU mask reads it
    # With a ReLU, the reduction writes grad_residual (the masked dy) and grad_input
    # is computed from it: one tensor fewer to read than grad_output and output.
    residual_first = has_sums and relu and need_dr

    def launches(plan: _Plan) -> List[launch.Launch]:
        acc = stat_dtype(input.dtype)
        partials = input.new_empty((2, plan.num_splits, C), dtype=acc) if has_sums else None
        merged = input.new_empty((2, 1, C), dtype=acc) if has_sums and plan.merge else partials
        dy, dy_strides = (grad_residual, plan.strides["grad_input"]) if residual_first else \
            (grad_output, plan.strides["grad_output"])
        # With neither grad_input nor grad_residual left to write, only the split-0
        # programs (grad_weight, grad_bias) have work.
        grid = plan.grid if need_dx or (need_dr and not residual_first) else (plan.grid[0], 1)
        elementwise = launch.Launch(_bn_bwd_kernel, grid, (
            dy, input, None if residual_first else output, grad_input, None if residual_first else grad_residual,
            weight, mean, invstd, merged, grad_weight, grad_bias, C, plan.L, input.numel() // C,
            *dy_strides, *plan.strides["input"], *plan.strides["output"], *plan.strides["grad_input"], *plan.tiling,
            plan.partials_per_channel),
            dict(TRAINING=training, RELU=relu and not residual_first, HAS_WEIGHT=weight is not None,
                 HAS_SUMS=has_sums, HAS_DX=need_dx, HAS_DR=need_dr and not residual_first, HAS_DW=need_dw,
                 HAS_DB=need_db, SAME_STRIDES=plan.same_strides, ACC_DTYPE=_tl_acc_dtype(input),
                 SPLITS_BLOCK=plan.splits_block, **plan.meta))
        if not has_sums:
            return [elementwise]
        reduce = launch.Launch(_bn_bwd_reduce_kernel, plan.grid, (
            grad_output, input, output, grad_residual if residual_first else None, mean, partials, C, plan.L,
            *plan.strides["grad_output"], *plan.strides["input"], *plan.strides["output"],
            *plan.strides["grad_input"], *plan.tiling, plan.num_splits),
            dict(RELU=relu, HAS_DR=residual_first, SAME_STRIDES=plan.same_strides, ACC_DTYPE=_tl_acc_dtype(input),
                 **plan.meta))
        return [reduce, *_merge_launches(plan, partials, merged, welford=False), elementwise]

    with torch.cuda.device_of(input):  # Triton compiles for and launches on the current device
        plan, compiled = _plan({"grad_output": grad_output, "input": input, "output": output,
                                # grad_input and grad_residual are both empty_like(input): one set of strides
                                "grad_input": grad_input if need_dx else grad_residual}, has_sums,
                               launch.variant_of(grad_output, input, output, weight, mean, invstd, training, relu,
                                                 *output_mask),
                               launches)
        launch.run(launches(plan), compiled)
    return grads

