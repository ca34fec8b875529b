//! Shared helpers for the integration tests: start a real `jiva up` (real
//! processes on loopback), run real peer tools with a timeout, make data.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const JIVA: &str = env!("CARGO_BIN_EXE_jiva");

/// Fails the test (never skips it) when a peer tool is missing: CI installs them.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "required tool `{tool}` is not installed (run tests/run.sh, which installs the peers)");
}

/// Runs a command to completion within `timeout`, returning its output.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: out_reader.join().unwrap(), stderr: err_reader.join().unwrap() }
}

/// Runs a command and asserts success; returns stdout as a string.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let desc = format!("{cmd:?}");
    let out = run_with_timeout(cmd, timeout);
    assert!(
        out.status.success(),
        "{desc} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running `jiva up`; stopped with SIGTERM (a clean stop) on drop.
pub struct Up {
    child: Option<Child>,
    pub dir: PathBuf,
    pub uri: String,
    pub addr: String,
    pub name: String,
    /// Control API address (HOST:PORT).
    pub api: String,
}

impl Up {
    /// Starts `jiva up` with the given replica count and size in `dir`, on
    /// free loopback ports (NBD and API), and waits until it prints its NBD URI.
    pub fn start(dir: &Path, size: &str, replicas: u32, extra: &[&str]) -> Up {
        Up::start_named(dir, size, replicas, "vol", extra)
    }

    /// Like [`Up::start`] for a volume named `name`.
    pub fn start_named(dir: &Path, size: &str, replicas: u32, name: &str, extra: &[&str]) -> Up {
        let api_args: &[&str] = if extra.contains(&"--api") { &[] } else { &["--api", "127.0.0.1:0"] };
        let mut child = Command::new(JIVA)
            .args(["up", "--dir"])
            .arg(dir)
            .args([
                "--size",
                size,
                "--replicas",
                &replicas.to_string(),
                "--name",
                name,
                "--nbd",
                "127.0.0.1:0",
            ])
            .args(api_args)
            .args(extra)
            .env("JIVA_LOG", std::env::var("JIVA_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn jiva up");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut uri = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(u) = line.strip_prefix("NBD URI: ") {
                    uri = Some(u.trim().to_string());
                }
                if let Some(api) = line.strip_prefix("API: ")
                    && let Some(u) = uri.take()
                {
                    let api = api.trim().trim_start_matches("http://").to_string();
                    let _ = tx.send((u, api));
                }
            }
        });
        let (uri, api) = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(x) => x,
            Err(_) => {
                let _ = child.kill();
                panic!("jiva up did not print its NBD URI within 60 s");
            }
        };
        let addr = uri.trim_start_matches("nbd://").split('/').next().unwrap().to_string();
        Up { child: Some(child), dir: dir.to_path_buf(), uri, addr, name: name.into(), api }
    }

    pub fn port(&self) -> u16 {
        self.addr.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    /// Stops cleanly (SIGTERM) and asserts a zero exit status.
    pub fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        terminate(&mut child);
        let status = wait_timeout(&mut child, Duration::from_secs(60)).expect("jiva up did not stop in 60 s");
        assert!(status.success(), "jiva up exited with {status}");
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
            if wait_timeout(&mut child, Duration::from_secs(30)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn terminate(child: &mut Child) {
    // SAFETY: kill(2) on the pid of our own unreaped child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}

/// Pid of the live replica process whose command line contains `needle`.
pub fn replica_pid(needle: &str) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) && cmd.contains(" replica ") {
            return Some(pid);
        }
    }
    None
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub const MINUTE: Duration = Duration::from_secs(60);
