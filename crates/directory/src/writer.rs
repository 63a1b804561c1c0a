//! The single directory writer and the handle readers and admins hold.
//!
//! Every change (API, CLI, import, address regeneration) arrives here over one bounded
//! channel. The writer drains what is pending, applies each change with
//! [`Snapshot::apply`] on a working copy, persists every resulting row in one store
//! transaction, and only then publishes the new snapshot (one generation for the whole
//! batch) and answers each requester. Readers never wait for it.

use crate::model::{Protocol, SiteConfig};
use crate::routing::Connector;
use crate::snapshot::{Applied, Snapshot, from_row};
use crate::{addressing, validate_address};
use arc_swap::ArcSwap;
use mailroom_store::{DirectoryWrite, MailStore, RecipientId, Topology};
use mailroom_watch::{Activity, Probe, now_ms};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Pending requests the writer accepts before senders wait (bounded, DESIGN.md rule 5).
const REQUESTS_MAX: usize = 1024;

/// Pending background requests (imports, address regeneration): each job thread waits
/// for its request's answer before sending the next, so a few suffice.
const BACKGROUND_REQUESTS_MAX: usize = 64;

/// Recipients touched by one background batch, at most: short transactions, so that an
/// administrator's change that arrives meanwhile waits at most one of them.
const BACKGROUND_WEIGHT_MAX: usize = 256;

/// While mail is moving, background work takes at most this share of the writer's time:
/// after a background batch that took `t`, the lane rests `t * (1 - share) / share`.
/// The directory's work is CPU (applying changes, building the snapshot) and its own
/// database's fsyncs; on a small machine every millisecond of it is one mail does not
/// get. An administrator's change never waits for the rest. 5 %, not 10 % as before:
/// the churn replay's per-thread CPU accounting (docs/benchmarks.md, seventh session
/// of issue 16) showed the writer's CPU per message falling from 16-18 to 10-13 ms per
/// 1,000 messages, and the import still running when the load ended.
const BACKGROUND_SHARE_WHILE_MAIL_MOVES: f64 = 0.05;

/// The longest rest between background batches, so that a job always progresses (the
/// watchdog expects progress) and an import never stops for long.
const BACKGROUND_REST_MAX: std::time::Duration = std::time::Duration::from_millis(1000);

/// Background writes are committed without an fsync of their own (see
/// `MailStore::write_directory_background`); they are made durable at least this often
/// while they continue, at an administrator's change, and when a job finishes. A power
/// loss can undo at most this much of a running import, which reports nothing done
/// for it yet.
const BACKGROUND_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Mail that moved within this window counts as moving (see `MailStore::mail_active_at_ms`).
const MAIL_MOVING_WINDOW_MS: i64 = 1000;

/// Recipients touched by one store transaction and one publication, at most (an atomic
/// request is never split, whatever its size). Small enough that one directory
/// transaction holds the database's write turn for a fraction of a second even on a
/// saturated machine: the long churn run saw 2,048-change transactions hold it 0.5-1.9 s,
/// and inbound conversion waited behind them. Counted by [`Change::weight`], not by
/// changes: one address-regeneration step touches hundreds of recipients, and counting
/// it as one let a batch carry a hundred of them.
const BATCH_WEIGHT_MAX: usize = 512;

