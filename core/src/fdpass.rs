//! Passing descriptors along with stream bytes over a Unix socket
//! (`SCM_RIGHTS`): how a controller hands its payload memory
//! ([`crate::shm`]) to a replica with the Hello, and a replica its layer
//! files to a local controller ([`crate::local`]).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::pipe::cvt_size;

/// Most descriptors sent with one message: a data and a records file per
/// layer a replica lets a local controller read, and a validity word.
pub const MAX_FDS: usize = 2 * crate::local::MAX_LAYERS + 1;

/// Control-message space for [`MAX_FDS`] descriptors (and some slack).
const CMSG_SPACE: usize = 256;

#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_SPACE]);

/// One non-blocking `sendmsg` of (a prefix of) `bytes` on `sock` with
/// `fds` attached; returns the bytes sent (the descriptors go with them).
pub fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if bytes.is_empty() || fds.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "1 to MAX_FDS descriptors, with at least one byte",
        ));
    }
    let fds_len = (fds.len() * size_of::<RawFd>()) as u32;
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    let mut cbuf = CmsgBuf([0; CMSG_SPACE]);
    // SAFETY: zeroed msghdr is a valid empty header; we fill its fields.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fds_len) } as usize;
    assert!(space <= CMSG_SPACE);
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes of aligned, zeroed memory,
    // so CMSG_FIRSTHDR yields a header inside it, with room for the fds.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fds_len) as _;
        let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
        for (i, fd) in fds.iter().enumerate() {
            std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
        }
    }
    // SAFETY: msg and everything it points to are live for the call.
    cvt_size(unsafe {
        libc::sendmsg(sock.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
    })
}

/// One non-blocking `recvmsg` into `buf` on `sock`: the bytes received
/// and the descriptors that came with them, in order.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: `buf` is valid for writes of its length.
    unsafe { recv_raw(sock, buf.as_mut_ptr(), buf.len()) }
}

/// [`recv`] into the spare capacity of `buf`, which grows by the bytes
/// received.
pub fn recv_buf(sock: BorrowedFd<'_>, buf: &mut impl bytes::BufMut) -> io::Result<(usize, Vec<OwnedFd>)> {
    let spare = buf.chunk_mut();
    // SAFETY: the chunk is `spare.len()` writable bytes; recvmsg only
    // writes to them, never reads.
    let (n, fds) = unsafe { recv_raw(sock, spare.as_mut_ptr(), spare.len())? };
    // SAFETY: recvmsg initialised the first `n` bytes of the chunk.
    unsafe { buf.advance_mut(n) };
    Ok((n, fds))
}

/// [`recv`] into `len` bytes at `buf`.
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes.
unsafe fn recv_raw(sock: BorrowedFd<'_>, buf: *mut u8, len: usize) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec { iov_base: buf.cast(), iov_len: len };
    let mut cbuf = CmsgBuf([0; CMSG_SPACE]);
    // SAFETY: zeroed msghdr is a valid empty header; we fill its fields.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_SPACE as _;
    // SAFETY: msg and everything it points to are live for the call;
    // MSG_CMSG_CLOEXEC marks received descriptors close-on-exec.
    let n = cvt_size(unsafe {
        libc::recvmsg(sock.as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC)
    })?;
    let mut got = Vec::new();
    // SAFETY: the kernel filled msg_control with well-formed headers up to
    // msg_controllen; CMSG_FIRSTHDR/NXTHDR walk within it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    // Each received descriptor is ours now.
                    got.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "more descriptors than expected"));
    }
    Ok((n, got))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_descriptor_travels_with_the_first_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = tempfile_with(b"shared");
        let other = tempfile_with(b"other");
        send(a.as_fd(), b"hello", &[file.as_fd(), other.as_fd()]).unwrap();
        (&a).write_all(b" world").unwrap();
        let mut buf = [0u8; 64];
        let (n, fds) = recv(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello", "the bytes sent with descriptors arrive on their own");
        assert_eq!(fds.len(), 2);
        for (fd, want) in fds.into_iter().zip(["shared", "other"]) {
            let mut got = std::fs::File::from(fd);
            let mut s = String::new();
            got.rewind().unwrap();
            got.read_to_string(&mut s).unwrap();
            assert_eq!(s, want);
        }
        let (n, fds) = recv(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b" world");
        assert!(fds.is_empty());
        file.flush().unwrap();
    }

    fn tempfile_with(content: &[u8]) -> std::fs::File {
        // SAFETY: memfd_create with a NUL-terminated name; checked below.
        let raw = unsafe { libc::memfd_create(c"fdpass-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor that is ours alone.
        let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        f.write_all(content).unwrap();
        f
    }
}
