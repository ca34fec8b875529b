//! Store tests, each run with both I/O engines.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use jiva_core::mem::MemDevice;
use jiva_core::{BlockDevice, ErrorKind, Extent, ExtentState, ZeroFlags};
use jiva_replica::format::{self, BlockRecord};
use jiva_replica::{EngineKind, Store, StoreOptions};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
const BS: u64 = 4096;

async fn open(dir: &Path, size: u64, engine: EngineKind) -> Store {
    let store =
        Store::open(dir, size, StoreOptions { engine: Some(engine), ..Default::default() }).await.unwrap();
    assert_eq!(store.engine(), engine);
    store
}

/// Deterministic test data.
fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn head_file(dir: &Path, records: bool) -> std::fs::File {
    let manifest = format::decode_manifest(&std::fs::read(dir.join(format::MANIFEST_FILE)).unwrap()).unwrap();
    let id = manifest.head();
    let name = if records { format::records_file_name(id) } else { format::data_file_name(id) };
    std::fs::File::options().read(true).write(true).open(dir.join(name)).unwrap()
}

/// Per-block states, with Zero folded into Hole (MemDevice has no Zero).
fn block_states(extents: &[Extent]) -> Vec<ExtentState> {
    let mut out = Vec::new();
    for e in extents {
        assert_eq!(e.length % BS, 0);
        let state = if e.state == ExtentState::Zero { ExtentState::Hole } else { e.state };
        out.extend(std::iter::repeat_n(state, (e.length / BS) as usize));
    }
    out
}

async fn round_trips(engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 64 * MIB, engine).await;
    // Aligned, single block.
    store.write(0, pattern(1, 4096), false).await.unwrap();
    assert_eq!(store.read(0, 4096).await.unwrap(), pattern(1, 4096));
    // Unaligned inside one block, across blocks, with FUA.
    store.write(5000, pattern(2, 100), true).await.unwrap();
    let r = store.read(4096, 8192).await.unwrap();
    assert!(r[..904].iter().all(|&b| b == 0));
    assert_eq!(&r[904..1004], &pattern(2, 100)[..]);
    assert!(r[1004..].iter().all(|&b| b == 0));
    store.write(4000, pattern(3, 20000), false).await.unwrap();
    assert_eq!(store.read(4000, 20000).await.unwrap(), pattern(3, 20000));
    assert_eq!(store.read(0, 4000).await.unwrap(), pattern(1, 4096).slice(..4000));
    // Multi-MiB, aligned and not.
    store.write(8 * MIB, pattern(4, 8 << 20), false).await.unwrap();
    assert_eq!(store.read(8 * MIB, 8 << 20).await.unwrap(), pattern(4, 8 << 20));
    store.write(20 * MIB + 1, pattern(5, (3 << 20) + 7), true).await.unwrap();
    assert_eq!(store.read(20 * MIB + 1, (3 << 20) + 7).await.unwrap(), pattern(5, (3 << 20) + 7));
    assert_eq!(store.read(20 * MIB, 1).await.unwrap()[0], 0);
    // Empty requests and the last byte of the device.
    assert!(store.read(123, 0).await.unwrap().is_empty());
    store.write(64 * MIB - 1, Bytes::from_static(b"z"), false).await.unwrap();
    assert_eq!(&store.read(64 * MIB - 2, 2).await.unwrap()[..], b"\0z");
    store.flush().await.unwrap();
}

async fn persists_across_close_and_unclean_drop(engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 16 * MIB, engine).await;
    assert!(store.identity().clean_open, "a new store counts as cleanly closed");
    store.write(12345, pattern(1, 50000), false).await.unwrap();
    store.close().await.unwrap();
    drop(store);

    let store = open(dir.path(), 16 * MIB, engine).await;
    assert!(store.identity().clean_open);
    assert_eq!(store.read(12345, 50000).await.unwrap(), pattern(1, 50000));
    store.write(3 * MIB, pattern(2, 4096), false).await.unwrap();
    drop(store); // no close: unclean

    let store = open(dir.path(), 16 * MIB, engine).await;
    assert!(!store.identity().clean_open);
    assert_eq!(store.read(3 * MIB, 4096).await.unwrap(), pattern(2, 4096));
    assert_eq!(store.read(12345, 50000).await.unwrap(), pattern(1, 50000));
    // Closed, then written again: unclean once more.
    store.close().await.unwrap();
    store.write(0, pattern(3, 4096), false).await.unwrap();
    drop(store);
    let store = open(dir.path(), 16 * MIB, engine).await;
    assert!(!store.identity().clean_open);
    assert_eq!(store.read(0, 4096).await.unwrap(), pattern(3, 4096));
}

