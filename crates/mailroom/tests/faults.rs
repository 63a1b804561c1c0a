//! Faults beyond kill -9: a disk that fills up (with the server's own log on it, as is
//! common) and the free-space reserve. What an operator checks: the server answers
//! "try again later" (452 4.3.1, NO [LIMIT]) while the disk is full, `/health` names the
//! disk, nothing that got "250" is lost or doubled, and everything resumes by itself
//! once there is room again: no restart.

mod common;

use common::process::{Spawn, Tmpfs, wait_until};
use common::{TestServer, eventually};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What one sender saw.
#[derive(Default)]
struct Tally {
    accepted: Vec<String>,
    replies: HashMap<String, usize>,
}

/// Sends 100 KiB messages with lettre until the server has refused `refusals_wanted`
/// in a row (or the time is up); records every accepted Message-ID and every refusal.
fn fill(smtp: std::net::SocketAddr, sender: usize, refusals_wanted: usize, tally: &Mutex<Tally>) {
    use lettre::Transport;
    let transport = lettre::SmtpTransport::builder_dangerous("127.0.0.1")
        .port(smtp.port())
        .timeout(Some(Duration::from_secs(30)))
        .build();
    let filler =
        "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n".repeat(1400);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut refused_in_a_row = 0;
    let mut n = 0;
    while refused_in_a_row < refusals_wanted && Instant::now() < deadline {
        n += 1;
        let id = format!("fill-{sender}-{n}@example.test");
        let message = common::message("bob@remote.test", "postmaster@example.test", &id, &filler);
        let envelope = lettre::address::Envelope::new(
            Some("bob@remote.test".parse().unwrap()),
            vec!["postmaster@example.test".parse().unwrap()],
        )
        .unwrap();
        match transport.send_raw(&envelope, message.as_bytes()) {
            Ok(_) => {
                refused_in_a_row = 0;
                tally.lock().unwrap().accepted.push(id);
            }
            Err(e) => {
                refused_in_a_row += 1;
                let what = match e.status() {
                    Some(code) => code.to_string(),
                    None => format!("no reply: {e}"),
                };
                *tally.lock().unwrap().replies.entry(what).or_default() += 1;
            }
        }
    }
}

