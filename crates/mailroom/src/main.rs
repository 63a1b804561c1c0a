//! `mailroom`: the server (`serve`) and the administrator's command line.
//!
//! Every subcommand but `serve` and `config` talks to a running server over the admin
//! API, so the CLI and the API can never disagree.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mailroom::client::{AdminClient, path_segment};
use mailroom::{Config, ServerOptions};
use mailroom_admin::{NewRecipientRequest, QueuesReport};
use mailroom_store::MessageSummary;
use std::io::{IsTerminal, Read};
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
    /// Manage recipients.
    #[command(subcommand)]
    Recipient(RecipientCommand),
    /// Look into mailboxes.
    #[command(subcommand)]
    Mailbox(MailboxCommand),
    /// Inspect the queues.
    #[command(subcommand)]
    Queue(QueueCommand),
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

/// How the CLI reaches a server.
#[derive(Args)]
struct Target {
    /// Data folder of a local server (finds its admin API there).
    #[arg(long, default_value = "mailroom-data", global = true)]
    data: PathBuf,
    /// Admin API URL of a remote server (with --token).
    #[arg(long, global = true, requires = "token")]
    server: Option<String>,
    /// Admin API token of a remote server.
    #[arg(long, global = true, env = "MAILROOM_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl Target {
    fn client(&self) -> anyhow::Result<AdminClient> {
        match (&self.server, &self.token) {
            (Some(server), Some(token)) => Ok(AdminClient::new(server, token)),
            _ => AdminClient::from_data_dir(&self.data),
        }
    }
}

#[derive(Subcommand)]
enum RecipientCommand {
    /// Create a mailbox recipient.
    Add {
        /// Primary SMTP address.
        address: String,
        /// Display name.
        #[arg(long, default_value = "")]
        name: String,
        /// Mailbox name (default: the address's local part).
        #[arg(long)]
        alias: Option<String>,
        /// Another address for the same mailbox (repeat for more).
        #[arg(long = "secondary", value_name = "ADDRESS")]
        secondary_addresses: Vec<String>,
        /// Read an initial password from standard input.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        target: Target,
    },
    /// List recipients.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum MailboxCommand {
    /// List the messages in a recipient's INBOX.
    List {
        /// Any address of the recipient.
        address: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Each queue's depth and oldest entry, and the quarantined messages.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
}

fn main() {
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
        Command::Mailbox(MailboxCommand::List {
            address,
            json,
            target,
        }) => mailbox_list(&address, json, &target),
        Command::Queue(QueueCommand::List { json, target }) => queue_list(json, &target),
    };
    if let Err(e) = result {
        eprintln!("mailroom: {e:#}");
        std::process::exit(1);
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MAILROOM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
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
    if let Some(admin) = args.admin {
        config.admin.listen = admin;
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let report = runtime.block_on(async move {
        let server = mailroom::start(config.clone(), ServerOptions::default()).await?;
        say("Mailroom is running.");
        say(&format!("  data folder: {}", server.data_dir.display()));
        say(&format!("  SMTP:        {}", server.smtp_addr));
        say(&format!(
            "  admin API:   http://{}  (token in {}/admin.token)",
            server.admin_addr,
            server.data_dir.display()
        ));
        say(&format!("  mail domain: {}", config.server.domain));
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
    std::process::exit(0);
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

fn recipient(command: RecipientCommand) -> anyhow::Result<()> {
    match command {
        RecipientCommand::Add {
            address,
            name,
            alias,
            secondary_addresses,
            password_stdin,
            target,
        } => {
            let password = if password_stdin {
                let mut text = String::new();
                if std::io::stdin().is_terminal() {
                    eprint!("Password: ");
                }
                std::io::stdin().read_to_string(&mut text)?;
                Some(text.trim_end_matches(['\r', '\n']).to_string())
            } else {
                None
            };
            let created: serde_json::Value = target.client()?.post(
                "/recipients",
                &NewRecipientRequest {
                    address,
                    display_name: name,
                    alias,
                    secondary_addresses,
                    password,
                },
            )?;
            println!(
                "created {} (alias {})",
                created["primary_address"].as_str().unwrap_or("?"),
                created["alias"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        RecipientCommand::List { json, target } => {
            let recipients: Vec<serde_json::Value> = target.client()?.get("/recipients")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&recipients)?);
                return Ok(());
            }
            println!("{:<40} {:<20} DISPLAY NAME", "ADDRESS", "ALIAS");
            for r in recipients {
                println!(
                    "{:<40} {:<20} {}",
                    r["primary_address"].as_str().unwrap_or(""),
                    r["alias"].as_str().unwrap_or(""),
                    r["display_name"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
    }
}

fn format_time(ms: i64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn mailbox_list(address: &str, json: bool, target: &Target) -> anyhow::Result<()> {
    let messages: Vec<MessageSummary> = target
        .client()?
        .get(&format!("/mailboxes/{}/messages", path_segment(address)))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&messages)?);
        return Ok(());
    }
    println!(
        "{:>6}  {:<20}  {:>8}  {:<30}  {:<40}  SUBJECT",
        "UID", "RECEIVED", "SIZE", "FROM", "MESSAGE-ID"
    );
    for m in &messages {
        println!(
            "{:>6}  {:<20}  {:>8}  {:<30}  {:<40}  {}",
            m.uid,
            format_time(m.received_at_ms),
            m.size,
            m.from.as_deref().unwrap_or(""),
            m.message_id.as_deref().unwrap_or(""),
            m.subject.as_deref().unwrap_or("")
        );
    }
    println!("{} message(s)", messages.len());
    Ok(())
}

fn queue_list(json: bool, target: &Target) -> anyhow::Result<()> {
    let report: QueuesReport = target.client()?.get("/queues")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{:<14} {:>8} {:>12} {:>12}",
        "QUEUE", "DEPTH", "BYTES", "OLDEST"
    );
    for q in &report.queues {
        let oldest = q
            .oldest_age_seconds
            .map_or("-".to_string(), |s| format!("{s:.1}s"));
        println!(
            "{:<14} {:>8} {:>12} {:>12}",
            q.summary.queue.as_str(),
            q.summary.depth,
            q.summary.bytes,
            oldest
        );
    }
    if !report.quarantine.is_empty() {
        println!("\nQuarantined:");
        for item in &report.quarantine {
            println!(
                "  {}  from <{}>  received {}  attempts {}\n    reason: {}",
                item.queue_id,
                item.mail_from,
                format_time(item.received_at_ms),
                item.attempts,
                item.last_error.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
}
