//! An async lock over byte (or block) ranges, granted strictly in arrival
//! order among conflicting holders.
//!
//! The controller uses it so that overlapping writes reach every replica in
//! the order they arrived, while non-overlapping I/O runs in parallel; the
//! replica store uses it so that a read never sees a block between its data
//! and its checksum update.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Debug)]
struct Entry {
    start: u64,
    end: u64,
    exclusive: bool,
}

#[derive(Debug, Default)]
struct Inner {
    next_ticket: u64,
    /// Every holder and waiter, keyed by arrival ticket.
    entries: BTreeMap<u64, Entry>,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct RangeLock {
    inner: Mutex<Inner>,
    released: Notify,
}

/// Held range; released on drop (also when the owning future is dropped
/// while still waiting).
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    ticket: u64,
}

impl RangeLock {
    pub fn new() -> RangeLock {
        RangeLock::default()
    }

    /// Locks `start..end` (half-open), shared or exclusive. Conflicting
    /// requests are granted in the order `lock` was called.
    pub async fn lock(&self, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        let (ticket, granted) = {
            let mut inner = self.inner.lock().expect("range lock poisoned");
            let ticket = inner.next_ticket;
            inner.next_ticket += 1;
            inner.entries.insert(ticket, Entry { start, end, exclusive });
            (ticket, granted(&inner, ticket))
        };
        // From here on the guard owns the entry, so cancellation cleans up.
        let guard = RangeGuard { lock: self, ticket };
        // Uncontended: granted without registering as a waiter.
        if granted {
            return guard;
        }
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.granted(ticket) {
                return guard;
            }
            notified.await;
        }
    }

    fn granted(&self, ticket: u64) -> bool {
        granted(&self.inner.lock().expect("range lock poisoned"), ticket)
    }

    /// Number of holders and waiters (for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner.lock().expect("range lock poisoned").entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether no earlier holder or waiter conflicts with `ticket`.
fn granted(inner: &Inner, ticket: u64) -> bool {
    let me = &inner.entries[&ticket];
    !inner
        .entries
        .range(..ticket)
        .any(|(_, other)| (me.exclusive || other.exclusive) && other.start < me.end && me.start < other.end)
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.lock.inner.lock() {
            inner.entries.remove(&self.ticket);
        }
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn disjoint_ranges_do_not_block() {
        let lock = RangeLock::new();
        let _a = lock.lock(0, 10, true).await;
        let _b = lock.lock(10, 20, true).await;
        assert_eq!(lock.len(), 2);
    }

    #[tokio::test]
    async fn shared_ranges_coexist() {
        let lock = RangeLock::new();
        let _a = lock.lock(0, 10, false).await;
        let _b = lock.lock(5, 20, false).await;
    }

    #[tokio::test]
    async fn overlapping_exclusive_waits_and_keeps_order() {
        let lock = Arc::new(RangeLock::new());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = lock.lock(0, 10, true).await;
        let mut tasks = Vec::new();
        for i in 0..5u64 {
            let task_lock = lock.clone();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let _g = task_lock.lock(i, i + 8, true).await;
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }));
            // Make sure each task has taken its ticket before the next one.
            while lock.len() < (i as usize) + 2 {
                tokio::task::yield_now().await;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(order.lock().unwrap().is_empty());
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert!(lock.is_empty());
    }

    #[tokio::test]
    async fn cancelled_waiter_releases_its_ticket() {
        let lock = RangeLock::new();
        let held = lock.lock(0, 10, true).await;
        {
            let waiter = lock.lock(0, 10, true);
            let r = tokio::time::timeout(Duration::from_millis(5), waiter).await;
            assert!(r.is_err());
        }
        assert_eq!(lock.len(), 1);
        drop(held);
        let _again = lock.lock(0, 10, true).await;
    }
}
