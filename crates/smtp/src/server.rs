//! The SMTP listener: accept loop, connection limit, one task per connection, shutdown.
//!
//! Shape after mini-redis: a listener that limits connections with a semaphore, a
//! per-connection handler, and shutdown by a cancellation token plus a task tracker whose
//! emptiness proves every handler finished.

use crate::reply::Reply;
use crate::session::{RecipientPolicy, Session, SmtpLimits, Step};
use ipnet::IpNet;
use mailroom_directory::Directory;
use mailroom_directory::{Resolution, Snapshot};
use mailroom_queue::{Spool, SpoolError};
use mailroom_store::{MailStore, SpoolEntry};
use mailroom_watch::now_ms;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bytes read from a socket at once; with the line limit this bounds a session's input.
const READ_CHUNK: usize = 64 * 1024;

/// Counters and gauges of the SMTP service.
#[derive(Clone, Default)]
pub struct SmtpStats {
    /// Connections accepted.
    pub sessions: Counter,
    /// Connections open now.
    pub sessions_active: Gauge,
    /// Messages accepted ("250" sent after the spool commit).
    pub accepted: Counter,
    /// Refusals by reason.
    pub rejected: Family<Vec<(String, String)>, Counter>,
    /// Message bytes held by all sessions now, counted against
    /// `ListenerConfig::data_in_memory_max`.
    pub data_in_memory: Gauge,
    /// Messages checked by SPF/DKIM/DMARC (see [`crate::checks`]), by DMARC result and
    /// what was done.
    pub checked: Family<Vec<(String, String)>, Counter>,
    /// Where sessions are watched for polls that do not return (shared with the
    /// watchdog's registry).
    pub tasks: std::sync::Arc<mailroom_watch::Tasks>,
}

impl SmtpStats {
    /// Adds the metrics to a Prometheus registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mailroom_smtp_data_in_memory_bytes",
            "Bytes of messages being received that SMTP sessions hold in memory",
            self.data_in_memory.clone(),
        );
        registry.register(
            "mailroom_smtp_sessions",
            "SMTP connections accepted",
            self.sessions.clone(),
        );
        registry.register(
            "mailroom_smtp_sessions_active",
            "SMTP connections open now",
            self.sessions_active.clone(),
        );
        registry.register(
            "mailroom_messages_accepted",
            "Messages accepted over SMTP (durable before the 250)",
            self.accepted.clone(),
        );
        registry.register(
            "mailroom_smtp_rejected",
            "SMTP commands or messages refused, by reason",
            self.rejected.clone(),
        );
        registry.register(
            "mailroom_smtp_checked",
            "Messages from the Internet checked by SPF, DKIM and DMARC, by DMARC result and action",
            self.checked.clone(),
        );
    }

    fn reject(&self, reason: &str) {
        self.rejected
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc();
    }
}

/// Settings of the listener beyond the protocol limits.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Concurrent sessions, at most; more are answered 421 and closed.
    pub sessions_max: usize,
    /// Concurrent sessions from one client address, at most.
    pub sessions_per_client_max: usize,
    /// A session idle this long is closed with 421.
    pub idle_timeout: Duration,
    /// A session open this long is closed with 421 (bounds slow-drip clients).
    pub session_duration_max: Duration,
    /// Client networks allowed to send to non-local domains. Empty: nobody relays.
    pub relay_networks: Vec<IpNet>,
    /// Tests only: `XSPIN <ms>` holds this session's runtime thread for that long, so a
    /// test can prove the watchdog names a session that blocks its runtime.
    pub test_spin_command: bool,
    /// Message bytes all sessions together may hold in memory while receiving; past it,
    /// a session receiving a message larger than [`SHED_FLOOR_BYTES`] drops it and
    /// answers `452 4.3.1` at its end (`smtp.data_in_memory_max_bytes`).
    pub data_in_memory_max: usize,
}

/// A message smaller than this is never dropped for memory: small mail keeps flowing
/// while large messages hold the budget. What sessions can hold is therefore at most the
/// budget plus this much (and one read) per session.
pub const SHED_FLOOR_BYTES: usize = 1 << 20;

