//! Drives the login state machine with arbitrary Login Requests: it must
//! never panic, and never complete a login that skipped CHAP.

#![no_main]

use jiva_iscsi::chap::Credentials;
use jiva_iscsi::login::{Config, Login, Step};
use jiva_iscsi::params::Limits;
use jiva_iscsi::pdu::{Decoded, Digests, Pdu, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cfg = Config {
        target_name: "iqn.2026-11.io.jiva:fuzz".into(),
        target_alias: None,
        tpgt: 1,
        initiator_chap: Some(Credentials::new("user", b"secret-secret".to_vec())),
        target_chap: None,
        limits: Limits::default(),
    };
    let mut login = Login::new(&cfg.limits);
    let mut rest = data;
    let mut random = |b: &mut [u8]| b.fill(7);
    while let Ok(Decoded::Complete { pdu, len, .. }) = decode(rest, Digests::default(), 1 << 16) {
        rest = &rest[len..];
        let Pdu::LoginRequest(req) = pdu else { continue };
        match login.step(&req, &cfg, &mut random) {
            Step::Continue(_) => {}
            Step::Fail(_) => break,
            Step::Done(_, outcome) => {
                // Only discovery sessions may get in without the CHAP
                // exchange, which random input cannot complete.
                assert_eq!(outcome.kind, jiva_iscsi::login::SessionKind::Discovery);
                break;
            }
        }
    }
});
