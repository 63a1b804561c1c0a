//! Outbound delivery: the outbound queue's entries go to their next hop by the routing
//! table's connectors (SMTP by DNS MX, SMTP to a smart host, or back to a local
//! mailbox), with retries on the classic schedule, expiry, and delivery status
//! notifications (RFC 3464) to the sender.
//!
//! Why it routes again at every attempt: the routing table may change while mail waits
//! (a connector removed, re-costed), and an administrator expects the next attempt to
//! follow the table as it is now; the entry records the connector and generation used.
//!
//! Concurrency (DESIGN.md): a few tokio worker tasks; every store call runs on the
//! blocking pool; per-destination limits are `tokio::sync::Semaphore`s looked up under a
//! short leaf lock and awaited after it is released; idle connections wait in a pool
//! (leaf lock, never held across `.await`). A crash during delivery repeats at most the
//! attempt in flight: the entry stays claimed only in memory, and start-up releases
//! every claim (docs/outbound.md states this window).

pub mod client;
pub mod dsn;
pub mod mta_sts;
pub mod resolve;
pub mod schedule;

use crate::client::{Connection, Failure, Rcpt, Reply, Timeouts, Transaction};
use crate::resolve::{Host, NoHost, Resolver};
use crate::schedule::{Clock, Schedule};
use mailroom_directory::{Directory, Resolution, routing::ConnectorKind};
use mailroom_queue::Doorbell;
use mailroom_store::{
    Envelope, MailStore, OutboundItem, OutboundOutcome, QueueName, RecipientStatus, SpoolEntry,
};
use mailroom_watch::{Probe, RankedMutex};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Which directions mail moves (the classic "transfer mode"); switchable at runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TransferMode {
    /// Accept inbound SMTP and deliver outbound.
    #[default]
    Both,
    /// Accept inbound SMTP; hold the outbound queue.
    Inbound,
    /// Refuse inbound SMTP (421); deliver outbound.
    Outbound,
    /// Refuse inbound SMTP and hold the outbound queue.
    None,
}

impl TransferMode {
    /// Whether SMTP sessions are accepted.
    pub fn inbound(self) -> bool {
        matches!(self, TransferMode::Both | TransferMode::Inbound)
    }

    /// Whether the outbound queue is delivered.
    pub fn outbound(self) -> bool {
        matches!(self, TransferMode::Both | TransferMode::Outbound)
    }

    fn to_u8(self) -> u8 {
        match self {
            TransferMode::Both => 0,
            TransferMode::Inbound => 1,
            TransferMode::Outbound => 2,
            TransferMode::None => 3,
        }
    }

    fn from_u8(v: u8) -> TransferMode {
        match v {
            0 => TransferMode::Both,
            1 => TransferMode::Inbound,
            2 => TransferMode::Outbound,
            _ => TransferMode::None,
        }
    }
}

/// The transfer mode, shared by the SMTP listener (which refuses sessions when inbound
/// is off) and the delivery workers.
#[derive(Clone, Default)]
pub struct Transfer {
    mode: Arc<AtomicU8>,
    changed: Arc<tokio::sync::Notify>,
}

impl Transfer {
    /// A switch starting in `mode`.
    pub fn new(mode: TransferMode) -> Transfer {
        let t = Transfer::default();
        t.set(mode);
        t
    }

    /// The mode now.
    pub fn get(&self) -> TransferMode {
        TransferMode::from_u8(self.mode.load(Ordering::Acquire))
    }

    /// Switches; delivery workers wake at once.
    pub fn set(&self, mode: TransferMode) {
        self.mode.store(mode.to_u8(), Ordering::Release);
        self.changed.notify_waiters();
    }
}

