//! Session tests: a test client drives the server over an in-memory duplex
//! stream against a `MemDevice` (optionally wrapped to change capabilities
//! or to delay operations so replies come back out of order).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use jiva_core::mem::MemDevice;
use jiva_core::{BlockDevice, Capabilities, Extent, Result, ZeroFlags};
use tokio::io::AsyncWriteExt;

use super::*;
use crate::test_client::TestClient;

const SIZE: u64 = 1 << 20;
const NAME: &str = "vol";

/// `MemDevice` with overridable capabilities, optional per-op delays and an
/// operation counter.
struct TestDevice {
    mem: MemDevice,
    caps: Capabilities,
    delay: bool,
    ops: AtomicUsize,
}

impl TestDevice {
    fn new(caps: impl FnOnce(&mut Capabilities)) -> TestDevice {
        let mem = MemDevice::new(SIZE);
        let mut c = mem.capabilities();
        caps(&mut c);
        TestDevice { mem, caps: c, delay: false, ops: AtomicUsize::new(0) }
    }

    async fn enter(&self, offset: u64) {
        self.ops.fetch_add(1, Ordering::SeqCst);
        if self.delay {
            // Deterministic but scrambled delays, so completion order differs
            // from submission order.
            let ms = (offset / 4096).wrapping_mul(7919) % 13;
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

impl BlockDevice for TestDevice {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.caps
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.enter(offset).await;
        self.mem.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.enter(offset).await;
        self.mem.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<()> {
        self.enter(0).await;
        self.mem.flush().await
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.enter(offset).await;
        self.mem.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.enter(offset).await;
        self.mem.write_zeroes(offset, len, flags).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.enter(offset).await;
        self.mem.block_status(offset, len).await
    }
}

fn mem_server() -> (Arc<NbdServer<MemDevice>>, Arc<MemDevice>) {
    let dev = Arc::new(MemDevice::new(SIZE));
    (Arc::new(NbdServer::new(Arc::clone(&dev), NAME).with_description("test volume")), dev)
}

fn test_server(dev: TestDevice) -> (Arc<NbdServer<TestDevice>>, Arc<TestDevice>) {
    let dev = Arc::new(dev);
    (Arc::new(NbdServer::new(Arc::clone(&dev), NAME)), dev)
}

fn req(command: u16, cookie: u64, offset: u64, length: u32) -> Request {
    Request { flags: 0, command, cookie, offset, length }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

async fn ends_ok(session: tokio::task::JoinHandle<Result<(), SessionError>>) {
    let r = tokio::time::timeout(Duration::from_secs(10), session).await.expect("session hangs");
    r.expect("session panicked").expect("session failed");
}

async fn ends_err(session: tokio::task::JoinHandle<Result<(), SessionError>>) -> SessionError {
    let r = tokio::time::timeout(Duration::from_secs(10), session).await.expect("session hangs");
    r.expect("session panicked").expect_err("session should fail")
}

// ---------------------------------------------------------------------------
// Handshake.

#[tokio::test]
async fn go_handshake_and_simple_io() {
    let (server, dev) = mem_server();
    let (mut c, session) = TestClient::start(&server);
    let g = c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    assert_eq!(g.handshake_flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    let (size, flags) = c.go(NAME, vec![]).await;
    assert_eq!(size, SIZE);
    let expected = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_SEND_FAST_ZERO
        | FLAG_CAN_MULTI_CONN;
    assert_eq!(flags, expected, "no DF without structured replies, no READ_ONLY");

    let data = pattern(1, 10_000);
    assert_eq!(c.write_at(1, 4000, &data).await.error, 0);
    let r = c.read(2, 4000, 10_000).await;
    assert_eq!((r.error, r.structured), (0, false));
    assert_eq!(r.data, data);
    assert_eq!(&dev.read(4000, 10_000).await.unwrap()[..], &data[..]);
    let flush = c.request(req(CMD_FLUSH, 3, 0, 0), &[]).await;
    assert_eq!(flush.error, 0);
    c.disconnect().await;
    ends_ok(session).await;
}

#[tokio::test]
async fn export_name_handshake_with_and_without_zeroes() {
    for no_zeroes in [true, false] {
        let (server, _dev) = mem_server();
        let (mut c, session) = TestClient::start(&server);
        let flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        c.greet(flags).await;
        c.write(&NbdOption::ExportName(NAME.into()).encode()).await;
        let info = ExportNameReply::parse(&c.read_exact(ExportNameReply::LEN).await).unwrap();
        assert_eq!(info.size, SIZE);
        assert_ne!(info.transmission_flags & FLAG_HAS_FLAGS, 0);
        if !no_zeroes {
            assert_eq!(c.read_exact(EXPORT_NAME_PADDING).await, vec![0u8; EXPORT_NAME_PADDING]);
        }
        // Transmission works right after (no stray bytes in between).
        assert_eq!(c.write_at(1, 0, b"hello").await.error, 0);
        assert_eq!(c.read(2, 0, 5).await.data, b"hello");
        c.disconnect().await;
        ends_ok(session).await;
    }
}

#[tokio::test]
async fn default_export_name_selects_the_export() {
    let (server, _dev) = mem_server();
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.write(&NbdOption::ExportName(String::new()).encode()).await;
    let info = ExportNameReply::parse(&c.read_exact(ExportNameReply::LEN).await).unwrap();
    assert_eq!(info.size, SIZE);
    c.read_exact(EXPORT_NAME_PADDING).await;
    c.disconnect().await;
    ends_ok(session).await;
}

#[tokio::test]
async fn export_name_unknown_closes() {
    let (server, _dev) = mem_server();
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.write(&NbdOption::ExportName("nope".into()).encode()).await;
    assert!(c.closed().await);
    assert!(matches!(ends_err(session).await, SessionError::UnknownExport(n) if n == "nope"));
}

#[tokio::test]
async fn list_exports() {
    let (server, _dev) = mem_server();
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    assert_eq!(
        c.option(&NbdOption::List).await,
        vec![OptionReply::Server { name: NAME.into(), description: "test volume".into() }, OptionReply::Ack]
    );
    // LIST with a payload is invalid, and the session goes on.
    let bad = NbdOption::Other { option: OPT_LIST, payload: vec![1] };
    assert!(matches!(
        c.option(&bad).await.as_slice(),
        [OptionReply::Error { reply_type: REP_ERR_INVALID, .. }]
    ));
    assert_eq!(c.option(&NbdOption::Abort).await, vec![OptionReply::Ack]);
    assert!(c.closed().await);
    ends_ok(session).await;
}

#[tokio::test]
async fn info_with_block_size_name_and_description() {
    let (server, _dev) = mem_server();
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let info = NbdOption::Info(InfoRequest {
        export: String::new(),
        requests: vec![INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 999],
    });
    let replies = c.option(&info).await;
    assert_eq!(
        replies,
        vec![
            OptionReply::Info(InfoReply::Export { size: SIZE, transmission_flags: replies_flags(&replies) }),
            OptionReply::Info(InfoReply::BlockSize { minimum: 1, preferred: 4096, maximum: MAX_IO_BYTES }),
            OptionReply::Info(InfoReply::Name(NAME.into())),
            OptionReply::Info(InfoReply::Description("test volume".into())),
            OptionReply::Ack,
        ]
    );
    // INFO does not end negotiation: GO still works.
    assert_eq!(c.go(NAME, vec![]).await.0, SIZE);
    c.disconnect().await;
    ends_ok(session).await;
}

fn replies_flags(replies: &[OptionReply]) -> u16 {
    match replies.first() {
        Some(OptionReply::Info(InfoReply::Export { transmission_flags, .. })) => *transmission_flags,
        other => panic!("expected NBD_INFO_EXPORT first, got {other:?}"),
    }
}

#[tokio::test]
async fn unknown_export_and_unknown_options_are_errors() {
    let (server, _dev) = mem_server();
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    let go = NbdOption::Go(InfoRequest { export: "other".into(), requests: vec![] });
    assert!(matches!(
        c.option(&go).await.as_slice(),
        [OptionReply::Error { reply_type: REP_ERR_UNKNOWN, .. }]
    ));
    for opt in [
        NbdOption::Other { option: 4242, payload: vec![1, 2, 3] },
        NbdOption::Other { option: OPT_EXTENDED_HEADERS, payload: vec![] },
        NbdOption::StartTls,
    ] {
        assert!(
            matches!(c.option(&opt).await.as_slice(), [OptionReply::Error { reply_type: REP_ERR_UNSUP, .. }]),
            "{opt:?}"
        );
    }
    // Malformed GO payload.
    let bad = NbdOption::Other { option: OPT_GO, payload: vec![0, 0, 0, 9] };
    assert!(matches!(
        c.option(&bad).await.as_slice(),
        [OptionReply::Error { reply_type: REP_ERR_INVALID, .. }]
    ));
    // Still negotiating fine afterwards.
    assert_eq!(c.go("", vec![]).await.0, SIZE);
    c.disconnect().await;
    ends_ok(session).await;
}

#[tokio::test]
async fn meta_context_negotiation() {
    let (server, _dev) = mem_server();
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    let set = |queries: &[&str]| {
        NbdOption::SetMetaContext(MetaContextRequest {
            export: NAME.into(),
            queries: queries.iter().map(|q| q.to_string()).collect(),
        })
    };
    let list = |export: &str, queries: &[&str]| {
        NbdOption::ListMetaContext(MetaContextRequest {
            export: export.into(),
            queries: queries.iter().map(|q| q.to_string()).collect(),
        })
    };
    // Before structured replies: invalid.
    assert!(matches!(
        c.option(&set(&[BASE_ALLOCATION])).await.as_slice(),
        [OptionReply::Error { reply_type: REP_ERR_INVALID, .. }]
    ));
    assert!(matches!(
        c.option(&list(NAME, &[])).await.as_slice(),
        [OptionReply::Error { reply_type: REP_ERR_INVALID, .. }]
    ));
    // Structured replies: non-empty payload invalid, then negotiate once.
    let bad = NbdOption::Other { option: OPT_STRUCTURED_REPLY, payload: vec![0] };
    assert!(matches!(
        c.option(&bad).await.as_slice(),
        [OptionReply::Error { reply_type: REP_ERR_INVALID, .. }]
    ));
    assert_eq!(c.option(&NbdOption::StructuredReply).await, vec![OptionReply::Ack]);
    assert!(matches!(
        c.option(&NbdOption::StructuredReply).await.as_slice(),
        [OptionReply::Error { reply_type: REP_ERR_INVALID, .. }]
    ));

    let listed = vec![OptionReply::MetaContext { id: 0, name: BASE_ALLOCATION.into() }, OptionReply::Ack];
    assert_eq!(c.option(&list(NAME, &[])).await, listed);
    assert_eq!(c.option(&list("", &["base:"])).await, listed);
    assert_eq!(c.option(&list(NAME, &["qemu:dirty-bitmap:x", BASE_ALLOCATION])).await, listed);
    assert_eq!(c.option(&list(NAME, &["qemu:"])).await, vec![OptionReply::Ack]);
    assert!(matches!(
        c.option(&list("other", &[])).await.as_slice(),
        [OptionReply::Error { reply_type: REP_ERR_UNKNOWN, .. }]
    ));

    // SET: "base:" alone and unknown namespaces select nothing.
    assert_eq!(c.option(&set(&["base:", "x-foo:bar"])).await, vec![OptionReply::Ack]);
    assert_eq!(
        c.option(&set(&[BASE_ALLOCATION, BASE_ALLOCATION])).await,
        vec![
            OptionReply::MetaContext { id: BASE_ALLOCATION_ID, name: BASE_ALLOCATION.into() },
            OptionReply::Ack
        ]
    );
    c.structured = true;
    let (_, flags) = c.go(NAME, vec![]).await;
    assert_ne!(flags & FLAG_SEND_DF, 0, "DF is advertised with structured replies");
    let r = c.request(req(CMD_BLOCK_STATUS, 1, 0, 8192), &[]).await;
    assert_eq!(r.error, 0);
    c.disconnect().await;
    ends_ok(session).await;
}

#[tokio::test]
async fn set_meta_context_with_nothing_selected_disables_block_status() {
    let (server, _dev) = mem_server();
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.option(&NbdOption::StructuredReply).await;
    let set = NbdOption::SetMetaContext(MetaContextRequest { export: NAME.into(), queries: vec![] });
    assert_eq!(c.option(&set).await, vec![OptionReply::Ack]);
    c.structured = true;
    c.go(NAME, vec![]).await;
    assert_eq!(c.request(req(CMD_BLOCK_STATUS, 1, 0, 4096), &[]).await.error, EINVAL);
    c.disconnect().await;
    ends_ok(session).await;
}

#[tokio::test]
async fn garbage_magic_closes() {
    let (server, _dev) = mem_server();
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.write(b"NOTMAGIC\0\0\0\x07\0\0\0\0").await;
    assert!(c.closed().await);
    assert!(matches!(ends_err(session).await, SessionError::Protocol(ProtoError::BadMagic { .. })));
}

#[tokio::test]
async fn unknown_client_flags_close() {
    let (server, _dev) = mem_server();
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE | 0x100).await;
    assert!(c.closed().await);
    assert!(matches!(ends_err(session).await, SessionError::Protocol(ProtoError::UnknownClientFlags(_))));
}

#[tokio::test]
async fn truncated_handshake_closes_without_hanging() {
    let (server, _dev) = mem_server();
    // Client flags cut short, then EOF.
    let (mut c, session) = TestClient::start(&server);
    c.read_exact(ServerGreeting::LEN).await;
    c.write(&[0, 0]).await;
    c.io.shutdown().await.unwrap();
    assert!(matches!(ends_err(session).await, SessionError::Io(_)));
    // Option header cut short.
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.write(&NbdOption::List.encode()[..10]).await;
    c.io.shutdown().await.unwrap();
    assert!(matches!(ends_err(session).await, SessionError::Io(_)));
    // Option payload cut short.
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    let go = NbdOption::Go(InfoRequest { export: NAME.into(), requests: vec![] }).encode();
    c.write(&go[..go.len() - 2]).await;
    drop(c);
    assert!(matches!(ends_err(session).await, SessionError::Io(_)));
}

#[tokio::test]
async fn silent_client_is_dropped_after_handshake_timeout() {
    let dev = Arc::new(MemDevice::new(SIZE));
    let server = Arc::new(NbdServer::new(dev, NAME).with_handshake_timeout(Duration::from_millis(200)));
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    // Send nothing more: the server must give up on its own.
    assert!(matches!(ends_err(session).await, SessionError::HandshakeTimeout(_)));
    assert!(c.closed().await);
}

#[tokio::test]
async fn oversized_option_is_skipped_with_too_big() {
    let (server, _dev) = mem_server();
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    let big = NbdOption::Other { option: OPT_LIST, payload: vec![7; MAX_OPTION_PAYLOAD as usize + 1] };
    assert!(matches!(
        c.option(&big).await.as_slice(),
        [OptionReply::Error { reply_type: REP_ERR_TOO_BIG, .. }]
    ));
    assert_eq!(c.go(NAME, vec![]).await.0, SIZE);
    c.disconnect().await;
    ends_ok(session).await;

    // Far too big to skip: closed.
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.write(&OptionHeader { option: OPT_GO, length: u32::MAX }.encode()).await;
    assert!(c.closed().await);
    assert!(matches!(ends_err(session).await, SessionError::Refused(_)));
}

#[tokio::test]
async fn endless_options_are_cut_off() {
    let (server, _dev) = mem_server();
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    // The duplex pipe holds all the replies, so the burst never blocks.
    let mut burst = Vec::new();
    for _ in 0..=MAX_OPTIONS {
        burst.extend_from_slice(&NbdOption::Other { option: 99, payload: vec![] }.encode());
    }
    c.write(&burst).await;
    for _ in 0..MAX_OPTIONS {
        let (_, reply) = c.read_option_reply().await;
        assert!(matches!(reply, OptionReply::Error { reply_type: REP_ERR_UNSUP, .. }));
    }
    assert!(c.closed().await);
    assert!(matches!(ends_err(session).await, SessionError::Refused(_)));
}

#[tokio::test]
async fn abort_acks_then_closes() {
    let (server, _dev) = mem_server();
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    assert_eq!(c.option(&NbdOption::Abort).await, vec![OptionReply::Ack]);
    assert!(c.closed().await);
    ends_ok(session).await;
}

// ---------------------------------------------------------------------------
// Transmission.

#[tokio::test]
async fn out_of_range_requests_leave_the_volume_unchanged() {
    let (server, dev) = mem_server();
    for structured in [false, true] {
        let (mut c, _, _, session) = TestClient::connect(&server, structured).await;
        let data = vec![0xaa; 8192];
        assert_eq!(c.write_at(1, SIZE - 4096, &data).await.error, ENOSPC);
        assert_eq!(c.write_at(2, u64::MAX - 100, &data).await.error, ENOSPC);
        assert_eq!(c.read(3, SIZE - 4096, 8192).await.error, EINVAL);
        assert_eq!(c.read(4, SIZE + 1, 0).await.error, EINVAL);
        assert_eq!(c.request(req(CMD_TRIM, 5, SIZE, 4096), &[]).await.error, EINVAL);
        assert_eq!(c.request(req(CMD_WRITE_ZEROES, 6, SIZE - 1, 2), &[]).await.error, EINVAL);
        if structured {
            assert_eq!(c.request(req(CMD_BLOCK_STATUS, 7, SIZE - 1, 2), &[]).await.error, EINVAL);
            let r = c.read(8, SIZE, 1).await;
            assert!(matches!(r.chunks.as_slice(), [ReplyChunk::Error { error: EINVAL, .. }]), "{r:?}");
        }
        // Stream still in sync: a valid read works.
        assert_eq!(c.read(9, 0, 16).await.data, vec![0; 16]);
        c.disconnect().await;
        ends_ok(session).await;
    }
    assert_eq!(dev.allocated_blocks(), 0, "a rejected write reached the device");
}

#[tokio::test]
async fn oversized_read_and_write_are_refused_without_desync() {
    let (server, dev) = mem_server();
    for structured in [false, true] {
        let (mut c, _, _, session) = TestClient::connect(&server, structured).await;
        assert_eq!(c.read(1, 0, MAX_IO_BYTES + 1).await.error, EOVERFLOW);
        // An oversized WRITE's payload is skipped; the next request parses.
        let big = vec![0x55u8; MAX_IO_BYTES as usize + 4096];
        let r = c.request(req(CMD_WRITE, 2, 0, big.len() as u32), &big).await;
        assert_eq!(r.error, EOVERFLOW);
        assert_eq!(c.write_at(3, 0, b"ok").await.error, 0);
        assert_eq!(c.read(4, 0, 2).await.data, b"ok");
        c.disconnect().await;
        ends_ok(session).await;
    }
    assert!(dev.read(2, 4094).await.unwrap().iter().all(|&b| b == 0));
}

#[tokio::test]
async fn write_payload_too_large_to_skip_closes() {
    let (server, _dev) = mem_server();
    let (mut c, _, _, session) = TestClient::connect(&server, false).await;
    c.write(&req(CMD_WRITE, 1, 0, u32::MAX).encode()).await;
    assert!(c.closed().await);
    assert!(matches!(ends_err(session).await, SessionError::Refused(_)));
}

#[tokio::test]
async fn unknown_commands_and_bad_flags_are_einval() {
    let (server, dev) = mem_server();
    let (mut c, _, _, session) = TestClient::connect(&server, false).await;
    assert_eq!(c.request(req(42, 1, 0, 0), &[]).await.error, EINVAL);
    assert_eq!(c.request(req(CMD_CACHE, 2, 0, 4096), &[]).await.error, EINVAL);
    assert_eq!(c.request(req(CMD_RESIZE, 3, 0, 0), &[]).await.error, EINVAL);
    // BLOCK_STATUS without a negotiated context.
    assert_eq!(c.request(req(CMD_BLOCK_STATUS, 4, 0, 4096), &[]).await.error, EINVAL);
    // DF without structured replies, NO_HOLE on a write, unknown bit.
    let mut r = req(CMD_READ, 5, 0, 512);
    r.flags = CMD_FLAG_DF;
    assert_eq!(c.request(r, &[]).await.error, EINVAL);
    let mut w = req(CMD_WRITE, 6, 0, 3);
    w.flags = CMD_FLAG_NO_HOLE;
    assert_eq!(c.request(w, b"abc").await.error, EINVAL, "payload consumed, stream in sync");
    let mut f = req(CMD_FLUSH, 7, 0, 0);
    f.flags = 1 << 9;
    assert_eq!(c.request(f, &[]).await.error, EINVAL);
    // FUA is fine on any command once advertised.
    let mut f = req(CMD_FLUSH, 8, 0, 0);
    f.flags = CMD_FLAG_FUA;
    assert_eq!(c.request(f, &[]).await.error, 0);
    let mut w = req(CMD_WRITE, 9, 0, 3);
    w.flags = CMD_FLAG_FUA;
    assert_eq!(c.request(w, b"xyz").await.error, 0);
    assert_eq!(&dev.read(0, 3).await.unwrap()[..], b"xyz");
    c.disconnect().await;
    ends_ok(session).await;
}

#[tokio::test]
async fn zero_length_requests_do_not_touch_the_device() {
    let (server, dev) = test_server(TestDevice::new(|_| {}));
    let (mut c, _, _, session) = TestClient::connect(&server, true).await;
    assert_eq!(c.read(1, 0, 0).await.error, 0);
    assert_eq!(c.write_at(2, SIZE, &[]).await.error, 0);
    assert_eq!(c.request(req(CMD_TRIM, 3, 4096, 0), &[]).await.error, 0);
    assert_eq!(c.request(req(CMD_WRITE_ZEROES, 4, 4096, 0), &[]).await.error, 0);
    // Block status must describe something: zero length is invalid.
    assert_eq!(c.request(req(CMD_BLOCK_STATUS, 5, 0, 0), &[]).await.error, EINVAL);
    assert_eq!(dev.ops.load(Ordering::SeqCst), 0);
    c.disconnect().await;
    ends_ok(session).await;
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm() {
    let (server, dev) = test_server(TestDevice::new(|c| c.read_only = true));
    let (mut c, _, flags, session) = TestClient::connect(&server, false).await;
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO), 0);
    assert_eq!(c.write_at(1, 0, b"nope").await.error, EPERM);
    assert_eq!(c.request(req(CMD_TRIM, 2, 0, 4096), &[]).await.error, EPERM);
    assert_eq!(c.request(req(CMD_WRITE_ZEROES, 3, 0, 4096), &[]).await.error, EPERM);
    assert_eq!(c.read(4, 0, 4).await.error, 0);
    assert_eq!(dev.mem.allocated_blocks(), 0);
    c.disconnect().await;
    ends_ok(session).await;
}

#[tokio::test]
async fn pipelined_requests_complete_out_of_order() {
    let mut dev = TestDevice::new(|_| {});
    dev.delay = true;
    let dev = Arc::new(dev);
    let server = Arc::new(NbdServer::new(Arc::clone(&dev), NAME).with_max_in_flight(16));
    for structured in [false, true] {
        let (mut c, _, _, session) = TestClient::connect(&server, structured).await;
        const N: u64 = 64;
        // Many writes in flight at once.
        for i in 0..N {
            let cookie = 1000 + i;
            let data = pattern(i as u8, 4096);
            c.send(req(CMD_WRITE, cookie, i * 4096, 4096), &data).await;
        }
        let mut order = Vec::new();
        for _ in 0..N {
            let r = c.recv().await;
            assert_eq!(r.error, 0);
            order.push(r.cookie);
        }
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (1000..1000 + N).collect::<Vec<_>>(), "every cookie answered once");
        assert_ne!(order, sorted, "replies should come back out of order with delayed completions");
        // Many reads in flight; each reply carries its own request's data.
        for i in 0..N {
            c.send(req(CMD_READ, 5000 + i, i * 4096, 4096), &[]).await;
        }
        for _ in 0..N {
            let r = c.recv().await;
            let i = r.cookie - 5000;
            assert_eq!(r.error, 0);
            assert_eq!(r.data, pattern(i as u8, 4096), "data for cookie {}", r.cookie);
        }
        c.disconnect().await;
        ends_ok(session).await;
    }
}

#[tokio::test]
async fn disconnect_waits_for_requests_in_flight() {
    let mut dev = TestDevice::new(|_| {});
    dev.delay = true;
    let (server, dev) = test_server(dev);
    let (mut c, _, _, session) = TestClient::connect(&server, false).await;
    for i in 0..8u64 {
        c.send(req(CMD_WRITE, i, i * 4096 + 4096, 4096), &[0xee; 4096]).await;
    }
    c.write(&req(CMD_DISC, 99, 0, 0).encode()).await;
    for _ in 0..8 {
        assert_eq!(c.recv().await.error, 0);
    }
    assert!(c.closed().await);
    ends_ok(session).await;
    assert_eq!(dev.mem.allocated_blocks(), 8);
}

#[tokio::test]
async fn block_status_reports_holes_and_data() {
    let (server, dev) = mem_server();
    dev.write(8192, Bytes::from(vec![1u8; 8192]), false).await.unwrap();
    let (mut c, _, _, session) = TestClient::connect(&server, true).await;
    let r = c.request(req(CMD_BLOCK_STATUS, 1, 0, 32768), &[]).await;
    assert_eq!(r.error, 0);
    assert_eq!(
        r.chunks,
        vec![ReplyChunk::BlockStatus {
            context_id: BASE_ALLOCATION_ID,
            descriptors: vec![
                BlockDescriptor { length: 8192, flags: STATE_HOLE | STATE_ZERO },
                BlockDescriptor { length: 8192, flags: 0 },
                BlockDescriptor { length: 16384, flags: STATE_HOLE | STATE_ZERO },
            ],
        }]
    );
    // REQ_ONE: only the first extent; unaligned range clamped to the request.
    let mut one = req(CMD_BLOCK_STATUS, 2, 100, 20000);
    one.flags = CMD_FLAG_REQ_ONE;
    let r = c.request(one, &[]).await;
    assert_eq!(
        r.chunks,
        vec![ReplyChunk::BlockStatus {
            context_id: BASE_ALLOCATION_ID,
            descriptors: vec![BlockDescriptor { length: 8092, flags: STATE_HOLE | STATE_ZERO }],
        }]
    );
    let r = c.request(req(CMD_BLOCK_STATUS, 3, 9000, 100), &[]).await;
    assert_eq!(
        r.chunks,
        vec![ReplyChunk::BlockStatus {
            context_id: BASE_ALLOCATION_ID,
            descriptors: vec![BlockDescriptor { length: 100, flags: 0 }],
        }]
    );
    // Trim makes it a hole again.
    assert_eq!(c.request(req(CMD_TRIM, 4, 8192, 8192), &[]).await.error, 0);
    let r = c.request(req(CMD_BLOCK_STATUS, 5, 0, 32768), &[]).await;
    assert_eq!(
        r.chunks,
        vec![ReplyChunk::BlockStatus {
            context_id: BASE_ALLOCATION_ID,
            descriptors: vec![BlockDescriptor { length: 32768, flags: STATE_HOLE | STATE_ZERO }],
        }]
    );
    c.disconnect().await;
    ends_ok(session).await;
}

#[test]
fn descriptors_are_clamped_merged_and_limited() {
    use jiva_core::ExtentState::*;
    let e = |length, state| Extent { length, state };
    assert_eq!(
        descriptors(&[e(10, Data), e(0, Hole), e(5, Data), e(100, Zero)], 50, false),
        vec![BlockDescriptor { length: 15, flags: 0 }, BlockDescriptor { length: 35, flags: STATE_ZERO }]
    );
    assert_eq!(descriptors(&[], 7, false), vec![BlockDescriptor { length: 7, flags: 0 }]);
    assert_eq!(
        descriptors(&[e(u64::MAX, Hole)], u32::MAX, true),
        vec![BlockDescriptor { length: u32::MAX, flags: STATE_HOLE | STATE_ZERO }]
    );
}

#[tokio::test]
async fn fast_zero_follows_capabilities() {
    // Supported: zeroes, and the range reads back as zeros.
    let (server, dev) = mem_server();
    dev.write(0, Bytes::from(vec![9u8; 16384]), false).await.unwrap();
    let (mut c, _, flags, session) = TestClient::connect(&server, false).await;
    assert_ne!(flags & FLAG_SEND_FAST_ZERO, 0);
    let mut z = req(CMD_WRITE_ZEROES, 1, 4096, 8192);
    z.flags = CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE;
    assert_eq!(c.request(z, &[]).await.error, 0);
    let r = c.read(2, 0, 16384).await;
    assert!(r.data[..4096].iter().all(|&b| b == 9));
    assert!(r.data[4096..12288].iter().all(|&b| b == 0));
    assert!(r.data[12288..].iter().all(|&b| b == 9));
    c.disconnect().await;
    ends_ok(session).await;

    // Not supported: ENOTSUP, device untouched; plain zeroing still works.
    let (server, dev) = test_server(TestDevice::new(|c| c.fast_zero = false));
    dev.mem.write(0, Bytes::from(vec![9u8; 4096]), false).await.unwrap();
    let (mut c, _, flags, session) = TestClient::connect(&server, true).await;
    assert_eq!(flags & FLAG_SEND_FAST_ZERO, 0);
    assert_ne!(flags & FLAG_SEND_WRITE_ZEROES, 0);
    let mut z = req(CMD_WRITE_ZEROES, 1, 0, 4096);
    z.flags = CMD_FLAG_FAST_ZERO;
    let r = c.request(z, &[]).await;
    assert_eq!(r.error, ENOTSUP);
    assert!(matches!(r.chunks.as_slice(), [ReplyChunk::Error { error: ENOTSUP, .. }]));
    assert_eq!(dev.ops.load(Ordering::SeqCst), 0);
    assert_eq!(c.request(req(CMD_WRITE_ZEROES, 2, 0, 4096), &[]).await.error, 0);
    assert!(dev.mem.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));
    c.disconnect().await;
    ends_ok(session).await;
}

#[tokio::test]
async fn unadvertised_commands_are_einval() {
    let (server, _dev) = test_server(TestDevice::new(|c| {
        c.flush = false;
        c.fua = false;
        c.trim = false;
        c.write_zeroes = false;
        c.multi_conn = false;
    }));
    let (mut c, _, flags, session) = TestClient::connect(&server, false).await;
    assert_eq!(flags, FLAG_HAS_FLAGS);
    assert_eq!(c.request(req(CMD_FLUSH, 1, 0, 0), &[]).await.error, EINVAL);
    assert_eq!(c.request(req(CMD_TRIM, 2, 0, 4096), &[]).await.error, EINVAL);
    assert_eq!(c.request(req(CMD_WRITE_ZEROES, 3, 0, 4096), &[]).await.error, EINVAL);
    let mut w = req(CMD_WRITE, 4, 0, 1);
    w.flags = CMD_FLAG_FUA;
    assert_eq!(c.request(w, b"x").await.error, EINVAL);
    c.disconnect().await;
    ends_ok(session).await;
}

#[tokio::test]
async fn structured_read_replies_and_errors() {
    let (server, dev) = mem_server();
    dev.write(0, Bytes::from(pattern(3, 4096)), false).await.unwrap();
    let (mut c, _, _, session) = TestClient::connect(&server, true).await;
    let mut r = req(CMD_READ, 1, 0, 4096);
    r.flags = CMD_FLAG_DF;
    let reply = c.request(r, &[]).await;
    assert_eq!(reply.chunks.len(), 1, "one OFFSET_DATA chunk carrying DONE");
    assert!(
        matches!(&reply.chunks[0], ReplyChunk::OffsetData { offset: 0, data } if data[..] == pattern(3, 4096)[..])
    );
    // Zero-length read: a NONE chunk, never an empty OFFSET_DATA.
    assert_eq!(c.read(2, 0, 0).await.chunks, vec![ReplyChunk::None]);
    // Writes answer with NONE.
    assert_eq!(c.write_at(3, 0, b"x").await.chunks, vec![ReplyChunk::None]);
    // Device failures: EIO chunks; the session goes on.
    dev.set_corrupt_reads(true);
    let reply = c.read(4, 4096, 4096).await;
    assert_eq!(reply.error, EIO);
    assert!(
        matches!(&reply.chunks[..], [ReplyChunk::ErrorOffset { error: EIO, offset: 4096, message }] if message.contains("corrupt")),
        "{reply:?}"
    );
    dev.set_corrupt_reads(false);
    dev.set_failing(true);
    let reply = c.write_at(5, 0, b"y").await;
    assert!(matches!(&reply.chunks[..], [ReplyChunk::Error { error: EIO, .. }]), "{reply:?}");
    dev.set_failing(false);
    assert_eq!(c.read(6, 0, 1).await.data, b"x");
    c.disconnect().await;
    ends_ok(session).await;
}

#[tokio::test]
async fn simple_read_error_sends_no_payload() {
    let (server, dev) = mem_server();
    let (mut c, _, _, session) = TestClient::connect(&server, false).await;
    dev.set_failing(true);
    let r = c.read(1, 0, 4096).await;
    assert_eq!((r.error, r.data.len()), (EIO, 0));
    dev.set_failing(false);
    // If the failed read had sent data, this reply would be misparsed.
    assert_eq!(c.read(2, 0, 4).await.data, vec![0; 4]);
    c.disconnect().await;
    ends_ok(session).await;
}

#[tokio::test]
async fn bad_request_magic_closes() {
    let (server, _dev) = mem_server();
    let (mut c, _, _, session) = TestClient::connect(&server, false).await;
    let mut bytes = req(CMD_READ, 1, 0, 4).encode();
    bytes[0] ^= 0xff;
    c.write(&bytes).await;
    assert!(c.closed().await);
    assert!(matches!(ends_err(session).await, SessionError::Protocol(ProtoError::BadMagic { .. })));
}

#[tokio::test]
async fn eof_between_requests_is_a_clean_end() {
    let (server, _dev) = mem_server();
    let (mut c, _, _, session) = TestClient::connect(&server, false).await;
    assert_eq!(c.write_at(1, 0, b"abc").await.error, 0);
    drop(c);
    ends_ok(session).await;
}

#[test]
fn errno_mapping() {
    use jiva_core::ErrorKind as K;
    assert_eq!(errno_for(K::OutOfRange, CMD_WRITE), ENOSPC);
    assert_eq!(errno_for(K::OutOfRange, CMD_READ), EINVAL);
    assert_eq!(errno_for(K::OutOfRange, CMD_WRITE_ZEROES), EINVAL);
    assert_eq!(errno_for(K::NoSpace, CMD_WRITE), ENOSPC);
    assert_eq!(errno_for(K::Unsupported, CMD_TRIM), ENOTSUP);
    assert_eq!(errno_for(K::ReadOnly, CMD_WRITE), EPERM);
    assert_eq!(errno_for(K::InvalidArgument, CMD_READ), EINVAL);
    for k in [K::Io, K::Corrupt, K::Disconnected, K::Unavailable, K::TimedOut, K::Fenced, K::Protocol] {
        assert_eq!(errno_for(k, CMD_READ), EIO);
    }
}

/// `server` serving on a loopback TCP port until the returned sender is
/// used, and a client socket through the handshake (EXPORT_NAME, no
/// zeroes) into the transmission phase.
async fn serve_over_tcp<D: BlockDevice>(
    server: Arc<NbdServer<D>>,
) -> (
    tokio::net::TcpStream,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<io::Result<()>>,
    SocketAddr,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listener, async {
        let _ = stop_rx.await;
    }));
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; ServerGreeting::LEN];
    tokio::io::AsyncReadExt::read_exact(&mut sock, &mut greeting).await.unwrap();
    ServerGreeting::parse(&greeting).unwrap();
    sock.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).await.unwrap();
    sock.write_all(&NbdOption::ExportName(NAME.into()).encode()).await.unwrap();
    let mut info = [0u8; ExportNameReply::LEN];
    tokio::io::AsyncReadExt::read_exact(&mut sock, &mut info).await.unwrap();
    (sock, stop_tx, serving, addr)
}

