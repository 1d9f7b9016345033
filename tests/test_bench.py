"""The benchmark suite's own logic, which a CPU machine can check: argument lists,
the parsing of Nsight Compute's CSV by bench/dram.py (run on a GPU only), and the
host-time table of bench/host.py."""
import argparse
import json
import math
import time

import pytest

import torch

from bench import ab, dram, host
from bench.__main__ import _accuracy_line, _targets_table, parse_args
from bench.cli import comma_list
from cnnkern.reference import max_error

NCU_CSV = '''==PROF== Connected to process 123
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","123","python3","h","_bn_stats_kernel","1","7","(128, 1, 1)","(8, 132, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","Mbyte","205.52"
"0","123","python3","h","_bn_stats_kernel","1","7","(128, 1, 1)","(8, 132, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","Kbyte","12.5"
"0","123","python3","h","_bn_stats_kernel","1","7","(128, 1, 1)","(8, 132, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","70.1"
"1","123","python3","h","_bn_fwd_kernel","1","7","(128, 1, 1)","(8, 132, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","180,000,000"
"1","123","python3","h","_bn_fwd_kernel","1","7","(128, 1, 1)","(8, 132, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","Mbyte","205.52"
"1","123","python3","h","_bn_fwd_kernel","1","7","(128, 1, 1)","(8, 132, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","130,000"
"1","123","python3","h","_bn_fwd_kernel","1","7","(128, 1, 1)","(8, 132, 1)","0","9.0","Launch Statistics","launch__registers_per_thread","register/thread","72"
"1","123","python3","h","_bn_fwd_kernel","1","7","(128, 1, 1)","(8, 132, 1)","0","9.0","Launch Statistics","launch__waves_per_multiprocessor","","1.14"
"1","123","python3","h","_bn_fwd_kernel","1","7","(128, 1, 1)","(8, 132, 1)","0","9.0","Command line profiler metrics","l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum","sector","1,600,000"
"1","123","python3","h","_bn_fwd_kernel","1","7","(128, 1, 1)","(8, 132, 1)","0","9.0","Command line profiler metrics","l1tex__t_requests_pipe_lsu_mem_global_op_st.sum","request","100,000"
"1","123","python3","h","_bn_fwd_kernel","1","7","(128, 1, 1)","(8, 132, 1)","0","9.0","Command line profiler metrics","lts__throughput.avg.pct_of_peak_sustained_elapsed","%","61.5"
'''


def test_ncu_csv_rows_and_table():
    rows = dram._kernel_rows(NCU_CSV)
    assert [r[0] for r in rows] == ["_bn_stats_kernel", "_bn_fwd_kernel"]
    stats, fwd = rows[0][1], rows[1][1]
    assert (stats[dram.READ], stats[dram.WRITE], stats[dram.TIME]) == pytest.approx((205.52e6, 12.5e3, 70.1e3))
    assert (fwd[dram.READ], fwd[dram.WRITE], fwd[dram.TIME]) == pytest.approx((180e6, 205.52e6, 130e3))
    assert (fwd[dram.REGS], fwd[dram.WAVES]) == pytest.approx((72, 1.14))
    assert (fwd[dram.ST_SECTORS], fwd[dram.ST_REQUESTS], fwd[dram.BUSY["L2%"]]) == pytest.approx((1.6e6, 100e3, 61.5))
    table = dram._table([("triton nchw fwd_relu", 411_041_792, 2)], rows)
    moved = (205.52e6 + 12.5e3 + 180e6 + 205.52e6) / 411_041_792
    assert f"{moved:.2f}x" in table.splitlines()[-1].split()
    fwd_line = table.splitlines()[-2].split()
    assert fwd_line[0] == "_bn_fwd_kernel" and fwd_line[7] == "16.0" and fwd_line[9] == "62"  # st s/r, L2%


def test_bench_lists_are_checked():
    assert parse_args(["--mode", "fwd_relu,eval_relu"]).mode == ["fwd_relu", "eval_relu"]
    with pytest.raises(SystemExit):
        parse_args(["--mode", "fwd_relu,nope"])
    with pytest.raises(argparse.ArgumentTypeError, match="expected a comma list of a, b"):
        comma_list(["a", "b"])("a,c")


