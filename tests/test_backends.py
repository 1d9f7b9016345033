"""The backends this machine must run do run (so no test skips by accident), and
automatic selection never lands on a slow one."""
import importlib
import importlib.machinery
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import cnnkern
from cnnkern.backends import NAMES, refuses, select
from cnnkern.layout import kernel_layout, try_view3d, view_layout
from helpers import cpu_converts_in_registers, cpu_rounds_bfloat16_natively, require


def test_cpu_backend_is_built():
    info = cnnkern.backends()
    assert info["cpu"].available, info["cpu"].reason
    assert info["reference"].available


def test_cpu_loops_named():
    """backends() names the loops the CPU kernels take here: those the CPU's features allow, less
    those the CNNKERN_CPU_* variables switch off (a subprocess switches AVX512-BF16 off)."""
    require("cpu", "cpu", torch.float32)
    reason = cnnkern.backends()["cpu"].reason
    assert ("convert in registers" in reason) == cpu_converts_in_registers(), reason
    assert ("AVX512-BF16" in reason) == cpu_rounds_bfloat16_natively(), reason
    code = "import cnnkern; print(cnnkern.backends()['cpu'].reason)"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, CNNKERN_CPU_AVX512_BF16="0")).stdout
    assert "AVX512-BF16" not in off and off.startswith("runs cpu tensors"), off


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


def _run_without(module: str, code: str) -> str:
    """Runs `code` in a fresh interpreter where `import <module>` fails."""
    blocker = f"import sys; sys.modules[{module!r}] = None\n"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CNNKERN_BACKEND")}
    result = subprocess.run([sys.executable, "-c", blocker + code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_imports_and_runs_without_triton():
    """triton is optional: cnnkern imports, says why the triton backend is off, and the
    C++ backend still runs."""
    out = _run_without("triton", textwrap.dedent("""
        import torch, cnnkern
        print(cnnkern.backends()["triton"])
        x = torch.randn(2, 3, 4, 4)
        y = cnnkern.functional.batch_norm(x, None, None, training=True, activation="relu")
        print(torch.allclose(y, torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True)), atol=1e-5))
        """))
    assert "triton     no   triton is not installed" in out
    assert out.strip().endswith("True")


def test_imports_without_the_extension():
    """An unbuilt extension leaves the pure-PyTorch reference working and every other
    backend saying why it cannot run."""
    out = _run_without("cnnkern._C", textwrap.dedent("""
        import torch, cnnkern
        for info in cnnkern.backends().values():
            print(info)
        x = torch.randn(2, 3, 4, 4)
        y = cnnkern.functional.batch_norm(x, None, None, training=True, backend="reference")
        print(torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5))
        """))
    assert "cpu        no   cnnkern._C is not built; build it with `pip install" in out
    assert "reference  yes" in out
    assert out.strip().endswith("True")


def test_an_extension_that_does_not_load_says_so(tmp_path):
    """A _C that is there but fails to load (built against another torch, say) is reported
    as such, with the loader's message, not as missing."""
    package = tmp_path / "cnnkern"
    shutil.copytree(pathlib.Path(cnnkern.__file__).parent, package,
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    (package / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not a shared object")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CNNKERN_BACKEND")}
    code = "import cnnkern; print(cnnkern.backends()['cpu'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "cpu        no   cnnkern._C is built but did not load (" in result.stdout
    assert "rebuild it with `pip install --no-build-isolation -e .`" in result.stdout


def test_automatic_choice_follows_the_layout(monkeypatch):
    """On CUDA, NCHW inputs go to the cuda kernels first, channels_last ones to triton's
    (bench/results: the H200 run). Both are made to accept the call here, so the order shows."""
    b = importlib.import_module("cnnkern.backends")  # the module: cnnkern.backends is also a function
    monkeypatch.setattr(b, "_REFUSES", {**b._REFUSES, "cuda": lambda *_: None, "triton": lambda *_: None})
    b._select.cache_clear()
    try:
        x = torch.randn(2, 8, 5, 5)
        cuda = torch.device("cuda")
        assert select(None, cuda, torch.bfloat16, "bn_forward_train", kernel_layout(x)) == "cuda"
        x_cl = x.contiguous(memory_format=torch.channels_last)
        assert select(None, cuda, torch.bfloat16, "bn_forward_train", kernel_layout(x_cl)) == "triton"
    finally:
        b._select.cache_clear()


@pytest.mark.parametrize("shape,memory_format,expected", [
    ((2, 8, 5, 5), torch.contiguous_format, "nchw"),
    ((2, 8, 5, 5), torch.channels_last, "channels_last"),
    ((2, 1, 5, 5), torch.channels_last, "nchw"),  # one channel: lanes along positions
    ((2, 8, 1, 1), torch.channels_last, "nchw"),  # one position per channel
])
def test_kernel_layout(shape, memory_format, expected):
    assert kernel_layout(torch.randn(shape).contiguous(memory_format=memory_format)) == expected


def _strided_tensors():
    """Dense, sliced, permuted, broadcast and size-1 tensors of 2 to 5 dims."""
    x = torch.randn(3, 6, 5, 4)
    cl = x.contiguous(memory_format=torch.channels_last)
    yield from (x, cl, x[:, 1:4], cl[:, 1:4], x[:, :, ::2], cl[:, :, :, ::2], x[:, :, 1:3], x.transpose(2, 3),
                x[:1], cl[:, :1], x[:, :, :1, :1], cl[:, :, :1], x.flatten(2), x.flatten(2).transpose(1, 2)[:, :2],
                x[:, :, 0], x[:, :, 0, 0], torch.randn(6, 1).expand(6, 8), torch.randn(1, 6, 1, 1).expand(2, 6, 3, 3),
                torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d),
                torch.randn(2, 3, 4, 5, 6)[:, :, ::2], torch.randn(2, 4, 1, 5).contiguous(memory_format=torch.channels_last))


def test_kernel_layout_agrees_with_the_strides():
    """The dense tensors' shortcut answers what walking the strides does (None: no (N, C, L) view)."""
    for t in _strided_tensors():
        v = try_view3d(t)
        assert kernel_layout(t) == (None if v is None else view_layout(v)), (tuple(t.shape), t.stride())
    assert kernel_layout(torch.randn(3, 6, 5, 4)[:, :, ::2]) is None
