//! Sessions over in-memory streams: the target's connection handling
//! against the test client and against hand-made hostile PDUs.

use std::time::Duration;

use jiva_core::mem::MemDevice;
use jiva_scsi::cdb::{Rw, Width};
use jiva_scsi::{Command, sense::key};
use tokio::io::DuplexStream;
use tokio::task::JoinHandle;

use super::*;
use crate::client::{Client, ClientError, LoginOptions, Response};

const IQN: &str = "iqn.2026-11.io.jiva:test";
const INITIATOR: &str = "iqn.2026-11.io.jiva:initiator";
const SIZE: u64 = 64 << 20;

fn target() -> IscsiTarget<MemDevice> {
    IscsiTarget::new(Arc::new(MemDevice::new(SIZE)), IQN)
}

fn connect(t: &Arc<IscsiTarget<MemDevice>>) -> (DuplexStream, JoinHandle<Result<(), ConnError>>) {
    let (a, b) = tokio::io::duplex(4 << 20);
    (a, tokio::spawn(Arc::clone(t).handle_connection(b)))
}

async fn login(t: &Arc<IscsiTarget<MemDevice>>, o: LoginOptions) -> Client<DuplexStream> {
    let (s, _h) = connect(t);
    Client::login(s, o).await.expect("login")
}

/// Login options for session `i` of a test that goes through data modes:
/// an 8 KiB first burst, so that larger writes are solicited.
fn data_mode(
    i: usize,
    immediate_data: bool,
    initial_r2t: bool,
    header_digest: bool,
    data_digest: bool,
) -> LoginOptions {
    let mut o = LoginOptions::normal(INITIATOR, IQN);
    o.immediate_data = immediate_data;
    o.initial_r2t = initial_r2t;
    o.header_digest = header_digest;
    o.data_digest = data_digest;
    o.first_burst = 8192;
    o.isid[5] = i as u8;
    o
}

