//! Short-circuit reads (`jiva_core::local`): a controller on the same
//! machine reads the replica's head files itself, gets the same bytes the
//! replica would send, and stops the moment the files could be stale.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use jiva_core::remote::{self, RemoteConnector, RemoteOptions, RemoteReplica};
use jiva_core::replica::Replica;
use jiva_core::shm::ShmPool;
use jiva_core::volume::{Volume, VolumeOptions};
use jiva_core::{BlockDevice, ErrorKind, ZeroFlags};
use jiva_replica::server::{Faults, ReplicaServer};
use jiva_replica::{Store, StoreOptions};

const SIZE: u64 = 16 << 20;

struct Running {
    addr: String,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(faults: Faults) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), SIZE, StoreOptions::default()).await.unwrap();
    let server = Arc::new(ReplicaServer::new(Arc::new(store)).with_faults(faults));
    let path = dir.path().join("replica.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve_unix(listener, async move {
        let _ = rx.await;
    }));
    Running { addr: format!("{}{}", remote::UNIX_PREFIX, path.display()), _dir: dir, _stop: tx }
}

async fn connect(r: &Running, epoch: u64, opts: RemoteOptions) -> RemoteReplica {
    let pool = ShmPool::new(4 << 20).unwrap();
    RemoteReplica::connect_shared(&r.addr, "vol", SIZE, epoch, opts, Some(pool)).await.unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i / 7) as u8 ^ seed).collect()
}

