//! Inbound mail authentication: SPF (RFC 7208), DKIM (RFC 6376), DMARC (RFC 7489), ARC
//! (RFC 8617) and iprev (RFC 8601 §3), checked at the end of DATA for mail from the
//! Internet, recorded in an `Authentication-Results` header (RFC 8601) and acted on.
//!
//! Why here and not in conversion: the verdict has to be known before the "250", so that
//! a message a domain's owner asked us to reject (DMARC `p=reject`), or one forging a
//! local domain, is refused in the session and never becomes our responsibility (no
//! bounce to a forged sender).
//!
//! The protocol work is mail-auth's (Stalwart's, Apache-2.0/MIT); the DNS is
//! hickory's, pointed at the configured name servers. What is ours is the policy:
//! [`decide`] is a pure function from what the checks found to what happens, so it is
//! tested without DNS.
//!
//! Who is checked: every client of the MX port except authenticated users, clients in
//! `relay_networks`, and `trusted_networks` (loopback by default: local programs and
//! the machine's own tools are not the Internet, as in Postfix's `mynetworks`).

use crate::reply::Reply;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use ipnet::IpNet;
use mail_auth::Parameters;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, MessageAuthenticator,
    SpfResult,
};
use mail_auth::{MX, RecordSet, ResolverCache, Txt};
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// DNS answers kept between messages, by their TTL (at most [`CACHE_TTL_MAX`]): the
/// same senders come back, and each message asks for SPF, DKIM keys, DMARC and PTR
/// records. Bounded: past [`CACHE_ENTRIES_MAX`] entries the expired ones go, then all.
/// The lock is a leaf, held only to look up or insert (never across `.await`).
struct Cache<K, V> {
    entries: mailroom_watch::RankedMutex<HashMap<K, (V, Instant)>>,
}

/// The longest a DNS answer is kept.
pub const CACHE_TTL_MAX: Duration = Duration::from_secs(3600);

/// Entries per record type, at most.
pub const CACHE_ENTRIES_MAX: usize = 10_000;

impl<K, V> Default for Cache<K, V> {
    fn default() -> Self {
        Cache {
            entries: mailroom_watch::RankedMutex::new(
                mailroom_watch::rank::INBOUND_DNS_CACHE,
                "inbound DNS cache",
                HashMap::new(),
            ),
        }
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for Cache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut entries = self.entries.lock();
        match entries.get(name) {
            Some((value, until)) if *until > Instant::now() => Some(value.clone()),
            Some(_) => {
                entries.remove(name);
                None
            }
            None => None,
        }
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.lock().remove(name).map(|(value, _)| value)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        if entries.len() >= CACHE_ENTRIES_MAX {
            entries.retain(|_, (_, until)| *until > now);
            if entries.len() >= CACHE_ENTRIES_MAX {
                entries.clear();
            }
        }
        entries.insert(key, (value, valid_until.min(now + CACHE_TTL_MAX)));
    }
}

/// One cache per record type mail-auth asks for.
#[derive(Default)]
struct Caches {
    txt: Cache<Box<str>, Txt>,
    mx: Cache<Box<str>, RecordSet<MX>>,
    ipv4: Cache<Box<str>, RecordSet<Ipv4Addr>>,
    ipv6: Cache<Box<str>, RecordSet<Ipv6Addr>>,
    ptr: Cache<IpAddr, RecordSet<Box<str>>>,
}

/// mail-auth's parameters with every cache plugged in.
type Cached<'x, P> = Parameters<
    'x,
    P,
    Cache<Box<str>, Txt>,
    Cache<Box<str>, RecordSet<MX>>,
    Cache<Box<str>, RecordSet<Ipv4Addr>>,
    Cache<Box<str>, RecordSet<Ipv6Addr>>,
    Cache<IpAddr, RecordSet<Box<str>>>,
>;

