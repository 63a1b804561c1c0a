//! SMTP ingestion benchmark: messages/s accepted (durable "250") and end to end
//! (accepted -> in the mailbox), with group commit on and off, against a release build
//! of `mailroom serve` started as a separate process on loopback ports.
//!
//! Modes alternate within each round so that both see the same machine state; the
//! report gives every round and the median.

use anyhow::{Context, bail};
use clap::Parser;
use mailroom::client::AdminClient;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};

#[derive(Parser)]
struct Args {
    /// The release binary to measure.
    #[arg(long)]
    server_binary: PathBuf,
    /// Messages per run.
    #[arg(long, default_value_t = 3000)]
    messages: usize,
    /// Concurrent SMTP sessions.
    #[arg(long, default_value_t = 20)]
    sessions: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Rounds (each runs both modes).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

struct Server {
    child: Child,
    smtp_port: u16,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn start(binary: &Path, group_commit: bool) -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("mailroom.toml");
    std::fs::write(
        &config,
        format!(
            "[spool]\ngroup_commit = {group_commit}\n[smtp]\nsessions_max = 1000\nsessions_per_client_max = 1000\n"
        ),
    )?;
    let data = dir.path().join("data");
    let mut child = Command::new(binary)
        .args([
            "serve",
            "--domain",
            "bench.test",
            "--smtp",
            "127.0.0.1:0",
            "--imap",
            "127.0.0.1:0",
            "--pop3",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--data")
        .arg(&data)
        .env("MAILROOM_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the server binary")?;
    let mut smtp_port = None;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    for line in lines.by_ref() {
        let line = line?;
        if let Some(addr) = line.trim().strip_prefix("SMTP:") {
            smtp_port = Some(addr.trim().parse::<std::net::SocketAddr>()?.port());
        }
        if line.contains("admin API:") {
            break;
        }
    }
    // Keep reading so the server's later lines have somewhere to go.
    std::thread::spawn(move || lines.for_each(drop));
    let Some(smtp_port) = smtp_port else {
        bail!("the server did not print its SMTP address");
    };
    Ok(Server {
        child,
        smtp_port,
        data,
        _dir: dir,
    })
}

/// A message of about `size` bytes, dot-stuffing-free, CRLF-terminated.
fn message_body(size: usize) -> Vec<u8> {
    let mut body =
        b"From: <load@remote.test>\r\nTo: <sink@bench.test>\r\nSubject: bench\r\n\r\n".to_vec();
    while body.len() + 80 < size {
        body.extend_from_slice(&[b'x'; 76]);
        body.extend_from_slice(b"\r\n");
    }
    body
}

/// One SMTP session sending `count` messages the way `smtp-source` does: the envelope
/// pipelined in one write, the content in one write, TCP_NODELAY, no per-message
/// connection. Every reply is checked.
async fn send_session(addr: std::net::SocketAddr, count: usize, body: &[u8]) -> anyhow::Result<()> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut replies = AsyncBufReader::new(read);
    let mut line = String::new();
    async fn expect(
        replies: &mut AsyncBufReader<tokio::net::tcp::OwnedReadHalf>,
        line: &mut String,
        code: &str,
    ) -> anyhow::Result<()> {
        loop {
            line.clear();
            if replies.read_line(line).await? == 0 {
                bail!("connection closed while waiting for {code}");
            }
            if !line.starts_with(code) {
                bail!("expected {code}, got {line:?}");
            }
            if line.as_bytes().get(3) == Some(&b' ') {
                return Ok(());
            }
        }
    }
    expect(&mut replies, &mut line, "220").await?;
    write.write_all(b"EHLO bench.client\r\n").await?;
    expect(&mut replies, &mut line, "250").await?;
    let mut content = body.to_vec();
    content.extend_from_slice(b".\r\n");
    for _ in 0..count {
        write
            .write_all(b"MAIL FROM:<load@remote.test>\r\nRCPT TO:<sink@bench.test>\r\nDATA\r\n")
            .await?;
        expect(&mut replies, &mut line, "250").await?;
        expect(&mut replies, &mut line, "250").await?;
        expect(&mut replies, &mut line, "354").await?;
        write.write_all(&content).await?;
        expect(&mut replies, &mut line, "250").await?;
    }
    write.write_all(b"QUIT\r\n").await?;
    Ok(())
}

struct RunResult {
    accepted_per_s: f64,
    end_to_end_per_s: f64,
    messages_per_commit: f64,
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn run(args: &Args, group_commit: bool) -> anyhow::Result<RunResult> {
    let server = start(&args.server_binary, group_commit)?;
    let client = AdminClient::from_data_dir(&server.data)?;
    let _: serde_json::Value = client.post(
        "/recipients",
        &serde_json::json!({"address": "sink@bench.test"}),
    )?;
    let body = message_body(args.size);
    let per_session = args.messages / args.sessions;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], server.smtp_port).into();
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.sessions)
        .map(|_| {
            let body = body.clone();
            tokio::spawn(async move { send_session(addr, per_session, &body).await })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let accepted_in = started.elapsed();
    let total = per_session * args.sessions;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let queues: serde_json::Value = client.get("/queues")?;
        if queues["queues"][0]["depth"] == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the inbound queue did not drain");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delivered_in = started.elapsed();
    let admin = std::fs::read_to_string(server.data.join("admin.url"))?;
    let metrics = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-s", &format!("{}/metrics", admin.trim())])
            .output()
    })
    .await??;
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    let commits = metric(&metrics, "mailroom_spool_commits_total");
    let spooled = metric(&metrics, "mailroom_spool_messages_total");
    let commit_seconds = metric(&metrics, "mailroom_spool_commit_seconds_sum");
    eprintln!(
        "  mean spool commit {:.2} ms",
        commit_seconds * 1000.0 / commits.max(1.0)
    );
    Ok(RunResult {
        accepted_per_s: total as f64 / accepted_in.as_secs_f64(),
        end_to_end_per_s: total as f64 / delivered_in.as_secs_f64(),
        messages_per_commit: if commits > 0.0 {
            spooled / commits
        } else {
            0.0
        },
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "SMTP ingestion: {} messages of {} bytes over {} concurrent sessions, {} rounds",
        args.messages, args.size, args.sessions, args.rounds
    );
    let mut on = Vec::new();
    let mut off = Vec::new();
    for round in 1..=args.rounds {
        for group_commit in [true, false] {
            let r = run(&args, group_commit).await?;
            println!(
                "round {round} group_commit={group_commit:<5}  accepted {:>8.0} msg/s  end-to-end {:>8.0} msg/s  {:>5.1} msg/fsync",
                r.accepted_per_s, r.end_to_end_per_s, r.messages_per_commit
            );
            if group_commit { &mut on } else { &mut off }.push(r);
        }
    }
    let pick =
        |runs: &Vec<RunResult>, f: fn(&RunResult) -> f64| median(runs.iter().map(f).collect());
    println!("\n| group commit | accepted msg/s | end-to-end msg/s | messages per fsync |");
    println!("|---|---:|---:|---:|");
    for (name, runs) in [("on", &on), ("off", &off)] {
        println!(
            "| {name} | {:.0} | {:.0} | {:.1} |",
            pick(runs, |r| r.accepted_per_s),
            pick(runs, |r| r.end_to_end_per_s),
            pick(runs, |r| r.messages_per_commit)
        );
    }
    println!(
        "\ngroup commit on/off, accepted: {:.2}x",
        pick(&on, |r| r.accepted_per_s) / pick(&off, |r| r.accepted_per_s)
    );
    Ok(())
}
