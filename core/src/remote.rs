//! The controller's side of the replica wire protocol: a [`RemoteReplica`]
//! is a [`BlockDevice`] backed by one TCP connection to a replica process,
//! with many tagged requests in flight.
//!
//! One writer task batches outgoing frames (flushing the socket when the
//! queue runs dry); one reader task decodes responses and completes the
//! waiting request by tag. When the connection breaks, every waiting and
//! later request fails with [`ErrorKind::Disconnected`].

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::device::{BlockDevice, Capabilities, Extent, ZeroFlags};
use crate::error::{Error, ErrorKind, Op, Result};
use crate::local::LocalFiles;
use crate::pipe::{self, Filled, Payload, Piped};
use crate::replica::{Connector, Replica};
use crate::shm::{self, ShmBuf, ShmPool};
use crate::wire::{
    self, Hello, HelloMode, HelloReply, Membership, Opcode, RebuildMark, ReplicaMeta, Request, Response,
    SnapTarget, SnapshotEntry,
};
use crate::{splice, vectored};

/// Connection settings for a [`RemoteReplica`].
#[derive(Clone, Copy, Debug)]
pub struct RemoteOptions {
    /// Bound on connecting and on the handshake.
    pub connect_timeout: Duration,
    /// Bound on any single request.
    pub request_timeout: Duration,
    /// Read a local replica's head files directly where it offers them
    /// (see [`crate::local`]).
    pub local_reads: bool,
}

impl Default for RemoteOptions {
    fn default() -> RemoteOptions {
        RemoteOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            local_reads: true,
        }
    }
}

struct Outgoing {
    header: [u8; wire::REQUEST_LEN],
    data: Payload,
}

/// What a waiting request gets.
enum Reply {
    Answer(Response),
    /// A successful READ's data, spliced into the request's pipe.
    Piped(Piped),
    /// No answer within the request's bound (see [`Conn::tick`]).
    TimedOut,
}

/// A request waiting for its answer.
struct Waiter {
    tx: oneshot::Sender<Reply>,
    /// [`Conn::tick`] when it was sent.
    sent: u64,
    /// Ticks after which it has timed out.
    ticks: u64,
    /// For a piped READ: the pipe its data goes into, and the length.
    sink: Option<(Piped, usize)>,
}

type Pending = HashMap<u64, Waiter>;

struct Conn {
    tx: mpsc::UnboundedSender<Outgoing>,
    pending: Mutex<Pending>,
    /// Set (under the `pending` lock) once the connection is dead.
    closed: AtomicBool,
    next_tag: AtomicU64,
    /// A coarse clock for request timeouts, advanced every `tick_len` by
    /// the connection's sweeper task, which fails the requests that have
    /// waited too long. Cheaper than a timer per request (registering one
    /// and reading the clock for every I/O).
    tick: AtomicU64,
    tick_len: Duration,
    /// Piped READs waiting: while there are any, the reader takes exactly
    /// one frame at a time, so that their payloads stay in the socket for
    /// splicing instead of being read into memory with earlier frames.
    piped: AtomicUsize,
    /// Descriptors that came with the replica's answers: the layer files
    /// of an [`Opcode::LocalFiles`] answer, taken by its asker.
    files: Mutex<Vec<OwnedFd>>,
}

impl Conn {
    /// Ticks to wait for a request bounded by `timeout`: at least
    /// `timeout` (the request may be sent just before a tick), at most
    /// `timeout` plus two ticks.
    fn ticks_for(&self, timeout: Duration) -> u64 {
        let n = timeout.as_nanos().div_ceil(self.tick_len.as_nanos().max(1));
        u64::try_from(n).unwrap_or(u64::MAX / 2).saturating_add(1)
    }

    /// Fails the requests that have waited their bound.
    fn expire(&self, now: u64) {
        let mut pending = self.pending.lock().expect("pending poisoned");
        let expired: Vec<u64> = pending
            .iter()
            .filter(|(_, w)| now.saturating_sub(w.sent) >= w.ticks)
            .map(|(&tag, _)| tag)
            .collect();
        for tag in expired {
            if let Some(w) = pending.remove(&tag) {
                let _ = w.tx.send(Reply::TimedOut);
            }
        }
    }

    fn shut(&self) {
        let mut pending = self.pending.lock().expect("pending poisoned");
        self.closed.store(true, Ordering::SeqCst);
        // Dropping the senders wakes every waiter with a receive error.
        pending.clear();
    }
}

/// Counts a piped READ for as long as it waits.
struct PipedGuard<'a>(&'a AtomicUsize);

impl Drop for PipedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Clears a flag when dropped: an ask for layer files ends, however it ends.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// A shared WRITE payload until its replica answers; dropped without an
/// answer (time-out, lost connection, dropped future), it is leaked.
struct SharedHold<'a> {
    pool: &'a ShmPool,
    data: Option<Bytes>,
}

impl SharedHold<'_> {
    /// The replica answered: it no longer reads the payload.
    fn answered(mut self) {
        self.data = None;
    }
}

impl Drop for SharedHold<'_> {
    fn drop(&mut self) {
        if let Some(data) = self.data.take() {
            self.pool.leak(data);
        }
    }
}

/// Whether a request ended without the replica's answer (it may still be
/// working on it).
fn unanswered<T>(result: &Result<T>) -> bool {
    matches!(result, Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::Disconnected))
}

/// A shared READ buffer until its replica answers; dropped before that
/// (time-out, lost connection, dropped future), it is retired.
struct SharedRead<'a> {
    pool: &'a ShmPool,
    buf: Option<ShmBuf>,
}

impl Drop for SharedRead<'_> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.leak_buf(buf);
        }
    }
}

/// Removes a request's pending entry if its future is dropped early.
struct PendingGuard<'a> {
    conn: &'a Conn,
    tag: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.conn.pending.lock() {
            p.remove(&self.tag);
        }
    }
}

