"""csrc/cuda's kernels on the CPU emulator of CUDA (tests/cuda_emu): that the emulator itself
runs correct kernels right and reports broken ones, that the `cuda_emulated` tests of the other
files do run the CUDA kernels, and the launch geometries those tiny shapes never reach: grids
split over the batch and the spatial dimension, on small and large emulated GPUs."""
import pytest
import torch

import cnnkern
from cuda_emulator import cuda_kernels_on_cpu, rewrite
from helpers import make_input, run_and_compare

THREADS = 128  # selftest.cu's block size


def selftest(emu, kernel, blocks=3, threads=THREADS):
    x = torch.randn(blocks * THREADS)
    out = torch.full((blocks * THREADS + 1,), float("nan"))  # the spin kernels' counter last
    return emu.selftest(kernel, x, out, blocks, threads), x, out[:-1]


def test_selftest_block_sums(cuda_emulator):
    err, x, out = selftest(cuda_emulator, "block_sums", blocks=5)
    assert err == "no error"
    torch.testing.assert_close(out[:5], x.view(5, THREADS).sum(1))


@pytest.mark.parametrize("kernel,message", [
    ("divergent_barrier", "threads wait at different __syncthreads() calls: tests/cuda_emu/selftest.cu:"),
    ("exit_before_barrier",
     "64 threads exited while the other 64 wait at __syncthreads() (tests/cuda_emu/selftest.cu:"),
    ("shuffle_after_exit", "warp 0: 31 lanes wait at a full-warp shuffle"),
    ("misaligned_load", "misaligned address: a 16-byte load at "),
    ("misaligned_store", "misaligned address: a 16-byte store at "),
])
def test_selftest_broken_kernels_fail_the_launch(cuda_emulator, kernel, message):
    err, _, _ = selftest(cuda_emulator, kernel)
    assert err.startswith("unspecified launch failure") and message in err, err


def test_selftest_race_shows(cuda_emulator):
    # Threads run in rank order in some blocks and in reverse in others, so the load that no
    # barrier orders after the store reads a stale value in every block, one way or the other.
    err, _, out = selftest(cuda_emulator, "missing_barrier", blocks=4)
    assert err == "no error"
    wanted = torch.arange(4 * THREADS, dtype=torch.float32).view(4, THREADS).roll(-1, 1)
    wrong_blocks = (out.view(4, THREADS) != wanted).any(1)
    assert wrong_blocks.all(), wrong_blocks


def test_selftest_invalid_configuration(cuda_emulator):
    err, _, _ = selftest(cuda_emulator, "block_sums", threads=2048)
    assert err == "invalid launch configuration (cuda_emu: block 2048 threads, grid (3, 1, 1))"


def test_selftest_cooperative_launch(cuda_emulator):
    cuda_emulator.use_device(3)  # 2048 / 128 threads -> up to 16 blocks per SM; 64 KB each -> 3
    err, x, out = selftest(cuda_emulator, "grid_rotate", blocks=9)
    assert err == "no error"
    xs = x.view(9, THREADS)
    torch.testing.assert_close(out.view(9, THREADS), xs + xs.roll(-1, 0), rtol=0, atol=0)


@pytest.mark.parametrize("kernel,blocks,message", [
    ("grid_rotate", 10, "too many blocks in cooperative launch (cuda_emu: 10 blocks, 9 resident at once)"),
    ("grid_rotate_unraised", 3, "65536 bytes of dynamic shared memory, 49152 allowed"),
])
def test_selftest_cooperative_launch_rules(cuda_emulator, kernel, blocks, message):
    cuda_emulator.use_device(3)
    err, _, _ = selftest(cuda_emulator, kernel, blocks=blocks)
    assert message in err, err


def test_selftest_spin_wait(cuda_emulator):
    cuda_emulator.use_device(3)
    err, x, out = selftest(cuda_emulator, "spin_meeting", blocks=5)
    assert err == "no error"
    torch.testing.assert_close(out.view(5, THREADS), x.view(5, THREADS).sum(0).expand(5, THREADS))


