//! The spool writer's hand-off of freshly committed messages to inbound conversion.
//!
//! Why: a conversion worker used to learn of new mail from the doorbell and then claim it
//! back from the database: a write turn of its own (an `UPDATE` of the entries and of
//! their index), and a read of every body the spool writer had just written and still
//! held in memory. Under load that claim was about a twentieth of the mail database's
//! write turn, and the body copies a share of conversion's CPU (docs/benchmarks.md,
//! eleventh session of issue 16). Now the spool writer inserts the entries it can hand
//! off already claimed (their first attempt counted, as a claim would), and after the
//! commit passes them, bodies and all, to the workers through this channel.
//!
//! Nothing about exactly-once changes: a handed-off entry is claimed in the database
//! from its first commit, so no worker claims it again, and its delivery (or deferral)
//! names it by row id, queue id and claim like any other. If the process stops with
//! entries in the channel, they are claimed entries whose claims the next start
//! releases, as for a worker stopped mid-batch.
//!
//! Bounded twice, so that a slow conversion never makes the spool keep mail in memory
//! without limit: by count (the channel) and by bytes (a shared tally). What does not
//! fit is inserted unclaimed, as before, and a worker claims it from the database: the
//! workers claim whenever a hand-off leaves room in their batch, so such entries (and
//! retries falling due) are not starved by a steady stream of hand-offs.

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use mailroom_store::ClaimedItem;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Both ends of the hand-off (cloning shares them).
#[derive(Clone)]
pub struct Handoff {
    sender: Sender<ClaimedItem>,
    receiver: Receiver<ClaimedItem>,
    /// Body bytes in the channel.
    bytes: Arc<AtomicUsize>,
    bytes_max: usize,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("messages", &self.sender.len())
            .field("bytes", &self.bytes.load(Ordering::Relaxed))
            .finish()
    }
}

impl Handoff {
    /// A hand-off holding at most `count_max` messages and `bytes_max` bytes of bodies.
    pub fn new(count_max: usize, bytes_max: usize) -> Handoff {
        let (sender, receiver) = bounded(count_max.max(1));
        Handoff {
            sender,
            receiver,
            bytes: Arc::new(AtomicUsize::new(0)),
            bytes_max,
        }
    }

    /// How many of `sizes` (body sizes, in commit order) the spool writer may hand off
    /// now: a prefix that fits the room left. The spool writer is the only sender, so
    /// the room can only grow until it sends them.
    pub fn room(&self, sizes: impl IntoIterator<Item = usize>) -> usize {
        let free = self
            .sender
            .capacity()
            .unwrap_or(0)
            .saturating_sub(self.sender.len());
        let mut bytes = self.bytes.load(Ordering::Acquire);
        let mut fits = 0;
        for size in sizes.into_iter().take(free) {
            bytes = bytes.saturating_add(size);
            if bytes > self.bytes_max {
                break;
            }
            fits += 1;
        }
        fits
    }

    /// Passes a committed, claimed entry to the workers. When it cannot be passed (the
    /// workers have stopped), the error is its queue id; its claim is released at the
    /// next start.
    pub fn send(&self, item: ClaimedItem) -> Result<(), String> {
        let size = item.body.len();
        self.bytes.fetch_add(size, Ordering::AcqRel);
        match self.sender.try_send(item) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(item) | TrySendError::Disconnected(item)) => {
                self.bytes.fetch_sub(size, Ordering::AcqRel);
                Err(item.queue_id)
            }
        }
    }

    /// Takes up to `max` handed-off entries without waiting.
    pub fn take(&self, max: usize) -> Vec<ClaimedItem> {
        let mut items = Vec::new();
        while items.len() < max {
            match self.receiver.try_recv() {
                Ok(item) => {
                    self.bytes.fetch_sub(item.body.len(), Ordering::AcqRel);
                    items.push(item);
                }
                Err(_) => break,
            }
        }
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: i64, size: usize) -> ClaimedItem {
        ClaimedItem {
            id,
            queue_id: format!("Q{id}"),
            mail_from: String::new(),
            recipients: Vec::new(),
            body: vec![b'x'; size],
            received_at_ms: 0,
            attempts: 1,
            envelope: Default::default(),
        }
    }

    #[test]
    fn room_is_bounded_by_count_and_bytes_and_taking_frees_it() {
        let handoff = Handoff::new(3, 100);
        assert_eq!(handoff.room([10, 10, 10, 10]), 3, "three fit by count");
        assert_eq!(
            handoff.room([60, 50, 10]),
            1,
            "a prefix that fits the bytes"
        );
        assert_eq!(handoff.room([101]), 0, "a body larger than the whole room");
        handoff.send(item(1, 60)).unwrap();
        assert_eq!(handoff.room([30, 30]), 1);
        handoff.send(item(2, 30)).unwrap();
        assert_eq!(handoff.room([10, 1]), 1, "one slot left");
        let taken = handoff.take(5);
        assert_eq!(taken.iter().map(|i| i.id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(handoff.room([50, 50]), 2);
        assert!(handoff.take(5).is_empty());
    }
}
