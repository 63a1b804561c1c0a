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
        // The index holds events up to its mark; the few past it (a quarter second's,
        // see `index_message_ids`) are scanned by rowid. One statement, one snapshot:
        // an event is found exactly once, whether or not the indexer has passed it.
        conditions.push(format!(
            "queue_id IN (SELECT e.queue_id FROM track_message_ids i
                            JOIN track_events e ON e.id = i.event_id
                          WHERE i.message_id = ?{n}
                          UNION ALL
                          SELECT queue_id FROM track_events
                          WHERE id > {INDEXED_UPTO} AND message_id = ?{n})"
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

/// The Message-ID index's mark as an SQL expression: every event with an id up to it
/// is in `track_message_ids`, none after it.
const INDEXED_UPTO: &str = "COALESCE((SELECT value FROM store_counters
                                       WHERE name = 'track_indexed_upto'), 0)";

/// Deletes up to `max` of the oldest events older than `before_ms`; how many.
pub(crate) fn prune(
    tx: &rusqlite::Transaction<'_>,
    before_ms: UnixMillis,
    max: u32,
) -> Result<u64> {
    // Oldest first by rowid (rows are appended in time order); the time check keeps an
    // event with a clock that went backwards. Their Message-ID index entries go first,
    // while the events still say which they are.
    tx.execute(
        "DELETE FROM track_message_ids WHERE (message_id, event_id) IN
             (SELECT message_id, id FROM track_events
              WHERE id IN (SELECT id FROM track_events ORDER BY id LIMIT ?2)
                AND at_ms < ?1 AND message_id IS NOT NULL)",
        params![before_ms, max],
    )?;
    let removed = tx.execute(
        "DELETE FROM track_events WHERE id IN
             (SELECT id FROM track_events ORDER BY id LIMIT ?2) AND at_ms < ?1",
        params![before_ms, max],
    )? as u64;
    // Event ids are row ids: once the newest events are gone too, SQLite hands their
    // ids out again. The mark comes down with them, so that a new event is never taken
    // for one the index already holds.
    tx.execute(
        "UPDATE store_counters SET value = COALESCE((SELECT max(id) FROM track_events), 0)
         WHERE name = 'track_indexed_upto'
           AND value > COALESCE((SELECT max(id) FROM track_events), 0)",
        [],
    )?;
    Ok(removed)
}

/// Whether events past the Message-ID index's mark wait to be indexed (a read).
pub(crate) fn unindexed(conn: &rusqlite::Connection) -> Result<bool> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT EXISTS (SELECT 1 FROM track_events WHERE id > {INDEXED_UPTO})"
        ))?
        .query_row([], |r| r.get(0))?)
}

/// Indexes the Message-IDs of up to `max` events past the mark, in Message-ID order,
/// and moves the mark past them; how many events it passed.
///
/// Why in batches, after the fact: Message-IDs are random, so indexing each with its
/// `received` event put a random leaf page of the index into every spool commit (the
/// commit SMTP clients wait for). A batch is written in key order in one transaction
/// that nobody waits for (relaxed: no fsync of its own; a power loss that undoes it
/// undoes the mark with it, and the batch is indexed again). Queries stay exact
/// meanwhile: they scan the events past the mark.
pub(crate) fn index_message_ids(tx: &rusqlite::Transaction<'_>, max: u32) -> Result<u64> {
    let from: i64 = tx
        .prepare_cached(&format!("SELECT {INDEXED_UPTO}"))?
        .query_row([], |r| r.get(0))?;
    let (to, count): (Option<i64>, i64) = tx
        .prepare_cached(
            "SELECT max(id), count(*) FROM
                 (SELECT id FROM track_events WHERE id > ?1 ORDER BY id LIMIT ?2)",
        )?
        .query_row(params![from, max], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let Some(to) = to else {
        return Ok(0);
    };
    tx.prepare_cached(
        "INSERT OR IGNORE INTO track_message_ids (message_id, event_id)
         SELECT message_id, id FROM track_events
         WHERE id > ?1 AND id <= ?2 AND message_id IS NOT NULL
         ORDER BY message_id, id",
    )?
    .execute(params![from, to])?;
    tx.prepare_cached(
        "INSERT INTO store_counters (name, value) VALUES ('track_indexed_upto', ?1)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    )?
    .execute([to])?;
    Ok(count as u64)
}
