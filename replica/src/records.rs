//! A read-only shared mapping of a layer's records file, so that a read
//! looks up the records of its blocks with loads instead of a second
//! `preadv2` next to the data's.
//!
//! The mapping shows the file's page cache, so records written with
//! `pwrite` (every change still writes records that way, and gets a clean
//! error when the disk is full) are visible as soon as the write returns.
//! Callers hold the store's range lock over the blocks they look up, so no
//! change of ours rewrites those records meanwhile; the loads are atomic
//! all the same, as the memory is the kernel's to change.
//!
//! A records page that the page cache no longer holds is read back by a
//! page fault on the calling thread, as a `pread` on the sync engine would.
//! A media error under such a page raises SIGBUS and ends the replica
//! process, which the controller handles like any replica crash.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use jiva_core::shm::Mapping;

use crate::format::RECORD_SIZE;

const REC: usize = RECORD_SIZE as usize;

/// See the module documentation.
#[derive(Debug)]
pub struct RecordMap {
    /// Read-only, a whole number of records long; `None` for an empty file.
    map: Option<Mapping>,
}

impl RecordMap {
    /// Maps the first `len` bytes of `file` (its whole length: a records
    /// file is never resized while open) read-only.
    pub fn new(file: &File, len: u64) -> io::Result<RecordMap> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("records file too large to map"))?;
        if len % REC != 0 {
            return Err(io::Error::other("records file length is not a whole number of records"));
        }
        let map = if len == 0 { None } else { Some(Mapping::new(file.as_fd(), len, false)?) };
        Ok(RecordMap { map })
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
            // SAFETY: `at + 8 * w + 8 <= len`, so the word lies inside the
            // mapping, which stays mapped while `self` lives; the mapping is
            // page-aligned and `at + 8 * w` a multiple of 8, so the word is
            // aligned; and we only ever access this memory atomically (the
            // kernel changes it under us).
            let word = unsafe { AtomicU64::from_ptr(map.as_ptr().add(at + 8 * w).cast::<u64>()) };
            bytes.copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn sees_records_written_after_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("r"))
            .unwrap();
        file.set_len(4 * REC as u64).unwrap();
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
    fn empty_file_maps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("r")).unwrap();
        let map = RecordMap::new(&file, 0).unwrap();
        assert_eq!(map.get(0), None);
        assert!(RecordMap::new(&file, 3).is_err());
    }
}
