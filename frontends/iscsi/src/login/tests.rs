//! Login state machine: authentication, stages, refusals.

use super::*;

const TARGET: &str = "iqn.2026-11.io.jiva:vol";

fn cfg(chap: Option<(&str, &str)>, mutual: Option<(&str, &str)>) -> Config {
    Config {
        target_name: TARGET.into(),
        target_alias: None,
        tpgt: 1,
        initiator_chap: chap.map(|(u, s)| Credentials::new(u, s.as_bytes())),
        target_chap: mutual.map(|(u, s)| Credentials::new(u, s.as_bytes())),
        limits: Limits::default(),
    }
}

fn req(csg: u8, nsg: u8, transit: bool, pairs: &[(&str, &str)]) -> LoginRequest {
    LoginRequest {
        transit,
        cont: false,
        csg,
        nsg,
        version_max: 0,
        version_min: 0,
        isid: [0x80, 0, 0, 0, 0, 1],
        tsih: 0,
        itt: 1,
        cid: 0,
        cmd_sn: 5,
        exp_stat_sn: 0,
        data: Bytes::from(text::encode(pairs)),
    }
}

fn rng() -> impl FnMut(&mut [u8]) {
    let mut x = 7u8;
    move |b: &mut [u8]| {
        for v in b {
            x = x.wrapping_mul(31).wrapping_add(17);
            *v = x;
        }
    }
}

fn keys(resp: &LoginResponse) -> Vec<(String, String)> {
    text::parse(&resp.data).unwrap()
}

fn key(resp: &LoginResponse, k: &str) -> Option<String> {
    keys(resp).into_iter().find(|(n, _)| n == k).map(|(_, v)| v)
}

fn status_of(step: &Step) -> u16 {
    match step {
        Step::Fail(r) | Step::Continue(r) | Step::Done(r, _) => {
            (u16::from(r.status_class) << 8) | u16::from(r.status_detail)
        }
    }
}

const ID: [(&str, &str); 3] = [("InitiatorName", "iqn.i"), ("SessionType", "Normal"), ("TargetName", TARGET)];

#[test]
fn no_authentication_straight_to_full_feature() {
    let c = cfg(None, None);
    let mut l = Login::new(&c.limits);
    let mut pairs = ID.to_vec();
    pairs.extend([("AuthMethod", "None"), ("HeaderDigest", "CRC32C,None"), ("MaxBurstLength", "1048576")]);
    let step = l.step(&req(0, 1, true, &pairs), &c, &mut rng());
    let Step::Continue(r) = step else { panic!("{step:?}") };
    assert!(r.transit);
    assert_eq!(r.nsg, 1);
    assert_eq!(key(&r, "AuthMethod").as_deref(), Some("None"));
    assert_eq!(key(&r, "TargetPortalGroupTag").as_deref(), Some("1"));
    let step = l.step(&req(1, 3, true, &[("ImmediateData", "Yes"), ("InitialR2T", "No")]), &c, &mut rng());
    let Step::Done(r, out) = step else { panic!("{step:?}") };
    assert!(r.transit && r.nsg == 3);
    assert!(key(&r, "MaxRecvDataSegmentLength").is_some());
    assert_eq!(out.initiator_name, "iqn.i");
    assert_eq!(out.cmd_sn, 5);
    assert!(out.params.header_digest);
    assert!(!out.params.initial_r2t);
    assert_eq!(out.params.max_burst, 1 << 20);
}

