//! The control commands that talk to a running controller's API:
//! `jiva volume status|clone`, `jiva replica ls|add|rm`, `jiva snapshot
//! create|ls|rm|revert`. Human-readable tables by default, the API's JSON
//! with `--json`; `replica add --wait` and `volume clone` show progress
//! (a bar when stdout is a terminal).

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, bail};
use jiva_core::size::ByteSize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where the controller's API is.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// Controller API address (`jiva up` serves it on 127.0.0.1:9500 by default).
    #[arg(long, env = "JIVA_API", default_value = "127.0.0.1:9500", value_name = "ADDR")]
    api: String,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum VolumeCommand {
    /// Volume state, generation and replicas.
    Status(ApiArgs),
    /// Make a new volume whose contents are SNAPSHOT (serve it with
    /// `jiva up --dir DIR --name NEW --replicas N`).
    Clone(CloneArgs),
}

#[derive(clap::Args, Debug)]
pub struct CloneArgs {
    /// The snapshot to clone.
    snapshot: String,
    /// Name of the new volume.
    #[arg(long)]
    name: String,
    /// Directory of the new volume [default: ./NAME], on the controller's host.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Replica stores to create in it.
    #[arg(long, default_value_t = 3)]
    replicas: u32,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Snapshot the volume (crash-consistent across replicas); reports the I/O pause.
    Create(SnapshotArgs),
    /// List snapshots: name, created, parent, size of data unique to it, kind.
    Ls(ApiArgs),
    /// Delete a snapshot; its data merges into its child and the space is reclaimed.
    Rm(SnapshotArgs),
    /// Make the volume's contents the snapshot's (clients detached or I/O paused).
    Revert(RevertArgs),
}

#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// Snapshot name (letters, digits, '.', '_', '-').
    name: String,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Args, Debug)]
pub struct RevertArgs {
    /// Snapshot to revert to.
    name: String,
    /// Pause the volume's I/O for the revert (clients must drop their caches after it).
    #[arg(long)]
    pause: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// Replica address (HOST:PORT) of a running `jiva replica`.
    address: String,
    /// Wait until the replica is healthy (progress bar on a terminal).
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Args, Debug)]
pub struct RmArgs {
    /// Replica address as listed by `jiva replica ls`.
    address: String,
    #[command(flatten)]
    api: ApiArgs,
}

/// One HTTP/1.1 request over loopback (Connection: close); returns status and body.
async fn http(addr: &str, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<(u16, Value)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to the controller API at {addr}"))?
        .with_context(|| {
            format!("connecting to the controller API at {addr} (is the controller running with --api?)")
        })?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{payload}",
        payload.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .context("API timed out")??;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").context("malformed API response")?;
    let status: u16 =
        head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("malformed API status line")?;
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_string() };
    let value = if body.trim().is_empty() { Value::Null } else { serde_json::from_str(&body)? };
    Ok((status, value))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

async fn get_ok(api: &str, path: &str) -> anyhow::Result<Value> {
    let (status, v) = http(api, "GET", path, None).await?;
    if status != 200 {
        bail!("API error {status}: {}", v["error"].as_str().unwrap_or(""));
    }
    Ok(v)
}

fn print_replicas(replicas: &Value) {
    // As wide as the longest address (`unix:` paths are long), at least 24.
    let width = replicas
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["address"].as_str().map_or(0, str::len))
        .fold(24, usize::max);
    println!(
        "{:<width$} {:<11} {:<17} {:>9} {:>9} {:>7}  REBUILD",
        "ADDRESS", "STATE", "STORE", "READS", "WRITES", "ERRORS"
    );
    for r in replicas.as_array().into_iter().flatten() {
        let rebuild = match &r["rebuild"] {
            Value::Null => String::new(),
            rb => {
                let (done, total) =
                    (rb["done_bytes"].as_u64().unwrap_or(0), rb["total_bytes"].as_u64().unwrap_or(0));
                let pct = (done * 100).checked_div(total).unwrap_or(0);
                format!(
                    "{pct}% of {} from {} ({}/s)",
                    ByteSize(total),
                    rb["source"].as_str().unwrap_or("?"),
                    ByteSize(rb["rate_bytes_per_sec"].as_f64().unwrap_or(0.0) as u64)
                )
            }
        };
        println!(
            "{:<width$} {:<11} {:<17} {:>9} {:>9} {:>7}  {}",
            r["address"].as_str().unwrap_or(""),
            r["state"].as_str().unwrap_or(""),
            r["store_id"].as_str().unwrap_or("-"),
            r["reads"].as_u64().unwrap_or(0),
            r["writes"].as_u64().unwrap_or(0),
            r["errors"].as_u64().unwrap_or(0),
            rebuild
        );
    }
}

