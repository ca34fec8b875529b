//! SCSI status codes and sense data (SPC-4 4.5): the key / additional sense
//! code pairs the device server reports, and their fixed (0x70) and
//! descriptor (0x72) encodings. Also the one function that maps a
//! [`jiva_core::ErrorKind`] to sense data.

use jiva_core::ErrorKind;

/// SCSI status byte (SAM-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Good = 0x00,
    CheckCondition = 0x02,
    ConditionMet = 0x04,
    Busy = 0x08,
    ReservationConflict = 0x18,
    TaskSetFull = 0x28,
    TaskAborted = 0x40,
}

/// Sense keys.
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const RECOVERED_ERROR: u8 = 0x1;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const MISCOMPARE: u8 = 0xe;
}

/// An additional sense code (high byte) and qualifier (low byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Asc(pub u16);

impl Asc {
    pub const NONE: Asc = Asc(0x0000);
    pub const NOT_READY_CAUSE_NOT_REPORTABLE: Asc = Asc(0x0400);
    pub const LU_COMMUNICATION_FAILURE: Asc = Asc(0x0800);
    pub const LU_COMMUNICATION_TIMEOUT: Asc = Asc(0x0801);
    pub const WRITE_ERROR: Asc = Asc(0x0c00);
    pub const INVALID_FIELD_IN_INFORMATION_UNIT: Asc = Asc(0x0e03);
    pub const UNRECOVERED_READ_ERROR: Asc = Asc(0x1100);
    pub const PARAMETER_LIST_LENGTH_ERROR: Asc = Asc(0x1a00);
    pub const MISCOMPARE_DURING_VERIFY: Asc = Asc(0x1d00);
    pub const INVALID_OPCODE: Asc = Asc(0x2000);
    pub const LBA_OUT_OF_RANGE: Asc = Asc(0x2100);
    pub const INVALID_FIELD_IN_CDB: Asc = Asc(0x2400);
    pub const LUN_NOT_SUPPORTED: Asc = Asc(0x2500);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Asc = Asc(0x2600);
    pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Asc = Asc(0x2604);
    pub const TOO_MANY_SEGMENT_DESCRIPTORS: Asc = Asc(0x2608);
    pub const WRITE_PROTECTED: Asc = Asc(0x2700);
    pub const SPACE_ALLOCATION_FAILED_WRITE_PROTECT: Asc = Asc(0x2707);
    pub const POWER_ON_RESET: Asc = Asc(0x2900);
    pub const BUS_DEVICE_RESET: Asc = Asc(0x2903);
    pub const MODE_PARAMETERS_CHANGED: Asc = Asc(0x2a01);
    pub const RESERVATIONS_PREEMPTED: Asc = Asc(0x2a03);
    pub const RESERVATIONS_RELEASED: Asc = Asc(0x2a04);
    pub const REGISTRATIONS_PREEMPTED: Asc = Asc(0x2a05);
    pub const COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: Asc = Asc(0x2f00);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Asc = Asc(0x3900);
    pub const INTERNAL_TARGET_FAILURE: Asc = Asc(0x4400);
    pub const INITIATOR_DETECTED_ERROR: Asc = Asc(0x4800);
    pub const DATA_PHASE_ERROR: Asc = Asc(0x4b00);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Asc = Asc(0x5504);

    pub const fn code(self) -> u8 {
        (self.0 >> 8) as u8
    }

    pub const fn qualifier(self) -> u8 {
        self.0 as u8
    }
}

/// Where in the CDB or parameter list an invalid field sits (the
/// sense-key-specific "field pointer").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldPointer {
    /// The field is in the CDB (else in the parameter list).
    pub in_cdb: bool,
    pub byte: u16,
    /// Bit within the byte, when meaningful.
    pub bit: Option<u8>,
}

/// Sense data: what went wrong, as reported to the initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: Asc,
    /// The INFORMATION field (e.g. the offset of a miscompare).
    pub information: Option<u64>,
    pub field: Option<FieldPointer>,
}

/// Length of fixed-format sense data as we produce it.
pub const FIXED_LEN: usize = 18;

impl Sense {
    pub const fn new(key: u8, asc: Asc) -> Sense {
        Sense { key, asc, information: None, field: None }
    }

