//! The inbound conversion workers.
//!
//! Each worker is an OS thread that claims a batch of due inbound entries (one
//! transaction), parses each on a helper thread of its own pool with a time budget (all
//! of a batch in parallel), and delivers the parsed ones together (one transaction). A
//! message that panics the parser, or takes longer than its budget, is deferred (and
//! after `attempts_max` tries, quarantined with the reason) while the others are
//! delivered: a slow parse holds its batch-mates up by [`FLUSH_PATIENCE`] at most. A
//! helper that overruns its budget is given up on, not killed (Rust cannot kill a
//! thread): the pool starts another in its place, and the lost one rejoins the pool if
//! its parse ever ends. It writes nothing, and the attempt limit bounds how many one
//! poison message can hold (`mailroom_conversion_abandoned` counts them).
//!
//! The helpers are kept between batches: starting a thread per message was a fifth of
//! conversion's time (docs/benchmarks.md, profile).
//!
//! The attempt is counted when the entry is claimed, so a message that crashes the whole
//! process is also quarantined after `attempts_max` restarts.

use crate::{delivery_plan, message_facts};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use mailroom_directory::Directory;
use mailroom_queue::Doorbell;
use mailroom_store::{ClaimedItem, DeliveryPlan, MailStore, MessageFacts};
use mailroom_watch::now_ms;
use mailroom_watch::{Activity, Probe};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A function run on every message before parsing; tests use it to make conversion
/// panic or block. Not reachable from configuration.
pub type ConversionHook = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Conversion settings (the `[conversion]` section of the config).
#[derive(Debug, Clone)]
pub struct ConversionConfig {
    /// Worker threads.
    pub workers: usize,
    /// Time one message's parse may take before it counts as a failed attempt.
    pub time_budget: Duration,
    /// Attempts before a message is quarantined.
    pub attempts_max: u32,
    /// Delay before the first retry; doubles with every attempt.
    pub retry_delay: Duration,
    /// Longest a worker sleeps without a doorbell ring before looking for due retries.
    pub idle_poll: Duration,
    /// Messages claimed, parsed in parallel and delivered in one transaction, at most.
    pub batch_max: usize,
}

impl Default for ConversionConfig {
    fn default() -> Self {
        ConversionConfig {
            workers: 2,
            time_budget: Duration::from_secs(30),
            attempts_max: 5,
            retry_delay: Duration::from_secs(10),
            idle_poll: Duration::from_millis(500),
            batch_max: 32,
        }
    }
}

/// Counters for conversion.
#[derive(Clone, Default)]
pub struct ConversionStats {
    /// Messages converted and delivered (inbound entries completed).
    pub converted: Counter,
    /// Copies placed in local mailboxes.
    pub delivered: Counter,
    /// Recipients recorded for outbound delivery.
    pub routed_remote: Counter,
    /// Attempts that failed (panic, time budget, store error).
    pub failures: Counter,
    /// Messages moved to quarantine.
    pub quarantined: Counter,
    /// Helper threads abandoned after overrunning their budget.
    pub abandoned: Counter,
    /// Store writes retried because of a storage fault (disk full, I/O error).
    pub storage_waits: Counter,
}

impl ConversionStats {
    /// Adds the counters to a Prometheus registry.
    pub fn register(&self, registry: &mut Registry) {
        let pairs = [
            (
                "mailroom_conversion_converted",
                "Inbound messages converted",
                &self.converted,
            ),
            (
                "mailroom_messages_delivered",
                "Copies delivered to local mailboxes",
                &self.delivered,
            ),
            (
                "mailroom_conversion_routed_remote",
                "Recipients recorded in the outbound queue",
                &self.routed_remote,
            ),
            (
                "mailroom_conversion_failures",
                "Conversion attempts that failed",
                &self.failures,
            ),
            (
                "mailroom_conversion_quarantined",
                "Messages moved to quarantine",
                &self.quarantined,
            ),
            (
                "mailroom_conversion_abandoned",
                "Conversion threads abandoned after overrunning their time budget",
                &self.abandoned,
            ),
            (
                "mailroom_conversion_storage_waits",
                "Conversion store writes retried because of a storage fault (disk full, I/O error)",
                &self.storage_waits,
            ),
        ];
        for (name, help, counter) in pairs {
            registry.register(name, help, counter.clone());
        }
    }
}

/// The running workers.
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
    activities: Vec<Arc<Activity>>,
}

