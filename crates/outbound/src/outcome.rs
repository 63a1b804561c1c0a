//! The pure part of an attempt after the I/O: from the recipients' states to what the
//! store records in one transaction: the notices to spool (failure DSNs, "relayed" DSNs
//! for next hops without DSN, one "delayed" DSN, the local connector's re-spool), when to
//! try again, and a one-line summary. Also the recipient-state updates the I/O applies
//! as replies arrive ([`fail`], [`defer`], [`record`]).
//!
//! Why pure: what a sender is told, and when mail is tried again, decides whether mail
//! is lost or duplicated in the sender's eyes; it is tested here with values, not with
//! sockets. Clocks come in as arguments.

use crate::client::Reply;
use crate::dsn;
use crate::schedule::Schedule;
use mailroom_store::{
    Envelope, OutboundItem, OutboundOutcome, RecipientStatus, SpoolEntry, TrackEvent, TrackKind,
};
use std::time::Duration;

/// What one attempt noted besides the recipient states.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AttemptLog {
    /// A one-line summary of the last failure, for the queue viewer.
    pub summary: Option<String>,
    /// Delivered to a next hop that does not offer DSN, with NOTIFY=SUCCESS asked.
    pub relayed: Vec<String>,
}

/// Fails a pending recipient with this reply.
pub fn fail(envelope: &mut Envelope, address: &str, code: &str, reply: String, mta: Option<&str>) {
    if let Some(r) = envelope
        .recipients
        .iter_mut()
        .find(|r| r.address == address && r.status == RecipientStatus::Pending)
    {
        r.status = RecipientStatus::Failed;
        r.code = Some(code.to_string());
        r.reply = Some(reply);
        r.remote_mta = mta.map(str::to_string);
    }
}

/// Keeps a recipient pending, noting why this attempt did not deliver it.
pub fn defer(envelope: &mut Envelope, address: &str, code: &str, reply: String, mta: Option<&str>) {
    if let Some(r) = envelope
        .recipients
        .iter_mut()
        .find(|r| r.address == address && r.status == RecipientStatus::Pending)
    {
        r.code = Some(code.to_string());
        r.reply = Some(reply);
        r.remote_mta = mta.map(str::to_string);
    }
}

/// Records one recipient's outcome from its RCPT reply and the data reply.
pub fn record(
    envelope: &mut Envelope,
    address: &str,
    rcpt: &Reply,
    data: Option<&Reply>,
    host: &str,
) {
    if !rcpt.positive() {
        let code = rcpt.status_or("5.0.0", "4.0.0");
        if rcpt.permanent() {
            fail(envelope, address, &code, rcpt.to_string(), Some(host));
        } else {
            defer(envelope, address, &code, rcpt.to_string(), Some(host));
        }
        return;
    }
    let Some(data) = data else {
        return;
    };
    if data.positive() {
        if let Some(r) = envelope
            .recipients
            .iter_mut()
            .find(|r| r.address == address && r.status == RecipientStatus::Pending)
        {
            r.status = RecipientStatus::Delivered;
            r.code = Some(data.status_or("2.0.0", "2.0.0"));
            r.reply = Some(data.to_string());
            r.remote_mta = Some(host.to_string());
        }
    } else if data.permanent() {
        fail(
            envelope,
            address,
            &data.status_or("5.0.0", "4.0.0"),
            data.to_string(),
            Some(host),
        );
    } else {
        defer(
            envelope,
            address,
            &data.status_or("5.0.0", "4.0.0"),
            data.to_string(),
            Some(host),
        );
    }
}

/// Everything an attempt did, for [`settle`].
pub struct Attempted<'a> {
    /// The entry.
    pub item: &'a OutboundItem,
    /// The recipients the attempt was about.
    pub before: &'a [String],
    /// Their states now.
    pub envelope: Envelope,
    /// The connector chosen, and its generation.
    pub route: Option<(String, u64)>,
    /// Recipients handed back to local delivery.
    pub respool: Vec<String>,
    /// The connector's own retry schedule (minutes), if any.
    pub connector_retry: Option<Vec<u64>>,
    /// What the attempt noted.
    pub log: AttemptLog,
    /// The retry schedule.
    pub schedule: &'a Schedule,
    /// This server's name, the reporting MTA of DSNs.
    pub hostname: &'a str,
    /// The delivery clock now.
    pub now_ms: i64,
    /// The wall clock now (what enters the inbound queue).
    pub wall_ms: i64,
}

