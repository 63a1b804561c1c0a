//! The data folder's disk: free space, the reserve that refuses new mail before the
//! disk is full, and the faults (disk full, I/O errors) the store reports.
//!
//! Why: a full disk is a transient fault and must stay one. Writers meet it as
//! `SQLITE_FULL` in the middle of a transaction; every writer answers it with a
//! temporary refusal (SMTP 452 4.3.1, IMAP `NO [LIMIT]`) or pauses and retries
//! (conversion, delivery), and all of it resumes by itself once space returns. The
//! reserve (as Postfix's `queue_minfree`) refuses *new* mail while the disk still has
//! room, so the work already accepted (conversion, delivery, expunges, flag changes) can
//! finish and the database rarely meets the wall at all. `/health` names the disk and
//! its free space while either lasts (the `disk` condition), and an I/O error raises the
//! `storage` condition until a later write commits.
//!
//! Admission also keeps room for what the mail database owes its file: frames in the
//! WAL not yet copied back take new pages in the database file at the next checkpoint.
//! A disk filled to the last byte by WAL frames leaves nothing for that checkpoint, and
//! then nothing recovers until the operator frees more than the whole debt (issue 16's
//! full-disk race, docs/storage.md). Near full, readings are taken afresh for every
//! admission, so a quarter second of commits cannot slip past a stale one.

use crate::{Fault, StoreError};
use mailroom_watch::{Condition, RankedMutex, now_ms, rank};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Below this much free space the disk counts as full on `/health` whatever the reserve
/// (even a reserve of 0 does not make a disk with nothing free healthy).
const FULL_FLOOR_BYTES: u64 = 1 << 20;

/// How long a free-space reading is reused: `admit` runs for every message, statvfs
/// need not.
const MEASURE_EVERY_MS: i64 = 250;

/// Free space under which the disk counts as nearly full: every admission then takes a
/// fresh reading (a statvfs, about a microsecond) instead of one up to a quarter second
/// old, and the store's checkpointer runs ten times as often. Above it a quarter second
/// of the heaviest load cannot reach the wall.
pub const NEAR_FULL_BYTES: u64 = 256 << 20;

/// After a disk-full error, new mail stays refused (and `/health` red) at least this
/// long, even if a reading shows room: the reading may predate the error.
const FULL_HOLD_MS: i64 = 2_000;

/// New mail refused for lack of disk space; the client is told to try again later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoSpace {
    /// Bytes free on the data folder's filesystem.
    pub free_bytes: u64,
    /// The configured reserve.
    pub reserve_bytes: u64,
    /// The disk was full moments ago (a write met `SQLITE_FULL`).
    pub was_full: bool,
    /// Of the free bytes, those the mail database's next checkpoint will take (see
    /// [`Disk::set_owed`]).
    pub owed_bytes: u64,
}

impl std::fmt::Display for NoSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.was_full {
            write!(
                f,
                "the mail store's disk is full ({} free)",
                human(self.free_bytes)
            )
        } else if self.owed_bytes > 0 {
            write!(
                f,
                "the mail store's disk has {} free, {} of it owed to the database's next checkpoint, leaving less than the reserve of {}",
                human(self.free_bytes),
                human(self.owed_bytes),
                human(self.reserve_bytes)
            )
        } else {
            write!(
                f,
                "the mail store's disk has {} free, below the reserve of {}",
                human(self.free_bytes),
                human(self.reserve_bytes)
            )
        }
    }
}

/// Bytes as an administrator reads them.
pub fn human(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (MIB * 1024.0))
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB)
    }
}

/// The counters and gauges an administrator graphs.
#[derive(Clone, Default)]
pub struct DiskStats {
    /// Bytes free on the data folder's filesystem, at the last reading.
    pub free_bytes: Gauge,
    /// Messages (SMTP, APPEND) refused because the disk was below the reserve or full.
    pub refusals: Counter,
    /// Storage faults met by writers, by kind (`disk_full`, `io`).
    pub faults: Family<Vec<(String, String)>, Counter>,
}

/// The data folder's disk, shared by the store and every writer that admits new mail.
pub struct Disk {
    dir: PathBuf,
    reserve_bytes: u64,
    free_bytes: AtomicU64,
    measured_ms: AtomicI64,
    full_at_ms: AtomicI64,
    io_error_at_ms: AtomicI64,
    /// The latest reading of what the database owes its file: (reading ticket, bytes).
    owed: RankedMutex<(u64, u64)>,
    /// Tickets for readings of the debt, in the order they were started.
    owed_tickets: AtomicU64,
    stats: DiskStats,
    disk_condition: OnceLock<Arc<Condition>>,
    storage_condition: OnceLock<Arc<Condition>>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("dir", &self.dir)
            .field("reserve_bytes", &self.reserve_bytes)
            .field("free_bytes", &self.free_bytes.load(Ordering::Relaxed))
            .finish()
    }
}

