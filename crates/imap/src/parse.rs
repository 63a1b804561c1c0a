//! The IMAP command parser (RFC 9051 and RFC 3501 grammar, plus the extensions we
//! advertise: CONDSTORE, ESEARCH, LIST-EXTENDED, LIST-STATUS, UIDPLUS, MOVE, ID, ENABLE,
//! NAMESPACE, QUOTA, IDLE, UNSELECT, SASL-IR).
//!
//! Why our own: the pinned `imap-codec` 1.0 speaks IMAP4rev1 only. It cannot parse
//! BINARY, `UID EXPUNGE`, `SEARCH RETURN`, `LIST` selection and return options, `ID`,
//! `NAMESPACE` or CONDSTORE's modifiers, all of which IMAP4rev2 clients send (see
//! docs/imap.md). The parser works on one complete command (literals already read by
//! the framing layer) and never panics on any input.

use std::fmt;

/// One parsed command.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The client's tag.
    pub tag: String,
    /// What it asks.
    pub kind: CommandKind,
}

/// A sequence set element: numbers (1 to 4294967295, RFC 9051 `nz-number`), with
/// [`STAR`] standing for `*`. Wider than u32 so that `*` (the largest number in use)
/// and 4294967295 (a number no message has yet) stay apart: `UID 5000:4294967295`
/// matches nothing in a mailbox whose last UID is 4000, `UID 5000:*` its last message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range(pub u64, pub u64);

/// A sequence set (`1:3,7,9:*`) or `$` (the saved search result, RFC 5182: unsupported
/// and refused).
pub type SequenceSet = Vec<Range>;

/// `*` in a sequence set.
pub const STAR: u64 = u64::MAX;

/// `$` as a sequence set (RFC 5182): the saved search result, as `[Range(SAVED, SAVED)]`.
/// The session replaces it with the messages saved before it runs a command.
pub const SAVED: u64 = u64::MAX - 1;

/// A section of a message (RFC 9051 6.4.5 `section-spec`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Section {
    /// The part path, e.g. [1, 2] for "1.2"; empty for the whole message.
    pub part: Vec<u32>,
    /// What of that part.
    pub text: SectionText,
}

/// The `section-text` of a section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SectionText {
    /// The whole part (or message).
    #[default]
    Full,
    /// HEADER.
    Header,
    /// HEADER.FIELDS (names).
    HeaderFields(Vec<String>),
    /// HEADER.FIELDS.NOT (names).
    HeaderFieldsNot(Vec<String>),
    /// TEXT.
    Text,
    /// MIME (the part's own MIME header).
    Mime,
}

/// One FETCH data item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchItem {
    /// FLAGS.
    Flags,
    /// UID.
    Uid,
    /// INTERNALDATE.
    InternalDate,
    /// RFC822.SIZE.
    Rfc822Size,
    /// ENVELOPE.
    Envelope,
    /// BODYSTRUCTURE.
    BodyStructure,
    /// BODY (structure without extension data).
    Body,
    /// MODSEQ (RFC 7162).
    ModSeq,
    /// RFC822 (= BODY[]).
    Rfc822,
    /// RFC822.HEADER (= BODY.PEEK[HEADER]).
    Rfc822Header,
    /// RFC822.TEXT (= BODY[TEXT]).
    Rfc822Text,
    /// BODY[section]<partial> or BODY.PEEK[...].
    BodySection {
        /// The section.
        section: Section,
        /// `<origin.count>`.
        partial: Option<(u32, u32)>,
        /// PEEK: do not set \Seen.
        peek: bool,
    },
    /// BINARY[part]<partial> or BINARY.PEEK (RFC 9051 6.4.5).
    Binary {
        /// The part path.
        part: Vec<u32>,
        /// `<origin.count>`.
        partial: Option<(u32, u32)>,
        /// PEEK.
        peek: bool,
    },
    /// BINARY.SIZE[part].
    BinarySize(Vec<u32>),
}

/// FETCH modifiers (RFC 7162: CHANGEDSINCE, and QRESYNC's VANISHED).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchModifiers {
    /// Only messages whose MODSEQ is above this.
    pub changed_since: Option<u64>,
    /// Also report the UIDs of the set expunged since `changed_since` (UID FETCH only).
    pub vanished: bool,
}

/// SELECT/EXAMINE's QRESYNC parameter (RFC 7162 3.2.5): what the client knew when it
/// last had the mailbox open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qresync {
    /// The UIDVALIDITY it knew; when it differs, nothing is resynchronised.
    pub uidvalidity: u32,
    /// The HIGHESTMODSEQ it knew.
    pub modseq: u64,
    /// The UIDs it knows (VANISHED reports only these); None: all.
    pub known_uids: Option<SequenceSet>,
}

/// A SEARCH key (RFC 9051 6.4.4).
#[derive(Debug, Clone, PartialEq)]
pub enum SearchKey {
    /// ALL.
    All,
    /// Messages with `flag`.
    Flag(String),
    /// Messages without `flag`.
    NotFlag(String),
    /// NEW (RFC 3501: RECENT and UNSEEN; no message is recent here).
    New,
    /// OLD.
    Old,
    /// RECENT.
    Recent,
    /// A header contains text (BCC, CC, FROM, SUBJECT, TO, HEADER name).
    Header(String, String),
    /// BODY text.
    Body(String),
    /// TEXT text (header or body).
    Text(String),
    /// BEFORE / ON / SINCE (internal date), as days since the epoch.
    Before(i64),
    /// ON.
    On(i64),
    /// SINCE.
    Since(i64),
    /// SENTBEFORE / SENTON / SENTSINCE (Date header).
    SentBefore(i64),
    /// SENTON.
    SentOn(i64),
    /// SENTSINCE.
    SentSince(i64),
    /// LARGER n.
    Larger(u64),
    /// SMALLER n.
    Smaller(u64),
    /// A sequence set.
    Sequence(SequenceSet),
    /// UID set.
    Uid(SequenceSet),
    /// MODSEQ n (RFC 7162).
    ModSeq(u64),
    /// NOT key.
    Not(Box<SearchKey>),
    /// OR a b.
    Or(Box<SearchKey>, Box<SearchKey>),
    /// A parenthesised list: all must match.
    And(Vec<SearchKey>),
}

/// ESEARCH return options (RFC 4731).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchReturn {
    /// RETURN was given (even empty): answer with ESEARCH.
    pub extended: bool,
    /// MIN.
    pub min: bool,
    /// MAX.
    pub max: bool,
    /// ALL.
    pub all: bool,
    /// COUNT.
    pub count: bool,
    /// SAVE (RFC 5182): remember the result for `$`.
    pub save: bool,
    /// UPDATE (RFC 5267 CONTEXT=SEARCH): keep the search and report ADDTO/REMOVEFROM as
    /// the folder changes, until CANCELUPDATE.
    pub update: bool,
    /// PARTIAL low:high (RFC 5267): only the results at these positions (1-based,
    /// low <= high).
    pub partial: Option<(u32, u32)>,
}

/// A SORT key (RFC 5256, RFC 5957).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// Internal date.
    Arrival,
    /// First Cc mailbox.
    Cc,
    /// Date header.
    Date,
    /// First From mailbox.
    From,
    /// RFC822.SIZE.
    Size,
    /// Base subject.
    Subject,
    /// First To mailbox.
    To,
    /// First From display name (SORT=DISPLAY).
    DisplayFrom,
    /// First To display name (SORT=DISPLAY).
    DisplayTo,
}

/// One sort criterion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SortCriterion {
    /// REVERSE.
    pub reverse: bool,
    /// The key.
    pub key: SortKey,
}

/// LIST selection and return options (RFC 5258, 6154, 5819).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// Selection SUBSCRIBED.
    pub subscribed: bool,
    /// Selection SPECIAL-USE (only special-use folders).
    pub special_use_only: bool,
    /// RECURSIVEMATCH.
    pub recursive_match: bool,
    /// Return CHILDREN (always returned anyway).
    pub children: bool,
    /// Return SUBSCRIBED.
    pub return_subscribed: bool,
    /// Return SPECIAL-USE.
    pub return_special_use: bool,
    /// Return STATUS (items).
    pub status: Option<Vec<StatusItem>>,
    /// LSUB semantics.
    pub lsub: bool,
}

/// STATUS items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusItem {
    /// MESSAGES.
    Messages,
    /// UIDNEXT.
    UidNext,
    /// UIDVALIDITY.
    UidValidity,
    /// UNSEEN.
    Unseen,
    /// DELETED.
    Deleted,
    /// SIZE.
    Size,
    /// RECENT (IMAP4rev1).
    Recent,
    /// HIGHESTMODSEQ.
    HighestModSeq,
    /// APPENDLIMIT.
    AppendLimit,
}

