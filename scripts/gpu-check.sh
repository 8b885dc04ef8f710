#!/usr/bin/env bash
# On a machine with NVIDIA GPUs: builds herd with `--features cuda`, then compares the model on
# GPU against the CPU engine (greedy tokens and logits at every step, 5 prompts x 32 tokens) with
# one rank, and split over N GPUs when TP=N is given or the GPU count allows; prints decode
# tokens/s for each. Exits non-zero when the f32 comparison disagrees. Then serves a
# Vicuna-7B-shaped random f16 file (written here by examples/random_gguf, ~14 GB) with `herd up`
# on one GPU (and over 2 with NCCL where there are two): output tokens/s at concurrency 1, 16 and
# 64, and the paged KV cache's blocks in use after each.
#
# usage: bash scripts/gpu-check.sh   (MODEL=path, TP=N, TOLERANCE=1e-3, SEVEN=path, SKIP_7B=1)
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

# The paged KV cache at 7B size.
[ "${SKIP_7B:-0}" = 1 ] && exit 0
seven=${SEVEN:-/tmp/herd-vicuna-7b-f16.gguf}
[ -e "$seven" ] || time "$target/release/examples/random_gguf" --vocab-from "$MODEL" --shape vicuna-7b --out "$seven"
herd="$target/release/herd"
serve_7b() { # flags for herd up
  local port=8617 pid
  setsid "$herd" up --model "$seven" --dtype f16 --port "$port" "$@" >/tmp/herd-gpu-up.log 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 1; done
  curl -sf "http://127.0.0.1:$port/ready" >/dev/null || { tail -20 /tmp/herd-gpu-up.log; kill -- -"$pid"; return 1; }
  for c in 1 16 64; do
    local n=$((c < 8 ? 16 : 2 * c))
    printf 'concurrency %s: ' "$c"
    "$herd" bench --url "http://127.0.0.1:$port" --requests "$n" --max-tokens 64 --concurrency "$c" \
      --unique-prompts --json | grep -o '"output_tokens_per_s":[0-9.]*'
    curl -s "http://127.0.0.1:$port/admin/cluster" | grep -o '"kv_blocks_[a-z]*":[0-9]*' | tr '\n' ' '
    echo
  done
  kill -- -"$pid"
  sleep 3
}
echo "== Vicuna-7B-shaped f16 on one GPU (paged KV cache, --gpu-memory-utilization 0.9)"
serve_7b --devices cuda:0
if [ "$gpus" -ge 2 ]; then
  echo "== Vicuna-7B-shaped f16 over 2 GPUs (NCCL)"
  serve_7b --devices cuda --tp 2
fi
