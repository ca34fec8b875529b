//! The volume over in-memory replicas: replication, failure, fencing by
//! generation, rebuild (full, incremental, resumed) while writes continue.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::replica::{MemConnector, MemReplica};

const SIZE: u64 = 8 << 20;
const REGION: u64 = 64 << 10;

fn opts() -> VolumeOptions {
    VolumeOptions {
        heartbeat: Duration::from_millis(20),
        checkpoint_interval: Duration::from_secs(3600),
        io_wait: Duration::from_secs(5),
        rebuild_chunk: 256 << 10,
        ..VolumeOptions::default()
    }
}

fn connector(n: usize) -> (Arc<MemConnector>, Vec<String>) {
    let c = Arc::new(MemConnector::default());
    let addrs: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
    for (i, a) in addrs.iter().enumerate() {
        c.add(a, MemReplica::new(SIZE, REGION, 100 + i as u64));
    }
    (c, addrs)
}

/// Lets the connector be shared between a volume and the test.
struct Shared(Arc<MemConnector>);

impl Connector for Shared {
    type Link = crate::replica::MemLink;
    async fn attach(&self, addr: &str, epoch: u64) -> Result<(Self::Link, ReplicaMeta)> {
        self.0.attach(addr, epoch).await
    }
}

async fn open(
    c: &Arc<MemConnector>,
    addrs: &[String],
    epoch: u64,
    o: VolumeOptions,
) -> Result<Arc<Volume<Shared>>> {
    Volume::open("v", SIZE, epoch, Shared(c.clone()), addrs, o).await
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn states<C: Connector>(v: &Volume<C>) -> Vec<ReplicaState> {
    v.replicas().iter().map(|r| r.state).collect()
}

async fn contents(c: &MemConnector, addr: &str) -> Bytes {
    c.get(addr).device().read(0, SIZE as usize).await.unwrap()
}

fn data(len: usize, seed: u8) -> Bytes {
    Bytes::from((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>())
}

#[tokio::test]
async fn writes_reach_every_replica_and_reads_work() {
    let (c, addrs) = connector(3);
    let v = open(&c, &addrs, 1, opts()).await.unwrap();
    v.write(4096, data(8192, 9), false).await.unwrap();
    for a in &addrs {
        assert_eq!(c.get(a).device().read(4096, 8192).await.unwrap(), data(8192, 9));
    }
    assert_eq!(v.read(4096, 8192).await.unwrap(), data(8192, 9));
    // Every replica holds the record listing all three.
    for a in &addrs {
        assert_eq!(c.get(a).stored_meta().membership.members.len(), 3);
    }
}

/// Writes sent to several replicas are marked as such (replicas answer
/// those in groups, a cost worth it only where the slowest answer counts);
/// a volume with one healthy replica writes plainly.
#[tokio::test]
async fn only_writes_sent_to_several_replicas_fan_out() {
    let fanned = |c: &MemConnector, a: &str| c.get(a).fan_out_writes.load(Ordering::Relaxed);
    let (c, addrs) = connector(1);
    let v = open(&c, &addrs, 1, opts()).await.unwrap();
    v.write(0, data(4096, 1), false).await.unwrap();
    v.write_payload(8192, Payload::Bytes(data(65536, 2)), false).await.unwrap();
    assert_eq!(fanned(&c, "r0"), 0);
    assert_eq!(c.get("r0").device().read(8192, 65536).await.unwrap(), data(65536, 2));

    let (c, addrs) = connector(3);
    let v = open(&c, &addrs, 1, opts()).await.unwrap();
    v.write(0, data(4096, 3), false).await.unwrap();
    v.write_payload(8192, Payload::Bytes(data(65536, 4)), false).await.unwrap();
    for a in &addrs {
        assert_eq!(fanned(&c, a), 2, "{a}");
        assert_eq!(c.get(a).device().read(8192, 65536).await.unwrap(), data(65536, 4));
    }
    // Two of three left: still several. (The write that finds one gone
    // may or may not have fanned out, by when the heartbeat noticed.)
    c.get("r2").kill();
    v.write(0, data(4096, 5), false).await.unwrap();
    wait_for("r2 out", || v.healthy_count() == 2).await;
    let before = (fanned(&c, "r0"), fanned(&c, "r1"));
    v.write(0, data(4096, 6), false).await.unwrap();
    assert_eq!((fanned(&c, "r0"), fanned(&c, "r1")), (before.0 + 1, before.1 + 1));
    // One left: plain again.
    c.get("r1").kill();
    v.write(0, data(4096, 7), false).await.unwrap();
    wait_for("r1 out", || v.healthy_count() == 1).await;
    let before = fanned(&c, "r0");
    v.write(0, data(4096, 8), false).await.unwrap();
    assert_eq!(fanned(&c, "r0"), before);
    assert_eq!(v.read(0, 4096).await.unwrap(), data(4096, 8));
}

#[tokio::test]
async fn a_failed_replica_is_excluded_before_the_ack_and_rebuilt_incrementally() {
    let (c, addrs) = connector(3);
    let v = open(&c, &addrs, 1, opts()).await.unwrap();
    // Lots of data first, then a checkpoint so it is "old".
    for i in 0..64u64 {
        v.write(i * 65536, data(65536, i as u8), false).await.unwrap();
    }
    {
        let mut rec = v.record.lock().await;
        let ids = rec.members.clone();
        v.bump_locked(&mut rec, ids, false).await.unwrap();
    }
    c.get("r1").kill();
    v.write(0, data(4096, 200), false).await.unwrap();
    // The ack came after a record without r1 was durable on the others.
    assert_eq!(v.healthy_count(), 2);
    let id1 = c.get("r1").stored_meta().store_id;
    for a in ["r0", "r2"] {
        assert!(!c.get(a).stored_meta().membership.members.contains(&id1));
    }
    c.get("r1").restart();
    wait_for("r1 healthy", || states(&v) == vec![ReplicaState::Healthy; 3]).await;
    let summary = v.replicas()[1].last_rebuild.clone().unwrap();
    assert!(summary.completed && !summary.full, "{summary:?}");
    assert!(summary.copied_bytes <= REGION, "copied {} bytes for one written block", summary.copied_bytes);
    assert_eq!(contents(&c, "r1").await, contents(&c, "r0").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_rebuild_while_writes_continue_converges() {
    let (c, addrs) = connector(2);
    let o = VolumeOptions { rebuild_rate: 16 << 20, ..opts() };
    let v = open(&c, &addrs[..1], 1, o).await.unwrap();
    for i in 0..100u64 {
        v.write(i * 40960 % (SIZE - 65536), data(65536, i as u8), false).await.unwrap();
    }
    v.add("r1").unwrap();
    // Keep writing (overlapping the copy) until the rebuild is done.
    let writer = {
        let v = v.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while v.healthy_count() < 2 {
                let off = (i * 12288 + 512) % (SIZE - 70000);
                v.write(off, data(20000, (i % 251) as u8), false).await.unwrap();
                if i.is_multiple_of(7) {
                    v.trim(off / 4096 * 4096, 8192, false).await.unwrap();
                }
                i += 1;
                tokio::task::yield_now().await;
            }
        })
    };
    wait_for("r1 healthy", || v.healthy_count() == 2).await;
    writer.await.unwrap();
    let s = v.replicas()[1].last_rebuild.clone().unwrap();
    assert!(s.full && s.completed, "{s:?}");
    assert_eq!(contents(&c, "r1").await, contents(&c, "r0").await, "rebuilt copy differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_rebuild_resumes() {
    let (c, addrs) = connector(2);
    let o = VolumeOptions { rebuild_rate: 2 << 20, ..opts() };
    let v = open(&c, &addrs[..1], 1, o).await.unwrap();
    v.write(0, data(SIZE as usize, 3), false).await.unwrap();
    v.add("r1").unwrap();
    wait_for("half copied", || {
        v.replicas()[1]
            .rebuild
            .as_ref()
            .is_some_and(|r| r.done_bytes * 2 >= r.total_bytes && r.total_bytes > 0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.get("r1").kill();
    wait_for("r1 failed", || v.replicas()[1].state == ReplicaState::Failed).await;
    assert!(c.get("r1").stored_meta().rebuild.as_ref().unwrap().progress > 0);
    c.get("r1").restart();
    wait_for("r1 healthy", || v.healthy_count() == 2).await;
    let s = v.replicas()[1].last_rebuild.clone().unwrap();
    assert!(s.resumed && s.completed, "{s:?}");
    assert!(s.copied_bytes < SIZE * 3 / 4, "resumed rebuild copied {} of {SIZE}", s.copied_bytes);
    assert_eq!(contents(&c, "r1").await, contents(&c, "r0").await);
}

#[tokio::test]
async fn restart_reconciles_and_refuses_when_a_newest_member_is_missing() {
    let (c, addrs) = connector(3);
    let v = open(&c, &addrs, 1, opts()).await.unwrap();
    v.write(0, data(4096, 1), false).await.unwrap();
    c.get("r2").kill();
    v.write(0, data(4096, 2), false).await.unwrap();
    v.flush().await.unwrap();
    drop(v);
    // The controller dies; r0 is unreachable, r2 comes back: r2 alone is
    // stale (it missed the second write) and must not serve.
    c.get("r0").kill();
    c.get("r2").restart();
    let e = open(&c, &addrs, 2, opts()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    c.get("r0").restart();
    let v = open(&c, &addrs, 3, opts()).await.unwrap();
    assert_eq!(v.read(0, 4096).await.unwrap(), data(4096, 2));
    wait_for("all healthy", || v.healthy_count() == 3).await;
    assert_eq!(contents(&c, "r2").await, contents(&c, "r0").await);
}

#[tokio::test]
async fn clean_shutdown_brings_every_member_back_at_once() {
    let (c, addrs) = connector(2);
    let v = open(&c, &addrs, 1, opts()).await.unwrap();
    v.write(0, data(4096, 1), false).await.unwrap();
    v.shutdown().await.unwrap();
    drop(v);
    let v = open(&c, &addrs, 2, opts()).await.unwrap();
    assert_eq!(states(&v), vec![ReplicaState::Healthy; 2]);
}

#[tokio::test]
async fn stale_epoch_is_refused() {
    let (c, addrs) = connector(2);
    let _v = open(&c, &addrs, 5, opts()).await.unwrap();
    let e = open(&c, &addrs, 4, opts()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Fenced);
}

#[tokio::test]
async fn io_below_min_healthy_waits_then_fails_cleanly() {
    let (c, addrs) = connector(2);
    let o = VolumeOptions { min_healthy: 2, io_wait: Duration::from_millis(200), ..opts() };
    let v = open(&c, &addrs, 1, o).await.unwrap();
    v.write(0, data(4096, 1), false).await.unwrap();
    c.get("r1").kill();
    // The failing write itself still completes on r0 (it was admitted).
    let _ = v.write(0, data(4096, 2), false).await;
    let t = Instant::now();
    let e = v.write(0, data(4096, 3), false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(t.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn corrupt_read_is_retried_and_repaired() {
    let (c, addrs) = connector(2);
    let v = open(&c, &addrs, 1, opts()).await.unwrap();
    v.write(0, data(4096, 5), false).await.unwrap();
    c.get("r0").device().set_corrupt_reads(true);
    for _ in 0..4 {
        assert_eq!(v.read(0, 4096).await.unwrap(), data(4096, 5));
    }
    assert_eq!(v.healthy_count(), 2, "corruption is per block, not a replica failure");
    c.get("r0").device().set_corrupt_reads(false);
}

#[tokio::test]
async fn a_read_not_served_at_once_asks_the_same_member_first() {
    let (c, addrs) = connector(3);
    let v = open(&c, &addrs, 1, opts()).await.unwrap();
    v.note_at_once_miss(8192, 2);
    assert_eq!(v.take_at_once_miss(4096), None, "another offset");
    let order = |first| v.read_order_at(first).into_iter().map(|(pos, _)| pos).collect::<Vec<_>>();
    let first = v.take_at_once_miss(8192);
    assert_eq!(first, Some(2));
    assert_eq!(order(first)[0], 2);
    assert_eq!(v.take_at_once_miss(8192), None, "a note steers one read only");
    // A slot reused by another offset no longer steers the first.
    v.note_at_once_miss(8192, 1);
    v.note_at_once_miss(8192 + AT_ONCE_MISS_SLOTS as u64 * BS, 0);
    assert_eq!(v.take_at_once_miss(8192), None);
    v.note_at_once_miss(8192 + 512, 1);
    assert_eq!(v.take_at_once_miss(8192 + 512), None, "unaligned reads are not noted");
}

#[tokio::test]
async fn error_on_every_replica_goes_to_the_client_without_marking() {
    let (c, addrs) = connector(2);
    let v = open(&c, &addrs, 1, opts()).await.unwrap();
    for a in &addrs {
        c.get(a).device().set_failing(true);
    }
    let e = v.write(0, data(4096, 1), false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert_eq!(v.healthy_count(), 2);
}

#[test]
fn extents_zip() {
    let a = [
        Extent { length: 4096, state: ExtentState::Data },
        Extent { length: 8192, state: ExtentState::Hole },
    ];
    let b = [
        Extent { length: 8192, state: ExtentState::Hole },
        Extent { length: 4096, state: ExtentState::Data },
    ];
    let z = zip_extents(0, &a, &b, 12288);
    assert_eq!(
        z,
        vec![
            (0, 4096, ExtentState::Data, ExtentState::Hole),
            (4096, 4096, ExtentState::Hole, ExtentState::Hole),
            (8192, 4096, ExtentState::Hole, ExtentState::Data),
        ]
    );
}

fn piped(data: &[u8]) -> Payload {
    let mut pipe = Piped::with_capacity(data.len()).unwrap();
    assert_eq!(pipe.push_bytes(data).unwrap(), crate::pipe::Filled::Done);
    Payload::Piped(pipe)
}

#[tokio::test]
async fn piped_writes_reach_every_replica_whole() {
    let (c, addrs) = connector(3);
    let v = open(&c, &addrs, 1, opts()).await.unwrap();
    assert!(v.takes_piped_writes());
    // Each replica gets its own duplicate of the pipe (the last one the
    // pipe itself); concurrent piped writes do not mix.
    let writes =
        [(0u64, data(1 << 20, 1)), (2 << 20, data(512 << 10, 2)), ((3 << 20) + 512, data(600 << 10, 3))];
    let done = join_all(writes.iter().map(|(at, d)| v.write_payload(*at, piped(d), false))).await;
    assert!(done.iter().all(Result::is_ok), "{done:?}");
    for a in &addrs {
        let got = contents(&c, a).await;
        for (at, d) in &writes {
            assert!(got[*at as usize..*at as usize + d.len()] == d[..], "replica {a} at {at}");
        }
    }
    assert_eq!(states(&v), vec![ReplicaState::Healthy; 3]);
    // With one replica down, the others still get whole payloads.
    c.get("r2").kill();
    v.write_payload(5 << 20, piped(&data(1 << 20, 4)), true).await.unwrap();
    for a in ["r0", "r1"] {
        assert_eq!(c.get(a).device().read(5 << 20, 1 << 20).await.unwrap(), data(1 << 20, 4));
    }
}

#[test]
fn a_shared_payload_falls_back_to_memory_and_hands_over_the_pipe_last() {
    let d = data(64 << 10, 5);
    let mut shared = SharedPayload::Pipe(match piped(&d) {
        Payload::Piped(p) => p,
        Payload::Bytes(_) => unreachable!(),
    });
    let first = shared.share(false).unwrap();
    let last = shared.share(true).unwrap();
    assert!(matches!(first, Payload::Piped(_)) && matches!(last, Payload::Piped(_)));
    assert_eq!(first.into_bytes().unwrap(), d);
    assert_eq!(last.into_bytes().unwrap(), d);
    // After the pipe is handed over nothing is left to share.
    assert!(shared.share(false).is_err());
    // A copy in memory is shared as such.
    let mut copy = SharedPayload::Bytes(d.clone());
    assert_eq!(copy.share(false).unwrap().into_bytes().unwrap(), d);
    assert_eq!(copy.share(true).unwrap().into_bytes().unwrap(), d);
}
