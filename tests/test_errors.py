"""Bad input gets a clear error naming the problem; an explicit backend that
cannot run a call raises its reason."""
import pytest
import torch

import cnnkern
from cnnkern.backends import BackendError, refuses
from helpers import backend_params, require

F = cnnkern.functional


def _stats(C=3, dtype=torch.float32, device="cpu"):
    return torch.zeros(C, dtype=dtype, device=device), torch.ones(C, dtype=dtype, device=device)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(3,\)"),
        (dict(running_mean=torch.zeros(2)), ValueError, r"running_mean must have shape \(3,\)"),
        (dict(residual=torch.randn(2, 3, 4, 5)), ValueError, "residual must have input's shape"),
        (dict(residual=torch.randn(2, 3, 4, 4, dtype=torch.float64)), TypeError, "residual must be torch.float32"),
        (dict(residual=torch.randn(2, 3, 4, 4, device="meta")), ValueError, "residual is on meta"),
        (dict(bias=torch.zeros(3, device="meta")), ValueError, "bias is on meta"),
        (dict(weight=torch.ones(3, dtype=torch.float64)), TypeError, "weight must be torch.float32"),
        (dict(activation="gelu"), ValueError, "activation must be one of"),
        (dict(training=False, running_mean=None), ValueError, "running_mean and running_var are required"),
        (dict(weight=torch.ones(6)[::2]), ValueError, "weight must be contiguous"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    rm, rv = _stats()
    args = dict(running_mean=rm, running_var=rv, training=True)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        F.batch_norm(torch.randn(2, 3, 4, 4), **args)


def test_integer_input():
    with pytest.raises(TypeError, match="input must be float16, bfloat16, float32 or float64, got torch.int64"):
        F.batch_norm(torch.ones(2, 3, 4, 4, dtype=torch.long), *_stats())


def test_one_value_per_channel_when_training():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        F.batch_norm(torch.randn(1, 3, 1, 1), *_stats(), training=True)
    F.batch_norm(torch.randn(1, 3, 1, 1), *_stats(), training=False)  # fine in eval


def test_module_rank():
    with pytest.raises(ValueError, match="expected 4D input"):
        cnnkern.nn.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        cnnkern.nn.BatchNorm1d(3)(torch.randn(2, 3, 4, 4))


def test_explicit_backend_that_cannot_run_raises():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(BackendError, match="backend 'cuda' cannot run .* got a cpu tensor"):
        F.batch_norm(x, *_stats(), training=True, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        F.batch_norm(x, *_stats(), training=True, backend="cudnn")


def test_environment_variable_picks_the_backend(monkeypatch):
    monkeypatch.setenv("CNNKERN_BACKEND", "cuda")
    with pytest.raises(BackendError, match="backend 'cuda'"):
        F.batch_norm(torch.randn(2, 3, 4, 4), *_stats(), training=True)


def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = refuses("triton", torch.device("cpu"), torch.float32, "bn_forward_train")
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def test_ops_check_their_arguments():
    """Direct torch.ops.cnnkern calls are guarded too (TORCH_CHECK naming the argument)."""
    assert refuses("cpu", torch.device("cpu"), torch.float32, "bn_forward_train") is None
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.cnnkern.bn_forward_eval(x, torch.ones(4), None, None, *_stats(), 1e-5, False)
    with pytest.raises(RuntimeError, match="spatial dims must collapse"):
        torch.ops.cnnkern.bn_forward_eval(x[:, :, ::2], None, None, None, *_stats(), 1e-5, False)


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "triton", "cuda")))
def test_second_derivatives_raise(backend, device):
    """The backward has no derivative: differentiating it again (a gradient penalty) raises, rather
    than counting bn_backward as a constant and returning wrong second derivatives."""
    require(backend, device, torch.float64)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, device=device, requires_grad=True)
    y = F.batch_norm(x, None, None, w, None, True, activation="relu", backend=backend)
    grad_x, = torch.autograd.grad(y, x, torch.randn_like(y), create_graph=True)
    penalty = grad_x.pow(2).sum() + x.sum()  # x.sum(): x is reached either way
    with pytest.raises(RuntimeError, match="derivative for cnnkern::(triton_)?bn_backward is not implemented"):
        torch.autograd.grad(penalty, (x, w))


@pytest.mark.parametrize("op", ["bn_forward_train", "triton_bn_forward_train"])
def test_kernel_ops_have_no_derivative(op):
    """The kernel ops, called directly, are not differentiable: backward through one raises."""
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y, _, _ = getattr(torch.ops.cnnkern, op)(x, None, None, None, None, None, 0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match=f"derivative for cnnkern::{op} is not implemented"):
        y.sum().backward()
