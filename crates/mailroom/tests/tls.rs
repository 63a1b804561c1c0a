//! TLS on IMAP from outside, with clients we did not write: Python's `ssl` and
//! `imaplib` with certificate verification against the certificate the server serves,
//! and `openssl s_client`. STARTTLS and implicit TLS (IMAPS), LOGINDISABLED before TLS
//! where the policy says so, the STARTTLS command-injection class (CVE-2011-0411), and
//! certificates replaced under a running server.

mod common;

use common::TestServer;
use std::path::Path;

const PASSWORD: &str = "correct horse battery";

/// Runs a Python script with arguments; returns its stdout, failing with its stderr.
async fn python(script: &str, args: &[String]) -> String {
    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .await
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The client side, shared by the tests: an `ssl` context that trusts only `cafile`
/// and checks the name `mx.example.test` (the server's hostname in the test config).
const CLIENT: &str = r#"
import hashlib, imaplib, json, socket, ssl, sys
host, port, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=cafile)
ctx.minimum_version = ssl.TLSVersion.TLSv1_2
NAME = 'mx.example.test'

class IMAPS(imaplib.IMAP4_SSL):
    # Connect to the address, verify the certificate for the server's name.
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout)
        return self.ssl_context.wrap_socket(sock, server_hostname=NAME)

def fingerprint(sock):
    return hashlib.sha256(sock.getpeercert(binary_form=True)).hexdigest().upper()
"#;

