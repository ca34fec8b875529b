//! The replica store: one replica's copy of a volume, in sparse files under
//! a directory (layout in [`crate::format`]), served as a [`BlockDevice`].
//!
//! Every block carries a crc32c in its record, written with the data and
//! made durable with it by FLUSH and FUA; every block read is checked.
//! Unaligned requests read-modify-write their edge blocks. A [`RangeLock`]
//! over blocks (exclusive for changes, shared for reads and block status)
//! keeps a reader from seeing a block between its data and its record
//! update, and two partial writes to one block from losing either.
//!
//! Changes (write, trim, write-zeroes) run as their own tokio task, so a
//! caller that gives up cannot release the range lock while the kernel
//! still works on the request. The write-intent bitmap ([`crate::intent`])
//! makes torn, unacknowledged writes recoverable after a crash.

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use bytes::Bytes;
use jiva_core::device::check_range;
use jiva_core::local::Validity;
use jiva_core::pipe::{self, Filled, Payload, Piped};
use jiva_core::range_lock::RangeLock;
use jiva_core::wire::{Membership, RebuildMark, ReplicaMeta};
use jiva_core::{
    BLOCK_SIZE, BlockDevice, Capabilities, Error, ErrorKind, Extent, ExtentState, Op, Result, ZeroFlags,
    block_span,
};

use crate::engine::aligned::{AlignedBuf, aligned_bytes};
use crate::engine::{Action, Batch, Completion, Engine, EngineKind, Outcome, Request, cache};
use crate::format::{self, BlockRecord, Manifest, RECORD_SIZE, SnapshotMeta};
use crate::index::BlockIndex;
use crate::intent::{self, Intent};
use crate::records::RecordMap;

const BS: u64 = BLOCK_SIZE as u64;
const BSZ: usize = BLOCK_SIZE as usize;
const REC: u64 = RECORD_SIZE as u64;
const RECZ: usize = RECORD_SIZE as usize;
/// Records of writes up to this size (those of 16 KiB of data) are stored
/// through the records mapping ([`RecordMap::put`]) rather than written.
/// Larger writes lost with it: their records `pwrite` is one syscall among
/// several, while each records page they store into is dirtied faster,
/// then cleaned by writeback (an rmap walk and TLB flush) and faulted in
/// again (3 replicas: 1 MiB writes 10 % more CPU per MiB, 64 KiB random
/// writes 12 % fewer IOPS).
const MAPPED_RECORDS_BYTES: usize = 4 * RECZ;
/// Blocks per record read or write in bulk paths (1 MiB of records).
const CHUNK_BLOCKS: u64 = 1 << 16;
/// Intent regions recovered per engine batch at open.
const RECOVERY_BATCH: usize = 16;

/// How to open a store.
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    /// The I/O engine; `None` = io_uring, or the sync engine if io_uring is
    /// unavailable.
    pub engine: Option<EngineKind>,
    /// Bypass the page cache for the data files (O_DIRECT) where the file
    /// system allows it: cheaper writes and faster rebuilds, but reads
    /// always go to the device.
    pub direct_io: bool,
}

/// Who a store belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The volume the store is bound to, if any.
    pub volume: Option<String>,
    pub size: u64,
    /// Newest controller epoch that attached.
    pub epoch: u64,
    /// Whether the previous process closed the store cleanly.
    pub clean_open: bool,
}

/// See the module documentation.
pub struct Store {
    inner: Arc<Inner>,
}

struct Layer {
    id: u64,
    /// Opened with O_DIRECT when asked for and the file system allows it
    /// (`StoreOptions::direct_io`): the volume's clients cache for
    /// themselves, and small random writes into large page-cache folios
    /// cost tens of microseconds of CPU each.
    data: Arc<File>,
    /// Whether `data` is O_DIRECT (buffers must then be aligned).
    direct: bool,
    /// When `data` goes through the page cache: an O_DIRECT descriptor of
    /// the same file for large writes (rebuild copies, sequential writes)
    /// and large reads of data the cache does not hold. Filling fresh
    /// page-cache folios costs more CPU than the copy into an aligned
    /// buffer, and the client caches for itself. The kernel keeps both
    /// views coherent (a direct read writes dirty cached pages back
    /// first); the range lock keeps them ordered.
    bulk: Option<Arc<File>>,
    records: Arc<File>,
    /// `records`, mapped: reads look their records up here.
    record_map: RecordMap,
    /// Blocks with a record in this layer (an over-approximation while a
    /// change is in flight: reads fall through on an empty record).
    index: RwLock<BlockIndex>,
}

/// The layers, oldest first, the writable head last; never empty.
type Chain = Arc<Vec<Arc<Layer>>>;

/// A snapshot as listed by [`Store::snapshots`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    /// Layer id (store-local).
    pub id: u64,
    pub created_ms: u64,
    pub system: bool,
    /// The next older snapshot, if any.
    pub parent: Option<String>,
    /// Bytes of blocks held in this snapshot's own layer.
    pub allocated_bytes: u64,
    /// Being deleted (merged into its child).
    pub merging: bool,
}

/// Rebuild copies of at least this many bytes, and reads of at least this
/// many bytes not all in the page cache, use [`Layer::bulk`] when it exists.
const BULK: usize = 256 * 1024;

/// How [`Inner::write_blocks`] writes.
#[derive(Clone, Copy)]
struct WriteKind<'a> {
    fua: bool,
    /// The crc32c the whole (block-aligned) payload must have.
    copy: Option<u32>,
    /// Bypass the page cache when large (rebuild copies).
    bulk: bool,
    /// The blocks' crc32cs as the controller computed them, big-endian,
    /// one per block of the (block-aligned) payload: recorded as they are.
    crcs: Option<&'a [u8]>,
}

impl WriteKind<'static> {
    const PLAIN: WriteKind<'static> = WriteKind { fua: false, copy: None, bulk: false, crcs: None };
}

fn payload_mismatch(offset: u64) -> Error {
    Error::new(ErrorKind::Corrupt, "write payload does not match its crc").at(offset)
}

/// crc32c of `a ++ b` from crc32c(a) and crc32c(b), where b is one block:
/// a linear map of crc32c(a) (multiplication by x^(8 * 4096) mod P),
/// tabulated once per byte position, then xor.
fn crc_then_block(a: u32, b: u32) -> u32 {
    static SHIFT: std::sync::OnceLock<[[u32; 256]; 4]> = std::sync::OnceLock::new();
    let t = SHIFT.get_or_init(|| {
        let mut t = [[0u32; 256]; 4];
        for (k, row) in t.iter_mut().enumerate() {
            for (v, cell) in row.iter_mut().enumerate() {
                *cell = crc32c::crc32c_combine((v as u32) << (8 * k), 0, BSZ);
            }
        }
        t
    });
    let [b0, b1, b2, b3] = a.to_le_bytes();
    t[0][usize::from(b0)] ^ t[1][usize::from(b1)] ^ t[2][usize::from(b2)] ^ t[3][usize::from(b3)] ^ b
}

impl Layer {
    /// The descriptor to read `len` bytes at `offset` of the data file from.
    fn data_for_read(&self, offset: u64, len: usize) -> &Arc<File> {
        match &self.bulk {
            Some(bulk)
                if len >= BULK && cache::fully_cached(&self.data, offset, len as u64) == Some(false) =>
            {
                bulk
            }
            _ => &self.data,
        }
    }
}

struct Inner {
    dir: PathBuf,
    size: u64,
    blocks: u64,
    engine: Engine,
    /// Over block numbers.
    lock: RangeLock,
    /// Replaced (never changed in place) by snapshot create, revert and
    /// the end of a merge, each under the whole-store range lock.
    chain: RwLock<Chain>,
    direct_io: bool,
    /// Serializes changes of the chain (create, delete, revert).
    structure: tokio::sync::Mutex<()>,
    /// Woken when a merge ends.
    merge_done: tokio::sync::Notify,
    /// A merge task is running.
    merging: std::sync::atomic::AtomicBool,
    /// Why the last merge stopped, if it failed.
    merge_error: Mutex<Option<Error>>,
    intent: Intent,
    intent_file: Arc<File>,
    /// Serializes bitmap updates (group commit).
    intent_commit: tokio::sync::Mutex<()>,
    /// Durable region stamps (see [`crate::format`]).
    stamps: Vec<AtomicU64>,
    stamps_file: Arc<File>,
    /// Serializes stamp updates.
    stamp_commit: tokio::sync::Mutex<()>,
    /// Stamp raises waiting for the next commit (region -> generation), so
    /// that one fdatasync covers every concurrent first write to a region.
    stamp_pending: Mutex<std::collections::BTreeMap<u64, u64>>,
    manifest: Mutex<Manifest>,
    /// Serializes manifest rewrites.
    manifest_update: tokio::sync::Mutex<()>,
    clean_open: bool,
    /// Validity words of the layer files handed to local controllers (see
    /// [`Store::local_files`]); all revoked when the chain changes.
    local_grants: Mutex<Vec<std::sync::Weak<Validity>>>,
    /// Holds the `flock` that keeps other processes out.
    _lock_file: File,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .field("size", &self.inner.size)
            .field("engine", &self.inner.engine.kind())
            .field("layers", &self.inner.chain().iter().map(|l| l.id).collect::<Vec<_>>())
            .finish()
    }
}

/// Files of a store, opened (or created) by [`open_dir`].
struct Opened {
    manifest: Manifest,
    chain: Vec<Layer>,
    intent_file: File,
    intent_bytes: Vec<u8>,
    stamps_file: File,
    stamps: Vec<u64>,
    lock_file: File,
}

