//! [`Mailboxes`] for the SQLite store.

use super::{SqliteStore, adjust_blob_refs, folder_id, next_uid, put_blob};
use crate::mailbox::*;
use crate::{RecipientId, Result, StoreError, UnixMillis};
use mailroom_watch::now_ms;
use rusqlite::{OptionalExtension, TransactionBehavior, params};

/// A body from its blob handle: all of it, or (`header_only`) up to and including the
/// blank line that ends its header (all of it when there is none). Reads 4 KiB first and
/// more only while the blank line is not found.
fn read_body(blob: &rusqlite::blob::Blob<'_>, header_only: bool) -> Result<Vec<u8>> {
    let len = blob.len();
    if !header_only {
        let mut data = vec![0; len];
        blob.read_at_exact(&mut data, 0)?;
        return Ok(data);
    }
    let finder = memchr::memmem::Finder::new(b"\r\n\r\n");
    let mut data = Vec::new();
    let mut want = len.min(4096);
    loop {
        let have = data.len();
        data.resize(want, 0);
        blob.read_at_exact(&mut data[have..], have)?;
        // The blank line may straddle the previous read's end.
        let from = have.saturating_sub(3);
        if let Some(at) = finder.find(&data[from..]) {
            data.truncate(from + at + 4);
            return Ok(data);
        }
        if want == len {
            return Ok(data);
        }
        want = len.min(want * 4);
    }
}

fn parse_flags(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_string).collect()
}

fn join_flags(flags: &[String]) -> String {
    let mut out: Vec<&str> = Vec::with_capacity(flags.len());
    for f in flags {
        if !out.iter().any(|o| o.eq_ignore_ascii_case(f)) {
            out.push(f);
        }
    }
    out.join(" ")
}

/// A new folder's UIDVALIDITY: the current time in seconds, but always above every
/// UIDVALIDITY handed out before, deleted folders' included (`store_counters`), so a
/// folder deleted and re-created at once never repeats one (RFC 9051 2.3.1.1).
pub(super) fn next_uidvalidity(tx: &rusqlite::Transaction<'_>, now_ms: i64) -> Result<u32> {
    let highest: i64 = tx.query_row(
        "SELECT MAX(
             COALESCE((SELECT value FROM store_counters WHERE name = 'uidvalidity'), 0),
             COALESCE((SELECT MAX(uidvalidity) FROM folders), 0))",
        [],
        |r| r.get(0),
    )?;
    let next = (now_ms / 1000).max(highest + 1);
    tx.execute(
        "INSERT INTO store_counters (name, value) VALUES ('uidvalidity', ?1)
         ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        [next],
    )?;
    Ok(next as u32)
}

fn require_folder(tx: &rusqlite::Connection, recipient: RecipientId, name: &str) -> Result<i64> {
    folder_id(tx, recipient, name)?.ok_or_else(|| StoreError::NotFound(format!("folder {name}")))
}

/// Bumps a folder's HIGHESTMODSEQ and returns the new value.
fn bump_modseq(tx: &rusqlite::Transaction<'_>, folder: i64) -> Result<i64> {
    Ok(tx
        .prepare_cached(
            "UPDATE folders SET highestmodseq = highestmodseq + 1 WHERE id = ?1
             RETURNING highestmodseq",
        )?
        .query_row([folder], |r| r.get(0))?)
}

/// A folder's row as [`FolderInfo`], with its message counts (add a WHERE on `f`). The
/// counts and size are the folder's trigger-kept columns (schema 16); only the recent
/// count is read from the messages, a range of the UID index above the floor.
const FOLDER_INFO: &str = "SELECT f.name, f.uidvalidity, f.uidnext, f.highestmodseq, f.subscribed,
        f.special_use, f.message_count, f.unseen_count, f.bytes, f.recent_floor,
        (SELECT COUNT(*) FROM messages m
            WHERE m.folder_id = f.id AND m.uid > f.recent_floor)
     FROM folders f";

fn folder_info(r: &rusqlite::Row<'_>) -> rusqlite::Result<FolderInfo> {
    Ok(FolderInfo {
        name: r.get(0)?,
        uidvalidity: r.get(1)?,
        uidnext: r.get(2)?,
        highestmodseq: r.get::<_, i64>(3)? as u64,
        subscribed: r.get(4)?,
        special_use: r.get(5)?,
        messages: r.get(6)?,
        unseen: r.get(7)?,
        bytes: r.get::<_, i64>(8)? as u64,
        recent_floor: r.get(9)?,
        recent: r.get(10)?,
    })
}

