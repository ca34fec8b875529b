//! The replication core: a [`Volume`] is a [`BlockDevice`] made of N
//! replicas reached through a [`Connector`], with failure handling,
//! generations (fencing of stale copies) and rebuild while I/O continues.
//!
//! Rules (see ARCHITECTURE.md for the reasoning):
//! - Replica states: `healthy` (read-write member), `rebuilding` (write-only:
//!   gets every new write plus a background copy), `failed` (left the
//!   volume; reconnected and rebuilt automatically), `offline` (never
//!   attached since start).
//! - Writes go to every healthy and rebuilding replica under a block-granular
//!   [`RangeLock`] taken in arrival order. A write is acknowledged only when
//!   every replica listed in the newest *persisted* generation record has it;
//!   a member that failed is first excluded by a new record written to the
//!   others. So a replica that missed an acknowledged write is never listed
//!   as a member anywhere it could be read from.
//! - Every change carries the volume generation; replicas stamp the touched
//!   regions durably before changing them. A returning replica that was a
//!   member at generation G only needs the regions stamped G or later
//!   (incremental rebuild); a new one needs every allocated region.
//! - A generation record is only written once no I/O of an older generation
//!   is in flight, so "has record G" implies "has every write older than G".
//! - Reads go to the least-loaded healthy replica, retrying on others and
//!   repairing a corrupt copy from a good one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::future::join_all;
use serde::Serialize;
use tokio::sync::Notify;

use crate::device::{BLOCK_SIZE, BlockDevice, Capabilities, Extent, ExtentState, ZeroFlags, block_span};
use crate::error::{Error, ErrorKind, Op, Result};
use crate::pipe::{Payload, Piped};
use crate::range_lock::RangeLock;
use crate::replica::{Connector, Replica};
use crate::wire::{Membership, RebuildMark, ReplicaMeta, SnapshotEntry};

const BS: u64 = BLOCK_SIZE as u64;

/// Slots for [`Volume::at_once_misses`]: about as many as reads in flight.
/// A slot overwritten before its async read comes only loses the hint.
const AT_ONCE_MISS_SLOTS: usize = 64;

/// Where one replica's future stands among those of a replicated change.
#[derive(Clone, Copy, Debug)]
struct Fan {
    /// The last one this change makes.
    last: bool,
    /// The change goes to more than one replica.
    many: bool,
}

/// How long a snapshot operation waits for another one (or for a returning
/// replica's snapshot copy) before it gives up.
const SNAPSHOT_OPS_WAIT: Duration = Duration::from_secs(5);

/// Tunables of a [`Volume`].
#[derive(Clone, Debug)]
pub struct VolumeOptions {
    /// Below this many healthy replicas, I/O waits (up to `io_wait`).
    pub min_healthy: usize,
    /// How long I/O waits for enough healthy replicas before failing.
    pub io_wait: Duration,
    /// Heartbeat and reconnect period.
    pub heartbeat: Duration,
    /// How often a fully healthy volume starts a new generation, which
    /// bounds what an incremental rebuild copies after a short absence.
    pub checkpoint_interval: Duration,
    /// Rebuild copy rate limit in bytes per second (0 = unlimited).
    pub rebuild_rate: u64,
    /// Bytes per rebuild copy step (taken under the write range lock).
    pub rebuild_chunk: u64,
    /// Copy steps in flight per rebuild.
    pub rebuild_parallel: usize,
}

impl Default for VolumeOptions {
    fn default() -> VolumeOptions {
        VolumeOptions {
            min_healthy: 1,
            io_wait: Duration::from_secs(30),
            heartbeat: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(10),
            rebuild_rate: 0,
            rebuild_chunk: 4 << 20,
            rebuild_parallel: 8,
        }
    }
}

/// Health of one replica as the controller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    /// In sync; serves reads and writes.
    Healthy,
    /// Write-only: receives new writes while a background copy catches up.
    Rebuilding,
    /// Left the volume (error, lost connection, timeout); being reconnected.
    Failed,
    /// Not attached since the controller started.
    Offline,
}

/// A rebuild in progress.
#[derive(Clone, Debug, Serialize)]
pub struct RebuildStatus {
    pub source: String,
    /// Every allocated region is copied (a new or unknown replica).
    pub full: bool,
    /// Continues an interrupted rebuild.
    pub resumed: bool,
    /// Bytes of the regions that need syncing.
    pub total_bytes: u64,
    /// Of those, bytes processed so far.
    pub done_bytes: u64,
    /// Data bytes actually copied (holes are not).
    pub copied_bytes: u64,
    pub elapsed_secs: f64,
    pub rate_bytes_per_sec: f64,
    pub eta_secs: Option<f64>,
}

/// How the last rebuild of a replica ended.
#[derive(Clone, Debug, Serialize)]
pub struct RebuildSummary {
    pub completed: bool,
    pub full: bool,
    pub resumed: bool,
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub copied_bytes: u64,
    pub seconds: f64,
    pub error: Option<String>,
}

/// A replica's state and counters, for status reports.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaStatus {
    pub address: String,
    pub store_id: Option<String>,
    pub state: ReplicaState,
    pub in_flight: usize,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    pub rebuild: Option<RebuildStatus>,
    pub last_rebuild: Option<RebuildSummary>,
    pub rebuilds_completed: u64,
}

/// The whole volume, for status reports.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeStatus {
    pub name: String,
    pub size: u64,
    pub epoch: u64,
    pub generation: u64,
    pub min_healthy: usize,
    pub healthy: usize,
    /// `healthy` (every replica), `degraded` (serving with fewer) or
    /// `unavailable` (below the minimum).
    pub state: &'static str,
    pub replicas: Vec<ReplicaStatus>,
}

struct Progress {
    source: String,
    full: bool,
    resumed: bool,
    total: u64,
    done: u64,
    copied: u64,
    started: Instant,
}

struct Member<L> {
    addr: String,
    link: Mutex<Option<Arc<L>>>,
    state: Mutex<ReplicaState>,
    store_id: AtomicU64,
    /// Changes whenever the member fails or is removed; a rebuild stops
    /// when its session is over.
    session: AtomicU64,
    removed: AtomicBool,
    in_flight: AtomicUsize,
    reads: AtomicU64,
    writes: AtomicU64,
    errors: AtomicU64,
    progress: Mutex<Option<Progress>>,
    last_rebuild: Mutex<Option<RebuildSummary>>,
    rebuilds: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<L> Member<L> {
    fn new(addr: String, state: ReplicaState) -> Member<L> {
        Member {
            addr,
            link: Mutex::new(None),
            state: Mutex::new(state),
            store_id: AtomicU64::new(0),
            session: AtomicU64::new(0),
            removed: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            progress: Mutex::new(None),
            last_rebuild: Mutex::new(None),
            rebuilds: AtomicU64::new(0),
        }
    }

    fn state(&self) -> ReplicaState {
        *lock(&self.state)
    }

    fn link(&self) -> Option<Arc<L>> {
        lock(&self.link).clone()
    }

    fn is_healthy(&self) -> bool {
        self.state() == ReplicaState::Healthy
    }
}

/// A serving member with its current link.
type Pick<L> = (Arc<Member<L>>, Arc<L>);
/// A pick with its member's position among the members.
type Placed<L> = (usize, Pick<L>);

/// Counts a request as in flight on a member for its lifetime.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(c: &'a AtomicUsize) -> InFlight<'a> {
        c.fetch_add(1, Ordering::Relaxed);
        InFlight(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Registers replica I/O of one generation until dropped.
struct GenGuard<'a, C: Connector> {
    vol: &'a Volume<C>,
    generation: u64,
}

impl<C: Connector> Drop for GenGuard<'_, C> {
    fn drop(&mut self) {
        let mut map = lock(&self.vol.inflight);
        if let Some(n) = map.get_mut(&self.generation) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.generation);
            }
        }
        drop(map);
        self.vol.drained.notify_waiters();
    }
}

/// A replicated volume. See the module documentation.
pub struct Volume<C: Connector> {
    name: String,
    size: u64,
    epoch: u64,
    connector: C,
    opts: VolumeOptions,
    /// Bytes per stamp region (the replicas' region size).
    region: AtomicU64,
    members: RwLock<Vec<Arc<Member<C::Link>>>>,
    writes: RangeLock,
    next_read: AtomicUsize,
    /// Which member the at-once read of an offset picked and could not be
    /// served by (see [`Volume::read_at_once`]), so that the async read
    /// that follows asks that member first.
    at_once_misses: [AtomicU64; AT_ONCE_MISS_SLOTS],
    /// Generation that new I/O carries.
    generation: AtomicU64,
    /// In-flight replica I/O per generation.
    inflight: Mutex<BTreeMap<u64, usize>>,
    drained: Notify,
    /// The newest record written; its lock serializes generation changes.
    record: tokio::sync::Mutex<Membership>,
    /// Members of the newest record that is durable on the healthy replicas.
    persisted: RwLock<Vec<u64>>,
    health: Notify,
    wrote: AtomicBool,
    stopping: AtomicBool,
    /// New I/O waits while set (snapshot revert).
    paused: AtomicBool,
    resumed: Notify,
    /// Held by snapshot create, delete and revert, and by a rejoining
    /// replica from its snapshot copy until it receives writes, so that
    /// the chain it copies stays the source's.
    snapshot_ops: tokio::sync::Mutex<()>,
}

