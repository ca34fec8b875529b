//! Store-level snapshot tests: the pattern test, a property test against an
//! in-memory model, a chain of 1000 snapshots, and kill -9 during a merge.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use jiva_core::{BlockDevice, ExtentState, ZeroFlags};
use jiva_replica::engine::aligned::AlignedBuf;
use jiva_replica::{EngineKind, Store, StoreOptions};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
const BS: u64 = 4096;

async fn open(dir: &Path, size: u64) -> Store {
    Store::open(dir, size, StoreOptions { engine: Some(EngineKind::Uring), ..Default::default() })
        .await
        .unwrap()
}

/// Deterministic test data.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
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

/// Writes `data` at `offset` of both the store and the model.
async fn write(store: &Store, model: &mut [u8], offset: u64, data: Vec<u8>) {
    model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    store.write(offset, Bytes::from(data), false).await.unwrap();
}

async fn check_head(store: &Store, model: &[u8]) {
    let got = store.read(0, model.len()).await.unwrap();
    assert!(got == model, "head differs from the model");
}

async fn check_snapshot(store: &Store, name: &str, model: &[u8]) {
    let got = store.read_snapshot(name, 0, model.len()).await.unwrap();
    assert!(got == model, "snapshot {name} differs from the model");
}

fn names(store: &Store) -> Vec<String> {
    store.snapshots().into_iter().map(|s| s.name).collect()
}

/// Write A, snapshot s1, write B, snapshot s2, write C: head = C over B over
/// A, s1 = A, s2 = B over A; TRIM/WRITE_ZEROES on the head leave the
/// snapshots alone; deleting s1 keeps s2 and the head; revert to s2.
#[tokio::test]
async fn pattern_test() {
    let size = 4 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), size).await;
    let mut model = vec![0u8; size as usize];
    write(&store, &mut model, 0, pattern(1, (2 * MIB) as usize)).await; // A
    let a = model.clone();
    store.create_snapshot("s1", false).await.unwrap();
    write(&store, &mut model, MIB + 100, pattern(2, MIB as usize)).await; // B
    let b = model.clone();
    store.create_snapshot("s2", false).await.unwrap();
    write(&store, &mut model, MIB / 2 + 7, pattern(3, MIB as usize)).await; // C
    check_head(&store, &model).await;
    check_snapshot(&store, "s1", &a).await;
    check_snapshot(&store, "s2", &b).await;

    // TRIM and WRITE_ZEROES touch the head only.
    store.trim(0, MIB, false).await.unwrap();
    store.write_zeroes(3 * MIB, 64 * 1024, ZeroFlags { no_hole: false, fua: false }).await.unwrap();
    model[..MIB as usize].fill(0);
    model[3 * MIB as usize..(3 * MIB + 64 * 1024) as usize].fill(0);
    check_head(&store, &model).await;
    check_snapshot(&store, "s1", &a).await;
    check_snapshot(&store, "s2", &b).await;

    // base:allocation: s1 holds data in its first 2 MiB and nothing above.
    let ext = store.snapshot_block_status("s1", 0, size).await.unwrap();
    assert_eq!(ext.len(), 2);
    assert_eq!((ext[0].state, ext[0].length), (ExtentState::Data, 2 * MIB));
    assert_eq!(ext[1].state, ExtentState::Hole);
    // The trimmed head range hides s1's data: zero, not data.
    let ext = store.block_status(0, MIB).await.unwrap();
    assert!(ext.iter().all(|e| e.state != ExtentState::Data), "{ext:?}");

    let info = store.snapshots();
    assert_eq!(names(&store), ["s1", "s2"]);
    assert_eq!(info[0].allocated_bytes, 2 * MIB);
    assert_eq!(info[1].parent.as_deref(), Some("s1"));
    assert!(!info[0].system);

    store.delete_snapshot("s1").await.unwrap();
    store.wait_merge().await.unwrap();
    assert_eq!(names(&store), ["s2"]);
    assert!(store.read_snapshot("s1", 0, 4096).await.is_err());
    check_snapshot(&store, "s2", &b).await;
    check_head(&store, &model).await;
    // Space is reclaimed: s1's files are gone.
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(files, 4 + 2 * 2, "store files and two layers");

    store.revert_snapshot("s2", 0).await.unwrap();
    check_head(&store, &b).await;
    check_snapshot(&store, "s2", &b).await;
    // Writes after a revert go to the head only.
    let mut head = b.clone();
    write(&store, &mut head, 5, pattern(4, 10_000)).await;
    check_snapshot(&store, "s2", &b).await;

    // Everything survives a reopen (the index is rebuilt from the records).
    store.close().await.unwrap();
    drop(store);
    let store = open(dir.path(), size).await;
    check_head(&store, &head).await;
    check_snapshot(&store, "s2", &b).await;
    assert!(store.create_snapshot("s2", false).await.is_err(), "duplicate names are refused");
    assert!(store.create_snapshot("bad name", false).await.is_err());
    assert!(store.delete_snapshot("nope").await.is_err());
}

