//! Jiva's iSCSI target (RFC 7143): serves one [`jiva_core::BlockDevice`]
//! (normally the replicated volume) as LUN 0 of an iSCSI target, so that
//! the Linux initiator (`iscsiadm`), libiscsi tools and qemu can use it.
//!
//! * [`pdu`] is the pure PDU codec (no I/O), shared by the target, its
//!   tests, the test client and the fuzz target.
//! * [`text`], [`params`], [`chap`] and [`login`] are the login phase:
//!   text keys, operational negotiation, CHAP, and the login state machine.
//! * [`session`] holds the command window and the session registry.
//! * [`conn`] runs a connection: login, then the full feature phase
//!   (commands, data, R2T, NOP, task management, text, logout).
//! * [`target`] is the server ([`IscsiTarget`]).
//! * [`client`] is a minimal initiator, for tests and tools.
//!
//! SCSI semantics live in [`jiva_scsi`]; this crate is only the transport.
//! Error recovery level 0 only; no markers, no SNACK.
//!
//! The crate contains no `unsafe` code.

#![forbid(unsafe_code)]

pub mod chap;
pub mod client;
pub mod conn;
pub mod login;
pub mod params;
pub mod pdu;
pub mod session;
pub mod target;
pub mod text;

pub use chap::Credentials;
pub use conn::ConnError;
pub use params::Limits;
pub use target::{IscsiTarget, default_iqn};
