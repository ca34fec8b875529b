//! What the replication core needs from a replica beyond block I/O:
//! generation-stamped changes, the replica's metadata (identity,
//! generation record, rebuild mark), per-region stamps, and a way to
//! (re)connect by address. [`crate::remote::RemoteReplica`] implements it
//! over TCP; [`MemReplica`] in memory, for the volume's own tests.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::device::{BlockDevice, Capabilities, Extent, ZeroFlags};
use crate::error::{Error, ErrorKind, Op, Result};
use crate::mem::MemDevice;
use crate::pipe::Piped;
use crate::wire::{Membership, RebuildMark, ReplicaMeta, SnapshotEntry};

/// A replica as the volume drives it. `generation` on a change is the
/// volume generation it belongs to: the replica raises the stamp of every
/// touched region to at least that, durably, before changing it.
pub trait Replica: BlockDevice {
    /// WRITE; with `crc` the replica refuses a payload whose crc32c differs.
    fn write_at(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
        generation: u64,
        crc: Option<u32>,
    ) -> impl Future<Output = Result<()>> + Send;
    /// [`Replica::write_at`] of a write the volume sends to other replicas
    /// as well, so it completes with the slowest of them: a replica may
    /// answer such writes sooner, at some cost (see
    /// [`crate::wire::FLAG_FAN_OUT`]). The default is `write_at`.
    fn fan_out_write_at(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
        generation: u64,
    ) -> impl Future<Output = Result<()>> + Send {
        self.write_at(offset, data, fua, generation, None)
    }
    /// WRITE of a payload held in a pipe (see [`crate::pipe`]); replicas
    /// that can send it on without copying do. The default reads it into
    /// memory for [`Replica::write_at`].
    fn write_piped_at(
        &self,
        offset: u64,
        data: Piped,
        fua: bool,
        generation: u64,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            let data = data.into_bytes().map_err(|e| Error::from(e).with_op(Op::Write))?;
            self.write_at(offset, data, fua, generation, None).await
        }
    }
    fn trim_at(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        generation: u64,
    ) -> impl Future<Output = Result<()>> + Send;
    fn zeroes_at(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
        generation: u64,
    ) -> impl Future<Output = Result<()>> + Send;
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;
    fn meta(&self) -> impl Future<Output = Result<ReplicaMeta>> + Send;
    /// Records `m` durably.
    fn set_membership(&self, m: &Membership) -> impl Future<Output = Result<()>> + Send;
    /// Records (or with `None` clears) the rebuild mark durably.
    fn set_rebuild(&self, mark: Option<&RebuildMark>) -> impl Future<Output = Result<()>> + Send;
    /// Stamps of `count` regions from region `first`.
    fn stamps(&self, first: u64, count: u64) -> impl Future<Output = Result<Vec<u64>>> + Send;
    /// False once the link is known to be broken.
    fn is_connected(&self) -> bool {
        true
    }
    /// Whether this link takes WRITE payloads straight from the memory of
    /// [`Connector::payload_buffer`] (else they are copied to it).
    fn shares_payload_memory(&self) -> bool {
        false
    }
    /// Freezes the head as snapshot `name`, created at `created_ms`
    /// (milliseconds since the Unix epoch; 0 = the replica's clock). A
    /// replica without snapshots says Unsupported; so do the other
    /// snapshot calls.
    fn create_snapshot(
        &self,
        name: &str,
        system: bool,
        created_ms: u64,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = (name, system, created_ms);
        async { Err(no_snapshots()) }
    }
    /// Starts deleting snapshot `name` (it merges into its child).
    fn delete_snapshot(&self, name: &str) -> impl Future<Output = Result<()>> + Send {
        let _ = name;
        async { Err(no_snapshots()) }
    }
    /// Makes the head's contents snapshot `name`'s; a change of volume
    /// generation `generation`.
    fn revert_snapshot(&self, name: &str, generation: u64) -> impl Future<Output = Result<()>> + Send {
        let _ = (name, generation);
        async { Err(no_snapshots()) }
    }
    /// The snapshots, oldest first.
    fn snapshots(&self) -> impl Future<Output = Result<Vec<SnapshotEntry>>> + Send {
        async { Err(no_snapshots()) }
    }
    /// Reads `len` bytes at `offset` of snapshot `name`.
    fn read_snapshot(
        &self,
        name: &str,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = Result<Bytes>> + Send {
        let _ = (name, offset, len);
        async { Err(no_snapshots()) }
    }
    /// Allocation of `offset..offset+len` in snapshot `name`.
    fn snapshot_block_status(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<Extent>>> + Send {
        let _ = (name, offset, len);
        async { Err(no_snapshots()) }
    }
    /// Allocation of `offset..offset+len` in snapshot `name`'s own layer
    /// (Hole where that layer holds no record).
    fn snapshot_layer_status(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<Extent>>> + Send {
        let _ = (name, offset, len);
        async { Err(no_snapshots()) }
    }
    /// Drops every snapshot newer than `keep` (all with `None`) and the
    /// head, leaving an empty head on top of `keep`.
    fn truncate_snapshots(&self, keep: Option<&str>) -> impl Future<Output = Result<()>> + Send {
        let _ = keep;
        async { Err(no_snapshots()) }
    }
}

fn no_snapshots() -> Error {
    Error::new(ErrorKind::Unsupported, "this replica keeps no snapshots").with_op(Op::Snapshot)
}

/// Opens links to replicas by address.
pub trait Connector: Send + Sync + 'static {
    type Link: Replica;
    /// Attaches to the replica at `addr` as controller `epoch`; returns the
    /// link and the replica's metadata.
    fn attach(
        &self,
        addr: &str,
        epoch: u64,
    ) -> impl Future<Output = Result<(Self::Link, ReplicaMeta)>> + Send;

    /// Room for a `len`-byte WRITE payload in memory the replicas share
    /// (see [`crate::shm`]), where there is any.
    fn payload_buffer(&self, len: usize) -> Option<crate::shm::ShmBuf> {
        let _ = len;
        None
    }

    /// Has the block crcs of `data`, a payload from
    /// [`Connector::payload_buffer`] that several replicas will store,
    /// computed once for all of them (see
    /// [`crate::shm::ShmPool::compute_block_crcs`]). The default does
    /// nothing.
    fn share_block_crcs(&self, data: &[u8]) {
        let _ = data;
    }
}

/// Regions (of `region` bytes) touched by a change of `len` bytes at `offset`.
pub fn touched_regions(offset: u64, len: u64, region: u64) -> std::ops::Range<u64> {
    if len == 0 {
        return 0..0;
    }
    offset / region..(offset + len - 1) / region + 1
}

/// An in-memory replica "process": survives [`MemReplica::kill`] (its data
/// and metadata stay, like files on disk) but every link to it breaks.
#[derive(Debug)]
pub struct MemReplica {
    dev: MemDevice,
    region: u64,
    stamps: Mutex<Vec<u64>>,
    meta: Mutex<ReplicaMeta>,
    /// Newest epoch attached.
    epoch: AtomicU64,
    /// Bumped by kill, so older links break.
    incarnation: AtomicU64,
    down: AtomicBool,
    /// Counts bytes written (all writes, rebuild ones included).
    pub written: AtomicU64,
    /// Counts writes sent as [`Replica::fan_out_write_at`].
    pub fan_out_writes: AtomicU64,
}

impl MemReplica {
    pub fn new(size: u64, region: u64, store_id: u64) -> Arc<MemReplica> {
        let regions = size.div_ceil(region) as usize;
        Arc::new(MemReplica {
            dev: MemDevice::new(size),
            region,
            stamps: Mutex::new(vec![0; regions]),
            meta: Mutex::new(ReplicaMeta {
                store_id,
                region_size: region as u32,
                membership: Membership::default(),
                rebuild: None,
            }),
            epoch: AtomicU64::new(0),
            incarnation: AtomicU64::new(0),
            down: AtomicBool::new(false),
            written: AtomicU64::new(0),
            fan_out_writes: AtomicU64::new(0),
        })
    }

    pub fn device(&self) -> &MemDevice {
        &self.dev
    }

    /// The process dies: links break, new ones are refused until [`MemReplica::restart`].
    pub fn kill(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.incarnation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn restart(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    pub fn stored_meta(&self) -> ReplicaMeta {
        self.meta.lock().unwrap().clone()
    }

    fn stamp(&self, offset: u64, len: u64, generation: u64) {
        let mut stamps = self.stamps.lock().unwrap();
        for r in touched_regions(offset, len, self.region) {
            let s = &mut stamps[r as usize];
            *s = (*s).max(generation);
        }
    }
}

/// A link to a [`MemReplica`]; broken once the replica is killed.
#[derive(Debug, Clone)]
pub struct MemLink {
    rep: Arc<MemReplica>,
    incarnation: u64,
    epoch: u64,
}

impl MemLink {
    fn check(&self, op: Op) -> Result<()> {
        if self.rep.incarnation.load(Ordering::SeqCst) != self.incarnation {
            return Err(Error::new(ErrorKind::Disconnected, "replica went away").with_op(op));
        }
        if self.rep.epoch.load(Ordering::SeqCst) > self.epoch {
            return Err(Error::new(ErrorKind::Fenced, "newer epoch attached").with_op(op));
        }
        Ok(())
    }

    pub fn replica(&self) -> &Arc<MemReplica> {
        &self.rep
    }
}

impl BlockDevice for MemLink {
    fn size(&self) -> u64 {
        self.rep.dev.size()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::full()
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.check(Op::Read)?;
        self.rep.dev.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.write_at(offset, data, fua, 0, None).await
    }
    async fn flush(&self) -> Result<()> {
        self.check(Op::Flush)?;
        self.rep.dev.flush().await
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.trim_at(offset, len, fua, 0).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.zeroes_at(offset, len, flags, 0).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check(Op::BlockStatus)?;
        self.rep.dev.block_status(offset, len).await
    }
}

impl Replica for MemLink {
    async fn fan_out_write_at(&self, offset: u64, data: Bytes, fua: bool, generation: u64) -> Result<()> {
        self.rep.fan_out_writes.fetch_add(1, Ordering::Relaxed);
        self.write_at(offset, data, fua, generation, None).await
    }

    async fn write_at(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
        generation: u64,
        crc: Option<u32>,
    ) -> Result<()> {
        self.check(Op::Write)?;
        if crc.is_some_and(|c| c != crate::crc32c(&data)) {
            return Err(Error::new(ErrorKind::Corrupt, "payload crc mismatch").with_op(Op::Write));
        }
        self.rep.stamp(offset, data.len() as u64, generation);
        self.rep.written.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.rep.dev.write(offset, data, fua).await
    }
    async fn trim_at(&self, offset: u64, len: u64, fua: bool, generation: u64) -> Result<()> {
        self.check(Op::Trim)?;
        self.rep.stamp(offset, len, generation);
        self.rep.dev.trim(offset, len, fua).await
    }
    async fn zeroes_at(&self, offset: u64, len: u64, flags: ZeroFlags, generation: u64) -> Result<()> {
        self.check(Op::WriteZeroes)?;
        self.rep.stamp(offset, len, generation);
        self.rep.dev.write_zeroes(offset, len, flags).await
    }
    async fn ping(&self) -> Result<()> {
        self.check(Op::Flush)
    }
    async fn meta(&self) -> Result<ReplicaMeta> {
        self.check(Op::Handshake)?;
        Ok(self.rep.stored_meta())
    }
    async fn set_membership(&self, m: &Membership) -> Result<()> {
        self.check(Op::Handshake)?;
        self.rep.meta.lock().unwrap().membership = m.clone();
        Ok(())
    }
    async fn set_rebuild(&self, mark: Option<&RebuildMark>) -> Result<()> {
        self.check(Op::Handshake)?;
        self.rep.meta.lock().unwrap().rebuild = mark.cloned();
        Ok(())
    }
    async fn stamps(&self, first: u64, count: u64) -> Result<Vec<u64>> {
        self.check(Op::Read)?;
        let stamps = self.rep.stamps.lock().unwrap();
        stamps
            .get(first as usize..(first + count) as usize)
            .map(<[u64]>::to_vec)
            .ok_or_else(|| Error::new(ErrorKind::OutOfRange, "stamp range"))
    }
    fn is_connected(&self) -> bool {
        self.rep.incarnation.load(Ordering::SeqCst) == self.incarnation
    }
}

/// Connects to [`MemReplica`]s by name.
#[derive(Debug, Default)]
pub struct MemConnector {
    replicas: Mutex<HashMap<String, Arc<MemReplica>>>,
}

impl MemConnector {
    pub fn add(&self, addr: &str, rep: Arc<MemReplica>) {
        self.replicas.lock().unwrap().insert(addr.to_string(), rep);
    }

    pub fn get(&self, addr: &str) -> Arc<MemReplica> {
        self.replicas.lock().unwrap()[addr].clone()
    }
}

impl Connector for MemConnector {
    type Link = MemLink;

    async fn attach(&self, addr: &str, epoch: u64) -> Result<(MemLink, ReplicaMeta)> {
        let rep = self
            .replicas
            .lock()
            .unwrap()
            .get(addr)
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::Disconnected, format!("no replica at {addr}")))?;
        if rep.down.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Disconnected, format!("replica {addr} is down")));
        }
        let prev = rep.epoch.fetch_max(epoch, Ordering::SeqCst);
        if prev > epoch {
            return Err(Error::new(ErrorKind::Fenced, format!("epoch {epoch} < {prev}")));
        }
        let link = MemLink { incarnation: rep.incarnation.load(Ordering::SeqCst), epoch, rep: rep.clone() };
        Ok((link, rep.stored_meta()))
    }
}
