//! Logins for the mailbox protocols (IMAP, POP3): who a user name and password are, whether
//! that recipient may use the protocol, and a limit on failed attempts.
//!
//! Why here: both access protocols need the same answer from the same snapshot, and the
//! limiter must count failures across protocols (a guesser does not get twice the tries by
//! switching from POP3 to IMAP).

use crate::model::{Protocol, RecipientKind};
use crate::snapshot::Snapshot;
use mailroom_store::RecipientId;
use mailroom_watch::RankedMutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Where passwords (IMAP LOGIN and AUTHENTICATE PLAIN, POP3 USER/PASS and AUTH PLAIN,
/// SMTP AUTH on submission) are accepted on a connection that is not encrypted; over
/// TLS they always are. One policy for every protocol (`login.plaintext_auth` in the
/// config file, spelt `always`, `loopback` or `never`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plaintext {
    /// From every client.
    Always,
    /// Only from loopback clients, or over TLS.
    Loopback,
    /// Only over TLS (IMAP says LOGINDISABLED, POP3 hides USER, SMTP answers 538).
    Never,
}

impl Plaintext {
    /// Whether a client at `ip` may send a password, over TLS (`tls`) or not.
    pub fn allows(self, ip: IpAddr, tls: bool) -> bool {
        tls || match self {
            Plaintext::Always => true,
            Plaintext::Loopback => ip.is_loopback(),
            Plaintext::Never => false,
        }
    }
}

/// Why a login was refused. The text is what the client is told; it never says whether
/// the user exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// Unknown user, no password set, or a wrong password.
    #[error("invalid user name or password")]
    Invalid,
    /// The recipient may not use this protocol (directory protocol settings).
    #[error("{0} is disabled for this mailbox")]
    ProtocolDisabled(&'static str),
    /// Too many failures from this client or for this account; try again later.
    #[error("too many failed logins; try again in {0} s")]
    TooManyFailures(u64),
    /// Too many logins being checked right now; try again in a moment.
    #[error("the server is busy checking other logins; try again")]
    Busy,
}

/// Checks `user` (alias or any address) and `password` against one snapshot and the
/// protocol settings. Only mailboxes log in (contacts and lists have no store).
pub fn authenticate(
    snapshot: &Snapshot,
    user: &str,
    password: &str,
    protocol: Protocol,
) -> Result<RecipientId, LoginError> {
    let Some(recipient) = snapshot.find(user.trim()) else {
        // Spend the same time as a real check, so a missing user is not told apart by
        // how fast the answer comes.
        let _ = crate::verify_password(password, DUMMY_HASH);
        return Err(LoginError::Invalid);
    };
    let ok = recipient.kind == RecipientKind::Mailbox
        && recipient
            .password_hash
            .as_deref()
            .is_some_and(|hash| crate::verify_password(password, hash));
    if !ok {
        return Err(LoginError::Invalid);
    }
    if !snapshot.may_use(recipient.id, protocol) {
        return Err(LoginError::ProtocolDisabled(match protocol {
            Protocol::Imap => "IMAP",
            Protocol::Pop3 => "POP3",
            Protocol::SmtpSubmission => "SMTP submission",
        }));
    }
    Ok(recipient.id)
}

/// Checks credentials like [`authenticate`], with the password verification (Argon2id:
/// tens of milliseconds of CPU and 19 MiB of memory each) done by `verifier`'s threads.
pub async fn authenticate_async(
    snapshot: &Snapshot,
    user: &str,
    password: String,
    protocol: Protocol,
    verifier: &Verifier,
) -> Result<RecipientId, LoginError> {
    let id = check_password(snapshot, user, password, verifier).await?.id;
    if !snapshot.may_use(id, protocol) {
        return Err(LoginError::ProtocolDisabled(match protocol {
            Protocol::Imap => "IMAP",
            Protocol::Pop3 => "POP3",
            Protocol::SmtpSubmission => "SMTP submission",
        }));
    }
    Ok(id)
}

type Job = (String, String, tokio::sync::oneshot::Sender<bool>);

/// A small fixed set of threads that verify password hashes.
///
/// Why not the async runtime's blocking pool: Argon2id takes 19 MiB per verification,
/// and a burst of logins spread over hundreds of blocking threads left hundreds of MiB
/// in glibc's per-thread arenas (the IMAP benchmark showed 660 MiB resident after a login
/// load). A few dedicated threads bound both the memory and the CPU a login storm can
/// take; logins beyond the queue are refused as busy rather than piling up.
pub struct Verifier {
    jobs: crossbeam_channel::Sender<Job>,
}

