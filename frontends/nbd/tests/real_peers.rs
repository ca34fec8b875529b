//! Interoperability tests against real NBD clients: libnbd's `nbdinfo` and
//! `nbdcopy`, qemu's `qemu-img` and `qemu-io`, and fio's nbd engine. Each
//! test serves a `MemDevice` on 127.0.0.1 from inside the test's runtime
//! and runs the tool against it with a timeout.
//!
//! A missing tool is a test failure, not a skip: CI installs them
//! (packages libnbd-bin, qemu-utils, fio).

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use jiva_core::mem::MemDevice;
use jiva_core::{BlockDevice, Capabilities, Extent, Result, ZeroFlags};
use jiva_nbd::NbdServer;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const EXPORT: &str = "vol";
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// A server running in the test's runtime.
struct Served<D: BlockDevice> {
    dev: Arc<D>,
    port: u16,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl<D: BlockDevice> Served<D> {
    async fn start(dev: D) -> Served<D> {
        let dev = Arc::new(dev);
        let server = Arc::new(NbdServer::new(Arc::clone(&dev), EXPORT).with_description("jiva test volume"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, async {
            let _ = stopped.await;
        }));
        Served { dev, port, stop, task }
    }

    fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/{EXPORT}", self.port)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("server did not shut down")
            .expect("server task panicked")
            .expect("serve failed");
    }
}

/// Runs `program` with a timeout; a missing program fails the test.
async fn run(program: &str, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "required tool `{program}` is not installed; install it (Debian/Ubuntu packages: \
             libnbd-bin for nbdinfo/nbdcopy, qemu-utils for qemu-img/qemu-io, fio)"
        ),
        Err(e) => panic!("cannot run `{program}`: {e}"),
    };
    match tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output()).await {
        Ok(out) => out.expect("waiting for tool"),
        Err(_) => panic!("`{program} {}` timed out after {TOOL_TIMEOUT:?}", args.join(" ")),
    }
}

