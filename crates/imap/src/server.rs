//! The IMAP listener and connection framing: accept loop with a connection limit, one task
//! per connection, command framing with literals (synchronising and LITERAL+), shutdown.

use crate::response::Output;
use crate::session::{Refusal, Session, Step};
use mailroom_directory::Directory;
use mailroom_directory::login::{LoginError, authenticate_async};
use mailroom_directory::login::{LoginLimiter, Verifier};
use mailroom_directory::model::Protocol;
use mailroom_store::MailStore;
use mailroom_store::RecipientId;
use mailroom_tls::BoxedIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Where passwords are accepted: the policy every protocol shares.
pub use mailroom_directory::login::Plaintext;

/// Settings of the IMAP listener.
#[derive(Debug, Clone)]
pub struct ImapConfig {
    /// The name in the greeting.
    pub hostname: String,
    /// Concurrent sessions, at most.
    pub sessions_max: usize,
    /// Concurrent sessions from one client address, at most.
    pub sessions_per_client_max: usize,
    /// Longest command before login, literals included, bytes.
    pub command_before_login_max: usize,
    /// A session silent this long is logged out (RFC 9051 asks for at least 30 minutes).
    pub idle_timeout: Duration,
    /// Where plaintext passwords are accepted.
    pub plaintext: Plaintext,
    /// Largest message APPEND accepts (APPENDLIMIT), bytes.
    pub append_limit: u64,
    /// Literal bytes all sessions together may hold in memory; past it a literal of
    /// [`LITERAL_SHED_FLOOR_BYTES`] or more is refused for now (`NO [LIMIT]`).
    pub literals_in_memory_max: usize,
    /// Longest command line without its literals, bytes.
    pub command_line_max: usize,
    /// Longest folder name (with its parents), bytes.
    pub folder_name_max: usize,
    /// The command parser's bounds (search nesting, LIST patterns).
    pub parse_limits: crate::parse::ParseLimits,
}

/// A literal smaller than this is never refused for memory (logins, small APPENDs).
pub const LITERAL_SHED_FLOOR_BYTES: usize = 1 << 20;

/// Counters and gauges of the IMAP service.
#[derive(Clone, Default)]
pub struct ImapStats {
    /// Connections accepted.
    pub sessions: Counter,
    /// Connections open now.
    pub sessions_active: Gauge,
    /// Login attempts by result.
    pub logins: Family<Vec<(String, String)>, Counter>,
    /// Commands by name.
    pub commands: Family<Vec<(String, String)>, Counter>,
    /// Bytes of large literals (APPEND) that sessions hold in memory now, counted
    /// against `ImapConfig::literals_in_memory_max`.
    pub literals_in_memory: Gauge,
    /// Where sessions are watched for polls that do not return (shared with the
    /// watchdog's registry).
    pub tasks: std::sync::Arc<mailroom_watch::Tasks>,
}

impl ImapStats {
    /// Adds the metrics to a Prometheus registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mailroom_imap_sessions",
            "IMAP connections accepted",
            self.sessions.clone(),
        );
        registry.register(
            "mailroom_imap_sessions_active",
            "IMAP connections open now",
            self.sessions_active.clone(),
        );
        registry.register(
            "mailroom_imap_logins",
            "IMAP login attempts by result",
            self.logins.clone(),
        );
        registry.register(
            "mailroom_imap_literals_in_memory_bytes",
            "Bytes of large IMAP literals (APPEND) held in memory",
            self.literals_in_memory.clone(),
        );
        registry.register(
            "mailroom_imap_commands",
            "IMAP commands by name",
            self.commands.clone(),
        );
    }

    pub(crate) fn login(&self, result: &str) {
        self.logins
            .get_or_create(&vec![("result".to_string(), result.to_string())])
            .inc();
    }
}

/// Everything an IMAP connection needs; shared by all connections.
pub struct ImapServer {
    pub(crate) config: ImapConfig,
    pub(crate) directory: Directory,
    pub(crate) store: Arc<dyn MailStore>,
    pub(crate) limiter: Arc<LoginLimiter>,
    pub(crate) verifier: Arc<Verifier>,
    pub(crate) stats: ImapStats,
    /// The certificates, when TLS is configured: STARTTLS is offered, and
    /// [`ImapServer::serve_tls`] can run an implicit-TLS listener.
    pub(crate) tls: Option<Arc<mailroom_tls::Tls>>,
}

/// Longest command line without literals, by default (`imap.command_line_max_bytes`).
pub const LINE_MAX: usize = 64 * 1024;

