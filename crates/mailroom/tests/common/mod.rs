//! Shared helpers for the integration tests: a whole server on ephemeral loopback ports,
//! the admin API client, raw SMTP for wire-level checks, and waiting on conditions with
//! a deadline (never sleeping and hoping).

#![allow(dead_code)]

pub mod dns;
pub mod process;

use mailroom::client::{AdminClient, path_segment};
use mailroom::{Config, RunningServer, ServerOptions};
use mailroom_store::MessageSummary;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// A loopback TCP port free right now (for a peer that must be told its port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian's python3 (where python3-aiosmtpd and python3-dkim are installed), else
/// whatever `python3` is.
pub fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// A config for tests: ephemeral ports, the given data folder, domain example.test.
pub fn test_config(data: &Path) -> Config {
    let mut config = Config::default();
    config.server.data_dir = data.to_path_buf();
    config.server.domain = "example.test".into();
    config.server.hostname = "mx.example.test".into();
    config.smtp.listen = "127.0.0.1:0".parse().unwrap();
    config.pop3.listen = "127.0.0.1:0".parse().unwrap();
    config.imap.listen = "127.0.0.1:0".parse().unwrap();
    config.imap.tls_listen = "127.0.0.1:0".parse().unwrap();
    config.pop3.tls_listen = "127.0.0.1:0".parse().unwrap();
    config.smtp.submission_listen = "127.0.0.1:0".parse().unwrap();
    config.smtp.submissions_listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.tls_listen = "127.0.0.1:0".parse().unwrap();
    config.conversion.workers = 2;
    // Tests that route mail out inspect the outbound queue: hold it (the outbound tests
    // turn delivery on).
    config.outbound.transfer_mode = mailroom_outbound::TransferMode::Inbound;
    config
}