impl<C: Connector> std::fmt::Debug for Volume<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume").field("name", &self.name).field("size", &self.size).finish()
    }
}

/// Whether an error says the request itself was bad (every replica would
/// refuse it alike) rather than that the replica is unwell.
fn is_request_error(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::InvalidArgument | ErrorKind::OutOfRange | ErrorKind::Unsupported)
}

/// Whether an error means the replica (not one block) is unusable.
fn is_link_error(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Disconnected | ErrorKind::TimedOut | ErrorKind::Fenced | ErrorKind::Protocol)
}

/// Newest first: higher generation, then higher epoch.
fn record_key(m: &Membership) -> (u64, u64) {
    (m.generation, m.epoch)
}

/// The rebuild a replica with metadata `meta` needs to rejoin a volume at
/// `current` generation.
fn rebuild_plan(meta: &ReplicaMeta, current: u64) -> (RebuildMark, bool) {
    let gen_now = meta.membership.generation;
    if gen_now > current {
        // A record this controller never wrote: trust none of its data.
        return (RebuildMark::from_threshold(0), false);
    }
    match &meta.rebuild {
        Some(mark) => (mark.resumed(gen_now), true),
        None if gen_now > 0 && meta.membership.members.contains(&meta.store_id) => {
            (RebuildMark::from_threshold(gen_now), false)
        }
        None => (RebuildMark::from_threshold(0), false),
    }
}

impl<C: Connector> Volume<C> {
    /// Members that take writes and map the payload memory (see
    /// [`crate::shm`]).
    fn members_sharing_payloads(&self) -> usize {
        let members = self.members.read().unwrap_or_else(PoisonError::into_inner);
        members
            .iter()
            .filter(|m| {
                matches!(m.state(), ReplicaState::Healthy | ReplicaState::Rebuilding)
                    && m.link().is_some_and(|l| l.shares_payload_memory())
            })
            .count()
    }

