#!/usr/bin/env bash
# One private libvirtd for a namespace "host", for side-by-side comparisons:
#
#   ip netns exec NS unshare -m deploy/libvirt-host.sh WORK
#
# runs libvirtd in the foreground (kill it to stop it) in NS's network and a
# private mount namespace. Its run, state, log, cache and config directories
# are bind-mounted from WORK/{run,lib,log,cache,etc}, so no global libvirt
# state is read or written, and several instances (one per namespace host)
# can run at once. Clients outside reach it at
#
#   virsh -c 'qemu:///system?socket=WORK/run/libvirt-sock'
#
# Needs root, libvirt-daemon and libvirt-daemon-driver-qemu.
set -euo pipefail
WORK=${1:?usage: libvirt-host.sh WORK}
lv=$WORK
# Everything below mounts over the host's libvirt folders: only ever in a
# mount namespace of our own, never in the host's.
if [ "$(readlink /proc/self/ns/mnt)" = "$(readlink /proc/1/ns/mnt)" ]; then
  echo "libvirt-host.sh: run under 'unshare -m'; this is the host's mount namespace" >&2
  exit 1
fi
mkdir -p "$lv"/{run,lib,log,cache,etc}
# Mounts made here must never propagate back to the host.
mount --make-rprivate /
# /var/run is a symlink to /run on Debian, so binding /run/libvirt covers
# /var/run/libvirt too.
cp -a /etc/libvirt/. "$lv/etc/"
# The host's autostart links would start its own domains and networks (the
# default NAT network's 192.168.122.0/24 among them) in this namespace.
rm -rf "$lv/etc/qemu/autostart" "$lv/etc/qemu/networks/autostart"
for d in run:/run/libvirt lib:/var/lib/libvirt log:/var/log/libvirt \
         cache:/var/cache/libvirt etc:/etc/libvirt; do
  mkdir -p "${d#*:}"
  mount --bind "$lv/${d%%:*}" "${d#*:}"
done
[[ -L /var/run ]] || { mkdir -p /var/run/libvirt; mount --bind "$lv/run" /var/run/libvirt; }

# libvirt's qemu driver looks up its compiled-in default user/group
# 'libvirt-qemu' (virQEMUDriverConfigNew) BEFORE reading qemu.conf, and fails
# if it does not exist; libvirt-daemon-system would create it. Add it to
# private copies of passwd/group rather than to the real ones.
if ! getent passwd libvirt-qemu >/dev/null; then
  cp /etc/passwd "$lv/passwd"; cp /etc/group "$lv/group"
  echo 'libvirt-qemu:x:64055:64055:libvirt qemu (libvirt-host.sh):/nonexistent:/usr/sbin/nologin' >>"$lv/passwd"
  echo 'libvirt-qemu:x:64055:' >>"$lv/group"
  mount --bind "$lv/passwd" /etc/passwd
  mount --bind "$lv/group" /etc/group
fi

# The minimum that works here (tried): QEMU as root, because the
# libvirt-qemu above is only a placeholder for the lookup and owns nothing
# (/dev/kvm here is root-only, 0600); and no virtlogd (nothing runs it here,
# so domain start fails on its socket): QEMU's stdout/stderr go straight to
# /var/log/libvirt/qemu/NAME.log.
cat >"$lv/etc/qemu.conf" <<'CONF'
user = "root"
group = "root"
stdio_handler = "file"
CONF
# libvirtd's own log stays in WORK, warnings and up.
cat >"$lv/etc/libvirtd.conf" <<'CONF'
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
CONF

# The default pid file is /run/libvirtd.pid, outside the private dirs.
exec libvirtd --pid-file "$lv/run/libvirtd.pid"
