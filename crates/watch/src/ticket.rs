//! A first-come, first-served lock for a resource that many threads take in turns.
//!
//! Why: SQLite lets one connection write at a time and makes the others poll (its busy
//! handler sleeps 1, 2, 5 ... up to 100 ms between tries). Under a steady stream of
//! commits from the spool, a conversion worker asleep in that handler keeps losing the
//! race to whoever retries first, and conversion stops for seconds while the machine is
//! busy: the long churn run showed exactly that. Taking turns in arrival order in process
//! bounds every writer's wait by the transactions queued ahead of it.

use parking_lot::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// A ranked ticket lock: waiters are served strictly in the order they arrived.
pub struct TicketLock {
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    rank: u32,
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    name: &'static str,
    /// (next ticket to hand out, ticket being served).
    turn: Mutex<(u64, u64)>,
    served: Condvar,
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
            turn: Mutex::new((0, 0)),
            served: Condvar::new(),
        }
    }

    /// Waits for this thread's turn. Panics in debug builds when the thread holds a
    /// ranked lock of equal or higher rank.
    pub fn lock(&self) -> TicketGuard<'_> {
        crate::ranked::check_rank(self.rank, self.name);
        let started = Instant::now();
        let mut turn = self.turn.lock();
        let ticket = turn.0;
        turn.0 += 1;
        while turn.1 != ticket {
            self.served.wait(&mut turn);
        }
        drop(turn);
        crate::ranked::entered_rank(self.rank, self.name);
        TicketGuard {
            lock: self,
            waited: started.elapsed(),
        }
    }

    /// Threads holding or waiting for a turn.
    pub fn queued(&self) -> u64 {
        let turn = self.turn.lock();
        turn.0 - turn.1
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
        turn.1 += 1;
        drop(turn);
        self.lock.served.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
            let deadline = Instant::now() + Duration::from_secs(10);
            while lock.queued() < i + 2 {
                assert!(Instant::now() < deadline, "thread {i} never queued");
                std::thread::yield_now();
            }
        }
        drop(first);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*order.lock(), vec![0, 1, 2, 3, 4]);
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
