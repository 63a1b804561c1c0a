//! cargo-afl entry for the `imap_session` target (crates/fuzz/src/targets.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        mailroom_fuzz::targets::imap_session(data);
    });
}