/// How STORE changes flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// FLAGS.
    Replace,
    /// +FLAGS.
    Add,
    /// -FLAGS.
    Remove,
}

/// One message of an APPEND.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendMessage {
    /// Flags to set.
    pub flags: Vec<String>,
    /// Internal date, Unix ms.
    pub date_ms: Option<i64>,
    /// The message (empty when it is built by CATENATE).
    pub message: Vec<u8>,
    /// CATENATE (RFC 4469): the parts the message is made of, in order.
    pub catenate: Option<Vec<CatenatePart>>,
}

/// One part of a CATENATE.
#[derive(Debug, Clone, PartialEq)]
pub enum CatenatePart {
    /// Literal text.
    Text(Vec<u8>),
    /// An IMAP URL (RFC 5092) of a message or section on this server.
    Url(String),
}

/// An IMAP URL's target on this server (RFC 5092, the forms CATENATE uses):
/// `[imap://host]/mailbox[;UIDVALIDITY=n]/;UID=n[/;SECTION=spec]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImapUrl {
    /// The mailbox, percent-decoded.
    pub mailbox: String,
    /// UIDVALIDITY, when given.
    pub uidvalidity: Option<u32>,
    /// The message.
    pub uid: u32,
    /// The section, when given.
    pub section: Option<Section>,
}

/// Parses an IMAP URL as CATENATE references one; `None` when it is not one.
pub fn parse_imap_url(url: &str) -> Option<ImapUrl> {
    let path = match url.strip_prefix("imap://") {
        Some(rest) => &rest[rest.find('/')?..],
        None => url,
    };
    let path = path.strip_prefix('/')?;
    let (mailbox_part, rest) = path
        .split_once("/;UID=")
        .or_else(|| path.split_once("/;uid="))?;
    let (mailbox, uidvalidity) = match mailbox_part.split_once(";UIDVALIDITY=") {
        Some((m, v)) => (m, Some(v.parse().ok()?)),
        None => (mailbox_part, None),
    };
    let mailbox = percent_decode(mailbox)?;
    let (uid, section) = match rest.split_once("/;SECTION=") {
        Some((uid, section)) => (uid, Some(percent_decode(section)?)),
        None => (rest, None),
    };
    let uid: u32 = uid.parse().ok().filter(|u| *u > 0)?;
    let section = match section {
        Some(text) => {
            let framed = format!("[{text}]");
            let mut cursor = Cursor {
                input: framed.as_bytes(),
                at: 0,
                depth: 0,
                limits: ParseLimits::default(),
            };
            let parsed = cursor.section().ok()?;
            if !cursor.done() {
                return None;
            }
            Some(parsed)
        }
        None => None,
    };
    Some(ImapUrl {
        mailbox: if mailbox.eq_ignore_ascii_case("INBOX") {
            "INBOX".into()
        } else {
            mailbox
        },
        uidvalidity,
        uid,
        section,
    })
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The commands.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandKind {
    /// CAPABILITY.
    Capability,
    /// NOOP.
    Noop,
    /// LOGOUT.
    Logout,
    /// STARTTLS (refused: no TLS yet).
    StartTls,
    /// LOGIN user password.
    Login(String, String),
    /// AUTHENTICATE mechanism [initial response].
    Authenticate(String, Option<Vec<u8>>),
    /// ENABLE capabilities.
    Enable(Vec<String>),
    /// SELECT / EXAMINE (read-only), with CONDSTORE.
    Select {
        /// The folder.
        mailbox: String,
        /// EXAMINE.
        read_only: bool,
        /// (CONDSTORE) parameter.
        condstore: bool,
        /// (QRESYNC (...)) parameter.
        qresync: Option<Qresync>,
    },
    /// CREATE.
    Create(String),
    /// DELETE.
    Delete(String),
    /// RENAME.
    Rename(String, String),
    /// SUBSCRIBE.
    Subscribe(String),
    /// UNSUBSCRIBE.
    Unsubscribe(String),
    /// LIST / LSUB.
    List {
        /// Reference name.
        reference: String,
        /// Patterns.
        patterns: Vec<String>,
        /// Options.
        options: ListOptions,
    },
    /// NAMESPACE.
    Namespace,
    /// STATUS.
    Status(String, Vec<StatusItem>),
    /// APPEND (one message; MULTIAPPEND is not offered).
    Append(String, Vec<AppendMessage>),
    /// IDLE.
    Idle,
    /// CANCELUPDATE (RFC 5267): stop the searches started with these tags.
    CancelUpdate(Vec<String>),
    /// CHECK.
    Check,
    /// CLOSE.
    Close,
    /// UNSELECT.
    Unselect,
    /// EXPUNGE, or UID EXPUNGE set.
    Expunge(Option<SequenceSet>),
    /// SEARCH (UID when `uid`).
    Search {
        /// UID SEARCH.
        uid: bool,
        /// RETURN options.
        ret: SearchReturn,
        /// The criteria (ANDed).
        key: SearchKey,
    },
    /// SORT (UID when `uid`), with ESORT's RETURN options (RFC 5267).
    Sort {
        /// UID SORT.
        uid: bool,
        /// RETURN options (ESORT).
        ret: SearchReturn,
        /// The sort criteria.
        criteria: Vec<SortCriterion>,
        /// The search criteria (ANDed).
        key: SearchKey,
    },
    /// THREAD (UID when `uid`), RFC 5256.
    Thread {
        /// UID THREAD.
        uid: bool,
        /// REFERENCES (true) or ORDEREDSUBJECT (false).
        references: bool,
        /// The search criteria (ANDed).
        key: SearchKey,
    },
    /// FETCH.
    Fetch {
        /// UID FETCH.
        uid: bool,
        /// Which messages.
        set: SequenceSet,
        /// What of them.
        items: Vec<FetchItem>,
        /// Modifiers.
        modifiers: FetchModifiers,
    },
    /// STORE.
    Store {
        /// UID STORE.
        uid: bool,
        /// Which messages.
        set: SequenceSet,
        /// How.
        mode: StoreMode,
        /// .SILENT.
        silent: bool,
        /// The flags.
        flags: Vec<String>,
        /// UNCHANGEDSINCE.
        unchanged_since: Option<u64>,
    },
    /// COPY or MOVE.
    Copy {
        /// UID form.
        uid: bool,
        /// Which messages.
        set: SequenceSet,
        /// Target folder.
        mailbox: String,
        /// MOVE.
        remove: bool,
    },
    /// ID (parameters are ignored).
    Id,
    /// GETQUOTA root.
    GetQuota(String),
    /// GETQUOTAROOT mailbox.
    GetQuotaRoot(String),
    /// SETQUOTA (refused: quotas come from the directory).
    SetQuota,
}

/// Why a command did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The tag, when one could be read (the reply is then tagged BAD).
    pub tag: Option<String>,
    /// What was wrong.
    pub message: String,
    /// The command was well formed but asks for what is not supported where the RFC
    /// wants NO, not BAD (an unknown search charset: RFC 9051 6.4.4).
    pub refused: bool,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

type Result<T> = std::result::Result<T, String>;

struct Cursor<'a> {
    input: &'a [u8],
    at: usize,
    /// How deeply the search key being parsed is nested (parentheses, NOT, OR).
    depth: usize,
    /// The configured bounds.
    limits: ParseLimits,
}

/// Deepest nesting of search keys accepted. The parser, the evaluator and dropping the
/// tree all recurse once per level, so without a bound one line of 60,000 `(` overflows
/// the stack and aborts the process; real clients nest a handful of levels.
pub const SEARCH_DEPTH_MAX: usize = 64;

/// Longest LIST reference plus pattern, in bytes. Matching costs pattern × name per
/// folder; folder names are at most this long too, so one LIST is bounded work.
pub const LIST_PATTERN_BYTES_MAX: usize = 1024;

/// Patterns in one LIST-EXTENDED command, at most.
pub const LIST_PATTERNS_MAX: usize = 32;

/// Highest `imap.search_depth_max` the configuration accepts: the parser recurses once
/// per level, and this many levels fit the smallest stack a session runs on with room
/// to spare.
pub const SEARCH_DEPTH_CEILING: usize = 256;

