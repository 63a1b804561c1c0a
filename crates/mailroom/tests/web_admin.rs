//! The web admin in a real browser: Debian's headless Chromium driven through
//! chromedriver (WebDriver, with fantoccini). An administrator signs in, watches the
//! dashboard update, holds and releases a queued message, imports a CSV and watches it
//! to the end, tracks a message from receipt to its mailbox, and edits a recipient's
//! protocol settings; a wrong password, a form without its CSRF token and a foreign
//! Host header are refused.
//!
//! With `MAILROOM_SCREENSHOTS=DIR`, every page is also saved as a 1280x800 PNG there
//! (`docs/web-admin/screenshots.sh` does that for the documentation).

mod common;

use common::{TestServer, eventually, free_port};
use fantoccini::{Client, ClientBuilder, Locator};
use mailroom::ServerOptions;
use serde_json::{Value, json};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// chromedriver on a free port; killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    async fn start() -> Driver {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian: chromium-driver)");
        let up = eventually(Duration::from_secs(20), async || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await;
        assert!(up, "chromedriver did not start listening");
        Driver { child, port }
    }

    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--window-size=1280,800",
                    "--host-resolver-rules=MAP evil.test 127.0.0.1",
                    // The admin listener's HTTPS uses the server's self-signed certificate.
                    "--ignore-certificate-errors",
                ],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a Chromium session through chromedriver")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The page, and where screenshots go when asked for.
struct Page {
    client: Client,
    base: String,
    shots: Option<std::path::PathBuf>,
}

impl Page {
    async fn open(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
    }

    async fn text(&self, css: &str) -> String {
        let url = self.url().await;
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on {url}: {e}"))
            .text()
            .await
            .unwrap()
    }

    async fn body(&self) -> String {
        self.text("body").await
    }

    async fn url(&self) -> String {
        self.client
            .current_url()
            .await
            .map(|u| u.to_string())
            .unwrap_or_default()
    }

