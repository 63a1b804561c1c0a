//! The POP3 session state machine (RFC 1939 sections 3-7, RFC 2449, RFC 5034).
//!
//! It knows the protocol, not the store: when a command needs the store (a login, a
//! message's bytes, the deletions at QUIT) it returns an [`Action`] for the driver, which
//! calls back with the answer. That keeps every reply testable without sockets.

use base64::Engine;

/// One message of the locked maildrop, as the session lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropMessage {
    /// The store's UID in INBOX.
    pub uid: u32,
    /// Size in octets as RETR sends it (before byte-stuffing).
    pub size: u64,
    /// Marked by DELE (undone by RSET).
    pub deleted: bool,
}

/// The maildrop as locked at login: later deliveries are not seen until the next session
/// (RFC 1939 section 4: the maildrop is fixed for the session).
#[derive(Debug, Clone)]
pub struct Maildrop {
    /// The recipient whose INBOX this is.
    pub recipient: i64,
    /// The INBOX's UIDVALIDITY, part of every unique id.
    pub uidvalidity: u32,
    /// Messages in UID order; message number n is index n-1.
    pub messages: Vec<DropMessage>,
}

/// What the driver must do after a line.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes; read the next command.
    Reply(Vec<u8>),
    /// Check these credentials, lock the maildrop, load it; then call
    /// [`Session::logged_in`] or [`Session::login_failed`].
    Login {
        /// The user name (alias or address).
        user: String,
        /// The password.
        password: String,
    },
    /// Fetch the message `uid` and call [`Session::message`] with its bytes; `lines`
    /// is TOP's body line count (`None` for RETR).
    Fetch {
        /// UID in INBOX.
        uid: u32,
        /// For TOP: body lines after the header.
        lines: Option<usize>,
    },
    /// The UPDATE state: remove `uids` (possibly none) from INBOX, then send
    /// [`Session::quit_reply`] and close.
    Update {
        /// The recipient.
        recipient: i64,
        /// UIDs marked deleted.
        uids: Vec<u32>,
    },
    /// Send these bytes and close the connection.
    Close(Vec<u8>),
    /// STLS (RFC 2595): send these bytes, drop whatever the client sent after the
    /// command (it came in the clear: CVE-2011-0411), run the TLS handshake, then call
    /// [`Session::tls_started`].
    StartTls(Vec<u8>),
}

#[derive(Debug)]
enum State {
    /// Before login; `user` is the name given by USER.
    Authorization { user: Option<String> },
    /// After `AUTH PLAIN` without an initial response: the next line is the response.
    AuthPlainContinuation,
    /// Logged in.
    Transaction(Maildrop),
    /// QUIT seen.
    Done,
}

/// Failed commands tolerated before the session is closed.
const ERRORS_MAX: u32 = 20;

/// One POP3 session.
pub struct Session {
    state: State,
    /// Whether USER/PASS and AUTH PLAIN may be used on this connection (plaintext
    /// passwords: loopback only by default, until TLS exists).
    plaintext_allowed: bool,
    /// Whether STLS is offered (a certificate exists and the connection is not
    /// encrypted yet).
    stls: bool,
    errors: u32,
}

fn ok(text: &str) -> Vec<u8> {
    format!("+OK {text}\r\n").into_bytes()
}

fn err(text: &str) -> Vec<u8> {
    format!("-ERR {text}\r\n").into_bytes()
}

impl Session {
    /// A session in the AUTHORIZATION state; `stls`: whether STLS is offered.
    pub fn new(plaintext_allowed: bool, stls: bool) -> Session {
        Session {
            state: State::Authorization { user: None },
            plaintext_allowed,
            stls,
            errors: 0,
        }
    }

    /// The handshake after STLS succeeded: passwords are allowed now, and STLS is no
    /// longer offered. The session is in the AUTHORIZATION state, as before.
    pub fn tls_started(&mut self) {
        self.stls = false;
        self.plaintext_allowed = true;
        self.state = State::Authorization { user: None };
    }

    /// The greeting.
    pub fn greeting(hostname: &str) -> Vec<u8> {
        ok(&format!("{hostname} Mailroom POP3 server ready"))
    }

    /// True once the session has logged in.
    pub fn is_logged_in(&self) -> bool {
        matches!(self.state, State::Transaction(_))
    }

