"""gradcheck in float64 of the fused batch norm (with residual and ReLU) on each
backend that runs here, through the public functional API."""
import pytest
import torch

import cnnkern
from helpers import backend_params, make_input, require


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "triton", "cuda")))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_gradcheck(backend, device, layout, training, activation):
    require(backend, device, torch.float64)
    x = make_input((2, 3, 3, 4), torch.float64, device, layout).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    r = torch.randn(x.shape, dtype=torch.float64, device=device, requires_grad=True)
    # Running stats are read in eval and not passed in training: gradcheck calls the
    # function many times, and each training call would move them.
    rm = torch.randn(3, dtype=torch.float64, device=device) if not training else None
    rv = torch.rand(3, dtype=torch.float64, device=device) + 0.5 if not training else None

    def fn(x, w, b, r):
        return cnnkern.functional.batch_norm(x, rm, rv, w, b, training, residual=r, activation=activation,
                                             backend=backend)

    # The interpreter runs each kernel ~1000x slower: there, fast mode (gradients
    # checked along random directions rather than column by column).
    fast = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(fn, (x, w, b, r), eps=1e-6, atol=1e-7, fast_mode=fast)
