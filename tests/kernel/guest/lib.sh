# Helpers for the guest-side case files (sourced; runs inside the test VM).
#
# A case file looks like:
#
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#   my_case() { ...; }              # fails by exiting non-zero (set -e is on)
#   kt_case -t 300 my-case my_case  # runs it in a child, prints PASS/FAIL
#   kt_done                         # cleans up and ends the file
#
# kt_case runs each case in a fresh `bash` (under `timeout`) that re-sources
# the case file with KT_IN_CASE=1 (so kt_case/kt_done do nothing there) and
# calls the function with `set -euo pipefail -x`; its output is the case log
# ($KT_OUT/logs/FILE.CASE.log). State shared by the cases of a run lives in
# $KT_STATE (guest tmpfs).

[ -n "${KT_LIB_LOADED:-}" ] && return 0
KT_LIB_LOADED=1

KT_GUEST=${KT_GUEST:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
KT_REPO=${KT_REPO:-$(cd "$KT_GUEST/../../.." && pwd)}
KT_JIVA=${KT_JIVA:-$KT_REPO/target/release/jiva}
KT_OUT=${KT_OUT:-/tmp/kt-out}
KT_RESULTS=${KT_RESULTS:-/dev/null}
KT_STATE=${KT_STATE:-/tmp/kt-state}
KT_CASE_TIMEOUT=${KT_CASE_TIMEOUT:-300}
# The case file that sourced us (used to re-enter it for each case).
KT_CASE_FILE_PATH=${KT_CASE_FILE_PATH:-$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)/$(basename "${BASH_SOURCE[1]}")}
KT_FILE=${KT_FILE:-$(basename "$KT_CASE_FILE_PATH" .sh)}
export KT_GUEST KT_REPO KT_JIVA KT_OUT KT_RESULTS KT_STATE KT_CASE_FILE_PATH KT_FILE
mkdir -p "$KT_OUT/logs" "$KT_STATE/passed" "$KT_STATE/vol" "$KT_STATE/mnt"

# ---------------------------------------------------------------- basics

kt_emit() { echo "$*" >>"$KT_RESULTS"; echo "$*" >>"$KT_OUT/results.txt"; }
kt_log() { echo "kt: $*" >&2; }
# Fails the current case with a message.
kt_fail() { echo "kt: FAILED: $*" >&2; exit 1; }
# kt_wait SECS WHAT CMD...: polls CMD every 0.2 s until it succeeds; fails
# the case with "timed out waiting for WHAT" after SECS seconds.
kt_wait() {
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$(($(date +%s) + secs))
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || kt_fail "timed out after ${secs}s waiting for $what"
        sleep 0.2
    done
}
# Converts 256M / 1G / 4096 to bytes.
kt_bytes() {
    local v=$1 n=${1%[KkMmGgTt]}
    case $v in
        *[Kk]) echo $((n << 10)) ;; *[Mm]) echo $((n << 20)) ;;
        *[Gg]) echo $((n << 30)) ;; *[Tt]) echo $((n << 40)) ;; *) echo "$v" ;;
    esac
}
kt_kmsg() { echo "kt: $*" >/dev/kmsg 2>/dev/null || true; }

# ---------------------------------------------------------------- runner

# Kernel log lines that fail a case which otherwise passed (see kt_case -k).
KT_KERNEL_ERRORS='I/O error|EXT4-fs error|EXT4-fs warning|Other side returned error|BUG:|WARNING:|Oops|Call Trace|blocked for more than|soft lockup'

# Kernel log lines matching KT_KERNEL_ERRORS since case ID began.
kt_kernel_errors() {
    dmesg | sed -n "/kt: case $1 begins/,\$p" | grep -E "$KT_KERNEL_ERRORS"
}

