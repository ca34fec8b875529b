//! Names the kernel gives a TCMU device, and what our cfgstring says.
//!
//! The kernel names each device's uio node
//! `tcm-user/<hba>/<device>/<subtype>/<cfgstring>`, where `<subtype>/<cfgstring>`
//! is the backstore's `dev_config` as targetcli wrote it (`jiva/` + the
//! `cfgstring=` argument). Our cfgstring names a volume served by a Jiva
//! controller over NBD: `VOLUME@HOST[/PORT]` (PORT defaults to 10809). rtslib
//! refuses `:` anywhere in a config string, hence `/` before the port.
//! Everything here is pure and total: bad input is an error, never a panic.

use std::fmt;

/// The handler subtype we serve: backstores `user:jiva`.
pub const SUBTYPE: &str = "jiva";
/// NBD's registered port, used when the cfgstring names none.
pub const DEFAULT_PORT: u16 = 10809;
/// The kernel's limit on a device's config string (`TCMU_CONFIG_LEN`).
pub const CONFIG_MAX: usize = 255;

/// Shown by `targetcli /backstores/user:jiva help create`.
pub const CONFIG_DESC: &str = "VOLUME@HOST[/PORT]: the volume served over NBD by a Jiva controller \
     (jiva up / jiva controller --nbd HOST:PORT), e.g. vol1@127.0.0.1/10809. PORT defaults to 10809; \
     the backstore's size must equal the volume's.";

/// What the kernel's uio name says about a TCMU device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UioName {
    /// The HBA's number: the backstore lives at `core/user_<hba>/<device>`.
    pub hba: u32,
    /// The backstore's name (`name=` in targetcli).
    pub device: String,
    pub subtype: String,
    pub cfgstring: String,
}

impl UioName {
    /// Parses `tcm-user/<hba>/<device>/<subtype>/<cfgstring>`.
    pub fn parse(name: &str) -> Option<UioName> {
        let rest = name.trim_end_matches('\n').strip_prefix("tcm-user/")?;
        let (hba, rest) = rest.split_once('/')?;
        let (device, rest) = rest.split_once('/')?;
        let (subtype, cfgstring) = rest.split_once('/').unwrap_or((rest, ""));
        if device.is_empty() || subtype.is_empty() {
            return None;
        }
        Some(UioName {
            hba: hba.parse().ok()?,
            device: device.into(),
            subtype: subtype.into(),
            cfgstring: cfgstring.into(),
        })
    }

    /// The backstore's directory in configfs.
    pub fn configfs_dir(&self) -> String {
        format!("/sys/kernel/config/target/core/user_{}/{}", self.hba, self.device)
    }
}

/// A volume on a controller's NBD server.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VolumeRef {
    pub volume: String,
    pub host: String,
    pub port: u16,
}

impl VolumeRef {
    /// `HOST:PORT`, for connecting.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl fmt::Display for VolumeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "volume {:?} at {}:{}", self.volume, self.host, self.port)
    }
}

/// Why a cfgstring is refused (the message targetcli shows).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("handler {0:?} is not ours (this is the {SUBTYPE:?} handler)")]
    Subtype(String),
    #[error("cfgstring is empty; expected {CONFIG_DESC}")]
    Empty,
    #[error("cfgstring is longer than {CONFIG_MAX} bytes")]
    TooLong,
    #[error("cfgstring {0:?} has no '@': expected VOLUME@HOST[/PORT]")]
    NoHost(String),
    #[error("volume name {0:?} is empty or has characters other than letters, digits and . _ -")]
    Volume(String),
    #[error("host {0:?} is empty or not a host name or IPv4 address")]
    Host(String),
    #[error("port {0:?} is not a number from 1 to 65535")]
    Port(String),
}

