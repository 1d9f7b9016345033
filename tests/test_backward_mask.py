"""bn_backward's ReLU mask recomputed from the input (output None) against the mask read
from the forward's output: the same gradients bit for bit, on every backend and dtype that
recomputes it (RECOMPUTES_RELU_MASK), every layout, and the same decision where the forward's
output rounds a tiny positive value to 0. Backends that read the mask refuse output None."""
import math

import pytest
import torch

from cnnkern.ops.batch_norm import RECOMPUTES_RELU_MASK
from helpers import OP_DEVICE, OP_PREFIX, kernels_of, make_input, op_backend_params, param_dtype, require

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def backend_dtype_params(recomputing: bool):
    """(backend, dtype) params where the backend's kernels recompute the mask in that dtype (or,
    with recomputing False, read it from the output)."""
    return [pytest.param(p.values[0], dtype, marks=p.marks, id=f"{p.id}-{str(dtype)[6:]}")
            for p in op_backend_params() for dtype in DTYPES
            if (dtype in RECOMPUTES_RELU_MASK[kernels_of(p)]) == recomputing]


RECOMPUTING = backend_dtype_params(True)
REFUSING = backend_dtype_params(False)
MASKS = {  # output_mask: [grad_input, grad_weight, grad_bias, grad_residual]
    "all": [True, True, True, True],
    "no-residual": [True, True, True, False],  # what autograd asks after a forward without one
    "input-only": [True, False, False, False],
    "params-only": [False, True, True, False],
}


def _ops(backend):
    ops = torch.ops.cnnkern
    prefix = OP_PREFIX[backend]
    return getattr(ops, prefix + "bn_forward_train"), getattr(ops, prefix + "bn_backward")


def _params(C, dtype, device):
    pd = param_dtype(dtype)
    return torch.rand(C, dtype=pd, device=device) + 0.5, torch.randn(C, dtype=pd, device=device)


@pytest.mark.parametrize("backend,dtype", RECOMPUTING)
@pytest.mark.parametrize("shape,layout", [
    ((3, 7, 5, 6), "nchw"),
    ((3, 7, 5, 6), "channels_last"),
    ((2, 65, 13, 13), "channels_last"),
    ((5, 3, 7, 7), "slice"),
    ((3, 5, 6, 5), "slice_cl"),
    ((4, 9, 1, 1), "nchw"),
    ((2, 16, 24, 24), "nchw"),  # lines of 576: float16 staged in several chunks
    ((2, 16, 24, 24), "channels_last"),
])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_recomputed_mask_matches_output(backend, dtype, shape, layout, mask, training):
    device = OP_DEVICE[backend]
    require(backend, device, dtype, "bn_backward")
    forward, backward = _ops(backend)
    x = make_input(shape, dtype, device, layout)
    w, b = _params(shape[1], dtype, device)
    y, mean, invstd = forward(x, w, b, None, None, None, 0.1, 1e-5, True)
    assert 0.2 < (y > 0).double().mean().item() < 0.8, "the mask must cut both ways"
    g = torch.randn_like(x)
    read = backward(g, x, y, w, b, mean, invstd, training, True, MASKS[mask])
    recomputed = backward(g, x, None, w, b, mean, invstd, training, True, MASKS[mask])
    for name, a, r in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), read, recomputed):
        assert (a is None) == (r is None), name
        if a is not None:
            assert torch.equal(a, r), f"{name}: the recomputed mask differs from the output's"


# The largest positive value each dtype stores as 0 (half its smallest subnormal: ties go
# to even, 0), and the next float32 above it, which it stores as its smallest subnormal.
ZERO_BELOW = {torch.float32: 0.0, torch.float64: 0.0, torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134}


@pytest.mark.parametrize("backend,dtype", RECOMPUTING)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_recomputed_mask_follows_the_stored_output(backend, dtype, layout):
    """A channel with weight 0 outputs its bias: biases at the edge of what the dtype stores
    as 0 put the recomputed mask where the output's rounding puts it, not at v > 0."""
    device = OP_DEVICE[backend]
    require(backend, device, dtype, "bn_backward")
    forward, backward = _ops(backend)
    edge = ZERO_BELOW[dtype]
    pd = param_dtype(dtype)
    above = math.nextafter(edge, math.inf) if pd == torch.float64 else \
        torch.nextafter(torch.tensor(edge, dtype=pd), torch.tensor(1.0, dtype=pd)).item()
    bias = torch.tensor([edge, above, -above, 1.0, -0.0, -1.0, above, edge], dtype=pd, device=device)
    C = bias.numel()
    x = make_input((3, C, 5, 4), dtype, device, layout)
    w = torch.zeros(C, dtype=pd, device=device)
    y, mean, invstd = forward(x, w, bias, None, None, None, 0.1, 1e-5, True)
    on = (y > 0).flatten(2).any(-1).any(0)
    assert on.tolist() == [False, True, False, True, False, False, True, False], "the forward's rounding"
    g = torch.rand_like(x) + 0.5  # positive: a channel's grad_bias is 0 exactly where its mask is off
    _, _, grad_bias, _ = backward(g, x, None, w, bias, mean, invstd, True, True, [True, True, True, False])
    assert ((grad_bias != 0) == on).all(), f"mask by channel {(grad_bias != 0).tolist()}, output {on.tolist()}"


