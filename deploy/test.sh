#!/usr/bin/env bash
# Runs Flotilla's whole test suite, installing what the end-to-end tests need
# (QEMU, its iPXE ROMs, iproute2, tcpdump, etcd, protoc; for the web console chromium,
# node, and noVNC and puppeteer-core from npm) first when they are missing.
# Run as root: the end-to-end tests create network namespaces and start QEMU
# inside them.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
# Storage tests create qcow2 images and chains with qemu-img.
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# Guest NIC tests: QEMU's iPXE ROMs make a diskless guest send DHCP, and
# tcpdump watches for it on the host side.
[ -e /usr/lib/ipxe/qemu/efi-virtio.rom ] || need+=(ipxe-qemu)
command -v tcpdump >/dev/null 2>&1 || need+=(tcpdump)
# UEFI guests boot Debian's OVMF; the conformance run serves an NBD disk with qemu-nbd.
[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || need+=(ovmf)
command -v qemu-nbd >/dev/null 2>&1 || need+=(qemu-utils)
command -v losetup >/dev/null 2>&1 || need+=(mount)
# The control-plane tests run a 3-member etcd (etcd-server) and ask it with
# etcdctl (etcd-client); etcd-client the crate compiles etcd's protocol
# files with protoc at build time.
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
. deploy/lib/install.sh
install_missing ${need[@]+"${need[@]}"}
ensure_qemu_user
. deploy/lib/web.sh
install_web

# The end-to-end tests run the real binaries; build them first.
cargo build --workspace --bins --locked
exec cargo test --workspace --locked "$@"
