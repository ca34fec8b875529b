#!/usr/bin/env bash
# iSCSI benchmark: libiscsi's iscsi-perf (random 4 KiB reads at queue
# depth 32, sequential 1 MiB reads at queue depth 8) and qemu-img bench
# (sequential 4 KiB, 256 KiB and 1 MiB writes, through libiscsi) against
#   tgtd     the reference userspace target, on a backing file;
#   frontend jiva's iSCSI target alone (the file_target example) on the
#            same file: the transport and SCSI layer, nothing else;
#   jiva     a real volume (`jiva up --replicas N --iscsi`), filled with the
#            same data: frontend + replication + replica store.
# Prints IOPS and MB/s per target and the ratios to tgtd. Everything stays on
# 127.0.0.1. Needs iscsi-perf (libiscsi-bin), tgtd/tgtadm (tgt), qemu-img
# with iSCSI support (qemu-block-extra).
#
# Usage: benches/iscsi.sh [--runtime SECS] [--size MIB] [--replicas N]
set -euo pipefail
cd "$(dirname "$0")/.."

runtime=10
size_mib=1024
replicas=1
while [ $# -gt 0 ]; do
    case $1 in
        --runtime) runtime=$2; shift 2 ;;
        --size) size_mib=$2; shift 2 ;;
        --replicas) replicas=$2; shift 2 ;;
        *) echo "usage: $0 [--runtime SECS] [--size MIB] [--replicas N]" >&2; exit 2 ;;
    esac
done
for tool in iscsi-perf tgtd tgtadm qemu-img; do
    PATH=$PATH:/usr/sbin:/sbin command -v "$tool" >/dev/null \
        || { echo "$tool not found: apt-get install libiscsi-bin tgt qemu-block-extra" >&2; exit 1; }
done
export PATH=$PATH:/usr/sbin:/sbin

target_dir=${CARGO_TARGET_DIR:-target}
echo "building (release)..."
cargo build --release --quiet --bin jiva
cargo build --release --quiet -p jiva-iscsi --example file_target
jiva=$target_dir/release/jiva
file_target=$target_dir/release/examples/file_target

work=$(mktemp -d /var/tmp/jiva-iscsi-bench.XXXXXX)
pids=()
ctl=$((20000 + $$ % 12000)) # tgtd takes control ports up to 32767
cleanup() {
    local p
    # tgtd ignores SIGTERM; it exits on a system delete once no target is left.
    tgtadm -C "$ctl" --lld iscsi --mode target --op delete --force --tid 1 >/dev/null 2>&1 || true
    tgtadm -C "$ctl" --mode system --op delete >/dev/null 2>&1 || true
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 100); do
        local alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    exit 1
}

echo "backing file: $size_mib MiB of random data in $work"
dd if=/dev/urandom of="$work/backing.img" bs=1M count="$size_mib" status=none

tgt_port=$(free_port)
tgtd -f -C "$ctl" --iscsi "portal=127.0.0.1:$tgt_port" >"$work/tgtd.log" 2>&1 &
pids+=($!)
wait_port "$tgt_port"
tgt_iqn=iqn.2026-11.io.jiva:bench-tgtd
tgtadm -C "$ctl" --lld iscsi --mode target --op new --tid 1 -T "$tgt_iqn"
tgtadm -C "$ctl" --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 -b "$work/backing.img"
tgtadm -C "$ctl" --lld iscsi --mode target --op bind --tid 1 -I ALL

fe_port=$(free_port)
"$file_target" "$work/backing.img" "127.0.0.1:$fe_port" iqn.2026-11.io.jiva:bench-frontend >"$work/frontend.log" 2>&1 &
pids+=($!)
wait_port "$fe_port"

jv_port=$(free_port)
JIVA_LOG=warn "$jiva" up --dir "$work/vol" --size "${size_mib}M" --replicas "$replicas" --name vol \
    --nbd 127.0.0.1:0 --api 127.0.0.1:0 --iscsi "127.0.0.1:$jv_port" >"$work/up.out" 2>"$work/up.log" &
pids+=($!)
wait_port "$jv_port"
jv_url="iscsi://127.0.0.1:$jv_port/iqn.2026-11.io.jiva:vol/0"
echo "filling the jiva volume with the same data..."
qemu-img convert -n -f raw -O raw "$work/backing.img" "$jv_url"

