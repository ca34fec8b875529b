//! The write-intent bitmap (as in md RAID): which regions may hold torn,
//! unacknowledged writes after a crash.
//!
//! A block's data and its record (with the crc) are written by two
//! operations that the kernel may persist in either order, so a crash can
//! leave a block whose checksum does not match. Such a write was never
//! acknowledged, so old or new content are both acceptable, and reporting
//! corruption would be wrong. Before the first write to a region, its bit
//! is set durably (concurrent first touches share one write + fdatasync of
//! the bitmap); later writes to the region pay nothing. On open, every
//! marked region's mismatching blocks get their crc re-derived from their
//! data, then the bitmap is cleared; a clean close clears it too.
//!
//! Trade-off: a mismatch inside a region that was marked at an unclean stop
//! is taken for a torn write, so bit rot that happened there is not
//! detected (the data is then served and replicated as if good). Bits stay
//! set until the next clean close or open, so after a long run a crash
//! re-checks every region written since the store was opened.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// In-memory state of the bitmap; the store does the I/O.
#[derive(Debug)]
pub struct Intent {
    region_blocks: u64,
    regions: u64,
    /// Bits known to be durable in the file.
    durable: Vec<AtomicU64>,
    /// Regions requested but not yet durable.
    pending: Mutex<BTreeSet<u64>>,
}

/// One bitmap update: write `bytes` at `offset`, fdatasync, then [`Intent::committed`].
#[derive(Debug)]
pub struct Update {
    pub offset: u64,
    pub bytes: Vec<u8>,
    regions: Vec<u64>,
}

impl Intent {
    /// A bitmap over `blocks` blocks in regions of `region_blocks` blocks,
    /// all clear.
    pub fn new(blocks: u64, region_blocks: u64) -> Intent {
        let regions = blocks.div_ceil(region_blocks);
        Intent {
            region_blocks,
            regions,
            durable: (0..regions.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pending: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn regions(&self) -> u64 {
        self.regions
    }

    pub fn region_blocks(&self) -> u64 {
        self.region_blocks
    }

    /// Regions touched by `count` blocks from `first`.
    pub fn span(&self, first: u64, count: u64) -> Range<u64> {
        if count == 0 {
            return 0..0;
        }
        first / self.region_blocks..(first + count - 1) / self.region_blocks + 1
    }

    /// Blocks of region `r`.
    pub fn blocks_of(&self, r: u64, blocks: u64) -> Range<u64> {
        r * self.region_blocks..((r + 1) * self.region_blocks).min(blocks)
    }

    /// All of `regions` are durably marked (the write path's fast check).
    pub fn is_durable(&self, regions: Range<u64>) -> bool {
        regions.into_iter().all(|r| self.durable[(r / 64) as usize].load(Ordering::Acquire) & bit(r) != 0)
    }

    /// Asks for `regions` to be marked by the next update.
    pub fn request(&self, regions: Range<u64>) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.extend(regions.filter(|&r| !self.is_durable(r..r + 1)));
    }

    /// The write that makes every pending region durable, if any (callers
    /// serialize prepare/commit). Covers the words from the first to the
    /// last pending region, with all bits that are durable or pending.
    pub fn prepare(&self) -> Option<Update> {
        let regions: Vec<u64> =
            self.pending.lock().unwrap_or_else(PoisonError::into_inner).iter().copied().collect();
        let (first, last) = (*regions.first()? / 64, *regions.last()? / 64);
        let mut words: Vec<u64> =
            (first..=last).map(|w| self.durable[w as usize].load(Ordering::Acquire)).collect();
        for &r in &regions {
            words[(r / 64 - first) as usize] |= bit(r);
        }
        let bytes = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        Some(Update { offset: first * 8, bytes, regions })
    }

    /// Records that `update` is durable.
    pub fn committed(&self, update: &Update) {
        for &r in &update.regions {
            self.durable[(r / 64) as usize].fetch_or(bit(r), Ordering::Release);
        }
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        for r in &update.regions {
            pending.remove(r);
        }
    }

    /// Records that the file has been cleared (all bits zero and durable).
    pub fn cleared(&self) {
        for w in &self.durable {
            w.store(0, Ordering::Release);
        }
    }
}

/// Regions marked in a bitmap file's contents.
pub fn marked_regions(bytes: &[u8], regions: u64) -> Vec<u64> {
    (0..regions).filter(|&r| bytes.get((r / 8) as usize).is_some_and(|b| b & (1 << (r % 8)) != 0)).collect()
}

fn bit(r: u64) -> u64 {
    1 << (r % 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_cover_pending_and_durable_bits() {
        let intent = Intent::new(256 * 200, 256);
        assert_eq!(intent.regions(), 200);
        assert_eq!(intent.span(255, 2), 0..2);
        assert_eq!(intent.span(256, 256), 1..2);
        assert!(!intent.is_durable(0..1));
        intent.request(0..2);
        let up = intent.prepare().unwrap();
        assert_eq!((up.offset, up.bytes.len()), (0, 8));
        assert_eq!(up.bytes[0], 0b11);
        intent.committed(&up);
        assert!(intent.is_durable(0..2));
        assert!(intent.prepare().is_none());
        intent.request(130..131);
        intent.request(1..2); // already durable: ignored
        let up = intent.prepare().unwrap();
        assert_eq!(up.offset, 16);
        assert_eq!(marked_regions(&[vec![0; 16], up.bytes.clone()].concat(), 200), vec![130]);
        intent.committed(&up);
        intent.cleared();
        assert!(!intent.is_durable(0..1));
    }
}