impl Caches {
    fn params<'x, P>(&'x self, params: P) -> Cached<'x, P> {
        Parameters::new(params)
            .with_txt_cache(&self.txt)
            .with_mx_cache(&self.mx)
            .with_ipv4_cache(&self.ipv4)
            .with_ipv6_cache(&self.ipv6)
            .with_ptr_cache(&self.ptr)
    }
}

/// DKIM signatures checked per message at most (more: none is checked).
pub const DKIM_SIGNATURES_MAX: usize = 10;

/// What to do with mail whose DMARC check fails, for one author domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcAction {
    /// Follow the domain's published policy (`p=`, `sp=`).
    Published,
    /// Deliver as usual; the header still records the failure.
    None,
    /// Deliver into the recipients' Junk folders.
    Quarantine,
    /// Refuse at the end of DATA with 550 5.7.1.
    Reject,
}

/// The administrator's choices for inbound checks.
#[derive(Debug, Clone)]
pub struct CheckPolicy {
    /// Clients whose mail is not checked (besides relay networks and authenticated
    /// users).
    pub trusted_networks: Vec<IpNet>,
    /// What a DMARC failure does, unless an override names the author domain.
    pub dmarc: DmarcAction,
    /// Per author domain (lowercase), what a DMARC failure does.
    pub dmarc_overrides: HashMap<String, DmarcAction>,
    /// Refuse mail that claims a local domain (envelope sender or From) without SPF or
    /// DKIM proving it.
    pub reject_local_spoofing: bool,
    /// How long all the DNS work for one message may take.
    pub timeout: Duration,
}

impl Default for CheckPolicy {
    fn default() -> Self {
        CheckPolicy {
            trusted_networks: vec![
                "127.0.0.0/8".parse().expect("valid network"),
                "::1/128".parse().expect("valid network"),
            ],
            dmarc: DmarcAction::Published,
            dmarc_overrides: HashMap::new(),
            reject_local_spoofing: true,
            timeout: Duration::from_secs(10),
        }
    }
}

/// The DMARC outcome, reduced to what policy needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmarcOutcome {
    /// Aligned SPF or DKIM passed.
    Pass,
    /// The author domain publishes DMARC and nothing aligned passed; its policy.
    Fail(DmarcAction),
    /// A DNS failure: nothing is decided on it.
    TempError,
    /// No DMARC record, or a broken one.
    None,
}

/// What the checks found, reduced to what [`decide`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// The author domain (RFC 5322 From), lowercase.
    pub from_domain: Option<String>,
    /// The envelope sender's domain (or the HELO name for the null sender), lowercase.
    pub mail_from_domain: Option<String>,
    /// SPF's result for the envelope sender.
    pub spf: SpfResult,
    /// The `d=` of every DKIM signature that verified, lowercase.
    pub dkim_pass: Vec<String>,
    /// Some DKIM signature could not be checked because DNS failed.
    pub dkim_temperror: bool,
    /// DMARC.
    pub dmarc: DmarcOutcome,
}

/// What happens to the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Deliver as usual.
    Accept,
    /// Deliver into the Junk folders, for this reason.
    Junk(String),
    /// Refuse with this reply.
    Reject(Reply),
}

/// Whether a verified domain `proven` vouches for a claimed domain: the same domain, or
/// one is a subdomain of the other (DMARC's relaxed alignment, without the public
/// suffix list: a parent vouches for its children and a child for its parent).
fn aligned(claimed: &str, proven: &str) -> bool {
    claimed == proven
        || claimed
            .strip_suffix(proven)
            .is_some_and(|head| head.ends_with('.'))
        || proven
            .strip_suffix(claimed)
            .is_some_and(|head| head.ends_with('.'))
}

