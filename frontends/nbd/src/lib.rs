//! Jiva's NBD frontend: serves one [`jiva_core::BlockDevice`] (normally the
//! replicated volume) as a Network Block Device export, so that the Linux
//! kernel `nbd` driver, qemu, libnbd tools (`nbdcopy`, `nbdinfo`) and fio
//! can use it.
//!
//! * [`proto`] is the pure wire codec (no I/O), shared by the server, the
//!   tests and any fuzz harness.
//! * [`server`] runs sessions: the fixed-newstyle handshake with option
//!   haggling, then the transmission phase with many requests in flight per
//!   connection and simple or structured replies.
//! * [`exports`] offers further read-only exports by name (snapshots).
//!
//! The crate contains no `unsafe` code.

#![forbid(unsafe_code)]

pub mod exports;
pub mod proto;
pub mod server;

#[cfg(test)]
mod test_client;

pub use exports::{Exports, NoExports};
pub use server::{NbdServer, SessionError, errno_for};
