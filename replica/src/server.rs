//! The replica's network server: speaks the wire protocol of
//! [`jiva_core::wire`] to controllers and executes their requests on a
//! [`Backend`] (the [`crate::Store`] in production).
//!
//! Each connection does one handshake (probe or attach), then reads tagged
//! requests and runs up to [`MAX_IN_FLIGHT`] of them at once; responses go
//! back in completion order through one writer task. Requests are validated
//! here, at the edge: a malformed frame closes the connection, an
//! out-of-range request gets an error response, and nothing reaches the
//! store unchecked.
//!
//! Version 2 of the protocol adds the replica's metadata (identity,
//! generation record, rebuild mark) and region stamps; see
//! [`jiva_core::wire`]. A Hello of another version is refused.
//!
//! Fencing: the server remembers the newest epoch that attached. A
//! connection attached with an older epoch gets `Fenced` for every request
//! and is closed, so a stale controller can never write after a newer one
//! has taken over. A takeover also waits for the requests already running
//! (accepted before the fence rose) to finish before it answers, so the
//! new controller's view of the replica (record, region stamps, data)
//! includes every change an older controller got in.
//!
//! A controller on the same machine may send its payload memory with the
//! Hello (see [`jiva_core::shm`]); once mapped, WRITEs that carry
//! [`wire::FLAG_SHM`] are stored straight from it, after a range check.

use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use crate::engine::aligned::AlignedBuf;
use crate::store::LocalGrant;
use bytes::{Buf, Bytes, BytesMut};
use jiva_core::device::{BlockDevice, ZeroFlags, check_range};
use jiva_core::error::{Error, ErrorKind, Result};
use jiva_core::local::Validity;
use jiva_core::pipe::{Payload, Piped};
use jiva_core::shm::{self, ShmMap};
use jiva_core::splice::ZeroCopy;
use jiva_core::wire::{
    self, Hello, HelloMode, HelloReply, Membership, Opcode, RebuildMark, ReplicaMeta, Request, Response,
    SnapshotEntry,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{RwLock, Semaphore, mpsc};

/// Requests executed concurrently per connection.
pub const MAX_IN_FLIGHT: usize = 256;
/// A client that has not completed the handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who the backend belongs to, as reported in the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    pub volume: Option<String>,
    pub size: u64,
    pub epoch: u64,
    pub clean: bool,
}

/// What the server needs beyond plain block I/O.
pub trait Backend: BlockDevice {
    fn info(&self) -> BackendInfo;
    /// Binds durably to `volume` at `epoch`; refuses older epochs (Fenced)
    /// and other volumes (InvalidArgument).
    fn attach(&self, volume: &str, epoch: u64) -> impl Future<Output = Result<()>> + Send;
    fn meta(&self) -> ReplicaMeta;
    /// The files of the top `max_layers` layers, head first, that a
    /// controller on this machine may read directly (see
    /// [`jiva_core::local`]); `None` where there are none to offer.
    fn local_files(&self, max_layers: usize) -> Option<LocalGrant> {
        let _ = max_layers;
        None
    }
    /// Reads `dest.len()` bytes at `offset` into `dest` (memory a
    /// controller shares with us; see [`jiva_core::shm`]).
    fn read_into(&self, offset: u64, mut dest: AlignedBuf) -> impl Future<Output = Result<()>> + Send {
        async move {
            let data = self.read(offset, dest.len()).await?;
            dest.copy_from_slice(&data);
            Ok(())
        }
    }
    fn set_membership(&self, m: Membership) -> impl Future<Output = Result<()>> + Send;
    fn set_rebuild(&self, mark: Option<RebuildMark>) -> impl Future<Output = Result<()>> + Send;
    fn stamps(&self, first: u64, count: u64) -> Result<Vec<u64>>;
    /// Changes of volume generation `generation` (stamped before they are made).
    /// The server polls the future to completion (it never drops it early).
    /// `crcs`: for a block-aligned payload, its blocks' crc32cs as the
    /// controller computed them (big-endian u32s, one per block), to record
    /// as they are.
    fn write_gen(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
        generation: u64,
        crcs: Option<Bytes>,
    ) -> impl Future<Output = Result<()>> + Send;
    /// A rebuild copy whose payload must have crc32c `crc` (`Corrupt`
    /// otherwise, with nothing written).
    fn write_copy(
        &self,
        offset: u64,
        data: Bytes,
        generation: u64,
        crc: u32,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            if jiva_core::crc32c(&data) != crc {
                return Err(Error::new(ErrorKind::Corrupt, "write payload does not match its crc").at(offset));
            }
            self.write_gen(offset, data, false, generation, None).await
        }
    }
    fn trim_gen(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        generation: u64,
    ) -> impl Future<Output = Result<()>> + Send;
    fn zeroes_gen(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
        generation: u64,
    ) -> impl Future<Output = Result<()>> + Send;
    /// `created_ms` 0: the store's clock.
    fn create_snapshot(
        &self,
        name: &str,
        system: bool,
        created_ms: u64,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Starts the delete (the merge goes on in the background).
    fn delete_snapshot(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
    fn revert_snapshot(&self, name: &str, generation: u64) -> impl Future<Output = Result<()>> + Send;
    fn snapshots(&self) -> Vec<SnapshotEntry>;
    fn read_snapshot(
        &self,
        name: &str,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = Result<Bytes>> + Send;
    fn snapshot_block_status(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<jiva_core::Extent>>> + Send;
    fn snapshot_layer_status(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<jiva_core::Extent>>> + Send;
    fn truncate_snapshots(&self, keep: Option<&str>) -> impl Future<Output = Result<()>> + Send;
}

/// Block ranges whose reads fail with an I/O error: a stand-in for a disk
/// with bad sectors, for fault-injection tests only (see `jiva replica`'s
/// `JIVA_TEST_FAULT_EIO_BLOCKS`).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Half-open block ranges.
    pub eio_read_blocks: Vec<(u64, u64)>,
    /// WRITEs wait for a permit of this semaphore before they run (and
    /// give it back after): a stand-in for a disk that stalls.
    pub write_gate: Option<Arc<Semaphore>>,
    /// READs into shared memory wait for a permit of this semaphore the
    /// same way.
    pub read_gate: Option<Arc<Semaphore>>,
}

impl Faults {
    /// Parses `A-B,C-D,...` (inclusive block numbers; `A` alone is one block).
    pub fn parse(spec: &str) -> std::result::Result<Faults, String> {
        let mut eio_read_blocks = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let a: u64 = a.trim().parse().map_err(|_| format!("bad block number in {part:?}"))?;
            let b: u64 = b.trim().parse().map_err(|_| format!("bad block number in {part:?}"))?;
            if b < a {
                return Err(format!("empty block range {part:?}"));
            }
            eio_read_blocks.push((a, b + 1));
        }
        Ok(Faults { eio_read_blocks, write_gate: None, read_gate: None })
    }

    /// Injected read faults happen in the server, which a controller
    /// reading the files directly would bypass.
    fn allow_local_reads(&self) -> bool {
        self.eio_read_blocks.is_empty() && self.read_gate.is_none()
    }

    fn read_fails(&self, offset: u64, len: u64) -> bool {
        let (first, count) = jiva_core::block_span(offset, len);
        self.eio_read_blocks.iter().any(|&(a, b)| first < b && a < first + count)
    }
}

/// See the module documentation.
pub struct ReplicaServer<B: Backend> {
    backend: Arc<B>,
    faults: Faults,
    /// Newest epoch attached since start; connections below it are fenced.
    current_epoch: AtomicU64,
    /// Held shared by every running request, taken exclusively by a
    /// takeover to wait for the requests accepted before its fence.
    running: Arc<RwLock<()>>,
    /// Validity words of head files handed out, by connection epoch.
    local_grants: Mutex<Vec<(u64, std::sync::Weak<Validity>)>>,
}

impl<B: Backend> std::fmt::Debug for ReplicaServer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaServer").field("epoch", &self.current_epoch).finish()
    }
}

