#!/usr/bin/env bash
# Builds llama.cpp from the copy inside llama-cpp-python 0.3.36's source package (PyPI, sha256
# checked), the llama.cpp herd's reference outputs come from, and prints its bin/ directory.
#
# usage: scripts/llama-cpp/build.sh [avx2|native] [TARGET...]
#   avx2 (default): ggml for AVX2 + FMA + F16C, no AVX-512, as the fixtures' llama.cpp was built.
#   native: built for this CPU (-march=native, llama-cpp-python's default), for speed comparisons;
#     AMX is left out, as virtual machines that hide it from their guests make its kernels fault.
#   TARGETs are ninja targets (default: llama llama-quantize); also llama-bench, llama-server.
# Needs a C++ compiler and python3 (cmake and ninja come from PyPI). The library alone takes about
# 15 minutes on 2 cores; builds are kept in $HERD_LLAMA_CPP_DIR (default /var/tmp/herd-llama-cpp).
set -euo pipefail

flavor=${1:-avx2}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(llama llama-quantize)
case "$flavor" in
  avx2) flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON) ;;
  native) flags=(-DGGML_NATIVE=ON "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
                 "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16") ;;
  *) echo "usage: $0 [avx2|native] [TARGET...]" >&2; exit 2 ;;
esac
work=${HERD_LLAMA_CPP_DIR:-/var/tmp/herd-llama-cpp}
version=0.3.36
mkdir -p "$work"
cd "$work"

if [ ! -x venv/bin/ninja ]; then
  python3 -m venv venv
  venv/bin/pip install --quiet cmake ninja numpy
fi
export PATH="$work/venv/bin:$PATH"

src="llama_cpp_python-$version"
if [ ! -d "$src" ]; then
  # The source package, found in PyPI's index and checked against the hash listed there.
  python3 - "$version" <<'PY'
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
PY
  tar xzf "$src.tar.gz"
fi

lcpp="$work/$src/vendor/llama.cpp"
build="$lcpp/build-$flavor"
if [ ! -f "$build/build.ninja" ]; then
  cmake -S "$lcpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON "${flags[@]}" >&2
fi
ninja -C "$build" "${targets[@]}" >&2
echo "$build/bin"
