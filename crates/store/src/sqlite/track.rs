//! Message tracking on SQLite: events written inside the transaction of the step they
//! record, the trail query, and retention.

use crate::track::{TrackEvent, TrackKind, TrackQuery};
use crate::{Result, UnixMillis};
use rusqlite::{params, params_from_iter};
use std::collections::HashSet;

/// An event ready to insert, serialised before the write turn: everything done inside
/// the turn is time the spool and delivery wait for.
pub(crate) struct Prepared {
    at_ms: UnixMillis,
    queue_id: String,
    event: &'static str,
    message_id: Option<String>,
    sender: Option<String>,
    recipients: String,
    detail: String,
}

impl From<&TrackEvent> for Prepared {
    fn from(e: &TrackEvent) -> Prepared {
        Prepared {
            at_ms: e.at_ms,
            queue_id: e.queue_id.clone(),
            event: e.event.as_str(),
            message_id: e.message_id.clone(),
            sender: e.sender.clone(),
            recipients: e.recipients.join("\n"),
            detail: serde_json::to_string(&e.detail).expect("a JSON map serialises"),
        }
    }
}

/// Appends prepared events in the caller's transaction.
pub(crate) fn record_prepared(tx: &rusqlite::Transaction<'_>, events: &[Prepared]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut insert = tx.prepare_cached(
        "INSERT INTO track_events (at_ms, queue_id, event, message_id, sender, recipients,
                                   detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for e in events {
        insert.execute(params![
            e.at_ms,
            e.queue_id,
            e.event,
            e.message_id,
            e.sender,
            e.recipients,
            e.detail,
        ])?;
    }
    Ok(())
}

/// Appends `events` in the caller's transaction.
pub(crate) fn record_events(tx: &rusqlite::Transaction<'_>, events: &[TrackEvent]) -> Result<()> {
    let prepared: Vec<Prepared> = events.iter().map(Prepared::from).collect();
    record_prepared(tx, &prepared)
}

/// Escapes `%`, `_` and `\` for a `LIKE ... ESCAPE '\'` pattern, wrapped in `%`.
fn contains_pattern(part: &str) -> String {
    let mut pattern = String::with_capacity(part.len() + 2);
    pattern.push('%');
    for c in part.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// The trails of the messages `query` matches, newest message first.
pub(crate) fn track(conn: &rusqlite::Connection, query: &TrackQuery) -> Result<Vec<TrackEvent>> {
    // First the messages: each filter narrows the set of queue ids.
    let mut conditions = Vec::new();
    let mut values: Vec<rusqlite::types::Value> = Vec::new();
    let bind = |value: rusqlite::types::Value, values: &mut Vec<_>| {
        values.push(value);
        values.len()
    };
    if let Some(id) = &query.message_id {
        let id = id.trim();
        let id = id.strip_prefix('<').unwrap_or(id);
        let id = id.strip_suffix('>').unwrap_or(id);
        let n = bind(id.to_string().into(), &mut values);
        conditions.push(format!(
            "queue_id IN (SELECT queue_id FROM track_events WHERE message_id = ?{n})"
        ));
    }
    if let Some(sender) = &query.sender {
        let n = bind(contains_pattern(sender).into(), &mut values);
        conditions.push(format!(
            "queue_id IN (SELECT queue_id FROM track_events
                          WHERE event = 'received' AND sender LIKE ?{n} ESCAPE '\\')"
        ));
    }
    if let Some(recipient) = &query.recipient {
        let n = bind(contains_pattern(recipient).into(), &mut values);
        conditions.push(format!(
            "queue_id IN (SELECT queue_id FROM track_events
                          WHERE recipients LIKE ?{n} ESCAPE '\\')"
        ));
    }
    if let Some(queue_id) = &query.queue_id {
        let n = bind(queue_id.clone().into(), &mut values);
        conditions.push(format!("queue_id = ?{n}"));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    // Newest first by rowid (rows are appended in time order), stopping at the limit,
    // or an hour (for clocks that step back) before `since`: no sort of the whole table.
    let limit = query.limit() as usize;
    let mut messages: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    let mut scan = conn.prepare(&format!(
        "SELECT queue_id, at_ms FROM track_events {filter} ORDER BY id DESC"
    ))?;
    let mut rows = scan.query(params_from_iter(values))?;
    while let Some(row) = rows.next()? {
        let at_ms: UnixMillis = row.get(1)?;
        if let Some(since) = query.since_ms {
            if at_ms < since - 3_600_000 {
                break;
            }
            if at_ms < since {
                continue;
            }
        }
        let queue_id: String = row.get(0)?;
        if seen.insert(queue_id.clone()) {
            messages.push(queue_id);
            if messages.len() >= limit {
                break;
            }
        }
    }
    drop(rows);

    // Then each message's whole trail.
    let mut events = Vec::new();
    let mut read = conn.prepare_cached(
        "SELECT event, at_ms, queue_id, message_id, sender, recipients, detail
         FROM track_events WHERE queue_id = ?1 ORDER BY id",
    )?;
    for queue_id in messages {
        let mut trail: Vec<TrackEvent> = read
            .query_map([&queue_id], |r| {
                let kind: String = r.get(0)?;
                let recipients: String = r.get(5)?;
                let detail: String = r.get(6)?;
                Ok(TrackEvent {
                    event: TrackKind::parse(&kind).unwrap_or(TrackKind::Admin),
                    at_ms: r.get(1)?,
                    queue_id: r.get(2)?,
                    message_id: r.get(3)?,
                    sender: r.get(4)?,
                    recipients: recipients
                        .split('\n')
                        .filter(|a| !a.is_empty())
                        .map(str::to_string)
                        .collect(),
                    detail: serde_json::from_str(&detail).unwrap_or_default(),
                })
            })?
            .collect::<std::result::Result<_, _>>()?;
        let received = trail
            .iter()
            .find(|e| e.event == TrackKind::Received)
            .map(|e| (e.message_id.clone(), e.sender.clone()));
        if let Some((message_id, sender)) = received {
            for e in &mut trail {
                e.message_id.clone_from(&message_id);
                e.sender.clone_from(&sender);
            }
        }
        events.extend(trail);
    }
    Ok(events)
}

/// Deletes up to `max` of the oldest events older than `before_ms`; how many.
pub(crate) fn prune(
    tx: &rusqlite::Transaction<'_>,
    before_ms: UnixMillis,
    max: u32,
) -> Result<u64> {
    // Oldest first by rowid (rows are appended in time order); the time check keeps an
    // event with a clock that went backwards.
    Ok(tx.execute(
        "DELETE FROM track_events WHERE id IN
             (SELECT id FROM track_events ORDER BY id LIMIT ?2) AND at_ms < ?1",
        params![before_ms, max],
    )? as u64)
}
