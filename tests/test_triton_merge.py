"""Triton plans whose partials are merged by a launch of their own (_bn_merge_partials_kernel):
channels_last training, where capping the splits for an in-kernel merge would narrow the rows
the lanes read below a cache line. Which plans take it, and its results against the float64
oracle (under the interpreter, on one SM)."""
import pytest
import torch

import cnnkern
from cnnkern.reference import stat_dtype
from helpers import make_input, meta_tensor, require, run_and_compare

pytest.importorskip("triton")
from cnnkern.triton import batch_norm as bn  # noqa: E402
from cnnkern.triton import launch  # noqa: E402

RESNET50 = [(64, 112), (256, 56), (512, 28), (1024, 14), (2048, 7)]  # (C, H = W) at batch 128
# On one SM (the interpreter's) the cap on the splits would narrow these to 8 channels, and
# without it they keep their 64: a merge launch, in every dtype (8 float64 channels are 64 bytes).
MERGED = (2, 60, 5, 7)


def plan_of(shape, dtype, layout, merges_partials, sms):
    x = meta_tensor(shape, dtype, layout)
    return bn._plan_geometry((("input", (x.shape, x.stride())),), x.element_size(), stat_dtype(dtype).itemsize, sms,
                             merges_partials, bn._PROGRAMS_PER_SM)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("C,HW", RESNET50, ids=lambda v: str(v))
