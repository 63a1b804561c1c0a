//! The configuration file: one TOML file, every setting with a default.
//!
//! Unknown keys are errors that name the key and the line (serde's
//! `deny_unknown_fields` with the `toml` crate's spans); values out of range are errors
//! that name the key and say what is allowed. `mailroom config example` prints
//! [`EXAMPLE`], which a test keeps equal to the defaults.

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Identity, data folder, shutdown.
    pub server: ServerSection,
    /// The SMTP listener and its limits.
    pub smtp: SmtpSection,
    /// The durable spool.
    pub spool: SpoolSection,
    /// The database: durability and the disk's free-space reserve.
    pub storage: StorageSection,
    /// Message tracking: how long each message's trail is kept.
    pub tracking: TrackingSection,
    /// Inbound conversion.
    pub conversion: ConversionSection,
    /// The admin HTTP API.
    pub admin: AdminSection,
    /// Directory settings.
    pub directory: DirectorySection,
    /// The stall watchdog and the deadlock detector.
    pub watchdog: WatchdogSection,
    /// The POP3 listener.
    pub pop3: Pop3Section,
    /// The IMAP listener.
    pub imap: ImapSection,
    /// Logins to the mailbox protocols (POP3, IMAP).
    pub login: LoginSection,
    /// Outbound delivery.
    pub outbound: OutboundSection,
    /// Certificates for every TLS listener and STARTTLS.
    pub tls: TlsSection,
    /// SPF, DKIM, DMARC, ARC and iprev on mail from the Internet.
    pub inbound_checks: InboundChecksSection,
}

/// What a failed DMARC check does (`inbound_checks.dmarc` and its overrides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DmarcSetting {
    /// Follow the author domain's published policy.
    Published,
    /// Only record the result.
    None,
    /// Deliver into the Junk folder.
    Quarantine,
    /// Refuse with 550 5.7.1.
    Reject,
}

impl From<DmarcSetting> for mailroom_smtp::checks::DmarcAction {
    fn from(setting: DmarcSetting) -> Self {
        use mailroom_smtp::checks::DmarcAction;
        match setting {
            DmarcSetting::Published => DmarcAction::Published,
            DmarcSetting::None => DmarcAction::None,
            DmarcSetting::Quarantine => DmarcAction::Quarantine,
            DmarcSetting::Reject => DmarcAction::Reject,
        }
    }
}

/// `[inbound_checks]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboundChecksSection {
    /// Check mail from the Internet and add Authentication-Results.
    pub enabled: bool,
    /// Clients whose mail is not checked (loopback by default).
    pub trusted_networks: Vec<ipnet::IpNet>,
    /// What a failed DMARC check does.
    pub dmarc: DmarcSetting,
    /// Per author domain, what a failed DMARC check does.
    pub dmarc_overrides: std::collections::BTreeMap<String, DmarcSetting>,
    /// Refuse mail claiming a local domain that SPF and DKIM do not prove.
    pub reject_local_spoofing: bool,
    /// Seconds all DNS lookups for one message may take.
    pub timeout_secs: u64,
}

impl Default for InboundChecksSection {
    fn default() -> Self {
        let policy = mailroom_smtp::checks::CheckPolicy::default();
        InboundChecksSection {
            enabled: true,
            trusted_networks: policy.trusted_networks,
            dmarc: DmarcSetting::Published,
            dmarc_overrides: Default::default(),
            reject_local_spoofing: policy.reject_local_spoofing,
            timeout_secs: policy.timeout.as_secs(),
        }
    }
}

impl InboundChecksSection {
    /// The policy this section describes.
    pub fn policy(&self) -> mailroom_smtp::checks::CheckPolicy {
        mailroom_smtp::checks::CheckPolicy {
            trusted_networks: self.trusted_networks.clone(),
            dmarc: self.dmarc.into(),
            dmarc_overrides: self
                .dmarc_overrides
                .iter()
                .map(|(domain, setting)| {
                    (
                        domain.trim_end_matches('.').to_ascii_lowercase(),
                        (*setting).into(),
                    )
                })
                .collect(),
            reject_local_spoofing: self.reject_local_spoofing,
            timeout: std::time::Duration::from_secs(self.timeout_secs.max(1)),
        }
    }
}

/// `[tls]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// Certificate chains and keys (PEM); the client's SNI chooses among several.
    /// Empty: a self-signed certificate made at first start in the data folder.
    pub certificates: Vec<CertificatePair>,
    /// Certificates from an ACME CA instead.
    pub acme: AcmeSection,
}

impl TlsSection {
    /// The configured certificate pairs as the TLS crate takes them (the server's start
    /// and `mailroom tls check` read the same list).
    pub fn certificate_files(&self) -> Vec<mailroom_tls::CertificateFiles> {
        self.certificates
            .iter()
            .map(|pair| mailroom_tls::CertificateFiles {
                cert: pair.cert.clone(),
                key: pair.key.clone(),
            })
            .collect()
    }
}

/// `[tls.acme]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcmeSection {
    /// The CA's directory URL; "letsencrypt" for Let's Encrypt; empty: no ACME.
    pub directory: String,
    /// Contact URLs for the account, e.g. "mailto:postmaster@example.com".
    pub contact: Vec<String>,
    /// Names the certificate covers; empty: `server.hostname`.
    pub names: Vec<String>,
    /// Where HTTP-01 challenges are answered (the CA connects to port 80).
    pub http_listen: SocketAddr,
    /// A PEM root trusted for the CA's own HTTPS (test CAs); empty: the system's.
    pub ca_file: Option<PathBuf>,
}

impl Default for AcmeSection {
    fn default() -> Self {
        AcmeSection {
            directory: String::new(),
            contact: Vec::new(),
            names: Vec::new(),
            http_listen: "0.0.0.0:80".parse().expect("valid address"),
            ca_file: None,
        }
    }
}

impl AcmeSection {
    /// Whether ACME is on.
    pub fn enabled(&self) -> bool {
        !self.directory.trim().is_empty()
    }

    /// The directory URL ("letsencrypt" expanded).
    pub fn directory_url(&self) -> String {
        match self.directory.trim() {
            "letsencrypt" => mailroom_tls::acme::LETS_ENCRYPT.to_string(),
            other => other.to_string(),
        }
    }
}

