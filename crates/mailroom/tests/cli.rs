//! The administrator's command line, run as the built binary against a running server.

mod common;

use common::TestServer;
use std::process::{Command, Output};

fn mailroom(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipient_add_then_mail_then_mailbox_list() {
    let server = TestServer::start().await;
    let data = server.dir.path().to_str().unwrap().to_string();
    let added = tokio::task::spawn_blocking({
        let data = data.clone();
        move || {
            mailroom(&[
                "recipient",
                "add",
                "alice@example.test",
                "--name",
                "Alice Smith",
                "--data",
                &data,
            ])
        }
    })
    .await
    .unwrap();
    assert_eq!(
        stdout(&added).trim(),
        "created alice@example.test (alias alice)"
    );

    // The same address again is refused with a message naming the field.
    let again = tokio::task::spawn_blocking({
        let data = data.clone();
        move || mailroom(&["recipient", "add", "ALICE@example.test", "--data", &data])
    })
    .await
    .unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("field address") && err.contains("already used"),
        "{err}"
    );

    let addr = server.smtp();
    tokio::task::spawn_blocking(move || {
        let mut smtp = common::RawSmtp::connect(addr);
        smtp.send(
            b"EHLO c\r\nMAIL FROM:<bob@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n",
        );
        smtp.codes(4);
        smtp.send(
            common::message(
                "bob@remote.test",
                "alice@example.test",
                "cli-1@remote.test",
                "hi",
            )
            .as_bytes(),
        );
        smtp.send(b".\r\n");
        assert!(smtp.reply().starts_with("250"));
    })
    .await
    .unwrap();
    server.wait_for_messages("alice@example.test", 1).await;

    let listed = tokio::task::spawn_blocking({
        let data = data.clone();
        move || {
            mailroom(&[
                "mailbox",
                "list",
                "alice@example.test",
                "--json",
                "--data",
                &data,
            ])
        }
    })
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&stdout(&listed)).unwrap();
    assert_eq!(json[0]["uid"], 1);
    assert_eq!(json[0]["message_id"], "cli-1@remote.test");
    assert_eq!(json[0]["from"], "bob@remote.test");
    assert_eq!(json[0]["subject"], "test cli-1@remote.test");
    assert!(json[0]["size"].as_u64().unwrap() > 100);

    let table = tokio::task::spawn_blocking({
        let data = data.clone();
        move || mailroom(&["mailbox", "list", "alice@example.test", "--data", &data])
    })
    .await
    .unwrap();
    let table = stdout(&table);
    assert!(
        table.contains("cli-1@remote.test") && table.contains("1 message(s)"),
        "{table}"
    );

    let queues = tokio::task::spawn_blocking(move || mailroom(&["queue", "list", "--data", &data]))
        .await
        .unwrap();
    let queues = stdout(&queues);
    for queue in ["inbound", "outbound", "quarantine", "undeliverable"] {
        assert!(queues.contains(queue), "{queues}");
    }
    server.server.shutdown().await;
}

#[test]
fn a_wrong_token_or_missing_server_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let output = mailroom(&["queue", "list", "--data", dir.path().to_str().unwrap()]);
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("is `mailroom serve` running?"), "{err}");
}

#[test]
fn config_example_and_bad_config() {
    let example = stdout(&mailroom(&["config", "example"]));
    assert!(example.contains("[smtp]") && example.contains("relay_networks = []"));
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, &example).unwrap();
    let checked = stdout(&mailroom(&["config", "check", good.to_str().unwrap()]));
    assert!(checked.contains("listen = \"127.0.0.1:2525\""), "{checked}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\ndomain = \"example.test\"\n\n[smtp]\nmax_sessions = 10\n",
    )
    .unwrap();
    let output = mailroom(&[
        "serve",
        "--config",
        bad.to_str().unwrap(),
        "--data",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("max_sessions") && err.contains("line 5") && err.contains("bad.toml"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_a_wrong_token_and_serves_health_and_metrics() {
    let server = TestServer::start().await;
    let base = format!("http://{}", server.server.admin_addr);
    let (status, health, metrics) = tokio::task::spawn_blocking(move || {
        let status = match ureq::get(&format!("{base}/api/v1/queues"))
            .set("Authorization", "Bearer wrong")
            .call()
        {
            Err(ureq::Error::Status(code, _)) => code,
            other => panic!("{other:?}"),
        };
        let health: serde_json::Value = ureq::get(&format!("{base}/health"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        let metrics = ureq::get(&format!("{base}/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        (status, health, metrics)
    })
    .await
    .unwrap();
    assert_eq!(status, 401);
    assert_eq!(health["status"], "ok");
    for name in [
        "mailroom_messages_accepted_total",
        "mailroom_messages_delivered_total",
        "mailroom_smtp_sessions_total",
        "mailroom_queue_depth{queue=\"inbound\"}",
        "mailroom_queue_oldest_age_seconds{queue=\"quarantine\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    server.server.shutdown().await;
}
