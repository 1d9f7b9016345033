"""The batch-norm family against PyTorch and the float64 oracle, on every backend
that runs here: outputs, all gradients, running stats."""
import functools
import itertools
import os
import subprocess
import sys

import pytest
import torch

import cnnkern
from cnnkern import reference
from helpers import (LAYOUTS, backend_params, cpu_converts_in_registers, cpu_rounds_bfloat16_natively, make_input,
                     require, run_and_compare)

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# C in {1, 3, 7, 65}, H = W in {1, 7, 13}, N in {1, 2, 5}: each value several times,
# never one value per channel (training refuses it).
SHAPES = [(2, 1, 7, 7), (5, 3, 13, 13), (1, 7, 13, 13), (2, 65, 1, 1), (5, 65, 7, 7), (1, 3, 7, 7), (5, 7, 1, 1)]


# Every (shape, layout, dtype), training and eval; the fused variants rotate.
VARIANTS = [dict(residual=True, activation="relu"), dict(activation="relu"), dict(residual=True), dict()]
MATRIX = [
    pytest.param(shape, layout, dtype, VARIANTS[i % len(VARIANTS)], id=f"{'x'.join(map(str, shape))}-{layout}-"
                 f"{str(dtype)[6:]}-v{i % len(VARIANTS)}")
    for i, (shape, layout, dtype) in enumerate(itertools.product(SHAPES, LAYOUTS, DTYPES))
]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("shape,layout,dtype,variant", MATRIX)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_pytorch(backend, device, shape, layout, dtype, variant, training):
    require(backend, device, dtype)
    x = make_input(shape, dtype, device, layout)
    run_and_compare(backend, device, x, training=training, **variant)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("running_stats", [True, False], ids=["stats", "nostats"])