/// A server in this process, with its data folder.
pub struct TestServer {
    pub server: RunningServer,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}, ServerOptions::default()).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config), options: ServerOptions) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let server = mailroom::start(config, options)
            .await
            .expect("server starts");
        TestServer { server, dir }
    }

    pub fn smtp(&self) -> SocketAddr {
        self.server.smtp_addr
    }

    /// A gauge from the admin API's /metrics.
    pub async fn gauge(&self, name: &str) -> i64 {
        let url = format!("http://{}/metrics", self.server.admin_addr);
        let text = tokio::task::spawn_blocking(move || {
            ureq::get(&url).call().unwrap().into_string().unwrap()
        })
        .await
        .unwrap();
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} is not exported"))
    }

    pub fn client(&self) -> AdminClient {
        AdminClient::new(
            &format!("http://{}", self.server.admin_addr),
            &self.server.admin_token,
        )
    }

    /// Creates mailboxes through the admin API.
    pub async fn add_recipients(&self, addresses: &[&str]) {
        let client = self.client();
        let addresses: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            for address in addresses {
                let _: serde_json::Value = client
                    .post(
                        "/recipients",
                        &serde_json::json!({"address": address, "display_name": "Test"}),
                    )
                    .expect("recipient created");
            }
        })
        .await
        .unwrap();
    }

    /// Creates a mailbox with a password through the admin API; `extra` adds request
    /// fields (protocols, quotas).
    pub async fn add_mailbox(&self, address: &str, password: &str, extra: serde_json::Value) {
        let client = self.client();
        let mut request = serde_json::json!({
            "address": address, "display_name": "Test", "password": password
        });
        for (k, v) in extra.as_object().expect("an object") {
            request[k] = v.clone();
        }
        tokio::task::spawn_blocking(move || {
            let _: serde_json::Value = client
                .post("/recipients", &request)
                .expect("recipient created");
        })
        .await
        .unwrap();
    }

    /// Sends `bytes` from bob@remote.test to `to` with lettre (a client we did not write).
    pub async fn send_raw(&self, to: &str, bytes: &[u8]) {
        use lettre::AsyncTransport;
        let transport =
            lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous("127.0.0.1")
                .port(self.smtp().port())
                .build();
        let envelope = lettre::address::Envelope::new(
            Some("bob@remote.test".parse().unwrap()),
            vec![to.parse().unwrap()],
        )
        .unwrap();
        transport
            .send_raw(&envelope, bytes)
            .await
            .expect("accepted");
    }

    /// Runs the `mailroom` CLI against this server (found through its data folder);
    /// fails the test when it exits non-zero; returns its standard output.
    pub async fn cli(&self, args: &[&str]) -> String {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.push("--data".into());
        all.push(self.dir.path().to_str().unwrap().into());
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
                .args(&all)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            output.status.success(),
            "mailroom {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// The INBOX listing of `address`, through the admin API.
    pub async fn mailbox(&self, address: &str) -> Vec<MessageSummary> {
        let client = self.client();
        let path = format!("/mailboxes/{}/messages", path_segment(address));
        tokio::task::spawn_blocking(move || client.get(&path).expect("mailbox listing"))
            .await
            .unwrap()
    }

    /// The raw bytes of one message, through the admin API.
    pub async fn raw(&self, address: &str, uid: u32) -> Vec<u8> {
        let url = format!(
            "http://{}/api/v1/mailboxes/{}/messages/{uid}/raw",
            self.server.admin_addr,
            path_segment(address)
        );
        let token = self.server.admin_token.clone();
        tokio::task::spawn_blocking(move || {
            let response = ureq_get(&url, &token);
            let mut body = Vec::new();
            response.into_reader().read_to_end(&mut body).unwrap();
            body
        })
        .await
        .unwrap()
    }

    /// Waits until `address` holds `count` messages; panics with the listing at the deadline.
    pub async fn wait_for_messages(&self, address: &str, count: usize) -> Vec<MessageSummary> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let messages = self.mailbox(address).await;
            if messages.len() >= count {
                return messages;
            }
            assert!(
                Instant::now() < deadline,
                "{address} holds {} messages, expected {count}",
                messages.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn queues(&self) -> serde_json::Value {
        let client = self.client();
        tokio::task::spawn_blocking(move || client.get("/queues").unwrap())
            .await
            .unwrap()
    }
}

fn ureq_get(url: &str, token: &str) -> ureq::Response {
    ureq::get(url)
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .expect("GET succeeds")
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition().await
}

/// A blocking raw SMTP connection for wire-level checks (exact reply codes, pipelining,
/// BDAT, smuggling). Real client libraries are used wherever they can express the test.
pub struct RawSmtp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RawSmtp {
    pub fn connect(addr: SocketAddr) -> RawSmtp {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut raw = RawSmtp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = raw.reply();
        assert!(greeting.starts_with("220 "), "{greeting}");
        raw
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Reads one (possibly multi-line) reply; returns it whole.
    pub fn reply(&mut self) -> String {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap();
            assert!(n > 0, "connection closed; got so far: {text:?}");
            text.push_str(&line);
            if line.as_bytes().get(3) == Some(&b' ') {
                return text;
            }
        }
    }

    /// Reads `n` replies and returns their codes.
    pub fn codes(&mut self, n: usize) -> Vec<String> {
        (0..n).map(|_| self.reply()[..3].to_string()).collect()
    }

    /// True when the server closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.reader.read(&mut buf), Ok(0))
    }
}

/// A message with a unique Message-ID, as raw CRLF text.
pub fn message(from: &str, to: &str, id: &str, body: &str) -> String {
    format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: test {id}\r\nMessage-ID: <{id}>\r\n\
Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n{body}\r\n"
    )
}

/// One message as an IMAP client sees it (see [`imap_folders`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Fetched {
    pub uid: u32,
    /// Sorted, `\Recent` left out (it belongs to the session, not the message).
    pub flags: Vec<String>,
    /// Without the angle brackets; empty when the header is missing.
    pub message_id: String,
    /// The whole message (`BODY.PEEK[]`), when asked for.
    pub body: Option<Vec<u8>>,
}

