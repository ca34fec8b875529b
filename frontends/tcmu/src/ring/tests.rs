//! Ring tests against a memfd mapping standing in for the uio map, with a
//! fake kernel that appends entries the way target_core_user does.

use proptest::prelude::*;

use super::*;

pub(crate) const MAP_LEN: usize = 64 * 1024;
pub(crate) const CMDR_OFF: u32 = 128;
pub(crate) const CMDR_SIZE: u32 = 4096;
pub(crate) const DATA_OFF: usize = (CMDR_OFF + CMDR_SIZE) as usize;

/// A memfd mapping, unmapped on drop.
pub(crate) struct Memfd {
    base: *mut u8,
    len: usize,
}

impl Memfd {
    pub(crate) fn new(len: usize) -> Memfd {
        // SAFETY: plain memfd_create/ftruncate/mmap calls; results checked.
        unsafe {
            let fd = libc::memfd_create(c"tcmu-test".as_ptr(), 0);
            assert!(fd >= 0, "memfd_create");
            assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            libc::close(fd);
            Memfd { base: p.cast(), len }
        }
    }

    pub(crate) fn map(&self) -> Map {
        // SAFETY: the mapping outlives every Map made in a test (Memfd is
        // dropped last) and is read-write.
        unsafe { Map::new(self.base, self.len) }
    }
}

impl Drop for Memfd {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Plays the kernel's side: appends entries at cmd_head.
pub(crate) struct Kernel {
    pub(crate) map: Map,
    pub(crate) head: u32,
}

impl Kernel {
    pub(crate) fn new(mem: &Memfd) -> Kernel {
        let map = mem.map();
        map.write(offset_of!(tcmu_mailbox, version), &(TCMU_MAILBOX_VERSION as u16).to_ne_bytes()).unwrap();
        map.write(offset_of!(tcmu_mailbox, cmdr_off), &CMDR_OFF.to_ne_bytes()).unwrap();
        map.write(offset_of!(tcmu_mailbox, cmdr_size), &CMDR_SIZE.to_ne_bytes()).unwrap();
        Kernel { map, head: 0 }
    }

    pub(crate) fn publish(&mut self, next: u32) {
        self.head = next % CMDR_SIZE;
        self.map.write(offset_of!(tcmu_mailbox, cmd_head), &self.head.to_ne_bytes()).unwrap();
    }

    pub(crate) fn entry_at(&self, at: u32) -> usize {
        CMDR_OFF as usize + at as usize
    }

    pub(crate) fn pad(&mut self, len: u32) {
        let at = self.entry_at(self.head);
        self.map.write(at + HDR_LEN_OP, &(len | TCMU_OP_PAD).to_ne_bytes()).unwrap();
        self.publish(self.head + len);
    }

    /// Appends a command; wraps with a PAD if it does not fit before the end.
    pub(crate) fn command(&mut self, cmd_id: u16, cdb: &[u8], iov: &[(u64, u64)]) -> u32 {
        let body = REQ_IOV + iov.len() * IOVEC_LEN + cdb.len();
        let len = (body.max(ENTRY_MIN) as u32).div_ceil(ENTRY_ALIGN) * ENTRY_ALIGN;
        if self.head + len > CMDR_SIZE {
            self.pad(CMDR_SIZE - self.head);
        }
        let at = self.entry_at(self.head);
        let m = &self.map;
        m.write(at + HDR_LEN_OP, &(len | TCMU_OP_CMD).to_ne_bytes()).unwrap();
        m.write(at + HDR_CMD_ID, &cmd_id.to_ne_bytes()).unwrap();
        m.write(at + REQ_IOV_CNT, &(iov.len() as u32).to_ne_bytes()).unwrap();
        m.write(at + REQ_IOV_BIDI_CNT, &0u32.to_ne_bytes()).unwrap();
        for (i, (base, n)) in iov.iter().enumerate() {
            m.write(at + REQ_IOV + i * IOVEC_LEN, &base.to_ne_bytes()).unwrap();
            m.write(at + REQ_IOV + i * IOVEC_LEN + 8, &n.to_ne_bytes()).unwrap();
        }
        let cdb_at = at + REQ_IOV + iov.len() * IOVEC_LEN;
        m.write(at + REQ_CDB_OFF, &(cdb_at as u64).to_ne_bytes()).unwrap();
        m.write(cdb_at, cdb).unwrap();
        let start = self.head;
        self.publish(self.head + len);
        start
    }

    pub(crate) fn tail(&self) -> u32 {
        self.map.u32_at(offset_of!(tcmu_mailbox, cmd_tail)).unwrap()
    }

