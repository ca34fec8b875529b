//! The in-RAM layer index: which blocks a layer holds a record for.
//!
//! One compressed bitmap (roaring) per layer, so a read finds the topmost
//! layer holding each block without touching any records file, and a chain
//! of 100 snapshots costs a read the same I/O as a chain of one. Roaring
//! keeps each 2^16-block chunk as a sorted array (sparse), a plain bitmap
//! (1 bit per block: the worst case) or a list of runs (sequentially written
//! data: a few bytes per run), whichever is smallest.
//!
//! Block numbers are u64; roaring bitmaps hold u32, so the index is a list
//! of bitmaps of 2^32 blocks (16 TiB) each — one for any usual volume.

use std::ops::Range;

use roaring::RoaringBitmap;

/// Blocks per segment bitmap.
const SEGMENT: u64 = 1 << 32;

/// A set of block numbers (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockIndex {
    segments: Vec<RoaringBitmap>,
}

/// Splits `a..b` into (segment, low range) pieces.
fn pieces(a: u64, b: u64) -> impl Iterator<Item = (usize, Range<u64>)> {
    let mut at = a;
    std::iter::from_fn(move || {
        if at >= b {
            return None;
        }
        let seg = at / SEGMENT;
        let end = b.min((seg + 1) * SEGMENT);
        let piece = (seg as usize, at - seg * SEGMENT..end - seg * SEGMENT);
        at = end;
        Some(piece)
    })
}

impl BlockIndex {
    pub fn new() -> BlockIndex {
        BlockIndex::default()
    }

    pub fn contains(&self, block: u64) -> bool {
        self.segments.get((block / SEGMENT) as usize).is_some_and(|s| s.contains((block % SEGMENT) as u32))
    }

    /// Adds blocks `a..b`.
    pub fn insert_range(&mut self, a: u64, b: u64) {
        for (seg, r) in pieces(a, b) {
            if self.segments.len() <= seg {
                self.segments.resize_with(seg + 1, RoaringBitmap::new);
            }
            self.segments[seg].insert_range(r.start as u32..=(r.end - 1) as u32);
        }
    }

    /// Removes blocks `a..b`.
    pub fn remove_range(&mut self, a: u64, b: u64) {
        for (seg, r) in pieces(a, b) {
            if let Some(s) = self.segments.get_mut(seg) {
                s.remove_range(r.start as u32..=(r.end - 1) as u32);
            }
        }
    }

    /// Number of blocks in the set.
    pub fn len(&self) -> u64 {
        self.segments.iter().map(RoaringBitmap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.iter().all(RoaringBitmap::is_empty)
    }

    /// Whether any block of `a..b` is in the set.
    pub fn any_in(&self, a: u64, b: u64) -> bool {
        pieces(a, b).any(|(seg, r)| {
            self.segments
                .get(seg)
                .is_some_and(|s| s.range_cardinality(r.start as u32..=(r.end - 1) as u32) > 0)
        })
    }

    /// The runs of consecutive blocks of the set inside `a..b`, in order.
    pub fn runs_in(&self, a: u64, b: u64) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for (seg, r) in pieces(a, b) {
            let Some(s) = self.segments.get(seg) else { continue };
            let base = seg as u64 * SEGMENT;
            let mut it = s.range(r.start as u32..=(r.end - 1) as u32);
            while let Some(run) = it.next_range() {
                let (lo, hi) = (base + u64::from(*run.start()), base + u64::from(*run.end()) + 1);
                match out.last_mut() {
                    Some(last) if last.end == lo => last.end = hi,
                    _ => out.push(lo..hi),
                }
            }
        }
        out
    }

    /// Heap bytes used by the bitmaps (their serialized size, a close
    /// estimate of the in-memory one).
    pub fn memory_bytes(&self) -> usize {
        self.segments.iter().map(RoaringBitmap::serialized_size).sum()
    }

    /// Compacts sequential data into runs (after a bulk build).
    pub fn optimize(&mut self) {
        for s in &mut self.segments {
            s.optimize();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn behaves_like_a_set(ops in proptest::collection::vec((any::<bool>(), 0u64..5000, 0u64..300), 0..40),
                              probe in (0u64..5400, 0u64..400)) {
            let mut index = BlockIndex::new();
            let mut model = BTreeSet::new();
            for (insert, a, n) in ops {
                if insert {
                    index.insert_range(a, a + n);
                    model.extend(a..a + n);
                } else {
                    index.remove_range(a, a + n);
                    for b in a..a + n {
                        model.remove(&b);
                    }
                }
            }
            prop_assert_eq!(index.len(), model.len() as u64);
            let (a, n) = probe;
            let runs: Vec<u64> = index.runs_in(a, a + n).into_iter().flatten().collect();
            let expect: Vec<u64> = model.range(a..a + n).copied().collect();
            prop_assert_eq!(index.any_in(a, a + n), !expect.is_empty());
            prop_assert_eq!(runs, expect);
            for b in a..a + n {
                prop_assert_eq!(index.contains(b), model.contains(&b));
            }
        }
    }

    #[test]
    fn spans_segments() {
        let mut index = BlockIndex::new();
        index.insert_range(SEGMENT - 2, SEGMENT + 3);
        assert_eq!(index.runs_in(0, 2 * SEGMENT), vec![SEGMENT - 2..SEGMENT + 3]);
        assert!(index.contains(SEGMENT) && !index.contains(SEGMENT + 3));
        index.remove_range(SEGMENT - 1, SEGMENT + 1);
        assert_eq!(index.runs_in(0, 2 * SEGMENT), vec![SEGMENT - 2..SEGMENT - 1, SEGMENT + 1..SEGMENT + 3]);
        assert_eq!(index.len(), 3);
    }

    #[test]
    fn sequential_data_is_cheap() {
        // 1 TiB of sequentially written 4 KiB blocks: a few runs, not 32 MiB.
        let mut index = BlockIndex::new();
        index.insert_range(0, 1 << 28);
        index.optimize();
        assert!(index.memory_bytes() < 64 * 1024, "{} bytes", index.memory_bytes());
        // Worst case (every other block): at most one bit per block.
        let mut sparse = BlockIndex::new();
        for b in (0..1u64 << 20).step_by(2) {
            sparse.insert_range(b, b + 1);
        }
        sparse.optimize();
        assert!(sparse.memory_bytes() <= (1 << 20) / 8 + 4096, "{} bytes", sparse.memory_bytes());
    }
}
