//! Message tracking: each message's trail of events (received, converted, delivered,
//! expanded, relayed, failed, deferred, DSN sent, quarantined, an administrator's
//! action), as `mailroom track`, the API and the web admin show it.
//!
//! Why the store writes them: an event is recorded in the same transaction as the step
//! it describes (the spool commit records "received", the delivery commit "converted"
//! and "delivered", the outbound outcome "relayed" or "deferred"), so a trail never
//! says a message went somewhere it did not, nor misses a step that happened. Callers
//! describe events as values ([`TrackEvent`]); the backend stores them with the step.
//! Events are kept for a retention period and pruned in small batches.

use crate::UnixMillis;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What happened to a message at one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackKind {
    /// Accepted by SMTP (or generated here, a DSN) and made durable.
    Received,
    /// Inbound conversion parsed it and resolved its recipients.
    Converted,
    /// A copy was placed in a mailbox.
    Delivered,
    /// A distribution list was expanded into its members.
    Expanded,
    /// Handed to a next hop, which accepted it.
    Relayed,
    /// A recipient failed for good (a next hop's permanent refusal, or no route).
    Failed,
    /// An attempt did not deliver; another follows.
    Deferred,
    /// A delivery status notification was sent to the envelope sender.
    Dsn,
    /// Moved to the quarantine queue.
    Quarantined,
    /// An administrator held, released, retried or deleted it.
    Admin,
}

impl TrackKind {
    /// Every kind, in the order a message usually meets them.
    pub const ALL: [TrackKind; 10] = [
        TrackKind::Received,
        TrackKind::Converted,
        TrackKind::Expanded,
        TrackKind::Delivered,
        TrackKind::Relayed,
        TrackKind::Failed,
        TrackKind::Deferred,
        TrackKind::Dsn,
        TrackKind::Quarantined,
        TrackKind::Admin,
    ];

    /// The name stored and shown (`received`, `dsn`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            TrackKind::Received => "received",
            TrackKind::Converted => "converted",
            TrackKind::Delivered => "delivered",
            TrackKind::Expanded => "expanded",
            TrackKind::Relayed => "relayed",
            TrackKind::Failed => "failed",
            TrackKind::Deferred => "deferred",
            TrackKind::Dsn => "dsn",
            TrackKind::Quarantined => "quarantined",
            TrackKind::Admin => "admin",
        }
    }

    /// The kind named by [`TrackKind::as_str`].
    pub fn parse(name: &str) -> Option<TrackKind> {
        TrackKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// One event of a message's trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrackEvent {
    /// What happened.
    pub event: TrackKind,
    /// When, Unix ms.
    pub at_ms: UnixMillis,
    /// The message's queue identifier (the one in its Received header); every event of
    /// one message shares it. A DSN or a re-spooled copy gets its own, named in the
    /// event that created it.
    pub queue_id: String,
    /// The Message-ID header (without angle brackets), as received; filled in on every
    /// event of a query's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The envelope sender ("" for the null reverse-path), as received; filled in on
    /// every event of a query's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// The envelope recipients this event is about.
    #[serde(default)]
    pub recipients: Vec<String>,
    /// The event's own facts: `client`, `helo`, `user`, `size` (received); `mailbox`,
    /// `folder`, `uid` (delivered); `list` (expanded); `host`, `reply`, `connector`
    /// (relayed, failed, deferred); `reason`, `next_attempt_at_ms` (deferred); `action`,
    /// `by` (admin); and so on.
    #[serde(flatten)]
    pub detail: Map<String, Value>,
}

impl TrackEvent {
    /// An event of `kind` for `queue_id` now, with no recipients or detail yet.
    pub fn new(kind: TrackKind, queue_id: &str, at_ms: UnixMillis) -> TrackEvent {
        TrackEvent {
            event: kind,
            at_ms,
            queue_id: queue_id.to_string(),
            message_id: None,
            sender: None,
            recipients: Vec::new(),
            detail: Map::new(),
        }
    }

