//! Jiva's core: the one block-device trait every layer speaks, the error
//! type with a stable kind, request validation, the replica wire protocol,
//! and the replication core (the volume) that fans I/O out to replicas.
//!
//! Frontends (NBD, later iSCSI and TCMU) consume [`BlockDevice`]; the
//! [`volume::Volume`] implements it on top of replicas that implement it too
//! (a [`remote::RemoteReplica`] over TCP, or [`mem::MemDevice`] in tests).

pub mod checksum;
pub mod device;
pub mod error;
pub mod fdpass;
pub mod local;
pub mod mem;
pub mod pipe;
pub mod range_lock;
pub mod record;
pub mod remote;
pub mod replica;
pub mod shm;
pub mod size;
pub mod spare;
pub mod splice;
pub mod vectored;
pub mod view;
pub mod volume;
pub mod wire;

pub use checksum::crc32c;
pub use device::{
    BLOCK_SIZE, BlockDevice, Capabilities, Extent, ExtentState, MAX_IO_BYTES, ZeroFlags, block_span,
    check_range,
};
pub use error::{Error, ErrorKind, Op, Result};
