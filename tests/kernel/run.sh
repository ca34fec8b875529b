#!/usr/bin/env bash
# Real-kernel test suite: boots Debian's stock kernel under qemu (TCG) with
# the host's root file system read-only over 9p, and runs the guest case files
# (tests/kernel/guest/*.sh, except lib.sh) against the `jiva` binary inside it.
#
# Usage: tests/kernel/run.sh [CASEFILE...]     e.g. tests/kernel/run.sh nbd
# Environment:
#   KT_TIMEOUT  seconds for the whole VM run (default 900)
#   KT_JIVA     binary to test (default: target/release/jiva, built if missing)
#   KT_KERNEL   kernel image (default: newest /boot/vmlinuz-* with modules)
#   KT_OUT      directory for logs (default: a temp dir, kept on failure)
#   KT_VERBOSE  1: also echo the guest console while it runs
# Prints "PASS name"/"FAIL name" per case and "N passed, M failed"; exits
# non-zero on any failure, on a missing prerequisite, or if the guest never
# reports.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
KT_TIMEOUT=${KT_TIMEOUT:-900}
start_time=$(date +%s)

die() {
    echo "kernel tests: ERROR: $*" >&2
    exit 2
}
missing_dep() { die "$* -- install the prerequisites with (as root): tests/kernel/install-deps.sh"; }

# ------------------------------------------------------------ 1. prerequisites
command -v qemu-system-x86_64 >/dev/null || missing_dep "qemu-system-x86_64 not found (package qemu-system-x86)"

if [ -n "${KT_KERNEL:-}" ]; then
    kernel=$KT_KERNEL
else
    kernel=""
    for k in $(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V -r); do
        if [ -e "/lib/modules/${k#/boot/vmlinuz-}/modules.dep" ]; then
            kernel=$k
            break
        fi
    done
fi
[ -n "$kernel" ] && [ -r "$kernel" ] \
    || missing_dep "no readable /boot/vmlinuz-* with modules in /lib/modules (package linux-image-amd64)"
