//! cargo-afl entry for the `pop3_session` target (crates/fuzz/src/targets.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        mailroom_fuzz::targets::pop3_session(data);
    });
}
