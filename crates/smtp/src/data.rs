//! Reading a message after DATA, and a BDAT chunk, from the session's input buffer.
//!
//! Why our own and not `smtp-proto`'s receivers: its DATA receiver also ends a message
//! at `<CRLF>.<CR><CR><LF>` (any run of CRs before the LF), which is exactly the
//! disagreement between servers that SMTP smuggling exploits: the rest of the message
//! would be read as new commands. RFC 5321 4.1.1.4 ends DATA at `<CRLF>.<CRLF>` and
//! nothing else, and docs/smtp.md promises that; this receiver makes it true whatever
//! the crate does. A line that starts with a dot and is not the end loses that dot
//! (RFC 5321 4.5.2); every other byte, bare CRs and LFs included, is kept so the
//! session can refuse the message as a whole.
//!
//! Both receivers consume only what they can judge: a possible end marker split across
//! reads stays in the input until the rest arrives, so the work per byte is constant and
//! the memory is the input buffer plus the message (itself bounded by the caller).

/// The state of a DATA transfer between reads.
#[derive(Debug, Clone)]
pub struct DataReceiver {
    /// The previous byte ended a line (CRLF), or the transfer has just begun.
    line_start: bool,
    /// The last byte taken was a CR (so an LF right after it ends a line).
    after_cr: bool,
}

impl Default for DataReceiver {
    fn default() -> Self {
        DataReceiver::new()
    }
}

/// What [`DataReceiver::ingest`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ingested {
    /// Bytes of the input consumed (the end marker included when `done`).
    pub consumed: usize,
    /// The `<CRLF>.<CRLF>` end marker was read.
    pub done: bool,
}

impl DataReceiver {
    /// A transfer that has just begun (the DATA command's CRLF counts as a line end).
    pub fn new() -> DataReceiver {
        DataReceiver {
            line_start: true,
            after_cr: false,
        }
    }

    /// Takes message bytes from `input`, appending them (unstuffed) to `sink` unless it
    /// is `None` (a message being discarded). Stops at the end marker.
    pub fn ingest(&mut self, input: &[u8], mut sink: Option<&mut Vec<u8>>) -> Ingested {
        let mut at = 0;
        loop {
            if self.line_start {
                match input.get(at..) {
                    Some([]) | None => {
                        return Ingested {
                            consumed: at,
                            done: false,
                        };
                    }
                    Some([b'.', b'\r', b'\n', ..]) => {
                        return Ingested {
                            consumed: at + 3,
                            done: true,
                        };
                    }
                    // Not yet known whether this is the end: wait for more.
                    Some([b'.']) | Some([b'.', b'\r']) => {
                        return Ingested {
                            consumed: at,
                            done: false,
                        };
                    }
                    // A stuffed dot: drop it, keep the rest of the line as it is.
                    Some([b'.', ..]) => at += 1,
                    Some(_) => {}
                }
                self.line_start = false;
            }
            let rest = &input[at..];
            // The line's end: the next LF. Everything up to it is content.
            match memchr::memchr(b'\n', rest) {
                None => {
                    if let Some(sink) = sink.as_deref_mut() {
                        sink.extend_from_slice(rest);
                    }
                    if let Some(&last) = rest.last() {
                        self.after_cr = last == b'\r';
                    }
                    return Ingested {
                        consumed: input.len(),
                        done: false,
                    };
                }
                Some(lf) => {
                    let line = &rest[..=lf];
                    if let Some(sink) = sink.as_deref_mut() {
                        sink.extend_from_slice(line);
                    }
                    let cr_before = if lf == 0 {
                        self.after_cr
                    } else {
                        rest[lf - 1] == b'\r'
                    };
                    // Only CRLF starts a new line; a bare LF does not (so "\n.\r\n" is
                    // content, never the end).
                    self.line_start = cr_before;
                    self.after_cr = false;
                    at += lf + 1;
                }
            }
        }
    }
}

/// The bytes of one BDAT chunk still to read.
#[derive(Debug, Clone, Copy)]
pub struct BdatReceiver {
    left: usize,
}

