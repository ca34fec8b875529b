//! The controller↔replica wire protocol: pure encoding and decoding, no
//! sockets. Every decoder takes untrusted bytes and returns a typed error,
//! never panics.
//!
//! ```text
//! Handshake (once per connection, client speaks first)
//!   Hello      "JVHI" u32 | version u16 | mode u8 (0 probe, 1 attach) | name_len u8
//!              | size u64 | epoch u64 | name[name_len]                       (24 + name)
//!   HelloReply "JVHR" u32 | version u16 | status u16 | size u64 | epoch u64
//!              | flags u32 | name_len u16 | msg_len u16 | meta_len u16 | reserved u16
//!              | name | msg | meta                                (36 + name + msg + meta)
//! Requests (pipelined, tagged; the replica may answer out of order)
//!   "JVRQ" u32 | opcode u8 | flags u8 | reserved u16 (0) | tag u64 | offset u64 | length u64
//!              | generation u64 | crc u32 | reserved u32 (0)                                  (48)
//!   WRITE, SET_MEMBERSHIP and SET_REBUILD are followed by `length` payload bytes.
//! Responses
//!   "JVRP" u32 | status u16 | reserved u16 | tag u64 | length u32 | reserved u32           (24)
//!   followed by `length` bytes: READ data, BLOCK_STATUS extents (u64 length | u32 state)*,
//!   GET_META a [`ReplicaMeta`], GET_STAMPS `length` u64 stamps,
//!   or a UTF-8 error message when status != 0.
//! ```
//!
//! Version 2 added the replica metadata in the HelloReply, the generation
//! and crc fields of requests, and the opcodes GET_META, SET_MEMBERSHIP,
//! SET_REBUILD and GET_STAMPS. Version 3 added the snapshot opcodes:
//!
//! ```text
//!   SNAP_CREATE   payload: name; FLAG_SYSTEM marks a system snapshot
//!   SNAP_DELETE   payload: name (the merge into its child runs in the background)
//!   SNAP_REVERT   payload: name; `generation` stamps the changed regions
//!   SNAP_LIST     response: u32 count, then per snapshot (oldest first)
//!                 created_ms u64 | allocated u64 | flags u8 (1 SYSTEM, 2 MERGING)
//!                 | name_len u8 | name
//!   SNAP_READ     payload: length u64 | name; response: the data at `offset`
//!   SNAP_STATUS   payload: length u64 | name; response: BLOCK_STATUS extents
//! ```
//!
//! Version 4 (this one) lets a rebuild carry snapshots:
//!
//! ```text
//!   SNAP_CREATE        `offset` = creation time (ms since the Unix epoch, the
//!                      controller's, the same on every replica); 0 = the replica's clock
//!   SNAP_LAYER_STATUS  payload: length u64 | name; response: extents of the
//!                      snapshot's own layer only (Hole = no record there)
//!   SNAP_TRUNCATE      payload: the newest snapshot to keep, or empty for none;
//!                      every layer above it (the head too) is replaced by an empty head
//! ```
//!
//! A replica refuses a Hello of another version, so mixed versions fail at
//! the handshake, never later.
//!
//! `generation` on a changing request (WRITE, TRIM, WRITE_ZEROES) is the volume
//! generation it belongs to: the replica durably raises the stamp of every
//! region the request touches to at least `generation` before changing it, which is
//! what incremental rebuild reads back with GET_STAMPS. With [`FLAG_CRC`] a
//! WRITE's `crc` is the crc32c of its payload and the replica refuses
//! (`Corrupt`) a payload that does not match (rebuild copies use it).
//! With [`FLAG_SHM`] a WRITE's frame carries, instead of its payload, the
//! payload's offset (8 bytes) in the memory the controller sent with the
//! Hello over a Unix socket (`SCM_RIGHTS`); the replica sets [`HELLO_SHM`]
//! in its reply once it has mapped that memory (see [`crate::shm`]). A
//! second descriptor is memory for READ replies of that connection alone:
//! a READ with [`FLAG_SHM`] carries an offset in it the same way, the
//! replica writes the data there and answers with no payload
//! ([`HELLO_SHM_READ`]). A replica that sets [`HELLO_BLOCK_CRCS`] takes
//! shared, block-aligned WRITEs with [`FLAG_BLOCK_CRCS`]: after the offset,
//! the frame carries the crc32c of every block of the payload, which the
//! controller computed once for all its replicas, and the replica records
//! those instead of computing them again.
//! All integers are big-endian. `status` is 0 for success, otherwise an
//! [`ErrorKind::code`]. A probe reports the replica's identity without
//! binding it; an attach binds it to the volume name and epoch (a replica
//! refuses an epoch older than the one it has recorded: fencing).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use zerocopy::byteorder::network_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::device::{BLOCK_SIZE, Extent, ExtentState, MAX_IO_BYTES};
use crate::error::{Error, ErrorKind, Result};

pub const PROTOCOL_VERSION: u16 = 4;
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

/// Longest replica metadata blob (HelloReply, GET_META, SET_* payloads).
pub const MAX_META_LEN: usize = 8192;
/// Most regions one GET_STAMPS may ask for.
pub const MAX_STAMPS: u64 = (MAX_IO_BYTES / 8) as u64;

