"""cnnkern.nn.BatchNorm1d/2d as drop-ins for torch.nn's: state_dict, several
training steps with momentum 0.1 and None, eval, torch.compile, torch.export, CUDA graphs."""
import copy

import pytest
import torch

import cnnkern
from helpers import backend_params, make_input, require


def _pair(cls_ours, cls_torch, C, backend, device, **kw):
    ours = cls_ours(C, backend=backend, device=device, **kw)
    theirs = cls_torch(C, device=device, **{k: v for k, v in kw.items() if k != "activation"})
    with torch.no_grad():  # non-trivial affine parameters
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_steps_follow_torch(backend, device, momentum, layout):
    """Three SGD steps of BN(+add+relu) then eval: outputs, gradients, running
    stats and num_batches_tracked follow torch.nn.BatchNorm2d + add + relu."""
    require(backend, device, torch.float64)
    ours, theirs = _pair(cnnkern.nn.BatchNorm2d, torch.nn.BatchNorm2d, 6, backend, device, momentum=momentum,
                         activation="relu", dtype=torch.float64)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    for step in range(4):
        training = step < 3
        ours.train(training), theirs.train(training)
        x = make_input((3, 6, 5, 5), torch.float64, device, layout)
        r = torch.randn_like(x)
        y_ours = ours(x, r)
        y_theirs = torch.relu(theirs(x) + r)
        torch.testing.assert_close(y_ours, y_theirs, rtol=1e-9, atol=1e-9)
        if training:
            for opt, y in ((opt_ours, y_ours), (opt_theirs, y_theirs)):
                opt.zero_grad()
                (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=device).view_as(y)).sum().backward()
                opt.step()
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-9, atol=1e-9)
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-9, atol=1e-9, msg=key)
    assert ours.num_batches_tracked.item() == 3


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("track_running_stats", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_1d_module_options(backend, device, track_running_stats, affine):
    require(backend, device, torch.float64)
    kw = dict(affine=affine, track_running_stats=track_running_stats, device=device, dtype=torch.float64)
    ours, theirs = cnnkern.nn.BatchNorm1d(7, backend=backend, **kw), torch.nn.BatchNorm1d(7, **kw)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for training in (True, False):
        ours.train(training), theirs.train(training)
        for shape in ((4, 7), (4, 7, 9)):
            x = torch.randn(shape, device=device, dtype=torch.float64)
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-9, atol=1e-9)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-9, atol=1e-9, msg=key)


def test_module_is_a_torch_batchnorm():
    m = cnnkern.nn.BatchNorm2d(4, activation="relu")
    assert isinstance(m, torch.nn.BatchNorm2d)
    assert "activation='relu'" in repr(m)


class _Block(torch.nn.Module):
    """conv + fused BN + add + ReLU, on `backend`: what the compile and export tests trace."""

    def __init__(self, backend):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = cnnkern.nn.BatchNorm2d(4, activation="relu", backend=backend)

    def forward(self, x):
        return self.bn(self.conv(x), residual=x)


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "triton", "cuda")))
def test_compile_fullgraph(backend, device):
    """torch.compile(fullgraph=True) over conv + fused BN + add + ReLU: no graph
    break, same outputs, gradients and running stats as eager."""
    require(backend, device, torch.float32)

    eager = _Block(backend).to(device)
    compiled_model = _Block(backend).to(device)
    compiled_model.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(2, 4, 6, 6, device=device)
    for model in (eager, compiled):
        model(x).square().sum().backward()
    torch.testing.assert_close(compiled(x), eager(x))
    torch.testing.assert_close(compiled_model.conv.weight.grad, eager.conv.weight.grad)
    torch.testing.assert_close(compiled_model.bn.weight.grad, eager.bn.weight.grad)
    torch.testing.assert_close(compiled_model.bn.running_var, eager.bn.running_var)


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "triton", "cuda")))
@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export(backend, device, strict, training):
    """torch.export of conv + fused BN + add + ReLU: the program calls cnnkern's op, gives eager's
    outputs and, in training, updates the running stats and num_batches_tracked as eager does."""
    require(backend, device, torch.float32)

    eager = _Block(backend).to(device).train(training)
    with torch.no_grad():
        eager.bn.running_mean.normal_()
        eager.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 6, 6, device=device)
    program = torch.export.export(copy.deepcopy(eager), (x,), strict=strict)
    targets = [str(node.target) for gm in program.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
               for node in gm.graph.nodes]  # strict export nests the op in a higher-order op's graph
    assert any(target.startswith("cnnkern.") for target in targets), targets
    exported = program.module()
    for _ in range(2):
        torch.testing.assert_close(exported(x), eager(x))
    # In eval the program reads no num_batches_tracked, and strict export leaves it out.
    for name in ("running_mean", "running_var") + (("num_batches_tracked",) if training else ()):
        torch.testing.assert_close(getattr(exported.bn, name), getattr(eager.bn, name), msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(8, 32, 14, 14), (32, 256, 56, 56)], ids=["small", "larger-than-l2"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replays_training_steps(backend, shape):
    """A training step (forward + backward of BN + add + ReLU) captured once in a CUDA graph,
    as torch.compile(mode="reduce-overhead") does, then replayed on new inputs, gives what the
    same steps give eagerly: every launch goes to the capturing stream, and no call keeps
    host-side state that a replay would miss. The larger shape (103 MB) takes the cuda
    backend's one-pass kernels, cooperative launches, on GPUs of up to 100 MB of L2."""
    require(backend, "cuda", torch.float32)
    captured = cnnkern.nn.BatchNorm2d(shape[1], activation="relu", backend=backend, device="cuda")
    eager = copy.deepcopy(captured)
    r, g = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")

    def step(model, x):
        y = model(x, r)
        return (y, *torch.autograd.grad(y, (x, model.weight, model.bias), g))

    static_x = torch.randn(shape, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capturing stream: plans, compiled kernels, memory pools
        step(captured, static_x)
    torch.cuda.current_stream().wait_stream(side)
    step(eager, static_x.detach().clone().requires_grad_())  # the twin of the warm-up step
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(captured, static_x)
    for _ in range(2):
        x = torch.randn(shape, device="cuda")
        with torch.no_grad():
            static_x.copy_(x)
        graph.replay()
        want = step(eager, x.requires_grad_())
        for name, got, expected in zip(("output", "grad_input", "grad_weight", "grad_bias"), static_out, want):
            torch.testing.assert_close(got, expected, msg=name)
        for key, value in eager.state_dict().items():
            torch.testing.assert_close(captured.state_dict()[key], value, msg=key)
