//! Start-up and shutdown orchestration of `mailroom serve`, in the three layers the
//! design names.
//!
//! - **Foundation**: the data folder's lock, the store (checkpointer, free-space guard),
//!   the directory and its writer, the watch registry.
//! - **Pipeline**: the spool writer, the inbound conversion workers, outbound delivery.
//! - **Listeners**: SMTP and submission, IMAP, POP3, TLS (and ACME), the admin API, the
//!   watchdog.
//!
//! Start-up goes up the layers, so that nothing accepts work before the part that takes
//! it over is running. Shutdown comes down them within one deadline: the listeners stop
//! accepting (open sessions get 421) and sessions waiting on the spool get their answer;
//! then the pipeline stops (delivery finishes or leaves its connection, the spool writer
//! drains, each conversion worker finishes its message); then the foundation. Each layer
//! has its own cancellation token, a child of the one below, so that a layer is never
//! told to stop before the layers above it. Whatever is not done by the deadline stays
//! queued and resumes at the next start.

use crate::config::Config;
use anyhow::{Context, bail};
use mailroom_admin::{AdminState, QueueGauges};
use mailroom_convert::{ConversionConfig, ConversionHook, ConversionStats, Workers};
use mailroom_directory::jobs::Jobs;
use mailroom_directory::login::{LoginLimiter, LoginLimits, Verifier};
use mailroom_directory::routing::{AddressSpace, Connector, ConnectorKind};
use mailroom_directory::{
    Change, Directory, RecipientFields, RecipientKind, SiteConfig, generate_password, hash_password,
};
use mailroom_imap::{ImapConfig, ImapServer, ImapStats};
use mailroom_pop3::{Pop3Config, Pop3Server, Pop3Stats};
use mailroom_queue::{Doorbell, Spool, SpoolConfig, SpoolStats};
use mailroom_smtp::{ListenerConfig, SmtpLimits, SmtpServer, SmtpStats};
use mailroom_store::{MailStore, SqliteStore, Topology};
use mailroom_watch::{Probe, Registry as WatchRegistry, Sample, Watchdog, now_ms};
use prometheus_client::registry::Registry;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// File in the data folder holding the admin API's URL.
pub const ADMIN_URL_FILE: &str = "admin.url";
/// File in the data folder holding the admin API's bearer token (owner-only).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
const LOCK_FILE: &str = "mailroom.lock";
const DATABASE_FILE: &str = "mailroom.db";

/// Things a test (never the config file) can add to a server.
#[derive(Default, Clone)]
pub struct ServerOptions {
    /// Run before every message's conversion; tests make it panic or block.
    pub conversion_hook: Option<ConversionHook>,
    /// The process's recent warnings and errors (a layer of its log subscriber, set by
    /// `mailroom serve`), shown on the web admin's dashboard.
    pub recent_log: Option<mailroom_web::recent::RecentLog>,
}

/// A running server.
pub struct RunningServer {
    /// Where SMTP listens (the real port when the config said 0).
    pub smtp_addr: SocketAddr,
    /// Where POP3 listens.
    pub pop3_addr: SocketAddr,
    /// Where IMAP listens.
    pub imap_addr: SocketAddr,
    /// Where IMAP over implicit TLS listens (none: its default port was taken).
    pub imaps_addr: Option<SocketAddr>,
    /// Where POP3 over implicit TLS listens (none: its default port was taken).
    pub pop3s_addr: Option<SocketAddr>,
    /// Where mail submission (STARTTLS + AUTH) listens (none: its default port was taken).
    pub submission_addr: Option<SocketAddr>,
    /// Where submission over implicit TLS listens (none: its default port was taken).
    pub submissions_addr: Option<SocketAddr>,
    /// The certificates every TLS listener serves.
    pub tls: Arc<mailroom_tls::Tls>,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// Where the admin listener serves HTTPS, unless its default port was taken.
    pub admin_tls_addr: Option<SocketAddr>,
    /// The admin API's bearer token.
    pub admin_token: String,
    /// The data folder.
    pub data_dir: PathBuf,
    /// The password of `postmaster@<domain>` when this start created it; shown once.
    pub postmaster_password: Option<String>,
    /// The store, for tests and tools in the same process.
    pub store: Arc<dyn MailStore>,
    /// The directory.
    pub directory: Directory,
    /// Probes, activities and the watchdog's verdict.
    pub watch: Arc<WatchRegistry>,
    shutdown_deadline: Duration,
    /// Foundation, pipeline, listeners; taken by the shutdown, which stops them in
    /// reverse.
    layers: Option<(Foundation, Pipeline, Listeners)>,
}

/// What a shutdown achieved, for the log and for tests.
#[derive(Debug, Clone)]
pub struct ShutdownReport {
    /// How long it took.
    pub elapsed: Duration,
    /// True when every part stopped before the deadline.
    pub clean: bool,
}

fn lock_data_dir(dir: &Path) -> anyhow::Result<File> {
    // Mail and password hashes live here: nothing this process creates is readable by
    // other local users, whatever umask it was started with.
    // SAFETY: umask only sets the process's file-creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the data folder {}", dir.display()))?;
    make_private(dir)?;
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if file.try_lock().is_err() {
        bail!(
            "another Mailroom is already running on the data folder {}; stop it or use --data",
            dir.display()
        );
    }
    Ok(file)
}

