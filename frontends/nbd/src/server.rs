//! The NBD server: accepts connections and runs one session per connection
//! against a shared [`BlockDevice`].
//!
//! A session is the fixed-newstyle handshake (option haggling until
//! `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) followed by the transmission
//! phase. In transmission, one loop reads requests in order (it must: WRITE
//! payloads are inline), validates each one once, and spawns a task per
//! device operation, so many requests are in flight on one connection and
//! replies go out in completion order. A single writer task owns the socket's
//! write half, so replies never interleave. Back-pressure: a per-connection
//! semaphore bounds requests in flight (a slot is held until the reply has
//! been written), and a second one bounds the bytes of data buffers held.
//!
//! Limits that protect the server from broken or hostile clients: the
//! handshake must finish within a timeout, at most [`MAX_OPTIONS`] options
//! are accepted, option payloads over [`MAX_OPTION_PAYLOAD`] are refused, and
//! READ/WRITE lengths over [`MAX_IO_BYTES`] are refused with `EOVERFLOW`
//! (an oversized WRITE payload is read and discarded up to a bound, beyond
//! which the connection is closed, so the stream never desynchronizes).
//!
//! Shutdown ([`NbdServer::serve`]): the listener stops accepting; sessions
//! still negotiating are closed; sessions in transmission stop reading new
//! requests, finish the requests already accepted, send their replies
//! (for at most [`REPLY_DRAIN_TIMEOUT`]) and close. A request whose header
//! or payload was only partly received when shutdown came is dropped
//! unanswered. `serve` returns once every session has ended. (The spec's
//! optional `ESHUTDOWN` replies are not used: we close instead.)
//!
//! Besides the main export, an [`Exports`] source may offer more under
//! other names (a volume's snapshots as `VOL@SNAP`); they are listed by
//! NBD_OPT_LIST and always served read-only.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use jiva_core::pipe::{self, LowWater, Payload};
use jiva_core::{
    BLOCK_SIZE, BlockDevice, Capabilities, Extent, ExtentState, MAX_IO_BYTES, ZeroFlags, check_range,
};
use std::os::fd::{AsFd, OwnedFd};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::{JoinError, JoinSet};
use tracing::{Instrument, debug, info, warn};

use crate::exports::{Exports, NoExports};
use crate::proto::*;
use turn::SendTurn;

