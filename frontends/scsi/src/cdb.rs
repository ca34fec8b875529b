//! Command descriptor blocks: a pure parser from untrusted bytes to a
//! [`Command`], and the matching encoder (used by tests, tools and the
//! round-trip property tests). No I/O and no device knowledge here: the
//! parser checks structure (length, opcode, service action, control byte);
//! the logical unit checks meaning (ranges, supported flag combinations).
//!
//! Reference: SPC-4 and SBC-3. All multi-byte fields are big-endian.

use crate::sense::Sense;

/// Operation codes we implement.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const WRITE_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;

    /// SERVICE ACTION IN (16) service actions.
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
    pub const SA_GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN service action.
    pub const SA_REPORT_SUPPORTED_OPCODES: u8 = 0x0c;
}

/// Which of a command's CDB sizes was used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    W6,
    W10,
    W12,
    W16,
}

impl Width {
    pub const fn size(self) -> usize {
        match self {
            Width::W6 => 6,
            Width::W10 => 10,
            Width::W12 => 12,
            Width::W16 => 16,
        }
    }
}

/// The fields shared by READ and WRITE (and WRITE AND VERIFY).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rw {
    pub width: Width,
    pub lba: u64,
    /// Number of logical blocks (READ/WRITE(6): 1..=256, 0 on the wire means 256).
    pub blocks: u32,
    pub dpo: bool,
    pub fua: bool,
    /// RDPROTECT / WRPROTECT (3 bits). We have no protection information,
    /// so anything but 0 is refused by the logical unit.
    pub protect: u8,
}

/// A parsed CDB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        desc: bool,
        alloc: u8,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: u16,
    },
    ReportLuns {
        select: u8,
        alloc: u32,
    },
    ModeSense {
        width: Width,
        dbd: bool,
        llbaa: bool,
        pc: u8,
        page: u8,
        subpage: u8,
        alloc: u16,
    },
    ModeSelect {
        width: Width,
        pf: bool,
        sp: bool,
        len: u16,
    },
    StartStopUnit {
        immed: bool,
        power_condition: u8,
        no_flush: bool,
        loej: bool,
        start: bool,
    },
    PreventAllow {
        prevent: u8,
    },
    Reserve {
        width: Width,
    },
    Release {
        width: Width,
    },
    ReadCapacity10 {
        lba: u32,
        pmi: bool,
    },
    ReadCapacity16 {
        alloc: u32,
    },
    GetLbaStatus {
        lba: u64,
        alloc: u32,
    },
    Read(Rw),
    Write(Rw),
    /// WRITE AND VERIFY; `rw.fua` is unused (the command has no FUA bit).
    WriteVerify {
        rw: Rw,
        bytchk: bool,
    },
    Verify {
        width: Width,
        lba: u64,
        blocks: u32,
        dpo: bool,
        protect: u8,
        bytchk: u8,
    },
    SyncCache {
        width: Width,
        lba: u64,
        blocks: u32,
        immed: bool,
    },
    PreFetch {
        width: Width,
        lba: u64,
        blocks: u32,
        immed: bool,
    },
    WriteSame {
        width: Width,
        lba: u64,
        blocks: u32,
        unmap: bool,
        anchor: bool,
        ndob: bool,
        protect: u8,
    },
    Unmap {
        anchor: bool,
        len: u16,
    },
    CompareAndWrite {
        lba: u64,
        blocks: u8,
        dpo: bool,
        fua: bool,
        protect: u8,
    },
    PersistentReserveIn {
        action: u8,
        alloc: u16,
    },
    PersistentReserveOut {
        action: u8,
        scope: u8,
        kind: u8,
        len: u32,
    },
    ReportSupportedOpcodes {
        rctd: bool,
        options: u8,
        opcode: u8,
        action: u16,
        alloc: u32,
    },
}

/// Length of a CDB from its operation code's group (SPC-4 4.2.5.1), or
/// `None` for variable-length and vendor-specific groups.
pub const fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

fn width_of(len: usize) -> Width {
    match len {
        6 => Width::W6,
        10 => Width::W10,
        12 => Width::W12,
        _ => Width::W16,
    }
}

/// Starting LBA and block count of a 10/12/16-byte block command.
fn lba_count(c: &[u8], width: Width) -> (u64, u32) {
    match width {
        Width::W6 => (u64::from(be32(c, 0) & 0x001f_ffff), u32::from(c[4])),
        Width::W10 => (u64::from(be32(c, 2)), u32::from(be16(c, 7))),
        Width::W12 => (u64::from(be32(c, 2)), be32(c, 6)),
        Width::W16 => (be64(c, 2), be32(c, 10)),
    }
}

