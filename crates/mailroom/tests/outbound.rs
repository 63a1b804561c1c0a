//! Outbound delivery against servers we did not write: aiosmtpd as the next hop (reached
//! through a smart-host connector and through MX records served by dnsmasq). Retry times
//! are driven by the delivery clock (`outbound.test_clock`), never by sleeping.

mod common;

use common::dns::Dns;
use common::{TestServer, eventually, free_port, python};
use mailroom::ServerOptions;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// aiosmtpd as the next hop; killed when dropped.
struct Peer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Peer {
    fn start() -> Peer {
        Peer::start_with(&[])
    }

    /// With `[cert, key]`: the peer offers STARTTLS with that certificate.
    fn start_with(tls: &[&Path]) -> Peer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/smtp_peer.py");
        let mut child = Command::new(python())
            .arg(script)
            .arg(port.to_string())
            .arg(dir.path())
            .args(tls)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 with aiosmtpd (Debian: python3-aiosmtpd)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "READY", "aiosmtpd did not start");
        Peer { child, port, dir }
    }

    /// Every message received so far, in order.
    fn received(&self) -> Vec<Value> {
        let mut all = Vec::new();
        for n in 1.. {
            let path = self.dir.path().join(format!("{n}.json"));
            let Ok(text) = std::fs::read_to_string(&path) else {
                break;
            };
            all.push(serde_json::from_str(&text).unwrap());
        }
        all
    }

    async fn wait_for(&self, count: usize) -> Vec<Value> {
        let ok = eventually(Duration::from_secs(20), async || {
            self.received().len() >= count
        })
        .await;
        assert!(ok, "the peer received {:?}", self.received());
        self.received()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(tweak: impl FnOnce(&mut mailroom::config::Config) + Send) -> TestServer {
    let server = TestServer::start_with(
        |c| {
            c.smtp.relay_networks = vec!["127.0.0.0/8".parse().unwrap()];
            c.outbound.transfer_mode = mailroom_outbound::TransferMode::Both;
            c.outbound.test_clock = true;
            c.outbound.connect_timeout_secs = 5;
            c.outbound.command_timeout_secs = 10;
            tweak(c);
        },
        ServerOptions::default(),
    )
    .await;
    server.add_recipients(&["alice@example.test"]).await;
    server
}

async fn post(server: &TestServer, path: &str, body: Value) -> Value {
    let client = server.client();
    let path = path.to_string();
    tokio::task::spawn_blocking(move || client.post(&path, &body))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e:#}"))
}

async fn get(server: &TestServer, path: &str) -> Value {
    let client = server.client();
    let path = path.to_string();
    tokio::task::spawn_blocking(move || client.get(&path))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e:#}"))
}

async fn connector(server: &TestServer, name: &str, kind: Value, pattern: &str) {
    let mut connector = json!({
        "name": name,
        "address_spaces": [{"pattern": pattern, "cost": 1}],
    });
    for (k, v) in kind.as_object().unwrap() {
        connector[k] = v.clone();
    }
    post(
        server,
        "/site",
        json!({"change": "put_connector", "connector": connector}),
    )
    .await;
}

/// The connector most tests use: everything for remote.test to the aiosmtpd peer.
async fn partner(server: &TestServer, peer: &Peer) {
    connector(
        server,
        "partner",
        json!({"kind": "smart_host", "host": format!("127.0.0.1:{}", peer.port)}),
        "*@remote.test",
    )
    .await;
}

/// Sends from alice@example.test (a local mailbox, so DSNs land in her INBOX) with lettre.
async fn send_from_alice(server: &TestServer, to: &[&str], subject: &str) {
    use lettre::{AsyncTransport, Message};
    let mut builder = Message::builder()
        .from("alice@example.test".parse().unwrap())
        .subject(subject);
    for address in to {
        builder = builder.to(address.parse().unwrap());
    }
    let transport =
        lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(server.smtp().port())
            .build();
    transport
        .send(builder.body("hello out there\n".to_string()).unwrap())
        .await
        .expect("accepted");
}

async fn outbound_items(server: &TestServer) -> Vec<Value> {
    get(server, "/queue?queue=outbound")
        .await
        .as_array()
        .unwrap()
        .clone()
}

async fn wait_outbound_settled(server: &TestServer, count: usize) -> Vec<Value> {
    let mut items = Vec::new();
    let ok = eventually(Duration::from_secs(20), async || {
        items = outbound_items(server).await;
        items.len() == count
            && items.iter().all(|i| {
                i["attempts"].as_u64() > Some(0)
                    && i["envelope"]["recipients"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|r| r["status"] != "pending" || r["reply"].is_string())
            })
    })
    .await;
    assert!(ok, "outbound queue: {items:#?}");
    items
}

async fn advance(server: &TestServer, secs: u64) {
    post(server, "/clock/advance", json!({"secs": secs})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_host_delivers_retries_a_4xx_and_returns_a_5xx_to_the_sender() {
    three_fates(true).await;
}

/// The same with message tracking off (`[tracking] enabled = false`): relaying,
/// retries and reports must not depend on the trail (they once did: a delivery with
/// tracking off queued nothing for its remote recipients).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tracking_off_mail_is_still_relayed_retried_and_returned() {
    three_fates(false).await;
}

/// One message to three remote recipients: delivered, refused for good (a DSN to the
/// sender), refused for now (retried later).
async fn three_fates(tracking: bool) {
    let peer = Peer::start();
    let server = start(|c| c.tracking.enabled = tracking).await;
    partner(&server, &peer).await;
    send_from_alice(
        &server,
        &["ok@remote.test", "perm@remote.test", "temp@remote.test"],
        "three fates",
    )
    .await;

    // The accepted recipient got it at once; the others did not.
    let received = peer.wait_for(1).await;
    assert_eq!(received[0]["rcpt_tos"], json!(["ok@remote.test"]));
    assert_eq!(received[0]["mail_from"], "alice@example.test");
    assert!(
        received[0]["data"]
            .as_str()
            .unwrap()
            .contains("Subject: three fates")
    );

    // The 5xx came back to alice as a DSN, naming that recipient only.
    let inbox = server.wait_for_messages("alice@example.test", 1).await;
    let dsn = String::from_utf8(server.raw("alice@example.test", inbox[0].uid).await).unwrap();
    for field in [
        "Return-Path: <>",
        "multipart/report",
        "report-type=\"delivery-status\"",
        "Final-Recipient: rfc822; perm@remote.test",
        "Action: failed",
        "Status: 5.1.1",
        "Diagnostic-Code: smtp; 550 5.1.1",
        "Subject: three fates",
    ] {
        assert!(dsn.contains(field), "missing {field:?} in the DSN:\n{dsn}");
    }
    assert!(!dsn.contains("Final-Recipient: rfc822; temp@remote.test"));
    assert!(!dsn.contains("Final-Recipient: rfc822; ok@remote.test"));

    // The 4xx waits in the queue for the first retry interval (15 min + up to 10 %).
    let items = wait_outbound_settled(&server, 1).await;
    let item = &items[0];
    assert_eq!(item["recipients"], json!(["temp@remote.test"]));
    assert_eq!(item["connector"], "partner");
    let states = item["envelope"]["recipients"].as_array().unwrap();
    let temp = states
        .iter()
        .find(|r| r["address"] == "temp@remote.test")
        .unwrap();
    assert_eq!(temp["status"], "pending");
    assert!(temp["reply"].as_str().unwrap().starts_with("451 4.3.0"));
    let wait_ms = item["next_attempt_at_ms"].as_i64().unwrap() - now_ms();
    assert!(
        (14 * 60_000..=17 * 60_000).contains(&wait_ms),
        "next attempt in {wait_ms} ms"
    );

    // Sixteen and a half minutes later (by the delivery clock) the retry delivers it.
    advance(&server, 16 * 60 + 40).await;
    let received = peer.wait_for(2).await;
    assert_eq!(received[1]["rcpt_tos"], json!(["temp@remote.test"]));
    let drained = eventually(Duration::from_secs(10), async || {
        outbound_items(&server).await.is_empty()
    })
    .await;
    assert!(drained, "{:#?}", outbound_items(&server).await);
    // Exactly one DSN (the 5xx), none for the delivered ones.
    assert_eq!(server.mailbox("alice@example.test").await.len(), 1);
    assert_eq!(peer.received().len(), 2);
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mx_resolution_routing_changes_and_expiry() {
    let peer = Peer::start();
    let dns = Dns::start(&[
        "--mx-host=mx.test,mail.mx.test,10",
        "--host-record=mail.mx.test,127.0.0.1",
        // No MX at all: the domain's own address is the mail host.
        "--host-record=plain.test,127.0.0.1",
        // A null MX (RFC 7505): no mail accepted.
        "--mx-host=nullmx.test,.,0",
        "--host-record=nullmx.test,127.0.0.1",
        // Two MX hosts: the preferred one refuses connections (nothing listens on
        // 127.0.0.2), the backup takes the mail.
        "--mx-host=backup.test,first.backup.test,10",
        "--mx-host=backup.test,second.backup.test,20",
        "--host-record=first.backup.test,127.0.0.2",
        "--host-record=second.backup.test,127.0.0.1",
        // Answer for .test locally (no data rather than "refused" for names it knows).
        "--local=/test/",
    ]);
    let dead_port = free_port();
    let server = start(|c| {
        c.outbound.nameservers = vec![dns.addr];
        c.outbound.smtp_port = peer.port;
    })
    .await;
    connector(&server, "internet", json!({"kind": "mx"}), "*").await;
    connector(
        &server,
        "dead-end",
        json!({"kind": "smart_host", "host": format!("127.0.0.1:{dead_port}"), "retry_minutes": [2]}),
        "*@other.test",
    )
    .await;

    // MX resolution: mx.test's MX is mail.mx.test, which is 127.0.0.1.
    send_from_alice(&server, &["user@mx.test"], "by mx").await;
    let received = peer.wait_for(1).await;
    assert_eq!(received[0]["rcpt_tos"], json!(["user@mx.test"]));

    // No MX record: delivered to the domain's address.
    send_from_alice(&server, &["user@plain.test"], "implicit mx").await;
    let received = peer.wait_for(2).await;
    assert_eq!(received[1]["rcpt_tos"], json!(["user@plain.test"]));

    // MX preference order: the first host refuses, the second one delivers.
    send_from_alice(&server, &["user@backup.test"], "backup mx").await;
    let received = peer.wait_for(3).await;
    assert_eq!(received[2]["rcpt_tos"], json!(["user@backup.test"]));
    let text = metrics(&server).await;
    assert_eq!(
        metric(
            &text,
            "mailroom_outbound_connections_total{connector=\"first.backup.test\",result=\"failed\"}"
        ),
        1.0,
        "{text}"
    );

    // A null MX: returned at once (5.1.10), never tried.
    send_from_alice(&server, &["user@nullmx.test"], "null mx").await;
    let inbox = server.wait_for_messages("alice@example.test", 1).await;
    let dsn = String::from_utf8(server.raw("alice@example.test", inbox[0].uid).await).unwrap();
    assert!(
        dsn.contains("Final-Recipient: rfc822; user@nullmx.test"),
        "{dsn}"
    );
    assert!(dsn.contains("Status: 5.1.10"), "{dsn}");
    assert!(dsn.contains("null MX"), "{dsn}");
    assert_eq!(peer.received().len(), 3);

    // A connector nobody answers: the entry waits, with the connection error.
    send_from_alice(&server, &["user9@other.test"], "detour").await;
    let items = wait_outbound_settled(&server, 1).await;
    assert_eq!(items[0]["connector"], "dead-end");
    let reply = items[0]["envelope"]["recipients"][0]["reply"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reply.starts_with("4.4.1"), "{reply}");
    // This connector retries on its own schedule: 2 minutes (+ up to 10 %).
    let wait_ms = items[0]["next_attempt_at_ms"].as_i64().unwrap() - now_ms();
    assert!(
        (100_000..=135_000).contains(&wait_ms),
        "next attempt in {wait_ms} ms"
    );

    // The routing table changes while it waits: the next attempt follows the new table.
    post(
        &server,
        "/site",
        json!({"change": "delete_connector", "name": "dead-end"}),
    )
    .await;
    connector(
        &server,
        "detour",
        json!({"kind": "smart_host", "host": format!("127.0.0.1:{}", peer.port)}),
        "*@other.test",
    )
    .await;
    advance(&server, 17 * 60).await;
    let received = peer.wait_for(4).await;
    assert_eq!(received[3]["rcpt_tos"], json!(["user9@other.test"]));
    assert!(
        received[3]["data"]
            .as_str()
            .unwrap()
            .contains("Subject: detour")
    );

    // A recipient that is never accepted: after four hours the sender hears it is
    // delayed (once), after five days that it failed.
    send_from_alice(&server, &["always@mx.test"], "never arrives").await;
    wait_outbound_settled(&server, 1).await;
    assert_eq!(server.mailbox("alice@example.test").await.len(), 1);
    advance(&server, 4 * 3600 + 120).await;
    let inbox = server.wait_for_messages("alice@example.test", 2).await;
    let delayed = String::from_utf8(server.raw("alice@example.test", inbox[1].uid).await).unwrap();
    for field in [
        "Final-Recipient: rfc822; always@mx.test",
        "Action: delayed",
        "Status: 4.3.0",
        "Will-Retry-Until:",
    ] {
        assert!(
            delayed.contains(field),
            "missing {field:?} in the DSN:\n{delayed}"
        );
    }
    advance(&server, 5 * 24 * 3600).await;
    let inbox = server.wait_for_messages("alice@example.test", 3).await;
    assert_eq!(inbox.len(), 3, "one delayed notice, one failure");
    let dsn = String::from_utf8(server.raw("alice@example.test", inbox[2].uid).await).unwrap();
    for field in [
        "Final-Recipient: rfc822; always@mx.test",
        "Action: failed",
        "Status: 4.4.7",
        "delivery time expired",
        "451 4.3.0",
    ] {
        assert!(dsn.contains(field), "missing {field:?} in the DSN:\n{dsn}");
    }
    let drained = eventually(Duration::from_secs(10), async || {
        outbound_items(&server).await.is_empty()
    })
    .await;
    assert!(drained);
}

/// The id of the one outbound entry whose recipients include `address`.
async fn entry_for(server: &TestServer, address: &str) -> i64 {
    let mut id = None;
    let found = eventually(Duration::from_secs(10), async || {
        id = outbound_items(server)
            .await
            .iter()
            .find(|i| {
                i["recipients"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r == address)
            })
            .and_then(|i| i["id"].as_i64());
        id.is_some()
    })
    .await;
    assert!(found, "no outbound entry for {address}");
    id.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_administrator_holds_releases_deletes_and_switches_the_transfer_mode() {
    let peer = Peer::start();
    let server = start(|_| {}).await;
    partner(&server, &peer).await;

    // Inbound only: mail is accepted and waits, untried.
    let shown = server.cli(&["queue", "transfer-mode", "inbound"]).await;
    assert!(shown.contains("transfer mode: inbound"), "{shown}");
    send_from_alice(&server, &["first@remote.test"], "held back").await;
    let first = entry_for(&server, "first@remote.test").await;
    let listed = server
        .cli(&[
            "queue",
            "entries",
            "--queue",
            "outbound",
            "--destination",
            "remote.test",
        ])
        .await;
    assert!(
        listed.contains("first@remote.test") && listed.contains("<alice@example.test>"),
        "{listed}"
    );
    let none = server
        .cli(&["queue", "entries", "--sender", "nobody@"])
        .await;
    assert!(none.contains("0 entr(ies)"), "{none}");
    let young = server
        .cli(&["queue", "entries", "--older-than", "3600"])
        .await;
    assert!(
        young.contains("0 entr(ies)"),
        "nothing is an hour old: {young}"
    );
    let by_recipient = server
        .cli(&["queue", "entries", "--recipient", "FIRST@"])
        .await;
    assert!(by_recipient.contains("1 entr(ies)"), "{by_recipient}");

    // Held, then the mode allows delivery: a later message goes, the held one stays.
    server.cli(&["queue", "hold", &first.to_string()]).await;
    let held = server.cli(&["queue", "entries", "--state", "held"]).await;
    assert!(held.contains("first@remote.test"), "{held}");
    server.cli(&["queue", "transfer-mode", "both"]).await;
    send_from_alice(&server, &["second@remote.test"], "goes first").await;
    let received = peer.wait_for(1).await;
    assert_eq!(received[0]["rcpt_tos"], json!(["second@remote.test"]));
    let entry: Value = get(&server, &format!("/queue/{first}")).await;
    assert_eq!(entry["held"], true);
    assert_eq!(entry["attempts"], 0, "a held entry is never attempted");
    let details = server.cli(&["queue", "entry", &first.to_string()]).await;
    assert!(details.contains("held:          yes"), "{details}");

    // Released: delivered.
    server.cli(&["queue", "release", &first.to_string()]).await;
    let received = peer.wait_for(2).await;
    assert_eq!(received[1]["rcpt_tos"], json!(["first@remote.test"]));

    // Deleted with a DSN: the sender is told, the queue is empty.
    send_from_alice(&server, &["always@remote.test"], "stuck").await;
    let stuck = entry_for(&server, "always@remote.test").await;
    wait_outbound_settled(&server, 1).await;
    server
        .cli(&["queue", "delete", &stuck.to_string(), "--dsn"])
        .await;
    let inbox = server.wait_for_messages("alice@example.test", 1).await;
    let dsn = String::from_utf8(server.raw("alice@example.test", inbox[0].uid).await).unwrap();
    assert!(
        dsn.contains("Final-Recipient: rfc822; always@remote.test"),
        "{dsn}"
    );
    assert!(
        dsn.contains("deleted from the queue by the administrator"),
        "{dsn}"
    );
    assert!(outbound_items(&server).await.is_empty());
    // The trail says who deleted it, and that the sender was told.
    let trail = track(&server, &["--recipient", "always@remote.test"]).await;
    let admin = of_kind(&trail, "admin");
    assert_eq!(admin.len(), 1, "{trail:#?}");
    assert_eq!(admin[0]["action"], "delete with DSN");
    assert!(admin[0]["by"].as_str().unwrap().starts_with("cli:"));
    assert_eq!(admin[0]["recipients"], json!(["always@remote.test"]));
    let dsn_sent = of_kind(&trail, "dsn");
    assert_eq!(dsn_sent.len(), 1, "{trail:#?}");
    assert_eq!(dsn_sent[0]["to"], "alice@example.test");

    // Outbound only: new SMTP sessions are refused with 421, nothing lost.
    server.cli(&["queue", "transfer-mode", "outbound"]).await;
    let mut stream = std::net::TcpStream::connect(server.smtp()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = String::new();
    BufReader::new(&mut stream)
        .read_line(&mut greeting)
        .unwrap();
    assert!(greeting.starts_with("421 4.3.2"), "{greeting}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsn_parameters_from_the_sender_are_honoured() {
    let peer = Peer::start();
    let server = start(|_| {}).await;
    partner(&server, &peer).await;
    // Python's smtplib, with per-recipient DSN parameters.
    let script = format!(
        r#"
import smtplib
s = smtplib.SMTP("127.0.0.1", {port})
s.ehlo("client.test")
assert s.has_extn("dsn"), s.esmtp_features
code, _ = s.mail("alice@example.test", ["RET=HDRS", "ENVID=env+2Dtest"])
assert code == 250, code
code, _ = s.rcpt("perm-quiet@remote.test", ["NOTIFY=NEVER"])
assert code == 250, code
code, _ = s.rcpt("perm-loud@remote.test", ["NOTIFY=FAILURE", "ORCPT=rfc822;original@remote.test"])
assert code == 250, code
code, _ = s.rcpt("fine@remote.test", ["NOTIFY=SUCCESS"])
assert code == 250, code
code, _ = s.rcpt("nobody@remote.test", ["NOTIFY=NEVER,FAILURE"])
assert code == 501, code
code, _ = s.data(b"Subject: dsn params\r\nFrom: alice@example.test\r\n\r\nsecret body text\r\n")
assert code == 250, code
s.quit()
"#,
        port = server.smtp().port()
    );
    let status = Command::new(python())
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(status.success());
    // Two notices: the failure (perm-loud) and, since aiosmtpd does not offer DSN, the
    // "relayed" one that fine@ asked for.
    let inbox = server.wait_for_messages("alice@example.test", 2).await;
    let mut texts = Vec::new();
    for m in &inbox {
        texts.push(String::from_utf8(server.raw("alice@example.test", m.uid).await).unwrap());
    }
    let relayed = texts
        .iter()
        .find(|t| t.contains("Action: relayed"))
        .expect("a relayed notice");
    for field in [
        "Final-Recipient: rfc822; fine@remote.test",
        "Status: 2.0.0",
        "Remote-MTA: dns; 127.0.0.1",
    ] {
        assert!(
            relayed.contains(field),
            "missing {field:?} in the DSN:\n{relayed}"
        );
    }
    assert!(!relayed.contains("perm-loud"), "{relayed}");
    let dsn = texts
        .iter()
        .find(|t| t.contains("Action: failed"))
        .expect("a failure notice");
    for field in [
        "Original-Envelope-Id: env-test",
        "Original-Recipient: rfc822;original@remote.test",
        "Final-Recipient: rfc822; perm-loud@remote.test",
        "Content-Type: text/rfc822-headers",
        "Subject: dsn params",
    ] {
        assert!(dsn.contains(field), "missing {field:?} in the DSN:\n{dsn}");
    }
    assert!(
        !dsn.contains("perm-quiet@remote.test"),
        "NOTIFY=NEVER is not reported"
    );
    assert!(
        !dsn.contains("secret body text"),
        "RET=HDRS returns the header only"
    );
    assert!(
        !dsn.contains("fine@remote.test"),
        "only failures in the failure notice"
    );
    assert_eq!(peer.received().len(), 1);
    assert_eq!(peer.received()[0]["rcpt_tos"], json!(["fine@remote.test"]));
    let drained = eventually(Duration::from_secs(10), async || {
        outbound_items(&server).await.is_empty()
    })
    .await;
    assert!(drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_queue_and_its_schedule_and_repeats_only_the_attempt_in_flight() {
    let peer = Peer::start();
    let port = peer.port;
    let tweak = move |c: &mut mailroom::config::Config| {
        c.smtp.relay_networks = vec!["127.0.0.0/8".parse().unwrap()];
        c.outbound.transfer_mode = mailroom_outbound::TransferMode::Both;
        c.outbound.test_clock = true;
        c.outbound.connect_timeout_secs = 5;
        c.outbound.command_timeout_secs = 10;
    };
    let server = start(tweak).await;
    connector(
        &server,
        "partner",
        json!({"kind": "smart_host", "host": format!("127.0.0.1:{port}")}),
        "*@remote.test",
    )
    .await;
    // One entry waits for its retry; another is stopped mid-attempt by the shutdown.
    send_from_alice(&server, &["temp@remote.test"], "deferred").await;
    let items = wait_outbound_settled(&server, 1).await;
    let (deferred_id, next_attempt) = (
        items[0]["id"].clone(),
        items[0]["next_attempt_at_ms"].clone(),
    );
    send_from_alice(&server, &["slow@remote.test"], "in flight").await;
    let in_flight = eventually(Duration::from_secs(10), async || {
        outbound_items(&server).await.len() == 2
    })
    .await;
    assert!(in_flight);
    let TestServer {
        server: running,
        dir,
    } = server;
    let report = running.shutdown().await;
    assert!(report.clean, "{report:?}");

    let mut config = common::test_config(dir.path());
    tweak(&mut config);
    let server = TestServer {
        server: mailroom::start(config, ServerOptions::default())
            .await
            .expect("restarts"),
        dir,
    };
    // The interrupted attempt is made again at once; the deferred entry keeps its time.
    let received = peer.wait_for(1).await;
    assert!(
        received
            .iter()
            .all(|m| m["rcpt_tos"] == json!(["slow@remote.test"]))
    );
    let items = wait_outbound_settled(&server, 1).await;
    assert_eq!(items[0]["id"], deferred_id);
    assert_eq!(items[0]["next_attempt_at_ms"], next_attempt);
    assert_eq!(items[0]["attempts"], 1);
    advance(&server, 17 * 60).await;
    let deadline = eventually(Duration::from_secs(20), async || {
        peer.received()
            .iter()
            .any(|m| m["rcpt_tos"] == json!(["temp@remote.test"]))
    })
    .await;
    assert!(deadline, "{:?}", peer.received());
    let drained = eventually(Duration::from_secs(10), async || {
        outbound_items(&server).await.is_empty()
    })
    .await;
    assert!(drained);
    // The attempt in flight may have reached the peer before the stop: at most twice.
    let slow = peer
        .received()
        .iter()
        .filter(|m| m["rcpt_tos"] == json!(["slow@remote.test"]))
        .count();
    assert!((1..=2).contains(&slow), "{slow} copies");
}

async fn metrics(server: &TestServer) -> String {
    let url = format!("http://{}/metrics", server.server.admin_addr);
    tokio::task::spawn_blocking(move || ureq::get(&url).call().unwrap().into_string().unwrap())
        .await
        .unwrap()
}

/// The value of one metric line starting with `prefix` (0 when absent).
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelining_chunking_next_hop_gets_the_message_byte_for_byte_over_one_connection() {
    // The next hop is a second Mailroom: it offers PIPELINING, CHUNKING (BDAT), SIZE,
    // 8BITMIME, SMTPUTF8 and DSN, the paths aiosmtpd does not exercise.
    let next_hop = TestServer::start_with(
        |c| c.directory.accepted_domains = vec!["b.test".into()],
        ServerOptions::default(),
    )
    .await;
    next_hop
        .add_recipients(&["bob@b.test", "carol@b.test"])
        .await;
    let server = start(|_| {}).await;
    connector(
        &server,
        "to-b",
        json!({"kind": "smart_host", "host": next_hop.smtp().to_string()}),
        "*@b.test",
    )
    .await;
    let body = "From: alice@example.test\r\nTo: bob@b.test\r\nSubject: =?UTF-8?Q?caf=C3=A9?=\r\n\
                MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
                Content-Transfer-Encoding: 8bit\r\n\r\n\
                Gr\u{fc}\u{df}e aus Z\u{fc}rich.\r\n.a line starting with a dot\r\n";
    for (i, to) in ["bob@b.test", "carol@b.test"].iter().enumerate() {
        // Python's smtplib sends the bytes as they are (lettre adds a CRLF at the end).
        let script = format!(
            "import smtplib, sys\n\
             s = smtplib.SMTP('127.0.0.1', {port})\n\
             s.sendmail('alice@example.test', ['{to}', 'nobody@b.test'], sys.stdin.buffer.read())\n\
             s.quit()\n",
            port = server.smtp().port()
        );
        let mut child = Command::new(python())
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
        let inbox = next_hop.wait_for_messages(to, 1).await;
        let raw = next_hop.raw(to, inbox[0].uid).await;
        let text = String::from_utf8(raw).unwrap();
        assert!(
            text.ends_with(body),
            "message {i} arrived changed:\n{text:?}\nexpected to end with\n{body:?}"
        );
        assert!(text.contains("by mx.example.test (Mailroom)"), "{text}");
    }
    // nobody@b.test was refused by the next hop for good: one DSN per message.
    let inbox = server.wait_for_messages("alice@example.test", 2).await;
    for m in &inbox {
        let dsn = String::from_utf8(server.raw("alice@example.test", m.uid).await).unwrap();
        assert!(
            dsn.contains("Final-Recipient: rfc822; nobody@b.test"),
            "{dsn}"
        );
        assert!(dsn.contains("Status: 5.1.1"), "{dsn}");
    }
    // The second message reused the first one's connection.
    let text = metrics(&server).await;
    let host = next_hop.smtp().ip().to_string();
    assert_eq!(
        metric(
            &text,
            &format!(
                "mailroom_outbound_connections_total{{connector=\"{host}\",result=\"opened\"}}"
            )
        ),
        1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            &format!(
                "mailroom_outbound_connections_total{{connector=\"{host}\",result=\"reused\"}}"
            )
        ) >= 1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_dsn_to_the_null_sender_and_a_looping_message_is_returned() {
    let peer = Peer::start();
    let server = start(|_| {}).await;
    partner(&server, &peer).await;
    // A bounce (null sender) that bounces: dropped, never answered.
    let transport =
        lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(server.smtp().port())
            .build();
    use lettre::AsyncTransport;
    let envelope =
        lettre::address::Envelope::new(None, vec!["perm@remote.test".parse().unwrap()]).unwrap();
    transport
        .send_raw(&envelope, b"Subject: a bounce\r\n\r\nbody\r\n")
        .await
        .expect("accepted");
    // A message that has been around 31 times: returned with 5.4.6, not sent.
    let mut looping = String::new();
    for i in 0..31 {
        looping.push_str(&format!(
            "Received: from hop{i}.test by hop{}.test; Sun, 29 Nov 2026 00:00:00 +0000\r\n",
            i + 1
        ));
    }
    looping.push_str("From: alice@example.test\r\nSubject: round and round\r\n\r\nbody\r\n");
    let envelope = lettre::address::Envelope::new(
        Some("alice@example.test".parse().unwrap()),
        vec!["ok@remote.test".parse().unwrap()],
    )
    .unwrap();
    transport
        .send_raw(&envelope, looping.as_bytes())
        .await
        .expect("accepted");
    let inbox = server.wait_for_messages("alice@example.test", 1).await;
    let dsn = String::from_utf8(server.raw("alice@example.test", inbox[0].uid).await).unwrap();
    assert!(dsn.contains("Status: 5.4.6"), "{dsn}");
    assert!(dsn.contains("too many hops"), "{dsn}");
    let drained = eventually(Duration::from_secs(10), async || {
        get(&server, "/queue").await.as_array().unwrap().is_empty()
    })
    .await;
    assert!(drained, "{:#?}", get(&server, "/queue").await);
    // One notice in all (the loop's); the bounce got none, and nothing reached the peer.
    let text = metrics(&server).await;
    assert_eq!(
        metric(&text, "mailroom_outbound_notices_total"),
        1.0,
        "{text}"
    );
    assert!(peer.received().is_empty());
    assert_eq!(server.mailbox("alice@example.test").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_connector_hands_mail_back_to_local_delivery() {
    let server = start(|_| {}).await;
    connector(
        &server,
        "away",
        json!({"kind": "smart_host", "host": format!("127.0.0.1:{}", free_port())}),
        "*@later.test",
    )
    .await;
    // Queued (and held) while later.test is somebody else's.
    server.cli(&["queue", "transfer-mode", "inbound"]).await;
    send_from_alice(
        &server,
        &["pat@later.test", "nobody@later.test"],
        "for later",
    )
    .await;
    entry_for(&server, "pat@later.test").await;
    // The domain and the mailbox arrive; delivery resumes.
    let client = server.client();
    tokio::task::spawn_blocking(move || {
        client.post_no_content("/domains", &json!({"domain": "later.test"}))
    })
    .await
    .unwrap()
    .unwrap();
    server.add_recipients(&["pat@later.test"]).await;
    post(
        &server,
        "/site",
        json!({"change": "delete_connector", "name": "away"}),
    )
    .await;
    connector(&server, "here", json!({"kind": "local"}), "*@later.test").await;
    server.cli(&["queue", "transfer-mode", "both"]).await;
    let inbox = server.wait_for_messages("pat@later.test", 1).await;
    assert_eq!(inbox[0].subject.as_deref(), Some("for later"));
    // The address nobody has is returned to the sender.
    let notices = server.wait_for_messages("alice@example.test", 1).await;
    let dsn = String::from_utf8(server.raw("alice@example.test", notices[0].uid).await).unwrap();
    assert!(
        dsn.contains("Final-Recipient: rfc822; nobody@later.test"),
        "{dsn}"
    );
    assert!(dsn.contains("Status: 5.1.1"), "{dsn}");
    let drained = eventually(Duration::from_secs(10), async || {
        get(&server, "/queue").await.as_array().unwrap().is_empty()
    })
    .await;
    assert!(drained, "{:#?}", get(&server, "/queue").await);
}

/// DKIM signing: keys made with `mailroom dkim generate` sign outbound mail of their
/// From domain; the signatures verify with dkimpy (Debian's python3-dkim, not our code)
/// against the records the command printed; rotation by selector switches the key
/// under a running server; mail from a domain without a key goes unsigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_mail_is_dkim_signed_with_the_active_key() {
    let peer = Peer::start();
    let server = start(|_| {}).await;
    partner(&server, &peer).await;
    let generate = |selector: &str, algorithm: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .args(["dkim", "generate", "example.test", "--selector", selector])
            .args(["--algorithm", algorithm, "--data"])
            .arg(&server.server.data_dir)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let text = String::from_utf8(output.stdout).unwrap();
        // The record line: NAME. IN TXT "VALUE"
        let line = text
            .lines()
            .find(|l| l.contains(" IN TXT "))
            .unwrap()
            .to_string();
        let (name, value) = line.split_once(". IN TXT ").unwrap();
        (name.to_string(), value.trim_matches('"').to_string())
    };
    let (ed_name, ed_value) = generate("ed", "ed25519");
    assert_eq!(ed_name, "ed._domainkey.example.test");
    send_from_alice(&server, &["bob@remote.test"], "signed with ed25519").await;
    peer.wait_for(1).await;
    let (rsa_name, rsa_value) = generate("rs", "rsa");
    send_from_alice(&server, &["bob@remote.test"], "signed with rsa").await;
    let received = peer.wait_for(2).await;
    let records = json!({ ed_name.clone(): ed_value, rsa_name.clone(): rsa_value });
    let script = r#"
import dkim, json, sys
records = json.loads(sys.argv[1])
def dns(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    return records.get(name.rstrip('.'), '').encode()
out = []
for data in json.loads(sys.argv[2]):
    message = data.encode()
    ok = dkim.verify(message, dnsfunc=dns)
    sig = dkim.DKIM(message)
    selector = None
    for line in message.split(b'\r\n'):
        if line.lower().startswith(b'dkim-signature:'):
            selector = [t.strip()[2:].decode() for t in line.split(b';') if t.strip().startswith(b's=')]
    out.append({'ok': ok, 'selector': selector})
# A tampered message must not verify.
tampered = json.loads(sys.argv[2])[0].replace('signed with ed25519', 'signed with something').encode()
out.append({'tampered': dkim.verify(tampered, dnsfunc=dns)})
print(json.dumps(out))
"#;
    let messages: Vec<String> = received
        .iter()
        .map(|r| r["data"].as_str().unwrap().to_string())
        .collect();
    let output = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(records.to_string())
        .arg(serde_json::to_string(&messages).unwrap())
        .output()
        .expect("python3 with dkimpy (Debian: python3-dkim)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        out[0]["ok"], true,
        "ed25519 signature: {out} {}",
        messages[0]
    );
    assert_eq!(out[0]["selector"][0], "ed");
    assert_eq!(out[1]["ok"], true, "rsa signature: {out} {}", messages[1]);
    assert_eq!(out[1]["selector"][0], "rs");
    assert_eq!(out[2]["tampered"], false);
    assert!(
        messages[0].starts_with("DKIM-Signature: "),
        "{}",
        messages[0]
    );
    // A domain without a key: unsigned (the relay host sends as someone else).
    use lettre::{AsyncTransport, Message};
    let message = Message::builder()
        .from("carol@elsewhere.test".parse().unwrap())
        .to("bob@remote.test".parse().unwrap())
        .subject("unsigned")
        .body("no key for this domain\n".to_string())
        .unwrap();
    lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(server.smtp().port())
        .build()
        .send(message)
        .await
        .expect("accepted");
    let received = peer.wait_for(3).await;
    let third = received[2]["data"].as_str().unwrap();
    assert!(!third.contains("DKIM-Signature"), "{third}");
}

/// Opportunistic STARTTLS to the next hop (aiosmtpd with a certificate): the message
/// travels encrypted; whether the certificate verified depends on the trusted roots
/// (`outbound.tls_ca_files`), and the outcome shows in the connection metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_uses_starttls_and_records_whether_the_certificate_verified() {
    let certs = tempfile::tempdir().unwrap();
    // The smart host is reached by address: the certificate names 127.0.0.1.
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (certs.path().join("peer.pem"), certs.path().join("peer.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    for trusted in [false, true] {
        let peer = Peer::start_with(&[&cert, &key]);
        let ca = cert.clone();
        let server = start(move |c| {
            if trusted {
                c.outbound.tls_ca_files = vec![ca];
            }
        })
        .await;
        partner(&server, &peer).await;
        send_from_alice(&server, &["bob@remote.test"], "over TLS").await;
        let received = peer.wait_for(1).await;
        assert_eq!(received[0]["tls"], true, "the message went over TLS");
        let url = format!("http://{}/metrics", server.server.admin_addr);
        let metrics = tokio::task::spawn_blocking(move || {
            ureq::get(&url).call().unwrap().into_string().unwrap()
        })
        .await
        .unwrap();
        let label = if trusted {
            "tls-verified"
        } else {
            "tls-unverified"
        };
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("mailroom_outbound_connections_total")
                    && l.contains(&format!("result=\"{label}\""))),
            "{label}: {metrics}"
        );
        server.server.shutdown().await;
    }
    // A next hop without STARTTLS still gets the mail, in the clear.
    let plain = Peer::start();
    let server = start(|_| {}).await;
    partner(&server, &plain).await;
    send_from_alice(&server, &["bob@remote.test"], "in the clear").await;
    let received = plain.wait_for(1).await;
    assert_eq!(received[0]["tls"], false);
    server.server.shutdown().await;
}

/// An HTTPS server (Python's http.server with ssl) answering MTA-STS policy requests by
/// Host: `policies` maps `mta-sts.<domain>` to the policy text. Killed when dropped.
struct PolicyServer {
    child: Child,
    port: u16,
}

impl PolicyServer {
    fn start(cert: &Path, key: &Path, policies: &Value) -> PolicyServer {
        let port = free_port();
        let script = r#"
import http.server, json, ssl, sys
port, cert, key, policies = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        host = (self.headers.get("Host") or "").split(":")[0]
        body = policies.get(host)
        if self.path != "/.well-known/mta-sts.txt" or body is None:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("READY", flush=True)
server.serve_forever()
"#;
        let mut child = Command::new(python())
            .arg("-c")
            .arg(script)
            .arg(port.to_string())
            .arg(cert)
            .arg(key)
            .arg(policies.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "READY", "the policy server did not start");
        PolicyServer { child, port }
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// MTA-STS (RFC 8461): a domain whose policy is "enforce" gets mail only over TLS with
/// a certificate valid for an MX host the policy lists; otherwise the message waits
/// (4.7.5) instead of going out unprotected. A domain without a policy still gets it
/// opportunistically from the same next hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_enforce_policies_are_honoured() {
    let certs = tempfile::tempdir().unwrap();
    // One test CA signs the next hop (mx.sts.test) and the policy host.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "MTA-STS test root");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let issue = |names: &[&str], stem: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        let (c, k) = (
            certs.path().join(format!("{stem}.pem")),
            certs.path().join(format!("{stem}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    };
    let root = certs.path().join("root.pem");
    std::fs::write(&root, ca.pem()).unwrap();
    let (mx_cert, mx_key) = issue(&["mx.sts.test"], "mx");
    let (web_cert, web_key) = issue(
        &[
            "mta-sts.sts.test",
            "mta-sts.wrongname.test",
            "mta-sts.unlisted.test",
        ],
        "web",
    );
    let policy =
        |mx: &str| format!("version: STSv1\r\nmode: enforce\r\nmx: {mx}\r\nmax_age: 86400\r\n");
    let web = PolicyServer::start(
        &web_cert,
        &web_key,
        &json!({
            "mta-sts.sts.test": policy("mx.sts.test"),
            "mta-sts.wrongname.test": policy("*.wrongname.test"),
            "mta-sts.unlisted.test": policy("mx.elsewhere.test"),
        }),
    );
    let peer = Peer::start_with(&[&mx_cert, &mx_key]);
    let dns = Dns::start(&[
        "--local=/test/",
        // sts.test: its MX has a certificate for its name; policy enforce.
        "--mx-host=sts.test,mx.sts.test,10",
        "--host-record=mx.sts.test,127.0.0.1",
        "--txt-record=_mta-sts.sts.test,v=STSv1; id=20261130",
        "--host-record=mta-sts.sts.test,127.0.0.1",
        // wrongname.test: same next hop, whose certificate does not name mx.wrongname.test.
        "--mx-host=wrongname.test,mx.wrongname.test,10",
        "--host-record=mx.wrongname.test,127.0.0.1",
        "--txt-record=_mta-sts.wrongname.test,v=STSv1; id=1",
        "--host-record=mta-sts.wrongname.test,127.0.0.1",
        // unlisted.test: its policy does not list its MX host.
        "--mx-host=unlisted.test,mx.unlisted.test,10",
        "--host-record=mx.unlisted.test,127.0.0.1",
        "--txt-record=_mta-sts.unlisted.test,v=STSv1; id=1",
        "--host-record=mta-sts.unlisted.test,127.0.0.1",
        // nosts.test: no policy; delivered opportunistically whatever the certificate.
        "--mx-host=nosts.test,mx.nosts.test,10",
        "--host-record=mx.nosts.test,127.0.0.1",
    ]);
    let (peer_port, web_port) = (peer.port, web.port);
    let server = start(move |c| {
        c.outbound.nameservers = vec![dns.addr];
        c.outbound.smtp_port = peer_port;
        c.outbound.mta_sts_port = web_port;
        c.outbound.tls_ca_files = vec![root];
    })
    .await;
    connector(&server, "internet", json!({"kind": "mx"}), "*").await;

    send_from_alice(&server, &["bob@sts.test"], "protected").await;
    let received = peer.wait_for(1).await;
    assert_eq!(received[0]["rcpt_tos"], json!(["bob@sts.test"]));
    assert_eq!(received[0]["tls"], true);

    send_from_alice(&server, &["bob@wrongname.test"], "wrong name").await;
    send_from_alice(&server, &["bob@unlisted.test"], "unlisted").await;
    let items = wait_outbound_settled(&server, 2).await;
    let reply = |domain: &str| {
        items
            .iter()
            .flat_map(|i| i["envelope"]["recipients"].as_array().unwrap().clone())
            .find(|r| r["address"].as_str().unwrap().ends_with(domain))
            .map(|r| r["reply"].as_str().unwrap_or("").to_string())
            .unwrap()
    };
    let wrong = reply("@wrongname.test");
    assert!(wrong.starts_with("4.7.5 MTA-STS"), "{wrong}");
    assert!(wrong.contains("not verified"), "{wrong}");
    let unlisted = reply("@unlisted.test");
    assert!(
        unlisted.starts_with("4.7.5 MTA-STS policy of unlisted.test lists none"),
        "{unlisted}"
    );
    // Nothing of theirs reached the next hop.
    assert_eq!(peer.received().len(), 1);

    // Without a policy the same next hop gets mail over TLS it cannot verify.
    send_from_alice(&server, &["bob@nosts.test"], "opportunistic").await;
    let received = peer.wait_for(2).await;
    assert_eq!(received[1]["rcpt_tos"], json!(["bob@nosts.test"]));
    drop(web);
}

/// ARC (RFC 8617): mail from the Internet forwarded through a contact to an outside
/// address leaves sealed with the primary domain's key (the results of SPF and DMARC at
/// receipt in the seal); dkimpy (not our code) validates the chain. Mail to a mailbox
/// is not sealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_mail_is_arc_sealed() {
    let peer = Peer::start();
    let dns = Dns::start(&[
        "--local=/test/",
        "--txt-record=good.test,v=spf1 ip4:127.0.0.1 -all",
        "--txt-record=_dmarc.good.test,v=DMARC1; p=reject",
    ]);
    let dns_addr = dns.addr;
    let server = start(move |c| {
        // Mail from 127.0.0.1 is "the Internet" here: checked, not a relay client.
        c.smtp.relay_networks = Vec::new();
        c.inbound_checks.trusted_networks = Vec::new();
        c.outbound.nameservers = vec![dns_addr];
    })
    .await;
    partner(&server, &peer).await;
    server
        .cli(&[
            "contact",
            "add",
            "bob",
            "--target-address",
            "bob@remote.test",
            "--address",
            "bob@example.test",
        ])
        .await;
    let output = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args(["dkim", "generate", "example.test", "--selector", "arc"])
        .args(["--algorithm", "rsa", "--data"])
        .arg(&server.server.data_dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let line = text.lines().find(|l| l.contains(" IN TXT ")).unwrap();
    let (name, value) = line.split_once(". IN TXT ").unwrap();
    let records = json!({ name: value.trim_matches('"') });

    let smtp = server.smtp();
    let send = move |to: &'static str, subject: &'static str| {
        tokio::task::spawn_blocking(move || {
            let mut s = common::RawSmtp::connect(smtp);
            for (command, code) in [
                ("EHLO mx.good.test\r\n".to_string(), "250"),
                ("MAIL FROM:<news@good.test>\r\n".into(), "250"),
                (format!("RCPT TO:<{to}>\r\n"), "250"),
                ("DATA\r\n".into(), "354"),
                (
                    format!(
                        "From: <news@good.test>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\
Message-ID: <{subject}@good.test>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\nHello.\r\n.\r\n"
                    ),
                    "250",
                ),
            ] {
                s.send(command.as_bytes());
                let reply = s.reply();
                assert!(reply.starts_with(code), "{command:?}: {reply}");
            }
        })
    };
    send("bob@example.test", "forwarded").await.unwrap();
    let received = peer.wait_for(1).await;
    let data = received[0]["data"].as_str().unwrap().to_string();
    assert!(data.starts_with("ARC-Seal: i=1; a=rsa-sha256;"), "{data}");
    assert!(data.contains("ARC-Message-Signature: i=1;"), "{data}");
    assert!(
        data.contains("ARC-Authentication-Results: i=1; mx.example.test;"),
        "{data}"
    );
    assert!(data.contains("spf=pass"), "{data}");

    let script = r#"
import dkim, json, sys
records = json.loads(sys.argv[1])
def dns(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    return records.get(name.rstrip('.'), '').encode()
message = sys.argv[2].encode()
cv, results, reason = dkim.arc_verify(message, dnsfunc=dns)
print(json.dumps({"cv": cv.decode(), "reason": reason}))
"#;
    let output = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(records.to_string())
        .arg(&data)
        .output()
        .expect("python3 with dkimpy (Debian: python3-dkim)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(out["cv"], "pass", "{out}");

    // A mailbox recipient: checked (Authentication-Results), not sealed.
    send("alice@example.test", "kept").await.unwrap();
    let inbox = server.wait_for_messages("alice@example.test", 1).await;
    let raw = String::from_utf8(server.raw("alice@example.test", inbox[0].uid).await).unwrap();
    assert!(
        raw.contains("Authentication-Results: mx.example.test;"),
        "{raw}"
    );
    assert!(!raw.contains("ARC-Seal"), "{raw}");
}

/// A fresh server and a real Internet sender: mail for a local recipient is taken,
/// relay is closed, and the DSN for a forward that fails goes back DKIM-signed (its
/// From is MAILER-DAEMON@<host name>, signed with the parent domain's key: aligned),
/// which dkimpy verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internet_sender_gets_local_delivery_no_relay_and_signed_dsns() {
    let peer = Peer::start();
    let dns = Dns::start(&["--local=/test/"]);
    let dns_addr = dns.addr;
    let server = start(move |c| {
        c.smtp.relay_networks = Vec::new();
        c.inbound_checks.trusted_networks = Vec::new();
        c.outbound.nameservers = vec![dns_addr];
    })
    .await;
    partner(&server, &peer).await;
    server
        .cli(&[
            "contact",
            "add",
            "gone",
            "--target-address",
            "perm@remote.test",
            "--address",
            "gone@example.test",
        ])
        .await;
    let output = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args([
            "dkim",
            "generate",
            "example.test",
            "--selector",
            "dsn",
            "--data",
        ])
        .arg(&server.server.data_dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let line = text.lines().find(|l| l.contains(" IN TXT ")).unwrap();
    let (name, value) = line.split_once(". IN TXT ").unwrap();
    let records = json!({ name: value.trim_matches('"') });

    let smtp = server.smtp();
    let replies = tokio::task::spawn_blocking(move || {
        let mut s = common::RawSmtp::connect(smtp);
        let mut replies = Vec::new();
        for command in [
            "EHLO mail.remote.test\r\n",
            "MAIL FROM:<sender@remote.test>\r\n",
            "RCPT TO:<alice@example.test>\r\n",
            "RCPT TO:<someone@elsewhere.test>\r\n",
            "RCPT TO:<gone@example.test>\r\n",
            "DATA\r\n",
            "From: <sender@remote.test>\r\nSubject: hello from outside\r\n\
Message-ID: <outside@remote.test>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\nHi.\r\n.\r\n",
            "QUIT\r\n",
        ] {
            s.send(command.as_bytes());
            replies.push(s.reply());
        }
        replies
    })
    .await
    .unwrap();
    assert!(replies[2].starts_with("250 "), "{replies:?}");
    assert!(
        replies[3].starts_with("550 5.7.1 "),
        "relay closed: {replies:?}"
    );
    assert!(replies[4].starts_with("250 "), "{replies:?}");
    assert!(replies[6].starts_with("250 "), "{replies:?}");
    let inbox = server.wait_for_messages("alice@example.test", 1).await;
    let raw = String::from_utf8(server.raw("alice@example.test", inbox[0].uid).await).unwrap();
    assert!(raw.contains("spf=none"), "{raw}");

    // The forward to perm@remote.test is refused for good: the DSN goes to the sender,
    // through the same next hop, signed.
    let received = peer.wait_for(1).await;
    assert_eq!(received[0]["mail_from"], "<>", "the null sender");
    assert_eq!(received[0]["rcpt_tos"], json!(["sender@remote.test"]));
    let dsn = received[0]["data"].as_str().unwrap().to_string();
    assert!(
        dsn.contains("Final-Recipient: rfc822; perm@remote.test"),
        "{dsn}"
    );
    assert!(dsn.contains("d=example.test"), "{dsn}");
    let script = r#"
import dkim, json, sys
records = json.loads(sys.argv[1])
def dns(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    return records.get(name.rstrip('.'), '').encode()
print(json.dumps(dkim.verify(sys.argv[2].encode(), dnsfunc=dns)))
"#;
    let output = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(records.to_string())
        .arg(&dsn)
        .output()
        .expect("python3 with dkimpy (Debian: python3-dkim)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "true",
        "{dsn}"
    );
}

/// A DNSSEC-signed root zone served by NSD (signed with ldns-signzone, Debian's
/// ldnsutils), and the KSK to trust: a world where DNSSEC validates, for DANE.
struct SignedZone {
    child: Child,
    addr: std::net::SocketAddr,
    anchor: PathBuf,
    _dir: tempfile::TempDir,
}

impl SignedZone {
    fn start(records: &str) -> SignedZone {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        std::fs::write(
            path.join("root.zone"),
            format!(
                "$ORIGIN .\n$TTL 300\n. IN SOA ns.root.test. admin.root.test. 1 3600 600 86400 300\n\
. IN NS ns.root.test.\nns.root.test. IN A 127.0.0.1\n{records}"
            ),
        )
        .unwrap();
        let keygen = |ksk: bool| {
            let mut command = Command::new("ldns-keygen");
            command.current_dir(path).args(["-a", "ECDSAP256SHA256"]);
            if ksk {
                command.arg("-k");
            }
            let output = command
                .arg(".")
                .output()
                .expect("ldns-keygen (Debian: ldnsutils)");
            assert!(output.status.success(), "{output:?}");
            String::from_utf8(output.stdout).unwrap().trim().to_string()
        };
        let (ksk, zsk) = (keygen(true), keygen(false));
        let signed = Command::new("ldns-signzone")
            .current_dir(path)
            .args(["-f", "root.zone.signed", "root.zone", &ksk, &zsk])
            .status()
            .unwrap();
        assert!(signed.success());
        let anchor = path.join("anchor.key");
        std::fs::copy(path.join(format!("{ksk}.key")), &anchor).unwrap();
        let port = free_port();
        std::fs::write(
            path.join("nsd.conf"),
            format!(
                "server:\n  ip-address: 127.0.0.1@{port}\n  port: {port}\n  username: \"\"\n  chroot: \"\"\n\
  zonesdir: \"{d}\"\n  pidfile: \"{d}/nsd.pid\"\n  database: \"\"\n  zonelistfile: \"{d}/zone.list\"\n\
  xfrdfile: \"{d}/xfrd.state\"\n  logfile: \"{d}/nsd.log\"\nremote-control:\n  control-enable: no\n\
zone:\n  name: \".\"\n  zonefile: root.zone.signed\n",
                d = path.display()
            ),
        )
        .unwrap();
        let nsd = ["/usr/sbin/nsd", "nsd"]
            .into_iter()
            .find(|p| !p.starts_with('/') || Path::new(p).exists())
            .unwrap();
        let child = Command::new(nsd)
            .arg("-d")
            .arg("-c")
            .arg(path.join("nsd.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nsd (Debian: nsd)");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // Ready once it answers a query over UDP.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let query = [0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 6, 0, 1];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 512];
        loop {
            assert!(std::time::Instant::now() < deadline, "nsd did not answer");
            let _ = socket.send_to(&query, addr);
            if socket.recv_from(&mut buf).is_ok() {
                break;
            }
        }
        SignedZone {
            child,
            addr,
            anchor,
            _dir: dir,
        }
    }
}

impl Drop for SignedZone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// DANE (RFC 7672): with signed MX and TLSA records, the next hop's certificate from
/// a private authority (trusted by nobody's root store) is accepted because a DANE-EE
/// record pins its key, or because a DANE-TA record names the authority it sends in
/// its chain; a certificate that no record matches makes the mail wait (4.7.5), and a
/// signed domain without TLSA records gets opportunistic TLS as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_tlsa_records_are_enforced() {
    let certs = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "private authority");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![
        "mx.dane.test".to_string(),
        "mx.tadane.test".to_string(),
    ])
    .unwrap()
    .signed_by(&key, &ca)
    .unwrap();
    let (cert_file, key_file) = (certs.path().join("mx.pem"), certs.path().join("mx.key"));
    // The chain: the server's certificate, then the authority (RFC 7672 §3.1.2).
    std::fs::write(&cert_file, format!("{}{}", cert.pem(), ca.pem())).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let hex = |bytes: &[u8]| -> String {
        ring::digest::digest(&ring::digest::SHA256, bytes)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let hash = hex(&rcgen::PublicKeyData::subject_public_key_info(&key));
    let ta_hash = hex(ca.der());
    let zone = SignedZone::start(&format!(
        "dane.test. IN MX 10 mx.dane.test.\nmx.dane.test. IN A 127.0.0.1\n\
_25._tcp.mx.dane.test. IN TLSA 3 1 1 {hash}\n\
wrongtlsa.test. IN MX 10 mx.wrongtlsa.test.\nmx.wrongtlsa.test. IN A 127.0.0.1\n\
_25._tcp.mx.wrongtlsa.test. IN TLSA 3 1 1 {}\n\
nodane.test. IN MX 10 mx.nodane.test.\nmx.nodane.test. IN A 127.0.0.1\n\
tadane.test. IN MX 10 mx.tadane.test.\nmx.tadane.test. IN A 127.0.0.1\n\
_25._tcp.mx.tadane.test. IN TLSA 2 0 1 {ta_hash}\n",
        "ab".repeat(32)
    ));
    let peer = Peer::start_with(&[&cert_file, &key_file]);
    let (dns, anchor, peer_port) = (zone.addr, zone.anchor.clone(), peer.port);
    let server = start(move |c| {
        c.outbound.nameservers = vec![dns];
        c.outbound.dnssec_trust_anchor = Some(anchor);
        c.outbound.smtp_port = peer_port;
    })
    .await;
    connector(&server, "internet", json!({"kind": "mx"}), "*").await;

    send_from_alice(&server, &["bob@dane.test"], "pinned").await;
    let received = peer.wait_for(1).await;
    assert_eq!(received[0]["rcpt_tos"], json!(["bob@dane.test"]));
    assert_eq!(received[0]["tls"], true);

    send_from_alice(&server, &["bob@wrongtlsa.test"], "mismatch").await;
    let items = wait_outbound_settled(&server, 1).await;
    let reply = items[0]["envelope"]["recipients"][0]["reply"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reply.starts_with("4.7.5 DANE"), "{reply}");
    assert!(reply.contains("must match"), "{reply}");
    assert_eq!(peer.received().len(), 1);

    send_from_alice(&server, &["bob@nodane.test"], "no tlsa").await;
    let received = peer.wait_for(2).await;
    assert_eq!(received[1]["rcpt_tos"], json!(["bob@nodane.test"]));

    send_from_alice(&server, &["bob@tadane.test"], "by authority").await;
    let received = peer.wait_for(3).await;
    assert_eq!(received[2]["rcpt_tos"], json!(["bob@tadane.test"]));
}

/// `mailroom track --json` for these arguments, as a list of events.
async fn track(server: &TestServer, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["track", "--json"];
    all.extend_from_slice(args);
    let out = server.cli(&all).await;
    serde_json::from_str::<Value>(&out)
        .unwrap_or_else(|e| panic!("track --json printed no JSON ({e}): {out}"))
        .as_array()
        .unwrap()
        .clone()
}

fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_tracking_follows_a_message_from_receipt_to_the_next_hop_and_back() {
    let peer = Peer::start();
    let server = start(|_| {}).await;
    server.add_recipients(&["bob@example.test"]).await;
    partner(&server, &peer).await;
    server
        .cli(&[
            "list",
            "add",
            "team",
            "--address",
            "team@example.test",
            "--member",
            "alice@example.test",
            "--member",
            "bob@example.test",
        ])
        .await;

    // One message: a list of two mailboxes here, and three fates at the next hop.
    {
        use lettre::{AsyncTransport, Message};
        let mut builder = Message::builder()
            .from("alice@example.test".parse().unwrap())
            .message_id(Some("<tracked-1@example.test>".into()))
            .subject("tracked");
        for to in [
            "team@example.test",
            "ok@remote.test",
            "perm@remote.test",
            "temp@remote.test",
        ] {
            builder = builder.to(to.parse().unwrap());
        }
        lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(server.smtp().port())
            .hello_name(lettre::transport::smtp::extension::ClientId::Domain(
                "client.example".into(),
            ))
            .build()
            .send(builder.body("follow me\n".to_string()).unwrap())
            .await
            .expect("accepted");
    }
    peer.wait_for(1).await;
    wait_outbound_settled(&server, 1).await;
    server.wait_for_messages("alice@example.test", 2).await; // the message and the DSN

    let mut events = Vec::new();
    let complete = eventually(Duration::from_secs(10), async || {
        events = track(&server, &["--message-id", "<tracked-1@example.test>"]).await;
        [
            "received",
            "converted",
            "expanded",
            "delivered",
            "relayed",
            "failed",
            "dsn",
            "deferred",
        ]
        .iter()
        .all(|kind| !of_kind(&events, kind).is_empty())
    })
    .await;
    assert!(complete, "{events:#?}");
    let queue_id = events[0]["queue_id"].as_str().unwrap().to_string();
    for e in &events {
        assert_eq!(e["queue_id"], queue_id.as_str(), "one message: {e}");
        assert_eq!(e["message_id"], "tracked-1@example.test", "{e}");
        assert_eq!(e["sender"], "alice@example.test", "{e}");
        assert!(e["at_ms"].as_i64().unwrap() > 0, "{e}");
    }
    let received = of_kind(&events, "received")[0];
    assert!(
        received["client"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{received}"
    );
    assert_eq!(received["helo"], "client.example");
    assert!(received["size"].as_u64().unwrap() > 100, "{received}");
    assert_eq!(received["recipients"].as_array().unwrap().len(), 4);
    assert_eq!(of_kind(&events, "converted")[0]["subject"], "tracked");
    let expanded = of_kind(&events, "expanded")[0];
    assert_eq!(expanded["list"], "team@example.test");
    assert_eq!(
        expanded["recipients"],
        json!(["alice@example.test", "bob@example.test"])
    );
    let mut mailboxes: Vec<&str> = of_kind(&events, "delivered")
        .iter()
        .map(|e| {
            assert_eq!(e["folder"], "INBOX");
            assert!(e["uid"].as_u64().unwrap() >= 1);
            e["mailbox"].as_str().unwrap()
        })
        .collect();
    mailboxes.sort();
    assert_eq!(mailboxes, ["alice@example.test", "bob@example.test"]);
    let relayed = of_kind(&events, "relayed")[0];
    assert_eq!(relayed["recipients"], json!(["ok@remote.test"]));
    assert_eq!(relayed["connector"], "partner");
    assert!(
        relayed["host"].as_str().unwrap().contains("127.0.0.1"),
        "{relayed}"
    );
    assert!(
        relayed["reply"].as_str().unwrap().starts_with("250"),
        "{relayed}"
    );
    let failed = of_kind(&events, "failed")[0];
    assert_eq!(failed["recipients"], json!(["perm@remote.test"]));
    assert!(
        failed["reply"].as_str().unwrap().starts_with("550 5.1.1"),
        "{failed}"
    );
    let dsn = of_kind(&events, "dsn")[0];
    assert_eq!(dsn["action"], "failed");
    assert_eq!(dsn["to"], "alice@example.test");
    assert_eq!(dsn["recipients"], json!(["perm@remote.test"]));
    let deferred = of_kind(&events, "deferred")[0];
    assert_eq!(deferred["recipients"], json!(["temp@remote.test"]));
    assert!(
        deferred["reason"]
            .as_str()
            .unwrap()
            .starts_with("451 4.3.0"),
        "{deferred}"
    );
    assert!(deferred["next_attempt_at_ms"].as_i64().unwrap() > now_ms() + 10 * 60_000);

    // The DSN is a message of its own, with its own trail into alice's INBOX.
    let notice = dsn["notice"].as_str().unwrap();
    let trail = track(&server, &["--queue-id", notice]).await;
    let kinds: Vec<&str> = trail.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["received", "converted", "delivered"], "{trail:#?}");
    assert_eq!(trail[0]["sender"], "");
    assert_eq!(trail[2]["mailbox"], "alice@example.test");

    // An administrator holds and releases the waiting recipient: both are on the trail,
    // with who did it; then the retry relays it.
    let entry = entry_for(&server, "temp@remote.test").await;
    server.cli(&["queue", "hold", &entry.to_string()]).await;
    // The release by a script through the API with the token alone: "api" acted.
    let url = std::fs::read_to_string(server.dir.path().join("admin.url")).unwrap();
    let token = std::fs::read_to_string(server.dir.path().join("admin.token")).unwrap();
    let release = format!("{}/api/v1/queue/{entry}/release", url.trim());
    tokio::task::spawn_blocking(move || {
        ureq::post(&release)
            .set("Authorization", &format!("Bearer {}", token.trim()))
            .call()
            .expect("released")
    })
    .await
    .unwrap();
    advance(&server, 16 * 60 + 40).await;
    peer.wait_for(2).await;
    let mut events = Vec::new();
    let relayed_twice = eventually(Duration::from_secs(10), async || {
        events = track(&server, &["--recipient", "TEMP@remote", "--since", "1h"]).await;
        of_kind(&events, "relayed")
            .iter()
            .any(|e| e["recipients"] == json!(["temp@remote.test"]))
    })
    .await;
    assert!(relayed_twice, "{events:#?}");
    let admin = of_kind(&events, "admin");
    assert_eq!(admin.len(), 2, "{admin:#?}");
    assert_eq!(admin[0]["action"], "hold");
    assert!(
        admin[0]["by"].as_str().unwrap().starts_with("cli:"),
        "{}",
        admin[0]
    );
    assert_eq!(admin[1]["action"], "release");
    assert_eq!(admin[1]["by"], "api");

    // The filters: sender, a recipient no event names, a time after everything.
    assert!(!track(&server, &["--sender", "alice@"]).await.is_empty());
    assert!(
        track(&server, &["--recipient", "nobody@nowhere"])
            .await
            .is_empty()
    );
    assert!(track(&server, &["--since", "2999-01-01"]).await.is_empty());
    // The table names each step in words.
    let table = server
        .cli(&["track", "--message-id", "tracked-1@example.test"])
        .await;
    for words in [
        "received",
        "HELO client.example",
        "list team@example.test",
        "to mailbox bob@example.test (INBOX uid",
        "ok@remote.test to 127.0.0.1",
        "failed notice to <alice@example.test> about perm@remote.test",
        "hold by cli:",
    ] {
        assert!(table.contains(words), "missing {words:?} in:\n{table}");
    }
}
