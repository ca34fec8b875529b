#!/usr/bin/env bash
# Installs what tests/kernel/run.sh needs (Debian; run as root).
# qemu-utils goes in the same command as qemu-system-x86 so qemu-img/qemu-nbd
# stay installed. If a newer qemu-utils (e.g. from backports) is installed,
# apt refuses to mix it with the distribution's qemu-system-x86; we then
# retry taking qemu-utils from the distribution release (a downgrade).
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
    echo "install-deps.sh: must run as root (apt-get)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
pkgs=(linux-image-amd64 busybox-static nbd-client fio e2fsprogs kmod util-linux
      cpio gzip coreutils open-iscsi targetcli-fb dbus-daemon)
apt-get update
if ! apt-get install -y qemu-system-x86 qemu-utils "${pkgs[@]}"; then
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [ -n "$codename" ] || { echo "install-deps.sh: apt-get install failed" >&2; exit 1; }
    echo "install-deps.sh: retrying with qemu-utils/$codename (--allow-downgrades)" >&2
    apt-get install -y --allow-downgrades qemu-system-x86 "qemu-utils/$codename" "${pkgs[@]}"
fi