kver=${kernel#/boot/vmlinuz-}
[ -e "/lib/modules/$kver/modules.dep" ] || missing_dep "no modules for kernel $kver in /lib/modules/$kver"

# Modules the initramfs loads (in this order) to mount the root over 9p.
initrd_modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    netfs fscache 9pnet 9pnet_virtio 9p overlay"
# Modules the cases need from the host root at run time.
guest_modules="nbd sd_mod configfs target_core_user tcm_loop uio"
for m in $initrd_modules $guest_modules; do
    modinfo -k "$kver" -n "$m" >/dev/null 2>&1 || missing_dep "kernel $kver has no module $m"
done

busybox=$(command -v busybox || true)
[ -n "$busybox" ] || missing_dep "busybox not found (package busybox-static)"
if ldd "$busybox" >/dev/null 2>&1; then
    missing_dep "$busybox is dynamically linked; the initramfs needs busybox-static"
fi
for tool in cpio gzip modinfo timeout; do
    command -v "$tool" >/dev/null || missing_dep "$tool not found"
done
# Tools the guest runs from the host root.
for tool in bash nbd-client fio mkfs.ext4 fsck.ext4 blkdiscard modprobe ip sha256sum cmp dd du \
    timeout mount umount mountpoint dmesg awk targetcli dbus-daemon; do
    PATH=$PATH:/sbin:/usr/sbin command -v "$tool" >/dev/null || missing_dep "guest tool $tool not found"
done
fio --enghelp 2>/dev/null | grep -qw libaio || missing_dep "fio has no libaio engine"

# ------------------------------------------------------------ case files
files=()
if [ $# -gt 0 ]; then
    for a in "$@"; do
        a=${a##*/}
        a=${a%.sh}
        [ -f "$here/guest/$a.sh" ] || die "no case file tests/kernel/guest/$a.sh"
        files+=("$a.sh")
    done
else
    for f in "$here"/guest/*.sh; do
        f=${f##*/}
        [ "$f" = lib.sh ] || files+=("$f")
    done
fi
[ ${#files[@]} -gt 0 ] || die "no case files in tests/kernel/guest"

# ------------------------------------------------------------ 2. the binary
# The guest mounts fresh tmpfs on /tmp and /run: nothing under them is visible.
under_hidden() { case $1 in /tmp/* | /run/*) return 0 ;; *) return 1 ;; esac; }
under_hidden "$repo/" && die "the repository ($repo) is under /tmp or /run, which the guest cannot see"
if [ -n "${KT_JIVA:-}" ]; then
    jiva=$(readlink -f "$KT_JIVA")
    [ -x "$jiva" ] || die "KT_JIVA=$KT_JIVA is not an executable"
else
    jiva="${CARGO_TARGET_DIR:-$repo/target}/release/jiva"
    case $jiva in /*) ;; *) jiva="$repo/$jiva" ;; esac
    if [ ! -x "$jiva" ]; then
        echo "kernel tests: building $jiva (cargo build --release --bin jiva)"
        (cd "$repo" && cargo build --release --bin jiva) || die "cargo build --release --bin jiva failed"
        [ -x "$jiva" ] || die "cargo build did not produce $jiva"
    fi
fi
under_hidden "$jiva" && die "the binary $jiva is under /tmp or /run, which the guest cannot see"

# ------------------------------------------------------------ 3. initramfs
work=$(mktemp -d /tmp/jiva-kernel-tests.XXXXXX)
if [ -n "${KT_OUT:-}" ]; then
    out=$(mkdir -p "$KT_OUT" && cd "$KT_OUT" && pwd)
    rm -rf "$out/logs" "$out/results.txt"
    keep_out=1
else
    out=$work/out
    keep_out=0
fi
mkdir -p "$out/logs"
qpid=""
cleanup() {
    if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then
        kill -TERM "$qpid" 2>/dev/null || true
    fi
    if [ "$keep_out" = 0 ]; then rm -rf "$work"; else rm -rf "$work/initrd" "$work/initrd.gz"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rd=$work/initrd
mkdir -p "$rd/bin" "$rd/modules" "$rd/proc" "$rd/sys" "$rd/dev" "$rd/newroot" "$rd/host" "$rd/rw"
cp "$busybox" "$rd/bin/busybox"
loaded=""
for m in $initrd_modules; do
    p=$(modinfo -k "$kver" -n "$m")
    case $p in
        /*.ko) cp "$p" "$rd/modules/$m.ko" ;;
        /*.ko.xz) xz -dc "$p" >"$rd/modules/$m.ko" ;;
        /*.ko.zst) zstd -qdc "$p" >"$rd/modules/$m.ko" ;;
        /*.ko.gz) gzip -dc "$p" >"$rd/modules/$m.ko" ;;
        *) continue ;; # built in
    esac
    loaded="$loaded $m"
done
cp "$here/harness/init.sh" "$rd/init"
chmod +x "$rd/init"
{
    echo "KT_REPO='$repo'"
    echo "KT_JIVA='$jiva'"
    echo "KT_FILES='${files[*]}'"
    echo "KT_MODULES='$loaded'"
} >"$rd/kt.env"
(cd "$rd" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.gz"

# ------------------------------------------------------------ 4. boot
console=$out/console.log
serial=$out/serial.log
: >"$console"
: >"$serial"
echo "kernel tests: kernel $kver, binary $jiva, cases: ${files[*]}"
echo "kernel tests: logs in $out (timeout ${KT_TIMEOUT}s)"
timeout -k 20 "$KT_TIMEOUT" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -m 2048 -smp 2 \
    -kernel "$kernel" -initrd "$work/initrd.gz" \
    -append "console=ttyS0 quiet panic=-1" \
    -display none -no-reboot -nodefaults \
    -serial "file:$console" -serial "file:$serial" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$out,mount_tag=ktout,security_model=none,multidevs=remap" \
    </dev/null >"$out/qemu.log" 2>&1 &
qpid=$!

# Live progress from the results serial port until qemu exits.
follow() {
    local line
    tail -n +1 -F --pid="$qpid" "$1" 2>/dev/null | while IFS= read -r line; do
        line=${line%$'\r'}
        case $line in
            PASS\ * | FAIL\ *) echo "$line" ;;
            KT-CASE-BEGIN\ *) echo "  ... ${line#KT-CASE-BEGIN }" ;;
            KT-FILE-BEGIN\ *) echo "== ${line#KT-FILE-BEGIN }" ;;
            KT-NOTE\ * | kt-init:*) echo "  $line" ;;
        esac
    done
}
if [ "${KT_VERBOSE:-0}" = 1 ]; then
    tail -n +1 -F --pid="$qpid" "$console" 2>/dev/null | sed -u 's/\r$//; s/^/  console| /' &
fi
follow "$serial"
qrc=0
wait "$qpid" || qrc=$?
qpid=""
elapsed=$(($(date +%s) - start_time))

# ------------------------------------------------------------ 5. verdict
results=$(tr -d '\r' <"$serial")
passed=$(grep -c '^PASS ' <<<"$results" || true)
failed_ids=$(sed -n 's/^FAIL \([^ ]*\).*/\1/p' <<<"$results")
# Cases that began but never reported (the VM died or timed out meanwhile).
unfinished=""
for id in $(sed -n 's/^KT-CASE-BEGIN //p' <<<"$results"); do
    grep -qE "^(PASS|FAIL) $id( |\$)" <<<"$results" || unfinished="$unfinished $id"
done
guest_exit=$(sed -n 's/^KT-GUEST-EXIT //p' <<<"$results" | tail -n 1)
problem=""
if [ -z "$guest_exit" ]; then
    if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
        problem="TIMEOUT: the guest did not finish within ${KT_TIMEOUT}s (KT_TIMEOUT)"
    else
        problem="the guest never reported a result (qemu exit status $qrc)"
    fi
elif [ "$guest_exit" != 0 ] && [ -z "$failed_ids" ]; then
    problem="the guest runner exited with status $guest_exit"
fi

tail_file() { # FILE LINES TITLE
    [ -s "$1" ] || return 0
    echo "---- $3 (last $2 lines of $1)"
    tail -n "$2" "$1" | tr -d '\r'
}
for id in $failed_ids $unfinished; do
    base=${id/:/.}
    echo
    echo "==== FAIL $id"
    tail_file "$out/logs/$base.log" 60 "case log"
    if [ -n "$problem" ]; then
        : # the guest console is shown below
    elif [ -s "$out/logs/$base.dmesg" ]; then
        # The kernel log from the case's start marker on.
        sed -n "/kt: case $id begins/,\$p" "$out/logs/$base.dmesg" >"$work/case.dmesg"
        [ -s "$work/case.dmesg" ] || cp "$out/logs/$base.dmesg" "$work/case.dmesg"
        echo "---- guest dmesg since the case began (last 40 lines; all in $out/logs/$base.dmesg)"
        tail -n 40 "$work/case.dmesg"
    else
        tail_file "$console" 40 "guest console (kernel log)"
    fi
done
for id in $unfinished; do
    echo "FAIL $id (did not finish)"
done
if [ -n "$problem" ]; then
    echo
    echo "kernel tests: ERROR: $problem" >&2
    tail_file "$console" 60 "guest console (kernel log)"
    tail_file "$out/qemu.log" 20 "qemu output"
fi

nfailed=$(( $(echo $failed_ids $unfinished | wc -w) ))
echo
if [ "$nfailed" -gt 0 ] || [ -n "$problem" ] || [ "$passed" -eq 0 ]; then
    keep_out=1
    echo "kernel tests: ${elapsed}s, logs kept in $out"
    echo "$passed passed, $nfailed failed"
    [ "$passed" -eq 0 ] && [ "$nfailed" -eq 0 ] && echo "kernel tests: ERROR: no case ran" >&2
    exit 1
fi
echo "kernel tests: ${elapsed}s${KT_OUT:+, logs in $out}"
echo "$passed passed, $nfailed failed"
exit 0