/// Default time a client has to finish the handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of requests in flight per connection.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 128;
/// Largest option payload we read; larger ones are answered with
/// `NBD_REP_ERR_TOO_BIG` (after skipping them, see below).
pub const MAX_OPTION_PAYLOAD: u32 = 64 * 1024;
/// Largest option payload we are willing to skip; beyond it, close.
const MAX_SKIPPED_OPTION_PAYLOAD: u32 = 1024 * 1024;
/// Options accepted per session before the client is considered abusive.
pub const MAX_OPTIONS: u32 = 1000;
/// Largest oversized WRITE payload we skip to stay in sync; beyond it, close.
const MAX_SKIPPED_WRITE: u32 = 4 * MAX_IO_BYTES;
/// Bytes of READ/WRITE data buffers one connection may hold at once.
const MAX_BUFFERED_BYTES: u32 = 4 * MAX_IO_BYTES;
/// How long a session that stopped reading requests (DISC, end of stream,
/// shutdown) may take to deliver its last replies before it is cut off.
pub const REPLY_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Most extent descriptors in one BLOCK_STATUS reply (the spec lets the
/// server describe a prefix of the range; clients ask again for the rest).
const MAX_DESCRIPTORS: usize = 1 << 16;
/// Metadata context ID of `base:allocation` after NBD_OPT_SET_META_CONTEXT.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Back-off after a transient `accept` failure (e.g. out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why a session ended abnormally. A clean end (client sent NBD_OPT_ABORT
/// or NBD_CMD_DISC, or closed the connection between requests) is `Ok`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error("connection i/o: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtoError),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("client refused: {0}")]
    Refused(&'static str),
}

/// Maps a device error kind to the NBD error value for `command`.
///
/// The one place where jiva's error kinds become NBD errno values. Per the
/// spec, a WRITE beyond the end of the export is `ENOSPC`; other
/// out-of-range requests are `EINVAL`.
pub fn errno_for(kind: jiva_core::ErrorKind, command: u16) -> u32 {
    use jiva_core::ErrorKind as K;
    match kind {
        K::OutOfRange if command == CMD_WRITE => ENOSPC,
        K::OutOfRange | K::InvalidArgument => EINVAL,
        K::NoSpace => ENOSPC,
        K::Unsupported => ENOTSUP,
        K::ReadOnly => EPERM,
        // Io, Corrupt, Disconnected, Unavailable, TimedOut, Fenced, Protocol
        // and any kind added later: the client can only retry or give up.
        _ => EIO,
    }
}

/// The transmission flags we advertise for a device: exactly its
/// capabilities. Write-type commands are not advertised on a read-only
/// export (they could only fail with EPERM). DF needs structured replies.
pub(crate) fn transmission_flags(caps: &Capabilities, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS;
    let writable = !caps.read_only;
    let set = |flags: &mut u16, cond: bool, flag: u16| {
        if cond {
            *flags |= flag;
        }
    };
    set(&mut flags, caps.read_only, FLAG_READ_ONLY);
    set(&mut flags, caps.flush, FLAG_SEND_FLUSH);
    set(&mut flags, caps.fua, FLAG_SEND_FUA);
    set(&mut flags, writable && caps.trim, FLAG_SEND_TRIM);
    set(&mut flags, writable && caps.write_zeroes, FLAG_SEND_WRITE_ZEROES);
    set(&mut flags, writable && caps.write_zeroes && caps.fast_zero, FLAG_SEND_FAST_ZERO);
    set(&mut flags, structured, FLAG_SEND_DF);
    set(&mut flags, caps.multi_conn, FLAG_CAN_MULTI_CONN);
    flags
}

/// An NBD server exporting one device under one name (the empty name, the
/// protocol's "default export", selects it too), and the read-only exports
/// of `X` under theirs.
pub struct NbdServer<D: BlockDevice, X: Exports = NoExports> {
    device: Arc<D>,
    export_name: String,
    description: Option<String>,
    handshake_timeout: Duration,
    max_in_flight: usize,
    exports: Arc<X>,
    /// Sessions in transmission on the main export.
    clients: Arc<AtomicUsize>,
}

impl<D: BlockDevice, X: Exports> std::fmt::Debug for NbdServer<D, X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("export_name", &self.export_name)
            .field("description", &self.description)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl<D: BlockDevice> NbdServer<D> {
    pub fn new(device: Arc<D>, export_name: impl Into<String>) -> NbdServer<D> {
        NbdServer {
            device,
            export_name: export_name.into(),
            description: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            exports: Arc::new(NoExports),
            clients: Arc::default(),
        }
    }
}

impl<D: BlockDevice, X: Exports> NbdServer<D, X> {
    /// Also serves the exports of `exports`, read-only.
    pub fn with_exports<Y: Exports>(self, exports: Arc<Y>) -> NbdServer<D, Y> {
        NbdServer {
            device: self.device,
            export_name: self.export_name,
            description: self.description,
            handshake_timeout: self.handshake_timeout,
            max_in_flight: self.max_in_flight,
            exports,
            clients: self.clients,
        }
    }

    /// Clients in the transmission phase on the main export now.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::SeqCst)
    }

    /// A shared count of [`NbdServer::clients`], readable after the server
    /// moved into its task.
    pub fn client_counter(&self) -> Arc<AtomicUsize> {
        self.clients.clone()
    }

    /// Human-readable description sent with NBD_OPT_LIST and NBD_INFO_DESCRIPTION.
    pub fn with_description(mut self, description: impl Into<String>) -> NbdServer<D, X> {
        self.description = Some(description.into());
        self
    }

    /// Time a client has to finish negotiating before it is dropped.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> NbdServer<D, X> {
        self.handshake_timeout = timeout;
        self
    }

    /// Requests in flight per connection (at least 1).
    pub fn with_max_in_flight(mut self, max: usize) -> NbdServer<D, X> {
        self.max_in_flight = max.clamp(1, Semaphore::MAX_PERMITS);
        self
    }

    pub fn export_name(&self) -> &str {
        &self.export_name
    }

    pub fn device(&self) -> &Arc<D> {
        &self.device
    }

    /// Accepts connections until `shutdown` resolves, one task per session.
    /// Then stops accepting, lets sessions finish the requests they already
    /// accepted (see the module docs) and returns when all have ended.
    /// Returns an error only if accepting fails in a way that is not
    /// transient (sessions are still drained first).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut sessions = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let result = loop {
            while let Some(done) = sessions.try_join_next() {
                log_join_error(done, "session");
            }
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        self.spawn_session(&mut sessions, socket, peer, Shutdown(Some(stop_rx.clone())));
                    }
                    Err(e) if is_transient_accept_error(&e) => {
                        warn!(error = %e, "accept failed; retrying");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    Err(e) => break Err(e),
                },
            }
        };
        drop(listener);
        // Reap sessions that ended since the last accept, so the count is true.
        while let Some(done) = sessions.try_join_next() {
            log_join_error(done, "session");
        }
        info!(sessions = sessions.len(), "NBD server shutting down");
        // Receivers never observe a send error: they live in the sessions.
        let _ = stop_tx.send(true);
        while let Some(done) = sessions.join_next().await {
            log_join_error(done, "session");
        }
        result
    }

    fn spawn_session(
        self: &Arc<Self>,
        sessions: &mut JoinSet<()>,
        socket: TcpStream,
        peer: SocketAddr,
        shutdown: Shutdown,
    ) {
        // Replies are small and latency-bound; never let Nagle delay them.
        if let Err(e) = socket.set_nodelay(true) {
            debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let server = Arc::clone(self);
        let span = tracing::info_span!("nbd", %peer);
        sessions.spawn(
            async move {
                debug!("connection accepted");
                // Large READ replies are spliced into the socket from a
                // pipe, and large WRITE payloads out of it into one (see
                // jiva_core::pipe), through these descriptors.
                let splice = splice_fds(&socket);
                match server.run_session(socket, shutdown, splice).await {
                    Ok(()) => debug!("session closed"),
                    Err(e) => info!(error = %e, "session ended"),
                }
            }
            .instrument(span),
        );
    }

    /// Runs one session over `stream` (a TCP socket, or an in-memory duplex
    /// stream in tests and fuzzing) until the client disconnects or breaks
    /// the protocol.
    pub async fn handle_connection<S>(self: Arc<Self>, stream: S) -> Result<(), SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.run_session(stream, Shutdown(None), None).await
    }

    async fn run_session<S>(
        self: Arc<Self>,
        stream: S,
        mut shutdown: Shutdown,
        splice: Option<SpliceFds>,
    ) -> Result<(), SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(64 * 1024, rd);
        let mut wr = BufWriter::with_capacity(256 * 1024, wr);
        let limit = self.handshake_timeout;
        let negotiated = tokio::select! {
            done = tokio::time::timeout(limit, self.handshake(&mut rd, &mut wr)) => match done {
                Ok(negotiated) => negotiated?,
                Err(_) => return Err(SessionError::HandshakeTimeout(limit)),
            },
            () = shutdown.wait() => {
                debug!("closing session in handshake for shutdown");
                return Ok(());
            }
        };
        match negotiated {
            None => {
                debug!("client aborted the handshake");
                Ok(())
            }
            Some((negotiated, Chosen::Main)) => {
                let _client = Counted::new(&self.clients);
                self.transmission(rd, wr, negotiated, shutdown, self.device.clone(), splice).await
            }
            Some((negotiated, Chosen::Other(device))) => {
                self.transmission(rd, wr, negotiated, shutdown, device, splice).await
            }
        }
    }

    fn is_export(&self, name: &str) -> bool {
        name.is_empty() || name == self.export_name
    }

    /// The export a client names, if it exists.
    async fn choose(&self, name: &str) -> Option<Chosen<X::Device>> {
        if self.is_export(name) {
            return Some(Chosen::Main);
        }
        self.exports.open(name).await.map(Chosen::Other)
    }

    /// What the client gets if it enters transmission on `chosen` now.
    fn negotiated(&self, st: &OptionState, chosen: &Chosen<X::Device>) -> Negotiated {
        let (size, caps) = match chosen {
            Chosen::Main => (self.device.size(), self.device.capabilities()),
            Chosen::Other(d) => (d.size(), Capabilities { read_only: true, ..d.capabilities() }),
        };
        Negotiated {
            size,
            flags: transmission_flags(&caps, st.structured),
            caps,
            structured: st.structured,
            base_allocation: st.base_allocation,
        }
    }

    // -----------------------------------------------------------------------
    // Handshake.

    /// Greeting and option haggling. `Ok(None)`: the client aborted.
    async fn handshake<R, W>(
        &self,
        rd: &mut R,
        wr: &mut W,
    ) -> Result<Option<(Negotiated, Chosen<X::Device>)>, SessionError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let greeting = ServerGreeting { handshake_flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES };
        wr.write_all(&greeting.encode()).await?;
        wr.flush().await?;
        let mut flags = [0u8; ClientFlags::LEN];
        rd.read_exact(&mut flags).await?;
        // Unknown client flags: the spec says the server MUST close.
        let client = ClientFlags::parse(&flags)?;
        // A client without FIXED_NEWSTYLE is served the same way (the spec
        // allows it); such clients only ever send NBD_OPT_EXPORT_NAME.
        let mut st = OptionState { structured: false, base_allocation: false, no_zeroes: client.no_zeroes };

        for _ in 0..MAX_OPTIONS {
            let mut hdr = [0u8; OptionHeader::LEN];
            rd.read_exact(&mut hdr).await?;
            let header = OptionHeader::parse(&hdr)?;
            if header.length > MAX_OPTION_PAYLOAD {
                // EXPORT_NAME cannot be answered with an error; a huge
                // payload is not worth reading.
                if header.option == OPT_EXPORT_NAME || header.length > MAX_SKIPPED_OPTION_PAYLOAD {
                    return Err(SessionError::Refused("option payload too large"));
                }
                skip(rd, u64::from(header.length)).await?;
                let reply = OptionReply::error(REP_ERR_TOO_BIG, "option payload too large");
                wr.write_all(&reply.encode(header.option)).await?;
                wr.flush().await?;
                continue;
            }
            let mut payload = vec![0u8; header.length as usize];
            rd.read_exact(&mut payload).await?;
            let option = match NbdOption::parse(header.option, &payload) {
                Ok(option) => option,
                Err(e) if header.option == OPT_EXPORT_NAME => return Err(e.into()),
                Err(e) => {
                    debug!(option = header.option, error = %e, "malformed option");
                    wr.write_all(&OptionReply::error(REP_ERR_INVALID, e.to_string()).encode(header.option))
                        .await?;
                    wr.flush().await?;
                    continue;
                }
            };
            let next = self.handle_option(option, &mut st, wr).await;
            // ABORT's ACK is a courtesy: the client may already be gone.
            let flushed = wr.flush().await;
            match next? {
                Next::Continue => flushed?,
                Next::Abort => return Ok(None),
                Next::Transmit(negotiated, chosen) => {
                    flushed?;
                    return Ok(Some((negotiated, chosen)));
                }
            }
        }
        Err(SessionError::Refused("too many options"))
    }

    async fn handle_option<W>(
        &self,
        option: NbdOption,
        st: &mut OptionState,
        wr: &mut W,
    ) -> Result<Next<X::Device>, SessionError>
    where
        W: AsyncWrite + Unpin,
    {
        let code = option.code();
        let mut replies = Vec::new();
        let mut next = Next::Continue;
        match option {
            NbdOption::ExportName(name) => {
                let Some(chosen) = self.choose(&name).await else {
                    return Err(SessionError::UnknownExport(name));
                };
                let negotiated = self.negotiated(st, &chosen);
                let reply = ExportNameReply { size: negotiated.size, transmission_flags: negotiated.flags };
                wr.write_all(&reply.encode(st.no_zeroes)).await?;
                return Ok(Next::Transmit(negotiated, chosen));
            }
            NbdOption::Abort => {
                // Ignore a write failure: the client may not wait for the ACK.
                let _ = wr.write_all(&OptionReply::Ack.encode(code)).await;
                return Ok(Next::Abort);
            }
            NbdOption::List => {
                replies.push(OptionReply::Server {
                    name: self.export_name.clone(),
                    description: self.description.clone().unwrap_or_default(),
                });
                for name in self.exports.names().await {
                    replies.push(OptionReply::Server { name, description: "read-only".into() });
                }
                replies.push(OptionReply::Ack);
            }
            NbdOption::StartTls => {
                replies.push(OptionReply::error(REP_ERR_UNSUP, "TLS is not supported by this server"));
            }
            NbdOption::Info(req) | NbdOption::Go(req) => {
                if let Some(chosen) = self.choose(&req.export).await {
                    let negotiated = self.negotiated(st, &chosen);
                    let name = if matches!(chosen, Chosen::Main) { &self.export_name } else { &req.export };
                    replies.extend(self.info_replies(&negotiated, name, &req.requests));
                    replies.push(OptionReply::Ack);
                    if code == OPT_GO {
                        next = Next::Transmit(negotiated, chosen);
                    }
                } else {
                    replies.push(OptionReply::error(
                        REP_ERR_UNKNOWN,
                        format!("no export named {:?}", req.export),
                    ));
                }
            }
            NbdOption::StructuredReply => {
                if st.structured {
                    replies
                        .push(OptionReply::error(REP_ERR_INVALID, "structured replies already negotiated"));
                } else {
                    st.structured = true;
                    replies.push(OptionReply::Ack);
                }
            }
            NbdOption::ListMetaContext(req) | NbdOption::SetMetaContext(req) => {
                let set = code == OPT_SET_META_CONTEXT;
                if set {
                    // SET replaces the selection, also when it fails.
                    st.base_allocation = false;
                }
                if !st.structured {
                    replies.push(OptionReply::error(
                        REP_ERR_INVALID,
                        "metadata contexts need structured replies negotiated first",
                    ));
                } else if self.choose(&req.export).await.is_none() {
                    replies.push(OptionReply::error(
                        REP_ERR_UNKNOWN,
                        format!("no export named {:?}", req.export),
                    ));
                } else {
                    if selects_base_allocation(&req.queries, !set) {
                        // LIST replies carry a reserved ID of 0.
                        let id = if set { BASE_ALLOCATION_ID } else { 0 };
                        replies.push(OptionReply::MetaContext { id, name: BASE_ALLOCATION.to_owned() });
                        st.base_allocation |= set;
                    }
                    replies.push(OptionReply::Ack);
                }
            }
            NbdOption::Other { option, .. } => {
                replies.push(OptionReply::error(REP_ERR_UNSUP, format!("option {option} is not supported")));
            }
        }
        for reply in &replies {
            wr.write_all(&reply.encode(code)).await?;
        }
        Ok(next)
    }

    /// NBD_INFO_EXPORT always, then each requested info we know, once.
    fn info_replies(&self, negotiated: &Negotiated, name: &str, requests: &[u16]) -> Vec<OptionReply> {
        let mut out = vec![OptionReply::Info(InfoReply::Export {
            size: negotiated.size,
            transmission_flags: negotiated.flags,
        })];
        let mut sent = [false; 4];
        for &info in requests {
            let Some(seen) = sent.get_mut(usize::from(info)) else { continue };
            if std::mem::replace(seen, true) {
                continue;
            }
            match info {
                INFO_NAME => out.push(OptionReply::Info(InfoReply::Name(name.to_owned()))),
                INFO_DESCRIPTION => {
                    if let Some(d) = &self.description {
                        out.push(OptionReply::Info(InfoReply::Description(d.clone())));
                    }
                }
                // Minimum 1: byte-granular I/O works (the device handles
                // read-modify-write); preferred is the device block size.
                INFO_BLOCK_SIZE => out.push(OptionReply::Info(InfoReply::BlockSize {
                    minimum: 1,
                    preferred: BLOCK_SIZE,
                    maximum: MAX_IO_BYTES,
                })),
                _ => {}
            }
        }
        out
    }

    // -----------------------------------------------------------------------
    // Transmission.

    async fn transmission<R, W, T>(
        &self,
        mut rd: BufReader<R>,
        wr: W,
        negotiated: Negotiated,
        mut shutdown: Shutdown,
        device: Arc<T>,
        splice: Option<SpliceFds>,
    ) -> Result<(), SessionError>
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send + 'static,
        T: BlockDevice,
    {
        debug!(
            size = negotiated.size,
            flags = negotiated.flags,
            structured = negotiated.structured,
            base_allocation = negotiated.base_allocation,
            "transmission phase"
        );
        let conn = Arc::new(Conn { device, neg: negotiated, pipes: splice.is_some() });
        let (tx, rx) = mpsc::unbounded_channel();
        let (splice_out, splice_in) = match splice {
            Some(SpliceFds { out, inp }) => (Some(out), Some(inp)),
            None => (None, None),
        };
        // Large replies are sent from blocking threads through a duplicate
        // of the socket (see OFFLOAD_REPLY_BYTES), taking turns with the
        // writer task.
        let direct = splice_out
            .as_ref()
            .and_then(|fd| fd.get_ref().try_clone().ok())
            .map(|fd| Arc::new(SendTurn::new(fd)));
        let mut writer = tokio::spawn(write_replies(wr, rx, splice_out, direct.clone()));
        let limits = Limits {
            slots: Arc::new(Semaphore::new(self.max_in_flight)),
            buffers: Arc::new(Semaphore::new(MAX_BUFFERED_BYTES as usize)),
        };
        let mut tasks = JoinSet::new();
        let result = {
            // Created once, not per request: each registers a waiter, which
            // costs locking its list when made and again when dropped.
            let stop = shutdown.wait();
            tokio::pin!(stop);
            let writer_gone = tx.closed();
            tokio::pin!(writer_gone);
            loop {
                while let Some(done) = tasks.try_join_next() {
                    log_join_error(done, "request");
                }
                let step = tokio::select! {
                    biased;
                    () = &mut stop => break Ok(()),
                    // The writer ended (the client stopped reading or went away).
                    () = &mut writer_gone => break Ok(()),
                    step = next_request(&mut rd, splice_in.as_ref(), direct.as_ref(), &conn, &tx, &limits, &mut tasks) => step,
                };
                match step {
                    Ok(Step::Continue) => {}
                    Ok(Step::Disconnect) => {
                        debug!("client disconnected (NBD_CMD_DISC)");
                        break Ok(());
                    }
                    Ok(Step::Eof) => {
                        debug!("client closed the connection");
                        break Ok(());
                    }
                    Err(e) => break Err(e),
                }
            }
        };

        // Finish every accepted request; each queues its reply, or sends
        // it: those stop once the turn closes, so a client that stopped
        // reading cannot hold them.
        {
            let close_late = async {
                tokio::time::sleep(REPLY_DRAIN_TIMEOUT).await;
                if let Some(direct) = &direct {
                    direct.close();
                }
                std::future::pending::<()>().await
            };
            tokio::pin!(close_late);
            loop {
                tokio::select! {
                    done = tasks.join_next() => match done {
                        Some(done) => log_join_error(done, "request"),
                        None => break,
                    },
                    () = &mut close_late => {}
                }
            }
        }
        drop(tx);
        // Bounded, so a client that stopped reading cannot pin the session.
        let written = match tokio::time::timeout(REPLY_DRAIN_TIMEOUT, &mut writer).await {
            Ok(done) => done,
            Err(_) => {
                writer.abort();
                debug!("client did not take its last replies in time");
                return result;
            }
        };
        match written {
            Ok(Ok(())) => {}
            // Failing to deliver replies to a client that left is expected.
            Ok(Err(e)) => debug!(error = %e, "writing replies failed"),
            Err(e) => log_join_error(Err(e), "reply writer"),
        }
        result
    }
}