#[tokio::test]
async fn serve_accepts_and_drains_on_shutdown() {
    let mut dev = TestDevice::new(|_| {});
    dev.delay = true;
    let (server, dev) = test_server(dev);
    let (mut sock, stop_tx, serving, addr) = serve_over_tcp(Arc::clone(&server)).await;
    // Queue writes, then shut down while they are in flight.
    for i in 0..4u64 {
        let mut b = req(CMD_WRITE, i, i * 4096, 4096).encode().to_vec();
        b.extend_from_slice(&[1u8; 4096]);
        sock.write_all(&b).await.unwrap();
    }
    // Let the server read them before shutting down.
    while dev.ops.load(Ordering::SeqCst) < 4 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop_tx.send(()).unwrap();
    // Replies for accepted requests still arrive, then EOF.
    let mut got = 0;
    loop {
        let mut b = [0u8; SimpleReply::LEN];
        match tokio::io::AsyncReadExt::read_exact(&mut sock, &mut b).await {
            Ok(_) => {
                assert_eq!(SimpleReply::parse(&b).unwrap().error, 0);
                got += 1;
            }
            Err(_) => break,
        }
    }
    assert_eq!(got, 4);
    tokio::time::timeout(Duration::from_secs(10), serving).await.unwrap().unwrap().unwrap();
    assert_eq!(dev.mem.allocated_blocks(), 4);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "listener closed");
}

