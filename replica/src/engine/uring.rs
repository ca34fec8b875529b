//! The io_uring engine: one ring per store, driven by one dedicated thread.
//!
//! Submitters push a job (a batch plus a oneshot reply) onto a shared queue
//! and, if the ring thread has not been woken since it last drained the
//! queue, write to an eventfd. The ring thread always keeps a read of that
//! eventfd in the ring, so one `submit_and_wait(1)` sleeps until either a
//! completion or new work arrives. Everything queued by then is submitted
//! together.
//!
//! The ring thread owns every in-flight job, with its buffers and files,
//! until the last completion of the job arrives: a buffer is freed (or
//! handed back) only once the kernel no longer refers to it. Short reads and
//! writes continue where they stopped; EINTR and EAGAIN are resubmitted.
//! On drop, the engine stops taking work, finishes what it has, and joins
//! its thread.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use io_uring::{IoUring, Probe, opcode, squeue, types};
use tokio::sync::oneshot;

use super::{Action, Batch, Completion, Outcome, Request, cache, failed};

/// Submission queue entries; the completion queue is twice as large.
const RING_ENTRIES: u32 = 256;
/// User data of the eventfd read.
const WAKE_TOKEN: u64 = u64::MAX;
/// Longest single read or write handed to the kernel; longer transfers
/// continue as if short.
const MAX_CHUNK: usize = 1 << 30;
/// Largest batch of buffered writes done on the caller's thread.
const INLINE_WRITE_MAX: usize = 4 << 20;
/// Largest single buffered write handed to the kernel where it may create
/// page-cache folios (see [`split_writes`] and [`buffered_piece`]).
const BUFFERED_WRITE_CHUNK: usize = 64 * 1024;

/// See the module documentation.
#[derive(Debug)]
pub struct UringEngine {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    eventfd: OwnedFd,
    direct: DirectCache,
}

#[derive(Debug, Default)]
struct Queue {
    incoming: Vec<Job>,
    /// The eventfd has been written since the ring thread last drained
    /// `incoming`, so further submitters need not write it again.
    woken: bool,
    shutdown: bool,
}

#[derive(Debug)]
struct Job {
    batch: Batch,
    reply: oneshot::Sender<Outcome>,
}

impl UringEngine {
    /// Starts the ring thread, which creates the ring, checks that the
    /// kernel supports every operation we use (and that a NOP completes),
    /// and reports back before serving.
    pub fn start() -> io::Result<UringEngine> {
        // SAFETY: eventfd(2) takes no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let shared =
            Arc::new(Shared { queue: Mutex::new(Queue::default()), eventfd, direct: DirectCache::default() });
        let thread_shared = shared.clone();
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new().name("jiva-uring".into()).spawn(move || {
            // The ring is created on this thread: with SINGLE_ISSUER, its
            // creator is the only task allowed to submit.
            match new_ring() {
                Ok(ring) => {
                    let _ = started_tx.send(Ok(()));
                    ring_thread(ring, thread_shared);
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                }
            }
        })?;
        match started_rx.recv() {
            Ok(Ok(())) => Ok(UringEngine { shared, thread: Some(thread) }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(io::Error::other("io_uring thread failed to start"))
            }
        }
    }

    pub async fn run(&self, batch: Batch) -> Outcome {
        let n = batch.len();
        if n == 0 {
            return Vec::new();
        }
        // Reads that the page cache can satisfy right now, and plain writes
        // into the page cache, complete inline, sparing the thread switches
        // to the ring thread (and, for buffered writes, which filesystems
        // such as ext4 cannot do without blocking, to an io-wq worker and
        // back); the rest go to the ring.
        let direct = |f: &Arc<File>| self.shared.direct.is_direct(f);
        let batch = match read_cached(batch, direct) {
            Ok(outcome) => return outcome,
            Err(batch) => batch,
        };
        let batch = match write_buffered(batch, direct) {
            Ok(outcome) => return outcome,
            Err(batch) => batch,
        };
        let (batch, pieces) = split_writes(batch, direct);
        let n_ops = batch.len();
        let (reply, rx) = oneshot::channel();
        let wake = {
            let mut queue = self.shared.lock();
            if queue.shutdown {
                return failed(n, "io_uring engine stopped");
            }
            queue.incoming.push(Job { batch, reply });
            !std::mem::replace(&mut queue.woken, true)
        };
        if wake {
            self.shared.wake();
        }
        let outcome = rx.await.unwrap_or_else(|_| failed(n_ops, "io_uring engine stopped"));
        match pieces {
            None => outcome,
            Some(pieces) => join_pieces(outcome, &pieces),
        }
    }
}

