# iSCSI cases: `jiva up --iscsi` served to the guest kernel's iSCSI
# initiator (open-iscsi: iscsid + iscsiadm over iscsi_tcp) on the guest's
# loopback. Cases run in order and share one volume and one iscsid.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

VOL=ivol
DIR=/tmp/kt-iscsi/data           # guest tmpfs
SIZE=256M
REPLICAS=3
NBD_ADDR=127.0.0.1:10811
PORTAL=127.0.0.1:3260
IQN=iqn.2026-11.io.jiva:$VOL
SUMS=$KT_STATE/iscsi-tree.sha256
NFILES=200
FIO_ARGS=(--ioengine=libaio --direct=1 --iodepth=16 --verify=crc32c --verify_fatal=1
    --rw=randwrite --bs=4k --size=48M --randseed=1234 --name=iscsi-verify)

# Starts iscsid (once per run) with an initiator name of our own.
iscsi_ready() {
    for tool in iscsiadm iscsid; do
        PATH=$PATH:/sbin:/usr/sbin command -v "$tool" >/dev/null \
            || kt_fail "$tool not found (install open-iscsi on the host)"
    done
    modprobe iscsi_tcp || kt_fail "modprobe iscsi_tcp failed"
    modprobe sd_mod
    mkdir -p /run/lock/iscsi /etc/iscsi
    [ -s /etc/iscsi/initiatorname.iscsi ] \
        || echo "InitiatorName=iqn.2026-11.io.jiva:kt-guest" >/etc/iscsi/initiatorname.iscsi
    if ! iscsiadm -m session >/dev/null 2>&1 && [ ! -e "$KT_STATE/iscsid.pid" ]; then
        (iscsid -f >>"$KT_OUT/logs/iscsid.log" 2>&1 </dev/null & echo $! >"$KT_STATE/iscsid.pid")
    fi
    # `iscsiadm -m session` exits 21 (no sessions) once iscsid answers.
    iscsid_up() { local rc=0; iscsiadm -m session >/dev/null 2>&1 || rc=$?; [ $rc -eq 0 ] || [ $rc -eq 21 ]; }
    kt_wait 20 "iscsid to answer" iscsid_up
}

# The sdX disk of our session (empty while there is none).
iscsi_disk() {
    iscsiadm -m session -P 3 2>/dev/null | sed -n 's/.*Attached scsi disk \(sd[a-z]*\).*/\1/p' | head -n 1
}

iscsi_has_disk() { [ -n "$(iscsi_disk)" ]; }
iscsi_no_disk() { [ -z "$(iscsi_disk)" ]; }

# iscsi_login [NAME=VALUE...]: discovers the portal, sets the node record's
# NAME to VALUE (after discovery, which rewrites the record), logs in, waits
# for the disk; prints /dev/sdX.
iscsi_login() {
    local targets d kv
    targets=$(timeout 60 iscsiadm -m discovery -t st -p "$PORTAL") || kt_fail "discovery on $PORTAL failed"
    echo "$targets" >&2
    echo "$targets" | grep -q " $IQN\$" || kt_fail "discovery did not list $IQN"
    for kv in "$@"; do
        iscsiadm -m node -T "$IQN" -p "$PORTAL" -o update -n "${kv%%=*}" -v "${kv#*=}" >&2 \
            || kt_fail "cannot set ${kv%%=*}"
    done
    timeout 60 iscsiadm -m node -T "$IQN" -p "$PORTAL" --login >&2 || kt_fail "login to $IQN failed"
    kt_wait 30 "an sd disk for the session" iscsi_has_disk
    d=/dev/$(iscsi_disk)
    kt_wait 20 "$d to appear" test -b "$d"
    kt_wait 20 "$d to get a size" kt_dev_connected "$d"
    echo "$d"
}

iscsi_logout() {
    timeout 60 iscsiadm -m node -T "$IQN" -p "$PORTAL" --logout >&2 || kt_fail "logout from $IQN failed"
    kt_wait 30 "the session to end" iscsi_no_disk
}

