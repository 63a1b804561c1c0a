//! The immutable directory snapshot every unit of work reads.

use crate::{address_key, domain_of};
use mailroom_store::{RecipientId, RecipientRecord, Topology};
use std::sync::Arc;

/// A mailbox recipient as readers see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Recipient {
    /// Store identity.
    pub id: RecipientId,
    /// Mailbox name (the classic "Directory Name").
    pub alias: String,
    /// Display name.
    pub display_name: String,
    /// The primary (reply) address.
    pub primary_address: String,
    /// Every address, primary first.
    pub addresses: Vec<String>,
    /// Argon2id PHC string, when a password is set.
    #[serde(skip)]
    pub password_hash: Option<String>,
}

impl From<RecipientRecord> for Recipient {
    fn from(record: RecipientRecord) -> Recipient {
        let primary_address = record
            .addresses
            .iter()
            .find(|a| a.primary)
            .or(record.addresses.first())
            .map(|a| a.address.clone())
            .unwrap_or_default();
        Recipient {
            id: record.id,
            alias: record.alias,
            display_name: record.display_name,
            primary_address,
            addresses: record.addresses.into_iter().map(|a| a.address).collect(),
            password_hash: record.password_hash,
        }
    }
}

/// What an envelope address means in one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// A local mailbox.
    Local(Arc<Recipient>),
    /// The domain is ours but nobody has this address.
    UnknownLocal,
    /// The domain is not ours: the message must be routed elsewhere.
    Remote,
}

/// One published state of the directory. Cloning is cheap (persistent maps).
#[derive(Debug, Clone)]
pub struct Snapshot {
    generation: u64,
    recipients: imbl::HashMap<RecipientId, Arc<Recipient>>,
    by_address: imbl::HashMap<String, RecipientId>,
    /// Lower-cased alias to recipient; aliases are unique.
    by_alias: imbl::HashMap<String, RecipientId>,
    /// How many addresses use each domain; a domain with a recipient is accepted.
    domain_refs: imbl::HashMap<String, u32>,
    /// Accepted domains named in the configuration, whether or not anyone uses them.
    configured_domains: Arc<[String]>,
    /// The organization, site and server.
    topology: Arc<Topology>,
}

impl Snapshot {
    /// An empty directory accepting the configured domains.
    pub fn empty(configured_domains: &[String]) -> Snapshot {
        Snapshot::with_topology(
            configured_domains,
            Topology {
                organization: String::new(),
                site: String::new(),
                server: String::new(),
            },
        )
    }

    /// An empty directory in the given organization, site and server.
    pub fn with_topology(configured_domains: &[String], topology: Topology) -> Snapshot {
        Snapshot {
            generation: 0,
            recipients: imbl::HashMap::new(),
            by_address: imbl::HashMap::new(),
            by_alias: imbl::HashMap::new(),
            domain_refs: imbl::HashMap::new(),
            configured_domains: configured_domains
                .iter()
                .map(|d| d.to_lowercase())
                .collect(),
            topology: Arc::new(topology),
        }
    }

    /// The organization, site and server this directory belongs to.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The generation number: 0 for the empty directory, one more per publication.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of recipients.
    pub fn len(&self) -> usize {
        self.recipients.len()
    }

    /// True when there are no recipients.
    pub fn is_empty(&self) -> bool {
        self.recipients.is_empty()
    }

    /// Every recipient, in no particular order.
    pub fn recipients(&self) -> impl Iterator<Item = &Arc<Recipient>> {
        self.recipients.values()
    }

    /// The recipient with this store identity.
    pub fn recipient(&self, id: RecipientId) -> Option<&Arc<Recipient>> {
        self.recipients.get(&id)
    }

    /// The recipient owning this address, compared case-insensitively.
    pub fn by_address(&self, address: &str) -> Option<&Arc<Recipient>> {
        self.by_address
            .get(&address_key(address))
            .and_then(|id| self.recipients.get(id))
    }

    /// The recipient with this alias (mailbox name), compared case-insensitively.
    pub fn by_alias(&self, alias: &str) -> Option<&Arc<Recipient>> {
        self.by_alias
            .get(&alias.to_lowercase())
            .and_then(|id| self.recipients.get(id))
    }

