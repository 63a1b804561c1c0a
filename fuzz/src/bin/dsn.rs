//! cargo-afl entry for the `dsn` target (crates/fuzz/src/targets.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        mailroom_fuzz::targets::dsn(data);
    });
}
