//! `imap-stress`: the state-tracking IMAP stress client (see `mailroom_bench::imap_stress`)
//! against one server. Prints one JSON line (commands/s overall and per command type, the
//! error count) and writes each error with its transcript to standard error. Exits 1 when
//! it found errors.

use clap::Parser;
use mailroom_bench::imap_stress::{Options, run};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Parser)]
struct Args {
    /// The IMAP server.
    #[arg(long)]
    server: SocketAddr,
    #[arg(long)]
    user: String,
    #[arg(long)]
    password: String,
    /// Clients side by side, on one shared mailbox.
    #[arg(long, default_value_t = 5)]
    clients: usize,
    /// Seconds of measured mix.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Log out and in again after this many commands (0: sessions kept open).
    #[arg(long, default_value_t = 0)]
    commands_per_login: u32,
    /// The mailbox size the mix keeps near.
    #[arg(long, default_value_t = 100)]
    messages: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Do not use CONDSTORE (no MODSEQ checks).
    #[arg(long)]
    no_condstore: bool,
    /// ENABLE QRESYNC: VANISHED instead of EXPUNGE, and SELECT (QRESYNC ...) checked at
    /// every login after the first.
    #[arg(long)]
    qresync: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let report = run(Options {
        server: a.server,
        user: a.user,
        password: a.password,
        clients: a.clients,
        duration: Duration::from_secs(a.secs),
        commands_per_login: (a.commands_per_login > 0).then_some(a.commands_per_login),
        messages: a.messages,
        seed: a.seed,
        condstore: !a.no_condstore || a.qresync,
        qresync: a.qresync,
    })
    .await?;
    for e in &report.errors {
        eprintln!("{e}\n");
    }
    println!("{}", report.json());
    if report.error_count > 0 {
        std::process::exit(1);
    }
    Ok(())
}
