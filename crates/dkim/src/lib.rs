//! DKIM signing for outbound mail (RFC 6376; Ed25519 by RFC 8463).
//!
//! Why: receivers (Gmail, Microsoft, every DMARC-checking server) trust mail that carries
//! a valid signature of its From domain, and reject or bin much of what does not. An
//! administrator expects to make a key with one command, publish the DNS record it
//! prints, and have every message signed from then on.
//!
//! Where the keys live: `<data>/dkim/<domain>/<selector>.<algorithm>.key` (the private
//! key, base64 of its DER: PKCS#1 for RSA, PKCS#8 for Ed25519; mode 0600), next to
//! `<selector>.txt` (the DNS TXT record's value) and `active` (the selector that signs).
//! Rotation is by selector: `mailroom dkim generate DOMAIN --selector NEW` makes the new
//! key active; the old ones stay listed (their records should stay in DNS until mail
//! signed with them has been delivered) until their files are removed.
//!
//! The signing itself is mail-auth's (Stalwart's crate): we choose the key, the domain
//! and the header fields, and prepend the `DKIM-Signature` field it produces.

use base64::Engine;
use mail_auth::arc::ArcSealer;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};
use mail_auth::{ArcOutput, AuthenticatedMessage, AuthenticationResults};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// A key's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// RSA, 2048 bits, with SHA-256 (`rsa-sha256`): what every verifier accepts.
    Rsa,
    /// Ed25519 with SHA-256 (`ed25519-sha256`, RFC 8463): short keys; not every
    /// verifier checks it yet, so sign with both when in doubt.
    Ed25519,
}

impl Algorithm {
    /// The name in file names and in `k=`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Rsa => "rsa",
            Algorithm::Ed25519 => "ed25519",
        }
    }

    /// Parses `rsa` or `ed25519`.
    pub fn parse(text: &str) -> Option<Algorithm> {
        match text.to_ascii_lowercase().as_str() {
            "rsa" | "rsa-sha256" => Some(Algorithm::Rsa),
            "ed25519" | "ed25519-sha256" => Some(Algorithm::Ed25519),
            _ => None,
        }
    }
}

/// Why a key could not be made, read or used; each names the file or the value.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A domain or selector that cannot be a DNS label sequence.
    #[error("{0}")]
    Invalid(String),
    /// A key file that does not hold a usable key.
    #[error("{path}: {why}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The crypto library refused.
    #[error("generating the key: {0}")]
    Generate(String),
}

/// One key, as `mailroom dkim list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The signing domain (`d=`).
    pub domain: String,
    /// The selector (`s=`).
    pub selector: String,
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Whether this is the key that signs for its domain.
    pub active: bool,
    /// Where the DNS record goes: `<selector>._domainkey.<domain>`.
    pub record_name: String,
    /// The TXT record's value: `v=DKIM1; k=...; p=...`.
    pub record_value: String,
}

/// The folder of a data folder's DKIM keys.
pub fn keys_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("dkim")
}

/// A name made of DNS labels (letters, digits, `-`, `_`, dots between).
fn check_name(what: &str, name: &str) -> Result<String, DkimError> {
    let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if valid {
        Ok(name)
    } else {
        Err(DkimError::Invalid(format!(
            "{what} {name:?} is not a DNS name (letters, digits, '-', '_' and dots)"
        )))
    }
}

/// Makes a new key for `domain` under `selector` and makes it the active one. Refuses to
/// overwrite an existing selector (a published record would stop matching).
pub fn generate(
    data_dir: &Path,
    domain: &str,
    selector: &str,
    algorithm: Algorithm,
) -> Result<KeyInfo, DkimError> {
    let domain = check_name("domain", domain)?;
    let selector = check_name("selector", selector)?;
    let dir = keys_dir(data_dir).join(&domain);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DkimError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    if let Ok(existing) = list_domain(&dir, &domain)
        && existing.iter().any(|k| k.selector == selector)
    {
        return Err(DkimError::Invalid(format!(
            "{domain} already has a key under selector {selector:?}; choose a new selector to rotate"
        )));
    }
    let pair = match algorithm {
        Algorithm::Rsa => mail_auth::dkim::generate::DkimKeyPair::generate_rsa(2048),
        Algorithm::Ed25519 => mail_auth::dkim::generate::DkimKeyPair::generate_ed25519(),
    }
    .map_err(|e| DkimError::Generate(e.to_string()))?;
    let record = format!(
        "v=DKIM1; k={}; p={}",
        algorithm.name(),
        pair.encoded_public_key()
    );
    let key_path = dir.join(format!("{selector}.{}.key", algorithm.name()));
    let private = base64::engine::general_purpose::STANDARD.encode(pair.private_key());
    mailroom_watch::durable::write_replacing(&key_path, format!("{private}\n").as_bytes(), true)
        .map_err(io(&key_path))?;
    let txt_path = dir.join(format!("{selector}.txt"));
    mailroom_watch::durable::write_replacing(&txt_path, format!("{record}\n").as_bytes(), false)
        .map_err(io(&txt_path))?;
    let active = dir.join("active");
    mailroom_watch::durable::write_replacing(&active, format!("{selector}\n").as_bytes(), false)
        .map_err(io(&active))?;
    Ok(KeyInfo {
        record_name: format!("{selector}._domainkey.{domain}"),
        domain,
        selector,
        algorithm,
        active: true,
        record_value: record,
    })
}

