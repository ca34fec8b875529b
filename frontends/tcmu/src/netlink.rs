//! The kernel's TCMU generic-netlink family (`TCM-USER`): device added,
//! removed and reconfigured events on the multicast group `config`, and our
//! replies (`*_DONE` with `TCMU_ATTR_CMD_STATUS` and `TCMU_ATTR_DEVICE_ID`).
//!
//! Once a handler has announced `TCMU_ATTR_SUPP_KERN_CMD_REPLY`
//! (`TCMU_CMD_SET_FEATURES`), the kernel waits for a reply to every event of
//! a device created afterwards, and reports our status to whoever wrote
//! configfs (so targetcli sees a refused device fail). The flag is global;
//! we clear it on a clean exit so the kernel never waits for a handler that
//! is gone.
//!
//! Hand-written over `libc` sockets: the codec ([`encode`], [`parse_events`],
//! [`parse_family`]) is pure and total; the [`Netlink`] type does the I/O.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tcmu_sys::{
    TCMU_ATTR_CMD_STATUS, TCMU_ATTR_DEV_CFG, TCMU_ATTR_DEV_SIZE, TCMU_ATTR_DEVICE, TCMU_ATTR_DEVICE_ID,
    TCMU_ATTR_MINOR, TCMU_ATTR_SUPP_KERN_CMD_REPLY, TCMU_ATTR_WRITECACHE, TCMU_CMD_ADDED_DEVICE,
    TCMU_CMD_ADDED_DEVICE_DONE, TCMU_CMD_RECONFIG_DEVICE, TCMU_CMD_RECONFIG_DEVICE_DONE,
    TCMU_CMD_REMOVED_DEVICE, TCMU_CMD_REMOVED_DEVICE_DONE, TCMU_CMD_SET_FEATURES,
};
use tokio::io::unix::AsyncFd;

/// The family and group names target_core_user registers.
pub const FAMILY: &str = "TCM-USER";
pub const GROUP: &str = "config";
const FAMILY_VERSION: u8 = 2;

const NLMSG_HDR: usize = 16;
const GENL_HDR: usize = 4;
const NLA_HDR: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
const NLA_TYPE_MASK: u16 = 0x3fff;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;

/// An attribute value to encode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attr {
    U8(u16, u8),
    U32(u16, u32),
    I32(u16, i32),
    Str(u16, String),
}

fn align4(n: usize) -> usize {
    n.next_multiple_of(4)
}

/// One netlink message: header, genetlink header, attributes.
pub fn encode(msg_type: u16, flags: u16, seq: u32, cmd: u8, attrs: &[Attr]) -> Vec<u8> {
    let mut out = vec![0u8; NLMSG_HDR];
    out.extend_from_slice(&[cmd, FAMILY_VERSION, 0, 0]);
    for a in attrs {
        let (ty, payload): (u16, Vec<u8>) = match a {
            Attr::U8(t, v) => (*t, vec![*v]),
            Attr::U32(t, v) => (*t, v.to_ne_bytes().to_vec()),
            Attr::I32(t, v) => (*t, v.to_ne_bytes().to_vec()),
            Attr::Str(t, s) => {
                let mut b = s.as_bytes().to_vec();
                b.push(0);
                (*t, b)
            }
        };
        out.extend_from_slice(&((NLA_HDR + payload.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(&payload);
        out.resize(align4(out.len()), 0);
    }
    let len = out.len() as u32;
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..6].copy_from_slice(&msg_type.to_ne_bytes());
    out[6..8].copy_from_slice(&flags.to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    out
}

/// A message of a datagram: type, flags, seq and body (after the nlmsghdr).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub msg_type: u16,
    pub flags: u16,
    pub seq: u32,
    pub body: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Splits a datagram into messages; stops at the first malformed header.
pub fn messages(buf: &[u8]) -> Vec<Message<'_>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDR <= buf.len() {
        let Some(len) = u32_at(buf, at).map(|l| l as usize) else { break };
        if len < NLMSG_HDR || at + len > buf.len() {
            break;
        }
        out.push(Message {
            msg_type: u16_at(buf, at + 4).unwrap_or(0),
            flags: u16_at(buf, at + 6).unwrap_or(0),
            seq: u32_at(buf, at + 8).unwrap_or(0),
            body: &buf[at + NLMSG_HDR..at + len],
        });
        at += align4(len);
    }
    out
}

/// Attributes as (type, payload) pairs; stops at the first malformed one.
pub fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= NLA_HDR {
        let len = usize::from(u16_at(b, 0).unwrap_or(0));
        let ty = u16_at(b, 2).unwrap_or(0) & NLA_TYPE_MASK;
        if len < NLA_HDR || len > b.len() {
            break;
        }
        out.push((ty, &b[NLA_HDR..len]));
        b = &b[align4(len).min(b.len())..];
    }
    out
}