/// Splits buffered writes longer than [`BUFFERED_WRITE_CHUNK`] into
/// operations of that size (zero-copy slices of the payload), which the
/// ring runs in parallel. Returns the new batch and, if anything was split,
/// how many operations each original one became.
///
/// Why: the page cache sizes a new folio by the write that creates it, so
/// 1 MiB writes leave 1 MiB folios behind, and every later 4 KiB write
/// into one costs several times more CPU (about 28 us instead of 4 us per
/// pwrite on ext4 here) and dirties, so writes back, the whole folio.
///
/// Writes into pages that are all cached already are not split (see
/// [`buffered_piece`]).
fn split_writes(batch: Batch, direct: impl Fn(&Arc<File>) -> bool) -> (Batch, Option<Vec<usize>>) {
    let piece = |r: &Request| match &r.action {
        Action::Write { data, .. } if !direct(&r.file) => buffered_piece(&r.file, r.offset, data.len()),
        Action::Write { data, .. } => data.len(),
        _ => usize::MAX,
    };
    let longer =
        |r: &Request, size: usize| matches!(&r.action, Action::Write { data, .. } if data.len() > size);
    let sizes: Vec<usize> = batch.iter().map(piece).collect();
    if !batch.iter().zip(&sizes).any(|(r, &size)| longer(r, size)) {
        return (batch, None);
    }
    let mut out = Vec::with_capacity(batch.len());
    let mut pieces = Vec::with_capacity(batch.len());
    for (req, size) in batch.into_iter().zip(sizes) {
        if !longer(&req, size) {
            out.push(req);
            pieces.push(1);
            continue;
        }
        let Action::Write { data, dsync } = req.action else { unreachable!("checked above") };
        let mut at = 0;
        while at < data.len() {
            let end = (at + size).min(data.len());
            out.push(Request {
                file: req.file.clone(),
                offset: req.offset + at as u64,
                action: Action::Write { data: data.slice(at..end), dsync },
            });
            at = end;
        }
        pieces.push(data.len().div_ceil(size));
    }
    (out, Some(pieces))
}

/// How long the pieces of a buffered write of `len` bytes at `offset` of
/// `file` are: [`BUFFERED_WRITE_CHUNK`], except where every page it covers
/// is cached, where it goes whole.
///
/// Why: the page cache sizes a new folio by the write that creates it, so
/// pieces keep the folios that large writes leave behind small (see
/// [`split_writes`]). A write into cached pages keeps the folios it finds,
/// whatever its size, so pieces would only cost system calls there: 1 MiB
/// overwrites of a cached volume made 16 `pwrite`s each. Written whole,
/// one replica took 18 % more of them per second (4 of 4 paired rounds)
/// at 17 % less server CPU per write, three replicas 6 % more at 11 %
/// less. Pages evicted between the check and the write only cost a larger
/// folio.
fn buffered_piece(file: &File, offset: u64, len: usize) -> usize {
    if len > BUFFERED_WRITE_CHUNK && cache::fully_cached(file, offset, len as u64) == Some(true) {
        len
    } else {
        BUFFERED_WRITE_CHUNK
    }
}

/// The outcome of the original batch from that of its split form: an
/// operation failed if any of its pieces did.
fn join_pieces(outcome: Outcome, pieces: &[usize]) -> Outcome {
    let mut results = outcome.into_iter();
    pieces
        .iter()
        .map(|&n| {
            let mut joined = None;
            for r in results.by_ref().take(n) {
                joined = match (joined, r) {
                    (Some(Err(e)), _) => Some(Err(e)),
                    (_, r) => Some(r),
                };
            }
            joined.unwrap_or_else(|| Err(io::Error::other("operation did not run")))
        })
        .collect()
}

