//! What IMAP derives from a stored message: ENVELOPE, BODYSTRUCTURE / BODY, the bytes of
//! a section (`BODY[1.2.HEADER]`), and the transfer-decoded content of a part (BINARY).
//!
//! Everything is computed from the stored bytes with `mail-parser`'s part offsets, so a
//! section is always a slice of what was received: nothing re-encoded, nothing lost,
//! malformed MIME included (an unparsable part is a leaf with its raw bytes).

use crate::parse::{Section, SectionText};
use crate::response::{nstr, string};
use base64::Engine;
use mail_parser::{Address, HeaderValue, Message, MessageParser, MimeHeaders, PartType};

/// Parses stored bytes (never fails: mail-parser accepts anything).
pub fn parse(raw: &[u8]) -> Message<'_> {
    parse_with(&MessageParser::default(), raw)
}

/// Like [`parse`], with a parser configured for the purpose (see
/// `search::header_parser`). Nesting is bounded (`mailroom_message::mime`).
pub fn parse_with<'r>(parser: &MessageParser, raw: &'r [u8]) -> Message<'r> {
    mailroom_message::mime::parse(parser, raw)
        .unwrap_or_else(|| mailroom_message::mime::opaque(raw))
}

fn part_header<'m>(m: &'m Message<'m>, idx: usize) -> &'m [u8] {
    let raw = m.raw_message.as_ref();
    match m.parts.get(idx) {
        Some(p) => slice(raw, p.offset_header as usize, p.offset_body as usize),
        None => raw,
    }
}

fn part_body<'m>(m: &'m Message<'m>, idx: usize) -> &'m [u8] {
    let raw = m.raw_message.as_ref();
    match m.parts.get(idx) {
        Some(p) if idx == 0 => slice(raw, p.offset_body as usize, raw.len()),
        Some(p) => slice(raw, p.offset_body as usize, p.offset_end as usize),
        None => &[],
    }
}

fn slice(raw: &[u8], from: usize, to: usize) -> &[u8] {
    let to = to.min(raw.len());
    &raw[from.min(to)..to]
}

/// Walks a part path. Returns the message the part belongs to and the part's index in it.
fn resolve<'m>(msg: &'m Message<'m>, path: &[u32]) -> Option<(&'m Message<'m>, usize)> {
    let (mut m, mut idx) = (msg, 0usize);
    let mut at_leaf = false;
    for (depth, &n) in path.iter().enumerate() {
        let n = n as usize;
        if at_leaf {
            return None;
        }
        // A message/rfc822 part reached by the path so far: numbers now count inside
        // the encapsulated message.
        if depth > 0
            && let PartType::Message(inner) = &m.parts.get(idx)?.body
        {
            m = inner;
            idx = 0;
        }
        match &m.parts.get(idx)?.body {
            PartType::Multipart(children) => idx = *children.get(n.checked_sub(1)?)? as usize,
            // A part that is not multipart is its own part 1 (RFC 9051 6.4.5: a
            // single-part message has only a part 1; `2.1.1` of a text/plain `2.1` is
            // `2.1`).
            _ if n == 1 => at_leaf = true,
            _ => return None,
        }
    }
    Some((m, idx))
}