struct Worker {
    store: Arc<dyn MailStore>,
    directory: Directory,
    doorbell: Doorbell,
    config: ConversionConfig,
    cancel: CancellationToken,
    stats: ConversionStats,
    /// Counts every finished attempt (delivered, deferred, quarantined).
    probe: Arc<Probe>,
    /// What this worker is doing, for the watchdog's report.
    activity: Arc<Activity>,
    /// The parse helpers.
    pool: std::cell::RefCell<ParsePool>,
    /// Workers converting a batch right now, and a bell rung when one finishes: see
    /// `PEER_PATIENCE`.
    converting: Arc<AtomicUsize>,
    batch_done: Doorbell,
}

/// How long a worker that was woken lets a peer that is converting finish first. The
/// deliveries of all workers take one write turn in turn, and the parses run on helper
/// threads whichever worker claims, so two workers splitting a trickle into small
/// batches only added transactions, fsyncs and wake-ups (and took the CPU that
/// accepting mail needed: measured in docs/benchmarks.md). One worker at a time
/// claims what came meanwhile as one batch; a peer stuck on a slow message is not
/// waited for longer than this.
const PEER_PATIENCE: Duration = Duration::from_millis(50);

/// One message's parse, for a helper: its index in the batch, its bytes, and where to
/// send the outcome.
type ParseJob = (usize, Arc<[u8]>, Sender<ParseOutcome>);
type ParseOutcome = (usize, Result<MessageFacts, String>);

/// A worker's parse helper threads, kept between batches. Every helper waits on one job
/// channel; before a batch of `n` is sent, the pool makes sure `n` helpers are free, so
/// every parse starts at once and its budget is its own.
struct ParsePool {
    jobs: Option<Sender<ParseJob>>,
    receiver: Receiver<ParseJob>,
    /// Helpers started. A helper's `JoinHandle` is never dropped while the thread may be
    /// exiting: glibc's `pthread_detach` races with a concurrently exiting thread and
    /// can read freed memory (we saw it crash the server under churn). They are joined,
    /// or forgotten at shutdown when still stuck in a parse.
    helpers: Vec<JoinHandle<()>>,
    /// Jobs taken by a helper and not finished.
    busy: Arc<AtomicUsize>,
    hook: Option<ConversionHook>,
    name: String,
}

impl ParsePool {
    /// A pool for batches of at most `capacity` messages. The job channel holds that
    /// many: a batch is sent only once as many helpers are free and the previous batch
    /// has been taken (abandoned parses were taken by their helper), so a send never
    /// waits.
    fn new(name: String, capacity: usize, hook: Option<ConversionHook>) -> ParsePool {
        let (jobs, receiver) = bounded(capacity.max(1));
        ParsePool {
            jobs: Some(jobs),
            receiver,
            helpers: Vec::new(),
            busy: Arc::new(AtomicUsize::new(0)),
            hook,
            name,
        }
    }

    /// Starts helpers until at least `n` are free (not in a parse). Helpers still in an
    /// abandoned parse count as busy, so they are replaced.
    fn ensure_free(&mut self, n: usize) -> std::io::Result<()> {
        while self
            .helpers
            .len()
            .saturating_sub(self.busy.load(Ordering::Acquire))
            < n
        {
            let receiver = self.receiver.clone();
            let busy = self.busy.clone();
            let hook = self.hook.clone();
            let handle = std::thread::Builder::new()
                .name(format!("parse-{}-{}", self.name, self.helpers.len()))
                .spawn(move || {
                    while let Ok((index, body, done)) = receiver.recv() {
                        busy.fetch_add(1, Ordering::AcqRel);
                        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            if let Some(hook) = &hook {
                                hook(&body);
                            }
                            message_facts(&body)
                        }));
                        // Free again before the worker hears of it, so the next batch
                        // counts this helper as free.
                        busy.fetch_sub(1, Ordering::AcqRel);
                        let _ = done.send((index, outcome.map_err(|panic| panic_message(&*panic))));
                    }
                })?;
            self.helpers.push(handle);
        }
        Ok(())
    }

    /// Stops the helpers: the free ones end at once and are joined; one still in an
    /// abandoned parse is left to the process exit (joining could wait forever).
    fn stop(&mut self) {
        self.jobs = None;
        let deadline = Instant::now() + Duration::from_millis(200);
        while !self.helpers.iter().all(JoinHandle::is_finished) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        for handle in self.helpers.drain(..) {
            if handle.is_finished() {
                let _ = handle.join();
            } else {
                std::mem::forget(handle);
            }
        }
    }
}

