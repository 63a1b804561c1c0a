//! Reading a message: what both inbound conversion (`mailroom-convert`) and IMAP APPEND
//! (`mailroom-imap`) need to know about the bytes they store, in one crate below both.
//!
//! Why a crate of its own: IMAP APPEND records the same facts (subject, addresses, MIME
//! tree) a delivered message gets, and IMAP parses messages for FETCH and SEARCH with the
//! same nesting bound. When these lived in the conversion crate, the IMAP server depended
//! on the whole conversion pipeline (its workers, queue and directory plans) for two
//! functions; now neither depends on the other.
//!
//! - [`mime`]: the one way to parse a message, with its nesting bounded.
//! - [`facts`]: what the MIME parser (`mail-parser`) finds; a message that does not parse
//!   is still stored byte for byte, with whatever could be read.

pub mod facts;
pub mod mime;

pub use facts::message_facts;