    fn capabilities(&self) -> Vec<u8> {
        let mut out = String::from("+OK Capability list follows\r\n");
        out.push_str("TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n");
        if self.stls && !self.is_logged_in() {
            out.push_str("STLS\r\n");
        }
        if self.plaintext_allowed && !self.is_logged_in() {
            out.push_str("USER\r\nSASL PLAIN\r\n");
        }
        out.push_str("EXPIRE NEVER\r\nIMPLEMENTATION Mailroom\r\n.\r\n");
        out.into_bytes()
    }

    fn failed(&mut self, reply: Vec<u8>) -> Action {
        self.errors += 1;
        if self.errors >= ERRORS_MAX {
            return Action::Close(err("too many errors, closing"));
        }
        Action::Reply(reply)
    }

    /// Handles one command line (without its CRLF).
    pub fn line(&mut self, line: &[u8]) -> Action {
        if matches!(self.state, State::AuthPlainContinuation) {
            self.state = State::Authorization { user: None };
            return self.auth_plain_response(line);
        }
        let Ok(text) = std::str::from_utf8(line) else {
            return self.failed(err("commands are ASCII"));
        };
        let (keyword, args) = match text.split_once(' ') {
            Some((k, a)) => (k, a),
            None => (text, ""),
        };
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "CAPA" {
            return Action::Reply(self.capabilities());
        }
        match &mut self.state {
            State::Authorization { .. } => self.authorization(&keyword, args),
            State::Transaction(_) => self.transaction(&keyword, args),
            State::AuthPlainContinuation | State::Done => Action::Close(err("session is over")),
        }
    }

    fn authorization(&mut self, keyword: &str, args: &str) -> Action {
        match keyword {
            "USER" => {
                if !self.plaintext_allowed {
                    return self.failed(err(
                        "[AUTH] plaintext passwords are not allowed on this connection",
                    ));
                }
                if args.is_empty() {
                    return self.failed(err("USER needs a name"));
                }
                self.state = State::Authorization {
                    user: Some(args.to_string()),
                };
                Action::Reply(ok("send PASS"))
            }
            "PASS" => {
                let State::Authorization { user } = &mut self.state else {
                    unreachable!("checked by the caller");
                };
                let Some(user) = user.take() else {
                    return self.failed(err("USER first"));
                };
                // The password is the rest of the line, spaces included (RFC 1939 7).
                Action::Login {
                    user,
                    password: args.to_string(),
                }
            }
            "AUTH" => {
                if args.is_empty() {
                    // RFC 5034 4: without a mechanism, list them.
                    let list = if self.plaintext_allowed {
                        "+OK\r\nPLAIN\r\n.\r\n"
                    } else {
                        "+OK\r\n.\r\n"
                    };
                    return Action::Reply(list.as_bytes().to_vec());
                }
                let (mechanism, initial) = match args.split_once(' ') {
                    Some((m, i)) => (m, Some(i)),
                    None => (args, None),
                };
                if !mechanism.eq_ignore_ascii_case("PLAIN") {
                    return self.failed(err("unsupported SASL mechanism; use PLAIN"));
                }
                if !self.plaintext_allowed {
                    return self.failed(err(
                        "[AUTH] plaintext passwords are not allowed on this connection",
                    ));
                }
                match initial {
                    Some(response) => self.auth_plain_response(response.as_bytes()),
                    None => {
                        self.state = State::AuthPlainContinuation;
                        Action::Reply(b"+ \r\n".to_vec())
                    }
                }
            }
            "QUIT" => {
                self.state = State::Done;
                Action::Close(ok("bye"))
            }
            "STLS" => {
                if !self.stls {
                    return self.failed(err("STLS is not available here"));
                }
                self.state = State::Authorization { user: None };
                Action::StartTls(ok("Begin TLS negotiation"))
            }
            "APOP" => self.failed(err("APOP is not supported; use USER/PASS or AUTH PLAIN")),
            "STAT" | "LIST" | "RETR" | "DELE" | "NOOP" | "RSET" | "TOP" | "UIDL" => {
                self.failed(err("log in first"))
            }
            _ => self.failed(err("unknown command")),
        }
    }

