//! Tests of the directory as a whole: changes through the writer, snapshots, expansion,
//! protocol inheritance, site addressing, persistence.

use crate::model::*;
use crate::routing::{AddressSpace, Connector, ConnectorKind};
use crate::*;
use mailroom_store::{SqliteStore, Topology};
use std::sync::Arc;

fn topology() -> Topology {
    Topology {
        organization: "Org".into(),
        site: "Site".into(),
        server: "mx1".into(),
    }
}

fn start_in(dir: &std::path::Path) -> Directory {
    let store = Arc::new(SqliteStore::open(&dir.join("db")).unwrap());
    Directory::start(
        store,
        &["example.test".into()],
        &topology(),
        SiteConfig::default(),
    )
    .unwrap()
    .0
}

fn start() -> (Directory, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (start_in(dir.path()), dir)
}

fn mailbox(address: &str) -> Change {
    Change::CreateRecipient(RecipientFields {
        kind: Some(RecipientKind::Mailbox),
        addresses: Some(vec![address.into()]),
        display_name: Some("X".into()),
        ..Default::default()
    })
}

fn person(alias: &str, given: &str, surname: &str) -> Change {
    Change::CreateRecipient(RecipientFields {
        kind: Some(RecipientKind::Mailbox),
        alias: Some(alias.into()),
        given_name: Some(given.into()),
        surname: Some(surname.into()),
        display_name: Some(format!("{given} {surname}")),
        ..Default::default()
    })
}

fn list(alias: &str, members: &[&str]) -> Change {
    Change::CreateRecipient(RecipientFields {
        kind: Some(RecipientKind::List),
        alias: Some(alias.into()),
        addresses: Some(vec![format!("{alias}@example.test")]),
        members: Some(members.iter().map(|m| m.to_string()).collect()),
        ..Default::default()
    })
}

fn site(change: SiteChange) -> Change {
    Change::Site(change)
}

fn ok(directory: &Directory, change: Change) -> Applied {
    directory.apply_blocking(change).expect("change applies")
}

#[test]
fn a_change_publishes_a_new_generation_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let directory = start_in(dir.path());
    let before = directory.snapshot();
    let alice = ok(&directory, mailbox("alice@example.test"))
        .recipient
        .unwrap();
    assert_eq!(alice.alias, "alice");
    let after = directory.snapshot();
    assert_eq!(after.generation(), before.generation() + 1);
    assert!(
        before.by_address("alice@example.test").is_none(),
        "old snapshot unchanged"
    );
    assert_eq!(after.by_address("Alice@Example.test").unwrap().id, alice.id);
    ok(
        &directory,
        site(SiteChange::AddAcceptedDomain {
            domain: "other.test".into(),
        }),
    );
    drop(directory);
    let again = start_in(dir.path());
    let snap = again.snapshot();
    assert_eq!(snap.by_address("alice@example.test").unwrap().id, alice.id);
    assert!(snap.is_local_domain("other.test"));
    assert_eq!(snap.topology(), &topology());
    // New identities continue after the stored ones.
    let bob = ok(&again, mailbox("bob@example.test")).recipient.unwrap();
    assert!(bob.id > alice.id);
}

#[test]
fn invalid_changes_name_the_object_and_field_and_leave_the_snapshot() {
    let (directory, _dir) = start();
    ok(&directory, mailbox("alice@example.test"));
    let generation = directory.snapshot().generation();
    let cases = [
        (mailbox("ALICE@example.test"), "addresses"),
        (mailbox("no-at-sign"), "addresses"),
        (mailbox("alice@elsewhere.test"), "addresses"),
        (
            Change::CreateRecipient(RecipientFields {
                kind: Some(RecipientKind::Mailbox),
                alias: Some("alice".into()),
                addresses: Some(vec!["other@example.test".into()]),
                ..Default::default()
            }),
            "alias",
        ),
        (
            Change::CreateRecipient(RecipientFields {
                kind: Some(RecipientKind::Contact),
                alias: Some("c".into()),
                addresses: Some(vec!["c@example.test".into()]),
                ..Default::default()
            }),
            "target_address",
        ),
        (list("team", &["nobody"]), "members"),
        (
            Change::ModifyRecipient {
                alias: "alice".into(),
                fields: RecipientFields {
                    protocols: Some(vec!["imap:sometimes".into()]),
                    ..Default::default()
                },
            },
            "protocols",
        ),
        (
            site(SiteChange::SetTemplate {
                address_type: "SMTP".into(),
                template: Some("%q@x.test".into()),
            }),
            "template",
        ),
    ];
    for (change, field) in cases {
        let err = directory.apply_blocking(change.clone()).unwrap_err();
        assert!(
            matches!(&err, DirectoryError::Invalid { field: f, .. } if *f == field),
            "{change:?}: {err}"
        );
    }
    let err = directory
        .apply_blocking(mailbox("alice@elsewhere.test"))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "alice@elsewhere.test: field addresses: elsewhere.test is not an accepted domain; add it first (mailroom domain add elsewhere.test)"
    );
    assert_eq!(
        directory.snapshot().generation(),
        generation,
        "nothing was published"
    );
}

