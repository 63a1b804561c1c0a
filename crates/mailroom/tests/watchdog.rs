//! The stall watchdog: a conversion made to block stalls the inbound conversion queue;
//! the watchdog reports it (health, metric, what the worker is doing) and the queue
//! behind it still drains once the time budget sets the message aside.

mod common;

use common::{RawSmtp, TestServer, eventually};
use mailroom::ServerOptions;
use std::sync::Arc;
use std::time::Duration;

fn send(addr: std::net::SocketAddr, subject: &str, extra: &str) {
    let mut smtp = RawSmtp::connect(addr);
    smtp.send(b"EHLO c\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<ann@example.test>\r\nDATA\r\n");
    assert_eq!(smtp.codes(4), ["250", "250", "250", "354"]);
    smtp.send(format!("Subject: {subject}\r\n{extra}\r\nbody\r\n.\r\n").as_bytes());
    assert!(smtp.reply().starts_with("250"));
}

async fn health(server: &TestServer) -> (u16, serde_json::Value) {
    let url = format!("http://{}/health", server.server.admin_addr);
    tokio::task::spawn_blocking(move || match ureq::get(&url).call() {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
        Err(e) => panic!("{e}"),
    })
    .await
    .unwrap()
}

async fn metrics(server: &TestServer) -> String {
    let url = format!("http://{}/metrics", server.server.admin_addr);
    tokio::task::spawn_blocking(move || ureq::get(&url).call().unwrap().into_string().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_conversion_is_reported_as_a_stall_and_the_queue_still_drains() {
    let hook: mailroom_convert::ConversionHook = Arc::new(|body: &[u8]| {
        if String::from_utf8_lossy(body).contains("X-Test-Block: yes") {
            std::thread::sleep(Duration::from_secs(8));
        }
    });
    let server = TestServer::start_with(
        |c| {
            c.conversion.workers = 1;
            c.conversion.time_budget_ms = 4000;
            c.conversion.attempts_max = 1;
            c.watchdog.stall_after_ms = 1000;
            c.watchdog.check_interval_ms = 100;
        },
        ServerOptions {
            conversion_hook: Some(hook),
            ..ServerOptions::default()
        },
    )
    .await;
    server.add_recipients(&["ann@example.test"]).await;
    let (status, report) = health(&server).await;
    assert_eq!(status, 200, "{report:#}");

    let addr = server.smtp();
    tokio::task::spawn_blocking(move || send(addr, "blocker", "X-Test-Block: yes\r\n"))
        .await
        .unwrap();
    // Wait until the only worker is stuck on it, then queue good mail behind it.
    let stuck = eventually(Duration::from_secs(10), async || {
        health(&server).await.1["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| {
                w["worker"] == "conversion-0"
                    && w["doing"]
                        .as_str()
                        .unwrap()
                        .starts_with("converting 1 message")
            })
    })
    .await;
    assert!(stuck);
    tokio::task::spawn_blocking(move || {
        for i in 0..3 {
            send(addr, &format!("good {i}"), "");
        }
    })
    .await
    .unwrap();

    // The watchdog names the queue and says what the worker is doing.
    let reported = eventually(Duration::from_secs(10), async || {
        health(&server).await.0 == 503
    })
    .await;
    let (status, report) = health(&server).await;
    assert!(reported, "never reported: {report:#}");
    assert_eq!(status, 503);
    assert_eq!(report["status"], "unhealthy");
    let stalled = &report["stalled"][0];
    assert_eq!(stalled["queue"], "inbound conversion", "{report:#}");
    assert!(stalled["depth"].as_u64().unwrap() >= 3, "{report:#}");
    let worker = report["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["worker"] == "conversion-0")
        .unwrap();
    assert!(
        worker["doing"]
            .as_str()
            .unwrap()
            .contains("converting 1 message"),
        "{report:#}"
    );
    assert!(worker["for_seconds"].as_f64().unwrap() > 0.5, "{report:#}");
    assert!(
        metrics(&server)
            .await
            .contains("mailroom_watchdog_stalls_total{queue=\"inbound conversion\"} 1"),
        "stall metric"
    );

    // The time budget sets the blocker aside; the mail behind it drains; health recovers.
    let messages = server.wait_for_messages("ann@example.test", 3).await;
    assert_eq!(messages.len(), 3);
    let recovered = eventually(Duration::from_secs(10), async || {
        health(&server).await.0 == 200
    })
    .await;
    assert!(recovered, "{:#}", health(&server).await.1);
    let queues = server.queues().await;
    assert_eq!(
        queues["quarantine"][0]["last_error"].as_str().unwrap(),
        "conversion exceeded its time budget of 4000 ms (attempt 1 of 1)"
    );
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_lists_every_queue_and_worker_when_all_is_well() {
    let server = TestServer::start().await;
    let ready = eventually(Duration::from_secs(5), async || {
        health(&server).await.1["queues"]
            .as_array()
            .is_some_and(|q| q.len() == 5)
    })
    .await;
    let (status, report) = health(&server).await;
    assert!(ready, "{report:#}");
    assert_eq!(status, 200);
    let names: Vec<&str> = report["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["queue"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        // By layer, as the server starts them: the foundation's directory queues, then
        // the pipeline's.
        [
            "directory writer",
            "directory jobs",
            "spool",
            "inbound conversion",
            "outbound"
        ]
    );
    let workers: Vec<&str> = report["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["worker"].as_str().unwrap())
        .collect();
    assert_eq!(
        workers,
        [
            "directory-writer",
            "spool-writer",
            "conversion-0",
            "conversion-1"
        ]
    );
    assert_eq!(report["deadlocks"], 0);
    server.server.shutdown().await;
}

/// Reads the first line a server sends, with `limit` as the deadline.
fn greeting(addr: std::net::SocketAddr, limit: Duration) -> String {
    use std::io::BufRead;
    let stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("no greeting from {addr} within {limit:?}: {e}"));
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_blocks_its_runtime_thread_is_named_while_the_others_answer() {
    let server = TestServer::start_with(
        |c| {
            c.smtp.test_spin_command = true;
            c.watchdog.stall_after_ms = 1_000;
            c.watchdog.check_interval_ms = 100;
        },
        ServerOptions::default(),
    )
    .await;
    let (status, _) = health(&server).await;
    assert_eq!(status, 200);
    let smtp = server.server.smtp_addr;
    // A session that holds its runtime thread for 8 s, as a session stuck in a loop does.
    let spinner = std::thread::spawn(move || {
        let mut client = RawSmtp::connect(smtp);
        client.send(b"XSPIN 8000\r\n");
        client.reply()
    });
    let mut named = serde_json::Value::Null;
    assert!(
        eventually(Duration::from_secs(6), async || {
            let (status, body) = health(&server).await;
            named = body.clone();
            status == 503
                && body["blocked"].as_array().is_some_and(|b| {
                    b.iter().any(|t| {
                        t["what"] == "SMTP session"
                            && t["doing"] == "XSPIN"
                            && t["peer"]
                                .as_str()
                                .is_some_and(|p| p.starts_with("127.0.0.1:"))
                    })
                })
        })
        .await,
        "health did not name the blocked session: {named}"
    );
    // Meanwhile every listener still greets at once.
    let (imap, pop3) = (server.server.imap_addr, server.server.pop3_addr);
    let greetings = tokio::task::spawn_blocking(move || {
        [
            greeting(smtp, Duration::from_secs(1)),
            greeting(imap, Duration::from_secs(1)),
            greeting(pop3, Duration::from_secs(1)),
        ]
    })
    .await
    .unwrap();
    assert!(greetings[0].starts_with("220 "), "{greetings:?}");
    assert!(greetings[1].starts_with("* OK"), "{greetings:?}");
    assert!(greetings[2].starts_with("+OK"), "{greetings:?}");
    // Counted (the runtime's heartbeat, stuck behind the same thread, may count too).
    let text = metrics(&server).await;
    let counted: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("mailroom_watchdog_blocked_tasks_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(counted >= 1, "{text}");
    // Once the poll returns, the session answers and health recovers.
    let reply = tokio::task::spawn_blocking(move || spinner.join().unwrap())
        .await
        .unwrap();
    assert!(reply.starts_with("250"), "{reply}");
    assert!(
        eventually(Duration::from_secs(5), async || health(&server).await.0
            == 200)
        .await,
        "health did not recover"
    );
    server.server.shutdown().await;
}
