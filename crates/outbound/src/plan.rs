//! The pure part of an attempt, before any I/O: from one outbound entry and one
//! directory snapshot, which recipients fail now (conversion found them undeliverable,
//! the message loops, it waited too long, no connector's address space matches), which
//! go back to local delivery (the local connector), and which destinations the rest go
//! to, grouped so that each destination gets one transaction.
//!
//! Why pure: the routing decision is the part most worth testing and the part most
//! likely to change with the routing table; here it needs no network, no store and no
//! clock of its own (`now_ms` is passed in).

use crate::outcome::fail;
use crate::schedule::Schedule;
use mailroom_directory::{Resolution, Snapshot, routing::ConnectorKind};
use mailroom_store::{Envelope, OutboundItem, QueueName, RecipientStatus};
use std::collections::BTreeMap;

/// Where a group of recipients goes over SMTP.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Destination {
    /// The domain's MX hosts.
    Mx(String),
    /// A smart host, `host[:port]`.
    SmartHost(String),
}

/// What to do in this attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The recipients this attempt is about (pending ones; for an undeliverable entry,
    /// every one not delivered).
    pub before: Vec<String>,
    /// The entry's recipient states with what the plan decided already (failures).
    pub envelope: Envelope,
    /// Recipients to deliver over SMTP, by destination.
    pub groups: BTreeMap<Destination, Vec<String>>,
    /// Recipients the local connector hands back to local delivery.
    pub respool: Vec<String>,
    /// The connector the routing table chose last, and its generation.
    pub route: Option<(String, u64)>,
    /// That connector's own retry schedule (minutes), when it has one.
    pub connector_retry: Option<Vec<u64>>,
}

