//! Outbound delivery: the outbound queue's entries go to their next hop by the routing
//! table's connectors (SMTP by DNS MX, SMTP to a smart host, or back to a local
//! mailbox), with retries on the classic schedule, expiry, and delivery status
//! notifications (RFC 3464) to the sender.
//!
//! Shape (as conversion's): [`plan`] decides from one entry and one directory snapshot,
//! with no I/O; the workers do the I/O (DNS, MTA-STS, SMTP with [`client`]); [`outcome`]
//! turns the recipients' states into what the store records (notices, next attempt),
//! again with no I/O. Errors of starting and of administrator actions are
//! [`OutboundError`].
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
pub mod dane;
pub mod dsn;
pub mod mta_sts;
pub mod outcome;
pub mod plan;
pub mod resolve;
pub mod schedule;

use crate::client::{Connection, Failure, Rcpt, Timeouts, Transaction};
use crate::outcome::{AttemptLog, defer, fail, record};
use crate::plan::Destination;
use crate::resolve::{Host, NoHost, Resolver};
use crate::schedule::{Clock, Schedule};
use mailroom_directory::Directory;
use mailroom_queue::Doorbell;
use mailroom_store::{
    Envelope, MailStore, OutboundItem, OutboundOutcome, RecipientStatus, TrackEvent, TrackKind,
};
use mailroom_watch::{Probe, RankedMutex};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Why outbound delivery could not start or an administrator's action failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// The DNS resolver could not be set up (a bad name server, an unreadable
    /// `/etc/resolv.conf`).
    #[error("DNS resolver: {0}")]
    Resolver(String),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] mailroom_store::StoreError),
}

