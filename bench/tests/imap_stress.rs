//! The state-tracking IMAP stress client as a correctness check: a few seconds of the
//! mixed load against a real Mailroom on loopback, sessions kept open and with a login
//! every few commands, must find 0 errors. And the checker itself must be able to fail:
//! through a proxy that hides the server's untagged FLAGS (so keywords appear
//! unannounced) or its EXPUNGE responses (so sessions lose track of sequence numbers),
//! it must report errors.

use mailroom::client::AdminClient;
use mailroom::{Config, ServerOptions};
use mailroom_bench::imap_stress::{Options, Report, run};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const USER: &str = "stress@example.test";
const PASSWORD: &str = "stress test password";

async fn server() -> (mailroom::RunningServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.server.data_dir = dir.path().to_path_buf();
    config.server.domain = "example.test".into();
    config.server.hostname = "mx.example.test".into();
    config.smtp.listen = "127.0.0.1:0".parse().unwrap();
    config.pop3.listen = "127.0.0.1:0".parse().unwrap();
    config.imap.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    let server = mailroom::start(config, ServerOptions::default())
        .await
        .expect("server starts");
    let client = AdminClient::new(
        &format!("http://{}", server.admin_addr),
        &server.admin_token,
    );
    tokio::task::spawn_blocking(move || {
        let _: serde_json::Value = client
            .post(
                "/recipients",
                &serde_json::json!({"address": USER, "display_name": "Stress", "password": PASSWORD}),
            )
            .expect("mailbox created");
    })
    .await
    .unwrap();
    (server, dir)
}

fn options(addr: SocketAddr, commands_per_login: Option<u32>) -> Options {
    Options {
        server: addr,
        user: USER.into(),
        password: PASSWORD.into(),
        clients: 4,
        duration: Duration::from_secs(3),
        commands_per_login,
        messages: 40,
        seed: 7,
        condstore: true,
        qresync: false,
    }
}

fn assert_clean(report: &Report, what: &str) {
    assert_eq!(
        report.error_count,
        0,
        "{what}: the stress client found errors:\n{}",
        report.errors.join("\n\n")
    );
    for kind in [
        "append",
        "fetch_flags",
        "fetch_envelope",
        "fetch_body",
        "store_flags",
        "store_keyword",
        "search",
        "expunge",
    ] {
        let n = report.commands.get(kind).map(|c| c.0).unwrap_or(0);
        assert!(n > 0, "{what}: no {kind} ran: {:?}", report.commands);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_mix_finds_no_errors_in_mailroom() {
    let (server, _dir) = server().await;
    let open = run(options(server.imap_addr, None)).await.unwrap();
    assert_clean(&open, "sessions kept open");
    let mut relogin = options(server.imap_addr, Some(15));
    relogin.seed = 8;
    let relogin = run(relogin).await.unwrap();
    assert_clean(&relogin, "a login every 15 commands");
    assert!(relogin.commands.get("login").is_some_and(|c| c.0 > 4));
    // QRESYNC: expunges as VANISHED, and every login after the first resynchronises.
    let mut qresync = options(server.imap_addr, Some(15));
    qresync.seed = 10;
    qresync.qresync = true;
    let qresync = run(qresync).await.unwrap();
    assert_clean(&qresync, "QRESYNC, a login every 15 commands");
    server.shutdown().await;
}

/// A proxy that drops the server's lines for which `drop` says so.
async fn filtering_proxy(upstream: SocketAddr, drop: fn(&[u8]) -> bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let server = TcpStream::connect(upstream).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let mut sr = BufReader::new(sr);
                loop {
                    let mut line = Vec::new();
                    if sr.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    // Pass literals through whole, so only response lines are filtered.
                    let literal = line
                        .strip_suffix(b"}\r\n")
                        .and_then(|l| l.iter().rposition(|b| *b == b'{').map(|p| &l[p + 1..]))
                        .and_then(|d| std::str::from_utf8(d).ok()?.parse::<usize>().ok());
                    if !drop(&line) && cw.write_all(&line).await.is_err() {
                        return;
                    }
                    if let Some(n) = literal {
                        let mut data = vec![0; n];
                        if sr.read_exact(&mut data).await.is_err()
                            || cw.write_all(&data).await.is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_reports_a_server_that_hides_flags_or_expunges() {
    let (server, _dir) = server().await;
    let no_flags = filtering_proxy(server.imap_addr, |l| l.starts_with(b"* FLAGS")).await;
    let report = run(options(no_flags, None)).await.unwrap();
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.contains("before an untagged FLAGS announced it")),
        "hidden FLAGS not reported: {} errors, {:?}",
        report.error_count,
        report.errors.first()
    );

    let no_expunge = filtering_proxy(server.imap_addr, |l| {
        l.starts_with(b"* ") && l.ends_with(b" EXPUNGE\r\n")
    })
    .await;
    let mut o = options(no_expunge, None);
    o.seed = 9;
    let report = run(o).await.unwrap();
    assert!(
        report.error_count > 0,
        "hidden EXPUNGE responses not reported"
    );
    server.shutdown().await;
}
