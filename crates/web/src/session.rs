//! Who is signed in, and the checks every request passes: the session cookie, the CSRF
//! token of every form, and the Host header.
//!
//! Why in memory: sessions are few (administrators), short-lived and worth losing at a
//! restart (everyone signs in again); nothing about them needs the database's write
//! turn, which belongs to mail.

use mailroom_watch::RankedMutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "mailroom_session";
/// The sign-in form's CSRF cookie (double submit: the form carries the same value).
pub const LOGIN_COOKIE: &str = "mailroom_login";
/// A session unused this long is gone.
pub const IDLE_MAX: Duration = Duration::from_secs(30 * 60);
/// A session is gone this long after sign-in, used or not.
pub const AGE_MAX: Duration = Duration::from_secs(12 * 3600);

/// One signed-in administrator.
#[derive(Debug, Clone)]
pub struct Session {
    /// The address they signed in with (their primary address).
    pub user: String,
    /// The token every form of this session carries.
    pub csrf: String,
    created: Instant,
    last_seen: Instant,
}

/// Every live session, by cookie value.
pub struct Sessions {
    map: RankedMutex<HashMap<String, Session>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            map: RankedMutex::new(
                mailroom_watch::rank::WEB_SESSIONS,
                "web sessions",
                HashMap::new(),
            ),
        }
    }
}

impl Sessions {
    /// Starts a session for `user`; returns its cookie value.
    pub fn create(&self, user: &str) -> String {
        let id = random_token();
        let now = Instant::now();
        let mut map = self.map.lock();
        // Bounded: expired sessions go whenever one is created.
        map.retain(|_, s| live(s, now));
        map.insert(
            id.clone(),
            Session {
                user: user.to_string(),
                csrf: random_token(),
                created: now,
                last_seen: now,
            },
        );
        id
    }

    /// The session with this cookie value, if it is live (and marks it used).
    pub fn get(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let mut map = self.map.lock();
        let session = map.get_mut(id)?;
        if !live(session, now) {
            map.remove(id);
            return None;
        }
        session.last_seen = now;
        Some(session.clone())
    }

    /// Ends a session (sign-out).
    pub fn remove(&self, id: &str) {
        self.map.lock().remove(id);
    }
}

fn live(s: &Session, now: Instant) -> bool {
    now.duration_since(s.last_seen) < IDLE_MAX && now.duration_since(s.created) < AGE_MAX
}

/// 32 random bytes as hex: session identifiers and CSRF tokens.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then_some(value)
    })
}

/// A `Set-Cookie` value: HttpOnly and SameSite=Strict always, Secure under TLS;
/// `max_age` 0 deletes it.
pub fn set_cookie(name: &str, value: &str, secure: bool, max_age: Option<u64>) -> String {
    let mut cookie = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if secure {
        cookie.push_str("; Secure");
    }
    if let Some(age) = max_age {
        cookie.push_str(&format!("; Max-Age={age}"));
    }
    cookie
}

/// A form field's value in an `application/x-www-form-urlencoded` body, decoded.
pub fn form_field(body: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(key) == name).then(|| decode(value))
    })
}

/// Percent-decoding with `+` as space (HTML forms).
pub fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(high), Some(low)) => {
                        out.push((high * 16 + low) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a `Host` header names this server: one of `allowed` (`name` matches any
/// port, `name:port` only that port), case-insensitive.
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let host = host.trim().to_ascii_lowercase();
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        _ => host.as_str(),
    };
    allowed.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        a == host || (!a.contains(':') && a == name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_cookies_and_hosts_are_read_as_browsers_send_them() {
        assert_eq!(
            form_field(b"a=1&csrf=ab%2Fc+d&b=", "csrf").as_deref(),
            Some("ab/c d")
        );
        assert_eq!(form_field(b"a=1", "csrf"), None);
        assert_eq!(decode("100%"), "100%");
        assert_eq!(
            cookie("x=1; mailroom_session=abc; y=2", SESSION_COOKIE),
            Some("abc")
        );
        let allowed = vec![
            "127.0.0.1:8025".to_string(),
            "admin.example.com".to_string(),
        ];
        assert!(host_allowed("127.0.0.1:8025", &allowed));
        assert!(host_allowed("ADMIN.example.com:443", &allowed));
        assert!(!host_allowed("127.0.0.1:9999", &allowed));
        assert!(!host_allowed("evil.example", &allowed));
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }

    #[test]
    fn sessions_end_at_sign_out() {
        let sessions = Sessions::default();
        let id = sessions.create("postmaster@example.test");
        let session = sessions.get(&id).unwrap();
        assert_eq!(session.user, "postmaster@example.test");
        assert_eq!(session.csrf.len(), 64);
        sessions.remove(&id);
        assert!(sessions.get(&id).is_none());
        assert!(sessions.get("made-up").is_none());
    }
}
