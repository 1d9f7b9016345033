"""Two builds of cnnkern side by side: each op's time under a base checkout and under this one.

    python -m bench.ab --base /path/to/other/checkout [--shape 16,1024,7,7 ...]
        [--layout nchw,channels_last] [--dtype fp32] [--op fwd_relu,...] [--rounds 3] [--calls 60]

For a change whose effect is smaller than the machine's drift (the project's CPU machine moves
by up to 2x within minutes, and a ratio against eager from one `python -m bench` run carries
that): the registered ops (cnnkern::bn_forward_train, bn_forward_eval, bn_backward) timed in
child processes that alternate between the two builds, `rounds` times each. Per op, a child
takes the 10th percentile of `calls` single calls (a quantile below the median drops the
calls a neighbour slowed), and the table shows the best round of each build. The base must
be a checkout with its extension built in place (`python setup.py build_ext --inplace`), and
its ops must take the arguments this checkout passes (the schemas of csrc/ops.cpp).
"""
import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from .cli import DTYPES, comma_list, shape_arg

ROOT = Path(__file__).resolve().parent.parent
# bwd_relu: the backward of the fwd_bwd_relu benchmark (no residual), its ReLU mask recomputed
# from x; bwd_relu_read_mask: the same, the mask read from the output (`--base .` sets the two
# side by side in one build); bwd_add_relu: with a residual.
OPS = ("fwd_relu", "fwd_add_relu", "eval_relu", "bwd_relu", "bwd_relu_read_mask", "bwd_add_relu")


def _child(build: Path, cases, dtype_name: str, ops_timed, calls: int) -> dict:
    """{case: {op: ms}} for the cnnkern of checkout `build`."""
    import time

    import torch

    sys.path.insert(0, str(build))
    import cnnkern  # registers the ops

    if Path(cnnkern.__file__).resolve().parent != build / "cnnkern":
        raise RuntimeError(f"imported {cnnkern.__file__}, not the build under test in {build}")

    # bench.timing of this checkout, by path: the base's bench package may predate it.
    spec = importlib.util.spec_from_file_location("_ab_timing", Path(__file__).with_name("timing.py"))
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        timing.keep_freed_cpu_memory()
    ops, dtype = torch.ops.cnnkern, DTYPES[dtype_name]

    def quantile_ms(fn) -> float:
        for _ in range(5):
            fn()
        times = []
        for _ in range(calls):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 10] * 1e3

    out = {}
    for shape, layout in cases:
        torch.manual_seed(0)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
        C, p = shape[1], torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        r, g = torch.randn_like(x), torch.randn_like(x)
        w, b = torch.rand(C, device=device, dtype=p) + 0.5, torch.randn(C, device=device, dtype=p)
        rm, rv = torch.zeros(C, device=device, dtype=p), torch.ones(C, device=device, dtype=p)
        y, mean, invstd = ops.bn_forward_train(x, w, b, r, rm, rv, 0.1, 1e-5, True)
        calls_of = {
            "fwd_relu": lambda: ops.bn_forward_train(x, w, b, None, rm, rv, 0.1, 1e-5, True),
            "fwd_add_relu": lambda: ops.bn_forward_train(x, w, b, r, rm, rv, 0.1, 1e-5, True),
            "eval_relu": lambda: ops.bn_forward_eval(x, w, b, None, rm, rv, 1e-5, True),
            # output None: the mask recomputed from x, as autograd asks after a forward without residual
            "bwd_relu": lambda: ops.bn_backward(g, x, None, w, b, mean, invstd, True, True, [True, True, True, False]),
            "bwd_relu_read_mask": lambda: ops.bn_backward(g, x, y, w, b, mean, invstd, True, True,
                                                          [True, True, True, False]),
            "bwd_add_relu": lambda: ops.bn_backward(g, x, y, w, b, mean, invstd, True, True, [True] * 4),
        }
        out[_case_name(shape, layout)] = {op: quantile_ms(calls_of[op]) for op in ops_timed}
    return out


def _case_name(shape, layout) -> str:
    return f"{'x'.join(map(str, shape))} {layout}"


def _commit(path: Path) -> str:
    done = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the other checkout, its extension built in place")
    parser.add_argument("--shape", type=shape_arg, nargs="+", default=[(16, 1024, 7, 7)], metavar="N,C,H,W")
    parser.add_argument("--layout", type=comma_list(["nchw", "channels_last"]), default=["nchw"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--op", type=comma_list(OPS), default=list(OPS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # a build: time it, print JSON
    args = parser.parse_args(argv)
    cases = [(shape, layout) for shape in args.shape for layout in args.layout]
    if args.child:
        print(json.dumps(_child(args.child.resolve(), cases, args.dtype, args.op, args.calls)))
        return
    if not (args.base / "cnnkern").is_dir():
        parser.error(f"--base {args.base}: no cnnkern package there (expected a checkout of this repository)")

    builds = {"base": args.base.resolve(), "new": ROOT}
    best = {}  # (case, op, build) -> ms
    forwarded = argv if argv is not None else sys.argv[1:]
    for _ in range(args.rounds):
        for build, path in builds.items():
            done = subprocess.run([sys.executable, "-m", "bench.ab", *forwarded, "--child", str(path)], cwd=ROOT,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"the {build} build ({path}) failed:\n{done.stderr[-2000:]}")
            for case, times in json.loads(done.stdout.splitlines()[-1]).items():
                for op, ms in times.items():
                    best[case, op, build] = min(ms, best.get((case, op, build), float("inf")))
    print(f"ops side by side, {args.dtype}, {args.rounds} rounds of {args.calls} calls (10th percentile, best "
          f"round): base {builds['base']} ({_commit(builds['base'])}), new {ROOT} ({_commit(ROOT)})")
    print(f"{'case':<26} {'op':<18} {'base ms':>8} {'new ms':>8} {'new/base':>8}")
    for shape, layout in cases:
        case = _case_name(shape, layout)
        for op in args.op:
            base, new = best[case, op, "base"], best[case, op, "new"]
            print(f"{case:<26} {op:<18} {base:>8.3f} {new:>8.3f} {new / base:>8.2f}")


if __name__ == "__main__":
    main()
