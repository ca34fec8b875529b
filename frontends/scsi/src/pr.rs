//! Persistent reservations (SPC-4 5.13, PERSISTENT RESERVE IN/OUT) as a pure
//! state machine: registrations, the reservation, the generation counter,
//! the access rules, and the parameter data formats. No I/O; the logical
//! unit holds one [`PrState`] under its lock and delivers the unit
//! attentions this module asks for.
//!
//! Supported: REGISTER, REGISTER AND IGNORE EXISTING KEY, RESERVE, RELEASE,
//! CLEAR, PREEMPT, PREEMPT AND ABORT (which aborts nothing: commands here
//! cannot be cancelled once started), all six reservation types, READ KEYS,
//! READ RESERVATION, REPORT CAPABILITIES, READ FULL STATUS. Not supported:
//! SPEC_I_PT, APTPL (reservations do not survive a controller restart),
//! REGISTER AND MOVE, REPLACE LOST RESERVATION.

use crate::nexus::Nexus;
use crate::sense::{Asc, Sense};

/// PERSISTENT RESERVE IN service actions.
pub mod action_in {
    pub const READ_KEYS: u8 = 0;
    pub const READ_RESERVATION: u8 = 1;
    pub const REPORT_CAPABILITIES: u8 = 2;
    pub const READ_FULL_STATUS: u8 = 3;
}

/// PERSISTENT RESERVE OUT service actions.
pub mod action_out {
    pub const REGISTER: u8 = 0;
    pub const RESERVE: u8 = 1;
    pub const RELEASE: u8 = 2;
    pub const CLEAR: u8 = 3;
    pub const PREEMPT: u8 = 4;
    pub const PREEMPT_AND_ABORT: u8 = 5;
    pub const REGISTER_AND_IGNORE: u8 = 6;
}

/// Most registrations kept; more are refused with INSUFFICIENT
/// REGISTRATION RESOURCES.
pub const MAX_REGISTRATIONS: usize = 256;

/// Length of the PERSISTENT RESERVE OUT parameter list we accept.
pub const PROUT_PARAM_LEN: usize = 24;

/// Reservation types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrType {
    WriteExclusive = 1,
    ExclusiveAccess = 3,
    WriteExclusiveRegistrantsOnly = 5,
    ExclusiveAccessRegistrantsOnly = 6,
    WriteExclusiveAllRegistrants = 7,
    ExclusiveAccessAllRegistrants = 8,
}

impl PrType {
    pub fn from_code(code: u8) -> Option<PrType> {
        Some(match code {
            1 => PrType::WriteExclusive,
            3 => PrType::ExclusiveAccess,
            5 => PrType::WriteExclusiveRegistrantsOnly,
            6 => PrType::ExclusiveAccessRegistrantsOnly,
            7 => PrType::WriteExclusiveAllRegistrants,
            8 => PrType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    /// Every registrant holds an all-registrants reservation.
    pub fn all_registrants(self) -> bool {
        matches!(self, PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants)
    }

    /// Registrants (not only the holder) get access.
    fn registrants_have_access(self) -> bool {
        !matches!(self, PrType::WriteExclusive | PrType::ExclusiveAccess)
    }

    /// Non-holders may not read either.
    fn exclusive_access(self) -> bool {
        matches!(
            self,
            PrType::ExclusiveAccess
                | PrType::ExclusiveAccessRegistrantsOnly
                | PrType::ExclusiveAccessAllRegistrants
        )
    }
}

/// How a command touches the medium, for the reservation access rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Allowed whatever the reservation (INQUIRY, REPORT LUNS, PR IN/OUT, ...).
    Any,
    /// Reads data (conflicts with exclusive-access reservations).
    Read,
    /// Changes data or state (conflicts with every reservation).
    Write,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub nexus: Nexus,
    pub key: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The holder; `None` for all-registrants types (every registrant holds it).
    pub holder: Option<Nexus>,
    pub kind: PrType,
}

/// Why a PERSISTENT RESERVE OUT failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrError {
    /// RESERVATION CONFLICT status.
    Conflict,
    /// CHECK CONDITION with this sense.
    Check(Sense),
}

/// Unit attentions to establish after a PERSISTENT RESERVE OUT.
pub type Attentions = Vec<(Nexus, Asc)>;

/// The PERSISTENT RESERVE OUT parameter list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProutParams {
    pub key: u64,
    pub action_key: u64,
    pub spec_i_pt: bool,
    pub all_tg_pt: bool,
    pub aptpl: bool,
}