# kt_case [-t SECS] [-n NEEDED_CASE]... [-k] NAME FUNC [ARGS...]
# Runs FUNC ARGS in a child shell under `timeout SECS` and prints
# "PASS FILE:NAME" or "FAIL FILE:NAME". A case also fails when the kernel
# logged I/O errors, file-system errors, warnings or oopses meanwhile
# (KT_KERNEL_ERRORS), unless -k is given. -n: fail at once (without running)
# unless case NEEDED_CASE of this file passed earlier in the run.
kt_case() {
    [ -n "${KT_IN_CASE:-}" ] && return 0
    local t=$KT_CASE_TIMEOUT needs=() dep kerr=1
    while [ $# -gt 0 ]; do
        case $1 in
            -t) t=$2; shift 2 ;;
            -n) needs+=("$2"); shift 2 ;;
            -k) kerr=0; shift ;;
            *) break ;;
        esac
    done
    local name=$1
    shift
    local id="$KT_FILE:$name" log="$KT_OUT/logs/$KT_FILE.$name.log" rc=0 start
    kt_emit "KT-CASE-BEGIN $id"
    kt_kmsg "case $id begins"
    start=$(date +%s)
    : >"$log"
    for dep in ${needs[@]+"${needs[@]}"}; do
        if [ ! -e "$KT_STATE/passed/$KT_FILE.$dep" ]; then
            echo "kt: not run: needs case $KT_FILE:$dep, which did not pass" >>"$log"
            rc=125
        fi
    done
    if [ $rc -eq 0 ]; then
        KT_IN_CASE=1 KT_CASE=$name timeout -k 15 "$t" \
            bash -c 'set -euo pipefail; . "$KT_CASE_FILE_PATH"; PS4="+ \${EPOCHREALTIME%???} "; set -x; "$@"' "kt-$name" "$@" \
            >>"$log" 2>&1 </dev/null
        rc=$?
    fi
    if [ $rc -eq 0 ] && [ $kerr = 1 ] && kt_kernel_errors "$id" >"$KT_STATE/kerr" 2>&1; then
        {
            echo "kt: FAILED: the kernel logged errors during the case:"
            head -n 20 "$KT_STATE/kerr"
        } >>"$log"
        rc=1
    fi
    local took=$(($(date +%s) - start))
    kt_kmsg "case $id ends rc=$rc"
    if [ $rc -eq 0 ]; then
        touch "$KT_STATE/passed/$KT_FILE.$name"
        kt_emit "KT-CASE-END $id rc=0 ${took}s"
        kt_emit "PASS $id"
    else
        [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "kt: TIMEOUT: case killed after ${t}s" >>"$log"
        echo "kt: case exited with status $rc after ${took}s" >>"$log"
        kt_append_jiva_logs >>"$log"
        dmesg >"$KT_OUT/logs/$KT_FILE.$name.dmesg" 2>&1
        # Leave no mount or NBD connection behind for the next case.
        echo "---- cleanup after the failure" >>"$log"
        kt_detach_all >>"$log" 2>&1
        kt_emit "KT-CASE-END $id rc=$rc ${took}s"
        kt_emit "FAIL $id"
    fi
    return 0
}

# Appends the tail of every volume's jiva log (for a failed case's log).
kt_append_jiva_logs() {
    local v
    for v in "$KT_STATE"/vol/*/; do
        [ -d "$v" ] || continue
        v=$(basename "$v")
        echo "---- last 30 lines of jiva log for volume $v ($KT_OUT/logs/jiva-$v.log)"
        tail -n 30 "$KT_OUT/logs/jiva-$v.log" 2>/dev/null
    done
}

# Ends a case file: detaches what is still attached, stops running volumes.
kt_done() {
    [ -n "${KT_IN_CASE:-}" ] && return 0
    kt_cleanup >>"$KT_OUT/logs/$KT_FILE.cleanup.log" 2>&1
    exit 0
}

# Unmounts everything under $KT_STATE/mnt and disconnects every NBD device
# connected (volumes keep running).
kt_detach_all() {
    local m d
    for m in $(awk -v p="$KT_STATE/mnt/" 'index($2, p) == 1 { print $2 }' /proc/mounts | sort -r); do
        umount "$m" || umount -l "$m"
    done
    for d in "$KT_STATE"/attached/*; do
        [ -e "$d" ] || continue
        timeout 30 nbd-client -d "/dev/$(basename "$d")"
        rm -f "$d"
    done
}

kt_cleanup() {
    local v
    kt_detach_all
    for v in "$KT_STATE"/vol/*/; do
        [ -d "$v" ] || continue
        v=$(basename "$v")
        if jiva_running "$v"; then
            kill -TERM "$(cat "$KT_STATE/vol/$v/pid")"
            for _ in $(seq 150); do jiva_running "$v" || break; sleep 0.2; done
        fi
    done
}

# ---------------------------------------------------------------- jiva volumes

