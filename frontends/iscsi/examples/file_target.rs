//! Serves a file (or memory) as an iSCSI target, without replication:
//! for comparing the frontend alone with other targets on the same file.
//!
//! ```sh
//! cargo run --release -p jiva-iscsi --example file_target -- FILE|mem:SIZE_MIB ADDR IQN
//! ```
//!
//! `benches/iscsi.sh` uses it to compare the frontend with tgtd on one file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use jiva_core::mem::MemDevice;
use jiva_core::{BlockDevice, Capabilities, Error, Result};
use jiva_iscsi::IscsiTarget;

/// A plain file, read and written with pread/pwrite on the blocking pool.
struct FileDevice {
    file: Arc<File>,
    size: u64,
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { flush: true, multi_conn: true, ..Capabilities::default() }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(|e| Error::new(jiva_core::ErrorKind::Io, e.to_string()))?
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || {
            file.write_all_at(&data, offset)?;
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::new(jiva_core::ErrorKind::Io, e.to_string()))?
    }

    async fn flush(&self) -> Result<()> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || Ok(file.sync_data()?))
            .await
            .map_err(|e| Error::new(jiva_core::ErrorKind::Io, e.to_string()))?
    }
}

async fn serve<D: BlockDevice>(dev: D, addr: &str, iqn: &str) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on {} as {iqn}", listener.local_addr()?);
    let target = Arc::new(IscsiTarget::new(Arc::new(dev), iqn));
    target
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path, addr, iqn, ..] = args.as_slice() else {
        eprintln!("usage: file_target FILE|mem:SIZE_MIB ADDR IQN");
        std::process::exit(2);
    };
    if let Some(mib) = path.strip_prefix("mem:") {
        let size: u64 = mib.parse().expect("size in MiB");
        serve(MemDevice::new(size << 20), addr, iqn).await
    } else {
        let file = File::options().read(true).write(true).open(path)?;
        let size = file.metadata()?.len() & !4095;
        serve(FileDevice { file: Arc::new(file), size }, addr, iqn).await
    }
}