/// The fields of a recipient a change sets; `None` leaves a field as it is (or at its
/// default for a new recipient). Empty strings and lists clear; a quota of 0 means none.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipientFields {
    /// Mailbox, contact or list (required to create; cannot change).
    #[serde(default)]
    pub kind: Option<crate::model::RecipientKind>,
    /// The mailbox name; defaults to the first address's local part.
    #[serde(default)]
    pub alias: Option<String>,
    /// Display name.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Given name.
    #[serde(default)]
    pub given_name: Option<String>,
    /// Surname.
    #[serde(default)]
    pub surname: Option<String>,
    /// Initials.
    #[serde(default)]
    pub initials: Option<String>,
    /// Addresses: `SMTP:a@b` marks the primary, `smtp:a@b` a secondary; plain
    /// addresses are allowed (the first is primary). Replaces the whole list; none on a
    /// new mailbox means "generate from site addressing".
    #[serde(default)]
    pub addresses: Option<Vec<String>>,
    /// Addresses to add to the current ones (applied after `addresses`).
    #[serde(default)]
    pub add_addresses: Vec<String>,
    /// Addresses to remove from the current ones.
    #[serde(default)]
    pub remove_addresses: Vec<String>,
    /// A contact's external address.
    #[serde(default)]
    pub target_address: Option<String>,
    /// A list's members by alias or address; replaces the whole list.
    #[serde(default)]
    pub members: Option<Vec<String>>,
    /// Members to add (applied after `members`).
    #[serde(default)]
    pub add_members: Vec<String>,
    /// Members to remove.
    #[serde(default)]
    pub remove_members: Vec<String>,
    /// A list's owner by alias or address; empty clears.
    #[serde(default)]
    pub owner: Option<String>,
    /// Mailboxes (alias or address) granted "send as" this recipient; replaces the
    /// grants (empty: none).
    #[serde(default)]
    pub send_as: Option<Vec<String>>,
    /// Hidden from the address book.
    #[serde(default)]
    pub hidden: Option<bool>,
    /// The administrator role (web admin sign-in); mailboxes only.
    #[serde(default)]
    pub admin: Option<bool>,
    /// Protocol overrides as `protocol:on|off|default`; replaces all overrides.
    #[serde(default)]
    pub protocols: Option<Vec<String>>,
    /// Quota warning, KB (0: none).
    #[serde(default)]
    pub quota_warning_kb: Option<u64>,
    /// Quota prohibit send, KB (0: none).
    #[serde(default)]
    pub quota_prohibit_send_kb: Option<u64>,
    /// Quota prohibit send and receive, KB (0: none).
    #[serde(default)]
    pub quota_prohibit_send_receive_kb: Option<u64>,
    /// Argon2id PHC string (never a plain password).
    #[serde(skip)]
    pub password_hash: Option<String>,
}

/// A change to the site configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum SiteChange {
    /// Set (or with `None` remove) the site addressing template of an address type.
    SetTemplate {
        /// Address type, `SMTP`.
        address_type: String,
        /// The template, e.g. `%g.%s@example.com`.
        template: Option<String>,
    },
    /// Accept mail for a domain.
    AddAcceptedDomain {
        /// The domain.
        domain: String,
    },
    /// Stop accepting mail for an explicitly added domain.
    RemoveAcceptedDomain {
        /// The domain.
        domain: String,
    },
    /// Turn a protocol on or off at site level.
    SetSiteProtocol {
        /// Which protocol.
        protocol: Protocol,
        /// On or off.
        enabled: bool,
    },
    /// This server: use the site defaults, or its own setting for a protocol.
    SetServerProtocol {
        /// Use the site defaults (true) or the server's own settings (false).
        use_site_defaults: bool,
        /// The server's own setting for one protocol, when given.
        protocol: Option<(Protocol, bool)>,
    },
    /// Create or replace a connector.
    PutConnector {
        /// The connector.
        connector: Connector,
    },
    /// Delete a connector.
    DeleteConnector {
        /// Its name.
        name: String,
    },
    /// Never use a costlier route when the cheapest is unavailable.
    SetOnlyLeastCostRoutes {
        /// On or off.
        enabled: bool,
    },
}

