//! One shutdown signal for the whole agent, in the manner of mini-redis.
//!
//! `run` builds one [`Shutdown`] from the process's SIGTERM/SIGINT future;
//! every part that must stop (the daemon loop, the socket server, the
//! container endpoint) holds a clone and waits on it. Waiting is cheap and
//! can be repeated: a part that checks again after the signal sees it at once.

use std::future::Future;

use tokio::sync::watch;

/// A cloneable view of "the agent is stopping".
#[derive(Debug, Clone)]
pub struct Shutdown {
    stopping: watch::Receiver<bool>,
}

/// Starts the shutdown of every [`Shutdown`] made from it.
#[derive(Debug)]
pub struct ShutdownTrigger {
    stopping: watch::Sender<bool>,
}

impl Shutdown {
    /// A trigger and the shutdown it starts.
    pub fn new() -> (ShutdownTrigger, Self) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { stopping: tx }, Self { stopping: rx })
    }

    /// A shutdown that starts when `signal` resolves (a task waits for it).
    /// Must be called within a Tokio runtime.
    pub fn on(signal: impl Future<Output = ()> + Send + 'static) -> Self {
        let (trigger, shutdown) = Self::new();
        tokio::spawn(async move {
            tokio::select! {
                () = signal => trigger.trigger(),
                // Nobody waits any more: nothing to stop.
                () = trigger.stopping.closed() => {}
            }
        });
        shutdown
    }

    /// True once shutdown has started.
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Waits until shutdown starts (at once if it already has). A dropped
    /// trigger counts as a shutdown.
    pub async fn wait(&mut self) {
        let _ = self.stopping.wait_for(|stopping| *stopping).await;
    }

    /// [`Shutdown::wait`] as an owned future, for tasks that take one.
    pub async fn wait_owned(mut self) {
        self.wait().await
    }
}

impl ShutdownTrigger {
    /// Starts the shutdown.
    pub fn trigger(&self) {
        self.stopping.send_replace(true);
    }
}