def test_bench_shapes_replace_the_defaults():
    from bench.batch_norm import CPU_SHAPES, cases

    args = parse_args(["--shape", "4,64,28,28", "2,3,5,1"])
    assert args.shape == [(4, 64, 28, 28), (2, 3, 5, 1)]
    cpu = torch.device("cpu")
    picked = cases(cpu, False, [torch.float32], ["nchw"], ["fwd_relu"], args.shape)
    assert [c.shape for c in picked] == [(4, 64, 28, 28), (2, 3, 5, 1)]
    assert [c.shape for c in cases(cpu, False, [torch.float32], ["nchw"], ["fwd_relu"])] == CPU_SHAPES
    for bad in ("4", "2,3,5", "4,0,2,2", "4,x,2,2"):
        with pytest.raises(SystemExit):
            parse_args(["--shape", bad])


def test_dram_filters_and_knobs(monkeypatch):
    args = dram.parse_args(["--backend", "cuda", "--layout", "channels_last"])
    assert (args.backend, args.layout) == (["cuda"], ["channels_last"])
    with pytest.raises(SystemExit):
        dram.parse_args(["--backend", "cudnn"])
    for name in dram.KNOBS:
        monkeypatch.delenv(name, raising=False)
    assert dram.raw_name(dram.knobs()) == "dram.csv"
    monkeypatch.setenv("CNNKERN_CUDA_ROW_BYTES", "32")
    monkeypatch.setenv("CNNKERN_CUDA_ONE_PASS", "0")
    monkeypatch.setenv("CNNKERN_TRITON_MERGE_LAUNCH", "0")
    # Runs under different knobs keep apart; the names stay plain (they come back from $OUT).
    assert dram.raw_name(dram.knobs()) == "dram-cuda_row_bytes32-cuda_one_pass0-triton_merge_launch0.csv"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU table (Triton launches stubbed out)")
def test_host_table_times_every_layer_without_launching():
    from cnnkern.triton import batch_norm as kernels

    real = {name: getattr(kernels, name) for name in host.KERNELS}
    with host.no_triton_launches():
        assert all(isinstance(getattr(kernels, name), host._NoLaunch) for name in host.KERNELS)
    assert {name: getattr(kernels, name) for name in host.KERNELS} == real
    rows = [row.split() for row in list(host.table((2, 3, 4, 4), torch.float32, calls=5))[2:]]
    functional = ["functional, no grad", "autograd forward", "autograd forward + backward"]
    ops = ["op forward", "op backward"]
    assert [(row[0], " ".join(row[1:-1])) for row in rows] == (
        [("triton", layer) for layer in ["wrapper forward", "wrapper backward"] + ops + functional] +
        [("cpu", layer) for layer in ops + functional] + [("eager", layer) for layer in functional])
    assert all(float(row[-1]) > 0 for row in rows)


