//! The SMTP session as a sans-I/O state machine.
//!
//! The driver feeds received bytes with [`Session::receive`] and calls
//! [`Session::advance`] until it returns [`Step::NeedInput`] (flush the replies, read
//! more) or [`Step::Close`]. [`Step::Submit`] hands over a complete message; the driver
//! makes it durable and passes the outcome to [`Session::submitted`], and only then does
//! the session go on with pipelined commands behind it.
//!
//! Memory is bounded: a command line by `line_length_max`, a message by
//! `message_size_max` (the rest of an oversized message is read and discarded), the
//! input buffer by what the driver reads at once plus one line.

use crate::data::{BdatReceiver, DataReceiver};
use crate::reply::Reply;
use base64::Engine;
use mailroom_directory::{Resolution, Snapshot};
use smtp_proto::{Error as ProtoError, MAIL_SMTPUTF8, Request};
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

/// Limits and identity of the SMTP service (the `[smtp]` section of the config).
#[derive(Debug, Clone)]
pub struct SmtpLimits {
    /// The name this server gives itself in the greeting and Received headers.
    pub hostname: String,
    /// The primary mail domain; a bare `postmaster` recipient means postmaster here.
    pub primary_domain: String,
    /// Largest message accepted, in bytes (advertised with SIZE).
    pub message_size_max: usize,
    /// Largest header section accepted, in bytes.
    pub header_size_max: usize,
    /// Recipients per message, at most.
    pub recipients_max: usize,
    /// Longest command line, in bytes including CRLF.
    pub line_length_max: usize,
    /// Failed commands tolerated per session before it is closed.
    pub errors_max: u32,
}

impl Default for SmtpLimits {
    fn default() -> Self {
        SmtpLimits {
            hostname: "localhost".into(),
            primary_domain: "localhost".into(),
            message_size_max: 25 << 20,
            header_size_max: 2 << 20,
            recipients_max: 100,
            line_length_max: 2048,
            errors_max: 20,
        }
    }
}

/// How the session learns what a recipient address is. The driver passes the snapshot
/// loaded for the current transaction; tests can pass anything.
pub trait RecipientPolicy {
    /// Local mailbox, unknown local address, or a remote domain.
    fn resolve(&self, address: &str) -> Resolution;

    /// Whether a local recipient is over its "prohibit send and receive" quota, so RCPT
    /// is refused with 452 4.2.2 (the sender retries; nothing is lost).
    fn over_quota(&self, _recipient: &mailroom_directory::Recipient) -> bool {
        false
    }

    /// Why mail to this address would reach nobody, when that is certain now (an empty
    /// list, a contact without a target, no route): RCPT refuses it with this reason.
    fn undeliverable(&self, _address: &str) -> Option<String> {
        None
    }

    /// Why no new mail (of `size` bytes, if the client declared it) can be stored now
    /// (the disk is below its free-space reserve): MAIL is refused with 452 4.3.1 and
    /// this reason, as Postfix does, before the client sends the message.
    fn storage_refusal(&self, _size: u64) -> Option<String> {
        None
    }

    /// Whether the authenticated `user` may use `address` as the envelope sender: one
    /// of its own addresses, or the address of a list it owns.
    fn may_send_as(&self, _user: mailroom_store::RecipientId, _address: &str) -> bool {
        false
    }

    /// Why the authenticated `user` may not start a message now: its mailbox is over
    /// its "prohibit send" quota (a permanent refusal until it deletes mail), or it or
    /// its client address sent more than the submission rate allows (temporary).
    fn submission_refusal(&self, _user: mailroom_store::RecipientId) -> Option<SubmissionRefusal> {
        None
    }
}

/// Why an authenticated user may not send now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmissionRefusal {
    /// Over the "prohibit send" quota: `552 5.2.2`.
    OverQuota,
    /// Over a rate limit (per user or per client address): `451 4.7.1` with this text.
    RateLimited(String),
}

/// Why a password check after AUTH failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// Wrong user or password: 535 5.7.8.
    Invalid,
    /// The mailbox may not use SMTP submission: 535 5.7.8 with this text.
    Disabled(String),
    /// Too many failures, or the verifier is busy: 454 4.7.0 with this text.
    Temporary(String),
}

/// SMTP AUTH (RFC 4954) on this listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuthPolicy {
    /// AUTH is offered (submission listeners).
    pub offered: bool,
    /// MAIL needs AUTH first (530 5.7.0).
    pub required: bool,
    /// Passwords may be sent on this connection without TLS (the login policy for the
    /// client's address).
    pub plaintext_allowed: bool,
}

/// Where an AUTH exchange stands.
#[derive(Debug)]
enum AuthStep {
    /// PLAIN: waiting for the response.
    Plain,
    /// LOGIN: waiting for the user name.
    LoginUser,
    /// LOGIN: waiting for the password of this user.
    LoginPassword(String),
}

/// Why the spool did not take a message.
#[derive(Debug, Clone)]
pub enum SpoolRefusal {
    /// The disk is full or below its reserve: 452 4.3.1.
    NoSpace(String),
    /// Anything else (an I/O error, shutdown): 451 4.3.0.
    Failed(String),
    /// The message was refused by policy at its end (mail authentication): this reply.
    Refused(Reply),
}

impl RecipientPolicy for Snapshot {
    fn resolve(&self, address: &str) -> Resolution {
        Snapshot::resolve(self, address)
    }

    fn undeliverable(&self, address: &str) -> Option<String> {
        self.refusal_at_rcpt(address)
    }
}

/// A complete message for the spool.
#[derive(Debug, Clone)]
pub struct Submission {
    /// Identifier used in the Received header and logs.
    pub queue_id: String,
    /// Envelope sender ("" for the null reverse-path).
    pub mail_from: String,
    /// Accepted envelope recipients.
    pub recipients: Vec<String>,
    /// The message with the Received header prepended.
    pub body: Vec<u8>,
    /// DSN parameters (RFC 3461) given at MAIL and RCPT.
    pub envelope: mailroom_store::Envelope,
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Step {
    /// Send this reply (it may be buffered until the next `NeedInput`).
    Reply(Reply),
    /// Make this message durable, then call [`Session::submitted`].
    Submit(Submission),
    /// Flush buffered replies and read more input.
    NeedInput,
    /// Flush buffered replies and close the connection.
    Close,
    /// AUTH: check this password (the limiter and the verifier are the driver's), then
    /// call [`Session::auth_result`].
    Authenticate {
        /// The user name as the client sent it.
        user: String,
        /// The password.
        password: String,
    },
    /// Send this reply (220), then run the TLS handshake and call
    /// [`Session::tls_started`] (RFC 3207). Everything the client sent after STARTTLS
    /// was discarded already: it came in the clear (CVE-2011-0411).
    StartTls(Reply),
}

/// Why a message being received will be refused at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    TooBig,
    NoTransaction,
    /// The server's budget for messages held in memory is spent (see
    /// [`Session::shed`]): a temporary refusal, the sender tries again later.
    NoMemory,
}

enum Phase {
    Command,
    /// Skipping the rest of an over-long command line.
    SkipLine,
    Data(DataReceiver),
    DataDiscard(DataReceiver, Refusal),
    /// A chunk, and whether it is the last.
    Bdat(BdatReceiver, bool),
    BdatDiscard(BdatReceiver, bool, Refusal),
    AwaitingSpool,
    /// An AUTH exchange: the next line is the client's response.
    Auth(AuthStep),
    /// A password is being checked.
    AwaitingAuth,
    Closed,
}

#[derive(Default)]
struct Transaction {
    mail_from: String,
    smtputf8: bool,
    recipients: Vec<String>,
    /// RET and ENVID from MAIL, NOTIFY and ORCPT of each accepted RCPT.
    envelope: mailroom_store::Envelope,
    data: Vec<u8>,
    bdat_used: bool,
    /// BDAT chunks of this transaction failed; the rest is discarded until LAST.
    bdat_failed: Option<Refusal>,
}

/// One SMTP session; see the module documentation.
pub struct Session {
    limits: Arc<SmtpLimits>,
    peer: SocketAddr,
    relay_allowed: bool,
    connection_id: u64,
    messages: u32,
    helo: Option<(String, bool)>,
    transaction: Option<Transaction>,
    phase: Phase,
    input: Vec<u8>,
    errors: u32,
    /// The clock reading passed to the current `advance`.
    now_ms: i64,
    /// The connection is encrypted (after STARTTLS, or an implicit-TLS port).
    tls: bool,
    /// STARTTLS is offered (a certificate exists, not encrypted yet).
    starttls: bool,
    /// SMTP AUTH on this listener.
    auth: AuthPolicy,
    /// Who the client authenticated as: (user name, recipient).
    authenticated: Option<(String, mailroom_store::RecipientId)>,
    /// The user name of the password being checked.
    auth_pending: Option<String>,
}

impl Session {
    /// A new session for a client at `peer`. `relay_allowed` says whether this client may
    /// send to non-local domains; `connection_id` makes queue ids unique.
    pub fn new(
        limits: Arc<SmtpLimits>,
        peer: SocketAddr,
        relay_allowed: bool,
        connection_id: u64,
    ) -> Session {
        Session {
            limits,
            peer,
            relay_allowed,
            connection_id,
            messages: 0,
            helo: None,
            transaction: None,
            phase: Phase::Command,
            input: Vec::new(),
            errors: 0,
            now_ms: 0,
            tls: false,
            starttls: false,
            auth: AuthPolicy::default(),
            authenticated: None,
            auth_pending: None,
        }
    }

