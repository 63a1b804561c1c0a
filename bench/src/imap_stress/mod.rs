//! A state-tracking IMAP stress client: N clients share one mailbox and issue a weighted
//! random mix of APPEND (synchronising and LITERAL+), COPY, STATUS, FETCH (flags,
//! envelope, bodies), STORE (flags, keywords), SEARCH, EXPUNGE and NOOP, while a model of
//! the mailbox checks every response.
//!
//! Why our own: `bench/imap` once showed parity with Dovecot while a state-tracking mix
//! showed 0.26x and hundreds of protocol errors; a benchmark that does not check answers
//! measures a server that may be wrong. This one runs against Mailroom and Dovecot with
//! the same load (`bench/imap-stress`, part of `bench/run`) and briefly in `cargo test`
//! (bench/tests/imap_stress.rs) where it must report 0 errors.
//!
//! The model. Every message is owned by the client that appended it, and only its owner
//! changes its flags or deletes it; everyone reads everything. So:
//! - the owner knows its messages' flags exactly, and checks every FETCH and SEARCH of
//!   them against that;
//! - every flag state a message goes through is recorded (before the STORE is sent) in a
//!   shared history; another client must see states in history order, never one that was
//!   not set, never an older one after a newer one;
//! - a message may vanish only after its owner set `\Deleted` (recorded before the STORE);
//!   an EXPUNGE of anything else, or an owned message missing after a re-SELECT, is a lost
//!   message;
//! - every session keeps its own sequence-number-to-UID map from EXISTS, EXPUNGE and
//!   FETCH: EXISTS may not shrink the mailbox, EXPUNGE and FETCH must name a sequence
//!   number that exists, UIDs must ascend with sequence numbers, new ones above old ones;
//! - every keyword in a FETCH must have been announced in an untagged FLAGS first;
//! - with CONDSTORE, a message's MODSEQ never decreases for a session and grows whenever
//!   its flags change; HIGHESTMODSEQ at SELECT is at least every MODSEQ the same client
//!   saw in its earlier sessions;
//! - with QRESYNC, a client that logs in again selects with the UIDVALIDITY, the
//!   HIGHESTMODSEQ and the UIDs it knew: every UID it knew that is gone must be named by
//!   VANISHED, none that is there; every message whose MODSEQ shows a change between the
//!   two HIGHESTMODSEQs must come with a FETCH in the SELECT;
//! - bodies, sizes and envelopes must be those appended (the Message-ID names the
//!   message; the bytes are kept);
//! - any NO or BAD, and any BYE not asked for, is an error.
//!
//! An error is reported with the last lines the session sent and received.

pub mod wire;

use anyhow::{Context, bail};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use wire::Tok;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The IMAP server.
    pub server: SocketAddr,
    /// Login name.
    pub user: String,
    /// Password.
    pub password: String,
    /// Clients side by side.
    pub clients: usize,
    /// How long the measured mix runs.
    pub duration: Duration,
    /// Log out and in again after this many commands (None: sessions kept open).
    pub commands_per_login: Option<u32>,
    /// The mailbox size the mix keeps near (appends and expunges balance around it).
    pub messages: usize,
    /// Random seed (the mix is reproducible per client for a given seed).
    pub seed: u64,
    /// SELECT with (CONDSTORE) and check MODSEQ.
    pub condstore: bool,
    /// ENABLE QRESYNC: expunges come as VANISHED, and a client logging in again
    /// resynchronises with SELECT (QRESYNC ...), which is checked against what it finds.
    pub qresync: bool,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    /// Commands completed per type, with the total time they took (client-side).
    pub commands: BTreeMap<&'static str, (u64, Duration)>,
    /// Errors found (all counted; the first ones kept with their transcripts).
    pub error_count: u64,
    /// The first errors, each with its transcript.
    pub errors: Vec<String>,
    /// The measured time.
    pub elapsed: Duration,
}

impl Report {
    /// All commands.
    pub fn total(&self) -> u64 {
        self.commands.values().map(|(n, _)| n).sum()
    }

    /// The report as JSON: commands/s overall and per type, errors.
    pub fn json(&self) -> serde_json::Value {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let per: serde_json::Map<String, serde_json::Value> = self
            .commands
            .iter()
            .map(|(k, (n, _))| (k.to_string(), serde_json::json!(*n as f64 / secs)))
            .collect();
        serde_json::json!({
            "commands": self.total(),
            "per_sec": self.total() as f64 / secs,
            "by_type": per,
            "errors": self.error_count,
            "secs": secs,
        })
    }
}

/// Flags a message's owner sets and clears.
const FLAGS: [&str; 4] = ["\\Flagged", "\\Answered", "\\Seen", "\\Draft"];
/// Keywords a message's owner sets and clears.
const KEYWORDS: [&str; 6] = ["$Work", "$Personal", "$ToDo", "Later", "$Label1", "Junk"];
/// Words in subjects, for SEARCH SUBJECT.
const WORDS: [&str; 6] = [
    "quarterly",
    "invoice",
    "lunch",
    "report",
    "meeting",
    "travel",
];

/// One appended message.
struct Expected {
    bytes: Vec<u8>,
    subject: String,
}

/// The model shared by every client.
#[derive(Default)]
struct Shared {
    /// By Message-ID.
    messages: HashMap<String, Arc<Expected>>,
    /// Flag states per UID, in the order the owner set them (without \Recent).
    history: HashMap<u32, Vec<BTreeSet<String>>>,
    /// UIDs whose owner set \Deleted: they may vanish.
    deleting: HashSet<u32>,
    /// Owner of each UID.
    owner: HashMap<u32, usize>,
    report: Report,
}

type SharedRef = Arc<Mutex<Shared>>;