/// Every folder of `user` and what it holds, read with async-imap (a client we did not
/// write): what the backup, upgrade and power-loss tests compare.
pub async fn imap_folders(
    imap: SocketAddr,
    user: &str,
    password: &str,
    bodies: bool,
) -> std::collections::BTreeMap<String, Vec<Fetched>> {
    use futures_util::TryStreamExt;
    let stream = tokio::net::TcpStream::connect(imap).await.unwrap();
    let mut client = async_imap::Client::new(stream);
    client.read_response().await.unwrap().unwrap();
    let mut session = client
        .login(user, password)
        .await
        .map_err(|(e, _)| e)
        .expect("IMAP login");
    let names: Vec<String> = session
        .list(Some(""), Some("*"))
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .iter()
        .map(|n| n.name().to_string())
        .collect();
    let items = if bodies {
        "(UID FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)] BODY.PEEK[])"
    } else {
        "(UID FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"
    };
    let mut all = std::collections::BTreeMap::new();
    for name in names {
        let mailbox = session.examine(&name).await.unwrap();
        let mut messages = Vec::new();
        if mailbox.exists > 0 {
            let fetched: Vec<_> = session
                .uid_fetch("1:*", items)
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            for f in fetched {
                let body = bodies.then(|| f.body().unwrap_or_default().to_vec());
                let mut header =
                    String::from_utf8_lossy(f.header().unwrap_or_default()).to_string();
                if header.is_empty()
                    && let Some(body) = &body
                {
                    let text = String::from_utf8_lossy(body);
                    header = text
                        .lines()
                        .find(|l| l.to_ascii_lowercase().starts_with("message-id:"))
                        .unwrap_or_default()
                        .to_string();
                }
                let message_id = header
                    .split('<')
                    .nth(1)
                    .and_then(|r| r.split('>').next())
                    .unwrap_or_default()
                    .to_string();
                let mut flags: Vec<String> = f
                    .flags()
                    .filter(|flag| !matches!(flag, async_imap::types::Flag::Recent))
                    .map(|flag| flag_name(&flag))
                    .collect();
                flags.sort();
                messages.push(Fetched {
                    uid: f.uid.unwrap(),
                    flags,
                    message_id,
                    body,
                });
            }
        }
        messages.sort_by_key(|m| m.uid);
        all.insert(name, messages);
    }
    let _ = session.logout().await;
    all
}

/// A flag as it is written on the wire.
pub fn flag_name(flag: &async_imap::types::Flag<'_>) -> String {
    use async_imap::types::Flag;
    match flag {
        Flag::Seen => "\\Seen".into(),
        Flag::Answered => "\\Answered".into(),
        Flag::Flagged => "\\Flagged".into(),
        Flag::Deleted => "\\Deleted".into(),
        Flag::Draft => "\\Draft".into(),
        Flag::Recent => "\\Recent".into(),
        Flag::MayCreate => "\\*".into(),
        Flag::Custom(c) => c.to_string(),
    }
}

/// A blocking raw IMAP connection for byte-level checks (exact responses, hostile
/// input); real client libraries are used wherever they can express the test.
pub struct RawImap {
    pub reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RawImap {
    pub fn connect(addr: SocketAddr) -> RawImap {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut imap = RawImap {
            reader: BufReader::new(stream),
            writer,
        };
        assert!(imap.line().starts_with("* OK"));
        imap
    }

    pub fn send(&mut self, bytes: &[u8]) {
        // The server may close mid-way through a long line: that is an answer too.
        let _ = self.writer.write_all(bytes);
    }

    /// One line, or "" at end of stream.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        let _ = self.reader.read_line(&mut line);
        line
    }

    /// Lines up to and including the tagged one (or the end of the stream).
    pub fn until_tagged(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line();
            let done = line.is_empty() || line.starts_with(&format!("{tag} "));
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    pub fn login(addr: SocketAddr, user: &str, password: &str) -> RawImap {
        let mut imap = RawImap::connect(addr);
        imap.send(format!("l LOGIN {user} \"{password}\"\r\n").as_bytes());
        let lines = imap.until_tagged("l");
        assert!(lines.last().unwrap().starts_with("l OK"), "{lines:?}");
        imap
    }

    /// Sends `command` with `tag` and returns every line up to the tagged one.
    pub fn run(&mut self, tag: &str, command: &str) -> Vec<String> {
        self.send(format!("{tag} {command}\r\n").as_bytes());
        self.until_tagged(tag)
    }
}
