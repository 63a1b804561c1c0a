//! The hostile battery against the real binary, measured from outside: `mailroom serve`
//! runs as its own process, the attacks arrive over loopback sockets, and after each one
//! every listener must greet within a second while the process's resident memory
//! (`/proc/PID/status`) stays under its bound. What is thrown: MIME bombs (10,000
//! nested message/rfc822 parts, 10,000 nested multiparts, 100,000 sibling parts, a 1 MB
//! folded header, a base64 bomb, NUL and invalid UTF-8) through SMTP into conversion and
//! then IMAP's BODYSTRUCTURE, sections and SEARCH; a million RCPTs; NUL and invalid
//! UTF-8 in every command; commands out of order; a pipelining flood; slow senders.
//!
//! `MAILROOM_TEST_BIN` runs the battery against another build (the release binary, as
//! docs/security.md reports); by default it is the binary of this test build.

mod common;

use common::process::{Process, Spawn};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Peak anonymous resident memory (heap and stacks) the whole battery may add to the
/// freshly started server. The inputs total about 40 MB; per-session buffers are
/// bounded (docs/limits.md), so what is resident is the largest message being converted
/// or fetched, a few times over. File-backed pages (the database is memory-mapped, up to
/// 1 GiB) are the kernel's page cache, reported but not bounded here.
const PEAK_GROWTH_MAX_KIB: u64 = 256 * 1024;

/// The server process and its data folder.
struct Server {
    process: Process,
    password: String,
    _data: tempfile::TempDir,
}

impl std::ops::Deref for Server {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

fn start() -> Server {
    let data = tempfile::tempdir().unwrap();
    let process = Spawn::at(&data.path().join("data"), "error").start();
    Server {
        password: process
            .password
            .clone()
            .expect("postmaster password printed"),
        process,
        _data: data,
    }
}

/// (RssAnon, RssFile) of `pid` in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("RssAnon:"), field("RssFile:"))
}

/// Samples the server's anonymous RSS every 5 ms and keeps the highest reading (the
/// kernel's own peak, VmHWM, counts the memory-mapped database too).
struct PeakSampler {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl PeakSampler {
    fn start(pid: u32) -> PeakSampler {
        use std::sync::atomic::Ordering;
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_kib(pid).0, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        PeakSampler { peak, stop }
    }

    fn peak(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for PeakSampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn greet_line(addr: SocketAddr) -> String {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{addr} did not greet within 1 s: {e}"));
    line
}

/// After each attack: the process lives, every listener greets within a second, and
/// the peak RSS is within the bound. Prints the reading for the record.
fn after(server: &mut Server, sampler: &PeakSampler, baseline_kib: u64, attack: &str) {
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server died during: {attack}"
    );
    for addr in [server.smtp, server.imap, server.pop3] {
        let line = greet_line(addr);
        assert!(
            line.starts_with("220 ") || line.starts_with("* OK") || line.starts_with("+OK"),
            "after {attack}, {addr} greeted {line:?}"
        );
    }
    let (anon, file) = rss_kib(server.child.id());
    let peak = sampler.peak().max(anon);
    eprintln!(
        "after {attack}: heap RSS {} MiB (peak {} MiB, started at {} MiB), mapped files {} MiB",
        anon / 1024,
        peak / 1024,
        baseline_kib / 1024,
        file / 1024
    );
    assert!(
        peak <= baseline_kib + PEAK_GROWTH_MAX_KIB,
        "after {attack}: peak heap RSS {peak} KiB exceeds {baseline_kib} KiB + {PEAK_GROWTH_MAX_KIB} KiB"
    );
}

/// A raw line client for any of the three protocols.
struct Raw {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut raw = Raw {
            reader: BufReader::new(stream),
            writer,
        };
        raw.line();
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        let _ = self.writer.write_all(bytes);
    }

    /// One line as bytes ("" at the end of the stream).
    fn line(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        let _ = self.reader.read_until(b'\n', &mut line);
        line
    }

    /// One SMTP reply (all its lines); returns the last line.
    fn smtp_reply(&mut self) -> String {
        loop {
            let line = self.line();
            assert!(!line.is_empty(), "the SMTP server closed the connection");
            assert!(
                line.ends_with(b"\r\n"),
                "SMTP reply not ended by CRLF: {line:?}"
            );
            if line.get(3) == Some(&b' ') {
                return String::from_utf8_lossy(&line).into_owned();
            }
        }
    }

