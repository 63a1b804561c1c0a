//! IMAP conformance, byte by byte, against RFC 9051 / RFC 3501: each test sends what
//! the RFC's grammar allows and checks the exact responses a strict client reads.
//! Every case here failed before its fix (issue 14's list).

mod common;

use common::{RawImap, TestServer};

const PASSWORD: &str = "conformance password";

async fn server_with_mail(messages: usize) -> (TestServer, std::net::SocketAddr) {
    let server = TestServer::start().await;
    server
        .add_mailbox("ann@example.test", PASSWORD, serde_json::json!({}))
        .await;
    for n in 0..messages {
        let message = common::message(
            "bob@remote.test",
            "ann@example.test",
            &format!("m{n}@remote.test"),
            "hello",
        );
        server
            .send_raw("ann@example.test", message.as_bytes())
            .await;
    }
    server.wait_for_messages("ann@example.test", messages).await;
    let imap = server.server.imap_addr;
    (server, imap)
}

fn tagged(lines: &[String]) -> &str {
    lines.last().map(String::as_str).unwrap_or_default()
}

/// RFC 9051 6.2.3: the capabilities change at login, and the tagged OK may carry the new
/// list as a response code; one that says `[CAPABILITY]` must list them (an empty list
/// made a conformance suite skip 39 groups).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_ok_carries_the_capabilities_of_the_authenticated_state() {
    let (_server, imap) = server_with_mail(0).await;
    tokio::task::spawn_blocking(move || {
        let mut c = RawImap::connect(imap);
        let lines = c.run("a", &format!("LOGIN ann@example.test \"{PASSWORD}\""));
        let ok = tagged(&lines);
        assert!(
            ok.starts_with("a OK [CAPABILITY IMAP4rev2 IMAP4rev1 "),
            "{lines:?}"
        );
        for cap in ["IDLE", "UIDPLUS", "ESEARCH", "CONDSTORE", "MOVE", "ENABLE"] {
            assert!(ok.contains(&format!(" {cap} ")), "{cap} missing: {ok}");
        }
        assert!(
            !ok.contains("AUTH=") && !ok.contains("LOGINDISABLED"),
            "{ok}"
        );
        // The code's list is what CAPABILITY now says.
        let lines = c.run("b", "CAPABILITY");
        let listed = lines[0]
            .trim_end()
            .strip_prefix("* CAPABILITY ")
            .unwrap()
            .to_string();
        assert!(
            ok.contains(&format!("[CAPABILITY {listed}]")),
            "{ok} vs {listed}"
        );
    })
    .await
    .unwrap();
}

/// RFC 9051 9: `~` is an ATOM-CHAR; only `~{` starts a literal8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atoms_hold_every_atom_char_including_tilde() {
    let (_server, imap) = server_with_mail(0).await;
    tokio::task::spawn_blocking(move || {
        let mut c = RawImap::login(imap, "ann@example.test", PASSWORD);
        let lines = c.run("a", "CREATE ~foo");
        assert!(tagged(&lines).starts_with("a OK"), "{lines:?}");
        let lines = c.run("b", "LIST \"\" ~foo");
        assert!(tagged(&lines).starts_with("b OK"), "{lines:?}");
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("* LIST (") && lines[0].contains("~foo"),
            "{lines:?}"
        );
        let lines = c.run("c", "STATUS ~foo (MESSAGES)");
        assert!(tagged(&lines).starts_with("c OK"), "{lines:?}");
        let lines = c.run("d", "SELECT ~foo");
        assert!(tagged(&lines).starts_with("d OK"), "{lines:?}");
    })
    .await
    .unwrap();
}

/// RFC 9051 9: nz-number goes up to 4,294,967,295, and a number is not `*`: a range
/// from UIDNEXT to 4294967295 matches nothing, from UIDNEXT to `*` the last message
/// (RFC 9051 6.4.8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uid_ranges_reach_4294967295_and_a_number_is_not_a_star() {
    let (_server, imap) = server_with_mail(3).await;
    tokio::task::spawn_blocking(move || {
        let mut c = RawImap::login(imap, "ann@example.test", PASSWORD);
        c.run("s", "SELECT INBOX");
        let lines = c.run("a", "UID SEARCH UID 1:4294967295");
        assert_eq!(lines[0], "* SEARCH 1 2 3\r\n", "{lines:?}");
        assert!(tagged(&lines).starts_with("a OK"), "{lines:?}");
        let lines = c.run("b", "UID SEARCH UID 4:4294967295");
        assert_eq!(lines[0], "* SEARCH\r\n", "{lines:?}");
        assert!(tagged(&lines).starts_with("b OK"), "{lines:?}");
        let lines = c.run("c", "UID SEARCH UID 4:*");
        assert_eq!(lines[0], "* SEARCH 3\r\n", "{lines:?}");
        let lines = c.run("d", "UID FETCH 4294967295 (FLAGS)");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(tagged(&lines).starts_with("d OK"), "{lines:?}");
        let lines = c.run("e", "UID FETCH 4294967296 (FLAGS)");
        assert!(tagged(&lines).starts_with("e BAD"), "{lines:?}");
        // The session goes on.
        let lines = c.run("f", "NOOP");
        assert!(tagged(&lines).starts_with("f OK"), "{lines:?}");
    })
    .await
    .unwrap();
}

fn flags_of(lines: &[String], prefix: &str) -> Option<String> {
    lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .map(|l| l.trim_end().to_string())
}

