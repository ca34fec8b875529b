//! End-to-end tests of a real `jiva up` volume (replica and controller
//! processes on loopback) driven by real NBD clients: libnbd's nbdinfo and
//! nbdcopy, qemu-img, and fio's nbd engine.

mod common;

use std::process::Command;

use common::*;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("jiva-test-").tempdir().unwrap()
}

#[test]
fn nbdinfo_sees_size_flags_and_allocation_map() {
    require("nbdinfo");
    require("qemu-io");
    let dir = tmp();
    let up = Up::start(dir.path(), "64M", 3, &[]);
    let json = run_ok(Command::new("nbdinfo").args(["--json", &up.uri]), MINUTE);
    let info: serde_json::Value = serde_json::from_str(&json).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 64 << 20, "{json}");
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn"] {
        assert_eq!(export[flag], true, "{flag} should be advertised: {json}");
    }
    assert_eq!(export["is_read_only"], false, "{json}");
    let contexts = export["contexts"].as_array().expect("contexts listed");
    assert!(contexts.iter().any(|c| c == "base:allocation"), "{json}");

    // A fresh volume is one hole; after writing 1 MiB at 8 MiB the map shows it.
    let map = run_ok(Command::new("nbdinfo").args(["--map", "--totals", &up.uri]), MINUTE);
    assert!(map.contains("hole"), "fresh volume should be a hole: {map}");
    run_ok(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 8M 1M",
            &format!("nbd://{}/vol", up.addr),
        ]),
        MINUTE,
    );
    let map = run_ok(Command::new("nbdinfo").args(["--map", &up.uri]), MINUTE);
    let lines: Vec<Vec<&str>> = map.lines().map(|l| l.split_whitespace().collect()).collect();
    assert!(
        lines.iter().any(|l| l.len() >= 3 && l[0] == "8388608" && l[1] == "1048576" && l[2] == "0"),
        "expected a 1 MiB data extent at 8 MiB:\n{map}"
    );
    assert!(lines.iter().any(|l| l.len() >= 3 && l[0] == "0" && l[1] == "8388608" && l[2] == "3"), "{map}");
    up.stop();
}

#[test]
fn nbdcopy_in_and_out_round_trips() {
    require("nbdcopy");
    let dir = tmp();
    let up = Up::start(dir.path(), "32M", 3, &[]);
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    let data = pattern(32 << 20, 7);
    std::fs::write(&src, &data).unwrap();
    run_ok(Command::new("nbdcopy").args([src.to_str().unwrap(), &up.uri]), MINUTE);
    run_ok(Command::new("nbdcopy").args([&up.uri, back.to_str().unwrap()]), MINUTE);
    assert!(std::fs::read(&back).unwrap() == data, "data read back differs");
    up.stop();
}

#[test]
fn qemu_img_convert_and_compare() {
    require("qemu-img");
    let dir = tmp();
    let up = Up::start(dir.path(), "48M", 2, &[]);
    let src = dir.path().join("src.img");
    let mut data = pattern(48 << 20, 11);
    // Leave zero runs so qemu-img exercises WRITE_ZEROES / holes too.
    data[4 << 20..12 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    let nbd = format!("nbd://{}/vol", up.addr);
    run_ok(
        Command::new("qemu-img").args([
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &nbd,
        ]),
        MINUTE,
    );
    run_ok(
        Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), &nbd]),
        MINUTE,
    );
    // A one-byte difference must be noticed.
    data[30 << 20] ^= 1;
    std::fs::write(&src, &data).unwrap();
    let out = run_with_timeout(
        Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), &nbd]),
        MINUTE,
    );
    assert_eq!(out.status.code(), Some(1), "qemu-img compare should report a difference");
    up.stop();
}

fn fio_verify(uri: &str, bs: &str, size: &str) {
    let out = run_ok(
        Command::new("fio").args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            &format!("--bs={bs}"),
            "--iodepth=16",
            &format!("--size={size}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ]),
        3 * MINUTE,
    );
    let json: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "fio reported an error: {out}");
    assert!(job["write"]["io_bytes"].as_u64().unwrap() > 0, "fio wrote nothing: {out}");
    assert!(job["read"]["io_bytes"].as_u64().unwrap() > 0, "fio verified nothing: {out}");
}

#[test]
fn fio_verifies_random_writes_on_three_replicas() {
    require("fio");
    let dir = tmp();
    let up = Up::start(dir.path(), "128M", 3, &[]);
    fio_verify(&up.uri, "4k", "32M");
    fio_verify(&up.uri, "64k", "96M");
    // 1 MiB payloads travel in pipes from the client's socket to each
    // replica's (see jiva_core::pipe).
    fio_verify(&up.uri, "1M", "96M");
    up.stop();
}

#[test]
fn data_survives_restart_of_jiva_up() {
    require("nbdcopy");
    let dir = tmp();
    let data = pattern(16 << 20, 3);
    let src = dir.path().join("src.img");
    std::fs::write(&src, &data).unwrap();
    let up = Up::start(&dir.path().join("vol"), "16M", 3, &[]);
    run_ok(Command::new("nbdcopy").args([src.to_str().unwrap(), &up.uri]), MINUTE);
    up.stop();

    let up = Up::start(&dir.path().join("vol"), "16M", 3, &[]);
    let back = dir.path().join("back.img");
    run_ok(Command::new("nbdcopy").args([&up.uri, back.to_str().unwrap()]), MINUTE);
    assert!(std::fs::read(&back).unwrap() == data, "data differs after restart");
    up.stop();
}

#[test]
fn fio_verifies_with_the_sync_engine_and_one_replica() {
    require("fio");
    let dir = tmp();
    let up = Up::start(dir.path(), "64M", 1, &["--io-engine", "sync"]);
    fio_verify(&up.uri, "4k", "16M");
    up.stop();
}

#[test]
fn fio_verifies_with_direct_io_replicas() {
    require("fio");
    let dir = tmp();
    let up = Up::start(dir.path(), "64M", 2, &["--direct-io"]);
    fio_verify(&up.uri, "4k", "16M");
    fio_verify(&up.uri, "64k", "32M");
    up.stop();
}
