//! The replication core: a [`Volume`] is a [`BlockDevice`] made of N
//! replicas that are block devices themselves.
//!
//! Rules (see ARCHITECTURE.md):
//! - A write (and TRIM, WRITE_ZEROES, FLUSH) is acknowledged only once every
//!   healthy replica has completed it. A replica that fails it while others
//!   succeed is marked failed and gets no further I/O; if every replica fails
//!   it, the error goes to the client and no replica is marked.
//! - Overlapping writes are ordered by a block-granular [`RangeLock`] taken
//!   in arrival order, so every replica applies them in the same order.
//!   Non-overlapping I/O runs in parallel; there is no volume-wide lock.
//! - A read goes to the least-loaded healthy replica; if it fails or is
//!   corrupt there, it is retried on the others, and a corrupt copy is
//!   repaired from the good one.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use futures::future::join_all;
use serde::Serialize;

use crate::device::{BLOCK_SIZE, BlockDevice, Capabilities, Extent, ZeroFlags, block_span};
use crate::error::{Error, ErrorKind, Op, Result};
use crate::range_lock::RangeLock;

const BS: u64 = BLOCK_SIZE as u64;

/// Health of one replica as the controller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    /// In sync; serves reads and writes.
    Healthy,
    /// Missed a write or lost its connection; serves nothing.
    Failed,
}

/// A replica's state and counters, for status reports.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaStatus {
    pub name: String,
    pub state: ReplicaState,
    pub in_flight: usize,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
}

struct Member<R> {
    name: String,
    dev: R,
    healthy: AtomicBool,
    in_flight: AtomicUsize,
    reads: AtomicU64,
    writes: AtomicU64,
    errors: AtomicU64,
}

impl<R> Member<R> {
    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }
}

/// Counts a request as in flight on a member for its lifetime.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(c: &'a AtomicUsize) -> InFlight<'a> {
        c.fetch_add(1, Ordering::Relaxed);
        InFlight(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A replicated volume. See the module documentation.
pub struct Volume<R: BlockDevice> {
    name: String,
    size: u64,
    members: Vec<Member<R>>,
    writes: RangeLock,
    next_read: AtomicUsize,
}

impl<R: BlockDevice> std::fmt::Debug for Volume<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume").field("name", &self.name).field("size", &self.size).finish()
    }
}

/// Whether an error says the request itself was bad (every replica would
/// refuse it alike) rather than that the replica is unwell.
fn is_request_error(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::InvalidArgument | ErrorKind::OutOfRange | ErrorKind::Unsupported)
}