/// What [`settle`] decided.
#[derive(Debug)]
pub struct Settled {
    /// What the store records.
    pub outcome: OutboundOutcome,
    /// Each recipient the attempt was about, with "delivered", "failed" or "deferred".
    pub results: Vec<(String, &'static str)>,
}

/// From the recipients' states after an attempt to what the store records.
pub fn settle(attempted: Attempted<'_>) -> Settled {
    let Attempted {
        item,
        before,
        mut envelope,
        route,
        respool,
        connector_retry,
        log,
        schedule,
        hostname,
        now_ms: now,
        wall_ms,
    } = attempted;
    let mut newly_failed = Vec::new();
    let mut results = Vec::new();
    for address in before {
        if let Some(r) = envelope.recipient(address) {
            let result = match r.status {
                RecipientStatus::Delivered => "delivered",
                RecipientStatus::Failed => {
                    newly_failed.push(address.clone());
                    "failed"
                }
                RecipientStatus::Pending => "deferred",
            };
            results.push((address.clone(), result));
        }
    }
    let mut dsn_events = Vec::new();
    let mut notices = failure_notices(
        item,
        &envelope,
        &newly_failed,
        hostname,
        wall_ms,
        &mut dsn_events,
    );
    if !log.relayed.is_empty() && !item.mail_from.is_empty() {
        let relayed: Vec<_> = envelope
            .recipients
            .iter()
            .filter(|r| log.relayed.contains(&r.address))
            .collect();
        let (notice, event) = notice_entry(
            item,
            &envelope,
            relayed,
            dsn::Action::Relayed,
            None,
            hostname,
            wall_ms,
        );
        notices.push(notice);
        dsn_events.push(event);
    }
    if !respool.is_empty() {
        notices.push(SpoolEntry {
            queue_id: format!("{}L", item.queue_id),
            mail_from: item.mail_from.clone(),
            recipients: respool.clone(),
            body: item.body.clone(),
            received_at_ms: wall_ms,
            client: "outbound (local connector)".into(),
            envelope: envelope.derive(&respool, |_| None),
            ..SpoolEntry::default()
        });
    }
    let pending = envelope.pending().count();
    let next_attempt_at_ms = (pending > 0).then(|| {
        let wait = match &connector_retry {
            Some(minutes) => Schedule {
                intervals: minutes
                    .iter()
                    .map(|m| Duration::from_secs(m * 60))
                    .collect(),
                ..schedule.clone()
            }
            .wait_after(item.attempts),
            None => schedule.wait_after(item.attempts),
        };
        let expires = schedule.expires_at_ms(item.received_at_ms);
        (now + wait.as_millis() as i64).min(expires.max(now + 1))
    });
    // One "delayed" notice once the message has waited long enough.
    if pending > 0
        && !envelope.delay_notified
        && now - item.received_at_ms >= schedule.delay_notice_after.as_millis() as i64
        && !item.mail_from.is_empty()
    {
        let delayed: Vec<_> = envelope
            .pending()
            .filter(|r| dsn::wanted(r, dsn::Action::Delayed))
            .collect();
        if !delayed.is_empty() {
            let (notice, event) = notice_entry(
                item,
                &envelope,
                delayed,
                dsn::Action::Delayed,
                Some(schedule.expires_at_ms(item.received_at_ms)),
                hostname,
                wall_ms,
            );
            notices.push(notice);
            dsn_events.push(event);
        }
        envelope.delay_notified = true;
    }
    let mut events = attempt_events(
        item,
        &results,
        &envelope,
        route.as_ref().map(|r| r.0.as_str()),
        next_attempt_at_ms,
        log.summary.as_deref(),
        wall_ms,
    );
    if !respool.is_empty() {
        events.push(
            TrackEvent::new(TrackKind::Relayed, &item.queue_id, wall_ms)
                .recipients(respool.iter().cloned())
                .with("host", "local delivery")
                .with("connector", route.as_ref().map_or("", |r| r.0.as_str()))
                .with("notice", format!("{}L", item.queue_id)),
        );
    }
    events.append(&mut dsn_events);
    Settled {
        outcome: OutboundOutcome {
            envelope,
            next_attempt_at_ms,
            last_error: log.summary,
            route,
            notices,
            events,
        },
        results,
    }
}

/// The trail's events for the recipients an attempt was about: "relayed" (a next hop
/// took it), "failed" (for good) and "deferred" (another attempt follows), one event
/// per next hop and reply.
pub fn attempt_events(
    item: &OutboundItem,
    results: &[(String, &'static str)],
    envelope: &Envelope,
    connector: Option<&str>,
    next_attempt_at_ms: Option<i64>,
    summary: Option<&str>,
    wall_ms: i64,
) -> Vec<TrackEvent> {
    // Grouped by (kind, host, reply), in the order first met.
    /// Recipients that share a kind, a next hop and a reply.
    type Group = (TrackKind, Option<String>, Option<String>, Vec<String>);
    let mut groups: Vec<Group> = Vec::new();
    for (address, result) in results {
        let Some(r) = envelope.recipient(address) else {
            continue;
        };
        let kind = match *result {
            "delivered" => TrackKind::Relayed,
            "failed" => TrackKind::Failed,
            _ => TrackKind::Deferred,
        };
        let reply = r.reply.clone().or_else(|| summary.map(str::to_string));
        match groups
            .iter_mut()
            .find(|(k, h, rep, _)| *k == kind && *h == r.remote_mta && *rep == reply)
        {
            Some(group) => group.3.push(address.clone()),
            None => groups.push((kind, r.remote_mta.clone(), reply, vec![address.clone()])),
        }
    }
    groups
        .into_iter()
        .map(|(kind, host, reply, recipients)| {
            let mut event = TrackEvent::new(kind, &item.queue_id, wall_ms)
                .recipients(recipients)
                .with("attempt", item.attempts);
            if let Some(connector) = connector.or(item.connector.as_deref()) {
                event = event.with("connector", connector);
            }
            if let Some(host) = host {
                event = event.with("host", host);
            }
            if let Some(reply) = reply {
                event = event.with(
                    if kind == TrackKind::Deferred {
                        "reason"
                    } else {
                        "reply"
                    },
                    reply,
                );
            }
            if kind == TrackKind::Deferred
                && let Some(next) = next_attempt_at_ms
            {
                event = event
                    .with("next_attempt_at_ms", next)
                    .with("next_attempt", mailroom_store::track::rfc3339(next));
            }
            event
        })
        .collect()
}

/// The client a generated DSN is spooled as (the queue viewer shows it).
const NOTICE_CLIENT: &str = "outbound (delivery status notification)";

/// The failure DSN for `failed` recipients that asked for one (none to the null sender),
/// with its "dsn" event for the trail pushed onto `events`.
pub fn failure_notices(
    item: &OutboundItem,
    envelope: &Envelope,
    failed: &[String],
    hostname: &str,
    wall_ms: i64,
    events: &mut Vec<TrackEvent>,
) -> Vec<SpoolEntry> {
    if item.mail_from.is_empty() {
        return Vec::new();
    }
    let reported: Vec<_> = envelope
        .recipients
        .iter()
        .filter(|r| failed.contains(&r.address) && dsn::wanted(r, dsn::Action::Failed))
        .collect();
    if reported.is_empty() {
        return Vec::new();
    }
    let (notice, event) = notice_entry(
        item,
        envelope,
        reported,
        dsn::Action::Failed,
        None,
        hostname,
        wall_ms,
    );
    events.push(event);
    vec![notice]
}

fn notice_entry(
    item: &OutboundItem,
    envelope: &Envelope,
    recipients: Vec<&mailroom_store::RecipientState>,
    action: dsn::Action,
    retry_until_ms: Option<i64>,
    hostname: &str,
    wall_ms: i64,
) -> (SpoolEntry, TrackEvent) {
    let queue_id = format!("{}D{}", item.queue_id, item.attempts);
    let event = TrackEvent::new(TrackKind::Dsn, &item.queue_id, wall_ms)
        .recipients(recipients.iter().map(|r| r.address.clone()))
        .with(
            "action",
            match action {
                dsn::Action::Failed => "failed",
                dsn::Action::Delayed => "delayed",
                dsn::Action::Relayed => "relayed",
            },
        )
        .with("to", item.mail_from.as_str())
        .with("notice", queue_id.as_str());
    let body = dsn::build(
        &dsn::Notice {
            reporting_mta: hostname,
            envelope,
            recipients,
            action,
            arrival_ms: item.received_at_ms,
            queue_id: &item.queue_id,
            original: &item.body,
            retry_until_ms,
        },
        &item.mail_from,
    );
    let entry = SpoolEntry {
        queue_id,
        mail_from: String::new(),
        recipients: vec![item.mail_from.clone()],
        body,
        received_at_ms: wall_ms,
        client: NOTICE_CLIENT.into(),
        envelope: Envelope::default(),
        ..SpoolEntry::default()
    };
    (entry, event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailroom_store::{QueueName, RecipientState};

    fn item(mail_from: &str, attempts: u32, received_at_ms: i64) -> OutboundItem {
        OutboundItem {
            id: 1,
            queue: QueueName::Outbound,
            queue_id: "Q9".into(),
            mail_from: mail_from.into(),
            body: b"Subject: hi\r\n\r\nbody\r\n".to_vec(),
            received_at_ms,
            attempts,
            connector: None,
            generation: None,
            envelope: Envelope::default(),
            last_error: None,
        }
    }

    fn envelope(states: &[(&str, RecipientStatus)]) -> Envelope {
        Envelope {
            recipients: states
                .iter()
                .map(|(a, s)| RecipientState {
                    status: *s,
                    reply: Some("550 5.1.1 no".into()),
                    code: Some("5.1.1".into()),
                    ..RecipientState::pending(*a)
                })
                .collect(),
            ..Default::default()
        }
    }

    fn schedule() -> Schedule {
        Schedule {
            jitter: 0.0,
            ..Schedule::default()
        }
    }

    fn settle_with(
        item: &OutboundItem,
        envelope: Envelope,
        connector_retry: Option<Vec<u64>>,
        now_ms: i64,
    ) -> Settled {
        let before: Vec<String> = envelope
            .recipients
            .iter()
            .map(|r| r.address.clone())
            .collect();
        let schedule = schedule();
        settle(Attempted {
            item,
            before: &before,
            envelope,
            route: Some(("internet".into(), 3)),
            respool: Vec::new(),
            connector_retry,
            log: AttemptLog::default(),
            schedule: &schedule,
            hostname: "mx.example.test",
            now_ms,
            wall_ms: 123,
        })
    }

    /// A failure gets one DSN to the sender; a delivered recipient none; nothing
    /// pending means no next attempt.
    #[test]
    fn failures_are_reported_once_and_finished_entries_not_retried() {
        let entry = item("ann@example.test", 1, 0);
        let settled = settle_with(
            &entry,
            envelope(&[
                ("bad@far.test", RecipientStatus::Failed),
                ("ok@far.test", RecipientStatus::Delivered),
            ]),
            None,
            1_000,
        );
        assert_eq!(
            settled.results,
            vec![
                ("bad@far.test".to_string(), "failed"),
                ("ok@far.test".to_string(), "delivered")
            ]
        );
        assert_eq!(settled.outcome.next_attempt_at_ms, None);
        assert_eq!(settled.outcome.notices.len(), 1);
        let dsn = &settled.outcome.notices[0];
        assert_eq!(dsn.mail_from, "");
        assert_eq!(dsn.recipients, vec!["ann@example.test".to_string()]);
        assert_eq!(dsn.received_at_ms, 123);
        let text = String::from_utf8_lossy(&dsn.body);
        assert!(
            text.contains("Final-Recipient: rfc822; bad@far.test"),
            "{text}"
        );
        assert!(!text.contains("ok@far.test"), "{text}");
        // The null sender never gets one (no DSN about a DSN).
        let bounce = item("", 1, 0);
        let settled = settle_with(
            &bounce,
            envelope(&[("bad@far.test", RecipientStatus::Failed)]),
            None,
            1_000,
        );
        assert!(settled.outcome.notices.is_empty());
    }

    /// A pending recipient is tried again after the schedule's interval for the
    /// attempts so far (or the connector's own), never after expiry; after four hours
    /// the sender hears once that it is delayed.
    #[test]
    fn pending_recipients_wait_by_the_schedule_and_are_reported_delayed_once() {
        let entry = item("ann@example.test", 2, 0);
        let pending = || envelope(&[("slow@far.test", RecipientStatus::Pending)]);
        let settled = settle_with(&entry, pending(), None, 1_000);
        assert_eq!(
            settled.outcome.next_attempt_at_ms,
            Some(1_000 + 30 * 60_000)
        );
        assert!(settled.outcome.notices.is_empty());
        let settled = settle_with(&entry, pending(), Some(vec![2, 5]), 1_000);
        assert_eq!(settled.outcome.next_attempt_at_ms, Some(1_000 + 5 * 60_000));
        // Past the delay notice: one "delayed" DSN, and the envelope remembers it.
        let later = 4 * 3_600_000 + 1;
        let settled = settle_with(&entry, pending(), None, later);
        assert_eq!(settled.outcome.notices.len(), 1);
        assert!(settled.outcome.envelope.delay_notified);
        let text = String::from_utf8_lossy(&settled.outcome.notices[0].body);
        assert!(text.contains("Action: delayed"), "{text}");
        let mut notified = pending();
        notified.delay_notified = true;
        assert!(
            settle_with(&entry, notified, None, later)
                .outcome
                .notices
                .is_empty()
        );
        // Close to expiry, the next attempt is not later than the expiry itself.
        let expires = schedule().expires_at_ms(0);
        let settled = settle_with(&entry, pending(), None, expires - 10);
        assert_eq!(settled.outcome.next_attempt_at_ms, Some(expires));
    }
}