impl<B: Backend> ReplicaServer<B> {
    pub fn new(backend: Arc<B>) -> ReplicaServer<B> {
        let epoch = backend.info().epoch;
        ReplicaServer {
            backend,
            faults: Faults::default(),
            current_epoch: AtomicU64::new(epoch),
            running: Arc::new(RwLock::new(())),
            local_grants: Mutex::new(Vec::new()),
        }
    }

    /// Injects faults (tests only).
    pub fn with_faults(mut self, faults: Faults) -> ReplicaServer<B> {
        if !faults.eio_read_blocks.is_empty() {
            tracing::warn!("fault injection: reads of blocks {:?} fail with EIO", faults.eio_read_blocks);
        }
        self.faults = faults;
        self
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// Accepts connections on a Unix domain socket until `shutdown`
    /// resolves (controllers on the same machine; see
    /// [`jiva_core::remote::UNIX_PREFIX`]).
    pub async fn serve_unix(
        self: Arc<Self>,
        listener: UnixListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        self.accept_loop(listener, shutdown).await
    }

    /// Accepts connections until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        self.accept_loop(listener, shutdown).await
    }

    /// Accepts controllers on `listener`, one task per connection, until
    /// `shutdown` resolves; a failed accept is retried after a pause.
    async fn accept_loop<L: ControllerListener>(
        self: Arc<Self>,
        listener: L,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                accepted = listener.accept_controller() => {
                    let (stream, zc, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let server = self.clone();
                    tokio::spawn(async move {
                        let mut buf = BytesMut::with_capacity(64 * 1024);
                        // The Hello, and the payload memory that may come with it.
                        let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, L::first_read(&stream, &mut buf));
                        let fds = match first.await {
                            Ok(Ok(fds)) => fds,
                            Ok(Err(e)) => return tracing::info!(%peer, "controller connection ended: {e}"),
                            Err(_) => return tracing::info!(%peer, "controller sent no hello in time"),
                        };
                        let sock = L::descriptor(&stream);
                        if let Err(e) = server.handle_connection_with(stream, zc, buf, fds, sock).await {
                            tracing::info!(%peer, "controller connection ended: {e}");
                        }
                    });
                }
            }
        }
    }

    /// Runs one connection to completion.
    pub async fn handle_connection<S>(self: Arc<Self>, stream: S) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.handle_connection_with(stream, None, BytesMut::with_capacity(64 * 1024), Vec::new(), None).await
    }

    /// Like [`Self::handle_connection`], sending large replies through `zc`
    /// (a zero-copy sender for the same socket); `buf` holds what was read
    /// already, `shm_fds` the payload memory the controller sent with it
    /// (for WRITE payloads, then for this connection's READ replies);
    /// `sock`, a duplicate of a Unix socket's descriptor, sends the head
    /// files to a controller that may read them directly.
    async fn handle_connection_with<S>(
        self: Arc<Self>,
        stream: S,
        zc: Option<ZeroCopy>,
        mut buf: BytesMut,
        shm_fds: Vec<OwnedFd>,
        sock: Option<OwnedFd>,
    ) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            loop {
                if let Some(h) = wire::decode_hello(&mut buf)? {
                    return Ok::<Hello, Error>(h);
                }
                if rd.read_buf(&mut buf).await? == 0 {
                    return Err(Error::new(ErrorKind::Disconnected, "closed during handshake"));
                }
                if buf.len() > wire::HELLO_LEN + wire::MAX_NAME_LEN {
                    return Err(Error::new(ErrorKind::Protocol, "oversized hello"));
                }
            }
        })
        .await
        .map_err(|_| Error::new(ErrorKind::TimedOut, "handshake not completed in time"))??;

        let (mut reply, attached) = self.answer_hello(&hello).await;
        let mut fds = shm_fds.into_iter();
        let mut open = |open: fn(OwnedFd) -> std::io::Result<Arc<ShmMap>>| match fds.next() {
            Some(fd) if attached => {
                open(fd).map_err(|e| tracing::warn!("not using the controller's shared memory: {e}")).ok()
            }
            _ => None,
        };
        let writes = open(ShmMap::open);
        let reads = open(ShmMap::open_writable).and_then(|map| {
            ReplyMemory::new(map, writes.as_deref())
                .map_err(|e| tracing::warn!("not using the controller's read memory: {e}"))
                .ok()
        });
        if writes.is_some() {
            reply.flags |= wire::HELLO_SHM | wire::HELLO_BLOCK_CRCS;
        }
        if reads.is_some() {
            reply.flags |= wire::HELLO_SHM_READ;
        }
        // A controller that shares read memory is on this machine and
        // reads through shared memory: it may read the head files directly.
        // At the handshake only the head alone (older controllers take
        // three descriptors); any chain on request (`Opcode::LocalFiles`).
        let lends_files = sock.is_some() && reads.is_some() && self.faults.allow_local_reads();
        let local = match lends_files {
            true => self.grant_local(hello.epoch, 1).filter(|g| g.whole),
            false => None,
        };
        if lends_files {
            reply.flags |= wire::HELLO_LOCAL_FILES;
        }
        let shm = SharedMemory { writes, reads };
        let mut out = BytesMut::new();
        let sent_with_files = match (&local, &sock) {
            (Some(grant), Some(sock)) => {
                reply.flags |= wire::HELLO_LOCAL_READS;
                wire::encode_hello_reply(&reply, &mut out);
                let fds = grant.fds();
                // The socket is empty this early: one sendmsg takes it all,
                // or at least its first byte and the descriptors.
                match jiva_core::fdpass::send(sock.as_fd(), &out, &fds) {
                    Ok(n) => Some(n),
                    Err(e) => {
                        tracing::debug!("could not send the head files: {e}");
                        grant.validity.revoke();
                        None
                    }
                }
            }
            _ => None,
        };
        match sent_with_files {
            Some(n) => wr.write_all(&out[n..]).await?,
            None => {
                reply.flags &= !wire::HELLO_LOCAL_READS;
                out.clear();
                wire::encode_hello_reply(&reply, &mut out);
                wr.write_all(&out).await?;
            }
        }
        wr.flush().await?;
        // Kept to lend layer files later (`Opcode::LocalFiles`).
        let lender = sock.filter(|_| lends_files).and_then(|fd| {
            jiva_core::pipe::register_duplicate(fd.as_fd(), tokio::io::Interest::WRITABLE)
                .map_err(|e| tracing::warn!("cannot lend layer files on this connection: {e}"))
                .ok()
        });
        // Revoked when this connection ends, however it ends.
        let _local = local.map(|grant| Revoke(grant.validity));
        if !attached {
            return Ok(());
        }
        tracing::info!(volume = %hello.volume, epoch = hello.epoch, "controller attached");
        self.serve_requests(rd, wr, buf, hello.epoch, Sender { zc, lender }, shm).await
    }

    /// Hands connection `epoch` the files of the top `max_layers` layers
    /// (see [`crate::Store::local_files`]), remembering the word so that a
    /// newer controller's attach revokes it.
    fn grant_local(&self, epoch: u64, max_layers: usize) -> Option<LocalGrant> {
        let grant = self.backend.local_files(max_layers)?;
        let mut grants = self.local_grants.lock().unwrap_or_else(PoisonError::into_inner);
        grants.retain(|(_, g)| g.strong_count() > 0);
        grants.push((epoch, Arc::downgrade(&grant.validity)));
        // Checked under the lock that fencing takes too.
        if self.current_epoch.load(Ordering::SeqCst) > epoch {
            grant.validity.revoke();
        }
        Some(grant)
    }

    /// The answer to a `LocalFiles` request on connection `epoch`: the
    /// layer files with their word, which `lent` keeps until the connection
    /// ends, or a refusal.
    fn lend(&self, tag: u64, epoch: u64, lends_files: bool, lent: &mut Vec<Revoke>) -> Answer {
        let grant = match lends_files && self.faults.allow_local_reads() {
            true => self.grant_local(epoch, jiva_core::local::MAX_LAYERS),
            false => None,
        };
        let Some(grant) = grant else {
            let e = Error::new(ErrorKind::Unavailable, "no layer files to lend on this connection");
            return Answer::plain(Response::error(tag, &e));
        };
        lent.retain(|r| r.0.is_valid());
        lent.push(Revoke(grant.validity.clone()));
        let layers = u8::try_from(grant.layers.len()).expect("at most MAX_LAYERS");
        let body = wire::LocalFilesAnswer { layers, whole: grant.whole }.encode();
        let resp = Response::ok(tag, Bytes::copy_from_slice(&body));
        Answer { resp, pipe: None, copy: false, files: Some(grant) }
    }

    /// Revokes the layer files lent to every connection older than `epoch`.
    fn revoke_local_below(&self, epoch: u64) {
        let mut grants = self.local_grants.lock().unwrap_or_else(PoisonError::into_inner);
        grants.retain(|(e, g)| match g.upgrade() {
            Some(word) if *e < epoch => {
                word.revoke();
                false
            }
            Some(_) => true,
            None => false,
        });
    }

    async fn answer_hello(&self, hello: &Hello) -> (HelloReply, bool) {
        let info = self.backend.info();
        let mut reply = HelloReply {
            version: hello.version.min(wire::PROTOCOL_VERSION),
            status: 0,
            size: info.size,
            epoch: info.epoch,
            flags: (if info.clean { wire::HELLO_CLEAN } else { 0 })
                | (if info.volume.is_some() { wire::HELLO_BOUND } else { 0 })
                | wire::HELLO_FAN_OUT,
            volume: info.volume.clone().unwrap_or_default(),
            message: String::new(),
            meta: Some(self.backend.meta()),
        };
        let refuse = |reply: &mut HelloReply, e: Error| {
            reply.status = e.kind().code();
            reply.message = e.to_string();
        };
        if hello.version != wire::PROTOCOL_VERSION {
            let e = Error::new(
                ErrorKind::Protocol,
                format!(
                    "protocol version {} is not supported (this replica speaks version {})",
                    hello.version,
                    wire::PROTOCOL_VERSION
                ),
            );
            refuse(&mut reply, e);
            return (reply, false);
        }
        if hello.mode == HelloMode::Probe {
            return (reply, false);
        }
        if hello.size != info.size {
            let e = Error::new(
                ErrorKind::InvalidArgument,
                format!("replica size is {} but the controller expects {}", info.size, hello.size),
            );
            refuse(&mut reply, e);
            return (reply, false);
        }
        if let Some(bound) = info.volume.as_deref().filter(|b| *b != hello.volume) {
            let e = Error::new(
                ErrorKind::InvalidArgument,
                format!("replica belongs to volume {bound:?}, not {:?}", hello.volume),
            );
            refuse(&mut reply, e);
            return (reply, false);
        }
        // Raise the fence first, so no request from an older connection
        // is accepted once this attach has been decided.
        let prev = self.current_epoch.fetch_max(hello.epoch, Ordering::SeqCst);
        if hello.epoch < prev {
            let e = Error::new(
                ErrorKind::Fenced,
                format!("epoch {} is older than epoch {prev} already attached", hello.epoch),
            );
            refuse(&mut reply, e);
            return (reply, false);
        }
        // An older controller reading the head files directly stops too.
        self.revoke_local_below(hello.epoch);
        // Requests accepted before the fence may still be running (a write
        // from the controller this one replaces, say, waiting for the
        // disk). Let them finish first: the record and stamps this attach
        // hands out must include whatever they change. Requests that start
        // from now on see the new fence.
        drop(self.running.write().await);
        match self.backend.attach(&hello.volume, hello.epoch).await {
            Ok(()) => {
                reply.epoch = hello.epoch;
                reply.volume = hello.volume.clone();
                reply.flags |= wire::HELLO_BOUND;
                reply.meta = Some(self.backend.meta());
                (reply, true)
            }
            Err(e) => {
                refuse(&mut reply, e);
                (reply, false)
            }
        }
    }

    async fn serve_requests<R, W>(
        self: Arc<Self>,
        mut rd: R,
        wr: W,
        mut buf: BytesMut,
        epoch: u64,
        sender: Sender,
        shm: SharedMemory,
    ) -> Result<()>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let lends_files = sender.lender.is_some();
        // Layer files lent on this connection: revoked when it ends.
        let mut lent: Vec<Revoke> = Vec::new();
        let (tx, rx) = mpsc::unbounded_channel::<Answer>();
        let writer = tokio::spawn(write_responses(rx, wr, sender));
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut early = EarlyAnswers::default();
        let result = loop {
            let mut req = match wire::decode_request(&mut buf) {
                Ok(Some(req)) => req,
                Ok(None) => match receive_large(&mut rd, &mut buf).await {
                    Ok(Some(req)) => req,
                    Ok(None) => {
                        let frame = wire::request_frame_len(&buf);
                        wire::reserve_frame(&mut buf, frame, 64 * 1024);
                        match rd.read_buf(&mut buf).await {
                            Ok(0) => break Ok(()),
                            Ok(_) => continue,
                            Err(e) => break Err(e.into()),
                        }
                    }
                    Err(e) => break Err(e),
                },
                Err(e) => break Err(e.into()),
            };
            let fan_out = req.opcode == Opcode::Write && req.flags & wire::FLAG_FAN_OUT != 0;
            req.flags &= !wire::FLAG_FAN_OUT;
            let length = req.length;
            let mut block_crcs = None;
            if req.opcode == Opcode::Write && req.flags & wire::FLAG_SHM != 0 {
                match shared_payload(shm.writes.as_ref(), &req) {
                    Ok(data) => {
                        if req.flags & wire::FLAG_BLOCK_CRCS != 0 {
                            // Sized by the frame decoder: one per block.
                            block_crcs = Some(req.data.slice(shm::REF_LEN..));
                        }
                        req.data = data;
                        req.flags &= !(wire::FLAG_SHM | wire::FLAG_BLOCK_CRCS);
                    }
                    Err(e) => {
                        let _ = tx.send(Answer::plain(Response::error(req.tag, &e)));
                        continue;
                    }
                }
            }
            // Running from here on, so a takeover waits for this request;
            // the fence is checked (again) after, so none slips in behind
            // it. (A takeover that is waiting holds new requests back.)
            let fenced = || self.current_epoch.load(Ordering::SeqCst) > epoch;
            let running = match self.running.clone().try_read_owned() {
                Ok(guard) => Some(guard),
                Err(_) if fenced() => None,
                Err(_) => Some(self.running.clone().read_owned().await),
            };
            if fenced() {
                let e = Error::new(ErrorKind::Fenced, "a controller with a newer epoch has attached");
                let _ = tx.send(Answer::plain(Response::error(req.tag, &e)));
                break Err(e);
            }
            if req.opcode == Opcode::LocalFiles {
                let _ = tx.send(self.lend(req.tag, epoch, lends_files, &mut lent));
                continue;
            }
            let permit = match slots.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => slots.clone().acquire_owned().await.expect("semaphore never closed"),
            };
            let server = self.clone();
            let tx = tx.clone();
            let reads = shm.reads.clone();
            let mut run = Box::pin(async move {
                let tag = req.tag;
                let answer = if req.opcode == Opcode::Read && req.flags & wire::FLAG_SHM != 0 {
                    Answer::plain(match server.read_shared(&req, reads.as_ref()).await {
                        Ok(()) => Response::ok(tag, Bytes::new()),
                        Err(e) => Response::error(tag, &e),
                    })
                } else if req.opcode == Opcode::Read && req.flags & wire::FLAG_PIPE != 0 {
                    match server.read_payload(&req).await {
                        Ok(Payload::Piped(pipe)) => Answer {
                            resp: Response::ok(tag, Bytes::new()),
                            pipe: Some(pipe),
                            copy: false,
                            files: None,
                        },
                        // Copied into the socket: the controller passes
                        // these pages on, so they must not be our memory.
                        Ok(Payload::Bytes(data)) => {
                            Answer { resp: Response::ok(tag, data), pipe: None, copy: true, files: None }
                        }
                        Err(e) => Answer::plain(Response::error(tag, &e)),
                    }
                } else {
                    Answer::plain(match server.execute(req, block_crcs).await {
                        Ok(payload) => Response::ok(tag, payload),
                        Err(e) => Response::error(tag, &e),
                    })
                };
                let _ = tx.send(answer);
                drop(permit);
                drop(running);
            });
            // A request that can finish at once (a read the page cache
            // holds, a small buffered write) is answered from here, without
            // a task of its own: a spawn, a scheduling round and a wakeup
            // per request cost more than the I/O. Otherwise its task takes
            // over the started request (and registers its own waker when it
            // polls it). Either way the request runs to completion: it is
            // never dropped half-way (`Backend::write_gen` relies on it).
            let finished = std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx).is_ready())).await;
            if !finished {
                tokio::spawn(run);
            } else if early.after(fan_out, length, !buf.is_empty()) {
                // The response writer sends what it holds before we go on.
                tokio::task::yield_now().await;
            }
        };
        // Let in-flight requests finish and their responses go out.
        drop(tx);
        let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
        let _ = writer.await;
        result
    }

    /// A READ with [`wire::FLAG_SHM`]: the data goes to the offset its
    /// frame carries in the connection's read memory.
    async fn read_shared(&self, req: &Request, reads: Option<&Arc<ReplyMemory>>) -> Result<()> {
        let reads = reads.ok_or_else(|| Error::new(ErrorKind::Protocol, "no read memory was shared"))?;
        let at = shared_ref(req)?;
        let len = usize::try_from(req.length).unwrap_or(usize::MAX);
        let dest = reads.lend(at, len)?;
        check_range(self.backend.size(), req.offset, req.length)?;
        if self.faults.read_fails(req.offset, req.length) {
            return Err(Error::new(ErrorKind::Io, "injected read error").at(req.offset));
        }
        if let Some(gate) = &self.faults.read_gate {
            let _permit = gate.acquire().await;
        }
        self.backend.read_into(req.offset, dest).await
    }

    /// A READ whose data the controller splices onward: never sent from
    /// our reusable buffers (see [`jiva_core::pipe`]).
    async fn read_payload(&self, req: &Request) -> Result<Payload> {
        check_range(self.backend.size(), req.offset, req.length)?;
        if self.faults.read_fails(req.offset, req.length) {
            return Err(Error::new(ErrorKind::Io, "injected read error").at(req.offset));
        }
        self.backend.read_payload(req.offset, req.length as usize).await
    }

    /// Runs `req`; a WRITE with `block_crcs` (see
    /// [`wire::FLAG_BLOCK_CRCS`]) records those as its blocks' crcs.
    async fn execute(&self, req: Request, block_crcs: Option<Bytes>) -> Result<Bytes> {
        let size = self.backend.size();
        let fua = req.flags & wire::FLAG_FUA != 0;
        match req.opcode {
            Opcode::Ping => Ok(Bytes::new()),
            // Answered by the connection's loop, which can send descriptors.
            Opcode::LocalFiles => {
                Err(Error::new(ErrorKind::Protocol, "layer files are lent by the connection"))
            }
            Opcode::Flush => self.backend.flush().await.map(|_| Bytes::new()),
            Opcode::Read => {
                check_range(size, req.offset, req.length)?;
                if self.faults.read_fails(req.offset, req.length) {
                    return Err(Error::new(ErrorKind::Io, "injected read error").at(req.offset));
                }
                self.backend.read(req.offset, req.length as usize).await
            }
            Opcode::Write => {
                check_range(size, req.offset, req.data.len() as u64)?;
                if let Some(gate) = &self.faults.write_gate {
                    let _permit = gate.acquire().await;
                }
                let done = if req.flags & wire::FLAG_CRC != 0 {
                    if fua {
                        // Copies are made durable by the flush that ends a rebuild step.
                        return Err(Error::new(
                            ErrorKind::InvalidArgument,
                            "a crc-checked write cannot be FUA",
                        ));
                    }
                    self.backend.write_copy(req.offset, req.data, req.generation, req.crc).await
                } else {
                    self.backend.write_gen(req.offset, req.data, fua, req.generation, block_crcs).await
                };
                done.map(|_| Bytes::new())
            }
            Opcode::Trim => {
                check_range(size, req.offset, req.length)?;
                self.backend.trim_gen(req.offset, req.length, fua, req.generation).await.map(|_| Bytes::new())
            }
            Opcode::WriteZeroes => {
                check_range(size, req.offset, req.length)?;
                let flags = ZeroFlags { no_hole: req.flags & wire::FLAG_NO_HOLE != 0, fua };
                self.backend
                    .zeroes_gen(req.offset, req.length, flags, req.generation)
                    .await
                    .map(|_| Bytes::new())
            }
            Opcode::GetMeta => Ok(wire::encode_meta(&self.backend.meta())),
            Opcode::SetMembership => {
                let m = wire::decode_membership(&req.data)?;
                self.backend.set_membership(m).await.map(|_| Bytes::new())
            }
            Opcode::SetRebuild => {
                let mark = if req.data.is_empty() { None } else { Some(wire::decode_rebuild(&req.data)?) };
                self.backend.set_rebuild(mark).await.map(|_| Bytes::new())
            }
            Opcode::GetStamps => self.backend.stamps(req.offset, req.length).map(|s| wire::encode_stamps(&s)),
            Opcode::BlockStatus => {
                check_range(size, req.offset, req.length)?;
                let ext = self.backend.block_status(req.offset, req.length).await?;
                Ok(wire::encode_extents(&ext))
            }
            Opcode::SnapCreate => {
                let name = wire::decode_snap_name(&req.data)?;
                let system = req.flags & wire::FLAG_SYSTEM != 0;
                self.backend.create_snapshot(&name, system, req.offset).await.map(|_| Bytes::new())
            }
            Opcode::SnapDelete => {
                let name = wire::decode_snap_name(&req.data)?;
                self.backend.delete_snapshot(&name).await.map(|_| Bytes::new())
            }
            Opcode::SnapRevert => {
                let name = wire::decode_snap_name(&req.data)?;
                self.backend.revert_snapshot(&name, req.generation).await.map(|_| Bytes::new())
            }
            Opcode::SnapList => Ok(wire::encode_snapshots(&self.backend.snapshots())),
            Opcode::SnapRead => {
                let t = wire::decode_snap_target(&req.data)?;
                if t.length > u64::from(jiva_core::device::MAX_IO_BYTES) {
                    return Err(Error::new(ErrorKind::InvalidArgument, "snapshot read too large"));
                }
                check_range(size, req.offset, t.length)?;
                self.backend.read_snapshot(&t.name, req.offset, t.length as usize).await
            }
            Opcode::SnapStatus => {
                let t = wire::decode_snap_target(&req.data)?;
                check_range(size, req.offset, t.length)?;
                let ext = self.backend.snapshot_block_status(&t.name, req.offset, t.length).await?;
                Ok(wire::encode_extents(&ext))
            }
            Opcode::SnapLayerStatus => {
                let t = wire::decode_snap_target(&req.data)?;
                check_range(size, req.offset, t.length)?;
                let ext = self.backend.snapshot_layer_status(&t.name, req.offset, t.length).await?;
                Ok(wire::encode_extents(&ext))
            }
            Opcode::SnapTruncate => {
                let keep = wire::decode_snap_keep(&req.data)?;
                self.backend.truncate_snapshots(keep.as_deref()).await.map(|_| Bytes::new())
            }
        }
    }
}

