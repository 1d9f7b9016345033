"""torch.library.opcheck on every registered op (schema, fake impl, autograd
registration, AOT dispatch), for the C++ ops and their triton_ twins."""
import pytest
import torch

from cnnkern.ops.batch_norm import RECOMPUTES_RELU_MASK
from helpers import OP_DEVICE, OP_PREFIX, make_input, op_backend_params, require


def _args(device, dtype, relu):
    x = make_input((2, 5, 4, 3), dtype, device, "channels_last")
    pd = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w, b = torch.rand(5, dtype=pd, device=device) + 0.5, torch.randn(5, dtype=pd, device=device)
    rm, rv = torch.randn(5, dtype=pd, device=device), torch.rand(5, dtype=pd, device=device) + 0.5
    r = torch.randn(x.shape, dtype=dtype, device=device)
    return x, w, b, r, rm, rv


@pytest.mark.parametrize("backend", op_backend_params())
@pytest.mark.parametrize("relu", [True, False])
def test_opcheck(backend, relu):
    device = OP_DEVICE[backend]
    require(backend, device, torch.float32)
    ops = torch.ops.cnnkern
    prefix = OP_PREFIX[backend]
    x, w, b, r, rm, rv = _args(device, torch.float32, relu)
    fwd_train = getattr(ops, prefix + "bn_forward_train")
    fwd_eval = getattr(ops, prefix + "bn_forward_eval")
    bwd = getattr(ops, prefix + "bn_backward")
    torch.library.opcheck(fwd_train, (x, w, b, r, rm, rv, 0.1, 1e-5, relu))
    torch.library.opcheck(fwd_train, (x, None, None, None, None, None, 0.1, 1e-5, relu))
    torch.library.opcheck(fwd_eval, (x, w, b, r, rm, rv, 1e-5, relu))
    out, mean, invstd = fwd_train(x, w, b, r, None, None, 0.1, 1e-5, relu)
    g = torch.randn_like(x)
    for training in (True, False):
        torch.library.opcheck(bwd, (g, x, out if relu else None, w, b, mean, invstd, training, relu,
                                    [True, True, True, relu]))
    torch.library.opcheck(bwd, (g, x, out if relu else None, None, None, mean, invstd, True, relu,
                                [True, False, True, False]))


@pytest.mark.parametrize("backend", op_backend_params())
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_batch_norm(backend, relu, training):
    """The differentiable entry point (csrc/autograd/batch_norm.cpp), with and without a residual,
    keeping the output for the ReLU mask or not."""
    device = OP_DEVICE[backend]
    require(backend, device, torch.float32)
    batch_norm = getattr(torch.ops.cnnkern, OP_PREFIX[backend] + "batch_norm")
    x, w, b, r, rm, rv = _args(device, torch.float32, relu)
    x, w, b, r = (t.requires_grad_() for t in (x, w, b, r))
    recomputes = torch.float32 in RECOMPUTES_RELU_MASK[backend]
    torch.library.opcheck(batch_norm, (x, w, b, r, rm, rv, training, 0.1, 1e-5, relu, False))
    torch.library.opcheck(batch_norm, (x, w, b, None, rm, rv, training, 0.1, 1e-5, relu, recomputes))
    torch.library.opcheck(batch_norm, (x, None, None, None, rm, rv, training, 0.1, 1e-5, relu, recomputes))
