//! Zero-copy sends of large payloads over a Unix stream socket.
//!
//! Writing a large buffer to a Unix socket copies it into freshly allocated
//! socket-buffer pages: cache-cold memory, the most expensive copy on the
//! controller↔replica path (a 1 MiB READ reply or WRITE payload). Instead,
//! [`ZeroCopy::send`] maps the payload's pages into a pipe (`vmsplice`) and
//! moves them from the pipe into the socket (`splice`), so the socket
//! buffers reference our memory and the receiver copies straight out of it.
//!
//! The price is that the payload must not change until the receiver has
//! copied it. `Bytes` are immutable while referenced, so each sent payload
//! is held (a clone of its `Bytes`) until the socket's unconsumed byte count
//! (`SIOCOUTQ`, the socket buffers not yet freed by the receiver) shows that
//! the stream has been consumed past its end. When the connection ends,
//! [`ZeroCopy::close`] waits until every socket buffer is freed (the peer
//! read them or closed); if the peer never does, the held payloads are
//! leaked rather than ever reused.
//!
//! A process-wide probe checks once that the kernel charges spliced pages to
//! the socket's send queue (the accounting the release rule relies on) and
//! that the pipe can hold a useful amount; if not, nothing is spliced.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;

use crate::pipe::{Piped, cvt, cvt_size};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Payloads at least this large are spliced; smaller ones are cheaper to copy.
pub const MIN_SPLICE_BYTES: usize = 64 * 1024;

/// Most payload bytes held for the receiver at once; beyond it frames are
/// copied until the receiver catches up.
const MAX_HELD_BYTES: usize = 32 * 1024 * 1024;

/// Pipe capacity asked for (the unprivileged maximum by default).
const PIPE_BYTES: i32 = 1024 * 1024;

/// Send buffer asked for on spliced sockets.
const SEND_BUFFER_BYTES: i32 = 4 * 1024 * 1024;

/// How long [`ZeroCopy::close`] waits for the peer before leaking.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// A non-blocking pipe, as (read end, write end), widened towards
/// [`PIPE_BYTES`]; returns its capacity too.
fn pipe() -> io::Result<(OwnedFd, OwnedFd, usize)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a pipe descriptor we own; failure leaves the default size.
    let widened = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
    let cap = if widened > 0 {
        widened as usize
    } else {
        // SAFETY: fcntl query on a pipe descriptor we own.
        cvt(unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) })? as usize
    };
    Ok((r, w, cap))
}

/// Bytes queued in `sock`'s send direction that the receiver has not freed
/// yet (SIOCOUTQ: socket buffers charged to the sender, each at least as
/// large as the data it carries).
fn unconsumed(sock: BorrowedFd<'_>) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer we pass.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &raw mut n) })?;
    Ok(n.max(0) as u64)
}

/// Moves the bytes of `parts`, in order (at most the pipe's free space),
/// into the pipe without copying; returns how many bytes went in.
fn vmsplice(pipe_w: BorrowedFd<'_>, parts: &[&[u8]]) -> io::Result<usize> {
    let iov: Vec<libc::iovec> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() })
        .collect();
    // SAFETY: each iovec describes a live slice that stays alive and
    // unchanged for as long as the caller holds its `Bytes` (see the module
    // docs); vmsplice only reads through them.
    cvt_size(unsafe { libc::vmsplice(pipe_w.as_raw_fd(), iov.as_ptr(), iov.len(), libc::SPLICE_F_NONBLOCK) })
}

/// Moves up to `len` bytes from the pipe into the socket.
fn splice_out(pipe_r: BorrowedFd<'_>, sock: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two descriptors we hold open, no offsets.
    cvt_size(unsafe {
        libc::splice(
            pipe_r.as_raw_fd(),
            std::ptr::null_mut(),
            sock.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    })
}

/// Asks for a send buffer of a few MiB (capped by `net.core.wmem_max`), so
/// that a spliced 1 MiB payload crosses in one or two splices instead of a
/// dozen partial ones, each waiting for the receiver. Best effort.
fn widen_send_buffer(sock: BorrowedFd<'_>) {
    if let Err(e) = crate::pipe::set_socket_int(sock, libc::SO_SNDBUF, SEND_BUFFER_BYTES) {
        tracing::debug!("SO_SNDBUF: {e}");
    }
}

/// Whether this kernel's accounting allows zero-copy sends (checked once).
pub fn supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| match probe() {
        Ok(ok) => ok,
        Err(e) => {
            tracing::debug!("zero-copy socket sends unavailable: {e}");
            false
        }
    })
}

