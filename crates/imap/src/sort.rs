//! SORT (RFC 5256) and SORT=DISPLAY (RFC 5957): the sort keys of a message and the
//! base-subject algorithm.
//!
//! Why our own: the comparisons are small, but their details (base subject, which
//! address, what an invalid date is) are what clients check, and no crate does them.

use crate::parse::{SortCriterion, SortKey};
use mail_parser::{Address, Message};
use mailroom_store::MessageState;
use std::cmp::Ordering;

/// What a message is sorted by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SortFields {
    /// Internal date, ms (ARRIVAL).
    pub arrival: i64,
    /// The Date header in UTC, ms; the internal date when it is missing or invalid
    /// (RFC 5256 DATE).
    pub date: i64,
    /// RFC822.SIZE.
    pub size: u64,
    /// The base subject, case-folded (RFC 5256 2.1).
    pub subject: String,
    /// The mailbox (local part) of the first From / To / Cc address, case-folded.
    pub from: String,
    /// See `from`.
    pub to: String,
    /// See `from`.
    pub cc: String,
    /// The display name of the first From address, or its address (RFC 5957).
    pub display_from: String,
    /// The same for To.
    pub display_to: String,
}

/// The sort fields of a message from its header (`None`: the bytes could not be read).
pub fn fields(header: Option<&Message<'_>>, state: &MessageState) -> SortFields {
    let mut f = SortFields {
        arrival: state.internal_date_ms,
        date: state.internal_date_ms,
        size: state.size,
        ..SortFields::default()
    };
    let Some(m) = header else {
        return f;
    };
    if let Some(date) = m.date() {
        f.date = date.to_timestamp() * 1000;
    }
    f.subject = base_subject(m.subject().unwrap_or(""));
    f.from = first_mailbox(m.from());
    f.to = first_mailbox(m.to());
    f.cc = first_mailbox(m.cc());
    f.display_from = first_display(m.from());
    f.display_to = first_display(m.to());
    f
}

fn first_address<'a>(address: Option<&'a Address<'a>>) -> Option<&'a mail_parser::Addr<'a>> {
    match address? {
        Address::List(list) => list.first(),
        Address::Group(groups) => groups.iter().flat_map(|g| g.addresses.iter()).next(),
    }
}

fn first_mailbox(address: Option<&Address<'_>>) -> String {
    first_address(address)
        .and_then(|a| a.address.as_deref())
        .map(|a| a.rsplit_once('@').map_or(a, |(local, _)| local))
        .unwrap_or("")
        .to_lowercase()
}

fn first_display(address: Option<&Address<'_>>) -> String {
    first_address(address)
        .and_then(|a| {
            a.name
                .as_deref()
                .filter(|n| !n.trim().is_empty())
                .or(a.address.as_deref())
        })
        .unwrap_or("")
        .trim()
        .to_lowercase()
}

/// RFC 5256 2.1: the subject without reply and forward markers, blobs and
/// "(fwd)" trailers, whitespace collapsed, case-folded (i;unicode-casemap).
pub fn base_subject(subject: &str) -> String {
    base_subject_and_reply(subject).0
}

