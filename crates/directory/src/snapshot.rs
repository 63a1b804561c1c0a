//! The immutable directory snapshot, and [`Snapshot::apply`]: the one function that
//! validates a change and produces the next snapshot.
//!
//! `apply` is pure: it returns the next snapshot and the rows to persist, or an error
//! naming the object and field, and changes nothing. The writer uses it to apply changes,
//! an import's dry run uses it on a private copy, and tests use it directly. Every update
//! is incremental: persistent maps (`imbl`) copy a few nodes per changed recipient, and
//! the derived parts (accepted domains, routing table) are rebuilt only when the site
//! configuration changes.

use crate::addressing::{self, NameParts};
use crate::model::*;
use crate::routing::RoutingTable;
use crate::writer::{Change, DirectoryError, RecipientFields};
use crate::{address_key, domain_of, validate_address};
use mailroom_store::{AddressRecord, DirectoryWrite, RecipientId, RecipientRow, Topology};
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

/// What an envelope address means in one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// A local recipient (mailbox, contact or list).
    Local(Arc<Recipient>),
    /// The domain is ours but nobody has this address.
    UnknownLocal,
    /// The domain is not ours: the message must be routed elsewhere.
    Remote,
}

/// Where one envelope address finally goes, after lists and contacts are expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A local mailbox.
    Mailbox(RecipientId),
    /// An address to route out.
    Remote(String),
    /// Nowhere: the address and why.
    Undeliverable(String, String),
}

/// What applying one change produced, for the caller's reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// The recipient created or changed, if the change was about one.
    pub recipient: Option<Arc<Recipient>>,
    /// Things the administrator should know (e.g. a generated address needed a suffix).
    pub notes: Vec<String>,
    /// Recipients changed (address regeneration counts them).
    pub changed: usize,
    /// Recipients that could not be changed, each with a note (address regeneration).
    pub failed: usize,
    /// The snapshot generation that published the change (0 when nothing changed).
    pub generation: u64,
}

/// One published state of the directory. Cloning is cheap (persistent maps).
#[derive(Debug, Clone)]
pub struct Snapshot {
    generation: u64,
    next_id: RecipientId,
    recipients: imbl::HashMap<RecipientId, Arc<Recipient>>,
    /// Keys are `Arc<str>`, not `String`: a change copies the map's nodes on its path
    /// (the published snapshot still shares them), and a copied node clones every key in
    /// it, up to 64; with `String` keys that was a heap allocation and a copy each, most
    /// of the directory writer's time during an import (docs/benchmarks.md).
    by_address: imbl::HashMap<Arc<str>, RecipientId>,
    by_alias: imbl::HashMap<Arc<str>, RecipientId>,
    /// Recipient -> the lists that name it as a member or owner (so deleting it does not
    /// scan the directory).
    referenced_by: imbl::HashMap<RecipientId, imbl::OrdSet<RecipientId>>,
    site: Arc<SiteConfig>,
    configured_domains: Arc<[String]>,
    /// Derived from the site and the configured domains.
    accepted: Arc<BTreeSet<String>>,
    /// Derived from the site's connectors.
    routing: Arc<RoutingTable>,
    /// The routing table's text before the last change to it (`routing diff`).
    previous_routing: Arc<String>,
    topology: Arc<Topology>,
}

fn invalid(object: &str, field: &'static str, reason: impl Into<String>) -> DirectoryError {
    DirectoryError::Invalid {
        object: object.to_string(),
        field,
        reason: reason.into(),
    }
}

/// Lists nested deeper than this are not expanded further (and say so).
const LIST_DEPTH_MAX: usize = 32;

impl Snapshot {
    /// An empty directory accepting the configured domains.
    pub fn empty(configured_domains: &[String]) -> Snapshot {
        Snapshot::new(
            configured_domains,
            Topology {
                organization: String::new(),
                site: String::new(),
                server: String::new(),
            },
            SiteConfig::default(),
            String::new(),
        )
    }

    /// An empty directory with the given site configuration.
    pub fn new(
        configured_domains: &[String],
        topology: Topology,
        site: SiteConfig,
        previous_routing: String,
    ) -> Snapshot {
        let mut snapshot = Snapshot {
            generation: 0,
            next_id: 1,
            recipients: imbl::HashMap::new(),
            by_address: imbl::HashMap::new(),
            by_alias: imbl::HashMap::new(),
            referenced_by: imbl::HashMap::new(),
            site: Arc::new(SiteConfig::default()),
            configured_domains: configured_domains
                .iter()
                .map(|d| d.to_lowercase())
                .collect(),
            accepted: Arc::default(),
            routing: Arc::default(),
            previous_routing: Arc::new(previous_routing),
            topology: Arc::new(topology),
        };
        snapshot.set_site(site);
        snapshot
    }