    /// SMTP AUTH on this listener (submission: offered and required).
    pub fn set_auth(&mut self, auth: AuthPolicy) {
        self.auth = auth;
    }

    /// The name the client gave in HELO or EHLO, once it has.
    pub fn helo_name(&self) -> Option<&str> {
        self.helo.as_ref().map(|(name, _)| name.as_str())
    }

    /// Whether this client may relay (it is in `relay_networks`).
    pub fn relay_allowed(&self) -> bool {
        self.relay_allowed
    }

    /// Who the client authenticated as.
    pub fn authenticated_user(&self) -> Option<&str> {
        self.authenticated.as_ref().map(|(user, _)| user.as_str())
    }

    /// Whether AUTH may be used now: offered, and over TLS unless passwords may travel
    /// in the clear from this client.
    fn auth_usable(&self) -> bool {
        self.auth.offered && (self.tls || self.auth.plaintext_allowed)
    }

    /// The driver's verdict on [`Step::Authenticate`].
    pub fn auth_result(
        &mut self,
        outcome: Result<mailroom_store::RecipientId, AuthFailure>,
    ) -> Reply {
        debug_assert!(matches!(self.phase, Phase::AwaitingAuth));
        self.phase = Phase::Command;
        let user = self.auth_pending.take().unwrap_or_default();
        match outcome {
            Ok(recipient) => {
                self.authenticated = Some((user, recipient));
                Reply::new(235, (2, 7, 0), "Authentication successful")
            }
            Err(AuthFailure::Invalid) => {
                Reply::new(535, (5, 7, 8), "Authentication credentials invalid")
            }
            Err(AuthFailure::Disabled(why)) => Reply::new(535, (5, 7, 8), why),
            Err(AuthFailure::Temporary(why)) => Reply::new(454, (4, 7, 0), why),
        }
    }

    /// Whether the connection is encrypted already (`encrypted`) and whether STARTTLS
    /// may be offered on it (`offered`: a certificate is configured).
    pub fn set_tls(&mut self, encrypted: bool, offered: bool) {
        self.tls = encrypted;
        self.starttls = offered && !encrypted;
    }

