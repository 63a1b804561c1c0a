//! Upgrades: data folders written by every earlier schema this repository shipped
//! (tests/fixtures/upgrade, made by `generate` from the `schema-*` tags, each with
//! what that version itself reported as stored) open with this build, migrate, and
//! keep every message, folder, flag, keyword and directory object; mail then flows
//! into them (delivery and APPEND). A database from a newer version is refused with a
//! message that says what to do.

mod common;

use common::test_config;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upgrade");
    let mut all: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    all.sort();
    all
}

/// Folder -> [(Message-ID, sorted flags)] of `user`, through IMAP.
async fn folders(
    imap: std::net::SocketAddr,
    user: &str,
    password: &str,
) -> BTreeMap<String, Vec<(String, Vec<String>)>> {
    common::imap_folders(imap, user, password, false)
        .await
        .into_iter()
        .map(|(folder, messages)| {
            let messages = messages
                .into_iter()
                .map(|m| (m.message_id, m.flags))
                .collect();
            (folder, messages)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_earlier_schema_opens_migrates_and_keeps_everything() {
    let fixtures = fixtures();
    assert!(
        fixtures.len() >= 7,
        "fixtures for schemas 1-5 (4 in three builds)"
    );
    for manifest in fixtures {
        let expected: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
        let name = expected["schema"].as_str().unwrap().to_string();
        let work = tempfile::tempdir().unwrap();
        let unpacked = std::process::Command::new("tar")
            .arg("xzf")
            .arg(manifest.with_extension("tar.gz"))
            .arg("-C")
            .arg(work.path())
            .status()
            .unwrap();
        assert!(unpacked.success());
        let data = work.path().join("data");
        let server = mailroom::start(test_config(&data), mailroom::ServerOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{name}: the data folder does not open: {e:#}"));
        let client = mailroom::client::AdminClient::new(
            &format!("http://{}", server.admin_addr),
            &server.admin_token,
        );
        let recipients: Vec<serde_json::Value> = tokio::task::spawn_blocking({
            let client = client.clone();
            move || client.get("/recipients").unwrap()
        })
        .await
        .unwrap();
        let addresses: Vec<String> = recipients
            .iter()
            .flat_map(|r| {
                r["addresses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.as_str().or(a["address"].as_str()).map(str::to_string))
                    .chain(r["primary_address"].as_str().map(str::to_string))
            })
            .collect();
        for wanted in expected["recipients"].as_array().unwrap() {
            let wanted = wanted.as_str().unwrap();
            assert!(
                addresses.iter().any(|a| a.eq_ignore_ascii_case(wanted)),
                "{name}: recipient {wanted} lost ({addresses:?})"
            );
        }
        let password = expected["password"].as_str().unwrap();
        for (user, wanted_folders) in expected["mailboxes"].as_object().unwrap() {
            let found = folders(server.imap_addr, user, password).await;
            for (folder, wanted) in wanted_folders.as_object().unwrap() {
                let have = found
                    .get(folder)
                    .unwrap_or_else(|| panic!("{name}: {user}'s folder {folder} lost: {found:?}"));
                let wanted = wanted.as_array().unwrap();
                assert_eq!(
                    have.len(),
                    wanted.len(),
                    "{name}: {user}/{folder}: {have:?}"
                );
                for (message, (id, flags)) in wanted.iter().zip(have) {
                    assert_eq!(
                        message["message_id"].as_str().unwrap(),
                        id,
                        "{name}: {user}/{folder}"
                    );
                    if let Some(wanted_flags) = message["flags"].as_array() {
                        let mut wanted_flags: Vec<String> = wanted_flags
                            .iter()
                            .map(|f| f.as_str().unwrap().to_string())
                            .collect();
                        wanted_flags.sort();
                        assert_eq!(&wanted_flags, flags, "{name}: {user}/{folder} {id}");
                    }
                }
            }
        }
        // Mail flows into the migrated folder: a delivery and an APPEND.
        use lettre::AsyncTransport;
        let transport =
            lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous("127.0.0.1")
                .port(server.smtp_addr.port())
                .build();
        let envelope = lettre::address::Envelope::new(
            Some("zoe@remote.test".parse().unwrap()),
            vec!["alice@example.test".parse().unwrap()],
        )
        .unwrap();
        let after = common::message(
            "zoe@remote.test",
            "alice@example.test",
            "after-upgrade@remote.test",
            "new",
        );
        transport
            .send_raw(&envelope, after.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{name}: SMTP after the upgrade: {e}"));
        let stream = tokio::net::TcpStream::connect(server.imap_addr)
            .await
            .unwrap();
        let mut imap = async_imap::Client::new(stream);
        imap.read_response().await.unwrap().unwrap();
        let mut session = imap
            .login("alice@example.test", password)
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        session
            .append(
                "INBOX",
                Some("(\\Seen)"),
                None,
                b"Subject: appended after the upgrade\r\n\r\nhi\r\n",
            )
            .await
            .unwrap_or_else(|e| panic!("{name}: APPEND after the upgrade: {e}"));
        let delivered = common::eventually(std::time::Duration::from_secs(20), async || {
            folders(server.imap_addr, "alice@example.test", password).await["INBOX"]
                .iter()
                .any(|(id, _)| id == "after-upgrade@remote.test")
        })
        .await;
        assert!(delivered, "{name}: delivery after the upgrade");
        // Quota usage (folder sizes kept by the store since schema 14, computed for
        // the migrated messages) is what IMAP reports, message by message.
        let mut reported = 0u64;
        let names: Vec<String> = {
            use futures_util::TryStreamExt;
            let list: Vec<_> = session
                .list(None, Some("*"))
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            list.iter().map(|n| n.name().to_string()).collect()
        };
        // So are the message and unseen counts (kept since schema 16) that STATUS
        // reports, against the messages' own flags.
        for folder in names {
            use futures_util::TryStreamExt;
            let status = session.status(&folder, "(MESSAGES UNSEEN)").await.unwrap();
            let selected = session.select(&folder).await.unwrap();
            assert_eq!(status.exists, selected.exists, "{name}: {folder}");
            if selected.exists == 0 {
                assert_eq!(status.unseen, Some(0), "{name}: {folder}");
                continue;
            }
            let fetched: Vec<_> = session
                .fetch("1:*", "(FLAGS RFC822.SIZE)")
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            reported += fetched.iter().map(|f| f.size.unwrap() as u64).sum::<u64>();
            let unseen = fetched
                .iter()
                .filter(|f| !f.flags().any(|flag| flag == async_imap::types::Flag::Seen))
                .count();
            assert_eq!(
                (status.exists as usize, status.unseen),
                (fetched.len(), Some(unseen as u32)),
                "{name}: STATUS of {folder} after the upgrade"
            );
        }
        let alice = server
            .directory
            .snapshot()
            .by_address("alice@example.test")
            .unwrap()
            .id;
        assert_eq!(
            server.store.mailbox_bytes(alice).unwrap(),
            reported,
            "{name}: quota usage after the upgrade"
        );
        session.logout().await.unwrap();
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_folder_from_a_newer_version_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = mailroom::start(test_config(&data), mailroom::ServerOptions::default())
        .await
        .unwrap();
    server.shutdown().await;
    let db = set_user_version(&data.join("mailroom.db"), 1000);
    assert!(db < 1000);
    let refused = mailroom::start(test_config(&data), mailroom::ServerOptions::default()).await;
    let error = format!("{:#}", refused.err().expect("a newer schema is refused"));
    assert!(
        error.contains("newer than this Mailroom supports"),
        "{error}"
    );
    assert!(error.contains("1000"), "{error}");
}

/// Sets the database's schema version (as a newer Mailroom would have); returns the old.
fn set_user_version(path: &Path, version: i64) -> i64 {
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); print(c.execute('PRAGMA user_version').fetchone()[0]); c.execute('PRAGMA user_version={version}'); c.commit()"
        ))
        .arg(path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap()
}
