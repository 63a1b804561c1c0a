//! Mailroom's never-wedge machinery, shared by every part that owns a queue or a lock.
//!
//! Purpose: make a wedge impossible to miss. The classic server's conversion queue
//! silently backed up until a restart; here every queue reports its depth, the age of
//! its oldest item and a progress counter ([`Probe`]), every worker says what it is doing
//! and since when ([`Activity`]), and a watchdog on its own OS thread ([`Watchdog`]) marks
//! a queue stalled when it is non-empty and has made no progress for a configured time:
//! health turns red and names the queue, a metric counts the stall, and the log says what
//! each worker was last doing.
//!
//! The runtimes are watched too ([`Tasks`]): a session whose poll does not return, or a
//! runtime whose heartbeat stops, is named in `/health` and the log within the stall
//! time, since a wedged runtime thread stops greetings while every queue looks fine.
//!
//! Locks: the few that exist are [`RankedMutex`]es. In debug and test builds taking one
//! while holding one of equal or higher rank panics with both names (the classic wedge was
//! two threads taking two critical sections in opposite order); [`start_deadlock_detector`]
//! reports threads blocked in a cycle on any `parking_lot` lock.
//!
//! What it never does: block the parts it watches. Probes and activities are atomics and
//! `arc-swap` values; the watchdog only reads them (and, for database-backed queues, runs
//! the sampler the queue's owner registered, on a sampler thread of the watchdog's, so a
//! slow database read never delays the verdict). [`TicketLock`] serves threads that take
//! turns at one resource (the database's write lock) in arrival order.

pub mod civil;
mod deadlock;
pub mod durable;
mod priority;
mod probe;
pub mod rank;
mod ranked;
mod tasks;
mod ticket;
mod watchdog;

pub use deadlock::{DeadlockReport, start_deadlock_detector};
pub use priority::{BACKGROUND_NICE, DIRECTORY_WRITER_NICE, lower_thread_priority};
pub use probe::{Activity, ActivityGuard, Probe, Sample};
pub use ranked::{RankedGuard, RankedMutex};
pub use tasks::{Heartbeat, TaskGuard, TaskWatch, Tasks, Watched};
pub use ticket::{TicketGuard, TicketLock};
pub use watchdog::{
    BlockedTask, Condition, ConditionReport, Health, QueueHealth, Registry, StalledQueue, Watchdog,
    WorkerReport,
};

/// Milliseconds since the Unix epoch (wall clock): the one clock reading every crate
/// uses for stored times and probes (the outbound delivery clock aside).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
