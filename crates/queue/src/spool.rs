//! The spool writer: group commit of accepted messages.
//!
//! One thread commits whatever sessions have submitted since its last commit as one
//! transaction (one fsync). Under load the fsync itself gathers the next batch; a short
//! commit delay (PostgreSQL's `commit_delay`/`commit_siblings`) gathers more when other
//! sessions have a message under way, and never applies to a lone sender, whose latency
//! it would only add to.

use crate::{Doorbell, Handoff};
use mailroom_store::{ClaimedItem, Disk, Fault, MailStore, SpoolEntry};
use mailroom_watch::{Activity, Probe, now_ms};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Spool settings (the `[spool]` section of the config).
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Commit whatever is pending as one transaction (true), or one message per
    /// transaction (false, for measurement only).
    pub group_commit: bool,
    /// Messages in one commit, at most.
    pub batch_messages_max: usize,
    /// Message bytes in one commit, at most (a batch always takes at least one message).
    pub batch_bytes_max: usize,
    /// Requests waiting for the writer before sessions wait to submit.
    pub pending_max: usize,
    /// The data folder's disk: a batch is refused (not written) while it is below the
    /// reserve, so the database does not meet a full disk mid-transaction.
    pub disk: Option<Arc<Disk>>,
    /// How long the writer waits, once the first message of a batch has arrived, for
    /// others to join it, when at least [`SpoolConfig::commit_siblings`] other sessions
    /// have a message under way. Zero: never. Each commit costs the same CPU whatever its
    /// size (index pages, the WAL's commit frame, the fsync), so a fuller commit is
    /// cheaper per message (docs/benchmarks.md, issue 16's ninth session, has what it
    /// buys: about 5 % less CPU per message at 20 sessions).
    pub commit_delay: Duration,
    /// Other messages under way (a session between MAIL FROM and its end of data) needed
    /// before the writer waits [`SpoolConfig::commit_delay`]: with fewer, nobody would
    /// join the batch in time and the wait would only delay the sender.
    pub commit_siblings: usize,
    /// Where committed messages go straight to inbound conversion (see [`Handoff`]);
    /// `None`: conversion claims every entry from the database.
    pub handoff: Option<Handoff>,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            group_commit: true,
            batch_messages_max: 256,
            batch_bytes_max: 32 << 20,
            pending_max: 1024,
            disk: None,
            commit_delay: Duration::from_micros(100),
            commit_siblings: 2,
            handoff: None,
        }
    }
}

/// Why a message was not spooled; the session answers 451 and the client tries again.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    /// The store could not commit.
    #[error("the spool could not be written: {0}")]
    Store(String),
    /// The disk is full or below the free-space reserve: nothing was written; the
    /// session answers 452 4.3.1 (RFC 3463: mail system full) and the client retries.
    #[error("{0}")]
    NoSpace(String),
    /// The spool writer has stopped (shutdown).
    #[error("the spool writer has stopped")]
    Stopped,
}

/// Counters an administrator reads to see group commit at work.
#[derive(Clone)]
pub struct SpoolStats {
    /// Messages made durable.
    pub messages: Counter,
    /// Commits (fsyncs); messages / batches is the sharing factor.
    pub batches: Counter,
    /// Commits that failed.
    pub failures: Counter,
    /// Time of each commit, seconds.
    pub commit_seconds: Histogram,
    /// Commits that waited the commit delay for other messages to join them.
    pub delayed: Counter,
    /// Messages under way in sessions now (see [`Spool::message_under_way`]).
    pub under_way: Gauge,
}

impl Default for SpoolStats {
    fn default() -> Self {
        SpoolStats {
            messages: Counter::default(),
            batches: Counter::default(),
            failures: Counter::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.0002, 2.0, 16)),
            delayed: Counter::default(),
            under_way: Gauge::default(),
        }
    }
}

impl SpoolStats {
    /// Adds the counters to a Prometheus registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mailroom_spool_messages",
            "Messages made durable in the spool",
            self.messages.clone(),
        );
        registry.register(
            "mailroom_spool_commits",
            "Spool transactions (fsyncs); group commit shares one among many messages",
            self.batches.clone(),
        );
        registry.register(
            "mailroom_spool_commit_failures",
            "Spool transactions that failed (the clients were told 451)",
            self.failures.clone(),
        );
        registry.register(
            "mailroom_spool_commit_seconds",
            "Duration of each spool transaction",
            self.commit_seconds.clone(),
        );
        registry.register(
            "mailroom_spool_delayed_commits",
            "Spool transactions that waited the commit delay for other messages under way",
            self.delayed.clone(),
        );
        registry.register(
            "mailroom_spool_messages_under_way",
            "Sessions with a message under way (MAIL FROM accepted, not yet submitted or abandoned)",
            self.under_way.clone(),
        );
    }
}

