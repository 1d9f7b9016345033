#!/usr/bin/env bash
# Idempotent set-up for the README's commands and CI: torch, the extras, and
# cnnkern built in place (rebuilt only when csrc/, setup.py or torch change).
# Never downloads a CUDA build of torch: a missing torch is installed pinned,
# which on this project's CPU machines takes the local CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (pinned: an unpinned torch pulls a CUDA build)"
  "$PY" -m pip install -q torch==2.13.0
fi

missing=$("$PY" - <<'PY'
import importlib.util
# wheel: the build runs without isolation (--no-build-isolation), so pyproject's build
# requirements must be here; a fresh venv has setuptools but not wheel.
need = {"triton": "triton>=3.0", "pytest": "pytest>=7", "xdist": "pytest-xdist",
        "matplotlib": "matplotlib", "numpy": "numpy", "ninja": "ninja", "wheel": "wheel"}
print(" ".join(spec for mod, spec in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  echo "setup: installing $missing"
  "$PY" -m pip install -q $missing
fi

stamp=.cnnkern-build-stamp
want=$("$PY" - <<'PY'
import hashlib, os, pathlib, torch
h = hashlib.sha256(f"{torch.__version__} {os.environ.get('FORCE_CUDA', '')}".encode())
for p in sorted(pathlib.Path("csrc").rglob("*")) + [pathlib.Path("setup.py"), pathlib.Path("pyproject.toml")]:
    if p.is_file():
        h.update(str(p).encode() + p.read_bytes())
print(h.hexdigest())
PY
)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$PY" -c "import cnnkern._C" 2>/dev/null; then
  echo "setup: building cnnkern (pip install --no-build-isolation --no-deps -e .)"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Running pip as the 'root'" || true
  "$PY" -c "import cnnkern._C" || { echo "setup: cnnkern._C failed to build" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
