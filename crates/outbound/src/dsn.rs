//! Delivery status notifications (RFC 3464): a `multipart/report` with a human-readable
//! part, a `message/delivery-status` part with one block per recipient, and the
//! original message (`RET=FULL`) or its header section (`RET=HDRS`, or by default when
//! the message is large), built with `mail-builder`.
//!
//! Who gets one: the envelope sender, never the null sender (a DSN's own envelope sender
//! is null, so DSNs never loop), and only for recipients whose NOTIFY asks for that
//! event (failures and delays by default; NOTIFY=NEVER silences them).

use mail_builder::MessageBuilder;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::{BodyPart, MimePart};
use mailroom_store::{Envelope, RecipientState, Ret};

/// Which kind of notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Permanent failure or expiry (`Action: failed`).
    Failed,
    /// Still trying (`Action: delayed`).
    Delayed,
    /// Handed to a next hop that does not offer DSN, for a recipient that asked to hear
    /// of success (`Action: relayed`, RFC 3461 §6.2.2): nobody further will report it.
    Relayed,
}

/// Messages larger than this are returned as headers only unless RET=FULL.
pub const RETURN_FULL_MAX: usize = 256 * 1024;

/// What a notice needs to say.
pub struct Notice<'a> {
    /// This server's name (`Reporting-MTA`, and the From address's domain).
    pub reporting_mta: &'a str,
    /// The original message's envelope.
    pub envelope: &'a Envelope,
    /// The recipients this notice reports.
    pub recipients: Vec<&'a RecipientState>,
    /// Failed or delayed.
    pub action: Action,
    /// When the original arrived (Unix ms).
    pub arrival_ms: i64,
    /// The queue identifier, quoted in the text.
    pub queue_id: &'a str,
    /// The original message bytes.
    pub original: &'a [u8],
    /// Delayed notices: until when we keep trying (Unix ms).
    pub retry_until_ms: Option<i64>,
}

fn rfc2822_date(ms: i64) -> String {
    mail_builder::headers::date::Date::new(ms / 1000).to_rfc822()
}

/// Whether `recipient` wants to hear about `action`.
pub fn wanted(recipient: &RecipientState, action: Action) -> bool {
    let notify = recipient.notify();
    match action {
        Action::Failed => notify.failure,
        Action::Delayed => notify.delay,
        Action::Relayed => notify.success,
    }
}

