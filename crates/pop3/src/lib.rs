//! Mailroom's POP3 server: RFC 1939 plus CAPA and RESP-CODES (RFC 2449), AUTH PLAIN
//! (RFC 5034), UIDL, TOP and PIPELINING, over a recipient's INBOX.
//!
//! Why it exists: POP3 is what fetchmail, phones and old clients use to take mail home;
//! it is the simplest face of the information store and must be exact.
//!
//! Shape: [`session::Session`] is a sans-I/O state machine (lines in, replies and
//! requests for store work out), [`server::Pop3Server`] drives it over tokio sockets,
//! does the login, the store reads and the final deletion, and ends sessions at
//! shutdown. A maildrop is locked for one session at a time ([`server::MaildropLocks`]);
//! deletions take effect only at QUIT, in one store transaction.

pub mod server;
pub mod session;

pub use server::{MaildropLocks, Plaintext, Pop3Config, Pop3Server, Pop3Stats};
pub use session::{Action, Session};