/// What the response writer sends through besides its stream, both on
/// the connection's own socket where it is a Unix socket.
struct Sender {
    /// Large replies without a copy.
    zc: Option<ZeroCopy>,
    /// A duplicate of the socket's descriptor, to lend layer files with an
    /// answer (`Opcode::LocalFiles`).
    lender: Option<AsyncFd<OwnedFd>>,
}

/// Memory a controller shared with this connection (see [`jiva_core::shm`]).
struct SharedMemory {
    /// WRITE payloads (read-only here).
    writes: Option<Arc<ShmMap>>,
    /// READ replies, this connection's alone (read-write).
    reads: Option<Arc<ReplyMemory>>,
}

/// A connection's read-reply memory, lent out one region per READ while
/// the read fills it.
struct ReplyMemory {
    map: Arc<ShmMap>,
    /// Regions lent out, as `start..end` offsets. Few at a time (one per
    /// READ in flight), so a list will do.
    lent: Mutex<Vec<(u64, u64)>>,
}

/// The read memories (by [`ShmMap::identity`]) some connection reads into.
static READ_MEMORIES: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

impl ReplyMemory {
    /// `map` as a connection's read memory, unless it is also `writes` or
    /// another connection's read memory: a buffer lent from it would then
    /// not be the only way to its bytes.
    fn new(map: Arc<ShmMap>, writes: Option<&ShmMap>) -> std::result::Result<Arc<ReplyMemory>, &'static str> {
        if writes.is_some_and(|w| w.identity() == map.identity()) {
            return Err("it is the payload memory too");
        }
        let mut in_use = READ_MEMORIES.lock().unwrap_or_else(PoisonError::into_inner);
        if in_use.contains(&map.identity()) {
            return Err("another connection reads into it");
        }
        in_use.push(map.identity());
        drop(in_use);
        Ok(Arc::new(ReplyMemory { map, lent: Mutex::new(Vec::new()) }))
    }

    /// `len` bytes at `at` as a buffer a read can fill. A region outside
    /// the memory, or overlapping one still lent (two READs the
    /// controller pointed at the same bytes), is a protocol error: each
    /// buffer must be the only way to its bytes.
    fn lend(self: &Arc<Self>, at: u64, len: usize) -> Result<AlignedBuf> {
        let outside = || Error::new(ErrorKind::Protocol, "shared reply outside the shared memory");
        let ptr = self.map.region_mut(at, len).ok_or_else(outside)?;
        let end = at + len as u64;
        let mut lent = self.lent.lock().unwrap_or_else(PoisonError::into_inner);
        if lent.iter().any(|&(a, b)| a < end && at < b) {
            return Err(Error::new(ErrorKind::Protocol, "two READs share reply memory"));
        }
        lent.push((at, end));
        drop(lent);
        let lease = Lease { memory: self.clone(), at };
        // SAFETY: the region is inside the mapping, which is writable and
        // initialised (a memfd's pages read as zeros until written), and
        // the lease keeps the mapping alive and the region out of every
        // other loan until the buffer is dropped. The controller does not
        // touch it until we answer, which is after the buffer is gone.
        Ok(unsafe { AlignedBuf::lent(ptr, len, Box::new(lease)) })
    }
}

