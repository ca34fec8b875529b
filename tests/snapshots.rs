//! Volume snapshots end to end: `jiva up` with two replicas, data written
//! over NBD with qemu-io, and `jiva snapshot ...` / `jiva volume clone`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{JIVA, MINUTE, Up, replica_pid, require, run_ok, run_with_timeout};
use serde_json::Value;

fn qemu_io_ok(uri: &str, cmds: &[&str]) {
    qemu_io_with(&["-f", "raw"], uri, cmds);
}

fn qemu_io_with(opts: &[&str], uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(opts);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = run_with_timeout(&mut c, MINUTE);
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("error") && !text.contains("failed"),
        "qemu-io {cmds:?}: {text}"
    );
}

fn jiva(api: &str, args: &[&str]) -> std::process::Output {
    run_with_timeout(Command::new(JIVA).args(args).args(["--api", api]), MINUTE)
}

fn jiva_json(api: &str, args: &[&str]) -> Value {
    let out = jiva(api, &[args, &["--json"]].concat());
    assert!(out.status.success(), "jiva {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn names(api: &str) -> Vec<String> {
    let v = jiva_json(api, &["snapshot", "ls"]);
    v.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_string()).collect()
}

/// The head holds C over B over A; s1 = A, s2 = B over A.
const A: &str = "write -P 0xaa 0 4M";
const B: &str = "write -P 0xbb 2M 4M";
const C: &str = "write -P 0xcc 1M 2M";

fn check_b_over_a(uri: &str) {
    qemu_io_ok(uri, &["read -P 0xaa 0 2M", "read -P 0xbb 2M 4M", "read -P 0 6M 10M"]);
}

