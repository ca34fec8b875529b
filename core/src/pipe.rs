//! Payloads that travel in a pipe instead of our memory.
//!
//! A large READ crosses three processes: the replica's page cache, the
//! controller, the client's socket. Copying it into the controller's memory
//! and out again costs two passes over every byte (the profiles' largest
//! item for 1 MiB reads). A [`Piped`] payload is a pipe holding references
//! to the pages instead: the replica splices page-cache pages into it and
//! on into its socket, the controller splices them from that socket into a
//! pipe and on into the client's socket; nobody copies until the client
//! reads. Large WRITE payloads take the same road the other way: spliced
//! from the client's socket into a pipe, duplicated (`tee`) per replica and
//! spliced into each replica's socket; the replica's receive is the first
//! copy.
//!
//! What may go into a pipe that leaves the process: pages nobody will
//! change in place while they are referenced — page-cache pages (a later
//! write to the file is a later request, ordered after the client has its
//! reply), socket buffers received from a peer, and copies written into the
//! pipe. Never our own reusable buffers (see [`crate::splice`] for how those
//! are sent without a copy, and why its receivers must copy).
//!
//! A pipe's capacity is counted in slots (one per page or page fragment),
//! so "full" can come before its byte size; every filler reports that as
//! [`Filled::Full`] and callers fall back to copying.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use bytes::{Bytes, BytesMut};

/// Payloads at least this large are worth a pipe; smaller ones are cheaper
/// to copy.
pub const MIN_PIPED_BYTES: usize = 256 * 1024;

/// WRITE payloads at least this large are received into a pipe and
/// passed to the replicas from it (smaller ones cost more in pipe set-up
/// than the copy saves: 256 KiB writes measured 14 % slower piped).
pub const MIN_PIPED_WRITE_BYTES: usize = 512 * 1024;

/// Largest payload held in one pipe: the unprivileged pipe size limit
/// (`/proc/sys/fs/pipe-max-size`, 1 MiB by default).
pub const MAX_PIPED_BYTES: usize = 1024 * 1024;

/// A libc return code as a result (negative: `errno`).
pub(crate) fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// A libc byte count as a result (negative: `errno`).
pub(crate) fn cvt_size(rc: libc::ssize_t) -> io::Result<usize> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc as usize) }
}

/// A READ or WRITE payload of known length held in a pipe. See the module
/// docs. Dropping it drops the page references.
pub struct Piped {
    r: OwnedFd,
    w: OwnedFd,
    /// Bytes in the pipe.
    len: usize,
}

impl std::fmt::Debug for Piped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Piped").field("len", &self.len).finish()
    }
}

/// How far a filler got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filled {
    /// Everything asked for is in the pipe.
    Done,
    /// The pipe ran out of slots after this many of the bytes asked for.
    Full(usize),
}

