#!/usr/bin/env bash
# The Flotilla demo fleet on this machine: three namespace hosts that each
# define network `public` their own way, a coordinator with its embedded
# store, and a counting guest that is started, photographed through its VNC
# console (with vncdotool, and in chromium through the coordinator's web
# console), live-migrated, and photographed again on its new host; the
# browser's page follows the guest there by itself.
#
#   deploy/demo.sh        build, bring the fleet up, run the demo (as root)
#   deploy/demo.sh --ha-control-plane
#                         the same fleet under three coordinators on a
#                         three-member etcd (TLS from the fleet's CA): the
#                         leader is killed while the guest runs, another
#                         takes over, and the guest migrates afterwards
#   deploy/demo.sh down   remove every namespace and process it made
#
# Addresses come from 198.18.0.0/15 and exist only inside the namespaces.
# For the test that runs this script: FLOTILLA_DEMO_DIR (work folder),
# FLOTILLA_DEMO_PREFIX (namespace names), FLOTILLA_DEMO_BIN (use these
# binaries instead of a release build), FLOTILLA_DEMO_VENV (the VNC client).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEMO=${FLOTILLA_DEMO_DIR:-/tmp/flotilla-demo}
P=${FLOTILLA_DEMO_PREFIX:-fltdemo}
COORD=198.19.0.1:7443
BIN=${FLOTILLA_DEMO_BIN:-$ROOT/target/release}
VENV=${FLOTILLA_DEMO_VENV:-$DEMO/venv}
SPACES=(ctl host-a host-b host-c far)

down() {
  for s in "${SPACES[@]}"; do
    local n=$P-$s
    for pid in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$n" 2>/dev/null || true
  done
  rm -rf "$DEMO/run"
}

HA=0
if [ "${1:-}" = --ha-control-plane ]; then
  HA=1
  COORD=198.19.0.1:7443,198.19.0.2:7443,198.19.0.3:7443
fi

if [ "${1:-}" = down ]; then
  down
  echo "demo fleet removed (screenshots kept in $DEMO/screenshots)"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "deploy/demo.sh: run as root (it creates network namespaces)" >&2; exit 1; }

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v curl >/dev/null 2>&1 || need+=(curl)
# etcd-client compiles etcd's protocol files with protoc at build time.
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
python3 -c 'import venv' 2>/dev/null || need+=(python3-venv)
if [ $HA = 1 ]; then
  command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
  command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
fi
. deploy/lib/install.sh
install_missing ${need[@]+"${need[@]}"}
ensure_qemu_user
. deploy/lib/web.sh
install_web

if [ -z "${FLOTILLA_DEMO_BIN:-}" ]; then
  step "building (release)"
  cargo build --release --locked --workspace --bins
fi

if [ ! -x "$VENV/bin/vncdo" ]; then
  step "installing the VNC client vncdotool (PyPI) into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q vncdotool
fi

# A second run replaces the running demo fleet rather than colliding with it.
down
RUN=$DEMO/run
mkdir -p "$RUN"/{logs,tls} "$DEMO/screenshots"

step "three hosts, each with its own idea of network 'public'"
ns() { ip netns add "$P-$1"; ip -n "$P-$1" link set lo up; }
for s in "${SPACES[@]}"; do ns "$s"; done
ip -n $P-ctl link add fleet0 type bridge
ip -n $P-ctl addr add 198.19.0.1/24 dev fleet0
ip -n $P-ctl link set fleet0 up
n=11
for h in host-a host-b host-c; do
  ip -n $P-ctl link add "mg$n" type veth peer name mgmt0 netns "$P-$h"
  ip -n $P-ctl link set "mg$n" master fleet0 up
  ip -n "$P-$h" addr add "198.19.0.$n/24" dev mgmt0
  ip -n "$P-$h" link set mgmt0 up
  mkdir -p "$RUN/$h/nets" "$RUN/$h/state"
  # The management link also carries migration streams.
  echo "<network><name>mgmt</name><forward mode='bridge' dev='mgmt0'/></network>" > "$RUN/$h/nets/mgmt.xml"
  n=$((n + 1))