/// One `[[tls.certificates]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatePair {
    /// The chain, server certificate first (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// `[outbound]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundSection {
    /// `both`, `inbound`, `outbound` or `none`; switchable at runtime.
    pub transfer_mode: mailroom_queue::TransferMode,
    /// Concurrent deliveries.
    pub workers: usize,
    /// Concurrent connections to one destination host.
    pub connections_per_destination: usize,
    /// DNS servers (`ip:port`); empty means the system's resolver.
    pub nameservers: Vec<SocketAddr>,
    /// Host names answered without DNS: name -> addresses.
    pub hosts: std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
    /// The port MX hosts are reached on.
    pub smtp_port: u16,
    /// Minutes to wait after the 1st, 2nd, ... failed attempt; the last one repeats.
    pub retry_minutes: Vec<u64>,
    /// Up to this fraction of an interval is added at random.
    pub retry_jitter: f64,
    /// Hours after which an undelivered message is returned to its sender.
    pub expire_hours: u64,
    /// Hours after which the sender is told the message is delayed (once).
    pub delay_notice_hours: u64,
    /// More Received headers than this: the message is looping and is returned.
    pub max_hops: usize,
    /// Seconds to wait for a connection and greeting.
    pub connect_timeout_secs: u64,
    /// Seconds to wait for each command's reply.
    pub command_timeout_secs: u64,
    /// Seconds to wait for the reply to the message data.
    pub data_timeout_secs: u64,
    /// Lets the admin API move the delivery clock forward (tests only).
    pub test_clock: bool,
    /// Opportunistic STARTTLS to next hops that offer it.
    pub starttls: bool,
    /// PEM files of roots trusted for next hops' certificates besides the system's
    /// bundle (`/etc/ssl/certs/ca-certificates.crt`).
    pub tls_ca_files: Vec<PathBuf>,
    /// Honour destination domains' MTA-STS policies (RFC 8461).
    pub mta_sts: bool,
    /// The HTTPS port MTA-STS policy hosts are asked on (443; tests only change it).
    pub mta_sts_port: u16,
    /// Honour DANE TLSA records (RFC 7672) of DNSSEC-signed destinations.
    pub dane: bool,
    /// A file of DNSKEY records trusted for DNSSEC instead of the root's keys (tests,
    /// private roots).
    pub dnssec_trust_anchor: Option<PathBuf>,
}

impl Default for OutboundSection {
    fn default() -> Self {
        OutboundSection {
            transfer_mode: mailroom_queue::TransferMode::Both,
            workers: 16,
            connections_per_destination: 5,
            nameservers: Vec::new(),
            hosts: Default::default(),
            smtp_port: 25,
            retry_minutes: vec![15, 30, 60, 240],
            retry_jitter: 0.1,
            expire_hours: 120,
            delay_notice_hours: 4,
            max_hops: 30,
            connect_timeout_secs: 30,
            command_timeout_secs: 300,
            data_timeout_secs: 600,
            test_clock: false,
            starttls: true,
            tls_ca_files: Vec::new(),
            mta_sts: true,
            mta_sts_port: 443,
            dane: true,
            dnssec_trust_anchor: None,
        }
    }
}

impl OutboundSection {
    /// The delivery settings this section describes.
    pub fn delivery(&self, hostname: &str) -> mailroom_outbound::OutboundConfig {
        use std::time::Duration;
        mailroom_outbound::OutboundConfig {
            workers: self.workers.max(1),
            per_destination: self.connections_per_destination.max(1),
            nameservers: self.nameservers.clone(),
            hosts: self.hosts.clone().into_iter().collect(),
            port: self.smtp_port,
            hostname: hostname.to_string(),
            schedule: mailroom_outbound::schedule::Schedule {
                intervals: self
                    .retry_minutes
                    .iter()
                    .map(|m| Duration::from_secs(m * 60))
                    .collect(),
                jitter: self.retry_jitter,
                expire_after: Duration::from_secs(self.expire_hours * 3600),
                delay_notice_after: Duration::from_secs(self.delay_notice_hours * 3600),
            },
            timeouts: mailroom_outbound::client::Timeouts {
                connect: Duration::from_secs(self.connect_timeout_secs),
                command: Duration::from_secs(self.command_timeout_secs),
                data: Duration::from_secs(self.data_timeout_secs),
            },
            max_hops: self.max_hops,
            keep_idle: Duration::from_secs(30),
            // The keys live in the data folder; the server adds the signer and the roots.
            dkim: None,
            tls: None,
            mta_sts: self.mta_sts,
            mta_sts_port: self.mta_sts_port,
            dane: self.dane,
            dnssec_trust_anchor: self.dnssec_trust_anchor.clone(),
        }
    }
}

/// Where plaintext passwords are accepted (`login.plaintext_auth`): the directory's one
/// policy type, used as it is by SMTP, IMAP and POP3.
pub use mailroom_directory::login::Plaintext as PlaintextAuth;

/// `[pop3]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pop3Section {
    /// Listen address; `--pop3` overrides it.
    pub listen: SocketAddr,
    /// Implicit-TLS (POP3S, RFC 8314) listen address; `--pop3s` overrides it.
    pub tls_listen: SocketAddr,
    /// Concurrent POP3 sessions, at most.
    pub sessions_max: usize,
    /// Concurrent POP3 sessions from one client address, at most.
    pub sessions_per_client_max: usize,
    /// A session silent this long is closed, nothing deleted.
    pub idle_timeout_secs: u64,
    /// Longest command line, bytes.
    pub command_line_max_bytes: usize,
}

impl Default for Pop3Section {
    fn default() -> Self {
        Pop3Section {
            listen: "127.0.0.1:1110".parse().expect("valid address"),
            tls_listen: DEFAULT_POP3S.parse().expect("valid address"),
            sessions_max: 500,
            sessions_per_client_max: 50,
            idle_timeout_secs: 600,
            command_line_max_bytes: 4096,
        }
    }
}

