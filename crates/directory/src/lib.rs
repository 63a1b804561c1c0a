//! Mailroom's directory: recipients and their addresses, as immutable snapshots.
//!
//! Purpose: answer "who is this address?" and "is this domain ours?" for every unit of
//! work without ever making a reader wait for a writer. This is the answer to the
//! classic server's wedge (DESIGN.md): there is no cache to rebuild under a lock.
//!
//! - Readers call [`Directory::snapshot`] once per unit of work (an SMTP transaction, one
//!   conversion) and use only that value. Loading is a lock-free `arc-swap` read.
//! - Every change goes through the single writer thread ([`Directory::start`]), fed by a
//!   bounded channel. It drains whatever is pending, validates each change against the
//!   current snapshot, applies the valid ones in one store transaction and publishes one
//!   new snapshot with the next generation number. Invalid changes get an error that
//!   names the object and the field; the published snapshot stays as it was.
//! - Snapshots are persistent maps (`imbl`): publishing after one change copies a few
//!   tree nodes, not the directory.
//!
//! The model (`model`): mailboxes, contacts and distribution lists with names, proxy
//! addresses (generated or manual), protocol overrides and quotas; the site's addressing
//! templates (`addressing`), accepted domains, protocol settings, and connectors with the
//! compiled routing table (`routing`).
//!
//! What it never does: hold a lock, touch the network, or block a reader.

pub mod addressing;
pub mod bulk;
pub mod jobs;
pub mod login;
pub mod model;
mod password;
pub mod routing;
mod snapshot;
mod writer;

pub use model::{
    Protocol, ProtocolOverrides, ProtocolSet, ProxyAddress, Quota, Recipient, RecipientKind,
    SiteConfig,
};
pub use password::{generate_password, hash_password, verify_password};
pub use snapshot::{Applied, Resolution, Snapshot, Target, strip_proxy_prefix};
pub use writer::{Change, Directory, DirectoryError, RecipientFields, SiteChange, dry_run};

/// Normalises an address for lookup: the whole address compared case-insensitively,
/// as every mainstream server does in practice (RFC 5321 allows a case-sensitive local
/// part, but no administrator expects `Alice@` and `alice@` to be two people).
pub fn address_key(address: &str) -> String {
    address.trim().to_lowercase()
}

/// The domain part of an address, lower-cased; `None` when there is no `@`.
pub fn domain_of(address: &str) -> Option<String> {
    address
        .rsplit_once('@')
        .map(|(_, domain)| domain.to_lowercase())
}

/// Checks that `address` looks like `local@domain` with nothing a mail system would
/// choke on; returns the reason when it does not.
pub fn validate_address(address: &str) -> Result<(), String> {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Err(format!("{address:?} has no @"));
    };
    if local.is_empty() || domain.is_empty() {
        return Err(format!("{address:?} needs text on both sides of the @"));
    }
    if address.len() > 254 {
        return Err(format!("{address:?} is longer than 254 characters"));
    }
    if let Some(bad) = address
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || "<>()[]\\,;:\"".contains(*c))
    {
        return Err(format!("{address:?} contains {bad:?}"));
    }
    if domain.starts_with('.') || domain.ends_with('.') || domain.contains("..") {
        return Err(format!("{address:?} has a malformed domain"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod handoff_model;
