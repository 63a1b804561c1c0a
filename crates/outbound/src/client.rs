//! The SMTP client: one connection to a next hop, one transaction at a time, a result per
//! recipient.
//!
//! Why our own client on `smtp-proto` rather than `lettre` or `mail-send`: both treat a
//! refused recipient as a failed send, and a relay must keep going with the recipients
//! that were accepted and report each refusal with its own reply (RFC 5321 §3.3, and the
//! DSN per recipient). `smtp-proto` parses replies and EHLO capabilities; this module only
//! orders the commands: EHLO (HELO if refused), then MAIL, every RCPT and DATA in one
//! write when PIPELINING is offered (RFC 2920), BDAT when CHUNKING is (RFC 3030), and
//! SIZE, 8BITMIME, SMTPUTF8 and DSN parameters when offered, and STARTTLS (RFC 3207)
//! whenever the next hop offers it: opportunistic TLS. The certificate is checked
//! against the trusted roots and the result recorded, but an unverifiable certificate
//! does not stop delivery (without MTA-STS or DANE nothing says it should: RFC 7435); a
//! handshake that fails makes the connection start over in the clear, once.

use smtp_proto::response::parser::ResponseReceiver;
use smtp_proto::{EXT_8BIT_MIME, EXT_CHUNKING, EXT_DSN, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8};
use smtp_proto::{EhloResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// How the session with a next hop was protected, for the logs, the metrics and the
/// recipient states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsOutcome {
    /// Not offered (or no TLS configured): in the clear.
    Plain,
    /// Encrypted; whether the certificate verified against the trusted roots for the
    /// host's name.
    Encrypted {
        /// `TLSv1_3` or `TLSv1_2`.
        version: String,
        /// The certificate chains to a trusted root and names the host.
        verified: bool,
    },
    /// STARTTLS was offered but the handshake failed: sent in the clear.
    Failed(String),
}

impl Connection {
    /// The host name this connection was opened for (what its certificate was checked
    /// against).
    pub fn remote(&self) -> &str {
        &self.remote
    }
}

impl TlsOutcome {
    /// Encrypted with a certificate that verified for the host's name.
    pub fn verified(&self) -> bool {
        matches!(self, TlsOutcome::Encrypted { verified: true, .. })
    }
}

impl std::fmt::Display for TlsOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsOutcome::Plain => f.write_str("no TLS (not offered)"),
            TlsOutcome::Encrypted { version, verified } => write!(
                f,
                "{version}, certificate {}",
                if *verified {
                    "verified"
                } else {
                    "not verified"
                }
            ),
            TlsOutcome::Failed(why) => write!(f, "TLS failed ({why}); sent in the clear"),
        }
    }
}

impl TlsOutcome {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            TlsOutcome::Plain => "plain",
            TlsOutcome::Encrypted { verified: true, .. } => "tls-verified",
            TlsOutcome::Encrypted {
                verified: false, ..
            } => "tls-unverified",
            TlsOutcome::Failed(_) => "tls-failed",
        }
    }
}

/// The roots outbound TLS verifies certificates against (the system's, plus any the
/// configuration adds).
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// Trusted roots.
    pub roots: Arc<rustls::RootCertStore>,
}

/// Accepts any certificate (opportunistic TLS must not refuse), and notes whether the
/// standard verification would have passed.
#[derive(Debug)]
struct Noting {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    verified: Arc<std::sync::atomic::AtomicBool>,
    schemes: Vec<rustls::SignatureScheme>,
}

