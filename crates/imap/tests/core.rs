//! The sans-I/O core from bytes: commands go in as the driver would hand them over
//! (literals inline), responses and steps come out, over the real SQLite store and a
//! real directory. No socket, no runtime in the session: what a command answers is
//! decided here, so it is tested here, byte for byte.

use mailroom_directory::{Change, Directory, RecipientFields, RecipientKind, SiteConfig};
use mailroom_imap::response::{Output, RESPONSE_FLUSH_BYTES};
use mailroom_imap::session::{Refusal, Session, Step, peek_command_name};
use mailroom_imap::{ImapConfig, ImapServer, ImapStats, Plaintext};
use mailroom_store::{MailStore, RecipientId, SqliteStore, Topology};
use std::sync::Arc;
use std::time::Duration;

/// A store with one mailbox, and an IMAP server over it.
struct World {
    server: Arc<ImapServer>,
    store: Arc<dyn MailStore>,
    user: RecipientId,
    _directory: Directory,
    _folder: tempfile::TempDir,
}

fn world(plaintext: Plaintext) -> World {
    let folder = tempfile::tempdir().expect("a temporary folder");
    let store: Arc<dyn MailStore> =
        Arc::new(SqliteStore::open(&folder.path().join("store.db")).expect("open the store"));
    let topology = Topology {
        organization: "Test".into(),
        site: "Site".into(),
        server: "core".into(),
    };
    let (directory, _writer) = Directory::start(
        store.clone(),
        &["core.test".to_string()],
        &topology,
        SiteConfig::default(),
    )
    .expect("start the directory");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime
        .block_on(directory.apply(Change::CreateRecipient(RecipientFields {
            kind: Some(RecipientKind::Mailbox),
            alias: Some("ann".into()),
            addresses: Some(vec!["ann@core.test".into()]),
            ..RecipientFields::default()
        })))
        .expect("create a mailbox");
    let user = directory
        .snapshot()
        .by_address("ann@core.test")
        .expect("the mailbox exists")
        .id;
    let limiter = Arc::new(mailroom_directory::login::LoginLimiter::new(
        mailroom_directory::login::LoginLimits {
            per_client: u32::MAX,
            per_account: u32::MAX,
            window: Duration::from_secs(1),
        },
    ));
    let verifier = Arc::new(mailroom_directory::login::Verifier::start(1).expect("a verifier"));
    let server = ImapServer::new(
        ImapConfig {
            hostname: "core.test".into(),
            sessions_max: 4,
            sessions_per_client_max: 4,
            command_before_login_max: 8192,
            idle_timeout: Duration::from_secs(60),
            plaintext,
            append_limit: 1 << 20,
            literals_in_memory_max: 4 << 20,
            command_line_max: mailroom_imap::server::LINE_MAX,
            folder_name_max: 1024,
            parse_limits: mailroom_imap::parse::ParseLimits::default(),
        },
        directory.clone(),
        store.clone(),
        limiter,
        verifier,
        ImapStats::default(),
    );
    World {
        server,
        store,
        user,
        _directory: directory,
        _folder: folder,
    }
}

/// One session's core, and what it answered.
struct Client {
    session: Session,
}

impl Client {
    fn new(world: &World) -> Client {
        Client {
            session: Session::new(
                world.server.clone(),
                "127.0.0.1:50000".parse().unwrap(),
                false,
            ),
        }
    }

