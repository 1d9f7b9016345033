"""The Triton launch plans, as a GPU of 132 SMs gets them: tiles within their byte budget,
with at least one value per thread wherever the extents allow, and grids of one wave."""
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
    plan = batch_norm._plan_geometry(geometry, acc_bytes, 132, merges_partials, 8)
    block_l, block_c = plan.meta["BLOCK_L"], plan.meta["BLOCK_C"]
    assert block_l * block_c * acc_bytes <= batch_norm._TILE_BYTES
    # One value per thread, unless the channels or a sample's positions are fewer.
    want = min(batch_norm._THREADS, block_c * plan.L, block_l * shape[1])
    assert block_l * block_c >= want, (block_l, block_c)
    l_blocks, num_tiles, tiles_per_split, num_splits = plan.tiling
    assert l_blocks * block_l >= plan.L and num_splits * tiles_per_split >= num_tiles
    assert plan.grid == (-(-shape[1] // block_c), num_splits)


H100 = batch_norm._SM(count=132, registers=65536, threads=2048, shared=233472)


@pytest.mark.parametrize("registers,shared,num_warps,programs", [
    (32, 0, 4, 16),  # threads: 2048 per SM
    (40, 0, 4, 12),  # 40 * 32 = 1280 registers a warp, in units of 256
    (64, 0, 4, 8),
    (65, 0, 4, 7),  # one register more rounds the warp's share up to 2304
    (96, 0, 4, 5),  # the bf16 backward reduction
    (122, 1280, 4, 4),
    (168, 1536, 4, 3),
    (40, 100_000, 4, 2),  # shared memory: 100 KB + 1 KB reserved per program
    (255, 0, 8, 1),
])
def test_resident_programs(registers, shared, num_warps, programs):
    assert batch_norm.resident_programs(registers, shared, num_warps, H100) == programs


@pytest.mark.parametrize("programs_per_sm", [8, 5, 4, 1])
@pytest.mark.parametrize("shape,layout,residual_layout", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_grids_take_one_wave(shape, layout, residual_layout, programs_per_sm):
    """No more programs than the SMs hold at once, unless the channel blocks alone are more;
    and all of those the reduction can use."""
    x, r = meta_tensor(shape, torch.bfloat16, layout), meta_tensor(shape, torch.bfloat16, residual_layout)
    geometry = (("input", (x.shape, x.stride())), ("residual", (r.shape, r.stride())))
    plan = batch_norm._plan_geometry(geometry, 4, H100.count, True, programs_per_sm)
    channel_blocks, splits = plan.grid
    one_wave = programs_per_sm * H100.count
    assert channel_blocks * splits <= max(one_wave, channel_blocks)
    wider = batch_norm._plan_geometry(geometry, 4, H100.count, True, programs_per_sm * 2)
    assert wider.grid[0] * wider.grid[1] >= channel_blocks * splits


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_grids_take_one_wave(monkeypatch, layout):
    """On a GPU the plan reads the compiled kernels' registers, and its grid fits the SMs at
    the occupancy of the pass's most demanding kernel."""
    resident = []  # what each compiled kernel allowed, round after round
    real = batch_norm.resident_programs
    monkeypatch.setattr(batch_norm, "resident_programs", lambda *args: resident.append(real(*args)) or resident[-1])
    monkeypatch.setattr(batch_norm, "_PLANS", {})
    x = torch.randn(16, 256, 28, 28, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    w, mean = torch.rand(256, device="cuda") + 0.5, torch.randn(256, device="cuda")
    batch_norm.bn_backward(x, x, x, w, mean, w, True, True, [True, True, True, True])
    (plan,) = batch_norm._PLANS.values()
    assert resident, "the plan did not read the compiled kernels' occupancy"
    channel_blocks, splits = plan.grid
    sms = batch_norm._sm(x.device).count
    assert channel_blocks * splits <= max(min(resident + [batch_norm._PROGRAMS_PER_SM]) * sms, channel_blocks)