fn name_ok(s: &str, extra: &[u8]) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// Parses our cfgstring `VOLUME@HOST[/PORT]`.
pub fn parse_cfgstring(cfg: &str) -> Result<VolumeRef, ConfigError> {
    if cfg.is_empty() {
        return Err(ConfigError::Empty);
    }
    if cfg.len() > CONFIG_MAX {
        return Err(ConfigError::TooLong);
    }
    let (volume, target) = cfg.rsplit_once('@').ok_or_else(|| ConfigError::NoHost(cfg.into()))?;
    if !name_ok(volume, b"._-") {
        return Err(ConfigError::Volume(volume.into()));
    }
    let (host, port) = match target.split_once('/') {
        Some((host, port)) => {
            let p: u16 = port.parse().map_err(|_| ConfigError::Port(port.into()))?;
            if p == 0 || port.starts_with('+') {
                return Err(ConfigError::Port(port.into()));
            }
            (host, p)
        }
        None => (target, DEFAULT_PORT),
    };
    if !name_ok(host, b".-") || host.starts_with(['.', '-']) {
        return Err(ConfigError::Host(host.into()));
    }
    Ok(VolumeRef { volume: volume.into(), host: host.into(), port })
}

/// Parses a full `dev_config` (`jiva/VOLUME@HOST[/PORT]`), as CheckConfig
/// receives it from targetcli.
pub fn parse_dev_config(config: &str) -> Result<VolumeRef, ConfigError> {
    let (subtype, cfg) = config.split_once('/').unwrap_or((config, ""));
    if subtype != SUBTYPE {
        return Err(ConfigError::Subtype(subtype.into()));
    }
    parse_cfgstring(cfg)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn uio_names() {
        let n = UioName::parse("tcm-user/3/vol1/jiva/vol1@127.0.0.1/10810\n").unwrap();
        assert_eq!(n.hba, 3);
        assert_eq!(n.device, "vol1");
        assert_eq!(n.subtype, "jiva");
        assert_eq!(n.cfgstring, "vol1@127.0.0.1/10810");
        assert_eq!(n.configfs_dir(), "/sys/kernel/config/target/core/user_3/vol1");
        assert_eq!(UioName::parse("tcm-user/0/d/file").unwrap().cfgstring, "");
        for bad in
            ["uio_pci/0/a/b/c", "tcm-user/x/d/jiva/c", "tcm-user/1//jiva/c", "tcm-user/1/d", "tcm-user/1/d/"]
        {
            assert_eq!(UioName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn cfgstrings() {
        let v = parse_cfgstring("vol1@127.0.0.1/10810").unwrap();
        assert_eq!(v, VolumeRef { volume: "vol1".into(), host: "127.0.0.1".into(), port: 10810 });
        assert_eq!(v.address(), "127.0.0.1:10810");
        assert_eq!(parse_cfgstring("a.b_c-d@localhost").unwrap().port, DEFAULT_PORT);
        assert_eq!(parse_dev_config("jiva/v@h/1").unwrap().port, 1);
        assert_eq!(parse_cfgstring(""), Err(ConfigError::Empty));
        assert_eq!(parse_cfgstring("vol1"), Err(ConfigError::NoHost("vol1".into())));
        assert_eq!(parse_cfgstring("@h"), Err(ConfigError::Volume("".into())));
        assert_eq!(parse_cfgstring("v v@h"), Err(ConfigError::Volume("v v".into())));
        assert_eq!(parse_cfgstring("v@"), Err(ConfigError::Host("".into())));
        assert_eq!(parse_cfgstring("v@-h"), Err(ConfigError::Host("-h".into())));
        assert_eq!(parse_cfgstring("v@h/0"), Err(ConfigError::Port("0".into())));
        assert_eq!(parse_cfgstring("v@h/65536"), Err(ConfigError::Port("65536".into())));
        assert_eq!(parse_cfgstring("v@h/+1"), Err(ConfigError::Port("+1".into())));
        assert_eq!(parse_cfgstring(&"v".repeat(300)), Err(ConfigError::TooLong));
        assert_eq!(parse_dev_config("file/v@h"), Err(ConfigError::Subtype("file".into())));
        assert_eq!(parse_dev_config("jiva"), Err(ConfigError::Empty));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in ".{0,300}") {
            let _ = parse_dev_config(&s);
            let _ = UioName::parse(&s);
        }
    }
}
