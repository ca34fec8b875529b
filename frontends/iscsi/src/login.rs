//! The login phase (RFC 7143 6) as a pure state machine: one Login Request
//! in, one Login Response out. It handles the security stage (CHAP with
//! MD5, one-way or mutual, or no authentication), the operational stage
//! (via [`crate::params`]), stage transitions, text continued over several
//! PDUs, and the checks on who may log in to what.
//!
//! The connection driver owns the I/O: it fills in the sequence numbers
//! and the TSIH of the final response, and registers the session.

use bytes::Bytes;

use crate::chap::{self, Credentials};
use crate::params::{self, Limits, Negotiated};
use crate::pdu::{LoginRequest, LoginResponse};
use crate::text;

/// Login status class and detail (RFC 7143 11.13.5), as one number.
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const INITIATOR_ERROR: u16 = 0x0200;
    pub const AUTHENTICATION_FAILED: u16 = 0x0201;
    pub const AUTHORIZATION_FAILED: u16 = 0x0202;
    pub const NOT_FOUND: u16 = 0x0203;
    pub const UNSUPPORTED_VERSION: u16 = 0x0205;
    pub const TOO_MANY_CONNECTIONS: u16 = 0x0206;
    pub const MISSING_PARAMETER: u16 = 0x0207;
    pub const CANT_INCLUDE_IN_SESSION: u16 = 0x0208;
    pub const SESSION_TYPE_NOT_SUPPORTED: u16 = 0x0209;
    pub const SESSION_DOES_NOT_EXIST: u16 = 0x020a;
    pub const INVALID_DURING_LOGIN: u16 = 0x020b;
    pub const TARGET_ERROR: u16 = 0x0300;
    pub const SERVICE_UNAVAILABLE: u16 = 0x0301;
    pub const OUT_OF_RESOURCES: u16 = 0x0302;
}

/// Login stages (CSG/NSG values).
pub const SECURITY: u8 = 0;
pub const OPERATIONAL: u8 = 1;
pub const FULL_FEATURE: u8 = 3;

/// Most bytes of login text accepted across continued PDUs.
pub const MAX_LOGIN_TEXT: usize = 64 * 1024;

/// What a target lets in.
#[derive(Clone, Debug)]
pub struct Config {
    pub target_name: String,
    pub target_alias: Option<String>,
    pub tpgt: u16,
    /// Credentials initiators must present (one-way CHAP) for normal
    /// sessions; `None`: no authentication.
    pub initiator_chap: Option<Credentials>,
    /// Our credentials, for initiators that authenticate the target
    /// (mutual CHAP).
    pub target_chap: Option<Credentials>,
    pub limits: Limits,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionKind {
    Normal,
    Discovery,
}

/// A completed login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    pub kind: SessionKind,
    pub isid: [u8; 6],
    /// TSIH the initiator asked for (0: a new session).
    pub tsih: u16,
    pub cid: u16,
    /// CmdSN of the login request: the session's first expected CmdSN.
    pub cmd_sn: u32,
    pub params: Negotiated,
}

/// What to do after a Login Request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this response and wait for the next request.
    Continue(LoginResponse),
    /// Send this failure response and close the connection.
    Fail(LoginResponse),
    /// Login complete: set up the session, then send this response.
    Done(LoginResponse, Outcome),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Auth {
    /// No AuthMethod seen yet.
    Start,
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    Algorithm,
    /// Challenge sent; waiting for CHAP_N and CHAP_R.
    Response {
        id: u8,
        challenge: Vec<u8>,
    },
    Done,
}

/// The state of one connection's login.
#[derive(Debug)]
pub struct Login {
    stage: Option<u8>,
    auth: Auth,
    isid: [u8; 6],
    tsih: u16,
    cid: u16,
    cmd_sn: u32,
    initiator_name: Option<String>,
    initiator_alias: Option<String>,
    kind: SessionKind,
    target_name: Option<String>,
    params: Negotiated,
    pending: Vec<u8>,
    texts: usize,
    declared_limits: bool,
}

fn answer(resp: &mut LoginResponse, pairs: &[(String, String)]) {
    resp.data = Bytes::from(text::encode(pairs));
}

fn fail(mut resp: LoginResponse, code: u16) -> Step {
    resp.status_class = (code >> 8) as u8;
    resp.status_detail = code as u8;
    resp.transit = false;
    resp.nsg = 0;
    resp.data = Bytes::new();
    Step::Fail(resp)
}

impl Login {
    pub fn new(limits: &Limits) -> Login {
        Login {
            stage: None,
            auth: Auth::Start,
            isid: [0; 6],
            tsih: 0,
            cid: 0,
            cmd_sn: 0,
            initiator_name: None,
            initiator_alias: None,
            kind: SessionKind::Normal,
            target_name: None,
            params: Negotiated::new(limits),
            pending: Vec::new(),
            texts: 0,
            declared_limits: false,
        }
    }

