//! Exports beside the main one, looked up by name when a client asks for
//! them: a volume's snapshots as `VOL@SNAP`, for instance. They are always
//! served read-only, whatever their device says.

use std::future::Future;
use std::sync::Arc;

use jiva_core::BlockDevice;

/// A source of further, read-only exports.
pub trait Exports: Send + Sync + 'static {
    type Device: BlockDevice;
    /// The names to list (NBD_OPT_LIST) after the main export.
    fn names(&self) -> impl Future<Output = Vec<String>> + Send;
    /// The device exported as `name`, or `None` if there is no such export.
    fn open(&self, name: &str) -> impl Future<Output = Option<Arc<Self::Device>>> + Send;
}

/// No further exports.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoExports;

impl Exports for NoExports {
    /// Never opened; any device type does.
    type Device = jiva_core::mem::MemDevice;

    async fn names(&self) -> Vec<String> {
        Vec::new()
    }

    async fn open(&self, _name: &str) -> Option<Arc<Self::Device>> {
        None
    }
}
