//! `jiva`: one binary for the whole data plane. `jiva replica` serves one
//! copy of a volume from a directory, `jiva controller` replicates a volume
//! over replicas and presents it through NBD, and `jiva up` starts a
//! complete local volume (N replicas and a controller) in one command.
//! `jiva volume status|clone`, `jiva replica ls|add|rm` and `jiva snapshot
//! create|ls|rm|revert` drive a running controller through its HTTP API.
//! `jiva tcmu` serves LIO backstores `user:jiva` (targetcli) from volumes,
//! as a TCMU handler.

mod api;
mod cli;
mod clone;
mod controller;
mod replica;
mod signals;
mod spin;
#[cfg(feature = "tcmu")]
mod tcmu;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "jiva", version, about = "Replicated block storage: replicas, controller and NBD frontend")]
struct Cli {
    /// Threads running the async runtime; 1 runs everything on the main
    /// thread, which costs the least CPU per I/O on small machines.
    #[arg(long, global = true, default_value_t = 1, env = "JIVA_WORKER_THREADS", value_name = "N")]
    worker_threads: usize,
    /// Microseconds a busy runtime thread polls for more work before it
    /// sleeps (0: never); saves the cost of waking a halted CPU between
    /// requests that follow each other closely.
    #[arg(long, global = true, default_value_t = 200, env = "JIVA_SPIN_US", value_name = "MICROSECONDS")]
    spin_us: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve one replica of a volume from a directory (`jiva replica
    /// --listen .. --dir .. --size ..` or `jiva replica serve ..`), or list,
    /// add and remove a running volume's replicas.
    Replica(ReplicaCommand),
    /// Status of a running volume; clone a snapshot into a new volume.
    #[command(subcommand)]
    Volume(cli::VolumeCommand),
    /// Create, list, delete and revert to snapshots of a running volume.
    #[command(subcommand)]
    Snapshot(cli::SnapshotCommand),
    /// Replicate a volume over replicas and serve it over NBD.
    Controller(controller::Args),
    /// Start a local volume: N replica processes and a controller.
    Up(up::Args),
    /// Serve LIO backstores `user:jiva` (targetcli) from volumes: the TCMU
    /// handler (`jiva tcmu [serve]`), or list devices and check cfgstrings.
    #[cfg(feature = "tcmu")]
    Tcmu(tcmu::TcmuCommand),
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct ReplicaCommand {
    #[command(subcommand)]
    action: Option<ReplicaAction>,
    #[command(flatten)]
    serve: replica::Args,
}

#[derive(Subcommand, Debug)]
enum ReplicaAction {
    /// Serve one replica (same as the flag form `jiva replica --dir ..`).
    Serve(replica::Args),
    /// List the volume's replicas with state and rebuild progress.
    Ls(cli::ApiArgs),
    /// Add a replica (it is rebuilt while I/O continues).
    Add(cli::AddArgs),
    /// Remove a replica.
    Rm(cli::RmArgs),
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("JIVA_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

/// Rust's allocations go to mimalloc (see the feature in Cargo.toml).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Without mimalloc, keeps I/O-sized buffers (up to a few MiB, allocated
/// and freed per request) on glibc's heap and the heap from being trimmed after every burst:
/// glibc's defaults (a threshold that adapts to about the largest freed
/// buffer, and trimming at twice that) made a 1 MiB workload shrink and
/// regrow the heap hundreds of times a second, every regrowth a round of
/// page faults and page clearing. At most `TRIM` bytes of free heap stay
/// mapped.
fn tune_malloc() {
    #[cfg(all(target_env = "gnu", not(feature = "mimalloc")))]
    {
        const MMAP_THRESHOLD: libc::c_int = 8 << 20;
        const TRIM: libc::c_int = 128 << 20;
        // SAFETY: mallopt only adjusts allocator parameters; called before
        // any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM);
        }
    }
}

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    init_logging();
    let epolls_before = spin::epoll_fds();
    let runtime = if cli.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(spin::before_park)
            .on_thread_unpark(spin::after_unpark)
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(cli.worker_threads).enable_all().build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jiva: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The descriptors the runtime just created are the one it sleeps on
    // (and its duplicate for registrations).
    if cli.worker_threads <= 1 && cli.spin_us > 0 {
        let epolls = spin::epoll_fds().difference(&epolls_before).copied().collect();
        spin::enable(epolls, std::time::Duration::from_micros(cli.spin_us));
    }
    let result = runtime.block_on(async {
        match cli.command {
            Command::Replica(ReplicaCommand { action: None, serve }) => replica::run(serve).await,
            Command::Replica(ReplicaCommand { action: Some(action), .. }) => match action {
                ReplicaAction::Serve(args) => replica::run(args).await,
                ReplicaAction::Ls(args) => cli::ls(args).await,
                ReplicaAction::Add(args) => cli::add(args).await,
                ReplicaAction::Rm(args) => cli::rm(args).await,
            },
            Command::Volume(cmd) => cli::volume(cmd).await,
            Command::Snapshot(cmd) => cli::snapshot(cmd).await,
            Command::Controller(args) => controller::run(args).await,
            Command::Up(args) => up::run(args).await,
            #[cfg(feature = "tcmu")]
            Command::Tcmu(cmd) => tcmu::run(cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jiva: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