def test_channels_last_training_reads_whole_lines(C, HW, dtype):
    """On an H100, every ResNet-50 batch norm in channels_last keeps rows of at least 128
    bytes in training (the cap would leave 16 channels, 32 bytes in bf16, 8 at the stem), its
    grid one wave, with the partials merged once per channel in between."""
    plan = plan_of((128, C, HW, HW), dtype, "channels_last", True, 132)
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert plan.meta["BLOCK_C"] * itemsize >= bn._ROW_BYTES
    assert plan.grid[0] * plan.grid[1] <= bn._PROGRAMS_PER_SM * 132
    assert plan.merge is not None and plan.merge.grid == (-(-C // bn._MERGE_BLOCK_C), 1)
    assert plan.partials_per_channel == 1 and plan.splits_block == 1


@pytest.mark.parametrize("shape,dtype,layout,merges_partials", [
    ((128, 256, 56, 56), torch.bfloat16, "nchw", True),  # lanes along L: a narrower channel block keeps the rows
    ((128, 256, 56, 56), torch.bfloat16, "channels_last", False),  # eval: no partials
    ((128, 8, 56, 56), torch.bfloat16, "channels_last", True),  # 8 channels: rows no wider without the cap
    ((128, 1024, 56, 56), torch.float32, "channels_last", True),  # the cap leaves 32 channels: 128 bytes
], ids=["nchw", "eval", "8_channels", "f32_whole_lines"])
def test_other_plans_merge_in_the_second_pass(shape, dtype, layout, merges_partials):
    plan = plan_of(shape, dtype, layout, merges_partials, 132)
    assert plan.merge is None
    assert plan.partials_per_channel == plan.num_splits


def test_merge_launches_can_be_switched_off(monkeypatch):
    """CNNKERN_TRITON_MERGE_LAUNCH=0: the plans before merge launches, for bench.dram to time
    side by side with the default's."""
    assert bn._merge_launch_enabled(None) and bn._merge_launch_enabled("1")
    assert not bn._merge_launch_enabled("0")
    with pytest.warns(UserWarning, match="CNNKERN_TRITON_MERGE_LAUNCH=yes ignored"):
        assert bn._merge_launch_enabled("yes")
    monkeypatch.setattr(bn, "_MERGE_LAUNCH", False)
    plan = plan_of((128, 256, 56, 56), torch.bfloat16, "channels_last", True, 132)
    assert plan.merge is None and plan.meta["BLOCK_C"] == 16


@pytest.fixture
def launched(monkeypatch):
    """The kernels of each pass the Triton wrappers run, from fresh plans."""
    passes = []
    real = launch.run
    monkeypatch.setattr(bn, "_PLANS", launch.PlanCache(bn._PROGRAMS_PER_SM))
    monkeypatch.setattr(launch, "run", lambda launches, compiled: passes.append(
        [l.kernel for l in launches]) or real(launches, compiled))
    return passes


def assert_merged(passes):
    assert [p[1] for p in passes] == [bn._bn_merge_partials_kernel] * 2, "the plan did not merge in a launch"


# bf16 and float32 against PyTorch's error (reference.error_bound); float64 against the oracle.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("splits_per_step", [None, 2], ids=["one_step", "steps_of_2"])
@pytest.mark.parametrize("operands", ["channels_last", "nchw"])
def test_merge_launch_matches_the_oracle(launched, monkeypatch, dtype, splits_per_step, operands):
    """Forward and backward, with a residual and ReLU, through the merge launch: in one step,
    and in steps of 2 splits (each step merged into the ones before it); with the residual and
    grad_output in the input's layout (samples and positions merge into one axis) or in NCHW
    (the tiles run per sample)."""
    require("triton", "cpu", dtype)
    if splits_per_step:
        monkeypatch.setattr(bn, "_MERGE_TILE_BYTES", splits_per_step * stat_dtype(dtype).itemsize * bn._MERGE_BLOCK_C)
    x = make_input(MERGED, dtype, "cpu", "channels_last")
    run_and_compare("triton", "cpu", x, residual=True, activation="relu",
                    operands_like_input=operands == "channels_last")
    assert_merged(launched)
    for plan, _ in bn._PLANS.plans.values():  # the forward's and the backward's
        assert plan.num_splits > (plan.merge.meta["SPLITS_BLOCK"] if splits_per_step else 1)


# grad_input, grad_weight, grad_bias, grad_residual wanted
@pytest.mark.parametrize("output_mask", [[True, True, True, True], [True, False, False, False],
                                         [False, True, True, False], [False, False, True, True],
                                         [True, True, False, True]], ids=lambda m: "".join("xwbr"[i] for i in range(4)
                                                                                           if m[i]))
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
def test_merge_launch_backward_subsets(launched, monkeypatch, output_mask, relu):
    """Each subset of the gradients, through the merge launch, as through the second pass's
    own merge (which the oracle tests above pin down)."""
    x = make_input(MERGED, torch.float64, "cpu", "channels_last")
    C = MERGED[1]
    dy, y = torch.empty_like(x).normal_(), torch.empty_like(x).normal_()
    w, mean, invstd = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64), \
        torch.rand(C, dtype=torch.float64) + 0.5
    merged = bn.bn_backward(dy, x, y, w, None, mean, invstd, True, relu, output_mask)
    assert bn._bn_merge_partials_kernel in launched[0]  # every subset here needs the sums
    monkeypatch.setattr(bn, "_MERGE_LAUNCH", False)
    monkeypatch.setattr(bn, "_PLANS", launch.PlanCache(bn._PROGRAMS_PER_SM))  # plans made without
    own = bn.bn_backward(dy, x, y, w, None, mean, invstd, True, relu, output_mask)
    assert bn._bn_merge_partials_kernel not in launched[1]
    for a, b in zip(merged, own):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_merge_launch_keeps_large_means(launched):
    """Mean 1e4, std 1: the merged statistics keep the pivot's precision."""
    x = make_input(MERGED, torch.float32, "cpu", "channels_last", mean=1e4)
    run_and_compare("triton", "cpu", x, residual=True, activation="relu", operands_like_input=True)
    assert_merged(launched)


def test_merge_launch_gradcheck(launched):
    x = make_input(MERGED, torch.float64, "cpu", "channels_last").requires_grad_()
    C = MERGED[1]
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    r = torch.empty_like(x).normal_().requires_grad_()

    def fn(x, w, b, r):
        return cnnkern.functional.batch_norm(x, None, None, w, b, True, residual=r, activation="relu",
                                             backend="triton")

    assert torch.autograd.gradcheck(fn, (x, w, b, r), eps=1e-6, atol=1e-7, fast_mode=True)
    assert bn._bn_merge_partials_kernel in launched[0]