@pytest.mark.parametrize("residual,activation", [(False, None), (True, None), (False, "relu"), (True, "relu")],
                         ids=["bn", "bn+add", "bn+relu", "bn+add+relu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_options(backend, device, affine, running_stats, residual, activation, dtype):
    require(backend, device, dtype)
    x = make_input((3, 5, 6, 7), dtype, device, "channels_last")
    run_and_compare(backend, device, x, affine=affine, running_stats=running_stats, residual=residual,
                    activation=activation, training=True)
    if running_stats:
        run_and_compare(backend, device, x, affine=affine, residual=residual, activation=activation, training=False)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("first_offset", [0.0, 3000.0], ids=["first_typical", "first_outlying"])
def test_large_mean(backend, device, layout, first_offset):
    """Mean 1e4, std 1 in float32: the variance (so the output and running_var) is
    right, which naive sum-of-squares statistics get badly wrong. With first_offset, each
    channel's first value lies 3000 std out: a shift of the statistics taken there (as the
    cpu kernels once did) would cancel their variance away in float32 sums of squares."""
    require(backend, device, torch.float32)
    x = make_input((4, 6, 9, 9), torch.float32, device, layout, mean=1e4)
    x[0, :, 0, 0] += first_offset
    res = run_and_compare(backend, device, x, residual=True, activation="relu")
    running_var = res["ours"][-1]
    assert torch.allclose(running_var.double(), res["oracle"][-1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_param_dtype_matches_input(backend, device, dtype):
    """Parameters and running stats in the input's dtype (a model under .half())."""
    require(backend, device, dtype)
    x = make_input((2, 5, 7, 7), dtype, device, "nchw")
    run_and_compare(backend, device, x, residual=True, activation="relu", pdtype=dtype)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("shape", [(2, 3), (4, 5, 9)], ids=["NC", "NCL"])
def test_1d_inputs(backend, device, shape):
    require(backend, device, torch.float32)
    x = make_input(shape, torch.float32, device, "nchw")
    run_and_compare(backend, device, x, residual=True, activation="relu")


@pytest.mark.parametrize("backend,device", backend_params())
def test_broadcast_and_odd_strides(backend, device):
    """grad_output with stride 0 (from y.sum()), and an input whose spatial dims
    do not collapse into one stride (functional copies that one, visibly)."""
    require(backend, device, torch.float64)
    x = make_input((3, 4, 10, 6), torch.float64, device)[:, :, ::2]
    w = torch.rand(4, dtype=torch.float64, device=device, requires_grad=True)
    xr = x.detach().requires_grad_()  # (a clone would densify the layout under test)
    y = cnnkern.functional.batch_norm(xr, None, None, w, None, True, activation="relu", backend=backend)
    y.sum().backward()
    xo = x.detach().requires_grad_()
    wo = w.detach().clone().requires_grad_()
    reference.batch_norm_ref(xo, None, None, wo, None, True, activation="relu").sum().backward()
    torch.testing.assert_close(xr.grad, xo.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(w.grad, wo.grad, rtol=1e-9, atol=1e-9)


def test_oracle_through_a_relu_mask():
    """reference.batch_norm_ref's relu_mask (the tests' and the benchmark's oracle of a result's
    own ReLU decisions): its own mask gives the plain oracle; a mask passing one element the ReLU
    stopped gives that element its negative value and its gradient, and nothing else changes
    but the gradients' sums."""
    x = make_input((2, 3, 4, 5), torch.float64, "cpu")
    r, g = torch.randn_like(x), torch.randn_like(x)

    def run(relu_mask=None):
        xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
        y = reference.batch_norm_ref(xs, None, None, training=True, residual=rs, activation="relu",
                                     relu_mask=relu_mask)
        return (y.detach(),) + torch.autograd.grad(y, (xs, rs), g)

    y, gx, gr = run()
    for ours, plain in zip(run(y > 0), (y, gx, gr)):
        assert torch.equal(ours, plain)
    mask = y > 0
    flip = (~mask).nonzero()[0].tolist()
    mask[tuple(flip)] = True
    y_flipped, gx_flipped, gr_flipped = run(mask)
    assert y_flipped[tuple(flip)] < 0 and torch.equal(y_flipped.masked_fill(mask, 0), torch.zeros_like(y))
    assert torch.equal(y_flipped.where(y > 0, 0), y)
    assert gr_flipped[tuple(flip)] == g[tuple(flip)] and torch.equal(gr_flipped.where(y > 0, 0), gr)
    assert not torch.allclose(gx_flipped, gx)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch(backend, device, training):
    """N = 0 behaves as PyTorch: empty output, running stats untouched, zero grads."""
    require(backend, device, torch.float32)
    x = torch.randn(0, 3, 5, 5, device=device, requires_grad=True)
    w = torch.rand(3, device=device, requires_grad=True)
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = cnnkern.functional.batch_norm(x, rm, rv, w, None, training, activation="relu", backend=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nan_propagates(backend, device, training, layout):
    """A NaN input stays NaN through the fused ReLU, as through torch.relu (a max(y, 0) may
    drop it): in eval its own output alone, in training its whole channel and that channel's
    running stats, whose statistics it poisons. Every other value as PyTorch's."""
    require(backend, device, torch.float32)
    x = make_input((3, 5, 6, 7), torch.float32, device, layout)
    x[1, 2, 3, 4] = float("nan")
    w, b = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
    stats = [torch.randn(5, device=device), torch.rand(5, device=device) + 0.5]
    expected_stats = [t.clone() for t in stats]
    y = cnnkern.functional.batch_norm(x, *stats, w, b, training, activation="relu", backend=backend)
    expected = torch.relu(torch.nn.functional.batch_norm(x, *expected_stats, w, b, training))
    assert y.isnan().any() and torch.equal(y.isnan(), expected.isnan())
    torch.testing.assert_close(y, expected, equal_nan=True, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(stats, expected_stats):
        torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_calls_without_gradients(backend, device, training, layout):
    """Calls no gradient flows through (torch.no_grad, no input requiring one, inference mode, which
    skips the autograd kernel) record no graph node: same output and running stats, bit for bit, as
    a call that records one."""
    require(backend, device, torch.float32)
    x = make_input((3, 5, 6, 7), torch.float32, device, layout, mean=2.0)
    r = torch.randn(x.shape, device=device)
    w, b = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
    rm, rv = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
    stats = [(rm.clone(), rv.clone()) for _ in range(4)]  # one per call, from the same start
    call = functools.partial(cnnkern.functional.batch_norm, training=training, residual=r, activation="relu",
                             backend=backend)
    recorded = call(x.detach().requires_grad_(), *stats[0], w, b)
    assert recorded.grad_fn is not None
    plain = call(x, *stats[1], w, b)
    with torch.no_grad():
        no_grad = call(x.detach().requires_grad_(), *stats[2], w, b)
    with torch.inference_mode():
        inference = call(x.detach().requires_grad_(), *stats[3], w, b)
    assert plain.grad_fn is None and no_grad.grad_fn is None and inference.grad_fn is None
    for y, (running_mean, running_var) in ((plain, stats[1]), (no_grad, stats[2]), (inference, stats[3])):
        assert torch.equal(y, recorded.detach())
        assert torch.equal(running_mean, stats[0][0]) and torch.equal(running_var, stats[0][1])


# Which of (input, weight, bias, residual) want a gradient: each backward kernel
# computes only those (output_mask), and some skip a pass or reorder their passes
# depending on the set.
GRAD_SUBSETS = ["x", "w", "r", "wb", "xr", "wr", "br", "xwbr"]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("wanted", GRAD_SUBSETS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_partial_grads(backend, device, wanted, training, layout):
    require(backend, device, torch.float64)
    x = make_input((3, 5, 6, 7), torch.float64, device, layout)
    w = torch.rand(5, dtype=torch.float64, device=device) + 0.5
    b = torch.randn(5, dtype=torch.float64, device=device)
    r = torch.randn(x.shape, dtype=torch.float64, device=device)
    rm, rv = torch.randn(5, dtype=torch.float64, device=device), torch.rand(5, dtype=torch.float64, device=device) + 0.5
    g = torch.randn(x.shape, dtype=torch.float64, device=device)

    def grads(fn):
        leaves = [t.detach().requires_grad_(name in wanted) for name, t in zip("xwbr", (x, w, b, r))]
        y = fn(*leaves, rm.clone(), rv.clone())
        return torch.autograd.grad(y, [t for t in leaves if t.requires_grad], g)

    ours = grads(lambda xs, ws, bs, rs, rms, rvs: cnnkern.functional.batch_norm(
        xs, rms, rvs, ws, bs, training, residual=rs, activation="relu", backend=backend))
    oracle = grads(lambda xs, ws, bs, rs, rms, rvs: reference.batch_norm_ref(
        xs, rms, rvs, ws, bs, training, 0.1, 1e-5, rs, "relu"))
    for name, o, e in zip(wanted, ours, oracle):
        torch.testing.assert_close(o, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cpu_channel_blocks(threads, training):
    """With enough NCHW channels for every thread, the CPU kernels give each thread
    blocks of channels through both passes (by_channel_blocks); 3 threads split 13
    channels unevenly. Whatever the machine's thread count, this path is covered."""
    require("cpu", "cpu", torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = make_input((3, 13, 5, 7), torch.float64, "cpu", "nchw")
        run_and_compare("cpu", "cpu", x, residual=True, activation="relu", training=training)
        run_and_compare("cpu", "cpu", x, training=training)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cpu_short_lines(threads, dtype):
    """NCHW lines of at most 64 values (8x8 and smaller) are summed a channel at a time over
    all samples (sum_short_lines_along_l): 259 samples make a fold past 256 lines and groups of
    4 with some left over; 45 channels of 7x7 make two runs of channels side by side (41 + 4)."""
    require("cpu", "cpu", dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = make_input((259, 45, 7, 7), dtype, "cpu", "nchw")
        run_and_compare("cpu", "cpu", x, residual=True, activation="relu", training=True)
        run_and_compare("cpu", "cpu", x, training=True)
    finally:
        torch.set_num_threads(previous)


HALF_DTYPES = (torch.float16, torch.bfloat16)
# Biases that land eval's sums (below) in each of the 16-bit types' ranges: normal, subnormal,
# past the largest finite (rounding to infinity or not), ties, infinite.
ROUNDING_BIASES = {
    torch.float16: [0.0, 1e-7, -3e-6, 3e-5, -1.5, 1000.25, -65504.0, 65520.0, -7e4, 2.0 ** -24, 3.0 ** 0.5,
                    -(2.0 ** 15) - 3.0, 1e-45, float("inf")],
    torch.bfloat16: [0.0, 1e-39, -3e-38, 2.0 ** -133, 2.0 ** -134, -1.5, 1000.25, 3.3895e38, -3.3896e38, 3.4e38,
                     3.0 ** 0.5, -(2.0 ** 15) - 3.0, 1e-45, float("-inf")],
}


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: str(d)[6:])
def test_cpu_16bit_rounding(dtype, relu):
    """The CPU kernels round 16-bit outputs themselves (csrc/cpu/element_cast.h, in registers
    csrc/cpu/in_registers.h): the same bits as torch's conversion, over every input of the type
    (normal, subnormal, infinite, NaN) and sums that land in each of its ranges. With weight 1,
    mean 0 and variance 1 (eps 0), eval computes y = act(float(x) + bias), as the float32
    expression below."""
    require("cpu", "cpu", dtype)
    biases = torch.tensor(ROUNDING_BIASES[dtype], dtype=torch.float32)
    C = len(biases)
    bits = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16)  # every 16-bit value
    x = bits.view(dtype).reshape(1, 1, -1).expand(2, C, -1).contiguous()
    ones, zeros = torch.ones(C), torch.zeros(C)
    y = torch.ops.cnnkern.bn_forward_eval(x, ones, biases, None, zeros, ones, 0.0, relu)
    expected = x.float() + biases[:, None]
    if relu:
        expected = torch.where(expected < 0, 0.0, expected)  # NaN stays NaN, as F.relu
    expected = expected.to(dtype)
    nan = expected.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])


# Lines of unit stride of 16-bit tensors convert in registers 8 values a step, or where the CPU
# cannot, float16 a chunk at a time, 512 values in the forwards and 256 in the backward
# (csrc/cpu/stage.h): lines longer than either chunk with some left over, along L (4900 values,
# two segments) and along C (1100 channels); short lines, summed 4 samples at a time (9 = 4 + 4 +
# 1) and walked flat; grad_output and the residual in the input's layout, so that every tensor
# has unit stride, or NCHW under a channels_last input, so that none has.
SIXTEEN_BIT_LINES = {
    "nchw-long": ((2, 3, 70, 70), "nchw", True),
    "cl-long": ((3, 1100, 2, 3), "channels_last", True),
    "nchw-short": ((9, 70, 5, 5), "nchw", True),
    "cl-mixed": ((3, 1100, 2, 3), "channels_last", False),
    "cl-runs": ((4, 24, 5, 7), "channels_last", True),  # runs of 7 positions (Walk::position_runs)
    "nchw-7x7": ((4, 6, 7, 7), "nchw", True),  # flat lines in registers only (kFlatLineInRegisters)
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", SIXTEEN_BIT_LINES)
def test_cpu_16bit_lines(case, dtype, training):
    require("cpu", "cpu", dtype)
    shape, layout, like_input = SIXTEEN_BIT_LINES[case]
    x = make_input(shape, dtype, "cpu", layout)
    run_and_compare("cpu", "cpu", x, residual=True, activation="relu", training=training,
                    operands_like_input=like_input)
    run_and_compare("cpu", "cpu", x, training=training, operands_like_input=like_input)


# The calls of `cases` (a list of (x, weight, bias, residual, running_mean, running_var,
# grad_output)) that run every pass of the CPU kernels: the forwards, training and eval, and
# backward passes with the ReLU mask from the output, recomputed or absent, training and eval,
# with grad_residual or not (eval with grad_residual wanted: an elementwise pass with two
# outputs). Every output into the file argv[2].
_PASS_CALLS = r"""
import sys, torch, cnnkern
ops, outputs = torch.ops.cnnkern, []
for x, w, b, r, rm, rv, g in torch.load(sys.argv[1]):
    y, mean, invstd = ops.bn_forward_train(x, w, b, r, rm.clone(), rv.clone(), 0.1, 1e-5, True)
    outputs += [y, mean, invstd, ops.bn_forward_eval(x, w, b, r, rm, rv, 1e-5, True)]
    mask = None if r is None else y  # a forward with a residual: the mask from the output only
    for output, training, relu, wanted in [(y, True, True, [True] * 4), (mask, True, True, [True, True, True, False]),
                                           (mask, False, True, [True, False, False, True]),
                                           (None, False, False, [True, True, True, False])]:
        outputs += [t for t in ops.bn_backward(g, x, output, w, b, mean, invstd, training, relu, wanted)
                    if t is not None]
torch.save(outputs, sys.argv[2])
"""


def _same_bits_under(envs, dtype, tmp_path):
    """Runs _PASS_CALLS in a subprocess under each of `envs` (two environment overrides) over
    every line shape of SIXTEEN_BIT_LINES and a channel slice of each, with and without a
    residual, and asserts that both give the same bits. The inputs' magnitudes spread over 2^-6
    to 2^6, so that sums of 16-bit values round in float32 and a sum taken in another order shows."""
    cases = []
    for (shape, layout, _), residual in itertools.product(SIXTEEN_BIT_LINES.values(), (False, True)):
        for layout in (layout, "slice_cl" if layout == "channels_last" else "slice"):
            x = make_input(shape, dtype, "cpu", layout, mean=0.3)
            x.mul_(torch.exp2(torch.randint(-6, 7, x.shape)).to(dtype))  # in place: x keeps its strides
            C = shape[1]
            r = torch.randn_like(x) if residual else None
            cases.append((x, torch.rand(C) + 0.5, torch.randn(C), r, torch.randn(C), torch.rand(C) + 0.5,
                          torch.randn_like(x)))
    torch.save(cases, tmp_path / "in.pt")
    results = []
    for i, env in enumerate(envs):
        out = tmp_path / f"out{i}.pt"
        done = subprocess.run([sys.executable, "-c", _PASS_CALLS, str(tmp_path / "in.pt"), str(out)],
                              capture_output=True, text=True, env=dict(os.environ, **env))
        assert done.returncode == 0, done.stderr[-4000:]
        results.append(torch.load(out))
    assert len(results[0]) == len(results[1]) > len(cases) * 10
    bits = {2: torch.int16, 4: torch.int32}
    for i, (ours, theirs) in enumerate(zip(*results)):
        assert torch.equal(ours.view(bits[ours.element_size()]), theirs.view(bits[theirs.element_size()])), \
            f"output {i}"


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: str(d)[6:])
def test_cpu_16bit_in_registers(dtype, tmp_path):
    """Where the CPU has AVX2 and F16C, the 16-bit passes convert in registers, 8 values a step:
    the reductions (the forward's statistics, the backward's sums) and the elementwise passes
    (the forwards' normalize, the backward's grad_input and grad_residual); the portable loops
    (CNNKERN_CPU_IN_REGISTERS=0) convert float16 a chunk at a time into float buffers, bfloat16
    element by element. Both must give the same bits."""
    require("cpu", "cpu", dtype)
    if not cpu_converts_in_registers():
        pytest.skip("no AVX2 and F16C here: the portable loops are all there is")
    _same_bits_under([{"CNNKERN_CPU_IN_REGISTERS": "0"}, {}], dtype, tmp_path)


def test_cpu_bfloat16_rounded_natively(tmp_path):
    """Where the CPU has AVX512-BF16, the bfloat16 passes write their outputs as floats a chunk
    at a time, rounded by vcvtneps2bf16 (csrc/cpu/bfloat16_outputs.h), where the floats that it
    would round otherwise than c10 (NaN, denormal) take c10's conversion: the same bits as
    AVX2's rounding in registers (CNNKERN_CPU_AVX512_BF16=0) in every pass, over every bfloat16
    value and sum (test_cpu_16bit_rounding, by default here, and run again under =0)."""
    require("cpu", "cpu", torch.bfloat16)
    if not cpu_rounds_bfloat16_natively():
        pytest.skip("no AVX512-BF16 here (or switched off): bfloat16 rounds in AVX2 registers")
    _same_bits_under([{"CNNKERN_CPU_AVX512_BF16": "0"}, {}], torch.bfloat16, tmp_path)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                             "16bit_rounding and bfloat16"], capture_output=True, text=True,
                            env=dict(os.environ, CNNKERN_CPU_AVX512_BF16="0"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]


def test_cpu_streamed_stores(tmp_path):
    """The float32 elementwise passes of ops too large for the last-level cache store their
    outputs around it, 8 values a step (csrc/cpu/streamed.h), where the CPU has AVX2;
    CNNKERN_CPU_STREAM_STORES=1 streams at any size, on lines of 256 values or more. A loop takes
    single elements up to the first output line's aligned 8 and past its last 8, and streams only
    whole cache lines: lines of every alignment and length (70x70 NCHW lines start 16 bytes
    apart; flat lines of 7x7 and 5x5), two outputs in one pass, strided and short lines (which
    never stream). The same bits as the cached stores (=0)."""
    require("cpu", "cpu", torch.float32)
    if not cpu_converts_in_registers():
        pytest.skip("no AVX2 here: the portable loops do not stream")
    _same_bits_under([{"CNNKERN_CPU_STREAM_STORES": "0"}, {"CNNKERN_CPU_STREAM_STORES": "1"}], torch.float32,
                     tmp_path)


def test_cpu_portable_conversions():
    """The 16-bit loops convert in registers where the CPU has AVX2 and F16C, and with the
    portable loops under CNNKERN_CPU_IN_REGISTERS=0, which a subprocess runs the 16-bit tests
    with. The two round alike; they differ in float16 NaN payloads, which F16C keeps: that tells
    which one ran."""
    require("cpu", "cpu", torch.float16)
    nan = torch.tensor([0x7E01], dtype=torch.int16).view(torch.float16)  # a quiet NaN, payload 1
    x = nan.reshape(1, 1, 1).expand(2, 1, 64).contiguous()
    one, zero = torch.ones(1), torch.zeros(1)
    y = torch.ops.cnnkern.bn_forward_eval(x, one, zero, None, zero, one, 0.0, False)
    portable = os.environ.get("CNNKERN_CPU_IN_REGISTERS") == "0"
    expected = 0x7E01 if cpu_converts_in_registers() else 0x7E00
    assert y.view(torch.int16).unique().tolist() == [expected]
    if portable:
        return
    env = dict(os.environ, CNNKERN_CPU_IN_REGISTERS="0")
    tests = "16bit_rounding or 16bit_lines or portable_conversions"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]


# channels_last lines of at most 256 channels are walked as runs of a sample's positions
# (Walk::position_runs), at most 512 values each: 24 channels of 7x7 make runs of 7 positions;
# 16 channels of 32x32 runs of 32, 416 of them over 13 samples (the sums fold their partials
# every 256 lines); 3 channels of 11x11 one run per sample. 100 channels of 13x13 (no divisor
# of 169 fits), a channel slice (positions not end to end) and NCHW operands under a
# channels_last input (layouts differ) are walked line by line by the passes that read them.
POSITION_RUNS = {
    "7x7": ((5, 24, 7, 7), "channels_last", True),
    "fold": ((13, 16, 32, 32), "channels_last", True),
    "sample": ((4, 3, 11, 11), "channels_last", True),
    "no-divisor": ((3, 100, 13, 13), "channels_last", True),
    "slice": ((5, 24, 7, 7), "slice_cl", False),
    "mixed": ((5, 24, 7, 7), "channels_last", False),
}


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", POSITION_RUNS)
def test_cpu_position_runs(case, training, dtype, threads):
    require("cpu", "cpu", dtype)
    shape, layout, like_input = POSITION_RUNS[case]
    x = make_input(shape, dtype, "cpu", layout)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_and_compare("cpu", "cpu", x, residual=True, activation="relu", training=training,
                        operands_like_input=like_input)
        run_and_compare("cpu", "cpu", x, training=training, operands_like_input=like_input)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("layout", ["nchw", "slice", "padded"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cpu_flat_lines(threads, layout, dtype, training):
    """NCHW lines of at most 36 values (6x6 and smaller), 4 samples or more: the elementwise
    passes take each sample's lines of a run of channels as one line (Walk::flat_lines). 230
    channels of 3x3 make runs of 227 and 3; a channel slice keeps each sample's lines end to
    end; lines padded to 10 values do not, and are walked one by one."""
    require("cpu", "cpu", dtype)
    shape = (5, 230, 3, 3)
    if layout == "padded":
        x = make_input((5, 230, 10), dtype, "cpu")[..., :9].unflatten(2, (3, 3))
        assert x.stride()[1:] == (10, 3, 1)
    else:
        x = make_input(shape, dtype, "cpu", layout)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_and_compare("cpu", "cpu", x, residual=True, activation="relu", training=training)
        run_and_compare("cpu", "cpu", x, training=training)
    finally:
        torch.set_num_threads(previous)


# A fresh process's first calls against its later ones, on 2 threads (OMP_NUM_THREADS: a call of
# torch.set_num_threads readies the workers and hides the first call's path): NCHW inputs small
# enough for channel blocks (by_channel_blocks), short lines and long, and the backward's sums.
_FIRST_CALLS = r"""
import torch, cnnkern
torch.manual_seed(0)
for shape, dtype in [((3, 6, 5, 4), torch.float64), ((4, 8, 32, 32), torch.float64), ((3, 6, 5, 4), torch.float32)]:
    x = torch.randn(shape, dtype=dtype) + torch.randn(shape[1], 1, 1, dtype=dtype)
    w, b, g = torch.rand(shape[1], dtype=dtype) + 0.5, torch.randn(shape[1], dtype=dtype), torch.randn_like(x)
    def step():
        y, mean, invstd = torch.ops.cnnkern.bn_forward_train(x, w, b, None, None, None, 0.1, 1e-5, True)
        grads = torch.ops.cnnkern.bn_backward(g, x, y, w, b, mean, invstd, True, True, [True, True, True, False])
        return [y, mean, invstd, *grads[:3]]
    first = step()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, step())), (shape, dtype)
print("same")
"""


def test_cpu_first_calls_sum_as_later_ones():
    """Every call sums in the same order, a process's first included: the first training forward
    once took another summation path on a worker thread that had not yet run a task (its
    at::get_num_threads() said 1), and its invstd differed from later calls' in the last bit."""
    require("cpu", "cpu", torch.float64)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, "-c", _FIRST_CALLS], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.split() == ["same"], result.stdout[-2000:] + result.stderr[-4000:]
