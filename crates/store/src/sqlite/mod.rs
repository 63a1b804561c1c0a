//! The embedded backend: one SQLite database in WAL mode holding metadata and bodies.
//!
//! Why bodies live in the database rather than in files: the spool's promise ("250" only
//! once the message and its queue entry are on disk) then costs one WAL fsync for a whole
//! batch of messages, with no per-file fsync, no directory fsync and no orphaned files
//! after a crash; moving a message between queues and mailboxes is one transaction.
//! `docs/storage.md` has the measurements and the trade-offs.
//!
//! Connections: a small pool. The pool's mutex guards only a `Vec` push or pop and is
//! never held while a statement runs (rank 90, a leaf; see `docs/locking.md`).

mod backup;
mod mailbox;
mod outbound;
mod track;

pub use backup::{BACKUP_DATABASE, BACKUP_DIRECTORY, BACKUP_MANIFEST, BackupManifest};

use crate::disk::NEAR_FULL_BYTES;
use crate::migrations::migrate;
use crate::*;
use mailroom_watch::{RankedMutex, TicketLock};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Idle connections kept for reuse; more are opened on demand and closed after use.
const POOL_IDLE_MAX: usize = 16;

/// How long a writer waits for SQLite's write lock before giving up with an error.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// One SQLite database file with its own connection pool and write turn. The store has
/// two: the mail database (spool, queues, bodies, mailboxes) and the directory database
/// (recipients, addresses, site settings), so that directory work never takes the
/// write turn mail needs (see `docs/storage.md`, "Two database files").
struct Db {
    /// What metrics and logs call this database.
    name: &'static str,
    path: PathBuf,
    /// Idle connections. Rank 90 (leaf): held only to push or pop.
    idle: RankedMutex<Vec<Connection>>,
    /// The connection every write uses, taken and returned by the write turn's holder.
    /// Why one: SQLite drops a connection's whole page cache when another connection
    /// has written since its last transaction, so writers taking turns on pooled
    /// connections each started cold and read their pages again (the spool writer
    /// spent 13 % of its time in `pread`, conversion 8 %: the ingestion profile in
    /// docs/benchmarks.md). Only this connection writes, so its cache stays warm.
    writer: RankedMutex<Option<Connection>>,
    /// Whose turn it is to write. SQLite has one write lock per database and makes
    /// waiting writers poll it; taking turns here first, in arrival order, means no
    /// writer of ours ever polls (and so never starves). Held for one transaction;
    /// nothing ranked is taken inside it, and no one holds both databases' turns.
    write_turn: TicketLock,
    /// Set by an I/O error: no write runs until a checkpoint has rewritten the database
    /// from what SQLite considers committed and truncated the WAL (see `recover`).
    recovering: std::sync::atomic::AtomicBool,
}

impl Db {
    fn new(name: &'static str, path: &Path, turn_rank: u32, turn_name: &'static str) -> Db {
        Db {
            name,
            path: path.to_path_buf(),
            idle: RankedMutex::new(
                mailroom_watch::rank::STORE_CONNECTIONS,
                "store connection pool",
                Vec::new(),
            ),
            writer: RankedMutex::new(
                mailroom_watch::rank::STORE_WRITER_CONNECTION,
                "store writer connection",
                None,
            ),
            write_turn: TicketLock::new(turn_rank, turn_name),
            recovering: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// The embedded SQLite store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    /// Spool, queues, bodies, mailboxes (`mailroom.db`).
    mail: Db,
    /// Recipients, addresses, site settings, topology (`directory.db` beside it).
    directory: Db,
    write_stats: WriteStats,
    /// Each mailbox's change bell (see `Mailboxes::watch_mailbox`). Rank 92 (leaf): held
    /// for one map lookup; rung after the write turn is released.
    bells: RankedMutex<HashMap<RecipientId, tokio::sync::watch::Sender<u64>>>,
    /// The data folder's disk, told about every fault (see `crate::disk`).
    disk: std::sync::OnceLock<Arc<crate::Disk>>,
    /// How every write transaction commits (see [`Durability`]).
    durability: Durability,
    /// APPENDs waiting for the next write turn (group commit; see `Mailboxes::append`).
    /// Rank 96: taken inside the write turn (95) to take the whole queue, or alone to
    /// push; nothing is taken inside it.
    appends: RankedMutex<Vec<PendingAppend>>,
    /// When mail last committed (spool, delivery), Unix ms: what the directory's
    /// background lane paces itself by ([`MailStore::mail_active_at_ms`]).
    mail_active_at_ms: std::sync::atomic::AtomicI64,
    /// Set once a [`Checkpointer`] runs: the mail database's connections no longer
    /// checkpoint at commit (see [`SqliteStore::start_checkpointer`]).
    background_checkpoints: std::sync::atomic::AtomicBool,
    /// Message tracking on (`[tracking] enabled`): steps write their trail events.
    tracking: std::sync::atomic::AtomicBool,
    /// The WAL length (frames) past which the checkpointer restarts it: [`WAL_PAGES_MAX`]
    /// (a field so that a test can make it small).
    wal_pages_max: i64,
}

/// The thread that checkpoints the mail database's WAL off the write path; stops when
/// dropped (or when the store is gone).
pub struct Checkpointer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// How often the checkpointer copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// Tracking events whose Message-IDs one round of the checkpointer indexes, at most:
/// 40,000 events a second at a round every 250 ms, several times the events of the
/// heaviest ingestion measured here (about 7,000 messages a second, three events
/// each), in a turn of a few milliseconds.
const TRACK_INDEX_BATCH: u32 = 10_000;

/// How often it does so while the disk has less than [`NEAR_FULL_BYTES`] free. Why:
/// the frames not yet copied owe the database file their pages, and the spool admits
/// new mail only while the disk has room for that debt as well (`Disk::set_owed`,
/// measured after every spool commit and every checkpoint); a debt paid off more often
/// refuses less mail near the wall. A passive checkpoint of a short WAL costs little,
/// and only a nearly full disk pays it.
const CHECKPOINT_EVERY_NEAR_FULL: Duration = Duration::from_millis(25);

/// A WAL longer than this (frames, one 4 KiB page each) is started over from its
/// beginning (`wal_checkpoint(RESTART)` in the write turn). Why: under continuous load
/// some reader always holds a WAL snapshot, so SQLite never restarts the WAL by itself
/// even when every frame has been copied back (a writer restarts it only when no
/// reader uses it), and the file grows for as long as the load lasts: 2.9 GB in 45 s of
/// the churn stress, with every commit's fsync then also extending the file (an
/// ext4 journal commit per fsync), and mail's rate falling by a third as it grew.
/// Restarting overwrites the blocks already allocated. 16,384 frames is 64 MiB, about
/// a second of the heaviest load measured here.
const WAL_PAGES_MAX: i64 = 16_384;

/// The shortest WAL (frames) worth restarting, however little the disk has free: a
/// restart takes the write turn, so it is not done for every few commits.
const WAL_PAGES_MIN: i64 = 256;

/// How long a restart waits for readers still on an older snapshot before it gives
/// up until the next round. It holds the write turn meanwhile, so it is short: mail's
/// read transactions last milliseconds; one that lasts longer costs a retry, never a
/// stall.
const WAL_RESTART_PATIENCE: Duration = Duration::from_millis(100);

/// How long the recovery after an I/O error retries its checkpoint while another
/// connection's checkpoint holds SQLite's checkpoint lock (see `SqliteStore::recover`).
const RECOVER_PATIENCE: Duration = Duration::from_secs(2);

/// The WAL file is cut back to this size when it is restarted or checkpointed, should
/// a burst (or readers that kept restarts failing) have grown it beyond: what stays is
/// reused, not extended again.
const WAL_FILE_LIMIT: i64 = 4 * WAL_PAGES_MAX * 4096;

/// When a write's commit reaches the disk. The spool always commits with `Full`
/// (SMTP's "250" promises it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every commit fsyncs the WAL before it returns (`synchronous=FULL`): an APPEND
    /// that got "OK", a flag change, a delivery survive a power loss.
    #[default]
    Full,
    /// Commits other than the spool's reach the WAL but are fsynced later, at a
    /// checkpoint (`synchronous=NORMAL`): they survive a process crash, and a power loss
    /// may roll back the newest of them.
    Normal,
}

/// How long writers wait for their turn and hold it, per caller.
#[derive(Clone)]
struct WriteStats {
    waited: Family<Vec<(String, String)>, Histogram>,
    held: Family<Vec<(String, String)>, Histogram>,
    /// Restarts of the mail database's WAL, by outcome (see [`WAL_PAGES_MAX`]).
    wal_restarts: Family<Vec<(String, String)>, Counter>,
}

impl Default for WriteStats {
    fn default() -> Self {
        let buckets = || Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        WriteStats {
            waited: Family::new_with_constructor(buckets),
            held: Family::new_with_constructor(buckets),
            wal_restarts: Family::default(),
        }
    }
}

/// How much of the database file each connection maps into memory for reading (1 GiB;
/// a larger database reads the rest with read()).
const MMAP_SIZE: i64 = 1 << 30;

/// One APPEND waiting for a group commit.
struct PendingAppend {
    recipient: RecipientId,
    folder: String,
    flags: Vec<String>,
    internal_date_ms: UnixMillis,
    body: Vec<u8>,
    facts: Option<crate::MessageFacts>,
    slot: Arc<AppendSlot>,
}

/// Where the turn that commits an APPEND leaves its outcome. Rank 97 (leaf).
struct AppendSlot {
    result: RankedMutex<Option<Result<Copied>>>,
}

impl Default for AppendSlot {
    fn default() -> Self {
        AppendSlot {
            result: RankedMutex::new(mailroom_watch::rank::APPEND_OUTCOME, "append outcome", None),
        }
    }
}

impl AppendSlot {
    fn fill(&self, result: Result<Copied>) {
        *self.result.lock() = Some(result);
    }

    fn is_filled(&self) -> bool {
        self.result.lock().is_some()
    }

    fn take(&self) -> Option<Result<Copied>> {
        self.result.lock().take()
    }
}

/// An error that counts as an I/O fault ([`crate::Fault::Io`]).
fn io_fault(why: &str) -> StoreError {
    StoreError::Database(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
        Some(why.to_string()),
    ))
}

/// Writers whose commits need not be fsynced at once even with [`Durability::Full`]:
/// nothing was promised to anyone on their strength.
const RELAXED_CALLERS: &[&str] = &[
    // The Message-ID index is derived from the events; its mark moves with it.
    "track index",
    "claim",
    "claim outbound",
    "release",
    "defer",
    "imap-cache",
    // Undoing a claim of \Recent makes messages recent again: harmless.
    "recent",
    // An import's or regeneration's chunk: the job reports nothing as done before
    // `sync_directory` (see `MailStore::write_directory_background`).
    "directory background",
];