/// One session's share of the memory budget (the gauge is the sum of all shares);
/// given back when dropped, whichever way the session ends.
struct Charge<'a> {
    total: &'a Gauge,
    held: usize,
}

impl Charge<'_> {
    /// Records that the session now holds `bytes`; true when all sessions together hold
    /// more than `max`.
    fn set(&mut self, bytes: usize, max: usize) -> bool {
        let delta = bytes as i64 - self.held as i64;
        let total = if delta == 0 {
            self.total.get()
        } else {
            self.total.inc_by(delta) + delta
        };
        self.held = bytes;
        total > max as i64
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        self.total.dec_by(self.held as i64);
    }
}

/// Everything a connection handler needs; shared by all connections.
pub struct SmtpServer {
    /// Protocol limits and identity.
    pub limits: Arc<SmtpLimits>,
    /// Listener settings.
    pub config: ListenerConfig,
    /// The directory, for one snapshot per transaction.
    pub directory: Directory,
    /// Where complete messages go.
    pub spool: Spool,
    /// Metrics.
    pub stats: SmtpStats,
    /// Source of unique connection ids (queue ids derive from them).
    connection_ids: AtomicU64,
    /// Where mailbox sizes are read for the quota check at RCPT (none: no check).
    quota_store: Option<Arc<dyn MailStore>>,
    /// Whether new sessions are accepted now (the transfer mode); none: always.
    admission: Option<Admission>,
    /// The data folder's disk: MAIL is refused (452 4.3.1) below its reserve.
    disk: Option<Arc<mailroom_store::Disk>>,
    /// The certificates, when TLS is configured: STARTTLS is offered.
    tls: Option<Arc<mailroom_tls::Tls>>,
    /// Password checks for AUTH on the submission ports: the login limiter and the
    /// verifier pool shared with IMAP and POP3, and where plaintext passwords are
    /// accepted without TLS.
    logins: Option<Logins>,
    /// Submission rate limits.
    rates: SubmissionRates,
    /// SPF, DKIM, DMARC, ARC and iprev for mail from the Internet on the MX port.
    checker: Option<Arc<crate::checks::Checker>>,
}

/// What AUTH needs from the rest of the server.
#[derive(Clone)]
pub struct Logins {
    /// Failed logins per client and account (shared with IMAP and POP3).
    pub limiter: Arc<mailroom_directory::login::LoginLimiter>,
    /// The Argon2 verifier threads.
    pub verifier: Arc<mailroom_directory::login::Verifier>,
    /// Where passwords may be sent without TLS.
    pub plaintext: mailroom_directory::login::Plaintext,
}

/// What a listener is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Mail from other servers (port 25): no AUTH; relay only from `relay_networks`.
    Mx,
    /// Submission (RFC 6409, port 587): STARTTLS, then AUTH before MAIL.
    Submission,
    /// Submission over implicit TLS (RFC 8314, port 465): AUTH before MAIL.
    Submissions,
}

/// Says whether new SMTP sessions are accepted right now.
pub type Admission = Arc<dyn Fn() -> bool + Send + Sync>;

/// The directory snapshot plus mailbox sizes: RCPT's view of recipients and quotas.
struct QuotaPolicy<'a> {
    snapshot: &'a Snapshot,
    store: Option<&'a Arc<dyn MailStore>>,
    disk: Option<&'a Arc<mailroom_store::Disk>>,
    rates: &'a SubmissionRates,
    client: IpAddr,
}

/// Messages per hour that submission accepts from one user and from one client address
/// (fixed one-hour windows; `0`: no limit). Past it, MAIL gets `451 4.7.1` and the
/// client retries later: a compromised password or a looping script cannot send
/// without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubmissionLimits {
    /// Per authenticated user.
    pub per_user_per_hour: u32,
    /// Per client address.
    pub per_client_per_hour: u32,
}

/// The submission counters (one map per kind; an entry lives for its window).
pub struct SubmissionRates {
    limits: Option<SubmissionLimits>,
    /// Rank `SUBMISSION_RATES` (leaf): held to count one message.
    counts: mailroom_watch::RankedMutex<RateCounts>,
}