/// State accumulated during option haggling.
struct OptionState {
    structured: bool,
    base_allocation: bool,
    no_zeroes: bool,
}

enum Next<T> {
    Continue,
    Abort,
    Transmit(Negotiated, Chosen<T>),
}

/// The export a client chose.
enum Chosen<T> {
    Main,
    /// One of the [`Exports`] (read-only).
    Other(Arc<T>),
}

/// Counts a session for its lifetime.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(count: &Arc<AtomicUsize>) -> Counted {
        count.fetch_add(1, Ordering::SeqCst);
        Counted(count.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a session agreed on, fixed for the transmission phase. Requests are
/// validated against the size and flags the client was told.
#[derive(Clone, Copy, Debug)]
struct Negotiated {
    size: u64,
    flags: u16,
    caps: Capabilities,
    structured: bool,
    base_allocation: bool,
}

/// Whether `queries` select `base:allocation`. With no queries LIST lists
/// everything and SET selects nothing; a bare namespace ("base:") only
/// lists.
fn selects_base_allocation(queries: &[String], listing: bool) -> bool {
    if queries.is_empty() {
        return listing;
    }
    queries.iter().any(|q| q == BASE_ALLOCATION || (listing && q == "base:"))
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    use io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::ConnectionAborted | K::ConnectionReset | K::Interrupted | K::WouldBlock | K::TimedOut
    ) {
        return true;
    }
    // Resource exhaustion (Linux: ENOMEM, ENFILE, EMFILE, ENOBUFS) passes.
    matches!(e.raw_os_error(), Some(12 | 23 | 24 | 105))
}