    /// The generation number: one more per publication.
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

    /// Every recipient sorted by alias (export order).
    pub fn recipients_by_alias(&self) -> Vec<Arc<Recipient>> {
        let mut all: Vec<Arc<Recipient>> = self.recipients.values().cloned().collect();
        all.sort_by_key(|r| r.alias.to_lowercase());
        all
    }

    /// The recipient with this identity.
    pub fn recipient(&self, id: RecipientId) -> Option<&Arc<Recipient>> {
        self.recipients.get(&id)
    }

    /// The recipient owning this address, compared case-insensitively.
    pub fn by_address(&self, address: &str) -> Option<&Arc<Recipient>> {
        self.by_address
            .get(address_key(address).as_str())
            .and_then(|id| self.recipients.get(id))
    }

    /// The recipient with this alias, compared case-insensitively.
    pub fn by_alias(&self, alias: &str) -> Option<&Arc<Recipient>> {
        self.by_alias
            .get(alias.to_lowercase().as_str())
            .and_then(|id| self.recipients.get(id))
    }

    /// The recipient with this alias or address.
    pub fn find(&self, alias_or_address: &str) -> Option<&Arc<Recipient>> {
        self.by_alias(alias_or_address)
            .or_else(|| self.by_address(alias_or_address))
    }

    /// The site configuration.
    pub fn site(&self) -> &SiteConfig {
        &self.site
    }

    /// The organization, site and server this directory belongs to.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The compiled routing table.
    pub fn routing(&self) -> &RoutingTable {
        &self.routing
    }

    /// The routing table's text before its last change.
    pub fn previous_routing(&self) -> &str {
        &self.previous_routing
    }

