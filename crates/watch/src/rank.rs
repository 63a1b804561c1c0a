//! Every lock's rank, named, in one place: a thread may take a ranked lock only when
//! it holds none of a higher or equal rank (debug builds check it; docs/locking.md has
//! the table with each lock's owner, holders and hold time). A new lock gets a rank
//! here first, so two crates cannot pick the same number for locks that nest.

/// The web admin's signed-in sessions (`web::Sessions`): a map lookup, taken alone.
pub const WEB_SESSIONS: u32 = 79;
/// Finished directory job threads (`directory::jobs`).
pub const DIRECTORY_JOB_THREADS: u32 = 80;
/// The DKIM keys loaded for signing and sealing (`dkim::Signer`).
pub const DKIM_KEYS: u32 = 81;
/// ACME HTTP-01 tokens being proved (`tls::acme::Challenges`).
pub const ACME_CHALLENGES: u32 = 82;
/// Submission messages per user and client address this hour (`smtp::SubmissionRates`).
pub const SUBMISSION_RATES: u32 = 83;
/// Open connections per client address (`listen::ClientCounts`).
pub const LISTENER_CLIENT_COUNTS: u32 = 84;
/// Failed logins per client and account (`directory::login::LoginLimiter`).
pub const LOGIN_FAILURES: u32 = 85;
/// POP3 maildrops in use (`pop3::server::MaildropLocks`).
pub const POP3_MAILDROPS: u32 = 86;
/// Outbound per-destination connection limits.
pub const OUTBOUND_LIMITS: u32 = 87;
/// Idle outbound connections.
pub const OUTBOUND_POOL: u32 = 88;
/// Cached MTA-STS policies.
pub const MTA_STS_CACHE: u32 = 89;
/// The store's idle connections.
pub const STORE_CONNECTIONS: u32 = 90;
/// Cached DNS answers of the inbound checks (`smtp::checks`), one lock per record type.
pub const INBOUND_DNS_CACHE: u32 = 91;
/// Mailbox change bells.
pub const MAILBOX_BELLS: u32 = 92;
/// The directory database's write turn (a fair ticket lock); never held together with
/// the mail database's.
pub const DIRECTORY_STORE_WRITE_TURN: u32 = 94;
/// The mail database's write turn (a fair ticket lock).
pub const STORE_WRITE_TURN: u32 = 95;
/// IMAP APPENDs waiting for the write turn (taken inside it).
pub const PENDING_APPENDS: u32 = 96;
/// A store database's writer connection, taken and returned inside its write turn.
pub const STORE_WRITER_CONNECTION: u32 = 96;
/// Watched sessions (`watch::Tasks`).
pub const WATCHED_TASKS: u32 = 96;
/// One APPEND's outcome.
pub const APPEND_OUTCOME: u32 = 97;
/// The latest reading of what the mail database owes its file (`store::Disk`); taken
/// alone or inside the mail database's write turn and writer connection, for one copy.
pub const DISK_OWED: u32 = 97;
/// Runtime heartbeats (`watch::Tasks`).
pub const RUNTIME_HEARTBEATS: u32 = 97;
/// A session's current command label.
pub const SESSION_DOING: u32 = 98;
/// Blocked tasks the watchdog has logged.
pub const WATCHDOG_REPORTED: u32 = 99;
/// The last warnings and errors logged, for the web admin (`web::recent::RecentLog`).
/// Ranked above every other lock: a warning may be logged while any lock is held, and
/// the tracing layer takes this one innermost, for one push.
pub const RECENT_LOG: u32 = 100;
