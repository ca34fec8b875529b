//! The NBD wire protocol as a pure codec: constants, parsers and encoders
//! for the fixed-newstyle handshake, option haggling and the transmission
//! phase (simple and structured replies). No sockets here.
//!
//! Both directions are implemented (server and client side of every
//! message) so that the server, its tests and a fuzz harness share one
//! definition of the format. Every parser takes untrusted bytes and returns
//! a [`ProtoError`]; none of them panics or allocates more than the input
//! it was given justifies.
//!
//! Reference: the NBD protocol document (`doc/proto.md` of the
//! NetworkBlockDevice/nbd project). All integers are big-endian.

use bytes::Bytes;
use zerocopy::byteorder::network_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

// ---------------------------------------------------------------------------
// Magic numbers.

/// `"NBDMAGIC"`, first word of the server greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`, second word of the greeting and magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------
// Handshake flags (server, 16 bits) and client flags (32 bits).

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------
// Options.

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
/// Withdrawn; answered as unsupported.
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Not implemented by this server; answered as unsupported.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------
// Option reply types.

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks an error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// ---------------------------------------------------------------------------
// Info types (NBD_OPT_INFO / NBD_OPT_GO).

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Transmission flags (16 bits, sent with the export size).

pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
pub const FLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------------------
// Commands and command flags.

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_RESIZE: u16 = 8;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------------------
// Structured replies.

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit 15 marks an error chunk.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context defined by the protocol (and served here).
pub const BASE_ALLOCATION: &str = "base:allocation";

// ---------------------------------------------------------------------------
// Error values (the protocol's fixed subset of errno).

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------
// Sizes.

/// Longest string (export name, query, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply, unless NO_ZEROES.
pub const EXPORT_NAME_PADDING: usize = 124;

/// Why bytes could not be decoded. Handshake parse errors of an option
/// payload are answered with `NBD_REP_ERR_INVALID`; everything else is fatal
/// for the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("{what}: expected {expected} bytes, got {actual}")]
    Length { what: &'static str, expected: usize, actual: usize },
    #[error("{what}: bad magic {magic:#x}")]
    BadMagic { what: &'static str, magic: u64 },
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("{0}: string is not valid UTF-8")]
    InvalidUtf8(&'static str),
    #[error("{what}: string of {len} bytes exceeds the {MAX_STRING_LEN}-byte limit")]
    StringTooLong { what: &'static str, len: usize },
    #[error("{what}: unexpected {len} bytes of payload")]
    UnexpectedPayload { what: &'static str, len: usize },
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("unknown {what} type {value}")]
    UnknownType { what: &'static str, value: u32 },
}

pub type Result<T, E = ProtoError> = std::result::Result<T, E>;

/// A bounds-checked cursor over untrusted bytes.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let Some((head, tail)) = self.buf.split_at_checked(n) else {
            return Err(ProtoError::Length { what: self.what, expected: n, actual: self.buf.len() });
        };
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn string(&mut self, len: usize) -> Result<String> {
        if len > MAX_STRING_LEN {
            return Err(ProtoError::StringTooLong { what: self.what, len });
        }
        let bytes = self.take(len)?;
        let s = std::str::from_utf8(bytes).map_err(|_| ProtoError::InvalidUtf8(self.what))?;
        Ok(s.to_owned())
    }

    /// A string prefixed by a 32-bit length.
    fn string32(&mut self) -> Result<String> {
        let len = self.u32()?;
        self.string(usize::try_from(len).unwrap_or(usize::MAX))
    }

    fn rest_string(&mut self) -> Result<String> {
        self.string(self.remaining())
    }

    fn finish(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::UnexpectedPayload { what: self.what, len: self.buf.len() })
        }
    }
}

fn exact_len(buf: &[u8], expected: usize, what: &'static str) -> Result<()> {
    if buf.len() == expected { Ok(()) } else { Err(ProtoError::Length { what, expected, actual: buf.len() }) }
}

/// Encoders write strings as given; callers keep them within
/// [`MAX_STRING_LEN`]. Lengths are computed with saturation so that an
/// oversized string produces a message the peer rejects, not a panic.
fn len32(n: usize) -> [u8; 4] {
    u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes()
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

// ---------------------------------------------------------------------------
// Handshake: greeting and client flags.

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawGreeting {
    nbd_magic: U64,
    opt_magic: U64,
    flags: U16,
}

/// The server's opening message of the newstyle handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerGreeting {
    pub handshake_flags: u16,
}

impl ServerGreeting {
    pub const LEN: usize = 18;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let raw = RawGreeting {
            nbd_magic: NBD_MAGIC.into(),
            opt_magic: IHAVEOPT.into(),
            flags: self.handshake_flags.into(),
        };
        let mut out = [0u8; Self::LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    pub fn parse(buf: &[u8]) -> Result<ServerGreeting> {
        let raw = RawGreeting::read_from_bytes(buf).map_err(|_| ProtoError::Length {
            what: "greeting",
            expected: Self::LEN,
            actual: buf.len(),
        })?;
        if raw.nbd_magic.get() != NBD_MAGIC {
            return Err(ProtoError::BadMagic { what: "greeting", magic: raw.nbd_magic.get() });
        }
        if raw.opt_magic.get() != IHAVEOPT {
            return Err(ProtoError::BadMagic { what: "greeting (oldstyle?)", magic: raw.opt_magic.get() });
        }
        Ok(ServerGreeting { handshake_flags: raw.flags.get() })
    }
}

/// The client's 32-bit flags after the greeting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

impl ClientFlags {
    pub const LEN: usize = 4;

