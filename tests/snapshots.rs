//! Volume snapshots end to end: `jiva up` with two replicas, data written
//! over NBD with qemu-io, and `jiva snapshot ...` / `jiva volume clone`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{JIVA, MINUTE, Up, require, run_ok, run_with_timeout};
use serde_json::Value;

fn qemu_io_ok(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
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

    // Revert needs the volume paused, and says so.
    let out = jiva(&api, &["snapshot", "revert", "s2"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pause"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = jiva(&api, &["snapshot", "revert", "s2", "--pause"]);
    assert!(out.status.success(), "revert: {}", String::from_utf8_lossy(&out.stderr));
    check_b_over_a(&uri);
    assert_eq!(names(&api), ["s2"]);
    up.stop();

    // Both replicas hold the same data after a restart.
    let up = Up::start(&tmp.path().join("vol"), "16M", 2, &[]);
    check_b_over_a(&format!("nbd://{}/vol", up.addr));
    let v = run_ok(Command::new(JIVA).args(["snapshot", "ls", "--api", &up.api]), MINUTE);
    assert!(v.contains("s2"), "{v}");
    up.stop();
}
