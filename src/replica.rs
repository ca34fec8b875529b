//! `jiva replica`: one copy of a volume, kept in a directory and served to
//! a controller over the replica wire protocol.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use jiva_core::size::ByteSize;
use jiva_replica::server::{Faults, ReplicaServer};
use jiva_replica::{EngineKind, Store, StoreOptions};
use std::os::unix::fs::FileTypeExt;

use jiva_core::remote::UNIX_PREFIX;
use tokio::net::{TcpListener, UnixListener};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on for controllers (port 0 picks a free port), or
    /// `unix:/path` for a Unix domain socket (controllers on this machine).
    #[arg(long, default_value = "127.0.0.1:9502")]
    listen: String,
    /// Directory holding this replica's data (created if missing).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Volume size (K/M/G/T suffixes); must match an existing store.
    #[arg(long)]
    size: Option<ByteSize>,
    /// I/O engine; by default io_uring, falling back to pread/pwrite.
    #[arg(long, value_name = "uring|sync")]
    io_engine: Option<EngineKind>,
    /// Keep the data files out of the page cache (O_DIRECT): cheaper writes
    /// and faster rebuilds; reads always go to the device.
    #[arg(long)]
    direct_io: bool,
}

/// Test-only fault injection: reads of these blocks (`A-B,C,...`) fail with EIO.
const FAULT_ENV: &str = "JIVA_TEST_FAULT_EIO_BLOCKS";

pub async fn run(args: Args) -> anyhow::Result<()> {
    let (Some(dir), Some(size)) = (args.dir.clone(), args.size) else {
        anyhow::bail!("`jiva replica` needs --dir and --size (or a subcommand: ls, add, rm, serve)");
    };
    let args =
        Resolved { listen: args.listen, dir, size, io_engine: args.io_engine, direct_io: args.direct_io };
    let faults = match std::env::var(FAULT_ENV) {
        Ok(spec) => Faults::parse(&spec).map_err(|e| anyhow::anyhow!("{FAULT_ENV}: {e}"))?,
        Err(_) => Faults::default(),
    };
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let store = Store::open(
        &args.dir,
        args.size.bytes(),
        StoreOptions { engine: args.io_engine, direct_io: args.direct_io },
    )
    .await
    .with_context(|| format!("opening replica store in {}", args.dir.display()))?;
    let store = Arc::new(store);
    let listener = match args.listen.strip_prefix(UNIX_PREFIX) {
        Some(path) => {
            // A socket file left by a previous run of this replica (the
            // store directory is ours alone) would make bind fail.
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                std::fs::remove_file(path).with_context(|| format!("removing stale socket {path}"))?;
            }
            let l = UnixListener::bind(path).with_context(|| format!("listening on {}", args.listen))?;
            Listener::Unix(l, args.listen.clone())
        }
        None => {
            let l = TcpListener::bind(&args.listen)
                .await
                .with_context(|| format!("listening on {}", args.listen))?;
            let addr = l.local_addr()?.to_string();
            Listener::Tcp(l, addr)
        }
    };
    let addr = match &listener {
        Listener::Tcp(_, a) | Listener::Unix(_, a) => a.clone(),
    };
    tracing::info!(dir = %args.dir.display(), size = %args.size, engine = %store.engine(), "replica serving on {addr}");
    // The first stdout line tells a supervisor (`jiva up`) where we listen.
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {addr}")?;
        out.flush()?;
    }
    let server = Arc::new(ReplicaServer::new(store.clone()).with_faults(faults));
    match listener {
        Listener::Tcp(l, _) => server.serve(l, crate::signals::terminated()).await?,
        Listener::Unix(l, _) => server.serve_unix(l, crate::signals::terminated()).await?,
    }
    tracing::info!("stopping: flushing and closing the store");
    store.close().await.context("closing the store")?;
    Ok(())
}

enum Listener {
    Tcp(TcpListener, String),
    Unix(UnixListener, String),
}

struct Resolved {
    listen: String,
    dir: PathBuf,
    size: ByteSize,
    io_engine: Option<EngineKind>,
    direct_io: bool,
}
