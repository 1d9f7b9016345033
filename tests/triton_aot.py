"""Compiles, for a GPU that is not here, every Triton kernel launch that cnnkern's host
wrappers make, and reports each compiled kernel's registers, spills and shared memory.

    python tests/triton_aot.py --arch 90 [--arch 80] [--host-time]

The interpreter that runs the Triton tests on a CPU machine accepts programs the
compiler rejects (and never allocates registers), so this is what tells, without a GPU,
that the kernels build for sm_80/sm_90. The host wrappers run as usual on CPU tensors
(shapes, strides and data-pointer alignment as on a GPU: every specialization a real
call would get), their plans compiling the kernels as on a GPU (`JITFunction.warmup`, down
to a cubin, registers read with cuobjdump); only the launch is replaced by a check that it
would run the kernel the JIT picks, with the arguments the JIT binds, and by a check that
its grid takes one wave. The tensors' contents are never read.

Must run without TRITON_INTERPRET (the kernels must be JITFunctions): test_triton_aot.py
runs it in a subprocess. Prints a table of the compiled kernels, then "compiled N kernels: names".
--host-time then times the wrappers' host work per call, launches stopped where the driver
would take them: the GPU path's Python, which bench/host.py (interpreter, kernels stubbed out)
cannot show on a CPU machine.
"""
import argparse
import itertools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from functools import lru_cache, partial

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import CompiledKernel
from triton.runtime import driver

from cnnkern.triton import batch_norm as bn
from cnnkern.triton import launch as launcher

# A100, H100 (sm_80 and sm_90 hold the same per SM): the host wrappers size their grids from this
SMS = {arch: launcher.SM(count, registers=65536, threads=2048, shared=(164 if arch == 80 else 228) * 1024)
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


@lru_cache(maxsize=None)  # one cuobjdump per compiled kernel, not per launch
def _registers(kernel) -> int:
    return _resources(kernel.asm["cubin"])[0]


def _resident(kernel, sm) -> int:
    return launcher.resident_programs(_registers(kernel), kernel.metadata.shared, kernel.metadata.num_warps, sm)


class _Recorder:
    """Stands in for a compiled kernel: `binary[grid](*args)` records (grid, args) in `into`."""

    def __init__(self, into: list):
        self.into = into

    def __getitem__(self, grid):
        return lambda *args: self.into.extend((grid, args))


def _describe(args) -> str:
    return ", ".join(f"tensor{tuple(a.shape)}" if isinstance(a, torch.Tensor) else repr(a) for a in args)


def _calls():
    """(label, thunk) for each host-wrapper call to compile: the GPU benchmark's shapes and
    an odd one, every dtype, NCHW / channels_last / a channel slice / NCHW at an unaligned
    address, every kernel variant."""
    shapes = [(128, 256, 56, 56), (128, 2048, 7, 7), (5, 65, 13, 13)]
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    for shape, dtype, layout in itertools.product(shapes, dtypes, ("nchw", "channels_last", "slice", "offset")):
        N, C, H, W = shape
        if layout in ("slice", "offset") and shape != shapes[-1]:
            continue  # the small shape is enough
        if layout == "slice":  # strides that are not a multiple of 16
            x = torch.empty(N, C + 3, H, W, dtype=dtype)[:, 1:C + 1]
        elif layout == "offset":  # NCHW's geometry, not 16-byte aligned: a plan of its own
            x = torch.empty(N * C * H * W + 1, dtype=dtype)[1:].view(shape)
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
        for training, relu, mask in [(True, True, [True, True, True, True]),
                                     (True, True, [True, True, True, False]),
                                     (True, False, [True, True, True, False]),
                                     (False, True, [True, False, False, True]),
                                     (True, True, [False, True, False, False])]:
            yield (f"{label} backward training={training} relu={relu} mask={mask}",
                   partial(bn.bn_backward, x, x, x, w, None, mean, invstd, training, relu, mask))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SMS), required=True)
    parser.add_argument("--host-time", action="store_true", help="then time the wrappers' host work per call")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")

    launches = []  # (kernel name, grid, compiled kernel) of each launch of the call at hand
    direct_launch = launcher.run

    def checked_launch(pass_launches, compiled):
        """launcher.run, compile-only: checks that each launch would go to the compiled kernel the
        JIT picks for its arguments (the same specialization), with the arguments the JIT binds."""
        assert compiled is not None and len(compiled) == len(pass_launches), "no compiled kernels to launch"
        for launch, binary in zip(pass_launches, compiled):
            kernel, grid, args, meta = launch.kernel, launch.grid, launch.args, launch.meta
            name = kernel.fn.__name__
            if binary is not kernel.run(*args, grid=grid, warmup=True, **meta):
                raise AssertionError(f"{name}: the plan's compiled kernel is not the one the JIT picks")
            bound = kernel.device_caches[driver.active.get_current_device()][4](*args, **meta)[0]
            given = []
            direct_launch([launch], (_Recorder(given),))
            if given[0] != (*grid, 1) or len(given[1]) != len(bound) or not all(
                    a is b or (not isinstance(a, torch.Tensor) and a == b) for a, b in zip(given[1], bound.values())):
                raise AssertionError(f"{name}: launched with {_describe(given[1])} on {given[0]}, "
                                     f"the JIT binds {_describe(bound.values())}")
            launches.append((name, grid, binary, launch.fills_gpu))

    launcher.run = checked_launch
    launcher.registers_of = _registers  # Triton reads them when it loads the binary onto a GPU
    first_use = {}  # compiled kernel -> (kernel name, the call that first needed it)
    for arch in args.arch:
        sm = SMS[arch]
        driver.set_active(CompileOnlyDriver(arch))
        launcher.sm_of = lambda device, sm=sm: sm
        bn._PLANS.plans.clear()
        for label, call in _calls():
            launches.clear()
            try:
                call()
            except Exception as e:
                raise RuntimeError(f"sm_{arch}, {label}: {type(e).__name__}: {e}") from e
            for name, (channel_blocks, splits), kernel, fills_gpu in launches:
                first_use.setdefault(kernel, (name, label))
                # One wave (launcher.PlanCache), unless the channel blocks alone are more.
                if fills_gpu and channel_blocks * splits > max(_resident(kernel, sm) * sm.count, channel_blocks):
                    sys.exit(f"sm_{arch}, {label}: {name}'s grid {channel_blocks}x{splits} takes more than "
                             f"one wave of {_resident(kernel, sm)} programs per SM")

    rows = []
    for kernel, (name, label) in first_use.items():
        regs, stack, shared = _resources(kernel.asm["cubin"])
        arch = kernel.metadata.target.arch
        rows.append((name, arch, kernel.metadata.num_warps, regs, stack, shared + kernel.metadata.shared,
                     _resident(kernel, SMS[arch]), label))
    print(f"{'kernel':<26} {'arch':>4} {'warps':>5} {'regs':>4} {'stack':>5} {'smem':>6} {'per SM':>6}"
          "  first needed by")
    for row in sorted(rows, key=lambda r: (r[0], r[1], -r[3])):
        print("{:<26} {:>4} {:>5} {:>4} {:>5} {:>6} {:>6}  {}".format(*row))
    print(f"compiled {len(rows)} kernels: " + ", ".join(sorted({r[0] for r in rows})))
    if args.host_time:
        host_times(direct_launch)


