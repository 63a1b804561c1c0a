//! `mailroom`: the server (`serve`) and the administrator's command line.
//!
//! Every subcommand but `serve` and `config` talks to a running server over the admin
//! API, so the CLI and the API can never disagree.

mod commands;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use commands::*;
use mailroom::{Config, ServerOptions};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "mailroom",
    version,
    about = "An all-in-one mail server that never wedges"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Show or check the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage recipients (mailboxes, contacts, lists).
    #[command(subcommand)]
    Recipient(RecipientCommand),
    /// Manage contacts (custom recipients with an external target address).
    #[command(subcommand)]
    Contact(ContactCommand),
    /// Manage distribution lists.
    #[command(subcommand)]
    List(ListCommand),
    /// Manage accepted (local) domains.
    #[command(subcommand)]
    Domain(DomainCommand),
    /// Site addressing: the templates that generate addresses.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Protocol settings: site, server, recipient.
    #[command(subcommand)]
    Protocol(ProtocolCommand),
    /// Connectors and their address spaces.
    #[command(subcommand)]
    Connector(ConnectorCommand),
    /// The routing table (GWART).
    #[command(subcommand)]
    Routing(RoutingCommand),
    /// Bulk import and export (CSV, LDIF).
    #[command(subcommand)]
    Directory(DirectoryCommand),
    /// Background jobs (address regeneration, imports).
    #[command(subcommand)]
    Job(JobCommand),
    /// Look into mailboxes.
    #[command(subcommand)]
    Mailbox(MailboxCommand),
    /// Inspect the queues.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Message tracking: each matching message's trail of events (received, converted,
    /// expanded, delivered, relayed, failed, deferred, dsn, quarantined, admin), newest
    /// message first. With --json, a list of events, each with an `event` field.
    Track(TrackArgs),
    /// Copy a running server's database into an empty folder, consistent as of one
    /// moment, while mail keeps flowing.
    Backup {
        /// The folder to create (on the server's machine); must be absent or empty.
        dir: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Bring a backup back into a new or empty data folder (no server running on it).
    Restore {
        /// The backup folder (`mailroom backup` made it).
        dir: PathBuf,
        /// The data folder to restore into.
        #[arg(long, default_value = "mailroom-data")]
        data: PathBuf,
    },
    /// Stress tests that prove Mailroom does not wedge.
    #[command(subcommand)]
    Stress(StressCommand),
    /// TLS certificates.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// DKIM signing keys for outbound mail.
    #[command(subcommand)]
    Dkim(DkimCommand),
}