impl Store {
    /// Opens DIR, creating a new store of `size` bytes if DIR holds none.
    /// An existing store whose size differs is an error (InvalidArgument).
    /// After an unclean shutdown, torn writes in marked regions are
    /// repaired before this returns.
    pub async fn open(dir: &Path, size: u64, opts: StoreOptions) -> Result<Store> {
        if size == 0 || !size.is_multiple_of(BS) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("store size {size} is not a positive multiple of {BS}"),
            )
            .with_op(Op::Open));
        }
        let engine = Engine::start(opts.engine).map_err(|e| {
            let e = Error::from(e);
            Error::new(e.kind(), format!("cannot start the I/O engine: {}", e.message())).with_op(Op::Open)
        })?;
        let path = dir.to_path_buf();
        let direct_io = opts.direct_io;
        let opened =
            blocking(move || open_dir(&path, size, direct_io)).await.map_err(|e| e.with_op(Op::Open))?;
        let region_blocks = u64::from(opened.manifest.region_size) / BS;
        let blocks = size / BS;
        let clean_open = opened.manifest.clean;
        let inner = Inner {
            dir: dir.to_path_buf(),
            size,
            blocks,
            engine,
            lock: RangeLock::new(),
            chain: RwLock::new(Arc::new(opened.chain.into_iter().map(Arc::new).collect())),
            direct_io,
            structure: tokio::sync::Mutex::new(()),
            merge_done: tokio::sync::Notify::new(),
            merging: std::sync::atomic::AtomicBool::new(false),
            merge_error: Mutex::new(None),
            intent: Intent::new(blocks, region_blocks),
            intent_file: Arc::new(opened.intent_file),
            intent_commit: tokio::sync::Mutex::new(()),
            stamps: opened.stamps.into_iter().map(AtomicU64::new).collect(),
            stamps_file: Arc::new(opened.stamps_file),
            stamp_commit: tokio::sync::Mutex::new(()),
            stamp_pending: Mutex::new(std::collections::BTreeMap::new()),
            manifest: Mutex::new(opened.manifest),
            manifest_update: tokio::sync::Mutex::new(()),
            clean_open,
            local_grants: Mutex::new(Vec::new()),
            _lock_file: opened.lock_file,
        };
        let marked = intent::marked_regions(&opened.intent_bytes, inner.intent.regions());
        if !marked.is_empty() {
            let repaired = inner.recover(&marked).await.map_err(|e| e.with_op(Op::Open))?;
            if repaired > 0 {
                tracing::warn!(
                    dir = %inner.dir.display(),
                    "recovered {repaired} torn block(s) in {} region(s) after an unclean shutdown",
                    marked.len()
                );
            }
            inner.clear_intent().await.map_err(|e| e.with_op(Op::Open))?;
        }
        inner.set_clean(false).await.map_err(|e| e.with_op(Op::Open))?;
        tracing::info!(
            dir = %inner.dir.display(),
            size,
            engine = %inner.engine.kind(),
            clean_open,
            "store opened"
        );
        let inner = Arc::new(inner);
        let merging = inner.manifest().merging;
        if let Some(id) = merging {
            tracing::info!(dir = %inner.dir.display(), layer = id, "finishing an interrupted snapshot delete");
            inner.merging.store(true, Ordering::SeqCst);
            tokio::spawn(inner.clone().merge_task(id));
        }
        Ok(Store { inner })
    }

    pub fn identity(&self) -> Identity {
        let m = self.inner.manifest();
        Identity { volume: m.volume.clone(), size: m.size, epoch: m.epoch, clean_open: self.inner.clean_open }
    }

    /// Binds the store to `volume` at controller `epoch`, durably before
    /// returning. Err(Fenced) if `epoch` is older than the stored epoch;
    /// Err(InvalidArgument) if the store belongs to another volume.
    pub async fn attach(&self, volume: &str, epoch: u64) -> Result<()> {
        if volume.is_empty() || volume.len() > format::MAX_VOLUME_NAME {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("volume name must be 1 to {} bytes", format::MAX_VOLUME_NAME),
            )
            .with_op(Op::Handshake));
        }
        let inner = self.inner.clone();
        let volume = volume.to_owned();
        detached(async move {
            inner
                .update_manifest(move |m| {
                    if let Some(bound) = &m.volume
                        && *bound != volume
                    {
                        return Err(Error::new(
                            ErrorKind::InvalidArgument,
                            format!("store belongs to volume {bound:?}, not {volume:?}"),
                        ));
                    }
                    if epoch < m.epoch {
                        return Err(Error::new(
                            ErrorKind::Fenced,
                            format!("epoch {epoch} is older than the store's epoch {}", m.epoch),
                        ));
                    }
                    m.volume = Some(volume);
                    m.epoch = epoch;
                    Ok(())
                })
                .await
        })
        .await
        .map_err(|e| e.with_op(Op::Handshake))
    }

    /// Identity, generation record and rebuild mark, for the controller.
    pub fn meta(&self) -> ReplicaMeta {
        let m = self.inner.manifest();
        ReplicaMeta {
            store_id: m.store_id,
            region_size: m.region_size,
            membership: m.membership.clone(),
            rebuild: m.rebuild.clone(),
        }
    }

    /// Records a generation record durably. A record older than the one
    /// held is refused (InvalidArgument).
    pub async fn set_membership(&self, record: Membership) -> Result<()> {
        let inner = self.inner.clone();
        detached(async move {
            inner
                .update_manifest(move |m| {
                    if (record.generation, record.epoch) < (m.membership.generation, m.membership.epoch) {
                        return Err(Error::new(
                            ErrorKind::InvalidArgument,
                            format!(
                                "generation {} is older than the recorded {}",
                                record.generation, m.membership.generation
                            ),
                        ));
                    }
                    m.membership = record;
                    Ok(())
                })
                .await
        })
        .await
        .map_err(|e| e.with_op(Op::Handshake))
    }

    /// Records (or clears) the rebuild mark durably.
    pub async fn set_rebuild(&self, mark: Option<RebuildMark>) -> Result<()> {
        let inner = self.inner.clone();
        detached(async move {
            inner
                .update_manifest(move |m| {
                    m.rebuild = mark;
                    Ok(())
                })
                .await
        })
        .await
        .map_err(|e| e.with_op(Op::Handshake))
    }

    /// Stamps of `count` regions from region `first`.
    pub fn stamps(&self, first: u64, count: u64) -> Result<Vec<u64>> {
        let end = first.checked_add(count).filter(|&e| e <= self.inner.stamps.len() as u64);
        let Some(end) = end else {
            return Err(Error::new(ErrorKind::OutOfRange, "stamp range beyond the last region"));
        };
        Ok(self.inner.stamps[first as usize..end as usize]
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .collect())
    }

    /// Number of stamp regions.
    pub fn regions(&self) -> u64 {
        self.inner.stamps.len() as u64
    }

    /// A rebuild copy of volume generation `generation`: `data` must have
    /// crc32c `crc` (checked in the same pass that computes the block
    /// records; a mismatch is `Corrupt` and nothing is written), and large
    /// copies bypass the page cache, as nobody reads them back soon.
    pub async fn write_copy(&self, offset: u64, data: Bytes, generation: u64, crc: u32) -> Result<()> {
        let inner = self.inner.clone();
        detached(async move {
            inner.raise_stamps(offset, data.len() as u64, generation).await?;
            inner.write_with(offset, data, false, Some(crc), None).await
        })
        .await
    }

    /// WRITE of volume generation `generation` (see [`crate::format`], stamps).
    pub async fn write_gen(&self, offset: u64, data: Bytes, fua: bool, generation: u64) -> Result<()> {
        let inner = self.inner.clone();
        detached(async move {
            inner.raise_stamps(offset, data.len() as u64, generation).await?;
            inner.write(offset, data, fua).await
        })
        .await
        .map_err(|e| e.with_op(Op::Write))
    }

    /// Like [`Store::write_gen`], but run by the caller's task instead of
    /// a task of its own (no spawn: a write into the page cache then
    /// completes on its first poll). The caller must poll the future to
    /// completion, never drop it early (a dropped write would release its
    /// range lock while the kernel may still be writing), e.g. by spawning
    /// it if it does not complete at once.
    ///
    /// `crcs`, for a block-aligned payload, are its blocks' crc32cs as the
    /// caller computed them (big-endian u32s, one per block), recorded as
    /// they are: a wrong one makes its block read as corrupt. Ignored where
    /// they do not fit the payload.
    pub fn write_gen_to_completion(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
        generation: u64,
        crcs: Option<Bytes>,
    ) -> impl Future<Output = Result<()>> + Send + 'static {
        let inner = self.inner.clone();
        async move {
            inner.raise_stamps(offset, data.len() as u64, generation).await?;
            let written = inner.write_with(offset, data, fua, None, crcs.as_deref()).await;
            written.map_err(|e| e.with_op(Op::Write))
        }
    }

    /// TRIM of volume generation `generation`.
    pub async fn trim_gen(&self, offset: u64, len: u64, fua: bool, generation: u64) -> Result<()> {
        let inner = self.inner.clone();
        detached(async move {
            inner.raise_stamps(offset, len, generation).await?;
            inner.discard(offset, len, false, fua).await
        })
        .await
        .map_err(|e| e.with_op(Op::Trim))
    }

    /// WRITE_ZEROES of volume generation `generation`.
    pub async fn zeroes_gen(&self, offset: u64, len: u64, flags: ZeroFlags, generation: u64) -> Result<()> {
        let inner = self.inner.clone();
        detached(async move {
            inner.raise_stamps(offset, len, generation).await?;
            inner.discard(offset, len, flags.no_hole, flags.fua).await
        })
        .await
        .map_err(|e| e.with_op(Op::WriteZeroes))
    }

    /// The engine in use.
    pub fn engine(&self) -> EngineKind {
        self.inner.engine.kind()
    }

    /// Waits for I/O in progress, flushes everything and marks the store
    /// cleanly closed. The store stays usable; a later change marks it
    /// unclean again.
    pub async fn close(&self) -> Result<()> {
        let inner = self.inner.clone();
        detached(async move {
            let _all = inner.lock.lock(0, inner.blocks, true).await;
            inner.sync_head(0).await?;
            let _commit = inner.intent_commit.lock().await;
            inner.clear_intent().await?;
            inner.set_clean(true).await
        })
        .await
        .map_err(|e| e.with_op(Op::Flush))
    }
}

/// The layer files a local controller may read directly (see
/// [`jiva_core::local`]), with the word that says it still may.
#[derive(Debug)]
pub struct LocalGrant {
    /// Data and records files, head first.
    pub layers: Vec<(File, File)>,
    /// The layers are the whole chain.
    pub whole: bool,
    pub validity: Arc<Validity>,
}

impl LocalGrant {
    /// The descriptors to send, in the order [`jiva_core::local::LocalFiles::open`]
    /// takes them.
    pub fn fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        let files = self.layers.iter().flat_map(|(d, r)| [d.as_fd(), r.as_fd()]);
        files.chain([self.validity.fd()]).collect()
    }
}

impl Store {
    /// Read-only descriptors of the files of the whole chain (head first)
    /// if it has at most `max_layers` layers, else of the head alone, and a
    /// new validity word. The word is revoked when the chain next changes.
    ///
    /// Why not the top `max_layers` of a longer chain: a reader looks for a
    /// block in every layer it was lent before it may send the read to the
    /// replica, so blocks deep in a long chain would cost a records read per
    /// layer lent and then the round trip anyway.
    pub fn local_files(&self, max_layers: usize) -> Result<LocalGrant> {
        let inner = &self.inner;
        // Held over the registration, so that no chain change slips in
        // between the files opened and the grant registered.
        let chain = inner.chain.read().unwrap_or_else(PoisonError::into_inner);
        let open = |name: String| {
            File::open(inner.dir.join(&name))
                .map_err(|e| Error::new(ErrorKind::Io, format!("cannot open {name} for a local reader: {e}")))
        };
        let mut layers = Vec::new();
        let lend = if chain.len() <= max_layers { chain.len() } else { 1 };
        for layer in chain.iter().rev().take(lend) {
            layers
                .push((open(format::data_file_name(layer.id))?, open(format::records_file_name(layer.id))?));
        }
        let whole = layers.len() == chain.len();
        let validity = Arc::new(Validity::new().map_err(Error::from)?);
        let mut grants = inner.local_grants.lock().unwrap_or_else(PoisonError::into_inner);
        grants.retain(|g| g.strong_count() > 0);
        grants.push(Arc::downgrade(&validity));
        Ok(LocalGrant { layers, whole, validity })
    }
}

