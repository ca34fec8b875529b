//! I_T nexus identity: who is talking to the logical unit. Reservations,
//! registrations and unit attentions are kept per nexus, so the transport
//! names each one (for iSCSI: initiator name plus ISID, and target port).

use std::fmt;
use std::sync::Arc;

/// SCSI transport protocol identifiers (SPC-4 7.6.1).
pub const PROTOCOL_ISCSI: u8 = 0x5;

/// One initiator port talking to one target port.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    initiator_port: Arc<str>,
    transport_id: Arc<[u8]>,
    target_port: u16,
    target_port_name: Arc<str>,
    protocol: u8,
}

impl Nexus {
    /// A nexus with explicit identifiers. `transport_id` is the initiator
    /// port's TransportID (reported by PERSISTENT RESERVE IN READ FULL STATUS).
    pub fn new(
        initiator_port: impl Into<Arc<str>>,
        transport_id: Vec<u8>,
        protocol: u8,
        target_port: u16,
        target_port_name: impl Into<Arc<str>>,
    ) -> Nexus {
        Nexus {
            initiator_port: initiator_port.into(),
            transport_id: transport_id.into(),
            target_port,
            target_port_name: target_port_name.into(),
            protocol,
        }
    }

    /// An iSCSI nexus: initiator port `NAME,i,0xISID`, target port
    /// `TARGET,t,0xTPGT` with relative port identifier `tpgt`.
    pub fn iscsi(initiator_name: &str, isid: [u8; 6], target_name: &str, tpgt: u16) -> Nexus {
        let isid_hex: String = isid.iter().map(|b| format!("{b:02x}")).collect();
        let port = format!("{initiator_name},i,0x{isid_hex}");
        // TransportID format 01b (initiator port), SPC-4 7.6.4.6: a
        // null-terminated name padded to a multiple of four bytes.
        let mut name = port.clone().into_bytes();
        name.push(0);
        name.resize(name.len().next_multiple_of(4), 0);
        let mut tid = vec![0x40 | PROTOCOL_ISCSI, 0];
        tid.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
        tid.extend_from_slice(&name);
        Nexus::new(port, tid, PROTOCOL_ISCSI, tpgt, format!("{target_name},t,0x{tpgt:04x}"))
    }

    /// The initiator port's name, e.g. `iqn.2004-10.com.example:host,i,0x00023d000001`.
    pub fn initiator_port(&self) -> &str {
        &self.initiator_port
    }

    pub fn transport_id(&self) -> &[u8] {
        &self.transport_id
    }

    /// Relative target port identifier.
    pub fn target_port(&self) -> u16 {
        self.target_port
    }

    /// SCSI name of the target port (for the device identification VPD page).
    pub fn target_port_name(&self) -> &str {
        &self.target_port_name
    }

    pub fn protocol(&self) -> u8 {
        self.protocol
    }
}

impl fmt::Debug for Nexus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nexus({} -> {})", self.initiator_port, self.target_port_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iscsi_transport_id_is_padded() {
        let n = Nexus::iscsi("iqn.a", [0, 2, 0x3d, 0, 0, 1], "iqn.t", 1);
        assert_eq!(n.initiator_port(), "iqn.a,i,0x00023d000001");
        let tid = n.transport_id();
        assert_eq!(tid[0], 0x45);
        let len = usize::from(u16::from_be_bytes([tid[2], tid[3]]));
        assert_eq!(len % 4, 0);
        assert_eq!(tid.len(), 4 + len);
        assert_eq!(&tid[4..4 + 22], b"iqn.a,i,0x00023d000001");
        assert_eq!(tid[4 + 22], 0);
        assert_eq!(n.target_port_name(), "iqn.t,t,0x0001");
    }
}
