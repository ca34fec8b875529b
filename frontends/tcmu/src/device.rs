//! One TCMU device's command loop: takes commands off the ring, runs each
//! through the shared SCSI layer ([`LogicalUnit`]) with many in flight,
//! and completes them in completion order (the response names the command),
//! kicking the kernel once per batch of completions.
//!
//! Only this loop touches the mapping: data-out is copied out of the data
//! area before a command runs and data-in copied in after, so no command
//! future holds a pointer into memory the kernel owns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use jiva_core::BlockDevice;
use jiva_core::shm::PayloadBuf;
use jiva_scsi::sense::{Asc, Sense, Status, key};
use jiva_scsi::{LogicalUnit, Nexus, Outcome};

use crate::ring::{Command, Entry, Ring, RingError};
use crate::uio::Doorbell;

/// SCSI protocol identifier "no specific protocol" (SPC-4 7.6.1): TCMU does
/// not tell us the fabric or the initiator.
const PROTOCOL_NONE: u8 = 0xf;
/// How long a stop waits for commands in flight before dropping them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a device loop ended.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    #[error("uio: {0}")]
    Io(#[from] std::io::Error),
}

/// The nexus every command of a TCMU device comes from. The kernel keeps
/// reservations itself (LIO core emulates PR and RESERVE for TCMU), so one
/// nexus per device is enough for our unit attentions.
pub fn nexus(device: &str) -> Nexus {
    Nexus::new(format!("tcmu/{device}"), Vec::new(), PROTOCOL_NONE, 1, format!("tcmu/{device}"))
}

/// READ(6/10/12/16): data-in only, so nothing to copy out first.
fn is_read(cdb: &[u8]) -> bool {
    matches!(cdb.first(), Some(0x08 | 0x28 | 0xa8 | 0x88))
}

/// Writes a command's outcome into its data-in buffers and its response.
fn finish(ring: &mut Ring, cmd: &Command, out: &Outcome) -> Result<(), RingError> {
    if !out.data.is_empty() {
        let n = ring.scatter(&cmd.iov, &out.data);
        // The kernel returns the whole buffer: zero what we did not fill
        // rather than hand back stale data-area contents.
        let total: usize = cmd.iov.iter().map(|s| s.len).sum();
        if n < total {
            zero_tail(ring, &cmd.iov, n);
        }
    }
    ring.complete(cmd.cmd_id, out.status as u8, &out.sense_data())
}

fn zero_tail(ring: &Ring, iov: &[crate::ring::Segment], mut skip: usize) {
    let zeros = [0u8; 4096];
    for s in iov {
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let mut at = s.offset + skip;
        let end = s.offset + s.len;
        skip = 0;
        while at < end {
            let n = (end - at).min(zeros.len());
            let _ = ring.map().write(at, &zeros[..n]);
            at += n;
        }
    }
}

/// Runs the device until `stop` resolves (then finishes the commands in
/// flight) or the ring turns out corrupt.
/// A command's data-out buffers in one piece, in memory the device shares
/// with its replicas where it has some (see [`PayloadBuf`]).
fn data_out<D: BlockDevice>(ring: &Ring, cmd: &Command, lu: &LogicalUnit<D>) -> Bytes {
    let mut buf = PayloadBuf::new(&**lu.device(), cmd.iov.iter().map(|s| s.len).sum());
    ring.gather(&cmd.iov, buf.contents());
    buf.freeze()
}

pub async fn run<D: BlockDevice, B: Doorbell>(
    mut ring: Ring,
    mut bell: B,
    lu: Arc<LogicalUnit<D>>,
    nexus: Nexus,
    stop: impl Future<Output = ()>,
) -> Result<(), LoopError> {
    lu.attach(&nexus);
    let mut running = FuturesUnordered::new();
    let mut stop = std::pin::pin!(stop);
    // Commands may already wait on the ring (queued before we opened it).
    let mut look = true;
    loop {
        if look {
            look = false;
            let mut malformed = false;
            for entry in ring.poll()? {
                match entry {
                    Entry::Command(cmd) => {
                        let data_out =
                            if is_read(&cmd.cdb) { Bytes::new() } else { data_out(&ring, &cmd, &lu) };
                        let (lu, nexus) = (Arc::clone(&lu), nexus.clone());
                        running.push(async move {
                            let out = lu.execute(&nexus, &cmd.cdb, data_out).await;
                            (cmd, out)
                        });
                    }
                    Entry::Malformed { cmd_id, error } => {
                        tracing::warn!("rejecting a malformed command from the kernel: {error}");
                        let sense = Sense::new(key::HARDWARE_ERROR, Asc::INTERNAL_TARGET_FAILURE);
                        ring.complete(cmd_id, Status::CheckCondition as u8, &sense.encode(false))?;
                        malformed = true;
                    }
                }
            }
            if malformed {
                bell.kick()?;
            }
        }
        tokio::select! {
            r = bell.wait() => {
                r?;
                look = true;
            }
            Some((cmd, out)) = running.next(), if !running.is_empty() => {
                finish(&mut ring, &cmd, &out)?;
                // Complete whatever else is ready, then kick once.
                while let Some(Some((cmd, out))) = running.next().now_or_never() {
                    finish(&mut ring, &cmd, &out)?;
                }
                bell.kick()?;
            }
            () = &mut stop => break,
        }
    }
    // Stopping: new commands stay on the ring (a later handler resets it);
    // the ones running get their answers.
    let drain = async {
        while let Some((cmd, out)) = running.next().await {
            finish(&mut ring, &cmd, &out)?;
            bell.kick()?;
        }
        Ok::<_, LoopError>(())
    };
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
    lu.detach(&nexus);
    match drained {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!("commands still running after {DRAIN_TIMEOUT:?}; dropping them");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
