//! Online backup and restore of the database.
//!
//! Why SQLite's online backup API rather than copying files: a copy of `mailroom.db`
//! while the server writes is torn (the WAL holds the newest pages; the file may be
//! mid-checkpoint). The backup API copies every page in one step inside one read
//! transaction, so the copy is the database exactly as it was at one commit, while
//! writers go on (in WAL mode a reader never blocks a writer). `VACUUM INTO` would do
//! the same but cannot run inside the transaction that also reads the manifest's counts.

use super::SqliteStore;
use crate::migrations::SCHEMA_VERSION;
use crate::{Result, StoreError};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The database file's name inside a backup folder.
pub const BACKUP_DATABASE: &str = "mailroom.db";
/// The manifest's name inside a backup folder.
pub const BACKUP_MANIFEST: &str = "backup.json";

/// What a backup holds, written next to it as `backup.json` and checked at restore.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackupManifest {
    /// When the copy was taken (Unix ms).
    pub taken_at_ms: i64,
    /// The schema version of the copy.
    pub schema_version: i64,
    /// Messages in mailboxes.
    pub messages: u64,
    /// Folders.
    pub folders: u64,
    /// Recipients (mailboxes, contacts, lists).
    pub recipients: u64,
    /// Queue entries (inbound, outbound, quarantine, undeliverable).
    pub queue_entries: u64,
    /// Bytes of the database file.
    pub bytes: u64,
}

fn counts(conn: &Connection) -> Result<(i64, u64, u64, u64, u64)> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let count = |table: &str| -> Result<u64> {
        Ok(
            conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
                r.get::<_, i64>(0)
            })? as u64,
        )
    };
    Ok((
        version,
        count("messages")?,
        count("folders")?,
        count("recipients")?,
        count("queue_items")?,
    ))
}

/// Makes `path` (a file or a folder) durable: its contents reach the disk.
fn sync_path(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::Conflict(format!("cannot sync {}: {e}", path.display())))
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Conflict(format!("cannot {what} {}: {e}", path.display()))
}

impl SqliteStore {
    /// Copies the database, as of one moment, into `dir` (created; must be empty),
    /// with a manifest. Mail keeps flowing meanwhile.
    pub fn backup_to(&self, dir: &Path) -> Result<BackupManifest> {
        prepare_empty_dir(dir)?;
        let target = dir.join(BACKUP_DATABASE);
        let partial = dir.join(format!("{BACKUP_DATABASE}.partial"));
        let source = self.checkout()?;
        {
            let mut copy = Connection::open(&partial)?;
            copy_all(&source, &mut copy)?;
        }
        self.checkin(source);
        let copy = Connection::open(&partial)?;
        let check: String = copy.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(StoreError::Conflict(format!(
                "the backup copy fails its integrity check: {check}"
            )));
        }
        let (schema_version, messages, folders, recipients, queue_entries) = counts(&copy)?;
        drop(copy);
        sync_path(&partial)?;
        std::fs::rename(&partial, &target).map_err(|e| io("rename", &partial, e))?;
        let manifest = BackupManifest {
            taken_at_ms: mailroom_watch::now_ms(),
            schema_version,
            messages,
            folders,
            recipients,
            queue_entries,
            bytes: std::fs::metadata(&target)
                .map_err(|e| io("read", &target, e))?
                .len(),
        };
        let manifest_path = dir.join(BACKUP_MANIFEST);
        std::fs::write(
            &manifest_path,
            serde_json::to_vec_pretty(&manifest).expect("a manifest serializes"),
        )
        .map_err(|e| io("write", &manifest_path, e))?;
        sync_path(&manifest_path)?;
        sync_path(dir)?;
        Ok(manifest)
    }

    /// Brings a backup folder back as the database `database` (which must not exist).
    /// Checks the copy's integrity and that this binary can read its schema first; the
    /// server migrates an older schema at its next start.
    pub fn restore_from(backup: &Path, database: &Path) -> Result<BackupManifest> {
        let manifest_path = backup.join(BACKUP_MANIFEST);
        let manifest: BackupManifest = serde_json::from_slice(
            &std::fs::read(&manifest_path).map_err(|e| io("read", &manifest_path, e))?,
        )
        .map_err(|e| {
            StoreError::Conflict(format!(
                "{} is not a backup manifest: {e}",
                manifest_path.display()
            ))
        })?;
        let source_path = backup.join(BACKUP_DATABASE);
        if database.exists() {
            return Err(StoreError::Conflict(format!(
                "{} exists; restore only into an empty data folder",
                database.display()
            )));
        }
        let source =
            Connection::open_with_flags(&source_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let check: String = source.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(StoreError::Conflict(format!(
                "the backup {} fails its integrity check: {check}",
                source_path.display()
            )));
        }
        let found = counts(&source)?;
        if found.0 > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: found.0,
                supported: SCHEMA_VERSION,
            });
        }
        if (found.0, found.1, found.2, found.3, found.4)
            != (
                manifest.schema_version,
                manifest.messages,
                manifest.folders,
                manifest.recipients,
                manifest.queue_entries,
            )
        {
            return Err(StoreError::Conflict(format!(
                "the backup's database does not match its manifest (found {found:?})"
            )));
        }
        let partial = database.with_extension("db.restoring");
        {
            let mut copy = Connection::open(&partial)?;
            copy_all(&source, &mut copy)?;
        }
        sync_path(&partial)?;
        std::fs::rename(&partial, database).map_err(|e| io("rename", &partial, e))?;
        if let Some(parent) = database.parent() {
            sync_path(parent)?;
        }
        Ok(manifest)
    }
}

/// Copies every page of `source` into `target` in one step: one read transaction, so
/// one consistent moment (a step of fewer pages would restart whenever a writer commits
/// in between).
fn copy_all(source: &Connection, target: &mut Connection) -> Result<()> {
    use rusqlite::backup::StepResult;
    let backup = rusqlite::backup::Backup::new(source, target)?;
    loop {
        match backup.step(-1)? {
            StepResult::Done => return Ok(()),
            StepResult::More => {}
            // Busy or locked: the target or a checkpoint holds a lock for a moment.
            _ => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

fn prepare_empty_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
    let mut entries = std::fs::read_dir(dir).map_err(|e| io("read", dir, e))?;
    if entries.next().is_some() {
        return Err(StoreError::Conflict(format!(
            "{} is not empty; back up into a new folder",
            dir.display()
        )));
    }
    Ok(())
}