def _rounded_down_products(x, mean, scale):
    """Per channel, the position of a value whose (x - mean) * scale, x - mean rounded to x's
    dtype first as the kernels do, rounds down (the exact product is larger), and the rounded
    product. Exact arithmetic (Fraction): a fused multiply-add keeps what the rounding drops."""
    from fractions import Fraction

    picks = []
    for c in range(x.shape[1]):
        d = (x[:, c] - mean[c].to(x.dtype)).flatten()
        products = d * scale[c]
        for i in range(d.numel()):
            exact = Fraction(d[i].item()) * Fraction(scale[c].item())
            if exact > Fraction(products[i].item()):
                picks.append((i, products[i].item()))
                break
        else:
            raise AssertionError(f"channel {c}: no product rounds down")
    return picks


@pytest.mark.parametrize("backend,dtype", [p for p in RECOMPUTING if p.values[1] in (torch.float32, torch.float64)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_recomputed_mask_rounds_as_the_forward(backend, dtype, layout):
    """Biases that cancel a rounded-down product exactly: where the forward fuses (x - mean) *
    scale + bias into one multiply-add (cuda), its output is the tiny positive rest, and where
    it rounds the product first (cpu), 0. The recomputed mask must round as the forward did:
    an expression contracted differently in the forward and the backward fails here."""
    device = OP_DEVICE[backend]
    require(backend, device, dtype, "bn_backward")
    forward, backward = _ops(backend)
    C = 6
    x = make_input((3, C, 5, 4), dtype, device, layout)
    w = torch.rand(C, dtype=dtype, device=device) + 0.5
    _, mean, invstd = forward(x, w, None, None, None, None, 0.1, 1e-5, True)
    scale = w * invstd.to(dtype)  # the forward's: weight * invstd, rounded once
    picks = _rounded_down_products(x.cpu(), mean.cpu(), scale.cpu())
    bias = torch.tensor([-product for _, product in picks], dtype=dtype, device=device)
    y, mean2, invstd2 = forward(x, w, bias, None, None, None, 0.1, 1e-5, True)
    assert torch.equal(mean, mean2) and torch.equal(invstd, invstd2), "statistics do not depend on bias"
    g = torch.randn_like(x)
    mask = [True, True, True, False]
    read = backward(g, x, y, w, bias, mean, invstd, True, True, mask)
    recomputed = backward(g, x, None, w, bias, mean, invstd, True, True, mask)
    for name, a, r in zip(("grad_input", "grad_weight", "grad_bias"), read, recomputed):
        assert torch.equal(a, r), f"{name}: the recomputed mask differs from the output's"


@pytest.mark.parametrize("backend,dtype", REFUSING)
def test_backends_that_read_the_mask_refuse_without_output(backend, dtype):
    device = OP_DEVICE[backend]
    require(backend, device, dtype, "bn_backward")
    forward, backward = _ops(backend)
    x = make_input((2, 3, 4, 5), dtype, device)
    w, b = _params(3, dtype, device)
    _, mean, invstd = forward(x, w, b, None, None, None, 0.1, 1e-5, True)
    with pytest.raises((RuntimeError, ValueError), match="reads the ReLU mask from output and cannot recompute it"):
        backward(torch.randn_like(x), x, None, w, b, mean, invstd, True, True, [True] * 4)


@pytest.mark.parametrize("backend", op_backend_params(OP_PREFIX))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)  # cuda: recomputes / reads
@pytest.mark.parametrize("residual,training", [(False, True), (True, True), (False, False)],
                         ids=["train", "train-residual", "eval"])
def test_autograd_keeps_the_output_only_for_the_mask(backend, dtype, residual, training):
    """The forward's output is saved for the backward only where the mask must come from it:
    a residual, eval statistics, or a backend that does not recompute it in this dtype. Not
    saved, it can change in place (torchvision's `out += identity`) and the gradients stay right."""
    import cnnkern

    device = OP_DEVICE[backend]
    require(backend, device, dtype)
    x = make_input((2, 3, 5, 4), dtype, device).requires_grad_()
    w, b = _params(3, dtype, device)
    r = torch.randn_like(x) if residual else None
    pd = param_dtype(dtype)
    rm, rv = torch.zeros(3, device=device, dtype=pd), torch.ones(3, device=device, dtype=pd)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = cnnkern.functional.batch_norm(x, rm, rv, w, b, training, residual=r, activation="relu", backend=backend)
    keeps = residual or not training or dtype not in RECOMPUTES_RELU_MASK[backend]
    assert any(t.data_ptr() == y.data_ptr() for t in saved) == keeps
    g = torch.randn_like(y)
    expected = torch.autograd.grad(y, x, g, retain_graph=True)[0]
    if not keeps:
        y.add_(1.0)  # would trip autograd's version check on a saved output
        assert torch.equal(torch.autograd.grad(y, x, g)[0], expected)
