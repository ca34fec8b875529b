# TCMU cases: `jiva tcmu` as the handler of LIO backstores `user:jiva`,
# created with targetcli (which finds the handler on the system D-Bus) and
# exported through the loopback fabric (tcm_loop) as a SCSI disk of the
# guest kernel. Cases run in order and share the handler and the volumes.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

VOL=tvol
DIR=/tmp/kt-tcmu/data            # guest tmpfs
SIZE=256M
NBD_ADDR=127.0.0.1:10812
CFG=$VOL@127.0.0.1/10812
VOL2=tvol2
DIR2=/tmp/kt-tcmu/other        # not data*: jiva_down matches on the dir prefix
SIZE2=64M
NBD_ADDR2=127.0.0.1:10813
CFG2=$VOL2@127.0.0.1/10813
SUMS=$KT_STATE/tcmu-tree.sha256
NFILES=120
FIO_ARGS=(--ioengine=libaio --direct=1 --iodepth=16 --verify=crc32c --verify_fatal=1
    --rw=randwrite --bs=4k --size=32M --randseed=4321 --name=tcmu-verify)
HS=$KT_STATE/tcmu-handler
HLOG=$KT_OUT/logs/jiva-tcmu.log

tc() { timeout 120 targetcli "$@"; }

# Kernel modules, the system bus (with our policy) and a loopback target.
tcmu_ready() {
    for tool in targetcli dbus-daemon; do
        command -v "$tool" >/dev/null || kt_fail "$tool not found (install targetcli-fb and dbus on the host)"
    done
    modprobe target_core_user || kt_fail "modprobe target_core_user failed"
    modprobe tcm_loop || kt_fail "modprobe tcm_loop failed"
    modprobe sd_mod
    if [ ! -e "$KT_STATE/dbus.started" ]; then
        mkdir -p /run/dbus /etc/dbus-1/system.d
        cp "$KT_REPO/frontends/tcmu/dbus/jiva-tcmu.conf" /etc/dbus-1/system.d/
        dbus-daemon --system --fork || kt_fail "dbus-daemon --system failed"
        touch "$KT_STATE/dbus.started"
    fi
}

handler_running() { [ -e "$HS/pid" ] && [ ! -e "$HS/rc" ] && kill -0 "$(cat "$HS/pid")" 2>/dev/null; }

# handler_start: runs `jiva tcmu` and waits for "ready tcmu jiva devices N";
# prints N (devices it reattached).
handler_start() {
    handler_running && kt_fail "the TCMU handler is already running"
    mkdir -p "$HS"
    rm -f "$HS/pid" "$HS/rc" "$HS/stdout"
    echo "==== $(date +%T) jiva tcmu" >>"$HLOG"
    (
        { set +ex; } 2>/dev/null
        NO_COLOR=1 JIVA_LOG=${JIVA_LOG:-info} sh -c 'echo $$ >"$1"; shift; exec "$@"' kt-tcmu "$HS/pid" \
            "$KT_JIVA" tcmu >"$HS/stdout" 2>>"$HLOG" </dev/null
        echo $? >"$HS/rc.tmp" && mv "$HS/rc.tmp" "$HS/rc"
    ) >/dev/null 2>>"$HLOG" &   # not our stdout: callers use $(handler_start)
    local deadline=$(($(date +%s) + 60))
    until grep -q '^ready tcmu jiva' "$HS/stdout" 2>/dev/null; do
        if [ -e "$HS/rc" ]; then
            tail -n 20 "$HLOG" >&2
            kt_fail "jiva tcmu exited with status $(cat "$HS/rc") before it was ready"
        fi
        [ "$(date +%s)" -lt "$deadline" ] || kt_fail "jiva tcmu was not ready within 60s"
        sleep 0.2
    done
    cat "$HS/stdout" >&2
    sed -n 's/^ready tcmu jiva devices //p' "$HS/stdout"
}

# handler_stop: SIGTERM; fails unless it exits 0.
handler_stop() {
    handler_running || kt_fail "the TCMU handler is not running"
    kill -TERM "$(cat "$HS/pid")"
    kt_wait 60 "jiva tcmu to exit" test -e "$HS/rc"
    [ "$(cat "$HS/rc")" = 0 ] || kt_fail "jiva tcmu exited with status $(cat "$HS/rc") after SIGTERM"
}

# The loopback target's WWN (one per run).
loop_wwn() { ls /sys/kernel/config/target/loopback/ 2>/dev/null | grep '^naa\.' | head -n 1; }

