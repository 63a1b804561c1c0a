//! The directory's objects: recipients (mailboxes, contacts, distribution lists) and the
//! site's configuration (addressing templates, accepted domains, protocol settings,
//! connectors).
//!
//! These are plain values. They are persisted as JSON documents (recipients) and one
//! JSON settings value (the site), so adding a field is a serde default, not a schema
//! migration; the store keeps addresses and aliases in indexed columns as a second line
//! of defence for uniqueness.

use crate::routing::Connector;
use mailroom_store::RecipientId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What a recipient is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RecipientKind {
    /// A mailbox in this server's store.
    #[default]
    Mailbox,
    /// A custom recipient: a contact whose mail goes to an external target address.
    Contact,
    /// A distribution list.
    List,
}

impl RecipientKind {
    /// The classic CSV `Obj-Class` value.
    pub fn obj_class(self) -> &'static str {
        match self {
            RecipientKind::Mailbox => "Mailbox",
            RecipientKind::Contact => "Remote",
            RecipientKind::List => "dl",
        }
    }

    /// Parses a classic `Obj-Class` value (case-insensitive).
    pub fn from_obj_class(text: &str) -> Option<RecipientKind> {
        match text.trim().to_ascii_lowercase().as_str() {
            "mailbox" => Some(RecipientKind::Mailbox),
            "remote" | "contact" | "custom" => Some(RecipientKind::Contact),
            "dl" | "list" | "distribution list" => Some(RecipientKind::List),
            _ => None,
        }
    }
}

/// One e-mail (proxy) address of a recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyAddress {
    /// The address.
    pub address: String,
    /// True for the one primary (reply) address.
    pub primary: bool,
    /// True when site addressing generated it (and may regenerate it).
    pub generated: bool,
}

/// Mailbox size limits in KB; `None` means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Quota {
    /// Warn the owner above this size.
    #[serde(default)]
    pub warning_kb: Option<u64>,
    /// Above this size the owner may not send.
    #[serde(default)]
    pub prohibit_send_kb: Option<u64>,
    /// Above this size the owner may not send and mail to the mailbox is refused.
    #[serde(default)]
    pub prohibit_send_receive_kb: Option<u64>,
}

/// The client protocols the directory governs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// SMTP submission by an authenticated user.
    SmtpSubmission,
    /// IMAP4.
    Imap,
    /// POP3.
    Pop3,
}

impl Protocol {
    /// Every protocol.
    pub const ALL: [Protocol; 3] = [Protocol::SmtpSubmission, Protocol::Imap, Protocol::Pop3];

    /// The name used in the CLI, CSV and API.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::SmtpSubmission => "smtp",
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
        }
    }

    /// Parses [`Protocol::name`] (case-insensitive; `submission` also means SMTP).
    pub fn parse(text: &str) -> Option<Protocol> {
        match text.trim().to_ascii_lowercase().as_str() {
            "smtp" | "submission" | "smtp_submission" => Some(Protocol::SmtpSubmission),
            "imap" | "imap4" => Some(Protocol::Imap),
            "pop3" | "pop" => Some(Protocol::Pop3),
            _ => None,
        }
    }
}

/// One on/off value per protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolSet {
    /// SMTP submission.
    pub smtp_submission: bool,
    /// IMAP.
    pub imap: bool,
    /// POP3.
    pub pop3: bool,
}

impl Default for ProtocolSet {
    fn default() -> Self {
        ProtocolSet {
            smtp_submission: true,
            imap: true,
            pop3: true,
        }
    }
}

impl ProtocolSet {
    /// The value for one protocol.
    pub fn get(&self, protocol: Protocol) -> bool {
        match protocol {
            Protocol::SmtpSubmission => self.smtp_submission,
            Protocol::Imap => self.imap,
            Protocol::Pop3 => self.pop3,
        }
    }

    /// Sets the value for one protocol.
    pub fn set(&mut self, protocol: Protocol, on: bool) {
        match protocol {
            Protocol::SmtpSubmission => self.smtp_submission = on,
            Protocol::Imap => self.imap = on,
            Protocol::Pop3 => self.pop3 = on,
        }
    }
}

/// A recipient's per-protocol overrides; `None` inherits from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ProtocolOverrides {
    /// SMTP submission.
    #[serde(default)]
    pub smtp_submission: Option<bool>,
    /// IMAP.
    #[serde(default)]
    pub imap: Option<bool>,
    /// POP3.
    #[serde(default)]
    pub pop3: Option<bool>,
}

impl ProtocolOverrides {
    /// The override for one protocol.
    pub fn get(&self, protocol: Protocol) -> Option<bool> {
        match protocol {
            Protocol::SmtpSubmission => self.smtp_submission,
            Protocol::Imap => self.imap,
            Protocol::Pop3 => self.pop3,
        }
    }

    /// Sets (or with `None` clears) the override for one protocol.
    pub fn set(&mut self, protocol: Protocol, value: Option<bool>) {
        match protocol {
            Protocol::SmtpSubmission => self.smtp_submission = value,
            Protocol::Imap => self.imap = value,
            Protocol::Pop3 => self.pop3 = value,
        }
    }

    /// The CSV form: `imap:off%pop3:on` (only the overridden protocols).
    pub fn to_csv(&self) -> Vec<String> {
        Protocol::ALL
            .iter()
            .filter_map(|p| {
                self.get(*p)
                    .map(|on| format!("{}:{}", p.name(), if on { "on" } else { "off" }))
            })
            .collect()
    }

