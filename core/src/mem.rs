//! An in-memory [`BlockDevice`], for tests and as a stand-in replica. Holds
//! only written blocks, so large sparse sizes are cheap. Can be told to fail
//! or to return corrupt data, to exercise the replication core's retries.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};

use crate::device::{BLOCK_SIZE, BlockDevice, Capabilities, Extent, ExtentState, ZeroFlags};
use crate::error::{Error, ErrorKind, Op, Result};

const BS: u64 = BLOCK_SIZE as u64;

#[derive(Debug)]
pub struct MemDevice {
    size: u64,
    blocks: Mutex<HashMap<u64, Box<[u8]>>>,
    fail: AtomicBool,
    corrupt_reads: AtomicBool,
}

impl MemDevice {
    pub fn new(size: u64) -> MemDevice {
        MemDevice {
            size,
            blocks: Mutex::new(HashMap::new()),
            fail: AtomicBool::new(false),
            corrupt_reads: AtomicBool::new(false),
        }
    }

    /// Every later operation fails with an I/O error while set.
    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    /// Every later read reports corruption while set.
    pub fn set_corrupt_reads(&self, corrupt: bool) {
        self.corrupt_reads.store(corrupt, Ordering::SeqCst);
    }

    /// Number of allocated blocks.
    pub fn allocated_blocks(&self) -> usize {
        self.blocks.lock().unwrap().len()
    }

    fn check(&self, op: Op) -> Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Io, "injected failure").with_op(op));
        }
        Ok(())
    }

    fn read_sync(&self, offset: u64, len: usize) -> Bytes {
        let blocks = self.blocks.lock().unwrap();
        let mut out = BytesMut::zeroed(len);
        let mut pos = 0usize;
        while pos < len {
            let abs = offset + pos as u64;
            let (blk, within) = (abs / BS, (abs % BS) as usize);
            let n = (BS as usize - within).min(len - pos);
            if let Some(b) = blocks.get(&blk) {
                out[pos..pos + n].copy_from_slice(&b[within..within + n]);
            }
            pos += n;
        }
        out.freeze()
    }

    fn write_sync(&self, offset: u64, data: &[u8]) {
        let mut blocks = self.blocks.lock().unwrap();
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let (blk, within) = (abs / BS, (abs % BS) as usize);
            let n = (BS as usize - within).min(data.len() - pos);
            let b = blocks.entry(blk).or_insert_with(|| vec![0u8; BS as usize].into_boxed_slice());
            b[within..within + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
    }

    fn zero_sync(&self, offset: u64, len: u64) {
        let first_full = offset.div_ceil(BS);
        let end_full = (offset + len) / BS;
        if first_full >= end_full {
            self.write_sync(offset, &vec![0u8; len as usize]);
            return;
        }
        let head = first_full * BS - offset;
        if head > 0 {
            self.write_sync(offset, &vec![0u8; head as usize]);
        }
        let tail = offset + len - end_full * BS;
        if tail > 0 {
            self.write_sync(end_full * BS, &vec![0u8; tail as usize]);
        }
        let mut blocks = self.blocks.lock().unwrap();
        for blk in first_full..end_full {
            blocks.remove(&blk);
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::full()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.check(Op::Read)?;
        if self.corrupt_reads.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Corrupt, "injected corruption").with_op(Op::Read).at(offset));
        }
        Ok(self.read_sync(offset, len))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<()> {
        self.check(Op::Write)?;
        self.write_sync(offset, &data);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.check(Op::Flush)
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<()> {
        self.check(Op::Trim)?;
        self.zero_sync(offset, len);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<()> {
        self.check(Op::WriteZeroes)?;
        self.zero_sync(offset, len);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check(Op::BlockStatus)?;
        let blocks = self.blocks.lock().unwrap();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let blk = pos / BS;
            let n = ((blk + 1) * BS).min(end) - pos;
            let state = if blocks.contains_key(&blk) { ExtentState::Data } else { ExtentState::Hole };
            match out.last_mut() {
                Some(last) if last.state == state => last.length += n,
                _ => out.push(Extent { length: n, state }),
            }
            pos += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unaligned_round_trip_and_zero() {
        let d = MemDevice::new(1 << 20);
        d.write(4000, Bytes::from(vec![7u8; 9000]), false).await.unwrap();
        let r = d.read(3999, 9002).await.unwrap();
        assert_eq!(r[0], 0);
        assert!(r[1..9001].iter().all(|&b| b == 7));
        assert_eq!(r[9001], 0);
        d.trim(0, 1 << 20, false).await.unwrap();
        assert_eq!(d.allocated_blocks(), 0);
        assert!(d.read(0, 16384).await.unwrap().iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn block_status_merges_runs() {
        let d = MemDevice::new(1 << 20);
        d.write(8192, Bytes::from(vec![1u8; 8192]), false).await.unwrap();
        let ext = d.block_status(0, 32768).await.unwrap();
        assert_eq!(
            ext,
            vec![
                Extent { length: 8192, state: ExtentState::Hole },
                Extent { length: 8192, state: ExtentState::Data },
                Extent { length: 16384, state: ExtentState::Hole },
            ]
        );
    }
}
