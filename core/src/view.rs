//! A read-only [`BlockDevice`] view of one snapshot of a [`Volume`]: reads
//! and block status come from a healthy replica's copy of the snapshot
//! (the chain up to it), every change is refused. Frontends export it (NBD
//! `VOL@SNAP`) without reverting the volume.

use std::sync::Arc;

use bytes::Bytes;

use crate::device::{BlockDevice, Capabilities, Extent, ZeroFlags};
use crate::error::{Error, ErrorKind, Op, Result};
use crate::replica::Connector;
use crate::volume::Volume;

/// See the module documentation.
pub struct SnapshotView<C: Connector> {
    volume: Arc<Volume<C>>,
    name: String,
}

impl<C: Connector> std::fmt::Debug for SnapshotView<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotView").field("volume", &self.volume.name()).field("name", &self.name).finish()
    }
}

impl<C: Connector> SnapshotView<C> {
    /// A view of snapshot `name` of `volume` (whether it exists is found
    /// out on the first read).
    pub fn new(volume: Arc<Volume<C>>, name: impl Into<String>) -> SnapshotView<C> {
        SnapshotView { volume, name: name.into() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

fn read_only(op: Op) -> Error {
    Error::new(ErrorKind::ReadOnly, "a snapshot is read-only").with_op(op)
}

impl<C: Connector> BlockDevice for SnapshotView<C> {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            flush: false,
            fua: false,
            trim: false,
            write_zeroes: false,
            fast_zero: false,
            block_status: true,
            // Nothing changes: every connection sees the same.
            multi_conn: true,
            read_only: true,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.volume.read_snapshot(&self.name, offset, len).await
    }

    async fn write(&self, offset: u64, _data: Bytes, _fua: bool) -> Result<()> {
        Err(read_only(Op::Write).at(offset))
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, _len: u64, _fua: bool) -> Result<()> {
        Err(read_only(Op::Trim).at(offset))
    }

    async fn write_zeroes(&self, offset: u64, _len: u64, _flags: ZeroFlags) -> Result<()> {
        Err(read_only(Op::WriteZeroes).at(offset))
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.volume.snapshot_block_status(&self.name, offset, len).await
    }
}
