//! Mailroom's IMAP server: IMAP4rev2 (RFC 9051) and IMAP4rev1 (RFC 3501) over the store.
//!
//! Why it exists: the information store's face to ordinary mail clients (Thunderbird,
//! mutt, mbsync, phones). Shape: [`parse`] turns one complete command into a value,
//! [`mime`] derives ENVELOPE, BODYSTRUCTURE and sections from the stored bytes,
//! [`response`] writes the wire format, and the session drives them over a socket.

pub mod mime;
pub mod parse;
pub mod response;
pub mod search;
pub mod server;
pub mod session;
pub mod sort;
pub mod thread;

pub use server::{ImapConfig, ImapServer, ImapStats, Plaintext};