    /// Attaches the replicas at `addrs` as controller `epoch` and
    /// reconciles them: the members of the newest generation record serve
    /// (one of them only, if the last controller did not stop cleanly, the
    /// others are resynced from it), every other replica is rebuilt.
    /// Fails (Unavailable) if a member of the newest record is unreachable,
    /// since a replica reachable now might be stale without knowing it.
    pub async fn open(
        name: impl Into<String>,
        size: u64,
        epoch: u64,
        connector: C,
        addrs: &[String],
        opts: VolumeOptions,
    ) -> Result<Arc<Volume<C>>> {
        if addrs.is_empty() {
            return Err(Error::new(ErrorKind::InvalidArgument, "a volume needs at least one replica"));
        }
        if size == 0 || !size.is_multiple_of(BS) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("volume size {size} is not a positive multiple of {BS}"),
            ));
        }
        let vol = Arc::new(Volume {
            name: name.into(),
            size,
            epoch,
            connector,
            opts,
            region: AtomicU64::new(0),
            members: RwLock::new(Vec::new()),
            writes: RangeLock::new(),
            next_read: AtomicUsize::new(0),
            at_once_misses: std::array::from_fn(|_| AtomicU64::new(0)),
            generation: AtomicU64::new(0),
            inflight: Mutex::new(BTreeMap::new()),
            drained: Notify::new(),
            record: tokio::sync::Mutex::new(Membership::default()),
            persisted: RwLock::new(Vec::new()),
            health: Notify::new(),
            wrote: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            resumed: Notify::new(),
            snapshot_ops: tokio::sync::Mutex::new(()),
        });
        let attached = join_all(addrs.iter().map(|a| vol.connector.attach(a, epoch))).await;
        let mut found = Vec::new();
        for (addr, r) in addrs.iter().zip(attached) {
            let m = Arc::new(Member::new(addr.clone(), ReplicaState::Offline));
            match r {
                Ok((link, meta)) => {
                    m.store_id.store(meta.store_id, Ordering::SeqCst);
                    *lock(&m.link) = Some(Arc::new(link));
                    found.push((m.clone(), meta));
                }
                Err(e) if e.kind() == ErrorKind::Fenced => return Err(e),
                Err(e) => tracing::warn!(replica = %addr, "replica unreachable at start: {e}"),
            }
            vol.members.write().unwrap_or_else(PoisonError::into_inner).push(m);
        }
        let Some(newest) =
            found.iter().map(|(_, meta)| &meta.membership).max_by_key(|m| record_key(m)).cloned()
        else {
            return Err(Error::new(ErrorKind::Unavailable, "no replica is reachable"));
        };
        if let Some((_, meta)) = found.first() {
            vol.region.store(u64::from(meta.region_size).max(BS), Ordering::SeqCst);
        }
        let max_gen = found.iter().map(|(_, meta)| meta.membership.generation).max().unwrap_or(0);
        vol.generation.store(max_gen, Ordering::SeqCst);

        // Who may serve: members of the newest record that hold it.
        let (mut sources, mut others): (Vec<_>, Vec<_>) = found.into_iter().partition(|(_, meta)| {
            newest.generation > 0 && meta.membership == newest && newest.members.contains(&meta.store_id)
        });
        if newest.generation == 0 {
            // A new volume: nothing was ever written, every replica is current.
            sources = std::mem::take(&mut others);
        } else {
            let missing: Vec<String> = newest
                .members
                .iter()
                .filter(|id| !sources.iter().any(|(_, meta)| meta.store_id == **id))
                .filter(|id| !others.iter().any(|(_, meta)| meta.store_id == **id))
                .map(|id| format!("{id:016x}"))
                .collect();
            if !missing.is_empty() {
                vol.detach_all();
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "replica(s) {} of generation {} are not reachable; refusing to serve from the others, \
                         which may be stale",
                        missing.join(", "),
                        newest.generation
                    ),
                ));
            }
            if !newest.clean && sources.len() > 1 {
                // Writes that were in flight when the last controller died may
                // have reached some members only: keep one, resync the others
                // over the regions of the last generation.
                others.extend(sources.drain(1..));
            }
        }
        for (m, meta) in &sources {
            if u64::from(meta.region_size).max(BS) != vol.region() {
                return Err(Error::new(ErrorKind::Unsupported, "replicas use different region sizes"));
            }
            *lock(&m.state) = ReplicaState::Healthy;
        }
        vol.sync_membership().await?;
        tracing::info!(
            volume = %vol.name, epoch, generation = vol.generation.load(Ordering::SeqCst),
            healthy = sources.len(), to_rebuild = others.len(), "volume reconciled"
        );
        for (m, meta) in others {
            let link = m.link().expect("attached above");
            // Members of the newest record that did not keep their lead need
            // only the regions written in that generation.
            let meta = if meta.membership == newest && newest.members.contains(&meta.store_id) {
                ReplicaMeta { rebuild: None, ..meta }
            } else {
                meta
            };
            vol.clone().rejoin(m, link, meta).await;
        }
        let members: Vec<_> = vol.members_snapshot();
        for m in members {
            tokio::spawn(vol.clone().monitor(m));
        }
        tokio::spawn(vol.clone().checkpoints());
        Ok(vol)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn region(&self) -> u64 {
        self.region.load(Ordering::SeqCst).max(BS)
    }

    fn members_snapshot(&self) -> Vec<Arc<Member<C::Link>>> {
        self.members.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn detach_all(&self) {
        for m in self.members_snapshot() {
            lock(&m.link).take();
        }
    }

    pub fn status(&self) -> VolumeStatus {
        let replicas: Vec<ReplicaStatus> =
            self.members_snapshot().iter().map(|m| self.member_status(m)).collect();
        let healthy = replicas.iter().filter(|r| r.state == ReplicaState::Healthy).count();
        let state = if healthy < self.opts.min_healthy.max(1) {
            "unavailable"
        } else if healthy < replicas.len() {
            "degraded"
        } else {
            "healthy"
        };
        VolumeStatus {
            name: self.name.clone(),
            size: self.size,
            epoch: self.epoch,
            generation: self.generation.load(Ordering::SeqCst),
            min_healthy: self.opts.min_healthy,
            healthy,
            state,
            replicas,
        }
    }

    fn member_status(&self, m: &Member<C::Link>) -> ReplicaStatus {
        let id = m.store_id.load(Ordering::SeqCst);
        let rebuild = lock(&m.progress).as_ref().map(|p| {
            let elapsed = p.started.elapsed().as_secs_f64();
            let rate = if elapsed > 0.0 { p.done as f64 / elapsed } else { 0.0 };
            RebuildStatus {
                source: p.source.clone(),
                full: p.full,
                resumed: p.resumed,
                total_bytes: p.total,
                done_bytes: p.done,
                copied_bytes: p.copied,
                elapsed_secs: elapsed,
                rate_bytes_per_sec: rate,
                eta_secs: (rate > 0.0).then(|| p.total.saturating_sub(p.done) as f64 / rate),
            }
        });
        ReplicaStatus {
            address: m.addr.clone(),
            store_id: (id != 0).then(|| format!("{id:016x}")),
            state: m.state(),
            in_flight: m.in_flight.load(Ordering::Relaxed),
            reads: m.reads.load(Ordering::Relaxed),
            writes: m.writes.load(Ordering::Relaxed),
            errors: m.errors.load(Ordering::Relaxed),
            rebuild,
            last_rebuild: lock(&m.last_rebuild).clone(),
            rebuilds_completed: m.rebuilds.load(Ordering::Relaxed),
        }
    }

    /// Replica statuses (shortcut for `status().replicas`).
    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.status().replicas
    }

    pub fn healthy_count(&self) -> usize {
        self.members.read().unwrap_or_else(PoisonError::into_inner).iter().filter(|m| m.is_healthy()).count()
    }

    /// Adds a replica by address; it is attached and rebuilt in the background.
    pub fn add(self: &Arc<Self>, addr: &str) -> Result<()> {
        let m = {
            let mut members = self.members.write().unwrap_or_else(PoisonError::into_inner);
            if members.iter().any(|m| m.addr == addr) {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("replica {addr} is already part of the volume"),
                ));
            }
            let m = Arc::new(Member::new(addr.to_string(), ReplicaState::Offline));
            members.push(m.clone());
            m
        };
        tracing::info!(volume = %self.name, replica = %addr, "replica added");
        tokio::spawn(self.clone().monitor(m));
        Ok(())
    }

    /// Removes a replica. Refused for the last healthy one.
    pub async fn remove(&self, addr: &str) -> Result<()> {
        let m = {
            let mut members = self.members.write().unwrap_or_else(PoisonError::into_inner);
            let Some(i) = members.iter().position(|m| m.addr == addr) else {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("no replica {addr} in the volume"),
                ));
            };
            let healthy = members.iter().filter(|m| m.is_healthy()).count();
            if members[i].is_healthy() && healthy <= 1 {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "refusing to remove the last healthy replica",
                ));
            }
            members.remove(i)
        };
        m.removed.store(true, Ordering::SeqCst);
        m.session.fetch_add(1, Ordering::SeqCst);
        *lock(&m.state) = ReplicaState::Failed;
        lock(&m.link).take();
        self.health.notify_waiters();
        tracing::info!(volume = %self.name, replica = %addr, "replica removed");
        self.sync_membership().await
    }

    /// Stops background work, flushes, and (if every replica is healthy)
    /// records a clean generation so the next controller can use them all.
    pub async fn shutdown(&self) -> Result<()> {
        self.stopping.store(true, Ordering::SeqCst);
        let flushed = self.flush().await;
        let members = self.members_snapshot();
        if flushed.is_ok() && members.iter().all(|m| m.is_healthy()) {
            let mut rec = self.record.lock().await;
            let ids = rec.members.clone();
            self.bump_locked(&mut rec, ids, true).await?;
        }
        flushed
    }

    fn unavailable(&self, op: Op) -> Error {
        Error::new(ErrorKind::Unavailable, format!("volume {} has no healthy replica", self.name)).with_op(op)
    }

    /// Waits (bounded) until at least `min_healthy` replicas are healthy.
    async fn wait_quorum(&self, op: Op) -> Result<()> {
        let need = self.opts.min_healthy.max(1);
        // The common case, without registering a waiter or reading the clock.
        if self.healthy_count() >= need {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.opts.io_wait;
        loop {
            let notified = self.health.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.healthy_count() >= need {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("volume {} has fewer than {need} healthy replica(s)", self.name),
                )
                .with_op(op));
            }
        }
    }

    /// Registers I/O of the current generation (atomically with reading it,
    /// so a generation change either waits for it or is seen by it).
    fn enter(&self) -> GenGuard<'_, C> {
        let mut map = lock(&self.inflight);
        let generation = self.generation.load(Ordering::SeqCst);
        *map.entry(generation).or_insert(0) += 1;
        GenGuard { vol: self, generation }
    }

    /// Waits until no I/O of a generation older than `generation` is in flight.
    async fn drain_before(&self, generation: u64) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.inflight).range(..generation).next().is_none() {
                return;
            }
            notified.await;
        }
    }

    /// Marks `m` failed (if it was serving); true if it was healthy.
    fn mark_failed(&self, m: &Member<C::Link>, err: &Error) -> bool {
        let was = {
            let mut st = lock(&m.state);
            let was = *st;
            if matches!(was, ReplicaState::Failed | ReplicaState::Offline) {
                return false;
            }
            *st = ReplicaState::Failed;
            m.session.fetch_add(1, Ordering::SeqCst);
            lock(&m.link).take();
            was
        };
        self.health.notify_waiters();
        tracing::warn!(volume = %self.name, replica = %m.addr, "replica marked failed ({was:?}): {err}");
        was == ReplicaState::Healthy
    }

    async fn fail(&self, m: &Member<C::Link>, err: &Error) {
        if self.mark_failed(m, err)
            && let Err(e) = self.sync_membership().await
        {
            tracing::warn!(volume = %self.name, "cannot record the new membership: {e}");
        }
    }

    /// Makes the persisted generation record list exactly the healthy
    /// replicas (writing a new record if it does not).
    async fn sync_membership(&self) -> Result<()> {
        let mut rec = self.record.lock().await;
        for _ in 0..8 {
            let mut ids: Vec<u64> = self
                .members_snapshot()
                .iter()
                .filter(|m| m.is_healthy())
                .map(|m| m.store_id.load(Ordering::SeqCst))
                .collect();
            ids.sort_unstable();
            if rec.generation > 0
                && ids == rec.members
                && *self.persisted.read().unwrap_or_else(PoisonError::into_inner) == ids
            {
                return Ok(());
            }
            if ids.is_empty() {
                return Err(self.unavailable(Op::Write));
            }
            self.bump_locked(&mut rec, ids, false).await?;
        }
        Err(Error::new(ErrorKind::Unavailable, "membership keeps changing"))
    }

    /// Starts generation `current + 1` and records it, with `members`, on
    /// every healthy and rebuilding replica once no older I/O is in flight.
    /// A replica that fails to record it is marked failed.
    async fn bump_locked(&self, rec: &mut Membership, members: Vec<u64>, clean: bool) -> Result<()> {
        let generation = {
            let _map = lock(&self.inflight);
            self.generation.fetch_add(1, Ordering::SeqCst) + 1
        };
        self.drain_before(generation).await;
        let next = Membership { generation, epoch: self.epoch, clean, members };
        let participants: Vec<_> = self
            .members_snapshot()
            .into_iter()
            .filter(|m| matches!(m.state(), ReplicaState::Healthy | ReplicaState::Rebuilding))
            .filter_map(|m| m.link().map(|l| (m, l)))
            .collect();
        let results = join_all(participants.iter().map(|(_, l)| l.set_membership(&next))).await;
        let mut ok_healthy = 0;
        for ((m, _), r) in participants.iter().zip(results) {
            match r {
                Ok(()) if m.is_healthy() => ok_healthy += 1,
                Ok(()) => {}
                Err(e) => {
                    self.mark_failed(m, &e);
                }
            }
        }
        *rec = next;
        if ok_healthy == 0 {
            return Err(self.unavailable(Op::Write));
        }
        *self.persisted.write().unwrap_or_else(PoisonError::into_inner) = rec.members.clone();
        tracing::debug!(volume = %self.name, generation, members = ?rec.members, clean, "generation recorded");
        Ok(())
    }

    /// Runs a change on every healthy and rebuilding replica, under the
    /// write range lock for `offset..offset+len` (block-aligned) when
    /// `len > 0`, and applies the acknowledgement rule.
    async fn replicate<F, Fut>(&self, op: Op, offset: u64, len: u64, f: F) -> Result<()>
    where
        F: Fn(Arc<C::Link>, u64, Fan) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        self.wait_unpaused().await;
        self.wait_quorum(op).await?;
        let _range = if len > 0 {
            let (first, count) = block_span(offset, len);
            Some(self.writes.lock(first * BS, (first + count) * BS, true).await)
        } else {
            None
        };
        self.wrote.store(true, Ordering::Relaxed);
        let mut ok_ids = Vec::new();
        let mut first_err: Option<Error> = None;
        let mut healthy_ok = 0usize;
        let mut healthy_failed = Vec::new();
        {
            let io = self.enter();
            // (member, link, healthy): healthy ones serve, rebuilding ones only receive.
            let targets: Vec<(Pick<C::Link>, bool)> = self
                .members_snapshot()
                .into_iter()
                .filter_map(|m| {
                    let st = m.state();
                    let link = m.link()?;
                    matches!(st, ReplicaState::Healthy | ReplicaState::Rebuilding)
                        .then_some(((m, link), st == ReplicaState::Healthy))
                })
                .collect();
            if !targets.iter().any(|(_, healthy)| *healthy) {
                return Err(self.unavailable(op));
            }
            let results = join_all(targets.iter().enumerate().map(|(i, ((m, link), _))| {
                let in_flight = InFlight::new(&m.in_flight);
                let fut = f(
                    link.clone(),
                    io.generation,
                    Fan { last: i + 1 == targets.len(), many: targets.len() > 1 },
                );
                async move {
                    let _in_flight = in_flight;
                    fut.await
                }
            }))
            .await;
            for (((m, _), healthy), r) in targets.iter().zip(results) {
                match r {
                    Ok(()) => {
                        m.writes.fetch_add(1, Ordering::Relaxed);
                        ok_ids.push(m.store_id.load(Ordering::SeqCst));
                        if *healthy {
                            healthy_ok += 1;
                        }
                    }
                    Err(e) => {
                        m.errors.fetch_add(1, Ordering::Relaxed);
                        if is_request_error(e.kind()) {
                            return Err(e.with_op(op).at(offset));
                        }
                        if *healthy {
                            healthy_failed.push((m.clone(), e.clone()));
                        } else {
                            // A rebuilding replica that misses a write starts over
                            // (resuming) later; the volume is unaffected.
                            self.mark_failed(m, &e);
                        }
                        first_err.get_or_insert(e);
                    }
                }
            }
            if healthy_ok == 0 {
                // Nobody serving has it: the client gets the error. Replicas
                // whose link is gone are failed all the same.
                for (m, e) in &healthy_failed {
                    if is_link_error(e.kind()) {
                        self.mark_failed(m, e);
                    }
                }
                let e = first_err.unwrap_or_else(|| self.unavailable(op));
                return Err(e.with_op(op).at(offset));
            }
            // Failed before the I/O registration ends, so that a generation
            // record written after it never reaches a replica that missed
            // this change.
            for (m, e) in &healthy_failed {
                self.mark_failed(m, e);
            }
        }
        // Acknowledge only once every member of the persisted record has it.
        for _ in 0..4 {
            let missing = {
                let persisted = self.persisted.read().unwrap_or_else(PoisonError::into_inner);
                persisted.iter().any(|id| !ok_ids.contains(id))
            };
            if !missing {
                return Ok(());
            }
            self.sync_membership().await.map_err(|e| e.with_op(op).at(offset))?;
        }
        Err(self.unavailable(op))
    }

    /// A read served by one healthy replica (the least loaded), trying the
    /// others in turn on failure; corrupt copies found on the way are
    /// repaired from the one that served it.
    async fn read_from_one<T, F, Fut>(&self, offset: u64, len: usize, read: F) -> Result<T>
    where
        F: Fn(Arc<C::Link>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.wait_unpaused().await;
        self.wait_quorum(Op::Read).await?;
        let mut last_err = None;
        let mut corrupt_on: Vec<Pick<C::Link>> = Vec::new();
        let first = self.take_at_once_miss(offset);
        for (_, (m, link)) in self.read_order_at(first) {
            let result = {
                let _in_flight = InFlight::new(&m.in_flight);
                read(link.clone()).await
            };
            match result {
                Ok(data) => {
                    m.reads.fetch_add(1, Ordering::Relaxed);
                    for (bad, bad_link) in corrupt_on {
                        self.repair(&bad, &bad_link, &link, offset, len).await;
                    }
                    return Ok(data);
                }
                Err(e) => {
                    m.errors.fetch_add(1, Ordering::Relaxed);
                    match e.kind() {
                        k if is_request_error(k) => return Err(e.with_op(Op::Read).at(offset)),
                        ErrorKind::Corrupt => corrupt_on.push((m.clone(), link.clone())),
                        k if is_link_error(k) => self.fail(&m, &e).await,
                        _ => {}
                    }
                    tracing::warn!(replica = %m.addr, offset, "read failed, trying another replica: {e}");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.map(|e| e.with_op(Op::Read).at(offset)).unwrap_or_else(|| self.unavailable(Op::Read)))
    }

    /// Healthy members in the order a read should try them: least loaded
    /// first, ties broken round-robin.
    fn read_order(&self) -> impl Iterator<Item = Pick<C::Link>> + use<C> {
        self.read_order_at(None).into_iter().map(|(_, pick)| pick)
    }

    /// [`Volume::read_order`] with each member's position among the
    /// members, and the one at position `first`, if given, put first.
    fn read_order_at(&self, first: Option<usize>) -> Vec<Placed<C::Link>> {
        // Sorted by load, with the member asked for first below all loads.
        let mut order: Vec<(usize, Placed<C::Link>)> = {
            let members = self.members.read().unwrap_or_else(PoisonError::into_inner);
            let n = members.len().max(1);
            let start = self.next_read.fetch_add(1, Ordering::Relaxed);
            (0..members.len())
                .map(|i| ((start + i) % n, &members[(start + i) % n]))
                .filter(|(_, m)| m.is_healthy())
                .filter_map(|(pos, m)| {
                    let key = if Some(pos) == first { 0 } else { m.in_flight.load(Ordering::Relaxed) + 1 };
                    m.link().map(|l| (key, (pos, (m.clone(), l))))
                })
                .collect()
        };
        order.sort_by_key(|(key, _)| *key);
        order.into_iter().map(|(_, pick)| pick).collect()
    }

    /// Remembers that the member at `pos` could not serve a read of
    /// `offset` at once. Its reason may be a checksum mismatch, which only
    /// that member's replica can confirm (and have repaired): the async
    /// read asks it first rather than picking afresh.
    fn note_at_once_miss(&self, offset: u64, pos: usize) {
        if offset.is_multiple_of(BS) && pos < 0xff {
            let slot = (offset / BS) as usize % AT_ONCE_MISS_SLOTS;
            self.at_once_misses[slot].store((offset / BS) << 8 | (pos as u64 + 1), Ordering::Relaxed);
        }
    }

    /// The member position noted by [`Volume::note_at_once_miss`] for
    /// `offset`, if any, taken so that it steers one read only.
    fn take_at_once_miss(&self, offset: u64) -> Option<usize> {
        if !offset.is_multiple_of(BS) {
            return None;
        }
        let slot = &self.at_once_misses[(offset / BS) as usize % AT_ONCE_MISS_SLOTS];
        let noted = slot.load(Ordering::Relaxed);
        if noted == 0 || noted >> 8 != offset / BS {
            return None;
        }
        slot.compare_exchange(noted, 0, Ordering::Relaxed, Ordering::Relaxed).ok()?;
        Some((noted & 0xff) as usize - 1)
    }

    /// Rewrites a corrupt copy on `bad` with data read (again, under the
    /// write lock so no newer write is overtaken) from `good`.
    async fn repair(
        &self,
        bad: &Member<C::Link>,
        bad_link: &C::Link,
        good: &C::Link,
        offset: u64,
        len: usize,
    ) {
        let (first, count) = block_span(offset, len as u64);
        let (start, end) = (first * BS, (first + count) * BS);
        let _guard = self.writes.lock(start, end, true).await;
        let io = self.enter();
        let result = async {
            let data = good.read(start, (end - start) as usize).await?;
            bad_link.write_at(start, data, false, io.generation, None).await
        }
        .await;
        match result {
            Ok(()) => tracing::info!(replica = %bad.addr, offset = start, "repaired corrupt blocks"),
            Err(e) => tracing::warn!(replica = %bad.addr, offset = start, "repair failed: {e}"),
        }
    }

    // ------------------------------------------------------------------
    // Background work: heartbeats, reconnects, rebuilds, checkpoints.

    /// Watches one member for its lifetime: heartbeats while it serves,
    /// reconnects (and rebuilds) it while it does not.
    async fn monitor(self: Arc<Self>, m: Arc<Member<C::Link>>) {
        let mut fenced_logged = false;
        loop {
            if self.stopping.load(Ordering::SeqCst) || m.removed.load(Ordering::SeqCst) {
                return;
            }
            match m.state() {
                ReplicaState::Offline | ReplicaState::Failed => {
                    match self.connector.attach(&m.addr, self.epoch).await {
                        Ok((link, meta)) if !m.removed.load(Ordering::SeqCst) => {
                            if u64::from(meta.region_size).max(BS) != self.region() {
                                tracing::error!(replica = %m.addr, "replica has another region size; not adding it");
                            } else {
                                tracing::info!(volume = %self.name, replica = %m.addr, "replica reconnected");
                                m.store_id.store(meta.store_id, Ordering::SeqCst);
                                self.clone().rejoin(m.clone(), Arc::new(link), meta).await;
                            }
                        }
                        Ok(_) => return,
                        Err(e) if e.kind() == ErrorKind::Fenced => {
                            if !fenced_logged {
                                tracing::error!(volume = %self.name, replica = %m.addr, "a newer controller owns this replica: {e}");
                                fenced_logged = true;
                            }
                        }
                        Err(e) => tracing::debug!(replica = %m.addr, "reconnect failed: {e}"),
                    }
                }
                ReplicaState::Healthy | ReplicaState::Rebuilding => {
                    if let Some(link) = m.link() {
                        let result = if link.is_connected() {
                            link.ping().await
                        } else {
                            Err(Error::new(ErrorKind::Disconnected, "connection lost"))
                        };
                        if let Err(e) = result
                            && m.link().is_some_and(|l| Arc::ptr_eq(&l, &link))
                        {
                            self.fail(&m, &e).await;
                        }
                    }
                }
            }
            tokio::time::sleep(self.opts.heartbeat).await;
        }
    }

    /// Brings an attached replica back: straight to healthy if it is the
    /// volume's only hope (nobody healthy, and it holds the newest record
    /// as a member), else write-only with a background rebuild.
    async fn rejoin(self: Arc<Self>, m: Arc<Member<C::Link>>, link: Arc<C::Link>, meta: ReplicaMeta) {
        let rec = self.record.lock().await.clone();
        if self.healthy_count() == 0
            && meta.membership == rec
            && rec.members.contains(&meta.store_id)
            && meta.rebuild.is_none()
        {
            *lock(&m.link) = Some(link);
            *lock(&m.state) = ReplicaState::Healthy;
            self.health.notify_waiters();
            tracing::warn!(volume = %self.name, replica = %m.addr, "replica is back and serves alone (every other member failed)");
            if let Err(e) = self.sync_membership().await {
                tracing::warn!("cannot record the new membership: {e}");
            }
            return;
        }
        let (mut mark, mut resumed) = rebuild_plan(&meta, rec.generation);
        // Held until the replica receives writes: no snapshot may change
        // between the copy of the chain and then.
        let _snapshot_ops = self.snapshot_ops.lock().await;
        match self.sync_snapshots(&m, &link).await {
            Ok(false) => {}
            Ok(true) => {
                // Its head was dropped: it needs every region again.
                (mark, resumed) = (RebuildMark::from_threshold(0), false);
            }
            Err(e) => {
                tracing::warn!(volume = %self.name, replica = %m.addr, "cannot copy the snapshots: {e}");
                return;
            }
        }
        // The mark is durable before the replica receives any write, so an
        // interruption from here on resumes instead of trusting its data.
        if let Err(e) = link.set_rebuild(Some(&mark)).await {
            tracing::warn!(replica = %m.addr, "cannot start a rebuild: {e}");
            return;
        }
        let session = {
            let mut st = lock(&m.state);
            *lock(&m.link) = Some(link.clone());
            *st = ReplicaState::Rebuilding;
            m.session.load(Ordering::SeqCst)
        };
        {
            // A record sent now tells the replica, should it fail, that what
            // it copied from here on holds every write older than it.
            let mut rec = self.record.lock().await;
            let ids = rec.members.clone();
            if let Err(e) = self.bump_locked(&mut rec, ids, false).await {
                tracing::warn!(volume = %self.name, "cannot start a new generation: {e}");
            }
        }
        drop(_snapshot_ops);
        let full = mark.pieces.iter().all(|&(_, t)| t == 0);
        tracing::info!(
            volume = %self.name, replica = %m.addr, full, resumed,
            "rebuild starting"
        );
        tokio::spawn(self.rebuild(m, link, mark, session, resumed, full));
    }

    async fn rebuild(
        self: Arc<Self>,
        m: Arc<Member<C::Link>>,
        link: Arc<C::Link>,
        mark: RebuildMark,
        session: u64,
        resumed: bool,
        full: bool,
    ) {
        let started = Instant::now();
        let result = self.copy_all(&m, &link, &mark, session, resumed, full).await;
        let summary = {
            let p = lock(&m.progress).take();
            let (total, done, copied) = p.map_or((0, 0, 0), |p| (p.total, p.done, p.copied));
            RebuildSummary {
                completed: result.is_ok(),
                full,
                resumed,
                total_bytes: total,
                done_bytes: done,
                copied_bytes: copied,
                seconds: started.elapsed().as_secs_f64(),
                error: result.as_ref().err().map(|e| e.to_string()),
            }
        };
        match result {
            Ok(()) => {
                {
                    let mut st = lock(&m.state);
                    if m.session.load(Ordering::SeqCst) != session || *st != ReplicaState::Rebuilding {
                        return;
                    }
                    m.rebuilds.fetch_add(1, Ordering::Relaxed);
                    *lock(&m.last_rebuild) = Some(summary.clone());
                    *st = ReplicaState::Healthy;
                }
                self.health.notify_waiters();
                if let Err(e) = self.sync_membership().await {
                    tracing::warn!(volume = %self.name, "cannot record the new membership: {e}");
                }
                if m.is_healthy()
                    && let Err(e) = link.set_rebuild(None).await
                {
                    tracing::warn!(replica = %m.addr, "cannot clear the rebuild mark: {e}");
                }
                tracing::info!(
                    volume = %self.name, replica = %m.addr,
                    copied = summary.copied_bytes, seconds = summary.seconds, "rebuild complete; replica healthy"
                );
            }
            Err(e) => {
                tracing::warn!(volume = %self.name, replica = %m.addr, "rebuild stopped: {e}");
                *lock(&m.last_rebuild) = Some(summary);
                if m.session.load(Ordering::SeqCst) == session && !self.stopping.load(Ordering::SeqCst) {
                    self.fail(&m, &e).await;
                }
            }
        }
    }

    /// Makes the snapshots of a rejoining replica (not yet receiving writes)
    /// those of a healthy source: same names, creation times and kinds in
    /// the same order, and the same contents. Where the chains part, the
    /// target's layers from there up (its head too) are dropped, then each
    /// missing snapshot is rebuilt from the source's own layer of it (data
    /// crc-checked, zeros as zeros) into the target's head and frozen.
    /// Returns whether the target changed (its head then needs a full
    /// rebuild; before dropping anything, a full rebuild mark is recorded,
    /// so an interruption never trusts the head).
    async fn sync_snapshots(&self, m: &Member<C::Link>, link: &C::Link) -> Result<bool> {
        let Some((src_m, src)) = self.read_order().find(|(s, _)| !std::ptr::eq(&**s, m)) else {
            // Nobody to copy from: the rebuild will say so.
            return Ok(false);
        };
        let theirs = match src.snapshots().await {
            Ok(list) => list,
            Err(e) if e.kind() == ErrorKind::Unsupported => return Ok(false),
            Err(e) => return Err(e),
        };
        let ours = match link.snapshots().await {
            Err(e) if e.kind() == ErrorKind::Unsupported && theirs.is_empty() => return Ok(false),
            other => other?,
        };
        let same = |a: &SnapshotEntry, b: &SnapshotEntry| {
            a.name == b.name && a.created_ms == b.created_ms && a.system == b.system
        };
        let common = theirs.iter().zip(&ours).take_while(|(a, b)| same(a, b)).count();
        if common == theirs.len() && common == ours.len() {
            self.follow_deletes(link, &theirs, &ours).await;
            return Ok(false);
        }
        tracing::info!(
            volume = %self.name, replica = %m.addr, source = %src_m.addr,
            kept = common, dropped = ours.len() - common, to_copy = theirs.len() - common,
            "copying snapshots"
        );
        link.set_rebuild(Some(&RebuildMark::from_threshold(0))).await?;
        link.truncate_snapshots(common.checked_sub(1).map(|i| ours[i].name.as_str())).await?;
        for snap in &theirs[common..] {
            let copied = self.copy_layer(&*src, link, &snap.name).await?;
            link.create_snapshot(&snap.name, snap.system, snap.created_ms).await?;
            tracing::info!(replica = %m.addr, snapshot = %snap.name, copied, "snapshot copied");
        }
        let now = link.snapshots().await?;
        if now.len() != theirs.len() || !now.iter().zip(&theirs).all(|(a, b)| same(a, b)) {
            return Err(Error::new(ErrorKind::Unavailable, "the snapshots changed during the copy"));
        }
        self.follow_deletes(link, &theirs, &now).await;
        Ok(true)
    }

    /// Starts deleting on the target (`ours`) the snapshot the source
    /// (`theirs`, the same chain) is deleting, if the target is not. Each
    /// replica merges on its own; the views stay the same meanwhile, so a
    /// failure only leaves the snapshot listed on the target (logged).
    async fn follow_deletes(&self, link: &C::Link, theirs: &[SnapshotEntry], ours: &[SnapshotEntry]) {
        for (src, dst) in theirs.iter().zip(ours) {
            if src.merging
                && !dst.merging
                && let Err(e) = link.delete_snapshot(&src.name).await
            {
                tracing::warn!(volume = %self.name, snapshot = %src.name, "cannot delete the snapshot on a returning replica: {e}");
            }
        }
    }

    /// Copies snapshot `name`'s own layer from `src` into the head of
    /// `dst`. Returns data bytes copied.
    async fn copy_layer(&self, src: &C::Link, dst: &C::Link, name: &str) -> Result<u64> {
        // Status is cheap (the replica's in-RAM index): ask in large windows.
        const WINDOW: u64 = 256 << 20;
        let piece = self.opts.rebuild_chunk.clamp(BS, u64::from(crate::device::MAX_IO_BYTES));
        let started = Instant::now();
        let mut copied = 0;
        let mut at = 0;
        while at < self.size {
            let n = WINDOW.min(self.size - at);
            let extents = src.snapshot_layer_status(name, at, n).await?;
            let mut off = at;
            for e in extents {
                let end = (off + e.length).min(at + n);
                match e.state {
                    ExtentState::Data => {
                        let mut o = off;
                        while o < end {
                            let len = piece.min(end - o);
                            let data = src.read_snapshot(name, o, len as usize).await?;
                            let crc = crate::crc32c(&data);
                            dst.write_at(o, data, false, 0, Some(crc)).await?;
                            copied += len;
                            o += len;
                            if self.opts.rebuild_rate > 0 {
                                let due =
                                    Duration::from_secs_f64(copied as f64 / self.opts.rebuild_rate as f64);
                                if let Some(wait) = due.checked_sub(started.elapsed()) {
                                    tokio::time::sleep(wait).await;
                                }
                            }
                        }
                    }
                    // ZERO records as ZERO records, so the layers match record for record.
                    ExtentState::Zero => {
                        let flags = ZeroFlags { no_hole: true, fua: false };
                        dst.zeroes_at(off, end - off, flags, 0).await?;
                    }
                    ExtentState::Hole => {}
                }
                off = end;
            }
            at += n;
        }
        Ok(copied)
    }

    /// Copies every region `mark` asks for from healthy replicas to `link`.
    async fn copy_all(
        &self,
        m: &Member<C::Link>,
        link: &Arc<C::Link>,
        mark: &RebuildMark,
        session: u64,
        resumed: bool,
        full: bool,
    ) -> Result<()> {
        let region = self.region();
        let regions = self.size.div_ceil(region);
        let (src_member, src) = self
            .read_order()
            .into_iter()
            .find(|(s, _)| !std::ptr::eq(&**s, m))
            .ok_or_else(|| Error::new(ErrorKind::Unavailable, "no healthy replica to rebuild from"))?;
        let src_stamps = src.stamps(0, regions).await?;
        let own_stamps = link.stamps(0, regions).await?;
        let need: Vec<u64> = (mark.progress..regions)
            .filter(|&r| {
                let t = mark.threshold(r);
                src_stamps[r as usize] >= t || own_stamps[r as usize] >= t
            })
            .collect();
        // Steps: runs of needed regions cut into chunks (whole regions when
        // a region is larger than a chunk is not the case; else chunk-sized).
        let chunk = self.opts.rebuild_chunk.max(region).div_ceil(region) * region;
        let mut steps: Vec<(u64, u64, u64)> = Vec::new(); // (start, end, stamp)
        for &r in &need {
            let (start, end) = (r * region, ((r + 1) * region).min(self.size));
            let stamp = src_stamps[r as usize].max(own_stamps[r as usize]);
            match steps.last_mut() {
                Some(last) if last.1 == start && end - last.0 <= chunk => {
                    last.1 = end;
                    last.2 = last.2.max(stamp);
                }
                _ => steps.push((start, end, stamp)),
            }
        }
        let total: u64 = steps.iter().map(|s| s.1 - s.0).sum();
        *lock(&m.progress) = Some(Progress {
            source: src_member.addr.clone(),
            full,
            resumed,
            total,
            done: 0,
            copied: 0,
            started: Instant::now(),
        });
        drop(src);
        let started = Instant::now();
        let mut last_mark = Instant::now();
        let mut done = 0u64;
        let mut copied = 0u64;
        let parallel = self.opts.rebuild_parallel.max(1);
        let mut stream = futures::stream::iter(steps.into_iter().map(|(start, end, stamp)| async move {
            let n = self.copy_step(m, link, start, end, stamp).await?;
            Ok::<_, Error>((start, end, n))
        }))
        .buffered(parallel);
        while let Some(step) = stream.next().await {
            let (start, end, n) = step?;
            if m.session.load(Ordering::SeqCst) != session {
                return Err(Error::new(ErrorKind::Unavailable, "rebuild interrupted"));
            }
            if self.stopping.load(Ordering::SeqCst) {
                return Err(Error::new(ErrorKind::Unavailable, "controller stopping"));
            }
            copied += n;
            done += end - start;
            if let Some(p) = lock(&m.progress).as_mut() {
                p.copied = copied;
                p.done = done;
            }
            if last_mark.elapsed() >= Duration::from_secs(1) {
                // Progress is only recorded over data made durable first.
                link.flush().await?;
                let progress = end.div_ceil(region);
                link.set_rebuild(Some(&RebuildMark { progress, pieces: mark.pieces.clone() })).await?;
                last_mark = Instant::now();
            }
            if self.opts.rebuild_rate > 0 {
                let due = Duration::from_secs_f64(copied as f64 / self.opts.rebuild_rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        drop(stream);
        if let Some(p) = lock(&m.progress).as_mut() {
            p.done = total;
        }
        link.flush().await
    }

    /// Makes `start..end` of the target match a healthy replica, under the
    /// write range lock (so no write is in between). Returns data bytes copied.
    async fn copy_step(
        &self,
        m: &Member<C::Link>,
        link: &C::Link,
        start: u64,
        end: u64,
        stamp: u64,
    ) -> Result<u64> {
        let _range = self.writes.lock(start, end, true).await;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (src_m, src) = self
                .read_order()
                .find(|(s, _)| !std::ptr::eq(&**s, m))
                .ok_or_else(|| Error::new(ErrorKind::Unavailable, "no healthy replica to rebuild from"))?;
            match self.copy_from(&src, link, start, end, stamp).await {
                Ok(n) => {
                    src_m.reads.fetch_add(1, Ordering::Relaxed);
                    return Ok(n);
                }
                Err(CopyError::Source(e)) if attempts < 4 => {
                    src_m.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(source = %src_m.addr, "rebuild read failed, trying another source: {e}");
                    if is_link_error(e.kind()) {
                        self.fail(&src_m, &e).await;
                    }
                }
                Err(CopyError::Source(e) | CopyError::Target(e)) => return Err(e),
            }
        }
    }

    async fn copy_from(
        &self,
        src: &C::Link,
        dst: &C::Link,
        start: u64,
        end: u64,
        stamp: u64,
    ) -> Result<u64, CopyError> {
        let len = end - start;
        let (s_ext, t_ext) = tokio::join!(src.block_status(start, len), dst.block_status(start, len));
        let s_ext = s_ext.map_err(CopyError::Source)?;
        let t_ext = t_ext.map_err(CopyError::Target)?;
        let mut copied = 0;
        for (off, n, s_state, t_state) in zip_extents(start, &s_ext, &t_ext, end) {
            match s_state {
                ExtentState::Data => {
                    let data = src.read(off, n as usize).await.map_err(CopyError::Source)?;
                    let crc = crate::crc32c(&data);
                    dst.write_at(off, data, false, stamp, Some(crc)).await.map_err(CopyError::Target)?;
                    copied += n;
                }
                ExtentState::Zero | ExtentState::Hole if t_state == ExtentState::Data => {
                    dst.trim_at(off, n, false, stamp).await.map_err(CopyError::Target)?;
                }
                _ => {}
            }
        }
        Ok(copied)
    }

    /// Starts a new generation now and then (when something was written),
    /// so that a replica that leaves later needs only what was written since.
    async fn checkpoints(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.opts.checkpoint_interval).await;
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            if self.healthy_count() == 0 || !self.wrote.swap(false, Ordering::Relaxed) {
                continue;
            }
            // Data older than the new generation must be durable everywhere
            // before the record says so.
            if self.flush().await.is_err() {
                continue;
            }
            let mut rec = self.record.lock().await;
            let ids = rec.members.clone();
            if let Err(e) = self.bump_locked(&mut rec, ids, false).await {
                tracing::warn!(volume = %self.name, "checkpoint failed: {e}");
            }
        }
    }
}

/// What a volume-wide snapshot create did.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotCreated {
    pub name: String,
    /// How long new writes waited for the fence (in-flight writes finishing).
    pub fence_wait_ms: f64,
    /// How long writes were fenced while every replica cut the snapshot.
    pub pause_ms: f64,
    /// Replicas that hold the snapshot.
    pub replicas: Vec<String>,
}

