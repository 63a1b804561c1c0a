//! IMAP with clients we did not write: `async-imap` (Rust) and Python's `imaplib`, over
//! real sockets. Login, list, select, fetch of every item on single-part and nested
//! multipart messages, search, store, copy, move, expunge seen by a second session, IDLE
//! woken by an SMTP delivery, append, quota refusal, a recipient with IMAP disabled. The
//! bytes fetched equal the bytes received over SMTP plus the trace headers.

mod common;

use async_imap::Session;
use common::TestServer;
use futures_util::TryStreamExt;
use serde_json::Value;
use std::time::Duration;
use tokio::net::TcpStream;

const PASSWORD: &str = "imap test password";

async fn connect(server: &TestServer) -> async_imap::Client<TcpStream> {
    let stream = TcpStream::connect(server.server.imap_addr).await.unwrap();
    let mut client = async_imap::Client::new(stream);
    let greeting = client.read_response().await.unwrap().unwrap();
    assert!(
        format!("{:?}", greeting.parsed()).contains("Ok"),
        "{greeting:?}"
    );
    client
}

async fn login(server: &TestServer, user: &str) -> Session<TcpStream> {
    connect(server)
        .await
        .login(user, PASSWORD)
        .await
        .map_err(|(e, _)| e)
        .expect("login")
}

const SIMPLE: &[u8] = b"From: Bob <bob@remote.test>\r\nTo: alice@example.test\r\nSubject: simple\r\nMessage-ID: <s1@remote.test>\r\nDate: Thu, 05 Mar 2026 10:00:00 +0000\r\n\r\nhello alice\r\n";

