//! Two more IMAP clients we did not write, as users run them: offlineimap (Debian's
//! offlineimap3) mirroring both ways, and neomutt driven through tmux by keystrokes (read,
//! flag, move, delete). Each result is checked on the server over IMAP, waiting on the
//! condition with a deadline. `.ci/run` installs both; without them (outside CI) the
//! tests skip and say so.

mod common;

use common::{TestServer, eventually};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const PASSWORD: &str = "client test password";

fn installed(program: &str, package: &str) -> bool {
    if Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{program} is missing; .ci/run installs it (Debian package {package})"
    );
    eprintln!("skipped: {program} is not installed (apt-get install {package})");
    false
}

fn message(subject: &str, id: &str, date: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Bob <bob@remote.test>\r\nTo: erin@example.test\r\nSubject: {subject}\r\nMessage-ID: <{id}@remote.test>\r\nDate: {date}\r\n\r\n{body}\r\n"
    )
    .into_bytes()
}

/// (folder, subject, flags) of each message in INBOX and Archive, read over IMAP on the
/// blocking pool.
async fn server_state(server: &TestServer, user: &str) -> Vec<(String, String, String)> {
    let addr = server.server.imap_addr;
    let user = user.to_string();
    tokio::task::spawn_blocking(move || read_state(addr, &user))
        .await
        .unwrap()
}

fn read_state(addr: std::net::SocketAddr, user: &str) -> Vec<(String, String, String)> {
    let mut imap = common::RawImap::login(addr, user, PASSWORD);
    let mut out = Vec::new();
    for folder in ["INBOX", "Archive"] {
        imap.run("s", &format!("SELECT {folder}"));
        let lines = imap.run("f", "FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])");
        let mut flags = String::new();
        for line in lines {
            if let Some(at) = line.find("FLAGS (") {
                let rest = &line[at + 7..];
                flags = rest[..rest.find(')').unwrap_or(0)].to_string();
            }
            if let Some(subject) = line.strip_prefix("Subject: ") {
                out.push((
                    folder.to_string(),
                    subject.trim().to_string(),
                    flags.clone(),
                ));
            }
        }
    }
    imap.run("l", "LOGOUT");
    out
}

fn has(state: &[(String, String, String)], folder: &str, subject: &str, flag: &str) -> bool {
    state
        .iter()
        .any(|(f, s, fl)| f == folder && s == subject && fl.contains(flag))
}

