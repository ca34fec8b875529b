//! `jiva up`: a complete local volume in one command. Starts N replica
//! processes (each in DIR/replica-K) and one controller on loopback, prints
//! the NBD URI, and stays in the foreground until Ctrl-C or SIGTERM, then
//! stops the controller (which flushes) and the replicas (which close their
//! stores cleanly). Running it again with the same DIR reopens the volume.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
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
    let mut replicas = Vec::new();
    let mut addrs = Vec::new();
    for k in 1..=args.replicas {
        let dir = args.dir.join(format!("replica-{k}"));
        let mut a = vec![
            "replica".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--size".into(),
            size.clone(),
        ];
        if let Some(engine) = args.io_engine {
            a.extend(["--io-engine".to_string(), engine.to_string()]);
        }
        let started = start(format!("replica-{k}"), &a, "listening on ").await;
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
    ];
    for addr in &addrs {
        a.extend(["--replica".to_string(), addr.clone()]);
    }
    let (mut controller, uri) = match start("controller".into(), &a, "ready ").await {
        Ok(x) => x,
        Err(e) => {
            for s in replicas {
                stop(s, Duration::from_secs(10)).await;
            }
            return Err(e);
        }
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
    println!("attach:  nbd-client {host} {port} /dev/nbd0 -N {}", args.name);
    println!("stop:    Ctrl-C");

    let outcome = tokio::select! {
        _ = crate::signals::terminated() => Ok(()),
        status = controller.child.wait() => Err(anyhow::anyhow!(
            "controller exited unexpectedly ({})", status.map(|s| s.to_string()).unwrap_or_default()
        )),
    };
    tracing::info!("stopping volume {}", args.name);
    stop(controller, Duration::from_secs(30)).await;
    for s in replicas {
        stop(s, Duration::from_secs(30)).await;
    }
    outcome
}
