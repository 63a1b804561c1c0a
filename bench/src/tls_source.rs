//! An SMTP load generator that speaks STARTTLS, since Postfix's smtp-source does not:
//! `sessions` concurrent clients, each message on a new connection (connect, EHLO,
//! STARTTLS and the TLS handshake, EHLO, MAIL, RCPT, DATA, QUIT), as a sender on the
//! Internet would. Prints one JSON line: messages, seconds, messages per second.
//!
//! Certificates are not verified (the bench servers use self-signed ones; the cost of
//! the handshake is the same), so a broken chain does not stop the measurement.

use anyhow::{Context, bail};
use clap::Parser;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    /// The server, `host:port`.
    addr: String,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 20)]
    sessions: usize,
    /// Messages in all.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Message size in bytes (generated), unless --message is given.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Send this file as the message (CRLF lines, e.g. a DKIM-signed one).
    #[arg(long)]
    message: Option<std::path::PathBuf>,
    /// Without STARTTLS (for comparison).
    #[arg(long)]
    plain: bool,
    /// Envelope sender.
    #[arg(long, default_value = "bench@bench.test")]
    from: String,
    /// Envelope recipient.
    #[arg(long, default_value = "user@example.test")]
    to: String,
}

/// Accepts any certificate: the bench measures the cost of TLS, not the chain.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Reads one reply (all its lines); fails unless its code starts with `want`.
async fn expect<R: AsyncRead + Unpin>(reader: &mut BufReader<R>, want: char) -> anyhow::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            bail!("connection closed");
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            break;
        }
    }
    if !line.starts_with(want) {
        bail!("unexpected reply: {}", line.trim_end());
    }
    Ok(())
}

async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    args: &Args,
    data: &[u8],
    greeted: bool,
) -> anyhow::Result<()> {
    let mut stream = BufReader::new(stream);
    if !greeted {
        expect(&mut stream, '2').await?;
    }
    stream.write_all(b"EHLO bench.test\r\n").await?;
    expect(&mut stream, '2').await?;
    stream
        .write_all(format!("MAIL FROM:<{}>\r\n", args.from).as_bytes())
        .await?;
    expect(&mut stream, '2').await?;
    stream
        .write_all(format!("RCPT TO:<{}>\r\n", args.to).as_bytes())
        .await?;
    expect(&mut stream, '2').await?;
    stream.write_all(b"DATA\r\n").await?;
    expect(&mut stream, '3').await?;
    stream.write_all(data).await?;
    stream.write_all(b".\r\n").await?;
    expect(&mut stream, '2').await?;
    stream.write_all(b"QUIT\r\n").await?;
    let _ = expect(&mut stream, '2').await;
    Ok(())
}

async fn one(args: &Args, data: &[u8], tls: &tokio_rustls::TlsConnector) -> anyhow::Result<()> {
    let tcp = TcpStream::connect(&args.addr).await?;
    tcp.set_nodelay(true)?;
    if args.plain {
        return transaction(tcp, args, data, false).await;
    }
    let mut stream = BufReader::new(tcp);
    expect(&mut stream, '2').await?;
    stream.write_all(b"EHLO bench.test\r\n").await?;
    expect(&mut stream, '2').await?;
    stream.write_all(b"STARTTLS\r\n").await?;
    expect(&mut stream, '2').await?;
    let tcp = stream.into_inner();
    let host = args.addr.rsplit_once(':').map_or("localhost", |(h, _)| h);
    let name = rustls::pki_types::ServerName::try_from(host.to_string())?;
    let encrypted = tls.connect(name, tcp).await.context("TLS handshake")?;
    transaction(encrypted, args, data, true).await
}

fn message(args: &Args) -> anyhow::Result<Vec<u8>> {
    if let Some(path) = &args.message {
        let mut text = std::fs::read(path)?;
        if !text.ends_with(b"\r\n") {
            text.extend_from_slice(b"\r\n");
        }
        return Ok(text);
    }
    let mut text = format!(
        "From: <{}>\r\nTo: <{}>\r\nSubject: bench\r\nMessage-ID: <bench@bench.test>\r\n\r\n",
        args.from, args.to
    )
    .into_bytes();
    while text.len() < args.size {
        text.extend_from_slice(
            b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n",
        );
    }
    Ok(text)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let data = Arc::new(message(&args)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    // Every connection does a full handshake, as a new sender would.
    let mut config = config;
    config.resumption = rustls::client::Resumption::disabled();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.sessions.max(1) {
        let (args, data, tls, next, failed) = (
            args.clone(),
            data.clone(),
            tls.clone(),
            next.clone(),
            failed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < args.messages {
                if let Err(e) = one(&args, &data, &tls).await
                    && failed.fetch_add(1, Ordering::Relaxed) == 0
                {
                    eprintln!("tls-source: {e:#}");
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "messages": args.messages,
            "failed": failed,
            "seconds": seconds,
            "rate": (args.messages - failed) as f64 / seconds,
        })
    );
    if failed > 0 {
        bail!("{failed} of {} messages failed", args.messages);
    }
    Ok(())
}
