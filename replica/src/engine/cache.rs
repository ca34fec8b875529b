//! Page-cache residency of file ranges (`cachestat(2)`, Linux 6.5+), so the
//! store can serve large reads of cold data with O_DIRECT (no page-cache
//! fill, which costs more CPU than the copy itself) and keep serving hot
//! data from the cache, and so the io_uring engine can write large
//! buffered writes into cached pages in one piece (see its
//! `buffered_piece`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// `cachestat` has the same number on every architecture since 6.5.
const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct Range {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Stat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Cleared once the kernel says it has no `cachestat`, or a seccomp
/// filter refuses it.
static SUPPORTED: AtomicBool = AtomicBool::new(true);

/// Whether every page of `offset..offset + len` of `file` is in the page
/// cache; `None` when the kernel cannot tell (no `cachestat`, or an error).
pub fn fully_cached(file: &File, offset: u64, len: u64) -> Option<bool> {
    if len == 0 {
        return Some(true);
    }
    if !SUPPORTED.load(Ordering::Relaxed) {
        return None;
    }
    let range = Range { off: offset, len };
    let mut stat = Stat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live locals
    // of the layout the kernel expects; the descriptor is open (borrowed).
    let rc = unsafe { libc::syscall(SYS_CACHESTAT, file.as_raw_fd(), &raw const range, &raw mut stat, 0u32) };
    if rc != 0 {
        if std::io::Error::last_os_error().raw_os_error().is_some_and(refused_for_good) {
            SUPPORTED.store(false, Ordering::Relaxed);
        }
        return None;
    }
    let page = 4096u64;
    let pages = (offset + len).div_ceil(page) - offset / page;
    Some(stat.nr_cache >= pages)
}

/// Whether a `cachestat` error means no call will ever succeed here: the
/// kernel has none (ENOSYS), or a seccomp filter refuses unknown system
/// calls (container runtimes answer EPERM or ENOSYS). Errors about one
/// file or range (EBADF, EINVAL, EOPNOTSUPP for hugetlbfs) say nothing
/// about the next call.
fn refused_for_good(errno: i32) -> bool {
    matches!(errno, libc::ENOSYS | libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn written_pages_are_cached_and_holes_past_them_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![1u8; 64 * 1024]).unwrap();
        f.set_len(1 << 20).unwrap();
        let f = File::open(&path).unwrap();
        let Some(hot) = fully_cached(&f, 0, 64 * 1024) else {
            eprintln!("cachestat unsupported here; nothing to check");
            return;
        };
        assert!(hot, "just-written pages are in the page cache");
        assert_eq!(fully_cached(&f, 0, 1 << 20), Some(false), "the untouched tail is not cached");
    }

    #[test]
    fn only_errors_about_the_call_itself_stop_the_asking() {
        assert!(refused_for_good(libc::ENOSYS));
        assert!(refused_for_good(libc::EPERM), "seccomp's answer in many container runtimes");
        for per_file in [libc::EBADF, libc::EINVAL, libc::EOPNOTSUPP, libc::EFAULT] {
            assert!(!refused_for_good(per_file), "errno {per_file} is about one file or range");
        }
    }
}
