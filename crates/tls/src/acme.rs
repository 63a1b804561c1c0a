//! Certificates from an ACME CA (RFC 8555: Let's Encrypt, or any other), proved with
//! HTTP-01 on a small HTTP listener of our own.
//!
//! Why HTTP-01: a mail server has no HTTPS listener for TLS-ALPN-01 (port 443) and
//! usually no DNS API for DNS-01, while port 80 is easy to give it. The protocol is
//! instant-acme's; what is ours is when to ask and where the result goes.
//!
//! The certificate lives in `<data>/tls/acme/` (`cert.pem`, `key.pem` mode 0600, the
//! account's credentials in `account.json` 0600). Until the first one is issued those
//! files hold a self-signed placeholder, so TLS works from the first second; the task
//! replaces them and reloads [`Tls`], without dropping a session. It renews
//! [`RENEW_DAYS`] before expiry, and after a failure tries again after 1 minute,
//! doubling up to 6 hours, logging each error.

use crate::{Tls, TlsError};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use mailroom_watch::RankedMutex;
use mailroom_watch::durable::write_replacing;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Renew this many days before the certificate ends (Let's Encrypt's are 90 days).
pub const RENEW_DAYS: i64 = 30;

/// Let's Encrypt's production directory, what `tls.acme.directory = "letsencrypt"` means.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// What to ask for, and from whom.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The CA's directory URL.
    pub directory: String,
    /// Contact addresses for the account (`mailto:` URLs).
    pub contact: Vec<String>,
    /// The names the certificate covers (the first is its subject).
    pub names: Vec<String>,
    /// A PEM root to trust for the CA's own HTTPS (test CAs such as pebble); none:
    /// the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The data folder.
    pub data_dir: PathBuf,
}

/// The files of the ACME certificate in the data folder.
pub fn acme_files(data_dir: &Path) -> crate::CertificateFiles {
    let dir = data_dir.join("tls").join("acme");
    crate::CertificateFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    }
}

/// Tokens being proved now, and the key authorization to answer each with. The lock is
/// a leaf (rank `ACME_CHALLENGES`), held for one lookup, insert or removal.
#[derive(Clone)]
pub struct Challenges(Arc<RankedMutex<HashMap<String, String>>>);

impl Default for Challenges {
    fn default() -> Self {
        Challenges(Arc::new(RankedMutex::new(
            mailroom_watch::rank::ACME_CHALLENGES,
            "ACME challenges",
            HashMap::new(),
        )))
    }
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges").finish_non_exhaustive()
    }
}

impl Challenges {
    fn answer(&self, token: &str) -> Option<String> {
        self.0.lock().get(token).cloned()
    }
}

/// Serves HTTP-01 answers (`GET /.well-known/acme-challenge/<token>`) on `listener`
/// until `cancel` fires. Everything else is 404; requests are read with a 2 KiB and
/// 10 s budget, one per connection.
pub fn serve_http01(listener: TcpListener, challenges: Challenges, cancel: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(64));
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = tokio::select! {
                _ = cancel.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "ACME HTTP-01 listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // At most 64 connections at once; more are closed unanswered.
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let challenges = challenges.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let mut request = Vec::with_capacity(512);
                let mut buffer = [0u8; 512];
                let read = tokio::time::timeout(Duration::from_secs(10), async {
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 2048 {
                        let n = stream.read(&mut buffer).await?;
                        if n == 0 {
                            break;
                        }
                        request.extend_from_slice(&buffer[..n]);
                    }
                    Ok::<_, std::io::Error>(())
                })
                .await;
                if !matches!(read, Ok(Ok(()))) {
                    return;
                }
                let line = request.split(|b| *b == b'\r').next().unwrap_or_default();
                let line = String::from_utf8_lossy(line);
                let mut words = line.split(' ');
                let answer = match (words.next(), words.next()) {
                    (Some("GET"), Some(path)) => path
                        .strip_prefix("/.well-known/acme-challenge/")
                        .and_then(|token| challenges.answer(token)),
                    _ => None,
                };
                let response = match answer {
                    Some(body) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                    None => {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_string()
                    }
                };
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
}

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The CA refused or failed, or could not be reached.
    #[error("ACME: {0}")]
    Protocol(#[from] instant_acme::Error),
    /// The order ended in a state other than ready or valid.
    #[error("ACME order for {names:?} is {status}")]
    Order {
        /// The names asked for.
        names: Vec<String>,
        /// Its state.
        status: String,
    },
    /// Writing the files failed.
    #[error(transparent)]
    Files(#[from] TlsError),
}

/// Whether the served ACME files need a (new) certificate now: a placeholder (self-
/// signed), one not covering every name, or one within [`RENEW_DAYS`] of its end.
pub fn needs_certificate(tls: &Tls, names: &[String]) -> bool {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let served = tls.served();
    let Some(current) = served.first() else {
        return true;
    };
    current.issuer == current.subject
        || current.not_after - RENEW_DAYS * 86_400 <= now
        || names.iter().any(|n| !current.names.contains(n))
}

/// Runs the ACME task: obtains a certificate when [`needs_certificate`] says so, writes
/// it, reloads `tls`; checks again every 12 hours; retries failures with backoff.
pub fn spawn_acme(
    tls: Arc<Tls>,
    settings: AcmeSettings,
    challenges: Challenges,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_secs(60);
        loop {
            let wait = if needs_certificate(&tls, &settings.names) {
                match obtain(&settings, &challenges).await {
                    Ok(()) => match tls.reload() {
                        Ok(()) => {
                            backoff = Duration::from_secs(60);
                            tracing::info!(names = ?settings.names, directory = %settings.directory, "ACME certificate issued and in service");
                            Duration::from_secs(12 * 3600)
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "ACME certificate written but not loaded");
                            backoff
                        }
                    },
                    Err(e) => {
                        tracing::error!(error = %e, names = ?settings.names, directory = %settings.directory, retry_in_secs = backoff.as_secs(), "ACME certificate not obtained");
                        let wait = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(6 * 3600));
                        wait
                    }
                }
            } else {
                Duration::from_secs(12 * 3600)
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    });
}

