//! Jiva's SCSI block-command layer: turns SCSI commands into calls on a
//! [`jiva_core::BlockDevice`], independent of the transport that carried
//! them. The iSCSI target uses it today; the TCMU handler will reuse it.
//!
//! * [`cdb`] parses command descriptor blocks (pure, never panics).
//! * [`lun`] executes commands on a [`LogicalUnit`] and keeps the unit's
//!   state: unit attentions, reservations, mode parameters.
//! * [`sense`] builds sense data and maps [`jiva_core::ErrorKind`] to it
//!   in one place ([`sense_for`]).
//! * [`pages`] holds INQUIRY/VPD, READ CAPACITY and mode page data.
//! * [`pr`] is the persistent-reservation state machine.
//! * [`nexus`] names the I_T nexus a command came from.
//!
//! The transport's job: build a [`Nexus`] per session (attach/detach it),
//! collect the Data-Out, call [`LogicalUnit::execute`], send back the
//! status, sense and Data-In, and compute residuals from the expected
//! transfer length.
//!
//! The crate contains no `unsafe` code.

#![forbid(unsafe_code)]

pub mod cdb;
pub mod lun;
pub mod nexus;
pub mod pages;
pub mod pr;
pub mod sense;

pub use cdb::Command;
pub use lun::{LogicalUnit, Outcome, missing_lun};
pub use nexus::Nexus;
pub use pages::{Identity, LOGICAL_BLOCK};
pub use sense::{Asc, Sense, Status, sense_for};
