//! Parameter data the logical unit reports about itself: standard INQUIRY
//! data, the vital product data pages, READ CAPACITY data and mode pages
//! (with MODE SELECT parsing). Pure functions of the unit's identity,
//! geometry and settings.

use crate::nexus::Nexus;
use crate::sense::{Asc, Sense};

/// Logical block size presented to initiators.
pub const LOGICAL_BLOCK: u32 = 512;
/// Logical blocks per physical block (4 KiB physical), as an exponent.
pub const LBPPB_EXPONENT: u8 = 3;
/// Logical blocks per physical block.
pub const LBPPB: u32 = 1 << LBPPB_EXPONENT;
/// MAXIMUM COMPARE AND WRITE LENGTH in blocks.
pub const MAX_COMPARE_AND_WRITE: u8 = 128;
/// MAXIMUM UNMAP LBA COUNT and MAXIMUM WRITE SAME LENGTH, in blocks (512 MiB).
pub const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
/// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// OPTIMAL TRANSFER LENGTH in blocks (1 MiB).
pub const OPTIMAL_TRANSFER_BLOCKS: u32 = 2048;

/// How the logical unit names itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// T10 vendor identification (up to 8 ASCII characters).
    pub vendor: String,
    /// Product identification (up to 16 ASCII characters).
    pub product: String,
    /// Product revision level (up to 4 ASCII characters).
    pub revision: String,
    /// Unit serial number (ASCII).
    pub serial: String,
    /// 60-bit value of the NAA locally-assigned designator.
    pub naa: u64,
}

impl Identity {
    /// An identity derived from the volume name, stable across restarts
    /// (initiators and multipath recognise the volume by it).
    pub fn for_volume(name: &str) -> Identity {
        // FNV-1a: stable, no dependency, good enough to tell volumes apart.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let version = env!("CARGO_PKG_VERSION");
        Identity {
            vendor: "JIVA".into(),
            product: "VOLUME".into(),
            revision: version
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(4)
                .collect::<String>()
                .trim_end_matches('.')
                .into(),
            serial: format!("{h:016x}"),
            naa: h & 0x0fff_ffff_ffff_ffff,
        }
    }
}

/// Space-padded ASCII field of exactly `n` bytes (non-printable characters
/// become spaces).
fn ascii(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> =
        s.bytes().map(|b| if (0x20..0x7f).contains(&b) { b } else { b' ' }).take(n).collect();
    v.resize(n, b' ');
    v
}

