//! Mailroom's inbound conversion: from a spooled message to mailbox deliveries.
//!
//! Purpose: the classic server's "inbound conversion" step, rebuilt so that it can never
//! wedge. Inputs: inbound queue entries (claimed from the store), the directory snapshot
//! of the moment. Outputs: one store transaction per message that delivers to every local
//! recipient, records remote recipients in the outbound queue, records unresolvable ones
//! for a non-delivery report, and removes the inbound entry.
//!
//! - [`facts`] and [`mime`] (re-exported from `mailroom-message`, which IMAP shares):
//!   what the MIME parser finds, with nesting bounded; a message that does not parse is
//!   still delivered byte for byte, with whatever could be read.
//! - [`plan`]: where each envelope recipient goes, from one snapshot.
//! - [`workers`]: the worker threads, with a per-message time budget, panic isolation and
//!   a quarantine after repeated failures, so no message holds up the ones behind it.
//!
//! What it never does: take a lock, change the directory, or drop a recipient silently.

pub use mailroom_message::{facts, mime};
pub mod plan;
pub mod quota;
pub mod workers;

pub use facts::message_facts;
pub use plan::delivery_plan;
pub use workers::{ConversionConfig, ConversionHook, ConversionStats, Workers};