fn rw(lba: u64, blocks: u32) -> Rw {
    Rw { width: Width::W16, lba, blocks, dpo: false, fua: false, protect: 0 }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

async fn write(c: &mut Client<DuplexStream>, lba: u64, data: &[u8]) -> Response {
    let cdb = Command::Write(rw(lba, (data.len() / 512) as u32)).encode();
    c.command(&cdb, Some(data), 0).await.expect("write")
}

async fn read(c: &mut Client<DuplexStream>, lba: u64, blocks: u32) -> Response {
    let cdb = Command::Read(rw(lba, blocks)).encode();
    c.command(&cdb, None, blocks * 512).await.expect("read")
}

#[tokio::test]
async fn write_read_every_data_mode() {
    let t = Arc::new(target());
    let modes = [
        (true, false, false, false),
        (false, true, false, false),
        (true, true, true, true),
        (false, false, true, false),
    ];
    for (i, (immediate_data, initial_r2t, hd, dd)) in modes.into_iter().enumerate() {
        let mut o = data_mode(i, immediate_data, initial_r2t, hd, dd);
        o.max_burst = 16384;
        let mut c = login(&t, o).await;
        assert_eq!(c.digests(), Digests { header: hd, data: dd });
        // Larger than the first burst and several bursts: R2Ts, several
        // outstanding; odd sizes to exercise padding.
        for (lba, blocks) in [(0u64, 1usize), (100, 7), (1000, 129), (5000, 2048)] {
            let data = pattern(blocks * 512, i as u8 + lba as u8);
            let r = write(&mut c, lba, &data).await;
            assert_eq!((r.status, r.sense), (0, None), "mode {i} write {blocks} blocks");
            let r = read(&mut c, lba, blocks as u32).await;
            assert_eq!(r.status, 0);
            assert!(r.data == data, "mode {i}: read back {blocks} blocks differs");
        }
        assert_eq!(c.logout().await.unwrap(), 0);
    }
}

#[tokio::test]
async fn inquiry_capacity_and_missing_lun() {
    let t = Arc::new(target());
    let mut c = login(&t, LoginOptions::normal(INITIATOR, IQN)).await;
    let r =
        c.command(&Command::Inquiry { evpd: false, page: 0, alloc: 255 }.encode(), None, 255).await.unwrap();
    assert_eq!(r.status, 0);
    assert_eq!(r.data.len(), 96);
    assert_eq!(r.residual, Residual { overflow: false, underflow: true, count: 255 - 96 });
    let r = c.command(&Command::ReadCapacity16 { alloc: 32 }.encode(), None, 32).await.unwrap();
    assert_eq!(u64::from_be_bytes(r.data[0..8].try_into().unwrap()) + 1, SIZE / 512);
    // Read with a short expected length: data cut, overflow reported.
    let r = c.command(&Command::Read(rw(0, 1)).encode(), None, 200).await.unwrap();
    assert_eq!(r.data.len(), 200);
    assert_eq!(r.residual, Residual { overflow: true, underflow: false, count: 312 });
    // Out of range: sense data travels in the SCSI Response.
    let r = c.command(&Command::Read(rw(SIZE / 512, 1)).encode(), None, 512).await.unwrap();
    assert_eq!(r.status, Status::CheckCondition as u8);
    assert_eq!(r.sense.unwrap().asc, Asc::LBA_OUT_OF_RANGE);
}

#[tokio::test]
async fn write_residuals_follow_the_expected_length() {
    let t = Arc::new(target());
    let mut c = login(&t, LoginOptions::normal(INITIATOR, IQN)).await;
    // One block announced, 10000 bytes sent: underflow, one block written.
    let cdb = Command::Write(rw(0, 1)).encode();
    let r = c.command(&cdb, Some(&vec![0xa6; 10000]), 0).await.unwrap();
    assert_eq!((r.status, r.residual), (0, Residual { overflow: false, underflow: true, count: 9488 }));
    // Two blocks announced, one sent: overflow, only the first written.
    write(&mut c, 10, &[b'a'; 1024]).await;
    let cdb = Command::Write(rw(10, 2)).encode();
    let r = c.command(&cdb, Some(&[b'b'; 512]), 0).await.unwrap();
    assert_eq!((r.status, r.residual), (0, Residual { overflow: true, underflow: false, count: 512 }));
    let back = read(&mut c, 10, 2).await;
    assert!(back.data[..512].iter().all(|&b| b == b'b'));
    assert!(back.data[512..].iter().all(|&b| b == b'a'));
}

#[tokio::test]
async fn chap_over_the_wire() {
    let t = Arc::new(target().with_chap("user", "secret-secret").with_mutual_chap("tgt", "tsecret-tsecret"));
    let mut o = LoginOptions::normal(INITIATOR, IQN);
    o.chap = Some(("user".into(), "wrong".into()));
    let (s, h) = connect(&t);
    match Client::login(s, o.clone()).await {
        Err(ClientError::Login(code)) => assert_eq!(code, login::status::AUTHENTICATION_FAILED),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("wrong secret accepted"),
    }
    assert!(matches!(h.await.unwrap(), Err(ConnError::LoginFailed(_))));
    // No CHAP at all is refused too.
    let (s, _h) = connect(&t);
    assert!(Client::login(s, LoginOptions::normal(INITIATOR, IQN)).await.is_err());
    o.chap = Some(("user".into(), "secret-secret".into()));
    o.mutual = Some(("tgt".into(), "tsecret-tsecret".into()));
    let mut c = login(&t, o).await;
    assert_eq!(c.command(&Command::TestUnitReady.encode(), None, 0).await.unwrap().status, 0);
}

#[tokio::test]
async fn discovery_lists_the_target() {
    let t = Arc::new(target().with_portal("127.0.0.1:3260"));
    let mut c = login(&t, LoginOptions::discovery(INITIATOR)).await;
    let pairs = c.text(&[("SendTargets", "All")]).await.unwrap();
    assert_eq!(
        pairs,
        vec![("TargetName".into(), IQN.into()), ("TargetAddress".into(), "127.0.0.1:3260,1".into())]
    );
    // SCSI commands are not allowed in a discovery session.
    let err = c.command(&Command::TestUnitReady.encode(), None, 0).await.unwrap_err();
    assert!(matches!(err, ClientError::Rejected(reject::PROTOCOL_ERROR)));
    assert_eq!(c.logout().await.unwrap(), 0);
}

#[tokio::test]
async fn wrong_target_name_is_not_found() {
    let t = Arc::new(target());
    let (s, _h) = connect(&t);
    match Client::login(s, LoginOptions::normal(INITIATOR, "iqn.nope")).await {
        Err(ClientError::Login(code)) => assert_eq!(code, login::status::NOT_FOUND),
        _ => panic!("expected NOT FOUND"),
    }
}

#[tokio::test]
async fn commands_outside_the_window_are_ignored() {
    let t = Arc::new(target());
    let mut c = login(&t, LoginOptions::normal(INITIATOR, IQN)).await;
    let max = c.max_cmd_sn;
    let saved = c.cmd_sn;
    c.cmd_sn = max.wrapping_add(1);
    let tur = Command::TestUnitReady.encode();
    let too_high = c.command(&tur, None, 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), too_high).await.is_err(),
        "answered out of window"
    );
    c.cmd_sn = saved.wrapping_sub(1);
    let too_low = c.command(&tur, None, 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), too_low).await.is_err(),
        "answered a stale CmdSN"
    );
    c.cmd_sn = saved;
    assert_eq!(c.command(&Command::TestUnitReady.encode(), None, 0).await.unwrap().status, 0);
    assert_eq!(&c.ping(b"hello").await.unwrap()[..], b"hello");
}

