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
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use jiva_core::range_lock::RangeLock;
use jiva_core::wire::{Membership, RebuildMark, ReplicaMeta};
use jiva_core::{
    BLOCK_SIZE, BlockDevice, Capabilities, Error, ErrorKind, Extent, ExtentState, Op, Result, ZeroFlags,
    block_span,
};

use crate::engine::aligned::{AlignedBuf, aligned_bytes};
use crate::engine::{Batch, Completion, Engine, EngineKind, Outcome, Request, cache};
use crate::format::{self, BlockRecord, Manifest, RECORD_SIZE};
use crate::intent::{self, Intent};

const BS: u64 = BLOCK_SIZE as u64;
const BSZ: usize = BLOCK_SIZE as usize;
const REC: u64 = RECORD_SIZE as u64;
const RECZ: usize = RECORD_SIZE as usize;
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
}

/// Rebuild copies of at least this many bytes, and reads of at least this
/// many bytes not all in the page cache, use [`Layer::bulk`] when it exists.
const BULK: usize = 256 * 1024;

/// How [`Inner::write_blocks`] writes.
#[derive(Clone, Copy)]
struct WriteKind {
    fua: bool,
    /// The crc32c the whole (block-aligned) payload must have.
    copy: Option<u32>,
    /// Bypass the page cache when large (rebuild copies).
    bulk: bool,
}

impl WriteKind {
    const PLAIN: WriteKind = WriteKind { fua: false, copy: None, bulk: false };
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
    /// Oldest first, the writable head last; never empty.
    chain: Vec<Layer>,
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
    /// Holds the `flock` that keeps other processes out.
    _lock_file: File,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .field("size", &self.inner.size)
            .field("engine", &self.inner.engine.kind())
            .field("layers", &self.inner.chain.iter().map(|l| l.id).collect::<Vec<_>>())
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
            chain: opened.chain,
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
        Ok(Store { inner: Arc::new(inner) })
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
            inner.write_with(offset, data, false, Some(crc)).await
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
    fn head(&self) -> &Layer {
        self.chain.last().expect("the layer chain is never empty")
    }

    fn manifest(&self) -> MutexGuard<'_, Manifest> {
        self.manifest.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `batch`; the first failure becomes the error (at `offset`).
    async fn run(&self, batch: Batch, offset: u64) -> Result<Vec<AlignedBuf>> {
        collect(self.engine.run(batch).await, offset)
    }