fn colonless(fingerprint: &str) -> String {
    fingerprint.replace(':', "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaps_and_starttls_with_verified_certificates() {
    // Passwords only over TLS: the plain port says LOGINDISABLED until STARTTLS.
    let server = TestServer::start_with(
        |config| config.login.plaintext_auth = mailroom::config::PlaintextAuth::Never,
        mailroom::ServerOptions::default(),
    )
    .await;
    server
        .add_mailbox("ann@example.test", PASSWORD, serde_json::json!({}))
        .await;
    let tls = &server.server.tls;
    assert!(tls.is_self_signed());
    let served = tls.served();
    assert!(served[0].names.contains(&"mx.example.test".to_string()));
    let cafile = served[0].cert_file.to_str().unwrap().to_string();
    let script = format!(
        r#"{CLIENT}
out = {{}}
plain_port, tls_port = port, int(sys.argv[4])
m = imaplib.IMAP4(host, plain_port)
out['plain_caps'] = sorted(m.capabilities)
try:
    m.login('ann@example.test', '{PASSWORD}')
    out['plain_login'] = 'OK'
except imaplib.IMAP4.error as e:
    out['plain_login'] = str(e)
m.host = NAME  # the name starttls() verifies
typ, data = m.starttls(ssl_context=ctx)
out['starttls'] = typ
out['starttls_fingerprint'] = fingerprint(m.sock)
out['tls_caps'] = sorted(m.capabilities)
typ, _ = m.login('ann@example.test', '{PASSWORD}')
out['tls_login'] = typ
typ, data = m.select('INBOX')
out['select'] = typ
m.logout()
s = IMAPS(host, tls_port, ssl_context=ctx)
out['imaps_caps'] = sorted(s.capabilities)
out['imaps_fingerprint'] = fingerprint(s.sock)
out['imaps_version'] = s.sock.version()
typ, _ = s.login('ann@example.test', '{PASSWORD}')
out['imaps_login'] = typ
s.logout()
# A client that trusts another CA refuses the server: verification is real.
other = ssl.create_default_context()
try:
    raw = socket.create_connection((host, tls_port), 5)
    other.wrap_socket(raw, server_hostname=NAME)
    out['untrusted'] = 'accepted'
except ssl.SSLCertVerificationError:
    out['untrusted'] = 'refused'
# TLS 1.1 is not spoken.
old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
old.load_verify_locations(cafile)
old.maximum_version = ssl.TLSVersion.TLSv1_1
try:
    old.minimum_version = ssl.TLSVersion.TLSv1
    raw = socket.create_connection((host, tls_port), 5)
    old.wrap_socket(raw, server_hostname=NAME)
    out['tls11'] = 'accepted'
except (ssl.SSLError, ValueError, OSError):
    out['tls11'] = 'refused'
print(json.dumps(out))
"#
    );
    let out: serde_json::Value = serde_json::from_str(
        &python(
            &script,
            &[
                "127.0.0.1".into(),
                server.server.imap_addr.port().to_string(),
                cafile.clone(),
                server.server.imaps_addr.unwrap().port().to_string(),
            ],
        )
        .await,
    )
    .unwrap();
    let caps = |k: &str| -> Vec<String> {
        out[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let plain = caps("plain_caps");
    assert!(plain.contains(&"STARTTLS".into()), "{plain:?}");
    assert!(plain.contains(&"LOGINDISABLED".into()), "{plain:?}");
    assert!(!plain.contains(&"AUTH=PLAIN".into()), "{plain:?}");
    assert!(
        out["plain_login"]
            .as_str()
            .unwrap()
            .contains("PRIVACYREQUIRED"),
        "{out}"
    );
    assert_eq!(out["starttls"], "OK");
    // After STARTTLS the client asked again: no STARTTLS, no LOGINDISABLED.
    let after = caps("tls_caps");
    assert!(!after.contains(&"STARTTLS".into()), "{after:?}");
    assert!(!after.contains(&"LOGINDISABLED".into()), "{after:?}");
    assert!(after.contains(&"AUTH=PLAIN".into()), "{after:?}");
    assert_eq!(out["tls_login"], "OK");
    assert_eq!(out["select"], "OK");
    let imaps = caps("imaps_caps");
    assert!(!imaps.contains(&"STARTTLS".into()), "{imaps:?}");
    assert!(!imaps.contains(&"LOGINDISABLED".into()), "{imaps:?}");
    assert_eq!(out["imaps_login"], "OK");
    assert!(
        ["TLSv1.3", "TLSv1.2"].contains(&out["imaps_version"].as_str().unwrap()),
        "{out}"
    );
    // Both ports serve the certificate `mailroom tls show` describes.
    let expected = colonless(&served[0].sha256);
    assert_eq!(out["starttls_fingerprint"], expected.as_str());
    assert_eq!(out["imaps_fingerprint"], expected.as_str());
    assert_eq!(out["untrusted"], "refused");
    assert_eq!(out["tls11"], "refused");
    // `mailroom tls show` prints what is served: the administrator can compare the
    // fingerprint with what a client shows.
    let show = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args(["tls", "show", "--data"])
        .arg(&server.server.data_dir)
        .output()
        .await
        .unwrap();
    assert!(show.status.success());
    let show = String::from_utf8(show.stdout).unwrap();
    assert!(show.contains(&served[0].sha256), "{show}");
    assert!(
        show.contains("(self-signed, made at first start)"),
        "{show}"
    );
    assert!(show.contains("days left"), "{show}");
    server.server.shutdown().await;
}

/// CVE-2011-0411: a command pipelined after STARTTLS, in the clear, must not run inside
/// the encrypted session (a man in the middle could inject it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_sent_with_starttls_in_the_clear_are_dropped() {
    let server = TestServer::start().await;
    server
        .add_mailbox("ann@example.test", PASSWORD, serde_json::json!({}))
        .await;
    let cafile = server.server.tls.served()[0]
        .cert_file
        .to_str()
        .unwrap()
        .to_string();
    let script = format!(
        r#"{CLIENT}
raw = socket.create_connection((host, port), 5)
f = raw.makefile('rb')
greeting = f.readline()
# STARTTLS and a LOGIN in one packet, as an attacker in the path would add it.
raw.sendall(b'a STARTTLS\r\nb LOGIN ann@example.test "{PASSWORD}"\r\n')
answer = f.readline()
tls = ctx.wrap_socket(raw, server_hostname=NAME)
g = tls.makefile('rb')
tls.sendall(b"c NOOP\r\n")
lines = []
while True:
    line = g.readline().decode().rstrip('\r\n')
    lines.append(line)
    if line.startswith('c '):
        break
tls.sendall(b"d SELECT INBOX\r\n")
while True:
    line = g.readline().decode().rstrip('\r\n')
    lines.append(line)
    if line.startswith('d '):
        break
print(json.dumps({{'answer': answer.decode().rstrip(), 'lines': lines}}))
"#
    );
    let out: serde_json::Value = serde_json::from_str(
        &python(
            &script,
            &[
                "127.0.0.1".into(),
                server.server.imap_addr.port().to_string(),
                cafile,
            ],
        )
        .await,
    )
    .unwrap();
    assert_eq!(out["answer"], "a OK Begin TLS negotiation now");
    let lines: Vec<String> = out["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    assert!(
        lines.iter().all(|l| !l.starts_with("b ")),
        "the injected LOGIN was answered: {lines:?}"
    );
    assert_eq!(lines[0], "c OK done", "{lines:?}");
    // Not logged in: the injected LOGIN never ran.
    assert_eq!(lines.last().unwrap(), "d BAD log in first", "{lines:?}");
    server.server.shutdown().await;
}

/// Writes a fresh self-signed certificate for `name` to `cert` and `key`.
fn write_certificate(name: &str, cert: &Path, key: &Path) {
    let certified = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    std::fs::write(cert, certified.cert.pem()).unwrap();
    std::fs::write(key, certified.signing_key.serialize_pem()).unwrap();
}

/// Configured certificates chosen by SNI, replaced under the running server: new
/// handshakes get the new certificate, a session already encrypted keeps going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_certificates_by_sni_and_replaced_without_dropping_sessions() {
    let certs = tempfile::tempdir().unwrap();
    let (main_cert, main_key) = (certs.path().join("main.pem"), certs.path().join("main.key"));
    let (other_cert, other_key) = (
        certs.path().join("other.pem"),
        certs.path().join("other.key"),
    );
    write_certificate("mx.example.test", &main_cert, &main_key);
    write_certificate("imap.other.test", &other_cert, &other_key);
    let configured = vec![
        mailroom::config::CertificatePair {
            cert: main_cert.clone(),
            key: main_key.clone(),
        },
        mailroom::config::CertificatePair {
            cert: other_cert.clone(),
            key: other_key.clone(),
        },
    ];
    let server = TestServer::start_with(
        move |config| config.tls.certificates = configured,
        mailroom::ServerOptions::default(),
    )
    .await;
    server
        .add_mailbox("ann@example.test", PASSWORD, serde_json::json!({}))
        .await;
    let tls = server.server.tls.clone();
    assert!(!tls.is_self_signed());
    let before = tls.served();
    assert_eq!(before.len(), 2);
    let port = server.server.imaps_addr.unwrap().port().to_string();
    // The fingerprint a handshake asking for `name` gets, trusting `cafile`.
    let handshake = |name: &'static str, cafile: &Path| {
        let script = format!(
            r#"{CLIENT}
raw = socket.create_connection((host, port), 5)
print(fingerprint(ctx.wrap_socket(raw, server_hostname='{name}')))
"#
        );
        let args = vec![
            "127.0.0.1".to_string(),
            port.clone(),
            cafile.to_str().unwrap().to_string(),
        ];
        async move { python(&script, &args).await.trim().to_string() }
    };
    assert_eq!(
        handshake("mx.example.test", &main_cert).await,
        colonless(&before[0].sha256)
    );
    assert_eq!(
        handshake("imap.other.test", &other_cert).await,
        colonless(&before[1].sha256)
    );
    // A session encrypted before the change.
    let mut kept = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            r#"{CLIENT}
m = IMAPS(host, port, ssl_context=ctx)
m.login('ann@example.test', '{PASSWORD}')
print('logged-in', flush=True)
sys.stdin.readline()
typ, _ = m.noop()
print(typ, flush=True)
m.logout()
"#
        ))
        .args(["127.0.0.1", &port, main_cert.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(kept.stdout.take().unwrap());
    let mut line = String::new();
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    stdout.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim(), "logged-in");
    // The main certificate is replaced (a renewal): the server notices the files.
    let renewed = certs.path().join("renewed");
    std::fs::create_dir(&renewed).unwrap();
    write_certificate(
        "mx.example.test",
        &renewed.join("c.pem"),
        &renewed.join("c.key"),
    );
    std::fs::copy(renewed.join("c.pem"), &main_cert).unwrap();
    std::fs::copy(renewed.join("c.key"), &main_key).unwrap();
    let reloaded = common::eventually(std::time::Duration::from_secs(20), async || {
        tls.served()[0].sha256 != before[0].sha256
    })
    .await;
    assert!(reloaded, "the renewed certificate was not loaded");
    let after = tls.served();
    assert_eq!(
        handshake("mx.example.test", &main_cert).await,
        colonless(&after[0].sha256),
        "a new handshake gets the renewed certificate"
    );
    // The session from before is still there.
    let mut stdin = kept.stdin.take().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    line.clear();
    stdout.read_line(&mut line).await.unwrap();
    assert_eq!(
        line.trim(),
        "OK",
        "the session encrypted before the renewal"
    );
    assert!(kept.wait().await.unwrap().success());
    server.server.shutdown().await;
}