    /// Unknown bits are an error: the server MUST drop such a client.
    pub fn parse(buf: &[u8]) -> Result<ClientFlags> {
        exact_len(buf, Self::LEN, "client flags")?;
        let mut r = Reader::new(buf, "client flags");
        let bits = r.u32()?;
        if bits & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(ProtoError::UnknownClientFlags(bits));
        }
        Ok(ClientFlags {
            fixed_newstyle: bits & FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: bits & FLAG_C_NO_ZEROES != 0,
        })
    }

    pub fn bits(&self) -> u32 {
        (if self.fixed_newstyle { FLAG_C_FIXED_NEWSTYLE } else { 0 })
            | (if self.no_zeroes { FLAG_C_NO_ZEROES } else { 0 })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        self.bits().to_be_bytes()
    }
}

// ---------------------------------------------------------------------------
// Options.

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawOptionHeader {
    magic: U64,
    option: U32,
    length: U32,
}

/// Header of a client option; `length` payload bytes follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    pub fn parse(buf: &[u8]) -> Result<OptionHeader> {
        let raw = RawOptionHeader::read_from_bytes(buf).map_err(|_| ProtoError::Length {
            what: "option header",
            expected: Self::LEN,
            actual: buf.len(),
        })?;
        if raw.magic.get() != IHAVEOPT {
            return Err(ProtoError::BadMagic { what: "option header", magic: raw.magic.get() });
        }
        Ok(OptionHeader { option: raw.option.get(), length: raw.length.get() })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let raw = RawOptionHeader {
            magic: IHAVEOPT.into(),
            option: self.option.into(),
            length: self.length.into(),
        };
        let mut out = [0u8; Self::LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InfoRequest {
    pub export: String,
    /// Requested `NBD_INFO_*` types, in the order sent.
    pub requests: Vec<u16>,
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// A decoded client option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    /// Any option this codec does not decode (the server answers
    /// `NBD_REP_ERR_UNSUP`).
    Other {
        option: u32,
        payload: Vec<u8>,
    },
}

impl NbdOption {
    /// Decodes the payload of option `option`.
    pub fn parse(option: u32, payload: &[u8]) -> Result<NbdOption> {
        match option {
            OPT_EXPORT_NAME => {
                let mut r = Reader::new(payload, "NBD_OPT_EXPORT_NAME");
                Ok(NbdOption::ExportName(r.rest_string()?))
            }
            // The spec requires an ACK to ABORT whatever else was sent, so
            // any payload is ignored rather than answered with an error.
            OPT_ABORT => Ok(NbdOption::Abort),
            OPT_LIST => empty(payload, "NBD_OPT_LIST").map(|()| NbdOption::List),
            OPT_STARTTLS => empty(payload, "NBD_OPT_STARTTLS").map(|()| NbdOption::StartTls),
            OPT_STRUCTURED_REPLY => {
                empty(payload, "NBD_OPT_STRUCTURED_REPLY").map(|()| NbdOption::StructuredReply)
            }
            OPT_INFO => parse_info_request(payload, "NBD_OPT_INFO").map(NbdOption::Info),
            OPT_GO => parse_info_request(payload, "NBD_OPT_GO").map(NbdOption::Go),
            OPT_LIST_META_CONTEXT => {
                parse_meta_request(payload, "NBD_OPT_LIST_META_CONTEXT").map(NbdOption::ListMetaContext)
            }
            OPT_SET_META_CONTEXT => {
                parse_meta_request(payload, "NBD_OPT_SET_META_CONTEXT").map(NbdOption::SetMetaContext)
            }
            _ => Ok(NbdOption::Other { option, payload: payload.to_vec() }),
        }
    }

    pub fn code(&self) -> u32 {
        match self {
            NbdOption::ExportName(_) => OPT_EXPORT_NAME,
            NbdOption::Abort => OPT_ABORT,
            NbdOption::List => OPT_LIST,
            NbdOption::StartTls => OPT_STARTTLS,
            NbdOption::Info(_) => OPT_INFO,
            NbdOption::Go(_) => OPT_GO,
            NbdOption::StructuredReply => OPT_STRUCTURED_REPLY,
            NbdOption::ListMetaContext(_) => OPT_LIST_META_CONTEXT,
            NbdOption::SetMetaContext(_) => OPT_SET_META_CONTEXT,
            NbdOption::Other { option, .. } => *option,
        }
    }

    /// The option payload (without header).
    pub fn encode_payload(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            NbdOption::ExportName(name) => out.extend_from_slice(name.as_bytes()),
            NbdOption::Abort | NbdOption::List | NbdOption::StartTls | NbdOption::StructuredReply => {}
            NbdOption::Info(req) | NbdOption::Go(req) => {
                out.extend_from_slice(&len32(req.export.len()));
                out.extend_from_slice(req.export.as_bytes());
                let n = u16::try_from(req.requests.len()).unwrap_or(u16::MAX);
                out.extend_from_slice(&n.to_be_bytes());
                for info in req.requests.iter().take(usize::from(n)) {
                    out.extend_from_slice(&info.to_be_bytes());
                }
            }
            NbdOption::ListMetaContext(req) | NbdOption::SetMetaContext(req) => {
                out.extend_from_slice(&len32(req.export.len()));
                out.extend_from_slice(req.export.as_bytes());
                out.extend_from_slice(&len32(req.queries.len()));
                for q in &req.queries {
                    out.extend_from_slice(&len32(q.len()));
                    out.extend_from_slice(q.as_bytes());
                }
            }
            NbdOption::Other { payload, .. } => out.extend_from_slice(payload),
        }
        out
    }

    /// Header and payload, as a client sends it.
    pub fn encode(&self) -> Vec<u8> {
        let payload = self.encode_payload();
        let header =
            OptionHeader { option: self.code(), length: u32::try_from(payload.len()).unwrap_or(u32::MAX) };
        let mut out = header.encode().to_vec();
        out.extend_from_slice(&payload);
        out
    }
}

