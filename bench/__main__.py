"""python -m bench [--quick] [filters]: times cnnkern's kernels against PyTorch
eager and torch.compile, prints a table, writes JSON (and a PNG) to bench/results/."""
import argparse
import datetime
import functools
import json
import os
import platform
import subprocess
import sys

import torch

from cnnkern._extension import cpu_features

from . import batch_norm
from .cli import DTYPES, comma_list, shape_arg
from .timing import copy_bandwidth_gbps, device_name, keep_freed_cpu_memory, time_fn, time_interleaved

FAMILIES = {"batch_norm": batch_norm}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing runs")
    p.add_argument("--family", type=comma_list(list(FAMILIES)), default=list(FAMILIES),
                   help=f"comma list of {','.join(FAMILIES)}")
    p.add_argument("--provider", type=comma_list(batch_norm.PROVIDERS), default=None,
                   help=f"comma list of {','.join(batch_norm.PROVIDERS)}")
    p.add_argument("--dtype", type=comma_list(list(DTYPES)), default=None,
                   help=f"comma list of {','.join(DTYPES)} (default: bf16,fp32 on a GPU, fp32 on the CPU)")
    p.add_argument("--layout", type=comma_list(["nchw", "channels_last"]), default=["nchw", "channels_last"],
                   help="comma list of nchw,channels_last")
    p.add_argument("--mode", type=comma_list(list(batch_norm.MODES)), default=None,
                   help=f"comma list of {','.join(batch_norm.MODES)}")
    p.add_argument("--shape", type=shape_arg, nargs="+", default=None, metavar="N,C,H,W",
                   help="shapes to time instead of the device's defaults (ResNet-50's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"), help="folder for JSON/PNG")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def _commit():
    try:
        # --dirty: a run from uncommitted sources (as on a GPU machine's copy of the tree) says so.
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip() or None
    except OSError:
        return None


def _versions():
    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    return v


def _time_case(mod, case, providers, device, quick):
    """Yields (provider, Timing, accuracy) for one case: accuracy, for a cnnkern provider, is
    (error, correct) of its outputs against the float64 oracle's on the same inputs
    (mod.checker), checked before it is timed; None for the others. On the CPU the providers
    run in turn (time_interleaved), so that their ratios come from the same minutes; on a GPU
    each runs on its own (do_bench flushes L2 before every run), and is yielded as soon as it
    is timed."""
    check = mod.checker(case, device)

    def accuracy(provider):
        return check(provider) if provider.startswith("cnnkern-") else None

    if device.type == "cpu":
        checked = {p: accuracy(p) for p in providers}
        fns = {p: mod.make_fn(p, case, device) for p in providers}
        for p, timing in time_interleaved(fns, quick).items():
            yield p, timing, checked[p]
        return
    for p in providers:
        checked = accuracy(p)
        yield p, time_fn(mod.make_fn(p, case, device), device, quick), checked


def _progress(i, n, label):
    width = 30
    done = width * i // n
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label[:60]:<60}")
    sys.stderr.flush()


def _error_cell(r) -> str:
    if r.get("max_error") is None:
        return "-"
    return f"{r['max_error']:.0e}" + ("" if r["correct"] else " WRONG")


def _table(results):
    head = f"{'case':<44} {'provider':<21} {'median ms':>10} {'p20-p80 ms':>17} {'GB/s':>7} {'%copy':>6} " \
           f"{'x eager':>8} {'x compile':>9} {'mem MB':>7} {'error':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['case']:<44} {r['provider']:<21} {r['median_ms']:>10.4f} "
            f"{r['p20_ms']:>8.4f}-{r['p80_ms']:<8.4f} {r['gbps']:>7.1f} {r['pct_of_copy']:>5.0f}% "
            f"{r.get('speedup_vs_eager', float('nan')):>8.2f} {r.get('speedup_vs_compile', float('nan')):>9.2f} "
            + (f"{r['peak_mem_mb']:>7.1f}" if r["peak_mem_mb"] is not None else f"{'-':>7}")
            + f" {_error_cell(r):>7}")
    return "\n".join(lines)


def _accuracy_line(results) -> str:
    """Whether every cnnkern result's outputs were within bounds of the oracle's, and which were not."""
    checked = [r for r in results if "correct" in r]
    wrong = [r for r in checked if not r["correct"]]
    if not wrong:
        return f"accuracy: all {len(checked)} cnnkern results within bounds (error: against the float64 " \
               "oracle, at most twice eager's + a margin per dtype: cnnkern.reference.error_bound)"
    return "\n".join([f"accuracy: {len(wrong)} of {len(checked)} cnnkern results are WRONG (their targets count "
                      "as missed):"] + [f"{r['case']:<44} {r['provider']:<21} error {r['max_error']:.2e}"
                                        for r in wrong])


_METRIC_NAMES = {"speedup_vs_eager": "x eager", "speedup_vs_compile": "x compile", "pct_of_copy": "% of copy"}


