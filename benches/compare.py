#!/usr/bin/env python3
"""Side-by-side NBD benchmark: jiva (1 and 3 replicas) vs nbdkit file vs
qemu-nbd vs local io_uring, same machine, same run, same patterns.

Prints a summary and writes a markdown report (default docs/benchmarks.md)
with absolute figures, ratios to each peer, server CPU time per I/O, and a
description of the machine. Then runs benches/rebuild.py (rebuild
throughput, CPU per GiB, foreground IOPS during a rebuild) and
benches/snapshots.py (random-read latency with a chain of 100 snapshots vs
1) and adds their summaries; --iscsi adds benches/iscsi.sh (iscsi-perf
reads and qemu-img bench writes, vs tgtd). Short by default; --runtime makes it longer, --rounds N repeats the
whole NBD table N times and reports per-cell medians (ratios are taken
within each round, then their median and range), which is what to use on a
shared, noisy machine. Within a round every target is up at once and each
workload runs on one target after another, so the runs a ratio compares
are seconds apart.

    benches/compare.py [--runtime 5] [--rounds 1] [--size 512M] [--out docs/benchmarks.md]
                       [--no-extras] [--iscsi]
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")

# (name, fio rw, block size, iodepth)
WORKLOADS = [
    ("4k randread qd1", "randread", "4k", 1),
    ("4k randread qd32", "randread", "4k", 32),
    ("4k randwrite qd1", "randwrite", "4k", 1),
    ("4k randwrite qd32", "randwrite", "4k", 32),
    ("64k randwrite qd32", "randwrite", "64k", 32),
    ("1M seqread qd8", "read", "1M", 8),
    ("1M seqwrite qd8", "write", "1M", 8),
]


def die(msg):
    print(f"compare.py: {msg}", file=sys.stderr)
    sys.exit(1)


def need(tool):
    if shutil.which(tool) is None:
        die(f"{tool} is not installed (apt-get install libnbd-bin nbdkit fio qemu-utils)")


def proc_tree(root_pid):
    """The pid and all its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError):
            continue
    out, todo = [], [root_pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError):
            pass
    return total / CLK_TCK


class Server:
    """A running NBD server with a URI and the pids whose CPU we count."""

    def __init__(self, name, proc, uri):
        self.name, self.proc, self.uri = name, proc, uri

    def pids(self):
        return proc_tree(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_port(host, port, timeout=30):
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection((host, port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    die(f"nothing listening on {host}:{port}")


def free_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_jiva(jiva, workdir, size, replicas, extra=()):
    d = os.path.join(workdir, f"jiva-{replicas}{'-'.join(extra)}")
    shutil.rmtree(d, ignore_errors=True)  # a fresh volume every round
    proc = subprocess.Popen(
        [jiva, "up", "--dir", d, "--size", size, "--replicas", str(replicas), "--nbd", "127.0.0.1:0",
         "--api", "127.0.0.1:0", *extra],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "JIVA_LOG": "warn"},
    )
    for line in proc.stdout:
        if line.startswith("NBD URI: "):
            uri = line.split(": ", 1)[1].strip()
            break
    else:
        die("jiva up did not start")
    # It runs alongside the others for a whole round: keep its stdout from filling.
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return Server(f"jiva {replicas}r" + (" direct" if extra else ""), proc, uri)


def start_nbdkit(workdir, size_bytes):
    path = os.path.join(workdir, "nbdkit.img")
    make_file(path, size_bytes)
    port = free_port()
    proc = subprocess.Popen(["nbdkit", "-f", "-p", str(port), "-i", "127.0.0.1", "file", path])
    wait_port("127.0.0.1", port)
    return Server("nbdkit file", proc, f"nbd://127.0.0.1:{port}")


def start_qemu_nbd(workdir, size_bytes):
    path = os.path.join(workdir, "qemu-nbd.img")
    make_file(path, size_bytes)
    port = free_port()
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-x", "", "-t", "--cache=none",
         "--aio=io_uring", "--discard=unmap", path],
        stderr=subprocess.DEVNULL,
    )
    wait_port("127.0.0.1", port)
    return Server("qemu-nbd", proc, f"nbd://127.0.0.1:{port}")


def make_file(path, size_bytes):
    with open(path, "wb") as f:
        f.truncate(size_bytes)


