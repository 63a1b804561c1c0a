//! Inbound mail authentication (SPF, DKIM, DMARC, ARC, iprev) against DNS records served
//! by dnsmasq: the verdict in the Authentication-Results header, DMARC's reject and
//! quarantine, local-domain forgery refused, forged results removed, and a message DKIM
//! signed by one Mailroom verified by another.
//!
//! The "Internet" is 127.0.0.1 with `inbound_checks.trusted_networks` emptied (loopback is
//! trusted by default).

mod common;

use common::dns::Dns;
use common::{RawSmtp, TestServer, imap_folders};
use mailroom::ServerOptions;
use serde_json::json;
use std::net::SocketAddr;
use std::process::Command;

/// SPF, DMARC and host records for the test domains. `signed.test`'s DKIM key is added
/// per test (it is made by `mailroom dkim generate`).
fn zone(extra: &[String]) -> Dns {
    let mut records: Vec<String> = [
        // Authoritative for .test: names not listed are NXDOMAIN (as on the Internet),
        // not REFUSED (which the checks rightly take for a DNS failure).
        "--local=/test/",
        // Passes SPF from 127.0.0.1; DMARC p=reject.
        "--txt-record=good.test,v=spf1 ip4:127.0.0.1 -all",
        "--txt-record=_dmarc.good.test,v=DMARC1; p=reject",
        // Fails SPF from here; DMARC p=reject.
        "--txt-record=strict.test,v=spf1 ip4:192.0.2.1 -all",
        "--txt-record=_dmarc.strict.test,v=DMARC1; p=reject",
        // Fails SPF from here; DMARC p=quarantine.
        "--txt-record=soft.test,v=spf1 ip4:192.0.2.1 -all",
        "--txt-record=_dmarc.soft.test,v=DMARC1; p=quarantine",
        // signed.test: SPF allows here too; DMARC p=reject.
        "--txt-record=signed.test,v=spf1 ip4:127.0.0.1 -all",
        "--txt-record=_dmarc.signed.test,v=DMARC1; p=reject",
        // iprev: 127.0.0.1 <-> mx.good.test (A and PTR).
        "--host-record=mx.good.test,127.0.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    records.extend(extra.iter().cloned());
    let refs: Vec<&str> = records.iter().map(String::as_str).collect();
    Dns::start(&refs)
}

/// A server for example.test that checks mail from 127.0.0.1 against `dns`.
async fn checking_server(
    dns: &Dns,
    tweak: impl FnOnce(&mut mailroom::config::Config),
) -> TestServer {
    let dns = dns.addr;
    let server = TestServer::start_with(
        move |c| {
            c.outbound.nameservers = vec![dns];
            c.inbound_checks.trusted_networks = Vec::new();
            tweak(c);
        },
        ServerOptions::default(),
    )
    .await;
    server
        .add_mailbox("alice@example.test", "alice-pw", json!({}))
        .await;
    server
}

/// One SMTP transaction; returns the reply to the end of DATA.
async fn deliver(addr: SocketAddr, helo: &str, mail_from: &str, data: String) -> String {
    let helo = helo.to_string();
    let mail_from = mail_from.to_string();
    tokio::task::spawn_blocking(move || {
        let mut smtp = RawSmtp::connect(addr);
        smtp.send(format!("EHLO {helo}\r\n").as_bytes());
        assert!(smtp.reply().starts_with("250"));
        smtp.send(format!("MAIL FROM:<{mail_from}>\r\n").as_bytes());
        let reply = smtp.reply();
        assert!(reply.starts_with("250"), "MAIL: {reply}");
        smtp.send(b"RCPT TO:<alice@example.test>\r\n");
        let reply = smtp.reply();
        assert!(reply.starts_with("250"), "RCPT: {reply}");
        smtp.send(b"DATA\r\n");
        assert!(smtp.reply().starts_with("354"));
        smtp.send(data.as_bytes());
        smtp.send(b".\r\n");
        let reply = smtp.reply();
        smtp.send(b"QUIT\r\n");
        reply
    })
    .await
    .unwrap()
}

fn message(from: &str, subject: &str) -> String {
    format!(
        "From: <{from}>\r\nTo: <alice@example.test>\r\nSubject: {subject}\r\n\
Message-ID: <{subject}@test>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\nHello.\r\n"
    )
}

/// The Authentication-Results field at the top of a stored message, unfolded.
fn results(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut field = String::new();
    for line in text.split("\r\n") {
        if field.is_empty() {
            if line
                .to_ascii_lowercase()
                .starts_with("authentication-results:")
            {
                field.push_str(line);
            }
        } else if line.starts_with([' ', '\t']) {
            field.push(' ');
            field.push_str(line.trim());
        } else {
            break;
        }
    }
    field
}

/// Folder name -> subjects, read over IMAP.
async fn folders(server: &TestServer) -> std::collections::BTreeMap<String, Vec<String>> {
    imap_folders(
        server.server.imap_addr,
        "alice@example.test",
        "alice-pw",
        true,
    )
    .await
    .into_iter()
    .map(|(name, messages)| {
        let subjects = messages
            .iter()
            .map(|m| {
                let body = String::from_utf8_lossy(m.body.as_deref().unwrap()).to_string();
                body.lines()
                    .find_map(|l| l.strip_prefix("Subject: "))
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        (name, subjects)
    })
    .collect()
}

/// What each published policy does to mail from 127.0.0.1: SPF pass is recorded (with
/// iprev and DMARC), `p=reject` refuses at the end of DATA, `p=quarantine` delivers into
/// Junk, and forged results in our name are replaced by ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_policies_are_verified_and_applied() {
    let dns = zone(&[]);
    let server = checking_server(&dns, |_| {}).await;
    let smtp = server.smtp();

    // SPF passes and aligns: DMARC passes. A forged result in our name is dropped.
    let forged = format!(
        "Authentication-Results: mx.example.test; dmarc=pass header.from=strict.test\r\n{}",
        message("news@good.test", "good")
    );
    let reply = deliver(smtp, "mx.good.test", "news@good.test", forged).await;
    assert!(reply.starts_with("250 "), "{reply}");
    let inbox = server.wait_for_messages("alice@example.test", 1).await;
    let raw = server.raw("alice@example.test", inbox[0].uid).await;
    let header = results(&raw);
    assert!(
        header.starts_with("Authentication-Results: mx.example.test;"),
        "{header}"
    );
    for expected in [
        "spf=pass",
        "smtp.mailfrom=news@good.test",
        "iprev=pass",
        "dmarc=pass",
        "header.from=good.test",
    ] {
        assert!(header.contains(expected), "{expected} in {header}");
    }
    let text = String::from_utf8_lossy(&raw);
    assert_eq!(
        text.matches("Authentication-Results:").count(),
        1,
        "the forged field is gone: {text}"
    );
    assert!(!text.contains("header.from=strict.test"), "{text}");

    // SPF fails, nothing else aligns, p=reject: refused, and nothing is delivered.
    let reply = deliver(
        smtp,
        "mx.good.test",
        "news@strict.test",
        message("news@strict.test", "strict"),
    )
    .await;
    assert!(reply.starts_with("550 5.7.1 "), "{reply}");
    assert!(
        reply.contains("DMARC") && reply.contains("strict.test"),
        "{reply}"
    );

    // p=quarantine: accepted into Junk with the failure recorded.
    let reply = deliver(
        smtp,
        "mx.good.test",
        "news@soft.test",
        message("news@soft.test", "soft"),
    )
    .await;
    assert!(reply.starts_with("250 "), "{reply}");
    let folders = folders(&server).await;
    assert_eq!(folders["INBOX"], vec!["good".to_string()], "{folders:?}");
    assert_eq!(folders["Junk"], vec!["soft".to_string()], "{folders:?}");

    // A domain without SPF or DMARC records: accepted, "none" recorded.
    let reply = deliver(
        smtp,
        "mx.good.test",
        "someone@plain.test",
        message("someone@plain.test", "plain"),
    )
    .await;
    assert!(reply.starts_with("250 "), "{reply}");
    let inbox = server.wait_for_messages("alice@example.test", 2).await;
    let raw = server.raw("alice@example.test", inbox[1].uid).await;
    let header = results(&raw);
    assert!(header.contains("spf=none"), "{header}");
    assert!(header.contains("dkim=none"), "{header}");

    // A message with more DKIM signatures than anyone needs: accepted, none checked
    // (no DNS flood on its behalf), SPF still decides DMARC.
    let signatures: String = (0..11)
        .map(|n| {
            format!(
                "DKIM-Signature: v=1; a=rsa-sha256; d=sig{n}.test; s=s; h=from; bh=AAAA; b=AAAA\r\n"
            )
        })
        .collect();
    let reply = deliver(
        smtp,
        "mx.good.test",
        "news@good.test",
        format!("{signatures}{}", message("news@good.test", "many")),
    )
    .await;
    assert!(reply.starts_with("250 "), "{reply}");
    let inbox = server.wait_for_messages("alice@example.test", 3).await;
    let raw = server.raw("alice@example.test", inbox[2].uid).await;
    let header = results(&raw);
    assert!(header.contains("dkim=none"), "{header}");
    assert!(header.contains("dmarc=pass"), "{header}");

    let client = server.client();
    let metrics = tokio::task::spawn_blocking(move || client.metrics().expect("metrics"))
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"mailroom_smtp_checked_total{dmarc="fail",action="reject"} 1"#),
        "{metrics}"
    );
}

/// Mail from the Internet claiming one of our domains without SPF or DKIM proving it is
/// refused; the same from a trusted network (loopback by default) is not checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_local_senders_are_refused() {
    let dns = zone(&[]);
    let server = checking_server(&dns, |_| {}).await;
    // Envelope and From both local.
    let reply = deliver(
        server.smtp(),
        "mx.good.test",
        "ceo@example.test",
        message("ceo@example.test", "wire money"),
    )
    .await;
    assert!(reply.starts_with("550 5.7.1 "), "{reply}");
    assert!(reply.contains("example.test"), "{reply}");
    // A passing envelope from elsewhere does not make a local From true.
    let reply = deliver(
        server.smtp(),
        "mx.good.test",
        "news@good.test",
        message("ceo@example.test", "wire more money"),
    )
    .await;
    assert!(reply.starts_with("550 5.7.1 "), "{reply}");
    assert!(server.mailbox("alice@example.test").await.is_empty());

    // Per-domain override: strict.test's p=reject is turned into "none" here.
    let lenient = checking_server(&dns, |c| {
        c.inbound_checks
            .dmarc_overrides
            .insert("strict.test".into(), mailroom::config::DmarcSetting::None);
    })
    .await;
    let reply = deliver(
        lenient.smtp(),
        "mx.good.test",
        "news@strict.test",
        message("news@strict.test", "strict"),
    )
    .await;
    assert!(reply.starts_with("250 "), "{reply}");
    let inbox = lenient.wait_for_messages("alice@example.test", 1).await;
    let raw = lenient.raw("alice@example.test", inbox[0].uid).await;
    assert!(results(&raw).contains("dmarc=fail"), "{}", results(&raw));

    // With the defaults, loopback is trusted: not checked, no results added.
    let trusting = TestServer::start().await;
    trusting
        .add_mailbox("alice@example.test", "alice-pw", json!({}))
        .await;
    let reply = deliver(
        trusting.smtp(),
        "localhost",
        "cron@example.test",
        message("cron@example.test", "nightly report"),
    )
    .await;
    assert!(reply.starts_with("250 "), "{reply}");
    let inbox = trusting.wait_for_messages("alice@example.test", 1).await;
    let raw = trusting.raw("alice@example.test", inbox[0].uid).await;
    assert_eq!(results(&raw), "", "{}", String::from_utf8_lossy(&raw));
}