/// The base subject, and whether extracting it removed a reply or forward marker
/// (`Re:`, `Fw:`, `Fwd:`, `(fwd)`, `[Fwd: ...]`): THREAD=REFERENCES's "reply or forward".
pub fn base_subject_and_reply(subject: &str) -> (String, bool) {
    // Each pass below copies the subject once per marker it removes: a header of
    // 100,000 "Re: " would be quadratic. Subjects are compared on their first 4 KiB.
    let mut end = subject.len().min(SUBJECT_BYTES_MAX);
    while !subject.is_char_boundary(end) {
        end -= 1;
    }
    let subject = &subject[..end];
    let mut reply = false;
    // (1) Decoded already (mail-parser); collapse whitespace.
    let mut s: String = subject.split_whitespace().collect::<Vec<_>>().join(" ");
    loop {
        let before = s.clone();
        // (2) Trailing "(fwd)" and whitespace.
        loop {
            let trimmed = s.trim_end();
            let lower = trimmed.to_ascii_lowercase();
            if lower.ends_with("(fwd)") {
                reply = true;
                s = trimmed[..trimmed.len() - 5].to_string();
            } else {
                s = trimmed.to_string();
                break;
            }
        }
        // (3) Leading subj-leader: blobs, then re/fw/fwd [blob] ":" (repeated), and
        // (4) a leading blob when something remains after it.
        loop {
            let start = s.clone();
            let stripped = strip_leader(&s);
            if stripped != s {
                reply = true;
            }
            s = stripped;
            if let Some(rest) = strip_blob(&s)
                && !rest.trim().is_empty()
            {
                s = rest.to_string();
            }
            if s == start {
                break;
            }
        }
        // (6) "[fwd:" ... "]" around the whole.
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("[fwd:") && s.ends_with(']') {
            reply = true;
            s = s[5..s.len() - 1].trim().to_string();
        }
        if s == before {
            break;
        }
    }
    (s.to_lowercase(), reply)
}

/// `[blob]` at the start (and the whitespace after it): the rest, or `None`.
fn strip_blob(s: &str) -> Option<&str> {
    let rest = s.strip_prefix('[')?;
    let end = rest.find(']')?;
    if rest[..end].contains('[') {
        return None;
    }
    Some(rest[end + 1..].trim_start())
}

/// One `*blob (re / fw / fwd) [blob] ":"` at the start, removed.
fn strip_leader(s: &str) -> String {
    let mut rest = s.trim_start();
    while let Some(after) = strip_blob(rest) {
        rest = after;
    }
    let lower = rest.to_ascii_lowercase();
    let word = ["fwd", "re", "fw"]
        .into_iter()
        .find(|w| lower.starts_with(w));
    let Some(word) = word else {
        return s.to_string();
    };
    let mut after = rest[word.len()..].trim_start();
    if let Some(blobbed) = strip_blob(after) {
        after = blobbed;
    }
    match after.strip_prefix(':') {
        Some(tail) => tail.trim_start().to_string(),
        None => s.to_string(),
    }
}

/// How much of a subject SORT and THREAD look at.
const SUBJECT_BYTES_MAX: usize = 4096;

/// Orders two messages by `criteria`; ties go by sequence number (the caller's order).
pub fn compare(a: &SortFields, b: &SortFields, criteria: &[SortCriterion]) -> Ordering {
    for c in criteria {
        let order = match c.key {
            SortKey::Arrival => a.arrival.cmp(&b.arrival),
            SortKey::Date => a.date.cmp(&b.date),
            SortKey::Size => a.size.cmp(&b.size),
            SortKey::Subject => a.subject.cmp(&b.subject),
            SortKey::From => a.from.cmp(&b.from),
            SortKey::To => a.to.cmp(&b.to),
            SortKey::Cc => a.cc.cmp(&b.cc),
            SortKey::DisplayFrom => a.display_from.cmp(&b.display_from),
            SortKey::DisplayTo => a.display_to.cmp(&b.display_to),
        };
        let order = if c.reverse { order.reverse() } else { order };
        if order != Ordering::Equal {
            return order;
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_subject_follows_rfc_5256() {
        assert_eq!(base_subject("Re: Hello"), "hello");
        assert_eq!(base_subject("RE: re: Fwd: hello"), "hello");
        assert_eq!(base_subject("[list] Re: [other] hello"), "hello");
        assert_eq!(base_subject("Re[2]: hello (fwd)"), "hello");
        assert_eq!(base_subject("[Fwd: Re: hello]"), "hello");
        assert_eq!(base_subject("  many   spaces  "), "many spaces");
        assert_eq!(base_subject("[only a blob]"), "[only a blob]");
        assert_eq!(base_subject("Reply to this"), "reply to this");
        assert_eq!(base_subject(""), "");
    }
}
