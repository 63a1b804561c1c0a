//! Start-up and shutdown orchestration of `mailroom serve`.
//!
//! Start-up order follows the mail's path backwards, so that nothing accepts work before
//! the part that takes it over is running: store, directory, spool writer, conversion
//! workers, then the listeners. Shutdown runs it forwards, within one deadline: stop the
//! listeners (open sessions get 421), let sessions that wait on the spool get their
//! answer, let the spool writer drain, let each conversion worker finish its message.
//! Whatever is not done by the deadline stays queued and resumes at the next start.

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
use mailroom_pop3::{PlaintextPolicy, Pop3Config, Pop3Server, Pop3Stats};
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
    cancel: CancellationToken,
    sessions: TaskTracker,
    /// Fires when the admin API's thread has finished.
    admin_task: tokio::sync::oneshot::Receiver<()>,
    spool: Option<Spool>,
    spool_thread: std::thread::JoinHandle<()>,
    workers: Workers,
    /// Outbound delivery workers.
    outbound: Option<mailroom_outbound::Outbound>,
    /// Rung at shutdown so idle workers notice the cancellation at once.
    doorbell: Doorbell,
    shutdown_deadline: Duration,
    /// Checkpoints the mail database's WAL off the write path; stops when dropped,
    /// after everything that writes.
    _checkpointer: mailroom_store::Checkpointer,
    _lock: File,
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

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
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
    if directory.snapshot().by_address(&address).is_some() {
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

/// Starts every part of the server; see the module documentation for the order.
pub async fn start(config: Config, options: ServerOptions) -> anyhow::Result<RunningServer> {
    config.check()?;
    let mut config = config;
    config.server.hostname = config.server.effective_hostname();
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

    let mut registry = Registry::default();
    let spool_stats = SpoolStats::default();
    let conversion_stats = ConversionStats::default();
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
    sqlite.register_metrics(&mut registry);
    disk.register(&mut registry);
    spool_stats.register(&mut registry);
    conversion_stats.register(&mut registry);
    smtp_stats.register(&mut registry);
    pop3_stats.register(&mut registry);
    imap_stats.register(&mut registry);
    queue_gauges.register(&mut registry);

    let doorbell = Doorbell::default();
    let shutdown_bell = doorbell.clone();
    let spool_config = SpoolConfig {
        group_commit: config.spool.group_commit,
        batch_messages_max: config.spool.batch_messages_max,
        batch_bytes_max: config.spool.batch_bytes_max,
        disk: Some(disk.clone()),
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
    // Outbound delivery: entries due and not held, while the transfer mode delivers. Its
    // patience (set by the delivery workers) covers the longest wait for a next hop's
    // reply, so a slow remote server is not a stall but a wedge of ours is.
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

    let cancel = CancellationToken::new();
    let workers = if config.conversion.workers == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        config.conversion.workers
    };
    let dsn_bell = doorbell.clone();
    let workers = Workers::start(
        store.clone(),
        directory.clone(),
        doorbell,
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
    )?;
    for activity in workers.activities() {
        watch.add_activity(activity.clone());
    }
    let jobs = Arc::new(Jobs::new(Some(watch.clone())));
    watch.add_probe(jobs.probe());
    watch.register(&mut registry);
    {
        let cancel = cancel.clone();
        Watchdog::start(
            watch.clone(),
            Duration::from_millis(config.watchdog.stall_after_ms),
            Duration::from_millis(config.watchdog.check_interval_ms),
            move || cancel.is_cancelled(),
        )?;
    }
    {
        let cancel = cancel.clone();
        disk.start_monitor(Duration::from_secs(1), move || cancel.is_cancelled())?;
    }

    let smtp_listener = TcpListener::bind(config.smtp.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for SMTP on {} (smtp.listen / --smtp)",
                config.smtp.listen
            )
        })?;
    let imap_listener = TcpListener::bind(config.imap.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for IMAP on {} (imap.listen / --imap)",
                config.imap.listen
            )
        })?;
    let pop3_listener = TcpListener::bind(config.pop3.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for POP3 on {} (pop3.listen / --pop3)",
                config.pop3.listen
            )
        })?;
    let imaps_listener = bind_tls_listener(
        config.imap.tls_listen,
        crate::config::DEFAULT_IMAPS,
        "IMAPS",
        "imap.tls_listen / --imaps",
    )
    .await?;
    let submission_listener = bind_tls_listener(
        config.smtp.submission_listen,
        crate::config::DEFAULT_SUBMISSION,
        "submission",
        "smtp.submission_listen / --submission",
    )
    .await?;
    let submissions_listener = bind_tls_listener(
        config.smtp.submissions_listen,
        crate::config::DEFAULT_SUBMISSIONS,
        "SMTPS",
        "smtp.submissions_listen / --smtps",
    )
    .await?;
    let pop3s_listener = bind_tls_listener(
        config.pop3.tls_listen,
        crate::config::DEFAULT_POP3S,
        "POP3S",
        "pop3.tls_listen / --pop3s",
    )
    .await?;
    let tls_files: Vec<mailroom_tls::CertificateFiles> = config
        .tls
        .certificates
        .iter()
        .map(|pair| mailroom_tls::CertificateFiles {
            cert: pair.cert.clone(),
            key: pair.key.clone(),
        })
        .collect();
    let tls = if config.tls.acme.enabled() {
        let acme = &config.tls.acme;
        let tls = mailroom_tls::Tls::start_acme(&data_dir, &config.server.hostname)
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
                data_dir: data_dir.clone(),
            },
            challenges,
            cancel.clone(),
        );
        tls
    } else {
        mailroom_tls::Tls::start(&tls_files, &data_dir, &config.server.hostname)
            .context("cannot set up TLS (check [tls] certificates)")?
    };
    mailroom_tls::spawn_reloader(tls.clone(), cancel.clone());
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for the admin API on {} (admin.listen / --admin)",
                config.admin.listen
            )
        })?;
    // DKIM keys: sign outbound mail of their From domain, and (the primary domain's)
    // seal forwarded mail with ARC.
    let dkim_keys = Arc::new(mailroom_dkim::Signer::new(&data_dir));
    let outbound = mailroom_outbound::Outbound::start(
        mailroom_outbound::Parts {
            store: store.clone(),
            directory: directory.clone(),
            inbound_bell: dsn_bell,
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
        &mut registry,
    )
    .context("cannot start outbound delivery (check [outbound] nameservers)")?;
    let smtp_addr = smtp_listener.local_addr()?;
    let pop3_addr = pop3_listener.local_addr()?;
    let imap_addr = imap_listener.local_addr()?;
    let imaps_addr = match &imaps_listener {
        Some(listener) => Some(listener.local_addr()?),
        None => None,
    };
    let pop3s_addr = match &pop3s_listener {
        Some(listener) => Some(listener.local_addr()?),
        None => None,
    };
    let submission_addr = match &submission_listener {
        Some(listener) => Some(listener.local_addr()?),
        None => None,
    };
    let submissions_addr = match &submissions_listener {
        Some(listener) => Some(listener.local_addr()?),
        None => None,
    };
    let admin_addr = admin_listener.local_addr()?;

    let admin_token = admin_token(&data_dir)?;
    write_private(
        &data_dir.join(ADMIN_URL_FILE),
        &format!("http://{admin_addr}"),
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
        spool.clone(),
        smtp_stats,
    )
    .with_quotas(store.clone())
    .with_disk(disk.clone())
    .with_admission({
        let transfer = transfer.clone();
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
        plaintext: config.login.plaintext_auth.into(),
    });
    let smtp = if config.inbound_checks.enabled {
        let checker = mailroom_smtp::checks::Checker::new(
            &config.outbound.nameservers,
            config.inbound_checks.policy(),
            &config.server.hostname,
        )
        .map_err(|e| anyhow::anyhow!("inbound_checks: {e}"))?
        .with_sealer(dkim_keys.clone(), &config.server.domain);
        smtp.with_checks(Arc::new(checker))
    } else {
        smtp
    };
    let sessions = TaskTracker::new();
    tokio::spawn(
        smtp.clone()
            .serve(smtp_listener, cancel.clone(), sessions.clone()),
    );
    if let Some(listener) = submission_listener {
        tokio::spawn(smtp.clone().serve_mode(
            listener,
            cancel.clone(),
            sessions.clone(),
            mailroom_smtp::Mode::Submission,
        ));
    }
    if let Some(listener) = submissions_listener {
        tokio::spawn(smtp.serve_mode(
            listener,
            cancel.clone(),
            sessions.clone(),
            mailroom_smtp::Mode::Submissions,
        ));
    }

    let plaintext: PlaintextPolicy = config.login.plaintext_auth.into();
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
            .serve(pop3_listener, cancel.clone(), sessions.clone()),
    );
    if let Some(listener) = pop3s_listener {
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
            .serve(imap_listener, cancel.clone(), sessions.clone()),
    );
    if let Some(listener) = imaps_listener {
        tokio::spawn(imap.serve_tls(listener, cancel.clone(), sessions.clone()));
    }

    let admin_state = Arc::new(AdminState {
        store: store.clone(),
        directory: directory.clone(),
        registry,
        queue_gauges,
        token: admin_token.clone(),
        jobs,
        watch: watch.clone(),
        upload_dir: data_dir.join("uploads"),
        import_size_max: config.admin.import_size_max_bytes,
        outbound: outbound.handle(),
        transfer: transfer.clone(),
        test_clock: config.outbound.test_clock,
    });
    // The admin API (and so /health) runs on a runtime of its own, on its own thread:
    // a session that wedges a thread of the protocol runtime must not silence the one
    // place that reports it.
    let admin_cancel = cancel.clone();
    let (admin_done_tx, admin_task) = tokio::sync::oneshot::channel();
    let admin_listener = admin_listener.into_std()?;
    let admin_beat = watch.tasks().heartbeat("admin");
    let heartbeat_every = Duration::from_millis(config.watchdog.check_interval_ms.clamp(10, 250));
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("admin-rt")
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
                mailroom_listen::spawn_heartbeat(admin_beat, heartbeat_every, admin_cancel.clone());
                let listener = match TcpListener::from_std(admin_listener) {
                    Ok(listener) => listener,
                    Err(e) => {
                        tracing::error!(error = %e, "admin API stopped");
                        return;
                    }
                };
                if let Err(e) = mailroom_admin::serve(listener, admin_state, admin_cancel).await {
                    tracing::error!(error = %e, "admin API stopped");
                }
            });
            // Handlers still running (a long export) do not hold up shutdown.
            runtime.shutdown_background();
            let _ = admin_done_tx.send(());
        })?;
    mailroom_listen::spawn_heartbeat(
        watch.tasks().heartbeat("protocols"),
        heartbeat_every,
        cancel.clone(),
    );

    Ok(RunningServer {
        smtp_addr,
        pop3_addr,
        imap_addr,
        imaps_addr,
        pop3s_addr,
        submission_addr,
        submissions_addr,
        tls,
        admin_addr,
        admin_token,
        data_dir,
        postmaster_password,
        store,
        directory,
        watch,
        cancel,
        sessions,
        admin_task,
        spool: Some(spool),
        spool_thread,
        workers,
        outbound: Some(outbound),
        doorbell: shutdown_bell,
        shutdown_deadline: Duration::from_millis(config.server.shutdown_deadline_ms),
        _checkpointer: checkpointer,
        _lock: lock,
    })
}