#[test]
fn snapshot_pattern_delete_revert_and_clone() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let up = Up::start(&tmp.path().join("vol"), "16M", 2, &[]);
    let api = up.api.clone();
    let uri = format!("nbd://{}/vol", up.addr);

    qemu_io_ok(&uri, &[A]);
    let created = jiva_json(&api, &["snapshot", "create", "s1"]);
    assert_eq!(created["replicas"].as_array().unwrap().len(), 2, "{created}");
    let pause = created["pause_ms"].as_f64().unwrap();
    assert!(pause < 2000.0, "writes were fenced for {pause} ms");
    qemu_io_ok(&uri, &[B]);
    let out = jiva(&api, &["snapshot", "create", "s2"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("paused"), "the pause is reported");
    qemu_io_ok(&uri, &[C]);
    qemu_io_ok(&uri, &["read -P 0xaa 0 1M", "read -P 0xcc 1M 2M", "read -P 0xbb 3M 3M"]);

    let list = jiva_json(&api, &["snapshot", "ls"]);
    assert_eq!(list[0]["name"], "s1");
    assert_eq!(list[1]["parent"], "s1");
    assert_eq!(list[0]["size_bytes"], 4 << 20);
    assert_eq!(list[1]["kind"], "user");
    assert!(!jiva(&api, &["snapshot", "create", "s1"]).status.success(), "duplicate name refused");
    assert!(!jiva(&api, &["snapshot", "create", "bad/name"]).status.success());

    // Clone s2 into a new volume, serve it, check it, write to it.
    let clone_dir = tmp.path().join("copy");
    let out = jiva(
        &api,
        &["volume", "clone", "s2", "--name", "copy", "--replicas", "2", "--dir", clone_dir.to_str().unwrap()],
    );
    assert!(out.status.success(), "clone: {}", String::from_utf8_lossy(&out.stderr));
    {
        let copy = Up::start_named(&clone_dir, "16M", 2, "copy", &[]);
        let copy_uri = format!("nbd://{}/copy", copy.addr);
        check_b_over_a(&copy_uri);
        qemu_io_ok(&copy_uri, &["write -P 0x11 0 8M"]);
        copy.stop();
    }
    qemu_io_ok(&uri, &["read -P 0xaa 0 1M", "read -P 0xcc 1M 2M", "read -P 0xbb 3M 3M"]);

    // Delete s1: s2 and the head stay the same.
    jiva_json(&api, &["snapshot", "rm", "s1"]);
    let deadline = Instant::now() + MINUTE;
    while names(&api).contains(&"s1".to_string()) {
        assert!(Instant::now() < deadline, "s1 was not merged away");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(names(&api), ["s2"]);
    qemu_io_ok(&uri, &["read -P 0xaa 0 1M", "read -P 0xcc 1M 2M", "read -P 0xbb 3M 3M"]);

    // Revert refuses while a client is attached, and says what to do.
    let mut client = Command::new("qemu-io")
        .args(["-f", "raw", &uri])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::{BufRead, Write};
        let mut stdin = client.stdin.take().unwrap();
        writeln!(stdin, "read 0 4k").unwrap();
        let mut out = std::io::BufReader::new(client.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("bytes") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "qemu-io ended");
        }
        let out = jiva(&api, &["snapshot", "revert", "s2"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("1 NBD/iSCSI client(s) are attached") && err.contains("--pause"), "{err}");
        // With --pause it goes ahead (the client must drop its cache).
        let out = jiva(&api, &["snapshot", "revert", "s2", "--pause"]);
        assert!(out.status.success(), "revert: {}", String::from_utf8_lossy(&out.stderr));
        check_b_over_a(&uri);
        writeln!(stdin, "quit").unwrap();
    }
    assert!(client.wait().unwrap().success());
    // Without clients, a revert needs no --pause.
    qemu_io_ok(&uri, &[C]);
    let out = jiva(&api, &["snapshot", "revert", "s2"]);
    assert!(out.status.success(), "revert: {}", String::from_utf8_lossy(&out.stderr));
    check_b_over_a(&uri);
    assert_eq!(names(&api), ["s2"]);

    // The snapshot is exported read-only as vol@s2.
    require("nbdinfo");
    require("nbdsh");
    require("qemu-img");
    let snap_uri = format!("nbd://{}/vol@s2", up.addr);
    let list = run_ok(Command::new("nbdinfo").args(["--list", &format!("nbd://{}", up.addr)]), MINUTE);
    assert!(list.contains("export=\"vol@s2\""), "{list}");
    assert!(list.contains("is_read_only: true"), "{list}");
    let reads = ["read -P 0xaa 0 2M", "read -P 0xbb 2M 4M", "read -P 0 6M 10M"];
    qemu_io_with(&["-r", "-f", "raw"], &snap_uri, &reads);
    let map = run_ok(Command::new("nbdinfo").args(["--map", &snap_uri]), MINUTE);
    let rows: Vec<Vec<&str>> = map.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0][..3], ["0", "6291456", "0"], "{map}");
    assert_eq!(rows[1][..3], ["6291456", "10485760", "3"], "{map}");
    // A write the client does not check itself first must get EPERM from the server.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let write = run_with_timeout(
        Command::new("nbdsh")
            .args(["-u", &snap_uri, "-c", "h.set_strict_mode(0)", "-c", "h.pwrite(b'x' * 4096, 0)"])
            // libnbd's Python bindings come with the system's python3.
            .env("PATH", path),
        MINUTE,
    );
    let err = String::from_utf8_lossy(&write.stderr);
    assert!(!write.status.success() && err.contains("command failed: Operation not permitted"), "{err}");
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &snap_uri, &uri]), MINUTE);
    let missing =
        run_with_timeout(Command::new("nbdinfo").arg(format!("nbd://{}/vol@nope", up.addr)), MINUTE);
    assert!(!missing.status.success());
    up.stop();

    // Both replicas hold the same data after a restart.
    let up = Up::start(&tmp.path().join("vol"), "16M", 2, &[]);
    check_b_over_a(&format!("nbd://{}/vol", up.addr));
    let v = run_ok(Command::new(JIVA).args(["snapshot", "ls", "--api", &up.api]), MINUTE);
    assert!(v.contains("s2"), "{v}");
    up.stop();
}

/// A replica or controller process, killed (SIGKILL) on drop.
struct Proc {
    child: std::process::Child,
    /// Its first stdout line after the expected prefix.
    line: String,
}