    /// Adds the recipients the event is about.
    pub fn recipients(mut self, recipients: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.recipients = recipients.into_iter().map(Into::into).collect();
        self
    }

    /// Adds one fact.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.detail.insert(key.to_string(), value.into());
        self
    }

    /// One fact as text, if present.
    pub fn text(&self, key: &str) -> Option<&str> {
        self.detail.get(key).and_then(Value::as_str)
    }
}

impl TrackEvent {
    /// The "received" event of a message being spooled: its client, HELO name,
    /// authenticated user, size, Message-ID, sender and recipients.
    pub fn received(entry: &crate::SpoolEntry) -> TrackEvent {
        let mut event = TrackEvent::new(TrackKind::Received, &entry.queue_id, entry.received_at_ms)
            .recipients(entry.recipients.iter().cloned())
            .with("client", entry.client.as_str())
            .with("size", entry.body.len() as u64);
        if let Some(helo) = &entry.helo {
            event = event.with("helo", helo.as_str());
        }
        if let Some(user) = &entry.user {
            event = event.with("user", user.as_str());
        }
        event.message_id = header_message_id(&entry.body);
        event.sender = Some(entry.mail_from.clone());
        event
    }
}

impl TrackEvent {
    /// One line saying what happened, for the CLI's table and the web admin's timeline.
    pub fn summary(&self) -> String {
        let text = |key: &str| self.text(key).unwrap_or("").to_string();
        let number = |key: &str| {
            self.detail
                .get(key)
                .map(|v| v.to_string())
                .unwrap_or_default()
        };
        let to = self.recipients.join(", ");
        match self.event {
            TrackKind::Received => {
                let mut line = format!("from {}", text("client"));
                if let Some(helo) = self.text("helo") {
                    line.push_str(&format!(" (HELO {helo})"));
                }
                if let Some(user) = self.text("user") {
                    line.push_str(&format!(" as {user}"));
                }
                line.push_str(&format!(", {} bytes, to {to}", number("size")));
                line
            }
            TrackKind::Converted => {
                let remote = self
                    .detail
                    .get("remote")
                    .and_then(Value::as_array)
                    .map_or(0, |r| r.len());
                let mut line = format!(
                    "{} mailbox(es) here, {remote} outbound group(s)",
                    number("local")
                );
                if self.detail.get("parsed") == Some(&Value::Bool(false)) {
                    line.push_str(", MIME did not parse (delivered as received)");
                }
                if let Some(undeliverable) =
                    self.detail.get("undeliverable").and_then(Value::as_array)
                {
                    line.push_str(&format!(", {} undeliverable", undeliverable.len()));
                }
                if let Some(junk) = self.text("junk") {
                    line.push_str(&format!(", junk: {junk}"));
                }
                line
            }
            TrackKind::Delivered => format!(
                "to mailbox {} ({} uid {})",
                self.text("mailbox").unwrap_or(&to),
                text("folder"),
                number("uid")
            ),
            TrackKind::Expanded => format!("list {} to {to}", text("list")),
            TrackKind::Relayed | TrackKind::Failed => format!(
                "{to}{}{}: {}",
                self.text("host")
                    .map(|h| format!(" to {h}"))
                    .unwrap_or_default(),
                self.text("connector")
                    .map(|c| format!(" via {c}"))
                    .unwrap_or_default(),
                self.text("reply").unwrap_or("")
            ),
            TrackKind::Deferred => {
                let mut line = format!("{to}: {}", text("reason"));
                if let Some(host) = self.text("host") {
                    line.push_str(&format!(" ({host})"));
                }
                if let Some(next) = self
                    .detail
                    .get("next_attempt_at_ms")
                    .and_then(Value::as_i64)
                {
                    line.push_str(&format!("; next attempt {}", rfc3339(next)));
                }
                line
            }
            TrackKind::Dsn => format!(
                "{} notice to <{}> about {to} (queued as {})",
                text("action"),
                text("to"),
                text("notice")
            ),
            TrackKind::Quarantined => format!("reason: {}", text("reason")),
            TrackKind::Admin => format!(
                "{} by {} (entry {})",
                text("action"),
                text("by"),
                number("entry")
            ),
        }
    }
}

