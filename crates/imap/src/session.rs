//! The sans-I/O core of one IMAP session: states (not authenticated, authenticated,
//! selected, logout), every command's semantics, and the untagged updates other
//! sessions' changes cause.
//!
//! Why this shape (the SMTP and POP3 one): bytes in, responses and a typed [`Step`]
//! out, synchronous over the store traits. The core never awaits: it owns no socket,
//! timer or async lock, so every command can be tested from bytes (see the tests at the
//! end), and a command's store work is plain sequential code. The driver
//! ([`crate::server`]) frames commands and literals, runs each command in one hop on
//! the blocking pool, streams the output to the socket through a bounded channel, and
//! does what a step asks: password checks, AUTHENTICATE's continuation, IDLE's wait.
//!
//! Changes made elsewhere (deliveries, other sessions) arrive through the mailbox's
//! change bell: the session compares the folder with its view and sends EXISTS,
//! EXPUNGE and FETCH FLAGS, never polling.

use crate::mime;
use crate::parse::{
    CommandKind, FetchItem, ListOptions, STAR, SearchKey, Section, SectionText, SequenceSet,
    StatusItem, StoreMode, parse_command_with,
};
use crate::response::Output;
use crate::response::{flags as write_flags, internal_date, literal, mailbox as write_mailbox};
use crate::search::{self, Candidate, compact, in_set};
use crate::server::ImapServer;
use base64::Engine;
use mailroom_store::{
    FlagOperation, FolderInfo, MailStore, MessageState, RecipientId, StoreError, Structure,
};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

/// The special-use folders every mailbox gets at first login (RFC 6154).
const SPECIAL: [(&str, &str); 5] = [
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
];

/// What the driver does after the core took a command: the core never touches a
/// socket, a timer or an async lock, so what needs them comes out as a step.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The command is answered, tagged status included. Read the next one.
    Next,
    /// LOGIN or AUTHENTICATE PLAIN: check the password (the login limiter and the
    /// verifier pool are async), then give the verdict to [`Session::login_verified`].
    Login {
        /// The command's tag.
        tag: String,
        /// The user name as the client sent it.
        user: String,
        /// The password.
        password: String,
    },
    /// AUTHENTICATE without an initial response: the continuation request is in the
    /// output. Read one line (bounded like a command before login, within the idle
    /// timeout) and give it to [`Session::sasl_response`].
    SaslResponse {
        /// The command's tag.
        tag: String,
    },
    /// IDLE (RFC 2177): the continuation request is in the output. Wait for a line
    /// (then [`Session::idle_done`]), the mailbox bell ([`Session::idle_update`]),
    /// shutdown or the idle timeout.
    Idle {
        /// The command's tag.
        tag: String,
    },
    /// STARTTLS is answered OK: discard anything the client sent after the command
    /// (it was sent in the clear: the STARTTLS command-injection class, CVE-2011-0411),
    /// run the TLS handshake, then call [`Session::tls_started`].
    StartTls,
    /// LOGOUT is answered: close the connection.
    Logout,
}

/// Writes a tagged status line. The text often quotes what the client sent, so it is
/// made safe for one line first.
pub fn tagged(out: &mut Vec<u8>, tag: &str, status: Status, text: &str) {
    out.extend_from_slice(
        format!("{tag} {} {}\r\n", status.as_str(), response_text(text)).as_bytes(),
    );
}

/// Writes the tagged status line of a command's outcome.
fn answer(out: &mut Vec<u8>, tag: &str, outcome: Outcome) {
    match outcome {
        Ok(text) => tagged(out, tag, Status::Ok, &text),
        Err(refusal) => tagged(out, tag, refusal.status, &refusal.text),
    }
}

/// The selected folder as this session knows it.
struct View {
    name: String,
    read_only: bool,
    messages: Vec<MessageState>,
    /// Keywords announced in FLAGS and PERMANENTFLAGS (RFC 9051 7.3.5: every keyword in
    /// use, and a new FLAGS before a FETCH shows one the client has not been told of).
    keywords: std::collections::BTreeSet<String>,
    /// UIDs `\Recent` to this session (IMAP4rev1 only; RFC 3501 2.3.2), shown in its
    /// FLAGS and counted in RECENT.
    recent: HashSet<u32>,
    /// The saved search result (RFC 5182 SEARCHRES), as UIDs: `$` names these messages.
    saved: Vec<u32>,
    /// Searches kept up to date (RFC 5267 CONTEXT=SEARCH, `RETURN (UPDATE)`).
    live: Vec<LiveSearch>,
    /// (messages, highest MODSEQ, last UID) when the live searches were last evaluated:
    /// unchanged means nothing to re-evaluate.
    live_stamp: (usize, u64, u32),
    /// The folder's HIGHESTMODSEQ this view is up to date with (0: unknown, read the
    /// whole folder at the next sync).
    synced_modseq: u64,
}

/// A search kept up to date: its result as UIDs, reported as ADDTO and REMOVEFROM.
struct LiveSearch {
    tag: String,
    uid: bool,
    key: SearchKey,
    result: std::collections::BTreeSet<u32>,
    /// A SORT's context (CONTEXT=SORT): updates carry positions in sort order.
    sorted: Option<Sorted>,
}

/// A live SORT (RFC 5267 CONTEXT=SORT): the result in sort order and each member's sort
/// fields, so a change costs reading only the messages that joined. A message's sort
/// fields never change (its bytes do not), so members keep their relative order and
/// only joins and departures are reported.
struct Sorted {
    criteria: Vec<crate::parse::SortCriterion>,
    fields: std::collections::HashMap<u32, crate::sort::SortFields>,
    /// UIDs of the result, in sort order.
    order: Vec<u32>,
}

impl Sorted {
    /// Sort order of two members: the criteria, then mailbox (UID) order (RFC 5256 3).
    fn compare(&self, a: u32, b: u32) -> std::cmp::Ordering {
        match (self.fields.get(&a), self.fields.get(&b)) {
            (Some(x), Some(y)) => crate::sort::compare(x, y, &self.criteria).then(a.cmp(&b)),
            _ => a.cmp(&b),
        }
    }
}

/// REMOVEFROM pairs that take `gone` out of `order` (RFC 5267 4.3.4): each run of
/// adjacent members with its 1-based position, the last run first, so every position
/// still holds when the client applies the pairs in order. `order` loses them.
fn removals(order: &mut Vec<u32>, gone: &HashSet<u32>) -> Vec<(usize, Vec<u32>)> {
    let mut pairs = runs(order, gone);
    order.retain(|u| !gone.contains(u));
    pairs.reverse();
    pairs
}

/// ADDTO pairs that put `added` in place in `order`, the final sort order (RFC 5267
/// 4.3.3): each run of adjacent new members at its final 1-based position, the first
/// run first, so everything before a position is in place when the client inserts.
fn additions(order: &[u32], added: &HashSet<u32>) -> Vec<(usize, Vec<u32>)> {
    runs(order, added)
}

/// The runs of adjacent members of `order` that are in `members`, with the 1-based
/// position of each run's first.
fn runs(order: &[u32], members: &HashSet<u32>) -> Vec<(usize, Vec<u32>)> {
    let mut pairs = Vec::new();
    let mut i = 0;
    while i < order.len() {
        if members.contains(&order[i]) {
            let start = i;
            while i < order.len() && members.contains(&order[i]) {
                i += 1;
            }
            pairs.push((start + 1, order[start..i].to_vec()));
        } else {
            i += 1;
        }
    }
    pairs
}

/// Live searches a session may keep; more get `[NOUPDATE]`.
const LIVE_SEARCHES_MAX: usize = 16;

/// The system flags every folder has.
const SYSTEM_FLAGS: &str = "\\Answered \\Flagged \\Deleted \\Seen \\Draft";

impl View {
    /// `state` as this session shows it: with `\Recent` when it is recent here.
    fn shown(&self, mut state: MessageState) -> MessageState {
        if self.recent.contains(&state.uid) && !state.flags.iter().any(|f| f == "\\Recent") {
            state.flags.push("\\Recent".into());
        }
        state
    }

    /// FLAGS and PERMANENTFLAGS as they stand.
    fn flags_lines(&self, out: &mut Vec<u8>) {
        let mut all = String::from(SYSTEM_FLAGS);
        for keyword in &self.keywords {
            all.push(' ');
            all.push_str(keyword);
        }
        out.extend_from_slice(format!("* FLAGS ({all})\r\n").as_bytes());
        if self.read_only {
            out.extend_from_slice(b"* OK [PERMANENTFLAGS ()] read-only\r\n");
        } else {
            out.extend_from_slice(
                format!("* OK [PERMANENTFLAGS ({all} \\*)] flags allowed\r\n").as_bytes(),
            );
        }
    }

    /// Announces (FLAGS, PERMANENTFLAGS) any keyword of `flags` the client has not
    /// been told of; call before writing a response that shows `flags`.
    fn announce_keywords(&mut self, flags: &[String], out: &mut Vec<u8>) {
        let mut new = false;
        for flag in flags.iter().filter(|f| !f.starts_with('\\')) {
            if !self.keywords.contains(flag) {
                self.keywords.insert(flag.clone());
                new = true;
            }
        }
        if new {
            self.flags_lines(out);
        }
    }

    /// What changes when a live search might need re-evaluating.
    fn stamp(&self) -> (usize, u64, u32) {
        let modseq = self.messages.iter().map(|m| m.modseq).max().unwrap_or(0);
        (self.messages.len(), modseq, self.max_uid())
    }

    /// `* ESEARCH (TAG "t") [UID] ADDTO|REMOVEFROM (0 set)` for `uids` of a live search.
    /// The position is 0: a SEARCH result is in message order, so it carries no place
    /// (RFC 5267 4.3; positions matter for CONTEXT=SORT, not offered).
    fn live_line(&self, live: &LiveSearch, what: &str, uids: &[u32], out: &mut Vec<u8>) {
        let mut numbers: Vec<u32> = if live.uid {
            uids.to_vec()
        } else {
            uids.iter().filter_map(|u| self.seq_of(*u)).collect()
        };
        if numbers.is_empty() {
            return;
        }
        numbers.sort_unstable();
        out.extend_from_slice(
            format!(
                "* ESEARCH (TAG \"{}\"){} {what} (0 {})\r\n",
                live.tag,
                if live.uid { " UID" } else { "" },
                uid_set(&numbers)
            )
            .as_bytes(),
        );
    }

    /// ADDTO or REMOVEFROM of a sorted context: (position, UIDs in sort order) pairs,
    /// as UIDs or sequence numbers as the SORT was given.
    fn sorted_line(
        &self,
        live: &LiveSearch,
        what: &str,
        pairs: &[(usize, Vec<u32>)],
        out: &mut Vec<u8>,
    ) {
        if pairs.is_empty() {
            return;
        }
        let mut line = format!(
            "* ESEARCH (TAG \"{}\"){} {what} (",
            live.tag,
            if live.uid { " UID" } else { "" }
        );
        for (n, (position, uids)) in pairs.iter().enumerate() {
            let numbers: Vec<u32> = if live.uid {
                uids.clone()
            } else {
                uids.iter().filter_map(|u| self.seq_of(*u)).collect()
            };
            if n > 0 {
                line.push(' ');
            }
            // uid_set keeps the order given (sort order), ranges only where it ascends.
            line.push_str(&format!("{position} {}", uid_set(&numbers)));
        }
        line.push_str(")\r\n");
        out.extend_from_slice(line.as_bytes());
    }

    fn max_uid(&self) -> u32 {
        self.messages.last().map_or(0, |m| m.uid)
    }

    /// What a response calls the message at `index`: its UID in UID commands, its
    /// sequence number otherwise.
    fn number(&self, index: usize, uid: bool) -> u32 {
        if uid {
            self.messages[index].uid
        } else {
            index as u32 + 1
        }
    }

    fn seq_of(&self, uid: u32) -> Option<u32> {
        self.messages
            .binary_search_by_key(&uid, |m| m.uid)
            .ok()
            .map(|i| i as u32 + 1)
    }

    /// Indexes of the messages a set names (by sequence number or UID).
    fn select(&self, set: &SequenceSet, uid: bool) -> Vec<usize> {
        let max_seq = self.messages.len() as u32;
        let max_uid = self.max_uid();
        self.messages
            .iter()
            .enumerate()
            .filter(|(i, m)| {
                if uid {
                    in_set(set, m.uid, max_uid)
                } else {
                    in_set(set, *i as u32 + 1, max_seq)
                }
            })
            .map(|(i, _)| i)
            .collect()
    }
}

struct User {
    recipient: RecipientId,
}

/// One session.
pub struct Session {
    server: Arc<ImapServer>,
    peer: SocketAddr,
    /// The connection is encrypted (implicit TLS, or after STARTTLS).
    tls: bool,
    user: Option<User>,
    selected: Option<View>,
    bell: Option<tokio::sync::watch::Receiver<u64>>,
    condstore: bool,
    /// ENABLE QRESYNC (RFC 7162 3.2.3): expunges are reported as VANISHED, SELECT takes
    /// the QRESYNC parameter, UID FETCH the VANISHED modifier.
    qresync: bool,
    /// Messages gone from the store that this session could not announce yet (the
    /// command in progress forbade EXPUNGE responses): the next sync that may, does,
    /// whether or not the mailbox changed again meanwhile.
    expunge_pending: Vec<u32>,
    /// The bell's value this session's view is known to reflect. After its own change
    /// (one ring) the bell is marked seen only when it stands at exactly one more, so a
    /// change another session made in between is still announced at the next sync.
    bell_seen: u64,
    enabled: HashSet<String>,
}

/// The status of a tagged response (RFC 9051 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The command completed.
    Ok,
    /// The command failed (an operational error: no such folder, over quota).
    No,
    /// The command was not understood or not allowed in this state.
    Bad,
}

impl Status {
    /// The word on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::No => "NO",
            Status::Bad => "BAD",
        }
    }
}