@pytest.mark.parametrize("kernel,message", [
    ("spin_deadlock", "deadlock: threads spin-wait for what no thread of the grid will do"),
    ("spin_uncooperative", "a spin wait that only other blocks can end, in a launch that is not cooperative"),
])
def test_selftest_spin_wait_rules(cuda_emulator, kernel, message):
    cuda_emulator.use_device(3)
    err, _, _ = selftest(cuda_emulator, kernel, blocks=5)
    assert message in err, err
    # A failed launch is reported once: the next launch's check does not see it again.
    with cuda_kernels_on_cpu(cuda_emulator):
        cnnkern.functional.batch_norm(torch.randn(2, 3, 4, 4), None, None, training=True, backend="cpu")


def test_ops_run_the_emulated_kernels(cuda_emulator):
    x = torch.randn(4, 3, 5, 5)
    cuda_emulator.launched_grids()
    with cuda_kernels_on_cpu(cuda_emulator):
        cnnkern.functional.batch_norm(x, None, None, training=True, backend="cpu")
        assert len(cuda_emulator.launched_grids()) == 2  # statistics, then normalize
    cnnkern.functional.batch_norm(x, None, None, training=True, backend="cpu")
    assert cuda_emulator.launched_grids() == []  # the C++ CPU kernel again


# Shapes large enough that the launchers split each channel's items over several blocks (grid
# y * z > 1), in both lane orientations (along C: channels_last; along L: NCHW), vectorized
# (16-byte items) or not (odd sizes, channel slices), on a 3-SM and a 132-SM (H100) device.
SPLIT_CASES = [
    pytest.param((8, 3, 128, 128), torch.float32, "nchw", id="8x3x128x128-nchw-f32"),  # split over n
    pytest.param((2, 3, 256, 256), torch.float32, "nchw", id="2x3x256x256-nchw-f32"),  # and over l
    pytest.param((64, 2, 9, 9), torch.float32, "nchw", id="64x2x9x9-nchw-f32"),
    pytest.param((8, 32, 40, 40), torch.bfloat16, "channels_last", id="8x32x40x40-cl-bf16"),
    pytest.param((4, 3, 91, 91), torch.float16, "slice", id="4x3x91x91-slice-f16"),
    pytest.param((4, 11, 17, 17), torch.float64, "slice_cl", id="4x11x17x17-slicecl-f64"),
]