async fn account(settings: &AcmeSettings) -> Result<Account, AcmeError> {
    let builder = || match &settings.ca_file {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    };
    let path = acme_files(&settings.data_dir)
        .cert
        .with_file_name("account.json");
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(credentials) = serde_json::from_str::<AccountCredentials>(&text)
    {
        return Ok(builder()?.from_credentials(credentials).await?);
    }
    let contact: Vec<&str> = settings.contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder()?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            settings.directory.clone(),
            None,
        )
        .await?;
    let text = serde_json::to_string_pretty(&credentials).expect("credentials serialise");
    write_replacing(&path, text.as_bytes(), true).map_err(|source| TlsError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(account)
}

/// One order: HTTP-01 for every name, then the certificate and key written in place.
pub async fn obtain(settings: &AcmeSettings, challenges: &Challenges) -> Result<(), AcmeError> {
    let account = account(settings).await?;
    let identifiers: Vec<Identifier> = settings
        .names
        .iter()
        .map(|n| Identifier::Dns(n.clone()))
        .collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut tokens = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization?;
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(AcmeError::Order {
                    names: settings.names.clone(),
                    status: format!("{other:?} (authorization)"),
                });
            }
        }
        let mut challenge = authorization
            .challenge(ChallengeType::Http01)
            .ok_or_else(|| AcmeError::Order {
                names: settings.names.clone(),
                status: "without an HTTP-01 challenge".into(),
            })?;
        let token = challenge.token.clone();
        let answer = challenge.key_authorization().as_str().to_string();
        challenges.0.lock().insert(token.clone(), answer);
        tokens.push(token);
        challenge.set_ready().await?;
    }
    let result = async {
        let status = order.poll_ready(&RetryPolicy::default()).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Order {
                names: settings.names.clone(),
                status: format!("{status:?}"),
            });
        }
        let key = order.finalize().await?;
        let chain = order.poll_certificate(&RetryPolicy::default()).await?;
        Ok((key, chain))
    }
    .await;
    for token in tokens {
        challenges.0.lock().remove(&token);
    }
    let (key, chain) = result?;
    let files = acme_files(&settings.data_dir);
    // Both written beside, then renamed into place: a reload never reads half a file.
    // A crash between the renames leaves a pair that does not match, which the next
    // start replaces with a placeholder and a new order.
    let fresh = |path: &Path| path.with_extension("pem.new");
    for (path, bytes, private) in [
        (&files.key, key.as_bytes(), true),
        (&files.cert, chain.as_bytes(), false),
    ] {
        write_replacing(&fresh(path), bytes, private).map_err(|source| TlsError::Io {
            path: fresh(path),
            source,
        })?;
    }
    for path in [&files.key, &files.cert] {
        std::fs::rename(fresh(path), path).map_err(|source| TlsError::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn ask(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer))
            .await
            .expect("the listener closes the connection");
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// The HTTP-01 listener answers tokens being proved, 404 for anything else, and
    /// stops reading a request whose header does not end within 2 KiB.
    #[tokio::test]
    async fn http01_answers_only_pending_tokens() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let challenges = Challenges::default();
        challenges
            .0
            .lock()
            .insert("tok123".into(), "tok123.thumb".into());
        let cancel = CancellationToken::new();
        serve_http01(listener, challenges.clone(), cancel.clone());
        let answer = ask(
            addr,
            b"GET /.well-known/acme-challenge/tok123 HTTP/1.1\r\nHost: mx\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\ntok123.thumb"), "{answer}");
        for request in [
            &b"GET /.well-known/acme-challenge/other HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\n\r\n",
            b"POST /.well-known/acme-challenge/tok123 HTTP/1.1\r\n\r\n",
        ] {
            let answer = ask(addr, request).await;
            assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");
        }
        // Past 2 KiB without the end of a header: closed (with a 404, which the client
        // may not see when the close resets the connection), not read on.
        let endless = vec![b'A'; 8 * 1024];
        let answer = ask(addr, &endless).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 404 "),
            "{answer}"
        );
        cancel.cancel();
    }
}
