//! Mailroom's storage layer: the [`MailStore`] trait and its embedded SQLite backend.
//!
//! Purpose: keep every durable fact of the server (spooled messages and their queue
//! entries, message bodies, mailboxes, the directory's recipients) behind one trait so
//! that the protocol crates never know which engine holds them. The embedded backend
//! ([`SqliteStore`]) keeps everything in one SQLite database in WAL mode inside the data
//! folder; a PostgreSQL backend can implement the same trait later.
//!
//! Inputs: spool batches from the SMTP spool writer, delivery plans from inbound
//! conversion, directory changes from the single directory writer, queries from the admin
//! API. Outputs: durable rows, and the query results.
//!
//! Durability rules kept here (see `docs/storage.md`):
//! - [`MailStore::spool`] commits a whole batch in one transaction with a full fsync before
//!   it returns; only then may the SMTP layer send "250".
//! - [`MailStore::deliver_inbound`] inserts every local delivery, every outbound entry and
//!   removes the inbound entry in one transaction: a crash at any instant leaves either the
//!   queue entry (delivered again later, exactly once) or the deliveries, never both.
//! - Bodies are stored once by content hash; their reference counts change in the same
//!   transaction as the rows that reference them.
//!
//! What it never does: parse mail, talk a protocol, or hold a lock while calling out.
//! All methods are blocking; async callers use `spawn_blocking` or a dedicated thread.

pub mod disk;
mod mailbox;
mod migrations;
pub mod outbound;
mod sqlite;
pub mod track;

pub use disk::{Disk, NoSpace};
pub use mailbox::{
    Copied, FlagOperation, FlagResult, FolderInfo, Mailboxes, MessageState, NewMessage, Structure,
    Vanished,
};
pub use outbound::{
    Envelope, Notify, OutboundItem, OutboundOutcome, OutboundQueue, QueueActionError, QueueFilter,
    RecipientState, RecipientStatus, Ret,
};
pub use sqlite::{
    BACKUP_DATABASE, BACKUP_DIRECTORY, BACKUP_MANIFEST, BackupManifest, Checkpointer, Durability,
    SqliteStore,
};
pub use track::{TrackEvent, TrackKind, TrackQuery};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch; every timestamp in the store uses this unit.
pub type UnixMillis = i64;

/// The database identity of a recipient, stable for its lifetime.
pub type RecipientId = i64;

/// Errors from the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database engine reported an error (I/O, corruption, constraint).
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// A change conflicts with what is stored (for example an address already in use).
    #[error("{0}")]
    Conflict(String),
    /// The named object does not exist (any more).
    #[error("not found: {0}")]
    NotFound(String),
    /// The schema is newer than this binary understands.
    #[error(
        "the data folder's schema version {found} is newer than this Mailroom supports ({supported}); run a newer Mailroom"
    )]
    SchemaTooNew {
        /// The version found in the database.
        found: i64,
        /// The newest version this binary can migrate to.
        supported: i64,
    },
}

/// A storage fault: the environment failed, not the request. Writers answer it with a
/// temporary error or pause and retry; it never counts against a message (no attempt
/// spent, no quarantine), because the same message will go through once the fault ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The disk is full (`SQLITE_FULL`).
    DiskFull,
    /// A read, write, fsync or open failed (`SQLITE_IOERR_*`, `SQLITE_CANTOPEN`). Nothing
    /// the failed transaction wrote may be assumed durable.
    Io,
}

impl StoreError {
    /// An error of the same kind and message (errors are not `Clone`): what every
    /// request of a failed group commit gets.
    pub fn same_kind(&self) -> StoreError {
        match self {
            StoreError::Database(rusqlite::Error::SqliteFailure(e, message)) => {
                StoreError::Database(rusqlite::Error::SqliteFailure(*e, message.clone()))
            }
            StoreError::Database(other) => StoreError::Conflict(other.to_string()),
            StoreError::Conflict(m) => StoreError::Conflict(m.clone()),
            StoreError::NotFound(m) => StoreError::NotFound(m.clone()),
            StoreError::SchemaTooNew { found, supported } => StoreError::SchemaTooNew {
                found: *found,
                supported: *supported,
            },
        }
    }