/// Makes the data folder owner-only (0700 for folders, 0600 for files), repairing
/// what an earlier start, a copy or a restore left open, and saying so in the log.
/// Symbolic links are not followed.
pub fn make_private(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut pending = vec![dir.to_path_buf()];
    let mut repaired = Vec::new();
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o777;
        let wanted = if meta.is_dir() { 0o700 } else { mode & 0o700 };
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(wanted)).with_context(
                || {
                    format!(
                        "{} is readable by other users (mode {mode:o}) and cannot be made private",
                        path.display()
                    )
                },
            )?;
            repaired.push(format!("{} ({mode:o} -> {wanted:o})", path.display()));
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)
                .with_context(|| format!("cannot read the folder {}", path.display()))?
            {
                pending.push(entry?.path());
            }
        }
    }
    if !repaired.is_empty() {
        tracing::warn!(
            files = %repaired.join(", "),
            "the data folder was readable by other users; made it owner-only"
        );
    }
    Ok(())
}

/// The admin token and URL files: owner-only, replaced whole (a CLI reading them while
/// the server starts never sees half a file).
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    mailroom_watch::durable::write_replacing(path, contents.as_bytes(), true)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn admin_token(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join(ADMIN_TOKEN_FILE);
    if let Ok(token) = std::fs::read_to_string(&path)
        && !token.trim().is_empty()
    {
        return Ok(token.trim().to_string());
    }
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no random source: {e}"))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, &token)?;
    Ok(token)
}

async fn ensure_postmaster(directory: &Directory, domain: &str) -> anyhow::Result<Option<String>> {
    let address = format!("postmaster@{domain}");
    let snapshot = directory.snapshot();
    if let Some(postmaster) = snapshot.by_address(&address) {
        // A data folder from before the administrator role: nobody has it yet, so
        // the postmaster gets it (as at a first start), or nobody could sign in to
        // the web admin.
        let anyone = snapshot.recipients().any(|r| r.admin);
        if !anyone && postmaster.kind == RecipientKind::Mailbox {
            directory
                .apply(Change::ModifyRecipient {
                    alias: postmaster.alias.clone(),
                    fields: RecipientFields {
                        admin: Some(true),
                        ..RecipientFields::default()
                    },
                })
                .await
                .context("cannot give the postmaster the administrator role")?;
        }
        return Ok(None);
    }
    let password = generate_password();
    let hash = {
        let password = password.clone();
        tokio::task::spawn_blocking(move || hash_password(&password)).await?
    };
    directory
        .apply(Change::CreateRecipient(RecipientFields {
            kind: Some(RecipientKind::Mailbox),
            alias: Some("postmaster".into()),
            display_name: Some("Postmaster".into()),
            addresses: Some(vec![address]),
            password_hash: Some(hash),
            admin: Some(true),
            ..RecipientFields::default()
        }))
        .await
        .context("cannot create the postmaster mailbox")?;
    Ok(Some(password))
}

/// The site settings of a new data folder: one connector for the Internet, as the
/// classic Internet Mail Service had (`SMTP:*`, cost 1, by DNS MX), and an SMTP site
/// addressing template `%m@<domain>` (Exchange always had one), so a mailbox created or
/// imported without an address gets `<alias>@<domain>`.
fn initial_site(domain: &str) -> SiteConfig {
    let mut site = SiteConfig::default();
    site.addressing.insert(
        "SMTP".into(),
        format!("%m@{}", domain.trim().to_ascii_lowercase()),
    );
    site.connectors.insert(
        "internet".into(),
        Connector {
            name: "internet".into(),
            kind: ConnectorKind::Mx,
            address_spaces: vec![AddressSpace::parse("SMTP:*", 1).expect("valid address space")],
            enabled: true,
            retry_minutes: None,
        },
    );
    site
}

/// The bottom layer: what every other part stands on. The data folder's lock, the
/// store (with its checkpointer and free-space guard), the directory, and the watch
/// registry with the metrics registry it reports into. Started first, stopped last.
struct Foundation {
    data_dir: PathBuf,
    store: Arc<dyn MailStore>,
    disk: Arc<mailroom_store::Disk>,
    directory: Directory,
    postmaster_password: Option<String>,
    watch: Arc<WatchRegistry>,
    jobs: Arc<Jobs>,
    /// Parent of the other layers' tokens; cancelled last (the free-space monitor).
    cancel: CancellationToken,
    /// Checkpoints the mail database's WAL off the write path; stops when dropped,
    /// after everything that writes.
    checkpointer: mailroom_store::Checkpointer,
    lock: File,
}

