//! iSCSI PDUs (RFC 7143 section 11) as a pure codec: the 48-byte basic
//! header segment (BHS), additional header segments, data segments with
//! padding, and the optional CRC32C header and data digests. No sockets.
//!
//! Both directions are implemented (initiator and target PDUs are parsed
//! and encoded), so the target, its tests, the test client and the fuzz
//! target share one definition of the format. Parsers take untrusted bytes
//! and never panic; lengths are bounded by the caller's limit before any
//! allocation.

use bytes::Bytes;

/// Length of the basic header segment.
pub const BHS_LEN: usize = 48;
/// Reserved tag value ("no task" / "no transfer").
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// Largest data segment any PDU can declare (24-bit length).
pub const MAX_DATA_SEGMENT: u32 = (1 << 24) - 1;

/// Opcodes (low six bits of byte 0).
pub mod opcode {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT_REQUEST: u8 = 0x02;
    pub const LOGIN_REQUEST: u8 = 0x03;
    pub const TEXT_REQUEST: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQUEST: u8 = 0x06;
    pub const SNACK_REQUEST: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MESSAGE: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 11.17.1).
pub mod reject {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// Task management functions and responses (RFC 7143 11.5, 11.6).
pub mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;

    pub const FUNCTION_COMPLETE: u8 = 0;
    pub const TASK_DOES_NOT_EXIST: u8 = 1;
    pub const LUN_DOES_NOT_EXIST: u8 = 2;
    pub const TASK_STILL_ALLEGIANT: u8 = 3;
    pub const REASSIGNMENT_NOT_SUPPORTED: u8 = 4;
    pub const NOT_SUPPORTED: u8 = 5;
    pub const AUTHORIZATION_FAILED: u8 = 6;
    pub const REJECTED: u8 = 255;
}

/// Why bytes are not a valid PDU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    DataTooLong { len: u32, max: u32 },
    #[error("header digest mismatch")]
    HeaderDigest,
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// Which digests a connection negotiated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// Reads a big-endian integer from the header.
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// The framing fields of a BHS: enough to know how many bytes follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub opcode: u8,
    pub immediate: bool,
    /// Bytes of additional header segments.
    pub ahs_len: usize,
    /// Bytes of the data segment (without padding).
    pub data_len: u32,
}

/// Whether `bhs` is a SCSI command that writes and whose data segment is
/// all of its data (immediate data with nothing to follow). Kernel
/// initiators send writes up to their first burst (256 KiB by default) so.
pub fn is_whole_write(bhs: &[u8; BHS_LEN]) -> bool {
    let frame = Frame::parse(bhs);
    frame.opcode == opcode::SCSI_COMMAND && bhs[1] & 0x20 != 0 && frame.data_len == be32(bhs, 20)
}

impl Frame {
    pub fn parse(bhs: &[u8; BHS_LEN]) -> Frame {
        Frame {
            opcode: bhs[0] & 0x3f,
            immediate: bhs[0] & 0x40 != 0,
            ahs_len: usize::from(bhs[4]) * 4,
            data_len: be32(bhs, 4) & 0x00ff_ffff,
        }
    }

    /// Bytes following the BHS: AHS, header digest, padded data, data digest.
    pub fn rest_len(&self, digests: Digests) -> usize {
        let data = self.data_len as usize;
        let mut n = self.ahs_len + data.next_multiple_of(4);
        if digests.header {
            n += 4;
        }
        if digests.data && data > 0 {
            n += 4;
        }
        n
    }
}

/// CRC32C as iSCSI carries it (little-endian on the wire, RFC 7143 13.1).
pub fn crc32c(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |crc, p| crc32c::crc32c_append(crc, p))
}

const PAD: [u8; 3] = [0; 3];

fn pad_len(len: usize) -> usize {
    len.next_multiple_of(4) - len
}

/// NOP-Out (initiator ping or reply to a target ping).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: Bytes,
}

