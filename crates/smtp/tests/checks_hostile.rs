//! Hostile messages through the inbound checks (mail-auth's parsers and verifiers):
//! the MIME fuzz seeds and every MIME input that once broke something, plus messages
//! built to make a verifier work (hundreds of signatures, ARC sets with absurd
//! instance numbers, huge folded headers, NULs, no header section at all). Each must
//! come back with a well-formed Authentication-Results field and no refusal (these
//! claim no local domain and DNS answers nothing), within the time limit, whatever
//! happens inside.

use mailroom_smtp::checks::{Action, CheckPolicy, Checker};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn corpus() -> Vec<(String, Vec<u8>)> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut out = Vec::new();
    for dir in [fuzz.join("seeds/mime"), fuzz.join("regressions/mime")] {
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        for file in files.into_iter().filter(|f| f.is_file()) {
            out.push((file.display().to_string(), std::fs::read(&file).unwrap()));
        }
    }
    assert!(
        out.len() >= 5,
        "the MIME corpus is missing: {}",
        fuzz.display()
    );
    let body = "Subject: x\r\nFrom: <a@sender.example>\r\n\r\nbody\r\n";
    let signatures: String = (0..500)
        .map(|n| format!("DKIM-Signature: v=1; a=rsa-sha256; d=d{n}.example; s=s; h=from; bh=AA==; b=AA==\r\n"))
        .collect();
    out.push((
        "500 DKIM signatures".into(),
        format!("{signatures}{body}").into_bytes(),
    ));
    let arc: String = (0..60)
        .map(|n| {
            let i = 1000 - n;
            format!(
                "ARC-Seal: i={i}; a=rsa-sha256; cv=pass; d=x.example; s=s; b=AA==\r\n\
ARC-Message-Signature: i={i}; a=rsa-sha256; d=x.example; s=s; h=from; bh=AA==; b=AA==\r\n\
ARC-Authentication-Results: i={i}; x.example; spf=pass\r\n"
            )
        })
        .collect();
    out.push((
        "ARC sets up to i=1000".into(),
        format!("{arc}{body}").into_bytes(),
    ));
    let folded = format!(
        "Subject: {}\r\nFrom: <a@sender.example>\r\n\r\nx\r\n",
        "x\r\n ".repeat(200_000)
    );
    out.push(("a 1 MB folded header".into(), folded.into_bytes()));
    out.push((
        "NULs".into(),
        b"From: <a@\0.example>\r\nDKIM-Signature: \0\0\0\r\n\r\n\0".to_vec(),
    ));
    out.push(("no header section".into(), b"just a body\r\n".to_vec()));
    out.push(("empty".into(), Vec::new()));
    out.push((
        "From with many domains".into(),
        format!(
            "From: {}\r\n\r\nx\r\n",
            (0..2000)
                .map(|n| format!("<u@d{n}.example>"))
                .collect::<Vec<_>>()
                .join(", ")
        )
        .into_bytes(),
    ));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_get_a_verdict_and_nothing_breaks() {
    // A name server that knows nothing: every query gets NXDOMAIN at once.
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let closed: SocketAddr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if n < 12 {
                continue;
            }
            let mut answer = buf[..n].to_vec();
            answer[2] |= 0x80; // a response
            answer[3] = (answer[3] & 0xf0) | 3; // NXDOMAIN
            let _ = socket.send_to(&answer, from);
        }
    });
    let policy = CheckPolicy {
        trusted_networks: Vec::new(),
        timeout: Duration::from_secs(5),
        ..CheckPolicy::default()
    };
    let checker = Arc::new(Checker::new(&[closed], policy, "mx.example.test").unwrap());
    let ip: IpAddr = "192.0.2.7".parse().unwrap();
    for (name, message) in corpus() {
        let started = Instant::now();
        let verdict = checker
            .check_contained(
                ip,
                "client.example".into(),
                "a@sender.example".into(),
                Arc::new(message),
                true,
                Arc::new(|domain: &str| domain == "example.test"),
            )
            .await;
        assert!(
            verdict
                .header
                .starts_with("Authentication-Results: mx.example.test;")
                && verdict.header.ends_with("\r\n"),
            "{name}: {}",
            verdict.header
        );
        assert!(
            !verdict.header[..verdict.header.len() - 2].contains("\r\n\r\n"),
            "{name}: no blank line inside the field"
        );
        assert_eq!(verdict.action, Action::Accept, "{name}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{name}: took {:?}",
            started.elapsed()
        );
    }
}
