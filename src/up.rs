//! `jiva up`: a complete local volume in one command. Starts N replica
//! processes (each in DIR/replica-K) and one controller on loopback, prints
//! the NBD URI and the control API address, and stays in the foreground
//! until Ctrl-C or SIGTERM, then stops the controller (which flushes) and
//! the replicas (which close their stores cleanly). A replica process that
//! dies is restarted on the same directory and address, so the controller
//! reconnects and rebuilds it. The controller reaches each replica over a
//! Unix domain socket in its directory (DIR/replica-K/replica.sock), or
//! with `--tcp-replicas` (or a directory path too long for a socket) over
//! loopback TCP on a port chosen once and kept in DIR/ports.
//! Running it again with the same DIR reopens the volume.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use jiva_core::remote::UNIX_PREFIX;
use jiva_core::size::ByteSize;
use jiva_replica::EngineKind;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory for the replicas' data (DIR/replica-1, ...).
    #[arg(long, default_value = "./data")]
    dir: PathBuf,
    /// Volume size (K/M/G/T suffixes).
    #[arg(long, default_value = "1G")]
    size: ByteSize,
    /// Number of replicas.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    replicas: u32,
    /// Volume name; also the NBD export name.
    #[arg(long, default_value = "vol")]
    name: String,
    /// NBD listen address.
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd: String,
    /// I/O engine for the replicas.
    #[arg(long, value_name = "uring|sync")]
    io_engine: Option<EngineKind>,
    /// Replicas keep their data files out of the page cache (O_DIRECT).
    #[arg(long)]
    direct_io: bool,
    /// Control API listen address (`jiva volume status` etc. use it).
    #[arg(long, default_value = "127.0.0.1:9500")]
    api: String,
    /// Serve I/O only with at least this many healthy replicas.
    #[arg(long, default_value_t = 1)]
    min_healthy: usize,
    /// Rebuild copy rate limit per replica, bytes per second (0 = unlimited).
    #[arg(long, default_value = "0", value_name = "RATE")]
    rebuild_rate: ByteSize,
    /// Start a new generation this often while writes happen.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    checkpoint_interval: u64,
    /// Do not restart replica processes that exit.
    #[arg(long)]
    no_restart: bool,
    /// Also serve the volume as an iSCSI target on this address.
    #[arg(long, value_name = "ADDR")]
    iscsi: Option<String>,
    /// Connect the controller to the replicas over loopback TCP instead of
    /// Unix domain sockets.
    #[arg(long)]
    tcp_replicas: bool,
    /// Make the controller read every block over the replicas' sockets,
    /// never from a local replica's head files directly.
    #[arg(long)]
    no_local_reads: bool,
}

/// Longest socket path we use (`sun_path` holds 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 100;