/// A tiny deterministic generator (SplitMix64): the mix must not depend on a crate's
/// algorithm changing between versions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Runs the stress mix; the mailbox used is created fresh and deleted at the end.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let mailbox = format!("stress-{}", options.seed);
    {
        let mut c = Conn::connect(&options).await?;
        c.command("setup", &format!("CREATE {mailbox}"), None)
            .await?;
        c.command("setup", "LOGOUT", None).await.ok();
    }
    let shared: SharedRef = Arc::default();
    let start_gate = Arc::new(tokio::sync::Barrier::new(options.clients));
    let measured = Arc::new(Mutex::new(None::<Instant>));
    let mut tasks = Vec::new();
    for id in 0..options.clients {
        let options = options.clone();
        let shared = shared.clone();
        let mailbox = mailbox.clone();
        let gate = start_gate.clone();
        let measured = measured.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::new(id, options, shared.clone(), mailbox);
            let result = client.run(gate, measured).await;
            if let Err(e) = result {
                client.error(format!("session failed: {e:#}"));
            }
        }));
    }
    for t in tasks {
        t.await.context("a client task panicked")?;
    }
    let started = measured.lock().unwrap().unwrap_or_else(Instant::now);
    let elapsed = started
        .elapsed()
        .min(options.duration + Duration::from_secs(5));
    {
        let mut c = Conn::connect(&options).await?;
        c.command("setup", &format!("DELETE {mailbox}"), None)
            .await
            .ok();
        c.command("setup", "LOGOUT", None).await.ok();
    }
    let mut shared = shared.lock().unwrap();
    let mut report = std::mem::take(&mut shared.report);
    report.commands.remove("setup");
    report.elapsed = elapsed.max(Duration::from_millis(1));
    Ok(report)
}

/// One connection: sends commands, reads responses, keeps a transcript.
struct Conn {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    tag: u64,
    transcript: VecDeque<String>,
}

/// What a command got back: its untagged responses (raw, tag stripped) and the tagged
/// status line.
struct Answer {
    untagged: Vec<Vec<u8>>,
    status: String,
}

impl Answer {
    fn ok(&self) -> bool {
        self.status.starts_with("OK")
    }
}

fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().next().unwrap_or("");
    if line.len() > 160 || text.len() > line.len() + 2 {
        format!(
            "{}… ({} bytes)",
            &line[..line.floor_char_boundary(160)],
            bytes.len()
        )
    } else {
        line.to_string()
    }
}

impl Conn {
    async fn connect(options: &Options) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(options.server).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let mut conn = Conn {
            reader: BufReader::new(r),
            writer: w,
            tag: 0,
            transcript: VecDeque::new(),
        };
        let greeting = wire::read_response(&mut conn.reader).await?;
        conn.note("S", &greeting);
        if !greeting.starts_with(b"* OK") {
            bail!("greeting: {}", shown(&greeting));
        }
        let answer = conn
            .command(
                "login",
                &format!(
                    "LOGIN {} {}",
                    quoted(&options.user),
                    quoted(&options.password)
                ),
                None,
            )
            .await?;
        if !answer.ok() {
            bail!("LOGIN: {}", answer.status);
        }
        Ok(conn)
    }

    fn note(&mut self, who: &str, bytes: &[u8]) {
        if self.transcript.len() >= 40 {
            self.transcript.pop_front();
        }
        self.transcript
            .push_back(format!("{who}: {}", shown(bytes)));
    }

    /// Sends one command (a literal, when given, goes as a non-synchronising LITERAL+
    /// after the text) and reads everything up to its tagged answer.
    async fn command(
        &mut self,
        _kind: &'static str,
        text: &str,
        literal: Option<(&[u8], bool)>,
    ) -> anyhow::Result<Answer> {
        self.tag += 1;
        let tag = format!("s{}", self.tag);
        let mut out = format!("{tag} {text}").into_bytes();
        match literal {
            Some((data, false)) => {
                out.extend_from_slice(format!(" {{{}+}}\r\n", data.len()).as_bytes());
                out.extend_from_slice(data);
            }
            Some((data, true)) => {
                // A synchronising literal, as most desktop clients send: wait for "+".
                out.extend_from_slice(format!(" {{{}}}\r\n", data.len()).as_bytes());
                self.note("C", &out);
                self.writer.write_all(&out).await?;
                let go = wire::read_response(&mut self.reader).await?;
                self.note("S", &go);
                if !go.starts_with(b"+") {
                    bail!("no continuation for a literal: {}", shown(&go));
                }
                out = data.to_vec();
            }
            None => {}
        }
        out.extend_from_slice(b"\r\n");
        self.note("C", &out);
        self.writer.write_all(&out).await?;
        let mut untagged = Vec::new();
        loop {
            let response = wire::read_response(&mut self.reader).await?;
            self.note("S", &response);
            if let Some(rest) = response.strip_prefix(format!("{tag} ").as_bytes()) {
                return Ok(Answer {
                    untagged,
                    status: String::from_utf8_lossy(rest).into_owned(),
                });
            }
            if response.starts_with(b"+") {
                continue;
            }
            if !response.starts_with(b"* ") {
                bail!("a response neither untagged nor ours: {}", shown(&response));
            }
            untagged.push(response[2..].to_vec());
        }
    }
}

fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A session's view of the selected mailbox.
#[derive(Default)]
struct View {
    /// UID by sequence number - 1 (None until a FETCH names it).
    uids: Vec<Option<u32>>,
    /// The keywords the server announced in its last FLAGS.
    announced: HashSet<String>,
    /// Per UID: (the last MODSEQ and flags this session saw, index into the history).
    seen: HashMap<u32, Seen>,
}

#[derive(Default, Clone)]
struct Seen {
    modseq: u64,
    flags: Option<BTreeSet<String>>,
    history_at: usize,
}

/// What a session knew of the mailbox when it logged out.
struct Resync {
    uidvalidity: u64,
    highestmodseq: u64,
    uids: Vec<u32>,
}

/// One stress client: owns the messages it appended, reads everyone's.
struct Client {
    id: usize,
    options: Options,
    shared: SharedRef,
    mailbox: String,
    rng: Rng,
    /// Owned messages: UID to exact flags.
    own: BTreeMap<u32, BTreeSet<String>>,
    /// Owned UIDs set \Deleted (may be gone any time).
    own_deleting: HashSet<u32>,
    /// Owned messages' subjects (for SEARCH SUBJECT).
    own_subject: HashMap<u32, String>,
    appended: u64,
    /// The highest MODSEQ this client saw (HIGHESTMODSEQ may not fall below it).
    max_modseq: u64,
    view: View,
    /// What the last session knew, for SELECT (QRESYNC ...) at the next login.
    resync: Option<Resync>,
    /// During a login: UIDs named by VANISHED (EARLIER), and by FETCH in the SELECT.
    vanished_earlier: HashSet<u32>,
    vanished_live: HashSet<u32>,
    select_fetched: HashSet<u32>,
    in_select: bool,
    conn: Option<Conn>,
    since_login: u32,
    errors_here: u32,
}