impl ProutParams {
    /// Parses the 24-byte basic parameter list.
    pub fn parse(b: &[u8]) -> Option<ProutParams> {
        if b.len() < PROUT_PARAM_LEN {
            return None;
        }
        let u64_at = |at: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[at..at + 8]);
            u64::from_be_bytes(v)
        };
        Some(ProutParams {
            key: u64_at(0),
            action_key: u64_at(8),
            spec_i_pt: b[20] & 0x08 != 0,
            all_tg_pt: b[20] & 0x04 != 0,
            aptpl: b[20] & 0x01 != 0,
        })
    }

    pub fn encode(&self) -> [u8; PROUT_PARAM_LEN] {
        let mut b = [0u8; PROUT_PARAM_LEN];
        b[0..8].copy_from_slice(&self.key.to_be_bytes());
        b[8..16].copy_from_slice(&self.action_key.to_be_bytes());
        b[20] = if self.spec_i_pt { 0x08 } else { 0 }
            | if self.all_tg_pt { 0x04 } else { 0 }
            | u8::from(self.aptpl);
        b
    }
}

/// Registrations and the reservation of one logical unit.
#[derive(Clone, Debug, Default)]
pub struct PrState {
    generation: u32,
    registrations: Vec<Registration>,
    reservation: Option<Reservation>,
}

impl PrState {
    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn registrations(&self) -> &[Registration] {
        &self.registrations
    }

    pub fn reservation(&self) -> Option<&Reservation> {
        self.reservation.as_ref()
    }

    /// Any registration exists (SPC-2 RESERVE/RELEASE then conflict).
    pub fn active(&self) -> bool {
        !self.registrations.is_empty() || self.reservation.is_some()
    }

    fn key_of(&self, n: &Nexus) -> Option<u64> {
        self.registrations.iter().find(|r| &r.nexus == n).map(|r| r.key)
    }

    fn is_holder(&self, n: &Nexus) -> bool {
        match &self.reservation {
            None => false,
            Some(Reservation { holder: Some(h), .. }) => h == n,
            Some(Reservation { holder: None, .. }) => self.key_of(n).is_some(),
        }
    }

    /// Whether `n` may run a command with `access` (SPC-4 table 63).
    pub fn allows(&self, n: &Nexus, access: Access) -> bool {
        let Some(res) = &self.reservation else { return true };
        if access == Access::Any || self.is_holder(n) {
            return true;
        }
        if res.kind.registrants_have_access() && self.key_of(n).is_some() {
            return true;
        }
        match access {
            Access::Read => !res.kind.exclusive_access(),
            _ => false,
        }
    }