/// A value for one line of the delivery-status part. ENVID and ORCPT arrive
/// xtext-encoded and are stored decoded, so they (and a next hop's reply) may hold CR,
/// LF or other controls; written raw they would add fields or lines of the sender's
/// choosing. Controls are written back in xtext form (`+0D`), everything else as is.
fn field(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.chars().any(|c| c.is_control()) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        if c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("+{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Builds the notice to `to` (the original envelope sender); returns the message bytes.
pub fn build(notice: &Notice<'_>, to: &str) -> Vec<u8> {
    let mut text = String::new();
    match notice.action {
        Action::Failed => {
            text.push_str(&format!(
                "This is the mail system at {}.\r\n\r\nYour message (queue id {}) could not be \
                 delivered to the recipient(s) below. This is a permanent error; it will not \
                 be tried again.\r\n\r\n",
                notice.reporting_mta, notice.queue_id
            ));
        }
        Action::Relayed => {
            text.push_str(&format!(
                "This is the mail system at {}.\r\n\r\nYour message (queue id {}) was handed \
                 to the next mail server for the recipient(s) below. That server does not \
                 report deliveries, so this is the last notice you will get about them.\r\n\r\n",
                notice.reporting_mta, notice.queue_id
            ));
        }
        Action::Delayed => {
            text.push_str(&format!(
                "This is the mail system at {}.\r\n\r\nYour message (queue id {}) has not been \
                 delivered yet to the recipient(s) below. Nothing needs doing: delivery will \
                 go on being tried{}.\r\n\r\n",
                notice.reporting_mta,
                notice.queue_id,
                notice
                    .retry_until_ms
                    .map(|ms| format!(" until {}", rfc2822_date(ms)))
                    .unwrap_or_default()
            ));
        }
    }
    for r in &notice.recipients {
        text.push_str(&format!(
            "<{}>: {}\r\n",
            field(&r.address),
            field(r.reply.as_deref().unwrap_or("no reason recorded"))
        ));
    }

    let mut status = format!("Reporting-MTA: dns; {}\r\n", notice.reporting_mta);
    if let Some(env_id) = &notice.envelope.env_id {
        status.push_str(&format!("Original-Envelope-Id: {}\r\n", field(env_id)));
    }
    status.push_str(&format!(
        "Arrival-Date: {}\r\n",
        rfc2822_date(notice.arrival_ms)
    ));
    for r in &notice.recipients {
        status.push_str("\r\n");
        if let Some(orcpt) = &r.orcpt {
            status.push_str(&format!("Original-Recipient: {}\r\n", field(orcpt)));
        }
        status.push_str(&format!(
            "Final-Recipient: rfc822; {}\r\n",
            field(&r.address)
        ));
        let (action, default_code) = match notice.action {
            Action::Failed => ("failed", "5.0.0"),
            Action::Delayed => ("delayed", "4.0.0"),
            Action::Relayed => ("relayed", "2.0.0"),
        };
        status.push_str(&format!("Action: {action}\r\n"));
        let code = r.code.as_deref().unwrap_or(default_code);
        status.push_str(&format!("Status: {code}\r\n"));
        if let Some(mta) = &r.remote_mta {
            status.push_str(&format!("Remote-MTA: dns; {}\r\n", field(mta)));
        }
        if let Some(reply) = &r.reply {
            let kind = if reply.len() >= 3 && reply.as_bytes()[..3].iter().all(u8::is_ascii_digit) {
                "smtp"
            } else {
                "x-mailroom"
            };
            status.push_str(&format!("Diagnostic-Code: {kind}; {}\r\n", field(reply)));
        }
        if let Some(until) = notice.retry_until_ms {
            status.push_str(&format!("Will-Retry-Until: {}\r\n", rfc2822_date(until)));
        }
    }

    // Mail from an unverified outside sender gets its headers back, never its body:
    // otherwise a forged sender turns this server into a reflector (backscatter).
    let headers_only = notice.envelope.unauthenticated
        || match notice.envelope.ret {
            Some(Ret::Full) => false,
            Some(Ret::Headers) => true,
            None => notice.original.len() > RETURN_FULL_MAX,
        };
    let returned = if headers_only {
        let end = find(notice.original, b"\r\n\r\n").map_or(notice.original.len(), |p| p + 2);
        MimePart::new(
            "text/rfc822-headers",
            BodyPart::Binary(notice.original[..end].into()),
        )
        .transfer_encoding(if notice.original[..end].is_ascii() {
            "7bit"
        } else {
            "8bit"
        })
    } else {
        MimePart::new("message/rfc822", BodyPart::Binary(notice.original.into())).transfer_encoding(
            if notice.original.is_ascii() {
                "7bit"
            } else {
                "8bit"
            },
        )
    };
    let report = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
        BodyPart::Multipart(vec![
            MimePart::new("text/plain", BodyPart::Text(text.into())),
            MimePart::new(
                "message/delivery-status",
                BodyPart::Binary(status.into_bytes().into()),
            )
            .transfer_encoding("7bit"),
            returned,
        ]),
    );
    let subject = match notice.action {
        Action::Failed => "Undelivered Mail Returned to Sender",
        Action::Delayed => "Delayed Mail (still being retried)",
        Action::Relayed => "Successful Mail Delivery Report (relayed)",
    };
    MessageBuilder::new()
        .from((
            "Mail Delivery System".to_string(),
            format!("MAILER-DAEMON@{}", notice.reporting_mta),
        ))
        .to(to.to_string())
        .subject(subject)
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(report)
        .write_to_vec()
        .expect("writing to a Vec cannot fail")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MimeHeaders;
    use mailroom_store::{Notify, RecipientStatus};

    #[test]
    fn a_failure_notice_parses_as_a_delivery_report() {
        let envelope = Envelope {
            ret: Some(Ret::Headers),
            env_id: Some("env-42".into()),
            recipients: vec![RecipientState {
                address: "bob@remote.test".into(),
                orcpt: Some("rfc822;bob@remote.test".into()),
                notify: Some(Notify::DEFAULT),
                status: RecipientStatus::Failed,
                code: Some("5.1.1".into()),
                reply: Some("550 5.1.1 no such user".into()),
                remote_mta: Some("mx.remote.test".into()),
                tls: None,
            }],
            delay_notified: false,
            unauthenticated: false,
            authenticated_as: None,
            junk: None,
        };
        let original = b"Subject: hello\r\nFrom: a@local.test\r\n\r\nbody text\r\n";
        let bytes = build(
            &Notice {
                reporting_mta: "mx.local.test",
                envelope: &envelope,
                recipients: envelope.recipients.iter().collect(),
                action: Action::Failed,
                arrival_ms: 1_700_000_000_000,
                queue_id: "Q1",
                original,
                retry_until_ms: None,
            },
            "a@local.test",
        );
        let message = mail_parser::MessageParser::default().parse(&bytes).unwrap();
        let ct = message.content_type().unwrap();
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        let text = String::from_utf8_lossy(&bytes);
        for field in [
            "Reporting-MTA: dns; mx.local.test",
            "Original-Envelope-Id: env-42",
            "Original-Recipient: rfc822;bob@remote.test",
            "Final-Recipient: rfc822; bob@remote.test",
            "Action: failed",
            "Status: 5.1.1",
            "Remote-MTA: dns; mx.remote.test",
            "Diagnostic-Code: smtp; 550 5.1.1 no such user",
            "Content-Type: text/rfc822-headers",
            "Auto-Submitted: auto-replied",
        ] {
            assert!(text.contains(field), "missing {field:?} in\n{text}");
        }
        assert!(!text.contains("body text"), "RET=HDRS returns headers only");
    }

    #[test]
    fn outside_senders_get_headers_only_and_no_field_can_be_injected() {
        let envelope = Envelope {
            ret: Some(Ret::Full),
            env_id: Some("id\r\nX-Injected: yes".into()),
            recipients: vec![RecipientState {
                address: "bob@remote.test".into(),
                orcpt: Some("rfc822;bob@x\r\n\r\nEvil-Body".into()),
                status: RecipientStatus::Failed,
                code: Some("5.1.1".into()),
                reply: Some("550 no\r\nAction: delivered".into()),
                ..RecipientState::default()
            }],
            delay_notified: false,
            unauthenticated: true,
            authenticated_as: None,
            junk: None,
        };
        let original = b"Subject: hello\r\n\r\nthe whole attack payload\r\n";
        let bytes = build(
            &Notice {
                reporting_mta: "mx.local.test",
                envelope: &envelope,
                recipients: envelope.recipients.iter().collect(),
                action: Action::Failed,
                arrival_ms: 1_700_000_000_000,
                queue_id: "Q1",
                original,
                retry_until_ms: None,
            },
            "victim@forged.test",
        );
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("attack payload"),
            "RET=FULL from outside: headers only"
        );
        assert!(text.contains("Content-Type: text/rfc822-headers"), "{text}");
        for line in text.lines() {
            assert!(!line.starts_with("X-Injected"), "{text}");
            assert!(!line.starts_with("Evil-Body"), "{text}");
            assert_ne!(line, "Action: delivered", "{text}");
        }
        assert!(
            text.contains("Original-Envelope-Id: id+0D+0AX-Injected: yes"),
            "{text}"
        );
    }
}
