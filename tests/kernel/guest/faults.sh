# Fault case: fio with O_DIRECT on /dev/nbd2 (the guest kernel's nbd driver)
# while each of the three replica processes is killed with SIGKILL in turn.
# `jiva up` restarts each on its own directory and port, the controller
# reconnects and rebuilds it; fio must finish with no error and every
# replica must end healthy.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

VOL=fvol
DIR=/tmp/kt-faults/data
SIZE=128M
ADDR=127.0.0.1:10811
API=127.0.0.1:9511
DEV=/dev/nbd2

# Number of rebuilds replica K has completed.
rebuilds() {
    "$KT_JIVA" replica ls --api "$API" --json \
        | awk -F': ' '/"rebuilds_completed"/ { gsub(/[ ,]/, "", $2); print $2 }' | sed -n "$1p"
}
all_healthy() {
    local states
    states=$("$KT_JIVA" replica ls --api "$API" | awk 'NR > 1 { print $2 }')
    [ -n "$states" ] && ! echo "$states" | grep -qv '^healthy$'
}
rebuilt_since() { [ "$(rebuilds "$1")" -gt "$2" ] && all_healthy; }

fio_with_replica_kills() {
    rm -rf "$DIR"
    jiva_up "$VOL" "$DIR" "$SIZE" 3 "$ADDR" --api "$API" --checkpoint-interval 2
    nbd_attach "$DEV" "$VOL"
    local out="$KT_OUT/logs/faults.fio.txt" rc=0 k pid before
    timeout 800 fio --output="$out" --filename="$DEV" --ioengine=libaio --direct=1 --iodepth=16 \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --rw=randwrite \
        --name=kills --bs=4k --size=24M --loops=3 &
    local fio_pid=$!
    for k in 1 2 3; do
        sleep 2
        before=$(rebuilds "$k")
        pid=$(kt_pids_mentioning "$DIR/replica-$k" | head -n 1)
        [ -n "$pid" ] || kt_fail "no process for replica-$k"
        kill -KILL "$pid"
        kt_wait 240 "replica-$k back and rebuilt" rebuilt_since "$k" "$before"
        "$KT_JIVA" replica ls --api "$API"
    done
    wait "$fio_pid" || rc=$?
    cat "$out"
    [ $rc -eq 0 ] || kt_fail "fio exited with status $rc"
    grep -q 'err= 0' "$out" || kt_fail "fio reported errors (see above)"
    kt_wait 120 "every replica healthy" all_healthy
    "$KT_JIVA" volume status --api "$API"
    nbd_detach "$DEV"
    jiva_down "$VOL"
}

kt_case -t 900 fio-with-replica-kills fio_with_replica_kills
kt_done