impl Verifier {
    /// Starts `threads` verifier threads. They end when the `Verifier` is dropped.
    pub fn start(threads: usize) -> std::io::Result<Verifier> {
        let (jobs, queue) = crossbeam_channel::bounded::<Job>(1024);
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            // Detached at start, while it cannot be exiting (see docs/locking.md).
            std::thread::Builder::new()
                .name(format!("password-{i}"))
                .spawn(move || {
                    for (password, hash, reply) in queue {
                        let _ = reply.send(crate::verify_password(&password, &hash));
                    }
                })?;
        }
        Ok(Verifier { jobs })
    }

    /// Verifies `password` against the PHC string `hash`.
    pub async fn verify(&self, password: String, hash: String) -> Result<bool, LoginError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .try_send((password, hash, reply))
            .map_err(|_| LoginError::Busy)?;
        answer.await.map_err(|_| LoginError::Busy)
    }
}

/// The mailbox whose alias or address is `user`, when `password` is its password (the
/// web admin's sign-in; the protocols add their settings in [`authenticate_async`]).
/// Missing users cost the same time as wrong passwords.
pub async fn check_password(
    snapshot: &Snapshot,
    user: &str,
    password: String,
    verifier: &Verifier,
) -> Result<std::sync::Arc<crate::Recipient>, LoginError> {
    let found = snapshot
        .find(user.trim())
        .filter(|r| r.kind == RecipientKind::Mailbox)
        .and_then(|r| r.password_hash.clone().map(|hash| (r.clone(), hash)));
    let (recipient, hash) = match found {
        Some(found) => found,
        None => {
            // Same work as a real check: a missing user is not told apart by timing.
            verifier.verify(password, DUMMY_HASH.to_string()).await?;
            return Err(LoginError::Invalid);
        }
    };
    if !verifier.verify(password, hash).await? {
        return Err(LoginError::Invalid);
    }
    Ok(recipient)
}

/// An Argon2id hash of a random password nobody knows, for timing parity.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$R3kXdc6gc9sI3lQ7o8O9i0xGrVbZ4M1v0KQm4cV8A2w";

/// Failed-login limits: per client address and per account, within a sliding window.
#[derive(Debug, Clone, Copy)]
pub struct LoginLimits {
    /// Failures from one client address before it is refused for the rest of the window.
    pub per_client: u32,
    /// Failures for one account (from anywhere) before it is refused for the window.
    pub per_account: u32,
    /// The window.
    pub window: Duration,
}

impl Default for LoginLimits {
    fn default() -> Self {
        LoginLimits {
            per_client: 10,
            per_account: 5,
            window: Duration::from_secs(300),
        }
    }
}

/// How long a login waits for other attempts on the same account or from the same
/// client to finish before it is answered "busy".
pub const LOGIN_QUEUE_WAIT: Duration = Duration::from_secs(30);

/// Failures and attempts in flight for one key ("ip:..." or "user:...").
#[derive(Debug, Clone, Copy)]
struct Tally {
    /// Failed attempts in the window that started at `since`.
    failures: u32,
    since: Instant,
    /// Attempts started and not finished (their passwords are being checked).
    in_flight: u32,
}

/// Counts failed logins. One per server, shared by the IMAP and POP3 listeners.
///
/// The rule: the passwords checked for one account (or from one client) in a window
/// that turn out wrong are at most the limit, however many attempts arrive at once;
/// and right passwords are never refused because others are in flight. So an attempt
/// may start while `failures + in_flight` is under the limit (every attempt in flight
/// could still fail); past that it waits for one to finish. 40 concurrent wrong
/// passwords: 5 are checked, fail, and the other 35 are refused. 20 concurrent right
/// ones (Thunderbird opens several connections at once; so does a benchmark): 5 are
/// checked at a time, each success gives its place back, all 20 get in.
pub struct LoginLimiter {
    limits: LoginLimits,
    /// Tallies by key. Rank 85 (leaf): held for a map lookup, never across I/O, an
    /// await or a password check.
    tallies: RankedMutex<HashMap<String, Tally>>,
    /// Rung when an attempt finishes (its place is free, or it failed).
    finished: tokio::sync::Notify,
}