/// Delivery settings (`[outbound]` in the config).
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Concurrent deliveries (worker tasks).
    pub workers: usize,
    /// Concurrent connections to one destination host.
    pub per_destination: usize,
    /// Name servers to ask (empty: the system's resolver).
    pub nameservers: Vec<SocketAddr>,
    /// Host names answered without DNS.
    pub hosts: HashMap<String, Vec<IpAddr>>,
    /// The port MX hosts are reached on (25).
    pub port: u16,
    /// The name this server gives in EHLO and DSNs.
    pub hostname: String,
    /// Retries, expiry and the delay notice.
    pub schedule: Schedule,
    /// Client timeouts.
    pub timeouts: Timeouts,
    /// More `Received:` headers than this: the message is looping; fail it (5.4.6).
    pub max_hops: usize,
    /// How long an idle connection is kept for reuse.
    pub keep_idle: Duration,
    /// Signs each message with the DKIM key of its From domain, when there is one.
    pub dkim: Option<Arc<mailroom_dkim::Signer>>,
    /// Opportunistic STARTTLS with these trusted roots (none: in the clear).
    pub tls: Option<Arc<client::ClientTls>>,
    /// Honour MTA-STS policies (RFC 8461) of destination domains (needs `tls`).
    pub mta_sts: bool,
    /// The HTTPS port policy hosts are asked on (443; tests use another).
    pub mta_sts_port: u16,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            workers: 16,
            per_destination: 5,
            nameservers: Vec::new(),
            hosts: HashMap::new(),
            port: 25,
            hostname: "localhost".into(),
            schedule: Schedule::default(),
            timeouts: Timeouts {
                connect: Duration::from_secs(30),
                command: Duration::from_secs(60),
                data: Duration::from_secs(300),
            },
            max_hops: 30,
            keep_idle: Duration::from_secs(30),
            dkim: None,
            tls: None,
            mta_sts: true,
            mta_sts_port: 443,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    connector: String,
    result: String,
}

/// Delivery counters, per connector and result.
#[derive(Clone, Default)]
struct Metrics {
    recipients: Family<ResultLabels, Counter>,
    notices: Counter,
    connections: Family<ResultLabels, Counter>,
}

struct Shared {
    store: Arc<dyn MailStore>,
    directory: Directory,
    resolver: Arc<Resolver>,
    config: OutboundConfig,
    /// MTA-STS policies of destination domains (with TLS configured).
    mta_sts: Option<mta_sts::MtaSts>,
    clock: Clock,
    transfer: Transfer,
    inbound_bell: Doorbell,
    wake: tokio::sync::Notify,
    /// Per-destination connection limits. Rank 87 (leaf): held to look one up only.
    limits: RankedMutex<HashMap<String, Arc<Semaphore>>>,
    /// Idle connections by address. Rank 88 (leaf): held to push or pop only.
    pool: RankedMutex<HashMap<SocketAddr, Vec<(Connection, Instant)>>>,
    probe: Arc<Probe>,
    metrics: Metrics,
}

/// The running delivery workers.
pub struct Outbound {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What `start` needs from the server.
pub struct Parts {
    /// The store.
    pub store: Arc<dyn MailStore>,
    /// The directory (routing table, local recipients).
    pub directory: Directory,
    /// Rings conversion when a DSN is spooled.
    pub inbound_bell: Doorbell,
    /// The transfer mode switch.
    pub transfer: Transfer,
    /// The delivery clock.
    pub clock: Clock,
    /// The outbound queue's watchdog probe: bumped at every attempt finished and every
    /// reply from a next hop.
    pub probe: Arc<Probe>,
}

impl Outbound {
    /// Starts the workers on the current tokio runtime.
    pub fn start(
        parts: Parts,
        config: OutboundConfig,
        registry: &mut Registry,
    ) -> anyhow::Result<Outbound> {
        let resolver = Arc::new(Resolver::new(
            &config.nameservers,
            config.hosts.clone(),
            config.port,
        )?);
        let mta_sts = config.tls.as_ref().filter(|_| config.mta_sts).map(|tls| {
            mta_sts::MtaSts::new(resolver.clone(), tls.roots.clone(), config.mta_sts_port)
        });
        let metrics = Metrics::default();
        registry.register(
            "mailroom_outbound_recipients",
            "Outbound recipients by connector and result (delivered, deferred, failed)",
            metrics.recipients.clone(),
        );
        registry.register(
            "mailroom_outbound_notices",
            "Delivery status notifications spooled",
            metrics.notices.clone(),
        );
        registry.register(
            "mailroom_outbound_connections",
            "Outbound SMTP connections by destination host and result (opened, reused, failed)",
            metrics.connections.clone(),
        );
        let probe = parts.probe;
        // The longest a live attempt can go without a reply from the next hop.
        let longest_wait = config
            .timeouts
            .connect
            .max(config.timeouts.command)
            .max(config.timeouts.data);
        probe.set_patience(longest_wait + Duration::from_secs(10));
        let shared = Arc::new(Shared {
            store: parts.store,
            directory: parts.directory,
            resolver,
            mta_sts,
            clock: parts.clock,
            transfer: parts.transfer,
            inbound_bell: parts.inbound_bell,
            wake: tokio::sync::Notify::new(),
            limits: RankedMutex::new(87, "outbound destination limits", HashMap::new()),
            pool: RankedMutex::new(88, "outbound connection pool", HashMap::new()),
            probe,
            metrics,
            config,
        });
        let cancel = CancellationToken::new();
        let tasks = (0..shared.config.workers.max(1))
            .map(|_| tokio::spawn(worker(shared.clone(), cancel.clone())))
            .collect();
        Ok(Outbound {
            shared,
            cancel,
            tasks,
        })
    }