    /// IMAP lines up to the tagged one, literals skipped; returns (untagged bytes, the
    /// tagged line).
    fn imap_until(&mut self, tag: &str) -> (Vec<u8>, String) {
        let mut untagged = Vec::new();
        loop {
            let line = self.line();
            assert!(!line.is_empty(), "the IMAP server closed while {tag} ran");
            if line.starts_with(format!("{tag} ").as_bytes()) {
                return (untagged, String::from_utf8_lossy(&line).into_owned());
            }
            untagged.extend_from_slice(&line);
            if let Some(n) = literal(&line) {
                let mut body = vec![0u8; n];
                self.reader.read_exact(&mut body).unwrap();
                untagged.extend_from_slice(&body);
            }
        }
    }
}

fn literal(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"}\r\n")?;
    let open = line.iter().rposition(|b| *b == b'{')?;
    std::str::from_utf8(&line[open + 1..]).ok()?.parse().ok()
}

/// Sends one message over SMTP; returns the final reply to DATA.
fn send_message(addr: SocketAddr, message: &[u8]) -> String {
    let mut smtp = Raw::connect(addr);
    smtp.send(b"EHLO attacker.test\r\n");
    smtp.smtp_reply();
    smtp.send(b"MAIL FROM:<attacker@remote.test>\r\n");
    assert!(smtp.smtp_reply().starts_with("250"));
    smtp.send(b"RCPT TO:<postmaster@example.test>\r\n");
    assert!(smtp.smtp_reply().starts_with("250"));
    smtp.send(b"DATA\r\n");
    assert!(smtp.smtp_reply().starts_with("354"));
    let mut stuffed = Vec::with_capacity(message.len() + 16);
    for line in message.split_inclusive(|b| *b == b'\n') {
        if line.starts_with(b".") {
            stuffed.push(b'.');
        }
        stuffed.extend_from_slice(line);
    }
    stuffed.extend_from_slice(b".\r\n");
    smtp.send(&stuffed);
    let reply = smtp.smtp_reply();
    smtp.send(b"QUIT\r\n");
    reply
}

fn bombs() -> Vec<(&'static str, Vec<u8>)> {
    let head = b"From: attacker@remote.test\r\nTo: postmaster@example.test\r\nSubject: bomb\r\n";
    let mut rfc822 = head.to_vec();
    rfc822.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\n");
    for _ in 0..10_000 {
        rfc822.extend_from_slice(b"Subject: x\r\nContent-Type: message/rfc822\r\n\r\n");
    }
    rfc822.extend_from_slice(b"Subject: inner\r\n\r\ninnermost text\r\n");

    let mut multipart = head.to_vec();
    for i in 0..10_000 {
        multipart.extend_from_slice(
            format!("Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n")
                .as_bytes(),
        );
    }
    multipart.extend_from_slice(b"Content-Type: text/plain\r\n\r\ninnermost text\r\n");

    let mut siblings = head.to_vec();
    siblings.extend_from_slice(b"Content-Type: multipart/mixed; boundary=s\r\n\r\n");
    for _ in 0..100_000 {
        siblings.extend_from_slice(b"--s\r\n\r\nx\r\n");
    }
    siblings.extend_from_slice(b"--s--\r\n");

    let mut folded = b"From: attacker@remote.test\r\nSubject: start".to_vec();
    while folded.len() < 1_000_000 {
        folded.extend_from_slice(b"\r\n folded");
    }
    folded.extend_from_slice(b"\r\n\r\nbody\r\n");

    let mut base64 = head.to_vec();
    base64.extend_from_slice(b"Content-Type: multipart/mixed; boundary=z\r\n\r\n");
    for _ in 0..50 {
        base64.extend_from_slice(
            b"--z\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n",
        );
        for _ in 0..2_000 {
            base64.extend_from_slice(&[b'A'; 76]);
            base64.extend_from_slice(b"\r\n");
        }
    }
    base64.extend_from_slice(b"--z--\r\n");

    let mut junk = b"From: \x00\xff\xfe <a\x00@remote.test>\r\nTo: \xc3\x28@example.test\r\nSubject: \x00\xc0\xaf\r\nContent-Type: text/plain; charset=\"\x00\xff\"\r\nContent-Transfer-Encoding: \xff\r\n\r\n".to_vec();
    for b in (1..=255u8).cycle().take(100_000) {
        if b != b'\r' && b != b'\n' {
            junk.push(b);
        } else {
            junk.extend_from_slice(b"\r\n");
        }
    }
    junk.extend_from_slice(b"\r\n");
    vec![
        ("10,000 nested message/rfc822 parts", rfc822),
        ("10,000 nested multiparts", multipart),
        ("100,000 sibling parts", siblings),
        ("a 1 MB folded header", folded),
        ("a base64 bomb (7.6 MB of base64)", base64),
        ("NUL and invalid UTF-8 in every header and the body", junk),
    ]
}

