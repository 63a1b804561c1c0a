//! Where a domain's mail goes: MX records in preference order, the domain's own address
//! when it has no MX (RFC 5321 §5.1), nothing at all for a null MX (RFC 7505).
//!
//! The resolver is configurable so that tests (and split-horizon sites) can point it at
//! their own DNS server; a static host map answers first, for hosts DNS should not be
//! asked about.

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// One host to try, with its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The host name (or the address as written for a literal).
    pub name: String,
    /// Addresses with the port to connect to.
    pub addrs: Vec<SocketAddr>,
}

/// Why a destination has no host to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoHost {
    /// A DNS failure that may pass (timeout, SERVFAIL): try again later.
    Temporary(String),
    /// The domain does not exist, or publishes a null MX: fail the recipients.
    Permanent {
        /// Enhanced status code for the DSN.
        code: &'static str,
        /// What happened.
        reason: String,
    },
}

/// Looks up mail hosts.
pub struct Resolver {
    dns: TokioResolver,
    hosts: HashMap<String, Vec<IpAddr>>,
    port: u16,
}

impl Resolver {
    /// The system's resolver (`/etc/resolv.conf`) or these name servers, with a static
    /// host map answered first, connecting to `port` (25 in production).
    pub fn new(
        nameservers: &[SocketAddr],
        hosts: HashMap<String, Vec<IpAddr>>,
        port: u16,
    ) -> Result<Resolver, crate::OutboundError> {
        let failed = |e: &dyn std::fmt::Display| crate::OutboundError::Resolver(e.to_string());
        let dns = builder(nameservers)?.build().map_err(|e| failed(&e))?;
        let hosts = hosts
            .into_iter()
            .map(|(k, v)| (k.trim_end_matches('.').to_ascii_lowercase(), v))
            .collect();
        Ok(Resolver { dns, hosts, port })
    }

    /// The addresses of one host name (static map first).
    pub async fn host(&self, name: &str, port: u16) -> Result<Host, NoHost> {
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(ips) = self.hosts.get(&key) {
            return Ok(Host {
                name: key,
                addrs: ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect(),
            });
        }
        if let Ok(ip) = key
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(Host {
                name: key,
                addrs: vec![SocketAddr::new(ip, port)],
            });
        }
        match self.dns.lookup_ip(format!("{key}.")).await {
            Ok(found) => Ok(Host {
                name: key,
                addrs: found.iter().map(|ip| SocketAddr::new(ip, port)).collect(),
            }),
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => Err(NoHost::Permanent {
                code: "5.1.2",
                reason: format!("host {key} has no address"),
            }),
            Err(e) => Err(NoHost::Temporary(format!("looking up {key}: {e}"))),
        }
    }

    /// The TXT records at `name`, each one's strings joined (none: an empty list).
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, String> {
        match self
            .dns
            .txt_lookup(format!("{}.", name.trim_end_matches('.')))
            .await
        {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(format!("TXT lookup for {name}: {e}")),
        }
    }

    /// The mail hosts of `domain`, most preferred first.
    pub async fn mail_hosts(&self, domain: &str) -> Result<Vec<Host>, NoHost> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if self.hosts.contains_key(&domain) || domain.starts_with('[') {
            return Ok(vec![self.host(&domain, self.port).await?]);
        }
        let mx = match self.dns.mx_lookup(format!("{domain}.")).await {
            Ok(lookup) => {
                let mut records: Vec<(u16, String)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                        _ => None,
                    })
                    .collect();
                records.sort();
                records
            }
            Err(e) if e.is_nx_domain() => {
                return Err(NoHost::Permanent {
                    code: "5.1.2",
                    reason: format!("the domain {domain} does not exist"),
                });
            }
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => return Err(NoHost::Temporary(format!("MX lookup for {domain}: {e}"))),
        };
        // RFC 7505: one MX whose exchange is the root means "no mail accepted here".
        if mx.len() == 1 && (mx[0].1 == "." || mx[0].1.is_empty()) {
            return Err(NoHost::Permanent {
                code: "5.1.10",
                reason: format!("{domain} accepts no mail (null MX, RFC 7505)"),
            });
        }
        if mx.is_empty() {
            // No MX: the domain itself is the host (implicit MX, RFC 5321 §5.1).
            return Ok(vec![self.host(&domain, self.port).await?]);
        }
        let mut hosts = Vec::new();
        let mut last_error = None;
        for (_, exchange) in mx.iter().filter(|(_, e)| e != ".") {
            match self.host(exchange, self.port).await {
                Ok(host) if !host.addrs.is_empty() => hosts.push(host),
                Ok(_) => {}
                Err(e) => last_error = Some(e),
            }
        }
        if hosts.is_empty() {
            return Err(match last_error {
                Some(NoHost::Permanent { reason, .. }) => NoHost::Temporary(reason),
                Some(e) => e,
                None => NoHost::Temporary(format!("no MX host of {domain} has an address")),
            });
        }
        Ok(hosts)
    }

    /// The smart host `host[:port]` (port 25 unless given).
    pub async fn smart_host(&self, spec: &str) -> Result<Vec<Host>, NoHost> {
        let (name, port) = match spec.rsplit_once(':') {
            Some((name, port)) if !name.contains(':') || name.ends_with(']') => {
                match port.parse::<u16>() {
                    Ok(port) => (name, port),
                    Err(_) => {
                        return Err(NoHost::Permanent {
                            code: "5.3.5",
                            reason: format!("smart host {spec:?} has a bad port"),
                        });
                    }
                }
            }
            _ => (spec, 25),
        };
        Ok(vec![self.host(name, port).await?])
    }
}

/// A resolver builder for `nameservers` (UDP and TCP each, at their own ports), or for
/// the system's `/etc/resolv.conf` when none are configured; delivery and DANE both
/// start from it.
pub(crate) fn builder(
    nameservers: &[SocketAddr],
) -> Result<hickory_resolver::ResolverBuilder<TokioRuntimeProvider>, crate::OutboundError> {
    if nameservers.is_empty() {
        return TokioResolver::builder_tokio()
            .map_err(|e| crate::OutboundError::Resolver(e.to_string()));
    }
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
    Ok(TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(servers),
        TokioRuntimeProvider::default(),
    ))
}