    /// The delivery probe (progress = attempts finished), for the watchdog.
    pub fn probe(&self) -> Arc<Probe> {
        self.shared.probe.clone()
    }

    /// Wakes the workers (after "retry now", a release, or a clock change).
    pub fn wake(&self) {
        self.shared.wake.notify_waiters();
    }

    /// A handle for the admin API.
    pub fn handle(&self) -> OutboundHandle {
        OutboundHandle {
            shared: self.shared.clone(),
        }
    }

    /// Stops the workers: an attempt in flight is abandoned (its entry is released at
    /// the next start and tried again).
    pub async fn stop(self, deadline: Duration) {
        self.cancel.cancel();
        let all = futures_join(self.tasks);
        let _ = tokio::time::timeout(deadline, all).await;
    }
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// What the admin API uses: delete with a DSN, wake the workers.
#[derive(Clone)]
pub struct OutboundHandle {
    shared: Arc<Shared>,
}

impl OutboundHandle {
    /// Wakes the workers.
    pub fn wake(&self) {
        self.shared.wake.notify_waiters();
    }

    /// The delivery clock.
    pub fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    /// Removes a claimed entry; with `notify`, every pending recipient is failed
    /// ("5.3.0 deleted by the administrator") and the sender gets a DSN as for any
    /// failure. Returns the DSNs spooled.
    pub fn delete(&self, item: OutboundItem, notify: bool) -> anyhow::Result<usize> {
        let mut envelope = item.envelope.clone();
        let mut failed = Vec::new();
        for r in &mut envelope.recipients {
            if r.status == RecipientStatus::Pending {
                r.status = RecipientStatus::Failed;
                r.code = Some("5.3.0".into());
                r.reply = Some("5.3.0 deleted from the queue by the administrator".into());
                failed.push(r.address.clone());
            }
        }
        let notices = if notify {
            failure_notices(&self.shared, &item, &envelope, &failed)
        } else {
            Vec::new()
        };
        let spooled = self.shared.store.finish_outbound(
            item.id,
            &OutboundOutcome {
                envelope,
                next_attempt_at_ms: None,
                last_error: None,
                route: None,
                notices,
            },
        )?;
        if spooled > 0 {
            self.shared.inbound_bell.ring(1);
        }
        Ok(spooled)
    }
}

async fn worker(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let mut claimed = Vec::new();
        if shared.transfer.get().outbound() {
            let store = shared.store.clone();
            let now = shared.clock.now_ms();
            claimed = match tokio::task::spawn_blocking(move || store.claim_outbound(now, 1)).await
            {
                Ok(Ok(items)) => items,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot claim outbound entries");
                    Vec::new()
                }
                Err(_) => Vec::new(),
            };
        }
        if claimed.is_empty() {
            // Wait for a wake-up, a mode change, or the next due entry (at most a second,
            // so a moved test clock or another process's change is noticed).
            let changed = shared.transfer.changed.clone();
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = shared.wake.notified() => {}
                _ = changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            continue;
        }
        for item in claimed {
            let id = item.id;
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                outcome = attempt(&shared, item) => outcome,
            };
            // The outcome must be recorded: a remote server may already hold the message.
            // A storage fault (disk full, I/O error) is waited out, retrying, so the
            // entry is neither left claimed until a restart nor sent twice.
            let outcome = Arc::new(outcome);
            let mut pause = Duration::from_millis(100);
            let result = loop {
                let (store, outcome) = (shared.store.clone(), outcome.clone());
                let result =
                    tokio::task::spawn_blocking(move || store.finish_outbound(id, &outcome)).await;
                match result {
                    Ok(Err(e)) if e.fault().is_some() => {
                        tracing::warn!(id, error = %e, "recording a delivery outcome waits for the storage fault to end");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                    other => break other,
                }
            };
            match result {
                Ok(Ok(spooled)) => {
                    if spooled > 0 {
                        shared.metrics.notices.inc_by(spooled as u64);
                        shared.inbound_bell.ring(1);
                    }
                }
                Ok(Err(e)) => tracing::error!(id, error = %e, "cannot record a delivery outcome"),
                Err(e) => tracing::error!(id, error = %e, "delivery bookkeeping panicked"),
            }
            shared.probe.progressed(1);
        }
    }
}