/// The operations of the mix, with their weights.
const MIX: [(&str, u32); 11] = [
    ("append", 12),
    ("copy", 5),
    ("status", 4),
    ("fetch_flags", 12),
    ("fetch_envelope", 14),
    ("fetch_body", 12),
    ("store_flags", 14),
    ("store_keyword", 10),
    ("search", 12),
    ("expunge", 10),
    ("noop", 4),
];

impl Client {
    fn new(id: usize, options: Options, shared: SharedRef, mailbox: String) -> Client {
        let seed = options.seed ^ ((id as u64 + 1) * 0x1000_0000_01B3);
        Client {
            id,
            options,
            shared,
            mailbox,
            rng: Rng(seed),
            own: BTreeMap::new(),
            own_deleting: HashSet::new(),
            own_subject: HashMap::new(),
            appended: 0,
            max_modseq: 0,
            view: View::default(),
            resync: None,
            vanished_earlier: HashSet::new(),
            vanished_live: HashSet::new(),
            select_fetched: HashSet::new(),
            in_select: false,
            conn: None,
            since_login: 0,
            errors_here: 0,
        }
    }

    fn error(&mut self, what: String) {
        self.errors_here += 1;
        let transcript = self
            .conn
            .as_ref()
            .map(|c| {
                c.transcript
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n    ")
            })
            .unwrap_or_default();
        let mut shared = self.shared.lock().unwrap();
        shared.report.error_count += 1;
        if shared.report.errors.len() < 20 {
            shared.report.errors.push(format!(
                "client {}: {what}\n  transcript (last lines):\n    {transcript}",
                self.id
            ));
        }
    }

    async fn run(
        &mut self,
        gate: Arc<tokio::sync::Barrier>,
        measured: Arc<Mutex<Option<Instant>>>,
    ) -> anyhow::Result<()> {
        self.login(false).await?;
        // Fill to the target size first (not measured).
        let share = self.options.messages / self.options.clients.max(1);
        while self.own.len() < share {
            self.append(false).await?;
        }
        gate.wait().await;
        let until = {
            let mut m = measured.lock().unwrap();
            let start = *m.get_or_insert_with(Instant::now);
            start + self.options.duration
        };
        while Instant::now() < until && self.errors_here < 50 {
            if let Some(limit) = self.options.commands_per_login
                && self.since_login >= limit
            {
                if let Some(r) = &mut self.resync {
                    r.uids = self.view.uids.iter().flatten().copied().collect();
                }
                self.timed("logout", "LOGOUT", None).await?;
                self.conn = None;
                self.login(true).await?;
            }
            self.learn_uids().await?;
            let op = self.pick(share);
            match op {
                "append" => self.append(true).await?,
                "copy" => self.copy().await?,
                "status" => self.status().await?,
                "fetch_flags" => self.fetch_flags().await?,
                "fetch_envelope" => self.fetch_envelope().await?,
                "fetch_body" => self.fetch_body().await?,
                "store_flags" => self.store(false).await?,
                "store_keyword" => self.store(true).await?,
                "search" => self.search().await?,
                "expunge" => self.expunge().await?,
                _ => {
                    self.timed("noop", "NOOP", None).await?;
                }
            }
        }
        if self.conn.is_some() {
            self.timed("logout", "LOGOUT", None).await.ok();
        }
        Ok(())
    }

    /// Picks an operation; appends and expunges lean towards keeping the client's share
    /// of the mailbox near its target.
    fn pick(&mut self, share: usize) -> &'static str {
        let live = self.own.len() - self.own_deleting.len().min(self.own.len());
        let weights: Vec<(&'static str, u32)> = MIX
            .iter()
            .map(|(op, w)| {
                let w = match *op {
                    "append" | "copy" if live < share => w * 2,
                    "append" | "copy" => w / 2,
                    "expunge" if live > share => w * 2,
                    "expunge" => w / 3,
                    _ => *w,
                };
                (*op, w)
            })
            .collect();
        let total: u32 = weights.iter().map(|(_, w)| w).sum();
        let mut at = self.rng.below(total as usize) as u32;
        for (op, w) in weights {
            if at < w {
                return op;
            }
            at -= w;
        }
        "noop"
    }