impl SiteChange {
    pub(crate) fn apply_to(&self, site: &mut SiteConfig) -> Result<(), DirectoryError> {
        let bad = |object: &str, field: &'static str, reason: String| DirectoryError::Invalid {
            object: object.to_string(),
            field,
            reason,
        };
        match self {
            SiteChange::SetTemplate {
                address_type,
                template,
            } => {
                let address_type = address_type.to_ascii_uppercase();
                if address_type != "SMTP" {
                    return Err(bad(
                        "site addressing",
                        "address_type",
                        format!("{address_type} is not supported (SMTP)"),
                    ));
                }
                match template {
                    Some(t) => {
                        addressing::check_template(t)
                            .map_err(|e| bad("site addressing", "template", e.to_string()))?;
                        site.addressing.insert(address_type, t.trim().to_string());
                    }
                    None => {
                        site.addressing.remove(&address_type);
                    }
                }
            }
            SiteChange::AddAcceptedDomain { domain } => {
                let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
                validate_address(&format!("x@{domain}"))
                    .map_err(|_| bad(&domain, "domain", "is not a valid domain name".into()))?;
                site.accepted_domains.insert(domain);
            }
            SiteChange::RemoveAcceptedDomain { domain } => {
                if !site.accepted_domains.remove(&domain.to_ascii_lowercase()) {
                    return Err(bad(
                        domain,
                        "domain",
                        "is not an explicitly accepted domain".into(),
                    ));
                }
            }
            SiteChange::SetSiteProtocol { protocol, enabled } => {
                site.site_protocols.set(*protocol, *enabled);
            }
            SiteChange::SetServerProtocol {
                use_site_defaults,
                protocol,
            } => {
                if !use_site_defaults && !site.server_uses_site_defaults && protocol.is_none() {
                    return Ok(());
                }
                if !*use_site_defaults && site.server_uses_site_defaults {
                    // Switching to own settings starts from what the site gave.
                    site.server_protocols = site.site_protocols;
                }
                site.server_uses_site_defaults = *use_site_defaults;
                if let Some((p, on)) = protocol {
                    site.server_protocols.set(*p, *on);
                }
            }
            SiteChange::PutConnector { connector } => {
                let name = connector.name.trim();
                if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(bad(name, "name", "must be a non-empty word".into()));
                }
                for space in &connector.address_spaces {
                    space
                        .check()
                        .map_err(|reason| bad(name, "address_spaces", reason))?;
                }
                if let crate::routing::ConnectorKind::SmartHost { host } = &connector.kind
                    && host
                        .rsplit_once(':')
                        .and_then(|(_, p)| p.parse::<u16>().ok())
                        .is_none()
                {
                    return Err(bad(
                        name,
                        "smart_host",
                        format!("{host:?} must be host:port"),
                    ));
                }
                site.connectors.insert(name.to_string(), connector.clone());
            }
            SiteChange::DeleteConnector { name } => {
                if site.connectors.remove(name).is_none() {
                    return Err(bad(name, "name", "no such connector".into()));
                }
            }
            SiteChange::SetOnlyLeastCostRoutes { enabled } => {
                site.only_least_cost_routes = *enabled
            }
        }
        Ok(())
    }
}

/// A change to the directory.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Create a recipient (error if the alias exists).
    CreateRecipient(RecipientFields),
    /// Create, or modify the given fields of, the recipient with this alias.
    UpsertRecipient(RecipientFields),
    /// Modify the given fields of an existing recipient (found by alias or address).
    ModifyRecipient {
        /// Alias or any address of the recipient.
        alias: String,
        /// What to change.
        fields: RecipientFields,
    },
    /// Delete a recipient (found by alias or address); lists drop it as a member.
    DeleteRecipient {
        /// Alias or any address of the recipient.
        alias: String,
    },
    /// Set the password of the mailbox owning `address`.
    SetPassword {
        /// Alias or any address of the recipient.
        address: String,
        /// The new Argon2id PHC string.
        password_hash: String,
    },
    /// Renew generated addresses from the current template (a regeneration job's step).
    RegenerateAddresses {
        /// Which recipients.
        ids: Vec<RecipientId>,
    },
    /// A site configuration change.
    Site(SiteChange),
}

/// Why a change was not applied.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DirectoryError {
    /// The change is invalid; names the object and field. Nothing was changed.
    #[error("{object}: field {field}: {reason}")]
    Invalid {
        /// The recipient (or other object) the change named.
        object: String,
        /// The field at fault.
        field: &'static str,
        /// What is wrong and what to do.
        reason: String,
    },
    /// Valid, but not applied because another change of the same atomic request failed.
    #[error("not applied: another change of this all-or-nothing request failed")]
    RolledBack,
    /// The store failed; the change was not applied.
    #[error("the directory could not be saved: {0}")]
    Store(String),
    /// The writer is gone (the server is shutting down).
    #[error("the directory writer has stopped; the server is shutting down")]
    Stopped,
}