/// Snapshots (see [`crate::format`] for the design).
impl Store {
    /// Freezes the head as snapshot `name` and starts a new empty head.
    /// Waits for changes in flight and fences new ones meanwhile (the
    /// whole-store range lock), so the snapshot is one point in the write
    /// stream.
    pub async fn create_snapshot(&self, name: &str, system: bool) -> Result<()> {
        self.create_snapshot_at(name, system, None).await
    }

    /// [`Store::create_snapshot`] recording `created_ms` (milliseconds since
    /// the Unix epoch) as its creation time instead of the clock's: the
    /// controller gives every replica the same one, so that replicas can
    /// tell the same snapshot from a later one of the same name.
    pub async fn create_snapshot_at(&self, name: &str, system: bool, created_ms: Option<u64>) -> Result<()> {
        format::check_snapshot_name(name).map_err(|m| Error::new(ErrorKind::InvalidArgument, m))?;
        let inner = self.inner.clone();
        let name = name.to_owned();
        detached(async move { inner.create_snapshot(name, system, created_ms).await })
            .await
            .map_err(|e| e.with_op(Op::Snapshot))
    }

    /// Allocation of `offset..offset+len` in snapshot `name`'s own layer
    /// only (what was written while it was the head): Data, Zero (a ZERO
    /// record) or Hole (the layer holds no record; older layers may).
    /// Rebuild copies a snapshot layer by layer with it.
    pub async fn snapshot_layer_status(&self, name: &str, offset: u64, len: u64) -> Result<Vec<Extent>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let (first, count) = block_span(offset, len);
        let _range = self.inner.lock.lock(first, first + count, false).await;
        let own = self.inner.view_of(name).map_err(|e| e.with_op(Op::BlockStatus))?;
        let own = &own[own.len() - 1..];
        self.inner.view_status(own, offset, len).await.map_err(|e| e.with_op(Op::BlockStatus))
    }

    /// Drops every layer above snapshot `keep` (every snapshot if `None`),
    /// the head included, and starts a new empty head: the store then holds
    /// the contents of `keep` (or zeros). For a rebuild target whose
    /// snapshots differ from its source's; its head is rebuilt in full
    /// afterwards. Waits for a running merge first. Crash-safe: one
    /// manifest rewrite switches; leftover files go at the next open.
    pub async fn truncate_snapshots(&self, keep: Option<&str>) -> Result<()> {
        let inner = self.inner.clone();
        let keep = keep.map(str::to_owned);
        detached(async move { inner.truncate(keep).await }).await.map_err(|e| e.with_op(Op::Snapshot))
    }

    /// The snapshots, oldest first.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let m = self.inner.manifest().clone();
        let chain = self.inner.chain();
        m.snapshots
            .iter()
            .enumerate()
            .map(|(i, s)| SnapshotInfo {
                name: s.name.clone(),
                id: m.layers[i],
                created_ms: s.created_ms,
                system: s.system,
                parent: i.checked_sub(1).map(|p| m.snapshots[p].name.clone()),
                allocated_bytes: chain
                    .iter()
                    .find(|l| l.id == m.layers[i])
                    .map_or(0, |l| l.index.read().unwrap_or_else(PoisonError::into_inner).len() * BS),
                merging: m.merging == Some(m.layers[i]),
            })
            .collect()
    }

    /// Bytes of the head's own blocks.
    pub fn head_allocated_bytes(&self) -> u64 {
        self.inner.head().index.read().unwrap_or_else(PoisonError::into_inner).len() * BS
    }

    /// RAM used by the layer index, in bytes (all layers).
    pub fn index_memory_bytes(&self) -> u64 {
        self.inner
            .chain()
            .iter()
            .map(|l| l.index.read().unwrap_or_else(PoisonError::into_inner).memory_bytes() as u64)
            .sum()
    }

    /// Deletes snapshot `name`: records the merge into its child durably,
    /// then merges in the background (see [`Store::wait_merge`]); the
    /// snapshot is listed as merging until it is gone. One merge at a time.
    pub async fn delete_snapshot(&self, name: &str) -> Result<()> {
        let inner = self.inner.clone();
        let name = name.to_owned();
        detached(async move { inner.delete_snapshot(name).await }).await.map_err(|e| e.with_op(Op::Snapshot))
    }

    /// Waits until no merge runs; the error of the last merge if it failed.
    pub async fn wait_merge(&self) -> Result<()> {
        loop {
            let done = self.inner.merge_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if !self.inner.merging.load(Ordering::SeqCst) {
                return match self.inner.merge_error.lock().unwrap_or_else(PoisonError::into_inner).clone() {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
            }
            done.await;
        }
    }

    /// Makes the head's contents those of snapshot `name` (newer snapshots
    /// stay). Changes of volume generation `generation` (stamped first).
    pub async fn revert_snapshot(&self, name: &str, generation: u64) -> Result<()> {
        let inner = self.inner.clone();
        let name = name.to_owned();
        detached(async move { inner.revert(name, generation).await })
            .await
            .map_err(|e| e.with_op(Op::Snapshot))
    }

    /// Reads `dest.len()` bytes at `offset` into `dest` and gives it back;
    /// block-aligned reads land there straight from the files (no copy of
    /// ours). Whatever `dest` held before is overwritten.
    pub async fn read_into(&self, offset: u64, dest: AlignedBuf) -> Result<AlignedBuf> {
        check_range(self.inner.size, offset, dest.len() as u64).map_err(|e| e.with_op(Op::Read))?;
        self.inner.read_into(offset, dest).await.map_err(|e| e.with_op(Op::Read))
    }

    /// Reads `len` bytes at `offset` of snapshot `name`.
    pub async fn read_snapshot(&self, name: &str, offset: u64, len: usize) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let (first, count) = block_span(offset, len as u64);
        let _range = self.inner.lock.lock(first, first + count, false).await;
        let layers = self.inner.view_of(name).map_err(|e| e.with_op(Op::Read))?;
        let buf =
            self.inner.read_view(&layers, first, count, None, None).await.map_err(|e| e.with_op(Op::Read))?;
        let skip = (offset - first * BS) as usize;
        Ok(Bytes::from(buf).slice(skip..skip + len))
    }

    /// Allocation of `offset..offset+len` in snapshot `name`.
    pub async fn snapshot_block_status(&self, name: &str, offset: u64, len: u64) -> Result<Vec<Extent>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let (first, count) = block_span(offset, len);
        let _range = self.inner.lock.lock(first, first + count, false).await;
        let layers = self.inner.view_of(name).map_err(|e| e.with_op(Op::BlockStatus))?;
        self.inner.view_status(&layers, offset, len).await.map_err(|e| e.with_op(Op::BlockStatus))
    }
}

impl BlockDevice for Store {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::full()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.inner.read(offset, len).await.map_err(|e| e.with_op(Op::Read))
    }

    async fn read_payload(&self, offset: u64, len: usize) -> Result<Payload> {
        self.inner.read_payload(offset, len).await.map_err(|e| e.with_op(Op::Read))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let inner = self.inner.clone();
        detached(async move { inner.write(offset, data, fua).await }).await.map_err(|e| e.with_op(Op::Write))
    }

    async fn flush(&self) -> Result<()> {
        self.inner.sync_head(0).await.map_err(|e| e.with_op(Op::Flush))
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let inner = self.inner.clone();
        detached(async move { inner.discard(offset, len, false, fua).await })
            .await
            .map_err(|e| e.with_op(Op::Trim))
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let inner = self.inner.clone();
        detached(async move { inner.discard(offset, len, flags.no_hole, flags.fua).await })
            .await
            .map_err(|e| e.with_op(Op::WriteZeroes))
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.block_status(offset, len).await.map_err(|e| e.with_op(Op::BlockStatus))
    }
}

/// Where a block of a piped read comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The page cache of the layer at this chain position (checked).
    Page(usize),
    /// The read buffer (zeros, or data read around the page cache).
    Copy,
}

/// A pipe with the blocks `first..` of `buf` (checked data), each from
/// its [`Source`]; `None` if the pipe cannot take them all.
fn fill_pipe(
    chain: &[Arc<Layer>],
    first: u64,
    buf: &[u8],
    sources: &[Source],
) -> std::io::Result<Option<Piped>> {
    let mut pipe = Piped::with_capacity(buf.len())?;
    let mut i = 0;
    while i < sources.len() {
        let run = sources[i..].iter().take_while(|&&s| s == sources[i]).count();
        let (a, n) = (i as u64, run as u64);
        let filled = match sources[i] {
            Source::Page(pos) => {
                pipe.push_file(chain[pos].data.as_fd(), (first + a) * BS, (n * BS) as usize)?
            }
            Source::Copy => pipe.push_bytes(&buf[blocks(a, n)])?,
        };
        if filled != Filled::Done {
            return Ok(None);
        }
        i += run;
    }
    Ok(Some(pipe))
}

/// What a layer says about a block.
enum Found {
    /// Allocated, data verified.
    Data,
    /// Allocated, reads as zeros.
    Zero,
    /// Not allocated in this layer.
    Missing,
}