    async fn login(&mut self, measured: bool) -> anyhow::Result<()> {
        let started = Instant::now();
        let conn = Conn::connect(&self.options).await?;
        if measured {
            self.count("login", started.elapsed());
        }
        self.conn = Some(conn);
        self.since_login = 0;
        let previous = std::mem::take(&mut self.view);
        let resync = self.resync.take();
        self.vanished_earlier.clear();
        self.vanished_live.clear();
        self.select_fetched.clear();
        let param = if self.options.qresync {
            self.timed_if(measured, "enable", "ENABLE QRESYNC", None)
                .await?;
            match &resync {
                Some(r) => {
                    let known: Vec<u32> = r.uids.clone();
                    format!(
                        " (QRESYNC ({} {}{}))",
                        r.uidvalidity,
                        r.highestmodseq,
                        if known.is_empty() {
                            String::new()
                        } else {
                            format!(" {}", uid_set(&known))
                        }
                    )
                }
                None => String::new(),
            }
        } else if self.options.condstore {
            " (CONDSTORE)".into()
        } else {
            String::new()
        };
        drop(previous);
        let text = format!("SELECT {}{param}", self.mailbox);
        // MODSEQs this client saw in earlier sessions: HIGHESTMODSEQ may not be below
        // them. (Within the SELECT a FETCH may show a higher one: RFC 7162 3.2 lets
        // HIGHESTMODSEQ lag, the safe direction, and Dovecot does so.)
        let seen_before = self.max_modseq;
        self.in_select = true;
        let answer = self.timed_if(measured, "select", &text, None).await;
        self.in_select = false;
        let answer = answer?;
        let mut highest = None;
        let mut uidvalidity = None;
        for r in &answer.untagged {
            if let Some(v) = code_number(r, "HIGHESTMODSEQ") {
                highest = Some(v);
            }
            if let Some(v) = code_number(r, "UIDVALIDITY") {
                uidvalidity = Some(v);
            }
        }
        if self.options.condstore {
            let max = seen_before;
            match highest {
                None => self.error("SELECT (CONDSTORE) gave no HIGHESTMODSEQ".into()),
                Some(h) if h < max => self.error(format!(
                    "HIGHESTMODSEQ {h} at SELECT is below MODSEQ {max} seen before"
                )),
                _ => {}
            }
        }
        // A client learns the UIDs and flags of what it just selected.
        if !self.view.uids.is_empty() {
            let items = self.flag_items();
            self.timed_if(
                measured,
                "fetch_flags",
                &format!("FETCH 1:* ({items})"),
                None,
            )
            .await?;
        }
        let present: HashSet<u32> = self.view.uids.iter().flatten().copied().collect();
        // QRESYNC: what the SELECT said changed must be what did.
        if let (Some(r), Some(new_highest)) = (&resync, highest)
            && uidvalidity == Some(r.uidvalidity)
        {
            let mut wrong = Vec::new();
            for u in &r.uids {
                if present.contains(u) {
                    if self.vanished_earlier.contains(u) {
                        wrong.push(format!("VANISHED (EARLIER) named UID {u}, which is there"));
                    }
                    let m = self.view.seen.get(u).map(|s| s.modseq).unwrap_or(0);
                    if m > r.highestmodseq && m <= new_highest && !self.select_fetched.contains(u) {
                        wrong.push(format!(
                            "UID {u} changed at MODSEQ {m} (after {} and by {new_highest}) but SELECT (QRESYNC) sent no FETCH for it",
                            r.highestmodseq
                        ));
                    }
                } else if !self.vanished_earlier.contains(u) && !self.vanished_live.contains(u) {
                    wrong.push(format!(
                        "UID {u} is gone but SELECT (QRESYNC) did not name it in VANISHED"
                    ));
                }
            }
            for w in wrong {
                self.error(w);
            }
        }
        if let (true, Some(v), Some(h)) = (self.options.qresync, uidvalidity, highest) {
            self.resync = Some(Resync {
                uidvalidity: v,
                highestmodseq: h,
                uids: Vec::new(),
            });
        }
        // Every owned message not being deleted must be here.
        let lost: Vec<u32> = self
            .own
            .keys()
            .filter(|u| !present.contains(u) && !self.own_deleting.contains(u))
            .copied()
            .collect();
        if !lost.is_empty() {
            self.error(format!(
                "owned messages missing after SELECT: UIDs {lost:?}"
            ));
        }
        let gone: Vec<u32> = self
            .own
            .keys()
            .filter(|u| !present.contains(u))
            .copied()
            .collect();
        for u in gone {
            self.own_subject.remove(&u);
            self.own.remove(&u);
            self.own_deleting.remove(&u);
        }
        Ok(())
    }