async fn within<F: std::future::Future>(what: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), what).await.expect("the session stalled")
}

/// A large WRITE payload that arrives over TCP in pieces, with pauses
/// between them, is received whole, and the small request after it is
/// answered at once: the receive low-water mark follows what is left of
/// the payload and drops back to one byte after it (a mark left above what
/// the client sends before waiting for its reply would hang the session).
#[tokio::test]
async fn large_payloads_arriving_in_pieces_over_tcp_do_not_stall_the_session() {
    let (server, dev) = mem_server();
    let (mut sock, stop_tx, serving, _) = serve_over_tcp(Arc::clone(&server)).await;

    for (round, len) in [(0u8, SIZE as usize), (1, 3 * pipe::WHOLE_PAYLOAD_BYTES / 2)] {
        let data = pattern(round, len);
        // The header with a first piece, which the server reads partly
        // after raising the mark (so less is left than the mark), more
        // pieces, and a rest below the large-payload size, with pauses the
        // server sleeps through.
        let cuts = [0, len / 3, len - pipe::WHOLE_PAYLOAD_BYTES / 2, len];
        for (i, piece) in cuts.windows(2).enumerate() {
            let mut b = if i == 0 { req(CMD_WRITE, 1, 0, len as u32).encode().to_vec() } else { Vec::new() };
            b.extend_from_slice(&data[piece[0]..piece[1]]);
            sock.write_all(&b).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let mut reply = [0u8; SimpleReply::LEN];
        within(tokio::io::AsyncReadExt::read_exact(&mut sock, &mut reply)).await.unwrap();
        assert_eq!(SimpleReply::parse(&reply).unwrap().error, 0);

        // A request too small for any raised mark.
        sock.write_all(&req(CMD_READ, 2, len as u64 - 4096, 4096).encode()).await.unwrap();
        let mut reply = [0u8; SimpleReply::LEN + 4096];
        within(tokio::io::AsyncReadExt::read_exact(&mut sock, &mut reply)).await.unwrap();
        assert_eq!(SimpleReply::parse(&reply[..SimpleReply::LEN]).unwrap().error, 0);
        assert_eq!(&reply[SimpleReply::LEN..], &data[len - 4096..]);
        assert_eq!(&dev.read(0, len).await.unwrap()[..], &data[..]);
    }
    stop_tx.send(()).unwrap();
    drop(sock);
    tokio::time::timeout(Duration::from_secs(10), serving).await.unwrap().unwrap().unwrap();
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// Arbitrary bytes after a valid greeting exchange (handshake or
    /// transmission) never panic or hang the session.
    #[test]
    fn arbitrary_client_bytes_end_the_session_cleanly(
        garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        in_transmission: bool,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (server, _dev) = mem_server();
            let (mut c, session) = if in_transmission {
                let (c, _, _, s) = TestClient::connect(&server, true).await;
                (c, s)
            } else {
                let (mut c, s) = TestClient::start(&server);
                c.greet(FLAG_C_FIXED_NEWSTYLE).await;
                (c, s)
            };
            c.write(&garbage).await;
            c.io.shutdown().await.unwrap();
            // Drain whatever the server answers until it closes.
            let drain = async {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = tokio::io::AsyncReadExt::read(&mut c.io, &mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(10), drain).await.expect("server hangs");
            let r = tokio::time::timeout(Duration::from_secs(10), session).await.expect("session hangs");
            assert!(r.is_ok(), "session panicked");
        });
    }
}