def _targets_table(results) -> str:
    """One line per cnnkern result that has targets: each target's value against its minimum."""
    lines = []
    for r in results:
        checks = []
        for metric, t in r.get("targets", {}).items():
            got = "not measured" if t["got"] is None else f"{t['got']:.2f}"
            checks.append(f"{_METRIC_NAMES[metric]} {got} (>= {t['want']:g}) {'met' if t['met'] else 'MISSED'}")
        if checks:
            lines.append(f"{r['case']:<44} {r['provider']:<21} " + "; ".join(checks))
    if not lines:
        return ""
    met = sum(t["met"] for r in results for t in r.get("targets", {}).values())
    total = sum(len(r.get("targets", {})) for r in results)
    return "\n".join([f"targets (bench/batch_norm.py, targets()): {met} of {total} met"] + lines)


def _plot(results, path, title):
    """Speedup against eager per case, one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in results))
    providers = [p for p in dict.fromkeys(r["provider"] for r in results) if p != "eager"]
    cols = min(3, len(modes))
    rows = -(-len(modes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    width = 0.8 / max(1, len(providers))
    for ax, mode in zip(axes.flat, modes):
        cases = list(dict.fromkeys(r["case"] for r in results if r["mode"] == mode))
        for j, p in enumerate(providers):
            vals = {r["case"]: r.get("speedup_vs_eager", 0) for r in results if r["provider"] == p}
            ax.bar([i + j * width for i in range(len(cases))], [vals.get(c, 0) for c in cases], width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8)
        labels = [c.split(" ", 1)[1].replace("channels_last", "CL") for c in cases]
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(mode, fontsize=9)
        ax.set_ylabel("speedup vs eager (median)", fontsize=8)
    for ax in list(axes.flat)[len(modes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16", "fp32"] if device.type == "cuda" else ["fp32"]))]
    name = device_name(device)
    print(f"cnnkern benchmark on {name}; torch {torch.__version__}")
    kept_freed_memory = device.type == "cpu" and keep_freed_cpu_memory()
    if device.type == "cpu":
        print("glibc keeps freed memory: " + ("yes" if kept_freed_memory else "no (not glibc); expect noisier times"))
        print(f"cpu kernels' loops: {cpu_features() or 'none (cnnkern._C did not load)'}")
    copy_gbps = functools.lru_cache(maxsize=None)(lambda nbytes: copy_bandwidth_gbps(device, args.quick, nbytes))
    if device.type == "cuda":
        gpu_copy_gbps = copy_gbps(1 << 30)
        print(f"copy bandwidth (read + write) of 1 GiB measured now: {gpu_copy_gbps:.1f} GB/s")
        ceiling = lambda case: gpu_copy_gbps  # noqa: E731
    else:
        print("copy bandwidth: measured per case, on a copy of one of its tensors (CPU caches are not flushed)")
        ceiling = lambda case: copy_gbps(case.tensor_bytes)  # noqa: E731

    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    tag = "".join(c if c.isalnum() else "-" for c in (name if device.type == "cuda" else "cpu")).strip("-").lower()
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"{tag}-{'quick-' if args.quick else ''}{stamp}")
    results = []
    report = dict(device=name, device_type=device.type, date=stamp, commit=_commit(), versions=_versions(),
                  quick=args.quick, cpu_kept_freed_memory=kept_freed_memory,
                  cpu_features=cpu_features() if device.type == "cpu" else None,
                  command=" ".join(["python -m bench"] + (sys.argv[1:] if argv is None else argv)), results=results)

    def save():  # after every case: a run cut short still leaves what it measured
        with open(base + ".json", "w") as f:
            json.dump(report, f, indent=1)

    for family in args.family:
        mod = FAMILIES[family]
        providers = args.provider or list(mod.PROVIDERS)
        todo = []  # (case, the providers that run it)
        for case in mod.cases(device, args.quick, dtypes, args.layout, args.mode or list(mod.MODES), args.shape):
            runs = [p for p in providers if mod.provider_refuses(p, device, case.dtype) is None]
            if runs:
                todo.append((case, runs))
        for p in providers:
            for dtype in dtypes:
                why = mod.provider_refuses(p, device, dtype)
                if why:
                    print(f"skipping {p} on {str(dtype)[6:]}: {why}")
        family_results = []
        cases_by_label = {case.label: case for case, _ in todo}
        for i, (case, runs) in enumerate(todo):
            _progress(i, len(todo), case.label)
            for p, t, checked in _time_case(mod, case, runs, device, args.quick):
                gbps = case.bytes / (t.median_ms * 1e-3) / 1e9
                copy = ceiling(case)
                family_results.append(dict(family=family, case=case.label, mode=case.mode, shape=list(case.shape),
                                           dtype=str(case.dtype)[6:], layout=case.layout, provider=p,
                                           median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                                           bytes=case.bytes, gbps=gbps, copy_gbps=copy,
                                           pct_of_copy=100 * gbps / copy, peak_mem_mb=t.peak_mem_mb,
                                           **(dict(max_error=checked[0], correct=checked[1]) if checked else {})))
                results[:] = [r for r in results if r["family"] != family] + mod.summarize(
                    family_results, device, cases_by_label)
                save()
        _progress(len(todo), len(todo), "done")
        sys.stderr.write("\n")

    print(_table(results))
    print(_accuracy_line(results))
    targets = _targets_table(results)
    if targets:
        print(targets)
    save()
    print(f"wrote {base}.json")
    if not args.no_plot and results:
        _plot(results, base + ".png", f"{name}, torch {torch.__version__}")
        print(f"wrote {base}.png")


if __name__ == "__main__":
    main()
