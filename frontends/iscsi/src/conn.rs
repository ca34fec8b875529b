//! One iSCSI connection: the login phase (driving [`crate::login`]), then
//! the full feature phase.
//!
//! In the full feature phase one reader loop owns the socket's read half:
//! it checks each command against the session's CmdSN window, collects
//! write data (immediate, unsolicited and solicited with R2Ts, in order,
//! with DataSN checks), and spawns a task per SCSI command. Tasks run
//! concurrently and complete in any order. A single writer task owns the
//! write half and assigns StatSN in send order, so responses never
//! interleave; it splits read data into Data-In PDUs and folds the status
//! into the last one when there is no sense data.
//!
//! Aborts: commands are never cancelled once handed to the device (a
//! half-done replicated write is worse than a finished one). ABORT TASK
//! and the resets mark tasks aborted, wait for them to finish, and make
//! sure their responses are never sent; tasks still waiting for data are
//! dropped at once. Resets abort the issuing session's tasks; other
//! sessions' tasks complete normally, and their nexuses get a unit attention.
//!
//! Hostile input: oversized segments are skipped and rejected; unknown
//! opcodes and malformed PDUs are rejected; out-of-window commands are
//! ignored (RFC 7143 4.2.2.1); a header digest error or a protocol error
//! that makes the stream unreliable closes the connection. Write data is
//! bounded per connection (a byte budget gates new commands).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use jiva_core::shm::{PayloadBuf, ShmBuf};
use jiva_core::{BlockDevice, MAX_IO_BYTES};
use jiva_scsi::sense::key;
use jiva_scsi::{Asc, Nexus, Outcome, Sense, Status, missing_lun};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{debug, warn};

use crate::login::{self, Login, SessionKind, Step, status};
use crate::params::Negotiated;
use crate::pdu::{self, *};
use crate::session::{Session, Window};
use crate::target::{DRAIN_TIMEOUT, IscsiTarget};
use crate::text;

/// Largest data segment accepted during login.
const MAX_LOGIN_SEGMENT: u32 = 64 * 1024;
/// Largest expected data transfer length of a write we collect.
const MAX_WRITE_LEN: u32 = MAX_IO_BYTES + 1024 * 1024;
/// Bytes of command data one connection may hold at once.
const MAX_BUFFERED: usize = 4 * MAX_IO_BYTES as usize;
/// Largest text accumulated over continued Text Requests.
const MAX_TEXT: usize = 64 * 1024;
/// SCSI commands one connection may have in flight (immediate commands
/// are outside the CmdSN window, so the window alone does not bound them).
const MAX_TASKS: usize = 256;
/// Bytes of PDUs the reader itself queues (NOP-In, R2T, Reject, text and
/// task management responses) beyond which it stops reading until the
/// writer catches up: an initiator that sends but never reads cannot make
/// us buffer without bound.
const MAX_BACKLOG: usize = 4 << 20;

