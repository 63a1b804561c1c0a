//! The single directory writer and the handle readers and admins hold.

use crate::snapshot::{Recipient, Snapshot};
use crate::{address_key, validate_address};
use arc_swap::ArcSwap;
use mailroom_store::{DirectoryChange, MailStore, NewRecipient, RecipientRecord, Topology};
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Pending changes the writer accepts before senders wait (bounded, DESIGN.md rule 5).
const REQUESTS_MAX: usize = 1024;

/// Changes applied in one store transaction and one publication, at most.
const BATCH_MAX: usize = 512;

/// A change to the directory, as the admin API and CLI express it.
#[derive(Debug, Clone)]
pub enum Change {
    /// Create a mailbox recipient.
    CreateMailbox {
        /// Its primary SMTP address.
        address: String,
        /// Display name; may be empty.
        display_name: String,
        /// Mailbox name; defaults to the address's local part.
        alias: Option<String>,
        /// More addresses delivering to the same mailbox.
        secondary_addresses: Vec<String>,
        /// Argon2id PHC string, when a password is set.
        password_hash: Option<String>,
    },
    /// Set the password of the recipient owning `address`.
    SetPassword {
        /// Any address of the recipient.
        address: String,
        /// The new Argon2id PHC string.
        password_hash: String,
    },
}

/// Why a change was not applied.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DirectoryError {
    /// The change is invalid; names the object and field. Nothing was changed.
    #[error("{object}: field {field}: {reason}")]
    Invalid {
        /// The recipient (or other object) the change named.
        object: String,
        /// The field at fault.
        field: &'static str,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The store failed; the change was not applied.
    #[error("the directory could not be saved: {0}")]
    Store(String),
    /// The writer is gone (the server is shutting down).
    #[error("the directory writer has stopped; the server is shutting down")]
    Stopped,
}

struct Request {
    change: Change,
    reply: oneshot::Sender<Result<Arc<Recipient>, DirectoryError>>,
}

/// The directory as the rest of the server holds it: read snapshots, submit changes.
#[derive(Clone)]
pub struct Directory {
    /// The published snapshot; readers load it lock-free.
    current: Arc<ArcSwap<Snapshot>>,
    /// The writer's input (bounded).
    requests: mpsc::Sender<Request>,
}

impl Directory {
    /// Loads the directory from the store, publishes generation 1 and starts the writer
    /// thread. The thread ends when the last `Directory` handle is dropped.
    pub fn start(
        store: Arc<dyn MailStore>,
        configured_domains: &[String],
        topology: &Topology,
    ) -> Result<(Directory, std::thread::JoinHandle<()>), DirectoryError> {
        let store_error = |e: mailroom_store::StoreError| DirectoryError::Store(e.to_string());
        let topology = store.ensure_topology(topology).map_err(store_error)?;
        let records = store.load_recipients().map_err(store_error)?;
        let mut snapshot = Snapshot::with_topology(configured_domains, topology);
        for record in records {
            snapshot = snapshot.with_recipient(record.into());
        }
        let current = Arc::new(ArcSwap::from_pointee(snapshot.with_generation(1)));
        let (requests, receiver) = mpsc::channel(REQUESTS_MAX);
        let writer = Writer {
            store,
            current: current.clone(),
            receiver,
        };
        let thread = std::thread::Builder::new()
            .name("directory-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| DirectoryError::Store(format!("cannot start the writer: {e}")))?;
        Ok((Directory { current, requests }, thread))
    }

    /// The current snapshot. Load once per unit of work and use only that value.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Submits a change and waits until it is applied and published (or rejected).
    pub async fn apply(&self, change: Change) -> Result<Arc<Recipient>, DirectoryError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request { change, reply })
            .await
            .map_err(|_| DirectoryError::Stopped)?;
        answer.await.map_err(|_| DirectoryError::Stopped)?
    }

    /// [`Directory::apply`] for threads outside the async runtime.
    pub fn apply_blocking(&self, change: Change) -> Result<Arc<Recipient>, DirectoryError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .blocking_send(Request { change, reply })
            .map_err(|_| DirectoryError::Stopped)?;
        answer
            .blocking_recv()
            .map_err(|_| DirectoryError::Stopped)?
    }
}

struct Writer {
    store: Arc<dyn MailStore>,
    current: Arc<ArcSwap<Snapshot>>,
    receiver: mpsc::Receiver<Request>,
}