/// Received header fields in the message's header section: more than `max_hops`
/// means a loop.
pub fn hops(body: &[u8]) -> usize {
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(body.len());
    body[..end]
        .split(|&b| b == b'\n')
        .filter(|line| line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:"))
        .count()
}

/// Plans one attempt at `item` by `snapshot`'s routing table at `now_ms`.
pub fn plan(
    item: &OutboundItem,
    snapshot: &Snapshot,
    now_ms: i64,
    schedule: &Schedule,
    max_hops: usize,
) -> Plan {
    let mut envelope = item.envelope.clone();
    // An undeliverable entry is born with its recipients failed (conversion knew why),
    // so they count as failed by this attempt: that is what sends their DSN. Counting
    // only pending ones here once made such mail vanish with neither delivery nor DSN.
    let before: Vec<String> = if item.queue == QueueName::Undeliverable {
        envelope
            .recipients
            .iter()
            .filter(|r| r.status != RecipientStatus::Delivered)
            .map(|r| r.address.clone())
            .collect()
    } else {
        envelope.pending().map(|r| r.address.clone()).collect()
    };
    let mut route = None;
    let mut respool = Vec::new();
    let mut groups: BTreeMap<Destination, Vec<String>> = BTreeMap::new();
    if item.queue == QueueName::Undeliverable {
        // Conversion found these unresolvable; each carries its reason already.
        for r in &mut envelope.recipients {
            if r.status == RecipientStatus::Pending {
                r.status = RecipientStatus::Failed;
                r.code.get_or_insert_with(|| "5.1.1".into());
            }
        }
    } else if hops(&item.body) > max_hops {
        for address in &before {
            fail(
                &mut envelope,
                address,
                "5.4.6",
                format!(
                    "5.4.6 too many hops: {} Received headers (the limit is {max_hops}); the message is looping",
                    hops(&item.body),
                ),
                None,
            );
        }
    } else if now_ms >= schedule.expires_at_ms(item.received_at_ms) {
        for r in &mut envelope.recipients {
            if r.status == RecipientStatus::Pending {
                r.status = RecipientStatus::Failed;
                let last = r
                    .reply
                    .clone()
                    .unwrap_or_else(|| "no attempt succeeded".into());
                r.code = Some("4.4.7".into());
                r.reply = Some(format!(
                    "4.4.7 delivery time expired after {} days; last error: {last}",
                    schedule.expire_after.as_secs() / 86_400
                ));
            }
        }
    } else {
        let balance = item.id as u64;
        for address in &before {
            let Some(chosen) = snapshot.routing().route("SMTP", address, balance) else {
                fail(
                    &mut envelope,
                    address,
                    "5.4.4",
                    "5.4.4 no route: no connector's address space matches this address".into(),
                    None,
                );
                continue;
            };
            let Some(connector) = snapshot.site().connectors.get(&chosen.connector) else {
                continue;
            };
            route = Some((chosen.connector.clone(), snapshot.generation()));
            let destination = match &connector.kind {
                ConnectorKind::Mx => Destination::Mx(
                    address
                        .rsplit_once('@')
                        .map_or(String::new(), |(_, d)| d.to_ascii_lowercase()),
                ),
                ConnectorKind::SmartHost { host } => Destination::SmartHost(host.clone()),
                ConnectorKind::Local => {
                    if matches!(snapshot.resolve(address), Resolution::Local(_)) {
                        respool.push(address.clone());
                        if let Some(r) = envelope
                            .recipients
                            .iter_mut()
                            .find(|r| &r.address == address)
                        {
                            r.status = RecipientStatus::Delivered;
                            r.reply = Some("handed to local delivery".into());
                        }
                    } else {
                        fail(
                            &mut envelope,
                            address,
                            "5.1.1",
                            "5.1.1 routed to the local connector, but no local recipient has this address".into(),
                            None,
                        );
                    }
                    continue;
                }
            };
            groups.entry(destination).or_default().push(address.clone());
        }
    }
    let connector_retry = route.as_ref().and_then(|(name, _)| {
        snapshot
            .site()
            .connectors
            .get(name)
            .and_then(|c| c.retry_minutes.clone())
            .filter(|m| !m.is_empty())
    });
    Plan {
        before,
        envelope,
        groups,
        respool,
        route,
        connector_retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailroom_directory::routing::{AddressSpace, Connector, Scope};
    use mailroom_directory::{Change, Directory, RecipientFields, RecipientKind, SiteChange};
    use mailroom_store::{RecipientState, SqliteStore, Topology};
    use std::sync::Arc;

    fn directory(dir: &std::path::Path) -> Directory {
        let store = Arc::new(SqliteStore::open(&dir.join("db")).unwrap());
        let topology = Topology {
            organization: "Org".into(),
            site: "Site".into(),
            server: "mx1".into(),
        };
        let (directory, _) = Directory::start(
            store,
            &["example.test".into()],
            &topology,
            Default::default(),
        )
        .unwrap();
        let connector = |name: &str, kind: ConnectorKind, pattern: &str, retry| Connector {
            name: name.into(),
            kind,
            address_spaces: vec![AddressSpace {
                address_type: "SMTP".into(),
                pattern: pattern.into(),
                cost: 1,
                scope: Scope::Organization,
            }],
            enabled: true,
            retry_minutes: retry,
        };
        for c in [
            connector("internet", ConnectorKind::Mx, "*@*.net", None),
            connector(
                "partner",
                ConnectorKind::SmartHost {
                    host: "relay.partner.test:2525".into(),
                },
                "*@partner.test",
                Some(vec![2]),
            ),
            connector("back", ConnectorKind::Local, "*@example.test", None),
        ] {
            directory
                .apply_blocking(Change::Site(SiteChange::PutConnector { connector: c }))
                .unwrap();
        }
        directory
            .apply_blocking(Change::CreateRecipient(RecipientFields {
                kind: Some(RecipientKind::Mailbox),
                addresses: Some(vec!["ann@example.test".into()]),
                display_name: Some("Ann".into()),
                ..Default::default()
            }))
            .unwrap();
        directory
    }

    fn item(recipients: &[&str], body: &[u8], received_at_ms: i64) -> OutboundItem {
        OutboundItem {
            id: 7,
            queue: QueueName::Outbound,
            queue_id: "Q1".into(),
            mail_from: "ann@example.test".into(),
            body: body.to_vec(),
            received_at_ms,
            attempts: 0,
            connector: None,
            generation: None,
            envelope: Envelope {
                recipients: recipients
                    .iter()
                    .map(|r| RecipientState::pending(*r))
                    .collect(),
                ..Default::default()
            },
            last_error: None,
        }
    }

    fn status(plan: &Plan, address: &str) -> (RecipientStatus, Option<String>) {
        let r = plan.envelope.recipient(address).unwrap();
        (r.status, r.code.clone())
    }

    /// Recipients are grouped by destination (one MX domain, one smart host), the local
    /// connector hands local recipients back (and fails unknown ones), and an address
    /// no connector serves fails with 5.4.4; the route and its retry schedule are noted.
    #[test]
    fn recipients_are_grouped_by_destination() {
        let dir = tempfile::tempdir().unwrap();
        let directory = directory(dir.path());
        let snapshot = directory.snapshot();
        let entry = item(
            &[
                "a@one.net",
                "b@one.net",
                "c@two.net",
                "d@partner.test",
                "ann@example.test",
                "nobody@example.test",
                "e@nowhere.org",
            ],
            b"Subject: x\r\n\r\nbody\r\n",
            1_000,
        );
        let plan = plan(&entry, &snapshot, 2_000, &Schedule::default(), 30);
        assert_eq!(plan.before.len(), 7);
        let groups: Vec<(Destination, Vec<String>)> = plan.groups.clone().into_iter().collect();
        assert_eq!(
            groups,
            vec![
                (
                    Destination::Mx("one.net".into()),
                    vec!["a@one.net".into(), "b@one.net".into()]
                ),
                (Destination::Mx("two.net".into()), vec!["c@two.net".into()]),
                (
                    Destination::SmartHost("relay.partner.test:2525".into()),
                    vec!["d@partner.test".into()]
                ),
            ]
        );
        assert_eq!(plan.respool, vec!["ann@example.test".to_string()]);
        assert_eq!(
            status(&plan, "ann@example.test").0,
            RecipientStatus::Delivered
        );
        assert_eq!(
            status(&plan, "nobody@example.test"),
            (RecipientStatus::Failed, Some("5.1.1".into()))
        );
        assert_eq!(
            status(&plan, "e@nowhere.org"),
            (RecipientStatus::Failed, Some("5.4.4".into()))
        );
        assert_eq!(status(&plan, "a@one.net").0, RecipientStatus::Pending);
        assert!(plan.route.is_some());
    }

    /// A looping message and an expired one fail every pending recipient before any
    /// routing; the connector's own retry schedule comes with the route.
    #[test]
    fn loops_and_expiry_fail_before_routing() {
        let dir = tempfile::tempdir().unwrap();
        let directory = directory(dir.path());
        let snapshot = directory.snapshot();
        let schedule = Schedule::default();
        let looping: Vec<u8> = "Received: x\r\n".repeat(31).into_bytes();
        let mut body = looping.clone();
        body.extend_from_slice(b"\r\nbody\r\n");
        assert_eq!(hops(&body), 31);
        let plan_loop = plan(&item(&["a@one.net"], &body, 0), &snapshot, 1, &schedule, 30);
        assert_eq!(
            status(&plan_loop, "a@one.net"),
            (RecipientStatus::Failed, Some("5.4.6".into()))
        );
        assert!(plan_loop.groups.is_empty());
        let expired_at = schedule.expires_at_ms(0);
        let plan_old = plan(
            &item(&["a@one.net"], b"\r\n", 0),
            &snapshot,
            expired_at,
            &schedule,
            30,
        );
        assert_eq!(
            status(&plan_old, "a@one.net"),
            (RecipientStatus::Failed, Some("4.4.7".into()))
        );
        let partner = plan(
            &item(&["d@partner.test"], b"\r\n", 0),
            &snapshot,
            1,
            &schedule,
            30,
        );
        assert_eq!(partner.connector_retry, Some(vec![2]));
        assert_eq!(partner.route.as_ref().unwrap().0, "partner");
    }
}