fn string(p: &[u8]) -> String {
    let end = p.iter().position(|&c| c == 0).unwrap_or(p.len());
    String::from_utf8_lossy(&p[..end]).into_owned()
}

/// What the kernel told us about a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    Added,
    Removed,
    /// New config string, size or write-cache setting (each optional).
    Reconfig {
        config: Option<String>,
        size: Option<u64>,
        write_cache: Option<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// The uio name (`tcm-user/...`).
    pub device: String,
    /// N of `/dev/uioN`.
    pub minor: u32,
    /// The device's index, which names it in our reply.
    pub dev_id: u32,
}

impl Event {
    /// The command that replies to this event.
    pub fn done_cmd(&self) -> u8 {
        (match self.kind {
            EventKind::Added => TCMU_CMD_ADDED_DEVICE_DONE,
            EventKind::Removed => TCMU_CMD_REMOVED_DEVICE_DONE,
            EventKind::Reconfig { .. } => TCMU_CMD_RECONFIG_DEVICE_DONE,
        }) as u8
    }
}

/// TCMU events in a datagram from the `config` group of family `family`.
pub fn parse_events(buf: &[u8], family: u16) -> Vec<Event> {
    let mut out = Vec::new();
    for m in messages(buf) {
        if m.msg_type != family || m.body.len() < GENL_HDR {
            continue;
        }
        let cmd = u32::from(m.body[0]);
        let (mut device, mut minor, mut dev_id) = (None, None, None);
        let (mut config, mut size, mut write_cache) = (None, None, None);
        for (ty, p) in attrs(&m.body[GENL_HDR..]) {
            match u32::from(ty) {
                TCMU_ATTR_DEVICE => device = Some(string(p)),
                TCMU_ATTR_MINOR => minor = u32_at(p, 0),
                TCMU_ATTR_DEVICE_ID => dev_id = u32_at(p, 0),
                TCMU_ATTR_DEV_CFG => config = Some(string(p)),
                TCMU_ATTR_DEV_SIZE => {
                    size = p.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_ne_bytes)
                }
                TCMU_ATTR_WRITECACHE => write_cache = p.first().copied(),
                _ => {}
            }
        }
        let kind = match cmd {
            TCMU_CMD_ADDED_DEVICE => EventKind::Added,
            TCMU_CMD_REMOVED_DEVICE => EventKind::Removed,
            TCMU_CMD_RECONFIG_DEVICE => EventKind::Reconfig { config, size, write_cache },
            _ => continue,
        };
        // Every TCMU event carries all three; without them we could not
        // even reply.
        let (Some(device), Some(minor), Some(dev_id)) = (device, minor, dev_id) else { continue };
        out.push(Event { kind, device, minor, dev_id });
    }
    out
}

/// Family id and the `config` group's id from a CTRL_CMD_GETFAMILY reply.
pub fn parse_family(body: &[u8]) -> Option<(u16, u32)> {
    let mut id = None;
    let mut group = None;
    for (ty, p) in attrs(body.get(GENL_HDR..)?) {
        match ty {
            CTRL_ATTR_FAMILY_ID => id = u16_at(p, 0),
            CTRL_ATTR_MCAST_GROUPS => {
                for (_, g) in attrs(p) {
                    let (mut name, mut gid) = (None, None);
                    for (t, v) in attrs(g) {
                        match t {
                            CTRL_ATTR_MCAST_GRP_NAME => name = Some(string(v)),
                            CTRL_ATTR_MCAST_GRP_ID => gid = u32_at(v, 0),
                            _ => {}
                        }
                    }
                    if name.as_deref() == Some(GROUP) {
                        group = gid;
                    }
                }
            }
            _ => {}
        }
    }
    Some((id?, group?))
}

/// The error code of an NLMSG_ERROR message (0 is an acknowledgement).
fn error_code(body: &[u8]) -> Option<i32> {
    u32_at(body, 0).map(|v| v as i32)
}

struct Socket {
    fd: AsyncFd<OwnedFd>,
}