    fn flag_items(&self) -> &'static str {
        if self.options.condstore {
            "UID FLAGS MODSEQ"
        } else {
            "UID FLAGS"
        }
    }

    fn count(&self, kind: &'static str, took: Duration) {
        let mut shared = self.shared.lock().unwrap();
        let e = shared.report.commands.entry(kind).or_default();
        e.0 += 1;
        e.1 += took;
    }

    async fn timed(
        &mut self,
        kind: &'static str,
        text: &str,
        literal: Option<(&[u8], bool)>,
    ) -> anyhow::Result<Answer> {
        self.timed_if(true, kind, text, literal).await
    }

    /// Runs a command, counts it (when measured), feeds its untagged responses to the
    /// model and reports a NO or BAD.
    async fn timed_if(
        &mut self,
        measured: bool,
        kind: &'static str,
        text: &str,
        literal: Option<(&[u8], bool)>,
    ) -> anyhow::Result<Answer> {
        let started = Instant::now();
        let conn = self.conn.as_mut().context("not connected")?;
        let answer = conn.command(kind, text, literal).await?;
        if measured {
            self.count(kind, started.elapsed());
        }
        self.since_login += 1;
        for r in &answer.untagged {
            self.untagged(r, text);
        }
        if !answer.ok() {
            self.error(format!("{text:.80} → {}", answer.status));
        }
        Ok(answer)
    }

    /// Applies one untagged response to the view, checking it.
    fn untagged(&mut self, r: &[u8], command: &str) {
        let toks = match wire::tokens(r) {
            Ok(t) => t,
            Err(e) => {
                self.error(format!("unparsable response ({e}): {}", shown(r)));
                return;
            }
        };
        let first = toks.first().and_then(Tok::atom_upper).unwrap_or_default();
        let second = toks.get(1).and_then(Tok::atom_upper).unwrap_or_default();
        if first == "BYE" && !command.eq_ignore_ascii_case("LOGOUT") {
            self.error(format!("unasked BYE: {}", shown(r)));
        } else if first == "FLAGS" {
            if let Some(Tok::List(flags)) = toks.get(1) {
                self.view.announced = flags
                    .iter()
                    .filter_map(|t| match t {
                        Tok::Atom(a) => Some(a.to_ascii_lowercase()),
                        _ => None,
                    })
                    .collect();
            }
        } else if first == "VANISHED" {
            let (earlier, set) = match (toks.get(1), toks.get(2)) {
                (Some(Tok::List(l)), Some(Tok::Atom(set)))
                    if l.first().and_then(Tok::atom_upper).as_deref() == Some("EARLIER") =>
                {
                    (true, set.clone())
                }
                (Some(Tok::Atom(set)), None) => (false, set.clone()),
                _ => {
                    self.error(format!("malformed VANISHED: {}", shown(r)));
                    return;
                }
            };
            let Some(uids) = parse_uid_set(&set) else {
                self.error(format!("malformed VANISHED set: {}", shown(r)));
                return;
            };
            if !self.options.qresync {
                self.error(format!("VANISHED without ENABLE QRESYNC: {}", shown(r)));
            }
            for uid in uids {
                if earlier {
                    if self.view.uids.contains(&Some(uid)) {
                        self.error(format!(
                            "VANISHED (EARLIER) names UID {uid}, which this session has"
                        ));
                    }
                    self.vanished_earlier.insert(uid);
                    // Gone before this session: the owner must have deleted it.
                    let deleting = self.shared.lock().unwrap().deleting.contains(&uid);
                    let known = self.shared.lock().unwrap().owner.contains_key(&uid);
                    if known && !deleting {
                        self.error(format!(
                            "VANISHED (EARLIER) names UID {uid}, which nobody deleted"
                        ));
                    }
                    continue;
                }
                self.vanished_live.insert(uid);
                match self.seq_for_uid(uid) {
                    Some(seq) => self.expunged(seq),
                    None => self.error(format!(
                        "VANISHED names UID {uid}, which this session never had"
                    )),
                }
            }
        } else if let Some(n) = toks.first().and_then(Tok::number) {
            let n = n as usize;
            match second.as_str() {
                "EXISTS" => {
                    if n < self.view.uids.len() {
                        self.error(format!(
                            "EXISTS {n} shrinks the mailbox from {} without EXPUNGE",
                            self.view.uids.len()
                        ));
                    }
                    self.view.uids.resize(n.max(self.view.uids.len()), None);
                }
                "EXPUNGE" => self.expunged(n),
                "FETCH" => {
                    if let Some(Tok::List(items)) = toks.get(2) {
                        self.fetched(n, items);
                    } else {
                        self.error(format!("FETCH without items: {}", shown(r)));
                    }
                }
                _ => {}
            }
        }
    }

    /// The sequence number of `uid`: where it is, or the placeholder its neighbours
    /// leave room for (a message whose UID the session has not fetched yet).
    fn seq_for_uid(&self, uid: u32) -> Option<usize> {
        if let Some(i) = self.view.uids.iter().position(|u| *u == Some(uid)) {
            return Some(i + 1);
        }
        let mut prev = 0u32;
        for (i, u) in self.view.uids.iter().enumerate() {
            match u {
                Some(k) => {
                    if *k > uid {
                        return None;
                    }
                    prev = *k;
                }
                None if prev < uid => {
                    let next = self.view.uids[i..].iter().flatten().next();
                    if next.is_none_or(|n| *n > uid) {
                        return Some(i + 1);
                    }
                }
                None => {}
            }
        }
        None
    }

    fn expunged(&mut self, n: usize) {
        if n == 0 || n > self.view.uids.len() {
            self.error(format!(
                "EXPUNGE {n} with {} messages in the session",
                self.view.uids.len()
            ));
            return;
        }
        let Some(uid) = self.view.uids.remove(n - 1) else {
            return;
        };
        self.view.seen.remove(&uid);
        let deleting = self.shared.lock().unwrap().deleting.contains(&uid);
        if !deleting {
            self.error(format!(
                "EXPUNGE of UID {uid}, which nobody set \\Deleted on: a lost message"
            ));
        }
        self.own.remove(&uid);
        self.own_subject.remove(&uid);
        self.own_deleting.remove(&uid);
    }

    fn fetched(&mut self, n: usize, items: &[Tok]) {
        if n == 0 || n > self.view.uids.len() {
            self.error(format!(
                "FETCH of message {n} with {} messages in the session",
                self.view.uids.len()
            ));
            return;
        }
        let mut uid = None;
        let mut flags = None;
        let mut modseq = None;
        let mut size = None;
        let mut envelope = None;
        let mut body = None;
        let mut i = 0;
        while i + 1 < items.len() {
            let name = items[i].atom_upper().unwrap_or_default();
            let value = &items[i + 1];
            match name.as_str() {
                "UID" => uid = value.number().map(|u| u as u32),
                "FLAGS" => {
                    if let Tok::List(l) = value {
                        flags = Some(
                            l.iter()
                                .filter_map(|t| match t {
                                    Tok::Atom(a) => Some(a.clone()),
                                    _ => None,
                                })
                                .collect::<Vec<_>>(),
                        );
                    }
                }
                "MODSEQ" => {
                    if let Tok::List(l) = value {
                        modseq = l.first().and_then(Tok::number);
                    }
                }
                "RFC822.SIZE" => size = value.number(),
                "ENVELOPE" => envelope = Some(value.clone()),
                "BODY[]" => body = value.bytes().map(<[u8]>::to_vec),
                _ => {}
            }
            i += 2;
        }
        // The sequence number's UID.
        let known = self.view.uids[n - 1];
        let uid = match (known, uid) {
            (Some(k), Some(u)) if k != u => {
                self.error(format!(
                    "FETCH {n} says UID {u}, but message {n} is UID {k} in this session"
                ));
                return;
            }
            (Some(k), _) => k,
            (None, Some(u)) => {
                let before = self.view.uids[..n - 1].iter().rev().flatten().next();
                let after = self.view.uids[n..].iter().flatten().next();
                if before.is_some_and(|b| *b >= u) || after.is_some_and(|a| *a <= u) {
                    self.error(format!(
                        "UID {u} at message {n} is out of order (before: {before:?}, after: {after:?})"
                    ));
                }
                self.view.uids[n - 1] = Some(u);
                u
            }
            (None, None) => return,
        };
        if self.in_select {
            self.select_fetched.insert(uid);
        }
        if let Some(flags) = flags {
            self.check_flags(uid, flags, modseq);
        } else if let Some(m) = modseq {
            self.check_modseq(uid, m, None);
        }
        if size.is_some() || envelope.is_some() || body.is_some() {
            self.check_content(uid, size, envelope, body);
        }
    }

    fn check_flags(&mut self, uid: u32, flags: Vec<String>, modseq: Option<u64>) {
        for f in &flags {
            if !f.starts_with('\\') && !self.view.announced.contains(&f.to_ascii_lowercase()) {
                self.error(format!(
                    "keyword {f} of UID {uid} shown before an untagged FLAGS announced it"
                ));
                // Once reported, do not report it again for this session.
                self.view.announced.insert(f.to_ascii_lowercase());
            }
        }
        let set: BTreeSet<String> = flags
            .into_iter()
            .filter(|f| !f.eq_ignore_ascii_case("\\Recent"))
            .map(|f| canonical(&f))
            .collect();
        if let Some(m) = modseq {
            self.check_modseq(uid, m, Some(&set));
        }
        if let Some(expected) = self.own.get(&uid) {
            if *expected != set {
                self.error(format!(
                    "UID {uid} (ours) shows flags {set:?}, we set {expected:?}"
                ));
            }
        } else {
            let shared = self.shared.lock().unwrap();
            if let Some(history) = shared.history.get(&uid) {
                let seen = self.view.seen.entry(uid).or_default();
                match history[seen.history_at..].iter().position(|s| *s == set) {
                    Some(p) => seen.history_at += p,
                    None => {
                        let was = history.clone();
                        let at = seen.history_at;
                        drop(shared);
                        self.error(format!(
                            "UID {uid} shows flags {set:?}: not a state its owner set since {at} (history {was:?})"
                        ));
                    }
                }
            }
        }
        self.view.seen.entry(uid).or_default().flags = Some(set);
    }

    fn check_modseq(&mut self, uid: u32, modseq: u64, flags: Option<&BTreeSet<String>>) {
        let seen = self.view.seen.entry(uid).or_default().clone();
        if modseq < seen.modseq {
            self.error(format!(
                "MODSEQ of UID {uid} went back from {} to {modseq}",
                seen.modseq
            ));
        } else if let (Some(before), Some(now)) = (&seen.flags, flags)
            && before != now
            && modseq == seen.modseq
        {
            self.error(format!(
                "flags of UID {uid} changed ({before:?} → {now:?}) but MODSEQ stayed {modseq}"
            ));
        }
        self.view.seen.entry(uid).or_default().modseq = modseq.max(seen.modseq);
        self.max_modseq = self.max_modseq.max(modseq);
    }

    fn check_content(
        &mut self,
        uid: u32,
        size: Option<u64>,
        envelope: Option<Tok>,
        body: Option<Vec<u8>>,
    ) {
        let id = match (&envelope, &body) {
            (Some(Tok::List(env)), _) => env.get(9).and_then(Tok::bytes).map(|b| {
                String::from_utf8_lossy(b)
                    .trim_matches(['<', '>'])
                    .to_string()
            }),
            (_, Some(b)) => message_id(b),
            _ => None,
        };
        let id = match id {
            Some(id) => id,
            None if size.is_some() && envelope.is_none() && body.is_none() => return,
            None => {
                self.error(format!("UID {uid}: no Message-ID in the envelope or body"));
                return;
            }
        };
        let expected = self.shared.lock().unwrap().messages.get(&id).cloned();
        let Some(expected) = expected else {
            self.error(format!("UID {uid}: Message-ID {id} was never appended"));
            return;
        };
        if let Some(s) = size
            && s != expected.bytes.len() as u64
        {
            self.error(format!(
                "UID {uid}: RFC822.SIZE {s}, appended {} bytes",
                expected.bytes.len()
            ));
        }
        if let Some(Tok::List(env)) = &envelope {
            let subject = env.get(1).and_then(Tok::bytes).unwrap_or_default();
            if subject != expected.subject.as_bytes() {
                self.error(format!(
                    "UID {uid}: ENVELOPE subject {:?}, appended {:?}",
                    String::from_utf8_lossy(subject),
                    expected.subject
                ));
            }
        }
        if let Some(b) = body
            && b != expected.bytes
        {
            self.error(format!(
                "UID {uid}: BODY[] differs from the appended message ({} bytes, appended {})",
                b.len(),
                expected.bytes.len()
            ));
        }
    }

    /// After EXISTS, a client asks for the new messages' UIDs and flags.
    async fn learn_uids(&mut self) -> anyhow::Result<()> {
        if let Some(first) = self.view.uids.iter().position(Option::is_none) {
            let items = self.flag_items();
            self.timed(
                "fetch_flags",
                &format!("FETCH {}:* ({items})", first + 1),
                None,
            )
            .await?;
        }
        Ok(())
    }

    fn random_uid(&mut self) -> Option<u32> {
        let known: Vec<u32> = self.view.uids.iter().flatten().copied().collect();
        (!known.is_empty()).then(|| known[self.rng.below(known.len())])
    }

    /// An owned message in this session that is not being deleted.
    fn random_own(&mut self) -> Option<u32> {
        let present: HashSet<u32> = self.view.uids.iter().flatten().copied().collect();
        let candidates: Vec<u32> = self
            .own
            .keys()
            .filter(|u| present.contains(u) && !self.own_deleting.contains(u))
            .copied()
            .collect();
        (!candidates.is_empty()).then(|| candidates[self.rng.below(candidates.len())])
    }

    async fn append(&mut self, measured: bool) -> anyhow::Result<()> {
        self.appended += 1;
        let id = format!(
            "{}.{}.{}@stress.test",
            self.options.seed, self.id, self.appended
        );
        let word = WORDS[self.rng.below(WORDS.len())];
        let subject = format!("{word} note {} from client {}", self.appended, self.id);
        let lines = 5 + self.rng.below(120);
        let mut bytes = format!(
            "From: Client {c} <client{c}@stress.test>\r\nTo: user@example.test\r\nSubject: {subject}\r\nMessage-ID: <{id}>\r\nDate: Thu, 05 Mar 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n",
            c = self.id
        );
        for l in 0..lines {
            let _ = write!(
                bytes,
                "Line {l} of message {id}, with some words to index.\r\n"
            );
        }
        let bytes = bytes.into_bytes();
        let mut initial = BTreeSet::new();
        let seen = self.rng.below(4) == 0;
        let sync = self.rng.below(2) == 0;
        if seen {
            initial.insert(canonical("\\Seen"));
        }
        self.shared.lock().unwrap().messages.insert(
            id.clone(),
            Arc::new(Expected {
                bytes: bytes.clone(),
                subject: subject.clone(),
            }),
        );
        let text = format!(
            "APPEND {} ({})",
            self.mailbox,
            if seen { "\\Seen" } else { "" }
        );
        let answer = self
            .timed_if(measured, "append", &text, Some((&bytes, sync)))
            .await?;
        if !answer.ok() {
            return Ok(());
        }
        let Some(uid) = code_pair(answer.status.as_bytes(), "APPENDUID").map(|(_, u)| u as u32)
        else {
            self.error(format!("APPEND without APPENDUID: {}", answer.status));
            return Ok(());
        };
        {
            let mut shared = self.shared.lock().unwrap();
            shared.history.insert(uid, vec![initial.clone()]);
            shared.owner.insert(uid, self.id);
        }
        self.own.insert(uid, initial.clone());
        self.own_subject.insert(uid, subject);
        // If this session already saw the message's flags, check them now.
        if let Some(seen) = self.view.seen.get(&uid).and_then(|s| s.flags.clone())
            && seen != initial
        {
            self.error(format!(
                "UID {uid} (ours, just appended) showed flags {seen:?}, appended with {initial:?}"
            ));
        }
        Ok(())
    }

    /// COPY of an owned message into the same mailbox: the copy is ours too, with the
    /// same flags and content.
    async fn copy(&mut self) -> anyhow::Result<()> {
        let Some(uid) = self.random_own() else {
            return Ok(());
        };
        let text = format!("UID COPY {uid} {}", self.mailbox);
        let answer = self.timed("copy", &text, None).await?;
        if !answer.ok() {
            return Ok(());
        }
        let Some(new) = code_triple(answer.status.as_bytes(), "COPYUID") else {
            self.error(format!("COPY without COPYUID: {}", answer.status));
            return Ok(());
        };
        if new.1 != uid.to_string() {
            self.error(format!("COPYUID names source {} for UID {uid}", new.1));
        }
        let Ok(new_uid) = new.2.parse::<u32>() else {
            self.error(format!("COPYUID destination {} is not one UID", new.2));
            return Ok(());
        };
        let flags = self.own[&uid].clone();
        {
            let mut shared = self.shared.lock().unwrap();
            shared.history.insert(new_uid, vec![flags.clone()]);
            shared.owner.insert(new_uid, self.id);
        }
        let subject = self.own_subject.get(&uid).cloned().unwrap_or_default();
        self.own_subject.insert(new_uid, subject);
        self.own.insert(new_uid, flags);
        Ok(())
    }

    /// STATUS of the selected mailbox: UIDNEXT above every UID seen, HIGHESTMODSEQ not
    /// below any MODSEQ this client saw.
    async fn status(&mut self) -> anyhow::Result<()> {
        let items = if self.options.condstore {
            "MESSAGES UIDNEXT UNSEEN HIGHESTMODSEQ"
        } else {
            "MESSAGES UIDNEXT UNSEEN"
        };
        let text = format!("STATUS {} ({items})", self.mailbox);
        let answer = self.timed("status", &text, None).await?;
        for r in &answer.untagged {
            let Ok(t) = wire::tokens(r) else { continue };
            if t.first().and_then(Tok::atom_upper).as_deref() != Some("STATUS") {
                continue;
            }
            let Some(Tok::List(items)) = t.get(2) else {
                self.error(format!("STATUS without items: {}", shown(r)));
                continue;
            };
            let mut values = HashMap::new();
            for pair in items.chunks(2) {
                if let (Some(k), Some(v)) =
                    (pair[0].atom_upper(), pair.get(1).and_then(Tok::number))
                {
                    values.insert(k, v);
                }
            }
            let max_uid = self.view.uids.iter().flatten().max().copied().unwrap_or(0) as u64;
            if let Some(next) = values.get("UIDNEXT")
                && *next <= max_uid
            {
                self.error(format!("STATUS UIDNEXT {next} is not above UID {max_uid}"));
            }
            if let Some(h) = values.get("HIGHESTMODSEQ")
                && *h < self.max_modseq
            {
                self.error(format!(
                    "STATUS HIGHESTMODSEQ {h} is below MODSEQ {} seen before",
                    self.max_modseq
                ));
            }
        }
        Ok(())
    }

    async fn fetch_flags(&mut self) -> anyhow::Result<()> {
        let Some(uid) = self.random_uid() else {
            return Ok(());
        };
        let items = self.flag_items();
        let text = if self.options.qresync && self.rng.below(2) == 0 {
            // What changed lately, and what vanished (RFC 7162 3.2.6).
            let since = self.max_modseq.saturating_sub(20);
            format!("UID FETCH 1:* ({items}) (CHANGEDSINCE {since} VANISHED)")
        } else {
            format!("UID FETCH {uid}:{} ({items})", uid + 20)
        };
        self.timed("fetch_flags", &text, None).await?;
        Ok(())
    }

    async fn fetch_envelope(&mut self) -> anyhow::Result<()> {
        let Some(uid) = self.random_uid() else {
            return Ok(());
        };
        let text = format!("UID FETCH {uid}:{} (UID RFC822.SIZE ENVELOPE)", uid + 10);
        self.fetch_checked("fetch_envelope", &text, uid).await
    }

    async fn fetch_body(&mut self) -> anyhow::Result<()> {
        let Some(uid) = self.random_uid() else {
            return Ok(());
        };
        let text = format!("UID FETCH {uid} (UID BODY.PEEK[])");
        self.fetch_checked("fetch_body", &text, uid).await
    }

    /// A FETCH that may race with the owner's EXPUNGE: a NO naming expunged messages is
    /// allowed when the message was being deleted.
    async fn fetch_checked(
        &mut self,
        kind: &'static str,
        text: &str,
        uid: u32,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let conn = self.conn.as_mut().context("not connected")?;
        let answer = conn.command(kind, text, None).await?;
        self.count(kind, started.elapsed());
        self.since_login += 1;
        for r in &answer.untagged {
            self.untagged(r, text);
        }
        if !answer.ok() {
            let deleting = self.shared.lock().unwrap().deleting.contains(&uid);
            if !(deleting && answer.status.starts_with("NO")) {
                self.error(format!("{text} → {}", answer.status));
            }
        }
        Ok(())
    }

    async fn store(&mut self, keyword: bool) -> anyhow::Result<()> {
        let Some(uid) = self.random_own() else {
            return Ok(());
        };
        let flag = if keyword {
            KEYWORDS[self.rng.below(KEYWORDS.len())]
        } else {
            FLAGS[self.rng.below(FLAGS.len())]
        };
        let mut now = self.own[&uid].clone();
        let add = !now.contains(&canonical(flag));
        if add {
            now.insert(canonical(flag));
        } else {
            now.remove(&canonical(flag));
        }
        self.shared
            .lock()
            .unwrap()
            .history
            .entry(uid)
            .or_default()
            .push(now.clone());
        self.own.insert(uid, now);
        let sign = if add { '+' } else { '-' };
        let text = format!("UID STORE {uid} {sign}FLAGS ({flag})");
        let kind = if keyword {
            "store_keyword"
        } else {
            "store_flags"
        };
        let answer = self.timed(kind, &text, None).await?;
        // A STORE without .SILENT answers with the message's flags.
        let answered = answer.untagged.iter().any(|r| {
            wire::tokens(r).is_ok_and(|t| {
                t.get(1).and_then(Tok::atom_upper).as_deref() == Some("FETCH")
                    && matches!(t.get(2), Some(Tok::List(items)) if items.iter().any(|i| i.atom_upper().as_deref() == Some("FLAGS")))
            })
        });
        if answer.ok() && !answered {
            self.error(format!("{text} answered without the message's FLAGS"));
        }
        Ok(())
    }

    async fn search(&mut self) -> anyhow::Result<()> {
        let choice = self.rng.below(5);
        let (key, test): (String, Box<Matcher>) = match choice {
            0 => {
                let k = KEYWORDS[self.rng.below(KEYWORDS.len())];
                let c = canonical(k);
                (format!("KEYWORD {k}"), Box::new(move |f, _| f.contains(&c)))
            }
            1 => ("FLAGGED".into(), Box::new(|f, _| f.contains("\\flagged"))),
            2 => ("UNSEEN".into(), Box::new(|f, _| !f.contains("\\seen"))),
            3 => {
                let w = WORDS[self.rng.below(WORDS.len())];
                (
                    format!("SUBJECT {w}"),
                    Box::new(move |_, s| s.to_ascii_lowercase().contains(w)),
                )
            }
            _ => {
                let k = KEYWORDS[self.rng.below(KEYWORDS.len())];
                let c = canonical(k);
                (
                    format!("UNKEYWORD {k} UNDELETED"),
                    Box::new(move |f, _| !f.contains(&c) && !f.contains("\\deleted")),
                )
            }
        };
        let before: HashSet<u32> = self.view.uids.iter().flatten().copied().collect();
        let text = format!("UID SEARCH {key}");
        let answer = self.timed("search", &text, None).await?;
        if !answer.ok() {
            return Ok(());
        }
        let mut found = HashSet::new();
        for r in &answer.untagged {
            let Ok(t) = wire::tokens(r) else { continue };
            if t.first().and_then(Tok::atom_upper).as_deref() == Some("SEARCH") {
                found.extend(t[1..].iter().filter_map(Tok::number).map(|u| u as u32));
            }
        }
        let after: HashSet<u32> = self.view.uids.iter().flatten().copied().collect();
        let mut wrong = Vec::new();
        for (uid, flags) in &self.own {
            if !before.contains(uid) || !after.contains(uid) {
                continue;
            }
            let subject = self.own_subject.get(uid).map(String::as_str).unwrap_or("");
            let expected_in = test(flags, subject);
            if expected_in != found.contains(uid) {
                wrong.push(format!(
                    "{text}: UID {uid} (ours, flags {flags:?}) {} the result",
                    if expected_in {
                        "missing from"
                    } else {
                        "wrongly in"
                    }
                ));
            }
        }
        for w in wrong {
            self.error(w);
        }
        for uid in &found {
            if !after.contains(uid) && !before.contains(uid) {
                let max = self.view.uids.iter().flatten().max().copied().unwrap_or(0);
                if *uid <= max {
                    self.error(format!(
                        "{text}: UID {uid} in the result is not in the mailbox"
                    ));
                }
            }
        }
        Ok(())
    }

    async fn expunge(&mut self) -> anyhow::Result<()> {
        let Some(uid) = self.random_own() else {
            return Ok(());
        };
        self.shared.lock().unwrap().deleting.insert(uid);
        self.own_deleting.insert(uid);
        let mut flags = self.own[&uid].clone();
        flags.insert("\\deleted".into());
        self.shared
            .lock()
            .unwrap()
            .history
            .entry(uid)
            .or_default()
            .push(flags.clone());
        self.own.insert(uid, flags);
        self.timed(
            "store_flags",
            &format!("UID STORE {uid} +FLAGS.SILENT (\\Deleted)"),
            None,
        )
        .await?;
        // Mostly UID EXPUNGE of our own; sometimes a plain EXPUNGE, which takes every
        // message anyone set \Deleted on.
        if self.rng.below(5) == 0 {
            self.timed("expunge", "EXPUNGE", None).await?;
        } else {
            self.timed("expunge", &format!("UID EXPUNGE {uid}"), None)
                .await?;
        }
        if self.view.uids.contains(&Some(uid)) {
            self.error(format!("UID {uid} still in the session after its EXPUNGE"));
        }
        Ok(())
    }
}