    /// Runs a PERSISTENT RESERVE OUT service action. On success returns the
    /// unit attentions to establish.
    pub fn out(
        &mut self,
        n: &Nexus,
        action: u8,
        scope: u8,
        kind: u8,
        p: &ProutParams,
    ) -> Result<Attentions, PrError> {
        use action_out::*;
        if p.spec_i_pt {
            return Err(PrError::Check(Sense::invalid_param(20)));
        }
        if p.aptpl {
            // Persisting through power loss is not supported (PTPL_C = 0).
            return Err(PrError::Check(Sense::invalid_param(20)));
        }
        let mine = self.key_of(n);
        // The reservation key must match our registration, except for
        // REGISTER AND IGNORE EXISTING KEY (and REGISTER by an unregistered
        // nexus, whose key must be zero).
        if action != REGISTER_AND_IGNORE {
            match mine {
                Some(k) if k != p.key => return Err(PrError::Conflict),
                None if action == REGISTER && p.key != 0 => return Err(PrError::Conflict),
                None if action != REGISTER => return Err(PrError::Conflict),
                _ => {}
            }
        }
        match action {
            REGISTER | REGISTER_AND_IGNORE => self.register(n, mine, p.action_key),
            RESERVE => {
                let kind = check_scope_type(scope, kind)?;
                match &self.reservation {
                    None => {
                        let holder = (!kind.all_registrants()).then(|| n.clone());
                        self.reservation = Some(Reservation { holder, kind });
                        Ok(Vec::new())
                    }
                    Some(r) if r.kind == kind && self.is_holder(n) => Ok(Vec::new()),
                    Some(_) => Err(PrError::Conflict),
                }
            }
            RELEASE => {
                let kind = check_scope_type(scope, kind)?;
                let Some(r) = &self.reservation else { return Ok(Vec::new()) };
                if !self.is_holder(n) {
                    return Ok(Vec::new());
                }
                if r.kind != kind {
                    return Err(PrError::Check(Sense::illegal(
                        Asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
                    )));
                }
                let notify = r.kind.registrants_have_access();
                self.reservation = None;
                Ok(if notify { self.others(n, Asc::RESERVATIONS_RELEASED) } else { Vec::new() })
            }
            CLEAR => {
                let ua = self.others(n, Asc::RESERVATIONS_PREEMPTED);
                self.registrations.clear();
                self.reservation = None;
                self.generation = self.generation.wrapping_add(1);
                Ok(ua)
            }
            PREEMPT | PREEMPT_AND_ABORT => self.preempt(n, scope, kind, p.action_key),
            _ => Err(PrError::Check(Sense::invalid_cdb(1, None))),
        }
    }