fn log_join_error(done: Result<(), JoinError>, what: &str) {
    if let Err(e) = done
        && e.is_panic()
    {
        warn!(error = %e, "{what} task panicked");
    }
}

/// Reads and drops `len` bytes.
async fn skip<R: AsyncRead + Unpin>(rd: &mut R, len: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut rd.take(len), &mut tokio::io::sink()).await?;
    if copied < len { Err(io::ErrorKind::UnexpectedEof.into()) } else { Ok(()) }
}

/// Shutdown signal of `serve`; `None` for sessions driven directly.
struct Shutdown(Option<watch::Receiver<bool>>);

impl Shutdown {
    async fn wait(&mut self) {
        match &mut self.0 {
            // An error means serve() is gone: treat as shutdown.
            Some(rx) => drop(rx.wait_for(|stop| *stop).await),
            None => std::future::pending().await,
        }
    }
}

/// Per-connection state shared with request tasks.
struct Conn<D> {
    device: Arc<D>,
    neg: Negotiated,
    /// Replies can carry piped payloads.
    pipes: bool,
}

/// A duplicate of a session socket's descriptor, registered on its own,
/// for splicing piped payloads into or out of it.
type SpliceFd = AsyncFd<OwnedFd>;

/// A session socket's splice descriptors: one for replies, one for requests.
struct SpliceFds {
    out: SpliceFd,
    inp: SpliceFd,
}

