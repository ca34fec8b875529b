//! Logical unit behaviour against an in-memory device.

use super::*;
use crate::cdb::op;
use jiva_core::mem::MemDevice;

fn unit() -> LogicalUnit<MemDevice> {
    LogicalUnit::new(Arc::new(MemDevice::new(1 << 20)), Identity::for_volume("vol"))
}

fn nexus(name: &str) -> Nexus {
    Nexus::iscsi(name, [0, 2, 0x3d, 0, 0, 1], "iqn.t", 1)
}

fn rw(width: Width, lba: u64, blocks: u32) -> Rw {
    Rw { width, lba, blocks, dpo: false, fua: false, protect: 0 }
}

async fn run<D: BlockDevice>(lu: &LogicalUnit<D>, n: &Nexus, cmd: Command, data: Vec<u8>) -> Outcome {
    lu.execute(n, &cmd.encode(), Bytes::from(data)).await
}

fn asc(out: &Outcome) -> Option<(u8, Asc)> {
    out.sense.map(|s| (s.key, s.asc))
}

#[tokio::test]
async fn write_then_read_back() {
    let lu = unit();
    let n = nexus("a");
    let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    let out = run(&lu, &n, Command::Write(rw(Width::W10, 3, 8)), data.clone()).await;
    assert_eq!(out.status, Status::Good);
    assert_eq!(out.data_out_len, 4096);
    let out = run(&lu, &n, Command::Read(rw(Width::W16, 3, 8)), vec![]).await;
    assert_eq!(out.status, Status::Good);
    assert_eq!(&out.data[..], &data[..]);
}

#[tokio::test]
async fn short_data_out_writes_whole_blocks_received() {
    let lu = unit();
    let n = nexus("a");
    run(&lu, &n, Command::Write(rw(Width::W10, 0, 2)), vec![b'a'; 1024]).await;
    let out = run(&lu, &n, Command::Write(rw(Width::W10, 0, 2)), vec![b'b'; 512]).await;
    assert_eq!(out.status, Status::Good);
    let back = run(&lu, &n, Command::Read(rw(Width::W10, 0, 2)), vec![]).await;
    assert!(back.data[..512].iter().all(|&b| b == b'b'));
    assert!(back.data[512..].iter().all(|&b| b == b'a'));
}

#[tokio::test]
async fn out_of_range_and_invalid_fields() {
    let lu = unit();
    let n = nexus("a");
    let blocks = lu.blocks();
    let out = run(&lu, &n, Command::Read(rw(Width::W16, blocks - 1, 2)), vec![]).await;
    assert_eq!(asc(&out), Some((key::ILLEGAL_REQUEST, Asc::LBA_OUT_OF_RANGE)));
    let out = run(&lu, &n, Command::Read(rw(Width::W16, u64::MAX, 1)), vec![]).await;
    assert_eq!(asc(&out), Some((key::ILLEGAL_REQUEST, Asc::LBA_OUT_OF_RANGE)));
    let mut prot = rw(Width::W10, 0, 1);
    prot.protect = 1;
    let out = run(&lu, &n, Command::Read(prot), vec![]).await;
    assert_eq!(asc(&out), Some((key::ILLEGAL_REQUEST, Asc::INVALID_FIELD_IN_CDB)));
    let out = lu.execute(&n, &[0xc5, 0, 0, 0, 0, 0], Bytes::new()).await;
    assert_eq!(asc(&out), Some((key::ILLEGAL_REQUEST, Asc::INVALID_OPCODE)));
    let out = run(&lu, &n, Command::Inquiry { evpd: false, page: 1, alloc: 255 }, vec![]).await;
    assert_eq!(asc(&out), Some((key::ILLEGAL_REQUEST, Asc::INVALID_FIELD_IN_CDB)));
}

#[tokio::test]
async fn device_errors_become_medium_errors() {
    let dev = Arc::new(MemDevice::new(1 << 20));
    let lu = LogicalUnit::new(Arc::clone(&dev), Identity::for_volume("vol"));
    let n = nexus("a");
    dev.set_corrupt_reads(true);
    let out = run(&lu, &n, Command::Read(rw(Width::W10, 0, 1)), vec![]).await;
    assert_eq!(asc(&out), Some((key::MEDIUM_ERROR, Asc::UNRECOVERED_READ_ERROR)));
    assert!(out.data.is_empty(), "corrupt data is never returned");
    dev.set_corrupt_reads(false);
    dev.set_failing(true);
    let out = run(&lu, &n, Command::Write(rw(Width::W10, 0, 1)), vec![0; 512]).await;
    assert_eq!(asc(&out), Some((key::MEDIUM_ERROR, Asc::WRITE_ERROR)));
}

