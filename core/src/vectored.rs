//! Writing a frame (a header and a payload in separate buffers) to a
//! stream without first copying them together.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::pipe::Piped;
use crate::splice::ZeroCopy;

/// Writes a frame through `w`, or, when `zc` takes it, flushes `w` and
/// splices the frame (header and payload) without a copy. Keeps `zc`'s
/// stream offsets right either way.
pub async fn send_frame<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    zc: Option<&mut ZeroCopy>,
    head: &[u8],
    data: Bytes,
) -> io::Result<()> {
    let Some(zc) = zc else { return write_frame(w, head, &data).await };
    if data.len() < crate::splice::MIN_SPLICE_BYTES {
        zc.count(head.len() + data.len());
        return write_frame(w, head, &data).await;
    }
    // Everything counted so far must be in the socket before `wants`
    // (which releases consumed payloads) and before the splice (ordering).
    w.flush().await?;
    if !zc.wants(data.len()) {
        zc.count(head.len() + data.len());
        return write_frame(w, head, &data).await;
    }
    // The header is spliced too (one syscall pair per frame), so it needs
    // memory of its own that lives as long as the payload's.
    zc.send_frame(Bytes::copy_from_slice(head), data).await
}

/// Writes a frame whose payload is in a pipe: spliced where `zc` can,
/// else read out of the pipe and written.
pub async fn send_piped<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    zc: Option<&mut ZeroCopy>,
    head: &[u8],
    data: Piped,
) -> io::Result<()> {
    let Some(zc) = zc else { return write_frame(w, head, &data.into_bytes()?).await };
    zc.count(head.len());
    w.write_all(head).await?;
    w.flush().await?;
    zc.send_piped(data).await
}

/// Writes `head` then `data` with vectored writes. Behind a
/// [`tokio::io::BufWriter`], small frames are gathered in its buffer and
/// large ones go to the stream in one `writev` each (head and payload
/// together, the payload never copied in user space).
pub async fn write_frame<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    head: &[u8],
    data: &[u8],
) -> io::Result<()> {
    let (mut head, mut data) = (head, data);
    while !head.is_empty() || !data.is_empty() {
        let n = if head.is_empty() {
            w.write(data).await?
        } else {
            w.write_vectored(&[IoSlice::new(head), IoSlice::new(data)]).await?
        };
        consume(&mut head, &mut data, n)?;
    }
    Ok(())
}

/// Sends `head` then `data` on a non-blocking stream socket from a thread
/// that may block: waits in `poll` while the socket is full. For large
/// frames written off the runtime thread, so that its copy into the
/// socket runs beside the runtime's other work. Gives up with
/// `ConnectionAborted` once `cancel` is set (checked whenever the socket is
/// full, at least every 50 ms), so a client that stops reading cannot keep
/// the thread forever.
pub fn send_frame_blocking(
    fd: BorrowedFd<'_>,
    head: &[u8],
    data: &[u8],
    cancel: &AtomicBool,
) -> io::Result<()> {
    let (mut head, mut data) = (head, data);
    while !head.is_empty() || !data.is_empty() {
        let iov = [
            libc::iovec { iov_base: head.as_ptr().cast_mut().cast(), iov_len: head.len() },
            libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: data.len() },
        ];
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr().cast_mut();
        msg.msg_iovlen = iov.len();
        // SAFETY: `msg` points at two iovecs over live slices that outlive
        // the call; sendmsg only reads them. MSG_NOSIGNAL: a closed peer
        // is an EPIPE error, not a signal.
        let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(io::ErrorKind::ConnectionAborted.into());
                    }
                    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                    // SAFETY: one valid pollfd, for the duration of the call.
                    unsafe { libc::poll(&mut pfd, 1, 50) };
                    continue;
                }
                _ => return Err(e),
            }
        }
        consume(&mut head, &mut data, n as usize)?;
    }
    Ok(())
}

/// Drops the first `n` bytes written from the front of `head` then `data`;
/// a write of nothing is an error (the stream takes no more).
fn consume(head: &mut &[u8], data: &mut &[u8], n: usize) -> io::Result<()> {
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    let from_head = n.min(head.len());
    *head = &head[from_head..];
    *data = &data[n - from_head..];
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::write_frame;

    #[tokio::test]
    async fn frames_arrive_whole_through_short_writes() {
        let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
        // A duplex pipe with a small buffer forces partial writes.
        let (mut a, mut b) = tokio::io::duplex(1000);
        let expect = [&b"head"[..], &data[..]].concat();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut b, &mut got).await.unwrap();
            got
        });
        let mut w = tokio::io::BufWriter::with_capacity(4096, &mut a);
        write_frame(&mut w, b"head", &data).await.unwrap();
        write_frame(&mut w, b"", b"").await.unwrap();
        tokio::io::AsyncWriteExt::flush(&mut w).await.unwrap();
        drop(w);
        drop(a);
        assert_eq!(reader.await.unwrap(), expect);
    }

    #[test]
    fn blocking_frames_arrive_whole_and_a_stalled_one_gives_up_when_cancelled() {
        use std::io::Read;
        use std::os::fd::AsFd;
        use std::sync::atomic::{AtomicBool, Ordering};

        let data: Vec<u8> = (0..=255u8).cycle().take(4 << 20).collect();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let cancel = AtomicBool::new(false);
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 4 + (4 << 20)];
            b.read_exact(&mut got).unwrap();
            (got, b)
        });
        super::send_frame_blocking(a.as_fd(), b"head", &data, &cancel).unwrap();
        let (got, b) = reader.join().unwrap();
        assert_eq!(&got[..4], b"head");
        assert!(got[4..] == data[..]);

        // Nobody reads now: the socket fills, and the send ends once cancelled.
        let err = std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(100));
                cancel.store(true, Ordering::Relaxed);
            });
            super::send_frame_blocking(a.as_fd(), b"head", &data, &cancel).unwrap_err()
        });
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted);
        drop(b);
    }
}