impl Drop for ReplyMemory {
    fn drop(&mut self) {
        let mut in_use = READ_MEMORIES.lock().unwrap_or_else(PoisonError::into_inner);
        in_use.retain(|&id| id != self.map.identity());
    }
}

/// A region of a [`ReplyMemory`] on loan; returns it when dropped.
struct Lease {
    memory: Arc<ReplyMemory>,
    at: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut lent = self.memory.lent.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = lent.iter().position(|&(a, _)| a == self.at) {
            lent.swap_remove(i);
        }
    }
}

/// When the answers of a batch go out. A batch of requests read from the
/// socket together runs inline, one after the other, and its answers
/// normally go out together once the batch is done: one send and one
/// wake-up of the controller. A write the volume also sends to other
/// replicas ([`wire::FLAG_FAN_OUT`]) completes only once the slowest of
/// them answers, and on a small machine the replicas take turns on the
/// CPUs: holding every answer to the end of a batch makes each write wait
/// for the whole batch on every replica, while the controller and the
/// client, with nothing to complete, sit idle. Such answers go out in
/// groups instead. (3 replicas, 64 KiB random writes at depth 32: 9.3k →
/// 12.5k IOPS; with one replica, early answers only cost more wake-ups.)
#[derive(Debug, Default)]
struct EarlyAnswers {
    requests: usize,
    bytes: u64,
}