    /// The storage fault behind this error, if it is one.
    pub fn fault(&self) -> Option<Fault> {
        let StoreError::Database(rusqlite::Error::SqliteFailure(e, _)) = self else {
            return None;
        };
        match e.code {
            rusqlite::ErrorCode::DiskFull => Some(Fault::DiskFull),
            // SQLite reports ENOSPC from write() as SQLITE_FULL; every other failed
            // read, write, fsync or open is an I/O error.
            rusqlite::ErrorCode::SystemIoFailure | rusqlite::ErrorCode::CannotOpen => {
                Some(Fault::Io)
            }
            _ => None,
        }
    }
}

/// Result type of the storage layer.
pub type Result<T> = std::result::Result<T, StoreError>;

/// The queues a message can sit in. Names are what administrators see in `queue list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueName {
    /// Accepted over SMTP, awaiting inbound conversion.
    Inbound,
    /// Recipients in non-local domains, awaiting outbound delivery.
    Outbound,
    /// Messages whose conversion failed repeatedly; kept with the reason, never discarded.
    Quarantine,
    /// Recipients that could not be resolved at conversion time (for example deleted
    /// between RCPT and conversion); kept for a non-delivery report.
    Undeliverable,
}

impl QueueName {
    /// Every queue, in the order administrators read them.
    pub const ALL: [QueueName; 4] = [
        QueueName::Inbound,
        QueueName::Outbound,
        QueueName::Quarantine,
        QueueName::Undeliverable,
    ];

    /// The name stored in the database and shown to administrators.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueName::Inbound => "inbound",
            QueueName::Outbound => "outbound",
            QueueName::Quarantine => "quarantine",
            QueueName::Undeliverable => "undeliverable",
        }
    }

    /// Parses a queue name as shown by [`QueueName::as_str`].
    pub fn parse(name: &str) -> Option<QueueName> {
        QueueName::ALL.into_iter().find(|q| q.as_str() == name)
    }
}

/// One accepted message as the SMTP layer hands it to the spool.
#[derive(Debug, Clone, Default)]
pub struct SpoolEntry {
    /// The identifier printed in the Received header and in logs.
    pub queue_id: String,
    /// The envelope sender (empty for the null reverse-path).
    pub mail_from: String,
    /// The envelope recipients accepted at RCPT time.
    pub recipients: Vec<String>,
    /// The message bytes, with the trace header already prepended.
    pub body: Vec<u8>,
    /// When the final "250" is about to be sent.
    pub received_at_ms: UnixMillis,
    /// The client's address, for the queue viewer and the trail.
    pub client: String,
    /// The name the client gave in HELO or EHLO, for the trail.
    pub helo: Option<String>,
    /// Who the client authenticated as, for the trail.
    pub user: Option<String>,
    /// DSN parameters given at MAIL and RCPT (RET, ENVID, NOTIFY, ORCPT).
    pub envelope: Envelope,
}

/// An inbound queue entry claimed by one conversion worker.
#[derive(Debug, Clone)]
pub struct ClaimedItem {
    /// Row identity of the queue entry.
    pub id: i64,
    /// The identifier from the Received header.
    pub queue_id: String,
    /// The envelope sender.
    pub mail_from: String,
    /// The envelope recipients.
    pub recipients: Vec<String>,
    /// The message bytes as spooled.
    pub body: Vec<u8>,
    /// When the message was accepted.
    pub received_at_ms: UnixMillis,
    /// How many times this entry has been claimed, this claim included.
    pub attempts: u32,
    /// DSN parameters given at MAIL and RCPT.
    pub envelope: Envelope,
}

/// What conversion learned about a message, stored once per body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MessageFacts {
    /// The Message-ID header, without angle brackets.
    pub message_id: Option<String>,
    /// The From header's first address (or its raw text when it did not parse).
    pub from: Option<String>,
    /// The To header's addresses.
    pub to: Vec<String>,
    /// The Cc header's addresses.
    pub cc: Vec<String>,
    /// The decoded Subject header.
    pub subject: Option<String>,
    /// The Date header as Unix milliseconds, when it parsed.
    pub date_ms: Option<UnixMillis>,
    /// The MIME structure as a compact tree (JSON), for clients and diagnostics.
    pub mime: serde_json::Value,
    /// False when the MIME parser could not make sense of the message; it is delivered
    /// byte for byte all the same.
    pub parsed: bool,
}