/// POP3: STLS (RFC 2595) and POP3S with Python's poplib, passwords only over TLS, and a
/// command pipelined after STLS in the clear dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_stls_and_pop3s() {
    let server = TestServer::start_with(
        |config| config.login.plaintext_auth = mailroom::config::PlaintextAuth::Never,
        mailroom::ServerOptions::default(),
    )
    .await;
    server
        .add_mailbox("ann@example.test", PASSWORD, serde_json::json!({}))
        .await;
    server
        .send_raw(
            "ann@example.test",
            b"From: b@example.test\r\nSubject: hello\r\n\r\nover TLS\r\n",
        )
        .await;
    server.wait_for_messages("ann@example.test", 1).await;
    let cafile = server.server.tls.served()[0]
        .cert_file
        .to_str()
        .unwrap()
        .to_string();
    let script = format!(
        r#"{CLIENT}
import poplib
out = {{}}
tls_port = int(sys.argv[4])
p = poplib.POP3(host, port)
out['plain_capa'] = sorted(p.capa().keys())
try:
    p.user('ann@example.test')
    out['plain_user'] = 'accepted'
except poplib.error_proto as e:
    out['plain_user'] = str(e)
p.host = NAME  # the name stls() verifies
p.stls(context=ctx)
out['stls_fingerprint'] = fingerprint(p.sock)
out['tls_capa'] = sorted(p.capa().keys())
p.user('ann@example.test')
p.pass_('{PASSWORD}')
out['stat'] = list(p.stat())
p.quit()
class POP3S(poplib.POP3_SSL):
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout)
        return self.context.wrap_socket(sock, server_hostname=NAME)