/// A snapshot of the volume, for listings.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotStatus {
    pub name: String,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub parent: Option<String>,
    /// Bytes of data written while it was the head (unique to it).
    pub size_bytes: u64,
    /// `user` or `system`.
    pub kind: &'static str,
    /// Being deleted (its data merging into its child).
    pub merging: bool,
}

/// Snapshots and pausing.
impl<C: Connector> Volume<C> {
    async fn wait_unpaused(&self) {
        while self.paused.load(Ordering::SeqCst) {
            let resumed = self.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !self.paused.load(Ordering::SeqCst) {
                return;
            }
            resumed.await;
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Stops new I/O (it waits) and waits for I/O in flight to finish.
    pub async fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        drop(self.writes.lock(0, self.size, true).await);
        while self.members_snapshot().iter().any(|m| m.in_flight.load(Ordering::Relaxed) > 0) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Lets I/O go on after [`Volume::pause`].
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.resumed.notify_waiters();
    }

    /// The snapshot operations lock, or Unavailable if it stays taken
    /// (a returning replica copying the snapshots holds it for long).
    async fn snapshot_ops(&self) -> Result<tokio::sync::MutexGuard<'_, ()>> {
        tokio::time::timeout(SNAPSHOT_OPS_WAIT, self.snapshot_ops.lock()).await.map_err(|_| {
            Error::new(
                ErrorKind::Unavailable,
                "a returning replica is copying the snapshots, or another snapshot operation runs; try again",
            )
            .with_op(Op::Snapshot)
        })
    }

