//! The block-device trait that every layer of the data path speaks, and the
//! one range check that frontends apply at the edge.
//!
//! The trait is deliberately narrow and protocol-neutral: byte offsets and
//! lengths, a handful of operations, capability probes whose defaults say
//! "unsupported". Frontend specifics (NBD flags, SCSI sense) stay in the
//! frontends; store specifics (layers, checksums) stay in the replica.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Error, ErrorKind, Op, Result};
use crate::pipe::Payload;

/// The unit of allocation, checksumming and replication ordering.
pub const BLOCK_SIZE: u32 = 4096;

/// Largest single read or write the data path accepts (frontends split or
/// refuse larger requests).
pub const MAX_IO_BYTES: u32 = 32 * 1024 * 1024;

/// What a device can do. Frontends advertise exactly these, nothing more.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// FLUSH makes completed writes durable.
    pub flush: bool,
    /// Per-write force-unit-access is honoured.
    pub fua: bool,
    /// TRIM releases space.
    pub trim: bool,
    /// WRITE_ZEROES is efficient (no data transfer).
    pub write_zeroes: bool,
    /// WRITE_ZEROES never falls back to writing zero buffers, so a
    /// "fail if slow" zero request can always be honoured.
    pub fast_zero: bool,
    /// BLOCK_STATUS reports real allocation.
    pub block_status: bool,
    /// A flush on one connection covers writes completed on every other
    /// connection, so several clients may share the device.
    pub multi_conn: bool,
    /// Writes are refused.
    pub read_only: bool,
}

impl Capabilities {
    /// Everything a writable replicated device offers: flush, FUA, TRIM,
    /// fast WRITE_ZEROES, block status and multi-connection consistency.
    pub const fn full() -> Capabilities {
        Capabilities {
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            block_status: true,
            multi_conn: true,
            read_only: false,
        }
    }
}

/// Allocation state of an extent, as reported by [`BlockDevice::block_status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentState {
    /// Allocated, holds data.
    Data,
    /// Allocated, known to read as zeros.
    Zero,
    /// Not allocated; reads as zeros.
    Hole,
}

/// A run of bytes with one allocation state. Extents returned by
/// `block_status` are contiguous, starting at the requested offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub state: ExtentState,
}

/// Flags for [`BlockDevice::write_zeroes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Keep the range allocated (do not punch a hole).
    pub no_hole: bool,
    /// Make the zeros durable before completing.
    pub fua: bool,
}

/// A block device with an async, byte-addressed interface.
///
/// Callers (frontends) validate ranges with [`check_range`] before calling;
/// implementations may assume `offset + len <= size()`.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes; a multiple of [`BLOCK_SIZE`].
    fn size(&self) -> u64;

    fn capabilities(&self) -> Capabilities;

    fn read(&self, offset: u64, len: usize) -> impl Future<Output = Result<Bytes>> + Send;

    /// Serves a read on the calling thread, which may block (a frontend
    /// calls it from a blocking thread), where the device can do so without
    /// waiting on anything but memory: a local replica's cached head files
    /// (see [`crate::local`]). `None` where the read must go through
    /// [`BlockDevice::read`] instead; the default, for devices that cannot.
    fn read_at_once(&self, _offset: u64, _len: usize) -> Option<Bytes> {
        None
    }

    /// Whether [`BlockDevice::read_at_once`] may serve reads of `len` bytes
    /// now: a cheap hint for a frontend choosing where to run a read.
    fn reads_at_once(&self, _len: usize) -> bool {
        false
    }

    /// Like [`BlockDevice::read`], for a caller that can splice the data
    /// onward: devices that can hand it over in a pipe (see
    /// [`crate::pipe`]) do so for large reads. The default reads.
    fn read_payload(&self, offset: u64, len: usize) -> impl Future<Output = Result<Payload>> + Send {
        async move { self.read(offset, len).await.map(Payload::Bytes) }
    }

    /// Writes `data` at `offset`; with `fua` it is durable on completion.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<()>> + Send;

    /// Whether [`BlockDevice::write_payload`] passes a piped payload on
    /// without copying it out of its pipe (so a frontend should receive
    /// large WRITE payloads into pipes). The default copies: `false`.
    fn takes_piped_writes(&self) -> bool {
        false
    }

    /// Like [`BlockDevice::write`], with the payload possibly in a pipe
    /// (see [`crate::pipe`]). The default reads a piped payload into
    /// memory and writes that.
    fn write_payload(
        &self,
        offset: u64,
        data: Payload,
        fua: bool,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            let data = data.into_bytes().map_err(|e| Error::from(e).with_op(Op::Write))?;
            self.write(offset, data, fua).await
        }
    }

    /// Room to receive a `len`-byte WRITE payload into, where the device
    /// passes payloads in that memory on more cheaply than others (see
    /// [`crate::shm`]); frozen, it is then given to [`BlockDevice::write`].
    fn payload_buffer(&self, len: usize) -> Option<crate::shm::ShmBuf> {
        let _ = len;
        None
    }

    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;

    /// Releases the range; it reads as zeros afterwards.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> impl Future<Output = Result<()>> + Send {
        let _ = (offset, len, fua);
        async { Err(Error::unsupported("trim").with_op(Op::Trim)) }
    }

    /// Makes the range read as zeros.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = (offset, len, flags);
        async { Err(Error::unsupported("write-zeroes").with_op(Op::WriteZeroes)) }
    }

    /// Allocation map of the range. The default says "all data".
    fn block_status(&self, offset: u64, len: u64) -> impl Future<Output = Result<Vec<Extent>>> + Send {
        let _ = offset;
        async move { Ok(vec![Extent { length: len, state: ExtentState::Data }]) }
    }
}