/// RFC 9051 7.3.5 / 7.1: FLAGS and PERMANENTFLAGS list every keyword in use, and a
/// keyword new to the folder is announced (a new FLAGS) before the FETCH that shows it,
/// to the session that set it (even with .SILENT) and to every other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keywords_in_use_are_announced_in_flags_and_permanentflags() {
    let (_server, imap) = server_with_mail(2).await;
    tokio::task::spawn_blocking(move || {
        let mut a = RawImap::login(imap, "ann@example.test", PASSWORD);
        let mut b = RawImap::login(imap, "ann@example.test", PASSWORD);
        let selected = a.run("s", "SELECT INBOX");
        assert_eq!(
            flags_of(&selected, "* FLAGS").unwrap(),
            "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)"
        );
        b.run("s", "SELECT INBOX");
        let stored = a.run("t", "STORE 1 +FLAGS ($Project)");
        let flags_at = stored
            .iter()
            .position(|l| l.starts_with("* FLAGS"))
            .expect("new FLAGS");
        let fetch_at = stored
            .iter()
            .position(|l| l.starts_with("* 1 FETCH"))
            .expect("FETCH");
        assert!(flags_at < fetch_at, "{stored:?}");
        assert!(stored[flags_at].contains("$Project"), "{stored:?}");
        let permanent = flags_of(&stored, "* OK [PERMANENTFLAGS").unwrap();
        assert!(
            permanent.contains("$Project") && permanent.contains("\\*"),
            "{permanent}"
        );
        // .SILENT suppresses the FETCH, not the announcement of a new keyword.
        let silent = a.run("u", "STORE 2 +FLAGS.SILENT (Urgent)");
        assert!(
            flags_of(&silent, "* FLAGS").is_some_and(|f| f.contains("Urgent")),
            "{silent:?}"
        );
        assert!(!silent.iter().any(|l| l.contains("FETCH")), "{silent:?}");
        // The other session learns of both before it sees them.
        let noop = b.run("n", "NOOP");
        let flags_at = noop
            .iter()
            .position(|l| l.starts_with("* FLAGS"))
            .expect("FLAGS");
        let fetch_at = noop
            .iter()
            .position(|l| l.contains("FETCH"))
            .expect("FETCH");
        assert!(flags_at < fetch_at, "{noop:?}");
        assert!(
            noop[flags_at].contains("$Project") && noop[flags_at].contains("Urgent"),
            "{noop:?}"
        );
        // A fresh SELECT lists them.
        let again = a.run("v", "SELECT INBOX");
        let flags = flags_of(&again, "* FLAGS").unwrap();
        assert!(
            flags.contains("$Project") && flags.contains("Urgent"),
            "{flags}"
        );
        let examined = a.run("w", "EXAMINE INBOX");
        assert!(flags_of(&examined, "* FLAGS").unwrap().contains("$Project"));
        assert_eq!(
            flags_of(&examined, "* OK [PERMANENTFLAGS").unwrap(),
            "* OK [PERMANENTFLAGS ()] read-only"
        );
    })
    .await
    .unwrap();
}

fn line_with<'a>(lines: &'a [String], needle: &str) -> Option<&'a str> {
    lines
        .iter()
        .find(|l| l.contains(needle))
        .map(String::as_str)
}

/// RFC 3501 2.3.2 / 7.3.2 (IMAP4rev1): a message is `\Recent` to exactly one session,
/// the first to select its folder after it arrived; EXAMINE shows it without taking it;
/// RECENT counts them, SEARCH RECENT/NEW/OLD and STATUS (RECENT) agree; a session that
/// enabled IMAP4rev2 never sees any of it (RFC 9051 removed \Recent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_belongs_to_the_first_session_that_selects() {
    let (server, imap) = server_with_mail(2).await;
    let (mut a, mut b) = tokio::task::spawn_blocking(move || {
        let mut a = RawImap::login(imap, "ann@example.test", PASSWORD);
        let mut b = RawImap::login(imap, "ann@example.test", PASSWORD);
        let selected = a.run("s", "SELECT INBOX");
        assert!(
            selected.contains(&"* 2 RECENT\r\n".to_string()),
            "{selected:?}"
        );
        let fetched = a.run("f", "FETCH 1:* (FLAGS)");
        assert_eq!(
            fetched[0], "* 1 FETCH (FLAGS (\\Recent))\r\n",
            "{fetched:?}"
        );
        assert_eq!(a.run("r", "SEARCH RECENT")[0], "* SEARCH 1 2\r\n");
        a.run("t", "STORE 1 +FLAGS (\\Seen)");
        assert_eq!(a.run("n", "SEARCH NEW")[0], "* SEARCH 2\r\n");
        assert_eq!(a.run("o", "SEARCH OLD")[0], "* SEARCH\r\n");
        // Taken: the next session sees none, and STATUS agrees.
        let status = b.run("st", "STATUS INBOX (RECENT MESSAGES)");
        assert!(
            status[0].contains("RECENT 0") && status[0].contains("MESSAGES 2"),
            "{status:?}"
        );
        let selected = b.run("s", "SELECT INBOX");
        assert!(
            selected.contains(&"* 0 RECENT\r\n".to_string()),
            "{selected:?}"
        );
        assert!(
            !b.run("f", "FETCH 1:* (FLAGS)")
                .iter()
                .any(|l| l.contains("\\Recent"))
        );
        (a, b)
    })
    .await
    .unwrap();
    // A new message: the first session to notice takes it.
    let message = common::message(
        "bob@remote.test",
        "ann@example.test",
        "m2@remote.test",
        "third",
    );
    server
        .send_raw("ann@example.test", message.as_bytes())
        .await;
    server.wait_for_messages("ann@example.test", 3).await;
    tokio::task::spawn_blocking(move || {
        let noop = a.run("p", "NOOP");
        assert!(
            line_with(&noop, "EXISTS").is_some_and(|l| l == "* 3 EXISTS\r\n"),
            "{noop:?}"
        );
        // Its two recent messages and the new one (\Seen does not end \Recent).
        assert!(noop.contains(&"* 3 RECENT\r\n".to_string()), "{noop:?}");
        let noop = b.run("p", "NOOP");
        assert!(noop.contains(&"* 0 RECENT\r\n".to_string()), "{noop:?}");
        let fetched = a.run("g", "FETCH 3 (FLAGS)");
        assert_eq!(
            fetched[0], "* 3 FETCH (FLAGS (\\Recent))\r\n",
            "{fetched:?}"
        );
        // IMAP4rev2 sessions know nothing of \Recent.
        let mut c = RawImap::login(imap, "ann@example.test", PASSWORD);
        c.run("e", "ENABLE IMAP4rev2");
        let selected = c.run("s", "SELECT INBOX");
        assert!(line_with(&selected, "RECENT").is_none(), "{selected:?}");
        assert!(
            !c.run("f", "FETCH 1:* (FLAGS)")
                .iter()
                .any(|l| l.contains("\\Recent"))
        );
    })
    .await
    .unwrap();
    // EXAMINE shows recent messages without taking them.
    let message = common::message(
        "bob@remote.test",
        "ann@example.test",
        "m3@remote.test",
        "fourth",
    );
    server
        .send_raw("ann@example.test", message.as_bytes())
        .await;
    server.wait_for_messages("ann@example.test", 4).await;
    tokio::task::spawn_blocking(move || {
        let mut d = RawImap::login(imap, "ann@example.test", PASSWORD);
        let examined = d.run("x", "EXAMINE INBOX");
        assert!(
            examined.contains(&"* 1 RECENT\r\n".to_string()),
            "{examined:?}"
        );
        let mut e = RawImap::login(imap, "ann@example.test", PASSWORD);
        let selected = e.run("s", "SELECT INBOX");
        assert!(
            selected.contains(&"* 1 RECENT\r\n".to_string()),
            "{selected:?}"
        );
    })
    .await
    .unwrap();
}