impl Proc {
    fn spawn(args: &[&str], prefix: &str) -> Proc {
        use std::io::{BufRead, BufReader, Read};
        let mut child = Command::new(JIVA)
            .args(args)
            .env("JIVA_LOG", std::env::var("JIVA_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn jiva");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        std::thread::spawn(move || out.read_to_end(&mut Vec::new()));
        let Some(rest) = line.trim().strip_prefix(prefix) else {
            let _ = child.kill();
            panic!("{args:?} printed {line:?}, expected {prefix:?}");
        };
        Proc { line: rest.to_string(), child }
    }

    fn replica(dir: &std::path::Path, listen: &str) -> Proc {
        Proc::spawn(
            &["replica", "--listen", listen, "--dir", dir.to_str().unwrap(), "--size", SIZE],
            "listening on ",
        )
    }

    /// Returns the process, the NBD URI and the API address.
    fn controller(replicas: &[&str], extra: &[&str]) -> (Proc, String, String) {
        let mut args = vec!["controller", "--size", SIZE, "--nbd", "127.0.0.1:0", "--api", "127.0.0.1:0"];
        args.extend(extra);
        args.extend(["--heartbeat-ms", "200", "--checkpoint-interval", "1", "--connect-timeout", "10"]);
        for r in replicas {
            args.extend(["--replica", r]);
        }
        let p = Proc::spawn(&args, "ready ");
        let (uri, api) = p.line.split_once(" api ").expect("the controller prints its API address");
        let (uri, api) = (uri.to_string(), api.trim_start_matches("http://").to_string());
        (p, uri, api)
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

const SIZE: &str = "32M";

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + 2 * MINUTE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn replica_json(api: &str, i: usize) -> Value {
    jiva_json(api, &["volume", "status"])["replicas"][i].clone()
}

/// Waits until replica `i` is healthy after at least `rebuilds` rebuilds.
fn wait_rebuilt(api: &str, i: usize, rebuilds: u64) {
    wait_until(&format!("replica {i} rebuilt {rebuilds} time(s)"), || {
        let r = replica_json(api, i);
        r["state"] == "healthy" && r["rebuilds_completed"].as_u64() >= Some(rebuilds)
    });
}

fn wait_merged(api: &str, name: &str) {
    wait_until(&format!("{name} merged away"), || !names(api).iter().any(|n| n == name));
}

/// Every snapshot (name, creation time, kind) and the contents of each
/// snapshot and of the head, read from the store in `dir` (its process stopped).
fn store_contents(dir: &std::path::Path) -> Vec<(String, u64, bool, Vec<u8>)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use jiva_core::BlockDevice;
        let size = 32u64 << 20;
        let store =
            jiva_replica::Store::open(dir, size, jiva_replica::StoreOptions::default()).await.unwrap();
        store.wait_merge().await.unwrap();
        let mut out = Vec::new();
        for s in store.snapshots() {
            let data = store.read_snapshot(&s.name, 0, size as usize).await.unwrap();
            out.push((s.name, s.created_ms, s.system, data.to_vec()));
        }
        out.push(("(head)".into(), 0, false, store.read(0, size as usize).await.unwrap().to_vec()));
        out
    })
}

fn assert_same_stores(a: &std::path::Path, b: &std::path::Path) {
    let (x, y) = (store_contents(a), store_contents(b));
    let meta =
        |v: &[(String, u64, bool, Vec<u8>)]| v.iter().map(|s| (s.0.clone(), s.1, s.2)).collect::<Vec<_>>();
    assert_eq!(meta(&x), meta(&y), "the replicas hold different snapshots");
    for (s, t) in x.iter().zip(&y) {
        if let Some(block) = s.3.chunks(4096).zip(t.3.chunks(4096)).position(|(p, q)| p != q) {
            panic!("{} differs between the replicas at block {block}", s.0);
        }
    }
}