fn empty(payload: &[u8], what: &'static str) -> Result<()> {
    if payload.is_empty() { Ok(()) } else { Err(ProtoError::UnexpectedPayload { what, len: payload.len() }) }
}

fn parse_info_request(payload: &[u8], what: &'static str) -> Result<InfoRequest> {
    let mut r = Reader::new(payload, what);
    let export = r.string32()?;
    let n = r.u16()?;
    // Never trust a count for an allocation: bound it by the bytes present.
    let mut requests = Vec::with_capacity(usize::from(n).min(r.remaining() / 2));
    for _ in 0..n {
        requests.push(r.u16()?);
    }
    r.finish()?;
    Ok(InfoRequest { export, requests })
}

fn parse_meta_request(payload: &[u8], what: &'static str) -> Result<MetaContextRequest> {
    let mut r = Reader::new(payload, what);
    let export = r.string32()?;
    let n = r.u32()?;
    let cap = usize::try_from(n).unwrap_or(usize::MAX).min(r.remaining() / 4);
    let mut queries = Vec::with_capacity(cap);
    for _ in 0..n {
        queries.push(r.string32()?);
    }
    r.finish()?;
    Ok(MetaContextRequest { export, queries })
}

// ---------------------------------------------------------------------------
// Option replies.

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawOptionReplyHeader {
    magic: U64,
    option: U32,
    reply_type: U32,
    length: U32,
}

/// Header of an option reply; `length` payload bytes follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub const LEN: usize = 20;

    pub fn parse(buf: &[u8]) -> Result<OptionReplyHeader> {
        let raw = RawOptionReplyHeader::read_from_bytes(buf).map_err(|_| ProtoError::Length {
            what: "option reply header",
            expected: Self::LEN,
            actual: buf.len(),
        })?;
        if raw.magic.get() != OPTION_REPLY_MAGIC {
            return Err(ProtoError::BadMagic { what: "option reply header", magic: raw.magic.get() });
        }
        Ok(OptionReplyHeader {
            option: raw.option.get(),
            reply_type: raw.reply_type.get(),
            length: raw.length.get(),
        })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let raw = RawOptionReplyHeader {
            magic: OPTION_REPLY_MAGIC.into(),
            option: self.option.into(),
            reply_type: self.reply_type.into(),
            length: self.length.into(),
        };
        let mut out = [0u8; Self::LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }
}

/// One `NBD_REP_INFO` item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InfoReply {
    Export {
        size: u64,
        transmission_flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    /// An info type this codec does not know (clients must ignore it).
    Unknown {
        info_type: u16,
        data: Vec<u8>,
    },
}

impl InfoReply {
    pub fn info_type(&self) -> u16 {
        match self {
            InfoReply::Export { .. } => INFO_EXPORT,
            InfoReply::Name(_) => INFO_NAME,
            InfoReply::Description(_) => INFO_DESCRIPTION,
            InfoReply::BlockSize { .. } => INFO_BLOCK_SIZE,
            InfoReply::Unknown { info_type, .. } => *info_type,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.info_type().to_be_bytes().to_vec();
        match self {
            InfoReply::Export { size, transmission_flags } => {
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&transmission_flags.to_be_bytes());
            }
            InfoReply::Name(s) | InfoReply::Description(s) => out.extend_from_slice(s.as_bytes()),
            InfoReply::BlockSize { minimum, preferred, maximum } => {
                out.extend_from_slice(&minimum.to_be_bytes());
                out.extend_from_slice(&preferred.to_be_bytes());
                out.extend_from_slice(&maximum.to_be_bytes());
            }
            InfoReply::Unknown { data, .. } => out.extend_from_slice(data),
        }
        out
    }

    pub fn parse(payload: &[u8]) -> Result<InfoReply> {
        let mut r = Reader::new(payload, "NBD_REP_INFO");
        let info_type = r.u16()?;
        let info = match info_type {
            INFO_EXPORT => InfoReply::Export { size: r.u64()?, transmission_flags: r.u16()? },
            INFO_NAME => InfoReply::Name(r.rest_string()?),
            INFO_DESCRIPTION => InfoReply::Description(r.rest_string()?),
            INFO_BLOCK_SIZE => {
                InfoReply::BlockSize { minimum: r.u32()?, preferred: r.u32()?, maximum: r.u32()? }
            }
            _ => {
                let data = r.take(r.remaining())?.to_vec();
                InfoReply::Unknown { info_type, data }
            }
        };
        r.finish()?;
        Ok(info)
    }
}

/// A decoded option reply (payload semantics by reply type).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionReply {
    Ack,
    /// `NBD_REP_SERVER`: an export name and optional human-readable details.
    Server {
        name: String,
        description: String,
    },
    Info(InfoReply),
    MetaContext {
        id: u32,
        name: String,
    },
    /// Any reply type with bit 31 set, with its optional message.
    Error {
        reply_type: u32,
        message: String,
    },
}

