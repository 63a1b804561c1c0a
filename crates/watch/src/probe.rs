//! Probes (depth, oldest item, progress of one queue) and activities (what one worker is
//! doing).

use arc_swap::ArcSwap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A reading of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sample {
    /// Items waiting or in progress.
    pub depth: u64,
    /// When the oldest of them was enqueued (Unix ms).
    pub oldest_ms: Option<i64>,
}

type Sampler = Box<dyn Fn() -> Option<Sample> + Send + Sync>;

/// One queue's depth, oldest item and progress.
///
/// In-memory queues keep depth and oldest item in the probe's atomics; a queue that lives
/// in the database registers a sampler instead (run by the watchdog on its own thread).
/// Progress is a counter the consumer bumps for every item it finishes (delivered,
/// deferred or quarantined: any outcome is progress).
pub struct Probe {
    name: &'static str,
    /// False for a queue nothing consumes yet (it is reported, never called stalled).
    watched: bool,
    depth: AtomicI64,
    oldest_ms: AtomicI64,
    progress: AtomicU64,
    sampler: Option<Sampler>,
    /// When the sampler last answered (Unix ms; 0: never).
    sampled_at_ms: AtomicI64,
    /// How long this queue may hold work without progress before it is stalled, when
    /// longer than the watchdog's own setting (ms; 0: the watchdog's). Outbound delivery
    /// legitimately waits minutes on a remote server's reply.
    patience_ms: AtomicI64,
}

impl Probe {
    /// A probe for an in-memory queue.
    pub fn new(name: &'static str) -> Arc<Probe> {
        Arc::new(Probe {
            name,
            watched: true,
            depth: AtomicI64::new(0),
            oldest_ms: AtomicI64::new(0),
            progress: AtomicU64::new(0),
            sampler: None,
            sampled_at_ms: AtomicI64::new(0),
            patience_ms: AtomicI64::new(0),
        })
    }

    /// A probe whose depth and oldest item come from `sampler` (`None` when it cannot
    /// tell right now).
    pub fn sampled(
        name: &'static str,
        watched: bool,
        sampler: impl Fn() -> Option<Sample> + Send + Sync + 'static,
    ) -> Arc<Probe> {
        Arc::new(Probe {
            name,
            watched,
            depth: AtomicI64::new(0),
            oldest_ms: AtomicI64::new(0),
            progress: AtomicU64::new(0),
            sampler: Some(Box::new(sampler)),
            sampled_at_ms: AtomicI64::new(0),
            patience_ms: AtomicI64::new(0),
        })
    }

    /// The queue's name, as `/health` and the metrics show it.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Lets this queue go without progress for up to `patience` before it counts as
    /// stalled (when longer than the watchdog's stall time).
    pub fn set_patience(&self, patience: std::time::Duration) {
        self.patience_ms
            .store(patience.as_millis() as i64, Ordering::Relaxed);
    }

    /// The stall time for this queue given the watchdog's `stall_after_ms`.
    pub fn stall_after_ms(&self, stall_after_ms: i64) -> i64 {
        stall_after_ms.max(self.patience_ms.load(Ordering::Relaxed))
    }

    /// Whether the watchdog may call this queue stalled.
    pub fn watched(&self) -> bool {
        self.watched
    }

    /// `n` items joined the queue.
    pub fn enqueued(&self, n: u64) {
        self.depth.fetch_add(n as i64, Ordering::Relaxed);
    }

