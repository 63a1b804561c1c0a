//! The directory-churn stress test, short version: `mailroom stress churn` as a user runs
//! it (the built binary, its own server as a child process). It checks every promise
//! itself and exits non-zero, saying which one broke; here we also read its report.

use std::process::Command;

#[test]
fn directory_churn_under_load_never_wedges() {
    let output = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args([
            "stress",
            "churn",
            "--baseline-secs",
            "3",
            "--churn-secs",
            "12",
            "--sessions",
            "6",
            "--stable",
            "12",
            "--import",
            "3000",
            "--rounds",
            "2",
        ])
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stress churn failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("PASS: no deadlock, no stall"), "{stdout}");
    // 3,000 created, 3,000 modified, 1,000 deleted: every row applied.
    assert!(stdout.contains("(7000 import rows,"), "{stdout}");
    let rounds = stdout
        .lines()
        .find(|l| l.starts_with("shutdown (SIGTERM to exit) per round:"))
        .expect("shutdown line");
    let times: Vec<u64> = rounds
        .split(['[', ']', ','])
        .filter_map(|t| t.trim().parse().ok())
        .collect();
    assert_eq!(times.len(), 2, "{rounds}");
    assert!(
        times.iter().all(|t| *t <= 5000),
        "SIGTERM took longer than the deadline: {rounds}"
    );
}