# Leaves no mount or session behind (for a failed case).
iscsi_cleanup() {
    local m
    for m in $(awk -v p="$KT_STATE/mnt/iscsi" 'index($2, p) == 1 { print $2 }' /proc/mounts); do
        umount "$m" || umount -l "$m"
    done
    timeout 60 iscsiadm -m node --logoutall=all >/dev/null 2>&1 || true
}

# 1. Fresh volume served over iSCSI: discovery + login gives a disk of the
#    volume's size; mkfs.ext4, mount, write a tree of files, fio with crc32c
#    verification on a file in it; unmount and stay logged in.
write_files() {
    iscsi_ready
    iscsi_cleanup
    rm -rf "$DIR"
    jiva_up "$VOL" "$DIR" "$SIZE" "$REPLICAS" "$NBD_ADDR" --iscsi "$PORTAL"
    grep -q "^iSCSI: $PORTAL $IQN\$" "$KT_STATE/vol/$VOL/stdout" || kt_fail "jiva up did not announce $PORTAL $IQN"
    local dev m
    dev=$(iscsi_login)
    [ "$(kt_devsize "$dev")" -eq "$(kt_bytes "$SIZE")" ] \
        || kt_fail "$dev has $(kt_devsize "$dev") bytes, expected $(kt_bytes "$SIZE")"
    cat "/sys/block/${dev#/dev/}/queue/logical_block_size" "/sys/block/${dev#/dev/}/queue/physical_block_size" >&2
    mkfs_ext4 "$dev"
    m=$(kt_mount "$dev" iscsi)
    tree_write "$m/tree" "$NFILES" "$SUMS"
    local out="$KT_OUT/logs/iscsi.fio.txt" rc=0
    timeout 600 fio --output="$out" --filename="$m/fio.dat" --do_verify=1 "${FIO_ARGS[@]}" || rc=$?
    cat "$out"
    [ $rc -eq 0 ] || kt_fail "fio exited with status $rc"
    grep -q 'err= 0' "$out" || kt_fail "fio reported errors"
    sync -f "$m/tree" || kt_fail "syncfs on $m failed"
    kt_umount "$m"
}

# 2. Log out, log in again (a new session, this time with CRC32C header and
#    data digests), and verify everything: the files' checksums, fio's data
#    (verify only), and a clean fsck.
relogin_verify() {
    iscsi_ready
    local dev m out="$KT_OUT/logs/iscsi.fio-verify.txt" rc=0
    dev=/dev/$(iscsi_disk)
    [ "$dev" != /dev/ ] || kt_fail "no iSCSI disk from the previous case"
    iscsi_logout
    kt_drop_caches
    dev=$(iscsi_login "node.conn[0].iscsi.HeaderDigest=CRC32C" "node.conn[0].iscsi.DataDigest=CRC32C")
    iscsiadm -m session -P 2 >&2
    iscsiadm -m session -P 2 | grep -q "HeaderDigest: CRC32C" || kt_fail "header digest not negotiated"
    iscsiadm -m session -P 2 | grep -q "DataDigest: CRC32C" || kt_fail "data digest not negotiated"
    m=$(kt_mount "$dev" iscsi)
    tree_verify "$m/tree" "$SUMS"
    timeout 600 fio --output="$out" --filename="$m/fio.dat" --verify_only "${FIO_ARGS[@]}" || rc=$?
    cat "$out"
    [ $rc -eq 0 ] || kt_fail "fio verify exited with status $rc"
    kt_umount "$m"
    kt_drop_caches
    fsck_clean "$dev"
    iscsi_logout
    jiva_down "$VOL"
}

kt_case -t 900 write-files write_files
kt_case -t 600 -n write-files relogin-verify relogin_verify
if [ -z "${KT_IN_CASE:-}" ]; then
    iscsi_cleanup >>"$KT_OUT/logs/iscsi.cleanup.log" 2>&1
    [ -e "$KT_STATE/iscsid.pid" ] && kill "$(cat "$KT_STATE/iscsid.pid")" 2>/dev/null
    rm -f "$KT_STATE/iscsid.pid"
fi
kt_done
