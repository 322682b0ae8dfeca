#!/usr/bin/env bash
# Runs Flotilla's whole test suite, installing what the end-to-end tests need
# (QEMU, its iPXE ROMs, iproute2, tcpdump) first when they are missing. Run as root: the end-to-end
# tests create network namespaces and start QEMU inside them.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# Guest NIC tests: QEMU's iPXE ROMs make a diskless guest send DHCP, and
# tcpdump watches for it on the host side.
[ -e /usr/lib/ipxe/qemu/efi-virtio.rom ] || need+=(ipxe-qemu)
command -v tcpdump >/dev/null 2>&1 || need+=(tcpdump)
if ((${#need[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "deploy/test.sh: ${need[*]} missing and not root to install them" >&2
    exit 1
  fi
  echo "deploy/test.sh: installing ${need[*]}" >&2
  apt-get update -qq
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
  if ! apt_install "${need[@]}"; then
    # A machine whose qemu-utils comes from bookworm-backports needs
    # qemu-system-x86 from there too: the two must be the same release.
    echo "deploy/test.sh: retrying from bookworm-backports" >&2
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      >/etc/apt/sources.list.d/flotilla-backports.sources
    apt-get update -qq
    apt_install -t bookworm-backports "${need[@]}"
  fi
fi

# The end-to-end tests run the real binaries; build them first.
cargo build --workspace --bins --locked
exec cargo test --workspace --locked "$@"