impl OptionReply {
    pub fn error(reply_type: u32, message: impl Into<String>) -> OptionReply {
        OptionReply::Error { reply_type: reply_type | REP_FLAG_ERROR, message: message.into() }
    }

    pub fn reply_type(&self) -> u32 {
        match self {
            OptionReply::Ack => REP_ACK,
            OptionReply::Server { .. } => REP_SERVER,
            OptionReply::Info(_) => REP_INFO,
            OptionReply::MetaContext { .. } => REP_META_CONTEXT,
            OptionReply::Error { reply_type, .. } => *reply_type | REP_FLAG_ERROR,
        }
    }

    pub fn encode_payload(&self) -> Vec<u8> {
        match self {
            OptionReply::Ack => Vec::new(),
            OptionReply::Server { name, description } => {
                let mut out = len32(name.len()).to_vec();
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(description.as_bytes());
                out
            }
            OptionReply::Info(info) => info.encode(),
            OptionReply::MetaContext { id, name } => {
                let mut out = id.to_be_bytes().to_vec();
                out.extend_from_slice(name.as_bytes());
                out
            }
            OptionReply::Error { message, .. } => truncate_str(message, MAX_STRING_LEN).as_bytes().to_vec(),
        }
    }

    /// Header and payload, as the server sends it in reply to `option`.
    pub fn encode(&self, option: u32) -> Vec<u8> {
        let payload = self.encode_payload();
        let header = OptionReplyHeader {
            option,
            reply_type: self.reply_type(),
            length: u32::try_from(payload.len()).unwrap_or(u32::MAX),
        };
        let mut out = header.encode().to_vec();
        out.extend_from_slice(&payload);
        out
    }

    pub fn parse(reply_type: u32, payload: &[u8]) -> Result<OptionReply> {
        let mut r = Reader::new(payload, "option reply");
        let reply = match reply_type {
            REP_ACK => OptionReply::Ack,
            REP_SERVER => {
                let name = r.string32()?;
                OptionReply::Server { name, description: r.rest_string()? }
            }
            REP_INFO => return InfoReply::parse(payload).map(OptionReply::Info),
            REP_META_CONTEXT => OptionReply::MetaContext { id: r.u32()?, name: r.rest_string()? },
            t if t & REP_FLAG_ERROR != 0 => OptionReply::Error { reply_type: t, message: r.rest_string()? },
            t => return Err(ProtoError::UnknownType { what: "option reply", value: t }),
        };
        r.finish()?;
        Ok(reply)
    }

    /// Whether this reply ends the server's answer to an option.
    pub fn is_final(&self) -> bool {
        matches!(self, OptionReply::Ack | OptionReply::Error { .. })
    }
}

/// Size and transmission flags, as sent in reply to `NBD_OPT_EXPORT_NAME`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportNameReply {
    pub size: u64,
    pub transmission_flags: u16,
}

impl ExportNameReply {
    /// Length without the optional zero padding.
    pub const LEN: usize = 10;

    pub fn encode(&self, no_zeroes: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN + EXPORT_NAME_PADDING);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.transmission_flags.to_be_bytes());
        if !no_zeroes {
            out.resize(Self::LEN + EXPORT_NAME_PADDING, 0);
        }
        out
    }

    /// Parses the first [`Self::LEN`] bytes (the padding is not included).
    pub fn parse(buf: &[u8]) -> Result<ExportNameReply> {
        exact_len(buf, Self::LEN, "export name reply")?;
        let mut r = Reader::new(buf, "export name reply");
        Ok(ExportNameReply { size: r.u64()?, transmission_flags: r.u16()? })
    }
}

// ---------------------------------------------------------------------------
// Transmission: requests.

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawRequest {
    magic: U32,
    flags: U16,
    command: U16,
    cookie: U64,
    offset: U64,
    length: U32,
}

/// A transmission request header (`NBD_CMD_WRITE` is followed by `length`
/// bytes of data).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    /// Opaque to the server, echoed in the reply ("handle" in older texts).
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub const LEN: usize = 28;

    pub fn parse(buf: &[u8]) -> Result<Request> {
        let raw = RawRequest::read_from_bytes(buf).map_err(|_| ProtoError::Length {
            what: "request",
            expected: Self::LEN,
            actual: buf.len(),
        })?;
        if raw.magic.get() != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic { what: "request", magic: u64::from(raw.magic.get()) });
        }
        Ok(Request {
            flags: raw.flags.get(),
            command: raw.command.get(),
            cookie: raw.cookie.get(),
            offset: raw.offset.get(),
            length: raw.length.get(),
        })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let raw = RawRequest {
            magic: REQUEST_MAGIC.into(),
            flags: self.flags.into(),
            command: self.command.into(),
            cookie: self.cookie.into(),
            offset: self.offset.into(),
            length: self.length.into(),
        };
        let mut out = [0u8; Self::LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }
}

// ---------------------------------------------------------------------------
// Transmission: simple replies.

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawSimpleReply {
    magic: U32,
    error: U32,
    cookie: U64,
}

