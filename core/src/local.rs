//! Short-circuit reads: a controller reads a replica on the same machine
//! straight from that replica's layer files, as a client of HDFS reads a
//! local DataNode's block files, instead of asking over the socket.
//!
//! The replica stays the only writer and stays in its own process. It may
//! hand the controller read-only descriptors of the data and records files
//! of its layer chain (head first; the head alone where the chain has more
//! than [`MAX_LAYERS`] layers) and a [`Validity`] word: at the handshake
//! while the chain is the head alone, and on request
//! ([`crate::wire::Opcode::LocalFiles`]) at any time. A read
//! here is served only if all of it is already in the page cache
//! (`RWF_NOWAIT`), every block checks against its record in the first
//! layer that holds it, and the word was set both before and after the
//! reads. A block that no granted layer holds reads as zeros only if the
//! grant is the whole chain. Anything else returns `None` and the caller
//! asks the replica over the socket, which answers under its range lock: a
//! read that races a write to the same blocks can see data and record out
//! of step, which shows as a checksum mismatch and falls back, never as
//! `Corrupt`.
//!
//! The replica clears the word, for good, before anything could make the
//! files stale: a change of its layer chain (snapshot create, revert, the
//! end of a merge), a newer controller fencing this one, and the end of
//! the connection. The controller then asks for the new chain's files. A
//! merge copies a snapshot's blocks into the layer above it before the
//! chain changes, data first: a reader sees each block in one layer or the
//! other, with the same contents. Writes of this controller go through the
//! replica and reach the page cache before they are acknowledged, so a
//! read issued after an acknowledgement sees them.
//!
//! Trust: the files are opened read-only by the replica; nothing read
//! from them is trusted beyond the crc check. Only the word is mapped, and
//! it is a memfd sealed against resizing, so no store of the replica's can
//! make the controller fault.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

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

/// Most layers one grant names (head first): a block below them goes to
/// the replica, whose layer index finds it without reading every layer's
/// records.
pub const MAX_LAYERS: usize = 16;

/// One layer's files, as a replica sent them.
#[derive(Debug)]
struct Layer {
    data: File,
    records: File,
}

/// What a replica hands a local controller: the data and records files of
/// the top layers of its chain, head first, and the word that says they
/// may still be read (see the module documentation).
#[derive(Debug)]
pub struct LocalFiles {
    layers: Vec<Layer>,
    /// The layers are the whole chain: a block none of them holds reads as
    /// zeros. Otherwise a read of such a block goes to the replica.
    whole: bool,
    validity: Validity,
    /// Reads served here.
    served: AtomicU64,
}

