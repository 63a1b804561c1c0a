//! Mailbox access for IMAP and POP3: folders, per-message state (UID, MODSEQ, flags),
//! flag changes, copy, move, append, and change notification.
//!
//! Why a trait of its own: the access protocols need a different slice of the store than
//! the pipeline, and keeping it apart keeps `MailStore` readable. Every method is one
//! transaction; every change to a mailbox bumps the folder's HIGHESTMODSEQ and rings the
//! mailbox's change bell ([`Mailboxes::watch_mailbox`]) after it commits, so IMAP
//! sessions learn about new mail, flag changes and expunges without polling.

use crate::{RecipientId, Result, UnixMillis};
use serde::{Deserialize, Serialize};

/// One folder of a mailbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FolderInfo {
    /// Full name, hierarchy separated by "/". "INBOX" is the inbox.
    pub name: String,
    /// Changes whenever UIDs of this name could be reused.
    pub uidvalidity: u32,
    /// The UID the next message will get.
    pub uidnext: u32,
    /// The highest modification sequence in the folder.
    pub highestmodseq: u64,
    /// Subscribed (LSUB, LIST (SUBSCRIBED)).
    pub subscribed: bool,
    /// The special-use attribute (RFC 6154), e.g. "\\Sent".
    pub special_use: Option<String>,
    /// Messages in the folder.
    pub messages: u32,
    /// Messages without the \Seen flag.
    pub unseen: u32,
    /// Sum of their sizes, bytes.
    pub bytes: u64,
    /// UIDs above this are `\Recent` (IMAP4rev1): no session has selected the folder
    /// read-write since they arrived.
    #[serde(default)]
    pub recent_floor: u32,
    /// Messages above `recent_floor`.
    #[serde(default)]
    pub recent: u32,
}

/// A message to store with APPEND.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Flags to set.
    pub flags: Vec<String>,
    /// Internal date.
    pub internal_date_ms: UnixMillis,
    /// The bytes, stored as given.
    pub body: Vec<u8>,
    /// What the admin listing shows (subject, addresses ...).
    pub facts: Option<crate::MessageFacts>,
}

/// One message's state in a folder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageState {
    /// UID in the folder.
    pub uid: u32,
    /// Modification sequence of its last change.
    pub modseq: u64,
    /// System flags ("\\Seen" ...) and keywords, in stored order.
    pub flags: Vec<String>,
    /// IMAP internal date (delivery or APPEND time), Unix ms.
    pub internal_date_ms: UnixMillis,
    /// Size as fetched (Return-Path included), bytes.
    pub size: u64,
}

/// UIDs expunged from a folder after a MODSEQ (QRESYNC's VANISHED, RFC 7162 3.2.10).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vanished {
    /// The UIDs recorded as expunged after the MODSEQ asked about, ascending.
    pub uids: Vec<u32>,
    /// False when expunges that old may not all be recorded (before schema 10, or
    /// pruned): then every UID not present in the folder may have vanished since.
    pub complete: bool,
}

/// What changed in a folder after a MODSEQ, read from one snapshot (an IMAP session
/// catching up without reading every message).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FolderChanges {
    /// The folder's HIGHESTMODSEQ in that snapshot: what the caller is now up to date with.
    pub highestmodseq: u64,
    /// Messages changed or added after the MODSEQ, in UID order.
    pub changed: Vec<MessageState>,
    /// UIDs expunged after it (when `complete` is false, not all are known: read the
    /// whole folder instead).
    pub vanished: Vanished,
}

/// How a STORE changes flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagOperation {
    /// FLAGS: replace.
    Replace,
    /// +FLAGS: add.
    Add,
    /// -FLAGS: remove.
    Remove,
}

/// The result of a STORE.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagResult {
    /// Messages whose flags changed, with their new state.
    pub changed: Vec<MessageState>,
    /// UIDs refused because their MODSEQ was above UNCHANGEDSINCE (RFC 7162).
    pub modified: Vec<u32>,
}

/// The result of a COPY, MOVE or APPEND: the target's UIDVALIDITY and (source UID,
/// new UID) pairs, for UIDPLUS (RFC 4315).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    /// The target folder's UIDVALIDITY.
    pub uidvalidity: u32,
    /// (source UID, target UID), in source order.
    pub uids: Vec<(u32, u32)>,
}

/// IMAP's ENVELOPE, BODYSTRUCTURE and BODY of one body, as the IMAP server writes them.
/// Cached per body (single-instance: every copy shares it) so FETCH need not re-parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Structure {
    /// The ENVELOPE value.
    pub envelope: Vec<u8>,
    /// The BODYSTRUCTURE value.
    pub bodystructure: Vec<u8>,
    /// The BODY value (no extension data).
    pub body: Vec<u8>,
}

/// Mailbox access; implemented by every store backend.
pub trait Mailboxes {
    /// Every folder of a mailbox, by name.
    fn folders(&self, recipient: RecipientId) -> Result<Vec<FolderInfo>>;

    /// Creates a folder. `Conflict` when it exists.
    fn create_folder(
        &self,
        recipient: RecipientId,
        name: &str,
        special_use: Option<&str>,
    ) -> Result<()>;

    /// Claims the folder's recent messages for a session selecting it read-write: raises
    /// the recent floor to the last UID and returns the floor before (UIDs above it are
    /// `\Recent` to this session, and to no session that selects later).
    fn claim_recent(&self, recipient: RecipientId, name: &str) -> Result<u32>;

