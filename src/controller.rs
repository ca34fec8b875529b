//! `jiva controller`: attaches to a volume's replicas under a new epoch,
//! replicates I/O over them (`jiva_core::volume`), and serves the volume
//! through NBD.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use jiva_core::remote::{self, RemoteOptions, RemoteReplica};
use jiva_core::size::ByteSize;
use jiva_core::volume::Volume;
use jiva_core::{BLOCK_SIZE, BlockDevice};
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
    /// Bound on one replica request before it counts as failed.
    #[arg(long, default_value = "30", value_name = "SECONDS")]
    request_timeout: u64,
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
    };
    let deadline = Instant::now() + Duration::from_secs(args.connect_timeout);

    // Take the volume over with an epoch newer than any replica has seen,
    // which fences any controller still running with an older one.
    let mut epoch = 0;
    for addr in &args.replicas {
        let info = probe_until(addr, deadline, &opts).await?;
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
    }
    let epoch = epoch + 1;
    let mut members = Vec::new();
    for addr in &args.replicas {
        let r = RemoteReplica::connect(addr, &args.name, size, epoch, opts)
            .await
            .with_context(|| format!("attaching replica {addr}"))?;
        members.push((addr.clone(), r));
    }
    let volume = Arc::new(Volume::new(args.name.clone(), size, members)?);

    let listener =
        TcpListener::bind(&args.nbd).await.with_context(|| format!("NBD listen on {}", args.nbd))?;
    let nbd_addr = listener.local_addr()?;
    tracing::info!(
        volume = %args.name, size = %args.size, replicas = args.replicas.len(), epoch,
        "controller serving NBD on {nbd_addr}"
    );
    {
        // The first stdout line tells a supervisor (`jiva up`) we are ready.
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready nbd://{nbd_addr}/{}", args.name)?;
        out.flush()?;
    }
    let server = Arc::new(NbdServer::new(volume.clone(), args.name.clone()));
    server.serve(listener, crate::signals::terminated()).await?;

    tracing::info!("stopping: flushing replicas");
    if let Err(e) = volume.flush().await {
        tracing::warn!("final flush failed: {e}");
    }
    Ok(())
}
