#!/usr/bin/env python3
"""Rebuild benchmark (not a test): rebuild throughput of 1 GiB of written
data on loopback, and foreground 4k random IOPS with and without a rebuild
running. Timing on shared machines is noisy: compare numbers from one run.

Usage: benches/rebuild.py [--jiva target/release/jiva] [--data 1G] [--dir /tmp/x]
Needs fio with its nbd engine.
"""
import argparse, json, os, shutil, socket, subprocess, sys, tempfile, time

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def spawn(args, prefix):
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env={**os.environ, "JIVA_LOG": "warn"})
    line = p.stdout.readline().strip()
    if not line.startswith(prefix):
        p.kill(); sys.exit(f"{args[1]} printed {line!r}")
    return p, line[len(prefix):]

def cpu_seconds(pid):
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def api_get(jiva, api, path="status"):
    out = subprocess.check_output([jiva, "volume", "status", "--json", "--api", api], text=True)
    return json.loads(out)

def wait_healthy(jiva, api, idx, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        r = api_get(jiva, api)["replicas"][idx]
        if r["state"] == "healthy" and r["last_rebuild"]:
            return r["last_rebuild"]
        time.sleep(0.05)
    sys.exit("rebuild did not finish")

def fio(uri, runtime, name="fg"):
    out = subprocess.check_output(["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw",
        "--bs=4k", "--iodepth=32", "--time_based", f"--runtime={runtime}", "--size=1G",
        "--output-format=json"], text=True)
    j = json.loads(out[out.index("{"):])["jobs"][0]
    return j["read"]["iops"] + j["write"]["iops"]

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jiva", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "jiva"))
    ap.add_argument("--data", default="1G")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--direct-io", action="store_true", help="replicas with O_DIRECT data files")
    a = ap.parse_args()
    extra = ["--direct-io"] if a.direct_io else []
    jiva = os.path.abspath(a.jiva)
    base = a.dir or tempfile.mkdtemp(prefix="jiva-rebuild-bench-")
    procs = []
    try:
        r1, addr1 = spawn([jiva, "replica", "--listen", "127.0.0.1:0", "--dir", f"{base}/r1", "--size", "2G", *extra], "listening on ")
        procs.append(r1)
        ctl, ready = spawn([jiva, "controller", "--name", "vol", "--size", "2G", "--replica", addr1,
                            "--nbd", "127.0.0.1:0", "--api", "127.0.0.1:0"], "ready ")
        procs.append(ctl)
        uri, api = ready.split(" api ")
        api = api.replace("http://", "")
        subprocess.check_call(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1M",
                               "--iodepth=8", f"--size={a.data}", "--output=/dev/null"])
        port = free_port()
        r2, _ = spawn([jiva, "replica", "--listen", f"127.0.0.1:{port}", "--dir", f"{base}/r2", "--size", "2G", *extra], "listening on ")
        procs.append(r2)
        roles = {"controller": ctl, "source": r1, "target": r2}
        cpu0 = {k: cpu_seconds(p.pid) for k, p in roles.items()}
        t0 = time.time()
        subprocess.check_call([jiva, "replica", "add", f"127.0.0.1:{port}", "--api", api], stdout=subprocess.DEVNULL)
        s = wait_healthy(jiva, api, 1)
        wall = time.time() - t0
        cpu = {k: cpu_seconds(p.pid) - cpu0[k] for k, p in roles.items()}
        mbs = s["copied_bytes"] / s["seconds"] / 1e6
        gib = s["copied_bytes"] / 2**30
        print(f"rebuild alone: {s['copied_bytes'] / 2**20:.0f} MiB copied in {s['seconds']:.2f} s "
              f"= {mbs:.0f} MB/s (wall incl. attach {wall:.2f} s)")
        print("CPU seconds per GiB copied: " + ", ".join(f"{k} {v / gib:.2f}" for k, v in cpu.items())
              + f" (total {sum(cpu.values()) / gib:.2f})")
        base_iops = fio(uri, 8)
        print(f"foreground 4k randrw qd32, 2 healthy replicas, no rebuild: {base_iops:.0f} IOPS")
        # Again with a fresh second replica, and foreground I/O during the copy.
        subprocess.check_call([jiva, "replica", "rm", f"127.0.0.1:{port}", "--api", api], stdout=subprocess.DEVNULL)
        r2.kill(); r2.wait(); shutil.rmtree(f"{base}/r2")
        r2, _ = spawn([jiva, "replica", "--listen", f"127.0.0.1:{port}", "--dir", f"{base}/r2", "--size", "2G", *extra], "listening on ")
        procs.append(r2)
        fg = subprocess.Popen([sys.executable, "-c",
            f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import rebuild; print(rebuild.fio({uri!r}, 4, 'during'))"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.2)
        subprocess.check_call([jiva, "replica", "add", f"127.0.0.1:{port}", "--api", api], stdout=subprocess.DEVNULL)
        s = wait_healthy(jiva, api, 1)
        during = float(fg.communicate()[0].strip())
        print(f"rebuild with foreground I/O: {s['copied_bytes'] / 2**20:.0f} MiB in {s['seconds']:.2f} s "
              f"= {s['copied_bytes'] / s['seconds'] / 1e6:.0f} MB/s")
        print(f"foreground 4k randrw qd32 during that rebuild (4 s window): {during:.0f} IOPS "
              f"({100 * during / base_iops:.0f}% of no-rebuild)")
    finally:
        for p in procs:
            p.kill()
        if not a.dir:
            shutil.rmtree(base, ignore_errors=True)

if __name__ == "__main__":
    main()
