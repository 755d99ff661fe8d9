#!/usr/bin/env bash
# Compile every kernels/*.cu with plain `nvcc -c` for sm_80 and sm_90 (no torch needed).
# Skips (exit 0, saying so) when nvcc is not installed; fails on any compile error.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
  echo "nvcc check: nvcc not found, skipped"
  exit 0
fi
shopt -s nullglob
sources=(kernels/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "nvcc check: no kernels/*.cu"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for arch in sm_80 sm_90; do
  for src in "${sources[@]}"; do
    obj="$out/$(basename "$src" .cu).$arch.o"
    if "$NVCC" -c -std=c++17 -O3 -arch="$arch" -I kernels "$src" -o "$obj"; then
      echo "nvcc check: $src [$arch] ok"
    else
      echo "nvcc check: $src [$arch] FAILED"
      status=1
    fi
  done
done
exit $status