const NESTED: &[u8] = b"From: =?utf-8?q?Zo=C3=AB?= <zoe@remote.test>\r\nTo: alice@example.test\r\nSubject: nested report\r\nMessage-ID: <n1@remote.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"o\"\r\n\r\n--o\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9 numbers\r\n--o\r\nContent-Type: message/rfc822\r\n\r\nFrom: inner@remote.test\r\nSubject: inner\r\nContent-Type: multipart/alternative; boundary=\"i\"\r\n\r\n--i\r\nContent-Type: text/plain\r\n\r\ninner text\r\n--i\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n--i--\r\n\r\n--o--\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_search_store_copy_move_expunge_and_idle_with_async_imap() {
    let server = TestServer::start().await;
    server
        .add_mailbox("alice@example.test", PASSWORD, serde_json::json!({}))
        .await;
    server.send_raw("alice@example.test", SIMPLE).await;
    server.send_raw("alice@example.test", NESTED).await;
    server.wait_for_messages("alice@example.test", 2).await;
    let stored = [
        server.raw("alice@example.test", 1).await,
        server.raw("alice@example.test", 2).await,
    ];

    let mut a = login(&server, "alice@example.test").await;
    let capabilities = a.capabilities().await.unwrap();
    for cap in [
        "IMAP4rev2",
        "IMAP4rev1",
        "IDLE",
        "MOVE",
        "UIDPLUS",
        "CONDSTORE",
        "ESEARCH",
    ] {
        assert!(capabilities.has_str(cap), "missing capability {cap}");
    }
    let folders: Vec<_> = a
        .list(Some(""), Some("*"))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let names: Vec<&str> = folders.iter().map(|f| f.name()).collect();
    for name in ["INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"] {
        assert!(names.contains(&name), "no {name} in {names:?}");
    }
    let sent = folders.iter().find(|f| f.name() == "Sent").unwrap();
    assert!(
        format!("{:?}", sent.attributes()).contains("Sent"),
        "{:?}",
        sent.attributes()
    );

    let inbox = a.select("INBOX").await.unwrap();
    assert_eq!(inbox.exists, 2);
    assert!(inbox.uid_validity.is_some());

    // Every FETCH item, on the single-part and the nested message.
    let fetched: Vec<_> = a
        .fetch(
            "1:2",
            "(UID FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY.PEEK[])",
        )
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(fetched.len(), 2);
    for (i, f) in fetched.iter().enumerate() {
        assert_eq!(
            f.body().unwrap(),
            stored[i].as_slice(),
            "BODY[] is the stored message"
        );
        assert_eq!(f.size, Some(stored[i].len() as u32));
        assert!(f.internal_date().is_some());
        assert!(
            !f.flags()
                .any(|flag| matches!(flag, async_imap::types::Flag::Seen)),
            "PEEK does not set \\Seen"
        );
        // On the wire: what was sent (lettre adds one empty line) behind the trace headers.
        let sent = [if i == 0 { SIMPLE } else { NESTED }, b"\r\n"].concat();
        assert!(f.body().unwrap().ends_with(&sent));
        assert!(
            f.body()
                .unwrap()
                .starts_with(b"Return-Path: <bob@remote.test>\r\nReceived: ")
        );
    }
    let envelope = fetched[0].envelope().unwrap();
    assert_eq!(envelope.subject.as_deref(), Some(&b"simple"[..]));
    let from = &envelope.from.as_ref().unwrap()[0];
    assert_eq!(from.mailbox.as_deref(), Some(&b"bob"[..]));
    assert_eq!(from.host.as_deref(), Some(&b"remote.test"[..]));
    let structure = format!("{:?}", fetched[1].bodystructure().unwrap());
    assert!(structure.contains("Multipart"), "{structure}");
    assert!(
        structure.contains("rfc822") || structure.contains("Message"),
        "{structure}"
    );

    // Sections of the nested message; a non-PEEK fetch sets \Seen.
    let parts: Vec<_> = a
        .fetch("2", "(BODY[1] BODY[2.HEADER] BODY[2.2] BODY[1.MIME])")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    use async_imap::imap_proto::{MessageSection, SectionPath};
    let part = |path: SectionPath| {
        parts[0]
            .section(&path)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    assert_eq!(
        part(SectionPath::Part(vec![1], None)).as_deref(),
        Some("caf=C3=A9 numbers")
    );
    assert_eq!(
        part(SectionPath::Part(vec![2, 2], None)).as_deref(),
        Some("AAECAw==")
    );
    let inner = part(SectionPath::Part(vec![2], Some(MessageSection::Header))).unwrap();
    assert!(
        inner.starts_with("From: inner@remote.test\r\n") && inner.ends_with("\r\n\r\n"),
        "{inner}"
    );
    let mime = part(SectionPath::Part(vec![1], Some(MessageSection::Mime))).unwrap();
    assert!(
        mime.starts_with("Content-Type: text/plain; charset=utf-8\r\n"),
        "{mime}"
    );
    let flags = format!("{:?}", parts[0].flags().collect::<Vec<_>>());
    assert!(
        flags.contains("Seen"),
        "BODY[] without PEEK sets \\Seen: {flags}"
    );

    // SEARCH.
    let found = a.search("SUBJECT nested").await.unwrap();
    assert_eq!(found.into_iter().collect::<Vec<_>>(), vec![2]);
    let unseen = a.search("UNSEEN").await.unwrap();
    assert_eq!(unseen.into_iter().collect::<Vec<_>>(), vec![1]);
    let by_uid = a.uid_search("FROM zoë").await.unwrap();
    assert_eq!(by_uid.len(), 1);

    // STORE, COPY, MOVE.
    let stored_flags: Vec<_> = a
        .store("1", "+FLAGS (\\Flagged $Work)")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let flags = format!("{:?}", stored_flags[0].flags().collect::<Vec<_>>());
    assert!(
        flags.contains("Flagged") && flags.contains("$Work"),
        "{flags}"
    );
    a.copy("1", "Archive").await.unwrap();
    a.mv("2", "Trash").await.unwrap();
    let archive = a.status("Archive", "(MESSAGES)").await.unwrap();
    assert_eq!(archive.exists, 1);
    let trash = a.status("Trash", "(MESSAGES)").await.unwrap();
    assert_eq!(trash.exists, 1);

    // A second session on the same mailbox sees an expunge by the first (on NOOP).
    let mut b = login(&server, "alice").await;
    b.select("INBOX").await.unwrap();
    a.store("1", "+FLAGS.SILENT (\\Deleted)")
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let expunged: Vec<_> = a.expunge().await.unwrap().try_collect().await.unwrap();
    assert_eq!(expunged, vec![1]);
    b.noop().await.unwrap();
    let mut saw_expunge = false;
    while let Ok(update) = b.unsolicited_responses.try_recv() {
        if matches!(update, async_imap::types::UnsolicitedResponse::Expunge(1)) {
            saw_expunge = true;
        }
    }
    assert!(
        saw_expunge,
        "the second session was not told of the expunge"
    );

    // IDLE: session b waits; an SMTP delivery wakes it.
    let mut idle = b.idle();
    idle.init().await.unwrap();
    let (wait, _stop) = idle.wait_with_timeout(Duration::from_secs(30));
    let deliver = async {
        server.send_raw("alice@example.test", SIMPLE).await;
    };
    let (woken, ()) = tokio::join!(wait, deliver);
    match woken.unwrap() {
        async_imap::extensions::idle::IdleResponse::NewData(data) => {
            assert!(
                format!("{:?}", data.parsed()).contains("Exists"),
                "{:?}",
                data.parsed()
            );
        }
        other => panic!("IDLE was not woken by the delivery: {other:?}"),
    }
    let mut b = idle.done().await.unwrap();

    // APPEND to Drafts with flags and a date; the message reads back byte for byte.
    let draft = b"From: alice@example.test\r\nSubject: draft\r\n\r\nnot sent yet\r\n";
    b.append(
        "Drafts",
        Some("(\\Draft)"),
        Some("\"05-Mar-2026 10:00:00 +0000\""),
        draft,
    )
    .await
    .unwrap();
    b.select("Drafts").await.unwrap();
    let drafts: Vec<_> = b
        .fetch("1", "(FLAGS BODY.PEEK[])")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(drafts[0].body().unwrap(), draft);
    assert!(format!("{:?}", drafts[0].flags().collect::<Vec<_>>()).contains("Draft"));

    a.logout().await.unwrap();
    b.logout().await.unwrap();
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_refusal_disabled_recipient_and_wrong_password() {
    let server = TestServer::start().await;
    server
        .add_mailbox(
            "small@example.test",
            PASSWORD,
            serde_json::json!({"quota_prohibit_send_receive_kb": 1}),
        )
        .await;
    server
        .add_mailbox(
            "noimap@example.test",
            PASSWORD,
            serde_json::json!({"protocols": ["imap:off"]}),
        )
        .await;
    let mut s = login(&server, "small@example.test").await;
    let big = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(2000));
    let refused = s
        .append("INBOX", None, None, big.as_bytes())
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("OVERQUOTA"), "{refused}");
    s.append("INBOX", None, None, b"Subject: small\r\n\r\nok\r\n")
        .await
        .unwrap();
    s.logout().await.unwrap();

    // Delivery: under the quota a message is accepted (and may take the mailbox over);
    // once over, RCPT gets 452 4.2.2 and the sender keeps the message to retry.
    server.send_raw("small@example.test", big.as_bytes()).await;
    server.wait_for_messages("small@example.test", 2).await;
    let smtp = server.smtp();
    let replies = tokio::task::spawn_blocking(move || {
        let mut raw = common::RawSmtp::connect(smtp);
        raw.send(b"EHLO client.test\r\n");
        raw.reply();
        raw.send(b"MAIL FROM:<bob@remote.test>\r\nRCPT TO:<small@example.test>\r\n");
        (raw.reply(), raw.reply())
    })
    .await
    .unwrap();
    assert!(replies.0.starts_with("250"), "{replies:?}");
    assert!(replies.1.starts_with("452 4.2.2"), "{replies:?}");

    let denied = connect(&server)
        .await
        .login("noimap@example.test", PASSWORD)
        .await
        .map(|_| ())
        .unwrap_err()
        .0;
    assert!(denied.to_string().contains("IMAP is disabled"), "{denied}");
    let wrong = connect(&server)
        .await
        .login("small@example.test", "wrong")
        .await
        .map(|_| ())
        .unwrap_err()
        .0;
    assert!(
        wrong.to_string().contains("AUTHENTICATIONFAILED"),
        "{wrong}"
    );
    server.server.shutdown().await;
}

