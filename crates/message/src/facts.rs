//! What a message says about itself, as the store records it.

use mail_parser::{Address, MessageParser, MessagePart, MimeHeaders, PartType};
use mailroom_store::MessageFacts;
use serde_json::{Value, json};

/// Nesting depth of the MIME tree recorded, at most; deeper parts are summarised.
const MIME_DEPTH_MAX: usize = 32;

/// Parses `raw` and extracts the facts the store keeps. Never fails: a message the parser
/// cannot read gets `parsed: false` and empty fields, and is delivered all the same.
pub fn message_facts(raw: &[u8]) -> MessageFacts {
    let Some(message) = crate::mime::parse(&MessageParser::default(), raw) else {
        return MessageFacts {
            parsed: false,
            mime: json!({"type": "text/plain", "size": raw.len()}),
            ..MessageFacts::default()
        };
    };
    MessageFacts {
        message_id: message.message_id().map(str::to_string),
        from: message.from().and_then(first_address),
        to: addresses(message.to()),
        cc: addresses(message.cc()),
        subject: message.subject().map(str::to_string),
        date_ms: message.date().map(|d| d.to_timestamp() * 1000),
        mime: mime_tree(&message, 0, 0),
        parsed: true,
    }
}

fn first_address(address: &Address<'_>) -> Option<String> {
    address
        .first()
        .and_then(|a| a.address().or(a.name()))
        .map(str::to_string)
}

fn addresses(address: Option<&Address<'_>>) -> Vec<String> {
    address
        .map(|a| {
            a.iter()
                .filter_map(|a| a.address())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn content_type(part: &MessagePart<'_>) -> String {
    match part.content_type() {
        Some(ct) => format!(
            "{}/{}",
            ct.ctype().to_lowercase(),
            ct.subtype().unwrap_or("").to_lowercase()
        ),
        None => "text/plain".to_string(),
    }
}

fn mime_tree(message: &mail_parser::Message<'_>, part_id: u32, depth: usize) -> Value {
    let Some(part) = message.part(part_id) else {
        return Value::Null;
    };
    let size = part.offset_end.saturating_sub(part.offset_body);
    let mut node = json!({"type": content_type(part), "size": size});
    if part.is_encoding_problem {
        node["encoding_problem"] = Value::Bool(true);
    }
    if depth >= MIME_DEPTH_MAX {
        return node;
    }
    match &part.body {
        PartType::Multipart(children) => {
            node["parts"] = children
                .iter()
                .map(|&child| mime_tree(message, child, depth + 1))
                .collect();
        }
        PartType::Message(inner) => {
            node["message"] = mime_tree(inner, 0, depth + 1);
        }
        _ => {}
    }
    node
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_of_a_multipart_message() {
        let raw = b"From: Alice <alice@example.test>\r\nTo: b@example.test, c@example.test\r\n\
Subject: =?utf-8?q?caf=C3=A9?=\r\nMessage-ID: <m1@example.test>\r\n\
Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n\
--b1\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n--b1--\r\n";
        let facts = message_facts(raw);
        assert!(facts.parsed);
        assert_eq!(facts.message_id.as_deref(), Some("m1@example.test"));
        assert_eq!(facts.from.as_deref(), Some("alice@example.test"));
        assert_eq!(facts.to, vec!["b@example.test", "c@example.test"]);
        assert_eq!(facts.subject.as_deref(), Some("café"));
        assert_eq!(facts.date_ms, Some(1_795_860_000_000));
        assert_eq!(facts.mime["type"], "multipart/mixed");
        assert_eq!(facts.mime["parts"][0]["type"], "text/plain");
        assert_eq!(facts.mime["parts"][1]["type"], "message/rfc822");
        assert_eq!(facts.mime["parts"][1]["message"]["type"], "text/plain");
    }

    #[test]
    fn garbage_still_has_facts() {
        let facts = message_facts(b"\0\0\xff\xfe not a message");
        assert_eq!(facts.message_id, None);
        assert!(facts.mime.is_object());
    }
}