/// `[imap]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImapSection {
    /// Listen address; `--imap` overrides it.
    pub listen: SocketAddr,
    /// Implicit-TLS (IMAPS, RFC 8314) listen address; `--imaps` overrides it.
    pub tls_listen: SocketAddr,
    /// Concurrent IMAP sessions, at most.
    pub sessions_max: usize,
    /// Concurrent IMAP sessions from one client address, at most.
    pub sessions_per_client_max: usize,
    /// Longest command before login, literals included, in bytes.
    pub command_before_login_max_bytes: usize,
    /// A session silent this long is logged out.
    pub idle_timeout_secs: u64,
    /// Largest message APPEND accepts (APPENDLIMIT), bytes.
    pub append_limit_bytes: u64,
    /// Bytes of large literals all IMAP sessions together may hold in memory.
    pub literals_in_memory_max_bytes: usize,
    /// Longest command line without its literals, bytes.
    pub command_line_max_bytes: usize,
    /// Longest folder name (with its parents), bytes.
    pub folder_name_max_bytes: usize,
    /// Deepest nesting of SEARCH keys (parentheses, NOT, OR), at most 256.
    pub search_depth_max: usize,
    /// Longest LIST reference plus pattern, bytes.
    pub list_pattern_max_bytes: usize,
    /// Patterns in one LIST command.
    pub list_patterns_max: usize,
}

impl Default for ImapSection {
    fn default() -> Self {
        ImapSection {
            listen: "127.0.0.1:1143".parse().expect("valid address"),
            tls_listen: DEFAULT_IMAPS.parse().expect("valid address"),
            sessions_max: 1000,
            sessions_per_client_max: 50,
            command_before_login_max_bytes: 8192,
            idle_timeout_secs: 1800,
            append_limit_bytes: 26_214_400,
            literals_in_memory_max_bytes: 256 << 20,
            command_line_max_bytes: 65_536,
            folder_name_max_bytes: 1024,
            search_depth_max: 64,
            list_pattern_max_bytes: 1024,
            list_patterns_max: 32,
        }
    }
}

/// The embedded default of `imap.tls_listen`. A default listener whose port is taken
/// (another server on this machine, parallel tests) is skipped with a warning; a
/// configured one that cannot listen stops the start-up like every other listener.
pub const DEFAULT_IMAPS: &str = "127.0.0.1:1993";

/// The embedded default of `smtp.submission_listen` (see [`DEFAULT_IMAPS`]).
pub const DEFAULT_SUBMISSION: &str = "127.0.0.1:1587";

/// The embedded default of `smtp.submissions_listen` (see [`DEFAULT_IMAPS`]).
pub const DEFAULT_SUBMISSIONS: &str = "127.0.0.1:1465";

/// The embedded default of `admin.tls_listen` (see [`DEFAULT_IMAPS`]).
pub const DEFAULT_ADMIN_TLS: &str = "127.0.0.1:8443";
/// The embedded default of `pop3.tls_listen` (see [`DEFAULT_IMAPS`]).
pub const DEFAULT_POP3S: &str = "127.0.0.1:1995";

/// `[login]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginSection {
    /// Where passwords may be sent in the clear: "always", "loopback" or "never".
    pub plaintext_auth: PlaintextAuth,
    /// Failed logins from one client address before it is refused for the window.
    pub failures_per_client: u32,
    /// Failed logins for one account before it is refused for the window.
    pub failures_per_account: u32,
    /// The window, seconds.
    pub failure_window_secs: u64,
}

impl Default for LoginSection {
    fn default() -> Self {
        LoginSection {
            plaintext_auth: PlaintextAuth::Loopback,
            failures_per_client: 10,
            failures_per_account: 5,
            failure_window_secs: 300,
        }
    }
}

/// `[watchdog]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogSection {
    /// A queue non-empty without progress for this long is stalled.
    pub stall_after_ms: u64,
    /// How often the watchdog looks.
    pub check_interval_ms: u64,
    /// How often the deadlock detector looks; 0 turns it off.
    pub deadlock_check_ms: u64,
}

impl Default for WatchdogSection {
    fn default() -> Self {
        WatchdogSection {
            stall_after_ms: 10_000,
            check_interval_ms: 250,
            deadlock_check_ms: 1_000,
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// The name in the SMTP greeting and Received headers.
    pub hostname: String,
    /// The primary mail domain; `postmaster@` it is created at first start.
    pub domain: String,
    /// The organization this server belongs to.
    pub organization: String,
    /// The site (a group of servers) this server belongs to.
    pub site: String,
    /// This server's name in the directory; empty means `hostname`.
    pub server_name: String,
    /// The data folder: database, credentials, lock.
    pub data_dir: PathBuf,
    /// Longest a shutdown may take before the process exits anyway.
    pub shutdown_deadline_ms: u64,
}

impl ServerSection {
    /// The configured host name, or (empty) this machine's fully qualified name.
    pub fn effective_hostname(&self) -> String {
        let configured = self.hostname.trim();
        if configured.is_empty() {
            system_hostname()
        } else {
            configured.to_string()
        }
    }
}

/// This machine's fully qualified name, as `hostname -f` finds it: the kernel's host
/// name, then its canonical name from the resolver (`/etc/hosts`, DNS) when that has
/// more labels; "localhost" if there is none.
pub fn system_hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it
    // on success.
    let short = unsafe {
        if libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) != 0 {
            return "localhost".to_string();
        }
        std::ffi::CStr::from_ptr(buffer.as_ptr().cast())
            .to_string_lossy()
            .into_owned()
    };
    if short.is_empty() {
        return "localhost".to_string();
    }
    if short.contains('.') {
        return short;
    }
    canonical_name(&short).unwrap_or(short)
}

/// The resolver's canonical name for `host` (getaddrinfo with AI_CANONNAME).
fn canonical_name(host: &str) -> Option<String> {
    let name = std::ffi::CString::new(host).ok()?;
    // SAFETY: hints is zeroed then set; result is freed with freeaddrinfo; ai_canonname
    // is a NUL-terminated string owned by the result while it lives.
    unsafe {
        let mut hints: libc::addrinfo = std::mem::zeroed();
        hints.ai_flags = libc::AI_CANONNAME;
        hints.ai_family = libc::AF_UNSPEC;
        let mut result: *mut libc::addrinfo = std::ptr::null_mut();
        if libc::getaddrinfo(name.as_ptr(), std::ptr::null(), &hints, &mut result) != 0
            || result.is_null()
        {
            return None;
        }
        let canonical = (*result).ai_canonname;
        let found = (!canonical.is_null())
            .then(|| {
                std::ffi::CStr::from_ptr(canonical)
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|n| !n.is_empty());
        libc::freeaddrinfo(result);
        found
    }
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            hostname: String::new(),
            domain: "localhost".into(),
            organization: "Mailroom".into(),
            site: "Default-Site".into(),
            server_name: String::new(),
            data_dir: PathBuf::from("mailroom-data"),
            shutdown_deadline_ms: 5000,
        }
    }
}

