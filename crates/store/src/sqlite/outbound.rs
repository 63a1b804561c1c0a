//! [`OutboundQueue`] on SQLite: claiming due entries, recording outcomes (with the DSNs
//! they cause, in the same transaction), and the administrator's queue actions.

use super::{
    ITEM_COLUMNS, NewItem, SqliteStore, adjust_blob_refs, insert_queue_item, item_info,
    parse_envelope, put_blob,
};
use crate::outbound::{
    OutboundItem, OutboundOutcome, OutboundQueue, QueueActionError, QueueFilter,
};
use crate::track::{TrackEvent, TrackKind};
use crate::{QueueItemInfo, QueueName, Result, UnixMillis};
use rusqlite::{OptionalExtension, TransactionBehavior, params};

/// The columns [`claimed`] reads, in order.
const CLAIM_COLUMNS: &str = "id, queue, queue_id, mail_from, received_at_ms, attempts, connector,
    generation, envelope, last_error, blob_id";

fn claimed(r: &rusqlite::Row<'_>) -> rusqlite::Result<(OutboundItem, i64)> {
    Ok((
        OutboundItem {
            id: r.get(0)?,
            queue: QueueName::parse(&r.get::<_, String>(1)?).unwrap_or(QueueName::Quarantine),
            queue_id: r.get(2)?,
            mail_from: r.get(3)?,
            body: Vec::new(),
            received_at_ms: r.get(4)?,
            attempts: r.get(5)?,
            connector: r.get(6)?,
            generation: r.get::<_, Option<i64>>(7)?.map(|g| g as u64),
            envelope: parse_envelope(r.get(8)?),
            last_error: r.get(9)?,
        },
        r.get(10)?,
    ))
}

fn with_bodies(
    tx: &rusqlite::Transaction<'_>,
    rows: Vec<(OutboundItem, i64)>,
) -> Result<Vec<OutboundItem>> {
    let mut body = tx.prepare_cached("SELECT data FROM blobs WHERE id = ?1")?;
    let mut items = Vec::with_capacity(rows.len());
    for (mut item, blob_id) in rows {
        item.body = body.query_row([blob_id], |r| r.get(0))?;
        // Entries queued before schema 6 carry no per-recipient state: build it.
        if item.envelope.recipients.is_empty() {
            let recipients: String = tx.query_row(
                "SELECT recipients FROM queue_items WHERE id = ?1",
                [item.id],
                |r| r.get(0),
            )?;
            let addresses = super::parse_recipients(recipients);
            item.envelope = item.envelope.derive(&addresses, |_| None);
        }
        items.push(item);
    }
    Ok(items)
}

