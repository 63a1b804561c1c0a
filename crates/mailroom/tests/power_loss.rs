//! Power loss: the server runs on a filesystem that forgets every write not made
//! durable by fsync when the "power" goes (crates/lazyfs, FUSE). Under SMTP load, IMAP
//! APPENDs and flag changes, the server is killed at a random moment and the power
//! cut; after the restart every message that got "250", every APPEND that got "OK" and
//! every flag change that got "OK" is there, exactly once. Repeated for
//! `MAILROOM_POWER_CYCLES` cycles (default 8); `MAILROOM_POWER_SEED` replays a run;
//! `MAILROOM_POWER_DURABILITY=normal` shows what `storage.durability = "normal"` risks.

mod common;

use common::process::{Process, Spawn, fault_tests_unavailable, wait_until};
use futures_util::TryStreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A small deterministic generator (the seed is printed, so a failure can be replayed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the clients were told, across every cycle.
#[derive(Default)]
struct Acknowledged {
    /// Message-IDs that got "250".
    smtp: Vec<String>,
    /// Message-IDs whose APPEND got "OK".
    appended: Vec<String>,
    /// Message-IDs whose STORE +FLAGS ($Durable) got "OK".
    flagged: Vec<String>,
}

const USER: &str = "postmaster@example.test";

fn smtp_load(
    server: std::net::SocketAddr,
    tag: String,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acknowledged>>,
) {
    use lettre::Transport;
    let transport = lettre::SmtpTransport::builder_dangerous("127.0.0.1")
        .port(server.port())
        .timeout(Some(Duration::from_secs(10)))
        .build();
    let envelope = lettre::address::Envelope::new(
        Some("bob@remote.test".parse().unwrap()),
        vec![USER.parse().unwrap()],
    )
    .unwrap();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let id = format!("{tag}-{n}@remote.test");
        let body = "power ".repeat(n % 700);
        let message = common::message("bob@remote.test", USER, &id, &body);
        if transport.send_raw(&envelope, message.as_bytes()).is_ok() {
            acked.lock().unwrap().smtp.push(id);
        }
    }
}

fn imap_load(
    server: std::net::SocketAddr,
    password: String,
    tag: String,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acknowledged>>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let Ok(stream) = tokio::net::TcpStream::connect(server).await else {
            return;
        };
        let mut client = async_imap::Client::new(stream);
        if !matches!(client.read_response().await, Some(Ok(_))) {
            return;
        }
        let Ok(mut session) = client.login(USER, &password).await else {
            return;
        };
        if session.create("Saved").await.is_err() && stop.load(Ordering::Relaxed) {
            return;
        }
        if session.select("Saved").await.is_err() {
            return;
        }
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let id = format!("{tag}-{n}@example.test");
            let message = common::message(USER, "dave@remote.test", &id, "appended");
            // append() waits for the tagged OK (an error otherwise).
            if session
                .append("Saved", None, None, message.as_bytes())
                .await
                .is_err()
            {
                return;
            }
            acked.lock().unwrap().appended.push(id.clone());
            // Flag what was just appended (its UID through SEARCH, as a client would).
            let Ok(uids) = session
                .uid_search(format!("HEADER Message-ID \"{id}\""))
                .await
            else {
                return;
            };
            let Some(uid) = uids.into_iter().next() else {
                continue;
            };
            let Ok(stream) = session
                .uid_store(uid.to_string(), "+FLAGS ($Durable)")
                .await
            else {
                return;
            };
            // async-imap ends a FETCH stream quietly when the connection drops, so the
            // STORE counts as acknowledged only if it answered the new flags and a NOOP
            // sent after it got its own tagged OK (the STORE's came first).
            let Ok(fetches) = stream.try_collect::<Vec<_>>().await else {
                return;
            };
            let answered = fetches.iter().any(|f| {
                f.flags()
                    .any(|flag| format!("{flag:?}").contains("$Durable"))
            });
            if answered && session.noop().await.is_ok() {
                acked.lock().unwrap().flagged.push(id);
            } else {
                return;
            }
        }
    });
}

/// Message-ID -> (copies, has $Durable) in one folder, through IMAP.
async fn folder_state(
    imap: std::net::SocketAddr,
    password: &str,
    folder: &str,
) -> HashMap<String, (usize, bool)> {
    let mut state: HashMap<String, (usize, bool)> = HashMap::new();
    let all = common::imap_folders(imap, USER, password, false).await;
    for message in all.get(folder).into_iter().flatten() {
        let entry = state.entry(message.message_id.clone()).or_default();
        entry.0 += 1;
        entry.1 |= message.flags.iter().any(|f| f == "$Durable");
    }
    state
}

