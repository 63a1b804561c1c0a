//! The quota warning (the directory's "issue warning" limit): when a delivery takes a
//! mailbox over it, the owner finds a notice in the INBOX, once per crossing.
//!
//! Why at delivery: that is the moment the size changes upwards; the notice is appended
//! like any message (no trace header), so IMAP and POP3 clients show it.

use mailroom_directory::Snapshot;
use mailroom_store::{MailStore, RecipientId};
use std::collections::HashMap;

/// After a delivery of `bytes` per recipient: warn each recipient whose mailbox just
/// went over its warning limit. Errors are logged, never raised: a notice must not
/// fail a delivery.
pub fn warn_crossings(
    store: &dyn MailStore,
    snapshot: &Snapshot,
    bytes: &HashMap<RecipientId, u64>,
    now_ms: i64,
) {
    for (&recipient, &added) in bytes {
        let Some(r) = snapshot.recipient(recipient) else {
            continue;
        };
        let Some(warn_kb) = r.quota.warning_kb.filter(|kb| *kb > 0) else {
            continue;
        };
        let limit = warn_kb * 1024;
        let after = match store.mailbox_bytes(recipient) {
            Ok(after) => after,
            Err(e) => {
                tracing::warn!(error = %e, "quota warning check failed");
                continue;
            }
        };
        if after < limit || after.saturating_sub(added) >= limit {
            continue;
        }
        let address = r.primary_address().unwrap_or_default().to_string();
        let domain = address.rsplit_once('@').map_or("localhost", |(_, d)| d);
        let hard = r
            .quota
            .prohibit_send_receive_kb
            .map(|kb| {
                format!(" Above {kb} KB, mail sent to you will be refused until you free space.")
            })
            .unwrap_or_default();
        let notice = mail_builder::MessageBuilder::new()
            .from(("Mailroom", format!("postmaster@{domain}").as_str()))
            .to(address.as_str())
            .subject("Your mailbox is almost full")
            .text_body(format!(
                "Your mailbox now holds {} KB, above its warning limit of {warn_kb} KB.{hard}\n\
                 Delete or archive messages you no longer need to make room.\n",
                after.div_ceil(1024)
            ))
            .write_to_vec()
            .unwrap_or_default();
        let facts = crate::facts::message_facts(&notice);
        match store.append(recipient, "INBOX", &[], now_ms, &notice, Some(&facts)) {
            Ok(_) => tracing::info!(recipient = %address, after, limit, "quota warning delivered"),
            Err(e) => {
                tracing::warn!(recipient = %address, error = %e, "quota warning not delivered")
            }
        }
    }
}