impl Socket {
    fn open() -> io::Result<Socket> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero sockaddr_nl is valid (pid 0: the kernel picks).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: addr is a sockaddr_nl of the size we pass.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open, with
        // the same number, for its whole lifetime.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Socket { fd })
    }

    fn join(&self, group: u32) -> io::Result<()> {
        // SAFETY: setsockopt with a u32 option value of the size we pass.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                (&raw const group).cast(),
                size_of::<u32>() as libc::socklen_t,
            )
        };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    async fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_nl addresses the kernel (pid 0).
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            let mut guard = self.fd.writable().await?;
            // SAFETY: sends msg.len() bytes from msg to the address `to`.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&raw const to).cast(),
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(e);
            }
            guard.clear_ready();
        }
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            // SAFETY: receives at most buf.len() bytes into buf.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(e);
            }
            guard.clear_ready();
        }
    }

    /// Sends a request and returns the body of its reply (for a query) or
    /// of its acknowledgement; a negative acknowledgement is an error.
    async fn request(&self, msg: &[u8], seq: u32) -> io::Result<Vec<u8>> {
        self.send(msg).await?;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = self.recv(&mut buf).await?;
            for m in messages(&buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                if m.msg_type == NLMSG_ERROR {
                    return match error_code(m.body) {
                        Some(0) => Ok(Vec::new()),
                        Some(e) => Err(io::Error::from_raw_os_error(-e)),
                        None => Err(io::Error::other("truncated netlink error")),
                    };
                }
                if m.msg_type != NLMSG_DONE {
                    return Ok(m.body.to_vec());
                }
            }
        }
    }
}