impl Inner {
    fn chain(&self) -> Chain {
        self.chain.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set_chain(&self, chain: Vec<Arc<Layer>>) {
        let mut current = self.chain.write().unwrap_or_else(PoisonError::into_inner);
        // Before the new chain takes a single write: controllers reading
        // the old head's files directly must stop first.
        for grant in self.local_grants.lock().unwrap_or_else(PoisonError::into_inner).drain(..) {
            if let Some(word) = grant.upgrade() {
                word.revoke();
            }
        }
        *current = Arc::new(chain);
    }

    fn head(&self) -> Arc<Layer> {
        self.chain().last().cloned().expect("the layer chain is never empty")
    }

    fn manifest(&self) -> MutexGuard<'_, Manifest> {
        self.manifest.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `batch`; the first failure becomes the error (at `offset`).
    async fn run(&self, batch: Batch, offset: u64) -> Result<Vec<AlignedBuf>> {
        collect(self.engine.run(batch).await, offset)
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let (first, count) = block_span(offset, len as u64);
        let _range = self.lock.lock(first, first + count, false).await;
        let buf = self.read_blocks(first, count).await?;
        let skip = (offset - first * BS) as usize;
        Ok(Bytes::from(buf).slice(skip..skip + len))
    }

    /// Verified contents of `count` blocks from `first` as the head sees
    /// them. Callers hold the range lock.
    async fn read_blocks(&self, first: u64, count: u64) -> Result<AlignedBuf> {
        self.read_view(&self.chain(), first, count, None, None).await
    }

    /// A block-aligned read of at least [`pipe::MIN_PIPED_BYTES`] as a
    /// pipe: the blocks are read and checked as usual, then the ones read
    /// through the page cache go into the pipe as references to their
    /// cached pages (still under the range lock, so they are the pages
    /// just checked), the rest (zeros, direct reads) as copies. Anything
    /// else, or where no pipe can be had, is an ordinary read.
    async fn read_payload(&self, offset: u64, len: usize) -> Result<Payload> {
        let aligned = offset.is_multiple_of(BS) && len.is_multiple_of(BSZ);
        if !aligned || !(pipe::MIN_PIPED_BYTES..=pipe::MAX_PIPED_BYTES).contains(&len) {
            return self.read(offset, len).await.map(Payload::Bytes);
        }
        let (first, count) = block_span(offset, len as u64);
        let _range = self.lock.lock(first, first + count, false).await;
        let chain = self.chain();
        let mut sources = vec![Source::Copy; count as usize];
        let buf = self.read_view(&chain, first, count, Some(&mut sources), None).await?;
        match fill_pipe(&chain, first, &buf, &sources) {
            Ok(Some(pipe)) => Ok(Payload::Piped(pipe)),
            Ok(None) => Ok(Payload::Bytes(Bytes::from(buf))),
            Err(e) => {
                tracing::debug!("read through a pipe failed, sending a copy: {e}");
                Ok(Payload::Bytes(Bytes::from(buf)))
            }
        }
    }

    /// Verified contents of `count` blocks from `first` as the top of
    /// `layers` sees them: each block is read from the topmost layer whose
    /// index holds it (all layers in one engine batch); blocks no layer
    /// holds read as zeros without I/O. Callers hold the range lock.
    ///
    /// With `sources` (one per block, all [`Source::Copy`] on entry), notes
    /// the blocks whose verified data came through a layer's page cache.
    /// With `dest` (exactly `count` blocks), the blocks are read into it
    /// and it is returned, unless the read fails.
    async fn read_view(
        &self,
        layers: &[Arc<Layer>],
        first: u64,
        count: u64,
        mut sources: Option<&mut [Source]>,
        mut dest: Option<AlignedBuf>,
    ) -> Result<AlignedBuf> {
        debug_assert!(dest.as_ref().is_none_or(|d| d.len() as u64 == count * BS));
        let mut out: Option<AlignedBuf> = None;
        // Piped replies go out as page-cache pages, so they read through
        // the cache even where it is cold (and warm it for the next read).
        let piped = sources.is_some();
        // (block offset in the request, layers at or above this position are ruled out)
        let mut todo: Vec<(u64, usize)> = (0..count).map(|i| (i, layers.len())).collect();
        while !todo.is_empty() {
            let owned = locate(layers, first, &todo);
            todo.clear();
            // Runs of consecutive blocks owned by one layer: (position, first offset, count).
            let mut runs: Vec<(usize, u64, u64)> = Vec::new();
            for &(i, pos) in &owned {
                match runs.last_mut() {
                    Some(r) if r.0 == pos && r.1 + r.2 == i => r.2 += 1,
                    _ => runs.push((pos, i, 1)),
                }
            }
            if runs.is_empty() {
                break;
            }
            // One layer has every block: read them straight into `dest`.
            let whole = out.is_none() && runs.len() == 1 && runs[0].2 == count;
            let mut into = if whole { dest.take() } else { None };
            // Whether each run is read through the page cache.
            let mut cached = Vec::with_capacity(runs.len());
            let batch = runs
                .iter()
                .map(|&(pos, i, n)| {
                    let l = &layers[pos];
                    let file =
                        if piped { &l.data } else { l.data_for_read((first + i) * BS, (n * BS) as usize) };
                    cached.push(!l.direct && Arc::ptr_eq(file, &l.data));
                    match into.take() {
                        Some(buf) => Request {
                            file: file.clone(),
                            offset: (first + i) * BS,
                            action: Action::Read(buf),
                        },
                        None => Request::read(file, (first + i) * BS, (n * BS) as usize),
                    }
                })
                .collect();
            // The records are looked up once the data is in: the range lock
            // keeps both as they are until we return.
            let mut bufs = self.run(batch, (first + runs[0].1) * BS).await?;
            if whole {
                // The common case: one layer has every block; keep its buffer.
                let map = &layers[runs[0].0].record_map;
                let mut data = bufs.pop().unwrap_or_default();
                for i in 0..count {
                    match check_block(first + i, &data[blocks(i, 1)], &record_of(map, first + i)?)? {
                        Found::Data => {
                            if let Some(s) = sources.as_deref_mut()
                                && cached[0]
                            {
                                s[i as usize] = Source::Page(runs[0].0);
                            }
                        }
                        Found::Zero => data[blocks(i, 1)].fill(0),
                        Found::Missing => {
                            data[blocks(i, 1)].fill(0);
                            todo.push((i, runs[0].0));
                        }
                    }
                }
                out = Some(data);
                continue;
            }
            let buf = out.get_or_insert_with(|| zeroed_or(dest.take(), count));
            for ((&(pos, i0, n), data), &cached) in runs.iter().zip(&bufs).zip(&cached) {
                let map = &layers[pos].record_map;
                for k in 0..n {
                    let i = i0 + k;
                    let block = &data[blocks(k, 1)];
                    match check_block(first + i, block, &record_of(map, first + i)?)? {
                        Found::Data => {
                            buf[blocks(i, 1)].copy_from_slice(block);
                            if let Some(s) = sources.as_deref_mut()
                                && cached
                            {
                                s[i as usize] = Source::Page(pos);
                            }
                        }
                        Found::Zero => buf[blocks(i, 1)].fill(0),
                        // The index was ahead of the records (a change that
                        // failed): look further down.
                        Found::Missing => todo.push((i, pos)),
                    }
                }
            }
        }
        Ok(out.unwrap_or_else(|| zeroed_or(dest, count)))
    }

    /// Reads `dest.len()` bytes at `offset` into `dest` (block-aligned:
    /// straight from the files; otherwise through a buffer of our own).
    async fn read_into(&self, offset: u64, mut dest: AlignedBuf) -> Result<AlignedBuf> {
        let len = dest.len();
        if !offset.is_multiple_of(BS) || !len.is_multiple_of(BSZ) || len == 0 {
            let data = self.read(offset, len).await?;
            dest.copy_from_slice(&data);
            return Ok(dest);
        }
        let (first, count) = block_span(offset, len as u64);
        let _range = self.lock.lock(first, first + count, false).await;
        self.read_view(&self.chain(), first, count, None, Some(dest)).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.write_with(offset, data, fua, None, None).await
    }

    /// A write; with `copy`, a rebuild copy whose payload must have that
    /// crc32c (see [`Store::write_copy`]).
    /// `crcs`, if given, are the blocks' crc32cs (see [`WriteKind`]).
    async fn write_with(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
        copy: Option<u32>,
        crcs: Option<&[u8]>,
    ) -> Result<()> {
        if data.is_empty() {
            return if fua { self.sync_head(offset).await } else { Ok(()) };
        }
        let aligned = offset.is_multiple_of(BS) && data.len().is_multiple_of(BSZ);
        if let Some(crc) = copy
            && !aligned
            && jiva_core::crc32c(&data) != crc
        {
            return Err(payload_mismatch(offset));
        }
        let (first, count) = block_span(offset, data.len() as u64);
        let _range = self.lock.lock(first, first + count, true).await;
        self.mark_intent(first, count).await?;
        let buf = if aligned { data } else { self.merge(offset, &data, first, count).await? };
        let crcs = crcs.filter(|c| aligned && copy.is_none() && c.len() == buf.len() / BSZ * 4);
        let write = WriteKind { fua, copy: copy.filter(|_| aligned), bulk: copy.is_some(), crcs };
        self.write_blocks(first, buf, write, offset).await
    }

    /// `data` at `offset` merged into the current contents of its blocks
    /// (only the partial edge blocks are read). Callers hold the range lock.
    async fn merge(&self, offset: u64, data: &[u8], first: u64, count: u64) -> Result<Bytes> {
        let end = offset + data.len() as u64;
        let (head_partial, tail_partial) = (!offset.is_multiple_of(BS), !end.is_multiple_of(BS));
        let mut buf = if count <= 2 && (head_partial || tail_partial) {
            self.read_blocks(first, count).await?
        } else {
            let mut buf = AlignedBuf::zeroed((count * BS) as usize);
            let last = first + count - 1;
            let (head, tail) = tokio::join!(
                async { if head_partial { Some(self.read_blocks(first, 1).await) } else { None } },
                async { if tail_partial { Some(self.read_blocks(last, 1).await) } else { None } },
            );
            if let Some(head) = head {
                buf[blocks(0, 1)].copy_from_slice(&head?);
            }
            if let Some(tail) = tail {
                buf[blocks(count - 1, 1)].copy_from_slice(&tail?);
            }
            buf
        };
        let at = (offset - first * BS) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        Ok(Bytes::from(buf))
    }

    /// Writes whole blocks from `first` with their records, in one batch.
    /// Callers hold the range lock and have marked the intent.
    async fn write_blocks(&self, first: u64, buf: Bytes, kind: WriteKind<'_>, offset: u64) -> Result<()> {
        let mut records = vec![0u8; buf.len() / BSZ * RECZ];
        let mut whole: Option<u32> = None;
        let mut given = kind.crcs.map(|c| c.chunks_exact(4));
        for (block, rec) in buf.chunks(BSZ).zip(records.chunks_mut(RECZ)) {
            let crc = match given.as_mut().and_then(Iterator::next) {
                Some(be) => u32::from_be_bytes(be.try_into().expect("chunks of 4")),
                None => jiva_core::crc32c(block),
            };
            if kind.copy.is_some() {
                whole = Some(whole.map_or(crc, |w| crc_then_block(w, crc)));
            }
            format::encode_record(&BlockRecord::data(crc), rec);
        }
        if kind.copy.is_some() && whole != kind.copy {
            return Err(payload_mismatch(offset));
        }
        let head = self.head();
        head.index
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert_range(first, first + (buf.len() / BSZ) as u64);
        let write = if kind.fua { Request::write_dsync } else { Request::write };
        let (file, data) = match &head.bulk {
            _ if head.direct => (&head.data, aligned_bytes(buf)),
            Some(bulk) if kind.bulk && buf.len() >= BULK => (bulk, aligned_bytes(buf)),
            _ => (&head.data, buf),
        };
        if kind.fua || records.len() > MAPPED_RECORDS_BYTES {
            let batch =
                vec![write(file, first * BS, data), write(&head.records, first * REC, Bytes::from(records))];
            return self.run(batch, first * BS).await.map(drop);
        }
        // A small write's records go in once its data is (a write that
        // fails leaves the old records with the old data), stored through
        // the mapping where they can: one syscall less per write.
        self.run(vec![write(file, first * BS, data)], first * BS).await?;
        if head.record_map.put(&head.records, first, &records) {
            return Ok(());
        }
        self.run(vec![write(&head.records, first * REC, Bytes::from(records))], first * BS).await.map(drop)
    }

    /// TRIM (`keep` false) or WRITE_ZEROES with NO_HOLE (`keep` true).
    async fn discard(&self, offset: u64, len: u64, keep: bool, fua: bool) -> Result<()> {
        if len == 0 {
            return if fua { self.sync_head(offset).await } else { Ok(()) };
        }
        let (first, count) = block_span(offset, len);
        let _range = self.lock.lock(first, first + count, true).await;
        self.mark_intent(first, count).await?;
        let end = offset + len;
        let (whole_first, whole_end) = (offset.div_ceil(BS), end / BS);
        if whole_first >= whole_end {
            // No whole block: zero the bytes inside their block(s).
            let zeros = vec![0u8; len as usize];
            let buf = self.merge(offset, &zeros, first, count).await?;
            self.write_blocks(first, buf, WriteKind::PLAIN, offset).await?;
        } else {
            if !offset.is_multiple_of(BS) {
                let zeros = vec![0u8; (whole_first * BS - offset) as usize];
                let buf = self.merge(offset, &zeros, first, 1).await?;
                self.write_blocks(first, buf, WriteKind::PLAIN, offset).await?;
            }
            if !end.is_multiple_of(BS) {
                let zeros = vec![0u8; (end - whole_end * BS) as usize];
                let buf = self.merge(whole_end * BS, &zeros, whole_end, 1).await?;
                self.write_blocks(whole_end, buf, WriteKind::PLAIN, offset).await?;
            }
            if keep {
                self.zero_blocks(whole_first, whole_end).await?;
            } else {
                self.punch_blocks(whole_first, whole_end).await?;
            }
        }
        if fua { self.sync_head(offset).await } else { Ok(()) }
    }

    /// Releases blocks `a..b` of the head: punches the data and clears the
    /// records, except where a parent (snapshot) holds the block: there a
    /// ZERO record keeps the parent's data from showing through. Snapshots
    /// are never touched.
    async fn punch_blocks(&self, a: u64, b: u64) -> Result<()> {
        let chain = self.chain();
        let (head, parents) = chain.split_last().expect("the layer chain is never empty");
        let mut shadowed = BlockIndex::new();
        for p in parents {
            for r in p.index.read().unwrap_or_else(PoisonError::into_inner).runs_in(a, b) {
                shadowed.insert_range(r.start, r.end);
            }
        }
        let shadowed = shadowed.runs_in(a, b);
        let mut gaps = Vec::new();
        let mut at = a;
        for r in &shadowed {
            if r.start > at {
                gaps.push(at..r.start);
            }
            at = r.end;
        }
        if at < b {
            gaps.push(at..b);
        }
        {
            let mut index = head.index.write().unwrap_or_else(PoisonError::into_inner);
            for r in &shadowed {
                index.insert_range(r.start, r.end);
            }
        }
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let mut batch = vec![Request::fallocate(&head.data, punch, a * BS, (b - a) * BS)];
        for r in &shadowed {
            batch.extend(fill_records(&head.records, r.start, r.end, BlockRecord::zero()));
        }
        // Which requests punch the records of a gap (the others fill them).
        let mut punches = vec![None; batch.len()];
        for (gi, g) in gaps.iter().enumerate() {
            let record_bytes = (g.end - g.start) * REC;
            if record_bytes >= BS {
                // The kernel zeroes the partial pages at the ends of the range.
                batch.push(Request::fallocate(&head.records, punch, g.start * REC, record_bytes));
                punches.push(Some(gi));
            } else {
                let fill = fill_records(&head.records, g.start, g.end, BlockRecord::UNALLOCATED);
                punches.extend(fill.iter().map(|_| None));
                batch.extend(fill);
            }
        }
        let mut retry = Vec::new();
        let results = self.engine.run(batch).await;
        // Whatever else failed: a punched chunk may have holes now.
        for g in &gaps {
            head.record_map.forget_allocated(g.start, g.end);
        }
        for (i, (result, gap)) in results.into_iter().zip(punches).enumerate() {
            match (result, gap) {
                // A file system without hole punching keeps the data; the
                // cleared records hide it, so that is not an error.
                (Err(e), None) if i == 0 && unsupported(&e) => {}
                (Err(e), Some(g)) if unsupported(&e) => {
                    retry.extend(fill_records(
                        &head.records,
                        gaps[g].start,
                        gaps[g].end,
                        BlockRecord::UNALLOCATED,
                    ));
                }
                (Err(e), _) => return Err(io_error(e, a * BS)),
                (Ok(_), _) => {}
            }
        }
        if !retry.is_empty() {
            self.run(retry, a * BS).await?;
        }
        let mut index = head.index.write().unwrap_or_else(PoisonError::into_inner);
        for g in &gaps {
            index.remove_range(g.start, g.end);
        }
        Ok(())
    }

    /// Zeroes blocks `a..b` of the head keeping them allocated: ZERO_RANGE
    /// on the data (or just an allocation where unsupported: ZERO records
    /// are never read from the data) and ZERO records.
    async fn zero_blocks(&self, a: u64, b: u64) -> Result<()> {
        let head = self.head();
        head.index.write().unwrap_or_else(PoisonError::into_inner).insert_range(a, b);
        let (offset, len) = (a * BS, (b - a) * BS);
        let zero_range = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let mut batch = vec![Request::fallocate(&head.data, zero_range, offset, len)];
        batch.extend(fill_records(&head.records, a, b, BlockRecord::zero()));
        let mut out = self.engine.run(batch).await.into_iter();
        let data = out.next();
        collect(out.collect(), offset)?;
        match data {
            Some(Err(e)) if unsupported(&e) => {
                let alloc = Request::fallocate(&head.data, libc::FALLOC_FL_KEEP_SIZE, offset, len);
                match self.engine.run(vec![alloc]).await.pop() {
                    Some(Err(e)) if !unsupported(&e) => Err(io_error(e, offset)),
                    _ => Ok(()),
                }
            }
            Some(Err(e)) => Err(io_error(e, offset)),
            _ => Ok(()),
        }
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let (first, count) = block_span(offset, len);
        let _range = self.lock.lock(first, first + count, false).await;
        self.view_status(&self.chain(), offset, len).await
    }

    /// Extents of `offset..offset+len` in the view at the top of `layers`.
    /// Callers hold the range lock.
    async fn view_status(&self, layers: &[Arc<Layer>], offset: u64, len: u64) -> Result<Vec<Extent>> {
        let (first, count) = block_span(offset, len);
        let end = offset + len;
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let mut chunk = first;
        while chunk < first + count {
            let n = CHUNK_BLOCKS.min(first + count - chunk);
            for (i, state) in self.view_states(layers, chunk, n).await?.into_iter().enumerate() {
                let length = ((chunk + i as u64 + 1) * BS).min(end) - pos;
                match extents.last_mut() {
                    Some(last) if last.state == state => last.length += length,
                    _ => extents.push(Extent { length, state }),
                }
                pos += length;
            }
            chunk += n;
        }
        Ok(extents)
    }

    /// Allocation state of `count` blocks from `first` in the view at the
    /// top of `layers`: the index says which layer holds each block, that
    /// layer's records say data or zero.
    async fn view_states(&self, layers: &[Arc<Layer>], first: u64, count: u64) -> Result<Vec<ExtentState>> {
        let mut states = vec![ExtentState::Hole; count as usize];
        let owned = locate_runs(layers, first, first + count);
        if owned.is_empty() {
            return Ok(states);
        }
        let batch = owned
            .iter()
            .map(|(pos, r)| {
                Request::read(&layers[*pos].records, r.start * REC, ((r.end - r.start) * REC) as usize)
            })
            .collect();
        let bufs = self.run(batch, first * BS).await?;
        for ((_, r), records) in owned.iter().zip(bufs) {
            for b in r.clone() {
                let state = match format::decode_record(&records[recs(b - r.start, 1)]) {
                    Ok(rec) if rec.is_allocated() && rec.is_zero() => ExtentState::Zero,
                    // Data, a corrupt record (reading the block reports it), or
                    // an index ahead of its records (data is the safe answer).
                    _ => ExtentState::Data,
                };
                states[(b - first) as usize] = state;
            }
        }
        Ok(states)
    }

    /// fdatasyncs the head's data and records.
    async fn sync_head(&self, offset: u64) -> Result<()> {
        let head = self.head();
        self.run(vec![Request::fdatasync(&head.data), Request::fdatasync(&head.records)], offset)
            .await
            .map(drop)
    }

    /// Makes sure the intent bits of the regions of `count` blocks from
    /// `first` are durable before those blocks are changed.
    async fn mark_intent(&self, first: u64, count: u64) -> Result<()> {
        let regions = self.intent.span(first, count);
        if self.intent.is_durable(regions.clone()) {
            return Ok(());
        }
        self.intent.request(regions.clone());
        let _commit = self.intent_commit.lock().await;
        if self.intent.is_durable(regions) {
            // Another task's update covered ours.
            return Ok(());
        }
        // After a clean close, the first change makes the store unclean again.
        self.set_clean(false).await?;
        let Some(mut update) = self.intent.prepare() else { return Ok(()) };
        let bytes = Bytes::from(std::mem::take(&mut update.bytes));
        self.run(vec![Request::write(&self.intent_file, update.offset, bytes)], first * BS).await?;
        self.run(vec![Request::fdatasync(&self.intent_file)], first * BS).await?;
        self.intent.committed(&update);
        Ok(())
    }

    /// Raises the stamps of the regions of `len` bytes at `offset` to at
    /// least `generation`, durably, before the change is made.
    async fn raise_stamps(&self, offset: u64, len: u64, generation: u64) -> Result<()> {
        if generation == 0 || len == 0 {
            return Ok(());
        }
        let (first, count) = block_span(offset, len);
        let regions = self.intent.span(first, count);
        let behind = |r: &u64| self.stamps[*r as usize].load(Ordering::Acquire) < generation;
        if !regions.clone().any(|r| behind(&r)) {
            return Ok(());
        }
        let want = |pending: &mut std::collections::BTreeMap<u64, u64>| {
            for r in regions.clone() {
                let g = pending.entry(r).or_insert(0);
                *g = (*g).max(generation);
            }
        };
        want(&mut self.stamp_pending.lock().unwrap_or_else(PoisonError::into_inner));
        let _commit = self.stamp_commit.lock().await;
        if !regions.clone().any(|r| behind(&r)) {
            // A concurrent commit covered ours.
            return Ok(());
        }
        // Lead a commit of every raise queued by now (ours again, in case a
        // failed commit dropped it).
        let batch = {
            let mut pending = self.stamp_pending.lock().unwrap_or_else(PoisonError::into_inner);
            want(&mut pending);
            std::mem::take(&mut *pending)
        };
        let values: Vec<(u64, u64)> = batch
            .iter()
            .map(|(&r, &g)| (r, self.stamps[r as usize].load(Ordering::Acquire).max(g)))
            .collect();
        let mut writes = Vec::new();
        let mut run: Vec<(u64, u64)> = Vec::new();
        for &(r, v) in &values {
            if run.last().is_some_and(|&(last, _)| last + 1 != r) {
                writes.push(stamp_write(&self.stamps_file, &run));
                run.clear();
            }
            run.push((r, v));
        }
        if !run.is_empty() {
            writes.push(stamp_write(&self.stamps_file, &run));
        }
        self.run(writes, offset).await?;
        self.run(vec![Request::fdatasync(&self.stamps_file)], offset).await?;
        for (r, v) in values {
            self.stamps[r as usize].fetch_max(v, Ordering::Release);
        }
        Ok(())
    }

    /// Zeroes the bitmap durably. Callers make sure no change is in flight.
    async fn clear_intent(&self) -> Result<()> {
        let len = format::intent_len(self.intent.regions()) as usize;
        self.run(vec![Request::write(&self.intent_file, 0, Bytes::from(vec![0u8; len]))], 0).await?;
        self.run(vec![Request::fdatasync(&self.intent_file)], 0).await?;
        self.intent.cleared();
        Ok(())
    }

    /// Re-derives the crc of every allocated head block in `regions` whose
    /// data does not match its record (torn writes; see [`crate::intent`]).
    /// Returns the number of blocks repaired.
    async fn recover(&self, regions: &[u64]) -> Result<u64> {
        let head = self.head();
        let mut repaired = 0;
        for group in regions.chunks(RECOVERY_BATCH) {
            let spans: Vec<_> = group.iter().map(|&r| self.intent.blocks_of(r, self.blocks)).collect();
            let batch = spans
                .iter()
                .flat_map(|s| {
                    let n = s.end - s.start;
                    [
                        Request::read(&head.data, s.start * BS, (n * BS) as usize),
                        Request::read(&head.records, s.start * REC, (n * REC) as usize),
                    ]
                })
                .collect();
            let bufs = self.run(batch, spans[0].start * BS).await?;
            let mut writes = Vec::new();
            for (span, pair) in spans.iter().zip(bufs.chunks(2)) {
                let (data, mut records) = (&pair[0], pair[1].clone());
                let mut changed = false;
                for i in 0..span.end - span.start {
                    let Ok(rec) = format::decode_record(&records[recs(i, 1)]) else { continue };
                    if !rec.is_allocated() || rec.is_zero() {
                        continue;
                    }
                    let crc = jiva_core::crc32c(&data[blocks(i, 1)]);
                    if crc != rec.crc {
                        let fixed = BlockRecord { crc, flags: rec.flags };
                        format::encode_record(&fixed, &mut records[recs(i, 1)]);
                        changed = true;
                        repaired += 1;
                    }
                }
                if changed {
                    writes.push(Request::write(&head.records, span.start * REC, Bytes::from(records)));
                }
            }
            if !writes.is_empty() {
                self.run(writes, spans[0].start * BS).await?;
            }
        }
        if repaired > 0 {
            self.run(vec![Request::fdatasync(&head.records)], 0).await?;
        }
        Ok(repaired)
    }

    /// Rewrites the manifest (atomically and durably) if `change` alters it.
    async fn update_manifest(&self, change: impl FnOnce(&mut Manifest) -> Result<()>) -> Result<()> {
        let _update = self.manifest_update.lock().await;
        let mut next = self.manifest().clone();
        change(&mut next)?;
        if next == *self.manifest() {
            return Ok(());
        }
        let bytes = format::encode_manifest(&next);
        let dir = self.dir.clone();
        blocking(move || write_manifest(&dir, &bytes)).await?;
        *self.manifest() = next;
        Ok(())
    }

    async fn set_clean(&self, clean: bool) -> Result<()> {
        if self.manifest().clean == clean {
            return Ok(());
        }
        self.update_manifest(|m| {
            m.clean = clean;
            Ok(())
        })
        .await
    }
}

/// Blocks per merge or revert step (taken under the range lock, with one
/// fdatasync of the data before the records are written).
const STEP_BLOCKS: u64 = 4096;

impl Inner {
    /// The layers up to and including snapshot `name`.
    fn view_of(&self, name: &str) -> Result<Vec<Arc<Layer>>> {
        let id = {
            let m = self.manifest();
            let i = m.snapshots.iter().position(|s| s.name == name).ok_or_else(|| no_snapshot(name))?;
            m.layers[i]
        };
        let chain = self.chain();
        let pos = chain.iter().position(|l| l.id == id).ok_or_else(|| no_snapshot(name))?;
        Ok(chain[..=pos].to_vec())
    }