type Results = Vec<Result<Applied, DirectoryError>>;

struct Request {
    changes: Vec<Change>,
    atomic: bool,
    /// Make every background write durable before answering (a job about to report
    /// that it finished; see [`Directory::sync_background_blocking`]).
    sync: bool,
    enqueued_ms: i64,
    reply: oneshot::Sender<Results>,
}

impl Request {
    /// Recipients this request may touch, summed over its changes.
    fn weight(&self) -> usize {
        self.changes.iter().map(Change::weight).sum()
    }
}

impl Change {
    /// How many recipients this change may write: a regeneration step touches each of its
    /// ids, everything else one row (a recipient or the site settings).
    pub fn weight(&self) -> usize {
        match self {
            Change::RegenerateAddresses { ids } => ids.len().max(1),
            _ => 1,
        }
    }
}

/// The directory as the rest of the server holds it: read snapshots, submit changes.
#[derive(Clone)]
pub struct Directory {
    /// The published snapshot; readers load it lock-free.
    current: Arc<ArcSwap<Snapshot>>,
    /// The first lane (bounded): single changes from administrators and the server.
    requests: mpsc::Sender<Request>,
    /// The second lane (bounded): background jobs' chunks, served only when the first
    /// is empty, and paced while mail moves.
    background: mpsc::Sender<Request>,
    /// Whether the background lane is resting for mail right now (job progress says so).
    paced: Arc<std::sync::atomic::AtomicBool>,
    /// The writer's input queue: depth, oldest request, progress.
    probe: Arc<Probe>,
    /// What the writer thread is doing.
    activity: Arc<Activity>,
}

impl Directory {
    /// Loads the directory from the store (or, on a new data folder, starts from
    /// `initial_site`), publishes it and starts the writer thread. The thread ends when
    /// the last `Directory` handle is dropped.
    pub fn start(
        store: Arc<dyn MailStore>,
        configured_domains: &[String],
        topology: &Topology,
        initial_site: SiteConfig,
    ) -> Result<(Directory, std::thread::JoinHandle<()>), DirectoryError> {
        let store_error = |e: mailroom_store::StoreError| DirectoryError::Store(e.to_string());
        let topology = store.ensure_topology(topology).map_err(store_error)?;
        let stored = store.load_directory().map_err(store_error)?;
        let site = match &stored.site {
            Some(json) => serde_json::from_str(json).map_err(|e| {
                DirectoryError::Store(format!("the stored site settings do not parse: {e}"))
            })?,
            None => initial_site,
        };
        let mut snapshot = Snapshot::new(
            configured_domains,
            topology,
            SiteConfig::default(),
            String::new(),
        );
        snapshot.restore_site(site, stored.previous_routing.clone());
        snapshot.reserve_ids(stored.id_floor);
        for row in stored.recipients {
            snapshot.load(from_row(row));
        }
        if stored.site.is_none() {
            // First start: persist the initial site so later config edits do not matter.
            let write = DirectoryWrite::PutSettings {
                site: serde_json::to_string(snapshot.site()).expect("site serialises"),
                previous_routing: String::new(),
            };
            store.write_directory(&[write]).map_err(store_error)?;
        }
        let current = Arc::new(ArcSwap::from_pointee(snapshot.with_generation(1)));
        let (requests, receiver) = mpsc::channel(REQUESTS_MAX);
        let (background, background_receiver) = mpsc::channel(BACKGROUND_REQUESTS_MAX);
        let paced = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let probe = Probe::new("directory writer");
        let activity = Activity::new("directory-writer");
        let writer = Writer {
            store,
            current: current.clone(),
            receiver,
            background: background_receiver,
            paced: paced.clone(),
            probe: probe.clone(),
            activity: activity.clone(),
            unsynced_since: std::cell::Cell::new(None),
        };
        let thread = std::thread::Builder::new()
            .name("directory-writer".into())
            .spawn(move || {
                mailroom_watch::lower_thread_priority(mailroom_watch::DIRECTORY_WRITER_NICE);
                writer.run()
            })
            .map_err(|e| DirectoryError::Store(format!("cannot start the writer: {e}")))?;
        Ok((
            Directory {
                current,
                requests,
                background,
                paced,
                probe,
                activity,
            },
            thread,
        ))
    }

