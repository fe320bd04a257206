//! Graceful shutdown of a worker, used by every front end: the stop signal,
//! the count of busy connections the stop waits for, and the count of open
//! ones (read by the memory trimmer).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::sync::Notify;

/// A worker's stop signal, its count of busy connections (those with a
/// request in flight, and HTTP/2 connections) and of open ones. Idle HTTP/1.1
/// connections are not busy: they are simply dropped with the worker's
/// runtime, so waiting for a request costs them no registration with the stop
/// signal. Both counts are written by the worker's own thread only.
#[derive(Default)]
pub struct Shutdown {
    stopping: AtomicBool,
    stop: Notify,
    busy: AtomicUsize,
    drained: Notify,
    open: AtomicUsize,
}

/// Counts one open client connection while it lives.
pub struct Open(Arc<Shutdown>);

impl Open {
    /// The worker's shutdown the connection answers to.
    pub fn shutdown(&self) -> &Shutdown {
        &self.0
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one busy connection while it lives.
pub struct Busy<'a>(&'a Shutdown);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 && self.0.is_stopping() {
            self.0.drained.notify_waiters();
        }
    }
}

impl Shutdown {
    /// Counts a client connection as open until the guard drops.
    pub fn open(self: &Arc<Self>) -> Open {
        self.open.fetch_add(1, Ordering::Relaxed);
        Open(self.clone())
    }

    /// Client connections open now, and those with a request in flight.
    pub fn counts(&self) -> (usize, usize) {
        (self.open.load(Ordering::Relaxed), self.busy.load(Ordering::Relaxed))
    }

    pub fn busy(&self) -> Busy<'_> {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self)
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Tells HTTP/2 connections to wind down and busy HTTP/1.1 ones to close
    /// after their request.
    pub fn begin(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.notify_waiters();
    }

    /// Resolves once the stop has begun.
    pub async fn stopped(&self) {
        let notified = self.stop.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_stopping() {
            return;
        }
        notified.await;
    }

    /// Resolves once no connection is busy.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.busy.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}