impl rustls::client::danger::ServerCertVerifier for Noting {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ok = rustls::client::danger::ServerCertVerifier::verify_server_cert(
            &*self.inner,
            end_entity,
            intermediates,
            server_name,
            ocsp,
            now,
        )
        .is_ok();
        self.verified
            .store(ok, std::sync::atomic::Ordering::Relaxed);
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::client::danger::ServerCertVerifier::verify_tls12_signature(
            &*self.inner,
            message,
            cert,
            dss,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::client::danger::ServerCertVerifier::verify_tls13_signature(
            &*self.inner,
            message,
            cert,
            dss,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.schemes.clone()
    }
}

impl ClientTls {
    /// Encrypts `stream` for `host`; the outcome says whether the certificate verified.
    async fn connect(
        &self,
        stream: mailroom_tls::BoxedIo,
        host: &str,
        wait: Duration,
    ) -> Result<(mailroom_tls::BoxedIo, TlsOutcome, Vec<Vec<u8>>), String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let verified = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let noting = Noting {
            schemes: rustls::client::danger::ServerCertVerifier::supported_verify_schemes(&*inner),
            inner,
            verified: verified.clone(),
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(noting))
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host} is not a name TLS can check: {e}"))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let encrypted = timeout(wait, connector.connect(name, stream))
            .await
            .map_err(|_| "the TLS handshake timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let version = encrypted
            .get_ref()
            .1
            .protocol_version()
            .map_or("TLS".to_string(), |v| format!("{v:?}"));
        let outcome = TlsOutcome::Encrypted {
            version,
            verified: verified.load(std::sync::atomic::Ordering::Relaxed),
        };
        let chain = encrypted
            .get_ref()
            .1
            .peer_certificates()
            .map(|chain| chain.iter().map(|der| der.to_vec()).collect())
            .unwrap_or_default();
        Ok((Box::new(encrypted), outcome, chain))
    }
}

/// How a failed TLS handshake is told apart from other network failures inside
/// [`Connection::open`].
const TLS_FAILED: &str = "TLS handshake failed: ";

/// A reply from the next hop: code, enhanced status (when given) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit reply code.
    pub code: u16,
    /// Enhanced status code (`5.1.1`) if the server sent one.
    pub status: Option<String>,
    /// The text, lines joined by spaces.
    pub text: String,
}

impl Reply {
    fn from_response(r: Response<String>) -> Reply {
        let status = (r.esc[0] != 0).then(|| format!("{}.{}.{}", r.esc[0], r.esc[1], r.esc[2]));
        Reply {
            code: r.code,
            status,
            text: r.message.replace(['\r', '\n'], " ").trim().to_string(),
        }
    }

    /// Whether the code means success (2xx, or 3xx where that is the next step).
    pub fn positive(&self) -> bool {
        self.code < 400
    }

    /// Whether the code is a permanent refusal (5xx).
    pub fn permanent(&self) -> bool {
        self.code >= 500
    }

    /// The enhanced status to report, the server's or one derived from the code.
    pub fn status_or(&self, permanent: &str, temporary: &str) -> String {
        self.status.clone().unwrap_or_else(|| {
            if self.code >= 500 {
                permanent.into()
            } else if self.code >= 400 {
                temporary.into()
            } else {
                "2.0.0".into()
            }
        })
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.status {
            Some(s) => write!(f, "{} {} {}", self.code, s, self.text),
            None => write!(f, "{} {}", self.code, self.text),
        }
    }
}

/// Why a connection or transaction failed as a whole.
#[derive(Debug, Clone)]
pub enum Failure {
    /// Could not connect, timed out, or the connection broke: try again later.
    Network(String),
    /// The server refused the session or the transaction (its reply says how long for).
    Refused(Reply),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Network(e) => f.write_str(e),
            Failure::Refused(r) => write!(f, "{r}"),
        }
    }
}

/// One recipient with what to tell the next hop.
#[derive(Debug, Clone)]
pub struct Rcpt {
    /// Envelope address.
    pub address: String,
    /// `NOTIFY=` value, when the sender gave one (passed on only if DSN is offered).
    pub notify: Option<String>,
    /// `ORCPT=` value, as given.
    pub orcpt: Option<String>,
}

/// The envelope and message of one transaction.
pub struct Transaction<'a> {
    /// Reverse path ("" for the null sender).
    pub mail_from: &'a str,
    /// `RET=FULL` / `RET=HDRS`, passed on when DSN is offered.
    pub ret: Option<&'a str>,
    /// `ENVID=`, passed on when DSN is offered.
    pub env_id: Option<&'a str>,
    /// The recipients.
    pub rcpts: &'a [Rcpt],
    /// The message, CRLF line ends.
    pub body: &'a [u8],
}