    /// Serving members (healthy and rebuilding) with their links.
    fn participants(&self) -> Vec<Pick<C::Link>> {
        self.members_snapshot()
            .into_iter()
            .filter(|m| matches!(m.state(), ReplicaState::Healthy | ReplicaState::Rebuilding))
            .filter_map(|m| m.link().map(|l| (m, l)))
            .collect()
    }

    /// Takes a crash-consistent snapshot: writes are fenced (the
    /// whole-volume write range lock waits for those in flight and holds
    /// new ones), every replica cuts its snapshot at that same point, then
    /// writes go on. Reads continue throughout. Refused while a replica
    /// rebuilds (its copy is not complete yet).
    pub async fn snapshot_create(&self, name: &str) -> Result<SnapshotCreated> {
        self.wait_quorum(Op::Snapshot).await?;
        let _ops = self.snapshot_ops().await?;
        if self.members_snapshot().iter().any(|m| m.state() == ReplicaState::Rebuilding) {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "a replica is rebuilding; take the snapshot once it is healthy",
            )
            .with_op(Op::Snapshot));
        }
        let asked = Instant::now();
        let _fence = self.writes.lock(0, self.size, true).await;
        let fenced = Instant::now();
        let targets: Vec<_> = self.participants().into_iter().filter(|(m, _)| m.is_healthy()).collect();
        // One creation time for all: replicas compare snapshots by it.
        let created_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        let results = join_all(targets.iter().map(|(_, l)| l.create_snapshot(name, false, created_ms))).await;
        let pause = fenced.elapsed();
        drop(_fence);
        let mut done = Vec::new();
        let mut first_err = None;
        for ((m, _), r) in targets.iter().zip(results) {
            match r {
                Ok(()) => done.push(m.addr.clone()),
                Err(e) if is_request_error(e.kind()) => first_err = Some(e),
                Err(e) => {
                    // A replica without the snapshot must not stay a member.
                    tracing::warn!(replica = %m.addr, "snapshot failed: {e}");
                    self.fail(m, &e).await;
                    first_err.get_or_insert(e);
                }
            }
        }
        if done.is_empty() {
            return Err(first_err.unwrap_or_else(|| self.unavailable(Op::Snapshot)).with_op(Op::Snapshot));
        }
        if let Some(e) = first_err.filter(|e| is_request_error(e.kind())) {
            return Err(e.with_op(Op::Snapshot));
        }
        let (fence_wait_ms, pause_ms) =
            ((fenced - asked).as_secs_f64() * 1000.0, pause.as_secs_f64() * 1000.0);
        tracing::info!(volume = %self.name, snapshot = name, pause_ms, fence_wait_ms, "snapshot created");
        Ok(SnapshotCreated { name: name.to_owned(), fence_wait_ms, pause_ms, replicas: done })
    }

    /// The snapshots, oldest first, as a healthy replica holds them.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotStatus>> {
        let mut last_err = None;
        for (_, link) in self.read_order() {
            match link.snapshots().await {
                Ok(list) => return Ok(snapshot_statuses(list)),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| self.unavailable(Op::Snapshot)))
    }

    /// Deletes snapshot `name` on every replica (each merges it into its
    /// child in the background; listings show it as merging until done).
    pub async fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.wait_quorum(Op::Snapshot).await?;
        let _ops = self.snapshot_ops().await?;
        let targets = self.participants();
        let results = join_all(targets.iter().map(|(_, l)| l.delete_snapshot(name))).await;
        let mut ok = 0;
        let mut first_err = None;
        for ((m, _), r) in targets.iter().zip(results) {
            match r {
                Ok(()) => ok += 1,
                Err(e) => {
                    tracing::warn!(replica = %m.addr, snapshot = name, "snapshot delete failed: {e}");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if ok == 0 || is_request_error(e.kind()) => Err(e.with_op(Op::Snapshot)),
            _ => Ok(()),
        }
    }

    /// Makes the volume's contents those of snapshot `name` on every
    /// replica. The volume must be paused ([`Volume::pause`]): clients
    /// would otherwise see their data change under them. A rebuilding
    /// replica reverts too: its snapshots were copied before it received
    /// any write, so its new head is the same as the others' (the rest of
    /// its rebuild then copies what is already equal).
    pub async fn snapshot_revert(&self, name: &str) -> Result<()> {
        if !self.is_paused() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "revert changes the volume under its clients: detach the NBD/iSCSI clients and pause I/O \
                 first (`jiva snapshot revert NAME --pause` pauses for the revert)",
            )
            .with_op(Op::Snapshot));
        }
        let _ops = self.snapshot_ops().await?;
        let _fence = self.writes.lock(0, self.size, true).await;
        self.wrote.store(true, Ordering::Relaxed);
        let targets = self.participants();
        let results = {
            let io = self.enter();
            join_all(targets.iter().map(|(_, l)| l.revert_snapshot(name, io.generation))).await
        };
        let mut ok = 0;
        let mut first_err = None;
        for ((m, _), r) in targets.iter().zip(results) {
            match r {
                Ok(()) => ok += 1,
                Err(e) if is_request_error(e.kind()) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    tracing::warn!(replica = %m.addr, "revert failed: {e}");
                    self.mark_failed(m, &e);
                    first_err.get_or_insert(e);
                }
            }
        }
        if ok == 0 {
            return Err(first_err.unwrap_or_else(|| self.unavailable(Op::Snapshot)).with_op(Op::Snapshot));
        }
        if let Some(e) = first_err.filter(|e| is_request_error(e.kind())) {
            return Err(e.with_op(Op::Snapshot));
        }
        self.sync_membership().await?;
        tracing::info!(volume = %self.name, snapshot = name, "volume reverted");
        Ok(())
    }

    /// Reads `len` bytes at `offset` of snapshot `name` from a healthy replica.
    pub async fn read_snapshot(&self, name: &str, offset: u64, len: usize) -> Result<Bytes> {
        let mut last_err = None;
        for (m, link) in self.read_order() {
            let _in_flight = InFlight::new(&m.in_flight);
            match link.read_snapshot(name, offset, len).await {
                Ok(data) => return Ok(data),
                Err(e) if is_request_error(e.kind()) => return Err(e),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| self.unavailable(Op::Read)))
    }

    /// Allocation of `offset..offset+len` in snapshot `name`.
    pub async fn snapshot_block_status(&self, name: &str, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut last_err = None;
        for (_, link) in self.read_order() {
            match link.snapshot_block_status(name, offset, len).await {
                Ok(ext) => return Ok(ext),
                Err(e) if is_request_error(e.kind()) => return Err(e),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| self.unavailable(Op::BlockStatus)))
    }
}

