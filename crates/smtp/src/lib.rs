//! Mailroom's SMTP server (the port-25 role): RFC 5321 with PIPELINING, 8BITMIME, SIZE,
//! ENHANCEDSTATUSCODES, SMTPUTF8 and CHUNKING.
//!
//! Purpose: accept mail for local recipients (and for relaying clients, remote ones) and
//! hand each complete message to the spool; answer "250" only once the spool says the
//! message is on disk. Inputs: TCP connections. Outputs: spool submissions, replies.
//!
//! - [`session`]: the protocol as a state machine with no I/O and no clock of its own:
//!   bytes in, [`session::Step`]s out. Commands are parsed with `smtp-proto`.
//! - [`data`]: DATA and BDAT bodies (dot-unstuffing; only `<CRLF>.<CRLF>` ends DATA).
//! - [`reply`]: every reply is a typed value rendered in one place.
//! - [`server`]: the tokio driver: accept loop with a connection limit, one task per
//!   connection, timeouts, shutdown with 421.
//!
//! What it never does: touch the store directly, or keep a directory snapshot beyond one
//! transaction.

pub mod checks;
pub mod data;
pub mod reply;
pub mod server;
pub mod session;

pub use server::{
    ListenerConfig, Logins, Mode, SmtpServer, SmtpStats, SubmissionLimits, SubmissionRates,
};
pub use session::{RecipientPolicy, Session, SmtpLimits, Step, Submission};
