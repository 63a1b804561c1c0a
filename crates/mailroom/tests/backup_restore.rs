//! Backup and restore: `mailroom backup DIR` while mail flows, `mailroom restore DIR`
//! into an empty data folder, then a server on the restored folder. What an
//! administrator checks: the directory exports identically; every folder, UID, flag
//! and byte of a mailbox nobody wrote to during the backup is the same; the mailbox
//! receiving mail holds exactly the messages acknowledged up to the backup's moment
//! (every one acknowledged before it started, none acknowledged after it ended), each
//! byte-identical to the original's copy.

mod common;

use async_imap::Session;
use common::{TestServer, test_config};
use futures_util::TryStreamExt;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

const PASSWORD: &str = "backup test password";

async fn login(imap: SocketAddr, user: &str) -> Session<TcpStream> {
    let stream = TcpStream::connect(imap).await.unwrap();
    let mut client = async_imap::Client::new(stream);
    client.read_response().await.unwrap().unwrap();
    client
        .login(user, PASSWORD)
        .await
        .map_err(|(e, _)| e)
        .expect("login")
}

/// Every folder of `user`: UID -> (flags, bytes).
type Contents = BTreeMap<String, BTreeMap<u32, (Vec<String>, Vec<u8>)>>;

async fn contents(imap: SocketAddr, user: &str) -> Contents {
    common::imap_folders(imap, user, PASSWORD, true)
        .await
        .into_iter()
        .map(|(folder, messages)| {
            let messages = messages
                .into_iter()
                .map(|m| (m.uid, (m.flags, m.body.unwrap_or_default())))
                .collect();
            (folder, messages)
        })
        .collect()
}

fn message_id_of(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .find_map(|l| l.strip_prefix("Message-ID: <"))
        .map(|rest| rest.trim_end_matches('>').to_string())
}

