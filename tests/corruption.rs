//! Silent corruption on a replica's disk: a flipped byte in a replica's
//! data file is caught by the block checksum. With other replicas the read
//! returns the good data (and repairs the bad copy); with a single replica
//! the read fails cleanly. The corrupted bytes never reach the client.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::*;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("jiva-test-").tempdir().unwrap()
}

fn data_file(vol: &Path, replica: u32) -> std::path::PathBuf {
    vol.join(format!("replica-{replica}")).join("layer-000001.data")
}

fn flip_byte(file: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(file).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

fn read_byte(file: &Path, offset: u64) -> u8 {
    let f = std::fs::File::open(file).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0]
}

#[test]
fn flipped_byte_is_served_from_a_good_replica_and_repaired() {
    require("nbdcopy");
    let dir = tmp();
    let vol = dir.path().join("vol");
    let data = pattern(4 << 20, 21);
    let src = dir.path().join("src.img");
    std::fs::write(&src, &data).unwrap();
    let up = Up::start(&vol, "4M", 3, &[]);
    run_ok(Command::new("nbdcopy").args([src.to_str().unwrap(), &up.uri]), MINUTE);
    up.stop();

    // Damage the same block on two of three replicas, and other blocks on
    // each, so most reads meet a bad copy first.
    let hits = [(1, 1_000_123u64), (2, 1_000_123), (3, 2_500_000), (1, 3_999_999)];
    for (r, off) in hits {
        flip_byte(&data_file(&vol, r), off);
    }
    let up = Up::start(&vol, "4M", 3, &[]);
    let back = dir.path().join("back.img");
    // A bad copy is met only when a read picks its replica first (reads
    // spread over the replicas), so read until every one has been met and
    // rewritten from a good one. The repair completes before the read that
    // found it is answered, and the replica writes through the page cache,
    // so the file shows it as soon as nbdcopy is done.
    let bad = |hits: &[(u32, u64)]| -> Vec<(u32, u64)> {
        hits.iter()
            .copied()
            .filter(|(r, off)| read_byte(&data_file(&vol, *r), *off) != data[*off as usize])
            .collect()
    };
    let mut passes = 0;
    while !bad(&hits).is_empty() && passes < 300 {
        run_ok(Command::new("nbdcopy").args([&up.uri, back.to_str().unwrap()]), MINUTE);
        assert!(std::fs::read(&back).unwrap() == data, "corrupt data reached the client");
        passes += 1;
    }
    up.stop();
    assert!(passes > 0, "the damage did not reach the data files");
    assert_eq!(bad(&hits), vec![], "corrupt copies left after {passes} full reads");
}

#[test]
fn flipped_byte_on_a_single_replica_is_a_clean_read_error() {
    require("qemu-io");
    let dir = tmp();
    let vol = dir.path().join("vol");
    let up = Up::start(&vol, "4M", 1, &[]);
    let nbd = format!("nbd://{}/vol", up.addr);
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x42 0 4M", &nbd]), MINUTE);
    up.stop();
    flip_byte(&data_file(&vol, 1), 2 * 4096 + 7);

    let up = Up::start(&vol, "4M", 1, &[]);
    let nbd = format!("nbd://{}/vol", up.addr);
    let out = run_with_timeout(
        Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x42 8192 4096", &nbd]),
        MINUTE,
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Input/output error"), "corrupt block must fail with EIO, got: {text}");
    assert!(!text.contains("Pattern verification failed"), "corrupt bytes were returned: {text}");
    // Neighbouring blocks still read correctly.
    run_ok(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "read -P 0x42 0 8192",
            "-c",
            "read -P 0x42 12288 4096",
            &nbd,
        ]),
        MINUTE,
    );
    up.stop();
}
