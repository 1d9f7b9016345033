# Sourced by scripts/prebuild_cuda.sh and scripts/gpu_check.sh: a build of cnnkern._C made on the
# CPU machine (.prebuilt/) and carried to a GPU machine, in place of building there.

# sources_digest DIR: the sha256 of what a build of cnnkern._C reads under DIR (setup.py and every
# file under csrc/, by path and content).
sources_digest() {
  (cd "$1" && find setup.py csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1
}

# recorded KEY: what .prebuilt/built.txt says of KEY (sources, torch, commit, arch).
recorded() { sed -n "s/^$1 //p" .prebuilt/built.txt; }

# carried_build_fits LOG_DIR, in the tree's root: whether .prebuilt was built from this tree's
# sources, against this python3's torch, for $TORCH_CUDA_ARCH_LIST, and loads with its CUDA
# kernels; then it is in place as cnnkern/_C. Where there is one and it does not fit, says why.
carried_build_fits() {
  [ -f .prebuilt/built.txt ] || return 1
  local why=""
  [ "$(recorded sources)" = "$(sources_digest .)" ] || why="built from other sources"
  [ "$(recorded torch)" = "$(python3 -c 'import torch; print(torch.__version__)')" ] \
    || why="${why:+$why; }built against torch $(recorded torch)"
  [[ ";$(recorded arch);" == *";$TORCH_CUDA_ARCH_LIST;"* ]] \
    || why="${why:+$why; }built for $(recorded arch), not $TORCH_CUDA_ARCH_LIST"
  if [ -z "$why" ]; then
    cp .prebuilt/_C*.so cnnkern/
    why=$(python3 -c "import cnnkern; b = cnnkern.backends()['cuda']; print('' if b.available else b.reason)" \
          2> "$1/carried_build.log") || why="cnnkern does not import with it: $(tail -1 "$1/carried_build.log")"
  fi
  [ -z "$why" ] && return 0
  echo "cnnkern: not the carried build (.prebuilt): $why"
  return 1
}