/// Checks every acknowledgement against the restarted server; returns what it checked.
fn verify(server: &Process, password: &str, acked: &Acknowledged) -> usize {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut inbox = HashMap::new();
    // Accepted mail still in the inbound queue is delivered after the restart.
    let delivered = wait_until(Duration::from_secs(60), || {
        inbox = runtime.block_on(folder_state(server.imap, password, "INBOX"));
        acked.smtp.iter().all(|id| inbox.contains_key(id))
    });
    let missing: Vec<_> = acked
        .smtp
        .iter()
        .filter(|id| !inbox.contains_key(*id))
        .collect();
    assert!(
        delivered,
        "{} acknowledged message(s) lost: {missing:?}",
        missing.len()
    );
    for id in &acked.smtp {
        assert_eq!(inbox[id].0, 1, "{id} delivered {} times", inbox[id].0);
    }
    let saved = runtime.block_on(folder_state(server.imap, password, "Saved"));
    for id in &acked.appended {
        let copies = saved.get(id).map_or(0, |s| s.0);
        assert_eq!(
            copies, 1,
            "APPEND of {id} got OK; {copies} copies after the power loss"
        );
    }
    for id in &acked.flagged {
        assert!(saved[id].1, "the flag set on {id} got OK and was lost");
    }
    acked.smtp.len() + acked.appended.len() + acked.flagged.len()
}

/// Mounts the lazy filesystem over `backing` at `mountpoint`; `None` (the test skips,
/// or fails when fault tests are required) where FUSE is not available.
fn lazy_mount(
    backing: &tempfile::TempDir,
    mountpoint: &tempfile::TempDir,
) -> Option<mailroom_lazyfs::Mounted> {
    match mailroom_lazyfs::mount(backing.path(), mountpoint.path()) {
        Ok(fs) => Some(fs),
        Err(e) => {
            fault_tests_unavailable(&format!("cannot mount the lazy FUSE filesystem: {e}"));
            None
        }
    }
}

#[test]
fn every_acknowledgement_survives_power_loss_at_random_moments() {
    let cycles: usize = std::env::var("MAILROOM_POWER_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("MAILROOM_POWER_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| mailroom_watch::now_ms() as u64 | 1);
    eprintln!("power loss: {cycles} cycles, MAILROOM_POWER_SEED={seed}");
    let mut rng = Rng(seed);
    let backing = tempfile::tempdir().unwrap();
    let mountpoint = tempfile::tempdir().unwrap();
    let mount = || lazy_mount(&backing, &mountpoint);
    let Some(mut fs) = mount() else {
        return;
    };
    // MAILROOM_POWER_DURABILITY=normal runs the server with storage.durability =
    // "normal", to see what that setting risks (APPENDs and flag changes lost).
    let durability =
        std::env::var("MAILROOM_POWER_DURABILITY").unwrap_or_else(|_| "full".to_string());
    let spawn = Spawn {
        data: mountpoint.path().join("data"),
        config: Some(format!("[storage]\ndurability = \"{durability}\"\n")),
        env: vec![("MAILROOM_LOG".into(), "warn".into())],
        ..Spawn::default()
    };
    let mut server = spawn.start();
    let password = server
        .password
        .clone()
        .expect("first start prints the password");
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let (mut checked, mut lost_bytes, mut fsyncs) = (0, 0, 0);
    for cycle in 0..cycles {
        let stop = Arc::new(AtomicBool::new(false));
        let mut load = Vec::new();
        for sender in 0..3 {
            let (stop, acked, smtp) = (stop.clone(), acked.clone(), server.smtp);
            let tag = format!("c{cycle}s{sender}");
            load.push(std::thread::spawn(move || {
                smtp_load(smtp, tag, stop, acked)
            }));
        }
        {
            let (stop, acked, imap, password) =
                (stop.clone(), acked.clone(), server.imap, password.clone());
            let tag = format!("c{cycle}a");
            load.push(std::thread::spawn(move || {
                imap_load(imap, password, tag, stop, acked)
            }));
        }
        // The moment: after a random number of new acknowledgements.
        let before = {
            let a = acked.lock().unwrap();
            a.smtp.len() + a.appended.len()
        };
        let wanted = before + 5 + rng.below(60) as usize;
        assert!(
            wait_until(Duration::from_secs(60), || {
                let a = acked.lock().unwrap();
                a.smtp.len() + a.appended.len() >= wanted
            }),
            "the load makes progress"
        );
        // Power off: the process dies, then the unsynced writes are gone.
        server.kill();
        stop.store(true, Ordering::Relaxed);
        for thread in load {
            thread.join().unwrap();
        }
        let report = fs.power_loss().expect("power loss");
        lost_bytes += report.bytes;
        fsyncs += report.fsyncs;
        fs = mount().expect("remounted");
        server = spawn.start();
        checked = verify(&server, &password, &acked.lock().unwrap());
        eprintln!(
            "cycle {cycle}: {checked} acknowledgements checked; the power took {} unsynced bytes in {} file(s)",
            report.bytes, report.files
        );
    }
    server.kill();
    fs.unmount();
    let a = acked.lock().unwrap();
    eprintln!(
        "power loss: {cycles} cycles, {checked} acknowledgements ({} SMTP 250, {} APPEND OK, {} STORE OK) all present exactly once; {lost_bytes} unsynced bytes dropped, {fsyncs} fsyncs",
        a.smtp.len(),
        a.appended.len(),
        a.flagged.len()
    );
    drop(a);
    assert!(
        lost_bytes > 0 || cycles == 0,
        "the power losses dropped something (else the test proves nothing)"
    );
}