@pytest.mark.parametrize("sms", [3, 132])
@pytest.mark.parametrize("shape,dtype,layout", SPLIT_CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_split_grids(cuda_emulator, sms, shape, dtype, layout, training):
    x = make_input(shape, dtype, "cpu", layout, mean=3.0)
    cuda_emulator.launched_grids()
    with cuda_kernels_on_cpu(cuda_emulator, sms=sms, seed=sms):
        run_and_compare("cpu", "cpu", x, residual=True, activation="relu", training=training)
    grids = cuda_emulator.launched_grids()
    assert grids, "no emulated kernel ran"
    if training:
        assert max(y * z for _, y, z, *_ in grids) > 1, f"no launch split the items: {grids}"


# Small GPUs for the one-pass training kernels (bn_forward_resident_kernel,
# bn_backward_resident_kernel): a 16 KB L2, so that these shapes are "larger than L2", and 48 KB
# (or 80 KB) of shared memory per block, two blocks per SM.
SMALL_GPU = dict(l2_bytes=16 << 10, shared_per_sm=96 << 10, shared_per_block=48 << 10)
LARGER_GPU = dict(l2_bytes=16 << 10, shared_per_sm=160 << 10, shared_per_block=80 << 10)
# run_and_compare's residual and grad_output are NCHW: with a channels_last input, the kernels
# that read them use scalar accesses (VEC = 1).
FUSED = dict(residual=True, activation="relu")
PLAIN = dict(affine=False, momentum=0.3, eps=1e-3)
RESIDENT_CASES = [
    # shape, dtype, layout, sms, device, options, (forward, backward) in one pass
    pytest.param((4, 12, 20, 20), torch.float32, "nchw", 2, SMALL_GPU, FUSED, (True, True), id="nchw-f32-3rounds"),
    pytest.param((4, 32, 12, 12), torch.bfloat16, "channels_last", 1, SMALL_GPU, PLAIN, (True, True),
                 id="cl-bf16-2rounds"),
    pytest.param((4, 32, 12, 12), torch.bfloat16, "channels_last", 3, LARGER_GPU, PLAIN, (True, True),
                 id="cl-bf16-larger-gpu"),
    pytest.param((4, 32, 12, 12), torch.bfloat16, "channels_last", 1, SMALL_GPU, FUSED, (True, True),
                 id="cl-bf16-scalar"),
    pytest.param((3, 5, 37, 41), torch.float16, "slice", 3, SMALL_GPU, FUSED, (True, True), id="slice-f16"),
    pytest.param((4, 11, 9, 9), torch.float64, "slice_cl", 2, SMALL_GPU, PLAIN, (True, True), id="slicecl-f64"),
    pytest.param((5, 3, 13, 13), torch.float32, "nchw", 2, SMALL_GPU, FUSED, (False, False), id="fits-l2"),
    pytest.param((2, 3, 128, 128), torch.float32, "nchw", 1, SMALL_GPU, FUSED, (False, False), id="too-big"),
]


@pytest.mark.parametrize("shape,dtype,layout,sms,device,options,one_pass", RESIDENT_CASES)
def test_one_pass_training(cuda_emulator, shape, dtype, layout, sms, device, options, one_pass):
    x = make_input(shape, dtype, "cpu", layout, mean=3.0)
    cuda_emulator.launched_grids()
    with cuda_kernels_on_cpu(cuda_emulator, sms=sms, **device):
        run_and_compare("cpu", "cpu", x, training=True, **options)
    # The emulated launches: the forward's (one cooperative, or two), then the backward's.
    grids = cuda_emulator.launched_grids()
    assert (grids[0][3], sum(g[3] for g in grids) - grids[0][3]) == one_pass, grids


# The backward's kernels that recompute the ReLU mask from x (float32, float64: kRecomputesReluMask)
# against those that read it from the output, on grids split over several blocks and in one pass:
# the same launches, and the same gradients bit for bit. Asking for grad_residual too makes the
# two-pass backward's first launch write it and its second read it (no mask there).
@pytest.mark.parametrize("shape,dtype,layout,sms,device,one_pass", [
    pytest.param((8, 3, 128, 128), torch.float32, "nchw", 3, {}, False, id="nchw-f32-split"),
    pytest.param((8, 32, 40, 40), torch.float32, "channels_last", 3, {}, False, id="cl-f32-split"),
    pytest.param((4, 11, 17, 17), torch.float64, "slice_cl", 132, {}, False, id="slicecl-f64"),
    pytest.param((4, 12, 20, 20), torch.float32, "nchw", 2, SMALL_GPU, True, id="nchw-f32-one-pass"),
    pytest.param((4, 32, 12, 12), torch.float32, "channels_last", 1, SMALL_GPU, True, id="cl-f32-one-pass"),
    pytest.param((4, 11, 9, 9), torch.float64, "slice_cl", 2, SMALL_GPU, True, id="slicecl-f64-one-pass"),
])
@pytest.mark.parametrize("output_mask", [[True, True, True, False], [True, True, True, True]],
                         ids=["no-residual", "grad-residual"])
def test_recomputed_mask_on_split_and_one_pass_grids(cuda_emulator, shape, dtype, layout, sms, device, one_pass,
                                                    output_mask):
    ops = torch.ops.cnnkern
    x = make_input(shape, dtype, "cpu", layout, mean=3.0)
    C = shape[1]
    w, b = torch.rand(C, dtype=dtype) + 0.5, torch.rand(C, dtype=dtype) - 0.5  # a mask of 30-70% ones
    g = torch.randn_like(x)
    with cuda_kernels_on_cpu(cuda_emulator, sms=sms, **device):
        y, mean, invstd = ops.bn_forward_train(x, w, b, None, None, None, 0.1, 1e-5, True)
        cuda_emulator.launched_grids()
        read = ops.bn_backward(g, x, y, w, b, mean, invstd, True, True, output_mask)
        read_grids = cuda_emulator.launched_grids()
        recomputed = ops.bn_backward(g, x, None, w, b, mean, invstd, True, True, output_mask)
        grids = cuda_emulator.launched_grids()
    assert 0.2 < (y > 0).double().mean().item() < 0.8, "the mask must cut both ways"
    assert grids == read_grids and grids[0][3] == one_pass, (grids, read_grids)
    if not one_pass:
        assert max(y * z for _, y, z, *_ in grids) > 1, f"no launch split the items: {grids}"
    for name, a, r in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), read, recomputed):
        assert (a is None) == (r is None), name
        if a is not None:
            assert torch.equal(a, r), f"{name}: the recomputed mask differs from the output's"