impl Command {
    /// Parses a CDB. `cdb` may be longer than the command (iSCSI always
    /// carries 16 bytes); it may not be shorter. Never panics.
    pub fn parse(cdb: &[u8]) -> Result<Command, Sense> {
        let Some(&opcode) = cdb.first() else {
            return Err(Sense::invalid_opcode());
        };
        let Some(len) = cdb_len(opcode) else {
            return Err(Sense::invalid_opcode());
        };
        if cdb.len() < len {
            return Err(Sense::invalid_cdb(0, None));
        }
        let c = &cdb[..len];
        // Control byte: NACA (ACA is not supported) and the obsolete LINK bit.
        let control = c[len - 1];
        if control & 0x04 != 0 {
            return Err(Sense::invalid_cdb((len - 1) as u16, Some(2)));
        }
        if control & 0x01 != 0 {
            return Err(Sense::invalid_cdb((len - 1) as u16, Some(0)));
        }
        let width = width_of(len);
        let rw = |protect_byte: u8| {
            let (lba, mut blocks) = lba_count(c, width);
            if width == Width::W6 && blocks == 0 {
                blocks = 256;
            }
            let (dpo, fua, protect) = if width == Width::W6 {
                (false, false, 0)
            } else {
                (protect_byte & 0x10 != 0, protect_byte & 0x08 != 0, protect_byte >> 5)
            };
            Rw { width, lba, blocks, dpo, fua, protect }
        };
        use op::*;
        let cmd = match opcode {
            TEST_UNIT_READY => Command::TestUnitReady,
            REQUEST_SENSE => Command::RequestSense { desc: c[1] & 0x01 != 0, alloc: c[4] },
            INQUIRY => {
                if c[1] & 0x02 != 0 {
                    // CMDDT is obsolete.
                    return Err(Sense::invalid_cdb(1, Some(1)));
                }
                Command::Inquiry { evpd: c[1] & 0x01 != 0, page: c[2], alloc: be16(c, 3) }
            }
            REPORT_LUNS => Command::ReportLuns { select: c[2], alloc: be32(c, 6) },
            MODE_SENSE_6 | MODE_SENSE_10 => Command::ModeSense {
                width,
                dbd: c[1] & 0x08 != 0,
                llbaa: width == Width::W10 && c[1] & 0x10 != 0,
                pc: c[2] >> 6,
                page: c[2] & 0x3f,
                subpage: c[3],
                alloc: if width == Width::W6 { u16::from(c[4]) } else { be16(c, 7) },
            },
            MODE_SELECT_6 | MODE_SELECT_10 => Command::ModeSelect {
                width,
                pf: c[1] & 0x10 != 0,
                sp: c[1] & 0x01 != 0,
                len: if width == Width::W6 { u16::from(c[4]) } else { be16(c, 7) },
            },
            START_STOP_UNIT => Command::StartStopUnit {
                immed: c[1] & 0x01 != 0,
                power_condition: c[4] >> 4,
                no_flush: c[4] & 0x04 != 0,
                loej: c[4] & 0x02 != 0,
                start: c[4] & 0x01 != 0,
            },
            PREVENT_ALLOW => Command::PreventAllow { prevent: c[4] & 0x03 },
            RESERVE_6 | RESERVE_10 => Command::Reserve { width },
            RELEASE_6 | RELEASE_10 => Command::Release { width },
            READ_CAPACITY_10 => Command::ReadCapacity10 { lba: be32(c, 2), pmi: c[8] & 0x01 != 0 },
            READ_6 | READ_10 | READ_12 | READ_16 => Command::Read(rw(c[1])),
            WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 => Command::Write(rw(c[1])),
            WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16 => {
                let mut rw = rw(c[1]);
                rw.fua = false;
                Command::WriteVerify { rw, bytchk: c[1] & 0x02 != 0 }
            }
            VERIFY_10 | VERIFY_12 | VERIFY_16 => {
                let (lba, blocks) = lba_count(c, width);
                Command::Verify {
                    width,
                    lba,
                    blocks,
                    dpo: c[1] & 0x10 != 0,
                    protect: c[1] >> 5,
                    bytchk: (c[1] >> 1) & 0x03,
                }
            }
            SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => {
                let (lba, blocks) = lba_count(c, width);
                Command::SyncCache { width, lba, blocks, immed: c[1] & 0x02 != 0 }
            }
            PRE_FETCH_10 | PRE_FETCH_16 => {
                let (lba, blocks) = lba_count(c, width);
                Command::PreFetch { width, lba, blocks, immed: c[1] & 0x02 != 0 }
            }
            WRITE_SAME_10 | WRITE_SAME_16 => {
                let (lba, blocks) = lba_count(c, width);
                Command::WriteSame {
                    width,
                    lba,
                    blocks,
                    unmap: c[1] & 0x08 != 0,
                    anchor: c[1] & 0x10 != 0,
                    ndob: width == Width::W16 && c[1] & 0x01 != 0,
                    protect: c[1] >> 5,
                }
            }
            UNMAP => Command::Unmap { anchor: c[1] & 0x01 != 0, len: be16(c, 7) },
            COMPARE_AND_WRITE => Command::CompareAndWrite {
                lba: be64(c, 2),
                blocks: c[13],
                dpo: c[1] & 0x10 != 0,
                fua: c[1] & 0x08 != 0,
                protect: c[1] >> 5,
            },
            PERSISTENT_RESERVE_IN => Command::PersistentReserveIn { action: c[1] & 0x1f, alloc: be16(c, 7) },
            PERSISTENT_RESERVE_OUT => Command::PersistentReserveOut {
                action: c[1] & 0x1f,
                scope: c[2] >> 4,
                kind: c[2] & 0x0f,
                len: be32(c, 5),
            },
            SERVICE_ACTION_IN_16 => match c[1] & 0x1f {
                SA_READ_CAPACITY_16 => Command::ReadCapacity16 { alloc: be32(c, 10) },
                SA_GET_LBA_STATUS => Command::GetLbaStatus { lba: be64(c, 2), alloc: be32(c, 10) },
                _ => return Err(Sense::invalid_cdb(1, None)),
            },
            MAINTENANCE_IN => match c[1] & 0x1f {
                SA_REPORT_SUPPORTED_OPCODES => Command::ReportSupportedOpcodes {
                    rctd: c[2] & 0x80 != 0,
                    options: c[2] & 0x07,
                    opcode: c[3],
                    action: be16(c, 4),
                    alloc: be32(c, 6),
                },
                _ => return Err(Sense::invalid_cdb(1, None)),
            },
            _ => return Err(Sense::invalid_opcode()),
        };
        Ok(cmd)
    }

