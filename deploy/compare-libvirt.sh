#!/usr/bin/env bash
# Side by side: how libvirt's qemu driver and Flotilla's agent resolve the same
# <graphics><listen type='network' network='public'/></graphics> for the same
# network and domain XML on the same host, and which -vnc/-spice argument each
# passes to QEMU.
#
# The "host" is a throwaway network namespace (br0, a veth standing in for an
# uplink NIC, only 198.18.0.0/15 addresses), so nothing in the root namespace
# changes. libvirtd runs inside it under `unshare -m` with its run, state, log,
# cache and config directories bind-mounted from a scratch folder, so no global
# libvirt state is read or written. Everything is torn down on exit, also on
# failure or Ctrl-C.
#
# Needs root; installs what is missing (libvirt, QEMU, xmllint) and builds
# the agent when there is none.
# Usage: deploy/compare-libvirt.sh
#   AGENT=path    use another agent binary
#   KEEP_WORK=1   keep the scratch folder (logs, argv, live XML) for a look
set -euo pipefail
cd "$(dirname "$0")/.."
SELF=$(pwd)/deploy/$(basename "$0")
AGENT=${AGENT:-$(pwd)/target/debug/flotilla-agent}

if [[ ${1:-} != __libvirt_half ]]; then
  [ "$(id -u)" -eq 0 ] || { echo "deploy/compare-libvirt.sh: run as root (it creates a network namespace)" >&2; exit 1; }
  need=()
  command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
  command -v xmllint >/dev/null 2>&1 || need+=(libxml2-utils)
  # etcd-client compiles etcd's protocol files with protoc at build time.
  command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
  command -v virsh >/dev/null 2>&1 || need+=(libvirt-clients)
  command -v libvirtd >/dev/null 2>&1 || need+=(libvirt-daemon libvirt-daemon-driver-qemu)
  # libvirt from bookworm-backports ships its network driver on its own.
  ls /usr/lib/*/libvirt/connection-driver/libvirt_driver_network.so >/dev/null 2>&1 ||
    need+=(libvirt-daemon-driver-network)
  . deploy/lib/install.sh
  install_missing ${need[@]+"${need[@]}"}
  ensure_qemu_user
  if [ ! -x "$AGENT" ]; then
    echo "deploy/compare-libvirt.sh: building the agent" >&2
    cargo build --bins
  fi
fi
QEMU=$(command -v qemu-system-x86_64)

# The libvirt half re-enters this script inside the namespace (see below).
if [[ ${1:-} == __libvirt_half ]]; then
  WORK=$2
else
  NS=flt-lvcmp-$$
  WORK=$(mktemp -d /tmp/flt-lvcmp.XXXXXX)
fi

# ---------------------------------------------------------------------------
# Cases: id, network XML, graphics type (+ extra <graphics> attributes).
# Every case is a network named 'public' plus a diskless 64 MiB domain whose
# only console listens on it. a-d are the comparison asked for; e repeats d
# with autoport='yes', because libvirt gives a SPICE console without a port
# no TCP listener at all (see the notes), so d alone compares nothing useful.
CASES=(a b c d e)
declare -A NET GFX ATTR DESC
BRIDGE_NET="<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>"
DESC[a]="bridge, host bridge br0, VNC"
NET[a]=$BRIDGE_NET
GFX[a]=vnc
DESC[b]="macvtap-style bridge dev=uplink0, VNC"
NET[b]="<network><name>public</name><forward mode='bridge' dev='uplink0'/></network>"
GFX[b]=vnc
DESC[c]="route dev=uplink0, virbr9 198.18.23.1, VNC"
NET[c]="<network><name>public</name><forward mode='route' dev='uplink0'/><bridge name='virbr9'/><ip address='198.18.23.1' prefix='24'/></network>"
GFX[c]=vnc
DESC[d]="bridge, host bridge br0, SPICE"
NET[d]=$BRIDGE_NET
GFX[d]=spice
DESC[e]="bridge, br0, SPICE autoport='yes' (extra)"
NET[e]=$BRIDGE_NET
GFX[e]=spice
ATTR[e]=" autoport='yes'"

vm_name() { echo "cmp-$1-${GFX[$1]}"; }

domain_xml() { # case
  cat <<XML
<domain type='kvm'>
  <name>$(vm_name "$1")</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>$QEMU</emulator>
    <graphics type='${GFX[$1]}'${ATTR[$1]:-}><listen type='network' network='public'/></graphics>
  </devices>
</domain>
XML
}

# The option that follows -vnc or -spice in a NUL-separated cmdline file.
graphics_arg() { # cmdline-file vnc|spice
  tr '\0' '\n' <"$1" | grep -A1 -x -- "-$2" | sed -n 2p
}

# The live <graphics> element on one line, whatever the quoting style.
graphics_xml() { # xml-file
  xmllint --xpath '/domain/devices/graphics' "$1" 2>/dev/null | tr -s ' \n' ' ' | sed 's/> </></g; s/ $//'
}

# The address the <listen type='network'> resolved to.
listen_addr() { # xml-file
  xmllint --xpath 'string(/domain/devices/graphics/listen[@type="network"]/@address)' "$1" 2>/dev/null
}

# ---------------------------------------------------------------------------
# libvirt half: runs as `ip netns exec NS unshare -m SELF __libvirt_half WORK`,
# i.e. in the namespace's network and a private mount namespace.
libvirt_half() {
  local lv=$WORK/libvirt i
  # A private libvirtd (deploy/libvirt-host.sh) in this namespace.
  "$(dirname "$SELF")/libvirt-host.sh" "$lv" &
  # By its socket path, never the default URI: until libvirt-host.sh has
  # mounted its folders, that would reach the host's own libvirtd.
  export LIBVIRT_DEFAULT_URI="qemu:///system?socket=$lv/run/libvirt-sock"
  for i in $(seq 300); do
    virsh -q version >/dev/null 2>&1 && break
    sleep 0.2
  done
  if ! virsh -q version >/dev/null 2>&1; then
    echo "libvirtd did not come up; its log:" >&2
    tail -20 "$lv/log/libvirtd.log" >&2 || true
    return 1
  fi

  local c out name pid
  for c in "${CASES[@]}"; do
    out=$WORK/cases/$c/libvirt
    mkdir -p "$out"
    name=$(vm_name "$c")
    virsh -q net-define "$WORK/cases/$c/nets/public.xml" >/dev/null
    # A network that cannot start is recorded, not fatal: graphics-only
    # domains do not need it active, so the domain is still tried.
    virsh -q net-start public >/dev/null 2>"$out/net-start.err" || true
    virsh -q define "$WORK/cases/$c/domain.xml" >/dev/null
    if virsh -q start "$name" >/dev/null 2>"$out/start.err"; then
      pid=$(cat "/run/libvirt/qemu/$name.pid")
      cp "/proc/$pid/cmdline" "$out/cmdline"
      virsh dumpxml "$name" >"$out/live.xml"
      virsh domdisplay "$name" >"$out/display" 2>&1 || true
      virsh -q destroy "$name" >/dev/null
    fi
    cp "/var/log/libvirt/qemu/$name.log" "$out/qemu.log" 2>/dev/null || true
    virsh -q undefine "$name" >/dev/null
    virsh -q net-destroy public >/dev/null 2>&1 || true
    virsh -q net-undefine public >/dev/null
  done

  # Stop libvirtd ourselves; the outer trap kills it too if we never get here.
  pid=$(cat "$lv/run/libvirtd.pid")
  kill "$pid"
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
}

if [[ ${1:-} == __libvirt_half ]]; then
  libvirt_half
  exit
fi

# ---------------------------------------------------------------------------
# Outer half: namespace, Flotilla, report.

# Kill everything that lives in the namespace (libvirtd, both sides' QEMUs,
# any dnsmasq), then delete it: `ip netns pids` names exactly our processes.
cleanup() {
  local rc=$? i p
  trap - EXIT INT TERM
  if ip netns list | grep -qw "$NS"; then
    for i in $(seq 50); do
      p=$(ip netns pids "$NS" 2>/dev/null || true)
      [[ -z $p ]] && break
      kill -9 $p 2>/dev/null || true
      sleep 0.1
    done
    ip netns del "$NS" || true
  fi
  if [[ -n ${KEEP_WORK:-} ]]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[[ -x $AGENT ]] || { echo "no agent binary at $AGENT (cargo build --bins)" >&2; exit 1; }

# The host: loopback, a bridge, and a veth whose namespace end is the uplink.
# Both veth ends are created inside the namespace, so the root namespace
# never sees an interface.
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add br0 type bridge
ip -n "$NS" addr add 198.18.21.1/24 dev br0
ip -n "$NS" link set br0 up
ip -n "$NS" link add uplink0 type veth peer name uplink0p
ip -n "$NS" addr add 198.18.22.1/24 dev uplink0
ip -n "$NS" link set uplink0 up
ip -n "$NS" link set uplink0p up

for c in "${CASES[@]}"; do
  mkdir -p "$WORK/cases/$c/nets" "$WORK/cases/$c/flotilla"
  echo "${NET[$c]}" >"$WORK/cases/$c/nets/public.xml"
  domain_xml "$c" >"$WORK/cases/$c/domain.xml"
done

# libvirt: all cases under one libvirtd (its first start probes QEMU's
# capabilities, which takes a while).
if ! ip netns exec "$NS" unshare -m "$SELF" __libvirt_half "$WORK" 2>"$WORK/libvirt-half.err"; then
  echo "libvirt half failed:" >&2
  cat "$WORK/libvirt-half.err" >&2
  exit 1
fi

# Flotilla: one standalone --once-start per case, each with its own state dir.
for c in "${CASES[@]}"; do
  out=$WORK/cases/$c/flotilla
  name=$(vm_name "$c")
  if ip netns exec "$NS" "$AGENT" --name cmp --networks-dir "$WORK/cases/$c/nets" \
       --state-dir "$out/state" --once-start "$WORK/cases/$c/domain.xml" \
       >"$out/stdout" 2>"$out/stderr"; then
    pid=$(cat "$out/state/vms/$name/qemu.pid")
    cp "/proc/$pid/cmdline" "$out/cmdline"
    # stdout is the live XML followed by `console: URI` lines.
    grep -v '^console: ' "$out/stdout" >"$out/live.xml"
    grep '^console: ' "$out/stdout" | sed 's/^console: //' >"$out/display" || true
    kill "$pid"
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
done

# ---------------------------------------------------------------------------
# Report.
one_line() { tr -s '\n' ' ' <"$1" | sed 's/ $//'; }
same() { [[ $1 == "$2" && $1 != - ]] && echo yes || echo NO; }

# Sets addr, arg, state and gxml for case $1, side $2. When QEMU did not stay
# up there is no cmdline or live XML, but both sides log the argv they tried,
# so the argument (and from it the address) is still compared; '*' marks that.
facts() { # case side
  local d=$WORK/cases/$1/$2 gfx=${GFX[$1]} log
  addr=-; arg=-; gxml=-; state=running
  if [[ -f $d/cmdline ]]; then
    arg=$(graphics_arg "$d/cmdline" "$gfx")
    addr=$(listen_addr "$d/live.xml"); gxml=$(graphics_xml "$d/live.xml")
    return
  fi
  state="QEMU failed"
  # libvirt logs one argument per line; the agent one line with argv=...
  [[ $2 == libvirt ]] && log=$d/qemu.log || log=$d/stderr
  arg=$(grep -o -- "\(^\| \)-$gfx [^ ]*" "$log" 2>/dev/null | head -1 | awk '{print $2}') || true
  case $gfx in
    vnc) addr=${arg%:*} ;;
    spice) addr=$(grep -o 'addr=[^,]*' <<<"$arg" | cut -d= -f2) || true ;;
  esac
  [[ -n $arg ]] && arg="$arg*" || arg=-
  [[ -n $addr ]] && addr="$addr*" || addr=-
}

echo "libvirt: $(libvirtd --version)   qemu: $("$QEMU" --version | head -1)"
echo "agent:   $AGENT"
echo
printf '%-4s %-42s %-15s %-15s %-5s %s\n' CASE NETWORK "ADDR libvirt" "ADDR flotilla" ADDR= "ARG= (-vnc/-spice value)"
for c in "${CASES[@]}"; do
  facts "$c" libvirt;  la=$addr; lg=$arg
  facts "$c" flotilla; fa=$addr; fg=$arg
  printf '%-4s %-42s %-15s %-15s %-5s %s\n' "$c" "${DESC[$c]}" "$la" "$fa" "$(same "$la" "$fa")" "$(same "$lg" "$fg")"
done
echo "(* = QEMU exited at start; value taken from the argv each side logged)"

for c in "${CASES[@]}"; do
  d=$WORK/cases/$c
  echo
  echo "== case $c: ${DESC[$c]}"
  echo "   network:  ${NET[$c]}"
  echo "   graphics: <graphics type='${GFX[$c]}'${ATTR[$c]:-}><listen type='network' network='public'/></graphics>"
  [[ -s $d/libvirt/net-start.err ]] && echo "   libvirt net-start: $(one_line "$d/libvirt/net-start.err")"
  [[ -s $d/libvirt/start.err ]] && echo "   libvirt start:     $(one_line "$d/libvirt/start.err")"
  # The agent's own warnings, and its error with QEMU's last output; not its
  # tracing log lines.
  grep -E '^warning:' "$d/flotilla/stderr" | sed 's/^/   flotilla /' || true
  e=$(sed -n '/^error:/,$p' "$d/flotilla/stderr" | tr -s '\n' ' ')
  [[ -n $e ]] && echo "   flotilla $e"
  for side in libvirt flotilla; do
    facts "$c" "$side"
    printf '   %-8s state:    %s\n' "$side" "$state"
    printf '   %-8s address:  %s\n' "" "$addr"
    printf '   %-8s -%-7s %s\n' "" "${GFX[$c]}" "$arg"
    printf '   %-8s display:  %s\n' "" "$(head -1 "$d/$side/display" 2>/dev/null || echo -)"
    printf '   %-8s live:     %s\n' "" "$gxml"
  done
  # The rest of the argv, to explain differences around the graphics option.
  if [[ -f $d/libvirt/cmdline && -f $d/flotilla/cmdline ]]; then
    echo "   argv libvirt:  $(tr '\0' ' ' <"$d/libvirt/cmdline")"
    echo "   argv flotilla: $(tr '\0' ' ' <"$d/flotilla/cmdline")"
  fi
done