/// Reverting to an older snapshot keeps the newer ones intact.
#[tokio::test]
async fn revert_to_an_older_snapshot_keeps_newer_ones() {
    let size = 2 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), size).await;
    let mut model = vec![0u8; size as usize];
    write(&store, &mut model, 4096, pattern(1, 100_000)).await;
    let s1 = model.clone();
    store.create_snapshot("s1", false).await.unwrap();
    write(&store, &mut model, 50_000, pattern(2, 300_000)).await;
    store.trim(0, 8192, false).await.unwrap();
    model[..8192].fill(0);
    let s2 = model.clone();
    store.create_snapshot("s2", false).await.unwrap();
    write(&store, &mut model, 0, pattern(3, 1_000_000)).await;
    store.revert_snapshot("s1", 0).await.unwrap();
    check_head(&store, &s1).await;
    check_snapshot(&store, "s1", &s1).await;
    check_snapshot(&store, "s2", &s2).await;
}

#[derive(Clone, Debug)]
enum Action {
    Write { offset: u64, len: usize, seed: u64 },
    Trim { offset: u64, len: u64 },
    Zero { offset: u64, len: u64, no_hole: bool },
    Snapshot,
    Delete(prop::sample::Index),
    Revert(prop::sample::Index),
    Reopen { clean: bool },
}

const MODEL_SIZE: u64 = 512 * 1024 + 3 * BS;

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..MODEL_SIZE, 0..100_000u64).prop_map(|(offset, len)| (offset, len.min(MODEL_SIZE - offset)))
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (range(), any::<u64>())
            .prop_map(|((offset, len), seed)| Action::Write { offset, len: len as usize, seed }),
        2 => range().prop_map(|(offset, len)| Action::Trim { offset, len }),
        1 => (range(), any::<bool>()).prop_map(|((offset, len), no_hole)| Action::Zero { offset, len, no_hole }),
        3 => Just(Action::Snapshot),
        2 => any::<prop::sample::Index>().prop_map(Action::Delete),
        1 => any::<prop::sample::Index>().prop_map(Action::Revert),
        1 => any::<bool>().prop_map(|clean| Action::Reopen { clean }),
    ]
}

async fn run_against_model(actions: Vec<Action>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), MODEL_SIZE).await;
    let mut head = vec![0u8; MODEL_SIZE as usize];
    // (name, contents), oldest first.
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut next = 0;
    for action in actions {
        match action {
            Action::Write { offset, len, seed } => write(&store, &mut head, offset, pattern(seed, len)).await,
            Action::Trim { offset, len } => {
                head[offset as usize..(offset + len) as usize].fill(0);
                store.trim(offset, len, false).await.unwrap();
            }
            Action::Zero { offset, len, no_hole } => {
                head[offset as usize..(offset + len) as usize].fill(0);
                store.write_zeroes(offset, len, ZeroFlags { no_hole, fua: false }).await.unwrap();
            }
            Action::Snapshot => {
                next += 1;
                let name = format!("s{next}");
                store.create_snapshot(&name, false).await.unwrap();
                snaps.push((name, head.clone()));
            }
            Action::Delete(i) if !snaps.is_empty() => {
                let (name, _) = snaps.remove(i.index(snaps.len()));
                store.delete_snapshot(&name).await.unwrap();
                store.wait_merge().await.unwrap();
            }
            Action::Revert(i) if !snaps.is_empty() => {
                let (name, contents) = &snaps[i.index(snaps.len())];
                store.revert_snapshot(name, 0).await.unwrap();
                head = contents.clone();
            }
            Action::Delete(_) | Action::Revert(_) => {}
            Action::Reopen { clean } => {
                if clean {
                    store.close().await.unwrap();
                }
                drop(store);
                store = open(dir.path(), MODEL_SIZE).await;
            }
        }
        prop_assert!(store.read(0, head.len()).await.unwrap() == head, "head differs");
        // Into memory that held something else (a reused reply buffer):
        // every block is overwritten, the ones no layer holds with zeros.
        for (offset, len) in [(0, head.len()), (5 * BS as usize, 7 * BS as usize), (3, 2 * BS as usize)] {
            let stale = AlignedBuf::copy_of(&vec![0xA5; len]);
            let got = store.read_into(offset as u64, stale).await.unwrap();
            prop_assert!(got[..] == head[offset..offset + len], "read_into of {} at {} differs", len, offset);
        }
        prop_assert_eq!(names(&store), snaps.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>());
        for (name, contents) in &snaps {
            let got = store.read_snapshot(name, 0, contents.len()).await.unwrap();
            prop_assert!(got == *contents, "snapshot {} differs", name);
        }
    }
    // Block status agrees with the contents: no data where the model is zero
    // would be wrong only the other way round (data may read as zeros).
    let ext = store.block_status(0, MODEL_SIZE).await.unwrap();
    let mut at = 0usize;
    for e in ext {
        if e.state != ExtentState::Data {
            prop_assert!(
                head[at..at + e.length as usize].iter().all(|&b| b == 0),
                "non-data extent is not zero"
            );
        }
        at += e.length as usize;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn random_snapshot_ops_match_the_model(actions in proptest::collection::vec(action(), 1..40)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run_against_model(actions))?;
    }
}

