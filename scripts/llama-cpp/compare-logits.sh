#!/usr/bin/env bash
# Compares herd's logits with llama.cpp's (AVX2 build, as the fixtures were made) on one model
# and a fixed forced sequence of 64 tokens in one batch: bit-identical positions, top-1 agreement
# and the largest difference. For models too large to be fixtures (the 7B files of
# scripts/make-checkpoint.sh).
# usage: scripts/llama-cpp/compare-logits.sh MODEL.gguf
set -euo pipefail
model=$1
root=$(cd "$(dirname "$0")/../.." && pwd)
libs=$("$root/scripts/llama-cpp/build.sh" avx2 llama)
lcpp=$(dirname "$(dirname "$libs")")
work=${HERD_LLAMA_CPP_DIR:-/var/tmp/herd-llama-cpp}
bin="$work/logits-avx2"
g++ -O2 -std=c++17 "$root/scripts/llama-cpp/logits.cpp" -I"$lcpp/include" -I"$lcpp/ggml/include" \
  -L"$libs" -lllama -lggml -lggml-base -Wl,-rpath,"$libs" -o "$bin"
(cd "$root" && cargo build --release -q -p herd-worker --example logits)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$work/venv/bin/python" -c "
import numpy as np
rng = np.random.default_rng(19)
print(' '.join(map(str, [1] + [int(v) for v in rng.integers(17, 1024, size=63)])))" > "$tmp/ids.txt"
"$bin" "$model" "$tmp/ids.txt" "$tmp/llama.bin" 2>/dev/null
"$root/target/release/examples/logits" "$model" "$tmp/ids.txt" "$tmp/herd.bin"
"$work/venv/bin/python" - "$tmp" <<'PY'
import sys
import numpy as np
tmp = sys.argv[1]
n = len(open(f"{tmp}/ids.txt").read().split())
a = np.fromfile(f"{tmp}/llama.bin", dtype=np.float32).reshape(n, -1)
b = np.fromfile(f"{tmp}/herd.bin", dtype=np.float32).reshape(n, -1)
same = int((a.view(np.uint32) == b.view(np.uint32)).all(axis=1).sum())
top1 = int((a.argmax(1) == b.argmax(1)).sum())
print(f"{n} positions: {same} bit-identical in every logit, top-1 agrees at {top1}; "
      f"largest difference {np.abs(a - b).max():.3g}")
PY