#[test]
fn rebuild_carries_snapshots() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let (d1, d2) = (tmp.path().join("r1"), tmp.path().join("r2"));
    let r1 = Proc::replica(&d1, "127.0.0.1:0");
    let mut r2 = Proc::replica(&d2, "127.0.0.1:0");
    let port2 = r2.line.clone();
    let (mut ctl, uri, api) = Proc::controller(&[&r1.line, &r2.line], &[]);

    qemu_io_ok(&uri, &[A]);
    jiva_json(&api, &["snapshot", "create", "s1"]);
    // A trim over s1's data leaves a ZERO record in the next layer.
    qemu_io_ok(&uri, &[B, "discard 0 1M"]);
    jiva_json(&api, &["snapshot", "create", "s2"]);
    qemu_io_ok(&uri, &[C]);
    jiva_json(&api, &["snapshot", "create", "s3"]);
    qemu_io_ok(&uri, &["write -P 0xdd 10M 1M"]);

    // Replica 2 misses a delete and a create: its chain diverges.
    r2.kill9();
    wait_until("replica 2 failed", || replica_json(&api, 1)["state"] == "failed");
    jiva_json(&api, &["snapshot", "rm", "s2"]);
    wait_merged(&api, "s2");
    qemu_io_ok(&uri, &["write -P 0xee 12M 1M", "write -P 0xbb 20M 64k"]);
    jiva_json(&api, &["snapshot", "create", "s4"]);
    qemu_io_ok(&uri, &["write -P 0xff 24M 1M"]);
    let mut r2 = Proc::replica(&d2, &port2);
    wait_rebuilt(&api, 1, 1);
    assert_eq!(replica_json(&api, 1)["last_rebuild"]["full"], true, "a changed chain needs the head in full");
    assert_eq!(names(&api), ["s1", "s3", "s4"]);

    // Snapshot operations work again once it is healthy (and a revert runs on both).
    jiva_json(&api, &["snapshot", "create", "s5"]);

    // A new, empty replica in its place gets every snapshot.
    r2.kill9();
    wait_until("replica 2 failed", || replica_json(&api, 1)["state"] == "failed");
    std::fs::remove_dir_all(&d2).unwrap();
    let r2 = Proc::replica(&d2, &port2);
    wait_rebuilt(&api, 1, 2);

    // The rebuilt replica serves the same: read through it alone.
    run_ok(Command::new(JIVA).args(["replica", "rm", &r1.line, "--api", &api]), MINUTE);
    qemu_io_ok(
        &uri,
        &[
            "read -P 0 0 1M",
            "read -P 0xcc 1M 2M",
            "read -P 0xbb 3M 3M",
            "read -P 0xdd 10M 1M",
            "read -P 0xee 12M 1M",
            "read -P 0xbb 20M 64k",
            "read -P 0xff 24M 1M",
        ],
    );
    ctl.kill9();
    drop((r1, r2));
    assert_same_stores(&d1, &d2);
    let snaps = store_contents(&d2);
    let names: Vec<&str> = snaps.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(names, ["s1", "s3", "s4", "s5", "(head)"]);
    // s1 = A alone; s3 = C over B over A with the trim.
    assert!(
        snaps[0].3[..4 << 20].iter().all(|&b| b == 0xaa) && snaps[0].3[4 << 20..].iter().all(|&b| b == 0)
    );
    assert!(snaps[1].3[..1 << 20].iter().all(|&b| b == 0));
    assert!(snaps[1].3[1 << 20..3 << 20].iter().all(|&b| b == 0xcc));
    assert!(snaps[1].3[3 << 20..6 << 20].iter().all(|&b| b == 0xbb));
}

#[test]
fn restarts_and_rebuilds_take_no_snapshots() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("vol");
    let up = Up::start(&vol, SIZE, 3, &["--checkpoint-interval", "1"]);
    let uri = format!("nbd://{}/vol", up.addr);
    qemu_io_ok(&uri, &[A]);
    jiva_json(&up.api, &["snapshot", "create", "s1"]);
    qemu_io_ok(&uri, &[B]);
    jiva_json(&up.api, &["snapshot", "create", "s2"]);
    for cycle in 0..4u64 {
        let i = (cycle % 3) as usize;
        qemu_io_ok(&uri, &[&format!("write -P {} {}M 1M", cycle + 1, 8 + cycle)]);
        let needle = format!("{}/replica-{} ", vol.display(), i + 1);
        let pid = replica_pid(&needle).unwrap_or_else(|| panic!("no process for {needle}"));
        // SAFETY: kill(2) on a pid just looked up; at worst it is gone already.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        // `jiva up` restarts it; the controller rebuilds it.
        let before = replica_json(&up.api, i)["rebuilds_completed"].as_u64().unwrap_or(0);
        wait_rebuilt(&up.api, i, before + 1);
        assert_eq!(names(&up.api), ["s1", "s2"], "cycle {cycle}");
    }
    up.stop();
    let up = Up::start(&vol, SIZE, 3, &[]);
    assert_eq!(names(&up.api), ["s1", "s2"]);
    up.stop();
    let replicas: Vec<_> = (1..=3).map(|k| vol.join(format!("replica-{k}"))).collect();
    for r in &replicas[1..] {
        assert_same_stores(&replicas[0], r);
    }
    assert_eq!(store_contents(&replicas[0]).len(), 3, "two snapshots and the head");
}