fn snapshot_statuses(list: Vec<SnapshotEntry>) -> Vec<SnapshotStatus> {
    let mut parent: Option<String> = None;
    list.into_iter()
        .map(|s| SnapshotStatus {
            parent: parent.replace(s.name.clone()),
            name: s.name,
            created_ms: s.created_ms,
            size_bytes: s.allocated_bytes,
            kind: if s.system { "system" } else { "user" },
            merging: s.merging,
        })
        .collect()
}

enum CopyError {
    Source(Error),
    Target(Error),
}

/// Walks two extent maps of `start..end` together: (offset, length, source
/// state, target state) runs.
fn zip_extents(
    start: u64,
    a: &[Extent],
    b: &[Extent],
    end: u64,
) -> Vec<(u64, u64, ExtentState, ExtentState)> {
    let mut out = Vec::new();
    let (mut ia, mut ib) = (0, 0);
    let (mut left_a, mut left_b) = (a.first().map_or(0, |e| e.length), b.first().map_or(0, |e| e.length));
    let mut pos = start;
    while pos < end {
        let sa = a.get(ia).map_or(ExtentState::Hole, |e| e.state);
        let sb = b.get(ib).map_or(ExtentState::Hole, |e| e.state);
        let la = if ia < a.len() { left_a } else { end - pos };
        let lb = if ib < b.len() { left_b } else { end - pos };
        let n = la.min(lb).min(end - pos);
        if n == 0 {
            if ia < a.len() && left_a == 0 {
                ia += 1;
                left_a = a.get(ia).map_or(0, |e| e.length);
            }
            if ib < b.len() && left_b == 0 {
                ib += 1;
                left_b = b.get(ib).map_or(0, |e| e.length);
            }
            continue;
        }
        match out.last_mut() {
            Some((o, l, x, y)) if *x == sa && *y == sb && *o + *l == pos => *l += n,
            _ => out.push((pos, n, sa, sb)),
        }
        pos += n;
        if ia < a.len() {
            left_a -= n;
        }
        if ib < b.len() {
            left_b -= n;
        }
    }
    out
}

