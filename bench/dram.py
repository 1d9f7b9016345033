"""DRAM bytes each batch-norm kernel moves, read by Nsight Compute, next to the bytes
the model says must move (bench/NOTES.md): whether a second pass reads from L2.

    python -m bench.dram [--shape 128,256,56,56] [--dtype bf16] [--backend cuda,triton]
                         [--layout nchw,channels_last] [--out DIR]

runs itself under `ncu` (one process; each measured call is a cudaProfilerStart/Stop
window, after a warm-up call that compiles and allocates) and prints a table per
call: its kernels, DRAM MB read and written, time, and the total against the model; and,
for a kernel slower than its bytes, L1 sectors per global load and store request and how
busy the SMs, L2 and DRAM were.
ncu runs with `--cache-control none`: its default flushes L2 before every kernel,
which would hide exactly the reuse under test. The backends' knobs in the environment
(KNOBS) apply to the profiled process too, and the table's header names them:
`CNNKERN_CUDA_ROW_BYTES=32 CNNKERN_TRITON_MERGE_LAUNCH=0 python -m bench.dram --layout channels_last`
times both backends' narrower channels_last rows against a default run's. Needs a GPU and ncu on the PATH.
"""
import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
from functools import partial

import torch

from .batch_norm import MODES
from .cli import DTYPES, comma_list, shape_arg

READ, WRITE, TIME = "dram__bytes_read.sum", "dram__bytes_write.sum", "gpu__time_duration.sum"
REGS, WAVES = "launch__registers_per_thread", "launch__waves_per_multiprocessor"  # a fractional wave: idle SMs
# Why a kernel is slower than its bytes: L1 sectors per global load / store request (4 for a
# warp's coalesced 16-byte accesses; more: scattered lines), and how busy the SMs, L2 and DRAM were.
LD_SECTORS = "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum"
LD_REQUESTS = "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum"
ST_SECTORS = "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum"
ST_REQUESTS = "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum"
BUSY = {"SM%": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
        "L2%": "lts__throughput.avg.pct_of_peak_sustained_elapsed",
        "DRAM%": "dram__throughput.avg.pct_of_peak_sustained_elapsed"}
METRICS = (READ, WRITE, TIME, REGS, WAVES, LD_SECTORS, LD_REQUESTS, ST_SECTORS, ST_REQUESTS, *BUSY.values())
BACKENDS, LAYOUTS = ("cuda", "triton"), ("nchw", "channels_last")
# Read by csrc/cuda/batch_norm.cu and cnnkern/triton/batch_norm.py
KNOBS = ("CNNKERN_CUDA_ROW_BYTES", "CNNKERN_CUDA_ONE_PASS", "CNNKERN_TRITON_MERGE_LAUNCH")


def knobs():
    """The backends' knobs set in this environment, {name: value}."""
    return {name: os.environ[name] for name in KNOBS if name in os.environ}


def raw_name(settings):
    """ncu's CSV file name for a run under `settings` (knobs()): runs with different knobs
    into one folder keep their own."""
    suffix = "".join(f"-{name.removeprefix('CNNKERN_').lower()}{value}" for name, value in settings.items())
    return f"dram{suffix}.csv"


def _calls(shape, dtype, backends=BACKENDS, layouts=LAYOUTS):
    """(label, model bytes, thunk) of each measured call: each of `backends` that runs here x
    `layouts` x (training forward with ReLU, backward with residual and ReLU)."""
    from cnnkern.backends import refuses

    C = shape[1]
    p = torch.float32
    for backend in backends:
        if refuses(backend, torch.device("cuda"), dtype, "bn_forward_train"):
            continue
        ops = torch.ops.cnnkern
        prefix = "triton_" if backend == "triton" else ""
        forward, backward = getattr(ops, prefix + "bn_forward_train"), getattr(ops, prefix + "bn_backward")
        for layout in layouts:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
            g = torch.randn_like(x)
            w, b = torch.rand(C, device="cuda", dtype=p) + 0.5, torch.randn(C, device="cuda", dtype=p)
            rm, rv = torch.zeros(C, device="cuda", dtype=p), torch.ones(C, device="cuda", dtype=p)
            y, mean, invstd = forward(x, w, b, None, rm, rv, 0.1, 1e-5, True)
            unit = x.numel() * x.element_size()
            yield (f"{backend} {layout} fwd_relu", MODES["fwd_relu"]["units"] * unit,
                   partial(forward, x, w, b, None, rm, rv, 0.1, 1e-5, True))
            yield (f"{backend} {layout} bwd_add_relu", MODES["bwd_add_relu"]["units"] * unit,
                   partial(backward, g, x, y, w, b, mean, invstd, True, True, [True, True, True, True]))


def kernels_per_call(shape, dtype, backends=BACKENDS, layouts=LAYOUTS):
    """How many kernels each call launches (two passes, or one on the cuda backend's one-pass
    path), counted by the PyTorch profiler, outside ncu; memsets are not kernels to ncu either."""
    cuda = torch.profiler.ProfilerActivity.CUDA
    counts = []
    for _, _, call in _calls(shape, dtype, backends, layouts):
        call()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[cuda]) as prof:
            call()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        counts.append(sum(1 for e in kernels if not e.name.startswith(("Memset", "Memcpy"))))
    return counts