/// The policy: from the evidence to the action. Pure, so it is tested without DNS.
///
/// 1. A claim to a local domain (envelope or From) must be proven by a passing SPF for
///    the envelope domain or a verified DKIM signature, aligned with the claim; when
///    DNS failed and nothing passed, the refusal is temporary (451), else 550.
/// 2. A DMARC failure takes the override for the author domain, else the site's
///    choice, else the published policy: reject (550 5.7.1) or quarantine (Junk).
pub fn decide(
    evidence: &Evidence,
    policy: &CheckPolicy,
    is_local: &dyn Fn(&str) -> bool,
) -> Action {
    if policy.reject_local_spoofing {
        let spf_domain = (evidence.spf == SpfResult::Pass)
            .then_some(evidence.mail_from_domain.as_deref())
            .flatten();
        let claims = [
            evidence.mail_from_domain.as_deref(),
            evidence.from_domain.as_deref(),
        ];
        for claimed in claims.into_iter().flatten().filter(|d| is_local(d)) {
            let proven = spf_domain.is_some_and(|d| aligned(claimed, d))
                || evidence.dkim_pass.iter().any(|d| aligned(claimed, d));
            if proven {
                continue;
            }
            let dns_failed = evidence.spf == SpfResult::TempError || evidence.dkim_temperror;
            return Action::Reject(if dns_failed {
                Reply::new(
                    451,
                    (4, 7, 0),
                    format!(
                        "Cannot authenticate mail claiming local domain {claimed} now (DNS failure); try again later"
                    ),
                )
            } else {
                Reply::new(
                    550,
                    (5, 7, 1),
                    format!(
                        "Message claims to come from local domain {claimed}, but neither SPF nor DKIM authenticates it"
                    ),
                )
            });
        }
    }
    let DmarcOutcome::Fail(published) = &evidence.dmarc else {
        return Action::Accept;
    };
    let domain = evidence.from_domain.as_deref().unwrap_or("");
    let chosen = match policy.dmarc_overrides.get(domain) {
        Some(action) => *action,
        None => policy.dmarc,
    };
    let action = match chosen {
        DmarcAction::Published => *published,
        other => other,
    };
    match action {
        DmarcAction::Reject => Action::Reject(Reply::new(
            550,
            (5, 7, 1),
            format!("Message rejected: it fails the DMARC policy of {domain}"),
        )),
        DmarcAction::Quarantine => Action::Junk(format!("fails the DMARC policy of {domain}")),
        DmarcAction::None | DmarcAction::Published => Action::Accept,
    }
}

/// The facts of one message that the checks need.
#[derive(Debug, Clone, Copy)]
pub struct CheckInput<'a> {
    /// The client's address.
    pub ip: IpAddr,
    /// The name the client gave in HELO or EHLO.
    pub helo: &'a str,
    /// The envelope sender ("" for the null sender).
    pub mail_from: &'a str,
    /// The message as received.
    pub message: &'a [u8],
    /// Seal the message with ARC (it is being forwarded: a list or a contact among
    /// the recipients), when a sealer is set.
    pub seal: bool,
}

/// The result of checking one message.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The fields to prepend, CRLF-terminated: `Authentication-Results`, after an ARC
    /// set when the message was sealed.
    pub header: String,
    /// What happens to the message.
    pub action: Action,
    /// What the checks found.
    pub evidence: Evidence,
}

/// Runs the checks: mail-auth with its own DNS resolver.
pub struct Checker {
    authenticator: MessageAuthenticator,
    policy: CheckPolicy,
    hostname: String,
    /// ARC sealing (RFC 8617): the keys, and the domain whose active key seals.
    sealer: Option<(std::sync::Arc<mailroom_dkim::Signer>, String)>,
    /// DNS answers kept between messages.
    caches: Caches,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("policy", &self.policy)
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

impl Checker {
    /// A checker asking these name servers (the system's when empty), writing
    /// results under `hostname` (the authserv-id).
    pub fn new(
        nameservers: &[SocketAddr],
        policy: CheckPolicy,
        hostname: &str,
    ) -> Result<Checker, String> {
        let mut options = ResolverOpts::default();
        options.timeout = Duration::from_secs(3).min(policy.timeout);
        options.attempts = 2;
        let authenticator = if nameservers.is_empty() {
            MessageAuthenticator::new_system_conf()
        } else {
            let servers = nameservers
                .iter()
                .map(|addr| {
                    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                    for connection in &mut server.connections {
                        connection.port = addr.port();
                    }
                    server
                })
                .collect();
            MessageAuthenticator::new(ResolverConfig::from_name_servers(servers), options)
        }
        .map_err(|e| format!("DNS resolver for inbound checks: {e}"))?;
        Ok(Checker {
            authenticator,
            policy,
            hostname: hostname.to_string(),
            sealer: None,
            caches: Caches::default(),
        })
    }