    fn auth_plain_response(&mut self, response: &[u8]) -> Action {
        if response == b"*" {
            return self.failed(err("authentication cancelled"));
        }
        let decoded = if response == b"=" {
            Vec::new()
        } else {
            match base64::engine::general_purpose::STANDARD.decode(response) {
                Ok(d) => d,
                Err(_) => return self.failed(err("[AUTH] the response is not base64")),
            }
        };
        // authzid NUL authcid NUL passwd (RFC 4616).
        let parts: Vec<&[u8]> = decoded.split(|b| *b == 0).collect();
        let [authz, authc, password] = parts.as_slice() else {
            return self.failed(err("[AUTH] malformed PLAIN response"));
        };
        let (Ok(authz), Ok(user), Ok(password)) = (
            std::str::from_utf8(authz),
            std::str::from_utf8(authc),
            std::str::from_utf8(password),
        ) else {
            return self.failed(err("[AUTH] the PLAIN response is not UTF-8"));
        };
        if !authz.is_empty() && !authz.eq_ignore_ascii_case(user) {
            return self.failed(err("[AUTH] acting as another user is not allowed"));
        }
        Action::Login {
            user: user.to_string(),
            password: password.to_string(),
        }
    }

    /// The driver's answer to [`Action::Login`]: the maildrop is locked and loaded.
    pub fn logged_in(&mut self, maildrop: Maildrop) -> Vec<u8> {
        let (count, size) = totals(&maildrop);
        self.state = State::Transaction(maildrop);
        ok(&format!("maildrop has {count} message(s) ({size} octets)"))
    }

    /// The driver's answer to [`Action::Login`] when it failed; `reply` is the full
    /// `-ERR` line.
    pub fn login_failed(&mut self, reply: Vec<u8>) -> Action {
        self.state = State::Authorization { user: None };
        self.failed(reply)
    }

    fn transaction(&mut self, keyword: &str, args: &str) -> Action {
        let State::Transaction(drop) = &mut self.state else {
            unreachable!("checked by the caller");
        };
        let arg_numbers: Vec<&str> = args.split_whitespace().collect();
        // Message number n (1-based), not deleted.
        let pick = |drop: &Maildrop, n: Option<&&str>| -> Result<usize, Vec<u8>> {
            let n: usize = n
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| err("a message number is needed"))?;
            match drop.messages.get(n.wrapping_sub(1)) {
                Some(m) if !m.deleted => Ok(n - 1),
                Some(_) => Err(err(&format!("message {n} is deleted"))),
                None => Err(err(&format!("no message {n}"))),
            }
        };
        match keyword {
            "STAT" => {
                let (count, size) = totals(drop);
                Action::Reply(ok(&format!("{count} {size}")))
            }
            "LIST" | "UIDL" => {
                let line = |n: usize, m: &DropMessage| {
                    if keyword == "LIST" {
                        format!("{} {}", n + 1, m.size)
                    } else {
                        format!("{} {}.{}", n + 1, drop.uidvalidity, m.uid)
                    }
                };
                if let Some(arg) = arg_numbers.first() {
                    return match pick(drop, Some(arg)) {
                        Ok(i) => Action::Reply(ok(&line(i, &drop.messages[i]))),
                        Err(e) => self.failed(e),
                    };
                }
                let (count, size) = totals(drop);
                let mut out = format!("+OK {count} message(s) ({size} octets)\r\n");
                for (i, m) in drop.messages.iter().enumerate() {
                    if !m.deleted {
                        out.push_str(&line(i, m));
                        out.push_str("\r\n");
                    }
                }
                out.push_str(".\r\n");
                Action::Reply(out.into_bytes())
            }
            "RETR" | "TOP" => {
                let index = match pick(drop, arg_numbers.first()) {
                    Ok(i) => i,
                    Err(e) => return self.failed(e),
                };
                let lines = if keyword == "TOP" {
                    match arg_numbers.get(1).and_then(|n| n.parse::<usize>().ok()) {
                        Some(n) => Some(n),
                        None => {
                            return self.failed(err("TOP needs a message number and a line count"));
                        }
                    }
                } else {
                    None
                };
                Action::Fetch {
                    uid: drop.messages[index].uid,
                    lines,
                }
            }
            "DELE" => match pick(drop, arg_numbers.first()) {
                Ok(i) => {
                    drop.messages[i].deleted = true;
                    Action::Reply(ok(&format!("message {} deleted", i + 1)))
                }
                Err(e) => self.failed(e),
            },
            "NOOP" => Action::Reply(ok("")),
            "RSET" => {
                for m in &mut drop.messages {
                    m.deleted = false;
                }
                let (count, size) = totals(drop);
                Action::Reply(ok(&format!(
                    "maildrop has {count} message(s) ({size} octets)"
                )))
            }
            "QUIT" => {
                let uids = drop
                    .messages
                    .iter()
                    .filter(|m| m.deleted)
                    .map(|m| m.uid)
                    .collect();
                let recipient = drop.recipient;
                self.state = State::Done;
                Action::Update { recipient, uids }
            }
            "USER" | "PASS" | "AUTH" | "APOP" => self.failed(err("already logged in")),
            _ => self.failed(err("unknown command")),
        }
    }

    /// The driver's answer to [`Action::Fetch`]: the message's bytes (`None` when it is
    /// gone from the store, e.g. expunged by an IMAP session). Returns the whole reply.
    pub fn message(&mut self, raw: Option<&[u8]>, lines: Option<usize>) -> Vec<u8> {
        let Some(raw) = raw else {
            return err("that message was removed by another session");
        };
        let content = match lines {
            None => raw,
            Some(n) => top(raw, n),
        };
        let mut out = Vec::with_capacity(content.len() + content.len() / 50 + 64);
        let size = content.len();
        out.extend_from_slice(format!("+OK {size} octets\r\n").as_bytes());
        stuff(content, &mut out);
        out.extend_from_slice(b".\r\n");
        out
    }

    /// The reply after [`Action::Update`]: `removed` of `marked` messages removed, or the
    /// store failed.
    pub fn quit_reply(result: Result<(), String>) -> Vec<u8> {
        match result {
            Ok(()) => ok("bye"),
            Err(e) => err(&format!(
                "[SYS/TEMP] some deleted messages were not removed ({e}); they are still in the maildrop"
            )),
        }
    }
}

