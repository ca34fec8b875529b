//! A volume reached through a Jiva controller's NBD server: the
//! [`BlockDevice`] the TCMU handler serves from. The controller stays the
//! only owner of the replicas (epochs, rebuilds, the API); the handler is
//! one more NBD client, like `nbd-client`, with many requests in flight on
//! one connection (the volume advertises multi-connection consistency, so
//! a flush here covers writes made through any other frontend).
//!
//! Fixed-newstyle handshake with `NBD_OPT_GO` and simple replies only. A
//! broken connection fails the requests in flight (`Disconnected`); the next
//! request reconnects, so a controller restart costs only the commands that
//! were in flight, which the initiator retries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use jiva_core::{BlockDevice, Capabilities, Error, ErrorKind, MAX_IO_BYTES, Result, ZeroFlags};
use jiva_nbd::proto::{self, InfoReply, InfoRequest, NbdOption, OptionReply, OptionReplyHeader, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;

use crate::config::VolumeRef;

/// Bound on connecting and on the handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest option reply we read during the handshake.
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// What the server said about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
}

type Waiter = oneshot::Sender<Result<Bytes>>;

struct Pending {
    /// Bytes of read data that follow a successful reply.
    read_len: usize,
    tx: Waiter,
}

/// One live connection: a writer shared by the requests, a reader task that
/// routes replies by cookie.
struct Conn {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Arc<Mutex<Option<HashMap<u64, Pending>>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A volume on a controller's NBD server.
pub struct NbdVolume {
    target: VolumeRef,
    export: Export,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    cookie: AtomicU64,
}

impl std::fmt::Debug for NbdVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdVolume").field("target", &self.target).field("export", &self.export).finish()
    }
}

fn proto_err(what: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Protocol, what.to_string())
}

fn io_err(e: std::io::Error) -> Error {
    Error::new(ErrorKind::Disconnected, e.to_string())
}

/// Connects and negotiates the export; returns the stream and the export.
async fn handshake(target: &VolumeRef) -> Result<(TcpStream, Export)> {
    let run = async {
        let mut s = TcpStream::connect(target.address()).await.map_err(io_err)?;
        s.set_nodelay(true).map_err(io_err)?;
        let mut greeting = [0u8; proto::ServerGreeting::LEN];
        s.read_exact(&mut greeting).await.map_err(io_err)?;
        let greeting = proto::ServerGreeting::parse(&greeting).map_err(proto_err)?;
        if greeting.handshake_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto_err("the server does not speak fixed newstyle NBD"));
        }
        let no_zeroes = greeting.handshake_flags & proto::FLAG_NO_ZEROES != 0;
        let flags = proto::ClientFlags { fixed_newstyle: true, no_zeroes };
        s.write_all(&flags.encode()).await.map_err(io_err)?;
        let go = NbdOption::Go(InfoRequest { export: target.volume.clone(), requests: vec![] });
        s.write_all(&go.encode()).await.map_err(io_err)?;
        let mut export = None;
        loop {
            let mut hdr = [0u8; OptionReplyHeader::LEN];
            s.read_exact(&mut hdr).await.map_err(io_err)?;
            let hdr = OptionReplyHeader::parse(&hdr).map_err(proto_err)?;
            if hdr.length > MAX_OPTION_REPLY {
                return Err(proto_err(format!("option reply of {} bytes", hdr.length)));
            }
            let mut payload = vec![0u8; hdr.length as usize];
            s.read_exact(&mut payload).await.map_err(io_err)?;
            match OptionReply::parse(hdr.reply_type, &payload).map_err(proto_err)? {
                OptionReply::Info(InfoReply::Export { size, transmission_flags }) => {
                    export = Some(Export { size, flags: transmission_flags });
                }
                OptionReply::Ack => break,
                OptionReply::Error { reply_type, message } => {
                    let kind = if reply_type == proto::REP_ERR_UNKNOWN {
                        ErrorKind::InvalidArgument
                    } else {
                        ErrorKind::Protocol
                    };
                    let why = if message.is_empty() { format!("error {reply_type:#x}") } else { message };
                    return Err(Error::new(kind, format!("the server refused the export: {why}")));
                }
                _ => {}
            }
        }
        let export = export.ok_or_else(|| proto_err("the server sent no export size"))?;
        Ok((s, export))
    };
    tokio::time::timeout(CONNECT_TIMEOUT, run)
        .await
        .map_err(|_| Error::new(ErrorKind::TimedOut, format!("no answer within {CONNECT_TIMEOUT:?}")))?
}

