//! A minimal NBD client for tests: drives a session over an in-memory
//! duplex stream with the same codec the server uses, and panics (failing
//! the test) on anything unexpected. Every read has a timeout so that a
//! server that hangs fails the test instead of stalling it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jiva_core::BlockDevice;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

use crate::proto::*;
use crate::server::{NbdServer, SessionError};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A complete reply to one request.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    pub cookie: u64,
    /// 0 on success; the first error chunk's value for structured replies.
    pub error: u32,
    /// READ data (structured: assembled from the content chunks).
    pub data: Vec<u8>,
    /// Structured chunks received (empty for simple replies).
    pub chunks: Vec<ReplyChunk>,
    pub structured: bool,
}

pub(crate) struct TestClient {
    pub io: DuplexStream,
    pub structured: bool,
    pending: HashMap<u64, Request>,
    partial: HashMap<u64, Reply>,
}

impl TestClient {
    /// Starts a session on `server` over a duplex stream.
    pub fn start<D: BlockDevice, X: crate::Exports>(
        server: &Arc<NbdServer<D, X>>,
    ) -> (TestClient, JoinHandle<Result<(), SessionError>>) {
        let (client, server_end) = tokio::io::duplex(8 << 20);
        let session = tokio::spawn(Arc::clone(server).handle_connection(server_end));
        let c =
            TestClient { io: client, structured: false, pending: HashMap::new(), partial: HashMap::new() };
        (c, session)
    }

    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(IO_TIMEOUT, self.io.read_exact(&mut buf))
            .await
            .expect("timed out reading from server")
            .expect("read from server failed");
        buf
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("write to server failed");
    }

    /// True if the server closes the connection (EOF) without sending more.
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        match tokio::time::timeout(IO_TIMEOUT, self.io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) => false,
            Err(_) => panic!("server neither closed nor sent anything"),
        }
    }

    /// Reads the greeting and sends client flags.
    pub async fn greet(&mut self, client_flags: u32) -> ServerGreeting {
        let g = ServerGreeting::parse(&self.read_exact(ServerGreeting::LEN).await).expect("greeting");
        self.write(&client_flags.to_be_bytes()).await;
        g
    }

    pub async fn read_option_reply(&mut self) -> (OptionReplyHeader, OptionReply) {
        let h = OptionReplyHeader::parse(&self.read_exact(OptionReplyHeader::LEN).await).expect("header");
        let payload = self.read_exact(h.length as usize).await;
        let reply = OptionReply::parse(h.reply_type, &payload).expect("option reply");
        (h, reply)
    }

    /// Sends an option and collects replies up to the final one.
    pub async fn option(&mut self, opt: &NbdOption) -> Vec<OptionReply> {
        self.write(&opt.encode()).await;
        let mut out = Vec::new();
        loop {
            let (h, reply) = self.read_option_reply().await;
            assert_eq!(h.option, opt.code(), "reply to the wrong option");
            let last = reply.is_final();
            out.push(reply);
            if last {
                return out;
            }
        }
    }

    /// GO on `export`; returns (size, transmission flags).
    pub async fn go(&mut self, export: &str, requests: Vec<u16>) -> (u64, u16) {
        let replies = self.option(&NbdOption::Go(InfoRequest { export: export.to_owned(), requests })).await;
        assert_eq!(replies.last(), Some(&OptionReply::Ack), "GO failed: {replies:?}");
        replies
            .iter()
            .find_map(|r| match r {
                OptionReply::Info(InfoReply::Export { size, transmission_flags }) => {
                    Some((*size, *transmission_flags))
                }
                _ => None,
            })
            .expect("no NBD_INFO_EXPORT")
    }

    /// Full handshake via GO; with `structured`, also negotiates structured
    /// replies and `base:allocation`.
    pub async fn connect<D: BlockDevice>(
        server: &Arc<NbdServer<D>>,
        structured: bool,
    ) -> (TestClient, u64, u16, JoinHandle<Result<(), SessionError>>) {
        let (mut c, session) = TestClient::start(server);
        c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        if structured {
            assert_eq!(c.option(&NbdOption::StructuredReply).await, vec![OptionReply::Ack]);
            let set = NbdOption::SetMetaContext(MetaContextRequest {
                export: server.export_name().to_owned(),
                queries: vec![BASE_ALLOCATION.to_owned()],
            });
            let replies = c.option(&set).await;
            assert_eq!(
                replies,
                vec![
                    OptionReply::MetaContext {
                        id: crate::server::BASE_ALLOCATION_ID,
                        name: BASE_ALLOCATION.into()
                    },
                    OptionReply::Ack
                ]
            );
            c.structured = true;
        }
        let (size, flags) = c.go(server.export_name(), vec![]).await;
        (c, size, flags, session)
    }

    pub async fn send(&mut self, req: Request, payload: &[u8]) {
        self.pending.insert(req.cookie, req);
        let mut bytes = req.encode().to_vec();
        bytes.extend_from_slice(payload);
        self.write(&bytes).await;
    }

    /// Receives the next complete reply, whichever request it answers.
    pub async fn recv(&mut self) -> Reply {
        loop {
            let magic = self.read_exact(4).await;
            let magic = u32::from_be_bytes([magic[0], magic[1], magic[2], magic[3]]);
            let mut head = magic.to_be_bytes().to_vec();
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    head.extend(self.read_exact(SimpleReply::LEN - 4).await);
                    let r = SimpleReply::parse(&head).expect("simple reply");
                    let req = self.pending.remove(&r.cookie).expect("reply to an unknown cookie");
                    let mut reply = Reply { cookie: r.cookie, error: r.error, ..Reply::default() };
                    if r.error == 0 && req.command == CMD_READ {
                        reply.data = self.read_exact(req.length as usize).await;
                    }
                    return reply;
                }
                STRUCTURED_REPLY_MAGIC => {
                    head.extend(self.read_exact(ChunkHeader::LEN - 4).await);
                    let h = ChunkHeader::parse(&head).expect("chunk header");
                    let payload = self.read_exact(h.length as usize).await;
                    let chunk = ReplyChunk::parse(h.reply_type, &payload).expect("chunk");
                    let req = *self.pending.get(&h.cookie).expect("chunk for an unknown cookie");
                    let reply = self.partial.entry(h.cookie).or_insert_with(|| Reply {
                        cookie: h.cookie,
                        structured: true,
                        ..Reply::default()
                    });
                    match &chunk {
                        ReplyChunk::OffsetData { offset, data } => {
                            let at = (offset - req.offset) as usize;
                            if reply.data.len() < at + data.len() {
                                reply.data.resize(at + data.len(), 0);
                            }
                            reply.data[at..at + data.len()].copy_from_slice(data);
                        }
                        ReplyChunk::Error { error, .. } | ReplyChunk::ErrorOffset { error, .. }
                            if reply.error == 0 =>
                        {
                            reply.error = *error;
                        }
                        _ => {}
                    }
                    reply.chunks.push(chunk);
                    if h.flags & REPLY_FLAG_DONE != 0 {
                        self.pending.remove(&h.cookie);
                        return self.partial.remove(&h.cookie).expect("partial reply");
                    }
                }
                other => panic!("bad reply magic {other:#x}"),
            }
        }
    }

    pub async fn request(&mut self, req: Request, payload: &[u8]) -> Reply {
        self.send(req, payload).await;
        let reply = self.recv().await;
        assert_eq!(reply.cookie, req.cookie);
        reply
    }

    pub async fn read(&mut self, cookie: u64, offset: u64, length: u32) -> Reply {
        self.request(Request { command: CMD_READ, cookie, offset, length, flags: 0 }, &[]).await
    }

    pub async fn write_at(&mut self, cookie: u64, offset: u64, data: &[u8]) -> Reply {
        let req = Request { command: CMD_WRITE, cookie, offset, length: data.len() as u32, flags: 0 };
        self.request(req, data).await
    }

    /// Sends NBD_CMD_DISC and checks the server closes.
    pub async fn disconnect(&mut self) {
        self.write(&Request { command: CMD_DISC, ..Request::default() }.encode()).await;
        assert!(self.closed().await, "server did not close after NBD_CMD_DISC");
    }
}
