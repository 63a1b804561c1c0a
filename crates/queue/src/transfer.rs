//! The transfer mode (the classic "transfer mode" of the Internet Mail Service): which
//! directions mail moves. It sits with the queues because it switches them: the SMTP
//! listener refuses sessions while inbound is off, and the delivery workers hold the
//! outbound queue while outbound is off. Switchable at runtime without a restart.

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// Which directions mail moves (the classic "transfer mode"); switchable at runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TransferMode {
    /// Accept inbound SMTP and deliver outbound.
    #[default]
    Both,
    /// Accept inbound SMTP; hold the outbound queue.
    Inbound,
    /// Refuse inbound SMTP (421); deliver outbound.
    Outbound,
    /// Refuse inbound SMTP and hold the outbound queue.
    None,
}

impl TransferMode {
    /// Whether SMTP sessions are accepted.
    pub fn inbound(self) -> bool {
        matches!(self, TransferMode::Both | TransferMode::Inbound)
    }

    /// Whether the outbound queue is delivered.
    pub fn outbound(self) -> bool {
        matches!(self, TransferMode::Both | TransferMode::Outbound)
    }

    fn to_u8(self) -> u8 {
        match self {
            TransferMode::Both => 0,
            TransferMode::Inbound => 1,
            TransferMode::Outbound => 2,
            TransferMode::None => 3,
        }
    }

    fn from_u8(v: u8) -> TransferMode {
        match v {
            0 => TransferMode::Both,
            1 => TransferMode::Inbound,
            2 => TransferMode::Outbound,
            _ => TransferMode::None,
        }
    }
}

/// The transfer mode, shared by the SMTP listener (which refuses sessions when inbound
/// is off) and the delivery workers.
#[derive(Clone, Default)]
pub struct Transfer {
    mode: Arc<AtomicU8>,
    changed: Arc<tokio::sync::Notify>,
}

impl Transfer {
    /// A switch starting in `mode`.
    pub fn new(mode: TransferMode) -> Transfer {
        let t = Transfer::default();
        t.set(mode);
        t
    }

    /// The mode now.
    pub fn get(&self) -> TransferMode {
        TransferMode::from_u8(self.mode.load(Ordering::Acquire))
    }

    /// What delivery workers wait on to notice a switch at once.
    pub fn changes(&self) -> Arc<tokio::sync::Notify> {
        self.changed.clone()
    }

    /// Switches; delivery workers wake at once.
    pub fn set(&self, mode: TransferMode) {
        self.mode.store(mode.to_u8(), Ordering::Release);
        self.changed.notify_waiters();
    }
}