/// 1000 snapshots in one chain: each reads back its own write, a reopen
/// (index rebuilt from 1000 sparse records files) is quick, and reads of
/// blocks deep in the chain are correct.
#[tokio::test]
async fn a_thousand_snapshots() {
    let size = 64 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), size).await;
    let blocks = size / BS;
    for i in 0..1000u64 {
        let block = (i * 7919) % blocks;
        store.write(block * BS, Bytes::from(pattern(i, BS as usize)), false).await.unwrap();
        store.create_snapshot(&format!("snap-{i:04}"), i % 10 == 0).await.unwrap();
    }
    assert_eq!(store.snapshots().len(), 1000);
    store.close().await.unwrap();
    drop(store);
    let started = Instant::now();
    let store = open(dir.path(), size).await;
    let open_time = started.elapsed();
    assert!(open_time < Duration::from_secs(20), "opening 1000 layers took {open_time:?}");
    for i in (0..1000u64).step_by(37) {
        let block = (i * 7919) % blocks;
        assert_eq!(&store.read(block * BS, BS as usize).await.unwrap()[..], &pattern(i, BS as usize)[..]);
        let name = format!("snap-{i:04}");
        assert_eq!(
            &store.read_snapshot(&name, block * BS, BS as usize).await.unwrap()[..],
            &pattern(i, BS as usize)[..]
        );
    }
    assert!(store.snapshots()[10].system);
    eprintln!("1000 snapshots: reopen {open_time:?}, index {} bytes", store.index_memory_bytes());
}

const CHILD_ENV: &str = "JIVA_TEST_MERGE_CHILD";
const KILL_SIZE: u64 = 48 * MIB;

/// Helper process of `kill_during_merge` (does nothing unless started by it).
#[tokio::test]
#[ignore = "helper process for kill_during_merge"]
async fn merge_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let (dir, name) = spec.split_once('|').unwrap();
    let store = open(Path::new(dir), KILL_SIZE).await;
    store.delete_snapshot(name).await.unwrap();
    println!("merging");
    store.wait_merge().await.unwrap();
    println!("merged");
    std::future::pending::<()>().await;
}

/// The contents every view must have in `kill_during_merge`: snapshot `k`
/// (0-based) holds the writes of rounds 0..=k; the head all four rounds.
fn kill_model(rounds: usize) -> Vec<u8> {
    let mut m = vec![0u8; KILL_SIZE as usize];
    for r in 0..rounds {
        let step = (r + 1) as u64;
        let mut b = r as u64;
        while b < KILL_SIZE / BS {
            m[(b * BS) as usize..((b + 1) * BS) as usize]
                .copy_from_slice(&pattern(b * 10 + r as u64, BS as usize));
            b += step;
        }
    }
    m
}

