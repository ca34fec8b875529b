//! The TCMU command ring (see `linux/target_core_user.h`).
//!
//! The map starts with the mailbox; the command ring lies at
//! `mailbox.cmdr_off` for `cmdr_size` bytes, and the data area follows it to
//! the end of the map. The kernel appends entries at `cmd_head` (a PAD entry
//! fills the ring's end so that no entry wraps); the handler reads them with
//! its own cursor and completes commands by writing responses at
//! `cmd_tail`, in completion order (out-of-order completion: the response
//! names the command by id), then advances `cmd_tail` and kicks the kernel.
//!
//! Everything read from the map is untrusted: offsets and lengths are
//! checked against the ring or the data area before any access, and all
//! accesses are bounds-checked volatile reads and writes of the mapping.

use std::mem::offset_of;
use std::sync::atomic::{Ordering, fence};

use tcmu_sys::{
    TCMU_MAILBOX_VERSION, TCMU_OP_CMD, TCMU_OP_MASK, TCMU_OP_PAD, TCMU_OP_TMR, TCMU_SENSE_BUFFERSIZE,
    tcmu_cmd_entry, tcmu_cmd_entry__bindgen_ty_1__bindgen_ty_1 as Req,
    tcmu_cmd_entry__bindgen_ty_1__bindgen_ty_2 as Rsp, tcmu_cmd_entry_hdr, tcmu_mailbox,
};

/// Largest CDB we accept (variable-length CDBs top out well below this).
pub const MAX_CDB_LEN: usize = 260;
/// Most iovecs one command may carry.
pub const MAX_IOVECS: u32 = 4096;

const HDR_LEN_OP: usize = offset_of!(tcmu_cmd_entry_hdr, len_op);
const HDR_CMD_ID: usize = offset_of!(tcmu_cmd_entry_hdr, cmd_id);
const BODY: usize = offset_of!(tcmu_cmd_entry, __bindgen_anon_1);
const REQ_IOV_CNT: usize = BODY + offset_of!(Req, iov_cnt);
const REQ_IOV_BIDI_CNT: usize = BODY + offset_of!(Req, iov_bidi_cnt);
const REQ_CDB_OFF: usize = BODY + offset_of!(Req, cdb_off);
const REQ_IOV: usize = BODY + offset_of!(Req, iov);
const RSP_STATUS: usize = BODY + offset_of!(Rsp, scsi_status);
const RSP_SENSE: usize = BODY + offset_of!(Rsp, sense_buffer);
const ENTRY_MIN: usize = size_of::<tcmu_cmd_entry>();
/// `struct iovec` on the ring: base (an offset into the map) and length.
const IOVEC_LEN: usize = 16;
const ENTRY_ALIGN: u32 = 8;

/// What is wrong with the ring or an entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("mailbox version {0} is not supported")]
    Version(u16),
    #[error("command ring {off}+{size} does not fit a map of {map} bytes")]
    Layout { off: u32, size: u32, map: usize },
    #[error("entry at {at} has invalid length {len}")]
    EntryLength { at: u32, len: u32 },
    #[error("cursor {0} is outside the command ring")]
    Cursor(u32),
    #[error("unknown entry opcode {0}")]
    Opcode(u32),
    #[error("command {cmd_id}: {what}")]
    Command { cmd_id: u16, what: &'static str },
    #[error("no room to complete a command")]
    NoRoom,
}

/// A mapped region, accessed only through bounds-checked volatile copies.
#[derive(Debug)]
pub struct Map {
    base: *mut u8,
    len: usize,
}

// SAFETY: Map only does volatile, bounds-checked accesses through the raw
// pointer; the region stays mapped for the Map's lifetime (see `new`).
unsafe impl Send for Map {}