/// Reads replies until the connection ends; then fails what is in flight
/// and closes the table, so later requests reconnect.
async fn read_replies(mut r: OwnedReadHalf, pending: Arc<Mutex<Option<HashMap<u64, Pending>>>>) {
    let why = loop {
        let mut hdr = [0u8; proto::SimpleReply::LEN];
        if let Err(e) = r.read_exact(&mut hdr).await {
            break format!("connection lost: {e}");
        }
        let reply = match proto::SimpleReply::parse(&hdr) {
            Ok(reply) => reply,
            Err(e) => break format!("bad reply: {e}"),
        };
        let waiter =
            pending.lock().unwrap_or_else(|e| e.into_inner()).as_mut().and_then(|m| m.remove(&reply.cookie));
        let Some(waiter) = waiter else { break format!("reply to unknown cookie {}", reply.cookie) };
        let result = if reply.error != 0 {
            Err(error_for(reply.error))
        } else if waiter.read_len > 0 {
            let mut buf = BytesMut::zeroed(waiter.read_len);
            if let Err(e) = r.read_exact(&mut buf).await {
                let _ =
                    waiter.tx.send(Err(Error::new(ErrorKind::Disconnected, format!("connection lost: {e}"))));
                break format!("connection lost: {e}");
            }
            Ok(buf.freeze())
        } else {
            Ok(Bytes::new())
        };
        let _ = waiter.tx.send(result);
    };
    tracing::warn!("NBD connection closed: {why}");
    let left = pending.lock().unwrap_or_else(|e| e.into_inner()).take();
    for (_, w) in left.into_iter().flatten() {
        let _ = w.tx.send(Err(Error::new(ErrorKind::Disconnected, why.clone())));
    }
}

/// The error kind an NBD errno stands for.
fn error_for(errno: u32) -> Error {
    let kind = match errno {
        1 => ErrorKind::ReadOnly,         // EPERM
        28 => ErrorKind::NoSpace,         // ENOSPC
        22 => ErrorKind::InvalidArgument, // EINVAL
        95 => ErrorKind::Unsupported,     // ENOTSUP
        _ => ErrorKind::Io,
    };
    Error::new(kind, format!("NBD server returned error {errno}"))
}

impl NbdVolume {
    /// Connects to `target` and negotiates its export.
    pub async fn connect(target: VolumeRef) -> Result<NbdVolume> {
        let (stream, export) = handshake(&target).await?;
        let vol =
            NbdVolume { target, export, conn: tokio::sync::Mutex::new(None), cookie: AtomicU64::new(1) };
        *vol.conn.lock().await = Some(Arc::new(Self::start(stream)));
        Ok(vol)
    }

    /// Checks that `target` names an export, without keeping a connection.
    pub async fn probe(target: &VolumeRef) -> Result<Export> {
        let (mut stream, export) = handshake(target).await?;
        let disc = Request { command: proto::CMD_DISC, ..Request::default() };
        let _ = stream.write_all(&disc.encode()).await;
        Ok(export)
    }

    pub fn target(&self) -> &VolumeRef {
        &self.target
    }

    pub fn export(&self) -> Export {
        self.export
    }

    fn start(stream: TcpStream) -> Conn {
        let (r, w) = stream.into_split();
        let pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let reader = tokio::spawn(read_replies(r, Arc::clone(&pending)));
        Conn { writer: tokio::sync::Mutex::new(w), pending, reader }
    }