pub const FLAG_FUA: u8 = 1;
pub const FLAG_NO_HOLE: u8 = 2;
/// WRITE: `crc` is the crc32c of the payload; the replica checks it.
pub const FLAG_CRC: u8 = 4;
/// SNAP_CREATE: a system (not user) snapshot.
pub const FLAG_SYSTEM: u8 = 8;
/// READ: the controller splices the reply onward, so the payload must not
/// be sent from memory the replica will reuse (see [`crate::pipe`]).
pub const FLAG_PIPE: u8 = 16;
/// WRITE: the payload is in the memory the controller shared at the
/// handshake ([`crate::shm`]); the frame carries only its offset there
/// ([`crate::shm::REF_LEN`] bytes), `length` is the payload's length.
/// READ: the replica puts the data at that offset of the connection's
/// read memory and answers with an empty payload.
pub const FLAG_SHM: u8 = 32;
/// WRITE with [`FLAG_SHM`], block-aligned: the frame carries, after the
/// payload's offset, the crc32c of each of its blocks (`length /
/// BLOCK_SIZE` big-endian u32s), computed once by the controller for all
/// replicas; the replica records them instead of computing its own.
pub const FLAG_BLOCK_CRCS: u8 = 64;
/// WRITE: the volume sends this write to other replicas too, so it
/// completes with the slowest of them. The replica sends its answers to
/// such writes in small groups as it stores them, rather than all at the
/// end of a batch (offered as [`HELLO_FAN_OUT`]).
pub const FLAG_FAN_OUT: u8 = 128;

/// HelloReply flag: the replica's store was shut down cleanly last time.
pub const HELLO_CLEAN: u32 = 1;
/// HelloReply flag: the replica is bound to a volume (name is set).
pub const HELLO_BOUND: u32 = 2;
/// HelloReply flag: the replica mapped the payload memory sent with the
/// Hello, so WRITEs may carry [`FLAG_SHM`].
pub const HELLO_SHM: u32 = 4;
/// HelloReply flag: the replica mapped the read memory sent with the
/// Hello (the second descriptor), so READs may carry [`FLAG_SHM`].
pub const HELLO_SHM_READ: u32 = 8;
/// HelloReply flag: the reply came with read-only descriptors of the
/// replica's head files and a validity word (see [`crate::local`]).
pub const HELLO_LOCAL_READS: u32 = 16;
/// HelloReply flag: shared WRITEs may carry [`FLAG_BLOCK_CRCS`].
pub const HELLO_BLOCK_CRCS: u32 = 32;
/// HelloReply flag: the replica answers [`Opcode::LocalFiles`].
pub const HELLO_LOCAL_FILES: u32 = 64;
/// HelloReply flag: WRITEs may carry [`FLAG_FAN_OUT`].
pub const HELLO_FAN_OUT: u32 = 128;

/// The answer to [`Opcode::LocalFiles`]: how many layers' files came with
/// it, and whether they are the whole chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalFilesAnswer {
    pub layers: u8,
    pub whole: bool,
}

impl LocalFilesAnswer {
    pub const LEN: usize = 2;

    pub fn encode(&self) -> [u8; Self::LEN] {
        [self.layers, u8::from(self.whole)]
    }

