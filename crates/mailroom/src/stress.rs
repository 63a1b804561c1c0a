//! `mailroom stress churn`: the classic wedge, replayed under load, with every promise
//! checked.
//!
//! It starts `mailroom serve` as a child process on a temporary data folder and loopback
//! ports and runs, at once: SMTP load (multipart, 8-bit and encoded bodies, attachments,
//! non-ASCII headers, nested messages) to stable mailboxes, to a stable distribution list
//! and to a remote domain routed by the routing table; a bulk import of thousands of
//! small create/modify/delete rows (the classic trigger); an administrator loop changing
//! protocol settings, the addressing template (which regenerates addresses) and the
//! connectors that route the remote domain every few milliseconds; and readers
//! (protocol-permission checks, admin API reads, POP3 and IMAP logins), which run
//! through the baseline too so that the ratio measures the directory work alone.
//!
//! It asserts: no lock-order violation or deadlock report; the watchdog never fires;
//! inbound conversion progresses in every one-second window of the churn; every queue
//! drains after the load; every accepted message reached each stable recipient exactly
//! once; every routed message sits in the outbound queue with a connector that was
//! enabled and serving its address in the snapshot generation that routed it; the final
//! directory is what the changes say; and SIGTERM during churn exits within the shutdown
//! deadline, after which a restart drains the rest (repeated `rounds` times).
//! Any failed promise ends the run with an error that says which.

use crate::client::AdminClient;
use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// The shape of a run.
#[derive(Debug, Clone)]
pub struct ChurnOptions {
    /// The `mailroom` binary to run as the server.
    pub binary: PathBuf,
    /// Load without churn, for the baseline.
    pub baseline: Duration,
    /// Load with churn.
    pub churn: Duration,
    /// Concurrent SMTP sessions.
    pub sessions: usize,
    /// Stable mailboxes that receive the load.
    pub stable: usize,
    /// Recipients the bulk import creates (it also modifies each and deletes a third).
    pub import_recipients: usize,
    /// Pause between administrator changes.
    pub admin_interval: Duration,
    /// SIGTERM-during-churn rounds.
    pub rounds: usize,
    /// The server's shutdown deadline.
    pub shutdown_deadline: Duration,
    /// A running server to target instead of starting one: its admin API URL, token and
    /// SMTP address. It must allow relaying from this host; the run adds `churn.test` as
    /// an accepted domain. No SIGTERM rounds are run against it.
    pub target: Option<(String, String, SocketAddr)>,
    /// The targeted server's POP3 address, for the POP3 readers (without it a targeted
    /// run has none).
    pub target_pop3: Option<SocketAddr>,
    /// The targeted server's IMAP address, for the IMAP readers.
    pub target_imap: Option<SocketAddr>,
}

/// What a run measured.
#[derive(Debug, Default)]
pub struct ChurnReport {
    /// Messages accepted per second without churn.
    pub accepted_per_s_baseline: f64,
    /// Messages accepted per second with churn.
    pub accepted_per_s_churn: f64,
    /// Messages converted per second without churn.
    pub converted_per_s_baseline: f64,
    /// Messages converted per second with churn.
    pub converted_per_s_churn: f64,
    /// Messages accepted per second in the control phase after the churn: the same
    /// load and readers, no directory work, on the store as the churn left it.
    pub accepted_per_s_after: f64,
    /// Messages converted per second in the control phase.
    pub converted_per_s_after: f64,
    /// Where the churn phase's midpoint lies between the midpoints of the phases
    /// without churn, counted in messages stored (0 = the baseline's, 1 = the
    /// control's). The rate without churn *at the churn's store size* is the baseline's
    /// and the control's rates interpolated at this point: what the ratio compares
    /// against, so that the store's growth through the run is not charged to the
    /// directory (see docs/stress.md, "What the ratio compares").
    pub churn_position: f64,
    /// Conversion latency (accepted -> in the mailbox), p50 and p99, ms, without churn.
    pub latency_ms_baseline: (f64, f64),
    /// The same with churn.
    pub latency_ms_churn: (f64, f64),
    /// Directory changes applied per second during churn (import rows and admin changes).
    pub changes_per_s: f64,
    /// Administrator change round trip (submit -> published), p50 and p99, ms.
    pub publish_ms: (f64, f64),
    /// Messages accepted in all.
    pub accepted: usize,
    /// Import rows applied.
    pub import_rows: u64,
    /// Administrator changes applied.
    pub admin_changes: usize,
    /// Admin API and permission reads done.
    pub reads: u64,
    /// POP3 logins that got in (STAT and UIDL read the maildrop).
    pub pop3_logins: u64,
    /// POP3 logins refused because the administrator loop had POP3 off at that moment.
    pub pop3_refused: u64,
    /// IMAP logins that got in (SELECT INBOX, then LOGOUT).
    pub imap_logins: u64,
    /// IMAP logins refused because IMAP was off at that moment.
    pub imap_refused: u64,
    /// Time from SIGTERM to exit, each round, ms.
    pub shutdown_ms: Vec<u128>,
    /// During the churn, per database writer (spool, claim, deliver, directory ...) and
    /// database file (mail, directory): seconds it held that file's write turn and
    /// seconds it waited for it, summed over its transactions.
    pub write_turns: Vec<(String, f64, f64)>,
    /// Mean time each writer held its write turn per transaction, ms: (baseline,
    /// churn). A longer hold for the same work means the commit (its fsync) or the CPU
    /// was slower.
    pub hold_per_commit_ms: HashMap<String, (f64, f64)>,
}

/// Sums of the store's write-turn histograms by caller, from `/metrics` text:
/// caller -> (held seconds, waited seconds, transactions).
fn write_turn_sums(metrics: &str) -> HashMap<String, (f64, f64, f64)> {
    let mut sums: HashMap<String, (f64, f64, f64)> = HashMap::new();
    for line in metrics.lines() {
        let (field, rest) = if let Some(rest) =
            line.strip_prefix("mailroom_store_write_hold_seconds_sum{")
        {
            (0, rest)
        } else if let Some(rest) = line.strip_prefix("mailroom_store_write_wait_seconds_sum{") {
            (1, rest)
        } else if let Some(rest) = line.strip_prefix("mailroom_store_write_hold_seconds_count{") {
            (2, rest)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        // `caller="spool",database="mail"`: shown as `spool (mail)`.
        let label = |name: &str| {
            labels.split(',').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                (key == name).then(|| value.trim_matches('"').to_string())
            })
        };
        let caller = match (label("caller"), label("database")) {
            (Some(caller), Some(database)) => format!("{caller} ({database})"),
            (Some(caller), None) => caller,
            _ => continue,
        };
        let value: f64 = value.trim().parse().unwrap_or(0.0);
        let entry = sums.entry(caller).or_default();
        match field {
            0 => entry.0 = value,
            1 => entry.1 = value,
            _ => entry.2 = value,
        }
    }
    sums
}