/// offlineimap mirrors the mailbox into a Maildir, byte for byte; a local \Seen, a local
/// deletion and a new local message reach the server on the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offlineimap_mirrors_both_ways() {
    if !installed("offlineimap", "offlineimap3") {
        return;
    }
    let server = TestServer::start().await;
    let user = "erin@example.test";
    server
        .add_mailbox(user, PASSWORD, serde_json::json!({}))
        .await;
    let a = message("alpha", "a1", "Thu, 05 Mar 2026 10:00:00 +0000", "first");
    let b = message("beta", "b1", "Thu, 05 Mar 2026 11:00:00 +0000", "second");
    server.send_raw(user, &a).await;
    server.send_raw(user, &b).await;
    server.wait_for_messages(user, 2).await;
    let stored = [server.raw(user, 1).await, server.raw(user, 2).await];

    let home = tempfile::tempdir().unwrap();
    let mail = home.path().join("mail");
    let rc = home.path().join("offlineimaprc");
    std::fs::write(
        &rc,
        format!(
            "[general]\naccounts = test\nmetadata = {meta}\n\n\
             [Account test]\nlocalrepository = local\nremoterepository = remote\n\n\
             [Repository local]\ntype = Maildir\nlocalfolders = {mail}\n\n\
             [Repository remote]\ntype = IMAP\nremotehost = 127.0.0.1\nremoteport = {port}\n\
             remoteuser = {user}\nremotepass = {PASSWORD}\nssl = no\nstarttls = no\n",
            meta = home.path().join("meta").display(),
            mail = mail.display(),
            port = server.server.imap_addr.port(),
        ),
    )
    .unwrap();
    let run = |rc: std::path::PathBuf, home: std::path::PathBuf| async move {
        let output = tokio::process::Command::new("offlineimap")
            .arg("-c")
            .arg(&rc)
            .args(["-o", "-u", "basic"])
            .env("HOME", &home)
            .output()
            .await
            .expect("offlineimap runs");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success() && !log.contains("ERROR"),
            "offlineimap failed:\n{log}"
        );
    };
    run(rc.clone(), home.path().to_path_buf()).await;
    let files = |dir: &Path| -> Vec<std::path::PathBuf> {
        ["new", "cur"]
            .iter()
            .filter_map(|d| std::fs::read_dir(dir.join(d)).ok())
            .flatten()
            .map(|e| e.unwrap().path())
            .collect()
    };
    let inbox = mail.join("INBOX");
    let local = files(&inbox);
    assert_eq!(local.len(), 2, "{local:?}");
    // offlineimap writes Maildir files with LF line ends; apart from that, byte for byte.
    let lf = |b: &[u8]| String::from_utf8_lossy(b).replace("\r\n", "\n");
    let same =
        |p: &std::path::PathBuf, original: &[u8]| lf(&std::fs::read(p).unwrap()) == lf(original);
    for original in &stored {
        assert!(
            local.iter().any(|p| same(p, original)),
            "no Maildir file equals the stored message:\n{}\n--- local:\n{}",
            String::from_utf8_lossy(original),
            local
                .iter()
                .map(|p| format!("{:?}", String::from_utf8_lossy(&std::fs::read(p).unwrap())))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    for folder in ["Sent", "Drafts", "Trash", "Junk", "Archive"] {
        assert!(mail.join(folder).exists(), "{folder} was not mirrored");
    }
    // Locally: alpha read, beta deleted, a new message written.
    let alpha = local.iter().find(|p| same(p, &stored[0])).unwrap();
    let beta = local.iter().find(|p| same(p, &stored[1])).unwrap();
    let name = alpha.file_name().unwrap().to_string_lossy().to_string();
    let base = name.split(":2,").next().unwrap().to_string();
    std::fs::rename(alpha, inbox.join("cur").join(format!("{base}:2,S"))).unwrap();
    std::fs::remove_file(beta).unwrap();
    let gamma = message(
        "gamma",
        "c1",
        "Thu, 05 Mar 2026 12:00:00 +0000",
        "written locally",
    );
    std::fs::write(inbox.join("new").join("1772712000.local.gamma"), &gamma).unwrap();
    run(rc, home.path().to_path_buf()).await;

    let state = server_state(&server, user).await;
    assert!(has(&state, "INBOX", "alpha", "\\Seen"), "{state:?}");
    assert!(
        !state.iter().any(|(_, s, _)| s == "beta"),
        "beta was deleted locally: {state:?}"
    );
    assert!(
        state.iter().any(|(f, s, _)| f == "INBOX" && s == "gamma"),
        "the local message was not uploaded: {state:?}"
    );
    server.server.shutdown().await;
}

/// A tmux session running neomutt, read by capturing its pane.
struct Tmux {
    name: String,
}

impl Tmux {
    fn keys(&self, keys: &[&str]) {
        let status = Command::new("tmux")
            .args(["send-keys", "-t", &self.name])
            .args(keys)
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn wait_screen(&self, what: &str) {
        let found = eventually(Duration::from_secs(20), async || {
            self.screen().contains(what)
        })
        .await;
        assert!(
            found,
            "neomutt never showed {what:?}; screen:\n{}",
            self.screen()
        );
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .status();
    }
}

/// neomutt, driven by keystrokes through tmux: read a message and flag it, save (move)
/// one to Archive, delete one. The server ends with the read message \Seen and \Flagged
/// in INBOX, the moved one in Archive, the deleted one nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neomutt_reads_flags_moves_and_deletes() {
    if !installed("neomutt", "neomutt") || !installed("tmux", "tmux") {
        return;
    }
    let server = TestServer::start().await;
    let user = "erin@example.test";
    server
        .add_mailbox(user, PASSWORD, serde_json::json!({}))
        .await;
    for (subject, id, hour) in [("alpha", "a1", 10), ("beta", "b1", 11), ("gamma", "c1", 12)] {
        let date = format!("Thu, 05 Mar 2026 {hour}:00:00 +0000");
        server
            .send_raw(user, &message(subject, id, &date, "text"))
            .await;
    }
    server.wait_for_messages(user, 3).await;

    let home = tempfile::tempdir().unwrap();
    let rc = home.path().join("neomuttrc");
    std::fs::write(
        &rc,
        format!(
            "set folder=\"imap://127.0.0.1:{port}/\"\nset spoolfile=\"+INBOX\"\n\
             set imap_user=\"{user}\"\nset imap_pass=\"{PASSWORD}\"\n\
             set ssl_starttls=no\nset ssl_force_tls=no\nset sort=date-sent\n\
             set delete=yes\nset confirmappend=no\nset move=no\nset record=\"\"\n\
             set header_cache=\"\"\nset message_cachedir=\"\"\nset mail_check=1\n\
             set index_format=\"%4C %Z %s\"\nset pager_stop=yes\nset wait_key=no\n",
            port = server.server.imap_addr.port(),
        ),
    )
    .unwrap();
    let name = format!("neomutt-{}", std::process::id());
    let status = Command::new("tmux")
        .args(["new-session", "-d", "-s", &name, "-x", "160", "-y", "40"])
        .arg(format!(
            "HOME={home} TERM=xterm neomutt -n -F {rc}",
            home = home.path().display(),
            rc = rc.display()
        ))
        .status()
        .unwrap();
    assert!(status.success(), "tmux starts");
    let tmux = Tmux { name };
    tmux.wait_screen("gamma").await;

    // Read alpha (message 1), back to the index, flag it, sync.
    tmux.keys(&["1", "Enter"]);
    tmux.keys(&["Enter"]);
    tmux.wait_screen("Message-ID: <a1@remote.test>").await;
    tmux.keys(&["q"]);
    tmux.wait_screen("gamma").await;
    tmux.keys(&["F", "$"]);
    let seen_and_flagged = eventually(Duration::from_secs(20), async || {
        let state = server_state(&server, user).await;
        has(&state, "INBOX", "alpha", "\\Seen") && has(&state, "INBOX", "alpha", "\\Flagged")
    })
    .await;
    assert!(
        seen_and_flagged,
        "alpha not \\Seen \\Flagged on the server: {:?}\n{}",
        server_state(&server, user).await,
        tmux.screen()
    );

    // Save (move) beta to Archive.
    tmux.keys(&["2", "Enter"]);
    tmux.keys(&["s"]);
    tmux.wait_screen("Save to mailbox").await;
    tmux.keys(&["C-u", "=Archive", "Enter"]);
    tmux.keys(&["$"]);
    let moved = eventually(Duration::from_secs(20), async || {
        let state = server_state(&server, user).await;
        state.iter().any(|(f, s, _)| f == "Archive" && s == "beta")
            && !state.iter().any(|(f, s, _)| f == "INBOX" && s == "beta")
    })
    .await;
    assert!(
        moved,
        "beta not moved to Archive: {:?}\n{}",
        server_state(&server, user).await,
        tmux.screen()
    );

    // Delete gamma.
    tmux.wait_screen("gamma").await;
    tmux.keys(&["2", "Enter"]);
    tmux.keys(&["d", "$"]);
    let deleted = eventually(Duration::from_secs(20), async || {
        !server_state(&server, user)
            .await
            .iter()
            .any(|(_, s, _)| s == "gamma")
    })
    .await;
    let state = server_state(&server, user).await;
    assert!(deleted, "gamma not deleted: {state:?}\n{}", tmux.screen());
    assert!(has(&state, "INBOX", "alpha", "\\Flagged"), "{state:?}");
    tmux.keys(&["q"]);
    server.server.shutdown().await;
}
