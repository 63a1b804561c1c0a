//! Mailroom's benchmark library: the parts a benchmark binary and a test both use.
//! Today that is the state-tracking IMAP stress client, which `bench/run` runs against
//! Mailroom and Dovecot and `cargo test` runs briefly as a correctness check.

pub mod imap_stress;
