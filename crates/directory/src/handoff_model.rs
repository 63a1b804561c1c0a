//! The writer -> snapshot -> worker hand-off under a randomized scheduler (`shuttle`).
//!
//! The real writer uses tokio channels and `arc-swap`, which `shuttle` cannot schedule;
//! this model keeps the real state machine ([`Snapshot::apply`], the compiled routing
//! table) and replaces only the primitives: a `shuttle` channel for the writer's input,
//! a `shuttle` mutex around the published `Arc<Snapshot>` for the `arc-swap` cell, and a
//! `shuttle` mutex around a log for the store. It follows the writer's order — apply,
//! persist, publish, then reply — and checks, over thousands of random interleavings of
//! the writer, an administrator and two conversion workers:
//!
//! - a worker routes with one snapshot per unit of work, and the connector it records
//!   was enabled and serving the address in the generation it records;
//! - every generation a worker sees was persisted before it was visible;
//! - a worker never sees the generation go backwards;
//! - the administrator reads its own writes: once a change is acknowledged, a fresh load
//!   shows that generation or a later one.
//!
//! A failing schedule prints a seed; `shuttle::replay` with it becomes a regression test.

use crate::model::SiteConfig;
use crate::routing::{AddressSpace, Connector, ConnectorKind};
use crate::snapshot::Snapshot;
use crate::writer::{Change, SiteChange};
use mailroom_store::Topology;
use shuttle::sync::{Mutex, mpsc};
use shuttle::thread;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

const ADDRESS: &str = "someone@partner.example";

fn connector(name: &str, cost: u8, enabled: bool) -> Connector {
    Connector {
        name: name.into(),
        kind: ConnectorKind::SmartHost {
            host: "127.0.0.1:9".into(),
        },
        address_spaces: vec![AddressSpace::parse("SMTP:*@partner.example", cost).unwrap()],
        enabled,
        retry_minutes: None,
    }
}

/// Enabled connectors serving the address in a snapshot.
fn serving(snapshot: &Snapshot) -> HashSet<String> {
    snapshot
        .site()
        .connectors
        .values()
        .filter(|c| c.enabled)
        .map(|c| c.name.clone())
        .collect()
}

struct Request {
    change: Change,
    reply: mpsc::SyncSender<u64>,
}

fn scenario() {
    let mut site = SiteConfig::default();
    site.connectors.insert("a".into(), connector("a", 1, true));
    let first = Snapshot::new(
        &[],
        Topology {
            organization: "O".into(),
            site: "S".into(),
            server: "M".into(),
        },
        site,
        String::new(),
    )
    .with_generation(1);
    // The store: what was persisted, by generation.
    let persisted: Arc<Mutex<BTreeMap<u64, HashSet<String>>>> =
        Arc::new(Mutex::new(BTreeMap::from([(1, serving(&first))])));
    // The arc-swap cell.
    let published = Arc::new(Mutex::new(Arc::new(first)));
    let (requests, inbox) = mpsc::sync_channel::<Request>(2);

    let writer = {
        let (published, persisted) = (published.clone(), persisted.clone());
        thread::spawn(move || {
            while let Ok(request) = inbox.recv() {
                let base = published.lock().unwrap().clone();
                let Ok((next, _, _)) = base.apply(&request.change) else {
                    let _ = request.reply.send(0);
                    continue;
                };
                let generation = base.generation() + 1;
                let next = next.with_generation(generation);
                // Persist, then publish, then reply: the writer's order.
                persisted.lock().unwrap().insert(generation, serving(&next));
                *published.lock().unwrap() = Arc::new(next);
                let _ = request.reply.send(generation);
            }
        })
    };

    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (published, persisted) = (published.clone(), persisted.clone());
            thread::spawn(move || {
                let mut last = 0;
                for _ in 0..3 {
                    // One load per unit of work.
                    let snapshot = published.lock().unwrap().clone();
                    let generation = snapshot.generation();
                    assert!(generation >= last, "a worker saw generation {generation} after {last}");
                    last = generation;
                    let visible_and_persisted = persisted.lock().unwrap().get(&generation).cloned();
                    let serving_then = visible_and_persisted
                        .unwrap_or_else(|| panic!("generation {generation} visible before it was persisted"));
                    if let Some(route) = snapshot.routing().route("SMTP", ADDRESS, generation) {
                        assert!(
                            serving_then.contains(&route.connector),
                            "routed via {} at generation {generation}, serving then: {serving_then:?}",
                            route.connector
                        );
                    }
                }
            })
        })
        .collect();

    let admin = {
        let published = published.clone();
        thread::spawn(move || {
            let changes = [
                SiteChange::PutConnector {
                    connector: connector("b", 1, true),
                },
                SiteChange::PutConnector {
                    connector: connector("a", 5, false),
                },
                SiteChange::DeleteConnector { name: "b".into() },
                SiteChange::PutConnector {
                    connector: connector("a", 2, true),
                },
            ];
            for change in changes {
                let (reply, answer) = mpsc::sync_channel(1);
                requests
                    .send(Request {
                        change: Change::Site(change),
                        reply,
                    })
                    .unwrap();
                let generation = answer.recv().unwrap();
                assert!(generation > 0, "a valid change was refused");
                let seen = published.lock().unwrap().generation();
                assert!(
                    seen >= generation,
                    "acknowledged generation {generation}, then loaded {seen}"
                );
            }
            // Dropping `requests` ends the writer.
        })
    };

    admin.join().unwrap();
    for worker in workers {
        worker.join().unwrap();
    }
    writer.join().unwrap();
    assert_eq!(
        published.lock().unwrap().generation(),
        5,
        "every change published once"
    );
}

#[test]
fn writer_snapshot_worker_handoff_random_schedules() {
    shuttle::check_random(scenario, 2000);
}

#[test]
fn writer_snapshot_worker_handoff_pct_schedules() {
    // Probabilistic concurrency testing: finds bugs of small depth with high probability.
    shuttle::check_pct(scenario, 1000, 3);
}
