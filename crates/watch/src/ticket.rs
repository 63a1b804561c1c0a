//! A first-come, first-served lock for a resource that many threads take in turns.
//!
//! Why: SQLite lets one connection write at a time and makes the others poll (its busy
//! handler sleeps 1, 2, 5 ... up to 100 ms between tries). Under a steady stream of
//! commits from the spool, a conversion worker asleep in that handler keeps losing the
//! race to whoever retries first, and conversion stops for seconds while the machine is
//! busy: the long churn run showed exactly that. Taking turns in arrival order in process
//! bounds every writer's wait by the transactions queued ahead of it.
//!
//! One holder may go first ([`TicketLock::lock_first`]): the SMTP spool, whose commit a
//! client is waiting on with the connection open. The churn stress showed the spool
//! writer waiting 17.5 s of a 30 s window behind deliveries and claims queued ahead of
//! it: every accepted message waited for conversion work that nobody was waiting on.
//! Going first bounds the spool's wait by the one transaction in progress. It cannot
//! starve the others: after each commit the spool writer answers its sessions and
//! gathers the next batch, and the turn passes to the queue meanwhile.

use parking_lot::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// A ranked ticket lock: waiters are served strictly in the order they arrived.
pub struct TicketLock {
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    rank: u32,
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    name: &'static str,
    turn: Mutex<Turn>,
    served: Condvar,
}

/// Who holds the lock and who waits for it.
struct Turn {
    /// The next ticket to hand out to an ordinary waiter.
    next: u64,
    /// The ticket of the ordinary waiter served next.
    serving: u64,
    /// Waiters that go first ([`TicketLock::lock_first`]).
    first: u64,
    /// Whether someone holds the lock.
    held: bool,
}

/// The turn of one holder; the next in line goes when it is dropped.
pub struct TicketGuard<'a> {
    lock: &'a TicketLock,
    waited: Duration,
}

impl TicketLock {
    /// A ticket lock of `rank` (see docs/locking.md), called `name` in reports.
    pub const fn new(rank: u32, name: &'static str) -> TicketLock {
        TicketLock {
            rank,
            name,
            turn: Mutex::new(Turn {
                next: 0,
                serving: 0,
                first: 0,
                held: false,
            }),
            served: Condvar::new(),
        }
    }

    /// Waits for this thread's turn, after everyone who asked before it. Panics in
    /// debug builds when the thread holds a ranked lock of equal or higher rank.
    pub fn lock(&self) -> TicketGuard<'_> {
        crate::ranked::check_rank(self.rank, self.name);
        let started = Instant::now();
        let mut turn = self.turn.lock();
        let ticket = turn.next;
        turn.next += 1;
        while turn.held || turn.first > 0 || turn.serving != ticket {
            self.served.wait(&mut turn);
        }
        turn.serving += 1;
        turn.held = true;
        drop(turn);
        self.entered(started)
    }

    /// Waits for the turn in progress only: served before every [`Self::lock`] waiter
    /// (see the module's documentation for who may and why).
    pub fn lock_first(&self) -> TicketGuard<'_> {
        crate::ranked::check_rank(self.rank, self.name);
        let started = Instant::now();
        let mut turn = self.turn.lock();
        turn.first += 1;
        while turn.held {
            self.served.wait(&mut turn);
        }
        turn.first -= 1;
        turn.held = true;
        drop(turn);
        self.entered(started)
    }

    fn entered(&self, started: Instant) -> TicketGuard<'_> {
        crate::ranked::entered_rank(self.rank, self.name);
        TicketGuard {
            lock: self,
            waited: started.elapsed(),
        }
    }

    /// Threads holding or waiting for a turn.
    pub fn queued(&self) -> u64 {
        let turn = self.turn.lock();
        (turn.next - turn.serving) + turn.first + u64::from(turn.held)
    }
}

impl TicketGuard<'_> {
    /// How long this holder waited for its turn.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Drop for TicketGuard<'_> {
    fn drop(&mut self) {
        crate::ranked::left_rank(self.lock.rank);
        let mut turn = self.lock.turn.lock();
        turn.held = false;
        drop(turn);
        self.lock.served.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Waits (with a deadline) until `n` threads hold or wait for a turn.
    fn wait_queued(lock: &TicketLock, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock.queued() < n {
            assert!(Instant::now() < deadline, "{n} never queued");
            std::thread::yield_now();
        }
    }

    #[test]
    fn turns_are_served_in_arrival_order() {
        let lock = Arc::new(TicketLock::new(50, "test turn"));
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = lock.lock();
        let mut threads = Vec::new();
        for i in 0..5u64 {
            let (mine, order) = (lock.clone(), order.clone());
            threads.push(std::thread::spawn(move || {
                let _turn = mine.lock();
                order.lock().push(i);
            }));
            // Wait until thread i holds its ticket before starting the next one.
            wait_queued(&lock, i + 2);
        }
        drop(first);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*order.lock(), vec![0, 1, 2, 3, 4]);
        assert_eq!(lock.queued(), 0);
    }

    #[test]
    fn the_first_goes_before_everyone_waiting_but_after_the_holder() {
        let lock = Arc::new(TicketLock::new(50, "test turn"));
        let order = Arc::new(Mutex::new(Vec::new()));
        let holder = lock.lock();
        let mut threads = Vec::new();
        for i in 0..3u64 {
            let (mine, order) = (lock.clone(), order.clone());
            threads.push(std::thread::spawn(move || {
                let _turn = mine.lock();
                order.lock().push(i);
            }));
            wait_queued(&lock, i + 2);
        }
        let (mine, first) = (lock.clone(), order.clone());
        threads.push(std::thread::spawn(move || {
            let _turn = mine.lock_first();
            first.lock().push(100);
        }));
        wait_queued(&lock, 5);
        // The holder is not interrupted: nothing ran yet.
        assert!(order.lock().is_empty());
        drop(holder);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*order.lock(), vec![100, 0, 1, 2]);
        assert_eq!(lock.queued(), 0);
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "lock order violation: taking test turn (rank 50)")]
    fn the_turn_has_a_rank() {
        let high = crate::RankedMutex::new(60, "high", ());
        let lock = TicketLock::new(50, "test turn");
        let _h = high.lock();
        let _t = lock.lock();
    }
}
