//! WRITE payloads and READ replies in memory shared with a replica on the
//! same machine (`jiva_core::shm`): stored from / put straight into the
//! controller's pools, never reused before the replica answers, and
//! checked at the replica's edge.

use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use jiva_core::remote::{self, RemoteConnector, RemoteOptions, RemoteReplica};
use jiva_core::replica::Replica;
use jiva_core::shm::{Mapping, ShmBuf, ShmPool};
use jiva_core::volume::{Volume, VolumeOptions};
use jiva_core::wire::{self, Opcode, Request};
use jiva_core::{BlockDevice, ErrorKind};
use jiva_replica::server::{Faults, ReplicaServer};
use jiva_replica::{Store, StoreOptions};

const SIZE: u64 = 16 << 20;

struct Running {
    addr: String,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(faults: Faults) -> Running {
    start_with(faults, StoreOptions::default()).await
}

async fn start_with(faults: Faults, opts: StoreOptions) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), SIZE, opts).await.unwrap();
    let server = Arc::new(ReplicaServer::new(Arc::new(store)).with_faults(faults));
    let path = dir.path().join("replica.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve_unix(listener, async move {
        let _ = rx.await;
    }));
    let addr = format!("{}{}", remote::UNIX_PREFIX, path.display());
    Running { addr, path, _dir: dir, _stop: tx }
}

/// A replica served over TCP on loopback (nothing can be shared with it).
async fn start_tcp() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), SIZE, StoreOptions::default()).await.unwrap();
    let server = Arc::new(ReplicaServer::new(Arc::new(store)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(listener, async move {
        let _ = rx.await;
    }));
    Running { addr, path: dir.path().join("none"), _dir: dir, _stop: tx }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i / 3) as u8 ^ seed).collect()
}