    /// True when mail for `domain` is delivered here rather than routed.
    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.accepted.contains(&domain.to_lowercase())
    }

    /// Every accepted domain, sorted: configured, from templates, and explicit.
    pub fn local_domains(&self) -> Vec<String> {
        self.accepted.iter().cloned().collect()
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

    /// "May this recipient use this protocol on this server?" Off at the server means
    /// off for its mailboxes; otherwise the recipient's override, if any, decides.
    pub fn may_use(&self, recipient: RecipientId, protocol: Protocol) -> bool {
        if !self.site.server_effective().get(protocol) {
            return false;
        }
        self.recipient(recipient)
            .and_then(|r| r.protocols.get(protocol))
            .unwrap_or(true)
    }

    /// Where mail to `address` goes: lists expanded (nested, loop-safe), contacts
    /// replaced by their targets, everything de-duplicated by the caller.
    pub fn expand(&self, address: &str) -> Vec<Target> {
        let mut out = Vec::new();
        match self.resolve(address) {
            Resolution::Remote => out.push(Target::Remote(address.to_string())),
            Resolution::UnknownLocal => out.push(Target::Undeliverable(
                address.to_string(),
                "5.1.1 no such recipient here".into(),
            )),
            Resolution::Local(recipient) => {
                let mut visited = HashSet::new();
                self.expand_recipient(&recipient, &mut visited, 0, &mut out);
                if out.is_empty() {
                    out.push(Target::Undeliverable(
                        address.to_string(),
                        format!(
                            "5.1.1 the distribution list {} has no members",
                            recipient.alias
                        ),
                    ));
                }
            }
        }
        out
    }

    /// Why mail to `address` could reach nobody, if that is already certain: every
    /// target of its expansion is undeliverable (an empty list, a contact without a
    /// target, a target that does not exist) or a remote address no connector routes.
    /// SMTP refuses such a recipient at RCPT, so the sender hears at once and nothing is
    /// accepted that would only turn into a DSN. None when anything would be delivered.
    pub fn refusal_at_rcpt(&self, address: &str) -> Option<String> {
        // RCPT runs on a runtime thread: answer the common cases without expanding (a
        // mailbox, or a list with a mailbox among its direct members), so a client
        // naming a 100,000-member list a hundred times costs a lookup each, not a full
        // expansion.
        if let Resolution::Local(recipient) = self.resolve(address) {
            let deliverable = |r: &Recipient| r.kind == RecipientKind::Mailbox;
            if deliverable(&recipient)
                || (recipient.kind == RecipientKind::List
                    && recipient
                        .members
                        .iter()
                        .any(|m| self.recipients.get(m).is_some_and(|m| deliverable(m))))
            {
                return None;
            }
        }
        let mut first_reason = None;
        for target in self.expand(address) {
            let reason = match target {
                Target::Mailbox(_) => return None,
                Target::Undeliverable(_, why) => why,
                Target::Remote(remote) => match self.routing().route("SMTP", &remote, 0) {
                    None => {
                        "5.4.4 no route: no connector's address space matches this address".into()
                    }
                    Some(route)
                        if self
                            .site()
                            .connectors
                            .get(&route.connector)
                            .is_some_and(|c| c.kind == crate::routing::ConnectorKind::Local) =>
                    {
                        "5.1.1 no such recipient here".into()
                    }
                    Some(_) => return None,
                },
            };
            first_reason.get_or_insert(reason);
        }
        first_reason
    }

    fn expand_recipient(
        &self,
        recipient: &Recipient,
        visited: &mut HashSet<RecipientId>,
        depth: usize,
        out: &mut Vec<Target>,
    ) {
        if !visited.insert(recipient.id) {
            return; // a loop, or a member reached twice: once is enough
        }
        match recipient.kind {
            RecipientKind::Mailbox => out.push(Target::Mailbox(recipient.id)),
            RecipientKind::Contact => {
                let Some(target) = &recipient.target_address else {
                    out.push(Target::Undeliverable(
                        recipient.alias.clone(),
                        "5.1.10 the contact has no target address".into(),
                    ));
                    return;
                };
                match self.resolve(target) {
                    Resolution::Remote => out.push(Target::Remote(target.clone())),
                    Resolution::Local(local) => {
                        self.expand_recipient(&local, visited, depth + 1, out)
                    }
                    Resolution::UnknownLocal => out.push(Target::Undeliverable(
                        target.clone(),
                        format!(
                            "5.1.1 the target of contact {} does not exist",
                            recipient.alias
                        ),
                    )),
                }
            }
            RecipientKind::List => {
                if depth >= LIST_DEPTH_MAX {
                    out.push(Target::Undeliverable(
                        recipient.alias.clone(),
                        format!("5.3.0 lists nested deeper than {LIST_DEPTH_MAX} levels"),
                    ));
                    return;
                }
                for member in &recipient.members {
                    if let Some(member) = self.recipients.get(member) {
                        self.expand_recipient(member, visited, depth + 1, out);
                    }
                }
            }
        }
    }

    pub(crate) fn with_generation(mut self, generation: u64) -> Snapshot {
        self.generation = generation;
        self
    }

    fn set_site(&mut self, site: SiteConfig) {
        let mut accepted: BTreeSet<String> = self.configured_domains.iter().cloned().collect();
        accepted.extend(site.accepted_domains.iter().map(|d| d.to_lowercase()));
        accepted.extend(
            site.addressing
                .values()
                .filter_map(|t| addressing::template_domain(t)),
        );
        let routing = RoutingTable::compile(&site.connectors, site.only_least_cost_routes);
        if routing != *self.routing {
            self.previous_routing = Arc::new(self.routing.render());
        }
        self.accepted = Arc::new(accepted);
        self.routing = Arc::new(routing);
        self.site = Arc::new(site);
    }

    /// Never hands out an identity below `floor` (start-up: identities of deleted
    /// recipients are not reused, see `StoredDirectory::id_floor`).
    pub(crate) fn reserve_ids(&mut self, floor: RecipientId) {
        self.next_id = self.next_id.max(floor);
    }

    /// Loads a stored recipient (start-up); ids stay as stored.
    pub(crate) fn load(&mut self, recipient: Recipient) {
        self.next_id = self.next_id.max(recipient.id + 1);
        self.put(recipient);
    }

    /// Inserts or replaces a recipient, keeping every index in step.
    fn put(&mut self, recipient: Recipient) {
        if let Some(old) = self.recipients.get(&recipient.id).cloned() {
            self.forget(&old);
        }
        for address in &recipient.addresses {
            self.by_address
                .insert(Arc::from(address_key(&address.address)), recipient.id);
        }
        self.by_alias
            .insert(Arc::from(recipient.alias.to_lowercase()), recipient.id);
        for referenced in recipient
            .members
            .iter()
            .chain(recipient.owner.iter())
            .chain(recipient.send_as.iter())
        {
            self.referenced_by
                .entry(*referenced)
                .or_default()
                .insert(recipient.id);
        }
        self.recipients.insert(recipient.id, Arc::new(recipient));
    }

    fn forget(&mut self, old: &Recipient) {
        for address in &old.addresses {
            self.by_address
                .remove(address_key(&address.address).as_str());
        }
        self.by_alias.remove(old.alias.to_lowercase().as_str());
        for referenced in old
            .members
            .iter()
            .chain(old.owner.iter())
            .chain(old.send_as.iter())
        {
            if let Some(lists) = self.referenced_by.get_mut(referenced) {
                lists.remove(&old.id);
                if lists.is_empty() {
                    self.referenced_by.remove(referenced);
                }
            }
        }
    }

    fn remove(&mut self, id: RecipientId) {
        if let Some(old) = self.recipients.remove(&id) {
            self.forget(&old);
        }
    }

    /// Applies one change: the next snapshot (same generation; the writer numbers
    /// publications), the rows to persist, and what happened. Changes nothing on error.
    pub fn apply(
        &self,
        change: &Change,
    ) -> Result<(Snapshot, Vec<DirectoryWrite>, Applied), DirectoryError> {
        let mut next = self.clone();
        let (writes, applied) = next.apply_in_place(change)?;
        Ok((next, writes, applied))
    }

    /// Applies one change to this snapshot itself: the rows to persist, and what
    /// happened. On error the snapshot is unchanged, because every check comes before
    /// the first mutation (`build` only reads; `commit`, `delete` and `set_site` cannot
    /// fail): keep it so.
    ///
    /// Why in place: the maps are persistent (imbl), and a change applied to a copy
    /// while the original lives copies every node on its path, keys included. A batch
    /// of an import applied copy by copy spent half the directory writer's CPU in those
    /// copies and their frees (the churn replay's profile); in place, a node is copied
    /// once per batch, the first time it is touched after the last publication.
    pub fn apply_in_place(
        &mut self,
        change: &Change,
    ) -> Result<(Vec<DirectoryWrite>, Applied), DirectoryError> {
        let next = self;
        let mut writes = Vec::new();
        let mut applied = Applied::default();
        match change {
            Change::CreateRecipient(fields) => {
                let recipient = next.build(None, fields, &mut applied)?;
                applied.recipient = Some(next.commit(recipient, &mut writes));
            }
            Change::UpsertRecipient(fields) => {
                let alias = fields.alias.as_deref().unwrap_or("");
                let existing = next.by_alias(alias).cloned();
                let recipient = next.build(existing.as_deref(), fields, &mut applied)?;
                applied.recipient = Some(next.commit(recipient, &mut writes));
            }
            Change::ModifyRecipient { alias, fields } => {
                let existing = next.find(alias).cloned().ok_or_else(|| {
                    invalid(alias, "alias", "no recipient has this alias or address")
                })?;
                let recipient = next.build(Some(&existing), fields, &mut applied)?;
                applied.recipient = Some(next.commit(recipient, &mut writes));
            }
            Change::DeleteRecipient { alias } => {
                let existing = next.find(alias).cloned().ok_or_else(|| {
                    invalid(alias, "alias", "no recipient has this alias or address")
                })?;
                next.delete(&existing, &mut writes);
                applied.recipient = Some(existing);
            }
            Change::SetPassword {
                address,
                password_hash,
            } => {
                let existing = next
                    .find(address)
                    .cloned()
                    .ok_or_else(|| invalid(address, "address", "no recipient has this address"))?;
                if existing.kind != RecipientKind::Mailbox {
                    return Err(invalid(
                        address,
                        "password",
                        "only mailboxes have passwords",
                    ));
                }
                let mut recipient = (*existing).clone();
                recipient.password_hash = Some(password_hash.clone());
                applied.recipient = Some(next.commit(recipient, &mut writes));
            }
            Change::RegenerateAddresses { ids } => {
                // Oldest first, so collisions resolve the same way every time.
                let mut ids = ids.clone();
                ids.sort_unstable();
                for id in &ids {
                    if let Some(existing) = next.recipients.get(id).cloned() {
                        match next.regenerate(&existing) {
                            Ok(Some((recipient, note))) => {
                                applied.notes.extend(note);
                                applied.changed += 1;
                                next.commit(recipient, &mut writes);
                            }
                            Ok(None) => {}
                            Err(e) => {
                                applied.failed += 1;
                                applied.notes.push(e.to_string());
                            }
                        }
                    }
                }
            }
            Change::Site(site_change) => {
                let mut site = (*next.site).clone();
                site_change.apply_to(&mut site)?;
                if site != *next.site {
                    next.set_site(site);
                    writes.push(next.site_write());
                }
            }
        }
        Ok((writes, applied))
    }

    fn site_write(&self) -> DirectoryWrite {
        DirectoryWrite::PutSettings {
            site: serde_json::to_string(&*self.site).expect("site serialises"),
            previous_routing: (*self.previous_routing).clone(),
        }
    }

    /// Stores `recipient` in this snapshot and records the row to persist.
    fn commit(&mut self, recipient: Recipient, writes: &mut Vec<DirectoryWrite>) -> Arc<Recipient> {
        writes.push(DirectoryWrite::PutRecipient(row_of(&recipient)));
        let id = recipient.id;
        self.next_id = self.next_id.max(id + 1);
        self.put(recipient);
        self.recipients[&id].clone()
    }

    fn delete(&mut self, existing: &Recipient, writes: &mut Vec<DirectoryWrite>) {
        // Lists that name it as a member or owner lose the reference.
        let referencing: Vec<Arc<Recipient>> = self
            .referenced_by
            .get(&existing.id)
            .map(|lists| {
                lists
                    .iter()
                    .filter_map(|id| self.recipients.get(id).cloned())
                    .collect()
            })
            .unwrap_or_default();
        for list in referencing {
            let mut list = (*list).clone();
            list.members.retain(|m| *m != existing.id);
            list.send_as.retain(|m| *m != existing.id);
            if list.owner == Some(existing.id) {
                list.owner = None;
            }
            self.commit(list, writes);
        }
        self.remove(existing.id);
        writes.push(DirectoryWrite::DeleteRecipient(existing.id));
    }

    /// Builds the recipient `fields` describe, on top of `existing` when modifying.
    fn build(
        &self,
        existing: Option<&Recipient>,
        fields: &RecipientFields,
        applied: &mut Applied,
    ) -> Result<Recipient, DirectoryError> {
        let object = fields
            .alias
            .clone()
            .or_else(|| existing.map(|e| e.alias.clone()))
            .or_else(|| fields.addresses.as_ref().and_then(|a| a.first().cloned()))
            .unwrap_or_else(|| "(new recipient)".into());
        let mut r = match existing {
            Some(e) => e.clone(),
            None => Recipient::new(self.next_id, fields.kind.unwrap_or_default(), ""),
        };
        if let (Some(kind), Some(e)) = (fields.kind, existing)
            && kind != e.kind
        {
            return Err(invalid(
                &object,
                "kind",
                format!("is a {:?}; delete it and create a {kind:?} instead", e.kind),
            ));
        }
        // Alias: given, or kept, or the local part of the first address.
        if let Some(alias) = &fields.alias {
            r.alias = alias.trim().to_string();
        }
        if r.alias.is_empty() {
            r.alias = fields
                .addresses
                .as_ref()
                .and_then(|a| a.first())
                .map(|a| strip_proxy_prefix(a).0)
                .map(|a| a.split_once('@').map_or(a.clone(), |(l, _)| l.to_string()))
                .unwrap_or_default();
        }
        if r.alias.is_empty() {
            return Err(invalid(
                &object,
                "alias",
                "is required (or give an address)",
            ));
        }
        if r.alias
            .chars()
            .any(|c| c.is_control() || c == '%' || c == ',')
            || r.alias.len() > 256
        {
            return Err(invalid(
                &object,
                "alias",
                "must be printable, without % or commas, at most 256 characters",
            ));
        }
        let set = |target: &mut String, value: &Option<String>| {
            if let Some(v) = value {
                *target = v.trim().to_string();
            }
        };
        set(&mut r.display_name, &fields.display_name);
        set(&mut r.given_name, &fields.given_name);
        set(&mut r.surname, &fields.surname);
        set(&mut r.initials, &fields.initials);
        if let Some(hidden) = fields.hidden {
            r.hidden = hidden;
        }
        if let Some(admin) = fields.admin {
            if admin && r.kind != RecipientKind::Mailbox {
                return Err(invalid(
                    &object,
                    "admin",
                    "only a mailbox (which has a password) can be an administrator",
                ));
            }
            r.admin = admin;
        }
        if let Some(hash) = &fields.password_hash {
            r.password_hash = Some(hash.clone());
        }
        if let Some(entries) = &fields.protocols {
            let mut overrides = ProtocolOverrides::default();
            for entry in entries {
                overrides
                    .apply_csv(entry)
                    .map_err(|reason| invalid(&object, "protocols", reason))?;
            }
            r.protocols = overrides;
        }
        if let Some(q) = fields.quota_warning_kb {
            r.quota.warning_kb = (q > 0).then_some(q);
        }
        if let Some(q) = fields.quota_prohibit_send_kb {
            r.quota.prohibit_send_kb = (q > 0).then_some(q);
        }
        if let Some(q) = fields.quota_prohibit_send_receive_kb {
            r.quota.prohibit_send_receive_kb = (q > 0).then_some(q);
        }
        self.build_kind_fields(&mut r, fields, &object)?;
        let addresses = relative_addresses(&r, fields);
        self.build_addresses(&mut r, addresses.as_deref(), &object, applied)?;
        if let Some(other) = self.by_alias(&r.alias)
            && other.id != r.id
        {
            return Err(invalid(
                &object,
                "alias",
                format!("{:?} is already used by another recipient", r.alias),
            ));
        }
        Ok(r)
    }

    fn build_kind_fields(
        &self,
        r: &mut Recipient,
        fields: &RecipientFields,
        object: &str,
    ) -> Result<(), DirectoryError> {
        if let Some(target) = &fields.target_address {
            let target = strip_proxy_prefix(target).0;
            r.target_address = (!target.is_empty()).then_some(target);
        }
        let members = relative_members(self, r, fields);
        if let Some(members) = &members {
            if r.kind != RecipientKind::List && !members.is_empty() {
                return Err(invalid(
                    object,
                    "members",
                    "only distribution lists have members",
                ));
            }
            let mut ids = Vec::with_capacity(members.len());
            for member in members {
                let found = self.find(member.trim()).ok_or_else(|| {
                    invalid(object, "members", format!("no recipient {member:?}"))
                })?;
                if found.id == r.id {
                    return Err(invalid(object, "members", "a list cannot contain itself"));
                }
                if !ids.contains(&found.id) {
                    ids.push(found.id);
                }
            }
            r.members = ids;
        }
        if let Some(owner) = &fields.owner {
            r.owner = if owner.trim().is_empty() {
                None
            } else {
                Some(
                    self.find(owner.trim())
                        .ok_or_else(|| invalid(object, "owner", format!("no recipient {owner:?}")))?
                        .id,
                )
            };
        }
        if let Some(grants) = &fields.send_as {
            let mut ids = Vec::with_capacity(grants.len());
            for grant in grants.iter().map(|g| g.trim()).filter(|g| !g.is_empty()) {
                let found = self
                    .find(grant)
                    .ok_or_else(|| invalid(object, "send_as", format!("no recipient {grant:?}")))?;
                if found.kind != RecipientKind::Mailbox {
                    return Err(invalid(
                        object,
                        "send_as",
                        format!("{grant:?} is not a mailbox: only mailboxes send mail"),
                    ));
                }
                if found.id != r.id && !ids.contains(&found.id) {
                    ids.push(found.id);
                }
            }
            r.send_as = ids;
        }
        match r.kind {
            RecipientKind::Contact => {
                let target = r.target_address.as_deref().ok_or_else(|| {
                    invalid(object, "target_address", "a contact needs a target address")
                })?;
                validate_address(target)
                    .map_err(|reason| invalid(object, "target_address", reason))?;
            }
            _ if r.target_address.is_some() => {
                return Err(invalid(
                    object,
                    "target_address",
                    "only contacts have a target address",
                ));
            }
            _ => {}
        }
        Ok(())
    }

    fn build_addresses(
        &self,
        r: &mut Recipient,
        given: Option<&[String]>,
        object: &str,
        applied: &mut Applied,
    ) -> Result<(), DirectoryError> {
        let template = self.site.addressing.get("SMTP");
        let generated_now =
            template.and_then(|t| addressing::expand(t, &name_parts(r)).ok().flatten());
        if let Some(entries) = given {
            let mut addresses: Vec<ProxyAddress> = Vec::with_capacity(entries.len());
            for entry in entries.iter().filter(|e| !e.trim().is_empty()) {
                let (address, primary) = strip_proxy_prefix(entry);
                validate_address(&address)
                    .map_err(|reason| invalid(object, "addresses", reason))?;
                let domain = domain_of(&address).unwrap_or_default();
                if !self.is_local_domain(&domain) {
                    return Err(invalid(
                        object,
                        "addresses",
                        format!(
                            "{domain} is not an accepted domain; add it first (mailroom domain add {domain})"
                        ),
                    ));
                }
                if addresses
                    .iter()
                    .any(|a| a.address.eq_ignore_ascii_case(&address))
                {
                    continue;
                }
                let kept = r
                    .addresses
                    .iter()
                    .find(|a| a.address.eq_ignore_ascii_case(&address))
                    .map(|a| a.generated);
                let generated = kept.unwrap_or_else(|| {
                    generated_now
                        .as_deref()
                        .is_some_and(|g| g.eq_ignore_ascii_case(&address))
                });
                addresses.push(ProxyAddress {
                    address,
                    primary: primary == Some(true),
                    generated,
                });
            }
            match addresses.iter().filter(|a| a.primary).count() {
                0 => {
                    if let Some(first) = addresses.first_mut() {
                        first.primary = true;
                    }
                }
                1 => {}
                _ => {
                    return Err(invalid(
                        object,
                        "addresses",
                        "more than one primary (SMTP:) address",
                    ));
                }
            }
            r.addresses = addresses;
        }
        if r.addresses.is_empty() {
            let Some(address) = generated_now else {
                return Err(invalid(
                    object,
                    "addresses",
                    match template {
                        None => "no address given and no site addressing template to generate one"
                            .to_string(),
                        Some(t) => format!(
                            "the template {t} gives no address for this recipient (empty names?)"
                        ),
                    },
                ));
            };
            let (address, suffixed) = addressing::first_free(&address, |a| {
                self.by_address(a).is_some_and(|other| other.id != r.id)
            });
            if suffixed {
                applied.notes.push(format!(
                    "{}: generated address taken, used {address}",
                    r.alias
                ));
            }
            r.addresses.push(ProxyAddress {
                address,
                primary: true,
                generated: true,
            });
        }
        for address in &r.addresses {
            if let Some(other) = self.by_address(&address.address)
                && other.id != r.id
            {
                return Err(invalid(
                    object,
                    "addresses",
                    format!("{} is already used by {}", address.address, other.alias),
                ));
            }
        }
        Ok(())
    }

    /// The recipient with its generated primary address renewed from the current
    /// template, or `None` when nothing changes. The old address stays as a manual
    /// secondary address, so mail to it still arrives.
    fn regenerate(
        &self,
        existing: &Recipient,
    ) -> Result<Option<(Recipient, Option<String>)>, DirectoryError> {
        let Some(template) = self.site.addressing.get("SMTP") else {
            return Ok(None);
        };
        let Some(current) = existing.addresses.iter().find(|a| a.primary && a.generated) else {
            return Ok(None); // manual primary addresses are never touched
        };
        let Some(wanted) = addressing::expand(template, &name_parts(existing))
            .ok()
            .flatten()
        else {
            return Err(invalid(
                &existing.alias,
                "addresses",
                format!("the template {template} gives no address"),
            ));
        };
        if wanted.eq_ignore_ascii_case(&current.address) {
            return Ok(None);
        }
        let (address, suffixed) = addressing::first_free(&wanted, |a| {
            self.by_address(a)
                .is_some_and(|other| other.id != existing.id)
        });
        if address.eq_ignore_ascii_case(&current.address) {
            return Ok(None); // already what the template gives, after collisions
        }
        let mut r = existing.clone();
        for a in &mut r.addresses {
            if a.primary {
                a.primary = false;
                a.generated = false; // the old address stays, as a manual secondary
            }
        }
        r.addresses
            .retain(|a| !a.address.eq_ignore_ascii_case(&address));
        r.addresses.insert(
            0,
            ProxyAddress {
                address: address.clone(),
                primary: true,
                generated: true,
            },
        );
        let note =
            suffixed.then(|| format!("{}: generated address taken, used {address}", r.alias));
        Ok(Some((r, note)))
    }

    /// Snapshot loading helper for the writer: the stored site and routing text.
    pub(crate) fn restore_site(&mut self, site: SiteConfig, previous_routing: String) {
        self.set_site(site);
        self.previous_routing = Arc::new(previous_routing);
    }
}

