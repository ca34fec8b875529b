//! Fault injection with real processes on loopback: replicas killed
//! (SIGKILL) and restarted under fio verify, a proxy that stalls, drops and
//! resets a replica's connection, a replica whose disk returns EIO on some
//! blocks, a controller killed with -9, a stale controller fenced by every
//! replica, and rebuilds that are incremental and resumable. The rebuild
//! assertions read the counters the controller reports on its API.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("jiva-faults-").tempdir().unwrap()
}

/// A child process killed (SIGKILL) on drop.
struct Proc {
    child: Child,
    /// What it printed on its first stdout line, after the prefix.
    line: String,
}

impl Proc {
    fn spawn(args: &[String], env: &[(&str, &str)], prefix: &str) -> Proc {
        let mut cmd = Command::new(JIVA);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped());
        cmd.env("JIVA_LOG", std::env::var("JIVA_LOG").unwrap_or_else(|_| "warn".into()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn jiva");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = out.read_to_end(&mut sink);
        });
        let Some(rest) = line.trim().strip_prefix(prefix) else {
            let _ = child.kill();
            panic!("{args:?} printed {line:?}, expected {prefix:?}");
        };
        Proc { line: rest.to_string(), child }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn replica(dir: &Path, listen: &str, size: &str, env: &[(&str, &str)]) -> Proc {
    let args = ["replica", "--listen", listen, "--dir", dir.to_str().unwrap(), "--size", size];
    Proc::spawn(&args.map(String::from), env, "listening on ")
}

/// A controller: returns the process, the NBD URI and the API address.
fn controller(size: &str, replicas: &[&str], extra: &[&str]) -> (Proc, String, String) {
    let mut args: Vec<String> =
        ["controller", "--name", "vol", "--size", size, "--nbd", "127.0.0.1:0", "--api", "127.0.0.1:0"]
            .map(String::from)
            .to_vec();
    args.extend(
        ["--heartbeat-ms", "200", "--checkpoint-interval", "1", "--connect-timeout", "10"].map(String::from),
    );
    for r in replicas {
        args.extend(["--replica".to_string(), r.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let p = Proc::spawn(&args, &[], "ready ");
    let (uri, api) = p.line.split_once(" api ").expect("controller prints its API address");
    let (uri, api) = (uri.to_string(), api.trim_start_matches("http://").to_string());
    (p, uri, api)
}

fn status(api: &str) -> Value {
    let out = run_ok(Command::new(JIVA).args(["volume", "status", "--json", "--api", api]), MINUTE);
    serde_json::from_str(&out).unwrap()
}

fn replica_state(api: &str, i: usize) -> Value {
    status(api)["replicas"][i].clone()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn all_healthy(api: &str) -> bool {
    let s = status(api);
    s["replicas"].as_array().unwrap().iter().all(|r| r["state"] == "healthy")
}

fn qemu_io(uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    run_with_timeout(&mut c, MINUTE)
}

fn qemu_io_ok(uri: &str, cmds: &[&str]) {
    let out = qemu_io(uri, cmds);
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("error") && !text.contains("failed"),
        "qemu-io {cmds:?}: {text}"
    );
}

fn sigkill(pid: i32) {
    // SAFETY: kill(2) on a pid we just looked up; at worst it is gone already.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

#[test]
fn fio_verify_survives_twenty_replica_kill_cycles() {
    require("fio");
    let dir = tmp();
    let vol = dir.path().join("vol");
    let up = Up::start(&vol, "64M", 3, &["--checkpoint-interval", "1"]);
    let done = Arc::new(AtomicBool::new(false));
    let killer = {
        let (vol, api, done) = (vol.clone(), up.api.clone(), done.clone());
        std::thread::spawn(move || {
            for cycle in 0..20 {
                let k = cycle % 3 + 1;
                let needle = format!("{}/replica-{k} ", vol.display());
                let rebuilt = |s: &Value| s["replicas"][k - 1]["rebuilds_completed"].as_u64().unwrap_or(0);
                let before = rebuilt(&status(&api));
                let pid = replica_pid(&needle).unwrap_or_else(|| panic!("no process for replica-{k}"));
                sigkill(pid);
                // Back means: noticed, reconnected, rebuilt; then the next kill.
                wait_until(&format!("cycle {cycle}: replica-{k} rebuilt"), Duration::from_secs(60), || {
                    let s = status(&api);
                    rebuilt(&s) > before
                        && s["replicas"].as_array().unwrap().iter().all(|r| r["state"] == "healthy")
                });
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let job = |extra: &[&str]| {
        let mut c = Command::new("fio");
        c.args([
            "--name=kill",
            "--ioengine=nbd",
            &format!("--uri={}", up.uri),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--randseed=42",
            "--verify_state_save=0",
        ]);
        c.args(extra);
        run_ok(&mut c, Duration::from_secs(300))
    };
    let mut runs = 0;
    while !done.load(Ordering::SeqCst) || runs == 0 {
        let out = job(&[]);
        assert!(out.contains("err= 0"), "fio reported an error:\n{out}");
        runs += 1;
    }
    killer.join().unwrap();
    // Final full read of what the last run wrote, after every kill.
    let out = job(&["--verify_only=1"]);
    assert!(out.contains("err= 0"), "final verify failed:\n{out}");
    assert!(all_healthy(&up.api));
    up.stop();
}

#[test]
fn incremental_rebuild_copies_only_what_changed() {
    require("nbdcopy");
    let dir = tmp();
    let vol = dir.path().join("vol");
    let up = Up::start(&vol, "64M", 3, &["--checkpoint-interval", "1"]);
    let src = dir.path().join("src.img");
    std::fs::write(&src, pattern(48 << 20, 3)).unwrap();
    run_ok(Command::new("nbdcopy").args([src.to_str().unwrap(), &up.uri]), MINUTE);
    // Two checkpoints pass: the bulk data is now older than any new generation.
    std::thread::sleep(Duration::from_millis(2500));
    sigkill(replica_pid(&format!("{}/replica-2 ", vol.display())).unwrap());
    let nbd = format!("nbd://{}/vol", up.addr);
    qemu_io_ok(&nbd, &["write -P 0x77 1M 64k"]);
    wait_until("replica-2 rebuilt", Duration::from_secs(60), || {
        let r = replica_state(&up.api, 1);
        r["state"] == "healthy" && r["rebuilds_completed"].as_u64() >= Some(1)
    });
    let r = replica_state(&up.api, 1);
    let copied = r["last_rebuild"]["copied_bytes"].as_u64().unwrap();
    assert_eq!(r["last_rebuild"]["full"], false, "{r}");
    assert!(copied <= 4 << 20, "incremental rebuild copied {copied} bytes of 48 MiB written: {r}");
    qemu_io_ok(&nbd, &["read -P 0x77 1M 64k"]);
    up.stop();
}

#[test]
fn interrupted_rebuild_resumes_instead_of_restarting() {
    require("nbdcopy");
    let dir = tmp();
    let (r1, r2) = (dir.path().join("r1"), dir.path().join("r2"));
    let a = replica(&r1, "127.0.0.1:0", "64M", &[]);
    let (ctl, uri, api) = controller("64M", &[&a.line], &["--rebuild-rate", "12M"]);
    let src = dir.path().join("src.img");
    let data = pattern(48 << 20, 8);
    std::fs::write(&src, &data).unwrap();
    run_ok(Command::new("nbdcopy").args([src.to_str().unwrap(), &uri]), MINUTE);
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let mut b = replica(&r2, &port, "64M", &[]);
    run_ok(Command::new(JIVA).args(["replica", "add", &port, "--api", &api]), MINUTE);
    wait_until("rebuild 40% done", Duration::from_secs(60), || {
        let r = replica_state(&api, 1);
        let (d, t) = (
            r["rebuild"]["done_bytes"].as_u64().unwrap_or(0),
            r["rebuild"]["total_bytes"].as_u64().unwrap_or(0),
        );
        t > 0 && d * 10 >= t * 4
    });
    std::thread::sleep(Duration::from_millis(1200)); // progress is recorded every second
    b.kill9();
    wait_until("replica failed", Duration::from_secs(30), || replica_state(&api, 1)["state"] == "failed");
    let _b = replica(&r2, &port, "64M", &[]);
    wait_until("replica healthy", Duration::from_secs(120), || replica_state(&api, 1)["state"] == "healthy");
    let r = replica_state(&api, 1);
    let last = &r["last_rebuild"];
    assert_eq!(last["resumed"], true, "{r}");
    let copied = last["copied_bytes"].as_u64().unwrap();
    assert!(copied < 36 << 20, "resumed rebuild copied {copied} of 48 MiB: {r}");
    // Read through the rebuilt replica alone.
    run_ok(Command::new(JIVA).args(["replica", "rm", &a.line, "--api", &api]), MINUTE);
    let back = dir.path().join("back.img");
    run_ok(Command::new("nbdcopy").args([&uri, back.to_str().unwrap()]), MINUTE);
    assert!(std::fs::read(&back).unwrap()[..48 << 20] == data[..], "rebuilt replica holds other data");
    drop(ctl);
}

#[test]
fn stale_controller_is_fenced_by_every_replica() {
    require("qemu-io");
    let dir = tmp();
    let reps: Vec<Proc> =
        (0..2).map(|i| replica(&dir.path().join(format!("r{i}")), "127.0.0.1:0", "8M", &[])).collect();
    let addrs: Vec<&str> = reps.iter().map(|r| r.line.as_str()).collect();
    let (_old, old_uri, old_api) = controller("8M", &addrs, &["--io-wait", "1"]);
    qemu_io_ok(&old_uri, &["write -P 0x11 0 1M", "flush"]);
    let (_new, new_uri, _) = controller("8M", &addrs, &[]);
    // The old controller can no longer change anything on any replica.
    let out = qemu_io(&old_uri, &["write -P 0x99 0 64k", "flush"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("error") || !out.status.success(), "stale controller wrote: {text}");
    qemu_io_ok(&new_uri, &["read -P 0x11 0 1M", "write -P 0x22 1M 64k", "flush"]);
    wait_until("old controller sees every replica gone", Duration::from_secs(30), || {
        status(&old_api)["healthy"] == 0
    });
    qemu_io_ok(&new_uri, &["read -P 0x11 0 64k", "read -P 0x22 1M 64k"]);
}

#[test]
fn kill9_of_the_controller_keeps_flushed_writes_and_reconciles() {
    require("nbdcopy");
    let dir = tmp();
    let reps: Vec<Proc> =
        (0..3).map(|i| replica(&dir.path().join(format!("r{i}")), "127.0.0.1:0", "16M", &[])).collect();
    let addrs: Vec<&str> = reps.iter().map(|r| r.line.as_str()).collect();
    let (mut old, uri, _) = controller("16M", &addrs, &[]);
    let src = dir.path().join("src.img");
    let data = pattern(16 << 20, 44);
    std::fs::write(&src, &data).unwrap();
    run_ok(Command::new("nbdcopy").args([src.to_str().unwrap(), &uri]), MINUTE); // flushes at the end
    old.kill9();
    let (_new, uri, api) = controller("16M", &addrs, &[]);
    let back = dir.path().join("back.img");
    run_ok(Command::new("nbdcopy").args([&uri, back.to_str().unwrap()]), MINUTE);
    assert!(std::fs::read(&back).unwrap() == data, "flushed data lost across kill -9 of the controller");
    wait_until("replicas reconciled", Duration::from_secs(60), || all_healthy(&api));
}

#[test]
fn eio_on_chosen_blocks_is_served_from_another_replica() {
    require("qemu-io");
    let dir = tmp();
    let bad =
        replica(&dir.path().join("r0"), "127.0.0.1:0", "8M", &[("JIVA_TEST_FAULT_EIO_BLOCKS", "0-255,1000")]);
    let good = replica(&dir.path().join("r1"), "127.0.0.1:0", "8M", &[]);
    let (_c, uri, api) = controller("8M", &[&bad.line, &good.line], &[]);
    qemu_io_ok(&uri, &["write -P 0x5c 0 8M", "flush"]);
    for _ in 0..6 {
        qemu_io_ok(&uri, &["read -P 0x5c 0 2M", "read -P 0x5c 4000k 100k"]);
    }
    let s = status(&api);
    assert_eq!(s["replicas"][0]["state"], "healthy", "a bad block is not a failed replica: {s}");
    assert!(s["replicas"][0]["errors"].as_u64().unwrap() > 0, "the faulty replica was never read: {s}");
}

/// A TCP proxy in front of one replica that can stall, drop or reset.
struct Proxy {
    addr: String,
    /// 0 forward, 1 stall (hold bytes).
    mode: Arc<AtomicU8>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: String) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let mode = Arc::new(AtomicU8::new(0));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (m, cs) = (mode.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in l.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&target) else { continue };
                cs.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in
                    [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    let m = m.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 256 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            while m.load(Ordering::SeqCst) == 1 {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { addr, mode, conns }
    }

    /// Closes every proxied connection; with `reset`, with a TCP RST.
    fn cut(&self, reset: bool) {
        for s in self.conns.lock().unwrap().drain(..) {
            if reset {
                let linger = libc::linger { l_onoff: 1, l_linger: 0 };
                // SAFETY: setsockopt on a live socket we own, with a valid linger struct.
                unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        size_of::<libc::linger>() as libc::socklen_t,
                    );
                }
            }
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn proxy_stalls_drops_and_resets_lose_nothing() {
    require("qemu-io");
    let dir = tmp();
    let r0 = replica(&dir.path().join("r0"), "127.0.0.1:0", "8M", &[]);
    let r1 = replica(&dir.path().join("r1"), "127.0.0.1:0", "8M", &[]);
    let proxy = Proxy::start(r1.line.clone());
    let (_c, uri, api) = controller("8M", &[&r0.line, &proxy.addr], &["--request-timeout", "2"]);
    let mut pat = 0x10u8;
    let mut write_and_check = |what: &str| {
        pat += 1;
        let (w, r) = (format!("write -P {pat} 0 4M"), format!("read -P {pat} 0 4M"));
        qemu_io_ok(&uri, &[&w, "flush", &r]);
        eprintln!("{what}: ok with pattern {pat}");
    };
    write_and_check("baseline");
    // A stall longer than the request timeout: the replica is failed, I/O
    // goes on with the other one, and it comes back after the stall.
    proxy.mode.store(1, Ordering::SeqCst);
    write_and_check("during a stall");
    std::thread::sleep(Duration::from_secs(3));
    proxy.mode.store(0, Ordering::SeqCst);
    proxy.cut(false);
    wait_until("back after the stall", Duration::from_secs(60), || all_healthy(&api));
    write_and_check("after the stall");
    proxy.cut(false);
    write_and_check("after a drop");
    wait_until("back after the drop", Duration::from_secs(60), || all_healthy(&api));
    proxy.cut(true);
    write_and_check("after a reset");
    wait_until("back after the reset", Duration::from_secs(60), || all_healthy(&api));
    // Every copy holds the last data: read with r0 removed.
    run_ok(Command::new(JIVA).args(["replica", "rm", &r0.line, "--api", &api]), MINUTE);
    qemu_io_ok(&uri, &[&format!("read -P {pat} 0 4M")]);
}
