//! Operational parameter negotiation (RFC 7143 13): the keys, their
//! defaults, the result functions (min, max, AND, OR, list selection), and
//! the target's own preferences. Pure: one key in, the value to answer out.

/// What the target offers and accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// MaxRecvDataSegmentLength we declare (largest data segment we accept).
    pub max_recv_data_segment: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub max_outstanding_r2t: u16,
    pub max_connections: u16,
    pub immediate_data: bool,
    pub initial_r2t: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_recv_data_segment: 256 * 1024,
            max_burst: 16 * 1024 * 1024 - 1024,
            first_burst: 256 * 1024,
            max_outstanding_r2t: 8,
            max_connections: 8,
            immediate_data: true,
            initial_r2t: false,
        }
    }
}

/// The negotiated values of a session and connection (RFC defaults until
/// a key changes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The initiator's MaxRecvDataSegmentLength: the largest data segment
    /// we may send it.
    pub max_send_data_segment: u32,
    /// Our MaxRecvDataSegmentLength.
    pub max_recv_data_segment: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u16,
    pub max_connections: u16,
    pub error_recovery_level: u8,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
}

impl Default for Negotiated {
    fn default() -> Negotiated {
        Negotiated {
            header_digest: false,
            data_digest: false,
            max_send_data_segment: 8192,
            max_recv_data_segment: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            max_connections: 1,
            error_recovery_level: 0,
            default_time2wait: 2,
            default_time2retain: 20,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
        }
    }
}

/// Smallest and largest data segment / burst lengths (RFC 7143 13.12-14).
const LEN_RANGE: (u64, u64) = (512, (1 << 24) - 1);

fn number(v: &str) -> Option<u64> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else {
        v.parse().ok()
    }
}

fn in_range(v: &str, lo: u64, hi: u64) -> Option<u64> {
    number(v).filter(|n| (lo..=hi).contains(n))
}

fn boolean(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes".into() } else { "No".into() }
}

/// Picks the first value of the initiator's digest list we support.
fn digest(v: &str) -> Option<bool> {
    v.split(',').find_map(|d| match d {
        "CRC32C" => Some(true),
        "None" => Some(false),
        _ => None,
    })
}

/// Whether the key is an operational key this module negotiates.
pub fn is_operational(key: &str) -> bool {
    matches!(
        key,
        "HeaderDigest"
            | "DataDigest"
            | "MaxRecvDataSegmentLength"
            | "MaxBurstLength"
            | "FirstBurstLength"
            | "InitialR2T"
            | "ImmediateData"
            | "MaxOutstandingR2T"
            | "MaxConnections"
            | "ErrorRecoveryLevel"
            | "DefaultTime2Wait"
            | "DefaultTime2Retain"
            | "DataPDUInOrder"
            | "DataSequenceInOrder"
            | "OFMarker"
            | "IFMarker"
            | "OFMarkInt"
            | "IFMarkInt"
            | "TaskReporting"
    )
}

impl Negotiated {
    /// Starts from the RFC defaults with our declared receive limit.
    pub fn new(limits: &Limits) -> Negotiated {
        Negotiated { max_recv_data_segment: limits.max_recv_data_segment, ..Negotiated::default() }
    }