def host_times(direct_launch) -> None:
    """Microseconds of host work per wrapper call (training, ReLU), the launches stopped at the
    driver: straight into the compiled kernels, as launcher.run does, and through the JIT, which
    binds and specializes every argument again. A small NCHW float32 layer, and a channels_last
    bf16 one whose plans merge the partials in a launch of their own. Median of 5 runs."""
    CompiledKernel._init_handles = lambda self: None  # nothing to load: no GPU
    CompiledKernel.run = property(lambda self: lambda *args: None)  # the driver's launch
    CompiledKernel.launch_metadata = lambda self, *args: None
    calls = {}
    for shape, dtype, fmt in (((8, 64, 14, 14), torch.float32, torch.contiguous_format),
                              ((128, 256, 56, 56), torch.bfloat16, torch.channels_last)):
        x = torch.empty(shape, dtype=dtype, memory_format=fmt)  # never written: no pages touched
        w, mean = torch.empty(shape[1]), torch.empty(shape[1])
        label = f"{'x'.join(map(str, shape))} {str(dtype)[6:]}{' CL' if fmt == torch.channels_last else ''}"
        calls[f"{label} forward"] = partial(bn.bn_forward_train, x, w, w, None, w, w, 0.1, 1e-5, True)
        calls[f"{label} backward"] = partial(bn.bn_backward, x, x, x, w, None, mean, mean, True, True,
                                             [True, True, True, False])
    print("host us per call, launches stopped at the driver")
    for path, launch in (("direct", direct_launch), ("JIT", lambda launches, compiled: direct_launch(launches, None))):
        launcher.run = launch
        for name, call in calls.items():
            call()
            runs = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(500):
                    call()
                runs.append((time.perf_counter() - start) / 500 * 1e6)
            print(f"{path:<7} {name:<30} {statistics.median(runs):6.1f}")


if __name__ == "__main__":
    main()