impl Foundation {
    async fn start(config: &Config, registry: &mut Registry) -> anyhow::Result<Foundation> {
        let data_dir = config.server.data_dir.clone();
        let lock = lock_data_dir(&data_dir)?;
        let durability = match config.storage.durability {
            crate::config::Durability::Full => mailroom_store::Durability::Full,
            crate::config::Durability::Normal => mailroom_store::Durability::Normal,
        };
        let sqlite = Arc::new(
            SqliteStore::open_with(&data_dir.join(DATABASE_FILE), durability)
                .with_context(|| format!("cannot open the database in {}", data_dir.display()))?,
        );
        let disk = mailroom_store::Disk::new(&data_dir, config.storage.free_space_reserve_bytes);
        sqlite.attach_disk(disk.clone());
        sqlite.set_tracking(config.tracking.enabled);
        let checkpointer = sqlite
            .start_checkpointer()
            .context("cannot start the checkpointer thread")?;
        let store: Arc<dyn MailStore> = sqlite.clone();
        // Uploads belong to import jobs, which do not survive a restart.
        let _ = std::fs::remove_dir_all(data_dir.join("uploads"));
        let released = store.release_claims()?;
        if released > 0 {
            tracing::info!(released, "released claims left by the previous run");
        }

        let mut domains = vec![config.server.domain.clone()];
        domains.extend(config.directory.accepted_domains.iter().cloned());
        let topology = Topology {
            organization: config.server.organization.clone(),
            site: config.server.site.clone(),
            server: if config.server.server_name.is_empty() {
                config.server.hostname.clone()
            } else {
                config.server.server_name.clone()
            },
        };
        // The writer thread stops by itself when the last directory handle is dropped.
        let (directory, _writer_thread) = Directory::start(
            store.clone(),
            &domains,
            &topology,
            initial_site(&config.server.domain),
        )?;
        let postmaster_password = ensure_postmaster(&directory, &config.server.domain).await?;

        let watch = Arc::new(WatchRegistry::default());
        if config.watchdog.deadlock_check_ms > 0 {
            watch.set_deadlock_report(mailroom_watch::start_deadlock_detector(
                Duration::from_millis(config.watchdog.deadlock_check_ms),
            ));
        }
        watch.add_probe(directory.probe());
        watch.add_activity(directory.activity());
        disk.attach(watch.condition("disk"), watch.condition("storage"));
        let jobs = Arc::new(Jobs::new(Some(watch.clone())));
        watch.add_probe(jobs.probe());
        sqlite.register_metrics(registry);
        disk.register(registry);

        let cancel = CancellationToken::new();
        {
            let cancel = cancel.clone();
            disk.start_monitor(Duration::from_secs(1), move || cancel.is_cancelled())?;
        }
        spawn_tracking_pruner(
            store.clone(),
            Duration::from_secs(u64::from(config.tracking.retention_days) * 86_400),
            cancel.clone(),
        );
        Ok(Foundation {
            data_dir,
            store,
            disk,
            directory,
            postmaster_password,
            watch,
            jobs,
            cancel,
            checkpointer,
            lock,
        })
    }

    /// Stops the free-space monitor, then the checkpointer (a last passive checkpoint),
    /// then releases the data folder's lock, in that order.
    fn stop(self) {
        self.cancel.cancel();
        drop(self.checkpointer);
        drop(self.lock);
    }
}

/// Tracking events removed per transaction: a short write turn, so mail never waits
/// long behind retention.
const TRACKING_PRUNE_BATCH: u32 = 2_000;

/// Removes tracking events older than `retention`: at start, then once a minute, in
/// batches of [`TRACKING_PRUNE_BATCH`] until none is left to remove.
fn spawn_tracking_pruner(
    store: Arc<dyn MailStore>,
    retention: Duration,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            while !cancel.is_cancelled() {
                let before = mailroom_watch::now_ms() - retention.as_millis() as i64;
                let store = store.clone();
                let removed = tokio::task::spawn_blocking(move || {
                    store.prune_tracking(before, TRACKING_PRUNE_BATCH)
                })
                .await;
                match removed {
                    Ok(Ok(n)) if n == u64::from(TRACKING_PRUNE_BATCH) => continue,
                    Ok(Ok(_)) => break,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot remove old tracking events; trying again in a minute");
                        break;
                    }
                    Err(_) => return,
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
        }
    });
}

/// Messages the spool writer may have handed to conversion and not yet taken, at
/// least (four conversion batches if that is more).
const HANDOFF_MESSAGES_MAX: usize = 128;

/// Body bytes it may hold so: what a slow conversion can make the server keep in
/// memory beyond the store. Larger messages are claimed from the store.
const HANDOFF_BYTES_MAX: usize = 16 << 20;

/// The middle layer: the mail's path between the listeners and the mailboxes. The
/// spool writer, the inbound conversion workers and outbound delivery, with the
/// doorbell that wakes them. Started before any listener accepts work for it, stopped
/// after the last session has had its answer.
struct Pipeline {
    spool: Option<Spool>,
    spool_thread: std::thread::JoinHandle<()>,
    workers: Workers,
    outbound: Option<mailroom_outbound::Outbound>,
    transfer: mailroom_queue::Transfer,
    /// DKIM keys: sign outbound mail of their From domain, and (the primary domain's)
    /// seal forwarded mail with ARC (the SMTP listener's inbound checks use them too).
    dkim_keys: Arc<mailroom_dkim::Signer>,
    /// Rung at shutdown so idle workers notice the cancellation at once.
    doorbell: Doorbell,
    cancel: CancellationToken,
}