    /// A new, empty layer with the next id, durable (files and directory).
    async fn new_layer(&self) -> Result<Arc<Layer>> {
        let id = self.manifest().next_layer_id;
        let (dir, size, direct) = (self.dir.clone(), self.size, self.direct_io);
        let layer = blocking(move || {
            let layer = open_layer(&dir, id, size, true, direct)?;
            File::open(&dir)?.sync_all()?;
            Ok(layer)
        })
        .await?;
        Ok(Arc::new(layer))
    }

    async fn create_snapshot(&self, name: String, system: bool, created_ms: Option<u64>) -> Result<()> {
        let _structure = self.structure.lock().await;
        if self.manifest().snapshots.iter().any(|s| s.name == name) {
            return Err(Error::new(ErrorKind::InvalidArgument, format!("snapshot {name:?} already exists")));
        }
        let _all = self.lock.lock(0, self.blocks, true).await;
        // The frozen head must be durable before the manifest says it is a snapshot.
        self.sync_head(0).await?;
        let layer = self.new_layer().await?;
        let created_ms = created_ms.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        });
        let id = layer.id;
        let meta = SnapshotMeta { name: name.clone(), created_ms, system };
        let result = self
            .update_manifest(|m| {
                m.snapshots.push(meta);
                m.layers.push(id);
                m.next_layer_id = id + 1;
                Ok(())
            })
            .await;
        if let Err(e) = result {
            let dir = self.dir.clone();
            remove_layer_files(&dir, id);
            return Err(e);
        }
        let mut chain = self.chain().to_vec();
        chain.push(layer);
        self.set_chain(chain);
        tracing::info!(dir = %self.dir.display(), snapshot = %name, layer = id, "snapshot created");
        Ok(())
    }

    async fn delete_snapshot(self: Arc<Self>, name: String) -> Result<()> {
        let _structure = self.structure.lock().await;
        let (id, merging) = {
            let m = self.manifest();
            let i = m.snapshots.iter().position(|s| s.name == name).ok_or_else(|| no_snapshot(&name))?;
            (m.layers[i], m.merging)
        };
        match merging {
            Some(other) if other != id || self.merging.load(Ordering::SeqCst) => {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    "another snapshot is still being deleted (merged); try again when it is gone",
                ));
            }
            // The same delete was interrupted and its merge stopped: go again.
            Some(_) => {}
            None => {
                self.update_manifest(|m| {
                    m.merging = Some(id);
                    Ok(())
                })
                .await?;
            }
        }
        *self.merge_error.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.merging.store(true, Ordering::SeqCst);
        tokio::spawn(self.clone().merge_task(id));
        Ok(())
    }

    async fn merge_task(self: Arc<Self>, id: u64) {
        let result = self.merge_layer(id).await;
        if let Err(e) = &result {
            tracing::warn!(dir = %self.dir.display(), layer = id, "snapshot merge stopped: {e}");
        }
        *self.merge_error.lock().unwrap_or_else(PoisonError::into_inner) = result.err();
        self.merging.store(false, Ordering::SeqCst);
        self.merge_done.notify_waiters();
    }

    /// Merges snapshot layer `id` into its child, then drops it. Idempotent:
    /// blocks the child already holds are skipped, so a restart redoes only
    /// what is missing.
    async fn merge_layer(&self, id: u64) -> Result<()> {
        let chain = self.chain();
        let pos =
            chain.iter().position(|l| l.id == id).filter(|&p| p + 1 < chain.len()).ok_or_else(|| {
                Error::new(
                    ErrorKind::Corrupt,
                    format!("the merge marker names layer {id}, which is not a snapshot"),
                )
            })?;
        let (src, dst) = (chain[pos].clone(), chain[pos + 1].clone());
        let runs = src.index.read().unwrap_or_else(PoisonError::into_inner).runs_in(0, self.blocks);
        let mut copied = 0;
        let mut window = None;
        for run in runs {
            let mut b = run.start;
            while b < run.end {
                let w = b / STEP_BLOCKS;
                if window != Some(w) {
                    window = Some(w);
                    let (a, e) = (w * STEP_BLOCKS, ((w + 1) * STEP_BLOCKS).min(self.blocks));
                    copied += self.merge_step(&src, &dst, a, e).await?;
                }
                b = ((w + 1) * STEP_BLOCKS).min(run.end);
            }
        }
        self.run(vec![Request::fdatasync(&dst.data), Request::fdatasync(&dst.records)], 0).await?;
        let _structure = self.structure.lock().await;
        let _all = self.lock.lock(0, self.blocks, true).await;
        self.update_manifest(|m| {
            if let Some(i) = m.layers.iter().position(|&l| l == id) {
                m.layers.remove(i);
                m.snapshots.remove(i);
            }
            m.merging = None;
            Ok(())
        })
        .await?;
        let chain: Vec<Arc<Layer>> = self.chain().iter().filter(|l| l.id != id).cloned().collect();
        self.set_chain(chain);
        let dir = self.dir.clone();
        blocking(move || {
            remove_layer_files(&dir, id);
            Ok(())
        })
        .await?;
        tracing::info!(dir = %self.dir.display(), layer = id, into = dst.id, copied_blocks = copied, "snapshot merged");
        Ok(())
    }

    /// Copies the blocks of `a..b` that `src` holds and `dst` does not into
    /// `dst`: data first, made durable, then the records (copied verbatim),
    /// so a record never names data that is not on disk. Returns blocks copied.
    async fn merge_step(&self, src: &Layer, dst: &Layer, a: u64, b: u64) -> Result<u64> {
        let _range = self.lock.lock(a, b, true).await;
        let need = {
            let s = src.index.read().unwrap_or_else(PoisonError::into_inner);
            let d = dst.index.read().unwrap_or_else(PoisonError::into_inner);
            let mut need = BlockIndex::new();
            for r in s.runs_in(a, b) {
                need.insert_range(r.start, r.end);
                for taken in d.runs_in(r.start, r.end) {
                    need.remove_range(taken.start, taken.end);
                }
            }
            need.runs_in(a, b)
        };
        if need.is_empty() {
            return Ok(0);
        }
        let batch = need
            .iter()
            .flat_map(|r| {
                let n = r.end - r.start;
                [
                    Request::read(&src.data, r.start * BS, (n * BS) as usize),
                    Request::read(&src.records, r.start * REC, (n * REC) as usize),
                ]
            })
            .collect();
        let bufs = self.run(batch, a * BS).await?;
        let mut data_writes = Vec::new();
        let mut record_writes = Vec::new();
        let mut copied = 0;
        for (r, pair) in need.iter().zip(bufs.chunks(2)) {
            let (data, records) = (&pair[0], &pair[1]);
            // Runs of blocks to copy, split where a block is not allocated after all.
            let mut run: Option<u64> = None;
            let mut data_run: Option<u64> = None;
            let n = r.end - r.start;
            for i in 0..=n {
                let found = if i < n {
                    Some(check_block(r.start + i, &data[blocks(i, 1)], &records[recs(i, 1)])?)
                } else {
                    None
                };
                let copy = matches!(found, Some(Found::Data | Found::Zero));
                let is_data = matches!(found, Some(Found::Data));
                if let Some(s) = data_run.filter(|_| !is_data) {
                    data_run = None;
                    let bytes = Bytes::copy_from_slice(&data[blocks(s, i - s)]);
                    let bytes = if dst.direct { aligned_bytes(bytes) } else { bytes };
                    data_writes.push(Request::write(&dst.data, (r.start + s) * BS, bytes));
                }
                if is_data && data_run.is_none() {
                    data_run = Some(i);
                }
                if let Some(s) = run.filter(|_| !copy) {
                    run = None;
                    let bytes = Bytes::copy_from_slice(&records[recs(s, i - s)]);
                    record_writes.push((
                        r.start + s,
                        r.start + i,
                        Request::write(&dst.records, (r.start + s) * REC, bytes),
                    ));
                    copied += i - s;
                }
                if copy && run.is_none() {
                    run = Some(i);
                }
            }
        }
        if !data_writes.is_empty() {
            data_writes.push(Request::fdatasync(&dst.data));
            self.run(data_writes, a * BS).await?;
        }
        {
            let mut index = dst.index.write().unwrap_or_else(PoisonError::into_inner);
            for (s, e, _) in &record_writes {
                index.insert_range(*s, *e);
            }
        }
        self.run(record_writes.into_iter().map(|(_, _, w)| w).collect(), a * BS).await?;
        Ok(copied)
    }

    async fn revert(&self, name: String, generation: u64) -> Result<()> {
        let _structure = self.structure.lock().await;
        if self.manifest().merging.is_some() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "a snapshot is still being deleted (merged); revert when it is gone",
            ));
        }
        let _all = self.lock.lock(0, self.blocks, true).await;
        let layers = self.view_of(&name)?;
        let chain = self.chain();
        let (old_head, newer) = chain[layers.len()..].split_last().expect("the head is above every snapshot");
        // Blocks that newer snapshots hold must read as the snapshot in the
        // new head; everything else shows through from them unchanged.
        let mut restore = BlockIndex::new();
        for l in newer {
            for r in l.index.read().unwrap_or_else(PoisonError::into_inner).runs_in(0, self.blocks) {
                restore.insert_range(r.start, r.end);
            }
        }
        let mut changed = restore.clone();
        for r in old_head.index.read().unwrap_or_else(PoisonError::into_inner).runs_in(0, self.blocks) {
            changed.insert_range(r.start, r.end);
        }
        self.raise_stamps_for(&changed, generation).await?;
        let layer = self.new_layer().await?;
        let result = self.fill_layer(&layer, &layers, &restore).await;
        if let Err(e) = result {
            remove_layer_files(&self.dir, layer.id);
            return Err(e);
        }
        let (id, old) = (layer.id, old_head.id);
        self.update_manifest(|m| {
            *m.layers.last_mut().expect("never empty") = id;
            m.next_layer_id = id + 1;
            Ok(())
        })
        .await?;
        let mut next = chain[..chain.len() - 1].to_vec();
        next.push(layer);
        self.set_chain(next);
        let dir = self.dir.clone();
        blocking(move || {
            remove_layer_files(&dir, old);
            Ok(())
        })
        .await?;
        tracing::info!(dir = %self.dir.display(), snapshot = %name, "reverted to snapshot");
        Ok(())
    }

    async fn truncate(&self, keep: Option<String>) -> Result<()> {
        // A merge takes the structure lock when it ends: wait for it outside.
        let _structure = loop {
            let done = self.merge_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.merging.load(Ordering::SeqCst) {
                done.await;
                continue;
            }
            let guard = self.structure.lock().await;
            if !self.merging.load(Ordering::SeqCst) {
                break guard;
            }
        };
        let kept = match &keep {
            None => 0,
            Some(name) => {
                let m = self.manifest();
                m.snapshots.iter().position(|s| s.name == *name).ok_or_else(|| no_snapshot(name))? + 1
            }
        };
        let _all = self.lock.lock(0, self.blocks, true).await;
        let chain = self.chain();
        let layer = self.new_layer().await?;
        let id = layer.id;
        let dropped: Vec<u64> = chain[kept..].iter().map(|l| l.id).collect();
        let result = self
            .update_manifest(|m| {
                m.layers.truncate(kept);
                m.snapshots.truncate(kept);
                m.layers.push(id);
                m.next_layer_id = id + 1;
                m.merging = m.merging.filter(|l| m.layers.contains(l));
                Ok(())
            })
            .await;
        if let Err(e) = result {
            remove_layer_files(&self.dir, id);
            return Err(e);
        }
        let mut next = chain[..kept].to_vec();
        next.push(layer);
        self.set_chain(next);
        let dir = self.dir.clone();
        blocking(move || {
            for l in dropped {
                remove_layer_files(&dir, l);
            }
            Ok(())
        })
        .await?;
        tracing::info!(dir = %self.dir.display(), kept, "layers above the kept snapshots dropped");
        Ok(())
    }

    /// Writes the blocks of `set` as the top of `view` sees them into
    /// `layer` (all-zero blocks as ZERO records), durably.
    async fn fill_layer(&self, layer: &Layer, view: &[Arc<Layer>], set: &BlockIndex) -> Result<()> {
        for run in set.runs_in(0, self.blocks) {
            let mut a = run.start;
            while a < run.end {
                let b = (a + STEP_BLOCKS).min(run.end);
                let data = self.read_view(view, a, b - a, None, None).await?;
                let mut records = vec![0u8; ((b - a) * REC) as usize];
                for i in 0..b - a {
                    let block = &data[blocks(i, 1)];
                    let rec = if block.iter().all(|&x| x == 0) {
                        BlockRecord::zero()
                    } else {
                        BlockRecord::data(jiva_core::crc32c(block))
                    };
                    format::encode_record(&rec, &mut records[recs(i, 1)]);
                }
                let bytes = Bytes::from(data);
                let bytes = if layer.direct { aligned_bytes(bytes) } else { bytes };
                layer.index.write().unwrap_or_else(PoisonError::into_inner).insert_range(a, b);
                self.run(
                    vec![
                        Request::write(&layer.data, a * BS, bytes),
                        Request::write(&layer.records, a * REC, Bytes::from(records)),
                    ],
                    a * BS,
                )
                .await?;
                a = b;
            }
        }
        self.run(vec![Request::fdatasync(&layer.data), Request::fdatasync(&layer.records)], 0).await.map(drop)
    }

    /// Raises the stamps of every region holding a block of `set`.
    async fn raise_stamps_for(&self, set: &BlockIndex, generation: u64) -> Result<()> {
        if generation == 0 {
            return Ok(());
        }
        let region_blocks = (u64::from(self.manifest().region_size) / BS).max(1);
        let mut spans: Vec<std::ops::Range<u64>> = Vec::new();
        for r in set.runs_in(0, self.blocks) {
            let (ra, rb) = (r.start / region_blocks, (r.end - 1) / region_blocks + 1);
            match spans.last_mut() {
                Some(last) if last.end >= ra => last.end = last.end.max(rb),
                _ => spans.push(ra..rb),
            }
        }
        for s in spans {
            let a = s.start * region_blocks;
            let b = (s.end * region_blocks).min(self.blocks);
            self.raise_stamps(a * BS, (b - a) * BS, generation).await?;
        }
        Ok(())
    }
}

