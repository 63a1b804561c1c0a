//! IMAP benchmark: operations/s with many concurrent clients (LOGIN, SELECT, FETCH,
//! SEARCH, STORE) and memory per connection, Mailroom against Dovecot, on the same
//! mailbox contents, side by side in one run.
//!
//! This binary drives one server at a time (the `bench/imap` script starts both and
//! alternates): `load` APPENDs the corpus, `run` measures. The client is a minimal one of
//! our own (like Postfix's smtp-source for SMTP): it sends one command, reads to its
//! tagged answer, and skips literals by their announced length, so the client's own cost
//! stays small and equal for both servers.

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Mode,
}

/// Where and as whom the client logs in.
#[derive(clap::Args, Clone)]
struct Login {
    #[arg(long)]
    server: SocketAddr,
    #[arg(long)]
    user: String,
    #[arg(long)]
    password: String,
}

impl Login {
    /// A connection, logged in.
    async fn connect(&self) -> anyhow::Result<Client> {
        let mut c = Client::connect(self.server).await?;
        c.ok(&format!("LOGIN \"{}\" \"{}\"", self.user, self.password))
            .await?;
        Ok(c)
    }
}

#[derive(Subcommand)]
enum Mode {
    /// Print Mailroom's Argon2id hash of a password (PHC string), so the peer can check
    /// the same hash at the same cost.
    Hash {
        #[arg(long)]
        password: String,
    },
    /// APPEND `messages` realistic messages to INBOX.
    Load {
        #[command(flatten)]
        login: Login,
        #[arg(long, default_value_t = 2000)]
        messages: usize,
        /// Number of the first message (to add to a mailbox already loaded).
        #[arg(long, default_value_t = 0)]
        start: usize,
        /// Connections APPENDing side by side (messages are spread over them).
        #[arg(long, default_value_t = 1)]
        connections: usize,
    },
    /// Write messages `start..start+messages` of the same corpus as files into a
    /// Maildir's `cur` folder (how the Dovecot side grows to a large mailbox: its own
    /// APPEND slows as `new/` fills, O(n) per message).
    Maildir {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value_t = 0)]
        start: usize,
        #[arg(long)]
        messages: usize,
    },
    /// Latency of single operations on a large mailbox, one client alone: SELECT, the
    /// FETCHes a client makes when it opens a mailbox, and SEARCHes. Each is timed
    /// `repeat` times after a first (cold) run; prints JSON (milliseconds).
    Latency {
        #[command(flatten)]
        login: Login,
        /// Messages in the INBOX (as loaded).
        #[arg(long)]
        messages: usize,
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
    /// Run the operation mix with `clients` concurrent clients for `secs` seconds; then
    /// hold `idle` connections logged in and print operations/s (JSON).
    Run {
        #[command(flatten)]
        login: Login,
        #[arg(long, default_value_t = 20)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Messages in the INBOX (as loaded).
        #[arg(long, default_value_t = 2000)]
        messages: usize,
    },
    /// Open `count` connections, log in and SELECT on each, then wait for a line on
    /// standard input (the script measures the server's memory meanwhile).
    Hold {
        #[command(flatten)]
        login: Login,
        #[arg(long, default_value_t = 200)]
        count: usize,
    },
}

struct Client {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    tag: u64,
}

