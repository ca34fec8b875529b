#!/usr/bin/env python3
"""Snapshot chain benchmark (not a test): 4k random-read latency of a volume
whose data sits at the bottom of a chain of 100 snapshots, against the same
volume with a chain of 1 (the layer index makes the depth cost no I/O).
Prints both latencies and their ratio (the goal is <= 1.2), and the write
pause each snapshot create reported (median and maximum; the volume is idle
then). The replica listens on TCP there, as one on another node would.

Then the same with the replica on a Unix socket, as `jiva up` runs it:
there the controller reads the replica's layer files itself (short-circuit
reads), so 4k random reads at depth 32 with a chain of 2 (one snapshot)
against 1 show what reading through a snapshot costs on that path.
Timing on shared machines is noisy: compare numbers from one run.

Usage: benches/snapshots.py [--jiva target/release/jiva] [--size 256M] [--chain 100]
Needs fio with its nbd engine.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile

def spawn(args, prefix):
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env={**os.environ, "JIVA_LOG": "warn"})
    line = p.stdout.readline().strip()
    if not line.startswith(prefix):
        p.kill(); sys.exit(f"{args[1]} printed {line!r}")
    return p, line[len(prefix):]

def fio(uri, rw, size, runtime=None, extra=()):
    args = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
            f"--size={size}", "--output-format=json", *extra]
    if runtime:
        args += ["--time_based", f"--runtime={runtime}"]
    out = subprocess.check_output(args, text=True)
    return json.loads(out[out.index("{"):])["jobs"][0]

def measure(jiva, base, size, chain, runtime, pauses, depth=1, unix=False):
    """Fills the volume, stacks `chain` snapshots (each with a little new data
    elsewhere; their pauses in ms go to `pauses`), and returns the mean 4k
    random-read latency in microseconds at `depth`, and the IOPS. The
    replica listens on TCP, or on a Unix socket with `unix`."""
    procs = []
    listen = f"unix:{base}/replica.sock" if unix else "127.0.0.1:0"
    try:
        rep, addr = spawn([jiva, "replica", "--listen", listen, "--dir", f"{base}/r", "--size", size],
                          "listening on ")
        procs.append(rep)
        ctl, ready = spawn([jiva, "controller", "--name", "vol", "--size", size, "--replica", addr,
                            "--nbd", "127.0.0.1:0", "--api", "127.0.0.1:0"], "ready ")
        procs.append(ctl)
        uri, api = ready.split(" api ")
        api = api.replace("http://", "")
        fio(uri, "write", size, extra=["--bs=1M"])
        for i in range(chain - 1):
            out = subprocess.check_output([jiva, "snapshot", "create", f"s{i}", "--api", api, "--json"])
            pauses.append(json.loads(out)["pause_ms"])
            # A little data in every layer, away from nothing in particular.
            fio(uri, "randwrite", size, extra=["--io_size=64k", f"--randseed={i + 1}"])
        # Warm the page cache so the run measures the read path, not the disk.
        fio(uri, "read", size, extra=["--bs=1M"])
        j = fio(uri, "randread", size, runtime=runtime, extra=[f"--iodepth={depth}"])
        return j["read"]["clat_ns"]["mean"] / 1000.0, j["read"]["iops"]
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait()

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jiva", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "jiva"))
    ap.add_argument("--size", default="256M")
    ap.add_argument("--chain", type=int, default=100)
    ap.add_argument("--runtime", type=int, default=15)
    a = ap.parse_args()
    jiva = os.path.abspath(a.jiva)
    results = {}
    pauses = []
    def run(chain, **kw):
        base = tempfile.mkdtemp(prefix="jiva-snap-bench-")
        try:
            return measure(jiva, base, a.size, chain, a.runtime, pauses, **kw)
        finally:
            shutil.rmtree(base, ignore_errors=True)

    for chain in (1, a.chain):
        results[chain] = run(chain)
        lat, iops = results[chain]
        print(f"chain of {chain:>4}: 4k random read (QD1) mean latency {lat:8.1f} us, {iops:8.0f} IOPS")
    ratio = results[a.chain][0] / results[1][0]
    print(f"ratio (chain {a.chain} / chain 1): {ratio:.2f}  (goal <= 1.20)")
    local = {chain: run(chain, depth=32, unix=True)[1] for chain in (1, 2)}
    print(f"replica on a Unix socket (short-circuit reads), 4k random read (QD32): chain of 1 {local[1]:8.0f} IOPS, "
          f"chain of 2 {local[2]:8.0f} IOPS, ratio {local[2] / local[1]:.2f}")
    if pauses:
        pauses.sort()
        print(f"snapshot create pause: median {pauses[len(pauses) // 2]:.2f} ms, "
              f"max {pauses[-1]:.2f} ms over {len(pauses)} creates")

if __name__ == "__main__":
    main()