/// A write turn held longer than this is logged (with its caller): every other writer,
/// conversion included, waited behind it.
const SLOW_WRITE: Duration = Duration::from_millis(500);

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates its schema, with
    /// every commit durable ([`Durability::Full`]).
    pub fn open(path: &Path) -> Result<SqliteStore> {
        Self::open_with(path, Durability::Full)
    }

    /// Turns message tracking on or off (`[tracking] enabled`, on by default): off, no
    /// step writes trail events (what is recorded stays until the retention removes it).
    pub fn set_tracking(&self, enabled: bool) {
        self.tracking
            .store(enabled, std::sync::atomic::Ordering::Relaxed);
    }

    fn tracking(&self) -> bool {
        self.tracking.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reports faults to `disk` from now on (the server's `/health` and metrics).
    pub fn attach_disk(&self, disk: Arc<crate::Disk>) {
        let _ = self.disk.set(disk);
    }

    /// The data folder's disk, once attached.
    pub fn disk(&self) -> Option<&Arc<crate::Disk>> {
        self.disk.get()
    }

    /// The directory database that goes with the mail database at `mail`: `directory.db`
    /// beside `mailroom.db`, or `<name>-directory.db` beside any other name.
    pub fn directory_path(mail: &Path) -> PathBuf {
        let name = mail
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == BACKUP_DATABASE {
            mail.with_file_name(BACKUP_DIRECTORY)
        } else {
            mail.with_file_name(format!("{name}-directory.db"))
        }
    }

    /// Opens (creating if needed) the mail database at `path` and the directory
    /// database beside it ([`SqliteStore::directory_path`]), and migrates both. A data
    /// folder from before the split has its directory moved into the directory database
    /// here (copied, then dropped from the mail database: a crash in between copies it
    /// again at the next start).
    pub fn open_with(path: &Path, durability: Durability) -> Result<SqliteStore> {
        let store = SqliteStore {
            mail: Db::new(
                "mail",
                path,
                mailroom_watch::rank::STORE_WRITE_TURN,
                "mail store write turn",
            ),
            directory: Db::new(
                "directory",
                &Self::directory_path(path),
                mailroom_watch::rank::DIRECTORY_STORE_WRITE_TURN,
                "directory store write turn",
            ),
            write_stats: WriteStats::default(),
            bells: RankedMutex::new(
                mailroom_watch::rank::MAILBOX_BELLS,
                "mailbox change bells",
                HashMap::new(),
            ),
            disk: std::sync::OnceLock::new(),
            durability,
            appends: RankedMutex::new(
                mailroom_watch::rank::PENDING_APPENDS,
                "pending appends",
                Vec::new(),
            ),
            mail_active_at_ms: std::sync::atomic::AtomicI64::new(0),
            background_checkpoints: std::sync::atomic::AtomicBool::new(false),
            tracking: std::sync::atomic::AtomicBool::new(true),
            wal_pages_max: WAL_PAGES_MAX,
        };
        let mut directory = store.connect(&store.directory)?;
        crate::migrations::migrate_directory(&mut directory)?;
        let mut mail = store.connect(&store.mail)?;
        migrate(&mut mail, |version, _| {
            if version == crate::migrations::SPLIT_VERSION {
                crate::migrations::move_directory(&mut directory, path)?;
            }
            Ok(())
        })?;
        store.checkin(&store.mail, mail);
        store.checkin(&store.directory, directory);
        store.purge_deleted()?;
        Ok(store)
    }

    fn connect(&self, db: &Db) -> Result<Connection> {
        let conn = Connection::open(&db.path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: each commit fsyncs the WAL before it returns. NORMAL (a setting, see
        // `Durability`): commits are atomic and survive a process crash, and only a
        // power loss can roll back the newest of them. The spool always uses FULL.
        conn.pragma_update(None, "synchronous", self.synchronous())?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Reads through a memory map of the database file instead of read() copies into
        // each connection's own page cache: the pages are the kernel's page cache, shared
        // by every connection (bench/imap profile: copying pages was a quarter of a
        // header SEARCH). Address space only; the kernel keeps what is used.
        conn.pragma_update(None, "mmap_size", MMAP_SIZE)?;
        conn.pragma_update(None, "journal_size_limit", WAL_FILE_LIMIT)?;
        if db.name == "mail"
            && self
                .background_checkpoints
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        }
        Ok(conn)
    }

    /// Moves the mail database's WAL checkpoints off the write path: from now on no
    /// commit checkpoints (SQLite's default makes the commit that crosses 1,000 WAL
    /// pages copy them into the database file and fsync it, inside the write turn that
    /// the spool and delivery wait for); a thread does it every 250 ms instead, with
    /// passive checkpoints that run beside writers. Stops when the handle is dropped.
    pub fn start_checkpointer(self: &Arc<Self>) -> std::io::Result<Checkpointer> {
        self.background_checkpoints
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Pooled connections were opened with automatic checkpoints: drop them.
        drop(std::mem::take(&mut *self.mail.idle.lock()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let store = Arc::downgrade(self);
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("checkpointer".into())
            .spawn(move || {
                let mut every = CHECKPOINT_EVERY;
                while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::park_timeout(every);
                    let Some(store) = store.upgrade() else { break };
                    if let Err(e) = store.checkpoint() {
                        tracing::warn!(error = %e, "the WAL checkpoint failed; it is retried");
                    }
                    if let Err(e) = store.index_tracking() {
                        tracing::warn!(error = %e, "indexing tracking's Message-IDs failed; it is retried");
                    }
                    if let Err(e) = store.with_conn(|conn| store.measure_owed(conn)) {
                        tracing::debug!(error = %e, "cannot measure the database's size");
                    }
                    let near_full = store
                        .disk
                        .get()
                        .is_some_and(|disk| disk.free_bytes() < NEAR_FULL_BYTES);
                    every = if near_full {
                        CHECKPOINT_EVERY_NEAR_FULL
                    } else {
                        CHECKPOINT_EVERY
                    };
                }
                // A last one, so that a clean stop leaves a short WAL.
                if let Some(store) = store.upgrade() {
                    let _ = store.checkpoint();
                }
            })?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }

    /// One passive checkpoint of the mail database (beside writers, no write turn);
    /// then, if the WAL has grown past its limit, a restart in the write turn so that
    /// the next commit writes from the WAL's beginning again.
    ///
    /// The limit is [`WAL_PAGES_MAX`] frames, or a quarter of the disk's free space if
    /// that is less; and when the WAL file is larger than what is left free, the
    /// restart truncates the file to nothing (`TRUNCATE`), giving its space back. Why:
    /// on a small or nearly full disk a WAL of 64 MiB can be most of what the disk
    /// holds. The full-disk test (48 MiB) found a WAL of 27 MiB of frames long copied
    /// back when the disk filled; once space returned, the checkpoint's growth of the
    /// database file and new deliveries filled it again, and `/health` stayed red.
    fn checkpoint(&self) -> Result<()> {
        // After an I/O error the next write checkpoints the whole WAL itself
        // ([`Self::recover`]); a passive round meanwhile would only make it wait.
        if self
            .mail
            .recovering
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(());
        }
        let passive = || -> Result<i64> {
            self.with_conn(|conn| {
                Ok(conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))?)
            })
        };
        let free_pages = self.disk.get().map_or(i64::MAX, |disk| {
            (disk.free_bytes() / 4096).min(i64::MAX as u64) as i64
        });
        let limit = self.wal_pages_max.min(free_pages / 4).max(WAL_PAGES_MIN);
        let frames = passive()?;
        if frames <= limit {
            return Ok(());
        }
        let wal_pages = std::fs::metadata(self.mail.path.with_extension("db-wal"))
            .map_or(0, |m| (m.len() / 4096).min(i64::MAX as u64) as i64);
        let mode = if wal_pages > free_pages {
            "TRUNCATE"
        } else {
            "RESTART"
        };
        // A second passive round first copies what was committed during the first
        // (a quarter second of mail at most), outside the turn: the restart in the
        // turn then copies and fsyncs only the last few frames (the short churn
        // stress: a restart's hold of the turn 21-36 ms before, 15-27 ms with it).
        passive()?;
        let busy = self.write("checkpoint", |conn| {
            // In the turn no writer of ours adds frames; what the restart waits for
            // is readers on older snapshots, briefly (new readers read the file).
            conn.busy_timeout(WAL_RESTART_PATIENCE)?;
            let busy = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                r.get::<_, i64>(0)
            });
            conn.busy_timeout(BUSY_TIMEOUT)?;
            Ok(busy? != 0)
        })?;
        let outcome = match (busy, mode) {
            (true, _) => "busy",
            (false, "TRUNCATE") => "truncated",
            (false, _) => "restarted",
        };
        self.write_stats
            .wal_restarts
            .get_or_create(&vec![("outcome".to_string(), outcome.to_string())])
            .inc();
        Ok(())
    }

    /// Indexes the Message-IDs of tracking events recorded since the last round, up to
    /// [`TRACK_INDEX_BATCH`] events in one short relaxed write turn (see
    /// `track::index_message_ids`); nothing, and no turn, when none is waiting. The
    /// checkpointer's thread runs it every round.
    fn index_tracking(&self) -> Result<u64> {
        if !self.with_conn(|conn| track::unindexed(conn))? {
            return Ok(0);
        }
        self.write("track index", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let indexed = track::index_message_ids(&tx, TRACK_INDEX_BATCH)?;
            tx.commit()?;
            Ok(indexed)
        })
    }

    /// Tells the disk what the mail database's next checkpoint will add to its file:
    /// the database's size as its newest commit sees it, less the file's length (WAL
    /// frames for pages beyond the file's end; pages within it are overwritten in
    /// place). The spool admits mail only while that much is left free besides
    /// (`Disk::admit`). Why: a disk filled by WAL frames to the last byte has no room
    /// for the checkpoint that would free them, and stays full until the operator frees
    /// more than the debt (the full-disk fault test, docs/storage.md).
    fn measure_owed(&self, conn: &Connection) -> Result<()> {
        let Some(disk) = self.disk.get() else {
            return Ok(());
        };
        let ticket = disk.owed_reading();
        let size: i64 = conn
            .prepare_cached(
                "SELECT c.page_count * s.page_size FROM pragma_page_count() c, pragma_page_size() s",
            )?
            .query_row([], |r| r.get(0))?;
        let file = std::fs::metadata(&self.mail.path).map_or(0, |m| m.len());
        disk.set_owed(ticket, (size.max(0) as u64).saturating_sub(file));
        Ok(())
    }

    fn synchronous(&self) -> &'static str {
        match self.durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        }
    }

    /// Tells the disk about a fault. After an I/O error no connection is reused: the
    /// pool is emptied and every later call opens a fresh connection, which reads the
    /// database and its WAL from the file again (the "fsyncgate" lesson: after a failed
    /// write or fsync, what a connection has cached may not be what is on disk).
    fn note_error(&self, db: &Db, error: &StoreError) {
        if let Some(disk) = self.disk.get() {
            disk.record(error);
        }
        if error.fault() == Some(crate::Fault::Io) {
            db.recovering
                .store(true, std::sync::atomic::Ordering::SeqCst);
            let dropped = std::mem::take(&mut *db.idle.lock());
            drop(dropped);
            let writer = db.writer.lock().take();
            drop(writer);
        }
    }

    /// After an I/O error, before any other write: checkpoint the whole WAL into the
    /// database file, fsync it, and truncate the WAL (`wal_checkpoint(TRUNCATE)`).
    ///
    /// Why: after a failed write or fsync the kernel may have dropped the WAL pages it
    /// could not write while still serving them from its cache (PostgreSQL's
    /// "fsyncgate"), and SQLite may even keep the failed commit visible. Carrying on
    /// would build new commits on pages that may never reach the disk, and a power loss
    /// would then take acknowledged mail with them. The checkpoint writes every page
    /// afresh into the database file and only succeeds once that file is fsynced; the
    /// WAL starts over empty. Until it succeeds every write fails as an I/O fault (SMTP
    /// 451, conversion waits), so nothing is acknowledged on top of doubtful pages.
    ///
    /// The checkpoint answers "busy" at once, without waiting, while another
    /// connection runs one (the checkpointer's passive round): it is tried again for
    /// up to [`RECOVER_PATIENCE`], so that the first write after the fault ends does
    /// not fail for that alone.
    fn recover(&self, db: &Db, conn: &Connection) -> Result<()> {
        let deadline = Instant::now() + RECOVER_PATIENCE;
        let busy = loop {
            let (busy, _log, _done): (i64, i64, i64) =
                conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
            if busy == 0 || Instant::now() >= deadline {
                break busy;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if busy != 0 {
            return Err(io_fault(
                "recovering from an I/O error: the checkpoint could not complete yet",
            ));
        }
        db.recovering
            .store(false, std::sync::atomic::Ordering::SeqCst);
        if let Some(disk) = self.disk.get() {
            disk.wrote();
        }
        tracing::warn!(
            database = db.name,
            "recovered from the storage I/O error: the database was rewritten from its WAL, fsynced, and the WAL truncated"
        );
        Ok(())
    }

    fn checkout(&self, db: &Db) -> Result<Connection> {
        let pooled = db.idle.lock().pop();
        match pooled {
            Some(conn) => Ok(conn),
            None => self.connect(db),
        }
    }

    fn checkin(&self, db: &Db, conn: Connection) {
        let mut idle = db.idle.lock();
        if idle.len() < POOL_IDLE_MAX {
            idle.push(conn);
        }
    }

    /// Runs `f` with a pooled connection to the mail database. The connection goes back
    /// to the pool only when `f` succeeded, so a connection left in an odd state by an
    /// error is dropped.
    fn with_conn<R>(&self, f: impl FnOnce(&mut Connection) -> Result<R>) -> Result<R> {
        self.with_conn_to(&self.mail, f)
    }

    fn with_conn_to<R>(&self, db: &Db, f: impl FnOnce(&mut Connection) -> Result<R>) -> Result<R> {
        let mut conn = self.checkout(db).inspect_err(|e| self.note_error(db, e))?;
        let result = f(&mut conn);
        match &result {
            Ok(_) => self.checkin(db, conn),
            Err(e) => self.note_error(db, e),
        }
        result
    }

    /// Whether `exists_sql` (a `SELECT EXISTS (...)` with the time as `?1`) finds
    /// anything, read outside the write turn. Claims ask this first: under load about
    /// half of conversion's claims found nothing (two workers woken by one doorbell),
    /// as did every idle outbound poll, and each took the write turn that the spool's
    /// next commit waited behind (docs/benchmarks.md, fifth session of issue 16). A read
    /// sees every commit finished before it began, and whoever makes an entry due
    /// rings its worker after committing, so a claim that skips on a stale "nothing"
    /// is followed by another.
    pub(crate) fn anything_due(&self, exists_sql: &str, now_ms: UnixMillis) -> Result<bool> {
        self.with_conn(|conn| {
            Ok(conn
                .prepare_cached(exists_sql)?
                .query_row([now_ms], |r| r.get(0))?)
        })
    }

    /// Runs `f`, which writes the mail database, with a pooled connection in this
    /// writer's turn (see `Db::write_turn`). `caller` labels the wait and hold metrics.
    fn write<R>(
        &self,
        caller: &'static str,
        f: impl FnOnce(&mut Connection) -> Result<R>,
    ) -> Result<R> {
        self.write_to(&self.mail, caller, f)
    }

    /// `write`, served before every writer already waiting (never before the one in
    /// progress): for the spool, whose commit an SMTP client waits on with the
    /// connection open (see `TicketLock::lock_first`).
    fn write_first<R>(
        &self,
        caller: &'static str,
        f: impl FnOnce(&mut Connection) -> Result<R>,
    ) -> Result<R> {
        self.write_in_turn(&self.mail, caller, true, f)
    }

    fn write_to<R>(
        &self,
        db: &Db,
        caller: &'static str,
        f: impl FnOnce(&mut Connection) -> Result<R>,
    ) -> Result<R> {
        self.write_in_turn(db, caller, false, f)
    }

    /// The database's writer connection (see `Db::writer`), opened when there is none
    /// (the first write, or after an error dropped it), set to `synchronous=NORMAL` for
    /// a relaxed caller. Called by the write turn's holder.
    fn writer_connection(&self, db: &Db, relaxed: bool) -> Result<Connection> {
        let kept = db.writer.lock().take();
        let conn = match kept {
            Some(conn) => conn,
            // SQLite's default cache (2 MB) holds the pages writes touch again. A bigger
            // one (16 MB, tried) cost more than it saved: each commit walks the cache's
            // hash table (`pcache1TruncateUnsafe`, 6 % of the spool writer).
            None => self.connect(db)?,
        };
        if relaxed {
            set_synchronous(&conn, "NORMAL")?;
        }
        Ok(conn)
    }

    fn write_in_turn<R>(
        &self,
        db: &Db,
        caller: &'static str,
        first: bool,
        f: impl FnOnce(&mut Connection) -> Result<R>,
    ) -> Result<R> {
        // Bookkeeping nobody was promised (claims, retry times, a cache) need not be
        // fsynced at its own commit: a power loss that undoes it makes a claim
        // claimable again or a cache be computed again. The next durable commit fsyncs
        // it along with its own (one WAL).
        let relaxed = self.durability == Durability::Full && RELAXED_CALLERS.contains(&caller);
        let turn = if first {
            db.write_turn.lock_first()
        } else {
            db.write_turn.lock()
        };
        let started = Instant::now();
        let mut conn = match self.writer_connection(db, relaxed) {
            Ok(conn) => conn,
            Err(e) => {
                drop(turn);
                self.note_error(db, &e);
                return Err(e);
            }
        };
        let result = if db.recovering.load(std::sync::atomic::Ordering::SeqCst) {
            self.recover(db, &conn).and_then(|()| f(&mut conn))
        } else {
            f(&mut conn)
        };
        let held = started.elapsed();
        let waited = turn.waited();
        // The connection goes back for the next turn's holder, unless the write failed
        // (a connection left in an odd state by an error is dropped) or it cannot be set
        // back to FULL (it is not reused with the wrong setting; the write itself has
        // committed).
        if result.is_ok() && (!relaxed || set_synchronous(&conn, "FULL").is_ok()) {
            *db.writer.lock() = Some(conn);
        } else {
            drop(conn);
        }
        drop(turn);
        match &result {
            Ok(_) => {
                if let Some(disk) = self.disk.get() {
                    disk.wrote();
                }
            }
            Err(e) => self.note_error(db, e),
        }
        let labels = vec![
            ("caller".to_string(), caller.to_string()),
            ("database".to_string(), db.name.to_string()),
        ];
        self.write_stats
            .waited
            .get_or_create(&labels)
            .observe(waited.as_secs_f64());
        self.write_stats
            .held
            .get_or_create(&labels)
            .observe(held.as_secs_f64());
        if held > SLOW_WRITE {
            tracing::warn!(
                caller,
                database = db.name,
                held_ms = held.as_millis() as u64,
                "a database write held the write turn for {} ms; every other writer of that database waited",
                held.as_millis()
            );
        }
        result
    }

    /// Removes the mailboxes of deleted recipients from the mail database, for every
    /// deletion the directory database records as not purged yet, then marks them
    /// purged. Idempotent: a crash anywhere repeats it at the next call (start-up, or
    /// the next directory write that deletes).
    fn purge_deleted(&self) -> Result<()> {
        loop {
            let ids: Vec<RecipientId> = self.with_conn_to(&self.directory, |conn| {
                Ok(conn
                    .prepare_cached(
                        "SELECT id FROM deleted_recipients WHERE purged = 0 ORDER BY id LIMIT 500",
                    )?
                    .query_map([], |r| r.get(0))?
                    .collect::<std::result::Result<_, _>>()?)
            })?;
            if ids.is_empty() {
                return Ok(());
            }
            self.write("purge", |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                for &id in &ids {
                    purge_mailbox(&tx, id)?;
                }
                tx.commit()?;
                Ok(())
            })?;
            self.write_to(&self.directory, "directory purge", |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let mut mark =
                    tx.prepare_cached("UPDATE deleted_recipients SET purged = 1 WHERE id = ?1")?;
                for &id in &ids {
                    mark.execute([id])?;
                }
                drop(mark);
                tx.commit()?;
                Ok(())
            })?;
        }
    }

    /// Rings the change bells of these mailboxes (after their change committed). A bell
    /// nobody listens to any more is forgotten.
    fn ring(&self, recipients: &[RecipientId]) {
        let mut bells = self.bells.lock();
        for recipient in recipients {
            if let Some(bell) = bells.get(recipient) {
                if bell.receiver_count() == 0 {
                    bells.remove(recipient);
                } else {
                    bell.send_modify(|n| *n += 1);
                }
            }
        }
    }

    /// Records that mail just committed (see [`MailStore::mail_active_at_ms`]).
    fn mail_moved(&self) {
        self.mail_active_at_ms.store(
            mailroom_watch::now_ms(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Adds the write-turn metrics to a Prometheus registry.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "mailroom_store_write_wait_seconds",
            "Time a database writer waited for its turn, by caller",
            self.write_stats.waited.clone(),
        );
        registry.register(
            "mailroom_store_write_hold_seconds",
            "Time a database writer held its turn (one transaction), by caller",
            self.write_stats.held.clone(),
        );
        registry.register(
            "mailroom_store_wal_restarts",
            "Restarts of the mail database's WAL from its beginning, by outcome: restarted, or busy (a reader held an older snapshot past the patience; retried)",
            self.write_stats.wal_restarts.clone(),
        );
    }
}