    /// `n` items left the queue, finished one way or another.
    pub fn finished(&self, n: u64) {
        self.depth.fetch_sub(n as i64, Ordering::Relaxed);
        self.progress.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts progress without changing the depth (a sampled queue's consumer).
    pub fn progressed(&self, n: u64) {
        self.progress.fetch_add(n, Ordering::Relaxed);
    }

    /// The consumer took items enqueued at `oldest_ms` and later; `None` when it holds
    /// nothing.
    pub fn working_on(&self, oldest_ms: Option<i64>) {
        self.oldest_ms
            .store(oldest_ms.unwrap_or(0), Ordering::Relaxed);
    }

    /// The progress counter.
    pub fn progress(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }

    /// Whether depth and oldest item come from a sampler (see [`Probe::refresh`]).
    pub fn is_sampled(&self) -> bool {
        self.sampler.is_some()
    }

    /// Runs the sampler (if any) and keeps its answer for [`Probe::sample`].
    ///
    /// The watchdog's sampler thread calls this, never the watchdog itself: a sampler
    /// reads the database, and a watchdog that waits on the database cannot report the
    /// database being stuck (nor keep its verdict fresh when the machine is saturated).
    pub fn refresh(&self) {
        let Some(sampler) = &self.sampler else {
            return;
        };
        if let Some(sample) = sampler() {
            self.depth.store(sample.depth as i64, Ordering::Relaxed);
            self.oldest_ms
                .store(sample.oldest_ms.unwrap_or(0), Ordering::Relaxed);
            self.sampled_at_ms.store(crate::now_ms(), Ordering::Relaxed);
        }
    }

    /// When the sampler last answered (Unix ms): `None` for an in-memory probe (always
    /// current) and for a sampler that has not answered yet.
    pub fn sampled_at(&self) -> Option<i64> {
        let at = self.sampled_at_ms.load(Ordering::Relaxed);
        (self.sampler.is_some() && at > 0).then_some(at)
    }

    /// The current depth and oldest item: for a sampled probe, the sampler's last answer
    /// (`None` before its first).
    pub fn sample(&self) -> Option<Sample> {
        if self.sampler.is_some() && self.sampled_at().is_none() {
            return None;
        }
        let depth = self.depth.load(Ordering::Relaxed).max(0) as u64;
        let oldest = self.oldest_ms.load(Ordering::Relaxed);
        Some(Sample {
            depth,
            oldest_ms: (depth > 0 && oldest > 0).then_some(oldest),
        })
    }
}

/// What one worker is doing and since when (Unix ms).
pub struct Activity {
    worker: String,
    current: ArcSwap<(String, i64)>,
    /// Set when the worker's thread ended by a panic (see [`Activity::guard`]).
    died: std::sync::atomic::AtomicBool,
}

/// Held by a worker thread for its whole life (from [`Activity::guard`]): if the thread
/// unwinds, the activity is marked dead and the watchdog turns `/health` red at its next
/// check, naming the worker. Why: a worker thread that dies silently is the classic
/// wedge (its queue backs up while everything else looks fine); a queue's stall time is
/// too long to wait for a death that is certain.
pub struct ActivityGuard {
    activity: Arc<Activity>,
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.activity
                .died
                .store(true, std::sync::atomic::Ordering::SeqCst);
            self.activity.set("DIED: the thread panicked (see the log)");
            tracing::error!(
                worker = self.activity.worker(),
                "the {} thread died; its work has stopped until a restart",
                self.activity.worker()
            );
        }
    }
}

impl Activity {
    /// An idle worker called `worker`.
    pub fn new(worker: impl Into<String>) -> Arc<Activity> {
        Arc::new(Activity {
            worker: worker.into(),
            current: ArcSwap::from_pointee(("idle".to_string(), crate::now_ms())),
            died: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A guard for the worker's thread to hold for its whole life: should the thread
    /// unwind, the activity is marked dead (see [`ActivityGuard`]).
    pub fn guard(self: &Arc<Self>) -> ActivityGuard {
        ActivityGuard {
            activity: self.clone(),
        }
    }

    /// Whether the worker's thread died by a panic.
    pub fn died(&self) -> bool {
        self.died.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The worker's name.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// The worker starts doing `what`.
    pub fn set(&self, what: impl Into<String>) {
        self.current.store(Arc::new((what.into(), crate::now_ms())));
    }

    /// The worker waits for work.
    pub fn idle(&self) {
        self.set("idle");
    }

    /// What it is doing and since when (Unix ms).
    pub fn current(&self) -> (String, i64) {
        (**self.current.load()).clone()
    }
}