impl ImapServer {
    /// Bundles the parts a listener needs. `limiter` and `verifier` are shared with POP3.
    pub fn new(
        config: ImapConfig,
        directory: Directory,
        store: Arc<dyn MailStore>,
        limiter: Arc<LoginLimiter>,
        verifier: Arc<Verifier>,
        stats: ImapStats,
    ) -> Arc<ImapServer> {
        Arc::new(ImapServer {
            config,
            directory,
            store,
            limiter,
            verifier,
            stats,
            tls: None,
        })
    }

    /// Offers STARTTLS with these certificates (and allows [`ImapServer::serve_tls`]).
    pub fn with_tls(self: Arc<Self>, tls: Arc<mailroom_tls::Tls>) -> Arc<Self> {
        let mut server = Arc::try_unwrap(self).unwrap_or_else(|_| {
            panic!("with_tls is called right after new, before the server is shared")
        });
        server.tls = Some(tls);
        Arc::new(server)
    }

    /// Accepts connections until `cancel` fires; connection tasks are spawned on
    /// `tracker` so the caller can wait for them with a deadline.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) {
        self.serve_with(listener, cancel, tracker, None).await;
    }

    /// Accepts implicit-TLS connections (IMAPS, RFC 8314) until `cancel` fires: the
    /// handshake first, then the session as on the plain port, encrypted from the
    /// greeting on.
    pub async fn serve_tls(
        self: Arc<Self>,
        listener: TcpListener,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) {
        let Some(tls) = self.tls.clone() else {
            tracing::error!("IMAPS listener without certificates: not started");
            return;
        };
        self.serve_with(listener, cancel, tracker, Some(tls)).await;
    }

    /// The accept loop of both ports; with `tls`, each connection starts with the
    /// handshake.
    async fn serve_with(
        self: Arc<Self>,
        listener: TcpListener,
        cancel: CancellationToken,
        tracker: TaskTracker,
        tls: Option<Arc<mailroom_tls::Tls>>,
    ) {
        let limits = mailroom_listen::Limits {
            protocol: if tls.is_some() { "IMAPS" } else { "IMAP" },
            connections_max: self.config.sessions_max,
            per_client_max: self.config.sessions_per_client_max,
            // On the TLS port the client expects a handshake: it sees a failed one,
            // which is what a refusal in the clear would look like to it anyway.
            refusal: if tls.is_some() {
                b""
            } else {
                b"* BYE [UNAVAILABLE] too many connections, try again later\r\n"
            },
        };
        let metrics = mailroom_listen::SessionMetrics {
            sessions: self.stats.sessions.clone(),
            active: self.stats.sessions_active.clone(),
            tasks: self.stats.tasks.clone(),
        };
        let server = self.clone();
        mailroom_listen::serve_sessions(
            listener,
            limits,
            cancel,
            tracker,
            || {},
            metrics,
            move |stream, peer, cancel| {
                let server = server.clone();
                let tls = tls.clone();
                async move {
                    match tls {
                        Some(tls) => {
                            let stream = mailroom_tls::accept(&tls, Box::new(stream)).await?;
                            server.handle_io(stream, peer, cancel, true).await
                        }
                        None => {
                            server
                                .handle_io(Box::new(stream), peer, cancel, false)
                                .await
                        }
                    }
                }
            },
        )
        .await;
    }

    /// Runs one session over any byte stream, not encrypted (STARTTLS may encrypt it).
    pub async fn handle<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        self: &Arc<Self>,
        stream: S,
        peer: SocketAddr,
        cancel: CancellationToken,
    ) -> std::io::Result<()> {
        self.handle_io(Box::new(stream), peer, cancel, false).await
    }

    /// Runs one session; `tls` says whether `stream` is encrypted already.
    async fn handle_io(
        self: &Arc<Self>,
        stream: BoxedIo,
        peer: SocketAddr,
        cancel: CancellationToken,
        tls: bool,
    ) -> std::io::Result<()> {
        let mut conn = Connection {
            stream,
            input: Vec::new(),
            server: self.clone(),
            held: 0,
        };
        let session = Session::new(self.clone(), peer, tls);
        conn.write(&session.greeting()).await?;
        let result = self.drive(&mut conn, session, peer, &cancel).await;
        // A session that ends in order ends its TLS in order too (close_notify), so a
        // client can tell the end from a cut connection.
        if result.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.stream.shutdown()).await;
        }
        result
    }

    /// The driver: reads commands, runs each in the core in one blocking hop, and does
    /// what the core's [`Step`] asks, until LOGOUT, the client leaves, or shutdown.
    async fn drive(
        self: &Arc<Self>,
        conn: &mut Connection<BoxedIo>,
        mut session: Session,
        peer: SocketAddr,
        cancel: &CancellationToken,
    ) -> std::io::Result<()> {
        loop {
            let input = tokio::select! {
                _ = cancel.cancelled() => {
                    conn.write(b"* BYE [UNAVAILABLE] server shutting down\r\n").await?;
                    return Ok(());
                }
                read = tokio::time::timeout(self.config.idle_timeout, conn.read_command(session.is_authenticated())) => match read {
                    Ok(input) => input?,
                    Err(_) => {
                        conn.write(b"* BYE autologout: idle for too long\r\n").await?;
                        return Ok(());
                    }
                },
            };
            let bytes = match input {
                Input::Command(bytes) => bytes,
                Input::Closed => return Ok(()),
                Input::TooLong => {
                    conn.write(b"* BYE command line too long\r\n").await?;
                    return Ok(());
                }
                Input::Busy(tag) => {
                    let mut out = Vec::new();
                    crate::session::tagged(
                        &mut out,
                        &tag,
                        crate::session::Status::No,
                        "[LIMIT] the server is receiving too many large messages at once; try again later",
                    );
                    conn.write(&out).await?;
                    continue;
                }
                Input::TooBig(tag, size, limit) => {
                    let mut out = Vec::new();
                    crate::session::tagged(
                        &mut out,
                        &tag,
                        crate::session::Status::No,
                        &format!("[TOOBIG] {size} octets is above the limit of {limit}"),
                    );
                    conn.write(&out).await?;
                    continue;
                }
            };
            if bytes.is_empty() {
                continue;
            }
            mailroom_listen::doing(crate::session::peek_command_name(&bytes));
            let mut step;
            (session, step) = hop(conn, session, move |s, out| s.command(&bytes, out)).await?;
            loop {
                match step {
                    Step::Next => break,
                    Step::Logout => return Ok(()),
                    Step::StartTls => {
                        let Some(tls) = self.tls.clone() else {
                            return Ok(());
                        };
                        // Whatever the client sent after STARTTLS came in the clear and
                        // is dropped unread (CVE-2011-0411): the first encrypted command
                        // is the first command that counts.
                        conn.input.clear();
                        let plain =
                            std::mem::replace(&mut conn.stream, Box::new(tokio::io::empty()));
                        conn.stream = match mailroom_tls::accept(&tls, plain).await {
                            Ok(encrypted) => encrypted,
                            Err(e) => {
                                tracing::debug!(%peer, error = %e, "IMAP STARTTLS handshake failed");
                                return Ok(());
                            }
                        };
                        session.tls_started();
                        step = Step::Next;
                    }
                    Step::Login {
                        tag,
                        user,
                        password,
                    } => {
                        let verdict = self.verify(peer, &user, password).await;
                        (session, step) = hop(conn, session, move |s, out| {
                            s.login_verified(&tag, &user, verdict, out);
                            Step::Next
                        })
                        .await?;
                    }
                    Step::SaslResponse { tag } => {
                        // The continuation is bounded in time (the idle timeout) like
                        // any command, and in size like a command before login.
                        let line = match tokio::time::timeout(
                            self.config.idle_timeout,
                            conn.read_line_before_login(),
                        )
                        .await
                        {
                            Ok(Ok(Some(line))) => Some(line),
                            Ok(Ok(None)) => return Ok(()),
                            Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => None,
                            Ok(Err(e)) => return Err(e),
                            Err(_) => {
                                return Err(std::io::Error::new(
                                    std::io::ErrorKind::TimedOut,
                                    "AUTHENTICATE continuation not sent in time",
                                ));
                            }
                        };
                        (session, step) = hop(conn, session, move |s, out| {
                            s.sasl_response(tag, line.as_deref(), out)
                        })
                        .await?;
                    }
                    Step::Idle { tag } => {
                        let Some(s) = self.idle(conn, session, &tag, cancel).await? else {
                            return Ok(());
                        };
                        session = s;
                        step = Step::Next;
                    }
                }
            }
        }
    }

    /// IDLE (RFC 2177): updates as the mailbox bell rings, until DONE. `None` when the
    /// session must end (shutdown, the client left, 30 minutes idle).
    async fn idle<S: AsyncRead + AsyncWrite + Unpin + Send>(
        self: &Arc<Self>,
        conn: &mut Connection<S>,
        mut session: Session,
        tag: &str,
        cancel: &CancellationToken,
    ) -> std::io::Result<Option<Session>> {
        let mut bell = session.bell();
        loop {
            let changed = async {
                match &mut bell {
                    Some(b) => b.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {
                    conn.write(b"* BYE [UNAVAILABLE] server shutting down\r\n").await?;
                    return Ok(None);
                }
                alive = changed => {
                    if !alive {
                        bell = None;
                        continue;
                    }
                    (session, ()) = hop(conn, session, |s, out| s.idle_update(out)).await?;
                }
                line = tokio::time::timeout(IDLE_MAX, conn.read_line()) => {
                    return match line {
                        Ok(Ok(Some(line))) => {
                            let tag = tag.to_string();
                            let (session, ()) =
                                hop(conn, session, move |s, out| s.idle_done(&tag, &line, out)).await?;
                            Ok(Some(session))
                        }
                        Ok(Ok(None)) => Ok(None),
                        Ok(Err(e)) => Err(e),
                        Err(_) => {
                            conn.write(b"* BYE idle for too long\r\n").await?;
                            Ok(None)
                        }
                    };
                }
            }
        }
    }

    /// Checks a password for LOGIN or AUTHENTICATE PLAIN: the login limiter first, then
    /// the verifier pool (Argon2 never runs on a runtime thread).
    async fn verify(
        &self,
        peer: SocketAddr,
        user: &str,
        password: String,
    ) -> Result<RecipientId, Refusal> {
        let client = peer.ip();
        let attempt = match self.limiter.begin(client, user).await {
            Ok(attempt) => attempt,
            Err(e) => {
                self.stats.login("limited");
                return Err(Refusal::no(format!("[UNAVAILABLE] {e}")));
            }
        };
        let snapshot = self.directory.snapshot();
        match authenticate_async(&snapshot, user, password, Protocol::Imap, &self.verifier).await {
            Ok(id) => {
                attempt.succeeded();
                Ok(id)
            }
            Err(e @ LoginError::Busy) => {
                attempt.void();
                self.stats.login("busy");
                Err(Refusal::no(format!("[UNAVAILABLE] {e}")))
            }
            Err(e @ LoginError::ProtocolDisabled(_)) => {
                attempt.void();
                self.stats.login("disabled");
                Err(Refusal::no(format!("[AUTHORIZATIONFAILED] {e}")))
            }
            Err(e) => {
                attempt.failed();
                self.stats.login("invalid");
                tracing::info!(%client, user, "IMAP login failed");
                Err(Refusal::no(format!("[AUTHENTICATIONFAILED] {e}")))
            }
        }
    }
}