/// SCSI Command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    /// F: no unsolicited Data-Out PDUs follow.
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    pub attr: u8,
    pub lun: u64,
    pub itt: u32,
    pub edtl: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    /// The CDB: 16 bytes from the BHS plus any extended-CDB AHS.
    pub cdb: Vec<u8>,
    /// Expected bidirectional read length (AHS type 2), if present.
    pub bidi_read_len: Option<u32>,
    /// Immediate data.
    pub data: Bytes,
}

/// Task Management Function Request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    pub function: u8,
    pub lun: u64,
    pub itt: u32,
    pub ref_itt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

/// Login Request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: Bytes,
}

/// Text Request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: Bytes,
}

/// SCSI Data-Out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub offset: u32,
    pub data: Bytes,
}

/// Logout Request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SNACK Request (refused at error recovery level 0, but parsed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnackRequest {
    pub kind: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

/// NOP-In.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NopIn {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data: Bytes,
}

/// Residual flags of a SCSI Response or final Data-In.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Residual {
    pub overflow: bool,
    pub underflow: bool,
    pub count: u32,
}

impl Residual {
    /// Residual of a transfer of `actual` bytes against `expected`.
    pub fn of(expected: u64, actual: u64) -> Residual {
        let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        if actual > expected {
            Residual { overflow: true, underflow: false, count: clamp(actual - expected) }
        } else if actual < expected {
            Residual { overflow: false, underflow: true, count: clamp(expected - actual) }
        } else {
            Residual::default()
        }
    }
}

/// SCSI Response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiResponse {
    pub bidi_overflow: bool,
    pub bidi_underflow: bool,
    pub residual: Residual,
    /// 0: command completed at target; 1: target failure.
    pub response: u8,
    pub status: u8,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    pub bidi_residual: u32,
    /// Sense data with its two-byte length prefix, or response data.
    pub data: Bytes,
}

/// Task Management Function Response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Login Response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status_class: u8,
    pub status_detail: u8,
    pub data: Bytes,
}

/// Text Response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextResponse {
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data: Bytes,
}

/// SCSI Data-In.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataIn {
    pub final_: bool,
    pub ack: bool,
    pub residual: Residual,
    /// Status carried in this PDU (the S bit), if any.
    pub status: Option<u8>,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub offset: u32,
    pub data: Bytes,
}

/// Logout Response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogoutResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

/// Ready To Transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct R2t {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub offset: u32,
    pub desired_len: u32,
}

/// Asynchronous Message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsyncMessage {
    pub lun: u64,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub event: u8,
    pub vcode: u8,
    pub parameters: [u16; 3],
    pub data: Bytes,
}

/// Reject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    pub reason: u8,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    /// The header of the rejected PDU.
    pub data: Bytes,
}

/// Any PDU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pdu {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    SnackRequest(SnackRequest),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

/// Which of the status-sequence fields a target PDU carries, for the
/// connection's writer to fill in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatKind {
    /// Carries a StatSN and consumes it.
    Advance,
    /// Carries the next StatSN without consuming it (R2T, unsolicited NOP-In).
    Peek,
    /// Carries no StatSN (Data-In without status); still carries
    /// ExpCmdSN/MaxCmdSN.
    None,
}

impl Pdu {
    pub fn opcode(&self) -> u8 {
        use opcode::*;
        match self {
            Pdu::NopOut(_) => NOP_OUT,
            Pdu::ScsiCommand(_) => SCSI_COMMAND,
            Pdu::TaskMgmtRequest(_) => TASK_MGMT_REQUEST,
            Pdu::LoginRequest(_) => LOGIN_REQUEST,
            Pdu::TextRequest(_) => TEXT_REQUEST,
            Pdu::DataOut(_) => DATA_OUT,
            Pdu::LogoutRequest(_) => LOGOUT_REQUEST,
            Pdu::SnackRequest(_) => SNACK_REQUEST,
            Pdu::NopIn(_) => NOP_IN,
            Pdu::ScsiResponse(_) => SCSI_RESPONSE,
            Pdu::TaskMgmtResponse(_) => TASK_MGMT_RESPONSE,
            Pdu::LoginResponse(_) => LOGIN_RESPONSE,
            Pdu::TextResponse(_) => TEXT_RESPONSE,
            Pdu::DataIn(_) => DATA_IN,
            Pdu::LogoutResponse(_) => LOGOUT_RESPONSE,
            Pdu::R2t(_) => R2T,
            Pdu::AsyncMessage(_) => ASYNC_MESSAGE,
            Pdu::Reject(_) => REJECT,
        }
    }