/// Every key in the data folder, by domain then selector.
pub fn list(data_dir: &Path) -> Result<Vec<KeyInfo>, DkimError> {
    let root = keys_dir(data_dir);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(Vec::new());
    };
    let mut domains: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    domains.sort();
    let mut keys = Vec::new();
    for (domain, dir) in domains {
        keys.extend(list_domain(&dir, &domain)?);
    }
    Ok(keys)
}

fn list_domain(dir: &Path, domain: &str) -> Result<Vec<KeyInfo>, DkimError> {
    let io = |source| DkimError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let active = std::fs::read_to_string(dir.join("active"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let name = entry
            .map_err(io)?
            .file_name()
            .to_string_lossy()
            .into_owned();
        let Some(stem) = name.strip_suffix(".key") else {
            continue;
        };
        let Some((selector, algorithm)) = stem.rsplit_once('.') else {
            continue;
        };
        let Some(algorithm) = Algorithm::parse(algorithm) else {
            continue;
        };
        let record_value = std::fs::read_to_string(dir.join(format!("{selector}.txt")))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        keys.push(KeyInfo {
            domain: domain.to_string(),
            selector: selector.to_string(),
            algorithm,
            active: selector == active,
            record_name: format!("{selector}._domainkey.{domain}"),
            record_value,
        });
    }
    keys.sort_by(|a, b| a.selector.cmp(&b.selector));
    Ok(keys)
}

/// A loaded signing key, ready to sign (DKIM) or seal (ARC) for its domain and
/// selector. (Each lives once, behind an `Arc`: the size difference costs nothing.)
#[allow(clippy::large_enum_variant)]
enum Key {
    Rsa(
        DkimSigner<RsaKey<Sha256>, Done>,
        ArcSealer<RsaKey<Sha256>, Done>,
    ),
    Ed25519(DkimSigner<Ed25519Key, Done>, ArcSealer<Ed25519Key, Done>),
}

/// The active key of each domain, and when the folder was read.
struct Loaded {
    keys: HashMap<String, (String, Arc<Key>)>,
    stamp: Vec<(PathBuf, Option<SystemTime>)>,
}

/// Header fields signed when present (and "oversigned" once more, so a field of the
/// same name cannot be added after signing without breaking the signature).
pub const SIGNED_FIELDS: [&str; 12] = [
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

/// Header fields the ARC message signature covers when present: the DKIM set plus the
/// DKIM signatures the message arrived with (RFC 8617 §4.1.2 suggests them).
pub const ARC_SIGNED_FIELDS: [&str; 13] = [
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "DKIM-Signature",
];

/// Signs outbound messages with the active key of their From domain. Rereads the key
/// folder when it changed (a key generated or rotated while the server runs is used for
/// the next message).
pub struct Signer {
    data_dir: PathBuf,
    /// Rank `DKIM_KEYS` (leaf): held to read or replace the loaded set.
    loaded: mailroom_watch::RankedMutex<Arc<Loaded>>,
}

impl Signer {
    /// A signer over `data_dir`'s keys (none yet is fine: nothing is signed).
    pub fn new(data_dir: &Path) -> Signer {
        let signer = Signer {
            data_dir: data_dir.to_path_buf(),
            loaded: mailroom_watch::RankedMutex::new(
                mailroom_watch::rank::DKIM_KEYS,
                "DKIM keys",
                Arc::new(Loaded {
                    keys: HashMap::new(),
                    stamp: Vec::new(),
                }),
            ),
        };
        signer.refresh();
        signer
    }

    /// Modification times of the key folder and each domain's folder.
    fn stamp(&self) -> Vec<(PathBuf, Option<SystemTime>)> {
        let root = keys_dir(&self.data_dir);
        let mut stamp = vec![(root.clone(), modified(&root))];
        if let Ok(entries) = std::fs::read_dir(&root) {
            let mut dirs: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
            dirs.sort();
            for dir in dirs {
                let active = dir.join("active");
                stamp.push((dir.clone(), modified(&dir)));
                stamp.push((active.clone(), modified(&active)));
            }
        }
        stamp
    }

    /// Rereads the keys if the folder changed; a key that does not load is logged and
    /// its domain goes unsigned (mail keeps flowing).
    fn refresh(&self) -> Arc<Loaded> {
        let stamp = self.stamp();
        {
            let loaded = self.loaded.lock();
            if loaded.stamp == stamp {
                return loaded.clone();
            }
        }
        let mut keys = HashMap::new();
        match list(&self.data_dir) {
            Ok(all) => {
                for info in all.into_iter().filter(|k| k.active) {
                    match load_key(&self.data_dir, &info) {
                        Ok(key) => {
                            keys.insert(
                                info.domain.clone(),
                                (info.selector.clone(), Arc::new(key)),
                            );
                        }
                        Err(e) => {
                            tracing::error!(error = %e, domain = info.domain, "DKIM key not loaded; mail from this domain goes unsigned")
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "DKIM keys not read"),
        }
        let loaded = Arc::new(Loaded { keys, stamp });
        *self.loaded.lock() = loaded.clone();
        loaded
    }

    /// The `DKIM-Signature` field (with its CRLF) to put in front of `message`, when
    /// its From domain (or a parent of it) has an active key; `None` otherwise (or if signing failed, which
    /// is logged: the message goes unsigned rather than not at all).
    pub fn sign(&self, message: &[u8]) -> Option<Vec<u8>> {
        let loaded = self.refresh();
        if loaded.keys.is_empty() {
            return None;
        }
        let domain = from_domain(message)?;
        // The From domain's key, else its nearest parent's (DMARC's relaxed alignment:
        // MAILER-DAEMON@mx.example.com is signed with example.com's key).
        let (_, key) = std::iter::successors(Some(domain.as_str()), |d| {
            d.split_once('.').map(|(_, parent)| parent)
        })
        .take_while(|d| d.contains('.'))
        .find_map(|d| loaded.keys.get(d))?;
        let result = match key.as_ref() {
            Key::Rsa(signer, _) => signer.sign(message),
            Key::Ed25519(signer, _) => signer.sign(message),
        };
        match result {
            Ok(signature) => Some(signature.to_header().into_bytes()),
            Err(e) => {
                tracing::error!(error = %e, domain, "DKIM signing failed; sent unsigned");
                None
            }
        }
    }
}

impl Signer {
    /// An ARC set (RFC 8617: `ARC-Seal`, `ARC-Message-Signature` and
    /// `ARC-Authentication-Results`, with their CRLFs) sealing `message` with `domain`'s
    /// active key and these results, to put in front of it; `None` when the domain has
    /// no key, the chain cannot be sealed (it failed before), or sealing failed (logged).
    pub fn arc_seal(
        &self,
        domain: &str,
        message: &AuthenticatedMessage<'_>,
        results: &AuthenticationResults<'_>,
        arc: &ArcOutput<'_>,
    ) -> Option<String> {
        if !arc.can_be_sealed() {
            return None;
        }
        let loaded = self.refresh();
        let (_, key) = loaded.keys.get(&domain.to_ascii_lowercase())?;
        let sealed = match key.as_ref() {
            Key::Rsa(_, sealer) => sealer
                .seal(message, results, arc)
                .map(|set| set.to_header()),
            Key::Ed25519(_, sealer) => sealer
                .seal(message, results, arc)
                .map(|set| set.to_header()),
        };
        match sealed {
            Ok(headers) => Some(headers),
            Err(e) => {
                tracing::error!(error = %e, domain, "ARC sealing failed; forwarded unsealed");
                None
            }
        }
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load_key(data_dir: &Path, info: &KeyInfo) -> Result<Key, DkimError> {
    let path = keys_dir(data_dir).join(&info.domain).join(format!(
        "{}.{}.key",
        info.selector,
        info.algorithm.name()
    ));
    let text = std::fs::read_to_string(&path).map_err(|source| DkimError::Io {
        path: path.clone(),
        source,
    })?;
    let bad = |why: String| DkimError::Key {
        path: path.clone(),
        why,
    };
    let der = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| bad(format!("not base64: {e}")))?;
    // The PKCS#1 and PKCS#8 constructors are marked deprecated in favour of one taking
    // rustls-pki-types' enum; they do the same and spare us that dependency.
    #[allow(deprecated)]
    Ok(match info.algorithm {
        Algorithm::Rsa => {
            let key = || RsaKey::<Sha256>::from_der(&der).map_err(|e| bad(e.to_string()));
            Key::Rsa(
                DkimSigner::from_key(key()?)
                    .domain(info.domain.clone())
                    .selector(info.selector.clone())
                    .headers(SIGNED_FIELDS),
                ArcSealer::from_key(key()?)
                    .domain(info.domain.clone())
                    .selector(info.selector.clone())
                    .headers(ARC_SIGNED_FIELDS),
            )
        }
        Algorithm::Ed25519 => {
            let key = || Ed25519Key::from_pkcs8_der(&der).map_err(|e| bad(e.to_string()));
            Key::Ed25519(
                DkimSigner::from_key(key()?)
                    .domain(info.domain.clone())
                    .selector(info.selector.clone())
                    .headers(SIGNED_FIELDS),
                ArcSealer::from_key(key()?)
                    .domain(info.domain.clone())
                    .selector(info.selector.clone())
                    .headers(ARC_SIGNED_FIELDS),
            )
        }
    })
}

/// The domain of the (first) From address, lower-cased.
fn from_domain(message: &[u8]) -> Option<String> {
    let parsed = mail_parser::MessageParser::new()
        .default_header_raw()
        .header_address(mail_parser::HeaderName::From)
        .parse_headers(message)?;
    let address = parsed.from()?.first()?.address.as_deref()?;
    let (_, domain) = address.rsplit_once('@')?;
    Some(domain.trim().to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: &[u8] =
        b"From: Ann <ann@Example.Test>\r\nTo: bob@remote.test\r\nSubject: hi\r\n\r\nbody\r\n";

    #[test]
    fn keys_are_generated_listed_rotated_and_used_for_their_domain() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::new(dir.path());
        assert_eq!(signer.sign(MESSAGE), None, "no key: unsigned");
        let first = generate(dir.path(), "Example.Test.", "s1", Algorithm::Ed25519).unwrap();
        assert_eq!(first.domain, "example.test");
        assert_eq!(first.record_name, "s1._domainkey.example.test");
        assert!(first.record_value.starts_with("v=DKIM1; k=ed25519; p="));
        // The running signer picks the new key up at the next message.
        let header = String::from_utf8(signer.sign(MESSAGE).expect("signed")).unwrap();
        assert!(header.starts_with("DKIM-Signature: "), "{header}");
        assert!(header.contains("a=ed25519-sha256"), "{header}");
        assert!(header.contains("d=example.test"), "{header}");
        assert!(header.contains("s=s1"), "{header}");
        assert!(header.ends_with("\r\n"), "{header}");
        // Rotation: a new selector becomes the active one; the old one stays listed.
        generate(dir.path(), "example.test", "s2", Algorithm::Rsa).unwrap();
        let keys = list(dir.path()).unwrap();
        let summary: Vec<(&str, Algorithm, bool)> = keys
            .iter()
            .map(|k| (k.selector.as_str(), k.algorithm, k.active))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("s1", Algorithm::Ed25519, false),
                ("s2", Algorithm::Rsa, true)
            ]
        );
        assert!(keys[1].record_value.starts_with("v=DKIM1; k=rsa; p=MII"));
        let header = String::from_utf8(signer.sign(MESSAGE).expect("signed")).unwrap();
        assert!(
            header.contains("a=rsa-sha256") && header.contains("s=s2"),
            "{header}"
        );
        // Other domains go unsigned; an existing selector is not overwritten.
        assert_eq!(signer.sign(b"From: x@other.test\r\n\r\nbody\r\n"), None);
        assert_eq!(
            signer.sign(b"From: x@badexample.test\r\n\r\nbody\r\n"),
            None
        );
        // A subdomain (the host name in MAILER-DAEMON@mx.example.test) uses the
        // parent's key: aligned for DMARC.
        let header = String::from_utf8(
            signer
                .sign(b"From: MAILER-DAEMON@mx.example.test\r\n\r\nbody\r\n")
                .expect("signed with the parent's key"),
        )
        .unwrap();
        assert!(header.contains("d=example.test"), "{header}");
        let e = generate(dir.path(), "example.test", "s1", Algorithm::Rsa).unwrap_err();
        assert!(e.to_string().contains("already has a key"), "{e}");
        for (domain, selector) in [("exa mple.test", "s"), ("example.test", "a/b"), ("", "s")] {
            assert!(generate(dir.path(), domain, selector, Algorithm::Ed25519).is_err());
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let key = keys_dir(dir.path()).join("example.test").join("s2.rsa.key");
            let mode = std::fs::metadata(key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_damaged_key_leaves_its_domain_unsigned_and_others_signed() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), "example.test", "s1", Algorithm::Ed25519).unwrap();
        generate(dir.path(), "other.test", "s1", Algorithm::Ed25519).unwrap();
        std::fs::write(
            keys_dir(dir.path())
                .join("example.test")
                .join("s1.ed25519.key"),
            "garbage",
        )
        .unwrap();
        let signer = Signer::new(dir.path());
        assert_eq!(signer.sign(MESSAGE), None);
        assert!(signer.sign(b"From: x@other.test\r\n\r\nbody\r\n").is_some());
    }
}