/// A replica reached over TCP. See the module documentation.
pub struct RemoteReplica {
    addr: String,
    size: u64,
    epoch: u64,
    meta: Option<ReplicaMeta>,
    opts: RemoteOptions,
    conn: Arc<Conn>,
    /// READ replies can be spliced out of the connection (a Unix socket).
    pipes: bool,
    /// The payload memory the replica mapped, if it did.
    shm: Option<Arc<ShmPool>>,
    /// Shared WRITEs may carry their block crcs ([`wire::FLAG_BLOCK_CRCS`]).
    block_crcs: bool,
    /// WRITEs may carry [`wire::FLAG_FAN_OUT`].
    fan_out: bool,
    /// Memory this replica puts READ replies in, if it mapped it.
    reads: Option<Arc<ShmPool>>,
    /// The replica's layer files, while it lets us read them directly.
    local: std::sync::RwLock<Option<Arc<LocalFiles>>>,
    /// The replica hands its layer files out on request
    /// ([`Opcode::LocalFiles`]), and we read them where it does.
    asks_files: bool,
    /// An [`Opcode::LocalFiles`] request is on its way.
    asking: AtomicBool,
    /// No new request for layer files before then (one was refused).
    next_ask: Mutex<Option<Instant>>,
    /// Reads served by layer files since replaced.
    served_before: AtomicU64,
}

impl std::fmt::Debug for RemoteReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteReplica").field("addr", &self.addr).field("size", &self.size).finish()
    }
}

/// Prefix of a replica address that names a Unix domain socket
/// (`unix:/path`) instead of a TCP `host:port`: the same protocol, for a
/// replica on the same machine, at a fraction of loopback TCP's cost per
/// message.
pub const UNIX_PREFIX: &str = "unix:";

/// A connection to a replica.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

async fn open_stream(addr: &str, opts: &RemoteOptions) -> Result<Stream> {
    let connect = async {
        match addr.strip_prefix(UNIX_PREFIX) {
            Some(path) => UnixStream::connect(path).await.map(Stream::Unix),
            None => {
                let stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                Ok(Stream::Tcp(stream))
            }
        }
    };
    tokio::time::timeout(opts.connect_timeout, connect)
        .await
        .map_err(|_| Error::new(ErrorKind::TimedOut, format!("connecting to replica {addr}")))?
        .map_err(|e| Error::new(ErrorKind::Disconnected, format!("connecting to replica {addr}: {e}")))
}

async fn handshake(stream: &mut Stream, hello: &Hello, opts: &RemoteOptions) -> Result<HelloReply> {
    // Descriptors only come with an attach that shared memory.
    handshake_sharing(stream, hello, opts, &[]).await.map(|(reply, _)| reply)
}