#[test]
fn a_full_disk_is_a_transient_fault_that_loses_nothing() {
    let Some(disk) = Tmpfs::mount(48) else {
        return;
    };
    // Room to give back later, as an operator deleting old logs would.
    let ballast = disk.path().join("ballast");
    std::fs::write(&ballast, vec![1u8; 8 << 20]).unwrap();
    // No reserve (the reserve's own test is below): the spool admits mail until the
    // disk holds just what the WAL owes the database file, so what meets the wall
    // mid-transaction is the rest (conversion's deliveries, and the log on the same
    // filesystem); about half the runs see a disk-full fault, the others refusals only.
    let server = Spawn {
        data: disk.path().join("data"),
        config: Some("[storage]\nfree_space_reserve_bytes = 0\n".into()),
        log: Some(disk.path().join("mailroom.log")),
        env: vec![("MAILROOM_LOG".into(), "info,mailroom_smtp=debug".into())],
        ..Spawn::default()
    }
    .start();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let senders: Vec<_> = (0..4)
        .map(|sender| {
            let (tally, smtp) = (tally.clone(), server.smtp);
            std::thread::spawn(move || fill(smtp, sender, 5, &tally))
        })
        .collect();
    for sender in senders {
        sender.join().unwrap();
    }
    let full = {
        let tally = tally.lock().unwrap();
        assert!(
            tally.accepted.len() > 50,
            "the disk took {} messages before it filled",
            tally.accepted.len()
        );
        // Every refusal is "insufficient system storage, try later", never a hang, a
        // dropped connection or a permanent error.
        let other: Vec<_> = tally.replies.keys().filter(|k| *k != "452").collect();
        assert!(other.is_empty(), "replies while full: {:?}", tally.replies);
        assert!(tally.replies.get("452").copied().unwrap_or(0) >= 20);
        tally.accepted.len()
    };
    // The watchdog publishes its verdict at its next check.
    let mut health = serde_json::Value::Null;
    let red = wait_until(Duration::from_secs(10), || {
        health = server.health();
        health["status"] == "unhealthy"
    });
    assert!(red, "{health:#}");
    let conditions = health["conditions"].as_array().unwrap();
    let detail = conditions
        .iter()
        .find(|c| c["condition"] == "disk")
        .unwrap_or_else(|| panic!("the disk is named: {health:#}"))["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(detail.contains(disk.path().to_str().unwrap()), "{detail}");
    assert!(detail.contains("free"), "{detail}");
    assert!(
        server.metric("mailroom_storage_faults_total", "disk_full") > 0.0
            || server.metric("mailroom_disk_refusals_total", "") > 0.0,
        "{}",
        server.metrics()
    );
    // No thread died along the way.
    let dead: Vec<_> = health["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["died"] == true)
        .collect();
    assert!(dead.is_empty(), "{dead:?}");

    // Space returns: no restart, no operator action beyond freeing it.
    std::fs::remove_file(&ballast).unwrap();
    let (mut sizes, mut polls) = (Vec::new(), 0);
    let green = wait_until(Duration::from_secs(20), || {
        polls += 1;
        if polls % 10 == 1 {
            sizes.push(files_and_free(disk.path()));
        }
        server.health()["status"] == "ok"
    });
    assert!(
        green,
        "health stays red after space returned: {:#}\nthe disk meanwhile:\n{}",
        server.health(),
        sizes.join("\n")
    );
    let after = Mutex::new(Tally::default());
    for sender in 0..5 {
        fill_one(server.smtp, sender, &after);
    }
    let after = after.into_inner().unwrap();
    assert_eq!(
        after.accepted.len(),
        5,
        "refused after recovery: {:?}",
        after.replies
    );

    // Every message that got "250" is in the mailbox exactly once.
    let mut expected: Vec<String> = tally.lock().unwrap().accepted.clone();
    expected.extend(after.accepted.iter().cloned());
    let client = server.client();
    let mut listing: Vec<serde_json::Value> = Vec::new();
    let delivered = wait_until(Duration::from_secs(60), || {
        listing = client
            .get("/mailboxes/postmaster%40example.test/messages")
            .unwrap_or_default();
        listing.len() >= expected.len()
    });
    let mut ids: Vec<String> = listing
        .iter()
        .filter_map(|m| m["message_id"].as_str())
        .map(|id| id.trim_matches(['<', '>']).to_string())
        .filter(|id| id.starts_with("fill-"))
        .collect();
    ids.sort();
    expected.sort();
    assert!(delivered, "{} of {} delivered", ids.len(), expected.len());
    if ids != expected {
        // What the tracking trail says of the first message doubled and the first one
        // missing (queue ids, the UIDs delivered), so that a failure explains itself.
        let doubled = ids.windows(2).find(|w| w[0] == w[1]).map(|w| w[0].clone());
        let missing = expected.iter().find(|id| !ids.contains(id)).cloned();
        let mut trails = String::new();
        for id in doubled.iter().chain(missing.iter()) {
            let trail: serde_json::Value = client
                .get(&format!("/track?message_id={}", id.replace('@', "%40")))
                .unwrap_or_default();
            trails += &format!("\n{id}: {trail}");
        }
        let uids: Vec<String> = listing
            .iter()
            .map(|m| format!("{}={}", m["uid"], m["message_id"]))
            .collect();
        panic!(
            "{full} accepted while filling; delivered {} of {}, doubled {doubled:?}, missing {missing:?}\ntrails:{trails}\nmailbox: {}",
            ids.len(),
            expected.len(),
            uids.join(" ")
        );
    }
}

/// The free space and each file's size under `dir`, on one line: what the failure of
/// a recovery shows, so that where the space went can be read from it.
fn files_and_free(dir: &std::path::Path) -> String {
    let mut line = match df_free(dir) {
        Some(free) => format!("free {:.1} MiB:", free as f64 / 1048576.0),
        None => "free ?:".to_string(),
    };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                let name = entry.path();
                let name = name.strip_prefix(dir).unwrap_or(&name);
                line += &format!(" {} {:.1}", name.display(), meta.len() as f64 / 1048576.0);
            }
        }
    }
    line
}