impl Map {
    /// # Safety
    /// `base..base+len` must be a readable and writable mapping that stays
    /// valid for the lifetime of the `Map`; other parties (the kernel) may
    /// change it concurrently, which volatile access tolerates.
    pub unsafe fn new(base: *mut u8, len: usize) -> Map {
        Map { base, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, at: usize, n: usize) -> Option<()> {
        (at.checked_add(n)? <= self.len).then_some(())
    }

    /// Copies `out.len()` bytes at `at`; `None` if out of bounds.
    pub fn read(&self, at: usize, out: &mut [u8]) -> Option<()> {
        self.check(at, out.len())?;
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: at + i < len, checked above; the mapping is valid (new).
            *b = unsafe { self.base.add(at + i).read_volatile() };
        }
        Some(())
    }

    /// Writes `data` at `at`; `None` if out of bounds.
    pub fn write(&self, at: usize, data: &[u8]) -> Option<()> {
        self.check(at, data.len())?;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: at + i < len, checked above; the mapping is valid (new).
            unsafe { self.base.add(at + i).write_volatile(*b) };
        }
        Some(())
    }

    fn u16_at(&self, at: usize) -> Option<u16> {
        let mut b = [0u8; 2];
        self.read(at, &mut b)?;
        Some(u16::from_ne_bytes(b))
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        let mut b = [0u8; 4];
        self.read(at, &mut b)?;
        Some(u32::from_ne_bytes(b))
    }

    fn u64_at(&self, at: usize) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(at, &mut b)?;
        Some(u64::from_ne_bytes(b))
    }
}

/// A piece of the data area a command reads from or writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Offset from the start of the map (inside the data area).
    pub offset: usize,
    pub len: usize,
}

/// One SCSI command taken off the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub cmd_id: u16,
    pub cdb: Vec<u8>,
    /// Data buffers, in order (data-out for writes, data-in for reads).
    pub iov: Vec<Segment>,
}

/// What the ring yielded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Command(Command),
    /// A command the kernel sent malformed: complete it with an error.
    Malformed {
        cmd_id: u16,
        error: RingError,
    },
}

/// The handler's view of one device's ring.
#[derive(Debug)]
pub struct Ring {
    map: Map,
    cmdr_off: u32,
    cmdr_size: u32,
    data_off: usize,
    /// Where the next unread entry starts (relative to the ring).
    cursor: u32,
}

impl Ring {
    /// Validates the mailbox and the ring layout of `map`.
    pub fn open(map: Map) -> Result<Ring, RingError> {
        let bad = RingError::Layout { off: 0, size: 0, map: map.len() };
        let version = map.u16_at(offset_of!(tcmu_mailbox, version)).ok_or(bad.clone())?;
        if u32::from(version) != TCMU_MAILBOX_VERSION {
            return Err(RingError::Version(version));
        }
        let off = map.u32_at(offset_of!(tcmu_mailbox, cmdr_off)).ok_or(bad.clone())?;
        let size = map.u32_at(offset_of!(tcmu_mailbox, cmdr_size)).ok_or(bad)?;
        let layout = RingError::Layout { off, size, map: map.len() };
        let end = (off as usize).checked_add(size as usize).ok_or(layout.clone())?;
        if (off as usize) < size_of::<tcmu_mailbox>() || size == 0 || end > map.len() {
            return Err(layout);
        }
        let cursor = map.u32_at(offset_of!(tcmu_mailbox, cmd_tail)).ok_or(layout.clone())?;
        if cursor >= size {
            return Err(RingError::Cursor(cursor));
        }
        Ok(Ring { map, cmdr_off: off, cmdr_size: size, data_off: end, cursor })
    }

    pub fn map(&self) -> &Map {
        &self.map
    }

    fn head(&self) -> u32 {
        // The kernel publishes entries before moving cmd_head; read the head
        // first, then the entries.
        let head = self.map.u32_at(offset_of!(tcmu_mailbox, cmd_head)).unwrap_or(0);
        fence(Ordering::Acquire);
        head
    }

    fn tail(&self) -> u32 {
        self.map.u32_at(offset_of!(tcmu_mailbox, cmd_tail)).unwrap_or(0)
    }