/// Reads `len` at `offset` and checks both the bytes and that the read was
/// served from the files (`local`) or not.
async fn expect_read(rep: &RemoteReplica, offset: u64, want: &[u8], local: bool) {
    let before = rep.local_reads();
    let got = rep.read(offset, want.len()).await.unwrap();
    assert!(got[..] == want[..], "wrong data at {offset}");
    assert_eq!(rep.local_reads() > before, local, "read at {offset}: served locally?");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_come_from_the_head_files_with_the_replicas_answers() {
    let r = start(Faults::default()).await;
    let rep = connect(&r, 1, RemoteOptions::default()).await;
    assert!(rep.reads_locally());

    rep.write(0, Bytes::from(pattern(1, 65536)), false).await.unwrap();
    rep.write(1 << 20, Bytes::from(pattern(2, 4096)), false).await.unwrap();
    // Blocks allocated as zeros, and trimmed ones, read as zeros.
    rep.write(2 << 20, Bytes::from(pattern(3, 8192)), false).await.unwrap();
    rep.write_zeroes(2 << 20, 4096, ZeroFlags::default()).await.unwrap();
    rep.write(3 << 20, Bytes::from(pattern(4, 8192)), false).await.unwrap();
    rep.trim(3 << 20, 4096, false).await.unwrap();

    expect_read(&rep, 0, &pattern(1, 65536), true).await;
    expect_read(&rep, 8192, &pattern(1, 65536)[8192..16384], true).await;
    expect_read(&rep, 1 << 20, &pattern(2, 4096), true).await;
    let mut zeroed = pattern(3, 8192);
    zeroed[..4096].fill(0);
    expect_read(&rep, 2 << 20, &zeroed, true).await;
    let mut trimmed = pattern(4, 8192);
    trimmed[..4096].fill(0);
    expect_read(&rep, 3 << 20, &trimmed, true).await;
    // Unaligned and large reads go over the socket, and agree.
    expect_read(&rep, 100, &pattern(1, 65536)[100..5000], false).await;
    // Large ones are read on the blocking pool, up to a limit.
    // (In 64 KiB writes, which go through the page cache.)
    let big = pattern(5, 2 << 20);
    for (i, chunk) in big.chunks(65536).enumerate() {
        rep.write((4 << 20) + i as u64 * 65536, Bytes::copy_from_slice(chunk), false).await.unwrap();
    }
    expect_read(&rep, 4 << 20, &big[..1 << 20], true).await;
    expect_read(&rep, 4 << 20, &big, false).await;

    // A controller told not to gets the files' offer but reads over the socket.
    let off = connect(&r, 2, RemoteOptions { local_reads: false, ..RemoteOptions::default() }).await;
    assert!(!off.reads_locally());
    expect_read(&off, 0, &pattern(1, 65536), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_stops_them_before_the_new_head_is_written() {
    let r = start(Faults::default()).await;
    let rep = connect(&r, 1, RemoteOptions::default()).await;
    rep.write(0, Bytes::from(pattern(1, 8192)), false).await.unwrap();
    expect_read(&rep, 0, &pattern(1, 8192), true).await;

    rep.create_snapshot("s1", false, 0).await.unwrap();
    // The old head's files are revoked before the snapshot is answered.
    assert!(!rep.reads_locally());
    assert_eq!(rep.local_layers(), None);
    // The next read asks for the new chain's files: the new head over the
    // snapshot, which hold the new data and the old.
    rep.write(0, Bytes::from(pattern(2, 4096)), false).await.unwrap();
    let mut want = pattern(1, 8192);
    want[..4096].copy_from_slice(&pattern(2, 4096));
    expect_read(&rep, 0, &want, true).await;
    assert_eq!(rep.local_layers(), Some((2, true)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_over_snapshots_find_each_block_in_its_layer() {
    let r = start(Faults::default()).await;
    let rep = connect(&r, 1, RemoteOptions::default()).await;
    let base = pattern(1, 64 << 10);
    rep.write(0, Bytes::from(base.clone()), false).await.unwrap();
    rep.create_snapshot("s1", false, 0).await.unwrap();
    rep.write(4096, Bytes::from(pattern(2, 4096)), false).await.unwrap();
    rep.create_snapshot("s2", false, 0).await.unwrap();
    rep.write(8192, Bytes::from(pattern(3, 8192)), false).await.unwrap();
    // A ZERO record in the head hides s1's block; a hole never written
    // anywhere reads as zeros.
    rep.write_zeroes(32 << 10, 4096, ZeroFlags::default()).await.unwrap();
    let mut want = base.clone();
    want[4096..8192].copy_from_slice(&pattern(2, 4096));
    want[8192..16384].copy_from_slice(&pattern(3, 8192));
    want[32 << 10..36 << 10].fill(0);
    expect_read(&rep, 0, &want, true).await;
    assert_eq!(rep.local_layers(), Some((3, true)));
    expect_read(&rep, 1 << 20, &[0; 8192], true).await;
    // Large, unaligned to the layers' runs: the same bytes.
    let mut big = want.clone();
    big.resize(512 << 10, 0);
    expect_read(&rep, 0, &big, true).await;

    // Deleting s1 merges it into s2 and then changes the chain.
    rep.delete_snapshot("s1").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rep.snapshots().await.unwrap().len() > 1 {
        assert!(Instant::now() < deadline, "merge did not finish");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    expect_read(&rep, 0, &want, true).await;
    assert_eq!(rep.local_layers(), Some((2, true)));

    // Reverting to s2 drops what the head held since.
    rep.revert_snapshot("s2", 2).await.unwrap();
    let mut want = base;
    want[4096..8192].copy_from_slice(&pattern(2, 4096));
    expect_read(&rep, 0, &want, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_below_the_layers_lent_are_read_by_the_replica() {
    // MAX_LAYERS snapshots and the head: one layer more than a grant names.
    let r = start(Faults::default()).await;
    let rep = connect(&r, 1, RemoteOptions::default()).await;
    let bottom = pattern(4, 8192);
    rep.write(0, Bytes::from(bottom.clone()), false).await.unwrap();
    for i in 0..jiva_core::local::MAX_LAYERS {
        rep.create_snapshot(&format!("s{i}"), false, 0).await.unwrap();
    }
    rep.write(1 << 20, Bytes::from(pattern(5, 4096)), false).await.unwrap();
    // A chain longer than a grant may name: the head alone is lent. In
    // the head: read here. Below it: by the replica, and never as zeros.
    expect_read(&rep, 1 << 20, &pattern(5, 4096), true).await;
    assert_eq!(rep.local_layers(), Some((1, false)));
    expect_read(&rep, 0, &bottom, false).await;
    expect_read(&rep, 2 << 20, &[0; 4096], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_controller_stops_an_older_ones_reads() {
    let r = start(Faults::default()).await;
    let old = connect(&r, 1, RemoteOptions::default()).await;
    old.write(0, Bytes::from(pattern(1, 4096)), false).await.unwrap();
    expect_read(&old, 0, &pattern(1, 4096), true).await;

    let new = connect(&r, 2, RemoteOptions::default()).await;
    new.write(0, Bytes::from(pattern(2, 4096)), false).await.unwrap();
    let e = old.read(0, 4096).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Fenced, "{e}");
    assert!(!old.reads_locally(), "the fenced controller may still read the files");
    expect_read(&new, 0, &pattern(2, 4096), true).await;
}

#[tokio::test]
async fn injected_read_faults_are_not_bypassed() {
    let r = start(Faults::parse("0").unwrap()).await;
    let rep = connect(&r, 1, RemoteOptions::default()).await;
    assert!(!rep.reads_locally());
    rep.write(0, Bytes::from(pattern(1, 4096)), false).await.unwrap();
    assert_eq!(rep.read(0, 4096).await.unwrap_err().kind(), ErrorKind::Io);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_writes_see_whole_blocks_never_corruption() {
    race_reads_with_writes(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_writes_over_a_snapshot_see_whole_blocks_never_corruption() {
    race_reads_with_writes(true).await;
}

/// Reads 16 KiB while its first 8 KiB are rewritten with one pattern or
/// the other: every block read is one of them. With `snapshot`, the first
/// pattern is in a snapshot below an empty head, so blocks move from the
/// snapshot's layer to the head's while they are being read.
async fn race_reads_with_writes(snapshot: bool) {
    let r = start(Faults::default()).await;
    let rep = Arc::new(connect(&r, 1, RemoteOptions::default()).await);
    const LEN: usize = 16384;
    let (a, b) = (pattern(1, LEN), pattern(2, LEN));
    rep.write(0, Bytes::from(a.clone()), false).await.unwrap();
    if snapshot {
        rep.create_snapshot("s1", false, 0).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_millis(1500);
    let writer = {
        let (rep, a, b) = (rep.clone(), a.clone(), b.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let data = if n.is_multiple_of(2) { &b } else { &a };
                rep.write(0, Bytes::copy_from_slice(&data[..LEN / 2]), false).await.unwrap();
                n += 1;
            }
        })
    };
    let mut reads = 0;
    while Instant::now() < deadline {
        let got = rep.read(0, LEN).await.unwrap();
        for (i, block) in got.chunks(4096).enumerate() {
            let at = i * 4096..(i + 1) * 4096;
            assert!(block == &a[at.clone()] || block == &b[at], "block {i} is neither write");
        }
        assert!(got[LEN / 2..] == a[LEN / 2..], "blocks never rewritten changed");
        reads += 1;
    }
    writer.await.unwrap();
    assert!(reads > 100);
    assert!(rep.local_reads() > 0, "no read was served from the files");
    if snapshot {
        assert_eq!(rep.local_layers(), Some((2, true)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_reads_at_once_only_while_its_local_replica_allows_it() {
    let r = start(Faults::default()).await;
    let connector = RemoteConnector {
        volume: "vol".into(),
        size: SIZE,
        opts: RemoteOptions::default(),
        shm: Some(ShmPool::new(8 << 20).unwrap()),
    };
    let vol =
        Volume::open("vol", SIZE, 1, connector, std::slice::from_ref(&r.addr), VolumeOptions::default())
            .await
            .unwrap();
    let data = pattern(7, 1 << 20);
    vol.write(1 << 20, Bytes::from(data.clone()), false).await.unwrap();

    // On the calling (blocking) thread, the replica's bytes.
    assert!(vol.reads_at_once(1 << 20));
    let (v, d) = (Arc::clone(&vol), data.clone());
    tokio::task::spawn_blocking(move || {
        let got = v.read_at_once(1 << 20, 1 << 20).expect("served at once");
        assert!(got[..] == d[..]);
        let got = v.read_at_once((1 << 20) + 4096, 8192).expect("served at once");
        assert!(got[..] == d[4096..12288]);
        // Unaligned, or larger than the files are read for: the async way.
        assert!(v.read_at_once((1 << 20) + 100, 4096).is_none());
        assert!(!v.reads_at_once(2 << 20));
    })
    .await
    .unwrap();

    // Paused (a snapshot being taken): not at once.
    vol.pause().await;
    assert!(vol.read_at_once(1 << 20, 4096).is_none(), "read at once while paused");
    vol.resume();
    assert!(vol.read_at_once(1 << 20, 4096).is_some());

    // After a snapshot the head files are no longer the volume's.
    vol.snapshot_create("s1").await.unwrap();
    vol.write(1 << 20, Bytes::from(pattern(8, 4096)), false).await.unwrap();
    assert!(!vol.reads_at_once(4096));
    assert!(vol.read_at_once(1 << 20, 4096).is_none(), "read the old head at once");
    assert!(vol.read(1 << 20, 4096).await.unwrap()[..] == pattern(8, 4096)[..]);
    // That read asked for the new chain's files: at once again.
    assert!(vol.reads_at_once(4096));
    let (v, mut want) = (Arc::clone(&vol), data);
    want[..4096].copy_from_slice(&pattern(8, 4096));
    tokio::task::spawn_blocking(move || {
        assert!(v.read_at_once(1 << 20, 1 << 20).expect("served at once")[..] == want[..]);
    })
    .await
    .unwrap();
    vol.shutdown().await.unwrap();
}