/// Standard INQUIRY data (96 bytes: SPC-4, SAM-5, iSCSI and SBC-3 version
/// descriptors; command queueing; no removable medium).
pub fn standard_inquiry(id: &Identity) -> Vec<u8> {
    let mut b = vec![0u8; 96];
    b[0] = 0x00; // connected, direct-access block device
    b[2] = 0x06; // SPC-4
    b[3] = 0x02 | 0x10; // response data format 2, HISUP
    b[4] = (b.len() - 5) as u8;
    b[7] = 0x02; // CMDQUE
    b[8..16].copy_from_slice(&ascii(&id.vendor, 8));
    b[16..32].copy_from_slice(&ascii(&id.product, 16));
    b[32..36].copy_from_slice(&ascii(&id.revision, 4));
    for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
        // SAM-5, iSCSI, SPC-4, SBC-3.
        b[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    b
}

/// VPD pages we serve, in ascending order.
pub const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

/// Settings that shape the VPD pages.
#[derive(Clone, Copy, Debug)]
pub struct VpdParams {
    pub thin: bool,
    pub max_transfer_blocks: u32,
}

fn vpd_page(code: u8, body: Vec<u8>) -> Vec<u8> {
    let mut b = vec![0x00, code];
    b.extend_from_slice(&(body.len() as u16).to_be_bytes());
    b.extend(body);
    b
}

/// The VPD page `code`, or `None` if we do not have it.
pub fn vpd(code: u8, id: &Identity, nexus: &Nexus, p: VpdParams) -> Option<Vec<u8>> {
    let body = match code {
        0x00 => VPD_PAGES.to_vec(),
        0x80 => ascii(&id.serial, id.serial.len()),
        0x83 => device_identification(id, nexus),
        0xb0 => {
            let mut b = vec![0u8; 0x3c];
            // WSNZ = 0: a WRITE SAME of zero blocks means "to the end".
            b[1] = MAX_COMPARE_AND_WRITE;
            b[2..4].copy_from_slice(&(LBPPB as u16).to_be_bytes()); // optimal granularity
            b[4..8].copy_from_slice(&p.max_transfer_blocks.to_be_bytes());
            b[8..12].copy_from_slice(&OPTIMAL_TRANSFER_BLOCKS.min(p.max_transfer_blocks).to_be_bytes());
            b[12..16].copy_from_slice(&0u32.to_be_bytes()); // max prefetch length: none
            if p.thin {
                b[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
                b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                b[24..28].copy_from_slice(&LBPPB.to_be_bytes()); // optimal unmap granularity
                b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
            }
            b[32..40].copy_from_slice(&u64::from(MAX_UNMAP_BLOCKS).to_be_bytes()); // max write same
            b
        }
        0xb1 => {
            let mut b = vec![0u8; 0x3c];
            b[0..2].copy_from_slice(&1u16.to_be_bytes()); // non-rotating medium
            b
        }
        0xb2 => {
            let mut b = vec![0u8; 4];
            if p.thin {
                // LBPU, LBPWS, LBPWS10, LBPRZ; thin provisioned.
                b[1] = 0x80 | 0x40 | 0x20 | 0x04;
                b[2] = 0x02;
            }
            b
        }
        _ => return None,
    };
    Some(vpd_page(code, body))
}

fn designator(code_set: u8, assoc_type: u8, protocol: Option<u8>, value: &[u8]) -> Vec<u8> {
    let mut b = vec![code_set, assoc_type, 0, value.len() as u8];
    if let Some(proto) = protocol {
        b[0] |= proto << 4;
        b[1] |= 0x80; // PIV
    }
    b.extend_from_slice(value);
    b
}

/// Device identification page (0x83): the logical unit's NAA and T10
/// vendor designators, and the target port's relative identifier and SCSI
/// name.
fn device_identification(id: &Identity, nexus: &Nexus) -> Vec<u8> {
    let mut b = Vec::new();
    // NAA 3 (locally assigned), binary, associated with the logical unit.
    let naa = (3u64 << 60) | (id.naa & 0x0fff_ffff_ffff_ffff);
    b.extend(designator(0x01, 0x03, None, &naa.to_be_bytes()));
    // T10 vendor ID based: vendor (8) + serial, ASCII.
    let mut t10 = ascii(&id.vendor, 8);
    t10.extend(ascii(&id.serial, id.serial.len()));
    b.extend(designator(0x02, 0x01, None, &t10));
    // Relative target port (association: target port).
    let rel = [0u8, 0, (nexus.target_port() >> 8) as u8, nexus.target_port() as u8];
    b.extend(designator(0x01, 0x10 | 0x04, Some(nexus.protocol()), &rel));
    // SCSI name string of the target port, UTF-8, null-terminated, padded.
    let mut name = nexus.target_port_name().as_bytes().to_vec();
    name.push(0);
    name.resize(name.len().next_multiple_of(4).min(252), 0);
    b.extend(designator(0x03, 0x10 | 0x08, Some(nexus.protocol()), &name));
    b
}

/// READ CAPACITY (10) data.
pub fn read_capacity_10(blocks: u64) -> Vec<u8> {
    let last = u32::try_from(blocks.saturating_sub(1)).unwrap_or(u32::MAX);
    let mut b = last.to_be_bytes().to_vec();
    b.extend_from_slice(&LOGICAL_BLOCK.to_be_bytes());
    b
}

/// READ CAPACITY (16) data (32 bytes).
pub fn read_capacity_16(blocks: u64, thin: bool) -> Vec<u8> {
    let mut b = vec![0u8; 32];
    b[0..8].copy_from_slice(&blocks.saturating_sub(1).to_be_bytes());
    b[8..12].copy_from_slice(&LOGICAL_BLOCK.to_be_bytes());
    b[13] = LBPPB_EXPONENT;
    if thin {
        b[14] = 0x80 | 0x40; // LBPME, LBPRZ
    }
    b
}

// ---------------------------------------------------------------------------
// Mode pages.

pub const PAGE_RW_ERROR_RECOVERY: u8 = 0x01;
pub const PAGE_CACHING: u8 = 0x08;
pub const PAGE_CONTROL: u8 = 0x0a;
pub const PAGE_INFORMATIONAL_EXCEPTIONS: u8 = 0x1c;
pub const PAGE_ALL: u8 = 0x3f;

/// Page control values of MODE SENSE.
pub const PC_CURRENT: u8 = 0;
pub const PC_CHANGEABLE: u8 = 1;
pub const PC_DEFAULT: u8 = 2;
pub const PC_SAVED: u8 = 3;

/// The mode parameters an initiator can change (shared by every nexus).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModeState {
    /// Control page D_SENSE: report sense data in descriptor format.
    pub d_sense: bool,
    /// Control page SWP: software write protect.
    pub swp: bool,
}

/// Mode pages in page-code order: (code, page).
fn mode_pages(pc: u8, st: &ModeState) -> Vec<(u8, Vec<u8>)> {
    let changeable = pc == PC_CHANGEABLE;
    let cur = if pc == PC_DEFAULT { ModeState::default() } else { *st };
    // Read-write error recovery: nothing changeable, nothing set.
    let rwer = vec![PAGE_RW_ERROR_RECOVERY, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    // Caching: WCE (the volume has a volatile cache: flush makes writes
    // durable), not changeable.
    let mut caching = vec![0u8; 20];
    caching[0] = PAGE_CACHING;
    caching[1] = 0x12;
    if !changeable {
        caching[2] = 0x04; // WCE
    }
    // Control: D_SENSE and SWP are changeable; QAM 1 (unrestricted
    // reordering: tasks are independent); TAS 0; busy timeout unlimited.
    let mut control = vec![0u8; 12];
    control[0] = PAGE_CONTROL;
    control[1] = 0x0a;
    if changeable {
        control[2] = 0x04;
        control[4] = 0x08;
    } else {
        control[2] = if cur.d_sense { 0x04 } else { 0 };
        control[3] = 0x10;
        control[4] = if cur.swp { 0x08 } else { 0 };
        control[8..10].copy_from_slice(&0xffffu16.to_be_bytes());
    }
    let mut iec = vec![0u8; 12];
    iec[0] = PAGE_INFORMATIONAL_EXCEPTIONS;
    iec[1] = 0x0a;
    vec![
        (PAGE_RW_ERROR_RECOVERY, rwer),
        (PAGE_CACHING, caching),
        (PAGE_CONTROL, control),
        (PAGE_INFORMATIONAL_EXCEPTIONS, iec),
    ]
}

/// Parameters of a MODE SENSE request.
#[derive(Clone, Copy, Debug)]
pub struct ModeSenseArgs {
    pub ten: bool,
    pub dbd: bool,
    pub llbaa: bool,
    pub pc: u8,
    pub page: u8,
    pub subpage: u8,
}

/// MODE SENSE (6)/(10) parameter data (not yet cut to the allocation length).
pub fn mode_sense(
    a: ModeSenseArgs,
    st: &ModeState,
    blocks: u64,
    write_protected: bool,
) -> Result<Vec<u8>, Sense> {
    if a.pc == PC_SAVED {
        return Err(Sense::illegal(Asc::SAVING_PARAMETERS_NOT_SUPPORTED));
    }
    // No subpages, except "all subpages" of all pages or of a page.
    if a.subpage != 0 && a.subpage != 0xff {
        return Err(Sense::invalid_cdb(3, None));
    }
    let pages = mode_pages(a.pc, st);
    let mut body = Vec::new();
    if a.page == PAGE_ALL {
        for (_, p) in &pages {
            body.extend_from_slice(p);
        }
    } else {
        match pages.iter().find(|(c, _)| *c == a.page) {
            Some((_, p)) => body.extend_from_slice(p),
            None => return Err(Sense::invalid_cdb(2, Some(5))),
        }
    }
    // Block descriptor: short (8 bytes) unless LLBAA in MODE SENSE (10).
    let mut desc = Vec::new();
    if !a.dbd {
        if a.ten && a.llbaa {
            desc.extend_from_slice(&blocks.to_be_bytes());
            desc.extend_from_slice(&[0, 0, 0, 0]);
            desc.extend_from_slice(&LOGICAL_BLOCK.to_be_bytes());
        } else {
            let n = u32::try_from(blocks).unwrap_or(u32::MAX);
            desc.extend_from_slice(&n.to_be_bytes());
            desc.push(0);
            desc.extend_from_slice(&LOGICAL_BLOCK.to_be_bytes()[1..]);
        }
    }
    // Device-specific parameter: WP, DPOFUA.
    let dsp = if write_protected && a.pc != PC_CHANGEABLE { 0x80 } else { 0 } | 0x10;
    let mut b = Vec::new();
    if a.ten {
        let len = 6 + desc.len() + body.len();
        b.extend_from_slice(&(len as u16).to_be_bytes());
        b.push(0);
        b.push(dsp);
        b.push(u8::from(a.llbaa && !a.dbd));
        b.push(0);
        b.extend_from_slice(&(desc.len() as u16).to_be_bytes());
    } else {
        let len = 3 + desc.len() + body.len();
        b.push(len.min(255) as u8);
        b.push(0);
        b.push(dsp);
        b.push(desc.len() as u8);
    }
    b.extend(desc);
    b.extend(body);
    Ok(b)
}

/// Applies MODE SELECT parameter data; returns the new state. Only bits
/// reported changeable may differ from the current page.
pub fn mode_select(params: &[u8], ten: bool, st: &ModeState) -> Result<ModeState, Sense> {
    let (hdr, desc_len) = if ten {
        if params.len() < 8 {
            return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        (8usize, usize::from(u16::from_be_bytes([params[6], params[7]])))
    } else {
        if params.len() < 4 {
            return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        (4usize, usize::from(params[3]))
    };
    let mut pos = hdr + desc_len;
    if pos > params.len() {
        return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    // A block descriptor may only restate our geometry's block length.
    if desc_len >= 8 {
        let d = &params[hdr..hdr + desc_len];
        let len = if desc_len >= 16 {
            u32::from_be_bytes([d[12], d[13], d[14], d[15]])
        } else {
            u32::from_be_bytes([0, d[5], d[6], d[7]])
        };
        if len != 0 && len != LOGICAL_BLOCK {
            return Err(Sense::invalid_param((hdr + if desc_len >= 16 { 12 } else { 5 }) as u16));
        }
    }
    let mut next = *st;
    let current = mode_pages(PC_CURRENT, st);
    let changeable = mode_pages(PC_CHANGEABLE, st);
    while pos < params.len() {
        let page = &params[pos..];
        if page.len() < 2 {
            return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        if page[0] & 0x40 != 0 {
            // SPF: no subpages here.
            return Err(Sense::invalid_param(pos as u16));
        }
        let code = page[0] & 0x3f;
        let len = usize::from(page[1]) + 2;
        if page.len() < len {
            return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        let (Some((_, cur)), Some((_, mask))) =
            (current.iter().find(|(c, _)| *c == code), changeable.iter().find(|(c, _)| *c == code))
        else {
            return Err(Sense::invalid_param(pos as u16));
        };
        if len != cur.len() {
            return Err(Sense::invalid_param((pos + 1) as u16));
        }
        for i in 2..len {
            if (page[i] ^ cur[i]) & !mask[i] != 0 {
                return Err(Sense::invalid_param((pos + i) as u16));
            }
        }
        if code == PAGE_CONTROL {
            next.d_sense = page[2] & 0x04 != 0;
            next.swp = page[4] & 0x08 != 0;
        }
        pos += len;
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexus() -> Nexus {
        Nexus::iscsi("iqn.i", [0; 6], "iqn.t", 1)
    }

    #[test]
    fn inquiry_is_ascii_and_sized() {
        let b = standard_inquiry(&Identity::for_volume("vol"));
        assert_eq!(usize::from(b[4]) + 5, b.len());
        assert!(b[8..36].iter().all(|c| (0x20..0x7f).contains(c)));
    }

    #[test]
    fn vpd_pages_have_lengths() {
        let id = Identity::for_volume("vol");
        let p = VpdParams { thin: true, max_transfer_blocks: 65536 };
        for code in VPD_PAGES {
            let b = vpd(code, &id, &nexus(), p).unwrap();
            assert_eq!(b[1], code);
            assert_eq!(usize::from(u16::from_be_bytes([b[2], b[3]])) + 4, b.len());
        }
        assert_eq!(vpd(0xb0, &id, &nexus(), p).unwrap().len(), 64);
        assert!(vpd(0x42, &id, &nexus(), p).is_none());
    }

    #[test]
    fn identity_is_stable_and_distinct() {
        assert_eq!(Identity::for_volume("a"), Identity::for_volume("a"));
        assert_ne!(Identity::for_volume("a").naa, Identity::for_volume("b").naa);
    }

    #[test]
    fn capacity_16_reports_physical_exponent() {
        let b = read_capacity_16(2048, true);
        assert_eq!(&b[0..8], &2047u64.to_be_bytes());
        assert_eq!(b[13], 3);
        assert_eq!(b[14] & 0xc0, 0xc0);
        assert_eq!(read_capacity_10(1 << 40)[0..4], [0xff; 4]);
    }

    fn args(page: u8, pc: u8) -> ModeSenseArgs {
        ModeSenseArgs { ten: false, dbd: true, llbaa: false, pc, page, subpage: 0 }
    }

    #[test]
    fn mode_select_changes_only_changeable_bits() {
        let st = ModeState::default();
        let sense = mode_sense(args(PAGE_CONTROL, PC_CURRENT), &st, 100, false).unwrap();
        // Turn the MODE SENSE (6) data into MODE SELECT (6) data with SWP set.
        let mut sel = sense.clone();
        sel[0] = 0;
        sel[2] = 0;
        sel[4 + 4] |= 0x08;
        let next = mode_select(&sel, false, &st).unwrap();
        assert!(next.swp);
        // Changing the queue algorithm modifier is refused.
        let mut bad = sense;
        bad[0] = 0;
        bad[2] = 0;
        bad[4 + 3] = 0x00;
        assert_eq!(mode_select(&bad, false, &st).unwrap_err().asc, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
    }

    #[test]
    fn mode_sense_all_pages_and_saved() {
        let st = ModeState::default();
        let all = mode_sense(args(PAGE_ALL, PC_CURRENT), &st, 100, false).unwrap();
        assert_eq!(usize::from(all[0]) + 1, all.len());
        let e = mode_sense(args(PAGE_ALL, PC_SAVED), &st, 100, false).unwrap_err();
        assert_eq!(e.asc, Asc::SAVING_PARAMETERS_NOT_SUPPORTED);
        assert!(mode_sense(args(0x30, PC_CURRENT), &st, 100, false).is_err());
    }

    #[test]
    fn mode_select_never_panics() {
        let st = ModeState::default();
        for len in 0..40 {
            for fill in [0u8, 0xff, 0x0a, 0x08] {
                let _ = mode_select(&vec![fill; len], false, &st);
                let _ = mode_select(&vec![fill; len], true, &st);
            }
        }
    }
}