/// Our two netlink sockets: one in the `config` group for events, one for
/// requests and replies (so acknowledgements never mix with events).
pub struct Netlink {
    events: Socket,
    ctl: Socket,
    family: u16,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Finds the TCMU family (the `target_core_user` module must be loaded)
    /// and joins its `config` group.
    pub async fn open() -> io::Result<Netlink> {
        let ctl = Socket::open()?;
        let q = encode(
            GENL_ID_CTRL,
            NLM_F_REQUEST,
            1,
            CTRL_CMD_GETFAMILY,
            &[Attr::Str(CTRL_ATTR_FAMILY_NAME, FAMILY.into())],
        );
        let body = ctl.request(&q, 1).await.map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "the kernel has no TCMU netlink family: load target_core_user (modprobe target_core_user)",
                )
            } else {
                e
            }
        })?;
        let (family, group) = parse_family(&body)
            .ok_or_else(|| io::Error::other(format!("netlink family {FAMILY} has no group {GROUP:?}")))?;
        let events = Socket::open()?;
        events.join(group)?;
        Ok(Netlink { events, ctl, family, seq: 1, buf: vec![0u8; 64 * 1024] })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(2);
        self.seq
    }

    /// Tells the kernel whether we reply to its events.
    pub async fn set_reply_supported(&mut self, on: bool) -> io::Result<()> {
        let seq = self.next_seq();
        let attrs = [Attr::U8(TCMU_ATTR_SUPP_KERN_CMD_REPLY as u16, u8::from(on))];
        let m = encode(self.family, NLM_F_REQUEST | NLM_F_ACK, seq, TCMU_CMD_SET_FEATURES as u8, &attrs);
        self.ctl.request(&m, seq).await.map(drop)
    }

    /// Answers `event` with `status` (0 or a negative errno). The kernel
    /// refuses replies it does not wait for; that is not our error.
    pub async fn reply(&mut self, event: &Event, status: i32) -> io::Result<()> {
        let seq = self.next_seq();
        let attrs = [
            Attr::I32(TCMU_ATTR_CMD_STATUS as u16, status),
            Attr::U32(TCMU_ATTR_DEVICE_ID as u16, event.dev_id),
        ];
        let m = encode(self.family, NLM_F_REQUEST | NLM_F_ACK, seq, event.done_cmd(), &attrs);
        match self.ctl.request(&m, seq).await {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENODEV)) => {
                tracing::debug!("kernel did not take our reply for {}: {e}", event.device);
                Ok(())
            }
            r => r.map(drop),
        }
    }

    /// Waits for the next batch of events. `Ok(None)`: events were lost
    /// (socket overrun); the caller should rescan the devices.
    pub async fn next(&mut self) -> io::Result<Option<Vec<Event>>> {
        match self.events.recv(&mut self.buf).await {
            Ok(n) => Ok(Some(parse_events(&self.buf[..n], self.family))),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn attr_bytes(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = ((NLA_HDR + payload.len()) as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        v.resize(align4(v.len()), 0);
        v
    }

    #[test]
    fn reply_layout_is_what_the_kernel_parses() {
        let ev = Event { kind: EventKind::Added, device: "x".into(), minor: 0, dev_id: 0x0102_0304 };
        let m = encode(
            0x1a,
            NLM_F_REQUEST | NLM_F_ACK,
            9,
            ev.done_cmd(),
            &[Attr::I32(TCMU_ATTR_CMD_STATUS as u16, -22), Attr::U32(TCMU_ATTR_DEVICE_ID as u16, ev.dev_id)],
        );
        assert_eq!(m.len(), 16 + 4 + 8 + 8);
        let msgs = messages(&m);
        assert_eq!(msgs.len(), 1);
        assert_eq!((msgs[0].msg_type, msgs[0].flags, msgs[0].seq), (0x1a, 5, 9));
        assert_eq!(msgs[0].body[0], TCMU_CMD_ADDED_DEVICE_DONE as u8);
        let a = attrs(&msgs[0].body[GENL_HDR..]);
        assert_eq!(a[0], (TCMU_ATTR_CMD_STATUS as u16, &(-22i32).to_ne_bytes()[..]));
        assert_eq!(a[1], (TCMU_ATTR_DEVICE_ID as u16, &0x0102_0304u32.to_ne_bytes()[..]));
    }

    fn event_msg(family: u16, cmd: u32, extra: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![cmd as u8, 2, 0, 0];
        body.extend(attr_bytes(TCMU_ATTR_DEVICE as u16, b"tcm-user/1/d/jiva/v@h\0"));
        body.extend(attr_bytes(TCMU_ATTR_MINOR as u16, &3u32.to_ne_bytes()));
        body.extend(attr_bytes(TCMU_ATTR_DEVICE_ID as u16, &7u32.to_ne_bytes()));
        for e in extra {
            body.extend_from_slice(e);
        }
        let mut m = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&family.to_ne_bytes());
        m.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        m.extend(body);
        m
    }

    #[test]
    fn parses_kernel_events() {
        let mut dgram = event_msg(0x1a, TCMU_CMD_ADDED_DEVICE, &[]);
        dgram.extend(event_msg(0x1b, TCMU_CMD_ADDED_DEVICE, &[])); // another family
        dgram.extend(event_msg(
            0x1a,
            TCMU_CMD_RECONFIG_DEVICE,
            &[
                attr_bytes(TCMU_ATTR_DEV_SIZE as u16, &(1u64 << 30).to_ne_bytes()),
                attr_bytes(TCMU_ATTR_DEV_CFG as u16, b"jiva/w@h\0"),
            ],
        ));
        dgram.extend(event_msg(0x1a, TCMU_CMD_REMOVED_DEVICE, &[]));
        let ev = parse_events(&dgram, 0x1a);
        assert_eq!(ev.len(), 3);
        assert_eq!(
            ev[0],
            Event { kind: EventKind::Added, device: "tcm-user/1/d/jiva/v@h".into(), minor: 3, dev_id: 7 }
        );
        assert_eq!(
            ev[1].kind,
            EventKind::Reconfig { config: Some("jiva/w@h".into()), size: Some(1 << 30), write_cache: None }
        );
        assert_eq!(ev[2].kind, EventKind::Removed);
        assert_eq!(ev[2].done_cmd(), TCMU_CMD_REMOVED_DEVICE_DONE as u8);
    }

    #[test]
    fn parses_the_family_reply() {
        let mut grp = attr_bytes(CTRL_ATTR_MCAST_GRP_NAME, b"config\0");
        grp.extend(attr_bytes(CTRL_ATTR_MCAST_GRP_ID, &42u32.to_ne_bytes()));
        let mut other = attr_bytes(CTRL_ATTR_MCAST_GRP_NAME, b"other\0");
        other.extend(attr_bytes(CTRL_ATTR_MCAST_GRP_ID, &41u32.to_ne_bytes()));
        let mut groups = attr_bytes(1, &other);
        groups.extend(attr_bytes(2, &grp));
        let mut body = vec![1, 2, 0, 0];
        body.extend(attr_bytes(CTRL_ATTR_FAMILY_ID, &0x1au16.to_ne_bytes()));
        body.extend(attr_bytes(CTRL_ATTR_MCAST_GROUPS | 0x8000, &groups));
        assert_eq!(parse_family(&body), Some((0x1a, 42)));
        assert_eq!(parse_family(&body[..12]), None);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..512), fam in any::<u16>()) {
            let _ = parse_events(&buf, fam);
            let _ = parse_family(&buf);
        }

        #[test]
        fn truncated_events_are_dropped_not_misread(cut in 0usize..80) {
            let m = event_msg(0x1a, TCMU_CMD_ADDED_DEVICE, &[]);
            let ev = parse_events(&m[..m.len().saturating_sub(cut + 1)], 0x1a);
            prop_assert!(ev.is_empty());
        }
    }
}
