//! WRITE payloads in memory shared with replicas on the same machine.
//!
//! Sending a payload over a Unix socket costs the controller a page pin
//! and socket buffers per replica, and each replica a copy out of its
//! socket. Instead, the controller receives large WRITE payloads from the
//! client straight into a [`ShmPool`], a sealed memfd it maps read-write
//! and hands to each local replica at the handshake (as `SCM_RIGHTS` with
//! the Hello). A WRITE then carries only the payload's place in the pool
//! ([`crate::wire::FLAG_SHM`]); the replica maps the same memfd read-only
//! ([`ShmMap`]) and stores straight from it: one copy per replica, into its
//! page cache, instead of three.
//!
//! The lifetime rule: a payload's memory is reused only after every
//! replica it was sent to has answered the WRITE (the replica answers once
//! it no longer reads the payload). A request that ends without an answer
//! (time-out, lost connection, dropped future) [`ShmPool::leak`]s its
//! payload instead: that replica may still be reading it, so the memory is
//! never reused while the pool lives. Leaks are bounded by the pool; when
//! it is full, payloads go over the socket as before. A replica
//! connection's read pool goes away with the connection (the replica's
//! own mapping keeps the pages it may still write to).
//!
//! The memfd is sealed against shrinking and growing before it is shared,
//! and the replica checks the seals, so no mapping of it can ever fault
//! (`SIGBUS`) on a shortened file. A controller can still change a payload
//! while a replica stores it; that writes data the controller could have
//! written anyway.
//!
//! For a payload that several replicas will store, the volume has the
//! crc32c of each of its blocks computed once ([`ShmPool::compute_block_crcs`],
//! kept in a table beside the pool); the replica clients send them with the
//! reference ([`crate::wire::FLAG_BLOCK_CRCS`]) and every replica records
//! them as its blocks' checksums instead of computing its own. (With one
//! replica that would only move the work from the replica to the
//! controller, whose session reader is then the busier of the two.) A
//! payload changed after they were computed therefore reads back as
//! corrupt rather than as the changed data.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

use crate::device::BlockDevice;
use crate::pipe::{LowWater, cvt};

/// Payloads at least this large go through shared memory where a replica
/// has it. Even one block gains: with 3 replicas, 4 KiB random writes ran
/// 12 % (depth 32) to 28 % (depth 1) faster shared than over the sockets.
pub const MIN_SHM_BYTES: usize = 4096;

/// Largest payload placed in shared memory.
pub const MAX_SHM_BYTES: usize = 4 * 1024 * 1024;

/// Allocation unit (one block: the smallest payload shared).
const UNIT: usize = 4096;

/// Bytes a WRITE with [`crate::wire::FLAG_SHM`] carries on the wire: the
/// payload's offset in the pool (big-endian).
pub const REF_LEN: usize = 8;

/// The seals a shared pool must carry.
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// A shared mapping of the first `len` bytes of a file, read-write or
/// read-only, unmapped on drop. Its owner decides how the memory is
/// accessed (the pools here; the replica's records files).
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory that stays valid until drop; access
// is coordinated by its owner (for the pools: the allocator for writers,
// the lifetime rule in the module docs for readers).
unsafe impl Send for Mapping {}
// SAFETY: as above; `Mapping` itself hands out no references.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` (> 0) bytes of `fd` from its start.
    pub fn new(fd: BorrowedFd<'_>, len: usize, writable: bool) -> io::Result<Mapping> {
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a fresh shared mapping of a descriptor we hold; the kernel
        // picks the address. Checked for MAP_FAILED below.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len })
    }

    /// Start of the mapping (page-aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping").field("len", &self.len).finish()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; nothing refers
        // to it any more (every slice holds an `Arc` of its owner).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Free/used units of the pool. Allocation is first-fit from the start,
/// so the pages in use (a memfd keeps every page once touched) stay near
/// the most ever in flight at once rather than growing to the whole pool.
struct Units {
    used: Vec<bool>,
    /// Units never to be handed out again (see [`ShmPool::leak`]).
    retired: Vec<bool>,
}

impl Units {
    fn take(&mut self, n: usize) -> Option<usize> {
        let total = self.used.len();
        if n == 0 || n > total {
            return None;
        }
        let mut start = 0;
        while start + n <= total {
            match self.used[start..start + n].iter().rposition(|&u| u) {
                None => {
                    self.used[start..start + n].fill(true);
                    return Some(start);
                }
                Some(busy) => start += busy + 1,
            }
        }
        None
    }

