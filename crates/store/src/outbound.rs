//! What the outbound queue keeps per message and per recipient, and the store methods
//! delivery and queue management use.
//!
//! Why per recipient: one message to several remote recipients can end differently for
//! each (one accepted, one refused for good, one deferred), and a delivery status
//! notification (RFC 3464) reports each with its own status, original recipient
//! (ORCPT) and what the sender asked to hear about (NOTIFY). Why JSON in the queue row
//! rather than a table: the states are read and written together with their entry,
//! always in one transaction, and never queried across entries except by address text,
//! which the `recipients` column already answers.

use crate::{QueueItemInfo, QueueName, Result, SpoolEntry, UnixMillis};
use serde::{Deserialize, Serialize};

/// What part of the message a DSN returns (RFC 3461 `RET`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ret {
    /// The whole message.
    Full,
    /// The header section only.
    Headers,
}

/// Which events a recipient's sender asked to be told about (RFC 3461 `NOTIFY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Notify {
    /// Successful delivery (a "relayed" or "delivered" DSN).
    #[serde(default)]
    pub success: bool,
    /// Permanent failure or expiry.
    #[serde(default)]
    pub failure: bool,
    /// A delay (the "still trying" DSN).
    #[serde(default)]
    pub delay: bool,
}

impl Notify {
    /// `NOTIFY=NEVER`.
    pub const NEVER: Notify = Notify {
        success: false,
        failure: false,
        delay: false,
    };

    /// What a recipient without `NOTIFY` gets: failures, and delays.
    pub const DEFAULT: Notify = Notify {
        success: false,
        failure: true,
        delay: true,
    };

    /// The `NOTIFY=` parameter value to pass on to the next hop.
    pub fn parameter(self) -> String {
        let mut parts = Vec::new();
        if self.success {
            parts.push("SUCCESS");
        }
        if self.failure {
            parts.push("FAILURE");
        }
        if self.delay {
            parts.push("DELAY");
        }
        if parts.is_empty() {
            "NEVER".into()
        } else {
            parts.join(",")
        }
    }
}

/// Where one recipient of a queue entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RecipientStatus {
    /// Not delivered yet; tried again at the entry's next attempt.
    #[default]
    Pending,
    /// Accepted by the next hop (or a local mailbox).
    Delivered,
    /// Refused for good, expired, or deleted by an administrator.
    Failed,
}

/// One recipient of a queue entry, with the DSN parameters its sender gave and the
/// result so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RecipientState {
    /// The envelope address.
    pub address: String,
    /// The original recipient (`ORCPT`), as `type;address`, when the sender gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
    /// What the sender asked to hear about; `None` when no `NOTIFY` was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
    /// Where it stands.
    #[serde(default)]
    pub status: RecipientStatus,
    /// The status code for a DSN (`5.1.1`), once there is a result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The last reply from the next hop (or the reason), for the queue viewer and DSNs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// The host that gave that reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_mta: Option<String>,
    /// How the session with that host was protected (TLS version and whether the
    /// certificate verified, or why not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
}

impl RecipientState {
    /// A pending recipient with no DSN parameters.
    pub fn pending(address: impl Into<String>) -> RecipientState {
        RecipientState {
            address: address.into(),
            ..RecipientState::default()
        }
    }

    /// What this recipient's sender asked to hear about, defaults applied.
    pub fn notify(&self) -> Notify {
        self.notify.unwrap_or(Notify::DEFAULT)
    }
}

/// The DSN parameters of a message and the state of each of its recipients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Envelope {
    /// `RET` from MAIL FROM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Ret>,
    /// `ENVID` from MAIL FROM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_id: Option<String>,
    /// The recipients, in envelope order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<RecipientState>,
    /// A "delayed" DSN has been sent for this entry (at most one is).
    #[serde(default)]
    pub delay_notified: bool,
    /// The message came over SMTP from a client that is neither authenticated nor in
    /// `relay_networks`: its sender address is unverified, so a DSN returns only the
    /// header section (whatever RET asked), and a forged sender cannot make this server
    /// reflect a whole message at a victim (backscatter).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unauthenticated: bool,
    /// The user the client authenticated as (SMTP AUTH on a submission port), for the
    /// record: who sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authenticated_as: Option<String>,
    /// Inbound checks quarantined the message (a failed DMARC with `p=quarantine`):
    /// local copies go into each recipient's Junk folder instead of the INBOX. The
    /// reason, for the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub junk: Option<String>,
}