/// Sends a write without its data (InitialR2T, no immediate data) and
/// returns its ITT; the target answers with an R2T and waits.
async fn stalled_write(c: &mut Client<DuplexStream>, lba: u64) -> u32 {
    let itt = 0x7000 + lba as u32;
    let cmd_sn = c.cmd_sn;
    c.cmd_sn += 1;
    let mut cdb = Command::Write(rw(lba, 8)).encode();
    cdb.resize(16, 0);
    c.send(&Pdu::ScsiCommand(ScsiCommand {
        immediate: false,
        final_: true,
        read: false,
        write: true,
        attr: 1,
        lun: 0,
        itt,
        edtl: 4096,
        cmd_sn,
        exp_stat_sn: c.exp_stat_sn,
        cdb,
        bidi_read_len: None,
        data: Bytes::new(),
    }))
    .await
    .unwrap();
    match c.recv().await.unwrap() {
        Pdu::R2t(r) => assert_eq!((r.itt, r.offset, r.desired_len), (itt, 0, 4096)),
        other => panic!("expected an R2T, got {other:?}"),
    }
    itt
}

async fn data_out(
    c: &mut Client<DuplexStream>,
    itt: u32,
    ttt: u32,
    data_sn: u32,
    offset: u32,
    len: usize,
    f: bool,
) {
    c.send(&Pdu::DataOut(DataOut {
        final_: f,
        lun: 0,
        itt,
        ttt,
        exp_stat_sn: c.exp_stat_sn,
        data_sn,
        offset,
        data: Bytes::from(vec![0xee; len]),
    }))
    .await
    .unwrap();
}

#[tokio::test]
async fn abort_task_and_lun_reset() {
    let dev = Arc::new(MemDevice::new(SIZE));
    let t = Arc::new(IscsiTarget::new(Arc::clone(&dev), IQN));
    let mut o = LoginOptions::normal(INITIATOR, IQN);
    o.initial_r2t = true;
    o.immediate_data = false;
    let mut c = login(&t, o).await;
    let itt = stalled_write(&mut c, 0).await;
    c.send_task_mgmt(tmf::ABORT_TASK, itt).await.unwrap();
    match c.recv().await.unwrap() {
        Pdu::TaskMgmtResponse(r) => assert_eq!(r.response, tmf::FUNCTION_COMPLETE),
        other => panic!("{other:?}"),
    }
    // Late data for the aborted task is dropped; nothing is written.
    data_out(&mut c, itt, 1, 0, 0, 4096, true).await;
    // Aborting it again: the task no longer exists.
    c.send_task_mgmt(tmf::ABORT_TASK, itt).await.unwrap();
    match c.recv().await.unwrap() {
        Pdu::TaskMgmtResponse(r) => assert_eq!(r.response, tmf::TASK_DOES_NOT_EXIST),
        other => panic!("{other:?}"),
    }
    let _ = stalled_write(&mut c, 64).await;
    c.send_task_mgmt(tmf::LOGICAL_UNIT_RESET, RESERVED_TAG).await.unwrap();
    match c.recv().await.unwrap() {
        Pdu::TaskMgmtResponse(r) => assert_eq!(r.response, tmf::FUNCTION_COMPLETE),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.command(&Command::TestUnitReady.encode(), None, 0).await.unwrap().status, 0);
    assert_eq!(dev.allocated_blocks(), 0, "aborted writes changed the volume");
}