/// Python's imaplib (an IMAP4rev1 client) and the IMAP4rev2 extensions on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaplib_and_the_extensions_on_the_wire() {
    let server = TestServer::start().await;
    server
        .add_mailbox("carol@example.test", PASSWORD, serde_json::json!({}))
        .await;
    server.send_raw("carol@example.test", NESTED).await;
    server.send_raw("carol@example.test", SIMPLE).await;
    server.wait_for_messages("carol@example.test", 2).await;
    let script = format!(
        r#"
import imaplib, json
m = imaplib.IMAP4('127.0.0.1', {port})
out = {{}}
m.login('carol@example.test', '{PASSWORD}')
typ, data = m.select('INBOX')
out['select'] = [typ, data[0].decode()]
typ, data = m.fetch('1', '(BODYSTRUCTURE)')
out['bodystructure'] = data[0].decode() if isinstance(data[0], bytes) else repr(data)
typ, again = m.fetch('1', '(BODYSTRUCTURE)')
out['bodystructure_again'] = again[0].decode() if isinstance(again[0], bytes) else repr(again)
typ, data = m.uid('SEARCH', None, 'SUBJECT', 'simple')
out['uid_search'] = data[0].decode()
def raw(line):
    tag = m._new_tag().decode()
    m.send(('%s %s\r\n' % (tag, line)).encode())
    lines = []
    while True:
        l = m.readline().decode()
        lines.append(l.rstrip('\r\n'))
        if l.startswith(tag + ' '):
            return lines
out['esearch'] = raw('SEARCH RETURN (MIN MAX COUNT ALL) ALL')
out['namespace'] = raw('NAMESPACE')
out['id'] = raw('ID NIL')
out['list_status'] = raw('LIST "" "%" RETURN (STATUS (MESSAGES UNSEEN))')
out['condstore'] = raw('FETCH 1:* (FLAGS) (CHANGEDSINCE 1)')
out['binary'] = raw('FETCH 1 (BINARY.PEEK[1] BINARY.SIZE[1])')
out['uid_expunge'] = raw('UID STORE 2 +FLAGS (\\Deleted)') + raw('UID EXPUNGE 2')
out['bad'] = raw('FETCH 1 (BOGUS)')
m.logout()
print(json.dumps(out))
"#,
        port = server.server.imap_addr.port()
    );
    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .await
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "imaplib failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(out["select"][0], "OK");
    assert_eq!(out["select"][1], "2");
    let structure = out["bodystructure"].as_str().unwrap();
    assert!(structure.contains("\"quoted-printable\""), "{structure}");
    assert!(structure.contains("\"mixed\""), "{structure}");
    assert_eq!(
        out["bodystructure_again"], out["bodystructure"],
        "the cached BODYSTRUCTURE equals the computed one"
    );
    assert_eq!(out["uid_search"], "2");
    let lines = |k: &str| -> Vec<String> {
        out[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        lines("esearch")[0].contains("MIN 1 MAX 2 ALL 1:2 COUNT 2"),
        "{:?}",
        lines("esearch")
    );
    assert_eq!(lines("namespace")[0], "* NAMESPACE ((\"\" \"/\")) NIL NIL");
    assert!(lines("id")[0].starts_with("* ID ("));
    assert!(
        lines("list_status")
            .iter()
            .any(|l| l.starts_with("* STATUS INBOX (MESSAGES 2 UNSEEN 2)")),
        "{:?}",
        lines("list_status")
    );
    assert!(
        lines("condstore").iter().any(|l| l.contains("MODSEQ (")),
        "{:?}",
        lines("condstore")
    );
    assert!(
        lines("binary")
            .iter()
            .any(|l| l.contains("café numbers BINARY.SIZE[1] 13)")),
        "\"café numbers\" is 13 bytes decoded: {:?}",
        lines("binary")
    );
    let expunge = lines("uid_expunge");
    assert!(expunge.iter().any(|l| l == "* 2 EXPUNGE"), "{expunge:?}");
    assert!(
        lines("bad").last().unwrap().contains(" BAD "),
        "{:?}",
        lines("bad")
    );
    assert_eq!(server.mailbox("carol@example.test").await.len(), 1);
    server.server.shutdown().await;
}

