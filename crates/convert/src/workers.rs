//! The inbound conversion workers.
//!
//! Each worker is an OS thread that claims a batch of due inbound entries (one
//! transaction), has a helper thread of its own pool parse them one after another, each
//! with its own time budget, and delivers the parsed ones together (one transaction). A
//! message that panics the parser, or takes longer than its budget, is deferred (and
//! after `attempts_max` tries, quarantined with the reason) while the others are
//! delivered: messages parsed before a slow one wait for it [`FLUSH_PATIENCE`] at most,
//! and the ones after it go to another helper once its budget is spent. A helper that
//! overruns its budget is given up on, not killed (Rust cannot kill a thread): the pool
//! starts another in its place, and the lost one rejoins the pool if its parse ever
//! ends (it parses nothing more of the batch it was given up on). It writes nothing,
//! and the attempt limit bounds how many one poison message can hold
//! (`mailroom_conversion_abandoned` counts them).
//!
//! The helpers are kept between batches: starting a thread per message was a fifth of
//! conversion's time (docs/benchmarks.md, profile). One helper takes a whole batch, not
//! one helper per message in parallel: every parse then cost a wake-up and two thread
//! switches, more than the parse of a small message, and the parallelism bought nothing
//! on a machine whose cores the sessions and the spool already keep busy. During the
//! directory churn replay the parse helpers used 4 times the CPU per message they used
//! without churn (docs/benchmarks.md, seventh session of issue 16).
//!
//! The attempt is counted when the entry is claimed, so a message that crashes the whole
//! process is also quarantined after `attempts_max` restarts.

use crate::{delivery_plan, message_facts};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use mailroom_directory::Directory;
use mailroom_queue::{Doorbell, Handoff};
use mailroom_store::{ClaimedItem, DeliveryPlan, MailStore, MessageFacts};
use mailroom_watch::now_ms;
use mailroom_watch::{Activity, Probe};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    /// Messages claimed, parsed (in order, on a helper) and delivered in one transaction,
    /// at most.
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
    /// Entries the spool writer committed already claimed and passed on (see
    /// `mailroom_queue::Handoff`); `None`: every entry is claimed from the store.
    handoff: Option<Handoff>,
}

/// How long a worker that was woken lets a peer that is converting finish first. The
/// deliveries of all workers take one write turn in turn, and the parses run on helper
/// threads whichever worker claims, so two workers splitting a trickle into small
/// batches only added transactions, fsyncs and wake-ups (and took the CPU that
/// accepting mail needed: measured in docs/benchmarks.md). One worker at a time
/// claims what came meanwhile as one batch; a peer stuck on a slow message is not
/// waited for longer than this.
const PEER_PATIENCE: Duration = Duration::from_millis(50);

/// A batch's parses, for one helper to do in order.
struct ParseJob {
    /// Each message's index in the batch, and its bytes.
    messages: Vec<(usize, Arc<[u8]>)>,
    /// Where each outcome goes, as soon as it is known.
    done: Sender<ParseOutcome>,
    /// Set by the worker when it gives up on this helper: the helper then parses nothing
    /// more of the job (another helper has the rest).
    abandoned: Arc<AtomicBool>,
}
type ParseOutcome = (usize, Result<MessageFacts, String>);

