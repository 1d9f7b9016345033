"""How the Triton families launch their kernels: grids that fill the GPU in one wave, sized by
the compiled kernels' occupancy, and launches straight into the compiled binaries.

A family's wrapper describes a call as a plan (its tiling, worked out from the tensors'
shapes and strides for a given number of programs per SM) and the launches that plan makes.
`PlanCache.get` works the plan out on a key's first call: it compiles the launches' kernels,
reads how many programs of each an SM holds, and refits the plan to the least of them, so no
grid runs a second, partly idle wave. Later calls with the same key get the same plan and
kernels, and `run` launches those directly.
"""
import functools
from typing import Any, Callable, Dict, Generic, Hashable, List, Mapping, NamedTuple, Optional, Tuple, TypeVar

import torch
import triton
from torch import Tensor
from triton.runtime.jit import JITFunction

__all__ = ["SM", "sm_of", "resident_programs", "registers_of", "Launch", "variant_of", "PlanCache", "run"]


@triton.jit
def _probe():
    pass


COMPILED = isinstance(_probe, JITFunction)  # False under TRITON_INTERPRET=1: the JIT interprets


class SM(NamedTuple):
    """A device's multiprocessors: how many, and what each holds at once."""

    count: int
    registers: int  # 32-bit registers
    threads: int
    shared: int  # bytes of shared memory


@functools.lru_cache(maxsize=None)
def sm_of(device: torch.device) -> SM:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        # Not every torch build reports these (inductor reads them the same way); the defaults
        # are sm_80's, the least of the GPUs the kernels are built for.
        return SM(p.multi_processor_count, getattr(p, "regs_per_multiprocessor", 65536),
                  getattr(p, "max_threads_per_multi_processor", 2048),
                  getattr(p, "shared_memory_per_multiprocessor", 164 * 1024))
    # The interpreter runs programs one after another: few programs are fastest, and a
    # family's most programs per SM still split its reductions (so the tests cover merging).
    return SM(1, 65536, 2048, 1 << 20)


def resident_programs(registers: int, shared: int, num_warps: int, sm: SM) -> int:
    """How many programs of a compiled kernel (`registers` per thread, `shared` bytes) one SM
    holds at once. Registers are allocated per warp in units of 256, and the driver reserves
    1 KB of shared memory per program (sm_80 and later)."""
    warp_registers = -(-registers * 32 // 256) * 256
    by_registers = sm.registers // warp_registers // num_warps
    return max(1, min(by_registers, sm.threads // (32 * num_warps), sm.shared // (shared + 1024)))


def registers_of(kernel) -> int:
    """Registers per thread of a compiled kernel (Triton reads them when it loads the binary)."""
    kernel._init_handles()
    return kernel.n_regs


class Launch(NamedTuple):
    """One launch of a pass: kernel[grid](*args, **meta)."""

    kernel: Any  # a @triton.jit function
    grid: Tuple[int, ...]
    args: tuple
    meta: Mapping[str, Any]  # constexprs (which follow the other parameters) and launch options
    fills_gpu: bool = True  # its grid is the plan's, sized to fill the GPU; False: a small grid of its own


def variant_of(*items) -> tuple:
    """A key of what selects compiled kernels besides the plan: each tensor's dtype and whether
    it is 16-byte aligned (Triton specializes on both), absent ones and flags as they are."""
    return tuple((t.dtype, t.data_ptr() % 16 == 0) if isinstance(t, Tensor) else t for t in items)


Plan = TypeVar("Plan")


class PlanCache(Generic[Plan]):
    """A family's plans and their compiled kernels, by key, the oldest dropped past `size`."""

    def __init__(self, most_programs_per_sm: int, size: int = 1024):
        self.most_programs_per_sm = most_programs_per_sm
        self.size = size
        self.plans: Dict[Hashable, Tuple[Plan, Optional[tuple]]] = {}

    def get(self, key: Hashable, device: torch.device, plan_for: Callable[[int, int], Plan],
            launches: Callable[[Plan], List[Launch]]) -> Tuple[Plan, Optional[tuple]]:
        """The plan for `key` on `device`, and its launches' compiled kernels (None under the
        interpreter). The key must fix all that the plan and the kernels' compilation depend on
        (shapes, strides, dtypes, alignment, flags): then each key always gets the same plan,
        and a call always sums in the same order. `plan_for(sms, programs_per_sm)` plans for
        a device of `sms` multiprocessors holding that many programs each; `launches(plan)`
        are the plan's launches.

        The grid fills the GPU in one wave: as many programs per SM as the least resident of
        the compiled kernels that fill the GPU allows (registers, shared memory), at most
        most_programs_per_sm.
        A grid sized for more runs a second, partly idle wave (e.g. batch norm's backward
        reduction, 96 registers a thread in bf16: 5 programs per SM, against grids sized for 8)."""
        key = (key, device)
        cached = self.plans.get(key)
        if cached is not None:
            return cached
        sm = sm_of(device)
        programs = self.most_programs_per_sm
        plan, compiled = plan_for(sm.count, programs), None
        while COMPILED:  # a refit changes only the grid: its round finds the same kernels, compiled
            pass_launches = launches(plan)
            compiled = tuple(launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.meta)
                             for launch in pass_launches)
            fit = min(resident_programs(registers_of(k), k.metadata.shared, k.metadata.num_warps, sm)
                      for k, launch in zip(compiled, pass_launches) if launch.fills_gpu)
            if fit >= programs:
                break
            programs = fit
            plan = plan_for(sm.count, programs)
        if len(self.plans) >= self.size:
            self.plans.pop(next(iter(self.plans)))  # the oldest
        cached = self.plans[key] = plan, compiled
        return cached


def run(launches: List[Launch], compiled: Optional[tuple]) -> None:
    """Runs a pass's launches: through Triton's JIT, or, where PlanCache.get compiled them,
    straight into the compiled kernels, skipping the JIT's binding and specializing of every
    argument (6-13 us a launch on the project's CPU machine, for 11-30 arguments). That is safe
    because the plan's key fixes all the JIT specializes on."""
    if compiled is None:
        for launch in launches:
            launch.kernel[launch.grid](*launch.args, **launch.meta)
        return
    for launch, binary in zip(launches, compiled):
        # A compiled kernel takes every parameter in order, the constexprs included.
        binary[(*launch.grid, 1, 1)[:3]](*launch.args,
                                          *(launch.meta[name] for name in launch.kernel.arg_names[len(launch.args):]))