/// A simple reply header; a successful READ reply is followed by the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub const LEN: usize = 16;

    pub fn parse(buf: &[u8]) -> Result<SimpleReply> {
        let raw = RawSimpleReply::read_from_bytes(buf).map_err(|_| ProtoError::Length {
            what: "simple reply",
            expected: Self::LEN,
            actual: buf.len(),
        })?;
        if raw.magic.get() != SIMPLE_REPLY_MAGIC {
            return Err(ProtoError::BadMagic { what: "simple reply", magic: u64::from(raw.magic.get()) });
        }
        Ok(SimpleReply { error: raw.error.get(), cookie: raw.cookie.get() })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let raw = RawSimpleReply {
            magic: SIMPLE_REPLY_MAGIC.into(),
            error: self.error.into(),
            cookie: self.cookie.into(),
        };
        let mut out = [0u8; Self::LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }
}

// ---------------------------------------------------------------------------
// Transmission: structured reply chunks.

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawChunkHeader {
    magic: U32,
    flags: U16,
    reply_type: U16,
    cookie: U64,
    length: U32,
}

/// Header of a structured reply chunk; `length` payload bytes follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub reply_type: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub const LEN: usize = 20;

    pub fn parse(buf: &[u8]) -> Result<ChunkHeader> {
        let raw = RawChunkHeader::read_from_bytes(buf).map_err(|_| ProtoError::Length {
            what: "structured reply",
            expected: Self::LEN,
            actual: buf.len(),
        })?;
        if raw.magic.get() != STRUCTURED_REPLY_MAGIC {
            return Err(ProtoError::BadMagic { what: "structured reply", magic: u64::from(raw.magic.get()) });
        }
        Ok(ChunkHeader {
            flags: raw.flags.get(),
            reply_type: raw.reply_type.get(),
            cookie: raw.cookie.get(),
            length: raw.length.get(),
        })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let raw = RawChunkHeader {
            magic: STRUCTURED_REPLY_MAGIC.into(),
            flags: self.flags.into(),
            reply_type: self.reply_type.into(),
            cookie: self.cookie.into(),
            length: self.length.into(),
        };
        let mut out = [0u8; Self::LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }
}

/// One `base:allocation` extent descriptor of a BLOCK_STATUS chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub length: u32,
    pub flags: u32,
}

/// A structured reply chunk (payload semantics by type).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyChunk {
    None,
    OffsetData { offset: u64, data: Bytes },
    OffsetHole { offset: u64, length: u32 },
    BlockStatus { context_id: u32, descriptors: Vec<BlockDescriptor> },
    Error { error: u32, message: String },
    ErrorOffset { error: u32, message: String, offset: u64 },
}

impl ReplyChunk {
    /// An ERROR chunk; the message is cut to the protocol's string limit.
    pub fn error(error: u32, message: &str) -> ReplyChunk {
        ReplyChunk::Error { error, message: truncate_str(message, MAX_STRING_LEN).to_owned() }
    }

    /// An ERROR_OFFSET chunk; the message is cut to the protocol's string limit.
    pub fn error_offset(error: u32, message: &str, offset: u64) -> ReplyChunk {
        ReplyChunk::ErrorOffset { error, message: truncate_str(message, MAX_STRING_LEN).to_owned(), offset }
    }

    pub fn reply_type(&self) -> u16 {
        match self {
            ReplyChunk::None => REPLY_TYPE_NONE,
            ReplyChunk::OffsetData { .. } => REPLY_TYPE_OFFSET_DATA,
            ReplyChunk::OffsetHole { .. } => REPLY_TYPE_OFFSET_HOLE,
            ReplyChunk::BlockStatus { .. } => REPLY_TYPE_BLOCK_STATUS,
            ReplyChunk::Error { .. } => REPLY_TYPE_ERROR,
            ReplyChunk::ErrorOffset { .. } => REPLY_TYPE_ERROR_OFFSET,
        }
    }

    /// The header of an OFFSET_DATA chunk whose `len` bytes of data are
    /// sent after it separately (as [`ReplyChunk::encode`] would).
    pub fn offset_data_head(offset: u64, len: usize, flags: u16, cookie: u64) -> Vec<u8> {
        let header = ChunkHeader {
            flags,
            reply_type: REPLY_TYPE_OFFSET_DATA,
            cookie,
            length: u32::try_from(len.saturating_add(8)).unwrap_or(u32::MAX),
        };
        let mut out = Vec::with_capacity(ChunkHeader::LEN + 8);
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(&offset.to_be_bytes());
        out
    }

    /// Encodes header and payload. The data of an OFFSET_DATA chunk is not
    /// copied: it is returned as the second element, to be sent right after
    /// the first. Error messages longer than [`MAX_STRING_LEN`] are cut.
    pub fn encode(&self, flags: u16, cookie: u64) -> (Vec<u8>, Option<Bytes>) {
        let mut payload = Vec::new();
        let mut data = None;
        let mut length = 0usize;
        match self {
            ReplyChunk::None => {}
            ReplyChunk::OffsetData { offset, data: d } => {
                payload.extend_from_slice(&offset.to_be_bytes());
                length = d.len();
                data = Some(d.clone());
            }
            ReplyChunk::OffsetHole { offset, length: hole } => {
                payload.extend_from_slice(&offset.to_be_bytes());
                payload.extend_from_slice(&hole.to_be_bytes());
            }
            ReplyChunk::BlockStatus { context_id, descriptors } => {
                payload.extend_from_slice(&context_id.to_be_bytes());
                for d in descriptors {
                    payload.extend_from_slice(&d.length.to_be_bytes());
                    payload.extend_from_slice(&d.flags.to_be_bytes());
                }
            }
            ReplyChunk::Error { error, message } => {
                encode_error_prefix(&mut payload, *error, message);
            }
            ReplyChunk::ErrorOffset { error, message, offset } => {
                encode_error_prefix(&mut payload, *error, message);
                payload.extend_from_slice(&offset.to_be_bytes());
            }
        }
        length = length.saturating_add(payload.len());
        let header = ChunkHeader {
            flags,
            reply_type: self.reply_type(),
            cookie,
            length: u32::try_from(length).unwrap_or(u32::MAX),
        };
        let mut out = Vec::with_capacity(ChunkHeader::LEN + payload.len());
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(&payload);
        (out, data)
    }

