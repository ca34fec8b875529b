//! Jiva's replica: keeps one replica's copy of a volume on local disk.
//!
//! The [`Store`] holds the volume in sparse files with a crc32c per 4 KiB
//! block ([`format`](mod@format) documents the layout), recovers torn writes after a
//! crash with a write-intent bitmap ([`intent`]), and serves it as a
//! [`jiva_core::BlockDevice`] through an I/O [`engine`] (io_uring, or plain
//! syscalls on a thread pool).

pub mod engine;
pub mod format;
pub mod index;
pub mod intent;
mod records;
pub mod server;
mod store;

pub use engine::EngineKind;
pub use store::{Identity, SnapshotInfo, Store, StoreOptions};