    /// The session type asked for so far.
    pub fn kind(&self) -> SessionKind {
        self.kind
    }

    fn chap_required(&self, cfg: &Config) -> bool {
        cfg.initiator_chap.is_some() && self.kind == SessionKind::Normal
    }

    /// Handles one Login Request. `random` fills buffers with random bytes
    /// (CHAP identifiers and challenges).
    pub fn step(&mut self, req: &LoginRequest, cfg: &Config, random: &mut dyn FnMut(&mut [u8])) -> Step {
        let mut resp = LoginResponse {
            transit: false,
            cont: false,
            csg: req.csg,
            nsg: 0,
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: req.tsih,
            itt: req.itt,
            stat_sn: 0,
            exp_cmd_sn: 0,
            max_cmd_sn: 0,
            status_class: 0,
            status_detail: 0,
            data: Bytes::new(),
        };
        if req.version_min > 0 {
            return fail(resp, status::UNSUPPORTED_VERSION);
        }
        let stage = match self.stage {
            None => {
                if req.csg != SECURITY && req.csg != OPERATIONAL {
                    return fail(resp, status::INVALID_DURING_LOGIN);
                }
                self.isid = req.isid;
                self.tsih = req.tsih;
                self.cid = req.cid;
                self.cmd_sn = req.cmd_sn;
                self.stage = Some(req.csg);
                req.csg
            }
            Some(stage) => {
                if req.isid != self.isid || req.tsih != self.tsih || req.cid != self.cid {
                    return fail(resp, status::INITIATOR_ERROR);
                }
                if req.csg != stage {
                    return fail(resp, status::INVALID_DURING_LOGIN);
                }
                stage
            }
        };
        if self.pending.len() + req.data.len() > MAX_LOGIN_TEXT {
            return fail(resp, status::INITIATOR_ERROR);
        }
        self.pending.extend_from_slice(&req.data);
        if req.cont {
            // More text follows: acknowledge with an empty response.
            return Step::Continue(resp);
        }
        let pairs = match text::parse(&std::mem::take(&mut self.pending)) {
            Ok(pairs) => pairs,
            Err(_) => return fail(resp, status::INITIATOR_ERROR),
        };
        let first = self.texts == 0;
        self.texts += 1;

        let mut out: Vec<(String, String)> = Vec::new();
        let mut auth_method = None;
        let mut chap: Vec<(String, String)> = Vec::new();
        for (k, v) in pairs {
            // Who logs in to what is declared once, in the first request;
            // changing it later (say, from a discovery session that needs
            // no CHAP to a normal one) is refused.
            if !first && matches!(k.as_str(), "InitiatorName" | "SessionType" | "TargetName") {
                return fail(resp, status::INITIATOR_ERROR);
            }
            match k.as_str() {
                "InitiatorName" => self.initiator_name = Some(v),
                "InitiatorAlias" => self.initiator_alias = Some(v),
                "SessionType" => {
                    self.kind = match v.as_str() {
                        "Normal" => SessionKind::Normal,
                        "Discovery" => SessionKind::Discovery,
                        _ => return fail(resp, status::SESSION_TYPE_NOT_SUPPORTED),
                    }
                }
                "TargetName" => self.target_name = Some(v),
                "AuthMethod" => auth_method = Some(v),
                k if k.starts_with("CHAP_") => chap.push((k.to_owned(), v)),
                "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => {}
                "SendTargets" => out.push((k, "Irrelevant".into())),
                k if params::is_operational(k) || k.starts_with("X-") || k.starts_with("X#") => {
                    if let Some(ans) = self.params.offer(k, &v, &cfg.limits) {
                        out.push((k.to_owned(), ans));
                    }
                }
                _ => out.push((k, "NotUnderstood".into())),
            }
        }

        if first {
            let Some(name) = &self.initiator_name else { return fail(resp, status::MISSING_PARAMETER) };
            if name.is_empty() {
                return fail(resp, status::MISSING_PARAMETER);
            }
            if self.kind == SessionKind::Normal {
                match &self.target_name {
                    None => return fail(resp, status::MISSING_PARAMETER),
                    Some(t) if t != &cfg.target_name => return fail(resp, status::NOT_FOUND),
                    Some(_) => {}
                }
                out.push(("TargetPortalGroupTag".into(), cfg.tpgt.to_string()));
                if let Some(alias) = &cfg.target_alias {
                    out.push(("TargetAlias".into(), alias.clone()));
                }
            }
            if stage == OPERATIONAL && self.chap_required(cfg) {
                // Skipping the security stage is not allowed.
                return fail(resp, status::AUTHENTICATION_FAILED);
            }
        }

        if stage == SECURITY
            && let Err(code) = self.authenticate(auth_method, &chap, cfg, &mut out, random)
        {
            return fail(resp, code);
        }

        // Stage transition.
        let mut done = false;
        if req.transit {
            let authenticated =
                self.auth == Auth::Done || (self.auth == Auth::Start && !self.chap_required(cfg));
            if stage == SECURITY && !authenticated {
                if self.auth == Auth::Start {
                    return fail(resp, status::AUTHENTICATION_FAILED);
                }
                // Still exchanging CHAP keys: stay in this stage.
            } else {
                let valid = match stage {
                    SECURITY => req.nsg == OPERATIONAL || req.nsg == FULL_FEATURE,
                    _ => req.nsg == FULL_FEATURE,
                };
                if !valid {
                    return fail(resp, status::INVALID_DURING_LOGIN);
                }
                if stage == SECURITY {
                    self.auth = Auth::Done;
                }
                resp.transit = true;
                resp.nsg = req.nsg;
                done = req.nsg == FULL_FEATURE;
                self.stage = Some(req.nsg);
            }
        }
        // Declare our receive limit once we are past security.
        if !self.declared_limits && (stage == OPERATIONAL || done) {
            out.push(("MaxRecvDataSegmentLength".into(), cfg.limits.max_recv_data_segment.to_string()));
            self.declared_limits = true;
        }
        answer(&mut resp, &out);
        if !done {
            return Step::Continue(resp);
        }
        let mut params = self.params;
        params.finish();
        let outcome = Outcome {
            initiator_name: self.initiator_name.clone().unwrap_or_default(),
            initiator_alias: self.initiator_alias.clone(),
            kind: self.kind,
            isid: self.isid,
            tsih: self.tsih,
            cid: self.cid,
            cmd_sn: self.cmd_sn,
            params,
        };
        Step::Done(resp, outcome)
    }

