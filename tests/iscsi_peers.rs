//! End-to-end tests of the iSCSI target of a real volume (replica and
//! controller processes on loopback) driven by real initiators: libiscsi's
//! tools (iscsi-ls, iscsi-inq, iscsi-readcapacity16), qemu-img over
//! `iscsi://`, and libiscsi's conformance suite `iscsi-test-cu`, which is
//! also run against the reference target tgtd on the same kind of backing
//! store: ours must pass every test tgtd passes.
//!
//! A missing tool fails the test (packages libiscsi-bin, qemu-block-extra,
//! qemu-utils, tgt); tests/run.sh installs them.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const INITIATOR: &str = "iqn.2026-11.io.jiva:test-initiator";
const INITIATOR2: &str = "iqn.2026-11.io.jiva:test-initiator-2";

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("jiva-iscsi-test-").tempdir().unwrap()
}

/// A child process stopped with SIGTERM (then SIGKILL) on drop, whose
/// stdout lines arrive on a channel.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl Proc {
    fn spawn(cmd: &mut Command, what: &str) -> Proc {
        let mut child = cmd
            .env("JIVA_LOG", std::env::var("JIVA_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines, what: what.into() }
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest.
    fn line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + MINUTE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_string();
                    }
                }
                Err(_) => panic!("{} printed no line starting with {prefix:?} within 60 s", self.what),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of our own unreaped child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        if wait_timeout(&mut self.child, Duration::from_secs(30)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `jiva up --iscsi`: returns the process, the portal and the IQN.
fn jiva_up(dir: &Path, size: &str, replicas: u32) -> (Proc, String, String) {
    let mut up = Proc::spawn(
        Command::new(JIVA).args(["up", "--dir"]).arg(dir.join("vol")).args([
            "--size",
            size,
            "--replicas",
            &replicas.to_string(),
            "--name",
            "vol",
            "--nbd",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--iscsi",
            "127.0.0.1:0",
        ]),
        "jiva up",
    );
    let iscsi = up.line("iSCSI: ");
    let (portal, iqn) = iscsi.split_once(' ').expect("iSCSI: PORTAL IQN");
    (up, portal.to_string(), iqn.to_string())
}

fn url(portal: &str, iqn: &str, lun: u32) -> String {
    format!("iscsi://{portal}/{iqn}/{lun}")
}

#[test]
fn libiscsi_tools_see_the_volume() {
    for tool in ["iscsi-ls", "iscsi-inq", "iscsi-readcapacity16"] {
        require(tool);
    }
    let dir = tmp();
    let (up, portal, iqn) = jiva_up(dir.path(), "64M", 3);
    assert_eq!(iqn, "iqn.2026-11.io.jiva:vol", "default IQN derives from the volume name");

    // Discovery (SendTargets) and a report of the LUNs.
    let ls =
        run_ok(Command::new("iscsi-ls").args(["-i", INITIATOR, "-s", &format!("iscsi://{portal}")]), MINUTE);
    assert!(ls.contains(&format!("Target:{iqn} Portal:{portal},1")), "{ls}");
    assert!(ls.contains("Lun:0") && ls.contains("DIRECT_ACCESS"), "{ls}");

    let inq = run_ok(Command::new("iscsi-inq").args(["-i", INITIATOR, &url(&portal, &iqn, 0)]), MINUTE);
    assert!(inq.contains("Vendor:JIVA"), "{inq}");
    assert!(inq.contains("Peripheral Device Type:DIRECT_ACCESS"), "{inq}");
    // Serial number and device identification VPD pages (decimal page codes).
    let vpd = |page: &str| {
        run_ok(
            Command::new("iscsi-inq").args(["-i", INITIATOR, "-e", "1", "-c", page, &url(&portal, &iqn, 0)]),
            MINUTE,
        )
    };
    let serial = vpd("128");
    assert!(serial.contains("Unit Serial Number:["), "{serial}");
    let ids = vpd("131");
    assert!(ids.contains("Designator Type:(3) NAA"), "{ids}");
    assert!(ids.contains(&format!("Designator:[{iqn},t,0x0001]")), "{ids}");

    let cap =
        run_ok(Command::new("iscsi-readcapacity16").args(["-i", INITIATOR, &url(&portal, &iqn, 0)]), MINUTE);
    assert!(cap.contains("LOGICAL BLOCK LENGTH IN BYTES:512"), "{cap}");
    assert!(cap.contains("LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT:3"), "{cap}");
    assert!(cap.contains(&format!("Total size:{}", 64 << 20)), "{cap}");
    assert!(cap.contains("LBPME:1"), "thin provisioning advertised: {cap}");

    // A LUN that does not exist is refused.
    let out =
        run_with_timeout(Command::new("iscsi-inq").args(["-i", INITIATOR, &url(&portal, &iqn, 5)]), MINUTE);
    assert!(!out.status.success(), "LUN 5 should not exist");
    drop(up);
}

#[test]
fn qemu_img_convert_and_compare_over_iscsi() {
    require("qemu-img");
    let dir = tmp();
    let (up, portal, iqn) = jiva_up(dir.path(), "48M", 3);
    let img = dir.path().join("src.img");
    // Data with holes: 16 MiB random, 16 MiB zeros, 16 MiB random.
    let mut data = pattern(16 << 20, 1);
    data.extend(vec![0u8; 16 << 20]);
    data.extend(pattern(16 << 20, 2));
    std::fs::write(&img, &data).unwrap();
    let target = url(&portal, &iqn, 0);
    // qemu's iscsi driver is in qemu-block-extra; its absence shows as an
    // unknown protocol.
    let probe = run_with_timeout(Command::new("qemu-img").args(["info", &target]), MINUTE);
    assert!(
        probe.status.success(),
        "qemu-img cannot open {target} (is qemu-block-extra installed?): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let started = Instant::now();
    run_ok(
        Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&img).arg(&target),
        MINUTE,
    );
    let copied = started.elapsed();
    run_ok(
        Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&img).arg(&target),
        MINUTE,
    );
    // And back out into a file, which must equal the source.
    let back = dir.path().join("back.img");
    run_ok(
        Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&target).arg(&back),
        MINUTE,
    );
    assert!(std::fs::read(&back).unwrap() == data, "data read back over iSCSI differs");
    // A changed byte is noticed: compare is not vacuous.
    let mut other = data.clone();
    other[40 << 20] ^= 0xff;
    let changed = dir.path().join("changed.img");
    std::fs::write(&changed, &other).unwrap();
    let out = run_with_timeout(
        Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&changed).arg(&target),
        MINUTE,
    );
    assert_eq!(out.status.code(), Some(1), "qemu-img compare should report the difference");
    eprintln!("qemu-img convert of 48 MiB over iSCSI took {copied:?}");
    drop(up);
}