/// A change that passed validation, waiting for the store.
struct Valid {
    change: DirectoryChange,
    reply: oneshot::Sender<Result<Arc<Recipient>, DirectoryError>>,
}

impl Writer {
    fn run(mut self) {
        while let Some(first) = self.receiver.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH_MAX {
                match self.receiver.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.apply_batch(batch);
        }
        tracing::debug!("directory writer stopped");
    }

    fn apply_batch(&self, batch: Vec<Request>) {
        let base = self.current.load_full();
        let mut claimed = Claimed::default();
        let mut valid = Vec::with_capacity(batch.len());
        for request in batch {
            match validate(&base, &mut claimed, request.change) {
                Ok(change) => valid.push(Valid {
                    change,
                    reply: request.reply,
                }),
                Err(error) => {
                    let _ = request.reply.send(Err(error));
                }
            }
        }
        if valid.is_empty() {
            return;
        }
        let changes: Vec<DirectoryChange> = valid.iter().map(|v| v.change.clone()).collect();
        match self.store.apply_directory_changes(&changes) {
            Ok(records) => self.publish(&base, valid, records),
            // One transaction failed: try each change alone so one bad change cannot
            // take unrelated ones down with it.
            Err(_) if valid.len() > 1 => {
                for one in valid {
                    let change = [one.change.clone()];
                    match self.store.apply_directory_changes(&change) {
                        Ok(records) => {
                            let base = self.current.load_full();
                            self.publish(&base, vec![one], records);
                        }
                        Err(e) => {
                            let _ = one.reply.send(Err(DirectoryError::Store(e.to_string())));
                        }
                    }
                }
            }
            Err(e) => {
                for one in valid {
                    let _ = one.reply.send(Err(DirectoryError::Store(e.to_string())));
                }
            }
        }
    }

    fn publish(&self, base: &Snapshot, valid: Vec<Valid>, records: Vec<RecipientRecord>) {
        let mut next = base.clone();
        let mut applied = Vec::with_capacity(records.len());
        for record in records {
            let id = record.id;
            next = next.with_recipient(record.into());
            applied.push(next.recipient(id).cloned());
        }
        let generation = base.generation() + 1;
        let next = Arc::new(next.with_generation(generation));
        self.current.store(next.clone());
        tracing::debug!(
            generation,
            changes = valid.len(),
            "published directory snapshot"
        );
        for (one, recipient) in valid.into_iter().zip(applied) {
            let result = recipient.ok_or_else(|| DirectoryError::Store("lost a record".into()));
            let _ = one.reply.send(result);
        }
    }
}

/// Addresses and aliases taken by earlier changes of the same batch.
#[derive(Default)]
struct Claimed {
    addresses: HashSet<String>,
    aliases: HashSet<String>,
}

fn invalid(object: &str, field: &'static str, reason: String) -> DirectoryError {
    DirectoryError::Invalid {
        object: object.to_string(),
        field,
        reason,
    }
}

