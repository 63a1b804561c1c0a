//! cargo-afl entry for the `pop3_session` target (crates/fuzz/src/targets.rs).
//!
//! `fuzz_nohook!`: a panic that Mailroom contains (one inside mail-parser, caught by
//! `mailroom_convert::mime::parse` as in production) is not a crash; any other panic
//! reaches AFL's own catch and aborts, which AFL records as one.
fn main() {
    afl::fuzz_nohook!(|data: &[u8]| {
        mailroom_fuzz::targets::pop3_session(data);
    });
}