/// Per caller, the mean hold per transaction (ms) between two metric readings.
fn hold_per_commit(
    before: &HashMap<String, (f64, f64, f64)>,
    after: &HashMap<String, (f64, f64, f64)>,
) -> HashMap<String, f64> {
    after
        .iter()
        .filter_map(|(caller, (held, _, count))| {
            let (held0, _, count0) = before.get(caller).copied().unwrap_or_default();
            let commits = count - count0;
            (commits > 0.0).then(|| (caller.clone(), (held - held0) * 1000.0 / commits))
        })
        .collect()
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

impl fmt::Display for ChurnReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.accepted_per_s_after > 0.0 {
            writeln!(
                f,
                "| measure | before the churn | with churn | after the churn (control) | without churn at the churn's store size | ratio | ratio to before alone |"
            )?;
            writeln!(f, "|---|---:|---:|---:|---:|---:|---:|")?;
            for (name, before, churn, after) in [
                (
                    "accepted msg/s",
                    self.accepted_per_s_baseline,
                    self.accepted_per_s_churn,
                    self.accepted_per_s_after,
                ),
                (
                    "converted msg/s",
                    self.converted_per_s_baseline,
                    self.converted_per_s_churn,
                    self.converted_per_s_after,
                ),
            ] {
                let expected = before + (after - before) * self.churn_position;
                writeln!(
                    f,
                    "| {name} | {before:.0} | {churn:.0} | {after:.0} | {expected:.0} | **{:.2}** | {:.2} |",
                    ratio(churn, expected),
                    ratio(churn, before)
                )?;
            }
        } else {
            writeln!(f, "| measure | without churn | with churn | ratio |")?;
            writeln!(f, "|---|---:|---:|---:|")?;
            writeln!(
                f,
                "| accepted msg/s | {:.0} | {:.0} | {:.2} |",
                self.accepted_per_s_baseline,
                self.accepted_per_s_churn,
                ratio(self.accepted_per_s_churn, self.accepted_per_s_baseline)
            )?;
            writeln!(
                f,
                "| converted msg/s | {:.0} | {:.0} | {:.2} |",
                self.converted_per_s_baseline,
                self.converted_per_s_churn,
                ratio(self.converted_per_s_churn, self.converted_per_s_baseline)
            )?;
        }
        let columns_after = if self.accepted_per_s_after > 0.0 {
            " | | |"
        } else {
            ""
        };
        writeln!(
            f,
            "| conversion latency p50 / p99 ms | {:.0} / {:.0} | {:.0} / {:.0} |{columns_after} |",
            self.latency_ms_baseline.0,
            self.latency_ms_baseline.1,
            self.latency_ms_churn.0,
            self.latency_ms_churn.1
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "directory changes applied: {:.0}/s ({} import rows, {} administrator changes)",
            self.changes_per_s, self.import_rows, self.admin_changes
        )?;
        writeln!(
            f,
            "administrator change published in: p50 {:.1} ms, p99 {:.1} ms",
            self.publish_ms.0, self.publish_ms.1
        )?;
        writeln!(
            f,
            "messages accepted: {}; reads: {}; POP3 logins: {} in, {} refused by protocol settings; IMAP logins: {} in, {} refused by protocol settings",
            self.accepted,
            self.reads,
            self.pop3_logins,
            self.pop3_refused,
            self.imap_logins,
            self.imap_refused
        )?;
        writeln!(
            f,
            "shutdown (SIGTERM to exit) per round: {:?} ms",
            self.shutdown_ms
        )?;
        if !self.write_turns.is_empty() {
            writeln!(f)?;
            writeln!(
                f,
                "| database writer | held the write turn during churn, s | waited for it, s | mean hold per transaction without / with churn, ms |"
            )?;
            writeln!(f, "|---|---:|---:|---:|")?;
            for (caller, held, waited) in &self.write_turns {
                let (base, churn) = self
                    .hold_per_commit_ms
                    .get(caller)
                    .copied()
                    .unwrap_or_default();
                writeln!(
                    f,
                    "| {caller} | {held:.1} | {waited:.1} | {base:.2} / {churn:.2} |"
                )?;
            }
        }
        Ok(())
    }
}

/// A `mailroom serve` child process.
struct Server {
    /// The child process and its log; `None` when targeting a running server.
    child: Option<(Child, PathBuf)>,
    smtp: SocketAddr,
    pop3: Option<SocketAddr>,
    imap: Option<SocketAddr>,
    client: AdminClient,
}

