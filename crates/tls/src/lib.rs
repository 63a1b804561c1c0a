//! TLS for every listener (SMTP STARTTLS, submission, IMAP, POP3 and their implicit-TLS
//! ports): the certificates, the rustls configuration built from them, and its reload.
//!
//! Why one crate: every protocol needs the same answer to "which certificate do I
//! serve", and an administrator expects one place to configure it and one command
//! (`mailroom tls show`) to see it. What it does:
//!
//! - Certificates come from PEM files named in the config (`[[tls.certificates]]`,
//!   each a chain and its key); with several, the client's SNI chooses (an exact name,
//!   then a `*.` wildcard, then the first configured).
//! - With none configured, the first start makes a self-signed certificate for the
//!   server's name in the data folder (`tls/self-signed.pem`, key `tls/self-signed.key`,
//!   mode 0600), so TLS works out of the box and clients can pin it.
//! - TLS 1.3 and 1.2 only, with rustls's default suites (AEAD only, forward secrecy):
//!   nothing weak to switch off.
//! - [`Tls::reload`] reads the files again and swaps the configuration atomically
//!   ([`arc_swap`]): sessions already encrypted keep theirs, new handshakes get the new
//!   one. [`spawn_reloader`] calls it on SIGHUP and when a file's modification time
//!   changes. A file that does not load leaves the old certificates in service and is
//!   logged with its path.
//! - [`acme`]: certificates from an ACME CA (Let's Encrypt) over HTTP-01, renewed
//!   before they end, written in the data folder and reloaded like any other.

pub mod acme;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// The chain: the server's certificate first, then intermediates.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why TLS could not be set up. Each names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A certificate file holds no certificate, or one that does not parse.
    #[error("{path}: {why}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A key file holds no usable private key.
    #[error("{path}: {why}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Making the self-signed certificate failed.
    #[error("generating a self-signed certificate: {0}")]
    Generate(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// What one served certificate is, for `mailroom tls show` and the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// The chain's file.
    pub cert_file: PathBuf,
    /// The DNS names it is valid for (subject alternative names, else the common name).
    pub names: Vec<String>,
    /// Its subject, as text.
    pub subject: String,
    /// Its issuer, as text (the subject again when self-signed).
    pub issuer: String,
    /// Valid from, Unix seconds.
    pub not_before: i64,
    /// Valid until, Unix seconds.
    pub not_after: i64,
    /// SHA-256 of the certificate (DER), hex pairs joined by `:`, as browsers and
    /// `openssl x509 -fingerprint -sha256` print it.
    pub sha256: String,
}

/// What the loaded files gave: the resolver's certificates and their descriptions.
struct Loaded {
    config: Arc<rustls::ServerConfig>,
    served: Vec<Served>,
    /// Each file's modification time when it was read (cert, key per entry).
    stamps: Vec<(Option<SystemTime>, Option<SystemTime>)>,
}

/// The TLS state of a server: which files, and the configuration they give now.
pub struct Tls {
    files: Vec<CertificateFiles>,
    loaded: ArcSwap<Loaded>,
    /// True when the certificate is the generated self-signed one.
    self_signed: bool,
}

/// Where the self-signed certificate lives in the data folder.
pub fn self_signed_files(data_dir: &Path) -> CertificateFiles {
    CertificateFiles {
        cert: data_dir.join("tls").join("self-signed.pem"),
        key: data_dir.join("tls").join("self-signed.key"),
    }
}

impl Tls {
    /// Loads the configured certificates, or (none configured) the self-signed one in
    /// `data_dir`, made for `hostname` if it does not exist yet.
    pub fn start(
        configured: &[CertificateFiles],
        data_dir: &Path,
        hostname: &str,
    ) -> Result<Arc<Tls>, TlsError> {
        let (files, self_signed) = if configured.is_empty() {
            let files = self_signed_files(data_dir);
            let renew_after = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
                + SELF_SIGNED_RENEW_DAYS * 86_400;
            let expiring = files.cert.exists()
                && load_pair(&files).is_ok_and(|(served, _)| served.not_after < renew_after);
            if expiring {
                tracing::info!(cert = %files.cert.display(), "the self-signed TLS certificate expires soon: making a new one");
            }
            if expiring || !files.cert.exists() || !files.key.exists() {
                generate_self_signed(&files, hostname)?;
                tracing::info!(
                    cert = %files.cert.display(),
                    hostname,
                    "generated a self-signed TLS certificate (configure [[tls.certificates]] for a real one)"
                );
            }
            (vec![files], true)
        } else {
            (configured.to_vec(), false)
        };
        let loaded = load(&files)?;
        Ok(Arc::new(Tls {
            files,
            loaded: ArcSwap::from_pointee(loaded),
            self_signed,
        }))
    }