/// A command that did not complete: NO or BAD, and the text (any response code first,
/// e.g. `[NONEXISTENT] no such folder`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// NO or BAD.
    pub status: Status,
    /// The human-readable text, with its response code.
    pub text: String,
}

impl Refusal {
    /// A NO.
    pub fn no(text: impl Into<String>) -> Refusal {
        Refusal {
            status: Status::No,
            text: text.into(),
        }
    }

    /// A BAD.
    pub fn bad(text: impl Into<String>) -> Refusal {
        Refusal {
            status: Status::Bad,
            text: text.into(),
        }
    }
}

/// A command's outcome: the text of its tagged OK, or its refusal.
type Outcome = Result<String, Refusal>;

fn ok(text: impl Into<String>) -> Outcome {
    Ok(text.into())
}

/// Replaces `$` (the saved search result, RFC 5182) in a command's sets by the saved
/// messages: their UIDs in UID commands and UID search keys, their sequence numbers
/// otherwise. Messages expunged since are gone from it; an empty result matches nothing.
fn resolve_saved(view: &View, kind: &mut CommandKind) {
    fn is_saved(set: &SequenceSet) -> bool {
        set.len() == 1 && set[0].0 == crate::parse::SAVED
    }
    let as_uids = |set: &mut SequenceSet| {
        if is_saved(set) {
            *set = view
                .saved
                .iter()
                .map(|&u| crate::parse::Range(u64::from(u), u64::from(u)))
                .collect();
        }
    };
    let as_seqs = |set: &mut SequenceSet| {
        if is_saved(set) {
            *set = view
                .saved
                .iter()
                .filter_map(|&u| view.seq_of(u))
                .map(|n| crate::parse::Range(u64::from(n), u64::from(n)))
                .collect();
        }
    };
    fn walk(key: &mut SearchKey, uids: &dyn Fn(&mut SequenceSet), seqs: &dyn Fn(&mut SequenceSet)) {
        match key {
            SearchKey::Sequence(set) => seqs(set),
            SearchKey::Uid(set) => uids(set),
            SearchKey::Not(k) => walk(k, uids, seqs),
            SearchKey::Or(a, b) => {
                walk(a, uids, seqs);
                walk(b, uids, seqs);
            }
            SearchKey::And(keys) => {
                for k in keys {
                    walk(k, uids, seqs);
                }
            }
            _ => {}
        }
    }
    match kind {
        CommandKind::Fetch { uid, set, .. }
        | CommandKind::Store { uid, set, .. }
        | CommandKind::Copy { uid, set, .. } => {
            if *uid {
                as_uids(set)
            } else {
                as_seqs(set)
            }
        }
        CommandKind::Expunge(Some(set)) => as_uids(set),
        CommandKind::Search { key, .. }
        | CommandKind::Sort { key, .. }
        | CommandKind::Thread { key, .. } => walk(key, &as_uids, &as_seqs),
        _ => {}
    }
}

/// Calls `each` with every message of `states` (its index, state and parsed header),
/// reading the headers 500 messages per store call when `read` (SORT, THREAD).
fn with_headers(
    store: &dyn MailStore,
    recipient: RecipientId,
    folder: &str,
    states: &[MessageState],
    read: bool,
    mut each: impl FnMut(usize, &MessageState, Option<&mail_parser::Message<'_>>),
) -> mailroom_store::Result<()> {
    for (chunk_index, chunk) in states.chunks(500).enumerate() {
        let raws: std::collections::HashMap<u32, Vec<u8>> = if read {
            let uids: Vec<u32> = chunk.iter().map(|m| m.uid).collect();
            store
                .messages_raw(recipient, folder, &uids, true)?
                .into_iter()
                .collect()
        } else {
            Default::default()
        };
        for (j, state) in chunk.iter().enumerate() {
            let parsed = raws.get(&state.uid).map(|raw| mime::parse(raw));
            each(chunk_index * 500 + j, state, parsed.as_ref());
        }
    }
    Ok(())
}

/// The sort fields of `states` (in order), reading their headers only when a criterion
/// needs them. A message whose header cannot be read sorts by its state alone (and the
/// failure is logged): a live sort keeps going rather than ending.
fn sort_fields(
    store: &dyn MailStore,
    recipient: RecipientId,
    folder: &str,
    states: &[MessageState],
    criteria: &[crate::parse::SortCriterion],
) -> Vec<crate::sort::SortFields> {
    let needs_header = criteria.iter().any(|c| {
        !matches!(
            c.key,
            crate::parse::SortKey::Arrival | crate::parse::SortKey::Size
        )
    });
    let mut fields = Vec::with_capacity(states.len());
    let read = with_headers(
        store,
        recipient,
        folder,
        states,
        needs_header,
        |_, state, m| {
            fields.push(crate::sort::fields(m, state));
        },
    );
    if let Err(e) = read {
        tracing::warn!(error = %e, "could not read headers to sort");
        fields = states
            .iter()
            .map(|state| crate::sort::fields(None, state))
            .collect();
    }
    fields
}

/// Every proper parent of a folder name: `a`, `a/b` for `a/b/c`.
fn parents_of(name: &str) -> impl Iterator<Item = &str> {
    name.match_indices('/').map(move |(at, _)| &name[..at])
}

/// Numbers as a compact set that keeps their order (`1:3,7,5`): runs that ascend by one
/// become ranges. APPENDUID (RFC 4315) and ESORT's ALL (sort order).
fn uid_set(uids: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        while i + 1 < uids.len() && uids[i + 1] == uids[i] + 1 {
            i += 1;
        }
        parts.push(if uids[i] == start {
            start.to_string()
        } else {
            format!("{start}:{}", uids[i])
        });
        i += 1;
    }
    parts.join(",")
}