    /// Data and records of `count` blocks from `first` in `layer`, in one batch.
    async fn read_layer(&self, layer: &Layer, first: u64, count: u64) -> Result<(AlignedBuf, AlignedBuf)> {
        let batch = vec![
            Request::read(
                layer.data_for_read(first * BS, (count * BS) as usize),
                first * BS,
                (count * BS) as usize,
            ),
            Request::read(&layer.records, first * REC, (count * REC) as usize),
        ];
        let mut out = self.run(batch, first * BS).await?.into_iter();
        let data = out.next().unwrap_or_default();
        let records = out.next().unwrap_or_default();
        Ok((data, records))
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

    /// Verified contents of `count` blocks from `first`, walking the chain.
    /// Callers hold the range lock.
    async fn read_blocks(&self, first: u64, count: u64) -> Result<AlignedBuf> {
        let (head, parents) = self.chain.split_last().expect("the layer chain is never empty");
        let (mut out, records) = self.read_layer(head, first, count).await?;
        let mut missing = Vec::new();
        for i in 0..count {
            let block = &mut out[blocks(i, 1)];
            match check_block(first + i, block, &records[recs(i, 1)])? {
                Found::Data => {}
                Found::Zero => block.fill(0),
                Found::Missing => missing.push(i),
            }
        }
        for layer in parents.iter().rev() {
            let (Some(&lo), Some(&hi)) = (missing.first(), missing.last()) else { break };
            let (data, records) = self.read_layer(layer, first + lo, hi + 1 - lo).await?;
            let mut still = Vec::new();
            for &i in &missing {
                let block = &data[blocks(i - lo, 1)];
                match check_block(first + i, block, &records[recs(i - lo, 1)])? {
                    Found::Data => out[blocks(i, 1)].copy_from_slice(block),
                    Found::Zero => out[blocks(i, 1)].fill(0),
                    Found::Missing => still.push(i),
                }
            }
            missing = still;
        }
        // Not allocated anywhere: zeros, whatever the head's data file holds.
        for i in missing {
            out[blocks(i, 1)].fill(0);
        }
        Ok(out)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.write_with(offset, data, fua, None).await
    }

    /// A write; with `copy`, a rebuild copy whose payload must have that
    /// crc32c (see [`Store::write_copy`]).
    async fn write_with(&self, offset: u64, data: Bytes, fua: bool, copy: Option<u32>) -> Result<()> {
        if data.is_empty() {
            return if fua { self.sync_head(offset).await } else { Ok(()) };
        }
        let aligned = offset.is_multiple_of(BS) && data.len().is_multiple_of(BSZ);
        if let Some(crc) = copy
            && !aligned
            && crc32c::crc32c(&data) != crc
        {
            return Err(payload_mismatch(offset));
        }
        let (first, count) = block_span(offset, data.len() as u64);
        let _range = self.lock.lock(first, first + count, true).await;
        self.mark_intent(first, count).await?;
        let buf = if aligned { data } else { self.merge(offset, &data, first, count).await? };
        let write = WriteKind { fua, copy: copy.filter(|_| aligned), bulk: copy.is_some() };
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
    async fn write_blocks(&self, first: u64, buf: Bytes, kind: WriteKind, offset: u64) -> Result<()> {
        let mut records = vec![0u8; buf.len() / BSZ * RECZ];
        let mut whole: Option<u32> = None;
        for (block, rec) in buf.chunks(BSZ).zip(records.chunks_mut(RECZ)) {
            let crc = crc32c::crc32c(block);
            if kind.copy.is_some() {
                whole = Some(whole.map_or(crc, |w| crc_then_block(w, crc)));
            }
            format::encode_record(&BlockRecord::data(crc), rec);
        }
        if kind.copy.is_some() && whole != kind.copy {
            return Err(payload_mismatch(offset));
        }
        let head = self.head();
        let write = if kind.fua { Request::write_dsync } else { Request::write };
        let (file, data) = match &head.bulk {
            _ if head.direct => (&head.data, aligned_bytes(buf)),
            Some(bulk) if kind.bulk && buf.len() >= BULK => (bulk, aligned_bytes(buf)),
            _ => (&head.data, buf),
        };
        let batch =
            vec![write(file, first * BS, data), write(&head.records, first * REC, Bytes::from(records))];
        self.run(batch, first * BS).await.map(drop)
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
    /// records (or, over parents, marks them zero so they do not show through).
    async fn punch_blocks(&self, a: u64, b: u64) -> Result<()> {
        let head = self.head();
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let data_punch = Request::fallocate(&head.data, punch, a * BS, (b - a) * BS);
        let over_parents = self.chain.len() > 1;
        let record_bytes = (b - a) * REC;
        let punch_records = !over_parents && record_bytes >= BS;
        let mut batch = vec![data_punch];
        if punch_records {
            // The kernel zeroes the partial pages at the ends of the range.
            batch.push(Request::fallocate(&head.records, punch, a * REC, record_bytes));
        } else {
            let rec = if over_parents { BlockRecord::zero() } else { BlockRecord::UNALLOCATED };
            batch.extend(fill_records(&head.records, a, b, rec));
        }
        let mut out = self.engine.run(batch).await.into_iter();
        // A file system without hole punching keeps the data; the cleared
        // records hide it, so that is not an error.
        match out.next() {
            Some(Err(e)) if !unsupported(&e) => return Err(io_error(e, a * BS)),
            _ => {}
        }
        let rest: Outcome = out.collect();
        if punch_records && rest.iter().any(|r| r.as_ref().is_err_and(unsupported)) {
            let batch = fill_records(&head.records, a, b, BlockRecord::UNALLOCATED);
            return self.run(batch, a * BS).await.map(drop);
        }
        collect(rest, a * BS).map(drop)
    }

    /// Zeroes blocks `a..b` of the head keeping them allocated: ZERO_RANGE
    /// on the data (or just an allocation where unsupported: ZERO records
    /// are never read from the data) and ZERO records.
    async fn zero_blocks(&self, a: u64, b: u64) -> Result<()> {
        let head = self.head();
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
        let end = offset + len;
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let mut chunk = first;
        while chunk < first + count {
            let n = CHUNK_BLOCKS.min(first + count - chunk);
            for (i, state) in self.block_states(chunk, n).await?.into_iter().enumerate() {
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

    /// Allocation state of `count` blocks from `first`, walking the chain.
    async fn block_states(&self, first: u64, count: u64) -> Result<Vec<ExtentState>> {
        let mut states = vec![ExtentState::Hole; count as usize];
        let mut missing: Vec<u64> = (0..count).collect();
        for layer in self.chain.iter().rev() {
            let (Some(&lo), Some(&hi)) = (missing.first(), missing.last()) else { break };
            let batch =
                vec![Request::read(&layer.records, (first + lo) * REC, ((hi + 1 - lo) * REC) as usize)];
            let records = self.run(batch, (first + lo) * BS).await?.pop().unwrap_or_default();
            let mut still = Vec::new();
            for &i in &missing {
                match format::decode_record(&records[recs(i - lo, 1)]) {
                    Ok(rec) if !rec.is_allocated() => still.push(i),
                    Ok(rec) if rec.is_zero() => states[i as usize] = ExtentState::Zero,
                    // Data, or a corrupt record (reading the block reports it).
                    _ => states[i as usize] = ExtentState::Data,
                }
            }
            missing = still;
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
                    let crc = crc32c::crc32c(&data[blocks(i, 1)]);
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
    let crc = crc32c::crc32c(data);
    if crc != rec.crc {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("checksum mismatch in block {block} (stored {:08x}, computed {crc:08x})", rec.crc),
        )
        .at(block * BS));
    }
    Ok(Found::Data)
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
    let head = manifest.head();
    let mut chain = Vec::new();
    for &id in &manifest.layers {
        let writable = id == head;
        let open = |name: String, len: u64| -> Result<Arc<File>> {
            let path = dir.join(&name);
            let file = File::options()
                .read(true)
                .write(writable)
                .create(created)
                .truncate(created)
                .open(&path)
                .map_err(|e| ctx(&format!("cannot open {name}"), e))?;
            if created {
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
            open_direct(&dir.join(format::data_file_name(id)), writable)
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
        let bulk = if !direct {
            open_direct(&dir.join(format::data_file_name(id)), writable).ok().map(Arc::new)
        } else {
            None
        };
        let records = open(format::records_file_name(id), blocks * REC)?;
        chain.push(Layer { id, data, direct, bulk, records });
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
            let c = crc32c::crc32c(block);
            whole = Some(whole.map_or(c, |w| crc_then_block(w, c)));
        }
        assert_eq!(whole, Some(crc32c::crc32c(&data)));
    }
}