    /// Serves the ACME certificate of `data_dir` (see [`acme`]); until one is issued,
    /// or when its files do not load, a self-signed placeholder for `hostname` written
    /// in its place.
    pub fn start_acme(data_dir: &Path, hostname: &str) -> Result<Arc<Tls>, TlsError> {
        let files = acme::acme_files(data_dir);
        if let Err(e) = load_pair(&files) {
            if files.cert.exists() {
                tracing::warn!(error = %e, "the ACME certificate does not load; serving a self-signed placeholder until a new one is issued");
            }
            generate_self_signed(&files, hostname)?;
        }
        let loaded = load(std::slice::from_ref(&files))?;
        Ok(Arc::new(Tls {
            files: vec![files],
            loaded: ArcSwap::from_pointee(loaded),
            self_signed: false,
        }))
    }

    /// The rustls configuration for a handshake starting now.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.loaded.load().config.clone()
    }

    /// An acceptor for a handshake starting now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config())
    }

    /// What is served now.
    pub fn served(&self) -> Vec<Served> {
        self.loaded.load().served.clone()
    }

    /// Whether the certificate is the generated self-signed one.
    pub fn is_self_signed(&self) -> bool {
        self.self_signed
    }

    /// The files in use.
    pub fn files(&self) -> &[CertificateFiles] {
        &self.files
    }

    /// Whether a file changed (or appeared, or went) since it was last read.
    pub fn changed(&self) -> bool {
        let loaded = self.loaded.load();
        self.files
            .iter()
            .zip(&loaded.stamps)
            .any(|(files, stamp)| (modified(&files.cert), modified(&files.key)) != *stamp)
    }

    /// Reads the files again and serves what they hold from the next handshake on. On
    /// an error the certificates in service stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = load(&self.files)?;
        for served in &loaded.served {
            tracing::info!(
                cert = %served.cert_file.display(),
                names = ?served.names,
                sha256 = %served.sha256,
                "TLS certificate loaded"
            );
        }
        self.loaded.store(Arc::new(loaded));
        Ok(())
    }
}

/// A connection's byte stream, plain or encrypted: what a listener's driver reads and
/// writes, so STARTTLS can swap one for the other in the middle of a session.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A boxed [`Io`].
pub type BoxedIo = Box<dyn Io>;

/// How long a client may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the server side of a TLS handshake on `stream` (implicit TLS, or after
/// STARTTLS), within [`HANDSHAKE_TIMEOUT`].
pub async fn accept(tls: &Tls, stream: BoxedIo) -> std::io::Result<BoxedIo> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor().accept(stream)).await {
        Ok(Ok(encrypted)) => Ok(Box::new(encrypted)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "TLS handshake not completed in time",
        )),
    }
}

/// How often the files are checked for changes.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Reloads `tls` on SIGHUP and whenever a file changes (checked every
/// [`RELOAD_CHECK_INTERVAL`]), until `cancel` fires.
pub fn spawn_reloader(tls: Arc<Tls>, cancel: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let signalled = async {
                match &mut hangup {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let signalled = std::future::pending::<()>();
            let reason = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = signalled => "SIGHUP",
                _ = tokio::time::sleep(RELOAD_CHECK_INTERVAL) => {
                    if !tls.changed() {
                        continue;
                    }
                    "a certificate file changed"
                }
            };
            match tls.reload() {
                Ok(()) => tracing::info!(reason, "TLS certificates reloaded"),
                Err(e) => tracing::error!(
                    reason,
                    error = %e,
                    "TLS certificates not reloaded; the previous ones stay in service"
                ),
            }
        }
    });
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// How long a generated self-signed certificate is valid: 825 days, the longest some
/// clients (Apple's) accept for a TLS server certificate. A start within
/// [`SELF_SIGNED_RENEW_DAYS`] of its end makes a new one.
pub const SELF_SIGNED_DAYS: i64 = 825;

/// See [`SELF_SIGNED_DAYS`].
pub const SELF_SIGNED_RENEW_DAYS: i64 = 30;

