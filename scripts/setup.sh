#!/usr/bin/env bash
# Install the system tools herd's build and tests need (Debian): protoc for the gRPC and
# etcd-client build scripts, etcd and openssl for the registry tests. Safe to run repeatedly; does nothing when all is present.
set -euo pipefail
missing=()
command -v protoc >/dev/null || missing+=(protobuf-compiler)
# The registry tests start a real etcd (ETCD_BIN may point at one elsewhere).
[ -n "${ETCD_BIN:-}" ] || command -v etcd >/dev/null || missing+=(etcd-server)
# The etcd TLS test makes its certificates with the openssl command.
command -v openssl >/dev/null || missing+=(openssl)
command -v python3 >/dev/null || missing+=(python3 python3-pip)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup: please install ${missing[*]} (needs root and apt-get)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi
