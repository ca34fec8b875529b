#!/usr/bin/env bash
# Runs the fast test suite: unit, property and integration tests, the
# integration tests against real NBD peers (nbdinfo, nbdcopy, qemu-img, fio)
# and iSCSI peers (libiscsi tools and iscsi-test-cu, qemu-img, tgtd).
# Installs the peers first when they are missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdkit:nbdkit fio:fio qemu-img:qemu-utils qemu-io:qemu-utils nbdsh:python3-libnbd \
    iscsi-test-cu:libiscsi-bin iscsi-inq:libiscsi-bin tgtd:tgt; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
# qemu's iscsi:// driver is a module of its own.
ls /usr/lib/*/qemu/block-iscsi.so >/dev/null 2>&1 || need+=(qemu-block-extra)
# bindgen (the tcmu-sys crate) needs libclang at build time.
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing test peers: ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    else
        echo "missing test peers (install them as root): ${need[*]}" >&2
        exit 1
    fi
fi

# Micro-benchmarks run once each in test mode, so they keep working.
cargo bench --bench hot_paths -- --test >/dev/null
exec cargo test --workspace --release "$@"