fn generate_self_signed(files: &CertificateFiles, hostname: &str) -> Result<(), TlsError> {
    let mut names = vec![hostname.to_string()];
    if hostname != "localhost" {
        names.push("localhost".to_string());
    }
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut params = rcgen::CertificateParams::new(names).map_err(generate)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Mailroom (self-signed)");
    let today = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
        .div_euclid(86_400);
    let date = |days: i64| {
        let (year, month, day) = civil(days);
        rcgen::date_time_ymd(year, month, day)
    };
    params.not_before = date(today - 1);
    params.not_after = date(today + SELF_SIGNED_DAYS);
    let key = rcgen::KeyPair::generate().map_err(generate)?;
    let cert = params.self_signed(&key).map_err(generate)?;
    let certified = rcgen::CertifiedKey {
        cert,
        signing_key: key,
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    if let Some(dir) = files.cert.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    mailroom_watch::durable::write_replacing(
        &files.key,
        certified.signing_key.serialize_pem().as_bytes(),
        true,
    )
    .map_err(io(&files.key))?;
    mailroom_watch::durable::write_replacing(&files.cert, certified.cert.pem().as_bytes(), false)
        .map_err(io(&files.cert))?;
    Ok(())
}

/// (year, month, day) of a day counted from 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i32, u8, u8) {
    let (year, month, day) = mailroom_watch::civil::civil_from_days(days);
    (year as i32, month as u8, day as u8)
}

fn load(files: &[CertificateFiles]) -> Result<Loaded, TlsError> {
    let mut keys: Vec<(Vec<String>, Arc<CertifiedKey>)> = Vec::new();
    let mut served = Vec::new();
    let mut stamps = Vec::new();
    for pair in files {
        stamps.push((modified(&pair.cert), modified(&pair.key)));
        let (facts, certified) = load_pair(pair)?;
        keys.push((facts.names.clone(), Arc::new(certified)));
        served.push(facts);
    }
    let resolver = Sni::new(keys).ok_or_else(|| TlsError::Config("no certificate".into()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| TlsError::Config(e.to_string()))?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(resolver));
    Ok(Loaded {
        config: Arc::new(config),
        served,
        stamps,
    })
}

/// One chain and its key, checked to belong together.
fn load_pair(pair: &CertificateFiles) -> Result<(Served, CertifiedKey), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(&pair.cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Certificate {
            path: pair.cert.clone(),
            why: format!("not PEM certificates: {e}"),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::Certificate {
            path: pair.cert.clone(),
            why: "no certificate in the file".into(),
        });
    };
    let facts = describe(&pair.cert, leaf)?;
    let key_pem = read(&pair.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Key {
        path: pair.key.clone(),
        why: format!("no private key found: {e}"),
    })?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| TlsError::Key {
            path: pair.key.clone(),
            why: format!("unsupported key: {e}"),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| TlsError::Key {
        path: pair.key.clone(),
        why: format!("does not belong to {}: {e}", pair.cert.display()),
    })?;
    Ok((facts, certified))
}

/// The facts of a certificate, from its DER.
fn describe(path: &Path, der: &CertificateDer<'_>) -> Result<Served, TlsError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| TlsError::Certificate {
        path: path.to_path_buf(),
        why: format!("does not parse as X.509: {e}"),
    })?;
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    let sha256 = digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok(Served {
        cert_file: path.to_path_buf(),
        names,
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        sha256,
    })
}

/// Chooses a certificate by the name the client asked for (SNI): an exact name, then
/// a wildcard for its parent, then the first configured (clients that send no SNI, or
/// a name we do not have, get that one).
#[derive(Debug)]
struct Sni {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl Sni {
    fn new(keys: Vec<(Vec<String>, Arc<CertifiedKey>)>) -> Option<Sni> {
        let default = keys.first()?.1.clone();
        let mut by_name = HashMap::new();
        for (names, key) in keys {
            for name in names {
                // The first certificate configured for a name wins.
                by_name.entry(name).or_insert_with(|| key.clone());
            }
        }
        Some(Sni { by_name, default })
    }

