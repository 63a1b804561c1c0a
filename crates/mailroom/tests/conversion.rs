//! Inbound conversion: malformed MIME is delivered intact; a message whose conversion
//! panics or overruns its budget is retried, then quarantined, and never holds up the
//! messages behind it.

mod common;

use common::{RawSmtp, TestServer, eventually};
use mailroom::ServerOptions;
use std::sync::Arc;
use std::time::Duration;

/// Sends `data` (already CRLF, no terminator) in one DATA transaction; returns the reply.
fn send_raw(addr: std::net::SocketAddr, to: &str, data: &[u8]) -> String {
    let mut smtp = RawSmtp::connect(addr);
    smtp.send(
        format!("EHLO c\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<{to}>\r\nDATA\r\n").as_bytes(),
    );
    let codes = smtp.codes(4);
    assert_eq!(codes, ["250", "250", "250", "354"]);
    smtp.send(data);
    smtp.send(b".\r\n");
    let reply = smtp.reply();
    smtp.send(b"QUIT\r\n");
    reply
}

fn malformed_corpus() -> Vec<(&'static str, Vec<u8>)> {
    let mut long_header = b"Subject: long\r\nX-Long: ".to_vec();
    long_header.extend(std::iter::repeat_n(b'a', 1 << 20));
    long_header.extend_from_slice(b"\r\n\r\nbody after a 1 MB header line\r\n");
    vec![
        (
            "broken boundary",
            b"Subject: broken\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"abc\"\r\n\r\n\
--abc\r\nContent-Type: text/plain\r\n\r\npart one\r\n--abX\r\nContent-Type: text/html\r\n\r\n<p>never closed\r\n"
                .to_vec(),
        ),
        (
            "bad transfer encodings",
            b"Subject: encodings\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
--b\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not*base64@@@\r\n\
--b\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ=\r\n=4\r\n\
--b\r\nContent-Transfer-Encoding: x-unknown\r\n\r\n\xff\xfe\xfd\r\n--b--\r\n"
                .to_vec(),
        ),
        ("NUL byte", b"Subject: nul\r\n\r\nbefore\0after\r\n".to_vec()),
        ("1 MB header line", long_header),
        ("no header at all", b"just text, no header\r\n".to_vec()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_mime_is_delivered_intact() {
    let server = TestServer::start().await;
    server.add_recipients(&["alice@example.test"]).await;
    let corpus = malformed_corpus();
    let addr = server.smtp();
    for (name, data) in &corpus {
        let data = data.clone();
        let reply =
            tokio::task::spawn_blocking(move || send_raw(addr, "alice@example.test", &data))
                .await
                .unwrap();
        assert!(reply.starts_with("250 "), "{name}: {reply}");
    }
    let messages = server
        .wait_for_messages("alice@example.test", corpus.len())
        .await;
    for ((name, data), message) in corpus.iter().zip(&messages) {
        let raw = server.raw("alice@example.test", message.uid).await;
        assert!(
            raw.ends_with(data),
            "{name}: stored bytes differ from the bytes sent"
        );
        assert_eq!(message.size as usize, raw.len(), "{name}: size");
    }
    assert_eq!(messages[0].subject.as_deref(), Some("broken"));
    assert_eq!(messages[2].subject.as_deref(), Some("nul"));
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_quarantined_and_do_not_block_the_queue() {
    // The hook stands in for a parser bug: it panics on one marker and spins on another.
    let hook: mailroom_convert::ConversionHook = Arc::new(|body: &[u8]| {
        let text = String::from_utf8_lossy(body);
        if text.contains("X-Test-Poison: panic") {
            panic!("simulated converter crash");
        }
        if text.contains("X-Test-Poison: hang") {
            std::thread::sleep(Duration::from_secs(3));
        }
    });
    let server = TestServer::start_with(
        |c| {
            c.conversion.workers = 1;
            c.conversion.attempts_max = 2;
            c.conversion.retry_delay_ms = 50;
            c.conversion.time_budget_ms = 300;
        },
        ServerOptions {
            conversion_hook: Some(hook),
            ..ServerOptions::default()
        },
    )
    .await;
    server.add_recipients(&["alice@example.test"]).await;
    let addr = server.smtp();
    tokio::task::spawn_blocking(move || {
        let send = |subject: &str, extra: &str| {
            let data = format!("Subject: {subject}\r\n{extra}\r\nbody\r\n");
            let reply = send_raw(addr, "alice@example.test", data.as_bytes());
            assert!(reply.starts_with("250 "), "{reply}");
        };
        send("panics", "X-Test-Poison: panic\r\n");
        send("hangs", "X-Test-Poison: hang\r\n");
        for i in 0..5 {
            send(&format!("good {i}"), "");
        }
    })
    .await
    .unwrap();

    // With a single worker, the good messages behind the poison ones still arrive.
    let messages = server.wait_for_messages("alice@example.test", 5).await;
    let mut subjects: Vec<_> = messages.iter().filter_map(|m| m.subject.clone()).collect();
    subjects.sort();
    assert_eq!(subjects, ["good 0", "good 1", "good 2", "good 3", "good 4"]);

    let quarantined = eventually(Duration::from_secs(20), async || {
        server.queues().await["quarantine"]
            .as_array()
            .map_or(0, Vec::len)
            == 2
    })
    .await;
    let queues = server.queues().await;
    assert!(quarantined, "{queues:#}");
    let reasons: Vec<String> = queues["quarantine"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["last_error"].as_str().unwrap().to_string())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("panicked: simulated converter crash")
                && r.contains("attempt 2 of 2")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("exceeded its time budget of 300 ms")),
        "{reasons:?}"
    );
    assert_eq!(queues["queues"][0]["depth"], 0, "inbound queue drained");
    // Each poison message's trail: received, deferred after the failed attempt, then
    // quarantined with the same reason the queue shows.
    for item in queues["quarantine"].as_array().unwrap() {
        let queue_id = item["queue_id"].as_str().unwrap();
        let out = server
            .cli(&["track", "--queue-id", queue_id, "--json"])
            .await;
        let trail: serde_json::Value = serde_json::from_str(&out).unwrap();
        let kinds: Vec<&str> = trail
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["received", "deferred", "quarantined"], "{trail:#}");
        assert_eq!(trail[1]["stage"], "conversion");
        assert_eq!(trail[2]["reason"], item["last_error"], "{trail:#}");
        assert_eq!(
            trail[2]["recipients"],
            serde_json::json!(["alice@example.test"])
        );
    }
    assert_eq!(
        server.mailbox("alice@example.test").await.len(),
        5,
        "poison never delivered"
    );
    server.server.shutdown().await;
}
