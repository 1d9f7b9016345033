"""The backends this machine must run do run (so no test skips by accident), and
automatic selection never lands on a slow one."""
import torch

import cnnkern
from cnnkern.backends import NAMES, refuses, select


def test_cpu_backend_is_built():
    info = cnnkern.backends()
    assert info["cpu"].available, info["cpu"].reason
    assert info["reference"].available


def test_triton_runs_here():
    """Triton is a test dependency: on a GPU machine it runs CUDA tensors, on a CPU
    one it runs under the interpreter that conftest.py switches on."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert refuses("triton", torch.device(device), torch.float32, "bn_forward_train") is None


def test_cuda_backend_is_built_where_a_gpu_is():
    if torch.cuda.is_available():
        assert cnnkern.backends()["cuda"].available, cnnkern.backends()["cuda"].reason


def test_automatic_choice():
    assert select(None, torch.device("cpu"), torch.float32, "bn_forward_train") == "cpu"
    if torch.cuda.is_available():
        assert select(None, torch.device("cuda"), torch.bfloat16, "bn_forward_train") in ("cuda", "triton")


def test_backends_report_reads_well():
    text = "\n".join(str(i) for i in cnnkern.backends().values())
    assert all(name in text for name in NAMES)


def test_explain_names_every_backend_and_the_choice():
    text = cnnkern.explain(torch.randn(2, 3, 4, 4))
    assert all(name in text for name in NAMES)
    assert "automatic: cpu" in text
    assert "cuda       cannot:" in text