s = POP3S(host, tls_port, context=ctx)
s.user('ann@example.test')
s.pass_('{PASSWORD}')
out['pop3s_retr'] = b'\n'.join(s.retr(1)[1]).decode()
s.quit()
# STLS and a USER in one packet: the USER must not be answered inside TLS.
raw = socket.create_connection((host, port), 5)
f = raw.makefile('rb')
f.readline()
raw.sendall(b'STLS\r\nUSER ann@example.test\r\n')
out['stls_answer'] = f.readline().decode().rstrip()
tls = ctx.wrap_socket(raw, server_hostname=NAME)
g = tls.makefile('rb')
tls.sendall(b'NOOP\r\n')
out['after'] = g.readline().decode().rstrip()
print(json.dumps(out))
"#
    );
    let out: serde_json::Value = serde_json::from_str(
        &python(
            &script,
            &[
                "127.0.0.1".into(),
                server.server.pop3_addr.port().to_string(),
                cafile,
                server.server.pop3s_addr.unwrap().port().to_string(),
            ],
        )
        .await,
    )
    .unwrap();
    let capa = |k: &str| -> Vec<String> {
        out[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert!(capa("plain_capa").contains(&"STLS".into()), "{out}");
    assert!(!capa("plain_capa").contains(&"USER".into()), "{out}");
    assert!(
        out["plain_user"].as_str().unwrap().contains("[AUTH]"),
        "{out}"
    );
    assert_eq!(
        out["stls_fingerprint"],
        colonless(&server.server.tls.served()[0].sha256).as_str()
    );
    assert!(!capa("tls_capa").contains(&"STLS".into()), "{out}");
    assert!(capa("tls_capa").contains(&"USER".into()), "{out}");
    assert_eq!(out["stat"][0], 1);
    assert!(
        out["pop3s_retr"].as_str().unwrap().contains("over TLS"),
        "{out}"
    );
    assert_eq!(out["stls_answer"], "+OK Begin TLS negotiation");
    // NOOP before login is an error; had the injected USER run, it would say "send PASS".
    assert_eq!(out["after"], "-ERR log in first", "{out}");
    server.server.shutdown().await;
}

/// SMTP STARTTLS (RFC 3207) with Python's smtplib verifying the certificate: the
/// message arrives with `ESMTPS` in its Received header; a command pipelined with
/// STARTTLS in the clear is not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_starttls() {
    let server = TestServer::start().await;
    server
        .add_mailbox("ann@example.test", PASSWORD, serde_json::json!({}))
        .await;
    let cafile = server.server.tls.served()[0]
        .cert_file
        .to_str()
        .unwrap()
        .to_string();
    let script = format!(
        r#"{CLIENT}
import smtplib
out = {{}}
s = smtplib.SMTP(host, port, local_hostname='client.test')
s.ehlo()
out['plain_ehlo'] = sorted(s.esmtp_features.keys())
s._host = NAME  # the name starttls() verifies
code, _ = s.starttls(context=ctx)
out['starttls'] = code
out['fingerprint'] = fingerprint(s.sock)
s.ehlo()
out['tls_ehlo'] = sorted(s.esmtp_features.keys())
s.sendmail('b@remote.test', ['ann@example.test'], b'Subject: secret\r\n\r\nover TLS\r\n')
s.quit()
# STARTTLS and a MAIL in one packet.
raw = socket.create_connection((host, port), 5)
f = raw.makefile('rb')
f.readline()
raw.sendall(b'EHLO client.test\r\n')
while True:
    line = f.readline()
    if line[3:4] == b' ':
        break
raw.sendall(b'STARTTLS\r\nMAIL FROM:<evil@remote.test>\r\n')
out['starttls_raw'] = f.readline().decode().rstrip()
tls = ctx.wrap_socket(raw, server_hostname=NAME)
g = tls.makefile('rb')
tls.sendall(b'RCPT TO:<ann@example.test>\r\n')
out['after'] = g.readline().decode().rstrip()
print(json.dumps(out))
"#
    );
    let out: serde_json::Value = serde_json::from_str(
        &python(
            &script,
            &[
                "127.0.0.1".into(),
                server.server.smtp_addr.port().to_string(),
                cafile,
            ],
        )
        .await,
    )
    .unwrap();
    let features = |k: &str| -> Vec<String> {
        out[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert!(features("plain_ehlo").contains(&"starttls".into()), "{out}");
    assert_eq!(out["starttls"], 220);
    assert!(!features("tls_ehlo").contains(&"starttls".into()), "{out}");
    assert_eq!(
        out["fingerprint"],
        colonless(&server.server.tls.served()[0].sha256).as_str()
    );
    assert_eq!(out["starttls_raw"], "220 2.0.0 Ready to start TLS");
    // RCPT without a MAIL: had the injected MAIL run, RCPT would be accepted.
    assert!(
        out["after"].as_str().unwrap().starts_with("503 5.5.1"),
        "{out}"
    );
    let messages = server.wait_for_messages("ann@example.test", 1).await;
    let raw = server.raw("ann@example.test", messages[0].uid).await;
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.contains("with ESMTPS id"), "{raw}");
    server.server.shutdown().await;
}

/// Mail submission (RFC 6409 on the submission port, RFC 8314 on SMTPS) with Python's
/// smtplib: AUTH only over TLS when the policy says so, AUTH PLAIN and LOGIN, relay
/// for the authenticated user, its own addresses only, Message-ID and Date added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submission_with_auth_over_tls() {
    let server = TestServer::start_with(
        |config| config.login.plaintext_auth = mailroom::config::PlaintextAuth::Never,
        mailroom::ServerOptions::default(),
    )
    .await;
    server
        .add_mailbox("ann@example.test", PASSWORD, serde_json::json!({}))
        .await;
    server
        .add_mailbox("bob@example.test", PASSWORD, serde_json::json!({}))
        .await;
    // A shared mailbox ann is granted "send as" (Exchange's Send As).
    server.add_recipients(&["sales@example.test"]).await;
    let shown = server
        .cli(&["recipient", "modify", "sales", "--send-as", "ann"])
        .await;
    assert!(
        shown.contains("send as:") && shown.contains("ann"),
        "{shown}"
    );
    let cafile = server.server.tls.served()[0]
        .cert_file
        .to_str()
        .unwrap()
        .to_string();
    let script = format!(
        r#"{CLIENT}
import smtplib
out = {{}}
submission, smtps, mx = port, int(sys.argv[4]), int(sys.argv[5])
s = smtplib.SMTP(host, submission, local_hostname='client.test')
s.ehlo()
out['plain_ehlo'] = sorted(s.esmtp_features.keys())
out['plain_auth'] = list(s.docmd('AUTH', 'PLAIN AGFubgBzZWNyZXQ='))
out['plain_mail'] = list(s.docmd('MAIL', 'FROM:<ann@example.test>'))
s._host = NAME
s.starttls(context=ctx)
s.ehlo()
out['tls_auth'] = s.esmtp_features.get('auth', '')
try:
    s.login('ann@example.test', 'wrong password')
    out['wrong'] = 'accepted'
except smtplib.SMTPAuthenticationError as e:
    out['wrong'] = [e.smtp_code, e.smtp_error.decode()]
s.user, s.password = 'ann@example.test', '{PASSWORD}'
code, _ = s.auth('LOGIN', s.auth_login, initial_response_ok=False)
out['login'] = code
# Someone else's address as the sender.
try:
    s.sendmail('bob@example.test', ['bob@example.test'], b'Subject: forged\r\n\r\nx\r\n')
    out['forged'] = 'accepted'
except smtplib.SMTPSenderRefused as e:
    out['forged'] = [e.smtp_code, e.smtp_error.decode()]
# An address ann was granted "send as".
out['send_as'] = s.sendmail('sales@example.test', ['bob@example.test'],
                            b'Subject: as sales\r\n\r\nhello from sales\r\n')
# No Message-ID, no Date: submission adds them. A remote recipient: relayed.
refused = s.sendmail('ann@example.test', ['bob@example.test', 'carol@remote.test'],
                     b'Subject: from a client\r\n\r\nhello Bob\r\n')
out['refused'] = {{k: list(v) for k, v in refused.items()}}
s.quit()
class SMTPS(smtplib.SMTP_SSL):
    def _get_socket(self, host, port, timeout):
        sock = socket.create_connection((host, port), timeout)
        return self.context.wrap_socket(sock, server_hostname=NAME)
t = SMTPS(host, smtps, context=ctx, local_hostname='client.test')
t.login('ann@example.test', '{PASSWORD}')  # PLAIN
t.sendmail('ann@example.test', ['bob@example.test'],
           b'Subject: over SMTPS\r\nMessage-ID: <kept@client.test>\r\n\r\nhi\r\n')
t.quit()
m = smtplib.SMTP(host, mx, local_hostname='client.test')
m.ehlo()
out['mx_auth_feature'] = m.has_extn('auth')
out['mx_auth'] = list(m.docmd('AUTH', 'PLAIN AGFubgBzZWNyZXQ='))
m.quit()
print(json.dumps(out, default=lambda b: b.decode()))
"#
    );
    let out: serde_json::Value = serde_json::from_str(
        &python(
            &script,
            &[
                "127.0.0.1".into(),
                server.server.submission_addr.unwrap().port().to_string(),
                cafile,
                server.server.submissions_addr.unwrap().port().to_string(),
                server.server.smtp_addr.port().to_string(),
            ],
        )
        .await,
    )
    .unwrap();
    let plain_ehlo: Vec<&str> = out["plain_ehlo"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(plain_ehlo.contains(&"starttls"), "{out}");
    assert!(!plain_ehlo.contains(&"auth"), "no AUTH before TLS: {out}");
    assert_eq!(out["plain_auth"][0], 538, "{out}");
    assert_eq!(out["plain_mail"][0], 530, "{out}");
    assert_eq!(out["tls_auth"].as_str().unwrap().trim(), "PLAIN LOGIN");
    assert_eq!(out["wrong"][0], 535, "{out}");
    assert!(
        out["wrong"][1].as_str().unwrap().starts_with("5.7.8"),
        "{out}"
    );
    assert_eq!(out["login"], 235);
    assert_eq!(out["forged"][0], 553, "{out}");
    assert!(
        out["forged"][1]
            .as_str()
            .unwrap()
            .contains("not owned by user ann@example.test"),
        "{out}"
    );
    assert_eq!(out["refused"], serde_json::json!({}), "{out}");
    assert_eq!(out["send_as"], serde_json::json!({}), "{out}");
    assert_eq!(out["mx_auth_feature"], false);
    assert_eq!(out["mx_auth"][0], 503, "{out}");
    let messages = server.wait_for_messages("bob@example.test", 3).await;
    let mut raws = Vec::new();
    for m in &messages {
        raws.push(
            String::from_utf8_lossy(&server.raw("bob@example.test", m.uid).await).into_owned(),
        );
    }
    let submitted = raws
        .iter()
        .find(|r| r.contains("Subject: from a client"))
        .expect("the submitted message");
    assert!(submitted.contains("with ESMTPSA id"), "{submitted}");
    assert!(
        submitted.contains("@mx.example.test>\r\n"),
        "Message-ID added: {submitted}"
    );
    assert!(submitted.contains("\r\nDate: "), "Date added: {submitted}");
    let as_sales = raws
        .iter()
        .find(|r| r.contains("Subject: as sales"))
        .expect("the message sent as sales");
    assert!(
        as_sales.contains("Return-Path: <sales@example.test>"),
        "{as_sales}"
    );
    let kept = raws
        .iter()
        .find(|r| r.contains("Subject: over SMTPS"))
        .expect("the SMTPS message");
    assert!(kept.contains("Message-ID: <kept@client.test>"), "{kept}");
    assert_eq!(kept.matches("Message-ID:").count(), 1, "{kept}");
    assert!(kept.contains("with ESMTPSA id"), "{kept}");
    // The remote recipient went to the outbound queue (held in the tests).
    let queues = server.queues().await;
    let outbound = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "outbound")
        .unwrap()
        .clone();
    assert_eq!(outbound["depth"], 1, "{queues}");
    server.server.shutdown().await;
}