impl Default for SubmissionRates {
    fn default() -> Self {
        SubmissionRates {
            limits: None,
            counts: mailroom_watch::RankedMutex::new(
                mailroom_watch::rank::SUBMISSION_RATES,
                "submission rates",
                RateCounts::default(),
            ),
        }
    }
}

#[derive(Default)]
struct RateCounts {
    /// The hour (Unix time / 3600) the counts are for.
    window: i64,
    users: std::collections::HashMap<mailroom_store::RecipientId, u32>,
    clients: std::collections::HashMap<IpAddr, u32>,
}

impl SubmissionRates {
    /// Counters enforcing `limits`.
    pub fn new(limits: SubmissionLimits) -> SubmissionRates {
        SubmissionRates {
            limits: Some(limits),
            ..SubmissionRates::default()
        }
    }

    /// Counts one message for `user` from `client` in the hour of `now_ms`, or says
    /// which limit it would exceed (and counts nothing).
    pub fn admit(
        &self,
        user: mailroom_store::RecipientId,
        client: IpAddr,
        now_ms: i64,
    ) -> Result<(), String> {
        let Some(limits) = self.limits else {
            return Ok(());
        };
        let mut counts = self.counts.lock();
        let window = now_ms.div_euclid(3_600_000);
        if counts.window != window {
            *counts = RateCounts {
                window,
                ..RateCounts::default()
            };
        }
        let user_count = counts.users.get(&user).copied().unwrap_or(0);
        let client_count = counts.clients.get(&client).copied().unwrap_or(0);
        if limits.per_user_per_hour > 0 && user_count >= limits.per_user_per_hour {
            return Err(format!(
                "You sent {} messages this hour, the most allowed; try again later",
                limits.per_user_per_hour
            ));
        }
        if limits.per_client_per_hour > 0 && client_count >= limits.per_client_per_hour {
            return Err(format!(
                "{} messages this hour from {client}, the most allowed; try again later",
                limits.per_client_per_hour
            ));
        }
        counts.users.insert(user, user_count + 1);
        counts.clients.insert(client, client_count + 1);
        Ok(())
    }
}

impl RecipientPolicy for QuotaPolicy<'_> {
    fn resolve(&self, address: &str) -> Resolution {
        self.snapshot.resolve(address)
    }

    fn undeliverable(&self, address: &str) -> Option<String> {
        self.snapshot.refusal_at_rcpt(address)
    }

    fn storage_refusal(&self, size: u64) -> Option<String> {
        // The declared size counts twice: the WAL first, the database at a checkpoint.
        let refused = self.disk?.admit(size.saturating_mul(2)).err()?;
        Some(refused.to_string())
    }

    fn submission_refusal(
        &self,
        user: mailroom_store::RecipientId,
    ) -> Option<crate::session::SubmissionRefusal> {
        use crate::session::SubmissionRefusal;
        if let (Some(recipient), Some(store)) = (self.snapshot.recipient(user), self.store)
            && let Some(limit_kb) = recipient.quota.prohibit_send_kb.filter(|kb| *kb > 0)
        {
            let read = || store.mailbox_bytes(user);
            let usage = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(read),
                _ => read(),
            };
            // A failed read lets the message through (as for the receive quota).
            if usage.is_ok_and(|bytes| bytes >= limit_kb * 1024) {
                return Some(SubmissionRefusal::OverQuota);
            }
        }
        self.rates
            .admit(user, self.client, now_ms())
            .err()
            .map(SubmissionRefusal::RateLimited)
    }

    fn may_send_as(&self, user: mailroom_store::RecipientId, address: &str) -> bool {
        self.snapshot.by_address(address).is_some_and(|owner| {
            owner.id == user
                || (owner.kind == mailroom_directory::RecipientKind::List
                    && owner.owner == Some(user))
                || owner.send_as.contains(&user)
        })
    }

    fn over_quota(&self, recipient: &mailroom_directory::Recipient) -> bool {
        let Some(limit_kb) = recipient
            .quota
            .prohibit_send_receive_kb
            .filter(|kb| *kb > 0)
        else {
            return false;
        };
        let Some(store) = self.store else {
            return false;
        };
        // Only recipients with a hard quota cost a query (one indexed sum). A store
        // error lets the message through: refusing mail because a read failed would
        // turn a glitch into bounces.
        // The query blocks: on a multi-threaded runtime, tell tokio so it moves this
        // worker's other tasks elsewhere meanwhile.
        let read = || store.mailbox_bytes(recipient.id);
        let usage = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(read),
            _ => read(),
        };
        match usage {
            Ok(bytes) => bytes >= limit_kb * 1024,
            Err(e) => {
                tracing::warn!(error = %e, "quota check failed; accepting");
                false
            }
        }
    }
}