def fio(target_args, rw, bs, iodepth, runtime, size):
    cmd = [
        "fio", "--name=bench", f"--rw={rw}", f"--bs={bs}", f"--iodepth={iodepth}", f"--size={size}",
        "--time_based", f"--runtime={runtime}", "--ramp_time=1", "--output-format=json",
        "--randrepeat=0", "--norandommap",
    ] + target_args
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 4 + 120)
    if out.returncode != 0:
        die(f"fio failed: {' '.join(cmd)}\n{out.stderr}")
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {
        "iops": side["iops"],
        "bw": side["bw_bytes"],
        "lat_us": side["clat_ns"]["mean"] / 1000 if "clat_ns" in side else 0.0,
        "ios": side["total_ios"],
    }


def prefill(target_args, size):
    subprocess.run(
        ["fio", "--name=fill", "--rw=write", "--bs=1M", "--iodepth=8", f"--size={size}", "--output-format=json"]
        + target_args,
        capture_output=True, text=True, check=True, timeout=900,
    )


def machine():
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu = m.group(1) if m else cpu
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}"


def fmt_iops(r):
    return f"{r['iops'] / 1000:.1f}k"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=int, default=5, help="seconds per workload (default 5)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the NBD table this many times; report medians (default 1)")
    ap.add_argument("--size", default="512M", help="volume / file size (default 512M)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    ap.add_argument("--jiva", default=os.path.join(ROOT, "target", "release", "jiva"))
    ap.add_argument("--only", help="comma-separated target names to run (e.g. 'jiva 1r,nbdkit file')")
    ap.add_argument("--no-extras", action="store_true",
                    help="skip the rebuild (benches/rebuild.py) and snapshot chain (benches/snapshots.py) runs")
    ap.add_argument("--iscsi", action="store_true", help="also run benches/iscsi.sh (reads and writes over iSCSI, vs tgtd)")
    args = ap.parse_args()
    for t in ("fio", "nbdkit", "qemu-nbd"):
        need(t)
    if not os.path.exists(args.jiva):
        subprocess.run(["cargo", "build", "--release", "--bin", "jiva"], cwd=ROOT, check=True)
    m = re.fullmatch(r"(\d+)([KMG]?)", args.size.upper())
    if not m:
        die("--size takes a number with K/M/G")
    size_bytes = int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]

    workdir = tempfile.mkdtemp(prefix="jiva-bench-", dir=os.environ.get("BENCH_DIR", ROOT + "/target"))
    starters = [
        ("jiva 1r", lambda: start_jiva(args.jiva, workdir, args.size, 1)),
        ("jiva 3r", lambda: start_jiva(args.jiva, workdir, args.size, 3)),
        ("jiva 1r direct", lambda: start_jiva(args.jiva, workdir, args.size, 1, ("--direct-io",))),
        ("nbdkit file", lambda: start_nbdkit(workdir, size_bytes)),
        ("qemu-nbd", lambda: start_qemu_nbd(workdir, size_bytes)),
    ]
    if args.only:
        keep = set(args.only.split(","))
        starters = [s for s in starters if s[0] in keep]
    results = {}  # target -> workload -> [result per round]
    try:
        for rnd in range(1, args.rounds + 1):
            if args.rounds > 1:
                print(f"== round {rnd} of {args.rounds}", flush=True)
            run_round(args, starters, workdir, size_bytes, results, rnd - 1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    extras = run_extras(args)
    write_report(args, results, extras)


def run_round(args, starters, workdir, size_bytes, results, rnd=0):
    """Every workload once on every target; appends to `results`.

    The targets run side by side: all are started and filled first, then
    each workload runs on one target after another, so the runs a ratio
    compares are seconds apart rather than minutes (this host's speed
    drifts). The order rotates from round to round, so no target always
    runs first or last."""
    servers = []
    local_img = os.path.join(workdir, "local.img")
    try:
        targets = []
        for name, start in starters:
            srv = start()
            servers.append(srv)
            targets.append((name, ["--ioengine=nbd", f"--uri={srv.uri}"], srv.pids))
        if not args.only or "local io_uring" in args.only:
            make_file(local_img, size_bytes)
            targets.append(("local io_uring", ["--ioengine=io_uring", "--direct=1", f"--filename={local_img}"], None))
        for _, fio_args, _ in targets:
            prefill(fio_args, args.size)
        # The fills' dirty pages go to disk now, not during someone's run.
        os.sync()
        if targets:
            k = rnd % len(targets)
            targets = targets[k:] + targets[:k]
        for wl, rw, bs, qd in WORKLOADS:
            for name, fio_args, pids_of in targets:
                if "write" in rw:
                    # The previous target's writes are written back now, not
                    # during this one's run.
                    os.sync()
                pids = pids_of() if pids_of else []
                c0 = cpu_seconds(pids)
                r = fio(fio_args, rw, bs, qd, args.runtime, args.size)
                r["cpu_us_per_io"] = (cpu_seconds(pids) - c0) * 1e6 / max(r["ios"], 1) if pids_of else float("nan")
                results.setdefault(name, {}).setdefault(wl, []).append(r)
                cpu = f"{r['cpu_us_per_io']:6.1f} us CPU/IO" if pids_of else ""
                print(f"{name:14} {wl:20} {fmt_iops(r):>8} IOPS {r['bw'] / 2**20:8.0f} MiB/s "
                      f"{r['lat_us']:8.0f} us  {cpu}", flush=True)
    finally:
        for srv in servers:
            srv.stop()
        if os.path.exists(local_img):
            os.remove(local_img)


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def summarize(runs):
    """One result from a workload's runs: the median of each figure."""
    return {k: median([r[k] for r in runs]) for k in runs[0]}


def ratio_cell(a_runs, b_runs):
    """Median of the per-round IOPS ratios, with their range over several rounds."""
    rs = ratios(a_runs, b_runs)
    if not rs:
        return "-"
    cell = f"{median(rs):.2f}"
    if len(rs) > 1:
        cell += f" ({min(rs):.2f}–{max(rs):.2f})"
    return cell


def ratios(a_runs, b_runs, key="iops"):
    """Per-round ratios a/b of one figure."""
    return [a[key] / b[key] for a, b in zip(a_runs, b_runs) if b[key]]


# The targets of the performance issue: (what, ours, theirs, workload, figure, bound).
# A throughput target is met when our figure is at least `bound` times
# theirs; a latency target when it is at most `bound` times theirs.
TARGETS = (
    [("1 replica vs nbdkit file, " + wl, "jiva 1r", "nbdkit file", wl, "iops", 1.0)
     for wl in ("4k randread qd32", "4k randwrite qd32", "1M seqread qd8", "1M seqwrite qd8")]
    + [("1 replica vs nbdkit file, latency " + wl, "jiva 1r", "nbdkit file", wl, "lat_us", 1.5)
       for wl in ("4k randread qd1", "4k randwrite qd1")]
    + [("3 replicas vs 1 replica, " + wl, "jiva 3r", "jiva 1r", wl, "iops", 0.5)
       for wl, *_ in WORKLOADS]
)


def target_rows(runs):
    """(target, measured ratio cell, met) for every target both sides ran;
    met means the median of the per-round ratios meets the bound."""
    rows = []
    for what, ours, theirs, wl, key, bound in TARGETS:
        a, b = runs.get(ours, {}).get(wl), runs.get(theirs, {}).get(wl)
        rs = ratios(a, b, key) if a and b else []
        if not rs:
            continue
        m = median(rs)
        met = m <= bound if key == "lat_us" else m >= bound
        cell = f"{m:.2f}" + (f" ({min(rs):.2f}–{max(rs):.2f})" if len(rs) > 1 else "")
        sense = "at most" if key == "lat_us" else "at least"
        rows.append((what, f"{sense} {bound:g}×", cell, met))
    return rows


def run_extras(args):
    """The other benchmark scripts, run after the NBD table; their printed
    summaries go into the report as they are."""
    here = os.path.dirname(os.path.abspath(__file__))
    runs = []
    if not args.no_extras and not args.only:
        runs += [("Rebuild (1 GiB written, 2 replicas, loopback)",
                  [sys.executable, os.path.join(here, "rebuild.py"), "--jiva", args.jiva]),
                 ("Snapshot chain (4k random-read latency, chain of 100 vs 1)",
                  [sys.executable, os.path.join(here, "snapshots.py"), "--jiva", args.jiva])]
    if args.iscsi:
        runs.append(("iSCSI (iscsi-perf reads, qemu-img bench writes, ours vs tgtd on the same file)",
                     ["bash", os.path.join(here, "iscsi.sh")]))
    out = []
    for title, cmd in runs:
        print(f"\n== {title}", flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        text = (p.stdout.strip() or p.stderr.strip()[-2000:]) + ("" if p.returncode == 0 else
                                                               f"\n(exit status {p.returncode})")
        print(text, flush=True)
        out.append((title, text))
    return out


def write_report(args, runs, extras=()):
    targets = list(runs)
    results = {t: {wl: summarize(rs) for wl, rs in per.items()} for t, per in runs.items()}
    rounds = f" --rounds {args.rounds}" if args.rounds > 1 else ""
    medians = (f" Each figure is the median of {args.rounds} rounds; ratios are taken within a round, "
               "shown as their median (lowest–highest)." if args.rounds > 1 else "")
    lines = [
        "# Benchmarks",
        "",
        f"Measured {datetime.date.today().isoformat()} with `benches/compare.py --runtime {args.runtime}"
        f"{rounds} --size {args.size}` on {machine()}. Client, servers and replicas share the machine; "
        "fio's nbd engine (one connection) for every NBD target, fio io_uring O_DIRECT on a local file "
        "for the ceiling. All targets run side by side: each workload runs on one target after another "
        "(the order rotating by round), so compared runs are seconds apart, and every write run "
        "starts after a `sync`, so no target pays for another's writeback. "
        "Shared, noisy machines: read the ratios, not the absolute numbers." + medians,
        "",
        "## Throughput",
        "",
        "| workload | " + " | ".join(targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for wl, rw, bs, qd in WORKLOADS:
        cells = []
        for t in targets:
            r = results[t].get(wl)
            if r is None:
                cells.append("-")
            elif bs == "1M":
                cells.append(f"{r['bw'] / 2**20:.0f} MiB/s")
            else:
                cells.append(f"{fmt_iops(r)} IOPS")
        lines.append(f"| {wl} | " + " | ".join(cells) + " |")
    lines += ["", "## Mean completion latency at queue depth 1 (µs)", "",
              "| workload | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for wl, rw, bs, qd in WORKLOADS:
        if qd == 1:
            lines.append(f"| {wl} | " + " | ".join(
                f"{results[t][wl]['lat_us']:.0f}" if wl in results[t] else "-" for t in targets) + " |")
    lines += ["", "## Server CPU time per I/O (µs; all server processes)", "",
              "| workload | " + " | ".join(t for t in targets if t != "local io_uring") + " |",
              "|---|" + "---|" * len([t for t in targets if t != "local io_uring"])]
    for wl, *_ in WORKLOADS:
        lines.append(f"| {wl} | " + " | ".join(
            f"{results[t][wl]['cpu_us_per_io']:.1f}" if wl in results[t] else "-"
            for t in targets if t != "local io_uring") + " |")
    ours = [t for t in targets if t.startswith("jiva")]
    peers = [t for t in targets if not t.startswith("jiva")]
    if ours and peers:
        lines += ["", "## Ratios (ours / peer; >1 means we are faster, for latency <1 means faster)", "",
                  "| workload | " + " | ".join(f"{o} / {p}" for o in ours for p in peers) + " |",
                  "|---|" + "---|" * (len(ours) * len(peers))]
        for wl, *_ in WORKLOADS:
            cells = []
            for o in ours:
                for p in peers:
                    a, b = runs[o].get(wl), runs[p].get(wl)
                    cells.append(ratio_cell(a, b) if a and b else "-")
            lines.append(f"| {wl} | " + " | ".join(cells) + " |")
        if "jiva 1r" in runs and "jiva 3r" in runs:
            lines += ["", "3 replicas / 1 replica: " + ", ".join(
                f"{wl} {ratio_cell(runs['jiva 3r'][wl], runs['jiva 1r'][wl])}"
                for wl, *_ in WORKLOADS if wl in runs["jiva 3r"] and wl in runs["jiva 1r"]) + "."]
    rows = target_rows(runs)
    if rows:
        lines += ["", "## Targets", "",
                  "Measured: ours / theirs, IOPS (or mean latency: lower is better), the median over "
                  "rounds with the range in brackets. Where the remaining gaps come from: "
                  "[performance.md](performance.md).", "",
                  "| target | goal | measured | met |", "|---|---|---|---|"]
        lines += [f"| {what} | {goal} | {cell} | {'yes' if met else '**no**'} |"
                  for what, goal, cell, met in rows]
        print("\ntargets:")
        for what, goal, cell, met in rows:
            print(f"  {'met   ' if met else 'MISSED'} {what}: {cell} (goal {goal})")
    for title, text in extras:
        lines += ["", f"## {title}", "", "```", text, "```"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nreport written to {args.out}")


if __name__ == "__main__":
    main()