    /// The data segment.
    pub fn data(&self) -> &Bytes {
        static EMPTY: Bytes = Bytes::new();
        match self {
            Pdu::NopOut(p) => &p.data,
            Pdu::ScsiCommand(p) => &p.data,
            Pdu::LoginRequest(p) => &p.data,
            Pdu::TextRequest(p) => &p.data,
            Pdu::DataOut(p) => &p.data,
            Pdu::NopIn(p) => &p.data,
            Pdu::ScsiResponse(p) => &p.data,
            Pdu::LoginResponse(p) => &p.data,
            Pdu::TextResponse(p) => &p.data,
            Pdu::DataIn(p) => &p.data,
            Pdu::AsyncMessage(p) => &p.data,
            Pdu::Reject(p) => &p.data,
            Pdu::TaskMgmtRequest(_)
            | Pdu::LogoutRequest(_)
            | Pdu::SnackRequest(_)
            | Pdu::TaskMgmtResponse(_)
            | Pdu::LogoutResponse(_)
            | Pdu::R2t(_) => &EMPTY,
        }
    }

    /// Parses a PDU from its BHS, AHS bytes and data segment (without
    /// padding or digests).
    pub fn parse(b: &[u8; BHS_LEN], ahs: &[u8], data: Bytes) -> Result<Pdu, PduError> {
        use opcode::*;
        let frame = Frame::parse(b);
        if frame.ahs_len != ahs.len() || frame.data_len as usize != data.len() {
            return Err(PduError::Invalid("segment lengths"));
        }
        let immediate = frame.immediate;
        let f = b[1] & 0x80 != 0;
        let lun = be64(b, 8);
        let itt = be32(b, 16);
        let no_data =
            |data: &Bytes, what| if data.is_empty() { Ok(()) } else { Err(PduError::Invalid(what)) };
        let pdu = match frame.opcode {
            NOP_OUT => Pdu::NopOut(NopOut {
                immediate,
                lun,
                itt,
                ttt: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
                data,
            }),
            SCSI_COMMAND => {
                let mut cdb = b[32..48].to_vec();
                let mut bidi_read_len = None;
                let mut rest = ahs;
                while !rest.is_empty() {
                    if rest.len() < 3 {
                        return Err(PduError::Invalid("AHS"));
                    }
                    let len = usize::from(be16(rest, 0));
                    let kind = rest[2];
                    let total = (3 + len).next_multiple_of(4);
                    if total > rest.len() {
                        return Err(PduError::Invalid("AHS length"));
                    }
                    match kind {
                        // Extended CDB: a reserved byte, then CDB bytes 16..
                        1 if len >= 1 => cdb.extend_from_slice(&rest[4..3 + len]),
                        2 if len == 5 => bidi_read_len = Some(be32(rest, 4)),
                        _ => return Err(PduError::Invalid("AHS type")),
                    }
                    rest = &rest[total..];
                }
                Pdu::ScsiCommand(ScsiCommand {
                    immediate,
                    final_: f,
                    read: b[1] & 0x40 != 0,
                    write: b[1] & 0x20 != 0,
                    attr: b[1] & 0x07,
                    lun,
                    itt,
                    edtl: be32(b, 20),
                    cmd_sn: be32(b, 24),
                    exp_stat_sn: be32(b, 28),
                    cdb,
                    bidi_read_len,
                    data,
                })
            }
            TASK_MGMT_REQUEST => {
                no_data(&data, "TMF data")?;
                Pdu::TaskMgmtRequest(TaskMgmtRequest {
                    immediate,
                    function: b[1] & 0x7f,
                    lun,
                    itt,
                    ref_itt: be32(b, 20),
                    cmd_sn: be32(b, 24),
                    exp_stat_sn: be32(b, 28),
                    ref_cmd_sn: be32(b, 32),
                    exp_data_sn: be32(b, 36),
                })
            }
            LOGIN_REQUEST => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                Pdu::LoginRequest(LoginRequest {
                    transit: f,
                    cont: b[1] & 0x40 != 0,
                    csg: (b[1] >> 2) & 0x03,
                    nsg: b[1] & 0x03,
                    version_max: b[2],
                    version_min: b[3],
                    isid,
                    tsih: be16(b, 14),
                    itt,
                    cid: be16(b, 20),
                    cmd_sn: be32(b, 24),
                    exp_stat_sn: be32(b, 28),
                    data,
                })
            }
            TEXT_REQUEST => Pdu::TextRequest(TextRequest {
                immediate,
                final_: f,
                cont: b[1] & 0x40 != 0,
                lun,
                itt,
                ttt: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
                data,
            }),
            DATA_OUT => Pdu::DataOut(DataOut {
                final_: f,
                lun,
                itt,
                ttt: be32(b, 20),
                exp_stat_sn: be32(b, 28),
                data_sn: be32(b, 36),
                offset: be32(b, 40),
                data,
            }),
            LOGOUT_REQUEST => {
                no_data(&data, "logout data")?;
                Pdu::LogoutRequest(LogoutRequest {
                    immediate,
                    reason: b[1] & 0x7f,
                    itt,
                    cid: be16(b, 20),
                    cmd_sn: be32(b, 24),
                    exp_stat_sn: be32(b, 28),
                })
            }
            SNACK_REQUEST => {
                no_data(&data, "SNACK data")?;
                Pdu::SnackRequest(SnackRequest {
                    kind: b[1] & 0x0f,
                    lun,
                    itt,
                    ttt: be32(b, 20),
                    exp_stat_sn: be32(b, 28),
                    beg_run: be32(b, 40),
                    run_length: be32(b, 44),
                })
            }
            NOP_IN => Pdu::NopIn(NopIn {
                lun,
                itt,
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                data,
            }),
            SCSI_RESPONSE => Pdu::ScsiResponse(ScsiResponse {
                bidi_overflow: b[1] & 0x10 != 0,
                bidi_underflow: b[1] & 0x08 != 0,
                residual: Residual {
                    overflow: b[1] & 0x04 != 0,
                    underflow: b[1] & 0x02 != 0,
                    count: be32(b, 44),
                },
                response: b[2],
                status: b[3],
                itt,
                snack_tag: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                exp_data_sn: be32(b, 36),
                bidi_residual: be32(b, 40),
                data,
            }),
            TASK_MGMT_RESPONSE => {
                no_data(&data, "TMF response data")?;
                Pdu::TaskMgmtResponse(TaskMgmtResponse {
                    response: b[2],
                    itt,
                    stat_sn: be32(b, 24),
                    exp_cmd_sn: be32(b, 28),
                    max_cmd_sn: be32(b, 32),
                })
            }
            LOGIN_RESPONSE => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                Pdu::LoginResponse(LoginResponse {
                    transit: f,
                    cont: b[1] & 0x40 != 0,
                    csg: (b[1] >> 2) & 0x03,
                    nsg: b[1] & 0x03,
                    version_max: b[2],
                    version_active: b[3],
                    isid,
                    tsih: be16(b, 14),
                    itt,
                    stat_sn: be32(b, 24),
                    exp_cmd_sn: be32(b, 28),
                    max_cmd_sn: be32(b, 32),
                    status_class: b[36],
                    status_detail: b[37],
                    data,
                })
            }
            TEXT_RESPONSE => Pdu::TextResponse(TextResponse {
                final_: f,
                cont: b[1] & 0x40 != 0,
                lun,
                itt,
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                data,
            }),
            DATA_IN => {
                let s = b[1] & 0x01 != 0;
                Pdu::DataIn(DataIn {
                    final_: f,
                    ack: b[1] & 0x40 != 0,
                    residual: Residual {
                        overflow: b[1] & 0x04 != 0,
                        underflow: b[1] & 0x02 != 0,
                        count: be32(b, 44),
                    },
                    status: s.then_some(b[3]),
                    lun,
                    itt,
                    ttt: be32(b, 20),
                    stat_sn: be32(b, 24),
                    exp_cmd_sn: be32(b, 28),
                    max_cmd_sn: be32(b, 32),
                    data_sn: be32(b, 36),
                    offset: be32(b, 40),
                    data,
                })
            }
            LOGOUT_RESPONSE => {
                no_data(&data, "logout response data")?;
                Pdu::LogoutResponse(LogoutResponse {
                    response: b[2],
                    itt,
                    stat_sn: be32(b, 24),
                    exp_cmd_sn: be32(b, 28),
                    max_cmd_sn: be32(b, 32),
                    time2wait: be16(b, 40),
                    time2retain: be16(b, 42),
                })
            }
            R2T => {
                no_data(&data, "R2T data")?;
                Pdu::R2t(R2t {
                    lun,
                    itt,
                    ttt: be32(b, 20),
                    stat_sn: be32(b, 24),
                    exp_cmd_sn: be32(b, 28),
                    max_cmd_sn: be32(b, 32),
                    r2t_sn: be32(b, 36),
                    offset: be32(b, 40),
                    desired_len: be32(b, 44),
                })
            }
            ASYNC_MESSAGE => Pdu::AsyncMessage(AsyncMessage {
                lun,
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                event: b[36],
                vcode: b[37],
                parameters: [be16(b, 38), be16(b, 40), be16(b, 42)],
                data,
            }),
            REJECT => Pdu::Reject(Reject {
                reason: b[2],
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                data_sn: be32(b, 36),
                data,
            }),
            other => return Err(PduError::UnknownOpcode(other)),
        };
        Ok(pdu)
    }

    /// Encodes the BHS and AHS (the data segment is [`Pdu::data`]).
    pub fn encode_header(&self) -> ([u8; BHS_LEN], Vec<u8>) {
        let mut b = [0u8; BHS_LEN];
        let mut ahs = Vec::new();
        b[0] = self.opcode();
        let flag = |on: bool, bit: u8| if on { bit } else { 0 };
        match self {
            Pdu::NopOut(p) => {
                b[0] |= flag(p.immediate, 0x40);
                b[1] = 0x80;
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
            }
            Pdu::ScsiCommand(p) => {
                b[0] |= flag(p.immediate, 0x40);
                b[1] = flag(p.final_, 0x80) | flag(p.read, 0x40) | flag(p.write, 0x20) | (p.attr & 0x07);
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.edtl);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
                let n = p.cdb.len().min(16);
                b[32..32 + n].copy_from_slice(&p.cdb[..n]);
                if p.cdb.len() > 16 {
                    let ext = &p.cdb[16..];
                    ahs.extend_from_slice(&((ext.len() + 1) as u16).to_be_bytes());
                    ahs.push(1);
                    ahs.push(0);
                    ahs.extend_from_slice(ext);
                    ahs.resize(ahs.len().next_multiple_of(4), 0);
                }
                if let Some(len) = p.bidi_read_len {
                    ahs.extend_from_slice(&[0, 5, 2, 0]);
                    ahs.extend_from_slice(&len.to_be_bytes());
                }
            }
            Pdu::TaskMgmtRequest(p) => {
                b[0] |= flag(p.immediate, 0x40);
                b[1] = 0x80 | (p.function & 0x7f);
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ref_itt);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
                put32(&mut b, 32, p.ref_cmd_sn);
                put32(&mut b, 36, p.exp_data_sn);
            }
            Pdu::LoginRequest(p) => {
                b[0] |= 0x40;
                b[1] = flag(p.transit, 0x80) | flag(p.cont, 0x40) | ((p.csg & 3) << 2) | (p.nsg & 3);
                b[2] = p.version_max;
                b[3] = p.version_min;
                b[8..14].copy_from_slice(&p.isid);
                put16(&mut b, 14, p.tsih);
                put32(&mut b, 16, p.itt);
                put16(&mut b, 20, p.cid);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
            }
            Pdu::TextRequest(p) => {
                b[0] |= flag(p.immediate, 0x40);
                b[1] = flag(p.final_, 0x80) | flag(p.cont, 0x40);
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
            }
            Pdu::DataOut(p) => {
                b[1] = flag(p.final_, 0x80);
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 28, p.exp_stat_sn);
                put32(&mut b, 36, p.data_sn);
                put32(&mut b, 40, p.offset);
            }
            Pdu::LogoutRequest(p) => {
                b[0] |= flag(p.immediate, 0x40);
                b[1] = 0x80 | (p.reason & 0x7f);
                put32(&mut b, 16, p.itt);
                put16(&mut b, 20, p.cid);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
            }
            Pdu::SnackRequest(p) => {
                b[1] = 0x80 | (p.kind & 0x0f);
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 28, p.exp_stat_sn);
                put32(&mut b, 40, p.beg_run);
                put32(&mut b, 44, p.run_length);
            }
            Pdu::NopIn(p) => {
                b[1] = 0x80;
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
            }
            Pdu::ScsiResponse(p) => {
                b[1] = 0x80
                    | flag(p.bidi_overflow, 0x10)
                    | flag(p.bidi_underflow, 0x08)
                    | flag(p.residual.overflow, 0x04)
                    | flag(p.residual.underflow, 0x02);
                b[2] = p.response;
                b[3] = p.status;
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.snack_tag);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                put32(&mut b, 36, p.exp_data_sn);
                put32(&mut b, 40, p.bidi_residual);
                put32(&mut b, 44, p.residual.count);
            }
            Pdu::TaskMgmtResponse(p) => {
                b[1] = 0x80;
                b[2] = p.response;
                put32(&mut b, 16, p.itt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
            }
            Pdu::LoginResponse(p) => {
                b[1] = flag(p.transit, 0x80) | flag(p.cont, 0x40) | ((p.csg & 3) << 2) | (p.nsg & 3);
                b[2] = p.version_max;
                b[3] = p.version_active;
                b[8..14].copy_from_slice(&p.isid);
                put16(&mut b, 14, p.tsih);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                b[36] = p.status_class;
                b[37] = p.status_detail;
            }
            Pdu::TextResponse(p) => {
                b[1] = flag(p.final_, 0x80) | flag(p.cont, 0x40);
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
            }
            Pdu::DataIn(p) => {
                b[1] = flag(p.final_, 0x80)
                    | flag(p.ack, 0x40)
                    | flag(p.residual.overflow, 0x04)
                    | flag(p.residual.underflow, 0x02)
                    | flag(p.status.is_some(), 0x01);
                b[3] = p.status.unwrap_or(0);
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                put32(&mut b, 36, p.data_sn);
                put32(&mut b, 40, p.offset);
                put32(&mut b, 44, p.residual.count);
            }
            Pdu::LogoutResponse(p) => {
                b[1] = 0x80;
                b[2] = p.response;
                put32(&mut b, 16, p.itt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                put16(&mut b, 40, p.time2wait);
                put16(&mut b, 42, p.time2retain);
            }
            Pdu::R2t(p) => {
                b[1] = 0x80;
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                put32(&mut b, 36, p.r2t_sn);
                put32(&mut b, 40, p.offset);
                put32(&mut b, 44, p.desired_len);
            }
            Pdu::AsyncMessage(p) => {
                b[1] = 0x80;
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, RESERVED_TAG);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                b[36] = p.event;
                b[37] = p.vcode;
                put16(&mut b, 38, p.parameters[0]);
                put16(&mut b, 40, p.parameters[1]);
                put16(&mut b, 42, p.parameters[2]);
            }
            Pdu::Reject(p) => {
                b[1] = 0x80;
                b[2] = p.reason;
                put32(&mut b, 16, RESERVED_TAG);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                put32(&mut b, 36, p.data_sn);
            }
        }
        b[4] = (ahs.len() / 4) as u8;
        let dsl = (self.data().len() as u32).min(MAX_DATA_SEGMENT);
        b[5..8].copy_from_slice(&dsl.to_be_bytes()[1..]);
        (b, ahs)
    }

    /// Encodes the whole PDU: header, AHS, digests, padded data.
    pub fn encode(&self, digests: Digests) -> Vec<u8> {
        let (bhs, ahs) = self.encode_header();
        let data = self.data();
        let mut out = Vec::with_capacity(BHS_LEN + ahs.len() + data.len() + 12);
        out.extend_from_slice(&bhs);
        out.extend_from_slice(&ahs);
        if digests.header {
            out.extend_from_slice(&crc32c(&[&bhs, &ahs]).to_le_bytes());
        }
        if !data.is_empty() {
            out.extend_from_slice(data);
            let pad = &PAD[..pad_len(data.len())];
            out.extend_from_slice(pad);
            if digests.data {
                out.extend_from_slice(&crc32c(&[data, pad]).to_le_bytes());
            }
        }
        out
    }
}

