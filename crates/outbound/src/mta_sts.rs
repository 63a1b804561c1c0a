//! MTA-STS (RFC 8461): a domain publishes that mail to it must travel over TLS with a
//! certificate valid for an MX host it lists; in `enforce` mode we deliver only so.
//!
//! Discovery is a TXT record at `_mta-sts.<domain>` (parsed by mail-auth); the policy is
//! fetched from `https://mta-sts.<domain>/.well-known/mta-sts.txt` with a verified
//! certificate, no redirects, at most 64 KiB, within 10 s, and kept in memory for its
//! `max_age` (until the TXT record's `id` changes). A domain whose policy cannot be
//! fetched, with none cached, is treated as having none (RFC 8461 §5).
//!
//! Why the HTTPS GET is ours and not hyper's: the policy host must be resolved by the
//! same resolver as MX hosts (configured name servers, the static host map), and the
//! certificate checked against the same roots as next hops; a one-request HTTP/1.0 GET
//! over our resolver and tokio-rustls is smaller than a hyper client with a custom
//! resolver and connector.

use crate::resolve::Resolver;
use mail_auth::common::parse::TxtRecordParser;
use mailroom_watch::RankedMutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A policy's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Deliver only over verified TLS to a listed MX host.
    Enforce,
    /// Deliver as usual; report what enforcing would have refused.
    Testing,
    /// The domain withdrew its policy.
    None,
}

/// A domain's policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The mode.
    pub mode: Mode,
    /// MX host patterns: a name, or `*.` and a name (one more label on the left).
    pub mx: Vec<String>,
    /// Seconds it may be cached.
    pub max_age: u64,
}

impl Policy {
    /// Whether `host` is one of the policy's MX hosts.
    pub fn allows_mx(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(parent) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                None => *pattern == host,
            })
    }
}

/// The longest `max_age` honoured (RFC 8461 §3.2: one year).
pub const MAX_AGE_CEILING: u64 = 31_557_600;

/// Parses a policy file (RFC 8461 §3.2): `key: value` lines, CRLF or LF.
pub fn parse_policy(text: &str) -> Result<Policy, String> {
    let mut version = None;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(format!("line without a colon: {line:?}"));
        };
        let value = value.trim();
        match key.trim() {
            "version" => version = Some(value.to_string()),
            "mode" => {
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    other => return Err(format!("unknown mode {other:?}")),
                })
            }
            "max_age" => {
                max_age = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| format!("max_age is not a number: {value:?}"))?
                        .min(MAX_AGE_CEILING),
                )
            }
            "mx" => mx.push(value.trim_end_matches('.').to_ascii_lowercase()),
            // Unknown keys are ignored (extensions).
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return Err("version is not STSv1".into());
    }
    let mode = mode.ok_or("no mode")?;
    let max_age = max_age.ok_or("no max_age")?;
    if mode != Mode::None && mx.is_empty() {
        return Err("no mx".into());
    }
    Ok(Policy { mode, mx, max_age })
}

struct Cached {
    id: String,
    policy: Arc<Policy>,
    until: Instant,
}

/// Finds, fetches and caches policies.
pub struct MtaSts {
    resolver: Arc<Resolver>,
    roots: Arc<rustls::RootCertStore>,
    /// The HTTPS port of policy hosts (443; tests use another).
    port: u16,
    /// Rank 89 (leaf): held to look up or store one policy.
    cache: RankedMutex<HashMap<String, Cached>>,
}

/// How long fetching a policy may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest policy file read.
const POLICY_MAX_BYTES: usize = 64 * 1024;

impl MtaSts {
    /// Policies found through `resolver`, fetched over HTTPS on `port` with
    /// certificates checked against `roots`.
    pub fn new(resolver: Arc<Resolver>, roots: Arc<rustls::RootCertStore>, port: u16) -> MtaSts {
        MtaSts {
            resolver,
            roots,
            port,
            cache: RankedMutex::new(
                mailroom_watch::rank::MTA_STS_CACHE,
                "MTA-STS policy cache",
                HashMap::new(),
            ),
        }
    }

