#!/usr/bin/env bash
# On a machine with NVIDIA GPUs: builds herd with `--features cuda`, then compares the model on
# GPU against the CPU engine (greedy tokens and logits at every step, 5 prompts x 32 tokens) with
# one rank, and split over N GPUs when TP=N is given or the GPU count allows; prints decode
# tokens/s for each. Exits non-zero when the f32 comparison disagrees.
#
# usage: bash scripts/gpu-check.sh            (MODEL=path, TP=N, TOLERANCE=1e-3 to override)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
TOLERANCE=${TOLERANCE:-1e-3}
[ -e "$MODEL" ] || bash scripts/fetch-test-model.sh
command -v nvidia-smi >/dev/null || { echo "gpu-check: nvidia-smi not found; this needs NVIDIA GPUs" >&2; exit 1; }
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
gpus=$(nvidia-smi -L | wc -l)
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}

if command -v nvcc >/dev/null; then
  target=${CARGO_TARGET_DIR:-target}
  time CARGO_TARGET_DIR="$target" cargo build --release --workspace --bins --examples --features herd-worker/cuda
else
  # No system toolkit: build against the PyPI wheels and load their libraries at run time.
  target=${CUDA_TARGET_DIR:-/var/tmp/herd-cuda-target}
  time bash scripts/cuda-build-check.sh
  wheels=${CUDA_WHEELS:-/var/tmp/cuda-wheels}/nvidia
  export LD_LIBRARY_PATH="$wheels/cu13/lib:$wheels/nccl/lib:${LD_LIBRARY_PATH:-}"
fi
check="$target/release/examples/tp_check"

echo "== one GPU, f32 weights, against the CPU (must agree within $TOLERANCE)"
"$check" --model "$MODEL" --devices cuda:0 --dtype f32 --tolerance "$TOLERANCE"
echo "== one GPU, quantized weights (GPU and CPU kernels round activations differently: informational)"
"$check" --model "$MODEL" --devices cuda:0 --tolerance 1e9 || true
tp=${TP:-$gpus}
if [ "$tp" -ge 2 ]; then
  echo "== $tp GPUs (NCCL), f32 weights, against the CPU"
  "$check" --model "$MODEL" --devices cuda --tp "$tp" --dtype f32 --tolerance "$TOLERANCE"
else
  echo "== one GPU only: TP over NCCL not checked (set TP=N with N GPUs)"
fi