# disk_of NAME: /dev/sdX of LUN backed by backstore NAME (empty if none).
disk_of() {
    local d
    for d in /sys/block/sd*; do
        [ -e "$d/device/vendor" ] || continue
        grep -q '^JIVA' "$d/device/vendor" || continue
        # The serial is the volume's, so tell volumes apart by the LUN's
        # backstore: the SCSI device's LUN number maps to our LUN.
        if [ "$(cat "$KT_STATE/lun.$1" 2>/dev/null)" = "$(basename "$(readlink -f "$d/device")" | awk -F: '{print $4}')" ]; then
            echo "/dev/${d##*/}"
            return 0
        fi
    done
    return 0
}
has_disk() { [ -n "$(disk_of "$1")" ]; }
no_disk() { [ -z "$(disk_of "$1")" ]; }

# export_lun NAME CFG SIZE LUN: creates backstore user:jiva/NAME and LUN
# number LUN for it on the loopback target; prints the disk.
export_lun() {
    local name=$1 cfg=$2 size=$3 lun=$4 wwn d
    tc /backstores/user:jiva create name="$name" size="$size" cfgstring="$cfg" >&2 \
        || kt_fail "targetcli could not create user:jiva/$name"
    wwn=$(loop_wwn)
    if [ -z "$wwn" ]; then
        tc /loopback create >&2 || kt_fail "targetcli /loopback create failed"
        wwn=$(loop_wwn)
    fi
    [ -n "$wwn" ] || kt_fail "no loopback target"
    echo "$lun" >"$KT_STATE/lun.$name"
    tc "/loopback/$wwn/luns" create "/backstores/user:jiva/$name" lun="$lun" >&2 \
        || kt_fail "targetcli could not create LUN $lun"
    kt_wait 60 "a disk for $name" has_disk "$name"
    d=$(disk_of "$name")
    kt_wait 20 "$d to appear" test -b "$d"
    kt_wait 20 "$d to get a size" kt_dev_connected "$d"
    echo "$d"
}

# unexport_lun NAME: deletes the LUN and the backstore.
unexport_lun() {
    local name=$1 wwn lun
    wwn=$(loop_wwn)
    lun=$(cat "$KT_STATE/lun.$name")
    tc "/loopback/$wwn/luns" delete "lun$lun" >&2 || kt_fail "targetcli could not delete LUN $lun"
    kt_wait 30 "the disk of $name to go" no_disk "$name"
    tc /backstores/user:jiva delete "$name" >&2 || kt_fail "targetcli could not delete user:jiva/$name"
}

tcmu_cleanup() {
    local m
    for m in $(awk -v p="$KT_STATE/mnt/tcmu" 'index($2, p) == 1 { print $2 }' /proc/mounts); do
        umount "$m" || umount -l "$m"
    done
    # Deleting a backstore waits for the handler's reply: keep one running.
    handler_running || handler_start >/dev/null || true
    tc clearconfig confirm=True || true
}

# 1. targetcli refuses a bad cfgstring with our message, creates user:jiva
#    backstores for a good one, and the loopback LUN is a disk with the
#    volume's size: mkfs.ext4, files, fio crc32c verify, clean fsck.
disk_io() {
    tcmu_ready
    rm -rf "$DIR"
    jiva_up "$VOL" "$DIR" "$SIZE" 3 "$NBD_ADDR"
    handler_start >/dev/null
    tc /backstores ls >&2
    tc /backstores/user:jiva ls >&2 || kt_fail "targetcli has no /backstores/user:jiva (D-Bus registration)"
    local out rc=0
    out=$(tc /backstores/user:jiva create name=bad size=$SIZE cfgstring=nosuch@127.0.0.1/10812 2>&1) || rc=$?
    echo "$out" >&2
    [ $rc -ne 0 ] || kt_fail "targetcli accepted a cfgstring naming no volume"
    grep -q 'cfgstring invalid: cannot open volume "nosuch"' <<<"$out" || kt_fail "no clear refusal message"
    out=$(tc /backstores/user:jiva create name=bad size=$SIZE cfgstring=nohost 2>&1) || true
    grep -q "VOLUME@HOST" <<<"$out" || kt_fail "a malformed cfgstring was not explained: $out"
    local dev m
    dev=$(export_lun "$VOL" "$CFG" "$SIZE" 0)
    "$KT_JIVA" tcmu ls >&2
    "$KT_JIVA" tcmu ls --json | grep -q "\"cfgstring\": \"$CFG\"" || kt_fail "jiva tcmu ls does not list $CFG"
    [ "$(kt_devsize "$dev")" -eq "$(kt_bytes "$SIZE")" ] \
        || kt_fail "$dev has $(kt_devsize "$dev") bytes, expected $(kt_bytes "$SIZE")"
    # Reconfiguration goes through the handler (netlink RECONFIG_DEVICE):
    # a size other than the volume's is refused, the same size and a
    # write-cache change are accepted.
    local cfs
    cfs=$(ls -d /sys/kernel/config/target/core/user_*/"$VOL")
    if echo $(($(kt_bytes "$SIZE") * 2)) >"$cfs/attrib/dev_size"; then
        kt_fail "the kernel took a dev_size the handler should have refused"
    fi
    [ "$(cat "$cfs/attrib/dev_size")" = "$(kt_bytes "$SIZE")" ] || kt_fail "dev_size changed"
    grep -q "$VOL: cannot resize" "$HLOG" || kt_fail "the handler did not log the refused resize"
    echo "$(kt_bytes "$SIZE")" >"$cfs/attrib/dev_size" || kt_fail "the same dev_size was refused"
    echo 1 >"$cfs/attrib/emulate_write_cache" || kt_fail "emulate_write_cache=1 was refused"
    cat "/sys/block/${dev#/dev/}/device/vendor" "/sys/block/${dev#/dev/}/device/model" >&2
    mkfs_ext4 "$dev"
    m=$(kt_mount "$dev" tcmu)
    tree_write "$m/tree" "$NFILES" "$SUMS"
    local fout="$KT_OUT/logs/tcmu.fio.txt"
    rc=0
    timeout 600 fio --output="$fout" --filename="$m/fio.dat" --do_verify=1 "${FIO_ARGS[@]}" || rc=$?
    cat "$fout"
    [ $rc -eq 0 ] || kt_fail "fio exited with status $rc"
    grep -q 'err= 0' "$fout" || kt_fail "fio reported errors"
    kt_umount "$m"
    kt_drop_caches
    fsck_clean "$dev"
}

