//! Heap buffers aligned for O_DIRECT, usable as zero-copy [`Bytes`].

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

use bytes::Bytes;

/// Alignment that satisfies O_DIRECT on every common block device.
pub const DIRECT_ALIGN: usize = 4096;

/// A zero-initialised, [`DIRECT_ALIGN`]-aligned heap buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(1), DIRECT_ALIGN).expect("buffer size overflows a Layout")
    }

    pub fn zeroed(len: usize) -> AlignedBuf {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        AlignedBuf { ptr, len }
    }

    /// An aligned copy of `data`.
    pub fn copy_of(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(data.len());
        b.as_mut().copy_from_slice(data);
        b
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
        // SAFETY: ptr points to `len` initialised bytes that we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to `len` initialised bytes that we own exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this very layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
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
}