/// The address list a change asks for: `addresses` (or the current ones) with
/// `add_addresses` added and `remove_addresses` removed; `None` when none is given.
fn relative_addresses(r: &Recipient, fields: &RecipientFields) -> Option<Vec<String>> {
    if fields.addresses.is_none()
        && fields.add_addresses.is_empty()
        && fields.remove_addresses.is_empty()
    {
        return None;
    }
    let mut list: Vec<String> = match &fields.addresses {
        Some(given) => given.clone(),
        None => r
            .addresses
            .iter()
            .map(|a| format!("{}:{}", if a.primary { "SMTP" } else { "smtp" }, a.address))
            .collect(),
    };
    list.extend(fields.add_addresses.iter().cloned());
    let removed: Vec<String> = fields
        .remove_addresses
        .iter()
        .map(|a| strip_proxy_prefix(a).0.to_lowercase())
        .collect();
    list.retain(|a| !removed.contains(&strip_proxy_prefix(a).0.to_lowercase()));
    Some(list)
}

/// The member list a change asks for, like [`relative_addresses`].
fn relative_members(
    snapshot: &Snapshot,
    r: &Recipient,
    fields: &RecipientFields,
) -> Option<Vec<String>> {
    if fields.members.is_none() && fields.add_members.is_empty() && fields.remove_members.is_empty()
    {
        return None;
    }
    let mut list: Vec<String> = match &fields.members {
        Some(given) => given.clone(),
        None => r
            .members
            .iter()
            .filter_map(|id| snapshot.recipient(*id).map(|m| m.alias.clone()))
            .collect(),
    };
    list.extend(fields.add_members.iter().cloned());
    let removed: Vec<i64> = fields
        .remove_members
        .iter()
        .filter_map(|m| snapshot.find(m.trim()).map(|f| f.id))
        .collect();
    list.retain(|m| {
        snapshot
            .find(m.trim())
            .is_none_or(|f| !removed.contains(&f.id))
    });
    Some(list)
}

