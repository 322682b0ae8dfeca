# Sourced by test.sh, demo.sh and bench.sh: installs the Debian packages
# passed as arguments, plus QEMU's SPICE module when QEMU lacks SPICE.
#
# A machine whose qemu-utils comes from bookworm-backports needs
# qemu-system-x86 from there too (the two must be the same release), and
# QEMU from backports (10.x) ships SPICE as a package of its own.
# --no-remove matters: without it apt installs bookworm's QEMU by removing
# the newer qemu-utils, and the storage tests lose qemu-img.

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --no-remove "$@" >/dev/null
}

qemu_lacks_spice() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
  # Captured first: QEMU exits 1 here, and under the callers' pipefail a
  # pipe into grep would report that instead of grep's answer.
  local out
  out=$(qemu-system-x86_64 -spice help 2>&1 || true)
  [[ $out == *"no option group"* ]]
}

install_missing() {
  local need=("$@")
  qemu_lacks_spice && need+=(qemu-system-modules-spice)
  ((${#need[@]})) || return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "${0##*/}: ${need[*]} missing and not root to install them" >&2
    return 1
  fi
  echo "${0##*/}: installing ${need[*]}" >&2
  apt-get update -qq
  if ! apt_install "${need[@]}"; then
    echo "${0##*/}: retrying from bookworm-backports" >&2
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      >/etc/apt/sources.list.d/flotilla-backports.sources
    apt-get update -qq
    apt_install -t bookworm-backports "${need[@]}"
  fi
  if qemu_lacks_spice; then
    apt_install qemu-system-modules-spice || apt_install -t bookworm-backports qemu-system-modules-spice
  fi
}

# QEMU runs as the unprivileged flotilla-qemu (the agent's --qemu-user),
# whose primary group is kvm, as Debian's libvirt-qemu. A host without
# udev (a container) gets what udev's rules give /dev/kvm, and the kvm
# group also gets /dev/userfaultfd (post-copy migration), as libvirt gives
# each guest's QEMU.
ensure_qemu_user() {
  if [ "$(id -u)" -ne 0 ]; then
    id -u flotilla-qemu >/dev/null 2>&1 && return 0
    echo "${0##*/}: user flotilla-qemu missing and not root to create it" >&2
    return 1
  fi
  getent group kvm >/dev/null || groupadd --system kvm
  if ! id -u flotilla-qemu >/dev/null 2>&1; then
    echo "${0##*/}: creating user flotilla-qemu (group kvm)" >&2
    useradd --system --gid kvm --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin flotilla-qemu
  fi
  local dev
  for dev in /dev/kvm /dev/userfaultfd; do
    if [ -c "$dev" ] && [ "$(stat -c %G "$dev")" != kvm ]; then
      chgrp kvm "$dev" && chmod 0660 "$dev"
    fi
  done
}
