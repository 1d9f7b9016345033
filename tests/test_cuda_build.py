"""Every csrc/cuda/*.cu compiles with plain nvcc (no torch headers) for sm_80 and
sm_90, without a warning and without spilling registers, so CUDA sources are
checked on machines with no GPU; and the PTX keeps what nvcc once did not: a loop, whole stores.
The torch side of the CUDA backend (bindings.cpp) compiles against the installed torch too."""
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = (80, 90)
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
# One nvcc run per source serves every test here (about two minutes for batch_norm.cu on 2 cores):
# the group keeps them on one pytest-xdist worker (scripts/test.sh runs --dist loadgroup).
pytestmark = pytest.mark.xdist_group("nvcc")


@pytest.fixture(scope="module")
def nvcc(tmp_path_factory):
    """nvcc(source) -> (result, folder): source compiled for every arch of ARCHS, once, with
    nvcc's intermediates (the PTX among them: <stem>.compute_<arch>.ptx) kept in folder."""
    runs = {}

    def compile_once(source: pathlib.Path):
        if source not in runs:
            folder = tmp_path_factory.mktemp(source.stem)
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
            cmd = ["nvcc", "-std=c++17", "-O3", "-c", str(source), "-o", str(folder / "out.o"),
                   "-I", str(ROOT / "csrc"), "-Werror", "all-warnings",
                   "-Xptxas=--warn-on-spills,--warning-as-error", "-keep", "--keep-dir", str(folder), *gencode]
            runs[source] = subprocess.run(cmd, capture_output=True, text=True), folder
        return runs[source]

    return compile_once


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(nvcc, source):
    result, _ = nvcc(source)
    assert result.returncode == 0, result.stderr


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/*.cu not found"


# Kernels whose step loop (for_each_step) runs over several n per thread: along C, unvectorized
# (N does not merge into L when another tensor has another layout). Mangled-name fragments.
NESTED_STEP_LOOPS = ("bn_stats_kernelIdLb1ELi1E", "bn_forward_kernelIddLb1ELi1ELb0E",
                     "bn_forward_kernelIddLb1ELi1ELb1E", "bn_grad_sums_kernelIdLb1ELi1ELb0E",
                     "bn_grad_sums_kernelIdLb1ELi1ELb1E", "bn_backward_kernelIddLb1ELi1ELb0E",
                     "bn_backward_kernelIddLb1ELi1ELb1E")


def loop_depth(ptx_body: str) -> int:
    """The deepest nesting of loops in one PTX function: each backward branch is a loop from its
    target label to itself."""
    labels, loops = {}, []
    for line_no, line in enumerate(ptx_body.splitlines()):
        if m := re.match(r"^(\$L__\w+):", line):
            labels[m.group(1)] = line_no
        elif (m := re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)) and m.group(1) in labels:
            loops.append((labels[m.group(1)], line_no))
    return max((sum(a <= b0 and b1 <= c for a, c in loops) for b0, b1 in loops), default=0)


@needs_nvcc
def test_step_loops_stay_nested(nvcc):
    """nvcc 13.0 once compiled for_each_step's loop over n into a single pass when its step was a
    compile-time 1 (along C): only the first n of each thread was read and written, on the GPU
    alone (the CPU emulator compiles with g++). The PTX of those kernels must keep two loops."""
    result, folder = nvcc(ROOT / "csrc" / "cuda" / "batch_norm.cu")
    assert result.returncode == 0, result.stderr
    ptx = folder / "batch_norm.compute_90.ptx"
    functions = re.split(r"^\.visible \.entry ", ptx.read_text(), flags=re.M)[1:]
    for fragment in NESTED_STEP_LOOPS:
        bodies = [f for f in functions if fragment in f.split("(", 1)[0]]
        assert len(bodies) == 1, f"{fragment}: expected one kernel, found {len(bodies)}"
        assert loop_depth(bodies[0]) >= 2, f"{fragment}: the loop over n is gone from the PTX"


# Kernels that read (N, C, L) tensors, all but the stats kernel writing some too: element type
# (mangled) and VEC, from the mangled name.
TENSOR_KERNELS = re.compile(r"bn_(stats|forward|grad_sums|backward)(?:_resident)?_kernelI"
                            r"(6__half|13__nv_bfloat16|f|d)\w*?Lb[01]ELi(\d+)E")
ELEMENT_BYTES = {"6__half": 2, "13__nv_bfloat16": 2, "f": 4, "d": 8}


@needs_nvcc
def test_tensor_accesses_are_whole(nvcc):
    """Each 16-byte item a thread reads or writes is one plain ld.global.v4.u32 / st.global.v4.u32
    (load_word, store_word): nvcc 13.0 stored a Vec assigned as a struct element by element (8
    stores of 2 bytes for 8 bf16), and a uint4 made of its bytes as 4 st.global.v2.u16; the
    intrinsics that stay whole (__ldca, __stwb) are strong accesses in SASS. So every vector
    access of these kernels is a plain 16-byte one, and each kernel has them."""
    result, folder = nvcc(ROOT / "csrc" / "cuda" / "batch_norm.cu")
    assert result.returncode == 0, result.stderr
    ptx = (folder / "batch_norm.compute_90.ptx").read_text()
    checked = 0
    for function in re.split(r"^\.visible \.entry ", ptx, flags=re.M)[1:]:
        name = function.split("(", 1)[0]
        match = TENSOR_KERNELS.search(name)
        if not match or ELEMENT_BYTES[match.group(2)] * int(match.group(3)) != 16:
            continue
        vector_accesses = set(re.findall(r"\b((?:ld|st)\.global\S*\.v\d\.\w+)", function))
        whole = {"ld.global.v4.u32"} if match.group(1) == "stats" else {"ld.global.v4.u32", "st.global.v4.u32"}
        assert vector_accesses == whole, f"{name}: {sorted(vector_accesses)}"
        checked += 1
    assert checked >= 40, f"found {checked} kernels with 16-byte items"


def _nvcc_include_flags():
    """The CUDA toolkit's include flags, as nvcc itself passes them (INCLUDES and SYSTEM_INCLUDES of
    its dry run): wherever the toolkit lives, whatever wraps nvcc on PATH."""
    dry = subprocess.run(["nvcc", "--dryrun", "-x", "cu", "-c", "/dev/null", "-o", "/dev/null"],
                         capture_output=True, text=True)
    flags = []
    for name in ("INCLUDES", "SYSTEM_INCLUDES"):
        m = re.search(rf'^#\$ {name}=(.*)$', dry.stderr, re.MULTILINE)
        if m:
            flags += re.findall(r'"([^"]*)"', m.group(1))
    return flags


@needs_nvcc
def test_bindings_compile_against_torch(tmp_path):
    """csrc/cuda/bindings.cpp, the CUDA backend's torch side (checks, guards, streams, dispatch,
    registration), compiles against this torch's headers: syntax and types only, since nothing
    links or runs without a GPU. The op signatures it registers are static_asserted there. A
    CPU build of torch ships c10/cuda's headers but not the one its CMake generates, which
    only sets build macros: an empty one stands in."""
    from torch.utils import cpp_extension

    generated = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    generated.parent.mkdir(parents=True)
    generated.write_text("")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-DCNNKERN_WITH_CUDA", "-I", str(ROOT / "csrc"),
           *(f"-I{p}" for p in cpp_extension.include_paths()), "-I", str(tmp_path), *_nvcc_include_flags(),
           str(ROOT / "csrc" / "cuda" / "bindings.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 0, "\n".join(errors[:20]) or result.stderr[-4000:]