    /// The policy `domain` publishes now, if any (errors are logged and count as
    /// none, unless a cached policy is still valid).
    pub async fn policy(&self, domain: &str) -> Option<Arc<Policy>> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let id = match self.resolver.txt(&format!("_mta-sts.{domain}")).await {
            Ok(records) => records
                .iter()
                .filter(|r| r.starts_with("v=STSv1"))
                .filter_map(|r| mail_auth::mta_sts::MtaSts::parse(r.as_bytes()).ok())
                .map(|r| r.id)
                .next(),
            Err(e) => {
                tracing::debug!(domain, error = %e, "MTA-STS TXT lookup failed; using the cached policy, if any");
                return self.cached(&domain, None);
            }
        };
        let Some(id) = id else {
            // No record: a cached policy still holds until it expires (RFC 8461 §5.1:
            // a removed record does not end a policy early).
            return self.cached(&domain, None);
        };
        if let Some(policy) = self.cached(&domain, Some(&id)) {
            return Some(policy);
        }
        match self.fetch(&domain).await {
            Ok(policy) => {
                tracing::info!(domain, id, mode = ?policy.mode, mx = ?policy.mx, "MTA-STS policy fetched");
                let policy = Arc::new(policy);
                self.cache.lock().insert(
                    domain,
                    Cached {
                        id,
                        until: Instant::now() + Duration::from_secs(policy.max_age),
                        policy: policy.clone(),
                    },
                );
                Some(policy)
            }
            Err(e) => {
                tracing::warn!(domain, error = %e, "MTA-STS policy not fetched");
                self.cached(&domain, None)
            }
        }
    }

    /// A cached, unexpired policy (with this `id`, when given).
    fn cached(&self, domain: &str, id: Option<&str>) -> Option<Arc<Policy>> {
        let cache = self.cache.lock();
        let cached = cache.get(domain)?;
        (cached.until > Instant::now() && id.is_none_or(|id| id == cached.id))
            .then(|| cached.policy.clone())
    }

    async fn fetch(&self, domain: &str) -> Result<Policy, String> {
        let host = format!("mta-sts.{domain}");
        tokio::time::timeout(FETCH_TIMEOUT, self.get(&host))
            .await
            .map_err(|_| format!("https://{host}/.well-known/mta-sts.txt did not answer in time"))?
            .and_then(|text| parse_policy(&text))
    }

    /// `GET /.well-known/mta-sts.txt` over verified TLS: the body of a 200 answer.
    async fn get(&self, host: &str) -> Result<String, String> {
        let found = self
            .resolver
            .host(host, self.port)
            .await
            .map_err(|e| format!("{host}: {e:?}"))?;
        let addr = found
            .addrs
            .first()
            .copied()
            .ok_or_else(|| format!("{host} has no address"))?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {host} ({addr}): {e}"))?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(self.roots.clone())
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host}: {e}"))?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        // HTTP/1.0: the answer ends with the connection, never chunked.
        let request = format!(
            "GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: {host}\r\nUser-Agent: Mailroom\r\nConnection: close\r\n\r\n"
        );
        tls.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match tls.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
                // Servers that close without close_notify: what arrived is the answer.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.to_string()),
            }
            if answer.len() > POLICY_MAX_BYTES + 8192 {
                return Err(format!("the policy of {host} is larger than 64 KiB"));
            }
        }
        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("{host} sent no HTTP header"))?;
        let status = head.lines().next().unwrap_or("");
        if status.split_whitespace().nth(1) != Some("200") {
            // RFC 8461 §3.3: redirects are not followed; anything but 200 is no policy.
            return Err(format!("{host} answered {status:?}"));
        }
        let plain = head.lines().any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.eq_ignore_ascii_case("content-type")
                    && v.trim().to_ascii_lowercase().starts_with("text/plain")
            })
        });
        if !plain {
            return Err(format!("{host} did not answer with text/plain"));
        }
        Ok(body.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_as_rfc_8461_writes_them() {
        let policy = parse_policy(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\n",
        )
        .unwrap();
        assert_eq!(policy.mode, Mode::Enforce);
        assert_eq!(policy.max_age, 604_800);
        assert!(policy.allows_mx("mail.example.com"));
        assert!(policy.allows_mx("MAIL.example.com."));
        assert!(policy.allows_mx("mx1.example.net"));
        // A wildcard covers one label only, and not the parent itself.
        assert!(!policy.allows_mx("a.b.example.net"));
        assert!(!policy.allows_mx("example.net"));
        assert!(!policy.allows_mx("evil-mail.example.com"));
        // LF line ends, unknown keys, max_age capped at a year.
        let policy = parse_policy(
            "version: STSv1\nmode: testing\nmx: mx.test\nmax_age: 99999999999\nfoo: bar\n",
        )
        .unwrap();
        assert_eq!(policy.mode, Mode::Testing);
        assert_eq!(policy.max_age, MAX_AGE_CEILING);
    }

    #[test]
    fn broken_policies_are_refused() {
        for text in [
            "",
            "version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a\n",
            "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a\nmax_age: soon\n",
            "<html>not a policy</html>",
        ] {
            assert!(parse_policy(text).is_err(), "{text:?}");
        }
        // "none" needs no mx.
        assert_eq!(
            parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n")
                .unwrap()
                .mode,
            Mode::None
        );
    }
}