    /// Seals forwarded messages with ARC, using `domain`'s active DKIM key (none: no
    /// seal; `mailroom dkim generate DOMAIN` makes one).
    pub fn with_sealer(
        mut self,
        keys: std::sync::Arc<mailroom_dkim::Signer>,
        domain: &str,
    ) -> Self {
        self.sealer = Some((keys, domain.to_ascii_lowercase()));
        self
    }

    /// Whether mail from this client is checked (relay networks and authenticated
    /// users are the caller's to exempt).
    pub fn applies_to(&self, ip: IpAddr) -> bool {
        !self.policy.trusted_networks.iter().any(|n| n.contains(&ip))
    }

    /// Checks one message; `is_local` says whether a domain is one of ours. DNS that
    /// does not answer within the policy's timeout counts as a temporary error.
    pub async fn check(
        &self,
        input: CheckInput<'_>,
        is_local: &(dyn Fn(&str) -> bool + Sync),
    ) -> Verdict {
        match tokio::time::timeout(self.policy.timeout, self.run(input)).await {
            Ok((header, evidence)) => {
                let action = decide(&evidence, &self.policy, is_local);
                Verdict {
                    header,
                    action,
                    evidence,
                }
            }
            Err(_) => {
                let evidence = Evidence {
                    from_domain: None,
                    mail_from_domain: envelope_domain(input.mail_from, input.helo),
                    spf: SpfResult::TempError,
                    dkim_pass: Vec::new(),
                    dkim_temperror: true,
                    dmarc: DmarcOutcome::TempError,
                };
                let action = decide(&evidence, &self.policy, is_local);
                Verdict {
                    header: format!(
                        "Authentication-Results: {}; none (DNS did not answer within {} s)\r\n",
                        self.hostname,
                        self.policy.timeout.as_secs()
                    ),
                    action,
                    evidence,
                }
            }
        }
    }

    /// [`Checker::check`] on a thread of the blocking pool: its CPU work grows with
    /// the message and must not hold a runtime thread, and a panic inside the protocol
    /// code (a message built to hit a bug in a parser) costs the checks, not the
    /// session or the message, which is then accepted with `none (checks failed)` and
    /// logged.
    pub async fn check_contained(
        self: &std::sync::Arc<Self>,
        ip: IpAddr,
        helo: String,
        mail_from: String,
        message: std::sync::Arc<Vec<u8>>,
        seal: bool,
        is_local: std::sync::Arc<dyn Fn(&str) -> bool + Send + Sync>,
    ) -> Verdict {
        let checker = self.clone();
        // On the blocking pool, not a runtime worker: parsing, body hashes (a whole
        // message per canonicalization), RSA verification and the ARC seal grow with
        // the message, and a 25 MB one would hold a runtime thread for tens of
        // milliseconds. The DNS lookups still run on the runtime's reactor.
        let runtime = tokio::runtime::Handle::current();
        let task = tokio::task::spawn_blocking({
            let (helo, mail_from, message) = (helo.clone(), mail_from.clone(), message.clone());
            move || {
                runtime.block_on(async move {
                    let input = CheckInput {
                        ip,
                        helo: &helo,
                        mail_from: &mail_from,
                        message: &message,
                        seal,
                    };
                    checker.check(input, &|domain| is_local(domain)).await
                })
            }
        });
        match task.await {
            Ok(verdict) => verdict,
            Err(e) => {
                tracing::error!(%ip, mail_from, error = %e, "inbound checks failed (a bug); the message is accepted unchecked");
                Verdict {
                    header: format!(
                        "Authentication-Results: {}; none (checks failed)\r\n",
                        self.hostname
                    ),
                    action: Action::Accept,
                    evidence: Evidence {
                        from_domain: None,
                        mail_from_domain: envelope_domain(&mail_from, &helo),
                        spf: SpfResult::None,
                        dkim_pass: Vec::new(),
                        dkim_temperror: false,
                        dmarc: DmarcOutcome::None,
                    },
                }
            }
        }
    }