#[test]
fn interrupted_rebuild_after_a_snapshot_copy_resumes() {
    require("nbdcopy");
    let tmp = tempfile::tempdir().unwrap();
    let (d1, d2) = (tmp.path().join("r1"), tmp.path().join("r2"));
    let r1 = Proc::replica(&d1, "127.0.0.1:0");
    let (ctl, uri, api) = Proc::controller(&[&r1.line], &["--rebuild-rate", "8M"]);
    let src = tmp.path().join("src.img");
    std::fs::write(&src, common::pattern(8 << 20, 5)).unwrap();
    run_ok(Command::new("nbdcopy").args([src.to_str().unwrap(), &uri]), MINUTE);
    jiva_json(&api, &["snapshot", "create", "s1"]);
    std::fs::write(&src, common::pattern(24 << 20, 6)).unwrap();
    run_ok(Command::new("nbdcopy").args([src.to_str().unwrap(), &uri]), MINUTE);

    // A new replica: s1 (8 MiB) is copied, then the head (24 MiB, at 8 MiB/s).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let mut r2 = Proc::replica(&d2, &port);
    run_ok(Command::new(JIVA).args(["replica", "add", &port, "--api", &api]), MINUTE);
    wait_until("the head rebuild 30% done", || {
        let r = replica_json(&api, 1);
        let (d, t) = (
            r["rebuild"]["done_bytes"].as_u64().unwrap_or(0),
            r["rebuild"]["total_bytes"].as_u64().unwrap_or(0),
        );
        t > 0 && d * 10 >= t * 3
    });
    std::thread::sleep(Duration::from_millis(1200)); // progress is recorded every second
    r2.kill9();
    wait_until("replica 2 failed", || replica_json(&api, 1)["state"] == "failed");
    let r2 = Proc::replica(&d2, &port);
    wait_rebuilt(&api, 1, 1);
    let last = replica_json(&api, 1)["last_rebuild"].clone();
    assert_eq!(last["resumed"], true, "the snapshots match now, so the head rebuild resumes: {last}");
    let copied = last["copied_bytes"].as_u64().unwrap();
    assert!(copied < 24 << 20, "resumed rebuild copied {copied} bytes: {last}");
    drop(ctl);
    drop((r1, r2));
    assert_same_stores(&d1, &d2);
}

#[test]
fn revert_while_a_replica_rebuilds() {
    require("nbdcopy");
    let tmp = tempfile::tempdir().unwrap();
    let (d1, d2) = (tmp.path().join("r1"), tmp.path().join("r2"));
    let r1 = Proc::replica(&d1, "127.0.0.1:0");
    let (ctl, uri, api) = Proc::controller(&[&r1.line], &["--rebuild-rate", "8M"]);
    let src = tmp.path().join("src.img");
    let s1 = common::pattern(16 << 20, 7);
    std::fs::write(&src, &s1).unwrap();
    run_ok(Command::new("nbdcopy").args([src.to_str().unwrap(), &uri]), MINUTE);
    jiva_json(&api, &["snapshot", "create", "s1"]);
    std::fs::write(&src, common::pattern(24 << 20, 8)).unwrap();
    run_ok(Command::new("nbdcopy").args([src.to_str().unwrap(), &uri]), MINUTE);

    let r2 = Proc::replica(&d2, "127.0.0.1:0");
    run_ok(Command::new(JIVA).args(["replica", "add", &r2.line, "--api", &api]), MINUTE);
    wait_until("the head rebuild under way", || {
        let r = replica_json(&api, 1);
        r["state"] == "rebuilding" && r["rebuild"]["done_bytes"].as_u64().unwrap_or(0) > 0
    });
    // No client is attached: the revert pauses I/O itself.
    let out = jiva(&api, &["snapshot", "revert", "s1"]);
    assert!(out.status.success(), "revert: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(replica_json(&api, 1)["state"], "rebuilding", "the rebuild goes on");
    wait_rebuilt(&api, 1, 1);
    let back = tmp.path().join("back.img");
    run_ok(Command::new("nbdcopy").args([&uri, back.to_str().unwrap()]), MINUTE);
    let back = std::fs::read(&back).unwrap();
    assert!(back[..16 << 20] == s1[..] && back[16 << 20..].iter().all(|&b| b == 0), "the head is not s1");
    drop(ctl);
    drop((r1, r2));
    assert_same_stores(&d1, &d2);
}