impl BdatReceiver {
    /// A chunk of `size` bytes.
    pub fn new(size: usize) -> BdatReceiver {
        BdatReceiver { left: size }
    }

    /// Takes chunk bytes from `input` into `sink` (or drops them); returns the bytes
    /// consumed and whether the chunk is complete.
    pub fn ingest(&mut self, input: &[u8], sink: Option<&mut Vec<u8>>) -> Ingested {
        let take = input.len().min(self.left);
        if let Some(sink) = sink {
            sink.extend_from_slice(&input[..take]);
        }
        self.left -= take;
        Ingested {
            consumed: take,
            done: self.left == 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes, as reads would deliver it, keeping
    /// what was not consumed; returns the message and what followed the end marker.
    fn feed(input: &[u8], step: usize) -> (Vec<u8>, Vec<u8>, bool) {
        let mut receiver = DataReceiver::new();
        let mut buffer = Vec::new();
        let mut message = Vec::new();
        let mut rest = input;
        loop {
            let take = step.min(rest.len());
            buffer.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            let got = receiver.ingest(&buffer, Some(&mut message));
            buffer.drain(..got.consumed);
            if got.done {
                buffer.extend_from_slice(rest);
                return (message, buffer, true);
            }
            if rest.is_empty() {
                return (message, buffer, false);
            }
        }
    }

    #[test]
    fn only_crlf_dot_crlf_ends_the_message_whatever_the_read_sizes() {
        let cases: &[(&[u8], &[u8], &[u8])] = &[
            (b".\r\nNEXT", b"", b"NEXT"),
            (b"a\r\n.\r\nNEXT", b"a\r\n", b"NEXT"),
            (b"a\r\n..b\r\n.\r\n", b"a\r\n.b\r\n", b""),
            // The smuggling forms: none of them ends the message.
            (b"a\r\n.\r\r\nQUIT\r\n.\r\n", b"a\r\n\r\r\nQUIT\r\n", b""),
            (b"a\n.\nMAIL\r\n.\r\n", b"a\n.\nMAIL\r\n", b""),
            (b"a\n.\r\nMAIL\r\n.\r\n", b"a\n.\r\nMAIL\r\n", b""),
            (b"a\r\n.\nMAIL\r\n.\r\n", b"a\r\n\nMAIL\r\n", b""),
            (b"a\r.\r\nMAIL\r\n.\r\n", b"a\r.\r\nMAIL\r\n", b""),
            (b"\r\n\r\n.\r\n", b"\r\n\r\n", b""),
        ];
        for (input, message, after) in cases {
            for step in [1, 2, 3, 5, 64] {
                let (got, rest, done) = feed(input, step);
                assert!(done, "{input:?} step {step}");
                assert_eq!(&got, message, "{input:?} step {step}");
                assert_eq!(&rest, after, "{input:?} step {step}");
            }
        }
    }

    #[test]
    fn an_unfinished_end_marker_waits_for_more() {
        let mut receiver = DataReceiver::new();
        let mut message = Vec::new();
        let got = receiver.ingest(b"a\r\n.\r", Some(&mut message));
        assert_eq!(
            got,
            Ingested {
                consumed: 3,
                done: false
            }
        );
        assert_eq!(message, b"a\r\n");
        let got = receiver.ingest(b".\r\n", Some(&mut message));
        assert_eq!(
            got,
            Ingested {
                consumed: 3,
                done: true
            }
        );
    }

    #[test]
    fn bdat_takes_exactly_its_size() {
        let mut receiver = BdatReceiver::new(5);
        let mut chunk = Vec::new();
        assert_eq!(
            receiver.ingest(b"abc", Some(&mut chunk)),
            Ingested {
                consumed: 3,
                done: false
            }
        );
        assert_eq!(
            receiver.ingest(b"deQUIT", Some(&mut chunk)),
            Ingested {
                consumed: 2,
                done: true
            }
        );
        assert_eq!(chunk, b"abcde");
    }
}