/// The header fields of `header` named (or not named) in `names`, each with its
/// continuation lines, followed by the blank line.
fn filter_header(header: &[u8], names: &[String], keep: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut including = false;
    for line in header.split_inclusive(|b| *b == b'\n') {
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        if !line.starts_with(b" ") && !line.starts_with(b"\t") {
            let name = line.split(|b| *b == b':').next().unwrap_or(b"");
            let named = names
                .iter()
                .any(|n| n.as_bytes().eq_ignore_ascii_case(name.trim_ascii()));
            including = named == keep;
        }
        if including {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The bytes of `section` of the message, or `None` when the part does not exist.
pub fn section(msg: &Message<'_>, section: &Section) -> Option<Vec<u8>> {
    let raw = msg.raw_message.as_ref();
    if section.part.is_empty() {
        let header = part_header(msg, 0);
        return Some(match &section.text {
            SectionText::Full => raw.to_vec(),
            SectionText::Header => header.to_vec(),
            SectionText::Text => part_body(msg, 0).to_vec(),
            SectionText::HeaderFields(names) => filter_header(header, names, true),
            SectionText::HeaderFieldsNot(names) => filter_header(header, names, false),
            SectionText::Mime => return None,
        });
    }
    let (m, idx) = resolve(msg, &section.part)?;
    let part = m.parts.get(idx)?;
    // HEADER, TEXT and HEADER.FIELDS of a part are those of its encapsulated message.
    let inner = match &part.body {
        PartType::Message(inner) => Some(inner),
        _ => None,
    };
    Some(match (&section.text, inner) {
        (SectionText::Full, _) if idx == 0 && std::ptr::eq(m, msg) => part_body(m, 0).to_vec(),
        (SectionText::Full, _) => part_body(m, idx).to_vec(),
        (SectionText::Mime, _) => part_header(m, idx).to_vec(),
        (SectionText::Header, Some(inner)) => part_header(inner, 0).to_vec(),
        // The encapsulated message ends where its part does (its root part's body
        // would run to the end of the outer message).
        (SectionText::Text, Some(inner)) => match inner.parts.first() {
            Some(root) => slice(raw, root.offset_body as usize, part.offset_end as usize).to_vec(),
            None => Vec::new(),
        },
        (SectionText::HeaderFields(names), Some(inner)) => {
            filter_header(part_header(inner, 0), names, true)
        }
        (SectionText::HeaderFieldsNot(names), Some(inner)) => {
            filter_header(part_header(inner, 0), names, false)
        }
        _ => return None,
    })
}

/// Why BINARY cannot decode a part.
#[derive(Debug, PartialEq, Eq)]
pub enum BinaryError {
    /// No such part.
    NoPart,
    /// The part's Content-Transfer-Encoding is unknown ([UNKNOWN-CTE]).
    UnknownCte,
}

/// The content of a leaf part with its transfer encoding removed (RFC 9051 6.4.5
/// BINARY). An empty path is the whole message (as is).
pub fn binary(msg: &Message<'_>, path: &[u32]) -> Result<Vec<u8>, BinaryError> {
    if path.is_empty() {
        return Ok(msg.raw_message.to_vec());
    }
    let (m, idx) = resolve(msg, path).ok_or(BinaryError::NoPart)?;
    let part = m.parts.get(idx).ok_or(BinaryError::NoPart)?;
    let body = part_body(m, idx);
    if matches!(part.body, PartType::Multipart(_)) {
        return Err(BinaryError::NoPart);
    }
    let cte = part
        .content_transfer_encoding()
        .unwrap_or("7bit")
        .trim()
        .to_ascii_lowercase();
    match cte.as_str() {
        "7bit" | "8bit" | "binary" | "" => Ok(body.to_vec()),
        "base64" => {
            let clean: Vec<u8> = body
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            base64::engine::general_purpose::STANDARD
                .decode(&clean)
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(&clean))
                .map_err(|_| BinaryError::UnknownCte)
        }
        "quoted-printable" => Ok(decode_qp(body)),
        _ => Err(BinaryError::UnknownCte),
    }
}

fn decode_qp(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    while i < body.len() {
        let b = body[i];
        if b == b'=' {
            if body.get(i + 1) == Some(&b'\r') && body.get(i + 2) == Some(&b'\n') {
                i += 3;
                continue;
            }
            if body.get(i + 1) == Some(&b'\n') {
                i += 2;
                continue;
            }
            if let (Some(h), Some(l)) = (
                body.get(i + 1).and_then(|b| hex(*b)),
                body.get(i + 2).and_then(|b| hex(*b)),
            ) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    out
}

fn address_list(out: &mut Vec<u8>, address: Option<&Address<'_>>) {
    let Some(address) = address else {
        out.extend_from_slice(b"NIL");
        return;
    };
    let mut items = Vec::new();
    let push = |name: Option<&str>, email: Option<&str>, items: &mut Vec<u8>| {
        let (mut local, host) = match email.and_then(|e| e.rsplit_once('@')) {
            Some((l, h)) => (Some(l), Some(h)),
            None => (email, None),
        };
        let mut name = name;
        // `"odd local"@host`: mail-parser takes the quoted local part for a display
        // name and leaves the local part empty; it is the mailbox (what Dovecot says).
        if local == Some("") && name.is_some() {
            local = name.take();
        }
        // An obsolete source route `<@route:user@host>` (RFC 5322 4.4) is the
        // envelope's adl, not part of the mailbox.
        let mut route = None;
        if let Some(l) = local
            && l.starts_with('@')
            && let Some((r, rest)) = l.split_once(':')
        {
            route = Some(r);
            local = Some(rest);
        }
        items.push(b'(');
        let name = name.map(encoded_word);
        nstr(items, name.as_deref());
        items.push(b' ');
        nstr(items, route);
        items.push(b' ');
        nstr(items, local);
        items.push(b' ');
        nstr(items, host);
        items.push(b')');
    };
    match address {
        Address::List(list) => {
            for a in list {
                push(a.name.as_deref(), a.address.as_deref(), &mut items);
            }
        }
        Address::Group(groups) => {
            for g in groups {
                if let Some(name) = &g.name {
                    // Group start: (NIL NIL "name" NIL), end: (NIL NIL NIL NIL).
                    items.extend_from_slice(b"(NIL NIL ");
                    string(&mut items, name.as_bytes());
                    items.extend_from_slice(b" NIL)");
                }
                for a in &g.addresses {
                    push(a.name.as_deref(), a.address.as_deref(), &mut items);
                }
                if g.name.is_some() {
                    items.extend_from_slice(b"(NIL NIL NIL NIL)");
                }
            }
        }
    }
    if items.is_empty() {
        out.extend_from_slice(b"NIL");
    } else {
        out.push(b'(');
        out.extend_from_slice(&items);
        out.push(b')');
    }
}

/// A display name as ENVELOPE carries it: ASCII as is; otherwise one RFC 2047 encoded
/// word (`=?utf-8?q?...?=`). ENVELOPE is header text for clients that decode it
/// themselves (Dovecot serves the field's raw words); mail-parser hands over the decoded
/// name, and sending its UTF-8 to a client that never enabled UTF8=ACCEPT is wrong.
fn encoded_word(name: &str) -> String {
    if name.is_ascii() {
        return name.to_string();
    }
    let mut word = String::from("=?utf-8?q?");
    for b in name.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'!' | b'*' | b'+' | b'-' | b'/' => {
                word.push(b as char)
            }
            b' ' => word.push('_'),
            _ => word.push_str(&format!("={b:02X}")),
        }
    }
    word.push_str("?=");
    word
}

/// A header's raw value, unfolded and trimmed, for ENVELOPE's text fields.
fn raw_value(m: &Message<'_>, name: &str) -> Option<String> {
    m.header_raw(name)
        .map(|v| v.replace("\r\n", "").replace('\n', "").trim().to_string())
}

/// Appends the ENVELOPE of `m`.
pub fn envelope(out: &mut Vec<u8>, m: &Message<'_>) {
    out.push(b'(');
    nstr(out, raw_value(m, "Date").as_deref());
    out.push(b' ');
    nstr(out, raw_value(m, "Subject").as_deref());
    let from = m.from();
    for address in [
        from,
        m.sender().or(from),
        m.reply_to().or(from),
        m.to(),
        m.cc(),
        m.bcc(),
    ] {
        out.push(b' ');
        address_list(out, address);
    }
    out.push(b' ');
    nstr(out, raw_value(m, "In-Reply-To").as_deref());
    out.push(b' ');
    nstr(out, raw_value(m, "Message-ID").as_deref());
    out.push(b')');
}

fn params(out: &mut Vec<u8>, attributes: Option<&[mail_parser::Attribute<'_>]>) {
    match attributes {
        Some(attrs) if !attrs.is_empty() => {
            out.push(b'(');
            for (i, a) in attrs.iter().enumerate() {
                if i > 0 {
                    out.push(b' ');
                }
                string(out, a.name.as_bytes());
                out.push(b' ');
                string(out, a.value.as_bytes());
            }
            out.push(b')');
        }
        _ => out.extend_from_slice(b"NIL"),
    }
}

fn extension_data(out: &mut Vec<u8>, m: &Message<'_>, idx: usize) {
    let part = &m.parts[idx];
    out.push(b' ');
    match part.content_disposition() {
        Some(d) => {
            out.push(b'(');
            string(out, d.ctype().as_bytes());
            out.push(b' ');
            params(out, d.attributes());
            out.push(b')');
        }
        None => out.extend_from_slice(b"NIL"),
    }
    out.push(b' ');
    match part.content_language() {
        HeaderValue::Text(t) => string(out, t.as_bytes()),
        HeaderValue::TextList(list) if !list.is_empty() => {
            out.push(b'(');
            for (i, t) in list.iter().enumerate() {
                if i > 0 {
                    out.push(b' ');
                }
                string(out, t.as_bytes());
            }
            out.push(b')');
        }
        _ => out.extend_from_slice(b"NIL"),
    }
    out.push(b' ');
    nstr(out, part.content_location());
}

/// Appends BODYSTRUCTURE (`extended`) or BODY of `m`.
pub fn body_structure(out: &mut Vec<u8>, m: &Message<'_>, extended: bool) {
    part_structure(out, m, 0, extended, 0);
}

fn part_structure(out: &mut Vec<u8>, m: &Message<'_>, idx: usize, extended: bool, depth: usize) {
    let Some(part) = m.parts.get(idx) else {
        out.extend_from_slice(b"NIL");
        return;
    };
    let content_type = part.content_type();
    out.push(b'(');
    if let PartType::Multipart(children) = &part.body
        && depth < 64
    {
        for &child in children {
            part_structure(out, m, child as usize, extended, depth + 1);
        }
        if children.is_empty() {
            // A multipart without parts: one empty text part keeps clients happy.
            out.extend_from_slice(b"(\"text\" \"plain\" NIL NIL NIL \"7bit\" 0 0)");
        }
        out.push(b' ');
        let subtype = content_type
            .and_then(|c| c.subtype())
            .unwrap_or("mixed")
            .to_ascii_lowercase();
        string(out, subtype.as_bytes());
        if extended {
            out.push(b' ');
            params(out, content_type.and_then(|c| c.attributes()));
            extension_data(out, m, idx);
        }
        out.push(b')');
        return;
    }
    let (ctype, subtype) = match content_type {
        Some(c) => (
            c.ctype().to_ascii_lowercase(),
            c.subtype().unwrap_or("plain").to_ascii_lowercase(),
        ),
        None => ("text".to_string(), "plain".to_string()),
    };
    string(out, ctype.as_bytes());
    out.push(b' ');
    string(out, subtype.as_bytes());
    out.push(b' ');
    match content_type.and_then(|c| c.attributes()) {
        Some(attrs) if !attrs.is_empty() => params(out, Some(attrs)),
        _ if ctype == "text" => out.extend_from_slice(b"(\"charset\" \"us-ascii\")"),
        _ => out.extend_from_slice(b"NIL"),
    }
    out.push(b' ');
    // The field as it stands, angle brackets included (mail-parser strips them; RFC
    // 9051 body-fld-id is the Content-ID value, and Dovecot serves it whole).
    let content_id = part
        .headers
        .iter()
        .find(|h| h.name == mail_parser::HeaderName::ContentId)
        .and_then(|h| {
            let raw = m.raw_message.as_ref();
            std::str::from_utf8(slice(raw, h.offset_start as usize, h.offset_end as usize)).ok()
        })
        .map(|v| v.replace("\r\n", "").replace('\n', ""));
    nstr(out, content_id.as_deref().map(str::trim));
    out.push(b' ');
    nstr(out, part.content_description());
    out.push(b' ');
    let encoding = part
        .content_transfer_encoding()
        .unwrap_or("7bit")
        .trim()
        .to_ascii_lowercase();
    string(out, encoding.as_bytes());
    let body = part_body(m, idx);
    out.extend_from_slice(format!(" {}", body.len()).as_bytes());
    let lines = body.iter().filter(|b| **b == b'\n').count();
    match &part.body {
        PartType::Message(inner) if ctype == "message" => {
            out.push(b' ');
            envelope(out, inner);
            out.push(b' ');
            if depth < 64 {
                part_structure(out, inner, 0, extended, depth + 1);
            } else {
                out.extend_from_slice(b"NIL");
            }
            out.extend_from_slice(format!(" {lines}").as_bytes());
        }
        _ if ctype == "text" => out.extend_from_slice(format!(" {lines}").as_bytes()),
        _ => {}
    }
    if extended {
        out.extend_from_slice(b" NIL");
        extension_data(out, m, idx);
    }
    out.push(b')');
}

#[cfg(test)]
mod tests {
    use super::*;

    const NESTED: &[u8] = b"From: \"Zo\xc3\xab\" <zoe@example.test>\r\nTo: a@example.test, Group: b@x.test;\r\nSubject: nested\r\nMessage-ID: <n@x>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"o\"\r\n\r\npreamble\r\n--o\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\nline 2\r\n--o\r\nContent-Type: message/rfc822\r\n\r\nFrom: inner@x.test\r\nSubject: inner\r\nContent-Type: multipart/alternative; boundary=\"i\"\r\n\r\n--i\r\nContent-Type: text/plain\r\n\r\ninner text\r\n--i\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"a.bin\"\r\n\r\nAAECAw==\r\n--i--\r\n\r\n--o--\r\n";

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    fn sec(part: &[u32], text: SectionText) -> Section {
        Section {
            part: part.to_vec(),
            text,
        }
    }

    #[test]
    fn sections_of_a_nested_message_are_slices_of_the_stored_bytes() {
        let m = parse(NESTED);
        assert_eq!(section(&m, &sec(&[], SectionText::Full)).unwrap(), NESTED);
        let header = text(section(&m, &sec(&[], SectionText::Header)).unwrap());
        assert!(
            header.starts_with("From: ") && header.ends_with("boundary=\"o\"\r\n\r\n"),
            "{header}"
        );
        assert_eq!(
            text(section(&m, &sec(&[1], SectionText::Full)).unwrap()),
            "caf=C3=A9\r\nline 2"
        );
        assert_eq!(
            text(section(&m, &sec(&[1], SectionText::Mime)).unwrap()),
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        );
        let inner_header = text(section(&m, &sec(&[2], SectionText::Header)).unwrap());
        assert!(
            inner_header.starts_with("From: inner@x.test\r\n"),
            "{inner_header}"
        );
        assert_eq!(
            text(section(&m, &sec(&[2, 1], SectionText::Full)).unwrap()),
            "inner text"
        );
        assert_eq!(
            text(section(&m, &sec(&[2, 2], SectionText::Full)).unwrap()),
            "AAECAw=="
        );
        assert_eq!(
            text(
                section(
                    &m,
                    &sec(
                        &[],
                        SectionText::HeaderFields(vec!["subject".into(), "To".into()])
                    )
                )
                .unwrap()
            ),
            "To: a@example.test, Group: b@x.test;\r\nSubject: nested\r\n\r\n"
        );
        assert_eq!(section(&m, &sec(&[3], SectionText::Full)), None);
        assert_eq!(section(&m, &sec(&[1, 1, 1], SectionText::Full)), None);
        assert_eq!(binary(&m, &[1]).unwrap(), "café\r\nline 2".as_bytes());
        assert_eq!(binary(&m, &[2, 2]).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(binary(&m, &[9]), Err(BinaryError::NoPart));
    }

    #[test]
    fn bodystructure_and_envelope_follow_the_mime_tree() {
        let m = parse(NESTED);
        let mut out = Vec::new();
        body_structure(&mut out, &m, true);
        let s = text(out);
        assert!(s.starts_with("((\"text\" \"plain\" (\"charset\" \"utf-8\") NIL NIL \"quoted-printable\" 17 1 NIL NIL NIL NIL)"), "{s}");
        assert!(
            s.contains("(\"message\" \"rfc822\" NIL NIL NIL \"7bit\" "),
            "{s}"
        );
        assert!(s.contains("(\"application\" \"octet-stream\" NIL NIL NIL \"base64\" 8 NIL (\"attachment\" (\"filename\" \"a.bin\")) NIL NIL)"), "{s}");
        assert!(
            s.contains(" \"alternative\" (\"boundary\" \"i\") NIL NIL NIL)"),
            "{s}"
        );
        assert!(
            s.ends_with(" \"mixed\" (\"boundary\" \"o\") NIL NIL NIL)"),
            "{s}"
        );
        let mut out = Vec::new();
        body_structure(&mut out, &m, false);
        assert!(text(out).ends_with(" \"mixed\")"));
        let mut out = Vec::new();
        envelope(&mut out, &m);
        let e = String::from_utf8_lossy(&out).to_string();
        // A raw 8-bit name goes out as an encoded word too: ENVELOPE stays ASCII.
        assert!(
            e.starts_with(
                "(NIL \"nested\" ((\"=?utf-8?q?Zo=C3=AB?=\" NIL \"zoe\" \"example.test\"))"
            ),
            "{e}"
        );
        assert!(e.contains("((NIL NIL \"a\" \"example.test\")(NIL NIL \"Group\" NIL)(NIL NIL \"b\" \"x.test\")(NIL NIL NIL NIL))"), "{e}");
        assert!(e.ends_with(" NIL NIL NIL \"<n@x>\")"), "{e}");
    }

    #[test]
    fn a_single_part_message_and_garbage_still_work() {
        let m = parse(b"Subject: x\r\n\r\nbody\r\n");
        assert_eq!(
            section(&m, &sec(&[1], SectionText::Full)).unwrap(),
            b"body\r\n"
        );
        assert_eq!(
            section(&m, &sec(&[], SectionText::Text)).unwrap(),
            b"body\r\n"
        );
        let mut out = Vec::new();
        body_structure(&mut out, &m, false);
        assert_eq!(
            text(out),
            "(\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 6 1)"
        );
        let m = parse(b"\x00\xff not a message");
        let mut out = Vec::new();
        body_structure(&mut out, &m, true);
        assert!(!out.is_empty());
    }

    /// Found by bench/differential/imap_structure.py against Dovecot 2.3.
    #[test]
    fn envelope_edge_cases_as_dovecot_answers_them() {
        let env = |raw: &[u8]| {
            let mut out = Vec::new();
            envelope(&mut out, &parse(raw));
            text(out)
        };
        // A quoted local part is the mailbox, not a display name.
        let e = env(b"From: \"odd local\"@domain.test\r\n\r\nbody\r\n");
        assert!(
            e.contains("((NIL NIL \"odd local\" \"domain.test\"))"),
            "{e}"
        );
        // A source route is the adl.
        let e = env(b"From: <@route.test:user@domain.test>\r\n\r\nbody\r\n");
        assert!(
            e.contains("((NIL \"@route.test\" \"user\" \"domain.test\"))"),
            "{e}"
        );
        // Empty Sender and Reply-To are From's; a name in a comment is the name.
        let e =
            env(b"From: user@domain.test (Real Name)\r\nSender: \r\nReply-To: \r\n\r\nbody\r\n");
        assert_eq!(
            e.matches("((\"Real Name\" NIL \"user\" \"domain.test\"))")
                .count(),
            3,
            "{e}"
        );
    }

    #[test]
    fn what_the_dovecot_differential_found() {
        let raw: &[u8] = b"From: =?utf-8?q?Zo=C3=AB?= <zoe@remote.test>\r\nSubject: s\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"o\"\r\n\r\n--o\r\nContent-Type: message/rfc822\r\n\r\nFrom: inner@remote.test\r\nSubject: inner\r\nContent-Type: multipart/alternative; boundary=\"i\"\r\n\r\n--i\r\nContent-Type: text/plain\r\n\r\ninner text\r\n--i--\r\n\r\n--o\r\nContent-Type: application/octet-stream\r\nContent-ID: <c1@x>\r\n\r\nAAECAw==\r\n--o--\r\nepilogue\r\n";
        let m = parse(raw);
        // ENVELOPE: a non-ASCII display name goes out as an encoded word, not UTF-8.
        let mut env = Vec::new();
        envelope(&mut env, &m);
        let env = text(env);
        assert!(
            env.contains("((\"=?utf-8?q?Zo=C3=AB?=\" NIL \"zoe\" \"remote.test\"))"),
            "{env}"
        );
        assert!(env.is_ascii());
        // BODYSTRUCTURE: Content-ID with its angle brackets.
        let mut structure = Vec::new();
        body_structure(&mut structure, &m, true);
        assert!(text(structure).contains("\"<c1@x>\""));
        // TEXT of an encapsulated message ends with its part, not the outer message.
        assert_eq!(
            text(section(&m, &sec(&[1], SectionText::Text)).unwrap()),
            "--i\r\nContent-Type: text/plain\r\n\r\ninner text\r\n--i--\r\n"
        );
        // A part that is not multipart is its own part 1.
        assert_eq!(
            section(&m, &sec(&[1, 1, 1], SectionText::Full)),
            section(&m, &sec(&[1, 1], SectionText::Full))
        );
        assert_eq!(
            text(section(&m, &sec(&[1, 1, 1], SectionText::Full)).unwrap()),
            "inner text"
        );
    }
}