#[derive(Subcommand)]
enum DkimCommand {
    /// Make a signing key for DOMAIN and print the DNS TXT record to publish. The new
    /// key signs every message whose From address is in DOMAIN from the next message on
    /// (a running server notices); an earlier key of the domain stays listed (rotation
    /// by selector: keep its record until mail it signed has been delivered).
    Generate {
        /// The domain whose mail is signed (`d=`).
        domain: String,
        /// The selector (`s=`); by default "mr" and this month (e.g. mr202611).
        #[arg(long)]
        selector: Option<String>,
        /// rsa (2048 bits, accepted everywhere) or ed25519 (RFC 8463).
        #[arg(long, default_value = "rsa")]
        algorithm: String,
        /// Data folder.
        #[arg(long, default_value = "mailroom-data")]
        data: PathBuf,
    },
    /// List the keys: domain, selector, algorithm, which one signs, and the DNS record.
    List {
        /// Data folder.
        #[arg(long, default_value = "mailroom-data")]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Print the certificates the server serves (from the config's [tls] files, or the
    /// self-signed one in the data folder): names, validity, issuer and SHA-256
    /// fingerprint, for pinning or checking a renewal.
    Show {
        /// Config file (TOML). Without it, the embedded defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data folder (overrides server.data_dir).
        #[arg(long)]
        data: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum StressCommand {
    /// The directory-churn test: SMTP load while a bulk import and an administrator
    /// change the directory and the routing table; checks every promise, then SIGTERMs
    /// the server mid-churn and restarts it. Starts its own server.
    Churn {
        /// Seconds of load without churn (the baseline).
        #[arg(long, default_value_t = 5)]
        baseline_secs: u64,
        /// Seconds of load with churn.
        #[arg(long, default_value_t = 20)]
        churn_secs: u64,
        /// Concurrent SMTP sessions.
        #[arg(long, default_value_t = 8)]
        sessions: usize,
        /// Stable mailboxes that receive the load.
        #[arg(long, default_value_t = 20)]
        stable: usize,
        /// Recipients the bulk import creates (then modifies, and deletes a third of).
        #[arg(long, default_value_t = 8000)]
        import: usize,
        /// Milliseconds between administrator changes.
        #[arg(long, default_value_t = 5)]
        admin_interval_ms: u64,
        /// SIGTERM-during-churn rounds.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// The server's shutdown deadline, ms.
        #[arg(long, default_value_t = 5000)]
        shutdown_deadline_ms: u64,
        /// Target a running server's admin API instead of starting one (with --token
        /// and --smtp; it must allow relaying from this host; no SIGTERM rounds).
        #[arg(long, requires_all = ["token", "smtp"])]
        server: Option<String>,
        /// The targeted server's admin token.
        #[arg(long, env = "MAILROOM_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The targeted server's SMTP address.
        #[arg(long)]
        smtp: Option<std::net::SocketAddr>,
        /// The targeted server's POP3 address (for the POP3 readers).
        #[arg(long, requires = "server")]
        pop3: Option<std::net::SocketAddr>,
        /// The targeted server's IMAP address (for the IMAP readers).
        #[arg(long, requires = "server")]
        imap: Option<std::net::SocketAddr>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Config file (TOML). Without it, the embedded defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data folder (overrides server.data_dir).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Primary mail domain (overrides server.domain).
    #[arg(long)]
    domain: Option<String>,
    /// SMTP listen address (overrides smtp.listen).
    #[arg(long)]
    smtp: Option<SocketAddr>,
    /// Mail submission (STARTTLS + AUTH) listen address (overrides smtp.submission_listen).
    #[arg(long)]
    submission: Option<SocketAddr>,
    /// Submission over implicit TLS listen address (overrides smtp.submissions_listen).
    #[arg(long)]
    smtps: Option<SocketAddr>,
    /// IMAP listen address (overrides imap.listen).
    #[arg(long)]
    imap: Option<SocketAddr>,
    /// IMAP over implicit TLS listen address (overrides imap.tls_listen).
    #[arg(long)]
    imaps: Option<SocketAddr>,
    /// POP3 listen address (overrides pop3.listen).
    #[arg(long)]
    pop3: Option<SocketAddr>,
    /// POP3 over implicit TLS listen address (overrides pop3.tls_listen).
    #[arg(long)]
    pop3s: Option<SocketAddr>,
    /// Admin API listen address (overrides admin.listen).
    #[arg(long)]
    admin: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print a commented config file with every setting at its default.
    Example,
    /// Check a config file and print the settings in effect.
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

/// Makes the C allocator give large buffers back. glibc serves big allocations from its
/// arenas once its dynamic mmap threshold has risen (it rises each time a large block is
/// freed), and memory freed inside an arena rarely returns to the system: a few large
/// messages converted or fetched left a server at several times its working size for
/// good (tests/hostile_process.rs measured 270 MiB of heap after its battery, 160 MiB
/// with this). A fixed threshold keeps every buffer of 256 KiB or more (message bodies,
/// FETCH answers) in its own mapping, returned when freed.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called first thing in
    // main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 * 1024 * 1024);
    }
}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Config(ConfigCommand::Example) => {
            print!("{}", mailroom::config::EXAMPLE);
            Ok(())
        }
        Command::Config(ConfigCommand::Check { file }) => Config::load(&file).map(|config| {
            print!("{}", toml::to_string(&config).unwrap_or_default());
        }),
        Command::Recipient(command) => recipient(command),
        Command::Contact(command) => contact(command),
        Command::List(command) => list(command),
        Command::Domain(command) => domain(command),
        Command::Template(command) => template(command),
        Command::Protocol(command) => protocol(command),
        Command::Connector(command) => connector(command),
        Command::Routing(command) => routing(command),
        Command::Job(command) => job(command),
        Command::Directory(command) => directory(command),
        Command::Mailbox(command) => mailbox(command),
        Command::Queue(command) => queue(command),
        Command::Backup { dir, target } => backup(dir, target),
        Command::Track(args) => track(args),
        Command::Tls(TlsCommand::Show { config, data }) => tls_show(config, data),
        Command::Dkim(command) => dkim(command),
        Command::Restore { dir, data } => restore(dir, data),
        Command::Stress(StressCommand::Churn {
            baseline_secs,
            churn_secs,
            sessions,
            stable,
            import,
            admin_interval_ms,
            rounds,
            shutdown_deadline_ms,
            server,
            token,
            smtp,
            pop3,
            imap,
        }) => stress_churn(mailroom::stress::ChurnOptions {
            target_pop3: pop3,
            target_imap: imap,
            target: match (server, token, smtp) {
                (Some(server), Some(token), Some(smtp)) => Some((server, token, smtp)),
                _ => None,
            },
            binary: std::env::current_exe().unwrap_or_else(|_| "mailroom".into()),
            baseline: std::time::Duration::from_secs(baseline_secs),
            churn: std::time::Duration::from_secs(churn_secs),
            sessions,
            stable,
            import_recipients: import,
            admin_interval: std::time::Duration::from_millis(admin_interval_ms),
            rounds,
            shutdown_deadline: std::time::Duration::from_millis(shutdown_deadline_ms),
        }),
    };
    if let Err(e) = result {
        eprintln!("mailroom: {e:#}");
        std::process::exit(1);
    }
}

/// The log's output as the log thread sees it: a line that cannot be written (disk full,
/// closed pipe) is dropped and counted as written, and flush never fails, so the log
/// thread itself never reports an error (tracing-appender's thread calls `eprintln!`
/// when a flush fails, which panics when stderr is what failed) and logging resumes
/// by itself when the output can be written again.
struct NeverFails<W>(W);

impl<W: std::io::Write> std::io::Write for NeverFails<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // The log must never stop a worker: a full disk under the log file made every write
    // fail, and the subscriber's report of that failure (eprintln!, which panics when
    // stderr cannot be written) killed whichever thread was logging, the spool writer
    // included. Lines go to a bounded buffer written by a thread of its own; when the
    // output cannot keep up or cannot be written, lines are dropped, never waited for.
    let (writer, log_guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(16_384)
        .thread_name("log-writer")
        .finish(NeverFails(std::io::stderr()));
    // The web admin's dashboard shows the last warnings and errors: a layer beside the
    // log's, keeping them in memory.
    let recent_log = mailroom_web::recent::RecentLog::default();
    {
        use tracing_subscriber::prelude::*;
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::EnvFilter::try_from_env("MAILROOM_LOG")
                    .unwrap_or_else(|_| "info".into()),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .log_internal_errors(false),
            )
            .with(recent_log.clone())
            .init();
    }
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(data) = args.data {
        config.server.data_dir = data;
    }
    if let Some(domain) = args.domain {
        config.server.domain = domain;
    }
    if let Some(smtp) = args.smtp {
        config.smtp.listen = smtp;
    }
    if let Some(submission) = args.submission {
        config.smtp.submission_listen = submission;
    }
    if let Some(smtps) = args.smtps {
        config.smtp.submissions_listen = smtps;
    }
    if let Some(imap) = args.imap {
        config.imap.listen = imap;
    }
    if let Some(imaps) = args.imaps {
        config.imap.tls_listen = imaps;
    }
    if let Some(pop3) = args.pop3 {
        config.pop3.listen = pop3;
    }
    if let Some(pop3s) = args.pop3s {
        config.pop3.tls_listen = pop3s;
    }
    if let Some(admin) = args.admin {
        config.admin.listen = admin;
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let report = runtime.block_on(async move {
        let server = mailroom::start(
            config.clone(),
            ServerOptions {
                recent_log: Some(recent_log),
                ..ServerOptions::default()
            },
        )
        .await?;
        say("Mailroom is running.");
        say(&format!("  data folder: {}", server.data_dir.display()));
        say(&format!("  SMTP:        {}", server.smtp_addr));
        if let Some(submission) = server.submission_addr {
            say(&format!("  submission:  {submission}"));
        }
        if let Some(smtps) = server.submissions_addr {
            say(&format!("  SMTPS:       {smtps}"));
        }
        say(&format!("  IMAP:        {}", server.imap_addr));
        if let Some(imaps) = server.imaps_addr {
            say(&format!("  IMAPS:       {imaps}"));
        }
        say(&format!("  POP3:        {}", server.pop3_addr));
        if let Some(pop3s) = server.pop3s_addr {
            say(&format!("  POP3S:       {pop3s}"));
        }
        say(&format!(
            "  web admin:   http://{}/  (sign in as an administrator, e.g. postmaster@{})",
            server.admin_addr, config.server.domain
        ));
        say(&format!(
            "  admin API:   http://{}  (/api/v1, token in {}/admin.token)",
            server.admin_addr,
            server.data_dir.display()
        ));
        if let Some(https) = server.admin_tls_addr {
            say(&format!("  admin HTTPS: https://{https}/"));
        }
        say(&format!("  mail domain: {}", config.server.domain));
        for served in server.tls.served() {
            say(&format!(
                "  TLS:         {} for {}, SHA-256 {}{}",
                served.cert_file.display(),
                served.names.join(", "),
                served.sha256,
                if server.tls.is_self_signed() {
                    " (self-signed)"
                } else {
                    ""
                }
            ));
        }
        let topology = server.directory.snapshot().topology().clone();
        say(&format!(
            "  directory:   organization {:?}, site {:?}, server {:?}",
            topology.organization, topology.site, topology.server
        ));
        if let Some(password) = &server.postmaster_password {
            say(&format!(
                "  created postmaster@{} with password {password}  (shown once; keep it)",
                config.server.domain
            ));
        }
        wait_for_signal().await;
        say(&format!(
            "Shutting down (deadline {} ms)...",
            config.server.shutdown_deadline_ms
        ));
        Ok::<_, anyhow::Error>(server.shutdown().await)
    })?;
    say(&format!("Stopped in {} ms.", report.elapsed.as_millis()));
    // Threads abandoned at the deadline must not keep the process alive.
    // The log's last lines are written before exit (exit runs no destructors). The
    // guard's flush waits at most a second for the log thread, so a stuck output
    // cannot hold up the exit.
    drop(log_guard);
    std::process::exit(0);
}

/// `mailroom dkim ...`
fn dkim(command: DkimCommand) -> anyhow::Result<()> {
    match command {
        DkimCommand::Generate {
            domain,
            selector,
            algorithm,
            data,
        } => {
            let algorithm = mailroom_dkim::Algorithm::parse(&algorithm).ok_or_else(|| {
                anyhow::anyhow!("--algorithm must be rsa or ed25519, not {algorithm:?}")
            })?;
            let selector = selector.unwrap_or_else(|| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                // YYYY-MM of today, from the listing's date format.
                let date = commands::format_time(now);
                format!("mr{}{}", &date[0..4], &date[5..7])
            });
            let key = mailroom_dkim::generate(&data, &domain, &selector, algorithm)?;
            println!(
                "Made a new {} key for {} (selector {}); it signs mail from {} from now on.",
                key.algorithm.name(),
                key.domain,
                key.selector,
                key.domain
            );
            println!(
                "Publish this DNS TXT record (long values may need splitting into 255-byte strings):"
            );
            println!("{}. IN TXT \"{}\"", key.record_name, key.record_value);
            Ok(())
        }
        DkimCommand::List { data } => {
            let keys = mailroom_dkim::list(&data)?;
            if keys.is_empty() {
                println!(
                    "No DKIM keys. Make one with: mailroom dkim generate DOMAIN --data {}",
                    data.display()
                );
            }
            for key in keys {
                println!(
                    "{} {} {} {}\n  {}. IN TXT \"{}\"",
                    key.domain,
                    key.selector,
                    key.algorithm.name(),
                    if key.active { "(signing)" } else { "(retired)" },
                    key.record_name,
                    key.record_value
                );
            }
            Ok(())
        }
    }
}

