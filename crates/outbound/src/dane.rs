//! DANE for SMTP (RFC 7672): where a destination's MX records and its MX host's TLSA
//! records are DNSSEC-signed, the next hop must present a certificate those records
//! name, over TLS; otherwise the mail waits.
//!
//! Validation is hickory's own (it checks the signatures itself from a trust anchor,
//! the root's by default, and does not trust a resolver's AD bit). Only records proved
//! `Secure` count: an unsigned domain simply has no DANE.
//!
//! What is supported: DANE-EE (usage 3) with either selector (full certificate or
//! SubjectPublicKeyInfo) and SHA-256, SHA-512 or exact matching; the name in the
//! certificate and its expiry are not checked, as RFC 7672 §3.1.1 says. DANE-TA
//! (usage 2) needs a path validation to the named authority that is not built yet: a
//! host with only such records gets mandatory (unauthenticated) TLS, which RFC 7672
//! §2.2 allows for "unusable" records. PKIX usages 0 and 1 are unusable for SMTP.

use crate::OutboundError;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors};
use hickory_resolver::proto::rr::{RData, RecordType};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// One TLSA record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    /// Certificate usage: 2 DANE-TA, 3 DANE-EE.
    pub usage: u8,
    /// 0 the full certificate, 1 its SubjectPublicKeyInfo.
    pub selector: u8,
    /// 0 exact, 1 SHA-256, 2 SHA-512.
    pub matching: u8,
    /// The association data.
    pub data: Vec<u8>,
}

/// What DANE asks of one MX host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPolicy {
    /// No secure TLSA records: opportunistic TLS (or MTA-STS) as usual.
    None,
    /// TLS with a certificate one of these DANE-EE records matches.
    Authenticate(Vec<Tlsa>),
    /// Secure TLSA records, none usable here: TLS required, not authenticated.
    EncryptOnly,
    /// The TLSA lookup failed on a signed domain: do not deliver to this host now.
    Failed(String),
}

/// Whether `certificate` (DER, the end entity's) matches one of the DANE-EE records.
pub fn matches(records: &[Tlsa], certificate: &[u8]) -> bool {
    let spki = x509_parser::parse_x509_certificate(certificate)
        .ok()
        .map(|(_, cert)| cert.tbs_certificate.subject_pki.raw.to_vec());
    records.iter().filter(|r| r.usage == 3).any(|r| {
        let selected: &[u8] = match r.selector {
            0 => certificate,
            1 => match &spki {
                Some(spki) => spki,
                None => return false,
            },
            _ => return false,
        };
        match r.matching {
            0 => selected == r.data.as_slice(),
            1 => ring::digest::digest(&ring::digest::SHA256, selected).as_ref() == r.data,
            2 => ring::digest::digest(&ring::digest::SHA512, selected).as_ref() == r.data,
            _ => false,
        }
    })
}

/// Looks up MX and TLSA records with DNSSEC validation.
pub struct Dane {
    dns: TokioResolver,
}

impl Dane {
    /// A validating resolver asking these name servers (the system's when empty), from
    /// this trust anchor file of DNSKEY records (the root's built-in keys when none).
    pub fn new(nameservers: &[SocketAddr], anchor: Option<&Path>) -> Result<Dane, OutboundError> {
        let failed = |e: &dyn std::fmt::Display| OutboundError::Resolver(e.to_string());
        let anchors = match anchor {
            Some(path) => TrustAnchors::from_file(path)
                .map_err(|e| failed(&format!("{}: {e}", path.display())))?,
            None => TrustAnchors::default(),
        };
        let mut options = ResolverOpts::default();
        options.validate = true;
        let builder = if nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| failed(&e))?
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
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let dns = builder
            .with_options(options)
            .with_trust_anchor(Arc::new(anchors))
            .build()
            .map_err(|e| failed(&e))?;
        Ok(Dane { dns })
    }

    /// Whether `domain`'s MX records are DNSSEC-secure (the condition for DANE).
    pub async fn mx_secure(&self, domain: &str) -> bool {
        let dns = self.dns.clone();
        let name = format!("{}.", domain.trim_end_matches('.'));
        // In a task of its own: a panic in the validator must not take the delivery
        // worker with it.
        let lookup = tokio::spawn(async move { dns.lookup(name, RecordType::MX).await });
        match lookup.await {
            Ok(Ok(found)) => {
                let mx: Vec<_> = found
                    .answers()
                    .iter()
                    .filter(|r| matches!(r.data, RData::MX(_)))
                    .collect();
                !mx.is_empty() && mx.iter().all(|r| r.proof == Proof::Secure)
            }
            _ => false,
        }
    }

    /// What DANE asks of `host` (an MX host of a domain whose MX records are secure).
    pub async fn host(&self, host: &str) -> HostPolicy {
        let dns = self.dns.clone();
        let name = format!("_25._tcp.{}.", host.trim_end_matches('.'));
        let lookup = tokio::spawn(async move { dns.lookup(name, RecordType::TLSA).await });
        let found = match lookup.await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) if e.is_no_records_found() || e.is_nx_domain() => return HostPolicy::None,
            Ok(Err(e)) => return HostPolicy::Failed(format!("TLSA lookup for {host}: {e}")),
            Err(_) => return HostPolicy::Failed(format!("TLSA lookup for {host} failed")),
        };
        let records: Vec<Tlsa> = found
            .answers()
            .iter()
            .filter(|r| r.proof == Proof::Secure)
            .filter_map(|r| match &r.data {
                RData::TLSA(t) => Some(Tlsa {
                    usage: u8::from(t.cert_usage),
                    selector: u8::from(t.selector),
                    matching: u8::from(t.matching),
                    data: t.cert_data.clone(),
                }),
                _ => None,
            })
            .collect();
        if records.is_empty() {
            return HostPolicy::None;
        }
        let usable: Vec<Tlsa> = records
            .into_iter()
            .filter(|r| r.usage == 3 && r.selector <= 1 && r.matching <= 2)
            .collect();
        if usable.is_empty() {
            HostPolicy::EncryptOnly
        } else {
            HostPolicy::Authenticate(usable)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dane_ee_matches_the_certificate_or_its_key() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["mx.example.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let sha256 = |b: &[u8]| {
            ring::digest::digest(&ring::digest::SHA256, b)
                .as_ref()
                .to_vec()
        };
        let sha512 = |b: &[u8]| {
            ring::digest::digest(&ring::digest::SHA512, b)
                .as_ref()
                .to_vec()
        };
        let tlsa = |usage, selector, matching, data| Tlsa {
            usage,
            selector,
            matching,
            data,
        };
        assert!(matches(&[tlsa(3, 1, 1, sha256(&spki))], &der));
        assert!(matches(&[tlsa(3, 0, 1, sha256(&der))], &der));
        assert!(matches(&[tlsa(3, 1, 2, sha512(&spki))], &der));
        assert!(matches(&[tlsa(3, 0, 0, der.clone())], &der));
        // A wrong hash, and the right hash under an unusable usage, do not.
        assert!(!matches(&[tlsa(3, 1, 1, vec![0; 32])], &der));
        assert!(!matches(&[tlsa(2, 1, 1, sha256(&spki))], &der));
        assert!(!matches(&[tlsa(1, 1, 1, sha256(&spki))], &der));
        // One good record among bad ones is enough.
        assert!(matches(
            &[tlsa(3, 1, 1, vec![1; 32]), tlsa(3, 1, 1, sha256(&spki))],
            &der
        ));
    }
}