/// Wall-clock time for what enters the inbound queue: conversion runs on the wall clock,
/// whatever the delivery clock says.
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn hops(body: &[u8]) -> usize {
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(body.len());
    body[..end]
        .split(|&b| b == b'\n')
        .filter(|line| line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:"))
        .count()
}

fn fail(envelope: &mut Envelope, address: &str, code: &str, reply: String, mta: Option<&str>) {
    if let Some(r) = envelope
        .recipients
        .iter_mut()
        .find(|r| r.address == address && r.status == RecipientStatus::Pending)
    {
        r.status = RecipientStatus::Failed;
        r.code = Some(code.to_string());
        r.reply = Some(reply);
        r.remote_mta = mta.map(str::to_string);
    }
}

fn defer(envelope: &mut Envelope, address: &str, code: &str, reply: String, mta: Option<&str>) {
    if let Some(r) = envelope
        .recipients
        .iter_mut()
        .find(|r| r.address == address && r.status == RecipientStatus::Pending)
    {
        r.code = Some(code.to_string());
        r.reply = Some(reply);
        r.remote_mta = mta.map(str::to_string);
    }
}

/// What one attempt noted besides the recipient states.
#[derive(Default)]
struct AttemptLog {
    /// A one-line summary of the last failure, for the queue viewer.
    summary: Option<String>,
    /// Delivered to a next hop that does not offer DSN, with NOTIFY=SUCCESS asked.
    relayed: Vec<String>,
}

/// Where a group of recipients goes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Destination {
    Mx(String),
    SmartHost(String),
    Local,
}

