//! cargo-afl entry for the `ldif` target (crates/fuzz/src/targets.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        mailroom_fuzz::targets::ldif(data);
    });
}
