//! The fuzz targets. Each takes any bytes; see the crate documentation.

use crate::check;
use crate::world::{PASSWORD, USER, World};
use mail_parser::MimeHeaders;
use mailroom_directory::bulk::{self, Format};
use mailroom_imap::parse::{Section, SectionText};
use mailroom_outbound::dsn;
use mailroom_smtp::{Session, SmtpLimits, Step};
use mailroom_store::{RecipientStatus, Ret};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Largest message the SMTP targets accept (small, so size limits are reachable).
const SMTP_MESSAGE_MAX: usize = 64 * 1024;
/// Output kept for checking per session; beyond it the stream is drained unchecked.
const OUTPUT_CHECKED_MAX: usize = 4 << 20;
/// A session that has not ended this long after its input ended is wedged.
const SESSION_DEADLINE: Duration = Duration::from_secs(20);

/// The read size a session input asks for with its first byte: 1 to 64 bytes, or all
/// at once (so every split of a command or a terminator across reads is reachable).
fn read_size(data: &[u8]) -> (usize, &[u8]) {
    match data.split_first() {
        Some((b, rest)) if *b < 0xc0 => (usize::from(*b % 64) + 1, rest),
        Some((_, rest)) => (rest.len().max(1), rest),
        None => (1, data),
    }
}

fn smtp_limits() -> Arc<SmtpLimits> {
    Arc::new(SmtpLimits {
        hostname: "fuzz".into(),
        primary_domain: crate::world::DOMAIN.into(),
        message_size_max: SMTP_MESSAGE_MAX,
        header_size_max: 16 * 1024,
        recipients_max: 20,
        line_length_max: 512,
        errors_max: 20,
    })
}

/// Runs an SMTP session over `input` in reads of `read` bytes against the fuzz world's
/// directory; returns the replies written and the messages submitted. Panics when a
/// call to `advance` loops without consuming input or a reply is malformed.
pub fn run_smtp(
    input: &[u8],
    read: usize,
    relay: bool,
) -> (Vec<u8>, Vec<mailroom_smtp::Submission>) {
    run_smtp_shedding(input, read, relay, None)
}

/// [`run_smtp`], and when `shed_over` is set, the message being received is shed (as
/// the server does when its memory budget is spent) once it holds more than that.
pub fn run_smtp_shedding(
    input: &[u8],
    read: usize,
    relay: bool,
    shed_over: Option<usize>,
) -> (Vec<u8>, Vec<mailroom_smtp::Submission>) {
    let world = World::get();
    let limits = smtp_limits();
    let mut session = Session::new(limits.clone(), "192.0.2.1:2525".parse().unwrap(), relay, 1);
    let mut out = Vec::new();
    session.greeting().render(&mut out);
    let mut submitted = Vec::new();
    let mut policy = world.directory.snapshot();
    // Each step consumes input or ends the session; a generous bound on steps turns a
    // loop into a failure instead of a hang.
    let mut steps_left = input.len() * 4 + 64;
    'reads: for chunk in input.chunks(read.max(1)) {
        session.receive(chunk);
        loop {
            assert!(steps_left > 0, "SMTP session loops without consuming input");
            steps_left -= 1;
            if !session.in_transaction() {
                policy = world.directory.snapshot();
            }
            match session.advance(policy.as_ref(), 1_790_000_000_000) {
                Step::Reply(reply) => reply.render(&mut out),
                Step::Submit(submission) => {
                    assert!(
                        !submission.recipients.is_empty(),
                        "a message with no recipient"
                    );
                    assert!(
                        submission.recipients.len() <= limits.recipients_max,
                        "more recipients than the limit"
                    );
                    assert!(
                        submission.body.len() <= SMTP_MESSAGE_MAX + 4096,
                        "a message larger than the size limit was accepted"
                    );
                    assert_eq!(
                        submission.envelope.unauthenticated, !relay,
                        "the envelope must say whether the client was trusted"
                    );
                    let id = submission.queue_id.clone();
                    submitted.push(submission);
                    session.submitted(Ok(()), &id).render(&mut out);
                }
                Step::NeedInput => break,
                Step::Close => break 'reads,
                Step::StartTls(_) => unreachable!("the fuzz session offers no STARTTLS"),
                Step::Authenticate { .. } => unreachable!("the fuzz session offers no AUTH"),
            }
        }
        if shed_over.is_some_and(|over| session.message_bytes() > over) {
            session.shed();
            assert_eq!(session.message_bytes(), 0, "a shed message is dropped");
        }
        assert!(
            session.buffered() <= limits.line_length_max.max(SMTP_MESSAGE_MAX) + read + 8192,
            "SMTP session buffers more than a line or a message"
        );
    }
    check::smtp_replies(&out);
    (out, submitted)
}

