//! Invariant checks on what the server writes, shared by the targets.

/// Checks an SMTP reply stream: every line is `ddd` then space or hyphen then text,
/// ends in CRLF, holds no other CR or LF and no control character (a client's bytes
/// echoed raw), and its code is 2xx-5xx (RFC 5321 4.2).
pub fn smtp_replies(out: &[u8]) {
    for line in split_crlf(out, "SMTP reply") {
        assert!(line.len() >= 3, "SMTP reply line too short: {line:?}");
        let code = &line[..3];
        assert!(
            code.iter().all(u8::is_ascii_digit) && (b'2'..=b'5').contains(&code[0]),
            "SMTP reply without a valid code: {:?}",
            String::from_utf8_lossy(line)
        );
        assert!(
            !line
                .iter()
                .any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f),
            "SMTP reply holds a control character: {:?}",
            String::from_utf8_lossy(line)
        );
        if line.len() > 3 {
            assert!(
                line[3] == b' ' || line[3] == b'-',
                "SMTP reply code not followed by space or hyphen: {:?}",
                String::from_utf8_lossy(line)
            );
        }
    }
}

/// Splits `out` at CRLF, asserting that it ends with one and that no line holds a CR
/// or LF of its own (which would let the peer's bytes start a line of their choosing).
fn split_crlf<'a>(out: &'a [u8], what: &str) -> Vec<&'a [u8]> {
    if out.is_empty() {
        return Vec::new();
    }
    assert!(out.ends_with(b"\r\n"), "{what} does not end in CRLF");
    let body = &out[..out.len() - 2];
    let mut lines = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < body.len() {
        if body[i] == b'\r' && body.get(i + 1) == Some(&b'\n') {
            lines.push(&body[start..i]);
            i += 2;
            start = i;
            continue;
        }
        assert!(
            body[i] != b'\r' && body[i] != b'\n',
            "{what} holds a bare CR or LF: {:?}",
            String::from_utf8_lossy(&body[start..(i + 1).min(body.len())])
        );
        i += 1;
    }
    lines.push(&body[start..]);
    lines
}

/// Checks an IMAP server stream (RFC 9051 7): every response begins with `*`, `+` or a
/// tag followed by OK, NO or BAD; lines end in CRLF and hold no bare CR or LF and no NUL
/// outside literals; literals (`{n}` at the end of a line) are followed by exactly n bytes; and
/// parentheses balance within each response. `truncated` says the stream was cut short
/// (the check then stops at the cut).
pub fn imap_stream(out: &[u8], truncated: bool) {
    let mut i = 0;
    while i < out.len() {
        let start = i;
        // The first line of a response decides its kind.
        let first_end = match find_crlf(out, i) {
            Some(e) => e,
            None if truncated => return,
            None => panic!(
                "IMAP response not ended by CRLF: {:?}",
                String::from_utf8_lossy(&out[i..])
            ),
        };
        let first = &out[i..first_end];
        let tagged = !(first.starts_with(b"* ") || first.starts_with(b"+"));
        if tagged {
            let space = first.iter().position(|b| *b == b' ').unwrap_or_else(|| {
                panic!(
                    "IMAP response without a tag: {:?}",
                    String::from_utf8_lossy(first)
                )
            });
            let tag = &first[..space];
            assert!(
                !tag.is_empty() && tag.iter().all(|b| is_tag_char(*b)),
                "IMAP response with a bad tag: {:?}",
                String::from_utf8_lossy(first)
            );
            let rest = &first[space + 1..];
            assert!(
                rest.starts_with(b"OK") || rest.starts_with(b"NO") || rest.starts_with(b"BAD"),
                "tagged IMAP response that is not OK/NO/BAD: {:?}",
                String::from_utf8_lossy(first)
            );
        }
        // Walk the response: lines, quoted strings and literals, until a line ends
        // without announcing a literal.
        let mut depth: i64 = 0;
        let mut in_quote = false;
        loop {
            let end = match find_crlf(out, i) {
                Some(e) => e,
                None if truncated => return,
                None => panic!("IMAP response not ended by CRLF"),
            };
            let line = &out[i..end];
            let mut escaped = false;
            for &b in line {
                assert!(
                    b != b'\r' && b != b'\n',
                    "IMAP response holds a bare CR or LF: {:?}",
                    String::from_utf8_lossy(&out[start..end])
                );
                assert!(
                    b != 0,
                    "IMAP response holds a NUL outside a literal: {:?}",
                    String::from_utf8_lossy(&out[start..end])
                );
                if in_quote {
                    if escaped {
                        escaped = false;
                    } else if b == b'\\' {
                        escaped = true;
                    } else if b == b'"' {
                        in_quote = false;
                    }
                    continue;
                }
                match b {
                    b'"' => in_quote = true,
                    b'(' => depth += 1,
                    b')' => depth -= 1,
                    _ => {}
                }
            }
            assert!(
                !in_quote || tagged_text(line),
                "IMAP quoted string runs past the end of its line: {:?}",
                String::from_utf8_lossy(line)
            );
            in_quote = false;
            i = end + 2;
            match literal_length(line) {
                Some(n) => {
                    if i + n > out.len() {
                        assert!(truncated, "IMAP literal longer than what follows");
                        return;
                    }
                    i += n;
                }
                None => break,
            }
        }
        // Text after OK/NO/BAD and in `* OK [ALERT] ...` is free text; only data
        // responses must balance.
        let first_after_star = &out[start..first_end];
        if !tagged && !first_after_star.starts_with(b"+") && !is_status_response(first_after_star) {
            assert!(
                depth == 0,
                "unbalanced parentheses in an IMAP response: {:?}",
                String::from_utf8_lossy(&out[start..i.min(out.len())])
            );
        }
    }
}