/// The replicas' listen addresses, chosen on the first run and kept in
/// DIR/ports so that a restarted replica comes back where the controller
/// looks for it.
fn replica_addrs(dir: &std::path::Path, n: u32) -> anyhow::Result<Vec<String>> {
    let path = dir.join("ports");
    let mut addrs: Vec<String> = std::fs::read_to_string(&path)
        .map(|s| s.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
        .unwrap_or_default();
    let before = addrs.len();
    while addrs.len() < n as usize {
        // Ask the kernel for a free loopback port, then release it for the replica.
        let l = std::net::TcpListener::bind("127.0.0.1:0").context("picking a replica port")?;
        let addr = l.local_addr()?.to_string();
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.len() != before {
        let tmp = dir.join("ports.tmp");
        std::fs::write(&tmp, addrs.join("\n") + "\n")
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    }
    addrs.truncate(n as usize);
    Ok(addrs)
}

/// A child process that announced itself with one stdout line.
struct Started {
    child: Child,
    what: String,
}

/// Spawns `jiva ARGS...` and waits for its first stdout line, which must
/// start with `prefix`; returns the rest of that line.
async fn start(what: String, args: &[String], prefix: &str) -> anyhow::Result<(Started, String)> {
    let exe = std::env::current_exe().context("locating the jiva binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
    // Own process group: a terminal's Ctrl-C reaches only `jiva up`, which
    // then stops the children in order (controller first, so it flushes).
    cmd.process_group(0);
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls prctl, which is async-signal-safe. It makes the child get
    // SIGTERM (a clean stop) if `jiva up` dies without stopping it.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
    let line = match first {
        Ok(Ok(Some(line))) => line,
        Ok(Ok(None)) | Ok(Err(_)) => {
            let status = child.wait().await.ok();
            bail!("{what} exited during start-up ({})", status.map(|s| s.to_string()).unwrap_or_default());
        }
        Err(_) => bail!("{what} did not start within 60 s"),
    };
    let Some(rest) = line.strip_prefix(prefix) else {
        bail!("{what} printed an unexpected first line: {line:?}");
    };
    let rest = rest.trim().to_string();
    // Keep draining its stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((Started { child, what }, rest))
}

/// Asks a child to stop with SIGTERM, waits, and kills it after a grace period.
async fn stop(mut s: Started, grace: Duration) {
    if let Some(pid) = s.child.id() {
        // SAFETY: plain kill(2) on the pid of a child we have not reaped yet.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    match tokio::time::timeout(grace, s.child.wait()).await {
        Ok(Ok(status)) if status.success() => tracing::debug!("{} stopped", s.what),
        Ok(Ok(status)) => tracing::warn!("{} stopped with {status}", s.what),
        Ok(Err(e)) => tracing::warn!("waiting for {}: {e}", s.what),
        Err(_) => {
            tracing::warn!("{} did not stop within {grace:?}; killing it", s.what);
            let _ = s.child.kill().await;
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let size = args.size.bytes().to_string();
    let listen = replica_addrs(&args.dir, args.replicas)?;
    let mut replica_args = Vec::new();
    for (k, addr) in (1..=args.replicas).zip(&listen) {
        let dir = args.dir.join(format!("replica-{k}"));
        // The controller is on this machine: a Unix domain socket costs far
        // less per message than loopback TCP. TCP when the path is too long
        // for a socket address.
        let sock = std::path::absolute(dir.join("replica.sock"))?;
        let addr = match sock.to_str() {
            Some(p) if !args.tcp_replicas && p.len() < MAX_SOCKET_PATH => format!("{UNIX_PREFIX}{p}"),
            _ => addr.clone(),
        };
        let mut a = vec![
            "replica".to_string(),
            "--listen".into(),
            addr,
            "--dir".into(),
            dir.display().to_string(),
            "--size".into(),
            size.clone(),
        ];
        if let Some(engine) = args.io_engine {
            a.extend(["--io-engine".to_string(), engine.to_string()]);
        }
        if args.direct_io {
            a.push("--direct-io".to_string());
        }
        replica_args.push(a);
    }
    let mut replicas = Vec::new();
    let mut addrs = Vec::new();
    for (k, a) in (1..=args.replicas).zip(&replica_args) {
        let started = start(format!("replica-{k}"), a, "listening on ").await;
        match started {
            Ok((s, addr)) => {
                replicas.push(s);
                addrs.push(addr);
            }
            Err(e) => {
                for s in replicas {
                    stop(s, Duration::from_secs(10)).await;
                }
                return Err(e);
            }
        }
    }
    let mut a = vec![
        "controller".to_string(),
        "--name".into(),
        args.name.clone(),
        "--size".into(),
        size.clone(),
        "--nbd".into(),
        args.nbd.clone(),
        "--api".into(),
        args.api.clone(),
        "--min-healthy".into(),
        args.min_healthy.to_string(),
        "--rebuild-rate".into(),
        args.rebuild_rate.bytes().to_string(),
        "--checkpoint-interval".into(),
        args.checkpoint_interval.to_string(),
    ];
    for addr in &addrs {
        a.extend(["--replica".to_string(), addr.clone()]);
    }
    if let Some(iscsi) = &args.iscsi {
        a.extend(["--iscsi".to_string(), iscsi.clone()]);
    }
    if args.no_local_reads {
        a.push("--no-local-reads".into());
    }
    let (mut controller, ready) = match start("controller".into(), &a, "ready ").await {
        Ok(x) => x,
        Err(e) => {
            for s in replicas {
                stop(s, Duration::from_secs(10)).await;
            }
            return Err(e);
        }
    };
    // "... iscsi ADDR IQN" comes last on the controller's ready line.
    let (ready, iscsi) = match ready.split_once(" iscsi ") {
        Some((rest, iscsi)) => (rest.to_string(), Some(iscsi.trim().to_string())),
        None => (ready, None),
    };
    let (uri, api) = match ready.split_once(" api ") {
        Some((uri, api)) => (uri.trim().to_string(), api.trim().to_string()),
        None => (ready.clone(), String::new()),
    };
    let nbd_addr = uri.trim_start_matches("nbd://").split('/').next().unwrap_or_default().to_string();
    let (host, port) = nbd_addr.rsplit_once(':').unwrap_or((nbd_addr.as_str(), "10809"));
    println!(
        "volume {} is up: {}, {} replica(s) in {}",
        args.name,
        args.size,
        args.replicas,
        args.dir.display()
    );
    println!("NBD URI: {uri}");
    println!("API: {api}");
    println!("attach:  nbd-client {host} {port} /dev/nbd0 -N {}", args.name);
    if let Some((portal, iqn)) = iscsi.as_deref().and_then(|i| i.split_once(' ')) {
        println!("iSCSI: {portal} {iqn}");
        println!(
            "attach:  iscsiadm -m discovery -t st -p {portal} && iscsiadm -m node -T {iqn} -p {portal} --login"
        );
    }
    println!("stop:    Ctrl-C");

    let mut check = tokio::time::interval(Duration::from_millis(200));
    let outcome = loop {
        tokio::select! {
            _ = crate::signals::terminated() => break Ok(()),
            status = controller.child.wait() => break Err(anyhow::anyhow!(
                "controller exited unexpectedly ({})", status.map(|s| s.to_string()).unwrap_or_default()
            )),
            _ = check.tick(), if !args.no_restart => {
                for (i, r) in replicas.iter_mut().enumerate() {
                    let Ok(Some(status)) = r.child.try_wait() else { continue };
                    tracing::warn!("{} exited ({status}); restarting it", r.what);
                    match start(r.what.clone(), &replica_args[i], "listening on ").await {
                        Ok((s, _)) => *r = s,
                        Err(e) => tracing::warn!("restarting {} failed: {e:#}; will retry", r.what),
                    }
                }
            }
        }
    };
    tracing::info!("stopping volume {}", args.name);
    stop(controller, Duration::from_secs(30)).await;
    for s in replicas {
        stop(s, Duration::from_secs(30)).await;
    }
    outcome
}