declare -A url=(
    [tgtd]="iscsi://127.0.0.1:$tgt_port/$tgt_iqn/1"
    [frontend]="iscsi://127.0.0.1:$fe_port/iqn.2026-11.io.jiva:bench-frontend/0"
    [jiva]="$jv_url"
)
declare -A result

# iscsi-perf prints a running line per second and, at the end,
# "iops average N (M MB/s)".
perf() {
    local out
    out=$(timeout $((runtime + 30)) iscsi-perf -i iqn.2026-11.io.jiva:bench -t "$runtime" "$@" 2>&1 | tr '\r' '\n' |
        sed -n 's/^iops average \([0-9]*\) (\([0-9]*\) MB\/s).*/\1 \2/p' | tail -n 1)
    echo "${out:-0 0}"
}

# iscsi-perf only reads. Writes: qemu-img bench (libiscsi too), sequential,
# a fixed amount; prints "Run completed in N seconds." Prints "IOPS MB/s".
wbench() {
    local bs=$1 depth=$2 count=$3 url=$4 secs
    sync
    secs=$(timeout 300 qemu-img bench -f raw -w -s "$bs" -d "$depth" -c "$count" "$url" 2>&1 |
        sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p')
    python3 -c "import sys; c, b, s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3] or 0)
print(f'{c / s:.0f} {c * b / s / 1e6:.0f}' if s else '0 0')" "$count" "$(numfmt --from=iec "${bs^^}")" "$secs"
}

for t in tgtd frontend jiva; do
    echo "== $t: random 4k reads (qd 32), then 1M sequential reads (qd 8), ${runtime}s each"
    result[$t-rand]=$(perf -r -b 8 -m 32 "${url[$t]}")
    result[$t-seq]=$(perf -b 2048 -m 8 "${url[$t]}")
    echo "   ${result[$t-rand]% *} IOPS random 4k, ${result[$t-seq]#* } MB/s sequential 1M"
    echo "== $t: sequential writes with qemu-img bench: 4k (qd 32), 256k (qd 8, the largest a kernel initiator sends whole with its command), 1M (qd 8)"
    result[$t-w4k]=$(wbench 4k 32 $((size_mib * 256)) "${url[$t]}")
    result[$t-w256k]=$(wbench 256k 8 $((size_mib * 16)) "${url[$t]}")
    result[$t-w1m]=$(wbench 1M 8 $((size_mib * 4)) "${url[$t]}")
    echo "   ${result[$t-w4k]% *} IOPS 4k, ${result[$t-w256k]#* } MB/s 256k, ${result[$t-w1m]#* } MB/s 1M"
done

ratio() { python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'{a / b:.2f}' if b else 'n/a')" "$1" "$2"; }
echo
echo "iscsi-perf over 127.0.0.1, $size_mib MiB, ${runtime}s per run, jiva with $replicas replica(s)"
printf '%-10s %14s %10s %16s %10s\n' target "rand 4k IOPS" "vs tgtd" "seq 1M MB/s" "vs tgtd"
for t in tgtd frontend jiva; do
    r=${result[$t-rand]% *}
    s=${result[$t-seq]#* }
    printf '%-10s %14s %10s %16s %10s\n' "$t" "$r" "$(ratio "$r" "${result[tgtd-rand]% *}")" \
        "$s" "$(ratio "$s" "${result[tgtd-seq]#* }")"
done
echo
echo "writes (qemu-img bench, sequential: 4k one pass over the $size_mib MiB, 256k and 1M four passes)"
printf '%-10s %14s %10s %16s %10s %16s %10s\n' target "write 4k IOPS" "vs tgtd" "write 256k MB/s" "vs tgtd" \
    "write 1M MB/s" "vs tgtd"
for t in tgtd frontend jiva; do
    w4=${result[$t-w4k]% *}
    w256=${result[$t-w256k]#* }
    w1=${result[$t-w1m]#* }
    printf '%-10s %14s %10s %16s %10s %16s %10s\n' "$t" "$w4" "$(ratio "$w4" "${result[tgtd-w4k]% *}")" \
        "$w256" "$(ratio "$w256" "${result[tgtd-w256k]#* }")" "$w1" "$(ratio "$w1" "${result[tgtd-w1m]#* }")"
done