    pub fn decode(buf: &[u8]) -> Result<LocalFilesAnswer, WireError> {
        match *buf {
            [layers, whole @ (0 | 1)] if layers > 0 => Ok(LocalFilesAnswer { layers, whole: whole == 1 }),
            _ => Err(WireError::Malformed("local files answer")),
        }
    }
}

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
    /// The replica's [`ReplicaMeta`].
    GetMeta = 8,
    /// Durably record a [`Membership`] (payload).
    SetMembership = 9,
    /// Durably record a [`RebuildMark`] (payload), or clear it (empty payload).
    SetRebuild = 10,
    /// Region stamps: `offset` = first region, `length` = region count.
    GetStamps = 11,
    /// Snapshot the head (payload: name).
    SnapCreate = 12,
    /// Delete a snapshot (payload: name).
    SnapDelete = 13,
    /// Revert the head to a snapshot (payload: name).
    SnapRevert = 14,
    /// List the snapshots.
    SnapList = 15,
    /// Read from a snapshot (payload: [`SnapTarget`]).
    SnapRead = 16,
    /// Block status of a snapshot (payload: [`SnapTarget`]).
    SnapStatus = 17,
    /// Block status of a snapshot's own layer (payload: [`SnapTarget`]).
    SnapLayerStatus = 18,
    /// Drop the layers above a snapshot (payload: its name, or empty).
    SnapTruncate = 19,
    /// Read-only descriptors of the top layers' files and a new validity
    /// word (see [`crate::local`]), sent with the answer (`SCM_RIGHTS`);
    /// its payload is [`LocalFilesAnswer`]. Local connections only.
    LocalFiles = 20,
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
            8 => Opcode::GetMeta,
            9 => Opcode::SetMembership,
            10 => Opcode::SetRebuild,
            11 => Opcode::GetStamps,
            12 => Opcode::SnapCreate,
            13 => Opcode::SnapDelete,
            14 => Opcode::SnapRevert,
            15 => Opcode::SnapList,
            16 => Opcode::SnapRead,
            17 => Opcode::SnapStatus,
            18 => Opcode::SnapLayerStatus,
            19 => Opcode::SnapTruncate,
            20 => Opcode::LocalFiles,
            _ => return None,
        })
    }

    /// Flags a request with this opcode may carry.
    fn allowed_flags(self) -> u8 {
        match self {
            Opcode::Write => FLAG_FUA | FLAG_CRC | FLAG_SHM | FLAG_BLOCK_CRCS | FLAG_FAN_OUT,
            Opcode::Trim => FLAG_FUA,
            Opcode::WriteZeroes => FLAG_FUA | FLAG_NO_HOLE,
            Opcode::SnapCreate => FLAG_SYSTEM,
            Opcode::Read => FLAG_PIPE | FLAG_SHM,
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
    /// The replica's metadata (absent in refusals before the store is known).
    pub meta: Option<ReplicaMeta>,
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
    /// Volume generation of a changing request (0 for others).
    pub generation: u64,
    /// crc32c of the payload when [`FLAG_CRC`] is set.
    pub crc: u32,
    /// Payload of WRITE, SET_MEMBERSHIP, SET_REBUILD (empty for other opcodes).
    pub data: Bytes,
}

impl Request {
    /// A request without payload, generation or crc.
    pub fn simple(opcode: Opcode, tag: u64, offset: u64, length: u64) -> Request {
        Request { opcode, flags: 0, tag, offset, length, generation: 0, crc: 0, data: Bytes::new() }
    }
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
    meta_len: U16,
    reserved: U16,
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
    generation: U64,
    crc: U32,
    reserved2: U32,
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
    let meta = r.meta.as_ref().map(encode_meta).unwrap_or_default();
    let hdr = HelloReplyHeader {
        magic: HELLO_REPLY_MAGIC.into(),
        version: r.version.into(),
        status: r.status.into(),
        size: r.size.into(),
        epoch: r.epoch.into(),
        flags: r.flags.into(),
        name_len: (name.len() as u16).into(),
        msg_len: (msg.len() as u16).into(),
        meta_len: (meta.len() as u16).into(),
        reserved: 0.into(),
    };
    out.put_slice(hdr.as_bytes());
    out.put_slice(name);
    out.put_slice(msg);
    out.put_slice(&meta);
}

pub fn decode_hello_reply(buf: &mut BytesMut) -> Result<Option<HelloReply>, WireError> {
    let Some(hdr) = peek::<HelloReplyHeader>(buf) else { return Ok(None) };
    if hdr.magic.get() != HELLO_REPLY_MAGIC {
        return Err(WireError::BadMagic(hdr.magic.get()));
    }
    let (name_len, msg_len) = (usize::from(hdr.name_len.get()), usize::from(hdr.msg_len.get()));
    let meta_len = usize::from(hdr.meta_len.get());
    if name_len > MAX_NAME_LEN || msg_len > MAX_MESSAGE_LEN || meta_len > MAX_META_LEN {
        return Err(WireError::Malformed("hello reply lengths"));
    }
    if hdr.reserved.get() != 0 {
        return Err(WireError::Reserved);
    }
    if buf.len() < HELLO_REPLY_LEN + name_len + msg_len + meta_len {
        return Ok(None);
    }
    let (version, status, size, epoch, flags) =
        (hdr.version.get(), hdr.status.get(), hdr.size.get(), hdr.epoch.get(), hdr.flags.get());
    buf.advance(HELLO_REPLY_LEN);
    let name = buf.split_to(name_len);
    let msg = buf.split_to(msg_len);
    let meta = buf.split_to(meta_len);
    let volume = String::from_utf8(name.to_vec()).map_err(|_| WireError::Malformed("volume name"))?;
    let message = String::from_utf8_lossy(&msg).into_owned();
    let meta = if meta.is_empty() { None } else { Some(decode_meta(&meta)?) };
    Ok(Some(HelloReply { version, status, size, epoch, flags, volume, message, meta }))
}

/// Whether requests with this opcode carry a payload of `length` bytes.
fn has_payload(op: Opcode) -> bool {
    matches!(
        op,
        Opcode::Write
            | Opcode::SetMembership
            | Opcode::SetRebuild
            | Opcode::SnapCreate
            | Opcode::SnapDelete
            | Opcode::SnapRevert
            | Opcode::SnapRead
            | Opcode::SnapStatus
            | Opcode::SnapLayerStatus
            | Opcode::SnapTruncate
    )
}

/// A WRITE whose payload, or a READ whose reply, is in shared memory
/// (see [`FLAG_SHM`]).
fn is_shared(op: Opcode, flags: u8) -> bool {
    matches!(op, Opcode::Write | Opcode::Read) && flags & FLAG_SHM != 0
}

/// The frame payload of a shared request: the offset in shared memory,
/// then, with [`FLAG_BLOCK_CRCS`], one crc per block of a block-aligned
/// WRITE that does not carry a whole-payload [`FLAG_CRC`].
fn shared_frame_payload(op: Opcode, flags: u8, offset: u64, length: u64) -> Result<usize, WireError> {
    if flags & FLAG_BLOCK_CRCS == 0 {
        return Ok(crate::shm::REF_LEN);
    }
    let block = u64::from(BLOCK_SIZE);
    if op != Opcode::Write || flags & FLAG_CRC != 0 {
        return Err(WireError::BadFlags { op, flags });
    }
    if length > u64::from(MAX_IO_BYTES) {
        return Err(WireError::TooLarge(length));
    }
    if length == 0 || !length.is_multiple_of(block) || !offset.is_multiple_of(block) {
        return Err(WireError::Malformed("block crcs of an unaligned write"));
    }
    Ok(crate::shm::REF_LEN + block_crcs_len(length))
}

/// Bytes of the block crcs ([`FLAG_BLOCK_CRCS`]) of a `length`-byte payload.
pub fn block_crcs_len(length: u64) -> usize {
    (length / u64::from(BLOCK_SIZE)) as usize * 4
}

/// Encodes a request header; a payload is sent after it separately (so
/// large buffers are not copied).
pub fn encode_request_header(r: &Request, out: &mut BytesMut) {
    out.put_slice(&request_header(r));
}

/// The header of `r`, as [`encode_request_header`] writes it.
pub fn request_header(r: &Request) -> [u8; REQUEST_LEN] {
    let length =
        if is_shared(r.opcode, r.flags) || !has_payload(r.opcode) { r.length } else { r.data.len() as u64 };
    request_header_sized(r, length)
}

/// The header of `r` saying `length`, for a request whose payload is sent
/// from elsewhere (a pipe) rather than from `r.data`.
pub fn request_header_sized(r: &Request, length: u64) -> [u8; REQUEST_LEN] {
    let hdr = RequestHeader {
        magic: REQUEST_MAGIC.into(),
        opcode: r.opcode as u8,
        flags: r.flags,
        reserved: 0.into(),
        tag: r.tag.into(),
        offset: r.offset.into(),
        length: length.into(),
        generation: r.generation.into(),
        crc: r.crc.into(),
        reserved2: 0.into(),
    };
    let mut out = [0u8; REQUEST_LEN];
    out.copy_from_slice(hdr.as_bytes());
    out
}

/// Decodes and validates the request header at the front of `buf` (the
/// payload need not have arrived): the request without its payload, and the
/// payload's length. `None` if the header is incomplete.
pub fn decode_request_header(buf: &[u8]) -> Result<Option<(Request, usize)>, WireError> {
    let Some(hdr) = peek::<RequestHeader>(buf) else { return Ok(None) };
    if hdr.magic.get() != REQUEST_MAGIC {
        return Err(WireError::BadMagic(hdr.magic.get()));
    }
    let opcode = Opcode::from_u8(hdr.opcode).ok_or(WireError::BadOpcode(hdr.opcode))?;
    let crcs_unshared = hdr.flags & FLAG_BLOCK_CRCS != 0 && hdr.flags & FLAG_SHM == 0;
    if hdr.flags & !opcode.allowed_flags() != 0 || crcs_unshared {
        return Err(WireError::BadFlags { op: opcode, flags: hdr.flags });
    }
    if hdr.reserved.get() != 0 || hdr.reserved2.get() != 0 {
        return Err(WireError::Reserved);
    }
    let length = hdr.length.get();
    let payload = match opcode {
        Opcode::Read | Opcode::Write if length > u64::from(MAX_IO_BYTES) => {
            return Err(WireError::TooLarge(length));
        }
        Opcode::SetMembership
        | Opcode::SetRebuild
        | Opcode::SnapCreate
        | Opcode::SnapDelete
        | Opcode::SnapRevert
        | Opcode::SnapRead
        | Opcode::SnapStatus
        | Opcode::SnapLayerStatus
        | Opcode::SnapTruncate
            if length > MAX_META_LEN as u64 =>
        {
            return Err(WireError::TooLarge(length));
        }
        Opcode::GetStamps if length > MAX_STAMPS => return Err(WireError::TooLarge(length)),
        op if is_shared(op, hdr.flags) => shared_frame_payload(op, hdr.flags, hdr.offset.get(), length)?,
        op if has_payload(op) => length as usize,
        Opcode::Flush | Opcode::Ping | Opcode::GetMeta | Opcode::SnapList | Opcode::LocalFiles
            if length != 0 =>
        {
            return Err(WireError::Malformed("length"));
        }
        _ => 0,
    };
    let req = Request {
        opcode,
        flags: hdr.flags,
        tag: hdr.tag.get(),
        offset: hdr.offset.get(),
        length,
        generation: hdr.generation.get(),
        crc: hdr.crc.get(),
        data: Bytes::new(),
    };
    Ok(Some((req, payload)))
}

/// Decodes a request (with its payload) from the front of `buf`;
/// `Ok(None)` means more bytes are needed (see also
/// [`decode_request_header`]). Validates magic, opcode, flags,
/// reserved bits and sizes; range checks against the device are the
/// server's job.
pub fn decode_request(buf: &mut BytesMut) -> Result<Option<Request>, WireError> {
    let Some((mut req, payload)) = decode_request_header(buf)? else { return Ok(None) };
    if buf.len() < REQUEST_LEN + payload {
        return Ok(None);
    }
    buf.advance(REQUEST_LEN);
    req.data = buf.split_to(payload).freeze();
    Ok(Some(req))
}

/// Total length (header and payload) of the response at the front of
/// `buf`, once its header is there. Lets a reader make room for a large
/// payload once instead of growing its buffer piecewise. Checks only the
/// length; [`decode_response`] checks the rest.
pub fn response_frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    let Some(hdr) = peek::<ResponseHeader>(buf) else { return Ok(None) };
    let length = hdr.length.get();
    if length > MAX_RESPONSE_PAYLOAD {
        return Err(WireError::TooLarge(u64::from(length)));
    }
    Ok(Some(RESPONSE_LEN + length as usize))
}