#[tokio::test]
async fn compare_and_write() {
    let lu = unit();
    let n = nexus("a");
    run(&lu, &n, Command::Write(rw(Width::W10, 10, 1)), vec![1; 512]).await;
    let caw = Command::CompareAndWrite { lba: 10, blocks: 1, dpo: false, fua: false, protect: 0 };
    let mut data = vec![1u8; 512];
    data.extend(vec![2u8; 512]);
    assert_eq!(run(&lu, &n, caw, data.clone()).await.status, Status::Good);
    // Now the medium holds 2s: comparing against 1s miscompares at byte 0.
    let out = run(&lu, &n, caw, data).await;
    assert_eq!(asc(&out), Some((key::MISCOMPARE, Asc::MISCOMPARE_DURING_VERIFY)));
    assert_eq!(out.sense.unwrap().information, Some(0));
    let back = run(&lu, &n, Command::Read(rw(Width::W10, 10, 1)), vec![]).await;
    assert!(back.data.iter().all(|&b| b == 2));
}

#[tokio::test]
async fn unmap_and_write_same_zero_the_range() {
    let dev = Arc::new(MemDevice::new(1 << 20));
    let lu = LogicalUnit::new(Arc::clone(&dev), Identity::for_volume("vol"));
    let n = nexus("a");
    run(&lu, &n, Command::Write(rw(Width::W10, 0, 64)), vec![7; 64 * 512]).await;
    assert_eq!(dev.allocated_blocks(), 8);
    let mut params = vec![0u8; 8];
    params[2..4].copy_from_slice(&16u16.to_be_bytes());
    params.extend_from_slice(&8u64.to_be_bytes());
    params.extend_from_slice(&16u32.to_be_bytes());
    params.extend_from_slice(&[0; 4]);
    let out = run(&lu, &n, Command::Unmap { anchor: false, len: 24 }, params).await;
    assert_eq!(out.status, Status::Good);
    let back = run(&lu, &n, Command::Read(rw(Width::W10, 0, 64)), vec![]).await;
    assert!(back.data[8 * 512..24 * 512].iter().all(|&b| b == 0));
    assert!(back.data[..8 * 512].iter().all(|&b| b == 7));
    let ws = Command::WriteSame {
        width: Width::W16,
        lba: 24,
        blocks: 40,
        unmap: true,
        anchor: false,
        ndob: true,
        protect: 0,
    };
    assert_eq!(run(&lu, &n, ws, vec![]).await.status, Status::Good);
    assert_eq!(dev.allocated_blocks(), 1);
    // A non-zero pattern is written out block by block.
    let ws = Command::WriteSame {
        width: Width::W10,
        lba: 100,
        blocks: 3,
        unmap: false,
        anchor: false,
        ndob: false,
        protect: 0,
    };
    assert_eq!(run(&lu, &n, ws, vec![9; 512]).await.status, Status::Good);
    let back = run(&lu, &n, Command::Read(rw(Width::W10, 99, 5)), vec![]).await;
    assert!(back.data[..512].iter().all(|&b| b == 0));
    assert!(back.data[512..2048].iter().all(|&b| b == 9));
    assert!(back.data[2048..].iter().all(|&b| b == 0));
}

#[tokio::test]
async fn get_lba_status_reports_holes() {
    let lu = unit();
    let n = nexus("a");
    run(&lu, &n, Command::Write(rw(Width::W10, 16, 8)), vec![1; 4096]).await;
    let out = run(&lu, &n, Command::GetLbaStatus { lba: 0, alloc: 1024 }, vec![]).await;
    assert_eq!(out.status, Status::Good);
    let d = &out.data;
    let first = |i: usize| {
        let b = &d[8 + 16 * i..8 + 16 * (i + 1)];
        (
            u64::from_be_bytes(b[0..8].try_into().unwrap()),
            u32::from_be_bytes(b[8..12].try_into().unwrap()),
            b[12],
        )
    };
    assert_eq!(first(0), (0, 16, 1));
    assert_eq!(first(1), (16, 8, 0));
    let out = run(&lu, &n, Command::GetLbaStatus { lba: lu.blocks(), alloc: 1024 }, vec![]).await;
    assert_eq!(asc(&out), Some((key::ILLEGAL_REQUEST, Asc::LBA_OUT_OF_RANGE)));
}

