//! The portable engine: blocking pread/pwrite/fdatasync/fallocate on
//! tokio's blocking thread pool.
//!
//! A batch runs on one blocking thread, except that a batch with several
//! syncs gives each operation its own thread, so that the fdatasyncs of the
//! data and record files of a FUA write or FLUSH overlap.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::{Action, Batch, Completion, Outcome, Request, failed};

#[derive(Debug, Default)]
pub struct SyncEngine {}

impl SyncEngine {
    pub fn new() -> SyncEngine {
        SyncEngine {}
    }

    pub async fn run(&self, batch: Batch) -> Outcome {
        let n = batch.len();
        let syncs = batch.iter().filter(|r| matches!(r.action, Action::Fdatasync)).count();
        if syncs < 2 {
            // The closure owns the buffers, so a dropped caller frees nothing early.
            return tokio::task::spawn_blocking(move || batch.into_iter().map(execute).collect())
                .await
                .unwrap_or_else(|_| failed(n, "sync I/O task failed"));
        }
        let tasks: Vec<_> =
            batch.into_iter().map(|req| tokio::task::spawn_blocking(move || execute(req))).collect();
        let mut out = Vec::with_capacity(n);
        for task in tasks {
            out.push(task.await.unwrap_or_else(|_| Err(io::Error::other("sync I/O task failed"))));
        }
        out
    }
}

/// Executes one request with blocking syscalls (retrying EINTR and short
/// transfers, which `FileExt`'s `*_all_at` do for us).
pub fn execute(req: Request) -> io::Result<Completion> {
    let Request { file, offset, action } = req;
    match action {
        Action::Read(mut buf) => {
            file.read_exact_at(&mut buf, offset)?;
            Ok(Completion::Read(buf))
        }
        Action::Write { data, dsync: false } => {
            file.write_all_at(&data, offset)?;
            Ok(Completion::Done)
        }
        Action::Write { data, dsync: true } => {
            write_dsync(&file, &data, offset)?;
            Ok(Completion::Done)
        }
        Action::Fdatasync => {
            file.sync_data()?;
            Ok(Completion::Done)
        }
        Action::Fallocate { mode, len } => {
            fallocate(&file, mode, offset, len)?;
            Ok(Completion::Done)
        }
    }
}

/// pwritev2(2) with RWF_DSYNC, retrying EINTR and short writes.
fn write_dsync(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        let rest = &data[done..];
        let iov = libc::iovec { iov_base: rest.as_ptr().cast_mut().cast(), iov_len: rest.len() };
        let Ok(at) = libc::off_t::try_from(offset + done as u64) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: `iov` describes `rest`, which is borrowed (and so neither
        // freed nor moved) for the duration of the call; pwritev2 only reads
        // from it. The descriptor is valid while `file` is borrowed.
        let rc = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, at, libc::RWF_DSYNC) };
        match rc {
            0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            n if n > 0 => done += n as usize,
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

/// fallocate(2), retrying EINTR.
pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    loop {
        // SAFETY: fallocate only reads its integer arguments; the descriptor
        // is valid because `file` is borrowed for the duration of the call.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