/// A shared handle is a device too, so frontends can hold `Arc<Volume<_>>`.
impl<D: BlockDevice> BlockDevice for Arc<D> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn read(&self, offset: u64, len: usize) -> impl Future<Output = Result<Bytes>> + Send {
        (**self).read(offset, len)
    }
    fn read_payload(&self, offset: u64, len: usize) -> impl Future<Output = Result<Payload>> + Send {
        (**self).read_payload(offset, len)
    }
    fn read_at_once(&self, offset: u64, len: usize) -> Option<Bytes> {
        (**self).read_at_once(offset, len)
    }
    fn reads_at_once(&self, len: usize) -> bool {
        (**self).reads_at_once(len)
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<()>> + Send {
        (**self).write(offset, data, fua)
    }
    fn takes_piped_writes(&self) -> bool {
        (**self).takes_piped_writes()
    }
    fn payload_buffer(&self, len: usize) -> Option<crate::shm::ShmBuf> {
        (**self).payload_buffer(len)
    }
    fn write_payload(
        &self,
        offset: u64,
        data: Payload,
        fua: bool,
    ) -> impl Future<Output = Result<()>> + Send {
        (**self).write_payload(offset, data, fua)
    }
    fn flush(&self) -> impl Future<Output = Result<()>> + Send {
        (**self).flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> impl Future<Output = Result<()>> + Send {
        (**self).trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, f: ZeroFlags) -> impl Future<Output = Result<()>> + Send {
        (**self).write_zeroes(offset, len, f)
    }
    fn block_status(&self, offset: u64, len: u64) -> impl Future<Output = Result<Vec<Extent>>> + Send {
        (**self).block_status(offset, len)
    }
}

/// The one range check: `len` bytes at `offset` lie inside a device of
/// `size` bytes (a zero length is valid anywhere up to the end).
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::new(
            ErrorKind::OutOfRange,
            format!("{len} bytes at offset {offset} exceed device size {size}"),
        )
        .at(offset)),
    }
}

/// Rounds `offset..offset+len` outwards to whole blocks: (first block, block count).
pub fn block_span(offset: u64, len: u64) -> (u64, u64) {
    let bs = u64::from(BLOCK_SIZE);
    let first = offset / bs;
    let end = (offset + len).div_ceil(bs);
    (first, end - first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_check() {
        assert!(check_range(8192, 0, 8192).is_ok());
        assert!(check_range(8192, 8192, 0).is_ok());
        assert_eq!(check_range(8192, 4096, 8192).unwrap_err().kind(), ErrorKind::OutOfRange);
        assert_eq!(check_range(8192, u64::MAX, 2).unwrap_err().kind(), ErrorKind::OutOfRange);
        assert_eq!(check_range(8192, 8193, 0).unwrap_err().kind(), ErrorKind::OutOfRange);
    }

    #[test]
    fn spans() {
        assert_eq!(block_span(0, 4096), (0, 1));
        assert_eq!(block_span(1, 1), (0, 1));
        assert_eq!(block_span(4095, 2), (0, 2));
        assert_eq!(block_span(8192, 0), (2, 0));
    }
}