impl Piped {
    /// An empty pipe that can hold `len` bytes in whole pages (at most
    /// [`MAX_PIPED_BYTES`]); fails where the system will not size one so.
    pub fn with_capacity(len: usize) -> io::Result<Piped> {
        if len > MAX_PIPED_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "payload too large for a pipe"));
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array we pass.
        cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
        // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let want = i32::try_from(len.next_multiple_of(4096).max(4096)).unwrap_or(i32::MAX);
        // SAFETY: fcntl on a pipe descriptor we own.
        let size = cvt(unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, want) })?;
        if (size as usize) < len {
            return Err(io::Error::other("pipe smaller than asked for"));
        }
        Ok(Piped { r, w, len: 0 })
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a copy of `data`.
    pub fn push_bytes(&mut self, mut data: &[u8]) -> io::Result<Filled> {
        let asked = data.len();
        while !data.is_empty() {
            // SAFETY: writes from a live slice into a pipe we own.
            let rc = unsafe { libc::write(self.w.as_raw_fd(), data.as_ptr().cast(), data.len()) };
            match cvt_size(rc) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.len += n;
                    data = &data[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Filled::Full(asked - data.len()));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Filled::Done)
    }

    /// Appends `len` bytes of `file` from `offset` by reference to its
    /// page-cache pages (which the file system reads in if it must).
    pub fn push_file(&mut self, file: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Filled> {
        let mut at = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut moved = 0;
        while moved < len {
            // SAFETY: splice from a file descriptor the caller keeps open, at
            // an offset we own, into our pipe; the kernel advances `at`.
            let rc = unsafe {
                libc::splice(
                    file.as_raw_fd(),
                    &raw mut at,
                    self.w.as_raw_fd(),
                    std::ptr::null_mut(),
                    len - moved,
                    libc::SPLICE_F_NONBLOCK,
                )
            };
            match cvt_size(rc) {
                Ok(0) => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file ends before the range"));
                }
                Ok(n) => {
                    moved += n;
                    self.len += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Filled::Full(moved)),
                Err(e) => return Err(e),
            }
        }
        Ok(Filled::Done)
    }

    /// One non-blocking splice of up to `len` bytes from `sock` (a socket
    /// or pipe) into the pipe. `Ok(None)` when `sock` has nothing to give
    /// right now; `Ok(Some(0))` at end of stream.
    pub fn splice_in(&mut self, sock: BorrowedFd<'_>, len: usize) -> io::Result<Option<usize>> {
        // SAFETY: splice between two descriptors we hold open, no offsets.
        let rc = unsafe {
            libc::splice(
                sock.as_raw_fd(),
                std::ptr::null_mut(),
                self.w.as_raw_fd(),
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
            )
        };
        match cvt_size(rc) {
            Ok(n) => {
                self.len += n;
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One non-blocking splice of up to `len` of the held bytes into
    /// `sock`; `Ok(None)` when `sock` cannot take any right now.
    pub fn splice_out(&mut self, sock: BorrowedFd<'_>, len: usize) -> io::Result<Option<usize>> {
        let len = len.min(self.len);
        // SAFETY: splice between two descriptors we hold open, no offsets.
        let rc = unsafe {
            libc::splice(
                self.r.as_raw_fd(),
                std::ptr::null_mut(),
                sock.as_raw_fd(),
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
            )
        };
        match cvt_size(rc) {
            Ok(n) => {
                self.len -= n;
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Duplicates the held bytes into a new pipe without consuming them
    /// (`tee`: the pages are shared, not copied).
    pub fn try_clone(&self) -> io::Result<Piped> {
        let mut copy = Piped::with_capacity(self.len)?;
        while copy.len < self.len {
            // SAFETY: tee between two pipes we own.
            let rc = unsafe {
                libc::tee(
                    self.r.as_raw_fd(),
                    copy.w.as_raw_fd(),
                    self.len - copy.len,
                    libc::SPLICE_F_NONBLOCK,
                )
            };
            match cvt_size(rc)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                // tee starts at the front every time; a short tee only
                // happens when the new pipe is full.
                n if copy.len + n < self.len => {
                    return Err(io::Error::other("pipe too small for a duplicate"));
                }
                n => copy.len += n,
            }
        }
        Ok(copy)
    }

    /// Reads everything held into memory (the copying fallback).
    pub fn into_bytes(mut self) -> io::Result<Bytes> {
        let mut out = BytesMut::with_capacity(self.len);
        out.resize(self.len, 0);
        let mut at = 0;
        while at < out.len() {
            // SAFETY: reads into the unfilled tail of a live buffer.
            let rc = unsafe { libc::read(self.r.as_raw_fd(), out[at..].as_mut_ptr().cast(), out.len() - at) };
            match cvt_size(rc)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => at += n,
            }
        }
        self.len = 0;
        Ok(out.freeze())
    }

    /// The read end, for waiting on or inspecting.
    pub fn reader(&self) -> BorrowedFd<'_> {
        self.r.as_fd()
    }
}

/// Bytes waiting to be read from `sock` (`FIONREAD`/`SIOCINQ`).
pub fn readable_bytes(sock: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer we pass.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &raw mut n) })?;
    Ok(n.max(0) as usize)
}

/// A duplicate of `sock` registered with tokio for `interest` on its own,
/// for splicing into or out of a socket that other code reads or writes
/// through its tokio wrapper. Must be called inside a tokio runtime.
pub fn register_duplicate(
    sock: BorrowedFd<'_>,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    let dup = sock.try_clone_to_owned()?;
    // SAFETY: the AsyncFd owns `dup` for its whole lifetime and OwnedFd
    // always returns that same open descriptor.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(dup, interest) }
        .map_err(|e| io::Error::other(e.to_string()))
}