/// Whether an owned message (its flags, its subject) belongs in a SEARCH result.
type Matcher = dyn Fn(&BTreeSet<String>, &str) -> bool + Send;

/// Flags compare case-insensitively: kept lower-case.
fn canonical(flag: &str) -> String {
    flag.to_ascii_lowercase()
}

/// The Message-ID in a message's header.
fn message_id(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]);
    text.lines().take_while(|l| !l.is_empty()).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("message-id")
            .then(|| value.trim().trim_matches(['<', '>']).to_string())
    })
}

/// The number in a response code `[NAME n]` anywhere in a response.
fn code_number(response: &[u8], name: &str) -> Option<u64> {
    let text = String::from_utf8_lossy(response);
    let at = text.find(&format!("[{name} "))?;
    let rest = &text[at + name.len() + 2..];
    rest.split([']', ' ']).next()?.parse().ok()
}

/// The UIDs of a sequence set of plain numbers (`3,5:7`), as VANISHED sends them.
fn parse_uid_set(set: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in set.split(',') {
        let (a, b) = match part.split_once(':') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let a = part.parse::<u32>().ok()?;
                (a, a)
            }
        };
        if a.max(b) - a.min(b) > 1_000_000 {
            return None;
        }
        out.extend(a.min(b)..=a.max(b));
    }
    Some(out)
}

