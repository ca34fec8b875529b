//! Short-circuit reads: a controller reads a replica on the same machine
//! straight from that replica's head files, as a client of HDFS reads a
//! local DataNode's block files, instead of asking over the socket.
//!
//! The replica stays the only writer and stays in its own process. At the
//! handshake it may hand the controller read-only descriptors of its head
//! layer's data and records files and a [`Validity`] word, but only while
//! its layer chain is the head alone. A read here is served only if all of
//! it is already in the page cache (`RWF_NOWAIT`), every block checks
//! against its record, and the word was set both before and after the
//! reads. Anything else returns `None` and the caller asks the replica
//! over the socket, which answers under its range lock: a read that races
//! a write to the same blocks can see data and record out of step, which
//! shows as a checksum mismatch and falls back, never as `Corrupt`.
//!
//! The replica clears the word, for good, before anything could make the
//! files stale: a change of its layer chain (snapshot create, revert,
//! merge), a newer controller fencing this one, and the end of the
//! connection. Writes of this controller go through the replica and reach
//! the page cache before they are acknowledged, so a read issued after an
//! acknowledgement sees them.
//!
//! Trust: the files are opened read-only by the replica; nothing read
//! from them is trusted beyond the crc check. Only the word is mapped, and
//! it is a memfd sealed against resizing, so no store of the replica's can
//! make the controller fault.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};

use crate::device::BLOCK_SIZE;
use crate::pipe::cvt;
use crate::record::{RECORD_SIZE, decode_record};
use crate::shm::Mapping;

/// Reads larger than this go over the socket.
pub const MAX_LOCAL_READ: usize = 1024 * 1024;
/// Reads up to this size are served on the caller's thread; larger ones
/// on tokio's blocking pool, beside the runtime thread's other work.
pub const INLINE_LOCAL_READ: usize = 256 * 1024;

const BS: usize = BLOCK_SIZE as usize;
const REC: usize = RECORD_SIZE as usize;
const MAX_BLOCKS: usize = MAX_LOCAL_READ / BS;
/// Seals a word's memfd carries: it cannot shrink (a mapped page past the
/// end would fault) or grow, and the seals cannot change.
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
const WORD_LEN: usize = 4096;

/// A word in memory shared by a replica and one controller connection:
/// non-zero while that controller may read the replica's head files.
#[derive(Debug)]
pub struct Validity {
    fd: OwnedFd,
    map: Mapping,
}

impl Validity {
    /// A new word, set (the replica's side).
    pub fn new() -> io::Result<Validity> {
        // SAFETY: memfd_create with a NUL-terminated name; checked by cvt.
        let raw = cvt(unsafe {
            libc::memfd_create(c"jiva-local-reads".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        })?;
        // SAFETY: memfd_create succeeded: a new descriptor that is ours alone.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        File::from(fd.try_clone()?).set_len(WORD_LEN as u64)?;
        // SAFETY: fcntl on a descriptor we own.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) })?;
        let map = Mapping::new(fd.as_fd(), WORD_LEN, true)?;
        let word = Validity { fd, map };
        word.word().store(1, Ordering::SeqCst);
        Ok(word)
    }

    /// The word a replica sent (the controller's side), after checking
    /// that it is sealed memory of the expected size.
    pub fn open(fd: OwnedFd) -> io::Result<Validity> {
        // SAFETY: fcntl query on a descriptor we own.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & SEALS != SEALS {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "validity word is not sealed"));
        }
        if File::from(fd.try_clone()?).metadata()?.len() != WORD_LEN as u64 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "validity word has an odd size"));
        }
        let map = Mapping::new(fd.as_fd(), WORD_LEN, true)?;
        Ok(Validity { fd, map })
    }

    /// The memfd, to send to the controller.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn word(&self) -> &AtomicU64 {
        // SAFETY: the mapping is page-aligned, WORD_LEN long, readable and
        // writable, and stays mapped while `self` lives; it is sealed
        // against shrinking, so the page cannot go away; both processes
        // only access it atomically.
        unsafe { AtomicU64::from_ptr(self.map.as_ptr().cast::<u64>()) }
    }

    pub fn is_valid(&self) -> bool {
        self.word().load(Ordering::SeqCst) != 0
    }

    /// Clears the word for good: the controller stops reading the files.
    pub fn revoke(&self) {
        self.word().store(0, Ordering::SeqCst);
    }
}

/// What a replica hands a local controller: see the module documentation.
#[derive(Debug)]
pub struct LocalHead {
    data: File,
    records: File,
    validity: Validity,
    /// Reads served here.
    served: AtomicU64,
}

impl LocalHead {
    /// Takes the descriptors a replica sent: data, records, validity word
    /// (in that order).
    pub fn open(fds: Vec<OwnedFd>) -> io::Result<LocalHead> {
        let [data, records, word]: [OwnedFd; 3] = fds
            .try_into()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "expected three descriptors"))?;
        let (data, records) = (File::from(data), File::from(records));
        for f in [&data, &records] {
            if !f.metadata()?.file_type().is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "head layer file is not a regular file",
                ));
            }
        }
        Ok(LocalHead { data, records, validity: Validity::open(word)?, served: AtomicU64::new(0) })
    }

    /// How many reads were served from the files.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// False once the replica has revoked the files.
    pub fn is_valid(&self) -> bool {
        self.validity.is_valid()
    }

    /// The verified contents of `len` bytes at `offset`, or `None` where
    /// this read must go to the replica instead (see the module docs).
    pub fn read(&self, offset: u64, len: usize) -> Option<Bytes> {
        if len == 0 || len > MAX_LOCAL_READ || !offset.is_multiple_of(BS as u64) || !len.is_multiple_of(BS) {
            return None;
        }
        if !self.is_valid() {
            return None;
        }
        let count = len / BS;
        let mut data = BytesMut::with_capacity(len);
        // SAFETY: the spare capacity is `len` writable bytes that nothing
        // else refers to; preadv2 writes at most that many.
        let got =
            unsafe { pread_nowait(&self.data, data.spare_capacity_mut().as_mut_ptr().cast(), len, offset) };
        if got != Some(len) {
            return None;
        }
        // SAFETY: preadv2 initialised the first `len` bytes.
        unsafe { data.set_len(len) };
        let mut records = vec![0u8; MAX_BLOCKS * REC];
        let rec_len = count * REC;
        let at = offset / BS as u64 * REC as u64;
        // SAFETY: `records` has at least `rec_len` bytes, ours for the call.
        if unsafe { pread_nowait(&self.records, records.as_mut_ptr(), rec_len, at) } != Some(rec_len) {
            return None;
        }
        for (block, rec) in data.chunks_exact_mut(BS).zip(records.chunks_exact(REC)) {
            let rec = decode_record(rec).ok()?;
            if !rec.is_allocated() || rec.is_zero() {
                // No snapshot below the head: unallocated reads as zeros.
                block.fill(0);
            } else if crate::crc32c(block) != rec.crc {
                return None;
            }
        }
        // Revoked meanwhile: the files may have been stale for part of it.
        if !self.is_valid() {
            return None;
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        Some(data.freeze())
    }
}

/// One `preadv2(RWF_NOWAIT)` of `len` bytes at `at` into `buf`: the count
/// read, or `None` on any error (data not cached, I/O error, ...).
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes.
unsafe fn pread_nowait(file: &File, buf: *mut u8, len: usize, at: u64) -> Option<usize> {
    let iov = libc::iovec { iov_base: buf.cast(), iov_len: len };
    let at = libc::off_t::try_from(at).ok()?;
    // SAFETY: one iovec over memory the caller vouches for.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
    usize::try_from(n).ok()
}