impl Envelope {
    /// The recipient state for `address` (case-insensitive), when the envelope has one.
    pub fn recipient(&self, address: &str) -> Option<&RecipientState> {
        self.recipients
            .iter()
            .find(|r| r.address.eq_ignore_ascii_case(address))
    }

    /// The envelope of a new entry for `addresses` (taken from this message): DSN
    /// parameters carried over for the addresses the sender named (an address reached
    /// through a list gets none), and `failed(address)` giving a reason marks it failed.
    pub fn derive(
        &self,
        addresses: &[String],
        failed: impl Fn(&String) -> Option<String>,
    ) -> Envelope {
        let recipients = addresses
            .iter()
            .map(|address| {
                let given = self.recipient(address);
                let mut state = RecipientState {
                    address: address.clone(),
                    orcpt: given.and_then(|g| g.orcpt.clone()),
                    notify: given.and_then(|g| g.notify),
                    ..RecipientState::default()
                };
                if let Some(reason) = failed(address) {
                    state.status = RecipientStatus::Failed;
                    state.code = Some(status_code(&reason).unwrap_or("5.1.1").to_string());
                    state.reply = Some(reason);
                }
                state
            })
            .collect();
        Envelope {
            ret: self.ret,
            env_id: self.env_id.clone(),
            recipients,
            delay_notified: false,
            unauthenticated: self.unauthenticated,
            authenticated_as: self.authenticated_as.clone(),
            junk: self.junk.clone(),
        }
    }

    /// The recipients still to deliver.
    pub fn pending(&self) -> impl Iterator<Item = &RecipientState> {
        self.recipients
            .iter()
            .filter(|r| r.status == RecipientStatus::Pending)
    }
}

/// An outbound or undeliverable entry claimed by a delivery worker.
#[derive(Debug, Clone)]
pub struct OutboundItem {
    /// Row identity.
    pub id: i64,
    /// `Outbound` (deliver it) or `Undeliverable` (report it).
    pub queue: QueueName,
    /// The identifier from the Received header.
    pub queue_id: String,
    /// The envelope sender ("" for the null reverse-path: never sent a DSN).
    pub mail_from: String,
    /// The message bytes.
    pub body: Vec<u8>,
    /// When the message was accepted.
    pub received_at_ms: UnixMillis,
    /// Delivery attempts so far, this one included.
    pub attempts: u32,
    /// The connector the last routing chose.
    pub connector: Option<String>,
    /// The directory generation of that routing.
    pub generation: Option<u64>,
    /// DSN parameters and per-recipient state.
    pub envelope: Envelope,
    /// The reasons recorded (undeliverable entries: one per address).
    pub last_error: Option<String>,
}

/// What a delivery attempt (or an administrator) decided for an entry.
#[derive(Debug, Clone)]
pub struct OutboundOutcome {
    /// The updated recipient states.
    pub envelope: Envelope,
    /// When to try again; `None` removes the entry (nothing pending any more).
    pub next_attempt_at_ms: Option<UnixMillis>,
    /// A one-line summary of this attempt, for the queue viewer.
    pub last_error: Option<String>,
    /// The connector and generation the recipients were routed with this time.
    pub route: Option<(String, u64)>,
    /// Delivery status notifications to spool (inbound), in the same transaction.
    pub notices: Vec<SpoolEntry>,
    /// The trail's events for this attempt (relayed, failed, deferred, DSN sent, an
    /// administrator's delete), recorded in the same transaction.
    pub events: Vec<crate::TrackEvent>,
}

