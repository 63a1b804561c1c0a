//! Directory benchmark: what one change costs, and what a lookup costs, at 1,000 and
//! 100,000 recipients. The design claim under test: publishing after a one-recipient
//! change is incremental (milliseconds, independent of size), not a rebuild.
//!
//! Each size gets a fresh store on disk, filled through the real writer in batches
//! (as an import does); then single changes go through the writer one at a time, and
//! the time from submission to the published snapshot is recorded.

use clap::Parser;
use mailroom_directory::{Change, Directory, RecipientFields, RecipientKind, SiteConfig};
use mailroom_store::{SqliteStore, Topology};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Directory sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000usize, 100_000])]
    sizes: Vec<usize>,
    /// Single changes timed per size.
    #[arg(long, default_value_t = 200)]
    changes: usize,
}

fn mailbox(i: usize) -> Change {
    Change::UpsertRecipient(RecipientFields {
        kind: Some(RecipientKind::Mailbox),
        alias: Some(format!("user{i}")),
        display_name: Some(format!("User {i}")),
        addresses: Some(vec![format!("SMTP:user{i}@bench.test")]),
        ..Default::default()
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "| recipients | fill (rows/s) | one change, p50 | p99 | max | lookup by address | snapshot load |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for &size in &args.sizes {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(SqliteStore::open(&dir.path().join("db"))?);
        let topology = Topology {
            organization: "Bench".into(),
            site: "Site".into(),
            server: "mx".into(),
        };
        let (directory, _t) = Directory::start(
            store,
            &["bench.test".into()],
            &topology,
            SiteConfig::default(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let started = Instant::now();
        for chunk in (0..size).collect::<Vec<_>>().chunks(1000) {
            let results =
                directory.apply_all_blocking(chunk.iter().map(|&i| mailbox(i)).collect(), false);
            anyhow::ensure!(results.iter().all(Result::is_ok), "fill failed");
        }
        let fill_rate = size as f64 / started.elapsed().as_secs_f64();

        let mut latencies = Vec::with_capacity(args.changes);
        for n in 0..args.changes {
            let change = Change::ModifyRecipient {
                alias: format!("user{}", (n * 7919) % size),
                fields: RecipientFields {
                    display_name: Some(format!("Renamed {n}")),
                    ..Default::default()
                },
            };
            let t = Instant::now();
            directory
                .apply_blocking(change)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            latencies.push(t.elapsed());
        }
        latencies.sort();

        let lookups = 100_000;
        let snapshot = directory.snapshot();
        // The addresses are built before the clock starts: only the lookup is timed.
        let addresses: Vec<String> = (0..lookups)
            .map(|n| format!("user{}@bench.test", (n * 31) % size))
            .collect();
        let t = Instant::now();
        let mut found = 0;
        for address in &addresses {
            found += usize::from(snapshot.by_address(address).is_some());
        }
        let lookup = t.elapsed() / lookups as u32;
        anyhow::ensure!(found == lookups, "lookups missed");
        let t = Instant::now();
        for _ in 0..lookups {
            std::hint::black_box(directory.snapshot());
        }
        let load = t.elapsed() / lookups as u32;
        println!(
            "| {size} | {fill_rate:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {:.0} ns | {:.0} ns |",
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            latencies.last().unwrap().as_secs_f64() * 1e3,
            lookup.as_nanos() as f64,
            load.as_nanos() as f64,
        );
    }
    Ok(())
}