    async fn fill(&self, css: &str, value: &str) {
        let field = self.client.find(Locator::Css(css)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(value).await.unwrap();
    }

    async fn click(&self, css: &str) {
        let url = self.url().await;
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on {url}: {e}"))
            .click()
            .await
            .unwrap();
    }

    /// Waits (up to 20 s) until `css`'s text satisfies `ok`; returns the last text.
    async fn wait_text(&self, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        let done = eventually(Duration::from_secs(20), async || {
            last = match self.client.find(Locator::Css(css)).await {
                Ok(e) => e.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            ok(&last)
        })
        .await;
        assert!(done, "{css} never became right; last: {last:?}");
        last
    }

    async fn shot(&self, name: &str) {
        if let Some(dir) = &self.shots {
            let png = self.client.screenshot().await.unwrap();
            std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
        }
    }
}

async fn api(server: &TestServer, path: &str) -> Value {
    let client = server.client();
    let path = path.to_string();
    tokio::task::spawn_blocking(move || client.get::<Value>(&path).expect("API answers"))
        .await
        .unwrap()
}

/// A raw HTTP/1.1 request to the admin listener; returns the status code and body.
fn raw_http(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_runs_the_server_from_a_browser() {
    let server = TestServer::start_with(
        |c| {
            c.smtp.relay_networks = vec!["127.0.0.0/8".parse().unwrap()];
        },
        ServerOptions::default(),
    )
    .await;
    server
        .add_mailbox("boss@example.test", "boss password", json!({"admin": true}))
        .await;
    server
        .add_mailbox("alice@example.test", "alice password", json!({}))
        .await;
    let driver = Driver::start().await;
    let shots = std::env::var_os("MAILROOM_SCREENSHOTS").map(std::path::PathBuf::from);
    if let Some(dir) = &shots {
        std::fs::create_dir_all(dir).unwrap();
    }
    let admin = server.server.admin_addr;
    let page = Page {
        client: driver.browser().await,
        base: format!("http://{admin}"),
        shots,
    };

    // Screenshots are of a 1280x800 page: the window is that plus the browser's frame.
    let frame = page
        .client
        .execute(
            "return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight]",
            vec![],
        )
        .await
        .unwrap();
    let (dw, dh) = (
        frame[0].as_u64().unwrap_or(0),
        frame[1].as_u64().unwrap_or(0),
    );
    page.client
        .set_window_size(1280 + dw as u32, 800 + dh as u32)
        .await
        .unwrap();

    // Not signed in: every page leads to the sign-in form.
    page.open("/queues").await;
    assert!(
        page.url().await.contains("/login?next=/queues"),
        "{}",
        page.url().await
    );
    page.shot("login").await;

    // A wrong password is refused and says so; so is a mailbox that is no administrator.
    page.fill("#username", "boss@example.test").await;
    page.fill("#password", "not it").await;
    page.click("button[type=submit]").await;
    page.wait_text("#login-error", |t| t == "invalid user name or password")
        .await;
    page.fill("#username", "alice@example.test").await;
    page.fill("#password", "alice password").await;
    page.click("button[type=submit]").await;
    page.wait_text("#login-error", |t| t.contains("not an administrator"))
        .await;

    // Signed in, back where the administrator was going.
    page.fill("#username", "boss@example.test").await;
    page.fill("#password", "boss password").await;
    page.click("button[type=submit]").await;
    page.wait_text("h1", |t| t == "Queues").await;
    assert!(
        page.url().await.ends_with("/queues"),
        "{}",
        page.url().await
    );
    let (http_only, same_site, secure) = session_cookie(&page.client).await;
    assert!(http_only && same_site == "Some(Strict)" && !secure);

    // The dashboard updates by itself: the inbound count of accepted mail rises while
    // the page stays open.
    page.open("/").await;
    page.wait_text("#verdict", |t| t == "healthy").await;
    server
        .send_raw(
            "alice@example.test",
            b"Message-ID: <web-1@remote.test>\r\nSubject: seen from a browser\r\n\r\nhello\r\n",
        )
        .await;
    page.wait_text("#rate-accepted", |t| t.parse::<f64>().is_ok())
        .await;
    let pulses = eventually(Duration::from_secs(20), async || {
        let n = page
            .client
            .execute("return Number(document.body.dataset.pulses || 0)", vec![])
            .await
            .unwrap();
        n.as_u64().unwrap_or(0) >= 3
    })
    .await;
    assert!(pulses, "the dashboard did not receive its live updates");
    page.shot("dashboard").await;

    // Track the message from receipt to alice's mailbox.
    server.wait_for_messages("alice@example.test", 1).await;
    page.open("/track").await;
    page.fill("#message_id", "web-1@remote.test").await;
    page.click("form[role=search] button[type=submit]").await;
    page.wait_text("#messages tbody", |t| t.contains("bob@remote.test"))
        .await;
    page.shot("tracking-search").await;
    page.click("#messages tbody a").await;
    let timeline = page
        .wait_text("ol.timeline", |t| t.contains("delivered"))
        .await;
    for step in [
        "received",
        "converted",
        "delivered",
        "to mailbox alice@example.test (INBOX uid 1)",
    ] {
        assert!(timeline.contains(step), "missing {step:?} in:\n{timeline}");
    }
    page.shot("tracking-timeline").await;

    // Hold and release a queued message (delivery is off: it waits in the queue).
    {
        use lettre::{AsyncTransport, Message};
        let message = Message::builder()
            .from("alice@example.test".parse().unwrap())
            .to("far@remote.test".parse().unwrap())
            .subject("waiting")
            .body("for an administrator\n".to_string())
            .unwrap();
        lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(server.smtp().port())
            .build()
            .send(message)
            .await
            .expect("accepted");
    }
    let mut entry = 0;
    let queued = eventually(Duration::from_secs(20), async || {
        let items = api(&server, "/queue?queue=outbound").await;
        entry = items[0]["id"].as_i64().unwrap_or(0);
        entry > 0
    })
    .await;
    assert!(queued, "the message never reached the outbound queue");
    page.open("/queues?queue=outbound").await;
    page.click(&format!(
        "#entry-{entry} button[aria-label='Hold entry {entry}']"
    ))
    .await;
    page.wait_text(".note", |t| t.contains("held")).await;
    assert!(
        page.url().await.contains("queue=outbound"),
        "the filter is kept"
    );
    assert_eq!(
        page.text(&format!("#entry-{entry} .state strong")).await,
        "held"
    );
    assert_eq!(api(&server, &format!("/queue/{entry}")).await["held"], true);
    page.shot("queues").await;
    page.click(&format!(
        "#entry-{entry} button[aria-label='Release entry {entry}']"
    ))
    .await;
    page.wait_text(".note", |t| t.contains("released")).await;
    assert_eq!(
        api(&server, &format!("/queue/{entry}")).await["held"],
        false
    );
    // Both are on the message's trail, with who did them.
    let queue_id = api(&server, &format!("/queue/{entry}")).await["queue_id"]
        .as_str()
        .unwrap()
        .to_string();
    let trail = api(&server, &format!("/track?queue_id={queue_id}")).await;
    let admin_steps: Vec<(String, String)> = trail
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "admin")
        .map(|e| {
            (
                e["action"].as_str().unwrap().into(),
                e["by"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        admin_steps,
        [
            ("hold".to_string(), "web:boss@example.test".to_string()),
            ("release".to_string(), "web:boss@example.test".to_string())
        ]
    );

    // Import a CSV with one bad row and watch it to the end.
    let csv = tempfile::Builder::new().suffix(".csv").tempfile().unwrap();
    let mut rows = String::from("Obj-Class,Directory Name,Display Name,E-mail Addresses\n");
    for i in 0..300 {
        rows.push_str(&format!(
            "Mailbox,user{i},User {i},SMTP:user{i}@example.test\n"
        ));
    }
    rows.push_str("Mailbox,broken,Broken,SMTP:not an address\n");
    std::fs::write(csv.path(), rows).unwrap();
    page.open("/import").await;
    page.client
        .find(Locator::Css("#file"))
        .await
        .unwrap()
        .send_keys(csv.path().to_str().unwrap())
        .await
        .unwrap();
    page.click("form[enctype] button[type=submit]").await;
    let state = page
        .wait_text("#state", |t| ["done", "failed"].contains(&t))
        .await;
    assert_eq!(state, "done", "{}", page.body().await);
    let progress = page
        .client
        .execute(
            "const p = document.getElementById('progress'); return [p.value, p.max];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(progress, json!([301, 301]), "the bar is full at the end");
    let errors = page.text("#errors").await;
    assert!(
        errors.contains("line 302") && errors.contains("not an address"),
        "the failed line is named with its reason: {errors}"
    );
    assert!(page.text("#counts").await.contains("300 changed, 1 failed"));
    page.shot("import").await;
    assert_eq!(
        api(&server, "/recipients/user299@example.test").await["alias"],
        "user299"
    );

    // Edit a recipient's protocol settings: IMAP off for alice.
    page.open("/directory?q=alice").await;
    page.shot("directory").await;
    page.click("#recipients a[href='/directory/recipient/alice']")
        .await;
    page.client
        .find(Locator::Css("#protocol-imap"))
        .await
        .unwrap()
        .select_by_value("off")
        .await
        .unwrap();
    page.click("#save").await;
    page.wait_text(".note", |t| t == "Saved.").await;
    page.shot("recipient").await;
    let alice = api(&server, "/recipients/alice@example.test").await;
    assert_eq!(alice["protocols"], json!(["imap:off"]), "{alice:#}");

    // The other pages, for the record.
    page.open("/directory/site").await;
    page.shot("site").await;
    page.open("/routing?address=someone@elsewhere.example")
        .await;
    assert!(
        page.text("#route-answer")
            .await
            .contains("connector internet")
    );
    page.shot("routing").await;
    page.open("/status").await;
    page.shot("health").await;

    // A form without its CSRF token changes nothing.
    page.open("/queues?queue=outbound").await;
    page.client
        .execute(
            "document.querySelectorAll('input[name=csrf]').forEach(e => e.remove())",
            vec![],
        )
        .await
        .unwrap();
    page.click(&format!(
        "#entry-{entry} button[aria-label='Hold entry {entry}']"
    ))
    .await;
    page.wait_text("body", |t| t.contains("security token is missing"))
        .await;
    assert_eq!(
        api(&server, &format!("/queue/{entry}")).await["held"],
        false
    );
    // Nor does the same action sent as a multipart form (only the import's upload is
    // multipart, and it checks the token itself).
    page.open("/queues").await;
    let status = page
        .client
        .execute_async(
            &format!(
                "const done = arguments[0]; const form = new FormData(); \
                 form.append('back', '/queues?'); \
                 fetch('/queues/{entry}/hold', {{method: 'POST', body: form}}) \
                   .then(r => done(r.status));"
            ),
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(status, json!(403));
    assert_eq!(
        api(&server, &format!("/queue/{entry}")).await["held"],
        false
    );

    // A foreign Host header is refused, in the browser (evil.test resolves to the
    // server here) and by hand.
    page.client
        .goto(&format!("http://evil.test:{}/", admin.port()))
        .await
        .unwrap();
    page.wait_text("body", |t| t.contains("does not answer to the name"))
        .await;
    let (status, _) = tokio::task::spawn_blocking(move || {
        raw_http(
            admin,
            "GET /login HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n",
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 421);

    // Signing out ends the session.
    page.open("/").await;
    page.click("header form button").await;
    page.wait_text("h1", |t| t == "Sign in").await;
    page.open("/").await;
    assert!(page.url().await.contains("/login"), "{}", page.url().await);

    // Over HTTPS (the admin listener's TLS port) the session cookie is also Secure.
    let https = server
        .server
        .admin_tls_addr
        .expect("the admin listener serves HTTPS");
    page.client
        .goto(&format!("https://{https}/login"))
        .await
        .unwrap();
    page.fill("#username", "boss@example.test").await;
    page.fill("#password", "boss password").await;
    page.click("button[type=submit]").await;
    page.wait_text("h1", |t| t == "Dashboard").await;
    let (http_only, same_site, secure) = session_cookie(&page.client).await;
    assert!(http_only && same_site == "Some(Strict)" && secure);

    // The role is granted and taken away from the command line.
    server
        .cli(&["recipient", "role", "alice@example.test", "admin"])
        .await;
    assert_eq!(api(&server, "/recipients/alice").await["admin"], true);
    server
        .cli(&["recipient", "role", "alice@example.test", "user"])
        .await;
    assert_eq!(api(&server, "/recipients/alice").await["admin"], false);

    page.client.close().await.unwrap();
}

/// The session cookie's HttpOnly, SameSite and Secure attributes, as the browser holds
/// them.
async fn session_cookie(client: &Client) -> (bool, String, bool) {
    let cookies = client.get_all_cookies().await.unwrap();
    let cookie = cookies
        .iter()
        .find(|c| c.name() == "mailroom_session")
        .unwrap_or_else(|| panic!("no session cookie among {cookies:?}"));
    (
        cookie.http_only() == Some(true),
        format!("{:?}", cookie.same_site()),
        cookie.secure() == Some(true),
    )
}