/// Completes `batch` without blocking if it holds only reads that the page
/// cache holds entirely (`preadv2` with `RWF_NOWAIT`); otherwise hands the
/// batch back untouched for the ring.
fn read_cached(mut batch: Batch, direct: impl Fn(&Arc<File>) -> bool) -> Result<Outcome, Batch> {
    if !batch.iter().all(|r| matches!(r.action, Action::Read(_))) {
        return Err(batch);
    }
    if batch.iter().any(|r| direct(&r.file)) {
        // O_DIRECT reads never come from the page cache, and a NOWAIT one
        // would still wait for the device on this thread.
        return Err(batch);
    }
    for req in batch.iter_mut() {
        let Action::Read(buf) = &mut req.action else { unreachable!("checked above") };
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: `iov` describes `buf`, which we own exclusively for the
        // duration of this synchronous call; the fd is open (we hold an Arc).
        let n = unsafe {
            libc::preadv2(req.file.as_raw_fd(), &iov, 1, req.offset as libc::off_t, libc::RWF_NOWAIT)
        };
        if n < 0 || n as usize != buf.len() {
            // Not (fully) cached, or an error: the ring retries it properly.
            return Err(batch);
        }
    }
    Ok(batch
        .into_iter()
        .map(|r| match r.action {
            Action::Read(buf) => Ok(Completion::Read(buf)),
            _ => unreachable!("checked above"),
        })
        .collect())
}

/// Whether files were opened with O_DIRECT, remembered per file so that
/// the inline paths cost no `fcntl` per request. Keyed by the address of
/// the file's `Arc` allocation; the entry holds a `Weak` to it, which keeps
/// that allocation (not the file) from being freed and its address reused
/// by another file while the entry exists.
#[derive(Debug, Default)]
struct DirectCache {
    files: Mutex<HashMap<usize, (Weak<File>, bool)>>,
}

impl DirectCache {
    /// Entries beyond which closed files are pruned.
    const PRUNE_AT: usize = 64;

    fn is_direct(&self, file: &Arc<File>) -> bool {
        let key = Arc::as_ptr(file) as usize;
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((weak, direct)) = files.get(&key)
            && weak.as_ptr() == Arc::as_ptr(file)
        {
            return *direct;
        }
        let direct = is_direct(file);
        if files.len() >= Self::PRUNE_AT {
            files.retain(|_, (weak, _)| weak.strong_count() > 0);
        }
        files.insert(key, (Arc::downgrade(file), direct));
        direct
    }
}

/// Whether `file` was opened with O_DIRECT.
fn is_direct(file: &File) -> bool {
    // SAFETY: fcntl(F_GETFL) on a descriptor we hold open.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags & libc::O_DIRECT != 0
}

/// Completes `batch` on the calling thread if it holds only writes without
/// DSYNC to files without O_DIRECT, of at most [`INLINE_WRITE_MAX`] bytes
/// in all: a copy into the page cache, which the
/// kernel would otherwise hand to an io-wq worker thread (ext4 cannot do
/// buffered writes asynchronously), costing two more thread switches than
/// the copy itself. Anything else is handed back untouched for the ring.
///
/// That holds for large writes too: up to 4 MiB inline, 256 KiB writes went
/// from 1484 to 2136 MiB/s with one replica (604 to 1064 with three, at
/// 45 % less CPU per write), 1 MiB writes stayed level with one replica and
/// gained 12 % with three. Larger batches stay on the ring, so that one
/// huge write does not hold up the replica's other requests for long.
///
/// Such a write blocks only for dirty-page throttling (bounded pauses) or
/// to read a partially overwritten page that is not cached; no I/O is in
/// flight once this returns, so buffer ownership is not a concern.
fn write_buffered(batch: Batch, direct: impl Fn(&Arc<File>) -> bool) -> Result<Outcome, Batch> {
    let mut total = 0;
    for r in &batch {
        match &r.action {
            Action::Write { data, dsync: false } => total += data.len(),
            _ => return Err(batch),
        }
    }
    if total > INLINE_WRITE_MAX || batch.iter().any(|r| direct(&r.file)) {
        return Err(batch);
    }
    Ok(batch
        .into_iter()
        .map(|req| {
            let Action::Write { data, .. } = &req.action else { unreachable!("checked above") };
            let piece = buffered_piece(&req.file, req.offset, data.len());
            let mut done = 0;
            while done < data.len() {
                let rest = &data[done..(done + piece).min(data.len())];
                // SAFETY: `rest` is a live, immutable slice for the duration
                // of this synchronous call; the fd is open (we hold an Arc).
                let n = unsafe {
                    libc::pwrite(
                        req.file.as_raw_fd(),
                        rest.as_ptr().cast(),
                        rest.len(),
                        (req.offset + done as u64) as libc::off_t,
                    )
                };
                if n < 0 {
                    let err = io::Error::last_os_error();
                    if err.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(err);
                }
                if n == 0 {
                    return Err(io::Error::from(io::ErrorKind::WriteZero));
                }
                done += n as usize;
            }
            Ok(Completion::Done)
        })
        .collect())
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        let one: u64 = 1;
        loop {
            // SAFETY: writes the 8 bytes of a live local to a descriptor owned
            // by `self`.
            let rc = unsafe { libc::write(self.eventfd.as_raw_fd(), (&raw const one).cast(), 8) };
            if rc == 8 {
                return;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                tracing::error!("cannot wake the io_uring thread: {err}");
                return;
            }
        }
    }
}