/// The UIDs to report as VANISHED (EARLIER): those recorded as expunged, within `known`
/// (all when None), that the session does not show (`present`, ascending). When the
/// records do not reach back far enough, every UID of `known` up to `max` that is not
/// `present` instead: a client ignores UIDs it does not have, and misses none it does.
fn vanished_set(
    vanished: &mailroom_store::Vanished,
    known: Option<&SequenceSet>,
    present: &[u32],
    max: u32,
) -> String {
    // The known ranges clipped to 1..=max, sorted and made disjoint once: a client's set
    // may hold thousands of ranges, and each UID below is looked up by binary search
    // (checking every range per UID was quadratic on the runtime thread).
    let ranges: Vec<(u32, u32)> = {
        let mut clipped: Vec<(u32, u32)> = match known {
            None => vec![(1, max)],
            Some(set) => set
                .iter()
                .map(|r| {
                    let a = if r.0 == STAR { max as u64 } else { r.0 };
                    let b = if r.1 == STAR { max as u64 } else { r.1 };
                    (a.min(b).max(1), a.max(b).min(max as u64))
                })
                .filter(|(a, b)| a <= b)
                .map(|(a, b)| (a as u32, b as u32))
                .collect(),
        };
        clipped.sort_unstable();
        let mut disjoint: Vec<(u32, u32)> = Vec::with_capacity(clipped.len());
        for (a, b) in clipped {
            match disjoint.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => disjoint.push((a, b)),
            }
        }
        disjoint
    };
    if vanished.complete {
        let in_known = |u: u32| {
            known.is_none() || {
                let at = ranges.partition_point(|r| r.0 <= u);
                at > 0 && u <= ranges[at - 1].1
            }
        };
        let uids: Vec<u32> = vanished
            .uids
            .iter()
            .copied()
            .filter(|u| in_known(*u))
            // One expunged after this session last looked is still in its view: it is
            // announced by a plain VANISHED at the next sync, not as EARLIER.
            .filter(|u| present.binary_search(u).is_err())
            .collect();
        return uid_set(&uids);
    }
    let mut parts = Vec::new();
    for (a, b) in ranges {
        // Gaps between present UIDs inside [a, b].
        let mut next = a;
        let from = present.partition_point(|u| *u < a);
        for &u in present[from..].iter().take_while(|u| **u <= b) {
            if u > next {
                parts.push((next, u - 1));
            }
            next = u + 1;
        }
        if next <= b {
            parts.push((next, b));
        }
    }
    parts
        .into_iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}:{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn no(text: impl Into<String>) -> Outcome {
    Err(Refusal::no(text))
}

fn bad(text: impl Into<String>) -> Outcome {
    Err(Refusal::bad(text))
}

fn store_no(e: StoreError) -> Refusal {
    match e {
        StoreError::NotFound(what) => Refusal::no(format!("[NONEXISTENT] no {what}")),
        StoreError::Conflict(what) => Refusal::no(format!("[ALREADYEXISTS] {what}")),
        other if other.fault() == Some(mailroom_store::Fault::DiskFull) => {
            tracing::error!(error = %other, "IMAP store error");
            Refusal::no("[LIMIT] the mail store's disk is full; try again later")
        }
        other => {
            tracing::error!(error = %other, "IMAP store error");
            Refusal::no("[SERVERBUG] the store failed; try again")
        }
    }
}

/// Runs a store call (the whole command already runs on the blocking pool) and turns
/// its error into the status a client is owed.
fn store_call<T>(
    store: &Arc<dyn MailStore>,
    f: impl FnOnce(&dyn MailStore) -> mailroom_store::Result<T>,
) -> Result<T, Refusal> {
    f(store.as_ref()).map_err(store_no)
}

/// A store call that writes into a folder the client names (APPEND, COPY, MOVE): a
/// missing folder is `[TRYCREATE]`, which tells the client to create it and retry
/// (RFC 9051 6.3.12).
fn target_call<T>(
    store: &Arc<dyn MailStore>,
    f: impl FnOnce(&dyn MailStore) -> mailroom_store::Result<T>,
) -> Result<T, Refusal> {
    f(store.as_ref()).map_err(|e| match e {
        StoreError::NotFound(_) => Refusal::no("[TRYCREATE] no such folder; create it first"),
        other => store_no(other),
    })
}

/// The human-readable text of a status response, which often quotes what the client
/// sent (a folder name, a date): control characters (NUL, CR, LF and the rest) become
/// `?`, so a client's bytes can neither end the line nor put a NUL on the wire.
fn response_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().any(char::is_control) {
        std::borrow::Cow::Owned(
            text.chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        )
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// Longest folder name, in bytes (with its parents), by default
/// (`imap.folder_name_max_bytes`). Bounds LIST matching work per folder together with
/// the pattern limit; Dovecot's default is 255 per level.
pub const FOLDER_NAME_BYTES_MAX: usize = 1024;

/// `*` and `%` matching of a LIST pattern against a name ("/" separated).
///
/// Dynamic programming over (pattern position, name position), one row at a time:
/// O(pattern × name) time and O(name) memory whatever the wildcards. The obvious
/// recursive matcher backtracks exponentially (55 `*` stalled the runtime thread for
/// seconds) and recurses once per pattern byte (60,000 `%` overflowed the stack).
fn pattern_matches(pattern: &[u8], name: &[u8]) -> bool {
    // row[j]: the pattern so far matches name[..j].
    let mut row = vec![false; name.len() + 1];
    row[0] = true;
    let mut next = vec![false; name.len() + 1];
    let mut previous = None;
    for &p in pattern {
        // A run of `*` matches what one `*` does.
        if p == b'*' && previous == Some(b'*') {
            continue;
        }
        previous = Some(p);
        match p {
            b'*' => {
                next[0] = row[0];
                for j in 1..=name.len() {
                    next[j] = row[j] || next[j - 1];
                }
            }
            b'%' => {
                next[0] = row[0];
                for j in 1..=name.len() {
                    next[j] = row[j] || (next[j - 1] && name[j - 1] != b'/');
                }
            }
            p => {
                next[0] = false;
                for j in 1..=name.len() {
                    next[j] = row[j - 1] && name[j - 1].eq_ignore_ascii_case(&p);
                }
            }
        }
        std::mem::swap(&mut row, &mut next);
        if !row.contains(&true) {
            return false;
        }
    }
    row[name.len()]
}

impl Session {
    /// A new session for a client at `peer`.
    pub fn new(server: Arc<ImapServer>, peer: SocketAddr, tls: bool) -> Session {
        Session {
            server,
            peer,
            tls,
            user: None,
            selected: None,
            bell: None,
            condstore: false,
            qresync: false,
            expunge_pending: Vec::new(),
            bell_seen: 0,
            enabled: HashSet::new(),
        }
    }

    fn plaintext_allowed(&self) -> bool {
        self.server
            .config
            .plaintext
            .allows(self.peer.ip(), self.tls)
    }

    /// Whether STARTTLS is offered: a certificate is configured and the connection is
    /// not encrypted yet.
    fn starttls_offered(&self) -> bool {
        !self.tls && self.server.tls.is_some()
    }

    /// The handshake after STARTTLS succeeded: the session starts again from the
    /// greeting's state, and what the client learnt before (capabilities) is void
    /// (RFC 9051 6.2.1).
    pub fn tls_started(&mut self) {
        self.tls = true;
    }

    fn capabilities(&self) -> String {
        let mut caps = String::from(
            "IMAP4rev2 IMAP4rev1 LITERAL+ ENABLE IDLE NAMESPACE UNSELECT UIDPLUS MOVE CHILDREN SPECIAL-USE LIST-EXTENDED LIST-STATUS ESEARCH CONTEXT=SEARCH CONDSTORE QRESYNC QUOTA QUOTA=RES-STORAGE ID BINARY STATUS=SIZE MULTIAPPEND SEARCHRES SORT SORT=DISPLAY ESORT CONTEXT=SORT THREAD=ORDEREDSUBJECT THREAD=REFERENCES CATENATE",
        );
        caps.push_str(&format!(" APPENDLIMIT={}", self.server.config.append_limit));
        if self.starttls_offered() && self.user.is_none() {
            caps.push_str(" STARTTLS");
        }
        if self.user.is_none() {
            if self.plaintext_allowed() {
                caps.push_str(" SASL-IR AUTH=PLAIN");
            } else {
                caps.push_str(" LOGINDISABLED");
            }
        }
        caps
    }

    /// The greeting.
    pub fn greeting(&self) -> Vec<u8> {
        format!(
            "* OK [CAPABILITY {}] {} Mailroom IMAP ready\r\n",
            self.capabilities(),
            self.server.config.hostname
        )
        .into_bytes()
    }

    /// Whether a user has logged in (commands are bounded differently after).
    pub fn is_authenticated(&self) -> bool {
        self.user.is_some()
    }

    /// The mailbox's change bell, for the driver to wait on during IDLE.
    pub fn bell(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.bell.clone()
    }

    /// Answers one complete command (literals inline, no final CRLF): its responses
    /// and, unless the step says otherwise, its tagged status go to `out`.
    pub fn command(&mut self, bytes: &[u8], out: &mut Output<'_>) -> Step {
        let command = match parse_command_with(bytes, &self.server.config.parse_limits) {
            Ok(c) => c,
            Err(e) => {
                let tag = e.tag.unwrap_or_else(|| "*".into());
                let status = if e.refused { Status::No } else { Status::Bad };
                tagged(out, &tag, status, &e.message);
                return Step::Next;
            }
        };
        let name = command_name(&command.kind);
        self.server
            .stats
            .commands
            .get_or_create(&vec![("command".to_string(), name.to_string())])
            .inc();
        let tag = command.tag;
        let outcome = match command.kind {
            CommandKind::Logout => {
                out.extend_from_slice(b"* BYE logging out\r\n");
                tagged(out, &tag, Status::Ok, "LOGOUT completed");
                return Step::Logout;
            }
            CommandKind::Idle => {
                if self.user.is_none() {
                    Err(Refusal::bad("log in first"))
                } else {
                    self.sync(out, true);
                    out.extend_from_slice(b"+ idling\r\n");
                    return Step::Idle { tag };
                }
            }
            CommandKind::Authenticate(mechanism, initial) => match self.authenticate(&mechanism) {
                Err(refusal) => Err(refusal),
                Ok(()) => match initial {
                    Some(response) => return self.plain_response(tag, &response, out),
                    None => {
                        out.extend_from_slice(b"+ \r\n");
                        return Step::SaslResponse { tag };
                    }
                },
            },
            CommandKind::StartTls => {
                if self.tls {
                    Err(Refusal::bad("the connection is encrypted already"))
                } else if self.user.is_some() {
                    Err(Refusal::bad("STARTTLS is only allowed before login"))
                } else if self.server.tls.is_none() {
                    Err(Refusal::bad("STARTTLS is not available (no certificate)"))
                } else {
                    tagged(out, &tag, Status::Ok, "Begin TLS negotiation now");
                    return Step::StartTls;
                }
            }
            CommandKind::Login(user, password) => match self.login_allowed() {
                Err(refusal) => Err(refusal),
                Ok(()) => {
                    return Step::Login {
                        tag,
                        user,
                        password,
                    };
                }
            },
            kind => {
                let outcome = self.execute(kind, &tag, out);
                self.update_live(out);
                outcome
            }
        };
        answer(out, &tag, outcome);
        Step::Next
    }

    /// AUTHENTICATE's checks before any response is read.
    fn authenticate(&self, mechanism: &str) -> Result<(), Refusal> {
        if self.user.is_some() {
            return Err(Refusal::bad("already authenticated"));
        }
        if mechanism != "PLAIN" {
            return Err(Refusal::no("unsupported mechanism; use PLAIN"));
        }
        self.login_allowed()
    }

    /// The client's answer to AUTHENTICATE's continuation request: the line, or `None`
    /// when it was longer than a command before login may be.
    pub fn sasl_response(
        &mut self,
        tag: String,
        line: Option<&[u8]>,
        out: &mut Output<'_>,
    ) -> Step {
        match line {
            Some(line) => self.plain_response(tag, line, out),
            None => {
                tagged(out, &tag, Status::Bad, "the response is too long");
                Step::Next
            }
        }
    }

    /// A PLAIN response (RFC 4616), base64: authorization identity, user, password.
    fn plain_response(&mut self, tag: String, response: &[u8], out: &mut Output<'_>) -> Step {
        let refuse = |out: &mut Output<'_>, refusal: Refusal| {
            answer(out, &tag, Err(refusal));
            Step::Next
        };
        if response == b"*" {
            return refuse(out, Refusal::bad("authentication cancelled"));
        }
        let decoded = if response == b"=" {
            Vec::new()
        } else {
            match base64::engine::general_purpose::STANDARD.decode(response) {
                Ok(d) => d,
                Err(_) => return refuse(out, Refusal::bad("the response is not base64")),
            }
        };
        let parts: Vec<&[u8]> = decoded.split(|b| *b == 0).collect();
        let [authz, user, password] = parts.as_slice() else {
            return refuse(out, Refusal::bad("malformed PLAIN response"));
        };
        let user = String::from_utf8_lossy(user).into_owned();
        let authz = String::from_utf8_lossy(authz).into_owned();
        if !authz.is_empty() && !authz.eq_ignore_ascii_case(&user) {
            return refuse(
                out,
                Refusal::no("[AUTHORIZATIONFAILED] acting as another user is not allowed"),
            );
        }
        let password = String::from_utf8_lossy(password).into_owned();
        Step::Login {
            tag,
            user,
            password,
        }
    }

    /// Whether a password may be sent here at all.
    fn login_allowed(&self) -> Result<(), Refusal> {
        if self.user.is_some() {
            return Err(Refusal::bad("already authenticated"));
        }
        if !self.plaintext_allowed() {
            return Err(Refusal::no(
                "[PRIVACYREQUIRED] plaintext passwords are not allowed on this connection",
            ));
        }
        Ok(())
    }

    /// The driver's verdict on a [`Step::Login`]: the recipient the password opened, or
    /// the refusal. On success INBOX and the special-use folders are made sure of and
    /// the tagged OK carries the new capabilities.
    pub fn login_verified(
        &mut self,
        tag: &str,
        user: &str,
        verdict: Result<RecipientId, Refusal>,
        out: &mut Output<'_>,
    ) {
        let outcome = verdict.and_then(|recipient| self.logged_in(user, recipient));
        answer(out, tag, outcome);
    }

    fn logged_in(&mut self, user: &str, recipient: RecipientId) -> Outcome {
        let server = self.server.clone();
        // INBOX and the special-use folders exist from the first login on.
        store_call(&server.store, move |store| {
            // One read; a write only for folders that are missing (the first login).
            let existing: HashSet<String> = store
                .folders(recipient)?
                .into_iter()
                .map(|f| f.name)
                .collect();
            if !existing.contains("INBOX") {
                store.ensure_folder(recipient, "INBOX", None)?;
            }
            for (name, usage) in SPECIAL {
                if !existing.contains(name) {
                    store.ensure_folder(recipient, name, Some(usage))?;
                }
            }
            Ok(())
        })?;
        server.stats.login("ok");
        self.bell = Some(server.store.watch_mailbox(recipient));
        tracing::debug!(client = %self.peer, user, "IMAP login");
        self.user = Some(User { recipient });
        // The capabilities change at login (AUTH= and LOGINDISABLED go): the tagged OK
        // carries the new list, as RFC 9051 6.2.3 invites; a client that reads the code
        // need not ask again.
        ok(format!("[CAPABILITY {}] logged in", self.capabilities()))
    }

    /// The mailbox changed during IDLE: its updates (RFC 2177).
    pub fn idle_update(&mut self, out: &mut Output<'_>) {
        self.sync(out, true);
        self.update_live(out);
    }

    /// The line that ended IDLE: DONE, or anything else (BAD).
    pub fn idle_done(&mut self, tag: &str, line: &[u8], out: &mut Output<'_>) {
        if line.eq_ignore_ascii_case(b"DONE") {
            tagged(out, tag, Status::Ok, "IDLE terminated");
        } else {
            tagged(out, tag, Status::Bad, "expected DONE");
        }
    }

    fn recipient(&self) -> Result<RecipientId, Refusal> {
        self.user
            .as_ref()
            .map(|u| u.recipient)
            .ok_or_else(|| Refusal::bad("log in first"))
    }

    fn execute(&mut self, kind: CommandKind, tag: &str, out: &mut Output<'_>) -> Outcome {
        match kind {
            CommandKind::Capability => {
                out.extend_from_slice(
                    format!("* CAPABILITY {}\r\n", self.capabilities()).as_bytes(),
                );
                ok("CAPABILITY completed")
            }
            CommandKind::Noop | CommandKind::Check => {
                self.sync(out, true);
                ok("done")
            }
            CommandKind::Id => {
                out.extend_from_slice(b"* ID (\"name\" \"Mailroom\" \"vendor\" \"Mailroom\")\r\n");
                ok("ID completed")
            }
            CommandKind::Login(..)
            | CommandKind::StartTls
            | CommandKind::Logout
            | CommandKind::Idle
            | CommandKind::Authenticate(..) => {
                unreachable!("handled by Session::command")
            }
            other => {
                let recipient = self.recipient()?;
                self.authenticated(other, tag, recipient, out)
            }
        }
    }

    fn authenticated(
        &mut self,
        kind: CommandKind,
        tag: &str,
        recipient: RecipientId,
        out: &mut Output<'_>,
    ) -> Outcome {
        let store = self.server.store.clone();
        match kind {
            CommandKind::Enable(caps) => {
                let mut enabled = Vec::new();
                for cap in caps {
                    if matches!(
                        cap.as_str(),
                        "CONDSTORE" | "QRESYNC" | "IMAP4REV2" | "UTF8=ACCEPT"
                    ) && self.enabled.insert(cap.clone())
                    {
                        // QRESYNC implies CONDSTORE (RFC 7162 3.2.3).
                        if cap == "CONDSTORE" || cap == "QRESYNC" {
                            self.enable_condstore(recipient, out);
                        }
                        if cap == "QRESYNC" {
                            self.qresync = true;
                        }
                        enabled.push(cap);
                    }
                }
                out.extend_from_slice(
                    format!("* ENABLED {}\r\n", enabled.join(" "))
                        .trim_end()
                        .as_bytes(),
                );
                out.extend_from_slice(b"\r\n");
                ok("ENABLE completed")
            }
            CommandKind::Namespace => {
                out.extend_from_slice(b"* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n");
                ok("NAMESPACE completed")
            }
            CommandKind::Select {
                mailbox,
                read_only,
                condstore,
                qresync,
            } => {
                if qresync.is_some() && !self.qresync {
                    return bad("the QRESYNC parameter needs ENABLE QRESYNC first");
                }
                self.expunge_pending.clear();
                // Selecting while a folder is selected closes it: RFC 7162 3.2.11 and
                // RFC 9051 6.3.2 announce that with [CLOSED], so responses that follow
                // belong to the new folder.
                if self.selected.take().is_some()
                    && (self.qresync || self.enabled.contains("IMAP4REV2"))
                {
                    out.extend_from_slice(b"* OK [CLOSED] previous folder closed\r\n");
                }
                if condstore || qresync.is_some() {
                    self.condstore = true;
                }
                let name = mailbox.clone();
                // IMAP4rev1: a read-write SELECT takes the folder's recent messages for
                // this session (before reading them, so none arrives in between
                // unclaimed); EXAMINE shows them recent without taking them.
                let rev1 = !self.enabled.contains("IMAP4REV2");
                let claim = rev1 && !read_only;
                // Seen before the read, so a change that lands during it rings again.
                if let Some(bell) = &mut self.bell {
                    self.bell_seen = *bell.borrow_and_update();
                }
                // The folder's counters and messages come from one snapshot: a message
                // changed between two reads would otherwise show a MODSEQ above the
                // HIGHESTMODSEQ announced (found by bench/imap-stress with QRESYNC).
                let (claimed, (info, messages)) = store_call(&store, move |s| {
                    let claimed = if claim {
                        match s.claim_recent(recipient, &name) {
                            Ok(floor) => Some(floor),
                            Err(StoreError::NotFound(_)) => None,
                            Err(e) => return Err(e),
                        }
                    } else {
                        None
                    };
                    Ok((claimed, s.folder_snapshot(recipient, &name)?))
                })?;
                let floor = match claimed {
                    Some(floor) => floor,
                    None if rev1 => info.recent_floor,
                    None => u32::MAX,
                };
                let recent: HashSet<u32> = messages
                    .iter()
                    .filter(|m| m.uid > floor)
                    .map(|m| m.uid)
                    .collect();
                let unseen = messages
                    .iter()
                    .position(|m| !m.flags.iter().any(|f| f == "\\Seen"));
                out.extend_from_slice(format!("* {} EXISTS\r\n", messages.len()).as_bytes());
                // IMAP4rev1 clients expect RECENT; IMAP4rev2 removed it (RFC 9051 E).
                if rev1 {
                    out.extend_from_slice(format!("* {} RECENT\r\n", recent.len()).as_bytes());
                }
                let keywords = messages
                    .iter()
                    .flat_map(|m| m.flags.iter())
                    .filter(|f| !f.starts_with('\\'))
                    .cloned()
                    .collect();
                let view = View {
                    name: String::new(),
                    read_only,
                    messages: Vec::new(),
                    keywords,
                    recent,
                    saved: Vec::new(),
                    live: Vec::new(),
                    live_stamp: (0, 0, 0),
                    synced_modseq: 0,
                };
                view.flags_lines(out);
                let messages: Vec<MessageState> =
                    messages.into_iter().map(|m| view.shown(m)).collect();
                if let Some(i) = unseen {
                    out.extend_from_slice(
                        format!("* OK [UNSEEN {}] first unseen\r\n", i + 1).as_bytes(),
                    );
                }
                out.extend_from_slice(
                    format!("* OK [UIDVALIDITY {}] UIDs valid\r\n", info.uidvalidity).as_bytes(),
                );
                out.extend_from_slice(
                    format!("* OK [UIDNEXT {}] predicted next UID\r\n", info.uidnext).as_bytes(),
                );
                out.extend_from_slice(
                    format!("* OK [HIGHESTMODSEQ {}] highest\r\n", info.highestmodseq).as_bytes(),
                );
                out.extend_from_slice(b"* LIST () \"/\" ");
                write_mailbox(out, &info.name);
                out.extend_from_slice(b"\r\n");
                // QRESYNC: what changed since the client last had the folder open, when
                // its UIDVALIDITY still holds (RFC 7162 3.2.5.2): the UIDs expunged
                // since, then the flags of every message changed since.
                if let Some(q) = qresync.filter(|q| q.uidvalidity == info.uidvalidity) {
                    let name = info.name.clone();
                    let since = q.modseq;
                    let vanished =
                        store_call(&store, move |s| s.vanished(recipient, &name, since))?;
                    let present: Vec<u32> = messages.iter().map(|m| m.uid).collect();
                    let max = info.uidnext.saturating_sub(1);
                    let set = vanished_set(&vanished, q.known_uids.as_ref(), &present, max);
                    if !set.is_empty() {
                        out.extend_from_slice(format!("* VANISHED (EARLIER) {set}\r\n").as_bytes());
                    }
                    for (i, m) in messages.iter().enumerate() {
                        if m.modseq > since {
                            out.extend_from_slice(
                                format!(
                                    "* {} FETCH (UID {} FLAGS ({}) MODSEQ ({}))\r\n",
                                    i + 1,
                                    m.uid,
                                    m.flags.join(" "),
                                    m.modseq
                                )
                                .as_bytes(),
                            );
                        }
                    }
                }
                self.selected = Some(View {
                    name: info.name,
                    messages,
                    synced_modseq: info.highestmodseq,
                    ..view
                });
                ok(if read_only {
                    "[READ-ONLY] EXAMINE completed"
                } else {
                    "[READ-WRITE] SELECT completed"
                })
            }
            CommandKind::Create(name) => {
                let name = name.trim_end_matches('/').to_string();
                if name.is_empty() || name.contains("//") {
                    return no("[CANNOT] not a valid folder name");
                }
                if name.len() > self.server.config.folder_name_max {
                    return no(format!(
                        "[LIMIT] folder names are at most {} bytes",
                        self.server.config.folder_name_max
                    ));
                }
                if name == "INBOX" {
                    return no("[ALREADYEXISTS] INBOX exists");
                }
                store_call(&store, move |s| {
                    // Parents are created on the way (RFC 9051 6.3.4).
                    let mut path = String::new();
                    let parts: Vec<&str> = name.split('/').collect();
                    for (i, part) in parts.iter().enumerate() {
                        if i > 0 {
                            path.push('/');
                        }
                        path.push_str(part);
                        if i + 1 < parts.len() {
                            s.ensure_folder(recipient, &path, None)?;
                        }
                    }
                    s.create_folder(recipient, &name, None)
                })?;
                ok("CREATE completed")
            }
            CommandKind::Delete(name) => {
                if name == "INBOX" {
                    return no("[CANNOT] INBOX cannot be deleted");
                }
                if self.selected.as_ref().is_some_and(|v| v.name == name) {
                    self.selected = None;
                }
                store_call(&store, move |s| s.delete_folder(recipient, &name))?;
                ok("DELETE completed")
            }
            CommandKind::Rename(from, to) => {
                if to.len() > self.server.config.folder_name_max {
                    return no(format!(
                        "[LIMIT] folder names are at most {} bytes",
                        self.server.config.folder_name_max
                    ));
                }
                store_call(&store, move |s| s.rename_folder(recipient, &from, &to))?;
                ok("RENAME completed")
            }
            CommandKind::Subscribe(name) => {
                store_call(&store, move |s| s.subscribe(recipient, &name, true))?;
                ok("SUBSCRIBE completed")
            }
            CommandKind::Unsubscribe(name) => {
                store_call(&store, move |s| s.subscribe(recipient, &name, false))?;
                ok("UNSUBSCRIBE completed")
            }
            CommandKind::List {
                reference,
                patterns,
                options,
            } => {
                self.list(recipient, &reference, &patterns, &options, out)?;
                ok(if options.lsub {
                    "LSUB completed"
                } else {
                    "LIST completed"
                })
            }
            CommandKind::Status(name, items) => {
                let folders = store_call(&store, move |s| s.folders(recipient))?;
                let info = folders
                    .into_iter()
                    .find(|f| f.name == name)
                    .ok_or_else(|| Refusal::no("[NONEXISTENT] no such folder"))?;
                self.status_line(recipient, &info, &items, out)?;
                ok("STATUS completed")
            }
            CommandKind::Append(name, mut messages) => {
                // CATENATE (RFC 4469): build each message from its text parts and the
                // messages or sections its URLs name (this user's, on this server).
                for message in &mut messages {
                    let Some(parts) = message.catenate.take() else {
                        continue;
                    };
                    let mut built = Vec::new();
                    for part in parts {
                        match part {
                            crate::parse::CatenatePart::Text(text) => built.extend(text),
                            crate::parse::CatenatePart::Url(url) => {
                                let bad =
                                    || no(format!("[BADURL {url}] the URL names nothing here"));
                                let Some(target) = crate::parse::parse_imap_url(&url) else {
                                    return bad();
                                };
                                // Reading the message and cutting its section grow with
                                // its size: both on the blocking pool.
                                let found = store_call(&store, move |s| {
                                    let folder = s
                                        .folders(recipient)?
                                        .into_iter()
                                        .find(|f| f.name == target.mailbox);
                                    let Some(folder) = folder else {
                                        return Ok(None);
                                    };
                                    if target.uidvalidity.is_some_and(|v| v != folder.uidvalidity) {
                                        return Ok(None);
                                    }
                                    let Some(raw) =
                                        s.message_raw(recipient, &target.mailbox, target.uid)?
                                    else {
                                        return Ok(None);
                                    };
                                    Ok(match &target.section {
                                        None => Some(raw),
                                        Some(section) => mime::section(&mime::parse(&raw), section),
                                    })
                                });
                                let Ok(Some(bytes)) = found else {
                                    return bad();
                                };
                                built.extend(bytes);
                                if built.len() as u64 > self.server.config.append_limit {
                                    return no("[TOOBIG] the message is above APPENDLIMIT");
                                }
                            }
                        }
                    }
                    message.message = built;
                }
                // MULTIAPPEND (RFC 3502): every message is checked first, and all are
                // stored in one transaction or none is.
                if messages
                    .iter()
                    .any(|m| m.message.len() as u64 > self.server.config.append_limit)
                {
                    return no("[TOOBIG] a message is above APPENDLIMIT");
                }
                let size: u64 = messages.iter().map(|m| m.message.len() as u64).sum();
                // Twice the size: the WAL first, the database file at a checkpoint.
                if let Err(refused) = store.admit_new(size.saturating_mul(2)) {
                    return no(format!("[LIMIT] {refused}; try again later"));
                }
                if let Some(limit) = self.hard_quota_kb(recipient) {
                    let used = store_call(&store, move |s| s.mailbox_bytes(recipient))?;
                    if used + size > limit * 1024 {
                        return no("[OVERQUOTA] the mailbox is over its quota");
                    }
                }
                let now = mailroom_watch::now_ms();
                let messages: Vec<mailroom_store::NewMessage> = messages
                    .into_iter()
                    .map(|m| mailroom_store::NewMessage {
                        flags: m.flags.into_iter().filter(|f| f != "\\Recent").collect(),
                        internal_date_ms: m.date_ms.unwrap_or(now),
                        facts: Some(mailroom_message::facts::message_facts(&m.message)),
                        body: m.message,
                    })
                    .collect();
                let folder = name.clone();
                let appended = target_call(&store, move |s| match messages.as_slice() {
                    [one] => s.append(
                        recipient,
                        &folder,
                        &one.flags,
                        one.internal_date_ms,
                        &one.body,
                        one.facts.as_ref(),
                    ),
                    all => s.append_all(recipient, &folder, all),
                })?;
                self.sync(out, true);
                let uids: Vec<u32> = appended.uids.iter().map(|(_, uid)| *uid).collect();
                ok(format!(
                    "[APPENDUID {} {}] APPEND completed",
                    appended.uidvalidity,
                    uid_set(&uids)
                ))
            }
            CommandKind::GetQuotaRoot(name) => {
                out.extend_from_slice(b"* QUOTAROOT ");
                write_mailbox(out, &name);
                if let Some(limit) = self.hard_quota_kb(recipient) {
                    out.extend_from_slice(b" \"\"\r\n");
                    let used = store_call(&store, move |s| s.mailbox_bytes(recipient))?;
                    out.extend_from_slice(
                        format!("* QUOTA \"\" (STORAGE {} {limit})\r\n", used.div_ceil(1024))
                            .as_bytes(),
                    );
                } else {
                    out.extend_from_slice(b"\r\n");
                }
                ok("GETQUOTAROOT completed")
            }
            CommandKind::GetQuota(root) => {
                let limit = self.hard_quota_kb(recipient);
                match (root.is_empty(), limit) {
                    (true, Some(limit)) => {
                        let used = store_call(&store, move |s| s.mailbox_bytes(recipient))?;
                        out.extend_from_slice(
                            format!("* QUOTA \"\" (STORAGE {} {limit})\r\n", used.div_ceil(1024))
                                .as_bytes(),
                        );
                        ok("GETQUOTA completed")
                    }
                    _ => no("[NONEXISTENT] no such quota root"),
                }
            }
            CommandKind::SetQuota => {
                no("[NOPERM] quotas are set in the directory by the administrator")
            }
            other => self.selected_command(other, tag, recipient, out),
        }
    }

    /// The directory's hard limit for the mailbox (prohibit send and receive), KB.
    fn hard_quota_kb(&self, recipient: RecipientId) -> Option<u64> {
        let snapshot = self.server.directory.snapshot();
        let r = snapshot.recipient(recipient)?;
        r.quota.prohibit_send_receive_kb.filter(|kb| *kb > 0)
    }

    fn status_line(
        &self,
        recipient: RecipientId,
        info: &FolderInfo,
        items: &[StatusItem],
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        let deleted = if items.contains(&StatusItem::Deleted) {
            let name = info.name.clone();
            let messages = store_call(&self.server.store, move |s| {
                s.folder_messages(recipient, &name)
            })?;
            messages
                .iter()
                .filter(|m| m.flags.iter().any(|f| f == "\\Deleted"))
                .count()
        } else {
            0
        };
        let values: Vec<String> = items
            .iter()
            .map(|item| match item {
                StatusItem::Messages => format!("MESSAGES {}", info.messages),
                StatusItem::UidNext => format!("UIDNEXT {}", info.uidnext),
                StatusItem::UidValidity => format!("UIDVALIDITY {}", info.uidvalidity),
                StatusItem::Unseen => format!("UNSEEN {}", info.unseen),
                StatusItem::Deleted => format!("DELETED {deleted}"),
                StatusItem::Size => format!("SIZE {}", info.bytes),
                // The selected folder's recent messages are this session's (it took
                // them at SELECT); other folders count what nobody took yet.
                StatusItem::Recent => match &self.selected {
                    Some(view) if view.name == info.name && !view.read_only => {
                        format!("RECENT {}", view.recent.len() + info.recent as usize)
                    }
                    _ => format!("RECENT {}", info.recent),
                },
                StatusItem::HighestModSeq => format!("HIGHESTMODSEQ {}", info.highestmodseq),
                StatusItem::AppendLimit => {
                    format!("APPENDLIMIT {}", self.server.config.append_limit)
                }
            })
            .collect();
        out.extend_from_slice(b"* STATUS ");
        write_mailbox(out, &info.name);
        out.extend_from_slice(format!(" ({})\r\n", values.join(" ")).as_bytes());
        Ok(())
    }

    fn list(
        &self,
        recipient: RecipientId,
        reference: &str,
        patterns: &[String],
        options: &ListOptions,
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        let keyword = if options.lsub { "LSUB" } else { "LIST" };
        if patterns.len() == 1 && patterns[0].is_empty() {
            // The hierarchy delimiter and root (RFC 9051 6.3.9).
            out.extend_from_slice(format!("* {keyword} (\\Noselect) \"/\" \"\"\r\n").as_bytes());
            return Ok(());
        }
        let folders = store_call(&self.server.store, move |s| s.folders(recipient))?;
        // Matching is pattern × name per folder: bounded, but it grows with the number
        // of folders; like every command it runs on the blocking pool.
        let full_patterns: Vec<String> =
            patterns.iter().map(|p| format!("{reference}{p}")).collect();
        let mut names: Vec<String> = folders.iter().map(|f| f.name.clone()).collect();
        // LSUB: the unsubscribed parents of subscribed folders are candidates too
        // (RFC 3501 6.3.9: with "%", a subscribed "foo/bar" under an unsubscribed "foo"
        // lists "foo" as \Noselect).
        let mut ancestors: Vec<String> = Vec::new();
        if options.lsub {
            let subscribed: HashSet<&str> = folders
                .iter()
                .filter(|f| f.subscribed)
                .map(|f| f.name.as_str())
                .collect();
            let mut seen: HashSet<&str> = HashSet::new();
            for folder in folders.iter().filter(|f| f.subscribed) {
                for parent in parents_of(&folder.name) {
                    if !subscribed.contains(parent) && seen.insert(parent) {
                        ancestors.push(parent.to_string());
                    }
                }
            }
        }
        let folder_count = names.len();
        names.extend(ancestors.iter().cloned());
        let matched: Vec<bool> = names
            .iter()
            .map(|name| {
                full_patterns.iter().any(|p| {
                    if name == "INBOX" {
                        pattern_matches(p.to_ascii_uppercase().as_bytes(), b"INBOX")
                    } else {
                        pattern_matches(p.as_bytes(), name.as_bytes())
                    }
                })
            })
            .collect();
        let (folder_matched, ancestor_matched) = matched.split_at(folder_count);
        // Sorted, so whether a folder has children is one look at the next name after
        // "name/" (not a scan of every folder for every folder).
        let names: std::collections::BTreeSet<&str> =
            folders.iter().map(|f| f.name.as_str()).collect();
        for (folder, matched) in folders.iter().zip(folder_matched) {
            if !matched {
                continue;
            }
            if (options.subscribed || options.lsub) && !folder.subscribed {
                continue;
            }
            if options.special_use_only && folder.special_use.is_none() {
                continue;
            }
            let prefix = format!("{}/", folder.name);
            let children = names
                .range(prefix.as_str()..)
                .next()
                .is_some_and(|n| n.starts_with(&prefix));
            let mut attributes = vec![
                if children {
                    "\\HasChildren"
                } else {
                    "\\HasNoChildren"
                }
                .to_string(),
            ];
            if let Some(usage) = &folder.special_use
                && !options.lsub
            {
                attributes.push(usage.clone());
            }
            if (options.return_subscribed || options.subscribed) && folder.subscribed {
                attributes.push("\\Subscribed".into());
            }
            out.extend_from_slice(
                format!("* {keyword} ({}) \"/\" ", attributes.join(" ")).as_bytes(),
            );
            write_mailbox(out, &folder.name);
            out.extend_from_slice(b"\r\n");
            if let Some(items) = &options.status {
                self.status_line(recipient, folder, items, out)?;
            }
        }
        // A parent shows only where the pattern hid its subscribed children ("%").
        let mut shown_parents: HashSet<&str> = HashSet::new();
        if !ancestors.is_empty() {
            for (folder, matched) in folders.iter().zip(folder_matched) {
                if *matched && folder.subscribed {
                    shown_parents.extend(parents_of(&folder.name));
                }
            }
        }
        for (parent, matched) in ancestors.iter().zip(ancestor_matched) {
            if *matched && !shown_parents.contains(parent.as_str()) {
                out.extend_from_slice(b"* LSUB (\\Noselect) \"/\" ");
                write_mailbox(out, parent);
                out.extend_from_slice(b"\r\n");
            }
        }
        Ok(())
    }

    fn selected_command(
        &mut self,
        kind: CommandKind,
        tag: &str,
        recipient: RecipientId,
        out: &mut Output<'_>,
    ) -> Outcome {
        let Some(view) = &self.selected else {
            return bad("select a folder first");
        };
        let mut kind = kind;
        resolve_saved(view, &mut kind);
        let store = self.server.store.clone();
        match kind {
            CommandKind::CancelUpdate(tags) => {
                let view = self.selected.as_mut().expect("checked");
                let unknown: Vec<&String> = tags
                    .iter()
                    .filter(|t| !view.live.iter().any(|l| &l.tag == *t))
                    .collect();
                let answer = if unknown.is_empty() {
                    ok("CANCELUPDATE completed")
                } else {
                    no(format!(
                        "no search is kept up to date under tag {:?}",
                        unknown[0]
                    ))
                };
                view.live.retain(|l| !tags.contains(&l.tag));
                answer
            }
            CommandKind::Close | CommandKind::Unselect => {
                let view = self.selected.take().expect("checked");
                if matches!(kind, CommandKind::Close) && !view.read_only {
                    let uids: Vec<u32> = view
                        .messages
                        .iter()
                        .filter(|m| m.flags.iter().any(|f| f == "\\Deleted"))
                        .map(|m| m.uid)
                        .collect();
                    let name = view.name.clone();
                    store_call(&store, move |s| s.expunge(recipient, &name, &uids))?;
                }
                if let Some(bell) = &mut self.bell {
                    self.bell_seen = *bell.borrow_and_update();
                }
                ok(if matches!(kind, CommandKind::Close) {
                    "CLOSE completed"
                } else {
                    "UNSELECT completed"
                })
            }
            CommandKind::Expunge(uid_set) => {
                let view = self.selected.as_ref().expect("checked");
                if view.read_only {
                    return no("[READ-ONLY] the folder is read-only");
                }
                let max_uid = view.max_uid();
                let uids: Vec<u32> = view
                    .messages
                    .iter()
                    .filter(|m| m.flags.iter().any(|f| f == "\\Deleted"))
                    .filter(|m| {
                        uid_set
                            .as_ref()
                            .is_none_or(|set| in_set(set, m.uid, max_uid))
                    })
                    .map(|m| m.uid)
                    .collect();
                let name = view.name.clone();
                let targets = uids.clone();
                store_call(&store, move |s| s.expunge(recipient, &name, &targets))?;
                self.remove_from_view(&uids, out);
                self.sync(out, true);
                ok("EXPUNGE completed")
            }
            CommandKind::Thread {
                uid,
                references,
                key,
            } => {
                self.sync(out, uid);
                let results = self.search(recipient, &key)?;
                let view = self.selected.as_ref().expect("checked");
                let states: Vec<MessageState> =
                    results.iter().map(|&i| view.messages[i].clone()).collect();
                let numbers: Vec<u32> = results.iter().map(|&i| view.number(i, uid)).collect();
                let name = view.name.clone();
                let threads = store_call(&store, move |s| {
                    let mut all = Vec::with_capacity(states.len());
                    with_headers(s, recipient, &name, &states, true, |order, state, m| {
                        let (message_id, refs, reply) = match m {
                            Some(m) => crate::thread::ids_of(m),
                            None => (None, Vec::new(), false),
                        };
                        all.push(crate::thread::Threadable {
                            number: numbers[order],
                            fields: crate::sort::fields(m, state),
                            order,
                            message_id,
                            references: refs,
                            reply,
                        });
                    })?;
                    Ok(if references {
                        crate::thread::references(all)
                    } else {
                        crate::thread::ordered_subject(all)
                    })
                })?;
                let line = if threads.is_empty() {
                    "* THREAD\r\n".to_string()
                } else {
                    format!("* THREAD {threads}\r\n")
                };
                out.extend_from_slice(line.as_bytes());
                ok("THREAD completed")
            }
            CommandKind::Sort {
                uid,
                ret,
                criteria,
                key,
            } => {
                if ret.update && self.live_tag_in_use(tag) {
                    return bad(format!(
                        "tag {tag:?} is already kept up to date; use a new tag"
                    ));
                }
                self.sync(out, uid);
                let results = self.search(recipient, &key)?;
                let view = self.selected.as_ref().expect("checked");
                let states: Vec<MessageState> =
                    results.iter().map(|&i| view.messages[i].clone()).collect();
                let needs_header = criteria.iter().any(|c| {
                    !matches!(
                        c.key,
                        crate::parse::SortKey::Arrival | crate::parse::SortKey::Size
                    )
                });
                let mut keyed: Vec<(u32, crate::sort::SortFields)> =
                    Vec::with_capacity(states.len());
                store_call(&store, |s| {
                    with_headers(
                        s,
                        recipient,
                        &view.name,
                        &states,
                        needs_header,
                        |_, state, m| {
                            keyed.push((state.uid, crate::sort::fields(m, state)));
                        },
                    )
                })?;
                // Ties keep mailbox order, which is UID order (RFC 5256 3).
                keyed.sort_by(|a, b| {
                    crate::sort::compare(&a.1, &b.1, &criteria).then(a.0.cmp(&b.0))
                });
                let order: Vec<u32> = keyed.iter().map(|(u, _)| *u).collect();
                let numbers: Vec<u32> = if uid {
                    order.clone()
                } else {
                    order.iter().filter_map(|u| view.seq_of(*u)).collect()
                };
                if ret.extended {
                    // ESORT (RFC 5267): MIN and MAX are the first and last in sort order,
                    // ALL and PARTIAL keep the order.
                    let mut line = format!("* ESEARCH (TAG \"{tag}\")");
                    if uid {
                        line.push_str(" UID");
                    }
                    if let (Some(first), Some(last)) = (numbers.first(), numbers.last()) {
                        if ret.min {
                            line.push_str(&format!(" MIN {first}"));
                        }
                        if ret.max {
                            line.push_str(&format!(" MAX {last}"));
                        }
                        if ret.all {
                            // uid_set keeps the order given: sort order here.
                            line.push_str(&format!(" ALL {}", uid_set(&numbers)));
                        }
                    }
                    if ret.count {
                        line.push_str(&format!(" COUNT {}", numbers.len()));
                    }
                    if let Some((low, high)) = ret.partial {
                        // RFC 5267 4.4: the results at positions low..high of the sort.
                        let part: Vec<u32> = numbers
                            .iter()
                            .copied()
                            .skip(low as usize - 1)
                            .take((high - low) as usize + 1)
                            .collect();
                        let set = if part.is_empty() {
                            "NIL".to_string()
                        } else {
                            uid_set(&part)
                        };
                        line.push_str(&format!(" PARTIAL ({low}:{high} {set})"));
                    }
                    out.extend_from_slice(line.as_bytes());
                } else {
                    let mut line = String::from("* SORT");
                    for n in &numbers {
                        line.push_str(&format!(" {n}"));
                    }
                    out.extend_from_slice(line.as_bytes());
                }
                out.extend_from_slice(b"\r\n");
                if ret.update {
                    let live = LiveSearch {
                        tag: tag.to_string(),
                        uid,
                        key,
                        result: order.iter().copied().collect(),
                        sorted: Some(Sorted {
                            criteria,
                            fields: keyed.into_iter().collect(),
                            order,
                        }),
                    };
                    self.keep_live(live, out);
                }
                ok("SORT completed")
            }
            CommandKind::Search { uid, ret, key } => {
                if ret.update && self.live_tag_in_use(tag) {
                    return bad(format!(
                        "tag {tag:?} is already kept up to date; use a new tag"
                    ));
                }
                if search::uses_modseq(&key) {
                    self.enable_condstore(recipient, out);
                }
                self.sync(out, uid);
                let results = match self.search(recipient, &key) {
                    Ok(results) => results,
                    Err(e) => {
                        // A SEARCH with SAVE that fails leaves an empty saved result.
                        if ret.save
                            && let Some(view) = self.selected.as_mut()
                        {
                            view.saved.clear();
                        }
                        return Err(e);
                    }
                };
                if ret.save {
                    let view = self.selected.as_mut().expect("checked");
                    view.saved = results.iter().map(|&i| view.messages[i].uid).collect();
                }
                let view = self.selected.as_ref().expect("checked");
                let numbers: Vec<u32> = results.iter().map(|&i| view.number(i, uid)).collect();
                // RFC 7162 3.1.5 with ESEARCH: MODSEQ is the highest of the messages the
                // response names (MIN's, MAX's, ALL's; every match for COUNT alone).
                // Results are in message order, so MIN is the first and MAX the last.
                let returned: Vec<usize> = if ret.extended && !ret.all && (ret.min || ret.max) {
                    let first = results.first().filter(|_| ret.min);
                    let last = results.last().filter(|_| ret.max);
                    first.into_iter().chain(last).copied().collect()
                } else {
                    results.clone()
                };
                let highest = returned.iter().map(|&i| view.messages[i].modseq).max();
                let live = ret.update.then(|| LiveSearch {
                    tag: tag.to_string(),
                    uid,
                    key: key.clone(),
                    result: results.iter().map(|&i| view.messages[i].uid).collect(),
                    sorted: None,
                });
                if ret.extended {
                    let mut line = format!("* ESEARCH (TAG \"{tag}\")");
                    if uid {
                        line.push_str(" UID");
                    }
                    if !numbers.is_empty() {
                        if ret.min {
                            line.push_str(&format!(
                                " MIN {}",
                                numbers.iter().min().expect("non-empty")
                            ));
                        }
                        if ret.max {
                            line.push_str(&format!(
                                " MAX {}",
                                numbers.iter().max().expect("non-empty")
                            ));
                        }
                        if ret.all {
                            line.push_str(&format!(" ALL {}", compact(&numbers)));
                        }
                    }
                    if ret.count {
                        line.push_str(&format!(" COUNT {}", numbers.len()));
                    }
                    if let Some((low, high)) = ret.partial {
                        // RFC 5267 4.4: the results at positions low..high, in order.
                        let mut sorted = numbers.clone();
                        sorted.sort_unstable();
                        let part: Vec<u32> = sorted
                            .into_iter()
                            .skip(low as usize - 1)
                            .take((high - low) as usize + 1)
                            .collect();
                        let set = if part.is_empty() {
                            "NIL".to_string()
                        } else {
                            compact(&part)
                        };
                        line.push_str(&format!(" PARTIAL ({low}:{high} {set})"));
                    }
                    if search::uses_modseq(&key)
                        && let Some(m) = highest
                    {
                        line.push_str(&format!(" MODSEQ {m}"));
                    }
                    out.extend_from_slice(line.as_bytes());
                    out.extend_from_slice(b"\r\n");
                } else if ret.save {
                    // SAVE alone: nothing to send (RFC 5182 2.1).
                } else {
                    let mut line = String::from("* SEARCH");
                    for n in &numbers {
                        line.push_str(&format!(" {n}"));
                    }
                    if search::uses_modseq(&key)
                        && let Some(m) = highest
                    {
                        line.push_str(&format!(" (MODSEQ {m})"));
                    }
                    out.extend_from_slice(line.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                if let Some(live) = live {
                    self.keep_live(live, out);
                }
                ok("SEARCH completed")
            }
            CommandKind::Fetch {
                uid,
                set,
                items,
                modifiers,
            } => {
                if modifiers.vanished && !self.qresync {
                    return bad("the VANISHED modifier needs ENABLE QRESYNC first");
                }
                self.sync(out, uid);
                if let (true, Some(since)) = (modifiers.vanished, modifiers.changed_since) {
                    // UIDs of the set expunged since CHANGEDSINCE, ahead of the FETCH
                    // responses (RFC 7162 3.2.6).
                    let view = self.selected.as_ref().expect("checked");
                    let name = view.name.clone();
                    let present: Vec<u32> = view.messages.iter().map(|m| m.uid).collect();
                    let max = view.max_uid();
                    let vanished = store_call(&self.server.store, move |s| {
                        s.vanished(recipient, &name, since)
                    })?;
                    let text = vanished_set(&vanished, Some(&set), &present, max);
                    if !text.is_empty() {
                        out.extend_from_slice(
                            format!("* VANISHED (EARLIER) {text}\r\n").as_bytes(),
                        );
                    }
                }
                self.fetch(recipient, uid, &set, items, modifiers.changed_since, out)
            }
            CommandKind::Store {
                uid,
                set,
                mode,
                silent,
                flags,
                unchanged_since,
            } => {
                self.sync(out, uid);
                let view = self.selected.as_ref().expect("checked");
                if view.read_only {
                    return no("[READ-ONLY] the folder is read-only");
                }
                if unchanged_since.is_some() {
                    self.enable_condstore(recipient, out);
                }
                let view = self.selected.as_ref().expect("checked");
                let uids: Vec<u32> = view
                    .select(&set, uid)
                    .iter()
                    .map(|&i| view.messages[i].uid)
                    .collect();
                let flags: Vec<String> = flags.into_iter().filter(|f| f != "\\Recent").collect();
                let operation = match mode {
                    StoreMode::Replace => FlagOperation::Replace,
                    StoreMode::Add => FlagOperation::Add,
                    StoreMode::Remove => FlagOperation::Remove,
                };
                let name = view.name.clone();
                let result = store_call(&store, move |s| {
                    s.store_flags(recipient, &name, &uids, operation, &flags, unchanged_since)
                })?;
                let condstore = self.condstore;
                let view = self.selected.as_mut().expect("checked");
                for changed in &result.changed {
                    let Some(seq) = view.seq_of(changed.uid) else {
                        continue;
                    };
                    view.messages[seq as usize - 1] = view.shown(changed.clone());
                    // Even with .SILENT: a keyword new to the folder changes FLAGS.
                    view.announce_keywords(&changed.flags, out);
                    if !silent || unchanged_since.is_some() {
                        let mut line = format!("* {seq} FETCH (");
                        if uid || self.qresync {
                            line.push_str(&format!("UID {} ", changed.uid));
                        }
                        let shown = &view.messages[seq as usize - 1];
                        line.push_str(&format!("FLAGS ({})", shown.flags.join(" ")));
                        if condstore {
                            line.push_str(&format!(" MODSEQ ({})", changed.modseq));
                        }
                        line.push_str(")\r\n");
                        out.extend_from_slice(line.as_bytes());
                    }
                }
                self.own_change_seen();
                if result.modified.is_empty() {
                    ok("STORE completed")
                } else {
                    let view = self.selected.as_ref().expect("checked");
                    let numbers: Vec<u32> = if uid {
                        result.modified.clone()
                    } else {
                        result
                            .modified
                            .iter()
                            .filter_map(|u| view.seq_of(*u))
                            .collect()
                    };
                    ok(format!(
                        "[MODIFIED {}] conditional STORE failed for some",
                        compact(&numbers)
                    ))
                }
            }
            CommandKind::Copy {
                uid,
                set,
                mailbox,
                remove,
            } => {
                self.sync(out, uid);
                let view = self.selected.as_ref().expect("checked");
                if remove && view.read_only {
                    return no("[READ-ONLY] the folder is read-only");
                }
                let uids: Vec<u32> = view
                    .select(&set, uid)
                    .iter()
                    .map(|&i| view.messages[i].uid)
                    .collect();
                if uids.is_empty() {
                    return ok(if remove {
                        "MOVE completed (nothing to move)"
                    } else {
                        "COPY completed (nothing to copy)"
                    });
                }
                let from = view.name.clone();
                let target = mailbox.clone();
                if let Some(limit) = self.hard_quota_kb(recipient).filter(|_| !remove) {
                    let used = store_call(&store, move |s| s.mailbox_bytes(recipient))?;
                    let copying: HashSet<u32> = uids.iter().copied().collect();
                    let adding: u64 = view
                        .messages
                        .iter()
                        .filter(|m| copying.contains(&m.uid))
                        .map(|m| m.size)
                        .sum();
                    if used + adding > limit * 1024 {
                        return no("[OVERQUOTA] the mailbox is over its quota");
                    }
                }
                let copied = target_call(&store, move |s| {
                    s.copy_messages(recipient, &from, &uids, &target, remove)
                })?;
                let sources: Vec<u32> = copied.uids.iter().map(|p| p.0).collect();
                let targets: Vec<u32> = copied.uids.iter().map(|p| p.1).collect();
                let code = format!(
                    "COPYUID {} {} {}",
                    copied.uidvalidity,
                    sources
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    targets
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                );
                if remove {
                    out.extend_from_slice(format!("* OK [{code}] moved\r\n").as_bytes());
                    self.remove_from_view(&sources, out);
                    self.sync(out, true);
                    ok("MOVE completed")
                } else {
                    self.sync(out, uid);
                    ok(format!("[{code}] COPY completed"))
                }
            }
            _ => bad("command not valid in this state"),
        }
    }

    /// Whether a search kept up to date already has this tag: RFC 5267 4.3 refuses a
    /// second UPDATE under it with BAD, since updates are told apart by tag.
    fn live_tag_in_use(&self, tag: &str) -> bool {
        self.selected
            .as_ref()
            .is_some_and(|v| v.live.iter().any(|l| l.tag == tag))
    }

    /// Keeps a search or sort up to date (RETURN (UPDATE)), or refuses with an untagged
    /// `NO [NOUPDATE "tag"]` when the session keeps as many as it may (RFC 5267 4.3.1):
    /// the command itself still completes.
    fn keep_live(&mut self, live: LiveSearch, out: &mut Vec<u8>) {
        let view = self.selected.as_mut().expect("checked");
        if view.live.len() >= LIVE_SEARCHES_MAX {
            out.extend_from_slice(
                format!(
                    "* NO [NOUPDATE \"{}\"] at most {LIVE_SEARCHES_MAX} searches are kept up to date; cancel one first\r\n",
                    live.tag
                )
                .as_bytes(),
            );
            return;
        }
        // With other searches kept, the stamp stays: they may not have seen what this
        // command's sync brought yet (the update after the command tells them; the new
        // one finds nothing to report, its result is current).
        if view.live.is_empty() {
            view.live_stamp = view.stamp();
        }
        view.live.push(live);
    }

    /// Re-evaluates the live searches (CONTEXT=SEARCH) when the view changed since they
    /// were last evaluated, and reports what joined (ADDTO) and left (REMOVEFROM) each.
    fn update_live(&mut self, out: &mut Vec<u8>) {
        let Some(view) = &self.selected else {
            return;
        };
        if view.live.is_empty() || view.stamp() == view.live_stamp {
            return;
        }
        let Ok(recipient) = self.recipient() else {
            return;
        };
        // Content does not change: a search that reads it looks again only at messages
        // changed or added since the last evaluation (a client cannot make every command
        // re-read the folder), unless it depends on positions.
        let (_, last_modseq, last_uid) = view.live_stamp;
        let changed: HashSet<u32> = view
            .messages
            .iter()
            .filter(|m| m.modseq > last_modseq || m.uid > last_uid)
            .map(|m| m.uid)
            .collect();
        let keys: Vec<SearchKey> = view.live.iter().map(|l| l.key.clone()).collect();
        for (i, key) in keys.into_iter().enumerate() {
            let incremental = search::needs_content(&key) && !search::depends_on_position(&key);
            let only = incremental.then_some(&changed);
            let Ok(results) = self.search_among(recipient, &key, only) else {
                continue;
            };
            let view = self.selected.as_mut().expect("checked");
            let matched: std::collections::BTreeSet<u32> =
                results.iter().map(|&r| view.messages[r].uid).collect();
            let mut live = std::mem::take(&mut view.live);
            let search = &mut live[i];
            let now: std::collections::BTreeSet<u32> = if incremental {
                // The unchanged members stay (expunged ones left with REMOVEFROM).
                search
                    .result
                    .iter()
                    .copied()
                    .filter(|u| !changed.contains(u))
                    .chain(matched)
                    .collect()
            } else {
                matched
            };
            let removed: Vec<u32> = search.result.difference(&now).copied().collect();
            let added: Vec<u32> = now.difference(&search.result).copied().collect();
            match &mut search.sorted {
                None => {
                    view.live_line(search, "REMOVEFROM", &removed, out);
                    view.live_line(search, "ADDTO", &added, out);
                }
                Some(sorted) => {
                    let gone: HashSet<u32> = removed.into_iter().collect();
                    let pairs = removals(&mut sorted.order, &gone);
                    for uid in &gone {
                        sorted.fields.remove(uid);
                    }
                    // Only the messages that joined are read for their sort fields.
                    let states: Vec<MessageState> = added
                        .iter()
                        .filter_map(|u| view.seq_of(*u))
                        .map(|seq| view.messages[seq as usize - 1].clone())
                        .collect();
                    let fields = sort_fields(
                        self.server.store.as_ref(),
                        recipient,
                        &view.name,
                        &states,
                        &sorted.criteria,
                    );
                    for (state, fields) in states.iter().zip(fields) {
                        sorted.fields.insert(state.uid, fields);
                    }
                    // A few joiners go in by binary search; many (a big APPEND, a
                    // flag change over the folder) by one sort, so the cost stays
                    // O(n log n), not one shift of the whole order per message.
                    if states.len() <= 64 {
                        for state in &states {
                            let at = sorted
                                .order
                                .partition_point(|&u| sorted.compare(u, state.uid).is_lt());
                            sorted.order.insert(at, state.uid);
                        }
                    } else {
                        let mut order = std::mem::take(&mut sorted.order);
                        order.extend(states.iter().map(|m| m.uid));
                        order.sort_by(|a, b| sorted.compare(*a, *b));
                        sorted.order = order;
                    }
                    let joined: HashSet<u32> = states.iter().map(|m| m.uid).collect();
                    let added_pairs = additions(&sorted.order, &joined);
                    view.sorted_line(search, "REMOVEFROM", &pairs, out);
                    view.sorted_line(search, "ADDTO", &added_pairs, out);
                }
            }
            search.result = now;
            view.live = live;
        }
        let view = self.selected.as_mut().expect("checked");
        view.live_stamp = view.stamp();
    }

    /// Removes expunged UIDs from the view, sending EXPUNGE for each (highest first, so
    /// every sequence number is right when the client reads it), after the live
    /// searches' REMOVEFROM.
    fn remove_from_view(&mut self, uids: &[u32], out: &mut Vec<u8>) {
        let Some(view) = self.selected.as_mut() else {
            return;
        };
        let mut seqs: Vec<u32> = uids.iter().filter_map(|u| view.seq_of(*u)).collect();
        // Live searches lose them first, while their sequence numbers still hold
        // (RFC 5267 4.3: REMOVEFROM before the EXPUNGE).
        let mut live = std::mem::take(&mut view.live);
        for search in &mut live {
            let hit: Vec<u32> = uids
                .iter()
                .copied()
                .filter(|u| search.result.remove(u))
                .collect();
            match &mut search.sorted {
                None => view.live_line(search, "REMOVEFROM", &hit, out),
                Some(sorted) => {
                    let gone: HashSet<u32> = hit.into_iter().collect();
                    let pairs = removals(&mut sorted.order, &gone);
                    for uid in &gone {
                        sorted.fields.remove(uid);
                    }
                    view.sorted_line(search, "REMOVEFROM", &pairs, out);
                }
            }
        }
        view.live = live;
        let mut recent_gone = false;
        for uid in uids {
            recent_gone |= view.recent.remove(uid);
        }
        if !view.saved.is_empty() {
            let gone: HashSet<u32> = uids.iter().copied().collect();
            view.saved.retain(|u| !gone.contains(u));
        }
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        let mut gone = Vec::with_capacity(seqs.len());
        for seq in seqs {
            gone.push(view.messages.remove(seq as usize - 1).uid);
            if !self.qresync {
                out.extend_from_slice(format!("* {seq} EXPUNGE\r\n").as_bytes());
            }
        }
        // With QRESYNC, one VANISHED names them all by UID (RFC 7162 3.2.10).
        if self.qresync && !gone.is_empty() {
            gone.sort_unstable();
            out.extend_from_slice(format!("* VANISHED {}\r\n", uid_set(&gone)).as_bytes());
        }
        // IMAP4rev1: the number of recent messages changed (RFC 3501 7.3.2).
        if recent_gone && !self.enabled.contains("IMAP4REV2") {
            let view = self.selected.as_ref().expect("checked");
            out.extend_from_slice(format!("* {} RECENT\r\n", view.recent.len()).as_bytes());
        }
        // The bell is not marked seen here: a MOVE into this same folder added a
        // message the view does not show yet (the caller's sync finds it).
    }

    /// Turns CONDSTORE on (ENABLE, or a command that uses MODSEQ: RFC 7162 3.1). The
    /// first time with a folder open, the client learns its HIGHESTMODSEQ at once, as a
    /// SELECT would have told it.
    fn enable_condstore(&mut self, recipient: RecipientId, out: &mut Vec<u8>) {
        if self.condstore {
            return;
        }
        self.condstore = true;
        let Some(view) = &self.selected else {
            return;
        };
        let name = view.name.clone();
        if let Ok(Some(status)) = store_call(&self.server.store, move |s| {
            s.folder_status(recipient, &name)
        }) {
            out.extend_from_slice(
                format!("* OK [HIGHESTMODSEQ {}] highest\r\n", status.highestmodseq).as_bytes(),
            );
        }
    }

    /// After this session's own change to the folder (which rang the bell once): its
    /// view already shows it, so the bell need not make the next sync re-read the folder,
    /// unless something else rang too.
    fn own_change_seen(&mut self) {
        if let Some(bell) = &mut self.bell
            && *bell.borrow() == self.bell_seen + 1
        {
            self.bell_seen = *bell.borrow_and_update();
        }
    }

    /// Brings the view up to date with the store when the mailbox's bell rang: EXPUNGE
    /// (only where allowed), EXISTS, and FETCH FLAGS for changed messages.
    fn sync(&mut self, out: &mut Vec<u8>, allow_expunge: bool) {
        let Some(bell) = &mut self.bell else {
            return;
        };
        let owed = allow_expunge && !self.expunge_pending.is_empty();
        if !bell.has_changed().unwrap_or(false) && !owed {
            return;
        }
        // Seen before the read: a change committed during it rings again.
        self.bell_seen = *bell.borrow_and_update();
        let Some(view) = &self.selected else {
            return;
        };
        let Ok(recipient) = self.recipient() else {
            return;
        };
        let name = view.name.clone();
        let since = view.synced_modseq;
        // What changed since the view's MODSEQ, from the expunge records and a MODSEQ
        // index: a change costs what changed, not a read of the whole folder (every
        // session selected on a 100,000-message INBOX read all of it for each new
        // message). When the records do not reach back that far: the whole folder.
        let delta = store_call(&self.server.store, move |s| {
            if since > 0 {
                let changes = s.folder_changes(recipient, &name, since)?;
                if changes.vanished.complete {
                    return Ok((
                        changes.highestmodseq,
                        changes.changed,
                        Some(changes.vanished.uids),
                    ));
                }
            }
            let (info, messages) = s.folder_snapshot(recipient, &name)?;
            Ok((info.highestmodseq, messages, None))
        });
        let Ok((highest, current, vanished)) = delta else {
            return;
        };
        let condstore = self.condstore;
        // IMAP4rev1: messages new to a read-write session are claimed as \Recent for it
        // (unless a session that selected the folder since took them); a read-only one
        // shows its new arrivals recent without claiming them.
        let rev1 = !self.enabled.contains("IMAP4REV2");
        let (known, read_only, name) = {
            let view = self.selected.as_ref().expect("checked");
            (view.max_uid(), view.read_only, view.name.clone())
        };
        let has_new = current.last().is_some_and(|m| m.uid > known);
        let recent_floor = match (rev1 && has_new, read_only) {
            (false, _) => None,
            (true, true) => Some(known),
            (true, false) => store_call(&self.server.store, move |s| {
                s.claim_recent(recipient, &name)
            })
            .ok(),
        };
        let view = self.selected.as_mut().expect("checked");
        view.synced_modseq = highest;
        let gone: Vec<u32> = match vanished {
            // Changes only: the expunged UIDs this view still shows, and those owed.
            Some(uids) => {
                let mut gone: Vec<u32> = uids
                    .into_iter()
                    .filter(|u| view.seq_of(*u).is_some())
                    .chain(self.expunge_pending.iter().copied())
                    .collect();
                gone.sort_unstable();
                gone.dedup();
                gone
            }
            // The whole folder: what the view shows and the folder no longer has.
            None => {
                let present: HashSet<u32> = current.iter().map(|m| m.uid).collect();
                view.messages
                    .iter()
                    .filter(|m| !present.contains(&m.uid))
                    .map(|m| m.uid)
                    .collect()
            }
        };
        // Until announced, they stay in the view (RFC 9051 7.5.1: no EXPUNGE during
        // FETCH, STORE or SEARCH); the debt is remembered, since the bell has been
        // read and the MODSEQ moved past them.
        if allow_expunge {
            self.expunge_pending.clear();
            if !gone.is_empty() {
                self.remove_from_view(&gone, out);
            }
        } else {
            self.expunge_pending = gone;
        }
        let view = self.selected.as_mut().expect("checked");
        // Keywords first seen in this update are announced before it (FLAGS goes
        // ahead of the FETCH and EXISTS responses that show them).
        // Only the keywords of changed and new messages can be new to the client.
        let mut announced: Vec<String> = Vec::new();
        let mut updates = Vec::new();
        let out_final = out;
        let out = &mut updates;
        // Both lists are in UID order: a binary search per changed message. (A linear
        // `find` here made every sync quadratic: 28 % of the IMAP bench's time at 20,000
        // messages, bench/profile.)
        for now in &current {
            if let Ok(i) = view.messages.binary_search_by_key(&now.uid, |m| m.uid)
                && view.messages[i].modseq != now.modseq
            {
                let m = &mut view.messages[i];
                *m = now.clone();
                announced.extend(m.flags.iter().filter(|f| !f.starts_with('\\')).cloned());
                if view.recent.contains(&m.uid) {
                    m.flags.push("\\Recent".into());
                }
                let mut line = format!(
                    "* {} FETCH (UID {} FLAGS ({})",
                    i + 1,
                    m.uid,
                    m.flags.join(" ")
                );
                if condstore {
                    line.push_str(&format!(" MODSEQ ({})", m.modseq));
                }
                line.push_str(")\r\n");
                out.extend_from_slice(line.as_bytes());
            }
        }
        let max = view.max_uid();
        let new: Vec<MessageState> = current.into_iter().filter(|m| m.uid > max).collect();
        if !new.is_empty() {
            if let Some(floor) = recent_floor {
                view.recent
                    .extend(new.iter().filter(|m| m.uid > floor).map(|m| m.uid));
            }
            announced.extend(
                new.iter()
                    .flat_map(|m| m.flags.iter())
                    .filter(|f| !f.starts_with('\\'))
                    .cloned(),
            );
            let new: Vec<MessageState> = new.into_iter().map(|m| view.shown(m)).collect();
            view.messages.extend(new);
            out.extend_from_slice(format!("* {} EXISTS\r\n", view.messages.len()).as_bytes());
            if rev1 {
                out.extend_from_slice(format!("* {} RECENT\r\n", view.recent.len()).as_bytes());
            }
        }
        view.announce_keywords(&announced, out_final);
        out_final.extend_from_slice(&updates);
    }

    fn search(&self, recipient: RecipientId, key: &SearchKey) -> Result<Vec<usize>, Refusal> {
        self.search_among(recipient, key, None)
    }

    /// SEARCH over the view; with `only`, just those UIDs are looked at (a live search
    /// re-reads only the messages that changed).
    fn search_among(
        &self,
        recipient: RecipientId,
        key: &SearchKey,
        only: Option<&HashSet<u32>>,
    ) -> Result<Vec<usize>, Refusal> {
        let view = self.selected.as_ref().expect("checked");
        let wanted = |uid: u32| only.is_none_or(|o| o.contains(&uid));
        let max_seq = view.messages.len() as u32;
        let max_uid = view.max_uid();
        let mut results = Vec::new();
        let content = search::needs_content(key);
        // Header-only keys read only the header of each message; messages are read in
        // chunks, one store call per chunk.
        let header_only = !search::needs_body(key);
        const CHUNK: usize = 500;
        let cached = search::cacheable(key);
        // Fields computed by this search, cached after it.
        let mut fresh: Vec<(u32, Vec<u8>)> = Vec::new();
        let parser = if header_only {
            search::header_parser(key)
        } else {
            mail_parser::MessageParser::default()
        };
        for (chunk_index, chunk) in view.messages.chunks(CHUNK).enumerate() {
            let first_seq = (chunk_index * CHUNK) as u32 + 1;
            let matched: Vec<usize> = if content && cached {
                // The common header keys: from the per-body cache, computing (and
                // keeping) the fields of messages searched for the first time.
                let uids: Vec<u32> = chunk.iter().map(|m| m.uid).filter(|u| wanted(*u)).collect();
                if uids.is_empty() {
                    continue;
                }
                let mut fields: std::collections::HashMap<u32, search::HeaderFields> =
                    store_call(&self.server.store, |s| {
                        s.cached_search_fields(recipient, &view.name, &uids)
                    })?
                    .into_iter()
                    .filter_map(|(uid, bytes)| {
                        search::HeaderFields::decode(&bytes).map(|f| (uid, f))
                    })
                    .collect();
                let missing: Vec<u32> = uids
                    .iter()
                    .copied()
                    .filter(|u| !fields.contains_key(u))
                    .collect();
                if !missing.is_empty() {
                    let raws = store_call(&self.server.store, |s| {
                        s.messages_raw(recipient, &view.name, &missing, true)
                    })?;
                    let parser = search::fields_parser();
                    for (uid, raw) in raws {
                        let computed = search::HeaderFields::of(&mime::parse_with(&parser, &raw));
                        fresh.push((uid, computed.encode()));
                        fields.insert(uid, computed);
                    }
                }
                chunk
                    .iter()
                    .enumerate()
                    .filter(|(j, state)| {
                        // Not wanted (a live search's unchanged members), or gone.
                        let Some(fields) = fields.get(&state.uid) else {
                            return false;
                        };
                        let candidate = Candidate {
                            seq: first_seq + *j as u32,
                            state,
                            message: None,
                            fields: Some(fields),
                        };
                        search::matches(key, &candidate, max_seq, max_uid)
                    })
                    .map(|(j, _)| j)
                    .collect()
            } else if content {
                let uids: Vec<u32> = chunk.iter().map(|m| m.uid).filter(|u| wanted(*u)).collect();
                if uids.is_empty() {
                    continue;
                }
                let raws: std::collections::HashMap<u32, Vec<u8>> =
                    store_call(&self.server.store, |s| {
                        s.messages_raw(recipient, &view.name, &uids, header_only)
                    })?
                    .into_iter()
                    .collect();
                chunk
                    .iter()
                    .enumerate()
                    .filter(|(j, state)| {
                        // Left out of this evaluation: a live search's unchanged
                        // messages (not read, so not in `raws`).
                        let Some(raw) = raws.get(&state.uid) else {
                            return false;
                        };
                        let parsed = mime::parse_with(&parser, raw);
                        let candidate = Candidate {
                            seq: first_seq + *j as u32,
                            state,
                            message: Some(&parsed),
                            fields: None,
                        };
                        search::matches(key, &candidate, max_seq, max_uid)
                    })
                    .map(|(j, _)| j)
                    .collect()
            } else {
                chunk
                    .iter()
                    .enumerate()
                    .filter(|(j, state)| {
                        if !wanted(state.uid) {
                            return false;
                        }
                        let candidate = Candidate {
                            seq: first_seq + *j as u32,
                            state,
                            message: None,
                            fields: None,
                        };
                        search::matches(key, &candidate, max_seq, max_uid)
                    })
                    .map(|(j, _)| j)
                    .collect()
            };
            results.extend(matched.into_iter().map(|j| chunk_index * CHUNK + j));
        }
        // Kept for the next search, in short write turns (mail delivery shares the
        // writer); a failure only costs the next search the parse again.
        for part in fresh.chunks(5_000) {
            if let Err(e) = store_call(&self.server.store, |s| {
                s.cache_search_fields(recipient, &view.name, part)
            }) {
                tracing::warn!(error = e.text, "could not cache search fields");
                break;
            }
        }
        Ok(results)
    }

    fn fetch(
        &mut self,
        recipient: RecipientId,
        uid: bool,
        set: &SequenceSet,
        mut items: Vec<FetchItem>,
        changed_since: Option<u64>,
        out: &mut Output<'_>,
    ) -> Outcome {
        // UID FETCH, and every FETCH once QRESYNC is on (RFC 7162 3.2.4), carries UID.
        if (uid || self.qresync) && !items.contains(&FetchItem::Uid) {
            items.insert(0, FetchItem::Uid);
        }
        if changed_since.is_some() || items.contains(&FetchItem::ModSeq) {
            self.enable_condstore(recipient, out);
            if !items.contains(&FetchItem::ModSeq) {
                items.push(FetchItem::ModSeq);
            }
        }
        let view = self.selected.as_ref().expect("checked");
        let read_only = view.read_only;
        let name = view.name.clone();
        let mut indexes = view.select(set, uid);
        if let Some(since) = changed_since {
            indexes.retain(|&i| view.messages[i].modseq > since);
        }
        if indexes.is_empty() && !uid && !set.iter().all(|r| r.0 == STAR || r.1 == STAR) {
            return bad("no such message");
        }
        let wants_structure = items.iter().any(|i| {
            matches!(
                i,
                FetchItem::Envelope | FetchItem::BodyStructure | FetchItem::Body
            )
        });
        let needs_content = items.iter().any(|i| {
            matches!(
                i,
                FetchItem::Rfc822
                    | FetchItem::Rfc822Header
                    | FetchItem::Rfc822Text
                    | FetchItem::BodySection { .. }
                    | FetchItem::Binary { .. }
                    | FetchItem::BinarySize(_)
            )
        });
        // Reading a body without PEEK sets \Seen (RFC 9051 6.4.5), once, before the
        // responses, which then carry the new flags.
        let sets_seen = !read_only
            && items.iter().any(|i| {
                matches!(i, FetchItem::Rfc822 | FetchItem::Rfc822Text)
                    || matches!(
                        i,
                        FetchItem::BodySection { peek: false, .. }
                            | FetchItem::Binary { peek: false, .. }
                    )
            });
        if sets_seen {
            let unseen: Vec<u32> = indexes
                .iter()
                .map(|&i| &view.messages[i])
                .filter(|m| !m.flags.iter().any(|f| f == "\\Seen"))
                .map(|m| m.uid)
                .collect();
            if !unseen.is_empty() {
                let folder = name.clone();
                let result = store_call(&self.server.store, move |s| {
                    s.store_flags(
                        recipient,
                        &folder,
                        &unseen,
                        FlagOperation::Add,
                        &["\\Seen".to_string()],
                        None,
                    )
                })?;
                let view = self.selected.as_mut().expect("checked");
                for changed in result.changed {
                    if let Some(seq) = view.seq_of(changed.uid) {
                        // As this session shows it: with \Recent where it is recent here.
                        view.messages[seq as usize - 1] = view.shown(changed);
                    }
                }
                if !items.contains(&FetchItem::Flags) {
                    items.push(FetchItem::Flags);
                }
                self.own_change_seen();
            }
        }
        let view = self.selected.as_ref().expect("checked");
        // ENVELOPE and BODYSTRUCTURE come from the per-body cache; only messages without
        // one are read and parsed (and then cached).
        let mut cache = if wants_structure {
            let uids: Vec<u32> = indexes.iter().map(|&i| view.messages[i].uid).collect();
            let folder = name.clone();
            store_call(&self.server.store, move |s| {
                s.cached_structures(recipient, &folder, &uids)
            })?
        } else {
            std::collections::HashMap::new()
        };
        let mut fresh = Vec::new();
        for i in indexes {
            let state = view.messages[i].clone();
            let missing_structure = wants_structure && !cache.contains_key(&state.uid);
            let raw = if needs_content || missing_structure {
                let (folder, uid) = (name.clone(), state.uid);
                match store_call(&self.server.store, move |s| {
                    s.message_raw(recipient, &folder, uid)
                })? {
                    Some(raw) => Some(raw),
                    // Expunged by another session since this one's view: nothing to send.
                    None => continue,
                }
            } else {
                None
            };
            let parsed = raw.as_deref().map(mime::parse);
            if missing_structure && let Some(m) = &parsed {
                let mut structure = Structure {
                    envelope: Vec::new(),
                    bodystructure: Vec::new(),
                    body: Vec::new(),
                };
                mime::envelope(&mut structure.envelope, m);
                mime::body_structure(&mut structure.bodystructure, m, true);
                mime::body_structure(&mut structure.body, m, false);
                cache.insert(state.uid, structure.clone());
                fresh.push((state.uid, structure));
            }
            let structure = cache.get(&state.uid);
            // The response goes out in pieces (after any item, once enough is waiting),
            // so a huge answer never sits in memory whole. A part with an unknown
            // encoding makes the command fail: if nothing of this message's line was
            // sent yet it is dropped, otherwise it is closed with the items so far.
            let line_start = out.len();
            let partly_written_before = out.partly_written();
            out.extend_from_slice(format!("* {} FETCH (", i + 1).as_bytes());
            let mut unknown_cte = false;
            for (n, item) in items.iter().enumerate() {
                if n > 0 {
                    out.push(b' ');
                }
                let item_start = out.len();
                match fetch_item(
                    out,
                    item,
                    &state,
                    raw.as_deref(),
                    parsed.as_ref(),
                    structure,
                ) {
                    Ok(()) => {}
                    Err(FetchError::UnknownCte) => {
                        unknown_cte = true;
                        out.truncate(item_start);
                        break;
                    }
                }
                if !out.flush_if_full() {
                    return no("the client stopped reading");
                }
            }
            if unknown_cte {
                if out.partly_written() == partly_written_before && out.len() >= line_start {
                    out.truncate(line_start);
                } else {
                    if out.last() == Some(&b' ') {
                        out.pop();
                    }
                    out.extend_from_slice(b")\r\n");
                }
                return no("[UNKNOWN-CTE] a part has an unknown Content-Transfer-Encoding");
            }
            out.extend_from_slice(b")\r\n");
            if !out.flush_if_full() {
                return no("the client stopped reading");
            }
        }
        if !fresh.is_empty() {
            let folder = name.clone();
            if let Err(Refusal { text: e, .. }) = store_call(&self.server.store, move |s| {
                s.cache_structures(recipient, &folder, &fresh)
            }) {
                tracing::warn!(error = e, "could not cache message structures");
            }
        }
        ok("FETCH completed")
    }
}

enum FetchError {
    UnknownCte,
}

fn partial(bytes: &[u8], partial: Option<(u32, u32)>) -> &[u8] {
    match partial {
        None => bytes,
        Some((origin, count)) => {
            let start = (origin as usize).min(bytes.len());
            let end = start.saturating_add(count as usize).min(bytes.len());
            &bytes[start..end]
        }
    }
}

fn section_name(section: &Section) -> String {
    let mut name: String = section
        .part
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(".");
    let text = match &section.text {
        SectionText::Full => String::new(),
        SectionText::Header => "HEADER".into(),
        SectionText::Text => "TEXT".into(),
        SectionText::Mime => "MIME".into(),
        SectionText::HeaderFields(names) => format!("HEADER.FIELDS ({})", names.join(" ")),
        SectionText::HeaderFieldsNot(names) => format!("HEADER.FIELDS.NOT ({})", names.join(" ")),
    };
    if !text.is_empty() {
        if !name.is_empty() {
            name.push('.');
        }
        name.push_str(&text);
    }
    name
}

fn fetch_item(
    out: &mut Vec<u8>,
    item: &FetchItem,
    state: &MessageState,
    raw: Option<&[u8]>,
    parsed: Option<&mail_parser::Message<'_>>,
    structure: Option<&Structure>,
) -> Result<(), FetchError> {
    match item {
        FetchItem::Uid => out.extend_from_slice(format!("UID {}", state.uid).as_bytes()),
        FetchItem::Flags => {
            out.extend_from_slice(b"FLAGS ");
            write_flags(out, &state.flags);
        }
        FetchItem::ModSeq => out.extend_from_slice(format!("MODSEQ ({})", state.modseq).as_bytes()),
        FetchItem::InternalDate => {
            out.extend_from_slice(b"INTERNALDATE ");
            internal_date(out, state.internal_date_ms);
        }
        FetchItem::Rfc822Size => {
            out.extend_from_slice(format!("RFC822.SIZE {}", state.size).as_bytes())
        }
        FetchItem::Envelope => {
            out.extend_from_slice(b"ENVELOPE ");
            match (structure, parsed) {
                (Some(s), _) => out.extend_from_slice(&s.envelope),
                (None, Some(m)) => mime::envelope(out, m),
                (None, None) => out.extend_from_slice(b"NIL"),
            }
        }
        FetchItem::BodyStructure | FetchItem::Body => {
            let extended = matches!(item, FetchItem::BodyStructure);
            out.extend_from_slice(if extended {
                b"BODYSTRUCTURE ".as_slice()
            } else {
                b"BODY ".as_slice()
            });
            match (structure, parsed) {
                (Some(s), _) if extended => out.extend_from_slice(&s.bodystructure),
                (Some(s), _) => out.extend_from_slice(&s.body),
                (None, Some(m)) => mime::body_structure(out, m, extended),
                (None, None) => out.extend_from_slice(b"NIL"),
            }
        }
        FetchItem::Rfc822 => {
            out.extend_from_slice(b"RFC822 ");
            literal(out, raw.unwrap_or_default());
        }
        FetchItem::Rfc822Header | FetchItem::Rfc822Text => {
            let (name, text) = if matches!(item, FetchItem::Rfc822Header) {
                ("RFC822.HEADER ", SectionText::Header)
            } else {
                ("RFC822.TEXT ", SectionText::Text)
            };
            out.extend_from_slice(name.as_bytes());
            let bytes = parsed
                .and_then(|m| mime::section(m, &Section { part: vec![], text }))
                .unwrap_or_default();
            literal(out, &bytes);
        }
        FetchItem::BodySection {
            section,
            partial: p,
            ..
        } => {
            out.extend_from_slice(format!("BODY[{}]", section_name(section)).as_bytes());
            if let Some((origin, _)) = p {
                out.extend_from_slice(format!("<{origin}>").as_bytes());
            }
            out.push(b' ');
            match parsed.and_then(|m| mime::section(m, section)) {
                Some(bytes) => literal(out, partial(&bytes, *p)),
                // A part that does not exist is empty (RFC 9051 6.4.5).
                None => out.extend_from_slice(b"\"\""),
            }
        }
        FetchItem::Binary {
            part, partial: p, ..
        } => {
            let name: Vec<String> = part.iter().map(u32::to_string).collect();
            out.extend_from_slice(format!("BINARY[{}]", name.join(".")).as_bytes());
            if let Some((origin, _)) = p {
                out.extend_from_slice(format!("<{origin}>").as_bytes());
            }
            out.push(b' ');
            match parsed.map(|m| mime::binary(m, part)) {
                Some(Ok(bytes)) => {
                    let bytes = partial(&bytes, *p);
                    if bytes.contains(&0) {
                        // literal8 (RFC 3516) for content with NUL bytes.
                        out.push(b'~');
                    }
                    literal(out, bytes);
                }
                Some(Err(mime::BinaryError::UnknownCte)) => return Err(FetchError::UnknownCte),
                _ => out.extend_from_slice(b"NIL"),
            }
        }
        FetchItem::BinarySize(part) => {
            let name: Vec<String> = part.iter().map(u32::to_string).collect();
            out.extend_from_slice(format!("BINARY.SIZE[{}] ", name.join(".")).as_bytes());
            match parsed.map(|m| mime::binary(m, part)) {
                Some(Ok(bytes)) => out.extend_from_slice(bytes.len().to_string().as_bytes()),
                Some(Err(mime::BinaryError::UnknownCte)) => return Err(FetchError::UnknownCte),
                _ => out.extend_from_slice(b"NIL"),
            }
        }
    }
    Ok(())
}

fn command_name(kind: &CommandKind) -> &'static str {
    match kind {
        CommandKind::Capability => "capability",
        CommandKind::Noop => "noop",
        CommandKind::Logout => "logout",
        CommandKind::StartTls => "starttls",
        CommandKind::Login(..) => "login",
        CommandKind::Authenticate(..) => "authenticate",
        CommandKind::Enable(_) => "enable",
        CommandKind::Select { .. } => "select",
        CommandKind::Create(_) => "create",
        CommandKind::Delete(_) => "delete",
        CommandKind::Rename(..) => "rename",
        CommandKind::Subscribe(_) => "subscribe",
        CommandKind::Unsubscribe(_) => "unsubscribe",
        CommandKind::List { .. } => "list",
        CommandKind::Namespace => "namespace",
        CommandKind::Status(..) => "status",
        CommandKind::Append(..) => "append",
        CommandKind::Idle => "idle",
        CommandKind::CancelUpdate(_) => "cancelupdate",
        CommandKind::Check => "check",
        CommandKind::Close => "close",
        CommandKind::Unselect => "unselect",
        CommandKind::Expunge(_) => "expunge",
        CommandKind::Search { .. } => "search",
        CommandKind::Sort { .. } => "sort",
        CommandKind::Thread { .. } => "thread",
        CommandKind::Fetch { .. } => "fetch",
        CommandKind::Store { .. } => "store",
        CommandKind::Copy { remove: false, .. } => "copy",
        CommandKind::Copy { remove: true, .. } => "move",
        CommandKind::Id => "id",
        CommandKind::GetQuota(_) => "getquota",
        CommandKind::GetQuotaRoot(_) => "getquotaroot",
        CommandKind::SetQuota => "setquota",
    }
}

/// Command names as [`command_name`] gives them, for [`peek_command_name`].
const COMMAND_NAMES: [&str; 36] = [
    "capability",
    "noop",
    "logout",
    "starttls",
    "login",
    "authenticate",
    "enable",
    "select",
    "examine",
    "create",
    "delete",
    "rename",
    "subscribe",
    "unsubscribe",
    "list",
    "lsub",
    "namespace",
    "status",
    "append",
    "idle",
    "cancelupdate",
    "check",
    "close",
    "unselect",
    "expunge",
    "search",
    "sort",
    "thread",
    "fetch",
    "store",
    "copy",
    "move",
    "id",
    "getquota",
    "getquotaroot",
    "setquota",
];

/// The name of the command in `bytes` without parsing it (the tag, then the word,
/// `UID` skipped): what the watchdog reports a session as doing while the command runs
/// on the blocking pool. Unknown words are "command".
pub fn peek_command_name(bytes: &[u8]) -> &'static str {
    let mut words = bytes
        .split(|b| *b == b' ' || *b == b'\r' || *b == b'\n')
        .filter(|w| !w.is_empty())
        .skip(1);
    let mut word = words.next().unwrap_or_default();
    if word.eq_ignore_ascii_case(b"UID") {
        word = words.next().unwrap_or_default();
    }
    COMMAND_NAMES
        .iter()
        .find(|name| name.as_bytes().eq_ignore_ascii_case(word))
        .copied()
        .unwrap_or("command")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vanished_sets_from_records_or_from_what_is_missing() {
        use crate::parse::Range;
        use mailroom_store::Vanished;
        let recorded = Vanished {
            uids: vec![3, 5, 9],
            complete: true,
        };
        assert_eq!(vanished_set(&recorded, None, &[1, 2, 4], 10), "3,5,9");
        // Still in the session's view: not EARLIER (a plain VANISHED comes at sync).
        assert_eq!(vanished_set(&recorded, None, &[1, 5], 10), "3,9");
        let known = vec![Range(4, 6)];
        assert_eq!(vanished_set(&recorded, Some(&known), &[4], 10), "5");
        // Records too short: every known UID up to the last one that is not there.
        let partial = Vanished {
            uids: vec![],
            complete: false,
        };
        assert_eq!(vanished_set(&partial, None, &[2, 3, 7], 9), "1,4:6,8:9");
        let known = vec![Range(5, crate::parse::STAR), Range(1, 2)];
        assert_eq!(vanished_set(&partial, Some(&known), &[2, 7], 8), "1,5:6,8");
        // Overlapping ranges are reported once; nothing past the last UID.
        let known = vec![Range(1, 4), Range(3, 100)];
        assert_eq!(vanished_set(&partial, Some(&known), &[1, 2, 3, 4], 4), "");
        assert_eq!(vanished_set(&partial, Some(&known), &[], 6), "1:6");
    }

    #[test]
    fn list_patterns() {
        assert!(pattern_matches(b"*", b"Archive/2026"));
        assert!(!pattern_matches(b"%", b"Archive/2026"));
        assert!(pattern_matches(b"Archive/%", b"Archive/2026"));
        assert!(pattern_matches(b"%", b"Archive"));
        assert!(pattern_matches(b"A*6", b"Archive/2026"));
        assert!(!pattern_matches(b"Sent", b"Sent/x"));
        assert!(pattern_matches(b"%/%", b"Archive/2026"));
        assert!(!pattern_matches(b"%/%", b"Archive/2026/11"));
        assert!(pattern_matches(b"%/*", b"Archive/2026/11"));
        assert!(pattern_matches(b"", b""));
        assert!(!pattern_matches(b"", b"x"));
        assert!(pattern_matches(b"*%*%", b""));
        assert!(pattern_matches(b"arch*", b"Archive"));
        // Hostile patterns: linear per name, no recursion, whatever the wildcards.
        let stars = vec![b'*'; 60_000];
        assert!(pattern_matches(&stars, b"Archive/2026"));
        let mut many = b"*a".repeat(55);
        many.push(b'b');
        assert!(!pattern_matches(&many, &[b'a'; 60]));
        assert!(!pattern_matches(&vec![b'%'; 60_000], b"a/b"));
    }
}