/// A `messages` row selected as `uid, modseq, flags, received_at_ms, size`. The flags
/// are read in place (a folder snapshot reads every row of the folder).
fn message_state(r: &rusqlite::Row<'_>) -> rusqlite::Result<MessageState> {
    let flags = r.get_ref(2)?;
    let flags = flags.as_str().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(2, flags.data_type(), Box::new(e))
    })?;
    Ok(MessageState {
        uid: r.get(0)?,
        modseq: r.get::<_, i64>(1)? as u64,
        flags: parse_flags(flags),
        internal_date_ms: r.get(3)?,
        size: r.get::<_, i64>(4)? as u64,
    })
}

/// A folder's messages in UID order.
fn read_messages(conn: &rusqlite::Connection, folder: i64) -> Result<Vec<MessageState>> {
    let mut stmt = conn.prepare_cached(
        "SELECT uid, modseq, flags, received_at_ms, size FROM messages
         WHERE folder_id = ?1 ORDER BY uid",
    )?;
    let rows = stmt
        .query_map([folder], message_state)?
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Expunge records kept per folder: past this many (and a slack of a tenth, so pruning
/// is rare), the oldest go and the folder's `vanished_floor` rises past them.
pub(crate) const EXPUNGED_KEPT: i64 = 20_000;

/// Records `uids` as expunged from `folder` at `modseq` (QRESYNC's VANISHED), inside the
/// caller's transaction, keeping at most about `kept` records per folder.
pub(crate) fn record_expunged(
    tx: &rusqlite::Transaction<'_>,
    folder: i64,
    uids: &[u32],
    modseq: i64,
) -> Result<()> {
    record_expunged_keeping(tx, folder, uids, modseq, EXPUNGED_KEPT)
}

/// [`record_expunged`] with the number kept given (tests use a small one).
pub(crate) fn record_expunged_keeping(
    tx: &rusqlite::Transaction<'_>,
    folder: i64,
    uids: &[u32],
    modseq: i64,
    kept: i64,
) -> Result<()> {
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR REPLACE INTO expunged (folder_id, uid, modseq) VALUES (?1, ?2, ?3)",
        )?;
        for uid in uids {
            insert.execute(params![folder, uid, modseq])?;
        }
    }
    // A counter, not a count: deciding costs nothing until pruning is due.
    let count: i64 = tx
        .prepare_cached(
            "UPDATE folders SET expunged_count = expunged_count + ?2 WHERE id = ?1
             RETURNING expunged_count",
        )?
        .query_row(params![folder, uids.len() as i64], |r| r.get(0))?;
    if count > kept + kept / 10 {
        let cut: Option<i64> = tx
            .prepare_cached(
                "SELECT modseq FROM expunged WHERE folder_id = ?1
                 ORDER BY modseq DESC LIMIT 1 OFFSET ?2",
            )?
            .query_row(params![folder, kept], |r| r.get(0))
            .optional()?;
        if let Some(cut) = cut {
            tx.execute(
                "DELETE FROM expunged WHERE folder_id = ?1 AND modseq <= ?2",
                params![folder, cut],
            )?;
            tx.execute(
                "UPDATE folders SET vanished_floor = MAX(vanished_floor, ?2),
                    expunged_count = (SELECT COUNT(*) FROM expunged WHERE folder_id = ?1)
                 WHERE id = ?1",
                params![folder, cut],
            )?;
        }
    }
    Ok(())
}

fn uidvalidity_of(tx: &rusqlite::Transaction<'_>, folder: i64) -> Result<u32> {
    Ok(tx.query_row(
        "SELECT uidvalidity FROM folders WHERE id = ?1",
        [folder],
        |r| r.get(0),
    )?)
}

fn insert_folder(
    tx: &rusqlite::Transaction<'_>,
    recipient: RecipientId,
    name: &str,
    special_use: Option<&str>,
) -> Result<i64> {
    super::ensure_live(tx, recipient)?;
    let uidvalidity = next_uidvalidity(tx, now_ms())?;
    tx.execute(
        "INSERT INTO folders (recipient_id, name, uidvalidity, special_use) VALUES (?1, ?2, ?3, ?4)",
        params![recipient, name, uidvalidity, special_use],
    )?;
    Ok(tx.last_insert_rowid())
}

