//! The directory seen over SMTP: site addressing changes, distribution lists, contacts
//! routed by the routing table; and the CLI that manages them.

mod common;

use common::{TestServer, eventually};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use mailroom::client::AdminClient;
use serde_json::{Value, json};
use std::process::Command;
use std::time::Duration;

fn lettre_to(server: &TestServer) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(server.smtp().port())
        .build()
}

async fn send(server: &TestServer, to: &[&str], subject: &str) {
    let mut builder = Message::builder()
        .from("sender@remote.test".parse().unwrap())
        .subject(subject);
    for address in to {
        builder = builder.to(address.parse().unwrap());
    }
    lettre_to(server)
        .send(builder.body("hello\n".to_string()).unwrap())
        .await
        .unwrap_or_else(|e| panic!("sending to {to:?}: {e}"));
}

async fn api<T: serde::de::DeserializeOwned + Send + 'static>(
    client: AdminClient,
    path: &str,
) -> T {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || client.get(&path).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_change_makes_the_new_address_deliverable_and_keeps_the_old() {
    let server = TestServer::start().await;
    server.cli(&["template", "set", "%g.%s@example.test"]).await;
    let out = server
        .cli(&[
            "recipient",
            "add",
            "--alias",
            "mclark",
            "--given",
            "Mark",
            "--surname",
            "Clark",
            "--name",
            "Mark Clark",
        ])
        .await;
    assert!(out.contains("created Mark.Clark@example.test"), "{out}");
    send(&server, &["Mark.Clark@example.test"], "before").await;
    // A namesake collides: a numeric suffix, and a note saying so.
    let out = server
        .cli(&[
            "recipient",
            "add",
            "--alias",
            "mclark2",
            "--given",
            "Mark",
            "--surname",
            "Clark",
        ])
        .await;
    assert!(out.contains("created Mark.Clark2@example.test"), "{out}");
    assert!(
        out.contains("note: mclark2: generated address taken, used Mark.Clark2@example.test"),
        "{out}"
    );

    // The new template: its domain becomes local, and every generated address moves.
    // postmaster@example.test is what a fresh server's template (%m@example.test)
    // generates, so it counts as generated too; the new template gives a recipient
    // without names nothing, so postmaster keeps its address and the job says why.
    let out = server.cli(&["template", "set", "%1g%s@corp.test"]).await;
    assert!(
        out.contains("done: scanned 3, updated 2, failed 1"),
        "{out}"
    );
    assert!(
        out.contains("postmaster: field addresses: the template %1g%s@corp.test gives no address"),
        "{out}"
    );
    let postmaster = server.cli(&["recipient", "show", "postmaster"]).await;
    assert!(
        postmaster.contains("postmaster@example.test"),
        "{postmaster}"
    );
    assert!(
        out.contains("generated address taken, used MClark2@corp.test"),
        "{out}"
    );
    let show = server.cli(&["recipient", "show", "mclark"]).await;
    assert!(
        show.contains("MClark@corp.test (primary, generated)"),
        "{show}"
    );
    assert!(show.contains("Mark.Clark@example.test"), "{show}");

    send(&server, &["MClark@corp.test"], "new address").await;
    send(&server, &["Mark.Clark@example.test"], "old address").await;
    let messages = server.wait_for_messages("mclark", 3).await;
    let subjects: Vec<_> = messages
        .iter()
        .filter_map(|m| m.subject.as_deref())
        .collect();
    assert_eq!(subjects, ["before", "new address", "old address"]);
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_to_a_nested_list_reaches_every_member_once() {
    let server = TestServer::start().await;
    server
        .add_recipients(&["ann@example.test", "bob@example.test", "cat@example.test"])
        .await;
    server
        .cli(&[
            "list",
            "add",
            "devs",
            "--address",
            "devs@example.test",
            "--member",
            "bob",
            "--member",
            "cat",
        ])
        .await;
    server
        .cli(&[
            "list",
            "add",
            "all",
            "--address",
            "all@example.test",
            "--member",
            "ann",
            "--member",
            "devs",
            "--member",
            "bob@example.test",
        ])
        .await;
    // A loop: devs also contains all.
    server
        .cli(&["list", "members", "devs", "bob", "cat", "all"])
        .await;
    // Addressed to the list, a nested list and a member directly: one copy each.
    send(
        &server,
        &["all@example.test", "devs@example.test", "bob@example.test"],
        "team news",
    )
    .await;
    for person in ["ann", "bob", "cat"] {
        let messages = server.wait_for_messages(person, 1).await;
        assert_eq!(messages.len(), 1, "{person}");
    }
    // Give conversion every chance to deliver a duplicate before asserting none.
    let drained = eventually(Duration::from_secs(10), async || {
        server.queues().await["queues"][0]["depth"] == 0
    })
    .await;
    assert!(drained);
    for person in ["ann", "bob", "cat"] {
        assert_eq!(
            server.mailbox(person).await.len(),
            1,
            "{person} got a duplicate"
        );
    }
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_to_a_contact_is_routed_into_the_outbound_queue_with_its_connector() {
    let server = TestServer::start().await;
    server.add_recipients(&["ann@example.test"]).await;
    server
        .cli(&[
            "connector",
            "add",
            "partner",
            "--smart-host",
            "127.0.0.1:2626",
            "--address-space",
            "SMTP:*@partner.example",
            "--cost",
            "1",
        ])
        .await;
    server
        .cli(&[
            "contact",
            "add",
            "pat",
            "--target-address",
            "pat@partner.example",
            "--address",
            "pat@example.test",
            "--name",
            "Pat Partner",
        ])
        .await;
    let table = server.cli(&["routing", "show"]).await;
    assert!(
        table.lines().nth(1).unwrap().contains("*@partner.example"),
        "{table}"
    );
    let diff = server.cli(&["routing", "diff"]).await;
    assert!(diff.starts_with("+ SMTP   *@partner.example"), "{diff}");

    send(
        &server,
        &["pat@example.test", "ann@example.test"],
        "for pat",
    )
    .await;
    server.wait_for_messages("ann", 1).await;
    let outbound = eventually(Duration::from_secs(10), async || {
        server.queues().await["queues"][1]["depth"] == 1
    })
    .await;
    assert!(outbound);
    let items: Vec<Value> = api(server.client(), "/queues/outbound/items").await;
    assert_eq!(items[0]["recipients"], json!(["pat@partner.example"]));
    assert_eq!(items[0]["connector"], "partner");
    let generation = items[0]["generation"].as_u64().unwrap();
    let site: Value = api(server.client(), "/site").await;
    assert!(generation >= 1 && generation <= site["generation"].as_u64().unwrap());
    let shown = server.cli(&["queue", "show", "outbound"]).await;
    assert!(shown.contains("via partner"), "{shown}");
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_settings_and_domains_through_the_cli() {
    let server = TestServer::start().await;
    server.add_recipients(&["ann@example.test"]).await;
    let check = |allowed: bool| {
        let server = &server;
        async move {
            let out = server.cli(&["protocol", "check", "ann", "imap"]).await;
            let expected = if allowed {
                "ann may use imap"
            } else {
                "ann may not use imap"
            };
            assert!(out.contains(expected), "{out}");
        }
    };
    check(true).await;
    server.cli(&["protocol", "site", "imap", "off"]).await;
    check(false).await;
    server.cli(&["protocol", "server", "imap", "on"]).await;
    check(true).await;
    server
        .cli(&["recipient", "modify", "ann", "--protocol", "imap:off"])
        .await;
    check(false).await;
    server.cli(&["protocol", "server", "site-defaults"]).await;
    let shown = server.cli(&["protocol", "show"]).await;
    assert!(
        shown.contains("imap=off") && shown.contains("site defaults"),
        "{shown}"
    );

    // A domain must be accepted before addresses in it; then mail for it is local.
    let dir = server.dir.path().to_str().unwrap().to_string();
    let refused = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .args(["recipient", "add", "zed@newco.test", "--data", &dir])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("newco.test is not an accepted domain"),
        "{err}"
    );
    server.cli(&["domain", "add", "newco.test"]).await;
    server.cli(&["recipient", "add", "zed@newco.test"]).await;
    send(&server, &["zed@newco.test"], "welcome").await;
    server.wait_for_messages("zed", 1).await;
    let domains = server.cli(&["domain", "list"]).await;
    assert!(
        domains.contains("newco.test") && domains.contains("example.test"),
        "{domains}"
    );
    server.server.shutdown().await;
}
