//! DANE for SMTP (RFC 7672): where a destination's MX records and its MX host's TLSA
//! records are DNSSEC-signed, the next hop must present a certificate those records
//! name, over TLS; otherwise the mail waits.
//!
//! Validation is hickory's own (it checks the signatures itself from a trust anchor,
//! the root's by default, and does not trust a resolver's AD bit). Only records proved
//! `Secure` count: an unsigned domain simply has no DANE.
//!
//! What is supported: DANE-EE (usage 3) and DANE-TA (usage 2), either selector (full
//! certificate or SubjectPublicKeyInfo), SHA-256, SHA-512 or exact matching. For
//! DANE-EE the name in the certificate and its expiry are not checked (RFC 7672
//! §3.1.1). For DANE-TA the authority must be a certificate the server sends in its
//! chain (RFC 7672 §3.1.2 asks servers to), and the end entity must validate to it,
//! by WebPKI rules, for the MX host's name (§3.2.2). PKIX usages 0 and 1 are unusable
//! for SMTP: a host with only those gets mandatory (unauthenticated) TLS (§2.2).

use crate::OutboundError;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::ResolverOpts;
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

/// Whether a certificate chain (DER, the end entity first, as the server sent it)
/// satisfies one of the records for `host`: a DANE-EE record matches the end entity,
/// or a DANE-TA record matches a certificate of the chain to which the end entity
/// validates for `host`.
pub fn chain_matches(records: &[Tlsa], chain: &[Vec<u8>], host: &str) -> bool {
    let Some(end_entity) = chain.first() else {
        return false;
    };
    if records
        .iter()
        .filter(|r| r.usage == 3)
        .any(|r| matches_one(r, end_entity))
    {
        return true;
    }
    records.iter().filter(|r| r.usage == 2).any(|r| {
        chain[1..]
            .iter()
            .filter(|authority| matches_one(r, authority))
            .any(|authority| validates_to(chain, authority, host))
    })
}

/// Whether `chain`'s end entity validates, for `host`, up to `authority` taken as the
/// trust anchor.
fn validates_to(chain: &[Vec<u8>], authority: &[u8], host: &str) -> bool {
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let mut roots = rustls::RootCertStore::empty();
    if roots.add(CertificateDer::from(authority.to_vec())).is_err() {
        return false;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(verifier) =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
    else {
        return false;
    };
    let Ok(name) = ServerName::try_from(host.trim_end_matches('.').to_string()) else {
        return false;
    };
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        &*verifier,
        &CertificateDer::from(chain[0].as_slice()),
        &intermediates,
        &name,
        &[],
        UnixTime::now(),
    )
    .is_ok()
}

/// Whether `certificate` (DER, the end entity's) matches one of the DANE-EE records.
pub fn matches(records: &[Tlsa], certificate: &[u8]) -> bool {
    records
        .iter()
        .filter(|r| r.usage == 3)
        .any(|r| matches_one(r, certificate))
}

/// Whether one record's association data is this certificate's (by its selector and
/// matching type).
fn matches_one(r: &Tlsa, certificate: &[u8]) -> bool {
    let spki = x509_parser::parse_x509_certificate(certificate)
        .ok()
        .map(|(_, cert)| cert.tbs_certificate.subject_pki.raw.to_vec());
    {
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
    }
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
        let builder = crate::resolve::builder(nameservers)?;
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
            .filter(|r| (r.usage == 2 || r.usage == 3) && r.selector <= 1 && r.matching <= 2)
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

    /// DANE-TA: the authority must be in the chain the server sent, match the record,
    /// and the end entity must validate to it for the MX host's name.
    #[test]
    fn dane_ta_needs_the_authority_in_the_chain_and_the_name() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "DANE test authority");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["mx.example.test".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        let (leaf_der, ca_der) = (leaf.der().to_vec(), ca.der().to_vec());
        let sha256 = |b: &[u8]| {
            ring::digest::digest(&ring::digest::SHA256, b)
                .as_ref()
                .to_vec()
        };
        let by_cert = Tlsa {
            usage: 2,
            selector: 0,
            matching: 1,
            data: sha256(&ca_der),
        };
        let by_key = Tlsa {
            usage: 2,
            selector: 1,
            matching: 1,
            data: sha256(&rcgen::PublicKeyData::subject_public_key_info(ca.key())),
        };
        let chain = vec![leaf_der.clone(), ca_der.clone()];
        assert!(chain_matches(
            std::slice::from_ref(&by_cert),
            &chain,
            "mx.example.test"
        ));
        assert!(chain_matches(
            std::slice::from_ref(&by_key),
            &chain,
            "mx.example.test"
        ));
        // Another host name, an authority the server did not send, a record that
        // names the end entity as an authority: no.
        assert!(!chain_matches(
            std::slice::from_ref(&by_cert),
            &chain,
            "mx.other.test"
        ));
        assert!(!chain_matches(
            std::slice::from_ref(&by_cert),
            &chain[..1],
            "mx.example.test"
        ));
        let leaf_as_ta = Tlsa {
            usage: 2,
            selector: 0,
            matching: 1,
            data: sha256(&leaf_der),
        };
        assert!(!chain_matches(&[leaf_as_ta], &chain, "mx.example.test"));
        // DANE-EE through the same entry point.
        let ee = Tlsa {
            usage: 3,
            selector: 0,
            matching: 1,
            data: sha256(&leaf_der),
        };
        assert!(chain_matches(&[ee], &chain[..1], "anything"));
    }
}