impl<R: BlockDevice> Volume<R> {
    /// Builds a volume of `size` bytes over named replicas, all healthy.
    pub fn new(name: impl Into<String>, size: u64, replicas: Vec<(String, R)>) -> Result<Volume<R>> {
        if replicas.is_empty() {
            return Err(Error::new(ErrorKind::InvalidArgument, "a volume needs at least one replica"));
        }
        if size == 0 || !size.is_multiple_of(BS) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("volume size {size} is not a positive multiple of {BS}"),
            ));
        }
        for (n, r) in &replicas {
            if r.size() != size {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("replica {n} has size {} but the volume has {size}", r.size()),
                ));
            }
        }
        let members = replicas
            .into_iter()
            .map(|(name, dev)| Member {
                name,
                dev,
                healthy: AtomicBool::new(true),
                in_flight: AtomicUsize::new(0),
                reads: AtomicU64::new(0),
                writes: AtomicU64::new(0),
                errors: AtomicU64::new(0),
            })
            .collect();
        Ok(Volume {
            name: name.into(),
            size,
            members,
            writes: RangeLock::new(),
            next_read: AtomicUsize::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.members
            .iter()
            .map(|m| ReplicaStatus {
                name: m.name.clone(),
                state: if m.is_healthy() { ReplicaState::Healthy } else { ReplicaState::Failed },
                in_flight: m.in_flight.load(Ordering::Relaxed),
                reads: m.reads.load(Ordering::Relaxed),
                writes: m.writes.load(Ordering::Relaxed),
                errors: m.errors.load(Ordering::Relaxed),
            })
            .collect()
    }

    pub fn healthy_count(&self) -> usize {
        self.members.iter().filter(|m| m.is_healthy()).count()
    }

    /// The replica device by name (for tests and tooling).
    pub fn replica(&self, name: &str) -> Option<&R> {
        self.members.iter().find(|m| m.name == name).map(|m| &m.dev)
    }

    fn mark_failed(&self, m: &Member<R>, err: &Error) {
        if m.healthy.swap(false, Ordering::SeqCst) {
            tracing::warn!(volume = %self.name, replica = %m.name, "replica marked failed: {err}");
        }
    }

    fn unavailable(&self, op: Op) -> Error {
        Error::new(ErrorKind::Unavailable, format!("volume {} has no healthy replica", self.name)).with_op(op)
    }

    /// Runs a mutating operation on every healthy replica, under the write
    /// range lock for `offset..offset+len` (block-aligned) when `len > 0`.
    async fn replicate<'a, F, Fut>(&'a self, op: Op, offset: u64, len: u64, f: F) -> Result<()>
    where
        F: Fn(&'a R) -> Fut,
        Fut: Future<Output = Result<()>> + 'a,
    {
        let _guard = if len > 0 {
            let (first, count) = block_span(offset, len);
            Some(self.writes.lock(first * BS, (first + count) * BS, true).await)
        } else {
            None
        };
        let targets: Vec<&Member<R>> = self.members.iter().filter(|m| m.is_healthy()).collect();
        if targets.is_empty() {
            return Err(self.unavailable(op));
        }
        let results = join_all(targets.iter().map(|m| {
            let _in_flight = InFlight::new(&m.in_flight);
            let fut = f(&m.dev);
            async move {
                let _in_flight = _in_flight;
                fut.await
            }
        }))
        .await;
        let mut first_err = None;
        let mut ok = 0usize;
        for (m, r) in targets.iter().zip(&results) {
            match r {
                Ok(()) => {
                    ok += 1;
                    m.writes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    m.errors.fetch_add(1, Ordering::Relaxed);
                    first_err.get_or_insert_with(|| e.clone());
                }
            }
        }
        match first_err {
            None => Ok(()),
            // Nobody has it: the client gets the error; replicas stay in step.
            Some(e) if ok == 0 => Err(e.with_op(op).at(offset)),
            Some(e) if is_request_error(e.kind()) => Err(e.with_op(op).at(offset)),
            Some(_) => {
                for (m, r) in targets.iter().zip(results) {
                    if let Err(e) = r {
                        self.mark_failed(m, &e);
                    }
                }
                Ok(())
            }
        }
    }

    /// Healthy members in the order a read should try them: least loaded
    /// first, ties broken round-robin.
    fn read_order(&self) -> Vec<&Member<R>> {
        let n = self.members.len();
        let start = self.next_read.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<(usize, &Member<R>)> = (0..n)
            .map(|i| &self.members[(start + i) % n])
            .filter(|m| m.is_healthy())
            .map(|m| (m.in_flight.load(Ordering::Relaxed), m))
            .collect();
        order.sort_by_key(|(load, _)| *load);
        order.into_iter().map(|(_, m)| m).collect()
    }

    /// Rewrites a corrupt copy on `bad` with data read (again, under the
    /// write lock so no newer write is overtaken) from `good`.
    async fn repair(&self, bad: &Member<R>, good: &Member<R>, offset: u64, len: usize) {
        let (first, count) = block_span(offset, len as u64);
        let (start, end) = (first * BS, (first + count) * BS);
        let _guard = self.writes.lock(start, end, true).await;
        let result = async {
            let data = good.dev.read(start, (end - start) as usize).await?;
            bad.dev.write(start, data, false).await
        }
        .await;
        match result {
            Ok(()) => {
                tracing::info!(replica = %bad.name, offset = start, "repaired corrupt blocks from {}", good.name)
            }
            Err(e) => tracing::warn!(replica = %bad.name, offset = start, "repair failed: {e}"),
        }
    }
}