/// `[smtp]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpSection {
    /// Listen address.
    pub listen: SocketAddr,
    /// Submission (RFC 6409: STARTTLS, then AUTH) listen address; `--submission`.
    pub submission_listen: SocketAddr,
    /// Submission over implicit TLS (RFC 8314) listen address; `--smtps`.
    pub submissions_listen: SocketAddr,
    /// Messages per hour one authenticated user may submit (0: no limit).
    pub submission_per_user_per_hour: u32,
    /// Messages per hour submission accepts from one client address (0: no limit).
    pub submission_per_client_per_hour: u32,
    /// Largest message, bytes.
    pub message_size_max_bytes: usize,
    /// Largest header section, bytes.
    pub header_size_max_bytes: usize,
    /// Recipients per message.
    pub recipients_per_message_max: usize,
    /// Longest command line, bytes.
    pub command_line_length_max_bytes: usize,
    /// Failed commands before the session is closed.
    pub errors_per_session_max: u32,
    /// Concurrent sessions.
    pub sessions_max: usize,
    /// Concurrent SMTP sessions from one client address, at most.
    pub sessions_per_client_max: usize,
    /// Message bytes all SMTP sessions together may hold in memory while receiving.
    pub data_in_memory_max_bytes: usize,
    /// Idle time before a session is closed, seconds.
    pub idle_timeout_secs: u64,
    /// Longest session, seconds.
    pub session_duration_max_secs: u64,
    /// Client networks that may relay to non-local domains (CIDR).
    pub relay_networks: Vec<ipnet::IpNet>,
    /// Tests only: `XSPIN <ms>` blocks the session's runtime thread (proves the watchdog).
    pub test_spin_command: bool,
}

impl Default for SmtpSection {
    fn default() -> Self {
        SmtpSection {
            listen: "127.0.0.1:2525".parse().expect("valid address"),
            submission_listen: DEFAULT_SUBMISSION.parse().expect("valid address"),
            submissions_listen: DEFAULT_SUBMISSIONS.parse().expect("valid address"),
            submission_per_user_per_hour: 500,
            submission_per_client_per_hour: 1000,
            message_size_max_bytes: 25 << 20,
            header_size_max_bytes: 2 << 20,
            recipients_per_message_max: 100,
            command_line_length_max_bytes: 2048,
            errors_per_session_max: 20,
            sessions_max: 500,
            sessions_per_client_max: 50,
            data_in_memory_max_bytes: 256 << 20,
            idle_timeout_secs: 300,
            session_duration_max_secs: 3600,
            relay_networks: Vec::new(),
            test_spin_command: false,
        }
    }
}

/// `[storage]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// New mail (SMTP, IMAP APPEND) is refused while the data folder's filesystem has
    /// less than this free, so accepted work can finish and the database never meets a
    /// full disk mid-transaction (Postfix's `queue_minfree`).
    pub free_space_reserve_bytes: u64,
    /// `full`: every commit is fsynced before it is acknowledged (APPEND, flags,
    /// deliveries survive a power loss). `normal`: only the spool's commits are; the
    /// others survive a process crash, and a power loss may undo the newest of them.
    pub durability: Durability,
}

/// When a commit reaches the disk (`storage.durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Every commit fsynced before it is acknowledged.
    #[default]
    Full,
    /// Only the spool's commits fsynced at once; the rest at the next checkpoint.
    Normal,
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            free_space_reserve_bytes: 64 << 20,
            durability: Durability::Full,
        }
    }
}

/// `[tracking]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingSection {
    /// Record every message's trail (`mailroom track`, the web admin's tracking).
    pub enabled: bool,
    /// Days a message's trail is kept; older events are removed a few thousand at a
    /// time in the background.
    pub retention_days: u32,
}

impl Default for TrackingSection {
    fn default() -> Self {
        TrackingSection {
            enabled: true,
            retention_days: 30,
        }
    }
}

/// `[spool]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSection {
    /// Share one fsync among all messages pending at once.
    pub group_commit: bool,
    /// Messages per commit.
    pub batch_messages_max: usize,
    /// Bytes per commit.
    pub batch_bytes_max: usize,
    /// Microseconds the writer waits for other messages to join a commit, when at least
    /// `commit_siblings` others are under way; 0 never waits.
    pub commit_delay_us: u64,
    /// Other messages under way (between MAIL FROM and the end of data) before the
    /// writer waits `commit_delay_us`.
    pub commit_siblings: usize,
}

impl Default for SpoolSection {
    fn default() -> Self {
        SpoolSection {
            group_commit: true,
            batch_messages_max: 256,
            batch_bytes_max: 32 << 20,
            commit_delay_us: 100,
            commit_siblings: 2,
        }
    }
}

/// `[conversion]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConversionSection {
    /// Worker threads; 0 means one per CPU core.
    pub workers: usize,
    /// Time budget of one message's conversion, milliseconds.
    pub time_budget_ms: u64,
    /// Attempts before quarantine.
    pub attempts_max: u32,
    /// First retry delay, milliseconds; doubles per attempt.
    pub retry_delay_ms: u64,
    /// Messages one worker converts and delivers in one transaction, at most.
    pub batch_max: usize,
}

impl Default for ConversionSection {
    fn default() -> Self {
        ConversionSection {
            workers: 0,
            time_budget_ms: 30_000,
            attempts_max: 5,
            retry_delay_ms: 10_000,
            batch_max: 32,
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Listen address of the admin HTTP API.
    pub listen: SocketAddr,
    /// Largest directory import upload, in bytes.
    pub import_size_max_bytes: u64,
    /// The same over HTTPS (the TLS section's certificates); the web admin's cookies
    /// are Secure there, and passwords from other machines are accepted only there.
    pub tls_listen: SocketAddr,
    /// Host names (or `name:port`) the web admin answers to besides the listen address
    /// and `localhost`; any other Host header is refused.
    pub web_hosts: Vec<String>,
    /// Connections each admin listener (HTTP, HTTPS) serves at once; one more is
    /// answered 503 and closed.
    pub connections_max: usize,
    /// A connection that sends no complete request header for this long (idle between
    /// requests, or a slow sender) is closed.
    pub idle_timeout_ms: u64,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: "127.0.0.1:8025".parse().expect("valid address"),
            import_size_max_bytes: 268_435_456,
            tls_listen: DEFAULT_ADMIN_TLS.parse().expect("valid address"),
            web_hosts: Vec::new(),
            connections_max: 256,
            idle_timeout_ms: 30_000,
        }
    }
}