def run(shape, dtype, backends, layouts):
    """Under ncu: one profiler window per call; prints each call's label and model bytes."""
    for label, model_bytes, call in _calls(shape, dtype, backends, layouts):
        call()  # warm-up: compiles, fills the caching allocator
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        call()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"CALL\t{label}\t{model_bytes}", flush=True)


def _ratio(a, b):
    return a / b if b else float("nan")


def _table(calls, rows):
    """Kernel rows (launch order) shared out among the calls: each call's kernels come
    after the previous call's. Returns the printed table."""
    busy = "".join(f" {name:>6}" for name in BUSY)
    lines = [f"{'call / kernel':<58} {'read MB':>9} {'write MB':>9} {'time us':>9} {'/ model':>8} "
             f"{'regs':>5} {'waves':>6} {'ld s/r':>6} {'st s/r':>6}{busy}"]
    it = iter(rows)
    pending = next(it, None)
    for label, model_bytes, kernels in calls:
        total_r = total_w = total_t = 0.0
        lines.append(label)
        for _ in range(kernels):
            if pending is None:
                break
            name, m = pending
            total_r, total_w, total_t = total_r + m[READ], total_w + m[WRITE], total_t + m[TIME]
            busy = "".join(f" {m[metric]:>6.0f}" for metric in BUSY.values())
            lines.append(f"  {name[:56]:<56} {m[READ] / 1e6:>9.1f} {m[WRITE] / 1e6:>9.1f} {m[TIME] / 1e3:>9.1f} "
                         f"{'':>8} {m[REGS]:>5.0f} {m[WAVES]:>6.2f} {_ratio(m[LD_SECTORS], m[LD_REQUESTS]):>6.1f} "
                         f"{_ratio(m[ST_SECTORS], m[ST_REQUESTS]):>6.1f}{busy}")
            pending = next(it, None)
        moved = total_r + total_w
        lines.append(f"  {'total':<56} {total_r / 1e6:>9.1f} {total_w / 1e6:>9.1f} {total_t / 1e3:>9.1f} "
                     f"{moved / model_bytes:>7.2f}x")
    return "\n".join(lines)


def _kernel_rows(csv_text):
    """(kernel name, {metric: value in bytes, ns or plain units}) per profiled kernel, in launch
    order; a metric ncu did not report is NaN."""
    start = csv_text.find('"ID"')
    by_id = {}
    for rec in csv.DictReader(io.StringIO(csv_text[start:])):
        kernel = by_id.setdefault(rec["ID"], {"name": rec["Kernel Name"]})
        value = float(rec["Metric Value"].replace(",", ""))
        unit = rec["Metric Unit"]
        scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "nsecond": 1, "usecond": 1e3,
                 "msecond": 1e6}.get(unit, 1)
        kernel[rec["Metric Name"]] = value * scale
    return [(k["name"], {m: k.get(m, float("nan")) for m in METRICS})
            for _, k in sorted(by_id.items(), key=lambda kv: int(kv[0]))]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.dram", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=shape_arg, default=(128, 256, 56, 56), metavar="N,C,H,W")
    parser.add_argument("--dtype", choices=sorted(set(DTYPES) - {"fp64"}), default="bf16")
    parser.add_argument("--backend", type=comma_list(BACKENDS), default=list(BACKENDS),
                        help=f"comma list of {','.join(BACKENDS)}")
    parser.add_argument("--layout", type=comma_list(LAYOUTS), default=list(LAYOUTS),
                        help=f"comma list of {','.join(LAYOUTS)}")
    parser.add_argument("--out", default=None, help="folder for ncu's raw CSV")
    parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)  # the profiled child
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    shape, dtype = args.shape, DTYPES[args.dtype]
    if args.run:
        return run(shape, dtype, args.backend, args.layout)
    if shutil.which("ncu") is None:
        sys.exit("ncu (Nsight Compute) is not on the PATH")
    out = args.out or "."
    os.makedirs(out, exist_ok=True)
    settings = knobs()
    raw = os.path.join(out, raw_name(settings))
    cmd = ["ncu", "--profile-from-start", "off", "--cache-control", "none", "--clock-control", "none",
           "--metrics", ",".join(METRICS), "--csv", "--log-file", raw,
           sys.executable, "-m", "bench.dram", "--run", "--shape", ",".join(map(str, shape)), "--dtype", args.dtype,
           "--backend", ",".join(args.backend), "--layout", ",".join(args.layout)]
    child = subprocess.run(cmd, capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"ncu failed ({child.returncode}):\n{child.stderr[-3000:]}")
    labels = [line.split("\t")[1:] for line in child.stdout.splitlines() if line.startswith("CALL\t")]
    counts = kernels_per_call(shape, dtype, args.backend, args.layout)
    calls = [(label, int(model_bytes), kernels) for (label, model_bytes), kernels in zip(labels, counts)]
    with open(raw) as f:
        rows = _kernel_rows(f.read())
    knob_text = " ".join(f"{name}={value}" for name, value in settings.items()) or "no knobs set"
    print(f"DRAM traffic per call, {'x'.join(map(str, shape))} {args.dtype}, {knob_text} "
          f"(ncu, caches not flushed; raw: {raw})")
    print(_table(calls, rows))


if __name__ == "__main__":
    main()
