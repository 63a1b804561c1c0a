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
    let found = snapshot
        .find(user.trim())
        .filter(|r| r.kind == RecipientKind::Mailbox)
        .and_then(|r| r.password_hash.clone().map(|hash| (r.id, hash)));
    let (id, hash) = match found {
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

/// Counts failed logins. One per server, shared by the IMAP and POP3 listeners.
pub struct LoginLimiter {
    limits: LoginLimits,
    /// Failures by key ("ip:..." or "user:..."): (count, window start). Rank 85 (leaf):
    /// held for one map lookup, never across I/O or a password check.
    failures: RankedMutex<HashMap<String, (u32, Instant)>>,
}

impl LoginLimiter {
    /// A limiter with these limits.
    pub fn new(limits: LoginLimits) -> LoginLimiter {
        LoginLimiter {
            limits,
            failures: RankedMutex::new(85, "login failures", HashMap::new()),
        }
    }

    fn keys(client: IpAddr, user: &str) -> [(String, u32); 2] {
        [
            (format!("ip:{client}"), 0),
            (format!("user:{}", user.trim().to_lowercase()), 1),
        ]
    }

    /// Starts a login attempt: refuses at once when the client or the account has used
    /// up its failures in the current window, and otherwise counts this attempt as a
    /// failure *now*, in the same critical section as the check. Checking first and
    /// recording after the password check let 40 concurrent wrong passwords all be
    /// checked; counted up front, the limit holds however many arrive at once. The
    /// attempt is taken back by [`LoginAttempt::succeeded`] or [`LoginAttempt::void`];
    /// dropped, it stays a failure.
    pub fn begin(&self, client: IpAddr, user: &str) -> Result<LoginAttempt<'_>, LoginError> {
        let now = Instant::now();
        let mut failures = self.failures.lock();
        if failures.len() > 100_000 {
            // Bounded memory under a spray of user names: forget expired windows.
            let window = self.limits.window;
            failures.retain(|_, (_, since)| now.duration_since(*since) < window);
        }
        let keys = Self::keys(client, user);
        for (key, kind) in &keys {
            let limit = if *kind == 0 {
                self.limits.per_client
            } else {
                self.limits.per_account
            };
            if let Some(&(count, since)) = failures.get(key) {
                let age = now.duration_since(since);
                if age < self.limits.window && count >= limit {
                    let wait = (self.limits.window - age).as_secs().max(1);
                    return Err(LoginError::TooManyFailures(wait));
                }
            }
        }
        for (key, _) in &keys {
            let entry = failures.entry(key.clone()).or_insert((0, now));
            if now.duration_since(entry.1) >= self.limits.window {
                *entry = (0, now);
            }
            entry.0 += 1;
        }
        Ok(LoginAttempt {
            limiter: self,
            keys,
        })
    }

    fn take_back(&self, keys: &[(String, u32); 2], clear_account: bool) {
        let mut failures = self.failures.lock();
        for (key, kind) in keys {
            if *kind == 1 && clear_account {
                // A success clears the account's count, not the client's.
                failures.remove(key);
                continue;
            }
            if let Some(entry) = failures.get_mut(key) {
                entry.0 = entry.0.saturating_sub(1);
                if entry.0 == 0 {
                    failures.remove(key);
                }
            }
        }
    }
}

/// A login attempt counted as a failure until its outcome says otherwise (see
/// [`LoginLimiter::begin`]).
#[must_use = "an attempt dropped without an outcome counts as a failure"]
pub struct LoginAttempt<'a> {
    limiter: &'a LoginLimiter,
    keys: [(String, u32); 2],
}

impl LoginAttempt<'_> {
    /// The password was right: the attempt is not a failure, and the account's count
    /// is cleared.
    pub fn succeeded(self) {
        self.limiter.take_back(&self.keys, true);
    }

    /// No judgement was made (the server was busy, the protocol is disabled): the
    /// attempt is not counted at all.
    pub fn void(self) {
        self.limiter.take_back(&self.keys, false);
    }

    /// The password was wrong: the attempt stays counted (the same as dropping it).
    pub fn failed(self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_limited_per_account_and_per_client() {
        let limiter = LoginLimiter::new(LoginLimits {
            per_client: 4,
            per_account: 2,
            window: Duration::from_secs(60),
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        limiter.begin(a, "alice").unwrap().failed();
        limiter.begin(a, "alice").unwrap().succeeded();
        limiter.begin(a, "alice").unwrap().failed();
        limiter.begin(b, "Alice").unwrap().failed();
        // Two failures for the account, from two clients: the account is locked for all.
        assert!(matches!(
            limiter.begin(b, "alice"),
            Err(LoginError::TooManyFailures(_))
        ));
        limiter.begin(a, "bob").unwrap().failed();
        // A void attempt (server busy) counts for nobody.
        limiter.begin(a, "dave").unwrap().void();
        limiter.begin(a, "carol").unwrap().failed();
        // Four failures from client a: a is refused whatever the account.
        assert!(limiter.begin(a, "erin").is_err());
        assert!(limiter.begin(b, "erin").is_ok());
    }

    #[test]
    fn concurrent_attempts_are_counted_before_their_passwords_are_checked() {
        let limiter = LoginLimiter::new(LoginLimits {
            per_client: 10,
            per_account: 5,
            window: Duration::from_secs(60),
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        // 40 attempts in flight at once (none has an outcome yet): only 5 get through.
        let attempts: Vec<_> = (0..40)
            .filter_map(|_| limiter.begin(a, "alice").ok())
            .collect();
        assert_eq!(attempts.len(), 5);
        drop(attempts);
        assert!(limiter.begin(a, "alice").is_err());
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
