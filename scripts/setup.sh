#!/usr/bin/env bash
# Install the system tools herd's build and tests need (Debian): protoc for the gRPC and
# etcd-client build scripts, etcd and openssl for the registry tests, Chromium, Node.js and
# playwright-core for the browser test. Safe to run repeatedly; does nothing when all is present.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
missing=()
command -v protoc >/dev/null || missing+=(protobuf-compiler)
# The registry tests start a real etcd (ETCD_BIN may point at one elsewhere).
[ -n "${ETCD_BIN:-}" ] || command -v etcd >/dev/null || missing+=(etcd-server)
# The etcd TLS test makes its certificates with the openssl command.
command -v openssl >/dev/null || missing+=(openssl)
command -v python3 >/dev/null || missing+=(python3 python3-pip)
# The browser test drives Debian's Chromium (HERD_CHROMIUM may point at another) with Node.js.
[ -n "${HERD_CHROMIUM:-}" ] || [ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup: please install ${missing[*]} (needs root and apt-get)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi
# playwright-core for the browser test, as locked in tests/browser/package-lock.json.
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  echo "setup: npm ci in tests/browser" >&2
  npm ci --prefix tests/browser --no-audit --no-fund >&2
fi
