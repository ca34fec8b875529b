# NBD cases: `jiva up` served to the guest kernel's nbd driver over the
# guest's loopback. Cases run in order and share one volume.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

VOL=vol
DIR=/tmp/kt-nbd/data           # guest tmpfs; the volume holds ~150 MiB per replica at most
SIZE=256M
REPLICAS=3
ADDR=127.0.0.1:10809
DEV=/dev/nbd0
SUMS=$KT_STATE/nbd-tree.sha256
NFILES=300

# 1. Fresh 3-replica volume; mkfs.ext4, write a tree of random files, record
#    their checksums, unmount, detach. The volume stays up for case 2.
write_files() {
    rm -rf "$DIR"
    jiva_up "$VOL" "$DIR" "$SIZE" "$REPLICAS" "$ADDR"
    for k in $(seq "$REPLICAS"); do
        [ -d "$DIR/replica-$k" ] || kt_fail "no replica directory $DIR/replica-$k"
    done
    nbd_attach "$DEV" "$VOL"
    [ "$(kt_devsize "$DEV")" -eq "$(kt_bytes "$SIZE")" ] \
        || kt_fail "$DEV has $(kt_devsize "$DEV") bytes, expected $(kt_bytes "$SIZE")"
    mkfs_ext4 "$DEV"
    local m
    m=$(kt_mount "$DEV" nbd)
    tree_write "$m/tree" "$NFILES" "$SUMS"
    sync -f "$m/tree" || kt_fail "syncfs on $m failed"
    kt_umount "$m"
    nbd_detach "$DEV"
    du -sk "$DIR"/replica-*
}

# 2. Stop the volume (SIGTERM, exit 0), start it again on the same DIR,
#    attach, mount, verify every checksum, unmount, fsck -fn is clean.
restart_verify() {
    jiva_down "$VOL"
    jiva_up "$VOL" "$DIR" "$SIZE" "$REPLICAS" "$ADDR"
    nbd_attach "$DEV" "$VOL"
    kt_drop_caches
    local m
    m=$(kt_mount "$DEV" nbd)
    tree_verify "$m/tree" "$SUMS"
    kt_umount "$m"
    kt_drop_caches
    fsck_clean "$DEV"
    nbd_detach "$DEV"
}

# 3. fio with O_DIRECT + libaio on the raw device, crc32c verify, 4k and 64k
#    random writes at iodepth 16 on separate regions.
fio_verify() {
    jiva_ensure_up "$VOL" "$DIR" "$SIZE" "$REPLICAS" "$ADDR"
    nbd_attach "$DEV" "$VOL"
    local out="$KT_OUT/logs/nbd.fio.txt" rc=0
    timeout 900 fio --output="$out" \
        --filename="$DEV" --ioengine=libaio --direct=1 --iodepth=16 \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --rw=randwrite \
        --name=rand4k --bs=4k --offset=0 --size=32M \
        --name=rand64k --stonewall --bs=64k --offset=64M --size=64M || rc=$?
    cat "$out"
    [ $rc -eq 0 ] || kt_fail "fio exited with status $rc"
    # Both jobs must have finished with err=0.
    [ "$(grep -c 'err= 0' "$out")" -eq 2 ] || kt_fail "fio reported errors (see above)"
    nbd_detach "$DEV"
}

# 4. Write data, blkdiscard the whole device: it then reads back as zeros
#    and the replicas' files shrink (holes punched).
discard_zeroes() {
    jiva_ensure_up "$VOL" "$DIR" "$SIZE" "$REPLICAS" "$ADDR"
    nbd_attach "$DEV" "$VOL"
    local bytes before after
    bytes=$(kt_bytes "$SIZE")
    # Make sure there is data to discard whatever ran before.
    dd if=/dev/urandom of="$DEV" bs=1M seek=160 count=48 oflag=direct conv=fsync status=none \
        || kt_fail "writing 48 MiB to $DEV"
    sync
    before=$(du -sk "$DIR" | cut -f1)
    du -sk "$DIR"/replica-*/* >&2
    timeout 300 blkdiscard "$DEV" || kt_fail "blkdiscard $DEV failed (status $?)"
    # Every byte reads back as zero (O_DIRECT: from the volume, not the cache).
    local rc=0
    timeout 300 dd if="$DEV" bs=1M iflag=direct status=none | cmp -n "$bytes" - /dev/zero || rc=$?
    [ $rc -eq 0 ] || kt_fail "$DEV does not read back as zeros after blkdiscard (cmp status $rc)"
    after=$(du -sk "$DIR" | cut -f1)
    du -sk "$DIR"/replica-*/* >&2
    kt_log "replica data: ${before} KiB before blkdiscard, ${after} KiB after"
    [ "$after" -lt $((before / 2)) ] \
        || kt_fail "replica files did not shrink after blkdiscard: ${before} KiB before, ${after} KiB after"
    nbd_detach "$DEV"
    jiva_down "$VOL"
}

kt_case -t 420 write-files write_files
kt_case -t 360 -n write-files restart-verify restart_verify
kt_case -t 600 fio-verify fio_verify
kt_case -t 420 discard-zeroes discard_zeroes
kt_done