def test_targets_follow_the_issue():
    """On a GPU: fwd_relu >= 1.5x eager and >= 1.1x torch.compile, bwd_add_relu >= 1.5x eager,
    every mode >= 80% of copy, for bf16 and fp32; a metric the run lacks is not met."""
    from bench.batch_norm import Case, summarize

    shape = (128, 256, 56, 56)
    cases = [Case("fwd_relu", shape, torch.bfloat16, "nchw"), Case("eval_relu", shape, torch.float32, "nchw"),
             Case("fwd_relu", shape, torch.float64, "nchw")]

    def result(case, provider, ms, pct=50.0, correct=True):
        checked = dict(max_error=0.0 if correct else 0.5, correct=correct) if provider.startswith("cnnkern") else {}
        return dict(case=case.label, provider=provider, median_ms=ms, pct_of_copy=pct, **checked)

    results = [result(cases[0], "eager", 3.0), result(cases[0], "compile", 1.0),
               result(cases[0], "cnnkern-cuda", 1.0, 85.0), result(cases[1], "cnnkern-triton", 1.0),
               result(cases[2], "cnnkern-cuda", 1.0), result(cases[0], "cnnkern-triton", 0.5, 90.0, correct=False)]
    summarize(results, torch.device("cuda"), {c.label: c for c in cases})
    fwd, evaluation, fp64, wrong = (results[i]["targets"] for i in (2, 3, 4, 5))
    assert {m: (t["want"], t["met"]) for m, t in fwd.items()} == {
        "speedup_vs_eager": (1.5, True), "speedup_vs_compile": (1.1, False), "pct_of_copy": (80.0, True)}
    assert evaluation == {"pct_of_copy": dict(want=80.0, got=50.0, met=False)}
    assert fp64 == {} and "targets" not in results[0]
    # Fast but wrong: its outputs failed the accuracy check, so it meets nothing.
    assert {m: (t["got"], t["met"]) for m, t in wrong.items()} == {
        "speedup_vs_eager": (6.0, False), "speedup_vs_compile": (2.0, False), "pct_of_copy": (90.0, False)}
    table = _targets_table(results)
    assert table.splitlines()[0].endswith("2 of 7 met")
    assert "x compile 1.00 (>= 1.1) MISSED" in table and "x eager 3.00 (>= 1.5) met" in table
    accuracy = _accuracy_line(results)
    assert accuracy.splitlines()[0].startswith("accuracy: 1 of 4 cnnkern results are WRONG")
    assert accuracy.splitlines()[1].split()[-1] == "5.00e-01"

    cpu_case = Case("fwd_bwd_relu", (32, 64, 56, 56), torch.float32, "nchw")
    cpu = [result(cpu_case, "cnnkern-cpu", 1.0)]  # no eager in this run
    summarize(cpu, torch.device("cpu"), {cpu_case.label: cpu_case})
    assert cpu[0]["targets"] == {"speedup_vs_eager": dict(want=1.5, got=None, met=False)}
    assert "x eager not measured (>= 1.5) MISSED" in _targets_table(cpu)


