#!/usr/bin/env bash
# One call on a GPU machine: build with CUDA, run the quick benchmark and the cuda tests,
# leave logs and the result JSON in $1 (default $OUT, else bench/results).
# A session has 15 minutes of device time, machine starts included: run it with
# timeout_s=560 (BUDGET=520 seconds for the stages, 40 to spare). The one-pass kernels
# (cooperative launches whose blocks wait on each other) are tried first, killed after
# 90 s: if they fail or hang, everything after runs without them (CNNKERN_CUDA_ONE_PASS=0)
# rather than hanging the benchmark too. Then the benchmark, which the performance targets
# need, and which checks every cnnkern result against the float64 oracle before timing it:
# it gets all the time the later stages do not reserve, and saves its JSON after every case,
# so a stage cut short still leaves what it measured. Each later stage takes its own budget
# or what is left of BUDGET, the smaller: the cuda tests TEST_BUDGET (default 100; cut with
# SIGINT, so pytest still prints what passed), the DRAM-traffic check (bench/dram.py, under
# ncu; then again for the channels_last kernels with the rows they had before:
# CNNKERN_CUDA_ROW_BYTES=32, CNNKERN_TRITON_MERGE_LAUNCH=0) DRAM_BUDGET (default 60), the cuda
# backward's ReLU mask recomputed from x against read from the output (bench/ab.py, float32)
# AB_BUDGET (default 30), the host time per call of each layer (bench/host.py) HOST_BUDGET
# (default 15).
# The extension is built for this GPU's architecture only, unless TORCH_CUDA_ARCH_LIST
# says otherwise; or not built at all where the call carries a build of the same sources made
# on the CPU machine (scripts/prebuild_cuda.sh: carry [".prebuilt"]).
# Arguments after OUT replace the benchmark's default `--quick` (e.g. `--mode fwd_relu`
# for the full shapes of one mode); TEST_BUDGET=0 skips the tests.
# The GPU machines have torch, triton, pytest and ninja but no network: nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results}}
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$SECONDS
stage() { echo "== $1 ($((SECONDS - start)) s in)"; }
source scripts/carried_build.sh

stage "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"

stage "build"
# Tests and tools that start a python of their own import cnnkern from this tree.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || exit 1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
if carried_build_fits "$out"; then
  echo "cnnkern: the carried build ($(tr '\n' ' ' < .prebuilt/built.txt))"
else
  rm -f cnnkern/_C*.so
  FORCE_CUDA=1 MAX_JOBS=16 python3 -m pip install -v --no-build-isolation --no-deps --no-index -e . \
    > "$out/build.log" 2>&1 || { grep -E "error" "$out/build.log" | head -30; tail -20 "$out/build.log"; exit 1; }
  grep "cnnkern:" "$out/build.log"
fi

bench_args=("$@")
[ ${#bench_args[@]} -gt 0 ] || bench_args=(--quick)
stage "one-pass kernels"
timeout -s KILL 90 python3 -m pytest -q -rfEs --tb=short tests/test_one_pass.py > "$out/one_pass.log" 2>&1
rc=$?
tail -8 "$out/one_pass.log"
if [ $rc -ne 0 ]; then
  echo "one-pass kernels failed (pytest exit $rc; 137: killed at 90 s): the rest runs without them"
  export CNNKERN_CUDA_ONE_PASS=0
  # The cnnkern-cuda provider switches them back on; cnnkern-cuda-two-pass stays.
  bench_args+=(--provider cnnkern-triton,cnnkern-cuda-two-pass,eager,compile)
fi

budget=${BUDGET:-520}
test_budget=${TEST_BUDGET:-100}
dram_budget=${DRAM_BUDGET:-60}
ab_budget=${AB_BUDGET:-30}
host_budget=${HOST_BUDGET:-15}
# The smaller of a stage's budget and what is left of BUDGET; 0 (skip the stage) under 10 s.
within() { local left=$(( budget - (SECONDS - start) )); echo $(( left < 10 ? 0 : ($1 < left ? $1 : left) )); }

stage "benchmark"
left=$(( budget - (SECONDS - start) - test_budget - dram_budget - ab_budget - host_budget - 10 ))
[ "$left" -ge 60 ] || left=60  # after a slow build the later stages give way (within), not the benchmark
timeout "$left" python3 -m bench --out "$out" --no-plot "${bench_args[@]}" > "$out/bench.log" 2>&1
echo "bench exit $? (124: cut at $left s)"
grep -v "^\[" "$out/bench.log" | tail -60

test_budget=$(within "$test_budget")
if [ "$test_budget" -gt 0 ]; then
  stage "cuda tests"
  # Several workers: most of the time goes to compiling Triton kernels, on the CPU.
  # A per-test limit where pytest-timeout is installed: a hung kernel costs one worker, not the stage.
  per_test=()
  python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=60 --timeout-method=thread)
  timeout -s INT -k 15 "$test_budget" python3 -m pytest -q -rfEs --tb=short -n 8 -m cuda "${per_test[@]}" \
    --ignore=tests/test_one_pass.py tests > "$out/tests_cuda.log" 2>&1
  echo "pytest exit $? (2: interrupted at $test_budget s)"
  grep -E "^(FAILED|ERROR)" "$out/tests_cuda.log" | head -30
  tail -3 "$out/tests_cuda.log"
fi

dram_budget=$(within "$dram_budget")
if [ "$dram_budget" -gt 0 ]; then
  stage "DRAM traffic (ncu)"
  # Two thirds of the budget for every kernel, the rest for the channels_last kernels with
  # the rows they had before 128 bytes (cuda: 32-byte rows; triton: no merge launch, which
  # leaves 16 channels), to set side by side with theirs.
  all_budget=$(( dram_budget * 2 / 3 ))
  timeout "$all_budget" python3 -m bench.dram --out "$out" > "$out/dram.log" 2>&1
  echo "dram exit $? (124: cut at $all_budget s)"
  cat "$out/dram.log"
  CNNKERN_CUDA_ROW_BYTES=32 CNNKERN_TRITON_MERGE_LAUNCH=0 timeout $(( dram_budget - all_budget )) \
    python3 -m bench.dram --out "$out" --layout channels_last > "$out/dram-narrow_rows.log" 2>&1
  echo "dram (narrow channels_last rows) exit $?"
  cat "$out/dram-narrow_rows.log"
fi

ab_budget=$(within "$ab_budget")
if [ "$ab_budget" -gt 0 ]; then
  stage "ReLU mask: recomputed against read"
  timeout "$ab_budget" python3 -m bench.ab --base . --shape 128,256,56,56 --layout nchw,channels_last --dtype fp32 \
    --op bwd_relu,bwd_relu_read_mask --rounds 2 --calls 40 > "$out/mask_ab.log" 2>&1
  echo "ab exit $? (124: cut at $ab_budget s)"
  cat "$out/mask_ab.log"
fi

host_budget=$(within "$host_budget")
if [ "$host_budget" -gt 0 ]; then
  stage "host time per call"
  timeout "$host_budget" python3 -m bench.host --calls 1000 > "$out/host.log" 2>&1
  echo "host exit $? (124: cut at $host_budget s)"
  cat "$out/host.log"
fi
stage "done"