impl RunningServer {
    /// Stops everything within the configured deadline; see the module documentation.
    pub async fn shutdown(mut self) -> ShutdownReport {
        let started = Instant::now();
        let deadline = started + self.shutdown_deadline;
        self.cancel.cancel();
        self.doorbell.ring(usize::MAX);
        self.sessions.close();
        if let Some(outbound) = self.outbound.take() {
            outbound
                .stop(deadline.saturating_duration_since(Instant::now()))
                .await;
        }
        let sessions_done = tokio::time::timeout_at(deadline.into(), self.sessions.wait())
            .await
            .is_ok();
        // The last spool handle goes; the writer commits what is pending and stops.
        drop(self.spool.take());
        let spool_thread = self.spool_thread;
        let workers = self.workers;
        let threads_done = tokio::time::timeout_at(
            deadline.into(),
            tokio::task::spawn_blocking(move || {
                let _ = spool_thread.join();
                workers.join();
            }),
        )
        .await
        .is_ok();
        let admin_done = tokio::time::timeout_at(deadline.into(), &mut self.admin_task)
            .await
            .is_ok();
        let report = ShutdownReport {
            elapsed: started.elapsed(),
            clean: sessions_done && threads_done && admin_done,
        };
        tracing::info!(
            elapsed_ms = report.elapsed.as_millis() as u64,
            clean = report.clean,
            "shutdown finished"
        );
        report
    }
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
