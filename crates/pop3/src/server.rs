//! The POP3 listener: accept loop, connection limit, one task per connection, the login,
//! the maildrop lock, store access and shutdown.
//!
//! Store reads and password checks (Argon2id, tens of milliseconds of CPU) run on the
//! blocking pool, never on a runtime worker. No lock is held across an `.await`: the
//! maildrop lock is a set membership whose guard only removes the entry when dropped.

use crate::session::{Action, DropMessage, Maildrop, Session};
use mailroom_directory::Directory;
use mailroom_directory::login::{LoginError, LoginLimiter, Verifier, authenticate_async};
use mailroom_directory::model::Protocol;
use mailroom_store::{MailStore, RecipientId};
use mailroom_watch::RankedMutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest command line accepted (RFC 2449 allows 255 octets; AUTH PLAIN initial
/// responses can be longer).
pub const LINE_MAX: usize = 4096;

/// Output kept before it is written: answers to pipelined commands are sent once this
/// much is waiting, so memory per session is one message plus this, whatever the client
/// pipelines.
pub const RESPONSE_FLUSH_BYTES: usize = 256 * 1024;

/// Where passwords are accepted: the policy every protocol shares.
pub use mailroom_directory::login::Plaintext;

/// Settings of the POP3 listener.
#[derive(Debug, Clone)]
pub struct Pop3Config {
    /// The name in the greeting.
    pub hostname: String,
    /// Concurrent sessions, at most; more get `-ERR [SYS/TEMP]` and are closed.
    pub sessions_max: usize,
    /// Concurrent sessions from one client address, at most.
    pub sessions_per_client_max: usize,
    /// A session silent this long is closed (RFC 1939 asks for at least 10 minutes).
    pub idle_timeout: Duration,
    /// Where plaintext passwords are accepted.
    pub plaintext: Plaintext,
    /// Longest command line, bytes (`pop3.command_line_max_bytes`).
    pub command_line_max: usize,
}

/// Counters and gauges of the POP3 service.
#[derive(Clone, Default)]
pub struct Pop3Stats {
    /// Connections accepted.
    pub sessions: Counter,
    /// Connections open now.
    pub sessions_active: Gauge,
    /// Login attempts by result (`ok`, `invalid`, `disabled`, `limited`, `in_use`).
    pub logins: Family<Vec<(String, String)>, Counter>,
    /// Messages sent by RETR.
    pub retrieved: Counter,
    /// Messages removed at QUIT.
    pub deleted: Counter,
    /// Where sessions are watched for polls that do not return (shared with the
    /// watchdog's registry).
    pub tasks: std::sync::Arc<mailroom_watch::Tasks>,
}

impl Pop3Stats {
    /// Adds the metrics to a Prometheus registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mailroom_pop3_sessions",
            "POP3 connections accepted",
            self.sessions.clone(),
        );
        registry.register(
            "mailroom_pop3_sessions_active",
            "POP3 connections open now",
            self.sessions_active.clone(),
        );
        registry.register(
            "mailroom_pop3_logins",
            "POP3 login attempts by result",
            self.logins.clone(),
        );
        registry.register(
            "mailroom_pop3_retrieved",
            "Messages sent by POP3 RETR",
            self.retrieved.clone(),
        );
        registry.register(
            "mailroom_pop3_deleted",
            "Messages removed by POP3 at QUIT",
            self.deleted.clone(),
        );
    }

    fn login(&self, result: &str) {
        self.logins
            .get_or_create(&vec![("result".to_string(), result.to_string())])
            .inc();
    }
}

/// Maildrops in use: one POP3 session per recipient at a time (RFC 1939 section 8).
pub struct MaildropLocks {
    /// Rank 86 (leaf): held for one insert or remove.
    held: RankedMutex<HashSet<RecipientId>>,
}

impl Default for MaildropLocks {
    fn default() -> Self {
        MaildropLocks {
            held: RankedMutex::new(
                mailroom_watch::rank::POP3_MAILDROPS,
                "POP3 maildrop locks",
                HashSet::new(),
            ),
        }
    }
}