    fn give(&mut self, first: usize, n: usize) {
        for (used, &retired) in self.used[first..first + n].iter_mut().zip(&self.retired[first..first + n]) {
            *used = retired;
        }
    }

    fn retire(&mut self, first: usize, n: usize) {
        self.retired[first..first + n].fill(true);
        self.used[first..first + n].fill(true);
    }
}

/// The controller's shared payload memory. See the module docs.
pub struct ShmPool {
    fd: OwnedFd,
    map: Mapping,
    units: Mutex<Units>,
    leaked_bytes: AtomicU64,
    /// Per unit (one block), the crc32c of the payload block there with
    /// [`CRC_KNOWN`] set, or 0 (not computed yet): cleared when a payload
    /// is frozen, filled in by [`ShmPool::compute_block_crcs`].
    crcs: Box<[AtomicU64]>,
}

/// Marks a known crc in [`ShmPool`]'s table.
const CRC_KNOWN: u64 = 1 << 32;

const _: () = assert!(UNIT == crate::BLOCK_SIZE as usize, "a pool unit is one block");

impl std::fmt::Debug for ShmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmPool").field("len", &self.map.len).finish()
    }
}

impl ShmPool {
    /// A pool of `len` bytes (rounded up to the allocation unit), sealed
    /// against resizing.
    pub fn new(len: usize) -> io::Result<Arc<ShmPool>> {
        let len = len.max(UNIT).next_multiple_of(UNIT);
        // SAFETY: memfd_create with a NUL-terminated name; checked below.
        let raw = cvt(unsafe {
            libc::memfd_create(c"jiva-payloads".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        })?;
        // SAFETY: memfd_create succeeded: a new descriptor that is ours alone.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        File::from(fd.try_clone()?).set_len(len as u64)?;
        // SAFETY: fcntl on a descriptor we own.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS | libc::F_SEAL_SEAL) })?;
        let map = Mapping::new(fd.as_fd(), len, true)?;
        let units = Units { used: vec![false; len / UNIT], retired: vec![false; len / UNIT] };
        let crcs = (0..len / UNIT).map(|_| AtomicU64::new(0)).collect();
        Ok(Arc::new(ShmPool { fd, map, units: Mutex::new(units), leaked_bytes: AtomicU64::new(0), crcs }))
    }

    /// The memfd, to share with a replica.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Size of the pool in bytes.
    pub fn len(&self) -> usize {
        self.map.len
    }

    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// Bytes given up by [`ShmPool::leak`].
    pub fn leaked_bytes(&self) -> u64 {
        self.leaked_bytes.load(Ordering::Relaxed)
    }

    /// Room for a `len`-byte payload, or `None` if the pool has none free
    /// (or `len` is outside the sizes worth sharing).
    pub fn alloc(self: &Arc<Self>, len: usize) -> Option<ShmBuf> {
        if !(MIN_SHM_BYTES..=MAX_SHM_BYTES).contains(&len) {
            return None;
        }
        let n = len.div_ceil(UNIT);
        let first = self.units.lock().unwrap_or_else(PoisonError::into_inner).take(n)?;
        Some(ShmBuf { slot: Slot { pool: self.clone(), first, units: n, len }, filled: 0 })
    }

    /// Computes the crc32c of each block of `data` not computed yet, where
    /// `data` is a block-aligned part of a frozen payload of this pool that
    /// the caller holds (false otherwise): for a payload several replicas
    /// will store, so that they record these instead of each computing
    /// its own (see [`ShmPool::block_crcs`]).
    ///
    /// The table entries of a live payload are its own: [`ShmBuf::freeze`]
    /// cleared them before anyone could hold it, only crcs of its blocks
    /// are stored there after, and its units are taken again only once it
    /// is dropped. Two callers at once store the same values.
    pub fn compute_block_crcs(&self, data: &[u8]) -> bool {
        let Some(entries) = self.crc_entries(data) else { return false };
        for (entry, block) in entries.iter().zip(data.chunks_exact(UNIT)) {
            // Relaxed: the payload's bytes are fixed, so any stored value
            // is the one this would compute.
            if entry.load(Ordering::Relaxed) & CRC_KNOWN == 0 {
                entry.store(CRC_KNOWN | u64::from(crate::crc32c(block)), Ordering::Relaxed);
            }
        }
        true
    }

    /// The crc32cs [`ShmPool::compute_block_crcs`] computed for the blocks
    /// of `data`, as big-endian u32s (the frame of a WRITE with
    /// [`crate::wire::FLAG_BLOCK_CRCS`]); `None` unless all of them are
    /// known.
    pub fn block_crcs(&self, data: &[u8]) -> Option<Bytes> {
        let entries = self.crc_entries(data)?;
        let mut out = Vec::with_capacity(entries.len() * 4);
        for entry in entries {
            let known = entry.load(Ordering::Relaxed);
            if known & CRC_KNOWN == 0 {
                return None;
            }
            out.extend_from_slice(&(known as u32).to_be_bytes());
        }
        Some(Bytes::from(out))
    }

    /// The crc table entries of `data`'s blocks, if it is whole blocks of
    /// this pool.
    fn crc_entries(&self, data: &[u8]) -> Option<&[AtomicU64]> {
        let at = self.locate(data)? as usize;
        let whole = at.is_multiple_of(UNIT) && data.len().is_multiple_of(UNIT);
        whole.then(|| &self.crcs[at / UNIT..(at + data.len()) / UNIT])
    }

    /// Where `data` lies in the pool, if it does.
    pub fn locate(&self, data: &[u8]) -> Option<u64> {
        let base = self.map.ptr.as_ptr() as usize;
        let at = (data.as_ptr() as usize).checked_sub(base)?;
        (at + data.len() <= self.map.len && !data.is_empty()).then_some(at as u64)
    }

    /// Never reuses `buf`'s memory: a replica may still write into it.
    pub fn leak_buf(&self, mut buf: ShmBuf) {
        buf.filled = buf.slot.len;
        self.leak(Bytes::from_owner(buf.slot));
    }

    /// Never reuses `data`'s memory while this pool lives: a replica may
    /// still read it. (The units are marked, not held: holding the payload
    /// would keep the pool alive through its own slot.)
    pub fn leak(&self, data: Bytes) {
        let Some(at) = self.locate(&data) else { return };
        let first = at as usize / UNIT;
        let n = (at as usize + data.len()).div_ceil(UNIT) - first;
        self.units.lock().unwrap_or_else(PoisonError::into_inner).retire(first, n);
        let total = self.leaked_bytes.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
        tracing::warn!(
            leaked_bytes = total,
            "a shared payload ended without the replica's answer; its memory is retired"
        );
    }
}

/// Units of the pool held by one payload; freed on drop.
struct Slot {
    pool: Arc<ShmPool>,
    first: usize,
    units: usize,
    len: usize,
}

impl Slot {
    fn ptr(&self) -> *mut u8 {
        // SAFETY: `first * UNIT` lies within the mapping (the allocator
        // hands out only units inside it).
        unsafe { self.pool.map.ptr.as_ptr().add(self.first * UNIT) }
    }
}

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the slot's units are ours until drop and lie within the
        // mapping; once frozen nobody in this process writes them.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len) }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.units.lock().unwrap_or_else(PoisonError::into_inner).give(self.first, self.units);
    }
}