fn no_snapshot(name: &str) -> Error {
    Error::new(ErrorKind::InvalidArgument, format!("no snapshot named {name:?}"))
}

/// Deletes layer `id`'s files (best effort: leftovers go at the next open).
fn remove_layer_files(dir: &Path, id: u64) {
    for name in [format::data_file_name(id), format::records_file_name(id)] {
        if let Err(e) = std::fs::remove_file(dir.join(&name))
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {e}", dir.join(&name).display());
        }
    }
}

/// The topmost layer (position in `layers`, below each block's bound)
/// whose index holds each block of `todo` (offsets from `first`); blocks
/// no layer holds are left out. Sorted by offset.
fn locate(layers: &[Arc<Layer>], first: u64, todo: &[(u64, usize)]) -> Vec<(u64, usize)> {
    let mut out = Vec::with_capacity(todo.len());
    let mut rest = todo.to_vec();
    for pos in (0..layers.len()).rev() {
        if rest.is_empty() {
            break;
        }
        let index = layers[pos].index.read().unwrap_or_else(PoisonError::into_inner);
        rest.retain(|&(i, bound)| {
            if pos < bound && index.contains(first + i) {
                out.push((i, pos));
                false
            } else {
                true
            }
        });
    }
    out.sort_unstable();
    out
}