    /// The handshake after STARTTLS succeeded: the session starts over as after the
    /// greeting, forgetting the EHLO (RFC 3207 4.2), now encrypted.
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.starttls = false;
        self.helo = None;
        self.transaction = None;
        self.phase = Phase::Command;
    }

    /// The 220 greeting.
    pub fn greeting(&self) -> Reply {
        Reply::plain(
            220,
            vec![format!("{} ESMTP Mailroom ready", self.limits.hostname).into()],
        )
    }

    /// True while a mail transaction is open; the driver keeps one directory snapshot
    /// for the whole transaction and loads a fresh one only between transactions.
    pub fn in_transaction(&self) -> bool {
        self.transaction.is_some()
    }

    /// Appends received bytes.
    pub fn receive(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// What the session is reading now, for the watchdog's report.
    pub fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Command | Phase::SkipLine => "command",
            Phase::Data(_) | Phase::DataDiscard(..) => "DATA",
            Phase::Bdat(..) | Phase::BdatDiscard(..) => "BDAT",
            Phase::AwaitingSpool => "spooling",
            Phase::Auth(_) | Phase::AwaitingAuth => "AUTH",
            Phase::Closed => "closing",
        }
    }

    /// Bytes received and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.input.len()
    }

    /// Bytes of the message being received that the session holds (what a memory
    /// budget across sessions must count).
    pub fn message_bytes(&self) -> usize {
        self.transaction.as_ref().map_or(0, |t| t.data.capacity())
    }

    /// Drops the message being received because the server cannot hold more in memory:
    /// the rest of it is read and discarded, and its end is answered `452 4.3.1` (the
    /// sender keeps it and tries again). Returns false when no message is being
    /// received (nothing to drop).
    pub fn shed(&mut self) -> bool {
        let phase = std::mem::replace(&mut self.phase, Phase::Closed);
        let (phase, shed) = match phase {
            Phase::Data(receiver) => (Phase::DataDiscard(receiver, Refusal::NoMemory), true),
            Phase::Bdat(receiver, last) => {
                (Phase::BdatDiscard(receiver, last, Refusal::NoMemory), true)
            }
            // Between BDAT chunks the data waits in the transaction: drop it, and let
            // the next chunk be refused.
            Phase::Command
                if self
                    .transaction
                    .as_ref()
                    .is_some_and(|t| t.bdat_used && t.bdat_failed.is_none()) =>
            {
                (Phase::Command, true)
            }
            other => (other, false),
        };
        self.phase = phase;
        if shed && let Some(t) = self.transaction.as_mut() {
            t.data = Vec::new();
            if t.bdat_used {
                t.bdat_failed = Some(Refusal::NoMemory);
            }
        }
        shed
    }

    /// Runs the protocol over the buffered input; see [`Step`].
    pub fn advance(&mut self, policy: &dyn RecipientPolicy, now_ms: i64) -> Step {
        self.now_ms = now_ms;
        loop {
            let step = match &mut self.phase {
                Phase::Closed => return Step::Close,
                Phase::AwaitingSpool | Phase::AwaitingAuth => {
                    debug_assert!(false, "advance called while the driver is working");
                    return Step::NeedInput;
                }
                Phase::Auth(_) => self.auth_response(),
                Phase::Command => self.command(policy),
                Phase::SkipLine => self.skip_line(),
                Phase::Data(_) | Phase::DataDiscard(..) => self.data(),
                Phase::Bdat(..) | Phase::BdatDiscard(..) => self.bdat(),
            };
            if let Some(step) = step {
                return self.count_errors(step);
            }
        }
    }

    /// The outcome of a [`Step::Submit`]: `Ok` once the message is durable.
    pub fn submitted(&mut self, outcome: Result<(), SpoolRefusal>, queue_id: &str) -> Reply {
        debug_assert!(matches!(self.phase, Phase::AwaitingSpool));
        self.phase = Phase::Command;
        self.transaction = None;
        match outcome {
            Ok(()) => Reply::new(250, (2, 0, 0), format!("Ok: queued as {queue_id}")),
            Err(SpoolRefusal::NoSpace(why)) => Reply::new(
                452,
                (4, 3, 1),
                format!("Insufficient system storage: {why}; try again later"),
            ),
            Err(SpoolRefusal::Failed(_)) => Reply::new(
                451,
                (4, 3, 0),
                "Temporary failure storing the message; please try again later",
            ),
            Err(SpoolRefusal::Refused(reply)) => reply,
        }
    }

    fn count_errors(&mut self, step: Step) -> Step {
        if let Step::Reply(reply) = &step
            && reply.code >= 500
            && !matches!(self.phase, Phase::Closed)
        {
            self.errors += 1;
            if self.errors > self.limits.errors_max {
                self.phase = Phase::Closed;
                return Step::Reply(Reply::new(
                    421,
                    (4, 7, 0),
                    format!(
                        "{} Too many errors, closing connection",
                        self.limits.hostname
                    ),
                ));
            }
        }
        step
    }

    /// Removes `n` consumed bytes from the front of the input.
    fn consume(&mut self, n: usize) {
        self.input.drain(..n);
    }

    fn skip_line(&mut self) -> Option<Step> {
        match self.input.iter().position(|&b| b == b'\n') {
            Some(end) => {
                self.consume(end + 1);
                self.phase = Phase::Command;
                None
            }
            None => {
                self.input.clear();
                Some(Step::NeedInput)
            }
        }
    }

    fn command(&mut self, policy: &dyn RecipientPolicy) -> Option<Step> {
        let max = self.limits.line_length_max;
        let Some(end) = self.input.iter().take(max).position(|&b| b == b'\n') else {
            if self.input.len() >= max {
                self.consume(max);
                self.phase = Phase::SkipLine;
                return Some(Step::Reply(Reply::new(500, (5, 5, 2), "Line too long")));
            }
            return Some(Step::NeedInput);
        };
        let line: Vec<u8> = self.input.drain(..=end).collect();
        let request = Request::parse(&mut line.iter())
            .map(Request::into_owned)
            .map(|request| bare_postmaster(request, &line));
        Some(match request {
            Ok(request) => self.request(request, policy),
            Err(_) if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"BDAT") => {
                // A BDAT whose size cannot be read is followed by bytes we cannot
                // count: reading them as commands would let the chunk's content speak
                // for the client. Close, as Postfix does (RFC 3030 leaves no way to
                // resynchronise).
                self.phase = Phase::Closed;
                self.transaction = None;
                Step::Reply(Reply::new(
                    501,
                    (5, 5, 4),
                    "Syntax: BDAT chunk-size [LAST]; closing connection",
                ))
            }
            Err(error) => Step::Reply(parse_error_reply(error)),
        })
    }

    fn request(&mut self, request: Request<String>, policy: &dyn RecipientPolicy) -> Step {
        if matches!(request, Request::StartTls) {
            return self.starttls();
        }
        let reply = match request {
            Request::Ehlo { host } => self.hello(host, true),
            Request::Helo { host } => self.hello(host, false),
            Request::Lhlo { .. } => Reply::new(500, (5, 5, 1), "LHLO is for LMTP; use EHLO"),
            Request::Mail { from } => self.mail(from, policy),
            Request::Rcpt { to } => self.rcpt(to, policy),
            Request::Data => self.data_command(),
            Request::Bdat {
                chunk_size,
                is_last,
            } => return self.bdat_command(chunk_size, is_last),
            Request::Rset => {
                self.transaction = None;
                Reply::new(250, (2, 0, 0), "Ok")
            }
            Request::Noop { .. } => Reply::new(250, (2, 0, 0), "Ok"),
            Request::Quit => {
                self.phase = Phase::Closed;
                Reply::new(221, (2, 0, 0), "Bye")
            }
            Request::Vrfy { .. } => Reply::new(
                252,
                (2, 5, 0),
                "Cannot VRFY user, but will accept message and attempt delivery",
            ),
            Request::Expn { .. } => Reply::new(502, (5, 5, 1), "EXPN is not available"),
            Request::Help { .. } => Reply::new(
                214,
                (2, 0, 0),
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT",
            ),
            Request::StartTls => unreachable!("handled above"),
            Request::Auth {
                mechanism,
                initial_response,
            } => return self.auth_command(mechanism, initial_response),
            Request::Etrn { .. } | Request::Atrn { .. } | Request::Burl { .. } => {
                Reply::new(502, (5, 5, 1), "Command not implemented")
            }
        };
        Step::Reply(reply)
    }

    fn auth_command(&mut self, mechanism: u64, initial: String) -> Step {
        let refuse = |code, status, text: &'static str| Step::Reply(Reply::new(code, status, text));
        if !self.auth.offered {
            return refuse(503, (5, 5, 1), "Authentication is not enabled on this port");
        }
        if self.authenticated.is_some() {
            return refuse(503, (5, 5, 1), "Already authenticated");
        }
        if self.transaction.is_some() {
            return refuse(
                503,
                (5, 5, 1),
                "AUTH is not allowed during a mail transaction",
            );
        }
        if !self.helo.as_ref().is_some_and(|(_, extended)| *extended) {
            return refuse(503, (5, 5, 1), "Send EHLO first");
        }
        if !self.auth_usable() {
            return refuse(
                538,
                (5, 7, 11),
                "Encryption required for requested authentication mechanism; use STARTTLS",
            );
        }
        let initial = (!initial.is_empty()).then_some(initial);
        if mechanism == smtp_proto::AUTH_PLAIN {
            match initial {
                Some(response) => self.plain_response(response.as_bytes()),
                None => {
                    self.phase = Phase::Auth(AuthStep::Plain);
                    Step::Reply(Reply::plain(334, vec!["".into()]))
                }
            }
        } else if mechanism == smtp_proto::AUTH_LOGIN {
            match initial {
                Some(user) => match decode_base64(user.as_bytes()) {
                    Some(user) => {
                        self.phase = Phase::Auth(AuthStep::LoginPassword(user));
                        Step::Reply(Reply::plain(334, vec!["UGFzc3dvcmQ6".into()]))
                    }
                    None => refuse(501, (5, 5, 2), "Invalid base64"),
                },
                None => {
                    self.phase = Phase::Auth(AuthStep::LoginUser);
                    Step::Reply(Reply::plain(334, vec!["VXNlcm5hbWU6".into()]))
                }
            }
        } else {
            refuse(
                504,
                (5, 5, 4),
                "Unrecognized authentication type; use PLAIN or LOGIN",
            )
        }
    }

    /// A line of an AUTH exchange.
    fn auth_response(&mut self) -> Option<Step> {
        let max = self.limits.line_length_max;
        let Some(end) = self.input.iter().take(max).position(|&b| b == b'\n') else {
            if self.input.len() >= max {
                self.input.clear();
                self.phase = Phase::SkipLine;
                return Some(Step::Reply(Reply::new(
                    500,
                    (5, 5, 6),
                    "Authentication exchange line is too long",
                )));
            }
            return Some(Step::NeedInput);
        };
        let mut line: Vec<u8> = self.input.drain(..=end).collect();
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let Phase::Auth(step) = std::mem::replace(&mut self.phase, Phase::Command) else {
            unreachable!("called in the Auth phase");
        };
        if line == b"*" {
            return Some(Step::Reply(Reply::new(
                501,
                (5, 0, 0),
                "Authentication cancelled",
            )));
        }
        Some(match step {
            AuthStep::Plain => self.plain_response(&line),
            AuthStep::LoginUser => match decode_base64(&line) {
                Some(user) => {
                    self.phase = Phase::Auth(AuthStep::LoginPassword(user));
                    Step::Reply(Reply::plain(334, vec!["UGFzc3dvcmQ6".into()]))
                }
                None => Step::Reply(Reply::new(501, (5, 5, 2), "Invalid base64")),
            },
            AuthStep::LoginPassword(user) => match decode_base64(&line) {
                Some(password) => self.check_password(user, password),
                None => Step::Reply(Reply::new(501, (5, 5, 2), "Invalid base64")),
            },
        })
    }

    /// A PLAIN response (RFC 4616): authorization identity, user, password.
    fn plain_response(&mut self, response: &[u8]) -> Step {
        let decoded = if response == b"=" {
            Some(Vec::new())
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(response)
                .ok()
        };
        let Some(decoded) = decoded else {
            return Step::Reply(Reply::new(501, (5, 5, 2), "Invalid base64"));
        };
        let parts: Vec<&[u8]> = decoded.split(|b| *b == 0).collect();
        let [authz, user, password] = parts.as_slice() else {
            return Step::Reply(Reply::new(501, (5, 5, 2), "Malformed PLAIN response"));
        };
        let (Ok(authz), Ok(user), Ok(password)) = (
            std::str::from_utf8(authz),
            std::str::from_utf8(user),
            std::str::from_utf8(password),
        ) else {
            return Step::Reply(Reply::new(
                501,
                (5, 5, 2),
                "The PLAIN response is not UTF-8",
            ));
        };
        if !authz.is_empty() && !authz.eq_ignore_ascii_case(user) {
            return Step::Reply(Reply::new(
                535,
                (5, 7, 8),
                "Acting as another user is not allowed",
            ));
        }
        self.check_password(user.to_string(), password.to_string())
    }

    fn check_password(&mut self, user: String, password: String) -> Step {
        self.phase = Phase::AwaitingAuth;
        self.auth_pending = Some(user.clone());
        Step::Authenticate { user, password }
    }

    fn starttls(&mut self) -> Step {
        if self.tls {
            return Step::Reply(Reply::new(503, (5, 5, 1), "TLS is already active"));
        }
        if !self.starttls {
            return Step::Reply(Reply::new(502, (5, 5, 1), "STARTTLS is not available here"));
        }
        // Pipelined after STARTTLS, in the clear: never read as commands of the
        // encrypted session.
        self.input.clear();
        self.transaction = None;
        Step::StartTls(Reply::new(220, (2, 0, 0), "Ready to start TLS"))
    }

    fn hello(&mut self, host: String, extended: bool) -> Reply {
        // The name goes into the Received header and the reply: refuse control
        // characters and bytes that were not UTF-8 (the parser turned them into U+FFFD),
        // as Postfix does ("bad UTF-8 syntax"); any other name is accepted (many clients
        // send names that are not their DNS name).
        if host.len() > 255 || host.chars().any(|c| c.is_control() || c == '\u{FFFD}') {
            return Reply::new(501, (5, 5, 4), "Invalid domain name");
        }
        self.transaction = None;
        let name = self.limits.hostname.clone();
        self.helo = Some((host.clone(), extended));
        if !extended {
            return Reply::plain(250, vec![name.into()]);
        }
        let mut lines = vec![
            format!("{name} greets {host}").into(),
            "PIPELINING".into(),
            format!("SIZE {}", self.limits.message_size_max).into(),
            "8BITMIME".into(),
            "ENHANCEDSTATUSCODES".into(),
            "SMTPUTF8".into(),
            "CHUNKING".into(),
            "DSN".into(),
        ];
        if self.starttls {
            lines.push("STARTTLS".into());
        }
        if self.auth_usable() && self.authenticated.is_none() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        lines.push("HELP".into());
        Reply::plain(250, lines)
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>, policy: &dyn RecipientPolicy) -> Reply {
        let Some((_, extended)) = &self.helo else {
            return Reply::new(503, (5, 5, 1), "Send EHLO or HELO first");
        };
        if self.transaction.is_some() {
            return Reply::new(503, (5, 5, 1), "Nested MAIL command; send RSET first");
        }
        if from.size > self.limits.message_size_max {
            return Reply::new(
                552,
                (5, 3, 4),
                format!(
                    "Message size exceeds the limit of {} bytes",
                    self.limits.message_size_max
                ),
            );
        }
        let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
        if smtputf8 && !extended {
            return Reply::new(503, (5, 5, 1), "SMTPUTF8 needs EHLO");
        }
        // RFC 5321 4.1.2: no control character belongs in a mailbox (the parser lets
        // DEL and others through, and replies and DSNs would carry them).
        if from.address.chars().any(char::is_control) {
            return Reply::new(501, (5, 1, 7), "Bad sender address syntax");
        }
        if !from.address.is_ascii() && !smtputf8 {
            return Reply::new(553, (5, 6, 7), "Non-ASCII sender address needs SMTPUTF8");
        }
        if self.auth.required && self.authenticated.is_none() {
            return Reply::new(530, (5, 7, 0), "Authentication required");
        }
        if let Some((_, recipient)) = &self.authenticated {
            match policy.submission_refusal(*recipient) {
                Some(SubmissionRefusal::OverQuota) => {
                    return Reply::new(
                        552,
                        (5, 2, 2),
                        "Your mailbox is over its quota; delete messages before sending",
                    );
                }
                Some(SubmissionRefusal::RateLimited(why)) => {
                    return Reply::new(451, (4, 7, 1), why);
                }
                None => {}
            }
        }
        if let Some((user, recipient)) = &self.authenticated
            && !from.address.is_empty()
            && !policy.may_send_as(*recipient, &from.address)
        {
            return Reply::new(
                553,
                (5, 7, 1),
                format!(
                    "<{}>: Sender address rejected: not owned by user {user}",
                    from.address
                ),
            );
        }
        if let Some(why) = policy.storage_refusal(from.size as u64) {
            return Reply::new(
                452,
                (4, 3, 1),
                format!("Insufficient system storage: {why}; try again later"),
            );
        }
        let ret = if from.flags & smtp_proto::MAIL_RET_FULL != 0 {
            Some(mailroom_store::Ret::Full)
        } else if from.flags & smtp_proto::MAIL_RET_HDRS != 0 {
            Some(mailroom_store::Ret::Headers)
        } else {
            None
        };
        self.transaction = Some(Transaction {
            mail_from: from.address,
            smtputf8,
            envelope: mailroom_store::Envelope {
                ret,
                env_id: from.env_id,
                unauthenticated: !self.relay_allowed && self.authenticated.is_none(),
                authenticated_as: self.authenticated.as_ref().map(|(user, _)| user.clone()),
                ..Default::default()
            },
            ..Transaction::default()
        });
        Reply::new(250, (2, 1, 0), "Sender ok")
    }

    fn rcpt(&mut self, to: smtp_proto::RcptTo<String>, policy: &dyn RecipientPolicy) -> Reply {
        // Authenticated users relay (their sender address was checked at MAIL).
        let relay_allowed = self.relay_allowed || self.authenticated.is_some();
        let primary_domain = self.limits.primary_domain.clone();
        let recipients_max = self.limits.recipients_max;
        let Some(transaction) = &mut self.transaction else {
            return Reply::new(503, (5, 5, 1), "Send MAIL first");
        };
        if transaction.recipients.len() >= recipients_max {
            return Reply::new(452, (4, 5, 3), "Too many recipients");
        }
        if to.address.chars().any(char::is_control) {
            return Reply::new(501, (5, 1, 3), "Bad recipient address syntax");
        }
        if !to.address.is_ascii() && !transaction.smtputf8 {
            return Reply::new(553, (5, 6, 7), "Non-ASCII recipient address needs SMTPUTF8");
        }
        let mut address = to.address;
        if address.is_empty() {
            return Reply::new(501, (5, 1, 3), "Bad recipient address syntax");
        }
        if address.eq_ignore_ascii_case("postmaster") {
            address = format!("postmaster@{primary_domain}");
        }
        match policy.resolve(&address) {
            Resolution::Local(recipient) if policy.over_quota(&recipient) => {
                return Reply::new(
                    452,
                    (4, 2, 2),
                    format!("<{address}>: Mailbox full, try again later"),
                );
            }
            Resolution::Local(_) => {
                if let Some(why) = policy.undeliverable(&address) {
                    return undeliverable_reply(&address, &why);
                }
            }
            Resolution::Remote if relay_allowed => {
                if let Some(why) = policy.undeliverable(&address) {
                    return undeliverable_reply(&address, &why);
                }
            }
            Resolution::UnknownLocal => {
                return Reply::new(
                    550,
                    (5, 1, 1),
                    format!("<{address}>: Recipient address rejected: no such user here"),
                );
            }
            Resolution::Remote => {
                return Reply::new(550, (5, 7, 1), format!("<{address}>: Relay access denied"));
            }
        }
        let notify = (to.flags
            & (smtp_proto::RCPT_NOTIFY_SUCCESS
                | smtp_proto::RCPT_NOTIFY_FAILURE
                | smtp_proto::RCPT_NOTIFY_DELAY
                | smtp_proto::RCPT_NOTIFY_NEVER)
            != 0)
            .then_some(mailroom_store::Notify {
                success: to.flags & smtp_proto::RCPT_NOTIFY_SUCCESS != 0,
                failure: to.flags & smtp_proto::RCPT_NOTIFY_FAILURE != 0,
                delay: to.flags & smtp_proto::RCPT_NOTIFY_DELAY != 0,
            });
        if notify.is_some()
            && to.flags & smtp_proto::RCPT_NOTIFY_NEVER != 0
            && to.flags
                & (smtp_proto::RCPT_NOTIFY_SUCCESS
                    | smtp_proto::RCPT_NOTIFY_FAILURE
                    | smtp_proto::RCPT_NOTIFY_DELAY)
                != 0
        {
            return Reply::new(
                501,
                (5, 5, 4),
                "NOTIFY=NEVER cannot be combined with other values",
            );
        }
        transaction
            .envelope
            .recipients
            .push(mailroom_store::RecipientState {
                address: address.clone(),
                // smtp-proto gives the decoded address without its type; DSNs need
                // `type;address` (RFC 3464 Original-Recipient).
                orcpt: to.orcpt.map(|o| {
                    if o.contains(';') {
                        o
                    } else {
                        format!("rfc822;{o}")
                    }
                }),
                notify,
                ..Default::default()
            });
        transaction.recipients.push(address);
        Reply::new(250, (2, 1, 5), "Recipient ok")
    }

    fn data_command(&mut self) -> Reply {
        match &self.transaction {
            None => Reply::new(503, (5, 5, 1), "Send MAIL first"),
            Some(t) if t.bdat_used => Reply::new(503, (5, 5, 1), "DATA cannot follow BDAT"),
            Some(t) if t.recipients.is_empty() => Reply::new(554, (5, 5, 1), "No valid recipients"),
            Some(_) => {
                self.phase = Phase::Data(DataReceiver::new());
                Reply::plain(354, vec!["End data with <CR><LF>.<CR><LF>".into()])
            }
        }
    }

    fn bdat_command(&mut self, chunk_size: usize, is_last: bool) -> Step {
        // A chunk that alone exceeds the limit cannot be accepted, and reading past it
        // (up to 2^64 bytes) would tie the connection up for good: refuse and close, the
        // only way to resynchronise (RFC 3030 leaves the server no other).
        if chunk_size > self.limits.message_size_max {
            self.phase = Phase::Closed;
            self.transaction = None;
            return Step::Reply(Reply::new(
                552,
                (5, 3, 4),
                format!(
                    "BDAT chunk of {chunk_size} octets exceeds the message size limit of {} bytes; closing connection",
                    self.limits.message_size_max
                ),
            ));
        }
        let refusal = match &mut self.transaction {
            None => Some(Refusal::NoTransaction),
            Some(t) if t.recipients.is_empty() => Some(Refusal::NoTransaction),
            Some(t) => {
                t.bdat_used = true;
                // Checked: a chunk size from the wire can be anything up to u64::MAX.
                if t.bdat_failed.is_none()
                    && t.data
                        .len()
                        .checked_add(chunk_size)
                        .is_none_or(|total| total > self.limits.message_size_max)
                {
                    t.bdat_failed = Some(Refusal::TooBig);
                    t.data = Vec::new();
                }
                t.bdat_failed
            }
        };
        self.phase = match refusal {
            None => Phase::Bdat(BdatReceiver::new(chunk_size), is_last),
            Some(refusal) => Phase::BdatDiscard(BdatReceiver::new(chunk_size), is_last, refusal),
        };
        // The chunk's bytes follow at once; the reply comes after they are read.
        self.bdat().unwrap_or(Step::NeedInput)
    }

    fn data(&mut self) -> Option<Step> {
        let size_max = self.limits.message_size_max;
        let finished = match &mut self.phase {
            Phase::Data(receiver) => {
                let transaction = self.transaction.as_mut().expect("DATA has a transaction");
                let got = receiver.ingest(&self.input, Some(&mut transaction.data));
                let too_big = transaction.data.len() > size_max;
                if too_big {
                    transaction.data = Vec::new();
                    if !got.done {
                        self.phase = Phase::DataDiscard(receiver.clone(), Refusal::TooBig);
                    }
                }
                self.input.drain(..got.consumed);
                got.done.then_some(too_big.then_some(Refusal::TooBig))
            }
            Phase::DataDiscard(receiver, refusal) => {
                let got = receiver.ingest(&self.input, None);
                self.input.drain(..got.consumed);
                got.done.then_some(Some(*refusal))
            }
            _ => unreachable!("data() only runs in a data phase"),
        };
        match finished {
            None => Some(Step::NeedInput),
            Some(refusal) => Some(self.end_of_message(refusal)),
        }
    }

    fn bdat(&mut self) -> Option<Step> {
        let (got, is_last, refusal) = match &mut self.phase {
            Phase::Bdat(receiver, is_last) => {
                let transaction = self.transaction.as_mut().expect("BDAT has a transaction");
                let got = receiver.ingest(&self.input, Some(&mut transaction.data));
                (got, *is_last, None)
            }
            Phase::BdatDiscard(receiver, is_last, refusal) => {
                (receiver.ingest(&self.input, None), *is_last, Some(*refusal))
            }
            _ => unreachable!("bdat() only runs in a BDAT phase"),
        };
        self.input.drain(..got.consumed);
        if !got.done {
            // The rest of the chunk has not arrived: read more (never loop on nothing).
            return Some(Step::NeedInput);
        }
        if is_last {
            return Some(self.end_of_message(refusal));
        }
        self.phase = Phase::Command;
        Some(Step::Reply(match refusal {
            None => {
                let size = self.transaction.as_ref().map_or(0, |t| t.data.len());
                Reply::new(250, (2, 0, 0), format!("{size} octets received"))
            }
            Some(refusal) => refusal_reply(refusal, self.limits.message_size_max),
        }))
    }

    fn end_of_message(&mut self, refusal: Option<Refusal>) -> Step {
        self.phase = Phase::Command;
        if let Some(refusal) = refusal {
            if refusal != Refusal::NoTransaction {
                self.transaction = None;
            }
            return Step::Reply(refusal_reply(refusal, self.limits.message_size_max));
        }
        let mut transaction = self
            .transaction
            .take()
            .expect("end of message has a transaction");
        if let Some(reply) = self.content_problem(&transaction.data) {
            return Step::Reply(reply);
        }
        // RFC 8601 5: results claiming to come from this server, made by someone else,
        // must not reach a reader who trusts this server's name.
        if let Some(cleaned) = without_our_results(&transaction.data, &self.limits.hostname) {
            transaction.data = cleaned;
        }
        self.messages += 1;
        let queue_id = format!("{:014X}{:04X}", self.connection_id, self.messages);
        // Sized once: the trace field and what submission may add (a Message-ID and a
        // Date: under 1 KiB together), and the message.
        let mut body = Vec::with_capacity(1024 + transaction.data.len());
        self.received_header(&mut body, &transaction, &queue_id, self.now_ms);
        if self.authenticated.is_some() {
            // Submission completes what a client left out (RFC 6409 8.2, 8.3).
            let header_end =
                find(&transaction.data, b"\r\n\r\n").map_or(transaction.data.len(), |p| p + 2);
            let header = &transaction.data[..header_end];
            if !has_field(header, b"message-id") {
                body.extend_from_slice(
                    format!("Message-ID: <{queue_id}@{}>\r\n", self.limits.hostname).as_bytes(),
                );
            }
            if !has_field(header, b"date") {
                let date = mail_builder::headers::date::Date::new(self.now_ms / 1000).to_rfc822();
                body.extend_from_slice(format!("Date: {date}\r\n").as_bytes());
            }
        }
        body.extend_from_slice(&transaction.data);
        self.phase = Phase::AwaitingSpool;
        Step::Submit(Submission {
            queue_id,
            mail_from: transaction.mail_from,
            recipients: transaction.recipients,
            body,
            envelope: transaction.envelope,
        })
    }

    /// Refuses content that would be dangerous to store or relay.
    fn content_problem(&self, data: &[u8]) -> Option<Reply> {
        let header_end = find(data, b"\r\n\r\n").map_or(data.len(), |p| p + 2);
        if header_end > self.limits.header_size_max {
            return Some(Reply::new(
                552,
                (5, 3, 4),
                format!(
                    "Message header exceeds the limit of {} bytes",
                    self.limits.header_size_max
                ),
            ));
        }
        // SMTP smuggling: a bare LF or CR could end this message early at a less careful
        // server downstream. Refuse rather than guess (RFC 5321 2.3.8).
        if has_bare_cr_or_lf(data) {
            return Some(Reply::new(
                550,
                (5, 6, 0),
                "Message contains a bare CR or LF; lines must end with CRLF (RFC 5321 2.3.8)",
            ));
        }
        None
    }

    /// Appends the `Received:` trace field (RFC 5321 4.4) to `out`.
    fn received_header(
        &self,
        out: &mut Vec<u8>,
        transaction: &Transaction,
        queue_id: &str,
        now_ms: i64,
    ) {
        use std::io::Write;
        let (helo, extended) = self
            .helo
            .as_ref()
            .map_or(("unknown", false), |(h, e)| (h.as_str(), *e));
        // RFC 3848 and RFC 6531: an S for TLS, an A for AUTH.
        let base = match (extended, transaction.smtputf8) {
            (true, true) => "UTF8SMTP",
            (true, false) => "ESMTP",
            (false, _) => "SMTP",
        };
        let tls = if self.tls && extended { "S" } else { "" };
        let auth = if self.authenticated.is_some() && extended {
            "A"
        } else {
            ""
        };
        let date = mail_builder::headers::date::Date::new(now_ms / 1000).to_rfc822();
        // Writing into a Vec cannot fail.
        let _ = write!(
            out,
            "Received: from {helo} ([{ip}])\r\n\tby {host} (Mailroom) with {base}{tls}{auth} id {queue_id}",
            helo = sanitize(helo),
            ip = self.peer.ip(),
            host = self.limits.hostname,
        );
        if let [one] = transaction.recipients.as_slice() {
            let _ = write!(out, "\r\n\tfor <{one}>");
        }
        let _ = write!(out, ";\r\n\t{date}\r\n");
    }
}

