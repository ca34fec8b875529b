//! Heap buffers aligned for O_DIRECT, usable as zero-copy [`Bytes`].
//!
//! A buffer can also lend memory it does not own (see
//! [`AlignedBuf::lent`]), so that a read lands straight in memory another
//! process shares with us.
//!
//! Large buffers (rebuild chunks, big reads and writes) are recycled
//! through a small pool: a fresh multi-megabyte allocation is an mmap whose
//! every page faults in and is cleared, then unmapped on free, which cost
//! more CPU than the I/O it carried.

use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::any::Any;
use std::ptr::NonNull;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;

/// Alignment that satisfies O_DIRECT on every common block device.
pub const DIRECT_ALIGN: usize = 4096;

/// Buffers of at least this size come from (and return to) the pool. Small
/// ones too: a 4 KiB read buffer per request costs glibc's `memalign`
/// (slow, and it fragments the heap) more than a pool round trip.
const POOL_MIN: usize = 4 * 1024;
/// Alignment of buffers whose length O_DIRECT could never accept anyway
/// (not a multiple of 512, e.g. a 16-byte checksum record): aligning those
/// to a page only wastes memory and `memalign` time.
const SMALL_ALIGN: usize = 16;
/// Largest pooled size class (the largest request is 32 MiB).
const POOL_MAX: usize = 32 << 20;
/// Size classes: powers of two from POOL_MIN to POOL_MAX.
const CLASSES: usize = (POOL_MAX / POOL_MIN).trailing_zeros() as usize + 1;
/// Most bytes the pool keeps idle.
const POOL_BYTES: usize = 64 << 20;

struct Pool {
    free: [Vec<Pooled>; CLASSES],
    bytes: usize,
}

/// An idle pooled allocation of its class's capacity.
struct Pooled(NonNull<u8>);

// SAFETY: a pooled allocation is owned by the pool alone until handed out.
unsafe impl Send for Pooled {}

static POOL: Mutex<Pool> = Mutex::new(Pool { free: [const { Vec::new() }; CLASSES], bytes: 0 });

/// The size class and capacity for `len`, if it is pooled.
fn class_of(len: usize) -> Option<(usize, usize)> {
    if !(POOL_MIN..=POOL_MAX).contains(&len) {
        return None;
    }
    let cap = len.next_power_of_two();
    Some(((cap / POOL_MIN).trailing_zeros() as usize, cap))
}

/// A zero-initialised heap buffer, [`DIRECT_ALIGN`]-aligned whenever its
/// length is a multiple of 512 (any length O_DIRECT accepts).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Size of the allocation (>= len; a power of two when pooled).
    cap: usize,
    /// For lent memory: what keeps it valid and ours alone until dropped.
    lender: Option<Box<dyn Any + Send + Sync>>,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// The layout of an allocation of `cap` bytes (a function of `cap`
    /// alone, so `Drop` finds the same one).
    fn layout(cap: usize) -> Layout {
        let align = if cap.is_multiple_of(512) { DIRECT_ALIGN } else { SMALL_ALIGN };
        Layout::from_size_align(cap.max(1), align).expect("buffer size overflows a Layout")
    }

    /// A buffer for `len` bytes that the caller overwrites entirely before
    /// reading any of it (a read's destination): like [`AlignedBuf::zeroed`],
    /// but a recycled buffer keeps its stale (initialised) bytes instead of
    /// being cleared first.
    pub fn for_overwrite(len: usize) -> AlignedBuf {
        AlignedBuf::recycled(len).unwrap_or_else(|| AlignedBuf::zeroed(len))
    }

    pub fn zeroed(len: usize) -> AlignedBuf {
        if let Some(mut b) = AlignedBuf::recycled(len) {
            b.as_mut().fill(0);
            return b;
        }
        let cap = class_of(len).map_or(len, |(_, cap)| cap);
        let layout = Self::layout(cap);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        AlignedBuf { ptr, len, cap, lender: None }
    }

    /// An aligned copy of `data`.
    pub fn copy_of(data: &[u8]) -> AlignedBuf {
        let len = data.len();
        if let Some(mut b) = AlignedBuf::recycled(len) {
            b.as_mut().copy_from_slice(data);
            return b;
        }
        let cap = class_of(len).map_or(len, |(_, cap)| cap);
        let layout = Self::layout(cap);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        // SAFETY: `data` and the new allocation do not overlap, and the
        // allocation holds `cap >= len` bytes: after this every byte of it is
        // initialised (the tail too, as a later, longer reuse of the
        // allocation from the pool exposes it).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), len);
            ptr.as_ptr().add(len).write_bytes(0, cap - len);
        }
        AlignedBuf { ptr, len, cap, lender: None }
    }

    /// `len` bytes at `ptr` that `lender` keeps valid, initialised and
    /// reachable through this buffer alone for as long as it lives (it is
    /// dropped with the buffer); nothing is freed or pooled on drop.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` initialised bytes
    /// until `lender` is dropped, and no other reference may reach them
    /// meanwhile.
    pub unsafe fn lent(ptr: NonNull<u8>, len: usize, lender: Box<dyn Any + Send + Sync>) -> AlignedBuf {
        AlignedBuf { ptr, len, cap: len, lender: Some(lender) }
    }

    /// Whether this buffer's memory is lent (see [`AlignedBuf::lent`]).
    pub fn is_lent(&self) -> bool {
        self.lender.is_some()
    }

    /// A pooled allocation for `len` bytes, holding initialised (stale)
    /// bytes, if the pool has one.
    fn recycled(len: usize) -> Option<AlignedBuf> {
        let (class, cap) = class_of(len)?;
        let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
        let Pooled(ptr) = pool.free[class].pop()?;
        pool.bytes -= cap;
        Some(AlignedBuf { ptr, len, cap, lender: None })
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> AlignedBuf {
        AlignedBuf::copy_of(self)
    }
}

