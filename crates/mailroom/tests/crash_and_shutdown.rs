//! The built binary as a separate process: kill -9 at a random moment under load, and
//! SIGTERM under load. After a restart, every message that got "250" is in its mailbox
//! exactly once.

mod common;

use common::process::{Process, Spawn};

use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use mailroom::client::AdminClient;
use mailroom_store::MessageSummary;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Starts `mailroom serve` on `data` with ephemeral ports.
fn start(data: &Path) -> Process {
    Spawn::at(data, "warn").start()
}

fn client(data: &Path) -> AdminClient {
    AdminClient::from_data_dir(data).unwrap()
}

/// Waits for the inbound queue to drain, then returns the mailbox.
fn drained_mailbox(data: &Path, address: &str) -> Vec<MessageSummary> {
    let client = client(data);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let queues: serde_json::Value = client.get("/queues").unwrap();
        if queues["queues"][0]["depth"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "inbound queue never drained: {queues}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    client
        .get(&format!("/mailboxes/{address}/messages"))
        .unwrap()
}

/// Sends messages from `senders` concurrent tasks until the server goes away or `limit`
/// messages were accepted; returns the Message-IDs that got "250".
async fn load(
    smtp: SocketAddr,
    senders: usize,
    limit: usize,
    accepted: Arc<AtomicUsize>,
) -> Vec<String> {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..senders)
        .map(|sender| {
            let accepted = accepted.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let transport =
                    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
                        .port(smtp.port())
                        .timeout(Some(Duration::from_secs(10)))
                        .build();
                let mut ok = Vec::new();
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) || accepted.load(Ordering::Relaxed) >= limit {
                        break;
                    }
                    let id = format!("s{sender}-{n}@load.test");
                    let email = Message::builder()
                        .from("load@remote.test".parse().unwrap())
                        .to("alice@example.test".parse().unwrap())
                        .subject(format!("load {id}"))
                        .message_id(Some(format!("<{id}>")))
                        .body("x".repeat(4000))
                        .unwrap();
                    match transport.send(email).await {
                        Ok(_) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            ok.push(id);
                        }
                        // The server is gone (killed or stopping): stop sending.
                        Err(_) => {
                            stop.store(true, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                ok
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.extend(task.await.unwrap());
    }
    ids
}

fn assert_exactly_once(accepted: &[String], messages: &[MessageSummary]) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for m in messages {
        *counts
            .entry(m.message_id.as_deref().unwrap_or(""))
            .or_default() += 1;
    }
    let duplicated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicated.is_empty(),
        "delivered more than once: {duplicated:?}"
    );
    let missing: Vec<_> = accepted
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} accepted messages lost: {missing:?}",
        missing.len()
    );
}

fn random_below(n: usize) -> usize {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).unwrap();
    (u64::from_le_bytes(bytes) % n as u64) as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_a_random_moment_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut first = start(&data);
    let created: serde_json::Value = client(&data)
        .post(
            "/recipients",
            &serde_json::json!({"address": "alice@example.test"}),
        )
        .unwrap();
    assert_eq!(created["alias"], "alice");

    // Kill after a random number (20..220) of accepted messages, while 8 senders are busy.
    let kill_after = 20 + random_below(200);
    let accepted = Arc::new(AtomicUsize::new(0));
    let sending = tokio::spawn(load(first.smtp, 8, 400, accepted.clone()));
    let deadline = Instant::now() + Duration::from_secs(120);
    while accepted.load(Ordering::Relaxed) < kill_after {
        assert!(
            Instant::now() < deadline,
            "load did not reach {kill_after} messages"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();
    let ids = sending.await.unwrap();
    assert!(
        ids.len() >= kill_after,
        "{} accepted before the kill",
        ids.len()
    );

    let mut second = start(&data);
    let messages = tokio::task::spawn_blocking({
        let data = data.clone();
        move || drained_mailbox(&data, "alice@example.test")
    })
    .await
    .unwrap();
    assert_exactly_once(&ids, &messages);
    // Messages whose 250 was lost in the kill may be there (at most once), nothing else.
    assert!(
        messages.len() <= ids.len() + 8,
        "{} stored, {} accepted",
        messages.len(),
        ids.len()
    );
    second.child.kill().unwrap();
    second.child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_stops_within_the_deadline_and_restart_delivers_everything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut first = start(&data);
    let _: serde_json::Value = client(&data)
        .post(
            "/recipients",
            &serde_json::json!({"address": "alice@example.test"}),
        )
        .unwrap();

    let accepted = Arc::new(AtomicUsize::new(0));
    let sending = tokio::spawn(load(first.smtp, 20, 100_000, accepted.clone()));
    let deadline = Instant::now() + Duration::from_secs(120);
    while accepted.load(Ordering::Relaxed) < 100 {
        assert!(Instant::now() < deadline, "load did not start");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &first.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The default deadline is 5 s; the process must be gone by then (plus exit overhead).
    let exit_deadline = signalled + Duration::from_secs(6);
    let exit = loop {
        if let Some(exit) = first.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < exit_deadline,
            "still running 6 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(exit.success(), "{exit:?}");
    let printed = first.rest.lock().unwrap().join("\n");
    assert!(printed.contains("Stopped in"), "{printed}");
    let ids = sending.await.unwrap();

    let mut second = start(&data);
    let messages = tokio::task::spawn_blocking({
        let data = data.clone();
        move || drained_mailbox(&data, "alice@example.test")
    })
    .await
    .unwrap();
    assert_exactly_once(&ids, &messages);
    second.child.kill().unwrap();
    second.child.wait().unwrap();
}