impl Pipeline {
    fn start(
        config: &Config,
        foundation: &Foundation,
        options: ServerOptions,
        registry: &mut Registry,
    ) -> anyhow::Result<Pipeline> {
        let (store, watch) = (&foundation.store, &foundation.watch);
        let cancel = foundation.cancel.child_token();
        let spool_stats = SpoolStats::default();
        let conversion_stats = ConversionStats::default();
        spool_stats.register(registry);
        conversion_stats.register(registry);

        let doorbell = Doorbell::default();
        // Room for a few commits' worth of new mail between the spool writer and the
        // conversion workers (mailroom_queue::Handoff); beyond it, entries wait in the
        // store for a worker to claim them, as they always could.
        let handoff = mailroom_queue::Handoff::new(
            HANDOFF_MESSAGES_MAX.max(4 * config.conversion.batch_max),
            HANDOFF_BYTES_MAX,
        );
        let spool_config = SpoolConfig {
            group_commit: config.spool.group_commit,
            batch_messages_max: config.spool.batch_messages_max,
            batch_bytes_max: config.spool.batch_bytes_max,
            disk: Some(foundation.disk.clone()),
            commit_delay: Duration::from_micros(config.spool.commit_delay_us),
            commit_siblings: config.spool.commit_siblings,
            handoff: Some(handoff.clone()),
            ..SpoolConfig::default()
        };
        let (spool, spool_thread) =
            Spool::start(store.clone(), spool_config, doorbell.clone(), spool_stats)?;
        watch.add_probe(spool.probe());
        watch.add_activity(spool.activity());
        let conversion_probe = {
            let store = store.clone();
            Probe::sampled("inbound conversion", true, move || {
                let (depth, oldest_ms) = store.inbound_due(now_ms()).ok()?;
                Some(Sample { depth, oldest_ms })
            })
        };
        watch.add_probe(conversion_probe.clone());
        // Outbound delivery: entries due and not held, while the transfer mode delivers.
        // Its patience (set by the delivery workers) covers the longest wait for a next
        // hop's reply, so a slow remote server is not a stall but a wedge of ours is.
        let transfer = mailroom_queue::Transfer::new(config.outbound.transfer_mode);
        let clock = mailroom_outbound::schedule::Clock::default();
        let outbound_probe = {
            let (store, transfer, clock) = (store.clone(), transfer.clone(), clock.clone());
            Probe::sampled("outbound", true, move || {
                if !transfer.get().outbound() {
                    return Some(Sample::default());
                }
                let (depth, oldest_ms) = store.outbound_due(clock.now_ms()).ok()?;
                Some(Sample { depth, oldest_ms })
            })
        };
        watch.add_probe(outbound_probe.clone());

        let workers = if config.conversion.workers == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            config.conversion.workers
        };
        let workers = Workers::start(
            store.clone(),
            foundation.directory.clone(),
            doorbell.clone(),
            ConversionConfig {
                workers,
                time_budget: Duration::from_millis(config.conversion.time_budget_ms),
                attempts_max: config.conversion.attempts_max,
                retry_delay: Duration::from_millis(config.conversion.retry_delay_ms),
                batch_max: config.conversion.batch_max,
                ..ConversionConfig::default()
            },
            options.conversion_hook,
            cancel.clone(),
            conversion_stats,
            conversion_probe,
            Some(handoff),
        )?;
        for activity in workers.activities() {
            watch.add_activity(activity.clone());
        }

        let dkim_keys = Arc::new(mailroom_dkim::Signer::new(&foundation.data_dir));
        let outbound = mailroom_outbound::Outbound::start(
            mailroom_outbound::Parts {
                store: store.clone(),
                directory: foundation.directory.clone(),
                inbound_bell: doorbell.clone(),
                transfer: transfer.clone(),
                clock,
                probe: outbound_probe,
            },
            mailroom_outbound::OutboundConfig {
                dkim: Some(dkim_keys.clone()),
                tls: if config.outbound.starttls {
                    Some(Arc::new(outbound_roots(&config.outbound.tls_ca_files)?))
                } else {
                    None
                },
                ..config.outbound.delivery(&config.server.hostname)
            },
            registry,
        )
        .context("cannot start outbound delivery (check [outbound] nameservers)")?;
        Ok(Pipeline {
            spool: Some(spool),
            spool_thread,
            workers,
            outbound: Some(outbound),
            transfer,
            dkim_keys,
            doorbell,
            cancel,
        })
    }

    /// Stops outbound delivery (a connection in flight finishes or stays queued), lets
    /// the spool writer commit what is pending, and lets each conversion worker finish
    /// its message. Returns false when something was still running at `deadline`.
    async fn stop(mut self, deadline: Instant) -> bool {
        self.cancel.cancel();
        self.doorbell.ring(usize::MAX);
        if let Some(outbound) = self.outbound.take() {
            outbound
                .stop(deadline.saturating_duration_since(Instant::now()))
                .await;
        }
        // The last spool handle goes; the writer commits what is pending and stops.
        drop(self.spool.take());
        let spool_thread = self.spool_thread;
        let workers = self.workers;
        tokio::time::timeout_at(
            deadline.into(),
            tokio::task::spawn_blocking(move || {
                let _ = spool_thread.join();
                workers.join();
            }),
        )
        .await
        .is_ok()
    }
}

/// Where each listener ended up (the real port when the config said 0; none for an
/// implicit-TLS or submission listener whose default port was taken).
struct Addresses {
    smtp: SocketAddr,
    pop3: SocketAddr,
    imap: SocketAddr,
    imaps: Option<SocketAddr>,
    pop3s: Option<SocketAddr>,
    submission: Option<SocketAddr>,
    submissions: Option<SocketAddr>,
    admin: SocketAddr,
    admin_tls: Option<SocketAddr>,
}

