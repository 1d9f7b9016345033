"""scripts/gpu_check.sh's use of a build carried to the GPU machine (.prebuilt, made by
scripts/prebuild_cuda.sh; scripts/carried_build.sh decides), which only a GPU machine runs: its
refusals, on copies of this tree. (That it takes a fitting build needs one with CUDA kernels
loading on a GPU.)"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tree(tmp_path):
    """A copy of what gpu_check.sh's build stage reads, with this machine's build of cnnkern._C."""
    tree = tmp_path / "tree"
    for name in ("csrc", "cnnkern", "scripts"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.py", tree)
    return tree


def bash(tree, script, arch="9.0"):
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(["bash", "-c", f"source scripts/carried_build.sh; {script}"], cwd=tree, env=env,
                          capture_output=True, text=True)


def prebuild(tree, sources=None, torch_version=torch.__version__, arch="9.0"):
    """.prebuilt as scripts/prebuild_cuda.sh leaves it, of this machine's build (no CUDA kernels)."""
    sources = sources or bash(tree, "sources_digest .").stdout.strip()
    (tree / ".prebuilt").mkdir()
    shutil.copy(next((ROOT / "cnnkern").glob("_C*.so")), tree / ".prebuilt")
    (tree / ".prebuilt" / "built.txt").write_text(f"sources {sources}\ntorch {torch_version}\ncommit x\narch {arch}\n")


def fits(tree):
    result = bash(tree, 'carried_build_fits "$PWD"')
    return result.returncode == 0, result.stdout.strip()


def test_sources_digest_follows_the_sources(tree):
    first = bash(tree, "sources_digest .").stdout.strip()
    assert len(first) == 64 and bash(tree, "sources_digest .").stdout.strip() == first
    (tree / "cnnkern" / "new.py").write_text("")  # not a source of the build
    assert bash(tree, "sources_digest .").stdout.strip() == first
    with open(tree / "csrc" / "ops.cpp", "a") as f:
        f.write("\n")
    assert bash(tree, "sources_digest .").stdout.strip() != first


def test_no_carried_build(tree):
    assert fits(tree) == (False, "")


def test_carried_build_without_cuda_kernels(tree):
    """Everything recorded fits, but the build has no CUDA kernels (this machine's): refused
    with cnnkern.backends()' reason."""
    prebuild(tree)
    ok, said = fits(tree)
    assert not ok and said.startswith("cnnkern: not the carried build (.prebuilt): cnnkern._C was built without")


def test_carried_build_of_other_sources_torch_and_gpu(tree):
    prebuild(tree, sources="0" * 64, torch_version="2.11.0+cu130", arch="8.0")
    assert fits(tree) == (False, "cnnkern: not the carried build (.prebuilt): built from other sources; "
                                 "built against torch 2.11.0+cu130; built for 8.0, not 9.0")


def test_carried_build_that_does_not_load(tree):
    """One that the dynamic loader refuses: refused with cnnkern.backends()' reason, which names it."""
    prebuild(tree)
    (tree / ".prebuilt" / next((ROOT / "cnnkern").glob("_C*.so")).name).write_bytes(b"not a shared object")
    ok, said = fits(tree)
    assert not ok and said.startswith("cnnkern: not the carried build (.prebuilt): cnnkern._C is built but did not "
                                      "load (") and "file too short" in said