    /// The live connection, reconnecting if the last one broke.
    async fn conn(&self) -> Result<Arc<Conn>> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref()
            && c.pending.lock().unwrap_or_else(|e| e.into_inner()).is_some()
        {
            return Ok(Arc::clone(c));
        }
        let (stream, export) = handshake(&self.target)
            .await
            .map_err(|e| Error::new(e.kind(), format!("{}: {e}", self.target)))?;
        if export.size != self.export.size {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{}: size changed from {} to {}", self.target, self.export.size, export.size),
            ));
        }
        tracing::info!("reconnected to {}", self.target);
        let c = Arc::new(Self::start(stream));
        *slot = Some(Arc::clone(&c));
        Ok(c)
    }

    async fn request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<Bytes> {
        let conn = self.conn().await?;
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let read_len = if command == proto::CMD_READ { length as usize } else { 0 };
        {
            let mut p = conn.pending.lock().unwrap_or_else(|e| e.into_inner());
            let Some(map) = p.as_mut() else {
                return Err(Error::new(ErrorKind::Disconnected, format!("{}: connection lost", self.target)));
            };
            map.insert(cookie, Pending { read_len, tx });
        }
        let req = Request { flags, command, cookie, offset, length };
        {
            let mut w = conn.writer.lock().await;
            let sent = async {
                w.write_all(&req.encode()).await?;
                if !payload.is_empty() {
                    w.write_all(payload).await?;
                }
                Ok::<_, std::io::Error>(())
            };
            if let Err(e) = sent.await {
                // The reader sees the broken socket too and fails the rest.
                let _ = w.shutdown().await;
                return Err(Error::new(ErrorKind::Disconnected, format!("{}: {e}", self.target)));
            }
        }
        rx.await
            .map_err(|_| Error::new(ErrorKind::Disconnected, format!("{}: connection lost", self.target)))?
    }

    fn has(&self, flag: u16) -> bool {
        self.export.flags & flag != 0
    }
}

fn len32(len: u64) -> Result<u32> {
    u32::try_from(len)
        .map_err(|_| Error::new(ErrorKind::InvalidArgument, format!("{len} bytes in one request")))
}