/// The longest IDLE (RFC 2177 asks clients to re-issue it within 29 minutes).
const IDLE_MAX: Duration = Duration::from_secs(30 * 60);

/// Chunks of output in flight between a command on the blocking pool and the socket:
/// the command waits while the client reads, so a session holds at most this many
/// chunks plus the one being built.
const OUTPUT_CHUNKS_IN_FLIGHT: usize = 1;

/// One blocking hop: runs `work` on the core on the blocking pool, writes the output it
/// streams as it comes (a client that stops reading for the idle timeout stops the
/// command), then the rest. The core moves to the pool and back, so nothing is shared
/// and no lock is held across an await. The command's literals are released before its
/// last bytes (its tagged status) go out.
async fn hop<S, R>(
    conn: &mut Connection<S>,
    mut session: Session,
    work: impl FnOnce(&mut Session, &mut Output<'_>) -> R + Send + 'static,
) -> std::io::Result<(Session, R)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    R: Send + 'static,
{
    let (chunks, mut streamed) = tokio::sync::mpsc::channel::<Vec<u8>>(OUTPUT_CHUNKS_IN_FLIGHT);
    let task = tokio::task::spawn_blocking(move || {
        let mut send = |chunk: Vec<u8>| chunks.blocking_send(chunk).is_ok();
        let mut out = Output::new(&mut send);
        let result = work(&mut session, &mut out);
        let rest = out.finish();
        (session, result, rest)
    });
    let mut failure = None;
    while let Some(chunk) = streamed.recv().await {
        if failure.is_none()
            && let Err(e) = conn.write(&chunk).await
        {
            // The command sees its next chunk refused and stops.
            streamed.close();
            failure = Some(e);
        }
    }
    let (session, result, rest) = match task.await {
        Ok(done) => done,
        Err(e) => {
            tracing::error!(error = %e, "an IMAP command panicked");
            let _ = conn
                .write(b"* BYE [SERVERBUG] the server failed on this command\r\n")
                .await;
            return Err(std::io::Error::other("an IMAP command panicked"));
        }
    };
    if let Some(e) = failure {
        return Err(e);
    }
    conn.release();
    let Some(rest) = rest else {
        return Err(std::io::Error::other("the client stopped reading"));
    };
    conn.write(&rest).await?;
    Ok((session, result))
}

/// The tag to answer a command that is refused before it is parsed: its first word when
/// that is a valid tag (RFC 9051: astring characters other than "+"), otherwise "*", so
/// that garbage is never echoed as if it were a tag.
fn tag_of(command: &[u8]) -> String {
    let word = command.split(|b| *b == b' ').next().unwrap_or_default();
    let valid = !word.is_empty()
        && word
            .iter()
            .all(|b| *b > 0x20 && *b < 0x7f && !b"(){%*\"\\+]".contains(b));
    if valid {
        String::from_utf8_lossy(word).into_owned()
    } else {
        "*".to_string()
    }
}

/// One connection's byte stream, with command framing.
pub struct Connection<S> {
    stream: S,
    input: Vec<u8>,
    server: Arc<ImapServer>,
    /// Large literal bytes of the last command, counted in the server's gauge until the
    /// next command is read or the connection ends.
    held: usize,
}

impl<S> Connection<S> {
    /// Gives back the budget share of the last command's large literals.
    pub(crate) fn release(&mut self) {
        if self.held > 0 {
            self.server
                .stats
                .literals_in_memory
                .dec_by(self.held as i64);
            self.held = 0;
        }
    }

    /// Counts a large literal against the shared budget; false when it does not fit.
    fn reserve(&mut self, size: usize) -> bool {
        if size < LITERAL_SHED_FLOOR_BYTES {
            return true;
        }
        let gauge = &self.server.stats.literals_in_memory;
        let before = gauge.inc_by(size as i64);
        if before + size as i64 > self.server.config.literals_in_memory_max as i64 {
            gauge.dec_by(size as i64);
            return false;
        }
        self.held += size;
        true
    }
}

impl<S> Drop for Connection<S> {
    fn drop(&mut self) {
        self.release();
    }
}

/// What reading a command produced.
pub enum Input {
    /// One complete command, literals inline, without the final CRLF.
    Command(Vec<u8>),
    /// A command whose literal is too large: its tag, the size asked for and the limit
    /// that applies (before login, the whole command's). Nothing of the literal was
    /// accepted (or it was read and dropped, for LITERAL+).
    TooBig(String, u64, usize),
    /// A large literal that the server cannot hold now (the literal budget is spent):
    /// its tag. Dropped like a `TooBig` one; the client may try again later.
    Busy(String),
    /// The line limit was exceeded.
    TooLong,
    /// The client closed the connection.
    Closed,
}

/// A line longer than its limit (see [`Connection::read_line`]).
#[derive(Debug)]
struct LineTooLong;

impl std::fmt::Display for LineTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("command line too long")
    }
}