fn arbitrary_request() -> impl proptest::strategy::Strategy<Value = (Request, Vec<u8>)> {
    use proptest::prelude::*;
    let offset = prop_oneof![Just(0u64), 0..SIZE, (SIZE - 8192)..(SIZE + 8192), any::<u64>()];
    let length = prop_oneof![Just(0u32), 0u32..16384, Just(MAX_IO_BYTES + 1), any::<u32>()];
    // Every command but DISC (which would end the session early).
    let command = prop_oneof![0u16..2, 3u16..12];
    (command, 0u16..64, any::<u64>(), offset, length, any::<u8>()).prop_map(
        |(command, flags, cookie, offset, length, fill)| {
            let mut req = Request { flags, command, cookie, offset, length };
            if command == CMD_WRITE {
                // Keep payloads small; the oversized case has its own test.
                req.length %= 16384;
            }
            let payload = if command == CMD_WRITE { vec![fill; req.length as usize] } else { Vec::new() };
            (req, payload)
        },
    )
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

    /// Random but well-framed requests, pipelined: every one gets exactly
    /// one reply, and the session ends cleanly on NBD_CMD_DISC.
    #[test]
    fn random_requests_each_get_one_reply(
        reqs in proptest::collection::vec(arbitrary_request(), 1..40),
        structured: bool,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (server, _dev) = mem_server();
            let (mut c, _, _, session) = TestClient::connect(&server, structured).await;
            let mut cookies = Vec::new();
            for (i, (mut req, payload)) in reqs.into_iter().enumerate() {
                req.cookie = i as u64;
                cookies.push(req.cookie);
                c.send(req, &payload).await;
            }
            let mut answered = Vec::new();
            for _ in 0..cookies.len() {
                answered.push(c.recv().await.cookie);
            }
            answered.sort_unstable();
            assert_eq!(answered, cookies);
            c.disconnect().await;
            ends_ok(session).await;
        });
    }
}