/// The handshake; over a Unix socket, the descriptors `shm` go along with
/// the Hello, and those the replica sends come back with its reply.
async fn handshake_sharing(
    stream: &mut Stream,
    hello: &Hello,
    opts: &RemoteOptions,
    shm: &[BorrowedFd<'_>],
) -> Result<(HelloReply, Vec<OwnedFd>)> {
    match stream {
        Stream::Tcp(s) => exchange_hello(s, hello, opts, &[]).await,
        Stream::Unix(s) => exchange_hello(s, hello, opts, shm).await,
    }
}

/// Sends all of `bytes` with `fds` attached (`SCM_RIGHTS`).
async fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let sent = loop {
        stream.writable().await?;
        match stream.try_io(tokio::io::Interest::WRITABLE, || crate::fdpass::send(stream.as_fd(), bytes, fds))
        {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    // The descriptors went with the first bytes; the rest is plain data.
    let mut rest = &bytes[sent..];
    while !rest.is_empty() {
        stream.writable().await?;
        match stream.try_write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A stream the Hello may go over; a Unix socket can carry descriptors.
trait HelloStream: AsyncRead + AsyncWrite + Unpin {
    async fn send_hello(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        let _ = fds;
        self.write_all(bytes).await
    }

    /// Reads more of the reply into `buf`, adding any descriptors that
    /// came with it to `fds`; 0 at the end of the stream.
    async fn recv_hello(&mut self, buf: &mut BytesMut, fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
        let _ = fds;
        self.read_buf(buf).await
    }
}

impl HelloStream for TcpStream {}

impl HelloStream for UnixStream {
    async fn send_hello(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        if fds.is_empty() { self.write_all(bytes).await } else { send_with_fds(self, bytes, fds).await }
    }

    async fn recv_hello(&mut self, buf: &mut BytesMut, fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
        let mut chunk = [0u8; 1024];
        loop {
            self.readable().await?;
            match self.try_io(tokio::io::Interest::READABLE, || crate::fdpass::recv(self.as_fd(), &mut chunk))
            {
                Ok((n, got)) => {
                    buf.extend_from_slice(&chunk[..n]);
                    fds.extend(got);
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

async fn exchange_hello<S: HelloStream>(
    stream: &mut S,
    hello: &Hello,
    opts: &RemoteOptions,
    shm: &[BorrowedFd<'_>],
) -> Result<(HelloReply, Vec<OwnedFd>)> {
    let exchange = async {
        let mut out = BytesMut::new();
        wire::encode_hello(hello, &mut out)?;
        stream.send_hello(&out, shm).await?;
        let mut buf = BytesMut::with_capacity(512);
        let mut fds = Vec::new();
        loop {
            if let Some(reply) = wire::decode_hello_reply(&mut buf)? {
                return Ok((reply, fds));
            }
            if stream.recv_hello(&mut buf, &mut fds).await? == 0 {
                return Err(Error::new(ErrorKind::Disconnected, "replica closed during handshake"));
            }
        }
    };
    tokio::time::timeout(opts.connect_timeout, exchange)
        .await
        .map_err(|_| Error::new(ErrorKind::TimedOut, "replica handshake"))?
        .map_err(|e: Error| e.with_op(Op::Handshake))
}

/// Asks a replica who it is (volume, size, epoch) without binding it.
pub async fn probe(addr: &str, opts: &RemoteOptions) -> Result<HelloReply> {
    let mut stream = open_stream(addr, opts).await?;
    let hello = Hello {
        version: wire::PROTOCOL_VERSION,
        mode: HelloMode::Probe,
        size: 0,
        epoch: 0,
        volume: "?".into(),
    };
    handshake(&mut stream, &hello, opts).await
}

impl RemoteReplica {
    /// Connects and attaches to the replica at `addr` as controller `epoch`
    /// of `volume`. Fails if the replica is fenced by a newer epoch, belongs
    /// to another volume, or has another size.
    pub async fn connect(
        addr: &str,
        volume: &str,
        size: u64,
        epoch: u64,
        opts: RemoteOptions,
    ) -> Result<RemoteReplica> {
        RemoteReplica::connect_shared(addr, volume, size, epoch, opts, None).await
    }

    /// Like [`RemoteReplica::connect`], offering a replica on this machine
    /// the payload memory `shm`; large WRITEs whose payload is in it are
    /// then sent as references if the replica accepts.
    pub async fn connect_shared(
        addr: &str,
        volume: &str,
        size: u64,
        epoch: u64,
        opts: RemoteOptions,
        shm: Option<Arc<ShmPool>>,
    ) -> Result<RemoteReplica> {
        let mut stream = open_stream(addr, &opts).await?;
        let hello = Hello {
            version: wire::PROTOCOL_VERSION,
            mode: HelloMode::Attach,
            size,
            epoch,
            volume: volume.to_string(),
        };
        // Memory for this connection's READ replies, next to the shared
        // memory for WRITE payloads.
        let reads = match &shm {
            Some(_) if matches!(stream, Stream::Unix(_)) => ShmPool::new(READ_POOL_BYTES)
                .map_err(|e| tracing::warn!("no shared memory for reads from {addr}: {e}"))
                .ok(),
            _ => None,
        };
        let fds: Vec<BorrowedFd<'_>> = shm.iter().chain(reads.iter()).map(|p| p.fd()).collect();
        let (reply, local_fds) = handshake_sharing(&mut stream, &hello, &opts, &fds).await?;
        drop(fds);
        if let Some(err) = reply.error() {
            return Err(err.with_op(Op::Handshake));
        }
        let shm = shm.filter(|_| reply.flags & wire::HELLO_SHM != 0);
        let reads = reads.filter(|_| reply.flags & wire::HELLO_SHM_READ != 0);
        let block_crcs = shm.is_some() && reply.flags & wire::HELLO_BLOCK_CRCS != 0;
        let local = match reply.flags & wire::HELLO_LOCAL_READS != 0 && opts.local_reads {
            true => LocalFiles::open(local_fds, true)
                .map(Arc::new)
                .map_err(|e| tracing::warn!("not reading replica {addr}'s files directly: {e}"))
                .ok(),
            false => None,
        };
        if reply.size != size {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("replica {addr} has size {} but the volume has {size}", reply.size),
            ));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = Arc::new(Conn {
            tx,
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            next_tag: AtomicU64::new(1),
            tick: AtomicU64::new(0),
            tick_len: (opts.request_timeout / TICKS_PER_TIMEOUT).max(MIN_TICK),
            piped: AtomicUsize::new(0),
            files: Mutex::new(Vec::new()),
        });
        tokio::spawn(sweep(conn.clone()));
        let pipes = matches!(stream, Stream::Unix(_));
        match stream {
            Stream::Tcp(s) => {
                let (rd, wr) = s.into_split();
                tokio::spawn(write_loop(conn.clone(), rx, wr, None));
                tokio::spawn(read_loop(conn.clone(), rd));
            }
            Stream::Unix(s) => {
                use std::os::fd::AsFd;
                // Large WRITE payloads go to a local replica without a copy.
                let zc = splice::ZeroCopy::new(s.as_fd());
                let (rd, wr) = s.into_split();
                tokio::spawn(write_loop(conn.clone(), rx, wr, zc));
                tokio::spawn(read_loop(conn.clone(), rd));
            }
        }
        Ok(RemoteReplica {
            addr: addr.to_string(),
            size,
            epoch,
            meta: reply.meta,
            opts,
            conn,
            pipes,
            shm,
            block_crcs,
            fan_out: reply.flags & wire::HELLO_FAN_OUT != 0,
            asks_files: opts.local_reads && reads.is_some() && reply.flags & wire::HELLO_LOCAL_FILES != 0,
            reads,
            local: std::sync::RwLock::new(local),
            asking: AtomicBool::new(false),
            next_ask: Mutex::new(None),
            served_before: AtomicU64::new(0),
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether large WRITEs whose payload is in the shared pool go as
    /// references (the replica mapped the pool at the handshake).
    pub fn shares_memory(&self) -> bool {
        self.shm.is_some()
    }

    /// Whether shared WRITEs carry their block crcs where the volume had
    /// them computed ([`wire::FLAG_BLOCK_CRCS`]).
    pub fn sends_block_crcs(&self) -> bool {
        self.block_crcs
    }

    /// Whether READs come back through memory shared with the replica.
    pub fn shares_reads(&self) -> bool {
        self.reads.is_some()
    }

    /// Bytes of read memory retired because reads into them ended without
    /// an answer (see [`crate::shm`]).
    pub fn retired_read_bytes(&self) -> u64 {
        self.reads.as_ref().map_or(0, |p| p.leaked_bytes())
    }

    /// False once the connection has broken.
    pub fn is_connected(&self) -> bool {
        !self.conn.closed.load(Ordering::SeqCst)
    }

    /// Closes the connection; waiting requests fail.
    pub fn disconnect(&self) {
        self.conn.shut();
    }

    /// The replica's metadata as of the handshake.
    pub fn attach_meta(&self) -> Option<&ReplicaMeta> {
        self.meta.as_ref()
    }

    async fn call(&self, opcode: Opcode, flags: u8, offset: u64, length: u64, data: Bytes) -> Result<Bytes> {
        let req = Request { opcode, flags, tag: 0, offset, length, generation: 0, crc: 0, data };
        self.send(req).await
    }

    async fn send(&self, req: Request) -> Result<Bytes> {
        self.send_within(req, self.opts.request_timeout).await
    }

    /// Like `send`, with its own bound on the answer (for slow requests).
    async fn send_within(&self, req: Request, timeout: Duration) -> Result<Bytes> {
        match self.exchange(req, timeout, None).await? {
            Payload::Bytes(b) => Ok(b),
            // Only requests with a sink get piped answers.
            Payload::Piped(p) => p.into_bytes().map_err(Error::from),
        }
    }

    /// Sends `req` and waits for its answer; a READ with a `sink` gets its
    /// data spliced into that pipe (or, where that fails, in memory).
    async fn exchange(&self, req: Request, timeout: Duration, sink: Option<Piped>) -> Result<Payload> {
        self.exchange_with(req, None, timeout, sink).await
    }

    /// [`RemoteReplica::exchange`], with the payload in `piped` (sent
    /// spliced) instead of `req.data` where given.
    async fn exchange_with(
        &self,
        mut req: Request,
        piped: Option<Piped>,
        timeout: Duration,
        sink: Option<Piped>,
    ) -> Result<Payload> {
        let (opcode, offset) = (req.opcode, req.offset);
        let op = match opcode {
            Opcode::Read | Opcode::GetStamps => Op::Read,
            Opcode::Write => Op::Write,
            Opcode::Flush | Opcode::Ping => Op::Flush,
            Opcode::Trim => Op::Trim,
            Opcode::WriteZeroes => Op::WriteZeroes,
            Opcode::BlockStatus => Op::BlockStatus,
            Opcode::GetMeta | Opcode::SetMembership | Opcode::SetRebuild => Op::Handshake,
            Opcode::SnapCreate | Opcode::SnapDelete | Opcode::SnapRevert | Opcode::SnapList => Op::Snapshot,
            Opcode::SnapRead => Op::Read,
            Opcode::SnapStatus | Opcode::SnapLayerStatus => Op::BlockStatus,
            Opcode::SnapTruncate => Op::Snapshot,
            Opcode::LocalFiles => Op::Read,
        };
        let conn = &*self.conn;
        let tag = conn.next_tag.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done_rx) = oneshot::channel();
        let _piped = sink.is_some().then(|| {
            conn.piped.fetch_add(1, Ordering::Relaxed);
            PipedGuard(&conn.piped)
        });
        let waiter = Waiter {
            tx: done_tx,
            sent: conn.tick.load(Ordering::Relaxed),
            ticks: conn.ticks_for(timeout),
            sink: sink.map(|p| (p, req.length as usize)),
        };
        {
            let mut pending = conn.pending.lock().expect("pending poisoned");
            if conn.closed.load(Ordering::SeqCst) {
                return Err(self.disconnected(op));
            }
            pending.insert(tag, waiter);
        }
        let _guard = PendingGuard { conn, tag };
        req.tag = tag;
        let (header, data) = match piped {
            Some(p) => (wire::request_header_sized(&req, p.len() as u64), Payload::Piped(p)),
            None => (wire::request_header(&req), Payload::Bytes(req.data)),
        };
        if conn.tx.send(Outgoing { header, data }).is_err() {
            conn.shut();
            return Err(self.disconnected(op));
        }
        match done_rx.await {
            Ok(Reply::Answer(resp)) => {
                resp.into_result().map(Payload::Bytes).map_err(|e| e.with_op(op).at(offset))
            }
            Ok(Reply::Piped(p)) => Ok(Payload::Piped(p)),
            Err(_) => Err(self.disconnected(op)),
            Ok(Reply::TimedOut) => Err(Error::new(
                ErrorKind::TimedOut,
                format!("replica {} did not answer within {timeout:?}", self.addr),
            )
            .with_op(op)
            .at(offset)),
        }
    }

    /// A READ answered through the connection's read memory; `None` where
    /// there is none for it (too small, not shared, or the pool is full).
    async fn read_shared(&self, offset: u64, len: usize) -> Option<Result<Bytes>> {
        if len < MIN_SHM_READ_BYTES {
            return None;
        }
        let pool = self.reads.as_ref()?;
        let buf = pool.alloc(len)?;
        let req = Request {
            flags: wire::FLAG_SHM,
            data: Bytes::copy_from_slice(&buf.offset().to_be_bytes()),
            ..Request::simple(Opcode::Read, 0, offset, len as u64)
        };
        // The replica writes into the buffer until it answers; without an
        // answer it is retired (see `crate::shm`).
        let mut hold = SharedRead { pool, buf: Some(buf) };
        let result = self.send(req).await;
        if unanswered(&result) {
            return Some(result.map(|_| Bytes::new()));
        }
        let mut buf = hold.buf.take().expect("held until here");
        Some(result.and_then(|answer| {
            if !answer.is_empty() {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("replica {} sent data for a shared read", self.addr),
                )
                .with_op(Op::Read)
                .at(offset));
            }
            buf.advance(len);
            Ok(buf.freeze())
        }))
    }

    /// A READ served from the replica's head files directly (see
    /// [`crate::local`]); `None` where it must go over the socket.
    async fn read_local(&self, offset: u64, len: usize) -> Option<Bytes> {
        if len <= crate::local::INLINE_LOCAL_READ {
            return self.read_at_once(offset, len);
        }
        if !self.reads_at_once(len) {
            return None;
        }
        let local = self.local_files()?;
        // Large: copied and checked on the blocking pool, beside the
        // runtime thread's other work.
        tokio::task::spawn_blocking(move || local.read(offset, len)).await.ok().flatten()
    }

    /// The layer files we may read, if any (maybe revoked since).
    fn local_files(&self) -> Option<Arc<LocalFiles>> {
        self.local_guard().clone()
    }

    /// The layer files under a read lock, for calls that need no `Arc` of
    /// their own (no reference-count traffic on every read).
    fn local_guard(&self) -> std::sync::RwLockReadGuard<'_, Option<Arc<LocalFiles>>> {
        self.local.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// READs served from the replica's layer files directly so far.
    pub fn local_reads(&self) -> u64 {
        let local = self.local.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.served_before.load(Ordering::Relaxed) + local.as_ref().map_or(0, |l| l.served())
    }

    /// Whether this connection reads the replica's layer files directly now.
    pub fn reads_locally(&self) -> bool {
        self.local_guard().as_ref().is_some_and(|l| l.is_valid()) && self.is_connected()
    }

    /// How many layers the files we read cover, and whether that is the
    /// whole chain; `None` while we read none.
    pub fn local_layers(&self) -> Option<(usize, bool)> {
        self.local_files().filter(|l| l.is_valid()).map(|l| l.layers())
    }

    /// Asks the replica for its layer files where it hands them out and
    /// those we had were revoked (the chain changed: a snapshot, say) or
    /// never came (the chain was more than the head at the handshake).
    /// One request at a time; after a refusal, none for [`ASK_BACKOFF`].
    /// Fails only where the answer was that a newer controller fenced
    /// this one: that is the read's answer too.
    async fn refresh_files(&self) -> Result<()> {
        if !self.asks_files || self.reads_locally() || !self.is_connected() {
            return Ok(());
        }
        if self.asking.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let _asking = ClearOnDrop(&self.asking);
        let lock = || self.next_ask.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if lock().is_some_and(|at| Instant::now() < at) {
            return Ok(());
        }
        // Boxed: the ask is rare, and every read's future would otherwise
        // carry room for a whole request's.
        match Box::pin(self.ask_files()).await {
            Ok(files) => {
                let mut local = self.local.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(old) = local.replace(Arc::new(files)) {
                    self.served_before.fetch_add(old.served(), Ordering::Relaxed);
                }
            }
            Err(e) if e.kind() == ErrorKind::Fenced => return Err(e),
            Err(e) => {
                tracing::debug!("replica {} lends no layer files now: {e}", self.addr);
                *lock() = Some(Instant::now() + ASK_BACKOFF);
            }
        }
        Ok(())
    }

    async fn ask_files(&self) -> Result<LocalFiles> {
        // Any left over came with the answer to an ask that timed out.
        self.conn.files.lock().expect("files poisoned").clear();
        let answer = self.call(Opcode::LocalFiles, 0, 0, 0, Bytes::new()).await?;
        let fds = std::mem::take(&mut *self.conn.files.lock().expect("files poisoned"));
        let bad = |what: String| Error::new(ErrorKind::Protocol, what).with_op(Op::Read);
        let answer = wire::LocalFilesAnswer::decode(&answer).map_err(|e| bad(e.to_string()))?;
        if fds.len() != 2 * usize::from(answer.layers) + 1 {
            return Err(bad(format!("{} descriptors came for {} layers", fds.len(), answer.layers)));
        }
        LocalFiles::open(fds, answer.whole).map_err(|e| bad(e.to_string()))
    }

    fn check_read_len(&self, offset: u64, len: usize, got: usize) -> Result<()> {
        if got != len {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!("replica {} returned {got} bytes for a {len}-byte read", self.addr),
            )
            .with_op(Op::Read)
            .at(offset));
        }
        Ok(())
    }

    fn disconnected(&self, op: Op) -> Error {
        Error::new(ErrorKind::Disconnected, format!("connection to replica {} is closed", self.addr))
            .with_op(op)
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    conn: Arc<Conn>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    wr: W,
    mut zc: Option<splice::ZeroCopy>,
) {
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    let result: std::io::Result<()> = async {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some(msg) = next {
                match msg.data {
                    Payload::Bytes(data) => {
                        vectored::send_frame(&mut w, zc.as_mut(), &msg.header, data).await?
                    }
                    Payload::Piped(pipe) => {
                        vectored::send_piped(&mut w, zc.as_mut(), &msg.header, pipe).await?
                    }
                }
                next = rx.try_recv().ok();
            }
            w.flush().await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::debug!("replica connection write failed: {e}");
    }
    conn.shut();
    let _ = w.into_inner().shutdown().await;
    if let Some(zc) = zc {
        zc.close().await;
    }
}

/// Request timeouts are checked this many times per `request_timeout`.
const TICKS_PER_TIMEOUT: u32 = 16;
/// Shortest interval between timeout checks.
const MIN_TICK: Duration = Duration::from_millis(1);

/// Advances the connection's timeout clock and fails the requests that
/// have waited too long, until the connection closes.
async fn sweep(conn: Arc<Conn>) {
    let mut every = tokio::time::interval(conn.tick_len);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    while !conn.closed.load(Ordering::SeqCst) {
        every.tick().await;
        let now = conn.tick.fetch_add(1, Ordering::Relaxed) + 1;
        conn.expire(now);
    }
}

/// The receiving half of a replica connection, and whether payloads can
/// be spliced out of it.
trait Incoming: AsyncRead + Unpin {
    fn splice_source(&self) -> Option<pipe::Socket<'_>>;

    /// Reads more into `buf`; descriptors that came along go to `fds`.
    async fn read_more<B: BufMut>(
        &mut self,
        buf: &mut B,
        fds: &Mutex<Vec<OwnedFd>>,
    ) -> std::io::Result<usize> {
        let _ = fds;
        self.read_buf(buf).await
    }
}

impl Incoming for tokio::net::tcp::OwnedReadHalf {
    fn splice_source(&self) -> Option<pipe::Socket<'_>> {
        None
    }
}

impl Incoming for tokio::net::unix::OwnedReadHalf {
    fn splice_source(&self) -> Option<pipe::Socket<'_>> {
        Some(pipe::Socket::Unix(self.as_ref()))
    }

    async fn read_more<B: BufMut>(
        &mut self,
        buf: &mut B,
        fds: &Mutex<Vec<OwnedFd>>,
    ) -> std::io::Result<usize> {
        let sock: &UnixStream = self.as_ref();
        loop {
            sock.readable().await?;
            match sock.try_io(tokio::io::Interest::READABLE, || crate::fdpass::recv_buf(sock.as_fd(), buf)) {
                Ok((n, got)) => {
                    if !got.is_empty() {
                        let mut fds = fds.lock().expect("files poisoned");
                        // At most a stale answer's and the awaited one's:
                        // a replica that sends more gets them closed.
                        if fds.len() + got.len() <= 2 * crate::fdpass::MAX_FDS {
                            fds.extend(got);
                        }
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// The pipe of the waiting piped READ `tag`, if its answer is a success of
/// the length it asked for (anything else is answered from memory).
fn take_sink(conn: &Conn, tag: u64, status: u16, length: usize) -> Option<Piped> {
    if status != 0 {
        return None;
    }
    let mut pending = conn.pending.lock().expect("pending poisoned");
    let waiter = pending.get_mut(&tag)?;
    match &waiter.sink {
        Some((_, want)) if *want == length => waiter.sink.take().map(|(p, _)| p),
        _ => None,
    }
}

/// Receives a `length`-byte payload whose first bytes are `prefix` (read
/// with the header) into `pipe`, splicing the rest out of the socket; in
/// memory where the pipe runs out of room.
async fn receive_piped<R: Incoming>(
    rd: &mut R,
    mut pipe: Piped,
    prefix: &[u8],
    length: usize,
) -> Result<Payload> {
    let mut copied = Vec::new();
    if pipe.push_bytes(prefix)? == Filled::Done {
        let rest = length - prefix.len();
        let filled = match rd.splice_source() {
            Some(src) => pipe::fill_from_socket(&mut pipe, src, rest).await?,
            None => Filled::Full(0),
        };
        match filled {
            Filled::Done => return Ok(Payload::Piped(pipe)),
            Filled::Full(_) => copied.extend_from_slice(&pipe.into_bytes()?),
        }
    } else {
        copied.extend_from_slice(&pipe.into_bytes()?);
    }
    // The copying fallback: what the pipe took, then the rest.
    if copied.len() < prefix.len() {
        copied.extend_from_slice(&prefix[copied.len()..]);
    }
    let have = copied.len();
    copied.resize(length, 0);
    rd.read_exact(&mut copied[have..]).await?;
    Ok(Payload::Bytes(Bytes::from(copied)))
}

async fn read_loop<R: Incoming>(conn: Arc<Conn>, mut rd: R) {
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let result: Result<()> = async {
        loop {
            while let Some((tag, status, length)) = wire::decode_response_head(&buf)? {
                if let Some(pipe) = take_sink(&conn, tag, status, length) {
                    buf.advance(wire::RESPONSE_LEN);
                    let prefix = buf.split_to(buf.len().min(length));
                    let payload = receive_piped(&mut rd, pipe, &prefix, length).await?;
                    let waiter = conn.pending.lock().expect("pending poisoned").remove(&tag);
                    if let Some(waiter) = waiter {
                        let _ = waiter.tx.send(match payload {
                            Payload::Piped(p) => Reply::Piped(p),
                            Payload::Bytes(b) => Reply::Answer(Response::ok(tag, b)),
                        });
                    }
                    continue;
                }
                let Some(resp) = wire::decode_response(&mut buf)? else { break };
                let waiter = conn.pending.lock().expect("pending poisoned").remove(&resp.tag);
                if let Some(waiter) = waiter {
                    let _ = waiter.tx.send(Reply::Answer(resp));
                }
            }
            let frame = wire::response_frame_len(&buf)?;
            wire::reserve_frame(&mut buf, frame, 64 * 1024);
            let got = if conn.piped.load(Ordering::Relaxed) > 0 {
                // One frame at a time (see `Conn::piped`): the rest of this
                // header, or of this frame.
                let need = frame.unwrap_or(wire::RESPONSE_LEN) - buf.len();
                rd.read_more(&mut bytes::BufMut::limit(&mut buf, need), &conn.files).await?
            } else {
                rd.read_more(&mut buf, &conn.files).await?
            };
            if got == 0 {
                return Err(Error::new(ErrorKind::Disconnected, "replica closed the connection"));
            }
            if conn.closed.load(Ordering::SeqCst) {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(e) = result {
        tracing::debug!("replica connection read ended: {e}");
    }
    conn.shut();
}

impl Drop for RemoteReplica {
    fn drop(&mut self) {
        self.conn.shut();
    }
}

impl BlockDevice for RemoteReplica {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::full()
    }

    async fn read_payload(&self, offset: u64, len: usize) -> Result<Payload> {
        self.refresh_files().await?;
        if let Some(data) = self.read_local(offset, len).await {
            return Ok(Payload::Bytes(data));
        }
        if let Some(data) = self.read_shared(offset, len).await {
            return data.map(Payload::Bytes);
        }
        let sink = if self.pipes && (pipe::MIN_PIPED_BYTES..=pipe::MAX_PIPED_BYTES).contains(&len) {
            Piped::with_capacity(len).map_err(|e| tracing::debug!("no pipe for a read: {e}")).ok()
        } else {
            None
        };
        let Some(sink) = sink else { return self.read(offset, len).await.map(Payload::Bytes) };
        let req = Request { flags: wire::FLAG_PIPE, ..Request::simple(Opcode::Read, 0, offset, len as u64) };
        let data = self.exchange(req, self.opts.request_timeout, Some(sink)).await?;
        self.check_read_len(offset, len, data.len())?;
        Ok(data)
    }

    fn read_at_once(&self, offset: u64, len: usize) -> Option<Bytes> {
        let local = self.local_guard();
        let local = local.as_ref()?;
        // A replica that went away can no longer revoke the files.
        if !self.is_connected() {
            return None;
        }
        local.read(offset, len)
    }

    fn reads_at_once(&self, len: usize) -> bool {
        len <= crate::local::MAX_LOCAL_READ && self.reads_locally()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.refresh_files().await?;
        if let Some(data) = self.read_local(offset, len).await {
            return Ok(data);
        }
        if let Some(data) = self.read_shared(offset, len).await {
            return data;
        }
        let data = self.call(Opcode::Read, 0, offset, len as u64, Bytes::new()).await?;
        self.check_read_len(offset, len, data.len())?;
        Ok(data)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.write_at(offset, data, fua, 0, None).await
    }

    async fn flush(&self) -> Result<()> {
        self.call(Opcode::Flush, 0, 0, 0, Bytes::new()).await.map(|_| ())
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.trim_at(offset, len, fua, 0).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, zf: ZeroFlags) -> Result<()> {
        self.zeroes_at(offset, len, zf, 0).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let payload = self.call(Opcode::BlockStatus, 0, offset, len, Bytes::new()).await?;
        Ok(wire::decode_extents(&payload)?)
    }
}

impl RemoteReplica {
    /// A WRITE with `flags` (FUA, CRC, FAN_OUT); the payload goes through
    /// shared memory where it lies there.
    async fn write_flagged(
        &self,
        offset: u64,
        data: Bytes,
        flags: u8,
        generation: u64,
        crc: Option<u32>,
    ) -> Result<()> {
        let mut req = Request {
            opcode: Opcode::Write,
            flags,
            tag: 0,
            offset,
            length: data.len() as u64,
            generation,
            crc: crc.unwrap_or(0),
            data,
        };
        let Some((pool, at)) = self.shm.as_ref().and_then(|p| Some((p, p.locate(&req.data)?))) else {
            return self.send(req).await.map(drop);
        };
        // Only the payload's place goes over the socket. Its memory must
        // stay as it is until the replica has answered; without an answer
        // it is retired (see `crate::shm`).
        req.flags |= wire::FLAG_SHM;
        // The block crcs, where the volume had them computed for all its
        // replicas (the replica computes them otherwise).
        let aligned = offset.is_multiple_of(u64::from(crate::BLOCK_SIZE));
        let crcs =
            (crc.is_none() && self.block_crcs && aligned).then(|| pool.block_crcs(&req.data)).flatten();
        let frame = match crcs {
            Some(crcs) => {
                req.flags |= wire::FLAG_BLOCK_CRCS;
                let mut frame = BytesMut::with_capacity(shm::REF_LEN + crcs.len());
                frame.put_u64(at);
                frame.put_slice(&crcs);
                frame.freeze()
            }
            None => Bytes::copy_from_slice(&at.to_be_bytes()),
        };
        let data = std::mem::replace(&mut req.data, frame);
        let hold = SharedHold { pool, data: Some(data) };
        let result = self.send(req).await;
        if !unanswered(&result) {
            hold.answered();
        }
        result.map(drop)
    }
}

impl Replica for RemoteReplica {
    fn shares_payload_memory(&self) -> bool {
        self.shares_memory()
    }

    async fn write_at(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
        generation: u64,
        crc: Option<u32>,
    ) -> Result<()> {
        let mut flags = if fua { wire::FLAG_FUA } else { 0 };
        if crc.is_some() {
            flags |= wire::FLAG_CRC;
        }
        self.write_flagged(offset, data, flags, generation, crc).await
    }

    async fn fan_out_write_at(&self, offset: u64, data: Bytes, fua: bool, generation: u64) -> Result<()> {
        let mut flags = if fua { wire::FLAG_FUA } else { 0 };
        if self.fan_out {
            flags |= wire::FLAG_FAN_OUT;
        }
        self.write_flagged(offset, data, flags, generation, None).await
    }

    async fn write_piped_at(&self, offset: u64, data: Piped, fua: bool, generation: u64) -> Result<()> {
        let flags = if fua { wire::FLAG_FUA } else { 0 };
        let length = data.len() as u64;
        let req = Request { flags, generation, ..Request::simple(Opcode::Write, 0, offset, length) };
        self.exchange_with(req, Some(data), self.opts.request_timeout, None).await.map(drop)
    }

    async fn trim_at(&self, offset: u64, len: u64, fua: bool, generation: u64) -> Result<()> {
        let flags = if fua { wire::FLAG_FUA } else { 0 };
        let req = Request { flags, generation, ..Request::simple(Opcode::Trim, 0, offset, len) };
        self.send(req).await.map(drop)
    }

    async fn zeroes_at(&self, offset: u64, len: u64, zf: ZeroFlags, generation: u64) -> Result<()> {
        let mut flags = 0;
        if zf.fua {
            flags |= wire::FLAG_FUA;
        }
        if zf.no_hole {
            flags |= wire::FLAG_NO_HOLE;
        }
        let req = Request { flags, generation, ..Request::simple(Opcode::WriteZeroes, 0, offset, len) };
        self.send(req).await.map(drop)
    }

    async fn ping(&self) -> Result<()> {
        self.call(Opcode::Ping, 0, 0, 0, Bytes::new()).await.map(drop)
    }

    async fn meta(&self) -> Result<ReplicaMeta> {
        let payload = self.call(Opcode::GetMeta, 0, 0, 0, Bytes::new()).await?;
        Ok(wire::decode_meta(&payload)?)
    }

    async fn set_membership(&self, m: &Membership) -> Result<()> {
        let mut b = BytesMut::new();
        wire::encode_membership(m, &mut b);
        self.call(Opcode::SetMembership, 0, 0, 0, b.freeze()).await.map(drop)
    }

    async fn set_rebuild(&self, mark: Option<&RebuildMark>) -> Result<()> {
        let mut b = BytesMut::new();
        if let Some(m) = mark {
            wire::encode_rebuild(m, &mut b);
        }
        self.call(Opcode::SetRebuild, 0, 0, 0, b.freeze()).await.map(drop)
    }

    async fn stamps(&self, first: u64, count: u64) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(count as usize);
        let mut at = first;
        while at < first + count {
            let n = (first + count - at).min(wire::MAX_STAMPS);
            let payload = self.call(Opcode::GetStamps, 0, at, n, Bytes::new()).await?;
            let got = wire::decode_stamps(&payload)?;
            if got.len() as u64 != n {
                return Err(Error::new(ErrorKind::Protocol, "wrong number of stamps"));
            }
            out.extend(got);
            at += n;
        }
        Ok(out)
    }

    fn is_connected(&self) -> bool {
        RemoteReplica::is_connected(self)
    }

    async fn create_snapshot(&self, name: &str, system: bool, created_ms: u64) -> Result<()> {
        let flags = if system { wire::FLAG_SYSTEM } else { 0 };
        let data = Bytes::copy_from_slice(name.as_bytes());
        let req = Request { flags, data, ..Request::simple(Opcode::SnapCreate, 0, created_ms, 0) };
        self.send(req).await.map(drop)
    }

    async fn delete_snapshot(&self, name: &str) -> Result<()> {
        self.call(Opcode::SnapDelete, 0, 0, 0, Bytes::copy_from_slice(name.as_bytes())).await.map(drop)
    }

    async fn revert_snapshot(&self, name: &str, generation: u64) -> Result<()> {
        let data = Bytes::copy_from_slice(name.as_bytes());
        let req = Request { generation, data, ..Request::simple(Opcode::SnapRevert, 0, 0, 0) };
        // A revert copies what newer snapshots changed: allow it time.
        self.send_within(req, self.opts.request_timeout.max(SLOW_REQUEST_TIMEOUT)).await.map(drop)
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotEntry>> {
        let payload = self.call(Opcode::SnapList, 0, 0, 0, Bytes::new()).await?;
        Ok(wire::decode_snapshots(&payload)?)
    }

    async fn read_snapshot(&self, name: &str, offset: u64, len: usize) -> Result<Bytes> {
        let target = wire::encode_snap_target(&SnapTarget { length: len as u64, name: name.to_owned() });
        let data = self.call(Opcode::SnapRead, 0, offset, 0, target).await?;
        if data.len() != len {
            return Err(Error::new(ErrorKind::Protocol, "short snapshot read").with_op(Op::Read).at(offset));
        }
        Ok(data)
    }

    async fn snapshot_block_status(&self, name: &str, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let target = wire::encode_snap_target(&SnapTarget { length: len, name: name.to_owned() });
        let payload = self.call(Opcode::SnapStatus, 0, offset, 0, target).await?;
        Ok(wire::decode_extents(&payload)?)
    }

    async fn snapshot_layer_status(&self, name: &str, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let target = wire::encode_snap_target(&SnapTarget { length: len, name: name.to_owned() });
        let payload = self.call(Opcode::SnapLayerStatus, 0, offset, 0, target).await?;
        Ok(wire::decode_extents(&payload)?)
    }

    async fn truncate_snapshots(&self, keep: Option<&str>) -> Result<()> {
        let data = Bytes::copy_from_slice(keep.unwrap_or_default().as_bytes());
        let req = Request { data, ..Request::simple(Opcode::SnapTruncate, 0, 0, 0) };
        // It waits for a running merge.
        self.send_within(req, self.opts.request_timeout.max(SLOW_REQUEST_TIMEOUT)).await.map(drop)
    }
}

/// Memory for one replica connection's READ replies in flight.
const READ_POOL_BYTES: usize = 32 << 20;

/// READs at least this large come back through shared memory, where the
/// replica has it.
const MIN_SHM_READ_BYTES: usize = 4096;

/// Bound on requests that may legitimately take long (snapshot revert).
/// How long after a refused [`Opcode::LocalFiles`] before the next ask.
const ASK_BACKOFF: Duration = Duration::from_secs(1);

const SLOW_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Attaches [`RemoteReplica`]s of one volume by address.
#[derive(Clone, Debug)]
pub struct RemoteConnector {
    pub volume: String,
    pub size: u64,
    pub opts: RemoteOptions,
    /// Payload memory offered to replicas on this machine (see [`crate::shm`]).
    pub shm: Option<Arc<ShmPool>>,
}

impl Connector for RemoteConnector {
    type Link = RemoteReplica;

    async fn attach(&self, addr: &str, epoch: u64) -> Result<(RemoteReplica, ReplicaMeta)> {
        let r =
            RemoteReplica::connect_shared(addr, &self.volume, self.size, epoch, self.opts, self.shm.clone())
                .await?;
        let meta = r.meta.clone().ok_or_else(|| {
            Error::new(ErrorKind::Protocol, format!("replica {addr} sent no metadata")).with_op(Op::Handshake)
        })?;
        Ok((r, meta))
    }

    fn payload_buffer(&self, len: usize) -> Option<ShmBuf> {
        self.shm.as_ref()?.alloc(len)
    }

    fn share_block_crcs(&self, data: &[u8]) {
        if let Some(pool) = &self.shm {
            pool.compute_block_crcs(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Membership;

    /// A replica that completes the handshake, then answers only the
    /// requests `answer` accepts (in reverse order of arrival, per batch).
    async fn fake_replica(answer: fn(&Request) -> bool) -> (String, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("jiva-remote-test-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = BytesMut::new();
            let hello = loop {
                if let Some(h) = wire::decode_hello(&mut buf).unwrap() {
                    break h;
                }
                assert!(s.read_buf(&mut buf).await.unwrap() > 0);
            };
            let meta = ReplicaMeta {
                store_id: 1,
                region_size: 1 << 20,
                membership: Membership { generation: 0, epoch: 0, clean: true, members: vec![] },
                rebuild: None,
            };
            let reply = HelloReply {
                version: wire::PROTOCOL_VERSION,
                status: 0,
                size: hello.size,
                epoch: hello.epoch,
                flags: wire::HELLO_BOUND,
                volume: hello.volume.clone(),
                message: String::new(),
                meta: Some(meta),
            };
            let mut out = BytesMut::new();
            wire::encode_hello_reply(&reply, &mut out);
            s.write_all(&out).await.unwrap();
            loop {
                let mut batch = Vec::new();
                while let Some(req) = wire::decode_request(&mut buf).unwrap() {
                    batch.push(req);
                }
                for req in batch.iter().rev().filter(|r| answer(r)) {
                    let payload = Bytes::from(vec![req.offset as u8; req.length as usize]);
                    let mut out = BytesMut::new();
                    wire::encode_response_header(&Response::ok(req.tag, payload.clone()), &mut out);
                    out.extend_from_slice(&payload);
                    s.write_all(&out).await.unwrap();
                }
                if s.read_buf(&mut buf).await.unwrap() == 0 {
                    return;
                }
            }
        });
        (format!("{UNIX_PREFIX}{}", path.display()), path)
    }

    #[tokio::test]
    async fn unanswered_requests_time_out_and_answered_ones_do_not() {
        // Reads at offset 0 are never answered; others are, out of order.
        let (addr, path) = fake_replica(|r| r.offset != 0).await;
        let timeout = Duration::from_millis(300);
        let opts = RemoteOptions { request_timeout: timeout, ..RemoteOptions::default() };
        let r = RemoteReplica::connect(&addr, "v", 1 << 20, 1, opts).await.unwrap();
        let started = std::time::Instant::now();
        let (silent, a, b) = tokio::join!(r.read(0, 4096), r.read(1, 4096), r.read(2, 100));
        assert_eq!(&a.unwrap()[..], &[1u8; 4096][..]);
        assert_eq!(&b.unwrap()[..], &[2u8; 100][..]);
        let e = silent.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        let waited = started.elapsed();
        assert!(waited >= timeout, "timed out after {waited:?}, before {timeout:?}");
        assert!(waited < timeout * 2, "timed out only after {waited:?}");
        // The connection stays usable.
        assert_eq!(&r.read(3, 512).await.unwrap()[..], &[3u8; 512][..]);
        assert!(r.is_connected());
        let _ = std::fs::remove_file(path);
    }
}
