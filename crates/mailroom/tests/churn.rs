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
    // The POP3 readers logged in throughout (the administrator loop turns POP3 off at
    // times; those refusals are counted apart).
    let logins: u64 = stdout
        .split("POP3 logins: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a POP3 login count");
    assert!(logins > 0, "no POP3 login got in: {stdout}");
    let imap_logins: u64 = stdout
        .split("IMAP logins: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("an IMAP login count");
    assert!(imap_logins > 0, "no IMAP login got in: {stdout}");
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

#[test]
fn churn_against_a_running_server_twice() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mailroom.toml");
    // The churn checks that remote mail waits in the outbound queue: hold it there.
    std::fs::write(
        &config,
        "[smtp]\nrelay_networks = [\"127.0.0.0/8\"]\n[outbound]\ntransfer_mode = \"inbound\"\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let mut server = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args([
            "serve",
            "--smtp",
            "127.0.0.1:0",
            "--imap",
            "127.0.0.1:0",
            "--pop3",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&config)
        .arg("--data")
        .arg(&data)
        .env("MAILROOM_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let mut smtp = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(addr) = line.trim().strip_prefix("SMTP:") {
            smtp = addr.trim().to_string();
        }
        if line.contains("admin API:") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    let url = std::fs::read_to_string(data.join("admin.url")).unwrap();
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    // Twice against the same server: runs must not collide with each other's data.
    for _ in 0..2 {
        let output = Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .args([
                "stress",
                "churn",
                "--server",
                url.trim(),
                "--token",
                token.trim(),
                "--smtp",
                &smtp,
                "--baseline-secs",
                "1",
                "--churn-secs",
                "4",
                "--sessions",
                "4",
                "--stable",
                "6",
                "--import",
                "500",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains("no SIGTERM rounds (a targeted server)"),
            "{stdout}"
        );
    }
    server.kill().unwrap();
    server.wait().unwrap();
}
