"""Every csrc/cuda/*.cu compiles with plain nvcc (no torch headers) for sm_80 and
sm_90, without a warning and without spilling registers, so CUDA sources are
checked on machines with no GPU."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(source, tmp_path):
    cmd = ["nvcc", "-std=c++17", "-O3", "-c", str(source), "-o", str(tmp_path / "out.o"), "-I", str(ROOT / "csrc"),
           "-Werror", "all-warnings", "-Xptxas=--warn-on-spills,--warning-as-error",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/*.cu not found"