/// The parser's bounds (the `[imap]` keys `search_depth_max`, `list_pattern_max_bytes`,
/// `list_patterns_max`); the defaults are the constants above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    /// Deepest nesting of search keys (at most [`SEARCH_DEPTH_CEILING`]).
    pub search_depth_max: usize,
    /// Longest LIST reference plus pattern, bytes.
    pub list_pattern_max_bytes: usize,
    /// Patterns in one LIST command.
    pub list_patterns_max: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        ParseLimits {
            search_depth_max: SEARCH_DEPTH_MAX,
            list_pattern_max_bytes: LIST_PATTERN_BYTES_MAX,
            list_patterns_max: LIST_PATTERNS_MAX,
        }
    }
}

fn is_atom_char(b: u8) -> bool {
    b > 0x20 && b < 0x7f && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.at).copied()
    }

    fn done(&self) -> bool {
        self.at >= self.input.len()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, b: u8) -> Result<()> {
        if self.eat(b) {
            Ok(())
        } else {
            Err(format!("expected {:?} at offset {}", b as char, self.at))
        }
    }

    fn sp(&mut self) -> Result<()> {
        self.expect(b' ')
    }

    fn eat_keyword(&mut self, word: &str) -> bool {
        let end = self.at + word.len();
        if end <= self.input.len()
            && self.input[self.at..end].eq_ignore_ascii_case(word.as_bytes())
            && self
                .input
                .get(end)
                .is_none_or(|b| !is_atom_char(*b) || matches!(*b, b'[' | b'.'))
        {
            self.at = end;
            true
        } else {
            false
        }
    }

    /// Atom characters, plus `extra` (e.g. `]` inside flags is not allowed; `*` and `%`
    /// in list patterns are).
    fn take_while(&mut self, ok: impl Fn(u8) -> bool) -> &'a [u8] {
        let start = self.at;
        while self.peek().is_some_and(&ok) {
            self.at += 1;
        }
        &self.input[start..self.at]
    }

    fn atom(&mut self) -> Result<String> {
        let atom = self.take_while(is_atom_char);
        if atom.is_empty() {
            return Err(format!("expected an atom at offset {}", self.at));
        }
        Ok(String::from_utf8_lossy(atom).into_owned())
    }

    fn number(&mut self) -> Result<u64> {
        let digits = self.take_while(|b| b.is_ascii_digit());
        std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| format!("expected a number at offset {}", self.at))
    }

    fn nz_number(&mut self) -> Result<u32> {
        match self.number()? {
            n @ 1..=0xFFFF_FFFF => Ok(n as u32),
            _ => Err("numbers must be between 1 and 4294967295".into()),
        }
    }

    fn quoted(&mut self) -> Result<Vec<u8>> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None | Some(b'\r') | Some(b'\n') => return Err("unterminated quoted string".into()),
                // RFC 9051: a quoted string holds TEXT-CHARs, never NUL.
                Some(0) => return Err("NULs are not allowed in strings".into()),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.at += 1;
                    match self.peek() {
                        Some(c @ (b'"' | b'\\')) => {
                            out.push(c);
                            self.at += 1;
                        }
                        _ => return Err("bad escape in a quoted string".into()),
                    }
                }
                Some(c) => {
                    out.push(c);
                    self.at += 1;
                }
            }
        }
    }

    /// `{n}` or `{n+}` / `~{n}` CRLF then n bytes (the framing layer kept them inline).
    fn literal(&mut self) -> Result<Vec<u8>> {
        self.eat(b'~');
        self.expect(b'{')?;
        let n = self.number()? as usize;
        self.eat(b'+');
        self.expect(b'}')?;
        self.expect(b'\r')?;
        self.expect(b'\n')?;
        let end = self.at + n;
        if end > self.input.len() {
            return Err("literal longer than the command".into());
        }
        let data = self.input[self.at..end].to_vec();
        self.at = end;
        Ok(data)
    }

    fn string(&mut self) -> Result<Vec<u8>> {
        match self.peek() {
            Some(b'"') => self.quoted(),
            Some(b'{') | Some(b'~') => self.literal(),
            _ => Err(format!("expected a string at offset {}", self.at)),
        }
    }

    /// atom, or ASTRING-CHAR run (atoms may contain `]`), or string.
    fn astring(&mut self) -> Result<String> {
        if self.at_string() {
            return Ok(String::from_utf8_lossy(&self.string()?).into_owned());
        }
        // Lenient: 8-bit bytes in an atom are taken as UTF-8 (clients that enabled
        // UTF8=ACCEPT or speak IMAP4rev2 send them unquoted).
        let atom = self.take_while(|b| is_atom_char(b) || b == b']' || b >= 0x80);
        if atom.is_empty() {
            return Err(format!("expected a string at offset {}", self.at));
        }
        Ok(String::from_utf8_lossy(atom).into_owned())
    }

    fn astring_bytes(&mut self) -> Result<Vec<u8>> {
        if self.at_string() {
            self.string()
        } else {
            Ok(self.astring()?.into_bytes())
        }
    }

    /// A quoted string or a literal starts here. `~` is an ATOM-CHAR: it starts a
    /// literal8 only when `{` follows (`LIST "" ~foo` names the folder `~foo`).
    fn at_string(&self) -> bool {
        match self.peek() {
            Some(b'"') | Some(b'{') => true,
            Some(b'~') => self.input.get(self.at + 1) == Some(&b'{'),
            _ => false,
        }
    }

    /// A mailbox name; "INBOX" in any case means INBOX.
    fn mailbox(&mut self) -> Result<String> {
        let name = self.astring()?;
        Ok(if name.eq_ignore_ascii_case("INBOX") {
            "INBOX".into()
        } else {
            name
        })
    }

    /// list-mailbox: atom chars plus `%`, `*`, `]`, or a string.
    fn list_mailbox(&mut self) -> Result<String> {
        if self.at_string() {
            return Ok(String::from_utf8_lossy(&self.string()?).into_owned());
        }
        let atom = self.take_while(|b| is_atom_char(b) || matches!(b, b'%' | b'*' | b']'));
        if atom.is_empty() {
            return Err("expected a mailbox pattern".into());
        }
        Ok(String::from_utf8_lossy(atom).into_owned())
    }

    fn seq_number(&mut self) -> Result<u64> {
        if self.eat(b'*') {
            Ok(STAR)
        } else {
            self.nz_number().map(u64::from)
        }
    }

    fn sequence_set(&mut self) -> Result<SequenceSet> {
        if self.eat(b'$') {
            return Ok(vec![Range(SAVED, SAVED)]);
        }
        let mut set = Vec::new();
        loop {
            let a = self.seq_number()?;
            let b = if self.eat(b':') {
                self.seq_number()?
            } else {
                a
            };
            set.push(Range(a.min(b), a.max(b)));
            if !self.eat(b',') {
                return Ok(set);
            }
        }
    }

    fn flag(&mut self) -> Result<String> {
        if self.eat(b'\\') {
            let name = self.atom()?;
            let canonical = ["Seen", "Answered", "Flagged", "Deleted", "Draft", "Recent"]
                .iter()
                .find(|f| f.eq_ignore_ascii_case(&name))
                .map_or(name, |f| f.to_string());
            Ok(format!("\\{canonical}"))
        } else {
            self.atom()
        }
    }

    fn flag_list(&mut self) -> Result<Vec<String>> {
        if !self.eat(b'(') {
            // STORE accepts a bare flag list without parentheses.
            let mut flags = vec![self.flag()?];
            while self.eat(b' ') {
                flags.push(self.flag()?);
            }
            return Ok(flags);
        }
        let mut flags = Vec::new();
        if self.eat(b')') {
            return Ok(flags);
        }
        loop {
            flags.push(self.flag()?);
            if self.eat(b')') {
                return Ok(flags);
            }
            self.sp()?;
        }
    }

    /// `d-MMM-yyyy` (quoted or not), as days since the epoch.
    fn date(&mut self) -> Result<i64> {
        let quoted = self.eat(b'"');
        let text = self.take_while(|b| b.is_ascii_alphanumeric() || b == b'-');
        if quoted {
            self.expect(b'"')?;
        }
        parse_date(&String::from_utf8_lossy(text)).ok_or_else(|| "bad date (use 1-Jan-2026)".into())
    }

    fn part_path(&mut self) -> Result<Vec<u32>> {
        let mut part = Vec::new();
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            part.push(self.nz_number()?);
            if !self.eat(b'.') {
                break;
            }
        }
        Ok(part)
    }

    fn header_list(&mut self) -> Result<Vec<String>> {
        self.expect(b'(')?;
        let mut names = Vec::new();
        loop {
            names.push(self.astring()?);
            if self.eat(b')') {
                return Ok(names);
            }
            self.sp()?;
        }
    }

    fn section(&mut self) -> Result<Section> {
        self.expect(b'[')?;
        let part = self.part_path()?;
        let text = if self.eat_keyword("HEADER.FIELDS.NOT") {
            self.sp()?;
            SectionText::HeaderFieldsNot(self.header_list()?)
        } else if self.eat_keyword("HEADER.FIELDS") {
            self.sp()?;
            SectionText::HeaderFields(self.header_list()?)
        } else if self.eat_keyword("HEADER") {
            SectionText::Header
        } else if self.eat_keyword("TEXT") {
            SectionText::Text
        } else if self.eat_keyword("MIME") {
            if part.is_empty() {
                return Err("MIME needs a part number".into());
            }
            SectionText::Mime
        } else {
            SectionText::Full
        };
        self.expect(b']')?;
        Ok(Section { part, text })
    }

    fn partial(&mut self) -> Result<Option<(u32, u32)>> {
        if !self.eat(b'<') {
            return Ok(None);
        }
        let origin = self.number()? as u32;
        self.expect(b'.')?;
        let count = self.number()? as u32;
        self.expect(b'>')?;
        if count == 0 {
            return Err("a partial count must not be 0".into());
        }
        Ok(Some((origin, count)))
    }

    fn binary_part(&mut self) -> Result<Vec<u32>> {
        self.expect(b'[')?;
        let part = self.part_path()?;
        self.expect(b']')?;
        Ok(part)
    }

    fn fetch_item(&mut self) -> Result<FetchItem> {
        let item = if self.eat_keyword("BODY.PEEK") {
            let section = self.section()?;
            FetchItem::BodySection {
                section,
                partial: self.partial()?,
                peek: true,
            }
        } else if self.eat_keyword("BODYSTRUCTURE") {
            FetchItem::BodyStructure
        } else if self.eat_keyword("BODY") {
            if self.peek() == Some(b'[') {
                let section = self.section()?;
                FetchItem::BodySection {
                    section,
                    partial: self.partial()?,
                    peek: false,
                }
            } else {
                FetchItem::Body
            }
        } else if self.eat_keyword("BINARY.PEEK") {
            let part = self.binary_part()?;
            FetchItem::Binary {
                part,
                partial: self.partial()?,
                peek: true,
            }
        } else if self.eat_keyword("BINARY.SIZE") {
            FetchItem::BinarySize(self.binary_part()?)
        } else if self.eat_keyword("BINARY") {
            let part = self.binary_part()?;
            FetchItem::Binary {
                part,
                partial: self.partial()?,
                peek: false,
            }
        } else if self.eat_keyword("RFC822.SIZE") {
            FetchItem::Rfc822Size
        } else if self.eat_keyword("RFC822.HEADER") {
            FetchItem::Rfc822Header
        } else if self.eat_keyword("RFC822.TEXT") {
            FetchItem::Rfc822Text
        } else if self.eat_keyword("RFC822") {
            FetchItem::Rfc822
        } else if self.eat_keyword("ENVELOPE") {
            FetchItem::Envelope
        } else if self.eat_keyword("FLAGS") {
            FetchItem::Flags
        } else if self.eat_keyword("INTERNALDATE") {
            FetchItem::InternalDate
        } else if self.eat_keyword("UID") {
            FetchItem::Uid
        } else if self.eat_keyword("MODSEQ") {
            FetchItem::ModSeq
        } else {
            return Err(format!("unknown FETCH item at offset {}", self.at));
        };
        Ok(item)
    }

    fn fetch_items(&mut self) -> Result<Vec<FetchItem>> {
        if self.eat_keyword("ALL") {
            return Ok(vec![
                FetchItem::Flags,
                FetchItem::InternalDate,
                FetchItem::Rfc822Size,
                FetchItem::Envelope,
            ]);
        }
        if self.eat_keyword("FAST") {
            return Ok(vec![
                FetchItem::Flags,
                FetchItem::InternalDate,
                FetchItem::Rfc822Size,
            ]);
        }
        if self.eat_keyword("FULL") {
            return Ok(vec![
                FetchItem::Flags,
                FetchItem::InternalDate,
                FetchItem::Rfc822Size,
                FetchItem::Envelope,
                FetchItem::Body,
            ]);
        }
        if !self.eat(b'(') {
            return Ok(vec![self.fetch_item()?]);
        }
        let mut items = Vec::new();
        loop {
            items.push(self.fetch_item()?);
            if self.eat(b')') {
                return Ok(items);
            }
            self.sp()?;
        }
    }

    fn search_key(&mut self) -> Result<SearchKey> {
        if self.depth >= self.limits.search_depth_max.min(SEARCH_DEPTH_CEILING) {
            return Err(format!(
                "search keys nested deeper than {} levels",
                self.limits.search_depth_max.min(SEARCH_DEPTH_CEILING)
            ));
        }
        self.depth += 1;
        let key = self.search_key_inner();
        self.depth -= 1;
        key
    }

    fn search_key_inner(&mut self) -> Result<SearchKey> {
        if self.eat(b'(') {
            let mut keys = Vec::new();
            loop {
                keys.push(self.search_key()?);
                if self.eat(b')') {
                    return Ok(SearchKey::And(keys));
                }
                self.sp()?;
            }
        }
        // A sequence set, or `$` (the saved result, RFC 5182) followed by a space or the
        // end (a keyword cannot start with `$`; keywords are not search keys).
        if self.peek().is_some_and(|b| b.is_ascii_digit() || b == b'*')
            || (self.peek() == Some(b'$')
                && matches!(self.input.get(self.at + 1), None | Some(b' ') | Some(b')')))
        {
            return Ok(SearchKey::Sequence(self.sequence_set()?));
        }
        let word = self.atom()?.to_ascii_uppercase();
        let astring = |c: &mut Self| -> Result<String> {
            c.sp()?;
            Ok(String::from_utf8_lossy(&c.astring_bytes()?).into_owned())
        };
        let date = |c: &mut Self| -> Result<i64> {
            c.sp()?;
            c.date()
        };
        let flag = |f: &str| Ok(SearchKey::Flag(f.into()));
        let not_flag = |f: &str| Ok(SearchKey::NotFlag(f.into()));
        match word.as_str() {
            "ALL" => Ok(SearchKey::All),
            "ANSWERED" => flag("\\Answered"),
            "DELETED" => flag("\\Deleted"),
            "DRAFT" => flag("\\Draft"),
            "FLAGGED" => flag("\\Flagged"),
            "SEEN" => flag("\\Seen"),
            "UNANSWERED" => not_flag("\\Answered"),
            "UNDELETED" => not_flag("\\Deleted"),
            "UNDRAFT" => not_flag("\\Draft"),
            "UNFLAGGED" => not_flag("\\Flagged"),
            "UNSEEN" => not_flag("\\Seen"),
            "NEW" => Ok(SearchKey::New),
            "OLD" => Ok(SearchKey::Old),
            "RECENT" => Ok(SearchKey::Recent),
            "KEYWORD" => {
                self.sp()?;
                Ok(SearchKey::Flag(self.flag()?))
            }
            "UNKEYWORD" => {
                self.sp()?;
                Ok(SearchKey::NotFlag(self.flag()?))
            }
            "BCC" | "CC" | "FROM" | "SUBJECT" | "TO" => {
                let text = astring(self)?;
                Ok(SearchKey::Header(word.to_ascii_lowercase(), text))
            }
            "HEADER" => {
                let name = astring(self)?;
                let text = astring(self)?;
                Ok(SearchKey::Header(name.to_ascii_lowercase(), text))
            }
            "BODY" => Ok(SearchKey::Body(astring(self)?)),
            "TEXT" => Ok(SearchKey::Text(astring(self)?)),
            "BEFORE" => Ok(SearchKey::Before(date(self)?)),
            "ON" => Ok(SearchKey::On(date(self)?)),
            "SINCE" => Ok(SearchKey::Since(date(self)?)),
            "SENTBEFORE" => Ok(SearchKey::SentBefore(date(self)?)),
            "SENTON" => Ok(SearchKey::SentOn(date(self)?)),
            "SENTSINCE" => Ok(SearchKey::SentSince(date(self)?)),
            "LARGER" => {
                self.sp()?;
                Ok(SearchKey::Larger(self.number()?))
            }
            "SMALLER" => {
                self.sp()?;
                Ok(SearchKey::Smaller(self.number()?))
            }
            "UID" => {
                self.sp()?;
                Ok(SearchKey::Uid(self.sequence_set()?))
            }
            "MODSEQ" => {
                self.sp()?;
                // An optional entry name and type before the number (RFC 7162 3.1.5).
                if self.peek() == Some(b'"') {
                    self.quoted()?;
                    self.sp()?;
                    self.atom()?;
                    self.sp()?;
                }
                Ok(SearchKey::ModSeq(self.number()?))
            }
            "NOT" => {
                self.sp()?;
                Ok(SearchKey::Not(Box::new(self.search_key()?)))
            }
            "OR" => {
                self.sp()?;
                let a = self.search_key()?;
                self.sp()?;
                let b = self.search_key()?;
                Ok(SearchKey::Or(Box::new(a), Box::new(b)))
            }
            other => Err(format!("unknown SEARCH key {other}")),
        }
    }

    fn status_items(&mut self) -> Result<Vec<StatusItem>> {
        self.expect(b'(')?;
        let mut items = Vec::new();
        loop {
            let word = self.atom()?.to_ascii_uppercase();
            items.push(match word.as_str() {
                "MESSAGES" => StatusItem::Messages,
                "UIDNEXT" => StatusItem::UidNext,
                "UIDVALIDITY" => StatusItem::UidValidity,
                "UNSEEN" => StatusItem::Unseen,
                "DELETED" => StatusItem::Deleted,
                "SIZE" => StatusItem::Size,
                "RECENT" => StatusItem::Recent,
                "HIGHESTMODSEQ" => StatusItem::HighestModSeq,
                "APPENDLIMIT" => StatusItem::AppendLimit,
                other => return Err(format!("unknown STATUS item {other}")),
            });
            if self.eat(b')') {
                return Ok(items);
            }
            self.sp()?;
        }
    }

    /// A parenthesised list of atoms (with nested lists skipped), uppercased.
    /// `"(" uidvalidity SP mod-sequence-value [SP known-uids] [SP seq-match-data] ")"`.
    /// The sequence-match data (a hint for servers that cannot answer from UIDs) is read
    /// and not needed: VANISHED is answered from the expunge records.
    fn qresync(&mut self) -> Result<Qresync> {
        self.expect(b'(')?;
        let uidvalidity = self.nz_number()?;
        self.sp()?;
        let modseq = self.number()?;
        let mut known_uids = None;
        if self.eat(b' ') {
            if self.peek() != Some(b'(') {
                known_uids = Some(self.sequence_set()?);
                if !self.eat(b' ') {
                    self.expect(b')')?;
                    return Ok(Qresync {
                        uidvalidity,
                        modseq,
                        known_uids,
                    });
                }
            }
            self.expect(b'(')?;
            self.sequence_set()?;
            self.sp()?;
            self.sequence_set()?;
            self.expect(b')')?;
        }
        self.expect(b')')?;
        Ok(Qresync {
            uidvalidity,
            modseq,
            known_uids,
        })
    }

    fn option_words(&mut self) -> Result<Vec<String>> {
        self.expect(b'(')?;
        let mut words = Vec::new();
        if self.eat(b')') {
            return Ok(words);
        }
        loop {
            words.push(self.atom()?.to_ascii_uppercase());
            if self.eat(b')') {
                return Ok(words);
            }
            self.sp()?;
        }
    }

    fn list(&mut self, lsub: bool) -> Result<CommandKind> {
        let mut options = ListOptions {
            lsub,
            ..ListOptions::default()
        };
        self.sp()?;
        if !lsub && self.peek() == Some(b'(') {
            for word in self.option_words()? {
                match word.as_str() {
                    "SUBSCRIBED" => options.subscribed = true,
                    "SPECIAL-USE" => options.special_use_only = true,
                    "RECURSIVEMATCH" => options.recursive_match = true,
                    "REMOTE" => {}
                    other => return Err(format!("unknown LIST selection option {other}")),
                }
            }
            self.sp()?;
        }
        let reference = self.astring()?;
        self.sp()?;
        let patterns = if self.peek() == Some(b'(') && !lsub {
            self.at += 1;
            let mut patterns = Vec::new();
            loop {
                if patterns.len() >= self.limits.list_patterns_max {
                    return Err(format!(
                        "more than {} LIST patterns",
                        self.limits.list_patterns_max
                    ));
                }
                patterns.push(self.list_mailbox()?);
                if self.eat(b')') {
                    break patterns;
                }
                self.sp()?;
            }
        } else {
            vec![self.list_mailbox()?]
        };
        if reference.len() + patterns.iter().map(String::len).max().unwrap_or(0)
            > self.limits.list_pattern_max_bytes
        {
            return Err(format!(
                "LIST reference and pattern longer than {} bytes",
                self.limits.list_pattern_max_bytes
            ));
        }
        if !lsub && self.eat(b' ') {
            if !self.eat_keyword("RETURN") {
                return Err("expected RETURN".into());
            }
            self.sp()?;
            self.expect(b'(')?;
            if !self.eat(b')') {
                loop {
                    let word = self.atom()?.to_ascii_uppercase();
                    match word.as_str() {
                        "CHILDREN" => options.children = true,
                        "SUBSCRIBED" => options.return_subscribed = true,
                        "SPECIAL-USE" => options.return_special_use = true,
                        "STATUS" => {
                            self.sp()?;
                            options.status = Some(self.status_items()?);
                        }
                        other => return Err(format!("unknown LIST return option {other}")),
                    }
                    if self.eat(b')') {
                        break;
                    }
                    self.sp()?;
                }
            }
        }
        Ok(CommandKind::List {
            reference,
            patterns,
            options,
        })
    }

    /// SORT [RETURN (...)] (criteria) charset search-keys (RFC 5256, 5267).
    fn sort(&mut self, uid: bool) -> Result<CommandKind> {
        self.sp()?;
        let mut ret = SearchReturn::default();
        if self.eat_keyword("RETURN") {
            ret = self.return_options()?;
            if ret.save {
                return Err("SORT RETURN (SAVE) is not supported".into());
            }
            self.sp()?;
        }
        let words = self.option_words()?;
        if words.is_empty() {
            return Err("SORT needs at least one criterion".into());
        }
        let mut criteria = Vec::new();
        let mut reverse = false;
        for word in words {
            let key = match word.as_str() {
                "REVERSE" if !reverse => {
                    reverse = true;
                    continue;
                }
                "ARRIVAL" => SortKey::Arrival,
                "CC" => SortKey::Cc,
                "DATE" => SortKey::Date,
                "FROM" => SortKey::From,
                "SIZE" => SortKey::Size,
                "SUBJECT" => SortKey::Subject,
                "TO" => SortKey::To,
                "DISPLAYFROM" => SortKey::DisplayFrom,
                "DISPLAYTO" => SortKey::DisplayTo,
                other => return Err(format!("unknown SORT criterion {other}")),
            };
            criteria.push(SortCriterion { reverse, key });
            reverse = false;
        }
        if reverse {
            return Err("REVERSE must precede a sort key".into());
        }
        self.sp()?;
        self.charset()?;
        self.sp()?;
        let key = self.search_keys()?;
        Ok(CommandKind::Sort {
            uid,
            ret,
            criteria,
            key,
        })
    }

    /// THREAD algorithm charset search-keys (RFC 5256).
    fn thread(&mut self, uid: bool) -> Result<CommandKind> {
        self.sp()?;
        let algorithm = self.atom()?.to_ascii_uppercase();
        let references = match algorithm.as_str() {
            "REFERENCES" => true,
            "ORDEREDSUBJECT" => false,
            other => return Err(format!("THREAD={other} is not supported")),
        };
        self.sp()?;
        self.charset()?;
        self.sp()?;
        let key = self.search_keys()?;
        Ok(CommandKind::Thread {
            uid,
            references,
            key,
        })
    }

    /// `(MIN MAX ALL COUNT SAVE UPDATE PARTIAL low:high)` after RETURN (RFC 4731, 5182,
    /// 5267).
    fn return_options(&mut self) -> Result<SearchReturn> {
        let mut ret = SearchReturn {
            extended: true,
            ..SearchReturn::default()
        };
        self.sp()?;
        let words = self.option_words()?;
        let mut words = words.into_iter();
        while let Some(word) = words.next() {
            match word.as_str() {
                "MIN" => ret.min = true,
                "MAX" => ret.max = true,
                "ALL" if ret.partial.is_some() => {
                    return Err("RETURN takes one PARTIAL or one ALL (RFC 5267 4.4)".into());
                }
                "ALL" => ret.all = true,
                "COUNT" => ret.count = true,
                "SAVE" => ret.save = true,
                "UPDATE" => ret.update = true,
                "PARTIAL" if ret.partial.is_some() || ret.all => {
                    return Err("RETURN takes one PARTIAL or one ALL (RFC 5267 4.4)".into());
                }
                "PARTIAL" => {
                    // partial-range = nz-number ":" nz-number (no `*`); 4:2 is 2:4.
                    let range = words.next().unwrap_or_default();
                    let parsed = range.split_once(':').and_then(|(a, b)| {
                        let a: u32 = a.parse().ok().filter(|n| *n > 0)?;
                        let b: u32 = b.parse().ok().filter(|n| *n > 0)?;
                        Some((a.min(b), a.max(b)))
                    });
                    ret.partial = Some(parsed.ok_or_else(|| {
                        format!("PARTIAL needs a range like 1:100, not {range:?}")
                    })?);
                }
                other => return Err(format!("unknown RETURN option {other}")),
            }
        }
        let results = ret.min || ret.max || ret.count || ret.all || ret.partial.is_some();
        if ret.save && !results && !ret.update {
            // SAVE alone: the result is kept and no ESEARCH is sent (RFC 5182 2.1).
            ret.extended = false;
        } else if !results && !ret.update {
            // RETURN () is RETURN (ALL); UPDATE alone returns nothing yet (RFC 5267 4.2).
            ret.all = true;
        }
        Ok(ret)
    }

    /// One or more search keys, ANDed.
    fn search_keys(&mut self) -> Result<SearchKey> {
        let mut keys = vec![self.search_key()?];
        while self.eat(b' ') {
            keys.push(self.search_key()?);
        }
        Ok(if keys.len() == 1 {
            keys.pop().expect("one key")
        } else {
            SearchKey::And(keys)
        })
    }

    fn search(&mut self, uid: bool) -> Result<CommandKind> {
        let mut ret = SearchReturn::default();
        self.sp()?;
        if self.eat_keyword("RETURN") {
            ret = self.return_options()?;
            self.sp()?;
        }
        if self.eat_keyword("CHARSET") {
            self.sp()?;
            self.charset()?;
            self.sp()?;
        }
        let key = self.search_keys()?;
        Ok(CommandKind::Search { uid, ret, key })
    }

    /// A search charset: UTF-8 or US-ASCII (`[BADCHARSET]` otherwise).
    fn charset(&mut self) -> Result<()> {
        let charset = self.astring()?;
        if charset.eq_ignore_ascii_case("UTF-8") || charset.eq_ignore_ascii_case("US-ASCII") {
            Ok(())
        } else {
            Err(format!(
                "[BADCHARSET (UTF-8 US-ASCII)] charset {charset} is not supported"
            ))
        }
    }

    fn fetch(&mut self, uid: bool) -> Result<CommandKind> {
        self.sp()?;
        let set = self.sequence_set()?;
        self.sp()?;
        let items = self.fetch_items()?;
        let mut modifiers = FetchModifiers::default();
        if self.eat(b' ') {
            self.expect(b'(')?;
            loop {
                let word = self.atom()?.to_ascii_uppercase();
                match word.as_str() {
                    "CHANGEDSINCE" => {
                        self.sp()?;
                        modifiers.changed_since = Some(self.number()?);
                    }
                    "VANISHED" => modifiers.vanished = true,
                    other => return Err(format!("unknown FETCH modifier {other}")),
                }
                if self.eat(b')') {
                    break;
                }
                self.sp()?;
            }
        }
        // RFC 7162 3.2.6: VANISHED only in UID FETCH, and only with CHANGEDSINCE.
        if modifiers.vanished && !uid {
            return Err("VANISHED is a UID FETCH modifier".into());
        }
        if modifiers.vanished && modifiers.changed_since.is_none() {
            return Err("VANISHED needs CHANGEDSINCE".into());
        }
        Ok(CommandKind::Fetch {
            uid,
            set,
            items,
            modifiers,
        })
    }

    fn store(&mut self, uid: bool) -> Result<CommandKind> {
        self.sp()?;
        let set = self.sequence_set()?;
        self.sp()?;
        let mut unchanged_since = None;
        if self.peek() == Some(b'(') {
            self.at += 1;
            if !self.eat_keyword("UNCHANGEDSINCE") {
                return Err("unknown STORE modifier".into());
            }
            self.sp()?;
            unchanged_since = Some(self.number()?);
            self.expect(b')')?;
            self.sp()?;
        }
        let mode = if self.eat(b'+') {
            StoreMode::Add
        } else if self.eat(b'-') {
            StoreMode::Remove
        } else {
            StoreMode::Replace
        };
        if !self.eat_keyword("FLAGS") {
            return Err("expected FLAGS, +FLAGS or -FLAGS".into());
        }
        let silent = self.eat_keyword(".SILENT");
        self.sp()?;
        let flags = self.flag_list()?;
        Ok(CommandKind::Store {
            uid,
            set,
            mode,
            silent,
            flags,
            unchanged_since,
        })
    }

    fn copy(&mut self, uid: bool, remove: bool) -> Result<CommandKind> {
        self.sp()?;
        let set = self.sequence_set()?;
        self.sp()?;
        let mailbox = self.mailbox()?;
        Ok(CommandKind::Copy {
            uid,
            set,
            mailbox,
            remove,
        })
    }

    /// APPEND, with MULTIAPPEND (RFC 3502): one or more `[flags] [date-time] literal`.
    fn append(&mut self) -> Result<CommandKind> {
        self.sp()?;
        let mailbox = self.mailbox()?;
        let mut messages = Vec::new();
        loop {
            self.sp()?;
            let mut flags = Vec::new();
            if self.peek() == Some(b'(') {
                flags = self.flag_list()?;
                self.sp()?;
            }
            let mut date_ms = None;
            if self.peek() == Some(b'"') {
                let text = String::from_utf8_lossy(&self.quoted()?).into_owned();
                date_ms = Some(parse_date_time(&text).ok_or("bad APPEND date-time")?);
                self.sp()?;
            }
            if self.eat_keyword("CATENATE") {
                self.sp()?;
                self.expect(b'(')?;
                let mut parts = Vec::new();
                loop {
                    if self.eat_keyword("TEXT") {
                        self.sp()?;
                        parts.push(CatenatePart::Text(self.literal()?));
                    } else if self.eat_keyword("URL") {
                        self.sp()?;
                        parts.push(CatenatePart::Url(
                            String::from_utf8_lossy(&self.astring_bytes()?).into_owned(),
                        ));
                    } else {
                        return Err("CATENATE parts are TEXT literal or URL url".into());
                    }
                    if self.eat(b')') {
                        break;
                    }
                    self.sp()?;
                }
                messages.push(AppendMessage {
                    flags,
                    date_ms,
                    message: Vec::new(),
                    catenate: Some(parts),
                });
            } else {
                let message = self.literal()?;
                messages.push(AppendMessage {
                    flags,
                    date_ms,
                    message,
                    catenate: None,
                });
            }
            if self.done() {
                return Ok(CommandKind::Append(mailbox, messages));
            }
        }
    }

    fn command(&mut self) -> Result<CommandKind> {
        let word = self.atom()?.to_ascii_uppercase();
        let simple = |k: CommandKind| Ok(k);
        let kind = match word.as_str() {
            "CAPABILITY" => simple(CommandKind::Capability),
            "NOOP" => simple(CommandKind::Noop),
            "LOGOUT" => simple(CommandKind::Logout),
            "STARTTLS" => simple(CommandKind::StartTls),
            "NAMESPACE" => simple(CommandKind::Namespace),
            "IDLE" => simple(CommandKind::Idle),
            "CHECK" => simple(CommandKind::Check),
            "CLOSE" => simple(CommandKind::Close),
            "UNSELECT" => simple(CommandKind::Unselect),
            "EXPUNGE" => simple(CommandKind::Expunge(None)),
            "LOGIN" => {
                self.sp()?;
                let user = self.astring()?;
                self.sp()?;
                let password = String::from_utf8_lossy(&self.astring_bytes()?).into_owned();
                Ok(CommandKind::Login(user, password))
            }
            "AUTHENTICATE" => {
                self.sp()?;
                let mechanism = self.atom()?.to_ascii_uppercase();
                let initial = if self.eat(b' ') {
                    let text = self.take_while(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')
                    });
                    Some(text.to_vec())
                } else {
                    None
                };
                Ok(CommandKind::Authenticate(mechanism, initial))
            }
            "CANCELUPDATE" => {
                // RFC 5267 4.2: CANCELUPDATE SP tag-string *(SP tag-string).
                let mut tags = Vec::new();
                while self.eat(b' ') {
                    tags.push(String::from_utf8_lossy(&self.string()?).into_owned());
                }
                if tags.is_empty() {
                    return Err("CANCELUPDATE needs the tag of a search".into());
                }
                Ok(CommandKind::CancelUpdate(tags))
            }
            "ENABLE" => {
                let mut caps = Vec::new();
                while self.eat(b' ') {
                    caps.push(self.atom()?.to_ascii_uppercase());
                }
                if caps.is_empty() {
                    return Err("ENABLE needs a capability".into());
                }
                Ok(CommandKind::Enable(caps))
            }
            "SELECT" | "EXAMINE" => {
                self.sp()?;
                let mailbox = self.mailbox()?;
                let mut condstore = false;
                let mut qresync = None;
                if self.eat(b' ') {
                    self.expect(b'(')?;
                    loop {
                        let word = self.atom()?.to_ascii_uppercase();
                        match word.as_str() {
                            "CONDSTORE" => condstore = true,
                            "QRESYNC" => {
                                self.sp()?;
                                qresync = Some(self.qresync()?);
                            }
                            other => return Err(format!("unknown SELECT parameter {other}")),
                        }
                        if self.eat(b')') {
                            break;
                        }
                        self.sp()?;
                    }
                }
                Ok(CommandKind::Select {
                    mailbox,
                    read_only: word == "EXAMINE",
                    condstore,
                    qresync,
                })
            }
            "CREATE" => {
                self.sp()?;
                let name = self.mailbox()?;
                // CREATE-SPECIAL-USE parameters are accepted and ignored.
                if self.eat(b' ') {
                    self.at = self.input.len();
                }
                Ok(CommandKind::Create(name))
            }
            "DELETE" => {
                self.sp()?;
                Ok(CommandKind::Delete(self.mailbox()?))
            }
            "RENAME" => {
                self.sp()?;
                let from = self.mailbox()?;
                self.sp()?;
                Ok(CommandKind::Rename(from, self.mailbox()?))
            }
            "SUBSCRIBE" => {
                self.sp()?;
                Ok(CommandKind::Subscribe(self.mailbox()?))
            }
            "UNSUBSCRIBE" => {
                self.sp()?;
                Ok(CommandKind::Unsubscribe(self.mailbox()?))
            }
            "LIST" => self.list(false),
            "LSUB" => self.list(true),
            "STATUS" => {
                self.sp()?;
                let mailbox = self.mailbox()?;
                self.sp()?;
                Ok(CommandKind::Status(mailbox, self.status_items()?))
            }
            "APPEND" => self.append(),
            "SEARCH" => self.search(false),
            "SORT" => self.sort(false),
            "THREAD" => self.thread(false),
            "FETCH" => self.fetch(false),
            "STORE" => self.store(false),
            "COPY" => self.copy(false, false),
            "MOVE" => self.copy(false, true),
            "UID" => {
                self.sp()?;
                let sub = self.atom()?.to_ascii_uppercase();
                match sub.as_str() {
                    "SEARCH" => self.search(true),
                    "SORT" => self.sort(true),
                    "THREAD" => self.thread(true),
                    "FETCH" => self.fetch(true),
                    "STORE" => self.store(true),
                    "COPY" => self.copy(true, false),
                    "MOVE" => self.copy(true, true),
                    "EXPUNGE" => {
                        self.sp()?;
                        Ok(CommandKind::Expunge(Some(self.sequence_set()?)))
                    }
                    other => Err(format!("unknown UID command {other}")),
                }
            }
            "ID" => {
                // ID NIL or ID (field value ...): parameters are only logged.
                self.at = self.input.len();
                Ok(CommandKind::Id)
            }
            "GETQUOTA" => {
                self.sp()?;
                Ok(CommandKind::GetQuota(self.astring()?))
            }
            "GETQUOTAROOT" => {
                self.sp()?;
                Ok(CommandKind::GetQuotaRoot(self.mailbox()?))
            }
            "SETQUOTA" => {
                self.at = self.input.len();
                Ok(CommandKind::SetQuota)
            }
            other => Err(format!("unknown command {other}")),
        }?;
        if !self.done() {
            return Err(format!(
                "unexpected characters at offset {} after the command",
                self.at
            ));
        }
        Ok(kind)
    }
}