impl Workers {
    /// Starts `config.workers` threads. They stop, after the message in hand, once
    /// `cancel` fires. Every finished attempt counts as progress on `probe`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        store: Arc<dyn MailStore>,
        directory: Directory,
        doorbell: Doorbell,
        config: ConversionConfig,
        hook: Option<ConversionHook>,
        cancel: CancellationToken,
        stats: ConversionStats,
        probe: Arc<Probe>,
    ) -> std::io::Result<Workers> {
        let mut threads = Vec::new();
        let mut activities = Vec::new();
        let converting = Arc::new(AtomicUsize::new(0));
        let batch_done = Doorbell::default();
        for index in 0..config.workers.max(1) {
            let activity = Activity::new(format!("conversion-{index}"));
            activities.push(activity.clone());
            let worker = Worker {
                probe: probe.clone(),
                activity,
                pool: std::cell::RefCell::new(ParsePool::new(
                    index.to_string(),
                    config.batch_max,
                    hook.clone(),
                )),
                store: store.clone(),
                directory: directory.clone(),
                doorbell: doorbell.clone(),
                config: config.clone(),
                cancel: cancel.clone(),
                stats: stats.clone(),
                converting: converting.clone(),
                batch_done: batch_done.clone(),
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("conversion-{index}"))
                    .spawn(move || worker.run())?,
            );
        }
        Ok(Workers {
            threads,
            activities,
        })
    }

    /// What each worker is doing (register them with the watchdog).
    pub fn activities(&self) -> &[Arc<Activity>] {
        &self.activities
    }

    /// Waits for every worker thread to return (after cancellation).
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }

    /// True once every worker thread has returned.
    pub fn finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }
}

/// How long a batch waits on a slow parse before delivering the messages that are ready;
/// bounds how long a slow message holds up its batch-mates.
const FLUSH_PATIENCE: Duration = Duration::from_millis(50);

impl Worker {
    fn run(self) {
        let _alive = self.activity.guard();
        let batch_max = self.config.batch_max.max(1);
        while !self.cancel.is_cancelled() {
            // Rings up to here are answered by this claim (see `Doorbell::drain`).
            self.doorbell.drain();
            match self.store.claim_inbound(now_ms(), batch_max) {
                Ok(items) if items.is_empty() => {
                    self.activity.idle();
                    self.doorbell.wait(self.config.idle_poll);
                    // Drained first: a peer finishing after this still wakes us.
                    self.batch_done.drain();
                    if self.converting.load(Ordering::Acquire) > 0 {
                        self.batch_done.wait(PEER_PATIENCE);
                    }
                }
                Ok(items) => {
                    if items.len() == batch_max {
                        // A full batch: more is probably waiting; wake a peer for it.
                        self.doorbell.ring(1);
                    }
                    self.activity.set(format!(
                        "converting {} message(s), first {} (attempt {})",
                        items.len(),
                        items[0].queue_id,
                        items[0].attempts
                    ));
                    self.converting.fetch_add(1, Ordering::AcqRel);
                    self.convert_batch(items);
                    self.converting.fetch_sub(1, Ordering::AcqRel);
                    self.batch_done.ring(1);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot claim from the inbound queue");
                    self.doorbell.wait(self.config.idle_poll);
                }
            }
        }
        self.pool.borrow_mut().stop();
    }