/// RFC 3501 6.3.9: with `%`, LSUB lists the unsubscribed parent of a subscribed folder
/// as `\Noselect` (and not the child, which `%` does not reach); with `*` only the
/// subscribed folders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lsub_shows_unsubscribed_parents_as_noselect_under_percent() {
    let (_server, imap) = server_with_mail(0).await;
    tokio::task::spawn_blocking(move || {
        let mut c = RawImap::login(imap, "ann@example.test", PASSWORD);
        assert!(tagged(&c.run("a", "CREATE foo/bar")).starts_with("a OK"));
        c.run("b", "SUBSCRIBE foo/bar");
        c.run("c", "UNSUBSCRIBE foo");
        let percent = c.run("d", "LSUB \"\" %");
        // The name may come quoted or as an atom.
        let unquoted: Vec<String> = percent.iter().map(|l| l.replace('"', "")).collect();
        assert!(
            unquoted.contains(&"* LSUB (\\Noselect) / foo\r\n".to_string()),
            "{percent:?}"
        );
        assert!(
            !percent.iter().any(|l| l.contains("foo/bar")),
            "{percent:?}"
        );
        let star = c.run("e", "LSUB \"\" *");
        assert!(
            star.iter()
                .any(|l| l.starts_with("* LSUB") && l.contains("foo/bar")),
            "{star:?}"
        );
        assert!(
            !star
                .iter()
                .any(|l| l.replace('"', "").trim_end().ends_with("/ foo")),
            "{star:?}"
        );
        let below = c.run("f", "LSUB \"\" foo/%");
        assert!(below.iter().any(|l| l.contains("foo/bar")), "{below:?}");
    })
    .await
    .unwrap();
}

/// MULTIAPPEND (RFC 3502): several messages in one APPEND, with synchronising or
/// non-synchronising literals, stored all together (consecutive UIDs, one APPENDUID
/// uid-set) or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiappend_stores_all_or_nothing() {
    let (_server, imap) = server_with_mail(0).await;
    tokio::task::spawn_blocking(move || {
        let mut c = RawImap::login(imap, "ann@example.test", PASSWORD);
        let caps = c.run("k", "CAPABILITY");
        assert!(caps[0].contains(" MULTIAPPEND"), "{caps:?}");
        let lines = c.run(
            "a",
            "APPEND INBOX (\\Seen) {5+}\r\nhello (\\Flagged $K) {5+}\r\nworld",
        );
        let ok = tagged(&lines);
        assert!(ok.starts_with("a OK [APPENDUID "), "{lines:?}");
        assert!(ok.contains(" 1:2]"), "{ok}");
        // All or nothing: the folder does not exist, so neither message is stored.
        let lines = c.run("b", "APPEND Nowhere {1+}\r\nx {1+}\r\ny");
        assert!(tagged(&lines).starts_with("b NO [TRYCREATE]"), "{lines:?}");
        // Synchronising literals: a continuation for each.
        c.send(b"c APPEND INBOX {3}\r\n");
        assert!(c.line().starts_with("+ "));
        c.send(b"abc \"05-Mar-2026 10:00:00 +0100\" {3}\r\n");
        assert!(c.line().starts_with("+ "));
        c.send(b"def\r\n");
        let lines = c.until_tagged("c");
        assert!(
            tagged(&lines).contains("[APPENDUID ") && tagged(&lines).contains(" 3:4]"),
            "{lines:?}"
        );
        c.run("s", "SELECT INBOX");
        let fetched = c.run("f", "FETCH 1:4 (FLAGS BODY.PEEK[])");
        let text = fetched.concat();
        for (n, body) in [(1, "hello"), (2, "world"), (3, "abc"), (4, "def")] {
            assert!(text.contains(&format!("* {n} FETCH")), "{text}");
            assert!(text.contains(body), "{text}");
        }
        assert!(
            text.contains("\\Seen") && text.contains("$K") && text.contains("\\Flagged"),
            "{text}"
        );
        let status = c.run("t", "STATUS INBOX (MESSAGES)");
        assert!(status[0].contains("MESSAGES 4"), "{status:?}");
    })
    .await
    .unwrap();
}

/// SEARCHRES (RFC 5182): `SEARCH RETURN (SAVE)` keeps the result without answering it;
/// `$` then names those messages in FETCH, STORE, COPY, SEARCH and their UID forms,
/// follows expunges, and is empty (not an error) when nothing was saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn searchres_saves_a_result_for_dollar() {
    let (_server, imap) = server_with_mail(4).await;
    tokio::task::spawn_blocking(move || {
        let mut c = RawImap::login(imap, "ann@example.test", PASSWORD);
        let caps = c.run("k", "CAPABILITY");
        assert!(caps[0].contains(" SEARCHRES"), "{caps:?}");
        c.run("s", "SELECT INBOX");
        let empty = c.run("e", "FETCH $ (UID)");
        assert_eq!(empty.len(), 1, "{empty:?}");
        assert!(tagged(&empty).starts_with("e OK"), "{empty:?}");
        c.run("f", "STORE 2,4 +FLAGS.SILENT (\\Flagged)");
        let saved = c.run("a", "SEARCH RETURN (SAVE) FLAGGED");
        assert_eq!(saved.len(), 1, "SAVE alone answers nothing: {saved:?}");
        assert!(tagged(&saved).starts_with("a OK"), "{saved:?}");
        let fetched = c.run("b", "FETCH $ (UID)");
        assert_eq!(
            fetched[..2],
            ["* 2 FETCH (UID 2)\r\n", "* 4 FETCH (UID 4)\r\n"],
            "{fetched:?}"
        );
        let searched = c.run("c", "UID SEARCH UID $ SEEN");
        assert_eq!(searched[0], "* SEARCH\r\n", "{searched:?}");
        let searched = c.run("d", "SEARCH $");
        assert_eq!(searched[0], "* SEARCH 2 4\r\n", "{searched:?}");
        // Expunging a saved message takes it out of $.
        c.run("x", "STORE 2 +FLAGS.SILENT (\\Deleted)");
        c.run("y", "EXPUNGE");
        let fetched = c.run("g", "UID FETCH $ (FLAGS)");
        assert_eq!(fetched.len(), 2, "{fetched:?}");
        assert!(fetched[0].contains("UID 4"), "{fetched:?}");
        // SAVE with other options answers them and saves too.
        let both = c.run("h", "UID SEARCH RETURN (SAVE MIN COUNT) ALL");
        assert!(
            both[0].starts_with("* ESEARCH (TAG \"h\") UID MIN 1 COUNT 3"),
            "{both:?}"
        );
        let fetched = c.run("i", "FETCH $ (UID)");
        assert_eq!(fetched.len(), 4, "{fetched:?}");
    })
    .await
    .unwrap();
}