fn chap_login(c: &Config, user: &str, secret: &[u8], mutual: Option<(u8, &[u8])>) -> (Step, Login) {
    let mut l = Login::new(&c.limits);
    let mut r = rng();
    let mut pairs = ID.to_vec();
    pairs.push(("AuthMethod", "CHAP,None"));
    let Step::Continue(resp) = l.step(&req(0, 1, true, &pairs), c, &mut r) else { panic!() };
    assert!(!resp.transit, "no transition before authentication");
    assert_eq!(key(&resp, "AuthMethod").as_deref(), Some("CHAP"));
    let Step::Continue(resp) = l.step(&req(0, 1, false, &[("CHAP_A", "7,5")]), c, &mut r) else { panic!() };
    assert_eq!(key(&resp, "CHAP_A").as_deref(), Some("5"));
    let id: u8 = key(&resp, "CHAP_I").unwrap().parse().unwrap();
    let challenge = chap::decode_binary(&key(&resp, "CHAP_C").unwrap()).unwrap();
    let answer = chap::encode_binary(&chap::response(id, secret, &challenge));
    let mut pairs = vec![("CHAP_N".to_string(), user.to_string()), ("CHAP_R".to_string(), answer)];
    if let Some((mid, mchal)) = mutual {
        pairs.push(("CHAP_I".into(), mid.to_string()));
        pairs.push(("CHAP_C".into(), chap::encode_binary(mchal)));
    }
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    (l.step(&req(0, 1, true, &pairs), c, &mut r), l)
}

#[test]
fn chap_right_secret_is_accepted() {
    let c = cfg(Some(("user", "secret123456")), None);
    let (step, mut l) = chap_login(&c, "user", b"secret123456", None);
    let Step::Continue(r) = step else { panic!("{step:?}") };
    assert!(r.transit && r.nsg == 1);
    assert!(matches!(l.step(&req(1, 3, true, &[]), &c, &mut rng()), Step::Done(..)));
}

#[test]
fn chap_wrong_secret_or_user_is_refused() {
    let c = cfg(Some(("user", "secret123456")), None);
    let (step, _) = chap_login(&c, "user", b"wrong", None);
    assert!(matches!(step, Step::Fail(_)));
    assert_eq!(status_of(&step), status::AUTHENTICATION_FAILED);
    let (step, _) = chap_login(&c, "other", b"secret123456", None);
    assert_eq!(status_of(&step), status::AUTHENTICATION_FAILED);
}

#[test]
fn mutual_chap_answers_the_initiator_challenge() {
    let c = cfg(Some(("user", "secret123456")), Some(("tgt", "tsecret123456")));
    let chal = [9u8; 16];
    let (step, _) = chap_login(&c, "user", b"secret123456", Some((42, &chal)));
    let Step::Continue(r) = step else { panic!("{step:?}") };
    assert_eq!(key(&r, "CHAP_N").as_deref(), Some("tgt"));
    let want = chap::encode_binary(&chap::response(42, b"tsecret123456", &chal));
    assert_eq!(key(&r, "CHAP_R"), Some(want));
    // Without target credentials, mutual CHAP cannot succeed.
    let c = cfg(Some(("user", "secret123456")), None);
    let (step, _) = chap_login(&c, "user", b"secret123456", Some((42, &chal)));
    assert_eq!(status_of(&step), status::AUTHENTICATION_FAILED);
}

#[test]
fn chap_required_refuses_none_and_skipping_security() {
    let c = cfg(Some(("user", "secret123456")), None);
    let mut l = Login::new(&c.limits);
    let mut pairs = ID.to_vec();
    pairs.push(("AuthMethod", "None"));
    assert_eq!(status_of(&l.step(&req(0, 1, true, &pairs), &c, &mut rng())), status::AUTHENTICATION_FAILED);
    let mut l = Login::new(&c.limits);
    assert_eq!(status_of(&l.step(&req(1, 3, true, &ID), &c, &mut rng())), status::AUTHENTICATION_FAILED);
    // Transit without ever offering an AuthMethod.
    let mut l = Login::new(&c.limits);
    assert_eq!(status_of(&l.step(&req(0, 1, true, &ID), &c, &mut rng())), status::AUTHENTICATION_FAILED);
}

#[test]
fn discovery_needs_no_target_name_or_chap() {
    let c = cfg(Some(("user", "secret123456")), None);
    let mut l = Login::new(&c.limits);
    let pairs = [("InitiatorName", "iqn.i"), ("SessionType", "Discovery"), ("AuthMethod", "None")];
    let step = l.step(&req(0, 3, true, &pairs), &c, &mut rng());
    let Step::Done(_, out) = step else { panic!("{step:?}") };
    assert_eq!(out.kind, SessionKind::Discovery);
}