/// Bytes free on the filesystem holding `dir` (`df`'s number).
fn df_free(dir: &std::path::Path) -> Option<u64> {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// One message; records the outcome.
fn fill_one(smtp: std::net::SocketAddr, n: usize, tally: &Mutex<Tally>) {
    use lettre::Transport;
    let transport = lettre::SmtpTransport::builder_dangerous("127.0.0.1")
        .port(smtp.port())
        .build();
    let id = format!("fill-after-{n}@example.test");
    let message = common::message("bob@remote.test", "postmaster@example.test", &id, "after");
    let envelope = lettre::address::Envelope::new(
        Some("bob@remote.test".parse().unwrap()),
        vec!["postmaster@example.test".parse().unwrap()],
    )
    .unwrap();
    match transport.send_raw(&envelope, message.as_bytes()) {
        Ok(_) => tally.lock().unwrap().accepted.push(id),
        Err(e) => {
            *tally
                .lock()
                .unwrap()
                .replies
                .entry(format!("{:?}", e.status()))
                .or_default() += 1
        }
    }
}

/// Below the reserve, new mail is refused before the client sends it (452 4.3.1 at
/// MAIL, as Postfix does), APPEND says NO [LIMIT], and `/health` names the disk and its
/// free space; reading mail goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_reserve_new_mail_is_refused_and_health_names_the_disk() {
    let server = TestServer::start_with(
        |config| config.storage.free_space_reserve_bytes = u64::MAX / 4,
        mailroom::ServerOptions::default(),
    )
    .await;
    server
        .add_mailbox("alice@example.test", "secret-pw-1", serde_json::json!({}))
        .await;
    let smtp = server.smtp();
    let reply = tokio::task::spawn_blocking(move || {
        let mut raw = common::RawSmtp::connect(smtp);
        raw.send(b"EHLO client.test\r\n");
        raw.reply();
        raw.send(b"MAIL FROM:<bob@remote.test> SIZE=1000\r\n");
        raw.reply()
    })
    .await
    .unwrap();
    assert!(reply.starts_with("452 4.3.1 "), "{reply}");
    assert!(reply.contains("below the reserve"), "{reply}");

    let stream = tokio::net::TcpStream::connect(server.server.imap_addr)
        .await
        .unwrap();
    let mut client = async_imap::Client::new(stream);
    client.read_response().await.unwrap().unwrap();
    let mut session = client
        .login("alice@example.test", "secret-pw-1")
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let appended = session
        .append("INBOX", None, None, b"Subject: hi\r\n\r\nbody\r\n")
        .await;
    let error = appended.expect_err("APPEND is refused").to_string();
    assert!(error.contains("[LIMIT]"), "{error}");
    session.select("INBOX").await.expect("reading goes on");

    let health_url = format!("http://{}/health", server.server.admin_addr);
    let red = eventually(Duration::from_secs(10), async || {
        let url = health_url.clone();
        let health: serde_json::Value = tokio::task::spawn_blocking(move || {
            match ureq::get(&url).call() {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(e) => panic!("{e}"),
            }
            .into_json()
            .unwrap()
        })
        .await
        .unwrap();
        health["status"] == "unhealthy"
            && health["conditions"][0]["condition"] == "disk"
            && health["conditions"][0]["detail"].as_str().is_some_and(|d| {
                d.contains("free") && d.contains(server.dir.path().to_str().unwrap())
            })
    })
    .await;
    assert!(red, "/health names the disk");
}

/// Sends `count` small messages, one session each; returns (Message-ID, reply code).
fn send_small(smtp: std::net::SocketAddr, tag: &str, count: usize) -> Vec<(String, String)> {
    use lettre::Transport;
    let transport = lettre::SmtpTransport::builder_dangerous("127.0.0.1")
        .port(smtp.port())
        .timeout(Some(Duration::from_secs(30)))
        .build();
    let envelope = lettre::address::Envelope::new(
        Some("bob@remote.test".parse().unwrap()),
        vec!["postmaster@example.test".parse().unwrap()],
    )
    .unwrap();
    (0..count)
        .map(|n| {
            let id = format!("{tag}-{n}@example.test");
            let message = common::message("bob@remote.test", "postmaster@example.test", &id, "io");
            let code = match transport.send_raw(&envelope, message.as_bytes()) {
                Ok(_) => "250".to_string(),
                Err(e) => e
                    .status()
                    .map_or_else(|| format!("no reply: {e}"), |c| c.to_string()),
            };
            (id, code)
        })
        .collect()
}

/// Message-IDs in the postmaster's INBOX, with repeats.
fn inbox_ids(server: &common::process::Process) -> Vec<String> {
    let listing: Vec<serde_json::Value> = server
        .client()
        .get("/mailboxes/postmaster%40example.test/messages")
        .unwrap_or_default();
    listing
        .iter()
        .filter_map(|m| m["message_id"].as_str())
        .map(|id| id.trim_matches(['<', '>']).to_string())
        .collect()
}

