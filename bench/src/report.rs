//! Turns `bench/run`'s raw measurements into the report: medians per load, ratios
//! against the peers, and a plot of messages/s against concurrency per server.
//!
//! Input: a TSV file of `load  server  size  sessions  round  value` lines (value in
//! messages/s, or MiB for `rss`). Output: Markdown on stdout, an SVG plot at `--plot`.

use anyhow::Context;
use clap::Parser;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Parser)]
struct Args {
    /// The raw measurements.
    results: PathBuf,
    /// Where to write the SVG plot (SMTP ingestion, 4 KiB, messages/s by sessions).
    #[arg(long)]
    plot: PathBuf,
}

type Key = (String, String, u64, u64); // load, server, size, sessions

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn size_label(size: u64) -> String {
    if size >= 1024 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.results)
        .with_context(|| format!("reading {}", args.results.display()))?;
    let mut raw: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        anyhow::ensure!(f.len() == 6, "line {}: expected 6 fields: {line:?}", n + 1);
        raw.entry((f[0].into(), f[1].into(), f[2].parse()?, f[3].parse()?))
            .or_default()
            .push(f[5].parse()?);
    }
    let rounds = raw.values().map(Vec::len).max().unwrap_or(0);
    let medians: BTreeMap<Key, f64> = raw
        .into_iter()
        .map(|(k, mut v)| (k, median(&mut v)))
        .collect();
    let get = |load: &str, server: &str, size: u64, sessions: u64| {
        medians
            .get(&(load.into(), server.into(), size, sessions))
            .copied()
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    let cell = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    // The (size, sessions) pairs measured for one load, in order.
    let loads_of = |load: &str| {
        let mut pairs: Vec<(u64, u64)> = medians
            .keys()
            .filter(|k| k.0 == load)
            .map(|k| (k.2, k.3))
            .collect();
        pairs.sort();
        pairs.dedup();
        pairs
    };

    println!("Medians of {rounds} round(s), servers alternating within each round.\n");
    // SMTP ingestion.
    let loads = loads_of("smtp");
    println!("### SMTP ingestion (smtp-source, messages/s until the last reply)\n");
    println!(
        "| size | sessions | smtp-sink | Postfix | Mailroom | Mailroom/Postfix | Mailroom/smtp-sink |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (size, sessions) in &loads {
        let sink = get("smtp", "smtp-sink", *size, *sessions);
        let postfix = get("smtp", "postfix", *size, *sessions);
        let mailroom = get("smtp", "mailroom", *size, *sessions);
        println!(
            "| {} | {sessions} | {} | {} | {} | {} | {} |",
            size_label(*size),
            cell(sink),
            cell(postfix),
            cell(mailroom),
            ratio(mailroom, postfix),
            ratio(mailroom, sink)
        );
    }
    // End to end.
    let e2e = loads_of("e2e");
    if !e2e.is_empty() {
        println!("\n### End to end (SMTP to readable in the mailbox, messages/s)\n");
        println!("| size | sessions | Postfix (virtual → Maildir) | Mailroom | Mailroom/Postfix |");
        println!("|---|---:|---:|---:|---:|");
        for (size, sessions) in &e2e {
            let postfix = get("e2e", "postfix", *size, *sessions);
            let mailroom = get("e2e", "mailroom", *size, *sessions);
            println!(
                "| {} | {sessions} | {} | {} | {} |",
                size_label(*size),
                cell(postfix),
                cell(mailroom),
                ratio(mailroom, postfix)
            );
        }
    }
    // Cost as the mailbox grows.
    let grow: Vec<(u64, f64)> = medians
        .iter()
        .filter(|(k, _)| k.0 == "grow")
        .map(|(k, v)| (k.2, *v))
        .collect();
    if let Some((_, empty)) = grow.iter().find(|(size, _)| *size == 0).copied() {
        println!("\n### Cost as the mailbox grows (end to end, 4 KiB, 20 sessions, messages/s)\n");
        println!("| messages already in the mailbox | messages/s | relative to an empty mailbox |");
        println!("|---:|---:|---:|");
        for (size, rate) in &grow {
            println!("| {size} | {rate:.0} | {:.2}x |", rate / empty);
        }
    }
    // Conversion.
    let conversion: Vec<(&Key, &f64)> = medians.iter().filter(|(k, _)| k.0 == "convert").collect();
    if let (Some(parser), Some(ours)) = (
        conversion.iter().find(|(k, _)| k.1 == "mail-parser"),
        conversion.iter().find(|(k, _)| k.1 == "mailroom"),
    ) {
        println!(
            "\n### Inbound conversion ({:.1} MB generated corpus, {} threads each)\n",
            parser.0.2 as f64 / 1e6,
            parser.0.3
        );
        println!("| | MB/s | time relative to parsing alone |");
        println!("|---|---:|---:|");
        println!(
            "| mail-parser alone (parse, walk the parts) | {:.0} | 1.00x |",
            parser.1
        );
        println!(
            "| Mailroom inbound conversion (claim, parse, resolve, deliver into the store) | {:.0} | {:.2}x |",
            ours.1,
            parser.1 / ours.1
        );
    }
    // Peak memory.
    let rss: Vec<(&Key, &f64)> = medians.iter().filter(|(k, _)| k.0 == "rss").collect();
    if !rss.is_empty() {
        println!(
            "\n### Peak memory during the SMTP loads (PSS of all the server's processes, MiB)\n"
        );
        println!("| server | peak, MiB |");
        println!("|---|---:|");
        for (k, v) in rss {
            println!("| {} | {v:.0} |", k.1);
        }
    }

    // The plot: 4 KiB ingestion, messages/s by sessions, one line per server.
    let size = loads.first().map_or(4096, |l| l.0);
    let servers = [("smtp-sink", BLUE), ("postfix", RED), ("mailroom", GREEN)];
    let sessions: Vec<u64> = loads.iter().filter(|l| l.0 == size).map(|l| l.1).collect();
    let top = servers
        .iter()
        .flat_map(|(s, _)| sessions.iter().filter_map(|n| get("smtp", s, size, *n)))
        .fold(1.0f64, f64::max);
    let root = SVGBackend::new(&args.plot, (720, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = sessions.iter().copied().max().unwrap_or(100) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "SMTP ingestion, {} messages: messages/s by concurrent sessions",
                size_label(size)
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0.8f64..x_max * 1.2).log_scale(), 0f64..top * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("concurrent SMTP sessions (log scale)")
        .y_desc("messages/s")
        .draw()?;
    for (server, color) in servers {
        let points: Vec<(f64, f64)> = sessions
            .iter()
            .filter_map(|n| get("smtp", server, size, *n).map(|v| (*n as f64, v)))
            .collect();
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(server)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}