/// mbsync (Debian's isync, installed by .ci/run) mirrors the mailbox into a Maildir and
/// back: every message arrives byte for byte, and a flag set locally reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mbsync_mirrors_the_mailbox_both_ways() {
    if std::process::Command::new("mbsync")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "mbsync is missing; .ci/run installs it (Debian package isync)"
        );
        eprintln!("skipped: mbsync is not installed (apt-get install isync)");
        return;
    }
    let server = TestServer::start().await;
    server
        .add_mailbox("dora@example.test", PASSWORD, serde_json::json!({}))
        .await;
    server.send_raw("dora@example.test", SIMPLE).await;
    server.send_raw("dora@example.test", NESTED).await;
    server.wait_for_messages("dora@example.test", 2).await;
    let stored = [
        server.raw("dora@example.test", 1).await,
        server.raw("dora@example.test", 2).await,
    ];
    let home = tempfile::tempdir().unwrap();
    let mail = home.path().join("mail");
    std::fs::create_dir_all(&mail).unwrap();
    let rc = home.path().join("mbsyncrc");
    std::fs::write(
        &rc,
        format!(
            "IMAPAccount test\nHost 127.0.0.1\nPort {port}\nUser dora@example.test\nPass \"{PASSWORD}\"\nSSLType None\nAuthMechs LOGIN\n\n\
             IMAPStore remote\nAccount test\n\n\
             MaildirStore local\nPath {dir}/\nInbox {dir}/INBOX\nSubFolders Verbatim\n\n\
             Channel sync\nFar :remote:\nNear :local:\nPatterns *\nCreate Near\nSync All\nSyncState *\n",
            port = server.server.imap_addr.port(),
            dir = mail.display()
        ),
    )
    .unwrap();
    let run = |rc: std::path::PathBuf, home: std::path::PathBuf| async move {
        let output = tokio::process::Command::new("mbsync")
            .arg("-c")
            .arg(&rc)
            .arg("-a")
            .env("HOME", &home)
            .output()
            .await
            .expect("mbsync runs");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "mbsync failed:\n{log}");
    };
    run(rc.clone(), home.path().to_path_buf()).await;
    let inbox_files: Vec<std::path::PathBuf> = ["new", "cur"]
        .iter()
        .flat_map(|d| std::fs::read_dir(mail.join("INBOX").join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(inbox_files.len(), 2, "{inbox_files:?}");
    let contents: Vec<Vec<u8>> = inbox_files
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    // mbsync stores Maildir files with LF line ends and adds its own X-TUID header
    // (a tracking id) at the end of the header; apart from those, byte for byte.
    let without_tuid = |c: &Vec<u8>| -> String {
        String::from_utf8_lossy(c)
            .split_inclusive('\n')
            .filter(|l| !l.starts_with("X-TUID: "))
            .collect()
    };
    for original in &stored {
        let lf = String::from_utf8_lossy(original).replace("\r\n", "\n");
        assert!(
            contents.iter().any(|c| without_tuid(c) == lf),
            "no Maildir file equals the stored message:\n{lf}\n---\n{}",
            contents
                .iter()
                .map(|c| String::from_utf8_lossy(c).to_string())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
    }
    for folder in ["Sent", "Drafts", "Trash", "Junk", "Archive"] {
        assert!(mail.join(folder).exists(), "{folder} was not mirrored");
    }
    // Flag one message as seen locally (Maildir info ":2,S") and sync back.
    let file = &inbox_files[0];
    let cur = mail.join("INBOX").join("cur");
    let name = file.file_name().unwrap().to_string_lossy().to_string();
    let base = name.split(":2,").next().unwrap().to_string();
    std::fs::rename(file, cur.join(format!("{base}:2,S"))).unwrap();
    run(rc, home.path().to_path_buf()).await;
    let mut session = login(&server, "dora@example.test").await;
    session.select("INBOX").await.unwrap();
    let seen = session.search("SEEN").await.unwrap();
    assert_eq!(seen.len(), 1, "the local \\Seen reached the server");
    session.logout().await.unwrap();
    server.server.shutdown().await;
}

/// The quota's warning limit: the delivery that crosses it leaves a notice in the INBOX,
/// once; deliveries below it or already above it do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossing_the_warning_limit_leaves_one_notice() {
    let server = TestServer::start().await;
    server
        .add_mailbox(
            "erin@example.test",
            PASSWORD,
            serde_json::json!({"quota_warning_kb": 2}),
        )
        .await;
    let body = |n: usize| format!("Subject: filler {n}\r\n\r\n{}\r\n", "y".repeat(900));
    server
        .send_raw("erin@example.test", body(1).as_bytes())
        .await;
    server.wait_for_messages("erin@example.test", 1).await;
    server
        .send_raw("erin@example.test", body(2).as_bytes())
        .await;
    // Message 2 takes the mailbox over 2 KB: the notice arrives right after it.
    let messages = server.wait_for_messages("erin@example.test", 3).await;
    assert_eq!(
        messages[2].uid, 3,
        "the notice follows the message that crossed"
    );
    assert_eq!(
        messages[2].subject.as_deref(),
        Some("Your mailbox is almost full"),
        "the admin listing shows an appended message's subject too"
    );
    let notice = String::from_utf8(server.raw("erin@example.test", 3).await).unwrap();
    assert!(
        notice.contains("Subject: Your mailbox is almost full"),
        "{notice}"
    );
    assert!(
        notice.contains("above its warning limit of 2 KB"),
        "{notice}"
    );
    server
        .send_raw("erin@example.test", body(3).as_bytes())
        .await;
    server.wait_for_messages("erin@example.test", 4).await;
    let mut s = login(&server, "erin@example.test").await;
    s.select("INBOX").await.unwrap();
    let found = s.search("SUBJECT \"almost full\"").await.unwrap();
    assert_eq!(
        found.len(),
        1,
        "the notice reads like any message over IMAP"
    );
    s.logout().await.unwrap();
    // After shutdown every worker has finished what follows a delivery: still one notice.
    let store = server.server.store.clone();
    let erin = server
        .server
        .directory
        .snapshot()
        .find("erin@example.test")
        .unwrap()
        .id;
    server.server.shutdown().await;
    let all = store.folder_messages(erin, "INBOX").unwrap();
    assert_eq!(
        all.len(),
        4,
        "no second notice while already above the limit"
    );
}
