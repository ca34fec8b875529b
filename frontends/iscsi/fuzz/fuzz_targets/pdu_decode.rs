//! Feeds arbitrary bytes to the PDU decoder under every digest setting:
//! it must never panic, and whatever it accepts must re-encode to bytes
//! that decode to the same PDU.

#![no_main]

use jiva_iscsi::pdu::{Decoded, Digests, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for (header, data_digest) in [(false, false), (true, false), (false, true), (true, true)] {
        let digests = Digests { header, data: data_digest };
        if let Ok(Decoded::Complete { pdu, .. }) = decode(data, digests, 1 << 20) {
            let bytes = pdu.encode(digests);
            match decode(&bytes, digests, 1 << 24) {
                Ok(Decoded::Complete { pdu: again, len, data_digest_ok }) => {
                    assert_eq!(len, bytes.len());
                    assert!(data_digest_ok);
                    assert_eq!(again, pdu);
                }
                other => panic!("re-encoded PDU does not decode: {other:?}"),
            }
        }
    }
});