impl SmtpServer {
    /// Bundles the parts a listener needs.
    pub fn new(
        limits: SmtpLimits,
        config: ListenerConfig,
        directory: Directory,
        spool: Spool,
        stats: SmtpStats,
    ) -> Arc<SmtpServer> {
        // Queue ids must not repeat across restarts: seed with the start time.
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            << 12;
        Arc::new(SmtpServer {
            limits: Arc::new(limits),
            config,
            directory,
            spool,
            stats,
            connection_ids: AtomicU64::new(seed),
            quota_store: None,
            admission: None,
            disk: None,
            tls: None,
            logins: None,
            rates: SubmissionRates::default(),
            checker: None,
        })
    }

    /// Checks mail from the Internet (SPF, DKIM, DMARC, ARC, iprev) at the end of DATA.
    pub fn with_checks(self: Arc<Self>, checker: Arc<crate::checks::Checker>) -> Arc<Self> {
        let mut server = Arc::try_unwrap(self).unwrap_or_else(|_| {
            panic!("with_checks is called right after new, before the server is shared")
        });
        server.checker = Some(checker);
        Arc::new(server)
    }

    /// Limits how many messages submission accepts per user and client address.
    pub fn with_submission_limits(self: Arc<Self>, limits: SubmissionLimits) -> Arc<Self> {
        let mut server = Arc::try_unwrap(self).unwrap_or_else(|_| {
            panic!("with_submission_limits is called right after new, before the server is shared")
        });
        server.rates = SubmissionRates::new(limits);
        Arc::new(server)
    }

    /// Enables AUTH on the submission ports with these password checks.
    pub fn with_logins(self: Arc<Self>, logins: Logins) -> Arc<Self> {
        let mut server = Arc::try_unwrap(self).unwrap_or_else(|_| {
            panic!("with_logins is called right after new, before the server is shared")
        });
        server.logins = Some(logins);
        Arc::new(server)
    }

    /// Offers STARTTLS (RFC 3207) with these certificates.
    pub fn with_tls(self: Arc<Self>, tls: Arc<mailroom_tls::Tls>) -> Arc<Self> {
        let mut server = Arc::try_unwrap(self).unwrap_or_else(|_| {
            panic!("with_tls is called right after new, before the server is shared")
        });
        server.tls = Some(tls);
        Arc::new(server)
    }

    /// Checks "prohibit send and receive" quotas at RCPT against mailbox sizes in `store`.
    pub fn with_quotas(self: Arc<Self>, store: Arc<dyn MailStore>) -> Arc<Self> {
        let mut server = Arc::try_unwrap(self).unwrap_or_else(|_| {
            panic!("with_quotas is called right after new, before the server is shared")
        });
        server.quota_store = Some(store);
        Arc::new(server)
    }

    /// Refuses MAIL with 452 4.3.1 while `disk` is below its free-space reserve (or
    /// cannot hold the size the client declared).
    pub fn with_disk(self: Arc<Self>, disk: Arc<mailroom_store::Disk>) -> Arc<Self> {
        let mut server = Arc::try_unwrap(self).unwrap_or_else(|_| {
            panic!("with_disk is called right after new, before the server is shared")
        });
        server.disk = Some(disk);
        Arc::new(server)
    }

    /// Refuses new sessions with 421 4.3.2 while `admission` says no (transfer mode
    /// "outbound" or "none"); the client keeps its mail and tries later.
    pub fn with_admission(self: Arc<Self>, admission: Admission) -> Arc<Self> {
        let mut server = Arc::try_unwrap(self).unwrap_or_else(|_| {
            panic!("with_admission is called right after new, before the server is shared")
        });
        server.admission = Some(admission);
        Arc::new(server)
    }