/// `mailroom` (the binary under test) with `args`; its standard output, after it
/// succeeded.
fn cli(args: &[&str]) -> String {
    let output = std::process::Command::new(common::process::binary())
        .args(args)
        .output()
        .expect("the binary runs");
    assert!(
        output.status.success(),
        "mailroom {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// An import's chunks are committed without an fsync each (their fsyncs queued with
/// the spool's and slowed mail), so the job makes them durable before it reports that
/// it finished: a power cut right after `mailroom directory import` said "applied"
/// loses none of its rows, and an administrator's change made during the import
/// (acknowledged durable on its own) is there too. Without the job's final sync the
/// cut takes the last second of rows (tried: the export then misses them).
#[test]
fn a_finished_import_survives_power_loss() {
    let backing = tempfile::tempdir().unwrap();
    let mountpoint = tempfile::tempdir().unwrap();
    let mount = || lazy_mount(&backing, &mountpoint);
    let Some(fs) = mount() else {
        return;
    };
    let spawn = Spawn {
        data: mountpoint.path().join("data"),
        env: vec![("MAILROOM_LOG".into(), "warn".into())],
        ..Spawn::default()
    };
    let server = spawn.start();
    let data = server.data.to_str().unwrap().to_string();
    let rows = 3000;
    let input = tempfile::tempdir().unwrap();
    let file = input.path().join("people.csv");
    let mut text = String::from("Obj-Class,Directory Name,Display Name,E-mail Addresses\n");
    for i in 0..rows {
        text.push_str(&format!(
            "Mailbox,user{i},User {i},SMTP:user{i}@example.test\n"
        ));
    }
    std::fs::write(&file, text).unwrap();
    let importer = {
        let (file, data) = (file.clone(), data.clone());
        std::thread::spawn(move || {
            cli(&[
                "directory",
                "import",
                file.to_str().unwrap(),
                "--data",
                &data,
            ])
        })
    };
    cli(&[
        "recipient",
        "add",
        "admin-change@example.test",
        "--data",
        &data,
    ]);
    let out = importer.join().unwrap();
    assert!(
        out.contains(&format!("scanned {rows}, applied {rows}, failed 0")),
        "{out}"
    );
    // Power off at once: the process dies, then the unsynced writes are gone.
    server.kill();
    let report = fs.power_loss().expect("power loss");
    eprintln!(
        "the power took {} unsynced bytes in {} file(s)",
        report.bytes, report.files
    );
    let fs = mount().expect("remounted");
    let server = spawn.start();
    let exported = cli(&["directory", "export", "--data", &data]);
    let missing: Vec<String> = (0..rows)
        // "user1@" is no part of "user21@": a substring test is exact here.
        .map(|i| format!("user{i}@example.test"))
        .filter(|address| !exported.contains(address.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} imported row(s) lost to the power cut, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    assert!(exported.contains("admin-change@example.test"));
    server.kill();
    fs.unmount();
}
