//! Mail flows end to end: SMTP in, spool, conversion, mailbox; the protocol's refusals.

mod common;

use common::{RawSmtp, TestServer, eventually, message};
use lettre::message::header::ContentType;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::time::Duration;

fn lettre_to(server: &TestServer) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(server.smtp().port())
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_with_lettre_lands_in_the_mailbox_with_its_fields() {
    let server = TestServer::start().await;
    server.add_recipients(&["alice@example.test"]).await;
    let email = Message::builder()
        .from("Bob <bob@remote.test>".parse().unwrap())
        .to("Alice <alice@example.test>".parse().unwrap())
        .subject("Quarterly numbers — café")
        .message_id(Some("<q3@remote.test>".into()))
        .header(ContentType::TEXT_PLAIN)
        .body("Numbers attached.\nRegards\n".to_string())
        .unwrap();
    let sent = email.formatted();
    let response = lettre_to(&server).send(email).await.unwrap();
    assert_eq!(response.code().to_string(), "250");

    let messages = server.wait_for_messages("alice@example.test", 1).await;
    let m = &messages[0];
    assert_eq!(m.uid, 1);
    assert_eq!(m.message_id.as_deref(), Some("q3@remote.test"));
    assert_eq!(m.from.as_deref(), Some("bob@remote.test"));
    assert_eq!(m.to, vec!["alice@example.test"]);
    assert_eq!(m.subject.as_deref(), Some("Quarterly numbers — café"));
    assert_eq!(m.return_path, "bob@remote.test");

    // The stored bytes are what was sent, behind Return-Path and Received.
    let raw = server.raw("alice@example.test", 1).await;
    assert_eq!(raw.len() as u64, m.size);
    let text = String::from_utf8(raw.clone()).unwrap();
    assert!(
        text.starts_with("Return-Path: <bob@remote.test>\r\nReceived: from "),
        "{text}"
    );
    assert!(text.contains("by mx.example.test (Mailroom) with ESMTP id "));
    // lettre always ends DATA with "\r\n.\r\n", so a message that ends in CRLF gains
    // one empty line on the wire; the server must keep exactly what was on the wire.
    let on_the_wire = [sent.as_slice(), b"\r\n"].concat();
    assert!(
        raw.ends_with(&on_the_wire),
        "body changed in transit:\n{}\n---\n{}",
        String::from_utf8_lossy(&sent),
        text
    );
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_to_fifty_recipients_stores_one_body() {
    let server = TestServer::start().await;
    let addresses: Vec<String> = (0..50).map(|i| format!("user{i}@example.test")).collect();
    let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
    server.add_recipients(&refs).await;
    let bodies_before = server.server.store.blob_count().unwrap();

    let mut builder = Message::builder()
        .from("sender@remote.test".parse().unwrap())
        .subject("to everyone");
    for address in &addresses {
        builder = builder.to(address.parse().unwrap());
    }
    let email = builder.body("hello all\n".to_string()).unwrap();
    lettre_to(&server).send(email).await.unwrap();

    for address in &addresses {
        let messages = server.wait_for_messages(address, 1).await;
        assert_eq!(messages.len(), 1, "{address} got a copy exactly once");
        assert_eq!(messages[0].subject.as_deref(), Some("to everyone"));
    }
    assert_eq!(server.server.store.blob_count().unwrap(), bodies_before + 1);
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_bit_body_with_lettre_arrives_unchanged() {
    let server = TestServer::start().await;
    server.add_recipients(&["alice@example.test"]).await;
    let email = Message::builder()
        .from("bob@remote.test".parse().unwrap())
        .to("alice@example.test".parse().unwrap())
        .subject("8bit")
        .header(lettre::message::header::ContentTransferEncoding::EightBit)
        .header(ContentType::TEXT_PLAIN)
        .body("Grüße aus Köln — ½ € ✓\n".to_string())
        .unwrap();
    lettre_to(&server).send(email).await.unwrap();
    server.wait_for_messages("alice@example.test", 1).await;
    let raw = String::from_utf8(server.raw("alice@example.test", 1).await).unwrap();
    assert!(raw.contains("Grüße aus Köln — ½ € ✓"), "{raw}");
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtputf8_with_python_smtplib() {
    let server = TestServer::start().await;
    server.add_recipients(&["josé@example.test"]).await;
    let port = server.smtp().port();
    let script = format!(
        r#"
import smtplib
from email.message import EmailMessage
m = EmailMessage()
m['From'] = 'jörg@remote.test'
m['To'] = 'josé@example.test'
m['Subject'] = 'Olá'
m['Message-ID'] = '<utf8@remote.test>'
m.set_content('conteúdo\n')
with smtplib.SMTP('127.0.0.1', {port}) as s:
    s.send_message(m, mail_options=['SMTPUTF8'])
"#
    );
    let status = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .status()
        .await
        .expect("python3 runs");
    assert!(status.success(), "smtplib failed to send");
    let messages = server.wait_for_messages("josé@example.test", 1).await;
    assert_eq!(messages[0].return_path, "jörg@remote.test");
    assert_eq!(messages[0].subject.as_deref(), Some("Olá"));
    let raw = String::from_utf8(server.raw("josé@example.test", 1).await).unwrap();
    assert!(raw.contains("with UTF8SMTP id"), "{raw}");
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_unknown_relay_and_oversize_with_lettre() {
    let server =
        TestServer::start_with(|c| c.smtp.message_size_max_bytes = 4096, Default::default()).await;
    server.add_recipients(&["alice@example.test"]).await;
    let transport = lettre_to(&server);
    let send = |to: &str, body: String| {
        let email = Message::builder()
            .from("bob@remote.test".parse().unwrap())
            .to(to.parse().unwrap())
            .subject("x")
            .body(body)
            .unwrap();
        transport.send(email)
    };
    let unknown = send("nobody@example.test", "hi\n".into())
        .await
        .unwrap_err();
    assert!(unknown.to_string().contains("5.1.1"), "{unknown}");
    assert_eq!(unknown.status().map(|c| c.to_string()), Some("550".into()));
    let relay = send("someone@elsewhere.test", "hi\n".into())
        .await
        .unwrap_err();
    assert!(relay.to_string().contains("5.7.1"), "{relay}");
    let big = send("alice@example.test", "x".repeat(10_000))
        .await
        .unwrap_err();
    assert_eq!(
        big.status().map(|c| c.to_string()),
        Some("552".into()),
        "{big}"
    );
    // Nothing of the refused mail was stored.
    assert!(server.mailbox("alice@example.test").await.is_empty());
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_too_many_recipients_and_oversize_data() {
    let server = TestServer::start_with(
        |c| {
            c.smtp.recipients_per_message_max = 3;
            c.smtp.message_size_max_bytes = 2048;
        },
        Default::default(),
    )
    .await;
    server
        .add_recipients(&[
            "a@example.test",
            "b@example.test",
            "c@example.test",
            "d@example.test",
        ])
        .await;
    let addr = server.smtp();
    let codes = tokio::task::spawn_blocking(move || {
        let mut smtp = RawSmtp::connect(addr);
        smtp.send(b"EHLO client.test\r\n");
        let ehlo = smtp.reply();
        assert!(
            ehlo.contains("PIPELINING") && ehlo.contains("CHUNKING") && ehlo.contains("SIZE 2048")
        );
        // One write: the whole transaction, pipelined (RFC 2920).
        let mut batch = String::from("MAIL FROM:<s@remote.test>\r\n");
        for r in ["a", "b", "c", "d"] {
            batch.push_str(&format!("RCPT TO:<{r}@example.test>\r\n"));
        }
        batch.push_str("DATA\r\n");
        smtp.send(batch.as_bytes());
        let mut codes = smtp.codes(6);
        smtp.send(message("s@remote.test", "a@example.test", "pipe1@test", "hello").as_bytes());
        smtp.send(b".\r\n");
        codes.extend(smtp.codes(1));
        // An oversized message is read to its end and refused; the session goes on.
        smtp.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<a@example.test>\r\nDATA\r\n");
        codes.extend(smtp.codes(3));
        smtp.send("y".repeat(5000).as_bytes());
        smtp.send(b"\r\n.\r\nNOOP\r\nQUIT\r\n");
        codes.extend(smtp.codes(3));
        codes
    })
    .await
    .unwrap();
    assert_eq!(
        codes,
        [
            "250", "250", "250", "250", "452", "354", "250", "250", "250", "354", "552", "250",
            "221"
        ]
    );
    for r in ["a", "b", "c"] {
        let m = server
            .wait_for_messages(&format!("{r}@example.test"), 1)
            .await;
        assert_eq!(m.len(), 1);
    }
    assert!(server.mailbox("d@example.test").await.is_empty());
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdat_chunks_make_one_message() {
    let server = TestServer::start().await;
    server.add_recipients(&["alice@example.test"]).await;
    let addr = server.smtp();
    let body = message(
        "s@remote.test",
        "alice@example.test",
        "bdat@test",
        "line one\r\n.line two",
    );
    let (first, second) = body.split_at(40);
    let (first, second) = (first.to_string(), second.to_string());
    let codes = tokio::task::spawn_blocking(move || {
        let mut smtp = RawSmtp::connect(addr);
        smtp.send(b"EHLO c\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n");
        let mut codes = smtp.codes(3);
        smtp.send(format!("BDAT {}\r\n{first}", first.len()).as_bytes());
        codes.extend(smtp.codes(1));
        smtp.send(format!("BDAT {} LAST\r\n{second}", second.len()).as_bytes());
        codes.extend(smtp.codes(1));
        smtp.send(b"QUIT\r\n");
        codes.extend(smtp.codes(1));
        codes
    })
    .await
    .unwrap();
    assert_eq!(codes, ["250", "250", "250", "250", "250", "221"]);
    server.wait_for_messages("alice@example.test", 1).await;
    let raw = server.raw("alice@example.test", 1).await;
    assert!(
        raw.ends_with(body.as_bytes()),
        "BDAT content is taken verbatim (no dot-unstuffing)"
    );
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempt_yields_no_second_message() {
    let server = TestServer::start().await;
    server
        .add_recipients(&["alice@example.test", "victim@example.test"])
        .await;
    let addr = server.smtp();
    let replies = tokio::task::spawn_blocking(move || {
        let mut smtp = RawSmtp::connect(addr);
        smtp.send(
            b"EHLO c\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n",
        );
        smtp.codes(4);
        // "<LF>.<CR><LF>" inside the data: a lax server ends the message there and runs
        // the rest as commands. Every variant in one message.
        for ending in ["\n.\r\n", "\n.\n", "\r.\r\n", "\r\n.\r"] {
            smtp.send(
                format!(
                    "Subject: first\r\n\r\nhello{ending}MAIL FROM:<admin@example.test>\r\n\
RCPT TO:<victim@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n"
                )
                .as_bytes(),
            );
            let reply = smtp.reply();
            assert!(reply.starts_with("550 5.6.0"), "{ending:?}: {reply}");
            smtp.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n");
            smtp.codes(3);
        }
        smtp.send(b"Subject: clean\r\n\r\nok\r\n.\r\nQUIT\r\n");
        smtp.codes(2)
    })
    .await
    .unwrap();
    assert_eq!(replies, ["250", "221"]);
    let messages = server.wait_for_messages("alice@example.test", 1).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].subject.as_deref(), Some("clean"));
    // Give conversion every chance to show a smuggled message before asserting none.
    let queues_empty = eventually(Duration::from_secs(10), async || {
        server.queues().await["queues"][0]["depth"] == 0
    })
    .await;
    assert!(queues_empty);
    assert!(server.mailbox("victim@example.test").await.is_empty());
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_protocol_replies() {
    let server = TestServer::start().await;
    let addr = server.smtp();
    let replies = tokio::task::spawn_blocking(move || {
        let mut smtp = RawSmtp::connect(addr);
        let mut out = Vec::new();
        for command in [
            "MAIL FROM:<a@b.test>", // before EHLO
            "HELO client.test",
            "RCPT TO:<postmaster@example.test>", // before MAIL
            "DATA",
            "VRFY postmaster",
            "HELP",
            "NOOP",
            "FOO bar",
            "MAIL FROM:<a@b.test>",
            "MAIL FROM:<a@b.test>", // nested
            "RCPT TO:<postmaster>", // RFC 5321 4.5.1: always accepted
            "RSET",
            "QUIT",
        ] {
            smtp.send(format!("{command}\r\n").as_bytes());
            out.push(smtp.reply());
        }
        out
    })
    .await
    .unwrap();
    let codes: Vec<&str> = replies.iter().map(|r| &r[..9.min(r.len())]).collect();
    assert_eq!(
        codes,
        [
            "503 5.5.1",
            "250 mx.ex",
            "503 5.5.1",
            "503 5.5.1",
            "252 2.5.0",
            "214 2.0.0",
            "250 2.0.0",
            "500 5.5.1",
            "250 2.1.0",
            "503 5.5.1",
            "250 2.1.5",
            "250 2.0.0",
            "221 2.0.0"
        ]
    );
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_networks_allow_remote_recipients_into_the_outbound_queue() {
    let server = TestServer::start_with(
        |c| c.smtp.relay_networks = vec!["127.0.0.0/8".parse().unwrap()],
        Default::default(),
    )
    .await;
    server.add_recipients(&["alice@example.test"]).await;
    let email = Message::builder()
        .from("alice@example.test".parse().unwrap())
        .to("friend@elsewhere.test".parse().unwrap())
        .cc("alice@example.test".parse().unwrap())
        .subject("out")
        .body("x\n".to_string())
        .unwrap();
    lettre_to(&server).send(email).await.unwrap();
    server.wait_for_messages("alice@example.test", 1).await;
    let outbound = eventually(Duration::from_secs(10), async || {
        server.queues().await["queues"][1]["depth"] == 1
    })
    .await;
    assert!(outbound, "{}", server.queues().await);
    let items = server
        .server
        .store
        .queue_items(Some(mailroom_store::QueueName::Outbound), None, 10)
        .unwrap();
    assert_eq!(items[0].recipients, ["friend@elsewhere.test"]);
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_address_delivers_to_the_same_mailbox_once() {
    let server = TestServer::start().await;
    let client = server.client();
    tokio::task::spawn_blocking(move || {
        client
            .post_no_content("/domains", &serde_json::json!({"domain": "example.org"}))
            .unwrap();
        let _: serde_json::Value = client
            .post(
                "/recipients",
                &serde_json::json!({
                    "address": "alice@example.test",
                    "display_name": "Alice Smith",
                    "secondary_addresses": ["a.smith@example.test", "alice@example.org"]
                }),
            )
            .unwrap();
    })
    .await
    .unwrap();
    // Addressed to all three addresses of one person: one copy.
    let email = Message::builder()
        .from("bob@remote.test".parse().unwrap())
        .to("alice@example.test".parse().unwrap())
        .to("a.smith@example.test".parse().unwrap())
        .cc("alice@example.org".parse().unwrap())
        .subject("one copy")
        .body("x\n".to_string())
        .unwrap();
    lettre_to(&server).send(email).await.unwrap();
    // And once to the secondary address alone (in a domain added as accepted).
    let email = Message::builder()
        .from("bob@remote.test".parse().unwrap())
        .to("alice@example.org".parse().unwrap())
        .subject("secondary")
        .body("x\n".to_string())
        .unwrap();
    lettre_to(&server).send(email).await.unwrap();
    let messages = server.wait_for_messages("alice@example.test", 2).await;
    let subjects: Vec<_> = messages
        .iter()
        .filter_map(|m| m.subject.as_deref())
        .collect();
    assert_eq!(subjects, ["one copy", "secondary"]);
    let health: serde_json::Value = {
        let url = format!("http://{}/health", server.server.admin_addr);
        tokio::task::spawn_blocking(move || ureq::get(&url).call().unwrap().into_json().unwrap())
            .await
            .unwrap()
    };
    assert_eq!(health["organization"], "Mailroom");
    assert_eq!(health["site"], "Default-Site");
    assert_eq!(health["server"], "mx.example.test");
    server.server.shutdown().await;
}

/// The spool writer waits a moment for messages under way in other sessions to share
/// its commit (`[spool] commit_delay_us`), so the count of messages under way must be
/// exact: a message is under way from MAIL FROM until it is submitted, reset or its
/// session ends however it ends, and a count that leaked would make every later commit
/// wait. Checked through the gauge an administrator reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_under_way_are_counted_until_submitted_reset_or_abandoned() {
    let server = TestServer::start().await;
    server.add_recipients(&["ann@example.test"]).await;
    let addr = server.smtp();
    let under_way = async || server.gauge("mailroom_spool_messages_under_way").await;
    assert_eq!(under_way().await, 0);

    // A: MAIL FROM, then waits. B: in the middle of DATA. C: a whole message.
    let (a, b) = tokio::task::spawn_blocking(move || {
        let mut a = RawSmtp::connect(addr);
        a.send(b"EHLO a.test\r\nMAIL FROM:<a@remote.test>\r\n");
        assert_eq!(a.codes(2), ["250", "250"]);
        let mut b = RawSmtp::connect(addr);
        b.send(
            b"EHLO b.test\r\nMAIL FROM:<b@remote.test>\r\nRCPT TO:<ann@example.test>\r\nDATA\r\n",
        );
        assert_eq!(b.codes(4), ["250", "250", "250", "354"]);
        b.send(b"Subject: half\r\n\r\nthe first half\r\n");
        (a, b)
    })
    .await
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), async || under_way().await == 2).await,
        "A and B each have a message under way"
    );
    let c = tokio::task::spawn_blocking(move || {
        let mut c = RawSmtp::connect(addr);
        c.send(
            b"EHLO c.test\r\nMAIL FROM:<c@remote.test>\r\nRCPT TO:<ann@example.test>\r\nDATA\r\n",
        );
        assert_eq!(c.codes(4), ["250", "250", "250", "354"]);
        c.send(b"Subject: whole\r\n\r\nall of it\r\n.\r\n");
        c.reply()
    })
    .await
    .unwrap();
    assert!(c.starts_with("250"), "{c}");
    assert_eq!(under_way().await, 2, "C's message is no longer under way");

    // A resets: no longer under way; B's client vanishes mid-DATA: neither is B's.
    let a_reset = tokio::task::spawn_blocking(move || {
        let mut a = a;
        a.send(b"RSET\r\n");
        let reply = a.reply();
        (a, reply)
    });
    let (a, reply) = a_reset.await.unwrap();
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(under_way().await, 1, "only B's message is under way");
    drop(b);
    assert!(
        eventually(Duration::from_secs(10), async || under_way().await == 0).await,
        "an abandoned message is no longer under way"
    );
    drop(a);
    // B's half message was never accepted; C's was delivered.
    let messages = server.wait_for_messages("ann@example.test", 1).await;
    assert_eq!(messages.len(), 1);
}