/// SMTP: the whole session state machine (commands, DATA and BDAT receivers, limits,
/// shedding for memory) over every read split.
pub fn smtp_session(data: &[u8]) {
    let relay = data.first().is_some_and(|b| b & 1 == 1);
    // Bit 2 of the flags byte sheds messages over 2,000 bytes (the memory budget).
    let shed = data.first().is_some_and(|b| b & 4 == 4).then_some(2000);
    let (read, input) = read_size(data);
    run_smtp_shedding(input, read, relay, shed);
}

/// IMAP: the command parser on its own (any bytes as one command with its literals).
pub fn imap_parse(data: &[u8]) {
    if let Ok(command) = mailroom_imap::parse::parse_command(data) {
        // Whatever parsed can be printed (the session logs commands).
        let _ = format!("{command:?}");
    }
}

/// Runs `input` through a server `handle` over an in-memory stream, in reads of
/// `read` bytes; returns what the server wrote (up to [`OUTPUT_CHECKED_MAX`]) and
/// whether it was cut there. Panics when the session has not ended
/// [`SESSION_DEADLINE`] after its input did.
fn drive<F, Fut>(input: Vec<u8>, read: usize, serve: F) -> (Vec<u8>, bool)
where
    F: FnOnce(tokio::io::DuplexStream) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    let world = World::get();
    // One session at a time (tests run in parallel threads): each starts from the reset
    // mailbox, so what it sees does not depend on another test's input.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let result = world.runtime.block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let session = tokio::spawn(serve(server));
        let (mut rx, mut tx) = tokio::io::split(client);
        let writer = async move {
            for chunk in input.chunks(read.max(1)) {
                if tx.write_all(chunk).await.is_err() {
                    break;
                }
            }
            let _ = tx.shutdown().await;
        };
        let reader = async move {
            let mut out = Vec::new();
            let mut truncated = false;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match rx.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) if out.len() + n <= OUTPUT_CHECKED_MAX => {
                        out.extend_from_slice(&buf[..n])
                    }
                    Ok(_) => truncated = true,
                }
            }
            (out, truncated)
        };
        let ((), output) = tokio::join!(writer, reader);
        let ended = tokio::time::timeout(SESSION_DEADLINE, session).await;
        (output, ended.is_ok())
    });
    let (output, ended) = result;
    assert!(ended, "the session did not end after its client closed");
    world.reset();
    output
}

/// The login an input asks for with a flag bit: without it the fuzzer would spend most
/// of its time finding the password.
fn with_login(data: &[u8], login: &[u8]) -> (usize, Vec<u8>) {
    let wants_login = data.first().is_some_and(|b| b & 2 == 2);
    let (read, rest) = read_size(data);
    let mut input = Vec::with_capacity(rest.len() + login.len());
    if wants_login {
        input.extend_from_slice(login);
    }
    input.extend_from_slice(rest);
    (read, input)
}

/// IMAP: a whole session (framing, literals, the state machine, the store) as the
/// listener runs it; responses must be well framed.
pub fn imap_session(data: &[u8]) {
    let (out, truncated) = run_imap(data);
    check::imap_stream(&out, truncated);
}

/// Runs an IMAP session input (flags byte first, see [`with_login`]); returns what the
/// server wrote and whether it was cut at [`OUTPUT_CHECKED_MAX`].
pub fn run_imap(data: &[u8]) -> (Vec<u8>, bool) {
    let world = World::get();
    let login = format!("L LOGIN {USER} {PASSWORD}\r\nS SELECT INBOX\r\n");
    let (read, input) = with_login(data, login.as_bytes());
    let (imap, peer) = (world.imap.clone(), world.peer);
    drive(input, read, move |stream| async move {
        imap.handle(stream, peer, CancellationToken::new()).await
    })
}

/// POP3: a whole session as the listener runs it.
pub fn pop3_session(data: &[u8]) {
    let out = run_pop3(data);
    check::pop3_stream(&out);
}