/// `[directory]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DirectorySection {
    /// Domains delivered locally besides `server.domain`, the templates' domains and those
    /// added at run time.
    pub accepted_domains: Vec<String>,
}

/// The commented example printed by `mailroom config example`; equal to the defaults.
pub const EXAMPLE: &str = r#"# Mailroom configuration. Every setting is shown with its default; delete what you
# do not change. Command-line flags (--data, --domain, --smtp, --submission, --smtps,
# --imap, --imaps, --pop3, --pop3s, --admin) override it.

[server]
# The name this server gives itself in greetings, EHLO, Received headers, DSNs and its
# self-signed certificate. Empty: this machine's fully qualified name (what
# `hostname -f` says).
hostname = ""
# The primary mail domain. postmaster@<domain> is created at first start.
domain = "localhost"
# The directory's hierarchy: organization -> site -> server. One of each is created at
# first start; changing a name here renames it.
organization = "Mailroom"
site = "Default-Site"
# This server's name in the directory; empty means the hostname above.
server_name = ""
# The data folder: the database (mail, queues, directory), the admin credential, a lock.
data_dir = "mailroom-data"
# On SIGTERM/SIGINT the process exits within this time, whatever is in flight.
# Work not committed stays queued and resumes at the next start.
shutdown_deadline_ms = 5000

[smtp]
# Where the SMTP server listens for mail from other servers (port 25 in production;
# it needs privileges, 2525 does not). STARTTLS is offered; AUTH is not (see below).
listen = "127.0.0.1:2525"
# Where users' mail clients submit mail (RFC 6409, port 587 in production): STARTTLS,
# then AUTH PLAIN or LOGIN is required before MAIL; an authenticated user may relay and
# may send only as its own addresses or lists it owns; Message-ID and Date are added
# when missing. A default port that is taken is skipped with a warning.
submission_listen = "127.0.0.1:1587"
# The same over implicit TLS (RFC 8314, port 465 in production).
submissions_listen = "127.0.0.1:1465"
# Messages per hour submission accepts from one user, and from one client address
# (0: no limit); past it MAIL gets 451 4.7.1 and the client retries later.
submission_per_user_per_hour = 500
submission_per_client_per_hour = 1000
# Largest message accepted (advertised with SIZE; larger ones get 552 5.3.4).
message_size_max_bytes = 26214400
# Largest header section of a message (larger ones get 552 5.3.4).
header_size_max_bytes = 2097152
# Recipients per message; more get 452 4.5.3.
recipients_per_message_max = 100
# Longest SMTP command line (RFC 5321 requires at least 512).
command_line_length_max_bytes = 2048
# Failed commands tolerated per session before it is closed with 421.
errors_per_session_max = 20
# Concurrent SMTP sessions; more are answered 421 4.7.0 and closed.
sessions_max = 500
# Concurrent SMTP sessions from one client address; more are answered 421 4.7.0 and
# closed (one client cannot take every slot).
sessions_per_client_max = 50
# Message bytes all sessions together may hold in memory while receiving (messages
# are spooled when complete). Past it, a session receiving a message over 1 MiB drops
# it and answers 452 4.3.1 at its end (the sender retries later); smaller messages
# always flow.
data_in_memory_max_bytes = 268435456
# A session silent for this long is closed with 421 4.4.2 (RFC 5321 suggests 5 minutes).
idle_timeout_secs = 300
# A session open for this long is closed with 421 4.4.2.
session_duration_max_secs = 3600
# Client networks allowed to send to non-local domains, e.g. ["127.0.0.0/8", "10.0.0.0/8"].
# Empty: nobody may relay (never an open relay).
relay_networks = []
# Tests only, never in production: the command XSPIN <ms> holds the session's runtime
# thread that long, so a test can show the watchdog reports a blocked session.
test_spin_command = false

[spool]
# Group commit: one fsync for every message waiting at that moment. Turn off only to
# measure what it buys.
group_commit = true
# Messages per commit, at most.
batch_messages_max = 256
# Message bytes per commit, at most.
batch_bytes_max = 33554432
# Once a message arrives for an idle writer, wait this many microseconds for others to
# join its commit, but only when at least `commit_siblings` other sessions have a message
# under way (between MAIL FROM and the end of data): every commit costs about the same
# (index pages, the fsync), so fuller commits cost less per message. A lone sender never
# waits. 0 turns it off. (PostgreSQL's commit_delay and commit_siblings.)
commit_delay_us = 100
commit_siblings = 2

[storage]
# New mail is refused (SMTP 452 4.3.1 at MAIL, IMAP APPEND NO [LIMIT]) while the data
# folder's filesystem has less than this free, so that mail already accepted can still
# be converted and delivered and the database never meets a full disk mid-write. /health
# names the disk while it lasts; everything resumes by itself when space returns.
free_space_reserve_bytes = 67108864
# "full": every commit (APPEND, flag changes, deliveries) is fsynced before it is
# acknowledged, so it survives a power loss. "normal": only the SMTP spool's commits are
# (a "250" always means on disk); the others survive a crash of the process, but a power
# loss may undo the newest of them (they are redone: a delivery happens again, once).
durability = "full"

[tracking]
# Every message's trail (received, converted, delivered, relayed, deferred, DSN,
# quarantined, an administrator's action) is recorded with the step itself and shown by
# `mailroom track` and the web admin. It costs a few rows per message in the same
# transactions (under a tenth of the top ingestion rate, within the benchmark's noise;
# docs/benchmarks.md); false turns it off.
enabled = true
# Events older than this many days are removed.
retention_days = 30