    pub const fn illegal(asc: Asc) -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, asc)
    }

    /// INVALID FIELD IN CDB pointing at `byte` (and optionally `bit`).
    pub const fn invalid_cdb(byte: u16, bit: Option<u8>) -> Sense {
        Sense {
            key: key::ILLEGAL_REQUEST,
            asc: Asc::INVALID_FIELD_IN_CDB,
            information: None,
            field: Some(FieldPointer { in_cdb: true, byte, bit }),
        }
    }

    /// INVALID FIELD IN PARAMETER LIST pointing at `byte`.
    pub const fn invalid_param(byte: u16) -> Sense {
        Sense {
            key: key::ILLEGAL_REQUEST,
            asc: Asc::INVALID_FIELD_IN_PARAMETER_LIST,
            information: None,
            field: Some(FieldPointer { in_cdb: false, byte, bit: None }),
        }
    }

    pub const fn invalid_opcode() -> Sense {
        Sense {
            key: key::ILLEGAL_REQUEST,
            asc: Asc::INVALID_OPCODE,
            information: None,
            field: Some(FieldPointer { in_cdb: true, byte: 0, bit: None }),
        }
    }

    pub const fn lba_out_of_range() -> Sense {
        Sense::illegal(Asc::LBA_OUT_OF_RANGE)
    }

    pub const fn with_information(mut self, information: u64) -> Sense {
        self.information = Some(information);
        self
    }

    /// Sense-key-specific bytes (3), if any.
    fn key_specific(&self) -> Option<[u8; 3]> {
        let f = self.field?;
        let mut b0 = 0x80; // SKSV
        if f.in_cdb {
            b0 |= 0x40; // C/D
        }
        if let Some(bit) = f.bit {
            b0 |= 0x08 | (bit & 0x07); // BPV + bit pointer
        }
        let [hi, lo] = f.byte.to_be_bytes();
        Some([b0, hi, lo])
    }

    /// Fixed-format sense data (response code 0x70), 18 bytes.
    pub fn encode_fixed(&self) -> Vec<u8> {
        let mut b = vec![0u8; FIXED_LEN];
        b[0] = 0x70;
        b[2] = self.key & 0x0f;
        if let Some(info) = self.information {
            // The fixed format has room for 32 bits only.
            if let Ok(info) = u32::try_from(info) {
                b[0] |= 0x80; // VALID
                b[3..7].copy_from_slice(&info.to_be_bytes());
            }
        }
        b[7] = (FIXED_LEN - 8) as u8;
        b[12] = self.asc.code();
        b[13] = self.asc.qualifier();
        if let Some(sks) = self.key_specific() {
            b[15..18].copy_from_slice(&sks);
        }
        b
    }

    /// Descriptor-format sense data (response code 0x72) with an
    /// information descriptor and a sense-key-specific descriptor as needed.
    pub fn encode_descriptor(&self) -> Vec<u8> {
        let mut b = vec![0x72, self.key & 0x0f, self.asc.code(), self.asc.qualifier(), 0, 0, 0, 0];
        if let Some(info) = self.information {
            b.extend_from_slice(&[0x00, 0x0a, 0x80, 0x00]);
            b.extend_from_slice(&info.to_be_bytes());
        }
        if let Some(sks) = self.key_specific() {
            b.extend_from_slice(&[0x02, 0x06, 0x00, 0x00]);
            b.extend_from_slice(&sks);
            b.push(0);
        }
        b[7] = (b.len() - 8) as u8;
        b
    }

    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        if descriptor { self.encode_descriptor() } else { self.encode_fixed() }
    }

    /// Parses fixed or descriptor sense data (for tests and tools).
    pub fn parse(buf: &[u8]) -> Option<Sense> {
        let code = *buf.first()? & 0x7f;
        match code {
            0x70 | 0x71 => {
                if buf.len() < 14 {
                    return None;
                }
                let information = (buf[0] & 0x80 != 0)
                    .then(|| u64::from(u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]])));
                let field = buf.get(15..18).and_then(parse_key_specific);
                Some(Sense {
                    key: buf[2] & 0x0f,
                    asc: Asc(u16::from_be_bytes([buf[12], buf[13]])),
                    information,
                    field,
                })
            }
            0x72 | 0x73 => {
                if buf.len() < 8 {
                    return None;
                }
                let mut sense = Sense::new(buf[1] & 0x0f, Asc(u16::from_be_bytes([buf[2], buf[3]])));
                let end = (8 + usize::from(buf[7])).min(buf.len());
                let mut pos = 8;
                while pos + 2 <= end {
                    let (kind, len) = (buf[pos], usize::from(buf[pos + 1]));
                    let body = buf.get(pos + 2..(pos + 2 + len).min(end))?;
                    match kind {
                        0x00 if body.len() >= 10 && body[0] & 0x80 != 0 => {
                            let mut v = [0u8; 8];
                            v.copy_from_slice(&body[2..10]);
                            sense.information = Some(u64::from_be_bytes(v));
                        }
                        0x02 if body.len() >= 5 => sense.field = parse_key_specific(&body[2..5]),
                        _ => {}
                    }
                    pos += 2 + len;
                }
                Some(sense)
            }
            _ => None,
        }
    }
}

fn parse_key_specific(b: &[u8]) -> Option<FieldPointer> {
    if b.len() < 3 || b[0] & 0x80 == 0 {
        return None;
    }
    Some(FieldPointer {
        in_cdb: b[0] & 0x40 != 0,
        byte: u16::from_be_bytes([b[1], b[2]]),
        bit: (b[0] & 0x08 != 0).then_some(b[0] & 0x07),
    })
}

