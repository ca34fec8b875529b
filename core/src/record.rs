//! The per-block record a replica stores beside every 4 KiB block of a
//! layer (layout in `jiva_replica::format`). It lives here, not in the
//! replica crate, because a controller reading a local replica's head
//! itself (see [`crate::local`]) checks blocks against their records too.

use std::sync::OnceLock;

/// Bytes per block record.
pub const RECORD_SIZE: u32 = 16;
/// Record flag: the block is allocated in this layer.
pub const REC_ALLOCATED: u16 = 1;
/// Record flag: the block reads as zeros (its data is not read).
pub const REC_ZERO: u16 = 2;
const REC_KNOWN: u16 = REC_ALLOCATED | REC_ZERO;

/// Per-block metadata.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockRecord {
    pub crc: u32,
    pub flags: u16,
}

impl BlockRecord {
    /// Not allocated in this layer (the all-zero record).
    pub const UNALLOCATED: BlockRecord = BlockRecord { crc: 0, flags: 0 };

    /// Allocated, holding data with checksum `crc`.
    pub fn data(crc: u32) -> BlockRecord {
        BlockRecord { crc, flags: REC_ALLOCATED }
    }

    /// Allocated, reading as zeros.
    pub fn zero() -> BlockRecord {
        BlockRecord { crc: zero_block_crc(), flags: REC_ALLOCATED | REC_ZERO }
    }

    pub fn is_allocated(&self) -> bool {
        self.flags & REC_ALLOCATED != 0
    }

    pub fn is_zero(&self) -> bool {
        self.flags & REC_ZERO != 0
    }
}

/// Encodes `rec` into the first [`RECORD_SIZE`] bytes of `out`.
pub fn encode_record(rec: &BlockRecord, out: &mut [u8]) {
    let out = &mut out[..RECORD_SIZE as usize];
    out[..4].copy_from_slice(&rec.crc.to_le_bytes());
    out[4..6].copy_from_slice(&rec.flags.to_le_bytes());
    out[6..].fill(0);
}

/// Decodes the record in the first [`RECORD_SIZE`] bytes of `buf`; the
/// error says what is wrong with it.
pub fn decode_record(buf: &[u8]) -> Result<BlockRecord, &'static str> {
    let buf = buf.get(..RECORD_SIZE as usize).ok_or("short block record")?;
    let rec = BlockRecord {
        crc: u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]),
        flags: u16::from_le_bytes([buf[4], buf[5]]),
    };
    if buf[6..].iter().any(|&b| b != 0) {
        return Err("reserved bytes of a block record are set");
    }
    if rec.flags & !REC_KNOWN != 0 {
        return Err("unknown block record flags");
    }
    if !rec.is_allocated() && rec != BlockRecord::UNALLOCATED {
        return Err("block record without ALLOCATED is not empty");
    }
    Ok(rec)
}

/// crc32c of a block of zeros.
pub fn zero_block_crc() -> u32 {
    static CRC: OnceLock<u32> = OnceLock::new();
    *CRC.get_or_init(|| crate::crc32c(&[0u8; crate::BLOCK_SIZE as usize]))
}