/// Inserts a body or takes one more reference to an identical stored body.
/// Sets `synchronous` on a connection through a cached statement: the write path does
/// it twice per relaxed commit, and `pragma_update` prepares its statement anew each time.
fn set_synchronous(conn: &Connection, level: &'static str) -> rusqlite::Result<()> {
    let sql = match level {
        "FULL" => "PRAGMA synchronous = FULL",
        _ => "PRAGMA synchronous = NORMAL",
    };
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

fn put_blob(tx: &rusqlite::Transaction<'_>, body: &[u8]) -> Result<i64> {
    put_keyed_blob(tx, body, blake3::hash(body).as_bytes())
}

/// The key (column `blobs.hash`) under which the spool stores a body: the queue id
/// followed by the body's BLAKE3 hash.
///
/// Why not the hash alone: the key's unique index gets one entry per message, and a
/// hash puts each entry on a random leaf page of it, so every message in a spool commit
/// dirtied a page of its own, a 4 KiB WAL frame: 17 % of the frames the mail database
/// wrote during ingestion (docs/benchmarks.md). Queue ids grow with time (the SMTP
/// server seeds them with its start time), so a commit's keys land side by side on the
/// index's last page. Nothing is lost by it: a spooled body starts with its own
/// `Received:` line, which names the queue id, so no two spooled bodies were ever equal
/// and its hash never found one to share. Two keys are equal only if their hashes are,
/// so a key still never shares a body with different content, and a key longer than a
/// hash never meets one of the bodies that other writers (APPEND, reports) key by hash.
fn spool_blob_key(queue_id: &str, hash: &blake3::Hash) -> Vec<u8> {
    let mut key = Vec::with_capacity(queue_id.len() + 32);
    key.extend_from_slice(queue_id.as_bytes());
    key.extend_from_slice(hash.as_bytes());
    key
}

/// Stores a body under `key` (its hash, or [`spool_blob_key`]), or takes one more
/// reference to the body already stored under it.
fn put_keyed_blob(tx: &rusqlite::Transaction<'_>, body: &[u8], key: &[u8]) -> Result<i64> {
    // Cached: the spool runs this for every message, and planning the upsert anew each
    // time was most of the spool writer's SQLite time. An insert that may be ignored,
    // then the rowid, rather than an upsert with `RETURNING id`: RETURNING opens a
    // temporary B-tree for its rows on every run, and the spool's keys (queue id and
    // hash) are new for every message but a repeated submission.
    let inserted = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO blobs (hash, refcount, size, data) VALUES (?1, 1, ?2, ?3)",
        )?
        .execute(params![key, body.len() as i64, body])?;
    if inserted == 1 {
        return Ok(tx.last_insert_rowid());
    }
    tx.prepare_cached("UPDATE blobs SET refcount = refcount + 1 WHERE hash = ?1")?
        .execute([key])?;
    Ok(tx
        .prepare_cached("SELECT id FROM blobs WHERE hash = ?1")?
        .query_row([key], |r| r.get(0))?)
}

/// Takes the next UID (and modification sequence) of `folder` for a new message:
/// delivery, APPEND, COPY and MOVE. (An update and a read rather than `UPDATE ...
/// RETURNING`: see [`put_keyed_blob`].)
fn next_uid(tx: &rusqlite::Transaction<'_>, folder: i64) -> Result<(u32, i64)> {
    tx.prepare_cached(
        "UPDATE folders SET uidnext = uidnext + 1, highestmodseq = highestmodseq + 1
         WHERE id = ?1",
    )?
    .execute([folder])?;
    Ok(tx
        .prepare_cached("SELECT uidnext - 1, highestmodseq FROM folders WHERE id = ?1")?
        .query_row([folder], |r| Ok((r.get(0)?, r.get(1)?)))?)
}

/// Changes a body's reference count, deleting the body when nothing references it.
fn adjust_blob_refs(tx: &rusqlite::Transaction<'_>, blob_id: i64, delta: i64) -> Result<()> {
    let remaining: i64 = tx
        .prepare_cached(
            "UPDATE blobs SET refcount = refcount + ?2 WHERE id = ?1 RETURNING refcount",
        )?
        .query_row(params![blob_id, delta], |r| r.get(0))?;
    debug_assert!(remaining >= 0, "blob {blob_id} refcount went negative");
    if remaining == 0 {
        tx.execute("DELETE FROM blobs WHERE id = ?1", [blob_id])?;
    }
    Ok(())
}

fn inbox_id(tx: &rusqlite::Transaction<'_>, recipient: RecipientId, now_ms: i64) -> Result<i64> {
    let existing: Option<i64> = tx
        .prepare_cached("SELECT id FROM folders WHERE recipient_id = ?1 AND name = 'INBOX'")?
        .query_row([recipient], |r| r.get(0))
        .optional()?;
    if let Some(id) = existing {
        return Ok(id);
    }
    ensure_live(tx, recipient)?;
    tx.execute(
        "INSERT INTO folders (recipient_id, name, uidvalidity) VALUES (?1, 'INBOX', ?2)",
        params![recipient, mailbox::next_uidvalidity(tx, now_ms)?],
    )?;
    Ok(tx.last_insert_rowid())
}

/// The recipient's Junk folder: the one marked `\\Junk` (RFC 6154) if any, else the
/// one named "Junk", created (with the mark) when missing, for quarantined mail.
fn junk_id(tx: &rusqlite::Transaction<'_>, recipient: RecipientId, now_ms: i64) -> Result<i64> {
    let existing: Option<i64> = tx
        .prepare_cached(
            "SELECT id FROM folders WHERE recipient_id = ?1
               AND (special_use = '\\Junk' OR name = 'Junk')
             ORDER BY special_use IS NULL, id LIMIT 1",
        )?
        .query_row([recipient], |r| r.get(0))
        .optional()?;
    if let Some(id) = existing {
        return Ok(id);
    }
    ensure_live(tx, recipient)?;
    tx.execute(
        "INSERT INTO folders (recipient_id, name, uidvalidity, special_use)
         VALUES (?1, 'Junk', ?2, '\\Junk')",
        params![recipient, mailbox::next_uidvalidity(tx, now_ms)?],
    )?;
    Ok(tx.last_insert_rowid())
}

/// How a new queue entry starts.
#[derive(Clone, Copy)]
enum NewItem {
    /// Due in `queue`, for whoever claims it.
    Unclaimed(QueueName),
    /// An inbound entry already claimed for conversion, its first attempt counted
    /// (`MailStore::spool_claimed`).
    Claimed,
}

#[allow(clippy::too_many_arguments)]
fn insert_queue_item(
    tx: &rusqlite::Transaction<'_>,
    new: NewItem,
    queue_id: &str,
    blob_id: i64,
    mail_from: &str,
    recipients: &[String],
    received_at_ms: i64,
    last_error: Option<&str>,
    client: &str,
    route: Option<(&str, u64)>,
    envelope: &Envelope,
) -> Result<i64> {
    let recipients = serde_json::to_string(recipients).expect("strings serialise");
    let envelope = serde_json::to_string(envelope).expect("envelopes serialise");
    let (queue, claimed) = match new {
        NewItem::Unclaimed(queue) => (queue, false),
        NewItem::Claimed => (QueueName::Inbound, true),
    };
    tx.prepare_cached(
        "INSERT INTO queue_items
           (queue, queue_id, blob_id, mail_from, recipients, received_at_ms,
            next_attempt_at_ms, last_error, client, connector, generation, envelope,
            claimed, attempts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)",
    )?
    .execute(params![
        queue.as_str(),
        queue_id,
        blob_id,
        mail_from,
        recipients,
        received_at_ms,
        last_error,
        client,
        route.map(|r| r.0),
        route.map(|r| r.1 as i64),
        envelope,
        claimed
    ])?;
    Ok(tx.last_insert_rowid())
}

fn parse_recipients(json: String) -> Vec<String> {
    serde_json::from_str(&json).unwrap_or_default()
}

fn parse_envelope(json: String) -> Envelope {
    serde_json::from_str(&json).unwrap_or_default()
}

fn load_rows(conn: &Connection) -> Result<Vec<RecipientRow>> {
    let mut rows: Vec<RecipientRow> = conn
        .prepare(
            "SELECT id, alias, kind, display_name, doc, password_hash FROM recipients ORDER BY id",
        )?
        .query_map([], |r| {
            Ok(RecipientRow {
                id: r.get(0)?,
                alias: r.get(1)?,
                kind: r.get(2)?,
                display_name: r.get(3)?,
                addresses: Vec::new(),
                doc: r.get(4)?,
                password_hash: r.get(5)?,
            })
        })?
        .collect::<std::result::Result<_, _>>()?;
    let mut index = std::collections::HashMap::new();
    for (position, row) in rows.iter().enumerate() {
        index.insert(row.id, position);
    }
    let mut stmt = conn.prepare(
        "SELECT recipient_id, address, is_primary, generated FROM recipient_addresses
         ORDER BY recipient_id, is_primary DESC, rowid",
    )?;
    let addresses = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            AddressRecord {
                address: r.get(1)?,
                primary: r.get(2)?,
                generated: r.get(3)?,
            },
        ))
    })?;
    for address in addresses {
        let (id, address) = address?;
        if let Some(&position) = index.get(&id) {
            rows[position].addresses.push(address);
        }
    }
    Ok(rows)
}

fn put_recipient(tx: &rusqlite::Transaction<'_>, row: &RecipientRow) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO recipients (id, alias, kind, display_name, doc, password_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (id) DO UPDATE SET alias = ?2, kind = ?3, display_name = ?4, doc = ?5,
                                        password_hash = ?6",
    )?
    .execute(params![
        row.id,
        row.alias,
        row.kind,
        row.display_name,
        row.doc,
        row.password_hash
    ])?;
    tx.prepare_cached("DELETE FROM recipient_addresses WHERE recipient_id = ?1")?
        .execute([row.id])?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO recipient_addresses (address, recipient_id, is_primary, generated)
         VALUES (?1, ?2, ?3, ?4)",
    )?;
    for address in &row.addresses {
        insert
            .execute(params![
                address.address,
                row.id,
                address.primary,
                address.generated
            ])
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    StoreError::Conflict(format!("address {} is already in use", address.address))
                }
                other => other.into(),
            })?;
    }
    Ok(())
}

/// Deletes a recipient from the directory database and records the deletion, so that
/// its mailboxes are purged from the mail database ([`SqliteStore::purge_deleted`]) and
/// its identity is never handed out again (`StoredDirectory::id_floor`).
fn delete_recipient(tx: &rusqlite::Transaction<'_>, id: RecipientId) -> Result<()> {
    tx.prepare_cached("DELETE FROM recipients WHERE id = ?1")?
        .execute([id])?;
    tx.prepare_cached(
        "INSERT INTO deleted_recipients (id, purged) VALUES (?1, 0)
         ON CONFLICT (id) DO UPDATE SET purged = 0",
    )?
    .execute([id])?;
    Ok(())
}

/// Removes a deleted recipient's folders and messages from the mail database, releasing
/// their bodies, and records it as purged so that a late delivery planned before the
/// deletion cannot create its INBOX again (see [`ensure_live`]).
fn purge_mailbox(tx: &rusqlite::Transaction<'_>, id: RecipientId) -> Result<()> {
    let bodies: Vec<(i64, i64)> = tx
        .prepare_cached(
            "SELECT m.blob_id, COUNT(*) FROM messages m JOIN folders f ON f.id = m.folder_id
             WHERE f.recipient_id = ?1 GROUP BY m.blob_id",
        )?
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<std::result::Result<_, _>>()?;
    tx.prepare_cached("DELETE FROM folders WHERE recipient_id = ?1")?
        .execute([id])?;
    for (blob_id, count) in bodies {
        adjust_blob_refs(tx, blob_id, -count)?;
    }
    tx.prepare_cached("INSERT OR IGNORE INTO purged_recipients (id) VALUES (?1)")?
        .execute([id])?;
    Ok(())
}

/// Refuses to create a folder for a recipient whose mailboxes were purged: the
/// directory deleted it, and a delivery planned from an older snapshot must be planned
/// again (it then finds the recipient gone), not recreate its INBOX. Checked only when
/// a folder is created, so deliveries to existing folders pay nothing.
pub(crate) fn ensure_live(tx: &rusqlite::Transaction<'_>, recipient: RecipientId) -> Result<()> {
    let purged = tx
        .prepare_cached("SELECT 1 FROM purged_recipients WHERE id = ?1")?
        .exists([recipient])?;
    if purged {
        return Err(StoreError::NotFound(format!(
            "recipient {recipient} was deleted"
        )));
    }
    Ok(())
}

/// The columns [`item_info`] reads, in order (the `q` queue entry, `b` its body).
pub(crate) const ITEM_COLUMNS: &str = "q.id, q.queue, q.queue_id, q.mail_from, q.recipients,
    q.received_at_ms, q.attempts, q.last_error, b.size, q.next_attempt_at_ms, q.connector,
    q.generation, q.held, q.envelope";

/// A queue entry for the viewer, from a row of [`ITEM_COLUMNS`].
pub(crate) fn item_info(r: &rusqlite::Row<'_>) -> rusqlite::Result<QueueItemInfo> {
    Ok(QueueItemInfo {
        id: r.get(0)?,
        queue: QueueName::parse(&r.get::<_, String>(1)?).unwrap_or(QueueName::Quarantine),
        queue_id: r.get(2)?,
        mail_from: r.get(3)?,
        recipients: parse_recipients(r.get(4)?),
        received_at_ms: r.get(5)?,
        attempts: r.get(6)?,
        last_error: r.get(7)?,
        size: r.get(8)?,
        next_attempt_at_ms: r.get(9)?,
        connector: r.get(10)?,
        generation: r.get::<_, Option<i64>>(11)?.map(|g| g as u64),
        held: r.get(12)?,
        envelope: parse_envelope(r.get(13)?),
    })
}

fn folder_id(conn: &Connection, recipient: RecipientId, folder: &str) -> Result<Option<i64>> {
    Ok(conn
        .query_row(
            "SELECT id FROM folders WHERE recipient_id = ?1 AND name = ?2",
            params![recipient, folder],
            |r| r.get(0),
        )
        .optional()?)
}

