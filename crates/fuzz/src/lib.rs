//! Fuzz harnesses: one function per target, each taking arbitrary bytes, driving the
//! real code with them and checking what must hold whatever the input (no panic, no
//! endless loop, answers well framed, nothing of the sender's choosing injected).
//!
//! The same functions serve two runners (docs/security.md says how to use both):
//! - `fuzz/` (outside the workspace) wraps each in a cargo-afl binary for long
//!   coverage-guided runs;
//! - this crate's tests run each over the seed corpus, every regression input, and a
//!   few hundred generated inputs, so `cargo test` keeps every target alive in CI.
//!
//! A target panics when an invariant breaks; that is the crash a fuzzer reports.

pub mod check;
pub mod targets;
pub mod world;

/// A fuzz target: its name (the folder under `fuzz/seeds/`) and its function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by name.
pub const TARGETS: &[Target] = &[
    ("smtp_session", targets::smtp_session),
    ("imap_parse", targets::imap_parse),
    ("imap_session", targets::imap_session),
    ("pop3_session", targets::pop3_session),
    ("mime", targets::mime),
    ("dsn", targets::dsn),
    ("csv", targets::csv),
    ("ldif", targets::ldif),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}
