//! Text key=value pairs (RFC 7143 6.1): the payload of Login and Text
//! PDUs. Pure parsing and encoding, with bounded sizes.

/// Longest key name (RFC 7143 6.1: 63 bytes).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value we accept (large enough for CHAP challenges in hex).
pub const MAX_VALUE_LEN: usize = 8192;
/// Most pairs in one text.
pub const MAX_PAIRS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("text pair without '='")]
    NoEquals,
    #[error("invalid key name")]
    BadKey,
    #[error("value too long")]
    ValueTooLong,
    #[error("text is not UTF-8")]
    NotUtf8,
    #[error("too many text pairs")]
    TooMany,
}

fn key_ok(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= MAX_KEY_LEN
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'@' | b'_'))
}

/// Parses null-separated `key=value` pairs. Empty segments (padding, a
/// missing or doubled terminator) are skipped.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out = Vec::new();
    for seg in data.split(|&b| b == 0).filter(|s| !s.is_empty()) {
        if out.len() >= MAX_PAIRS {
            return Err(TextError::TooMany);
        }
        let s = std::str::from_utf8(seg).map_err(|_| TextError::NotUtf8)?;
        let (k, v) = s.split_once('=').ok_or(TextError::NoEquals)?;
        if !key_ok(k) {
            return Err(TextError::BadKey);
        }
        if v.len() > MAX_VALUE_LEN {
            return Err(TextError::ValueTooLong);
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

/// Encodes pairs as `key=value\0...`.
pub fn encode<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref().as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_ref().as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_pairs_and_padding() {
        let t = parse(b"InitiatorName=iqn.x\0SessionType=Normal\0\0\0").unwrap();
        assert_eq!(
            t,
            vec![("InitiatorName".into(), "iqn.x".into()), ("SessionType".into(), "Normal".into())]
        );
        assert_eq!(parse(b"A=b=c").unwrap(), vec![("A".into(), "b=c".into())]);
        assert_eq!(parse(b"novalue\0"), Err(TextError::NoEquals));
        assert_eq!(parse(b"=x\0"), Err(TextError::BadKey));
        assert_eq!(parse(b"K=\xff\0"), Err(TextError::NotUtf8));
    }

    proptest! {
        #[test]
        fn round_trip(pairs in proptest::collection::vec(("[A-Za-z][A-Za-z0-9._-]{0,20}", "[ -~]{0,40}"), 0..10)) {
            let bytes = encode(&pairs);
            let back = parse(&bytes).unwrap();
            let want: Vec<(String, String)> = pairs.into_iter().collect();
            prop_assert_eq!(back, want);
        }

        #[test]
        fn random_text_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&b);
        }
    }
}