/// One attempt at an entry: route, deliver, decide.
async fn attempt(shared: &Shared, item: OutboundItem) -> OutboundOutcome {
    let now = shared.clock.now_ms();
    // One directory snapshot for the whole attempt: routing and the connector's retry
    // schedule come from the same table.
    let snapshot = shared.directory.snapshot();
    let mut envelope = item.envelope.clone();
    // An undeliverable entry is born with its recipients failed (conversion knew why),
    // so they count as failed by this attempt: that is what sends their DSN. Counting
    // only pending ones here once made such mail vanish with neither delivery nor DSN.
    let before: Vec<String> = if item.queue == QueueName::Undeliverable {
        envelope
            .recipients
            .iter()
            .filter(|r| r.status != RecipientStatus::Delivered)
            .map(|r| r.address.clone())
            .collect()
    } else {
        envelope.pending().map(|r| r.address.clone()).collect()
    };
    let mut route = None;
    let mut respool = Vec::new();
    let mut log = AttemptLog::default();
    if item.queue == QueueName::Undeliverable {
        // Conversion found these unresolvable; each carries its reason already.
        for r in &mut envelope.recipients {
            if r.status == RecipientStatus::Pending {
                r.status = RecipientStatus::Failed;
                r.code.get_or_insert_with(|| "5.1.1".into());
            }
        }
    } else if hops(&item.body) > shared.config.max_hops {
        for address in &before {
            fail(
                &mut envelope,
                address,
                "5.4.6",
                format!(
                    "5.4.6 too many hops: {} Received headers (the limit is {}); the message is looping",
                    hops(&item.body),
                    shared.config.max_hops
                ),
                None,
            );
        }
    } else if now >= shared.config.schedule.expires_at_ms(item.received_at_ms) {
        for r in &mut envelope.recipients {
            if r.status == RecipientStatus::Pending {
                r.status = RecipientStatus::Failed;
                let last = r
                    .reply
                    .clone()
                    .unwrap_or_else(|| "no attempt succeeded".into());
                r.code = Some("4.4.7".into());
                r.reply = Some(format!(
                    "4.4.7 delivery time expired after {} days; last error: {last}",
                    shared.config.schedule.expire_after.as_secs() / 86_400
                ));
            }
        }
    } else {
        let balance = item.id as u64;
        let mut groups: BTreeMap<Destination, Vec<String>> = BTreeMap::new();
        for address in &before {
            let Some(chosen) = snapshot.routing().route("SMTP", address, balance) else {
                fail(
                    &mut envelope,
                    address,
                    "5.4.4",
                    "5.4.4 no route: no connector's address space matches this address".into(),
                    None,
                );
                continue;
            };
            let Some(connector) = snapshot.site().connectors.get(&chosen.connector) else {
                continue;
            };
            route = Some((chosen.connector.clone(), snapshot.generation()));
            let destination = match &connector.kind {
                ConnectorKind::Mx => Destination::Mx(
                    address
                        .rsplit_once('@')
                        .map_or(String::new(), |(_, d)| d.to_ascii_lowercase()),
                ),
                ConnectorKind::SmartHost { host } => Destination::SmartHost(host.clone()),
                ConnectorKind::Local => Destination::Local,
            };
            groups.entry(destination).or_default().push(address.clone());
        }
        for (destination, addresses) in groups {
            let connector = route.as_ref().map_or("", |r| r.0.as_str()).to_string();
            let hosts = match &destination {
                Destination::Mx(domain) => shared.resolver.mail_hosts(domain).await,
                Destination::SmartHost(spec) => shared.resolver.smart_host(spec).await,
                Destination::Local => {
                    for address in &addresses {
                        if matches!(snapshot.resolve(address), Resolution::Local(_)) {
                            respool.push(address.clone());
                            if let Some(r) = envelope
                                .recipients
                                .iter_mut()
                                .find(|r| &r.address == address)
                            {
                                r.status = RecipientStatus::Delivered;
                                r.reply = Some("handed to local delivery".into());
                            }
                        } else {
                            fail(
                                &mut envelope,
                                address,
                                "5.1.1",
                                "5.1.1 routed to the local connector, but no local recipient has this address".into(),
                                None,
                            );
                        }
                    }
                    continue;
                }
            };
            // MTA-STS (RFC 8461) for MX delivery: what the domain publishes.
            let policy = match (&destination, &shared.mta_sts) {
                (Destination::Mx(domain), Some(sts)) => sts
                    .policy(domain)
                    .await
                    .filter(|p| p.mode != mta_sts::Mode::None)
                    .map(|p| (domain.clone(), p)),
                _ => None,
            };
            deliver_group(
                shared,
                &item,
                &mut envelope,
                &addresses,
                hosts,
                &connector,
                policy.as_ref().map(|(d, p)| (d.as_str(), &**p)),
                &mut log,
            )
            .await;
        }
    }

    // Count results and build the notices.
    let connector = route
        .as_ref()
        .map(|r| r.0.clone())
        .or(item.connector.clone())
        .unwrap_or_default();
    let mut newly_failed = Vec::new();
    for address in &before {
        if let Some(r) = envelope.recipient(address) {
            let result = match r.status {
                RecipientStatus::Delivered => "delivered",
                RecipientStatus::Failed => {
                    newly_failed.push(address.clone());
                    "failed"
                }
                RecipientStatus::Pending => "deferred",
            };
            shared
                .metrics
                .recipients
                .get_or_create(&ResultLabels {
                    connector: connector.clone(),
                    result: result.into(),
                })
                .inc();
        }
    }
    let mut notices = failure_notices(shared, &item, &envelope, &newly_failed);
    if !log.relayed.is_empty() && !item.mail_from.is_empty() {
        let relayed: Vec<_> = envelope
            .recipients
            .iter()
            .filter(|r| log.relayed.contains(&r.address))
            .collect();
        notices.push(notice_entry(
            shared,
            &item,
            &envelope,
            relayed,
            dsn::Action::Relayed,
            None,
        ));
    }
    if !respool.is_empty() {
        notices.push(SpoolEntry {
            queue_id: format!("{}L", item.queue_id),
            mail_from: item.mail_from.clone(),
            recipients: respool.clone(),
            body: item.body.clone(),
            received_at_ms: wall_ms(),
            client: "outbound (local connector)".into(),
            envelope: envelope.derive(&respool, |_| None),
        });
    }
    let pending = envelope.pending().count();
    // The connector's own retry schedule, when it has one.
    let connector_retry = route.as_ref().and_then(|(name, _)| {
        snapshot
            .site()
            .connectors
            .get(name)
            .and_then(|c| c.retry_minutes.clone())
            .filter(|m| !m.is_empty())
    });
    let next_attempt_at_ms = (pending > 0).then(|| {
        let wait = match connector_retry {
            Some(minutes) => Schedule {
                intervals: minutes
                    .iter()
                    .map(|m| Duration::from_secs(m * 60))
                    .collect(),
                ..shared.config.schedule.clone()
            }
            .wait_after(item.attempts),
            None => shared.config.schedule.wait_after(item.attempts),
        };
        let expires = shared.config.schedule.expires_at_ms(item.received_at_ms);
        (now + wait.as_millis() as i64).min(expires.max(now + 1))
    });
    // One "delayed" notice once the message has waited long enough.
    if pending > 0
        && !envelope.delay_notified
        && now - item.received_at_ms >= shared.config.schedule.delay_notice_after.as_millis() as i64
        && !item.mail_from.is_empty()
    {
        let delayed: Vec<_> = envelope
            .pending()
            .filter(|r| dsn::wanted(r, dsn::Action::Delayed))
            .collect();
        if !delayed.is_empty() {
            notices.push(notice_entry(
                shared,
                &item,
                &envelope,
                delayed,
                dsn::Action::Delayed,
                Some(shared.config.schedule.expires_at_ms(item.received_at_ms)),
            ));
        }
        envelope.delay_notified = true;
    }
    for r in envelope
        .recipients
        .iter()
        .filter(|r| before.contains(&r.address))
    {
        tracing::info!(
            queue_id = %item.queue_id,
            recipient = %r.address,
            status = ?r.status,
            reply = r.reply.as_deref().unwrap_or(""),
            "outbound attempt"
        );
    }
    OutboundOutcome {
        envelope,
        next_attempt_at_ms,
        last_error: log.summary,
        route,
        notices,
    }
}