async fn size_mismatch_and_double_open_are_refused(engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4 * MIB, engine).await;
    let opts = || StoreOptions { engine: Some(engine), ..Default::default() };
    let err = Store::open(dir.path(), 4 * MIB, opts()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    drop(store);
    let err = Store::open(dir.path(), 8 * MIB, opts()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    let err = Store::open(dir.path(), 4 * MIB + 1, opts()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    Store::open(dir.path(), 4 * MIB, opts()).await.unwrap();
}

async fn damaged_or_newer_manifest_is_refused(engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path(), 4 * MIB, engine).await.close().await.unwrap();
    let path = dir.path().join(format::MANIFEST_FILE);
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    bad[40] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let err = Store::open(dir.path(), 4 * MIB, StoreOptions { engine: Some(engine), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    let mut newer = good.clone();
    newer[8] = 9;
    std::fs::write(&path, &newer).unwrap();
    let err = Store::open(dir.path(), 4 * MIB, StoreOptions { engine: Some(engine), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("version 9"), "{err}");
    std::fs::write(&path, &good).unwrap();
    open(dir.path(), 4 * MIB, engine).await;
}

async fn attach_binds_name_and_fences_old_epochs(engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4 * MIB, engine).await;
    let id = store.identity();
    assert_eq!((id.volume, id.size, id.epoch), (None, 4 * MIB, 0));
    store.attach("vol-a", 3).await.unwrap();
    store.attach("vol-a", 3).await.unwrap();
    assert_eq!(store.attach("vol-a", 2).await.unwrap_err().kind(), ErrorKind::Fenced);
    assert_eq!(store.attach("vol-b", 9).await.unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(store.attach("", 9).await.unwrap_err().kind(), ErrorKind::InvalidArgument);
    store.attach("vol-a", 7).await.unwrap();
    drop(store); // durable without close
    let store = open(dir.path(), 4 * MIB, engine).await;
    let id = store.identity();
    assert_eq!((id.volume.as_deref(), id.epoch), (Some("vol-a"), 7));
    assert_eq!(store.attach("vol-a", 6).await.unwrap_err().kind(), ErrorKind::Fenced);
    assert_eq!(store.attach("vol-b", 8).await.unwrap_err().kind(), ErrorKind::InvalidArgument);
}

async fn flipped_byte_is_reported_corrupt(engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4 * MIB, engine).await;
    store.write(0, pattern(1, 3 * 4096), false).await.unwrap();
    store.close().await.unwrap();
    drop(store);
    let data = head_file(dir.path(), false);
    let mut byte = [0u8];
    data.read_exact_at(&mut byte, 4096 + 77).unwrap();
    data.write_all_at(&[byte[0] ^ 0x20], 4096 + 77).unwrap();

    let store = open(dir.path(), 4 * MIB, engine).await;
    let err = store.read(4096, 4096).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert_eq!(err.offset(), Some(4096));
    let err = store.read(100, 8000).await.unwrap_err();
    assert_eq!((err.kind(), err.offset()), (ErrorKind::Corrupt, Some(4096)));
    assert_eq!(store.read(0, 4096).await.unwrap(), pattern(1, 4096 * 3).slice(..4096));
    assert_eq!(store.read(8192, 4096).await.unwrap(), pattern(1, 4096 * 3).slice(8192..));
    // A partial write cannot merge into a corrupt block; a whole one repairs it.
    assert_eq!(store.write(4100, pattern(2, 10), false).await.unwrap_err().kind(), ErrorKind::Corrupt);
    store.write(4096, pattern(3, 4096), false).await.unwrap();
    assert_eq!(store.read(4096, 4096).await.unwrap(), pattern(3, 4096));
}

async fn torn_writes_are_recovered_only_in_marked_regions(engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 8 * MIB, engine).await;
    store.write(5 * BS, pattern(1, 4096), false).await.unwrap(); // marks region 0
    drop(store); // crash

    let (data, records) = (head_file(dir.path(), false), head_file(dir.path(), true));
    // Torn inside region 0: new data reached the disk, its record did not.
    data.write_all_at(&pattern(2, 4096), 5 * BS).unwrap();
    // Torn inside region 0: a record for a block whose data never arrived.
    let mut rec = [0u8; 16];
    format::encode_record(&BlockRecord::data(0xdead_beef), &mut rec);
    records.write_all_at(&rec, 9 * 16).unwrap();
    // Torn inside region 0: data for a new block, no record: still a hole.
    data.write_all_at(&pattern(5, 4096), 12 * BS).unwrap();
    // The same damage in region 3, which no write marked.
    let block = 3 * 256 + 4;
    data.write_all_at(&pattern(3, 4096), block * BS).unwrap();
    format::encode_record(&BlockRecord::data(crc32c::crc32c(&pattern(4, 4096))), &mut rec);
    records.write_all_at(&rec, block * 16).unwrap();
    drop((data, records));

    let store = open(dir.path(), 8 * MIB, engine).await;
    assert!(!store.identity().clean_open);
    assert_eq!(store.read(5 * BS, 4096).await.unwrap(), pattern(2, 4096));
    assert_eq!(store.read(9 * BS, 4096).await.unwrap(), vec![0u8; 4096]);
    assert_eq!(store.read(12 * BS, 4096).await.unwrap(), vec![0u8; 4096]);
    let err = store.read(block * BS, 4096).await.unwrap_err();
    assert_eq!((err.kind(), err.offset()), (ErrorKind::Corrupt, Some(block * BS)));
    // Recovery cleared the bitmap: later damage in region 0 is caught.
    store.close().await.unwrap();
    drop(store);
    let intent = std::fs::read(dir.path().join(format::INTENT_FILE)).unwrap();
    assert!(intent.iter().all(|&b| b == 0));
    head_file(dir.path(), false).write_all_at(&[1], 5 * BS).unwrap();
    let store = open(dir.path(), 8 * MIB, engine).await;
    assert_eq!(store.read(5 * BS, 1).await.unwrap_err().kind(), ErrorKind::Corrupt);
}

async fn trim_releases_space(engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 16 * MIB, engine).await;
    store.write(0, pattern(1, 8 << 20), false).await.unwrap();
    store.flush().await.unwrap();
    let data = head_file(dir.path(), false);
    let records = head_file(dir.path(), true);
    let (data_before, rec_before) = (data.metadata().unwrap().blocks(), records.metadata().unwrap().blocks());
    assert!(data_before >= 8 * MIB / 512, "{data_before}");
    // Unaligned: partial edge blocks are zeroed in place.
    store.trim(100, 8 * MIB - 200, true).await.unwrap();
    let r = store.read(0, 8 << 20).await.unwrap();
    assert_eq!(&r[..100], &pattern(1, 100)[..]);
    assert!(r[100..(8 << 20) - 100].iter().all(|&b| b == 0));
    assert_eq!(&r[(8 << 20) - 100..], &pattern(1, 8 << 20)[(8 << 20) - 100..]);
    let (data_after, rec_after) = (data.metadata().unwrap().blocks(), records.metadata().unwrap().blocks());
    assert!(data_after <= 2 * 4096 / 512 + 16, "data file still holds {data_after} sectors");
    assert!(rec_after < rec_before, "records {rec_before} -> {rec_after}");
    assert_eq!(
        store.block_status(0, 16 * MIB).await.unwrap(),
        vec![
            Extent { length: BS, state: ExtentState::Data },
            Extent { length: 8 * MIB - 2 * BS, state: ExtentState::Hole },
            Extent { length: BS, state: ExtentState::Data },
            Extent { length: 8 * MIB, state: ExtentState::Hole },
        ]
    );
    // Trimmed space reads as zeros across a reopen too.
    drop(store);
    let store = open(dir.path(), 16 * MIB, engine).await;
    assert!(store.read(BS, 4096).await.unwrap().iter().all(|&b| b == 0));
}

async fn write_zeroes_with_and_without_holes(engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 8 * MIB, engine).await;
    store.write(0, pattern(1, 4 << 20), false).await.unwrap();
    store.flush().await.unwrap();
    let data = head_file(dir.path(), false);
    let before = data.metadata().unwrap().blocks();

    let keep = ZeroFlags { no_hole: true, fua: true };
    store.write_zeroes(MIB, MIB, keep).await.unwrap();
    assert!(store.read(MIB, 1 << 20).await.unwrap().iter().all(|&b| b == 0));
    assert!(data.metadata().unwrap().blocks() >= before, "no_hole must keep the space");
    store.write_zeroes(3 * MIB, MIB, ZeroFlags::default()).await.unwrap();
    assert!(store.read(3 * MIB, 1 << 20).await.unwrap().iter().all(|&b| b == 0));
    assert!(data.metadata().unwrap().blocks() < before);
    // Unaligned: the edges keep their other bytes.
    store.write_zeroes(10, 20, keep).await.unwrap();
    let r = store.read(0, 40).await.unwrap();
    assert_eq!(&r[..10], &pattern(1, 10)[..]);
    assert!(r[10..30].iter().all(|&b| b == 0));
    assert_eq!(&r[30..], &pattern(1, 40)[30..]);
    // A zeroed block takes a later partial write.
    store.write(MIB + 1, Bytes::from_static(b"ab"), false).await.unwrap();
    assert_eq!(&store.read(MIB, 4).await.unwrap()[..], b"\0ab\0");

    assert_eq!(
        store.block_status(0, 8 * MIB).await.unwrap(),
        vec![
            Extent { length: MIB + BS, state: ExtentState::Data },
            Extent { length: MIB - BS, state: ExtentState::Zero },
            Extent { length: MIB, state: ExtentState::Data },
            Extent { length: 5 * MIB, state: ExtentState::Hole },
        ]
    );
    drop(store);
    let store = open(dir.path(), 8 * MIB, engine).await;
    assert!(store.read(MIB + BS, 8192).await.unwrap().iter().all(|&b| b == 0));
}