impl LocalFiles {
    /// Takes the descriptors a replica sent: data and records of each
    /// layer, head first, then the validity word.
    pub fn open(fds: Vec<OwnedFd>, whole: bool) -> io::Result<LocalFiles> {
        if fds.len() < 3 || fds.len().is_multiple_of(2) || fds.len() > 2 * MAX_LAYERS + 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "expected a data and a records file per layer and a word, got {} descriptors",
                    fds.len()
                ),
            ));
        }
        let mut fds = fds.into_iter();
        let word = fds.next_back().expect("checked above");
        let mut layers = Vec::new();
        while let (Some(data), Some(records)) = (fds.next(), fds.next()) {
            let (data, records) = (File::from(data), File::from(records));
            for f in [&data, &records] {
                if !f.metadata()?.file_type().is_file() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "layer file is not a regular file",
                    ));
                }
            }
            layers.push(Layer { data, records });
        }
        Ok(LocalFiles { layers, whole, validity: Validity::open(word)?, served: AtomicU64::new(0) })
    }

    /// How many reads were served from the files.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// False once the replica has revoked the files.
    pub fn is_valid(&self) -> bool {
        self.validity.is_valid()
    }

    /// How many layers the files cover, and whether that is the whole chain.
    pub fn layers(&self) -> (usize, bool) {
        (self.layers.len(), self.whole)
    }

    /// The verified contents of `len` bytes at `offset`, or `None` where
    /// this read must go to the replica instead (see the module docs).
    ///
    /// Every block comes from the first layer whose record holds it (data
    /// or a ZERO record), as the replica's own read would find it. Records
    /// come first, layer by layer, and data is read only where a layer
    /// holds it: reading a layer's holes would fill the page cache with
    /// zeros (readahead of a sparse file). With every block in the head,
    /// that is one read of the records and one of the data.
    pub fn read(&self, offset: u64, len: usize) -> Option<Bytes> {
        if len == 0 || len > MAX_LOCAL_READ || !offset.is_multiple_of(BS as u64) || !len.is_multiple_of(BS) {
            return None;
        }
        if !self.is_valid() {
            return None;
        }
        let (first, count) = (offset / BS as u64, len / BS);
        let head = &self.layers[0];
        let mut records = vec![0u8; count * REC];
        read_records(head, first, &mut records)?;
        let held = |rec: &[u8]| decode_record(rec).is_ok_and(|r| r.is_allocated() && !r.is_zero());
        let mut data = crate::spare::take(len);
        if records.chunks_exact(REC).all(held) {
            // SAFETY: the spare capacity is `len` writable bytes that
            // nothing else refers to; preadv2 writes at most that many.
            let got = unsafe {
                pread_nowait(&head.data, data.spare_capacity_mut().as_mut_ptr().cast(), len, offset)
            };
            if got != Some(len) {
                return None;
            }
            // SAFETY: preadv2 initialised the first `len` bytes.
            unsafe { data.set_len(len) };
            for (block, rec) in data.chunks_exact_mut(BS).zip(records.chunks_exact(REC)) {
                if !matches!(check(block, rec)?, Held::Here) {
                    return None;
                }
            }
        } else {
            data.resize(len, 0);
            let all: Vec<usize> = (0..count).collect();
            let mut below = fill_from(head, first, &mut data, &all, &mut records, true)?;
            for layer in &self.layers[1..] {
                if below.is_empty() {
                    break;
                }
                below = fill_from(layer, first, &mut data, &below, &mut records, false)?;
            }
            // Held by no layer here: zeros (already) if these are all the
            // layers; otherwise only the replica knows.
            if !below.is_empty() && !self.whole {
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

/// Fills the blocks `todo` (indexes into `data`, ascending; `data` holds
/// zeros there) that `layer` holds, and returns those it does not. Reads
/// the records of each run of consecutive blocks first (unless
/// `have_records`: `records` holds them), then the data of each run of
/// blocks held as data.
fn fill_from(
    layer: &Layer,
    first: u64,
    data: &mut [u8],
    todo: &[usize],
    records: &mut [u8],
    have_records: bool,
) -> Option<Vec<usize>> {
    let mut left = Vec::new();
    for run in runs(todo) {
        let recs = &mut records[run.start * REC..run.end * REC];
        if !have_records {
            read_records(layer, first + run.start as u64, recs)?;
        }
        let mut held: Vec<usize> = Vec::new();
        for (i, rec) in run.clone().zip(recs.chunks_exact(REC)) {
            let rec = decode_record(rec).ok()?;
            if rec.is_zero() {
                // Zeros, as `data` holds already.
            } else if rec.is_allocated() {
                held.push(i);
            } else {
                left.push(i);
            }
        }
        for part in runs(&held) {
            let dest = &mut data[part.start * BS..part.end * BS];
            let at = (first + part.start as u64) * BS as u64;
            // SAFETY: `dest` is `dest.len()` bytes of ours for the call.
            if unsafe { pread_nowait(&layer.data, dest.as_mut_ptr(), dest.len(), at) } != Some(dest.len()) {
                return None;
            }
            let recs = &records[part.start * REC..part.end * REC];
            for (block, rec) in dest.chunks_exact_mut(BS).zip(recs.chunks_exact(REC)) {
                if !matches!(check(block, rec)?, Held::Here) {
                    return None;
                }
            }
        }
    }
    Some(left)
}

/// Where a block's contents are, by its record in one layer.
enum Held {
    /// In this layer, and `block` now holds them (checked, or zeros).
    Here,
    /// Not in this layer: in one below, or nowhere (zeros).
    Below,
}

/// Checks `block`, read from a layer, against its record `rec` there:
/// `None` on a mismatch (a race with a write, or damage: the replica
/// decides which).
fn check(block: &mut [u8], rec: &[u8]) -> Option<Held> {
    let rec = decode_record(rec).ok()?;
    if rec.is_zero() {
        block.fill(0);
        Some(Held::Here)
    } else if !rec.is_allocated() {
        Some(Held::Below)
    } else if crate::crc32c(block) == rec.crc {
        Some(Held::Here)
    } else {
        None
    }
}

/// Reads the records of blocks `first..` of `layer` into `out` (one
/// record per [`REC`] bytes).
fn read_records(layer: &Layer, first: u64, out: &mut [u8]) -> Option<()> {
    let at = first * REC as u64;
    // SAFETY: `out` is `out.len()` bytes of ours for the call.
    (unsafe { pread_nowait(&layer.records, out.as_mut_ptr(), out.len(), at) } == Some(out.len()))
        .then_some(())
}

/// Runs of consecutive numbers in ascending `items`.
fn runs(items: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for &i in items {
        match out.last_mut() {
            Some(r) if r.end == i => r.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
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
