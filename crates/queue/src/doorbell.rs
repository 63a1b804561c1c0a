//! A wake-up signal from producers (the spool) to consumers (conversion workers).
//!
//! Why not a `Condvar`: it needs a mutex, and a lost wake-up would stall the queue. The
//! doorbell is a bounded channel of unit values: ringing never blocks (a full channel
//! already guarantees that every waiter will wake), waiting has a timeout so a worker also
//! finds work that became due without a ring (retries).

use crossbeam_channel::{Receiver, Sender, bounded};
use std::time::Duration;

/// Rings pending at most; more would only wake workers that find nothing.
const RINGS_MAX: usize = 64;

/// A cloneable wake-up signal; see the module documentation.
#[derive(Clone)]
pub struct Doorbell {
    ring: Sender<()>,
    wait: Receiver<()>,
}

impl Default for Doorbell {
    fn default() -> Self {
        let (ring, wait) = bounded(RINGS_MAX);
        Doorbell { ring, wait }
    }
}

impl Doorbell {
    /// Wakes up to `times` waiters; never blocks.
    pub fn ring(&self, times: usize) {
        for _ in 0..times.min(RINGS_MAX) {
            if self.ring.try_send(()).is_err() {
                break;
            }
        }
    }

    /// Forgets the rings pending; returns how many there were. A consumer calls it just
    /// before it looks for work: what it will find covers those rings, and a ring after
    /// this call stays pending, so no wake-up is lost, while rings already answered no
    /// longer each cost an empty look (the spool rang once per message, and a worker
    /// that took ten messages in one claim then made nine claims that found nothing).
    pub fn drain(&self) -> usize {
        self.wait.try_iter().count()
    }

    /// Waits for a ring or the timeout, whichever comes first.
    pub fn wait(&self, timeout: Duration) {
        let _ = self.wait.recv_timeout(timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn drain_forgets_answered_rings_but_not_later_ones() {
        let bell = Doorbell::default();
        bell.ring(5);
        assert_eq!(bell.drain(), 5, "the five pending rings are forgotten");
        assert_eq!(bell.drain(), 0);
        // A ring after the drain (work that arrived after the look) still wakes a waiter
        // at once, from another thread.
        let ringer = bell.clone();
        let started = Instant::now();
        let handle = std::thread::spawn(move || ringer.ring(1));
        bell.wait(Duration::from_secs(30));
        handle.join().unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the ring was lost"
        );
    }
}