/// SORT (RFC 5256), SORT=DISPLAY (RFC 5957) and ESORT (RFC 5267): base subjects without
/// Re/Fwd/blobs, the first address's mailbox or display name, the Date header (the
/// internal date when it is missing), REVERSE, ties in mailbox order, UID SORT with
/// search keys, and ESEARCH answers that keep the sort order; THREAD=ORDEREDSUBJECT and
/// THREAD=REFERENCES.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sort_follows_rfc_5256() {
    let server = TestServer::start().await;
    server
        .add_mailbox("ann@example.test", PASSWORD, serde_json::json!({}))
        .await;
    let messages = [
        "From: Carol <carol@x.test>\r\nSubject: Re: banana\r\nDate: Tue, 03 Mar 2026 10:00:00 +0000\r\n\r\none\r\n",
        "From: alice@x.test\r\nSubject: apple\r\nDate: Mon, 02 Mar 2026 10:00:00 +0000\r\n\r\ntwo\r\n",
        "From: \"Bob\" <zed@x.test>\r\nSubject: [list] Fwd: Cherry (fwd)\r\nDate: Wed, 04 Mar 2026 10:00:00 +0000\r\n\r\nthree\r\n",
        "From: bob@x.test\r\nSubject: apple\r\n\r\nfour\r\n",
    ];
    for (n, m) in messages.iter().enumerate() {
        server.send_raw("ann@example.test", m.as_bytes()).await;
        server.wait_for_messages("ann@example.test", n + 1).await;
    }
    let imap = server.server.imap_addr;
    tokio::task::spawn_blocking(move || {
        let mut c = RawImap::login(imap, "ann@example.test", PASSWORD);
        let caps = c.run("k", "CAPABILITY");
        for cap in [" SORT ", " SORT=DISPLAY ", " ESORT "] {
            assert!(caps[0].contains(cap), "{cap}: {caps:?}");
        }
        c.run("s", "SELECT INBOX");
        let sorted = |c: &mut RawImap, tag: &str, command: &str| c.run(tag, command)[0].clone();
        assert_eq!(
            sorted(&mut c, "a", "SORT (SUBJECT) UTF-8 ALL"),
            "* SORT 2 4 1 3\r\n"
        );
        assert_eq!(
            sorted(&mut c, "b", "SORT (REVERSE DATE) UTF-8 ALL"),
            "* SORT 4 3 1 2\r\n"
        );
        assert_eq!(
            sorted(&mut c, "c", "SORT (FROM) US-ASCII ALL"),
            "* SORT 2 4 1 3\r\n"
        );
        assert_eq!(
            sorted(&mut c, "d", "SORT (DISPLAYFROM) UTF-8 ALL"),
            "* SORT 2 3 4 1\r\n"
        );
        assert_eq!(
            sorted(&mut c, "e", "SORT (SUBJECT REVERSE ARRIVAL) UTF-8 ALL"),
            "* SORT 4 2 1 3\r\n"
        );
        assert_eq!(
            sorted(&mut c, "f", "UID SORT (SUBJECT) UTF-8 FROM bob"),
            "* SORT 4 3\r\n"
        );
        assert_eq!(
            sorted(
                &mut c,
                "g",
                "SORT RETURN (MIN MAX COUNT ALL) (SUBJECT) UTF-8 ALL"
            ),
            "* ESEARCH (TAG \"g\") MIN 2 MAX 3 ALL 2,4,1,3 COUNT 4\r\n"
        );
        let bad = c.run("h", "SORT (SUBJECT) KOI8-R ALL");
        assert!(
            tagged(&bad).starts_with("h NO [BADCHARSET")
                || tagged(&bad).starts_with("h BAD [BADCHARSET"),
            "{bad:?}"
        );
        let bad = c.run("i", "SORT (REVERSE) UTF-8 ALL");
        assert!(tagged(&bad).starts_with("i BAD"), "{bad:?}");
        // THREAD=ORDEREDSUBJECT (RFC 5256 3): by base subject, parent first, threads by
        // their first message's date.
        assert!(caps[0].contains(" THREAD=ORDEREDSUBJECT"), "{caps:?}");
        assert_eq!(
            sorted(&mut c, "j", "THREAD ORDEREDSUBJECT UTF-8 ALL"),
            "* THREAD (2 4)(1)(3)\r\n"
        );
        assert_eq!(
            sorted(&mut c, "l", "UID THREAD ORDEREDSUBJECT UTF-8 FROM bob"),
            "* THREAD (3)(4)\r\n"
        );
        // THREAD=REFERENCES (RFC 5256 4): no references here, so threads by subject; two
        // "apple" messages, neither a reply, share a new empty parent.
        assert!(caps[0].contains(" THREAD=REFERENCES"), "{caps:?}");
        assert_eq!(
            sorted(&mut c, "m", "THREAD REFERENCES UTF-8 ALL"),
            "* THREAD ((2)(4))(1)(3)\r\n"
        );
    })
    .await
    .unwrap();
}

