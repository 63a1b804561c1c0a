//! The inbound conversion workers.
//!
//! Each worker is an OS thread that claims one inbound entry at a time. The parse runs
//! on a helper thread with a time budget: a message that panics the parser, or takes
//! longer than its budget, is deferred (and after `attempts_max` tries, quarantined with
//! the reason) while the worker moves on to the next message. A helper that overruns its
//! budget is abandoned, not killed (Rust cannot kill a thread); it writes nothing, and the
//! attempt limit bounds how many one poison message can leave behind
//! (`mailroom_conversion_abandoned` counts them).
//!
//! The attempt is counted when the entry is claimed, so a message that crashes the whole
//! process is also quarantined after `attempts_max` restarts.

use crate::{delivery_plan, message_facts};
use crossbeam_channel::{RecvTimeoutError, bounded};
use mailroom_directory::Directory;
use mailroom_queue::Doorbell;
use mailroom_store::{ClaimedItem, MailStore, MessageFacts};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
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
}

impl Default for ConversionConfig {
    fn default() -> Self {
        ConversionConfig {
            workers: 2,
            time_budget: Duration::from_secs(30),
            attempts_max: 5,
            retry_delay: Duration::from_secs(10),
            idle_poll: Duration::from_millis(500),
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
        ];
        for (name, help, counter) in pairs {
            registry.register(name, help, counter.clone());
        }
    }
}

/// The running workers.
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
}

struct Worker {
    store: Arc<dyn MailStore>,
    directory: Directory,
    doorbell: Doorbell,
    config: ConversionConfig,
    hook: Option<ConversionHook>,
    cancel: CancellationToken,
    stats: ConversionStats,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Workers {
    /// Starts `config.workers` threads. They stop, after the message in hand, once
    /// `cancel` fires.
    pub fn start(
        store: Arc<dyn MailStore>,
        directory: Directory,
        doorbell: Doorbell,
        config: ConversionConfig,
        hook: Option<ConversionHook>,
        cancel: CancellationToken,
        stats: ConversionStats,
    ) -> std::io::Result<Workers> {
        let mut threads = Vec::new();
        for index in 0..config.workers.max(1) {
            let worker = Worker {
                store: store.clone(),
                directory: directory.clone(),
                doorbell: doorbell.clone(),
                config: config.clone(),
                hook: hook.clone(),
                cancel: cancel.clone(),
                stats: stats.clone(),
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("conversion-{index}"))
                    .spawn(move || worker.run())?,
            );
        }
        Ok(Workers { threads })
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

enum Failure {
    Panicked(String),
    OverBudget,
}

impl Worker {
    fn run(self) {
        while !self.cancel.is_cancelled() {
            match self.store.claim_inbound(now_ms()) {
                Ok(Some(item)) => self.convert(item),
                Ok(None) => self.doorbell.wait(self.config.idle_poll),
                Err(e) => {
                    tracing::error!(error = %e, "cannot claim from the inbound queue");
                    self.doorbell.wait(self.config.idle_poll);
                }
            }
        }
    }

    fn convert(&self, item: ClaimedItem) {
        if item.attempts > self.config.attempts_max {
            let reason = format!(
                "gave up after {} attempts (the process stopped during earlier ones)",
                item.attempts - 1
            );
            return self.quarantine(&item, &reason);
        }
        match self.parse_within_budget(&item) {
            Ok(facts) => self.deliver(item, facts),
            Err(Failure::Panicked(message)) => {
                self.fail(&item, &format!("conversion panicked: {message}"))
            }
            Err(Failure::OverBudget) => {
                self.stats.abandoned.inc();
                let budget = self.config.time_budget.as_millis();
                self.fail(
                    &item,
                    &format!("conversion exceeded its time budget of {budget} ms"),
                )
            }
        }
    }

    fn parse_within_budget(&self, item: &ClaimedItem) -> Result<MessageFacts, Failure> {
        let body: Arc<[u8]> = Arc::from(item.body.as_slice());
        let hook = self.hook.clone();
        let (done, result) = bounded(1);
        let spawned = std::thread::Builder::new()
            .name(format!("parse-{}", item.queue_id))
            .spawn(move || {
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    if let Some(hook) = &hook {
                        hook(&body);
                    }
                    message_facts(&body)
                }));
                let _ = done.send(outcome.map_err(|panic| panic_message(&*panic)));
            });
        if let Err(e) = spawned {
            return Err(Failure::Panicked(format!(
                "cannot start a parse thread: {e}"
            )));
        }
        match result.recv_timeout(self.config.time_budget) {
            Ok(Ok(facts)) => Ok(facts),
            Ok(Err(message)) => Err(Failure::Panicked(message)),
            Err(RecvTimeoutError::Timeout) => Err(Failure::OverBudget),
            Err(RecvTimeoutError::Disconnected) => {
                Err(Failure::Panicked("the parse thread vanished".into()))
            }
        }
    }

    fn deliver(&self, item: ClaimedItem, facts: MessageFacts) {
        // One snapshot for the whole message (DESIGN.md rule 1).
        let snapshot = self.directory.snapshot();
        let plan = delivery_plan(facts, &item.recipients, &snapshot);
        match self.store.deliver_inbound(&item, &plan, now_ms()) {
            Ok(delivered) => {
                self.stats.converted.inc();
                self.stats.delivered.inc_by(delivered.len() as u64);
                self.stats.routed_remote.inc_by(plan.remote.len() as u64);
                tracing::debug!(
                    queue_id = %item.queue_id,
                    local = delivered.len(),
                    remote = plan.remote.len(),
                    undeliverable = plan.undeliverable.len(),
                    generation = snapshot.generation(),
                    "delivered"
                );
            }
            Err(e) => self.fail(&item, &format!("delivery to the store failed: {e}")),
        }
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
        tracing::warn!(queue_id = %item.queue_id, attempt = item.attempts, %reason, "conversion deferred");
        if let Err(e) = self.store.defer_inbound(item.id, reason, retry_at) {
            tracing::error!(queue_id = %item.queue_id, error = %e, "cannot defer; the claim is released at restart");
        }
    }

    fn quarantine(&self, item: &ClaimedItem, reason: &str) {
        self.stats.quarantined.inc();
        tracing::error!(queue_id = %item.queue_id, %reason, "message quarantined");
        if let Err(e) = self.store.quarantine_inbound(item.id, reason) {
            tracing::error!(queue_id = %item.queue_id, error = %e, "cannot quarantine; the claim is released at restart");
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
