//! Whose turn it is to write to a session's socket.
//!
//! Replies normally leave through one writer task. A large READ that the
//! device serves at once (a local replica's cached files) is cheaper sent
//! by the blocking thread that read it, straight after the read: handing
//! the megabyte back to the runtime and out to another blocking thread for
//! the send costs two more thread wake-ups per read. Both write whole
//! frames, one at a time: each takes the [`SendTurn`] first, and the writer
//! flushes what it buffered before giving it back.
//!
//! Blocking takers step aside while the writer task waits, so a stream of
//! large replies cannot starve the small ones. Once the session ends (or a
//! frame was cut short) the turn is closed: takers get `None` and senders
//! stop at their next wait, so a client that stops reading cannot hold a
//! thread.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

/// How often a blocked taker checks whether the session ended.
const CHECK_CLOSED: Duration = Duration::from_millis(50);

/// A session socket shared by its writer task and blocking senders.
pub(super) struct SendTurn {
    /// A duplicate of the socket's descriptor, for blocking sends.
    fd: OwnedFd,
    state: Mutex<State>,
    /// Blocking takers wait here.
    freed: Condvar,
    /// The writer task waits here.
    freed_async: Notify,
    /// Set when the session ends: blocking senders give up.
    closed: AtomicBool,
}

#[derive(Default)]
struct State {
    held: bool,
    writer_waiting: bool,
    /// Blocking takers waiting: woken only if there are any (a wake-up
    /// is a system call).
    blocked: usize,
}

/// The right to write to the socket, until dropped.
pub(super) struct Turn<'a>(&'a SendTurn);

impl SendTurn {
    pub(super) fn new(fd: OwnedFd) -> SendTurn {
        SendTurn {
            fd,
            state: Mutex::new(State::default()),
            freed: Condvar::new(),
            freed_async: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// The socket, for sends by whoever holds the turn.
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Set once the session ended: senders stop.
    pub(super) fn closed(&self) -> &AtomicBool {
        &self.closed
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // Taken so a taker between its check and its wait sees it.
        drop(self.lock());
        self.freed.notify_all();
    }

    /// Ends the session after a frame was cut short: nothing more may be
    /// written after part of one, so the socket is shut down.
    pub(super) fn abort(&self) {
        self.close();
        // shutdown(2) through a std socket made from another duplicate (it
        // acts on the socket, whatever its kind, not on the descriptor).
        if let Ok(fd) = self.fd.try_clone() {
            let _ = std::net::TcpStream::from(fd).shutdown(std::net::Shutdown::Both);
        }
    }

    /// Waits for the turn on a thread that may block; `None` once the
    /// session ended.
    pub(super) fn take_blocking(&self) -> Option<Turn<'_>> {
        let mut state = self.lock();
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return None;
            }
            if !state.held && !state.writer_waiting {
                state.held = true;
                return Some(Turn(self));
            }
            state.blocked += 1;
            state = self.freed.wait_timeout(state, CHECK_CLOSED).unwrap_or_else(PoisonError::into_inner).0;
            state.blocked -= 1;
        }
    }

    /// Waits for the turn in the writer task.
    pub(super) async fn take(&self) -> Turn<'_> {
        // Mostly free: taken without registering a waiter.
        {
            let mut state = self.lock();
            if !state.held {
                state.held = true;
                return Turn(self);
            }
        }
        loop {
            let freed = self.freed_async.notified();
            tokio::pin!(freed);
            // Registered before looking, so a release in between wakes it.
            freed.as_mut().enable();
            {
                let mut state = self.lock();
                if !state.held {
                    state.held = true;
                    state.writer_waiting = false;
                    return Turn(self);
                }
                state.writer_waiting = true;
            }
            freed.await;
        }
    }

    fn release(&self) {
        let (writer_waiting, blocked) = {
            let mut state = self.lock();
            state.held = false;
            (state.writer_waiting, state.blocked)
        };
        if writer_waiting {
            self.freed_async.notify_waiters();
        } else if blocked > 0 {
            self.freed.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn turn() -> Arc<SendTurn> {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        Arc::new(SendTurn::new(OwnedFd::from(a)))
    }

    #[test]
    fn one_holder_at_a_time() {
        let t = turn();
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (t, inside) = (Arc::clone(&t), Arc::clone(&inside));
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _turn = t.take_blocking().unwrap();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_writer_gets_its_turn_between_blocking_senders() {
        let t = turn();
        let stop = Arc::new(AtomicBool::new(false));
        // Two threads that take the turn back to back, forever.
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (t, stop) = (Arc::clone(&t), Arc::clone(&stop));
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let _turn = t.take_blocking();
                        std::thread::sleep(Duration::from_micros(200));
                    }
                })
            })
            .collect();
        for _ in 0..20 {
            let taken = tokio::time::timeout(Duration::from_secs(5), t.take()).await;
            assert!(taken.is_ok(), "the writer starved");
        }
        stop.store(true, Ordering::SeqCst);
        for th in threads {
            th.join().unwrap();
        }
    }

    #[test]
    fn closing_frees_a_waiting_taker() {
        let t = turn();
        let held = t.take_blocking().unwrap();
        let waiter = {
            let t = Arc::clone(&t);
            std::thread::spawn(move || t.take_blocking().is_none())
        };
        std::thread::sleep(Duration::from_millis(20));
        t.close();
        assert!(waiter.join().unwrap(), "a taker got the turn after close");
        drop(held);
        assert!(t.take_blocking().is_none());
    }
}