/// Total length (header and payload) of the request at the front of `buf`,
/// once its header is there and if it is plausible (see
/// [`response_frame_len`]); `None` otherwise ([`decode_request`] reports
/// malformed headers).
pub fn request_frame_len(buf: &[u8]) -> Option<usize> {
    let hdr = peek::<RequestHeader>(buf)?;
    let opcode = Opcode::from_u8(hdr.opcode)?;
    let length = hdr.length.get();
    if is_shared(opcode, hdr.flags) {
        return shared_frame_payload(opcode, hdr.flags, hdr.offset.get(), length)
            .ok()
            .map(|n| REQUEST_LEN + n);
    }
    (has_payload(opcode) && length <= u64::from(MAX_IO_BYTES)).then(|| REQUEST_LEN + length as usize)
}

/// Makes room in `buf` for the whole frame of `frame` bytes that starts
/// at its front, in one step: a large payload is then received straight
/// into place, never copied again as the buffer grows. Otherwise keeps
/// at least `min_spare` bytes free for the next read.
pub fn reserve_frame(buf: &mut BytesMut, frame: Option<usize>, min_spare: usize) {
    let need = frame.unwrap_or(0).saturating_sub(buf.len()).max(min_spare);
    if buf.capacity() - buf.len() < need {
        // A fresh buffer instead of `reserve`: the old one is usually still
        // shared with payloads handed out, so reserving would copy anyway,
        // and this way the copy is only the partial frame, once.
        let mut fresh = BytesMut::with_capacity((buf.len() + need).max(4 * min_spare));
        fresh.extend_from_slice(buf);
        *buf = fresh;
    }
}