    fn relay_allowed(&self, ip: IpAddr) -> bool {
        self.config
            .relay_networks
            .iter()
            .any(|net| net.contains(&ip))
    }

    /// Accepts connections until `cancel` fires; connection tasks are spawned on
    /// `tracker` so the caller can wait for them with a deadline.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) {
        self.serve_mode(listener, cancel, tracker, Mode::Mx).await;
    }

    /// [`SmtpServer::serve`] for a listener of the given [`Mode`].
    pub async fn serve_mode(
        self: Arc<Self>,
        listener: TcpListener,
        cancel: CancellationToken,
        tracker: TaskTracker,
        mode: Mode,
    ) {
        let tls = match (mode, &self.tls) {
            (Mode::Submissions, None) => {
                tracing::error!("SMTPS listener without certificates: not started");
                return;
            }
            (Mode::Submissions, Some(tls)) => Some(tls.clone()),
            _ => None,
        };
        let limits = mailroom_listen::Limits {
            protocol: match mode {
                Mode::Mx => "SMTP",
                Mode::Submission => "submission",
                Mode::Submissions => "SMTPS",
            },
            connections_max: self.config.sessions_max,
            per_client_max: self.config.sessions_per_client_max,
            refusal: b"421 4.7.0 Too many connections, try again later\r\n",
        };
        let refused = {
            let server = self.clone();
            move || server.stats.reject("too_many_connections")
        };
        let metrics = mailroom_listen::SessionMetrics {
            sessions: self.stats.sessions.clone(),
            active: self.stats.sessions_active.clone(),
            tasks: self.stats.tasks.clone(),
        };
        let server = self.clone();
        mailroom_listen::serve_sessions(
            listener,
            limits,
            cancel,
            tracker,
            refused,
            metrics,
            move |stream, peer, cancel| {
                let server = server.clone();
                let tls = tls.clone();
                async move {
                    let (stream, encrypted) = match &tls {
                        Some(tls) => (mailroom_tls::accept(tls, Box::new(stream)).await?, true),
                        None => (Box::new(stream) as mailroom_tls::BoxedIo, false),
                    };
                    server
                        .handle_io(stream, peer, cancel, encrypted, mode)
                        .await
                }
            },
        )
        .await;
    }

    /// Runs one session over any byte stream, not encrypted (STARTTLS may encrypt it).
    pub async fn handle<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        stream: S,
        peer: SocketAddr,
        cancel: CancellationToken,
    ) -> std::io::Result<()> {
        self.handle_io(Box::new(stream), peer, cancel, false, Mode::Mx)
            .await
    }

    /// Runs one session; `tls` says whether `stream` is encrypted already.
    async fn handle_io(
        &self,
        mut stream: mailroom_tls::BoxedIo,
        peer: SocketAddr,
        cancel: CancellationToken,
        tls: bool,
        mode: Mode,
    ) -> std::io::Result<()> {
        if self.admission.as_ref().is_some_and(|admit| !admit()) {
            self.stats.reject("transfer_mode");
            let line = format!(
                "421 4.3.2 {} is not accepting mail right now (transfer mode); try again later\r\n",
                self.limits.hostname
            );
            let _ = stream.write_all(line.as_bytes()).await;
            let _ = stream.flush().await;
            return Ok(());
        }
        let connection_id = self.connection_ids.fetch_add(1, Ordering::Relaxed);
        let mut session = Session::new(
            self.limits.clone(),
            peer,
            self.relay_allowed(peer.ip()),
            connection_id,
        );
        session.set_tls(tls, self.tls.is_some());
        if mode != Mode::Mx {
            session.set_auth(crate::session::AuthPolicy {
                offered: self.logins.is_some(),
                required: true,
                plaintext_allowed: self
                    .logins
                    .as_ref()
                    .is_some_and(|logins| logins.plaintext.allows(peer.ip(), tls)),
            });
        }
        // Replies are rendered here and written at once; its capacity lasts the session.
        let mut out = Vec::with_capacity(1024);
        session.greeting().render(&mut out);
        let deadline = Instant::now() + self.config.session_duration_max;
        let mut snapshot = self.directory.snapshot();
        // Not zeroed: a session per message is common (smtp-source, many MTAs), and
        // clearing 64 KiB for each showed in the profile; reads fill it from the start.
        let mut buffer: Vec<u8> = Vec::with_capacity(READ_CHUNK);
        let mut charge = Charge {
            total: &self.stats.data_in_memory,
            held: 0,
        };
        // Held while this session has a message under way (MAIL FROM accepted, not yet
        // submitted or abandoned): the spool writer waits a moment for such messages to
        // share its next commit (`[spool] commit_delay_us`).
        let mut under_way: Option<mailroom_queue::UnderWay> = None;
        loop {
            if !session.in_transaction() {
                snapshot = self.directory.snapshot();
            }
            if session.in_transaction() != under_way.is_some() {
                under_way = session
                    .in_transaction()
                    .then(|| self.spool.message_under_way());
            }
            let policy = QuotaPolicy {
                snapshot: snapshot.as_ref(),
                store: self.quota_store.as_ref(),
                disk: self.disk.as_ref(),
                rates: &self.rates,
                client: peer.ip(),
            };
            mailroom_listen::doing(session.phase_name());
            match session.advance(&policy, now_ms()) {
                Step::Reply(reply) => {
                    self.count(&reply);
                    reply.render(&mut out);
                }
                Step::Submit(mut submission) => {
                    // No longer "under way": the writer must not wait for this one.
                    under_way = None;
                    // The message now belongs to the spool (its queue is bounded).
                    charge.set(session.message_bytes(), usize::MAX);
                    self.write(&mut stream, &mut out).await?;
                    let queue_id = submission.queue_id.clone();
                    if let Some(checker) = self.checker.as_ref().filter(|checker| {
                        mode == Mode::Mx
                            && session.authenticated_user().is_none()
                            && !session.relay_allowed()
                            && checker.applies_to(peer.ip())
                    }) {
                        // Forwarded (a list or a contact among the recipients): sealed.
                        let seal = submission.recipients.iter().any(|r| {
                            matches!(snapshot.resolve(r), Resolution::Local(rec)
                                if rec.kind != mailroom_directory::RecipientKind::Mailbox)
                        });
                        let body = Arc::new(std::mem::take(&mut submission.body));
                        let local = snapshot.clone();
                        let verdict = checker
                            .check_contained(
                                peer.ip(),
                                session.helo_name().unwrap_or("").to_string(),
                                submission.mail_from.clone(),
                                body.clone(),
                                seal,
                                Arc::new(move |domain: &str| local.is_local_domain(domain)),
                            )
                            .await;
                        // The task is over: its reference is gone, the bytes come back.
                        submission.body = Arc::try_unwrap(body).unwrap_or_else(|b| (*b).clone());
                        let evidence = &verdict.evidence;
                        let dmarc = match &evidence.dmarc {
                            crate::checks::DmarcOutcome::Pass => "pass",
                            crate::checks::DmarcOutcome::Fail(_) => "fail",
                            crate::checks::DmarcOutcome::TempError => "temperror",
                            crate::checks::DmarcOutcome::None => "none",
                        };
                        let action = match &verdict.action {
                            crate::checks::Action::Accept => "accept",
                            crate::checks::Action::Junk(_) => "junk",
                            crate::checks::Action::Reject(_) => "reject",
                        };
                        self.stats
                            .checked
                            .get_or_create(&vec![
                                ("dmarc".to_string(), dmarc.to_string()),
                                ("action".to_string(), action.to_string()),
                            ])
                            .inc();
                        tracing::info!(
                            %peer, %queue_id, mail_from = %submission.mail_from,
                            from = evidence.from_domain.as_deref().unwrap_or(""),
                            spf = ?evidence.spf, dkim = ?evidence.dkim_pass, dmarc, action,
                            "message checked"
                        );
                        match verdict.action {
                            crate::checks::Action::Reject(reply) => {
                                self.stats.reject("authentication");
                                let reply = session.submitted(
                                    Err(crate::session::SpoolRefusal::Refused(reply)),
                                    &queue_id,
                                );
                                reply.render(&mut out);
                                continue;
                            }
                            crate::checks::Action::Junk(reason) => {
                                submission.envelope.junk = Some(reason);
                            }
                            crate::checks::Action::Accept => {}
                        }
                        let mut body = verdict.header.into_bytes();
                        body.extend_from_slice(&submission.body);
                        submission.body = body;
                    }
                    let entry = SpoolEntry {
                        queue_id: submission.queue_id,
                        mail_from: submission.mail_from,
                        recipients: submission.recipients,
                        body: submission.body,
                        received_at_ms: now_ms(),
                        client: format!("{peer}"),
                        helo: session.helo_name().map(str::to_string),
                        user: session.authenticated_user().map(str::to_string),
                        envelope: submission.envelope,
                    };
                    let outcome = self.spool.submit(entry).await;
                    if let Err(e) = &outcome {
                        tracing::error!(%peer, error = %e, "message not spooled");
                        self.stats.reject("spool_failure");
                    } else {
                        self.stats.accepted.inc();
                        tracing::debug!(%peer, %queue_id, "message accepted");
                    }
                    let outcome = outcome.map(|_| ()).map_err(|e| match e {
                        SpoolError::NoSpace(why) => crate::session::SpoolRefusal::NoSpace(why),
                        other => crate::session::SpoolRefusal::Failed(other.to_string()),
                    });
                    let reply = session.submitted(outcome, &queue_id);
                    reply.render(&mut out);
                }
                Step::Close => {
                    self.write(&mut stream, &mut out).await?;
                    return stream.shutdown().await;
                }
                Step::Authenticate { user, password } => {
                    self.write(&mut stream, &mut out).await?;
                    let outcome = self.check_password(peer, &user, password).await;
                    if outcome.is_ok() {
                        tracing::debug!(%peer, user, "SMTP AUTH");
                    }
                    session.auth_result(outcome).render(&mut out);
                }
                Step::StartTls(reply) => {
                    reply.render(&mut out);
                    self.write(&mut stream, &mut out).await?;
                    let Some(tls) = self.tls.clone() else {
                        return Ok(());
                    };
                    stream = match mailroom_tls::accept(&tls, stream).await {
                        Ok(encrypted) => encrypted,
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "SMTP STARTTLS handshake failed");
                            self.stats.reject("tls_handshake");
                            return Ok(());
                        }
                    };
                    session.tls_started();
                }
                Step::NeedInput => {
                    let held = session.message_bytes();
                    if charge.set(held, self.config.data_in_memory_max)
                        && held >= SHED_FLOOR_BYTES
                        && session.shed()
                    {
                        tracing::warn!(%peer, held, "message dropped: messages being received hold more memory than smtp.data_in_memory_max_bytes");
                        self.stats.reject("memory");
                        charge.set(session.message_bytes(), usize::MAX);
                    }
                    self.write(&mut stream, &mut out).await?;
                    let read = tokio::select! {
                        _ = cancel.cancelled() => Err("421 4.3.2 Service shutting down, try again later\r\n"),
                        _ = tokio::time::sleep_until(deadline.into()) => Err("421 4.4.2 Session time limit exceeded, closing connection\r\n"),
                        read = tokio::time::timeout(self.config.idle_timeout, async {
                            buffer.clear();
                            stream.read_buf(&mut buffer).await
                        }) => match read {
                            Ok(read) => Ok(read?),
                            Err(_) => Err("421 4.4.2 Idle timeout, closing connection\r\n"),
                        },
                    };
                    match read {
                        Ok(0) => return Ok(()),
                        Ok(n)
                            if self.config.test_spin_command
                                && buffer[..n].starts_with(b"XSPIN ") =>
                        {
                            spin(&buffer[..n]);
                            out.extend_from_slice(b"250 2.0.0 spun\r\n");
                        }
                        Ok(n) => session.receive(&buffer[..n]),
                        Err(goodbye) => {
                            let _ = tokio::time::timeout(
                                Duration::from_secs(1),
                                stream.write_all(goodbye.as_bytes()),
                            )
                            .await;
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// Checks an AUTH password: the login limiter first, then the verifier pool, and
    /// the mailbox's protocol settings (SMTP submission may be turned off per mailbox).
    async fn check_password(
        &self,
        peer: SocketAddr,
        user: &str,
        password: String,
    ) -> Result<mailroom_store::RecipientId, crate::session::AuthFailure> {
        use crate::session::AuthFailure;
        use mailroom_directory::login::LoginError;
        let Some(logins) = &self.logins else {
            return Err(AuthFailure::Temporary(
                "Authentication is not available".into(),
            ));
        };
        let attempt = match logins.limiter.begin(peer.ip(), user).await {
            Ok(attempt) => attempt,
            Err(e) => {
                self.stats.reject("auth_limited");
                return Err(AuthFailure::Temporary(e.to_string()));
            }
        };
        let snapshot = self.directory.snapshot();
        match mailroom_directory::login::authenticate_async(
            &snapshot,
            user,
            password,
            mailroom_directory::model::Protocol::SmtpSubmission,
            &logins.verifier,
        )
        .await
        {
            Ok(id) => {
                attempt.succeeded();
                Ok(id)
            }
            Err(e @ LoginError::Busy) => {
                attempt.void();
                Err(AuthFailure::Temporary(e.to_string()))
            }
            Err(e @ LoginError::ProtocolDisabled(_)) => {
                attempt.void();
                Err(AuthFailure::Disabled(e.to_string()))
            }
            Err(_) => {
                attempt.failed();
                self.stats.reject("auth_failed");
                tracing::info!(%peer, user, "SMTP AUTH failed");
                Err(AuthFailure::Invalid)
            }
        }
    }

    async fn write<S: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(self.config.idle_timeout, stream.write_all(out)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client stopped reading",
                ));
            }
        }
        out.clear();
        Ok(())
    }

    fn count(&self, reply: &Reply) {
        let reason = match (reply.code, reply.status) {
            (550, Some((5, 1, 1))) => "unknown_recipient",
            (550, Some((5, 7, 1))) => "relay_denied",
            (452, Some((4, 5, 3))) => "too_many_recipients",
            (552, _) => "message_too_big",
            (550, Some((5, 6, 0))) => "bare_newline",
            (421, Some((4, 7, 0))) => "too_many_errors",
            (553, _) => "address_needs_smtputf8",
            (500..=504, _) | (555, _) => "protocol_error",
            _ => return,
        };
        self.stats.reject(reason);
    }
}

