//! Sessions: the command window (CmdSN/ExpCmdSN/MaxCmdSN), the connections
//! of a session, and the registry that finds a session by TSIH or by
//! initiator port for reinstatement.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use jiva_scsi::Nexus;
use tokio::sync::watch;

use crate::login::SessionKind;
use crate::params::Negotiated;
use crate::pdu::sn_le;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The CmdSN window of a session (RFC 7143 4.2.2.1). Commands may arrive
/// out of order across connections; ExpCmdSN advances over every CmdSN
/// received so far without a gap.
#[derive(Debug)]
pub struct Window {
    exp: u32,
    depth: u32,
    ahead: HashSet<u32>,
}

impl Window {
    pub fn new(exp: u32, depth: u32) -> Window {
        Window { exp, depth: depth.max(1), ahead: HashSet::new() }
    }

    pub fn exp(&self) -> u32 {
        self.exp
    }

    pub fn max(&self) -> u32 {
        self.exp.wrapping_add(self.depth - 1)
    }

    /// Accepts a non-immediate command's CmdSN: false (ignore the command)
    /// when it lies outside [ExpCmdSN, MaxCmdSN] or was already received.
    pub fn accept(&mut self, sn: u32) -> bool {
        if !(sn_le(self.exp, sn) && sn_le(sn, self.max())) {
            return false;
        }
        if sn != self.exp {
            return self.ahead.insert(sn);
        }
        self.exp = self.exp.wrapping_add(1);
        while self.ahead.remove(&self.exp) {
            self.exp = self.exp.wrapping_add(1);
        }
        true
    }
}

/// One iSCSI session: an I_T nexus with one or more connections.
#[derive(Debug)]
pub struct Session {
    pub tsih: u16,
    pub initiator_name: String,
    pub isid: [u8; 6],
    pub kind: SessionKind,
    pub nexus: Nexus,
    /// Session-wide parameters, from the leading connection's login.
    pub params: Negotiated,
    window: Mutex<Window>,
    /// Live connections by CID, each with the switch that closes it.
    conns: Mutex<HashMap<u16, watch::Sender<bool>>>,
}

impl Session {
    pub fn new(
        tsih: u16,
        initiator_name: String,
        isid: [u8; 6],
        kind: SessionKind,
        nexus: Nexus,
        params: Negotiated,
        window: Window,
    ) -> Session {
        Session {
            tsih,
            initiator_name,
            isid,
            kind,
            nexus,
            params,
            window: Mutex::new(window),
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// (ExpCmdSN, MaxCmdSN) to report now.
    pub fn window(&self) -> (u32, u32) {
        let w = lock(&self.window);
        (w.exp(), w.max())
    }

    pub fn accept(&self, cmd_sn: u32) -> bool {
        lock(&self.window).accept(cmd_sn)
    }

    pub fn connections(&self) -> usize {
        lock(&self.conns).len()
    }

    /// Adds a connection; a connection already using `cid` is closed
    /// (connection reinstatement).
    pub fn add_conn(&self, cid: u16, kill: watch::Sender<bool>) {
        if let Some(old) = lock(&self.conns).insert(cid, kill) {
            let _ = old.send(true);
        }
    }

    /// Removes connection `cid` if it is still the one holding `kill`.
    /// Returns true when the session has no connection left.
    pub fn remove_conn(&self, cid: u16, kill: &watch::Sender<bool>) -> bool {
        let mut conns = lock(&self.conns);
        if conns.get(&cid).is_some_and(|k| k.same_channel(kill)) {
            conns.remove(&cid);
        }
        conns.is_empty()
    }

    /// Closes connection `cid`; false if there is none.
    pub fn close_conn(&self, cid: u16) -> bool {
        lock(&self.conns).get(&cid).map(|k| k.send(true)).is_some()
    }

    /// Closes every connection of the session.
    pub fn close_all(&self) {
        for k in lock(&self.conns).values() {
            let _ = k.send(true);
        }
    }
}

/// Every session of a target.
#[derive(Debug, Default)]
pub struct Registry {
    sessions: HashMap<u16, Arc<Session>>,
    last_tsih: u16,
}

impl Registry {
    /// A TSIH not in use (never 0).
    pub fn allocate_tsih(&mut self) -> Option<u16> {
        for _ in 0..=u16::MAX {
            self.last_tsih = self.last_tsih.wrapping_add(1);
            if self.last_tsih != 0 && !self.sessions.contains_key(&self.last_tsih) {
                return Some(self.last_tsih);
            }
        }
        None
    }

    pub fn insert(&mut self, s: Arc<Session>) {
        self.sessions.insert(s.tsih, s);
    }

    pub fn get(&self, tsih: u16) -> Option<Arc<Session>> {
        self.sessions.get(&tsih).cloned()
    }

    /// The session of an initiator port (for reinstatement).
    pub fn find(&self, initiator_name: &str, isid: [u8; 6]) -> Option<Arc<Session>> {
        self.sessions.values().find(|s| s.initiator_name == initiator_name && s.isid == isid).cloned()
    }

    /// Removes `s` if it is still registered under its TSIH.
    pub fn remove(&mut self, s: &Arc<Session>) {
        if self.sessions.get(&s.tsih).is_some_and(|cur| Arc::ptr_eq(cur, s)) {
            self.sessions.remove(&s.tsih);
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_in_order_and_out_of_order() {
        let mut w = Window::new(10, 4);
        assert_eq!((w.exp(), w.max()), (10, 13));
        assert!(!w.accept(9), "below the window");
        assert!(!w.accept(14), "above the window");
        assert!(w.accept(10));
        assert!(w.accept(12));
        assert!(!w.accept(12), "duplicate");
        assert_eq!(w.exp(), 11);
        assert!(w.accept(11));
        assert_eq!(w.exp(), 13);
    }

    #[test]
    fn window_wraps() {
        let mut w = Window::new(u32::MAX, 4);
        assert!(w.accept(u32::MAX));
        assert!(w.accept(0));
        assert_eq!(w.exp(), 1);
        assert!(!w.accept(u32::MAX));
    }

    #[test]
    fn tsih_is_never_zero() {
        let mut r = Registry { last_tsih: u16::MAX, ..Registry::default() };
        assert_eq!(r.allocate_tsih(), Some(1));
    }
}