impl SqliteStore {
    /// [`MailStore::write_directory`] as `caller` (a relaxed caller's commit is not
    /// fsynced, see `RELAXED_CALLERS`).
    fn write_directory_as(&self, caller: &'static str, writes: &[DirectoryWrite]) -> Result<()> {
        self.write_to(&self.directory, caller, |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for write in writes {
                match write {
                    DirectoryWrite::PutRecipient(row) => put_recipient(&tx, row)?,
                    DirectoryWrite::DeleteRecipient(id) => delete_recipient(&tx, *id)?,
                    DirectoryWrite::PutSettings {
                        site,
                        previous_routing,
                    } => {
                        let mut put = tx.prepare_cached(
                            "INSERT INTO directory_settings (key, value) VALUES (?1, ?2)
                             ON CONFLICT (key) DO UPDATE SET value = ?2",
                        )?;
                        put.execute(params!["site", site])?;
                        put.execute(params!["routing.previous", previous_routing])?;
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })?;
        if writes
            .iter()
            .any(|w| matches!(w, DirectoryWrite::DeleteRecipient(_)))
            && let Err(e) = self.purge_deleted()
        {
            // The deletion stands (the directory committed it, and the recipient can no
            // longer log in or receive mail); its mailboxes are purged at the next
            // deletion or start-up.
            tracing::warn!(error = %e, "the mailboxes of deleted recipients could not be purged yet");
        }
        Ok(())
    }
}

impl MailStore for SqliteStore {
    fn backup_to(&self, dir: &Path) -> Result<BackupManifest> {
        SqliteStore::backup_to(self, dir)
    }

    fn admit_new(&self, bytes: u64) -> std::result::Result<(), crate::NoSpace> {
        match self.disk.get() {
            Some(disk) => disk.admit(bytes),
            None => Ok(()),
        }
    }

    fn spool_claimed(&self, entries: &[SpoolEntry], claimed: usize) -> Result<Vec<i64>> {
        // Hashed before the write turn: everything done inside it is time that delivery
        // and the next spool commit wait for.
        let keys: Vec<Vec<u8>> = entries
            .iter()
            .map(|e| spool_blob_key(&e.queue_id, &blake3::hash(&e.body)))
            .collect();
        let received: Vec<track::Prepared> = if self.tracking() {
            entries
                .iter()
                .map(|e| track::Prepared::from(&TrackEvent::received(e)))
                .collect()
        } else {
            Vec::new()
        };
        self.write_first("spool", |conn| {
            // FULL: the WAL is fsynced at this commit, which is what lets SMTP say "250".
            // (Under `durability = "full"` every connection already runs so.)
            let switch = self.synchronous() != "FULL";
            if switch {
                set_synchronous(conn, "FULL")?;
            }
            let result = (|| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let mut ids = Vec::with_capacity(entries.len());
                for (index, (entry, key)) in entries.iter().zip(&keys).enumerate() {
                    let blob_id = put_keyed_blob(&tx, &entry.body, key)?;
                    ids.push(insert_queue_item(
                        &tx,
                        if index < claimed {
                            NewItem::Claimed
                        } else {
                            NewItem::Unclaimed(QueueName::Inbound)
                        },
                        &entry.queue_id,
                        blob_id,
                        &entry.mail_from,
                        &entry.recipients,
                        entry.received_at_ms,
                        None,
                        &entry.client,
                        None,
                        &entry.envelope,
                    )?);
                }
                track::record_prepared(&tx, &received)?;
                tx.commit()?;
                // Before the next batch is admitted, and still in the turn, so that
                // the reading includes this batch. Committed is committed: a failed
                // reading leaves the last one (the checkpointer takes another).
                if let Err(e) = self.measure_owed(conn) {
                    tracing::debug!(error = %e, "cannot measure the database's size");
                }
                Ok(ids)
            })();
            if switch {
                set_synchronous(conn, self.synchronous())?;
            }
            result
        })
        .inspect(|_| self.mail_moved())
    }

    fn mail_active_at_ms(&self) -> UnixMillis {
        self.mail_active_at_ms
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn release_claims(&self) -> Result<u64> {
        self.write("release", |conn| {
            Ok(conn.execute("UPDATE queue_items SET claimed = 0 WHERE claimed = 1", [])? as u64)
        })
    }

    fn claim_inbound(&self, now_ms: UnixMillis, limit: usize) -> Result<Vec<ClaimedItem>> {
        if !self.anything_due(
            "SELECT EXISTS (SELECT 1 FROM queue_items WHERE queue = 'inbound' AND claimed = 0
                                                      AND next_attempt_at_ms <= ?1)",
            now_ms,
        )? {
            return Ok(Vec::new());
        }
        self.write("claim", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let claimed = {
                let mut claim = tx.prepare_cached(
                    "UPDATE queue_items SET claimed = 1, attempts = attempts + 1
                     WHERE id IN (SELECT id FROM queue_items
                                  WHERE queue = 'inbound' AND claimed = 0
                                    AND next_attempt_at_ms <= ?1
                                  ORDER BY next_attempt_at_ms, id LIMIT ?2)
                     RETURNING id, queue_id, mail_from, recipients, received_at_ms,
                               attempts, blob_id, envelope",
                )?;
                let rows = claim.query_map(params![now_ms, limit as i64], |r| {
                    Ok((
                        ClaimedItem {
                            id: r.get(0)?,
                            queue_id: r.get(1)?,
                            mail_from: r.get(2)?,
                            recipients: parse_recipients(r.get(3)?),
                            body: Vec::new(),
                            received_at_ms: r.get(4)?,
                            attempts: r.get(5)?,
                            envelope: parse_envelope(r.get(7)?),
                        },
                        r.get::<_, i64>(6)?,
                    ))
                })?;
                rows.collect::<std::result::Result<Vec<_>, _>>()?
            };
            let mut items = Vec::with_capacity(claimed.len());
            {
                let mut body = tx.prepare_cached("SELECT data FROM blobs WHERE id = ?1")?;
                for (mut item, blob_id) in claimed {
                    item.body = body.query_row([blob_id], |r| r.get(0))?;
                    items.push(item);
                }
            }
            tx.commit()?;
            items.sort_by_key(|item| item.id);
            Ok(items)
        })
    }