impl Client {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let mut client = Client {
            reader: BufReader::new(r),
            writer: w,
            tag: 0,
        };
        let mut greeting = String::new();
        client.reader.read_line(&mut greeting).await?;
        ensure!(greeting.starts_with("* OK"), "greeting: {greeting}");
        Ok(client)
    }

    /// Sends a command (with optional literal payload after a `{n}` line) and reads to
    /// its tagged answer; returns the untagged lines' count and the tagged line.
    async fn command(
        &mut self,
        text: &str,
        literal: Option<&[u8]>,
    ) -> anyhow::Result<(usize, String)> {
        self.tag += 1;
        let tag = format!("b{}", self.tag);
        match literal {
            None => {
                self.writer
                    .write_all(format!("{tag} {text}\r\n").as_bytes())
                    .await?
            }
            Some(data) => {
                self.writer
                    .write_all(format!("{tag} {text} {{{}}}\r\n", data.len()).as_bytes())
                    .await?;
                let mut line = String::new();
                self.reader.read_line(&mut line).await?;
                ensure!(line.starts_with('+'), "no continuation: {line}");
                self.writer.write_all(data).await?;
                self.writer.write_all(b"\r\n").await?;
            }
        }
        let mut untagged = 0;
        loop {
            let mut line = Vec::new();
            let n = self.reader.read_until(b'\n', &mut line).await?;
            ensure!(n > 0, "connection closed during {text}");
            // Skip a literal announced at the end of the line, then keep reading.
            let mut current = line;
            loop {
                let trimmed = current.strip_suffix(b"\r\n").unwrap_or(&current);
                let Some(open) = trimmed.iter().rposition(|b| *b == b'{') else {
                    break;
                };
                let Some(size) = trimmed
                    .strip_suffix(b"}")
                    .and_then(|t| std::str::from_utf8(&t[open + 1..]).ok())
                    .and_then(|n| n.parse::<usize>().ok())
                else {
                    break;
                };
                let mut skip = vec![0u8; size];
                self.reader.read_exact(&mut skip).await?;
                current.clear();
                self.reader.read_until(b'\n', &mut current).await?;
            }
            let text_line = String::from_utf8_lossy(&current).to_string();
            if text_line.starts_with(&format!("{tag} ")) {
                return Ok((untagged, text_line.trim_end().to_string()));
            }
            untagged += 1;
        }
    }

    async fn ok(&mut self, text: &str) -> anyhow::Result<usize> {
        let (untagged, tagged) = self.command(text, None).await?;
        ensure!(tagged.split(' ').nth(1) == Some("OK"), "{text}: {tagged}");
        Ok(untagged)
    }
}

fn corpus(i: usize) -> Vec<u8> {
    let subject = if i.is_multiple_of(10) {
        "quarterly report"
    } else {
        "status update"
    };
    format!(
        "From: Sender {i} <sender{i}@remote.test>\r\nTo: user@example.test\r\nSubject: {subject} {i}\r\nMessage-ID: <{i}@bench.test>\r\nDate: Thu, 05 Mar 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b{i}\"\r\n\r\n--b{i}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n{}\r\n--b{i}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>{}</p>\r\n--b{i}--\r\n",
        "Plain text line with caf=C3=A9 and numbers.\r\n".repeat(20),
        "HTML line.".repeat(40)
    )
    .into_bytes()
}

#[derive(Default)]
struct Counts {
    login: u64,
    select: u64,
    fetch: u64,
    search: u64,
    store: u64,
}

