#!/usr/bin/env bash
# Compile checks of the CUDA backend on machines without a GPU or a CUDA torch:
#  1. every torch-free csrc/<op>/kernels.cu compiles with plain nvcc for sm_90 (object and cubin);
#  2. the torch-facing CUDA host files (csrc/<op>/cuda.cpp) pass a g++ syntax check against the
#     installed torch's headers (the CPU wheel ships the ATen/cuda and c10/cuda headers) and the
#     CUDA toolkit's. They cannot be linked against a CPU torch; the GPU build does that.
# Step 2 needs torch installed (it is skipped, saying so, when it is not).
set -euo pipefail
cd "$(dirname "$0")/.."
arch="${ERPD_CUDA_ARCH_CHECK:-90}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

if ! command -v nvcc >/dev/null; then
  echo "check_cuda_compile: nvcc not found; nothing checked" >&2
  exit 1
fi
cuda_inc="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")/include"
[ -f "$cuda_inc/cuda_runtime.h" ] || cuda_inc=/usr/local/cuda/include

for cu in csrc/*/kernels.cu; do
  name=$(basename "$(dirname "$cu")")
  nvcc -std=c++17 -O3 -Icsrc -arch=sm_${arch} -c "$cu" -o "$out/$name.o"
  nvcc -std=c++17 -O3 -Icsrc -arch=sm_${arch} --cubin "$cu" -o "$out/$name.cubin"
  echo "nvcc sm_${arch}: $cu -> object $(stat -c %s "$out/$name.o") B, cubin $(stat -c %s "$out/$name.cubin") B"
done

py="${PYTHON:-python3}"
if torch_inc=$("$py" -c "import torch.utils.cpp_extension as c; print(' '.join('-isystem ' + p for p in c.include_paths()))" 2>/dev/null); then
  abi=$("$py" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
  # The CPU wheel lacks the one header that CMake generates for CUDA builds of c10; an empty
  # stand-in (in the temp dir, for this check only) is enough for a syntax check.
  mkdir -p "$out/shim/c10/cuda/impl" && : >"$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
  for cpp in csrc/*/cuda.cpp; do
    # shellcheck disable=SC2086
    g++ -std=c++17 -fsyntax-only -DERPD_WITH_CUDA=1 -D_GLIBCXX_USE_CXX11_ABI=$abi -Icsrc $torch_inc -isystem "$cuda_inc" -isystem "$out/shim" "$cpp"
    echo "g++ syntax check (CUDA host, torch headers): $cpp ok"
  done
else
  echo "check_cuda_compile: torch not importable with $py; skipped the host-file syntax check"
fi