/// Runs of blocks of `a..b` with the topmost layer (position) holding
/// them, by the index; blocks no layer holds are left out. Costs a few
/// operations per run, not per block.
fn locate_runs(layers: &[Arc<Layer>], a: u64, b: u64) -> Vec<(usize, std::ops::Range<u64>)> {
    let mut owned = Vec::new();
    let mut open = std::iter::once(a..b).collect::<Vec<_>>();
    for pos in (0..layers.len()).rev() {
        if open.is_empty() {
            break;
        }
        let index = layers[pos].index.read().unwrap_or_else(PoisonError::into_inner);
        let mut next = Vec::new();
        for r in open {
            let mut at = r.start;
            for run in index.runs_in(r.start, r.end) {
                if run.start > at {
                    next.push(at..run.start);
                }
                at = run.end;
                owned.push((pos, run));
            }
            if at < r.end {
                next.push(at..r.end);
            }
        }
        open = next;
    }
    owned.sort_unstable_by_key(|(_, r)| r.start);
    owned
}

/// `dest` cleared, or a new zeroed buffer of `count` blocks.
fn zeroed_or(dest: Option<AlignedBuf>, count: u64) -> AlignedBuf {
    match dest {
        Some(mut d) => {
            d.fill(0);
            d
        }
        None => AlignedBuf::zeroed((count * BS) as usize),
    }
}

/// Checks one block of a layer against its record.
fn check_block(block: u64, data: &[u8], record: &[u8]) -> Result<Found> {
    let rec = format::decode_record(record).map_err(|e| {
        Error::new(ErrorKind::Corrupt, format!("record of block {block}: {e}")).at(block * BS)
    })?;
    if !rec.is_allocated() {
        return Ok(Found::Missing);
    }
    if rec.is_zero() {
        return Ok(Found::Zero);
    }
    let crc = jiva_core::crc32c(data);
    if crc != rec.crc {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("checksum mismatch in block {block} (stored {:08x}, computed {crc:08x})", rec.crc),
        )
        .at(block * BS));
    }
    Ok(Found::Data)
}

/// The stored record of `block` in `map`.
fn record_of(map: &RecordMap, block: u64) -> Result<[u8; RECZ]> {
    map.get(block).ok_or_else(|| {
        Error::new(ErrorKind::Corrupt, format!("block {block} is past the end of the records")).at(block * BS)
    })
}

/// Requests writing `rec` as the record of blocks `a..b`, in chunks that
/// share one buffer.
fn fill_records(file: &Arc<File>, a: u64, b: u64, rec: BlockRecord) -> Vec<Request> {
    let mut one = [0u8; RECZ];
    format::encode_record(&rec, &mut one);
    let chunk: Bytes = one.iter().copied().cycle().take((CHUNK_BLOCKS.min(b - a) * REC) as usize).collect();
    let mut out = Vec::new();
    let mut at = a;
    while at < b {
        let n = CHUNK_BLOCKS.min(b - at);
        out.push(Request::write(file, at * REC, chunk.slice(..(n * REC) as usize)));
        at += n;
    }
    out
}

/// Byte range of `n` blocks from block index `i` of a buffer.
fn blocks(i: u64, n: u64) -> std::ops::Range<usize> {
    (i * BS) as usize..((i + n) * BS) as usize
}

/// Byte range of `n` records from index `i` of a buffer.
fn recs(i: u64, n: u64) -> std::ops::Range<usize> {
    (i * REC) as usize..((i + n) * REC) as usize
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS))
}