/// A payload being received into the pool.
pub struct ShmBuf {
    slot: Slot,
    filled: usize,
}

impl std::fmt::Debug for ShmBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmBuf").field("len", &self.slot.len).field("filled", &self.filled).finish()
    }
}

impl ShmBuf {
    /// The payload's length.
    pub fn len(&self) -> usize {
        self.slot.len
    }

    pub fn is_empty(&self) -> bool {
        self.slot.len == 0
    }

    /// Bytes received so far.
    pub fn filled(&self) -> usize {
        self.filled
    }

    /// The part not yet received, to read into; then [`ShmBuf::advance`].
    pub fn unfilled(&mut self) -> &mut [u8] {
        // SAFETY: the slot's units are ours alone until frozen (the pool
        // hands each unit to one slot); memfd memory is initialised (zero).
        let all = unsafe { std::slice::from_raw_parts_mut(self.slot.ptr(), self.slot.len) };
        &mut all[self.filled..]
    }

    /// Where the buffer starts in the pool.
    pub fn offset(&self) -> u64 {
        (self.slot.first * UNIT) as u64
    }

    /// Marks `n` more bytes received.
    pub fn advance(&mut self, n: usize) {
        self.filled = (self.filled + n).min(self.slot.len);
    }

    /// The complete payload (its block crcs not computed yet: see
    /// [`ShmPool::compute_block_crcs`]).
    pub fn freeze(self) -> Bytes {
        debug_assert_eq!(self.filled, self.slot.len, "payload not fully received");
        // Relaxed: whoever reads the entries got the payload from us
        // through a synchronising hand-over.
        let slot = &self.slot;
        for entry in &slot.pool.crcs[slot.first..slot.first + slot.units] {
            entry.store(0, Ordering::Relaxed);
        }
        Bytes::from_owner(self.slot)
    }
}