/// What [`LoginLimiter::begin`] found for one attempt.
enum Admission {
    Start,
    Refuse(u64),
    Wait,
}

impl LoginLimiter {
    /// A limiter with these limits.
    pub fn new(limits: LoginLimits) -> LoginLimiter {
        LoginLimiter {
            limits,
            tallies: RankedMutex::new(
                mailroom_watch::rank::LOGIN_FAILURES,
                "login failures",
                HashMap::new(),
            ),
            finished: tokio::sync::Notify::new(),
        }
    }

    fn keys(client: IpAddr, user: &str) -> [(String, u32); 2] {
        [
            (format!("ip:{client}"), 0),
            (format!("user:{}", user.trim().to_lowercase()), 1),
        ]
    }

    fn limit(&self, kind: u32) -> u32 {
        if kind == 0 {
            self.limits.per_client
        } else {
            self.limits.per_account
        }
    }

    /// Decides, and when the attempt may start, counts it in flight, in one critical
    /// section.
    fn admit(&self, keys: &[(String, u32); 2]) -> Admission {
        let now = Instant::now();
        let window = self.limits.window;
        let mut tallies = self.tallies.lock();
        if tallies.len() > 100_000 {
            // Bounded memory under a spray of user names: forget expired windows.
            tallies.retain(|_, t| t.in_flight > 0 || now.duration_since(t.since) < window);
        }
        let mut wait = false;
        for (key, kind) in keys {
            let limit = self.limit(*kind);
            if let Some(t) = tallies.get_mut(key) {
                if now.duration_since(t.since) >= window {
                    t.failures = 0;
                    t.since = now;
                }
                if t.failures >= limit {
                    let left = window.saturating_sub(now.duration_since(t.since));
                    return Admission::Refuse(left.as_secs().max(1));
                }
                if t.failures + t.in_flight >= limit {
                    wait = true;
                }
            }
        }
        if wait {
            return Admission::Wait;
        }
        for (key, _) in keys {
            tallies
                .entry(key.clone())
                .or_insert(Tally {
                    failures: 0,
                    since: now,
                    in_flight: 0,
                })
                .in_flight += 1;
        }
        Admission::Start
    }

    /// Starts a login attempt (see the type's documentation): refused at once when the
    /// client or the account has used up its failures in the current window; waits
    /// while the attempts in flight could use them up; `Busy` after
    /// [`LOGIN_QUEUE_WAIT`]. The attempt ends with [`LoginAttempt::succeeded`],
    /// [`LoginAttempt::void`] or [`LoginAttempt::failed`]; dropped, it is a failure.
    pub async fn begin(&self, client: IpAddr, user: &str) -> Result<LoginAttempt<'_>, LoginError> {
        let keys = Self::keys(client, user);
        let deadline = tokio::time::Instant::now() + LOGIN_QUEUE_WAIT;
        loop {
            // Registered before the check, so a finish between the check and the wait
            // is not missed.
            let finished = self.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            match self.admit(&keys) {
                Admission::Start => {
                    return Ok(LoginAttempt {
                        limiter: self,
                        keys,
                        outcome: None,
                    });
                }
                Admission::Refuse(wait) => return Err(LoginError::TooManyFailures(wait)),
                Admission::Wait => {
                    if tokio::time::timeout_at(deadline, finished).await.is_err() {
                        return Err(LoginError::Busy);
                    }
                }
            }
        }
    }

    fn finish(&self, keys: &[(String, u32); 2], outcome: Outcome) {
        {
            let now = Instant::now();
            let mut tallies = self.tallies.lock();
            for (key, kind) in keys {
                let Some(t) = tallies.get_mut(key) else {
                    continue;
                };
                t.in_flight = t.in_flight.saturating_sub(1);
                match outcome {
                    Outcome::Failed => {
                        if now.duration_since(t.since) >= self.limits.window {
                            t.failures = 0;
                            t.since = now;
                        }
                        t.failures += 1;
                    }
                    // A success clears the account's count, not the client's.
                    Outcome::Succeeded if *kind == 1 => t.failures = 0,
                    Outcome::Succeeded | Outcome::Void => {}
                }
                if t.failures == 0 && t.in_flight == 0 {
                    tallies.remove(key);
                }
            }
        }
        self.finished.notify_waiters();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Void,
    Failed,
}