/// The failure DSN for `failed` recipients that asked for one (none to the null sender).
fn failure_notices(
    shared: &Shared,
    item: &OutboundItem,
    envelope: &Envelope,
    failed: &[String],
) -> Vec<SpoolEntry> {
    if item.mail_from.is_empty() {
        return Vec::new();
    }
    let reported: Vec<_> = envelope
        .recipients
        .iter()
        .filter(|r| failed.contains(&r.address) && dsn::wanted(r, dsn::Action::Failed))
        .collect();
    if reported.is_empty() {
        return Vec::new();
    }
    vec![notice_entry(
        shared,
        item,
        envelope,
        reported,
        dsn::Action::Failed,
        None,
    )]
}

fn notice_entry(
    shared: &Shared,
    item: &OutboundItem,
    envelope: &Envelope,
    recipients: Vec<&mailroom_store::RecipientState>,
    action: dsn::Action,
    retry_until_ms: Option<i64>,
) -> SpoolEntry {
    let body = dsn::build(
        &dsn::Notice {
            reporting_mta: &shared.config.hostname,
            envelope,
            recipients,
            action,
            arrival_ms: item.received_at_ms,
            queue_id: &item.queue_id,
            original: &item.body,
            retry_until_ms,
        },
        &item.mail_from,
    );
    SpoolEntry {
        queue_id: format!("{}D{}", item.queue_id, item.attempts),
        mail_from: String::new(),
        recipients: vec![item.mail_from.clone()],
        body,
        received_at_ms: wall_ms(),
        client: "outbound (delivery status notification)".into(),
        envelope: Envelope::default(),
    }
}