fn tagged_text(line: &[u8]) -> bool {
    // `* OK text "` or `a BAD "...`: free text may hold a lone quote.
    is_status_response(line)
        || line
            .splitn(3, |b| *b == b' ')
            .nth(1)
            .is_some_and(|w| w == b"OK" || w == b"NO" || w == b"BAD")
}

fn is_status_response(line: &[u8]) -> bool {
    [
        b"* OK".as_slice(),
        b"* NO",
        b"* BAD",
        b"* BYE",
        b"* PREAUTH",
    ]
    .iter()
    .any(|p| line.starts_with(p))
}

fn is_tag_char(b: u8) -> bool {
    // astring-char minus "+" (RFC 9051 tag).
    b > 0x20 && b < 0x7f && !b"(){%*\"\\+]".contains(&b)
}

fn find_crlf(out: &[u8], from: usize) -> Option<usize> {
    out[from..]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

/// `{n}` or `{n+}` (or `~{n}`) at the end of a line.
fn literal_length(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"}")?;
    let open = line.iter().rposition(|b| *b == b'{')?;
    let digits = &line[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Checks an IMAP value written on its own (BODYSTRUCTURE, ENVELOPE): parentheses
/// balance, quoted strings close, literals are whole, and no CR or LF appears outside a
/// literal.
pub fn imap_value(out: &[u8]) {
    let mut depth: i64 = 0;
    let mut i = 0;
    while i < out.len() {
        match out[i] {
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                assert!(depth >= 0, "IMAP value closes more than it opens");
            }
            b'"' => {
                i += 1;
                loop {
                    assert!(i < out.len(), "IMAP quoted string not closed");
                    match out[i] {
                        b'\\' => i += 1,
                        b'"' => break,
                        b'\r' | b'\n' => panic!("CR or LF inside an IMAP quoted string"),
                        _ => {}
                    }
                    i += 1;
                }
            }
            b'{' => {
                let close = out[i..]
                    .iter()
                    .position(|b| *b == b'}')
                    .expect("IMAP literal length not closed")
                    + i;
                let n: usize = std::str::from_utf8(&out[i + 1..close])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .expect("IMAP literal length is a number");
                assert_eq!(
                    out.get(close + 1..close + 3),
                    Some(b"\r\n".as_slice()),
                    "IMAP literal length not followed by CRLF"
                );
                i = close + 3 + n;
                assert!(i <= out.len(), "IMAP literal longer than the value");
                continue;
            }
            b'\r' | b'\n' => panic!("CR or LF outside a literal in an IMAP value"),
            _ => {}
        }
        i += 1;
    }
    assert_eq!(depth, 0, "unbalanced parentheses in an IMAP value");
}

/// Checks a POP3 stream's first line: the greeting.
pub fn pop3_stream(out: &[u8]) {
    assert!(
        out.starts_with(b"+OK "),
        "POP3 stream does not start with +OK"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imap_stream_accepts_literals_and_rejects_injection() {
        imap_stream(
            b"* OK ready\r\n* 1 FETCH (BODY[] {6}\r\na\r\nb\r\n)\r\na OK done\r\n",
            false,
        );
        let injected = std::panic::catch_unwind(|| {
            imap_stream(b"* LIST () \"/\" \"a\rb\"\r\n", false);
        });
        assert!(injected.is_err(), "a bare CR inside a response must fail");
        let untagged = std::panic::catch_unwind(|| imap_stream(b"hello\r\n", false));
        assert!(untagged.is_err(), "a line that is no response must fail");
    }

    #[test]
    fn smtp_replies_reject_bare_lf() {
        smtp_replies(b"250-a\r\n250 b\r\n");
        assert!(std::panic::catch_unwind(|| smtp_replies(b"250 a\nb\r\n")).is_err());
        assert!(std::panic::catch_unwind(|| smtp_replies(b"hello\r\n")).is_err());
    }

    #[test]
    fn imap_value_checks_literals() {
        imap_value(b"(\"a\" {3}\r\nx)y NIL)");
        assert!(std::panic::catch_unwind(|| imap_value(b"(\"a)")).is_err());
        assert!(std::panic::catch_unwind(|| imap_value(b"((a)")).is_err());
    }
}