# Along L the one-pass plan takes the lane count (32, 16 or 8 a row) of the least time
# (plan_call), where the two-pass plan takes 32 here: fewer lanes a row, more samples a step.
@pytest.mark.parametrize("shape,dtype,lanes", [((32, 3, 36, 36), torch.float32, (16, 16)),
                                               ((32, 2, 40, 40), torch.bfloat16, (8, 32))], ids=["f32", "bf16"])
def test_one_pass_lanes_along_l(cuda_emulator, shape, dtype, lanes):
    x = make_input(shape, dtype, "cpu", "nchw", mean=3.0)
    cuda_emulator.launched_grids()
    with cuda_kernels_on_cpu(cuda_emulator, sms=3, **LARGER_GPU):
        run_and_compare("cpu", "cpu", x, training=True, **FUSED)
    grids = cuda_emulator.launched_grids()
    forward, backward = grids  # one cooperative launch each
    assert forward[3] and backward[3] and (forward[5], backward[5]) == lanes, grids


def test_plans_are_remembered_per_alignment(cuda_emulator):
    """The launchers remember plans per call geometry (plan_call): an input at an address that
    is not 16-byte aligned, of the same sizes and strides, is another geometry, whose kernels
    take scalar accesses (the emulator checks the alignment of every 16-byte access)."""
    aligned = make_input((4, 8, 6, 6), torch.float32, "cpu", "nchw")
    unaligned = torch.empty(aligned.numel() + 1)[1:].view(aligned.shape).copy_(aligned)
    with cuda_kernels_on_cpu(cuda_emulator, sms=3):
        for x in (aligned, unaligned, aligned):
            run_and_compare("cpu", "cpu", x, training=True, **FUSED)


def test_one_pass_switched_off(cuda_emulator, monkeypatch):
    monkeypatch.setenv("CNNKERN_CUDA_ONE_PASS", "0")
    x = make_input((4, 12, 20, 20), torch.float32, "cpu", "nchw")
    cuda_emulator.launched_grids()
    with cuda_kernels_on_cpu(cuda_emulator, sms=2, **SMALL_GPU):
        run_and_compare("cpu", "cpu", x, **FUSED)
    grids = cuda_emulator.launched_grids()
    assert grids and not any(g[3] for g in grids), grids


def test_one_pass_vectorized_channels_last(cuda_emulator):
    # Every tensor channels_last, so both one-pass kernels run 16-byte accesses along C; their
    # results against the two-pass kernels' (checked against the oracle above) on a larger L2.
    x = make_input((4, 32, 12, 12), torch.bfloat16, "cpu", "channels_last", mean=3.0)
    r, g = torch.randn_like(x), torch.randn_like(x)
    w, b = torch.rand(32) + 0.5, torch.randn(32)

    def run(**device):
        leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]
        cuda_emulator.launched_grids()
        with cuda_kernels_on_cpu(cuda_emulator, sms=3, **device):
            y = cnnkern.functional.batch_norm(leaves[0], None, None, leaves[2], leaves[3], True,
                                              residual=leaves[1], activation="relu", backend="cpu")
            grads = torch.autograd.grad(y, leaves, g)
        return [y, *grads], sum(grid[3] for grid in cuda_emulator.launched_grids())

    one_pass, cooperative = run(**LARGER_GPU)
    two_pass, plain_only = run()
    assert (cooperative, plain_only) == (2, 0)
    for name, ours, theirs in zip(("output", "grad_input", "grad_residual", "grad_weight", "grad_bias"),
                                  one_pass, two_pass):
        # Splits merge in another order: the statistics differ by float32 rounding, which may move
        # a bfloat16 result by one unit (2^-8 relative).
        torch.testing.assert_close(ours, theirs, rtol=8e-3, atol=1e-2, msg=name)


# Every tensor channels_last and C a multiple of a 128-byte row's channels: the kernels run
# 16-byte accesses along C with the most channel groups a block has (8, max_channel_groups in
# csrc/cuda/bn_device.cuh, which sizes block_merge's and group_coefficients' shared arrays), in one
# pass (a small GPU) and in two (an H100's L2).
@pytest.mark.parametrize("shape,dtype", [((4, 64, 12, 12), torch.bfloat16), ((4, 32, 12, 12), torch.float32)],
                         ids=["bf16", "f32"])