    /// Takes every entry the kernel has added since the last call. An error
    /// means the ring itself is corrupt and the device must be dropped.
    pub fn poll(&mut self) -> Result<Vec<Entry>, RingError> {
        let head = self.head();
        if head >= self.cmdr_size {
            return Err(RingError::Cursor(head));
        }
        if !head.is_multiple_of(ENTRY_ALIGN) {
            return Err(RingError::Cursor(head));
        }
        let mut out = Vec::new();
        while self.cursor != head {
            let at = self.cursor;
            let ent = self.cmdr_off as usize + at as usize;
            let len_op = self.map.u32_at(ent + HDR_LEN_OP).ok_or(RingError::Cursor(at))?;
            let (op, len) = (len_op & TCMU_OP_MASK, len_op & !TCMU_OP_MASK);
            self.check_entry(at, len, head)?;
            match op {
                TCMU_OP_PAD | TCMU_OP_TMR => {}
                TCMU_OP_CMD => {
                    let cmd_id = self.map.u16_at(ent + HDR_CMD_ID).ok_or(RingError::Cursor(at))?;
                    out.push(match self.parse_command(ent, len as usize, cmd_id) {
                        Ok(cmd) => Entry::Command(cmd),
                        Err(error) => Entry::Malformed { cmd_id, error },
                    });
                }
                other => return Err(RingError::Opcode(other)),
            }
            self.cursor = (at + len) % self.cmdr_size;
        }
        Ok(out)
    }

    /// An entry of `len` bytes at `at` must be aligned, non-empty, end
    /// inside the ring, and not step over `head`: a cursor that could miss
    /// the head would walk the ring for ever.
    fn check_entry(&self, at: u32, len: u32, head: u32) -> Result<(), RingError> {
        let end = u64::from(at) + u64::from(len);
        if len == 0 || !len.is_multiple_of(ENTRY_ALIGN) || end > u64::from(self.cmdr_size) {
            return Err(RingError::EntryLength { at, len });
        }
        if at < head && u64::from(head) < end {
            return Err(RingError::EntryLength { at, len });
        }
        Ok(())
    }

    fn parse_command(&self, ent: usize, len: usize, cmd_id: u16) -> Result<Command, RingError> {
        let bad = |what| RingError::Command { cmd_id, what };
        if len < ENTRY_MIN {
            return Err(bad("entry shorter than a command"));
        }
        let read32 = |at| self.map.u32_at(ent + at).ok_or(bad("entry outside the map"));
        let iov_cnt = read32(REQ_IOV_CNT)?;
        let bidi = read32(REQ_IOV_BIDI_CNT)?;
        if iov_cnt > MAX_IOVECS || bidi > MAX_IOVECS {
            return Err(bad("too many iovecs"));
        }
        let total = (iov_cnt + bidi) as usize;
        if REQ_IOV + total * IOVEC_LEN > len {
            return Err(bad("iovecs run past the entry"));
        }
        let mut iov = Vec::with_capacity(iov_cnt as usize);
        for i in 0..iov_cnt as usize {
            let at = ent + REQ_IOV + i * IOVEC_LEN;
            let base = self.map.u64_at(at).ok_or(bad("iovec outside the map"))?;
            let n = self.map.u64_at(at + 8).ok_or(bad("iovec outside the map"))?;
            let (base, n) = (usize::try_from(base), usize::try_from(n));
            let (Ok(offset), Ok(len)) = (base, n) else { return Err(bad("iovec out of range")) };
            match offset.checked_add(len) {
                Some(end) if offset >= self.data_off && end <= self.map.len() => {}
                _ => return Err(bad("iovec outside the data area")),
            }
            iov.push(Segment { offset, len });
        }
        // The CDB sits in the command ring, after the iovecs.
        let cdb_off = self.map.u64_at(ent + REQ_CDB_OFF).ok_or(bad("entry outside the map"))?;
        let cdb_off = usize::try_from(cdb_off).map_err(|_| bad("CDB out of range"))?;
        let ring = self.cmdr_off as usize..self.data_off;
        if !ring.contains(&cdb_off) {
            return Err(bad("CDB outside the command ring"));
        }
        let mut opcode = [0u8; 1];
        self.map.read(cdb_off, &mut opcode).ok_or(bad("CDB outside the map"))?;
        let cdb_len = cdb_length(opcode[0], |at| {
            let mut b = [0u8; 1];
            self.map.read(cdb_off + at, &mut b).map(|_| b[0])
        })
        .ok_or(bad("unreadable CDB"))?;
        if cdb_len > MAX_CDB_LEN || cdb_off + cdb_len > ring.end {
            return Err(bad("CDB runs past the command ring"));
        }
        let mut cdb = vec![0u8; cdb_len];
        self.map.read(cdb_off, &mut cdb).ok_or(bad("CDB outside the map"))?;
        Ok(Command { cmd_id, cdb, iov })
    }

