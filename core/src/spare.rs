//! Buffers of large reads kept for reuse. A large short-circuit read
//! ([`crate::local`]) reads into one of these and its reply is sent
//! from it; once sent, the frontend hands it back ([`recycle`]) for the
//! next. Freeing a MiB and allocating it again costs more than it seems:
//! the allocator returns freed memory to the kernel, and it comes back as
//! page faults on freshly zeroed pages (see docs/performance.md).
//!
//! A buffer is kept only when nothing else refers to it, so a reply that
//! still holds it is never overwritten, and it is handed out empty, so
//! nothing of an earlier read can show through.

use std::sync::{Mutex, PoisonError};

use bytes::{Bytes, BytesMut};

use crate::local::MAX_LOCAL_READ;

/// Reads at least this long take a kept buffer.
const MIN_LEN: usize = 256 * 1024;
/// Most buffers kept (about one per large read in flight at depth 8).
const MAX_KEPT: usize = 8;

static SPARE: Spare = Spare::new();

/// A buffer for a read of `len` bytes: empty, with room for `len`.
pub fn take(len: usize) -> BytesMut {
    SPARE.take(len)
}

/// Keeps `data`, a buffer [`take`] gave out, for a later read, if nothing
/// else refers to it any more.
pub fn recycle(data: Bytes) {
    SPARE.keep(data);
}

struct Spare {
    kept: Mutex<Vec<BytesMut>>,
}

impl Spare {
    const fn new() -> Spare {
        Spare { kept: Mutex::new(Vec::new()) }
    }

    fn take(&self, len: usize) -> BytesMut {
        if !(MIN_LEN..=MAX_LOCAL_READ).contains(&len) {
            return BytesMut::with_capacity(len);
        }
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner).pop();
        kept.unwrap_or_else(|| BytesMut::with_capacity(MAX_LOCAL_READ))
    }

    fn keep(&self, data: Bytes) {
        if data.len() < MIN_LEN {
            return;
        }
        let Ok(mut buf) = data.try_into_mut() else { return };
        if buf.capacity() < MAX_LOCAL_READ {
            return;
        }
        buf.clear();
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() < MAX_KEPT {
            kept.push(buf);
        }
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(spare: &Spare, len: usize, byte: u8) -> Bytes {
        let mut buf = spare.take(len);
        assert!(buf.is_empty() && buf.capacity() >= len);
        buf.resize(len, byte);
        buf.freeze()
    }

    #[test]
    fn a_sent_buffer_is_handed_out_again_empty() {
        let spare = Spare::new();
        let first = filled(&spare, MAX_LOCAL_READ, 7);
        let at = first.as_ptr();
        spare.keep(first);
        assert_eq!(spare.kept(), 1);
        let again = spare.take(MIN_LEN);
        assert_eq!(again.as_ptr(), at, "the kept buffer is reused");
        assert!(again.is_empty(), "nothing of the earlier read shows through");
        assert_eq!(spare.kept(), 0);
    }

    #[test]
    fn a_buffer_still_referred_to_is_not_kept() {
        let spare = Spare::new();
        let data = filled(&spare, MAX_LOCAL_READ, 7);
        let reply = data.clone();
        spare.keep(data);
        assert_eq!(spare.kept(), 0, "a reply still holds it");
        let next = filled(&spare, MAX_LOCAL_READ, 9);
        assert_ne!(next.as_ptr(), reply.as_ptr());
        assert!(reply.iter().all(|&b| b == 7), "the reply is left as it was");
        spare.keep(reply);
        assert_eq!(spare.kept(), 1, "kept once its last holder hands it back");
    }

    #[test]
    fn small_reads_and_foreign_buffers_pass_by() {
        let spare = Spare::new();
        let small = spare.take(64 * 1024);
        assert!(small.capacity() < MAX_LOCAL_READ, "small reads get a buffer of their size");
        spare.keep(small.freeze());
        spare.keep(Bytes::from(vec![0u8; MIN_LEN]));
        spare.keep(Bytes::from_static(&[0u8; 16]));
        assert_eq!(spare.kept(), 0);
    }

    #[test]
    fn only_a_few_are_kept() {
        let spare = Spare::new();
        let all: Vec<Bytes> = (0..MAX_KEPT + 3).map(|_| filled(&spare, MAX_LOCAL_READ, 1)).collect();
        for data in all {
            spare.keep(data);
        }
        assert_eq!(spare.kept(), MAX_KEPT);
    }
}
