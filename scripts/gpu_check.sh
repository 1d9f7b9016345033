#!/usr/bin/env bash
# One call on a GPU machine: build with CUDA, run the cuda tests and the quick
# benchmark, leave logs and result JSON in $1 (default $OUT, else bench/results).
# The GPU machines have torch, triton, pytest and ninja but no network: nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
FORCE_CUDA=1 MAX_JOBS=16 python3 -m pip install -v --no-build-isolation --no-deps --no-index -e . \
  > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
grep "cnnkern:" "$out/build.log"
python3 -m pytest -q -rs -m cuda tests 2>&1 | tee "$out/tests_cuda.log" | tail -30
python3 -m bench --quick --out "$out" --no-plot 2>&1 | tee "$out/bench.log" | tail -60