/// Like [`run`], and the command must succeed; returns its stdout.
async fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{program} {}` failed with {}\nstdout:\n{stdout}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Deterministic pseudo-random bytes (xorshift), with a zero run in the
/// middle so sparse-aware copies exercise zeroing too.
fn test_image(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let zero_from = len / 4;
    out[zero_from..zero_from + len / 8].fill(0);
    out
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, data).expect("write temp file");
    path.to_str().expect("utf-8 path").to_owned()
}

async fn device_bytes<D: BlockDevice>(dev: &D, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(1 << 20);
        out.extend_from_slice(&dev.read(pos as u64, n).await.expect("device read"));
        pos += n;
    }
    out
}

/// A MemDevice that reports itself read-only.
struct ReadOnly(MemDevice);

impl BlockDevice for ReadOnly {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities { read_only: true, ..self.0.capabilities() }
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.0.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.0.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<()> {
        self.0.flush().await
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.0.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.0.write_zeroes(offset, len, flags).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.0.block_status(offset, len).await
    }
}

fn export_json(stdout: &str) -> Value {
    let v: Value = serde_json::from_str(stdout).expect("nbdinfo --json output");
    v["exports"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_and_capabilities() {
    let served = Served::start(MemDevice::new(64 << 20)).await;
    let stdout = run_ok("nbdinfo", &["--json", &served.uri()]).await;
    let all: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(all["protocol"], "newstyle-fixed", "{stdout}");
    assert_eq!(all["structured"], true, "{stdout}");
    let e = export_json(&stdout);
    assert_eq!(e["export-name"], EXPORT, "{stdout}");
    assert_eq!(e["export-size"], 64 << 20, "{stdout}");
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn", "can_df"]
    {
        assert_eq!(e[flag], true, "{flag} in {stdout}");
    }
    assert_eq!(e["can_cache"], false, "{stdout}");
    assert_eq!(e["is_read_only"], false, "{stdout}");
    assert_eq!(e["contexts"], serde_json::json!(["base:allocation"]), "{stdout}");
    assert_eq!(e["description"], "jiva test volume", "{stdout}");
    assert_eq!(e["block_size_minimum"], 1, "{stdout}");
    assert_eq!(e["block_size_preferred"], 4096, "{stdout}");
    assert_eq!(e["block_size_maximum"], jiva_core::MAX_IO_BYTES, "{stdout}");

    // The listing (NBD_OPT_LIST, then NBD_OPT_INFO per export).
    let stdout = run_ok("nbdinfo", &["--list", "--json", &format!("nbd://127.0.0.1:{}", served.port)]).await;
    let listed = export_json(&stdout);
    assert_eq!(listed["export-name"], EXPORT, "{stdout}");
    assert_eq!(listed["export-size"], 64 << 20, "{stdout}");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_and_qemu_io_on_a_read_only_export() {
    let served = Served::start(ReadOnly(MemDevice::new(1 << 20))).await;
    let e = export_json(&run_ok("nbdinfo", &["--json", &served.uri()]).await);
    assert_eq!(e["is_read_only"], true, "{e}");
    assert_eq!(e["can_trim"], false, "{e}");
    assert_eq!(e["can_zero"], false, "{e}");
    // qemu-io refuses or fails the write; either way nothing is written.
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 4k", &served.uri()]).await;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        !out.status.success() || text.contains("read-only") || text.contains("Operation not permitted"),
        "write on a read-only export looked successful: {text}"
    );
    assert_eq!(served.dev.0.allocated_blocks(), 0);
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_show_up_in_nbdinfo_map() {
    let served = Served::start(MemDevice::new(4 << 20)).await;
    let uri = served.uri();
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1M 64k",
            "-c",
            "write -P 0xcd 3M 4k",
            "-c",
            "read -P 0xab 1M 64k",
            "-c",
            "read -P 0 0 1M",
            "-c",
            "flush",
            &uri,
        ],
    )
    .await;
    let dev = &served.dev;
    assert!(dev.read(1 << 20, 65536).await.unwrap().iter().all(|&b| b == 0xab));
    assert!(dev.read(3 << 20, 4096).await.unwrap().iter().all(|&b| b == 0xcd));

    let stdout = run_ok("nbdinfo", &["--map", "--json", &uri]).await;
    let map: Value = serde_json::from_str(&stdout).expect("map json");
    let extents: Vec<(u64, u64, u64)> = map
        .as_array()
        .expect("array")
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap()))
        .collect();
    const HOLE_ZERO: u64 = 3;
    const DATA: u64 = 0;
    assert_eq!(
        extents,
        vec![
            (0, 1 << 20, HOLE_ZERO),
            (1 << 20, 65536, DATA),
            ((1 << 20) + 65536, (2 << 20) - 65536, HOLE_ZERO),
            (3 << 20, 4096, DATA),
            ((3 << 20) + 4096, (1 << 20) - 4096, HOLE_ZERO),
        ],
        "{stdout}"
    );

    // Zeroing through qemu-io (NBD_CMD_WRITE_ZEROES, possibly with
    // NO_HOLE/FAST_ZERO) and a discard (NBD_CMD_TRIM) turn data into holes.
    run_ok("qemu-io", &["-f", "raw", "-c", "write -z 1M 64k", "-c", "discard 3M 4k", &uri]).await;
    let stdout = run_ok("nbdinfo", &["--map", &uri]).await;
    assert!(!stdout.contains("data"), "all holes again:\n{stdout}");
    assert_eq!(dev.allocated_blocks(), 0);
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trip() {
    const LEN: usize = 8 << 20;
    let served = Served::start(MemDevice::new(LEN as u64)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let image = test_image(LEN, 0x9e37_79b9_7f4a_7c15);
    let src = write_file(dir.path(), "src.img", &image);
    let dst = dir.path().join("dst.img");
    let dst = dst.to_str().unwrap();
    // nbdcopy uses several connections (we advertise CAN_MULTI_CONN) and
    // many requests in flight on each.
    run_ok("nbdcopy", &["--flush", &src, &served.uri()]).await;
    assert!(device_bytes(&*served.dev, LEN).await == image, "device content differs from the source");
    run_ok("nbdcopy", &[&served.uri(), dst]).await;
    let copied = std::fs::read(dst).expect("read copy");
    assert!(copied == image, "copied-out image differs from the source");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_and_compare() {
    const LEN: usize = 4 << 20;
    let served = Served::start(MemDevice::new(LEN as u64)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let image = test_image(LEN, 42);
    let src = write_file(dir.path(), "src.img", &image);
    let uri = served.uri();
    run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", &src, &uri]).await;
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", &src, &uri]).await;

    // A one-byte difference must be found (exit status 1).
    served.dev.write(LEN as u64 - 4096 + 17, Bytes::from_static(&[0x42 ^ 0xff]), false).await.unwrap();
    let out = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", &src, &uri]).await;
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_writes_verify() {
    let served = Served::start(MemDevice::new(16 << 20)).await;
    let uri = format!("--uri={}", served.uri());
    let stdout = run_ok(
        "fio",
        &[
            "--name=t",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--output-format=normal",
            // fio would otherwise leave verify state files in the cwd.
            "--verify_state_save=0",
        ],
    )
    .await;
    assert!(!stdout.contains("verify: bad"), "fio verify errors:\n{stdout}");
    assert!(stdout.contains("err= 0"), "fio reported errors:\n{stdout}");
    assert!(served.dev.allocated_blocks() >= (8 << 20) / 4096 / 2, "fio wrote little:\n{stdout}");
    served.stop().await;
}