fn splice_fds(socket: &TcpStream) -> Option<SpliceFds> {
    let dup = |interest| {
        pipe::register_duplicate(socket.as_fd(), interest)
            .map_err(|e| debug!(error = %e, "no splice descriptor"))
            .ok()
    };
    Some(SpliceFds { out: dup(tokio::io::Interest::WRITABLE)?, inp: dup(tokio::io::Interest::READABLE)? })
}

struct Limits {
    /// Requests in flight; a slot is held until the reply is written.
    slots: Arc<Semaphore>,
    /// Bytes of READ/WRITE buffers held.
    buffers: Arc<Semaphore>,
}

/// READ replies at least this large are sent from a blocking thread, not
/// the runtime's: copying a MiB into the socket takes a few hundred
/// microseconds, which the runtime thread spends receiving and routing the
/// next requests instead.
const OFFLOAD_REPLY_BYTES: usize = 256 * 1024;

/// A reply ready for the writer task. Dropping it (after writing) releases
/// the request's slot and buffer budget.
struct Outgoing {
    head: Vec<u8>,
    data: Option<Payload>,
    _slot: OwnedSemaphorePermit,
    _buffer: Option<OwnedSemaphorePermit>,
}

enum Step {
    Continue,
    Disconnect,
    Eof,
}

/// Owns the write half: writes replies in the order they complete, batching
/// whatever is queued into one flush.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    splice: Option<SpliceFd>,
    direct: Option<Arc<SendTurn>>,
) -> io::Result<()> {
    // Stops frames still being sent off the runtime when this task ends.
    struct Close(Option<Arc<SendTurn>>);
    impl Drop for Close {
        fn drop(&mut self) {
            if let Some(direct) = &self.0 {
                direct.close();
            }
        }
    }
    let _close = Close(direct.clone());
    while let Some(mut msg) = rx.recv().await {
        // Held until what this batch wrote is flushed.
        let _turn = match &direct {
            Some(direct) => Some(direct.take().await),
            None => None,
        };
        loop {
            match msg.data.take() {
                Some(Payload::Piped(mut pipe)) => match &splice {
                    Some(fd) => {
                        // In order: everything buffered, then the header,
                        // held back to leave with the data.
                        wr.flush().await?;
                        pipe::send_more(&msg.head, pipe::Socket::Fd(fd)).await?;
                        pipe::drain_to_socket(&mut pipe, pipe::Socket::Fd(fd)).await?;
                    }
                    None => jiva_core::vectored::write_frame(&mut wr, &msg.head, &pipe.into_bytes()?).await?,
                },
                Some(Payload::Bytes(data)) if data.len() >= OFFLOAD_REPLY_BYTES && direct.is_some() => {
                    let Some(direct) = &direct else { unreachable!() };
                    // In order: everything buffered first.
                    wr.flush().await?;
                    let direct = Arc::clone(direct);
                    let head = std::mem::take(&mut msg.head);
                    tokio::task::spawn_blocking(move || {
                        let sent = jiva_core::vectored::send_frame_blocking(
                            direct.fd(),
                            &head,
                            &data,
                            direct.closed(),
                        );
                        jiva_core::spare::recycle(data);
                        sent
                    })
                    .await
                    .map_err(io::Error::other)??;
                }
                Some(Payload::Bytes(data)) => {
                    jiva_core::vectored::write_frame(&mut wr, &msg.head, &data).await?
                }
                None => jiva_core::vectored::write_frame(&mut wr, &msg.head, &[]).await?,
            }
            drop(msg);
            match rx.try_recv() {
                Ok(queued) => msg = queued,
                Err(_) => break,
            }
        }
        wr.flush().await?;
    }
    wr.shutdown().await
}

/// Reads a request header; `None` on a clean end of stream before it.
async fn read_request_header<R: AsyncRead + Unpin>(rd: &mut R) -> io::Result<Option<[u8; Request::LEN]>> {
    let mut buf = [0u8; Request::LEN];
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        let n = rd.read(rest).await?;
        if n == 0 {
            return if filled == 0 { Ok(None) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
        }
        filled += n;
    }
    Ok(Some(buf))
}