/// The message without its `Authentication-Results` fields whose authserv-id is
/// `hostname` (RFC 8601 5: forged results in this server's name are removed), or `None`
/// when it has none. Only the header section is looked at; everything else, the body
/// included, stays byte for byte.
fn without_our_results(data: &[u8], hostname: &str) -> Option<Vec<u8>> {
    const NAME: &[u8] = b"authentication-results";
    // An empty line first: no header section at all (the body may hold anything).
    if data.starts_with(b"\r\n") {
        return None;
    }
    let header_end = find(data, b"\r\n\r\n").map_or(data.len(), |p| p + 2);
    // The fields, each with its continuation lines: (start, end) byte ranges.
    let mut fields: Vec<(usize, usize)> = Vec::new();
    let mut at = 0;
    while at < header_end {
        let line_end = find(&data[at..header_end], b"\r\n").map_or(header_end, |p| at + p + 2);
        if matches!(data[at], b' ' | b'\t')
            && let Some(last) = fields.last_mut()
        {
            last.1 = line_end;
        } else {
            fields.push((at, line_end));
        }
        at = line_end;
    }
    let ours = |field: &[u8]| {
        let Some(colon) = field.iter().position(|b| *b == b':') else {
            return false;
        };
        if !field[..colon].trim_ascii().eq_ignore_ascii_case(NAME) {
            return false;
        }
        // The authserv-id: the value up to the first ';' (or the end), unfolded.
        let value = &field[colon + 1..];
        let id_end = value.iter().position(|b| *b == b';').unwrap_or(value.len());
        let id: Vec<u8> = value[..id_end]
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        id.eq_ignore_ascii_case(hostname.as_bytes())
    };
    if !fields.iter().any(|&(a, b)| ours(&data[a..b])) {
        return None;
    }
    let mut out = Vec::with_capacity(data.len());
    for &(a, b) in &fields {
        if !ours(&data[a..b]) {
            out.extend_from_slice(&data[a..b]);
        }
    }
    out.extend_from_slice(&data[header_end..]);
    Some(out)
}