async fn block_status_runs(engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4 * MIB, engine).await;
    assert_eq!(
        store.block_status(0, 4 * MIB).await.unwrap(),
        vec![Extent { length: 4 * MIB, state: ExtentState::Hole }]
    );
    store.write(8192, pattern(1, 8192), false).await.unwrap();
    store.write(5 * BS + 1, pattern(2, 1), false).await.unwrap();
    // Unaligned query: extents start and end at the requested bytes.
    assert_eq!(
        store.block_status(100, 7 * BS).await.unwrap(),
        vec![
            Extent { length: 2 * BS - 100, state: ExtentState::Hole },
            Extent { length: 2 * BS, state: ExtentState::Data },
            Extent { length: BS, state: ExtentState::Hole },
            Extent { length: BS, state: ExtentState::Data },
            Extent { length: BS + 100, state: ExtentState::Hole },
        ]
    );
    assert!(store.block_status(7, 0).await.unwrap().is_empty());
}

/// A snapshot stacks a second layer: reads, partial writes, trims and block
/// status walk the chain (after a reopen, which rebuilds the layer index).
async fn reads_walk_the_layer_chain(engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4 * MIB, engine).await;
    store.write(0, pattern(1, 64 * 1024), false).await.unwrap();
    store.write_zeroes(64 * 1024, 8192, ZeroFlags { no_hole: true, fua: false }).await.unwrap();
    store.create_snapshot("base", false).await.unwrap();
    store.close().await.unwrap();
    drop(store);
    let path = dir.path().join(format::MANIFEST_FILE);
    let manifest = format::decode_manifest(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(manifest.layers.len(), 2);

    let store = open(dir.path(), 4 * MIB, engine).await;
    let parent = pattern(1, 64 * 1024);
    assert_eq!(store.read(0, 64 * 1024).await.unwrap(), parent);
    store.write(100, pattern(2, 10), false).await.unwrap(); // copy-on-write of block 0
    store.trim(BS, 2 * BS, false).await.unwrap(); // must hide the parent's blocks 1-2
    let r = store.read(0, 4 * 4096).await.unwrap();
    assert_eq!(&r[..100], &parent[..100]);
    assert_eq!(&r[100..110], &pattern(2, 10)[..]);
    assert_eq!(&r[110..4096], &parent[110..4096]);
    assert!(r[4096..3 * 4096].iter().all(|&b| b == 0));
    assert_eq!(&r[3 * 4096..], &parent[3 * 4096..4 * 4096]);
    assert_eq!(
        store.block_status(0, 80 * 1024).await.unwrap(),
        vec![
            Extent { length: BS, state: ExtentState::Data },
            Extent { length: 2 * BS, state: ExtentState::Zero },
            Extent { length: 13 * BS, state: ExtentState::Data },
            Extent { length: 2 * BS, state: ExtentState::Zero },
            Extent { length: 2 * BS, state: ExtentState::Hole },
        ]
    );
    // The parent layer itself is untouched.
    let records = std::fs::read(dir.path().join(format::records_file_name(manifest.layers[0]))).unwrap();
    let rec = format::decode_record(&records[16..32]).unwrap();
    assert!(rec.is_allocated() && !rec.is_zero());
}