impl Drop for Server {
    /// A run that fails must not leave its server running.
    fn drop(&mut self) {
        if let Some((child, _)) = &mut self.child
            && child.try_wait().ok().flatten().is_none()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

const DOMAIN: &str = "churn.test";
const REMOTE: &str = "partner.churn.example";

fn write_config(dir: &Path, deadline: Duration) -> anyhow::Result<PathBuf> {
    let path = dir.join("mailroom.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nshutdown_deadline_ms = {}\n[smtp]\nrelay_networks = [\"127.0.0.0/8\"]\nsessions_max = 2000\nsessions_per_client_max = 2000\n[watchdog]\nstall_after_ms = 10000\ncheck_interval_ms = 200\n[outbound]\ntransfer_mode = \"inbound\"\n",
            deadline.as_millis()
        ),
    )?;
    Ok(path)
}

fn start_server(binary: &Path, dir: &Path, round: usize) -> anyhow::Result<Server> {
    let data = dir.join("data");
    let log = dir.join(format!("server-{round}.log"));
    let mut child = Command::new(binary)
        .args([
            "serve",
            "--domain",
            DOMAIN,
            "--smtp",
            "127.0.0.1:0",
            "--imap",
            "127.0.0.1:0",
            "--imaps",
            "127.0.0.1:0",
            "--submission",
            "127.0.0.1:0",
            "--smtps",
            "127.0.0.1:0",
            "--pop3",
            "127.0.0.1:0",
            "--pop3s",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(dir.join("mailroom.toml"))
        .arg("--data")
        .arg(&data)
        .env("MAILROOM_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut smtp = None;
    let mut pop3 = None;
    let mut imap = None;
    for line in lines.by_ref() {
        let line = line?;
        if let Some(addr) = line.trim().strip_prefix("SMTP:") {
            smtp = Some(addr.trim().parse()?);
        }
        if let Some(addr) = line.trim().strip_prefix("POP3:") {
            pop3 = Some(addr.trim().parse()?);
        }
        if let Some(addr) = line.trim().strip_prefix("IMAP:") {
            imap = Some(addr.trim().parse()?);
        }
        if line.contains("admin API:") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    let smtp = smtp.with_context(|| format!("the server did not start; see {}", log.display()))?;
    Ok(Server {
        child: Some((child, log)),
        smtp,
        pop3,
        imap,
        client: AdminClient::from_data_dir(&data)?,
    })
}

/// Runs a blocking admin call off the async runtime.
async fn call<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

fn client_of(server: &Server) -> AdminClient {
    server.client.clone()
}

/// A realistic message: multipart/mixed with 8-bit text, HTML, an attachment and a nested
/// message, a non-ASCII subject.
fn message(id: &str, to: &[String]) -> Vec<u8> {
    use mail_builder::MessageBuilder;
    let inner = MessageBuilder::new()
        .from(("Ünïcode Sender", "inner@remote.test"))
        .to("someone@remote.test")
        .subject("Forwarded: Grüße")
        .text_body("Inner body — with 8-bit text: ñ ü ß\n")
        .write_to_vec()
        .expect("building to memory");
    let mut builder = MessageBuilder::new()
        .from(("Zoë Load", "load@remote.test"))
        .subject(format!("Churn {id} — Grüße, ¿qué tal? 日本"))
        .message_id(id.to_string())
        .text_body("Plain part. Ångström, café, naïve, 8-bit: ½ ¾ ✓\n".repeat(8))
        .html_body("<p>HTML part with <b>bold</b> and non-ASCII: €</p>\n".repeat(4))
        .attachment(
            "application/octet-stream",
            "data.bin",
            (0u8..=255).cycle().take(3000).collect::<Vec<u8>>(),
        )
        .attachment("message/rfc822", "forwarded.eml", inner);
    for address in to {
        builder = builder.to(address.as_str());
    }
    builder.write_to_vec().expect("building to memory")
}

/// One accepted message.
#[derive(Debug, Clone)]
struct Sent {
    id: String,
    stable: Vec<String>,
    accepted_ms: i64,
    baseline: bool,
}

/// SMTP load: each session sends until `stop`; returns what got "250".
async fn smtp_load(
    smtp: SocketAddr,
    sessions: usize,
    stable: usize,
    stop: Arc<AtomicBool>,
    baseline: Arc<AtomicBool>,
    counter: Arc<AtomicU64>,
) -> Vec<Sent> {
    let tasks: Vec<_> = (0..sessions)
        .map(|session| {
            let stop = stop.clone();
            let baseline = baseline.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut sent = Vec::new();
                let _ = session_loop(smtp, session, stable, &stop, &baseline, &counter, &mut sent)
                    .await;
                sent
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap_or_default());
    }
    all
}

async fn session_loop(
    smtp: SocketAddr,
    session: usize,
    stable: usize,
    stop: &AtomicBool,
    baseline: &AtomicBool,
    counter: &AtomicU64,
    sent: &mut Vec<Sent>,
) -> anyhow::Result<()> {
    let stream = tokio::net::TcpStream::connect(smtp).await?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut replies = tokio::io::BufReader::new(read);
    async fn reply(
        r: &mut tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    ) -> anyhow::Result<String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            ensure!(r.read_line(&mut line).await? > 0, "connection closed");
            all.push_str(&line);
            if line.as_bytes().get(3) == Some(&b' ') {
                return Ok(all);
            }
        }
    }
    ensure!(reply(&mut replies).await?.starts_with("220"));
    write.write_all(b"EHLO churn.client\r\n").await?;
    ensure!(reply(&mut replies).await?.starts_with("250"));
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let id = format!("s{session}.{n}.{}.{}@churn.client", unique(), tag());
        let direct = format!("stable{}@{DOMAIN}", (session + n) % stable);
        let to = vec![
            direct.clone(),
            format!("stable-list@{DOMAIN}"),
            format!("user{}.{session}.{n}@{REMOTE}", tag()),
        ];
        let body = mailroom_outbound::client::dot_stuff(&message(&id, &to));
        let mut envelope = String::from("MAIL FROM:<load@remote.test> SMTPUTF8\r\n");
        for address in &to {
            envelope.push_str(&format!("RCPT TO:<{address}>\r\n"));
        }
        envelope.push_str("DATA\r\n");
        write.write_all(envelope.as_bytes()).await?;
        for _ in 0..to.len() + 2 {
            let r = reply(&mut replies).await?;
            ensure!(r.starts_with('2') || r.starts_with('3'), "refused: {r}");
        }
        write.write_all(&body).await?;
        let r = reply(&mut replies).await?;
        ensure!(r.starts_with("250"), "message refused: {r}");
        counter.fetch_add(1, Ordering::Relaxed);
        let mut stable_targets = vec![direct];
        stable_targets.extend((0..5.min(stable)).map(|i| format!("stable{i}@{DOMAIN}")));
        sent.push(Sent {
            id,
            stable: stable_targets,
            accepted_ms: mailroom_watch::now_ms(),
            baseline: baseline.load(Ordering::Relaxed),
        });
    }
    write.write_all(b"QUIT\r\n").await?;
    Ok(())
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A tag for this run's names (message ids, imported recipients, remote addresses), so
/// that runs against one server never collide.
fn tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| format!("{:x}", mailroom_watch::now_ms() % 0xffffff))
}

fn unique() -> u64 {
    UNIQUE.fetch_add(1, Ordering::Relaxed)
}

/// The administrator loop's record of what it made the routing table say.
#[derive(Debug, Clone)]
struct RoutingEra {
    generation: u64,
    /// Enabled connectors serving the remote domain at that generation.
    serving: HashSet<String>,
}

/// The connectors the loop plays with; `internet` (SMTP:*) always serves as a fallback.
fn churn_connector(name: &str, cost: u8, enabled: bool) -> Value {
    json!({
        "name": name,
        "kind": "smart_host",
        "host": "127.0.0.1:9",
        "address_spaces": [{"address_type": "SMTP", "pattern": format!("*@{REMOTE}"), "cost": cost}],
        "enabled": enabled,
    })
}

/// Serving connectors in a site document: enabled ones whose address space matches the
/// remote domain (all of the loop's do; `internet` matches everything).
fn serving(site: &Value) -> HashSet<String> {
    site["connectors"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, c)| c["enabled"] != false)
        .map(|(name, _)| name.clone())
        .collect()
}

