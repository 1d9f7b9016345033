"""The Triton launch plans, as a GPU of 132 SMs gets them: tiles within their byte budget,
with at least one value per thread wherever the extents allow, and grids of one wave."""
from types import SimpleNamespace

import pytest
import torch

from cnnkern.reference import stat_dtype
from helpers import meta_tensor

pytest.importorskip("triton")
from cnnkern.triton import batch_norm, launch  # noqa: E402

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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "f64"])
@pytest.mark.parametrize("merges_partials", [False, True], ids=["reduce", "merge"])
@pytest.mark.parametrize("shape,layout,residual_layout", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_tiles_fill_the_threads(shape, layout, residual_layout, merges_partials, dtype):
    x, r = meta_tensor(shape, dtype, layout), meta_tensor(shape, dtype, residual_layout)
    geometry = (("input", (x.shape, x.stride())), ("residual", (r.shape, r.stride())))
    acc_bytes = stat_dtype(dtype).itemsize
    plan = batch_norm._plan_geometry(geometry, x.element_size(), acc_bytes, 132, merges_partials, 8)
    block_l, block_c = plan.meta["BLOCK_L"], plan.meta["BLOCK_C"]
    assert block_l * block_c * acc_bytes <= batch_norm._TILE_BYTES
    # One value per thread, unless the channels or a sample's positions are fewer.
    want = min(batch_norm._THREADS, block_c * plan.L, block_l * shape[1])
    assert block_l * block_c >= want, (block_l, block_c)
    l_blocks, num_tiles, tiles_per_split = plan.tiling
    num_splits = plan.num_splits
    assert l_blocks * block_l >= plan.L and num_splits * tiles_per_split >= num_tiles
    assert plan.grid == (-(-shape[1] // block_c), num_splits)
    assert plan.same_strides == (layout == residual_layout)  # one set of tile offsets only for one layout


H100 = launch.SM(count=132, registers=65536, threads=2048, shared=233472)


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
    assert launch.resident_programs(registers, shared, num_warps, H100) == programs


class _Compiled:
    """What JITFunction.warmup returns, as far as launch.PlanCache reads it; as a launch
    target, records each call's (grid, args) in `calls`."""

    def __init__(self, registers: int):
        self.n_regs, self.metadata, self.calls = registers, SimpleNamespace(shared=0, num_warps=4), []

    def _init_handles(self):
        pass

    def __getitem__(self, grid):
        return lambda *args: self.calls.append((grid, args))


class _Kernel:
    """A @triton.jit function of parameters (x, n, BLOCK: constexpr), `registers` a thread once compiled."""

    arg_names = ["x", "n", "BLOCK"]

    def __init__(self, registers: int):
        self.registers, self.compiled_grids = registers, []

    def warmup(self, *args, grid, **meta):
        self.compiled_grids.append(grid)
        return _Compiled(self.registers)


def test_plan_cache_refits_to_the_least_resident_kernel(monkeypatch):
    monkeypatch.setattr(launch, "COMPILED", True)
    monkeypatch.setattr(launch, "sm_of", lambda device: H100)
    kernels = [_Kernel(64), _Kernel(96)]  # 8 and 5 programs per SM
    asked = []

    def plan_for(sms, programs_per_sm):
        asked.append(programs_per_sm)
        return sms * programs_per_sm  # the plan: a grid of one wave

    def launches(plan):
        return [launch.Launch(k, (plan,), (None, 7), {"BLOCK": 16, "num_warps": 4}) for k in kernels]

    cache = launch.PlanCache(most_programs_per_sm=8)
    plan, compiled = cache.get("call", torch.device("cpu"), plan_for, launches)
    assert asked == [8, 5] and plan == 5 * H100.count
    assert [c.n_regs for c in compiled] == [64, 96]
    assert kernels[1].compiled_grids == [(8 * H100.count,), (5 * H100.count,)]
    assert cache.get("call", torch.device("cpu"), plan_for, launches)[1] is compiled and asked == [8, 5]


def test_plan_cache_fits_only_the_kernels_that_fill_the_gpu(monkeypatch):
    """A launch with a small grid of its own (batch norm's merge of the partials) runs however
    few of its programs an SM holds: its registers do not shrink the plan's grid."""
    monkeypatch.setattr(launch, "COMPILED", True)
    monkeypatch.setattr(launch, "sm_of", lambda device: H100)
    asked = []

    def plan_for(sms, programs_per_sm):
        asked.append(programs_per_sm)
        return sms * programs_per_sm

    def launches(plan):
        return [launch.Launch(_Kernel(64), (plan,), (None, 7), {"BLOCK": 16, "num_warps": 4}),
                launch.Launch(_Kernel(255), (3,), (None, 7), {"BLOCK": 16, "num_warps": 4}, fills_gpu=False)]

    plan, compiled = launch.PlanCache(most_programs_per_sm=8).get("call", torch.device("cpu"), plan_for, launches)
    assert asked == [8] and plan == 8 * H100.count and len(compiled) == 2


def test_plan_cache_drops_the_oldest(monkeypatch):
    monkeypatch.setattr(launch, "COMPILED", False)
    cache = launch.PlanCache(most_programs_per_sm=8, size=2)
    for key in "abc":
        assert cache.get(key, torch.device("cpu"), lambda sms, programs: key, lambda plan: []) == (key, None)
    assert [key for key, device in cache.plans] == ["b", "c"]


def test_run_passes_the_constexprs_in_order():
    """A compiled kernel takes every parameter positionally, the constexprs last; launch
    options (num_warps) are not parameters."""
    kernel, binary = _Kernel(32), _Compiled(32)
    launch.run([launch.Launch(kernel, (3, 4), ("x", 7), {"num_warps": 4, "BLOCK": 16})], (binary,))
    assert binary.calls == [((3, 4, 1), ("x", 7, 16))]


@pytest.mark.parametrize("programs_per_sm", [8, 5, 4, 1])
@pytest.mark.parametrize("shape,layout,residual_layout", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_grids_take_one_wave(shape, layout, residual_layout, programs_per_sm):
    """No more programs than the SMs hold at once, unless the channel blocks alone are more;
    and all of those the reduction can use."""
    x, r = meta_tensor(shape, torch.bfloat16, layout), meta_tensor(shape, torch.bfloat16, residual_layout)
    geometry = (("input", (x.shape, x.stride())), ("residual", (r.shape, r.stride())))
    plan = batch_norm._plan_geometry(geometry, 2, 4, H100.count, True, programs_per_sm)
    channel_blocks, splits = plan.grid
    one_wave = programs_per_sm * H100.count
    assert channel_blocks * splits <= max(one_wave, channel_blocks)
    wider = batch_norm._plan_geometry(geometry, 2, 4, H100.count, True, programs_per_sm * 2)
    assert wider.grid[0] * wider.grid[1] >= channel_blocks * splits


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_grids_take_one_wave(monkeypatch, layout):
    """On a GPU the plan reads the compiled kernels' registers, and its grid fits the SMs at
    the occupancy of the pass's most demanding kernel."""
    resident = []  # what each compiled kernel allowed, round after round
    real = launch.resident_programs
    monkeypatch.setattr(launch, "resident_programs", lambda *args: resident.append(real(*args)) or resident[-1])
    monkeypatch.setattr(batch_norm, "_PLANS", launch.PlanCache(batch_norm._PROGRAMS_PER_SM))
    x = torch.randn(16, 256, 28, 28, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    w, mean = torch.rand(256, device="cuda") + 0.5, torch.randn(256, device="cuda")
    batch_norm.bn_backward(x, x, x, w, None, mean, w, True, True, [True, True, True, True])
    ((plan, _),) = batch_norm._PLANS.plans.values()
    assert resident, "the plan did not read the compiled kernels' occupancy"
    channel_blocks, splits = plan.grid
    sms = launch.sm_of(x.device).count
    assert channel_blocks * splits <= max(min(resident + [batch_norm._PROGRAMS_PER_SM]) * sms, channel_blocks)
