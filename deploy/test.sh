#!/usr/bin/env bash
# Runs Flotilla's whole test suite, installing what the end-to-end tests need
# (QEMU and iproute2) first when they are missing. Run as root: the end-to-end
# tests create network namespaces and start QEMU inside them.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if ((${#need[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "deploy/test.sh: ${need[*]} missing and not root to install them" >&2
    exit 1
  fi
  echo "deploy/test.sh: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The end-to-end tests run the real binaries; build them first.
cargo build --workspace --bins --locked
exec cargo test --workspace --locked "$@"