/// Tasks own interleaved, unaligned stripes that share blocks, so every
/// block sees concurrent partial writes; readers run alongside.
async fn concurrent_partial_writes_stay_consistent(engine: EngineKind) {
    const TASKS: u64 = 24;
    const STRIPE: u64 = 1500;
    const WRITES: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path(), 4 * MIB, engine).await);
    let base = 777;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (store, done) = (store.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                store.read(0, (base + TASKS * STRIPE) as usize + 4096).await.unwrap();
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut writers = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut model = vec![0u8; STRIPE as usize];
            for i in 0..WRITES {
                let r = pattern(t * 1000 + i, 2);
                let (a, b) = (u64::from(r[0]) * STRIPE / 256, u64::from(r[1]) * STRIPE / 256);
                let (start, end) = (a.min(b), a.max(b) + 1);
                let data = pattern(t * 7919 + i, (end - start) as usize);
                model[start as usize..end as usize].copy_from_slice(&data);
                store.write(base + t * STRIPE + start, data, i % 5 == 0).await.unwrap();
            }
            model
        }));
    }
    let mut expected = vec![0u8; base as usize];
    for w in writers {
        expected.extend(w.await.unwrap());
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    assert_eq!(&store.read(0, expected.len()).await.unwrap()[..], &expected[..]);
}