/// Runs a program and returns (success, stdout and stderr together).
async fn run(program: &str, args: &[String], stdin: &[u8]) -> (bool, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e} (Debian: swaks, openssl)"));
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    let output = child.wait_with_output().await.unwrap();
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// Clients we did not write, as administrators test a server: swaks submitting with
/// STARTTLS, certificate verification and AUTH, and OpenSSL's s_client checking the
/// certificate every TLS port serves, by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_and_openssl_s_client() {
    let server = TestServer::start().await;
    server
        .add_mailbox("ann@example.test", PASSWORD, serde_json::json!({}))
        .await;
    server
        .add_mailbox("bob@example.test", PASSWORD, serde_json::json!({}))
        .await;
    let cafile = server.server.tls.served()[0]
        .cert_file
        .to_str()
        .unwrap()
        .to_string();
    let swaks = |password: &str| {
        [
            "--server",
            &server.server.submission_addr.unwrap().to_string(),
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            &cafile,
            "--tls-sni",
            "mx.example.test",
            "--auth",
            "PLAIN",
            "--auth-user",
            "ann@example.test",
            "--auth-password",
            password,
            "--from",
            "ann@example.test",
            "--to",
            "bob@example.test",
            "--header",
            "Subject: via swaks",
            "--body",
            "hello from swaks",
        ]
        .map(String::from)
        .to_vec()
    };
    let (ok, text) = run("swaks", &swaks(PASSWORD), b"").await;
    assert!(ok, "{text}");
    assert!(text.contains("<-  220 2.0.0 Ready to start TLS"), "{text}");
    assert!(
        text.contains("<~  235 2.7.0 Authentication successful"),
        "{text}"
    );
    assert!(text.contains("<~  250 2.0.0 Ok: queued as"), "{text}");
    let (ok, text) = run("swaks", &swaks("wrong"), b"").await;
    assert!(!ok, "{text}");
    assert!(text.contains("535 5.7.8"), "{text}");
    let messages = server.wait_for_messages("bob@example.test", 1).await;
    let raw = server.raw("bob@example.test", messages[0].uid).await;
    assert!(String::from_utf8_lossy(&raw).contains("with ESMTPSA id"));
    // s_client: each port's certificate verifies for the server's name.
    let addr = |a: std::net::SocketAddr| a.to_string();
    for (port, starttls, goodbye) in [
        (
            addr(server.server.smtp_addr),
            Some("smtp"),
            &b"QUIT\r\n"[..],
        ),
        (addr(server.server.imap_addr), Some("imap"), b"a LOGOUT\r\n"),
        (
            addr(server.server.imaps_addr.unwrap()),
            None,
            b"a LOGOUT\r\n",
        ),
        (addr(server.server.pop3_addr), Some("pop3"), b"QUIT\r\n"),
        (addr(server.server.pop3s_addr.unwrap()), None, b"QUIT\r\n"),
        (
            addr(server.server.submissions_addr.unwrap()),
            None,
            b"QUIT\r\n",
        ),
    ] {
        let mut args = vec![
            "s_client".to_string(),
            "-connect".into(),
            port.clone(),
            "-CAfile".into(),
            cafile.clone(),
            "-verify_return_error".into(),
            "-verify_hostname".into(),
            "mx.example.test".into(),
            "-servername".into(),
            "mx.example.test".into(),
            "-ign_eof".into(),
        ];
        if let Some(protocol) = starttls {
            args.extend(["-starttls".to_string(), protocol.to_string()]);
        }
        let (ok, text) = run("openssl", &args, goodbye).await;
        assert!(ok, "{port} {starttls:?}: {text}");
        assert!(
            text.contains("Verify return code: 0 (ok)"),
            "{port}: {text}"
        );
        assert!(
            text.contains("TLSv1.3") || text.contains("TLSv1.2"),
            "{port}: {text}"
        );
    }
    server.server.shutdown().await;
}
