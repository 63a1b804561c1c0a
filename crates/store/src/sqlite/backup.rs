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

/// The mail database file's name inside a backup folder (and in the data folder).
pub const BACKUP_DATABASE: &str = "mailroom.db";
/// The directory database file's name inside a backup folder (and in the data folder).
/// Backups from before the split have none: their directory is inside the mail database
/// and moves out at the first start after the restore.
pub const BACKUP_DIRECTORY: &str = "directory.db";
/// The manifest's name inside a backup folder.
pub const BACKUP_MANIFEST: &str = "backup.json";

/// What a backup holds, written next to it as `backup.json` and checked at restore.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackupManifest {
    /// When the copy was taken (Unix ms).
    pub taken_at_ms: i64,
    /// The schema version of the mail database's copy.
    pub schema_version: i64,
    /// Messages in mailboxes.
    pub messages: u64,
    /// Folders.
    pub folders: u64,
    /// Recipients (mailboxes, contacts, lists).
    pub recipients: u64,
    /// Queue entries (inbound, outbound, quarantine, undeliverable).
    pub queue_entries: u64,
    /// Bytes of the database files.
    pub bytes: u64,
}

/// Rows in `table`, 0 when the table does not exist (a directory table in a mail
/// database after the split).
fn count(conn: &Connection, table: &str) -> Result<u64> {
    let exists = conn
        .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")?
        .exists([table])?;
    if !exists {
        return Ok(0);
    }
    Ok(
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
            r.get::<_, i64>(0)
        })? as u64,
    )
}

/// Schema version, messages, folders, recipients and queue entries of a backup's mail
/// database and (when it has one) directory database.
fn counts(mail: &Connection, directory: Option<&Connection>) -> Result<(i64, u64, u64, u64, u64)> {
    let version: i64 = mail.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let recipients = match directory {
        Some(directory) => count(directory, "recipients")?,
        None => count(mail, "recipients")?,
    };
    Ok((
        version,
        count(mail, "messages")?,
        count(mail, "folders")?,
        recipients,
        count(mail, "queue_items")?,
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

/// Checks a copy's integrity.
fn quick_check(copy: &Connection, what: &str) -> Result<()> {
    let check: String = copy.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(StoreError::Conflict(format!(
            "{what} fails its integrity check: {check}"
        )));
    }
    Ok(())
}

impl SqliteStore {
    /// Copies `db` as of one moment into `partial`, checks the copy and syncs it.
    fn copy_db(&self, db: &super::Db, partial: &Path) -> Result<()> {
        let source = self.checkout(db)?;
        {
            let mut copy = Connection::open(partial)?;
            copy_all(&source, &mut copy)?;
        }
        self.checkin(db, source);
        quick_check(&Connection::open(partial)?, "the backup copy")?;
        sync_path(partial)
    }

    /// Copies both databases into `dir` (created; must be empty), with a manifest. Mail
    /// keeps flowing meanwhile.
    ///
    /// Each file is copied as of one moment, the mail database first: the directory's
    /// copy is then at least as new, so every mailbox in the copy belongs to a recipient
    /// the directory's copy has or had deleted (whose mailboxes the next start purges),
    /// and a recipient created in between simply has no mail yet.
    pub fn backup_to(&self, dir: &Path) -> Result<BackupManifest> {
        prepare_empty_dir(dir)?;
        let mail_partial = dir.join(format!("{BACKUP_DATABASE}.partial"));
        let directory_partial = dir.join(format!("{BACKUP_DIRECTORY}.partial"));
        self.copy_db(&self.mail, &mail_partial)?;
        self.copy_db(&self.directory, &directory_partial)?;
        let (schema_version, messages, folders, recipients, queue_entries) = counts(
            &Connection::open(&mail_partial)?,
            Some(&Connection::open(&directory_partial)?),
        )?;
        let mut bytes = 0;
        for (partial, name) in [
            (&mail_partial, BACKUP_DATABASE),
            (&directory_partial, BACKUP_DIRECTORY),
        ] {
            let target = dir.join(name);
            std::fs::rename(partial, &target).map_err(|e| io("rename", partial, e))?;
            bytes += std::fs::metadata(&target)
                .map_err(|e| io("read", &target, e))?
                .len();
        }
        let manifest = BackupManifest {
            taken_at_ms: mailroom_watch::now_ms(),
            schema_version,
            messages,
            folders,
            recipients,
            queue_entries,
            bytes,
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

    /// Brings a backup folder back as the mail database `database` and the directory
    /// database beside it (neither may exist). Checks the copies' integrity and that
    /// this binary can read their schema first; the server migrates an older schema at
    /// its next start (a backup from before the split has its directory moved out then).
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
        let directory_target = SqliteStore::directory_path(database);
        for target in [database, directory_target.as_path()] {
            if target.exists() {
                return Err(StoreError::Conflict(format!(
                    "{} exists; restore only into an empty data folder",
                    target.display()
                )));
            }
        }
        let open = |path: &Path| -> Result<Connection> {
            let source =
                Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            quick_check(&source, &format!("the backup {}", path.display()))?;
            Ok(source)
        };
        let mail_source = open(&backup.join(BACKUP_DATABASE))?;
        let directory_path = backup.join(BACKUP_DIRECTORY);
        let directory_source = if directory_path.exists() {
            Some(open(&directory_path)?)
        } else {
            None
        };
        let found = counts(&mail_source, directory_source.as_ref())?;
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
        // The directory first: a mail database without its directory beside it would
        // start as a data folder from before the split and find no directory to move.
        let mut pairs = Vec::new();
        if let Some(source) = &directory_source {
            pairs.push((source, directory_target.clone()));
        }
        pairs.push((&mail_source, database.to_path_buf()));
        for (source, target) in pairs {
            let partial = target.with_extension("db.restoring");
            {
                let mut copy = Connection::open(&partial)?;
                copy_all(source, &mut copy)?;
            }
            sync_path(&partial)?;
            std::fs::rename(&partial, &target).map_err(|e| io("rename", &partial, e))?;
        }
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