struct SpoolRequest {
    entry: SpoolEntry,
    enqueued_ms: i64,
    reply: oneshot::Sender<Result<i64, SpoolError>>,
}

/// The handle sessions submit through. The writer thread ends when every handle is gone.
#[derive(Clone)]
pub struct Spool {
    requests: mpsc::Sender<SpoolRequest>,
    /// The spool queue's depth, oldest request and progress, for the watchdog.
    probe: Arc<Probe>,
    /// What the writer thread is doing.
    activity: Arc<Activity>,
    /// Messages under way in sessions (see [`Spool::message_under_way`]).
    under_way: Gauge,
}

/// A message under way in a session, counted while this lives (see
/// [`Spool::message_under_way`]).
pub struct UnderWay(Gauge);

impl Drop for UnderWay {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Spool {
    /// Starts the spool writer thread.
    pub fn start(
        store: Arc<dyn MailStore>,
        config: SpoolConfig,
        doorbell: Doorbell,
        stats: SpoolStats,
    ) -> std::io::Result<(Spool, std::thread::JoinHandle<()>)> {
        let (requests, receiver) = mpsc::channel(config.pending_max.max(1));
        let probe = Probe::new("spool");
        let activity = Activity::new("spool-writer");
        let under_way = stats.under_way.clone();
        let writer = Writer {
            store,
            config,
            doorbell,
            stats,
            receiver,
            probe: probe.clone(),
            activity: activity.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run())?;
        Ok((
            Spool {
                requests,
                probe,
                activity,
                under_way,
            },
            thread,
        ))
    }

    /// The spool queue's probe (register it with the watchdog).
    pub fn probe(&self) -> Arc<Probe> {
        self.probe.clone()
    }

    /// The writer thread's activity (register it with the watchdog).
    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }

    /// Counts a message as under way (a session has accepted MAIL FROM and not yet
    /// submitted or abandoned it) until the returned guard is dropped: the writer waits
    /// its commit delay for such messages to join a batch. A session drops it before it
    /// submits.
    pub fn message_under_way(&self) -> UnderWay {
        self.under_way.inc();
        UnderWay(self.under_way.clone())
    }

    /// Makes `entry` durable; returns its queue row once it is on disk.
    pub async fn submit(&self, entry: SpoolEntry) -> Result<i64, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.probe.enqueued(1);
        let request = SpoolRequest {
            entry,
            enqueued_ms: now_ms(),
            reply,
        };
        if self.requests.send(request).await.is_err() {
            self.probe.finished(1);
            return Err(SpoolError::Stopped);
        }
        answer.await.map_err(|_| SpoolError::Stopped)?
    }
}

struct Writer {
    store: Arc<dyn MailStore>,
    config: SpoolConfig,
    doorbell: Doorbell,
    stats: SpoolStats,
    receiver: mpsc::Receiver<SpoolRequest>,
    probe: Arc<Probe>,
    activity: Arc<Activity>,
}