/// The template inputs of a recipient.
pub(crate) fn name_parts(r: &Recipient) -> NameParts<'_> {
    NameParts {
        given_name: &r.given_name,
        surname: &r.surname,
        initials: &r.initials,
        display_name: &r.display_name,
        alias: &r.alias,
    }
}

/// `SMTP:a@b` -> (`a@b`, Some(true)); `smtp:a@b` -> (`a@b`, Some(false)); `a@b` -> (`a@b`, None).
pub fn strip_proxy_prefix(entry: &str) -> (String, Option<bool>) {
    let entry = entry.trim();
    match entry.split_once(':') {
        Some((kind, address)) if kind.eq_ignore_ascii_case("smtp") => {
            (address.trim().to_string(), Some(kind == "SMTP"))
        }
        _ => (entry.to_string(), None),
    }
}

/// The stored row of a recipient.
pub(crate) fn row_of(r: &Recipient) -> RecipientRow {
    RecipientRow {
        id: r.id,
        alias: r.alias.clone(),
        kind: serde_json::to_value(r.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        display_name: r.display_name.clone(),
        addresses: r
            .addresses
            .iter()
            .map(|a| AddressRecord {
                address: a.address.clone(),
                primary: a.primary,
                generated: a.generated,
            })
            .collect(),
        doc: serde_json::to_string(r).expect("recipient serialises"),
        password_hash: r.password_hash.clone(),
    }
}

/// A recipient from its stored row (rows written before documents existed have `{}`).
pub(crate) fn from_row(row: RecipientRow) -> Recipient {
    let mut r: Recipient = serde_json::from_str(&row.doc)
        .unwrap_or_else(|_| Recipient::new(row.id, RecipientKind::Mailbox, &row.alias));
    r.id = row.id;
    r.alias = row.alias;
    r.display_name = row.display_name;
    r.addresses = row
        .addresses
        .into_iter()
        .map(|a| ProxyAddress {
            address: a.address,
            primary: a.primary,
            generated: a.generated,
        })
        .collect();
    r.password_hash = row.password_hash;
    r
}