/// Overlapping writes of uniform values: the result must be one of the
/// writes' values per byte, never torn within a block's checksum.
async fn concurrent_overlapping_writes_never_corrupt(engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path(), 4 * MIB, engine).await);
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..30u64 {
                let r = pattern(t * 31 + i, 3);
                let start = u64::from(r[0]) * 97;
                let len = 1 + u64::from(r[1]) * 61;
                let value = 1 + (t as u8);
                match r[2] % 3 {
                    0 => store.trim(start, len, false).await.unwrap(),
                    _ => store.write(start, Bytes::from(vec![value; len as usize]), false).await.unwrap(),
                }
                store.read(start, len as usize).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let all = store.read(0, 64 * 1024).await.unwrap();
    assert!(all.iter().all(|&b| b <= 16));
}

async fn abandoned_write_still_completes(engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4 * MIB, engine).await;
    let fut = store.write(3, pattern(1, 2 << 20), false);
    let _ = tokio::time::timeout(Duration::ZERO, fut).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if store.read(3, 2 << 20).await.unwrap() == pattern(1, 2 << 20) {
            break;
        }
        assert!(Instant::now() < deadline, "abandoned write never landed");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::EngineKind::Uring).await
                }
            )*
        }
        mod sync {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::EngineKind::Sync).await
                }
            )*
        }
    };
}

both_engines!(
    round_trips,
    persists_across_close_and_unclean_drop,
    size_mismatch_and_double_open_are_refused,
    damaged_or_newer_manifest_is_refused,
    attach_binds_name_and_fences_old_epochs,
    flipped_byte_is_reported_corrupt,
    torn_writes_are_recovered_only_in_marked_regions,
    trim_releases_space,
    write_zeroes_with_and_without_holes,
    block_status_runs,
    reads_walk_the_layer_chain,
    concurrent_partial_writes_stay_consistent,
    concurrent_overlapping_writes_never_corrupt,
    abandoned_write_still_completes,
);

#[tokio::test]
async fn default_engine_is_uring_here() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 4 * MIB, StoreOptions::default()).await.unwrap();
    assert_eq!(store.engine(), EngineKind::Uring);
    assert_eq!("uring".parse::<EngineKind>().unwrap(), EngineKind::Uring);
    assert_eq!("sync".parse::<EngineKind>().unwrap(), EngineKind::Sync);
    assert_eq!(EngineKind::Sync.to_string(), "sync");
    assert_eq!("aio".parse::<EngineKind>().unwrap_err().kind(), ErrorKind::InvalidArgument);
}

#[derive(Clone, Debug)]
enum Action {
    Write { offset: u64, len: usize, seed: u64, fua: bool },
    Read { offset: u64, len: usize },
    Trim { offset: u64, len: u64 },
    Zero { offset: u64, len: u64, no_hole: bool },
    Flush,
    Reopen { clean: bool },
}