/// THREAD=REFERENCES over real mail: replies thread under what they reference through
/// References and In-Reply-To, a reply to a message not in the mailbox stands alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_references_follows_the_reference_headers() {
    let server = TestServer::start().await;
    server
        .add_mailbox("ann@example.test", PASSWORD, serde_json::json!({}))
        .await;
    let messages = [
        "Message-ID: <a@x>\r\nSubject: plan\r\nDate: Mon, 02 Mar 2026 10:00:00 +0000\r\n\r\n1\r\n",
        "Message-ID: <b@x>\r\nIn-Reply-To: <a@x>\r\nSubject: Re: plan\r\nDate: Mon, 02 Mar 2026 11:00:00 +0000\r\n\r\n2\r\n",
        "Message-ID: <c@x>\r\nReferences: <a@x> <b@x>\r\nSubject: Re: plan\r\nDate: Mon, 02 Mar 2026 12:00:00 +0000\r\n\r\n3\r\n",
        "Message-ID: <d@x>\r\nReferences: <a@x>\r\nSubject: Re: plan\r\nDate: Mon, 02 Mar 2026 13:00:00 +0000\r\n\r\n4\r\n",
        "Message-ID: <e@x>\r\nReferences: <zz@x>\r\nSubject: Re: elsewhere\r\nDate: Mon, 02 Mar 2026 09:00:00 +0000\r\n\r\n5\r\n",
    ];
    for (n, m) in messages.iter().enumerate() {
        server.send_raw("ann@example.test", m.as_bytes()).await;
        server.wait_for_messages("ann@example.test", n + 1).await;
    }
    let imap = server.server.imap_addr;
    tokio::task::spawn_blocking(move || {
        let mut c = RawImap::login(imap, "ann@example.test", PASSWORD);
        c.run("s", "SELECT INBOX");
        let lines = c.run("t", "THREAD REFERENCES UTF-8 ALL");
        assert_eq!(lines[0], "* THREAD (5)(1 (2 3)(4))\r\n", "{lines:?}");
        let lines = c.run("u", "UID THREAD REFERENCES UTF-8 NOT SUBJECT elsewhere");
        assert_eq!(lines[0], "* THREAD (1 (2 3)(4))\r\n", "{lines:?}");
    })
    .await
    .unwrap();
}

/// CATENATE (RFC 4469): a message built from literal text and the messages or sections
/// IMAP URLs name; a URL that names nothing (wrong UIDVALIDITY, no such UID) is
/// `NO [BADURL ...]` and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catenate_builds_a_message_from_text_and_urls() {
    let (_server, imap) = server_with_mail(1).await;
    tokio::task::spawn_blocking(move || {
        let mut c = RawImap::login(imap, "ann@example.test", PASSWORD);
        let caps = c.run("k", "CAPABILITY");
        assert!(caps[0].contains(" CATENATE"), "{caps:?}");
        let selected = c.run("s", "SELECT INBOX");
        let validity: String = selected
            .iter()
            .find_map(|l| l.split("[UIDVALIDITY ").nth(1))
            .and_then(|r| r.split(']').next())
            .unwrap()
            .to_string();
        let original = c.run("o", "FETCH 1 (BODY.PEEK[TEXT])").concat();
        assert!(original.contains("hello"), "{original}");
        let head = "Subject: cat\r\n\r\n";
        let lines = c.run(
            "a",
            &format!(
                "APPEND INBOX CATENATE (TEXT {{{}+}}\r\n{head} URL \"/INBOX;UIDVALIDITY={validity}/;UID=1/;SECTION=TEXT\")",
                head.len()
            ),
        );
        assert!(tagged(&lines).starts_with("a OK [APPENDUID "), "{lines:?}");
        let built = c.run("b", "FETCH 2 (BODY.PEEK[])").concat();
        assert!(built.contains("Subject: cat\r\n\r\nhello"), "{built}");
        // The whole message by URL, through imap:// and a percent-encoded mailbox name.
        let lines = c.run("c", "APPEND INBOX CATENATE (URL \"imap://mx.example.test/%49NBOX/;UID=1\")");
        assert!(tagged(&lines).starts_with("c OK"), "{lines:?}");
        let body = |lines: Vec<String>| {
            let text = lines.concat();
            let start = text.find("BODY[]").unwrap();
            let end = text.rfind(")\r\n").unwrap();
            text[start..end].to_string()
        };
        let a = body(c.run("d", "FETCH 1 (BODY.PEEK[])"));
        let b = body(c.run("e", "FETCH 3 (BODY.PEEK[])"));
        assert_eq!(a, b);
        for url in [
            format!("/INBOX;UIDVALIDITY={}/;UID=1", validity.parse::<u64>().unwrap() + 1),
            "/INBOX/;UID=99".to_string(),
            "/Nowhere/;UID=1".to_string(),
            "not a url".to_string(),
        ] {
            let lines = c.run("f", &format!("APPEND INBOX CATENATE (URL \"{url}\")"));
            assert!(tagged(&lines).starts_with("f NO [BADURL"), "{url}: {lines:?}");
        }
        let status = c.run("t", "STATUS INBOX (MESSAGES)");
        assert!(status[0].contains("MESSAGES 3"), "{status:?}");
    })
    .await
    .unwrap();
}

/// RFC 9051 2.3.1.1: a folder deleted and created again under the same name gets a new,
/// higher UIDVALIDITY, even within the same second (it got the old one back: a client's
/// cached UIDs then named other messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_folder_gets_a_new_uidvalidity() {
    let (_server, imap) = server_with_mail(0).await;
    tokio::task::spawn_blocking(move || {
        let mut c = RawImap::login(imap, "ann@example.test", PASSWORD);
        let validity = |c: &mut RawImap| -> u64 {
            let lines = c.run("v", "STATUS t1 (UIDVALIDITY)");
            lines[0]
                .split("UIDVALIDITY ")
                .nth(1)
                .and_then(|r| r.trim_end().trim_end_matches(')').parse().ok())
                .unwrap_or_else(|| panic!("{lines:?}"))
        };
        let mut seen = Vec::new();
        for round in 0..3 {
            assert!(tagged(&c.run("c", "CREATE t1")).starts_with("c OK"));
            let lines = c.run("a", "APPEND t1 {3+}\r\nabc");
            assert!(
                tagged(&lines).contains(" 1] "),
                "UID 1 again in round {round}: {lines:?}"
            );
            seen.push(validity(&mut c));
            assert!(tagged(&c.run("d", "DELETE t1")).starts_with("d OK"));
        }
        assert!(seen[0] < seen[1] && seen[1] < seen[2], "{seen:?}");
    })
    .await
    .unwrap();
}