/// The top layer: everything that takes work from outside. SMTP (with submission),
/// IMAP, POP3, TLS with its reloader and ACME, the admin API on its own thread, and
/// the watchdog that watches them all. Started last; stopped first, so that nothing
/// new arrives while the layers below drain.
struct Listeners {
    addresses: Addresses,
    tls: Arc<mailroom_tls::Tls>,
    admin_token: String,
    sessions: TaskTracker,
    /// Fires when the admin API's thread has finished.
    admin_task: tokio::sync::oneshot::Receiver<()>,
    cancel: CancellationToken,
}

impl Listeners {
    async fn start(
        config: &Config,
        foundation: &Foundation,
        pipeline: &Pipeline,
        mut registry: Registry,
        recent_log: mailroom_web::recent::RecentLog,
    ) -> anyhow::Result<Listeners> {
        let (store, directory, watch) =
            (&foundation.store, &foundation.directory, &foundation.watch);
        let data_dir = &foundation.data_dir;
        let cancel = pipeline.cancel.child_token();
        let smtp_stats = SmtpStats {
            tasks: watch.tasks().clone(),
            ..SmtpStats::default()
        };
        let pop3_stats = Pop3Stats {
            tasks: watch.tasks().clone(),
            ..Pop3Stats::default()
        };
        let imap_stats = ImapStats {
            tasks: watch.tasks().clone(),
            ..ImapStats::default()
        };
        let queue_gauges = QueueGauges::default();
        smtp_stats.register(&mut registry);
        pop3_stats.register(&mut registry);
        imap_stats.register(&mut registry);
        queue_gauges.register(&mut registry);
        watch.register(&mut registry);
        {
            // The watchdog stops watching when the server starts to stop: the
            // listeners' heartbeats end then, which is no stall.
            let cancel = cancel.clone();
            Watchdog::start(
                watch.clone(),
                Duration::from_millis(config.watchdog.stall_after_ms),
                Duration::from_millis(config.watchdog.check_interval_ms),
                move || cancel.is_cancelled(),
            )?;
        }

        let bound = Bound::bind(config).await?;
        let tls = start_tls(config, data_dir, &cancel).await?;
        mailroom_tls::spawn_reloader(tls.clone(), cancel.clone());
        let addresses = bound.addresses()?;
        let admin_token = admin_token(data_dir)?;
        write_private(
            &data_dir.join(ADMIN_URL_FILE),
            &format!("http://{}", addresses.admin),
        )?;

        let limiter = Arc::new(LoginLimiter::new(LoginLimits {
            per_client: config.login.failures_per_client,
            per_account: config.login.failures_per_account,
            window: Duration::from_secs(config.login.failure_window_secs),
        }));
        // Password checks run on a few threads of their own (bounded memory and CPU).
        let verifier = Arc::new(Verifier::start(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        )?);
        let smtp = SmtpServer::new(
            SmtpLimits {
                hostname: config.server.hostname.clone(),
                primary_domain: config.server.domain.clone(),
                message_size_max: config.smtp.message_size_max_bytes,
                header_size_max: config.smtp.header_size_max_bytes,
                recipients_max: config.smtp.recipients_per_message_max,
                line_length_max: config.smtp.command_line_length_max_bytes,
                errors_max: config.smtp.errors_per_session_max,
            },
            ListenerConfig {
                sessions_max: config.smtp.sessions_max,
                sessions_per_client_max: config.smtp.sessions_per_client_max,
                idle_timeout: Duration::from_secs(config.smtp.idle_timeout_secs),
                session_duration_max: Duration::from_secs(config.smtp.session_duration_max_secs),
                relay_networks: config.smtp.relay_networks.clone(),
                test_spin_command: config.smtp.test_spin_command,
                data_in_memory_max: config.smtp.data_in_memory_max_bytes,
            },
            directory.clone(),
            pipeline
                .spool
                .clone()
                .context("the spool is running while listeners start")?,
            smtp_stats,
        )
        .with_quotas(store.clone())
        .with_disk(foundation.disk.clone())
        .with_admission({
            let transfer = pipeline.transfer.clone();
            Arc::new(move || transfer.get().inbound())
        })
        .with_tls(tls.clone())
        .with_submission_limits(mailroom_smtp::SubmissionLimits {
            per_user_per_hour: config.smtp.submission_per_user_per_hour,
            per_client_per_hour: config.smtp.submission_per_client_per_hour,
        })
        .with_logins(mailroom_smtp::Logins {
            limiter: limiter.clone(),
            verifier: verifier.clone(),
            plaintext: config.login.plaintext_auth,
        });
        let smtp = if config.inbound_checks.enabled {
            let checker = mailroom_smtp::checks::Checker::new(
                &config.outbound.nameservers,
                config.inbound_checks.policy(),
                &config.server.hostname,
            )
            .map_err(|e| anyhow::anyhow!("inbound_checks: {e}"))?
            .with_sealer(pipeline.dkim_keys.clone(), &config.server.domain);
            smtp.with_checks(Arc::new(checker))
        } else {
            smtp
        };
        let sessions = TaskTracker::new();
        tokio::spawn(
            smtp.clone()
                .serve(bound.smtp, cancel.clone(), sessions.clone()),
        );
        if let Some(listener) = bound.submission {
            tokio::spawn(smtp.clone().serve_mode(
                listener,
                cancel.clone(),
                sessions.clone(),
                mailroom_smtp::Mode::Submission,
            ));
        }
        if let Some(listener) = bound.submissions {
            tokio::spawn(smtp.serve_mode(
                listener,
                cancel.clone(),
                sessions.clone(),
                mailroom_smtp::Mode::Submissions,
            ));
        }

        let plaintext = config.login.plaintext_auth;
        let pop3 = Pop3Server::new(
            Pop3Config {
                hostname: config.server.hostname.clone(),
                sessions_max: config.pop3.sessions_max,
                sessions_per_client_max: config.pop3.sessions_per_client_max,
                idle_timeout: Duration::from_secs(config.pop3.idle_timeout_secs),
                plaintext,
                command_line_max: config.pop3.command_line_max_bytes,
            },
            directory.clone(),
            store.clone(),
            limiter.clone(),
            verifier.clone(),
            pop3_stats,
        )
        .with_tls(tls.clone());
        tokio::spawn(
            pop3.clone()
                .serve(bound.pop3, cancel.clone(), sessions.clone()),
        );
        if let Some(listener) = bound.pop3s {
            tokio::spawn(pop3.serve_tls(listener, cancel.clone(), sessions.clone()));
        }
        let imap = ImapServer::new(
            ImapConfig {
                hostname: config.server.hostname.clone(),
                sessions_max: config.imap.sessions_max,
                sessions_per_client_max: config.imap.sessions_per_client_max,
                command_before_login_max: config.imap.command_before_login_max_bytes,
                idle_timeout: Duration::from_secs(config.imap.idle_timeout_secs),
                plaintext,
                append_limit: config.imap.append_limit_bytes,
                literals_in_memory_max: config.imap.literals_in_memory_max_bytes,
                command_line_max: config.imap.command_line_max_bytes,
                folder_name_max: config.imap.folder_name_max_bytes,
                parse_limits: mailroom_imap::parse::ParseLimits {
                    search_depth_max: config.imap.search_depth_max,
                    list_pattern_max_bytes: config.imap.list_pattern_max_bytes,
                    list_patterns_max: config.imap.list_patterns_max,
                },
            },
            directory.clone(),
            store.clone(),
            limiter.clone(),
            verifier.clone(),
            imap_stats,
        )
        .with_tls(tls.clone());
        tokio::spawn(
            imap.clone()
                .serve(bound.imap, cancel.clone(), sessions.clone()),
        );
        if let Some(listener) = bound.imaps {
            tokio::spawn(imap.serve_tls(listener, cancel.clone(), sessions.clone()));
        }

        let admin_state = Arc::new(AdminState {
            store: store.clone(),
            directory: directory.clone(),
            registry,
            queue_gauges,
            token: admin_token.clone(),
            jobs: foundation.jobs.clone(),
            watch: watch.clone(),
            upload_dir: data_dir.join("uploads"),
            import_size_max: config.admin.import_size_max_bytes,
            outbound: pipeline
                .outbound
                .as_ref()
                .context("outbound delivery is running while listeners start")?
                .handle(),
            transfer: pipeline.transfer.clone(),
            test_clock: config.outbound.test_clock,
        });
        // The web admin answers under the listener's own address, `localhost` with its
        // port, and the names the config adds (DNS rebinding: a foreign name is refused).
        let mut hosts = Vec::new();
        for address in std::iter::once(addresses.admin).chain(addresses.admin_tls) {
            hosts.push(address.to_string());
            hosts.push(format!("localhost:{}", address.port()));
        }
        hosts.extend(config.admin.web_hosts.iter().cloned());
        let web_sessions = Arc::new(mailroom_web::session::Sessions::default());
        let app_for = |tls: bool| {
            let web_state = Arc::new(mailroom_web::WebState {
                admin: admin_state.clone(),
                limiter: limiter.clone(),
                verifier: verifier.clone(),
                hosts: hosts.clone(),
                tls,
                plaintext: config.login.plaintext_auth,
                sessions: web_sessions.clone(),
                recent: recent_log.clone(),
            });
            mailroom_admin::router(admin_state.clone()).merge(mailroom_web::router(web_state))
        };
        let app = app_for(false);
        let https = match bound.admin_tls {
            Some(listener) => Some((listener.into_std()?, tls.clone(), app_for(true))),
            None => None,
        };
        let heartbeat_every =
            Duration::from_millis(config.watchdog.check_interval_ms.clamp(10, 250));
        let admin_task = spawn_admin(
            bound.admin.into_std()?,
            app,
            https,
            mailroom_admin::ConnectionLimits {
                connections_max: config.admin.connections_max,
                idle_timeout: Duration::from_millis(config.admin.idle_timeout_ms),
            },
            watch.tasks().heartbeat("admin"),
            heartbeat_every,
            cancel.clone(),
        )?;
        mailroom_listen::spawn_heartbeat(
            watch.tasks().heartbeat("protocols"),
            heartbeat_every,
            cancel.clone(),
        );
        Ok(Listeners {
            addresses,
            tls,
            admin_token,
            sessions,
            admin_task,
            cancel,
        })
    }

