//! The command loop against a memfd standing in for the uio map, a fake
//! kernel that appends entries the way target_core_user does, and the
//! shared SCSI layer over an in-memory volume.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use jiva_core::mem::MemDevice;
use jiva_core::{Capabilities, Result as DevResult, ZeroFlags};
use jiva_scsi::Identity;
use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::ring::tests::{DATA_OFF, Kernel, MAP_LEN, Memfd};

const DEV_SIZE: u64 = 1 << 20;

/// The uio fd's stand-in: the test rings it after appending entries.
struct FakeBell {
    rx: mpsc::UnboundedReceiver<()>,
    kicks: Arc<AtomicUsize>,
}

impl Doorbell for FakeBell {
    async fn wait(&mut self) -> io::Result<()> {
        match self.rx.recv().await {
            Some(()) => Ok(()),
            None => std::future::pending().await,
        }
    }

    fn kick(&mut self) -> io::Result<()> {
        self.kicks.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A memory device whose I/O to lower blocks takes longer, so commands
/// complete in a different order than they arrived. It offers payload
/// memory, as a volume with local replicas does, and counts the writes
/// whose data came in it.
struct Slow(MemDevice, Arc<jiva_core::shm::ShmPool>, AtomicUsize);

impl Slow {
    async fn delay(offset: u64) {
        let block = offset / 4096;
        tokio::time::sleep(Duration::from_millis(2 * 16u64.saturating_sub(block))).await;
    }
}

impl BlockDevice for Slow {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    async fn read(&self, offset: u64, len: usize) -> DevResult<Bytes> {
        Self::delay(offset).await;
        self.0.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DevResult<()> {
        if self.1.locate(&data).is_some() {
            self.2.fetch_add(1, Ordering::SeqCst);
        }
        Self::delay(offset).await;
        self.0.write(offset, data, fua).await
    }
    fn payload_buffer(&self, len: usize) -> Option<jiva_core::shm::ShmBuf> {
        self.1.alloc(len)
    }
    async fn flush(&self) -> DevResult<()> {
        self.0.flush().await
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> DevResult<()> {
        self.0.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, f: ZeroFlags) -> DevResult<()> {
        self.0.write_zeroes(offset, len, f).await
    }
}

struct Rig {
    mem: Memfd,
    k: Kernel,
    bell: mpsc::UnboundedSender<()>,
    kicks: Arc<AtomicUsize>,
    dev: Arc<Slow>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), LoopError>>,
}

impl Rig {
    fn start() -> Rig {
        let mem = Memfd::new(MAP_LEN);
        let k = Kernel::new(&mem);
        let ring = Ring::open(mem.map()).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let kicks = Arc::new(AtomicUsize::new(0));
        let pool = jiva_core::shm::ShmPool::new(1 << 20).unwrap();
        let dev = Arc::new(Slow(MemDevice::new(DEV_SIZE), pool, AtomicUsize::new(0)));
        let lu = Arc::new(LogicalUnit::new(Arc::clone(&dev), Identity::for_volume("v")));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let bell = FakeBell { rx, kicks: Arc::clone(&kicks) };
        let task = tokio::spawn(run(ring, bell, lu, nexus("d"), async move {
            let _ = stop_rx.await;
        }));
        Rig { mem, k, bell: tx, kicks, dev, stop: Some(stop_tx), task }
    }

    /// Rings the bell and waits until every entry has its response.
    async fn settle(&self) {
        self.bell.send(()).unwrap();
        for _ in 0..5000 {
            if self.k.tail() == self.k.head {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the handler did not complete every command (tail {}, head {})", self.k.tail(), self.k.head);
    }

    fn data(&self, at: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.map().read(at, &mut v).unwrap();
        v
    }

    fn fill(&self, at: usize, data: &[u8]) {
        self.mem.map().write(at, data).unwrap();
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

fn write10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0x2a, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

fn read16(lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0x88, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&blocks.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

fn pattern(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j / 512) as u8 ^ 0x5a).collect()
}

#[tokio::test]
async fn many_commands_in_flight_with_split_iovecs() {
    let mut rig = Rig::start();
    const N: usize = 8;
    // Each 4 KiB write arrives in two iovecs at separate places of the data
    // area (second half first), as the kernel's data blocks may be.
    let mut slots = Vec::new();
    for i in 0..N {
        let data = pattern(i, 4096);
        let (a, b) = (DATA_OFF + i * 4096, DATA_OFF + i * 4096 + 2048);
        rig.fill(b, &data[..2048]);
        rig.fill(a, &data[2048..]);
        let iov = [(b as u64, 2048), (a as u64, 2048)];
        slots.push(rig.k.command(100 + i as u16, &write10(8 * i as u32, 8), &iov));
    }
    rig.settle().await;
    let mut ids: Vec<u16> = slots.iter().map(|&s| rig.k.response(s).0).collect();
    // The slow device finishes high blocks first: completion order differs
    // from arrival order, and every command got exactly one response.
    assert_ne!(ids, (100..100 + N as u16).collect::<Vec<_>>(), "completions were not reordered");
    ids.sort();
    assert_eq!(ids, (100..100 + N as u16).collect::<Vec<_>>());
    assert!(slots.iter().all(|&s| rig.k.response(s).1 == 0), "every write GOOD");
    assert_eq!(rig.dev.2.load(Ordering::SeqCst), N, "write data not gathered in payload memory");
    for i in 0..N {
        assert_eq!(
            rig.dev.0.read(4096 * i as u64, 4096).await.unwrap()[..],
            pattern(i, 4096)[..],
            "block {i}"
        );
    }
    // Read everything back in one command into three uneven iovecs.
    let segs = [(DATA_OFF + 40_000, 10_000usize), (DATA_OFF + 100, 20_000), (DATA_OFF + 20_200, 2768)];
    let iov: Vec<(u64, u64)> = segs.iter().map(|&(o, n)| (o as u64, n as u64)).collect();
    let total: usize = segs.iter().map(|s| s.1).sum();
    assert_eq!(total, 32768);
    let slot = rig.k.command(7, &read16(0, 64), &iov);
    rig.settle().await;
    assert_eq!(rig.k.response(slot).1, 0);
    let mut got = Vec::new();
    for (o, n) in segs {
        got.extend(rig.data(o, n));
    }
    let want: Vec<u8> = (0..N).flat_map(|i| pattern(i, 4096)).collect();
    assert_eq!(got, want);
    assert!(rig.kicks.load(Ordering::SeqCst) >= 2);
    rig.stop.take().unwrap().send(()).unwrap();
    rig.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn wraps_over_pad_entries_many_times() {
    let mut rig = Rig::start();
    // 4 KiB ring, 120-byte entries: the ring wraps (with a PAD) every ~34.
    for round in 0..20u16 {
        let mut slots = Vec::new();
        for j in 0..10u16 {
            let id = round * 10 + j;
            let at = DATA_OFF + usize::from(j) * 4096;
            rig.fill(at, &pattern(usize::from(id), 512));
            slots.push(rig.k.command(id, &write10(u32::from(id), 1), &[(at as u64, 512)]));
        }
        rig.settle().await;
        assert!(slots.iter().all(|&s| rig.k.response(s).1 == 0));
    }
    for id in 0..200usize {
        assert_eq!(rig.dev.0.read(512 * id as u64, 512).await.unwrap()[..], pattern(id, 512)[..], "lba {id}");
    }
    rig.stop().await;
}

#[tokio::test]
async fn malformed_entries_fail_without_touching_memory() {
    let mut rig = Rig::start();
    let before = rig.data(0, DATA_OFF);
    // A write whose iovec points into the mailbox, one past the map's end,
    // one with a length that wraps, then a good one.
    let bad = [(0u64, 512u64), (MAP_LEN as u64 - 256, 512), (DATA_OFF as u64, u64::MAX - 8)];
    let mut slots = Vec::new();
    for (i, iov) in bad.iter().enumerate() {
        slots.push(rig.k.command(i as u16, &write10(0, 1), &[*iov]));
    }
    rig.fill(DATA_OFF, &[0x11; 512]);
    let good = rig.k.command(9, &write10(1, 1), &[(DATA_OFF as u64, 512)]);
    rig.settle().await;
    for (i, &s) in slots.iter().enumerate() {
        let (id, status, sense) = rig.k.response(s);
        assert_eq!((id, status), (i as u16, Status::CheckCondition as u8), "entry {i}");
        assert_eq!(sense[2] & 0xf, key::HARDWARE_ERROR);
        assert_eq!(sense[12], 0x44);
    }
    assert_eq!(rig.k.response(good).1, 0);
    // Nothing was written for the bad ones; the good one landed.
    assert!(rig.dev.0.read(0, 512).await.unwrap().iter().all(|&b| b == 0));
    assert!(rig.dev.0.read(512, 512).await.unwrap().iter().all(|&b| b == 0x11));
    // The command ring changed only where the responses went; the mailbox
    // head is what the kernel wrote.
    let after = rig.data(0, DATA_OFF);
    assert_eq!(before[..12], after[..12], "mailbox header untouched");
    rig.stop().await;
}

#[tokio::test]
async fn data_in_is_cut_and_the_rest_zeroed() {
    let mut rig = Rig::start();
    rig.fill(DATA_OFF, &[0xee; 4096]);
    // INQUIRY, allocation length 255, into a 4 KiB buffer of stale bytes.
    let slot = rig.k.command(1, &[0x12, 0, 0, 0, 255, 0], &[(DATA_OFF as u64, 4096)]);
    rig.settle().await;
    assert_eq!(rig.k.response(slot).1, 0);
    let d = rig.data(DATA_OFF, 4096);
    assert_eq!(d[0], 0x00, "direct-access block device");
    assert_eq!(&d[8..12], b"JIVA");
    assert!(d[255..].iter().all(|&b| b == 0), "stale data-area bytes were handed back");
    // READ CAPACITY(16) reports the volume: 2048 blocks of 512 bytes.
    let slot =
        rig.k.command(2, &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], &[(DATA_OFF as u64, 32)]);
    rig.settle().await;
    assert_eq!(rig.k.response(slot).1, 0);
    let d = rig.data(DATA_OFF, 12);
    assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), DEV_SIZE / 512 - 1);
    assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), 512);
    // An out-of-range read gets CHECK CONDITION, ILLEGAL REQUEST, LBA out of range.
    let slot = rig.k.command(3, &read16(DEV_SIZE / 512, 1), &[(DATA_OFF as u64, 512)]);
    rig.settle().await;
    let (_, status, sense) = rig.k.response(slot);
    assert_eq!(status, Status::CheckCondition as u8);
    assert_eq!((sense[2] & 0xf, sense[12]), (key::ILLEGAL_REQUEST, 0x21));
    rig.stop().await;
}

#[tokio::test]
async fn stop_answers_the_commands_in_flight() {
    let mut rig = Rig::start();
    rig.fill(DATA_OFF, &[0x22; 4096]);
    let slot = rig.k.command(5, &write10(0, 8), &[(DATA_OFF as u64, 4096)]);
    rig.bell.send(()).unwrap();
    // Let the loop take the command, then stop while the write sleeps.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let Rig { k, stop, task, dev, .. } = rig;
    stop.unwrap().send(()).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(k.tail(), k.head);
    assert_eq!(k.response(slot), (5, 0, k.response(slot).2));
    assert!(dev.0.read(0, 4096).await.unwrap().iter().all(|&b| b == 0x22));
}

#[tokio::test]
async fn a_corrupt_ring_ends_the_loop() {
    let mut rig = Rig::start();
    // The kernel's head points into the middle of nowhere (unaligned).
    rig.k.publish(13);
    rig.bell.send(()).unwrap();
    let e = rig.task.await.unwrap().unwrap_err();
    assert!(matches!(e, LoopError::Ring(RingError::Cursor(13))), "{e}");
    rig.stop.take();
}