pub fn encode_response_header(r: &Response, out: &mut BytesMut) {
    out.put_slice(&response_head(r.tag, r.status, r.payload.len()));
}

/// The header of a response whose payload of `len` bytes is sent apart.
pub fn response_head(tag: u64, status: u16, len: usize) -> [u8; RESPONSE_LEN] {
    let hdr = ResponseHeader {
        magic: RESPONSE_MAGIC.into(),
        status: status.into(),
        reserved: 0.into(),
        tag: tag.into(),
        length: u32::try_from(len).unwrap_or(u32::MAX).into(),
        reserved2: 0.into(),
    };
    let mut out = [0u8; RESPONSE_LEN];
    out.copy_from_slice(hdr.as_bytes());
    out
}

/// The tag, status and payload length of the response at the front of
/// `buf`, validated as [`decode_response`] does; `None` if the header is
/// incomplete.
pub fn decode_response_head(buf: &[u8]) -> Result<Option<(u64, u16, usize)>, WireError> {
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
    Ok(Some((hdr.tag.get(), hdr.status.get(), length as usize)))
}

pub fn decode_response(buf: &mut BytesMut) -> Result<Option<Response>, WireError> {
    let Some((tag, status, length)) = decode_response_head(buf)? else { return Ok(None) };
    if buf.len() < RESPONSE_LEN + length {
        return Ok(None);
    }
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

/// A snapshot as a replica lists it (SNAP_LIST).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub name: String,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Bytes held in the snapshot's own layer.
    pub allocated_bytes: u64,
    pub system: bool,
    /// Being deleted (merging into its child).
    pub merging: bool,
}

/// Longest snapshot name on the wire.
pub const MAX_SNAPSHOT_NAME: usize = 64;

pub fn encode_snapshots(list: &[SnapshotEntry]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u32(list.len() as u32);
    for s in list {
        let name = &s.name.as_bytes()[..s.name.len().min(MAX_SNAPSHOT_NAME)];
        out.put_u64(s.created_ms);
        out.put_u64(s.allocated_bytes);
        out.put_u8(u8::from(s.system) | (u8::from(s.merging) << 1));
        out.put_u8(name.len() as u8);
        out.put_slice(name);
    }
    out.freeze()
}

pub fn decode_snapshots(buf: &[u8]) -> Result<Vec<SnapshotEntry>, WireError> {
    let mut c = Cursor(buf);
    let n = c.u32()? as usize;
    // Each entry is at least 18 bytes: bound the allocation by the payload.
    if n > buf.len() / 18 {
        return Err(WireError::Malformed("snapshot count"));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let created_ms = c.u64()?;
        let allocated_bytes = c.u64()?;
        let flags = c.u8()?;
        if flags & !3 != 0 {
            return Err(WireError::Malformed("snapshot flags"));
        }
        let len = usize::from(c.u8()?);
        if len == 0 || len > MAX_SNAPSHOT_NAME || c.0.len() < len {
            return Err(WireError::Malformed("snapshot name"));
        }
        let (name, rest) = c.0.split_at(len);
        c.0 = rest;
        let name = String::from_utf8(name.to_vec()).map_err(|_| WireError::Malformed("snapshot name"))?;
        out.push(SnapshotEntry {
            name,
            created_ms,
            allocated_bytes,
            system: flags & 1 != 0,
            merging: flags & 2 != 0,
        });
    }
    c.end()?;
    Ok(out)
}

/// SNAP_READ / SNAP_STATUS payload: how many bytes, of which snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapTarget {
    pub length: u64,
    pub name: String,
}

pub fn encode_snap_target(t: &SnapTarget) -> Bytes {
    let mut out = BytesMut::with_capacity(8 + t.name.len());
    out.put_u64(t.length);
    out.put_slice(t.name.as_bytes());
    out.freeze()
}

pub fn decode_snap_target(buf: &[u8]) -> Result<SnapTarget, WireError> {
    let mut c = Cursor(buf);
    let length = c.u64()?;
    let name = decode_snap_name(c.0)?;
    Ok(SnapTarget { length, name })
}

/// SNAP_TRUNCATE payload: the newest snapshot to keep (empty: none).
pub fn decode_snap_keep(buf: &[u8]) -> Result<Option<String>, WireError> {
    if buf.is_empty() { Ok(None) } else { decode_snap_name(buf).map(Some) }
}

/// A snapshot name payload (SNAP_CREATE, SNAP_DELETE, SNAP_REVERT).
pub fn decode_snap_name(buf: &[u8]) -> Result<String, WireError> {
    if buf.is_empty() || buf.len() > MAX_SNAPSHOT_NAME {
        return Err(WireError::Malformed("snapshot name"));
    }
    String::from_utf8(buf.to_vec()).map_err(|_| WireError::Malformed("snapshot name"))
}

/// Most members a [`Membership`] may list.
pub const MAX_MEMBERS: usize = 64;
/// Most pieces a [`RebuildMark`] may hold.
pub const MAX_PIECES: usize = 64;

/// A generation record: which replicas (by store id) were the healthy
/// members of the volume at `generation`. Every participant of the volume
/// stores the newest record it was sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    pub generation: u64,
    /// Epoch of the controller that wrote it.
    pub epoch: u64,
    /// Written by a controller that stopped cleanly with its members in step.
    pub clean: bool,
    /// Store ids of the healthy members.
    pub members: Vec<u64>,
}

/// Where a rebuild into this replica stands, so it can resume.
///
/// Region `r` at or above `progress` still needs copying where a stamp is
/// at least the threshold of the piece holding `r`; below `progress` it was
/// copied in the current pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebuildMark {
    pub progress: u64,
    /// `(end_region, threshold)`: ends strictly ascending, the last one
    /// `u64::MAX`; a piece covers the regions from the previous end.
    pub pieces: Vec<(u64, u64)>,
}