impl Mailboxes for SqliteStore {
    fn folders(&self, recipient: RecipientId) -> Result<Vec<FolderInfo>> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "{FOLDER_INFO} WHERE f.recipient_id = ?1 ORDER BY f.name"
            ))?;
            let rows = stmt
                .query_map([recipient], folder_info)?
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn folder_snapshot(
        &self,
        recipient: RecipientId,
        folder: &str,
    ) -> Result<(FolderInfo, Vec<MessageState>)> {
        self.with_conn(|conn| {
            // One read transaction: the folder's counters and its messages from the same
            // snapshot.
            let tx = conn.transaction()?;
            let id = require_folder(&tx, recipient, folder)?;
            let info = tx
                .prepare_cached(&format!("{FOLDER_INFO} WHERE f.id = ?1"))?
                .query_row([id], folder_info)?;
            let messages = read_messages(&tx, id)?;
            tx.commit()?;
            Ok((info, messages))
        })
    }

    fn create_folder(
        &self,
        recipient: RecipientId,
        name: &str,
        special_use: Option<&str>,
    ) -> Result<()> {
        self.write("mailbox", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if folder_id(&tx, recipient, name)?.is_some() {
                return Err(StoreError::Conflict(format!("folder {name} exists")));
            }
            insert_folder(&tx, recipient, name, special_use)?;
            tx.commit()?;
            Ok(())
        })?;
        self.ring(&[recipient]);
        Ok(())
    }

    fn claim_recent(&self, recipient: RecipientId, name: &str) -> Result<u32> {
        // Most SELECTs find nothing new: a read, and no write turn.
        let (floor, last): (u32, u32) = self.with_conn(|conn| {
            conn.query_row(
                "SELECT recent_floor, uidnext - 1 FROM folders
                 WHERE recipient_id = ?1 AND name = ?2",
                rusqlite::params![recipient, name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("folder {name}")))
        })?;
        if floor >= last {
            return Ok(floor);
        }
        // The floor only rises, and only one session gets each message: the update
        // returns the floor it replaced.
        self.write("recent", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let folder = require_folder(&tx, recipient, name)?;
            let (floor, last): (u32, u32) = tx.query_row(
                "SELECT recent_floor, uidnext - 1 FROM folders WHERE id = ?1",
                [folder],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if last > floor {
                tx.execute(
                    "UPDATE folders SET recent_floor = ?2 WHERE id = ?1",
                    rusqlite::params![folder, last],
                )?;
            }
            tx.commit()?;
            Ok(floor)
        })
    }

    fn ensure_folder(
        &self,
        recipient: RecipientId,
        name: &str,
        special_use: Option<&str>,
    ) -> Result<()> {
        match self.create_folder(recipient, name, special_use) {
            Err(StoreError::Conflict(_)) => Ok(()),
            other => other,
        }
    }

    fn delete_folder(&self, recipient: RecipientId, name: &str) -> Result<()> {
        if name.eq_ignore_ascii_case("INBOX") {
            return Err(StoreError::Conflict("INBOX cannot be deleted".into()));
        }
        self.write("mailbox", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let folder = require_folder(&tx, recipient, name)?;
            let bodies: Vec<(i64, i64)> = tx
                .prepare_cached(
                    "SELECT blob_id, COUNT(*) FROM messages WHERE folder_id = ?1 GROUP BY blob_id",
                )?
                .query_map([folder], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<std::result::Result<_, _>>()?;
            tx.execute("DELETE FROM messages WHERE folder_id = ?1", [folder])?;
            tx.execute("DELETE FROM folders WHERE id = ?1", [folder])?;
            for (blob, count) in bodies {
                adjust_blob_refs(&tx, blob, -count)?;
            }
            tx.commit()?;
            Ok(())
        })?;
        self.ring(&[recipient]);
        Ok(())
    }

    fn rename_folder(&self, recipient: RecipientId, from: &str, to: &str) -> Result<()> {
        self.write("mailbox", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let source = require_folder(&tx, recipient, from)?;
            if folder_id(&tx, recipient, to)?.is_some() {
                return Err(StoreError::Conflict(format!("folder {to} exists")));
            }
            if from.eq_ignore_ascii_case("INBOX") {
                // RFC 9051 6.3.6: the messages move to a new folder; INBOX stays, empty.
                let target = insert_folder(&tx, recipient, to, None)?;
                let uids: Vec<(i64, i64)> = tx
                    .prepare_cached(
                        "SELECT id, uid FROM messages WHERE folder_id = ?1 ORDER BY uid",
                    )?
                    .query_map([source], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<std::result::Result<_, _>>()?;
                let mut gone = Vec::with_capacity(uids.len());
                for (id, old_uid) in uids {
                    let (uid, modseq) = next_uid(&tx, target)?;
                    tx.execute(
                        "UPDATE messages SET folder_id = ?2, uid = ?3, modseq = ?4 WHERE id = ?1",
                        params![id, target, uid, modseq],
                    )?;
                    gone.push(old_uid as u32);
                }
                let modseq = bump_modseq(&tx, source)?;
                record_expunged(&tx, source, &gone, modseq)?;
            } else {
                let uidvalidity = next_uidvalidity(&tx, now_ms())?;
                // The folder and its children; each renamed folder gets a new
                // UIDVALIDITY, since its UIDs now live under a name they never had.
                let children: Vec<(i64, String)> = tx
                    .prepare_cached(
                        "SELECT id, name FROM folders WHERE recipient_id = ?1
                         AND (name = ?2 OR substr(name, 1, length(?2) + 1) = ?2 || '/')",
                    )?
                    .query_map(params![recipient, from], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<std::result::Result<_, _>>()?;
                for (i, (id, name)) in children.into_iter().enumerate() {
                    let renamed = format!("{to}{}", &name[from.len()..]);
                    if folder_id(&tx, recipient, &renamed)?.is_some() {
                        return Err(StoreError::Conflict(format!("folder {renamed} exists")));
                    }
                    tx.execute(
                        "UPDATE folders SET name = ?2, uidvalidity = ?3 WHERE id = ?1",
                        params![id, renamed, uidvalidity + i as u32],
                    )?;
                }
            }
            tx.commit()?;
            Ok(())
        })?;
        self.ring(&[recipient]);
        Ok(())
    }

    fn subscribe(&self, recipient: RecipientId, name: &str, subscribed: bool) -> Result<()> {
        self.write("mailbox", |conn| {
            let changed = conn.execute(
                "UPDATE folders SET subscribed = ?3 WHERE recipient_id = ?1 AND name = ?2",
                params![recipient, name, subscribed],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!("folder {name}")));
            }
            Ok(())
        })
    }

    fn folder_messages(&self, recipient: RecipientId, folder: &str) -> Result<Vec<MessageState>> {
        self.with_conn(|conn| {
            let folder = require_folder(conn, recipient, folder)?;
            read_messages(conn, folder)
        })
    }

    fn folder_changes(
        &self,
        recipient: RecipientId,
        folder: &str,
        since: u64,
    ) -> Result<FolderChanges> {
        self.with_conn(|conn| {
            let tx = conn.transaction()?;
            let id = require_folder(&tx, recipient, folder)?;
            let (highest, floor): (i64, i64) = tx
                .prepare_cached("SELECT highestmodseq, vanished_floor FROM folders WHERE id = ?1")?
                .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
            let changed = tx
                .prepare_cached(
                    "SELECT uid, modseq, flags, received_at_ms, size FROM messages
                     WHERE folder_id = ?1 AND modseq > ?2 ORDER BY uid",
                )?
                .query_map(params![id, since as i64], message_state)?
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let uids = tx
                .prepare_cached(
                    "SELECT uid FROM expunged WHERE folder_id = ?1 AND modseq > ?2 ORDER BY uid",
                )?
                .query_map(params![id, since as i64], |r| r.get(0))?
                .collect::<std::result::Result<Vec<u32>, _>>()?;
            tx.commit()?;
            Ok(FolderChanges {
                highestmodseq: highest as u64,
                changed,
                vanished: Vanished {
                    uids,
                    complete: since as i64 >= floor,
                },
            })
        })
    }

    fn vanished(&self, recipient: RecipientId, folder: &str, since: u64) -> Result<Vanished> {
        self.with_conn(|conn| {
            let folder = require_folder(conn, recipient, folder)?;
            let floor: i64 = conn
                .prepare_cached("SELECT vanished_floor FROM folders WHERE id = ?1")?
                .query_row([folder], |r| r.get(0))?;
            let uids = conn
                .prepare_cached(
                    "SELECT uid FROM expunged WHERE folder_id = ?1 AND modseq > ?2 ORDER BY uid",
                )?
                .query_map(params![folder, since as i64], |r| r.get(0))?
                .collect::<std::result::Result<Vec<u32>, _>>()?;
            Ok(Vanished {
                uids,
                complete: since as i64 >= floor,
            })
        })
    }

    fn store_flags(
        &self,
        recipient: RecipientId,
        folder: &str,
        uids: &[u32],
        operation: FlagOperation,
        flags: &[String],
        unchanged_since: Option<u64>,
    ) -> Result<FlagResult> {
        let result = self.write("mailbox", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let folder = require_folder(&tx, recipient, folder)?;
            let mut result = FlagResult::default();
            let mut modseq = None;
            {
                let mut read = tx.prepare_cached(
                    "SELECT flags, modseq, received_at_ms, size FROM messages
                     WHERE folder_id = ?1 AND uid = ?2",
                )?;
                let mut update = tx.prepare_cached(
                    "UPDATE messages SET flags = ?3, modseq = ?4 WHERE folder_id = ?1 AND uid = ?2",
                )?;
                for &uid in uids {
                    let Some((current, old_modseq, date, size)) = read
                        .query_row(params![folder, uid], |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, i64>(1)?,
                                r.get::<_, i64>(2)?,
                                r.get::<_, i64>(3)?,
                            ))
                        })
                        .optional()?
                    else {
                        continue;
                    };
                    if unchanged_since.is_some_and(|since| old_modseq as u64 > since) {
                        result.modified.push(uid);
                        continue;
                    }
                    let current = parse_flags(&current);
                    let has =
                        |set: &[String], f: &str| set.iter().any(|c| c.eq_ignore_ascii_case(f));
                    let next: Vec<String> = match operation {
                        FlagOperation::Replace => flags.to_vec(),
                        FlagOperation::Add => {
                            let mut next = current.clone();
                            next.extend(flags.iter().filter(|f| !has(&current, f)).cloned());
                            next
                        }
                        FlagOperation::Remove => {
                            current.iter().filter(|c| !has(flags, c)).cloned().collect()
                        }
                    };
                    let same = next.len() == current.len() && next.iter().all(|f| has(&current, f));
                    if same && unchanged_since.is_none() {
                        continue;
                    }
                    let m = match modseq {
                        Some(m) => m,
                        None => {
                            let m = bump_modseq(&tx, folder)?;
                            modseq = Some(m);
                            m
                        }
                    };
                    let joined = join_flags(&next);
                    update.execute(params![folder, uid, joined, m])?;
                    result.changed.push(MessageState {
                        uid,
                        modseq: m as u64,
                        flags: parse_flags(&joined),
                        internal_date_ms: date,
                        size: size as u64,
                    });
                }
            }
            tx.commit()?;
            Ok(result)
        })?;
        if !result.changed.is_empty() {
            self.ring(&[recipient]);
        }
        Ok(result)
    }

    fn copy_messages(
        &self,
        recipient: RecipientId,
        from: &str,
        uids: &[u32],
        to: &str,
        remove: bool,
    ) -> Result<Copied> {
        let copied = self.write("mailbox", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let source = require_folder(&tx, recipient, from)?;
            let target = require_folder(&tx, recipient, to)?;
            let mut copied = Copied {
                uidvalidity: uidvalidity_of(&tx, target)?,
                uids: Vec::new(),
            };
            {
                let mut read = tx.prepare_cached(
                    "SELECT blob_id, return_path, received_at_ms, size, flags, trace FROM messages
                     WHERE folder_id = ?1 AND uid = ?2",
                )?;
                let mut insert = tx.prepare_cached(
                    "INSERT INTO messages (folder_id, uid, blob_id, return_path, received_at_ms,
                                           size, flags, modseq, trace)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?;
                for &uid in uids {
                    let Some((blob, return_path, date, size, flags, trace)) = read
                        .query_row(params![source, uid], |r| {
                            Ok((
                                r.get::<_, i64>(0)?,
                                r.get::<_, String>(1)?,
                                r.get::<_, i64>(2)?,
                                r.get::<_, i64>(3)?,
                                r.get::<_, String>(4)?,
                                r.get::<_, i64>(5)?,
                            ))
                        })
                        .optional()?
                    else {
                        continue;
                    };
                    let (new_uid, modseq) = next_uid(&tx, target)?;
                    insert.execute(params![
                        target,
                        new_uid,
                        blob,
                        return_path,
                        date,
                        size,
                        flags,
                        modseq,
                        trace
                    ])?;
                    if remove {
                        tx.execute(
                            "DELETE FROM messages WHERE folder_id = ?1 AND uid = ?2",
                            params![source, uid],
                        )?;
                    } else {
                        adjust_blob_refs(&tx, blob, 1)?;
                    }
                    copied.uids.push((uid, new_uid));
                }
            }
            if remove && !copied.uids.is_empty() {
                let modseq = bump_modseq(&tx, source)?;
                let moved: Vec<u32> = copied.uids.iter().map(|(from, _)| *from).collect();
                record_expunged(&tx, source, &moved, modseq)?;
            }
            tx.commit()?;
            Ok(copied)
        })?;
        self.ring(&[recipient]);
        Ok(copied)
    }

    fn append(
        &self,
        recipient: RecipientId,
        folder: &str,
        flags: &[String],
        internal_date_ms: UnixMillis,
        body: &[u8],
        facts: Option<&crate::MessageFacts>,
    ) -> Result<Copied> {
        // Group commit, as the spool does for SMTP: each APPEND is fsynced before its OK
        // (storage.durability = "full"), so APPENDs that arrive together share one
        // transaction. The request joins a queue; whoever holds the write turn next
        // commits every request queued by then, each under a savepoint of its own (one
        // that fails, e.g. a folder deleted meanwhile, fails alone).
        let slot = std::sync::Arc::new(super::AppendSlot::default());
        self.appends.lock().push(super::PendingAppend {
            recipient,
            folder: folder.to_string(),
            flags: flags.to_vec(),
            internal_date_ms,
            body: body.to_vec(),
            facts: facts.cloned(),
            slot: slot.clone(),
        });
        let mut rung: Vec<RecipientId> = Vec::new();
        let outcome = self.write("append", |conn| {
            if slot.is_filled() {
                // An earlier turn committed this request with its own batch.
                return Ok(());
            }
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Taken once the transaction stands: from here every request taken gets an
            // answer, whatever fails.
            let batch = std::mem::take(&mut *self.appends.lock());
            let appended = (|| -> Result<Vec<Result<Copied>>> {
                let mut results = Vec::with_capacity(batch.len());
                for request in &batch {
                    tx.execute_batch("SAVEPOINT one_append")?;
                    match append_one(
                        &tx,
                        request.recipient,
                        &request.folder,
                        &request.flags,
                        request.internal_date_ms,
                        &request.body,
                        request.facts.as_ref(),
                    ) {
                        Ok(copied) => {
                            tx.execute_batch("RELEASE one_append")?;
                            results.push(Ok(copied));
                        }
                        Err(e) => {
                            tx.execute_batch("ROLLBACK TO one_append; RELEASE one_append")?;
                            results.push(Err(e));
                        }
                    }
                }
                Ok(results)
            })();
            let results = match appended {
                Ok(results) => results,
                Err(e) => {
                    for request in &batch {
                        request.slot.fill(Err(e.same_kind()));
                    }
                    return Err(e);
                }
            };
            match tx.commit() {
                Ok(()) => {
                    for (request, result) in batch.iter().zip(results) {
                        if result.is_ok() {
                            rung.push(request.recipient);
                        }
                        request.slot.fill(result);
                    }
                    Ok(())
                }
                Err(e) => {
                    let e = StoreError::from(e);
                    for request in &batch {
                        request.slot.fill(Err(e.same_kind()));
                    }
                    Err(e)
                }
            }
        });
        rung.sort_unstable();
        rung.dedup();
        self.ring(&rung);
        match slot.take() {
            Some(result) => result,
            // The turn failed before the batch was taken (a connection that could not
            // be opened): this request is still queued; take it back out.
            None => {
                self.appends
                    .lock()
                    .retain(|r| !std::sync::Arc::ptr_eq(&r.slot, &slot));
                Err(outcome
                    .err()
                    .unwrap_or_else(|| StoreError::Conflict("the APPEND was not committed".into())))
            }
        }
    }

    fn append_all(
        &self,
        recipient: RecipientId,
        folder: &str,
        messages: &[crate::NewMessage],
    ) -> Result<Copied> {
        let copied = self.write("append", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut all = Copied::default();
            for message in messages {
                let one = append_one(
                    &tx,
                    recipient,
                    folder,
                    &message.flags,
                    message.internal_date_ms,
                    &message.body,
                    message.facts.as_ref(),
                )?;
                all.uidvalidity = one.uidvalidity;
                all.uids.extend(one.uids);
            }
            tx.commit()?;
            Ok(all)
        })?;
        self.ring(&[recipient]);
        Ok(copied)
    }

    fn messages_raw(
        &self,
        recipient: RecipientId,
        folder: &str,
        uids: &[u32],
        header_only: bool,
    ) -> Result<Vec<(u32, Vec<u8>)>> {
        self.with_conn(|conn| {
            // One read transaction for the whole chunk: a message row and its body are
            // read from the same snapshot, so an expunge committed meanwhile cannot
            // leave a row pointing at a body already deleted.
            let conn = &conn.unchecked_transaction()?;
            let folder = require_folder(conn, recipient, folder)?;
            // The body is read through an incremental blob handle, so a header-only
            // read touches the first pages of a body, not its attachments (bench/imap
            // profile: SQLite's instr() scanning whole bodies was most of a header
            // SEARCH).
            // The rows: one range scan when the UIDs are dense (a SEARCH chunk is a run of
            // the view), else one lookup each. (Point queries were half of a header
            // SEARCH's store time, bench/profile.)
            let mut wanted: Vec<u32> = uids.to_vec();
            wanted.sort_unstable();
            wanted.dedup();
            let mut rows: Vec<(u32, String, bool, i64)> = Vec::with_capacity(wanted.len());
            if let (Some(&first), Some(&last)) = (wanted.first(), wanted.last()) {
                if (last - first) as usize <= wanted.len() * 4 {
                    let mut stmt = conn.prepare_cached(
                        "SELECT uid, return_path, trace, blob_id FROM messages
                         WHERE folder_id = ?1 AND uid BETWEEN ?2 AND ?3 ORDER BY uid",
                    )?;
                    let mut found = stmt.query(params![folder, first, last])?;
                    while let Some(r) = found.next()? {
                        let uid: u32 = r.get(0)?;
                        if wanted.binary_search(&uid).is_ok() {
                            rows.push((uid, r.get(1)?, r.get(2)?, r.get(3)?));
                        }
                    }
                } else {
                    let mut stmt = conn.prepare_cached(
                        "SELECT return_path, trace, blob_id FROM messages
                         WHERE folder_id = ?1 AND uid = ?2",
                    )?;
                    for &uid in &wanted {
                        if let Some((return_path, trace, blob_id)) = stmt
                            .query_row(params![folder, uid], |r| {
                                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                            })
                            .optional()?
                        {
                            rows.push((uid, return_path, trace, blob_id));
                        }
                    }
                }
            }
            let mut blob: Option<rusqlite::blob::Blob<'_>> = None;
            let mut out = Vec::with_capacity(rows.len());
            for (uid, return_path, trace, blob_id) in rows {
                let handle = match &mut blob {
                    Some(b) => {
                        b.reopen(blob_id)?;
                        b
                    }
                    None => blob.insert(conn.blob_open(
                        rusqlite::DatabaseName::Main,
                        "blobs",
                        "data",
                        blob_id,
                        true,
                    )?),
                };
                let data = read_body(handle, header_only)?;
                if trace {
                    let mut bytes = crate::return_path_header(&return_path).into_bytes();
                    bytes.extend_from_slice(&data);
                    out.push((uid, bytes));
                } else {
                    out.push((uid, data));
                }
            }
            Ok(out)
        })
    }

    fn cached_structures(
        &self,
        recipient: RecipientId,
        folder: &str,
        uids: &[u32],
    ) -> Result<std::collections::HashMap<u32, Structure>> {
        self.with_conn(|conn| {
            let folder = require_folder(conn, recipient, folder)?;
            let mut stmt = conn.prepare_cached(
                "SELECT i.envelope, i.bodystructure, i.body FROM messages m
                 JOIN blob_imap i ON i.blob_id = m.blob_id
                 WHERE m.folder_id = ?1 AND m.uid = ?2",
            )?;
            let mut found = std::collections::HashMap::new();
            for &uid in uids {
                if let Some(structure) = stmt
                    .query_row(params![folder, uid], |r| {
                        Ok(Structure {
                            envelope: r.get(0)?,
                            bodystructure: r.get(1)?,
                            body: r.get(2)?,
                        })
                    })
                    .optional()?
                {
                    found.insert(uid, structure);
                }
            }
            Ok(found)
        })
    }

    fn cache_structures(
        &self,
        recipient: RecipientId,
        folder: &str,
        structures: &[(u32, Structure)],
    ) -> Result<()> {
        if structures.is_empty() {
            return Ok(());
        }
        self.write("imap-cache", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let folder = require_folder(&tx, recipient, folder)?;
            {
                let mut put = tx.prepare_cached(
                    "INSERT OR IGNORE INTO blob_imap (blob_id, envelope, bodystructure, body)
                     SELECT blob_id, ?3, ?4, ?5 FROM messages WHERE folder_id = ?1 AND uid = ?2",
                )?;
                for (uid, s) in structures {
                    put.execute(params![folder, uid, s.envelope, s.bodystructure, s.body])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn cached_search_fields(
        &self,
        recipient: RecipientId,
        folder: &str,
        uids: &[u32],
    ) -> Result<std::collections::HashMap<u32, Vec<u8>>> {
        self.with_conn(|conn| {
            let folder = require_folder(conn, recipient, folder)?;
            let mut found = std::collections::HashMap::with_capacity(uids.len());
            let (Some(&first), Some(&last)) = (uids.iter().min(), uids.iter().max()) else {
                return Ok(found);
            };
            // A SEARCH chunk is a run of the view: one range scan, filtered.
            let wanted: std::collections::HashSet<u32> = uids.iter().copied().collect();
            let mut stmt = conn.prepare_cached(
                "SELECT m.uid, s.fields FROM messages m
                 JOIN blob_search s ON s.blob_id = m.blob_id
                 WHERE m.folder_id = ?1 AND m.uid BETWEEN ?2 AND ?3",
            )?;
            let mut rows = stmt.query(params![folder, first, last])?;
            while let Some(r) = rows.next()? {
                let uid: u32 = r.get(0)?;
                if wanted.contains(&uid) {
                    found.insert(uid, r.get(1)?);
                }
            }
            Ok(found)
        })
    }

    fn cache_search_fields(
        &self,
        recipient: RecipientId,
        folder: &str,
        fields: &[(u32, Vec<u8>)],
    ) -> Result<()> {
        if fields.is_empty() {
            return Ok(());
        }
        self.write("imap-cache", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let folder = require_folder(&tx, recipient, folder)?;
            {
                let mut put = tx.prepare_cached(
                    "INSERT OR IGNORE INTO blob_search (blob_id, fields)
                     SELECT blob_id, ?3 FROM messages WHERE folder_id = ?1 AND uid = ?2",
                )?;
                for (uid, bytes) in fields {
                    put.execute(params![folder, uid, bytes])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn mailbox_bytes(&self, recipient: RecipientId) -> Result<u64> {
        self.with_conn(|conn| {
            // Each folder's `bytes` is kept by triggers (schema 14): a sum over the
            // recipient's folders, not over every message.
            Ok(conn
                .prepare_cached(
                    "SELECT COALESCE(SUM(bytes), 0) FROM folders WHERE recipient_id = ?1",
                )?
                .query_row([recipient], |r| r.get::<_, i64>(0))? as u64)
        })
    }

    fn watch_mailbox(&self, recipient: RecipientId) -> tokio::sync::watch::Receiver<u64> {
        let mut bells = self.bells.lock();
        bells
            .entry(recipient)
            .or_insert_with(|| tokio::sync::watch::channel(0).0)
            .subscribe()
    }
}

/// One APPEND inside a transaction (a group commit, or MULTIAPPEND's all-or-none).
#[allow(clippy::too_many_arguments)]
fn append_one(
    tx: &rusqlite::Transaction<'_>,
    recipient: RecipientId,
    folder: &str,
    flags: &[String],
    internal_date_ms: UnixMillis,
    body: &[u8],
    facts: Option<&crate::MessageFacts>,
) -> Result<Copied> {
    let folder = require_folder(tx, recipient, folder)?;
    let blob = put_blob(tx, body)?;
    if let Some(facts) = facts {
        let facts = serde_json::to_string(facts).expect("facts serialise");
        tx.prepare_cached("INSERT OR IGNORE INTO blob_facts (blob_id, facts) VALUES (?1, ?2)")?
            .execute(params![blob, facts])?;
    }
    let (uid, modseq) = next_uid(tx, folder)?;
    // trace = 0: an APPENDed message brings its own headers, and `message_raw` prepends
    // no Return-Path to it.
    tx.execute(
        "INSERT INTO messages (folder_id, uid, blob_id, return_path, received_at_ms, size,
                               flags, modseq, trace)
         VALUES (?1, ?2, ?3, '', ?4, ?5, ?6, ?7, 0)",
        params![
            folder,
            uid,
            blob,
            internal_date_ms,
            body.len() as i64,
            join_flags(flags),
            modseq
        ],
    )?;
    Ok(Copied {
        uidvalidity: uidvalidity_of(tx, folder)?,
        uids: vec![(0, uid)],
    })
}
