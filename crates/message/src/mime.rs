//! Parsing a message with `mail-parser`, made safe for any input.
//!
//! `mail-parser` follows `message/rfc822` parts to any depth (it keeps its own stack, so
//! parsing does not recurse) and returns them as a tree of nested `Message`s. Dropping
//! or walking such a tree recurses once per level: a 500 KB message of 10,000 nested
//! `message/rfc822` parts overflowed the stack of whichever thread touched it (found by
//! the hostile battery, `crates/fuzz`). Every parse in Mailroom goes through [`parse`],
//! which cuts the tree at [`MESSAGE_NESTING_MAX`] levels without recursion; deeper
//! messages become opaque parts (their bytes stay in the stored message, served by
//! offset like any other part). Multipart nesting is flat in `mail-parser`'s output (an
//! index list), so walkers bound it themselves.

use mail_parser::{Encoding, Message, MessageParser, MessagePart, PartType};
use std::borrow::Cow;

/// Levels of `message/rfc822` kept, at most. Real mail nests a handful (a forward of a
/// forward); Dovecot stops at 100 MIME levels of any kind.
pub const MESSAGE_NESTING_MAX: usize = 64;

/// Parses `raw` with `parser` and bounds the nesting of the result (see the module
/// documentation). `None` when `mail-parser` finds no message at all. Every message in
/// the result, nested ones included, has a root part: `mail-parser`'s accessors
/// (`header_raw`, `root_part` ...) index part 0 and panic without one.
pub fn parse<'x>(parser: &MessageParser, raw: &'x [u8]) -> Option<Message<'x>> {
    // `mail-parser` is third-party code reading bytes from anyone: a panic inside it
    // (fuzzing found a `debug_assert!` that fires on a malformed nested part) must
    // cost a parse, not a session or a worker. The bytes are then shown as one
    // opaque part.
    let mut message =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parser.parse(raw))).ok()??;
    bound_nesting(&mut message, MESSAGE_NESTING_MAX);
    Some(message)
}

/// A message of one opaque part holding all of `raw`: what a reader shows for bytes
/// `mail-parser` finds no message in (no header section at all). Its accessors work and
/// find no headers.
pub fn opaque(raw: &[u8]) -> Message<'_> {
    Message {
        parts: vec![root_part(raw.len())],
        raw_message: raw.into(),
        ..Message::default()
    }
}

fn root_part<'x>(len: usize) -> MessagePart<'x> {
    MessagePart {
        headers: Vec::new(),
        is_encoding_problem: true,
        body: PartType::Binary(Cow::Owned(Vec::new())),
        encoding: Encoding::None,
        offset_header: 0,
        offset_body: 0,
        offset_end: u32::try_from(len).unwrap_or(u32::MAX),
    }
}