    /// Encodes the command as a CDB of its width (inverse of [`Command::parse`]
    /// for every field the parser keeps; other bits are zero).
    pub fn encode(&self) -> Vec<u8> {
        use op::*;
        let put16 = |b: &mut [u8], at: usize, v: u16| b[at..at + 2].copy_from_slice(&v.to_be_bytes());
        let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        let block_cmd = |ops: [u8; 4], width: Width, lba: u64, blocks: u32, byte1: u8| {
            let mut b = vec![0u8; width.size()];
            match width {
                Width::W6 => {
                    put32(&mut b, 0, (lba as u32) & 0x001f_ffff);
                    b[0] = ops[0];
                    b[4] = blocks as u8; // 256 wraps to 0
                }
                Width::W10 => {
                    b[0] = ops[1];
                    b[1] = byte1;
                    put32(&mut b, 2, lba as u32);
                    put16(&mut b, 7, blocks as u16);
                }
                Width::W12 => {
                    b[0] = ops[2];
                    b[1] = byte1;
                    put32(&mut b, 2, lba as u32);
                    put32(&mut b, 6, blocks);
                }
                Width::W16 => {
                    b[0] = ops[3];
                    b[1] = byte1;
                    put64(&mut b, 2, lba);
                    put32(&mut b, 10, blocks);
                }
            }
            b
        };
        let rw_byte1 =
            |rw: &Rw| (rw.protect << 5) | if rw.dpo { 0x10 } else { 0 } | if rw.fua { 0x08 } else { 0 };
        match *self {
            Command::TestUnitReady => vec![TEST_UNIT_READY, 0, 0, 0, 0, 0],
            Command::RequestSense { desc, alloc } => vec![REQUEST_SENSE, u8::from(desc), 0, 0, alloc, 0],
            Command::Inquiry { evpd, page, alloc } => {
                let mut b = vec![INQUIRY, u8::from(evpd), page, 0, 0, 0];
                put16(&mut b, 3, alloc);
                b
            }
            Command::ReportLuns { select, alloc } => {
                let mut b = vec![0u8; 12];
                b[0] = REPORT_LUNS;
                b[2] = select;
                put32(&mut b, 6, alloc);
                b
            }
            Command::ModeSense { width, dbd, llbaa, pc, page, subpage, alloc } => {
                let byte1 = if dbd { 0x08 } else { 0 } | if llbaa { 0x10 } else { 0 };
                let byte2 = (pc << 6) | (page & 0x3f);
                if width == Width::W6 {
                    vec![MODE_SENSE_6, byte1, byte2, subpage, alloc as u8, 0]
                } else {
                    let mut b = vec![MODE_SENSE_10, byte1, byte2, subpage, 0, 0, 0, 0, 0, 0];
                    put16(&mut b, 7, alloc);
                    b
                }
            }
            Command::ModeSelect { width, pf, sp, len } => {
                let byte1 = if pf { 0x10 } else { 0 } | u8::from(sp);
                if width == Width::W6 {
                    vec![MODE_SELECT_6, byte1, 0, 0, len as u8, 0]
                } else {
                    let mut b = vec![MODE_SELECT_10, byte1, 0, 0, 0, 0, 0, 0, 0, 0];
                    put16(&mut b, 7, len);
                    b
                }
            }
            Command::StartStopUnit { immed, power_condition, no_flush, loej, start } => {
                let byte4 = (power_condition << 4)
                    | if no_flush { 0x04 } else { 0 }
                    | if loej { 0x02 } else { 0 }
                    | u8::from(start);
                vec![START_STOP_UNIT, u8::from(immed), 0, 0, byte4, 0]
            }
            Command::PreventAllow { prevent } => vec![PREVENT_ALLOW, 0, 0, 0, prevent & 0x03, 0],
            Command::Reserve { width } => {
                let mut b = vec![0u8; width.size()];
                b[0] = if width == Width::W6 { RESERVE_6 } else { RESERVE_10 };
                b
            }
            Command::Release { width } => {
                let mut b = vec![0u8; width.size()];
                b[0] = if width == Width::W6 { RELEASE_6 } else { RELEASE_10 };
                b
            }
            Command::ReadCapacity10 { lba, pmi } => {
                let mut b = vec![0u8; 10];
                b[0] = READ_CAPACITY_10;
                put32(&mut b, 2, lba);
                b[8] = u8::from(pmi);
                b
            }
            Command::ReadCapacity16 { alloc } => {
                let mut b = vec![0u8; 16];
                b[0] = SERVICE_ACTION_IN_16;
                b[1] = SA_READ_CAPACITY_16;
                put32(&mut b, 10, alloc);
                b
            }
            Command::GetLbaStatus { lba, alloc } => {
                let mut b = vec![0u8; 16];
                b[0] = SERVICE_ACTION_IN_16;
                b[1] = SA_GET_LBA_STATUS;
                put64(&mut b, 2, lba);
                put32(&mut b, 10, alloc);
                b
            }
            Command::Read(rw) => {
                block_cmd([READ_6, READ_10, READ_12, READ_16], rw.width, rw.lba, rw.blocks, rw_byte1(&rw))
            }
            Command::Write(rw) => {
                block_cmd([WRITE_6, WRITE_10, WRITE_12, WRITE_16], rw.width, rw.lba, rw.blocks, rw_byte1(&rw))
            }
            Command::WriteVerify { rw, bytchk } => {
                let byte1 = (rw.protect << 5) | if rw.dpo { 0x10 } else { 0 } | if bytchk { 0x02 } else { 0 };
                block_cmd(
                    [0, WRITE_VERIFY_10, WRITE_VERIFY_12, WRITE_VERIFY_16],
                    rw.width,
                    rw.lba,
                    rw.blocks,
                    byte1,
                )
            }
            Command::Verify { width, lba, blocks, dpo, protect, bytchk } => {
                let byte1 = (protect << 5) | if dpo { 0x10 } else { 0 } | ((bytchk & 0x03) << 1);
                block_cmd([0, VERIFY_10, VERIFY_12, VERIFY_16], width, lba, blocks, byte1)
            }
            Command::SyncCache { width, lba, blocks, immed } => block_cmd(
                [0, SYNCHRONIZE_CACHE_10, 0, SYNCHRONIZE_CACHE_16],
                width,
                lba,
                blocks,
                if immed { 0x02 } else { 0 },
            ),
            Command::PreFetch { width, lba, blocks, immed } => block_cmd(
                [0, PRE_FETCH_10, 0, PRE_FETCH_16],
                width,
                lba,
                blocks,
                if immed { 0x02 } else { 0 },
            ),
            Command::WriteSame { width, lba, blocks, unmap, anchor, ndob, protect } => {
                let byte1 = (protect << 5)
                    | if anchor { 0x10 } else { 0 }
                    | if unmap { 0x08 } else { 0 }
                    | u8::from(ndob);
                block_cmd([0, WRITE_SAME_10, 0, WRITE_SAME_16], width, lba, blocks, byte1)
            }
            Command::Unmap { anchor, len } => {
                let mut b = vec![0u8; 10];
                b[0] = UNMAP;
                b[1] = u8::from(anchor);
                put16(&mut b, 7, len);
                b
            }
            Command::CompareAndWrite { lba, blocks, dpo, fua, protect } => {
                let mut b = vec![0u8; 16];
                b[0] = COMPARE_AND_WRITE;
                b[1] = (protect << 5) | if dpo { 0x10 } else { 0 } | if fua { 0x08 } else { 0 };
                put64(&mut b, 2, lba);
                b[13] = blocks;
                b
            }
            Command::PersistentReserveIn { action, alloc } => {
                let mut b = vec![0u8; 10];
                b[0] = PERSISTENT_RESERVE_IN;
                b[1] = action & 0x1f;
                put16(&mut b, 7, alloc);
                b
            }
            Command::PersistentReserveOut { action, scope, kind, len } => {
                let mut b = vec![0u8; 10];
                b[0] = PERSISTENT_RESERVE_OUT;
                b[1] = action & 0x1f;
                b[2] = (scope << 4) | (kind & 0x0f);
                put32(&mut b, 5, len);
                b
            }
            Command::ReportSupportedOpcodes { rctd, options, opcode, action, alloc } => {
                let mut b = vec![0u8; 12];
                b[0] = MAINTENANCE_IN;
                b[1] = SA_REPORT_SUPPORTED_OPCODES;
                b[2] = if rctd { 0x80 } else { 0 } | (options & 0x07);
                b[3] = opcode;
                put16(&mut b, 4, action);
                put32(&mut b, 6, alloc);
                b
            }
        }
    }
}