    /// The writer's input queue probe (register it with the watchdog).
    pub fn probe(&self) -> Arc<Probe> {
        self.probe.clone()
    }

    /// The writer thread's activity (register it with the watchdog).
    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }

    /// The current snapshot. Load once per unit of work and use only that value.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Submits one change and waits until it is applied and published (or rejected).
    pub async fn apply(&self, change: Change) -> Result<Applied, DirectoryError> {
        self.apply_all(vec![change], false)
            .await
            .pop()
            .unwrap_or(Err(DirectoryError::Stopped))
    }

    /// Submits changes in order; with `atomic`, all are applied or none. One result per
    /// change.
    pub async fn apply_all(&self, changes: Vec<Change>, atomic: bool) -> Results {
        let count = changes.len();
        let (reply, answer) = oneshot::channel();
        self.probe.enqueued(1);
        let request = Request {
            changes,
            atomic,
            sync: false,
            enqueued_ms: now_ms(),
            reply,
        };
        if self.requests.send(request).await.is_err() {
            self.probe.finished(1);
            return vec![Err(DirectoryError::Stopped); count];
        }
        answer
            .await
            .unwrap_or_else(|_| vec![Err(DirectoryError::Stopped); count])
    }

    /// Submits changes as background work (an import's or a regeneration's chunk) and
    /// waits for their results; for job threads outside the async runtime. Background
    /// work is applied only when no administrator's change is waiting, and while mail
    /// moves it takes a small share of the writer's time (see
    /// [`Directory::background_paced`]).
    pub fn apply_all_background(&self, changes: Vec<Change>, atomic: bool) -> Results {
        self.submit_blocking(&self.background, changes, atomic)
    }

    /// Makes every background write applied so far durable (they are committed without
    /// an fsync of their own, see `MailStore::write_directory_background`); a job calls
    /// it before it reports that it finished, so that "done" survives a power loss. Not
    /// paced: it goes in the administrators' lane.
    pub fn sync_background_blocking(&self) -> Result<(), DirectoryError> {
        let (reply, answer) = oneshot::channel();
        self.probe.enqueued(1);
        let request = Request {
            changes: Vec::new(),
            atomic: false,
            sync: true,
            enqueued_ms: now_ms(),
            reply,
        };
        if self.requests.blocking_send(request).is_err() {
            self.probe.finished(1);
            return Err(DirectoryError::Stopped);
        }
        match answer.blocking_recv() {
            Ok(results) => results.into_iter().next().map_or(Ok(()), |r| r.map(drop)),
            Err(_) => Err(DirectoryError::Stopped),
        }
    }

    /// Whether background work is being paced right now because mail is moving.
    pub fn background_paced(&self) -> bool {
        self.paced.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// [`Directory::apply`] for threads outside the async runtime.
    pub fn apply_blocking(&self, change: Change) -> Result<Applied, DirectoryError> {
        self.apply_all_blocking(vec![change], false)
            .pop()
            .unwrap_or(Err(DirectoryError::Stopped))
    }

    /// [`Directory::apply_all`] for threads outside the async runtime.
    pub fn apply_all_blocking(&self, changes: Vec<Change>, atomic: bool) -> Results {
        self.submit_blocking(&self.requests, changes, atomic)
    }

    fn submit_blocking(
        &self,
        lane: &mpsc::Sender<Request>,
        changes: Vec<Change>,
        atomic: bool,
    ) -> Results {
        let count = changes.len();
        let (reply, answer) = oneshot::channel();
        self.probe.enqueued(1);
        let request = Request {
            changes,
            atomic,
            sync: false,
            enqueued_ms: now_ms(),
            reply,
        };
        if lane.blocking_send(request).is_err() {
            self.probe.finished(1);
            return vec![Err(DirectoryError::Stopped); count];
        }
        answer
            .blocking_recv()
            .unwrap_or_else(|_| vec![Err(DirectoryError::Stopped); count])
    }
}