struct AdminOutcome {
    changes: usize,
    publish_ms: Vec<f64>,
    eras: Vec<RoutingEra>,
    final_site: Value,
}

/// Changes protocols, the template and the connectors until `stop`.
fn admin_loop(
    client: AdminClient,
    interval: Duration,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<AdminOutcome> {
    let mut outcome = AdminOutcome {
        changes: 0,
        publish_ms: Vec::new(),
        eras: Vec::new(),
        final_site: Value::Null,
    };
    let mut step = 0u64;
    while !stop.load(Ordering::Relaxed) {
        step += 1;
        let change = match step % 6 {
            0 => {
                json!({"change": "set_site_protocol", "protocol": "imap", "enabled": step.is_multiple_of(12)})
            }
            1 => {
                json!({"change": "set_server_protocol", "use_site_defaults": step % 4 == 1, "protocol": ["pop3", step.is_multiple_of(3)]})
            }
            2 => {
                json!({"change": "set_template", "address_type": "SMTP", "template": if step % 4 == 2 { "%m@churn.test" } else { "%m.x@churn.test" }})
            }
            3 => {
                json!({"change": "put_connector", "connector": churn_connector("churn-a", (step % 7 + 1) as u8, step % 5 != 3)})
            }
            4 => {
                json!({"change": "put_connector", "connector": churn_connector("churn-b", (step % 5 + 1) as u8, true)})
            }
            _ => {
                if step % 4 == 1 {
                    json!({"change": "delete_connector", "name": "churn-b"})
                } else {
                    json!({"change": "set_only_least_cost_routes", "enabled": step % 8 == 5})
                }
            }
        };
        let t = Instant::now();
        let result: anyhow::Result<Value> = client.post("/site", &change);
        match result {
            Ok(report) => {
                outcome.publish_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                outcome.changes += 1;
                let generation = report["generation"].as_u64().unwrap_or(0);
                if generation > 0 {
                    outcome.eras.push(RoutingEra {
                        generation,
                        serving: serving(&report["site"]),
                    });
                }
                outcome.final_site = report["site"].clone();
            }
            // Deleting a connector that is already gone is refused; that is fine.
            Err(e) if e.to_string().contains("no such connector") => {}
            Err(e) => return Err(e.context(format!("administrator change {change}"))),
        }
        std::thread::sleep(interval);
    }
    Ok(outcome)
}

/// Stable mailboxes the POP3 readers log in to (one thread each: a maildrop takes one
/// session at a time).
const POP3_READERS: usize = 2;
const POP3_PASSWORD: &str = "churn reader password";
const POP3_PAUSE: Duration = Duration::from_millis(1000);

/// Logs in to `mailbox` over POP3 again and again until `stop`: STAT, UIDL, QUIT, never
/// a deletion (the exactly-once check counts the mailboxes afterwards). A refusal because
/// POP3 is off right then (the administrator loop toggles it) is counted, not an error;
/// anything else is. Returns (logins in, logins refused by protocol settings).
fn pop3_reader(
    addr: SocketAddr,
    mailbox: String,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead, Write};
    let (mut logins, mut refused) = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        let stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        let mut reply = |reader: &mut BufReader<std::net::TcpStream>| -> anyhow::Result<String> {
            line.clear();
            reader.read_line(&mut line)?;
            Ok(line.trim_end().to_string())
        };
        ensure!(reply(&mut reader)?.starts_with("+OK"), "POP3 greeting");
        write!(writer, "USER {mailbox}\r\nPASS {POP3_PASSWORD}\r\n")?;
        ensure!(reply(&mut reader)?.starts_with("+OK"), "POP3 USER");
        let pass = reply(&mut reader)?;
        if pass.starts_with("-ERR [AUTH] POP3 is disabled") {
            refused += 1;
            writer.write_all(b"QUIT\r\n")?;
            std::thread::sleep(POP3_PAUSE);
            continue;
        }
        ensure!(
            pass.starts_with("+OK"),
            "POP3 login of {mailbox} refused: {pass}"
        );
        writer.write_all(b"STAT\r\nUIDL\r\nQUIT\r\n")?;
        ensure!(reply(&mut reader)?.starts_with("+OK"), "POP3 STAT");
        ensure!(reply(&mut reader)?.starts_with("+OK"), "POP3 UIDL");
        loop {
            if reply(&mut reader)? == "." {
                break;
            }
        }
        ensure!(reply(&mut reader)?.starts_with("+OK"), "POP3 QUIT");
        logins += 1;
        // Pacing, not synchronisation: each login costs an Argon2id check (tens of ms of
        // CPU). A login per second per reader is a realistic reader load; ten a second
        // took most of a core on this 2-core machine and slowed the import past its
        // bound in the long run.
        std::thread::sleep(POP3_PAUSE);
    }
    Ok((logins, refused))
}

/// Logs in to `mailbox` over IMAP again and again until `stop`: LOGIN, SELECT INBOX,
/// LOGOUT. A refusal because IMAP is off right then (the administrator loop toggles it
/// at site level) is counted, not an error; anything else is. Returns (in, refused).
fn imap_reader(
    addr: SocketAddr,
    mailbox: String,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead, Write};
    let (mut logins, mut refused) = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        let stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        // Reads lines until the one tagged `tag`; returns it.
        let tagged =
            |reader: &mut BufReader<std::net::TcpStream>, tag: &str| -> anyhow::Result<String> {
                loop {
                    let mut line = String::new();
                    ensure!(
                        reader.read_line(&mut line)? > 0,
                        "the IMAP server closed the connection"
                    );
                    if line.starts_with(&format!("{tag} ")) {
                        return Ok(line.trim_end().to_string());
                    }
                }
            };
        let mut greeting = String::new();
        reader.read_line(&mut greeting)?;
        ensure!(greeting.starts_with("* OK"), "IMAP greeting: {greeting}");
        write!(writer, "a LOGIN {mailbox} \"{POP3_PASSWORD}\"\r\n")?;
        let login = tagged(&mut reader, "a")?;
        if login.contains("IMAP is disabled") {
            refused += 1;
            writer.write_all(b"z LOGOUT\r\n")?;
            std::thread::sleep(POP3_PAUSE);
            continue;
        }
        ensure!(
            login.starts_with("a OK"),
            "IMAP login of {mailbox} refused: {login}"
        );
        writer.write_all(b"b SELECT INBOX\r\nc LOGOUT\r\n")?;
        let select = tagged(&mut reader, "b")?;
        ensure!(select.starts_with("b OK"), "IMAP SELECT: {select}");
        ensure!(tagged(&mut reader, "c")?.starts_with("c OK"), "IMAP LOGOUT");
        logins += 1;
        std::thread::sleep(POP3_PAUSE);
    }
    Ok((logins, refused))
}