// The transfer mode lives with the queues (SMTP and the admin API use it without the
// delivery workers); re-exported here for the workers' callers.
pub use mailroom_queue::{Transfer, TransferMode};

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
    /// Honour DANE TLSA records (RFC 7672) of DNSSEC-signed destinations (needs `tls`).
    pub dane: bool,
    /// DNSKEY records to trust for DNSSEC instead of the root's keys (tests).
    pub dnssec_trust_anchor: Option<std::path::PathBuf>,
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
            dane: true,
            dnssec_trust_anchor: None,
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
    /// DNSSEC-validated MX and TLSA lookups (with TLS configured).
    dane: Option<dane::Dane>,
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
    ) -> Result<Outbound, OutboundError> {
        let resolver = Arc::new(Resolver::new(
            &config.nameservers,
            config.hosts.clone(),
            config.port,
        )?);
        let mta_sts = config.tls.as_ref().filter(|_| config.mta_sts).map(|tls| {
            mta_sts::MtaSts::new(resolver.clone(), tls.roots.clone(), config.mta_sts_port)
        });
        let dane = if config.tls.is_some() && config.dane {
            Some(dane::Dane::new(
                &config.nameservers,
                config.dnssec_trust_anchor.as_deref(),
            )?)
        } else {
            None
        };
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
            dane,
            clock: parts.clock,
            transfer: parts.transfer,
            inbound_bell: parts.inbound_bell,
            wake: tokio::sync::Notify::new(),
            limits: RankedMutex::new(
                mailroom_watch::rank::OUTBOUND_LIMITS,
                "outbound destination limits",
                HashMap::new(),
            ),
            pool: RankedMutex::new(
                mailroom_watch::rank::OUTBOUND_POOL,
                "outbound connection pool",
                HashMap::new(),
            ),
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
    /// failure. The trail records that `by` deleted it. Returns the DSNs spooled.
    pub fn delete(
        &self,
        item: OutboundItem,
        notify: bool,
        by: &str,
    ) -> Result<usize, OutboundError> {
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
        let wall = wall_ms();
        let mut events = vec![
            TrackEvent::new(TrackKind::Admin, &item.queue_id, wall)
                .recipients(failed.iter().cloned())
                .with("action", if notify { "delete with DSN" } else { "delete" })
                .with("by", by)
                .with("entry", item.id)
                .with("queue", item.queue.as_str()),
        ];
        let mut dsn_events = Vec::new();
        let notices = if notify {
            outcome::failure_notices(
                &item,
                &envelope,
                &failed,
                &self.shared.config.hostname,
                wall,
                &mut dsn_events,
            )
        } else {
            Vec::new()
        };
        events.append(&mut dsn_events);
        let spooled = self.shared.store.finish_outbound(
            item.id,
            &item.queue_id,
            &OutboundOutcome {
                envelope,
                next_attempt_at_ms: None,
                last_error: None,
                route: None,
                notices,
                events,
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
            let changed = shared.transfer.changes();
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = shared.wake.notified() => {}
                _ = changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            continue;
        }
        for item in claimed {
            let (id, queue_id) = (item.id, Arc::<str>::from(item.queue_id.as_str()));
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
                let (store, outcome, queue_id) =
                    (shared.store.clone(), outcome.clone(), queue_id.clone());
                let result = tokio::task::spawn_blocking(move || {
                    store.finish_outbound(id, &queue_id, &outcome)
                })
                .await;
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
    mailroom_watch::now_ms()
}

/// One attempt at an entry: a pure plan from one directory snapshot, the I/O for each
/// destination, then a pure outcome from the recipients' states.
async fn attempt(shared: &Shared, item: OutboundItem) -> OutboundOutcome {
    let now = shared.clock.now_ms();
    // One directory snapshot for the whole attempt: routing and the connector's retry
    // schedule come from the same table.
    let snapshot = shared.directory.snapshot();
    let plan::Plan {
        before,
        mut envelope,
        groups,
        respool,
        route,
        connector_retry,
    } = plan::plan(
        &item,
        &snapshot,
        now,
        &shared.config.schedule,
        shared.config.max_hops,
    );
    let mut log = AttemptLog::default();
    let connector = route.as_ref().map_or("", |r| r.0.as_str()).to_string();
    for (destination, addresses) in groups {
        let hosts = match &destination {
            Destination::Mx(domain) => shared.resolver.mail_hosts(domain).await,
            Destination::SmartHost(spec) => shared.resolver.smart_host(spec).await,
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
        // DANE (RFC 7672): TLSA records of each MX host, when the MX records are signed.
        let mut tlsa = HashMap::new();
        if let (Destination::Mx(domain), Some(dane), Ok(hosts)) =
            (&destination, &shared.dane, &hosts)
            && dane.mx_secure(domain).await
        {
            for host in hosts {
                let policy = dane.host(&host.name).await;
                if policy != dane::HostPolicy::None {
                    tracing::debug!(domain, host = host.name, ?policy, "DANE");
                    tlsa.insert(host.name.clone(), policy);
                }
            }
        }
        deliver_group(
            shared,
            &item,
            &mut envelope,
            &addresses,
            hosts,
            &connector,
            policy.as_ref().map(|(d, p)| (d.as_str(), &**p)),
            &tlsa,
            &mut log,
        )
        .await;
    }
    let settled = outcome::settle(outcome::Attempted {
        item: &item,
        before: &before,
        envelope,
        route,
        respool,
        connector_retry,
        log,
        schedule: &shared.config.schedule,
        hostname: &shared.config.hostname,
        now_ms: now,
        wall_ms: wall_ms(),
    });
    let connector = settled
        .outcome
        .route
        .as_ref()
        .map(|r| r.0.clone())
        .or(item.connector.clone())
        .unwrap_or_default();
    for (address, result) in &settled.results {
        shared
            .metrics
            .recipients
            .get_or_create(&ResultLabels {
                connector: connector.clone(),
                result: (*result).into(),
            })
            .inc();
        let r = settled.outcome.envelope.recipient(address);
        tracing::info!(
            queue_id = %item.queue_id,
            recipient = %address,
            status = ?r.map(|r| r.status),
            reply = r.and_then(|r| r.reply.as_deref()).unwrap_or(""),
            "outbound attempt"
        );
    }
    settled.outcome
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
    tlsa: &HashMap<String, dane::HostPolicy>,
    log: &mut AttemptLog,
) {
    let hosts = match hosts {
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
    let hosts = match hosts_under_sts(hosts, sts) {
        Ok(hosts) => hosts,
        Err(text) => {
            for a in addresses {
                defer(envelope, a, "4.7.5", text.clone(), None);
            }
            log.summary = Some(text);
            return;
        }
    };
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
    let signed = signed_body(shared, item);
    let transaction = Transaction {
        mail_from: &item.mail_from,
        ret,
        env_id: env_id.as_deref(),
        rcpts: &rcpts,
        body: signed.as_deref().unwrap_or(&item.body),
    };
    let mut last_failure: Option<(Failure, String)> = None;
    for host in &hosts {
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
            let dane = tlsa.get(&host.name);
            let mut connection = match connection_for(shared, host, *addr, dane, sts).await {
                Ok(connection) => connection,
                Err(failure) => {
                    last_failure = Some((failure, host.name.clone()));
                    continue;
                }
            };
            match connection.transaction(&transaction).await {
                Ok((replies, data)) => {
                    let passes_dsn_on = connection.offers(smtp_proto::EXT_DSN);
                    let tls = tls_note(&connection, dane, sts);
                    for (rcpt, reply) in rcpts.iter().zip(&replies) {
                        record(envelope, &rcpt.address, reply, data.as_ref(), &host.name);
                        if let Some(r) = envelope
                            .recipients
                            .iter_mut()
                            .find(|r| r.address == rcpt.address)
                        {
                            r.tls = Some(tls.clone());
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
                    return;
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
                    return;
                }
                Err(e) => {
                    last_failure = Some((e, host.name.clone()));
                    connection.quit().await;
                    continue;
                }
            }
        }
    }
    // No host took the transaction: every recipient waits for the next attempt.
    let (code, text, host) = match last_failure {
        Some((Failure::Refused(reply), host)) => (
            reply.status_or("4.0.0", "4.0.0"),
            reply.to_string(),
            Some(host),
        ),
        Some((Failure::Network(e), host)) if e.starts_with("MTA-STS") || e.starts_with("DANE") => {
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

/// The hosts a delivery may use under the domain's MTA-STS policy (RFC 8461 §4.1):
/// those its policy lists when it is enforced (a warning names the others in either
/// mode), or the temporary failure's text when an enforced policy lists none of them.
fn hosts_under_sts(
    mut hosts: Vec<Host>,
    sts: Option<(&str, &mta_sts::Policy)>,
) -> Result<Vec<Host>, String> {
    let Some((domain, policy)) = sts else {
        return Ok(hosts);
    };
    let unlisted: Vec<String> = hosts
        .iter()
        .filter(|h| !policy.allows_mx(&h.name))
        .map(|h| h.name.clone())
        .collect();
    if !unlisted.is_empty() {
        tracing::warn!(domain, mode = ?policy.mode, ?unlisted, allowed = ?policy.mx, "MTA-STS: MX hosts the policy does not list");
    }
    if policy.mode != mta_sts::Mode::Enforce {
        return Ok(hosts);
    }
    hosts.retain(|h| policy.allows_mx(&h.name));
    if hosts.is_empty() {
        return Err(format!(
            "4.7.5 MTA-STS policy of {domain} lists none of its MX hosts ({})",
            unlisted.join(", ")
        ));
    }
    Ok(hosts)
}

/// The message with the DKIM signature of its From domain's active key in front, when
/// signing is configured (signed at each attempt, so its timestamp is the sending
/// time); `None` sends the body as stored.
///
/// Hashing the body (up to the size limit) and an RSA signature are milliseconds of
/// CPU: on a runtime worker they would hold up every session scheduled there, so the
/// worker hands its other tasks over first (the multi-threaded runtime can; a
/// single-threaded one, in tests, just signs).
fn signed_body(shared: &Shared, item: &OutboundItem) -> Option<Vec<u8>> {
    let signer = shared.config.dkim.as_ref()?;
    let sign = || {
        signer.sign(&item.body).map(|mut header| {
            header.extend_from_slice(&item.body);
            header
        })
    };
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread
    {
        tokio::task::block_in_place(sign)
    } else {
        sign()
    }
}

/// A connection to `addr` for `host` that the destination's policies let carry the
/// message: an idle one from the pool when that is allowed, else a new one, which
/// DANE (when the host has TLSA records) or an MTA-STS policy may refuse; the failure
/// says why, and counts for the next attempt's reason.
async fn connection_for(
    shared: &Shared,
    host: &Host,
    addr: SocketAddr,
    dane: Option<&dane::HostPolicy>,
    sts: Option<(&str, &mta_sts::Policy)>,
) -> Result<Connection, Failure> {
    if let Some(dane::HostPolicy::Failed(why)) = dane {
        return Err(Failure::Network(format!("DANE: {why}")));
    }
    let enforce = sts.is_some_and(|(_, p)| p.mode == mta_sts::Mode::Enforce);
    // Under DANE a fresh connection is checked against the TLSA records; under an
    // enforced MTA-STS policy only one verified for this very host name is reused (the
    // pool is by address, which several names may share).
    let idle = take_idle(shared, addr)
        .filter(|c| dane.is_none() && (!enforce || (c.tls.verified() && c.remote() == host.name)));
    if let Some(connection) = idle {
        count_connection(shared, &host.name, "reused");
        return Ok(connection);
    }
    let connection = match Connection::open(
        addr,
        &host.name,
        &shared.config.hostname,
        shared.config.timeouts,
        Some(shared.probe.clone()),
        shared.config.tls.as_deref(),
    )
    .await
    {
        Ok(connection) => connection,
        Err(e) => {
            shared.probe.progressed(1);
            count_connection(shared, &host.name, "failed");
            return Err(e);
        }
    };
    count_connection(shared, &host.name, "opened");
    count_connection(shared, &host.name, connection.tls.label());
    tracing::info!(host = host.name, %addr, tls = %connection.tls, "outbound connection");
    match policy_refusal(&connection, &host.name, dane, sts) {
        Some(why) => {
            connection.quit().await;
            Err(Failure::Network(why))
        }
        None => Ok(connection),
    }
}

/// Why a new connection must not carry the message: DANE's TLSA records (RFC 7672 §2)
/// need TLS, and a certificate one of them matches unless none is usable; where DANE
/// does not apply, an enforced MTA-STS policy needs TLS with a verified certificate
/// (one in testing mode only logs that it would not deliver). `None`: it may.
fn policy_refusal(
    connection: &Connection,
    host: &str,
    dane: Option<&dane::HostPolicy>,
    sts: Option<(&str, &mta_sts::Policy)>,
) -> Option<String> {
    let encrypted = matches!(connection.tls, client::TlsOutcome::Encrypted { .. });
    let dane_refusal = match dane {
        Some(dane::HostPolicy::Authenticate(records)) => {
            let ok = encrypted && dane::chain_matches(records, &connection.peer_certificates, host);
            (!ok).then(|| {
                format!(
                    "DANE: {host} has TLSA records; its certificate must match one over TLS ({})",
                    connection.tls
                )
            })
        }
        Some(dane::HostPolicy::EncryptOnly) if !encrypted => Some(format!(
            "DANE: {host} has TLSA records; TLS is required ({})",
            connection.tls
        )),
        _ => None,
    };
    if dane_refusal.is_some() {
        tracing::warn!(host, tls = %connection.tls, "DANE: not delivering");
        return dane_refusal;
    }
    // DANE, when it applies, takes the place of MTA-STS (RFC 8461 §2).
    let (domain, policy) = sts.filter(|_| dane.is_none() && !connection.tls.verified())?;
    if policy.mode != mta_sts::Mode::Enforce {
        tracing::warn!(domain, host, tls = %connection.tls, "MTA-STS (testing): would not deliver without verified TLS");
        return None;
    }
    tracing::warn!(domain, host, tls = %connection.tls, "MTA-STS: not delivering without verified TLS");
    Some(format!(
        "MTA-STS policy of {domain} ({:?}) needs TLS with a verified certificate; {host} gave: {}",
        policy.mode, connection.tls
    ))
}

/// How the session that carried the message was protected, for the recipient's record
/// (and its DSN): the TLS outcome and the policy that applied.
fn tls_note(
    connection: &Connection,
    dane: Option<&dane::HostPolicy>,
    sts: Option<(&str, &mta_sts::Policy)>,
) -> String {
    match (dane, sts) {
        (Some(dane::HostPolicy::Authenticate(_)), _) => format!("{}; DANE", connection.tls),
        (Some(_), _) => format!("{}; DANE (encrypted only)", connection.tls),
        (None, Some((_, policy))) => format!(
            "{}; MTA-STS {}",
            connection.tls,
            match policy.mode {
                mta_sts::Mode::Enforce => "enforce",
                _ => "testing",
            }
        ),
        (None, None) => connection.tls.to_string(),
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