/// A piped WRITE payload being handed to each replica.
enum SharedPayload {
    /// Every replica so far got a duplicate (`tee`: the same pages).
    Pipe(Piped),
    /// A duplicate could not be made: the rest get a copy in memory.
    Bytes(Bytes),
    /// Neither: the payload is lost to the remaining replicas.
    Gone,
}

impl SharedPayload {
    /// The payload for one more replica; `last` hands over the pipe itself.
    fn share(&mut self, last: bool) -> Result<Payload> {
        match std::mem::replace(self, SharedPayload::Gone) {
            SharedPayload::Pipe(pipe) if last => Ok(Payload::Piped(pipe)),
            SharedPayload::Pipe(pipe) => match pipe.try_clone() {
                Ok(dup) => {
                    *self = SharedPayload::Pipe(pipe);
                    Ok(Payload::Piped(dup))
                }
                Err(e) => {
                    tracing::debug!("duplicating a piped write failed, copying it: {e}");
                    let data = pipe.into_bytes().map_err(|e| Error::from(e).with_op(Op::Write))?;
                    *self = SharedPayload::Bytes(data.clone());
                    Ok(Payload::Bytes(data))
                }
            },
            SharedPayload::Bytes(data) => {
                *self = SharedPayload::Bytes(data.clone());
                Ok(Payload::Bytes(data))
            }
            SharedPayload::Gone => {
                Err(Error::new(ErrorKind::Io, "a piped write payload could not be read").with_op(Op::Write))
            }
        }
    }
}

