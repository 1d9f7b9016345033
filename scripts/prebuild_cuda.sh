#!/usr/bin/env bash
# Builds cnnkern._C with CUDA on this machine for the GPU machines, into .prebuilt/ (ignored by
# git), so that a device call which carries it (run's carry: [".prebuilt"]) skips the build in
# scripts/gpu_check.sh: minutes of the 15 a session has on a device, machine start included.
# PYTHON must hold the GPU machines' torch (2.11.0+cu130; its CUDA build installs on a machine
# without a GPU) and nvcc must be found (CUDA_HOME). The build runs on a copy of the committed
# tree (a git worktree of HEAD), leaving this checkout's own build alone; gpu_check.sh uses the
# result only where its own sources, torch and GPU match the ones recorded in .prebuilt/built.txt
# and the extension loads there with its CUDA kernels (scripts/carried_build.sh); else it builds.
# TORCH_CUDA_ARCH_LIST: default 9.0 (H100 and H200).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/carried_build.sh
python=${PYTHON:?set PYTHON to a python whose torch is the GPU machines\' (e.g. 2.11.0+cu130)}
tree=$(mktemp -d /tmp/cnnkern-prebuild.XXXXXX)
trap 'git worktree remove --force "$tree"' EXIT
git worktree add --detach "$tree" HEAD > /dev/null
(cd "$tree" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} "$python" setup.py -q build_ext --inplace)
rm -rf .prebuilt && mkdir .prebuilt
cp "$tree"/cnnkern/_C*.so .prebuilt/
torch_version=$("$python" -c "import torch; print(torch.__version__)")
printf 'sources %s\ntorch %s\ncommit %s\narch %s\n' "$(sources_digest "$tree")" "$torch_version" \
  "$(git rev-parse --short HEAD)" "${TORCH_CUDA_ARCH_LIST:-9.0}" > .prebuilt/built.txt
cat .prebuilt/built.txt
ls -l .prebuilt
