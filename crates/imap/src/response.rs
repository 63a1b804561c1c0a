//! Writing IMAP's wire format: strings (quoted or literal), NIL, lists, dates.
//!
//! Rule: a value is quoted only when it is short printable ASCII without `"`-breaking
//! bytes; anything else (8-bit, CR/LF, long) goes out as a literal, which every IMAP4rev1
//! and IMAP4rev2 client reads. So no input can break the framing of a response.

/// Appends `bytes` as a string: quoted when safe, a literal otherwise.
pub fn string(out: &mut Vec<u8>, bytes: &[u8]) {
    let quotable = bytes.len() <= 1024 && bytes.iter().all(|b| (0x20..0x7f).contains(b));
    if quotable {
        out.push(b'"');
        for &b in bytes {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        literal(out, bytes);
    }
}

/// Appends a literal `{n}` CRLF bytes.
pub fn literal(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(format!("{{{}}}\r\n", bytes.len()).as_bytes());
    out.extend_from_slice(bytes);
}

/// Appends a string or NIL.
pub fn nstring(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(v) => string(out, v),
        None => out.extend_from_slice(b"NIL"),
    }
}

/// Appends a string or NIL from text.
pub fn nstr(out: &mut Vec<u8>, value: Option<&str>) {
    nstring(out, value.map(str::as_bytes));
}

/// Appends a mailbox name (INBOX as an atom, others as strings).
pub fn mailbox(out: &mut Vec<u8>, name: &str) {
    if name == "INBOX" {
        out.extend_from_slice(b"INBOX");
    } else {
        string(out, name.as_bytes());
    }
}

/// Appends `(f1 f2 ...)`.
pub fn flags(out: &mut Vec<u8>, flags: &[String]) {
    out.push(b'(');
    out.extend_from_slice(flags.join(" ").as_bytes());
    out.push(b')');
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

pub use mailroom_watch::civil::civil_from_days;

/// An INTERNALDATE: `"dd-Mon-yyyy hh:mm:ss +0000"` (UTC).
pub fn internal_date(out: &mut Vec<u8>, unix_ms: i64) {
    let secs = unix_ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    out.extend_from_slice(
        format!(
            "\"{d:02}-{}-{y:04} {:02}:{:02}:{:02} +0000\"",
            MONTHS[(m - 1) as usize],
            rest / 3600,
            rest % 3600 / 60,
            rest % 60
        )
        .as_bytes(),
    );
}

/// Response bytes kept before they are handed on: a FETCH of many messages (or of one
/// message's body 400 times) streams out in pieces of about this size, so memory per
/// session is one message plus this, whatever the client asks for.
pub const RESPONSE_FLUSH_BYTES: usize = 256 * 1024;

/// Where a command's responses go: a buffer handed to a sink whenever it holds
/// [`RESPONSE_FLUSH_BYTES`] (at a point the command chooses, between complete items).
/// The sink is the driver's bounded channel to the socket, or a test's vector; it
/// answers false once the client is gone or stopped reading, and the command then
/// stops producing output. Dereferences to the buffer, so response writers need not
/// know about it.
pub struct Output<'a> {
    buffer: Vec<u8>,
    sink: &'a mut dyn FnMut(Vec<u8>) -> bool,
    /// Bytes already handed on for this command.
    written: usize,
    failed: bool,
}

impl<'a> Output<'a> {
    /// An empty output in front of `sink`.
    pub fn new(sink: &'a mut dyn FnMut(Vec<u8>) -> bool) -> Output<'a> {
        Output {
            buffer: Vec::new(),
            sink,
            written: 0,
            failed: false,
        }
    }

    /// Hands on what is buffered if it is over the threshold. False once the sink
    /// refused: the command should stop producing output.
    pub fn flush_if_full(&mut self) -> bool {
        if self.failed {
            return false;
        }
        if self.buffer.len() < RESPONSE_FLUSH_BYTES {
            return true;
        }
        let chunk = std::mem::take(&mut self.buffer);
        let size = chunk.len();
        if (self.sink)(chunk) {
            self.written += size;
            true
        } else {
            self.failed = true;
            false
        }
    }

    /// Whether part of this command's output has been handed on already.
    pub fn partly_written(&self) -> bool {
        self.written > 0
    }

    /// The rest of the output, or `None` when the sink refused part of it (the client
    /// is gone).
    pub fn finish(self) -> Option<Vec<u8>> {
        (!self.failed).then_some(self.buffer)
    }
}

impl std::ops::Deref for Output<'_> {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.buffer
    }
}

impl std::ops::DerefMut for Output<'_> {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buffer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_that_could_break_framing_become_literals() {
        let mut out = Vec::new();
        string(&mut out, b"plain \"quoted\" \\");
        assert_eq!(out, b"\"plain \\\"quoted\\\" \\\\\"");
        out.clear();
        string(&mut out, "Zoë".as_bytes());
        assert_eq!(out, "{4}\r\nZoë".as_bytes());
        out.clear();
        string(&mut out, b"a\r\nb");
        assert_eq!(out, b"{4}\r\na\r\nb");
        out.clear();
        internal_date(&mut out, 1_772_704_800_000);
        assert_eq!(out, b"\"05-Mar-2026 10:00:00 +0000\"");
        assert_eq!(
            civil_from_days(crate::parse::days_from_civil(2024, 2, 29)),
            (2024, 2, 29)
        );
    }
}