    /// Decodes the payload of a chunk of type `reply_type`, enforcing the
    /// length rules of the spec.
    pub fn parse(reply_type: u16, payload: &[u8]) -> Result<ReplyChunk> {
        let mut r = Reader::new(payload, "structured reply chunk");
        let chunk = match reply_type {
            REPLY_TYPE_NONE => ReplyChunk::None,
            REPLY_TYPE_OFFSET_DATA => {
                let offset = r.u64()?;
                if r.remaining() == 0 {
                    return Err(ProtoError::Malformed("empty OFFSET_DATA chunk"));
                }
                ReplyChunk::OffsetData { offset, data: Bytes::copy_from_slice(r.take(r.remaining())?) }
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let offset = r.u64()?;
                let length = r.u32()?;
                if length == 0 {
                    return Err(ProtoError::Malformed("empty OFFSET_HOLE chunk"));
                }
                ReplyChunk::OffsetHole { offset, length }
            }
            REPLY_TYPE_BLOCK_STATUS => {
                let context_id = r.u32()?;
                if r.remaining() == 0 || !r.remaining().is_multiple_of(8) {
                    return Err(ProtoError::Malformed("BLOCK_STATUS chunk length"));
                }
                let mut descriptors = Vec::with_capacity(r.remaining() / 8);
                while r.remaining() > 0 {
                    descriptors.push(BlockDescriptor { length: r.u32()?, flags: r.u32()? });
                }
                ReplyChunk::BlockStatus { context_id, descriptors }
            }
            REPLY_TYPE_ERROR => {
                let (error, message) = parse_error_prefix(&mut r)?;
                ReplyChunk::Error { error, message }
            }
            REPLY_TYPE_ERROR_OFFSET => {
                let (error, message) = parse_error_prefix(&mut r)?;
                ReplyChunk::ErrorOffset { error, message, offset: r.u64()? }
            }
            t => return Err(ProtoError::UnknownType { what: "structured reply", value: u32::from(t) }),
        };
        r.finish()?;
        Ok(chunk)
    }
}