/// A ring for one submitting thread. Deferred task work (Linux 6.1+) runs
/// completions only when this thread waits for them, saving wakeups;
/// older kernels get a plain ring.
fn new_ring() -> io::Result<IoUring> {
    let mut ring = match IoUring::builder().setup_single_issuer().setup_defer_taskrun().build(RING_ENTRIES) {
        Ok(ring) => ring,
        Err(_) => IoUring::new(RING_ENTRIES)?,
    };
    probe(&mut ring)?;
    Ok(ring)
}

fn probe(ring: &mut IoUring) -> io::Result<()> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::Read::CODE, "read"),
        (opcode::Write::CODE, "write"),
        (opcode::Fsync::CODE, "fsync"),
        (opcode::Fallocate::CODE, "fallocate"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring does not support {name} on this kernel"),
            ));
        }
    }
    let nop = opcode::Nop::new().build().user_data(1);
    // SAFETY: a NOP refers to no memory.
    unsafe { ring.submission().push(&nop) }.map_err(|_| io::Error::other("submission queue full"))?;
    ring.submit_and_wait(1)?;
    let res = ring.completion().next().ok_or_else(|| io::Error::other("NOP did not complete"))?.result();
    if res < 0 {
        return Err(io::Error::from_raw_os_error(-res));
    }
    Ok(())
}

fn ring_thread(ring: IoUring, shared: Arc<Shared>) {
    let limit = ring.params().cq_entries() as usize - 1;
    let mut state = Ring {
        ring,
        shared,
        jobs: Vec::new(),
        free: Vec::new(),
        backlog: VecDeque::new(),
        in_kernel: 0,
        limit,
        wake_buf: Box::new(0),
        wake_armed: false,
        reaped: Vec::new(),
    };
    if std::panic::catch_unwind(AssertUnwindSafe(|| state.run())).is_err() {
        tracing::error!("io_uring thread panicked; failing its outstanding I/O");
        state.abandon();
        // The kernel may still write into buffers of in-flight operations, so
        // they (and the ring) must never be freed.
        let _ = ManuallyDrop::new(state);
    }
}

/// The ring thread's state.
struct Ring {
    ring: IoUring,
    shared: Arc<Shared>,
    /// In-flight jobs; a slot is freed only when all its operations are done.
    jobs: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Operations (tokens) waiting for room in the submission queue.
    backlog: VecDeque<u64>,
    /// Entries in the submission queue or in the kernel, the eventfd read
    /// included; kept below the completion queue size so it cannot overflow.
    in_kernel: usize,
    limit: usize,
    /// Target of the eventfd read; lives as long as the ring.
    wake_buf: Box<u64>,
    wake_armed: bool,
    reaped: Vec<(u64, i32)>,
}