    fn register(&mut self, n: &Nexus, mine: Option<u64>, new_key: u64) -> Result<Attentions, PrError> {
        match (mine, new_key) {
            (None, 0) => return Ok(Vec::new()),
            (None, key) => {
                if self.registrations.len() >= MAX_REGISTRATIONS {
                    return Err(PrError::Check(Sense::illegal(Asc::INSUFFICIENT_REGISTRATION_RESOURCES)));
                }
                self.registrations.push(Registration { nexus: n.clone(), key });
            }
            (Some(_), 0) => return Ok(self.unregister(n)),
            (Some(_), key) => {
                if let Some(r) = self.registrations.iter_mut().find(|r| &r.nexus == n) {
                    r.key = key;
                }
            }
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(Vec::new())
    }

    /// Removes `n`'s registration, releasing the reservation if `n` held it
    /// (or was the last registrant of an all-registrants reservation).
    fn unregister(&mut self, n: &Nexus) -> Attentions {
        let held = self.is_holder(n);
        self.registrations.retain(|r| &r.nexus != n);
        self.generation = self.generation.wrapping_add(1);
        let mut ua = Vec::new();
        if let Some(r) = &self.reservation {
            let release = if r.kind.all_registrants() { self.registrations.is_empty() } else { held };
            if release {
                if r.kind.registrants_have_access() {
                    ua = self.others(n, Asc::RESERVATIONS_RELEASED);
                }
                self.reservation = None;
            }
        }
        ua
    }

    fn preempt(&mut self, n: &Nexus, scope: u8, kind: u8, victim: u64) -> Result<Attentions, PrError> {
        let kind = check_scope_type(scope, kind)?;
        let mut ua = Vec::new();
        let mut drop_key = |state: &mut PrState, pred: &dyn Fn(&Registration) -> bool| {
            let (gone, kept): (Vec<_>, Vec<_>) =
                std::mem::take(&mut state.registrations).into_iter().partition(|r| pred(r));
            state.registrations = kept;
            for r in &gone {
                if &r.nexus != n {
                    ua.push((r.nexus.clone(), Asc::REGISTRATIONS_PREEMPTED));
                }
            }
            !gone.is_empty()
        };
        match self.reservation.clone() {
            Some(Reservation { holder: None, .. }) => {
                // All-registrants: key 0 preempts every other registrant.
                if victim == 0 {
                    drop_key(self, &|r| &r.nexus != n);
                    self.reservation = Some(Reservation { holder: Some(n.clone()), kind });
                } else if !drop_key(self, &|r| r.key == victim) {
                    return Err(PrError::Conflict);
                }
            }
            Some(Reservation { holder: Some(h), .. }) if self.key_of(&h) == Some(victim) => {
                drop_key(self, &|r| r.key == victim && &r.nexus != n);
                self.reservation = Some(Reservation { holder: Some(n.clone()), kind });
            }
            _ => {
                if victim == 0 {
                    return Err(PrError::Check(Sense::invalid_param(8)));
                }
                if !drop_key(self, &|r| r.key == victim) {
                    return Err(PrError::Conflict);
                }
            }
        }
        // A holder that lost its registration loses the reservation too.
        if let Some(Reservation { holder: Some(h), .. }) = &self.reservation
            && self.key_of(h).is_none()
        {
            self.reservation = None;
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(ua)
    }

    /// Unit attentions for every registrant except `n`.
    fn others(&self, n: &Nexus, asc: Asc) -> Attentions {
        self.registrations.iter().filter(|r| &r.nexus != n).map(|r| (r.nexus.clone(), asc)).collect()
    }

    /// PERSISTENT RESERVE IN parameter data for `action`, or `None` for an
    /// unknown service action.
    pub fn read(&self, action: u8) -> Option<Vec<u8>> {
        use action_in::*;
        let mut b = Vec::new();
        match action {
            READ_KEYS => {
                b.extend_from_slice(&self.generation.to_be_bytes());
                b.extend_from_slice(&((self.registrations.len() * 8) as u32).to_be_bytes());
                for r in &self.registrations {
                    b.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            READ_RESERVATION => {
                b.extend_from_slice(&self.generation.to_be_bytes());
                match &self.reservation {
                    None => b.extend_from_slice(&0u32.to_be_bytes()),
                    Some(r) => {
                        b.extend_from_slice(&16u32.to_be_bytes());
                        let key = r.holder.as_ref().and_then(|h| self.key_of(h)).unwrap_or(0);
                        b.extend_from_slice(&key.to_be_bytes());
                        b.extend_from_slice(&[0, 0, 0, 0, 0, r.kind as u8, 0, 0]);
                    }
                }
            }
            REPORT_CAPABILITIES => {
                // CRH=0, SIP_C=0, ATP_C=1, PTPL_C=0; TMV=1, ALLOW COMMANDS=0.
                b.extend_from_slice(&[0, 8, 0x04, 0x80]);
                // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX | EX_AC_AR.
                b.extend_from_slice(&[0x80 | 0x40 | 0x20 | 0x08 | 0x02, 0x01, 0, 0]);
            }
            READ_FULL_STATUS => {
                let mut descs = Vec::new();
                for r in &self.registrations {
                    descs.extend_from_slice(&r.key.to_be_bytes());
                    descs.extend_from_slice(&[0; 4]);
                    let holder = self.is_holder(&r.nexus);
                    descs.push(u8::from(holder)); // R_HOLDER
                    descs.push(match (&self.reservation, holder) {
                        (Some(res), true) => res.kind as u8,
                        _ => 0,
                    });
                    descs.extend_from_slice(&[0; 4]);
                    descs.extend_from_slice(&r.nexus.target_port().to_be_bytes());
                    let tid = r.nexus.transport_id();
                    descs.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    descs.extend_from_slice(tid);
                }
                b.extend_from_slice(&self.generation.to_be_bytes());
                b.extend_from_slice(&(descs.len() as u32).to_be_bytes());
                b.extend_from_slice(&descs);
            }
            _ => return None,
        }
        Some(b)
    }
}

fn check_scope_type(scope: u8, kind: u8) -> Result<PrType, PrError> {
    if scope != 0 {
        return Err(PrError::Check(Sense::invalid_cdb(2, Some(4))));
    }
    PrType::from_code(kind).ok_or(PrError::Check(Sense::invalid_cdb(2, Some(0))))
}

#[cfg(test)]
mod tests {
    use super::action_out::*;
    use super::*;

    fn nexus(name: &str) -> Nexus {
        Nexus::iscsi(name, [0, 2, 0x3d, 0, 0, 1], "iqn.t", 1)
    }

    fn params(key: u64, action_key: u64) -> ProutParams {
        ProutParams { key, action_key, spec_i_pt: false, all_tg_pt: false, aptpl: false }
    }

    #[test]
    fn register_reserve_release() {
        let (a, b) = (nexus("a"), nexus("b"));
        let mut s = PrState::default();
        s.out(&a, REGISTER, 0, 0, &params(0, 1)).unwrap();
        s.out(&b, REGISTER, 0, 0, &params(0, 2)).unwrap();
        assert_eq!(s.generation(), 2);
        // Wrong key: conflict.
        assert_eq!(s.out(&a, RESERVE, 0, 1, &params(2, 0)), Err(PrError::Conflict));
        s.out(&a, RESERVE, 0, PrType::WriteExclusive as u8, &params(1, 0)).unwrap();
        assert!(s.allows(&b, Access::Read));
        assert!(!s.allows(&b, Access::Write));
        assert!(s.allows(&a, Access::Write));
        // b cannot take it; releasing someone else's reservation is a no-op.
        assert_eq!(s.out(&b, RESERVE, 0, 1, &params(2, 0)), Err(PrError::Conflict));
        s.out(&b, RELEASE, 0, 1, &params(2, 0)).unwrap();
        assert!(s.reservation().is_some());
        // Wrong type on release.
        assert!(matches!(s.out(&a, RELEASE, 0, 3, &params(1, 0)), Err(PrError::Check(_))));
        s.out(&a, RELEASE, 0, 1, &params(1, 0)).unwrap();
        assert!(s.reservation().is_none());
    }

    #[test]
    fn exclusive_access_blocks_reads() {
        let (a, b) = (nexus("a"), nexus("b"));
        let mut s = PrState::default();
        s.out(&a, REGISTER_AND_IGNORE, 0, 0, &params(99, 1)).unwrap();
        s.out(&a, RESERVE, 0, PrType::ExclusiveAccess as u8, &params(1, 0)).unwrap();
        assert!(!s.allows(&b, Access::Read));
        assert!(s.allows(&b, Access::Any));
    }

    #[test]
    fn registrants_only_and_unregistering_holder() {
        let (a, b) = (nexus("a"), nexus("b"));
        let mut s = PrState::default();
        s.out(&a, REGISTER, 0, 0, &params(0, 1)).unwrap();
        s.out(&b, REGISTER, 0, 0, &params(0, 2)).unwrap();
        s.out(&a, RESERVE, 0, PrType::ExclusiveAccessRegistrantsOnly as u8, &params(1, 0)).unwrap();
        assert!(s.allows(&b, Access::Write));
        let ua = s.out(&a, REGISTER, 0, 0, &params(1, 0)).unwrap();
        assert!(s.reservation().is_none());
        assert_eq!(ua, vec![(b.clone(), Asc::RESERVATIONS_RELEASED)]);
    }

    #[test]
    fn all_registrants_survive_holder_leaving() {
        let (a, b) = (nexus("a"), nexus("b"));
        let mut s = PrState::default();
        s.out(&a, REGISTER, 0, 0, &params(0, 1)).unwrap();
        s.out(&b, REGISTER, 0, 0, &params(0, 2)).unwrap();
        s.out(&a, RESERVE, 0, PrType::WriteExclusiveAllRegistrants as u8, &params(1, 0)).unwrap();
        s.out(&a, REGISTER, 0, 0, &params(1, 0)).unwrap();
        assert!(s.reservation().is_some());
        let rr = s.read(action_in::READ_RESERVATION).unwrap();
        assert_eq!(&rr[8..16], &[0u8; 8], "all-registrants reservations report key 0");
        s.out(&b, RELEASE, 0, 7, &params(2, 0)).unwrap();
        assert!(s.reservation().is_none());
    }

    #[test]
    fn preempt_removes_registration_and_bumps_generation() {
        let (a, b) = (nexus("a"), nexus("b"));
        let mut s = PrState::default();
        s.out(&a, REGISTER, 0, 0, &params(0, 1)).unwrap();
        s.out(&b, REGISTER, 0, 0, &params(0, 2)).unwrap();
        let g = s.generation();
        let ua = s.out(&b, PREEMPT, 0, 3, &params(2, 1)).unwrap();
        assert_eq!(s.generation(), g + 1);
        assert_eq!(s.registrations().len(), 1);
        assert_eq!(s.registrations()[0].key, 2);
        assert_eq!(ua, vec![(a.clone(), Asc::REGISTRATIONS_PREEMPTED)]);
        // Preempting a key nobody holds: conflict.
        assert_eq!(s.out(&b, PREEMPT, 0, 3, &params(2, 77)), Err(PrError::Conflict));
    }

    #[test]
    fn preempt_takes_over_reservation() {
        let (a, b) = (nexus("a"), nexus("b"));
        let mut s = PrState::default();
        s.out(&a, REGISTER, 0, 0, &params(0, 1)).unwrap();
        s.out(&b, REGISTER, 0, 0, &params(0, 2)).unwrap();
        s.out(&a, RESERVE, 0, 1, &params(1, 0)).unwrap();
        s.out(&b, PREEMPT, 0, 3, &params(2, 1)).unwrap();
        let r = s.reservation().unwrap();
        assert_eq!(r.holder.as_ref(), Some(&b));
        assert_eq!(r.kind, PrType::ExclusiveAccess);
    }

    #[test]
    fn clear_drops_everything() {
        let (a, b) = (nexus("a"), nexus("b"));
        let mut s = PrState::default();
        s.out(&a, REGISTER, 0, 0, &params(0, 1)).unwrap();
        s.out(&b, REGISTER, 0, 0, &params(0, 2)).unwrap();
        s.out(&a, RESERVE, 0, 1, &params(1, 0)).unwrap();
        let ua = s.out(&b, CLEAR, 0, 0, &params(2, 0)).unwrap();
        assert!(!s.active());
        assert_eq!(ua, vec![(a.clone(), Asc::RESERVATIONS_PREEMPTED)]);
    }

    #[test]
    fn unregistered_nexus_needs_zero_key() {
        let a = nexus("a");
        let mut s = PrState::default();
        assert_eq!(s.out(&a, REGISTER, 0, 0, &params(5, 1)), Err(PrError::Conflict));
        assert_eq!(s.out(&a, RESERVE, 0, 1, &params(0, 0)), Err(PrError::Conflict));
        // Unregistered REGISTER with service action key 0 does nothing.
        s.out(&a, REGISTER, 0, 0, &params(0, 0)).unwrap();
        assert_eq!(s.generation(), 0);
    }

    #[test]
    fn read_formats() {
        let a = nexus("a");
        let mut s = PrState::default();
        s.out(&a, REGISTER, 0, 0, &params(0, 0x1122)).unwrap();
        let keys = s.read(action_in::READ_KEYS).unwrap();
        assert_eq!(&keys[4..8], &8u32.to_be_bytes());
        assert_eq!(&keys[8..16], &0x1122u64.to_be_bytes());
        let caps = s.read(action_in::REPORT_CAPABILITIES).unwrap();
        assert_eq!(caps.len(), 8);
        let full = s.read(action_in::READ_FULL_STATUS).unwrap();
        let tid_len = u32::from_be_bytes([full[28], full[29], full[30], full[31]]) as usize;
        assert_eq!(full.len(), 8 + 24 + tid_len);
        assert!(s.read(4).is_none());
    }

    #[test]
    fn params_round_trip() {
        let p = ProutParams { key: 1, action_key: u64::MAX, spec_i_pt: true, all_tg_pt: true, aptpl: true };
        assert_eq!(ProutParams::parse(&p.encode()), Some(p));
        assert_eq!(ProutParams::parse(&[0; 23]), None);
    }
}