/// The test hook behind `XSPIN <ms>`: a busy loop on the runtime thread, exactly what a
/// session stuck in a poll does.
fn spin(line: &[u8]) {
    let ms: u64 = std::str::from_utf8(&line[6..])
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
        .min(60_000);
    mailroom_listen::doing("XSPIN");
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    #[test]
    fn submission_rates_count_per_user_and_client_and_roll_over_each_hour() {
        let rates = SubmissionRates::new(SubmissionLimits {
            per_user_per_hour: 2,
            per_client_per_hour: 3,
        });
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let hour = 1_790_000_000_000 / 3_600_000 * 3_600_000;
        assert!(rates.admit(1, a, hour).is_ok());
        assert!(rates.admit(1, a, hour + 1).is_ok());
        let e = rates.admit(1, b, hour + 2).unwrap_err();
        assert!(e.contains("You sent 2 messages this hour"), "{e}");
        // Another user from the same address: the client's limit (3) counts both.
        assert!(rates.admit(2, a, hour + 3).is_ok());
        let e = rates.admit(3, a, hour + 4).unwrap_err();
        assert!(e.contains("from 192.0.2.1"), "{e}");
        assert!(
            rates.admit(3, b, hour + 5).is_ok(),
            "other addresses are not limited by it"
        );
        // The next hour starts afresh.
        assert!(rates.admit(1, a, hour + 3_600_000).is_ok());
        // No limits configured: nothing is counted or refused.
        let open = SubmissionRates::default();
        for n in 0..1000 {
            assert!(open.admit(1, a, hour + n).is_ok());
        }
    }
}
