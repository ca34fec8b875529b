//! Jiva's TCMU frontend: LIO's `target_core_user` passes SCSI commands to a
//! userspace handler through a shared ring in a uio device's memory map.
//!
//! [`ring`] parses and completes that ring over any mapped region (a real
//! uio map, or a memfd in tests), validating every offset and length the
//! kernel hands over before touching memory. Device discovery, netlink and
//! the SCSI execution build on it.

pub mod ring;