    fn choose(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name.map(str::to_ascii_lowercase) else {
            return self.default.clone();
        };
        if let Some(key) = self.by_name.get(&name) {
            return key.clone();
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(key) = self.by_name.get(&format!("*.{parent}"))
        {
            return key.clone();
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for Sni {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.choose(client_hello.server_name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, stem: &str, names: &[&str]) -> CertificateFiles {
        let certified = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<String>>(),
        )
        .unwrap();
        let files = CertificateFiles {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, certified.cert.pem()).unwrap();
        std::fs::write(&files.key, certified.signing_key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn a_first_start_makes_a_private_self_signed_certificate_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let tls = Tls::start(&[], dir.path(), "mx.example.test").unwrap();
        assert!(tls.is_self_signed());
        let served = tls.served();
        assert_eq!(served.len(), 1);
        assert_eq!(served[0].names, vec!["mx.example.test", "localhost"]);
        assert_eq!(
            served[0].subject,
            "CN=mx.example.test, O=Mailroom (self-signed)"
        );
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let days = (served[0].not_after - now) / 86_400;
        assert!(
            (SELF_SIGNED_DAYS - 2..=SELF_SIGNED_DAYS).contains(&days),
            "{days}"
        );
        assert!(served[0].not_before <= now);
        assert_eq!(served[0].sha256.len(), 32 * 3 - 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let files = self_signed_files(dir.path());
            let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the key is private");
        }
        // The next start serves the same certificate (clients may have pinned it).
        let again = Tls::start(&[], dir.path(), "mx.example.test").unwrap();
        assert_eq!(again.served()[0].sha256, served[0].sha256);
    }

    #[test]
    fn sni_chooses_exact_names_then_wildcards_then_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let files = vec![
            pair(dir.path(), "main", &["mail.example.test"]),
            pair(dir.path(), "other", &["imap.other.test", "*.wild.test"]),
        ];
        let tls = Tls::start(&files, dir.path(), "ignored").unwrap();
        assert!(!tls.is_self_signed());
        assert_eq!(tls.served().len(), 2);
        let keys = files
            .iter()
            .map(|pair| {
                let (facts, key) = load_pair(pair).unwrap();
                (facts.names, Arc::new(key))
            })
            .collect();
        let sni = Sni::new(keys).unwrap();
        let leaf = |name: Option<&str>| sni.choose(name).cert[0].clone();
        let main = leaf(Some("mail.example.test"));
        let other = leaf(Some("imap.other.test"));
        assert_ne!(main, other);
        assert_eq!(
            leaf(Some("IMAP.Other.Test")),
            other,
            "names are case-insensitive"
        );
        assert_eq!(
            leaf(Some("mx.wild.test")),
            other,
            "a wildcard covers one label"
        );
        assert_eq!(leaf(Some("a.b.wild.test")), main, "and only one");
        assert_eq!(leaf(Some("unknown.test")), main);
        assert_eq!(leaf(None), main);
    }

    #[test]
    fn bad_files_are_named_and_a_failed_reload_keeps_what_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let good = pair(dir.path(), "good", &["mail.example.test"]);
        let other = pair(dir.path(), "other", &["other.test"]);
        let tls = Tls::start(std::slice::from_ref(&good), dir.path(), "x").unwrap();
        let before = tls.served();
        // A key that belongs to another certificate.
        let mismatched = CertificateFiles {
            cert: good.cert.clone(),
            key: other.key.clone(),
        };
        let e = Tls::start(&[mismatched], dir.path(), "x").err().unwrap();
        assert!(e.to_string().contains("other.key"), "{e}");
        // Garbage where the certificate was: the reload fails, naming the file, and the
        // old certificate stays in service.
        std::fs::write(&good.cert, "not a certificate").unwrap();
        assert!(tls.changed());
        let e = tls.reload().unwrap_err();
        assert!(e.to_string().contains("good.pem"), "{e}");
        assert_eq!(tls.served(), before);
        // A new certificate in its place is served after the reload.
        let replacement = pair(dir.path(), "replacement", &["new.example.test"]);
        std::fs::copy(&replacement.cert, &good.cert).unwrap();
        std::fs::copy(&replacement.key, &good.key).unwrap();
        tls.reload().unwrap();
        assert_eq!(tls.served()[0].names, vec!["new.example.test"]);
        let missing = CertificateFiles {
            cert: dir.path().join("nope.pem"),
            key: good.key.clone(),
        };
        let e = Tls::start(&[missing], dir.path(), "x").err().unwrap();
        assert!(e.to_string().contains("nope.pem"), "{e}");
    }
}