    pub(crate) fn response(&self, at: u32) -> (u16, u8, Vec<u8>) {
        let e = self.entry_at(at);
        let mut sense = vec![0u8; 18];
        self.map.read(e + RSP_SENSE, &mut sense).unwrap();
        let mut status = [0u8];
        self.map.read(e + RSP_STATUS, &mut status).unwrap();
        (self.map.u16_at(e + HDR_CMD_ID).unwrap(), status[0], sense)
    }
}

const READ10: [u8; 10] = [0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0];
const WRITE16: [u8; 16] = [0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 8, 0, 0];

#[test]
fn one_command_round_trip() {
    let mem = Memfd::new(MAP_LEN);
    let mut k = Kernel::new(&mem);
    let mut ring = Ring::open(mem.map()).unwrap();
    assert!(ring.poll().unwrap().is_empty());
    let at = k.command(7, &READ10, &[(DATA_OFF as u64, 4096)]);
    let got = ring.poll().unwrap();
    assert_eq!(
        got,
        vec![Entry::Command(Command {
            cmd_id: 7,
            cdb: READ10.to_vec(),
            iov: vec![Segment { offset: DATA_OFF, len: 4096 }]
        })]
    );
    assert_eq!(ring.scatter(&[Segment { offset: DATA_OFF, len: 4096 }], &[0xab; 4096]), 4096);
    let mut back = vec![0u8; 4096];
    mem.map().read(DATA_OFF, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0xab));
    ring.complete(7, 0, &[]).unwrap();
    assert_eq!(k.response(at).0, 7);
    assert_eq!(k.tail(), k.head, "tail caught up with head");
    assert_eq!(ring.complete(8, 0, &[]), Err(RingError::NoRoom));
}

#[test]
fn out_of_order_completions_land_in_tail_order() {
    let mem = Memfd::new(MAP_LEN);
    let mut k = Kernel::new(&mem);
    let mut ring = Ring::open(mem.map()).unwrap();
    let slots: Vec<u32> = (1..=3)
        .map(|id| k.command(id, &WRITE16, &[(DATA_OFF as u64 + 8192 * u64::from(id), 8192)]))
        .collect();
    assert_eq!(ring.poll().unwrap().len(), 3);
    let sense = [0x70, 0, 0x03, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x11, 0, 0, 0, 0, 0];
    ring.complete(3, 0x02, &sense).unwrap();
    ring.complete(1, 0, &[]).unwrap();
    let (id, status, got_sense) = k.response(slots[0]);
    assert_eq!((id, status), (3, 0x02));
    assert_eq!(got_sense, sense);
    assert_eq!(k.response(slots[1]).0, 1);
    assert_eq!(k.tail(), slots[2]);
    ring.complete(2, 0, &[]).unwrap();
    assert_eq!(k.tail(), k.head);
}

#[test]
fn ring_wraps_over_pad_entries() {
    let mem = Memfd::new(MAP_LEN);
    let mut k = Kernel::new(&mem);
    let mut ring = Ring::open(mem.map()).unwrap();
    // Enough commands to go around the 4 KiB ring several times.
    for id in 0..200u16 {
        let iov = [(DATA_OFF as u64, 512), (DATA_OFF as u64 + 4096, 512)];
        k.command(id, &READ10, &iov);
        let got = ring.poll().unwrap();
        assert_eq!(got.len(), 1, "command {id}");
        let Entry::Command(cmd) = &got[0] else { panic!("malformed {got:?}") };
        assert_eq!((cmd.cmd_id, cmd.iov.len()), (id, 2));
        ring.complete(id, 0, &[]).unwrap();
        assert_eq!(k.tail(), k.head);
    }
}

#[test]
fn gather_joins_segments() {
    let mem = Memfd::new(MAP_LEN);
    let map = mem.map();
    map.write(DATA_OFF, &[1; 100]).unwrap();
    map.write(DATA_OFF + 1000, &[2; 50]).unwrap();
    let _k = Kernel::new(&mem);
    let ring = Ring::open(mem.map()).unwrap();
    let segs = [Segment { offset: DATA_OFF, len: 100 }, Segment { offset: DATA_OFF + 1000, len: 50 }];
    let mut v = vec![0u8; segs.iter().map(|s| s.len).sum()];
    ring.gather(&segs, &mut v);
    assert_eq!(v.len(), 150);
    assert!(v[..100].iter().all(|&b| b == 1) && v[100..].iter().all(|&b| b == 2));
}

#[test]
fn malformed_commands_are_reported_not_followed() {
    let mem = Memfd::new(MAP_LEN);
    let mut k = Kernel::new(&mem);
    let mut ring = Ring::open(mem.map()).unwrap();
    // An iovec in the command ring, one past the map, one overflowing.
    k.command(1, &READ10, &[(CMDR_OFF as u64, 16)]);
    k.command(2, &READ10, &[(MAP_LEN as u64 - 10, 4096)]);
    k.command(3, &READ10, &[(u64::MAX - 1, 4)]);
    // A CDB pointer into the data area.
    let at = k.command(4, &READ10, &[]);
    k.map.write(k.entry_at(at) + REQ_CDB_OFF, &(DATA_OFF as u64).to_ne_bytes()).unwrap();
    // A huge iovec count.
    let at = k.command(5, &READ10, &[]);
    k.map.write(k.entry_at(at) + REQ_IOV_CNT, &u32::MAX.to_ne_bytes()).unwrap();
    let got = ring.poll().unwrap();
    assert_eq!(got.len(), 5);
    for (i, e) in got.iter().enumerate() {
        assert!(matches!(e, Entry::Malformed { cmd_id, .. } if usize::from(*cmd_id) == i + 1), "{e:?}");
    }
}