    fn deliver_inbound(
        &self,
        batch: &[(&ClaimedItem, &DeliveryPlan)],
        now_ms: UnixMillis,
    ) -> Result<Vec<Vec<Delivered>>> {
        // Serialised before the write turn (see `spool`).
        let facts: Vec<String> = batch
            .iter()
            .map(|(_, plan)| serde_json::to_string(&plan.facts).expect("facts serialise"))
            .collect();
        let tracking = self.tracking();
        let trails: Vec<Vec<track::Prepared>> = batch
            .iter()
            .map(|(item, plan)| {
                if tracking {
                    plan_events(item, plan, now_ms)
                } else {
                    Vec::new()
                }
            })
            .collect();
        let results = self.write("deliver", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut results = Vec::with_capacity(batch.len());
            for (((item, plan), facts), trail) in batch.iter().zip(&facts).zip(&trails) {
                results.push(deliver_one(
                    &tx, item, plan, facts, trail, tracking, now_ms,
                )?);
            }
            tx.commit()?;
            Ok(results)
        })?;
        let touched: Vec<RecipientId> = batch
            .iter()
            .flat_map(|(_, plan)| plan.local.iter().copied())
            .collect();
        self.ring(&touched);
        self.mail_moved();
        Ok(results)
    }

    fn defer_inbound(
        &self,
        item: &ClaimedItem,
        error: &str,
        retry_at_ms: UnixMillis,
    ) -> Result<()> {
        let now = mailroom_watch::now_ms();
        self.write("defer", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let deferred: Option<(String, i64)> = tx
                .query_row(
                    "UPDATE queue_items SET claimed = 0, last_error = ?2, next_attempt_at_ms = ?3
                     WHERE id = ?1 AND queue_id = ?4 AND queue = 'inbound'
                     RETURNING queue_id, attempts",
                    params![item.id, error, retry_at_ms, item.queue_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((queue_id, attempts)) = deferred.filter(|_| self.tracking()) {
                let event = TrackEvent::new(TrackKind::Deferred, &queue_id, now)
                    .with("stage", "conversion")
                    .with("reason", error)
                    .with("attempt", attempts)
                    .with("next_attempt_at_ms", retry_at_ms)
                    .with("next_attempt", crate::track::rfc3339(retry_at_ms));
                track::record_events(&tx, &[event])?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn quarantine_inbound(&self, item: &ClaimedItem, reason: &str) -> Result<()> {
        let now = mailroom_watch::now_ms();
        let id = item.id;
        self.write("quarantine", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let moved: Option<(String, String)> = tx
                .query_row(
                    "UPDATE queue_items SET queue = 'quarantine', claimed = 0, last_error = ?2
                     WHERE id = ?1 AND queue_id = ?3 AND queue = 'inbound'
                     RETURNING queue_id, recipients",
                    params![id, reason, item.queue_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((queue_id, recipients)) = moved.filter(|_| self.tracking()) {
                let event = TrackEvent::new(TrackKind::Quarantined, &queue_id, now)
                    .recipients(parse_recipients(recipients))
                    .with("reason", reason)
                    .with("entry", id);
                track::record_events(&tx, &[event])?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn inbound_due(&self, now_ms: UnixMillis) -> Result<(u64, Option<UnixMillis>)> {
        self.with_conn(|conn| {
            Ok(conn.query_row(
                "SELECT COUNT(*), MIN(received_at_ms) FROM queue_items
                 WHERE queue = 'inbound' AND next_attempt_at_ms <= ?1",
                [now_ms],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
        })
    }

    fn next_inbound_due(&self) -> Result<Option<UnixMillis>> {
        self.with_conn(|conn| {
            Ok(conn.query_row(
                "SELECT MIN(next_attempt_at_ms) FROM queue_items
                 WHERE queue = 'inbound' AND claimed = 0",
                [],
                |r| r.get(0),
            )?)
        })
    }

    fn queue_summaries(&self) -> Result<Vec<QueueSummary>> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT q.queue, COUNT(*), COALESCE(SUM(b.size), 0), MIN(q.received_at_ms)
                 FROM queue_items q JOIN blobs b ON b.id = q.blob_id GROUP BY q.queue",
            )?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, u64>(1)?,
                        r.get::<_, u64>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                    ))
                })?
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(QueueName::ALL
                .into_iter()
                .map(|queue| {
                    let row = rows.iter().find(|r| r.0 == queue.as_str());
                    QueueSummary {
                        queue,
                        depth: row.map_or(0, |r| r.1),
                        bytes: row.map_or(0, |r| r.2),
                        oldest_received_at_ms: row.and_then(|r| r.3),
                    }
                })
                .collect())
        })
    }

    fn queue_items(
        &self,
        queue: Option<QueueName>,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Vec<QueueItemInfo>> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT q.id, q.queue, q.queue_id, q.mail_from, q.recipients, q.received_at_ms,
                        q.attempts, q.last_error, b.size, q.next_attempt_at_ms,
                        q.connector, q.generation, q.held, q.envelope
                 FROM queue_items q JOIN blobs b ON b.id = q.blob_id
                 WHERE (?1 IS NULL OR q.queue = ?1) AND q.id > ?3
                 ORDER BY q.id LIMIT ?2",
            )?;
            let rows = stmt
                .query_map(
                    params![queue.map(QueueName::as_str), limit, after.unwrap_or(0)],
                    item_info,
                )?
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn ensure_topology(&self, wanted: &Topology) -> Result<Topology> {
        self.write_to(&self.directory, "topology", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let existing: Option<Topology> = tx
                .query_row(
                    "SELECT organization, site, server FROM topology WHERE id = 1",
                    [],
                    |r| {
                        Ok(Topology {
                            organization: r.get(0)?,
                            site: r.get(1)?,
                            server: r.get(2)?,
                        })
                    },
                )
                .optional()?;
            if existing.as_ref() != Some(wanted) {
                if let Some(old) = &existing {
                    tracing::info!(?old, new = ?wanted, "renaming organization, site or server");
                }
                tx.execute(
                    "INSERT INTO topology (id, organization, site, server) VALUES (1, ?1, ?2, ?3)
                     ON CONFLICT (id) DO UPDATE SET organization = ?1, site = ?2, server = ?3",
                    params![wanted.organization, wanted.site, wanted.server],
                )?;
            }
            tx.commit()?;
            Ok(wanted.clone())
        })
    }

    fn load_directory(&self) -> Result<StoredDirectory> {
        self.with_conn_to(&self.directory, |conn| {
            let recipients = load_rows(conn)?;
            let deleted_max: Option<RecipientId> =
                conn.query_row("SELECT MAX(id) FROM deleted_recipients", [], |r| r.get(0))?;
            let setting = |key: &str| -> Result<Option<String>> {
                Ok(conn
                    .query_row(
                        "SELECT value FROM directory_settings WHERE key = ?1",
                        [key],
                        |r| r.get(0),
                    )
                    .optional()?)
            };
            Ok(StoredDirectory {
                id_floor: deleted_max.map_or(1, |id| id + 1),
                recipients,
                site: setting("site")?,
                previous_routing: setting("routing.previous")?.unwrap_or_default(),
            })
        })
    }

    fn write_directory(&self, writes: &[DirectoryWrite]) -> Result<()> {
        self.write_directory_as("directory", writes)
    }

    fn write_directory_background(&self, writes: &[DirectoryWrite]) -> Result<()> {
        self.write_directory_as("directory background", writes)
    }

    fn sync_directory(&self) -> Result<()> {
        // Every commit appended its frames to the WAL file; an fsync of that file makes
        // all of them durable, as the next FULL commit's would. (What a checkpoint
        // already copied into the database file was fsynced by the checkpoint.) In the
        // write turn, so that no commit or checkpoint runs meanwhile.
        let mut wal = self.directory.path.clone().into_os_string();
        wal.push("-wal");
        self.write_to(
            &self.directory,
            "directory sync",
            |_| match std::fs::File::open(&wal) {
                Ok(file) => file
                    .sync_data()
                    .map_err(|e| io_fault(&format!("fsync of the directory's WAL: {e}"))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_fault(&format!("opening the directory's WAL: {e}"))),
            },
        )
    }

    fn mailbox_messages(
        &self,
        recipient: RecipientId,
        folder: &str,
    ) -> Result<Vec<MessageSummary>> {
        self.with_conn(|conn| {
            let Some(folder) = folder_id(conn, recipient, folder)? else {
                return Ok(Vec::new());
            };
            let mut stmt = conn.prepare_cached(
                "SELECT m.uid, m.size, m.received_at_ms, m.return_path, f.facts
                 FROM messages m LEFT JOIN blob_facts f ON f.blob_id = m.blob_id
                 WHERE m.folder_id = ?1 ORDER BY m.uid",
            )?;
            let rows = stmt
                .query_map([folder], |r| {
                    let facts: Option<String> = r.get(4)?;
                    let facts: MessageFacts = facts
                        .and_then(|f| serde_json::from_str(&f).ok())
                        .unwrap_or_default();
                    Ok(MessageSummary {
                        uid: r.get(0)?,
                        size: r.get(1)?,
                        received_at_ms: r.get(2)?,
                        return_path: r.get(3)?,
                        message_id: facts.message_id,
                        from: facts.from,
                        to: facts.to,
                        subject: facts.subject,
                    })
                })?
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn message_raw(
        &self,
        recipient: RecipientId,
        folder: &str,
        uid: u32,
    ) -> Result<Option<Vec<u8>>> {
        self.with_conn(|conn| {
            let Some(folder) = folder_id(conn, recipient, folder)? else {
                return Ok(None);
            };
            let row: Option<(String, Vec<u8>, bool)> = conn
                .query_row(
                    "SELECT m.return_path, b.data, m.trace FROM messages m
                     JOIN blobs b ON b.id = m.blob_id
                     WHERE m.folder_id = ?1 AND m.uid = ?2",
                    params![folder, uid],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            Ok(row.map(|(return_path, data, trace)| {
                if !trace {
                    return data;
                }
                let mut out = return_path_header(&return_path).into_bytes();
                out.extend_from_slice(&data);
                out
            }))
        })
    }

    fn blob_count(&self) -> Result<u64> {
        self.with_conn(|conn| Ok(conn.query_row("SELECT COUNT(*) FROM blobs", [], |r| r.get(0))?))
    }

    fn folder_status(&self, recipient: RecipientId, folder: &str) -> Result<Option<FolderStatus>> {
        self.with_conn(|conn| {
            Ok(conn
                .query_row(
                    "SELECT f.uidvalidity, f.uidnext, f.highestmodseq, f.message_count, f.bytes
                     FROM folders f WHERE f.recipient_id = ?1 AND f.name = ?2",
                    params![recipient, folder],
                    |r| {
                        Ok(FolderStatus {
                            uidvalidity: r.get(0)?,
                            uidnext: r.get(1)?,
                            highestmodseq: r.get::<_, i64>(2)? as u64,
                            messages: r.get(3)?,
                            bytes: r.get::<_, i64>(4)? as u64,
                        })
                    },
                )
                .optional()?)
        })
    }

    fn expunge(&self, recipient: RecipientId, folder: &str, uids: &[u32]) -> Result<u64> {
        if uids.is_empty() {
            return Ok(0);
        }
        self.write("expunge", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(folder) = folder_id(&tx, recipient, folder)? else {
                return Ok(0);
            };
            let mut removed = Vec::new();
            {
                let mut delete = tx.prepare_cached(
                    "DELETE FROM messages WHERE folder_id = ?1 AND uid = ?2 RETURNING blob_id",
                )?;
                for &uid in uids {
                    let blob: Option<i64> = delete
                        .query_row(params![folder, uid], |r| r.get(0))
                        .optional()?;
                    if let Some(blob) = blob {
                        adjust_blob_refs(&tx, blob, -1)?;
                        removed.push(uid);
                    }
                }
            }
            if !removed.is_empty() {
                let modseq: i64 = tx.query_row(
                    "UPDATE folders SET highestmodseq = highestmodseq + 1 WHERE id = ?1
                     RETURNING highestmodseq",
                    [folder],
                    |r| r.get(0),
                )?;
                mailbox::record_expunged(&tx, folder, &removed, modseq)?;
            }
            tx.commit()?;
            Ok(removed.len() as u64)
        })
        .inspect(|removed| {
            if *removed > 0 {
                self.ring(&[recipient]);
            }
        })
    }

    fn track(&self, query: &TrackQuery) -> Result<Vec<TrackEvent>> {
        self.with_conn(|conn| track::track(conn, query))
    }

    fn prune_tracking(&self, before_ms: UnixMillis, max: u32) -> Result<u64> {
        self.write("prune tracking", |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let removed = track::prune(&tx, before_ms, max)?;
            tx.commit()?;
            Ok(removed)
        })
    }
}

/// One entry's delivery inside the caller's transaction; see `deliver_inbound`.
/// The trail's "converted" and "expanded" events of one delivery, prepared before the
/// write turn.
fn plan_events(
    item: &ClaimedItem,
    plan: &DeliveryPlan,
    now_ms: UnixMillis,
) -> Vec<track::Prepared> {
    let mut events = Vec::with_capacity(1 + plan.expanded.len());
    let remote: Vec<serde_json::Value> = plan
        .remote
        .iter()
        .map(|r| serde_json::json!({"connector": r.connector, "recipients": r.recipients}))
        .collect();
    let mut converted = TrackEvent::new(TrackKind::Converted, &item.queue_id, now_ms)
        .recipients(item.recipients.iter().cloned())
        .with("parsed", plan.facts.parsed)
        .with("local", plan.local.len())
        .with("remote", remote)
        .with("attempt", item.attempts);
    if let Some(subject) = &plan.facts.subject {
        converted = converted.with("subject", subject.chars().take(200).collect::<String>());
    }
    if !plan.undeliverable.is_empty() {
        let undeliverable: Vec<serde_json::Value> = plan
            .undeliverable
            .iter()
            .map(|(a, why)| serde_json::json!({"address": a, "reason": why}))
            .collect();
        converted = converted.with("undeliverable", undeliverable);
    }
    if let Some(junk) = &item.envelope.junk {
        converted = converted.with("junk", junk.as_str());
    }
    events.push(converted);
    for (list, members) in &plan.expanded {
        events.push(
            TrackEvent::new(TrackKind::Expanded, &item.queue_id, now_ms)
                .recipients(members.iter().cloned())
                .with("list", list.as_str()),
        );
    }
    events.iter().map(track::Prepared::from).collect()
}

fn deliver_one(
    tx: &rusqlite::Transaction<'_>,
    item: &ClaimedItem,
    plan: &DeliveryPlan,
    facts: &str,
    trail: &[track::Prepared],
    tracking: bool,
    now_ms: UnixMillis,
) -> Result<Vec<Delivered>> {
    // Removing the inbound entry first proves the claim is still ours: if it is gone,
    // another delivery already happened and this one must not. The entry must also be
    // the same message (its queue id): row ids are reused once the rows above them are
    // gone, and a claim that outlived its entry must not deliver its message with the
    // body of whatever took the id. (A read and a delete rather than `DELETE ...
    // RETURNING`: every RETURNING statement opens a temporary B-tree for its rows, a
    // handful of allocations each time; in the write turn nothing can change the row
    // between the two.)
    let found: Option<(i64, String, i64)> = tx
        .prepare_cached(
            "SELECT q.blob_id, q.client, b.size FROM queue_items q JOIN blobs b ON b.id = q.blob_id
             WHERE q.id = ?1 AND q.queue_id = ?2 AND q.queue = 'inbound' AND q.claimed = 1",
        )?
        .query_row(params![item.id, item.queue_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let Some((blob_id, client, blob_size)) = found else {
        return Err(StoreError::NotFound(format!(
            "inbound queue entry {} ({}) is no longer claimed (already delivered?)",
            item.id, item.queue_id
        )));
    };
    tx.prepare_cached("DELETE FROM queue_items WHERE id = ?1")?
        .execute([item.id])?;
    tx.prepare_cached("INSERT OR IGNORE INTO blob_facts (blob_id, facts) VALUES (?1, ?2)")?
        .execute(params![blob_id, facts])?;
    let size = blob_size + return_path_header(&item.mail_from).len() as i64;
    let mut delivered = Vec::with_capacity(plan.local.len());
    for &recipient in &plan.local {
        let folder = match &item.envelope.junk {
            None => inbox_id(tx, recipient, now_ms)?,
            Some(_) => junk_id(tx, recipient, now_ms)?,
        };
        let (uid, modseq) = next_uid(tx, folder)?;
        tx.prepare_cached(
            "INSERT INTO messages (folder_id, uid, blob_id, return_path, received_at_ms, size,
                                   modseq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            folder,
            uid,
            blob_id,
            item.mail_from,
            now_ms,
            size,
            modseq
        ])?;
        delivered.push(Delivered { recipient, uid });
    }
    // The conversion's events were prepared before the write turn; only the UIDs
    // are new here. (With tracking off nothing is recorded, and the routing below
    // still runs: an early return here once left remote and undeliverable
    // recipients unqueued.)
    if tracking {
        record_delivery_trail(tx, item, plan, trail, &delivered, now_ms)?;
    }
    let mut references = plan.local.len() as i64 - 1;
    for route in &plan.remote {
        insert_queue_item(
            tx,
            NewItem::Unclaimed(QueueName::Outbound),
            &item.queue_id,
            blob_id,
            &item.mail_from,
            &route.recipients,
            item.received_at_ms,
            None,
            &client,
            Some((&route.connector, route.generation)),
            &item.envelope.derive(&route.recipients, |_| None),
        )?;
        references += 1;
    }
    if !plan.undeliverable.is_empty() {
        let addresses: Vec<String> = plan.undeliverable.iter().map(|(a, _)| a.clone()).collect();
        let reasons: Vec<String> = plan
            .undeliverable
            .iter()
            .map(|(a, why)| format!("{a}: {why}"))
            .collect();
        insert_queue_item(
            tx,
            NewItem::Unclaimed(QueueName::Undeliverable),
            &item.queue_id,
            blob_id,
            &item.mail_from,
            &addresses,
            item.received_at_ms,
            Some(&reasons.join("; ")),
            &client,
            None,
            &item.envelope.derive(&addresses, |address| {
                plan.undeliverable
                    .iter()
                    .find(|(a, _)| a == address)
                    .map(|(_, why)| why.clone())
            }),
        )?;
        references += 1;
    }
    if references != 0 {
        adjust_blob_refs(tx, blob_id, references)?;
    }
    Ok(delivered)
}

/// Records a delivery's trail: the conversion's prepared events, then one
/// `delivered` event per mailbox with its folder and UID.
fn record_delivery_trail(
    tx: &rusqlite::Transaction<'_>,
    item: &ClaimedItem,
    plan: &DeliveryPlan,
    trail: &[track::Prepared],
    delivered: &[Delivered],
    now_ms: UnixMillis,
) -> Result<()> {
    track::record_prepared(tx, trail)?;
    let folder = if item.envelope.junk.is_some() {
        "Junk"
    } else {
        "INBOX"
    };
    let mut events = Vec::with_capacity(delivered.len());
    for (i, d) in delivered.iter().enumerate() {
        let mut event = TrackEvent::new(TrackKind::Delivered, &item.queue_id, now_ms)
            .with("folder", folder)
            .with("uid", d.uid)
            .with("recipient_id", d.recipient);
        if let Some(address) = plan.local_addresses.get(i) {
            event = event
                .recipients([address.as_str()])
                .with("mailbox", address.as_str());
        }
        events.push(event);
    }
    track::record_events(tx, &events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: &[u8], rcpts: &[&str]) -> SpoolEntry {
        SpoolEntry {
            queue_id: "q1".into(),
            mail_from: "a@b.example".into(),
            recipients: rcpts.iter().map(|s| s.to_string()).collect(),
            body: body.to_vec(),
            received_at_ms: 1000,
            client: "127.0.0.1".into(),
            ..SpoolEntry::default()
        }
    }

    fn row(id: RecipientId, alias: &str, address: &str) -> RecipientRow {
        RecipientRow {
            id,
            alias: alias.into(),
            kind: "mailbox".into(),
            display_name: alias.into(),
            addresses: vec![AddressRecord {
                address: address.into(),
                primary: true,
                generated: false,
            }],
            doc: "{}".into(),
            password_hash: None,
        }
    }

    fn recipient(store: &SqliteStore, alias: &str) -> RecipientId {
        let id = store.load_directory().unwrap().recipients.len() as i64 + 1;
        store
            .write_directory(&[DirectoryWrite::PutRecipient(row(
                id,
                alias,
                &format!("{alias}@example.test"),
            ))])
            .unwrap();
        id
    }

    /// Spooled bodies are keyed by queue id and hash (`spool_blob_key`): two messages
    /// with the same bytes get a body each, delivered copies share their message's, and
    /// expunging one message's copy leaves the other's body readable.
    #[test]
    fn equal_spooled_bodies_are_kept_apart_and_outlive_each_others_expunge() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let a = recipient(&store, "a");
        let b = recipient(&store, "b");
        let body = b"Subject: same\r\n\r\nthe same bytes\r\n";
        store
            .spool(&[
                SpoolEntry {
                    queue_id: "Q1".into(),
                    ..entry(body, &["a@example.test", "b@example.test"])
                },
                SpoolEntry {
                    queue_id: "Q2".into(),
                    ..entry(body, &["a@example.test"])
                },
            ])
            .unwrap();
        assert_eq!(store.blob_count().unwrap(), 2, "one body per message");
        let items = store.claim_inbound(2000, 10).unwrap();
        let both = DeliveryPlan {
            local: vec![a, b],
            ..Default::default()
        };
        let only_a = DeliveryPlan {
            local: vec![a],
            ..Default::default()
        };
        store
            .deliver_inbound(&[(&items[0], &both), (&items[1], &only_a)], 3000)
            .unwrap();
        assert_eq!(
            store.blob_count().unwrap(),
            2,
            "copies share their message's body"
        );
        assert_eq!(store.expunge(a, "INBOX", &[1]).unwrap(), 1);
        assert_eq!(
            store.blob_count().unwrap(),
            2,
            "b's copy of Q1 keeps its body"
        );
        assert_eq!(store.expunge(b, "INBOX", &[1]).unwrap(), 1);
        assert_eq!(
            store.blob_count().unwrap(),
            1,
            "Q1's body went with its last copy"
        );
        let raw = store.message_raw(a, "INBOX", 2).unwrap().unwrap();
        assert!(raw.ends_with(body), "Q2's copy still reads back whole");
    }

    #[test]
    fn the_directory_lives_in_its_own_file_and_deletions_purge_mailboxes_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mailroom.db");
        let store = SqliteStore::open(&path).unwrap();
        let a = recipient(&store, "a");
        let b = recipient(&store, "b");
        store
            .spool(&[
                entry(b"first", &["a@example.test"]),
                entry(b"second", &["a@example.test"]),
            ])
            .unwrap();
        let mut items = store.claim_inbound(2000, 10).unwrap();
        let late = items.pop().unwrap();
        let first = items.pop().unwrap();
        let plan = DeliveryPlan {
            local: vec![a],
            ..Default::default()
        };
        store.deliver_inbound(&[(&first, &plan)], 3000).unwrap();
        // The directory's rows are in directory.db, not in the mail database.
        let directory = Connection::open(dir.path().join("directory.db")).unwrap();
        let in_directory: i64 = directory
            .query_row("SELECT count(*) FROM recipients", [], |r| r.get(0))
            .unwrap();
        assert_eq!(in_directory, 2);
        let mail = Connection::open(&path).unwrap();
        let directory_tables_in_mail: i64 = mail
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name IN ('recipients', 'recipient_addresses', 'directory_settings', 'topology')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(directory_tables_in_mail, 0);

        store
            .write_directory(&[DirectoryWrite::DeleteRecipient(a)])
            .unwrap();
        assert!(
            store.folder_status(a, "INBOX").unwrap().is_none(),
            "the deletion purged the mailbox"
        );
        // A delivery planned before the deletion (an older snapshot) must not bring the
        // mailbox back: the whole batch is refused and nothing changes.
        let error = store
            .deliver_inbound(&[(&late, &plan)], 4000)
            .expect_err("a purged recipient gets no new INBOX");
        assert!(error.to_string().contains("was deleted"), "{error}");
        assert!(store.folder_status(a, "INBOX").unwrap().is_none());
        assert_eq!(
            store.inbound_due(5000).unwrap().0,
            1,
            "the entry waits to be planned again"
        );
        drop(store);

        // Deleted identities are never handed out again, across restarts.
        let store = SqliteStore::open(&path).unwrap();
        let stored = store.load_directory().unwrap();
        assert_eq!(stored.recipients.len(), 1);
        assert_eq!(stored.recipients[0].id, b);
        assert!(
            stored.id_floor > a,
            "floor {} after deleting {a}",
            stored.id_floor
        );
    }

    #[test]
    fn a_purge_interrupted_by_a_crash_finishes_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mailroom.db");
        let store = SqliteStore::open(&path).unwrap();
        let a = recipient(&store, "a");
        store.spool(&[entry(b"body", &["a@example.test"])]).unwrap();
        let item = store.claim_inbound(2000, 10).unwrap().pop().unwrap();
        let plan = DeliveryPlan {
            local: vec![a],
            ..Default::default()
        };
        store.deliver_inbound(&[(&item, &plan)], 3000).unwrap();
        drop(store);
        // What a crash after the directory's commit and before the purge leaves: the
        // recipient deleted in directory.db, its mailbox still in mailroom.db.
        let directory = Connection::open(dir.path().join("directory.db")).unwrap();
        directory
            .execute_batch(&format!(
                "DELETE FROM recipients WHERE id = {a};
                 INSERT INTO deleted_recipients (id, purged) VALUES ({a}, 0);"
            ))
            .unwrap();
        drop(directory);
        let store = SqliteStore::open(&path).unwrap();
        assert!(store.folder_status(a, "INBOX").unwrap().is_none());
        assert_eq!(store.blob_count().unwrap(), 0, "the body was released");
    }

    #[test]
    fn delivery_moves_entry_and_shares_one_body() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let a = recipient(&store, "a");
        let b = recipient(&store, "b");
        store
            .spool(&[entry(b"Subject: x\r\n\r\nhi\r\n", &["a@example.test"])])
            .unwrap();
        let item = store
            .claim_inbound(2000, 10)
            .unwrap()
            .pop()
            .expect("claimable");
        assert_eq!(item.attempts, 1);
        assert!(
            store.claim_inbound(2000, 10).unwrap().is_empty(),
            "claimed once only"
        );
        let plan = DeliveryPlan {
            local: vec![a, b],
            remote: vec![RemoteRoute {
                connector: "internet".into(),
                generation: 7,
                recipients: vec!["x@remote.example".into()],
            }],
            ..Default::default()
        };
        let delivered = store.deliver_inbound(&[(&item, &plan)], 3000).unwrap();
        assert_eq!(delivered[0].len(), 2);
        assert_eq!(store.blob_count().unwrap(), 1);
        // The second delivery of the same claim must fail: exactly once.
        assert!(store.deliver_inbound(&[(&item, &plan)], 3000).is_err());
        let raw = store.message_raw(a, "INBOX", 1).unwrap().unwrap();
        assert_eq!(
            raw,
            b"Return-Path: <a@b.example>\r\nSubject: x\r\n\r\nhi\r\n"
        );
        let summaries = store.queue_summaries().unwrap();
        let depth = |q| summaries.iter().find(|s| s.queue == q).unwrap().depth;
        assert_eq!(depth(QueueName::Inbound), 0);
        assert_eq!(depth(QueueName::Outbound), 1);
        let outbound = store
            .queue_items(Some(QueueName::Outbound), None, 10)
            .unwrap();
        assert_eq!(outbound[0].connector.as_deref(), Some("internet"));
        assert_eq!(outbound[0].generation, Some(7));
    }

    #[test]
    fn queue_pages_cover_every_entry_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let entries: Vec<SpoolEntry> = (0..25)
            .map(|i| entry(format!("m{i}").as_bytes(), &["a@example.test"]))
            .collect();
        store.spool(&entries).unwrap();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .queue_items(Some(QueueName::Inbound), after, 10)
                .unwrap();
            assert!(page.len() <= 10);
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            seen.extend(page.iter().map(|i| i.id));
        }
        assert_eq!(seen.len(), 25, "every entry once");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "in queue order");
        assert!(
            store
                .queue_items(Some(QueueName::Outbound), None, 10)
                .unwrap()
                .is_empty()
        );
    }

    /// Spools one message (queue id `queue_id`, to `rcpt`) and claims it.
    fn spool_and_claim(store: &SqliteStore, queue_id: &str, rcpt: &str) -> ClaimedItem {
        let body = format!("Message-ID: <{queue_id}@x>\r\n\r\n{queue_id}");
        store
            .spool(&[SpoolEntry {
                queue_id: queue_id.into(),
                ..entry(body.as_bytes(), &[rcpt])
            }])
            .unwrap();
        let mut claimed = store.claim_inbound(2000, 10).unwrap();
        assert_eq!(claimed.len(), 1, "one entry due");
        claimed.remove(0)
    }

    /// Inbound row ids are reused once the rows above them are delivered. A claim that
    /// outlived its entry (delivered already) must not deliver its message again with
    /// the body of the message that took the id, nor defer or quarantine that message:
    /// the entry must be the same message.
    #[test]
    fn a_stale_claim_does_not_deliver_the_message_that_reused_its_row_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let a = recipient(&store, "a");
        let stale = spool_and_claim(&store, "FIRST", "a@example.test");
        let plan = DeliveryPlan {
            local: vec![a],
            ..Default::default()
        };
        store.deliver_inbound(&[(&stale, &plan)], 3000).unwrap();
        let fresh = spool_and_claim(&store, "SECOND", "a@example.test");
        assert_eq!(fresh.id, stale.id, "the row id was reused (the premise)");
        let err = store.deliver_inbound(&[(&stale, &plan)], 3000).unwrap_err();
        assert!(err.to_string().contains("no longer claimed"), "{err}");
        // Nor may it defer or quarantine the message that took its id (either would
        // take the claim from under its worker: delivered twice, or never).
        store.defer_inbound(&stale, "4.3.0 stale", 9_000).unwrap();
        store.quarantine_inbound(&stale, "stale").unwrap();
        // The second message is delivered once, by its own claim.
        store.deliver_inbound(&[(&fresh, &plan)], 3000).unwrap();
        assert_eq!(store.mailbox_messages(a, "INBOX").unwrap().len(), 2);
        assert_eq!(store.queue_summaries().unwrap()[0].depth, 0);
    }

    /// The same for the outbound queue: an outcome recorded again after its entry was
    /// finished (a retry after a storage fault that had in fact committed) must not
    /// remove or reschedule the message that took the row id meanwhile.
    #[test]
    fn a_stale_outbound_outcome_leaves_the_message_that_reused_its_row_id_alone() {
        use crate::outbound::{OutboundOutcome, OutboundQueue};
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let a = recipient(&store, "a");
        let inbound = spool_and_claim(&store, "FIRST", "x@remote.example");
        let remote = DeliveryPlan {
            remote: vec![RemoteRoute {
                connector: "internet".into(),
                generation: 1,
                recipients: vec!["x@remote.example".into()],
            }],
            ..Default::default()
        };
        store.deliver_inbound(&[(&inbound, &remote)], 3000).unwrap();
        let out = store.claim_outbound(i64::MAX, 10).unwrap().remove(0);
        let relayed = OutboundOutcome {
            envelope: out.envelope.clone(),
            next_attempt_at_ms: None,
            last_error: None,
            route: None,
            notices: Vec::new(),
            events: Vec::new(),
        };
        store
            .finish_outbound(out.id, &out.queue_id, &relayed)
            .unwrap();
        // The next message takes the row id, claimed by conversion, then unclaimed.
        let fresh = spool_and_claim(&store, "SECOND", "a@example.test");
        assert_eq!(fresh.id, out.id, "the row id was reused (the premise)");
        let later = OutboundOutcome {
            next_attempt_at_ms: Some(9_000),
            ..relayed.clone()
        };
        for outcome in [&relayed, &later] {
            assert_eq!(
                store
                    .finish_outbound(out.id, &out.queue_id, outcome)
                    .unwrap(),
                0
            );
        }
        store.release_claims().unwrap();
        for outcome in [&relayed, &later] {
            assert_eq!(
                store
                    .finish_outbound(out.id, &out.queue_id, outcome)
                    .unwrap(),
                0
            );
        }
        // The second message is still there, due, and is delivered once.
        let fresh = store.claim_inbound(2000, 10).unwrap().remove(0);
        assert_eq!(fresh.queue_id, "SECOND");
        let local = DeliveryPlan {
            local: vec![a],
            ..Default::default()
        };
        store.deliver_inbound(&[(&fresh, &local)], 3000).unwrap();
        assert_eq!(store.mailbox_messages(a, "INBOX").unwrap().len(), 1);
    }

    #[test]
    fn a_batch_with_one_stale_entry_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let a = recipient(&store, "a");
        store
            .spool(&[
                entry(b"one", &["a@example.test"]),
                entry(b"two", &["a@example.test"]),
            ])
            .unwrap();
        let items = store.claim_inbound(2000, 10).unwrap();
        assert_eq!(items.len(), 2);
        let plan = DeliveryPlan {
            local: vec![a],
            ..Default::default()
        };
        store.deliver_inbound(&[(&items[0], &plan)], 3000).unwrap();
        let err = store
            .deliver_inbound(&[(&items[1], &plan), (&items[0], &plan)], 3000)
            .unwrap_err();
        assert!(err.to_string().contains("no longer claimed"), "{err}");
        // The failed batch rolled back: the second entry is still queued, undelivered.
        assert_eq!(store.mailbox_messages(a, "INBOX").unwrap().len(), 1);
        assert_eq!(store.queue_summaries().unwrap()[0].depth, 1);
        store.deliver_inbound(&[(&items[1], &plan)], 3000).unwrap();
        let uids: Vec<u32> = store
            .mailbox_messages(a, "INBOX")
            .unwrap()
            .iter()
            .map(|m| m.uid)
            .collect();
        assert_eq!(uids, [1, 2]);
    }

    #[test]
    fn the_trail_is_written_with_each_step_and_only_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let a = recipient(&store, "a");
        let first = SpoolEntry {
            queue_id: "Q1".into(),
            helo: Some("client.example".into()),
            user: Some("a".into()),
            ..entry(
                b"Message-ID: <m1@example.test>\r\nSubject: hello\r\n\r\nhi\r\n",
                &["list@example.test", "x@remote.example"],
            )
        };
        let second = SpoolEntry {
            queue_id: "Q2".into(),
            mail_from: "other@b.example".into(),
            ..entry(b"Subject: two\r\n\r\nhi\r\n", &["b@example.test"])
        };
        store.spool(&[first, second]).unwrap();
        let items = store.claim_inbound(2000, 10).unwrap();
        let plan = DeliveryPlan {
            facts: MessageFacts {
                subject: Some("hello".into()),
                parsed: true,
                ..Default::default()
            },
            local: vec![a],
            local_addresses: vec!["a@example.test".into()],
            expanded: vec![("list@example.test".into(), vec!["a@example.test".into()])],
            remote: vec![RemoteRoute {
                connector: "internet".into(),
                generation: 7,
                recipients: vec!["x@remote.example".into()],
            }],
            ..Default::default()
        };
        store.deliver_inbound(&[(&items[0], &plan)], 3000).unwrap();
        // A batch that fails rolls its events back with it: Q2 was not converted.
        assert!(
            store
                .deliver_inbound(&[(&items[1], &plan), (&items[0], &plan)], 3000)
                .is_err()
        );
        let query = |q: TrackQuery| store.track(&q).unwrap();
        let kinds = |events: &[TrackEvent]| events.iter().map(|e| e.event).collect::<Vec<_>>();
        let q2 = query(TrackQuery {
            queue_id: Some("Q2".into()),
            ..Default::default()
        });
        assert_eq!(kinds(&q2), [TrackKind::Received]);

        store.defer_inbound(&items[1], "4.3.0 busy", 9_000).unwrap();
        let again = store.claim_inbound(10_000, 10).unwrap();
        store
            .quarantine_inbound(&again[0], "conversion failed 5 times")
            .unwrap();
        let q2 = query(TrackQuery {
            sender: Some("OTHER@b".into()),
            ..Default::default()
        });
        assert_eq!(
            kinds(&q2),
            [
                TrackKind::Received,
                TrackKind::Deferred,
                TrackKind::Quarantined
            ]
        );
        assert_eq!(q2[1].text("reason"), Some("4.3.0 busy"));
        assert_eq!(q2[1].detail["next_attempt_at_ms"], 9_000);
        assert_eq!(q2[2].text("reason"), Some("conversion failed 5 times"));

        let outbound = store
            .queue_items(Some(QueueName::Outbound), None, 10)
            .unwrap();
        store
            .set_held(outbound[0].id, true, "cli:tester")
            .unwrap()
            .unwrap();
        let q1 = query(TrackQuery {
            message_id: Some("<m1@example.test>".into()),
            ..Default::default()
        });
        assert_eq!(
            kinds(&q1),
            [
                TrackKind::Received,
                TrackKind::Converted,
                TrackKind::Expanded,
                TrackKind::Delivered,
                TrackKind::Admin
            ]
        );
        assert!(q1.iter().all(|e| e.queue_id == "Q1"
            && e.message_id.as_deref() == Some("m1@example.test")
            && e.sender.as_deref() == Some("a@b.example")));
        let received = &q1[0];
        assert_eq!(received.text("helo"), Some("client.example"));
        assert_eq!(received.text("user"), Some("a"));
        assert_eq!(received.text("client"), Some("127.0.0.1"));
        assert_eq!(
            received.recipients,
            ["list@example.test", "x@remote.example"]
        );
        assert_eq!(q1[1].text("subject"), Some("hello"));
        assert_eq!(q1[1].detail["remote"][0]["connector"], "internet");
        assert_eq!(q1[2].text("list"), Some("list@example.test"));
        assert_eq!(q1[3].text("mailbox"), Some("a@example.test"));
        assert_eq!(q1[3].text("folder"), Some("INBOX"));
        assert_eq!(q1[3].detail["uid"], 1);
        assert_eq!(q1[4].text("action"), Some("hold"));
        assert_eq!(q1[4].text("by"), Some("cli:tester"));

        // A list member is found by the recipient filter (any case); newest message first.
        let by_member = query(TrackQuery {
            recipient: Some("A@EXAMPLE.TEST".into()),
            ..Default::default()
        });
        assert_eq!(by_member[0].queue_id, "Q1");
        assert!(by_member.iter().all(|e| e.queue_id == "Q1"));
        let both = query(TrackQuery::default());
        assert_eq!(both.first().unwrap().queue_id, "Q1", "Q1 moved last");
        assert!(
            query(TrackQuery {
                since_ms: Some(mailroom_watch::now_ms() + 60_000),
                ..Default::default()
            })
            .is_empty()
        );
        assert!(
            query(TrackQuery {
                message_id: Some("m1@example.test".into()),
                sender: Some("nobody".into()),
                ..Default::default()
            })
            .is_empty(),
            "filters combine"
        );

        // Retention: a batch at a time, then nothing older is left.
        let total = both.len() as u64;
        let future = mailroom_watch::now_ms() + 1;
        assert_eq!(store.prune_tracking(future, 3).unwrap(), 3);
        assert_eq!(store.prune_tracking(future, 100).unwrap(), total - 3);
        assert!(query(TrackQuery::default()).is_empty());

        // Tracking off (`[tracking] enabled = false`): mail flows, no trail is written.
        store.set_tracking(false);
        store
            .spool(&[SpoolEntry {
                queue_id: "Q3".into(),
                ..entry(b"Subject: three\r\n\r\nhi\r\n", &["a@example.test"])
            }])
            .unwrap();
        let items = store.claim_inbound(20_000, 10).unwrap();
        let unknown = DeliveryPlan {
            undeliverable: vec![("nobody@example.test".into(), "5.1.1 no such user".into())],
            ..plan.clone()
        };
        store
            .deliver_inbound(&[(&items[0], &unknown)], 3000)
            .unwrap();
        assert_eq!(store.mailbox_messages(a, "INBOX").unwrap().len(), 2);
        assert!(query(TrackQuery::default()).is_empty());
        // ... and the routing still happens: the remote recipient is queued for the
        // connector, the unknown one for a non-delivery report, and the body is kept
        // for both (an early return once skipped all three with tracking off).
        let queued = |queue| {
            store
                .queue_items(Some(queue), None, 10)
                .unwrap()
                .into_iter()
                .filter(|i| i.queue_id == "Q3")
                .count()
        };
        assert_eq!(queued(QueueName::Outbound), 1);
        assert_eq!(queued(QueueName::Undeliverable), 1);
        let refs: i64 = store
            .with_conn(|conn| {
                Ok(conn.query_row(
                    "SELECT b.refcount FROM blobs b JOIN queue_items q ON q.blob_id = b.id
                     WHERE q.queue_id = 'Q3' AND q.queue = 'outbound'",
                    [],
                    |r| r.get(0),
                )?)
            })
            .unwrap();
        assert_eq!(refs, 3, "the mailbox copy, the outbound entry, the report");
    }

    /// The Message-ID index is built behind the events (`index_tracking`), and a search
    /// by Message-ID finds every message with it at every moment: before the index has
    /// them, after, with some on each side, and after retention emptied the table and
    /// SQLite handed the same event ids out again.
    #[test]
    fn a_message_id_search_is_exact_before_and_after_the_index_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let spool = |queue_id: &str, message_id: &str| {
            let body = format!("Message-ID: <{message_id}>\r\nSubject: s\r\n\r\nhi\r\n");
            store
                .spool(&[SpoolEntry {
                    queue_id: queue_id.into(),
                    ..entry(body.as_bytes(), &["a@example.test"])
                }])
                .unwrap();
        };
        let found = |message_id: &str| {
            let mut ids: Vec<String> = store
                .track(&TrackQuery {
                    message_id: Some(format!("<{message_id}>")),
                    ..Default::default()
                })
                .unwrap()
                .into_iter()
                .map(|e| e.queue_id)
                .collect();
            ids.dedup();
            ids.sort();
            ids
        };
        let indexed = || -> i64 {
            store
                .with_conn(|c| {
                    Ok(c.query_row("SELECT count(*) FROM track_message_ids", [], |r| r.get(0))?)
                })
                .unwrap()
        };
        // A message sent twice (two queue ids, one Message-ID), and another.
        spool("Q1", "m1@example.test");
        spool("Q2", "m1@example.test");
        spool("Q3", "m2@example.test");
        assert_eq!(indexed(), 0);
        assert_eq!(found("m1@example.test"), ["Q1", "Q2"], "before the index");
        assert_eq!(found("m2@example.test"), ["Q3"]);
        assert_eq!(store.index_tracking().unwrap(), 3);
        assert_eq!(indexed(), 3);
        assert_eq!(store.index_tracking().unwrap(), 0, "nothing left");
        assert_eq!(found("m1@example.test"), ["Q1", "Q2"], "from the index");
        // One indexed, one not yet.
        spool("Q4", "m2@example.test");
        assert_eq!(found("m2@example.test"), ["Q3", "Q4"], "index and tail");
        assert!(found("m3@example.test").is_empty());

        // Retention takes the events and their index entries; the mark comes down with
        // the last event, so the ids SQLite reuses are searched again.
        let future = mailroom_watch::now_ms() + 1;
        assert_eq!(store.prune_tracking(future, 100).unwrap(), 4);
        assert_eq!(indexed(), 0);
        assert!(found("m1@example.test").is_empty());
        spool("Q5", "m1@example.test");
        assert_eq!(found("m1@example.test"), ["Q5"], "a reused event id");
        assert_eq!(store.index_tracking().unwrap(), 1);
        assert_eq!(found("m1@example.test"), ["Q5"]);
    }

    #[test]
    fn claims_are_released_and_quarantine_keeps_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        store.spool(&[entry(b"x", &["a@example.test"])]).unwrap();
        let item = store.claim_inbound(2000, 10).unwrap().pop().unwrap();
        assert_eq!(store.release_claims().unwrap(), 1);
        let again = store.claim_inbound(2000, 10).unwrap().pop().unwrap();
        assert_eq!(again.id, item.id);
        assert_eq!(again.attempts, 2);
        store
            .quarantine_inbound(&again, "conversion panicked")
            .unwrap();
        let items = store
            .queue_items(Some(QueueName::Quarantine), None, 10)
            .unwrap();
        assert_eq!(items[0].last_error.as_deref(), Some("conversion panicked"));
        assert!(store.claim_inbound(9999, 10).unwrap().is_empty());
    }

    #[test]
    fn a_claim_that_finds_nothing_does_not_wait_for_the_write_turn() {
        use crate::OutboundQueue;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
        // Another writer holds the mail database's write turn until told to let go.
        let (held, is_held) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let holder = {
            let store = store.clone();
            std::thread::spawn(move || {
                store
                    .write("test", |_| {
                        held.send(()).unwrap();
                        released.recv().unwrap();
                        Ok(())
                    })
                    .unwrap();
            })
        };
        is_held.recv().unwrap();
        // Empty queues: both claims answer while the turn is still held.
        let (answered, answer) = std::sync::mpsc::channel();
        {
            let store = store.clone();
            std::thread::spawn(move || {
                let inbound = store.claim_inbound(i64::MAX, 10).unwrap().len();
                let outbound = store.claim_outbound(i64::MAX, 10).unwrap().len();
                answered.send((inbound, outbound)).unwrap();
            });
        }
        let empty = answer.recv_timeout(Duration::from_secs(10));
        release.send(()).unwrap();
        holder.join().unwrap();
        assert_eq!(
            empty,
            Ok((0, 0)),
            "an empty claim waited for the write turn"
        );
        // Something due is still claimed (in the turn), once.
        store.spool(&[entry(b"x", &["a@example.test"])]).unwrap();
        assert_eq!(store.claim_inbound(i64::MAX, 10).unwrap().len(), 1);
        assert!(store.claim_inbound(i64::MAX, 10).unwrap().is_empty());
    }

    #[test]
    fn duplicate_address_is_a_conflict_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        recipient(&store, "a");
        let err = store
            .write_directory(&[DirectoryWrite::PutRecipient(row(
                2,
                "other",
                "A@example.test",
            ))])
            .unwrap_err();
        assert!(err.to_string().contains("already in use"), "{err}");
        assert_eq!(store.load_directory().unwrap().recipients.len(), 1);
    }

    #[test]
    fn deleting_a_recipient_releases_its_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let a = recipient(&store, "a");
        let b = recipient(&store, "b");
        store
            .spool(&[entry(b"shared", &["a@example.test"])])
            .unwrap();
        let item = store.claim_inbound(2000, 10).unwrap().pop().unwrap();
        let plan = DeliveryPlan {
            local: vec![a, b],
            ..Default::default()
        };
        store.deliver_inbound(&[(&item, &plan)], 3000).unwrap();
        store
            .write_directory(&[DirectoryWrite::DeleteRecipient(a)])
            .unwrap();
        assert_eq!(store.blob_count().unwrap(), 1, "b still holds the body");
        store
            .write_directory(&[DirectoryWrite::DeleteRecipient(b)])
            .unwrap();
        assert_eq!(
            store.blob_count().unwrap(),
            0,
            "the last reference freed it"
        );
    }

    #[test]
    fn expunge_removes_messages_releases_bodies_and_moves_the_modseq() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let a = recipient(&store, "a");
        assert_eq!(store.folder_status(a, "INBOX").unwrap(), None);
        store
            .spool(&[
                entry(b"one", &["a@example.test"]),
                entry(b"two", &["a@example.test"]),
            ])
            .unwrap();
        let items = store.claim_inbound(2000, 10).unwrap();
        let plan = DeliveryPlan {
            local: vec![a],
            ..Default::default()
        };
        let batch: Vec<_> = items.iter().map(|i| (i, &plan)).collect();
        store.deliver_inbound(&batch, 3000).unwrap();
        let before = store.folder_status(a, "INBOX").unwrap().unwrap();
        assert_eq!((before.messages, before.uidnext), (2, 3));
        assert_eq!(store.blob_count().unwrap(), 2);
        // UID 1 goes; 7 never existed and is ignored.
        assert_eq!(store.expunge(a, "INBOX", &[1, 7]).unwrap(), 1);
        let after = store.folder_status(a, "INBOX").unwrap().unwrap();
        assert_eq!(after.messages, 1);
        assert_eq!(after.uidnext, 3, "UIDs are never reused");
        assert_eq!(after.uidvalidity, before.uidvalidity);
        assert!(after.highestmodseq > before.highestmodseq);
        assert_eq!(
            store.blob_count().unwrap(),
            1,
            "the body of UID 1 is released"
        );
        assert_eq!(store.mailbox_messages(a, "INBOX").unwrap()[0].uid, 2);
        assert_eq!(store.expunge(a, "INBOX", &[1]).unwrap(), 0);
    }

    #[test]
    fn expunge_records_are_pruned_behind_a_floor() {
        use crate::Mailboxes;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let a = recipient(&store, "a");
        store.ensure_folder(a, "INBOX", None).unwrap();
        let folder = store
            .with_conn(|c| Ok(folder_id(c, a, "INBOX")?.unwrap()))
            .unwrap();
        // Twelve expunges (MODSEQ 101..112), keeping 10: past 11 the oldest go.
        for n in 0..12u32 {
            store
                .write("test", |conn| {
                    let tx = conn.transaction()?;
                    mailbox::record_expunged_keeping(&tx, folder, &[n + 1], 101 + n as i64, 10)?;
                    tx.commit()?;
                    Ok(())
                })
                .unwrap();
        }
        let v = store.vanished(a, "INBOX", 0).unwrap();
        assert!(!v.complete, "below the floor: not all known");
        assert_eq!(v.uids, (3..=12).collect::<Vec<u32>>(), "the newest 10 kept");
        let since = store.vanished(a, "INBOX", 102).unwrap();
        assert!(since.complete);
        assert_eq!(since.uids, (3..=12).collect::<Vec<u32>>());
        assert!(!store.vanished(a, "INBOX", 101).unwrap().complete);
    }

    #[test]
    fn expunges_and_moves_are_recorded_for_qresync() {
        use crate::Mailboxes;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let a = recipient(&store, "a");
        store.ensure_folder(a, "INBOX", None).unwrap();
        store.ensure_folder(a, "Archive", None).unwrap();
        for body in [&b"one\r\n"[..], b"two\r\n", b"three\r\n", b"four\r\n"] {
            store.append(a, "INBOX", &[], 1000, body, None).unwrap();
        }
        let start = store
            .folder_status(a, "INBOX")
            .unwrap()
            .unwrap()
            .highestmodseq;
        let fresh = store.vanished(a, "INBOX", start).unwrap();
        assert!(fresh.complete && fresh.uids.is_empty(), "{fresh:?}");
        assert_eq!(store.expunge(a, "INBOX", &[2]).unwrap(), 1);
        let mid = store
            .folder_status(a, "INBOX")
            .unwrap()
            .unwrap()
            .highestmodseq;
        store
            .copy_messages(a, "INBOX", &[4], "Archive", true)
            .unwrap();
        let v = store.vanished(a, "INBOX", start).unwrap();
        assert_eq!(
            v,
            Vanished {
                uids: vec![2, 4],
                complete: true
            }
        );
        // Since the expunge: only the move.
        assert_eq!(store.vanished(a, "INBOX", mid).unwrap().uids, vec![4]);
        // What a session catches up with: a flag change, the expunges, the new MODSEQ.
        store
            .store_flags(
                a,
                "INBOX",
                &[3],
                crate::FlagOperation::Add,
                &["\\Seen".into()],
                None,
            )
            .unwrap();
        let changes = store.folder_changes(a, "INBOX", start).unwrap();
        assert_eq!(
            changes.changed.iter().map(|m| m.uid).collect::<Vec<_>>(),
            vec![3]
        );
        assert_eq!(changes.vanished.uids, vec![2, 4]);
        let now = store
            .folder_status(a, "INBOX")
            .unwrap()
            .unwrap()
            .highestmodseq;
        assert_eq!(changes.highestmodseq, now);
        let none = store.folder_changes(a, "INBOX", now).unwrap();
        assert!(none.changed.is_empty() && none.vanished.uids.is_empty());
        // Asked from before anything was recorded (MODSEQ 0 is below the floor of a
        // folder created before... here the floor is 0, so it is complete).
        assert!(store.vanished(a, "INBOX", 0).unwrap().complete);
        assert!(store.vanished(a, "Archive", 0).unwrap().uids.is_empty());
        // Renaming INBOX empties it: every UID it had is recorded.
        store.rename_folder(a, "INBOX", "Old").unwrap();
        assert_eq!(store.vanished(a, "INBOX", mid).unwrap().uids, vec![1, 3, 4]);
        assert!(matches!(
            store.vanished(a, "Nope", 0),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn header_only_reads_stop_at_the_blank_line_wherever_it_falls() {
        use crate::Mailboxes;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let a = recipient(&store, "a");
        store.ensure_folder(a, "INBOX", None).unwrap();
        let attachment = "A".repeat(200_000);
        // Headers of 60 bytes, of about 4 KiB (the blank line straddling the first
        // read), of 20 KiB (several reads), and a message without any blank line.
        let mut bodies: Vec<(Vec<u8>, usize)> = Vec::new();
        for header_len in [60usize, 4094, 4095, 4096, 4097, 20_000] {
            let mut header = b"Subject: s\r\nX: ".to_vec();
            header.resize(header_len - 4, b'y');
            header.extend_from_slice(b"\r\n\r\n");
            let cut = header.len();
            header.extend_from_slice(attachment.as_bytes());
            bodies.push((header, cut));
        }
        let no_blank = b"Subject: no body\r\nX: y\r\n".to_vec();
        let whole = no_blank.len();
        bodies.push((no_blank, whole));
        for (body, _) in &bodies {
            store.append(a, "INBOX", &[], 1000, body, None).unwrap();
        }
        let uids: Vec<u32> = (1..=bodies.len() as u32).collect();
        let headers = store.messages_raw(a, "INBOX", &uids, true).unwrap();
        let full = store.messages_raw(a, "INBOX", &uids, false).unwrap();
        assert_eq!(headers.len(), bodies.len());
        for ((uid, header), (body, cut)) in headers.iter().zip(&bodies) {
            assert_eq!(&header[..], &body[..*cut], "header of message {uid}");
            assert!(header.ends_with(b"\r\n\r\n") || *cut == body.len());
        }
        for ((_, got), (body, _)) in full.iter().zip(&bodies) {
            assert_eq!(got, body);
        }
        // Sparse UIDs (one lookup each), repeated and missing ones: UID order, once each.
        let sparse = store
            .messages_raw(a, "INBOX", &[7, 100, 1, 7], true)
            .unwrap();
        let got: Vec<u32> = sparse.iter().map(|(uid, _)| *uid).collect();
        assert_eq!(got, [1, 7]);
        assert_eq!(sparse[1].1, bodies[6].0);
        let dense = store.messages_raw(a, "INBOX", &[3, 2, 8], false).unwrap();
        let got: Vec<u32> = dense.iter().map(|(uid, _)| *uid).collect();
        assert_eq!(got, [2, 3]);
    }

    #[test]
    fn concurrent_appends_share_commits_each_lands_once_and_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
        let ann = recipient(&store, "ann");
        store.ensure_folder(ann, "INBOX", None).unwrap();
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    (0..20)
                        .map(|n| {
                            // Every fifth APPEND of thread 0 targets a folder that does
                            // not exist: it fails, its batch-mates do not.
                            let folder = if t == 0 && n % 5 == 0 {
                                "Nowhere"
                            } else {
                                "INBOX"
                            };
                            let body = format!("Subject: {t}-{n}\r\n\r\nbody\r\n");
                            store
                                .append(ann, folder, &["$T".to_string()], 1, body.as_bytes(), None)
                                .map(|c| c.uids[0].1)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut uids = Vec::new();
        let mut refused = 0;
        for thread in threads {
            for result in thread.join().unwrap() {
                match result {
                    Ok(uid) => uids.push(uid),
                    Err(StoreError::NotFound(_)) => refused += 1,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert_eq!(refused, 4);
        assert_eq!(uids.len(), 316);
        uids.sort_unstable();
        uids.dedup();
        assert_eq!(uids.len(), 316, "every APPEND got its own UID");
        let stored = store.folder_messages(ann, "INBOX").unwrap();
        assert_eq!(stored.len(), 316);
        assert!(stored.iter().all(|m| m.flags == ["$T"]));
        assert!(store.appends.lock().is_empty(), "nothing left queued");
    }

    /// Every write, whatever its caller, goes through the database's one writer
    /// connection, so SQLite never finds that "another connection" changed the file
    /// and never drops that connection's page cache (`PRAGMA data_version` moves only
    /// for changes committed by other connections); a reader's connection does see
    /// them.
    #[test]
    fn every_write_goes_through_the_one_writer_connection() {
        use crate::Mailboxes;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let a = recipient(&store, "a");
        let version = |caller| {
            store
                .write_to(&store.mail, caller, |c| {
                    Ok(c.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))?)
                })
                .unwrap()
        };
        let read_version = || {
            store
                .with_conn(|c| Ok(c.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))?))
                .unwrap()
        };
        let writer_before = version("probe");
        let reader_before = read_version();
        store.ensure_folder(a, "INBOX", None).unwrap();
        // Readers keep pooled connections busy meanwhile, as sessions do (with a pool
        // shared by readers and writers, writes would land on several connections).
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        store.folder_messages(a, "INBOX").unwrap();
                    }
                });
            }
            for n in 0..20 {
                let body = format!("message {n}");
                store
                    .spool(&[entry(body.as_bytes(), &["a@example.test"])])
                    .unwrap();
                let items = store.claim_inbound(2000 + n, 10).unwrap();
                let plan = DeliveryPlan {
                    local: vec![a],
                    ..Default::default()
                };
                let batch: Vec<_> = items.iter().map(|i| (i, &plan)).collect();
                store.deliver_inbound(&batch, 3000 + n).unwrap();
                store
                    .append(a, "INBOX", &[], 1, b"Subject: x\r\n\r\ny\r\n", None)
                    .unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(store.folder_messages(a, "INBOX").unwrap().len(), 40);
        assert_eq!(
            version("another probe"),
            writer_before,
            "spool, claim, delivery and APPEND all wrote through the writer connection"
        );
        assert_ne!(read_version(), reader_before, "a reader sees the writes");
    }

    #[test]
    fn folders_flags_copy_move_append_and_the_change_bell() {
        use crate::{FlagOperation, Mailboxes};
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let a = recipient(&store, "a");
        // The trigger-kept folder sizes and counts (schemas 14 and 16) against the
        // messages themselves, folder by folder, as LIST, STATUS and SELECT report them.
        let sizes_agree = |when: &str| {
            let summed: i64 = store
                .with_conn(|conn| {
                    Ok(conn.query_row(
                        "SELECT COALESCE(SUM(m.size), 0) FROM messages m
                         JOIN folders f ON f.id = m.folder_id WHERE f.recipient_id = ?1",
                        [a],
                        |r| r.get(0),
                    )?)
                })
                .unwrap();
            assert_eq!(store.mailbox_bytes(a).unwrap(), summed as u64, "{when}");
            for folder in store.folders(a).unwrap() {
                let messages = store.folder_messages(a, &folder.name).unwrap();
                let unseen = messages
                    .iter()
                    .filter(|m| !m.flags.iter().any(|f| f.eq_ignore_ascii_case("\\Seen")))
                    .count();
                let bytes: u64 = messages.iter().map(|m| m.size).sum();
                assert_eq!(
                    (
                        folder.messages as usize,
                        folder.unseen as usize,
                        folder.bytes
                    ),
                    (messages.len(), unseen, bytes),
                    "{when}: {}",
                    folder.name
                );
                let status = store.folder_status(a, &folder.name).unwrap().unwrap();
                assert_eq!(
                    (status.messages as usize, status.bytes),
                    (messages.len(), bytes),
                    "{when}: STATUS of {}",
                    folder.name
                );
            }
        };
        let bell = store.watch_mailbox(a);
        store.ensure_folder(a, "INBOX", None).unwrap();
        store.ensure_folder(a, "INBOX", None).unwrap();
        store
            .create_folder(a, "Archive", Some("\\Archive"))
            .unwrap();
        assert!(matches!(
            store.create_folder(a, "Archive", None),
            Err(StoreError::Conflict(_))
        ));
        store
            .spool(&[
                entry(b"one", &["a@example.test"]),
                entry(b"two", &["a@example.test"]),
            ])
            .unwrap();
        let items = store.claim_inbound(2000, 10).unwrap();
        let plan = DeliveryPlan {
            local: vec![a],
            ..Default::default()
        };
        let batch: Vec<_> = items.iter().map(|i| (i, &plan)).collect();
        let rung = *bell.borrow();
        store.deliver_inbound(&batch, 3000).unwrap();
        assert!(*bell.borrow() > rung, "delivery rings the bell");
        sizes_agree("after delivery");
        assert!(store.mailbox_bytes(a).unwrap() > 0);

        let seen = vec!["\\Seen".to_string()];
        let before = store.folder_messages(a, "INBOX").unwrap();
        let result = store
            .store_flags(a, "INBOX", &[1], FlagOperation::Add, &seen, None)
            .unwrap();
        assert_eq!(result.changed.len(), 1);
        assert_eq!(result.changed[0].flags, seen);
        assert!(result.changed[0].modseq > before[0].modseq);
        // UNCHANGEDSINCE below the message's MODSEQ refuses the change.
        let refused = store
            .store_flags(a, "INBOX", &[1], FlagOperation::Remove, &seen, Some(1))
            .unwrap();
        assert_eq!(refused.modified, vec![1]);
        sizes_agree("after \\Seen was set");
        // A flag other than \Seen, set and cleared, leaves the unseen count alone; a
        // \Seen written in another case counts as seen (flags are case-insensitive).
        let flagged = vec!["\\Flagged".to_string()];
        store
            .store_flags(a, "INBOX", &[2], FlagOperation::Add, &flagged, None)
            .unwrap();
        sizes_agree("after \\Flagged was set");
        store
            .store_flags(
                a,
                "INBOX",
                &[2],
                FlagOperation::Replace,
                &["\\SEEN".to_string()],
                None,
            )
            .unwrap();
        sizes_agree("after \\SEEN replaced the flags");
        store
            .store_flags(a, "INBOX", &[2], FlagOperation::Replace, &[], None)
            .unwrap();
        sizes_agree("after the flags were cleared");
        let inbox = store
            .folders(a)
            .unwrap()
            .into_iter()
            .find(|f| f.name == "INBOX")
            .unwrap();
        assert_eq!((inbox.messages, inbox.unseen), (2, 1));

        let copied = store
            .copy_messages(a, "INBOX", &[1, 2, 9], "Archive", false)
            .unwrap();
        assert_eq!(copied.uids, vec![(1, 1), (2, 2)]);
        assert_eq!(store.blob_count().unwrap(), 2, "copies share bodies");
        let moved = store
            .copy_messages(a, "INBOX", &[2], "Archive", true)
            .unwrap();
        assert_eq!(moved.uids, vec![(2, 3)]);
        sizes_agree("after a copy and a move");
        assert_eq!(store.folder_messages(a, "INBOX").unwrap().len(), 1);
        let archive = store.folder_messages(a, "Archive").unwrap();
        assert_eq!(
            archive.iter().map(|m| m.uid).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(archive[0].flags, seen, "flags travel with a copy");

        let appended = store
            .append(
                a,
                "Archive",
                &["$Important".to_string()],
                42_000,
                b"Subject: a\r\n\r\nx\r\n",
                None,
            )
            .unwrap();
        assert_eq!(appended.uids, vec![(0, 4)]);
        assert_eq!(
            store.message_raw(a, "Archive", 4).unwrap().unwrap(),
            b"Subject: a\r\n\r\nx\r\n",
            "an appended message gets no Return-Path"
        );

        // Renaming INBOX moves its messages and leaves it empty.
        store.rename_folder(a, "INBOX", "Old").unwrap();
        assert_eq!(store.folder_messages(a, "INBOX").unwrap().len(), 0);
        assert_eq!(store.folder_messages(a, "Old").unwrap().len(), 1);
        sizes_agree("after an append and renaming INBOX");
        store.create_folder(a, "Archive/2026", None).unwrap();
        store.rename_folder(a, "Archive", "Kept").unwrap();
        let names: Vec<String> = store
            .folders(a)
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(names, vec!["INBOX", "Kept", "Kept/2026", "Old"]);
        let bytes = store.mailbox_bytes(a).unwrap();
        store.delete_folder(a, "Kept").unwrap();
        assert!(store.mailbox_bytes(a).unwrap() < bytes);
        sizes_agree("after deleting a folder");
        assert!(matches!(
            store.delete_folder(a, "INBOX"),
            Err(StoreError::Conflict(_))
        ));
        let structure = crate::Structure {
            envelope: b"(NIL)".to_vec(),
            bodystructure: b"(\"text\")".to_vec(),
            body: b"(\"text\")".to_vec(),
        };
        store
            .cache_structures(a, "Old", &[(1, structure.clone())])
            .unwrap();
        let cached = store.cached_structures(a, "Old", &[1, 2]).unwrap();
        assert_eq!(cached.len(), 1);
        assert_eq!(cached[&1], structure);
        assert_eq!(store.expunge(a, "Old", &[1]).unwrap(), 1);
        sizes_agree("after an expunge");
        store.delete_folder(a, "Old").unwrap();
        assert_eq!(store.blob_count().unwrap(), 0, "every body released");
        let cached_rows: i64 = store
            .with_conn(|c| Ok(c.query_row("SELECT COUNT(*) FROM blob_imap", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(cached_rows, 0, "the cache goes with the body");
    }

    #[test]
    fn search_fields_are_cached_per_body_and_go_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let a = recipient(&store, "a");
        store.ensure_folder(a, "Old", None).unwrap();
        for n in 0..3 {
            store
                .append(
                    a,
                    "Old",
                    &[],
                    0,
                    format!("Subject: {n}\r\n\r\nx").as_bytes(),
                    None,
                )
                .unwrap();
        }
        store
            .cache_search_fields(a, "Old", &[(1, b"one".to_vec()), (3, b"three".to_vec())])
            .unwrap();
        let cached = store.cached_search_fields(a, "Old", &[1, 2, 3]).unwrap();
        assert_eq!(cached.len(), 2);
        assert_eq!(cached[&1], b"one");
        assert_eq!(cached[&3], b"three");
        // Only the UIDs asked for, even within the scanned range.
        let cached = store.cached_search_fields(a, "Old", &[1, 2]).unwrap();
        assert_eq!(cached.keys().copied().collect::<Vec<_>>(), vec![1]);
        // A copy shares its body, and so its fields.
        store.ensure_folder(a, "New", None).unwrap();
        store.copy_messages(a, "Old", &[3], "New", false).unwrap();
        assert_eq!(
            store.cached_search_fields(a, "New", &[1]).unwrap()[&1],
            b"three"
        );
        store.delete_folder(a, "Old").unwrap();
        store.delete_folder(a, "New").unwrap();
        let rows: i64 = store
            .with_conn(|c| Ok(c.query_row("SELECT COUNT(*) FROM blob_search", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(rows, 0, "the cache goes with the body");
    }

    /// WAL frames for pages beyond the database file's end owe the file that much at
    /// the next checkpoint; the spool measures the debt after its commit, a checkpoint
    /// pays it, and admission keeps room for it (a disk filled to the last byte by
    /// frames could never be checkpointed).
    #[test]
    fn the_spool_measures_what_the_wal_owes_the_database_file_and_admission_keeps_room_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mailroom.db");
        let mut store = SqliteStore::open(&path).unwrap();
        store.wal_pages_max = i64::MAX; // only the explicit checkpoint below
        let store = Arc::new(store);
        let disk = crate::Disk::new(dir.path(), 0);
        store.attach_disk(disk.clone());
        assert_eq!(disk.owed_bytes(), 0);
        let body = vec![b'x'; 1 << 20];
        store.spool(&[entry(&body, &["a@x"])]).unwrap();
        let owed = disk.owed_bytes();
        assert!(
            owed >= body.len() as u64,
            "a 1 MiB body in the WAL owes the file at least 1 MiB, measured {owed}"
        );
        let file = std::fs::metadata(&path).unwrap().len();
        // Admission counts the debt: with everything else free but the debt, refused.
        let free = disk.free_bytes();
        let strict = crate::Disk::new(dir.path(), free - owed / 2);
        strict.set_owed(strict.owed_reading(), owed);
        let refused = strict.admit(1).unwrap_err();
        assert_eq!(refused.owed_bytes, owed);
        assert!(refused.to_string().contains("owed"), "{refused}");
        // A checkpoint pays it: the file grew by the debt and nothing is owed.
        store.checkpoint().unwrap();
        store.with_conn(|conn| store.measure_owed(conn)).unwrap();
        assert_eq!(disk.owed_bytes(), 0);
        assert!(std::fs::metadata(&path).unwrap().len() >= file + owed);
    }

    /// Under continuous writes with a reader that always holds some snapshot, SQLite
    /// never restarts the WAL by itself, and the file grows for as long as the load
    /// lasts (2.9 GB in 45 s of the churn stress). The checkpointer restarts it.
    #[test]
    fn the_checkpointer_keeps_the_wal_short_under_continuous_reads_and_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mailroom.db");
        let mut store = SqliteStore::open(&path).unwrap();
        store.wal_pages_max = 64; // 256 KiB, so that a few MB of mail is many limits
        let store = Arc::new(store);
        let checkpointer = store.start_checkpointer().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (store, stop) = (store.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut reads = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        store.queue_summaries().unwrap();
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        let wal = dir.path().join("mailroom.db-wal");
        let body = vec![b'x'; 16 * 1024];
        let mut largest = 0;
        let mut written = 0u64;
        let started = Instant::now();
        // 40 checkpoint rounds (10 s) of writes at a steady pace (the load of a busy
        // server, not a burst): far more mail than the bound below lets the WAL hold.
        while started.elapsed() < 40 * CHECKPOINT_EVERY {
            let batch: Vec<SpoolEntry> = (0..8)
                .map(|i| {
                    entry(
                        &[&body[..], &written.to_le_bytes(), &[i]].concat(),
                        &["a@x"],
                    )
                })
                .collect();
            store.spool(&batch).unwrap();
            written += 8 * body.len() as u64;
            largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        drop(checkpointer);
        assert!(reads > 100, "the readers read throughout ({reads} reads)");
        let restarts = store
            .write_stats
            .wal_restarts
            .get_or_create(&vec![("outcome".to_string(), "restarted".to_string())])
            .get();
        assert!(
            largest < written / 4,
            "the WAL grew to {largest} bytes for {written} bytes of mail: it was not restarted"
        );
        assert!(restarts > 0, "the WAL was restarted");
    }
}