def test_ab_times_both_builds(capsys, tmp_path):
    """bench.ab against this same checkout as its base: every case and op gets a row with both
    builds' times (--op picks ops, in its order); a base with no cnnkern package is refused by name."""
    root = str(ab.ROOT)
    ab.main(["--base", root, "--shape", "4,3,2,2", "--layout", "nchw,channels_last", "--rounds", "1", "--calls", "3"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[2]) for r in rows] == [(case, op) for case in ("4x3x2x2", "4x3x2x2") for op in ab.OPS]
    assert [r[1] for r in rows] == ["nchw"] * len(ab.OPS) + ["channels_last"] * len(ab.OPS)
    for r in rows:
        base, new, ratio = map(float, r[3:])
        # The times print to 3 decimals (half a unit either way), the ratio to 2, of the exact times.
        assert base > 0 and new > 0
        assert (new - 5e-4) / (base + 5e-4) - 5e-3 <= ratio <= (new + 5e-4) / (base - 5e-4) + 5e-3
    ab.main(["--base", root, "--shape", "4,3,2,2", "--op", "bwd_relu,eval_relu", "--rounds", "1", "--calls", "3"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[2] for r in rows] == ["bwd_relu", "eval_relu"]
    with pytest.raises(SystemExit):
        ab.main(["--base", str(tmp_path)])
    assert "no cnnkern package" in capsys.readouterr().err


def test_interleaved_timing_takes_turns():
    """On the CPU, the providers of a case run in turns of a few calls each until every one has
    had its run time, or the slowest four times that."""
    from bench.timing import time_interleaved

    calls = []

    def sleeper(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)
        return fn

    timings = time_interleaved({"fast": sleeper("fast", 0.0005), "slow": sleeper("slow", 0.004)}, quick=True,
                               calls_per_turn=3, min_calls=6)
    assert calls[:2] == ["fast", "slow"]  # the warm-up calls
    turns = [calls[i:i + 3] for i in range(2, len(calls), 3)]
    assert len(turns) >= 4 and turns == [["fast"] * 3, ["slow"] * 3] * (len(turns) // 2)
    # The slow one's four times 0.3 s end the run, within a turn (each of its calls sleeps 4 ms
    # or more), long before the fast one could have run for 0.3 s.
    assert 0.004 * (calls.count("slow") - 1) <= 4 * 0.3 + 3 * 0.004
    assert timings["slow"].median_ms >= 4.0 and timings["fast"].median_ms >= 0.5
    assert timings["fast"].p20_ms <= timings["fast"].median_ms <= timings["fast"].p80_ms


def test_cpu_run_writes_ratios(tmp_path):
    """A CPU run of two providers on a tiny shape: a JSON whose cnnkern results carry their
    speedup against eager."""
    from bench.__main__ import main

    main(["--quick", "--shape", "2,3,4,4", "--provider", "cnnkern-cpu,eager", "--layout", "nchw", "--mode",
          "fwd_relu,bwd_add_relu", "--device", "cpu", "--no-plot", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("cpu-quick-*.json")
    results = json.loads(path.read_text())["results"]
    assert sorted((r["mode"], r["provider"]) for r in results) == [
        ("bwd_add_relu", "cnnkern-cpu"), ("bwd_add_relu", "eager"), ("fwd_relu", "cnnkern-cpu"), ("fwd_relu", "eager")]
    for r in results:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["speedup_vs_eager"] > 0
        # cnnkern's outputs were checked against the float64 oracle before timing; eager's are the bar.
        assert (r["correct"], r["max_error"] < 1e-6) == (True, True) if r["provider"] == "cnnkern-cpu" else \
            "correct" not in r


def test_checker_holds_gradients_through_each_results_mask():
    """bf16 backward with residual, on inputs (seed 0) where eager's ReLU mask flips at a value
    rounding across zero: against the plain oracle eager's gradients err by about one |g|,
    against the oracle through its own mask by its rounding, and so does cnnkern's."""
    from bench.batch_norm import Case, checker, make_fn

    case, cpu = Case("bwd_add_relu", (2, 3, 7, 7), torch.bfloat16, "nchw"), torch.device("cpu")
    _, eager = make_fn("eager", case, cpu, with_output=True)()
    _, plain = make_fn("reference", case, cpu, with_output=True)()
    assert max(max_error(e, o) for e, o in zip(eager, plain)) > 0.1
    check = checker(case, cpu)
    for provider in ("eager", "cnnkern-cpu"):
        error, correct = check(provider)
        assert correct and error < 5e-3, provider


def test_accuracy_follows_the_tests_rule():
    """The benchmark's check: each output no further from the float64 oracle than twice eager's
    error plus the dtype's margin (the tests' rule). Each result has its own oracle, whose
    gradients pass its own ReLU mask (bench.batch_norm.checker), so that where eager's mask
    flips, a value rounding across zero, its error stays small and the bound tight."""
    from bench.batch_norm import accuracy

    oracle = [torch.randn(64, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    oracle[0][5] = 1.5  # the value whose mask flips below: as large as a typical gradient
    scale = max(oracle[0].abs().max().item(), 1.0)
    eager = [t.to(torch.bfloat16) for t in oracle]
    assert accuracy(eager, eager, oracle, oracle, torch.bfloat16) == (pytest.approx(max(
        (e.double() - o).abs().max().item() / max(o.abs().max().item(), 1.0) for e, o in zip(eager, oracle))), True)
    flipped = [t.clone() for t in eager]
    flipped[0][5] = 0.0  # eager's mask flipped here: its own oracle's gradient is 0 there too
    flipped_oracle = [t.clone() for t in oracle]
    flipped_oracle[0][5] = 0.0
    assert accuracy(flipped, flipped, flipped_oracle, flipped_oracle, torch.bfloat16)[1]
    # An error of 5% of the scale, elsewhere: within the bound that one oracle for both would
    # give (eager's flip priced as its error), outside the bound of eager's own oracle.
    off = [t.clone() for t in eager]
    off[0][7] += 0.05 * scale
    assert accuracy(off, flipped, oracle, oracle, torch.bfloat16)[1]
    error, correct = accuracy(off, flipped, oracle, flipped_oracle, torch.bfloat16)
    assert not correct and error == pytest.approx(0.05, abs=5e-3)
    # One output (the forwards): float32 within 2e-5 of exact passes, 1e-3 does not.
    y = [torch.rand(1000, dtype=torch.float64) + 0.5]
    assert accuracy([y[0].float()], [y[0].float()], y, y, torch.float32)[1]
    assert not accuracy([y[0].float() * (1 + 1e-3)], [y[0].float()], y, y, torch.float32)[1]
    nan = [t.clone() for t in eager]
    nan[1][0] = float("nan")  # after a finite output: the error says NaN, not the finite one's
    error, correct = accuracy(nan, eager, oracle, oracle, torch.bfloat16)
    assert math.isnan(error) and not correct