/// One replica and a controller with CHAP (and mutual CHAP) configured.
fn chap_volume(dir: &Path) -> (Vec<Proc>, String, String) {
    let mut replica = Proc::spawn(
        Command::new(JIVA)
            .args(["replica", "--listen", "127.0.0.1:0", "--dir"])
            .arg(dir.join("r1"))
            .args(["--size", "16M"]),
        "jiva replica",
    );
    let raddr = replica.line("listening on ");
    let mut controller = Proc::spawn(
        Command::new(JIVA)
            .args(["controller", "--name", "vol", "--size", "16M", "--replica", &raddr])
            .args(["--nbd", "127.0.0.1:0", "--iscsi", "127.0.0.1:0", "--iqn", "iqn.2026-11.io.jiva:chap"])
            .args(["--chap-user", "alice", "--chap-target-user", "jiva"])
            .env("JIVA_CHAP_SECRET", "alice-secret-123")
            .env("JIVA_CHAP_TARGET_SECRET", "target-secret-456"),
        "jiva controller",
    );
    let ready = controller.line("ready ");
    let iscsi = ready.split_once(" iscsi ").expect("ready line names the iSCSI portal").1;
    let (portal, iqn) = iscsi.split_once(' ').unwrap();
    (vec![controller, replica], portal.to_string(), iqn.to_string())
}