/// A login attempt in flight (see [`LoginLimiter::begin`]); it must end with an
/// outcome, and dropped without one it counts as a failure.
#[must_use = "an attempt dropped without an outcome counts as a failure"]
pub struct LoginAttempt<'a> {
    limiter: &'a LoginLimiter,
    keys: [(String, u32); 2],
    outcome: Option<Outcome>,
}

impl LoginAttempt<'_> {
    /// The password was right: not a failure, and the account's count is cleared.
    pub fn succeeded(mut self) {
        self.outcome = Some(Outcome::Succeeded);
    }

    /// No judgement was made (the server was busy, the protocol is disabled): the
    /// attempt is not counted at all.
    pub fn void(mut self) {
        self.outcome = Some(Outcome::Void);
    }

    /// The password was wrong: one more failure.
    pub fn failed(mut self) {
        self.outcome = Some(Outcome::Failed);
    }
}

impl Drop for LoginAttempt<'_> {
    fn drop(&mut self) {
        self.limiter
            .finish(&self.keys, self.outcome.unwrap_or(Outcome::Failed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_are_limited_per_account_and_per_client() {
        let limiter = LoginLimiter::new(LoginLimits {
            per_client: 4,
            per_account: 2,
            window: Duration::from_secs(60),
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        limiter.begin(a, "alice").await.unwrap().failed();
        limiter.begin(a, "alice").await.unwrap().succeeded();
        limiter.begin(a, "alice").await.unwrap().failed();
        limiter.begin(b, "Alice").await.unwrap().failed();
        // Two failures for the account, from two clients: the account is locked for all.
        assert!(matches!(
            limiter.begin(b, "alice").await,
            Err(LoginError::TooManyFailures(_))
        ));
        limiter.begin(a, "bob").await.unwrap().failed();
        // A void attempt (server busy) counts for nobody.
        limiter.begin(a, "dave").await.unwrap().void();
        limiter.begin(a, "carol").await.unwrap().failed();
        // Four failures from client a: a is refused whatever the account.
        assert!(limiter.begin(a, "erin").await.is_err());
        assert!(limiter.begin(b, "erin").await.is_ok());
    }

    /// 40 concurrent wrong passwords for one account: only the limit's worth are
    /// checked, whatever the interleaving (counting after the check let all 40 in).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_wrong_passwords_are_checked_at_most_the_limit() {
        let limiter = std::sync::Arc::new(LoginLimiter::new(LoginLimits {
            per_client: 10,
            per_account: 5,
            window: Duration::from_secs(60),
        }));
        let checked = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let (limiter, checked) = (limiter.clone(), checked.clone());
                tokio::spawn(async move {
                    let client: IpAddr = format!("192.0.2.{}", i % 40 + 1).parse().unwrap();
                    if let Ok(attempt) = limiter.begin(client, "alice").await {
                        checked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        attempt.failed();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(checked.load(std::sync::atomic::Ordering::SeqCst), 5);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(limiter.begin(a, "alice").await.is_err());
    }

    /// Found by bench/imap: 20 clients logging in to one account at once were refused
    /// "too many failed logins" when attempts in flight counted as failures. Right
    /// passwords now wait their turn instead, and all get in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_right_passwords_all_get_in() {
        let limiter = std::sync::Arc::new(LoginLimiter::new(LoginLimits {
            per_client: 10,
            per_account: 5,
            window: Duration::from_secs(60),
        }));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    let client: IpAddr = "127.0.0.1".parse().unwrap();
                    let attempt = limiter.begin(client, "alice").await?;
                    tokio::task::yield_now().await;
                    attempt.succeeded();
                    Ok::<(), LoginError>(())
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().expect("a right password is never refused");
        }
        assert!(limiter.tallies.lock().is_empty(), "nothing left counted");
    }

    #[tokio::test]
    async fn the_verifier_checks_hashes_on_its_threads() {
        let verifier = Verifier::start(2).unwrap();
        let hash = crate::hash_password("right");
        assert!(verifier.verify("right".into(), hash.clone()).await.unwrap());
        assert!(!verifier.verify("wrong".into(), hash).await.unwrap());
        assert!(
            !verifier
                .verify("x".into(), "not a hash".into())
                .await
                .unwrap()
        );
    }

    #[test]
    fn the_dummy_hash_parses() {
        assert!(argon2::password_hash::PasswordHash::new(DUMMY_HASH).is_ok());
    }
}