/// I/O errors injected with libfiu into the running server (fsync, then write): a
/// message whose commit met one is answered 451 (never 250); `/health` names the
/// storage fault; once the fault ends the store rewrites the database from its WAL
/// (a checkpoint that must itself be fsynced) before any other write, and mail is
/// accepted again without a restart. Every "250" is delivered exactly once, before and
/// after a kill -9 and a restart.
#[test]
fn failed_writes_and_fsyncs_are_never_acknowledged_and_the_store_recovers() {
    if std::process::Command::new("fiu-run")
        .arg("-h")
        .output()
        .is_err()
    {
        common::process::fault_tests_unavailable("fiu-run (Debian's fiu-utils) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("fiu-ctrl");
    let spawn = Spawn {
        data: dir.path().join("data"),
        wrapper: vec![
            "fiu-run".into(),
            "-x".into(),
            "-f".into(),
            control.to_str().unwrap().into(),
        ],
        ..Spawn::default()
    };
    let server = spawn.start();
    let pid = server.child.id().to_string();
    let fiu = |command: &str| {
        let status = std::process::Command::new("fiu-ctrl")
            .args(["-f", control.to_str().unwrap(), "-c", command, &pid])
            .status()
            .unwrap();
        assert!(status.success(), "fiu-ctrl {command}");
    };
    let mut acknowledged = Vec::new();
    let mut refused = Vec::new();
    for (round, point) in ["posix/io/sync/*", "posix/io/rw/pwrite"].iter().enumerate() {
        for (id, code) in send_small(server.smtp, &format!("before{round}"), 3) {
            assert_eq!(code, "250", "{id} before the fault");
            acknowledged.push(id);
        }
        // failinfo 5: the call fails with EIO (libfiu picks a random errno otherwise,
        // ENOSPC included, which is the disk-full case above).
        fiu(&format!("enable name={point},failinfo=5"));
        for (id, code) in send_small(server.smtp, &format!("during{round}"), 4) {
            assert_eq!(code, "451", "{id} while {point} fails: never acknowledged");
            refused.push(id);
        }
        let mut health = serde_json::Value::Null;
        let named = wait_until(Duration::from_secs(10), || {
            health = server.health();
            health["status"] == "unhealthy"
                && health["conditions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["condition"] == "storage")
        });
        assert!(named, "/health names the storage fault: {health:#}");
        fiu(&format!("disable name={point}"));
        for (id, code) in send_small(server.smtp, &format!("after{round}"), 3) {
            assert_eq!(code, "250", "{id} after {point} recovered");
            acknowledged.push(id);
        }
        assert!(
            wait_until(Duration::from_secs(10), || server.health()["status"]
                == "ok"),
            "healthy again: {:#}",
            server.health()
        );
    }
    assert!(server.metric("mailroom_storage_faults_total", "io") > 0.0);
    let exactly_once = |ids: &[String]| {
        acknowledged
            .iter()
            .all(|a| ids.iter().filter(|i| *i == a).count() == 1)
            && refused
                .iter()
                .all(|r| ids.iter().filter(|i| *i == r).count() <= 1)
    };
    let mut ids = Vec::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            ids = inbox_ids(&server);
            exactly_once(&ids)
        }),
        "acknowledged {acknowledged:?}, delivered {ids:?}"
    );
    server.kill();
    let server = Spawn {
        data: dir.path().join("data"),
        ..Spawn::default()
    }
    .start();
    assert!(
        wait_until(Duration::from_secs(30), || {
            ids = inbox_ids(&server);
            exactly_once(&ids)
        }),
        "after kill -9 and restart: acknowledged {acknowledged:?}, delivered {ids:?}"
    );
}

/// A log nobody reads (stderr a pipe whose reader hangs, as with a stuck log shipper)
/// must not stop the mail: the pipe fills after 64 KiB, and before the log went
/// through a lossy buffer of its own every thread that logged then blocked in write(),
/// sessions and the spool writer included.
#[test]
fn a_log_nobody_reads_does_not_stop_the_mail() {
    let dir = tempfile::tempdir().unwrap();
    let server = Spawn {
        data: dir.path().join("data"),
        env: vec![("MAILROOM_LOG".into(), "debug".into())],
        log_unread: true,
        ..Spawn::default()
    }
    .start();
    // Debug logging writes several lines per message: far more than the pipe holds.
    let mut sent = Vec::new();
    for n in 0..300 {
        let (id, code) = send_small(server.smtp, &format!("unread-log-{n}"), 1).remove(0);
        assert_eq!(code, "250", "message {n} of 300 ({id}): the server stopped");
        sent.push((id, code));
    }
    let ids = |s: &common::process::Process| inbox_ids(s);
    let mut delivered = Vec::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            delivered = ids(&server);
            sent.iter().all(|(id, _)| delivered.contains(id))
        }),
        "{} of {} delivered",
        delivered.len(),
        sent.len()
    );
    assert_eq!(server.health()["status"], "ok");
}