[conversion]
# Inbound conversion threads; 0 means one per CPU core.
workers = 0
# Time one message's conversion may take before it counts as a failed attempt.
time_budget_ms = 30000
# Failed attempts before a message is quarantined (kept, with the reason).
attempts_max = 5
# Delay before the first retry of a failed conversion; doubles with every attempt.
retry_delay_ms = 10000
# Messages one worker claims, parses (one after another, on a helper thread) and
# delivers in one transaction.
batch_max = 32

[admin]
# The admin listener: the web admin at / (sign in at /login as a mailbox with the
# administrator role; the postmaster has it), the API at /api/v1, /health, /metrics.
# Loopback by default.
listen = "127.0.0.1:8025"
# Largest directory import (CSV or LDIF) accepted; larger uploads get 413 and nothing
# of them is kept. 256 MiB holds well over a million recipients.
import_size_max_bytes = 268435456
# The same over HTTPS, with the [tls] certificates: the web admin's session cookie is
# marked Secure there, and a password from another machine is accepted only there
# (login.plaintext_auth). A taken default port is skipped with a warning.
tls_listen = "127.0.0.1:8443"
# Names the web admin answers to besides the listen address and localhost, e.g.
# ["mail.example.com"] behind a reverse proxy; pages asked for under any other Host
# header are refused (a defence against DNS rebinding).
web_hosts = []
# Connections each admin listener (HTTP, HTTPS) serves at once; one more is answered
# 503 and closed, and logged. Each is a file descriptor of the whole server, so without
# a bound a client that opens connections and never finishes a request would leave
# SMTP, IMAP and POP3 unable to accept.
connections_max = 256
# A connection that sends no complete request header for this long (idle between
# requests, or sending its header slowly) is closed.
idle_timeout_ms = 30000

[directory]
# Domains delivered here besides server.domain, the site addressing templates' domains
# and those added with `mailroom domain add`.
accepted_domains = []

[watchdog]
# A queue (spool, inbound conversion, directory writer, directory jobs) that holds work
# and makes no progress for this long is stalled: /health turns unhealthy (503) and
# names it, mailroom_watchdog_stalls_total counts it, and the log says what every worker
# was doing.
stall_after_ms = 10000
# How often the watchdog looks.
check_interval_ms = 250
# How often the deadlock detector looks for threads blocked in a cycle; 0 turns it off.
deadlock_check_ms = 1000

[pop3]
# Where the POP3 server listens (RFC 1939; the standard port 110 needs privileges).
listen = "127.0.0.1:1110"
# Where POP3 over implicit TLS listens (POP3S; the standard port is 995). If this
# default port is taken, POP3S is skipped with a warning.
tls_listen = "127.0.0.1:1995"
# Concurrent POP3 sessions; more are refused with -ERR [SYS/TEMP].
sessions_max = 500
# Concurrent POP3 sessions from one client address; more are refused with -ERR [SYS/TEMP].
sessions_per_client_max = 50
# A session silent this long is closed and nothing it marked is deleted (RFC 1939 asks
# for at least 10 minutes).
idle_timeout_secs = 600
# Longest command line (RFC 2449 asks clients for at most 255 octets); longer ones get
# -ERR and the session is closed.
command_line_max_bytes = 4096

[imap]
# Where the IMAP server listens (IMAP4rev2 and IMAP4rev1; the standard port 143 needs
# privileges).
listen = "127.0.0.1:1143"
# Where IMAP over implicit TLS listens (IMAPS, RFC 8314; the standard port is 993). If
# this default port is taken, IMAPS is skipped with a warning.
tls_listen = "127.0.0.1:1993"
# Concurrent IMAP sessions; more get * BYE [UNAVAILABLE].
sessions_max = 1000
# Concurrent IMAP sessions from one client address; more get * BYE [UNAVAILABLE].
sessions_per_client_max = 50
# Longest command a client may send before it has logged in, literals included (a
# LOGIN with a long password fits; megabytes of literals from strangers do not).
command_before_login_max_bytes = 8192
# A session silent this long is logged out (RFC 9051 asks for at least 30 minutes).
idle_timeout_secs = 1800
# Largest message APPEND accepts, advertised as APPENDLIMIT; larger ones get [TOOBIG].
append_limit_bytes = 26214400
# Bytes of literals of 1 MiB or more (APPENDs) all sessions together may hold in
# memory; past it such a literal is refused with NO [LIMIT] (try again later).
literals_in_memory_max_bytes = 268435456
# Longest command line without its literals; longer ones end the session with BYE.
command_line_max_bytes = 65536
# Longest folder name, parents included (CREATE and RENAME beyond it get NO [LIMIT]).
folder_name_max_bytes = 1024
# Deepest nesting of SEARCH keys (parentheses, NOT, OR); deeper gets BAD. At most 256.
search_depth_max = 64
# Longest LIST reference plus pattern, and patterns per LIST; beyond them, BAD.
list_pattern_max_bytes = 1024
list_patterns_max = 32

[login]
# Where passwords may be sent on a connection that is not encrypted (POP3 USER/PASS and
# AUTH PLAIN, IMAP LOGIN and AUTHENTICATE PLAIN): "loopback" (clients on this machine
# only), "always" (readable on the network!) or "never". Over TLS (IMAPS, or after
# STARTTLS/STLS) passwords are always accepted.
plaintext_auth = "loopback"
# After this many failed logins from one client address within the window, that client
# is refused (without checking passwords) until the window ends.
failures_per_client = 10
# After this many failed logins for one account (from anywhere), the account is refused
# for the rest of the window.
failures_per_account = 5
# The window, seconds.
failure_window_secs = 300