#[tokio::test]
async fn bad_data_sn_fails_the_command() {
    let dev = Arc::new(MemDevice::new(SIZE));
    let t = Arc::new(IscsiTarget::new(Arc::clone(&dev), IQN));
    let mut o = LoginOptions::normal(INITIATOR, IQN);
    o.initial_r2t = true;
    o.immediate_data = false;
    let mut c = login(&t, o).await;
    let itt = stalled_write(&mut c, 0).await;
    data_out(&mut c, itt, 1, 0, 0, 2048, false).await;
    data_out(&mut c, itt, 1, 0, 2048, 2048, true).await; // DataSN should be 1
    match c.recv().await.unwrap() {
        Pdu::ScsiResponse(r) => {
            assert_eq!(r.status, Status::CheckCondition as u8);
            let sense = Sense::parse(&r.data[2..]).unwrap();
            assert_eq!(sense.key, key::ABORTED_COMMAND);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(dev.allocated_blocks(), 0);
}

#[tokio::test]
async fn hostile_pdus_are_rejected_and_the_session_survives() {
    let dev = Arc::new(MemDevice::new(SIZE));
    let t = Arc::new(IscsiTarget::new(Arc::clone(&dev), IQN));
    let mut c = login(&t, LoginOptions::normal(INITIATOR, IQN)).await;
    // Unknown opcode.
    let mut bad = [0u8; 48];
    bad[0] = 0x1d;
    c.stream().write_all(&bad).await.unwrap();
    assert!(matches!(c.recv().await.unwrap(), Pdu::Reject(r) if r.reason == reject::COMMAND_NOT_SUPPORTED));
    // A data segment larger than we declared: skipped and rejected.
    let mut big = [0u8; 48];
    big[0] = opcode::NOP_OUT | 0x40;
    big[1] = 0x80;
    let len = 300_000u32;
    big[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    big[16..20].copy_from_slice(&RESERVED_TAG.to_be_bytes());
    c.stream().write_all(&big).await.unwrap();
    c.stream().write_all(&vec![0u8; len as usize]).await.unwrap();
    assert!(matches!(c.recv().await.unwrap(), Pdu::Reject(r) if r.reason == reject::PROTOCOL_ERROR));
    // A target-only PDU from the initiator.
    c.send(&Pdu::R2t(R2t {
        lun: 0,
        itt: 1,
        ttt: 1,
        stat_sn: 0,
        exp_cmd_sn: 0,
        max_cmd_sn: 0,
        r2t_sn: 0,
        offset: 0,
        desired_len: 1,
    }))
    .await
    .unwrap();
    assert!(matches!(c.recv().await.unwrap(), Pdu::Reject(_)));
    // Immediate data on a read: protocol error, command dropped.
    let itt = 999;
    let mut cdb = Command::Read(rw(0, 1)).encode();
    cdb.resize(16, 0);
    let cmd_sn = c.cmd_sn;
    c.send(&Pdu::ScsiCommand(ScsiCommand {
        immediate: false,
        final_: true,
        read: true,
        write: false,
        attr: 1,
        lun: 0,
        itt,
        edtl: 512,
        cmd_sn,
        exp_stat_sn: 0,
        cdb,
        bidi_read_len: None,
        data: Bytes::from_static(&[1; 8]),
    }))
    .await
    .unwrap();
    c.cmd_sn += 1;
    assert!(matches!(c.recv().await.unwrap(), Pdu::Reject(r) if r.reason == reject::PROTOCOL_ERROR));
    // Still usable.
    assert_eq!(c.command(&Command::TestUnitReady.encode(), None, 0).await.unwrap().status, 0);
    assert_eq!(dev.allocated_blocks(), 0);
}

#[tokio::test]
async fn header_digest_error_closes_the_connection() {
    let t = Arc::new(target());
    let mut o = LoginOptions::normal(INITIATOR, IQN);
    o.header_digest = true;
    let (s, h) = connect(&t);
    let mut c = Client::login(s, o).await.unwrap();
    let mut b = Pdu::NopOut(NopOut {
        immediate: true,
        lun: 0,
        itt: 5,
        ttt: RESERVED_TAG,
        cmd_sn: c.cmd_sn,
        exp_stat_sn: 0,
        data: Bytes::new(),
    })
    .encode(c.digests());
    b[48] ^= 0xff;
    c.stream().write_all(&b).await.unwrap();
    assert!(matches!(h.await.unwrap(), Err(ConnError::HeaderDigest)));
    assert_eq!(t.session_count(), 0);
}

#[tokio::test]
async fn login_that_never_finishes_times_out() {
    let t = Arc::new(target().with_login_timeout(Duration::from_millis(200)));
    let (mut s, h) = connect(&t);
    // Half a header, then silence.
    s.write_all(&[0x43; 20]).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), h).await.expect("no timeout").unwrap();
    assert!(matches!(r, Err(ConnError::LoginTimeout(_))));
}

#[tokio::test]
async fn random_bytes_never_panic_or_write() {
    let dev = Arc::new(MemDevice::new(SIZE));
    let t = Arc::new(IscsiTarget::new(Arc::clone(&dev), IQN).with_login_timeout(Duration::from_millis(500)));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..200 {
        let (s, h) = connect(&t);
        let mut c = if round % 2 == 0 {
            // After a real login, so the full feature phase sees garbage too.
            let mut o = LoginOptions::normal(INITIATOR, IQN);
            o.isid[5] = round as u8;
            Client::login(s, o).await.unwrap()
        } else {
            Client::login(s, LoginOptions::discovery(INITIATOR)).await.unwrap()
        };
        let len = (next() % 4000) as usize;
        let mut junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Make some headers plausible: small lengths, known opcodes.
        if len >= 48 {
            junk[0] = [0x00, 0x02, 0x04, 0x05, 0x06, 0x10, 0x3f][(next() % 7) as usize] | 0x40;
            junk[4] = 0;
            junk[5] = 0;
        }
        let _ = c.stream().write_all(&junk).await;
        drop(c);
        let _ = tokio::time::timeout(Duration::from_secs(5), h).await.expect("connection hung");
    }
    assert_eq!(dev.allocated_blocks(), 0);
    assert_eq!(t.session_count(), 0);
}

#[tokio::test]
async fn several_sessions_and_a_second_connection() {
    let t = Arc::new(target());
    let mut a = login(&t, LoginOptions::normal(INITIATOR, IQN)).await;
    let mut o = LoginOptions::normal("iqn.2026-11.io.jiva:other", IQN);
    o.max_connections = 2;
    let mut b = login(&t, o.clone()).await;
    assert_eq!(t.session_count(), 2);
    // A second connection in session b (MC/S).
    o.tsih = b.tsih;
    o.cid = 1;
    o.cmd_sn = b.cmd_sn;
    let mut b2 = login(&t, o).await;
    assert_eq!(b2.tsih, b.tsih);
    write(&mut a, 0, &pattern(4096, 1)).await;
    // b2 uses the session's shared CmdSN stream.
    b2.cmd_sn = b.cmd_sn;
    let r = read(&mut b2, 0, 8).await;
    assert_eq!(r.data, pattern(4096, 1));
    b.cmd_sn = b2.cmd_sn;
    assert_eq!(read(&mut b, 0, 8).await.data, pattern(4096, 1));
    assert_eq!(t.session_count(), 2);
    assert_eq!(a.logout().await.unwrap(), 0);
    assert_eq!(b.logout().await.unwrap(), 0);
    // Logging out session b closes both its connections.
    assert!(b2.recv().await.is_err());
    for _ in 0..100 {
        if t.session_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(t.session_count(), 0);
}

#[tokio::test]
async fn session_reinstatement_replaces_the_old_session() {
    let t = Arc::new(target());
    let mut a = login(&t, LoginOptions::normal(INITIATOR, IQN)).await;
    let old = a.tsih;
    let mut again = login(&t, LoginOptions::normal(INITIATOR, IQN)).await;
    assert_ne!(again.tsih, old);
    assert!(a.recv().await.is_err(), "old connection still open");
    assert_eq!(again.command(&Command::TestUnitReady.encode(), None, 0).await.unwrap().status, 0);
}

#[tokio::test]
async fn lun_numbering() {
    assert_eq!(lun_index(0), Some(0));
    assert_eq!(lun_index(0x0001_0000_0000_0000), Some(1));
    assert_eq!(lun_index(0x4001_0000_0000_0000), Some(1));
    assert_eq!(lun_index(0x0000_0000_0000_0001), None);
    let t = Arc::new(target());
    let mut c = login(&t, LoginOptions::normal(INITIATOR, IQN)).await;
    let itt = 42;
    let cmd_sn = c.cmd_sn;
    c.cmd_sn += 1;
    let mut cdb = Command::TestUnitReady.encode();
    cdb.resize(16, 0);
    c.send(&Pdu::ScsiCommand(ScsiCommand {
        immediate: false,
        final_: true,
        read: false,
        write: false,
        attr: 1,
        lun: 0x0001_0000_0000_0000,
        itt,
        edtl: 0,
        cmd_sn,
        exp_stat_sn: 0,
        cdb,
        bidi_read_len: None,
        data: Bytes::new(),
    }))
    .await
    .unwrap();
    match c.recv().await.unwrap() {
        Pdu::ScsiResponse(r) => {
            assert_eq!(Sense::parse(&r.data[2..]).unwrap().asc, Asc::LUN_NOT_SUPPORTED);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_initiator_that_never_reads_is_throttled() {
    let t = Arc::new(target());
    let (mine, theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(Arc::clone(&t).handle_connection(theirs));
    let mut o = LoginOptions::normal(INITIATOR, IQN);
    o.max_recv_data_segment = 65536;
    let mut c = Client::login(mine, o).await.unwrap();
    // 64 KiB pings that are never read: 64 MiB of echoes, far beyond what
    // the target may queue; it must stop reading (so we block) instead.
    let flood = async {
        for itt in 0..1024u32 {
            let ping = Pdu::NopOut(NopOut {
                immediate: true,
                lun: 0,
                itt,
                ttt: RESERVED_TAG,
                cmd_sn: c.cmd_sn,
                exp_stat_sn: 0,
                data: Bytes::from(vec![7u8; 65536]),
            });
            c.send(&ping).await.unwrap();
        }
    };
    assert!(tokio::time::timeout(Duration::from_secs(3), flood).await.is_err(), "target read without bound");
}

/// A device whose WRITE data may come in memory it shares (as a volume's
/// does with its replicas), counting the writes that did.
struct SharingDevice {
    mem: MemDevice,
    pool: Arc<jiva_core::shm::ShmPool>,
    shared_writes: std::sync::atomic::AtomicUsize,
}

impl BlockDevice for SharingDevice {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn capabilities(&self) -> jiva_core::device::Capabilities {
        self.mem.capabilities()
    }
    async fn read(&self, offset: u64, len: usize) -> jiva_core::Result<Bytes> {
        self.mem.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> jiva_core::Result<()> {
        if self.pool.locate(&data).is_some() {
            self.shared_writes.fetch_add(1, Ordering::Relaxed);
        }
        self.mem.write(offset, data, fua).await
    }
    fn payload_buffer(&self, len: usize) -> Option<jiva_core::shm::ShmBuf> {
        self.pool.alloc(len)
    }
    async fn flush(&self) -> jiva_core::Result<()> {
        self.mem.flush().await
    }
}

#[tokio::test]
async fn write_data_is_received_into_memory_the_device_shares() {
    let dev = Arc::new(SharingDevice {
        mem: MemDevice::new(SIZE),
        pool: jiva_core::shm::ShmPool::new(8 << 20).unwrap(),
        shared_writes: Default::default(),
    });
    let t = Arc::new(IscsiTarget::new(Arc::clone(&dev), IQN));
    // With and without immediate data (which lands at the buffer's start),
    // with data digests too.
    for (i, (immediate_data, dd)) in [(false, false), (true, false), (true, true)].into_iter().enumerate() {
        let mut o = data_mode(i, immediate_data, true, false, dd);
        o.max_burst = 65536;
        let (a, b) = tokio::io::duplex(4 << 20);
        tokio::spawn(Arc::clone(&t).handle_connection(b));
        let mut c = Client::login(a, o).await.expect("login");
        let before = dev.shared_writes.load(Ordering::Relaxed);
        // Two larger than the first burst (solicited with R2Ts), one that
        // fits it (all immediate data where that is on).
        for (lba, blocks) in [(0u64, 2048u32), (4096, 33), (8192, 16)] {
            let data = pattern(blocks as usize * 512, i as u8 + lba as u8);
            let cdb = Command::Write(rw(lba, blocks)).encode();
            let r = c.command(&cdb, Some(&data), 0).await.expect("write");
            assert_eq!((r.status, r.sense), (0, None), "mode {i} write {blocks} blocks");
            let r =
                c.command(&Command::Read(rw(lba, blocks)).encode(), None, blocks * 512).await.expect("read");
            assert!(r.data == data, "mode {i}: read back {blocks} blocks differs");
        }
        assert_eq!(
            dev.shared_writes.load(Ordering::Relaxed) - before,
            3,
            "mode {i}: writes not in shared memory"
        );
        assert_eq!(c.logout().await.unwrap(), 0);
    }
}