impl RebuildMark {
    /// A rebuild of every region stamped at `threshold` or later.
    pub fn from_threshold(threshold: u64) -> RebuildMark {
        RebuildMark { progress: 0, pieces: vec![(u64::MAX, threshold)] }
    }

    /// Copy threshold of region `r` (ignoring `progress`).
    pub fn threshold(&self, r: u64) -> u64 {
        self.pieces.iter().find(|(end, _)| r < *end).map_or(0, |&(_, t)| t)
    }

    /// The mark for a new pass after this one stopped at `progress` with
    /// the replica current up to `generation`: regions already copied need
    /// only what was written from `generation` on. Merges the oldest pieces
    /// (taking the lower threshold: more copying, never less) to stay
    /// within [`MAX_PIECES`].
    pub fn resumed(&self, generation: u64) -> RebuildMark {
        let mut pieces = Vec::new();
        if self.progress > 0 {
            pieces.push((self.progress, generation.max(self.threshold(0))));
        }
        pieces.extend(self.pieces.iter().copied().filter(|&(end, _)| end > self.progress));
        while pieces.len() > MAX_PIECES {
            let (end, t) = pieces.remove(1);
            pieces[0] = (end, pieces[0].1.min(t));
        }
        RebuildMark { progress: 0, pieces }
    }

    fn is_valid(&self) -> bool {
        !self.pieces.is_empty()
            && self.pieces.len() <= MAX_PIECES
            && self.pieces.last().is_some_and(|&(end, _)| end == u64::MAX)
            && self.pieces.windows(2).all(|w| w[0].0 < w[1].0)
    }
}

/// What a replica tells about itself: identity, generation record and any
/// rebuild in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaMeta {
    /// Random id chosen when the store was created.
    pub store_id: u64,
    /// Bytes per stamp region.
    pub region_size: u32,
    pub membership: Membership,
    pub rebuild: Option<RebuildMark>,
}

pub fn encode_membership(m: &Membership, out: &mut BytesMut) {
    let n = m.members.len().min(MAX_MEMBERS);
    out.put_u64(m.generation);
    out.put_u64(m.epoch);
    out.put_u8(u8::from(m.clean));
    out.put_u8(n as u8);
    for id in &m.members[..n] {
        out.put_u64(*id);
    }
}

pub fn encode_rebuild(r: &RebuildMark, out: &mut BytesMut) {
    let n = r.pieces.len().min(MAX_PIECES);
    out.put_u64(r.progress);
    out.put_u8(n as u8);
    for (end, t) in &r.pieces[..n] {
        out.put_u64(*end);
        out.put_u64(*t);
    }
}

pub fn encode_meta(m: &ReplicaMeta) -> Bytes {
    let mut out = BytesMut::with_capacity(64 + 8 * m.membership.members.len());
    out.put_u64(m.store_id);
    out.put_u32(m.region_size);
    encode_membership(&m.membership, &mut out);
    match &m.rebuild {
        Some(r) => {
            out.put_u8(1);
            encode_rebuild(r, &mut out);
        }
        None => out.put_u8(0),
    }
    out.freeze()
}

/// Bounds-checked reads from the front of a byte slice.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(WireError::Malformed("short metadata"))?;
        self.0 = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take()?))
    }
    fn end(&self) -> Result<(), WireError> {
        if self.0.is_empty() { Ok(()) } else { Err(WireError::Malformed("trailing metadata bytes")) }
    }
}

fn read_membership(c: &mut Cursor<'_>) -> Result<Membership, WireError> {
    let generation = c.u64()?;
    let epoch = c.u64()?;
    let clean = match c.u8()? {
        0 => false,
        1 => true,
        _ => return Err(WireError::Malformed("membership flags")),
    };
    let n = usize::from(c.u8()?);
    if n > MAX_MEMBERS {
        return Err(WireError::Malformed("too many members"));
    }
    let members = (0..n).map(|_| c.u64()).collect::<Result<Vec<_>, _>>()?;
    Ok(Membership { generation, epoch, clean, members })
}

fn read_rebuild(c: &mut Cursor<'_>) -> Result<RebuildMark, WireError> {
    let progress = c.u64()?;
    let n = usize::from(c.u8()?);
    let pieces = (0..n).map(|_| Ok((c.u64()?, c.u64()?))).collect::<Result<Vec<_>, WireError>>()?;
    let mark = RebuildMark { progress, pieces };
    if !mark.is_valid() {
        return Err(WireError::Malformed("rebuild pieces"));
    }
    Ok(mark)
}

pub fn decode_membership(buf: &[u8]) -> Result<Membership, WireError> {
    let mut c = Cursor(buf);
    let m = read_membership(&mut c)?;
    c.end()?;
    Ok(m)
}

pub fn decode_rebuild(buf: &[u8]) -> Result<RebuildMark, WireError> {
    let mut c = Cursor(buf);
    let r = read_rebuild(&mut c)?;
    c.end()?;
    Ok(r)
}

pub fn decode_meta(buf: &[u8]) -> Result<ReplicaMeta, WireError> {
    let mut c = Cursor(buf);
    let store_id = c.u64()?;
    let region_size = c.u32()?;
    let membership = read_membership(&mut c)?;
    let rebuild = match c.u8()? {
        0 => None,
        1 => Some(read_rebuild(&mut c)?),
        _ => return Err(WireError::Malformed("rebuild flag")),
    };
    c.end()?;
    Ok(ReplicaMeta { store_id, region_size, membership, rebuild })
}

pub fn encode_stamps(stamps: &[u64]) -> Bytes {
    let mut out = BytesMut::with_capacity(stamps.len() * 8);
    for s in stamps {
        out.put_u64(*s);
    }
    out.freeze()
}