/// Rounds of reads (three requests each) the readers make per second: about what they
/// reached when every request opened its own connection (3,000 reads/s). A fixed rate
/// keeps the readers a load the server carries in every phase, instead of a
/// closed loop that takes whatever CPU the server leaves and so moves with it.
const READER_ROUNDS_PER_SECOND: u32 = 1_000;

/// Permission checks and admin reads until `stop`, paced to
/// [`READER_ROUNDS_PER_SECOND`]; returns how many succeeded.
fn readers(client: AdminClient, stable: usize, stop: Arc<AtomicBool>) -> anyhow::Result<u64> {
    let mut reads = 0u64;
    let started = Instant::now();
    let every = Duration::from_secs(1) / READER_ROUNDS_PER_SECOND;
    while !stop.load(Ordering::Relaxed) {
        // Load pacing, not synchronisation: behind schedule, go on at once.
        let due = started + every * (reads / 3) as u32;
        if let Some(ahead) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(ahead);
        }
        let who = format!("stable{}", reads as usize % stable);
        let _: Value = client.get(&format!("/protocols/check?recipient={who}&protocol=imap"))?;
        let _: Value = client.get(&format!("/recipients/{who}"))?;
        let _: Value = client.get("/routing")?;
        reads += 3;
    }
    Ok(reads)
}

/// The import file: create every churn recipient, modify each, delete every third.
/// Returns the file and the final state it implies (alias -> display name).
fn import_file(dir: &Path, count: usize) -> anyhow::Result<(PathBuf, BTreeMap<String, String>)> {
    let mut text = String::from("Obj-Class,Mode,Directory Name,Display Name,E-mail Addresses\n");
    let mut expected = BTreeMap::new();
    for i in 0..count {
        text.push_str(&format!(
            "Mailbox,Create,churn{t}-{i},Churn {i},SMTP:churn{t}-{i}@{DOMAIN}\n",
            t = tag()
        ));
        expected.insert(format!("churn{}-{i}", tag()), format!("Churn {i}"));
    }
    for i in 0..count {
        text.push_str(&format!("Mailbox,Modify,churn{}-{i},Changed {i},\n", tag()));
        expected.insert(format!("churn{}-{i}", tag()), format!("Changed {i}"));
    }
    for i in (0..count).step_by(3) {
        text.push_str(&format!("Mailbox,Delete,churn{}-{i},,\n", tag()));
        expected.remove(&format!("churn{}-{i}", tag()));
    }
    let path = dir.join("churn.csv");
    std::fs::write(&path, text)?;
    Ok((path, expected))
}

fn percentiles(mut values: Vec<f64>) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| values[((values.len() - 1) as f64 * p).round() as usize];
    (at(0.5), at(0.99))
}

/// Depth and progress of inbound conversion, health, and when the watchdog reached
/// that verdict (Unix ms).
async fn inbound_at(client: &AdminClient) -> anyhow::Result<(u64, u64, bool, i64)> {
    let c = client.clone();
    let health: Value = call(move || c.health()).await?;
    // Before the watchdog's first look the report lists no queues: not an answer yet.
    let queue = health["queues"]
        .as_array()
        .and_then(|q| {
            q.iter()
                .find(|q| q["queue"] == "inbound conversion")
                .cloned()
        })
        .context("the watchdog has not reported yet")?;
    Ok((
        queue["depth"].as_u64().unwrap_or(0),
        queue["progress"].as_u64().unwrap_or(0),
        health["status"] == "ok",
        health["checked_at_ms"].as_i64().unwrap_or(0),
    ))
}

async fn inbound(client: &AdminClient) -> anyhow::Result<(u64, u64, bool)> {
    let (depth, progress, healthy, _) = inbound_at(client).await?;
    Ok((depth, progress, healthy))
}

