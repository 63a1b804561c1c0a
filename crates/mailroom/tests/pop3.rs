//! POP3 with a client we did not write (Python's poplib), over real sockets: retrieve,
//! top, UIDL stable across sessions, delete at QUIT, the in-use lock, AUTH PLAIN, failed
//! logins limited, a recipient with POP3 disabled. The bytes fetched equal the bytes
//! received over SMTP plus the trace headers.

mod common;

use common::TestServer;
use serde_json::Value;

const PASSWORD: &str = "correct horse battery";

/// Runs a poplib script; `{port}` is the POP3 port. The script prints one JSON value.
async fn poplib(server: &TestServer, body: &str) -> Value {
    let script = format!(
        "import poplib, json, base64, sys\nPORT = {}\n{}",
        server.server.pop3_addr.port(),
        body
    );
    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .await
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "poplib script failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "poplib printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn messages() -> Vec<Vec<u8>> {
    vec![
        // Lines that start with dots: byte-stuffing must be invisible to the client.
        b"From: bob@remote.test\r\nTo: alice@example.test\r\nSubject: dots\r\nMessage-ID: <p1@remote.test>\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\nlast line\r\n".to_vec(),
        // Nested multipart with base64 and quoted-printable parts.
        b"From: bob@remote.test\r\nTo: alice@example.test\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\nMessage-ID: <p2@remote.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n--outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n--inner\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n--inner\r\nContent-Type: text/html\r\n\r\n<p>caf&eacute;</p>\r\n--inner--\r\n--outer\r\nContent-Type: application/octet-stream; name=\"a.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAwQFBgcICQ==\r\n--outer--\r\n".to_vec(),
        // 8-bit body.
        "From: bob@remote.test\r\nTo: alice@example.test\r\nSubject: eight\r\nMessage-ID: <p3@remote.test>\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln\r\n".as_bytes().to_vec(),
    ]
}

/// Asserts `fetched` is `sent` behind trace headers only (Return-Path, Received).
fn assert_sent_plus_trace(fetched: &[u8], sent: &[u8]) {
    assert!(
        fetched.ends_with(sent),
        "the message changed:\n{}\n---\n{}",
        String::from_utf8_lossy(sent),
        String::from_utf8_lossy(fetched)
    );
    let prefix = String::from_utf8_lossy(&fetched[..fetched.len() - sent.len()]).to_string();
    assert!(
        prefix.starts_with("Return-Path: <bob@remote.test>\r\nReceived: "),
        "{prefix}"
    );
    for line in prefix.split("\r\n").filter(|l| !l.is_empty()) {
        assert!(
            line.starts_with("Return-Path:")
                || line.starts_with("Received:")
                || line.starts_with([' ', '\t']),
            "not a trace header: {line:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieve_top_uidl_and_delete_at_quit_with_poplib() {
    let server = TestServer::start().await;
    server
        .add_mailbox("alice@example.test", PASSWORD, serde_json::json!({}))
        .await;
    let sent = messages();
    for m in &sent {
        server.send_raw("alice@example.test", m).await;
    }
    server.wait_for_messages("alice@example.test", 3).await;
    let stored: Vec<Vec<u8>> = {
        let mut all = Vec::new();
        for uid in 1..=3 {
            all.push(server.raw("alice@example.test", uid).await);
        }
        all
    };

    let first = poplib(
        &server,
        &format!(
            r#"
p = poplib.POP3('127.0.0.1', PORT, timeout=20)
out = {{'welcome': p.getwelcome().decode()}}
out['capa'] = sorted(p.capa().keys())
p.user('alice@example.test')
p.pass_('{PASSWORD}')
out['stat'] = list(p.stat())
resp, listing, _ = p.list()
out['list'] = [l.decode() for l in listing]
resp, uidl, _ = p.uidl()
out['uidl'] = [l.decode() for l in uidl]
out['retr'] = []
for n in range(1, 4):
    resp, lines, octets = p.retr(n)
    data = b'\r\n'.join(lines) + b'\r\n'
    out['retr'].append({{'resp': resp.decode(), 'b64': base64.b64encode(data).decode(), 'octets': octets}})
resp, lines, _ = p.top(1, 1)
out['top'] = base64.b64encode(b'\r\n'.join(lines) + b'\r\n').decode()
out['dele'] = p.dele(1).decode()
out['quit'] = p.quit().decode()
print(json.dumps(out))
"#
        ),
    )
    .await;
    assert!(first["welcome"].as_str().unwrap().starts_with("+OK"));
    for capability in ["PIPELINING", "RESP-CODES", "SASL", "TOP", "UIDL", "USER"] {
        assert!(
            first["capa"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c == capability),
            "CAPA lacks {capability}: {}",
            first["capa"]
        );
    }
    let total: usize = stored.iter().map(Vec::len).sum();
    assert_eq!(first["stat"], serde_json::json!([3, total]));
    for (i, retr) in first["retr"].as_array().unwrap().iter().enumerate() {
        use base64::Engine;
        let fetched = base64::engine::general_purpose::STANDARD
            .decode(retr["b64"].as_str().unwrap())
            .unwrap();
        assert_eq!(fetched, stored[i], "RETR {} differs from the store", i + 1);
        // lettre ends DATA with "\r\n.\r\n" even after a final CRLF, so the message on
        // the wire has one more empty line than `sent` (see smtp_delivery.rs).
        assert_sent_plus_trace(&fetched, &[sent[i].as_slice(), b"\r\n"].concat());
        assert_eq!(
            first["list"][i].as_str().unwrap(),
            format!("{} {}", i + 1, fetched.len()),
            "LIST gives the exact size"
        );
    }
    {
        use base64::Engine;
        let top = base64::engine::general_purpose::STANDARD
            .decode(first["top"].as_str().unwrap())
            .unwrap();
        let top = String::from_utf8(top).unwrap();
        assert!(
            top.ends_with("Message-ID: <p1@remote.test>\r\n\r\n.starts with a dot\r\n"),
            "TOP 1 1 is the header and one body line: {top}"
        );
    }
    assert!(first["quit"].as_str().unwrap().starts_with("+OK"));

    // A second session: message 1 is gone (deleted at QUIT), the others keep their ids.
    let second = poplib(
        &server,
        &format!(
            r#"
p = poplib.POP3('127.0.0.1', PORT, timeout=20)
p.user('alice')
p.pass_('{PASSWORD}')
resp, uidl, _ = p.uidl()
out = {{'uidl': [l.decode() for l in uidl], 'stat': list(p.stat())}}
# A session that ends without QUIT deletes nothing.
p.dele(1)
p.sock.close()
print(json.dumps(out))
"#
        ),
    )
    .await;
    let ids = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().split_once(' ').unwrap().1.to_string())
            .collect()
    };
    let before = ids(&first["uidl"]);
    assert_eq!(ids(&second["uidl"]), before[1..].to_vec(), "UIDL is stable");
    assert_eq!(second["stat"][0], 2);
    assert_eq!(server.mailbox("alice@example.test").await.len(), 2);
    // The dropped session released its lock and deleted nothing.
    let third = poplib(
        &server,
        &format!(
            r#"
p = poplib.POP3('127.0.0.1', PORT, timeout=20)
p.user('alice@example.test')
p.pass_('{PASSWORD}')
print(json.dumps({{'stat': list(p.stat())}}))
p.quit()
"#
        ),
    )
    .await;
    assert_eq!(third["stat"][0], 2);
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_use_lock_auth_plain_disabled_recipient_and_failed_login_limit() {
    let server = TestServer::start().await;
    server
        .add_mailbox("carol@example.test", PASSWORD, serde_json::json!({}))
        .await;
    server
        .add_mailbox(
            "dave@example.test",
            PASSWORD,
            serde_json::json!({"protocols": ["pop3:off"]}),
        )
        .await;
    server
        .add_mailbox("erin@example.test", PASSWORD, serde_json::json!({}))
        .await;
    server.send_raw("carol@example.test", &messages()[0]).await;
    server.wait_for_messages("carol@example.test", 1).await;

    let out = poplib(
        &server,
        &format!(
            r#"
def err(f):
    try:
        f()
        return None
    except poplib.error_proto as e:
        return e.args[0].decode()
out = {{}}
a = poplib.POP3('127.0.0.1', PORT, timeout=20)
a.user('carol@example.test'); a.pass_('{PASSWORD}')
b = poplib.POP3('127.0.0.1', PORT, timeout=20)
b.user('carol@example.test')
out['in_use'] = err(lambda: b.pass_('{PASSWORD}'))
a.quit()
# Once the first session ended, the maildrop is free again; log in with AUTH PLAIN.
c = poplib.POP3('127.0.0.1', PORT, timeout=20)
token = base64.b64encode(b'\0carol@example.test\0{PASSWORD}').decode()
out['auth_plain'] = c._shortcmd('AUTH PLAIN ' + token).decode()
out['auth_stat'] = list(c.stat())
c.quit()
d = poplib.POP3('127.0.0.1', PORT, timeout=20)
d.user('dave@example.test')
out['disabled'] = err(lambda: d.pass_('{PASSWORD}'))
out['bad'] = []
for i in range(6):
    e = poplib.POP3('127.0.0.1', PORT, timeout=20)
    e.user('erin@example.test')
    out['bad'].append(err(lambda: e.pass_('wrong')))
    e.quit()
# The account is now refused even with its right password.
f = poplib.POP3('127.0.0.1', PORT, timeout=20)
f.user('erin@example.test')
out['locked'] = err(lambda: f.pass_('{PASSWORD}'))
print(json.dumps(out))
"#
        ),
    )
    .await;
    assert!(
        out["in_use"].as_str().unwrap().starts_with("-ERR [IN-USE]"),
        "{out}"
    );
    assert!(
        out["auth_plain"].as_str().unwrap().starts_with("+OK"),
        "{out}"
    );
    assert_eq!(out["auth_stat"][0], 1);
    assert_eq!(
        out["disabled"], "-ERR [AUTH] POP3 is disabled for this mailbox",
        "{out}"
    );
    let bad: Vec<&str> = out["bad"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        bad[..5]
            .iter()
            .all(|r| *r == "-ERR [AUTH] invalid user name or password"),
        "{bad:?}"
    );
    assert!(
        bad[5].starts_with("-ERR [AUTH] too many failed logins"),
        "{bad:?}"
    );
    assert!(
        out["locked"]
            .as_str()
            .unwrap()
            .starts_with("-ERR [AUTH] too many failed logins"),
        "{out}"
    );
    server.server.shutdown().await;
}

/// fetchmail (Debian's, installed by .ci/run) takes the mail home over POP3 and hands
/// each message to an MDA; it must get every message, byte for byte, and delete them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetchmail_takes_every_message_home() {
    if std::process::Command::new("fetchmail")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "fetchmail is missing; .ci/run installs it"
        );
        eprintln!("skipped: fetchmail is not installed (apt-get install fetchmail)");
        return;
    }
    let server = TestServer::start().await;
    server
        .add_mailbox("frank@example.test", PASSWORD, serde_json::json!({}))
        .await;
    let sent = messages();
    for m in &sent {
        server.send_raw("frank@example.test", m).await;
    }
    server.wait_for_messages("frank@example.test", 3).await;
    let mut stored = Vec::new();
    for uid in 1..=3 {
        stored.push(server.raw("frank@example.test", uid).await);
    }

    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("delivered");
    std::fs::create_dir(&out).unwrap();
    let rc = home.path().join("fetchmailrc");
    std::fs::write(
        &rc,
        format!(
            "set no syslog\n\
             poll 127.0.0.1 with proto POP3 port {port} auth password no envelope\n  \
             user \"frank@example.test\" there with password \"{PASSWORD}\" is \"frank\" here\n  \
             no keep sslproto '' mda \"/bin/sh -c 'cat > $(mktemp {dir}/msg.XXXXXX)'\"\n",
            port = server.server.pop3_addr.port(),
            dir = out.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o600)).unwrap();
    let output = tokio::process::Command::new("fetchmail")
        .arg("--fetchmailrc")
        .arg(&rc)
        .arg("--idfile")
        .arg(home.path().join("fetchids"))
        .arg("--pidfile")
        .arg(home.path().join("fetchmail.pid"))
        .env("HOME", home.path())
        .env("FETCHMAILHOME", home.path())
        .output()
        .await
        .expect("fetchmail runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "fetchmail failed:\n{log}");
    let mut delivered: Vec<Vec<u8>> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(
        delivered.len(),
        3,
        "fetchmail delivered {} messages:\n{log}",
        delivered.len()
    );
    // fetchmail hands messages to an MDA with LF line ends, keeps Return-Path on top
    // and adds its own Received header below it: every delivered file is the stored
    // message (LF form) with fetchmail's trace header inserted after Return-Path.
    delivered.sort();
    for original in &stored {
        let lf = String::from_utf8_lossy(original).replace("\r\n", "\n");
        let (return_path, rest) = lf.split_once('\n').unwrap();
        assert_eq!(return_path, "Return-Path: <bob@remote.test>");
        assert!(
            delivered.iter().any(|d| {
                let d = String::from_utf8_lossy(d);
                d.starts_with(return_path) && d.ends_with(rest)
            }),
            "no delivered file holds the stored message:\n{lf}\n{log}"
        );
    }
    assert!(
        server.mailbox("frank@example.test").await.is_empty(),
        "fetchmail deleted what it took (no keep)"
    );
    server.server.shutdown().await;
}