/// Reads one request (and its payload) and either answers it at once or
/// hands it to a task. Cancelling this future loses at most the request
/// being read, which only happens when the session is ending anyway.
#[allow(clippy::too_many_arguments)]
async fn next_request<R, D>(
    rd: &mut BufReader<R>,
    splice_in: Option<&SpliceFd>,
    direct: Option<&Arc<SendTurn>>,
    conn: &Arc<Conn<D>>,
    tx: &mpsc::UnboundedSender<Outgoing>,
    limits: &Limits,
    tasks: &mut JoinSet<()>,
) -> Result<Step, SessionError>
where
    R: AsyncRead + Unpin,
    D: BlockDevice,
{
    // Take the slot before reading, so a client that does not read its
    // replies stops being read from.
    let Ok(slot) = Arc::clone(&limits.slots).acquire_owned().await else { return Ok(Step::Eof) };
    let Some(header) = read_request_header(rd).await? else { return Ok(Step::Eof) };
    let req = Request::parse(&header)?;

    // A WRITE's payload follows its header whatever we decide about the
    // request: consume it first so the stream stays in sync.
    let mut payload = None;
    let mut buffer = None;
    if req.command == CMD_WRITE {
        if req.length <= MAX_IO_BYTES {
            buffer = acquire_bytes(&limits.buffers, req.length).await;
            let len = req.length as usize;
            payload = Some(match splice_in {
                _ if let Some(shared) = conn.device.payload_buffer(len) => Payload::Bytes(
                    jiva_core::shm::receive(rd, shared, splice_in.map(|s| s.get_ref().as_fd())).await?,
                ),
                Some(fd)
                    if conn.device.takes_piped_writes()
                        && (pipe::MIN_PIPED_WRITE_BYTES..=pipe::MAX_PIPED_BYTES).contains(&len) =>
                {
                    receive_piped(rd, fd, len).await?
                }
                _ => Payload::Bytes(receive_bytes(rd, BytesMut::with_capacity(len), len, splice_in).await?),
            });
        } else if req.length <= MAX_SKIPPED_WRITE {
            skip(rd, u64::from(req.length)).await?;
        } else {
            return Err(SessionError::Refused("write payload too large to skip"));
        }
    }

    let op = match validate(&req, payload, &conn.neg) {
        Ok(Action::Disconnect) => return Ok(Step::Disconnect),
        Ok(Action::Reply) => {
            let (head, data) = conn.reply_ok(&req, None);
            let _ = tx.send(Outgoing { head, data: data.map(Payload::Bytes), _slot: slot, _buffer: buffer });
            return Ok(Step::Continue);
        }
        Ok(Action::Io(op)) => op,
        Err(rejection) => {
            debug!(?req, errno = rejection.errno, reason = %rejection.message, "request rejected");
            let (head, data) = conn.reply_err(&req, rejection.errno, &rejection.message, None);
            let _ = tx.send(Outgoing { head, data: data.map(Payload::Bytes), _slot: slot, _buffer: buffer });
            return Ok(Step::Continue);
        }
    };
    if let IoOp::Read { len, .. } = op {
        // len <= MAX_IO_BYTES, checked by validate().
        buffer = acquire_bytes(&limits.buffers, u32::try_from(len).unwrap_or(MAX_IO_BYTES)).await;
    }
    if let IoOp::Read { offset, len } = op
        && let Some(direct) = direct
        && len >= OFFLOAD_REPLY_BYTES
        && conn.device.reads_at_once(len)
    {
        let (conn, tx, direct) = (Arc::clone(conn), tx.clone(), Arc::clone(direct));
        tasks.spawn(async move {
            let sent = {
                let conn = Arc::clone(&conn);
                tokio::task::spawn_blocking(move || send_at_once(&conn, &req, offset, len, &direct)).await
            };
            if sent.unwrap_or(false) {
                return;
            }
            let (head, data) = conn.execute(&req, op).await;
            let _ = tx.send(Outgoing { head, data, _slot: slot, _buffer: buffer });
        });
        return Ok(Step::Continue);
    }
    let conn = Arc::clone(conn);
    let tx = tx.clone();
    tasks.spawn(async move {
        let (head, data) = conn.execute(&req, op).await;
        // A send error means the writer is gone; the session is ending.
        let _ = tx.send(Outgoing { head, data, _slot: slot, _buffer: buffer });
    });
    Ok(Step::Continue)
}

/// Serves a large READ on this blocking thread where the device can read
/// it at once, and sends its reply from here too (see [`SendTurn`]): true
/// if it did (or the session ended meanwhile), false where the read must go
/// the async way.
fn send_at_once<D: BlockDevice>(
    conn: &Conn<D>,
    req: &Request,
    offset: u64,
    len: usize,
    direct: &SendTurn,
) -> bool {
    let Some(data) = conn.device.read_at_once(offset, len).filter(|data| data.len() == len) else {
        return false;
    };
    let (head, data) = conn.reply_ok(req, Some(data));
    let Some(_turn) = direct.take_blocking() else { return true };
    let sent = jiva_core::vectored::send_frame_blocking(
        direct.fd(),
        &head,
        data.as_deref().unwrap_or_default(),
        direct.closed(),
    );
    if let Err(e) = sent {
        // Maybe cut short: nothing may follow part of a frame.
        debug!(error = %e, "sending a READ reply failed");
        direct.abort();
    }
    if let Some(data) = data {
        jiva_core::spare::recycle(data);
    }
    true
}

/// Payload bytes still to come from which [`receive_bytes`] reads straight
/// from the socket instead of through the reader's buffer.
const DIRECT_RECEIVE_BYTES: usize = 16 * 1024;

