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
];

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

/// Brings the database to [`SCHEMA_VERSION`], one transaction per step.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    if current >= 4 {
        repair_version_4(conn)?;
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = index as i64 + 1;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        tracing::info!(version, "applied schema migration");
    }
    Ok(())
}