// ---------------------------------------------------------------------------
// Further exports (snapshots).

/// One further export, `vol@s1`.
struct OneSnapshot(Arc<MemDevice>);

impl crate::Exports for OneSnapshot {
    type Device = MemDevice;

    async fn names(&self) -> Vec<String> {
        vec!["vol@s1".into()]
    }

    async fn open(&self, name: &str) -> Option<Arc<MemDevice>> {
        (name == "vol@s1").then(|| self.0.clone())
    }
}

#[tokio::test]
async fn further_exports_are_listed_and_read_only() {
    let main = Arc::new(MemDevice::new(SIZE));
    let snap = Arc::new(MemDevice::new(SIZE));
    snap.write(0, Bytes::from(pattern(7, 8192)), false).await.unwrap();
    let server = Arc::new(
        NbdServer::new(Arc::clone(&main), NAME).with_exports(Arc::new(OneSnapshot(Arc::clone(&snap)))),
    );
    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let list = c.option(&NbdOption::List).await;
    assert_eq!(list[1], OptionReply::Server { name: "vol@s1".into(), description: "read-only".into() });
    let unknown = c.option(&NbdOption::Info(InfoRequest { export: "vol@s2".into(), requests: vec![] })).await;
    assert!(matches!(unknown.as_slice(), [OptionReply::Error { reply_type: REP_ERR_UNKNOWN, .. }]));
    let (size, flags) = c.go("vol@s1", vec![]).await;
    assert_eq!(size, SIZE);
    assert_ne!(flags & FLAG_READ_ONLY, 0, "a further export is read-only even if its device is not");
    assert_eq!(flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
    assert_eq!(server.clients(), 0, "only sessions on the main export count as clients");
    assert_eq!(c.read(1, 0, 8192).await.data, pattern(7, 8192));
    assert_eq!(c.write_at(2, 0, b"nope").await.error, EPERM);
    assert_eq!(&snap.read(0, 4).await.unwrap()[..], &pattern(7, 4)[..]);
    c.disconnect().await;
    ends_ok(session).await;

    let (mut c, session) = TestClient::start(&server);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    c.go(NAME, vec![]).await;
    // The session counts once the server has taken the GO.
    assert_eq!(c.read(1, 0, 4).await.error, 0);
    assert_eq!(server.clients(), 1);
    c.disconnect().await;
    ends_ok(session).await;
    assert_eq!(server.clients(), 0);
}

/// A device that hands large reads over in pipes and takes large writes
/// in them, as a volume with a local replica does; counts piped writes.
struct PipedDevice(MemDevice, AtomicUsize);

impl BlockDevice for PipedDevice {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.0.read(offset, len).await
    }
    async fn read_payload(&self, offset: u64, len: usize) -> Result<Payload> {
        let data = self.0.read(offset, len).await?;
        let mut pipe = jiva_core::pipe::Piped::with_capacity(len).unwrap();
        assert_eq!(pipe.push_bytes(&data).unwrap(), jiva_core::pipe::Filled::Done);
        Ok(Payload::Piped(pipe))
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.0.write(offset, data, fua).await
    }
    fn takes_piped_writes(&self) -> bool {
        true
    }
    async fn write_payload(&self, offset: u64, data: Payload, fua: bool) -> Result<()> {
        if let Payload::Piped(_) = data {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
        self.0.write(offset, data.into_bytes()?, fua).await
    }
    async fn flush(&self) -> Result<()> {
        self.0.flush().await
    }
}

/// A served [`PipedDevice`] of 8 MiB and a client socket past the handshake.
async fn piped_session() -> (Arc<NbdServer<PipedDevice>>, Arc<PipedDevice>, tokio::net::TcpStream) {
    let dev = Arc::new(PipedDevice(MemDevice::new(8 << 20), AtomicUsize::new(0)));
    let (server, sock) = tcp_session(Arc::clone(&dev)).await;
    (server, dev, sock)
}

/// `dev` served over TCP, and a client socket past the handshake.
async fn tcp_session<D: BlockDevice>(dev: Arc<D>) -> (Arc<NbdServer<D>>, tokio::net::TcpStream) {
    let server = Arc::new(NbdServer::new(dev, NAME));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(Arc::clone(&server).serve(listener, std::future::pending::<()>()));
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; ServerGreeting::LEN];
    tokio::io::AsyncReadExt::read_exact(&mut sock, &mut greeting).await.unwrap();
    sock.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).await.unwrap();
    sock.write_all(&NbdOption::ExportName(NAME.into()).encode()).await.unwrap();
    let mut info = [0u8; ExportNameReply::LEN];
    tokio::io::AsyncReadExt::read_exact(&mut sock, &mut info).await.unwrap();
    (server, sock)
}