/// Splices 64 KiB into a socket nobody reads and checks that the send queue
/// accounts for at least that much, and that the data arrives intact.
fn probe() -> io::Result<bool> {
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    a.set_nonblocking(true)?;
    let (r, w, cap) = pipe()?;
    if cap < MIN_SPLICE_BYTES {
        return Ok(false);
    }
    let data: Vec<u8> = (0..MIN_SPLICE_BYTES).map(|i| (i % 251) as u8).collect();
    let mut queued = 0;
    while queued < data.len() {
        let n = vmsplice(w.as_fd(), &[&data[queued..]])?;
        let mut left = n;
        while left > 0 {
            left -= splice_out(r.as_fd(), a.as_fd(), left)?;
        }
        queued += n;
    }
    let charged = unconsumed(a.as_fd())?;
    let mut got = vec![0u8; data.len()];
    std::io::Read::read_exact(&mut &b, &mut got)?;
    Ok(charged >= data.len() as u64 && got == data)
}

/// Zero-copy sender for one Unix stream socket. See the module docs.
pub struct ZeroCopy {
    /// A duplicate of the socket's descriptor, registered for writability.
    sock: AsyncFd<OwnedFd>,
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    /// Bytes written to the socket so far, by any path.
    written: u64,
    /// Spliced payloads with the stream offset just past their end.
    held: VecDeque<(u64, Bytes)>,
    held_bytes: usize,
    /// A send failed part-way: offsets are unknown, release only at close.
    broken: bool,
}

impl std::fmt::Debug for ZeroCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeroCopy").field("written", &self.written).field("held", &self.held.len()).finish()
    }
}

impl ZeroCopy {
    /// A sender for `sock` (a connected Unix stream socket), or `None` where
    /// zero-copy sends are unsupported. Must be called inside a tokio runtime.
    pub fn new(sock: BorrowedFd<'_>) -> Option<ZeroCopy> {
        if !supported() {
            return None;
        }
        let make = || -> io::Result<ZeroCopy> {
            widen_send_buffer(sock);
            let (pipe_r, pipe_w, _) = pipe()?;
            let sock = crate::pipe::register_duplicate(sock, Interest::WRITABLE)?;
            Ok(ZeroCopy {
                sock,
                pipe_r,
                pipe_w,
                written: 0,
                held: VecDeque::new(),
                held_bytes: 0,
                broken: false,
            })
        };
        make().map_err(|e| tracing::debug!("zero-copy sender not set up: {e}")).ok()
    }

    /// Whether a payload of `len` bytes should be spliced. Call only when
    /// every byte written so far has reached the socket (buffers flushed):
    /// it first releases payloads the receiver has consumed.
    pub fn wants(&mut self, len: usize) -> bool {
        if len < MIN_SPLICE_BYTES || self.broken {
            return false;
        }
        // Release promptly: held payloads keep their buffers (pooled or the
        // frontend's receive buffers) from being reused while warm.
        self.reclaim();
        self.held_bytes + len <= MAX_HELD_BYTES
    }

    /// Records `n` bytes written to the socket by other means (headers,
    /// copied payloads), to keep stream offsets right.
    pub fn count(&mut self, n: usize) {
        self.written += n as u64;
    }

    /// Releases held payloads the receiver has consumed. Call only when
    /// every byte counted has reached the socket.
    pub fn reclaim(&mut self) {
        if self.held.is_empty() || self.broken {
            return;
        }
        let Ok(left) = unconsumed(self.sock.get_ref().as_fd()) else { return };
        // Every unfreed socket buffer is charged at least its length and
        // they are the newest ones, so everything before this is freed.
        let consumed = self.written.saturating_sub(left);
        while let Some((end, _)) = self.held.front() {
            if *end > consumed {
                break;
            }
            let (_, data) = self.held.pop_front().expect("front exists");
            self.held_bytes -= data.len();
        }
    }