/// How long each step may take (RFC 5321 §4.5.3.2 gives minimums of minutes; ours are
/// configurable).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect plus greeting.
    pub connect: Duration,
    /// Each command's reply.
    pub command: Duration,
    /// The reply after the message data.
    pub data: Duration,
}

/// An open SMTP session with one server.
pub struct Connection {
    stream: mailroom_tls::BoxedIo,
    /// How this session is protected.
    pub tls: TlsOutcome,
    buffer: Vec<u8>,
    /// How much of `buffer` is known to be continuation lines (`250-...`) of the reply
    /// being read, so each byte is scanned once however the next hop splits its reply.
    scanned: usize,
    /// The server's name from its greeting line, for DSNs (`Remote-MTA`).
    pub remote: String,
    /// The next hop's certificate chain (DER, end entity first) when the session is
    /// encrypted, for DANE.
    pub peer_certificates: Vec<Vec<u8>>,
    capabilities: u32,
    size_max: usize,
    timeouts: Timeouts,
    /// Bumped at every reply, so the watchdog sees a slow but live session move.
    progress: Option<std::sync::Arc<mailroom_watch::Probe>>,
}

fn xtext(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

impl Connection {
    /// Connects, reads the greeting, says EHLO (HELO when EHLO is refused) and, with
    /// `tls`, upgrades with STARTTLS when offered. A failed handshake connects again and
    /// goes on in the clear, with the failure in [`Connection::tls`].
    pub async fn open(
        addr: SocketAddr,
        remote: &str,
        helo: &str,
        timeouts: Timeouts,
        progress: Option<std::sync::Arc<mailroom_watch::Probe>>,
        tls: Option<&ClientTls>,
    ) -> Result<Connection, Failure> {
        match Connection::open_once(addr, remote, helo, timeouts, progress.clone(), tls).await {
            Err(Failure::Network(why)) if why.starts_with(TLS_FAILED) => {
                let mut c =
                    Connection::open_once(addr, remote, helo, timeouts, progress, None).await?;
                c.tls = TlsOutcome::Failed(why[TLS_FAILED.len()..].to_string());
                Ok(c)
            }
            other => other,
        }
    }

    async fn open_once(
        addr: SocketAddr,
        remote: &str,
        helo: &str,
        timeouts: Timeouts,
        progress: Option<std::sync::Arc<mailroom_watch::Probe>>,
        tls: Option<&ClientTls>,
    ) -> Result<Connection, Failure> {
        let stream = timeout(timeouts.connect, TcpStream::connect(addr))
            .await
            .map_err(|_| Failure::Network(format!("connecting to {remote} ({addr}) timed out")))?
            .map_err(|e| Failure::Network(format!("cannot connect to {remote} ({addr}): {e}")))?;
        let _ = stream.set_nodelay(true);
        let mut c = Connection {
            stream: Box::new(stream),
            tls: TlsOutcome::Plain,
            peer_certificates: Vec::new(),
            buffer: Vec::new(),
            scanned: 0,
            remote: remote.to_string(),
            capabilities: 0,
            size_max: 0,
            timeouts,
            progress,
        };
        let greeting = c.reply(timeouts.connect).await?;
        if greeting.code != 220 {
            return Err(Failure::Refused(greeting));
        }
        c.send(format!("EHLO {helo}\r\n").as_bytes()).await?;
        let ehlo = c.ehlo().await?;
        match ehlo {
            Ok(ehlo) => {
                c.capabilities = ehlo.capabilities;
                c.size_max = ehlo.size;
            }
            Err(refused) if refused.code >= 500 => {
                c.send(format!("HELO {helo}\r\n").as_bytes()).await?;
                let reply = c.reply(timeouts.command).await?;
                if reply.code != 250 {
                    return Err(Failure::Refused(reply));
                }
            }
            Err(refused) => return Err(Failure::Refused(refused)),
        }
        if let Some(tls) = tls
            && c.offers(smtp_proto::EXT_START_TLS)
        {
            c.send(b"STARTTLS\r\n").await?;
            let reply = c.reply(timeouts.command).await?;
            if reply.code == 220 {
                // Nothing the server sent before the handshake counts after it.
                c.buffer.clear();
                c.scanned = 0;
                let plain = std::mem::replace(&mut c.stream, Box::new(tokio::io::empty()));
                let (encrypted, outcome, chain) = tls
                    .connect(plain, remote, timeouts.connect)
                    .await
                    .map_err(|why| Failure::Network(format!("{TLS_FAILED}{why}")))?;
                c.stream = encrypted;
                c.tls = outcome;
                c.peer_certificates = chain;
                // RFC 3207 4.2: the capabilities are asked again.
                c.send(format!("EHLO {helo}\r\n").as_bytes()).await?;
                match c.ehlo().await? {
                    Ok(ehlo) => {
                        c.capabilities = ehlo.capabilities;
                        c.size_max = ehlo.size;
                    }
                    Err(refused) => return Err(Failure::Refused(refused)),
                }
            }
        }
        Ok(c)
    }

    /// Whether the server offered this extension (`smtp_proto::EXT_*`).
    pub fn offers(&self, extension: u32) -> bool {
        self.capabilities & extension != 0
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        timeout(self.timeouts.command, self.stream.write_all(bytes))
            .await
            .map_err(|_| Failure::Network(format!("writing to {} timed out", self.remote)))?
            .map_err(|e| Failure::Network(format!("writing to {}: {e}", self.remote)))
    }

    async fn fill(&mut self, wait: Duration) -> Result<(), Failure> {
        let mut chunk = [0u8; 4096];
        let n = timeout(wait, self.stream.read(&mut chunk))
            .await
            .map_err(|_| Failure::Network(format!("{} did not answer in time", self.remote)))?
            .map_err(|e| Failure::Network(format!("reading from {}: {e}", self.remote)))?;
        if n == 0 {
            return Err(Failure::Network(format!(
                "{} closed the connection",
                self.remote
            )));
        }
        self.buffer.extend_from_slice(&chunk[..n]);
        if self.buffer.len() > 1 << 20 {
            return Err(Failure::Network(format!(
                "{} sent an over-long reply",
                self.remote
            )));
        }
        Ok(())
    }

    /// Reads one complete (possibly multi-line) reply.
    async fn reply(&mut self, wait: Duration) -> Result<Reply, Failure> {
        loop {
            // A reply is complete once a line with a space after the code has its CRLF.
            if let Some(end) = complete_reply(&self.buffer, &mut self.scanned) {
                let bytes: Vec<u8> = self.buffer.drain(..end).collect();
                if let Some(progress) = &self.progress {
                    progress.progressed(1);
                }
                let mut receiver = ResponseReceiver::default();
                return match receiver.parse(&mut bytes.iter()) {
                    Ok(r) => Ok(Reply::from_response(r)),
                    Err(e) => Err(Failure::Network(format!(
                        "{} sent a reply that does not parse ({e:?}): {}",
                        self.remote,
                        String::from_utf8_lossy(&bytes).trim()
                    ))),
                };
            }
            self.fill(wait).await?;
        }
    }

    async fn ehlo(&mut self) -> Result<Result<EhloResponse<String>, Reply>, Failure> {
        loop {
            if let Some(end) = complete_reply(&self.buffer, &mut self.scanned) {
                let bytes: Vec<u8> = self.buffer.drain(..end).collect();
                if bytes.starts_with(b"250") {
                    return EhloResponse::parse(&mut bytes.iter()).map(Ok).map_err(|e| {
                        Failure::Network(format!(
                            "{} sent an EHLO reply that does not parse: {e:?}",
                            self.remote
                        ))
                    });
                }
                let mut receiver = ResponseReceiver::default();
                return match receiver.parse(&mut bytes.iter()) {
                    Ok(r) => Ok(Err(Reply::from_response(r))),
                    Err(e) => Err(Failure::Network(format!(
                        "{} sent a reply that does not parse: {e:?}",
                        self.remote
                    ))),
                };
            }
            self.fill(self.timeouts.command).await?;
        }
    }

    /// Runs one mail transaction. `Ok` holds one reply per recipient (in order) and the
    /// reply to the message data (`None` when no recipient was accepted); `Err` means the
    /// transaction as a whole failed (every recipient gets that result).
    pub async fn transaction(
        &mut self,
        t: &Transaction<'_>,
    ) -> Result<(Vec<Reply>, Option<Reply>), Failure> {
        let dsn = self.offers(EXT_DSN);
        let utf8 = !t.mail_from.is_ascii()
            || t.rcpts.iter().any(|r| !r.address.is_ascii())
            || !t.body.is_ascii();
        if self.offers(EXT_SIZE) && self.size_max > 0 && t.body.len() > self.size_max {
            return Err(Failure::Refused(Reply {
                code: 552,
                status: Some("5.3.4".into()),
                text: format!(
                    "message size {} exceeds {}'s limit of {} bytes",
                    t.body.len(),
                    self.remote,
                    self.size_max
                ),
            }));
        }
        let mut mail = format!("MAIL FROM:<{}>", t.mail_from);
        if self.offers(EXT_SIZE) {
            mail.push_str(&format!(" SIZE={}", t.body.len()));
        }
        if utf8 && self.offers(EXT_8BIT_MIME) {
            mail.push_str(" BODY=8BITMIME");
        }
        if (!t.mail_from.is_ascii() || t.rcpts.iter().any(|r| !r.address.is_ascii()))
            && self.offers(EXT_SMTP_UTF8)
        {
            mail.push_str(" SMTPUTF8");
        }
        if dsn {
            if let Some(ret) = t.ret {
                mail.push_str(&format!(" RET={ret}"));
            }
            if let Some(env_id) = t.env_id {
                mail.push_str(&format!(" ENVID={}", xtext(env_id)));
            }
        }
        mail.push_str("\r\n");
        let rcpt_lines: Vec<String> = t
            .rcpts
            .iter()
            .map(|r| {
                let mut line = format!("RCPT TO:<{}>", r.address);
                if dsn {
                    if let Some(notify) = &r.notify {
                        line.push_str(&format!(" NOTIFY={notify}"));
                    }
                    if let Some(orcpt) = &r.orcpt {
                        let (kind, address) = orcpt.split_once(';').unwrap_or(("rfc822", orcpt));
                        line.push_str(&format!(" ORCPT={kind};{}", xtext(address)));
                    }
                }
                line.push_str("\r\n");
                line
            })
            .collect();
        let chunking = self.offers(EXT_CHUNKING);
        let pipelining = self.offers(EXT_PIPELINING);
        let mut replies = Vec::with_capacity(t.rcpts.len());
        if pipelining {
            let mut batch = mail.clone();
            for line in &rcpt_lines {
                batch.push_str(line);
            }
            if !chunking {
                batch.push_str("DATA\r\n");
            }
            self.send(batch.as_bytes()).await?;
            let mail_reply = self.reply(self.timeouts.command).await?;
            for _ in &rcpt_lines {
                replies.push(self.reply(self.timeouts.command).await?);
            }
            if !chunking {
                let data_reply = self.reply(self.timeouts.command).await?;
                if !mail_reply.positive() {
                    return Err(Failure::Refused(mail_reply));
                }
                if !replies.iter().any(Reply::positive) {
                    // DATA after no accepted recipient is normally refused (554); a server
                    // that said 354 anyway gets an empty message ended at once.
                    if data_reply.code == 354 {
                        self.send_data(b".\r\n").await?;
                        self.reply(self.timeouts.data).await?;
                    }
                    return Ok((replies, None));
                }
                if data_reply.code != 354 {
                    return Err(Failure::Refused(data_reply));
                }
                return self.data(replies, t.body).await.map(|(r, d)| (r, Some(d)));
            }
            if !mail_reply.positive() {
                return Err(Failure::Refused(mail_reply));
            }
        } else {
            self.send(mail.as_bytes()).await?;
            let mail_reply = self.reply(self.timeouts.command).await?;
            if !mail_reply.positive() {
                return Err(Failure::Refused(mail_reply));
            }
            for line in &rcpt_lines {
                self.send(line.as_bytes()).await?;
                replies.push(self.reply(self.timeouts.command).await?);
            }
        }
        if !replies.iter().any(Reply::positive) {
            self.send(b"RSET\r\n").await?;
            self.reply(self.timeouts.command).await?;
            return Ok((replies, None));
        }
        if chunking {
            let mut chunk = format!("BDAT {} LAST\r\n", t.body.len()).into_bytes();
            chunk.extend_from_slice(t.body);
            self.send_data(&chunk).await?;
            let reply = self.reply(self.timeouts.data).await?;
            return Ok((replies, Some(reply)));
        }
        self.send(b"DATA\r\n").await?;
        let data_reply = self.reply(self.timeouts.command).await?;
        if data_reply.code != 354 {
            return Err(Failure::Refused(data_reply));
        }
        self.data(replies, t.body).await.map(|(r, d)| (r, Some(d)))
    }

    async fn send_data(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        timeout(self.timeouts.data, self.stream.write_all(bytes))
            .await
            .map_err(|_| {
                Failure::Network(format!("sending the message to {} timed out", self.remote))
            })?
            .map_err(|e| Failure::Network(format!("sending the message to {}: {e}", self.remote)))
    }

    /// Sends the message dot-stuffed after a 354 and reads the final reply.
    async fn data(
        &mut self,
        replies: Vec<Reply>,
        body: &[u8],
    ) -> Result<(Vec<Reply>, Reply), Failure> {
        self.send_data(&dot_stuff(body)).await?;
        let reply = self.reply(self.timeouts.data).await?;
        Ok((replies, reply))
    }

    /// Resets the session for the next transaction; false when the server is not fit
    /// for reuse.
    pub async fn reset(&mut self) -> bool {
        if self.send(b"RSET\r\n").await.is_err() {
            return false;
        }
        matches!(self.reply(self.timeouts.command).await, Ok(r) if r.code == 250)
    }

    /// Says QUIT politely (errors ignored: the connection is being dropped anyway).
    pub async fn quit(mut self) {
        if self.send(b"QUIT\r\n").await.is_ok() {
            let _ = self.reply(self.timeouts.command).await;
        }
    }
}

/// The end of the first complete reply in `buffer`, if there is one. `scanned` is where
/// the previous call stopped (the start of a line not yet complete); it is advanced past
/// every complete continuation line and reset to 0 when a reply is found, so a reply
/// trickled a byte at a time costs linear time, not quadratic.
fn complete_reply(buffer: &[u8], scanned: &mut usize) -> Option<usize> {
    let mut start = (*scanned).min(buffer.len());
    while let Some(nl) = buffer[start..].iter().position(|&b| b == b'\n') {
        let line = &buffer[start..start + nl + 1];
        let last = line.len() < 4 || line[3] != b'-';
        start += nl + 1;
        if last {
            *scanned = 0;
            return Some(start);
        }
    }
    *scanned = start;
    None
}

/// Dot-stuffs `body` (RFC 5321 §4.5.2) and appends the end-of-data line.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 5);
    let mut line_start = true;
    for &b in body {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing_and_xtext() {
        assert_eq!(dot_stuff(b"a\r\n.b\r\n..c"), b"a\r\n..b\r\n...c\r\n.\r\n");
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
    }

    #[test]
    fn a_multiline_reply_is_complete_at_its_last_line() {
        assert_eq!(complete_reply(b"250-a\r\n250 b\r\n", &mut 0), Some(14));
        assert_eq!(complete_reply(b"250-a\r\n250", &mut 0), None);
        // Byte by byte: each call starts where the last one stopped.
        let reply = b"250-one\r\n250-two\r\n250 three\r\n";
        let mut scanned = 0;
        for end in 1..reply.len() {
            assert_eq!(complete_reply(&reply[..end], &mut scanned), None);
            assert!(scanned <= end);
        }
        assert_eq!(complete_reply(reply, &mut scanned), Some(reply.len()));
        assert_eq!(scanned, 0);
    }
}