#[tokio::test]
async fn spc2_reservation_conflicts() {
    let lu = unit();
    let (a, b) = (nexus("a"), nexus("b"));
    lu.attach(&a);
    lu.attach(&b);
    assert_eq!(run(&lu, &a, Command::Reserve { width: Width::W6 }, vec![]).await.status, Status::Good);
    let ms = Command::ModeSense {
        width: Width::W6,
        dbd: false,
        llbaa: false,
        pc: 0,
        page: 0x3f,
        subpage: 0,
        alloc: 255,
    };
    assert_eq!(run(&lu, &b, ms, vec![]).await.status, Status::ReservationConflict);
    assert_eq!(run(&lu, &b, Command::Release { width: Width::W6 }, vec![]).await.status, Status::Good);
    assert_eq!(
        run(&lu, &b, Command::Reserve { width: Width::W6 }, vec![]).await.status,
        Status::ReservationConflict
    );
    // Losing the nexus releases the reservation.
    lu.detach(&a);
    assert_eq!(run(&lu, &b, Command::Reserve { width: Width::W6 }, vec![]).await.status, Status::Good);
}

#[tokio::test]
async fn persistent_reservation_blocks_writes_of_others() {
    let lu = unit();
    let (a, b) = (nexus("a"), nexus("b"));
    let reg = |key: u64| {
        let p = ProutParams { key: 0, action_key: key, spec_i_pt: false, all_tg_pt: false, aptpl: false };
        p.encode().to_vec()
    };
    let prout = |action, kind| Command::PersistentReserveOut { action, scope: 0, kind, len: 24 };
    assert_eq!(run(&lu, &a, prout(pr::action_out::REGISTER, 0), reg(1)).await.status, Status::Good);
    let p = ProutParams { key: 1, action_key: 0, spec_i_pt: false, all_tg_pt: false, aptpl: false };
    let out = run(&lu, &a, prout(pr::action_out::RESERVE, 1), p.encode().to_vec()).await;
    assert_eq!(out.status, Status::Good);
    let w = run(&lu, &b, Command::Write(rw(Width::W10, 0, 1)), vec![0; 512]).await;
    assert_eq!(w.status, Status::ReservationConflict);
    let r = run(&lu, &b, Command::Read(rw(Width::W10, 0, 1)), vec![]).await;
    assert_eq!(r.status, Status::Good);
    // Wrong parameter list length.
    let out =
        run(&lu, &a, Command::PersistentReserveOut { action: 0, scope: 0, kind: 0, len: 20 }, reg(2)).await;
    assert_eq!(asc(&out), Some((key::ILLEGAL_REQUEST, Asc::PARAMETER_LIST_LENGTH_ERROR)));
    let keys = run(&lu, &b, Command::PersistentReserveIn { action: 0, alloc: 100 }, vec![]).await;
    assert_eq!(&keys.data[4..8], &8u32.to_be_bytes());
}

#[tokio::test]
async fn unit_attention_after_reset_and_request_sense() {
    let lu = unit();
    let (a, b) = (nexus("a"), nexus("b"));
    lu.attach(&a);
    lu.attach(&b);
    lu.reset(Some(&a), false);
    assert_eq!(run(&lu, &a, Command::TestUnitReady, vec![]).await.status, Status::Good);
    // INQUIRY does not report it; TEST UNIT READY does, once.
    assert_eq!(
        run(&lu, &b, Command::Inquiry { evpd: false, page: 0, alloc: 96 }, vec![]).await.status,
        Status::Good
    );
    let out = run(&lu, &b, Command::TestUnitReady, vec![]).await;
    assert_eq!(asc(&out), Some((key::UNIT_ATTENTION, Asc::BUS_DEVICE_RESET)));
    assert_eq!(run(&lu, &b, Command::TestUnitReady, vec![]).await.status, Status::Good);
    // REQUEST SENSE returns (and clears) a pending attention.
    lu.reset(Some(&a), false);
    let out = run(&lu, &b, Command::RequestSense { desc: false, alloc: 18 }, vec![]).await;
    let s = Sense::parse(&out.data).unwrap();
    assert_eq!((s.key, s.asc), (key::UNIT_ATTENTION, Asc::BUS_DEVICE_RESET));
    assert_eq!(run(&lu, &b, Command::TestUnitReady, vec![]).await.status, Status::Good);
}