/// Why a connection ended abnormally. A logout, a clean close between
/// PDUs and a server shutdown are `Ok`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    #[error("connection i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("login not finished within {0:?}")]
    LoginTimeout(Duration),
    #[error("login refused with status {0:#06x}")]
    LoginFailed(u16),
    #[error("header digest mismatch")]
    HeaderDigest,
    #[error("protocol violation: {0}")]
    Protocol(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Server shutdown, as seen by one connection.
pub(crate) struct Shutdown(Option<watch::Receiver<bool>>);

impl Shutdown {
    pub(crate) fn new(rx: watch::Receiver<bool>) -> Shutdown {
        Shutdown(Some(rx))
    }

    pub(crate) fn never() -> Shutdown {
        Shutdown(None)
    }

    async fn wait(&mut self) {
        match &mut self.0 {
            Some(rx) => {
                if rx.wait_for(|stop| *stop).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

/// The LUN number in an 8-byte SAM LUN (peripheral or flat addressing).
pub fn lun_index(lun: u64) -> Option<u16> {
    let b = lun.to_be_bytes();
    if b[2..].iter().any(|&x| x != 0) {
        return None;
    }
    match b[0] >> 6 {
        0 if b[0] & 0x3f == 0 => Some(u16::from(b[1])),
        1 => Some((u16::from(b[0] & 0x3f) << 8) | u16::from(b[1])),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Reading PDUs.

/// One PDU off the wire.
enum Incoming {
    Pdu {
        pdu: Pdu,
        digest_ok: bool,
        header: [u8; BHS_LEN],
    },
    /// Framed but unusable: reject it with `reason` and carry on.
    Bad {
        header: [u8; BHS_LEN],
        reason: u8,
    },
}

/// Reads the BHS; `false` on a clean end of stream before its first byte.
async fn read_header<R: AsyncRead + Unpin>(rd: &mut R, bhs: &mut [u8; BHS_LEN]) -> std::io::Result<bool> {
    let mut got = 0;
    while got < BHS_LEN {
        let n = rd.read(&mut bhs[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

async fn skip<R: AsyncRead + Unpin>(rd: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut scratch = [0u8; 8192];
    while n > 0 {
        let chunk = n.min(scratch.len() as u64) as usize;
        rd.read_exact(&mut scratch[..chunk]).await?;
        n -= chunk as u64;
    }
    Ok(())
}

/// Reads one PDU. `share` offers memory the device shares with its
/// replicas, for a WRITE's data that comes whole with its command (see
/// [`pdu::is_whole_write`]).
async fn read_pdu<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    digests: Digests,
    max_data: u32,
    share: Option<&(dyn Fn(usize) -> Option<ShmBuf> + Sync)>,
) -> Result<Option<Incoming>, ConnError> {
    let mut bhs = [0u8; BHS_LEN];
    if !read_header(rd, &mut bhs).await? {
        return Ok(None);
    }
    let frame = Frame::parse(&bhs);
    let mut ahs = vec![0u8; frame.ahs_len];
    rd.read_exact(&mut ahs).await?;
    if digests.header {
        let mut d = [0u8; 4];
        rd.read_exact(&mut d).await?;
        if u32::from_le_bytes(d) != pdu::crc32c(&[&bhs, &ahs]) {
            return Err(ConnError::HeaderDigest);
        }
    }
    let len = frame.data_len as usize;
    let padded = len.next_multiple_of(4);
    let digest_len = if digests.data && len > 0 { 4 } else { 0 };
    if frame.data_len > max_data {
        // Skip it to stay in step with the stream, then reject it.
        skip(rd, (padded + digest_len) as u64).await?;
        return Ok(Some(Incoming::Bad { header: bhs, reason: reject::PROTOCOL_ERROR }));
    }
    // All of a write's data, which then goes to the device as it is.
    let whole_write = len == padded && pdu::is_whole_write(&bhs);
    let shared = share.filter(|_| whole_write).and_then(|share| share(len));
    let data = match shared {
        Some(shared) => jiva_core::shm::receive(rd, shared, None).await?,
        None => {
            let mut data = BytesMut::with_capacity(padded);
            let mut limited = (&mut *rd).take(padded as u64);
            while data.len() < padded {
                if limited.read_buf(&mut data).await? == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
            }
            data.freeze()
        }
    };
    let mut digest_ok = true;
    if digest_len > 0 {
        let mut d = [0u8; 4];
        rd.read_exact(&mut d).await?;
        digest_ok = u32::from_le_bytes(d) == pdu::crc32c(&[&data]);
    }
    Ok(Some(match Pdu::parse(&bhs, &ahs, data.slice(..len)) {
        Ok(pdu) => Incoming::Pdu { pdu, digest_ok, header: bhs },
        Err(PduError::UnknownOpcode(_)) => {
            Incoming::Bad { header: bhs, reason: reject::COMMAND_NOT_SUPPORTED }
        }
        Err(_) => Incoming::Bad { header: bhs, reason: reject::INVALID_PDU_FIELD },
    }))
}

/// The write side of a connection: headers and small PDUs gather in a
/// buffer; a large data segment goes out with one vectored write together
/// with what is buffered (no copy, and no header alone in a TCP segment).
struct Sink<W> {
    w: W,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> Sink<W> {
    /// Data segments up to this size are copied into the buffer.
    const SMALL: usize = 16 * 1024;
    /// The buffer is written out once it holds this much.
    const HIGH: usize = 256 * 1024;

    fn new(w: W) -> Sink<W> {
        Sink { w, buf: Vec::with_capacity(Self::HIGH + Self::SMALL + 1024) }
    }

    /// Queues a PDU with the given header (already stamped) and digests.
    async fn pdu(
        &mut self,
        bhs: &[u8; BHS_LEN],
        ahs: &[u8],
        data: &[u8],
        digests: Digests,
    ) -> std::io::Result<()> {
        self.buf.extend_from_slice(bhs);
        self.buf.extend_from_slice(ahs);
        if digests.header {
            self.buf.extend_from_slice(&pdu::crc32c(&[bhs, ahs]).to_le_bytes());
        }
        if !data.is_empty() {
            let pad = &[0u8; 3][..data.len().next_multiple_of(4) - data.len()];
            let digest =
                if digests.data { pdu::crc32c(&[data, pad]).to_le_bytes().to_vec() } else { Vec::new() };
            if data.len() <= Self::SMALL {
                self.buf.extend_from_slice(data);
                self.buf.extend_from_slice(pad);
                self.buf.extend_from_slice(&digest);
            } else {
                write_all_vectored(&mut self.w, &[&self.buf, data, pad, &digest]).await?;
                self.buf.clear();
            }
        }
        if self.buf.len() >= Self::HIGH {
            self.w.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.w.write_all(&self.buf).await?;
            self.buf.clear();
        }
        self.w.flush().await
    }
}

/// Writes every byte of `parts`, in order, with vectored writes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(w: &mut W, parts: &[&[u8]]) -> std::io::Result<()> {
    let (mut idx, mut off) = (0usize, 0usize);
    while idx < parts.len() {
        if off >= parts[idx].len() {
            idx += 1;
            off = 0;
            continue;
        }
        let slices: Vec<std::io::IoSlice<'_>> = std::iter::once(&parts[idx][off..])
            .chain(parts[idx + 1..].iter().copied())
            .filter(|p| !p.is_empty())
            .map(std::io::IoSlice::new)
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && idx < parts.len() {
            let left = parts[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

fn put32(b: &mut [u8; BHS_LEN], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

// ---------------------------------------------------------------------------
// Login.

struct LoggedIn {
    session: Arc<Session>,
    cid: u16,
    /// This connection's parameters (digests, the initiator's segment size).
    params: Negotiated,
    stat_sn: u32,
    kill: (watch::Sender<bool>, watch::Receiver<bool>),
}

fn random_bytes(buf: &mut [u8]) {
    if getrandom::fill(buf).is_err() {
        // No system randomness: CHAP challenges must still differ; mix
        // the clock in (the challenge is never a secret, only fresh).
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mut x = t.as_nanos() as u64 | 1;
        for b in buf {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
}

async fn login_phase<D, R, W>(
    target: &Arc<IscsiTarget<D>>,
    rd: &mut BufReader<R>,
    wr: &mut W,
) -> Result<LoggedIn, ConnError>
where
    D: BlockDevice,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let cfg = &target.login;
    let mut login = Login::new(&cfg.limits);
    let mut stat_sn: Option<u32> = None;
    loop {
        let incoming = read_pdu(rd, Digests::default(), MAX_LOGIN_SEGMENT, None).await?;
        let req = match incoming {
            None => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Some(Incoming::Pdu { pdu: Pdu::LoginRequest(req), .. }) => req,
            Some(_) => return Err(ConnError::Protocol("expected a Login Request".into())),
        };
        let sn = *stat_sn.get_or_insert(req.exp_stat_sn);
        stat_sn = Some(sn.wrapping_add(1));
        let depth = target.queue_depth;
        let send = |mut resp: LoginResponse, exp: u32, max: u32| {
            resp.stat_sn = sn;
            resp.exp_cmd_sn = exp;
            resp.max_cmd_sn = max;
            Pdu::LoginResponse(resp).encode(Digests::default())
        };
        let window = |req: &LoginRequest| {
            let s = if req.tsih != 0 { target.registry().get(req.tsih) } else { None };
            s.map(|s| s.window()).unwrap_or((req.cmd_sn, req.cmd_sn.wrapping_add(depth - 1)))
        };
        match login.step(&req, cfg, &mut random_bytes) {
            Step::Continue(resp) => {
                let (exp, max) = window(&req);
                wr.write_all(&send(resp, exp, max)).await?;
                wr.flush().await?;
            }
            Step::Fail(resp) => {
                let code = (u16::from(resp.status_class) << 8) | u16::from(resp.status_detail);
                let (exp, max) = window(&req);
                wr.write_all(&send(resp, exp, max)).await?;
                wr.flush().await?;
                return Err(ConnError::LoginFailed(code));
            }
            Step::Done(mut resp, outcome) => {
                let joined = join_session(target, &outcome);
                let session = match joined {
                    Ok(s) => s,
                    Err(code) => {
                        resp.status_class = (code >> 8) as u8;
                        resp.status_detail = code as u8;
                        resp.transit = false;
                        resp.nsg = 0;
                        resp.data = Bytes::new();
                        let (exp, max) = window(&req);
                        wr.write_all(&send(resp, exp, max)).await?;
                        wr.flush().await?;
                        return Err(ConnError::LoginFailed(code));
                    }
                };
                let kill = watch::channel(false);
                session.add_conn(outcome.cid, kill.0.clone());
                resp.tsih = session.tsih;
                let (exp, max) = session.window();
                wr.write_all(&send(resp, exp, max)).await?;
                wr.flush().await?;
                debug!(
                    initiator = %outcome.initiator_name,
                    tsih = session.tsih,
                    cid = outcome.cid,
                    kind = ?outcome.kind,
                    params = ?outcome.params,
                    "logged in"
                );
                return Ok(LoggedIn {
                    session,
                    cid: outcome.cid,
                    params: outcome.params,
                    stat_sn: sn.wrapping_add(1),
                    kill,
                });
            }
        }
    }
}

/// Creates (or reinstates) the session of a completed login, or adds the
/// connection to an existing one. `Err` is a login status.
fn join_session<D: BlockDevice>(target: &IscsiTarget<D>, o: &login::Outcome) -> Result<Arc<Session>, u16> {
    let mut reg = target.registry();
    if o.tsih != 0 {
        let Some(s) = reg.get(o.tsih) else { return Err(status::SESSION_DOES_NOT_EXIST) };
        if s.initiator_name != o.initiator_name || s.isid != o.isid || s.kind != o.kind {
            return Err(status::SESSION_DOES_NOT_EXIST);
        }
        if s.connections() >= usize::from(s.params.max_connections) && !s.close_conn(o.cid) {
            return Err(status::TOO_MANY_CONNECTIONS);
        }
        return Ok(s);
    }
    // A new session; one with the same initiator port is reinstated.
    if let Some(old) = reg.find(&o.initiator_name, o.isid) {
        debug!(tsih = old.tsih, "session reinstatement: closing the old session");
        old.close_all();
        reg.remove(&old);
    }
    let Some(tsih) = reg.allocate_tsih() else { return Err(status::OUT_OF_RESOURCES) };
    let nexus = Nexus::iscsi(&o.initiator_name, o.isid, &target.login.target_name, target.login.tpgt);
    let s = Arc::new(Session::new(
        tsih,
        o.initiator_name.clone(),
        o.isid,
        o.kind,
        nexus,
        o.params,
        Window::new(o.cmd_sn, target.queue_depth),
    ));
    if o.kind == SessionKind::Normal {
        target.lu.attach(&s.nexus);
    }
    reg.insert(Arc::clone(&s));
    Ok(s)
}

/// Runs a connection: login, then the full feature phase.
/// `rd` and `wr` are the two halves of one byte stream.
pub(crate) async fn run<D, R, W>(
    target: Arc<IscsiTarget<D>>,
    rd: R,
    wr: W,
    local: Option<SocketAddr>,
    mut shutdown: Shutdown,
) -> Result<(), ConnError>
where
    D: BlockDevice,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let mut wr = BufWriter::with_capacity(256 * 1024, wr);
    let limit = target.login_timeout;
    let logged_in = tokio::select! {
        done = tokio::time::timeout(limit, login_phase(&target, &mut rd, &mut wr)) => match done {
            Ok(r) => r?,
            Err(_) => return Err(ConnError::LoginTimeout(limit)),
        },
        () = shutdown.wait() => return Ok(()),
    };
    // Every login response was flushed: nothing is left in the buffer.
    full_feature(target, logged_in, rd, wr.into_inner(), local, shutdown).await
}

// ---------------------------------------------------------------------------
// Full feature phase.

/// Work for the writer task.
enum Out {
    Pdu(Pdu, StatKind),
    /// The end of a SCSI command: Data-In (split into PDUs), then the
    /// status, in the last Data-In when possible.
    Response {
        lun: u64,
        itt: u32,
        data: Bytes,
        status: u8,
        residual: Residual,
        /// Sense data with its two-byte length prefix (empty: none).
        sense: Bytes,
        _hold: Hold,
    },
    /// Flush and stop.
    Close,
}

/// Bytes the reader has queued for the writer, and a signal when they drain.
#[derive(Default)]
struct Backlog {
    queued: std::sync::atomic::AtomicUsize,
    drained: Notify,
}

impl Backlog {
    fn add(&self, n: usize) {
        self.queued.fetch_add(n, Ordering::SeqCst);
    }

    fn remove(&self, n: usize) {
        let before = self.queued.fetch_sub(n, Ordering::SeqCst);
        if before.saturating_sub(n) <= MAX_BACKLOG / 2 {
            self.drained.notify_waiters();
        }
    }

    async fn wait_below(&self, limit: usize) {
        loop {
            let drained = self.drained.notified();
            if self.queued.load(Ordering::SeqCst) <= limit {
                return;
            }
            drained.await;
        }
    }
}

/// What a command holds until its response is written: its share of the
/// data budget and its task slot.
#[derive(Default)]
struct Hold {
    _bytes: Option<OwnedSemaphorePermit>,
    _slot: Option<OwnedSemaphorePermit>,
}

/// Tracks one task for aborts.
#[derive(Default)]
struct TaskCtl {
    aborted: AtomicBool,
    finished: AtomicBool,
    done: Notify,
}

impl TaskCtl {
    fn finish(&self) {
        self.finished.store(true, Ordering::SeqCst);
        self.done.notify_waiters();
    }

    async fn wait(&self) {
        loop {
            let notified = self.done.notified();
            if self.finished.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

/// What the reader knows about a SCSI command.
#[derive(Clone)]
struct Cmd {
    itt: u32,
    lun: u64,
    cdb: Vec<u8>,
    read: bool,
    write: bool,
    edtl: u32,
}

/// State shared by the reader, the writer and the command tasks.
struct Conn<D: BlockDevice> {
    target: Arc<IscsiTarget<D>>,
    session: Arc<Session>,
    out: mpsc::UnboundedSender<Out>,
    tasks: Mutex<HashMap<u32, Arc<TaskCtl>>>,
    backlog: Arc<Backlog>,
}

impl<D: BlockDevice> Conn<D> {
    fn send(&self, pdu: Pdu, kind: StatKind) {
        self.backlog.add(BHS_LEN + pdu.data().len());
        // The writer only goes away with the connection.
        let _ = self.out.send(Out::Pdu(pdu, kind));
    }

    fn reject(&self, reason: u8, header: &[u8; BHS_LEN]) {
        self.send(
            Pdu::Reject(Reject {
                reason,
                stat_sn: 0,
                exp_cmd_sn: 0,
                max_cmd_sn: 0,
                data_sn: 0,
                data: Bytes::copy_from_slice(header),
            }),
            StatKind::Advance,
        );
    }

    /// Sends the response of a finished command unless it was aborted.
    fn complete(&self, cmd: &Cmd, outcome: Outcome, hold: Hold) {
        let produced = outcome.data.len() as u64;
        let edtl = u64::from(cmd.edtl);
        let (data, residual) = if cmd.write {
            (Bytes::new(), Residual::of(edtl, outcome.data_out_len))
        } else {
            let data =
                if cmd.read { outcome.data.slice(..produced.min(edtl) as usize) } else { Bytes::new() };
            (data, Residual::of(edtl, produced))
        };
        let sense = match outcome.sense_data() {
            s if s.is_empty() => Bytes::new(),
            s => {
                let mut b = (s.len() as u16).to_be_bytes().to_vec();
                b.extend(s);
                Bytes::from(b)
            }
        };
        let msg = Out::Response {
            lun: cmd.lun,
            itt: cmd.itt,
            data,
            status: outcome.status as u8,
            residual,
            sense,
            _hold: hold,
        };
        let mut tasks = lock(&self.tasks);
        let ctl = tasks.remove(&cmd.itt);
        if !ctl.as_ref().is_some_and(|c| c.aborted.load(Ordering::SeqCst)) {
            let _ = self.out.send(msg);
        }
        drop(tasks);
        if let Some(ctl) = ctl {
            ctl.finish();
        }
    }

    /// Marks the tasks chosen by `pick` aborted; returns them.
    fn abort_where(&self, pick: impl Fn(u32) -> bool) -> Vec<Arc<TaskCtl>> {
        let tasks = lock(&self.tasks);
        tasks
            .iter()
            .filter(|(itt, _)| pick(**itt))
            .map(|(_, ctl)| {
                ctl.aborted.store(true, Ordering::SeqCst);
                Arc::clone(ctl)
            })
            .collect()
    }
}

/// A check-condition outcome built by the transport itself.
fn failed(sense: Sense) -> Outcome {
    Outcome {
        status: Status::CheckCondition,
        sense: Some(sense),
        descriptor_sense: false,
        data: Bytes::new(),
        data_out_len: 0,
    }
}

/// One data sequence of a write: unsolicited, or answering one R2T.
struct Seq {
    ttt: u32,
    start: u32,
    len: u32,
    received: u32,
    next_sn: u32,
}

/// A write still collecting its data.
struct PendingWrite {
    cmd: Cmd,
    buf: PayloadBuf,
    received: u32,
    unsolicited: Option<Seq>,
    r2ts: Vec<Seq>,
    next_offset: u32,
    r2t_sn: u32,
    failed: Option<Sense>,
    hold: Hold,
}

/// Why the reader stopped.
enum End {
    /// Peer closed, shutdown, or the session closed this connection.
    Closed,
    /// Logout: answer after the tasks finished.
    Logout { itt: u32, response: u8 },
}

struct Reader<D: BlockDevice> {
    conn: Arc<Conn<D>>,
    cid: u16,
    params: Negotiated,
    budget: Arc<Semaphore>,
    slots: Arc<Semaphore>,
    pending: HashMap<u32, PendingWrite>,
    next_ttt: u32,
    text: Vec<u8>,
    local: Option<SocketAddr>,
}

async fn full_feature<D, R, W>(
    target: Arc<IscsiTarget<D>>,
    li: LoggedIn,
    mut rd: BufReader<R>,
    wr: W,
    local: Option<SocketAddr>,
    mut shutdown: Shutdown,
) -> Result<(), ConnError>
where
    D: BlockDevice,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let LoggedIn { session, cid, params, stat_sn, kill: (kill_tx, mut kill_rx) } = li;
    let digests = Digests { header: params.header_digest, data: params.data_digest };
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(Backlog::default());
    let writer = tokio::spawn(writer(
        wr,
        out_rx,
        Arc::clone(&backlog),
        Arc::clone(&session),
        digests,
        params.max_send_data_segment,
        session.params.max_burst,
        stat_sn,
        kill_tx.clone(),
    ));
    let conn = Arc::new(Conn {
        target: Arc::clone(&target),
        session: Arc::clone(&session),
        out: out_tx,
        tasks: Mutex::default(),
        backlog: Arc::clone(&backlog),
    });
    let mut reader = Reader {
        conn: Arc::clone(&conn),
        cid,
        params,
        budget: Arc::new(Semaphore::new(MAX_BUFFERED)),
        slots: Arc::new(Semaphore::new(MAX_TASKS)),
        pending: HashMap::new(),
        next_ttt: 1,
        text: Vec::new(),
        local,
    };
    let max_recv = params.max_recv_data_segment;
    let device = Arc::clone(target.lu.device());
    let share = move |len: usize| device.payload_buffer(len);
    let result: Result<End, ConnError> = loop {
        let incoming = tokio::select! {
            biased;
            () = shutdown.wait() => break Ok(End::Closed),
            _ = kill_rx.wait_for(|k| *k) => break Ok(End::Closed),
            r = async {
                backlog.wait_below(MAX_BACKLOG).await;
                read_pdu(&mut rd, digests, max_recv, Some(&share)).await
            } => r,
        };
        match incoming {
            Ok(None) => break Ok(End::Closed),
            Err(e) => break Err(e),
            Ok(Some(Incoming::Bad { header, reason })) => {
                debug!(opcode = header[0] & 0x3f, reason, "rejecting a PDU");
                conn.reject(reason, &header);
            }
            Ok(Some(Incoming::Pdu { pdu, digest_ok, header })) => {
                match reader.dispatch(pdu, digest_ok, &header).await {
                    Ok(None) => {}
                    Ok(Some(end)) => break Ok(end),
                    Err(e) => break Err(e),
                }
            }
        }
    };

    // Drop writes still collecting data, let running commands finish and
    // deliver their responses, then answer a logout and close.
    for itt in std::mem::take(&mut reader.pending).into_keys() {
        lock(&conn.tasks).remove(&itt);
    }
    let running: Vec<Arc<TaskCtl>> = lock(&conn.tasks).values().cloned().collect();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        for t in running {
            t.wait().await;
        }
    })
    .await;
    if drained.is_err() {
        warn!("commands did not finish within {DRAIN_TIMEOUT:?}; closing anyway");
    }
    if let Ok(End::Logout { itt, response }) = &result {
        conn.send(
            Pdu::LogoutResponse(LogoutResponse {
                response: *response,
                itt: *itt,
                stat_sn: 0,
                exp_cmd_sn: 0,
                max_cmd_sn: 0,
                time2wait: 0,
                time2retain: 0,
            }),
            StatKind::Advance,
        );
    }
    let _ = conn.out.send(Out::Close);
    drop(reader);
    drop(conn);
    let written = tokio::time::timeout(DRAIN_TIMEOUT, writer).await;

    if session.remove_conn(cid, &kill_tx) {
        target.registry().remove(&session);
        if session.kind == SessionKind::Normal {
            target.lu.detach(&session.nexus);
        }
        debug!(tsih = session.tsih, "session closed");
    }
    result?;
    match written {
        Ok(Ok(Ok(()))) => Ok(()),
        // The initiator closed first (typical after a logout).
        Ok(Ok(Err(e)))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::NotConnected
            ) =>
        {
            Ok(())
        }
        Ok(Ok(Err(e))) => Err(e.into()),
        Ok(Err(e)) => Err(ConnError::Protocol(format!("writer task failed: {e}"))),
        Err(_) => Err(ConnError::Protocol("responses not delivered in time".into())),
    }
}

#[allow(clippy::too_many_arguments)]
async fn writer<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
    backlog: Arc<Backlog>,
    session: Arc<Session>,
    digests: Digests,
    max_send: u32,
    max_burst: u32,
    mut stat_sn: u32,
    kill: watch::Sender<bool>,
) -> std::io::Result<()> {
    let max_send = max_send.max(512);
    let max_burst = max_burst.max(max_send);
    let mut wr = Sink::new(wr);
    let result = async {
        while let Some(out) = rx.recv().await {
            match out {
                Out::Close => break,
                Out::Pdu(pdu, kind) => {
                    let (mut bhs, ahs) = pdu.encode_header();
                    stamp(&mut bhs, kind, &mut stat_sn, &session);
                    wr.pdu(&bhs, &ahs, pdu.data(), digests).await?;
                    backlog.remove(BHS_LEN + pdu.data().len());
                }
                Out::Response { lun, itt, data, status, residual, sense, _hold } => {
                    let collapse = sense.is_empty() && !data.is_empty();
                    let mut offset = 0usize;
                    let mut data_sn = 0u32;
                    let mut burst_left = max_burst as usize;
                    while offset < data.len() {
                        let n = (data.len() - offset).min(max_send as usize).min(burst_left);
                        let last = offset + n == data.len();
                        burst_left -= n;
                        let final_ = last || burst_left == 0;
                        if burst_left == 0 {
                            burst_left = max_burst as usize;
                        }
                        let with_status = last && collapse;
                        let pdu = Pdu::DataIn(DataIn {
                            final_,
                            ack: false,
                            residual: if with_status { residual } else { Residual::default() },
                            status: with_status.then_some(status),
                            lun,
                            itt,
                            ttt: RESERVED_TAG,
                            stat_sn: 0,
                            exp_cmd_sn: 0,
                            max_cmd_sn: 0,
                            data_sn,
                            offset: offset as u32,
                            data: Bytes::new(),
                        });
                        let (mut bhs, ahs) = pdu.encode_header();
                        bhs[5..8].copy_from_slice(&(n as u32).to_be_bytes()[1..]);
                        let kind = if with_status { StatKind::Advance } else { StatKind::None };
                        stamp(&mut bhs, kind, &mut stat_sn, &session);
                        wr.pdu(&bhs, &ahs, &data[offset..offset + n], digests).await?;
                        offset += n;
                        data_sn += 1;
                    }
                    if !collapse {
                        let pdu = Pdu::ScsiResponse(ScsiResponse {
                            bidi_overflow: false,
                            bidi_underflow: false,
                            residual,
                            response: 0,
                            status,
                            itt,
                            snack_tag: 0,
                            stat_sn: 0,
                            exp_cmd_sn: 0,
                            max_cmd_sn: 0,
                            exp_data_sn: data_sn,
                            bidi_residual: 0,
                            data: sense,
                        });
                        let (mut bhs, ahs) = pdu.encode_header();
                        stamp(&mut bhs, StatKind::Advance, &mut stat_sn, &session);
                        wr.pdu(&bhs, &ahs, pdu.data(), digests).await?;
                    }
                }
            }
            if rx.is_empty() {
                wr.flush().await?;
            }
        }
        wr.flush().await?;
        wr.w.shutdown().await
    }
    .await;
    if result.is_err() {
        let _ = kill.send(true);
    }
    result
}

/// Fills in StatSN, ExpCmdSN and MaxCmdSN of a target PDU header.
fn stamp(bhs: &mut [u8; BHS_LEN], kind: StatKind, stat_sn: &mut u32, session: &Session) {
    match kind {
        StatKind::Advance => {
            put32(bhs, 24, *stat_sn);
            *stat_sn = stat_sn.wrapping_add(1);
        }
        StatKind::Peek => put32(bhs, 24, *stat_sn),
        StatKind::None => {}
    }
    let (exp, max) = session.window();
    put32(bhs, 28, exp);
    put32(bhs, 32, max);
}

impl<D: BlockDevice> Reader<D> {
    fn session(&self) -> &Session {
        &self.conn.session
    }

    /// Handles one PDU. `Ok(Some(end))` stops reading.
    async fn dispatch(
        &mut self,
        pdu: Pdu,
        digest_ok: bool,
        header: &[u8; BHS_LEN],
    ) -> Result<Option<End>, ConnError> {
        if !digest_ok {
            self.conn.reject(reject::DATA_DIGEST_ERROR, header);
            if let Pdu::DataOut(d) = &pdu
                && let Some(pw) = self.pending.get_mut(&d.itt)
            {
                // The data is lost; the command cannot complete correctly.
                pw.failed.get_or_insert(Sense::new(key::ABORTED_COMMAND, Asc(0x4703)));
            } else {
                return Ok(None);
            }
        }
        match pdu {
            Pdu::NopOut(p) => {
                if !p.immediate && !self.session().accept(p.cmd_sn) {
                    return Ok(None);
                }
                if p.itt != RESERVED_TAG {
                    let mut data = p.data;
                    data.truncate(self.params.max_send_data_segment as usize);
                    self.conn.send(
                        Pdu::NopIn(NopIn {
                            lun: p.lun,
                            itt: p.itt,
                            ttt: RESERVED_TAG,
                            stat_sn: 0,
                            exp_cmd_sn: 0,
                            max_cmd_sn: 0,
                            data,
                        }),
                        StatKind::Advance,
                    );
                }
            }
            Pdu::ScsiCommand(c) => {
                if self.session().kind != SessionKind::Normal {
                    self.conn.reject(reject::PROTOCOL_ERROR, header);
                    return Ok(None);
                }
                if !c.immediate && !self.session().accept(c.cmd_sn) {
                    debug!(cmd_sn = c.cmd_sn, window = ?self.session().window(), "command outside the window ignored");
                    return Ok(None);
                }
                self.command(c, header).await;
            }
            Pdu::DataOut(d) => self.data_out(d),
            Pdu::TaskMgmtRequest(t) => {
                if !t.immediate && !self.session().accept(t.cmd_sn) {
                    return Ok(None);
                }
                self.task_management(t);
            }
            Pdu::TextRequest(t) => {
                if !t.immediate && !self.session().accept(t.cmd_sn) {
                    return Ok(None);
                }
                self.text_request(t, header);
            }
            Pdu::LogoutRequest(l) => {
                if !l.immediate && !self.session().accept(l.cmd_sn) {
                    return Ok(None);
                }
                let response = match l.reason {
                    0 => {
                        self.session().close_all();
                        0
                    }
                    1 if l.cid == self.cid => 0,
                    1 => {
                        if self.session().close_conn(l.cid) {
                            0
                        } else {
                            1
                        }
                    }
                    _ => 2,
                };
                if l.reason == 0 || (l.reason == 1 && l.cid == self.cid) {
                    return Ok(Some(End::Logout { itt: l.itt, response }));
                }
                self.conn.send(
                    Pdu::LogoutResponse(LogoutResponse {
                        response,
                        itt: l.itt,
                        stat_sn: 0,
                        exp_cmd_sn: 0,
                        max_cmd_sn: 0,
                        time2wait: 0,
                        time2retain: 0,
                    }),
                    StatKind::Advance,
                );
            }
            Pdu::SnackRequest(_) => self.conn.reject(reject::COMMAND_NOT_SUPPORTED, header),
            Pdu::LoginRequest(_) => {
                self.conn.reject(reject::PROTOCOL_ERROR, header);
                return Err(ConnError::Protocol("Login Request in the full feature phase".into()));
            }
            // Target PDUs sent by an initiator.
            _ => self.conn.reject(reject::PROTOCOL_ERROR, header),
        }
        Ok(None)
    }

    async fn command(&mut self, c: ScsiCommand, header: &[u8; BHS_LEN]) {
        let itt = c.itt;
        if self.pending.contains_key(&itt) || lock(&self.conn.tasks).contains_key(&itt) {
            self.conn.reject(reject::TASK_IN_PROGRESS, header);
            return;
        }
        let cmd = Cmd { itt, lun: c.lun, cdb: c.cdb, read: c.read, write: c.write, edtl: c.edtl };
        let imm = c.data;
        if !imm.is_empty()
            && (!c.write || !self.session().params.immediate_data || imm.len() as u64 > u64::from(c.edtl))
        {
            self.conn.reject(reject::PROTOCOL_ERROR, header);
            return;
        }
        // Back-pressure: a task slot, and this command's data within the
        // byte budget.
        let slot = Arc::clone(&self.slots).acquire_owned().await.ok();
        lock(&self.conn.tasks).insert(itt, Arc::new(TaskCtl::default()));
        if c.write && c.edtl > MAX_WRITE_LEN {
            let hold = Hold { _bytes: None, _slot: slot };
            self.conn.complete(&cmd, failed(Sense::invalid_cdb(0, None)), hold);
            return;
        }
        let want =
            (c.edtl.min(if c.write { MAX_WRITE_LEN } else { MAX_IO_BYTES }) as usize).min(MAX_BUFFERED);
        let bytes = if want == 0 {
            None
        } else {
            Arc::clone(&self.budget).acquire_many_owned(want as u32).await.ok()
        };
        let hold = Hold { _bytes: bytes, _slot: slot };
        if !c.write || c.edtl == 0 || imm.len() as u32 == c.edtl {
            self.start(cmd, imm, hold);
            return;
        }
        let params = self.session().params;
        let imm_len = imm.len() as u32;
        let unsolicited_end = if params.initial_r2t || c.final_ {
            imm_len
        } else {
            params.first_burst.min(c.edtl).max(imm_len)
        };
        let mut buf = PayloadBuf::new(&**self.conn.target.lu.device(), c.edtl as usize);
        buf.contents()[..imm.len()].copy_from_slice(&imm);
        let unsolicited = (unsolicited_end > imm_len).then_some(Seq {
            ttt: RESERVED_TAG,
            start: imm_len,
            len: unsolicited_end - imm_len,
            received: 0,
            next_sn: 0,
        });
        let mut pw = PendingWrite {
            cmd,
            buf,
            received: imm_len,
            unsolicited,
            r2ts: Vec::new(),
            next_offset: unsolicited_end,
            r2t_sn: 0,
            failed: None,
            hold,
        };
        self.solicit(&mut pw);
        self.pending.insert(itt, pw);
    }

    /// Sends R2Ts up to the outstanding limit.
    fn solicit(&mut self, pw: &mut PendingWrite) {
        let params = self.session().params;
        while pw.r2ts.len() < usize::from(params.max_outstanding_r2t.max(1)) && pw.next_offset < pw.cmd.edtl {
            let len = (pw.cmd.edtl - pw.next_offset).min(params.max_burst.max(512));
            let ttt = self.next_ttt;
            self.next_ttt = self.next_ttt.wrapping_add(1);
            if self.next_ttt == RESERVED_TAG {
                self.next_ttt = 1;
            }
            self.conn.send(
                Pdu::R2t(R2t {
                    lun: pw.cmd.lun,
                    itt: pw.cmd.itt,
                    ttt,
                    stat_sn: 0,
                    exp_cmd_sn: 0,
                    max_cmd_sn: 0,
                    r2t_sn: pw.r2t_sn,
                    offset: pw.next_offset,
                    desired_len: len,
                }),
                StatKind::Peek,
            );
            pw.r2t_sn += 1;
            pw.r2ts.push(Seq { ttt, start: pw.next_offset, len, received: 0, next_sn: 0 });
            pw.next_offset += len;
        }
    }

    fn data_out(&mut self, d: DataOut) {
        // Data for a task we do not know (finished, aborted, refused, or
        // never seen) is dropped.
        let Some(mut pw) = self.pending.remove(&d.itt) else { return };
        let phase_error = Sense::new(key::ABORTED_COMMAND, Asc::DATA_PHASE_ERROR);
        let seq = if d.ttt == RESERVED_TAG {
            pw.unsolicited.as_mut()
        } else {
            pw.r2ts.iter_mut().find(|s| s.ttt == d.ttt)
        };
        let mut seq_done = false;
        match seq {
            None => {
                pw.failed.get_or_insert(phase_error);
                seq_done = d.final_;
            }
            Some(seq) => {
                let len = d.data.len() as u32;
                let expected_offset = seq.start + seq.received;
                if d.data_sn != seq.next_sn || d.offset != expected_offset || seq.received + len > seq.len {
                    pw.failed.get_or_insert(phase_error);
                } else if pw.failed.is_none() {
                    let at = d.offset as usize;
                    pw.buf.contents()[at..at + d.data.len()].copy_from_slice(&d.data);
                }
                seq.next_sn = seq.next_sn.wrapping_add(1);
                seq.received = seq.received.saturating_add(len).min(seq.len);
                pw.received = pw.received.saturating_add(len).min(pw.cmd.edtl);
                if seq.received == seq.len || d.final_ {
                    if seq.received < seq.len {
                        // The initiator ended the sequence early.
                        pw.failed.get_or_insert(phase_error);
                    }
                    seq_done = true;
                }
            }
        }
        if seq_done {
            if d.ttt == RESERVED_TAG {
                pw.unsolicited = None;
            } else {
                pw.r2ts.retain(|s| s.ttt != d.ttt);
            }
        }
        if let Some(sense) = pw.failed
            && (seq_done || pw.received >= pw.cmd.edtl)
        {
            let cmd = pw.cmd.clone();
            self.conn.complete(&cmd, failed(sense), std::mem::take(&mut pw.hold));
            return;
        }
        if pw.received >= pw.cmd.edtl && pw.unsolicited.is_none() && pw.r2ts.is_empty() {
            let PendingWrite { cmd, buf, hold, .. } = pw;
            self.start(cmd, buf.freeze(), hold);
            return;
        }
        if seq_done {
            self.solicit(&mut pw);
        }
        self.pending.insert(d.itt, pw);
    }

    /// Hands a command with all its data to a task.
    fn start(&mut self, cmd: Cmd, data: Bytes, hold: Hold) {
        let conn = Arc::clone(&self.conn);
        tokio::spawn(async move {
            let target = &conn.target;
            let outcome = if lun_index(cmd.lun) == Some(0) {
                target.lu.execute(&conn.session.nexus, &cmd.cdb, data).await
            } else {
                missing_lun(&cmd.cdb)
            };
            conn.complete(&cmd, outcome, hold);
        });
    }

    fn task_management(&mut self, t: TaskMgmtRequest) {
        use crate::pdu::tmf::*;
        let itt = t.itt;
        let respond = move |conn: &Conn<D>, response: u8| {
            conn.send(
                Pdu::TaskMgmtResponse(TaskMgmtResponse {
                    response,
                    itt,
                    stat_sn: 0,
                    exp_cmd_sn: 0,
                    max_cmd_sn: 0,
                }),
                StatKind::Advance,
            )
        };
        let lun_ok = lun_index(t.lun) == Some(0);
        let function = t.function;
        match function {
            ABORT_TASK | ABORT_TASK_SET | CLEAR_TASK_SET | LOGICAL_UNIT_RESET | TARGET_WARM_RESET
            | TARGET_COLD_RESET => {}
            CLEAR_ACA => return respond(&self.conn, NOT_SUPPORTED),
            TASK_REASSIGN => return respond(&self.conn, REASSIGNMENT_NOT_SUPPORTED),
            _ => return respond(&self.conn, NOT_SUPPORTED),
        }
        let target_wide = matches!(function, TARGET_WARM_RESET | TARGET_COLD_RESET);
        if !lun_ok && !target_wide {
            return respond(&self.conn, LUN_DOES_NOT_EXIST);
        }
        // Which tasks go: one, or all of this session's.
        let only = (function == ABORT_TASK).then_some(t.ref_itt);
        let pick = |itt: u32| only.is_none_or(|r| r == itt);
        let mut dropped = false;
        let pending: Vec<u32> = self.pending.keys().copied().filter(|i| pick(*i)).collect();
        for itt in pending {
            self.pending.remove(&itt);
            lock(&self.conn.tasks).remove(&itt);
            dropped = true;
        }
        let running = self.conn.abort_where(pick);
        if function == ABORT_TASK && !dropped && running.is_empty() {
            return respond(&self.conn, TASK_DOES_NOT_EXIST);
        }
        let conn = Arc::clone(&self.conn);
        let cold = function == TARGET_COLD_RESET;
        tokio::spawn(async move {
            for ctl in running {
                ctl.wait().await;
            }
            match function {
                LOGICAL_UNIT_RESET => conn.target.lu.reset(Some(&conn.session.nexus), false),
                TARGET_WARM_RESET | TARGET_COLD_RESET => {
                    conn.target.lu.reset(Some(&conn.session.nexus), true)
                }
                _ => {}
            }
            respond(&conn, FUNCTION_COMPLETE);
            if cold {
                // A cold reset also ends the session.
                conn.session.close_all();
            }
        });
    }

    fn text_request(&mut self, t: TextRequest, header: &[u8; BHS_LEN]) {
        if self.text.len() + t.data.len() > MAX_TEXT {
            self.text.clear();
            self.conn.reject(reject::PROTOCOL_ERROR, header);
            return;
        }
        self.text.extend_from_slice(&t.data);
        let response = |data: Vec<u8>, final_: bool, ttt: u32| {
            Pdu::TextResponse(TextResponse {
                final_,
                cont: false,
                lun: t.lun,
                itt: t.itt,
                ttt,
                stat_sn: 0,
                exp_cmd_sn: 0,
                max_cmd_sn: 0,
                data: Bytes::from(data),
            })
        };
        if t.cont {
            // More text follows; acknowledge it.
            self.conn.send(response(Vec::new(), false, 1), StatKind::Advance);
            return;
        }
        let pairs = match text::parse(&std::mem::take(&mut self.text)) {
            Ok(p) => p,
            Err(_) => {
                self.conn.reject(reject::PROTOCOL_ERROR, header);
                return;
            }
        };
        let mut out: Vec<(String, String)> = Vec::new();
        for (k, v) in pairs {
            if k == "SendTargets" {
                let name = &self.conn.target.login.target_name;
                if v == "All" || v.is_empty() || &v == name {
                    out.push(("TargetName".into(), name.clone()));
                    let addr = self.conn.target.portal.clone().or_else(|| self.local.map(|a| a.to_string()));
                    if let Some(addr) = addr {
                        out.push(("TargetAddress".into(), format!("{addr},{}", self.conn.target.login.tpgt)));
                    }
                }
            } else {
                out.push((k, "NotUnderstood".into()));
            }
        }
        self.conn.send(response(text::encode(&out), true, RESERVED_TAG), StatKind::Advance);
    }
}

#[cfg(test)]
mod tests;
