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

    /// Waits for a ring or the timeout, whichever comes first.
    pub fn wait(&self, timeout: Duration) {
        let _ = self.wait.recv_timeout(timeout);
    }
}