/// Runs a POP3 session input (flags byte first, see [`with_login`]); returns what the
/// server wrote.
pub fn run_pop3(data: &[u8]) -> Vec<u8> {
    let world = World::get();
    let login = format!("USER {USER}\r\nPASS {PASSWORD}\r\n");
    let (read, input) = with_login(data, login.as_bytes());
    let (pop3, peer) = (world.pop3.clone(), world.peer);
    drive(input, read, move |stream| async move {
        pop3.handle(stream, peer, CancellationToken::new()).await
    })
    .0
}

/// Conversion and IMAP's view of a message: the facts conversion extracts, ENVELOPE,
/// BODYSTRUCTURE, every section of every part, and BINARY.
pub fn mime(data: &[u8]) {
    let facts = mailroom_convert::message_facts(data);
    let _ = format!("{facts:?}");
    let msg = mailroom_imap::mime::parse(data);
    let mut out = Vec::new();
    mailroom_imap::mime::envelope(&mut out, &msg);
    check::imap_value(&out);
    out.clear();
    mailroom_imap::mime::body_structure(&mut out, &msg, true);
    check::imap_value(&out);
    out.clear();
    mailroom_imap::mime::body_structure(&mut out, &msg, false);
    check::imap_value(&out);
    // Part paths: the top-level parts and one level below, as a client would walk them.
    let mut paths: Vec<Vec<u32>> = vec![Vec::new()];
    for a in 1..=4u32 {
        paths.push(vec![a]);
        for b in 1..=3u32 {
            paths.push(vec![a, b]);
        }
    }
    for path in paths {
        for text in [
            SectionText::Full,
            SectionText::Header,
            SectionText::Text,
            SectionText::Mime,
            SectionText::HeaderFields(vec!["SUBJECT".into(), "FROM".into()]),
            SectionText::HeaderFieldsNot(vec!["RECEIVED".into()]),
        ] {
            let whole = matches!(
                text,
                SectionText::Full | SectionText::Header | SectionText::Text
            );
            let section = Section {
                part: path.clone(),
                text,
            };
            if let Some(bytes) = mailroom_imap::mime::section(&msg, &section)
                && whole
            {
                assert!(
                    bytes.len() <= data.len(),
                    "a section is longer than the message it comes from"
                );
            }
        }
        let _ = mailroom_imap::mime::binary(&msg, &path);
    }
}