/// A sequence set of UIDs (ascending), ranges joined.
fn uid_set(uids: &[u32]) -> String {
    let mut sorted = uids.to_vec();
    sorted.sort_unstable();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        while i + 1 < sorted.len() && sorted[i + 1] == sorted[i] + 1 {
            i += 1;
        }
        parts.push(if sorted[i] == start {
            start.to_string()
        } else {
            format!("{start}:{}", sorted[i])
        });
        i += 1;
    }
    parts.join(",")
}

/// The three parts of a response code `[NAME a b c]`.
fn code_triple(response: &[u8], name: &str) -> Option<(String, String, String)> {
    let text = String::from_utf8_lossy(response);
    let at = text.find(&format!("[{name} "))?;
    let rest = &text[at + name.len() + 2..];
    let inner = rest.split(']').next()?;
    let mut parts = inner.split(' ').map(str::to_string);
    Some((parts.next()?, parts.next()?, parts.next()?))
}

/// The two numbers in a response code `[NAME a b]`.
fn code_pair(response: &[u8], name: &str) -> Option<(u64, u64)> {
    let text = String::from_utf8_lossy(response);
    let at = text.find(&format!("[{name} "))?;
    let rest = &text[at + name.len() + 2..];
    let inner = rest.split(']').next()?;
    let mut parts = inner.split(' ');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}
