#!/usr/bin/env bash
# The test suite: set-up, then pytest (CUDA tests skip, with the reason, where no GPU is).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -n "${CNNKERN_TEST_JOBS:-2}" --dist loadgroup -q -rs "$@" tests
