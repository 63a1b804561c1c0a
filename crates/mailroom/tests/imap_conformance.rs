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