    /// Stops accepting (open sessions get 421), and waits until `deadline` for the
    /// sessions still waiting on the spool to get their answer and for the admin API's
    /// thread. Returns false when something was still running at `deadline`.
    async fn stop(mut self, deadline: Instant) -> bool {
        self.cancel.cancel();
        self.sessions.close();
        let sessions_done = tokio::time::timeout_at(deadline.into(), self.sessions.wait())
            .await
            .is_ok();
        let admin_done = tokio::time::timeout_at(deadline.into(), &mut self.admin_task)
            .await
            .is_ok();
        sessions_done && admin_done
    }
}

/// The listening sockets, bound before anything is served on them, so that an address
/// in use stops the start-up with the setting's name before any session begins.
struct Bound {
    smtp: TcpListener,
    imap: TcpListener,
    pop3: TcpListener,
    imaps: Option<TcpListener>,
    submission: Option<TcpListener>,
    submissions: Option<TcpListener>,
    pop3s: Option<TcpListener>,
    admin: TcpListener,
    admin_tls: Option<TcpListener>,
}

impl Bound {
    async fn bind(config: &Config) -> anyhow::Result<Bound> {
        Ok(Bound {
            smtp: bind_listener(config.smtp.listen, "SMTP", "smtp.listen / --smtp").await?,
            imap: bind_listener(config.imap.listen, "IMAP", "imap.listen / --imap").await?,
            pop3: bind_listener(config.pop3.listen, "POP3", "pop3.listen / --pop3").await?,
            imaps: bind_tls_listener(
                config.imap.tls_listen,
                crate::config::DEFAULT_IMAPS,
                "IMAPS",
                "imap.tls_listen / --imaps",
            )
            .await?,
            submission: bind_tls_listener(
                config.smtp.submission_listen,
                crate::config::DEFAULT_SUBMISSION,
                "submission",
                "smtp.submission_listen / --submission",
            )
            .await?,
            submissions: bind_tls_listener(
                config.smtp.submissions_listen,
                crate::config::DEFAULT_SUBMISSIONS,
                "SMTPS",
                "smtp.submissions_listen / --smtps",
            )
            .await?,
            pop3s: bind_tls_listener(
                config.pop3.tls_listen,
                crate::config::DEFAULT_POP3S,
                "POP3S",
                "pop3.tls_listen / --pop3s",
            )
            .await?,
            admin: bind_listener(
                config.admin.listen,
                "the admin API",
                "admin.listen / --admin",
            )
            .await?,
            admin_tls: bind_tls_listener(
                config.admin.tls_listen,
                crate::config::DEFAULT_ADMIN_TLS,
                "the admin API over HTTPS",
                "admin.tls_listen",
            )
            .await?,
        })
    }