    /// Security stage keys. `Err` is the login status to fail with.
    fn authenticate(
        &mut self,
        method: Option<String>,
        chap: &[(String, String)],
        cfg: &Config,
        out: &mut Vec<(String, String)>,
        random: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), u16> {
        let key = |name: &str| chap.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        if let Some(method) = method {
            if self.auth != Auth::Start {
                return Err(status::INITIATOR_ERROR);
            }
            let offered: Vec<&str> = method.split(',').collect();
            if self.chap_required(cfg) {
                if !offered.contains(&"CHAP") {
                    out.push(("AuthMethod".into(), "Reject".into()));
                    return Err(status::AUTHENTICATION_FAILED);
                }
                out.push(("AuthMethod".into(), "CHAP".into()));
                self.auth = Auth::Algorithm;
            } else if offered.contains(&"None") {
                out.push(("AuthMethod".into(), "None".into()));
                self.auth = Auth::Done;
            } else {
                // The initiator insists on authentication we are not set up for.
                return Err(status::AUTHENTICATION_FAILED);
            }
        }
        if self.auth == Auth::Algorithm
            && let Some(algorithms) = key("CHAP_A")
        {
            if !algorithms.split(',').any(|a| a == chap::ALGORITHM_MD5) {
                return Err(status::AUTHENTICATION_FAILED);
            }
            let mut id = [0u8; 1];
            random(&mut id);
            let mut challenge = vec![0u8; chap::CHALLENGE_LEN];
            random(&mut challenge);
            out.push(("CHAP_A".into(), chap::ALGORITHM_MD5.into()));
            out.push(("CHAP_I".into(), id[0].to_string()));
            out.push(("CHAP_C".into(), chap::encode_binary(&challenge)));
            self.auth = Auth::Response { id: id[0], challenge };
            return Ok(());
        }
        if let Auth::Response { id, challenge } = &self.auth {
            let (Some(name), Some(resp)) = (key("CHAP_N"), key("CHAP_R")) else {
                return if chap.is_empty() { Ok(()) } else { Err(status::AUTHENTICATION_FAILED) };
            };
            let Some(creds) = &cfg.initiator_chap else { return Err(status::AUTHENTICATION_FAILED) };
            let expected = chap::response(*id, &creds.secret, challenge);
            let got = chap::decode_binary(resp).unwrap_or_default();
            if name != creds.user || !chap::constant_time_eq(&got, &expected) {
                return Err(status::AUTHENTICATION_FAILED);
            }
            // Mutual CHAP: the initiator challenges us.
            match (key("CHAP_I"), key("CHAP_C")) {
                (None, None) => {}
                (Some(i), Some(c)) => {
                    let Some(ours) = &cfg.target_chap else { return Err(status::AUTHENTICATION_FAILED) };
                    let Ok(i) = i.parse::<u8>() else { return Err(status::AUTHENTICATION_FAILED) };
                    let Some(c) = chap::decode_binary(c) else { return Err(status::AUTHENTICATION_FAILED) };
                    // Refuse a reflected challenge (RFC 7143 12.1.3).
                    if c == *challenge {
                        return Err(status::AUTHENTICATION_FAILED);
                    }
                    out.push(("CHAP_N".into(), ours.user.clone()));
                    out.push(("CHAP_R".into(), chap::encode_binary(&chap::response(i, &ours.secret, &c))));
                }
                _ => return Err(status::AUTHENTICATION_FAILED),
            }
            self.auth = Auth::Done;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
