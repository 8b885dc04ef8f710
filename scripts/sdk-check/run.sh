#!/usr/bin/env bash
# Runs check.py (structured outputs through the official openai SDK) against a herd gateway.
# Usage: scripts/sdk-check/run.sh BASE_URL MODEL
# The SDK and its checkers come from requirements.lock, installed into a virtualenv at
# ${HERD_SDK_VENV:-/var/tmp/herd-sdk-venv} on first use (needs PyPI).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
[ $# -eq 2 ] || { echo "usage: $0 BASE_URL MODEL" >&2; exit 2; }
die() { echo "sdk-check: $*" >&2; exit 1; }
VENV="${HERD_SDK_VENV:-/var/tmp/herd-sdk-venv}"
py="$(command -v python3 || true)"
[ -n "$py" ] || die "python3 not found: it runs the openai SDK"
stamp="$VENV/.herd-sdk-lock"
if ! cmp -s requirements.lock "$stamp" || ! "$VENV/bin/python" -c 'import openai, pydantic, jsonschema' 2>/dev/null; then
  echo "sdk-check: installing requirements.lock into $VENV" >&2
  clear=()
  "$VENV/bin/python" -c '' 2>/dev/null || clear=(--clear)
  "$py" -m venv "${clear[@]}" "$VENV" >&2 \
    || die "cannot make a virtualenv at $VENV (set HERD_SDK_VENV to a writable path; on Debian, python3 -m venv needs python3-venv)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.lock >&2 \
    || die "pip could not install requirements.lock"
  cp requirements.lock "$stamp"
fi
exec "$VENV/bin/python" check.py "$1" "$2"
