//! cargo-afl entry for the `smtp_session` target (crates/fuzz/src/targets.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        mailroom_fuzz::targets::smtp_session(data);
    });
}