/// Holds a maildrop until dropped.
pub struct MaildropGuard {
    locks: Arc<MaildropLocks>,
    recipient: RecipientId,
}

impl MaildropLocks {
    /// Locks `recipient`'s maildrop, or `None` when another session holds it.
    pub fn try_lock(self: &Arc<Self>, recipient: RecipientId) -> Option<MaildropGuard> {
        self.held.lock().insert(recipient).then(|| MaildropGuard {
            locks: self.clone(),
            recipient,
        })
    }
}

impl Drop for MaildropGuard {
    fn drop(&mut self) {
        self.locks.held.lock().remove(&self.recipient);
    }
}

/// Everything a POP3 connection needs; shared by all connections.
pub struct Pop3Server {
    config: Pop3Config,
    directory: Directory,
    store: Arc<dyn MailStore>,
    limiter: Arc<LoginLimiter>,
    verifier: Arc<Verifier>,
    locks: Arc<MaildropLocks>,
    stats: Pop3Stats,
    /// The certificates, when TLS is configured: STLS is offered, and
    /// [`Pop3Server::serve_tls`] can run an implicit-TLS listener.
    tls: Option<Arc<mailroom_tls::Tls>>,
}

impl Pop3Server {
    /// Bundles the parts a listener needs. `limiter` and `verifier` are shared with the
    /// IMAP listener.
    pub fn new(
        config: Pop3Config,
        directory: Directory,
        store: Arc<dyn MailStore>,
        limiter: Arc<LoginLimiter>,
        verifier: Arc<Verifier>,
        stats: Pop3Stats,
    ) -> Arc<Pop3Server> {
        Arc::new(Pop3Server {
            config,
            directory,
            store,
            limiter,
            verifier,
            locks: Arc::new(MaildropLocks::default()),
            stats,
            tls: None,
        })
    }

    /// Offers STLS with these certificates (and allows [`Pop3Server::serve_tls`]).
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