/// How `queue list` narrows the entries.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct QueueFilter {
    /// One queue, or all.
    #[serde(default)]
    pub queue: Option<QueueName>,
    /// `held`, `deferred` (tried at least once, waiting), `active` (not held).
    #[serde(default)]
    pub state: Option<String>,
    /// Connector name or recipient domain (the destination).
    #[serde(default)]
    pub destination: Option<String>,
    /// Part of the envelope sender (case-insensitive).
    #[serde(default)]
    pub sender: Option<String>,
    /// Part of an envelope recipient (case-insensitive).
    #[serde(default)]
    pub recipient: Option<String>,
    /// Only entries accepted at least this long ago, ms.
    #[serde(default)]
    pub older_than_ms: Option<i64>,
    /// Entries after this id (paging).
    #[serde(default)]
    pub after: Option<i64>,
    /// At most this many (default 100, at most 10,000).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// Why an administrator's queue action could not be done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueActionError {
    /// No entry with that id.
    NotFound,
    /// A worker is delivering it right now; try again in a moment.
    Busy,
}

/// Store methods for outbound delivery and queue management.
pub trait OutboundQueue: Send + Sync {
    /// Claims up to `limit` due, unheld outbound and undeliverable entries (counting an
    /// attempt each).
    fn claim_outbound(&self, now_ms: UnixMillis, limit: usize) -> Result<Vec<OutboundItem>>;

    /// Records a claimed entry's outcome: recipient states, the next attempt or removal,
    /// and any DSNs to spool, in one transaction. Returns how many DSNs were spooled.
    ///
    /// The entry is named by its row id *and* its queue id, and must still be claimed:
    /// row ids are reused once the rows above them are gone, and an outcome retried
    /// after a storage fault must never delete or reschedule the message that took the
    /// id meanwhile. An entry that is no longer this claim's records nothing (0).
    fn finish_outbound(&self, id: i64, queue_id: &str, outcome: &OutboundOutcome) -> Result<usize>;

    /// The earliest next attempt of an unclaimed, unheld outbound or undeliverable entry.
    fn next_outbound_due(&self) -> Result<Option<UnixMillis>>;

    /// Outbound and undeliverable entries due by `now_ms` and not held (claimed ones
    /// included: they are being worked on), with the oldest one's acceptance time; the
    /// watchdog's view of outbound delivery.
    fn outbound_due(&self, now_ms: UnixMillis) -> Result<(u64, Option<UnixMillis>)>;

    /// Entries matching `filter`, oldest id first.
    fn queue_filter(&self, filter: &QueueFilter, now_ms: UnixMillis) -> Result<Vec<QueueItemInfo>>;

    /// One entry.
    fn queue_item(&self, id: i64) -> Result<Option<QueueItemInfo>>;

    /// Makes an entry due now (and releases it if held); the trail records that `by`
    /// (an administrator) did.
    fn retry_now(
        &self,
        id: i64,
        now_ms: UnixMillis,
        by: &str,
    ) -> Result<std::result::Result<(), QueueActionError>>;

    /// Holds (true) or releases (false) an entry: a held entry is never attempted. The
    /// trail records that `by` (an administrator) did.
    fn set_held(
        &self,
        id: i64,
        held: bool,
        by: &str,
    ) -> Result<std::result::Result<(), QueueActionError>>;

    /// Claims one entry for an administrator's action (delete, with or without a DSN),
    /// to be finished with [`OutboundQueue::finish_outbound`].
    fn claim_one(&self, id: i64) -> Result<std::result::Result<OutboundItem, QueueActionError>>;
}

/// The enhanced status code (`5.1.1`) a reason starts with, if it does.
pub fn status_code(reason: &str) -> Option<&str> {
    let code = reason.split_whitespace().next()?;
    let mut parts = code.split('.');
    let class = parts.next()?;
    let ok = matches!(class, "2" | "4" | "5")
        && parts.clone().count() == 2
        && parts.all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
    ok.then_some(code)
}