#[test]
fn corrupt_ring_is_an_error() {
    let mem = Memfd::new(MAP_LEN);
    let mut k = Kernel::new(&mem);
    let mut ring = Ring::open(mem.map()).unwrap();
    // A zero-length entry would loop forever if followed.
    let at = k.command(1, &READ10, &[]);
    k.map.write(k.entry_at(at) + HDR_LEN_OP, &TCMU_OP_CMD.to_ne_bytes()).unwrap();
    assert!(matches!(ring.poll(), Err(RingError::EntryLength { .. })));

    let mem = Memfd::new(MAP_LEN);
    let mut k = Kernel::new(&mem);
    let mut ring = Ring::open(mem.map()).unwrap();
    k.map.write(offset_of!(tcmu_mailbox, cmd_head), &(CMDR_SIZE + 8).to_ne_bytes()).unwrap();
    assert!(matches!(ring.poll(), Err(RingError::Cursor(_))));
    k.publish(0);
    // An entry claiming to run past the ring's end.
    let at = k.command(2, &READ10, &[]);
    k.map.write(k.entry_at(at) + HDR_LEN_OP, &((CMDR_SIZE * 2) | TCMU_OP_CMD).to_ne_bytes()).unwrap();
    assert!(matches!(ring.poll(), Err(RingError::EntryLength { .. })));
}

#[test]
fn bad_mailboxes_are_refused() {
    let mem = Memfd::new(MAP_LEN);
    let map = mem.map();
    assert!(matches!(Ring::open(mem.map()), Err(RingError::Version(0))));
    map.write(offset_of!(tcmu_mailbox, version), &2u16.to_ne_bytes()).unwrap();
    map.write(offset_of!(tcmu_mailbox, cmdr_off), &128u32.to_ne_bytes()).unwrap();
    map.write(offset_of!(tcmu_mailbox, cmdr_size), &(MAP_LEN as u32).to_ne_bytes()).unwrap();
    assert!(matches!(Ring::open(mem.map()), Err(RingError::Layout { .. })));
    map.write(offset_of!(tcmu_mailbox, cmdr_off), &8u32.to_ne_bytes()).unwrap();
    map.write(offset_of!(tcmu_mailbox, cmdr_size), &4096u32.to_ne_bytes()).unwrap();
    assert!(matches!(Ring::open(mem.map()), Err(RingError::Layout { .. })), "ring overlapping the mailbox");
}

#[test]
fn variable_length_cdb() {
    assert_eq!(cdb_length(0x7f, |at| (at == 7).then_some(24)), Some(32));
    assert_eq!(cdb_length(0x00, |_| None), Some(6));
    assert_eq!(cdb_length(0x88, |_| None), Some(16));
    assert_eq!(cdb_length(0xa0, |_| None), Some(12));
}

#[test]
fn a_head_the_cursor_would_skip_is_an_error_not_a_hang() {
    let mem = Memfd::new(MAP_LEN);
    let mut k = Kernel::new(&mem);
    let mut ring = Ring::open(mem.map()).unwrap();
    k.command(1, &READ10, &[]);
    // The head moves into the middle of that entry.
    k.map.write(offset_of!(tcmu_mailbox, cmd_head), &64u32.to_ne_bytes()).unwrap();
    assert!(matches!(ring.poll(), Err(RingError::EntryLength { .. })));
    k.map.write(offset_of!(tcmu_mailbox, cmd_head), &12u32.to_ne_bytes()).unwrap();
    assert!(matches!(ring.poll(), Err(RingError::Cursor(12))));
}

proptest! {
    /// Whatever the kernel (or an attacker with the map) writes into the
    /// ring, parsing never panics and never reads outside the map.
    #[test]
    fn garbage_rings_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096), head in 0u32..4200, tail in 0u32..4096) {
        let mem = Memfd::new(MAP_LEN);
        let k = Kernel::new(&mem);
        k.map.write(CMDR_OFF as usize, &bytes).unwrap();
        k.map.write(offset_of!(tcmu_mailbox, cmd_tail), &tail.to_ne_bytes()).unwrap();
        if let Ok(mut ring) = Ring::open(mem.map()) {
            k.map.write(offset_of!(tcmu_mailbox, cmd_head), &head.to_ne_bytes()).unwrap();
            let _ = ring.poll();
            let _ = ring.complete(1, 0, &[0; 200]);
        }
    }
}