impl Writer {
    fn run(mut self) {
        let _alive = self.activity.guard();
        while let Some(first) = self.receiver.blocking_recv() {
            let mut bytes = first.entry.body.len();
            let mut batch = vec![first];
            if self.config.group_commit
                && !self.config.commit_delay.is_zero()
                && self.stats.under_way.get() >= self.config.commit_siblings.max(1) as i64
            {
                // Others are about to submit: one commit for them too is cheaper than
                // one each (PostgreSQL's commit_delay). Bounded, and the batch limits
                // below still apply.
                self.stats.delayed.inc();
                std::thread::sleep(self.config.commit_delay);
            }
            while self.config.group_commit
                && batch.len() < self.config.batch_messages_max
                && bytes < self.config.batch_bytes_max
            {
                match self.receiver.try_recv() {
                    Ok(request) => {
                        bytes += request.entry.body.len();
                        batch.push(request);
                    }
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
        tracing::debug!("spool writer stopped");
    }

    fn commit(&self, batch: Vec<SpoolRequest>) {
        let count = batch.len() as u64;
        self.probe
            .working_on(batch.iter().map(|r| r.enqueued_ms).min());
        self.activity
            .set(format!("committing {count} message(s) to the spool"));
        let (entries, replies): (Vec<SpoolEntry>, Vec<_>) =
            batch.into_iter().map(|r| (r.entry, r.reply)).unzip();
        if let Some(disk) = &self.config.disk {
            // Twice the bytes: the WAL first, the database file at the checkpoint.
            let bytes: usize = entries.iter().map(|e| e.body.len()).sum();
            if let Err(refused) = disk.admit(2 * bytes as u64) {
                let why = refused.to_string();
                for reply in replies {
                    let _ = reply.send(Err(SpoolError::NoSpace(why.clone())));
                }
                self.probe.finished(count);
                self.probe.working_on(None);
                self.activity.idle();
                return;
            }
        }
        let started = Instant::now();
        // A panic in the store (a bug) fails this batch, not the writer: the transaction
        // was dropped, so nothing of it was committed, and the next batch starts clean.
        // Those that fit the hand-off are inserted claimed, for the workers to take from
        // it after the commit instead of claiming them back from the database.
        let handed = self.config.handoff.as_ref().map_or(0, |handoff| {
            handoff.room(entries.iter().map(|e| e.body.len()))
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.store.spool_claimed(&entries, handed)
        }))
        .unwrap_or_else(|panic| {
            Err(mailroom_store::StoreError::Conflict(format!(
                "the spool commit panicked: {}",
                panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default()
            )))
        });
        self.stats
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.stats.batches.inc();
        match result {
            Ok(ids) => {
                debug_assert_eq!(ids.len(), replies.len());
                self.stats.messages.inc_by(ids.len() as u64);
                for (reply, &id) in replies.into_iter().zip(&ids) {
                    let _ = reply.send(Ok(id));
                }
                if let Some(handoff) = &self.config.handoff {
                    for (entry, &id) in entries.into_iter().zip(&ids).take(handed) {
                        if let Err(queue_id) = handoff.send(claimed(entry, id)) {
                            // The workers have stopped (shutdown): the entry stays
                            // claimed until the next start releases it.
                            tracing::debug!(%queue_id, "conversion has stopped; the entry waits for the next start");
                        }
                    }
                }
                // One ring per commit: the worker it wakes takes the whole commit (up
                // to its batch size) and wakes a peer itself when there is more.
                self.doorbell.ring(1);
            }
            Err(e) => {
                self.stats.failures.inc();
                tracing::error!(error = %e, messages = count, "spool commit failed");
                let error = match e.fault() {
                    Some(Fault::DiskFull) => {
                        SpoolError::NoSpace(format!("the mail store's disk is full: {e}"))
                    }
                    _ => SpoolError::Store(e.to_string()),
                };
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
        self.probe.finished(count);
        self.probe.working_on(None);
        self.activity.idle();
    }
}

/// A committed entry as the claim of a handed-off entry reads it: first attempt.
fn claimed(entry: SpoolEntry, id: i64) -> ClaimedItem {
    ClaimedItem {
        id,
        queue_id: entry.queue_id,
        mail_from: entry.mail_from,
        recipients: entry.recipients,
        body: entry.body,
        received_at_ms: entry.received_at_ms,
        attempts: 1,
        envelope: entry.envelope,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailroom_store::SqliteStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_submissions_share_commits_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
        let stats = SpoolStats::default();
        let (spool, _t) = Spool::start(
            store.clone(),
            SpoolConfig::default(),
            Doorbell::default(),
            stats.clone(),
        )
        .unwrap();
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let spool = spool.clone();
                tokio::spawn(async move { spool.submit(entry(i)).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(stats.messages.get(), 100);
        assert!(stats.batches.get() <= 100);
        let depth = store.queue_summaries().unwrap()[0].depth;
        assert_eq!(depth, 100);
    }

    /// What fits the hand-off is committed claimed and handed over with its body and
    /// first attempt; what does not fit waits unclaimed in the store, where a claim
    /// finds it. Every message is one or the other, never both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn committed_mail_is_handed_to_conversion_or_left_for_a_claim_never_both() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
        let handoff = Handoff::new(3, 1 << 20);
        let doorbell = Doorbell::default();
        let (spool, _t) = Spool::start(
            store.clone(),
            SpoolConfig {
                handoff: Some(handoff.clone()),
                ..SpoolConfig::default()
            },
            doorbell.clone(),
            SpoolStats::default(),
        )
        .unwrap();
        let mut ids = Vec::new();
        for i in 0..5 {
            doorbell.drain();
            ids.push(spool.submit(entry(i)).await.unwrap());
            // Handed over (or not) before the next commit asks for room: the writer
            // rings once it has.
            doorbell.wait(Duration::from_secs(10));
        }
        let handed = handoff.take(10);
        assert_eq!(handed.len(), 3, "the hand-off holds three");
        for (item, i) in handed.iter().zip(0..) {
            assert_eq!(item.id, ids[i]);
            assert_eq!(item.queue_id, format!("q{i}"));
            assert_eq!(item.body, entry(i).body);
            assert_eq!(item.attempts, 1);
        }
        let claimed = store.claim_inbound(i64::MAX, 10).unwrap();
        assert_eq!(
            claimed
                .iter()
                .map(|c| c.queue_id.as_str())
                .collect::<Vec<_>>(),
            ["q3", "q4"],
            "only what was not handed over is claimable"
        );
        assert_eq!(store.queue_summaries().unwrap()[0].depth, 5);
        // The handed-over entries are claimed in the store: delivering one by its
        // hand-off works once, as for a claim.
        let plan = mailroom_store::DeliveryPlan::default();
        store.deliver_inbound(&[(&handed[0], &plan)], 2).unwrap();
        assert!(store.deliver_inbound(&[(&handed[0], &plan)], 2).is_err());
        // With room again, the next message is handed over. (The writer answers the
        // session first and hands over after: the doorbell rings once it has.)
        doorbell.drain();
        ids.push(spool.submit(entry(5)).await.unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut taken = handoff.take(10);
        while taken.is_empty() && Instant::now() < deadline {
            doorbell.wait(Duration::from_millis(100));
            taken = handoff.take(10);
        }
        assert_eq!(taken.iter().map(|i| i.id).collect::<Vec<_>>(), [ids[5]]);
    }

    fn entry(i: usize) -> SpoolEntry {
        SpoolEntry {
            queue_id: format!("q{i}"),
            mail_from: "a@b".into(),
            recipients: vec!["c@d".into()],
            body: format!("Subject: {i}\r\n\r\nbody\r\n").into_bytes(),
            received_at_ms: 1,
            ..Default::default()
        }
    }

    /// A lone sender never waits the commit delay; with enough other messages under
    /// way the writer waits, and what is submitted meanwhile shares the commit. The
    /// delay here is long (a second) so that "meanwhile" is not a race.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_commit_delay_waits_only_for_messages_under_way_and_they_share_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
        let stats = SpoolStats::default();
        let config = SpoolConfig {
            commit_delay: Duration::from_secs(1),
            commit_siblings: 2,
            ..SpoolConfig::default()
        };
        let (spool, _t) =
            Spool::start(store.clone(), config, Doorbell::default(), stats.clone()).unwrap();

        // Alone, and with one other message under way (fewer than the siblings asked
        // for): no delay.
        spool.submit(entry(0)).await.unwrap();
        let one = spool.message_under_way();
        spool.submit(entry(1)).await.unwrap();
        assert_eq!(stats.delayed.get(), 0);
        assert_eq!(stats.batches.get(), 2);
        assert_eq!(stats.under_way.get(), 1);

        // Two under way: the next commit waits for them, and they join it.
        let two = spool.message_under_way();
        let first = tokio::spawn({
            let spool = spool.clone();
            async move { spool.submit(entry(2)).await }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.delayed.get() == 0 {
            assert!(Instant::now() < deadline, "the writer never waited");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(one);
        drop(two);
        assert_eq!(stats.under_way.get(), 0);
        let (a, b) = tokio::join!(spool.submit(entry(3)), spool.submit(entry(4)));
        a.unwrap();
        b.unwrap();
        first.await.unwrap().unwrap();
        assert_eq!(stats.delayed.get(), 1);
        assert_eq!(stats.messages.get(), 5);
        assert_eq!(
            stats.batches.get(),
            3,
            "the three messages submitted during the delay share one commit"
        );
        assert_eq!(store.queue_summaries().unwrap()[0].depth, 5);
    }
}