/// Tries the hosts in order for these recipients; records each recipient's result in
/// `envelope`.
#[allow(clippy::too_many_arguments)]
async fn deliver_group(
    shared: &Shared,
    item: &OutboundItem,
    envelope: &mut Envelope,
    addresses: &[String],
    hosts: Result<Vec<Host>, NoHost>,
    connector: &str,
    sts: Option<(&str, &mta_sts::Policy)>,
    log: &mut AttemptLog,
) {
    let enforce = sts.filter(|(_, p)| p.mode == mta_sts::Mode::Enforce);
    let mut hosts = match hosts {
        Ok(hosts) => hosts,
        Err(NoHost::Permanent { code, reason }) => {
            for a in addresses {
                fail(envelope, a, code, format!("{code} {reason}"), None);
            }
            return;
        }
        Err(NoHost::Temporary(reason)) => {
            for a in addresses {
                defer(envelope, a, "4.4.3", format!("4.4.3 {reason}"), None);
            }
            log.summary = Some(reason);
            return;
        }
    };
    if let Some((domain, policy)) = sts {
        let unlisted: Vec<String> = hosts
            .iter()
            .filter(|h| !policy.allows_mx(&h.name))
            .map(|h| h.name.clone())
            .collect();
        if !unlisted.is_empty() {
            tracing::warn!(domain, mode = ?policy.mode, ?unlisted, allowed = ?policy.mx, "MTA-STS: MX hosts the policy does not list");
        }
        if enforce.is_some() {
            hosts.retain(|h| policy.allows_mx(&h.name));
            if hosts.is_empty() {
                let text = format!(
                    "4.7.5 MTA-STS policy of {domain} lists none of its MX hosts ({})",
                    unlisted.join(", ")
                );
                for a in addresses {
                    defer(envelope, a, "4.7.5", text.clone(), None);
                }
                log.summary = Some(text);
                return;
            }
        }
    }
    let rcpts: Vec<Rcpt> = addresses
        .iter()
        .map(|a| {
            let state = envelope.recipient(a);
            Rcpt {
                address: a.clone(),
                notify: state.and_then(|s| s.notify).map(|n| n.parameter()),
                orcpt: state.and_then(|s| s.orcpt.clone()),
            }
        })
        .collect();
    let ret = envelope.ret.map(|r| match r {
        mailroom_store::Ret::Full => "FULL",
        mailroom_store::Ret::Headers => "HDRS",
    });
    let env_id = envelope.env_id.clone();
    // DKIM: the signature of the From domain's active key goes in front (signed at
    // each attempt, so its timestamp is the sending time).
    let signed: Option<Vec<u8>> = shared
        .config
        .dkim
        .as_ref()
        .and_then(|signer| signer.sign(&item.body))
        .map(|mut header| {
            header.extend_from_slice(&item.body);
            header
        });
    let transaction = Transaction {
        mail_from: &item.mail_from,
        ret,
        env_id: env_id.as_deref(),
        rcpts: &rcpts,
        body: signed.as_deref().unwrap_or(&item.body),
    };
    let mut last_failure: Option<(Failure, String)> = None;
    let mut done = false;
    'hosts: for host in &hosts {
        for addr in &host.addrs {
            let limit = {
                let mut limits = shared.limits.lock();
                limits
                    .entry(host.name.clone())
                    .or_insert_with(|| {
                        Arc::new(Semaphore::new(shared.config.per_destination.max(1)))
                    })
                    .clone()
            };
            let Ok(_permit) = limit.acquire_owned().await else {
                continue;
            };
            // Under an enforced policy, only a connection verified for this very host
            // name (the pool is by address, which several names may share).
            let idle = take_idle(shared, *addr)
                .filter(|c| enforce.is_none() || (c.tls.verified() && c.remote() == host.name));
            let mut connection = match idle {
                Some(c) => {
                    count_connection(shared, &host.name, "reused");
                    c
                }
                None => match Connection::open(
                    *addr,
                    &host.name,
                    &shared.config.hostname,
                    shared.config.timeouts,
                    Some(shared.probe.clone()),
                    shared.config.tls.as_deref(),
                )
                .await
                {
                    Ok(c) => {
                        count_connection(shared, &host.name, "opened");
                        count_connection(shared, &host.name, c.tls.label());
                        tracing::info!(host = host.name, %addr, tls = %c.tls, "outbound connection");
                        if !c.tls.verified()
                            && let Some((domain, policy)) = sts
                        {
                            let why = format!(
                                "MTA-STS policy of {domain} ({:?}) needs TLS with a verified certificate; {} gave: {}",
                                policy.mode, host.name, c.tls
                            );
                            if enforce.is_some() {
                                tracing::warn!(domain, host = host.name, tls = %c.tls, "MTA-STS: not delivering without verified TLS");
                                c.quit().await;
                                last_failure = Some((Failure::Network(why), host.name.clone()));
                                continue;
                            }
                            tracing::warn!(domain, host = host.name, tls = %c.tls, "MTA-STS (testing): would not deliver without verified TLS");
                        }
                        c
                    }
                    Err(e) => {
                        shared.probe.progressed(1);
                        count_connection(shared, &host.name, "failed");
                        last_failure = Some((e, host.name.clone()));
                        continue;
                    }
                },
            };
            match connection.transaction(&transaction).await {
                Ok((replies, data)) => {
                    let passes_dsn_on = connection.offers(smtp_proto::EXT_DSN);
                    for (rcpt, reply) in rcpts.iter().zip(&replies) {
                        record(envelope, &rcpt.address, reply, data.as_ref(), &host.name);
                        if let Some(r) = envelope
                            .recipients
                            .iter_mut()
                            .find(|r| r.address == rcpt.address)
                        {
                            r.tls = Some(match sts {
                                Some((_, policy)) => format!(
                                    "{}; MTA-STS {}",
                                    connection.tls,
                                    match policy.mode {
                                        mta_sts::Mode::Enforce => "enforce",
                                        _ => "testing",
                                    }
                                ),
                                None => connection.tls.to_string(),
                            });
                        }
                        if !passes_dsn_on
                            && envelope.recipient(&rcpt.address).is_some_and(|r| {
                                r.status == RecipientStatus::Delivered
                                    && dsn::wanted(r, dsn::Action::Relayed)
                            })
                        {
                            log.relayed.push(rcpt.address.clone());
                        }
                    }
                    if connection.reset().await {
                        put_idle(shared, *addr, connection);
                    }
                    done = true;
                    break 'hosts;
                }
                Err(Failure::Refused(reply)) if reply.permanent() => {
                    // The server refused the transaction for good (MAIL or DATA): every
                    // recipient fails with its reply.
                    for a in addresses {
                        fail(
                            envelope,
                            a,
                            &reply.status_or("5.0.0", "4.0.0"),
                            reply.to_string(),
                            Some(&host.name),
                        );
                    }
                    if connection.reset().await {
                        put_idle(shared, *addr, connection);
                    }
                    done = true;
                    break 'hosts;
                }
                Err(e) => {
                    last_failure = Some((e, host.name.clone()));
                    connection.quit().await;
                    continue;
                }
            }
        }
    }
    if !done {
        // No host took the transaction: every recipient waits for the next attempt.
        let (code, text, host) = match last_failure {
            Some((Failure::Refused(reply), host)) => (
                reply.status_or("4.0.0", "4.0.0"),
                reply.to_string(),
                Some(host),
            ),
            Some((Failure::Network(e), host)) if e.starts_with("MTA-STS") => {
                ("4.7.5".to_string(), format!("4.7.5 {e}"), Some(host))
            }
            Some((Failure::Network(e), host)) => {
                ("4.4.1".to_string(), format!("4.4.1 {e}"), Some(host))
            }
            None => (
                "4.4.1".to_string(),
                format!("4.4.1 no address to connect to for {connector}"),
                None,
            ),
        };
        for a in addresses {
            defer(envelope, a, &code, text.clone(), host.as_deref());
        }
        log.summary = Some(text);
    }
}

