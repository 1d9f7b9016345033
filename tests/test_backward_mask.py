"""bn_backward's ReLU mask recomputed from the input (output None) against the mask read
from the forward's output: the same gradients bit for bit, on every backend that recomputes
it (RECOMPUTES_RELU_MASK), every dtype and layout, and the same decision where the forward's
output rounds a tiny positive value to 0. Backends that read the mask refuse output None."""
import math

import pytest
import torch

from cnnkern.ops.batch_norm import RECOMPUTES_RELU_MASK
from helpers import OP_DEVICE, OP_PREFIX, make_input, op_backend_params, param_dtype, require

RECOMPUTING = op_backend_params([b for b in OP_PREFIX if RECOMPUTES_RELU_MASK[b]])
REFUSING = op_backend_params([b for b in OP_PREFIX if not RECOMPUTES_RELU_MASK[b]])
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
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


@pytest.mark.parametrize("backend", RECOMPUTING)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
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


@pytest.mark.parametrize("backend", RECOMPUTING)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
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


@pytest.mark.parametrize("backend", REFUSING)
def test_backends_that_read_the_mask_refuse_without_output(backend):
    device = OP_DEVICE[backend]
    require(backend, device, torch.float32, "bn_backward")
    forward, backward = _ops(backend)
    x = make_input((2, 3, 4, 5), torch.float32, device)
    w, b = _params(3, torch.float32, device)
    _, mean, invstd = forward(x, w, b, None, None, None, 0.1, 1e-5, True)
    with pytest.raises((RuntimeError, ValueError), match="reads the ReLU mask from output and cannot recompute it"):
        backward(torch.randn_like(x), x, None, w, b, mean, invstd, True, True, [True] * 4)


@pytest.mark.parametrize("backend", op_backend_params(OP_PREFIX))
@pytest.mark.parametrize("residual,training", [(False, True), (True, True), (False, False)],
                         ids=["train", "train-residual", "eval"])
def test_autograd_keeps_the_output_only_for_the_mask(backend, residual, training):
    """The forward's output is saved for the backward only where the mask must come from it:
    a residual, eval statistics, or a backend that does not recompute it. Not saved, it can
    change in place (torchvision's `out += identity`) and the gradients stay right."""
    import cnnkern

    device = OP_DEVICE[backend]
    require(backend, device, torch.float32)
    x = make_input((2, 3, 5, 4), torch.float32, device).requires_grad_()
    w, b = _params(3, torch.float32, device)
    r = torch.randn_like(x) if residual else None
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = cnnkern.functional.batch_norm(x, rm, rv, w, b, training, residual=r, activation="relu", backend=backend)
    keeps = residual or not training or not RECOMPUTES_RELU_MASK[backend]
    assert any(t.data_ptr() == y.data_ptr() for t in saved) == keeps
    g = torch.randn_like(y)
    expected = torch.autograd.grad(y, x, g, retain_graph=True)[0]
    if not keeps:
        y.add_(1.0)  # would trip autograd's version check on a saved output
        assert torch.equal(torch.autograd.grad(y, x, g)[0], expected)
