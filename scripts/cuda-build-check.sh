#!/usr/bin/env bash
# Compiles (never runs) herd with `--features cuda` (candle's CUDA kernels, cuBLAS, NCCL through
# cudarc) on a machine without a GPU or a system CUDA, using NVIDIA's PyPI wheels, so that the GPU
# code paths keep compiling. `.ci/run` calls it; `scripts/gpu-check.sh` runs the result on a GPU.
#
# Why CUDA 13: the CUDA 12 nvcc wheels (nvidia-cuda-nvcc-cu12 12.0 .. 12.9) ship ptxas and
# libnvvm but not the nvcc driver, cicc, cudafe++, fatbinary or nvlink; the CUDA 13 wheels
# (nvidia-cuda-nvcc with nvidia-nvvm for cicc) ship a complete nvcc. A binary built this way needs
# an NVIDIA driver >= 580 where it runs.
#
# Cost on the 2-core development machine: the wheels are 1.4 GB (cached in $CUDA_WHEELS); a first
# build spends ~15 CPU-minutes in candle-kernels' nvcc step (its GGUF matmul kernels) and ~20 in
# rustc; later builds reuse $CUDA_TARGET_DIR and recompile only herd's crates.
#
# Usage: bash scripts/cuda-build-check.sh          install the wheels if missing, then build
#        source scripts/cuda-build-check.sh env    only export the build environment

CUDA_WHEELS=${CUDA_WHEELS:-/var/tmp/cuda-wheels}
CUDA_TARGET_DIR=${CUDA_TARGET_DIR:-/var/tmp/herd-cuda-target}
# No nvidia-smi to ask: build for Hopper (H100/H200), the GPUs herd's checks run on.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

install_wheels() {
  if [ ! -x "$CUDA_WHEELS/nvidia/cu13/bin/nvcc" ] || [ ! -e "$CUDA_WHEELS/nvidia/nccl/lib/libnccl.so.2" ]; then
    echo "cuda-build-check: installing the CUDA 13 toolkit wheels into $CUDA_WHEELS" >&2
    python3 -m pip install --quiet --no-deps --target "$CUDA_WHEELS" \
      nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
      nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 nvidia-nccl-cu13==2.30.7
  fi
  local lib="$CUDA_WHEELS/nvidia/cu13/lib"
  # The wheels ship only versioned libraries; the linker's -lfoo looks for libfoo.so.
  for l in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do
    ln -sf "lib$l" "$lib/lib${l%.so.*}.so"
  done
  ln -sf ../../nccl/lib/libnccl.so.2 "$lib/libnccl.so"
  # libcuda is the driver, which no wheel carries, and cudarc links it (-lcuda). Link against a
  # stub exporting the driver API cudarc declares; its soname makes the real driver load at run time.
  if [ ! -e "$lib/stubs/libcuda.so" ]; then
    mkdir -p "$lib/stubs"
    local cudarc
    cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 2>/dev/null | head -1 || true)
    if [ -z "$cudarc" ]; then
      cargo fetch --quiet
      cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -1)
    fi
    grep -ohE '\bfn cu[A-Za-z0-9_]+\(' "$cudarc/src/driver/sys/mod.rs" | sed 's/fn //; s/(//' | sort -u \
      | awk '{print "void " $1 "(void) {}"}' >"$lib/stubs/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/stubs/libcuda.so" "$lib/stubs/libcuda_stub.c"
  fi
}

export_env() {
  # cudarc finds the libraries under $CUDA_HOME/lib (and lib/stubs) and the version from nvcc.
  export CUDA_HOME="$CUDA_WHEELS/nvidia/cu13"
  export PATH="$CUDA_HOME/bin:$PATH"
}

if [ "${1:-}" = env ]; then
  export_env
  return 0 2>/dev/null || exit 0
fi

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v gcc >/dev/null || { echo "cuda-build-check: gcc is needed for the libcuda link stub" >&2; exit 1; }
install_wheels
export_env
CARGO_TARGET_DIR="$CUDA_TARGET_DIR" cargo build --release --workspace --bins --examples --features herd-worker/cuda
echo "cuda-build-check: herd and examples/tp_check compiled with --features cuda (in $CUDA_TARGET_DIR)"