    /// Sends a frame, `head` then `data`, without copying either; the
    /// caller must have flushed any buffered writes to the same socket
    /// first (ordering). Both are held from the start, so even a failed or
    /// abandoned send never frees memory the socket may still reference.
    pub async fn send_frame(&mut self, head: Bytes, data: Bytes) -> io::Result<()> {
        let total = head.len() + data.len();
        let start = self.written;
        self.written += total as u64;
        self.held_bytes += total;
        self.held.push_back((self.written, data.clone()));
        self.held.push_back((self.written, head.clone()));
        self.broken = true;
        let mut sent = 0;
        while sent < total {
            let parts: [&[u8]; 2] = if sent < head.len() {
                [&head[sent..], &data[..]]
            } else {
                [&data[sent - head.len()..], &[]]
            };
            let n = vmsplice(self.pipe_w.as_fd(), &parts)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "vmsplice moved nothing"));
            }
            let mut left = n;
            while left > 0 {
                let mut guard = self.sock.writable().await?;
                match guard.try_io(|fd| splice_out(self.pipe_r.as_fd(), fd.get_ref().as_fd(), left)) {
                    Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(Ok(m)) => left -= m,
                    Ok(Err(e)) => return Err(e),
                    Err(_would_block) => {}
                }
            }
            sent += n;
        }
        debug_assert_eq!(self.written, start + total as u64);
        self.broken = false;
        Ok(())
    }

    /// Sends what `pipe` holds (its pages are not ours to reuse, so nothing
    /// is held for them); the caller has sent everything before it.
    pub async fn send_piped(&mut self, mut pipe: Piped) -> io::Result<()> {
        self.written += pipe.len() as u64;
        self.broken = true;
        crate::pipe::drain_to_socket(&mut pipe, crate::pipe::Socket::Fd(&self.sock)).await?;
        self.broken = false;
        Ok(())
    }

    /// Waits (bounded) until the receiver has freed every socket buffer,
    /// then releases the held payloads; leaks them if it never does. Call
    /// after shutting down the writing direction, before dropping the
    /// socket's last descriptor elsewhere does not matter: this sender
    /// keeps its own.
    pub async fn close(mut self) {
        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        let mut pause = Duration::from_micros(200);
        while !self.held.is_empty() {
            match unconsumed(self.sock.get_ref().as_fd()) {
                Ok(0) => {
                    self.held.clear();
                    return;
                }
                Ok(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                _ => break,
            }
        }
        if !self.held.is_empty() {
            tracing::warn!(
                payloads = self.held.len(),
                bytes = self.held_bytes,
                "peer never consumed zero-copy payloads; leaking them rather than reusing the memory"
            );
            for (_, data) in self.held.drain(..) {
                std::mem::forget(data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn this_kernel_supports_it() {
        // The probe documents what the release rule relies on; on a kernel
        // without it the sender is simply never used.
        assert!(supported(), "SIOCOUTQ does not account spliced pages on this kernel");
    }

    #[tokio::test]
    async fn payloads_arrive_intact_and_are_released_once_read() {
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let Some(mut zc) = ZeroCopy::new(a.as_fd()) else { return };
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 3 * 300_003 + 5];
            b.read_exact(&mut got).await.unwrap();
            (got, b)
        });
        let mut expect = Vec::new();
        for k in 0..3u8 {
            let data: Vec<u8> = (0..300_000u32).map(|i| (i as u8) ^ k).collect();
            assert!(zc.wants(data.len()));
            let head = Bytes::from(vec![k; 3]);
            expect.extend_from_slice(&head);
            expect.extend_from_slice(&data);
            zc.send_frame(head, Bytes::from(data)).await.unwrap();
        }
        // A copied write in between keeps the offsets right.
        a.try_write(b"tail!").unwrap();
        zc.count(5);
        expect.extend_from_slice(b"tail!");
        let (got, _b) = reader.await.unwrap();
        assert!(got == expect, "stream differs");
        zc.reclaim();
        assert_eq!(zc.held.len(), 0, "read payloads are released");
        zc.close().await;
    }

    #[tokio::test]
    async fn unread_payloads_stay_held() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let Some(mut zc) = ZeroCopy::new(a.as_fd()) else { return };
        zc.send_frame(Bytes::new(), Bytes::from(vec![7u8; 100_000])).await.unwrap();
        zc.reclaim();
        assert_eq!(zc.held_bytes, 100_000, "nothing read yet");
        // Closing the reader frees its queue; close() then releases.
        drop(b);
        zc.close().await;
    }
}