/// Where inbound conversion decided a message goes.
#[derive(Debug, Clone, Default)]
pub struct DeliveryPlan {
    /// What the parser found, stored with the body.
    pub facts: MessageFacts,
    /// Local recipients, de-duplicated: each gets one copy in its INBOX.
    pub local: Vec<RecipientId>,
    /// Addresses to route out, grouped by the connector the routing table chose.
    pub remote: Vec<RemoteRoute>,
    /// Addresses that could not be resolved, with the reason, for a non-delivery report.
    pub undeliverable: Vec<(String, String)>,
    /// The primary address of each mailbox in `local` (same order), for the trail's
    /// "delivered" events; empty when the planner did not know them.
    pub local_addresses: Vec<String>,
    /// Distribution lists expanded: the list's address and the members' addresses it
    /// reached, for the trail's "expanded" events.
    pub expanded: Vec<(String, Vec<String>)>,
}

/// Remote recipients that share a connector: one outbound queue entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRoute {
    /// The connector chosen by the routing table.
    pub connector: String,
    /// The directory generation whose routing table chose it.
    pub generation: u64,
    /// The recipients.
    pub recipients: Vec<String>,
}

/// One copy placed in a mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The recipient whose INBOX received it.
    pub recipient: RecipientId,
    /// Its UID in that folder.
    pub uid: u32,
}

/// Depth and age of one queue, for `queue list`, metrics and the watchdog.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueSummary {
    /// Queue name.
    pub queue: QueueName,
    /// Number of entries.
    pub depth: u64,
    /// Total message bytes of the entries.
    pub bytes: u64,
    /// When the oldest entry was accepted.
    pub oldest_received_at_ms: Option<UnixMillis>,
}

/// One queue entry as the queue viewer shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueItemInfo {
    /// Row identity.
    pub id: i64,
    /// Queue name.
    pub queue: QueueName,
    /// The identifier from the Received header.
    pub queue_id: String,
    /// Envelope sender.
    pub mail_from: String,
    /// Envelope recipients of this entry.
    pub recipients: Vec<String>,
    /// When the message was accepted.
    pub received_at_ms: UnixMillis,
    /// Conversion or delivery attempts so far.
    pub attempts: u32,
    /// The last error or the quarantine reason.
    pub last_error: Option<String>,
    /// Message size in bytes.
    pub size: u64,
    /// When the next attempt is due.
    pub next_attempt_at_ms: UnixMillis,
    /// Outbound entries: the connector the routing table chose.
    pub connector: Option<String>,
    /// Outbound entries: the directory generation that routed it.
    pub generation: Option<u64>,
    /// Held by an administrator: never attempted until released.
    #[serde(default)]
    pub held: bool,
    /// DSN parameters and, for outbound entries, each recipient's state.
    #[serde(default)]
    pub envelope: Envelope,
}

/// One message in a mailbox folder, as `mailbox list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MessageSummary {
    /// UID within the folder.
    pub uid: u32,
    /// Message-ID header.
    pub message_id: Option<String>,
    /// From header.
    pub from: Option<String>,
    /// To header addresses.
    pub to: Vec<String>,
    /// Subject header.
    pub subject: Option<String>,
    /// Size in bytes as a client fetches it (Return-Path included).
    pub size: u64,
    /// When it was delivered to the folder.
    pub received_at_ms: UnixMillis,
    /// The envelope sender.
    pub return_path: String,
}

/// A folder's identity and counters (IMAP's STATUS items; POP3's unique ids use the
/// UIDVALIDITY).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct FolderStatus {
    /// Changes whenever UIDs of this folder name could be reused (a new folder).
    pub uidvalidity: u32,
    /// The UID the next message will get.
    pub uidnext: u32,
    /// The highest modification sequence of any change in the folder.
    pub highestmodseq: u64,
    /// Messages in the folder.
    pub messages: u32,
    /// Sum of their sizes, bytes.
    pub bytes: u64,
}

/// One e-mail address of a recipient.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddressRecord {
    /// The address, as entered.
    pub address: String,
    /// True for the one primary (reply) address.
    pub primary: bool,
    /// True when site addressing generated it.
    #[serde(default)]
    pub generated: bool,
}

/// A recipient as the directory persists it: indexed columns plus a JSON document the
/// directory owns (the store does not interpret it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecipientRow {
    /// Identity, assigned by the directory writer.
    pub id: RecipientId,
    /// The mailbox name (the classic "Directory Name"); unique.
    pub alias: String,
    /// `mailbox`, `contact` or `list`.
    pub kind: String,
    /// Display name.
    pub display_name: String,
    /// Every address; unique across recipients.
    pub addresses: Vec<AddressRecord>,
    /// Everything else, as the directory serialised it.
    pub doc: String,
    /// Argon2id PHC string, when a password is set.
    pub password_hash: Option<String>,
}