impl<R: BlockDevice> BlockDevice for Volume<R> {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        // Flush goes to every replica and covers every completed write, so
        // several connections may share the volume.
        Capabilities::full()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let mut last_err = None;
        let mut corrupt_on: Vec<&Member<R>> = Vec::new();
        for m in self.read_order() {
            let result = {
                let _in_flight = InFlight::new(&m.in_flight);
                m.dev.read(offset, len).await
            };
            match result {
                Ok(data) => {
                    m.reads.fetch_add(1, Ordering::Relaxed);
                    for bad in corrupt_on {
                        self.repair(bad, m, offset, len).await;
                    }
                    return Ok(data);
                }
                Err(e) => {
                    m.errors.fetch_add(1, Ordering::Relaxed);
                    match e.kind() {
                        k if is_request_error(k) => return Err(e.with_op(Op::Read).at(offset)),
                        ErrorKind::Corrupt => corrupt_on.push(m),
                        ErrorKind::Disconnected | ErrorKind::TimedOut | ErrorKind::Fenced => {
                            self.mark_failed(m, &e)
                        }
                        _ => {}
                    }
                    tracing::warn!(replica = %m.name, offset, "read failed, trying another replica: {e}");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.map(|e| e.with_op(Op::Read).at(offset)).unwrap_or_else(|| self.unavailable(Op::Read)))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let len = data.len() as u64;
        self.replicate(Op::Write, offset, len, |r| r.write(offset, data.clone(), fua)).await
    }

    async fn flush(&self) -> Result<()> {
        self.replicate(Op::Flush, 0, 0, |r| r.flush()).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.replicate(Op::Trim, offset, len, |r| r.trim(offset, len, fua)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.replicate(Op::WriteZeroes, offset, len, |r| r.write_zeroes(offset, len, flags)).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut last_err = None;
        for m in self.read_order() {
            match m.dev.block_status(offset, len).await {
                Ok(ext) => return Ok(ext),
                Err(e) if is_request_error(e.kind()) => return Err(e),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| self.unavailable(Op::BlockStatus)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::mem::MemDevice;

    fn volume(n: usize) -> Volume<Arc<MemDevice>> {
        let reps = (0..n).map(|i| (format!("r{i}"), Arc::new(MemDevice::new(1 << 20)))).collect();
        Volume::new("v", 1 << 20, reps).unwrap()
    }

    #[tokio::test]
    async fn writes_reach_every_replica() {
        let v = volume(3);
        v.write(4096, Bytes::from(vec![9u8; 8192]), false).await.unwrap();
        for i in 0..3 {
            let r = v.replica(&format!("r{i}")).unwrap();
            assert_eq!(&r.read(4096, 8192).await.unwrap()[..], &[9u8; 8192][..]);
        }
        assert_eq!(&v.read(4096, 8192).await.unwrap()[..], &[9u8; 8192][..]);
    }

    #[tokio::test]
    async fn failing_replica_is_dropped_and_writes_continue() {
        let v = volume(3);
        v.replica("r1").unwrap().set_failing(true);
        v.write(0, Bytes::from(vec![1u8; 4096]), false).await.unwrap();
        assert_eq!(v.healthy_count(), 2);
        assert_eq!(v.replicas()[1].state, ReplicaState::Failed);
        // Reads never go to the failed one.
        v.replica("r1").unwrap().set_failing(false);
        for _ in 0..6 {
            assert_eq!(&v.read(0, 4096).await.unwrap()[..], &[1u8; 4096][..]);
        }
        assert_eq!(v.replicas()[1].reads, 0);
    }

    #[tokio::test]
    async fn error_on_every_replica_goes_to_client_without_marking() {
        let v = volume(2);
        for i in 0..2 {
            v.replica(&format!("r{i}")).unwrap().set_failing(true);
        }
        let e = v.write(0, Bytes::from(vec![1u8; 4096]), false).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(v.healthy_count(), 2);
    }

    #[tokio::test]
    async fn corrupt_read_is_retried_and_repaired() {
        let v = volume(2);
        v.write(0, Bytes::from(vec![5u8; 4096]), false).await.unwrap();
        let bad = v.replica("r0").unwrap().clone();
        bad.set_corrupt_reads(true);
        for _ in 0..4 {
            assert_eq!(&v.read(0, 4096).await.unwrap()[..], &[5u8; 4096][..]);
        }
        assert_eq!(v.healthy_count(), 2, "corruption is per block, not a replica failure");
        bad.set_corrupt_reads(false);
        assert_eq!(&bad.read(0, 4096).await.unwrap()[..], &[5u8; 4096][..]);
    }

    #[tokio::test]
    async fn single_replica_corruption_is_a_clean_error() {
        let v = volume(1);
        v.replica("r0").unwrap().set_corrupt_reads(true);
        assert_eq!(v.read(0, 4096).await.unwrap_err().kind(), ErrorKind::Corrupt);
    }

    /// A replica that holds writes for a while, to show that overlapping
    /// writes are ordered while disjoint ones overlap in time.
    struct Slow(MemDevice, Duration);

    impl BlockDevice for Slow {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn capabilities(&self) -> Capabilities {
            self.0.capabilities()
        }
        async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
            self.0.read(offset, len).await
        }
        async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
            // Later writes finish faster, so unordered execution would let
            // an older write land last.
            let delay = self.1.saturating_sub(Duration::from_millis(u64::from(data[0]) * 3));
            tokio::time::sleep(delay).await;
            self.0.write(offset, data, fua).await
        }
        async fn flush(&self) -> Result<()> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overlapping_writes_apply_in_arrival_order() {
        let reps = (0..3)
            .map(|i| (format!("r{i}"), Slow(MemDevice::new(1 << 20), Duration::from_millis(30))))
            .collect();
        let v = Arc::new(Volume::new("v", 1 << 20, reps).unwrap());
        let mut tasks = Vec::new();
        for i in 0..8u8 {
            let task_v = v.clone();
            tasks.push(tokio::spawn(
                async move { task_v.write(100, Bytes::from(vec![i; 5000]), false).await },
            ));
            while v.writes.len() < usize::from(i) + 1 {
                tokio::task::yield_now().await;
            }
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        for i in 0..3 {
            let r = &v.replica(&format!("r{i}")).unwrap().0;
            assert!(r.read(100, 5000).await.unwrap().iter().all(|&b| b == 7));
        }
    }
}