#[test]
fn chap_wrong_secret_is_refused_right_secret_accepted() {
    require("iscsi-inq");
    let dir = tmp();
    let (procs, portal, iqn) = chap_volume(dir.path());
    let inq = |creds: &str, target: Option<(&str, &str)>| {
        let mut cmd = Command::new("iscsi-inq");
        cmd.args(["-i", INITIATOR, &format!("iscsi://{creds}{portal}/{iqn}/0")]);
        if let Some((user, secret)) = target {
            cmd.env("LIBISCSI_CHAP_TARGET_USERNAME", user).env("LIBISCSI_CHAP_TARGET_PASSWORD", secret);
        }
        run_with_timeout(&mut cmd, MINUTE)
    };
    let ok = |o: &std::process::Output| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Vendor:JIVA")
    };

    assert!(!ok(&inq("", None)), "login without CHAP accepted");
    assert!(!ok(&inq("alice%wrong-secret@", None)), "wrong CHAP secret accepted");
    assert!(!ok(&inq("mallory%alice-secret-123@", None)), "wrong CHAP user accepted");
    let good = inq("alice%alice-secret-123@", None);
    assert!(ok(&good), "right CHAP secret refused: {}", String::from_utf8_lossy(&good.stderr));
    // Mutual CHAP: the initiator checks the target's answer too.
    let mutual = inq("alice%alice-secret-123@", Some(("jiva", "target-secret-456")));
    assert!(ok(&mutual), "mutual CHAP failed: {}", String::from_utf8_lossy(&mutual.stderr));
    assert!(
        !ok(&inq("alice%alice-secret-123@", Some(("jiva", "not-the-target-secret")))),
        "initiator accepted a target that does not know the secret it expects"
    );
    drop(procs);
}

// ---------------------------------------------------------------------------
// Conformance: iscsi-test-cu against ours and against tgtd.

/// tgtd in the foreground on loopback, with one disk LUN on `backing`.
struct Tgtd {
    _proc: Proc,
    control: String,
    portal: String,
}