[outbound]
# Which way mail moves: "both", "inbound" (accept SMTP, hold the outbound queue),
# "outbound" (refuse SMTP with 421, deliver the queue) or "none" (hold everything).
# Switch at runtime with `mailroom queue transfer-mode MODE`.
transfer_mode = "both"
# Deliveries at once, and connections at once to one destination host (more workers
# than connections per destination, so one slow or dead destination cannot hold them all).
workers = 16
connections_per_destination = 5
# DNS servers for MX lookups, e.g. ["192.0.2.53:53"]; empty uses /etc/resolv.conf.
nameservers = []
# The port MX hosts are reached on.
smtp_port = 25
# Minutes to wait after the 1st, 2nd, ... failed attempt; the last one repeats. A random
# extra of up to retry_jitter of the interval spreads retries out.
retry_minutes = [15, 30, 60, 240]
retry_jitter = 0.1
# An undelivered message is returned to its sender (a DSN) after this many hours, and
# the sender is told once that it is delayed after delay_notice_hours.
expire_hours = 120
delay_notice_hours = 4
# A message with more Received headers than this is looping; it is returned (5.4.6).
max_hops = 30
# Seconds to wait for a connection and greeting, each command's reply, and the reply to
# the message data (RFC 5321 suggests 5 and 10 minutes for the last two).
connect_timeout_secs = 30
command_timeout_secs = 300
data_timeout_secs = 600
# Let the admin API move the delivery clock forward. For tests only.
test_clock = false
# Encrypt with STARTTLS whenever a next hop offers it (opportunistic, RFC 7435). The
# certificate is checked against the system's roots and these PEM files, and the result
# is logged and kept per recipient; an unverifiable certificate does not stop delivery,
# and a failed handshake falls back to the clear, once.
starttls = true
tls_ca_files = []
# MTA-STS (RFC 8461): a domain that publishes a policy in "enforce" mode gets its mail only
# over TLS with a verified certificate, and only to the MX hosts it lists (else the
# message waits, 4.7.5); "testing" policies are logged. Needs starttls.
mta_sts = true
# The HTTPS port policies are fetched from (443; only tests change it).
mta_sts_port = 443
# DANE (RFC 7672): where a destination's MX and its hosts' TLSA records are DNSSEC-signed
# (validated here, from the root's keys), mail goes only over TLS with a certificate a
# DANE-EE record matches (else it waits, 4.7.5). Needs starttls and a resolver that
# passes DNSSEC records (most do).
dane = true
# A file of DNSKEY records to trust instead of the root's keys (tests, private roots).
# dnssec_trust_anchor = "/etc/mailroom/anchor.key"

# Host names answered without DNS (for hosts DNS should not be asked about).
[outbound.hosts]

[tls]
# Certificates for IMAPS, POP3S and STARTTLS, as PEM files: one entry per chain and key;
# with several, the name the client asks for (SNI) chooses, else the first. Reloaded when
# the files change or on SIGHUP, without dropping sessions. With none, the first start
# makes a self-signed certificate for server.hostname in <data_dir>/tls/ (see
# `mailroom tls show` for its fingerprint). For example:
#   [[tls.certificates]]
#   cert = "/etc/mailroom/mail.example.com.pem"
#   key = "/etc/mailroom/mail.example.com.key"
certificates = []

[tls.acme]
# Certificates from an ACME CA (RFC 8555) instead, proved over HTTP-01: set directory to
# "letsencrypt" (or another CA's directory URL), make server.hostname (or names) point
# at this machine in DNS, and let port 80 reach http_listen. Until the first certificate
# is issued a self-signed one is served; it is renewed 30 days before it ends and kept
# in <data_dir>/tls/acme/. Not together with [[tls.certificates]].
directory = ""
# e.g. ["mailto:postmaster@example.com"]
contact = []
# The names to cover; empty: server.hostname.
names = []
http_listen = "0.0.0.0:80"
# For a test CA (pebble): the root its own HTTPS is signed by, e.g. "/etc/pebble/ca.pem".
# ca_file = ""

[inbound_checks]
# Check mail from the Internet with SPF, DKIM, DMARC, ARC and iprev, and record the
# results in an Authentication-Results header (any such header in this server's name that
# arrives from outside is removed first). Checked: clients of the SMTP port that are not
# authenticated, not in smtp.relay_networks and not in trusted_networks. DNS lookups go to
# outbound.nameservers (or /etc/resolv.conf).
enabled = true
# Clients whose mail is not checked: by default this machine's own programs (loopback).
trusted_networks = ["127.0.0.0/8", "::1/128"]
# What a failed DMARC check does: "published" follows the author domain's policy (p=reject
# refuses with 550 5.7.1 at the end of DATA, p=quarantine delivers into the Junk folder),
# "none" only records it, "quarantine" or "reject" act so whatever the domain asks.
dmarc = "published"
# Mail from the Internet that claims one of our domains (envelope sender or From) is
# refused unless SPF or DKIM proves it (451 while DNS fails).
reject_local_spoofing = true
# Seconds all DNS lookups for one message may take; after that the checks count as a
# temporary error and the message is accepted with "none".
timeout_secs = 10

# Per author domain, the same choices as dmarc, e.g. "partner.example" = "none" for a
# partner whose mail fails DMARC through a forwarder.
[inbound_checks.dmarc_overrides]
"#;

