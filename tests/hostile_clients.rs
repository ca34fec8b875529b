//! A running volume facing bad input on its network ports: garbage and
//! truncated NBD handshakes, a raw replica port hit by junk, clients that
//! stall. None of it may crash a process, hang it, or change the volume.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::*;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("jiva-test-").tempdir().unwrap()
}

/// Sends `bytes`, then reads until the server closes (or 5 s pass).
fn poke(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

#[test]
fn garbage_on_the_nbd_port_leaves_the_volume_intact() {
    require("nbdcopy");
    let dir = tmp();
    let up = Up::start(dir.path(), "8M", 2, &[]);
    let src = dir.path().join("src.img");
    let data = pattern(8 << 20, 99);
    std::fs::write(&src, &data).unwrap();
    run_ok(Command::new("nbdcopy").args([src.to_str().unwrap(), &up.uri]), MINUTE);

    // Wrong client flags, a truncated option header, random junk, an option
    // with an absurd length, a request before any handshake.
    let mut junk = pattern(4096, 5);
    junk[..4].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0, 0, 0, 1, 0x49, 0x48],
        junk,
        [&[0u8, 0, 0, 1][..], b"IHAVEOPT", &[0, 0, 0, 7], &[0xff, 0xff, 0xff, 0xff]].concat(),
        [&0x2560_9513u32.to_be_bytes()[..], &[0u8; 24]].concat(),
    ];
    for case in &cases {
        let reply = poke(&up.addr, case);
        // The server always greets first; whatever follows, it must not hang.
        assert!(reply.starts_with(b"NBDMAGIC"), "no greeting for {case:?}");
    }
    // A client that connects and says nothing does not block others.
    let _idle = TcpStream::connect(&up.addr).unwrap();

    let back = dir.path().join("back.img");
    run_ok(Command::new("nbdcopy").args([&up.uri, back.to_str().unwrap()]), MINUTE);
    assert!(std::fs::read(&back).unwrap() == data, "volume changed by hostile input");
    up.stop();
}

#[test]
fn out_of_range_requests_are_refused_without_changing_data() {
    require("qemu-io");
    let dir = tmp();
    let up = Up::start(dir.path(), "4M", 1, &[]);
    let nbd = format!("nbd://{}/vol", up.addr);
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x11 0 4M", &nbd]), MINUTE);
    // qemu-io refuses out-of-range requests itself, so speak NBD by hand
    // through nbdsh, which lets us send them.
    require("nbdsh");
    // nbdsh is `python3 -m nbd`; call Debian's python, which has the module.
    let script = format!(
        r#"
h.set_strict_mode(0)
h.connect_uri("{uri}")
import errno
for (off, n) in [(4*1024*1024 - 512, 1024), (4*1024*1024, 1), (2**63, 4096)]:
    try:
        h.pwrite(b"x" * n, off)
        raise SystemExit("write at %d accepted" % off)
    except nbd.Error as e:
        assert e.errnum in (errno.EINVAL, errno.ENOSPC), e
    try:
        h.pread(n, off)
        raise SystemExit("read at %d accepted" % off)
    except nbd.Error as e:
        assert e.errnum == errno.EINVAL, e
assert h.pread(4096, 4*1024*1024 - 4096) == b"\x11" * 4096
print("ok")
"#,
        uri = up.uri
    );
    let out = run_ok(Command::new("/usr/bin/python3").args(["-m", "nbd", "-c", &script]), MINUTE);
    assert!(out.contains("ok"), "{out}");
    up.stop();
}