async fn client_loop(login: Login, until: Instant, messages: u32) -> anyhow::Result<Counts> {
    let mut counts = Counts::default();
    let mut round = 0u32;
    while Instant::now() < until {
        let mut c = login.connect().await?;
        counts.login += 1;
        c.ok("SELECT INBOX").await?;
        counts.select += 1;
        // A session does some work before it leaves, as a client would.
        for _ in 0..5 {
            round += 1;
            let start = 1 + (round * 37) % messages.saturating_sub(50).max(1);
            c.ok(&format!(
                "FETCH {start}:{} (FLAGS ENVELOPE RFC822.SIZE)",
                start + 49
            ))
            .await?;
            counts.fetch += 1;
            c.ok("UID SEARCH SUBJECT quarterly").await?;
            counts.search += 1;
            c.ok(&format!(
                "STORE {start} {}FLAGS (\\Flagged)",
                if round.is_multiple_of(2) { "+" } else { "-" }
            ))
            .await?;
            counts.store += 1;
        }
        c.ok("LOGOUT").await?;
    }
    Ok(counts)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Mode::Hash { password } => println!("{}", mailroom_directory::hash_password(&password)),
        Mode::Load {
            login,
            messages,
            start,
            connections,
        } => {
            let connections = connections.max(1);
            let tasks: Vec<_> = (0..connections)
                .map(|k| {
                    let login = login.clone();
                    tokio::spawn(async move {
                        let mut c = login.connect().await?;
                        for i in (start + k..start + messages).step_by(connections) {
                            let (_, tagged) =
                                c.command("APPEND INBOX ()", Some(&corpus(i))).await?;
                            ensure!(tagged.contains(" OK"), "APPEND: {tagged}");
                        }
                        c.ok("LOGOUT").await?;
                        anyhow::Ok(())
                    })
                })
                .collect();
            for t in tasks {
                t.await?.context("a loading connection failed")?;
            }
        }
        Mode::Maildir {
            dir,
            start,
            messages,
        } => {
            let cur = dir.join("cur");
            std::fs::create_dir_all(&cur)?;
            for i in start..start + messages {
                let body = corpus(i);
                // Maildir names: unique, with the size (S=) Dovecot reads without a stat.
                let name = format!("1772704800.M{i}P0.bench,S={}:2,", body.len());
                std::fs::write(cur.join(name), body)?;
            }
        }
        Mode::Latency {
            login,
            messages,
            repeat,
        } => {
            let mut c = login.connect().await?;
            let last = messages.max(50);
            let operations = [
                ("select", "SELECT INBOX".to_string(), 0),
                (
                    "fetch_flags_all",
                    "UID FETCH 1:* (FLAGS)".to_string(),
                    messages,
                ),
                (
                    "fetch_newest_50",
                    format!(
                        "FETCH {}:{last} (UID FLAGS ENVELOPE RFC822.SIZE)",
                        last - 49
                    ),
                    50,
                ),
                ("search_unseen", "UID SEARCH UNSEEN".to_string(), 1),
                (
                    "search_subject",
                    "UID SEARCH SUBJECT quarterly".to_string(),
                    1,
                ),
            ];
            let mut out = serde_json::Map::new();
            for (name, command, min_untagged) in operations {
                let mut times = Vec::with_capacity(repeat + 1);
                for _ in 0..=repeat {
                    let t = Instant::now();
                    let untagged = c.ok(&command).await?;
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                    ensure!(
                        untagged >= min_untagged,
                        "{command}: {untagged} untagged lines, expected at least {min_untagged}"
                    );
                }
                let first = times.remove(0);
                times.sort_by(f64::total_cmp);
                out.insert(
                    name.into(),
                    serde_json::json!({"first_ms": first, "median_ms": times[times.len() / 2]}),
                );
            }
            // What another session's change costs a session that has the folder open
            // (an IDLE client's lot; the operations above selected INBOX): a second connection flips a flag, then this one's
            // NOOP picks it up (one FETCH). Timed: the NOOP.
            {
                let mut other = login.connect().await?;
                other.ok("SELECT INBOX").await?;
                let mut times = Vec::with_capacity(repeat + 1);
                for round in 0..=repeat {
                    let sign = if round % 2 == 0 { '+' } else { '-' };
                    other
                        .ok(&format!("STORE {last} {sign}FLAGS.SILENT (\\Flagged)"))
                        .await?;
                    let t = Instant::now();
                    let untagged = c.ok("NOOP").await?;
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                    ensure!(untagged >= 1, "NOOP after a change: no update");
                }
                other.ok("LOGOUT").await?;
                let first = times.remove(0);
                times.sort_by(f64::total_cmp);
                out.insert(
                    "noop_after_change".into(),
                    serde_json::json!({"first_ms": first, "median_ms": times[times.len() / 2]}),
                );
            }
            c.ok("LOGOUT").await?;
            println!("{}", serde_json::Value::Object(out));
        }
        Mode::Run {
            login,
            clients,
            secs,
            messages,
        } => {
            let started = Instant::now();
            let until = started + Duration::from_secs(secs);
            let tasks: Vec<_> = (0..clients)
                .map(|_| tokio::spawn(client_loop(login.clone(), until, messages as u32)))
                .collect();
            let mut total = Counts::default();
            for t in tasks {
                let c = t.await?.context("a client failed")?;
                total.login += c.login;
                total.select += c.select;
                total.fetch += c.fetch;
                total.search += c.search;
                total.store += c.store;
            }
            let s = started.elapsed().as_secs_f64();
            println!(
                "{}",
                serde_json::json!({
                    "login": total.login as f64 / s,
                    "select": total.select as f64 / s,
                    "fetch": total.fetch as f64 / s,
                    "search": total.search as f64 / s,
                    "store": total.store as f64 / s,
                    "all": (total.login + total.select + total.fetch + total.search + total.store) as f64 / s,
                })
            );
        }
        Mode::Hold { login, count } => {
            let mut held = Vec::new();
            for _ in 0..count {
                let mut c = login.connect().await?;
                c.ok("SELECT INBOX").await?;
                held.push(c);
            }
            println!("holding {}", held.len());
            let mut line = String::new();
            let mut stdin = BufReader::new(tokio::io::stdin());
            stdin.read_line(&mut line).await?;
            if held.len() != count {
                bail!("lost connections");
            }
        }
    }
    Ok(())
}