fn code_value(lines: &[String], code: &str) -> u64 {
    let line =
        line_with(lines, &format!("[{code} ")).unwrap_or_else(|| panic!("{code}: {lines:?}"));
    let at = line.find(&format!("[{code} ")).unwrap() + code.len() + 2;
    line[at..].split(']').next().unwrap().parse().unwrap()
}

/// QRESYNC (RFC 7162 3.2): a client that comes back with the UIDVALIDITY and
/// HIGHESTMODSEQ it knew learns, in its SELECT, the UIDs expunged since (VANISHED
/// (EARLIER)) and the flags changed since, and nothing else; UID FETCH's VANISHED
/// modifier does the same for a set; once enabled, expunges arrive as VANISHED, never
/// EXPUNGE; without ENABLE QRESYNC the parameter and the modifier are BAD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qresync_resynchronises_flags_and_expunges() {
    let (_server, imap) = server_with_mail(6).await;
    tokio::task::spawn_blocking(move || {
        let login = || RawImap::login(imap, "ann@example.test", PASSWORD);
        // A watcher with QRESYNC enabled and INBOX open throughout.
        let mut watcher = login();
        let lines = watcher.run("e", "ENABLE QRESYNC");
        assert!(
            lines.iter().any(|l| l.trim_end() == "* ENABLED QRESYNC"),
            "{lines:?}"
        );
        let lines = watcher.run("s", "SELECT INBOX");
        let uidvalidity = code_value(&lines, "UIDVALIDITY");
        let before = code_value(&lines, "HIGHESTMODSEQ");

        // Another client flags UID 2 and expunges 3 and 5.
        let mut other = login();
        other.run("s", "SELECT INBOX");
        other.run("f", "UID STORE 2 +FLAGS (\\Flagged)");
        other.run("d", "UID STORE 3,5 +FLAGS.SILENT (\\Deleted)");
        let lines = other.run("x", "EXPUNGE");
        assert!(
            lines.iter().any(|l| l.trim_end() == "* 3 EXPUNGE"),
            "no QRESYNC here: EXPUNGE {lines:?}"
        );

        // The watcher hears of the expunges as VANISHED, by UID.
        let lines = watcher.run("n", "NOOP");
        assert!(
            lines.iter().any(|l| l.trim_end() == "* VANISHED 3,5"),
            "{lines:?}"
        );
        assert!(!lines.iter().any(|l| l.contains("EXPUNGE")), "{lines:?}");

        // A client resyncing from what it knew.
        let mut back = login();
        let lines = back.run(
            "b",
            &format!("SELECT INBOX (QRESYNC ({uidvalidity} {before}))"),
        );
        assert!(
            tagged(&lines).starts_with("b BAD"),
            "QRESYNC without ENABLE: {lines:?}"
        );
        let lines = back.run("c", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)");
        assert!(tagged(&lines).starts_with("c BAD"), "{lines:?}");
        back.run("e", "ENABLE QRESYNC");
        let lines = back.run(
            "s",
            &format!("SELECT INBOX (QRESYNC ({uidvalidity} {before} 1:6))"),
        );
        assert!(tagged(&lines).starts_with("s OK"), "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.trim_end() == "* VANISHED (EARLIER) 3,5"),
            "{lines:?}"
        );
        let fetches: Vec<&String> = lines.iter().filter(|l| l.contains(" FETCH ")).collect();
        assert_eq!(fetches.len(), 1, "only UID 2 changed: {lines:?}");
        assert!(
            fetches[0].starts_with("* 2 FETCH (UID 2 FLAGS (\\Flagged) MODSEQ ("),
            "{lines:?}"
        );
        assert!(code_value(&lines, "HIGHESTMODSEQ") > before);
        // VANISHED comes before the FETCH responses, both before the tagged OK.
        let v = lines
            .iter()
            .position(|l| l.starts_with("* VANISHED"))
            .unwrap();
        let f = lines.iter().position(|l| l.contains(" FETCH ")).unwrap();
        assert!(v < f, "{lines:?}");

        // Known UIDs limit what is reported; a second SELECT closes the first ([CLOSED]).
        let lines = back.run(
            "t",
            &format!("SELECT INBOX (QRESYNC ({uidvalidity} {before} 4:6))"),
        );
        assert!(lines[0].starts_with("* OK [CLOSED]"), "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.trim_end() == "* VANISHED (EARLIER) 5"),
            "{lines:?}"
        );
        // A different UIDVALIDITY: nothing to resync.
        let lines = back.run(
            "u",
            &format!("SELECT INBOX (QRESYNC ({} {before}))", uidvalidity + 1),
        );
        assert!(
            !lines
                .iter()
                .any(|l| l.contains("VANISHED") || l.contains(" FETCH ")),
            "{lines:?}"
        );

        // UID FETCH ... (CHANGEDSINCE m VANISHED).
        let lines = back.run(
            "v",
            &format!("UID FETCH 1:* (FLAGS) (CHANGEDSINCE {before} VANISHED)"),
        );
        assert!(
            lines
                .iter()
                .any(|l| l.trim_end() == "* VANISHED (EARLIER) 3,5"),
            "{lines:?}"
        );
        assert_eq!(
            lines.iter().filter(|l| l.contains(" FETCH (")).count(),
            1,
            "{lines:?}"
        );
        let lines = back.run(
            "w",
            &format!("UID FETCH 4:6 (FLAGS) (CHANGEDSINCE {before} VANISHED)"),
        );
        assert!(
            lines
                .iter()
                .any(|l| l.trim_end() == "* VANISHED (EARLIER) 5"),
            "{lines:?}"
        );

        // Its own expunge: VANISHED too.
        back.run("d", "UID STORE 6 +FLAGS.SILENT (\\Deleted)");
        let lines = back.run("x", "UID EXPUNGE 6");
        assert!(
            lines.iter().any(|l| l.trim_end() == "* VANISHED 6"),
            "{lines:?}"
        );
        assert!(!lines.iter().any(|l| l.contains("EXPUNGE\r")), "{lines:?}");
    })
    .await
    .unwrap();
}

