//! Volume clones: a new volume directory whose initial contents are a
//! snapshot. The controller reads the snapshot (allocated extents only)
//! from its replicas and writes it into N fresh replica stores under
//! `DIR/replica-K`, bound to the new volume's name, which `jiva up --dir
//! DIR --name NEW --replicas N` then serves. Runs as a background job with
//! progress in the API (`GET /v1/clones`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::{Context, bail};
use jiva_core::remote::RemoteConnector;
use jiva_core::volume::Volume;
use jiva_core::{BlockDevice, ExtentState};
use jiva_replica::{Store, StoreOptions};
use serde::{Deserialize, Serialize};

/// Bytes per copy step.
const STEP: u64 = 4 << 20;

/// `POST /v1/snapshots/NAME/clone` body.
#[derive(Deserialize, Debug)]
pub struct CloneRequest {
    /// The new volume's name.
    pub name: String,
    /// Directory of the new volume (replica stores in `DIR/replica-K`).
    pub dir: PathBuf,
    /// How many replica stores to write (the new volume's replica count).
    #[serde(default = "default_replicas")]
    pub replicas: u32,
}

fn default_replicas() -> u32 {
    3
}

/// One clone in progress or done.
#[derive(Debug)]
pub struct CloneJob {
    snapshot: String,
    name: String,
    dir: PathBuf,
    total: u64,
    done: AtomicU64,
    copied: AtomicU64,
    finished: AtomicBool,
    error: Mutex<Option<String>>,
    started: Instant,
}

/// A clone job as the API reports it.
#[derive(Serialize)]
pub struct CloneStatus {
    pub snapshot: String,
    pub name: String,
    pub dir: String,
    pub total_bytes: u64,
    pub done_bytes: u64,
    /// Data bytes copied (holes are not).
    pub copied_bytes: u64,
    pub elapsed_secs: f64,
    /// `copying`, `done` or `failed`.
    pub state: &'static str,
    pub error: Option<String>,
}

impl CloneJob {
    pub fn status(&self) -> CloneStatus {
        let error = self.error.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let state = match (self.finished.load(Ordering::SeqCst), &error) {
            (false, _) => "copying",
            (true, None) => "done",
            (true, Some(_)) => "failed",
        };
        CloneStatus {
            snapshot: self.snapshot.clone(),
            name: self.name.clone(),
            dir: self.dir.display().to_string(),
            total_bytes: self.total,
            done_bytes: self.done.load(Ordering::Relaxed),
            copied_bytes: self.copied.load(Ordering::Relaxed),
            elapsed_secs: self.started.elapsed().as_secs_f64(),
            state,
            error,
        }
    }
}

/// Checks the request and starts the copy in the background.
pub fn start(
    vol: Arc<Volume<RemoteConnector>>,
    snapshot: String,
    req: CloneRequest,
) -> anyhow::Result<Arc<CloneJob>> {
    if req.name.is_empty() || req.name.len() > jiva_core::wire::MAX_NAME_LEN {
        bail!("the new volume needs a name of 1 to {} bytes", jiva_core::wire::MAX_NAME_LEN);
    }
    if !(1..=16).contains(&req.replicas) {
        bail!("replicas must be 1 to 16");
    }
    if req.dir.join("replica-1").exists() {
        bail!("{} already holds a volume", req.dir.display());
    }
    let job = Arc::new(CloneJob {
        snapshot: snapshot.clone(),
        name: req.name.clone(),
        dir: req.dir.clone(),
        total: vol.size(),
        done: AtomicU64::new(0),
        copied: AtomicU64::new(0),
        finished: AtomicBool::new(false),
        error: Mutex::new(None),
        started: Instant::now(),
    });
    let j = job.clone();
    tokio::spawn(async move {
        let result = copy(&vol, &j, req.replicas).await;
        if let Err(e) = &result {
            tracing::warn!(snapshot = %j.snapshot, clone = %j.name, "clone failed: {e:#}");
            *j.error.lock().unwrap_or_else(PoisonError::into_inner) = Some(format!("{e:#}"));
        } else {
            tracing::info!(snapshot = %j.snapshot, clone = %j.name, dir = %j.dir.display(), "clone complete");
        }
        j.finished.store(true, Ordering::SeqCst);
    });
    Ok(job)
}

async fn copy(vol: &Volume<RemoteConnector>, job: &CloneJob, replicas: u32) -> anyhow::Result<()> {
    let size = vol.size();
    // Fail early on an unknown snapshot, before any directory is made.
    vol.snapshot_block_status(&job.snapshot, 0, size.min(STEP)).await.context("reading the snapshot")?;
    let mut stores = Vec::new();
    for k in 1..=replicas {
        let dir = job.dir.join(format!("replica-{k}"));
        let store = Store::open(&dir, size, StoreOptions::default())
            .await
            .with_context(|| format!("creating {}", dir.display()))?;
        store.attach(&job.name, 0).await?;
        stores.push(store);
    }
    let mut at = 0;
    while at < size {
        let len = STEP.min(size - at);
        let extents = vol.snapshot_block_status(&job.snapshot, at, len).await?;
        let mut pos = at;
        for e in extents {
            if e.state == ExtentState::Data {
                let data = vol.read_snapshot(&job.snapshot, pos, e.length as usize).await?;
                for s in &stores {
                    s.write(pos, data.clone(), false).await?;
                }
                job.copied.fetch_add(e.length, Ordering::Relaxed);
            }
            pos += e.length;
        }
        at += len;
        job.done.store(at, Ordering::Relaxed);
    }
    for s in &stores {
        s.close().await?;
    }
    Ok(())
}