impl Config {
    /// Reads and checks a config file; errors name the file, the key and the line.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("in the config file {}", path.display()))
    }

    /// Parses and checks config text.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.check()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense; errors name the key.
    pub fn check(&self) -> anyhow::Result<()> {
        let smtp = &self.smtp;
        let rules: [(&str, bool, &str); 14] = [
            (
                "server.hostname",
                !self
                    .server
                    .hostname
                    .contains(|c: char| c.is_whitespace() || c.is_control()),
                "must be a host name (empty: this machine's name)",
            ),
            (
                "server.domain",
                self.server.domain.contains(|c: char| c.is_alphanumeric())
                    && !self.server.domain.contains('@'),
                "must be a domain name such as example.com",
            ),
            (
                "server.shutdown_deadline_ms",
                self.server.shutdown_deadline_ms >= 100,
                "must be at least 100",
            ),
            (
                "smtp.message_size_max_bytes",
                smtp.message_size_max_bytes >= 1024,
                "must be at least 1024",
            ),
            (
                "smtp.header_size_max_bytes",
                smtp.header_size_max_bytes >= 1024,
                "must be at least 1024",
            ),
            (
                "smtp.recipients_per_message_max",
                smtp.recipients_per_message_max >= 1,
                "must be at least 1 (RFC 5321 asks for 100)",
            ),
            (
                "smtp.command_line_length_max_bytes",
                smtp.command_line_length_max_bytes >= 512,
                "must be at least 512 (RFC 5321 4.5.3.1.4)",
            ),
            (
                "smtp.sessions_max",
                smtp.sessions_max >= 1,
                "must be at least 1",
            ),
            (
                "spool.batch_messages_max",
                self.spool.batch_messages_max >= 1,
                "must be at least 1",
            ),
            (
                "spool.commit_delay_us",
                self.spool.commit_delay_us <= 100_000,
                "must be at most 100000 (a tenth of a second): every message of a commit waits it",
            ),
            (
                "conversion.attempts_max",
                self.conversion.attempts_max >= 1,
                "must be at least 1",
            ),
            (
                "conversion.batch_max",
                self.conversion.batch_max >= 1,
                "must be at least 1",
            ),
            (
                "admin.connections_max",
                self.admin.connections_max >= 1,
                "must be at least 1",
            ),
            (
                "admin.idle_timeout_ms",
                self.admin.idle_timeout_ms >= 100,
                "must be at least 100",
            ),
        ];
        for (key, ok, what) in rules {
            if !ok {
                bail!("{key} {what}");
            }
        }
        if self.tls.acme.enabled() && !self.tls.certificates.is_empty() {
            bail!(
                "tls.acme.directory cannot be used together with [[tls.certificates]]: choose one source of certificates"
            );
        }
        if self.tls.acme.enabled() {
            let url = self.tls.acme.directory_url();
            if !url.starts_with("https://") {
                bail!(
                    "tls.acme.directory must be an https:// URL or \"letsencrypt\" (got {url:?})"
                );
            }
            if let Some(bad) = self
                .tls
                .acme
                .contact
                .iter()
                .find(|c| !c.starts_with("mailto:"))
            {
                bail!("tls.acme.contact entries must be mailto: URLs (got {bad:?})");
            }
        }
        if !(1..=3650).contains(&self.tracking.retention_days) {
            bail!("tracking.retention_days must be between 1 and 3650");
        }
        if self.inbound_checks.timeout_secs == 0 {
            bail!("inbound_checks.timeout_secs must be at least 1");
        }
        if smtp.idle_timeout_secs == 0 || smtp.session_duration_max_secs == 0 {
            bail!("smtp.idle_timeout_secs and smtp.session_duration_max_secs must be at least 1");
        }
        if self.watchdog.stall_after_ms < 100 || self.watchdog.check_interval_ms == 0 {
            bail!(
                "watchdog.stall_after_ms must be at least 100 and watchdog.check_interval_ms at least 1"
            );
        }
        if self.imap.sessions_max == 0 || self.imap.idle_timeout_secs == 0 {
            bail!("imap.sessions_max and imap.idle_timeout_secs must be at least 1");
        }
        if self.imap.command_before_login_max_bytes < 1024 {
            bail!("imap.command_before_login_max_bytes must be at least 1024");
        }
        if self.smtp.sessions_per_client_max == 0
            || self.imap.sessions_per_client_max == 0
            || self.pop3.sessions_per_client_max == 0
        {
            bail!("sessions_per_client_max must be at least 1 (smtp, imap and pop3)");
        }
        if self.imap.search_depth_max == 0
            || self.imap.search_depth_max > mailroom_imap::parse::SEARCH_DEPTH_CEILING
        {
            bail!(
                "imap.search_depth_max must be between 1 and {} (the parser recurses once per level)",
                mailroom_imap::parse::SEARCH_DEPTH_CEILING
            );
        }
        if self.imap.command_line_max_bytes < 1024 || self.pop3.command_line_max_bytes < 512 {
            bail!(
                "imap.command_line_max_bytes must be at least 1024 and pop3.command_line_max_bytes at least 512"
            );
        }
        if self.imap.folder_name_max_bytes == 0
            || self.imap.list_pattern_max_bytes == 0
            || self.imap.list_patterns_max == 0
        {
            bail!(
                "imap.folder_name_max_bytes, imap.list_pattern_max_bytes and imap.list_patterns_max must be above 0"
            );
        }
        if self.imap.append_limit_bytes < 1024 {
            bail!("imap.append_limit_bytes must be at least 1024");
        }
        if self.pop3.sessions_max == 0 || self.pop3.idle_timeout_secs == 0 {
            bail!("pop3.sessions_max and pop3.idle_timeout_secs must be at least 1");
        }
        if self.login.failures_per_client == 0
            || self.login.failures_per_account == 0
            || self.login.failure_window_secs == 0
        {
            bail!(
                "login.failures_per_client, login.failures_per_account and login.failure_window_secs must be at least 1"
            );
        }
        if self.conversion.time_budget_ms == 0 {
            bail!("conversion.time_budget_ms must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_is_the_defaults() {
        assert_eq!(Config::parse(EXAMPLE).unwrap(), Config::default());
    }

    /// A fresh server names itself as the machine does (`hostname -f`, a tool we did
    /// not write), not "localhost"; a configured name wins.
    #[test]
    fn the_default_hostname_is_the_machines_fully_qualified_name() {
        let server = ServerSection::default();
        let name = server.effective_hostname();
        if let Ok(output) = std::process::Command::new("hostname").arg("-f").output()
            && output.status.success()
        {
            assert_eq!(name, String::from_utf8_lossy(&output.stdout).trim());
        }
        assert!(!name.is_empty());
        let configured = ServerSection {
            hostname: "mx.example.com".into(),
            ..ServerSection::default()
        };
        assert_eq!(configured.effective_hostname(), "mx.example.com");
        let mut config = Config::default();
        config.server.hostname = "bad name".into();
        let e = config.check().unwrap_err().to_string();
        assert!(e.contains("server.hostname"), "{e}");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err =
            Config::parse("[smtp]\nlisten = \"127.0.0.1:25\"\nsesions_max = 3\n").unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("sesions_max"), "{text}");
        assert!(text.contains("line 3"), "{text}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Config::parse("[smtp]\nsessions_max = \"many\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("sessions_max"), "{err:#}");
        let err = Config::parse("[smtp]\nsessions_max = 0\n").unwrap_err();
        assert_eq!(err.to_string(), "smtp.sessions_max must be at least 1");
        let err = Config::parse("[smtp]\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
        // A nesting limit that would let one line overflow the stack again is refused.
        let err = Config::parse("[imap]\nsearch_depth_max = 60000\n").unwrap_err();
        assert!(err.to_string().contains("imap.search_depth_max"), "{err:#}");
        let err = Config::parse("[pop3]\ncommand_line_max_bytes = 10\n").unwrap_err();
        assert!(
            err.to_string().contains("pop3.command_line_max_bytes"),
            "{err:#}"
        );
    }
}
