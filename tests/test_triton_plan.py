"""The Triton launch plans, as a GPU of 132 SMs gets them: tiles within their byte budget,
with at least one value per thread wherever the extents allow."""
import pytest
import torch

pytest.importorskip("triton")
from cnnkern.triton import batch_norm  # noqa: E402

# (shape, layout of input, layout of the residual): ResNet-50's shapes, and mixed layouts,
# whose samples do not merge into one axis (the tile then spans one sample's H*W at most).
CASES = [
    ((128, 256, 56, 56), "nchw", "nchw"),
    ((128, 256, 56, 56), "channels_last", "channels_last"),
    ((128, 2048, 7, 7), "channels_last", "nchw"),
    ((5, 65, 7, 7), "channels_last", "nchw"),
    ((5, 65, 7, 7), "nchw", "channels_last"),
    ((2, 3, 5, 5), "channels_last", "nchw"),
    ((4, 1, 9, 9), "nchw", "nchw"),
]


def meta_tensor(shape, dtype, layout):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "f64"])
@pytest.mark.parametrize("merges_partials", [False, True], ids=["reduce", "merge"])
@pytest.mark.parametrize("shape,layout,residual_layout", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_tiles_fill_the_threads(shape, layout, residual_layout, merges_partials, dtype):
    x, r = meta_tensor(shape, dtype, layout), meta_tensor(shape, dtype, residual_layout)
    geometry = (("input", (x.shape, x.stride())), ("residual", (r.shape, r.stride())))
    acc_bytes = 8 if dtype == torch.float64 else 4
    plan = batch_norm._plan_geometry(geometry, acc_bytes, 132, merges_partials)
    block_l, block_c = plan.meta["BLOCK_L"], plan.meta["BLOCK_C"]
    assert block_l * block_c * acc_bytes <= batch_norm._TILE_BYTES
    # One value per thread, unless the channels or a sample's positions are fewer.
    want = min(batch_norm._THREADS, block_c * plan.L, block_l * shape[1])
    assert block_l * block_c >= want, (block_l, block_c)
    l_blocks, num_tiles, tiles_per_split, num_splits = plan.tiling
    assert l_blocks * block_l >= plan.L and num_splits * tiles_per_split >= num_tiles
    assert plan.grid == (-(-shape[1] // block_c), num_splits)
