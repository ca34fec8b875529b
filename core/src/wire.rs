//! The controller↔replica wire protocol: pure encoding and decoding, no
//! sockets. Every decoder takes untrusted bytes and returns a typed error,
//! never panics.
//!
//! ```text
//! Handshake (once per connection, client speaks first)
//!   Hello      "JVHI" u32 | version u16 | mode u8 (0 probe, 1 attach) | name_len u8
//!              | size u64 | epoch u64 | name[name_len]                       (24 + name)
//!   HelloReply "JVHR" u32 | version u16 | status u16 | size u64 | epoch u64
//!              | flags u32 | name_len u16 | msg_len u16 | name | msg          (32 + name + msg)
//! Requests (pipelined, tagged; the replica may answer out of order)
//!   "JVRQ" u32 | opcode u8 | flags u8 | reserved u16 (0) | tag u64 | offset u64 | length u64   (32)
//!   WRITE is followed by `length` payload bytes.
//! Responses
//!   "JVRP" u32 | status u16 | reserved u16 | tag u64 | length u32 | reserved u32           (24)
//!   followed by `length` bytes: READ data, BLOCK_STATUS extents (u64 length | u32 state)*,
//!   or a UTF-8 error message when status != 0.
//! ```
//! All integers are big-endian. `status` is 0 for success, otherwise an
//! [`ErrorKind::code`]. A probe reports the replica's identity without
//! binding it; an attach binds it to the volume name and epoch (a replica
//! refuses an epoch older than the one it has recorded: fencing).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use zerocopy::byteorder::network_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::device::{Extent, ExtentState, MAX_IO_BYTES};
use crate::error::{Error, ErrorKind, Result};

pub const PROTOCOL_VERSION: u16 = 1;
pub const HELLO_MAGIC: u32 = u32::from_be_bytes(*b"JVHI");
pub const HELLO_REPLY_MAGIC: u32 = u32::from_be_bytes(*b"JVHR");
pub const REQUEST_MAGIC: u32 = u32::from_be_bytes(*b"JVRQ");
pub const RESPONSE_MAGIC: u32 = u32::from_be_bytes(*b"JVRP");

/// Longest volume name on the wire.
pub const MAX_NAME_LEN: usize = 255;
/// Longest error message on the wire (longer ones are cut).
pub const MAX_MESSAGE_LEN: usize = 1024;
/// Largest response payload: a READ of [`MAX_IO_BYTES`].
pub const MAX_RESPONSE_PAYLOAD: u32 = MAX_IO_BYTES;

pub const FLAG_FUA: u8 = 1;
pub const FLAG_NO_HOLE: u8 = 2;

/// HelloReply flag: the replica's store was shut down cleanly last time.
pub const HELLO_CLEAN: u32 = 1;
/// HelloReply flag: the replica is bound to a volume (name is set).
pub const HELLO_BOUND: u32 = 2;

