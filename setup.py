"""Builds cnnkern._C: the op schemas and C++ CPU kernels always, the CUDA kernels
when this torch has CUDA and nvcc is found (or FORCE_CUDA=1).

Build with `pip install --no-build-isolation [-e] .` against the torch already
installed. Knobs: FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST (default "8.0;9.0"),
MAX_JOBS.
"""
import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _sources(*pattern):
    return glob.glob(os.path.join(ROOT, *pattern))


def _cuda_decision():
    """(build CUDA?, why) -- printed so a user sees what was built."""
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build (set FORCE_CUDA=1 to build anyway)"
    if cpp_extension.CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    ):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} has CUDA {torch.version.cuda} and nvcc is at {cpp_extension.CUDA_HOME}"


def _extension():
    with_cuda, why = _cuda_decision()
    sources = _rel(_sources("csrc", "*.cpp") + _sources("csrc", "autograd", "*.cpp") +
                   _sources("csrc", "cpu", "*.cpp"))
    # -g0: Python's flags ask for debug info, which costs a third of the compile time of the
    # template-heavy CPU kernels (the longest step of every build) and serves no user.
    # -fno-trapping-math: the kernels never trap on floating-point exceptions; with the default,
    # GCC vectorizes no loop that selects between floats before more arithmetic (the ReLU
    # before the float16 store's rounding: csrc/cpu/element_cast.h). It changes no result.
    # -ffp-contract=off: no multiply-add becomes an FMA where -march or a clone offers one, so
    # every build and clone rounds alike, and the backward's recomputed ReLU mask is the sign
    # of the forward's output bit for bit (csrc/cpu/bn_lines.h, `normalized`).
    cxx = ["-O3", "-g0", "-std=c++17", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off",
           "-DPy_LIMITED_API=0x03090000"]
    extra = {"cxx": cxx}
    kind = cpp_extension.CppExtension
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += _rel(_sources("csrc", "cuda", "*.cu") + _sources("csrc", "cuda", "*.cpp"))
        cxx.append("-DCNNKERN_WITH_CUDA")
        extra["nvcc"] = ["-O3", "-std=c++17", "-lineinfo"]
        kind = cpp_extension.CUDAExtension
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        print(f"cnnkern: building CPU + CUDA kernels ({why}; TORCH_CUDA_ARCH_LIST={arch_list})")
    else:
        print(f"cnnkern: building CPU kernels only: {why}")
    return kind(
        "cnnkern._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