# 2. Restart the handler while the backstore exists: the new one reattaches
#    (resetting the ring) and the files and fio's data read back intact.
handler_restart() {
    tcmu_ready
    local dev m n rc=0
    dev=$(disk_of "$VOL")
    [ -n "$dev" ] || kt_fail "no disk from the previous case"
    handler_stop
    n=$(handler_start)
    [ "$n" = 1 ] || kt_fail "the restarted handler reattached $n devices, expected 1"
    grep -q "$VOL: reattached" "$HLOG" || kt_fail "no reattach in the handler log"
    kt_drop_caches
    m=$(kt_mount "$dev" tcmu)
    tree_verify "$m/tree" "$SUMS"
    local fout="$KT_OUT/logs/tcmu.fio-verify.txt"
    timeout 600 fio --output="$fout" --filename="$m/fio.dat" --verify_only "${FIO_ARGS[@]}" || rc=$?
    cat "$fout"
    [ $rc -eq 0 ] || kt_fail "fio verify exited with status $rc"
    kt_umount "$m"
}

# 3. A second volume as a second LUN; deleting the first LUN and backstore
#    makes the handler release that device while it keeps serving the
#    second. Then everything is torn down and both volumes stop cleanly.
release_one() {
    tcmu_ready
    rm -rf "$DIR2"
    jiva_up "$VOL2" "$DIR2" "$SIZE2" 1 "$NBD_ADDR2" --api 127.0.0.1:9511   # the first volume has 9500
    local d2 rc=0
    d2=$(export_lun "$VOL2" "$CFG2" "$SIZE2" 1)
    local mark
    mark=$(wc -l <"$HLOG")
    unexport_lun "$VOL"
    # Only log lines written since the LUN went (earlier restarts released it too).
    released() { tail -n +$((mark + 1)) "$HLOG" | grep -q "$VOL: released"; }
    kt_wait 30 "the handler to release $VOL" released
    handler_running || kt_fail "the handler died when a device was removed"
    local fout="$KT_OUT/logs/tcmu.fio-second.txt"
    timeout 600 fio --output="$fout" --filename="$d2" --do_verify=1 "${FIO_ARGS[@]/--size=32M/--size=16M}" || rc=$?
    cat "$fout"
    [ $rc -eq 0 ] || kt_fail "fio on the second disk exited with status $rc"
    unexport_lun "$VOL2"
    tc /loopback delete "$(loop_wwn)" >&2 || kt_fail "targetcli could not delete the loopback target"
    handler_stop
    jiva_down "$VOL"
    jiva_down "$VOL2"
}

kt_case -t 900 disk-io disk_io
kt_case -t 600 -n disk-io handler-restart handler_restart
kt_case -t 600 -n handler-restart release-one release_one
if [ -z "${KT_IN_CASE:-}" ]; then
    if [ -n "$(loop_wwn)" ] || [ -n "$(ls /sys/kernel/config/target/core 2>/dev/null | grep user_)" ]; then
        tcmu_cleanup >>"$KT_OUT/logs/tcmu.cleanup.log" 2>&1
    fi
    handler_running && kill -TERM "$(cat "$HS/pid")" 2>/dev/null
fi
kt_done