struct Writer {
    store: Arc<dyn MailStore>,
    current: Arc<ArcSwap<Snapshot>>,
    receiver: mpsc::Receiver<Request>,
    background: mpsc::Receiver<Request>,
    paced: Arc<std::sync::atomic::AtomicBool>,
    probe: Arc<Probe>,
    activity: Arc<Activity>,
    /// Since when background writes have been committed without being made durable
    /// (`None`: everything is durable).
    unsynced_since: std::cell::Cell<Option<std::time::Instant>>,
}

/// Which lane a batch came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lane {
    First,
    Background,
}

impl Writer {
    fn run(self) {
        let _alive = self.activity.guard();
        // The writer's own small runtime: it waits on two lanes and a timer at once.
        // Nothing else runs on it, and every store call stays on this thread.
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(error = %e, "the directory writer cannot start its timer");
                return;
            }
        };
        runtime.block_on(self.serve());
        tracing::debug!("directory writer stopped");
    }

    async fn serve(mut self) {
        // A request received that would have made the last batch too heavy: it starts
        // the next one.
        let mut carried: Option<(Request, Lane)> = None;
        // While mail moves, background batches wait until then.
        let mut rest_until = tokio::time::Instant::now();
        loop {
            let (first, lane) = match carried.take() {
                Some(carried) => carried,
                None => {
                    let resting = tokio::time::Instant::now() < rest_until;
                    self.paced
                        .store(resting, std::sync::atomic::Ordering::Relaxed);
                    tokio::select! {
                        biased;
                        request = self.receiver.recv() => match request {
                            Some(request) => (request, Lane::First),
                            None => break,
                        },
                        request = self.background.recv(), if !resting => match request {
                            Some(request) => (request, Lane::Background),
                            None => continue,
                        },
                        () = tokio::time::sleep_until(rest_until), if resting => continue,
                    }
                }
            };
            let limit = match lane {
                Lane::First => BATCH_WEIGHT_MAX,
                Lane::Background => BACKGROUND_WEIGHT_MAX,
            };
            let mut weight = first.weight();
            let mut size = first.changes.len();
            let mut batch = vec![first];
            // More of the first lane joins any batch (an administrator's change should
            // not wait a batch); background requests wait for their own.
            while weight < limit {
                match self.receiver.try_recv() {
                    Ok(request) if weight + request.weight() > limit => {
                        carried = Some((request, Lane::First));
                        break;
                    }
                    Ok(request) => {
                        weight += request.weight();
                        size += request.changes.len();
                        batch.push(request);
                    }
                    Err(_) => break,
                }
            }
            // What the batch is, for its durability: background only when no
            // administrator's change joined it.
            let kind = if batch.len() > 1 { Lane::First } else { lane };
            let requests = batch.len() as u64;
            self.probe
                .working_on(batch.iter().map(|r| r.enqueued_ms).min());
            self.activity.set(format!(
                "applying {size} change(s) from {requests} request(s)"
            ));
            let started = tokio::time::Instant::now();
            // A batch with an administrator's change is durable when answered.
            self.apply_batch(batch, kind);
            if self
                .unsynced_since
                .get()
                .is_some_and(|since| since.elapsed() >= BACKGROUND_SYNC_INTERVAL)
            {
                // A long import's chunks become durable at least this often.
                let _ = self.sync();
            }
            self.probe.finished(requests);
            self.probe.working_on(None);
            self.activity.idle();
            if lane == Lane::Background {
                rest_until = tokio::time::Instant::now() + self.rest_after(started.elapsed());
            }
        }
        // Stopping: what the background lane wrote is made durable before the store
        // closes.
        let _ = self.sync();
    }

    /// Makes the background writes durable, if any are not.
    fn sync(&self) -> Result<(), DirectoryError> {
        if self.unsynced_since.get().is_none() {
            return Ok(());
        }
        match self.store.sync_directory() {
            Ok(()) => {
                self.unsynced_since.set(None);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "background directory changes could not be made durable");
                Err(DirectoryError::Store(e.to_string()))
            }
        }
    }

    /// How long the background lane rests after a batch that took `took`: nothing
    /// while mail is still, and enough to keep to its share while mail moves.
    fn rest_after(&self, took: std::time::Duration) -> std::time::Duration {
        let mail_moving = now_ms() - self.store.mail_active_at_ms() < MAIL_MOVING_WINDOW_MS;
        if !mail_moving {
            return std::time::Duration::ZERO;
        }
        let share = BACKGROUND_SHARE_WHILE_MAIL_MOVES;
        took.mul_f64((1.0 - share) / share).min(BACKGROUND_REST_MAX)
    }

    fn apply_batch(&self, batch: Vec<Request>, lane: Lane) {
        let base = self.current.load_full();
        let mut working = (*base).clone();
        let mut writes = Vec::new();
        let mut answers = Vec::with_capacity(batch.len());
        for request in batch {
            let results = if request.atomic {
                apply_atomic(&mut working, &mut writes, &request.changes)
            } else {
                request
                    .changes
                    .iter()
                    .map(|change| {
                        let (more, applied) = working.apply_in_place(change)?;
                        writes.extend(more);
                        Ok(applied)
                    })
                    .collect()
            };
            answers.push((request.reply, results, request.sync));
        }
        if !writes.is_empty() {
            // An administrator's change is durable when it is answered, and its commit's
            // fsync makes the background writes before it durable too (one WAL).
            let written = match lane {
                Lane::First => self.store.write_directory(&writes),
                Lane::Background => self.store.write_directory_background(&writes),
            };
            if let Err(e) = written {
                tracing::error!(error = %e, "directory changes could not be saved");
                let error = DirectoryError::Store(e.to_string());
                for (reply, results, _) in answers {
                    let failed = results
                        .into_iter()
                        .map(|r| r.and(Err(error.clone())))
                        .collect();
                    let _ = reply.send(failed);
                }
                return;
            }
            self.unsynced_since.set(match lane {
                Lane::First => None,
                Lane::Background => self
                    .unsynced_since
                    .get()
                    .or_else(|| Some(std::time::Instant::now())),
            });
            let generation = base.generation() + 1;
            self.current
                .store(Arc::new(working.with_generation(generation)));
            for (_, results, _) in &mut answers {
                for applied in results.iter_mut().flatten() {
                    applied.generation = generation;
                }
            }
            tracing::debug!(
                generation,
                rows = writes.len(),
                "published directory snapshot"
            );
        }
        let synced = if answers.iter().any(|(_, _, sync)| *sync) {
            self.sync()
        } else {
            Ok(())
        };
        for (reply, mut results, sync) in answers {
            if sync && let Err(e) = &synced {
                results = vec![Err(e.clone())];
            }
            let _ = reply.send(results);
        }
    }
}