pub async fn volume(cmd: VolumeCommand) -> anyhow::Result<()> {
    let a = match cmd {
        VolumeCommand::Status(a) => a,
        VolumeCommand::Clone(c) => return clone(c).await,
    };
    let v = get_ok(&a.api, "/v1/volume").await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "volume {}: {}, {} of {} replica(s) healthy (minimum {}), size {}, epoch {}, generation {}",
        v["name"].as_str().unwrap_or(""),
        v["state"].as_str().unwrap_or(""),
        v["healthy"],
        v["replicas"].as_array().map_or(0, |r| r.len()),
        v["min_healthy"],
        ByteSize(v["size"].as_u64().unwrap_or(0)),
        v["epoch"],
        v["generation"]
    );
    print_replicas(&v["replicas"]);
    Ok(())
}

pub async fn ls(a: ApiArgs) -> anyhow::Result<()> {
    let v = get_ok(&a.api, "/v1/replicas").await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_replicas(&v);
    }
    Ok(())
}

pub async fn add(a: AddArgs) -> anyhow::Result<()> {
    let (status, v) =
        http(&a.api.api, "POST", "/v1/replicas", Some(&serde_json::json!({ "address": a.address }))).await?;
    if status != 201 {
        bail!("cannot add {}: {}", a.address, v["error"].as_str().unwrap_or("unknown error"));
    }
    if a.api.json {
        println!("{v}");
    } else {
        println!("added replica {}", a.address);
    }
    if a.wait {
        wait_healthy(&a.api.api, &a.address).await?;
    }
    Ok(())
}