    /// True when mail for `domain` is delivered here rather than routed.
    pub fn is_local_domain(&self, domain: &str) -> bool {
        let domain = domain.to_lowercase();
        self.configured_domains.contains(&domain) || self.domain_refs.contains_key(&domain)
    }

    /// Every accepted domain, sorted.
    pub fn local_domains(&self) -> Vec<String> {
        let mut domains: Vec<String> = self
            .configured_domains
            .iter()
            .cloned()
            .chain(self.domain_refs.keys().cloned())
            .collect();
        domains.sort();
        domains.dedup();
        domains
    }

    /// What an envelope address means here.
    pub fn resolve(&self, address: &str) -> Resolution {
        if let Some(recipient) = self.by_address(address) {
            return Resolution::Local(recipient.clone());
        }
        match domain_of(address) {
            Some(domain) if self.is_local_domain(&domain) => Resolution::UnknownLocal,
            // An address without a domain (postmaster) is local by RFC 5321 4.5.1.
            None => Resolution::UnknownLocal,
            Some(_) => Resolution::Remote,
        }
    }

    /// The next snapshot: this one with `recipient` inserted or replaced. Costs a few
    /// persistent-map node copies per address, independent of the directory's size.
    pub(crate) fn with_recipient(&self, recipient: Recipient) -> Snapshot {
        let mut next = self.clone();
        if let Some(old) = next.recipients.get(&recipient.id).cloned() {
            next.forget_addresses(&old);
            next.by_alias.remove(&old.alias.to_lowercase());
        }
        next.by_alias
            .insert(recipient.alias.to_lowercase(), recipient.id);
        for address in &recipient.addresses {
            next.by_address.insert(address_key(address), recipient.id);
            if let Some(domain) = domain_of(address) {
                *next.domain_refs.entry(domain).or_insert(0) += 1;
            }
        }
        next.recipients.insert(recipient.id, Arc::new(recipient));
        next
    }

    fn forget_addresses(&mut self, old: &Recipient) {
        for address in &old.addresses {
            self.by_address.remove(&address_key(address));
            if let Some(domain) = domain_of(address) {
                let remaining = self.domain_refs.get(&domain).copied().unwrap_or(1) - 1;
                if remaining == 0 {
                    self.domain_refs.remove(&domain);
                } else {
                    self.domain_refs.insert(domain, remaining);
                }
            }
        }
    }

    pub(crate) fn with_generation(mut self, generation: u64) -> Snapshot {
        self.generation = generation;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipient(id: i64, addresses: &[&str]) -> Recipient {
        Recipient {
            id,
            alias: format!("r{id}"),
            display_name: String::new(),
            primary_address: addresses[0].into(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            password_hash: None,
        }
    }

    #[test]
    fn resolution_by_address_and_domain() {
        let snap = Snapshot::empty(&["Example.TEST".into()])
            .with_recipient(recipient(1, &["alice@example.test", "al@other.test"]));
        assert!(matches!(snap.resolve("ALICE@example.test"), Resolution::Local(r) if r.id == 1));
        assert!(matches!(
            snap.resolve("al@other.test"),
            Resolution::Local(_)
        ));
        assert_eq!(snap.resolve("bob@example.test"), Resolution::UnknownLocal);
        assert_eq!(snap.resolve("bob@other.test"), Resolution::UnknownLocal);
        assert_eq!(snap.resolve("bob@remote.test"), Resolution::Remote);
        assert_eq!(snap.local_domains(), vec!["example.test", "other.test"]);
    }

    #[test]
    fn replacing_a_recipient_forgets_its_old_addresses_and_domains() {
        let snap = Snapshot::empty(&[])
            .with_recipient(recipient(1, &["a@one.test"]))
            .with_recipient(recipient(1, &["a@two.test"]));
        assert_eq!(snap.resolve("a@one.test"), Resolution::Remote);
        assert!(matches!(snap.resolve("a@two.test"), Resolution::Local(_)));
        assert_eq!(snap.len(), 1);
    }
}
