//! A shared mapping of a layer's records file: a read looks up the records
//! of its blocks with loads instead of a second `preadv2` next to the
//! data's, and a plain write stores its records with stores instead of a
//! second `pwrite`.
//!
//! The mapping shows the file's page cache, so records written with
//! `pwrite` (FUA writes, trims, rebuild and merge copies) are visible as
//! soon as the write returns, and records stored here are what `pread`,
//! `fdatasync` and a short-circuit reader of the file see. Callers hold
//! the store's range lock over the blocks they look up or store, so no
//! change of ours rewrites those records meanwhile; the loads and stores
//! are atomic all the same, as the memory is the kernel's to change.
//!
//! A store must never fault for want of disk space: that would be SIGBUS,
//! not a clean error. So records are stored here only into a part of the
//! file that is allocated on disk: each chunk of [`CHUNK_RECORDS`] records
//! is allocated (`fallocate`) the first time a store needs it, and a store
//! whose chunk cannot be allocated (a full disk, a file system without
//! `fallocate`) returns false and the caller writes with `pwrite`, which
//! fails cleanly. A hole punched into the file later makes its chunks
//! unallocated again ([`RecordMap::forget_allocated`]).
//!
//! A records page that the page cache no longer holds is read back by a
//! page fault on the calling thread, as a `pread` on the sync engine would.
//! A media error under such a page raises SIGBUS and ends the replica
//! process, which the controller handles like any replica crash.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use jiva_core::shm::Mapping;

use crate::format::RECORD_SIZE;

const REC: usize = RECORD_SIZE as usize;

/// Records per allocation chunk: a page of them, the records of 1 MiB of
/// data, so that a trim followed by a few small writes leaves little of
/// its records allocated.
pub const CHUNK_RECORDS: u64 = 4096 / REC as u64;

/// See the module documentation.
#[derive(Debug)]
pub struct RecordMap {
    /// Read-write, a whole number of records long; `None` for an empty
    /// file.
    map: Option<Mapping>,
    /// One bit per chunk: allocated on disk, so stores into it cannot
    /// fault for space. Made by the first store (snapshots take none).
    allocated: OnceLock<Box<[AtomicU64]>>,
    /// Stores are off for good (`fallocate` is not supported here).
    no_stores: AtomicBool,
    /// Held while a chunk is allocated and its bit set, and while bits are
    /// cleared after a punch, so that a bit set for an allocation that a
    /// punch undid cannot outlive the punch's clearing.
    allocating: Mutex<()>,
}

impl RecordMap {
    /// Maps the first `len` bytes of `file` (its whole length: a records
    /// file is never resized while open), which is open for reading and
    /// writing.
    pub fn new(file: &File, len: u64) -> io::Result<RecordMap> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("records file too large to map"))?;
        if len % REC != 0 {
            return Err(io::Error::other("records file length is not a whole number of records"));
        }
        let map = if len == 0 { None } else { Some(Mapping::new(file.as_fd(), len, true)?) };
        Ok(RecordMap {
            map,
            allocated: OnceLock::new(),
            no_stores: AtomicBool::new(false),
            allocating: Mutex::new(()),
        })
    }

    /// The record of block `block` as stored, or `None` past the end of the
    /// file.
    pub fn get(&self, block: u64) -> Option<[u8; REC]> {
        let map = self.map.as_ref()?;
        let at = usize::try_from(block).ok()?.checked_mul(REC)?;
        if at.checked_add(REC)? > map.len() {
            return None;
        }
        let mut out = [0u8; REC];
        for (w, bytes) in out.chunks_exact_mut(8).enumerate() {
            bytes.copy_from_slice(&word(map, at + 8 * w).load(Ordering::Relaxed).to_ne_bytes());
        }
        Some(out)
    }

    /// Stores `records` (whole records) as those of the blocks from
    /// `first`, in `file` (the mapped one), if their chunks are or can be
    /// allocated; false, with nothing stored, where the caller must write
    /// them with `pwrite` instead.
    pub fn put(&self, file: &File, first: u64, records: &[u8]) -> bool {
        let Some(map) = self.map.as_ref() else { return false };
        let count = (records.len() / REC) as u64;
        let Some(end) = first.checked_add(count) else { return false };
        if !records.len().is_multiple_of(REC)
            || end > (map.len() / REC) as u64
            || self.no_stores.load(Ordering::Relaxed)
        {
            return false;
        }
        if count == 0 {
            return true;
        }
        // Allocated first, so the stores below cannot fault for space.
        if !self.allocate(file, first, end, map.len()) {
            return false;
        }
        let at = first as usize * REC;
        for (i, bytes) in records.chunks_exact(8).enumerate() {
            let value = u64::from_ne_bytes(bytes.try_into().expect("chunks of 8"));
            word(map, at + 8 * i).store(value, Ordering::Relaxed);
        }
        true
    }

    /// Makes sure the chunks of blocks `first..end` are allocated on disk.
    fn allocate(&self, file: &File, first: u64, end: u64, len: usize) -> bool {
        let allocated = self.allocated.get_or_init(|| {
            let chunks = (len / REC).div_ceil(CHUNK_RECORDS as usize);
            (0..chunks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
        });
        for chunk in first / CHUNK_RECORDS..end.div_ceil(CHUNK_RECORDS) {
            let (word, bit) = (&allocated[(chunk / 64) as usize], 1u64 << (chunk % 64));
            if word.load(Ordering::Acquire) & bit != 0 {
                continue;
            }
            let _allocating = self.allocating.lock().unwrap_or_else(PoisonError::into_inner);
            if word.load(Ordering::Acquire) & bit != 0 {
                continue; // allocated by another store meanwhile
            }
            let start = chunk * CHUNK_RECORDS * REC as u64;
            let bytes = (CHUNK_RECORDS * REC as u64).min(len as u64 - start);
            // SAFETY: plain fallocate on a descriptor we hold; mode 0
            // allocates the holes in the range and leaves its data alone.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, start as i64, bytes as i64) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    self.no_stores.store(true, Ordering::Relaxed);
                }
                tracing::debug!("records stored with pwrite: cannot allocate them: {e}");
                return false;
            }
            word.fetch_or(bit, Ordering::Release);
        }
        true
    }

    /// Called after a hole is punched into the records of blocks
    /// `first..end`: their chunks count as unallocated again. Callers
    /// hold the range lock over those blocks.
    pub fn forget_allocated(&self, first: u64, end: u64) {
        let Some(allocated) = self.allocated.get() else { return };
        let _allocating = self.allocating.lock().unwrap_or_else(PoisonError::into_inner);
        for chunk in first / CHUNK_RECORDS..end.div_ceil(CHUNK_RECORDS) {
            if let Some(word) = allocated.get((chunk / 64) as usize) {
                word.fetch_and(!(1u64 << (chunk % 64)), Ordering::Release);
            }
        }
    }
}