    /// Negotiates one operational key offered by the initiator. Returns the
    /// value to answer, or `None` for declarative keys that need no answer.
    /// Values out of range or malformed are answered `Reject` (the default
    /// stays in force); keys we do not know are `NotUnderstood`.
    pub fn offer(&mut self, key: &str, value: &str, limits: &Limits) -> Option<String> {
        let reject = || Some("Reject".to_string());
        match key {
            "HeaderDigest" | "DataDigest" => {
                let Some(on) = digest(value) else { return reject() };
                if key == "HeaderDigest" {
                    self.header_digest = on;
                } else {
                    self.data_digest = on;
                }
                Some(if on { "CRC32C".into() } else { "None".into() })
            }
            "MaxRecvDataSegmentLength" => {
                if let Some(n) = in_range(value, LEN_RANGE.0, LEN_RANGE.1) {
                    self.max_send_data_segment = n as u32;
                }
                None
            }
            "MaxBurstLength" => {
                let Some(n) = in_range(value, LEN_RANGE.0, LEN_RANGE.1) else { return reject() };
                self.max_burst = (n as u32).min(limits.max_burst);
                Some(self.max_burst.to_string())
            }
            "FirstBurstLength" => {
                let Some(n) = in_range(value, LEN_RANGE.0, LEN_RANGE.1) else { return reject() };
                self.first_burst = (n as u32).min(limits.first_burst);
                Some(self.first_burst.to_string())
            }
            "InitialR2T" => {
                let Some(b) = boolean(value) else { return reject() };
                self.initial_r2t = b || limits.initial_r2t;
                Some(yes_no(self.initial_r2t))
            }
            "ImmediateData" => {
                let Some(b) = boolean(value) else { return reject() };
                self.immediate_data = b && limits.immediate_data;
                Some(yes_no(self.immediate_data))
            }
            "MaxOutstandingR2T" => {
                let Some(n) = in_range(value, 1, 65535) else { return reject() };
                self.max_outstanding_r2t = (n as u16).min(limits.max_outstanding_r2t);
                Some(self.max_outstanding_r2t.to_string())
            }
            "MaxConnections" => {
                let Some(n) = in_range(value, 1, 65535) else { return reject() };
                self.max_connections = (n as u16).min(limits.max_connections);
                Some(self.max_connections.to_string())
            }
            "ErrorRecoveryLevel" => {
                if in_range(value, 0, 2).is_none() {
                    return reject();
                }
                // Only level 0 is implemented.
                self.error_recovery_level = 0;
                Some("0".into())
            }
            "DefaultTime2Wait" => {
                let Some(n) = in_range(value, 0, 3600) else { return reject() };
                self.default_time2wait = (n as u16).max(2);
                Some(self.default_time2wait.to_string())
            }
            "DefaultTime2Retain" => {
                if in_range(value, 0, 3600).is_none() {
                    return reject();
                }
                // Without connection recovery there is nothing to retain.
                self.default_time2retain = 0;
                Some("0".into())
            }
            "DataPDUInOrder" | "DataSequenceInOrder" => {
                if boolean(value).is_none() {
                    return reject();
                }
                // We need both in order: OR with our Yes.
                Some("Yes".into())
            }
            "OFMarker" | "IFMarker" => {
                if boolean(value).is_none() {
                    return reject();
                }
                Some("No".into())
            }
            "OFMarkInt" | "IFMarkInt" => Some("Irrelevant".into()),
            "TaskReporting" => Some("RFC3720".into()),
            _ => Some("NotUnderstood".into()),
        }
    }

    /// Consistency after negotiation: the first burst never exceeds the
    /// maximum burst.
    pub fn finish(&mut self) {
        self.first_burst = self.first_burst.min(self.max_burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_functions() {
        let l = Limits::default();
        let mut n = Negotiated::new(&l);
        assert_eq!(n.offer("HeaderDigest", "None,CRC32C", &l).as_deref(), Some("None"));
        assert_eq!(n.offer("DataDigest", "CRC32C,None", &l).as_deref(), Some("CRC32C"));
        assert!(n.data_digest && !n.header_digest);
        assert_eq!(n.offer("MaxBurstLength", "262144", &l).as_deref(), Some("262144"));
        assert_eq!(n.offer("FirstBurstLength", "16777215", &l).as_deref(), Some("262144"));
        assert_eq!(n.offer("InitialR2T", "No", &l).as_deref(), Some("No"));
        assert_eq!(n.offer("InitialR2T", "Yes", &l).as_deref(), Some("Yes"));
        assert_eq!(n.offer("ImmediateData", "Yes", &l).as_deref(), Some("Yes"));
        assert_eq!(n.offer("MaxRecvDataSegmentLength", "65536", &l), None);
        assert_eq!(n.max_send_data_segment, 65536);
        assert_eq!(n.offer("ErrorRecoveryLevel", "2", &l).as_deref(), Some("0"));
        assert_eq!(n.offer("MaxConnections", "1", &l).as_deref(), Some("1"));
        assert_eq!(n.offer("X-com.example.foo", "1", &l).as_deref(), Some("NotUnderstood"));
        assert_eq!(n.offer("MaxBurstLength", "12", &l).as_deref(), Some("Reject"));
        assert_eq!(n.offer("HeaderDigest", "MD5", &l).as_deref(), Some("Reject"));
        assert_eq!(n.offer("MaxBurstLength", "0x1000", &l).as_deref(), Some("4096"));
        n.finish();
        assert!(n.first_burst <= n.max_burst);
    }
}