/// Description of one supported command for REPORT SUPPORTED OPERATION
/// CODES: its opcode, service action (if it has one) and CDB usage data
/// (a bit set for every CDB bit the device server looks at; byte 0 is the
/// opcode itself).
#[derive(Clone, Copy, Debug)]
pub struct OpInfo {
    pub opcode: u8,
    pub action: Option<u16>,
    pub usage: &'static [u8],
}

const fn info(opcode: u8, usage: &'static [u8]) -> OpInfo {
    OpInfo { opcode, action: None, usage }
}

const fn info_sa(opcode: u8, action: u16, usage: &'static [u8]) -> OpInfo {
    OpInfo { opcode, action: Some(action), usage }
}

/// Every command [`Command::parse`] accepts, in opcode order.
pub const SUPPORTED: &[OpInfo] = {
    use op::*;
    &[
        info(TEST_UNIT_READY, &[TEST_UNIT_READY, 0, 0, 0, 0, 0x04]),
        info(REQUEST_SENSE, &[REQUEST_SENSE, 0x01, 0, 0, 0xff, 0x04]),
        info(READ_6, &[READ_6, 0x1f, 0xff, 0xff, 0xff, 0x04]),
        info(WRITE_6, &[WRITE_6, 0x1f, 0xff, 0xff, 0xff, 0x04]),
        info(INQUIRY, &[INQUIRY, 0x03, 0xff, 0xff, 0xff, 0x04]),
        info(MODE_SELECT_6, &[MODE_SELECT_6, 0x11, 0, 0, 0xff, 0x04]),
        info(RESERVE_6, &[RESERVE_6, 0, 0, 0, 0, 0x04]),
        info(RELEASE_6, &[RELEASE_6, 0, 0, 0, 0, 0x04]),
        info(MODE_SENSE_6, &[MODE_SENSE_6, 0x08, 0xff, 0xff, 0xff, 0x04]),
        info(START_STOP_UNIT, &[START_STOP_UNIT, 0x01, 0, 0x0f, 0xf7, 0x04]),
        info(PREVENT_ALLOW, &[PREVENT_ALLOW, 0, 0, 0, 0x03, 0x04]),
        info(READ_CAPACITY_10, &[READ_CAPACITY_10, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, 0x04]),
        info(READ_10, &[READ_10, 0xf8, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04]),
        info(WRITE_10, &[WRITE_10, 0xf8, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04]),
        info(WRITE_VERIFY_10, &[WRITE_VERIFY_10, 0xf2, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04]),
        info(VERIFY_10, &[VERIFY_10, 0xf6, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04]),
        info(PRE_FETCH_10, &[PRE_FETCH_10, 0x02, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04]),
        info(
            SYNCHRONIZE_CACHE_10,
            &[SYNCHRONIZE_CACHE_10, 0x02, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04],
        ),
        info(WRITE_SAME_10, &[WRITE_SAME_10, 0xf8, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04]),
        info(UNMAP, &[UNMAP, 0x01, 0, 0, 0, 0, 0x1f, 0xff, 0xff, 0x04]),
        info(MODE_SELECT_10, &[MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04]),
        info(RESERVE_10, &[RESERVE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0x04]),
        info(RELEASE_10, &[RELEASE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0x04]),
        info(MODE_SENSE_10, &[MODE_SENSE_10, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0x04]),
        info_sa(PERSISTENT_RESERVE_IN, 0, &[PERSISTENT_RESERVE_IN, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04]),
        info_sa(PERSISTENT_RESERVE_IN, 1, &[PERSISTENT_RESERVE_IN, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04]),
        info_sa(PERSISTENT_RESERVE_IN, 2, &[PERSISTENT_RESERVE_IN, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04]),
        info_sa(PERSISTENT_RESERVE_IN, 3, &[PERSISTENT_RESERVE_IN, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04]),
        info_sa(PERSISTENT_RESERVE_OUT, 0, PROUT_USAGE),
        info_sa(PERSISTENT_RESERVE_OUT, 1, PROUT_USAGE),
        info_sa(PERSISTENT_RESERVE_OUT, 2, PROUT_USAGE),
        info_sa(PERSISTENT_RESERVE_OUT, 3, PROUT_USAGE),
        info_sa(PERSISTENT_RESERVE_OUT, 4, PROUT_USAGE),
        info_sa(PERSISTENT_RESERVE_OUT, 5, PROUT_USAGE),
        info_sa(PERSISTENT_RESERVE_OUT, 6, PROUT_USAGE),
        info(
            READ_16,
            &[
                READ_16, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f,
                0x04,
            ],
        ),
        info(
            COMPARE_AND_WRITE,
            &[
                COMPARE_AND_WRITE,
                0xf8,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0,
                0,
                0,
                0xff,
                0x1f,
                0x04,
            ],
        ),
        info(
            WRITE_16,
            &[
                WRITE_16, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f,
                0x04,
            ],
        ),
        info(
            WRITE_VERIFY_16,
            &[
                WRITE_VERIFY_16,
                0xf2,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0x1f,
                0x04,
            ],
        ),
        info(
            VERIFY_16,
            &[
                VERIFY_16, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0x1f, 0x04,
            ],
        ),
        info(
            PRE_FETCH_16,
            &[
                PRE_FETCH_16,
                0x02,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0x1f,
                0x04,
            ],
        ),
        info(
            SYNCHRONIZE_CACHE_16,
            &[
                SYNCHRONIZE_CACHE_16,
                0x02,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0x1f,
                0x04,
            ],
        ),
        info(
            WRITE_SAME_16,
            &[
                WRITE_SAME_16,
                0xf9,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0x1f,
                0x04,
            ],
        ),
        info_sa(
            SERVICE_ACTION_IN_16,
            SA_READ_CAPACITY_16 as u16,
            &[SERVICE_ACTION_IN_16, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
        ),
        info_sa(
            SERVICE_ACTION_IN_16,
            SA_GET_LBA_STATUS as u16,
            &[
                SERVICE_ACTION_IN_16,
                0x1f,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0,
                0x04,
            ],
        ),
        info(REPORT_LUNS, &[REPORT_LUNS, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04]),
        info_sa(
            MAINTENANCE_IN,
            SA_REPORT_SUPPORTED_OPCODES as u16,
            &[MAINTENANCE_IN, 0x1f, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
        ),
        info(READ_12, &[READ_12, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04]),
        info(WRITE_12, &[WRITE_12, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04]),
        info(
            WRITE_VERIFY_12,
            &[WRITE_VERIFY_12, 0xf2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04],
        ),
        info(VERIFY_12, &[VERIFY_12, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04]),
    ]
};

const PROUT_USAGE: &[u8] = &[op::PERSISTENT_RESERVE_OUT, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sense::{Asc, key};
    use proptest::prelude::*;

    #[test]
    fn read6_zero_means_256() {
        let cmd = Command::parse(&[op::READ_6, 0x01, 0x02, 0x03, 0, 0]).unwrap();
        assert_eq!(
            cmd,
            Command::Read(Rw {
                width: Width::W6,
                lba: 0x010203,
                blocks: 256,
                dpo: false,
                fua: false,
                protect: 0
            })
        );
    }

    #[test]
    fn short_cdb_and_unknown_opcode() {
        assert_eq!(Command::parse(&[op::READ_10, 0, 0]).unwrap_err().asc, Asc::INVALID_FIELD_IN_CDB);
        let e = Command::parse(&[0xc0; 16]).unwrap_err();
        assert_eq!((e.key, e.asc), (key::ILLEGAL_REQUEST, Asc::INVALID_OPCODE));
        assert_eq!(Command::parse(&[]).unwrap_err().asc, Asc::INVALID_OPCODE);
        // Unknown service action: invalid field pointing at byte 1.
        let e = Command::parse(&[op::SERVICE_ACTION_IN_16, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap_err();
        assert_eq!(e.field.unwrap().byte, 1);
    }

    #[test]
    fn naca_is_refused() {
        let e = Command::parse(&[op::TEST_UNIT_READY, 0, 0, 0, 0, 0x04]).unwrap_err();
        assert_eq!(e.asc, Asc::INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn supported_table_matches_parser() {
        for info in SUPPORTED {
            let len = cdb_len(info.opcode).unwrap();
            assert_eq!(info.usage.len(), len, "opcode {:#x}", info.opcode);
            assert_eq!(info.usage[0], info.opcode);
            let mut cdb = vec![0u8; len];
            cdb[0] = info.opcode;
            if let Some(sa) = info.action {
                cdb[1] = sa as u8;
            }
            assert!(Command::parse(&cdb).is_ok(), "opcode {:#x} not parsed", info.opcode);
        }
        assert!(SUPPORTED.windows(2).all(|w| (w[0].opcode, w[0].action) < (w[1].opcode, w[1].action)));
    }

    fn width() -> impl Strategy<Value = Width> {
        prop_oneof![Just(Width::W10), Just(Width::W12), Just(Width::W16)]
    }

    /// LBA and block count that fit the CDB width.
    fn lba_blocks(w: Width) -> (u64, u32) {
        match w {
            Width::W6 => (0x1f_ffff, 256),
            Width::W10 => (u64::from(u32::MAX), u32::from(u16::MAX)),
            Width::W12 => (u64::from(u32::MAX), u32::MAX),
            Width::W16 => (u64::MAX, u32::MAX),
        }
    }

    fn rw() -> impl Strategy<Value = Rw> {
        prop_oneof![
            (0u64..=0x1f_ffff, 1u32..=256).prop_map(|(lba, blocks)| Rw {
                width: Width::W6,
                lba,
                blocks,
                dpo: false,
                fua: false,
                protect: 0
            }),
            (width(), any::<u64>(), any::<u32>(), any::<bool>(), any::<bool>(), 0u8..8).prop_map(
                |(width, lba, blocks, dpo, fua, protect)| {
                    let (ml, mb) = lba_blocks(width);
                    Rw { width, lba: lba.min(ml), blocks: blocks.min(mb), dpo, fua, protect }
                }
            ),
        ]
    }

    fn sync_width() -> impl Strategy<Value = Width> {
        prop_oneof![Just(Width::W10), Just(Width::W16)]
    }

    fn command() -> impl Strategy<Value = Command> {
        let w610 = prop_oneof![Just(Width::W6), Just(Width::W10)];
        prop_oneof![
            Just(Command::TestUnitReady),
            (any::<bool>(), any::<u8>()).prop_map(|(desc, alloc)| Command::RequestSense { desc, alloc }),
            (any::<bool>(), any::<u8>(), any::<u16>()).prop_map(|(evpd, page, alloc)| Command::Inquiry {
                evpd,
                page,
                alloc
            }),
            (any::<u8>(), any::<u32>()).prop_map(|(select, alloc)| Command::ReportLuns { select, alloc }),
            (w610.clone(), any::<bool>(), any::<bool>(), 0u8..4, 0u8..64, any::<u8>(), any::<u16>())
                .prop_map(|(width, dbd, llbaa, pc, page, subpage, alloc)| Command::ModeSense {
                    width,
                    dbd,
                    llbaa: llbaa && width == Width::W10,
                    pc,
                    page,
                    subpage,
                    alloc: if width == Width::W6 { alloc & 0xff } else { alloc },
                }),
            (w610.clone(), any::<bool>(), any::<bool>(), any::<u16>()).prop_map(|(width, pf, sp, len)| {
                Command::ModeSelect { width, pf, sp, len: if width == Width::W6 { len & 0xff } else { len } }
            }),
            (any::<bool>(), 0u8..16, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
                |(immed, power_condition, no_flush, loej, start)| Command::StartStopUnit {
                    immed,
                    power_condition,
                    no_flush,
                    loej,
                    start
                }
            ),
            (0u8..4).prop_map(|prevent| Command::PreventAllow { prevent }),
            w610.clone().prop_map(|width| Command::Reserve { width }),
            w610.prop_map(|width| Command::Release { width }),
            (any::<u32>(), any::<bool>()).prop_map(|(lba, pmi)| Command::ReadCapacity10 { lba, pmi }),
            any::<u32>().prop_map(|alloc| Command::ReadCapacity16 { alloc }),
            (any::<u64>(), any::<u32>()).prop_map(|(lba, alloc)| Command::GetLbaStatus { lba, alloc }),
            rw().prop_map(Command::Read),
            rw().prop_map(Command::Write),
            (rw(), any::<bool>()).prop_filter_map("no 6-byte WRITE AND VERIFY", |(mut rw, bytchk)| {
                rw.fua = false;
                (rw.width != Width::W6).then_some(Command::WriteVerify { rw, bytchk })
            }),
            (rw(), 0u8..4).prop_filter_map("no 6-byte VERIFY", |(rw, bytchk)| {
                (rw.width != Width::W6).then_some(Command::Verify {
                    width: rw.width,
                    lba: rw.lba,
                    blocks: rw.blocks,
                    dpo: rw.dpo,
                    protect: rw.protect,
                    bytchk,
                })
            }),
            (sync_width(), any::<u64>(), any::<u32>(), any::<bool>()).prop_map(
                |(width, lba, blocks, immed)| {
                    let (ml, mb) = lba_blocks(width);
                    Command::SyncCache { width, lba: lba.min(ml), blocks: blocks.min(mb), immed }
                }
            ),
            (sync_width(), any::<u64>(), any::<u32>(), any::<bool>()).prop_map(
                |(width, lba, blocks, immed)| {
                    let (ml, mb) = lba_blocks(width);
                    Command::PreFetch { width, lba: lba.min(ml), blocks: blocks.min(mb), immed }
                }
            ),
            (sync_width(), any::<u64>(), any::<u32>(), any::<bool>(), any::<bool>(), any::<bool>(), 0u8..8)
                .prop_map(|(width, lba, blocks, unmap, anchor, ndob, protect)| {
                    let (ml, mb) = lba_blocks(width);
                    Command::WriteSame {
                        width,
                        lba: lba.min(ml),
                        blocks: blocks.min(mb),
                        unmap,
                        anchor,
                        ndob: ndob && width == Width::W16,
                        protect,
                    }
                }),
            (any::<bool>(), any::<u16>()).prop_map(|(anchor, len)| Command::Unmap { anchor, len }),
            (any::<u64>(), any::<u8>(), any::<bool>(), any::<bool>(), 0u8..8).prop_map(
                |(lba, blocks, dpo, fua, protect)| Command::CompareAndWrite {
                    lba,
                    blocks,
                    dpo,
                    fua,
                    protect
                }
            ),
            (0u8..32, any::<u16>())
                .prop_map(|(action, alloc)| Command::PersistentReserveIn { action, alloc }),
            (0u8..32, 0u8..16, 0u8..16, any::<u32>()).prop_map(|(action, scope, kind, len)| {
                Command::PersistentReserveOut { action, scope, kind, len }
            }),
            (any::<bool>(), 0u8..8, any::<u8>(), any::<u16>(), any::<u32>()).prop_map(
                |(rctd, options, opcode, action, alloc)| Command::ReportSupportedOpcodes {
                    rctd,
                    options,
                    opcode,
                    action,
                    alloc
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn cdb_round_trip(cmd in command()) {
            let bytes = cmd.encode();
            prop_assert_eq!(Some(bytes.len()), cdb_len(bytes[0]));
            prop_assert_eq!(Command::parse(&bytes).unwrap(), cmd);
            // Trailing bytes (iSCSI always carries 16) change nothing.
            let mut padded = bytes.clone();
            padded.resize(32, 0xee);
            prop_assert_eq!(Command::parse(&padded).unwrap(), cmd);
        }

        #[test]
        fn random_cdbs_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = Command::parse(&bytes);
        }

        #[test]
        fn random_cdbs_with_known_opcodes_never_panic(
            opcode in proptest::sample::select(SUPPORTED.iter().map(|i| i.opcode).collect::<Vec<_>>()),
            rest in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let mut bytes = vec![opcode];
            bytes.extend(rest);
            if let Ok(cmd) = Command::parse(&bytes) {
                // Whatever parses re-encodes to something that parses the same.
                prop_assert_eq!(Command::parse(&cmd.encode()).unwrap(), cmd);
            }
        }
    }
}
