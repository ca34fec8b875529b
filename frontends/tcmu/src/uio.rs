//! A TCMU device's uio node: finding it in `/sys/class/uio`, mapping its
//! memory (mailbox, command ring, data area), waiting for the kernel's
//! notifications and kicking it; plus the backstore's configfs knobs.
//!
//! The kernel signals new commands as a uio interrupt: the fd turns
//! readable and `read` returns a 4-byte event count. Writing 4 bytes to the
//! fd runs the kernel's completion processing ("kick").

use std::fs;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use tokio::io::unix::AsyncFd;

use crate::config::UioName;
use crate::ring::Map;

const SYS_UIO: &str = "/sys/class/uio";

/// How the device loop hears from and talks to the kernel. The uio fd in
/// production; tests stand in a channel.
pub trait Doorbell: Send {
    /// Resolves when the kernel may have added entries.
    fn wait(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Tells the kernel that responses are ready.
    fn kick(&mut self) -> io::Result<()>;
}

/// A uio node that belongs to TCMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UioEntry {
    /// N of `/dev/uioN`.
    pub minor: u32,
    pub name: UioName,
}

/// Every TCMU device now present (any subtype), from `/sys/class/uio`.
pub fn list() -> io::Result<Vec<UioEntry>> {
    list_in(Path::new(SYS_UIO))
}

fn list_in(root: &Path) -> io::Result<Vec<UioEntry>> {
    let mut out = Vec::new();
    let dir = match fs::read_dir(root) {
        Ok(d) => d,
        // No uio module loaded: no devices.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for ent in dir {
        let ent = ent?;
        let file = ent.file_name();
        let Some(minor) = file.to_str().and_then(|s| s.strip_prefix("uio")).and_then(|n| n.parse().ok())
        else {
            continue;
        };
        let Ok(name) = fs::read_to_string(ent.path().join("name")) else { continue };
        if let Some(name) = UioName::parse(&name) {
            out.push(UioEntry { minor, name });
        }
    }
    out.sort_by_key(|e| e.minor);
    Ok(out)
}

/// The minor of the uio node whose name is exactly `name` (from netlink).
pub fn find(name: &str) -> io::Result<Option<u32>> {
    let parsed = UioName::parse(name);
    Ok(list()?.into_iter().find(|e| Some(&e.name) == parsed.as_ref()).map(|e| e.minor))
}

/// Size of map 0 of `/dev/uioN` (sysfs prints it in hex).
fn map_size(minor: u32) -> io::Result<usize> {
    let p = PathBuf::from(format!("{SYS_UIO}/uio{minor}/maps/map0/size"));
    let s = fs::read_to_string(&p)?;
    let s = s.trim();
    let v = s.strip_prefix("0x").map(|h| usize::from_str_radix(h, 16)).unwrap_or_else(|| s.parse());
    v.map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{}: bad size {s:?}", p.display())))
}

/// An open `/dev/uioN` and its mapping.
#[derive(Debug)]
pub struct Uio {
    fd: AsyncFd<OwnedFd>,
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is process-wide and stays valid until Drop; the
// pointer is only handed out through `Map`, whose accesses are volatile.
unsafe impl Send for Uio {}

impl Uio {
    /// Opens `/dev/uioN` and maps its whole region.
    pub fn open(minor: u32) -> io::Result<Uio> {
        let len = map_size(minor)?;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "uio map of size 0"));
        }
        let path = std::ffi::CString::new(format!("/dev/uio{minor}")).map_err(io::Error::other)?;
        // SAFETY: plain open(2) of a NUL-terminated path.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: maps len bytes of the device at offset 0 (map 0); the
        // result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd moves into the AsyncFd, stays open and keeps
        // its number until the AsyncFd is dropped.
        let fd = match unsafe { AsyncFd::register(fd) } {
            Ok(fd) => fd,
            Err(e) => {
                let (_, e) = e.into_parts();
                // SAFETY: unmaps what we just mapped.
                unsafe { libc::munmap(base, len) };
                return Err(e);
            }
        };
        Ok(Uio { fd, base: base.cast(), len })
    }

    /// The mapping, for the ring.
    ///
    /// The returned `Map` must not outlive `self` (the caller keeps both in
    /// the same device task and drops the ring first).
    pub fn map(&self) -> Map {
        // SAFETY: base..base+len is our read-write shared mapping, valid
        // until Drop; Map only does bounds-checked volatile accesses.
        unsafe { Map::new(self.base, self.len) }
    }
}