/// Parses one complete command (without its final CRLF; literals inline).
pub fn parse_command(input: &[u8]) -> std::result::Result<Command, ParseError> {
    parse_command_with(input, &ParseLimits::default())
}

/// [`parse_command`] with the configured bounds.
pub fn parse_command_with(
    input: &[u8],
    limits: &ParseLimits,
) -> std::result::Result<Command, ParseError> {
    let mut cursor = Cursor {
        input,
        at: 0,
        depth: 0,
        limits: *limits,
    };
    let tag = cursor.take_while(|b| is_atom_char(b) && b != b'+');
    if tag.is_empty() {
        return Err(ParseError {
            tag: None,
            message: "a command starts with a tag".into(),
            refused: false,
        });
    }
    let tag = String::from_utf8_lossy(tag).into_owned();
    let result = cursor.sp().and_then(|_| cursor.command());
    match result {
        Ok(kind) => Ok(Command { tag, kind }),
        Err(message) => Err(ParseError {
            tag: Some(tag),
            refused: message.starts_with("[BADCHARSET"),
            message,
        }),
    }
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];

pub use mailroom_watch::civil::days_from_civil;

/// Exactly `len` ASCII digits (no sign, no space), as a number.
fn digits(text: &str, len: std::ops::RangeInclusive<usize>) -> Option<i64> {
    if !len.contains(&text.len()) || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `d-MMM-yyyy` as days since the epoch (RFC 9051 `date-text`: a day of one or two
/// digits, a four-digit year; anything else is not a date, so no arithmetic can wrap).
pub fn parse_date(text: &str) -> Option<i64> {
    let mut parts = text.split('-');
    let day = digits(parts.next()?.trim_start(), 1..=2)?;
    let month = parts.next()?.to_ascii_lowercase();
    let year = digits(parts.next()?, 4..=4)?;
    let month = MONTHS.iter().position(|m| *m == month)? as u32 + 1;
    if !(1..=31).contains(&day) || parts.next().is_some() {
        return None;
    }
    Some(days_from_civil(year, month, day as u32))
}

/// `dd-MMM-yyyy hh:mm:ss +zzzz` as Unix ms (RFC 9051 `date-time`: two-digit time
/// fields in range and a four-digit zone).
pub fn parse_date_time(text: &str) -> Option<i64> {
    let (date, rest) = text.trim().split_once(' ')?;
    let (time, zone) = rest.split_once(' ')?;
    let days = parse_date(date)?;
    let mut hms = time.split(':').map(|p| digits(p, 2..=2));
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if hms.next().is_some() || h > 23 || m > 59 || s > 60 {
        return None;
    }
    let sign = match zone.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let zone = digits(zone.get(1..)?, 4..=4)?;
    let offset = sign * ((zone / 100) * 3600 + (zone % 100) * 60);
    Some(((days * 86400 + h * 3600 + m * 60 + s) - offset) * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the differential run against Dovecot: a NUL inside a quoted string was
    /// taken into the folder name and echoed raw in the answer. Dovecot says BAD.
    #[test]
    fn a_nul_in_a_quoted_string_is_a_syntax_error() {
        let e = parse_command(b"a SELECT \"x\x00y\"").unwrap_err();
        assert!(e.message.contains("NUL"), "{}", e.message);
        assert!(parse_command(b"a SELECT \"x\x01y\"").is_ok());
    }

    /// Found by fuzzing (crates/fuzz, imap_parse): a year or time field of many digits
    /// overflowed the date arithmetic (a panic with overflow checks, a wrong date
    /// without). The grammar's digit counts are now enforced.
    #[test]
    fn dates_follow_the_grammar_and_never_overflow() {
        assert_eq!(
            parse_date_time("30-Nov-2026 10:00:00 +0000"),
            Some(1_796_032_800_000)
        );
        assert_eq!(
            parse_date_time(" 1-Jan-1970 00:00:00 -0100"),
            Some(3_600_000)
        );
        assert_eq!(parse_date("1-Jan-2020"), Some(18262));
        for bad in [
            "30-Nov-2222222026 10:00:00 +0000",
            "30-Nov-2026 155555555555555550:00:00 +0000",
            "30-Nov-2026 10:1111111111110000:00 +0000",
            "30-Nov-2026 10:00:00 +99999999999999",
            "30-Nov-+026 10:00:00 +0000",
            "30-Nov-2026 24:00:00 +0000",
            "30-Nov-2026 1:00:00 +0000",
            "999-Nov-2026 10:00:00 +0000",
        ] {
            assert_eq!(parse_date_time(bad), None, "{bad}");
        }
        assert_eq!(parse_date("1-Jan-99999999999999999"), None);
        let append = b"a APPEND INBOX (\\Seen) \"30-Nov-2222222026 10:00:00 +0000\" {1+}\r\nx";
        assert!(parse_command(append).is_err());
    }

    fn kind(text: &str) -> CommandKind {
        parse_command(text.as_bytes())
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .kind
    }

    #[test]
    fn fetch_items_sections_partials_and_modifiers() {
        let CommandKind::Fetch {
            uid,
            set,
            items,
            modifiers,
        } = kind(
            "a1 UID FETCH 1:3,7,9:* (FLAGS BODY.PEEK[HEADER.FIELDS (From To)]<0.100> BODY[1.2.MIME] BINARY.PEEK[2] BINARY.SIZE[1] MODSEQ) (CHANGEDSINCE 12)",
        )
        else {
            panic!()
        };
        assert!(uid);
        assert_eq!(set, vec![Range(1, 3), Range(7, 7), Range(9, STAR)]);
        assert_eq!(items.len(), 6);
        assert_eq!(
            items[1],
            FetchItem::BodySection {
                section: Section {
                    part: vec![],
                    text: SectionText::HeaderFields(vec!["From".into(), "To".into()])
                },
                partial: Some((0, 100)),
                peek: true
            }
        );
        assert_eq!(
            items[2],
            FetchItem::BodySection {
                section: Section {
                    part: vec![1, 2],
                    text: SectionText::Mime
                },
                partial: None,
                peek: false
            }
        );
        assert_eq!(modifiers.changed_since, Some(12));
        assert_eq!(
            kind("a FETCH 1 all"),
            CommandKind::Fetch {
                uid: false,
                set: vec![Range(1, 1)],
                items: vec![
                    FetchItem::Flags,
                    FetchItem::InternalDate,
                    FetchItem::Rfc822Size,
                    FetchItem::Envelope
                ],
                modifiers: FetchModifiers::default()
            }
        );
    }

    #[test]
    fn search_with_return_options_and_nested_keys() {
        let CommandKind::Search { uid, ret, key } = kind(
            "s UID SEARCH RETURN (MIN COUNT) CHARSET UTF-8 OR FROM \"Zoë\" (SUBJECT hello UNSEEN) NOT 1:5 SINCE 1-Feb-2026",
        ) else {
            panic!()
        };
        assert!(uid && ret.extended && ret.min && ret.count && !ret.all);
        let SearchKey::And(keys) = key else { panic!() };
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[2], SearchKey::Since(days_from_civil(2026, 2, 1)));
        assert!(matches!(kind("s SEARCH 2,4:*"), CommandKind::Search { .. }));
        assert!(
            parse_command(b"s SEARCH CHARSET KOI8-R ALL")
                .unwrap_err()
                .message
                .contains("BADCHARSET")
        );
    }

    #[test]
    fn list_extended_store_append_and_literals() {
        let CommandKind::List {
            patterns, options, ..
        } = kind(
            "l LIST (SUBSCRIBED) \"\" (\"INBOX\" \"Archive/*\") RETURN (CHILDREN STATUS (MESSAGES UNSEEN))",
        )
        else {
            panic!()
        };
        assert_eq!(patterns, vec!["INBOX", "Archive/*"]);
        assert!(options.subscribed && options.children);
        assert_eq!(
            options.status,
            Some(vec![StatusItem::Messages, StatusItem::Unseen])
        );
        assert_eq!(
            kind("s STORE 1:* (UNCHANGEDSINCE 5) +FLAGS.SILENT (\\seen $Junk)"),
            CommandKind::Store {
                uid: false,
                set: vec![Range(1, STAR)],
                mode: StoreMode::Add,
                silent: true,
                flags: vec!["\\Seen".into(), "$Junk".into()],
                unchanged_since: Some(5)
            }
        );
        let CommandKind::Append(mailbox, messages) =
            kind("a APPEND inbox (\\Seen) \"05-Mar-2026 10:00:00 +0100\" {5+}\r\nhello")
        else {
            panic!()
        };
        let message = &messages[0];
        assert_eq!(mailbox, "INBOX");
        assert_eq!(message.message, b"hello");
        assert_eq!(
            message.date_ms,
            Some((days_from_civil(2026, 3, 5) * 86400 + 9 * 3600) * 1000)
        );
        assert_eq!(
            kind("l LOGIN {5}\r\nalice \"pa\\\"ss\""),
            CommandKind::Login("alice".into(), "pa\"ss".into())
        );
        assert_eq!(
            kind("x UID EXPUNGE 4:6"),
            CommandKind::Expunge(Some(vec![Range(4, 6)]))
        );
        assert_eq!(
            kind("x SELECT Inbox (CONDSTORE)"),
            CommandKind::Select {
                mailbox: "INBOX".into(),
                read_only: false,
                condstore: true,
                qresync: None,
            }
        );
        // RFC 7162 3.2.5's example shapes: known UIDs, and sequence-match data.
        assert_eq!(
            kind("A02 SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))"),
            CommandKind::Select {
                mailbox: "INBOX".into(),
                read_only: false,
                condstore: false,
                qresync: Some(Qresync {
                    uidvalidity: 67890007,
                    modseq: 20050715194045000,
                    known_uids: Some(vec![Range(41, 41), Range(43, 211), Range(214, 541)]),
                }),
            }
        );
        assert_eq!(
            kind(
                "B04 EXAMINE INBOX (QRESYNC (67890007 90060115194045000 1:29997 (5000,7500,9000,9990:9999 15000,22500,27000,29970,29973,29976,29979,29982,29985,29988,29991,29994,29997)))"
            ),
            CommandKind::Select {
                mailbox: "INBOX".into(),
                read_only: true,
                condstore: false,
                qresync: Some(Qresync {
                    uidvalidity: 67890007,
                    modseq: 90060115194045000,
                    known_uids: Some(vec![Range(1, 29997)]),
                }),
            }
        );
        assert_eq!(
            kind("C SELECT INBOX (QRESYNC (1 5))"),
            CommandKind::Select {
                mailbox: "INBOX".into(),
                read_only: false,
                condstore: false,
                qresync: Some(Qresync {
                    uidvalidity: 1,
                    modseq: 5,
                    known_uids: None,
                }),
            }
        );
        for bad in [
            "x SELECT INBOX (QRESYNC (0 5))",
            "x SELECT INBOX (QRESYNC (1))",
            "x SELECT INBOX (QRESYNC 1 5)",
            "x FETCH 1:* (FLAGS) (CHANGEDSINCE 5 VANISHED)",
            "x UID FETCH 1:* (FLAGS) (VANISHED)",
        ] {
            assert!(parse_command(bad.as_bytes()).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_recursed_into() {
        let mut line = b"a SEARCH ".to_vec();
        line.extend(std::iter::repeat_n(b'(', 60_000));
        let err = parse_command(&line).unwrap_err();
        assert!(err.message.contains("nested deeper"), "{}", err.message);
        let mut line = b"a SEARCH ".to_vec();
        line.extend(b"NOT ".repeat(60_000));
        line.extend_from_slice(b"ALL");
        assert!(parse_command(&line).is_err());
        let mut line = b"a SEARCH ".to_vec();
        line.extend(b"OR ALL ".repeat(60_000));
        line.extend_from_slice(b"ALL");
        assert!(parse_command(&line).is_err());
        // Real nesting still parses.
        let mut line = b"a SEARCH ".to_vec();
        line.extend(std::iter::repeat_n(b'(', SEARCH_DEPTH_MAX - 1));
        line.extend_from_slice(b"SEEN");
        line.extend(std::iter::repeat_n(b')', SEARCH_DEPTH_MAX - 1));
        assert!(
            parse_command(&line).is_ok(),
            "{}",
            String::from_utf8_lossy(&line)
        );
    }

    #[test]
    fn list_patterns_are_bounded() {
        let mut line = b"a LIST \"\" \"".to_vec();
        line.extend(std::iter::repeat_n(b'%', 60_000));
        line.push(b'"');
        assert!(parse_command(&line).is_err());
        assert!(parse_command(b"a LIST \"\" \"%/%\"").is_ok());
    }

    #[test]
    fn bad_input_is_an_error_never_a_panic() {
        for input in [
            &b""[..],
            b"a",
            b"a FETCH",
            b"a FETCH 0 FLAGS",
            b"a FETCH 1 (FLAGS",
            b"a LOGIN {99}\r\nab",
            b"a SEARCH OR",
            b"a STORE 1 FLAGS (\\",
            b"a APPEND x {3}\r\nabc extra",
            b"a FETCH 1 BODY[1.MIME",
            b"\xff\xfe SELECT x",
            b"a FETCH 1 BODY[]<5.0>",
        ] {
            assert!(
                parse_command(input).is_err(),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            parse_command(b"a7 BOGUS").unwrap_err().tag.as_deref(),
            Some("a7")
        );
    }
}
