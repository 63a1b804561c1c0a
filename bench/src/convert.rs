//! Inbound conversion against `mail-parser` alone, on the same generated corpus.
//!
//! The corpus is what real mail looks like: plain text, multipart/alternative,
//! attachments (base64), quoted-printable bodies, non-ASCII headers (RFC 2047), and a
//! forwarded message (nested message/rfc822). The baseline parses every message with
//! `mail-parser` on as many threads as Mailroom's conversion workers and walks its parts;
//! Mailroom's number is the whole inbound conversion: claiming from the spool, parsing
//! with a time budget, resolving recipients and delivering into the store in one
//! transaction per batch. The ratio (Mailroom time / parse time) is our overhead.
//!
//! Prints one JSON object: messages, bytes, and for each side seconds, msg/s and MB/s.

use clap::Parser;
use mail_builder::MessageBuilder;
use mail_builder::headers::address::Address;
use mail_builder::mime::{BodyPart, MimePart};
use mailroom_directory::{Change, Directory, RecipientFields, RecipientKind, SiteConfig};
use mailroom_store::{MailStore, SpoolEntry, SqliteStore, Topology};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Messages in the corpus.
    #[arg(long, default_value_t = 3000)]
    messages: usize,
    /// Conversion workers (and baseline parser threads); 0: one per CPU.
    #[arg(long, default_value_t = 0)]
    workers: usize,
}

fn corpus_message(i: usize) -> Vec<u8> {
    let filler = "The quarterly figures are attached; see the notes below. ".repeat(20);
    let builder = MessageBuilder::new()
        .from(Address::new_address(
            Some("Zoë Ångström"),
            "zoe@sender.example",
        ))
        .to("user@example.test")
        .subject(format!("Réunion n°{i}: café, Übersicht und 日本語"))
        .message_id(format!("corpus-{i}@sender.example"));
    let built = match i % 6 {
        0 => builder.text_body(format!("{filler}\r\n-- \r\nplain {i}\r\n")),
        1 => builder
            .text_body(format!("{filler}\r\nalternative {i}\r\n"))
            .html_body(format!(
                "<html><body><p>{filler}</p><p>alternative {i}</p></body></html>"
            )),
        2 => builder
            .text_body(format!("see the attachment {i}\r\n"))
            .attachment(
                "application/pdf",
                "figures.pdf",
                (0..24_000u32)
                    .map(|n| (n * 31 + i as u32) as u8)
                    .collect::<Vec<u8>>(),
            ),
        3 => builder.body(
            MimePart::new(
                "text/plain; charset=utf-8",
                BodyPart::Text(
                    format!("Grüße aus Zürich, façade, naïve, coöperate — {filler} {i}\r\n").into(),
                ),
            )
            .transfer_encoding("quoted-printable"),
        ),
        4 => {
            let inner = MessageBuilder::new()
                .from("colleague@elsewhere.example")
                .to("zoe@sender.example")
                .subject(format!("original {i}"))
                .text_body(filler.clone())
                .write_to_vec()
                .expect("writes");
            builder.body(MimePart::new(
                "multipart/mixed",
                BodyPart::Multipart(vec![
                    MimePart::new("text/plain", BodyPart::Text("forwarded below\r\n".into())),
                    MimePart::new("message/rfc822", BodyPart::Binary(inner.into()))
                        .transfer_encoding("7bit"),
                ]),
            ))
        }
        _ => builder
            .text_body(format!("two attachments {i}\r\n"))
            .attachment("image/png", "a.png", vec![0x89u8; 8_000])
            .attachment("text/csv", "b.csv", filler.clone().into_bytes()),
    };
    built.write_to_vec().expect("writes")
}

fn parse_all(corpus: &[Vec<u8>], threads: usize) -> f64 {
    let started = Instant::now();
    let chunk = corpus.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for part in corpus.chunks(chunk) {
            scope.spawn(move || {
                let mut parts = 0usize;
                for bytes in part {
                    let message = mail_parser::MessageParser::default()
                        .parse(bytes)
                        .expect("the corpus parses");
                    parts += message.parts.len();
                    parts += message.subject().map_or(0, str::len);
                }
                std::hint::black_box(parts);
            });
        }
    });
    started.elapsed().as_secs_f64()
}

fn convert_all(corpus: &[Vec<u8>], workers: usize) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn MailStore> = Arc::new(SqliteStore::open(&dir.path().join("mailroom.db"))?);
    let (directory, _writer) = Directory::start(
        store.clone(),
        &["example.test".to_string()],
        &Topology {
            organization: "Bench".into(),
            site: "Site".into(),
            server: "bench".into(),
        },
        SiteConfig::default(),
    )?;
    directory.apply_blocking(Change::CreateRecipient(RecipientFields {
        kind: Some(RecipientKind::Mailbox),
        addresses: Some(vec!["user@example.test".into()]),
        display_name: Some("User".into()),
        ..Default::default()
    }))?;
    // Spool everything first (not timed): conversion then runs flat out.
    for (n, batch) in corpus.chunks(256).enumerate() {
        let entries: Vec<SpoolEntry> = batch
            .iter()
            .enumerate()
            .map(|(i, body)| SpoolEntry {
                queue_id: format!("B{n}-{i}"),
                mail_from: "zoe@sender.example".into(),
                recipients: vec!["user@example.test".into()],
                body: body.clone(),
                received_at_ms: 1,
                client: "bench".into(),
                ..Default::default()
            })
            .collect();
        store.spool(&entries)?;
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let doorbell = mailroom_queue::Doorbell::default();
    let workers = mailroom_convert::Workers::start(
        store.clone(),
        directory,
        doorbell.clone(),
        mailroom_convert::ConversionConfig {
            workers,
            ..Default::default()
        },
        None,
        cancel.clone(),
        mailroom_convert::ConversionStats::default(),
        mailroom_watch::Probe::new("bench"),
        // The spooled backlog is claimed from the store: what this bench measures.
        None,
    )?;
    doorbell.ring(workers_count(workers.activities().len()));
    loop {
        let (due, _) = store.inbound_due(i64::MAX)?;
        if due == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = started.elapsed().as_secs_f64();
    cancel.cancel();
    doorbell.ring(usize::MAX);
    workers.join();
    Ok(elapsed)
}

fn workers_count(n: usize) -> usize {
    n.max(1)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let workers = if args.workers == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        args.workers
    };
    let corpus: Vec<Vec<u8>> = (0..args.messages).map(corpus_message).collect();
    let bytes: usize = corpus.iter().map(Vec::len).sum();
    let parse_s = parse_all(&corpus, workers);
    let convert_s = convert_all(&corpus, workers)?;
    let mb = bytes as f64 / 1e6;
    println!(
        "{}",
        serde_json::json!({
            "messages": args.messages,
            "bytes": bytes,
            "workers": workers,
            "mail_parser": {"seconds": parse_s, "msg_per_s": args.messages as f64 / parse_s, "mb_per_s": mb / parse_s},
            "mailroom": {"seconds": convert_s, "msg_per_s": args.messages as f64 / convert_s, "mb_per_s": mb / convert_s},
        })
    );
    Ok(())
}