const TGT_IQN: &str = "iqn.2026-11.io.jiva:tgtd-reference";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Tgtd {
    fn start(backing: &Path) -> Tgtd {
        require("tgtd");
        require("tgtadm");
        // A control port of our own, so we never talk to another tgtd
        // (tgtd accepts up to 32767).
        let control = (20_000 + std::process::id() % 12_000).to_string();
        let port = free_port();
        let portal = format!("127.0.0.1:{port}");
        // Its chatter goes to a log next to the backing file.
        let log = std::fs::File::create(backing.with_extension("tgtd.log")).unwrap();
        let proc = Proc::spawn(
            Command::new("tgtd")
                .args(["-f", "-C", &control, "--iscsi", &format!("portal={portal}")])
                .stderr(log),
            "tgtd",
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&portal).is_err() {
            assert!(Instant::now() < deadline, "tgtd did not listen on {portal}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let t = Tgtd { _proc: proc, control, portal };
        let backing = backing.to_str().expect("UTF-8 path");
        t.adm(&["--mode", "target", "--op", "new", "--tid", "1", "-T", TGT_IQN]);
        t.adm(&["--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1", "-b", backing]);
        t.adm(&["--mode", "target", "--op", "bind", "--tid", "1", "-I", "ALL"]);
        t
    }

    fn adm(&self, args: &[&str]) {
        run_ok(Command::new("tgtadm").args(["-C", &self.control, "--lld", "iscsi"]).args(args), MINUTE);
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        // tgtd ignores SIGTERM; it exits on a system delete once no target
        // is left.
        for args in [
            &["--lld", "iscsi", "--mode", "target", "--op", "delete", "--force", "--tid", "1"][..],
            &["--mode", "system", "--op", "delete"],
        ] {
            let _ = run_with_timeout(Command::new("tgtadm").args(["-C", &self.control]).args(args), MINUTE);
        }
    }
}

/// Runs `iscsi-test-cu -t ALL` and returns test name -> passed.
fn test_cu(url: &str, dataloss: bool) -> BTreeMap<String, bool> {
    let mut cmd = Command::new("iscsi-test-cu");
    cmd.args(["-t", "ALL", "-i", INITIATOR, "-I", INITIATOR2, "-v"]);
    if dataloss {
        cmd.arg("-d");
    }
    cmd.arg(url);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(600));
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let results = parse_test_cu(&text);
    assert!(!results.is_empty(), "iscsi-test-cu against {url} ran no tests:\n{text}");
    results
}

/// Parses CUnit's verbose output: `Suite: S` lines, then for each test
/// `  Test: T ...` followed by messages and `passed` or `FAILED`.
fn parse_test_cu(text: &str) -> BTreeMap<String, bool> {
    let mut results = BTreeMap::new();
    let mut suite = String::new();
    let mut current: Option<(String, bool)> = None;
    let finish = |cur: &mut Option<(String, bool)>, results: &mut BTreeMap<String, bool>| {
        if let Some((name, failed)) = cur.take() {
            results.insert(name, !failed);
        }
    };
    for line in text.lines() {
        if let Some(s) = line.strip_prefix("Suite: ") {
            finish(&mut current, &mut results);
            suite = s.trim().to_string();
        } else if let Some(t) = line.strip_prefix("  Test: ") {
            finish(&mut current, &mut results);
            let name = t.split(" ...").next().unwrap_or(t).trim();
            let failed = t.trim_end().ends_with("...FAILED");
            current = Some((format!("{suite}.{name}"), failed));
        } else if line.starts_with("Run Summary") {
            finish(&mut current, &mut results);
        } else if let Some((_, failed)) = &mut current
            && line.trim() == "FAILED"
        {
            *failed = true;
        }
    }
    finish(&mut current, &mut results);
    results
}

fn passed(r: &BTreeMap<String, bool>) -> usize {
    r.values().filter(|p| **p).count()
}

#[test]
fn parse_test_cu_output() {
    let text = "Suite: A\n  Test: One ...passed\n  Test: Two ...    [FAILED] x\nFAILED\n    1. f.c:1\n\
                Suite: B\n  Test: Three ...FAILED\n  Test: Four ...  [SKIPPED] y\npassed\nRun Summary: x\n";
    let r = parse_test_cu(text);
    assert_eq!(r.len(), 4);
    assert!(r["A.One"] && !r["A.Two"] && !r["B.Three"] && r["B.Four"]);
}

#[test]
fn conformance_suite_ours_passes_every_test_tgtd_passes() {
    require("iscsi-test-cu");
    let dir = tmp();
    let size = "1G";
    let (up, portal, iqn) = jiva_up(dir.path(), size, 3);
    let backing = dir.path().join("tgtd-backing.img");
    std::fs::File::create(&backing).unwrap().set_len(1 << 30).unwrap();
    let tgtd = Tgtd::start(&backing);
    let ours_url = url(&portal, &iqn, 0);
    // tgtd's LUN 0 is its controller; the disk is LUN 1.
    let tgtd_url = url(&tgtd.portal, TGT_IQN, 1);

    let mut report = String::new();
    let mut missing = Vec::new();
    // Without --dataloss first (the suite then skips the tests that write), then with it.
    for dataloss in [false, true] {
        let started = Instant::now();
        let theirs = test_cu(&tgtd_url, dataloss);
        let tgtd_time = started.elapsed();
        let started = Instant::now();
        let ours = test_cu(&ours_url, dataloss);
        let our_time = started.elapsed();
        let mode = if dataloss { "ALL --dataloss" } else { "ALL" };
        report += &format!(
            "iscsi-test-cu {mode}: jiva passed {}/{} ({our_time:.0?}), tgtd passed {}/{} ({tgtd_time:.0?})\n",
            passed(&ours),
            ours.len(),
            passed(&theirs),
            theirs.len()
        );
        // Guard against a vacuous comparison (a broken tgtd setup).
        assert!(theirs.len() >= 200 && passed(&theirs) >= 150, "tgtd run looks broken: {theirs:?}");
        for (name, ok) in &theirs {
            if *ok && ours.get(name) != Some(&true) {
                missing.push(format!("{mode}: {name}"));
            }
        }
        for (name, ok) in &ours {
            if !ok {
                report += &format!("  jiva failed: {name}\n");
            }
        }
    }
    println!("{report}");
    eprintln!("{report}");
    assert!(missing.is_empty(), "tests tgtd passes but jiva fails:\n{}\n{report}", missing.join("\n"));
    drop(tgtd);
    drop(up);
}
