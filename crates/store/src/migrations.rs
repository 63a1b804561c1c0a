//! Versioned schema migrations, applied in order at start-up.
//!
//! Why versioned: an upgrade must never break a data folder. Each entry moves the schema
//! from version N-1 to N inside one transaction; `PRAGMA user_version` records where a
//! database stands. Entries are append-only: never edit one that has shipped.

use crate::{Result, StoreError};
use rusqlite::Connection;

/// The migrations, index 0 takes the schema to version 1.
const MIGRATIONS: &[&str] = &[
    // Version 1: spool and queues, bodies, directory, mailboxes.
    r#"
    CREATE TABLE blobs (
        id INTEGER PRIMARY KEY,
        hash BLOB NOT NULL UNIQUE,
        refcount INTEGER NOT NULL CHECK (refcount >= 0),
        size INTEGER NOT NULL,
        data BLOB NOT NULL
    );
    CREATE TABLE blob_facts (
        blob_id INTEGER PRIMARY KEY REFERENCES blobs(id) ON DELETE CASCADE,
        facts TEXT NOT NULL
    );
    CREATE TABLE queue_items (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        queue_id TEXT NOT NULL,
        blob_id INTEGER NOT NULL REFERENCES blobs(id),
        mail_from TEXT NOT NULL,
        recipients TEXT NOT NULL,
        received_at_ms INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at_ms INTEGER NOT NULL,
        claimed INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        client TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX queue_items_due ON queue_items(queue, claimed, next_attempt_at_ms, id);
    CREATE TABLE recipients (
        id INTEGER PRIMARY KEY,
        alias TEXT NOT NULL UNIQUE COLLATE NOCASE,
        display_name TEXT NOT NULL,
        password_hash TEXT
    );
    CREATE TABLE recipient_addresses (
        address TEXT PRIMARY KEY COLLATE NOCASE,
        recipient_id INTEGER NOT NULL REFERENCES recipients(id) ON DELETE CASCADE,
        is_primary INTEGER NOT NULL
    );
    CREATE INDEX recipient_addresses_recipient ON recipient_addresses(recipient_id);
    CREATE TABLE folders (
        id INTEGER PRIMARY KEY,
        recipient_id INTEGER NOT NULL REFERENCES recipients(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        uidvalidity INTEGER NOT NULL,
        uidnext INTEGER NOT NULL DEFAULT 1,
        UNIQUE (recipient_id, name)
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        folder_id INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
        uid INTEGER NOT NULL,
        blob_id INTEGER NOT NULL REFERENCES blobs(id),
        return_path TEXT NOT NULL,
        received_at_ms INTEGER NOT NULL,
        size INTEGER NOT NULL,
        flags TEXT NOT NULL DEFAULT '',
        UNIQUE (folder_id, uid)
    );
    "#,
    // Version 2: the organization, site and server this data folder belongs to.
    r#"
    CREATE TABLE topology (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        organization TEXT NOT NULL,
        site TEXT NOT NULL,
        server TEXT NOT NULL
    );
    "#,
    // Version 3: the full directory (kinds, documents, generated addresses, site
    // settings) and routed outbound entries.
    r#"
    ALTER TABLE recipients ADD COLUMN kind TEXT NOT NULL DEFAULT 'mailbox';
    ALTER TABLE recipients ADD COLUMN doc TEXT NOT NULL DEFAULT '';
    ALTER TABLE recipient_addresses ADD COLUMN generated INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE directory_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    ALTER TABLE queue_items ADD COLUMN connector TEXT;
    ALTER TABLE queue_items ADD COLUMN generation INTEGER;
    "#,
    // Version 4: mailbox access (IMAP, POP3): modification sequences per folder and
    // message, subscriptions, special-use folders, and whether a Return-Path is prepended
    // at fetch (`trace`: 0 for APPENDed messages), and IMAP's ENVELOPE / BODYSTRUCTURE /
    // BODY per body (computed at first FETCH, shared by every copy).
    r#"
    ALTER TABLE folders ADD COLUMN highestmodseq INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE folders ADD COLUMN subscribed INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE folders ADD COLUMN special_use TEXT;
    ALTER TABLE messages ADD COLUMN modseq INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE messages ADD COLUMN trace INTEGER NOT NULL DEFAULT 1;
    CREATE TABLE blob_imap (
        blob_id INTEGER PRIMARY KEY REFERENCES blobs(id) ON DELETE CASCADE,
        envelope BLOB NOT NULL,
        bodystructure BLOB NOT NULL,
        body BLOB NOT NULL
    );
    "#,
    // Version 5: indexes on the columns that reference a body. With foreign keys on,
    // deleting a body makes SQLite look for rows still referring to it; without these
    // indexes each body deleted (a recipient deleted, a message expunged, a queue entry
    // delivered to nobody) scanned every message and queue entry, inside the write turn.
    r#"
    CREATE INDEX messages_blob ON messages(blob_id);
    CREATE INDEX queue_items_blob ON queue_items(blob_id);
    "#,
    // Version 6: outbound delivery. `envelope` holds the DSN parameters given at MAIL
    // and RCPT and, for outbound entries, each recipient's state (JSON, see
    // `outbound::Envelope`); `held` is an administrator's hold.
    r#"
    ALTER TABLE queue_items ADD COLUMN envelope TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE queue_items ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
    "#,
    // Version 7: IMAP4rev1's \Recent (RFC 3501 2.3.2). A message is recent to the first
    // session that selects its folder after it arrived: UIDs above `recent_floor` are
    // recent, and a read-write SELECT raises the floor to the last UID. Messages already
    // stored count as seen before.
    r#"
    ALTER TABLE folders ADD COLUMN recent_floor INTEGER NOT NULL DEFAULT 0;
    UPDATE folders SET recent_floor = uidnext - 1;
    "#,
    // Version 8: the ENVELOPE / BODYSTRUCTURE cache is recomputed at the next FETCH:
    // earlier builds put decoded UTF-8 display names in ENVELOPE and stripped the angle
    // brackets of Content-ID in BODYSTRUCTURE.
    r#"
    DELETE FROM blob_imap;
    "#,
    // Version 9: the highest UIDVALIDITY ever handed out. It was taken from the folders
    // that exist, so deleting a folder and re-creating it within the same second gave
    // the new one the old one's UIDVALIDITY, and a client's cached UIDs named other
    // messages (RFC 9051 2.3.1.1).
    r#"
    CREATE TABLE store_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO store_counters (name, value)
        SELECT 'uidvalidity', COALESCE(MAX(uidvalidity), 0) FROM folders;
    "#,
    // Version 10 (also drops the cached IMAP structures, see the end): QRESYNC (RFC 7162
    // 3.2) needs the UIDs expunged since a MODSEQ: each expunge (EXPUNGE, MOVE, POP3
    // deletion, INBOX renamed) leaves the UID with the MODSEQ of its expunge; the same
    // records let an IMAP session catch up with a folder by what changed since its MODSEQ
    // instead of reading every message (indexes on MODSEQ). `expunged_count` says when
    // to prune. `vanished_floor`: expunges at or below it may not be recorded (before
    // this version, or pruned); a client resyncing from below it is told every UID it
    // knows that is no longer there.
    r#"
    CREATE TABLE expunged (
        folder_id INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
        uid INTEGER NOT NULL,
        modseq INTEGER NOT NULL,
        PRIMARY KEY (folder_id, uid)
    ) WITHOUT ROWID;
    ALTER TABLE folders ADD COLUMN vanished_floor INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE folders ADD COLUMN expunged_count INTEGER NOT NULL DEFAULT 0;
    UPDATE folders SET vanished_floor = highestmodseq;
    -- A session brings its view up to date with what changed since its MODSEQ.
    CREATE INDEX expunged_modseq ON expunged(folder_id, modseq);
    CREATE INDEX messages_modseq ON messages(folder_id, modseq);
    -- ENVELOPE changed (a quoted local part, a source route): cached structures are
    -- computed again at the next FETCH.
    DELETE FROM blob_imap;
    "#,
    // Version 11: IMAP SEARCH on the common header fields (Subject, From, To, Cc, Bcc,
    // the Date's day) answered from a per-body cache instead of reading and parsing
    // every message's header for every search. The bytes are the IMAP layer's encoding;
    // rows are written at a body's first search and go with the body.
    r#"
    CREATE TABLE blob_search (
        blob_id INTEGER PRIMARY KEY REFERENCES blobs(id) ON DELETE CASCADE,
        fields BLOB NOT NULL
    );
    "#,
    // Version 12: the directory moves to its own database file (`directory.db`, see
    // `DIRECTORY_MIGRATIONS`), so that directory work never takes the write turn mail
    // needs. Before this step runs, `move_directory` has copied the directory's tables
    // into that file; here they leave the mail database. `folders` is rebuilt without
    // its foreign key to `recipients` (SQLite cannot drop a constraint; this is its
    // documented table rebuild, run with foreign keys off so that dropping the old
    // table deletes nothing). `purged_recipients`: recipients whose mailboxes were
    // purged after the directory deleted them; no folder is created for them again.
    r#"
    CREATE TABLE folders_split (
        id INTEGER PRIMARY KEY,
        recipient_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        uidvalidity INTEGER NOT NULL,
        uidnext INTEGER NOT NULL DEFAULT 1,
        highestmodseq INTEGER NOT NULL DEFAULT 1,
        subscribed INTEGER NOT NULL DEFAULT 1,
        special_use TEXT,
        recent_floor INTEGER NOT NULL DEFAULT 0,
        vanished_floor INTEGER NOT NULL DEFAULT 0,
        expunged_count INTEGER NOT NULL DEFAULT 0,
        UNIQUE (recipient_id, name)
    );
    INSERT INTO folders_split (id, recipient_id, name, uidvalidity, uidnext, highestmodseq,
                               subscribed, special_use, recent_floor, vanished_floor,
                               expunged_count)
        SELECT id, recipient_id, name, uidvalidity, uidnext, highestmodseq, subscribed,
               special_use, recent_floor, vanished_floor, expunged_count
        FROM folders;
    DROP TABLE folders;
    ALTER TABLE folders_split RENAME TO folders;
    DROP TABLE recipient_addresses;
    DROP TABLE recipients;
    DROP TABLE directory_settings;
    DROP TABLE topology;
    CREATE TABLE purged_recipients (id INTEGER PRIMARY KEY);
    "#,
    // Version 13: a covering index for a folder's message states (SELECT, STATUS, a
    // POP3 maildrop). Without it every message listed or counted was a lookup into the
    // table by rowid, and a folder's rows lie scattered among every other folder's
    // (deliveries interleave): a POP3 login or IMAP SELECT of a few thousand messages
    // cost tens of milliseconds of CPU, growing with the mailbox (the churn profile).
    // With it they read one contiguous run of the index.
    r#"
    CREATE INDEX messages_state
        ON messages(folder_id, uid, modseq, flags, received_at_ms, size);
    "#,
    // Version 14: each folder's total message size, kept by triggers in the same
    // transaction as every change to `messages` (whatever code path makes it). A
    // recipient with a hard quota cost a sum over every message of the mailbox at each
    // RCPT and each delivery: ingestion into a 100,000-message mailbox with a quota
    // slowed with its size. Now it is a sum over the recipient's folders.
    r#"
    ALTER TABLE folders ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
    UPDATE folders SET bytes =
        (SELECT COALESCE(SUM(size), 0) FROM messages WHERE folder_id = folders.id);
    CREATE TRIGGER messages_bytes_insert AFTER INSERT ON messages BEGIN
        UPDATE folders SET bytes = bytes + NEW.size WHERE id = NEW.folder_id;
    END;
    CREATE TRIGGER messages_bytes_delete AFTER DELETE ON messages BEGIN
        UPDATE folders SET bytes = bytes - OLD.size WHERE id = OLD.folder_id;
    END;
    CREATE TRIGGER messages_bytes_update AFTER UPDATE OF folder_id, size ON messages BEGIN
        UPDATE folders SET bytes = bytes - OLD.size WHERE id = OLD.folder_id;
        UPDATE folders SET bytes = bytes + NEW.size WHERE id = NEW.folder_id;
    END;
    "#,
    // Version 15: message tracking (`mailroom track`). Each row is one event of a
    // message's trail, written in the same transaction as the step it records. Rows
    // are appended in time order, so the rowid doubles as the time index (retention
    // prunes from the lowest id; `--since` scans from the highest). The Message-ID and
    // sender are stored on the "received" event only; a query fills them in for the
    // rest of the trail.
    r#"
    CREATE TABLE track_events (
        id INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        queue_id TEXT NOT NULL,
        event TEXT NOT NULL,
        message_id TEXT,
        sender TEXT,
        recipients TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX track_events_queue ON track_events(queue_id);
    CREATE INDEX track_events_message_id ON track_events(message_id)
        WHERE message_id IS NOT NULL;
    "#,
    // Version 16: each folder's message and unseen counts, kept by the same triggers
    // that keep its size (these replace schema 14's). A POP3 login, an IMAP SELECT and
    // every LIST/STATUS counted them by scanning the folder's messages (the unseen
    // count with a LIKE per row): on a 150,000-message INBOX a POP3 login cost 170-220
    // ms of CPU, and the churn stress's readers, which log in to mailboxes that grow
    // with the load, took up to 40% of the machine. The flags test is the one the scan
    // used (case-insensitive, space-separated); an update that changes neither folder,
    // size nor seen-ness (a \Flagged, a keyword) leaves the folder row alone.
    r#"
    ALTER TABLE folders ADD COLUMN message_count INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE folders ADD COLUMN unseen_count INTEGER NOT NULL DEFAULT 0;
    UPDATE folders SET
        message_count = (SELECT COUNT(*) FROM messages m WHERE m.folder_id = folders.id),
        unseen_count = (SELECT COUNT(*) FROM messages m WHERE m.folder_id = folders.id
            AND (' ' || m.flags || ' ') NOT LIKE '% \Seen %'),
        bytes = (SELECT COALESCE(SUM(m.size), 0) FROM messages m
            WHERE m.folder_id = folders.id);
    DROP TRIGGER messages_bytes_insert;
    DROP TRIGGER messages_bytes_delete;
    DROP TRIGGER messages_bytes_update;
    CREATE TRIGGER messages_counts_insert AFTER INSERT ON messages BEGIN
        UPDATE folders SET bytes = bytes + NEW.size, message_count = message_count + 1,
            unseen_count = unseen_count + ((' ' || NEW.flags || ' ') NOT LIKE '% \Seen %')
        WHERE id = NEW.folder_id;
    END;
    CREATE TRIGGER messages_counts_delete AFTER DELETE ON messages BEGIN
        UPDATE folders SET bytes = bytes - OLD.size, message_count = message_count - 1,
            unseen_count = unseen_count - ((' ' || OLD.flags || ' ') NOT LIKE '% \Seen %')
        WHERE id = OLD.folder_id;
    END;
    CREATE TRIGGER messages_counts_update AFTER UPDATE OF folder_id, size, flags ON messages
    WHEN OLD.folder_id IS NOT NEW.folder_id OR OLD.size IS NOT NEW.size
        OR ((' ' || OLD.flags || ' ') NOT LIKE '% \Seen %')
            IS NOT ((' ' || NEW.flags || ' ') NOT LIKE '% \Seen %')
    BEGIN
        UPDATE folders SET bytes = bytes - OLD.size, message_count = message_count - 1,
            unseen_count = unseen_count - ((' ' || OLD.flags || ' ') NOT LIKE '% \Seen %')
        WHERE id = OLD.folder_id;
        UPDATE folders SET bytes = bytes + NEW.size, message_count = message_count + 1,
            unseen_count = unseen_count + ((' ' || NEW.flags || ' ') NOT LIKE '% \Seen %')
        WHERE id = NEW.folder_id;
    END;
    "#,
    // Version 17: tracking's Message-ID index is kept in the background, in batches
    // (`track_message_ids`, filled up to the event id in `store_counters`
    // 'track_indexed_upto'; a query searches the index and scans the few events past
    // it). Why: Message-IDs are random, so indexing each with its `received` event
    // dirtied a random leaf page of the index in every spool commit: 5 of the 21 WAL
    // frames of an average commit during ingestion (docs/benchmarks.md, eleventh
    // session of issue 16), each written and fsynced while SMTP clients waited.
    r#"
    CREATE TABLE track_message_ids (
        message_id TEXT NOT NULL,
        event_id INTEGER NOT NULL,
        PRIMARY KEY (message_id, event_id)
    ) WITHOUT ROWID;
    INSERT INTO track_message_ids (message_id, event_id)
        SELECT message_id, id FROM track_events WHERE message_id IS NOT NULL;
    INSERT OR REPLACE INTO store_counters (name, value)
        VALUES ('track_indexed_upto', COALESCE((SELECT max(id) FROM track_events), 0));
    DROP INDEX track_events_message_id;
    "#,
];

/// The mail database's version that moves the directory out (see `move_directory`).
pub const SPLIT_VERSION: i64 = 12;

/// The directory database's migrations (its own `user_version`), index 0 to version 1.
const DIRECTORY_MIGRATIONS: &[&str] = &[
    // Version 1: the directory as the mail database held it up to its version 11, and
    // `deleted_recipients`: every recipient ever deleted, with whether its mailboxes
    // were purged from the mail database yet (identities are never reused).
    r#"
    CREATE TABLE recipients (
        id INTEGER PRIMARY KEY,
        alias TEXT NOT NULL UNIQUE COLLATE NOCASE,
        display_name TEXT NOT NULL,
        password_hash TEXT,
        kind TEXT NOT NULL DEFAULT 'mailbox',
        doc TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE recipient_addresses (
        address TEXT PRIMARY KEY COLLATE NOCASE,
        recipient_id INTEGER NOT NULL REFERENCES recipients(id) ON DELETE CASCADE,
        is_primary INTEGER NOT NULL,
        generated INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX recipient_addresses_recipient ON recipient_addresses(recipient_id);
    CREATE TABLE directory_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE topology (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        organization TEXT NOT NULL,
        site TEXT NOT NULL,
        server TEXT NOT NULL
    );
    CREATE TABLE deleted_recipients (
        id INTEGER PRIMARY KEY,
        purged INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX deleted_recipients_unpurged ON deleted_recipients(id) WHERE purged = 0;
    "#,
];

/// The newest directory schema version this binary knows.
pub const DIRECTORY_SCHEMA_VERSION: i64 = DIRECTORY_MIGRATIONS.len() as i64;

/// Brings the directory database to [`DIRECTORY_SCHEMA_VERSION`].
pub fn migrate_directory(conn: &mut Connection) -> Result<()> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > DIRECTORY_SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported: DIRECTORY_SCHEMA_VERSION,
        });
    }
    for (index, sql) in DIRECTORY_MIGRATIONS
        .iter()
        .enumerate()
        .skip(current as usize)
    {
        let version = index as i64 + 1;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        tracing::info!(version, "applied directory schema migration");
    }
    Ok(())
}

/// Copies the directory's tables from a mail database at a version before
/// [`SPLIT_VERSION`] (at `mail`) into the directory database, replacing what it holds,
/// in one transaction. Idempotent: if the process dies before the mail database's
/// split step commits, the next start copies again.
pub fn move_directory(directory: &mut Connection, mail: &std::path::Path) -> Result<()> {
    directory.execute(
        "ATTACH DATABASE ?1 AS premove",
        [mail.to_string_lossy().as_ref()],
    )?;
    let copied = (|| -> Result<i64> {
        let tx = directory.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
        tx.execute_batch(
            "DELETE FROM main.recipient_addresses;
             DELETE FROM main.recipients;
             DELETE FROM main.directory_settings;
             DELETE FROM main.topology;
             INSERT INTO main.recipients (id, alias, display_name, password_hash, kind, doc)
                 SELECT id, alias, display_name, password_hash, kind, doc FROM premove.recipients;
             INSERT INTO main.recipient_addresses (address, recipient_id, is_primary, generated)
                 SELECT address, recipient_id, is_primary, generated
                 FROM premove.recipient_addresses;
             INSERT INTO main.directory_settings (key, value)
                 SELECT key, value FROM premove.directory_settings;
             INSERT INTO main.topology (id, organization, site, server)
                 SELECT id, organization, site, server FROM premove.topology;",
        )?;
        let count: i64 = tx.query_row("SELECT count(*) FROM main.recipients", [], |r| r.get(0))?;
        tx.commit()?;
        Ok(count)
    })();
    directory.execute("DETACH DATABASE premove", [])?;
    let count = copied?;
    if count > 0 {
        tracing::info!(
            recipients = count,
            "moved the directory into its own database file"
        );
    }
    Ok(())
}

/// The newest schema version this binary knows.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Version 4 was edited twice after builds that wrote it had shipped (the upgrade
/// fixtures `schema-4a` and `schema-4b` hold such databases): the first lacked
/// `messages.trace` and `blob_imap`, the second only `blob_imap`. Databases at version 4
/// or later get what they lack, idempotently, in one transaction. (The rule in the
/// module comment exists because of this: never edit a shipped migration.)
fn repair_version_4(conn: &mut Connection) -> Result<()> {
    let has_trace = conn
        .prepare("SELECT 1 FROM pragma_table_info('messages') WHERE name = 'trace'")?
        .exists([])?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
    if !has_trace {
        // Written before IMAP APPEND existed: every message came by delivery (trace 1).
        tx.execute_batch("ALTER TABLE messages ADD COLUMN trace INTEGER NOT NULL DEFAULT 1;")?;
        tracing::info!("repaired schema version 4: added messages.trace");
    }
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS blob_imap (
            blob_id INTEGER PRIMARY KEY REFERENCES blobs(id) ON DELETE CASCADE,
            envelope BLOB NOT NULL,
            bodystructure BLOB NOT NULL,
            body BLOB NOT NULL
        );",
    )?;
    tx.commit()?;
    Ok(())
}

/// Brings the database to [`SCHEMA_VERSION`], one transaction per step; `before` runs
/// before each step is applied, with its version (the split copies the directory out).
/// Foreign keys are off during the steps (a table rebuild must not cascade) and checked
/// after them.
pub fn migrate(
    conn: &mut Connection,
    mut before: impl FnMut(i64, &mut Connection) -> Result<()>,
) -> Result<()> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    if (4..SPLIT_VERSION).contains(&current) {
        repair_version_4(conn)?;
    }
    if current == SCHEMA_VERSION {
        return Ok(());
    }
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    let applied = (|| -> Result<()> {
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let version = index as i64 + 1;
            before(version, conn)?;
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()?;
            tracing::info!(version, "applied schema migration");
        }
        Ok(())
    })();
    conn.pragma_update(None, "foreign_keys", "ON")?;
    applied?;
    let violations: i64 =
        conn.query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| {
            r.get(0)
        })?;
    if violations > 0 {
        tracing::warn!(
            violations,
            "the migrated database has rows that refer to rows that do not exist"
        );
    }
    Ok(())
}