/// `data` copied into a payload buffer of `pool`.
fn shared(pool: &Arc<ShmPool>, data: &[u8]) -> Bytes {
    let mut buf: ShmBuf = pool.alloc(data.len()).expect("room in the pool");
    buf.unfilled().copy_from_slice(data);
    buf.advance(data.len());
    buf.freeze()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_payloads_are_stored_and_their_memory_comes_back() {
    let r = start(Faults::default()).await;
    let pool = ShmPool::new(8 << 20).unwrap();
    let opts = RemoteOptions::default();
    let rep = Arc::new(
        RemoteReplica::connect_shared(&r.addr, "vol", SIZE, 1, opts, Some(pool.clone())).await.unwrap(),
    );
    assert!(rep.shares_memory());

    // Aligned and unaligned, plain and FUA, shared and heap payloads, all
    // in flight at once.
    let writes: [(u64, usize, bool); 6] = [
        (0, 1 << 20, false),
        ((2 << 20) + 512, 65536 + 1000, false),
        (4 << 20, 4 << 20, true),
        ((9 << 20) - 4096, 100_000, false),
        (10 << 20, 65536, false),
        (12 << 20, 3 << 20, false),
    ];
    let mut expect = vec![0u8; SIZE as usize];
    let mut tasks = Vec::new();
    for (i, &(offset, len, fua)) in writes.iter().enumerate() {
        let data = pattern(i as u8 + 1, len);
        expect[offset as usize..offset as usize + len].copy_from_slice(&data);
        let payload = if i % 3 == 2 { Bytes::from(data) } else { shared(&pool, &data) };
        let rep = rep.clone();
        tasks.push(tokio::spawn(async move { rep.write_at(offset, payload, fua, 1, None).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let got = rep.read(0, SIZE as usize).await.unwrap();
    assert!(got[..] == expect[..], "what the replica stored differs from what was written");
    // Answered payloads free their memory: the whole pool is free again.
    let all: Vec<ShmBuf> = std::iter::from_fn(|| pool.alloc(4096)).collect();
    assert_eq!(all.len() * 4096, pool.len(), "payload memory still held after the answers");
    drop(all);
    assert_eq!(pool.leaked_bytes(), 0);

    // Without a pool (or for a replica that refuses it) payloads go over
    // the socket as before.
    let plain = RemoteReplica::connect(&r.addr, "vol", SIZE, 2, opts).await.unwrap();
    assert!(!plain.shares_memory());
    plain.write_at(0, shared(&pool, &pattern(9, 65536)), false, 2, None).await.unwrap();
    assert_eq!(&plain.read(0, 65536).await.unwrap()[..], &pattern(9, 65536)[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_payload_without_an_answer_is_never_reused() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let r = start(Faults { write_gate: Some(gate.clone()), ..Faults::default() }).await;
    let pool = ShmPool::new(1 << 20).unwrap();
    let opts = RemoteOptions { request_timeout: Duration::from_millis(300), ..RemoteOptions::default() };
    let rep = RemoteReplica::connect_shared(&r.addr, "vol", SIZE, 1, opts, Some(pool.clone())).await.unwrap();
    assert!(rep.shares_memory());

    // The replica accepts the write but stalls at the disk past the
    // controller's bound.
    let data = pattern(5, 1 << 20);
    let e = rep.write_at(0, shared(&pool, &data), false, 1, None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    // The replica may still read that memory: it is retired, not reused.
    assert_eq!(pool.leaked_bytes(), 1 << 20);
    assert!(pool.alloc(65536).is_none(), "a timed-out payload's memory was handed out again");

    // When the disk comes back, the replica stores what was sent.
    gate.add_permits(1);
    let check = RemoteReplica::connect(&r.addr, "vol", SIZE, 2, RemoteOptions::default()).await.unwrap();
    assert!(check.read(0, 1 << 20).await.unwrap()[..] == data[..]);
}

/// A raw Unix connection whose Hello carries `fd`; returns the stream and
/// the reply's flags.
fn raw_hello(
    path: &std::path::Path,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> (std::os::unix::net::UnixStream, u32) {
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = wire::Hello {
        version: wire::PROTOCOL_VERSION,
        mode: wire::HelloMode::Attach,
        size: SIZE,
        epoch: 1,
        volume: "vol".into(),
    };
    let mut out = BytesMut::new();
    wire::encode_hello(&hello, &mut out).unwrap();
    if fds.is_empty() {
        s.write_all(&out).unwrap();
    } else {
        assert_eq!(jiva_core::fdpass::send(s.as_fd(), &out, fds).unwrap(), out.len());
    }
    let mut buf = BytesMut::new();
    loop {
        if let Some(reply) = wire::decode_hello_reply(&mut buf).unwrap() {
            assert_eq!(reply.status, 0, "{}", reply.message);
            return (s, reply.flags);
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed during the handshake");
        buf.put_slice(&chunk[..n]);
    }
}

/// Sends a WRITE of `length` bytes said to be at `at` in shared memory and
/// returns the status of its answer.
fn shared_write(s: &mut std::os::unix::net::UnixStream, tag: u64, at: u64, length: u64) -> u16 {
    shared_request(s, Opcode::Write, tag, at, length)
}

/// Sends `opcode` (WRITE or READ) of `length` bytes with its data said to
/// be at `at` in shared memory; returns the status of its answer.
fn shared_request(
    s: &mut std::os::unix::net::UnixStream,
    opcode: Opcode,
    tag: u64,
    at: u64,
    length: u64,
) -> u16 {
    send_shared(s, opcode, tag, at, length);
    let (answered, status) = next_answer(s, &mut BytesMut::new());
    assert_eq!(answered, tag);
    status
}

/// Sends `opcode` of `length` bytes at `at` in shared memory, without
/// waiting for the answer.
fn send_shared(s: &mut std::os::unix::net::UnixStream, opcode: Opcode, tag: u64, at: u64, length: u64) {
    let req = Request {
        opcode,
        flags: wire::FLAG_SHM,
        tag,
        offset: 0,
        length,
        generation: 1,
        crc: 0,
        data: Bytes::copy_from_slice(&at.to_be_bytes()),
    };
    let mut out = BytesMut::new();
    wire::encode_request_header(&req, &mut out);
    out.put_slice(&req.data);
    s.write_all(&out).unwrap();
}

/// The next answer on `s`: its tag and status. `buf` keeps what arrived
/// after it.
fn next_answer(s: &mut std::os::unix::net::UnixStream, buf: &mut BytesMut) -> (u64, u16) {
    loop {
        if let Some(resp) = wire::decode_response(buf).unwrap() {
            return (resp.tag, resp.status);
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the replica closed the connection");
        buf.put_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_shared_memory_and_references_are_refused_at_the_edge() {
    let r = start(Faults::default()).await;
    let path = r.path.clone();
    let protocol = ErrorKind::Protocol.code();
    tokio::task::spawn_blocking(move || {
        // Memory that is not sealed could shrink under the replica's
        // mapping (SIGBUS): refused, and the connection serves without it.
        // SAFETY: memfd_create with a NUL-terminated name; checked below.
        let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor that is ours alone.
        let unsealed = unsafe { OwnedFd::from_raw_fd(raw) };
        std::fs::File::from(unsealed.try_clone().unwrap()).set_len(1 << 20).unwrap();
        let (mut s, flags) = raw_hello(&path, &[unsealed.as_fd()]);
        assert_eq!(flags & wire::HELLO_SHM, 0);
        assert_eq!(shared_write(&mut s, 1, 0, 65536), protocol, "a reference without shared memory");

        // Sealed memory is mapped; references outside it are refused, and
        // the connection goes on.
        let pool = ShmPool::new(1 << 20).unwrap();
        let (mut s, flags) = raw_hello(&path, &[pool.fd()]);
        assert_ne!(flags & wire::HELLO_SHM, 0);
        assert_eq!(flags & wire::HELLO_SHM_READ, 0);
        assert_eq!(shared_request(&mut s, Opcode::Read, 10, 0, 4096), protocol, "a read without read memory");
        assert_eq!(shared_write(&mut s, 2, 1 << 20, 4096), protocol, "past the end");
        assert_eq!(shared_write(&mut s, 3, (1 << 20) - 4096, 8192), protocol, "across the end");
        assert_eq!(shared_write(&mut s, 4, u64::MAX - 10, 65536), protocol, "offset overflow");
        assert_eq!(shared_write(&mut s, 5, 0, 0), protocol, "empty");
        assert_eq!(shared_write(&mut s, 6, 0, 1 << 20), 0, "the whole pool");

        // Read memory: replies land inside it or nowhere.
        let reads = ShmPool::new(1 << 20).unwrap();
        let (mut s, flags) = raw_hello(&path, &[pool.fd(), reads.fd()]);
        assert_ne!(flags & wire::HELLO_SHM_READ, 0);
        assert_eq!(shared_request(&mut s, Opcode::Read, 11, 1 << 20, 4096), protocol, "past the end");
        assert_eq!(
            shared_request(&mut s, Opcode::Read, 12, (1 << 20) - 4096, 8192),
            protocol,
            "across the end"
        );
        assert_eq!(
            shared_request(&mut s, Opcode::Read, 13, u64::MAX - 10, 4096),
            protocol,
            "offset overflow"
        );
        assert_eq!(shared_request(&mut s, Opcode::Read, 14, 0, 0), protocol, "empty");
        assert_eq!(shared_request(&mut s, Opcode::Read, 15, 4096, 8192), 0, "inside");
    })
    .await
    .unwrap();
    let check = RemoteReplica::connect(&r.addr, "vol", SIZE, 2, RemoteOptions::default()).await.unwrap();
    assert!(check.read(0, 1 << 20).await.unwrap().iter().all(|&b| b == 0), "the pool was zeros");
    assert!(check.read(1 << 20, 1 << 20).await.unwrap().iter().all(|&b| b == 0));
}

/// The controller computes a shared payload's block crcs once for all its
/// replicas; a replica records those instead of its own. So a payload
/// changed after they were computed (through another mapping of the pool)
/// reads back as corrupt, never as changed data with a checksum to match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_record_the_block_crcs_the_controller_computed() {
    let r = start(Faults::default()).await;
    let pool = ShmPool::new(1 << 20).unwrap();
    let opts = RemoteOptions::default();
    let rep = RemoteReplica::connect_shared(&r.addr, "vol", SIZE, 1, opts, Some(pool.clone())).await.unwrap();
    assert!(rep.sends_block_crcs());

    let data = pattern(3, 4 * 4096);
    let payload = shared(&pool, &data);
    // As a volume does for a payload that goes to several replicas.
    assert!(pool.compute_block_crcs(&payload));
    let at = pool.locate(&payload).unwrap() as usize;
    let other = Mapping::new(pool.fd(), pool.len(), true).unwrap();
    // SAFETY: a byte of the third block, inside the mapping; nothing reads
    // the payload until the write below.
    unsafe { *other.as_ptr().add(at + 2 * 4096 + 7) ^= 0xff };
    rep.write_at(8192, payload, false, 1, None).await.unwrap();
    // And one whose blocks are all as frozen, and one whose crcs nobody
    // computed (the replica computes them).
    let payload = shared(&pool, &data);
    assert!(pool.compute_block_crcs(&payload));
    rep.write_at(1 << 20, payload, false, 1, None).await.unwrap();
    rep.write_at(2 << 20, shared(&pool, &data), false, 1, None).await.unwrap();

    let check = RemoteReplica::connect(&r.addr, "vol", SIZE, 2, opts).await.unwrap();
    assert_eq!(&check.read(8192, 2 * 4096).await.unwrap()[..], &data[..2 * 4096]);
    let e = check.read(8192 + 2 * 4096, 4096).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert_eq!(&check.read(8192 + 3 * 4096, 4096).await.unwrap()[..], &data[3 * 4096..]);
    assert_eq!(&check.read(1 << 20, data.len()).await.unwrap()[..], &data[..]);
    assert_eq!(&check.read(2 << 20, data.len()).await.unwrap()[..], &data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_fan_out_writes_is_answered_whole_and_stored() {
    let r = start(Faults::default()).await;
    let path = r.path.clone();
    // 40 writes of 4 KiB to 128 KiB, sent in one go so that the replica
    // reads them as one batch and answers some of them early.
    let writes: Vec<(u64, Vec<u8>)> =
        (0..40u64).map(|i| (i * (256 << 10), pattern(i as u8, 4096 << (i % 6)))).collect();
    let sent = writes.clone();
    tokio::task::spawn_blocking(move || {
        let (mut s, flags) = raw_hello(&path, &[]);
        assert_ne!(flags & wire::HELLO_FAN_OUT, 0, "fan-out writes are offered");
        let mut out = BytesMut::new();
        for (tag, (offset, data)) in sent.into_iter().enumerate() {
            let req = Request {
                flags: wire::FLAG_FAN_OUT,
                length: data.len() as u64,
                generation: 1,
                data: Bytes::from(data),
                ..Request::simple(Opcode::Write, tag as u64, offset, 0)
            };
            wire::encode_request_header(&req, &mut out);
            out.put_slice(&req.data);
        }
        s.write_all(&out).unwrap();
        let mut buf = BytesMut::new();
        let mut answered = [false; 40];
        for _ in 0..40 {
            let (tag, status) = next_answer(&mut s, &mut buf);
            assert_eq!(status, 0, "write {tag}");
            assert!(!std::mem::replace(&mut answered[tag as usize], true), "write {tag} answered twice");
        }
        assert!(buf.is_empty(), "no answer beyond the 40");
    })
    .await
    .unwrap();
    let check = RemoteReplica::connect(&r.addr, "vol", SIZE, 2, RemoteOptions::default()).await.unwrap();
    for (offset, data) in &writes {
        assert_eq!(&check.read(*offset, data.len()).await.unwrap()[..], &data[..], "at {offset}");
    }
}

/// Sends the frame of `req` (header and `req.data`) as it is.
fn send_frame(s: &mut std::os::unix::net::UnixStream, req: &Request) {
    let mut out = BytesMut::new();
    wire::encode_request_header(req, &mut out);
    out.put_slice(&req.data);
    s.write_all(&out).unwrap();
}

/// Whether the replica closes `s` (without answering) within seconds.
fn closes(s: &mut std::os::unix::net::UnixStream) -> bool {
    let mut chunk = [0u8; 4096];
    matches!(s.read(&mut chunk), Ok(0) | Err(_))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_block_crcs_close_the_connection() {
    let r = start(Faults::default()).await;
    let path = r.path.clone();
    tokio::task::spawn_blocking(move || {
        let pool = ShmPool::new(1 << 20).unwrap();
        let write = |flags: u8, offset: u64, length: u64, crcs: usize| {
            let mut data = 0u64.to_be_bytes().to_vec();
            data.extend(std::iter::repeat_n(0u8, crcs));
            Request {
                flags,
                offset,
                length,
                generation: 1,
                data: Bytes::from(data),
                ..Request::simple(Opcode::Write, 7, 0, 0)
            }
        };
        let both = wire::FLAG_SHM | wire::FLAG_BLOCK_CRCS;
        let (mut s, flags) = raw_hello(&path, &[pool.fd()]);
        assert_ne!(flags & wire::HELLO_BLOCK_CRCS, 0);
        // Well formed: answered, and the connection goes on.
        send_frame(&mut s, &write(both, 4096, 8192, 8));
        assert_eq!(next_answer(&mut s, &mut BytesMut::new()), (7, 0));
        for (what, req) in [
            ("unaligned", write(both, 512, 4096, 4)),
            ("not shared", write(wire::FLAG_BLOCK_CRCS, 0, 4096, 4)),
            ("with a payload crc", write(both | wire::FLAG_CRC, 0, 4096, 4)),
        ] {
            let (mut s, _) = raw_hello(&path, &[pool.fd()]);
            send_frame(&mut s, &req);
            assert!(closes(&mut s), "{what}: the connection stayed open");
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_reads_match_plain_reads() {
    shared_reads_match_plain_reads_of(StoreOptions::default()).await;
}

/// With O_DIRECT, the kernel reads from the device straight into the
/// controller's reply memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_reads_match_plain_reads_with_direct_io() {
    shared_reads_match_plain_reads_of(StoreOptions { direct_io: true, ..StoreOptions::default() }).await;
}

async fn shared_reads_match_plain_reads_of(opts: StoreOptions) {
    let r = start_with(Faults::default(), opts).await;
    let plain = RemoteReplica::connect(&r.addr, "vol", SIZE, 1, RemoteOptions::default()).await.unwrap();
    assert!(!plain.shares_reads());
    let data = pattern(7, SIZE as usize);
    plain.write_at(0, Bytes::from(data), false, 1, None).await.unwrap();
    plain.trim_at(5 << 20, 1 << 20, false, 1).await.unwrap();
    drop(plain);

    let pool = ShmPool::new(4 << 20).unwrap();
    let opts = RemoteOptions::default();
    let rep =
        Arc::new(RemoteReplica::connect_shared(&r.addr, "vol", SIZE, 2, opts, Some(pool)).await.unwrap());
    assert!(rep.shares_reads());
    let ranges: [(u64, usize); 8] = [
        (0, 4096),
        (512, 100_000),
        ((5 << 20) - 4096, 1 << 20),
        (1 << 20, 4 << 20),
        (3 << 20, 1 << 20),
        ((9 << 20) + 7, 65_536),
        (SIZE - 4096, 4096),
        (0, 1000),
    ];
    for round in 0..3 {
        let mut tasks = Vec::new();
        for &(offset, len) in &ranges {
            let rep = rep.clone();
            tasks.push(tokio::spawn(async move {
                let a = rep.read(offset, len).await.unwrap();
                let b = rep.read_payload(offset, len).await.unwrap().into_bytes().unwrap();
                (offset, len, a, b)
            }));
        }
        for t in tasks {
            let (offset, len, a, b) = t.await.unwrap();
            let mut want = pattern(7, SIZE as usize)[offset as usize..offset as usize + len].to_vec();
            let trimmed = (5u64 << 20)..(6 << 20);
            for (i, byte) in want.iter_mut().enumerate() {
                if trimmed.contains(&(offset + i as u64)) {
                    *byte = 0;
                }
            }
            assert!(a[..] == want[..], "round {round}: read of {len} at {offset} differs");
            assert!(b[..] == want[..], "round {round}: payload read of {len} at {offset} differs");
        }
    }
    // An out-of-range read is refused as before, through shared memory too.
    assert!(rep.read(SIZE - 4096, 8192).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_read_without_an_answer_retires_its_buffer() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let r = start(Faults { read_gate: Some(gate.clone()), ..Faults::default() }).await;
    let pool = ShmPool::new(1 << 20).unwrap();
    let opts = RemoteOptions { request_timeout: Duration::from_millis(300), ..RemoteOptions::default() };
    let rep = RemoteReplica::connect_shared(&r.addr, "vol", SIZE, 1, opts, Some(pool)).await.unwrap();
    assert!(rep.shares_reads());
    // The read stalls past the bound: its buffer may still be written.
    let e = rep.read(0, 1 << 20).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert_eq!(rep.retired_read_bytes(), 1 << 20, "the timed-out read's buffer was not retired");
    gate.add_permits(64);
    // The connection's read memory (32 MiB) still serves other reads.
    assert_eq!(rep.read(1 << 20, 1 << 20).await.unwrap().len(), 1 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_in_flight_never_share_reply_memory() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let r = start(Faults { read_gate: Some(gate.clone()), ..Faults::default() }).await;
    let path = r.path.clone();
    let protocol = ErrorKind::Protocol.code();
    tokio::task::spawn_blocking(move || {
        let pool = ShmPool::new(1 << 20).unwrap();
        let reads = ShmPool::new(1 << 20).unwrap();
        let (mut s, flags) = raw_hello(&path, &[pool.fd(), reads.fd()]);
        assert_ne!(flags & wire::HELLO_SHM_READ, 0);
        let mut buf = BytesMut::new();
        // Held at the gate while it owns 0..64 KiB of the reply memory.
        send_shared(&mut s, Opcode::Read, 1, 0, 65536);
        // Overlapping it, at either end: refused at once.
        send_shared(&mut s, Opcode::Read, 2, 32768, 65536);
        assert_eq!(next_answer(&mut s, &mut buf), (2, protocol));
        send_shared(&mut s, Opcode::Read, 3, 0, 4096);
        assert_eq!(next_answer(&mut s, &mut buf), (3, protocol));
        // Beside it: accepted (and held at the gate too).
        send_shared(&mut s, Opcode::Read, 4, 65536, 65536);
        gate.add_permits(2);
        let mut done = [next_answer(&mut s, &mut buf), next_answer(&mut s, &mut buf)];
        done.sort_unstable();
        assert_eq!(done, [(1, 0), (4, 0)]);
        // Answered, the memory is free for the next READ.
        gate.add_permits(1);
        assert_eq!(shared_request(&mut s, Opcode::Read, 5, 32768, 65536), 0);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_volume_offers_payload_memory_only_while_a_replica_maps_it() {
    let (local, tcp) = (start(Faults::default()).await, start_tcp().await);
    let open = |addrs: Vec<String>, epoch: u64| async move {
        let connector = RemoteConnector {
            volume: "vol".into(),
            size: SIZE,
            opts: RemoteOptions::default(),
            shm: Some(ShmPool::new(8 << 20).unwrap()),
        };
        Volume::open("vol", SIZE, epoch, connector, &addrs, VolumeOptions::default()).await.unwrap()
    };
    // Over TCP the payload would be copied into the socket: no buffer.
    let vol = open(vec![tcp.addr.clone()], 1).await;
    assert!(vol.payload_buffer(65536).is_none(), "offered to a replica that cannot map it");
    vol.write(0, Bytes::from(pattern(1, 65536)), false).await.unwrap();
    vol.shutdown().await.unwrap();
    // A local replica maps it, beside one over TCP too.
    let vol = open(vec![tcp.addr.clone(), local.addr.clone()], 2).await;
    let buf = vol.payload_buffer(65536).expect("offered to a replica that maps it");
    drop(buf);
    vol.shutdown().await.unwrap();
}

/// A volume has a payload's block crcs computed once where two or more
/// local replicas store it, and not for one (the replica computes them,
/// off the controller's busier path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_volume_computes_block_crcs_for_several_local_replicas_only() {
    let (a, b) = (start(Faults::default()).await, start(Faults::default()).await);
    let pool = ShmPool::new(8 << 20).unwrap();
    let open = |addrs: Vec<String>, epoch: u64| {
        let connector = RemoteConnector {
            volume: "vol".into(),
            size: SIZE,
            opts: RemoteOptions::default(),
            shm: Some(pool.clone()),
        };
        async move { Volume::open("vol", SIZE, epoch, connector, &addrs, VolumeOptions::default()).await.unwrap() }
    };
    let write = |vol: &Volume<RemoteConnector>, seed: u8| {
        let mut buf = vol.payload_buffer(65536).expect("payload memory");
        buf.unfilled().copy_from_slice(&pattern(seed, 65536));
        buf.advance(65536);
        buf.freeze()
    };
    let vol = open(vec![a.addr.clone()], 1).await;
    let payload = write(&vol, 1);
    vol.write(0, payload.clone(), false).await.unwrap();
    assert_eq!(pool.block_crcs(&payload), None, "computed for one replica");
    assert_eq!(&vol.read(0, 65536).await.unwrap()[..], &pattern(1, 65536)[..]);
    vol.shutdown().await.unwrap();
    drop(payload);

    let vol = open(vec![a.addr.clone(), b.addr.clone()], 2).await;
    let payload = write(&vol, 2);
    vol.write(65536, payload.clone(), false).await.unwrap();
    let crcs = pool.block_crcs(&payload).expect("computed for two replicas");
    let expect: Vec<u8> =
        pattern(2, 65536).chunks(4096).flat_map(|b| jiva_core::crc32c(b).to_be_bytes()).collect();
    assert_eq!(&crcs[..], &expect[..]);
    vol.shutdown().await.unwrap();
    // Each replica stored the data, and its records check out.
    for r in [&a, &b] {
        let check = RemoteReplica::connect(&r.addr, "vol", SIZE, 3, RemoteOptions::default()).await.unwrap();
        assert_eq!(&check.read(65536, 65536).await.unwrap()[..], &pattern(2, 65536)[..]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_memory_belongs_to_one_connection_alone() {
    let r = start(Faults::default()).await;
    let path = r.path.clone();
    tokio::task::spawn_blocking(move || {
        let pool = ShmPool::new(1 << 20).unwrap();
        // The payload memory offered as read memory too: the connection
        // serves without read memory.
        let (_same, flags) = raw_hello(&path, &[pool.fd(), pool.fd()]);
        assert_ne!(flags & wire::HELLO_SHM, 0);
        assert_eq!(flags & wire::HELLO_SHM_READ, 0, "payload memory accepted as read memory");
        // One read memory offered on two connections: the second goes without.
        let reads = ShmPool::new(1 << 20).unwrap();
        let (first, flags) = raw_hello(&path, &[pool.fd(), reads.fd()]);
        assert_ne!(flags & wire::HELLO_SHM_READ, 0);
        let (_second, flags) = raw_hello(&path, &[pool.fd(), reads.fd()]);
        assert_eq!(flags & wire::HELLO_SHM_READ, 0, "one read memory accepted twice");
        // Once the first connection is gone, the memory is free again.
        drop(first);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_again, flags) = raw_hello(&path, &[pool.fd(), reads.fd()]);
            if flags & wire::HELLO_SHM_READ != 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the read memory was never released");
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
}