/// Wire-level decoding failure. Always fatal for the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("unknown opcode {0}")]
    BadOpcode(u8),
    #[error("invalid flags {flags:#04x} for {op:?}")]
    BadFlags { op: Opcode, flags: u8 },
    #[error("reserved field is not zero")]
    Reserved,
    #[error("length {0} too large")]
    TooLarge(u64),
    #[error("malformed {0}")]
    Malformed(&'static str),
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Error {
        Error::new(ErrorKind::Protocol, e.to_string())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Read = 1,
    Write = 2,
    Flush = 3,
    Trim = 4,
    WriteZeroes = 5,
    BlockStatus = 6,
    Ping = 7,
}

impl Opcode {
    fn from_u8(v: u8) -> Option<Opcode> {
        Some(match v {
            1 => Opcode::Read,
            2 => Opcode::Write,
            3 => Opcode::Flush,
            4 => Opcode::Trim,
            5 => Opcode::WriteZeroes,
            6 => Opcode::BlockStatus,
            7 => Opcode::Ping,
            _ => return None,
        })
    }

    /// Flags a request with this opcode may carry.
    fn allowed_flags(self) -> u8 {
        match self {
            Opcode::Write | Opcode::Trim => FLAG_FUA,
            Opcode::WriteZeroes => FLAG_FUA | FLAG_NO_HOLE,
            _ => 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloMode {
    /// Report identity only.
    Probe,
    /// Bind to the volume and epoch, then serve I/O.
    Attach,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub mode: HelloMode,
    pub size: u64,
    pub epoch: u64,
    pub volume: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloReply {
    pub version: u16,
    /// 0 = accepted, else an error code.
    pub status: u16,
    pub size: u64,
    pub epoch: u64,
    pub flags: u32,
    pub volume: String,
    pub message: String,
}

impl HelloReply {
    /// The refusal as an error, if this reply is one.
    pub fn error(&self) -> Option<Error> {
        (self.status != 0).then(|| Error::new(ErrorKind::from_code(self.status), self.message.clone()))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub opcode: Opcode,
    pub flags: u8,
    pub tag: u64,
    pub offset: u64,
    pub length: u64,
    /// WRITE payload (empty for other opcodes).
    pub data: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub tag: u64,
    /// 0 = success, else an [`ErrorKind::code`].
    pub status: u16,
    pub payload: Bytes,
}

impl Response {
    pub fn ok(tag: u64, payload: Bytes) -> Response {
        Response { tag, status: 0, payload }
    }

    pub fn error(tag: u64, err: &Error) -> Response {
        let mut msg = err.to_string();
        if msg.len() > MAX_MESSAGE_LEN {
            let mut cut = MAX_MESSAGE_LEN;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg.truncate(cut);
        }
        Response { tag, status: err.kind().code(), payload: Bytes::from(msg) }
    }

    /// The payload on success, or the error the replica reported.
    pub fn into_result(self) -> Result<Bytes> {
        if self.status == 0 {
            Ok(self.payload)
        } else {
            let msg = String::from_utf8_lossy(&self.payload).into_owned();
            Err(Error::new(ErrorKind::from_code(self.status), format!("replica: {msg}")))
        }
    }
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct HelloHeader {
    magic: U32,
    version: U16,
    mode: u8,
    name_len: u8,
    size: U64,
    epoch: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct HelloReplyHeader {
    magic: U32,
    version: U16,
    status: U16,
    size: U64,
    epoch: U64,
    flags: U32,
    name_len: U16,
    msg_len: U16,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RequestHeader {
    magic: U32,
    opcode: u8,
    flags: u8,
    reserved: U16,
    tag: U64,
    offset: U64,
    length: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ResponseHeader {
    magic: U32,
    status: U16,
    reserved: U16,
    tag: U64,
    length: U32,
    reserved2: U32,
}

pub const HELLO_LEN: usize = size_of::<HelloHeader>();
pub const HELLO_REPLY_LEN: usize = size_of::<HelloReplyHeader>();
pub const REQUEST_LEN: usize = size_of::<RequestHeader>();
pub const RESPONSE_LEN: usize = size_of::<ResponseHeader>();
const EXTENT_LEN: usize = 12;

/// Reads a fixed header from the front of `buf`, if enough bytes are there.
fn peek<T: FromBytes + KnownLayout + Immutable + Unaligned>(buf: &[u8]) -> Option<&T> {
    T::ref_from_prefix(buf).ok().map(|(h, _)| h)
}

pub fn encode_hello(h: &Hello, out: &mut BytesMut) -> Result<()> {
    if h.volume.len() > MAX_NAME_LEN || h.volume.is_empty() {
        return Err(Error::new(ErrorKind::InvalidArgument, "volume name must be 1..=255 bytes"));
    }
    let hdr = HelloHeader {
        magic: HELLO_MAGIC.into(),
        version: h.version.into(),
        mode: match h.mode {
            HelloMode::Probe => 0,
            HelloMode::Attach => 1,
        },
        name_len: h.volume.len() as u8,
        size: h.size.into(),
        epoch: h.epoch.into(),
    };
    out.put_slice(hdr.as_bytes());
    out.put_slice(h.volume.as_bytes());
    Ok(())
}

/// Decodes a Hello from the front of `buf`; `Ok(None)` means more bytes are needed.
pub fn decode_hello(buf: &mut BytesMut) -> Result<Option<Hello>, WireError> {
    let Some(hdr) = peek::<HelloHeader>(buf) else { return Ok(None) };
    if hdr.magic.get() != HELLO_MAGIC {
        return Err(WireError::BadMagic(hdr.magic.get()));
    }
    let mode = match hdr.mode {
        0 => HelloMode::Probe,
        1 => HelloMode::Attach,
        _ => return Err(WireError::Malformed("hello mode")),
    };
    let name_len = usize::from(hdr.name_len);
    if name_len == 0 {
        return Err(WireError::Malformed("empty volume name"));
    }
    if buf.len() < HELLO_LEN + name_len {
        return Ok(None);
    }
    let (version, size, epoch) = (hdr.version.get(), hdr.size.get(), hdr.epoch.get());
    buf.advance(HELLO_LEN);
    let name = buf.split_to(name_len);
    let volume = String::from_utf8(name.to_vec()).map_err(|_| WireError::Malformed("volume name"))?;
    Ok(Some(Hello { version, mode, size, epoch, volume }))
}

pub fn encode_hello_reply(r: &HelloReply, out: &mut BytesMut) {
    let name = &r.volume.as_bytes()[..r.volume.len().min(MAX_NAME_LEN)];
    let msg = &r.message.as_bytes()[..r.message.len().min(MAX_MESSAGE_LEN)];
    let hdr = HelloReplyHeader {
        magic: HELLO_REPLY_MAGIC.into(),
        version: r.version.into(),
        status: r.status.into(),
        size: r.size.into(),
        epoch: r.epoch.into(),
        flags: r.flags.into(),
        name_len: (name.len() as u16).into(),
        msg_len: (msg.len() as u16).into(),
    };
    out.put_slice(hdr.as_bytes());
    out.put_slice(name);
    out.put_slice(msg);
}

pub fn decode_hello_reply(buf: &mut BytesMut) -> Result<Option<HelloReply>, WireError> {
    let Some(hdr) = peek::<HelloReplyHeader>(buf) else { return Ok(None) };
    if hdr.magic.get() != HELLO_REPLY_MAGIC {
        return Err(WireError::BadMagic(hdr.magic.get()));
    }
    let (name_len, msg_len) = (usize::from(hdr.name_len.get()), usize::from(hdr.msg_len.get()));
    if name_len > MAX_NAME_LEN || msg_len > MAX_MESSAGE_LEN {
        return Err(WireError::Malformed("hello reply lengths"));
    }
    if buf.len() < HELLO_REPLY_LEN + name_len + msg_len {
        return Ok(None);
    }
    let (version, status, size, epoch, flags) =
        (hdr.version.get(), hdr.status.get(), hdr.size.get(), hdr.epoch.get(), hdr.flags.get());
    buf.advance(HELLO_REPLY_LEN);
    let name = buf.split_to(name_len);
    let msg = buf.split_to(msg_len);
    let volume = String::from_utf8(name.to_vec()).map_err(|_| WireError::Malformed("volume name"))?;
    let message = String::from_utf8_lossy(&msg).into_owned();
    Ok(Some(HelloReply { version, status, size, epoch, flags, volume, message }))
}

/// Encodes a request header; a WRITE's payload is sent after it separately
/// (so large buffers are not copied).
pub fn encode_request_header(r: &Request, out: &mut BytesMut) {
    let length = if r.opcode == Opcode::Write { r.data.len() as u64 } else { r.length };
    let hdr = RequestHeader {
        magic: REQUEST_MAGIC.into(),
        opcode: r.opcode as u8,
        flags: r.flags,
        reserved: 0.into(),
        tag: r.tag.into(),
        offset: r.offset.into(),
        length: length.into(),
    };
    out.put_slice(hdr.as_bytes());
}

/// Decodes a request (with its payload) from the front of `buf`;
/// `Ok(None)` means more bytes are needed. Validates magic, opcode, flags,
/// reserved bits and sizes; range checks against the device are the
/// server's job.
pub fn decode_request(buf: &mut BytesMut) -> Result<Option<Request>, WireError> {
    let Some(hdr) = peek::<RequestHeader>(buf) else { return Ok(None) };
    if hdr.magic.get() != REQUEST_MAGIC {
        return Err(WireError::BadMagic(hdr.magic.get()));
    }
    let opcode = Opcode::from_u8(hdr.opcode).ok_or(WireError::BadOpcode(hdr.opcode))?;
    if hdr.flags & !opcode.allowed_flags() != 0 {
        return Err(WireError::BadFlags { op: opcode, flags: hdr.flags });
    }
    if hdr.reserved.get() != 0 {
        return Err(WireError::Reserved);
    }
    let length = hdr.length.get();
    let payload = match opcode {
        Opcode::Read | Opcode::Write if length > u64::from(MAX_IO_BYTES) => {
            return Err(WireError::TooLarge(length));
        }
        Opcode::Write => length as usize,
        Opcode::Flush | Opcode::Ping if length != 0 => return Err(WireError::Malformed("length")),
        _ => 0,
    };
    if buf.len() < REQUEST_LEN + payload {
        return Ok(None);
    }
    let (flags, tag, offset) = (hdr.flags, hdr.tag.get(), hdr.offset.get());
    buf.advance(REQUEST_LEN);
    let data = buf.split_to(payload).freeze();
    Ok(Some(Request { opcode, flags, tag, offset, length, data }))
}

pub fn encode_response_header(r: &Response, out: &mut BytesMut) {
    let hdr = ResponseHeader {
        magic: RESPONSE_MAGIC.into(),
        status: r.status.into(),
        reserved: 0.into(),
        tag: r.tag.into(),
        length: (r.payload.len() as u32).into(),
        reserved2: 0.into(),
    };
    out.put_slice(hdr.as_bytes());
}

pub fn decode_response(buf: &mut BytesMut) -> Result<Option<Response>, WireError> {
    let Some(hdr) = peek::<ResponseHeader>(buf) else { return Ok(None) };
    if hdr.magic.get() != RESPONSE_MAGIC {
        return Err(WireError::BadMagic(hdr.magic.get()));
    }
    let length = hdr.length.get();
    if length > MAX_RESPONSE_PAYLOAD {
        return Err(WireError::TooLarge(u64::from(length)));
    }
    if hdr.reserved.get() != 0 || hdr.reserved2.get() != 0 {
        return Err(WireError::Reserved);
    }
    let length = length as usize;
    if buf.len() < RESPONSE_LEN + length {
        return Ok(None);
    }
    let (tag, status) = (hdr.tag.get(), hdr.status.get());
    buf.advance(RESPONSE_LEN);
    let payload = buf.split_to(length).freeze();
    Ok(Some(Response { tag, status, payload }))
}

pub fn encode_extents(extents: &[Extent]) -> Bytes {
    let mut out = BytesMut::with_capacity(extents.len() * EXTENT_LEN);
    for e in extents {
        out.put_u64(e.length);
        out.put_u32(match e.state {
            ExtentState::Data => 0,
            ExtentState::Zero => 1,
            ExtentState::Hole => 2,
        });
    }
    out.freeze()
}

pub fn decode_extents(mut payload: &[u8]) -> Result<Vec<Extent>, WireError> {
    if !payload.len().is_multiple_of(EXTENT_LEN) {
        return Err(WireError::Malformed("extent list"));
    }
    let mut out = Vec::with_capacity(payload.len() / EXTENT_LEN);
    while payload.has_remaining() {
        let length = payload.get_u64();
        let state = match payload.get_u32() {
            0 => ExtentState::Data,
            1 => ExtentState::Zero,
            2 => ExtentState::Hole,
            _ => return Err(WireError::Malformed("extent state")),
        };
        out.push(Extent { length, state });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn opcode() -> impl Strategy<Value = Opcode> {
        prop_oneof![
            Just(Opcode::Read),
            Just(Opcode::Write),
            Just(Opcode::Flush),
            Just(Opcode::Trim),
            Just(Opcode::WriteZeroes),
            Just(Opcode::BlockStatus),
            Just(Opcode::Ping),
        ]
    }

    fn request() -> impl Strategy<Value = Request> {
        (
            opcode(),
            any::<u8>(),
            any::<u64>(),
            any::<u64>(),
            0u64..(1 << 20),
            prop::collection::vec(any::<u8>(), 0..3000),
        )
            .prop_map(|(opcode, flags, tag, offset, length, data)| {
                let flags = flags & opcode.allowed_flags();
                let (length, data) = match opcode {
                    Opcode::Write => (data.len() as u64, Bytes::from(data)),
                    Opcode::Flush | Opcode::Ping => (0, Bytes::new()),
                    _ => (length, Bytes::new()),
                };
                Request { opcode, flags, tag, offset, length, data }
            })
    }

    fn encode_request(r: &Request) -> BytesMut {
        let mut b = BytesMut::new();
        encode_request_header(r, &mut b);
        b.put_slice(&r.data);
        b
    }

    proptest! {
        #[test]
        fn request_round_trips(r in request()) {
            let mut b = encode_request(&r);
            // Every strict prefix asks for more bytes and consumes nothing.
            for cut in [0, 1, REQUEST_LEN - 1, b.len().saturating_sub(1)] {
                if cut < b.len() {
                    let mut part = BytesMut::from(&b[..cut]);
                    prop_assert_eq!(decode_request(&mut part).unwrap(), None);
                    prop_assert_eq!(part.len(), cut);
                }
            }
            prop_assert_eq!(decode_request(&mut b).unwrap(), Some(r));
            prop_assert!(b.is_empty());
        }

        #[test]
        fn response_round_trips(tag in any::<u64>(), status in 0u16..20, payload in prop::collection::vec(any::<u8>(), 0..5000)) {
            let r = Response { tag, status, payload: Bytes::from(payload) };
            let mut b = BytesMut::new();
            encode_response_header(&r, &mut b);
            b.put_slice(&r.payload);
            prop_assert_eq!(decode_response(&mut b).unwrap(), Some(r));
        }

        #[test]
        fn hello_round_trips(name in "[a-z0-9-]{1,255}", size in any::<u64>(), epoch in any::<u64>(), attach in any::<bool>()) {
            let h = Hello { version: PROTOCOL_VERSION, mode: if attach { HelloMode::Attach } else { HelloMode::Probe }, size, epoch, volume: name.clone() };
            let mut b = BytesMut::new();
            encode_hello(&h, &mut b).unwrap();
            prop_assert_eq!(decode_hello(&mut b).unwrap(), Some(h));
            let r = HelloReply { version: 1, status: 9, size, epoch, flags: 3, volume: name, message: "stale epoch".into() };
            let mut b = BytesMut::new();
            encode_hello_reply(&r, &mut b);
            prop_assert_eq!(decode_hello_reply(&mut b).unwrap(), Some(r));
        }

        #[test]
        fn extents_round_trip(ext in prop::collection::vec((any::<u64>(), 0u8..3), 0..50)) {
            let ext: Vec<Extent> = ext.into_iter().map(|(length, s)| Extent { length, state: match s { 0 => ExtentState::Data, 1 => ExtentState::Zero, _ => ExtentState::Hole } }).collect();
            prop_assert_eq!(decode_extents(&encode_extents(&ext)).unwrap(), ext);
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_request(&mut BytesMut::from(&bytes[..]));
            let _ = decode_response(&mut BytesMut::from(&bytes[..]));
            let _ = decode_hello(&mut BytesMut::from(&bytes[..]));
            let _ = decode_hello_reply(&mut BytesMut::from(&bytes[..]));
            let _ = decode_extents(&bytes);
        }

        #[test]
        fn garbage_after_valid_magic_never_panics(op in any::<u8>(), rest in prop::collection::vec(any::<u8>(), 0..100)) {
            let mut b = BytesMut::new();
            b.put_u32(REQUEST_MAGIC);
            b.put_u8(op);
            b.put_slice(&rest);
            let _ = decode_request(&mut b);
            let mut b = BytesMut::new();
            b.put_u32(RESPONSE_MAGIC);
            b.put_slice(&rest);
            let _ = decode_response(&mut b);
        }
    }

    #[test]
    fn rejects_bad_requests() {
        let base =
            Request { opcode: Opcode::Read, flags: 0, tag: 1, offset: 0, length: 4096, data: Bytes::new() };
        let mut b = encode_request(&Request { flags: FLAG_FUA, ..base.clone() });
        assert!(matches!(decode_request(&mut b), Err(WireError::BadFlags { .. })));
        let mut b = encode_request(&Request { length: u64::from(MAX_IO_BYTES) + 1, ..base.clone() });
        assert_eq!(decode_request(&mut b), Err(WireError::TooLarge(u64::from(MAX_IO_BYTES) + 1)));
        let mut b = encode_request(&base);
        b[4] = 99;
        assert_eq!(decode_request(&mut b), Err(WireError::BadOpcode(99)));
        let mut b = encode_request(&base);
        b[0] = 0;
        assert!(matches!(decode_request(&mut b), Err(WireError::BadMagic(_))));
        let mut b = encode_request(&Request { opcode: Opcode::Flush, length: 0, ..base.clone() });
        b[31] = 1;
        assert_eq!(decode_request(&mut b), Err(WireError::Malformed("length")));
    }

    #[test]
    fn error_responses_carry_kind() {
        let e = Error::new(ErrorKind::Corrupt, "x".repeat(5000));
        let r = Response::error(7, &e);
        assert!(r.payload.len() <= MAX_MESSAGE_LEN);
        assert_eq!(r.into_result().unwrap_err().kind(), ErrorKind::Corrupt);
    }
}
