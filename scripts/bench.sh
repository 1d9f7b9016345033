#!/usr/bin/env bash
# The benchmark suite (the README's main command): set-up, then python -m bench.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m bench "$@"
