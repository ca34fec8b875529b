//! The replica server over real TCP with a real store: handshake (probe,
//! attach, refusals), fencing of stale controllers, pipelined I/O through
//! the controller's `RemoteReplica`, and hostile frames.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use jiva_core::remote::{self, RemoteOptions, RemoteReplica};
use jiva_core::replica::Replica;
use jiva_core::wire::{self, Opcode, Request};
use jiva_core::wire::{Membership, RebuildMark};
use jiva_core::{BlockDevice, ErrorKind, ExtentState, ZeroFlags};
use jiva_replica::server::{Faults, ReplicaServer};
use jiva_replica::{Store, StoreOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SIZE: u64 = 8 << 20;

struct Running {
    addr: String,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn start() -> Running {
    start_with(Faults::default()).await
}

async fn start_with(faults: Faults) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), SIZE, StoreOptions::default()).await.unwrap();
    let server = Arc::new(ReplicaServer::new(Arc::new(store)).with_faults(faults));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(listener, async move {
        let _ = rx.await;
    }));
    Running { addr, _dir: dir, stop: Some(tx) }
}

fn opts() -> RemoteOptions {
    RemoteOptions::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_then_attach_then_io() {
    let r = start().await;
    let info = remote::probe(&r.addr, &opts()).await.unwrap();
    assert_eq!((info.status, info.size, info.epoch), (0, SIZE, 0));
    assert_eq!(info.flags & wire::HELLO_BOUND, 0, "fresh store is unbound");

    let rep = RemoteReplica::connect(&r.addr, "vol", SIZE, 1, opts()).await.unwrap();
    rep.ping().await.unwrap();
    rep.write(4096, Bytes::from(vec![7u8; 8192]), false).await.unwrap();
    rep.write(100, Bytes::from_static(b"hello"), true).await.unwrap();
    assert_eq!(&rep.read(100, 5).await.unwrap()[..], b"hello");
    assert_eq!(&rep.read(4096, 8192).await.unwrap()[..], &[7u8; 8192][..]);
    rep.flush().await.unwrap();
    rep.trim(4096, 4096, false).await.unwrap();
    rep.write_zeroes(8192, 4096, ZeroFlags { no_hole: true, fua: false }).await.unwrap();
    let ext = rep.block_status(0, 16384).await.unwrap();
    assert_eq!(ext[0].state, ExtentState::Data);
    assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 16384);
    assert!(rep.read(4096, 8192).await.unwrap().iter().all(|&b| b == 0));

    let info = remote::probe(&r.addr, &opts()).await.unwrap();
    assert_eq!((info.volume.as_str(), info.epoch), ("vol", 1));
    assert_ne!(info.flags & wire::HELLO_BOUND, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_complete_independently() {
    let r = start().await;
    let rep = Arc::new(RemoteReplica::connect(&r.addr, "vol", SIZE, 1, opts()).await.unwrap());
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let rep = rep.clone();
        tasks.push(tokio::spawn(async move {
            let off = (i * 37 % 2000) * 4096;
            rep.write(off, Bytes::from(vec![(i % 251) as u8; 4096]), false).await.unwrap();
            (off, (i % 251) as u8)
        }));
    }
    let mut last = std::collections::HashMap::new();
    for t in tasks {
        let (off, v) = t.await.unwrap();
        last.insert(off, v);
    }
    for (off, v) in last {
        assert!(rep.read(off, 4096).await.unwrap().iter().all(|&b| b == v));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_size_and_stale_epoch() {
    let r = start().await;
    let first = RemoteReplica::connect(&r.addr, "vol", SIZE, 5, opts()).await.unwrap();
    first.write(0, Bytes::from(vec![1u8; 4096]), false).await.unwrap();

    let e = RemoteReplica::connect(&r.addr, "other", SIZE, 6, opts()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let e = RemoteReplica::connect(&r.addr, "vol", SIZE * 2, 6, opts()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let e = RemoteReplica::connect(&r.addr, "vol", SIZE, 4, opts()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Fenced, "{e}");

    // Refused attaches fence nobody.
    first.write(0, Bytes::from(vec![1u8; 4096]), false).await.unwrap();

    // A newer controller takes over: the old one is fenced from then on.
    let second = RemoteReplica::connect(&r.addr, "vol", SIZE, 6, opts()).await.unwrap();
    let e = first.write(0, Bytes::from(vec![2u8; 4096]), false).await.unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::Fenced | ErrorKind::Disconnected), "{e}");
    assert!(second.read(0, 4096).await.unwrap().iter().all(|&b| b == 1), "fenced write landed");
    let e = RemoteReplica::connect(&r.addr, "vol", SIZE, 5, opts()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Fenced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_waits_for_the_old_controllers_running_writes() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let r = start_with(Faults { write_gate: Some(gate.clone()), ..Faults::default() }).await;
    let old = Arc::new(RemoteReplica::connect(&r.addr, "vol", SIZE, 1, opts()).await.unwrap());
    // A write of generation 7 into region 2, accepted and then stuck at the disk.
    let write = tokio::spawn({
        let old = old.clone();
        async move { old.write_at(2 << 20, Bytes::from(vec![9u8; 4096]), false, 7, None).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!write.is_finished());

    // The new controller's attach raises the fence but is not answered
    // while the old write runs: the stamps and data it would read next
    // could miss it.
    let addr = r.addr.clone();
    let takeover = tokio::spawn(async move { RemoteReplica::connect(&addr, "vol", SIZE, 2, opts()).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!takeover.is_finished(), "attach answered while a write accepted before it was still running");
    // The fence is up already: the old controller's next request is refused.
    let e = old.write_at(0, Bytes::from(vec![1u8; 4096]), false, 7, None).await.unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::Fenced | ErrorKind::Disconnected), "{e}");

    gate.add_permits(1);
    write.await.unwrap().unwrap();
    let new = takeover.await.unwrap().unwrap();
    assert_eq!(new.stamps(0, 3).await.unwrap()[2], 7, "the takeover sees the old write's stamp");
    assert!(new.read(2 << 20, 4096).await.unwrap().iter().all(|&b| b == 9));
    assert!(new.read(0, 4096).await.unwrap().iter().all(|&b| b == 0), "fenced write landed");
}

/// Opens a raw attached connection and returns the stream after the hello.
async fn raw_attached(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = BytesMut::new();
    let hello = wire::Hello {
        version: wire::PROTOCOL_VERSION,
        mode: wire::HelloMode::Attach,
        size: SIZE,
        epoch: 1,
        volume: "vol".into(),
    };
    wire::encode_hello(&hello, &mut out).unwrap();
    s.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    loop {
        if let Some(reply) = wire::decode_hello_reply(&mut buf).unwrap() {
            assert_eq!(reply.status, 0, "{}", reply.message);
            return s;
        }
        assert!(s.read_buf(&mut buf).await.unwrap() > 0);
    }
}

async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut v))
        .await
        .expect("server must close a connection that sent garbage")
        .ok();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_close_the_connection_and_change_nothing() {
    let r = start().await;
    let good = RemoteReplica::connect(&r.addr, "vol", SIZE, 1, opts()).await.unwrap();
    good.write(0, Bytes::from(vec![3u8; 4096]), false).await.unwrap();

    // Garbage instead of a hello.
    let mut s = TcpStream::connect(&r.addr).await.unwrap();
    s.write_all(&[0xAB; 100]).await.unwrap();
    read_to_close(&mut s).await;

    // After the handshake: bad magic; a WRITE header claiming 1 GiB.
    let mut s = raw_attached(&r.addr).await;
    s.write_all(&[0u8; 64]).await.unwrap();
    read_to_close(&mut s).await;
    let mut s = raw_attached(&r.addr).await;
    let mut b = BytesMut::new();
    let req = Request::simple(Opcode::Read, 9, 0, 1 << 30);
    wire::encode_request_header(&req, &mut b);
    s.write_all(&b).await.unwrap();
    read_to_close(&mut s).await;

    // A well-formed write past the end gets an error response, not a crash.
    let mut s = raw_attached(&r.addr).await;
    let mut b = BytesMut::new();
    let req = Request {
        data: Bytes::from(vec![9u8; 4096]),
        ..Request::simple(Opcode::Write, 42, SIZE - 100, 4096)
    };
    wire::encode_request_header(&req, &mut b);
    b.put_slice(&req.data);
    s.write_all(&b).await.unwrap();
    let mut buf = BytesMut::new();
    let resp = loop {
        if let Some(resp) = wire::decode_response(&mut buf).unwrap() {
            break resp;
        }
        assert!(s.read_buf(&mut buf).await.unwrap() > 0);
    };
    assert_eq!(resp.tag, 42);
    assert_eq!(ErrorKind::from_code(resp.status), ErrorKind::OutOfRange);

    // The well-behaved controller is unaffected and the data unchanged.
    assert!(good.read(0, 4096).await.unwrap().iter().all(|&b| b == 3));
    assert!(good.read(SIZE - 4096, 4096).await.unwrap().iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_records_stamps_and_checked_writes() {
    let r = start().await;
    let rep = RemoteReplica::connect(&r.addr, "vol", SIZE, 1, opts()).await.unwrap();
    let id = rep.attach_meta().unwrap().store_id;
    assert_ne!(id, 0);
    // Stamps start at zero and rise with the generation a change carries.
    let regions = SIZE / (1 << 20);
    assert_eq!(rep.stamps(0, regions).await.unwrap(), vec![0; regions as usize]);
    rep.write_at((1 << 20) + 10, Bytes::from(vec![1u8; 5000]), false, 7, None).await.unwrap();
    rep.trim_at(3 << 20, 4096, false, 9).await.unwrap();
    rep.write_at(1 << 20, Bytes::from(vec![1u8; 4096]), false, 4, None).await.unwrap();
    let st = rep.stamps(0, regions).await.unwrap();
    assert_eq!(&st[..4], &[0, 7, 0, 9], "stamps never go down");
    assert_eq!(rep.stamps(regions, 1).await.unwrap_err().kind(), ErrorKind::OutOfRange);
    // A payload that does not match its crc is refused and changes nothing.
    let data = Bytes::from(vec![5u8; 4096]);
    let e = rep.write_at(0, data.clone(), false, 1, Some(crc32c::crc32c(&data) ^ 1)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(rep.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));
    rep.write_at(0, data.clone(), false, 1, Some(crc32c::crc32c(&data))).await.unwrap();
    // Records and marks are durable metadata, also visible to a probe.
    let rec = Membership { generation: 12, epoch: 1, clean: false, members: vec![id, 99] };
    rep.set_membership(&rec).await.unwrap();
    let mark = RebuildMark { progress: 3, pieces: vec![(5, 12), (u64::MAX, 0)] };
    rep.set_rebuild(Some(&mark)).await.unwrap();
    let meta = rep.meta().await.unwrap();
    assert_eq!((meta.membership, meta.rebuild.clone()), (rec.clone(), Some(mark)));
    let older = Membership { generation: 11, ..rec.clone() };
    assert_eq!(rep.set_membership(&older).await.unwrap_err().kind(), ErrorKind::InvalidArgument);
    rep.set_rebuild(None).await.unwrap();
    let probed = remote::probe(&r.addr, &opts()).await.unwrap().meta.unwrap();
    assert_eq!((probed.membership, probed.rebuild), (rec, None));
}

/// Reads whose data travels in pipes (a controller on the same machine
/// splices them onward) return exactly what plain reads do, across layers,
/// zeroed and trimmed blocks and direct reads, while small requests share
/// the connection.
/// Whether every page of `file`'s first `len` bytes is in the page cache.
fn resident(file: &std::fs::File, len: usize) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh read-only shared mapping of an open file, unmapped
    // below; `vec` has one byte per page of it.
    unsafe {
        let map =
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
        assert_ne!(map, libc::MAP_FAILED);
        let mut vec = vec![0u8; len.div_ceil(4096)];
        assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
        libc::munmap(map, len);
        vec.iter().all(|v| v & 1 == 1)
    }
}

#[tokio::test]
async fn cold_piped_reads_go_through_the_page_cache() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), SIZE, StoreOptions::default()).await.unwrap());
    let data = Bytes::from((0..1usize << 20).map(|i| (i / 11) as u8).collect::<Vec<u8>>());
    store.write(0, data.clone(), false).await.unwrap();
    store.flush().await.unwrap();
    let layer = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "data"))
        .unwrap();
    let file = std::fs::File::open(&layer).unwrap();
    // Clean pages (flushed above) leave the cache on this advice.
    // SAFETY: plain syscall on a descriptor we hold.
    assert_eq!(unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 1 << 20, libc::POSIX_FADV_DONTNEED) }, 0);
    if resident(&file, 1 << 20) {
        eprintln!("skipped: this filesystem keeps the pages cached");
        return;
    }

    let path = dir.path().join("replica.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let server = Arc::new(ReplicaServer::new(store));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve_unix(listener, async move {
        let _ = stopped.await;
    }));
    let addr = format!("{}{}", remote::UNIX_PREFIX, path.display());
    let rep = RemoteReplica::connect(&addr, "vol", SIZE, 1, opts()).await.unwrap();
    let got = rep.read_payload(0, 1 << 20).await.unwrap().into_bytes().unwrap();
    assert!(got == data);
    // Read through the cache (and so warmed it), not around it with O_DIRECT.
    assert!(resident(&file, 1 << 20), "the piped read bypassed the page cache");
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_reads_over_a_unix_socket_match_plain_reads() {
    use jiva_core::pipe::Payload;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), SIZE, StoreOptions::default()).await.unwrap());
    let pattern =
        |seed: u8, len: usize| Bytes::from((0..len).map(|i| (i / 7) as u8 ^ seed).collect::<Vec<u8>>());
    store.write(0, pattern(1, 4 << 20), false).await.unwrap();
    store.create_snapshot("base", false).await.unwrap();
    store.write(1 << 20, pattern(2, 1 << 20), false).await.unwrap();
    store.write((3 << 20) + 4096, pattern(3, 8192), false).await.unwrap();
    store.trim(5 << 19, 1 << 19, false).await.unwrap();
    store.write_zeroes(3 << 20, 4096, ZeroFlags { no_hole: true, fua: false }).await.unwrap();

    let path = dir.path().join("replica.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let server = Arc::new(ReplicaServer::new(store));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve_unix(listener, async move {
        let _ = stopped.await;
    }));
    let addr = format!("{}{}", remote::UNIX_PREFIX, path.display());
    let rep = Arc::new(RemoteReplica::connect(&addr, "vol", SIZE, 1, opts()).await.unwrap());

    let ranges: [(u64, usize); 7] = [
        (0, 1 << 20),
        (1 << 19, 1 << 20),
        ((1 << 20) - 4096, 512 << 10),
        (5 << 19, 256 << 10),
        ((3 << 20) - (128 << 10), 1 << 20),
        (8 << 19, 4 << 20),
        (4097, 300_000),
    ];
    let mut piped = 0;
    for round in 0..3 {
        let mut tasks = Vec::new();
        for &(offset, len) in &ranges {
            let rep = rep.clone();
            tasks.push(tokio::spawn(async move {
                // Small requests in between take the other framing path.
                let small = rep.read(offset, 512);
                let (payload, small) = tokio::join!(rep.read_payload(offset, len), small);
                let plain = rep.read(offset, len).await.unwrap();
                assert_eq!(&small.unwrap()[..], &plain[..512]);
                let was_piped = matches!(payload, Ok(Payload::Piped(_)));
                let got = payload.unwrap().into_bytes().unwrap();
                assert!(got == plain, "round {round}: {len} bytes at {offset} differ");
                was_piped
            }));
        }
        for t in tasks {
            piped += usize::from(t.await.unwrap());
        }
    }
    assert!(piped >= 3 * 5, "only {piped} reads went through pipes");
    let _ = stop.send(());
}