/// Whether a header section has a field named `name` (lower case).
fn has_field(header: &[u8], name: &[u8]) -> bool {
    header.split(|b| *b == b'\n').any(|line| {
        line.len() > name.len()
            && line[..name.len()].eq_ignore_ascii_case(name)
            && line[name.len()..].trim_ascii_start().first() == Some(&b':')
    })
}

/// Base64 as UTF-8 text (an AUTH LOGIN user name or password).
fn decode_base64(line: &[u8]) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(line)
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// `RCPT TO:<Postmaster>` (no domain) must be accepted (RFC 5321 4.5.1); the parser
/// returns it with an empty address, so recover it from the line.
fn bare_postmaster(request: Request<String>, line: &[u8]) -> Request<String> {
    match request {
        Request::Rcpt { mut to } if to.address.is_empty() => {
            let line = String::from_utf8_lossy(line).to_ascii_lowercase();
            if line.contains("<postmaster>") {
                to.address = "postmaster".into();
            }
            Request::Rcpt { to }
        }
        other => other,
    }
}

/// 550 for a recipient that could reach nobody; the enhanced code comes from the
/// reason ("5.1.10 the contact has no target address" gives 5.1.10).
fn undeliverable_reply(address: &str, why: &str) -> Reply {
    let code = why
        .split_whitespace()
        .next()
        .and_then(|c| {
            let mut parts = c.split('.').map(|p| p.parse::<u16>().ok());
            match (parts.next()?, parts.next()?, parts.next()?, parts.next()) {
                (Some(5), Some(b), Some(c), None) => Some((5u8, b, c)),
                _ => None,
            }
        })
        .unwrap_or((5, 1, 1));
    let text = why.split_once(' ').map_or(why, |(_, t)| t);
    Reply::new(
        550,
        code,
        format!("<{address}>: Recipient address rejected: {text}"),
    )
}

fn refusal_reply(refusal: Refusal, size_max: usize) -> Reply {
    match refusal {
        Refusal::TooBig => Reply::new(
            552,
            (5, 3, 4),
            format!("Message size exceeds the limit of {size_max} bytes"),
        ),
        Refusal::NoTransaction => Reply::new(503, (5, 5, 1), "Send MAIL and RCPT first"),
        Refusal::NoMemory => Reply::new(
            452,
            (4, 3, 1),
            "Insufficient system storage for this message now; try again later",
        ),
    }
}

fn parse_error_reply(error: ProtoError) -> Reply {
    match error {
        ProtoError::UnknownCommand => Reply::new(500, (5, 5, 1), "Unknown command"),
        ProtoError::InvalidSenderAddress => Reply::new(501, (5, 1, 7), "Bad sender address syntax"),
        ProtoError::InvalidRecipientAddress => {
            Reply::new(501, (5, 1, 3), "Bad recipient address syntax")
        }
        ProtoError::InvalidParameter { param } => {
            Reply::new(501, (5, 5, 4), format!("Invalid parameter {param}"))
        }
        ProtoError::UnsupportedParameter { param } => Reply::new(
            555,
            (5, 5, 4),
            format!("Unsupported parameter {}", sanitize(&param)),
        ),
        ProtoError::SyntaxError { syntax } => {
            Reply::new(501, (5, 5, 4), format!("Syntax: {syntax}"))
        }
        ProtoError::ResponseTooLong => Reply::new(500, (5, 5, 2), "Line too long"),
        ProtoError::NeedsMoreData { .. } | ProtoError::InvalidResponse { .. } => {
            Reply::new(500, (5, 5, 2), "Syntax error")
        }
    }
}