/// Reads `data` up to `len` bytes from `rd`. Received into uninitialised
/// capacity: no zeroing of a buffer about to be overwritten.
///
/// What `rd` holds already is taken from its buffer; a large rest is read
/// from the socket straight into `data`. Through the buffer it would be
/// copied twice (`BufReader` reads around its buffer only for reads at
/// least as large as the buffer), which was 4–5 % of the controller's CPU
/// for 64 KiB writes. Small payloads still come through the buffer, which
/// reads many of them (and their headers) with one system call. A large
/// rest is waited for whole ([`LowWater`]) where `socket` is given.
async fn receive_bytes<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    mut data: BytesMut,
    len: usize,
    socket: Option<&SpliceFd>,
) -> io::Result<Bytes> {
    data.reserve(len.saturating_sub(data.len()));
    let held = rd.buffer().len().min(len - data.len().min(len));
    data.extend_from_slice(&rd.buffer()[..held]);
    rd.consume(held);
    let mut low_water = LowWater::new(socket.map(|s| s.get_ref().as_fd()));
    while data.len() < len {
        let rest = len - data.len();
        low_water.expect(rest);
        let mut into = bytes::BufMut::limit(&mut data, rest);
        // The reader's buffer is empty here (drained above, and refilled
        // only by the small reads below), so reading around it keeps the
        // stream in order.
        let n = if rest >= DIRECT_RECEIVE_BYTES && rd.buffer().is_empty() {
            rd.get_mut().read_buf(&mut into).await?
        } else {
            rd.read_buf(&mut into).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(data.freeze())
}

/// Receives a `len`-byte WRITE payload into a pipe: what the reader holds
/// already is copied in, the rest spliced from the socket (its pages are
/// socket buffers, which may leave the process; see [`jiva_core::pipe`]).
/// Where the pipe cannot take it all, the payload is read into memory.
async fn receive_piped<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    fd: &SpliceFd,
    len: usize,
) -> io::Result<Payload> {
    let mut pipe = match pipe::Piped::with_capacity(len) {
        Ok(pipe) => pipe,
        Err(e) => {
            debug!(error = %e, "no pipe for a write payload; reading it into memory");
            return Ok(Payload::Bytes(receive_bytes(rd, BytesMut::with_capacity(len), len, Some(fd)).await?));
        }
    };
    let held = rd.buffer().len().min(len);
    let mut filled = pipe.push_bytes(&rd.buffer()[..held])?;
    rd.consume(match filled {
        pipe::Filled::Done => held,
        pipe::Filled::Full(n) => n,
    });
    if filled == pipe::Filled::Done && held < len {
        filled = pipe::fill_from_socket(&mut pipe, pipe::Socket::Fd(fd), len - held).await?;
    }
    if filled == pipe::Filled::Done {
        return Ok(Payload::Piped(pipe));
    }
    // Out of pipe slots (many small socket buffers): the rest in memory.
    let mut data = BytesMut::with_capacity(len);
    data.extend_from_slice(&pipe.into_bytes()?);
    Ok(Payload::Bytes(receive_bytes(rd, data, len, Some(fd)).await?))
}

async fn acquire_bytes(buffers: &Arc<Semaphore>, len: u32) -> Option<OwnedSemaphorePermit> {
    // Never fails: the semaphore is never closed and len <= its capacity.
    Arc::clone(buffers).acquire_many_owned(len).await.ok()
}

/// The outcome of validating a request.
enum Action {
    /// Succeed without touching the device (zero-length requests).
    Reply,
    Disconnect,
    Io(IoOp),
}

/// A validated device operation.
enum IoOp {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Payload, fua: bool },
    Flush,
    Trim { offset: u64, len: u64, fua: bool },
    WriteZeroes { offset: u64, len: u64, flags: ZeroFlags },
    BlockStatus { offset: u64, len: u32, req_one: bool },
}

struct Rejection {
    errno: u32,
    message: String,
}

fn reject(errno: u32, message: impl Into<String>) -> Rejection {
    Rejection { errno, message: message.into() }
}

/// The one validation of a request: command, flags, permissions, length
/// and range (with [`check_range`] against the negotiated size).
fn validate(req: &Request, payload: Option<Payload>, neg: &Negotiated) -> Result<Action, Rejection> {
    let caps = &neg.caps;
    // FUA is valid on every command once advertised.
    let fua = if caps.fua { CMD_FLAG_FUA } else { 0 };
    let (name, advertised, allowed_flags, writes) = match req.command {
        CMD_READ => ("read", true, fua | if neg.structured { CMD_FLAG_DF } else { 0 }, false),
        CMD_WRITE => ("write", true, fua, true),
        // The client is leaving; its flags do not matter.
        CMD_DISC => return Ok(Action::Disconnect),
        CMD_FLUSH => ("flush", caps.flush, fua, false),
        CMD_TRIM => ("trim", caps.trim, fua, true),
        CMD_CACHE => ("cache", false, fua, false),
        // FAST_ZERO is accepted as a known flag even when not advertised so
        // that the client gets ENOTSUP ("do it the slow way") below.
        CMD_WRITE_ZEROES => {
            ("write-zeroes", caps.write_zeroes, fua | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, true)
        }
        CMD_BLOCK_STATUS => ("block-status", neg.base_allocation, fua | CMD_FLAG_REQ_ONE, false),
        other => return Err(reject(EINVAL, format!("unknown command {other}"))),
    };
    if req.flags & !allowed_flags != 0 {
        return Err(reject(EINVAL, format!("invalid flags {:#x} for {name}", req.flags)));
    }
    if writes && caps.read_only {
        return Err(reject(EPERM, "export is read-only"));
    }
    if !advertised {
        return Err(reject(EINVAL, format!("{name} was not negotiated")));
    }
    if matches!(req.command, CMD_READ | CMD_WRITE) && req.length > MAX_IO_BYTES {
        return Err(reject(
            EOVERFLOW,
            format!("{} bytes exceed the {MAX_IO_BYTES}-byte maximum", req.length),
        ));
    }
    let (offset, len) = (req.offset, u64::from(req.length));
    if req.command != CMD_FLUSH
        && let Err(e) = check_range(neg.size, offset, len)
    {
        return Err(reject(errno_for(e.kind(), req.command), e.to_string()));
    }
    let has = |flag: u16| req.flags & flag != 0;
    if has(CMD_FLAG_FAST_ZERO) && !(caps.fast_zero && caps.write_zeroes) {
        return Err(reject(ENOTSUP, "fast zeroing is not supported"));
    }
    if len == 0 && req.command != CMD_FLUSH {
        // A block-status reply needs at least one non-empty descriptor.
        if req.command == CMD_BLOCK_STATUS {
            return Err(reject(EINVAL, "zero-length block-status request"));
        }
        return Ok(Action::Reply);
    }
    let op = match req.command {
        CMD_READ => IoOp::Read { offset, len: req.length as usize },
        CMD_WRITE => {
            let Some(data) = payload else { return Err(reject(EINVAL, "write without payload")) };
            IoOp::Write { offset, data, fua: has(CMD_FLAG_FUA) }
        }
        CMD_FLUSH => IoOp::Flush,
        CMD_TRIM => IoOp::Trim { offset, len, fua: has(CMD_FLAG_FUA) },
        CMD_WRITE_ZEROES => IoOp::WriteZeroes {
            offset,
            len,
            flags: ZeroFlags { no_hole: has(CMD_FLAG_NO_HOLE), fua: has(CMD_FLAG_FUA) },
        },
        CMD_BLOCK_STATUS => IoOp::BlockStatus { offset, len: req.length, req_one: has(CMD_FLAG_REQ_ONE) },
        // CACHE is never advertised, so it was rejected above.
        _ => return Err(reject(EINVAL, format!("{name} is not supported"))),
    };
    Ok(Action::Io(op))
}