/// RFC 9051 7.5.1: no EXPUNGE during FETCH, STORE or SEARCH, so an expunge another
/// session made is announced at the next command that allows it. It was lost instead:
/// the FETCH read the change and the NOOP after it found nothing new, so the session
/// kept showing a message that was gone (found by bench/imap-stress with QRESYNC).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expunge_held_back_during_fetch_is_announced_at_the_next_noop() {
    let (_server, imap) = server_with_mail(3).await;
    tokio::task::spawn_blocking(move || {
        let mut a = RawImap::login(imap, "ann@example.test", PASSWORD);
        a.run("s", "SELECT INBOX");
        let mut b = RawImap::login(imap, "ann@example.test", PASSWORD);
        b.run("s", "SELECT INBOX");
        b.run("d", "STORE 2 +FLAGS.SILENT (\\Deleted)");
        let lines = b.run("x", "EXPUNGE");
        assert!(
            lines.iter().any(|l| l.trim_end() == "* 2 EXPUNGE"),
            "{lines:?}"
        );
        let lines = a.run("f", "FETCH 1:* (FLAGS)");
        assert!(!lines.iter().any(|l| l.contains("EXPUNGE")), "{lines:?}");
        assert_eq!(
            lines.iter().filter(|l| l.contains(" FETCH (")).count(),
            3,
            "{lines:?}"
        );
        let lines = a.run("n", "NOOP");
        assert!(
            lines.iter().any(|l| l.trim_end() == "* 2 EXPUNGE"),
            "{lines:?}"
        );
        let lines = a.run("g", "FETCH 1:* (UID)");
        assert_eq!(
            lines.iter().filter(|l| l.contains(" FETCH (")).count(),
            2,
            "{lines:?}"
        );
    })
    .await
    .unwrap();
}

/// CONTEXT=SEARCH (RFC 5267 4): `RETURN (UPDATE)` keeps a search current with ADDTO and
/// REMOVEFROM (REMOVEFROM ahead of the EXPUNGE it is due to) until CANCELUPDATE;
/// `RETURN (PARTIAL a:b)` returns the results at those positions. The exact lines are
/// what Dovecot 2.3 answers to the same commands (bench/differential/imap_state.py).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_search_updates_and_partial_results() {
    let (_server, imap) = server_with_mail(6).await;
    tokio::task::spawn_blocking(move || {
        let mut c = RawImap::login(imap, "ann@example.test", PASSWORD);
        let lines = c.run("c", "CAPABILITY");
        assert!(lines[0].contains(" CONTEXT=SEARCH "), "{lines:?}");
        c.run("s", "SELECT INBOX");
        let trimmed = |lines: Vec<String>| -> Vec<String> {
            lines.iter().map(|l| l.trim_end().to_string()).collect()
        };
        let lines = trimmed(c.run("u1", "SEARCH RETURN (UPDATE) SEEN"));
        assert_eq!(lines[0], "* ESEARCH (TAG \"u1\")", "{lines:?}");
        let lines = trimmed(c.run("a", "STORE 1,2,5 +FLAGS.SILENT (\\Seen)"));
        assert!(
            lines.contains(&"* ESEARCH (TAG \"u1\") ADDTO (0 1:2,5)".into()),
            "{lines:?}"
        );
        let lines = trimmed(c.run("b", "STORE 1,2 -FLAGS.SILENT (\\Seen)"));
        assert!(
            lines.contains(&"* ESEARCH (TAG \"u1\") REMOVEFROM (0 1:2)".into()),
            "{lines:?}"
        );
        let lines = trimmed(c.run("u2", "UID SEARCH RETURN (UPDATE ALL) OR SEEN UID 1"));
        assert_eq!(lines[0], "* ESEARCH (TAG \"u2\") UID ALL 1,5", "{lines:?}");
        c.run("d", "STORE 3:6 +FLAGS.SILENT (\\Deleted)");
        let lines = trimmed(c.run("x", "EXPUNGE"));
        let removed = lines
            .iter()
            .position(|l| l == "* ESEARCH (TAG \"u1\") REMOVEFROM (0 5)")
            .unwrap_or_else(|| panic!("{lines:?}"));
        assert!(
            lines.contains(&"* ESEARCH (TAG \"u2\") UID REMOVEFROM (0 5)".into()),
            "{lines:?}"
        );
        let first_expunge = lines.iter().position(|l| l.ends_with(" EXPUNGE")).unwrap();
        assert!(
            removed < first_expunge,
            "REMOVEFROM before EXPUNGE: {lines:?}"
        );
        // IMAP4rev1: expunging recent messages changes the RECENT count.
        assert!(lines.contains(&"* 2 RECENT".into()), "{lines:?}");
        let lines = trimmed(c.run("k", "CANCELUPDATE \"u1\""));
        assert!(lines.last().unwrap().starts_with("k OK"), "{lines:?}");
        let lines = trimmed(c.run("k2", "CANCELUPDATE \"nope\""));
        assert!(lines.last().unwrap().starts_with("k2 NO"), "{lines:?}");
        let lines = trimmed(c.run("e", "STORE 2 +FLAGS.SILENT (\\Seen)"));
        assert!(
            !lines.iter().any(|l| l.contains("\"u1\"")),
            "cancelled: {lines:?}"
        );
        assert!(
            lines.contains(&"* ESEARCH (TAG \"u2\") UID ADDTO (0 2)".into()),
            "{lines:?}"
        );
        // A search that reads content looks again only at what changed: a flag change
        // and an APPEND are reported, the messages that stayed stay.
        let lines = trimmed(c.run("u3", "UID SEARCH RETURN (UPDATE) BODY hello FLAGGED"));
        assert_eq!(lines[0], "* ESEARCH (TAG \"u3\") UID", "{lines:?}");
        let lines = trimmed(c.run("f", "STORE 1 +FLAGS.SILENT (\\Flagged)"));
        assert!(
            lines.contains(&"* ESEARCH (TAG \"u3\") UID ADDTO (0 1)".into()),
            "{lines:?}"
        );
        c.send(b"ap APPEND INBOX (\\Flagged) {20}\r\n");
        assert!(c.line().starts_with('+'));
        c.send(b"Subject: x\r\n\r\nhello\r\n");
        c.send(b"\r\n");
        let lines: Vec<String> = c
            .until_tagged("ap")
            .iter()
            .map(|l| l.trim_end().to_string())
            .collect();
        assert!(lines.last().unwrap().starts_with("ap OK"), "{lines:?}");
        let after = trimmed(c.run("n", "NOOP"));
        let all = format!("{}\n{}", lines.join("\n"), after.join("\n"));
        assert_eq!(
            all.matches("* ESEARCH (TAG \"u3\") UID ADDTO (0 7)")
                .count(),
            1,
            "the appended message joins once: {all}"
        );
        let lines = trimmed(c.run("g", "UID SEARCH BODY hello FLAGGED"));
        assert_eq!(lines[0], "* SEARCH 1 7", "{lines:?}");
        let lines = trimmed(c.run("h", "STORE 1 -FLAGS.SILENT (\\Flagged)"));
        assert!(
            lines.contains(&"* ESEARCH (TAG \"u3\") UID REMOVEFROM (0 1)".into()),
            "{lines:?}"
        );
        // PARTIAL: positions in the result; reversed ranges are normalised.
        for (range, answer) in [
            ("1:1", "1:1 1"),
            ("2:1", "1:2 1:2"),
            ("1:6", "1:6 1:3"),
            ("5:6", "5:6 NIL"),
        ] {
            let lines = trimmed(c.run("p", &format!("SEARCH RETURN (PARTIAL {range}) ALL")));
            assert_eq!(
                lines[0],
                format!("* ESEARCH (TAG \"p\") PARTIAL ({answer})"),
                "{lines:?}"
            );
        }
        for bad in [
            "SEARCH RETURN (PARTIAL 1) ALL",
            "SEARCH RETURN (PARTIAL 1:*) ALL",
        ] {
            let lines = c.run("q", bad);
            assert!(
                lines.last().unwrap().starts_with("q BAD"),
                "{bad}: {lines:?}"
            );
        }
    })
    .await
    .unwrap();
}