fn encode_error_prefix(out: &mut Vec<u8>, error: u32, message: &str) {
    let message = truncate_str(message, MAX_STRING_LEN);
    out.extend_from_slice(&error.to_be_bytes());
    // MAX_STRING_LEN < u16::MAX, so the cut message length always fits.
    out.extend_from_slice(&u16::try_from(message.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

fn parse_error_prefix(r: &mut Reader<'_>) -> Result<(u32, String)> {
    let error = r.u32()?;
    if error == 0 {
        return Err(ProtoError::Malformed("error chunk with error 0"));
    }
    let len = r.u16()?;
    let message = r.string(usize::from(len))?;
    Ok((error, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_layout() {
        let g = ServerGreeting { handshake_flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES }.encode();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn client_flags_reject_unknown_bits() {
        assert_eq!(
            ClientFlags::parse(&[0, 0, 0, 3]).unwrap(),
            ClientFlags { fixed_newstyle: true, no_zeroes: true }
        );
        assert_eq!(ClientFlags::parse(&[0, 0, 0, 4]), Err(ProtoError::UnknownClientFlags(4)));
        assert!(ClientFlags::parse(&[0, 0, 0]).is_err());
    }

    #[test]
    fn request_layout_and_bad_magic() {
        let req = Request { flags: 1, command: CMD_WRITE, cookie: 0x0102, offset: 4096, length: 512 };
        let b = req.encode();
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::parse(&b).unwrap(), req);
        let mut bad = b;
        bad[0] = 0;
        assert!(matches!(Request::parse(&bad), Err(ProtoError::BadMagic { .. })));
        assert!(Request::parse(&b[..27]).is_err());
    }

    #[test]
    fn info_request_wire_format() {
        let payload = [0, 0, 0, 3, b'v', b'o', b'l', 0, 2, 0, 3, 0, 1];
        assert_eq!(
            NbdOption::parse(OPT_GO, &payload).unwrap(),
            NbdOption::Go(InfoRequest { export: "vol".into(), requests: vec![3, 1] })
        );
        // A count larger than the data present is an error, not an allocation.
        assert!(NbdOption::parse(OPT_GO, &[0, 0, 0, 0, 0xff, 0xff]).is_err());
        // Trailing garbage is an error.
        assert!(NbdOption::parse(OPT_INFO, &[0, 0, 0, 0, 0, 0, 9]).is_err());
        // Name length beyond the payload.
        assert!(NbdOption::parse(OPT_GO, &[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
    }

    #[test]
    fn meta_request_wire_format() {
        let mut payload = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15];
        payload.extend_from_slice(b"base:allocation");
        assert_eq!(
            NbdOption::parse(OPT_SET_META_CONTEXT, &payload).unwrap(),
            NbdOption::SetMetaContext(MetaContextRequest {
                export: String::new(),
                queries: vec![BASE_ALLOCATION.into()]
            })
        );
        // Billions of queries claimed in 12 bytes: rejected without allocating.
        assert!(
            NbdOption::parse(OPT_LIST_META_CONTEXT, &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0])
                .is_err()
        );
    }

    #[test]
    fn empty_payload_options() {
        assert!(NbdOption::parse(OPT_STRUCTURED_REPLY, &[1]).is_err());
        assert!(NbdOption::parse(OPT_LIST, &[1]).is_err());
        assert_eq!(NbdOption::parse(OPT_ABORT, &[1]).unwrap(), NbdOption::Abort);
    }

    #[test]
    fn strings_are_checked() {
        assert!(matches!(NbdOption::parse(OPT_EXPORT_NAME, &[0xff, 0xfe]), Err(ProtoError::InvalidUtf8(_))));
        assert!(matches!(
            NbdOption::parse(OPT_EXPORT_NAME, &vec![b'a'; MAX_STRING_LEN + 1]),
            Err(ProtoError::StringTooLong { .. })
        ));
    }

    #[test]
    fn error_messages_are_cut_on_char_boundaries() {
        let long = "é".repeat(MAX_STRING_LEN);
        let (bytes, _) = ReplyChunk::error(EIO, &long).encode(REPLY_FLAG_DONE, 1);
        let h = ChunkHeader::parse(&bytes[..ChunkHeader::LEN]).unwrap();
        assert_eq!(h.length as usize, bytes.len() - ChunkHeader::LEN);
        match ReplyChunk::parse(h.reply_type, &bytes[ChunkHeader::LEN..]).unwrap() {
            ReplyChunk::Error { error, message } => {
                assert_eq!(error, EIO);
                assert!(message.len() <= MAX_STRING_LEN && message.chars().all(|c| c == 'é'));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn chunk_length_rules() {
        assert!(ReplyChunk::parse(REPLY_TYPE_NONE, &[0]).is_err());
        assert!(ReplyChunk::parse(REPLY_TYPE_OFFSET_DATA, &[0; 8]).is_err());
        assert!(ReplyChunk::parse(REPLY_TYPE_OFFSET_HOLE, &[0; 12]).is_err());
        assert!(ReplyChunk::parse(REPLY_TYPE_BLOCK_STATUS, &[0; 4]).is_err());
        assert!(ReplyChunk::parse(REPLY_TYPE_BLOCK_STATUS, &[0; 13]).is_err());
        // Message length beyond the payload.
        assert!(ReplyChunk::parse(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9, b'x']).is_err());
        assert!(ReplyChunk::parse(0x4000, &[]).is_err());
    }

    #[test]
    fn export_name_reply_padding() {
        let r = ExportNameReply { size: 1 << 30, transmission_flags: FLAG_HAS_FLAGS };
        assert_eq!(r.encode(true).len(), 10);
        let padded = r.encode(false);
        assert_eq!(padded.len(), 134);
        assert!(padded[10..].iter().all(|&b| b == 0));
        assert_eq!(ExportNameReply::parse(&padded[..10]).unwrap(), r);
    }

    // -- property tests ------------------------------------------------------

    fn nbd_string() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-zA-Z0-9:/_é-]{0,40}").unwrap()
    }

    fn info_request() -> impl Strategy<Value = InfoRequest> {
        (nbd_string(), proptest::collection::vec(any::<u16>(), 0..8))
            .prop_map(|(export, requests)| InfoRequest { export, requests })
    }

    fn meta_request() -> impl Strategy<Value = MetaContextRequest> {
        (nbd_string(), proptest::collection::vec(nbd_string(), 0..6))
            .prop_map(|(export, queries)| MetaContextRequest { export, queries })
    }

    fn option_strategy() -> impl Strategy<Value = NbdOption> {
        prop_oneof![
            nbd_string().prop_map(NbdOption::ExportName),
            Just(NbdOption::Abort),
            Just(NbdOption::List),
            Just(NbdOption::StartTls),
            Just(NbdOption::StructuredReply),
            info_request().prop_map(NbdOption::Info),
            info_request().prop_map(NbdOption::Go),
            meta_request().prop_map(NbdOption::ListMetaContext),
            meta_request().prop_map(NbdOption::SetMetaContext),
            (12u32..1000, proptest::collection::vec(any::<u8>(), 0..32))
                .prop_map(|(option, payload)| NbdOption::Other { option, payload }),
        ]
    }

    fn info_strategy() -> impl Strategy<Value = InfoReply> {
        prop_oneof![
            (any::<u64>(), any::<u16>())
                .prop_map(|(size, transmission_flags)| InfoReply::Export { size, transmission_flags }),
            nbd_string().prop_map(InfoReply::Name),
            nbd_string().prop_map(InfoReply::Description),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(minimum, preferred, maximum)| {
                InfoReply::BlockSize { minimum, preferred, maximum }
            }),
            (4u16.., proptest::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(info_type, data)| InfoReply::Unknown { info_type, data }),
        ]
    }

    fn option_reply_strategy() -> impl Strategy<Value = OptionReply> {
        prop_oneof![
            Just(OptionReply::Ack),
            (nbd_string(), nbd_string())
                .prop_map(|(name, description)| OptionReply::Server { name, description }),
            info_strategy().prop_map(OptionReply::Info),
            (any::<u32>(), nbd_string()).prop_map(|(id, name)| OptionReply::MetaContext { id, name }),
            (any::<u32>(), nbd_string())
                .prop_map(|(t, message)| OptionReply::Error { reply_type: t | REP_FLAG_ERROR, message }),
        ]
    }

    fn chunk_strategy() -> impl Strategy<Value = ReplyChunk> {
        let desc = (any::<u32>(), any::<u32>()).prop_map(|(length, flags)| BlockDescriptor { length, flags });
        prop_oneof![
            Just(ReplyChunk::None),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..64))
                .prop_map(|(offset, data)| ReplyChunk::OffsetData { offset, data: Bytes::from(data) }),
            (any::<u64>(), 1u32..).prop_map(|(offset, length)| ReplyChunk::OffsetHole { offset, length }),
            (any::<u32>(), proptest::collection::vec(desc, 1..16))
                .prop_map(|(context_id, descriptors)| ReplyChunk::BlockStatus { context_id, descriptors }),
            (1u32.., nbd_string()).prop_map(|(error, message)| ReplyChunk::Error { error, message }),
            (1u32.., nbd_string(), any::<u64>())
                .prop_map(|(error, message, offset)| ReplyChunk::ErrorOffset { error, message, offset }),
        ]
    }

    proptest! {
        #[test]
        fn request_round_trip(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let req = Request { flags, command, cookie, offset, length };
            prop_assert_eq!(Request::parse(&req.encode()).unwrap(), req);
        }

        #[test]
        fn simple_reply_round_trip(error: u32, cookie: u64) {
            let r = SimpleReply { error, cookie };
            prop_assert_eq!(SimpleReply::parse(&r.encode()).unwrap(), r);
        }

        #[test]
        fn greeting_and_flags_round_trip(flags: u16, fixed: bool, nz: bool) {
            let g = ServerGreeting { handshake_flags: flags };
            prop_assert_eq!(ServerGreeting::parse(&g.encode()).unwrap(), g);
            let c = ClientFlags { fixed_newstyle: fixed, no_zeroes: nz };
            prop_assert_eq!(ClientFlags::parse(&c.encode()).unwrap(), c);
        }

        #[test]
        fn export_name_reply_round_trip(size: u64, flags: u16, nz: bool) {
            let r = ExportNameReply { size, transmission_flags: flags };
            let b = r.encode(nz);
            prop_assert_eq!(ExportNameReply::parse(&b[..ExportNameReply::LEN]).unwrap(), r);
        }

        #[test]
        fn option_round_trip(opt in option_strategy()) {
            let bytes = opt.encode();
            let h = OptionHeader::parse(&bytes[..OptionHeader::LEN]).unwrap();
            prop_assert_eq!(h.option, opt.code());
            prop_assert_eq!(h.length as usize, bytes.len() - OptionHeader::LEN);
            prop_assert_eq!(NbdOption::parse(h.option, &bytes[OptionHeader::LEN..]).unwrap(), opt);
        }

        #[test]
        fn option_reply_round_trip(reply in option_reply_strategy(), option: u32) {
            let bytes = reply.encode(option);
            let h = OptionReplyHeader::parse(&bytes[..OptionReplyHeader::LEN]).unwrap();
            prop_assert_eq!(h.option, option);
            prop_assert_eq!(h.length as usize, bytes.len() - OptionReplyHeader::LEN);
            prop_assert_eq!(OptionReply::parse(h.reply_type, &bytes[OptionReplyHeader::LEN..]).unwrap(), reply);
        }

        #[test]
        fn chunk_round_trip(chunk in chunk_strategy(), flags: u16, cookie: u64) {
            let (head, data) = chunk.encode(flags, cookie);
            let h = ChunkHeader::parse(&head[..ChunkHeader::LEN]).unwrap();
            let mut payload = head[ChunkHeader::LEN..].to_vec();
            if let Some(d) = data {
                payload.extend_from_slice(&d);
            }
            prop_assert_eq!((h.flags, h.cookie, h.reply_type), (flags, cookie, chunk.reply_type()));
            prop_assert_eq!(h.length as usize, payload.len());
            prop_assert_eq!(ReplyChunk::parse(h.reply_type, &payload).unwrap(), chunk);
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..96), code: u32) {
            let _ = ServerGreeting::parse(&bytes);
            let _ = ClientFlags::parse(&bytes);
            let _ = OptionHeader::parse(&bytes);
            let _ = OptionReplyHeader::parse(&bytes);
            let _ = ExportNameReply::parse(&bytes);
            let _ = Request::parse(&bytes);
            let _ = SimpleReply::parse(&bytes);
            let _ = ChunkHeader::parse(&bytes);
            let _ = InfoReply::parse(&bytes);
            let _ = OptionReply::parse(code, &bytes);
            let _ = ReplyChunk::parse(code as u16, &bytes);
            // Every known option code, plus the arbitrary one.
            for opt in (0..=12).chain([code]) {
                let _ = NbdOption::parse(opt, &bytes);
            }
        }

        #[test]
        fn fixed_headers_with_valid_magic_parse(tail in proptest::collection::vec(any::<u8>(), 24)) {
            // Valid magic plus arbitrary fields must always decode.
            let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&tail);
            prop_assert!(Request::parse(&b).is_ok());
        }

        #[test]
        fn truncate_str_is_a_prefix(s in "\\PC{0,50}", max in 0usize..60) {
            let t = truncate_str(&s, max);
            prop_assert!(t.len() <= max);
            prop_assert!(s.starts_with(t));
        }
    }
}