/// Replaces every `message/rfc822` part nested deeper than `max` levels, or carrying a
/// transfer encoding, by an opaque part marked as an encoding problem, dismantling what
/// was cut without recursion.
pub fn bound_nesting(message: &mut Message<'_>, max: usize) {
    let mut cut: Vec<MessagePart<'_>> = Vec::new();
    let mut stack: Vec<(&mut Message<'_>, usize)> = vec![(message, 1)];
    while let Some((m, depth)) = stack.pop() {
        if m.parts.is_empty() {
            m.parts.push(root_part(m.raw_message.len()));
        }
        untangle(&mut m.parts);
        for part in m.parts.iter_mut() {
            if !matches!(part.body, PartType::Message(_)) {
                continue;
            }
            // RFC 2046 5.2.1: a message/rfc822 body is 7bit, 8bit or binary. One with a
            // transfer encoding is parsed by mail-parser from a decoded copy, whose
            // sections are not slices of the stored bytes (fuzzing found one served
            // longer than the whole message): it is an opaque part instead.
            let encoded = part.encoding != Encoding::None;
            if depth < max && !encoded {
                if let PartType::Message(inner) = &mut part.body {
                    stack.push((inner, depth + 1));
                }
            } else if let PartType::Message(inner) =
                std::mem::replace(&mut part.body, PartType::Binary(Cow::Owned(Vec::new())))
            {
                part.is_encoding_problem = true;
                cut.extend(inner.parts);
            }
        }
    }
    dismantle(cut);
}

/// Makes the multipart structure of one message a tree. `mail-parser` lists a
/// multipart's children by index; on malformed input (found by fuzzing) a child list can
/// name a part twice or name an ancestor, and every walker that follows children (the
/// facts' MIME tree, BODYSTRUCTURE) then visits the same parts over and over: a 475-byte
/// message kept a conversion worker busy for good. Parts come in document order, so a
/// child follows its parent: each child index must be above its parent's and appear
/// once; anything else is dropped from the list (its bytes stay in the message).
fn untangle(parts: &mut [MessagePart<'_>]) {
    let mut claimed = vec![false; parts.len()];
    for (index, part) in parts.iter_mut().enumerate() {
        if let PartType::Multipart(children) = &mut part.body {
            children.retain(|&child| {
                let child = child as usize;
                let fine = child > index && child < claimed.len() && !claimed[child];
                if fine {
                    claimed[child] = true;
                }
                fine
            });
        }
    }
}

/// Drops parts that may hold deeply nested messages, one level at a time.
fn dismantle(mut parts: Vec<MessagePart<'_>>) {
    while let Some(mut part) = parts.pop() {
        if let PartType::Message(inner) = std::mem::take(&mut part.body) {
            parts.extend(inner.parts);
        }
    }
}

/// Nesting depth of `message/rfc822` parts in `message` (1 for a message without any),
/// measured without recursion.
pub fn nesting(message: &Message<'_>) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(message, 1usize)];
    while let Some((m, depth)) = stack.pop() {
        deepest = deepest.max(depth);
        for part in &m.parts {
            if let PartType::Message(inner) = &part.body {
                stack.push((inner, depth + 1));
            }
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> Vec<u8> {
        let mut raw = Vec::new();
        for _ in 0..levels {
            raw.extend_from_slice(b"Subject: x\r\nContent-Type: message/rfc822\r\n\r\n");
        }
        raw.extend_from_slice(b"Subject: inner\r\n\r\nbody\r\n");
        raw
    }

    /// 10,000 levels used to overflow the stack when the parsed message was dropped.
    /// Here the parse runs on a thread with a 256 KiB stack: far less than any runtime
    /// or worker thread of the server has.
    #[test]
    fn deep_nesting_is_cut_and_dropped_on_a_small_stack() {
        let raw = nested(10_000);
        let depth = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let message = parse(&MessageParser::default(), &raw).expect("parses");
                nesting(&message)
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
        assert_eq!(depth, MESSAGE_NESTING_MAX);
    }

    /// Found by fuzzing (crates/fuzz, mime): bytes without a header section made the
    /// IMAP view an empty message, and ENVELOPE panicked indexing its part 0, so one
    /// such stored message broke every client's FETCH of its folder.
    #[test]
    fn unparsable_bytes_give_a_message_whose_accessors_work() {
        let raw = b"S\xf6bject\x18 nul \x00^U hUUU\x05\nFro;\r\n\xf9dllo th\n \x01\r\n";
        let message = parse(&MessageParser::default(), raw).unwrap_or_else(|| opaque(raw));
        assert!(!message.parts.is_empty());
        assert_eq!(message.header_raw("Subject"), None);
        let _ = message.subject();
        assert_eq!(opaque(b"").parts.len(), 1);
    }

    /// Found by fuzzing (crates/fuzz, mime): a 475-byte message whose multipart child
    /// lists repeat parts made the facts' MIME tree walk exponential (over a minute;
    /// no end in sight). Every part is now reached once.
    #[test]
    fn tangled_child_lists_become_a_tree() {
        let raw = include_bytes!("../../../fuzz/regressions/mime/tangled_children");
        let message = parse(&MessageParser::default(), raw).expect("parses");
        let mut reached = vec![0usize; message.parts.len()];
        for part in &message.parts {
            if let PartType::Multipart(children) = &part.body {
                for &c in children {
                    reached[c as usize] += 1;
                }
            }
        }
        assert!(reached.iter().all(|&n| n <= 1), "{reached:?}");
        assert!(crate::message_facts(raw).parsed);
    }

    /// Found by fuzzing (crates/fuzz, mime): a message/rfc822 part with a
    /// quoted-printable transfer encoding was parsed from mail-parser's decoded copy,
    /// and IMAP served a section of it longer than the whole stored message.
    #[test]
    fn an_encoded_message_part_is_opaque() {
        let raw = include_bytes!("../../../fuzz/regressions/mime/section_longer_than_message_0");
        let message = parse(&MessageParser::default(), raw).expect("parses");
        assert!(
            message
                .parts
                .iter()
                .all(|p| !matches!(p.body, PartType::Message(_)) || p.encoding == Encoding::None)
        );
    }

    /// Found by fuzzing (crates/fuzz, mime): this message trips a `debug_assert!` in
    /// mail-parser 0.11.9 ("Invalid part ID, could not find multipart"). With debug
    /// assertions on (tests) that was a panic; now it is a message without a parse.
    #[test]
    fn a_panic_inside_the_parser_is_contained() {
        let raw = include_bytes!("../../../fuzz/regressions/mime/parser_debug_assert");
        let message = parse(&MessageParser::default(), raw).unwrap_or_else(|| opaque(raw));
        assert!(!message.parts.is_empty());
    }

    #[test]
    fn shallow_messages_are_untouched() {
        let raw = nested(3);
        let parser = MessageParser::default();
        let bounded = parse(&parser, &raw).unwrap();
        let plain = parser.parse(&raw[..]).unwrap();
        assert_eq!(nesting(&bounded), 4);
        assert_eq!(bounded, plain);
    }
}
