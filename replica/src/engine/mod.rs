//! I/O engines: execute batches of positioned file operations and complete
//! them asynchronously.
//!
//! The store builds each request as one [`Batch`] of operations (e.g. the
//! data read and the record read of a 4 KiB read) and awaits the batch.
//! Every operation owns its buffer and an `Arc` of its file, and the engine
//! owns the operation until the kernel has finished with it, so dropping
//! the caller's future never frees memory the kernel may still write into,
//! nor closes a descriptor in use.
//!
//! Two engines: [`uring`] (one io_uring per store, driven by a dedicated
//! thread) and [`sync`] (blocking syscalls on tokio's blocking pool).

use std::fmt;
use std::fs::File;
use std::io;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;

use self::aligned::AlignedBuf;
use jiva_core::{Error, ErrorKind};

pub mod aligned;
pub mod cache;
pub mod sync;
pub mod uring;

/// Which engine a store uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// io_uring, one ring and one thread per store.
    Uring,
    /// pread/pwrite/fdatasync on tokio's blocking thread pool.
    Sync,
}

impl FromStr for EngineKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<EngineKind, Error> {
        match s {
            "uring" => Ok(EngineKind::Uring),
            "sync" => Ok(EngineKind::Sync),
            other => Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("unknown I/O engine {other:?} (expected \"uring\" or \"sync\")"),
            )),
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "uring",
            EngineKind::Sync => "sync",
        })
    }
}

/// What to do at [`Request::offset`] of [`Request::file`].
#[derive(Debug)]
pub enum Action {
    /// Fill the buffer from the file (its whole length; EOF is an error).
    Read(AlignedBuf),
    /// Write the whole buffer; with `dsync`, durably (RWF_DSYNC).
    Write { data: Bytes, dsync: bool },
    /// fdatasync the file (offset ignored).
    Fdatasync,
    /// fallocate(2) `len` bytes with `mode`.
    Fallocate { mode: i32, len: u64 },
}

/// One positioned operation.
#[derive(Debug)]
pub struct Request {
    pub file: Arc<File>,
    pub offset: u64,
    pub action: Action,
}

impl Request {
    pub fn read(file: &Arc<File>, offset: u64, len: usize) -> Request {
        Request { file: file.clone(), offset, action: Action::Read(AlignedBuf::for_overwrite(len)) }
    }

    pub fn write(file: &Arc<File>, offset: u64, data: Bytes) -> Request {
        Request { file: file.clone(), offset, action: Action::Write { data, dsync: false } }
    }

    /// A write that is durable when it completes (force unit access).
    pub fn write_dsync(file: &Arc<File>, offset: u64, data: Bytes) -> Request {
        Request { file: file.clone(), offset, action: Action::Write { data, dsync: true } }
    }

    pub fn fdatasync(file: &Arc<File>) -> Request {
        Request { file: file.clone(), offset: 0, action: Action::Fdatasync }
    }

    pub fn fallocate(file: &Arc<File>, mode: i32, offset: u64, len: u64) -> Request {
        Request { file: file.clone(), offset, action: Action::Fallocate { mode, len } }
    }
}

/// The result of one successful operation.
#[derive(Debug)]
pub enum Completion {
    /// A read's filled buffer.
    Read(AlignedBuf),
    /// Anything else.
    Done,
}

impl Completion {
    /// A copy of a read's buffer (empty for other operations).
    pub fn clone_buf(&self) -> Vec<u8> {
        match self {
            Completion::Read(buf) => buf.to_vec(),
            Completion::Done => Vec::new(),
        }
    }

    /// The buffer of a read (empty for other operations).
    pub fn into_buf(self) -> AlignedBuf {
        match self {
            Completion::Read(buf) => buf,
            Completion::Done => AlignedBuf::default(),
        }
    }
}

/// Operations submitted together; they may run in any order and in parallel.
pub type Batch = Vec<Request>;
/// Per-operation results, in the batch's order.
pub type Outcome = Vec<io::Result<Completion>>;

/// A running engine.
#[derive(Debug)]
pub enum Engine {
    Uring(uring::UringEngine),
    Sync(sync::SyncEngine),
}

impl Engine {
    /// Starts an engine of `kind`; `None` tries io_uring and falls back to
    /// the sync engine (with a warning) if the kernel refuses it.
    pub fn start(kind: Option<EngineKind>) -> io::Result<Engine> {
        match kind {
            Some(EngineKind::Uring) => Ok(Engine::Uring(uring::UringEngine::start()?)),
            Some(EngineKind::Sync) => Ok(Engine::Sync(sync::SyncEngine::new())),
            None => match uring::UringEngine::start() {
                Ok(e) => Ok(Engine::Uring(e)),
                Err(e) => {
                    tracing::warn!("io_uring unavailable ({e}); using the sync I/O engine");
                    Ok(Engine::Sync(sync::SyncEngine::new()))
                }
            },
        }
    }

    pub fn kind(&self) -> EngineKind {
        match self {
            Engine::Uring(_) => EngineKind::Uring,
            Engine::Sync(_) => EngineKind::Sync,
        }
    }

    /// Runs `batch` to completion. Dropping the returned future abandons
    /// the results, not the operations.
    pub async fn run(&self, batch: Batch) -> Outcome {
        match self {
            Engine::Uring(e) => e.run(batch).await,
            Engine::Sync(e) => e.run(batch).await,
        }
    }
}

/// `n` copies of an engine-level failure, for a batch that never ran.
fn failed(n: usize, why: &str) -> Outcome {
    (0..n).map(|_| Err(io::Error::other(why.to_owned()))).collect()
}