/// Sets `sock`'s receive low-water mark (`SO_RCVLOWAT`): readiness is
/// reported only once `bytes` are queued (TCP caps it at half the largest
/// receive buffer). Best effort.
pub fn set_receive_low_water(sock: BorrowedFd<'_>, bytes: usize) {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if let Err(e) = set_socket_int(sock, libc::SO_RCVLOWAT, value) {
        tracing::debug!("SO_RCVLOWAT: {e}");
    }
}

/// Payload rests at least this large are waited for whole (see [`LowWater`]).
pub const WHOLE_PAYLOAD_BYTES: usize = 128 * 1024;

/// Keeps a TCP session from being woken for every segment of a large
/// payload (an NBD WRITE's, an iSCSI data segment): before each wait, the
/// socket's `SO_RCVLOWAT` is raised to the rest of the payload, so
/// readiness comes once it has all arrived (or the receive buffer is under
/// pressure, or the peer closed). One `recv` then takes it all. Before, a
/// 1 MiB NBD payload took about four `recv`s and as many wake-ups, while
/// the client was still sending it; 1 MiB writes went from 2081 to 2536
/// MiB/s (1 replica, 4 paired rounds, every one won).
///
/// Only for a rest the peer sends without waiting for us (the rest of a
/// message it has begun): a mark above what it sends before it waits for
/// a reply would never be reached. So the mark is set again before every
/// wait, as a partial read leaves less to come than the mark. It is back
/// at 1 byte once the rest is small and when dropped, so the next header
/// is seen at once.
pub struct LowWater<'a> {
    socket: Option<BorrowedFd<'a>>,
    raised: bool,
}

impl<'a> LowWater<'a> {
    /// `socket`: the session's TCP socket, if it is one.
    pub fn new(socket: Option<BorrowedFd<'a>>) -> Self {
        LowWater { socket, raised: false }
    }

    /// Call before each read, with the bytes still to come.
    pub fn expect(&mut self, rest: usize) {
        let Some(socket) = self.socket else { return };
        if rest >= WHOLE_PAYLOAD_BYTES {
            set_receive_low_water(socket, rest);
            self.raised = true;
        } else if self.raised {
            set_receive_low_water(socket, 1);
            self.raised = false;
        }
    }
}

impl Drop for LowWater<'_> {
    fn drop(&mut self) {
        self.expect(0);
    }
}