/// `mailroom tls show`: what the TLS listeners serve.
fn tls_show(config: Option<PathBuf>, data: Option<PathBuf>) -> anyhow::Result<()> {
    let mut config = match &config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(data) = data {
        config.server.data_dir = data;
    }
    let acme = config.tls.acme.enabled();
    let files: Vec<mailroom_tls::CertificateFiles> = if acme {
        let files = mailroom_tls::acme::acme_files(&config.server.data_dir);
        if !files.cert.exists() {
            println!(
                "No ACME certificate yet: the first start of `mailroom serve --data {}` asks {} for one.",
                config.server.data_dir.display(),
                config.tls.acme.directory_url()
            );
            return Ok(());
        }
        vec![files]
    } else {
        config.tls.certificate_files()
    };
    if files.is_empty()
        && !mailroom_tls::self_signed_files(&config.server.data_dir)
            .cert
            .exists()
    {
        println!(
            "No certificate yet: none is configured ([tls] certificates), and the first start of `mailroom serve --data {}` makes a self-signed one.",
            config.server.data_dir.display()
        );
        return Ok(());
    }
    let tls = mailroom_tls::Tls::start(
        &files,
        &config.server.data_dir,
        &config.server.effective_hostname(),
    )
    .context("cannot load the TLS certificates (check [tls] certificates)")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for (n, served) in tls.served().iter().enumerate() {
        let days_left = (served.not_after - now).div_euclid(86_400);
        println!(
            "{}certificate {}{}",
            if n > 0 { "\n" } else { "" },
            served.cert_file.display(),
            if tls.is_self_signed() {
                " (self-signed, made at first start)"
            } else if acme && served.issuer == served.subject {
                " (ACME: self-signed placeholder until the CA issues one)"
            } else if acme {
                " (ACME)"
            } else if n == 0 {
                " (default: clients without SNI get it)"
            } else {
                ""
            }
        );
        println!("  names:    {}", served.names.join(", "));
        println!("  subject:  {}", served.subject);
        println!("  issuer:   {}", served.issuer);
        println!(
            "  valid:    {} to {} ({})",
            commands::format_time(served.not_before * 1000),
            commands::format_time(served.not_after * 1000),
            if days_left < 0 {
                "EXPIRED".to_string()
            } else {
                format!("{days_left} days left")
            }
        );
        println!("  SHA-256:  {}", served.sha256);
    }
    Ok(())
}

fn stress_churn(options: mailroom::stress::ChurnOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    println!(
        "directory churn: {} s baseline, {} s churn, {} sessions, {} stable mailboxes, import of {} recipients, {} SIGTERM round(s)",
        options.baseline.as_secs(),
        options.churn.as_secs(),
        options.sessions,
        options.stable,
        options.import_recipients,
        options.rounds
    );
    let report = runtime.block_on(mailroom::stress::churn(options))?;
    println!("{report}");
    let shutdown = if report.shutdown_ms.is_empty() {
        "no SIGTERM rounds (a targeted server)".to_string()
    } else {
        format!(
            "{} SIGTERM round(s) within the deadline",
            report.shutdown_ms.len()
        )
    };
    println!(
        "PASS: no deadlock, no stall, progress every second, every queue drained, every message exactly once, every route valid, the directory as changed, {shutdown}"
    );
    Ok(())
}

/// Prints a status line; a closed stdout (a supervisor that went away) must not turn a
/// clean shutdown into a panic.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
