//! SMTP replies as typed values, rendered in one place.

use std::borrow::Cow;

/// One SMTP reply: a code, an optional enhanced status code (RFC 3463), and text lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code.
    pub code: u16,
    /// The enhanced status code, when one applies.
    pub status: Option<(u8, u16, u16)>,
    /// The text, one entry per line.
    pub lines: Vec<Cow<'static, str>>,
}

impl Reply {
    /// A one-line reply with an enhanced status code.
    pub fn new(code: u16, status: (u8, u16, u16), text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            status: Some(status),
            lines: vec![text.into()],
        }
    }

    /// A reply without an enhanced status code (greeting, EHLO, HELO).
    pub fn plain(code: u16, lines: Vec<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            status: None,
            lines,
        }
    }

    /// True for 4xx and 5xx replies.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// Appends the wire form (CRLF line endings, `-` on every line but the last).
    /// Written straight into `out` (no string per line: a session renders several
    /// replies for every message).
    pub fn render(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        let count = self.lines.len().max(1);
        for index in 0..count {
            let line = self.lines.get(index).map_or("", |l| l.as_ref());
            let separator = if index + 1 == count { ' ' } else { '-' };
            // Writing into a Vec cannot fail.
            let _ = match self.status {
                Some((class, subject, detail)) => write!(
                    out,
                    "{}{separator}{class}.{subject}.{detail} {line}\r\n",
                    self.code
                ),
                None => write!(out, "{}{separator}{line}\r\n", self.code),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_rendering() {
        let mut out = Vec::new();
        Reply::plain(250, vec!["a".into(), "b".into()]).render(&mut out);
        Reply::new(550, (5, 1, 1), "no").render(&mut out);
        assert_eq!(out, b"250-a\r\n250 b\r\n550 5.1.1 no\r\n");
    }
}