    /// Parses one `protocol:on|off|default` value.
    pub fn apply_csv(&mut self, value: &str) -> Result<(), String> {
        let (name, state) = value
            .split_once([':', '='])
            .ok_or_else(|| format!("{value:?} is not protocol:on|off|default"))?;
        let protocol = Protocol::parse(name)
            .ok_or_else(|| format!("unknown protocol {name:?} (smtp, imap, pop3)"))?;
        let state = match state.trim().to_ascii_lowercase().as_str() {
            "on" | "true" | "yes" | "1" | "enabled" => Some(true),
            "off" | "false" | "no" | "0" | "disabled" => Some(false),
            "default" | "inherit" => None,
            other => return Err(format!("{other:?} is not on, off or default")),
        };
        self.set(protocol, state);
        Ok(())
    }
}

/// A recipient of any kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// Store identity.
    pub id: RecipientId,
    /// Mailbox, contact or list.
    pub kind: RecipientKind,
    /// The mailbox name (the classic "Directory Name"): unique, the import/export key.
    pub alias: String,
    /// Display name.
    #[serde(default)]
    pub display_name: String,
    /// Given name (`%g`).
    #[serde(default)]
    pub given_name: String,
    /// Surname (`%s`).
    #[serde(default)]
    pub surname: String,
    /// Initials (`%i`).
    #[serde(default)]
    pub initials: String,
    /// E-mail addresses; exactly one is primary.
    #[serde(default)]
    pub addresses: Vec<ProxyAddress>,
    /// A contact's external address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_address: Option<String>,
    /// A list's members, by identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<RecipientId>,
    /// A list's owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<RecipientId>,
    /// Mailboxes granted "send as" this recipient (Exchange's Send As permission): they
    /// may use its addresses as the sender on the submission ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub send_as: Vec<RecipientId>,
    /// Hidden from the address book.
    #[serde(default)]
    pub hidden: bool,
    /// May sign in to the web admin (the administrator role; the first-start
    /// postmaster has it, `mailroom recipient role ADDR admin` grants it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
    /// Per-protocol overrides.
    #[serde(default)]
    pub protocols: ProtocolOverrides,
    /// Size limits.
    #[serde(default)]
    pub quota: Quota,
    /// Argon2id PHC string, when a password is set. Never serialised to clients.
    #[serde(skip)]
    pub password_hash: Option<String>,
}

impl Recipient {
    /// A recipient with nothing but an identity, a kind and an alias.
    pub fn new(id: RecipientId, kind: RecipientKind, alias: &str) -> Recipient {
        Recipient {
            id,
            kind,
            alias: alias.to_string(),
            display_name: String::new(),
            given_name: String::new(),
            surname: String::new(),
            initials: String::new(),
            addresses: Vec::new(),
            target_address: None,
            members: Vec::new(),
            owner: None,
            send_as: Vec::new(),
            hidden: false,
            admin: false,
            protocols: ProtocolOverrides::default(),
            quota: Quota::default(),
            password_hash: None,
        }
    }

    /// The primary address, if the recipient has any address.
    pub fn primary_address(&self) -> Option<&str> {
        self.addresses
            .iter()
            .find(|a| a.primary)
            .or(self.addresses.first())
            .map(|a| a.address.as_str())
    }

    /// Every address, primary first.
    pub fn address_list(&self) -> impl Iterator<Item = &str> {
        let primary = self.primary_address();
        primary.into_iter().chain(
            self.addresses
                .iter()
                .map(|a| a.address.as_str())
                .filter(move |a| Some(*a) != primary),
        )
    }
}

/// The site's configuration: what every server of the site shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteConfig {
    /// Site addressing: one template per address type (`SMTP` -> `%g.%s@example.com`).
    #[serde(default)]
    pub addressing: BTreeMap<String, String>,
    /// Accepted domains entered explicitly (besides the templates' domains and the
    /// configured ones).
    #[serde(default)]
    pub accepted_domains: BTreeSet<String>,
    /// Site protocol defaults.
    #[serde(default)]
    pub site_protocols: ProtocolSet,
    /// This server uses the site defaults (true) or its own settings.
    #[serde(default = "yes")]
    pub server_uses_site_defaults: bool,
    /// This server's own protocol settings, when it does not use the site's.
    #[serde(default)]
    pub server_protocols: ProtocolSet,
    /// Connectors by name.
    #[serde(default)]
    pub connectors: BTreeMap<String, Connector>,
    /// Never use a costlier route when the cheapest is unavailable.
    #[serde(default)]
    pub only_least_cost_routes: bool,
}

fn yes() -> bool {
    true
}

impl Default for SiteConfig {
    fn default() -> Self {
        SiteConfig {
            addressing: BTreeMap::new(),
            accepted_domains: BTreeSet::new(),
            site_protocols: ProtocolSet::default(),
            server_uses_site_defaults: true,
            server_protocols: ProtocolSet::default(),
            connectors: BTreeMap::new(),
            only_least_cost_routes: false,
        }
    }
}

impl SiteConfig {
    /// The protocols this server offers, after inheritance.
    pub fn server_effective(&self) -> ProtocolSet {
        if self.server_uses_site_defaults {
            self.site_protocols
        } else {
            self.server_protocols
        }
    }
}