    /// Parses every item on a helper thread (all in parallel), delivers the parsed ones
    /// in as few transactions as patience allows, and fails the rest.
    fn convert_batch(&self, items: Vec<ClaimedItem>) {
        let mut slots: Vec<Option<ClaimedItem>> = Vec::with_capacity(items.len());
        let (done, results) = bounded(items.len());
        let mut outstanding = 0usize;
        let mut pool = self.pool.borrow_mut();
        let jobs = match pool.ensure_free(items.len()) {
            Ok(()) => pool.jobs.clone(),
            Err(e) => {
                drop(pool);
                for item in &items {
                    self.fail(item, &format!("cannot start a parse thread: {e}"));
                }
                return;
            }
        };
        drop(pool);
        for item in items {
            if item.attempts > self.config.attempts_max {
                let reason = format!(
                    "gave up after {} attempts (the process stopped during earlier ones)",
                    item.attempts - 1
                );
                self.quarantine(&item, &reason);
                continue;
            }
            let index = slots.len();
            let body: Arc<[u8]> = Arc::from(item.body.as_slice());
            // Never waits: as many helpers are free as the batch has messages. Should
            // that ever be wrong, the message is deferred (a failed attempt), not waited
            // for: a worker must not block behind its own helpers.
            let sent = jobs
                .as_ref()
                .map(|jobs| jobs.try_send((index, body, done.clone())));
            if !matches!(sent, Some(Ok(()))) {
                self.fail(&item, "no parse helper was free to take it");
                continue;
            }
            slots.push(Some(item));
            outstanding += 1;
        }
        drop(done);
        let deadline = Instant::now() + self.config.time_budget;
        let mut ready: Vec<(ClaimedItem, MessageFacts)> = Vec::new();
        while outstanding > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = if ready.is_empty() {
                left
            } else {
                left.min(FLUSH_PATIENCE)
            };
            match results.recv_timeout(wait) {
                Ok((index, outcome)) => {
                    outstanding -= 1;
                    let item = slots[index].take().expect("each parse reports once");
                    match outcome {
                        Ok(facts) => ready.push((item, facts)),
                        Err(message) => {
                            self.fail(&item, &format!("conversion panicked: {message}"))
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    self.deliver(std::mem::take(&mut ready));
                }
                Err(_) => break,
            }
        }
        self.deliver(ready);
        let budget = self.config.time_budget.as_millis();
        for item in slots.into_iter().flatten() {
            self.stats.abandoned.inc();
            self.fail(
                &item,
                &format!("conversion exceeded its time budget of {budget} ms"),
            );
        }
    }

    fn deliver(&self, mut ready: Vec<(ClaimedItem, MessageFacts)>) {
        if ready.is_empty() {
            return;
        }
        // Parses finish in any order; mailboxes get messages in the order they came.
        ready.sort_by_key(|(item, _)| item.id);
        // One snapshot for every message of the batch (DESIGN.md rule 1).
        let snapshot = self.directory.snapshot();
        self.activity.set(format!(
            "delivering {} message(s), first {}",
            ready.len(),
            ready[0].0.queue_id
        ));
        let planned: Vec<(ClaimedItem, DeliveryPlan)> = ready
            .into_iter()
            .map(|(item, facts)| {
                let plan = delivery_plan(facts, &item.recipients, &snapshot, &item.queue_id);
                (item, plan)
            })
            .collect();
        let batch: Vec<(&ClaimedItem, &DeliveryPlan)> =
            planned.iter().map(|(item, plan)| (item, plan)).collect();
        let outcome = self.persist(&format!("delivering {} message(s)", batch.len()), || {
            self.store.deliver_inbound(&batch, now_ms())
        });
        let Some(outcome) = outcome else {
            // Shutting down while the storage fault lasted: the claims are released at
            // the next start and the messages converted again.
            return;
        };
        match outcome {
            Ok(results) => {
                for ((item, plan), delivered) in planned.iter().zip(results) {
                    self.delivered(item, plan, delivered.len(), snapshot.generation());
                }
                let mut added: std::collections::HashMap<_, u64> = Default::default();
                for (item, plan) in &planned {
                    for &recipient in &plan.local {
                        *added.entry(recipient).or_default() += item.body.len() as u64;
                    }
                }
                crate::quota::warn_crossings(self.store.as_ref(), &snapshot, &added, now_ms());
            }
            // A batch fails whole; try each alone so one bad entry cannot hold up the rest.
            Err(_) if planned.len() > 1 => {
                for (item, plan) in &planned {
                    let Some(outcome) = self.persist("delivering a message", || {
                        self.store.deliver_inbound(&[(item, plan)], now_ms())
                    }) else {
                        return;
                    };
                    match outcome {
                        Ok(results) => {
                            let count = results.first().map_or(0, Vec::len);
                            self.delivered(item, plan, count, snapshot.generation());
                        }
                        Err(e) => self.fail(item, &format!("delivery to the store failed: {e}")),
                    }
                }
            }
            Err(e) => {
                for (item, _) in &planned {
                    self.fail(item, &format!("delivery to the store failed: {e}"));
                }
            }
        }
    }

    fn delivered(&self, item: &ClaimedItem, plan: &DeliveryPlan, copies: usize, generation: u64) {
        self.probe.progressed(1);
        self.stats.converted.inc();
        self.stats.delivered.inc_by(copies as u64);
        let remote: usize = plan.remote.iter().map(|r| r.recipients.len()).sum();
        self.stats.routed_remote.inc_by(remote as u64);
        tracing::debug!(
            queue_id = %item.queue_id,
            local = copies,
            remote,
            undeliverable = plan.undeliverable.len(),
            generation,
            "delivered"
        );
    }

    fn fail(&self, item: &ClaimedItem, reason: &str) {
        self.stats.failures.inc();
        if item.attempts >= self.config.attempts_max {
            let reason = format!(
                "{reason} (attempt {} of {})",
                item.attempts, self.config.attempts_max
            );
            return self.quarantine(item, &reason);
        }
        let backoff = self.config.retry_delay * 2u32.saturating_pow(item.attempts - 1).min(64);
        let retry_at = now_ms() + backoff.as_millis() as i64;
        self.probe.progressed(1);
        tracing::warn!(queue_id = %item.queue_id, attempt = item.attempts, %reason, "conversion deferred");
        if let Some(Err(e)) = self.persist("deferring a message", || {
            self.store.defer_inbound(item.id, reason, retry_at)
        }) {
            tracing::error!(queue_id = %item.queue_id, error = %e, "cannot defer; the claim is released at restart");
        }
    }

    fn quarantine(&self, item: &ClaimedItem, reason: &str) {
        self.probe.progressed(1);
        self.stats.quarantined.inc();
        tracing::error!(queue_id = %item.queue_id, %reason, "message quarantined");
        if let Some(Err(e)) = self.persist("quarantining a message", || {
            self.store.quarantine_inbound(item.id, reason)
        }) {
            tracing::error!(queue_id = %item.queue_id, error = %e, "cannot quarantine; the claim is released at restart");
        }
    }

    /// Runs a store write until it succeeds or fails for a reason other than a storage
    /// fault. A full disk or an I/O error is the environment's fault, not the message's:
    /// the write is retried (pausing 0.1 s, doubling to 5 s) instead of counting an
    /// attempt, so a full disk delays conversion but never quarantines a message, and
    /// delivery resumes by itself once space returns. `None` when shutdown came first
    /// (the claims stay; the next start releases them).
    fn persist<T>(
        &self,
        what: &str,
        write: impl Fn() -> mailroom_store::Result<T>,
    ) -> Option<mailroom_store::Result<T>> {
        let mut pause = Duration::from_millis(100);
        let mut logged = false;
        loop {
            match write() {
                Err(e) if e.fault().is_some() => {
                    self.stats.storage_waits.inc();
                    if !logged {
                        tracing::warn!(error = %e, "{what} waits for the storage fault to end; retrying");
                        logged = true;
                    }
                    self.activity
                        .set(format!("{what}: waiting for storage ({e}); retrying"));
                    let until = Instant::now() + pause;
                    while Instant::now() < until {
                        if self.cancel.is_cancelled() {
                            return None;
                        }
                        std::thread::sleep(Duration::from_millis(50).min(pause));
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                other => {
                    if logged {
                        tracing::info!("{what}: storage answers again");
                    }
                    return Some(other);
                }
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pool: &ParsePool, bodies: &[&[u8]]) -> Vec<ParseOutcome> {
        let (done, results) = bounded(bodies.len());
        for (i, body) in bodies.iter().enumerate() {
            let _ = pool
                .jobs
                .as_ref()
                .unwrap()
                .send((i, Arc::from(*body), done.clone()));
        }
        (0..bodies.len())
            .map(|_| results.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect()
    }

    #[test]
    fn helpers_are_reused_and_a_stuck_one_is_replaced() {
        let (release, stuck) = bounded::<()>(0);
        let hook: ConversionHook = Arc::new(move |body: &[u8]| {
            if body.starts_with(b"X-Stuck") {
                let _ = stuck.recv();
            }
        });
        let mut pool = ParsePool::new("t".into(), 4, Some(hook));
        pool.ensure_free(3).unwrap();
        assert_eq!(pool.helpers.len(), 3);
        let outcomes = run(&pool, &[b"Subject: a\r\n\r\nx", b"Subject: b\r\n\r\ny"]);
        assert!(outcomes.iter().all(|(_, o)| o.is_ok()));
        pool.ensure_free(3).unwrap();
        assert_eq!(pool.helpers.len(), 3, "no new thread for the next batch");

        // One helper sticks in a parse; the next batch of three gets a fourth helper.
        let (done, _results) = bounded(1);
        let _ =
            pool.jobs
                .as_ref()
                .unwrap()
                .send((0, Arc::from(&b"X-Stuck: yes\r\n\r\n"[..]), done));
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.busy.load(Ordering::Acquire) == 0 && Instant::now() < deadline {
            std::thread::yield_now();
        }
        pool.ensure_free(3).unwrap();
        assert_eq!(pool.helpers.len(), 4);
        let outcomes = run(&pool, &[b"A: 1\r\n\r\n", b"A: 2\r\n\r\n", b"A: 3\r\n\r\n"]);
        assert_eq!(outcomes.len(), 3);
        // Released, the stuck helper is free again: nothing new is started.
        release.send(()).unwrap();
        while pool.busy.load(Ordering::Acquire) != 0 && Instant::now() < deadline {
            std::thread::yield_now();
        }
        pool.ensure_free(4).unwrap();
        assert_eq!(pool.helpers.len(), 4);
        pool.stop();
        assert!(pool.helpers.is_empty());
    }
}
