#!/usr/bin/env bash
# Makes the K-quant fidelity fixture: small random LLaMA checkpoints (shape tiny-k, widths that
# are multiples of 256) quantized by llama.cpp's llama-quantize to Q4_K_M, Q5_K_M and Q6_K, copied
# to tests/fixtures/kquant/, and llama.cpp's logits on a forced token sequence for each, in
# tests/fixtures/kquant/llama-cpp-logits.json:
#   top8_bits: per position, the 8 highest logits as [token id, f32 bit pattern], all tokens in
#     one batch of 64 (llama.cpp's prompt kernels, whose order herd follows for every row);
#   single_top1: per position, the top token with the tokens decoded one at a time (llama.cpp's
#     one-row kernels, which sum some K-quants in other orders).
# usage: scripts/llama-cpp/kquant-fixture.sh   (builds llama.cpp for AVX2 with build.sh first)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
libs=$("$root/scripts/llama-cpp/build.sh" avx2 llama llama-quantize)
lcpp=$(dirname "$(dirname "$libs")")
work=${HERD_LLAMA_CPP_DIR:-/var/tmp/herd-llama-cpp}
bin="$work/logits-avx2"
g++ -O2 -std=c++17 "$root/scripts/llama-cpp/logits.cpp" -I"$lcpp/include" -I"$lcpp/ggml/include" \
  -L"$libs" -lllama -lggml -lggml-base -Wl,-rpath,"$libs" -o "$bin"

out="$root/tests/fixtures/kquant"
mkdir -p "$out"
ckpts=${HERD_CHECKPOINTS:-/var/tmp/herd-checkpoints}
HERD_LLAMA_QUANTIZE="$libs/llama-quantize" bash "$root/scripts/make-checkpoint.sh" tiny-k --format q4_k_m q5_k_m q6_k
for f in q4_k_m q5_k_m q6_k; do
  cp "$ckpts/tiny-k/tiny-k-$f.gguf" "$out/tiny-k-$f.gguf"
done

"$work/venv/bin/python" - "$bin" "$out" <<'PY'
import json, os, subprocess, sys, tempfile
import numpy as np
bin, out = sys.argv[1:]
# A fixed sequence over the 1024-token vocabulary (ids past the 17 special tokens), starting
# with the BOS token.
rng = np.random.default_rng(19)
ids = [1] + [int(v) for v in rng.integers(17, 1024, size=63)]
fixture = {"how": "scripts/llama-cpp/kquant-fixture.sh: llama.cpp (llama-cpp-python 0.3.36's copy, built for "
           "AVX2+FMA+F16C) run by scripts/llama-cpp/logits.cpp on each file, all logits of ids",
           "ids": ids, "models": {}}
with tempfile.TemporaryDirectory() as tmp:
    open(f"{tmp}/ids.txt", "w").write(" ".join(map(str, ids)))
    def logits(model, single):
        env = dict(os.environ, HERD_ONE_TOKEN_AT_A_TIME="1" if single else "0")
        subprocess.run([bin, model, f"{tmp}/ids.txt", f"{tmp}/out.bin"], check=True, capture_output=True, env=env)
        return np.fromfile(f"{tmp}/out.bin", dtype=np.float32).reshape(len(ids), -1)
    for f in ["q4_k_m", "q5_k_m", "q6_k"]:
        model = f"{out}/tiny-k-{f}.gguf"
        one, batch = logits(model, True), logits(model, False)
        top8 = [[[int(t), int(row[t].view(np.uint32))] for t in np.argsort(-row, kind="stable")[:8]] for row in batch]
        agree = int((one.argmax(1) == batch.argmax(1)).sum())
        print(f"{f}: one-at-a-time and batched llama.cpp agree on top-1 at {agree}/{len(ids)} positions; "
              f"largest logit difference {np.abs(one - batch).max():.2e}")
        fixture["models"][f"tiny-k-{f}.gguf"] = {"top8_bits": top8, "single_top1": [int(v) for v in one.argmax(1)]}
json.dump(fixture, open(f"{out}/llama-cpp-logits.json", "w"), indent=0)
PY