/// A message DKIM-signed by one Mailroom (key from `mailroom dkim generate`, record
/// published in DNS) verifies at another: dkim=pass, and DMARC passes by DKIM even when
/// the envelope sender is another domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_signed_by_one_mailroom_verifies_at_another() {
    // The sender, signed.test, whose key must be in DNS before the receiver asks.
    let sender = TestServer::start_with(
        |c| {
            c.server.domain = "signed.test".into();
            c.server.hostname = "mx.good.test".into();
            c.smtp.relay_networks = vec!["127.0.0.0/8".parse().unwrap()];
            c.outbound.transfer_mode = mailroom_outbound::TransferMode::Both;
        },
        ServerOptions::default(),
    )
    .await;
    let output = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args(["dkim", "generate", "signed.test", "--selector", "s1"])
        .args(["--algorithm", "rsa", "--data"])
        .arg(&sender.server.data_dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let line = text.lines().find(|l| l.contains(" IN TXT ")).unwrap();
    let (name, value) = line.split_once(". IN TXT ").unwrap();
    // An RSA-2048 record is longer than one 255-byte string: publish it split.
    let value = value.trim_matches('"');
    let chunks: Vec<&str> = value
        .as_bytes()
        .chunks(200)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let dns = zone(&[format!("--txt-record={name},{}", chunks.join(","))]);
    let receiver = checking_server(&dns, |_| {}).await;
    // The sender routes example.test to the receiver.
    let client = sender.client();
    let route = json!({"change": "put_connector", "connector": {
        "name": "receiver", "kind": "smart_host",
        "host": format!("127.0.0.1:{}", receiver.smtp().port()),
        "address_spaces": [{"pattern": "*@example.test", "cost": 1}],
    }});
    tokio::task::spawn_blocking(move || {
        let _: serde_json::Value = client.post("/site", &route).unwrap();
    })
    .await
    .unwrap();

    // The envelope is a bounce address at another domain (as a list or a mailing
    // service uses): SPF is about that domain, so DMARC for signed.test rests on DKIM.
    let reply = deliver(
        sender.smtp(),
        "client.signed.test",
        "bounces@good.test",
        message("news@signed.test", "signed"),
    )
    .await;
    assert!(reply.starts_with("250 "), "{reply}");
    let inbox = receiver.wait_for_messages("alice@example.test", 1).await;
    let raw = receiver.raw("alice@example.test", inbox[0].uid).await;
    let header = results(&raw);
    for expected in [
        "dkim=pass",
        "header.d=signed.test",
        "header.s=s1",
        "dmarc=pass",
        "header.from=signed.test",
    ] {
        assert!(header.contains(expected), "{expected} in {header}");
    }

    // Tampered on the way (a body changed after signing): the signature fails, DMARC
    // fails and signed.test's p=reject refuses it.
    let signed = String::from_utf8(raw).unwrap();
    let start = signed.find("DKIM-Signature:").expect("signed");
    let tampered = signed[start..].replace("Hello.", "Hello, send money.");
    let reply = deliver(
        receiver.smtp(),
        "mx.good.test",
        "bounces@good.test",
        tampered,
    )
    .await;
    assert!(reply.starts_with("550 5.7.1 "), "{reply}");
}