impl<C: Connector> BlockDevice for Volume<C> {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        // Flush goes to every replica and covers every completed write, so
        // several connections may share the volume.
        Capabilities::full()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.read_from_one(offset, len, |link| async move { link.read(offset, len).await }).await
    }

    fn read_at_once(&self, offset: u64, len: usize) -> Option<Bytes> {
        // Anything but the plain case goes the async way, which waits.
        // (A read that slips past a pause that begins meanwhile is one in
        // flight when it began; a chain change revokes the files it reads.)
        if self.is_paused() || self.healthy_count() < self.opts.min_healthy.max(1) {
            return None;
        }
        // One member, picked as the async reads pick them. Where it cannot
        // (not cached, a checksum mismatch), the async read that follows
        // asks it first, so a corrupt copy is still found out by its
        // replica and repaired from another.
        let (pos, (m, link)) =
            self.read_order_at(None).into_iter().find(|(_, (_, link))| link.reads_at_once(len))?;
        let _in_flight = InFlight::new(&m.in_flight);
        let Some(data) = link.read_at_once(offset, len) else {
            self.note_at_once_miss(offset, pos);
            return None;
        };
        m.reads.fetch_add(1, Ordering::Relaxed);
        Some(data)
    }

    fn reads_at_once(&self, len: usize) -> bool {
        let members = self.members.read().unwrap_or_else(PoisonError::into_inner);
        members.iter().any(|m| m.is_healthy() && m.link().is_some_and(|l| l.reads_at_once(len)))
    }

    async fn read_payload(&self, offset: u64, len: usize) -> Result<Payload> {
        self.read_from_one(offset, len, |link| async move { link.read_payload(offset, len).await }).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let len = data.len() as u64;
        if self.members_sharing_payloads() > 1 {
            // One checksum pass for all of them (see `crate::shm`).
            self.connector.share_block_crcs(&data);
        }
        self.replicate(Op::Write, offset, len, |r, g, fan| {
            let data = data.clone();
            async move {
                if fan.many {
                    r.fan_out_write_at(offset, data, fua, g).await
                } else {
                    r.write_at(offset, data, fua, g, None).await
                }
            }
        })
        .await
    }

    fn takes_piped_writes(&self) -> bool {
        true
    }

    fn payload_buffer(&self, len: usize) -> Option<crate::shm::ShmBuf> {
        // Only while some replica that takes writes maps the memory: the
        // others get a copy of the payload on their socket, which costs
        // more than the pipes a payload outside it can go through.
        if self.members_sharing_payloads() > 0 { self.connector.payload_buffer(len) } else { None }
    }

    async fn write_payload(&self, offset: u64, data: Payload, fua: bool) -> Result<()> {
        let pipe = match data {
            Payload::Bytes(data) => return self.write(offset, data, fua).await,
            Payload::Piped(pipe) => pipe,
        };
        let len = pipe.len() as u64;
        let shared = Mutex::new(SharedPayload::Pipe(pipe));
        self.replicate(Op::Write, offset, len, |r, g, fan| {
            let payload = shared.lock().unwrap_or_else(PoisonError::into_inner).share(fan.last);
            async move {
                match payload? {
                    Payload::Piped(p) => r.write_piped_at(offset, p, fua, g).await,
                    Payload::Bytes(b) if fan.many => r.fan_out_write_at(offset, b, fua, g).await,
                    Payload::Bytes(b) => r.write_at(offset, b, fua, g, None).await,
                }
            }
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        self.replicate(Op::Flush, 0, 0, |r, _, _| async move { r.flush().await }).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.replicate(Op::Trim, offset, len, |r, g, _| async move { r.trim_at(offset, len, fua, g).await })
            .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.replicate(Op::WriteZeroes, offset, len, |r, g, _| async move {
            r.zeroes_at(offset, len, flags, g).await
        })
        .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.wait_unpaused().await;
        let mut last_err = None;
        for (_, link) in self.read_order() {
            match link.block_status(offset, len).await {
                Ok(ext) => return Ok(ext),
                Err(e) if is_request_error(e.kind()) => return Err(e),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| self.unavailable(Op::BlockStatus)))
    }
}

#[cfg(test)]
mod tests;
