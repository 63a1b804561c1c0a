//! Session limits answered with the right codes, and 421 to open sessions at shutdown.

mod common;

use common::{RawSmtp, TestServer};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_get_421() {
    let server = TestServer::start_with(|c| c.smtp.sessions_max = 2, Default::default()).await;
    let addr = server.smtp();
    tokio::task::spawn_blocking(move || {
        let _a = RawSmtp::connect(addr);
        let _b = RawSmtp::connect(addr);
        let mut third = std::io::BufReader::new(std::net::TcpStream::connect(addr).unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut third, &mut line).unwrap();
        assert!(line.starts_with("421 4.7.0"), "{line}");
    })
    .await
    .unwrap();
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_closed_with_421() {
    let server = TestServer::start_with(|c| c.smtp.idle_timeout_secs = 1, Default::default()).await;
    let addr = server.smtp();
    tokio::task::spawn_blocking(move || {
        let mut smtp = RawSmtp::connect(addr);
        smtp.send(b"EHLO c\r\n");
        smtp.reply();
        let reply = smtp.reply();
        assert!(reply.starts_with("421 4.4.2"), "{reply}");
        assert!(smtp.closed());
    })
    .await
    .unwrap();
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_open_sessions_421_and_drops_unfinished_data() {
    let server = TestServer::start().await;
    server.add_recipients(&["alice@example.test"]).await;
    let addr = server.smtp();
    let data_dir = server.dir.path().to_path_buf();
    // One session idle after EHLO, one in the middle of DATA.
    let (mut idle, mut mid_data) = tokio::task::spawn_blocking(move || {
        let mut idle = RawSmtp::connect(addr);
        idle.send(b"EHLO c\r\n");
        idle.reply();
        let mut mid = RawSmtp::connect(addr);
        mid.send(
            b"EHLO c\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n",
        );
        mid.codes(4);
        mid.send(b"Subject: never finished\r\n\r\nhalf a mess");
        (idle, mid)
    })
    .await
    .unwrap();
    let started = Instant::now();
    let TestServer { server, dir } = server;
    let report = server.shutdown().await;
    assert!(report.clean, "{report:?}");
    assert!(report.elapsed < Duration::from_secs(5), "{report:?}");
    let (a, b) = tokio::task::spawn_blocking(move || (idle.reply(), mid_data.reply()))
        .await
        .unwrap();
    assert!(a.starts_with("421 4.3.2"), "{a}");
    assert!(b.starts_with("421 4.3.2"), "{b}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Restart on the same data: the unfinished message was never accepted.
    let mut config = common::test_config(&data_dir);
    config.server.data_dir = data_dir;
    let again = mailroom::start(config, Default::default()).await.unwrap();
    let inbound = again.store.queue_summaries().unwrap()[0].depth;
    assert_eq!(inbound, 0);
    let alice = again
        .directory
        .snapshot()
        .by_address("alice@example.test")
        .unwrap()
        .id;
    assert!(
        again
            .store
            .mailbox_messages(alice, "INBOX")
            .unwrap()
            .is_empty()
    );
    again.shutdown().await;
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_folder_is_refused() {
    let server = TestServer::start().await;
    let config = common::test_config(server.dir.path());
    let err = mailroom::start(config, Default::default())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("already running"), "{err}");
    server.server.shutdown().await;
}