/// `base:allocation` flags of an extent state.
fn state_flags(state: ExtentState) -> u32 {
    match state {
        ExtentState::Hole => STATE_HOLE | STATE_ZERO,
        ExtentState::Zero => STATE_ZERO,
        ExtentState::Data => 0,
    }
}

/// Turns device extents into descriptors for a `len`-byte query: clamped to
/// `len`, empty extents dropped, equal neighbours merged, at most one with
/// REQ_ONE. A device answer that describes nothing becomes one "data"
/// descriptor (status 0 is always a safe answer).
fn descriptors(extents: &[Extent], len: u32, req_one: bool) -> Vec<BlockDescriptor> {
    let mut out: Vec<BlockDescriptor> = Vec::new();
    let mut remaining = len;
    for extent in extents {
        if remaining == 0 {
            break;
        }
        let n = u32::try_from(extent.length).unwrap_or(u32::MAX).min(remaining);
        if n == 0 {
            continue;
        }
        let flags = state_flags(extent.state);
        let full = req_one || out.len() >= MAX_DESCRIPTORS;
        match out.last_mut() {
            // Sums stay <= len, so this cannot overflow.
            Some(last) if last.flags == flags => last.length += n,
            Some(_) if full => break,
            _ => out.push(BlockDescriptor { length: n, flags }),
        }
        remaining -= n;
    }
    if out.is_empty() {
        out.push(BlockDescriptor { length: len, flags: 0 });
    }
    out
}

impl<D: BlockDevice> Conn<D> {
    async fn execute(&self, req: &Request, op: IoOp) -> (Vec<u8>, Option<Payload>) {
        let dev = &*self.device;
        let done = match op {
            IoOp::Read { offset, len } => {
                let read = if self.pipes && len >= pipe::MIN_PIPED_BYTES {
                    dev.read_payload(offset, len).await
                } else {
                    dev.read(offset, len).await.map(Payload::Bytes)
                };
                match read {
                    Ok(data) if data.len() != len => {
                        let msg = format!("device returned {} bytes for a {len}-byte read", data.len());
                        warn!(?req, "{msg}");
                        return (self.reply_err(req, EIO, &msg, None).0, None);
                    }
                    Ok(Payload::Piped(p)) => return (self.reply_ok_head(req, len), Some(Payload::Piped(p))),
                    Ok(Payload::Bytes(data)) => {
                        let (head, data) = self.reply_ok(req, Some(data));
                        return (head, data.map(Payload::Bytes));
                    }
                    Err(e) => Err(e),
                }
            }
            IoOp::Write { offset, data, fua } => dev.write_payload(offset, data, fua).await,
            IoOp::Flush => dev.flush().await,
            IoOp::Trim { offset, len, fua } => dev.trim(offset, len, fua).await,
            IoOp::WriteZeroes { offset, len, flags } => dev.write_zeroes(offset, len, flags).await,
            IoOp::BlockStatus { offset, len, req_one } => {
                let extents = if self.neg.caps.block_status {
                    dev.block_status(offset, u64::from(len)).await
                } else {
                    // No allocation information: "all data" is always true.
                    Ok(vec![Extent { length: u64::from(len), state: ExtentState::Data }])
                };
                match extents {
                    Ok(extents) => {
                        let chunk = ReplyChunk::BlockStatus {
                            context_id: BASE_ALLOCATION_ID,
                            descriptors: descriptors(&extents, len, req_one),
                        };
                        return (chunk.encode(REPLY_FLAG_DONE, req.cookie).0, None);
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match done {
            Ok(()) => (self.reply_ok(req, None).0, None),
            Err(e) => {
                let errno = errno_for(e.kind(), req.command);
                if errno == EIO {
                    warn!(?req, error = %e, "device error");
                } else {
                    debug!(?req, error = %e, "device refused request");
                }
                (self.reply_err(req, errno, &e.to_string(), e.offset()).0, None)
            }
        }
    }

    /// The header of a successful READ reply whose `len` bytes of data
    /// are sent after it separately.
    fn reply_ok_head(&self, req: &Request, len: usize) -> Vec<u8> {
        if !self.neg.structured {
            return SimpleReply { error: 0, cookie: req.cookie }.encode().to_vec();
        }
        ReplyChunk::offset_data_head(req.offset, len, REPLY_FLAG_DONE, req.cookie)
    }

    /// A successful reply; `data` only for READ.
    fn reply_ok(&self, req: &Request, data: Option<Bytes>) -> (Vec<u8>, Option<Bytes>) {
        if !self.neg.structured {
            return (SimpleReply { error: 0, cookie: req.cookie }.encode().to_vec(), data);
        }
        match data {
            // One content chunk, so DF is honoured trivially.
            Some(data) if !data.is_empty() => {
                ReplyChunk::OffsetData { offset: req.offset, data }.encode(REPLY_FLAG_DONE, req.cookie)
            }
            _ => ReplyChunk::None.encode(REPLY_FLAG_DONE, req.cookie),
        }
    }

    /// An error reply; with structured replies an ERROR_OFFSET chunk when the
    /// failing offset is known and inside the request, else an ERROR chunk.
    fn reply_err(
        &self,
        req: &Request,
        errno: u32,
        message: &str,
        at: Option<u64>,
    ) -> (Vec<u8>, Option<Bytes>) {
        if !self.neg.structured {
            return (SimpleReply { error: errno, cookie: req.cookie }.encode().to_vec(), None);
        }
        let end = req.offset.saturating_add(u64::from(req.length));
        let chunk = match at {
            Some(at)
                if matches!(req.command, CMD_READ | CMD_WRITE | CMD_TRIM) && at >= req.offset && at < end =>
            {
                ReplyChunk::error_offset(errno, message, at)
            }
            _ => ReplyChunk::error(errno, message),
        };
        chunk.encode(REPLY_FLAG_DONE, req.cookie)
    }
}

#[cfg(test)]
mod tests;
mod turn;