/// Direction of the failed data transfer, for choosing between read and
/// write medium errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Other,
}

/// Maps a device error kind to sense data: the one place where jiva's
/// error kinds become SCSI sense.
///
/// * `Io` and `Corrupt` are medium errors (unrecovered read error on the
///   read path, write error on the write path); a `Corrupt` block is never
///   returned as data.
/// * `OutOfRange` cannot normally reach the device (ranges are checked
///   before the call) and becomes LBA OUT OF RANGE.
/// * `Unsupported` is INVALID COMMAND OPERATION CODE, `InvalidArgument`
///   INVALID FIELD IN CDB.
/// * `ReadOnly` and `NoSpace` are data-protect conditions.
/// * Loss of every replica (`Unavailable`, `Disconnected`) is a logical unit
///   communication failure; `TimedOut` an aborted command the initiator may
///   retry; `Fenced` (a newer controller owns the volume) is not ready.
pub fn sense_for(kind: ErrorKind, access: Access) -> Sense {
    use ErrorKind as K;
    match kind {
        K::OutOfRange => Sense::lba_out_of_range(),
        K::InvalidArgument => Sense::illegal(Asc::INVALID_FIELD_IN_CDB),
        K::Unsupported => Sense::invalid_opcode(),
        K::Io if access == Access::Write => Sense::new(key::MEDIUM_ERROR, Asc::WRITE_ERROR),
        K::Io | K::Corrupt => Sense::new(key::MEDIUM_ERROR, Asc::UNRECOVERED_READ_ERROR),
        K::ReadOnly => Sense::new(key::DATA_PROTECT, Asc::WRITE_PROTECTED),
        K::NoSpace => Sense::new(key::DATA_PROTECT, Asc::SPACE_ALLOCATION_FAILED_WRITE_PROTECT),
        K::Unavailable | K::Disconnected => Sense::new(key::HARDWARE_ERROR, Asc::LU_COMMUNICATION_FAILURE),
        K::TimedOut => Sense::new(key::ABORTED_COMMAND, Asc::LU_COMMUNICATION_TIMEOUT),
        K::Fenced => Sense::new(key::NOT_READY, Asc::NOT_READY_CAUSE_NOT_REPORTABLE),
        // Protocol and any kind added later.
        _ => Sense::new(key::HARDWARE_ERROR, Asc::INTERNAL_TARGET_FAILURE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_layout() {
        let s = Sense::invalid_cdb(2, Some(5));
        let b = s.encode_fixed();
        assert_eq!(b.len(), 18);
        assert_eq!(b[0], 0x70);
        assert_eq!(b[2], key::ILLEGAL_REQUEST);
        assert_eq!(b[7], 10);
        assert_eq!((b[12], b[13]), (0x24, 0x00));
        assert_eq!(&b[15..18], &[0x80 | 0x40 | 0x08 | 5, 0, 2]);
        assert_eq!(Sense::parse(&b), Some(s));
    }

    #[test]
    fn information_round_trips_in_both_formats() {
        let s = Sense::new(key::MISCOMPARE, Asc::MISCOMPARE_DURING_VERIFY).with_information(1234);
        assert_eq!(Sense::parse(&s.encode_fixed()), Some(s));
        assert_eq!(Sense::parse(&s.encode_descriptor()), Some(s));
        let d = s.encode_descriptor();
        assert_eq!(d[0], 0x72);
        assert_eq!(usize::from(d[7]) + 8, d.len());
    }

    #[test]
    fn error_kinds_map_to_sense() {
        let s = sense_for(ErrorKind::Corrupt, Access::Read);
        assert_eq!((s.key, s.asc), (key::MEDIUM_ERROR, Asc::UNRECOVERED_READ_ERROR));
        let s = sense_for(ErrorKind::Io, Access::Write);
        assert_eq!((s.key, s.asc), (key::MEDIUM_ERROR, Asc::WRITE_ERROR));
        let s = sense_for(ErrorKind::OutOfRange, Access::Read);
        assert_eq!((s.key, s.asc), (key::ILLEGAL_REQUEST, Asc::LBA_OUT_OF_RANGE));
        let s = sense_for(ErrorKind::Unsupported, Access::Other);
        assert_eq!((s.key, s.asc), (key::ILLEGAL_REQUEST, Asc::INVALID_OPCODE));
        let s = sense_for(ErrorKind::ReadOnly, Access::Write);
        assert_eq!((s.key, s.asc), (key::DATA_PROTECT, Asc::WRITE_PROTECTED));
    }

    #[test]
    fn parse_never_panics_on_short_input() {
        for len in 0..20 {
            let buf = vec![0x72u8; len];
            let _ = Sense::parse(&buf);
            let buf = vec![0xf0u8; len];
            let _ = Sense::parse(&buf);
        }
    }
}
