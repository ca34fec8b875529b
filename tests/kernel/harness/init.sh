#!/bin/busybox sh
# /init of the test initramfs (busybox). Mounts the host's root read-only over
# 9p, makes it writable with a tmpfs-backed overlay, chroots into it and runs
# harness/guest-main.sh; prints a sentinel with its exit code, powers off.
# run.sh writes /kt.env (KT_REPO, KT_KVER, KT_MODULES, ...) next to this file.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
. /kt.env

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# fd 8: the results serial port (kept open: /dev moves into the new root).
exec 8>/dev/ttyS1
say() { echo "kt-init: $*"; echo "kt-init: $*" >&8; }
die() {
    say "FATAL $*"
    echo "KT-GUEST-EXIT 99" >&8
    echo "KT-GUEST-EXIT 99"
    sync; poweroff -f; sleep 5; echo o >/proc/sysrq-trigger
}

# Load the modules in dependency order; retry a few rounds for any order issue.
pending="$KT_MODULES"
for round in 1 2 3 4 5; do
    left=""
    for m in $pending; do
        f=/modules/$m.ko
        [ -e "$f" ] || continue
        insmod "$f" 2>/dev/null || { grep -q "^$(echo "$m" | tr - _) " /proc/modules || left="$left $m"; }
    done
    pending="$left"
    [ -z "$pending" ] && break
done
[ -z "$pending" ] || say "modules not loaded: $pending"

mkdir -p /host /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /host \
    || die "cannot mount the host root over 9p"
mount -t tmpfs -o mode=0755 tmpfs /rw || die "tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || die "cannot mount the overlay"
for d in proc sys dev; do
    mkdir -p /newroot/$d
    mount --move /$d /newroot/$d || die "cannot move /$d"
done
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mkdir -p /newroot/dev/pts /newroot/dev/shm /newroot/kt-out
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 ktout /newroot/kt-out \
    || die "cannot mount the output directory over 9p"

# Modules the kernel requests itself (e.g. mount -t ext4) must come from the
# host root: the kernel runs its modprobe helper in this initramfs' root.
cat >/sbin/kt-modprobe <<'EOS'
#!/bin/busybox sh
exec /bin/busybox chroot /newroot /sbin/modprobe "$@"
EOS
chmod +x /sbin/kt-modprobe
echo /sbin/kt-modprobe >/newroot/proc/sys/kernel/modprobe

say "root ready, running $KT_REPO/tests/kernel/harness/guest-main.sh"
chroot /newroot /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root TERM=dumb KT_REPO="$KT_REPO" KT_JIVA="$KT_JIVA" KT_FILES="$KT_FILES" \
    KT_OUT=/kt-out KT_RESULTS=/dev/ttyS1 \
    /bin/bash "$KT_REPO/tests/kernel/harness/guest-main.sh"
rc=$?
sync
echo "KT-GUEST-EXIT $rc" >&8
echo "KT-GUEST-EXIT $rc"
umount /newroot/kt-out 2>/dev/null
sync
poweroff -f
sleep 5
echo o >/proc/sysrq-trigger