pub fn decode_stamps(payload: &[u8]) -> Result<Vec<u64>, WireError> {
    if !payload.len().is_multiple_of(8) {
        return Err(WireError::Malformed("stamp list"));
    }
    Ok(payload.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default())).collect())
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
            Just(Opcode::GetMeta),
            Just(Opcode::SetMembership),
            Just(Opcode::SetRebuild),
            Just(Opcode::GetStamps),
            Just(Opcode::SnapCreate),
            Just(Opcode::SnapDelete),
            Just(Opcode::SnapRevert),
            Just(Opcode::SnapList),
            Just(Opcode::SnapRead),
            Just(Opcode::SnapStatus),
            Just(Opcode::SnapLayerStatus),
            Just(Opcode::SnapTruncate),
            Just(Opcode::LocalFiles),
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
            any::<u64>(),
            any::<u32>(),
        )
            .prop_map(|(opcode, flags, tag, mut offset, mut length, mut data, generation, crc)| {
                let mut flags = flags & opcode.allowed_flags();
                if flags & FLAG_BLOCK_CRCS != 0 {
                    // Only valid on a shared, block-aligned WRITE.
                    flags = (flags | FLAG_SHM) & !FLAG_CRC;
                    offset -= offset % 4096;
                    length = (length / 4096).max(1) * 4096;
                }
                if opcode != Opcode::Write {
                    data.truncate(MAX_META_LEN);
                }
                let (length, data) = match opcode {
                    // A shared payload: only its place travels.
                    op if is_shared(op, flags) => {
                        let mut frame = crc.to_le_bytes().repeat(2);
                        if flags & FLAG_BLOCK_CRCS != 0 {
                            frame.extend((0..block_crcs_len(length)).map(|i| i as u8));
                        }
                        (length, Bytes::from(frame))
                    }
                    op if has_payload(op) => (data.len() as u64, Bytes::from(data)),
                    Opcode::Flush
                    | Opcode::Ping
                    | Opcode::GetMeta
                    | Opcode::SnapList
                    | Opcode::LocalFiles => (0, Bytes::new()),
                    _ => (length, Bytes::new()),
                };
                Request { opcode, flags, tag, offset, length, generation, crc, data }
            })
    }

    fn rebuild() -> impl Strategy<Value = RebuildMark> {
        (any::<u64>(), prop::collection::btree_map(0u64..u64::MAX, any::<u64>(), 0..MAX_PIECES), any::<u64>())
            .prop_map(|(progress, ends, last)| {
                let mut pieces: Vec<(u64, u64)> = ends.into_iter().collect();
                pieces.truncate(MAX_PIECES - 1);
                pieces.push((u64::MAX, last));
                RebuildMark { progress, pieces }
            })
    }

    fn meta() -> impl Strategy<Value = ReplicaMeta> {
        (
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            prop::collection::vec(any::<u64>(), 0..MAX_MEMBERS),
            proptest::option::of(rebuild()),
        )
            .prop_map(|(store_id, region_size, generation, epoch, clean, members, rebuild)| {
                ReplicaMeta {
                    store_id,
                    region_size,
                    membership: Membership { generation, epoch, clean, members },
                    rebuild,
                }
            })
    }

    #[test]
    fn block_crcs_come_only_with_shared_block_aligned_writes() {
        let shared = |flags: u8, offset: u64, length: u64| {
            let data = Bytes::from(vec![0u8; crate::shm::REF_LEN + block_crcs_len(length)]);
            let r = Request { flags, offset, length, data, ..Request::simple(Opcode::Write, 1, 0, 0) };
            decode_request(&mut encode_request(&r))
        };
        let both = FLAG_SHM | FLAG_BLOCK_CRCS;
        let ok = shared(both, 8192, 3 * 4096).unwrap().unwrap();
        assert_eq!((ok.length, ok.data.len()), (3 * 4096, crate::shm::REF_LEN + 12));
        let frame = encode_request(&Request { data: ok.data.clone(), ..ok.clone() });
        assert_eq!(request_frame_len(&frame), Some(frame.len()));
        assert!(matches!(shared(FLAG_BLOCK_CRCS, 0, 4096), Err(WireError::BadFlags { .. })), "not shared");
        assert!(matches!(shared(both | FLAG_CRC, 0, 4096), Err(WireError::BadFlags { .. })), "with a crc");
        assert!(matches!(shared(both, 512, 4096), Err(WireError::Malformed(_))), "unaligned offset");
        assert!(matches!(shared(both, 0, 4096 + 512), Err(WireError::Malformed(_))), "unaligned length");
        assert!(matches!(shared(both, 0, 0), Err(WireError::Malformed(_))), "empty");
        let huge = u64::from(MAX_IO_BYTES) + 4096;
        assert!(matches!(shared(both, 0, huge), Err(WireError::TooLarge(_))), "too large");
        let r = Request { flags: both, length: huge, ..Request::simple(Opcode::Write, 1, 0, 0) };
        assert_eq!(request_frame_len(&encode_request(&r)), None, "no room made for it");
        let r = Request { flags: both, length: 4096, ..Request::simple(Opcode::Read, 1, 0, 0) };
        assert!(decode_request(&mut encode_request(&r)).is_err(), "a read");
    }

    #[test]
    fn only_writes_fan_out() {
        let data = Bytes::from(vec![7u8; 4096]);
        let w =
            Request { flags: FLAG_FAN_OUT | FLAG_FUA, data, ..Request::simple(Opcode::Write, 3, 8192, 4096) };
        assert_eq!(decode_request(&mut encode_request(&w)).unwrap(), Some(w));
        for op in [Opcode::Read, Opcode::Trim, Opcode::WriteZeroes, Opcode::Flush] {
            let r = Request { flags: FLAG_FAN_OUT, ..Request::simple(op, 3, 0, 4096) };
            let r = Request { length: if op == Opcode::Flush { 0 } else { 4096 }, ..r };
            assert!(
                matches!(decode_request(&mut encode_request(&r)), Err(WireError::BadFlags { .. })),
                "{op:?}"
            );
        }
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
            let r = HelloReply { version: 1, status: 9, size, epoch, flags: 3, volume: name, message: "stale epoch".into(), meta: None };
            let mut b = BytesMut::new();
            encode_hello_reply(&r, &mut b);
            prop_assert_eq!(decode_hello_reply(&mut b).unwrap(), Some(r));
        }

        #[test]
        fn hello_reply_with_meta_round_trips(m in meta(), name in "[a-z]{1,20}") {
            let r = HelloReply { version: 2, status: 0, size: 4096, epoch: 3, flags: 2, volume: name, message: String::new(), meta: Some(m) };
            let mut b = BytesMut::new();
            encode_hello_reply(&r, &mut b);
            for cut in [0, HELLO_REPLY_LEN, b.len() - 1] {
                prop_assert_eq!(decode_hello_reply(&mut BytesMut::from(&b[..cut])).unwrap(), None);
            }
            prop_assert_eq!(decode_hello_reply(&mut b).unwrap(), Some(r));
        }

        #[test]
        fn meta_round_trips(m in meta()) {
            prop_assert_eq!(decode_meta(&encode_meta(&m)).unwrap(), m.clone());
            let mut b = BytesMut::new();
            encode_membership(&m.membership, &mut b);
            prop_assert_eq!(decode_membership(&b).unwrap(), m.membership.clone());
            if let Some(r) = &m.rebuild {
                let mut b = BytesMut::new();
                encode_rebuild(r, &mut b);
                prop_assert_eq!(&decode_rebuild(&b).unwrap(), r);
            }
        }

        #[test]
        fn meta_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_meta(&bytes);
            let _ = decode_membership(&bytes);
            let _ = decode_rebuild(&bytes);
            let _ = decode_stamps(&bytes);
        }

        #[test]
        fn truncated_meta_is_refused(m in meta(), cut in any::<prop::sample::Index>()) {
            let bytes = encode_meta(&m);
            prop_assert!(decode_meta(&bytes[..cut.index(bytes.len())]).is_err());
        }

        #[test]
        fn resumed_marks_never_copy_less(m in rebuild(), generation in any::<u64>(), r in any::<u64>()) {
            let next = m.resumed(generation);
            prop_assert!(next.is_valid());
            // Regions not yet copied keep (at most) their threshold; copied
            // ones need at most what came from `generation` on.
            let want = if r < m.progress { generation.max(m.threshold(0)) } else { m.threshold(r) };
            prop_assert!(next.threshold(r) <= want);
        }

        #[test]
        fn stamps_round_trip(v in prop::collection::vec(any::<u64>(), 0..100)) {
            prop_assert_eq!(decode_stamps(&encode_stamps(&v)).unwrap(), v);
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
            let mut b = BytesMut::new();
            b.put_u32(HELLO_REPLY_MAGIC);
            b.put_slice(&bytes);
            let _ = decode_hello_reply(&mut b);
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
        let base = Request::simple(Opcode::Read, 1, 0, 4096);
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
        let mut b = encode_request(&base);
        b[47] = 1;
        assert_eq!(decode_request(&mut b), Err(WireError::Reserved));
        let mut b = encode_request(&Request { opcode: Opcode::SetRebuild, length: 0, ..base.clone() });
        b[24..32].copy_from_slice(&(MAX_META_LEN as u64 + 1).to_be_bytes());
        assert!(matches!(decode_request(&mut b), Err(WireError::TooLarge(_))));
    }

    #[test]
    fn error_responses_carry_kind() {
        let e = Error::new(ErrorKind::Corrupt, "x".repeat(5000));
        let r = Response::error(7, &e);
        assert!(r.payload.len() <= MAX_MESSAGE_LEN);
        assert_eq!(r.into_result().unwrap_err().kind(), ErrorKind::Corrupt);
    }

    proptest! {
        #[test]
        fn snapshot_lists_round_trip(list in prop::collection::vec(
            ("[a-z0-9._-]{1,64}", any::<u64>(), any::<u64>(), any::<bool>(), any::<bool>()), 0..20)) {
            let list: Vec<SnapshotEntry> = list
                .into_iter()
                .map(|(name, created_ms, allocated_bytes, system, merging)| SnapshotEntry {
                    name, created_ms, allocated_bytes, system, merging,
                })
                .collect();
            prop_assert_eq!(decode_snapshots(&encode_snapshots(&list)).unwrap(), list);
        }

        #[test]
        fn snapshot_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_snapshots(&bytes);
            let _ = decode_snap_target(&bytes);
            let _ = decode_snap_name(&bytes);
        }

        #[test]
        fn snap_targets_round_trip(length in any::<u64>(), name in "[a-z0-9._-]{1,64}") {
            let t = SnapTarget { length, name };
            prop_assert_eq!(decode_snap_target(&encode_snap_target(&t)).unwrap(), t);
        }
    }

    #[test]
    fn local_files_answers_name_at_least_one_layer_and_a_plain_flag() {
        let answer = LocalFilesAnswer { layers: 3, whole: true };
        assert_eq!(LocalFilesAnswer::decode(&answer.encode()), Ok(answer));
        let partial = LocalFilesAnswer { layers: 1, whole: false };
        assert_eq!(LocalFilesAnswer::decode(&partial.encode()), Ok(partial));
        for bad in [&[0u8, 1][..], &[2, 2], &[2], &[2, 1, 0], &[]] {
            assert!(LocalFilesAnswer::decode(bad).is_err(), "{bad:?} accepted");
        }
    }
}
