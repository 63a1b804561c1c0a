//! Mailroom's durable queues: the spool writer (group commit) and the doorbell.
//!
//! Purpose: turn "an SMTP session has a complete message" into "the message and its queue
//! entry are on disk", as fast as the disk allows, and tell inbound conversion there is
//! work. Inputs: [`SpoolRequest`]s from SMTP sessions over a bounded channel. Outputs: one
//! store transaction (one fsync) per batch, a reply per message, doorbell rings.
//!
//! Group commit: one writer thread takes whatever requests are pending (up to a count and
//! a byte limit), commits them as one transaction, then answers each. While one fsync is
//! in flight the next batch gathers, so concurrent sessions share fsyncs without any
//! timer. With group commit off, each message is its own transaction (for measurement).
//!
//! What it never does: reply before the commit returned, or keep a message in memory
//! that a session still waits for after a failed commit (the session answers 451 and the
//! client retries).

mod doorbell;
mod handoff;
mod spool;
mod transfer;

pub use doorbell::Doorbell;
pub use handoff::Handoff;
pub use spool::{Spool, SpoolConfig, SpoolError, SpoolStats, UnderWay};
pub use transfer::{Transfer, TransferMode};