impl Default for AlignedBuf {
    fn default() -> AlignedBuf {
        AlignedBuf::zeroed(0)
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_ref()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut()
    }
}

impl From<AlignedBuf> for Bytes {
    fn from(b: AlignedBuf) -> Bytes {
        Bytes::from_owner(b)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr points to `len` initialised bytes that we own (or
        // that our lender keeps for us alone).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to `len` initialised bytes that we own (or
        // that our lender keeps for us alone) exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.lender.take().is_some() {
            return;
        }
        if let Some((class, cap)) = class_of(self.cap)
            && cap == self.cap
        {
            let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
            if pool.bytes + cap <= POOL_BYTES {
                pool.bytes += cap;
                pool.free[class].push(Pooled(self.ptr));
                return;
            }
        }
        // SAFETY: allocated in `zeroed` or `copy_of` with this very layout
        // (capacity `cap`); every byte of it was initialised at least once.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

/// `data` itself if it is already aligned in address and length for
/// O_DIRECT, else an aligned copy (without copying twice).
pub fn aligned_bytes(data: Bytes) -> Bytes {
    if (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) && data.len().is_multiple_of(512) {
        data
    } else {
        Bytes::from_owner(AlignedBuf::copy_of(&data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_aligned_and_equal() {
        let src = Bytes::from(vec![7u8; 9000]).slice(3..8195);
        let a = aligned_bytes(src.clone());
        assert_eq!(a, src);
        assert!((a.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN));
        let again = aligned_bytes(a.clone());
        assert_eq!(again.as_ptr(), a.as_ptr(), "aligned input is not copied");
        assert!(AlignedBuf::zeroed(0).as_ref().is_empty());
    }

    #[test]
    fn pooled_buffers_come_back_zeroed_or_copied() {
        for round in 0..3u8 {
            let len = 300 * 1024 + usize::from(round) * 4096;
            let data = vec![round + 1; len];
            let c = AlignedBuf::copy_of(&data);
            assert_eq!(&c[..], &data[..]);
            assert!((c.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN));
            drop(c);
            let z = AlignedBuf::zeroed(len + 8192);
            assert!(z.iter().all(|&b| b == 0), "a recycled buffer is cleared");
            assert_eq!(z.len(), len + 8192);
        }
        assert_eq!(class_of(POOL_MIN - 1), None);
        assert_eq!(class_of(POOL_MIN), Some((0, POOL_MIN)));
        assert_eq!(class_of(POOL_MIN + 1), Some((1, 2 * POOL_MIN)));
        assert_eq!(class_of(POOL_MAX), Some((CLASSES - 1, POOL_MAX)));
        assert_eq!(class_of(POOL_MAX + 1), None);
    }
}