fn cli(args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "mailroom {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_mail_flows_restores_exactly_that_moment() {
    let original = TestServer::start().await;
    for user in ["alice@example.test", "bob@example.test"] {
        original
            .add_mailbox(user, PASSWORD, serde_json::json!({}))
            .await;
    }
    let imap = original.server.imap_addr;
    // Alice: folders, flags, keywords, appended and delivered mail.
    for n in 0..3 {
        original
            .send_raw(
                "alice@example.test",
                common::message(
                    "carol@remote.test",
                    "alice@example.test",
                    &format!("a{n}@remote.test"),
                    "hello",
                )
                .as_bytes(),
            )
            .await;
    }
    original.wait_for_messages("alice@example.test", 3).await;
    {
        let mut session = login(imap, "alice@example.test").await;
        session.create("Archive/2026").await.unwrap();
        for n in 0..2 {
            session
                .append(
                    "Archive/2026",
                    Some("(\\Seen $Project)"),
                    None,
                    common::message(
                        "alice@example.test",
                        "dave@remote.test",
                        &format!("sent{n}@example.test"),
                        "kept",
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
        }
        session.select("INBOX").await.unwrap();
        let _: Vec<_> = session
            .store("2", "+FLAGS (\\Flagged \\Answered)")
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        session.logout().await.unwrap();
    }

    // Bob receives mail without pause, from a thread, while the backup runs.
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (acked, stop, smtp) = (acked.clone(), stop.clone(), original.smtp());
        std::thread::spawn(move || {
            use lettre::Transport;
            let transport = lettre::SmtpTransport::builder_dangerous("127.0.0.1")
                .port(smtp.port())
                .build();
            let envelope = lettre::address::Envelope::new(
                Some("carol@remote.test".parse().unwrap()),
                vec!["bob@example.test".parse().unwrap()],
            )
            .unwrap();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let id = format!("flow{n}@remote.test");
                let body = "x".repeat(n * 37 % 5000);
                let message = common::message("carol@remote.test", "bob@example.test", &id, &body);
                transport
                    .send_raw(&envelope, message.as_bytes())
                    .expect("accepted");
                acked.lock().unwrap().push(id);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 30 {
        assert!(Instant::now() < deadline, "mail flows");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let backup_dir = tempfile::tempdir().unwrap();
    let backup = backup_dir.path().join("backup-1");
    let acked_before: Vec<String> = acked.lock().unwrap().clone();
    let data = original.dir.path().to_str().unwrap().to_string();
    let backup_arg = backup.to_str().unwrap().to_string();
    let report =
        tokio::task::spawn_blocking(move || cli(&["backup", &backup_arg, "--data", &data]))
            .await
            .unwrap();
    let acked_after: Vec<String> = acked.lock().unwrap().clone();
    assert!(report.contains("Backed up into"), "{report}");
    // Mail still flows after the backup, then stops.
    let more = acked_after.len() + 10;
    while acked.lock().unwrap().len() < more {
        assert!(
            Instant::now() < deadline + Duration::from_secs(30),
            "mail flows after the backup"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    let all_acked = acked.lock().unwrap().clone();
    original
        .wait_for_messages("bob@example.test", all_acked.len())
        .await;

    // A backup folder is never overwritten.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args([
            "backup",
            backup.to_str().unwrap(),
            "--data",
            original.dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    // Restore into a new folder; refused into one that holds data.
    let restored_dir = tempfile::tempdir().unwrap();
    let restored_data = restored_dir.path().join("data");
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args([
            "restore",
            backup.to_str().unwrap(),
            "--data",
            original.dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not empty"));
    let said = cli(&[
        "restore",
        backup.to_str().unwrap(),
        "--data",
        restored_data.to_str().unwrap(),
    ]);
    assert!(said.contains("Restored"), "{said}");
    let restored = mailroom::start(
        test_config(&restored_data),
        mailroom::ServerOptions::default(),
    )
    .await
    .expect("a server starts on the restored folder");

    // The directory is the same.
    let export = |admin: SocketAddr, token: String| {
        tokio::task::spawn_blocking(move || {
            mailroom::client::AdminClient::new(&format!("http://{admin}"), &token)
                .get_text("/directory/export?format=ldif")
                .unwrap()
        })
    };
    assert_eq!(
        export(
            original.server.admin_addr,
            original.server.admin_token.clone()
        )
        .await
        .unwrap(),
        export(restored.admin_addr, restored.admin_token.clone())
            .await
            .unwrap()
    );
    // Alice's mailbox, untouched during the backup, is the same in every detail.
    let alice = contents(imap, "alice@example.test").await;
    assert_eq!(alice["Archive/2026"].len(), 2);
    assert_eq!(
        contents(restored.imap_addr, "alice@example.test").await,
        alice
    );
    // Bob's holds exactly what was acknowledged by the backup's moment (entries still
    // queued in the copy are delivered by the restored server).
    let bob_original = contents(imap, "bob@example.test").await;
    let mut bob_restored = Contents::new();
    let converge = Instant::now() + Duration::from_secs(30);
    loop {
        let now = contents(restored.imap_addr, "bob@example.test").await;
        let settled = now == bob_restored && !now["INBOX"].is_empty();
        bob_restored = now;
        if settled || Instant::now() > converge {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let inbox = &bob_restored["INBOX"];
    let ids: Vec<String> = inbox
        .values()
        .filter_map(|(_, b)| message_id_of(b))
        .collect();
    for id in &acked_before {
        assert!(
            ids.contains(id),
            "{id}, acknowledged before the backup, is missing"
        );
    }
    for id in &ids {
        let at = all_acked
            .iter()
            .position(|a| a == id)
            .expect("only acknowledged mail");
        assert!(
            at < acked_after.len() + 1,
            "{id} was acknowledged after the backup ended"
        );
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "each message once");
    for (uid, (flags, bytes)) in inbox {
        let (original_flags, original_bytes) = &bob_original["INBOX"][uid];
        assert_eq!(bytes, original_bytes, "UID {uid} differs");
        assert_eq!(flags, original_flags, "UID {uid} flags differ");
    }
    restored.shutdown().await;
}