/// An engine error as a store error at `offset`. A read past the end of a
/// file is a damaged store, not a lost connection.
fn io_error(err: std::io::Error, offset: u64) -> Error {
    let e = Error::from(err);
    let e = if e.kind() == ErrorKind::Disconnected { Error::new(ErrorKind::Io, e.message()) } else { e };
    e.at(offset)
}

fn collect(outcome: Outcome, offset: u64) -> Result<Vec<AlignedBuf>> {
    outcome.into_iter().map(|r| r.map(Completion::into_buf).map_err(|e| io_error(e, offset))).collect()
}

/// Runs a change to completion even if the caller stops waiting (see the
/// module documentation).
async fn detached<T: Send + 'static>(fut: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
    tokio::spawn(fut).await.map_err(|e| Error::new(ErrorKind::Io, format!("store task failed: {e}")))?
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("store task failed: {e}")))?
}

/// One write of consecutive region stamps.
fn stamp_write(file: &Arc<File>, run: &[(u64, u64)]) -> Request {
    let bytes: Bytes = run.iter().flat_map(|(_, v)| v.to_le_bytes()).collect();
    Request::write(file, run[0].0 * 8, bytes)
}

/// Opens an existing file with O_DIRECT.
fn open_direct(path: &Path, writable: bool) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options().read(true).write(writable).custom_flags(libc::O_DIRECT).open(path)
}

/// Opens (or with `create`, creates) the files of layer `id` (blocking);
/// its index starts empty.
fn open_layer(dir: &Path, id: u64, size: u64, create: bool, direct_io: bool) -> Result<Layer> {
    let ctx = |what: &str, e: std::io::Error| {
        let e = Error::from(e);
        Error::new(e.kind(), format!("{what} in {}: {}", dir.display(), e.message()))
    };
    let open = |name: String, len: u64| -> Result<Arc<File>> {
        let path = dir.join(&name);
        let file = File::options()
            .read(true)
            .write(true)
            .create(create)
            .truncate(create)
            .open(&path)
            .map_err(|e| ctx(&format!("cannot open {name}"), e))?;
        if create {
            file.set_len(len).map_err(|e| ctx(&format!("cannot size {name}"), e))?;
            file.sync_all().map_err(|e| ctx(&format!("cannot sync {name}"), e))?;
        } else {
            let actual = file.metadata().map_err(|e| ctx(&format!("cannot stat {name}"), e))?.len();
            if actual != len {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("{} is {actual} bytes, expected {len}", path.display()),
                ));
            }
        }
        Ok(Arc::new(file))
    };
    let buffered = open(format::data_file_name(id), size)?;
    let direct_file = if direct_io {
        open_direct(&dir.join(format::data_file_name(id)), true)
    } else {
        Err(std::io::Error::other("not requested"))
    };
    let (data, direct) = match direct_file {
        Ok(f) => (Arc::new(f), true),
        Err(e) if !direct_io => {
            tracing::trace!("buffered data files ({e})");
            (buffered, false)
        }
        Err(e) => {
            tracing::info!("O_DIRECT unavailable in {} ({e}); using the page cache", dir.display());
            (buffered, false)
        }
    };
    let bulk = if direct {
        None
    } else {
        open_direct(&dir.join(format::data_file_name(id)), true).ok().map(Arc::new)
    };
    let records_len = size / BS * REC;
    let records = open(format::records_file_name(id), records_len)?;
    let record_map = RecordMap::new(&records, records_len)
        .map_err(|e| ctx(&format!("cannot map {}", format::records_file_name(id)), e))?;
    Ok(Layer { id, data, direct, bulk, records, record_map, index: RwLock::new(BlockIndex::new()) })
}

/// Builds a layer's index from its records file, reading only the parts
/// that hold data (SEEK_DATA / SEEK_HOLE), so a sparse layer costs a few
/// syscalls. Any non-zero record counts (a corrupt one is reported when
/// its block is read).
fn build_index(records: &File, blocks: u64) -> std::io::Result<BlockIndex> {
    use std::os::unix::fs::FileExt;
    let len = blocks * REC;
    let fd = records.as_raw_fd();
    let mut index = BlockIndex::new();
    let mut buf = vec![0u8; (CHUNK_BLOCKS * REC) as usize];
    let mut at = 0u64;
    while at < len {
        // SAFETY: lseek only takes the descriptor, valid while `records` lives.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Whole records only: a data extent may start or end inside one.
        let (start, end) = ((data as u64) / REC * REC, (hole as u64).min(len).div_ceil(REC) * REC);
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            records.read_exact_at(&mut buf[..n], pos)?;
            let mut run: Option<u64> = None;
            for (k, rec) in buf[..n].chunks_exact(RECZ).enumerate() {
                let block = pos / REC + k as u64;
                let set = rec.iter().any(|&x| x != 0);
                match (set, run) {
                    (true, None) => run = Some(block),
                    (false, Some(r)) => {
                        index.insert_range(r, block);
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(r) = run {
                index.insert_range(r, (pos + n as u64) / REC);
            }
            pos += n as u64;
        }
        at = end.max(at + 1);
    }
    index.optimize();
    Ok(index)
}

/// Deletes layer files that the manifest does not name: leftovers of a
/// snapshot create, revert or merge that a crash interrupted before (or
/// after) its manifest rewrite. Failures are only logged.
fn remove_orphans(dir: &Path, layers: &[u64]) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let id = name
            .strip_prefix("layer-")
            .and_then(|rest| rest.strip_suffix(".data").or_else(|| rest.strip_suffix(".records")))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(id) = id
            && !layers.contains(&id)
        {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!("removed leftover layer file {}", entry.path().display()),
                Err(e) => tracing::warn!("cannot remove leftover layer file {}: {e}", entry.path().display()),
            }
        }
    }
}

/// Locks, reads or creates the store in `dir` (blocking).
fn open_dir(dir: &Path, size: u64, direct_io: bool) -> Result<Opened> {
    let ctx = |what: &str, e: std::io::Error| {
        let e = Error::from(e);
        Error::new(e.kind(), format!("{what} in {}: {}", dir.display(), e.message()))
    };
    std::fs::create_dir_all(dir).map_err(|e| ctx("cannot create the store directory", e))?;
    let lock_file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(format::LOCK_FILE))
        .map_err(|e| ctx("cannot open the lock file", e))?;
    // SAFETY: flock only takes the descriptor, valid while `lock_file` lives.
    if unsafe { libc::flock(lock_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("store in {} is in use by another process", dir.display()),
            ));
        }
        return Err(ctx("cannot lock the store", err));
    }
    let manifest_path = dir.join(format::MANIFEST_FILE);
    let manifest = match File::open(&manifest_path) {
        Ok(file) => {
            let mut bytes = Vec::new();
            file.take(format::MAX_MANIFEST_LEN as u64 + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| ctx("cannot read the manifest", e))?;
            let manifest = format::decode_manifest(&bytes).map_err(|e| {
                let kind = match e {
                    format::FormatError::UnsupportedVersion(_) => ErrorKind::Unsupported,
                    _ => ErrorKind::Corrupt,
                };
                Error::new(kind, format!("manifest {}: {e}", manifest_path.display()))
            })?;
            check_manifest(&manifest, size)?;
            Some(manifest)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(ctx("cannot open the manifest", e)),
    };
    let blocks = size / BS;
    let created = manifest.is_none();
    let manifest = manifest.unwrap_or_else(|| Manifest::new(size));
    let mut chain = Vec::new();
    for &id in &manifest.layers {
        let mut layer = open_layer(dir, id, size, created, direct_io)?;
        if !created {
            let records = layer.records.clone();
            let index =
                build_index(&records, blocks).map_err(|e| ctx(&format!("cannot index layer {id}"), e))?;
            layer.index = RwLock::new(index);
        }
        chain.push(layer);
    }
    if !created {
        remove_orphans(dir, &manifest.layers);
    }
    let regions = blocks.div_ceil(u64::from(manifest.region_size) / BS);
    let intent_len = format::intent_len(regions);
    let intent_path = dir.join(format::INTENT_FILE);
    let mut intent_file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(created)
        .open(&intent_path)
        .map_err(|e| ctx("cannot open the intent bitmap", e))?;
    let mut intent_bytes = Vec::new();
    intent_file.read_to_end(&mut intent_bytes).map_err(|e| ctx("cannot read the intent bitmap", e))?;
    if intent_bytes.len() as u64 != intent_len {
        intent_file.set_len(intent_len).map_err(|e| ctx("cannot size the intent bitmap", e))?;
        intent_file.sync_all().map_err(|e| ctx("cannot sync the intent bitmap", e))?;
    }
    let stamps_path = dir.join(format::STAMPS_FILE);
    let mut stamps_file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(created)
        .open(&stamps_path)
        .map_err(|e| ctx("cannot open the region stamps", e))?;
    let mut stamp_bytes = Vec::new();
    stamps_file.read_to_end(&mut stamp_bytes).map_err(|e| ctx("cannot read the region stamps", e))?;
    if stamp_bytes.len() as u64 != regions * 8 {
        // New, or a version 1 store: no change has a stamp yet.
        stamp_bytes = vec![0; (regions * 8) as usize];
        stamps_file.set_len(regions * 8).map_err(|e| ctx("cannot size the region stamps", e))?;
        std::os::unix::fs::FileExt::write_all_at(&stamps_file, &stamp_bytes, 0)
            .map_err(|e| ctx("cannot write the region stamps", e))?;
        stamps_file.sync_all().map_err(|e| ctx("cannot sync the region stamps", e))?;
    }
    let stamps =
        stamp_bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
    let mut manifest = manifest;
    if created || manifest.store_id == 0 {
        // Upgrading a version 1 store gives it an id, durably before use.
        if manifest.store_id == 0 {
            manifest.store_id = format::new_store_id();
        }
        // The manifest goes last: its presence means the layer files are complete.
        write_manifest(dir, &format::encode_manifest(&manifest))?;
    }
    Ok(Opened { manifest, chain, intent_file, intent_bytes, stamps_file, stamps, lock_file })
}

fn check_manifest(m: &Manifest, size: u64) -> Result<()> {
    if m.size != size {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("the store holds a volume of {} bytes, not {size}", m.size),
        ));
    }
    if m.block_size != BLOCK_SIZE || m.record_size != RECORD_SIZE {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("store uses {}-byte blocks and {}-byte records", m.block_size, m.record_size),
        ));
    }
    if m.region_size == 0 || !u64::from(m.region_size).is_multiple_of(BS) {
        return Err(Error::new(ErrorKind::Corrupt, format!("bad intent region size {}", m.region_size)));
    }
    Ok(())
}

/// Replaces the manifest atomically: temp file, fsync, rename, fsync dir.
fn write_manifest(dir: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format::MANIFEST_TMP_FILE);
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, dir.join(format::MANIFEST_FILE))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_crcs_combine_to_the_crc_of_the_whole() {
        let data: Vec<u8> =
            (0..5 * BSZ as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut whole = None;
        for block in data.chunks(BSZ) {
            let c = jiva_core::crc32c(block);
            whole = Some(whole.map_or(c, |w| crc_then_block(w, c)));
        }
        assert_eq!(whole, Some(jiva_core::crc32c(&data)));
    }
}
