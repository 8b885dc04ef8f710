#!/usr/bin/env bash
# Make random, Vicuna-shaped LLaMA checkpoints (see scripts/make-checkpoint.py --help).
# Creates or reuses a venv with gguf, numpy and safetensors under
# ${HERD_CKPT_VENV:-/var/tmp/herd-ckpt-venv}, fetches the SmolLM2 test model (whose
# tokenizer the checkpoints use) if missing, and runs the Python script with the given args.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HERD_CKPT_VENV:-/var/tmp/herd-ckpt-venv}"

if ! "$venv/bin/python" -c 'import gguf, numpy, safetensors' 2>/dev/null; then
  py="$(command -v python3 || true)"
  [ -n "$py" ] || { echo "make-checkpoint: python3 (3.11+) is needed" >&2; exit 1; }
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "make-checkpoint: python3 is $("$py" --version 2>&1); 3.11+ is needed" >&2; exit 1; }
  echo "make-checkpoint: setting up $venv" >&2
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "gguf>=0.16" "numpy>=1.26" "safetensors>=0.4"
fi

# The tokenizer comes from the test model; --help/--list and an explicit --vocab-gguf don't need it.
case " $* " in
  *" --help "* | *" -h "* | *" --list "* | *" --vocab-gguf"*) ;;
  *) [ -s "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" ] || PATH="$venv/bin:$PATH" bash "$root/scripts/fetch-test-model.sh" ;;
esac

exec "$venv/bin/python" "$root/scripts/make-checkpoint.py" "$@"
