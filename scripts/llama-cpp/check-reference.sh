#!/usr/bin/env bash
# Builds llama.cpp as the reference fixture's llama.cpp outputs were made (the copy inside
# llama-cpp-python 0.3.36's source package) and compares its logits with the fixture's
# `llamacpp_top5_forced`: the check that herd's quantized path has the right target.
#
# usage: scripts/llama-cpp/check-reference.sh [avx2|native]
#   avx2 (default): ggml built for AVX2 + FMA + F16C, no AVX-512 — it reproduces the fixture
#     at every position. native: built for this CPU (-march=native, llama-cpp-python's default),
#     which on an AVX-512 machine sums in other orders and agrees at only about 93% of positions.
# Needs a C++ compiler, python3 with numpy, and PyPI (cmake and ninja come from there). About
# 15 minutes on 2 cores; the build is kept in $HERD_LLAMA_CPP_DIR (default /var/tmp/herd-llama-cpp).
set -euo pipefail

flavor=${1:-avx2}
case "$flavor" in
  avx2) flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON) ;;
  native) flags=(-DGGML_NATIVE=ON) ;;
  *) echo "usage: $0 [avx2|native]" >&2; exit 2 ;;
esac
root=$(cd "$(dirname "$0")/../.." && pwd)
model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$model" ] || "$root/scripts/fetch-test-model.sh"
work=${HERD_LLAMA_CPP_DIR:-/var/tmp/herd-llama-cpp}
version=0.3.36
mkdir -p "$work"
cd "$work"

if [ ! -d venv ]; then
  python3 -m venv venv
  venv/bin/pip install --quiet cmake ninja numpy
fi
export PATH="$work/venv/bin:$PATH"

src="llama_cpp_python-$version"
if [ ! -d "$src" ]; then
  # The source package, found in PyPI's index and checked against the hash listed there.
  python3 - "$version" <<'EOF'
import hashlib, re, sys, urllib.request
version = sys.argv[1]
index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/").read().decode()
m = re.search(r'href="([^"]*llama_cpp_python-%s\.tar\.gz)#sha256=([0-9a-f]+)"' % re.escape(version), index)
if not m:
    sys.exit(f"llama-cpp-python {version} is not in PyPI's index")
data = urllib.request.urlopen(m.group(1)).read()
if hashlib.sha256(data).hexdigest() != m.group(2):
    sys.exit("the download does not match PyPI's sha256")
open(f"llama_cpp_python-{version}.tar.gz", "wb").write(data)
EOF
  tar xzf "$src.tar.gz"
fi

lcpp="$src/vendor/llama.cpp"
build="build-$flavor"
if [ ! -f "$lcpp/$build/bin/libllama.so" ]; then
  cmake -S "$lcpp" -B "$lcpp/$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_SERVER=OFF "${flags[@]}" >/dev/null
  ninja -C "$lcpp/$build" llama
fi
bin="$work/logits-$flavor"
g++ -O2 -std=c++17 "$root/scripts/llama-cpp/logits.cpp" -I"$lcpp/include" -I"$lcpp/ggml/include" \
  -L"$lcpp/$build/bin" -lllama -lggml -lggml-base -Wl,-rpath,"$work/$lcpp/$build/bin" -o "$bin"

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
