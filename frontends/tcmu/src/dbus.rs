//! Registration on the system D-Bus, the way tcmu-runner does it, so that
//! targetcli offers `/backstores/user:jiva` and checks cfgstrings before it
//! creates a backstore.
//!
//! We own the bus name `org.kernel.TCMUService1`, serve an ObjectManager at
//! `/org/kernel/TCMUService1` and one object per handler at
//! `/org/kernel/TCMUService1/<subtype>` with the interface
//! `org.kernel.TCMUService1`: the property `ConfigDesc` (shown by
//! `help create`) and the method `CheckConfig(s) -> (b, s)`, which targetcli
//! calls with `<subtype>/<cfgstring>` and whose message it prints on refusal.
//! Owning the name excludes tcmu-runner, which registers the same name.

use zbus::connection::Builder;
use zbus::{Connection, interface};

use crate::config::{self, CONFIG_DESC, SUBTYPE};
use crate::nbd::NbdVolume;

pub const BUS_NAME: &str = "org.kernel.TCMUService1";
pub const ROOT_PATH: &str = "/org/kernel/TCMUService1";

/// Checks a full `dev_config`: it must parse, and the controller must
/// serve the volume it names (so a typo fails at `create`, not at first I/O).
pub async fn check_config(config: &str) -> Result<(), String> {
    let target = config::parse_dev_config(config).map_err(|e| e.to_string())?;
    NbdVolume::probe(&target).await.map(drop).map_err(|e| format!("cannot open {target}: {e}"))
}

/// The handler object, `/org/kernel/TCMUService1/jiva`.
struct Handler;

#[interface(name = "org.kernel.TCMUService1")]
impl Handler {
    #[zbus(property, name = "ConfigDesc")]
    fn config_desc(&self) -> String {
        CONFIG_DESC.to_string()
    }

    #[zbus(name = "CheckConfig")]
    async fn check(&self, configstr: String) -> (bool, String) {
        match check_config(&configstr).await {
            Ok(()) => (true, "success".to_string()),
            Err(why) => {
                tracing::info!("refused cfgstring {configstr:?}: {why}");
                (false, why)
            }
        }
    }
}

/// Connects to the system bus (or the bus at `address`) and registers the
/// handler; the connection serves requests until dropped.
pub async fn register(address: Option<&str>) -> zbus::Result<Connection> {
    let handler_path = format!("{ROOT_PATH}/{SUBTYPE}");
    let builder = match address {
        Some(a) => Builder::address(a)?,
        None => Builder::system()?,
    };
    let conn = builder
        .serve_at(ROOT_PATH, zbus::fdo::ObjectManager)?
        .serve_at(handler_path.as_str(), Handler)?
        .build()
        .await?;
    conn.request_name_with_flags(BUS_NAME, zbus::fdo::RequestNameFlags::DoNotQueue.into()).await.map_err(
        |e| match e {
            zbus::Error::NameTaken => zbus::Error::Failure(format!(
                "the D-Bus name {BUS_NAME} is taken (is tcmu-runner running? stop it: one process serves \
                 TCMU handlers on D-Bus)"
            )),
            e => e,
        },
    )?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn check_config_messages() {
        assert!(check_config("file/x").await.unwrap_err().contains("not ours"));
        assert!(check_config("jiva/nohost").await.unwrap_err().contains("VOLUME@HOST"));
        // Nothing listens on port 1 of loopback.
        let e = check_config("jiva/vol@127.0.0.1/1").await.unwrap_err();
        assert!(e.starts_with("cannot open volume \"vol\" at 127.0.0.1:1"), "{e}");
    }

    /// A private bus daemon (session policy: anyone may own any name).
    struct Bus {
        child: std::process::Child,
        address: String,
        _dir: tempfile::TempDir,
    }

    impl Bus {
        async fn start() -> Bus {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("bus");
            let address = format!("unix:path={}", sock.display());
            let child = std::process::Command::new("dbus-daemon")
                .args(["--session", "--nofork", "--nopidfile", &format!("--address={address}")])
                .spawn()
                .expect("dbus-daemon (Debian package dbus-daemon) is needed for this test");
            for _ in 0..500 {
                if sock.exists() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Bus { child, address, _dir: dir }
        }
    }

    impl Drop for Bus {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// What targetcli does: list handlers through the ObjectManager, read
    /// ConfigDesc, call CheckConfig with `<subtype>/<cfgstring>`.
    #[tokio::test]
    async fn targetcli_sees_the_handler_and_its_config_check() {
        use std::sync::Arc;

        let bus = Bus::start().await;
        let _service = register(Some(&bus.address)).await.unwrap();
        let client = Builder::address(bus.address.as_str()).unwrap().build().await.unwrap();
        let om = zbus::fdo::ObjectManagerProxy::builder(&client)
            .destination(BUS_NAME)
            .unwrap()
            .path(ROOT_PATH)
            .unwrap()
            .build()
            .await
            .unwrap();
        let objects = om.get_managed_objects().await.unwrap();
        let path = format!("{ROOT_PATH}/{SUBTYPE}");
        let (_, ifaces) = objects.iter().find(|(p, _)| p.as_str() == path).expect("handler object listed");
        let props = ifaces.iter().find(|(i, _)| i.as_str() == BUS_NAME).expect("TCMUService1 interface").1;
        let desc: String = props["ConfigDesc"].try_clone().unwrap().try_into().unwrap();
        assert_eq!(desc, CONFIG_DESC);

        let check = |cfg: String| {
            let client = client.clone();
            let path = path.clone();
            async move {
                let reply = client
                    .call_method(Some(BUS_NAME), path.as_str(), Some(BUS_NAME), "CheckConfig", &(cfg,))
                    .await
                    .unwrap();
                reply.body().deserialize::<(bool, String)>().unwrap()
            }
        };
        let (ok, msg) = check("jiva/no-at-sign".into()).await;
        assert!(!ok);
        assert!(msg.contains("VOLUME@HOST"), "{msg}");

        // A real NBD export answers: accepted; a wrong volume name: refused.
        let dev = Arc::new(jiva_core::mem::MemDevice::new(1 << 20));
        let server = Arc::new(jiva_nbd::NbdServer::new(dev, "vol1".to_string()));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(server.serve(l, std::future::pending::<()>()));
        assert_eq!(check(format!("jiva/vol1@127.0.0.1/{port}")).await, (true, "success".to_string()));
        let (ok, msg) = check(format!("jiva/vol2@127.0.0.1/{port}")).await;
        assert!(!ok);
        assert!(msg.contains("refused the export"), "{msg}");

        // A second handler process cannot take the name.
        let e = register(Some(&bus.address)).await.unwrap_err();
        assert!(e.to_string().contains("tcmu-runner"), "{e}");
    }
}