@pytest.mark.parametrize("device,one_pass", [(LARGER_GPU, True), ({}, False)], ids=["one-pass", "two-pass"])
def test_widest_channel_rows(cuda_emulator, shape, dtype, device, one_pass):
    x = make_input(shape, dtype, "cpu", "channels_last", mean=3.0)
    cuda_emulator.launched_grids()
    with cuda_kernels_on_cpu(cuda_emulator, sms=3, **device):
        run_and_compare("cpu", "cpu", x, training=True, operands_like_input=True, **FUSED)
    grids = cuda_emulator.launched_grids()
    assert grids and all(g[3] == one_pass for g in grids), grids
    assert all(g[5] == 8 for g in grids), f"not 8 lanes along C (block x) in every launch: {grids}"


# The launch plans of ResNet-50's batch-norm shapes at batch 128 on an emulated H100 (132 SMs,
# 50 MB L2, 228 KB shared memory per SM), launches checked but not run (dry run): every launch
# is valid (block and grid sizes, shared memory within the opt-in limit, a cooperative grid within
# the occupancy), and the inputs larger than L2 take the one-pass kernels wherever a round of
# channel tiles fits the grid's shared memory (bench/NOTES.md, v3).
H100_PLANS = [
    # shape, dtype, (forward, backward) in one pass for NCHW, and for channels_last
    ((128, 64, 112, 112), torch.bfloat16, (True, True), (False, False)),  # CL: a 16-channel tile is 51 MB
    ((128, 256, 56, 56), torch.bfloat16, (True, True), (True, True)),
    ((128, 512, 28, 28), torch.bfloat16, (True, True), (True, True)),
    ((128, 1024, 14, 14), torch.bfloat16, (False, False), (False, False)),  # 51.4 MB: fits the 52.4 MB L2
    ((128, 2048, 7, 7), torch.bfloat16, (False, False), (False, False)),
    ((128, 64, 112, 112), torch.float32, (True, True), (False, False)),
    ((128, 256, 56, 56), torch.float32, (True, True), (True, True)),
    ((128, 512, 28, 28), torch.float32, (True, True), (True, True)),
    ((128, 1024, 14, 14), torch.float32, (True, True), (True, True)),
    ((128, 2048, 7, 7), torch.float32, (False, False), (False, False)),
]


@pytest.mark.parametrize("shape,dtype,nchw,channels_last", H100_PLANS,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) and len(v) == 4 else None)
def test_full_size_plans(cuda_emulator, shape, dtype, nchw, channels_last):
    C = shape[1]
    w = torch.ones(C)
    for layout, one_pass in (("nchw", nchw), ("channels_last", channels_last)):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
        with cuda_kernels_on_cpu(cuda_emulator, sms=132):
            cuda_emulator.set_dry_run(True)
            try:
                cuda_emulator.launched_grids()
                y, mean, invstd = torch.ops.cnnkern.bn_forward_train(x, w, None, None, None, None, 0.1, 1e-5, True)
                forward = cuda_emulator.launched_grids()
                torch.ops.cnnkern.bn_backward(torch.empty_like(x), x, y, w, None, mean, invstd, True, True,
                                              [True, True, True, True])
                backward = cuda_emulator.launched_grids()
            finally:
                cuda_emulator.set_dry_run(False)
        kinds = (forward[0][3], backward[0][3])
        assert kinds == one_pass, f"{layout}: forward {forward}, backward {backward}"
        # A one-pass call is one launch, and its blocks fit two to an SM.
        for launches in (forward, backward):
            if launches[0][3]:
                assert len(launches) == 1 and launches[0][4] <= (228 << 10) // 2 - 1024, launches


def test_rewrite_for_the_emulator():
    source = ("kernel<T, 4><<<grid, block, 0, stream>>>(a, b);\n"
              "  extern __shared__ __align__(16) unsigned char kept[];\n")
    assert rewrite(source, "k.cu").splitlines() == [
        '#line 1 "k.cu"',
        "::cuda_emu::launch(grid, block, 0, stream, kernel<T, 4>, a, b);",
        "  unsigned char* const kept = static_cast<unsigned char*>(::cuda_emu::dynamic_shared());",
    ]
    with pytest.raises(RuntimeError, match="rewrote 0 of 1 kernel launches"):
        rewrite("(*table[i])<<<1, 32>>>(x);", "k.cu")
    with pytest.raises(RuntimeError, match="rewrote 0 of 1 dynamic shared arrays"):
        rewrite("extern __shared__ float4 kept[16];", "k.cu")