    fn addresses(&self) -> anyhow::Result<Addresses> {
        let optional = |listener: &Option<TcpListener>| -> std::io::Result<Option<SocketAddr>> {
            listener.as_ref().map(|l| l.local_addr()).transpose()
        };
        Ok(Addresses {
            smtp: self.smtp.local_addr()?,
            pop3: self.pop3.local_addr()?,
            imap: self.imap.local_addr()?,
            imaps: optional(&self.imaps)?,
            pop3s: optional(&self.pop3s)?,
            submission: optional(&self.submission)?,
            submissions: optional(&self.submissions)?,
            admin: self.admin.local_addr()?,
            admin_tls: optional(&self.admin_tls)?,
        })
    }
}

/// The certificates every TLS listener serves: the configured files, or ACME (with its
/// HTTP-01 responder) when `[tls.acme]` is on.
async fn start_tls(
    config: &Config,
    data_dir: &Path,
    cancel: &CancellationToken,
) -> anyhow::Result<Arc<mailroom_tls::Tls>> {
    if !config.tls.acme.enabled() {
        let files = config.tls.certificate_files();
        return mailroom_tls::Tls::start(&files, data_dir, &config.server.hostname)
            .context("cannot set up TLS (check [tls] certificates)");
    }
    let acme = &config.tls.acme;
    let tls = mailroom_tls::Tls::start_acme(data_dir, &config.server.hostname)
        .context("cannot set up TLS for ACME (check <data_dir>/tls/acme)")?;
    let http = TcpListener::bind(acme.http_listen).await.with_context(|| {
        format!(
            "cannot listen for ACME HTTP-01 challenges on {} (tls.acme.http_listen)",
            acme.http_listen
        )
    })?;
    let challenges = mailroom_tls::acme::Challenges::default();
    mailroom_tls::acme::serve_http01(http, challenges.clone(), cancel.clone());
    let names = if acme.names.is_empty() {
        vec![config.server.hostname.clone()]
    } else {
        acme.names.clone()
    };
    mailroom_tls::acme::spawn_acme(
        tls.clone(),
        mailroom_tls::acme::AcmeSettings {
            directory: acme.directory_url(),
            contact: acme.contact.clone(),
            names,
            ca_file: acme.ca_file.clone(),
            data_dir: data_dir.to_path_buf(),
        },
        challenges,
        cancel.clone(),
    );
    Ok(tls)
}

