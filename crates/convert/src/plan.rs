//! Where each envelope recipient goes, decided from one directory snapshot.

use mailroom_directory::routing::ConnectorKind;
use mailroom_directory::{RecipientKind, Snapshot, Target, address_key};
use mailroom_store::{DeliveryPlan, MessageFacts, RemoteRoute};
use std::collections::HashSet;
use std::hash::{Hash, Hasher};

/// The reason recorded for a remote address no connector serves.
pub const NO_ROUTE: &str = "5.4.4 no route: no connector's address space matches this address";

/// Resolves every envelope recipient with `snapshot`: distribution lists expanded,
/// contacts replaced by their targets, local mailboxes de-duplicated (one copy per
/// person however many of their addresses or lists were used), remote addresses routed
/// by the routing table and grouped by connector, and anything unresolvable kept with a
/// reason. Nothing is dropped. `queue_id` spreads equal-cost routes across messages.
pub fn delivery_plan(
    facts: MessageFacts,
    recipients: &[String],
    snapshot: &Snapshot,
    queue_id: &str,
) -> DeliveryPlan {
    let mut plan = DeliveryPlan {
        facts,
        ..DeliveryPlan::default()
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    queue_id.hash(&mut hasher);
    let balance = hasher.finish();
    let mut seen_addresses = HashSet::new();
    let mut seen_mailboxes = HashSet::new();
    let mut seen_remote = HashSet::new();
    for address in recipients {
        if !seen_addresses.insert(address_key(address)) {
            continue;
        }
        let targets = snapshot.expand(address);
        if snapshot
            .by_address(address)
            .is_some_and(|r| r.kind == RecipientKind::List)
        {
            // For the trail: the list and every member address it reached.
            let members = targets
                .iter()
                .filter_map(|target| match target {
                    Target::Mailbox(id) => mailbox_address(snapshot, *id),
                    Target::Remote(remote) => Some(remote.clone()),
                    Target::Undeliverable(what, _) => Some(what.clone()),
                })
                .collect();
            plan.expanded.push((address.clone(), members));
        }
        for target in targets {
            match target {
                Target::Mailbox(id) => {
                    if seen_mailboxes.insert(id) {
                        plan.local.push(id);
                        plan.local_addresses
                            .push(mailbox_address(snapshot, id).unwrap_or_default());
                    }
                }
                Target::Remote(remote) => {
                    if seen_remote.insert(address_key(&remote)) {
                        route(&mut plan, snapshot, remote, balance);
                    }
                }
                Target::Undeliverable(what, why) => {
                    // The DSN names an envelope recipient the sender knows: the
                    // member's address when it is one, else the address the sender
                    // used (with the contact or list named in the reason).
                    let (failed, why) = if what.contains('@') {
                        (what, why)
                    } else {
                        (address.clone(), format!("{why} ({what})"))
                    };
                    if !plan.undeliverable.iter().any(|(a, _)| *a == failed) {
                        plan.undeliverable.push((failed, why));
                    }
                }
            }
        }
    }
    plan
}

/// A mailbox's primary address, as the trail names it.
fn mailbox_address(snapshot: &Snapshot, id: mailroom_store::RecipientId) -> Option<String> {
    snapshot
        .recipient(id)
        .and_then(|r| r.primary_address().map(str::to_string))
}

fn route(plan: &mut DeliveryPlan, snapshot: &Snapshot, address: String, balance: u64) {
    let Some(route) = snapshot.routing().route("SMTP", &address, balance) else {
        plan.undeliverable.push((address, NO_ROUTE.to_string()));
        return;
    };
    let local = snapshot
        .site()
        .connectors
        .get(&route.connector)
        .is_some_and(|c| c.kind == ConnectorKind::Local);
    if local {
        // Routed "here", yet nobody here has the address.
        plan.undeliverable
            .push((address, "5.1.1 no such recipient here".to_string()));
        return;
    }
    if let Some(instead) = &route.instead_of {
        tracing::info!(%address, connector = %route.connector, unavailable = %instead, "routed to a costlier connector");
    }
    match plan
        .remote
        .iter_mut()
        .find(|r| r.connector == route.connector)
    {
        Some(group) => group.recipients.push(address),
        None => plan.remote.push(RemoteRoute {
            connector: route.connector,
            generation: snapshot.generation(),
            recipients: vec![address],
        }),
    }
}
