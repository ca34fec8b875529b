//! `jiva controller`: attaches to a volume's replicas under a new epoch,
//! reconciles them (newest generation serves, others are rebuilt),
//! replicates I/O over them (`jiva_core::volume`), serves the volume through
//! NBD (snapshots too, read-only, as `NAME@SNAPSHOT`), and its status and
//! replica set through the HTTP API (`--api`).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use jiva_core::remote::{self, RemoteConnector, RemoteOptions};
use jiva_core::shm::ShmPool;
use jiva_core::size::ByteSize;
use jiva_core::view::SnapshotView;
use jiva_core::volume::{Volume, VolumeOptions};
use jiva_core::{BLOCK_SIZE, ErrorKind};
use jiva_nbd::NbdServer;
use tokio::net::TcpListener;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Volume name; also the NBD export name.
    #[arg(long, default_value = "vol")]
    name: String,
    /// Volume size (K/M/G/T suffixes).
    #[arg(long)]
    size: ByteSize,
    /// Replica address; repeat for each replica.
    #[arg(long = "replica", required = true, value_name = "ADDR")]
    replicas: Vec<String>,
    /// Address of the NBD server.
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd: String,
    /// How long to keep retrying replicas that are not up yet.
    #[arg(long, default_value = "30", value_name = "SECONDS")]
    connect_timeout: u64,
    /// Bound on one replica request before the replica counts as failed.
    #[arg(long, default_value = "5", value_name = "SECONDS")]
    request_timeout: u64,
    /// Serve I/O only with at least this many healthy replicas.
    #[arg(long, default_value_t = 1)]
    min_healthy: usize,
    /// How long I/O waits for enough healthy replicas before failing.
    #[arg(long, default_value = "30", value_name = "SECONDS")]
    io_wait: u64,
    /// Heartbeat and reconnect period.
    #[arg(long, default_value = "1000", value_name = "MS")]
    heartbeat_ms: u64,
    /// Start a new generation this often while writes happen (bounds what
    /// an incremental rebuild copies).
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    checkpoint_interval: u64,
    /// Rebuild copy rate limit per replica, bytes per second (K/M/G; 0 = unlimited).
    #[arg(long, default_value = "0", value_name = "RATE")]
    rebuild_rate: ByteSize,
    /// Memory shared with replicas on this machine (`unix:` addresses) for
    /// large WRITE payloads, which they then store without receiving a
    /// copy over the socket (K/M/G; 0 = off).
    #[arg(long, default_value = "64M", value_name = "SIZE")]
    payload_memory: ByteSize,
    /// Never read local replicas' head files directly: every READ goes
    /// over the replica's socket.
    #[arg(long)]
    no_local_reads: bool,
    /// Address of the HTTP/JSON control API (e.g. 127.0.0.1:9500).
    #[arg(long, value_name = "ADDR")]
    api: Option<String>,
    /// Also serve the volume as an iSCSI target on this address (e.g. 127.0.0.1:3260).
    #[arg(long, value_name = "ADDR")]
    iscsi: Option<String>,
    /// iSCSI target name [default: iqn.2026-11.io.jiva:NAME].
    #[arg(long, value_name = "IQN", requires = "iscsi")]
    iqn: Option<String>,
    /// CHAP name iSCSI initiators must log in with (needs a secret).
    #[arg(long, value_name = "USER", requires_all = ["iscsi", "chap_secret"])]
    chap_user: Option<String>,
    /// CHAP secret for --chap-user.
    #[arg(
        long,
        value_name = "SECRET",
        env = "JIVA_CHAP_SECRET",
        hide_env_values = true,
        requires = "chap_user"
    )]
    chap_secret: Option<String>,
    /// Mutual CHAP: the name the target answers initiators' challenges with.
    #[arg(long, value_name = "USER", requires_all = ["chap_user", "chap_target_secret"])]
    chap_target_user: Option<String>,
    /// Mutual CHAP: the target's secret.
    #[arg(
        long,
        value_name = "SECRET",
        env = "JIVA_CHAP_TARGET_SECRET",
        hide_env_values = true,
        requires = "chap_target_user"
    )]
    chap_target_secret: Option<String>,
}