/// Runs the admin API (and so /health) on a runtime of its own, on its own thread: a
/// session that wedges a thread of the protocol runtime must not silence the one place
/// that reports it. The receiver fires when the thread has finished.
fn spawn_admin(
    listener: std::net::TcpListener,
    app: axum::Router,
    https: Option<(std::net::TcpListener, Arc<mailroom_tls::Tls>, axum::Router)>,
    limits: mailroom_admin::ConnectionLimits,
    beat: Arc<mailroom_watch::Heartbeat>,
    heartbeat_every: Duration,
    cancel: CancellationToken,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<()>> {
    let (done_tx, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            // Mail first: the administrator's requests (and the directory work they
            // start) take what mail flow leaves of the CPU; see mailroom_watch::priority.
            mailroom_watch::lower_thread_priority(mailroom_watch::DIRECTORY_WRITER_NICE);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("admin-rt")
                .on_thread_start(|| {
                    mailroom_watch::lower_thread_priority(mailroom_watch::DIRECTORY_WRITER_NICE)
                })
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the admin API's runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                mailroom_listen::spawn_heartbeat(beat, heartbeat_every, cancel.clone());
                let listener = match TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(e) => {
                        tracing::error!(error = %e, "admin API stopped");
                        return;
                    }
                };
                if let Some((listener, tls, app)) = https {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            tokio::spawn(mailroom_admin::serve(
                                listener,
                                Some(tls),
                                app,
                                limits,
                                cancel.clone(),
                            ));
                        }
                        Err(e) => tracing::error!(error = %e, "admin HTTPS not started"),
                    }
                }
                mailroom_admin::serve(listener, None, app, limits, cancel).await;
            });
            // Handlers still running (a long export) do not hold up shutdown.
            runtime.shutdown_background();
            let _ = done_tx.send(());
        })?;
    Ok(done)
}

/// Starts every part of the server, layer by layer: the foundation, the pipeline, then
/// the listeners; see the module documentation for why in that order.
pub async fn start(config: Config, options: ServerOptions) -> anyhow::Result<RunningServer> {
    config.check()?;
    let mut config = config;
    config.server.hostname = config.server.effective_hostname();
    let mut registry = Registry::default();
    let foundation = Foundation::start(&config, &mut registry).await?;
    let recent_log = options.recent_log.clone().unwrap_or_default();
    let pipeline = Pipeline::start(&config, &foundation, options, &mut registry)?;
    let listeners = Listeners::start(&config, &foundation, &pipeline, registry, recent_log).await?;
    let a = &listeners.addresses;
    Ok(RunningServer {
        smtp_addr: a.smtp,
        pop3_addr: a.pop3,
        imap_addr: a.imap,
        imaps_addr: a.imaps,
        pop3s_addr: a.pop3s,
        submission_addr: a.submission,
        submissions_addr: a.submissions,
        admin_addr: a.admin,
        admin_tls_addr: a.admin_tls,
        tls: listeners.tls.clone(),
        admin_token: listeners.admin_token.clone(),
        data_dir: foundation.data_dir.clone(),
        postmaster_password: foundation.postmaster_password.clone(),
        store: foundation.store.clone(),
        directory: foundation.directory.clone(),
        watch: foundation.watch.clone(),
        shutdown_deadline: Duration::from_millis(config.server.shutdown_deadline_ms),
        layers: Some((foundation, pipeline, listeners)),
    })
}

impl RunningServer {
    /// Stops the layers in reverse, within the configured deadline: the listeners
    /// (sessions get their answers), the pipeline (spool drained, conversion and
    /// delivery finish their message), then the foundation. See the module docs.
    pub async fn shutdown(mut self) -> ShutdownReport {
        let started = Instant::now();
        let deadline = started + self.shutdown_deadline;
        let mut clean = true;
        if let Some((foundation, pipeline, listeners)) = self.layers.take() {
            clean &= listeners.stop(deadline).await;
            clean &= pipeline.stop(deadline).await;
            foundation.stop();
        }
        let report = ShutdownReport {
            elapsed: started.elapsed(),
            clean,
        };
        tracing::info!(
            elapsed_ms = report.elapsed.as_millis() as u64,
            clean = report.clean,
            "shutdown finished"
        );
        report
    }
}

/// Binds a listener every server has; an address that cannot be bound stops the
/// start-up, naming the setting.
async fn bind_listener(
    address: SocketAddr,
    name: &str,
    setting: &str,
) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen for {name} on {address} ({setting})"))
}

/// Binds an implicit-TLS listener. A configured address that cannot be bound stops the
/// start-up like every listener; the embedded default (`default`) being taken (another
/// server on this machine, parallel tests) only skips it, with a warning that names the
/// setting.
async fn bind_tls_listener(
    address: SocketAddr,
    default: &str,
    name: &str,
    setting: &str,
) -> anyhow::Result<Option<TcpListener>> {
    match TcpListener::bind(address).await {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && address.to_string() == default => {
            tracing::warn!(%address, "{name} not started: its default address is in use (set {setting})");
            Ok(None)
        }
        Err(e) => {
            Err(e).with_context(|| format!("cannot listen for {name} on {address} ({setting})"))
        }
    }
}

/// The roots outbound TLS trusts: the system's bundle when there is one, and the
/// configured PEM files (a file that does not load stops the start-up, naming it).
fn outbound_roots(extra: &[PathBuf]) -> anyhow::Result<mailroom_outbound::client::ClientTls> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let system = std::path::Path::new("/etc/ssl/certs/ca-certificates.crt");
    if system.exists() {
        for cert in CertificateDer::pem_file_iter(system)
            .with_context(|| format!("cannot read {}", system.display()))?
            .flatten()
        {
            // A certificate the bundle holds but webpki cannot use is skipped.
            let _ = roots.add(cert);
        }
    }
    for path in extra {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .with_context(|| format!("outbound.tls_ca_files: cannot read {}", path.display()))?;
        for cert in certs {
            roots.add(cert).with_context(|| {
                format!(
                    "outbound.tls_ca_files: {} holds an unusable certificate",
                    path.display()
                )
            })?;
        }
    }
    Ok(mailroom_outbound::client::ClientTls {
        roots: Arc::new(roots),
    })
}
