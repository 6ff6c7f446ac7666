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
# The torch glue (.cpp under [cuda]) needs torch headers: syntax-check it against the installed torch (a CPU
# build lacks one generated CUDA header; tools/cuda_stub stands in for it).
PY=${PY:-.venv/bin/python}
if TI=$("$PY" -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null); then
  CUDA_INC=$(dirname "$(command -v "$NVCC")")/../include
  for src in $(awk '/^\[cuda\]/{f=1;next} /^\[/{f=0} f && /\.cpp$/' csrc/SOURCES.txt); do
    echo "g++ -fsyntax-only: $src"
    ${CXX:-g++} -std=c++20 -fsyntax-only -DPYMERGE_WITH_CUDA $(printf -- '-I%s ' $TI) -I"$CUDA_INC" \
      -I/usr/local/cuda/include -Itools/cuda_stub -Icsrc/include "$src"
  done
else
  echo "cuda-check: no torch importable with $PY; skipped the syntax check of the CUDA glue"
fi
