//! Gives the heap's free memory back to the system once a wave of clients has
//! passed, so a burst does not leave the process at its peak size for good.
//!
//! Measured (docs/BENCHMARKS.md, "Memory after a wave or a burst"): after 9,000
//! clients sent at once and then stayed idle, glibc kept ~24 MiB of freed
//! request state (buffers, request futures, upstream connections made for the
//! burst) in pages it does not return by itself; after every client had gone,
//! the process stayed at its peak. `malloc_trim(0)` returns those pages. It
//! walks every arena under its lock, so it runs rarely and off the workers: a
//! thread looks at the workers' open and busy connection counts once a second
//! and trims when either has fallen well below its recent peak.

use crate::shutdown::Shutdown;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// The workers' connection counts the trimmer watches.
static WORKERS: Mutex<Vec<Weak<Shutdown>>> = Mutex::new(Vec::new());

/// How often the counts are read.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// A drop in open connections that is worth a trim (and at least half the peak).
const OPEN_DROP: usize = 1024;
/// A drop in busy connections that is worth a trim (and at least three quarters of the peak).
const BUSY_DROP: usize = 256;

/// Adds a worker's counts to those the trimmer watches.
pub fn watch(worker: &Arc<Shutdown>) {
    let mut workers = WORKERS.lock().unwrap_or_else(|p| p.into_inner());
    workers.retain(|w| w.strong_count() > 0);
    workers.push(Arc::downgrade(worker));
}

/// Starts the trimmer thread (once per process; later calls do nothing).
pub fn start_trimmer() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new().name("fulcrum-memory".into()).spawn(|| {
            let mut peaks = Peaks::default();
            loop {
                std::thread::sleep(LOOK_EVERY);
                if peaks.should_trim(totals()) {
                    trim();
                }
            }
        });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the memory trimmer; freed memory stays with the process");
        }
    });
}

/// Open and busy client connections over every worker (also a metric).
pub fn totals() -> (usize, usize) {
    let workers = WORKERS.lock().unwrap_or_else(|p| p.into_inner());
    workers
        .iter()
        .filter_map(Weak::upgrade)
        .map(|w| w.counts())
        .fold((0, 0), |(open, busy), (o, b)| (open + o, busy + b))
}

/// The highest counts seen since the last trim.
#[derive(Default, Debug)]
struct Peaks {
    open: usize,
    busy: usize,
}

impl Peaks {
    /// Takes the counts now; true when they have fallen far enough below the
    /// peaks that a trim is worth it (the peaks then restart from now).
    fn should_trim(&mut self, (open, busy): (usize, usize)) -> bool {
        self.open = self.open.max(open);
        self.busy = self.busy.max(busy);
        let open_fell = self.open >= open + OPEN_DROP && open <= self.open / 2;
        let busy_fell = self.busy >= busy + BUSY_DROP && busy <= self.busy / 4;
        if open_fell || busy_fell {
            *self = Peaks { open, busy };
            return true;
        }
        false
    }
}

/// Returns free heap pages to the system.
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let started = std::time::Instant::now();
        // SAFETY: malloc_trim only takes the allocator's own locks; any thread may call it.
        unsafe { libc::malloc_trim(0) };
        tracing::debug!(took = ?started.elapsed(), "returned free heap memory to the system");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_a_burst_ends_and_after_clients_leave_not_on_small_moves() {
        let mut peaks = Peaks::default();
        // Steady traffic: no trim.
        for _ in 0..10 {
            assert!(!peaks.should_trim((500, 100)));
            assert!(!peaks.should_trim((400, 20)));
        }
        // A burst of 9,000 requests, answered: the clients stay, idle.
        assert!(!peaks.should_trim((9_000, 9_000)));
        assert!(peaks.should_trim((9_000, 0)), "the burst is over");
        assert!(!peaks.should_trim((9_000, 0)), "once per fall");
        // Every client leaves.
        assert!(peaks.should_trim((0, 0)), "the clients have gone");
        assert!(!peaks.should_trim((0, 0)));
        // A small wave coming and going is not worth a trim.
        assert!(!peaks.should_trim((800, 10)));
        assert!(!peaks.should_trim((0, 0)));
    }
}