/// Records one recipient's outcome from its RCPT reply and the data reply.
fn record(envelope: &mut Envelope, address: &str, rcpt: &Reply, data: Option<&Reply>, host: &str) {
    if !rcpt.positive() {
        let code = rcpt.status_or("5.0.0", "4.0.0");
        if rcpt.permanent() {
            fail(envelope, address, &code, rcpt.to_string(), Some(host));
        } else {
            defer(envelope, address, &code, rcpt.to_string(), Some(host));
        }
        return;
    }
    let Some(data) = data else {
        return;
    };
    if data.positive() {
        if let Some(r) = envelope
            .recipients
            .iter_mut()
            .find(|r| r.address == address && r.status == RecipientStatus::Pending)
        {
            r.status = RecipientStatus::Delivered;
            r.code = Some(data.status_or("2.0.0", "2.0.0"));
            r.reply = Some(data.to_string());
            r.remote_mta = Some(host.to_string());
        }
    } else if data.permanent() {
        fail(
            envelope,
            address,
            &data.status_or("5.0.0", "4.0.0"),
            data.to_string(),
            Some(host),
        );
    } else {
        defer(
            envelope,
            address,
            &data.status_or("5.0.0", "4.0.0"),
            data.to_string(),
            Some(host),
        );
    }
}

fn count_connection(shared: &Shared, host: &str, result: &str) {
    shared
        .metrics
        .connections
        .get_or_create(&ResultLabels {
            connector: host.to_string(),
            result: result.into(),
        })
        .inc();
}

fn take_idle(shared: &Shared, addr: SocketAddr) -> Option<Connection> {
    let mut pool = shared.pool.lock();
    let idle = pool.get_mut(&addr)?;
    while let Some((connection, since)) = idle.pop() {
        if since.elapsed() < shared.config.keep_idle {
            return Some(connection);
        }
    }
    None
}

fn put_idle(shared: &Shared, addr: SocketAddr, connection: Connection) {
    let mut pool = shared.pool.lock();
    let idle = pool.entry(addr).or_default();
    idle.retain(|(_, since)| since.elapsed() < shared.config.keep_idle);
    if idle.len() < shared.config.per_destination {
        idle.push((connection, Instant::now()));
    }
}
