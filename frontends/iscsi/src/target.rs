//! The iSCSI target: one logical unit (LUN 0) over a [`BlockDevice`],
//! served to any number of sessions and connections. Accepts connections
//! and runs each with [`crate::conn`].
//!
//! Shutdown ([`IscsiTarget::serve`]): the listener stops accepting;
//! connections still logging in are closed; connections in the full
//! feature phase stop reading new PDUs, finish the commands they already
//! accepted, deliver the responses (for at most [`DRAIN_TIMEOUT`]) and
//! close. `serve` returns once every connection has ended.

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use jiva_core::BlockDevice;
use jiva_scsi::{Identity, LogicalUnit};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, warn};

use crate::chap::Credentials;
use crate::conn::{self, ConnError, Shutdown};
use crate::login;
use crate::params::Limits;
use crate::session::Registry;

/// Default time an initiator has to finish logging in.
pub const DEFAULT_LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default command window per session (MaxCmdSN - ExpCmdSN + 1).
pub const DEFAULT_QUEUE_DEPTH: u32 = 128;
/// Default number of connections served at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// How long a closing connection may take to deliver its last responses.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Target portal group tag of our single portal group.
pub const TPGT: u16 = 1;
/// Back-off after a transient `accept` failure.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The IQN a volume gets when none is given: `iqn.2026-11.io.jiva:NAME`,
/// with characters an iSCSI name may not hold replaced by `-`.
pub fn default_iqn(volume: &str) -> String {
    let name: String = volume
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '-' })
        .collect();
    format!("iqn.2026-11.io.jiva:{name}")
}

/// An iSCSI target exporting one device as LUN 0.
pub struct IscsiTarget<D: BlockDevice> {
    pub(crate) lu: LogicalUnit<D>,
    pub(crate) login: login::Config,
    pub(crate) portal: Option<String>,
    pub(crate) login_timeout: Duration,
    pub(crate) queue_depth: u32,
    max_connections: usize,
    pub(crate) registry: Mutex<Registry>,
}

impl<D: BlockDevice> std::fmt::Debug for IscsiTarget<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiTarget")
            .field("iqn", &self.login.target_name)
            .field("portal", &self.portal)
            .field("chap", &self.login.initiator_chap.is_some())
            .field("mutual_chap", &self.login.target_chap.is_some())
            .finish_non_exhaustive()
    }
}

impl<D: BlockDevice> IscsiTarget<D> {
    /// A target named `iqn` serving `device` as LUN 0, without
    /// authentication.
    pub fn new(device: Arc<D>, iqn: impl Into<String>) -> IscsiTarget<D> {
        let iqn = iqn.into();
        IscsiTarget {
            lu: LogicalUnit::new(device, Identity::for_volume(&iqn)),
            login: login::Config {
                target_name: iqn,
                target_alias: None,
                tpgt: TPGT,
                initiator_chap: None,
                target_chap: None,
                limits: Limits::default(),
            },
            portal: None,
            login_timeout: DEFAULT_LOGIN_TIMEOUT,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            registry: Mutex::new(Registry::default()),
        }
    }

    /// Requires initiators of normal sessions to authenticate with CHAP
    /// using this name and secret. (Discovery sessions stay open.)
    pub fn with_chap(mut self, user: impl Into<String>, secret: impl Into<Vec<u8>>) -> IscsiTarget<D> {
        self.login.initiator_chap = Some(Credentials::new(user, secret));
        self
    }

    /// Our own CHAP name and secret, for initiators that authenticate the
    /// target too (mutual CHAP).
    pub fn with_mutual_chap(mut self, user: impl Into<String>, secret: impl Into<Vec<u8>>) -> IscsiTarget<D> {
        self.login.target_chap = Some(Credentials::new(user, secret));
        self
    }

    /// The address (`host:port`) SendTargets advertises. Without it, each
    /// connection's local address is advertised.
    pub fn with_portal(mut self, portal: impl Into<String>) -> IscsiTarget<D> {
        self.portal = Some(portal.into());
        self
    }

