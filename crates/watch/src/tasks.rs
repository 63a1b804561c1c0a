//! Watching the async runtimes themselves, not only the queues.
//!
//! Why: a session whose `poll` never returns (a loop that waits for input it already
//! consumed, a recursion, a quadratic match) holds a runtime worker thread. Queues still
//! look fine while every greeting stops. Two instruments catch it, both read by the
//! watchdog's own OS thread:
//!
//! - [`TaskWatch`]: every session's future is wrapped in [`Watched`], which stamps the
//!   time a `poll` starts and clears it when the poll returns. A poll still running after
//!   the stall time is a session blocking a runtime thread; the watchdog names its
//!   protocol, client and the command it was running ([`doing`]).
//! - [`Heartbeat`]: a task on each runtime stamps the time every interval; a stale stamp
//!   means the whole runtime has stopped running tasks.
//!
//! Cost: two relaxed atomic stores per poll; the command label is a `&'static str` set
//! through a task-local, stored in an atomic index into a small table.

use crate::RankedMutex;
use crate::now_ms;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::task::{Context, Poll};

/// One watched task (a client session).
pub struct TaskWatch {
    id: u64,
    /// The protocol ("SMTP", "IMAP", "POP3").
    pub protocol: &'static str,
    /// The client's address.
    pub peer: String,
    /// When the current poll started (Unix ms); 0 when the task is not being polled.
    poll_since_ms: AtomicI64,
    /// What the task is doing (a command name).
    doing: RankedMutex<&'static str>,
}

impl TaskWatch {
    /// What the task said it is doing.
    pub fn doing(&self) -> &'static str {
        *self.doing.lock()
    }

    /// Says what the task is doing now.
    pub fn set_doing(&self, what: &'static str) {
        *self.doing.lock() = what;
    }

    /// Milliseconds the current poll has been running, if one is.
    pub fn in_poll_ms(&self, now: i64) -> Option<i64> {
        let since = self.poll_since_ms.load(Ordering::Relaxed);
        (since != 0).then(|| now - since)
    }
}

/// A heartbeat of one runtime.
pub struct Heartbeat {
    /// The runtime's name.
    pub name: &'static str,
    beat_ms: AtomicI64,
}

impl Heartbeat {
    /// Records a beat now.
    pub fn beat(&self) {
        self.beat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since the last beat.
    pub fn age_ms(&self, now: i64) -> i64 {
        now - self.beat_ms.load(Ordering::Relaxed)
    }
}

/// Every watched task and runtime heartbeat.
pub struct Tasks {
    next_id: AtomicU64,
    /// Leaf lock: held to add, remove or list entries, never across anything else.
    tasks: RankedMutex<Vec<Arc<TaskWatch>>>,
    heartbeats: RankedMutex<Vec<Arc<Heartbeat>>>,
}

impl Default for Tasks {
    fn default() -> Tasks {
        Tasks {
            next_id: AtomicU64::new(0),
            tasks: RankedMutex::new(crate::rank::WATCHED_TASKS, "watched tasks", Vec::new()),
            heartbeats: RankedMutex::new(
                crate::rank::RUNTIME_HEARTBEATS,
                "runtime heartbeats",
                Vec::new(),
            ),
        }
    }
}

impl Tasks {
    /// Starts watching a task; it is forgotten when the returned guard is dropped.
    pub fn watch(self: &Arc<Self>, protocol: &'static str, peer: String) -> TaskGuard {
        let watch = Arc::new(TaskWatch {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            protocol,
            peer,
            poll_since_ms: AtomicI64::new(0),
            doing: RankedMutex::new(crate::rank::SESSION_DOING, "session doing", "starting"),
        });
        self.tasks.lock().push(watch.clone());
        TaskGuard {
            tasks: self.clone(),
            watch,
        }
    }

    /// A heartbeat for the runtime called `name` (stamped now).
    pub fn heartbeat(&self, name: &'static str) -> Arc<Heartbeat> {
        let beat = Arc::new(Heartbeat {
            name,
            beat_ms: AtomicI64::new(now_ms()),
        });
        self.heartbeats.lock().push(beat.clone());
        beat
    }

    /// Every task being watched now.
    pub fn tasks(&self) -> Vec<Arc<TaskWatch>> {
        self.tasks.lock().clone()
    }

    /// Every runtime heartbeat.
    pub fn heartbeats(&self) -> Vec<Arc<Heartbeat>> {
        self.heartbeats.lock().clone()
    }
}

/// Keeps a task watched while it lives (see [`Tasks::watch`]).
pub struct TaskGuard {
    tasks: Arc<Tasks>,
    watch: Arc<TaskWatch>,
}

impl TaskGuard {
    /// The task's entry.
    pub fn watch(&self) -> &Arc<TaskWatch> {
        &self.watch
    }

    /// Wraps the task's future so its polls are timed.
    pub fn wrap<F: Future>(self, inner: F) -> Watched<F> {
        Watched { inner, guard: self }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        let mut tasks = self.tasks.tasks.lock();
        if let Some(at) = tasks.iter().position(|t| t.id == self.watch.id) {
            tasks.swap_remove(at);
        }
    }
}

/// A future whose polls are timed (see the module documentation).
pub struct Watched<F> {
    inner: F,
    guard: TaskGuard,
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `inner` is structurally pinned: it is never moved out of `self`, and
        // `guard` is not pinned (it is only read).
        let this = unsafe { self.get_unchecked_mut() };
        let since = &this.guard.watch.poll_since_ms;
        since.store(now_ms(), Ordering::Relaxed);
        let inner = unsafe { Pin::new_unchecked(&mut this.inner) };
        let result = inner.poll(cx);
        since.store(0, Ordering::Relaxed);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poll_that_does_not_return_is_visible_and_a_finished_task_is_forgotten() {
        let tasks = Arc::new(Tasks::default());
        let guard = tasks.watch("SMTP", "192.0.2.1:4000".into());
        guard.watch().set_doing("BDAT");
        let watch = guard.watch().clone();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
        let future = guard.wrap(async move {
            entered_tx.send(()).unwrap();
            // Blocks inside the poll, as a spinning session would.
            rx.recv().unwrap();
        });
        let thread = std::thread::spawn(move || {
            let waker = std::task::Waker::noop();
            let mut cx = Context::from_waker(waker);
            let mut future = std::pin::pin!(future);
            assert!(future.as_mut().poll(&mut cx).is_ready());
        });
        entered_rx.recv().unwrap();
        assert!(watch.in_poll_ms(now_ms() + 5_000).unwrap() >= 5_000);
        assert_eq!(tasks.tasks()[0].doing(), "BDAT");
        tx.send(()).unwrap();
        thread.join().unwrap();
        assert_eq!(watch.in_poll_ms(now_ms()), None);
        assert!(tasks.tasks().is_empty(), "the finished task is forgotten");
    }
}