/// Waits until the inbound queue is empty (within `bound`), as the store says (the
/// watchdog's report may be a moment old).
async fn drain(client: &AdminClient, bound: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let c = client.clone();
        let queues: Value = call(move || c.get("/queues")).await?;
        let depth = queues["queues"]
            .as_array()
            .and_then(|q| q.iter().find(|q| q["queue"] == "inbound"))
            .and_then(|q| q["depth"].as_u64())
            .context("no inbound queue in /queues")?;
        if depth == 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > bound {
            bail!(
                "the inbound conversion queue still holds {depth} message(s) {bound:?} after the load stopped"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every stable recipient holds each message meant for it exactly once. Returns each
/// message's conversion latency (accepted -> in its direct recipient's mailbox), marked
/// baseline or churn.
async fn check_deliveries(
    client: &AdminClient,
    sent: &[Sent],
    stable: usize,
) -> anyhow::Result<Vec<(bool, f64)>> {
    let mut expected: HashMap<String, HashSet<String>> = HashMap::new();
    for s in sent {
        for r in &s.stable {
            expected.entry(r.clone()).or_default().insert(s.id.clone());
        }
    }
    let accepted_at: HashMap<&str, &Sent> = sent.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut latencies = Vec::new();
    for i in 0..stable {
        let address = format!("stable{i}@{DOMAIN}");
        let c = client.clone();
        let path = format!("/mailboxes/{address}/messages");
        let messages: Vec<Value> = call(move || c.get(&path)).await?;
        let mut seen: HashMap<String, usize> = HashMap::new();
        for m in &messages {
            let id = m["message_id"].as_str().unwrap_or("").to_string();
            if let Some(s) = accepted_at.get(id.as_str())
                && address == s.stable[0]
            {
                let latency = m["received_at_ms"].as_i64().unwrap_or(0) - s.accepted_ms;
                latencies.push((s.baseline, latency.max(0) as f64));
            }
            if accepted_at.contains_key(id.as_str()) {
                *seen.entry(id).or_default() += 1;
            }
        }
        if let Some((id, n)) = seen.iter().find(|(_, n)| **n > 1) {
            bail!("{address} holds message {id} {n} times");
        }
        for id in expected.get(&address).into_iter().flatten() {
            ensure!(
                seen.contains_key(id),
                "{address} never received accepted message {id}"
            );
        }
    }
    Ok(latencies)
}

/// Every routed message is in the outbound queue once, via a connector that served the
/// remote domain in the generation that routed it.
async fn check_outbound(
    client: &AdminClient,
    sent: &[Sent],
    eras: &[RoutingEra],
    initial: &HashSet<String>,
) -> anyhow::Result<()> {
    let c = client.clone();
    let all: Vec<Value> = call(move || {
        // Page through the queue: a long run leaves more entries than one page holds.
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page: Vec<Value> =
                c.get(&format!("/queues/outbound/items?limit=10000&after={after}"))?;
            let Some(last) = page.last() else {
                return Ok(all);
            };
            after = last["id"].as_i64().context("a queue entry without an id")?;
            all.extend(page);
        }
    })
    .await?;
    // This run's entries only (a targeted server may hold others).
    let mine = format!("user{}.", tag());
    let items: Vec<&Value> = all
        .iter()
        .filter(|i| {
            i["recipients"][0]
                .as_str()
                .is_some_and(|r| r.starts_with(&mine))
        })
        .collect();
    let mut per_message: HashMap<String, usize> = HashMap::new();
    for item in &items {
        let generation = item["generation"]
            .as_u64()
            .context("an outbound entry without a generation")?;
        let connector = item["connector"]
            .as_str()
            .context("an outbound entry without a connector")?;
        // The routing table at `generation`: the last administrator change at or before it.
        let serving = eras
            .iter()
            .rev()
            .find(|e| e.generation <= generation)
            .map_or(initial, |e| &e.serving);
        if !serving.contains(connector) {
            let near: Vec<String> = eras
                .iter()
                .filter(|e| e.generation + 40 >= generation && e.generation <= generation + 40)
                .map(|e| format!("{}: {:?}", e.generation, e.serving))
                .collect();
            bail!(
                "an outbound entry (queue id {}) was routed via {connector} at generation {generation}, which did not serve {REMOTE} then (serving: {serving:?}); administrator changes near it: {near:?}",
                item["queue_id"]
            );
        }
        *per_message
            .entry(item["queue_id"].as_str().unwrap_or("").to_string())
            .or_default() += 1;
    }
    ensure!(
        items.len() == sent.len(),
        "{} message(s) accepted for {REMOTE}, {} outbound entries",
        sent.len(),
        items.len()
    );
    ensure!(
        per_message.values().all(|n| *n == 1),
        "a message was routed out twice"
    );
    Ok(())
}

fn scan_log(server: &Server) -> anyhow::Result<()> {
    let Some((_, log)) = &server.child else {
        return Ok(());
    };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    for marker in ["lock order violation", "DEADLOCK", "STALL:", "panicked"] {
        if let Some(line) = text.lines().find(|l| l.contains(marker)) {
            bail!("the server log ({}) reports: {line}", log.display());
        }
    }
    Ok(())
}

fn sigterm(server: &mut Server, deadline: Duration) -> anyhow::Result<Duration> {
    let Some((child, _)) = &mut server.child else {
        bail!("SIGTERM needs a server this run started");
    };
    let started = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    ensure!(status.success(), "kill -TERM failed");
    loop {
        if let Some(exit) = child.try_wait()? {
            ensure!(
                exit.success(),
                "the server exited with {exit} after SIGTERM"
            );
            return Ok(started.elapsed());
        }
        // The process must be gone by the deadline; allow one second for process exit.
        if started.elapsed() > deadline + Duration::from_secs(1) {
            let _ = child.kill();
            bail!(
                "the server was still running {:?} after SIGTERM (deadline {deadline:?})",
                started.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs the whole scenario; see the module documentation. On failure the data folder
/// and the server logs are kept, and the error says where.
pub async fn churn(options: ChurnOptions) -> anyhow::Result<ChurnReport> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().to_path_buf();
    match run(options, &path).await {
        Ok(report) => Ok(report),
        Err(e) => {
            let kept = dir.keep();
            Err(e.context(format!(
                "data folder and server logs kept in {}",
                kept.display()
            )))
        }
    }
}

async fn run(options: ChurnOptions, dir: &Path) -> anyhow::Result<ChurnReport> {
    let mut server = match &options.target {
        Some((url, token, smtp)) => Server {
            child: None,
            smtp: *smtp,
            pop3: options.target_pop3,
            imap: options.target_imap,
            client: AdminClient::new(url, token),
        },
        None => {
            write_config(dir, options.shutdown_deadline)?;
            start_server(&options.binary, dir, 0)?
        }
    };
    let client = client_of(&server);
    let mut report = ChurnReport::default();

    // The stable world: mailboxes, a list of the first five, and the remote connector.
    {
        let c = client.clone();
        let stable = options.stable;
        call(move || {
            // On a targeted server these may exist from an earlier run: that is fine.
            let exists = |r: anyhow::Result<Value>| match r {
                Err(e) if !e.to_string().contains("already used") => Err(e),
                _ => Ok(()),
            };
            if let Err(e) = c.post_no_content("/domains", &json!({"domain": DOMAIN})) {
                tracing::debug!(error = %e, "adding the domain");
            }
            for i in 0..stable {
                exists(c.post("/recipients", &json!({"address": format!("stable{i}@{DOMAIN}"), "alias": format!("stable{i}")})))?;
            }
            for i in 0..(2 * POP3_READERS).min(stable) {
                c.post_no_content(
                    &format!("/recipients/stable{i}/password"),
                    &json!({"password": POP3_PASSWORD}),
                )?;
            }
            let members: Vec<String> = (0..5.min(stable)).map(|i| format!("stable{i}")).collect();
            exists(c.post("/recipients", &json!({"kind": "list", "alias": "stable-list", "address": format!("stable-list@{DOMAIN}"), "members": members})))?;
            let _: Value = c.post("/site", &json!({"change": "put_connector", "connector": churn_connector("churn-a", 1, true)}))?;
            Ok(())
        })
        .await?;
    }
    let initial: HashSet<String> = {
        let c = client.clone();
        let site: Value = call(move || c.get("/site")).await?;
        serving(&site["site"])
    };

    // The readers run through both phases: they are load the server carries whatever
    // the directory does, so the ratio compares the same load with and without
    // directory work.
    let admin_stop = Arc::new(AtomicBool::new(false));
    let readers_stop = Arc::new(AtomicBool::new(false));
    let reading = {
        let (c, stop, stable) = (client.clone(), readers_stop.clone(), options.stable);
        tokio::task::spawn_blocking(move || readers(c, stable, stop))
    };
    let pop3_reading: Vec<_> = match server.pop3 {
        Some(addr) => (0..POP3_READERS.min(options.stable))
            .map(|i| {
                let stop = readers_stop.clone();
                tokio::task::spawn_blocking(move || pop3_reader(addr, format!("stable{i}"), stop))
            })
            .collect(),
        None => Vec::new(),
    };
    // IMAP readers use the mailboxes after the POP3 readers' (both have the password).
    let imap_reading: Vec<_> = match server.imap {
        Some(addr) => (POP3_READERS..2 * POP3_READERS)
            .filter(|i| *i < options.stable)
            .map(|i| {
                let stop = readers_stop.clone();
                tokio::task::spawn_blocking(move || imap_reader(addr, format!("stable{i}"), stop))
            })
            .collect(),
        None => Vec::new(),
    };

    // Phase 1: load without churn.
    let stop = Arc::new(AtomicBool::new(false));
    let baseline = Arc::new(AtomicBool::new(true));
    let counter = Arc::new(AtomicU64::new(0));
    let load = tokio::spawn(smtp_load(
        server.smtp,
        options.sessions,
        options.stable,
        stop.clone(),
        baseline.clone(),
        counter.clone(),
    ));
    let (_, progress0, _) = first_report(&client).await?;
    let turns_baseline_start = {
        let c = client.clone();
        write_turn_sums(&call(move || c.metrics()).await?)
    };
    tokio::time::sleep(options.baseline).await;
    let accepted_baseline = counter.load(Ordering::Relaxed);
    let (_, progress1, healthy) = inbound(&client).await?;
    ensure!(healthy, "unhealthy before any churn");
    report.accepted_per_s_baseline = accepted_baseline as f64 / options.baseline.as_secs_f64();
    report.converted_per_s_baseline =
        (progress1 - progress0) as f64 / options.baseline.as_secs_f64();

    // Phase 2: the same load, with churn.
    baseline.store(false, Ordering::Relaxed);
    let churn_started = Instant::now();
    let (file, expected_directory) = import_file(dir, options.import_recipients)?;
    let import = {
        let c = client.clone();
        call(move || {
            let reader = std::fs::File::open(&file)?;
            let job: Value = c.post_stream(
                "/directory/import?format=csv&name=churn.csv",
                std::io::BufReader::new(reader),
            )?;
            job["id"].as_u64().context("no job id")
        })
        .await?
    };
    let admin = {
        let (c, stop, interval) = (client.clone(), admin_stop.clone(), options.admin_interval);
        tokio::task::spawn_blocking(move || admin_loop(c, interval, stop))
    };
    let turns_before = {
        let c = client.clone();
        write_turn_sums(&call(move || c.metrics()).await?)
    };
    let baseline_holds = hold_per_commit(&turns_baseline_start, &turns_before);
    // Inbound conversion must progress in every one-second window, and stay healthy.
    let (_, mut last_progress, _) = inbound(&client).await?;
    let progress_churn_start = last_progress;
    while churn_started.elapsed() < options.churn {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (depth, progress, healthy, checked_at) = inbound_at(&client).await?;
        ensure!(
            healthy,
            "the server turned unhealthy during churn: {}",
            server_health(&client).await
        );
        // The progress counter comes from the watchdog's verdict; if that verdict is
        // more than a second old, it is the watchdog (its database sample) that fell
        // behind, and the message says so instead of blaming conversion.
        let verdict_age_ms = mailroom_watch::now_ms() - checked_at;
        ensure!(
            verdict_age_ms <= 1000,
            "the watchdog's verdict is {verdict_age_ms} ms old: its sample of the inbound queue ({depth} waiting) fell behind"
        );
        ensure!(
            progress > last_progress || depth == 0,
            "inbound conversion made no progress for a second with {depth} message(s) waiting (watchdog verdict {verdict_age_ms} ms old)"
        );
        last_progress = progress;
    }
    let churn_elapsed = churn_started.elapsed();
    {
        let c = client.clone();
        let after = write_turn_sums(&call(move || c.metrics()).await?);
        let churn_holds = hold_per_commit(&turns_before, &after);
        report.hold_per_commit_ms = churn_holds
            .iter()
            .map(|(caller, churn)| {
                let base = baseline_holds.get(caller).copied().unwrap_or_default();
                (caller.clone(), (base, *churn))
            })
            .collect();
        let mut turns: Vec<(String, f64, f64)> = after
            .into_iter()
            .map(|(caller, (held, waited, _))| {
                let (held0, waited0, _) = turns_before.get(&caller).copied().unwrap_or_default();
                (caller, held - held0, waited - waited0)
            })
            .collect();
        turns.sort_by(|a, b| b.1.total_cmp(&a.1));
        report.write_turns = turns;
    }
    let accepted_churn = counter.load(Ordering::Relaxed) - accepted_baseline;
    report.accepted_per_s_churn = accepted_churn as f64 / churn_elapsed.as_secs_f64();
    report.converted_per_s_churn =
        (last_progress - progress_churn_start) as f64 / churn_elapsed.as_secs_f64();

    stop.store(true, Ordering::Relaxed);
    let mut sent = load.await?;
    // Let the import finish before the administrator loop stops, then stop it.
    let job = wait_job(&client, import).await?;
    admin_stop.store(true, Ordering::Relaxed);
    let admin = admin.await??;
    let directory_elapsed = churn_started.elapsed();

    // Phase 3, the control: the same load and readers again, with no directory work,
    // on the store as the churn left it (bigger than at the baseline).
    drain(&client, Duration::from_secs(60)).await?;
    {
        let stop = Arc::new(AtomicBool::new(false));
        let counter = Arc::new(AtomicU64::new(0));
        let (_, progress0, _) = inbound(&client).await?;
        let load = tokio::spawn(smtp_load(
            server.smtp,
            options.sessions,
            options.stable,
            stop.clone(),
            Arc::new(AtomicBool::new(true)),
            counter.clone(),
        ));
        tokio::time::sleep(options.baseline).await;
        let accepted = counter.load(Ordering::Relaxed);
        let (_, progress1, _) = inbound(&client).await?;
        stop.store(true, Ordering::Relaxed);
        sent.extend(load.await?);
        report.accepted_per_s_after = accepted as f64 / options.baseline.as_secs_f64();
        // Messages stored at each phase's midpoint (the load stopped between the churn
        // and the control, so nothing was added in between).
        let (a, b, c) = (
            accepted_baseline as f64,
            accepted_churn as f64,
            accepted as f64,
        );
        let (mid_before, mid_churn, mid_after) = (a / 2.0, a + b / 2.0, a + b + c / 2.0);
        report.churn_position = if mid_after > mid_before {
            (mid_churn - mid_before) / (mid_after - mid_before)
        } else {
            0.5
        };
        report.converted_per_s_after =
            (progress1 - progress0) as f64 / options.baseline.as_secs_f64();
    }
    readers_stop.store(true, Ordering::Relaxed);
    report.reads = reading.await??;
    for reader in pop3_reading {
        let (logins, refused) = reader.await??;
        report.pop3_logins += logins;
        report.pop3_refused += refused;
    }
    for reader in imap_reading {
        let (logins, refused) = reader.await??;
        report.imap_logins += logins;
        report.imap_refused += refused;
    }
    report.import_rows = job["scanned"].as_u64().unwrap_or(0);
    report.admin_changes = admin.changes;
    report.publish_ms = percentiles(admin.publish_ms.clone());
    report.changes_per_s =
        (report.import_rows as f64 + admin.changes as f64) / directory_elapsed.as_secs_f64();
    ensure!(job["failed"] == 0, "import rows failed: {}", job["errors"]);
    drain(&client, Duration::from_secs(60)).await?;
    report.accepted = sent.len();

    // Every promise, checked.
    let latencies = check_deliveries(&client, &sent, options.stable).await?;
    let pick = |baseline: bool| {
        latencies
            .iter()
            .filter(|(b, _)| *b == baseline)
            .map(|(_, l)| *l)
            .collect()
    };
    report.latency_ms_baseline = percentiles(pick(true));
    report.latency_ms_churn = percentiles(pick(false));
    check_outbound(&client, &sent, &admin.eras, &initial).await?;
    check_directory(&client, &expected_directory, &admin.final_site).await?;
    scan_log(&server)?;
    ensure!(
        server_deadlocks(&client).await? == 0,
        "the deadlock detector reported a cycle"
    );

    // Phase 3: SIGTERM during churn, restart, drain; `rounds` times.
    let mut all_sent = sent;
    // SIGTERM rounds need a server this run started.
    let rounds = if server.child.is_some() {
        options.rounds
    } else {
        0
    };
    for round in 1..=rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let counter = Arc::new(AtomicU64::new(0));
        let load = tokio::spawn(smtp_load(
            server.smtp,
            options.sessions,
            options.stable,
            stop.clone(),
            Arc::new(AtomicBool::new(false)),
            counter.clone(),
        ));
        let admin_stop = Arc::new(AtomicBool::new(false));
        let admin = {
            let (c, stop, interval) = (
                client_of(&server),
                admin_stop.clone(),
                options.admin_interval,
            );
            tokio::task::spawn_blocking(move || admin_loop(c, interval, stop))
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let deadline = options.shutdown_deadline;
        let elapsed = tokio::task::block_in_place(|| sigterm(&mut server, deadline))?;
        report.shutdown_ms.push(elapsed.as_millis());
        stop.store(true, Ordering::Relaxed);
        admin_stop.store(true, Ordering::Relaxed);
        let sent = load.await?;
        let _ = admin.await?; // its last call may have failed with the server gone
        scan_log(&server)?;
        server = start_server(&options.binary, dir, round)?;
        let client = client_of(&server);
        drain(&client, Duration::from_secs(60)).await?;
        all_sent.extend(sent);
        check_deliveries(&client, &all_sent, options.stable)
            .await
            .with_context(|| format!("after SIGTERM round {round} and restart"))?;
    }
    if server.child.is_some() {
        let _ = sigterm(&mut server, options.shutdown_deadline)?;
    }
    scan_log(&server)?;
    Ok(report)
}

/// The first watchdog report after a start (it looks every few hundred ms).
async fn first_report(client: &AdminClient) -> anyhow::Result<(u64, u64, bool)> {
    let started = Instant::now();
    loop {
        match inbound(client).await {
            Ok(report) => return Ok(report),
            Err(e) if started.elapsed() > Duration::from_secs(10) => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn server_health(client: &AdminClient) -> String {
    let c = client.clone();
    call(move || c.health())
        .await
        .map(|v| v.to_string())
        .unwrap_or_else(|e| e.to_string())
}

async fn server_deadlocks(client: &AdminClient) -> anyhow::Result<u64> {
    let c = client.clone();
    let health = call(move || c.health()).await?;
    Ok(health["deadlocks"].as_u64().unwrap_or(0))
}

/// How long the import may still run once the SMTP load stopped (the long run's
/// 233,334-row import takes 3-4 minutes on 2 cores while mail flows).
const IMPORT_BOUND: Duration = Duration::from_secs(600);

async fn wait_job(client: &AdminClient, id: u64) -> anyhow::Result<Value> {
    let started = Instant::now();
    loop {
        let c = client.clone();
        let job: Value = call(move || c.get(&format!("/jobs/{id}"))).await?;
        if job["state"] != "running" {
            return Ok(job);
        }
        ensure!(
            started.elapsed() < IMPORT_BOUND,
            "the import job did not finish within {IMPORT_BOUND:?} after the load stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The directory holds exactly the churn recipients the import leaves, with their last
/// display names, and the site is what the administrator loop last made it.
async fn check_directory(
    client: &AdminClient,
    expected: &BTreeMap<String, String>,
    final_site: &Value,
) -> anyhow::Result<()> {
    let c = client.clone();
    let recipients: Vec<Value> = call(move || c.get("/recipients?kind=mailbox")).await?;
    let actual: BTreeMap<String, String> = recipients
        .iter()
        .filter(|r| {
            r["alias"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("churn{}-", tag())))
        })
        .map(|r| {
            (
                r["alias"].as_str().unwrap_or("").to_string(),
                r["display_name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    if &actual != expected {
        let missing: Vec<_> = expected
            .keys()
            .filter(|k| !actual.contains_key(*k))
            .take(5)
            .collect();
        let extra: Vec<_> = actual
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .take(5)
            .collect();
        bail!(
            "the directory differs from the changes applied: missing {missing:?}, unexpected {extra:?}"
        );
    }
    let c = client.clone();
    let site: Value = call(move || c.get("/site")).await?;
    ensure!(
        &site["site"] == final_site,
        "the site differs from the administrator's last change:\n{}\nvs\n{}",
        site["site"],
        final_site
    );
    Ok(())
}