#[tokio::test]
async fn mode_select_sets_write_protect_and_descriptor_sense() {
    let lu = unit();
    let n = nexus("a");
    let ms = Command::ModeSense {
        width: Width::W6,
        dbd: true,
        llbaa: false,
        pc: 0,
        page: pages::PAGE_CONTROL,
        subpage: 0,
        alloc: 255,
    };
    let cur = run(&lu, &n, ms, vec![]).await.data.to_vec();
    let mut sel = cur.clone();
    sel[0] = 0;
    sel[4 + 2] |= 0x04; // D_SENSE
    sel[4 + 4] |= 0x08; // SWP
    let len = sel.len() as u16;
    let out = run(&lu, &n, Command::ModeSelect { width: Width::W6, pf: true, sp: false, len }, sel).await;
    assert_eq!(out.status, Status::Good);
    let w = run(&lu, &n, Command::Write(rw(Width::W10, 0, 1)), vec![0; 512]).await;
    assert_eq!(asc(&w), Some((key::DATA_PROTECT, Asc::WRITE_PROTECTED)));
    assert!(w.descriptor_sense);
    assert_eq!(w.sense_data()[0], 0x72);
}

#[tokio::test]
async fn verify_compares_data() {
    let lu = unit();
    let n = nexus("a");
    run(&lu, &n, Command::Write(rw(Width::W10, 0, 2)), vec![5; 1024]).await;
    let v = |bytchk| Command::Verify { width: Width::W10, lba: 0, blocks: 2, dpo: false, protect: 0, bytchk };
    assert_eq!(run(&lu, &n, v(1), vec![5; 1024]).await.status, Status::Good);
    let mut bad = vec![5u8; 1024];
    bad[700] = 6;
    let out = run(&lu, &n, v(1), bad).await;
    assert_eq!(out.sense.unwrap().information, Some(700));
    assert_eq!(run(&lu, &n, v(3), vec![5; 512]).await.status, Status::Good);
    assert_eq!(run(&lu, &n, v(0), vec![]).await.status, Status::Good);
}

#[tokio::test]
async fn report_supported_opcodes_lists_everything() {
    let lu = unit();
    let n = nexus("a");
    let cmd = Command::ReportSupportedOpcodes { rctd: false, options: 0, opcode: 0, action: 0, alloc: 65535 };
    let out = run(&lu, &n, cmd, vec![]).await;
    let len = u32::from_be_bytes(out.data[0..4].try_into().unwrap()) as usize;
    assert_eq!(len, SUPPORTED.len() * 8);
    let one = Command::ReportSupportedOpcodes {
        rctd: false,
        options: 1,
        opcode: op::READ_10,
        action: 0,
        alloc: 100,
    };
    let out = run(&lu, &n, one, vec![]).await;
    assert_eq!(out.data[1] & 0x07, 3);
    assert_eq!(out.data[4], op::READ_10);
    // PERSISTENT RESERVE IN has service actions: option 1 is invalid.
    let bad = Command::ReportSupportedOpcodes {
        rctd: false,
        options: 1,
        opcode: op::PERSISTENT_RESERVE_IN,
        action: 0,
        alloc: 100,
    };
    assert_eq!(
        asc(&run(&lu, &n, bad, vec![]).await),
        Some((key::ILLEGAL_REQUEST, Asc::INVALID_FIELD_IN_CDB))
    );
}

#[tokio::test]
async fn missing_lun_answers() {
    let inq = missing_lun(&Command::Inquiry { evpd: false, page: 0, alloc: 36 }.encode());
    assert_eq!(inq.data[0], 0x7f);
    let other = missing_lun(&Command::TestUnitReady.encode());
    assert_eq!(asc(&other), Some((key::ILLEGAL_REQUEST, Asc::LUN_NOT_SUPPORTED)));
}

#[tokio::test]
async fn random_cdbs_never_change_a_protected_volume() {
    // Arbitrary CDBs with arbitrary data never panic; with the unit write
    // protected, none of them changes the medium.
    let dev = Arc::new(MemDevice::new(1 << 20));
    let lu = LogicalUnit::new(Arc::clone(&dev), Identity::for_volume("vol"));
    let n = nexus("a");
    lu.state().mode.swp = true;
    let mut x: u64 = 0x1234_5678;
    for _ in 0..20_000 {
        let mut cdb = [0u8; 16];
        for b in cdb.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        cdb[0] = SUPPORTED[(x as usize >> 8) % SUPPORTED.len()].opcode;
        cdb[1] &= 0x1f; // plausible service actions, no protect bits
        let data = vec![0xab; (x as usize >> 16) % 2048];
        let _ = lu.execute(&n, &cdb, Bytes::from(data)).await;
    }
    // PR state may have changed; data must not have.
    assert_eq!(dev.allocated_blocks(), 0);
}

