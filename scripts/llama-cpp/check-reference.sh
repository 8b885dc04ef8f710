#!/usr/bin/env bash
# Builds llama.cpp as the reference fixture's llama.cpp outputs were made (the copy inside
# llama-cpp-python 0.3.36's source package) and compares its logits with the fixture's
# `llamacpp_top5_forced`: the check that herd's quantized path has the right target.
#
# usage: scripts/llama-cpp/check-reference.sh [avx2|native]
#   avx2 (default): ggml built for AVX2 + FMA + F16C, no AVX-512 — it reproduces the fixture
#     at every position. native: built for this CPU (-march=native, llama-cpp-python's default),
#     which on an AVX-512 machine sums in other orders and agrees at only about 93% of positions.
# Builds llama.cpp with build.sh beside this script (about 15 minutes on 2 cores the first time).
set -euo pipefail

flavor=${1:-avx2}
root=$(cd "$(dirname "$0")/../.." && pwd)
model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$model" ] || "$root/scripts/fetch-test-model.sh"
libs=$("$root/scripts/llama-cpp/build.sh" "$flavor" llama)
lcpp=$(dirname "$(dirname "$libs")")
work=${HERD_LLAMA_CPP_DIR:-/var/tmp/herd-llama-cpp}
export PATH="$work/venv/bin:$PATH"
bin="$work/logits-$flavor"
g++ -O2 -std=c++17 "$root/scripts/llama-cpp/logits.cpp" -I"$lcpp/include" -I"$lcpp/ggml/include" \
  -L"$libs" -lllama -lggml -lggml-base -Wl,-rpath,"$libs" -o "$bin"

python3 - "$bin" "$model" "$root/tests/fixtures/smollm2-135m-instruct.json" "$flavor" <<'EOF'
import json, os, subprocess, sys, tempfile
import numpy as np
bin, model, fixture, flavor = sys.argv[1:]
total = agree = 0
worst = 0.0
with tempfile.TemporaryDirectory() as tmp:
    for case in json.load(open(fixture))["cases"]:
        ids = case["prompt_ids"] + case["greedy_ids"]
        open(f"{tmp}/ids.txt", "w").write(" ".join(map(str, ids)))
        subprocess.run([bin, model, f"{tmp}/ids.txt", f"{tmp}/out.bin"], check=True, capture_output=True)
        logits = np.fromfile(f"{tmp}/out.bin", dtype=np.float32).reshape(len(ids), -1)
        start = len(case["prompt_ids"]) - 1
        for k, top5 in enumerate(case["llamacpp_top5_forced"]):
            row = logits[start + k]
            total += 1
            agree += int(row.argmax()) == top5[0][0]
            worst = max(worst, max(abs(row[t] - v) for t, v in top5))
print(f"llama.cpp {flavor}: top-1 as the fixture at {agree}/{total} positions; "
      f"top-5 logits within {worst:.6f} of the fixture's")
EOF