/// Probes a replica until it answers or the deadline passes.
async fn probe_until(
    addr: &str,
    deadline: Instant,
    opts: &RemoteOptions,
) -> anyhow::Result<jiva_core::wire::HelloReply> {
    loop {
        match remote::probe(addr, opts).await {
            Ok(reply) => return Ok(reply),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("replica {addr} not ready: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("replica {addr} did not answer")),
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let size = args.size.bytes();
    if size == 0 || !size.is_multiple_of(u64::from(BLOCK_SIZE)) {
        bail!("--size must be a positive multiple of {BLOCK_SIZE} bytes");
    }
    let opts = RemoteOptions {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(args.request_timeout.max(1)),
        local_reads: !args.no_local_reads,
    };
    let deadline = Instant::now() + Duration::from_secs(args.connect_timeout);

    // Take the volume over with an epoch newer than any replica has seen,
    // which fences any controller still running with an older one. Wait
    // for every replica until the deadline, then go on with those that
    // answered (the volume refuses to start if any of them may be stale).
    let mut epoch = 0;
    let mut reachable = 0;
    for addr in &args.replicas {
        let info = match probe_until(addr, deadline, &opts).await {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!("{e:#}");
                continue;
            }
        };
        if let Some(err) = info.error() {
            return Err(err).with_context(|| format!("replica {addr} refused the probe"));
        }
        if info.flags & jiva_core::wire::HELLO_BOUND != 0 && info.volume != args.name {
            bail!("replica {addr} belongs to volume {:?}, not {:?}", info.volume, args.name);
        }
        if info.size != size {
            bail!("replica {addr} has size {} but the volume has {}", ByteSize(info.size), args.size);
        }
        epoch = epoch.max(info.epoch);
        reachable += 1;
    }
    if reachable == 0 {
        bail!("no replica answered within {} s", args.connect_timeout);
    }
    let epoch = epoch + 1;
    let vopts = VolumeOptions {
        min_healthy: args.min_healthy.max(1),
        io_wait: Duration::from_secs(args.io_wait),
        heartbeat: Duration::from_millis(args.heartbeat_ms.max(10)),
        checkpoint_interval: Duration::from_secs(args.checkpoint_interval.max(1)),
        rebuild_rate: args.rebuild_rate.bytes(),
        ..VolumeOptions::default()
    };
    let local = args.replicas.iter().any(|a| a.starts_with(remote::UNIX_PREFIX));
    let shm = match args.payload_memory.bytes() {
        0 => None,
        _ if !local => None,
        n => match ShmPool::new(usize::try_from(n).unwrap_or(usize::MAX)) {
            Ok(pool) => Some(pool),
            Err(e) => {
                tracing::warn!("no shared payload memory ({e}); payloads go over the sockets");
                None
            }
        },
    };
    let connector = RemoteConnector { volume: args.name.clone(), size, opts, shm };
    let volume = loop {
        match Volume::open(args.name.clone(), size, epoch, connector.clone(), &args.replicas, vopts.clone())
            .await
        {
            Ok(v) => break v,
            Err(e) if e.kind() == ErrorKind::Unavailable && Instant::now() < deadline => {
                tracing::warn!("waiting for replicas: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("opening the volume"),
        }
    };

    let api = match &args.api {
        Some(addr) => {
            let l = TcpListener::bind(addr).await.with_context(|| format!("API listen on {addr}"))?;
            Some(l)
        }
        None => None,
    };
    let listener =
        TcpListener::bind(&args.nbd).await.with_context(|| format!("NBD listen on {}", args.nbd))?;
    let nbd_addr = listener.local_addr()?;
    let iscsi = match &args.iscsi {
        Some(addr) => {
            let l = TcpListener::bind(addr).await.with_context(|| format!("iSCSI listen on {addr}"))?;
            let iqn = args.iqn.clone().unwrap_or_else(|| jiva_iscsi::default_iqn(&args.name));
            let mut target = jiva_iscsi::IscsiTarget::new(volume.clone(), iqn)
                .with_identity(jiva_scsi::Identity::for_volume(&args.name))
                .with_alias(args.name.clone());
            if let (Some(user), Some(secret)) = (&args.chap_user, &args.chap_secret) {
                target = target.with_chap(user.clone(), secret.clone());
            }
            if let (Some(user), Some(secret)) = (&args.chap_target_user, &args.chap_target_secret) {
                target = target.with_mutual_chap(user.clone(), secret.clone());
            }
            Some((l.local_addr()?, Arc::new(target), l))
        }
        None => None,
    };
    let server = Arc::new(
        NbdServer::new(volume.clone(), args.name.clone())
            .with_exports(Arc::new(SnapshotExports { volume: volume.clone(), name: args.name.clone() })),
    );
    let api = match api {
        Some(l) => {
            let local = l.local_addr()?;
            // Revert needs to know whether a client could see the change.
            let nbd_clients = server.client_counter();
            let iscsi_target = iscsi.as_ref().map(|(_, t, _)| t.clone());
            let clients: crate::api::Clients = Arc::new(move || {
                nbd_clients.load(std::sync::atomic::Ordering::SeqCst)
                    + iscsi_target.as_ref().map_or(0, |t| t.session_count())
            });
            tokio::spawn(crate::api::serve(l, volume.clone(), clients));
            Some(local)
        }
        None => None,
    };
    tracing::info!(
        volume = %args.name, size = %args.size, replicas = args.replicas.len(), epoch, api = ?api,
        "controller serving NBD on {nbd_addr}"
    );
    {
        // The first stdout line tells a supervisor (`jiva up`) we are ready,
        // and where the NBD server and the API are.
        let mut out = std::io::stdout().lock();
        match api {
            Some(api) => write!(out, "ready nbd://{nbd_addr}/{} api http://{api}", args.name)?,
            None => write!(out, "ready nbd://{nbd_addr}/{}", args.name)?,
        }
        if let Some((addr, target, _)) = &iscsi {
            write!(out, " iscsi {addr} {}", target.iqn())?;
        }
        writeln!(out)?;
        out.flush()?;
    }
    // One stop signal for both frontends.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::signals::terminated().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let nbd = server.serve(listener, stopped(stop_rx.clone()));
    let iscsi = async {
        match iscsi {
            Some((addr, target, l)) => {
                tracing::info!("serving iSCSI target {} on {addr}", target.iqn());
                target.serve(l, stopped(stop_rx.clone())).await
            }
            None => Ok(()),
        }
    };
    let (nbd, iscsi) = tokio::join!(nbd, iscsi);
    nbd?;
    iscsi.context("iSCSI target")?;

    tracing::info!("stopping: flushing replicas");
    if let Err(e) = volume.shutdown().await {
        tracing::warn!("final flush failed: {e}");
    }
    Ok(())
}

/// The volume's snapshots as NBD exports `NAME@SNAPSHOT` (read-only).
struct SnapshotExports {
    volume: Arc<Volume<RemoteConnector>>,
    name: String,
}

impl jiva_nbd::Exports for SnapshotExports {
    type Device = SnapshotView<RemoteConnector>;

    async fn names(&self) -> Vec<String> {
        let list = self.volume.snapshots().await.unwrap_or_default();
        list.into_iter().filter(|s| !s.merging).map(|s| format!("{}@{}", self.name, s.name)).collect()
    }

    async fn open(&self, export: &str) -> Option<Arc<Self::Device>> {
        let snapshot = export.strip_prefix(&self.name)?.strip_prefix('@')?;
        let list = self.volume.snapshots().await.ok()?;
        list.iter()
            .any(|s| s.name == snapshot)
            .then(|| Arc::new(SnapshotView::new(self.volume.clone(), snapshot)))
    }
}
