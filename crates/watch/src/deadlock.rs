//! A deadlock detector: a thread that asks `parking_lot` for threads blocked in a cycle.
//!
//! The rank checker catches lock-order mistakes in tests; this catches what gets past it
//! (a lock taken outside [`crate::RankedMutex`], a cycle through a library's locks) in a
//! running server: the report goes to the log, to `/health` and to a metric.

use arc_swap::ArcSwap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What the detector has found so far.
#[derive(Default)]
pub struct DeadlockReport {
    /// Cycles found (each reported once per check while it lasts).
    pub cycles: AtomicU64,
    /// A description of the last cycle: thread ids and backtraces.
    pub last: ArcSwap<String>,
}

impl DeadlockReport {
    /// Cycles found so far.
    pub fn count(&self) -> u64 {
        self.cycles.load(Ordering::Relaxed)
    }
}

/// The process's detector, once started (`parking_lot`'s detection is process-wide).
static DETECTOR: std::sync::OnceLock<Arc<DeadlockReport>> = std::sync::OnceLock::new();

/// Starts the detector thread, checking every `interval`; it runs for the life of the
/// process. Later calls return the same report.
pub fn start_deadlock_detector(interval: Duration) -> Arc<DeadlockReport> {
    DETECTOR.get_or_init(|| spawn(interval)).clone()
}

fn spawn(interval: Duration) -> Arc<DeadlockReport> {
    let report = Arc::new(DeadlockReport::default());
    let shared = report.clone();
    let spawned = std::thread::Builder::new()
        .name("deadlock-detector".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                let cycles = parking_lot::deadlock::check_deadlock();
                if cycles.is_empty() {
                    continue;
                }
                let mut text = String::new();
                for (n, cycle) in cycles.iter().enumerate() {
                    text.push_str(&format!("deadlock cycle {n}:\n"));
                    for thread in cycle {
                        text.push_str(&format!(
                            "  thread {:?}:\n{:?}\n",
                            thread.thread_id(),
                            thread.backtrace()
                        ));
                    }
                }
                tracing::error!(cycles = cycles.len(), "DEADLOCK detected\n{text}");
                shared
                    .cycles
                    .fetch_add(cycles.len() as u64, Ordering::Relaxed);
                shared.last.store(Arc::new(text));
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the deadlock detector");
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[test]
    fn a_real_deadlock_between_two_threads_is_reported() {
        let report = start_deadlock_detector(Duration::from_millis(50));
        let a = Arc::new(Mutex::new(()));
        let b = Arc::new(Mutex::new(()));
        let barrier = Arc::new(std::sync::Barrier::new(2));
        for (first, second) in [(a.clone(), b.clone()), (b, a)] {
            let barrier = barrier.clone();
            // These two threads stay blocked for the rest of the test process: that is
            // the point.
            std::thread::spawn(move || {
                let _one = first.lock();
                barrier.wait();
                let _two = second.lock();
            });
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while report.count() == 0 {
            assert!(std::time::Instant::now() < deadline, "no deadlock reported");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(report.last.load().contains("deadlock cycle 0"));
    }
}
