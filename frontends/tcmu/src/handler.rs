//! The handler daemon: follows the kernel's TCMU events, attaches every
//! device of subtype `jiva` to the volume its cfgstring names, and answers
//! the kernel; registers on D-Bus for targetcli.
//!
//! Start-up order matters: join the netlink group first, then announce
//! reply support, then scan `/sys/class/uio` for devices that already exist
//! (a restarted handler reattaches them: it blocks the device, resets the
//! ring, which fails whatever the previous handler left unanswered so the
//! initiator retries it, and unblocks). A device found both by the scan and
//! by an event is attached once.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::Arc;

use jiva_core::BlockDevice;
use jiva_scsi::{Identity, LOGICAL_BLOCK, LogicalUnit};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::{self, SUBTYPE, UioName, VolumeRef};
use crate::device;
use crate::nbd::NbdVolume;
use crate::netlink::{Event, EventKind, Netlink};
use crate::ring::Ring;
use crate::uio::{self, Backstore, Uio};

/// What keeps the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("TCMU netlink")]
    Netlink(#[from] io::Error),
    #[error("D-Bus registration")]
    Dbus(#[from] zbus::Error),
}

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Do not register on the system D-Bus (targetcli then cannot create
    /// `user:jiva` backstores; configfs still can).
    pub no_dbus: bool,
}

/// A device we serve.
struct Attached {
    name: UioName,
    target: VolumeRef,
    size: u64,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// Why a device was refused; the errno goes back to the kernel.
#[derive(Debug)]
struct Refusal {
    errno: i32,
    why: String,
}

fn refuse(errno: i32, why: impl Into<String>) -> Refusal {
    Refusal { errno, why: why.into() }
}

/// Opens the device's volume and starts its command loop.
async fn attach(minor: u32, name: &UioName, reattach: bool) -> Result<Attached, Refusal> {
    let target = config::parse_cfgstring(&name.cfgstring).map_err(|e| refuse(libc::EINVAL, e.to_string()))?;
    let backstore = Backstore::new(name);
    let size = backstore.size().map_err(|e| refuse(libc::EIO, format!("reading the backstore size: {e}")))?;
    if let Ok(bs) = backstore.block_size()
        && bs != u64::from(LOGICAL_BLOCK)
    {
        return Err(refuse(libc::EINVAL, format!("hw_block_size {bs} is not {LOGICAL_BLOCK}")));
    }
    let vol = NbdVolume::connect(target.clone())
        .await
        .map_err(|e| refuse(libc::EIO, format!("cannot open {target}: {e}")))?;
    if vol.size() != size {
        return Err(refuse(
            libc::EINVAL,
            format!(
                "the backstore has {size} bytes but {target} has {}: create it with size={}",
                vol.size(),
                vol.size()
            ),
        ));
    }
    if reattach {
        // Commands a previous handler took but never answered cannot be
        // told apart on the ring (responses overwrite requests): have the
        // kernel fail them all (the initiator retries) and start afresh.
        if let Err(e) = backstore.block(true).and_then(|()| backstore.reset_ring()) {
            tracing::warn!("{}: could not reset the ring: {e}", name.device);
        }
    }
    let opened = Uio::open(minor).map_err(|e| refuse(libc::EIO, format!("/dev/uio{minor}: {e}")));
    let ring = opened.and_then(|uio| {
        let ring = Ring::open(uio.map()).map_err(|e| refuse(libc::EIO, format!("/dev/uio{minor}: {e}")))?;
        Ok((uio, ring))
    });
    if reattach && let Err(e) = backstore.block(false) {
        tracing::warn!("{}: could not unblock: {e}", name.device);
    }
    let (uio, ring) = ring?;
    let lu = Arc::new(LogicalUnit::new(Arc::new(vol), Identity::for_volume(&target.volume)));
    let (stop, stopped) = oneshot::channel::<()>();
    let dev = name.device.clone();
    let task = tokio::spawn(async move {
        let stopped = async move {
            let _ = stopped.await;
        };
        match device::run(ring, uio, lu, device::nexus(&dev), stopped).await {
            Ok(()) => tracing::info!("{dev}: released"),
            Err(e) => tracing::error!("{dev}: stopped serving: {e}"),
        }
    });
    tracing::info!("{}: serving /dev/uio{minor} from {target} ({size} bytes)", name.device);
    Ok(Attached { name: name.clone(), target, size, stop, task })
}

async fn detach(a: Attached) {
    let _ = a.stop.send(());
    let _ = a.task.await;
}

/// The running daemon's devices, by uio minor.
#[derive(Default)]
struct Devices {
    by_minor: HashMap<u32, Attached>,
}

impl Devices {
    /// Handles one event; returns the status to reply with, or `None` for
    /// devices of other handlers (whose daemon replies).
    async fn event(&mut self, ev: &Event) -> Option<i32> {
        let name = UioName::parse(&ev.device)?;
        if name.subtype != SUBTYPE {
            return None;
        }
        Some(match &ev.kind {
            EventKind::Added => {
                if self.by_minor.get(&ev.minor).is_some_and(|a| a.name == name) {
                    return Some(0);
                }
                match attach(ev.minor, &name, false).await {
                    Ok(a) => {
                        if let Some(old) = self.by_minor.insert(ev.minor, a) {
                            detach(old).await;
                        }
                        0
                    }
                    Err(r) => {
                        tracing::error!("{}: refused: {}", name.device, r.why);
                        -r.errno
                    }
                }
            }
            EventKind::Removed => {
                if let Some(a) = self.by_minor.remove(&ev.minor) {
                    detach(a).await;
                }
                0
            }
            EventKind::Reconfig { config, size, write_cache } => {
                let Some(a) = self.by_minor.get(&ev.minor) else {
                    return Some(-libc::ENODEV);
                };
                if let Some(s) = size
                    && *s != a.size
                {
                    tracing::error!(
                        "{}: cannot resize to {s}: the volume has {} bytes",
                        a.name.device,
                        a.size
                    );
                    return Some(-libc::EINVAL);
                }
                if let Some(c) = config {
                    match config::parse_dev_config(c) {
                        Ok(t) if t == a.target => {}
                        Ok(t) => {
                            tracing::error!(
                                "{}: cannot switch a live backstore from {} to {t}: delete and create it again",
                                a.name.device,
                                a.target
                            );
                            return Some(-libc::EINVAL);
                        }
                        Err(e) => {
                            tracing::error!("{}: refused config {c:?}: {e}", a.name.device);
                            return Some(-libc::EINVAL);
                        }
                    }
                }
                if let Some(wc) = write_cache {
                    tracing::info!(
                        "{}: write cache set to {wc} (writes are acknowledged by the volume's rules)",
                        a.name.device
                    );
                }
                0
            }
        })
    }

    /// Attaches every `jiva` device that already exists.
    async fn scan(&mut self) {
        let found = match uio::list() {
            Ok(f) => f,
            Err(e) => {
                tracing::error!("listing /sys/class/uio: {e}");
                return;
            }
        };
        for e in found.into_iter().filter(|e| e.name.subtype == SUBTYPE) {
            if self.by_minor.contains_key(&e.minor) {
                continue;
            }
            match attach(e.minor, &e.name, true).await {
                Ok(a) => {
                    tracing::info!("{}: reattached", e.name.device);
                    self.by_minor.insert(e.minor, a);
                }
                Err(r) => tracing::error!("{}: cannot reattach: {}", e.name.device, r.why),
            }
        }
    }

    async fn stop_all(&mut self) {
        for (_, a) in self.by_minor.drain() {
            detach(a).await;
        }
    }
}

/// Runs the handler until `shutdown` resolves. `ready` is called once the
/// handler listens to the kernel, is registered and has reattached.
pub async fn run(
    opts: Options,
    ready: impl FnOnce(usize),
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let mut nl = Netlink::open().await?;
    nl.set_reply_supported(true).await?;
    let bus = if opts.no_dbus {
        None
    } else {
        match crate::dbus::register(None).await {
            Ok(c) => Some(c),
            Err(e) => {
                let _ = nl.set_reply_supported(false).await;
                return Err(e.into());
            }
        }
    };
    let mut devices = Devices::default();
    devices.scan().await;
    ready(devices.by_minor.len());
    let mut shutdown = std::pin::pin!(shutdown);
    let result = loop {
        tokio::select! {
            batch = nl.next() => match batch {
                Ok(Some(events)) => {
                    for ev in events {
                        tracing::debug!("netlink event {ev:?}");
                        if let Some(status) = devices.event(&ev).await
                            && let Err(e) = nl.reply(&ev, status).await
                        {
                            tracing::error!("replying to the kernel for {}: {e}", ev.device);
                        }
                    }
                }
                Ok(None) => {
                    tracing::warn!("netlink events were lost; rescanning devices");
                    devices.scan().await;
                }
                Err(e) => break Err(StartError::Netlink(e)),
            },
            () = &mut shutdown => break Ok(()),
        }
    };
    tracing::info!("stopping: releasing {} device(s)", devices.by_minor.len());
    devices.stop_all().await;
    if let Err(e) = nl.set_reply_supported(false).await {
        tracing::warn!("could not clear netlink reply support: {e}");
    }
    drop(bus);
    result
}