impl Drop for Uio {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region `open` mapped.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

impl Doorbell for Uio {
    async fn wait(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut count = [0u8; 4];
            // SAFETY: reads at most 4 bytes into a 4-byte buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), count.as_mut_ptr().cast(), 4) };
            if n == 4 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if n < 0 && e.kind() == io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Err(if n < 0 { e } else { io::Error::other(format!("uio read returned {n}")) });
        }
    }

    fn kick(&mut self) -> io::Result<()> {
        let one = 1u32.to_ne_bytes();
        // SAFETY: writes 4 bytes from a 4-byte buffer.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), 4) };
        if n == 4 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }
}

/// The backstore's configfs directory (`core/user_<hba>/<device>`).
#[derive(Clone, Debug)]
pub struct Backstore {
    dir: PathBuf,
}

impl Backstore {
    pub fn new(name: &UioName) -> Backstore {
        Backstore { dir: PathBuf::from(name.configfs_dir()) }
    }

    #[cfg(test)]
    pub fn at(dir: PathBuf) -> Backstore {
        Backstore { dir }
    }

    fn read_u64(&self, rel: &str) -> io::Result<u64> {
        let p = self.dir.join(rel);
        let s = fs::read_to_string(&p)?;
        s.trim()
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {s:?}", p.display())))
    }

    /// The size given at creation (`dev_size`), in bytes.
    pub fn size(&self) -> io::Result<u64> {
        self.read_u64("attrib/dev_size").or_else(|_| {
            // Older kernels: only the `info` line "... Size: N ...".
            let info = fs::read_to_string(self.dir.join("info"))?;
            let mut words = info.split_whitespace();
            while let Some(w) = words.next() {
                if w == "Size:" {
                    return words
                        .next()
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad Size in info"));
                }
            }
            Err(io::Error::new(io::ErrorKind::NotFound, "no Size in info"))
        })
    }

    /// Logical block size the kernel was told (`hw_block_size`).
    pub fn block_size(&self) -> io::Result<u64> {
        self.read_u64("attrib/hw_block_size")
    }

    fn action(&self, what: &str, value: &str) -> io::Result<()> {
        fs::write(self.dir.join("action").join(what), value)
    }

    /// Stops (true) or resumes (false) new commands to the ring.
    pub fn block(&self, on: bool) -> io::Result<()> {
        self.action("block_dev", if on { "1" } else { "0" })
    }

    /// Fails every command a previous handler left unanswered and empties
    /// the ring (head and tail back to 0).
    pub fn reset_ring(&self) -> io::Result<()> {
        self.action("reset_ring", "1")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_tcmu_nodes_only() {
        let root = std::env::temp_dir().join(format!("jiva-uio-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for (dir, name) in [
            ("uio0", "tcm-user/1/a/jiva/a@h\n"),
            ("uio3", "tcm-user/2/b/file/x\n"),
            ("uio2", "uio_pci_generic\n"),
            ("notuio", "tcm-user/1/c/jiva/c@h\n"),
        ] {
            fs::create_dir_all(root.join(dir)).unwrap();
            fs::write(root.join(dir).join("name"), name).unwrap();
        }
        fs::create_dir_all(root.join("uio9")).unwrap(); // no name file
        let found = list_in(&root).unwrap();
        let got: Vec<(u32, &str)> = found.iter().map(|e| (e.minor, e.name.subtype.as_str())).collect();
        assert_eq!(got, vec![(0, "jiva"), (3, "file")]);
        assert!(list_in(&root.join("missing")).unwrap().is_empty());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn backstore_size_from_attrib_or_info() {
        let root = std::env::temp_dir().join(format!("jiva-bs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("attrib")).unwrap();
        let bs = Backstore::at(root.clone());
        fs::write(
            root.join("info"),
            "Status: ACTIVATED  Max Queue Depth: 0\n  Config: jiva/v@h Size: 268435456 MaxDataAreaMB: 1024\n",
        )
        .unwrap();
        assert_eq!(bs.size().unwrap(), 268435456);
        fs::write(root.join("attrib/dev_size"), "1048576\n").unwrap();
        assert_eq!(bs.size().unwrap(), 1048576);
        fs::write(root.join("attrib/hw_block_size"), "512\n").unwrap();
        assert_eq!(bs.block_size().unwrap(), 512);
        fs::remove_dir_all(&root).unwrap();
    }
}