/// The 8-byte word at byte `at` of `map`, accessed atomically: the memory
/// is the kernel's to change (and, for a store, the file's to fault in).
fn word(map: &Mapping, at: usize) -> &AtomicU64 {
    assert!(at.is_multiple_of(8) && at + 8 <= map.len(), "record word {at} outside the mapping");
    // SAFETY: checked above: the word lies inside the mapping, which lives
    // as long as the borrow, and is 8-aligned (the mapping is
    // page-aligned); the mapping is shared, writable memory that we only
    // ever access atomically.
    unsafe { AtomicU64::from_ptr(map.as_ptr().add(at).cast::<u64>()) }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    /// A fresh records file of `len` bytes in `dir`.
    fn records_file(dir: &tempfile::TempDir, len: u64) -> File {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("r"))
            .unwrap();
        file.set_len(len).unwrap();
        file
    }

    #[test]
    fn sees_records_written_after_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let file = records_file(&dir, 4 * REC as u64);
        let map = RecordMap::new(&file, 4 * REC as u64).unwrap();
        assert_eq!(map.get(2), Some([0u8; REC]));
        let rec: [u8; REC] = std::array::from_fn(|i| i as u8 + 1);
        file.write_all_at(&rec, 2 * REC as u64).unwrap();
        assert_eq!(map.get(2), Some(rec));
        assert_eq!(map.get(1), Some([0u8; REC]));
        assert_eq!(map.get(3), Some([0u8; REC]));
        assert_eq!(map.get(4), None);
        assert_eq!(map.get(u64::MAX), None);
    }

    #[test]
    fn stores_reach_the_file_in_allocated_chunks_only() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let chunk = CHUNK_RECORDS * REC as u64;
        let file = records_file(&dir, 2 * chunk);
        let allocated = || file.metadata().unwrap().blocks() * 512;
        let map = RecordMap::new(&file, 2 * chunk).unwrap();
        let rec: [u8; REC] = std::array::from_fn(|i| i as u8 + 1);
        assert_eq!(allocated(), 0);
        assert!(map.put(&file, 5, &rec));
        let mut back = [0u8; REC];
        file.read_exact_at(&mut back, 5 * REC as u64).unwrap();
        assert_eq!(back, rec, "a store is what pread sees");
        assert_eq!(map.get(5), Some(rec));
        assert!(allocated() >= chunk && allocated() < 2 * chunk, "the first chunk, whole, and only it");

        // A punched hole makes the chunk unallocated; the next store there
        // allocates it again rather than faulting into the hole.
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a descriptor we hold.
        assert_eq!(unsafe { libc::fallocate(file.as_raw_fd(), punch, 0, chunk as i64) }, 0);
        map.forget_allocated(0, CHUNK_RECORDS);
        assert_eq!(allocated(), 0);
        assert!(map.put(&file, 7, &rec));
        assert!(allocated() >= chunk);
        assert_eq!(map.get(5), Some([0u8; REC]), "punched");
        assert_eq!(map.get(7), Some(rec));

        // Past the end, or not whole records: the caller writes instead.
        let two = [rec, rec].concat();
        assert!(!map.put(&file, 2 * CHUNK_RECORDS - 1, &two));
        assert!(!map.put(&file, 0, &rec[..8]));
        assert!(map.put(&file, 2 * CHUNK_RECORDS - 2, &two), "the last two records");
    }

    #[test]
    fn empty_file_maps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("r")).unwrap();
        let map = RecordMap::new(&file, 0).unwrap();
        assert_eq!(map.get(0), None);
        assert!(RecordMap::new(&file, 3).is_err());
    }
}