impl Disk {
    /// The disk holding `dir`, refusing new mail below `reserve_bytes` free.
    pub fn new(dir: &Path, reserve_bytes: u64) -> Arc<Disk> {
        let disk = Disk {
            dir: dir.to_path_buf(),
            reserve_bytes,
            free_bytes: AtomicU64::new(u64::MAX),
            measured_ms: AtomicI64::new(0),
            full_at_ms: AtomicI64::new(0),
            io_error_at_ms: AtomicI64::new(0),
            owed: RankedMutex::new(rank::DISK_OWED, "disk owed", (0, 0)),
            owed_tickets: AtomicU64::new(1),
            stats: DiskStats::default(),
            disk_condition: OnceLock::new(),
            storage_condition: OnceLock::new(),
        };
        disk.measure();
        Arc::new(disk)
    }

    /// Reports through these `/health` conditions from now on.
    pub fn attach(&self, disk: Arc<Condition>, storage: Arc<Condition>) {
        let _ = self.disk_condition.set(disk);
        let _ = self.storage_condition.set(storage);
    }

    /// The counters and gauges.
    pub fn stats(&self) -> &DiskStats {
        &self.stats
    }

    /// Adds the metrics to a Prometheus registry.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "mailroom_disk_free_bytes",
            "Bytes free on the data folder's filesystem",
            self.stats.free_bytes.clone(),
        );
        registry.register(
            "mailroom_disk_refusals",
            "Messages refused (SMTP 452 4.3.1, IMAP APPEND NO [LIMIT]) for lack of disk space",
            self.stats.refusals.clone(),
        );
        registry.register(
            "mailroom_storage_faults",
            "Storage faults met by writers, by kind (disk_full, io); each was answered with a temporary error or a retry",
            self.stats.faults.clone(),
        );
    }

    /// The reserve, bytes.
    pub fn reserve_bytes(&self) -> u64 {
        self.reserve_bytes
    }

    /// Bytes free for the server, from a reading at most a quarter second old, or a
    /// fresh one when the last showed less than [`NEAR_FULL_BYTES`].
    pub fn free_bytes(&self) -> u64 {
        let last = self.free_bytes.load(Ordering::Relaxed);
        if last < NEAR_FULL_BYTES
            || now_ms() - self.measured_ms.load(Ordering::Relaxed) >= MEASURE_EVERY_MS
        {
            return self.measure();
        }
        last
    }

    /// Starts a reading of what the mail database owes its file: take the ticket
    /// *before* reading the database's size, and hand both to [`Disk::set_owed`].
    pub fn owed_reading(&self) -> u64 {
        self.owed_tickets.fetch_add(1, Ordering::AcqRel)
    }

    /// Records what the mail database's next checkpoint will add to its file: the
    /// database's size as its newest commit sees it, less the file's length. A reading
    /// started before the one already recorded is ignored, so a slow reader cannot put
    /// back a debt that a later one (after more commits) measured.
    pub fn set_owed(&self, ticket: u64, bytes: u64) {
        let mut owed = self.owed.lock();
        if ticket >= owed.0 {
            *owed = (ticket, bytes);
        }
    }

    /// What the mail database's next checkpoint will add to its file, at the latest
    /// reading.
    pub fn owed_bytes(&self) -> u64 {
        self.owed.lock().1
    }

    fn measure(&self) -> u64 {
        let free = available_bytes(&self.dir).unwrap_or(u64::MAX);
        self.free_bytes.store(free, Ordering::Relaxed);
        self.measured_ms.store(now_ms(), Ordering::Relaxed);
        if free != u64::MAX {
            self.stats.free_bytes.set(free.min(i64::MAX as u64) as i64);
        }
        free
    }

    /// Whether new mail of `incoming` bytes may be accepted: refused while the disk is
    /// below the reserve (counting the message and what the database owes its file),
    /// or was full moments ago.
    pub fn admit(&self, incoming: u64) -> Result<(), NoSpace> {
        let free = self.free_bytes();
        let owed = self.owed_bytes();
        let recently_full = now_ms() - self.full_at_ms.load(Ordering::Relaxed) < FULL_HOLD_MS;
        let needed = self
            .reserve_bytes
            .saturating_add(incoming)
            .saturating_add(owed);
        if recently_full || free < needed {
            self.stats.refusals.inc();
            self.refresh();
            return Err(NoSpace {
                free_bytes: free,
                reserve_bytes: self.reserve_bytes,
                was_full: recently_full,
                owed_bytes: owed,
            });
        }
        Ok(())
    }

    /// Notes a store error: a fault is counted and raised on `/health`.
    pub fn record(&self, error: &StoreError) {
        match error.fault() {
            Some(Fault::DiskFull) => {
                self.full_at_ms.store(now_ms(), Ordering::Relaxed);
                self.fault("disk_full");
                self.measure();
                self.refresh();
            }
            Some(Fault::Io) => {
                self.io_error_at_ms.store(now_ms(), Ordering::Relaxed);
                self.fault("io");
                if let Some(condition) = self.storage_condition.get() {
                    let detail = format!(
                        "I/O error writing the database in {}: {error}; the write was refused with a temporary error and the database connections were reopened",
                        self.dir.display()
                    );
                    if condition.raise(detail) {
                        tracing::error!(dir = %self.dir.display(), %error, "storage I/O error: the write was not done; connections reopened");
                    }
                }
            }
            None => {}
        }
    }

    /// Notes a write that committed: an I/O error condition ends with it.
    pub fn wrote(&self) {
        if self.io_error_at_ms.load(Ordering::Relaxed) != 0
            && let Some(condition) = self.storage_condition.get()
            && condition.clear()
        {
            self.io_error_at_ms.store(0, Ordering::Relaxed);
            tracing::warn!("storage writes succeed again");
        }
    }

    fn fault(&self, kind: &str) {
        self.stats
            .faults
            .get_or_create(&vec![("kind".to_string(), kind.to_string())])
            .inc();
    }

    /// Takes a reading and raises or clears the `disk` condition. The monitor thread
    /// calls it every second, so `/health` turns green by itself when space returns.
    pub fn refresh(&self) {
        let free = self.measure();
        let Some(condition) = self.disk_condition.get() else {
            return;
        };
        let full_at = self.full_at_ms.load(Ordering::Relaxed);
        let recently_full = now_ms() - full_at < FULL_HOLD_MS;
        // What the next checkpoint takes is not free for mail.
        let owed = self.owed_bytes();
        let usable = free.saturating_sub(owed);
        if usable < self.reserve_bytes.max(FULL_FLOOR_BYTES) || recently_full {
            let detail = format!(
                "data folder {}: {} free{}, reserve {} (storage.free_space_reserve_bytes){}; new mail is refused with 452 4.3.1 / NO [LIMIT] until space is freed, accepted mail waits",
                self.dir.display(),
                human(free),
                if owed > 0 {
                    format!(
                        " ({} of it owed to the database's next checkpoint)",
                        human(owed)
                    )
                } else {
                    String::new()
                },
                human(self.reserve_bytes),
                if recently_full || usable < FULL_FLOOR_BYTES {
                    "; the disk is full"
                } else {
                    ""
                }
            );
            if condition.raise(detail.clone()) {
                tracing::error!(dir = %self.dir.display(), free, reserve = self.reserve_bytes, "DISK: {detail}");
            }
        } else if condition.clear() {
            tracing::warn!(dir = %self.dir.display(), free, "DISK: space is back ({} free); new mail is accepted again", human(free));
        }
    }

    /// Starts the thread that reads the free space every `interval` until `stop`.
    pub fn start_monitor(
        self: &Arc<Self>,
        interval: std::time::Duration,
        stop: impl Fn() -> bool + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let disk = self.clone();
        std::thread::Builder::new()
            .name("disk-monitor".into())
            .spawn(move || {
                while !stop() {
                    disk.refresh();
                    std::thread::sleep(interval);
                }
            })
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `dir`.
fn available_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid NUL-terminated string and `stat` is writable memory of
    // the right type; statvfs only writes into it.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    // The field types differ between platforms (u32 on some 32-bit ones).
    #[allow(clippy::unnecessary_cast)]
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_refuses_and_names_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let roomy = Disk::new(dir.path(), 0);
        assert!(roomy.admit(1000).is_ok());
        let strict = Disk::new(dir.path(), u64::MAX / 2);
        let refused = strict.admit(1000).unwrap_err();
        assert_eq!(refused.reserve_bytes, u64::MAX / 2);
        assert!(refused.to_string().contains("below the reserve"));
        assert_eq!(strict.stats().refusals.get(), 1);
    }

    #[test]
    fn the_debt_of_the_wal_counts_against_admission_and_stale_readings_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::new(dir.path(), 0);
        let free = disk.free_bytes();
        let early = disk.owed_reading();
        let late = disk.owed_reading();
        disk.set_owed(late, free);
        let refused = disk.admit(1).unwrap_err();
        assert_eq!(refused.owed_bytes, free);
        // A reading started before the recorded one cannot replace it.
        disk.set_owed(early, 0);
        assert_eq!(disk.owed_bytes(), free);
        disk.set_owed(disk.owed_reading(), 0);
        assert!(disk.admit(1).is_ok());
    }

    #[test]
    fn conditions_rise_with_the_fault_and_clear_when_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let registry = mailroom_watch::Registry::default();
        let disk = Disk::new(dir.path(), 0);
        disk.attach(registry.condition("disk"), registry.condition("storage"));
        let full = StoreError::Database(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        ));
        disk.record(&full);
        assert!(registry.condition("disk").current().is_some());
        assert!(disk.admit(0).is_err(), "refused right after a full disk");
        let io = StoreError::Database(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_FSYNC),
            None,
        ));
        disk.record(&io);
        let storage = registry.condition("storage").current().unwrap().0;
        assert!(storage.contains("I/O error"), "{storage}");
        disk.wrote();
        assert!(registry.condition("storage").current().is_none());
        assert_eq!(
            disk.stats()
                .faults
                .get_or_create(&vec![("kind".into(), "disk_full".into())])
                .get(),
            1
        );
    }
}
