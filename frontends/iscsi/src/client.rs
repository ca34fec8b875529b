//! A minimal iSCSI initiator over any byte stream: login (with CHAP),
//! one command at a time with immediate, unsolicited and solicited data,
//! text, NOP, task management and logout. For tests and tools; it trusts
//! the target more than the target trusts it.

use bytes::{Bytes, BytesMut};
use jiva_scsi::Sense;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::chap;
use crate::pdu::{self, *};
use crate::text;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad PDU from target: {0}")]
    Pdu(#[from] PduError),
    #[error("login failed with status {0:#06x}")]
    Login(u16),
    #[error("target rejected a PDU (reason {0:#04x})")]
    Rejected(u8),
    #[error("unexpected PDU: {0}")]
    Unexpected(String),
}

/// How to log in.
#[derive(Clone, Debug)]
pub struct LoginOptions {
    pub initiator: String,
    /// Target name; `None` for a discovery session.
    pub target: Option<String>,
    pub chap: Option<(String, String)>,
    /// Our challenge for the target (mutual CHAP): expected name and secret.
    pub mutual: Option<(String, String)>,
    pub header_digest: bool,
    pub data_digest: bool,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_recv_data_segment: u32,
    pub first_burst: u32,
    pub max_burst: u32,
    pub max_connections: u16,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub cid: u16,
    pub cmd_sn: u32,
}

impl LoginOptions {
    pub fn normal(initiator: &str, target: &str) -> LoginOptions {
        LoginOptions {
            initiator: initiator.into(),
            target: Some(target.into()),
            chap: None,
            mutual: None,
            header_digest: false,
            data_digest: false,
            immediate_data: true,
            initial_r2t: false,
            max_recv_data_segment: 65536,
            first_burst: 65536,
            max_burst: 262_144,
            max_connections: 1,
            isid: [0x80, 0x12, 0x34, 0x56, 0x78, 0x01],
            tsih: 0,
            cid: 0,
            cmd_sn: 1,
        }
    }

    pub fn discovery(initiator: &str) -> LoginOptions {
        LoginOptions { target: None, ..LoginOptions::normal(initiator, "") }
    }
}

/// The end of a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u8,
    pub sense: Option<Sense>,
    pub data: Vec<u8>,
    pub residual: Residual,
}

/// A logged-in connection.
pub struct Client<S> {
    stream: S,
    buf: BytesMut,
    digests: Digests,
    pub itt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub tsih: u16,
    /// The target's MaxRecvDataSegmentLength.
    pub max_send: u32,
    pub first_burst: u32,
    pub max_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    /// Keys the target answered at login.
    pub login_keys: Vec<(String, String)>,
}