done
for h in host-a host-b; do
  i=${h#host-}; i=$([ "$i" = a ] && echo 1 || echo 2)
  ip -n "$P-$h" link add br0 type bridge
  ip -n "$P-$h" addr add "198.18.$i.1/24" dev br0
  ip -n "$P-$h" link set br0 up
  echo "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>" > "$RUN/$h/nets/public.xml"
  echo "  $h: public = host bridge br0 at 198.18.$i.1"
done
# No dummy link driver here: a veth pair stands in for host-c's uplink NIC.
ip -n $P-host-c link add uplink0 type veth peer name eth0 netns $P-far
ip -n $P-host-c addr add 198.18.3.1/24 dev uplink0
ip -n $P-host-c link set uplink0 up
ip -n $P-far link set eth0 up
echo "<network><name>public</name><forward mode='bridge' dev='uplink0'/></network>" > "$RUN/host-c/nets/public.xml"
echo "  host-c: public = macvtap-style uplink0 at 198.18.3.1"

"$BIN/flotilla" certs init --dir "$RUN/tls" >/dev/null
for h in host-a host-b host-c; do "$BIN/flotilla" certs issue --dir "$RUN/tls" --agent "$h" >/dev/null; done
# Each daemon reads a config file, as under systemd (deploy/config/*.toml).
if [ $HA = 0 ]; then
step "certificates, coordinator (embedded store), agents"
cat > "$RUN/coordinator.toml" <<TOML
listen = "$COORD"
data-dir = "$RUN/data"
tls-dir = "$RUN/tls"
heartbeat-secs = 1
metrics-listen = "198.19.0.1:9464"
web-listen = "198.19.0.1:8443"
novnc-dir = "$ROOT/deploy/web/node_modules/@novnc/novnc"
TOML
setsid ip netns exec $P-ctl "$BIN/flotilla-coordinator" --config "$RUN/coordinator.toml" \
  >"$RUN/logs/coordinator.log" 2>&1 < /dev/null &
else
step "certificates, three etcd members and three coordinators (deploy/README.md §7), agents"
ip -n $P-ctl addr add 198.19.0.2/24 dev fleet0
ip -n $P-ctl addr add 198.19.0.3/24 dev fleet0
cluster=
for i in 1 2 3; do cluster+="${cluster:+,}node$i=https://198.19.0.$i:2380"; done
endpoints='"https://198.19.0.1:2379", "https://198.19.0.2:2379", "https://198.19.0.3:2379"'
for i in 1 2 3; do
  # On one machine the kernel dials every peer from 198.19.0.1, and etcd
  # checks a peer's certificate against that address: each certificate
  # names all three (on separate machines, its own address is enough).
  "$BIN/flotilla" certs issue --dir "$RUN/tls" --etcd "node$i" \
    --san 198.19.0.1 --san 198.19.0.2 --san 198.19.0.3 >/dev/null
  # deploy/config/etcd.env's settings, as flags.
  setsid ip netns exec $P-ctl etcd --name "node$i" --data-dir "$RUN/etcd-$i" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token flotilla \
    --listen-client-urls "https://198.19.0.$i:2379" --advertise-client-urls "https://198.19.0.$i:2379" \
    --listen-peer-urls "https://198.19.0.$i:2380" --initial-advertise-peer-urls "https://198.19.0.$i:2380" \
    --cert-file "$RUN/tls/etcd-node$i.pem" --key-file "$RUN/tls/etcd-node$i-key.pem" \
    --trusted-ca-file "$RUN/tls/ca.pem" --client-cert-auth \
    --peer-cert-file "$RUN/tls/etcd-node$i.pem" --peer-key-file "$RUN/tls/etcd-node$i-key.pem" \
    --peer-trusted-ca-file "$RUN/tls/ca.pem" --peer-client-cert-auth \
    --heartbeat-interval 50 --election-timeout 500 --logger zap --log-level warn \
    >"$RUN/logs/etcd-$i.log" 2>&1 < /dev/null &
done
start_coordinator() { # node number
  local i=$1
  cat > "$RUN/coordinator-$i.toml" <<TOML
listen = "198.19.0.$i:7443"
advertise = "198.19.0.$i:7443"
store = "etcd"
etcd-endpoints = [$endpoints]
etcd-ca = "$RUN/tls/ca.pem"
etcd-cert = "$RUN/tls/etcd-node$i.pem"
etcd-key = "$RUN/tls/etcd-node$i-key.pem"
data-dir = "$RUN/data-$i"
tls-dir = "$RUN/tls"
heartbeat-secs = 1
metrics-listen = "198.19.0.$i:9464"
TOML
  # Restarted whenever it stops, as systemd's Restart=always does (the
  # drop-in in deploy/systemd): a leader that cannot confirm its lease,
  # on a loaded machine, stops itself and comes back as a follower. The
  # loop runs inside the namespace, so `demo.sh down` ends it too.
  setsid ip netns exec $P-ctl bash -c \
    'while :; do "$0" --config "$1"; echo "coordinator exited ($?); restarting" >&2; sleep 0.5; done' \
    "$BIN/flotilla-coordinator" "$RUN/coordinator-$i.toml" \
    >>"$RUN/logs/coordinator-$i.log" 2>&1 < /dev/null &
}
for i in 1 2 3; do start_coordinator $i; done
fi
n=11
for h in host-a host-b host-c; do
  cat > "$RUN/$h/agent.toml" <<TOML
name = "$h"
coordinator = "$COORD"
tls-dir = "$RUN/tls"
networks-dir = "$RUN/$h/nets"
state-dir = "$RUN/$h/state"
migration-network = "mgmt"
metrics-listen = "198.19.0.$n:9465"
TOML
  setsid ip netns exec "$P-$h" "$BIN/flotilla-agent" --config "$RUN/$h/agent.toml" \
    >"$RUN/logs/$h.log" 2>&1 < /dev/null &
  n=$((n + 1))
done
fl() { ip netns exec $P-ctl "$BIN/flotilla" --coordinator $COORD --tls-dir "$RUN/tls" "$@"; }
# The leader's address (a follower's `hosts` shows what etcd stores, not who is connected).
leader() {
  fl --json --retry-secs 0 cluster 2>/dev/null | python3 -c '
import json, sys
print(next((c["address"] for c in json.load(sys.stdin) if c["leader"]), ""))' 2>/dev/null || true
}
hosts_live() { ip netns exec $P-ctl "$BIN/flotilla" --coordinator "$(leader)" --tls-dir "$RUN/tls" hosts; }
for _ in $(seq 150); do
  [ "$(hosts_live 2>/dev/null | grep -c ' connected ')" = 3 ] && break
  sleep 0.2
done
hosts_live

step "define and start the demo VM (its console and NIC are on network 'public')"
"$BIN/counting-guest" "$RUN/guest.img"
cat > "$RUN/demo.xml" <<XML
<domain type='kvm'>
  <name>demo</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='$RUN/guest.img'/><target dev='vda' bus='virtio'/><readonly/></disk>
    <interface type='network'><source network='public'/><model type='virtio'/></interface>
    <graphics type='vnc'><listen type='network' network='public'/></graphics>
  </devices>
</domain>
XML
fl define "$RUN/demo.xml"
fl start demo
fl list
echo "its NIC on network 'public' (MAC assigned at define), plumbed by the agent:"
fl domiflist demo

# Which namespace holds an address, so the VNC client connects from that host's network.
host_of() { case $1 in 198.18.1.1) echo host-a ;; 198.18.2.1) echo host-b ;; *) echo host-c ;; esac; }
# The guest's counter, read from its RAM through the agent's QEMU monitor.
counter() { # host [vm]
  local word
  word=$("$BIN/flotilla-agent" --state-dir "$RUN/$1/state" ctl qemu-monitor-command "${2:-demo}" \
    --hmp 'xp /1wx 0x7e00' 2>/dev/null | sed -n 's/.*: *0x\([0-9a-f]*\).*/\1/p' | head -1)
  echo $((16#${word:-0}))
}
shot() { # name [vm]
  local uri addr port host vm=${2:-demo}
  uri=$(fl domdisplay "$vm" | head -1 | cut -d' ' -f1)
  addr=${uri#vnc://}; port=${addr##*:}; addr=${addr%:*}
  host=$(host_of "$addr")
  echo "domdisplay: $uri ($host)" >&2
  # SeaBIOS takes a moment to reach the boot sector and put the counter on screen.
  for _ in $(seq 100); do [ "$(counter "$host" "$vm")" -gt 0 ] && break; sleep 0.1; done
  # The counter runs on during the capture, so bracket it: the hex number at
  # the screen's top left lies between the two readings.
  local lo hi
  lo=$(counter "$host" "$vm")
  ip netns exec "$P-$host" "$VENV/bin/vncdo" -s "$addr::$port" capture "$DEMO/screenshots/$1.png"
  hi=$(counter "$host" "$vm")
  echo "screenshot: $DEMO/screenshots/$1.png (guest counter $lo to $hi during the capture; on screen in hex at the top left, between $(printf '%08X' "$lo") and $(printf '%08X' "$hi"))" >&2
  echo "$addr"
}
step "the console, through a real VNC client"
first=$(shot before-migration)

if [ $HA = 1 ]; then
  step "the control plane: three coordinators, one leader, on a three-member etcd"
  fl cluster
  old=$(leader)
  # The leader's process, as `cluster` names it.
  leader_pid=$(fl --json cluster | python3 -c '
import json, sys
print(next(c["pid"] for c in json.load(sys.stdin) if c["leader"]))')
  pid_before=$(pgrep -f -- "-uuid $(fl --json dominfo demo | python3 -c 'import json,sys; print(json.load(sys.stdin)["DomInfo"]["entry"]["uuid"])')" | head -1)
  host=$(fl --json list | python3 -c 'import json,sys; print([v["host"] for v in json.load(sys.stdin)["Vms"] if v["name"]=="demo"][0])')
  c_before=$(counter "$host")
  step "kill -9 the leader ($old) while the guest runs"
  killed=$(date +%s.%N)
  # (It may have stopped on its own a moment ago: a failover either way.)
  kill -9 "$leader_pid" 2>/dev/null || true
  new=
  for _ in $(seq 200); do
    new=$(leader)
    [ -n "$new" ] && [ "$new" != "$old" ] && break
    sleep 0.05
  done
  [ -n "$new" ] && [ "$new" != "$old" ] || { echo "demo: no new leader" >&2; exit 1; }
  echo "$new leads $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$killed" "$(date +%s.%N)") s after the kill"
  for _ in $(seq 150); do
    [ "$(hosts_live 2>/dev/null | grep -c ' connected ')" = 3 ] && break
    sleep 0.2
  done
  hosts_live
  pid_after=$(pgrep -f -- "-uuid $(fl --json dominfo demo | python3 -c 'import json,sys; print(json.load(sys.stdin)["DomInfo"]["entry"]["uuid"])')" | head -1)
  c_after=$(counter "$host")
  echo "the guest's QEMU: pid $pid_before before, $pid_after after; its counter: $c_before, then $c_after"
  [ "$pid_before" = "$pid_after" ] && [ "$c_after" -gt "$c_before" ] || { echo "demo: the guest was disturbed" >&2; exit 1; }
  step "the killed coordinator comes back as a follower (restarted, as systemd would)"
  for _ in $(seq 100); do
    [ "$(fl --json --retry-secs 0 cluster 2>/dev/null | grep -c '"address"')" = 3 ] && break
    sleep 0.1
  done
  fl cluster
  step "live migration under the new leader"
  fl migrate demo --max-downtime 300
  second=$(shot after-migration)
  fl list
  if [ "$first" = "$second" ]; then echo "demo: console address did not change" >&2; exit 1; fi
  cat <<MSG

Three coordinators on etcd: the leader was killed, $new took over, and the
guest never noticed (same QEMU, counter moving); then it migrated.
Console before: $first   after: $second

Keep playing:
  export FLOTILLA_COORDINATOR=$COORD FLOTILLA_TLS_DIR=$RUN/tls
  ip netns exec $P-ctl $BIN/flotilla cluster
  ip netns exec $P-ctl $BIN/flotilla list
Logs: $RUN/logs/
Tear down:
  deploy/demo.sh down
MSG
  exit 0
fi

step "the console in a browser: noVNC through the coordinator (chromium, headless)"
# tests/web/browser.mjs drives chromium: one JSON command per line in, one
# JSON answer per line out. It trusts the coordinator's key and nothing else.
coproc BROWSER {
  ip netns exec $P-ctl env FLOTILLA_WEB_DEPS="$ROOT/deploy/web" \
    FLOTILLA_WEB_CERT="$RUN/tls/coordinator.pem" node "$ROOT/tests/web/browser.mjs" \
    2>>"$RUN/logs/browser.log"
}
ask() { # json → the answer's JSON
  local answer
  echo "$1" >&"${BROWSER[1]}"
  IFS= read -r -t 120 answer <&"${BROWSER[0]}" || { echo "demo: the browser did not answer $1" >&2; exit 1; }
  case $answer in *'"error"'*) echo "demo: browser: $answer" >&2; exit 1 ;; esac
  echo "$answer"
}
field() { python3 -c 'import json,sys; v=json.loads(sys.argv[1]).get(sys.argv[2]); print("" if v is None else v)' "$1" "$2"; }
IFS= read -r -t 60 hello <&"${BROWSER[0]}" || { echo "demo: chromium did not start (see $RUN/logs/browser.log)" >&2; exit 1; }
url=$(fl webconsole demo)
echo "console URL (opens once, within 60 s): $url"
ask "{\"cmd\":\"open\",\"page\":\"console\",\"url\":\"$url\"}" >/dev/null
seen=$(ask "{\"cmd\":\"wait_counter\",\"page\":\"console\",\"connects\":1,\"shot\":\"$DEMO/screenshots/browser-before-migration.png\"}")
echo "browser screenshot: $DEMO/screenshots/browser-before-migration.png (counter $(field "$seen" counter) on screen)"

step "live migration (the scheduler picks the destination)"
fl migrate demo --max-downtime 300
step "the console on its new host"
shown=$(field "$(ask '{"cmd":"counter","page":"console"}')" counter)
back=$(ask "{\"cmd\":\"wait_counter\",\"page\":\"console\",\"above\":${shown:-0},\"connects\":2,\"shot\":\"$DEMO/screenshots/browser-after-migration.png\"}")
echo "browser screenshot: $DEMO/screenshots/browser-after-migration.png (counter $(field "$back" counter) on screen, $(field "$back" ms) ms after the migration completed; banner: $(field "$back" banner))"
second=$(shot after-migration)
fl list
echo "its NIC, plumbed again on the new host's own 'public':"
fl domiflist demo
if [ "$first" = "$second" ]; then echo "demo: console address did not change" >&2; exit 1; fi

step "metrics (Prometheus text), coordinator and host-a's agent"
ip netns exec $P-ctl curl -fsS http://198.19.0.1:9464/metrics |
  grep -E '^flotilla_' | grep -v _bucket | sed 's/^/  coordinator: /'
ip netns exec $P-ctl curl -fsS http://198.19.0.11:9465/metrics |
  grep -E '^flotilla_agent_' | grep -v _bucket | sed 's/^/  host-a: /'
step "events"
fl events | tail -n 12
login=$(fl web-login)
ask "{\"cmd\":\"open\",\"page\":\"fleet\",\"url\":\"$login\"}" >/dev/null
ask "{\"cmd\":\"wait_text\",\"page\":\"fleet\",\"contains\":\"migration completed\",\"shot\":\"$DEMO/screenshots/fleet-page.png\"}" >/dev/null
echo "fleet page: $DEMO/screenshots/fleet-page.png"
echo '{"cmd":"quit"}' >&"${BROWSER[1]}"

step "high availability: host-c is cut off; its HA guest comes back on another host"
sed -e 's/<name>demo</<name>ha-demo</' "$RUN/demo.xml" > "$RUN/ha-demo.xml"
fl define "$RUN/ha-demo.xml" >/dev/null
fl ha ha-demo on
fl start ha-demo --host host-c
ha_before=$(shot ha-before-cut ha-demo)
ip -n $P-host-c link set mgmt0 down
cut=$(date +%s.%N)
echo "host-c's management link is down: its lease (8 s) lapses, its agent kills the HA guest, and the"
echo "coordinator restarts it elsewhere 8 s × 1.001 + 2 s after host-c was last heard"
ha_host=
for _ in $(seq 300); do
  ha_host=$(fl list --json | python3 -c '
import json, sys
for v in json.load(sys.stdin)["Vms"]:
    if v["name"] == "ha-demo" and v["state"] == "running" and v["host"] != "host-c":
        print(v["host"])')
  [ -n "$ha_host" ] && break
  sleep 0.2
done
[ -n "$ha_host" ] || { echo "demo: ha-demo was not restarted" >&2; exit 1; }
echo "ha-demo runs on $ha_host $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$cut" "$(date +%s.%N)") s after the cut"
ha_after=$(shot ha-after-failover ha-demo)
fl events | grep -E 'host host-c|ha-demo' | tail -n 6
ip -n $P-host-c link set mgmt0 up
for _ in $(seq 150); do
  [ "$(fl hosts 2>/dev/null | grep -c ' connected ')" = 3 ] && break
  sleep 0.2
done
echo "host-c is back and runs none of what was fenced away from it:"
fl list

cat <<MSG

The guest counted on from one screenshot to the next: it moved while running.
Console before: $first   after: $second
The HA guest restarted on $ha_host when host-c was cut off: console $ha_before, then $ha_after.

Keep playing:
  export FLOTILLA_COORDINATOR=$COORD FLOTILLA_TLS_DIR=$RUN/tls
  ip netns exec $P-ctl $BIN/flotilla hosts
  ip netns exec $P-ctl $BIN/flotilla migrate demo
  ip netns exec $P-ctl $BIN/flotilla webconsole demo   # a URL for a browser in $P-ctl
Metrics (Prometheus text):
  ip netns exec $P-ctl curl -s http://198.19.0.1:9464/metrics      # coordinator
  ip netns exec $P-ctl curl -s http://198.19.0.11:9465/metrics     # host-a's agent
Logs: $RUN/logs/
Tear down:
  deploy/demo.sh down
MSG
