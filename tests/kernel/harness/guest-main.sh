#!/bin/bash
# Runs inside the guest (chrooted into the overlay of the host's root).
# Prepares the guest (loopback, configfs, modules), then runs each case file
# named in KT_FILES (paths relative to tests/kernel/guest/). Protocol lines go
# to $KT_RESULTS (the guest's second serial port); logs go to $KT_OUT/logs.
set -uo pipefail
export KT_REPO KT_JIVA KT_OUT KT_RESULTS
export KT_GUEST="$KT_REPO/tests/kernel/guest"
mkdir -p "$KT_OUT/logs"

emit() { echo "$*" >>"$KT_RESULTS"; echo "$*" >>"$KT_OUT/results.txt"; }

{
    echo "guest kernel: $(uname -r)"
    ip link set lo up
    mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
    # No udev in the guest: load the block drivers ourselves.
    modprobe sd_mod
    modprobe nbd nbds_max=4
    modprobe ext4
    ip addr show lo
    lsmod
} >"$KT_OUT/logs/guest-setup.log" 2>&1 || emit "KT-NOTE guest setup had errors (see logs/guest-setup.log)"

emit "KT-GUEST-START $(uname -r)"
status=0
for f in $KT_FILES; do
    path="$KT_GUEST/$f"
    emit "KT-FILE-BEGIN $f"
    if [ ! -f "$path" ]; then
        emit "FAIL ${f%.sh}:missing-case-file"
        status=1
        continue
    fi
    # A case file reports its own cases (kt_case) and ends with kt_done,
    # which exits 0 once every case has run; anything else means the file
    # itself broke.
    KT_FILE="${f%.sh}" bash "$path" >"$KT_OUT/logs/${f%.sh}.file.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
        dmesg >"$KT_OUT/logs/${f%.sh}.script.dmesg" 2>&1
        cp "$KT_OUT/logs/${f%.sh}.file.log" "$KT_OUT/logs/${f%.sh}.script.log" 2>/dev/null
        emit "FAIL ${f%.sh}:script (case file exited with $rc)"
        status=1
    fi
    emit "KT-FILE-END $f $rc"
done
dmesg >"$KT_OUT/logs/dmesg.final" 2>&1
sync
exit $status