const MODEL_SIZE: u64 = 2 * MIB + 3 * BS;

fn range() -> impl Strategy<Value = (u64, u64)> {
    // Mostly near the region boundary at 1 MiB, so requests overlap.
    let hot = (MIB - 64 * 1024..MIB + 64 * 1024, 0..40_000u64);
    let any = (0..MODEL_SIZE, 0..300_000u64);
    prop_oneof![3 => hot, 1 => any]
        .prop_map(|(offset, len): (u64, u64)| (offset, len.min(MODEL_SIZE - offset)))
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (range(), any::<u64>(), any::<bool>())
            .prop_map(|((offset, len), seed, fua)| Action::Write { offset, len: len as usize, seed, fua }),
        3 => range().prop_map(|(offset, len)| Action::Read { offset, len: len as usize }),
        2 => range().prop_map(|(offset, len)| Action::Trim { offset, len }),
        2 => (range(), any::<bool>()).prop_map(|((offset, len), no_hole)| Action::Zero { offset, len, no_hole }),
        1 => Just(Action::Flush),
        1 => any::<bool>().prop_map(|clean| Action::Reopen { clean }),
    ]
}

async fn run_against_model(engine: EngineKind, actions: Vec<Action>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let model = MemDevice::new(MODEL_SIZE);
    let mut store = open(dir.path(), MODEL_SIZE, engine).await;
    for action in actions {
        match action {
            Action::Write { offset, len, seed, fua } => {
                let data = pattern(seed, len);
                model.write(offset, data.clone(), fua).await.unwrap();
                store.write(offset, data, fua).await.unwrap();
            }
            Action::Read { offset, len } => {
                prop_assert_eq!(
                    store.read(offset, len).await.unwrap(),
                    model.read(offset, len).await.unwrap()
                );
            }
            Action::Trim { offset, len } => {
                model.trim(offset, len, false).await.unwrap();
                store.trim(offset, len, false).await.unwrap();
            }
            Action::Zero { offset, len, no_hole } => {
                let flags = ZeroFlags { no_hole, fua: false };
                model.write_zeroes(offset, len, flags).await.unwrap();
                store.write_zeroes(offset, len, flags).await.unwrap();
            }
            Action::Flush => store.flush().await.unwrap(),
            Action::Reopen { clean } => {
                if clean {
                    store.close().await.unwrap();
                }
                drop(store);
                store = open(dir.path(), MODEL_SIZE, engine).await;
                prop_assert_eq!(store.identity().clean_open, clean);
            }
        }
    }
    let len = MODEL_SIZE as usize;
    prop_assert!(store.read(0, len).await.unwrap() == model.read(0, len).await.unwrap());
    let ours = block_states(&store.block_status(0, MODEL_SIZE).await.unwrap());
    let theirs = block_states(&model.block_status(0, MODEL_SIZE).await.unwrap());
    prop_assert_eq!(ours, theirs);
    Ok(())
}

fn check_model(engine: EngineKind, actions: Vec<Action>) -> Result<(), TestCaseError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run_against_model(engine, actions))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_ops_match_the_model_uring(actions in proptest::collection::vec(action(), 1..40)) {
        check_model(EngineKind::Uring, actions)?;
    }

    #[test]
    fn random_ops_match_the_model_sync(actions in proptest::collection::vec(action(), 1..40)) {
        check_model(EngineKind::Sync, actions)?;
    }
}

/// Single-task queue-depth-1 4 KiB rates; run with
/// `cargo test --release -p jiva-replica --test store -- --ignored --nocapture rates`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn rates() {
    // On a worker thread, like the server's connection tasks.
    tokio::spawn(measure_rates()).await.unwrap();
}

async fn measure_rates() {
    for engine in [EngineKind::Uring, EngineKind::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 256 * MIB, engine).await;
        let n = 20_000u64;
        let block = pattern(1, 4096);
        let t = Instant::now();
        for i in 0..n {
            store.write((i * 7919 % 65536) * BS, block.clone(), false).await.unwrap();
        }
        let w = n as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..n {
            store.write((i * 7919 % 65536) * BS, block.clone(), false).await.unwrap();
        }
        let o = n as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..n {
            store.read((i * 7919 % 65536) * BS, 4096).await.unwrap();
        }
        let r = n as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..500 {
            store.write(i * BS, block.clone(), true).await.unwrap();
        }
        let f = 500.0 / t.elapsed().as_secs_f64();
        println!("{engine}: 4k write {w:.0}/s (overwrite {o:.0}/s), read {r:.0}/s, FUA write {f:.0}/s");
    }
}

