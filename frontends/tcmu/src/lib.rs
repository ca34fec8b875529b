//! Jiva's TCMU frontend: LIO's `target_core_user` passes SCSI commands to a
//! userspace handler through a shared ring in a uio device's memory map;
//! this crate is that handler for backstores of subtype `jiva`
//! (`targetcli /backstores/user:jiva create ... cfgstring=VOLUME@HOST/PORT`),
//! serving each from one of our volumes.
//!
//! * [`ring`] parses and completes the command ring over any mapped region
//!   (a real uio map, or a memfd in tests), validating every offset and
//!   length the kernel hands over before touching memory.
//! * [`device`] runs one device: commands through the shared SCSI layer
//!   (`jiva-scsi`), many in flight, completions and kicks.
//! * [`uio`] finds and maps the uio nodes and drives the backstore's
//!   configfs actions; [`netlink`] follows the kernel's TCMU generic-netlink
//!   events and answers them; [`dbus`] registers the handler the way
//!   tcmu-runner does, so targetcli lists `user:jiva` and checks cfgstrings.
//! * [`config`] parses uio names and our cfgstring; [`nbd`] reaches the
//!   volume through its controller's NBD server.
//! * [`handler`] ties them together: the `jiva tcmu` daemon.

pub mod config;
pub mod dbus;
pub mod device;
pub mod handler;
pub mod nbd;
pub mod netlink;
pub mod ring;
pub mod uio;