/// A worker's parse helper threads, kept between batches. Every helper waits on one job
/// channel; before a job is sent, the pool makes sure a helper is free, so the job's
/// first parse starts at once.
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
    /// A pool for batches of at most `capacity` messages. A job is sent only once a
    /// helper is free and every earlier job has been taken (a job given up on was taken
    /// by its helper), so the job channel (room for `capacity`) never makes a send wait.
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
                    while let Ok(job) = receiver.recv() {
                        busy.fetch_add(1, Ordering::AcqRel);
                        let last = job.messages.len();
                        let mut freed = false;
                        for (n, (index, body)) in job.messages.into_iter().enumerate() {
                            if job.abandoned.load(Ordering::Acquire) {
                                break;
                            }
                            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                                if let Some(hook) = &hook {
                                    hook(&body);
                                }
                                message_facts(&body)
                            }));
                            if n + 1 == last {
                                // Free again before the worker hears of the last
                                // outcome, so its next batch counts this helper free.
                                busy.fetch_sub(1, Ordering::AcqRel);
                                freed = true;
                            }
                            let outcome = outcome.map_err(|panic| panic_message(&*panic));
                            if job.done.send((index, outcome)).is_err() {
                                break;
                            }
                        }
                        if !freed {
                            busy.fetch_sub(1, Ordering::AcqRel);
                        }
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
        handoff: Option<Handoff>,
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
                handoff: handoff.clone(),
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
            // What the spool writer handed off first; then, with the room left in the
            // batch, what waits in the store (retries falling due, entries the hand-off
            // had no room for). The store is asked every time there is room, so that a
            // steady stream of hand-offs never starves those. Asking costs a read when
            // nothing is due there (`claim_inbound` takes no write turn then).
            let handed = self
                .handoff
                .as_ref()
                .map_or_else(Vec::new, |handoff| handoff.take(batch_max));
            let claimed = if handed.len() < batch_max {
                self.store.claim_inbound(now_ms(), batch_max - handed.len())
            } else {
                Ok(Vec::new())
            };
            let claimed = match claimed {
                Ok(mut items) => {
                    items.extend(handed);
                    Ok(items)
                }
                Err(e) if !handed.is_empty() => {
                    tracing::warn!(error = %e, "cannot claim from the inbound queue; converting what was handed over");
                    Ok(handed)
                }
                Err(e) => Err(e),
            };
            match claimed {
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

    /// Has a helper parse the batch's items in order, delivers the parsed ones in as few
    /// transactions as patience allows, and fails the rest.
    fn convert_batch(&self, items: Vec<ClaimedItem>) {
        let mut slots: Vec<Option<ClaimedItem>> = Vec::with_capacity(items.len());
        // Not parsed yet, in the order the helper takes them.
        let mut pending: VecDeque<(usize, Arc<[u8]>)> = VecDeque::with_capacity(items.len());
        for item in items {
            if item.attempts > self.config.attempts_max {
                let reason = format!(
                    "gave up after {} attempts (the process stopped during earlier ones)",
                    item.attempts - 1
                );
                self.quarantine(&item, &reason);
                continue;
            }
            pending.push_back((slots.len(), Arc::from(item.body.as_slice())));
            slots.push(Some(item));
        }
        let budget = self.config.time_budget;
        let mut ready: Vec<(ClaimedItem, MessageFacts)> = Vec::new();
        'helpers: while !pending.is_empty() {
            let (results, abandoned) = match self.start_parses(pending.iter().cloned().collect()) {
                Ok(started) => started,
                Err(reason) => {
                    for (index, _) in pending.drain(..) {
                        if let Some(item) = slots[index].take() {
                            self.fail(&item, &reason);
                        }
                    }
                    break;
                }
            };
            // The budget of the message the helper is parsing now runs from the moment
            // the one before it was reported (or the job was sent).
            let mut started = Instant::now();
            while !pending.is_empty() {
                let deadline = started + budget;
                let left = deadline.saturating_duration_since(Instant::now());
                let wait = if ready.is_empty() {
                    left
                } else {
                    left.min(FLUSH_PATIENCE)
                };
                match results.recv_timeout(wait) {
                    Ok((index, outcome)) => {
                        started = Instant::now();
                        pending.retain(|(i, _)| *i != index);
                        let Some(item) = slots[index].take() else {
                            continue;
                        };
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
                    Err(RecvTimeoutError::Timeout) => {
                        // Stuck in the first message not reported: give up on it and on
                        // its helper; another helper takes the rest.
                        abandoned.store(true, Ordering::Release);
                        self.stats.abandoned.inc();
                        if let Some((index, _)) = pending.pop_front()
                            && let Some(item) = slots[index].take()
                        {
                            self.fail(
                                &item,
                                &format!(
                                    "conversion exceeded its time budget of {} ms",
                                    budget.as_millis()
                                ),
                            );
                        }
                        continue 'helpers;
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        // The helper has gone without a word (it catches panics, so it
                        // should not): what it did not report fails this attempt.
                        for (index, _) in pending.drain(..) {
                            if let Some(item) = slots[index].take() {
                                self.fail(&item, "the parse helper stopped");
                            }
                        }
                    }
                }
            }
        }
        self.deliver(ready);
    }

    /// Sends `messages` to a free helper (starting one if none is): the channel its
    /// outcomes come back on, and the flag that gives up on it.
    fn start_parses(
        &self,
        messages: Vec<(usize, Arc<[u8]>)>,
    ) -> Result<(Receiver<ParseOutcome>, Arc<AtomicBool>), String> {
        let mut pool = self.pool.borrow_mut();
        pool.ensure_free(1)
            .map_err(|e| format!("cannot start a parse thread: {e}"))?;
        let (done, results) = bounded(messages.len());
        let abandoned = Arc::new(AtomicBool::new(false));
        let job = ParseJob {
            messages,
            done,
            abandoned: abandoned.clone(),
        };
        // Never waits (see `ParsePool::new`). Should that ever be wrong, the messages
        // are deferred (a failed attempt), not waited for: a worker must not block
        // behind its own helpers.
        match pool.jobs.as_ref().map(|jobs| jobs.try_send(job)) {
            Some(Ok(())) => Ok((results, abandoned)),
            _ => Err("no parse helper was free to take it".to_string()),
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
            self.store.defer_inbound(item, reason, retry_at)
        }) {
            tracing::error!(queue_id = %item.queue_id, error = %e, "cannot defer; the claim is released at restart");
        }
    }

    fn quarantine(&self, item: &ClaimedItem, reason: &str) {
        self.probe.progressed(1);
        self.stats.quarantined.inc();
        tracing::error!(queue_id = %item.queue_id, %reason, "message quarantined");
        if let Some(Err(e)) = self.persist("quarantining a message", || {
            self.store.quarantine_inbound(item, reason)
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

    fn job(bodies: &[&[u8]]) -> (ParseJob, Receiver<ParseOutcome>) {
        let (done, results) = bounded(bodies.len().max(1));
        let job = ParseJob {
            messages: bodies
                .iter()
                .enumerate()
                .map(|(i, body)| (i, Arc::from(*body)))
                .collect(),
            done,
            abandoned: Arc::new(AtomicBool::new(false)),
        };
        (job, results)
    }

    fn run(pool: &ParsePool, bodies: &[&[u8]]) -> Vec<ParseOutcome> {
        let (job, results) = job(bodies);
        let _ = pool.jobs.as_ref().unwrap().send(job);
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
        let (stuck_job, _results) = job(&[b"X-Stuck: yes\r\n\r\n"]);
        let _ = pool.jobs.as_ref().unwrap().send(stuck_job);
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

    /// One batch, four messages, the second stuck in its parse: the other three are
    /// delivered while it is still stuck (the two after it by another helper), and it
    /// is deferred with the reason, its helper counted as abandoned.
    #[test]
    fn a_message_over_its_budget_is_deferred_while_its_batch_mates_are_delivered() {
        use mailroom_directory::{RecipientFields, RecipientKind, SiteConfig};
        use mailroom_store::{QueueName, SpoolEntry, SqliteStore, Topology};
        let folder = tempfile::tempdir().unwrap();
        let store: Arc<dyn MailStore> =
            Arc::new(SqliteStore::open(&folder.path().join("store.db")).unwrap());
        let topology = Topology {
            organization: "Test".into(),
            site: "Site".into(),
            server: "convert".into(),
        };
        let (directory, _writer) = Directory::start(
            store.clone(),
            &["example.test".to_string()],
            &topology,
            SiteConfig::default(),
        )
        .unwrap();
        directory
            .apply_blocking(mailroom_directory::Change::CreateRecipient(
                RecipientFields {
                    kind: Some(RecipientKind::Mailbox),
                    alias: Some("ann".into()),
                    addresses: Some(vec!["ann@example.test".into()]),
                    ..RecipientFields::default()
                },
            ))
            .unwrap();
        let ann = directory
            .snapshot()
            .by_address("ann@example.test")
            .unwrap()
            .id;
        let (release, stuck) = bounded::<()>(0);
        let hook: ConversionHook = Arc::new(move |body: &[u8]| {
            if body.windows(7).any(|w| w == b"X-Stuck") {
                let _ = stuck.recv_timeout(Duration::from_secs(30));
            }
        });
        let entry = |n: usize, header: &str| SpoolEntry {
            queue_id: format!("Q{n}"),
            mail_from: "sender@remote.example".into(),
            recipients: vec!["ann@example.test".into()],
            body: format!("Subject: m{n}\r\n{header}\r\nbody\r\n").into_bytes(),
            received_at_ms: now_ms(),
            client: "127.0.0.1".into(),
            ..SpoolEntry::default()
        };
        // One spool commit before the workers start: the first claim takes all four.
        store
            .spool(&[
                entry(1, ""),
                entry(2, "X-Stuck: yes\r\n"),
                entry(3, ""),
                entry(4, ""),
            ])
            .unwrap();
        let cancel = CancellationToken::new();
        let stats = ConversionStats::default();
        let workers = Workers::start(
            store.clone(),
            directory.clone(),
            Doorbell::default(),
            ConversionConfig {
                workers: 1,
                time_budget: Duration::from_millis(300),
                retry_delay: Duration::from_secs(600),
                idle_poll: Duration::from_millis(50),
                ..ConversionConfig::default()
            },
            Some(hook),
            cancel.clone(),
            stats.clone(),
            mailroom_watch::Probe::new("conversion"),
            None,
        )
        .unwrap();
        let subjects = || -> Vec<String> {
            store
                .mailbox_messages(ann, "INBOX")
                .unwrap()
                .into_iter()
                .filter_map(|m| m.subject)
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while subjects().len() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            subjects(),
            ["m1", "m3", "m4"],
            "delivered while m2 is stuck"
        );
        let waiting = store
            .queue_items(Some(QueueName::Inbound), None, 10)
            .unwrap();
        assert_eq!(waiting.len(), 1, "{waiting:?}");
        assert_eq!(waiting[0].queue_id, "Q2");
        let reason = waiting[0].last_error.clone().unwrap_or_default();
        assert!(
            reason.contains("exceeded its time budget of 300 ms"),
            "{reason}"
        );
        assert_eq!(stats.abandoned.get(), 1);
        release.send(()).unwrap();
        cancel.cancel();
        workers.join();
    }
}