impl OutboundQueue for SqliteStore {
    fn claim_outbound(&self, now_ms: UnixMillis, limit: usize) -> Result<Vec<OutboundItem>> {
        // Read first: an idle worker's poll must not take the write turn (see
        // `anything_due`).
        if !self.anything_due(
            "SELECT EXISTS (SELECT 1 FROM queue_items
                            WHERE queue IN ('outbound', 'undeliverable') AND claimed = 0
                              AND held = 0 AND next_attempt_at_ms <= ?1)",
            now_ms,
        )? {
            return Ok(Vec::new());
        }
        self.write("claim outbound", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let rows = {
                let mut claim = tx.prepare_cached(&format!(
                    "UPDATE queue_items SET claimed = 1, attempts = attempts + 1
                     WHERE id IN (SELECT id FROM queue_items
                                  WHERE queue IN ('outbound', 'undeliverable') AND claimed = 0
                                    AND held = 0 AND next_attempt_at_ms <= ?1
                                  ORDER BY next_attempt_at_ms, id LIMIT ?2)
                     RETURNING {CLAIM_COLUMNS}"
                ))?;
                claim
                    .query_map(params![now_ms, limit as i64], claimed)?
                    .collect::<std::result::Result<Vec<_>, _>>()?
            };
            let mut items = with_bodies(&tx, rows)?;
            tx.commit()?;
            items.sort_by_key(|item| item.id);
            Ok(items)
        })
    }

    fn finish_outbound(&self, id: i64, queue_id: &str, outcome: &OutboundOutcome) -> Result<usize> {
        self.write("outbound", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let exists: Option<i64> = tx
                .query_row(
                    "SELECT blob_id FROM queue_items
                     WHERE id = ?1 AND queue_id = ?2 AND claimed = 1",
                    params![id, queue_id],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(blob_id) = exists else {
                // Finished already (an outcome retried after a fault that had in fact
                // committed), or the row id now belongs to another message: nothing to
                // record, no DSN twice, and the other message left alone.
                return Ok(0);
            };
            let tracking = self.tracking();
            let mut events = if tracking {
                outcome.events.clone()
            } else {
                Vec::new()
            };
            for notice in &outcome.notices {
                if tracking {
                    events.push(TrackEvent::received(notice));
                }
                let notice_blob = put_blob(&tx, &notice.body)?;
                insert_queue_item(
                    &tx,
                    NewItem::Unclaimed(QueueName::Inbound),
                    &notice.queue_id,
                    notice_blob,
                    &notice.mail_from,
                    &notice.recipients,
                    notice.received_at_ms,
                    None,
                    &notice.client,
                    None,
                    &notice.envelope,
                )?;
            }
            match outcome.next_attempt_at_ms {
                None => {
                    tx.execute("DELETE FROM queue_items WHERE id = ?1", [id])?;
                    adjust_blob_refs(&tx, blob_id, -1)?;
                }
                Some(next) => {
                    let pending: Vec<&str> = outcome
                        .envelope
                        .pending()
                        .map(|r| r.address.as_str())
                        .collect();
                    tx.execute(
                        "UPDATE queue_items SET claimed = 0, next_attempt_at_ms = ?2,
                                last_error = ?3, envelope = ?4, recipients = ?5,
                                connector = COALESCE(?6, connector),
                                generation = COALESCE(?7, generation)
                         WHERE id = ?1",
                        params![
                            id,
                            next,
                            outcome.last_error,
                            serde_json::to_string(&outcome.envelope).expect("serialises"),
                            serde_json::to_string(&pending).expect("serialises"),
                            outcome.route.as_ref().map(|r| r.0.as_str()),
                            outcome.route.as_ref().map(|r| r.1 as i64),
                        ],
                    )?;
                }
            }
            super::track::record_events(&tx, &events)?;
            tx.commit()?;
            Ok(outcome.notices.len())
        })
    }

    fn next_outbound_due(&self) -> Result<Option<UnixMillis>> {
        self.with_conn(|conn| {
            Ok(conn.query_row(
                "SELECT MIN(next_attempt_at_ms) FROM queue_items
                 WHERE queue IN ('outbound', 'undeliverable') AND claimed = 0 AND held = 0",
                [],
                |r| r.get(0),
            )?)
        })
    }

    fn outbound_due(&self, now_ms: UnixMillis) -> Result<(u64, Option<UnixMillis>)> {
        self.with_conn(|conn| {
            Ok(conn.query_row(
                "SELECT COUNT(*), MIN(received_at_ms) FROM queue_items
                 WHERE queue IN ('outbound', 'undeliverable') AND held = 0
                   AND next_attempt_at_ms <= ?1",
                [now_ms],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
        })
    }

    fn queue_filter(&self, filter: &QueueFilter, now_ms: UnixMillis) -> Result<Vec<QueueItemInfo>> {
        let like = |s: &Option<String>| {
            s.as_ref().map(|s| {
                format!(
                    "%{}%",
                    s.to_lowercase()
                        .replace('\\', "\\\\")
                        .replace('%', "\\%")
                        .replace('_', "\\_")
                )
            })
        };
        let state = filter.state.as_deref();
        let limit = filter.limit.unwrap_or(100).clamp(1, 10_000);
        self.with_conn(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {ITEM_COLUMNS} FROM queue_items q JOIN blobs b ON b.id = q.blob_id
                 WHERE (?1 IS NULL OR q.queue = ?1) AND q.id > ?2
                   AND (?3 IS NULL OR lower(q.mail_from) LIKE ?3 ESCAPE '\\')
                   AND (?4 IS NULL OR lower(q.recipients) LIKE ?4 ESCAPE '\\')
                   AND (?5 IS NULL OR q.connector = ?5 OR lower(q.recipients) LIKE ?6 ESCAPE '\\')
                   AND (?7 IS NULL OR q.received_at_ms <= ?7)
                   AND (?8 IS NULL
                        OR (?8 = 'held' AND q.held = 1)
                        OR (?8 = 'active' AND q.held = 0)
                        OR (?8 = 'deferred' AND q.held = 0 AND q.attempts > 0
                            AND q.claimed = 0))
                 ORDER BY q.id LIMIT ?9"
            ))?;
            let destination_like = filter
                .destination
                .as_ref()
                .map(|d| format!("%@{}\"%", d.to_lowercase()));
            let rows = stmt
                .query_map(
                    params![
                        filter.queue.map(QueueName::as_str),
                        filter.after.unwrap_or(0),
                        like(&filter.sender),
                        like(&filter.recipient),
                        filter.destination,
                        destination_like,
                        filter.older_than_ms.map(|age| now_ms - age),
                        state,
                        limit
                    ],
                    item_info,
                )?
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn queue_item(&self, id: i64) -> Result<Option<QueueItemInfo>> {
        self.with_conn(|conn| {
            Ok(conn
                .query_row(
                    &format!(
                        "SELECT {ITEM_COLUMNS} FROM queue_items q JOIN blobs b ON b.id = q.blob_id
                         WHERE q.id = ?1"
                    ),
                    [id],
                    item_info,
                )
                .optional()?)
        })
    }

    fn retry_now(
        &self,
        id: i64,
        now_ms: UnixMillis,
        by: &str,
    ) -> Result<std::result::Result<(), QueueActionError>> {
        let wall = mailroom_watch::now_ms();
        self.write("queue admin", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let state: Option<(String, bool, String, String)> = tx
                .query_row(
                    "SELECT queue, claimed, queue_id, recipients FROM queue_items WHERE id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            match state {
                None => Ok(Err(QueueActionError::NotFound)),
                Some((_, true, _, _)) => Ok(Err(QueueActionError::Busy)),
                Some((queue, false, queue_id, recipients)) => {
                    // A quarantined message goes back to conversion, with a fresh count.
                    let (to_queue, attempts_reset) = if queue == "quarantine" {
                        ("inbound".to_string(), true)
                    } else {
                        (queue.clone(), false)
                    };
                    tx.execute(
                        "UPDATE queue_items SET queue = ?2, next_attempt_at_ms = ?3, held = 0,
                                attempts = CASE WHEN ?4 THEN 0 ELSE attempts END
                         WHERE id = ?1",
                        params![id, to_queue, now_ms, attempts_reset],
                    )?;
                    if self.tracking() {
                        let event =
                            admin_event(&queue_id, wall, "retry", by, id, &queue, recipients);
                        super::track::record_events(&tx, &[event])?;
                    }
                    tx.commit()?;
                    Ok(Ok(()))
                }
            }
        })
    }

    fn set_held(
        &self,
        id: i64,
        held: bool,
        by: &str,
    ) -> Result<std::result::Result<(), QueueActionError>> {
        let wall = mailroom_watch::now_ms();
        self.write("queue admin", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let changed: Option<(String, String, String)> = tx
                .query_row(
                    "UPDATE queue_items SET held = ?2 WHERE id = ?1
                     RETURNING queue_id, queue, recipients",
                    params![id, held],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let Some((queue_id, queue, recipients)) = changed else {
                return Ok(Err(QueueActionError::NotFound));
            };
            let action = if held { "hold" } else { "release" };
            if self.tracking() {
                let event = admin_event(&queue_id, wall, action, by, id, &queue, recipients);
                super::track::record_events(&tx, &[event])?;
            }
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    fn claim_one(&self, id: i64) -> Result<std::result::Result<OutboundItem, QueueActionError>> {
        self.write("queue admin", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let claimed_now = tx
                .query_row(
                    &format!(
                        "UPDATE queue_items SET claimed = 1 WHERE id = ?1 AND claimed = 0
                         RETURNING {CLAIM_COLUMNS}"
                    ),
                    [id],
                    claimed,
                )
                .optional()?;
            let Some(row) = claimed_now else {
                let exists: Option<i64> = tx
                    .query_row("SELECT id FROM queue_items WHERE id = ?1", [id], |r| {
                        r.get(0)
                    })
                    .optional()?;
                return Ok(Err(if exists.is_some() {
                    QueueActionError::Busy
                } else {
                    QueueActionError::NotFound
                }));
            };
            let mut items = with_bodies(&tx, vec![row])?;
            tx.commit()?;
            Ok(Ok(items.remove(0)))
        })
    }
}

/// The trail's record of an administrator's action on queue entry `id`.
fn admin_event(
    queue_id: &str,
    at_ms: UnixMillis,
    action: &str,
    by: &str,
    id: i64,
    queue: &str,
    recipients: String,
) -> TrackEvent {
    TrackEvent::new(TrackKind::Admin, queue_id, at_ms)
        .recipients(super::parse_recipients(recipients))
        .with("action", action)
        .with("by", by)
        .with("entry", id)
        .with("queue", queue)
}