/// Applies all of `changes` to `working`, or none of them.
fn apply_atomic(
    working: &mut Snapshot,
    writes: &mut Vec<DirectoryWrite>,
    changes: &[Change],
) -> Results {
    let mut trial = working.clone();
    let mut trial_writes = Vec::new();
    let mut results: Results = Vec::with_capacity(changes.len());
    let mut failed = false;
    for change in changes {
        match trial.apply_in_place(change) {
            Ok((more, applied)) => {
                trial_writes.extend(more);
                results.push(Ok(applied));
            }
            Err(e) => {
                failed = true;
                results.push(Err(e));
            }
        }
    }
    if failed {
        return results
            .into_iter()
            .map(|r| r.and(Err(DirectoryError::RolledBack)))
            .collect();
    }
    *working = trial;
    writes.extend(trial_writes);
    results
}

/// Applies `changes` to a private copy of `snapshot` without saving anything: the
/// results a real run would give (an import's dry run).
pub fn dry_run(snapshot: &Snapshot, changes: &[Change], atomic: bool) -> Results {
    let mut working = snapshot.clone();
    let mut writes = Vec::new();
    if atomic {
        return apply_atomic(&mut working, &mut writes, changes);
    }
    changes
        .iter()
        .map(|change| {
            let (_, applied) = working.apply_in_place(change)?;
            Ok(applied)
        })
        .collect()
}