struct InFlight {
    ops: Vec<Op>,
    remaining: usize,
    reply: Option<oneshot::Sender<Outcome>>,
}

struct Op {
    req: Request,
    /// Bytes transferred so far (reads and writes).
    done: usize,
    result: Option<io::Result<Completion>>,
}

fn token(slot: usize, op: usize) -> u64 {
    ((slot as u64) << 32) | op as u64
}

fn untoken(token: u64) -> (usize, usize) {
    ((token >> 32) as usize, (token & 0xffff_ffff) as usize)
}

impl Op {
    /// Bytes a read or write still has to move (0 for other operations).
    fn rest(&self) -> usize {
        match &self.req.action {
            Action::Read(buf) => buf.len() - self.done,
            Action::Write { data, .. } => data.len() - self.done,
            Action::Fdatasync | Action::Fallocate { .. } => 0,
        }
    }

    fn is_transfer(&self) -> bool {
        matches!(self.req.action, Action::Read(_) | Action::Write { .. })
    }

    /// The submission entry for what remains of this operation.
    fn entry(&mut self) -> squeue::Entry {
        let fd = types::Fd(self.req.file.as_raw_fd());
        let offset = self.req.offset + self.done as u64;
        let chunk = self.rest().min(MAX_CHUNK) as u32;
        match &mut self.req.action {
            Action::Read(buf) => {
                opcode::Read::new(fd, buf[self.done..].as_mut_ptr(), chunk).offset(offset).build()
            }
            Action::Write { data, dsync } => opcode::Write::new(fd, data[self.done..].as_ptr(), chunk)
                .offset(offset)
                .rw_flags(if *dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            Action::Fdatasync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            Action::Fallocate { mode, len } => {
                opcode::Fallocate::new(fd, *len).offset(self.req.offset).mode(*mode).build()
            }
        }
    }

    /// The operation's result once it has finished; hands a read's buffer back.
    fn finish(&mut self) -> Completion {
        match &mut self.req.action {
            Action::Read(buf) => Completion::Read(std::mem::take(buf)),
            _ => Completion::Done,
        }
    }
}

impl Ring {
    fn run(&mut self) {
        let mut shutdown = false;
        loop {
            shutdown |= self.admit();
            if !shutdown && !self.wake_armed {
                self.arm_wake();
            }
            self.fill();
            if shutdown && self.jobs.iter().all(Option::is_none) {
                if !self.wake_armed {
                    return;
                }
                // Complete our own eventfd read so that its buffer is free.
                self.shared.wake();
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {}
                Err(e) => {
                    tracing::error!("io_uring submit failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            self.reap();
        }
    }

    /// Takes newly queued jobs; returns whether the engine is shutting down.
    fn admit(&mut self) -> bool {
        let (jobs, shutdown) = {
            let mut queue = self.shared.lock();
            queue.woken = false;
            (std::mem::take(&mut queue.incoming), queue.shutdown)
        };
        for job in jobs {
            let slot = self.free.pop().unwrap_or_else(|| {
                self.jobs.push(None);
                self.jobs.len() - 1
            });
            let mut ops: Vec<Op> =
                job.batch.into_iter().map(|req| Op { req, done: 0, result: None }).collect();
            let mut remaining = 0;
            for (i, op) in ops.iter_mut().enumerate() {
                if op.is_transfer() && op.rest() == 0 {
                    op.result = Some(Ok(op.finish()));
                } else {
                    remaining += 1;
                    self.backlog.push_back(token(slot, i));
                }
            }
            self.jobs[slot] = Some(InFlight { ops, remaining, reply: Some(job.reply) });
            if remaining == 0 {
                self.complete(slot);
            }
        }
        shutdown
    }

    fn arm_wake(&mut self) {
        let buf: *mut u64 = &mut *self.wake_buf;
        let entry = opcode::Read::new(types::Fd(self.shared.eventfd.as_raw_fd()), buf.cast(), 8)
            .build()
            .user_data(WAKE_TOKEN);
        // SAFETY: `wake_buf` is heap memory owned by this state, which is
        // dropped only after the read has completed (`run` returns only when
        // it is not armed) or never (after a panic); the eventfd lives in
        // `shared`, which this state keeps alive.
        if unsafe { self.ring.submission().push(&entry) }.is_ok() {
            self.wake_armed = true;
            self.in_kernel += 1;
        }
    }

    /// Moves backlog operations into the submission queue while there is room.
    fn fill(&mut self) {
        let mut sq = self.ring.submission();
        while self.in_kernel < self.limit && !sq.is_full() {
            let Some(token) = self.backlog.pop_front() else { break };
            let (slot, i) = untoken(token);
            let op = &mut self.jobs[slot].as_mut().expect("backlog refers to a live job").ops[i];
            let entry = op.entry().user_data(token);
            // SAFETY: the entry points into `op`'s buffer (a Vec or Bytes heap
            // allocation, which does not move when `op` moves) and refers to
            // `op`'s file. `op` stays in `self.jobs` until the completion for
            // this entry has been reaped, and `self` is never dropped while
            // entries are in flight (see `run` and `ring_thread`).
            if unsafe { sq.push(&entry) }.is_err() {
                self.backlog.push_front(token);
                break;
            }
            self.in_kernel += 1;
        }
    }

    fn reap(&mut self) {
        self.reaped.clear();
        self.reaped.extend(self.ring.completion().map(|cqe| (cqe.user_data(), cqe.result())));
        for i in 0..self.reaped.len() {
            let (token, res) = self.reaped[i];
            self.in_kernel -= 1;
            if token == WAKE_TOKEN {
                self.wake_armed = false;
                if res < 0 && -res != libc::EINTR && -res != libc::EAGAIN {
                    tracing::error!("io_uring eventfd read failed: {}", io::Error::from_raw_os_error(-res));
                }
                continue;
            }
            self.completed(token, res);
        }
    }

    /// Handles the completion of one entry of a job's operation.
    fn completed(&mut self, token: u64, res: i32) {
        let (slot, i) = untoken(token);
        let job = self.jobs[slot].as_mut().expect("completion refers to a live job");
        let op = &mut job.ops[i];
        let result = if res < 0 {
            match -res {
                libc::EINTR | libc::EAGAIN => None,
                errno => Some(Err(io::Error::from_raw_os_error(errno))),
            }
        } else if op.is_transfer() {
            if res == 0 {
                Some(Err(match op.req.action {
                    Action::Read(_) => io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of file"),
                    _ => io::Error::from(io::ErrorKind::WriteZero),
                }))
            } else {
                op.done += res as usize;
                if op.rest() == 0 { Some(Ok(op.finish())) } else { None }
            }
        } else {
            Some(Ok(Completion::Done))
        };
        match result {
            // Interrupted or short: submit (the rest) again.
            None => self.backlog.push_back(token),
            Some(result) => {
                op.result = Some(result);
                job.remaining -= 1;
                if job.remaining == 0 {
                    self.complete(slot);
                }
            }
        }
    }

    fn complete(&mut self, slot: usize) {
        let job = self.jobs[slot].take().expect("completing a live job");
        self.free.push(slot);
        let outcome = job
            .ops
            .into_iter()
            .map(|op| op.result.unwrap_or_else(|| Err(io::Error::other("operation did not run"))))
            .collect();
        if let Some(reply) = job.reply {
            // The caller may have gone away; the results are then dropped.
            let _ = reply.send(outcome);
        }
    }

    /// After a panic: fail every job without freeing anything the kernel
    /// may still use, and refuse new work.
    fn abandon(&mut self) {
        let incoming = {
            let mut queue = self.shared.lock();
            queue.shutdown = true;
            std::mem::take(&mut queue.incoming)
        };
        for job in incoming {
            let n = job.batch.len();
            let _ = job.reply.send(failed(n, "io_uring engine failed"));
        }
        for job in self.jobs.iter_mut().flatten() {
            if let Some(reply) = job.reply.take() {
                let _ = reply.send(failed(job.ops.len(), "io_uring engine failed"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;

    /// An empty read-write file in a fresh temporary directory (kept alive
    /// by the returned guard).
    fn scratch_file() -> (tempfile::TempDir, Arc<File>) {
        let dir = tempfile::tempdir().unwrap();
        let file =
            File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("f"));
        (dir, Arc::new(file.unwrap()))
    }

    #[tokio::test]
    async fn cached_reads_complete_inline_and_uncached_ones_through_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..=255u8).cycle().take(256 * 1024).collect();
        std::fs::write(&path, &data).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        // In the page cache right after writing: served without the ring.
        let inline = read_cached(vec![Request::read(&file, 4096, 8192)], |f| is_direct(f))
            .expect("cached read completes inline");
        assert_eq!(&inline[0].as_ref().unwrap().clone_buf()[..], &data[4096..12288]);
        // Mixed batches always go to the ring.
        assert!(
            read_cached(vec![Request::read(&file, 0, 10), Request::fdatasync(&file)], |f| is_direct(f))
                .is_err()
        );
        // Evicted from the cache: NOWAIT refuses, and the ring reads it.
        file.sync_all().unwrap();
        // Eviction is best effort (a page briefly held elsewhere stays, e.g.
        // while tests run in parallel): ask again a few times.
        let evicted = (0..20).any(|_| {
            // SAFETY: plain fadvise(2) on an open descriptor.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            let cached = read_cached(vec![Request::read(&file, 65536, 131072)], |f| is_direct(f)).is_ok();
            if cached {
                std::thread::sleep(Duration::from_millis(10));
            }
            !cached
        });
        assert!(evicted, "evicted data read inline");
        let engine = UringEngine::start().expect("io_uring available");
        let out = engine.run(vec![Request::read(&file, 65536, 131072)]).await;
        assert_eq!(&out.into_iter().next().unwrap().unwrap().into_buf()[..], &data[65536..196608]);
    }

    #[tokio::test]
    async fn long_buffered_writes_are_split_and_joined() {
        let engine = UringEngine::start().expect("io_uring available");
        let (dir, file) = scratch_file();
        let data = Bytes::from((0..=250u8).cycle().take(BUFFERED_WRITE_CHUNK * 5 + 100).collect::<Vec<u8>>());
        let small = Bytes::from(vec![9u8; 10]);
        let batch = vec![Request::write(&file, 4096, data.clone()), Request::write(&file, 0, small.clone())];
        let (split, pieces) = split_writes(batch, |_| false);
        assert_eq!((split.len(), pieces), (7, Some(vec![6, 1])));
        let out = engine
            .run(vec![Request::write(&file, 4096, data.clone()), Request::write(&file, 0, small.clone())])
            .await;
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|r| r.is_ok()));
        let on_disk = std::fs::read(dir.path().join("f")).unwrap();
        assert_eq!(&on_disk[..10], &small[..]);
        assert_eq!(&on_disk[4096..], &data[..]);
        // A failed piece fails its operation only.
        let joined = join_pieces(
            vec![
                Ok(Completion::Done),
                Err(io::Error::other("x")),
                Ok(Completion::Done),
                Ok(Completion::Done),
            ],
            &[3, 1],
        );
        assert!(joined[0].is_err() && joined[1].is_ok());
    }

    #[tokio::test]
    async fn writes_into_cached_pages_go_whole() {
        use std::os::unix::fs::FileExt;
        let (dir, file) = scratch_file();
        let len = BUFFERED_WRITE_CHUNK * 4;
        // A new file caches nothing: pieces, so that new folios stay small.
        assert_eq!(buffered_piece(&file, 0, len), BUFFERED_WRITE_CHUNK);
        file.write_all_at(&vec![1u8; len], 0).unwrap();
        let Some(cached) = cache::fully_cached(&file, 0, len as u64) else {
            // No cachestat(2) here: always pieces.
            assert_eq!(buffered_piece(&file, 0, len), BUFFERED_WRITE_CHUNK);
            return;
        };
        assert!(cached, "pages not cached right after writing them");
        assert_eq!(buffered_piece(&file, 0, len), len);
        // Partly cached (it ends past what was written): pieces.
        assert_eq!(buffered_piece(&file, BUFFERED_WRITE_CHUNK as u64, len), BUFFERED_WRITE_CHUNK);
        // Small writes are never split either way.
        assert!(buffered_piece(&file, 0, 4096) >= 4096);

        // Whole on the ring path and inline, and stored as written.
        let over = Bytes::from((0..=240u8).cycle().take(len).collect::<Vec<u8>>());
        let (split, pieces) = split_writes(vec![Request::write(&file, 0, over.clone())], |_| false);
        assert_eq!((split.len(), pieces), (1, None));
        let engine = UringEngine::start().expect("io_uring available");
        let out = engine.run(vec![Request::write(&file, 0, over.clone())]).await;
        assert!(out.into_iter().all(|r| r.is_ok()));
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), over[..]);

        // Evicted (best effort, as above): pieces again.
        file.sync_all().unwrap();
        let evicted = (0..20).any(|_| {
            // SAFETY: plain fadvise(2) on an open descriptor.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            buffered_piece(&file, 0, len) == BUFFERED_WRITE_CHUNK
        });
        assert!(evicted, "evicted pages still counted as cached");
    }

    #[test]
    fn direct_io_is_remembered_per_file() {
        use std::os::unix::fs::OpenOptionsExt;
        let cache = DirectCache::default();
        let (dir, file) = scratch_file();
        assert!(!cache.is_direct(&file) && !cache.is_direct(&file));
        let direct = File::options().read(true).custom_flags(libc::O_DIRECT).open(dir.path().join("f"));
        // Some filesystems (tmpfs) refuse O_DIRECT.
        if let Ok(direct) = direct {
            let direct = Arc::new(direct);
            assert!(cache.is_direct(&direct) && cache.is_direct(&direct));
            assert!(!cache.is_direct(&file));
        }
        // Many short-lived files: dead entries are pruned, answers stay right.
        for _ in 0..3 * DirectCache::PRUNE_AT {
            let f = Arc::new(File::open(dir.path().join("f")).unwrap());
            assert!(!cache.is_direct(&f));
        }
        assert!(cache.files.lock().unwrap().len() <= DirectCache::PRUNE_AT + 2);
    }

    #[tokio::test]
    async fn batches_complete_and_shutdown_is_clean() {
        let engine = UringEngine::start().expect("io_uring available");
        let (_dir, file) = scratch_file();
        let data = Bytes::from((0..=255u8).cycle().take(1 << 20).collect::<Vec<u8>>());
        let out =
            engine.run(vec![Request::write(&file, 4096, data.clone()), Request::fdatasync(&file)]).await;
        assert!(out.iter().all(|r| r.is_ok()));
        let out = engine.run(vec![Request::read(&file, 4096, 1 << 20), Request::read(&file, 0, 0)]).await;
        let mut out = out.into_iter();
        assert_eq!(&out.next().unwrap().unwrap().into_buf()[..], &data[..]);
        assert!(out.next().unwrap().unwrap().into_buf().is_empty());
        // Past the end: an error, not a hang.
        let out = engine.run(vec![Request::read(&file, (1 << 20) + 4096, 10)]).await;
        assert_eq!(out[0].as_ref().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // Short, then past the end: the rest is resubmitted, then EOF.
        let out = engine.run(vec![Request::read(&file, 1 << 20, 8192)]).await;
        assert_eq!(out[0].as_ref().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // Many concurrent jobs, more than the ring holds at once.
        let engine = Arc::new(engine);
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let (engine, file) = (engine.clone(), file.clone());
            tasks.push(tokio::spawn(async move {
                let batch = (0..16).map(|j| Request::read(&file, 4096 + (i * 16 + j) * 256, 256)).collect();
                engine.run(batch).await.into_iter().all(|r| r.is_ok())
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap());
        }
        drop(engine);
    }

    #[tokio::test]
    async fn dropped_caller_does_not_cancel_io() {
        let engine = UringEngine::start().expect("io_uring available");
        let (dir, file) = scratch_file();
        let fut = engine.run(vec![Request::write(&file, 0, Bytes::from(vec![7u8; 1 << 20]))]);
        // Poll once so the job is queued, then drop the future.
        let _ = tokio::time::timeout(Duration::ZERO, fut).await;
        let out = engine.run(vec![Request::fdatasync(&file)]).await;
        assert!(out[0].is_ok());
        drop(engine);
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), vec![7u8; 1 << 20]);
    }
}
