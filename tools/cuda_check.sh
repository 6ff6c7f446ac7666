#!/usr/bin/env bash
# Compiles every .cu listed in csrc/SOURCES.txt with plain nvcc: the kernels are torch-free, so this
# needs only the CUDA toolkit (no CUDA build of torch, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
n=0
for src in $(awk '/^\[cuda\]/{f=1;next} /^\[/{f=0} f && /\.cu$/' csrc/SOURCES.txt); do
  echo "nvcc: $src"
  "$NVCC" -std=c++20 -O2 -Icsrc/include --expt-relaxed-constexpr \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -c "$src" -o "$out/$(basename "$src").o"
  n=$((n + 1))
done
echo "cuda-check: compiled $n CUDA source(s)"