/// What the directory stored, loaded at start-up.
#[derive(Debug, Clone, Default)]
pub struct StoredDirectory {
    /// The lowest identity a new recipient may get: above every recipient ever
    /// deleted, so that a new recipient never inherits a deleted one's identity (the
    /// mail database purged that identity's mailboxes and refuses to recreate them).
    pub id_floor: RecipientId,
    /// Every recipient.
    pub recipients: Vec<RecipientRow>,
    /// The site settings document, if ever saved.
    pub site: Option<String>,
    /// The routing table's text before its last change.
    pub previous_routing: String,
}

/// The classic hierarchy this server lives in: organization -> site -> server. One of
/// each is created at first start, named in the config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Topology {
    /// Organization name.
    pub organization: String,
    /// Site name.
    pub site: String,
    /// This server's name.
    pub server: String,
}

/// One row-level write of the directory writer.
#[derive(Debug, Clone)]
pub enum DirectoryWrite {
    /// Create or replace a recipient (and its addresses).
    PutRecipient(RecipientRow),
    /// Delete a recipient with its folders and messages.
    DeleteRecipient(RecipientId),
    /// Replace the site settings.
    PutSettings {
        /// The site document.
        site: String,
        /// The routing table's text before its last change.
        previous_routing: String,
    },
}