#[test]
fn atomic_requests_apply_all_or_nothing_and_dry_runs_change_nothing() {
    let (directory, _dir) = start();
    let changes = vec![
        mailbox("a@example.test"),
        mailbox("b@example.test"),
        mailbox("a@example.test"),
    ];
    let preview = dry_run(&directory.snapshot(), &changes, false);
    assert!(preview[0].is_ok() && preview[1].is_ok() && preview[2].is_err());
    assert_eq!(directory.snapshot().len(), 0, "a dry run saves nothing");
    let results = directory.apply_all_blocking(changes.clone(), true);
    assert_eq!(results[0], Err(DirectoryError::RolledBack));
    assert!(matches!(results[2], Err(DirectoryError::Invalid { .. })));
    assert_eq!(directory.snapshot().len(), 0);
    let results = directory.apply_all_blocking(changes, false);
    assert!(results[0].is_ok() && results[1].is_ok() && results[2].is_err());
    assert_eq!(directory.snapshot().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_are_batched_and_all_applied() {
    let (directory, _dir) = start();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let d = directory.clone();
            tokio::spawn(async move { d.apply(mailbox(&format!("u{i}@example.test"))).await })
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

#[test]
fn list_expansion_nested_with_a_loop_and_duplicates() {
    let (directory, _dir) = start();
    for a in ["ann", "bob", "cat"] {
        ok(&directory, mailbox(&format!("{a}@example.test")));
    }
    ok(
        &directory,
        site(SiteChange::AddAcceptedDomain {
            domain: "example.org".into(),
        }),
    );
    ok(
        &directory,
        Change::CreateRecipient(RecipientFields {
            kind: Some(RecipientKind::Contact),
            alias: Some("partner".into()),
            addresses: Some(vec!["partner@example.org".into()]),
            target_address: Some("SMTP:pat@partner.example".into()),
            ..Default::default()
        }),
    );
    ok(&directory, list("inner", &["bob", "cat", "partner"]));
    ok(&directory, list("outer", &["ann", "inner", "bob"]));
    // Close a loop: inner contains outer.
    ok(
        &directory,
        Change::ModifyRecipient {
            alias: "inner".into(),
            fields: RecipientFields {
                members: Some(vec![
                    "bob".into(),
                    "cat".into(),
                    "partner".into(),
                    "outer".into(),
                ]),
                ..Default::default()
            },
        },
    );
    let snap = directory.snapshot();
    let id = |a: &str| snap.by_alias(a).unwrap().id;
    let targets = snap.expand("outer@example.test");
    assert_eq!(
        targets,
        vec![
            Target::Mailbox(id("ann")),
            Target::Mailbox(id("bob")),
            Target::Mailbox(id("cat")),
            Target::Remote("pat@partner.example".into()),
        ],
        "each member once, the loop cut"
    );
    assert_eq!(
        snap.expand("partner@example.org"),
        vec![Target::Remote("pat@partner.example".into())]
    );
    ok(&directory, list("empty", &[]));
    assert!(matches!(
        &directory.snapshot().expand("empty@example.test")[..],
        [Target::Undeliverable(_, why)] if why.contains("no members")
    ));
    // Deleting a member removes it from every list.
    ok(
        &directory,
        Change::DeleteRecipient {
            alias: "cat".into(),
        },
    );
    let snap = directory.snapshot();
    assert!(!snap.by_alias("inner").unwrap().members.contains(&id("cat")));
    assert_eq!(snap.expand("inner@example.test").len(), 3);
}

#[test]
fn protocol_inheritance_at_each_level() {
    let (directory, _dir) = start();
    let alice = ok(&directory, mailbox("alice@example.test"))
        .recipient
        .unwrap()
        .id;
    let may = |p| directory.snapshot().may_use(alice, p);
    assert!(may(Protocol::Imap), "site default: on");
    // Site off, server uses site defaults: off.
    ok(
        &directory,
        site(SiteChange::SetSiteProtocol {
            protocol: Protocol::Imap,
            enabled: false,
        }),
    );
    assert!(!may(Protocol::Imap));
    assert!(may(Protocol::Pop3), "other protocols unaffected");
    // The server's own settings take over from the site's.
    ok(
        &directory,
        site(SiteChange::SetServerProtocol {
            use_site_defaults: false,
            protocol: Some((Protocol::Imap, true)),
        }),
    );
    assert!(may(Protocol::Imap));
    // A recipient override can turn it off...
    let set = |value: &str| Change::ModifyRecipient {
        alias: "alice".into(),
        fields: RecipientFields {
            protocols: Some(vec![format!("imap:{value}")]),
            ..Default::default()
        },
    };
    ok(&directory, set("off"));
    assert!(!may(Protocol::Imap));
    ok(&directory, set("default"));
    assert!(may(Protocol::Imap));
    // ...but not on when the server has it off.
    ok(
        &directory,
        site(SiteChange::SetServerProtocol {
            use_site_defaults: false,
            protocol: Some((Protocol::Imap, false)),
        }),
    );
    ok(&directory, set("on"));
    assert!(
        !may(Protocol::Imap),
        "off at the server means off for its mailboxes"
    );
    // Back to the site defaults (site says off).
    ok(
        &directory,
        site(SiteChange::SetServerProtocol {
            use_site_defaults: true,
            protocol: None,
        }),
    );
    assert!(!may(Protocol::Imap));
}

#[test]
fn site_addressing_generates_regenerates_and_keeps_old_addresses() {
    let (directory, _dir) = start();
    ok(
        &directory,
        site(SiteChange::SetTemplate {
            address_type: "SMTP".into(),
            template: Some("%g.%s@example.test".into()),
        }),
    );
    let mark = ok(&directory, person("mclark", "Mark", "Clark"))
        .recipient
        .unwrap();
    assert_eq!(mark.primary_address(), Some("Mark.Clark@example.test"));
    assert!(mark.addresses[0].generated);
    // A second Mark Clark collides and gets a suffix, reported.
    let second = ok(&directory, person("mclark2", "Mark", "Clark"));
    assert_eq!(
        second.recipient.unwrap().primary_address(),
        Some("Mark.Clark2@example.test")
    );
    assert_eq!(second.notes.len(), 1);
    // A manual address is never regenerated.
    ok(
        &directory,
        Change::CreateRecipient(RecipientFields {
            kind: Some(RecipientKind::Mailbox),
            alias: Some("boss".into()),
            given_name: Some("Big".into()),
            surname: Some("Boss".into()),
            addresses: Some(vec!["SMTP:ceo@example.test".into()]),
            ..Default::default()
        }),
    );
    // The template changes (its domain becomes accepted); regenerate everyone.
    ok(
        &directory,
        site(SiteChange::SetTemplate {
            address_type: "SMTP".into(),
            template: Some("%1g%s@new.test".into()),
        }),
    );
    let ids: Vec<i64> = directory.snapshot().recipients().map(|r| r.id).collect();
    ok(&directory, Change::RegenerateAddresses { ids });
    let snap = directory.snapshot();
    let mark = snap.by_alias("mclark").unwrap();
    assert_eq!(mark.primary_address(), Some("MClark@new.test"));
    assert!(
        snap.by_address("Mark.Clark@example.test").is_some(),
        "the old address still delivers"
    );
    assert!(
        !mark
            .addresses
            .iter()
            .find(|a| a.address == "Mark.Clark@example.test")
            .unwrap()
            .generated
    );
    assert_eq!(
        snap.by_alias("mclark2").unwrap().primary_address(),
        Some("MClark2@new.test")
    );
    assert_eq!(
        snap.by_alias("boss").unwrap().primary_address(),
        Some("ceo@example.test")
    );
    assert!(snap.is_local_domain("new.test") && snap.is_local_domain("example.test"));
    // Regenerating again changes nothing.
    let generation = snap.generation();
    let ids: Vec<i64> = snap.recipients().map(|r| r.id).collect();
    ok(&directory, Change::RegenerateAddresses { ids });
    assert_eq!(directory.snapshot().generation(), generation);
}

#[test]
fn connectors_build_the_routing_table_and_keep_the_previous_one() {
    let (directory, _dir) = start();
    let connector = |name: &str, pattern: &str, cost: u8| Connector {
        name: name.into(),
        kind: ConnectorKind::SmartHost {
            host: "127.0.0.1:2626".into(),
        },
        address_spaces: vec![AddressSpace::parse(pattern, cost).unwrap()],
        enabled: true,
        retry_minutes: None,
    };
    ok(
        &directory,
        site(SiteChange::PutConnector {
            connector: connector("internet", "SMTP:*", 10),
        }),
    );
    ok(
        &directory,
        site(SiteChange::PutConnector {
            connector: connector("partner", "SMTP:*@partner.example", 1),
        }),
    );
    let snap = directory.snapshot();
    assert_eq!(
        snap.routing()
            .route("SMTP", "a@partner.example", 0)
            .unwrap()
            .connector,
        "partner"
    );
    assert_eq!(
        snap.routing()
            .route("SMTP", "a@other.example", 0)
            .unwrap()
            .connector,
        "internet"
    );
    let diff = routing::diff(snap.previous_routing(), &snap.routing().render());
    assert!(diff.starts_with("+ SMTP   *@partner.example"), "{diff}");
    let err = directory
        .apply_blocking(site(SiteChange::PutConnector {
            connector: Connector {
                kind: ConnectorKind::SmartHost {
                    host: "nowhere".into(),
                },
                ..connector("bad", "*", 1)
            },
        }))
        .unwrap_err();
    assert!(err.to_string().contains("host:port"), "{err}");
}

#[test]
fn a_newer_regeneration_job_supersedes_a_running_one() {
    let (directory, _dir) = start();
    ok(
        &directory,
        site(SiteChange::SetTemplate {
            address_type: "SMTP".into(),
            template: Some("%g.%s@example.test".into()),
        }),
    );
    let people: Vec<Change> = (0..600)
        .map(|i| person(&format!("p{i}"), "Pat", &format!("Person{i}")))
        .collect();
    assert!(
        directory
            .apply_all_blocking(people, true)
            .iter()
            .all(|r| r.is_ok())
    );
    ok(
        &directory,
        site(SiteChange::SetTemplate {
            address_type: "SMTP".into(),
            template: Some("%s@example.test".into()),
        }),
    );
    let jobs = jobs::Jobs::new(None);
    // A job that is no longer the newest stops before writing anything and says which
    // job took over.
    let old = jobs.create("regenerate addresses");
    let generation = directory.snapshot().generation();
    let newest = std::sync::atomic::AtomicU64::new(old.id + 1);
    jobs::regenerate(directory.clone(), &old, &newest);
    assert_eq!(old.state(), jobs::JobState::Superseded);
    let report = old.report();
    assert_eq!(report.state, "superseded");
    assert_eq!(report.scanned, 0);
    assert!(
        report.summary.contains(&format!("job {}", old.id + 1)),
        "{}",
        report.summary
    );
    assert_eq!(
        directory.snapshot().generation(),
        generation,
        "nothing written"
    );
    // Two template changes in a row: the second job is the newest, and it renews every
    // address whatever became of the first.
    let first = jobs::start_regeneration(directory.clone(), &jobs);
    let second = jobs::start_regeneration(directory.clone(), &jobs);
    assert_eq!(
        jobs.newest_regeneration
            .load(std::sync::atomic::Ordering::Acquire),
        second.id
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while [&first, &second]
        .iter()
        .any(|j| j.state() == jobs::JobState::Running)
    {
        assert!(std::time::Instant::now() < deadline, "jobs still running");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(second.state(), jobs::JobState::Done);
    assert_eq!(second.report().scanned, 600);
    assert!(matches!(
        first.state(),
        jobs::JobState::Done | jobs::JobState::Superseded
    ));
    let snap = directory.snapshot();
    for i in 0..600 {
        assert_eq!(
            snap.by_alias(&format!("p{i}")).unwrap().primary_address(),
            Some(format!("Person{i}@example.test").as_str())
        );
    }
}

/// "Send as" grants: only mailboxes may be granted, a bad grant names its field and
/// changes nothing, and deleting a granted mailbox removes its grants.
#[test]
fn send_as_grants_name_mailboxes_and_go_with_them() {
    let (directory, _dir) = start();
    let ann = ok(&directory, mailbox("ann@example.test"))
        .recipient
        .unwrap();
    ok(&directory, mailbox("sales@example.test"));
    ok(&directory, list("team", &["ann"]));
    let grant = |who: &[&str]| Change::ModifyRecipient {
        alias: "sales".into(),
        fields: RecipientFields {
            send_as: Some(who.iter().map(|w| w.to_string()).collect()),
            ..Default::default()
        },
    };
    let before = directory.snapshot().generation();
    match directory.apply_blocking(grant(&["team"])) {
        Err(DirectoryError::Invalid { field, reason, .. }) => {
            assert_eq!(field, "send_as");
            assert!(reason.contains("not a mailbox"), "{reason}");
        }
        other => panic!("a list cannot be granted send as: {other:?}"),
    }
    assert!(matches!(
        directory.apply_blocking(grant(&["nobody@example.test"])),
        Err(DirectoryError::Invalid {
            field: "send_as",
            ..
        })
    ));
    assert_eq!(directory.snapshot().generation(), before);
    ok(&directory, grant(&["ann", "ann@example.test"]));
    let snapshot = directory.snapshot();
    let sales = snapshot.by_address("sales@example.test").unwrap();
    assert_eq!(sales.send_as, vec![ann.id]);
    ok(
        &directory,
        Change::DeleteRecipient {
            alias: "ann".into(),
        },
    );
    let snapshot = directory.snapshot();
    let sales = snapshot.by_address("sales@example.test").unwrap();
    assert!(sales.send_as.is_empty());
}

/// The writer applies a batch's changes to one working snapshot in place; a change that
/// fails must leave it as it was, or a bad import row would leave half of itself behind
/// for the rows after it (and in the published directory).
#[test]
fn a_change_that_fails_in_place_leaves_the_snapshot_unchanged() {
    let mut snapshot = Snapshot::empty(&["example.test".to_string()]);
    let (writes, _) = snapshot
        .apply_in_place(&mailbox("ann@example.test"))
        .unwrap();
    assert_eq!(writes.len(), 1);
    snapshot
        .apply_in_place(&list("team", &["ann@example.test"]))
        .unwrap();
    let before: Vec<Arc<Recipient>> = snapshot.recipients_by_alias();
    let site_before = snapshot.site().clone();
    let failing = [
        // The address is taken.
        mailbox("ann@example.test"),
        // The address is invalid, after a valid alias.
        Change::CreateRecipient(RecipientFields {
            kind: Some(RecipientKind::Mailbox),
            alias: Some("bob".into()),
            addresses: Some(vec!["not an address".into()]),
            ..Default::default()
        }),
        // A list member that does not exist.
        list("crew", &["ann@example.test", "nobody@example.test"]),
        Change::ModifyRecipient {
            alias: "nobody".into(),
            fields: RecipientFields::default(),
        },
        // A mailbox cannot become a list.
        Change::ModifyRecipient {
            alias: "ann".into(),
            fields: RecipientFields {
                kind: Some(RecipientKind::List),
                display_name: Some("Changed".into()),
                ..Default::default()
            },
        },
        Change::DeleteRecipient {
            alias: "nobody".into(),
        },
        Change::SetPassword {
            address: "team@example.test".into(),
            password_hash: "x".into(),
        },
        site(SiteChange::SetTemplate {
            address_type: "SMTP".into(),
            template: Some("%q@".into()),
        }),
    ];
    for change in &failing {
        assert!(
            snapshot.apply_in_place(change).is_err(),
            "{change:?} should fail"
        );
        let after = snapshot.recipients_by_alias();
        assert_eq!(after.len(), before.len(), "{change:?}");
        assert!(
            after.iter().zip(&before).all(|(a, b)| Arc::ptr_eq(a, b)),
            "{change:?} changed a recipient"
        );
        assert!(snapshot.by_address("bob@example.test").is_none());
        assert_eq!(
            snapshot
                .by_address("ann@example.test")
                .unwrap()
                .display_name,
            "X"
        );
        assert_eq!(*snapshot.site(), site_before, "{change:?}");
    }
}