#[test]
fn the_release_battery_leaves_the_server_up_and_within_its_memory() {
    let mut server = start();
    let (baseline, _) = rss_kib(server.child.id());
    let sampler = PeakSampler::start(server.child.id());
    after(&mut server, &sampler, baseline, "start");

    // MIME bombs through SMTP and conversion.
    let bombs = bombs();
    for (name, message) in &bombs {
        let reply = send_message(server.smtp, message);
        assert!(
            reply.starts_with("250") || reply.starts_with("552") || reply.starts_with("554"),
            "{name}: {reply}"
        );
        after(&mut server, &sampler, baseline, name);
    }
    let accepted = bombs.len();

    // Every accepted bomb reaches the mailbox (conversion survived it), then IMAP's
    // views of them: BODYSTRUCTURE, ENVELOPE, deep sections, BINARY, SEARCH.
    let mut imap = Raw::connect(server.imap);
    imap.send(format!("l LOGIN postmaster \"{}\"\r\n", server.password).as_bytes());
    assert!(imap.imap_until("l").1.starts_with("l OK"));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        imap.send(b"s STATUS INBOX (MESSAGES)\r\n");
        let (status, _) = imap.imap_until("s");
        let status = String::from_utf8_lossy(&status).into_owned();
        if status.contains(&format!("MESSAGES {accepted})")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bombs were not all delivered: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for (tag, command) in [
        ("a", "SELECT INBOX"),
        ("b", "FETCH 1:* (BODYSTRUCTURE ENVELOPE BODY RFC822.SIZE)"),
        (
            "c",
            "FETCH 1:* (BODY.PEEK[1.1.1.1.1] BODY.PEEK[2.MIME] BINARY.PEEK[1])",
        ),
        ("d", "SEARCH TEXT \"innermost\""),
        ("e", "SEARCH HEADER Subject \"nothing-like-this\""),
        (
            "f",
            "FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT)] BINARY.SIZE[1])",
        ),
    ] {
        imap.send(format!("{tag} {command}\r\n").as_bytes());
        let (_, tagged) = imap.imap_until(tag);
        assert!(
            tagged.starts_with(&format!("{tag} OK")) || tagged.starts_with(&format!("{tag} NO")),
            "{command}: {tagged}"
        );
        after(
            &mut server,
            &sampler,
            baseline,
            &format!("IMAP {command} over the bombs"),
        );
    }

    // A million RCPTs, pipelined, answers read by another thread.
    {
        let stream = TcpStream::connect(server.smtp).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let (mut ok, mut refused, mut line) = (0u64, 0u64, Vec::new());
            loop {
                line.clear();
                if reader.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                    break;
                }
                if line.get(3) != Some(&b' ') {
                    continue;
                }
                match &line[..1] {
                    b"2" => ok += 1,
                    b"4" | b"5" => refused += 1,
                    _ => {}
                }
            }
            (ok, refused)
        });
        let mut batch = Vec::with_capacity(1 << 20);
        let _ = writer.write_all(b"EHLO flood.test\r\nMAIL FROM:<attacker@remote.test>\r\n");
        for i in 0..1_000_000u32 {
            batch.extend_from_slice(b"RCPT TO:<postmaster@example.test>\r\n");
            if i % 20_000 == 19_999 {
                if writer.write_all(&batch).is_err() {
                    break;
                }
                batch.clear();
            }
        }
        let _ = writer.write_all(b"QUIT\r\n");
        let (ok, refused) = reader.join().unwrap();
        // The greeting, EHLO, MAIL, the first 100 RCPTs (recipients_per_message_max)
        // and QUIT succeed; every further RCPT is refused (or the server closed early).
        assert!(
            ok >= 3,
            "the session never got going: {ok} ok, {refused} refused"
        );
        assert!(
            ok <= 3 + 100 + 1,
            "more recipients accepted than the limit: {ok}"
        );
        after(&mut server, &sampler, baseline, "a million pipelined RCPTs");
    }

    // NUL and invalid UTF-8 in every command of every protocol: refusals, no crash.
    {
        let mut smtp = Raw::connect(server.smtp);
        for command in [
            b"EHLO \x00\xff\xfe\r\n".as_slice(),
            b"MAIL FROM:<\x00@remote.test>\r\n",
            b"MAIL FROM:<a@remote.test> \xff=\x00\r\n",
            b"RCPT TO:<postmaster\x00@example.test>\r\n",
            b"VRFY \xc3\x28\r\n",
            b"\x00\x00\x00\r\n",
        ] {
            smtp.send(command);
            let reply = smtp.smtp_reply();
            assert!(
                reply.as_bytes()[0].is_ascii_digit(),
                "{command:?}: {reply:?}"
            );
        }
        let mut imap = Raw::connect(server.imap);
        for (tag, command) in [
            ("a", b"a LOGIN \x00 \xff\r\n".as_slice()),
            ("b", b"b SELECT \"\xff\x00\"\r\n"),
            ("c", b"c \xc3\x28\r\n"),
        ] {
            imap.send(command);
            let (_, tagged) = imap.imap_until(tag);
            assert!(
                tagged.starts_with(&format!("{tag} NO"))
                    || tagged.starts_with(&format!("{tag} BAD")),
                "{command:?}: {tagged}"
            );
        }
        let mut pop3 = Raw::connect(server.pop3);
        pop3.send(b"USER \x00\xff\r\nPASS \xc3\x28\r\n\x00\r\n");
        for _ in 0..3 {
            let line = pop3.line();
            assert!(
                line.starts_with(b"+OK") || line.starts_with(b"-ERR"),
                "{line:?}"
            );
        }
        after(
            &mut server,
            &sampler,
            baseline,
            "NUL and invalid UTF-8 in every command",
        );
    }

    // Commands out of order get the protocol's "bad sequence" answer.
    {
        let mut smtp = Raw::connect(server.smtp);
        smtp.send(b"EHLO order.test\r\n");
        smtp.smtp_reply();
        for command in [
            b"DATA\r\n".as_slice(),
            b"RCPT TO:<postmaster@example.test>\r\n",
            b"BDAT 3 LAST\r\nabc",
        ] {
            smtp.send(command);
            let reply = smtp.smtp_reply();
            assert!(reply.starts_with("503"), "{command:?}: {reply}");
        }
        let mut imap = Raw::connect(server.imap);
        imap.send(b"a FETCH 1 FLAGS\r\nb EXPUNGE\r\n");
        assert!(imap.imap_until("a").1.starts_with("a BAD"));
        assert!(imap.imap_until("b").1.starts_with("b BAD"));
        let mut pop3 = Raw::connect(server.pop3);
        pop3.send(b"RETR 1\r\nDELE 1\r\n");
        assert!(pop3.line().starts_with(b"-ERR"));
        assert!(pop3.line().starts_with(b"-ERR"));
        after(&mut server, &sampler, baseline, "commands out of order");
    }

    // A pipelining flood: 100,000 NOOPs sent before a single answer is read.
    {
        let stream = TcpStream::connect(server.imap).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let counter = std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let (mut answered, mut line) = (0u32, Vec::new());
            loop {
                line.clear();
                if reader.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                    return answered;
                }
                if line.starts_with(b"n OK") {
                    answered += 1;
                }
                if line.starts_with(b"z ") {
                    return answered;
                }
            }
        });
        let flood = b"n NOOP\r\n".repeat(100_000);
        let _ = writer.write_all(&flood);
        let _ = writer.write_all(b"z LOGOUT\r\n");
        let answered = counter.join().unwrap();
        assert_eq!(answered, 100_000, "every pipelined command is answered");
        after(&mut server, &sampler, baseline, "100,000 pipelined NOOPs");
    }

    // Slow senders: 30 connections trickling a byte at a time do not hold up a normal
    // client's transaction.
    {
        let slow: Vec<TcpStream> = (0..30)
            .map(|_| TcpStream::connect(server.smtp).unwrap())
            .collect();
        let trickle = std::thread::spawn(move || {
            let mut slow = slow;
            for byte in b"EHLO slow.test\r\nMAIL FROM:<a@remote.test>\r\n" {
                for stream in &mut slow {
                    let _ = stream.write_all(&[*byte]);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            slow
        });
        let started = Instant::now();
        let reply = send_message(
            server.smtp,
            b"From: normal@remote.test\r\nSubject: normal\r\n\r\nhello\r\n",
        );
        assert!(reply.starts_with("250"), "{reply}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a normal transaction took {:?} among slow senders",
            started.elapsed()
        );
        drop(trickle.join().unwrap());
        after(&mut server, &sampler, baseline, "30 slow senders");
    }
}