/// O_DIRECT data files: round trip with unaligned edges, trim, reopen, and a
/// flipped byte still caught.
#[tokio::test]
async fn direct_io_round_trip_and_corruption() {
    for engine in [EngineKind::Uring, EngineKind::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let opts = || StoreOptions { engine: Some(engine), direct_io: true };
        let store = Store::open(dir.path(), 4 * MIB, opts()).await.unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        store.write(1000, Bytes::from(data.clone()), false).await.unwrap();
        store.write(4096 * 10, Bytes::from(vec![9u8; 8192]), true).await.unwrap();
        store.trim(4096 * 11, 4096, false).await.unwrap();
        assert_eq!(&store.read(1000, data.len()).await.unwrap()[..], &data[..]);
        store.close().await.unwrap();
        drop(store);
        let store = Store::open(dir.path(), 4 * MIB, opts()).await.unwrap();
        assert_eq!(&store.read(1000, data.len()).await.unwrap()[..], &data[..]);
        assert!(store.read(4096 * 10, 4096).await.unwrap().iter().all(|&b| b == 9));
        assert!(store.read(4096 * 11, 4096).await.unwrap().iter().all(|&b| b == 0));
        drop(store);
        let f = std::fs::OpenOptions::new().write(true).open(dir.path().join("layer-000001.data")).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xEE], 4096 * 10 + 5).unwrap();
        let store = Store::open(dir.path(), 4 * MIB, opts()).await.unwrap();
        let e = store.read(4096 * 10, 4096).await.unwrap_err();
        assert_eq!(e.kind(), jiva_core::ErrorKind::Corrupt, "{engine}: {e}");
    }
}

/// Rebuild copies: the payload crc is checked (nothing written on a
/// mismatch), large copies bypass the page cache, and the buffered and
/// O_DIRECT views of a data file stay coherent in both directions.
#[tokio::test]
async fn copies_are_crc_checked_and_coherent_with_buffered_io() {
    for engine in [EngineKind::Uring, EngineKind::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 16 * MIB, engine).await;
        let big = pattern(7, 4 * MIB as usize);
        let crc = crc32c::crc32c(&big);
        let err = store.write_copy(0, big.clone(), 1, crc ^ 1).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{engine}: {err}");
        assert!(store.read(0, 4 * MIB as usize).await.unwrap().iter().all(|&b| b == 0), "nothing written");
        // A buffered write first, then a bulk copy over it, then a buffered
        // partial overwrite: every read sees the newest bytes.
        store.write(MIB, pattern(8, 8192), false).await.unwrap();
        store.write_copy(0, big.clone(), 1, crc).await.unwrap();
        assert_eq!(store.read(0, 4 * MIB as usize).await.unwrap(), big);
        store.write(MIB + 100, pattern(9, 300), false).await.unwrap();
        let mut want = big.to_vec();
        want[MIB as usize + 100..MIB as usize + 400].copy_from_slice(&pattern(9, 300));
        assert_eq!(&store.read(0, 4 * MIB as usize).await.unwrap()[..], &want[..]);
        // Unaligned and small copies take the checked path too.
        let small = pattern(10, 5000);
        let err = store.write_copy(8 * MIB + 3, small.clone(), 1, 0).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        store.write_copy(8 * MIB + 3, small.clone(), 1, crc32c::crc32c(&small)).await.unwrap();
        assert_eq!(store.read(8 * MIB + 3, 5000).await.unwrap(), small);
        // Large reads of data the page cache does not hold (after reopen
        // and a cache drop of the file) still return the same bytes.
        store.close().await.unwrap();
        drop(store);
        let data = head_file(dir.path(), false);
        // SAFETY: advisory call on a descriptor we own.
        unsafe {
            libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&data), 0, 0, libc::POSIX_FADV_DONTNEED)
        };
        let store = open(dir.path(), 16 * MIB, engine).await;
        assert_eq!(&store.read(0, 4 * MIB as usize).await.unwrap()[..], &want[..]);
        assert_eq!(store.read(8 * MIB + 3, 5000).await.unwrap(), small);
    }
}
