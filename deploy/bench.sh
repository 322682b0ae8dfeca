#!/usr/bin/env bash
# Runs every Flotilla benchmark on this machine and rewrites BENCHMARKS.md
# with the tables they print, the commands, and the machine they ran on,
# followed by deploy/bench-notes.md (method and findings).
#
#   deploy/bench.sh            as root; installs QEMU, iproute2 and libvirt when missing
#   deploy/bench.sh --notes    re-assemble BENCHMARKS.md from the last run's
#                              tables (target/bench/) and deploy/bench-notes.md
#
# Each benchmark creates and removes its own namespaces (198.18.0.0/15 and
# 198.19.0.0/16 inside them only) and processes. Speed is reported here,
# never asserted by a test.
set -euo pipefail
cd "$(dirname "$0")/.."

TABLES=target/bench/tables.md
HEADER=target/bench/header.md
assemble() {
  local f
  for f in "$HEADER" "$TABLES" deploy/bench-notes.md; do
    [ -s "$f" ] || { echo "deploy/bench.sh: $f missing; run deploy/bench.sh first" >&2; exit 1; }
  done
  # Written aside and moved, so a failure never leaves a truncated BENCHMARKS.md.
  cat "$HEADER" "$TABLES" deploy/bench-notes.md > BENCHMARKS.md.tmp
  mv BENCHMARKS.md.tmp BENCHMARKS.md
  echo "== BENCHMARKS.md written"
}
if [ "${1:-}" = --notes ]; then
  assemble
  exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "deploy/bench.sh: run as root (it creates network namespaces)" >&2; exit 1; }
need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# etcd-client compiles etcd's protocol files with protoc at build time;
# bench-failover and bench-fleet's etcd rows run a 3-member etcd.
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v libvirtd >/dev/null 2>&1 || need+=(libvirt-daemon libvirt-daemon-driver-qemu)
command -v virsh >/dev/null 2>&1 || need+=(libvirt-clients)
# libvirt from bookworm-backports ships its network driver on its own.
ls /usr/lib/*/libvirt/connection-driver/libvirt_driver_network.so >/dev/null 2>&1 ||
  need+=(libvirt-daemon-driver-network)
. deploy/lib/install.sh
install_missing ${need[@]+"${need[@]}"}
ensure_qemu_user
. deploy/lib/web.sh
install_web

echo "== building (release)"
cargo build --release --locked --workspace --bins
BIN=target/release
mkdir -p target/bench
: > "$TABLES.new"
began=$(date +%s)

section() { # title command...
  local title=$1; shift
  echo "== $title: $*" >&2
  local t0=$SECONDS
  {
    printf '\n## %s\n\n' "$title"
    printf 'Command: `%s` (started %s)\n\n' "$*" "$(date -u +%H:%M:%SZ)"
    "$@"
    printf '\n(%d s)\n' $((SECONDS - t0))
  } | tee -a "$TABLES.new"
}

section "1. Start latency, and 6. footprint" "$BIN/bench-start"
section "2. Live migration" "$BIN/bench-migration"
section "2b. Live migration with storage copy" "$BIN/bench-migration" 3 copy-storage
section "2c. Web console across live migration" "$BIN/bench-webconsole" 10
section "2d. HA failover after a host is cut off" "$BIN/bench-ha" 10
section "2e. Coordinator leader failover on etcd" "$BIN/bench-failover" 10
section "3. Scheduler throughput (pure module)" "$BIN/bench-fleet" scheduler 100000
section "4. Coordinator fan-in" "$BIN/bench-fleet" fanin 100 1000 5000
section "4b. Coordinator fan-in on etcd" "$BIN/bench-fleet" fanin 100 1000 5000 etcd
section "5. Fleet start throughput" "$BIN/bench-fleet" fleet-start 10000 1000
section "5b. Fleet start throughput on etcd" "$BIN/bench-fleet" fleet-start 10000 1000 etcd
mv "$TABLES.new" "$TABLES"

kvm=no
[ -w /dev/kvm ] && kvm=yes
{
  echo "# Benchmarks"
  echo
  echo "Written by \`deploy/bench.sh\` (all sections in $(( ($(date +%s) - began + 59) / 60 )) min) on $(date -u +%Y-%m-%d)."
  echo "Medians over repeated runs with their spread; where two systems are"
  echo "compared they ran in the same invocation, alternating, and the ratio is"
  echo "given, because the machine is shared and noisy. Method and findings follow"
  echo "the tables, under [Reading these numbers](#reading-these-numbers)."
  echo
  echo "| machine | |"
  echo "|---|---|"
  echo "| CPU | $(nproc) × $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1) |"
  echo "| memory | $(free -g | awk '/^Mem:/ {print $2}') GiB |"
  echo "| kernel | $(uname -r) |"
  echo "| KVM | $kvm |"
  echo "| QEMU | $(qemu-system-x86_64 --version | head -1) |"
  echo "| libvirt | $(libvirtd --version | head -1) |"
  echo "| Flotilla | $(git rev-parse --short HEAD) ($(rustc --version)) |"
} > "$HEADER"
assemble
