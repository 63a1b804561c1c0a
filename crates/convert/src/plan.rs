//! Where each envelope recipient goes, decided from one directory snapshot.

use mailroom_directory::{Resolution, Snapshot, address_key};
use mailroom_store::{DeliveryPlan, MessageFacts};
use std::collections::HashSet;

/// The reason recorded for a local address nobody owns any more.
pub const UNKNOWN_LOCAL: &str =
    "5.1.1 no such recipient here (it was removed after the message was accepted)";

/// Resolves every envelope recipient with `snapshot`: local mailboxes de-duplicated (two
/// addresses of one person give one copy), remote addresses kept for the outbound queue,
/// and unknown local addresses kept with a reason. Nothing is dropped.
pub fn delivery_plan(
    facts: MessageFacts,
    recipients: &[String],
    snapshot: &Snapshot,
) -> DeliveryPlan {
    let mut plan = DeliveryPlan {
        facts,
        ..DeliveryPlan::default()
    };
    let mut seen_addresses = HashSet::new();
    let mut seen_mailboxes = HashSet::new();
    for address in recipients {
        if !seen_addresses.insert(address_key(address)) {
            continue;
        }
        match snapshot.resolve(address) {
            Resolution::Local(recipient) => {
                if seen_mailboxes.insert(recipient.id) {
                    plan.local.push(recipient.id);
                }
            }
            Resolution::Remote => plan.remote.push(address.clone()),
            Resolution::UnknownLocal => plan
                .undeliverable
                .push((address.clone(), UNKNOWN_LOCAL.to_string())),
        }
    }
    plan
}