/// Room for a `len`-byte WRITE payload that a frontend fills in any order
/// (an iSCSI write's segments, a TCMU command's buffers): memory the device
/// shares with its replicas where it offers some
/// ([`BlockDevice::payload_buffer`]), so that it passes the payload on
/// without a copy; else our own.
pub enum PayloadBuf {
    Shared(ShmBuf),
    Own(BytesMut),
}

impl PayloadBuf {
    pub fn new<D: BlockDevice>(device: &D, len: usize) -> PayloadBuf {
        match device.payload_buffer(len) {
            Some(shared) if shared.len() == len => PayloadBuf::Shared(shared),
            _ => PayloadBuf::Own(BytesMut::zeroed(len)),
        }
    }

    /// All of it, to write each part of the payload where it belongs.
    pub fn contents(&mut self) -> &mut [u8] {
        match self {
            // Nothing counts as received before `freeze`: all is unfilled.
            PayloadBuf::Shared(shared) => shared.unfilled(),
            PayloadBuf::Own(own) => own,
        }
    }

    /// The payload, once every byte of it has been written.
    pub fn freeze(self) -> Bytes {
        match self {
            PayloadBuf::Shared(mut shared) => {
                shared.advance(shared.len());
                shared.freeze()
            }
            PayloadBuf::Own(own) => own.freeze(),
        }
    }
}

/// Receives a payload into `into`, shared memory, from a frontend's
/// stream: what `rd` holds already, then the rest straight from the stream
/// into place (waited for whole when large, where `socket` is the stream's
/// TCP socket: see [`LowWater`]). The payload, frozen.
pub async fn receive<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    mut into: ShmBuf,
    socket: Option<BorrowedFd<'_>>,
) -> io::Result<Bytes> {
    let held = rd.buffer().len().min(into.len());
    into.unfilled()[..held].copy_from_slice(&rd.buffer()[..held]);
    into.advance(held);
    rd.consume(held);
    let mut low_water = LowWater::new(socket);
    while into.filled() < into.len() {
        low_water.expect(into.len() - into.filled());
        // The reader's buffer is empty: reading around it keeps the order.
        let n = rd.get_mut().read(into.unfilled()).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        into.advance(n);
    }
    Ok(into.freeze())
}

/// A replica's read-only mapping of a controller's pool.
pub struct ShmMap {
    map: Mapping,
    writable: bool,
    /// The memory's file (device, inode): the same for every descriptor
    /// and mapping of it.
    file: (u64, u64),
}

impl std::fmt::Debug for ShmMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmMap").field("len", &self.map.len).finish()
    }
}

impl ShmMap {
    /// Maps a pool received from a controller read-only, after checking
    /// that it is a memfd sealed against shrinking and growing.
    pub fn open(fd: OwnedFd) -> io::Result<Arc<ShmMap>> {
        ShmMap::open_as(fd, false)
    }

    /// Like [`ShmMap::open`], read-write: a pool for READ replies that
    /// only this replica was given.
    pub fn open_writable(fd: OwnedFd) -> io::Result<Arc<ShmMap>> {
        ShmMap::open_as(fd, true)
    }

    fn open_as(fd: OwnedFd, writable: bool) -> io::Result<Arc<ShmMap>> {
        // SAFETY: fcntl query on a descriptor we own.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & SEALS != SEALS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "shared payload memory is not sealed against resizing",
            ));
        }
        let meta = File::from(fd.try_clone()?).metadata()?;
        let (len, file) = (meta.len(), (meta.dev(), meta.ino()));
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if len == 0 || len > 1 << 34 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "shared payload memory has an odd size"));
        }
        let map = Mapping::new(fd.as_fd(), len, writable)?;
        Ok(Arc::new(ShmMap { map, writable, file }))
    }

    /// Which memory this maps (device and inode of its file): two maps
    /// with the same identity reach the same bytes.
    pub fn identity(&self) -> (u64, u64) {
        self.file
    }

    /// Size of the mapping.
    pub fn len(&self) -> usize {
        self.map.len
    }

    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// `len` bytes at `offset`, without a copy; `None` if the range is
    /// not inside the mapping.
    pub fn slice(self: &Arc<Self>, offset: u64, len: usize) -> Option<Bytes> {
        let offset = usize::try_from(offset).ok()?;
        if len == 0 || offset.checked_add(len)? > self.map.len {
            return None;
        }
        Some(Bytes::from_owner(MappedSlice { map: self.clone(), offset, len }))
    }
}