/// Polls until `addr` is healthy, with a progress bar on a terminal.
async fn wait_healthy(api: &str, addr: &str) -> anyhow::Result<()> {
    let bar = std::io::stdout().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "rebuild {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    loop {
        let list = get_ok(api, "/v1/replicas").await?;
        let r = list.as_array().into_iter().flatten().find(|r| r["address"] == addr).cloned();
        let Some(r) = r else { bail!("replica {addr} is no longer part of the volume") };
        if r["state"] == "healthy" {
            if let Some(bar) = &bar {
                bar.finish_with_message("healthy");
            } else {
                println!("replica {addr} is healthy");
            }
            return Ok(());
        }
        if let (Some(bar), Value::Object(rb)) = (&bar, &r["rebuild"]) {
            bar.set_length(rb.get("total_bytes").and_then(Value::as_u64).unwrap_or(0));
            bar.set_position(rb.get("done_bytes").and_then(Value::as_u64).unwrap_or(0));
            bar.set_message(format!("from {}", rb.get("source").and_then(Value::as_str).unwrap_or("?")));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn rm(a: RmArgs) -> anyhow::Result<()> {
    let (status, v) = http(&a.api.api, "DELETE", &format!("/v1/replicas/{}", a.address), None).await?;
    if status != 200 {
        bail!("cannot remove {}: {}", a.address, v["error"].as_str().unwrap_or("unknown error"));
    }
    if a.api.json {
        println!("{v}");
    } else {
        println!("removed replica {}", a.address);
    }
    Ok(())
}

/// Sends a request; the body on a 2xx status, else the API's error.
async fn call(
    api: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    what: &str,
) -> anyhow::Result<Value> {
    let (status, v) = http(api, method, path, body).await?;
    if !(200..300).contains(&status) {
        bail!("{what}: {}", v["error"].as_str().unwrap_or("unknown error"));
    }
    Ok(v)
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `created_ms` as UTC `YYYY-MM-DD HH:MM:SS`.
fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

pub async fn snapshot(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create(a) => {
            let body = serde_json::json!({ "name": a.name });
            let v = call(
                &a.api.api,
                "POST",
                "/v1/snapshots",
                Some(&body),
                &format!("cannot create snapshot {}", a.name),
            )
            .await?;
            if a.api.json {
                return print_json(&v);
            }
            println!(
                "created snapshot {} on {} replica(s); writes paused {:.1} ms (waited {:.1} ms for writes in flight)",
                a.name,
                v["replicas"].as_array().map_or(0, Vec::len),
                v["pause_ms"].as_f64().unwrap_or(0.0),
                v["fence_wait_ms"].as_f64().unwrap_or(0.0)
            );
        }
        SnapshotCommand::Ls(a) => {
            let v = call(&a.api, "GET", "/v1/snapshots", None, "cannot list snapshots").await?;
            if a.json {
                return print_json(&v);
            }
            println!("{:<24} {:<19} {:<24} {:>10}  {:<6}", "NAME", "CREATED (UTC)", "PARENT", "SIZE", "KIND");
            for s in v.as_array().into_iter().flatten() {
                let kind = s["kind"].as_str().unwrap_or("");
                println!(
                    "{:<24} {:<19} {:<24} {:>10}  {}{}",
                    s["name"].as_str().unwrap_or(""),
                    format_time(s["created_ms"].as_u64().unwrap_or(0)),
                    s["parent"].as_str().unwrap_or("-"),
                    ByteSize(s["size_bytes"].as_u64().unwrap_or(0)).to_string(),
                    kind,
                    if s["merging"].as_bool().unwrap_or(false) { " (deleting)" } else { "" }
                );
            }
        }
        SnapshotCommand::Rm(a) => {
            let path = format!("/v1/snapshots/{}", a.name);
            let v = call(&a.api.api, "DELETE", &path, None, &format!("cannot delete snapshot {}", a.name))
                .await?;
            if a.api.json {
                return print_json(&v);
            }
            println!("deleting snapshot {} (its data merges into its child in the background)", a.name);
        }
        SnapshotCommand::Revert(a) => {
            let api = &a.api.api;
            if a.pause {
                call(api, "POST", "/v1/volume/pause", None, "cannot pause the volume").await?;
            }
            let path = format!("/v1/snapshots/{}/revert", a.name);
            let result = call(api, "POST", &path, None, &format!("cannot revert to {}", a.name)).await;
            if a.pause {
                call(api, "POST", "/v1/volume/resume", None, "cannot resume the volume").await?;
            }
            let v = result?;
            if a.api.json {
                return print_json(&v);
            }
            println!("volume reverted to snapshot {}", a.name);
        }
    }
    Ok(())
}

async fn clone(a: CloneArgs) -> anyhow::Result<()> {
    let dir = match a.dir {
        Some(d) => d,
        None => std::env::current_dir()?.join(&a.name),
    };
    let dir = if dir.is_absolute() { dir } else { std::env::current_dir()?.join(dir) };
    let body = serde_json::json!({ "name": a.name, "dir": dir, "replicas": a.replicas });
    let path = format!("/v1/snapshots/{}/clone", a.snapshot);
    call(&a.api.api, "POST", &path, Some(&body), &format!("cannot clone {}", a.snapshot)).await?;
    let bar = (!a.api.json && std::io::stdout().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "clone {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut last_report = std::time::Instant::now();
    loop {
        let jobs = get_ok(&a.api.api, "/v1/clones").await?;
        let job = jobs
            .as_array()
            .into_iter()
            .flatten()
            .rev()
            .find(|j| j["name"] == a.name.as_str() && j["dir"] == dir.display().to_string())
            .cloned()
            .context("the clone job disappeared")?;
        let (done, total) =
            (job["done_bytes"].as_u64().unwrap_or(0), job["total_bytes"].as_u64().unwrap_or(0));
        match job["state"].as_str() {
            Some("done") => {
                if let Some(bar) = &bar {
                    bar.finish();
                }
                if a.api.json {
                    return print_json(&job);
                }
                println!(
                    "cloned {} into volume {} at {} ({} of data); serve it with: jiva up --dir {} --name {} --replicas {}",
                    a.snapshot,
                    a.name,
                    dir.display(),
                    ByteSize(job["copied_bytes"].as_u64().unwrap_or(0)),
                    dir.display(),
                    a.name,
                    a.replicas
                );
                return Ok(());
            }
            Some("failed") => bail!("clone failed: {}", job["error"].as_str().unwrap_or("unknown error")),
            _ => {}
        }
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        } else if !a.api.json && last_report.elapsed() >= Duration::from_secs(2) {
            println!("cloning: {} of {}", ByteSize(done), ByteSize(total));
            last_report = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc_times() {
        assert_eq!(super::format_time(0), "1970-01-01 00:00:00");
        assert_eq!(super::format_time(1_795_000_000_123), "2026-11-18 11:06:40");
    }

    #[test]
    fn dechunks() {
        assert_eq!(super::dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), "hello world");
    }
}