/// Everything Mailroom stores, behind one interface so that the engine can change.
///
/// Every method is blocking and runs its own transaction; none keeps a transaction open
/// across calls, so callers can never hold the database while waiting on something else.
pub trait MailStore: Mailboxes + OutboundQueue + Send + Sync + 'static {
    /// Makes a batch of accepted messages durable (one transaction, full fsync), each as
    /// an inbound queue entry; returns their row identities in order.
    fn spool(&self, entries: &[SpoolEntry]) -> Result<Vec<i64>> {
        self.spool_claimed(entries, 0)
    }

    /// [`MailStore::spool`], with the first `claimed` entries inserted already claimed
    /// for conversion, their first attempt counted, exactly as
    /// [`MailStore::claim_inbound`] would leave them: the spool writer hands those to a
    /// conversion worker itself (`mailroom_queue::Handoff`) instead of the worker
    /// claiming them back from the store.
    fn spool_claimed(&self, entries: &[SpoolEntry], claimed: usize) -> Result<Vec<i64>>;

    /// Whether new mail of `bytes` (an APPEND) may be stored now: refused while the
    /// data folder's disk is below its free-space reserve (see [`Disk`]). Backends
    /// without a disk to watch accept.
    fn admit_new(&self, _bytes: u64) -> std::result::Result<(), NoSpace> {
        Ok(())
    }

    /// Copies everything stored, as of one moment, into the empty folder `dir` while
    /// writers go on (`mailroom backup`).
    fn backup_to(&self, dir: &std::path::Path) -> Result<BackupManifest>;

    /// When mail last moved (a spool or delivery commit), Unix ms; 0 when never. The
    /// directory's background lane (imports, address regeneration) slows down while
    /// mail is moving, so that it uses what mail flow leaves.
    fn mail_active_at_ms(&self) -> UnixMillis {
        0
    }

    /// Releases every claim left by a previous process; called once at start-up, while
    /// no worker runs. Returns how many entries were released.
    fn release_claims(&self) -> Result<u64>;

    /// Claims up to `limit` of the oldest due inbound entries in one transaction,
    /// counting an attempt for each; empty when none is due.
    fn claim_inbound(&self, now_ms: UnixMillis, limit: usize) -> Result<Vec<ClaimedItem>>;

    /// Delivers claimed entries by their plans and removes them from the inbound queue,
    /// all in one transaction: if any entry is no longer claimed (already delivered),
    /// nothing changes and the error says which.
    fn deliver_inbound(
        &self,
        batch: &[(&ClaimedItem, &DeliveryPlan)],
        now_ms: UnixMillis,
    ) -> Result<Vec<Vec<Delivered>>>;

    /// Returns a claimed entry to the queue, to be tried again at `retry_at_ms`. The
    /// entry is named by its row id and its message's queue id: row ids are reused once
    /// the rows above them are gone, and a claim that outlived its entry must not touch
    /// the message that took the id (nothing happens then).
    fn defer_inbound(&self, item: &ClaimedItem, error: &str, retry_at_ms: UnixMillis)
    -> Result<()>;

    /// Moves a claimed entry to the quarantine queue with the reason (the entry named
    /// as in [`MailStore::defer_inbound`]).
    fn quarantine_inbound(&self, item: &ClaimedItem, reason: &str) -> Result<()>;

    /// Inbound entries due now (claimed ones included: they are work in progress) and
    /// when the oldest of them was accepted; what the stall watchdog watches.
    fn inbound_due(&self, now_ms: UnixMillis) -> Result<(u64, Option<UnixMillis>)>;

    /// Time of the earliest inbound entry that is not claimed, due or not.
    fn next_inbound_due(&self) -> Result<Option<UnixMillis>>;

    /// Depth, bytes and oldest entry of every queue.
    fn queue_summaries(&self) -> Result<Vec<QueueSummary>>;

    /// The entries of one queue (or all) in the order they were queued, at most `limit`,
    /// starting after the entry `after` (its `id`): pages that stay stable while the
    /// queue changes.
    fn queue_items(
        &self,
        queue: Option<QueueName>,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Vec<QueueItemInfo>>;

    /// Records the organization, site and server (creating them at first start, renaming
    /// them when the config names them differently); returns what is stored.
    fn ensure_topology(&self, wanted: &Topology) -> Result<Topology>;

    /// Everything the directory stored, for building the first snapshot.
    fn load_directory(&self) -> Result<StoredDirectory>;

    /// Applies the directory writer's writes in one transaction, durable when it
    /// returns (an administrator's change is acknowledged on its strength).
    fn write_directory(&self, writes: &[DirectoryWrite]) -> Result<()>;

    /// Applies background directory writes (an import's or a regeneration's chunk) in
    /// one transaction that need not be durable when it returns: it is atomic and
    /// survives a process crash, and becomes durable with the next
    /// [`MailStore::write_directory`] or [`MailStore::sync_directory`]; only a power
    /// loss before then can undo it. Why: an import's chunks, each fsynced, queued
    /// with the spool's fsyncs on the same disk and slowed mail (docs/benchmarks.md,
    /// sixth session of issue 16). A backend without the distinction makes it durable
    /// at once (the default).
    fn write_directory_background(&self, writes: &[DirectoryWrite]) -> Result<()> {
        self.write_directory(writes)
    }

    /// Makes every directory write durable (see
    /// [`MailStore::write_directory_background`]): a job calls it before it reports
    /// that it finished, and the writer at least once a second while background
    /// writes are pending.
    fn sync_directory(&self) -> Result<()> {
        Ok(())
    }

    /// The messages of a recipient's folder, by UID.
    fn mailbox_messages(&self, recipient: RecipientId, folder: &str)
    -> Result<Vec<MessageSummary>>;

    /// The full bytes of one message as a client would fetch them.
    fn message_raw(
        &self,
        recipient: RecipientId,
        folder: &str,
        uid: u32,
    ) -> Result<Option<Vec<u8>>>;

    /// Number of distinct bodies stored (single-instance storage makes this smaller than
    /// the number of deliveries).
    fn blob_count(&self) -> Result<u64>;

    /// A folder's identity and counters; `None` when the folder does not exist (INBOX
    /// exists once the first message arrived).
    fn folder_status(&self, recipient: RecipientId, folder: &str) -> Result<Option<FolderStatus>>;

    /// Removes the messages `uids` from a folder (those still there), releasing their
    /// bodies, in one transaction. Returns how many were removed.
    fn expunge(&self, recipient: RecipientId, folder: &str, uids: &[u32]) -> Result<u64>;

    /// The trails of the messages matching `query` (every filter given), newest message
    /// first, each message's events in order, every event with the message's
    /// Message-ID and envelope sender filled in.
    fn track(&self, query: &TrackQuery) -> Result<Vec<TrackEvent>>;

    /// Removes up to `max` tracking events older than `before_ms` (the retention), in
    /// one short transaction; returns how many. Called repeatedly by a background task.
    fn prune_tracking(&self, before_ms: UnixMillis, max: u32) -> Result<u64>;
}

/// The header prepended to a delivered message: the envelope sender, per RFC 5321 4.4.
pub fn return_path_header(mail_from: &str) -> String {
    format!("Return-Path: <{mail_from}>\r\n")
}