/// Sets the `SOL_SOCKET` option `name` of `sock` to `value`.
pub(crate) fn set_socket_int(sock: BorrowedFd<'_>, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt on an open socket with an int value of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// A socket registered with tokio, whose readiness we can wait on.
#[derive(Clone, Copy)]
pub enum Socket<'a> {
    Unix(&'a tokio::net::UnixStream),
    /// A duplicate descriptor registered on its own.
    Fd(&'a tokio::io::unix::AsyncFd<OwnedFd>),
}

impl Socket<'_> {
    /// Waits until the socket is ready for `interest` and runs one
    /// non-blocking `step`, until the step does not say `WouldBlock`
    /// (which clears the readiness).
    async fn step<T>(
        &self,
        interest: tokio::io::Interest,
        step: &mut (dyn FnMut(BorrowedFd<'_>) -> io::Result<T> + Send),
    ) -> io::Result<T> {
        loop {
            match self {
                Socket::Unix(s) => {
                    s.ready(interest).await?;
                    match s.try_io(interest, || step(s.as_fd())) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        done => return done,
                    }
                }
                Socket::Fd(f) => {
                    let mut guard = f.ready(interest).await?;
                    if let Ok(done) = guard.try_io(|fd| step(fd.get_ref().as_fd())) {
                        return done;
                    }
                }
            }
        }
    }
}

/// Moves `len` bytes from `sock` into `pipe`; [`Filled::Full`] when the
/// pipe runs out of slots first.
pub async fn fill_from_socket(pipe: &mut Piped, sock: Socket<'_>, len: usize) -> io::Result<Filled> {
    let mut moved = 0;
    while moved < len {
        let want = len - moved;
        let step = sock
            .step(tokio::io::Interest::READABLE, &mut |fd| match pipe.splice_in(fd, want)? {
                Some(0) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed mid-payload")),
                Some(n) => Ok(Some(n)),
                // Nothing moved although data waits: the pipe is out of slots.
                None if readable_bytes(fd)? > 0 => Ok(None),
                None => Err(io::ErrorKind::WouldBlock.into()),
            })
            .await?;
        match step {
            Some(n) => moved += n,
            None => return Ok(Filled::Full(moved)),
        }
    }
    Ok(Filled::Done)
}

/// Moves everything `pipe` holds into `sock`.
pub async fn drain_to_socket(pipe: &mut Piped, sock: Socket<'_>) -> io::Result<()> {
    while !pipe.is_empty() {
        sock.step(tokio::io::Interest::WRITABLE, &mut |fd| match pipe.splice_out(fd, usize::MAX)? {
            Some(0) => Err(io::ErrorKind::WriteZero.into()),
            Some(n) => Ok(n),
            None => Err(io::ErrorKind::WouldBlock.into()),
        })
        .await?;
    }
    Ok(())
}

/// Sends `head` with `MSG_MORE`, so that the payload spliced next leaves
/// in the same segment: the peer wakes once for header and data, not once
/// for a lone header and again for the data.
pub async fn send_more(head: &[u8], sock: Socket<'_>) -> io::Result<()> {
    let mut sent = 0;
    while sent < head.len() {
        let rest = &head[sent..];
        sent += sock
            .step(tokio::io::Interest::WRITABLE, &mut |fd| {
                // SAFETY: sends from a valid slice on a descriptor we hold.
                let rc = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        rest.as_ptr().cast(),
                        rest.len(),
                        libc::MSG_MORE | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                match cvt_size(rc)? {
                    0 => Err(io::ErrorKind::WriteZero.into()),
                    n => Ok(n),
                }
            })
            .await?;
    }
    Ok(())
}

/// A READ's data, or a WRITE's: in memory, or in a pipe.
#[derive(Debug)]
pub enum Payload {
    Bytes(Bytes),
    Piped(Piped),
}

impl Payload {
    pub fn len(&self) -> usize {
        match self {
            Payload::Bytes(b) => b.len(),
            Payload::Piped(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, read out of the pipe if need be.
    pub fn into_bytes(self) -> io::Result<Bytes> {
        match self {
            Payload::Bytes(b) => Ok(b),
            Payload::Piped(p) => p.into_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn bytes_files_and_copies_round_trip() {
        let dir = std::env::temp_dir().join(format!("jiva-pipe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data");
        let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 253) as u8).collect();
        std::fs::File::create(&path).unwrap().write_all(&data).unwrap();
        let file = std::fs::File::open(&path).unwrap();

        let mut p = Piped::with_capacity(256 * 1024).unwrap();
        assert_eq!(p.push_bytes(&data[..4096]).unwrap(), Filled::Done);
        assert_eq!(p.push_file(file.as_fd(), 4096, 128 * 1024).unwrap(), Filled::Done);
        assert_eq!(p.push_bytes(&data[132 * 1024..]).unwrap(), Filled::Done);
        assert_eq!(p.len(), data.len());
        let dup = p.try_clone().unwrap();
        assert_eq!(&p.into_bytes().unwrap()[..], &data[..]);
        assert_eq!(&dup.into_bytes().unwrap()[..], &data[..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_pipe_says_how_much_went_in() {
        let mut p = Piped::with_capacity(64 * 1024).unwrap();
        let data = vec![5u8; 200 * 1024];
        match p.push_bytes(&data).unwrap() {
            Filled::Full(n) => assert!(n >= 64 * 1024 && n < data.len(), "{n}"),
            Filled::Done => panic!("a 64 KiB pipe took 200 KiB"),
        }
        assert!(Piped::with_capacity(MAX_PIPED_BYTES + 1).is_err());
    }

    #[test]
    fn sockets_splice_in_and_out() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (c, d) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8).collect();
        (&a).write_all(&data).unwrap();
        let mut p = Piped::with_capacity(data.len()).unwrap();
        while p.len() < data.len() {
            p.splice_in(b.as_fd(), data.len() - p.len()).unwrap().expect("data waiting");
        }
        assert_eq!(p.splice_in(b.as_fd(), 1).unwrap(), None, "nothing more to read");
        while !p.is_empty() {
            p.splice_out(c.as_fd(), usize::MAX).unwrap().expect("room in the socket");
        }
        let mut got = vec![0u8; data.len()];
        std::io::Read::read_exact(&mut &d, &mut got).unwrap();
        assert_eq!(got, data);
    }
}