#[tokio::test]
async fn get_lba_status_first_descriptor_starts_at_the_request() {
    let lu = unit();
    let n = nexus("a");
    run(&lu, &n, Command::Write(rw(Width::W10, 0, 264)), vec![b'A'; 264 * 512]).await;
    let mut params = vec![0u8; 8];
    params[2..4].copy_from_slice(&16u16.to_be_bytes());
    params.extend_from_slice(&0u64.to_be_bytes());
    params.extend_from_slice(&8u32.to_be_bytes());
    params.extend_from_slice(&[0; 4]);
    assert_eq!(run(&lu, &n, Command::Unmap { anchor: false, len: 24 }, params).await.status, Status::Good);
    let out = run(&lu, &n, Command::GetLbaStatus { lba: 8, alloc: 24 }, vec![]).await;
    assert_eq!(out.data.len(), 24);
    assert_eq!(u64::from_be_bytes(out.data[8..16].try_into().unwrap()), 8);
    assert_eq!(out.data[20], 0);
    // A start inside a physical block is reported from the next one.
    let out = run(&lu, &n, Command::GetLbaStatus { lba: 9, alloc: 24 }, vec![]).await;
    assert_eq!(u64::from_be_bytes(out.data[8..16].try_into().unwrap()), 16);
}

/// A device that reports chosen capabilities.
struct Limited(MemDevice, jiva_core::Capabilities);

impl BlockDevice for Limited {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn capabilities(&self) -> jiva_core::Capabilities {
        self.1
    }
    async fn read(&self, offset: u64, len: usize) -> jiva_core::Result<Bytes> {
        self.0.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> jiva_core::Result<()> {
        self.0.write(offset, data, fua).await
    }
    async fn flush(&self) -> jiva_core::Result<()> {
        self.0.flush().await
    }
}

#[tokio::test]
async fn without_trim_there_is_no_thin_provisioning() {
    let caps = jiva_core::Capabilities { flush: true, ..Default::default() };
    let lu = LogicalUnit::new(Arc::new(Limited(MemDevice::new(1 << 20), caps)), Identity::for_volume("v"));
    let n = nexus("a");
    let rc = run(&lu, &n, Command::ReadCapacity16 { alloc: 32 }, vec![]).await;
    assert_eq!(rc.data[14] & 0x80, 0, "LBPME must be clear");
    let vpd = run(&lu, &n, Command::Inquiry { evpd: true, page: 0xb2, alloc: 64 }, vec![]).await;
    assert_eq!(vpd.data[5], 0, "no LBPU/LBPWS");
    let out = run(&lu, &n, Command::Unmap { anchor: false, len: 24 }, vec![0; 24]).await;
    assert_eq!(asc(&out), Some((key::ILLEGAL_REQUEST, Asc::INVALID_OPCODE)));
    let ws = Command::WriteSame {
        width: Width::W16,
        lba: 0,
        blocks: 8,
        unmap: true,
        anchor: false,
        ndob: false,
        protect: 0,
    };
    let out = run(&lu, &n, ws, vec![0; 512]).await;
    assert_eq!(asc(&out), Some((key::ILLEGAL_REQUEST, Asc::INVALID_FIELD_IN_CDB)));
    // Without native FUA, a FUA write is followed by a flush and succeeds.
    let mut fua = rw(Width::W10, 0, 1);
    fua.fua = true;
    assert_eq!(run(&lu, &n, Command::Write(fua), vec![1; 512]).await.status, Status::Good);
}

#[tokio::test]
async fn read_only_device_refuses_writes() {
    let caps = jiva_core::Capabilities { read_only: true, ..Default::default() };
    let lu = LogicalUnit::new(Arc::new(Limited(MemDevice::new(1 << 20), caps)), Identity::for_volume("v"));
    let n = nexus("a");
    let out = run(&lu, &n, Command::Write(rw(Width::W10, 0, 1)), vec![1; 512]).await;
    assert_eq!(asc(&out), Some((key::DATA_PROTECT, Asc::WRITE_PROTECTED)));
    let ms = Command::ModeSense {
        width: Width::W10,
        dbd: true,
        llbaa: false,
        pc: 0,
        page: 0x3f,
        subpage: 0,
        alloc: 255,
    };
    let out = run(&lu, &n, ms, vec![]).await;
    assert_eq!(out.data[3] & 0x80, 0x80, "WP in the device-specific parameter");
    assert_eq!(run(&lu, &n, Command::Read(rw(Width::W10, 0, 1)), vec![]).await.status, Status::Good);
}
