//! Waiting for the signals that ask a process to stop (SIGINT, SIGTERM).

use tokio::signal::unix::{SignalKind, signal};

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn terminated() {
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        // Without signal handlers we can only run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