impl std::error::Error for LineTooLong {}

/// `{n}` or `{n+}` at the end of a line: (n, non-synchronising).
fn literal_at_end(line: &[u8]) -> Option<(u64, bool)> {
    let body = line.strip_suffix(b"}")?;
    let open = body.iter().rposition(|b| *b == b'{')?;
    let inner = &body[open + 1..];
    let (digits, plus) = match inner.strip_suffix(b"+") {
        Some(d) => (d, true),
        None => (inner, false),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((std::str::from_utf8(digits).ok()?.parse().ok()?, plus))
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Connection<S> {
    /// Writes and flushes, with the idle timeout as the limit.
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(
            self.server.config.idle_timeout,
            self.stream.write_all(bytes),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client stopped reading",
            )),
        }
    }

    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut buffer = [0u8; 16 * 1024];
        let n = self.stream.read(&mut buffer).await?;
        self.input.extend_from_slice(&buffer[..n]);
        Ok(n > 0)
    }

    /// Reads one line (without CRLF), or `None` at end of stream. A line longer than
    /// `max` bytes is `Err(TooLong)`: nothing beyond `max` is ever buffered.
    pub async fn read_line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        self.read_line_max(self.server.config.command_line_max)
            .await
    }

    /// [`Connection::read_line`] bounded like a command before login (for SASL
    /// continuations, which a client sends before it is authenticated).
    pub async fn read_line_before_login(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        self.read_line_max(self.server.config.command_before_login_max)
            .await
    }

    async fn read_line_max(&mut self, max: usize) -> std::io::Result<Option<Vec<u8>>> {
        // Where the search for LF resumes: bytes before it were searched already, so a
        // line arriving in small pieces costs linear time, not quadratic.
        let mut searched = 0;
        loop {
            if let Some(end) = memchr::memchr(b'\n', &self.input[searched..]) {
                let end = searched + end;
                let mut line: Vec<u8> = self.input.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(line));
            }
            searched = self.input.len();
            if self.input.len() > max {
                self.input.clear();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    LineTooLong,
                ));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Reads one complete command: lines joined with their literals. Sends the
    /// continuation request for synchronising literals. Before login a command is
    /// bounded by `command_before_login_max` (a stranger's bytes cost us nothing); after
    /// it, by a line plus the APPEND limit.
    pub async fn read_command(&mut self, authenticated: bool) -> std::io::Result<Input> {
        let command_max = if authenticated {
            self.server.config.command_line_max + self.server.config.append_limit as usize
        } else {
            self.server.config.command_before_login_max
        };
        // The previous command has been answered: its literals are no longer held.
        self.release();
        let mut command = Vec::new();
        loop {
            let left = command_max.saturating_sub(command.len());
            let line = match self
                .read_line_max(left.min(self.server.config.command_line_max))
                .await
            {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(Input::Closed),
                Err(e) if e.get_ref().is_some_and(|e| e.is::<LineTooLong>()) => {
                    return Ok(Input::TooLong);
                }
                Err(e) => return Err(e),
            };
            if command.len() + line.len() > command_max {
                return Ok(Input::TooLong);
            }
            command.extend_from_slice(&line);
            let Some((size, non_sync)) = literal_at_end(&line) else {
                return Ok(Input::Command(command));
            };
            let tag = tag_of(&command);
            let too_big = size > (command_max - command.len()) as u64;
            if too_big || !self.reserve(size as usize) {
                if !authenticated && non_sync {
                    // Megabytes a stranger announced and will send anyway: close
                    // rather than read them.
                    return Ok(Input::TooLong);
                }
                if non_sync {
                    // The client sends it anyway: read and drop it, then the rest of
                    // the command line.
                    let mut left = size;
                    while left > 0 {
                        if self.input.is_empty() && !self.fill().await? {
                            return Ok(Input::Closed);
                        }
                        let take = left.min(self.input.len() as u64) as usize;
                        self.input.drain(..take);
                        left -= take as u64;
                    }
                    let _ = self.read_line().await?;
                }
                return Ok(if too_big {
                    // The limit a client can act on: APPENDLIMIT after login, the
                    // whole command's before.
                    Input::TooBig(
                        tag,
                        size,
                        if authenticated {
                            self.server.config.append_limit as usize
                        } else {
                            command_max
                        },
                    )
                } else {
                    Input::Busy(tag)
                });
            }
            if !non_sync {
                self.write(b"+ Ready for literal data\r\n").await?;
            }
            command.extend_from_slice(b"\r\n");
            let size = size as usize;
            while self.input.len() < size {
                if !self.fill().await? {
                    return Ok(Input::Closed);
                }
            }
            command.extend(self.input.drain(..size));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing (crates/fuzz, imap_session): `b{4444444444444}` was answered
    /// `b{4444444444444} NO [TOOBIG] ...`, a response whose "tag" holds a literal
    /// announcement. Only a valid tag is echoed.
    #[test]
    fn only_valid_tags_are_echoed_before_parsing() {
        assert_eq!(tag_of(b"a1 APPEND INBOX {99999999}"), "a1");
        assert_eq!(tag_of(b"b{4444444444444}"), "*");
        assert_eq!(tag_of(b"+x LOGIN {5}"), "*");
        assert_eq!(tag_of(b" LOGIN {5}"), "*");
        assert_eq!(tag_of(b"a\x00b LOGIN {5}"), "*");
    }

    #[test]
    fn literal_markers() {
        assert_eq!(literal_at_end(b"a LOGIN {5}"), Some((5, false)));
        assert_eq!(literal_at_end(b"a APPEND x {12+}"), Some((12, true)));
        assert_eq!(literal_at_end(b"a LOGIN {}"), None);
        assert_eq!(literal_at_end(b"a SEARCH SUBJECT {x}"), None);
        assert_eq!(literal_at_end(b"a NOOP"), None);
    }
}