impl EarlyAnswers {
    /// Fan-out writes answered after which the answers go out...
    const REQUESTS: usize = 8;
    /// ...or bytes of them, whichever comes first.
    const BYTES: u64 = 256 * 1024;

    /// Notes a request answered at once (`length` bytes, `fan_out` as
    /// flagged); `more`: the batch goes on. True when the answers held so
    /// far should go out now.
    fn after(&mut self, fan_out: bool, length: u64, more: bool) -> bool {
        if !more {
            // The batch is done: its answers go out anyway.
            *self = EarlyAnswers::default();
            return false;
        }
        if !fan_out {
            return false;
        }
        self.requests += 1;
        self.bytes += length;
        let due = self.requests >= Self::REQUESTS || self.bytes >= Self::BYTES;
        if due {
            *self = EarlyAnswers::default();
        }
        due
    }
}

/// The offset a request with [`wire::FLAG_SHM`] carries.
fn shared_ref(req: &Request) -> Result<u64> {
    let at: [u8; shm::REF_LEN] = req.data[..req.data.len().min(shm::REF_LEN)]
        .try_into()
        .map_err(|_| Error::new(ErrorKind::Protocol, "malformed shared memory reference"))?;
    Ok(u64::from_be_bytes(at))
}

/// The payload of a WRITE with [`wire::FLAG_SHM`]: the `req.length`
/// bytes at the offset its frame carries, in the controller's memory.
fn shared_payload(shm: Option<&Arc<ShmMap>>, req: &Request) -> Result<Bytes> {
    let shm = shm.ok_or_else(|| Error::new(ErrorKind::Protocol, "no payload memory was shared"))?;
    let len = usize::try_from(req.length).unwrap_or(usize::MAX);
    shm.slice(shared_ref(req)?, len)
        .ok_or_else(|| Error::new(ErrorKind::Protocol, "shared payload outside the shared memory"))
}

