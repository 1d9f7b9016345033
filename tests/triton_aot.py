"""Compiles, for a GPU that is not here, every Triton kernel launch that cnnkern's host
wrappers make, and reports each compiled kernel's registers, spills and shared memory.

    python tests/triton_aot.py --arch 90 [--arch 80]

The interpreter that runs the Triton tests on a CPU machine accepts programs the
compiler rejects (and never allocates registers), so this is what tells, without a GPU,
that the kernels build for sm_80/sm_90. The host wrappers run as usual on CPU tensors
(shapes, strides and data-pointer alignment as on a GPU: every specialization a real
call would get); only the launch is replaced by `JITFunction.run(warmup=True)`, which
compiles down to a cubin and launches nothing. The tensors' contents are never read.

Must run without TRITON_INTERPRET (the kernels must be JITFunctions): test_triton_aot.py
runs it in a subprocess. Prints a table of the compiled kernels, then "compiled N kernels: names".
"""
import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from functools import partial

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from cnnkern.triton import batch_norm as bn

# A100, H100 (sm_80 and sm_90 hold the same per SM): the host wrappers size their grids from this
SMS = {arch: bn._SM(count, registers=65536, threads=2048, shared=(164 if arch == 80 else 228) * 1024)
       for arch, count in ((80, 108), (90, 132))}


class CompileOnlyDriver:
    """What JITFunction.run asks of the driver, for a device that is not here."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return self.arch  # a key per arch: JITFunction caches its binder (and target) per device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)


def _resources(cubin: bytes):
    """(registers, stack bytes, static shared bytes) of a cubin's one kernel, from cuobjdump.
    Stack holds register spills, and fp64 division / sqrt's slow-path calls."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack, shared, local = map(int, re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out).groups())
    return regs, stack + local, shared


def _registers(kernel) -> int:
    return _resources(kernel.asm["cubin"])[0]


def _resident(kernel, sm) -> int:
    return bn.resident_programs(_registers(kernel), kernel.metadata.shared, kernel.metadata.num_warps, sm)


def _calls():
    """(label, thunk) for each host-wrapper call to compile: the GPU benchmark's shapes and
    an odd one, every dtype, NCHW / channels_last / a channel slice, every kernel variant."""
    shapes = [(128, 256, 56, 56), (128, 2048, 7, 7), (5, 65, 13, 13)]
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    for shape, dtype, layout in itertools.product(shapes, dtypes, ("nchw", "channels_last", "slice")):
        N, C, H, W = shape
        if layout == "slice":
            if shape != shapes[-1]:
                continue  # strides that are not a multiple of 16: the small shape is enough
            x = torch.empty(N, C + 3, H, W, dtype=dtype)[:, 1:C + 1]
        else:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = torch.empty(shape, dtype=dtype, memory_format=fmt)
        p = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        w, rm, rv = torch.empty(C, dtype=p), torch.empty(C, dtype=p), torch.empty(C, dtype=p)
        mean, invstd = torch.empty(C, dtype=acc), torch.empty(C, dtype=acc)
        r = torch.empty_like(x)
        label = f"{'x'.join(map(str, shape))} {str(dtype)[6:]} {layout}"
        yield f"{label} train+add+relu", partial(bn.bn_forward_train, x, w, w, r, rm, rv, 0.1, 1e-5, True)
        yield f"{label} train", partial(bn.bn_forward_train, x, None, None, None, None, None, 0.1, 1e-5, False)
        yield f"{label} eval+add+relu", partial(bn.bn_forward_eval, x, w, w, r, rm, rv, 1e-5, True)
        for training, relu, mask in [(True, True, [True, True, True, True]), (True, True, [True, True, True, False]),
                                     (True, False, [True, True, True, False]), (False, True, [True, False, False, True]),
                                     (True, True, [False, True, False, False])]:
            yield (f"{label} backward training={training} relu={relu} mask={mask}",
                   partial(bn.bn_backward, x, x, x, w, mean, invstd, training, relu, mask))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SMS), required=True)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")

    launches = []  # (kernel name, grid, compiled kernel) of each launch of the call at hand

    def compile_only(kernel, grid):
        return lambda *a, **kw: launches.append((kernel.fn.__name__, grid, kernel.run(*a, grid=grid, warmup=True, **kw)))

    JITFunction.__getitem__ = compile_only
    bn._registers = _registers  # Triton reads them when it loads the binary onto a GPU
    first_use = {}  # compiled kernel -> (kernel name, the call that first needed it)
    for arch in args.arch:
        sm = SMS[arch]
        driver.set_active(CompileOnlyDriver(arch))
        bn._sm = lambda device, sm=sm: sm
        bn._PLANS.clear()
        for label, call in _calls():
            launches.clear()
            try:
                call()
            except Exception as e:
                raise RuntimeError(f"sm_{arch}, {label}: {type(e).__name__}: {e}") from e
            for name, (channel_blocks, splits), kernel in launches:
                first_use.setdefault(kernel, (name, label))
                # One wave (bn._plan), unless the channel blocks alone are more.
                if channel_blocks * splits > max(_resident(kernel, sm) * sm.count, channel_blocks):
                    sys.exit(f"sm_{arch}, {label}: {name}'s grid {channel_blocks}x{splits} takes more than "
                             f"one wave of {_resident(kernel, sm)} programs per SM")

    rows = []
    for kernel, (name, label) in first_use.items():
        regs, stack, shared = _resources(kernel.asm["cubin"])
        arch = kernel.metadata.target.arch
        rows.append((name, arch, kernel.metadata.num_warps, regs, stack, shared + kernel.metadata.shared,
                     _resident(kernel, SMS[arch]), label))
    print(f"{'kernel':<22} {'arch':>4} {'warps':>5} {'regs':>4} {'stack':>5} {'smem':>6} {'per SM':>6}  first needed by")
    for row in sorted(rows, key=lambda r: (r[0], r[1], -r[3])):
        print("{:<22} {:>4} {:>5} {:>4} {:>5} {:>6} {:>6}  {}".format(*row))
    print(f"compiled {len(rows)} kernels: " + ", ".join(sorted({r[0] for r in rows})))


if __name__ == "__main__":
    main()