    /// Creates a folder unless it exists.
    fn ensure_folder(
        &self,
        recipient: RecipientId,
        name: &str,
        special_use: Option<&str>,
    ) -> Result<()>;

    /// Deletes a folder and its messages. `NotFound` when it does not exist; INBOX cannot
    /// be deleted (`Conflict`).
    fn delete_folder(&self, recipient: RecipientId, name: &str) -> Result<()>;

    /// Renames a folder and its children ("a" -> "b" also moves "a/x" to "b/x"). Renaming
    /// INBOX moves its messages into a new folder and leaves INBOX empty (RFC 9051 6.3.6).
    fn rename_folder(&self, recipient: RecipientId, from: &str, to: &str) -> Result<()>;

    /// Sets a folder's subscription. Subscribing a folder that does not exist is
    /// `NotFound`.
    fn subscribe(&self, recipient: RecipientId, name: &str, subscribed: bool) -> Result<()>;

    /// A folder's counters and its messages (UID order) from one snapshot, so they
    /// agree: HIGHESTMODSEQ and UIDNEXT cover every message listed (SELECT). `NotFound`
    /// when it does not exist.
    fn folder_snapshot(
        &self,
        recipient: RecipientId,
        folder: &str,
    ) -> Result<(FolderInfo, Vec<MessageState>)>;

    /// The messages of a folder in UID order; `NotFound` when it does not exist.
    fn folder_messages(&self, recipient: RecipientId, folder: &str) -> Result<Vec<MessageState>>;

    /// The UIDs expunged from a folder after MODSEQ `since` (QRESYNC). `NotFound` when
    /// the folder does not exist.
    fn vanished(&self, recipient: RecipientId, folder: &str, since: u64) -> Result<Vanished>;

    /// What changed in a folder after MODSEQ `since`, from one snapshot. `NotFound` when
    /// the folder does not exist.
    fn folder_changes(
        &self,
        recipient: RecipientId,
        folder: &str,
        since: u64,
    ) -> Result<FolderChanges>;

    /// Changes the flags of `uids` (those still present). With `unchanged_since`, a
    /// message whose MODSEQ is above it is left alone and listed in `modified`.
    fn store_flags(
        &self,
        recipient: RecipientId,
        folder: &str,
        uids: &[u32],
        operation: FlagOperation,
        flags: &[String],
        unchanged_since: Option<u64>,
    ) -> Result<FlagResult>;

    /// Copies `uids` (those present) to `to`; with `remove`, also removes them from
    /// `from` (MOVE), in the same transaction.
    fn copy_messages(
        &self,
        recipient: RecipientId,
        from: &str,
        uids: &[u32],
        to: &str,
        remove: bool,
    ) -> Result<Copied>;

    /// Stores a new message in a folder (APPEND). The bytes are stored as given: no
    /// trace header is added. `facts` (subject, addresses ...) feed the admin listing.
    fn append(
        &self,
        recipient: RecipientId,
        folder: &str,
        flags: &[String],
        internal_date_ms: UnixMillis,
        body: &[u8],
        facts: Option<&crate::MessageFacts>,
    ) -> Result<Copied>;

    /// Stores several new messages in a folder in one transaction, all or none
    /// (MULTIAPPEND, RFC 3502); their UIDs are consecutive, in order.
    fn append_all(
        &self,
        recipient: RecipientId,
        folder: &str,
        messages: &[NewMessage],
    ) -> Result<Copied>;

    /// The bytes of several messages as a client would fetch them (like
    /// `MailStore::message_raw`), in one query: with `header_only`, only up to and
    /// including the blank line that ends the header. Messages gone are left out; the
    /// result is in UID order, each message once.
    fn messages_raw(
        &self,
        recipient: RecipientId,
        folder: &str,
        uids: &[u32],
        header_only: bool,
    ) -> Result<Vec<(u32, Vec<u8>)>>;

    /// The cached structures of these messages (those that have one).
    fn cached_structures(
        &self,
        recipient: RecipientId,
        folder: &str,
        uids: &[u32],
    ) -> Result<std::collections::HashMap<u32, Structure>>;

    /// Caches structures computed for these messages (kept until the body goes).
    fn cache_structures(
        &self,
        recipient: RecipientId,
        folder: &str,
        structures: &[(u32, Structure)],
    ) -> Result<()>;

    /// The cached search fields of these messages (those that have them), by UID. The
    /// bytes are the IMAP layer's encoding; the store keeps them per body, like the
    /// structures, so a copy of a message shares them.
    fn cached_search_fields(
        &self,
        recipient: RecipientId,
        folder: &str,
        uids: &[u32],
    ) -> Result<std::collections::HashMap<u32, Vec<u8>>>;

    /// Caches search fields computed for these messages (kept until the body goes).
    fn cache_search_fields(
        &self,
        recipient: RecipientId,
        folder: &str,
        fields: &[(u32, Vec<u8>)],
    ) -> Result<()>;

    /// Bytes stored for a mailbox, all folders (quota usage).
    fn mailbox_bytes(&self, recipient: RecipientId) -> Result<u64>;

    /// A bell that rings (its value grows) after every committed change to the mailbox:
    /// delivery, flags, expunge, copy, move, append, folder changes.
    fn watch_mailbox(&self, recipient: RecipientId) -> tokio::sync::watch::Receiver<u64>;
}