/// A socket the replica accepts controllers on: the connection, its
/// zero-copy sender where the transport has one, and the peer for logs.
trait ControllerListener: Send {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static;
    fn accept_controller(
        &self,
    ) -> impl Future<Output = std::io::Result<(Self::Stream, Option<ZeroCopy>, String)>> + Send;

    /// The first bytes from a new connection into `buf`, with the
    /// descriptor that came along, where the transport carries them (the
    /// default reads nothing: the handshake reads the Hello).
    fn first_read(
        stream: &Self::Stream,
        buf: &mut BytesMut,
    ) -> impl Future<Output = std::io::Result<Vec<OwnedFd>>> + Send {
        let _ = (stream, buf);
        async { Ok(Vec::new()) }
    }

    /// A duplicate of the connection's descriptor to send descriptors
    /// through, where the transport carries them.
    fn descriptor(stream: &Self::Stream) -> Option<OwnedFd> {
        let _ = stream;
        None
    }
}

impl ControllerListener for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_controller(&self) -> std::io::Result<(Self::Stream, Option<ZeroCopy>, String)> {
        let (stream, peer) = self.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, None, peer.to_string()))
    }
}

impl ControllerListener for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_controller(&self) -> std::io::Result<(Self::Stream, Option<ZeroCopy>, String)> {
        let (stream, _) = self.accept().await?;
        // Large READ replies go to a local controller without a copy.
        let zc = ZeroCopy::new(std::os::fd::AsFd::as_fd(&stream));
        Ok((stream, zc, "unix socket".to_owned()))
    }

    fn descriptor(stream: &Self::Stream) -> Option<OwnedFd> {
        std::os::fd::AsFd::as_fd(stream).try_clone_to_owned().ok()
    }

    async fn first_read(stream: &Self::Stream, buf: &mut BytesMut) -> std::io::Result<Vec<OwnedFd>> {
        let mut chunk = [0u8; 1024];
        loop {
            stream.readable().await?;
            let got = stream.try_io(tokio::io::Interest::READABLE, || {
                jiva_core::fdpass::recv(std::os::fd::AsFd::as_fd(stream), &mut chunk)
            });
            match got {
                Ok((n, fds)) => {
                    buf.extend_from_slice(&chunk[..n]);
                    return Ok(fds);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Revokes a validity word when dropped.
struct Revoke(Arc<Validity>);

impl Drop for Revoke {
    fn drop(&mut self) {
        self.0.revoke();
    }
}

/// Payloads of at least this size are received straight into an aligned
/// buffer, which the store can hand to O_DIRECT without another copy (and
/// which comes from a pool instead of a fresh, page-faulting allocation).
const LARGE_PAYLOAD: usize = 256 * 1024;

/// If `buf` starts with the (valid) header of a request with a large
/// payload that has not fully arrived: reads the rest of that request from
/// `rd` into an aligned buffer and returns it, leaving `buf` empty.
async fn receive_large<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut) -> Result<Option<Request>> {
    let Some((mut req, payload)) = wire::decode_request_header(buf)? else { return Ok(None) };
    if payload < LARGE_PAYLOAD {
        return Ok(None);
    }
    buf.advance(wire::REQUEST_LEN);
    // `decode_request` returned None: the payload has not all arrived, so
    // `buf` holds only a prefix of it.
    let have = buf.len();
    // Every byte is overwritten below (or the buffer dropped on error).
    let mut data = AlignedBuf::for_overwrite(payload);
    data[..have].copy_from_slice(buf);
    buf.clear();
    rd.read_exact(&mut data[have..]).await?;
    req.data = Bytes::from(data);
    Ok(Some(req))
}

/// A response for the writer; a piped READ's data in `pipe`.
struct Answer {
    resp: Response,
    pipe: Option<Piped>,
    /// Copy the payload into the socket, never splice it from memory.
    copy: bool,
    /// Layer files sent with the answer (`Opcode::LocalFiles`).
    files: Option<LocalGrant>,
}

impl Answer {
    fn plain(resp: Response) -> Answer {
        Answer { resp, pipe: None, copy: false, files: None }
    }
}

async fn write_responses<W: AsyncWrite + Unpin>(
    mut rx: mpsc::UnboundedReceiver<Answer>,
    wr: W,
    sender: Sender,
) {
    let Sender { mut zc, lender } = sender;
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    let result: std::io::Result<()> = async {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some(Answer { resp, pipe, copy, files }) = next {
                if let Some(grant) = files {
                    let mut frame = BytesMut::with_capacity(wire::RESPONSE_LEN + resp.payload.len());
                    wire::encode_response_header(&resp, &mut frame);
                    frame.extend_from_slice(&resp.payload);
                    // Everything before it goes first: the descriptors
                    // travel with this frame's first byte.
                    w.flush().await?;
                    lend_files(&mut w, lender.as_ref(), &frame, &grant).await?;
                    if let Some(zc) = zc.as_mut() {
                        zc.count(frame.len());
                    }
                    next = rx.try_recv().ok();
                    continue;
                }
                if let Some(pipe) = pipe {
                    let header = wire::response_head(resp.tag, resp.status, pipe.len());
                    jiva_core::vectored::send_piped(&mut w, zc.as_mut(), &header, pipe).await?;
                    next = rx.try_recv().ok();
                    continue;
                }
                let mut header = BytesMut::with_capacity(wire::RESPONSE_LEN);
                wire::encode_response_header(&resp, &mut header);
                if copy && let Some(zc) = zc.as_mut() {
                    zc.count(header.len() + resp.payload.len());
                    jiva_core::vectored::write_frame(&mut w, &header, &resp.payload).await?;
                } else {
                    jiva_core::vectored::send_frame(&mut w, zc.as_mut(), &header, resp.payload).await?;
                }
                next = rx.try_recv().ok();
            }
            w.flush().await?;
        }
        w.shutdown().await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!("response writer ended: {e}");
    }
    if let Some(zc) = zc {
        zc.close().await;
    }
}

/// Sends `frame` on the socket `lender` (a duplicate of the connection's)
/// with `grant`'s descriptors attached to its first bytes.
async fn lend_files<W: AsyncWrite + Unpin>(
    w: &mut W,
    lender: Option<&AsyncFd<OwnedFd>>,
    frame: &[u8],
    grant: &LocalGrant,
) -> std::io::Result<()> {
    let Some(sock) = lender else {
        return Err(std::io::Error::other("layer files to lend on a connection that cannot carry them"));
    };
    let fds = grant.fds();
    let sent = loop {
        let mut ready = sock.writable().await?;
        if let Ok(result) = ready.try_io(|s| jiva_core::fdpass::send(s.get_ref().as_fd(), frame, &fds)) {
            break result?;
        }
    };
    w.write_all(&frame[sent..]).await?;
    w.flush().await
}

impl Backend for crate::Store {
    fn local_files(&self, max_layers: usize) -> Option<LocalGrant> {
        crate::Store::local_files(self, max_layers)
            .map_err(|e| tracing::warn!("not offering the layer files to a local controller: {e}"))
            .ok()
    }

    fn info(&self) -> BackendInfo {
        let id = self.identity();
        BackendInfo { volume: id.volume, size: id.size, epoch: id.epoch, clean: id.clean_open }
    }

    fn attach(&self, volume: &str, epoch: u64) -> impl Future<Output = Result<()>> + Send {
        crate::Store::attach(self, volume, epoch)
    }

    fn meta(&self) -> ReplicaMeta {
        crate::Store::meta(self)
    }

    async fn read_into(&self, offset: u64, dest: AlignedBuf) -> Result<()> {
        crate::Store::read_into(self, offset, dest).await.map(drop)
    }

    fn set_membership(&self, m: Membership) -> impl Future<Output = Result<()>> + Send {
        crate::Store::set_membership(self, m)
    }

    fn set_rebuild(&self, mark: Option<RebuildMark>) -> impl Future<Output = Result<()>> + Send {
        crate::Store::set_rebuild(self, mark)
    }

    fn stamps(&self, first: u64, count: u64) -> Result<Vec<u64>> {
        crate::Store::stamps(self, first, count)
    }

    fn write_gen(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
        generation: u64,
        crcs: Option<Bytes>,
    ) -> impl Future<Output = Result<()>> + Send {
        // The server never drops a request's future early (see
        // `serve_requests`), so the write needs no task of its own.
        crate::Store::write_gen_to_completion(self, offset, data, fua, generation, crcs)
    }

    fn write_copy(
        &self,
        offset: u64,
        data: Bytes,
        generation: u64,
        crc: u32,
    ) -> impl Future<Output = Result<()>> + Send {
        crate::Store::write_copy(self, offset, data, generation, crc)
    }

    fn trim_gen(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        generation: u64,
    ) -> impl Future<Output = Result<()>> + Send {
        crate::Store::trim_gen(self, offset, len, fua, generation)
    }

    fn zeroes_gen(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
        generation: u64,
    ) -> impl Future<Output = Result<()>> + Send {
        crate::Store::zeroes_gen(self, offset, len, flags, generation)
    }

    fn create_snapshot(
        &self,
        name: &str,
        system: bool,
        created_ms: u64,
    ) -> impl Future<Output = Result<()>> + Send {
        crate::Store::create_snapshot_at(self, name, system, Some(created_ms).filter(|&t| t != 0))
    }

    fn delete_snapshot(&self, name: &str) -> impl Future<Output = Result<()>> + Send {
        crate::Store::delete_snapshot(self, name)
    }

    fn revert_snapshot(&self, name: &str, generation: u64) -> impl Future<Output = Result<()>> + Send {
        crate::Store::revert_snapshot(self, name, generation)
    }

    fn snapshots(&self) -> Vec<SnapshotEntry> {
        crate::Store::snapshots(self)
            .into_iter()
            .map(|s| SnapshotEntry {
                name: s.name,
                created_ms: s.created_ms,
                allocated_bytes: s.allocated_bytes,
                system: s.system,
                merging: s.merging,
            })
            .collect()
    }

    fn read_snapshot(
        &self,
        name: &str,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = Result<Bytes>> + Send {
        crate::Store::read_snapshot(self, name, offset, len)
    }

    fn snapshot_block_status(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<jiva_core::Extent>>> + Send {
        crate::Store::snapshot_block_status(self, name, offset, len)
    }

    fn snapshot_layer_status(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<jiva_core::Extent>>> + Send {
        crate::Store::snapshot_layer_status(self, name, offset, len)
    }

    fn truncate_snapshots(&self, keep: Option<&str>) -> impl Future<Output = Result<()>> + Send {
        crate::Store::truncate_snapshots(self, keep)
    }
}

#[cfg(test)]
mod tests {
    use super::{EarlyAnswers, Faults};

    #[test]
    fn fan_out_answers_go_out_in_groups_within_a_batch() {
        let mut early = EarlyAnswers::default();
        // 4 KiB writes: every eighth.
        let due: Vec<bool> = (0..16).map(|_| early.after(true, 4096, true)).collect();
        assert_eq!(due.iter().filter(|&&d| d).count(), 2);
        assert!(due[7] && due[15]);
        // 64 KiB writes: every fourth (256 KiB); a 1 MiB write at once.
        assert_eq!(
            (0..4).map(|_| early.after(true, 65536, true)).collect::<Vec<_>>(),
            [false, false, false, true]
        );
        assert!(early.after(true, 1 << 20, true));
        // Writes to this replica alone never go out early...
        assert!((0..32).all(|_| !early.after(false, 65536, true)));
        // ...nor does the last request of a batch (its answers go out
        // anyway), which also starts the count afresh.
        for _ in 0..7 {
            assert!(!early.after(true, 4096, true));
        }
        assert!(!early.after(true, 4096, false));
        assert!((0..7).all(|_| !early.after(true, 4096, true)));
        assert!(early.after(true, 4096, true));
    }

    #[test]
    fn fault_specs_parse() {
        let f = Faults::parse("0-255, 1000").unwrap();
        assert_eq!(f.eio_read_blocks, vec![(0, 256), (1000, 1001)]);
        assert!(f.read_fails(255 * 4096, 1) && f.read_fails(1000 * 4096 - 1, 2));
        assert!(!f.read_fails(256 * 4096, 4096 * 744));
        assert!(Faults::parse("5-4").is_err() && Faults::parse("x").is_err());
        assert!(Faults::parse("").unwrap().eio_read_blocks.is_empty());
    }
}
