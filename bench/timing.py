"""Timers and the ceilings every result is compared with.

GPU: triton.testing.do_bench, whose runs each start after zeroing a buffer
larger than L2, so inputs are read from device memory, not from cache.
CPU: the providers of a case in turn, a few single calls each (time_interleaved), so that
the machine's drift (up to 2x within minutes on the project's 2-core VMs) moves them alike and
their ratios hold. Both give the median and the 20th/80th percentiles.
On the CPU, glibc is first told to keep freed memory (`keep_freed_cpu_memory`):
otherwise whether a fresh 25 MB output reuses pages or faults them all in again
depends on the allocator's state, which swung eager's fwd+ReLU from 8 ms to 27 ms
from one run to the next on the project's CPU machine, and timed the kernel of
none of the providers.
"""
import ctypes
import ctypes.util
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mb: Optional[float] = None  # extra memory one call allocates (GPU only)


def _quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def time_fn(fn: Callable[[], object], device: torch.device, quick: bool) -> Timing:
    if device.type == "cuda":
        import triton.testing

        fn()  # warm-up: compiles, autotunes, fills the caching allocator
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        med, p20, p80 = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                                quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80, peak)
    from torch.utils import benchmark

    fn()
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = m.blocked_autorange(min_run_time=0.3 if quick else 1.0)
    times = [t * 1e3 for t in measurement.times]
    return Timing(measurement.median * 1e3, _quantile(times, 0.2), _quantile(times, 0.8))


def time_interleaved(fns: Dict[str, Callable[[], object]], quick: bool, calls_per_turn: int = 5,
                     min_calls: int = 10) -> Dict[str, Timing]:
    """CPU: {name: Timing} of each callable, timed in turns of `calls_per_turn` single calls,
    until every one has run for the run time (0.3 s quick, else 1 s), or the slowest for four
    times that, with at least `min_calls` calls each. Timed one after another, each in a block
    of its own, two providers of a case drew ratios that moved by up to 2x between runs."""
    run_time = 0.3 if quick else 1.0
    for fn in fns.values():
        fn()  # warm-up: torch.compile compiles here
    times = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    while min(len(t) for t in times.values()) < min_calls or (
            min(spent.values()) < run_time and max(spent.values()) < 4 * run_time):
        for name, fn in fns.items():
            for _ in range(calls_per_turn):
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
                times[name].append(elapsed * 1e3)
                spent[name] += elapsed
    return {name: Timing(_quantile(t, 0.5), _quantile(t, 0.2), _quantile(t, 0.8)) for name, t in times.items()}


def keep_freed_cpu_memory() -> bool:
    """Tells glibc malloc to serve large blocks from the heap and never trim it,
    so freed tensors' pages are reused rather than faulted in anew. True if set."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):  # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mmap_max = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc's ceiling for this setting
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_max)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def copy_bandwidth_gbps(device: torch.device, quick: bool, nbytes: int) -> float:
    """Bandwidth a plain copy of `nbytes` reaches (bytes read + written per second):
    the ceiling memory-bound kernels are measured against. On a GPU, do_bench flushes
    L2 before every run, so take it large (device memory's rate); on the CPU nothing
    flushes the caches between runs, so take it the size of the tensors the case moves,
    which then sit in the same level of cache."""
    src = torch.randn(max(nbytes // 4, 1), device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, quick)
    return 2 * src.numel() * src.element_size() / (t.median_ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"
