//! The stress client's wire layer: one response read whole (literals included, by their
//! announced length) and a small tokenizer for the parts of it the model checks.
//!
//! Written here rather than taken from `async-imap`/`imap-proto` because the checker must
//! see every untagged response in the order the server sent it, including ones a
//! high-level client folds away (unsolicited FETCH, FLAGS, EXPUNGE inside a UID command),
//! and must keep the raw lines for the transcript of an error.

use anyhow::{bail, ensure};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// One token of a response: atoms (brackets kept inside, as in `BODY[HEADER]`), strings
/// (quoted or literal), parenthesised lists and NIL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tok {
    /// An atom or number.
    Atom(String),
    /// A quoted string or a literal.
    Str(Vec<u8>),
    /// A parenthesised list.
    List(Vec<Tok>),
    /// NIL.
    Nil,
}

impl Tok {
    /// The atom's text, upper-cased; None for other tokens.
    pub fn atom_upper(&self) -> Option<String> {
        match self {
            Tok::Atom(a) => Some(a.to_ascii_uppercase()),
            _ => None,
        }
    }

    /// The atom as a number.
    pub fn number(&self) -> Option<u64> {
        match self {
            Tok::Atom(a) => a.parse().ok(),
            _ => None,
        }
    }

    /// The bytes of a string (NIL: empty).
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Tok::Str(b) => Some(b),
            Tok::Nil => Some(b""),
            _ => None,
        }
    }
}

/// Reads one response: a line, and when it ends with a literal's `{n}`, the n bytes and
/// the rest of the response after them, repeatedly. The CRLF at the end is kept off.
pub async fn read_response<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
) -> anyhow::Result<Vec<u8>> {
    let mut all = Vec::new();
    loop {
        let start = all.len();
        let n = reader.read_until(b'\n', &mut all).await?;
        ensure!(n > 0, "the server closed the connection");
        ensure!(all.len() < 64 << 20, "response over 64 MiB");
        let line = &all[start..];
        let trimmed = line.strip_suffix(b"\r\n").unwrap_or(line);
        match literal_size(trimmed) {
            Some(size) => {
                let at = all.len();
                all.resize(at + size, 0);
                reader.read_exact(&mut all[at..]).await?;
            }
            None => {
                let keep = all.len() - (line.len() - trimmed.len());
                all.truncate(keep);
                return Ok(all);
            }
        }
    }
}

/// The size announced by a `{n}` or `{n+}` at the end of a line.
fn literal_size(line: &[u8]) -> Option<usize> {
    let body = line.strip_suffix(b"}")?;
    let open = body.iter().rposition(|b| *b == b'{')?;
    let digits = &body[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Tokenizes `bytes` (a response without its tag, or a part of it).
pub fn tokens(bytes: &[u8]) -> anyhow::Result<Vec<Tok>> {
    let mut at = 0;
    let list = parse_list(bytes, &mut at, false)?;
    Ok(list)
}

fn parse_list(b: &[u8], at: &mut usize, nested: bool) -> anyhow::Result<Vec<Tok>> {
    let mut out = Vec::new();
    loop {
        while *at < b.len() && b[*at] == b' ' {
            *at += 1;
        }
        if *at >= b.len() {
            ensure!(!nested, "unclosed list");
            return Ok(out);
        }
        match b[*at] {
            b')' => {
                ensure!(nested, "unexpected ')'");
                *at += 1;
                return Ok(out);
            }
            b'(' => {
                *at += 1;
                out.push(Tok::List(parse_list(b, at, true)?));
            }
            b'"' => {
                *at += 1;
                let mut s = Vec::new();
                loop {
                    ensure!(*at < b.len(), "unterminated quoted string");
                    match b[*at] {
                        b'"' => {
                            *at += 1;
                            break;
                        }
                        b'\\' if *at + 1 < b.len() => {
                            s.push(b[*at + 1]);
                            *at += 2;
                        }
                        c => {
                            s.push(c);
                            *at += 1;
                        }
                    }
                }
                out.push(Tok::Str(s));
            }
            b'{' => {
                let close = b[*at..]
                    .iter()
                    .position(|c| *c == b'}')
                    .map(|p| p + *at)
                    .ok_or_else(|| anyhow::anyhow!("unclosed literal size"))?;
                let size = literal_size(&b[*at..=close])
                    .ok_or_else(|| anyhow::anyhow!("bad literal size"))?;
                let start = close + 1 + 2;
                ensure!(
                    b.get(close + 1..start) == Some(b"\r\n"),
                    "no CRLF after literal size"
                );
                ensure!(start + size <= b.len(), "literal runs past the response");
                out.push(Tok::Str(b[start..start + size].to_vec()));
                *at = start + size;
            }
            _ => {
                let start = *at;
                let mut depth = 0usize;
                while *at < b.len() {
                    let c = b[*at];
                    match c {
                        b'[' => depth += 1,
                        b']' => depth = depth.saturating_sub(1),
                        b' ' | b'(' | b')' if depth == 0 => break,
                        b'\r' | b'\n' => bail!("line break inside an atom"),
                        _ => {}
                    }
                    *at += 1;
                }
                let atom = String::from_utf8_lossy(&b[start..*at]).into_owned();
                // BODY[]<0> and friends: the origin octet is part of the item name.
                out.push(if atom.eq_ignore_ascii_case("NIL") {
                    Tok::Nil
                } else {
                    Tok::Atom(atom)
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_with_literal_and_sections() {
        let t = tokens(b"* 3 FETCH (UID 7 FLAGS (\\Seen $Work) BODY[] {5}\r\nhello ENVELOPE (NIL \"a \\\"b\\\"\" NIL))").unwrap();
        assert_eq!(t[0], Tok::Atom("*".into()));
        assert_eq!(t[2].atom_upper().as_deref(), Some("FETCH"));
        let Tok::List(items) = &t[3] else { panic!() };
        assert_eq!(items[4], Tok::Atom("BODY[]".into()));
        assert_eq!(items[5], Tok::Str(b"hello".to_vec()));
        let Tok::List(env) = &items[7] else { panic!() };
        assert_eq!(env[1], Tok::Str(b"a \"b\"".to_vec()));
    }

    #[test]
    fn literal_sizes() {
        assert_eq!(literal_size(b"* 1 FETCH (BODY[] {12}"), Some(12));
        assert_eq!(literal_size(b"a APPEND x {3+}"), Some(3));
        assert_eq!(literal_size(b"* OK {no}"), None);
    }
}