impl ShmMap {
    /// The address of `offset..offset + len` of a writable mapping, if the
    /// range is non-empty and inside it. Writing through it is the
    /// caller's business: the pointer is valid while `self` lives.
    pub fn region_mut(&self, offset: u64, len: usize) -> Option<NonNull<u8>> {
        let offset = usize::try_from(offset).ok()?;
        if !self.writable || len == 0 || offset.checked_add(len).is_none_or(|end| end > self.map.len) {
            return None;
        }
        // SAFETY: `offset` is inside the mapping (checked above).
        NonNull::new(unsafe { self.map.ptr.as_ptr().add(offset) })
    }
}

/// Part of a [`ShmMap`], as the owner of a `Bytes`.
struct MappedSlice {
    map: Arc<ShmMap>,
    offset: usize,
    len: usize,
}

impl AsRef<[u8]> for MappedSlice {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the range was checked against the mapping, which lives as
        // long as `self.map`. The controller writes a payload before
        // sending its WRITE and reuses it only after our answer.
        unsafe { std::slice::from_raw_parts(self.map.map.ptr.as_ptr().add(self.offset), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_handed_out_once_and_come_back() {
        let mut u = Units { used: vec![false; 8], retired: vec![false; 8] };
        assert_eq!(u.take(3), Some(0));
        assert_eq!(u.take(3), Some(3));
        assert_eq!(u.take(3), None, "only two units left");
        assert_eq!(u.take(2), Some(6));
        u.give(3, 3);
        assert_eq!(u.take(4), None, "three free in a row at most");
        assert_eq!(u.take(3), Some(3));
        u.give(0, 3);
        u.give(6, 2);
        assert_eq!(u.take(1), Some(0), "first fit from the start");
        assert_eq!(u.take(2), Some(1));
        assert_eq!(u.take(2), Some(6), "skips what does not fit");
        assert_eq!(u.take(1), None);
        assert_eq!(u.take(9), None);
        assert_eq!(u.take(0), None);
        u.retire(6, 2);
        u.give(6, 2);
        u.give(0, 3);
        assert_eq!(u.take(2), Some(0));
        assert_eq!(u.take(2), None, "retired units stay taken after they are given back");
    }

    #[test]
    fn a_payload_written_into_the_pool_reads_back_through_a_second_mapping() {
        let pool = ShmPool::new(1 << 20).unwrap();
        let mut buf = pool.alloc(100_000).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        buf.unfilled()[..60_000].copy_from_slice(&data[..60_000]);
        buf.advance(60_000);
        buf.unfilled().copy_from_slice(&data[60_000..]);
        buf.advance(40_000);
        let frozen = buf.freeze();
        assert_eq!(&frozen[..], &data[..]);
        let at = pool.locate(&frozen).unwrap();
        assert_eq!(pool.locate(&frozen[10..20]), Some(at + 10));
        assert_eq!(pool.locate(&data), None, "heap memory is not in the pool");

        let map = ShmMap::open(pool.fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(map.len(), pool.len());
        assert_eq!(&map.slice(at, data.len()).unwrap()[..], &data[..]);
        assert!(map.slice(at + 1, map.len()).is_none(), "past the end");
        assert!(map.slice(0, map.len()).is_some(), "all of it");
        assert!(map.slice(u64::MAX, 1).is_none());
        assert!(map.slice(0, 0).is_none());
    }

    fn frozen(pool: &Arc<ShmPool>, data: &[u8]) -> Bytes {
        let mut buf = pool.alloc(data.len()).unwrap();
        buf.unfilled().copy_from_slice(data);
        buf.advance(data.len());
        buf.freeze()
    }

    fn be_crcs(data: &[u8]) -> Vec<u8> {
        data.chunks(UNIT).flat_map(|b| crate::crc32c(b).to_be_bytes()).collect()
    }

    #[test]
    fn a_frozen_payload_carries_the_crcs_of_its_whole_blocks() {
        let pool = ShmPool::new(8 * UNIT).unwrap();
        let data: Vec<u8> = (0..4 * UNIT as u32).map(|i| (i * 7 % 253) as u8).collect();
        let whole = frozen(&pool, &data);
        assert_eq!(pool.block_crcs(&whole), None, "not computed yet");
        assert!(pool.compute_block_crcs(&whole[UNIT..3 * UNIT]));
        assert_eq!(pool.block_crcs(&whole), None, "not all computed");
        assert!(pool.compute_block_crcs(&whole));
        assert_eq!(pool.block_crcs(&whole).as_deref(), Some(&be_crcs(&data)[..]));
        // Block-aligned parts of it too (a volume may split a write).
        let part = whole.slice(UNIT..3 * UNIT);
        assert_eq!(pool.block_crcs(&part).as_deref(), Some(&be_crcs(&data[UNIT..3 * UNIT])[..]));
        assert!(!pool.compute_block_crcs(&whole[1..UNIT + 1]), "not on a block boundary");
        assert!(!pool.compute_block_crcs(&whole[..UNIT + 1]), "not whole blocks");
        assert!(!pool.compute_block_crcs(&data), "heap memory is not in the pool");
        assert_eq!(pool.block_crcs(&data), None);
        drop((whole, part));

        // The same units again: the new payload's crcs, none of the old.
        let data: Vec<u8> = (0..2 * UNIT as u32 + 100).map(|i| (i % 241) as u8).collect();
        let short = frozen(&pool, &data);
        assert_eq!(pool.locate(&short), Some(0), "the freed units are reused");
        assert_eq!(pool.block_crcs(&short[..2 * UNIT]), None, "the old payload's crcs are gone");
        assert!(pool.compute_block_crcs(&short[..2 * UNIT]));
        assert_eq!(pool.block_crcs(&short[..2 * UNIT]).as_deref(), Some(&be_crcs(&data[..2 * UNIT])[..]));
    }

    #[test]
    fn block_crcs_are_computed_once_per_payload() {
        let pool = ShmPool::new(4 * UNIT).unwrap();
        let data = vec![5u8; 2 * UNIT];
        let payload = frozen(&pool, &data);
        assert!(pool.compute_block_crcs(&payload));
        let first = pool.block_crcs(&payload).unwrap();
        // Changed behind the payload's back (another mapping could), the
        // blocks keep the crcs computed first.
        // SAFETY: a byte inside the pool's mapping, of a payload this test
        // holds; nothing reads it concurrently.
        unsafe { *pool.map.as_ptr().add(10) = 6 };
        assert!(pool.compute_block_crcs(&payload));
        assert_eq!(pool.block_crcs(&payload), Some(first.clone()));
        assert_ne!(crate::crc32c(&payload[..UNIT]).to_be_bytes()[..], first[..4]);
    }

    #[test]
    fn freed_payloads_are_reused_and_leaked_ones_never() {
        let pool = ShmPool::new(4 * UNIT).unwrap();
        let fill = |b: &mut ShmBuf| {
            let n = b.len();
            b.unfilled().fill(7);
            b.advance(n);
        };
        let mut a = pool.alloc(2 * UNIT).unwrap();
        fill(&mut a);
        let a = a.freeze();
        let mut b = pool.alloc(2 * UNIT).unwrap();
        fill(&mut b);
        let b = b.freeze();
        assert!(pool.alloc(UNIT).is_none(), "full");
        drop(a);
        let c = pool.alloc(2 * UNIT).expect("freed units are reused");
        drop(c);
        pool.leak(b);
        assert_eq!(pool.leaked_bytes(), 2 * UNIT as u64);
        assert!(pool.alloc(3 * UNIT).is_none(), "leaked units stay taken");
        assert!(pool.alloc(2 * UNIT).is_some());
        assert!(pool.alloc(MIN_SHM_BYTES - 1).is_none(), "too small to share");
    }

    #[test]
    fn an_unsealed_memfd_is_refused() {
        // SAFETY: memfd_create with a NUL-terminated name; checked below.
        let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor that is ours alone.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        File::from(fd.try_clone().unwrap()).set_len(1 << 20).unwrap();
        assert!(ShmMap::open(fd).is_err());
    }
}