/// mail-auth's own DKIM and ARC test vectors (tests/vectors/mail-auth), through a
/// whole server: their DNS records served by dnsmasq, each message sent over SMTP, and
/// the verdict read from the Authentication-Results field the server wrote. Vector
/// dkim/005 is left out: its signatures carry an expiry (x=) in 2022, which mail-auth's
/// own test gets past by verifying at a fixed time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_auth_test_vectors_verify() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/mail-auth");
    let mut vectors = Vec::new();
    for kind in ["dkim", "arc"] {
        let mut files: Vec<_> = std::fs::read_dir(root.join(kind))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        files.sort();
        for file in files {
            if kind == "dkim" && file.ends_with("005.txt") {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            let (records, message) = text.split_once("\n\n").unwrap();
            vectors.push((
                format!("{kind}/{}", file.file_name().unwrap().to_string_lossy()),
                kind,
                records.to_string(),
                message.replace('\n', "\r\n"),
            ));
        }
    }
    assert_eq!(vectors.len(), 7, "five DKIM and two ARC vectors");
    let mut options = Vec::new();
    for (_, _, records, _) in &vectors {
        for line in records.lines().filter(|l| !l.trim().is_empty()) {
            let (name, value) = line.split_once(' ').unwrap();
            let chunks: Vec<&str> = value
                .trim()
                .as_bytes()
                .chunks(200)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            options.push(format!("--txt-record={name},{}", chunks.join(",")));
        }
    }
    let refs: Vec<&str> = options.iter().map(String::as_str).collect();
    let dns = Dns::start(&refs);
    let server = checking_server(&dns, |_| {}).await;
    for (n, (name, _, _, message)) in vectors.iter().enumerate() {
        // DATA: a line starting with "." is sent with one more.
        let mut data = message.replace("\r\n.", "\r\n..");
        if !data.ends_with("\r\n") {
            data.push_str("\r\n");
        }
        let reply = deliver(
            server.smtp(),
            "mx.vectors.test",
            "vectors@vectors.test",
            data,
        )
        .await;
        assert!(reply.starts_with("250 "), "{name}: {reply}");
        server.wait_for_messages("alice@example.test", n + 1).await;
    }
    let inbox = server.mailbox("alice@example.test").await;
    for ((name, kind, _, _), stored) in vectors.iter().zip(&inbox) {
        let raw = server.raw("alice@example.test", stored.uid).await;
        let header = results(&raw);
        assert!(
            header.starts_with("Authentication-Results: mx.example.test;"),
            "{name}: {header}"
        );
        assert!(header.contains("dkim=pass"), "{name}: {header}");
        if *kind == "arc" {
            assert!(header.contains("arc=pass"), "{name}: {header}");
        }
    }
}