impl BlockDevice for NbdVolume {
    fn size(&self) -> u64 {
        self.export.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            flush: self.has(proto::FLAG_SEND_FLUSH),
            fua: self.has(proto::FLAG_SEND_FUA),
            trim: self.has(proto::FLAG_SEND_TRIM),
            write_zeroes: self.has(proto::FLAG_SEND_WRITE_ZEROES),
            fast_zero: self.has(proto::FLAG_SEND_FAST_ZERO),
            // Block status needs structured replies, which we do not negotiate.
            block_status: false,
            multi_conn: self.has(proto::FLAG_CAN_MULTI_CONN),
            read_only: self.has(proto::FLAG_READ_ONLY),
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.request(proto::CMD_READ, 0, offset, len32(len as u64)?, &[]).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let flags = if fua && self.has(proto::FLAG_SEND_FUA) { proto::CMD_FLAG_FUA } else { 0 };
        self.request(proto::CMD_WRITE, flags, offset, len32(data.len() as u64)?, &data).await.map(drop)?;
        if fua && !self.has(proto::FLAG_SEND_FUA) {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        if !self.has(proto::FLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.request(proto::CMD_FLUSH, 0, 0, 0, &[]).await.map(drop)
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        if !self.has(proto::FLAG_SEND_TRIM) {
            return Err(Error::unsupported("trim"));
        }
        let flags = if fua { proto::CMD_FLAG_FUA } else { 0 };
        for (off, n) in chunks(offset, len) {
            self.request(proto::CMD_TRIM, flags, off, n, &[]).await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, zf: ZeroFlags) -> Result<()> {
        if !self.has(proto::FLAG_SEND_WRITE_ZEROES) {
            return Err(Error::unsupported("write-zeroes"));
        }
        let mut flags = 0;
        if zf.fua {
            flags |= proto::CMD_FLAG_FUA;
        }
        if zf.no_hole {
            flags |= proto::CMD_FLAG_NO_HOLE;
        }
        for (off, n) in chunks(offset, len) {
            self.request(proto::CMD_WRITE_ZEROES, flags, off, n, &[]).await?;
        }
        Ok(())
    }
}

/// Splits a range into pieces NBD's 32-bit lengths can carry.
fn chunks(mut offset: u64, mut len: u64) -> impl Iterator<Item = (u64, u32)> {
    std::iter::from_fn(move || {
        if len == 0 {
            return None;
        }
        let n = len.min(u64::from(MAX_IO_BYTES) * 32) as u32;
        let item = (offset, n);
        offset += u64::from(n);
        len -= u64::from(n);
        Some(item)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use jiva_core::mem::MemDevice;
    use jiva_nbd::NbdServer;
    use tokio::net::TcpListener;

    use super::*;

    async fn serve(name: &str, size: u64) -> (VolumeRef, Arc<MemDevice>) {
        let dev = Arc::new(MemDevice::new(size));
        let server = Arc::new(NbdServer::new(Arc::clone(&dev), name.to_string()));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(server.serve(l, std::future::pending::<()>()));
        (VolumeRef { volume: name.into(), host: "127.0.0.1".into(), port }, dev)
    }

    #[tokio::test]
    async fn many_requests_in_flight() {
        let (target, dev) = serve("v", 1 << 20).await;
        let vol = Arc::new(NbdVolume::connect(target).await.unwrap());
        assert_eq!(vol.size(), 1 << 20);
        assert!(vol.capabilities().flush && vol.capabilities().trim && vol.capabilities().multi_conn);
        let writes = (0..32u64).map(|i| {
            let vol = Arc::clone(&vol);
            async move { vol.write(i * 4096, Bytes::from(vec![i as u8 + 1; 4096]), i % 2 == 0).await }
        });
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
        vol.flush().await.unwrap();
        let reads = (0..32u64).map(|i| {
            let vol = Arc::clone(&vol);
            async move { (i, vol.read(i * 4096, 4096).await.unwrap()) }
        });
        for (i, data) in futures::future::join_all(reads).await {
            assert!(data.iter().all(|&b| b == i as u8 + 1), "block {i}");
        }
        vol.trim(0, 8192, false).await.unwrap();
        vol.write_zeroes(8192, 4096, ZeroFlags::default()).await.unwrap();
        assert!(dev.read(0, 12288).await.unwrap().iter().all(|&b| b == 0));
        // Out of range: the server's error comes back as an error, and the
        // connection stays usable.
        assert!(vol.read(1 << 20, 4096).await.is_err());
        assert_eq!(vol.read(12288, 4096).await.unwrap()[0], 4);
    }

    #[tokio::test]
    async fn unknown_export_and_dead_server() {
        let (mut target, _dev) = serve("v", 1 << 20).await;
        target.volume = "other".into();
        let e = NbdVolume::probe(&target).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(e.to_string().contains("refused"), "{e}");
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        target.port = l.local_addr().unwrap().port();
        drop(l);
        let e = NbdVolume::probe(&target).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Disconnected, "{e}");
    }

    #[tokio::test]
    async fn reconnects_after_the_connection_drops() {
        // A server that accepts, hands the first connection to a real NBD
        // session that we then cut, and serves the second normally.
        let dev = Arc::new(MemDevice::new(1 << 20));
        let server = Arc::new(NbdServer::new(Arc::clone(&dev), "v".to_string()));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (cut_tx, cut_rx) = oneshot::channel::<()>();
        let srv = Arc::clone(&server);
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let first = tokio::spawn(Arc::clone(&srv).handle_connection(s));
            let _ = cut_rx.await;
            first.abort();
            let (s, _) = l.accept().await.unwrap();
            let _ = srv.handle_connection(s).await;
        });
        let target = VolumeRef { volume: "v".into(), host: "127.0.0.1".into(), port };
        let vol = NbdVolume::connect(target).await.unwrap();
        vol.write(0, Bytes::from(vec![7u8; 4096]), false).await.unwrap();
        cut_tx.send(()).unwrap();
        // The first request after the cut may fail (in flight when it broke);
        // a later one reconnects.
        let mut ok = None;
        for _ in 0..50 {
            match vol.read(0, 4096).await {
                Ok(d) => {
                    ok = Some(d);
                    break;
                }
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Disconnected, "{e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        assert_eq!(ok.expect("reconnected")[..], [7u8; 4096][..]);
    }
}