/// DSN parameters from the wire to the notice: an SMTP transaction whose MAIL and RCPT
/// carry the fuzzed parameters (ENVID, RET, NOTIFY, ORCPT) and whose message is the
/// fuzzed text, then the failure notice built for it. The notice must be a
/// multipart/report whose delivery-status part has only the fields we write, and an
/// unauthenticated sender must get no more than the header section back.
pub fn dsn(data: &[u8]) {
    // Input: [!]MAIL parameters, LF, RCPT parameters, LF, the next hop's reply, LF, message.
    let mut fields = data.splitn(4, |b| *b == b'\n');
    let mail_params = fields.next().unwrap_or_default();
    // A leading "!" makes the client trusted (a relay network); otherwise it is an
    // unauthenticated outside sender, who gets headers back at most.
    let (unauthenticated, mail_params) = match mail_params.strip_prefix(b"!") {
        Some(rest) => (false, rest),
        None => (true, mail_params),
    };
    let rcpt_params = fields.next().unwrap_or_default();
    let reply = fields.next().unwrap_or_default();
    let message = fields.next().unwrap_or_default();
    let one_line = |b: &[u8]| -> Vec<u8> { b.iter().copied().filter(|c| *c != b'\r').collect() };
    let mut input = b"EHLO client.test\r\nMAIL FROM:<sender@remote.test> ".to_vec();
    input.extend_from_slice(&one_line(mail_params));
    input.extend_from_slice(b"\r\nRCPT TO:<ext@fuzz.test> ");
    input.extend_from_slice(&one_line(rcpt_params));
    input.extend_from_slice(b"\r\nDATA\r\n");
    // The message as a client may send it, bare LFs and CRs included (DATA keeps
    // them): only a dot after CRLF is doubled, so that only our end marker ends it.
    let mut at_line_start = true;
    for (i, b) in message.iter().enumerate() {
        if at_line_start && *b == b'.' {
            input.push(b'.');
        }
        input.push(*b);
        at_line_start = *b == b'\n' && i > 0 && message[i - 1] == b'\r';
    }
    input.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
    let (_, submitted) = run_smtp(&input, input.len(), !unauthenticated);
    let Some(submission) = submitted.into_iter().next() else {
        return;
    };
    let mut envelope = submission.envelope.clone();
    for r in &mut envelope.recipients {
        r.status = RecipientStatus::Failed;
        r.reply = Some(String::from_utf8_lossy(reply).into_owned());
        r.remote_mta = Some("mx.remote.test".into());
    }
    let notice = dsn::Notice {
        reporting_mta: "fuzz",
        envelope: &envelope,
        recipients: envelope.recipients.iter().collect(),
        action: dsn::Action::Failed,
        arrival_ms: 1_790_000_000_000,
        queue_id: &submission.queue_id,
        original: &submission.body,
        retry_until_ms: None,
    };
    let built = dsn::build(&notice, &submission.mail_from);
    let parsed = mailroom_convert::mime::parse(&mail_parser::MessageParser::default(), &built)
        .expect("a DSN parses");
    // The delivery-status part: only our fields, one per line.
    let status = parsed
        .parts
        .iter()
        .find(|p| {
            p.content_type()
                .is_some_and(|c| c.c_subtype.as_deref() == Some("delivery-status"))
        })
        .expect("a DSN has a delivery-status part");
    let status_text = &built[status.offset_body as usize..status.offset_end as usize];
    for line in status_text.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() || line.starts_with(b"--") {
            continue;
        }
        let name = line.split(|b| *b == b':').next().unwrap_or_default();
        assert!(
            [
                b"Reporting-MTA".as_slice(),
                b"Original-Envelope-Id",
                b"Arrival-Date",
                b"Original-Recipient",
                b"Final-Recipient",
                b"Action",
                b"Status",
                b"Remote-MTA",
                b"Diagnostic-Code",
                b"Will-Retry-Until",
            ]
            .contains(&name),
            "a delivery-status line the sender wrote: {:?}",
            String::from_utf8_lossy(line)
        );
    }
    let returned_full = parsed.parts.iter().any(|p| {
        p.content_type()
            .is_some_and(|c| c.c_type == "message" && c.c_subtype.as_deref() == Some("rfc822"))
    });
    if unauthenticated || envelope.ret == Some(Ret::Headers) {
        assert!(
            !returned_full,
            "an unauthenticated or RET=HDRS sender got the whole message back"
        );
        // The body the sender wrote after the first blank line never comes back.
        let original = &submission.body;
        let header_end = header_section_end(original);
        let body = &original[header_end..];
        if body.len() >= 16 {
            assert!(
                !contains(&built, body),
                "the original body appears in a headers-only DSN"
            );
        }
    }
}

/// Where the header section ends: after the first empty line, CRLF or bare LF.
fn header_section_end(message: &[u8]) -> usize {
    let mut i = 0;
    while i < message.len() {
        let line_end = message[i..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(message.len(), |p| i + p + 1);
        let line = &message[i..line_end];
        if line == b"\n" || line == b"\r\n" {
            return line_end;
        }
        i = line_end;
    }
    message.len()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn directory_import(format: Format, data: &[u8]) {
    let world = World::get();
    let lines = data.iter().filter(|b| **b == b'\n').count() as u64 + 1;
    let mut changes = Vec::new();
    for (n, row) in bulk::parse(format, data).enumerate() {
        assert!(
            n <= data.len() + 16,
            "the parser yields more rows than the input has bytes"
        );
        match row {
            Ok(row) => {
                assert!(
                    row.line >= 1 && row.line <= lines,
                    "row line {} out of range",
                    row.line
                );
                changes.push(row.change);
            }
            Err(e) => {
                assert!(e.line <= lines + 1, "error line {} out of range", e.line);
                assert!(!e.reason.is_empty(), "an import error without a reason");
            }
        }
    }
    // Every change goes through the directory's validation, as an import's dry run.
    let snapshot = world.directory.snapshot();
    let _ = mailroom_directory::dry_run(&snapshot, &changes, false);
    let _ = mailroom_directory::dry_run(&snapshot, &changes, true);
}

/// The directory's CSV import: parser, then the directory's checks (dry run).
pub fn csv(data: &[u8]) {
    directory_import(Format::Csv, data);
}

/// The directory's LDIF import: parser, then the directory's checks (dry run).
pub fn ldif(data: &[u8]) {
    directory_import(Format::Ldif, data);
}