/// Keeps client-supplied text out of headers and replies unless it is printable.
fn sanitize(text: &str) -> Cow<'_, str> {
    if text
        .chars()
        .all(|c| !c.is_control() && c != '(' && c != ')')
        && text.len() <= 255
    {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(
            text.chars()
                .filter(|c| !c.is_control() && *c != '(' && *c != ')')
                .take(255)
                .collect(),
        )
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// Whether `data` holds a CR not followed by LF, or an LF not preceded by CR. Jumps
/// from line end to line end (`memchr2`) rather than looking at every byte: it runs
/// over every accepted message on a session's thread.
fn has_bare_cr_or_lf(data: &[u8]) -> bool {
    memchr::memchr2_iter(b'\r', b'\n', data).any(|index| match data[index] {
        b'\n' => index == 0 || data[index - 1] != b'\r',
        _ => data.get(index + 1) != Some(&b'\n'),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line-end scan agrees with the byte-by-byte definition on every string of up
    /// to seven bytes over CR, LF and one other byte.
    #[test]
    fn bare_cr_or_lf_is_found_wherever_it_is() {
        fn by_definition(data: &[u8]) -> bool {
            data.iter().enumerate().any(|(i, &b)| {
                (b == b'\n' && (i == 0 || data[i - 1] != b'\r'))
                    || (b == b'\r' && data.get(i + 1) != Some(&b'\n'))
            })
        }
        let alphabet = [b'\r', b'\n', b'x'];
        let mut checked = 0;
        for len in 0..=7u32 {
            for mut code in 0..3usize.pow(len) {
                let data: Vec<u8> = (0..len)
                    .map(|_| {
                        let byte = alphabet[code % 3];
                        code /= 3;
                        byte
                    })
                    .collect();
                assert_eq!(has_bare_cr_or_lf(&data), by_definition(&data), "{data:?}");
                checked += 1;
            }
        }
        assert_eq!(checked, 3280);
        assert!(!has_bare_cr_or_lf(b"a\r\nb\r\n"));
        assert!(has_bare_cr_or_lf(b"a\r\nb\nc\r\n"));
    }

    struct Fixed;
    impl RecipientPolicy for Fixed {
        fn resolve(&self, address: &str) -> Resolution {
            if address.ends_with("@remote.test") {
                Resolution::Remote
            } else if address.starts_with("nobody@") {
                Resolution::UnknownLocal
            } else {
                Resolution::Local(Arc::new(mailroom_directory::Recipient {
                    id: 1,
                    kind: mailroom_directory::RecipientKind::Mailbox,
                    alias: "a".into(),
                    display_name: String::new(),
                    given_name: String::new(),
                    surname: String::new(),
                    initials: String::new(),
                    addresses: vec![mailroom_directory::ProxyAddress {
                        address: address.into(),
                        primary: true,
                        generated: false,
                    }],
                    target_address: None,
                    members: Vec::new(),
                    owner: None,
                    send_as: Vec::new(),
                    hidden: false,
                    admin: false,
                    protocols: Default::default(),
                    quota: Default::default(),
                    password_hash: None,
                }))
            }
        }
    }

    /// Feeds `input`, answers every submission with success, returns the wire output and
    /// the submissions.
    fn run(limits: SmtpLimits, input: &[u8]) -> (String, Vec<Submission>) {
        run_in_reads(limits, input, input.len().max(1))
    }

    fn codes(out: &str) -> Vec<&str> {
        out.lines()
            .filter(|l| l.as_bytes().get(3) == Some(&b' '))
            .map(|l| &l[..3])
            .collect()
    }

    #[test]
    fn pipelined_transaction() {
        let (out, subs) = run(
            SmtpLimits::default(),
            b"EHLO c\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\nRCPT TO:<nobody@l.test>\r\n\
RCPT TO:<b@remote.test>\r\nDATA\r\nSubject: t\r\n\r\n..dot\r\n.\r\nQUIT\r\n",
        );
        assert_eq!(
            codes(&out),
            ["250", "250", "250", "550", "550", "354", "250", "221"]
        );
        assert!(out.contains("550 5.1.1"));
        assert!(out.contains("550 5.7.1"));
        assert_eq!(subs.len(), 1);
        assert_eq!(subs[0].recipients, ["a@l.test"]);
        let body = String::from_utf8(subs[0].body.clone()).unwrap();
        assert!(body.starts_with(
            "Received: from c ([127.0.0.1])\r\n\tby localhost (Mailroom) with ESMTP id "
        ));
        assert!(body.ends_with("\r\nSubject: t\r\n\r\n.dot\r\n"), "{body:?}");
    }

    #[test]
    fn bdat_chunks_and_order_errors() {
        let (out, subs) = run(
            SmtpLimits::default(),
            b"EHLO c\r\nBDAT 3\r\nabcMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\nBDAT 5\r\nhello\
BDAT 8 LAST\r\n world\r\nDATA\r\n",
        );
        assert_eq!(
            codes(&out),
            ["250", "503", "250", "250", "250", "250", "503"]
        );
        assert_eq!(subs.len(), 1);
        assert!(subs[0].body.ends_with(b"hello world\r\n"));
    }

    #[test]
    fn oversize_data_is_discarded_and_refused() {
        let limits = SmtpLimits {
            message_size_max: 100,
            ..SmtpLimits::default()
        };
        let mut input = b"EHLO c\r\nMAIL FROM:<s@x.test> SIZE=101\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\nDATA\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 300));
        input.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
        let (out, subs) = run(limits, &input);
        assert_eq!(
            codes(&out),
            ["250", "552", "250", "250", "354", "552", "250"]
        );
        assert!(subs.is_empty());
    }

    #[test]
    fn smuggled_end_of_data_is_refused_and_makes_no_second_message() {
        let (out, subs) = run(
            SmtpLimits::default(),
            b"EHLO c\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\nDATA\r\nSubject: a\r\n\r\nx\n.\r\n\
MAIL FROM:<evil@x.test>\r\nRCPT TO:<a@l.test>\r\nDATA\r\nSubject: smuggled\r\n\r\n.\r\n",
        );
        assert!(subs.is_empty(), "{out}");
        assert_eq!(codes(&out), ["250", "250", "250", "354", "550"]);
        assert!(out.contains("bare CR or LF"));
    }

    #[test]
    fn limits_on_lines_recipients_and_errors() {
        let limits = SmtpLimits {
            recipients_max: 1,
            line_length_max: 64,
            errors_max: 2,
            ..SmtpLimits::default()
        };
        let mut input =
            b"EHLO c\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\nRCPT TO:<b@l.test>\r\n"
                .to_vec();
        input.extend(std::iter::repeat_n(b'A', 200));
        input.extend_from_slice(b"\r\nFOO\r\nBAR\r\nNOOP\r\n");
        let (out, _) = run(limits, &input);
        assert_eq!(
            codes(&out),
            ["250", "250", "250", "452", "500", "500", "421"]
        );
    }

    #[test]
    fn smtputf8_addresses_need_the_parameter() {
        let (out, subs) = run(
            SmtpLimits::default(),
            "EHLO c\r\nMAIL FROM:<jörg@x.test>\r\nMAIL FROM:<jörg@x.test> SMTPUTF8\r\nRCPT TO:<ñ@l.test>\r\nDATA\r\nSubject: é\r\n\r\nü\r\n.\r\n"
                .as_bytes(),
        );
        assert_eq!(codes(&out), ["250", "553", "250", "250", "354", "250"]);
        assert!(String::from_utf8_lossy(&subs[0].body).contains("with UTF8SMTP"));
    }

    /// Feeds `input` in reads of `step` bytes, like a socket would; counts the
    /// `advance` calls so a session that loops without input fails the test instead of
    /// hanging it.
    fn run_in_reads(limits: SmtpLimits, input: &[u8], step: usize) -> (String, Vec<Submission>) {
        let mut session = Session::new(Arc::new(limits), "127.0.0.1:1".parse().unwrap(), false, 7);
        let mut out = Vec::new();
        let mut submissions = Vec::new();
        let mut steps = 0usize;
        for piece in input.chunks(step) {
            session.receive(piece);
            loop {
                steps += 1;
                assert!(steps < 1_000_000, "the session loops without input");
                match session.advance(&Fixed, 0) {
                    Step::Reply(r) => r.render(&mut out),
                    Step::Submit(s) => {
                        let id = s.queue_id.clone();
                        submissions.push(s);
                        session.submitted(Ok(()), &id).render(&mut out);
                    }
                    Step::NeedInput | Step::Close => break,
                    Step::StartTls(_) => unreachable!("STARTTLS is not offered here"),
                    Step::Authenticate { .. } => unreachable!("AUTH is not offered here"),
                }
            }
        }
        (String::from_utf8(out).unwrap(), submissions)
    }

    /// Drives `input` and sheds the message being received once it holds more than
    /// `after` bytes (as the server does when its memory budget is spent).
    fn run_shedding(input: &[u8], after: usize) -> (String, Vec<Submission>, bool) {
        let mut session = Session::new(
            Arc::new(SmtpLimits::default()),
            "127.0.0.1:1".parse().unwrap(),
            false,
            7,
        );
        let (mut out, mut submissions, mut shed) = (Vec::new(), Vec::new(), false);
        for piece in input.chunks(1000) {
            session.receive(piece);
            loop {
                match session.advance(&Fixed, 0) {
                    Step::Reply(r) => r.render(&mut out),
                    Step::Submit(s) => {
                        let id = s.queue_id.clone();
                        submissions.push(s);
                        session.submitted(Ok(()), &id).render(&mut out);
                    }
                    Step::NeedInput | Step::Close => break,
                    Step::StartTls(_) => unreachable!("STARTTLS is not offered here"),
                    Step::Authenticate { .. } => unreachable!("AUTH is not offered here"),
                }
            }
            if !shed && session.message_bytes() > after {
                shed = session.shed();
                assert_eq!(session.message_bytes(), 0, "shedding frees the message");
            }
        }
        (String::from_utf8(out).unwrap(), submissions, shed)
    }

    #[test]
    fn a_shed_message_is_read_to_its_end_refused_for_now_and_the_session_goes_on() {
        let big = "x".repeat(78) + "\r\n";
        let mut data = b"EHLO c\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\nDATA\r\n".to_vec();
        for _ in 0..1000 {
            data.extend_from_slice(big.as_bytes());
        }
        data.extend_from_slice(
            b".\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\nDATA\r\nsmall\r\n.\r\n",
        );
        let (out, subs, shed) = run_shedding(&data, 20_000);
        assert!(shed);
        assert_eq!(
            codes(&out),
            [
                "250", "250", "250", "354", "452", "250", "250", "354", "250"
            ]
        );
        assert!(out.contains("452 4.3.1"), "{out}");
        assert_eq!(subs.len(), 1, "only the small message is submitted");
        assert!(subs[0].body.ends_with(b"small\r\n"));

        // BDAT: the chunk being read and every later chunk are refused, LAST ends it.
        let mut bdat =
            b"EHLO c\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\nBDAT 50000\r\n".to_vec();
        bdat.extend_from_slice(&[b'y'; 50_000]);
        bdat.extend_from_slice(b"BDAT 3 LAST\r\nabcNOOP\r\n");
        let (out, subs, shed) = run_shedding(&bdat, 20_000);
        assert!(shed);
        assert_eq!(codes(&out), ["250", "250", "250", "452", "452", "250"]);
        assert!(subs.is_empty());

        // Nothing to shed outside a message.
        let mut idle = Session::new(
            Arc::new(SmtpLimits::default()),
            "127.0.0.1:1".parse().unwrap(),
            false,
            7,
        );
        assert!(!idle.shed());
    }

    /// Found by sending the same hostile commands to Postfix and to Mailroom: Postfix
    /// refuses a HELO name with NUL or invalid UTF-8 (we echoed it into the reply and
    /// the Received header), and closes on a BDAT whose size it cannot read (we read on,
    /// so the chunk's bytes would have been taken as commands).
    #[test]
    fn hostile_hello_names_and_unreadable_bdat_sizes() {
        let (out, _) = run(
            SmtpLimits::default(),
            b"EHLO \x00\xff\r\nHELO a\x01b\r\nEHLO ok.test\r\n",
        );
        assert_eq!(codes(&out), ["501", "501", "250"], "{out}");
        assert!(!out.contains('\0'));
        let (out, subs) = run(
            SmtpLimits::default(),
            b"EHLO c\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\n\
BDAT 18446744073709551616\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<a@l.test>\r\nDATA\r\nx\r\n.\r\n",
        );
        assert_eq!(codes(&out), ["250", "250", "250", "501"], "{out}");
        assert!(out.contains("closing connection"));
        assert!(subs.is_empty());
    }

    /// Found by fuzzing (crates/fuzz, smtp_session): a DEL inside an address passed
    /// the parser and came back raw in the 550 reply.
    #[test]
    fn control_characters_in_addresses_are_syntax_errors() {
        let (out, _) = run(
            SmtpLimits::default(),
            b"EHLO c\r\nMAIL FROM:<s\x7f@x.test>\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<fu\x7fz@l.test>\r\n",
        );
        assert_eq!(codes(&out), ["250", "501", "250", "501"], "{out}");
        assert!(!out.contains('\x7f'));
    }

    #[test]
    fn a_bdat_chunk_spread_over_many_reads_is_waited_for_not_spun_on() {
        let body = vec![b'x'; 1_000_000];
        let mut input =
            b"EHLO c\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\nBDAT 1000000 LAST\r\n"
                .to_vec();
        input.extend_from_slice(&body);
        input.extend_from_slice(b"QUIT\r\n");
        let (out, subs) = run_in_reads(SmtpLimits::default(), &input, 64 * 1024);
        assert_eq!(codes(&out), ["250", "250", "250", "250", "221"], "{out}");
        assert_eq!(subs.len(), 1);
        assert!(subs[0].body.ends_with(&body));
    }

    #[test]
    fn bdat_sizes_that_would_wrap_are_refused() {
        let (out, subs) = run(
            SmtpLimits::default(),
            b"EHLO c\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\nBDAT 10\r\n0123456789BDAT 18446744073709551610 LAST\r\nNOOP\r\n",
        );
        assert!(subs.is_empty());
        // The second chunk is refused at once as too big, and the connection closes
        // (its declared bytes could never be skipped).
        assert_eq!(codes(&out), ["250", "250", "250", "250", "552"], "{out}");
    }

    #[test]
    fn crlf_dot_cr_cr_lf_does_not_end_data_so_nothing_is_smuggled() {
        for step in [1, 7, 4096] {
            let (out, subs) = run_in_reads(
                SmtpLimits::default(),
                b"EHLO c\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\nDATA\r\nSubject: a\r\n\r\nx\r\n.\r\r\n\
MAIL FROM:<evil@x.test>\r\nRCPT TO:<a@l.test>\r\nDATA\r\nSubject: smuggled\r\n\r\n.\r\nQUIT\r\n",
                step,
            );
            assert!(subs.is_empty(), "{out}");
            // One message (refused for its bare CR), then QUIT: no second transaction.
            assert_eq!(
                codes(&out),
                ["250", "250", "250", "354", "550", "221"],
                "{out}"
            );
        }
    }

    /// STARTTLS (RFC 3207): offered only with a certificate and before TLS; what was
    /// pipelined after it in the clear is dropped; the EHLO is forgotten; Received says
    /// ESMTPS.
    #[test]
    fn starttls_discards_what_came_with_it_and_starts_over() {
        let mut session = Session::new(
            Arc::new(SmtpLimits::default()),
            "127.0.0.1:1".parse().unwrap(),
            false,
            7,
        );
        session.set_tls(false, true);
        let mut replies = Vec::new();
        session.receive(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@x.test>\r\n");
        let step = loop {
            match session.advance(&Fixed, 0) {
                Step::Reply(r) => r.render(&mut replies),
                other => break other,
            }
        };
        let ehlo = String::from_utf8(replies).unwrap();
        assert!(ehlo.contains("250-STARTTLS\r\n"), "{ehlo}");
        let Step::StartTls(reply) = step else {
            panic!("STARTTLS must ask for the handshake");
        };
        assert_eq!((reply.code, reply.status), (220, Some((2, 0, 0))));
        session.tls_started();
        // The pipelined MAIL is gone, and so is the EHLO.
        assert!(matches!(session.advance(&Fixed, 0), Step::NeedInput));
        let (text, _) = drive(&mut session, b"MAIL FROM:<s@x.test>\r\n");
        assert!(text.starts_with("503 5.5.1 Send EHLO"), "{text}");
        let (text, submissions) = drive(
            &mut session,
            b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\nDATA\r\nSubject: x\r\n\r\ny\r\n.\r\n",
        );
        assert!(!text.contains("STARTTLS\r\n"), "{text}");
        assert!(text.contains("503 5.5.1 TLS is already active"), "{text}");
        let received = String::from_utf8_lossy(&submissions[0].body).into_owned();
        assert!(received.contains("with ESMTPS id"), "{received}");
        // Without a certificate, STARTTLS is neither advertised nor accepted.
        let mut plain = Session::new(
            Arc::new(SmtpLimits::default()),
            "127.0.0.1:1".parse().unwrap(),
            false,
            7,
        );
        let (text, _) = drive(&mut plain, b"EHLO c\r\nSTARTTLS\r\n");
        assert!(!text.contains("250-STARTTLS"), "{text}");
        assert!(
            text.contains("502 5.5.1 STARTTLS is not available"),
            "{text}"
        );
    }

    /// Feeds `input` and runs the session until it needs more.
    fn drive(session: &mut Session, input: &[u8]) -> (String, Vec<Submission>) {
        session.receive(input);
        let (mut out, mut submissions) = (Vec::new(), Vec::new());
        loop {
            match session.advance(&Fixed, 0) {
                Step::Reply(r) => r.render(&mut out),
                Step::Submit(s) => {
                    let id = s.queue_id.clone();
                    submissions.push(s);
                    session.submitted(Ok(()), &id).render(&mut out);
                }
                Step::NeedInput | Step::Close => break,
                Step::StartTls(r) => panic!("unexpected STARTTLS step: {r:?}"),
                Step::Authenticate { user, password } => {
                    // The test's verifier: one account, recipient 42.
                    let outcome = if user == "ann@l.test" && password == "secret" {
                        Ok(42)
                    } else {
                        Err(AuthFailure::Invalid)
                    };
                    session.auth_result(outcome).render(&mut out);
                }
            }
        }
        (String::from_utf8(out).unwrap(), submissions)
    }

    /// A policy where recipient 42 owns `ann@l.test`.
    struct Owner;

    impl RecipientPolicy for Owner {
        fn resolve(&self, address: &str) -> Resolution {
            Fixed.resolve(address)
        }

        fn may_send_as(&self, user: mailroom_store::RecipientId, address: &str) -> bool {
            user == 42 && address.eq_ignore_ascii_case("ann@l.test")
        }
    }

    /// SMTP AUTH (RFC 4954) on a submission session, from bytes: PLAIN and LOGIN, the
    /// refusals before TLS and before AUTH, the sender check, relay, and what
    /// submission adds to a message.
    #[test]
    fn auth_on_submission_from_bytes() {
        let submission = || {
            let mut s = Session::new(
                Arc::new(SmtpLimits::default()),
                "192.0.2.7:1".parse().unwrap(),
                false,
                7,
            );
            s.set_tls(false, true);
            s.set_auth(AuthPolicy {
                offered: true,
                required: true,
                plaintext_allowed: false,
            });
            s
        };
        let run = |s: &mut Session, input: &[u8]| {
            s.receive(input);
            let (mut out, mut subs) = (Vec::new(), Vec::new());
            loop {
                match s.advance(&Owner, 1_790_000_000_000) {
                    Step::Reply(r) => r.render(&mut out),
                    Step::Submit(sub) => {
                        let id = sub.queue_id.clone();
                        subs.push(sub);
                        s.submitted(Ok(()), &id).render(&mut out);
                    }
                    Step::Authenticate { user, password } => {
                        let outcome = if user == "ann@l.test" && password == "secret" {
                            Ok(42)
                        } else {
                            Err(AuthFailure::Invalid)
                        };
                        s.auth_result(outcome).render(&mut out);
                    }
                    Step::StartTls(r) => {
                        r.render(&mut out);
                        s.tls_started();
                    }
                    Step::NeedInput | Step::Close => break,
                }
            }
            (String::from_utf8(out).unwrap(), subs)
        };
        // In the clear: no AUTH offered, AUTH refused, MAIL needs AUTH.
        let mut s = submission();
        let (text, _) = run(
            &mut s,
            b"EHLO c\r\nAUTH PLAIN AGFubkBsLnRlc3QAc2VjcmV0\r\nMAIL FROM:<ann@l.test>\r\n",
        );
        assert!(!text.contains("AUTH PLAIN LOGIN"), "{text}");
        assert!(text.contains("538 5.7.11 "), "{text}");
        assert!(text.contains("530 5.7.0 Authentication required"), "{text}");
        // After STARTTLS: offered; a wrong password, then PLAIN with an initial response.
        run(&mut s, b"STARTTLS\r\n");
        let (text, _) = run(&mut s, b"EHLO c\r\n");
        assert!(text.contains("250-AUTH PLAIN LOGIN\r\n"), "{text}");
        // \0ann@l.test\0wrong, then \0ann@l.test\0secret
        let (text, _) = run(
            &mut s,
            b"AUTH PLAIN AGFubkBsLnRlc3QAd3Jvbmc=\r\nAUTH PLAIN AGFubkBsLnRlc3QAc2VjcmV0\r\n",
        );
        assert!(text.starts_with("535 5.7.8 "), "{text}");
        assert!(
            text.ends_with("235 2.7.0 Authentication successful\r\n"),
            "{text}"
        );
        let (text, _) = run(&mut s, b"EHLO c\r\nAUTH PLAIN AGFubkBsLnRlc3QAc2VjcmV0\r\n");
        assert!(
            !text.contains("AUTH PLAIN LOGIN"),
            "offered no more: {text}"
        );
        assert!(text.contains("503 5.5.1 Already authenticated"), "{text}");
        // Someone else's address is refused; its own goes, to a remote domain too.
        let (text, subs) = run(
            &mut s,
            b"MAIL FROM:<bob@l.test>\r\nMAIL FROM:<ann@l.test>\r\nRCPT TO:<x@remote.test>\r\nDATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\n",
        );
        assert!(
            text.starts_with("553 5.7.1 <bob@l.test>: Sender address rejected"),
            "{text}"
        );
        assert!(text.contains("250 2.1.5"), "relayed: {text}");
        let body = String::from_utf8_lossy(&subs[0].body).into_owned();
        assert!(body.contains("with ESMTPSA id"), "{body}");
        assert!(body.contains("\r\nMessage-ID: <"), "{body}");
        assert!(body.contains("\r\nDate: "), "{body}");
        assert_eq!(
            subs[0].envelope.authenticated_as.as_deref(),
            Some("ann@l.test")
        );
        assert!(!subs[0].envelope.unauthenticated);
        // LOGIN, step by step, and a cancelled exchange.
        let mut s = submission();
        // Anything pipelined behind STARTTLS is dropped: EHLO comes after.
        run(&mut s, b"STARTTLS\r\n");
        run(&mut s, b"EHLO c\r\n");
        let (text, _) = run(
            &mut s,
            b"AUTH LOGIN\r\n*\r\nAUTH LOGIN\r\nYW5uQGwudGVzdA==\r\nc2VjcmV0\r\n",
        );
        assert_eq!(
            text,
            "334 VXNlcm5hbWU6\r\n501 5.0.0 Authentication cancelled\r\n334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n235 2.7.0 Authentication successful\r\n"
        );
        let (text, _) = run(&mut s, b"AUTH CRAM-MD5\r\n");
        assert!(text.starts_with("503 5.5.1"), "{text}");
        let mut s = submission();
        // Anything pipelined behind STARTTLS is dropped: EHLO comes after.
        run(&mut s, b"STARTTLS\r\n");
        run(&mut s, b"EHLO c\r\n");
        let (text, _) = run(&mut s, b"AUTH CRAM-MD5\r\nAUTH PLAIN\r\n%%%\r\n");
        assert!(text.starts_with("504 5.5.4"), "{text}");
        assert!(text.contains("334 \r\n501 5.5.2 Invalid base64"), "{text}");
        // A user over its "prohibit send" quota, or over a rate limit, may not start
        // a message.
        struct Refusing(SubmissionRefusal);
        impl RecipientPolicy for Refusing {
            fn resolve(&self, address: &str) -> Resolution {
                Fixed.resolve(address)
            }
            fn may_send_as(&self, _: mailroom_store::RecipientId, _: &str) -> bool {
                true
            }
            fn submission_refusal(
                &self,
                _: mailroom_store::RecipientId,
            ) -> Option<SubmissionRefusal> {
                Some(self.0.clone())
            }
        }
        for (refusal, expected) in [
            (SubmissionRefusal::OverQuota, "552 5.2.2 "),
            (
                SubmissionRefusal::RateLimited("slow down".into()),
                "451 4.7.1 slow down",
            ),
        ] {
            let mut s = submission();
            run(&mut s, b"STARTTLS\r\n");
            run(&mut s, b"EHLO c\r\nAUTH PLAIN AGFubkBsLnRlc3QAc2VjcmV0\r\n");
            s.receive(b"MAIL FROM:<ann@l.test>\r\n");
            let Step::Reply(reply) = s.advance(&Refusing(refusal), 0) else {
                panic!("MAIL is answered");
            };
            let mut text = Vec::new();
            reply.render(&mut text);
            let text = String::from_utf8(text).unwrap();
            assert!(text.starts_with(expected), "{text}");
        }
        // Without AUTH on the listener (port 25): AUTH is not enabled.
        let mut mx = Session::new(
            Arc::new(SmtpLimits::default()),
            "192.0.2.7:1".parse().unwrap(),
            false,
            7,
        );
        let (text, _) = run(
            &mut mx,
            b"EHLO c\r\nAUTH PLAIN AGFubkBsLnRlc3QAc2VjcmV0\r\n",
        );
        assert!(
            text.contains("503 5.5.1 Authentication is not enabled"),
            "{text}"
        );
    }

    /// RFC 8601 5: an Authentication-Results field in this server's name that came from
    /// outside is removed (folded or not, any case); others, and the body, stay.
    #[test]
    fn forged_authentication_results_in_our_name_are_removed() {
        let host = "mx.example.test";
        let message = b"Authentication-Results: MX.Example.Test;\r\n\tspf=pass smtp.mailfrom=evil.test\r\nAuthentication-Results: other.example; dkim=pass\r\nSubject: hi\r\nX-Note: Authentication-Results: mx.example.test; spf=pass\r\n\r\nAuthentication-Results: mx.example.test; body text stays\r\n";
        let cleaned = String::from_utf8(without_our_results(message, host).unwrap()).unwrap();
        assert_eq!(
            cleaned,
            "Authentication-Results: other.example; dkim=pass\r\nSubject: hi\r\nX-Note: Authentication-Results: mx.example.test; spf=pass\r\n\r\nAuthentication-Results: mx.example.test; body text stays\r\n"
        );
        assert_eq!(
            without_our_results(b"Subject: x\r\n\r\nbody\r\n", host),
            None
        );
        assert_eq!(
            without_our_results(
                b"\r\nbody\r\n\r\nAuthentication-Results: mx.example.test; x\r\n",
                host
            ),
            None,
            "no header section: the body is not touched"
        );
        // Through a session: the stored message has lost the forged field.
        let limits = SmtpLimits {
            hostname: host.into(),
            ..SmtpLimits::default()
        };
        let mut session = Session::new(Arc::new(limits), "192.0.2.1:1".parse().unwrap(), false, 7);
        let (_, subs) = drive(
            &mut session,
            b"EHLO c\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@l.test>\r\nDATA\r\nAuthentication-Results: mx.example.test; dmarc=pass\r\nSubject: x\r\n\r\nbody\r\n.\r\n",
        );
        let body = String::from_utf8_lossy(&subs[0].body).into_owned();
        assert!(!body.contains("dmarc=pass"), "{body}");
        assert!(body.ends_with("Subject: x\r\n\r\nbody\r\n"), "{body}");
    }
}