/// What `mailroom track` asks for: messages matching every filter given.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrackQuery {
    /// The Message-ID, with or without angle brackets (exact, case-sensitive as RFC
    /// 5322 has it).
    #[serde(default)]
    pub message_id: Option<String>,
    /// Part of the envelope sender (case-insensitive).
    #[serde(default)]
    pub sender: Option<String>,
    /// Part of a recipient address any event names (case-insensitive): an envelope
    /// recipient, a list's member, a mailbox delivered to.
    #[serde(default)]
    pub recipient: Option<String>,
    /// One queue identifier.
    #[serde(default)]
    pub queue_id: Option<String>,
    /// Only messages with an event at or after this time, Unix ms.
    #[serde(default)]
    pub since_ms: Option<UnixMillis>,
    /// At most this many messages, newest first (default 100, at most 10,000).
    #[serde(default)]
    pub limit: Option<u32>,
}

impl TrackQuery {
    /// The message limit actually applied.
    pub fn limit(&self) -> u32 {
        self.limit.unwrap_or(100).clamp(1, 10_000)
    }
}

/// The Message-ID a message's header carries (without angle brackets), read from the
/// header section only (at most its first 64 KiB), folded lines unfolded. `None` when
/// there is none.
pub fn header_message_id(body: &[u8]) -> Option<String> {
    let header = &body[..body.len().min(64 * 1024)];
    let mut lines = header.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return None;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if !line[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(b"message-id")
        {
            continue;
        }
        let mut value = line[colon + 1..].to_vec();
        while let Some(next) = lines.peek() {
            if next.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                let next = lines.next().unwrap_or_default();
                value.extend_from_slice(next.strip_suffix(b"\r").unwrap_or(next));
            } else {
                break;
            }
        }
        let value = String::from_utf8_lossy(&value);
        let value = value.trim();
        let value = value.strip_prefix('<').unwrap_or(value);
        let value = value.split('>').next().unwrap_or(value).trim();
        return (!value.is_empty()).then(|| value.chars().take(998).collect());
    }
    None
}

/// A time as RFC 3339 UTC with milliseconds (`2026-12-02T03:04:05.678Z`), for people
/// reading a trail.
pub fn rfc3339(ms: UnixMillis) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = mailroom_watch::civil::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_is_read_from_the_header_only_and_unfolded() {
        assert_eq!(
            header_message_id(b"From: a@b\r\nMessage-ID: <x1@example.org>\r\n\r\nbody"),
            Some("x1@example.org".into())
        );
        assert_eq!(
            header_message_id(b"message-id:\r\n  <folded@example.org>\r\nTo: c\r\n\r\n"),
            Some("folded@example.org".into())
        );
        assert_eq!(
            header_message_id(b"From: a@b\r\n\r\nMessage-ID: <in-body@x>\r\n"),
            None
        );
        assert_eq!(header_message_id(b"Message-ID: <>\r\n\r\n"), None);
        assert_eq!(header_message_id(b""), None);
    }

    #[test]
    fn times_read_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_796_180_645_678), "2026-12-02T03:04:05.678Z");
    }

    #[test]
    fn events_serialise_flat_with_their_kind_named() {
        let e = TrackEvent::new(TrackKind::Delivered, "Q1", 5)
            .recipients(["a@x"])
            .with("mailbox", "a@x")
            .with("uid", 7);
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["event"], "delivered");
        assert_eq!(json["mailbox"], "a@x");
        assert_eq!(json["uid"], 7);
        assert_eq!(serde_json::from_value::<TrackEvent>(json).unwrap(), e);
    }
}
