"""Builds and loads csrc/cuda's kernels under the CPU emulator of CUDA in tests/cuda_emu
(what it models: tests/cuda_emu/emulator.h), and swaps them in for the CPU kernels of the
cnnkern ops, so the whole stack above (functional, autograd, modules) runs the CUDA
kernels and the CUDA op wrappers on CPU tensors."""
import contextlib
import os
import pathlib
import platform
import re
import warnings

import torch
from torch.utils import cpp_extension

from cnnkern.ops.batch_norm import RECOMPUTES_RELU_MASK

ROOT = pathlib.Path(__file__).resolve().parent.parent
EMU = ROOT / "tests" / "cuda_emu"
BUILD = ROOT / "build" / "cuda_emu"
OPS = ("bn_forward_train", "bn_forward_eval", "bn_backward")

# `kernel<<<grid, block, shared_bytes, stream>>>(` -> `::cuda_emu::launch(grid, block, shared_bytes, stream, kernel, `
_LAUNCH = re.compile(r"(\b[A-Za-z_]\w*(?:<[^<>;]*>)?)<<<([^;]*?)>>>\(")
# `extern __shared__ __align__(16) T name[];` -> `T* const name = static_cast<T*>(::cuda_emu::dynamic_shared());`
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*)\s+(\w+)\[\];")


def unsupported_reason():
    """Why the emulator cannot run here, or None."""
    if platform.machine() != "x86_64" or os.name != "posix":
        return f"the emulator's fiber switch is x86-64 System V assembly; this is {platform.machine()} {os.name}"
    return None


def rewrite(source: str, name: str) -> str:
    """`source` as the emulator compiles it: every <<<>>> launch a call of cuda_emu::launch, every
    dynamic shared array a pointer to the block's buffer; lines keep their numbers."""
    rewritten, count = _LAUNCH.subn(r"::cuda_emu::launch(\2, \1, ", source)
    if count != source.count("<<<"):
        raise RuntimeError(f"{name}: rewrote {count} of {source.count('<<<')} kernel launches; "
                           "the emulator's rewrite needs `kernel<targs><<<grid, block, smem, stream>>>(args)`")
    rewritten, count = _DYNAMIC_SHARED.subn(r"\1* const \2 = static_cast<\1*>(::cuda_emu::dynamic_shared());",
                                            rewritten)
    arrays = len(re.findall(r"extern\s+__shared__", source))
    if count != arrays:
        raise RuntimeError(f"{name}: rewrote {count} of {arrays} dynamic shared arrays; the emulator's rewrite "
                           "needs `extern __shared__ [__align__(n)] T name[];`")
    return f'#line 1 "{name}"\n' + rewritten


def _write_if_changed(path: pathlib.Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return  # keeps ninja's timestamps: no rebuild
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: pytest-xdist workers may race here


def load():
    """The emulator module (built once per source change, by ninja)."""
    cuda = ROOT / "csrc" / "cuda"
    # Rewritten headers shadow csrc/cuda's (their include path comes first); sources compile as C++.
    (BUILD / "include" / "cuda").mkdir(parents=True, exist_ok=True)
    for cuh in sorted(cuda.glob("*.cuh")):
        _write_if_changed(BUILD / "include" / "cuda" / cuh.name, rewrite(cuh.read_text(), str(cuh.relative_to(ROOT))))
    (BUILD / "src").mkdir(parents=True, exist_ok=True)
    sources = [str(EMU / "emulator.cpp")]
    for cu in sorted(cuda.glob("*.cu")) + [EMU / "selftest.cu"]:
        out = BUILD / "src" / f"{cu.stem}_emulated.cpp"
        _write_if_changed(out, rewrite(cu.read_text(), str(cu.relative_to(ROOT))))
        sources.append(str(out))
    return cpp_extension.load(
        name="cnnkern_cuda_emu",
        sources=sources,
        # The stand-in CUDA headers first, among them include/cuda/word_access.cuh, which takes
        # the place of csrc/cuda's inline-PTX one; -fno-strict-aliasing: the kernels read T
        # arrays through vector structs, as CUDA allows and host C++ does not.
        extra_include_paths=[str(EMU / "include"), str(EMU), str(BUILD / "include"), str(ROOT / "csrc")],
        extra_cflags=["-O2", "-fno-strict-aliasing"],
        build_directory=str(BUILD),
        verbose=False,
    )


@contextlib.contextmanager
def cuda_kernels_on_cpu(module, sms: int = 132, seed: int = 0, **device):
    """Within the block, the cnnkern ops run csrc/cuda's kernels (emulated) for CPU tensors,
    on an emulated device of `sms` multiprocessors (other limits: `device`, as the module's
    use_device takes them), blocks in an order drawn from `seed`; autograd asks the cpu
    backend's backward what the cuda kernels do (RECOMPUTES_RELU_MASK)."""
    module.use_device(sms, **device)
    module.set_block_order_seed(seed)
    lib = torch.library.Library("cnnkern", "IMPL")
    recomputes = RECOMPUTES_RELU_MASK["cpu"]
    try:
        with warnings.catch_warnings():  # that a kernel is overridden is the point
            warnings.filterwarnings("ignore", "Warning only once for all operators")
            for op in OPS:
                lib.impl(op, getattr(module, op), "CPU")
        RECOMPUTES_RELU_MASK["cpu"] = RECOMPUTES_RELU_MASK["cuda"]
        yield module
    finally:
        RECOMPUTES_RELU_MASK["cpu"] = recomputes
        lib._destroy()