    /// Copies a command's data-out buffers into `out`, which is as long
    /// as they are together.
    pub fn gather(&self, iov: &[Segment], out: &mut [u8]) {
        let mut pos = 0;
        for s in iov {
            // Segments were validated against the map when parsed.
            let _ = self.map.read(s.offset, &mut out[pos..pos + s.len]);
            pos += s.len;
        }
    }

    /// Copies `data` into a command's data-in buffers; returns bytes copied.
    pub fn scatter(&self, iov: &[Segment], mut data: &[u8]) -> usize {
        let mut copied = 0;
        for s in iov {
            if data.is_empty() {
                break;
            }
            let n = s.len.min(data.len());
            let _ = self.map.write(s.offset, &data[..n]);
            data = &data[n..];
            copied += n;
        }
        copied
    }

    /// Completes command `cmd_id` with SCSI `status` and `sense` by writing
    /// the response into the entry at `cmd_tail` (skipping PAD and TMR
    /// entries) and advancing `cmd_tail`. The caller kicks the kernel.
    pub fn complete(&mut self, cmd_id: u16, status: u8, sense: &[u8]) -> Result<(), RingError> {
        let head = self.head();
        let mut tail = self.tail();
        loop {
            if tail == head
                || tail >= self.cmdr_size
                || !tail.is_multiple_of(ENTRY_ALIGN)
                || !head.is_multiple_of(ENTRY_ALIGN)
            {
                return Err(RingError::NoRoom);
            }
            let ent = self.cmdr_off as usize + tail as usize;
            let len_op = self.map.u32_at(ent + HDR_LEN_OP).ok_or(RingError::Cursor(tail))?;
            let (op, len) = (len_op & TCMU_OP_MASK, len_op & !TCMU_OP_MASK);
            self.check_entry(tail, len, head)?;
            if op != TCMU_OP_CMD {
                tail = (tail + len) % self.cmdr_size;
                continue;
            }
            if (len as usize) < ENTRY_MIN {
                return Err(RingError::EntryLength { at: tail, len });
            }
            let mut sense_buf = [0u8; TCMU_SENSE_BUFFERSIZE as usize];
            let n = sense.len().min(sense_buf.len());
            sense_buf[..n].copy_from_slice(&sense[..n]);
            self.map.write(ent + HDR_CMD_ID, &cmd_id.to_ne_bytes()).ok_or(RingError::Cursor(tail))?;
            self.map.write(ent + RSP_STATUS, &[status]).ok_or(RingError::Cursor(tail))?;
            self.map.write(ent + RSP_SENSE, &sense_buf).ok_or(RingError::Cursor(tail))?;
            // The response must be visible before the kernel sees the tail move.
            fence(Ordering::Release);
            let next = (tail + len) % self.cmdr_size;
            self.map
                .write(offset_of!(tcmu_mailbox, cmd_tail), &next.to_ne_bytes())
                .ok_or(RingError::Cursor(tail))?;
            return Ok(());
        }
    }
}

/// Length of the CDB starting with `opcode` (SPC-4 groups); `byte` reads
/// further CDB bytes for variable-length CDBs.
pub fn cdb_length(opcode: u8, byte: impl Fn(usize) -> Option<u8>) -> Option<usize> {
    Some(match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        // Group 3: 0x7F is variable length (ADDITIONAL CDB LENGTH in byte 7).
        3 if opcode == 0x7f => 8 + usize::from(byte(7)?),
        _ => 16,
    })
}

#[cfg(test)]
pub(crate) mod tests;
