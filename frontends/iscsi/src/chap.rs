//! CHAP authentication as iSCSI uses it (RFC 1994, RFC 7143 12.1.3): MD5
//! responses over identifier, secret and challenge, and the binary value
//! encodings (`0x` hex, `0b` base64) of CHAP keys.

use md5::{Digest, Md5};

/// CHAP_A value for MD5, the only algorithm we offer.
pub const ALGORITHM_MD5: &str = "5";
/// Length of the challenges we send.
pub const CHALLENGE_LEN: usize = 16;
/// Longest binary value we decode (challenges may be up to 1024 bytes).
pub const MAX_BINARY_LEN: usize = 1024;

/// A CHAP name and secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub secret: Vec<u8>,
}

impl Credentials {
    pub fn new(user: impl Into<String>, secret: impl Into<Vec<u8>>) -> Credentials {
        Credentials { user: user.into(), secret: secret.into() }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).finish_non_exhaustive()
    }
}

/// The CHAP response: MD5(identifier || secret || challenge).
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Compares without an early exit, so timing does not reveal how much of
/// a response was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Encodes binary as `0x` + lower-case hex.
pub fn encode_binary(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("0x");
    for byte in b {
        s.push_str(&format!("{byte:02x}"));
    }
    s
}

/// Decodes a `0x`/`0X` hex or `0b`/`0B` base64 value.
pub fn decode_binary(s: &str) -> Option<Vec<u8>> {
    let (prefix, body) = (s.get(..2)?, s.get(2..)?);
    let out = match prefix {
        "0x" | "0X" => {
            if body.len() > 2 * MAX_BINARY_LEN {
                return None;
            }
            let digits: Vec<u8> =
                body.bytes().map(|c| (c as char).to_digit(16).map(|d| d as u8)).collect::<Option<_>>()?;
            // An odd number of digits has an implied leading zero.
            let mut out = Vec::with_capacity(digits.len().div_ceil(2));
            let mut iter = digits.iter();
            if digits.len() % 2 == 1 {
                out.push(*iter.next()?);
            }
            while let (Some(h), Some(l)) = (iter.next(), iter.next()) {
                out.push(h << 4 | l);
            }
            out
        }
        "0b" | "0B" => {
            if body.len() > MAX_BINARY_LEN.div_ceil(3) * 4 {
                return None;
            }
            base64_decode(body)?
        }
        _ => return None,
    };
    (!out.is_empty()).then_some(out)
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let body = s.trim_end_matches('=');
    if s.len() - body.len() > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in body.bytes() {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_response_matches_rfc1321_vector() {
        // MD5("abc") with id 'a' (0x61), secret "b", challenge "c".
        let r = response(b'a', b"b", b"c");
        assert_eq!(encode_binary(&r), "0x900150983cd24fb0d6963f7d28e17f72");
    }

    #[test]
    fn binary_encodings() {
        assert_eq!(decode_binary("0x0aff"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_binary("0XABC"), Some(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0bAQI="), Some(vec![1, 2]));
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("0x"), None);
        assert_eq!(decode_binary("12"), None);
        assert_eq!(decode_binary("0b!!"), None);
        let b = [0u8, 1, 2, 254, 255];
        assert_eq!(decode_binary(&encode_binary(&b)), Some(b.to_vec()));
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