fn validate(
    snapshot: &Snapshot,
    claimed: &mut Claimed,
    change: Change,
) -> Result<DirectoryChange, DirectoryError> {
    match change {
        Change::CreateMailbox {
            address,
            display_name,
            alias,
            secondary_addresses,
            password_hash,
        } => {
            let address = address.trim().to_string();
            let mut addresses = vec![address.clone()];
            addresses.extend(secondary_addresses.iter().map(|a| a.trim().to_string()));
            let mut keys = Vec::with_capacity(addresses.len());
            for (index, one) in addresses.iter().enumerate() {
                let field = if index == 0 {
                    "address"
                } else {
                    "secondary_addresses"
                };
                validate_address(one).map_err(|r| invalid(&address, field, r))?;
                let key = address_key(one);
                if snapshot.by_address(one).is_some()
                    || claimed.addresses.contains(&key)
                    || keys.contains(&key)
                {
                    return Err(invalid(
                        &address,
                        field,
                        format!("{one} is already used by another recipient"),
                    ));
                }
                keys.push(key);
            }
            let alias = alias.unwrap_or_else(|| {
                address
                    .rsplit_once('@')
                    .map_or(address.clone(), |(l, _)| l.to_string())
            });
            let alias_key = alias.to_lowercase();
            if alias.trim().is_empty() {
                return Err(invalid(&address, "alias", "must not be empty".into()));
            }
            if snapshot.by_alias(&alias).is_some() || claimed.aliases.contains(&alias_key) {
                return Err(invalid(
                    &address,
                    "alias",
                    format!(
                        "{alias:?} is already used by another recipient; choose another with --alias"
                    ),
                ));
            }
            claimed.addresses.extend(keys);
            claimed.aliases.insert(alias_key);
            Ok(DirectoryChange::CreateRecipient(NewRecipient {
                alias,
                display_name,
                addresses,
                password_hash,
            }))
        }
        Change::SetPassword {
            address,
            password_hash,
        } => {
            let recipient = snapshot.by_address(&address).ok_or_else(|| {
                invalid(&address, "address", "no recipient has this address".into())
            })?;
            Ok(DirectoryChange::SetPassword {
                recipient: recipient.id,
                password_hash,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailroom_store::SqliteStore;

    fn start() -> (Directory, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
        let (directory, _thread) =
            Directory::start(store, &["example.test".into()], &topology()).unwrap();
        (directory, dir)
    }

    fn topology() -> Topology {
        Topology {
            organization: "Org".into(),
            site: "Site".into(),
            server: "mx1".into(),
        }
    }

    fn create(address: &str) -> Change {
        Change::CreateMailbox {
            address: address.into(),
            display_name: "X".into(),
            alias: None,
            secondary_addresses: Vec::new(),
            password_hash: None,
        }
    }

    #[test]
    fn secondary_addresses_resolve_to_the_same_mailbox_and_must_be_free() {
        let (directory, _dir) = start();
        let alice = directory
            .apply_blocking(Change::CreateMailbox {
                address: "alice@example.test".into(),
                display_name: "Alice".into(),
                alias: None,
                secondary_addresses: vec!["a.smith@example.test".into(), "alice@other.test".into()],
                password_hash: None,
            })
            .unwrap();
        let snap = directory.snapshot();
        assert_eq!(
            snap.by_address("A.Smith@example.test").unwrap().id,
            alice.id
        );
        assert_eq!(snap.by_address("alice@other.test").unwrap().id, alice.id);
        assert!(snap.is_local_domain("other.test"));
        let err = directory
            .apply_blocking(Change::CreateMailbox {
                address: "bob@example.test".into(),
                display_name: String::new(),
                alias: None,
                secondary_addresses: vec!["a.smith@example.test".into()],
                password_hash: None,
            })
            .unwrap_err();
        assert!(
            matches!(
                &err,
                DirectoryError::Invalid {
                    field: "secondary_addresses",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            directory
                .snapshot()
                .by_address("bob@example.test")
                .is_none()
        );
    }

    #[test]
    fn a_change_publishes_a_new_generation_and_persists() {
        let (directory, dir) = start();
        let before = directory.snapshot();
        let alice = directory
            .apply_blocking(create("alice@example.test"))
            .unwrap();
        assert_eq!(alice.alias, "alice");
        let after = directory.snapshot();
        assert_eq!(after.generation(), before.generation() + 1);
        assert!(
            before.by_address("alice@example.test").is_none(),
            "old snapshot unchanged"
        );
        assert_eq!(after.by_address("Alice@Example.test").unwrap().id, alice.id);
        drop(directory);
        // A restart loads what was stored.
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
        let (again, _t) = Directory::start(store, &[], &topology()).unwrap();
        assert!(again.snapshot().by_address("alice@example.test").is_some());
        assert_eq!(again.snapshot().topology(), &topology());
    }

    #[test]
    fn invalid_changes_name_the_field_and_leave_the_snapshot() {
        let (directory, _dir) = start();
        directory
            .apply_blocking(create("alice@example.test"))
            .unwrap();
        let generation = directory.snapshot().generation();
        let err = directory
            .apply_blocking(create("ALICE@example.test"))
            .unwrap_err();
        assert!(
            matches!(
                &err,
                DirectoryError::Invalid {
                    field: "address",
                    ..
                }
            ),
            "{err}"
        );
        let err = directory.apply_blocking(create("no-at-sign")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no-at-sign: field address: \"no-at-sign\" has no @"
        );
        let err = directory
            .apply_blocking(create("alice@other.test"))
            .unwrap_err();
        assert!(
            matches!(&err, DirectoryError::Invalid { field: "alias", .. }),
            "{err}"
        );
        assert_eq!(directory.snapshot().generation(), generation);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_changes_are_batched_and_all_applied() {
        let (directory, _dir) = start();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let d = directory.clone();
                tokio::spawn(async move { d.apply(create(&format!("u{i}@example.test"))).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let snap = directory.snapshot();
        assert_eq!(snap.len(), 200);
        assert!(
            snap.generation() <= 201,
            "at most one publication per change"
        );
    }
}