/// Deletes snapshots one by one in a child process and SIGKILLs it during
/// the merge; after each restart every remaining snapshot and the head read
/// exactly as before, and the interrupted delete completes.
#[tokio::test]
async fn kill_during_merge() {
    let dir = tempfile::tempdir().unwrap();
    let rounds = 4;
    {
        let store = open(dir.path(), KILL_SIZE).await;
        for r in 0..rounds {
            let step = (r + 1) as u64;
            let mut b = r as u64;
            while b < KILL_SIZE / BS {
                let data = pattern(b * 10 + r as u64, BS as usize);
                store.write(b * BS, Bytes::from(data), false).await.unwrap();
                b += step;
            }
            if r + 1 < rounds {
                store.create_snapshot(&format!("k{r}"), false).await.unwrap();
            }
        }
        store.close().await.unwrap();
    }
    let models: Vec<Vec<u8>> = (1..=rounds).map(kill_model).collect();
    let mut interrupted = 0;
    for (attempt, victim) in ["k0", "k1"].iter().enumerate() {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "merge_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, format!("{}|{victim}", dir.path().display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            let line = lines.next().expect("child ended early").unwrap();
            if line.contains("merging") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(2 + 9 * attempt as u64));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let store = open(dir.path(), KILL_SIZE).await;
        let listed = store.snapshots();
        if listed.iter().any(|s| s.merging) {
            interrupted += 1;
        }
        // Every snapshot still listed (the victim too, until its merge ends) is intact.
        for s in &listed {
            let k: usize = s.name[1..].parse().unwrap();
            check_snapshot(&store, &s.name, &models[k]).await;
        }
        check_head(&store, &models[rounds - 1]).await;
        store.wait_merge().await.unwrap();
        assert!(!names(&store).contains(&victim.to_string()), "the interrupted delete finished");
        for s in store.snapshots() {
            let k: usize = s.name[1..].parse().unwrap();
            check_snapshot(&store, &s.name, &models[k]).await;
        }
        check_head(&store, &models[rounds - 1]).await;
        store.close().await.unwrap();
    }
    assert!(interrupted > 0, "no kill landed inside a merge; the test proved nothing");
}

/// What a rebuild uses: each snapshot's own layer (Data, Zero, Hole), the
/// creation time given by the controller, and dropping the layers above a
/// snapshot (the head too), also across a reopen.
#[tokio::test]
async fn layer_status_and_truncate() {
    let size = 4 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), size).await;
    let mut model = vec![0u8; size as usize];
    write(&store, &mut model, 0, pattern(1, MIB as usize)).await;
    store.create_snapshot_at("s1", false, Some(1234)).await.unwrap();
    let s1 = model.clone();
    write(&store, &mut model, 2 * MIB, pattern(2, MIB as usize)).await;
    // Zeroing s1's data leaves ZERO records in s2's own layer.
    store.trim(0, 64 * 1024, false).await.unwrap();
    store.create_snapshot_at("s2", true, None).await.unwrap();
    write(&store, &mut model, 3 * MIB, pattern(3, MIB as usize)).await;

    let list = store.snapshots();
    assert_eq!((list[0].created_ms, list[1].system), (1234, true));
    assert!(list[1].created_ms > 1234);
    let own = |ext: Vec<jiva_core::Extent>| ext.into_iter().map(|e| (e.length, e.state)).collect::<Vec<_>>();
    assert_eq!(
        own(store.snapshot_layer_status("s1", 0, size).await.unwrap()),
        [(MIB, ExtentState::Data), (3 * MIB, ExtentState::Hole)]
    );
    assert_eq!(
        own(store.snapshot_layer_status("s2", 0, size).await.unwrap()),
        [
            (64 * 1024, ExtentState::Zero),
            (2 * MIB - 64 * 1024, ExtentState::Hole),
            (MIB, ExtentState::Data),
            (MIB, ExtentState::Hole)
        ]
    );
    assert!(store.snapshot_layer_status("nope", 0, size).await.is_err());

    store.truncate_snapshots(Some("s1")).await.unwrap();
    assert_eq!(names(&store), ["s1"]);
    check_head(&store, &s1).await;
    check_snapshot(&store, "s1", &s1).await;
    assert_eq!(store.head_allocated_bytes(), 0, "the new head is empty");
    assert!(store.truncate_snapshots(Some("s2")).await.is_err(), "s2 is gone");
    drop(store);
    let store = open(dir.path(), size).await;
    assert_eq!(names(&store), ["s1"]);
    check_head(&store, &s1).await;
    let files = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("layer-"));
    assert_eq!(files.count(), 4, "two layers (data and records each), the dropped ones deleted");
    store.truncate_snapshots(None).await.unwrap();
    assert!(names(&store).is_empty());
    check_head(&store, &vec![0u8; size as usize]).await;
}