/// Found by comparing with Dovecot (bench/differential): a MOVE into the selected folder
/// itself announces the moved message (it vanished until the next change); a command
/// that turns CONDSTORE on implicitly (FETCH MODSEQ) sends HIGHESTMODSEQ first (RFC 7162
/// 3.1); with ESEARCH, MODSEQ is the highest of the messages named (MIN's for MIN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_into_itself_implicit_condstore_and_esearch_modseq() {
    let (_server, imap) = server_with_mail(4).await;
    tokio::task::spawn_blocking(move || {
        let mut c = RawImap::login(imap, "ann@example.test", PASSWORD);
        c.run("s", "SELECT INBOX");
        let trimmed = |lines: Vec<String>| -> Vec<String> {
            lines.iter().map(|l| l.trim_end().to_string()).collect()
        };
        let lines = trimmed(c.run("f", "FETCH 1 (MODSEQ)"));
        assert!(lines[0].starts_with("* OK [HIGHESTMODSEQ "), "{lines:?}");
        let lines = trimmed(c.run("f2", "FETCH 1 (MODSEQ)"));
        assert!(
            !lines.iter().any(|l| l.contains("HIGHESTMODSEQ")),
            "once: {lines:?}"
        );
        let mut modseq = std::collections::HashMap::new();
        for n in [1, 3, 2, 4] {
            let lines = trimmed(c.run("t", &format!("STORE {n} +FLAGS (\\Seen)")));
            let m: u64 = lines[0]
                .split("MODSEQ (")
                .nth(1)
                .and_then(|r| r.split(')').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{lines:?}"));
            modseq.insert(n, m);
        }
        let lines = trimmed(c.run("m", "SEARCH RETURN (MIN) 1:3 MODSEQ 1"));
        assert_eq!(
            lines[0],
            format!("* ESEARCH (TAG \"m\") MIN 1 MODSEQ {}", modseq[&1])
        );
        let lines = trimmed(c.run("x", "SEARCH RETURN (MAX) 1:3 MODSEQ 1"));
        assert_eq!(
            lines[0],
            format!("* ESEARCH (TAG \"x\") MAX 3 MODSEQ {}", modseq[&3])
        );
        let lines = trimmed(c.run("a", "SEARCH RETURN (ALL) 1:3 MODSEQ 1"));
        assert_eq!(
            lines[0],
            format!("* ESEARCH (TAG \"a\") ALL 1:3 MODSEQ {}", modseq[&2])
        );

        let lines = trimmed(c.run("mv", "MOVE 1 INBOX"));
        assert!(lines[0].starts_with("* OK [COPYUID "), "{lines:?}");
        assert!(lines.contains(&"* 1 EXPUNGE".to_string()), "{lines:?}");
        assert!(lines.contains(&"* 4 EXISTS".to_string()), "{lines:?}");
        let lines = trimmed(c.run("u", "FETCH 1:* (UID)"));
        assert_eq!(lines.len(), 5, "four messages: {lines:?}");
        assert!(lines[3].contains("UID 5"), "{lines:?}");
    })
    .await
    .unwrap();
}

/// More from the Dovecot differential: an unknown search charset is NO [BADCHARSET], not
/// BAD (RFC 9051 6.4.4); a FETCH that sets \Seen keeps \Recent in this session's flags;
/// STATUS of the selected folder counts the messages recent to this session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badcharset_is_no_and_recent_survives_seen() {
    let (_server, imap) = server_with_mail(2).await;
    tokio::task::spawn_blocking(move || {
        let mut c = RawImap::login(imap, "ann@example.test", PASSWORD);
        c.run("s", "SELECT INBOX");
        let lines = c.run("k", "SEARCH CHARSET KOI8-R SUBJECT x");
        assert!(tagged(&lines).starts_with("k NO [BADCHARSET"), "{lines:?}");
        let lines = c.run("b", "FETCH 1 (BODY[TEXT])");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("\\Seen") && l.contains("\\Recent")),
            "{lines:?}"
        );
        let lines = c.run("f", "FETCH 1 (FLAGS)");
        assert!(lines[0].contains("\\Recent"), "{lines:?}");
        let lines = c.run("t", "STATUS INBOX (RECENT)");
        assert!(lines[0].contains("RECENT 2"), "{lines:?}");
    })
    .await
    .unwrap();
}