fn totals(drop: &Maildrop) -> (usize, u64) {
    drop.messages
        .iter()
        .filter(|m| !m.deleted)
        .fold((0, 0), |(c, s), m| (c + 1, s + m.size))
}

/// The header, the blank line, and the first `n` lines of the body (RFC 1939 TOP).
fn top(raw: &[u8], n: usize) -> &[u8] {
    let body_start = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .or_else(|| raw.starts_with(b"\r\n").then_some(2));
    let Some(mut end) = body_start else {
        // No body at all: the whole message is header.
        return raw;
    };
    for _ in 0..n {
        match raw[end..].windows(2).position(|w| w == b"\r\n") {
            Some(p) => end += p + 2,
            None => {
                end = raw.len();
                break;
            }
        }
    }
    &raw[..end]
}

/// Copies `content` as a multi-line response body: lines starting with "." get another
/// "." (RFC 1939 3), and the content ends with CRLF before the terminating ".".
fn stuff(content: &[u8], out: &mut Vec<u8>) {
    let mut at_line_start = true;
    for &b in content {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !content.is_empty() && !content.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged_in() -> Session {
        let mut s = Session::new(true, false);
        assert_eq!(s.line(b"USER alice"), Action::Reply(ok("send PASS")));
        assert_eq!(
            s.line(b"PASS secret with spaces"),
            Action::Login {
                user: "alice".into(),
                password: "secret with spaces".into()
            }
        );
        let reply = s.logged_in(Maildrop {
            recipient: 7,
            uidvalidity: 42,
            messages: vec![
                DropMessage {
                    uid: 3,
                    size: 100,
                    deleted: false,
                },
                DropMessage {
                    uid: 9,
                    size: 50,
                    deleted: false,
                },
            ],
        });
        assert_eq!(reply, ok("maildrop has 2 message(s) (150 octets)"));
        s
    }

    fn text(action: Action) -> String {
        match action {
            Action::Reply(b) | Action::Close(b) => String::from_utf8(b).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn list_uidl_dele_rset_and_quit() {
        let mut s = logged_in();
        assert_eq!(text(s.line(b"STAT")), "+OK 2 150\r\n");
        assert_eq!(
            text(s.line(b"LIST")),
            "+OK 2 message(s) (150 octets)\r\n1 100\r\n2 50\r\n.\r\n"
        );
        assert_eq!(text(s.line(b"UIDL 2")), "+OK 2 42.9\r\n");
        assert_eq!(text(s.line(b"DELE 1")), "+OK message 1 deleted\r\n");
        assert_eq!(text(s.line(b"DELE 1")), "-ERR message 1 is deleted\r\n");
        assert_eq!(text(s.line(b"LIST 1")), "-ERR message 1 is deleted\r\n");
        assert_eq!(text(s.line(b"LIST 3")), "-ERR no message 3\r\n");
        assert_eq!(
            text(s.line(b"UIDL")),
            "+OK 1 message(s) (50 octets)\r\n2 42.9\r\n.\r\n"
        );
        assert_eq!(
            text(s.line(b"RSET")),
            "+OK maildrop has 2 message(s) (150 octets)\r\n"
        );
        assert_eq!(text(s.line(b"dele 2")), "+OK message 2 deleted\r\n");
        assert_eq!(
            s.line(b"QUIT"),
            Action::Update {
                recipient: 7,
                uids: vec![9]
            }
        );
    }

    #[test]
    fn retr_stuffs_dots_and_top_cuts_the_body() {
        let mut s = logged_in();
        assert_eq!(
            s.line(b"RETR 2"),
            Action::Fetch {
                uid: 9,
                lines: None
            }
        );
        let raw = b"Subject: x\r\n\r\n.hidden\r\nline 2\r\nline 3";
        assert_eq!(
            String::from_utf8(s.message(Some(raw), None)).unwrap(),
            format!(
                "+OK {} octets\r\nSubject: x\r\n\r\n..hidden\r\nline 2\r\nline 3\r\n.\r\n",
                raw.len()
            )
        );
        assert_eq!(
            s.line(b"TOP 1 1"),
            Action::Fetch {
                uid: 3,
                lines: Some(1)
            }
        );
        let reply = String::from_utf8(s.message(Some(raw), Some(1))).unwrap();
        assert!(
            reply.ends_with("Subject: x\r\n\r\n..hidden\r\n.\r\n"),
            "{reply}"
        );
        let reply = String::from_utf8(s.message(Some(raw), Some(0))).unwrap();
        assert!(reply.ends_with("Subject: x\r\n\r\n.\r\n"), "{reply}");
        assert_eq!(
            text(s.line(b"TOP 1")),
            "-ERR TOP needs a message number and a line count\r\n"
        );
    }

    #[test]
    fn auth_plain_with_and_without_initial_response() {
        let mut s = Session::new(true, false);
        let b64 = base64::engine::general_purpose::STANDARD.encode(b"\0bob\0pw");
        assert_eq!(
            s.line(format!("AUTH PLAIN {b64}").as_bytes()),
            Action::Login {
                user: "bob".into(),
                password: "pw".into()
            }
        );
        let mut s = Session::new(true, false);
        assert_eq!(s.line(b"AUTH PLAIN"), Action::Reply(b"+ \r\n".to_vec()));
        assert_eq!(
            s.line(b64.as_bytes()),
            Action::Login {
                user: "bob".into(),
                password: "pw".into()
            }
        );
        let mut s = Session::new(true, false);
        assert_eq!(s.line(b"AUTH PLAIN"), Action::Reply(b"+ \r\n".to_vec()));
        assert_eq!(text(s.line(b"*")), "-ERR authentication cancelled\r\n");
        assert!(text(s.line(b"AUTH")).contains("PLAIN"));
    }

    #[test]
    fn plaintext_can_be_refused_and_commands_need_login() {
        let mut s = Session::new(false, false);
        assert!(text(s.line(b"USER alice")).starts_with("-ERR [AUTH]"));
        assert!(!text(s.line(b"CAPA")).contains("USER"));
        assert_eq!(text(s.line(b"STAT")), "-ERR log in first\r\n");
        assert_eq!(text(s.line(b"PASS x")), "-ERR USER first\r\n");
        assert_eq!(text(s.line(b"QUIT")), "+OK bye\r\n");
    }

    #[test]
    fn stls_is_offered_before_tls_and_opens_the_passwords() {
        let mut s = Session::new(false, true);
        let capa = text(s.line(b"CAPA"));
        assert!(capa.contains("STLS\r\n"), "{capa}");
        assert!(!capa.contains("USER"), "{capa}");
        assert_eq!(
            s.line(b"STLS"),
            Action::StartTls(b"+OK Begin TLS negotiation\r\n".to_vec())
        );
        s.tls_started();
        let capa = text(s.line(b"CAPA"));
        assert!(!capa.contains("STLS"), "{capa}");
        assert!(capa.contains("USER\r\nSASL PLAIN\r\n"), "{capa}");
        assert_eq!(text(s.line(b"STLS")), "-ERR STLS is not available here\r\n");
        assert_eq!(text(s.line(b"USER alice")), "+OK send PASS\r\n");
        // Without a certificate STLS is neither offered nor accepted.
        let mut plain = Session::new(true, false);
        assert!(!text(plain.line(b"CAPA")).contains("STLS"));
        assert_eq!(
            text(plain.line(b"STLS")),
            "-ERR STLS is not available here\r\n"
        );
    }
}