#[test]
fn refusals() {
    let c = cfg(None, None);
    let mut l = Login::new(&c.limits);
    let step =
        l.step(&req(0, 1, true, &[("InitiatorName", "iqn.i"), ("TargetName", "iqn.nope")]), &c, &mut rng());
    assert_eq!(status_of(&step), status::NOT_FOUND);
    let mut l = Login::new(&c.limits);
    let step = l.step(&req(0, 1, true, &[("TargetName", TARGET)]), &c, &mut rng());
    assert_eq!(status_of(&step), status::MISSING_PARAMETER);
    let mut l = Login::new(&c.limits);
    let mut r = req(0, 1, true, &ID);
    r.version_min = 2;
    assert_eq!(status_of(&l.step(&r, &c, &mut rng())), status::UNSUPPORTED_VERSION);
    let mut l = Login::new(&c.limits);
    assert_eq!(status_of(&l.step(&req(3, 3, true, &ID), &c, &mut rng())), status::INVALID_DURING_LOGIN);
    // Stage 1 back to stage 0 is invalid; so is NSG 2.
    let mut l = Login::new(&c.limits);
    assert!(matches!(l.step(&req(1, 1, false, &ID), &c, &mut rng()), Step::Continue(_)));
    assert_eq!(status_of(&l.step(&req(0, 1, true, &[]), &c, &mut rng())), status::INVALID_DURING_LOGIN);
    let mut l = Login::new(&c.limits);
    assert_eq!(status_of(&l.step(&req(1, 2, true, &ID), &c, &mut rng())), status::INVALID_DURING_LOGIN);
    let mut l = Login::new(&c.limits);
    let mut bad = req(0, 1, true, &[]);
    bad.data = Bytes::from_static(b"garbage-without-equals\0");
    assert_eq!(status_of(&l.step(&bad, &c, &mut rng())), status::INITIATOR_ERROR);
}

#[test]
fn continued_text_is_joined() {
    let c = cfg(None, None);
    let mut l = Login::new(&c.limits);
    let full = text::encode(&ID);
    let (a, b) = full.split_at(10);
    let mut r1 = req(0, 1, false, &[]);
    r1.cont = true;
    r1.data = Bytes::copy_from_slice(a);
    let Step::Continue(resp) = l.step(&r1, &c, &mut rng()) else { panic!() };
    assert!(resp.data.is_empty());
    let mut r2 = req(0, 3, true, &[]);
    r2.data = Bytes::copy_from_slice(b);
    assert!(matches!(l.step(&r2, &c, &mut rng()), Step::Done(..)));
}

#[test]
fn unknown_keys_are_not_understood() {
    let c = cfg(None, None);
    let mut l = Login::new(&c.limits);
    let mut pairs = ID.to_vec();
    pairs.push(("X-vendor.thing", "1"));
    pairs.push(("Bogus", "1"));
    let Step::Continue(r) = l.step(&req(1, 1, false, &pairs), &c, &mut rng()) else { panic!() };
    assert_eq!(key(&r, "X-vendor.thing").as_deref(), Some("NotUnderstood"));
    assert_eq!(key(&r, "Bogus").as_deref(), Some("NotUnderstood"));
}

#[test]
fn identity_keys_cannot_change_after_the_first_request() {
    // A discovery login (no CHAP needed) must not turn into a normal one.
    let c = cfg(Some(("user", "secret123456")), None);
    let mut l = Login::new(&c.limits);
    let pairs = [("InitiatorName", "iqn.i"), ("SessionType", "Discovery"), ("AuthMethod", "None")];
    assert!(matches!(l.step(&req(0, 1, true, &pairs), &c, &mut rng()), Step::Continue(_)));
    let switch = [("SessionType", "Normal"), ("TargetName", TARGET)];
    assert_eq!(status_of(&l.step(&req(1, 3, true, &switch), &c, &mut rng())), status::INITIATOR_ERROR);
}