    /// Accepts implicit-TLS connections (POP3S, RFC 8314) until `cancel` fires: the
    /// handshake first, then the session as on the plain port, encrypted from the
    /// greeting on.
    pub async fn serve_tls(
        self: Arc<Self>,
        listener: TcpListener,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) {
        let Some(tls) = self.tls.clone() else {
            tracing::error!("POP3S listener without certificates: not started");
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
            protocol: if tls.is_some() { "POP3S" } else { "POP3" },
            connections_max: self.config.sessions_max,
            per_client_max: self.config.sessions_per_client_max,
            // On the TLS port the client expects a handshake: it sees a failed one,
            // which is what a refusal in the clear would look like to it anyway.
            refusal: if tls.is_some() {
                b""
            } else {
                b"-ERR [SYS/TEMP] too many connections, try again later\r\n"
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

    /// Runs one session over any byte stream, not encrypted (STLS may encrypt it).
    pub async fn handle<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        stream: S,
        peer: SocketAddr,
        cancel: CancellationToken,
    ) -> std::io::Result<()> {
        self.handle_io(Box::new(stream), peer, cancel, false).await
    }

    /// Runs one session; `tls` says whether `stream` is encrypted already.
    async fn handle_io(
        &self,
        mut stream: mailroom_tls::BoxedIo,
        peer: SocketAddr,
        cancel: CancellationToken,
        tls: bool,
    ) -> std::io::Result<()> {
        let mut session = Session::new(
            self.config.plaintext.allows(peer.ip(), tls),
            !tls && self.tls.is_some(),
        );
        let mut out = Session::greeting(&self.config.hostname);
        let mut input: Vec<u8> = Vec::new();
        let mut buffer = vec![0u8; 16 * 1024];
        // Held for the whole TRANSACTION state; dropped when the session ends.
        let mut maildrop_lock: Option<MaildropGuard> = None;
        loop {
            // Every complete line already received (pipelining), in order.
            while let Some(end) = input.iter().position(|b| *b == b'\n') {
                if end + 1 > self.config.command_line_max {
                    // A whole over-long line in one read is as over-long as one that
                    // is still arriving (RFC 2449: 255 octets is the command limit).
                    out.extend_from_slice(b"-ERR line too long, closing\r\n");
                    self.write(&mut stream, &mut out).await?;
                    return stream.shutdown().await;
                }
                let mut line: Vec<u8> = input.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                // Pipelined commands (300 RETRs in one packet) must not pile their
                // answers up in memory: past this much output, send before going on.
                if out.len() >= RESPONSE_FLUSH_BYTES {
                    self.write(&mut stream, &mut out).await?;
                }
                mailroom_listen::doing(command_label(&line));
                let mut action = session.line(&line);
                loop {
                    match action {
                        Action::Reply(reply) => {
                            out.extend_from_slice(&reply);
                            break;
                        }
                        Action::Close(reply) => {
                            out.extend_from_slice(&reply);
                            self.write(&mut stream, &mut out).await?;
                            return stream.shutdown().await;
                        }
                        Action::StartTls(reply) => {
                            out.extend_from_slice(&reply);
                            self.write(&mut stream, &mut out).await?;
                            let Some(tls) = self.tls.clone() else {
                                return Ok(());
                            };
                            // What the client sent after STLS came in the clear: dropped
                            // unread (CVE-2011-0411).
                            input.clear();
                            stream = match mailroom_tls::accept(&tls, stream).await {
                                Ok(encrypted) => encrypted,
                                Err(e) => {
                                    tracing::debug!(%peer, error = %e, "POP3 STLS handshake failed");
                                    return Ok(());
                                }
                            };
                            session.tls_started();
                            break;
                        }
                        Action::Login { user, password } => {
                            match self.login(peer.ip(), user, password).await {
                                Ok((guard, maildrop)) => {
                                    maildrop_lock = Some(guard);
                                    out.extend_from_slice(&session.logged_in(maildrop));
                                    break;
                                }
                                Err(reply) => action = session.login_failed(reply),
                            }
                        }
                        Action::Fetch { uid, lines } => {
                            let recipient = self.recipient_of(&maildrop_lock);
                            let store = self.store.clone();
                            let raw = tokio::task::spawn_blocking(move || {
                                store.message_raw(recipient, "INBOX", uid)
                            })
                            .await
                            .map_err(std::io::Error::other)?;
                            match raw {
                                Ok(raw) => {
                                    if lines.is_none() && raw.is_some() {
                                        self.stats.retrieved.inc();
                                    }
                                    out.extend_from_slice(&session.message(raw.as_deref(), lines));
                                }
                                Err(e) => {
                                    tracing::error!(%peer, error = %e, "POP3 could not read a message");
                                    out.extend_from_slice(
                                        b"-ERR [SYS/TEMP] the message cannot be read right now\r\n",
                                    );
                                }
                            }
                            break;
                        }
                        Action::Update { recipient, uids } => {
                            let store = self.store.clone();
                            let marked = uids.len() as u64;
                            let result = tokio::task::spawn_blocking(move || {
                                store.expunge(recipient, "INBOX", &uids)
                            })
                            .await
                            .map_err(std::io::Error::other)?;
                            let result = match result {
                                Ok(removed) => {
                                    self.stats.deleted.inc_by(removed);
                                    tracing::debug!(%peer, removed, marked, "POP3 update");
                                    Ok(())
                                }
                                Err(e) => {
                                    tracing::error!(%peer, error = %e, "POP3 deletions failed");
                                    Err(e.to_string())
                                }
                            };
                            out.extend_from_slice(&Session::quit_reply(result));
                            self.write(&mut stream, &mut out).await?;
                            return stream.shutdown().await;
                        }
                    }
                }
            }
            if input.len() > self.config.command_line_max {
                out.extend_from_slice(b"-ERR line too long, closing\r\n");
                self.write(&mut stream, &mut out).await?;
                return stream.shutdown().await;
            }
            self.write(&mut stream, &mut out).await?;
            let read = tokio::select! {
                _ = cancel.cancelled() => Err("-ERR [SYS/TEMP] server shutting down; nothing was deleted\r\n"),
                read = tokio::time::timeout(self.config.idle_timeout, stream.read(&mut buffer)) => match read {
                    Ok(read) => Ok(read?),
                    Err(_) => Err("-ERR autologout timer expired; nothing was deleted\r\n"),
                },
            };
            match read {
                Ok(0) => return Ok(()),
                Ok(n) => input.extend_from_slice(&buffer[..n]),
                Err(goodbye) => {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        stream.write_all(goodbye.as_bytes()),
                    )
                    .await;
                    return Ok(());
                }
            }
        }
    }

    fn recipient_of(&self, guard: &Option<MaildropGuard>) -> RecipientId {
        guard.as_ref().map_or(0, |g| g.recipient)
    }

    /// Checks the limiter and the credentials, locks and loads the maildrop; on failure
    /// returns the `-ERR` line.
    async fn login(
        &self,
        client: IpAddr,
        user: String,
        password: String,
    ) -> Result<(MaildropGuard, Maildrop), Vec<u8>> {
        let refuse = |e: &LoginError| format!("-ERR [AUTH] {e}\r\n").into_bytes();
        let attempt = match self.limiter.begin(client, &user).await {
            Ok(attempt) => attempt,
            Err(e) => {
                self.stats.login("limited");
                return Err(refuse(&e));
            }
        };
        let snapshot = self.directory.snapshot();
        let result =
            authenticate_async(&snapshot, &user, password, Protocol::Pop3, &self.verifier).await;
        let recipient = match result {
            Ok(id) => id,
            Err(LoginError::Busy) => {
                attempt.void();
                self.stats.login("busy");
                return Err(
                    b"-ERR [SYS/TEMP] the server is busy checking other logins; try again\r\n"
                        .to_vec(),
                );
            }
            Err(e @ LoginError::ProtocolDisabled(_)) => {
                attempt.void();
                self.stats.login("disabled");
                return Err(refuse(&e));
            }
            Err(e) => {
                attempt.failed();
                self.stats.login("invalid");
                tracing::info!(%client, user, "POP3 login failed");
                return Err(refuse(&e));
            }
        };
        attempt.succeeded();
        let Some(guard) = self.locks.try_lock(recipient) else {
            self.stats.login("in_use");
            return Err(
                b"-ERR [IN-USE] the maildrop is in use by another POP3 session\r\n".to_vec(),
            );
        };
        let store = self.store.clone();
        // UIDs and sizes from one snapshot of INBOX (no headers: a maildrop needs
        // none, and parsing each message's stored facts made a login's cost grow with
        // the mailbox). No INBOX yet: an empty maildrop.
        let loaded =
            tokio::task::spawn_blocking(move || match store.folder_snapshot(recipient, "INBOX") {
                Ok((info, messages)) => Ok((info.uidvalidity, messages)),
                Err(mailroom_store::StoreError::NotFound(_)) => Ok((0, Vec::new())),
                Err(e) => Err(e),
            })
            .await;
        let (uidvalidity, messages) = match loaded {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(e)) => {
                tracing::error!(%client, error = %e, "POP3 could not load a maildrop");
                return Err(b"-ERR [SYS/TEMP] the maildrop cannot be read right now\r\n".to_vec());
            }
            Err(_) => {
                return Err(b"-ERR [SYS/TEMP] the maildrop cannot be read right now\r\n".to_vec());
            }
        };
        self.stats.login("ok");
        Ok((
            guard,
            Maildrop {
                recipient,
                uidvalidity,
                messages: messages
                    .into_iter()
                    .map(|m| DropMessage {
                        uid: m.uid,
                        size: m.size,
                        deleted: false,
                    })
                    .collect(),
            },
        ))
    }

    async fn write<S: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(self.config.idle_timeout, stream.write_all(out)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client stopped reading",
                ));
            }
        }
        out.clear();
        Ok(())
    }
}

/// The command keyword of a line, as a label for the watchdog's report.
fn command_label(line: &[u8]) -> &'static str {
    let word = line.split(|b| *b == b' ').next().unwrap_or_default();
    const KNOWN: [&str; 14] = [
        "USER", "PASS", "AUTH", "APOP", "CAPA", "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET",
        "TOP", "UIDL", "QUIT",
    ];
    KNOWN
        .iter()
        .find(|k| k.as_bytes().eq_ignore_ascii_case(word))
        .copied()
        .unwrap_or("other")
}