# jiva_up VOL DIR SIZE REPLICAS NBD_ADDR [extra jiva up args...]
# Starts `jiva up` in the background (stdout to $KT_STATE/vol/VOL/stdout,
# stderr appended to $KT_OUT/logs/jiva-VOL.log), waits for its
# "NBD URI: nbd://HOST:PORT/NAME" line and records the URI, host and port.
jiva_up() {
    local vol=$1 dir=$2 size=$3 replicas=$4 addr=$5
    shift 5
    local s="$KT_STATE/vol/$vol" log="$KT_OUT/logs/jiva-$vol.log"
    [ -x "$KT_JIVA" ] || kt_fail "jiva binary not found: $KT_JIVA"
    jiva_running "$vol" && kt_fail "volume $vol is already running"
    mkdir -p "$s"
    rm -f "$s/pid" "$s/rc" "$s/uri" "$s/stdout"
    echo "$dir" >"$s/dir"
    echo "==== $(date +%T) jiva up --dir $dir --size $size --replicas $replicas --name $vol --nbd $addr $*" >>"$log"
    (
        { set +ex; } 2>/dev/null
        NO_COLOR=1 JIVA_LOG=${JIVA_LOG:-info} sh -c 'echo $$ >"$1"; shift; exec "$@"' kt-jiva "$s/pid" \
            "$KT_JIVA" up --dir "$dir" --size "$size" --replicas "$replicas" --name "$vol" --nbd "$addr" "$@" \
            >"$s/stdout" 2>>"$log" </dev/null
        echo $? >"$s/rc.tmp" && mv "$s/rc.tmp" "$s/rc"
    ) 2>>"$log" &
    local deadline=$(($(date +%s) + 120)) uri=""
    while :; do
        uri=$(sed -n 's/^NBD URI: *//p' "$s/stdout" 2>/dev/null | head -n 1)
        [ -n "$uri" ] && break
        if [ -e "$s/rc" ]; then
            cat "$s/stdout" >&2
            tail -n 20 "$log" >&2
            kt_fail "jiva up for $vol exited with status $(cat "$s/rc") before printing its NBD URI"
        fi
        [ "$(date +%s)" -lt "$deadline" ] || kt_fail "jiva up for $vol printed no NBD URI within 120s"
        sleep 0.2
    done
    cat "$s/stdout" >&2
    # nbd://HOST:PORT/NAME
    local hp=${uri#nbd://}
    local export=${hp#*/}
    hp=${hp%%/*}
    [ "$export" = "$vol" ] || kt_fail "URI $uri does not name export $vol"
    echo "$uri" >"$s/uri"
    echo "${hp%:*}" >"$s/host"
    echo "${hp##*:}" >"$s/port"
    kt_log "volume $vol is up at $uri (pid $(cat "$s/pid"))"
}

# True while VOL's `jiva up` process is alive.
jiva_running() {
    local s="$KT_STATE/vol/$1"
    [ -e "$s/pid" ] && [ ! -e "$s/rc" ] && kill -0 "$(cat "$s/pid")" 2>/dev/null
}

# Pids of live processes whose command line mentions the string S (one grep
# over /proc; the bracketed first character keeps grep from matching itself).
kt_pids_mentioning() {
    local s=$1 re
    re=$(printf '%s' "${s:1}" | sed 's/[][\\.^$*+?(){}|]/\\&/g')
    re="[${s:0:1}]$re"
    grep -laE -- "$re" /proc/[0-9]*/cmdline 2>/dev/null | sed -n 's|^/proc/\([0-9]*\)/cmdline$|\1|p'
    return 0
}

# jiva_down VOL [GRACE_SECS]: SIGTERM, waits; fails unless `jiva up` exits 0
# within GRACE_SECS and no process for its DIR (replicas, controller) is left.
jiva_down() {
    local vol=$1 grace=${2:-60} s="$KT_STATE/vol/$1"
    [ -e "$s/pid" ] || kt_fail "volume $vol was never started"
    [ -e "$s/rc" ] && kt_fail "volume $vol had already exited with status $(cat "$s/rc")"
    local pid dir
    pid=$(cat "$s/pid")
    dir=$(cat "$s/dir")
    kill -TERM "$pid" || kt_fail "cannot signal jiva up (pid $pid)"
    kt_wait "$grace" "jiva up ($vol) to exit after SIGTERM" test -e "$s/rc"
    local rc
    rc=$(cat "$s/rc")
    [ "$rc" = 0 ] || kt_fail "jiva up ($vol) exited with status $rc after SIGTERM (expected 0)"
    local left=""
    for _ in $(seq 50); do
        left=$(kt_pids_mentioning "$dir")
        [ -z "$left" ] && break
        sleep 0.2
    done
    if [ -n "$left" ]; then
        ps -o pid,ppid,args -p "$(echo $left | tr ' ' ,)" >&2 || true
        kt_fail "processes for $dir still running after jiva up exited: $left"
    fi
    kt_log "volume $vol stopped (exit 0)"
}

# jiva_ensure_up VOL DIR SIZE REPLICAS NBD_ADDR: starts VOL unless it runs.
jiva_ensure_up() {
    jiva_running "$1" || jiva_up "$@"
}

jiva_port() { cat "$KT_STATE/vol/$1/port"; }
jiva_host() { cat "$KT_STATE/vol/$1/host"; }

# ---------------------------------------------------------------- NBD client

# Size in bytes of /dev/nbdX as the kernel sees it (0 when not connected).
kt_devsize() { echo $(($(cat "/sys/block/$(basename "$1")/size" 2>/dev/null || echo 0) * 512)); }
kt_dev_connected() { [ "$(kt_devsize "$1")" -gt 0 ]; }
kt_dev_disconnected() { [ "$(kt_devsize "$1")" -eq 0 ]; }

# nbd_attach DEV VOL: connects DEV to VOL's export with nbd-client.
nbd_attach() {
    local dev=$1 vol=$2 host port
    host=$(jiva_host "$vol")
    port=$(jiva_port "$vol")
    [ -e "$dev" ] || modprobe nbd
    kt_wait 20 "$dev to appear" test -b "$dev"
    [ "$(kt_devsize "$dev")" = 0 ] || kt_fail "$dev is already connected"
    timeout 60 nbd-client "$host" "$port" "$dev" -N "$vol" ${NBD_CLIENT_OPTS:-} \
        || kt_fail "nbd-client $host $port $dev -N $vol failed (status $?)"
    mkdir -p "$KT_STATE/attached"
    touch "$KT_STATE/attached/$(basename "$dev")"
    kt_wait 20 "$dev to get a size" kt_dev_connected "$dev"
    kt_log "$dev attached to $vol ($(kt_devsize "$dev") bytes)"
}

# nbd_detach DEV: disconnects DEV and waits until the kernel drops it.
nbd_detach() {
    local dev=$1
    timeout 60 nbd-client -d "$dev" || kt_fail "nbd-client -d $dev failed (status $?)"
    rm -f "$KT_STATE/attached/$(basename "$dev")"
    kt_wait 30 "$dev to disconnect" kt_dev_disconnected "$dev"
    kt_log "$dev detached"
}

# ---------------------------------------------------------------- file systems

mkfs_ext4() { timeout 240 mkfs.ext4 -q -F "$@" || kt_fail "mkfs.ext4 $* failed"; }

# fsck_clean DEV: `fsck.ext4 -fn` must report a clean file system (exit 0).
fsck_clean() {
    local rc=0
    timeout 240 fsck.ext4 -fn "$1" || rc=$?
    [ $rc -eq 0 ] || kt_fail "fsck.ext4 -fn $1 exited with $rc (file system not clean)"
}

# kt_mount DEV NAME [mount opts]: mounts DEV on $KT_STATE/mnt/NAME, prints the path.
kt_mount() {
    local dev=$1 m="$KT_STATE/mnt/$2"
    shift 2
    mkdir -p "$m"
    mount "$@" "$dev" "$m" || kt_fail "mount $dev $m failed"
    echo "$m"
}
kt_umount() { umount "$1" || kt_fail "umount $1 failed"; }

kt_drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# tree_write DIR N SUMS [MAX_KB]: writes N files of random content and
# random sizes up to MAX_KB KiB (plus edge sizes: 0, 1, 4095, 4096, 4097
# bytes and 1 MiB+1) under DIR in nested directories; records `sha256sum`
# lines in SUMS. One perl process writes them all (fork+exec is slow on TCG).
tree_write() {
    local dir=$1 n=$2 sums=$3 maxkb=${4:-128}
    mkdir -p "$dir"
    perl -e '
        use strict; use File::Path qw(make_path);
        my ($dir, $n, $max) = @ARGV;
        my @edges = (0, 1, 4095, 4096, 4097, 1048577);
        open(my $r, "<:raw", "/dev/urandom") or die "urandom: $!";
        read($r, my $seed, 4) == 4 or die; srand(unpack("L", $seed));
        for my $i (0 .. $n - 1) {
            my $d = sprintf("%s/d%d/e%d", $dir, $i % 10, $i % 3);
            make_path($d);
            my $size = $i < @edges ? $edges[$i] : 1 + int(rand($max * 1024));
            my $buf = "";
            while (length($buf) < $size) {
                my $got = read($r, $buf, $size - length($buf), length($buf));
                die "urandom: $!" unless $got;
            }
            open(my $f, ">:raw", "$d/f$i") or die "$d/f$i: $!";
            print $f $buf or die "$d/f$i: $!";
            close($f) or die "$d/f$i: $!";
        }' "$dir" "$n" "$maxkb" || kt_fail "writing files under $dir"
    (cd "$dir" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$sums" \
        || kt_fail "checksumming $dir"
    [ "$(wc -l <"$sums")" -eq "$n" ] || kt_fail "expected $n files in $dir, found $(wc -l <"$sums")"
    kt_log "wrote $n files ($(du -sk "$dir" | cut -f1) KiB) under $dir"
}

# tree_verify DIR SUMS: every file listed in SUMS has its recorded content,
# and DIR holds exactly that many files.
tree_verify() {
    local dir=$1 sums=$2 want have
    [ -s "$sums" ] || kt_fail "no recorded checksums at $sums"
    (cd "$dir" && sha256sum --quiet --strict -c "$sums") || kt_fail "checksum mismatch under $dir"
    want=$(wc -l <"$sums")
    have=$(find "$dir" -type f | wc -l)
    [ "$want" -eq "$have" ] || kt_fail "expected $want files under $dir, found $have"
    kt_log "verified $want files under $dir"
}