#[tokio::test]
async fn large_write_payloads_arrive_through_pipes_in_order_with_the_others() {
    let (_server, dev, mut sock) = piped_session().await;
    // Pipelined without waiting: large (piped) and small (copied) writes,
    // one at an unaligned offset, one just below the piped size; each
    // header sits right behind the previous payload, so the server's read
    // buffer holds parts of payloads and the next headers.
    let writes: [(u64, u64, usize); 6] = [
        (1, 0, 1 << 20),
        (2, (1 << 20) + 512, 4096),
        (3, 2 << 20, 512 << 10),
        (4, (3 << 20) + 100, (768 << 10) + 3),
        (5, 5 << 20, pipe::MIN_PIPED_WRITE_BYTES - 4096),
        (6, 6 << 20, 1 << 20),
    ];
    let mut expect = vec![0u8; 8 << 20];
    let mut stream = Vec::new();
    for &(cookie, offset, len) in &writes {
        let data = pattern(cookie as u8, len);
        expect[offset as usize..offset as usize + len].copy_from_slice(&data);
        stream.extend_from_slice(&req(CMD_WRITE, cookie, offset, len as u32).encode());
        stream.extend_from_slice(&data);
    }
    // In uneven pieces, so payloads arrive split across socket reads.
    for piece in stream.chunks(100_003) {
        sock.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut reply = [0u8; SimpleReply::LEN];
    let mut cookies = Vec::new();
    for _ in 0..writes.len() {
        tokio::io::AsyncReadExt::read_exact(&mut sock, &mut reply).await.unwrap();
        let r = SimpleReply::parse(&reply).unwrap();
        assert_eq!(r.error, 0, "cookie {}", r.cookie);
        cookies.push(r.cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, [1, 2, 3, 4, 5, 6]);
    let got = dev.0.read(0, 8 << 20).await.unwrap();
    assert!(got[..] == expect[..], "device contents differ from what was written");
    // The four payloads of at least MIN_PIPED_WRITE_BYTES came in pipes.
    assert_eq!(dev.1.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn payloads_in_memory_arrive_whole_and_in_order_however_the_socket_splits_them() {
    // A device that takes no pipes: every payload is received into memory,
    // the large part of each straight from the socket, around the reader's
    // buffer; small ones (and headers) through it.
    let dev = Arc::new(MemDevice::new(8 << 20));
    let (_server, mut sock) = tcp_session(Arc::clone(&dev)).await;

    // Sizes around the direct-read threshold and the reader's 64 KiB
    // buffer, pipelined, each header right behind the previous payload.
    let sizes = [4096, 16 << 10, (16 << 10) - 1, 65536, 65537, 100_000, 512, 1 << 20, 20_000, 70_000];
    let mut expect = vec![0u8; 8 << 20];
    let mut stream = Vec::new();
    let mut offset = 0usize;
    for (i, &len) in sizes.iter().enumerate() {
        let data = pattern(i as u8 + 1, len);
        expect[offset..offset + len].copy_from_slice(&data);
        stream.extend_from_slice(&req(CMD_WRITE, i as u64, offset as u64, len as u32).encode());
        stream.extend_from_slice(&data);
        offset += len + 777;
    }
    for (n, piece) in stream.chunks(12_345).enumerate() {
        sock.write_all(piece).await.unwrap();
        if n % 7 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut reply = [0u8; SimpleReply::LEN];
    for _ in 0..sizes.len() {
        tokio::io::AsyncReadExt::read_exact(&mut sock, &mut reply).await.unwrap();
        assert_eq!(SimpleReply::parse(&reply).unwrap().error, 0);
    }
    let got = dev.read(0, 8 << 20).await.unwrap();
    assert!(got[..] == expect[..], "device contents differ from what was written");
}

#[tokio::test]
async fn a_client_gone_mid_way_through_a_piped_payload_ends_the_session() {
    let (server, dev, mut sock) = piped_session().await;
    assert_eq!(server.clients(), 1);
    let mut w = req(CMD_WRITE, 1, 0, 1 << 20).encode().to_vec();
    w.extend_from_slice(&pattern(3, 600 << 10));
    sock.write_all(&w).await.unwrap();
    drop(sock);
    // The session ends without writing anything (and without hanging).
    for _ in 0..200 {
        if server.clients() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.clients(), 0, "the session did not end");
    assert_eq!(dev.1.load(Ordering::SeqCst), 0);
    assert!(dev.0.read(0, 1 << 20).await.unwrap().iter().all(|&b| b == 0));
}

#[tokio::test]
async fn piped_read_replies_are_spliced_in_order_with_the_others() {
    let (_server, _dev, mut sock) = piped_session().await;

    let data = pattern(9, 2 << 20);
    let mut w = req(CMD_WRITE, 1, 0, 2 << 20).encode().to_vec();
    w.extend_from_slice(&data);
    sock.write_all(&w).await.unwrap();
    let mut reply = [0u8; SimpleReply::LEN];
    tokio::io::AsyncReadExt::read_exact(&mut sock, &mut reply).await.unwrap();
    assert_eq!(SimpleReply::parse(&reply).unwrap().error, 0);

    // Large (piped) and small (copied) reads pipelined; replies may come in
    // any order, each whole.
    let reads: [(u64, u64, u32); 4] =
        [(2, 0, 1 << 20), (3, 4096, 512), (4, (1 << 20) + 4096, 256 << 10), (5, 0, 4096)];
    for &(cookie, offset, len) in &reads {
        sock.write_all(&req(CMD_READ, cookie, offset, len).encode()).await.unwrap();
    }
    for _ in 0..reads.len() {
        tokio::io::AsyncReadExt::read_exact(&mut sock, &mut reply).await.unwrap();
        let r = SimpleReply::parse(&reply).unwrap();
        assert_eq!(r.error, 0);
        let &(_, offset, len) = reads.iter().find(|x| x.0 == r.cookie).expect("known cookie");
        let mut got = vec![0u8; len as usize];
        tokio::io::AsyncReadExt::read_exact(&mut sock, &mut got).await.unwrap();
        assert!(got[..] == data[offset as usize..(offset + u64::from(len)) as usize], "cookie {}", r.cookie);
    }
}

/// A device that serves some large reads at once (on the caller's thread,
/// as a volume with a local replica does) and leaves the others to the
/// async path: those at offsets in an odd MiB. Counts both.
struct AtOnceDevice {
    mem: MemDevice,
    at_once: AtomicUsize,
    later: AtomicUsize,
}

impl BlockDevice for AtOnceDevice {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.mem.capabilities()
    }
    fn read_at_once(&self, offset: u64, len: usize) -> Option<Bytes> {
        if (offset >> 20) % 2 == 1 {
            return None;
        }
        self.at_once.fetch_add(1, Ordering::SeqCst);
        let mut out = vec![0u8; len];
        // MemDevice's read completes at its first poll.
        let data = futures_lite_now(self.mem.read(offset, len)).unwrap();
        out.copy_from_slice(&data);
        Some(out.into())
    }
    fn reads_at_once(&self, _len: usize) -> bool {
        true
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.later.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis((offset >> 12) % 5)).await;
        self.mem.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.mem.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<()> {
        self.mem.flush().await
    }
}

/// Polls a future that completes at once, without a runtime.
fn futures_lite_now<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("the read did not complete at once"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_served_at_once_are_sent_whole_among_the_other_replies() {
    let dev = Arc::new(AtOnceDevice { mem: MemDevice::new(8 << 20), at_once: 0.into(), later: 0.into() });
    let (_server, mut sock) = tcp_session(Arc::clone(&dev)).await;
    let data = pattern(5, 8 << 20);
    dev.mem.write(0, Bytes::from(data.clone()), false).await.unwrap();

    // Large reads served at once and large ones that are not, small reads
    // and writes (of data already there), all pipelined.
    let mut expect = std::collections::HashMap::new();
    let mut stream = Vec::new();
    for i in 0..160u64 {
        let (command, offset, len) = match i % 4 {
            0 => (CMD_READ, (i % 8) << 20, 1 << 20),
            1 => (CMD_READ, ((i % 7) << 20) + 4096 * (i % 3), 256 << 10),
            2 => (CMD_READ, 4096 * i, 4096),
            _ => (CMD_WRITE, 8192 * i, 8192),
        };
        stream.extend_from_slice(&req(command, i, offset, len).encode());
        if command == CMD_WRITE {
            stream.extend_from_slice(&data[offset as usize..offset as usize + len as usize]);
        }
        expect.insert(i, (command, offset, len));
    }
    let (mut rd, mut wr) = sock.split();
    let send = async {
        wr.write_all(&stream).await.unwrap();
    };
    let receive = async {
        let mut reply = [0u8; SimpleReply::LEN];
        for n in 0..expect.len() {
            // Slow now and then, so the socket fills and senders wait for
            // room: the moments a frame could be cut into.
            if n % 8 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::io::AsyncReadExt::read_exact(&mut rd, &mut reply).await.unwrap();
            let r = SimpleReply::parse(&reply).expect("a reply header where one belongs");
            assert_eq!(r.error, 0);
            let (command, offset, len) = expect.remove(&r.cookie).expect("a known cookie, once");
            if command == CMD_READ {
                let mut got = vec![0u8; len as usize];
                tokio::io::AsyncReadExt::read_exact(&mut rd, &mut got).await.unwrap();
                assert!(
                    got[..] == data[offset as usize..(offset + u64::from(len)) as usize],
                    "cookie {}",
                    r.cookie
                );
            }
        }
    };
    tokio::join!(send, receive);
    assert!(expect.is_empty());
    assert!(dev.at_once.load(Ordering::SeqCst) > 0, "no read was served at once");
    assert!(dev.later.load(Ordering::SeqCst) > 0, "every read was served at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_and_leaves_does_not_hold_reads_sent_at_once() {
    let dev = Arc::new(AtOnceDevice { mem: MemDevice::new(8 << 20), at_once: 0.into(), later: 0.into() });
    let (server, mut sock) = tcp_session(Arc::clone(&dev)).await;
    // More large replies than the socket buffers hold; none is read.
    for i in 0..32u64 {
        sock.write_all(&req(CMD_READ, i, (i % 4) << 21, 1 << 20).encode()).await.unwrap();
    }
    for _ in 0..200 {
        if dev.at_once.load(Ordering::SeqCst) >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(dev.at_once.load(Ordering::SeqCst) >= 4);
    drop(sock);
    for _ in 0..500 {
        if server.clients() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.clients(), 0, "the session did not end");
}