fn key<'a>(pairs: &'a [(String, String)], k: &str) -> Option<&'a str> {
    pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(stream: S, o: &LoginOptions) -> Client<S> {
        Client {
            stream,
            buf: BytesMut::new(),
            digests: Digests::default(),
            itt: 1,
            cmd_sn: o.cmd_sn,
            exp_stat_sn: 0,
            exp_cmd_sn: o.cmd_sn,
            max_cmd_sn: o.cmd_sn,
            tsih: o.tsih,
            max_send: 8192,
            first_burst: 65536,
            max_burst: 262_144,
            immediate_data: true,
            initial_r2t: true,
            login_keys: Vec::new(),
        }
    }

    /// Logs in (security stage with CHAP if asked, then operational).
    pub async fn login(stream: S, o: LoginOptions) -> Result<Client<S>, ClientError> {
        let mut c = Client::new(stream, &o);
        let mut first: Vec<(String, String)> = vec![("InitiatorName".into(), o.initiator.clone())];
        match &o.target {
            Some(t) => {
                first.push(("SessionType".into(), "Normal".into()));
                first.push(("TargetName".into(), t.clone()));
            }
            None => first.push(("SessionType".into(), "Discovery".into())),
        }
        first.push(("AuthMethod".into(), if o.chap.is_some() { "CHAP,None" } else { "None" }.into()));
        let mut keys = c.login_step(&o, 0, 1, true, &first).await?;
        if o.chap.is_some() && key(&keys, "AuthMethod") == Some("CHAP") {
            let (user, secret) = o.chap.clone().unwrap_or_default();
            let k = c.login_step(&o, 0, 1, false, &[("CHAP_A".into(), "5".into())]).await?;
            let id: u8 = key(&k, "CHAP_I").and_then(|v| v.parse().ok()).unwrap_or(0);
            let challenge = key(&k, "CHAP_C").and_then(chap::decode_binary).unwrap_or_default();
            let mut pairs = vec![
                ("CHAP_N".to_string(), user),
                (
                    "CHAP_R".to_string(),
                    chap::encode_binary(&chap::response(id, secret.as_bytes(), &challenge)),
                ),
            ];
            let mutual_challenge = [0x5a; 16];
            if o.mutual.is_some() {
                pairs.push(("CHAP_I".into(), "77".into()));
                pairs.push(("CHAP_C".into(), chap::encode_binary(&mutual_challenge)));
            }
            keys = c.login_step(&o, 0, 1, true, &pairs).await?;
            if let Some((name, secret)) = &o.mutual {
                let want = chap::encode_binary(&chap::response(77, secret.as_bytes(), &mutual_challenge));
                if key(&keys, "CHAP_N") != Some(name) || key(&keys, "CHAP_R") != Some(want.as_str()) {
                    return Err(ClientError::Unexpected("target failed mutual CHAP".into()));
                }
            }
        }
        c.login_keys.extend(keys);
        let yes_no = |b: bool| if b { "Yes" } else { "No" }.to_string();
        let digest = |b: bool| if b { "CRC32C,None" } else { "None" }.to_string();
        let ops = vec![
            ("HeaderDigest".to_string(), digest(o.header_digest)),
            ("DataDigest".into(), digest(o.data_digest)),
            ("MaxRecvDataSegmentLength".into(), o.max_recv_data_segment.to_string()),
            ("ImmediateData".into(), yes_no(o.immediate_data)),
            ("InitialR2T".into(), yes_no(o.initial_r2t)),
            ("FirstBurstLength".into(), o.first_burst.to_string()),
            ("MaxBurstLength".into(), o.max_burst.to_string()),
            ("MaxConnections".into(), o.max_connections.to_string()),
            ("ErrorRecoveryLevel".into(), "0".into()),
        ];
        let keys = c.login_step(&o, 1, 3, true, &ops).await?;
        let get = |k: &str| key(&keys, k).map(str::to_owned);
        c.digests = Digests {
            header: get("HeaderDigest").as_deref() == Some("CRC32C"),
            data: get("DataDigest").as_deref() == Some("CRC32C"),
        };
        c.max_send = get("MaxRecvDataSegmentLength").and_then(|v| v.parse().ok()).unwrap_or(8192);
        c.first_burst = get("FirstBurstLength").and_then(|v| v.parse().ok()).unwrap_or(65536);
        c.max_burst = get("MaxBurstLength").and_then(|v| v.parse().ok()).unwrap_or(262_144);
        c.immediate_data = get("ImmediateData").as_deref() != Some("No");
        c.initial_r2t = get("InitialR2T").as_deref() != Some("No");
        c.login_keys.extend(keys);
        Ok(c)
    }

    async fn login_step(
        &mut self,
        o: &LoginOptions,
        csg: u8,
        nsg: u8,
        transit: bool,
        pairs: &[(String, String)],
    ) -> Result<Vec<(String, String)>, ClientError> {
        let req = Pdu::LoginRequest(LoginRequest {
            transit,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid: o.isid,
            tsih: self.tsih,
            itt: self.itt,
            cid: o.cid,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            data: Bytes::from(text::encode(pairs)),
        });
        self.send(&req).await?;
        match self.recv().await? {
            Pdu::LoginResponse(r) => {
                if r.status_class != 0 {
                    return Err(ClientError::Login(
                        (u16::from(r.status_class) << 8) | u16::from(r.status_detail),
                    ));
                }
                self.tsih = r.tsih;
                self.exp_stat_sn = r.stat_sn.wrapping_add(1);
                self.exp_cmd_sn = r.exp_cmd_sn;
                self.max_cmd_sn = r.max_cmd_sn;
                Ok(text::parse(&r.data).map_err(|e| ClientError::Unexpected(e.to_string()))?)
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub fn digests(&self) -> Digests {
        self.digests
    }

    /// The underlying stream (to write raw bytes in hostile tests).
    pub fn stream(&mut self) -> &mut S {
        &mut self.stream
    }

    pub async fn send(&mut self, p: &Pdu) -> std::io::Result<()> {
        self.stream.write_all(&p.encode(self.digests)).await?;
        self.stream.flush().await
    }

    /// Reads the next PDU, tracking StatSN and the command window.
    pub async fn recv(&mut self) -> Result<Pdu, ClientError> {
        loop {
            match pdu::decode(&self.buf, self.digests, MAX_DATA_SEGMENT)? {
                Decoded::Complete { pdu, len, .. } => {
                    let _ = self.buf.split_to(len);
                    let (stat, exp, max) = match &pdu {
                        Pdu::ScsiResponse(r) => (Some(r.stat_sn), r.exp_cmd_sn, r.max_cmd_sn),
                        Pdu::DataIn(d) => (d.status.map(|_| d.stat_sn), d.exp_cmd_sn, d.max_cmd_sn),
                        Pdu::NopIn(n) if n.itt != RESERVED_TAG => {
                            (Some(n.stat_sn), n.exp_cmd_sn, n.max_cmd_sn)
                        }
                        Pdu::TextResponse(t) => (Some(t.stat_sn), t.exp_cmd_sn, t.max_cmd_sn),
                        Pdu::TaskMgmtResponse(t) => (Some(t.stat_sn), t.exp_cmd_sn, t.max_cmd_sn),
                        Pdu::LogoutResponse(l) => (Some(l.stat_sn), l.exp_cmd_sn, l.max_cmd_sn),
                        Pdu::Reject(r) => (Some(r.stat_sn), r.exp_cmd_sn, r.max_cmd_sn),
                        Pdu::R2t(r) => (None, r.exp_cmd_sn, r.max_cmd_sn),
                        _ => (None, self.exp_cmd_sn, self.max_cmd_sn),
                    };
                    if let Some(s) = stat {
                        self.exp_stat_sn = s.wrapping_add(1);
                    }
                    self.exp_cmd_sn = exp;
                    self.max_cmd_sn = max;
                    return Ok(pdu);
                }
                Decoded::Incomplete(_) => {
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                    }
                }
            }
        }
    }

    fn next_itt(&mut self) -> u32 {
        self.itt = self.itt.wrapping_add(1);
        self.itt
    }

    fn next_cmd_sn(&mut self) -> u32 {
        let sn = self.cmd_sn;
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        sn
    }

    /// Runs one SCSI command to completion. `data_out` makes it a write;
    /// otherwise `read_len` is the expected Data-In length.
    pub async fn command(
        &mut self,
        cdb: &[u8],
        data_out: Option<&[u8]>,
        read_len: u32,
    ) -> Result<Response, ClientError> {
        let itt = self.next_itt();
        let cmd_sn = self.next_cmd_sn();
        let out = data_out.unwrap_or_default();
        let edtl = if data_out.is_some() { out.len() as u32 } else { read_len };
        let imm = if data_out.is_some() && self.immediate_data {
            out.len().min(self.first_burst as usize).min(self.max_send as usize)
        } else {
            0
        };
        let unsolicited_end = if data_out.is_some() && !self.initial_r2t {
            out.len().min(self.first_burst as usize)
        } else {
            imm
        };
        let mut cdb16 = cdb.to_vec();
        cdb16.resize(cdb.len().max(16), 0);
        self.send(&Pdu::ScsiCommand(ScsiCommand {
            immediate: false,
            final_: unsolicited_end == imm,
            read: data_out.is_none() && read_len > 0,
            write: data_out.is_some(),
            attr: 1,
            lun: 0,
            itt,
            edtl,
            cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb: cdb16,
            bidi_read_len: None,
            data: Bytes::copy_from_slice(&out[..imm]),
        }))
        .await?;
        if unsolicited_end > imm {
            self.send_data(itt, RESERVED_TAG, out, imm, unsolicited_end).await?;
        }
        let mut data = Vec::new();
        loop {
            match self.recv().await? {
                Pdu::R2t(r) if r.itt == itt => {
                    let start = r.offset as usize;
                    let end = (start + r.desired_len as usize).min(out.len());
                    self.send_data(itt, r.ttt, out, start, end).await?;
                }
                Pdu::DataIn(d) if d.itt == itt => {
                    let at = d.offset as usize;
                    if data.len() < at + d.data.len() {
                        data.resize(at + d.data.len(), 0);
                    }
                    data[at..at + d.data.len()].copy_from_slice(&d.data);
                    if let Some(status) = d.status {
                        return Ok(Response { status, sense: None, data, residual: d.residual });
                    }
                }
                Pdu::ScsiResponse(r) if r.itt == itt => {
                    let sense = (r.data.len() > 2).then(|| Sense::parse(&r.data[2..])).flatten();
                    return Ok(Response { status: r.status, sense, data, residual: r.residual });
                }
                Pdu::NopIn(n) if n.itt == RESERVED_TAG => self.answer_ping(&n).await?,
                Pdu::Reject(r) => return Err(ClientError::Rejected(r.reason)),
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    async fn send_data(
        &mut self,
        itt: u32,
        ttt: u32,
        out: &[u8],
        start: usize,
        end: usize,
    ) -> std::io::Result<()> {
        let mut pos = start;
        let mut sn = 0;
        while pos < end {
            let n = (end - pos).min(self.max_send as usize);
            self.send(&Pdu::DataOut(DataOut {
                final_: pos + n == end,
                lun: 0,
                itt,
                ttt,
                exp_stat_sn: self.exp_stat_sn,
                data_sn: sn,
                offset: pos as u32,
                data: Bytes::copy_from_slice(&out[pos..pos + n]),
            }))
            .await?;
            pos += n;
            sn += 1;
        }
        Ok(())
    }

    async fn answer_ping(&mut self, n: &NopIn) -> std::io::Result<()> {
        self.send(&Pdu::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt: RESERVED_TAG,
            ttt: n.ttt,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            data: Bytes::new(),
        }))
        .await
    }

    /// NOP-Out ping; returns the echoed data.
    pub async fn ping(&mut self, data: &[u8]) -> Result<Bytes, ClientError> {
        let itt = self.next_itt();
        let cmd_sn = self.next_cmd_sn();
        self.send(&Pdu::NopOut(NopOut {
            immediate: false,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            data: Bytes::copy_from_slice(data),
        }))
        .await?;
        match self.recv().await? {
            Pdu::NopIn(n) if n.itt == itt => Ok(n.data),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// A Text Request; returns the answered pairs.
    pub async fn text(&mut self, pairs: &[(&str, &str)]) -> Result<Vec<(String, String)>, ClientError> {
        let itt = self.next_itt();
        let cmd_sn = self.next_cmd_sn();
        self.send(&Pdu::TextRequest(TextRequest {
            immediate: false,
            final_: true,
            cont: false,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            data: Bytes::from(text::encode(pairs)),
        }))
        .await?;
        match self.recv().await? {
            Pdu::TextResponse(t) if t.itt == itt => {
                text::parse(&t.data).map_err(|e| ClientError::Unexpected(e.to_string()))
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends a task management request (immediate) without waiting.
    pub async fn send_task_mgmt(&mut self, function: u8, ref_itt: u32) -> std::io::Result<u32> {
        let itt = self.next_itt();
        self.send(&Pdu::TaskMgmtRequest(TaskMgmtRequest {
            immediate: true,
            function,
            lun: 0,
            itt,
            ref_itt,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            ref_cmd_sn: self.cmd_sn.wrapping_sub(1),
            exp_data_sn: 0,
        }))
        .await?;
        Ok(itt)
    }

    /// Logs out (closing the session); returns the logout response code.
    pub async fn logout(&mut self) -> Result<u8, ClientError> {
        let itt = self.next_itt();
        self.send(&Pdu::LogoutRequest(LogoutRequest {
            immediate: true,
            reason: 0,
            itt,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        }))
        .await?;
        loop {
            match self.recv().await? {
                Pdu::LogoutResponse(l) if l.itt == itt => return Ok(l.response),
                Pdu::NopIn(_) | Pdu::ScsiResponse(_) | Pdu::DataIn(_) => {}
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
        }
    }
}
