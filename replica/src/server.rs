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
//! Fencing: the server remembers the newest epoch that attached. A
//! connection attached with an older epoch gets `Fenced` for every request
//! and is closed, so a stale controller can never write after a newer one
//! has taken over.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use jiva_core::device::{BlockDevice, ZeroFlags, check_range};
use jiva_core::error::{Error, ErrorKind, Result};
use jiva_core::wire::{self, Hello, HelloMode, HelloReply, Opcode, Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};

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
}

/// See the module documentation.
pub struct ReplicaServer<B: Backend> {
    backend: Arc<B>,
    /// Newest epoch attached since start; connections below it are fenced.
    current_epoch: AtomicU64,
}

impl<B: Backend> std::fmt::Debug for ReplicaServer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaServer").field("epoch", &self.current_epoch).finish()
    }
}

impl<B: Backend> ReplicaServer<B> {
    pub fn new(backend: Arc<B>) -> ReplicaServer<B> {
        let epoch = backend.info().epoch;
        ReplicaServer { backend, current_epoch: AtomicU64::new(epoch) }
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// Accepts connections until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let server = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = server.handle_connection(stream).await {
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
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut buf = BytesMut::with_capacity(64 * 1024);
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

        let (reply, attached) = self.answer_hello(&hello).await;
        let mut out = BytesMut::new();
        wire::encode_hello_reply(&reply, &mut out);
        wr.write_all(&out).await?;
        wr.flush().await?;
        if !attached {
            return Ok(());
        }
        tracing::info!(volume = %hello.volume, epoch = hello.epoch, "controller attached");
        self.serve_requests(rd, wr, buf, hello.epoch).await
    }

    async fn answer_hello(&self, hello: &Hello) -> (HelloReply, bool) {
        let info = self.backend.info();
        let mut reply = HelloReply {
            version: hello.version.min(wire::PROTOCOL_VERSION),
            status: 0,
            size: info.size,
            epoch: info.epoch,
            flags: (if info.clean { wire::HELLO_CLEAN } else { 0 })
                | (if info.volume.is_some() { wire::HELLO_BOUND } else { 0 }),
            volume: info.volume.clone().unwrap_or_default(),
            message: String::new(),
        };
        let refuse = |reply: &mut HelloReply, e: Error| {
            reply.status = e.kind().code();
            reply.message = e.to_string();
        };
        if hello.version == 0 {
            refuse(&mut reply, Error::new(ErrorKind::Protocol, "protocol version 0 is not supported"));
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
        match self.backend.attach(&hello.volume, hello.epoch).await {
            Ok(()) => {
                reply.epoch = hello.epoch;
                reply.volume = hello.volume.clone();
                reply.flags |= wire::HELLO_BOUND;
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
    ) -> Result<()>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel::<Response>();
        let writer = tokio::spawn(write_responses(rx, wr));
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let result = loop {
            match wire::decode_request(&mut buf) {
                Ok(Some(req)) => {
                    if self.current_epoch.load(Ordering::SeqCst) > epoch {
                        let e = Error::new(ErrorKind::Fenced, "a controller with a newer epoch has attached");
                        let _ = tx.send(Response::error(req.tag, &e));
                        break Err(e);
                    }
                    let permit = slots.clone().acquire_owned().await.expect("semaphore never closed");
                    let server = self.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let tag = req.tag;
                        let resp = match server.execute(req).await {
                            Ok(payload) => Response::ok(tag, payload),
                            Err(e) => Response::error(tag, &e),
                        };
                        let _ = tx.send(resp);
                        drop(permit);
                    });
                    continue;
                }
                Ok(None) => {}
                Err(e) => break Err(e.into()),
            }
            if buf.capacity() - buf.len() < 64 * 1024 {
                buf.reserve(1024 * 1024);
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(_) => {}
                Err(e) => break Err(e.into()),
            }
        };
        // Let in-flight requests finish and their responses go out.
        drop(tx);
        let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
        let _ = writer.await;
        result
    }

    async fn execute(&self, req: Request) -> Result<Bytes> {
        let size = self.backend.size();
        let fua = req.flags & wire::FLAG_FUA != 0;
        match req.opcode {
            Opcode::Ping => Ok(Bytes::new()),
            Opcode::Flush => self.backend.flush().await.map(|_| Bytes::new()),
            Opcode::Read => {
                check_range(size, req.offset, req.length)?;
                self.backend.read(req.offset, req.length as usize).await
            }
            Opcode::Write => {
                check_range(size, req.offset, req.data.len() as u64)?;
                self.backend.write(req.offset, req.data, fua).await.map(|_| Bytes::new())
            }
            Opcode::Trim => {
                check_range(size, req.offset, req.length)?;
                self.backend.trim(req.offset, req.length, fua).await.map(|_| Bytes::new())
            }
            Opcode::WriteZeroes => {
                check_range(size, req.offset, req.length)?;
                let flags = ZeroFlags { no_hole: req.flags & wire::FLAG_NO_HOLE != 0, fua };
                self.backend.write_zeroes(req.offset, req.length, flags).await.map(|_| Bytes::new())
            }
            Opcode::BlockStatus => {
                check_range(size, req.offset, req.length)?;
                let ext = self.backend.block_status(req.offset, req.length).await?;
                Ok(wire::encode_extents(&ext))
            }
        }
    }
}

async fn write_responses<W: AsyncWrite + Unpin>(mut rx: mpsc::UnboundedReceiver<Response>, wr: W) {
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    let result: std::io::Result<()> = async {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some(resp) = next {
                let mut header = BytesMut::with_capacity(wire::RESPONSE_LEN);
                wire::encode_response_header(&resp, &mut header);
                w.write_all(&header).await?;
                w.write_all(&resp.payload).await?;
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
}

impl Backend for crate::Store {
    fn info(&self) -> BackendInfo {
        let id = self.identity();
        BackendInfo { volume: id.volume, size: id.size, epoch: id.epoch, clean: id.clean_open }
    }

    fn attach(&self, volume: &str, epoch: u64) -> impl Future<Output = Result<()>> + Send {
        crate::Store::attach(self, volume, epoch)
    }
}
