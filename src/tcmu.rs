//! `jiva tcmu`: the TCMU handler for LIO backstores `user:jiva` (see
//! `jiva_tcmu`). `jiva tcmu [serve]` runs the daemon, `jiva tcmu ls` lists
//! the `user:jiva` devices the kernel has, `jiva tcmu check CFGSTRING` checks
//! a cfgstring the way targetcli's `create` does.

use std::io::Write;

use anyhow::{Context, bail};
use jiva_tcmu::config::{SUBTYPE, UioName};
use jiva_tcmu::uio::{self, Backstore};
use serde_json::json;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct TcmuCommand {
    #[command(subcommand)]
    action: Option<TcmuAction>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Subcommand, Debug)]
enum TcmuAction {
    /// Run the handler (same as `jiva tcmu` with no subcommand).
    Serve(ServeArgs),
    /// List the kernel's `user:jiva` devices.
    Ls(LsArgs),
    /// Check a cfgstring (VOLUME@HOST[/PORT]) like targetcli's create does;
    /// exits 1 if it is refused.
    Check(CheckArgs),
}

#[derive(clap::Args, Debug, Default)]
struct ServeArgs {
    /// Do not register on the system D-Bus (targetcli then cannot create
    /// `user:jiva` backstores; writing configfs directly still works).
    #[arg(long)]
    no_dbus: bool,
}

#[derive(clap::Args, Debug)]
struct LsArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// VOLUME@HOST[/PORT], or the full `jiva/VOLUME@HOST[/PORT]`.
    cfgstring: String,
}

pub async fn run(cmd: TcmuCommand) -> anyhow::Result<()> {
    match cmd.action {
        None => serve(cmd.serve).await,
        Some(TcmuAction::Serve(args)) => serve(args).await,
        Some(TcmuAction::Ls(args)) => ls(args),
        Some(TcmuAction::Check(args)) => check(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let opts = jiva_tcmu::handler::Options { no_dbus: args.no_dbus };
    let ready = |n: usize| {
        tracing::info!("TCMU handler {SUBTYPE:?} ready ({n} device(s) reattached)");
        // One line for supervisors and scripts.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ready tcmu {SUBTYPE} devices {n}");
        let _ = out.flush();
    };
    jiva_tcmu::handler::run(opts, ready, crate::signals::terminated()).await.context("TCMU handler")
}

fn ls(args: LsArgs) -> anyhow::Result<()> {
    let devices: Vec<_> = uio::list()
        .context("listing /sys/class/uio")?
        .into_iter()
        .filter(|e| e.name.subtype == SUBTYPE)
        .collect();
    let size = |n: &UioName| Backstore::new(n).size().ok();
    if args.json {
        let v: Vec<_> = devices
            .iter()
            .map(|e| {
                json!({
                    "uio": format!("/dev/uio{}", e.minor),
                    "backstore": format!("user_{}/{}", e.name.hba, e.name.device),
                    "name": e.name.device,
                    "cfgstring": e.name.cfgstring,
                    "size": size(&e.name),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if devices.is_empty() {
        println!("no user:{SUBTYPE} devices");
        return Ok(());
    }
    println!("{:<12} {:<20} {:<14} CFGSTRING", "UIO", "BACKSTORE", "SIZE");
    for e in &devices {
        let s = size(&e.name).map(|s| s.to_string()).unwrap_or_else(|| "?".into());
        println!(
            "{:<12} {:<20} {:<14} {}",
            format!("/dev/uio{}", e.minor),
            format!("user_{}/{}", e.name.hba, e.name.device),
            s,
            e.name.cfgstring
        );
    }
    Ok(())
}

async fn check(args: CheckArgs) -> anyhow::Result<()> {
    let full = if args.cfgstring.starts_with(&format!("{SUBTYPE}/")) {
        args.cfgstring.clone()
    } else {
        format!("{SUBTYPE}/{}", args.cfgstring)
    };
    match jiva_tcmu::dbus::check_config(&full).await {
        Ok(()) => {
            println!("ok: {full}");
            Ok(())
        }
        Err(why) => bail!("cfgstring refused: {why}"),
    }
}