    async fn run(&self, input: CheckInput<'_>) -> (String, Evidence) {
        let auth = &self.authenticator;
        let caches = &self.caches;
        let mail_from_domain = envelope_domain(input.mail_from, input.helo);
        let spf_domain = mail_from_domain.clone().unwrap_or_default();
        let spf_params = if input.mail_from.is_empty() {
            SpfParameters::verify_ehlo(input.ip, input.helo, &self.hostname)
        } else {
            SpfParameters::verify_mail_from(input.ip, input.helo, &self.hostname, input.mail_from)
        };
        let Some(message) = AuthenticatedMessage::parse(input.message) else {
            // Not even a header section: SPF alone, and DMARC cannot apply.
            let spf = auth.verify_spf(caches.params(spf_params)).await;
            let iprev = auth.verify_iprev(caches.params(input.ip)).await;
            let header = AuthenticationResults::new(&self.hostname)
                .with_spf_mailfrom_result(&spf, input.ip, input.mail_from, input.helo)
                .with_iprev_result(&iprev, input.ip)
                .to_header();
            let evidence = Evidence {
                from_domain: None,
                mail_from_domain,
                spf: spf.result(),
                dkim_pass: Vec::new(),
                dkim_temperror: false,
                dmarc: DmarcOutcome::None,
            };
            return (header, evidence);
        };
        // Each signature costs DNS lookups and a verification: a message carrying more
        // than a sender could need is a way to make us work, not mail. Past the cap
        // its signatures are not checked (dkim=none, so DMARC rests on SPF alone).
        let signatures = message.dkim_headers.len();
        let dkim_future = async {
            if signatures > DKIM_SIGNATURES_MAX {
                tracing::info!(
                    signatures,
                    "DKIM not checked: more signatures than {DKIM_SIGNATURES_MAX}"
                );
                Vec::new()
            } else {
                auth.verify_dkim(caches.params(&message)).await
            }
        };
        let (spf, dkim, arc, iprev) = tokio::join!(
            auth.verify_spf(caches.params(spf_params)),
            dkim_future,
            auth.verify_arc(caches.params(&message)),
            auth.verify_iprev(caches.params(input.ip)),
        );
        let dmarc = auth
            .verify_dmarc(caches.params(DmarcParameters::new(&message, &dkim, &spf_domain, &spf)))
            .await;
        let from = message.from.first().cloned().unwrap_or_default();
        let from_domain = from
            .rsplit_once('@')
            .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase());
        let mut results = AuthenticationResults::new(&self.hostname)
            .with_dkim_results(&dkim, &from)
            .with_spf_mailfrom_result(&spf, input.ip, input.mail_from, input.helo)
            .with_iprev_result(&iprev, input.ip);
        if !message.as_headers.is_empty() {
            results = results.with_arc_result(&arc, input.ip);
        }
        if !dmarc.domain().is_empty() {
            results = results.with_dmarc_result(&dmarc);
        }
        let mut header = results.to_header();
        if dkim.is_empty() {
            // mail-auth says nothing without a signature; RFC 8601 §2.7.1 has "none".
            let at = "Authentication-Results: ".len() + self.hostname.len();
            header.insert_str(at, ";\r\n\tdkim=none");
        }
        if input.seal
            && let Some((keys, domain)) = &self.sealer
            && let Some(set) = keys.arc_seal(domain, &message, &results, &arc)
        {
            header.insert_str(0, &set);
        }
        let dkim_pass = dkim
            .iter()
            .filter(|d| d.result() == &DkimResult::Pass)
            .filter_map(|d| d.signature())
            .map(|s| s.d.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        let dkim_temperror = dkim
            .iter()
            .any(|d| matches!(d.result(), DkimResult::TempError(_)));
        let dmarc = match dmarc.result() {
            DmarcResult::Pass => DmarcOutcome::Pass,
            DmarcResult::Fail(_) => DmarcOutcome::Fail(match dmarc.policy() {
                Policy::Reject => DmarcAction::Reject,
                Policy::Quarantine => DmarcAction::Quarantine,
                Policy::None | Policy::Unspecified => DmarcAction::None,
            }),
            DmarcResult::TempError(_) => DmarcOutcome::TempError,
            DmarcResult::PermError(_) | DmarcResult::None => DmarcOutcome::None,
        };
        let evidence = Evidence {
            from_domain,
            mail_from_domain,
            spf: spf.result(),
            dkim_pass,
            dkim_temperror,
            dmarc,
        };
        (header, evidence)
    }
}

/// The domain SPF checks: the envelope sender's, or the HELO name's for the null
/// sender (RFC 7208 §2.4).
fn envelope_domain(mail_from: &str, helo: &str) -> Option<String> {
    let domain = match mail_from.rsplit_once('@') {
        Some((_, domain)) => domain,
        None if mail_from.is_empty() => helo,
        None => return None,
    };
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    (!domain.is_empty()).then_some(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(domain: &str) -> bool {
        domain == "example.test" || domain.ends_with(".example.test")
    }

    fn evidence() -> Evidence {
        Evidence {
            from_domain: Some("sender.example".into()),
            mail_from_domain: Some("sender.example".into()),
            spf: SpfResult::None,
            dkim_pass: Vec::new(),
            dkim_temperror: false,
            dmarc: DmarcOutcome::None,
        }
    }

    fn code(action: &Action) -> Option<u16> {
        match action {
            Action::Reject(reply) => Some(reply.code),
            _ => None,
        }
    }

    #[test]
    fn alignment_is_relaxed_both_ways_but_not_by_suffix_alone() {
        assert!(aligned("example.test", "example.test"));
        assert!(aligned("mail.example.test", "example.test"));
        assert!(aligned("example.test", "mail.example.test"));
        assert!(!aligned("badexample.test", "example.test"));
        assert!(!aligned("example.test", "other.test"));
    }

    #[test]
    fn mail_without_local_claims_or_dmarc_is_accepted() {
        let policy = CheckPolicy::default();
        assert_eq!(decide(&evidence(), &policy, &local), Action::Accept);
        let mut softfail = evidence();
        softfail.spf = SpfResult::Fail;
        assert_eq!(decide(&softfail, &policy, &local), Action::Accept);
    }

    #[test]
    fn a_local_envelope_or_from_domain_needs_spf_or_dkim() {
        let policy = CheckPolicy::default();
        let mut forged = evidence();
        forged.from_domain = Some("example.test".into());
        assert_eq!(code(&decide(&forged, &policy, &local)), Some(550));
        // An envelope from elsewhere proven by SPF does not prove the local From.
        forged.spf = SpfResult::Pass;
        assert_eq!(code(&decide(&forged, &policy, &local)), Some(550));
        // A DKIM signature of the local domain (or its parent) does.
        forged.dkim_pass = vec!["example.test".into()];
        assert_eq!(decide(&forged, &policy, &local), Action::Accept);
        let mut envelope = evidence();
        envelope.mail_from_domain = Some("lists.example.test".into());
        assert_eq!(code(&decide(&envelope, &policy, &local)), Some(550));
        envelope.spf = SpfResult::Pass;
        assert_eq!(decide(&envelope, &policy, &local), Action::Accept);
        // Turned off, only DMARC speaks.
        let off = CheckPolicy {
            reject_local_spoofing: false,
            ..CheckPolicy::default()
        };
        assert_eq!(decide(&forged, &off, &local), Action::Accept);
    }

    #[test]
    fn dns_failure_on_a_local_claim_is_temporary() {
        let policy = CheckPolicy::default();
        let mut claim = evidence();
        claim.mail_from_domain = Some("example.test".into());
        claim.spf = SpfResult::TempError;
        assert_eq!(code(&decide(&claim, &policy, &local)), Some(451));
        claim.spf = SpfResult::None;
        claim.dkim_temperror = true;
        assert_eq!(code(&decide(&claim, &policy, &local)), Some(451));
    }

    #[test]
    fn dmarc_follows_the_published_policy_unless_overridden() {
        let mut policy = CheckPolicy::default();
        let mut failing = evidence();
        failing.dmarc = DmarcOutcome::Fail(DmarcAction::Reject);
        assert_eq!(code(&decide(&failing, &policy, &local)), Some(550));
        failing.dmarc = DmarcOutcome::Fail(DmarcAction::Quarantine);
        assert!(matches!(decide(&failing, &policy, &local), Action::Junk(_)));
        failing.dmarc = DmarcOutcome::Fail(DmarcAction::None);
        assert_eq!(decide(&failing, &policy, &local), Action::Accept);
        // Per-domain override beats the published policy and the site's choice.
        failing.dmarc = DmarcOutcome::Fail(DmarcAction::Reject);
        policy
            .dmarc_overrides
            .insert("sender.example".into(), DmarcAction::Quarantine);
        assert!(matches!(decide(&failing, &policy, &local), Action::Junk(_)));
        policy.dmarc_overrides.clear();
        policy.dmarc = DmarcAction::None;
        assert_eq!(decide(&failing, &policy, &local), Action::Accept);
        // Temporary DNS failures and passes decide nothing.
        policy.dmarc = DmarcAction::Published;
        failing.dmarc = DmarcOutcome::TempError;
        assert_eq!(decide(&failing, &policy, &local), Action::Accept);
        failing.dmarc = DmarcOutcome::Pass;
        assert_eq!(decide(&failing, &policy, &local), Action::Accept);
    }

    /// Cached DNS answers expire by their TTL (capped at an hour) and the cache stays
    /// bounded.
    #[test]
    fn dns_answers_are_cached_by_ttl_and_bounded() {
        let cache: Cache<Box<str>, u32> = Cache::default();
        let now = Instant::now();
        cache.insert("fresh".into(), 1, now + Duration::from_secs(60));
        cache.insert("stale".into(), 2, now - Duration::from_secs(1));
        assert_eq!(cache.get("fresh"), Some(1));
        assert_eq!(cache.get("stale"), None);
        cache.insert("long".into(), 3, now + Duration::from_secs(86_400));
        let until = cache.entries.lock()["long"].1;
        assert!(until <= Instant::now() + CACHE_TTL_MAX);
        for n in 0..CACHE_ENTRIES_MAX + 5 {
            cache.insert(n.to_string().into(), 0, now + Duration::from_secs(60));
        }
        assert!(cache.entries.lock().len() <= CACHE_ENTRIES_MAX);
        assert_eq!(cache.remove("fresh"), None, "cleared when it filled up");
    }

    #[test]
    fn the_null_sender_is_checked_by_its_helo_name() {
        assert_eq!(
            envelope_domain("", "mx.Sender.Example."),
            Some("mx.sender.example".into())
        );
        assert_eq!(
            envelope_domain("a@Example.TEST", "x"),
            Some("example.test".into())
        );
        assert_eq!(envelope_domain("postmaster", "x"), None);
    }
}