    /// TargetAlias sent at login.
    pub fn with_alias(mut self, alias: impl Into<String>) -> IscsiTarget<D> {
        self.login.target_alias = Some(alias.into());
        self
    }

    /// How the logical unit names itself (serial number, NAA designator).
    /// The default is derived from the IQN.
    pub fn with_identity(mut self, identity: Identity) -> IscsiTarget<D> {
        self.lu = LogicalUnit::new(Arc::clone(self.lu.device()), identity);
        self
    }

    /// Time an initiator has to complete its login before it is dropped.
    pub fn with_login_timeout(mut self, timeout: Duration) -> IscsiTarget<D> {
        self.login_timeout = timeout;
        self
    }

    /// Our negotiation limits (burst lengths, segment size, ...).
    pub fn with_limits(mut self, limits: Limits) -> IscsiTarget<D> {
        self.login.limits = limits;
        self
    }

    /// Command window per session.
    pub fn with_queue_depth(mut self, depth: u32) -> IscsiTarget<D> {
        self.queue_depth = depth.clamp(1, 1 << 16);
        self
    }

    /// Connections served at once; more are closed on accept.
    pub fn with_max_connections(mut self, max: usize) -> IscsiTarget<D> {
        self.max_connections = max.clamp(1, Semaphore::MAX_PERMITS);
        self
    }

    pub fn iqn(&self) -> &str {
        &self.login.target_name
    }

    pub fn logical_unit(&self) -> &LogicalUnit<D> {
        &self.lu
    }

    /// Sessions currently logged in (normal and discovery).
    pub fn session_count(&self) -> usize {
        self.registry().len()
    }

    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts connections until `shutdown` resolves, one task per
    /// connection, then drains them (see the module docs). Returns an error
    /// only if accepting fails in a way that is not transient.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let mut conns = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let result = loop {
            while conns.try_join_next().is_some() {}
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                            warn!(%peer, "too many connections; closing a new one");
                            continue;
                        };
                        if let Err(e) = socket.set_nodelay(true) {
                            debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                        }
                        let local = socket.local_addr().ok();
                        let target = Arc::clone(&self);
                        let stop = Shutdown::new(stop_rx.clone());
                        let span = tracing::info_span!("iscsi", %peer);
                        conns.spawn(
                            async move {
                                debug!("connection accepted");
                                // Owned halves of a TCP socket need no lock between them.
                                let (rd, wr) = socket.into_split();
                                match conn::run(target, rd, wr, local, stop).await {
                                    Ok(()) => debug!("connection closed"),
                                    Err(e) => info!(error = %e, "connection ended"),
                                }
                                drop(slot);
                            }
                            .instrument(span),
                        );
                    }
                    Err(e) if is_transient(&e) => {
                        warn!(error = %e, "accept failed; retrying");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    Err(e) => break Err(e),
                },
            }
        };
        drop(listener);
        info!(connections = conns.len(), "iSCSI target shutting down");
        let _ = stop_tx.send(true);
        while let Some(done) = conns.join_next().await {
            if let Err(e) = done
                && e.is_panic()
            {
                warn!("connection task panicked: {e}");
            }
        }
        result
    }

    /// Runs one connection over `stream` (a TCP socket, or an in-memory
    /// duplex stream in tests) until the initiator logs out or disconnects.
    pub async fn handle_connection<S>(self: Arc<Self>, stream: S) -> Result<(), ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        conn::run(self, rd, wr, None, Shutdown::never()).await
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::OutOfMemory
    ) || matches!(e.raw_os_error(), Some(23 | 24)) // ENFILE, EMFILE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_iqns_are_valid_names() {
        assert_eq!(default_iqn("vol"), "iqn.2026-11.io.jiva:vol");
        assert_eq!(default_iqn("My_Vol 1"), "iqn.2026-11.io.jiva:my-vol-1");
    }
}