    /// Runs `work` with an output that collects everything, streamed or not.
    fn collect<R>(&mut self, work: impl FnOnce(&mut Session, &mut Output<'_>) -> R) -> (String, R) {
        let mut streamed = Vec::new();
        let (result, rest) = {
            let mut sink = |chunk: Vec<u8>| {
                streamed.extend_from_slice(&chunk);
                true
            };
            let mut out = Output::new(&mut sink);
            let result = work(&mut self.session, &mut out);
            (result, out.finish().expect("the sink took everything"))
        };
        streamed.extend_from_slice(&rest);
        (String::from_utf8_lossy(&streamed).into_owned(), result)
    }

    /// Sends one command (CRLF-free, literals inline) and returns the responses.
    fn send(&mut self, command: &str) -> (String, Step) {
        self.collect(|s, out| s.command(command.as_bytes(), out))
    }

    /// Sends a command that must be answered in full.
    fn answer(&mut self, command: &str) -> String {
        let (text, step) = self.send(command);
        assert_eq!(step, Step::Next, "{command} answered {text}");
        text
    }

    /// Logs in as `user` the way the driver does after the password checked out.
    fn log_in(&mut self, world: &World) -> String {
        let (text, step) = self.send("l LOGIN ann secret");
        assert_eq!(text, "", "nothing is said before the password is checked");
        let Step::Login {
            tag,
            user,
            password,
        } = step
        else {
            panic!("LOGIN must ask for the password check, got {step:?}");
        };
        assert_eq!(
            (tag.as_str(), user.as_str(), password.as_str()),
            ("l", "ann", "secret")
        );
        let recipient = world.user;
        self.collect(|s, out| s.login_verified(&tag, &user, Ok(recipient), out))
            .0
    }
}

fn append(world: &World, folder: &str, flags: &[&str], body: &str) -> u32 {
    let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    let copied = world
        .store
        .append(
            world.user,
            folder,
            &flags,
            1_790_000_000_000,
            body.as_bytes(),
            None,
        )
        .expect("append");
    copied.uids[0].1
}

#[test]
fn commands_before_login_are_refused_with_the_right_status() {
    let world = world(Plaintext::Always);
    let mut client = Client::new(&world);
    assert_eq!(client.answer("a1 SELECT INBOX"), "a1 BAD log in first\r\n");
    assert_eq!(client.answer("a2 FROB"), "a2 BAD unknown command FROB\r\n");
    // A tag that is not a valid tag is never echoed.
    let text = client.answer("+x NOOP");
    assert!(text.starts_with("* BAD "), "{text}");
    let text = client.answer("a3 CAPABILITY");
    assert!(text.contains(" AUTH=PLAIN"), "{text}");
    assert!(text.ends_with("a3 OK CAPABILITY completed\r\n"), "{text}");
}

#[test]
fn login_is_a_step_and_its_ok_carries_the_capabilities() {
    let world = world(Plaintext::Always);
    let mut client = Client::new(&world);
    let text = client.log_in(&world);
    assert!(text.starts_with("l OK [CAPABILITY IMAP4rev2 "), "{text}");
    assert!(!text.contains("AUTH=PLAIN"), "{text}");
    // The first login made INBOX and the special-use folders.
    let text = client.answer("b LIST \"\" *");
    for folder in ["INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"] {
        let folder = if folder == "INBOX" {
            folder.to_string()
        } else {
            format!("\"{folder}\"")
        };
        assert!(
            text.contains(&format!("\"/\" {folder}\r\n")),
            "{folder}: {text}"
        );
    }
    assert_eq!(
        client.answer("c LOGIN ann secret"),
        "c BAD already authenticated\r\n"
    );
}

#[test]
fn a_refused_password_is_answered_with_the_drivers_refusal() {
    let world = world(Plaintext::Always);
    let mut client = Client::new(&world);
    let (_, step) = client.send("l LOGIN ann wrong");
    assert!(matches!(step, Step::Login { .. }));
    let (text, ()) = client.collect(|s, out| {
        s.login_verified(
            "l",
            "ann",
            Err(Refusal::no("[AUTHENTICATIONFAILED] invalid credentials")),
            out,
        )
    });
    assert_eq!(text, "l NO [AUTHENTICATIONFAILED] invalid credentials\r\n");
    assert_eq!(client.answer("s SELECT INBOX"), "s BAD log in first\r\n");
}

#[test]
fn plaintext_passwords_are_refused_where_the_policy_says_so() {
    let world = world(Plaintext::Never);
    let mut client = Client::new(&world);
    let greeting = String::from_utf8(client.session.greeting()).unwrap();
    assert!(greeting.contains(" LOGINDISABLED"), "{greeting}");
    assert_eq!(
        client.answer("l LOGIN ann secret"),
        "l NO [PRIVACYREQUIRED] plaintext passwords are not allowed on this connection\r\n"
    );
    assert_eq!(
        client.answer("m AUTHENTICATE PLAIN"),
        "m NO [PRIVACYREQUIRED] plaintext passwords are not allowed on this connection\r\n"
    );
}

#[test]
fn authenticate_plain_with_and_without_an_initial_response() {
    let world = world(Plaintext::Always);
    let mut client = Client::new(&world);
    // \0ann\0secret
    let (text, step) = client.send("a AUTHENTICATE PLAIN AGFubgBzZWNyZXQ=");
    assert_eq!(text, "");
    assert_eq!(
        step,
        Step::Login {
            tag: "a".into(),
            user: "ann".into(),
            password: "secret".into()
        }
    );
    let (text, step) = client.send("b AUTHENTICATE PLAIN");
    assert_eq!(text, "+ \r\n");
    assert_eq!(step, Step::SaslResponse { tag: "b".into() });
    let (text, step) =
        client.collect(|s, out| s.sasl_response("b".into(), Some(b"AGFubgBzZWNyZXQ="), out));
    assert_eq!(text, "");
    assert!(matches!(step, Step::Login { ref user, .. } if user == "ann"));
    for (response, answer) in [
        (Some(&b"*"[..]), "c BAD authentication cancelled\r\n"),
        (Some(&b"%%%"[..]), "c BAD the response is not base64\r\n"),
        (
            // bob\0ann\0secret: acting as someone else.
            Some(&b"Ym9iAGFubgBzZWNyZXQ="[..]),
            "c NO [AUTHORIZATIONFAILED] acting as another user is not allowed\r\n",
        ),
        (None, "c BAD the response is too long\r\n"),
    ] {
        let (text, step) = client.collect(|s, out| s.sasl_response("c".into(), response, out));
        assert_eq!((text.as_str(), step), (answer, Step::Next));
    }
    assert_eq!(
        client.answer("d AUTHENTICATE CRAM-MD5"),
        "d NO unsupported mechanism; use PLAIN\r\n"
    );
}

#[test]
fn select_append_store_expunge_byte_for_byte() {
    let world = world(Plaintext::Always);
    let mut client = Client::new(&world);
    client.log_in(&world);
    let text = client.answer("s SELECT INBOX");
    assert!(
        text.starts_with("* 0 EXISTS\r\n* 0 RECENT\r\n* FLAGS ("),
        "{text}"
    );
    assert!(
        text.ends_with("s OK [READ-WRITE] SELECT completed\r\n"),
        "{text}"
    );
    let text = client.answer("a APPEND INBOX (\\Seen) {22}\r\nSubject: one\r\n\r\nbody\r\n");
    let validity = text
        .split("APPENDUID ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .expect("APPENDUID");
    assert_eq!(
        text,
        format!("* 1 EXISTS\r\n* 1 RECENT\r\na OK [APPENDUID {validity} 1] APPEND completed\r\n")
    );
    assert_eq!(
        client.answer("f FETCH 1 (UID FLAGS RFC822.SIZE BODY[HEADER.FIELDS (SUBJECT)])"),
        "* 1 FETCH (UID 1 FLAGS (\\Seen \\Recent) RFC822.SIZE 22 BODY[HEADER.FIELDS (SUBJECT)] {16}\r\nSubject: one\r\n\r\n)\r\nf OK FETCH completed\r\n"
    );
    assert_eq!(
        client.answer("t STORE 1 +FLAGS (\\Deleted)"),
        "* 1 FETCH (FLAGS (\\Seen \\Deleted \\Recent))\r\nt OK STORE completed\r\n"
    );
    assert_eq!(
        client.answer("e EXPUNGE"),
        "* 1 EXPUNGE\r\n* 0 RECENT\r\ne OK EXPUNGE completed\r\n"
    );
    let (text, step) = client.send("z LOGOUT");
    assert_eq!(text, "* BYE logging out\r\nz OK LOGOUT completed\r\n");
    assert_eq!(step, Step::Logout);
}

#[test]
fn another_sessions_changes_are_announced_at_the_next_command() {
    let world = world(Plaintext::Always);
    let mut ann = Client::new(&world);
    let mut other = Client::new(&world);
    ann.log_in(&world);
    other.log_in(&world);
    append(&world, "INBOX", &[], "Subject: x\r\n\r\nx\r\n");
    ann.answer("s SELECT INBOX");
    other.answer("s SELECT INBOX");
    assert_eq!(
        other.answer("t STORE 1 +FLAGS.SILENT (\\Flagged $Work)"),
        "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work)\r\n* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work \\*)] flags allowed\r\nt OK STORE completed\r\n"
    );
    // Ann hears of the keyword (FLAGS first) and of the change, at NOOP.
    assert_eq!(
        ann.answer("n NOOP"),
        "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work)\r\n* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work \\*)] flags allowed\r\n* 1 FETCH (UID 1 FLAGS (\\Flagged $Work \\Recent))\r\nn OK done\r\n"
    );
    assert_eq!(ann.answer("n NOOP"), "n OK done\r\n");
}

#[test]
fn idle_is_a_step_and_the_bell_brings_updates() {
    let world = world(Plaintext::Always);
    let mut client = Client::new(&world);
    client.log_in(&world);
    client.answer("s SELECT INBOX");
    let mut bell = client
        .session
        .bell()
        .expect("a logged-in session has a bell");
    bell.mark_unchanged();
    let (text, step) = client.send("i IDLE");
    assert_eq!(text, "+ idling\r\n");
    assert_eq!(step, Step::Idle { tag: "i".into() });
    append(&world, "INBOX", &[], "Subject: y\r\n\r\ny\r\n");
    assert!(bell.has_changed().unwrap(), "a delivery rings the bell");
    let (text, ()) = client.collect(|s, out| s.idle_update(out));
    // An IMAP4rev1 session also hears that the new message is recent to it.
    assert_eq!(text, "* 1 EXISTS\r\n* 1 RECENT\r\n");
    let (text, ()) = client.collect(|s, out| s.idle_done("i", b"DONE", out));
    assert_eq!(text, "i OK IDLE terminated\r\n");
    client.send("j IDLE");
    let (text, ()) = client.collect(|s, out| s.idle_done("j", b"NOOP", out));
    assert_eq!(text, "j BAD expected DONE\r\n");
    assert_eq!(
        Client::new(&world).answer("k IDLE"),
        "k BAD log in first\r\n"
    );
}

#[test]
fn writing_into_a_missing_folder_asks_the_client_to_create_it() {
    let world = world(Plaintext::Always);
    let mut client = Client::new(&world);
    client.log_in(&world);
    assert_eq!(
        client.answer("a APPEND Nowhere {3}\r\nx\r\n"),
        "a NO [TRYCREATE] no such folder; create it first\r\n"
    );
    append(&world, "INBOX", &[], "Subject: z\r\n\r\nz\r\n");
    client.answer("s SELECT INBOX");
    assert_eq!(
        client.answer("c COPY 1 Nowhere"),
        "c NO [TRYCREATE] no such folder; create it first\r\n"
    );
    // Found by this test: an IMAP4rev1 SELECT of a missing folder answered
    // [SERVERBUG] (the recent-claim read took "no row" for a store failure).
    for command in [
        "SELECT Nowhere",
        "EXAMINE Nowhere",
        "STATUS Nowhere (MESSAGES)",
        "DELETE Nowhere",
        "RENAME Nowhere Elsewhere",
    ] {
        let text = client.answer(&format!("d {command}"));
        assert!(text.starts_with("d NO [NONEXISTENT] "), "{command}: {text}");
    }
}

#[test]
fn list_tells_children_from_siblings_with_similar_names() {
    let world = world(Plaintext::Always);
    let mut client = Client::new(&world);
    client.log_in(&world);
    // "-" sorts before "/" and "0" after it: neither is a child of "a".
    for name in ["a", "a-b", "a0", "b", "b/c"] {
        let text = client.answer(&format!("c CREATE {name}"));
        assert_eq!(text, "c OK CREATE completed\r\n");
    }
    let text = client.answer("l LIST \"\" *");
    for (name, attribute) in [
        ("a", "\\HasNoChildren"),
        ("a-b", "\\HasNoChildren"),
        ("a0", "\\HasNoChildren"),
        ("b", "\\HasChildren"),
        ("b/c", "\\HasNoChildren"),
    ] {
        assert!(
            text.contains(&format!("* LIST ({attribute}) \"/\" \"{name}\"\r\n")),
            "{name}: {text}"
        );
    }
}

#[test]
fn large_answers_stream_in_bounded_pieces_and_stop_when_the_client_does() {
    let world = world(Plaintext::Always);
    let mut client = Client::new(&world);
    client.log_in(&world);
    let body = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(100 * 1024));
    for _ in 0..20 {
        append(&world, "INBOX", &[], &body);
    }
    client.answer("s SELECT INBOX");
    // Every piece handed on is about the threshold: never the whole answer at once.
    let mut pieces = Vec::new();
    let (rest, step) = {
        let mut sink = |chunk: Vec<u8>| {
            pieces.push(chunk.len());
            true
        };
        let mut out = Output::new(&mut sink);
        let step = client.session.command(b"f FETCH 1:* BODY.PEEK[]", &mut out);
        (out.finish().expect("all taken"), step)
    };
    assert_eq!(step, Step::Next);
    assert!(String::from_utf8_lossy(&rest).ends_with("f OK FETCH completed\r\n"));
    assert!(pieces.len() >= 5, "{pieces:?}");
    assert!(
        pieces
            .iter()
            .all(|&n| (RESPONSE_FLUSH_BYTES..RESPONSE_FLUSH_BYTES + body.len() + 100).contains(&n)),
        "{pieces:?}"
    );
    // A client that stops reading: the sink refuses, and the command stops there.
    let mut offered = 0;
    let mut sink = |_chunk: Vec<u8>| {
        offered += 1;
        false
    };
    let mut out = Output::new(&mut sink);
    client.session.command(b"g FETCH 1:* BODY.PEEK[]", &mut out);
    assert!(out.finish().is_none(), "the output reports the refusal");
    assert_eq!(offered, 1, "nothing more is produced after the refusal");
}

#[test]
fn the_watchdog_name_of_a_command_comes_without_parsing() {
    assert_eq!(peek_command_name(b"a1 UID FETCH 1:* FLAGS"), "fetch");
    assert_eq!(peek_command_name(b"a1 select INBOX"), "select");
    assert_eq!(peek_command_name(b"a1 APPEND INBOX {5}\r\nhello"), "append");
    assert_eq!(peek_command_name(b"a1"), "command");
    assert_eq!(peek_command_name(b"a1 XYZZY"), "command");
}

/// Appends messages with these subjects to INBOX (UIDs in this order).
fn with_subjects(world: &World, subjects: &[&str]) {
    for subject in subjects {
        append(
            world,
            "INBOX",
            &[],
            &format!("Subject: {subject}\r\n\r\nx\r\n"),
        );
    }
}

#[test]
fn context_sort_reports_joins_and_departures_with_positions() {
    let world = world(Plaintext::Always);
    let mut client = Client::new(&world);
    client.log_in(&world);
    with_subjects(&world, &["b", "d"]);
    client.answer("e ENABLE IMAP4rev2");
    client.answer("s SELECT INBOX");
    assert_eq!(
        client.answer("u UID SORT RETURN (UPDATE ALL) (SUBJECT) UTF-8 UNDELETED"),
        "* ESEARCH (TAG \"u\") UID ALL 1:2\r\nu OK SORT completed\r\n"
    );
    // "c" (UID 3) sorts between them: position 2.
    with_subjects(&world, &["c"]);
    assert_eq!(
        client.answer("n NOOP"),
        "* 3 EXISTS\r\n* ESEARCH (TAG \"u\") UID ADDTO (2 3)\r\nn OK done\r\n"
    );
    // "a" goes first, "e" last: applied in order, each position holds.
    with_subjects(&world, &["a", "e"]);
    assert_eq!(
        client.answer("n NOOP"),
        "* 5 EXISTS\r\n* ESEARCH (TAG \"u\") UID ADDTO (1 4 5 5)\r\nn OK done\r\n"
    );
    // Sort order is now a(4) b(1) c(3) d(2) e(5). Deleting b and c takes a run of two
    // out at position 2 (the result holds UNDELETED messages).
    assert_eq!(
        client.answer("t UID STORE 1,3 +FLAGS.SILENT (\\Deleted)"),
        "* ESEARCH (TAG \"u\") UID REMOVEFROM (2 1,3)\r\nt OK STORE completed\r\n"
    );
    // d (UID 2) leaves too, now at position 2; expunging members that left already
    // says nothing more of them.
    assert_eq!(
        client.answer("t UID STORE 2 +FLAGS.SILENT (\\Deleted)"),
        "* ESEARCH (TAG \"u\") UID REMOVEFROM (2 2)\r\nt OK STORE completed\r\n"
    );
    assert_eq!(
        client.answer("x EXPUNGE"),
        "* 3 EXPUNGE\r\n* 2 EXPUNGE\r\n* 1 EXPUNGE\r\nx OK EXPUNGE completed\r\n"
    );
    // Still current: a(4) e(5).
    assert_eq!(
        client.answer("v UID SORT RETURN (ALL) (SUBJECT) UTF-8 UNDELETED"),
        "* ESEARCH (TAG \"v\") UID ALL 4:5\r\nv OK SORT completed\r\n"
    );
    assert_eq!(
        client.answer("c CANCELUPDATE \"u\""),
        "c OK CANCELUPDATE completed\r\n"
    );
    with_subjects(&world, &["f"]);
    assert_eq!(client.answer("n NOOP"), "* 3 EXISTS\r\nn OK done\r\n");
}

#[test]
fn context_sort_by_sequence_number_and_in_reverse() {
    let world = world(Plaintext::Always);
    let mut client = Client::new(&world);
    client.log_in(&world);
    with_subjects(&world, &["b", "d", "c"]);
    client.answer("e ENABLE IMAP4rev2");
    client.answer("s SELECT INBOX");
    assert_eq!(
        client.answer("r SORT RETURN (UPDATE ALL) (REVERSE SUBJECT) UTF-8 ALL"),
        "* ESEARCH (TAG \"r\") ALL 2:3,1\r\nr OK SORT completed\r\n"
    );
    // Expunging message 2 ("d", first in reverse order): REMOVEFROM names it by the
    // sequence number it has until the EXPUNGE that follows.
    client.answer("t STORE 2 +FLAGS.SILENT (\\Deleted)");
    assert_eq!(
        client.answer("x EXPUNGE"),
        "* ESEARCH (TAG \"r\") REMOVEFROM (1 2)\r\n* 2 EXPUNGE\r\nx OK EXPUNGE completed\r\n"
    );
    // "e" is first in reverse order: message 3 at position 1.
    with_subjects(&world, &["e"]);
    assert_eq!(
        client.answer("n NOOP"),
        "* 3 EXISTS\r\n* ESEARCH (TAG \"r\") ADDTO (1 3)\r\nn OK done\r\n"
    );
}

#[test]
fn sort_partial_is_a_window_of_the_sort_order() {
    let world = world(Plaintext::Always);
    let mut client = Client::new(&world);
    client.log_in(&world);
    with_subjects(&world, &["d", "a", "c", "b"]);
    client.answer("s SELECT INBOX");
    assert_eq!(
        client.answer("p UID SORT RETURN (PARTIAL 2:3) (SUBJECT) UTF-8 ALL"),
        "* ESEARCH (TAG \"p\") UID PARTIAL (2:3 4,3)\r\np OK SORT completed\r\n"
    );
    assert_eq!(
        client.answer("q UID SORT RETURN (PARTIAL 4:9 COUNT) (SUBJECT) UTF-8 ALL"),
        "* ESEARCH (TAG \"q\") UID COUNT 4 PARTIAL (4:9 1)\r\nq OK SORT completed\r\n"
    );
    assert_eq!(
        client.answer("r UID SORT RETURN (PARTIAL 5:9) (SUBJECT) UTF-8 ALL"),
        "* ESEARCH (TAG \"r\") UID PARTIAL (5:9 NIL)\r\nr OK SORT completed\r\n"
    );
    for options in [
        "PARTIAL 1:2 ALL",
        "ALL PARTIAL 1:2",
        "PARTIAL 1:2 PARTIAL 3:4",
    ] {
        let text = client.answer(&format!(
            "b UID SORT RETURN ({options}) (SUBJECT) UTF-8 ALL"
        ));
        assert!(text.starts_with("b BAD "), "{options}: {text}");
    }
}

#[test]
fn update_contexts_are_told_apart_by_tag_and_bounded() {
    let world = world(Plaintext::Always);
    let mut client = Client::new(&world);
    client.log_in(&world);
    with_subjects(&world, &["a"]);
    client.answer("s SELECT INBOX");
    client.answer("a UID SEARCH RETURN (UPDATE) ALL");
    // RFC 5267 4.3: a second UPDATE under a tag in use is BAD.
    for command in [
        "a UID SEARCH RETURN (UPDATE) ALL",
        "a UID SORT RETURN (UPDATE) (SUBJECT) UTF-8 ALL",
    ] {
        let text = client.answer(command);
        assert!(text.starts_with("a BAD "), "{command}: {text}");
    }
    // A message that arrives while another search is being made kept up to date is
    // still reported to the first (the new search's sync brings it).
    with_subjects(&world, &["b"]);
    let text = client.answer("b UID SEARCH RETURN (UPDATE) ALL");
    assert!(
        text.contains("* ESEARCH (TAG \"a\") UID ADDTO (0 2)\r\n"),
        "{text}"
    );
    // Past the limit the command completes and says, untagged, that it is not kept.
    for n in 3..=16 {
        client.answer(&format!("t{n} UID SEARCH RETURN (UPDATE) ALL"));
    }
    assert_eq!(
        client.answer("t17 UID SEARCH RETURN (UPDATE COUNT) ALL"),
        "* ESEARCH (TAG \"t17\") UID COUNT 2\r\n* NO [NOUPDATE \"t17\"] at most 16 searches are kept up to date; cancel one first\r\nt17 OK SEARCH completed\r\n"
    );
}

#[test]
fn header_searches_are_answered_from_the_per_body_cache() {
    let world = world(Plaintext::Always);
    let mut client = Client::new(&world);
    client.log_in(&world);
    append(
        &world,
        "INBOX",
        &[],
        "From: =?utf-8?q?Zo=C3=AB?= <zoe@x.test>\r\nSubject: Quarterly\r\nDate: Thu, 5 Mar 2026 10:00:00 +0100\r\n\r\nx\r\n",
    );
    append(
        &world,
        "INBOX",
        &["\\Seen"],
        "From: bob@x.test\r\nSubject: lunch\r\n\r\nquarterly\r\n",
    );
    client.answer("s SELECT INBOX");
    let nothing_cached = world
        .store
        .cached_search_fields(world.user, "INBOX", &[1, 2])
        .unwrap();
    assert!(nothing_cached.is_empty());
    let searches = [
        ("UID SEARCH SUBJECT quarterly", "* SEARCH 1\r\n"),
        ("UID SEARCH FROM zoë", "* SEARCH 1\r\n"),
        (
            "UID SEARCH OR FROM bob SENTON 5-Mar-2026",
            "* SEARCH 1 2\r\n",
        ),
        ("UID SEARCH UNSEEN NOT SUBJECT lunch", "* SEARCH 1\r\n"),
        // BODY is not in the cache: read and parsed as before.
        ("UID SEARCH BODY quarterly", "* SEARCH 2\r\n"),
    ];
    for (search, found) in searches {
        assert_eq!(
            client.answer(&format!("f {search}")),
            format!("{found}f OK SEARCH completed\r\n"),
            "first: {search}"
        );
    }
    let cached = world
        .store
        .cached_search_fields(world.user, "INBOX", &[1, 2])
        .unwrap();
    assert_eq!(cached.len(), 2, "the first search kept the fields");
    // The same answers from the cache; a message that arrives later is computed then.
    for (search, found) in searches {
        assert_eq!(
            client.answer(&format!("c {search}")),
            format!("{found}c OK SEARCH completed\r\n"),
            "cached: {search}"
        );
    }
    append(
        &world,
        "INBOX",
        &[],
        "From: zoe@y.test\r\nSubject: later\r\n\r\n",
    );
    assert_eq!(
        client.answer("n UID SEARCH FROM zoe"),
        "* 3 EXISTS\r\n* 3 RECENT\r\n* SEARCH 1 3\r\nn OK SEARCH completed\r\n"
    );
}

/// Applies ADDTO/REMOVEFROM pairs as RFC 5267 4.3.2 tells a client to, in order.
fn apply_updates(result: &mut Vec<u32>, line: &str) {
    let Some(rest) = line.split(" UID ").nth(1) else {
        return;
    };
    for item in rest
        .split(") ")
        .map(|s| s.trim_end_matches([')', '\r', '\n']))
    {
        let Some((what, pairs)) = item.split_once(" (") else {
            continue;
        };
        let words: Vec<&str> = pairs.split(' ').collect();
        for pair in words.chunks(2) {
            let position: usize = pair[0].parse().unwrap();
            let mut uids = Vec::new();
            for part in pair[1].split(',') {
                match part.split_once(':') {
                    Some((a, b)) => {
                        uids.extend(a.parse::<u32>().unwrap()..=b.parse::<u32>().unwrap())
                    }
                    None => uids.push(part.parse().unwrap()),
                }
            }
            match what {
                "ADDTO" => {
                    for (k, uid) in uids.into_iter().enumerate() {
                        result.insert(position - 1 + k, uid);
                    }
                }
                "REMOVEFROM" => {
                    result.drain(position - 1..position - 1 + uids.len());
                }
                other => panic!("{other}"),
            }
        }
    }
}

/// Many joiners at once (the bulk path) and departures: a client applying the updates
/// holds exactly what a fresh SORT says.
#[test]
fn context_sort_updates_rebuild_the_fresh_sort_order() {
    let world = world(Plaintext::Always);
    let mut client = Client::new(&world);
    client.log_in(&world);
    let subject = |n: u32| format!("s{:03}", (n * 37) % 101);
    let first: Vec<String> = (0..10).map(subject).collect();
    with_subjects(
        &world,
        &first.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    client.answer("e ENABLE IMAP4rev2");
    client.answer("s SELECT INBOX");
    let all = |text: &str| -> Vec<u32> {
        let line = text.lines().next().unwrap();
        let mut uids = Vec::new();
        if let Some(set) = line.split(" ALL ").nth(1) {
            for part in set.split(',') {
                match part.split_once(':') {
                    Some((a, b)) => {
                        uids.extend(a.parse::<u32>().unwrap()..=b.parse::<u32>().unwrap())
                    }
                    None => uids.push(part.parse().unwrap()),
                }
            }
        }
        uids
    };
    let mut result = all(&client.answer("u UID SORT RETURN (UPDATE ALL) (SUBJECT) UTF-8 UNSEEN"));
    let more: Vec<String> = (10..100).map(subject).collect();
    with_subjects(&world, &more.iter().map(String::as_str).collect::<Vec<_>>());
    let text = client.answer("n NOOP");
    for line in text.lines().filter(|l| l.starts_with("* ESEARCH")) {
        apply_updates(&mut result, line);
    }
    // The departures are reported with the STORE itself.
    let mut text = client.answer("t UID STORE 5:60 +FLAGS.SILENT (\\Seen)");
    text.push_str(&client.answer("n NOOP"));
    for line in text.lines().filter(|l| l.starts_with("* ESEARCH")) {
        apply_updates(&mut result, line);
    }
    let fresh = all(&client.answer("v UID SORT RETURN (ALL) (SUBJECT) UTF-8 UNSEEN"));
    assert_eq!(fresh.len(), 44);
    assert_eq!(result, fresh);
}