/// Outcome of decoding bytes that may hold a complete PDU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// At least this many bytes in total are needed.
    Incomplete(usize),
    /// A PDU and the bytes it occupied. `data_digest_ok` is false when the
    /// data digest did not match (the PDU must then be rejected).
    Complete { pdu: Pdu, len: usize, data_digest_ok: bool },
}

/// Decodes one PDU from the start of `buf`. `max_data` bounds the data
/// segment (checked before anything is allocated). Never panics.
pub fn decode(buf: &[u8], digests: Digests, max_data: u32) -> Result<Decoded, PduError> {
    let Some(bhs) = buf.get(..BHS_LEN) else { return Ok(Decoded::Incomplete(BHS_LEN)) };
    let mut header = [0u8; BHS_LEN];
    header.copy_from_slice(bhs);
    let frame = Frame::parse(&header);
    if frame.data_len > max_data {
        return Err(PduError::DataTooLong { len: frame.data_len, max: max_data });
    }
    let total = BHS_LEN + frame.rest_len(digests);
    if buf.len() < total {
        return Ok(Decoded::Incomplete(total));
    }
    let mut pos = BHS_LEN;
    let ahs = &buf[pos..pos + frame.ahs_len];
    pos += frame.ahs_len;
    if digests.header {
        let got = u32::from_le_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]);
        if got != crc32c(&[&header, ahs]) {
            return Err(PduError::HeaderDigest);
        }
        pos += 4;
    }
    let len = frame.data_len as usize;
    let padded = len.next_multiple_of(4);
    let data = &buf[pos..pos + len];
    let mut data_digest_ok = true;
    if len > 0 && digests.data {
        let d = pos + padded;
        let got = u32::from_le_bytes([buf[d], buf[d + 1], buf[d + 2], buf[d + 3]]);
        data_digest_ok = got == crc32c(&[&buf[pos..pos + padded]]);
    }
    let pdu = Pdu::parse(&header, ahs, Bytes::copy_from_slice(data))?;
    Ok(Decoded::Complete { pdu, len: total, data_digest_ok })
}

/// Serial number arithmetic (RFC 1982) for 32-bit sequence numbers:
/// `a < b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

/// `a <= b` in serial number arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

#[cfg(test)]
mod tests;
