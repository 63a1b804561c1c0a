//! The pages: each handler reads what it shows from the same store and directory
//! calls the API uses, and changes things through the same writer; markup is maud.

use crate::session::{self, Session};
use crate::{Signed, WebState};
use axum::Extension;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use mailroom_directory::jobs::{ImportOptions, JobReport, start_import, start_regeneration};
use mailroom_directory::{
    Change, Protocol, Recipient, RecipientFields, RecipientKind, SiteChange, hash_password,
};
use mailroom_store::track::rfc3339;
use mailroom_store::{QueueFilter, QueueItemInfo, QueueName, TrackEvent, TrackQuery};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// Percent-encodes text for a URL's query or path segment.
pub fn query_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn segment(text: &str) -> String {
    query_escape(text).replace('/', "%2F")
}

const STYLE: &str = r#"
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1d2430;background:#f5f6f8}
header{background:#1f3a5f;color:#fff;padding:.5em 1em;display:flex;gap:1.2em;align-items:center;flex-wrap:wrap}
header a{color:#fff;text-decoration:none;padding:.2em .4em;border-radius:4px}
header a[aria-current=page]{background:#ffffff33}
header a:focus,button:focus,input:focus,select:focus,textarea:focus{outline:3px solid #f0b400;outline-offset:1px}
header .who{margin-left:auto;font-size:.9em}
header form{display:inline}
main{padding:1em 1.5em;max-width:1200px}
h1{font-size:1.4em;margin:.3em 0 .6em}
h2{font-size:1.1em;margin:1.2em 0 .4em}
table{border-collapse:collapse;background:#fff;width:100%;margin:.4em 0}
th,td{border:1px solid #d5d9e0;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#e9edf3}
td.num{text-align:right;font-variant-numeric:tabular-nums}
form.inline{display:inline}
fieldset{border:1px solid #cfd5de;background:#fff;margin:.6em 0;padding:.6em .9em}
label{display:inline-block;min-width:15em}
.row{margin:.35em 0}
input[type=text],input[type=password],input[type=search],select,textarea{font:inherit;padding:.2em .3em}
button{font:inherit;padding:.25em .8em;cursor:pointer}
.ok{color:#146c2e}.bad{color:#a4161a}.note{background:#fff7d6;border:1px solid #e6cf73;padding:.4em .7em}
.error{background:#fde2e1;border:1px solid #e3a3a0;padding:.4em .7em}
.cards{display:flex;gap:1em;flex-wrap:wrap}
.card{background:#fff;border:1px solid #d5d9e0;padding:.6em .9em;min-width:12em}
.card .big{font-size:1.6em;font-weight:600}
canvas{background:#fff;border:1px solid #d5d9e0}
ol.timeline{list-style:none;padding:0}
ol.timeline li{background:#fff;border-left:4px solid #1f3a5f;margin:.3em 0;padding:.3em .6em}
ol.timeline .kind{font-weight:600;display:inline-block;min-width:7em}
progress{width:30em;height:1.4em}
.filters{display:flex;flex-wrap:wrap;gap:.4em 1.2em;align-items:flex-end}
.filters label{display:block;min-width:0;font-size:.9em}
"#;

/// Which navigation entry a page belongs to.
#[derive(Clone, Copy, PartialEq)]
enum Nav {
    Dashboard,
    Queues,
    Track,
    Directory,
    Import,
    Routing,
    Status,
}

fn layout(session: &Session, nav: Nav, title: &str, body: Markup) -> Markup {
    let entries = [
        (Nav::Dashboard, "/", "Dashboard"),
        (Nav::Queues, "/queues", "Queues"),
        (Nav::Track, "/track", "Message tracking"),
        (Nav::Directory, "/directory", "Directory"),
        (Nav::Import, "/import", "Import"),
        (Nav::Routing, "/routing", "Routing"),
        (Nav::Status, "/status", "Health"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Mailroom" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    strong { "Mailroom" }
                    nav aria-label="Main" {
                        @for (entry, href, label) in entries {
                            @if entry == nav {
                                a href=(href) aria-current="page" { (label) }
                            } @else {
                                a href=(href) { (label) }
                            }
                        }
                    }
                    span.who {
                        "Signed in as " (session.user) " "
                        form.inline method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(session.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

fn csrf_field(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// The page's policy: scripts and everything else only from this server (the two small
/// scripts are served under `/assets`), styles inline, never inside another site's frame.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
    style-src 'unsafe-inline'; img-src 'self'; frame-ancestors 'none'; form-action 'self'; \
    base-uri 'none'";

fn html_response(status: StatusCode, markup: Markup) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "same-origin"),
        ],
        markup.into_string(),
    )
        .into_response()
}

/// `GET /assets/{name}`: the pages' scripts.
pub async fn asset(Path(name): Path<String>) -> Response {
    let body = match name.as_str() {
        "dashboard.js" => DASHBOARD_JS,
        "job.js" => JOB_JS,
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

fn page(session: &Session, nav: Nav, title: &str, body: Markup) -> Response {
    html_response(StatusCode::OK, layout(session, nav, title, body))
}

fn error_page(session: &Session, nav: Nav, status: StatusCode, message: &str) -> Response {
    html_response(
        status,
        layout(
            session,
            nav,
            "Not done",
            html! { p.error role="alert" { (message) } p { "Use the browser's Back button to return to the form, or go to the " a href="/" { "dashboard" } "." } },
        ),
    )
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> mailroom_store::Result<T> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn see_other(location: &str) -> Response {
    Redirect::to(location).into_response()
}

// ----- sign-in -----

#[derive(Deserialize, Default)]
pub struct NextQuery {
    #[serde(default)]
    next: String,
}

/// `GET /login`.
pub async fn login_form(
    State(state): State<Arc<WebState>>,
    Query(query): Query<NextQuery>,
) -> Response {
    login_page(&state, StatusCode::OK, None, "", &query.next)
}

/// The sign-in page, with an error when a try was refused; it sets a fresh CSRF cookie.
pub fn login_page(
    state: &WebState,
    status: StatusCode,
    error: Option<&str>,
    username: &str,
    next: &str,
) -> Response {
    let token = session::random_token();
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Sign in · Mailroom" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header { strong { "Mailroom" } }
                main {
                    h1 { "Sign in" }
                    @if let Some(error) = error {
                        p.error role="alert" id="login-error" { (error) }
                    }
                    form method="post" action="/login" {
                        input type="hidden" name="csrf" value=(token);
                        input type="hidden" name="next" value=(next);
                        div.row {
                            label for="username" { "Address or alias" }
                            input type="text" id="username" name="username" value=(username)
                                autocomplete="username" required autofocus;
                        }
                        div.row {
                            label for="password" { "Password" }
                            input type="password" id="password" name="password"
                                autocomplete="current-password" required;
                        }
                        button type="submit" { "Sign in" }
                    }
                    p { "Administrators are mailboxes with the administrator role; the postmaster has it from the first start." }
                }
            }
        }
    };
    let mut response = html_response(status, markup);
    if let Ok(value) = session::set_cookie(session::LOGIN_COOKIE, &token, state.tls, None).parse() {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

// ----- dashboard -----

/// What the dashboard shows and its events stream repeat.
#[derive(serde::Serialize)]
struct Pulse {
    at_ms: i64,
    healthy: bool,
    queues: Vec<(String, u64)>,
    accepted_total: f64,
    delivered_total: f64,
}

fn metric_total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn pulse(state: &WebState) -> Result<Pulse, String> {
    let store = state.admin.store.clone();
    let summaries = blocking(move || store.queue_summaries()).await?;
    let mut text = String::new();
    let _ = prometheus_text(state, &mut text);
    Ok(Pulse {
        at_ms: mailroom_watch::now_ms(),
        healthy: state.admin.watch.health().healthy,
        queues: summaries
            .iter()
            .map(|s| (s.queue.as_str().to_string(), s.depth))
            .collect(),
        accepted_total: metric_total(&text, "mailroom_messages_accepted_total"),
        delivered_total: metric_total(&text, "mailroom_messages_delivered_total"),
    })
}

fn prometheus_text(state: &WebState, text: &mut String) -> std::fmt::Result {
    prometheus_client::encoding::text::encode(text, &state.admin.registry)
}

const DASHBOARD_JS: &str = r#"
(function(){
  if (!window.EventSource) return;
  // One minute of samples per series, drawn as lines on a canvas.
  function chart(id, names, colors){
    const canvas = document.getElementById(id);
    if (!canvas) return null;
    const ctx = canvas.getContext('2d');
    const series = {};
    for (const n of names) series[n] = [];
    return {
      push(name, v){ const s = series[name]; s.push(v); if (s.length > 30) s.shift(); },
      draw(unit){
        ctx.clearRect(0,0,canvas.width,canvas.height);
        let max = 1;
        for (const n of names) for (const v of series[n]) max = Math.max(max, v);
        names.forEach((n, k) => {
          const s = series[n];
          ctx.strokeStyle = colors[k]; ctx.lineWidth = 2; ctx.beginPath();
          s.forEach((v,i)=>{
            const x = canvas.width - 4 - (s.length-1-i)*((canvas.width-8)/29);
            const y = canvas.height - 4 - v/max*(canvas.height-22);
            if (i===0) ctx.moveTo(x,y); else ctx.lineTo(x,y);
          });
          ctx.stroke();
          ctx.fillStyle = colors[k]; ctx.fillText(n, 8 + k*90, canvas.height - 8);
        });
        ctx.fillStyle='#1d2430'; ctx.fillText('max ' + (Number.isInteger(max) ? max : max.toFixed(1)) + ' ' + unit, 6, 12);
      }
    };
  }
  const rates = chart('rates', ['accepted','delivered'], ['#1f3a5f','#2a9d3a']);
  const depths = chart('depths', ['inbound','outbound','quarantine','undeliverable'], ['#1f3a5f','#b5651d','#a4161a','#6c757d']);
  let last = null;
  const source = new EventSource('/events/dashboard');
  source.onmessage = function(e){
    const p = JSON.parse(e.data);
    for (const [queue, depth] of p.queues) {
      const cell = document.getElementById('depth-'+queue);
      if (cell) cell.textContent = depth;
      if (depths) depths.push(queue, depth);
    }
    if (depths) depths.draw('messages');
    const verdict = document.getElementById('verdict');
    if (verdict) { verdict.textContent = p.healthy ? 'healthy' : 'UNHEALTHY'; verdict.className = p.healthy ? 'big ok' : 'big bad'; }
    if (last) {
      const secs = Math.max(0.001, (p.at_ms - last.at_ms)/1000);
      const accepted = (p.accepted_total - last.accepted_total)/secs;
      const delivered = (p.delivered_total - last.delivered_total)/secs;
      document.getElementById('rate-accepted').textContent = accepted.toFixed(1);
      document.getElementById('rate-delivered').textContent = delivered.toFixed(1);
      if (rates) { rates.push('accepted', accepted); rates.push('delivered', delivered); rates.draw('msg/s'); }
    }
    last = p;
    document.body.dataset.pulses = String(Number(document.body.dataset.pulses||0)+1);
  };
})();
"#;

/// `GET /`: queue depths and message rates (live), the watchdog's verdict, recent errors.
pub async fn dashboard(State(state): State<Arc<WebState>>, Extension(session): Signed) -> Response {
    let pulse = match pulse(&state).await {
        Ok(pulse) => pulse,
        Err(e) => {
            return error_page(
                &session,
                Nav::Dashboard,
                StatusCode::SERVICE_UNAVAILABLE,
                &e,
            );
        }
    };
    let health = state.admin.watch.health();
    let store = state.admin.store.clone();
    let problems = blocking(move || {
        store.queue_filter(
            &QueueFilter {
                state: Some("deferred".into()),
                limit: Some(10),
                ..QueueFilter::default()
            },
            mailroom_watch::now_ms(),
        )
    })
    .await
    .unwrap_or_default();
    let store = state.admin.store.clone();
    let quarantined = blocking(move || store.queue_items(Some(QueueName::Quarantine), None, 10))
        .await
        .unwrap_or_default();
    let recent = state.recent.lines();
    let body = html! {
        div.cards {
            div.card { div { "Watchdog" } div #verdict class=(if health.healthy { "big ok" } else { "big bad" }) { (if health.healthy { "healthy" } else { "UNHEALTHY" }) } }
            div.card { div { "Accepted, msg/s" } div.big #rate-accepted { "…" } }
            div.card { div { "Delivered here, msg/s" } div.big #rate-delivered { "…" } }
            @for (queue, depth) in &pulse.queues {
                div.card { div { "Queue " (queue) } div.big id={"depth-" (queue)} { (depth) } }
            }
        }
        div.cards {
            div {
                h2 { "Message rates, last minute" }
                canvas #rates width="560" height="170" role="img" aria-label="Messages accepted (blue) and delivered here (green) per second over the last minute" {}
            }
            div {
                h2 { "Queue depths, last minute" }
                canvas #depths width="560" height="170" role="img" aria-label="Depth of the inbound, outbound, quarantine and undeliverable queues over the last minute" {}
            }
        }
        p { small { "Updated every two seconds while this page is open (server-sent events). Without JavaScript, reload the page." } }
        @if !health.stalled.is_empty() || !health.blocked.is_empty() || !health.conditions.is_empty() {
            h2 { "What the watchdog reports" }
            ul {
                @for s in &health.stalled { li.bad { "Queue " (s.queue) " stalled: " (s.depth) " waiting, no progress for " (format!("{:.0}", s.no_progress_seconds)) " s" } }
                @for b in &health.blocked { li.bad { (b.what) " blocked for " (format!("{:.0}", b.seconds)) " s" @if let Some(d) = &b.doing { ": " (d) } } }
                @for c in &health.conditions { li.bad { (c.condition) ": " (c.detail) } }
            }
        }
        h2 { "Recent errors and warnings" }
        @if recent.is_empty() && problems.is_empty() && quarantined.is_empty() {
            p.ok { "None." }
        } @else {
            table {
                thead { tr { th scope="col" { "When" } th scope="col" { "What" } } }
                tbody {
                    @for line in recent.iter().rev().take(20) {
                        tr { td { (rfc3339(line.at_ms)) } td { (line.level) " " (line.target) ": " (line.message) } }
                    }
                    @for item in &quarantined {
                        tr { td { (rfc3339(item.received_at_ms)) } td { "Quarantined " a href={"/track/" (segment(&item.queue_id))} { (item.queue_id) } ": " (item.last_error.as_deref().unwrap_or("")) } }
                    }
                    @for item in &problems {
                        tr { td { (rfc3339(item.received_at_ms)) } td { "Deferred " a href={"/track/" (segment(&item.queue_id))} { (item.queue_id) } " to " (item.recipients.join(", ")) ": " (item.last_error.as_deref().unwrap_or("")) } }
                    }
                }
            }
        }
        script src="/assets/dashboard.js" {}
    };
    page(&session, Nav::Dashboard, "Dashboard", body)
}

/// `GET /events/dashboard`: a pulse every two seconds.
pub async fn dashboard_events(
    State(state): State<Arc<WebState>>,
    Extension(_session): Signed,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let stream = futures_util::stream::unfold((state, true), |(state, first)| async move {
        if !first {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let data = match pulse(&state).await {
            Ok(pulse) => serde_json::to_string(&pulse).unwrap_or_default(),
            Err(e) => serde_json::json!({"error": e}).to_string(),
        };
        Some((Ok(Event::default().data(data)), (state, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

// ----- queues -----

#[derive(Deserialize, Default)]
pub struct QueueQuery {
    #[serde(default)]
    queue: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    sender: String,
    #[serde(default)]
    recipient: String,
    #[serde(default)]
    destination: String,
    #[serde(default)]
    done: String,
}

fn non_empty(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// `GET /queues`: filter, hold, release, retry, delete with or without a DSN.
pub async fn queues(
    State(state): State<Arc<WebState>>,
    Extension(session): Signed,
    Query(query): Query<QueueQuery>,
) -> Response {
    let filter = QueueFilter {
        queue: QueueName::parse(&query.queue),
        state: non_empty(&query.state),
        sender: non_empty(&query.sender),
        recipient: non_empty(&query.recipient),
        destination: non_empty(&query.destination),
        limit: Some(500),
        ..QueueFilter::default()
    };
    let store = state.admin.store.clone();
    let now = state.admin.outbound.clock().now_ms();
    let items = match blocking(move || store.queue_filter(&filter, now)).await {
        Ok(items) => items,
        Err(e) => return error_page(&session, Nav::Queues, StatusCode::SERVICE_UNAVAILABLE, &e),
    };
    let store = state.admin.store.clone();
    let summaries = blocking(move || store.queue_summaries())
        .await
        .unwrap_or_default();
    let select = |name: &str, value: &str, options: &[&str]| {
        html! {
            select id=(name) name=(name) {
                @for option in options {
                    @if *option == value { option value=(option) selected { (if option.is_empty() { "any" } else { option }) } }
                    @else { option value=(option) { (if option.is_empty() { "any" } else { option }) } }
                }
            }
        }
    };
    let back = format!(
        "/queues?queue={}&state={}&sender={}&recipient={}&destination={}",
        query_escape(&query.queue),
        query_escape(&query.state),
        query_escape(&query.sender),
        query_escape(&query.recipient),
        query_escape(&query.destination)
    );
    let body = html! {
        @if !query.done.is_empty() { p.note role="status" { (query.done) } }
        form method="get" action="/queues" role="search" {
            fieldset.filters {
                legend { "Filter" }
                div { label for="queue" { "Queue" } (select("queue", &query.queue, &["", "inbound", "outbound", "quarantine", "undeliverable"])) }
                div { label for="state" { "State" } (select("state", &query.state, &["", "held", "deferred", "active"])) }
                div { label for="sender" { "Sender contains" } input type="search" id="sender" name="sender" value=(query.sender); }
                div { label for="recipient" { "Recipient contains" } input type="search" id="recipient" name="recipient" value=(query.recipient); }
                div { label for="destination" { "Connector or domain" } input type="search" id="destination" name="destination" value=(query.destination); }
                div { button type="submit" { "Filter" } }
            }
        }
        p { (items.len()) " entr" (if items.len() == 1 { "y" } else { "ies" }) }
        table #entries {
            thead { tr { th scope="col" { "Entry" } th scope="col" { "Queue" } th scope="col" { "From" } th scope="col" { "To" } th scope="col" { "Attempts" } th scope="col" { "State" } th scope="col" { "Actions" } } }
            tbody {
                @for item in &items { (queue_row(&session, item, &back)) }
            }
        }
        h2 { "All queues" }
        table {
            thead { tr { th scope="col" { "Queue" } th scope="col" { "Depth" } th scope="col" { "Bytes" } th scope="col" { "Oldest" } } }
            tbody { @for s in &summaries { tr { td { (s.queue.as_str()) } td.num { (s.depth) } td.num { (s.bytes) } td { (s.oldest_received_at_ms.map(rfc3339).unwrap_or_default()) } } } }
        }
    };
    page(&session, Nav::Queues, "Queues", body)
}

fn queue_row(session: &Session, item: &QueueItemInfo, back: &str) -> Markup {
    let action = |name: &str, label: &str| {
        html! {
            form.inline method="post" action={"/queues/" (item.id) "/" (name)} {
                (csrf_field(session))
                input type="hidden" name="back" value=(back);
                button type="submit" aria-label={(label) " entry " (item.id)} { (label) }
            }
        }
    };
    html! {
        tr id={"entry-" (item.id)} {
            td { a href={"/track/" (segment(&item.queue_id))} { (item.id) } }
            td { (item.queue.as_str()) }
            td { (item.mail_from) }
            td { (item.recipients.join(", ")) }
            td.num { (item.attempts) }
            td.state {
                @if item.held { strong { "held" } } @else { "waiting" }
                @if let Some(e) = &item.last_error { br; small { (e) } }
            }
            td {
                @if item.held { (action("release", "Release")) } @else { (action("hold", "Hold")) }
                " " (action("retry", "Retry now")) " " (action("delete", "Delete")) " " (action("delete-dsn", "Delete and notify sender"))
            }
        }
    }
}

/// `POST /queues/{id}/{action}`.
pub async fn queue_action(
    State(state): State<Arc<WebState>>,
    Extension(session): Signed,
    Path((id, action)): Path<(i64, String)>,
    body: axum::body::Bytes,
) -> Response {
    // Back to the list as it was filtered (only ever a /queues page).
    let back = session::form_field(&body, "back")
        .filter(|b| {
            b.starts_with("/queues?") && !b.contains("//") && !b.chars().any(char::is_control)
        })
        .unwrap_or_else(|| "/queues?".to_string());
    let by = format!("web:{}", session.user);
    let store = state.admin.store.clone();
    let now = state.admin.outbound.clock().now_ms();
    let outcome: Result<Result<String, mailroom_store::QueueActionError>, String> = match action
        .as_str()
    {
        "hold" | "release" => {
            let held = action == "hold";
            blocking(move || store.set_held(id, held, &by))
                .await
                .map(|r| {
                    r.map(|()| format!("Entry {id} {}.", if held { "held" } else { "released" }))
                })
        }
        "retry" => blocking(move || store.retry_now(id, now, &by))
            .await
            .map(|r| r.map(|()| format!("Entry {id} is due now."))),
        "delete" | "delete-dsn" => {
            let notify = action == "delete-dsn";
            match blocking(move || store.claim_one(id)).await {
                Ok(Ok(item)) => {
                    let handle = state.admin.outbound.clone();
                    match tokio::task::spawn_blocking(move || handle.delete(item, notify, &by))
                        .await
                    {
                        Ok(Ok(notices)) => Ok(Ok(format!(
                            "Entry {id} deleted{}.",
                            if notices > 0 {
                                "; the sender was notified"
                            } else {
                                ""
                            }
                        ))),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                }
                Ok(Err(e)) => Ok(Err(e)),
                Err(e) => Err(e),
            }
        }
        _ => {
            return error_page(
                &session,
                Nav::Queues,
                StatusCode::NOT_FOUND,
                "no such action",
            );
        }
    };
    match outcome {
        Ok(Ok(done)) => {
            if action == "release" || action == "retry" {
                state.admin.outbound.wake();
            }
            see_other(&format!("{back}&done={}", query_escape(&done)))
        }
        Ok(Err(mailroom_store::QueueActionError::NotFound)) => error_page(
            &session,
            Nav::Queues,
            StatusCode::NOT_FOUND,
            &format!("There is no queue entry {id} (any more)."),
        ),
        Ok(Err(mailroom_store::QueueActionError::Busy)) => error_page(
            &session,
            Nav::Queues,
            StatusCode::CONFLICT,
            &format!("Entry {id} is being delivered right now; try again in a moment."),
        ),
        Err(e) => error_page(&session, Nav::Queues, StatusCode::SERVICE_UNAVAILABLE, &e),
    }
}

// ----- message tracking -----

#[derive(Deserialize, Default)]
pub struct TrackForm {
    #[serde(default)]
    message_id: String,
    #[serde(default)]
    sender: String,
    #[serde(default)]
    recipient: String,
    #[serde(default)]
    since_hours: String,
}

fn timeline(events: &[&TrackEvent]) -> Markup {
    html! {
        ol.timeline {
            @for e in events {
                li class={"event " (e.event.as_str())} {
                    time datetime=(rfc3339(e.at_ms)) { (rfc3339(e.at_ms)) } " "
                    span.kind { (e.event.as_str()) }
                    (e.summary())
                }
            }
        }
    }
}

/// `GET /track`: search by Message-ID, sender, recipient, time.
pub async fn track(
    State(state): State<Arc<WebState>>,
    Extension(session): Signed,
    Query(form): Query<TrackForm>,
) -> Response {
    let searched = !(form.message_id.is_empty()
        && form.sender.is_empty()
        && form.recipient.is_empty()
        && form.since_hours.is_empty());
    let query = TrackQuery {
        message_id: non_empty(&form.message_id),
        sender: non_empty(&form.sender),
        recipient: non_empty(&form.recipient),
        since_ms: form
            .since_hours
            .trim()
            .parse::<f64>()
            .ok()
            .map(|h| mailroom_watch::now_ms() - (h * 3_600_000.0) as i64),
        limit: Some(100),
        ..TrackQuery::default()
    };
    let store = state.admin.store.clone();
    let events = match blocking(move || store.track(&query)).await {
        Ok(events) => events,
        Err(e) => return error_page(&session, Nav::Track, StatusCode::SERVICE_UNAVAILABLE, &e),
    };
    let mut messages: Vec<(&str, Vec<&TrackEvent>)> = Vec::new();
    for e in &events {
        match messages.last_mut() {
            Some((id, list)) if *id == e.queue_id => list.push(e),
            _ => messages.push((&e.queue_id, vec![e])),
        }
    }
    let body = html! {
        form method="get" action="/track" role="search" {
            fieldset {
                legend { "Find messages" }
                div.row { label for="message_id" { "Message-ID" } input type="search" id="message_id" name="message_id" value=(form.message_id) size="40"; }
                div.row { label for="sender" { "Sender contains" } input type="search" id="sender" name="sender" value=(form.sender); }
                div.row { label for="recipient" { "Recipient contains" } input type="search" id="recipient" name="recipient" value=(form.recipient); }
                div.row { label for="since_hours" { "In the last hours" } input type="text" inputmode="decimal" id="since_hours" name="since_hours" value=(form.since_hours) size="5"; }
                button type="submit" { "Search" }
            }
        }
        @if searched || !messages.is_empty() {
            p { (messages.len()) " message(s), newest first" }
            table #messages {
                thead { tr { th scope="col" { "Message" } th scope="col" { "From" } th scope="col" { "Message-ID" } th scope="col" { "Received" } th scope="col" { "Last step" } } }
                tbody {
                    @for (queue_id, trail) in &messages {
                        @let first = trail[0];
                        @let last = trail[trail.len() - 1];
                        tr {
                            td { a href={"/track/" (segment(queue_id))} { (queue_id) } }
                            td { (first.sender.as_deref().unwrap_or("")) }
                            td { (first.message_id.as_deref().unwrap_or("")) }
                            td { (rfc3339(first.at_ms)) }
                            td { (last.event.as_str()) ": " (last.summary()) }
                        }
                    }
                }
            }
        }
    };
    page(&session, Nav::Track, "Message tracking", body)
}

/// `GET /track/{queue_id}`: one message's timeline.
pub async fn track_one(
    State(state): State<Arc<WebState>>,
    Extension(session): Signed,
    Path(queue_id): Path<String>,
) -> Response {
    let query = TrackQuery {
        queue_id: Some(queue_id.clone()),
        ..TrackQuery::default()
    };
    let store = state.admin.store.clone();
    let events = match blocking(move || store.track(&query)).await {
        Ok(events) => events,
        Err(e) => return error_page(&session, Nav::Track, StatusCode::SERVICE_UNAVAILABLE, &e),
    };
    if events.is_empty() {
        return error_page(
            &session,
            Nav::Track,
            StatusCode::NOT_FOUND,
            &format!("No trail for {queue_id} (never seen, or older than the retention)."),
        );
    }
    let first = &events[0];
    let all: Vec<&TrackEvent> = events.iter().collect();
    let notices: Vec<&str> = events.iter().filter_map(|e| e.text("notice")).collect();
    let body = html! {
        dl {
            dt { "Message-ID" } dd { (first.message_id.as_deref().unwrap_or("(none)")) }
            dt { "Envelope sender" } dd { "<" (first.sender.as_deref().unwrap_or("")) ">" }
        }
        (timeline(&all))
        @if !notices.is_empty() {
            p { "Messages this one caused: " @for n in notices { a href={"/track/" (segment(n))} { (n) } " " } }
        }
        details {
            summary { "As JSON" }
            pre { (serde_json::to_string_pretty(&events).unwrap_or_default()) }
        }
    };
    page(&session, Nav::Track, &format!("Message {queue_id}"), body)
}

// ----- directory -----

#[derive(Deserialize, Default)]
pub struct SearchQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    done: String,
}

/// `GET /directory`: search recipients.
pub async fn directory(
    State(state): State<Arc<WebState>>,
    Extension(session): Signed,
    Query(query): Query<SearchQuery>,
) -> Response {
    let snapshot = state.admin.directory.snapshot();
    let needle = query.q.trim().to_lowercase();
    // Sorting and searching every recipient grows with the directory (hundreds of
    // thousands after an import): on the blocking pool, not the admin runtime's thread.
    let searched = snapshot.clone();
    let found: Vec<Arc<Recipient>> = tokio::task::spawn_blocking(move || {
        searched
            .recipients_by_alias()
            .into_iter()
            .filter(|r| {
                needle.is_empty()
                    || r.alias.to_lowercase().contains(&needle)
                    || r.display_name.to_lowercase().contains(&needle)
                    || r.addresses
                        .iter()
                        .any(|a| a.address.to_lowercase().contains(&needle))
            })
            .take(200)
            .collect()
    })
    .await
    .unwrap_or_default();
    let body = html! {
        @if !query.done.is_empty() { p.note role="status" { (query.done) } }
        p { a href="/directory/new" { "New mailbox, contact or list" } " · " a href="/directory/site" { "Site: protocols and addressing" } }
        form method="get" action="/directory" role="search" {
            label for="q" { "Search recipients" }
            input type="search" id="q" name="q" value=(query.q);
            button type="submit" { "Search" }
        }
        p { (snapshot.len()) " recipients; showing " (found.len()) }
        table #recipients {
            thead { tr { th scope="col" { "Alias" } th scope="col" { "Kind" } th scope="col" { "Name" } th scope="col" { "Primary address" } } }
            tbody {
                @for r in &found {
                    tr {
                        td { a href={"/directory/recipient/" (segment(&r.alias))} { (r.alias) } }
                        td { (kind_name(r.kind)) @if r.admin { " (administrator)" } }
                        td { (r.display_name) }
                        td { (r.primary_address().unwrap_or("")) }
                    }
                }
            }
        }
    };
    page(&session, Nav::Directory, "Directory", body)
}

fn kind_name(kind: RecipientKind) -> &'static str {
    match kind {
        RecipientKind::Mailbox => "mailbox",
        RecipientKind::Contact => "contact",
        RecipientKind::List => "list",
    }
}

fn text_row(id: &str, label: &str, value: &str) -> Markup {
    html! { div.row { label for=(id) { (label) } input type="text" id=(id) name=(id) value=(value) size="40"; } }
}

/// `GET /directory/new`.
pub async fn new_recipient(Extension(session): Signed) -> Response {
    let body = html! {
        form method="post" action="/directory/new" {
            (csrf_field(&session))
            fieldset {
                legend { "New recipient" }
                div.row {
                    label for="kind" { "Kind" }
                    select id="kind" name="kind" { option value="mailbox" { "mailbox" } option value="contact" { "contact" } option value="list" { "list" } }
                }
                (text_row("alias", "Alias", ""))
                (text_row("address", "Primary address (empty: site addressing)", ""))
                (text_row("display_name", "Display name", ""))
                (text_row("given_name", "Given name", ""))
                (text_row("surname", "Surname", ""))
                (text_row("target_address", "Contact's external address", ""))
                (text_row("members", "List members (aliases or addresses, comma-separated)", ""))
                div.row { label for="password" { "Password (mailboxes)" } input type="password" id="password" name="password" autocomplete="new-password"; }
                button type="submit" { "Create" }
            }
        }
    };
    page(&session, Nav::Directory, "New recipient", body)
}

fn form_map(body: &[u8]) -> HashMap<String, Vec<String>> {
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    if let Ok(text) = std::str::from_utf8(body) {
        for pair in text.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            map.entry(session::decode(k))
                .or_default()
                .push(session::decode(v));
        }
    }
    map
}

fn one(map: &HashMap<String, Vec<String>>, key: &str) -> Option<String> {
    map.get(key)
        .and_then(|v| v.first())
        .map(|v| v.trim().to_string())
}

fn list(text: &str, separators: &[char]) -> Vec<String> {
    text.split(separators)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

async fn password_hash(password: Option<String>) -> Option<String> {
    let password = password.filter(|p| !p.is_empty())?;
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .ok()
}

/// `POST /directory/new`.
pub async fn create_recipient(
    State(state): State<Arc<WebState>>,
    Extension(session): Signed,
    body: axum::body::Bytes,
) -> Response {
    let form = form_map(&body);
    let kind = match one(&form, "kind").as_deref() {
        Some("contact") => RecipientKind::Contact,
        Some("list") => RecipientKind::List,
        _ => RecipientKind::Mailbox,
    };
    let fields = RecipientFields {
        kind: Some(kind),
        alias: one(&form, "alias").filter(|a| !a.is_empty()),
        display_name: one(&form, "display_name"),
        given_name: one(&form, "given_name"),
        surname: one(&form, "surname"),
        addresses: one(&form, "address")
            .filter(|a| !a.is_empty())
            .map(|a| vec![format!("SMTP:{a}")]),
        target_address: one(&form, "target_address").filter(|a| !a.is_empty()),
        members: (kind == RecipientKind::List).then(|| {
            list(
                &one(&form, "members").unwrap_or_default(),
                &[',', ';', '\n'],
            )
        }),
        password_hash: password_hash(one(&form, "password")).await,
        ..RecipientFields::default()
    };
    match state
        .admin
        .directory
        .apply(Change::CreateRecipient(fields))
        .await
    {
        Ok(applied) => {
            let alias = applied
                .recipient
                .as_ref()
                .map(|r| r.alias.clone())
                .unwrap_or_default();
            see_other(&format!(
                "/directory/recipient/{}?done=Created.",
                segment(&alias)
            ))
        }
        Err(e) => error_page(
            &session,
            Nav::Directory,
            StatusCode::UNPROCESSABLE_ENTITY,
            &e.to_string(),
        ),
    }
}

/// `GET /directory/recipient/{alias}`: edit a recipient, its protocol settings and role.
pub async fn recipient(
    State(state): State<Arc<WebState>>,
    Extension(session): Signed,
    Path(alias): Path<String>,
    Query(query): Query<SearchQuery>,
) -> Response {
    let snapshot = state.admin.directory.snapshot();
    let Some(r) = snapshot.find(&alias).cloned() else {
        return error_page(
            &session,
            Nav::Directory,
            StatusCode::NOT_FOUND,
            &format!("No recipient {alias}."),
        );
    };
    let view = mailroom_admin::view(&snapshot, &r);
    let addresses: Vec<String> = r
        .addresses
        .iter()
        .map(|a| format!("{}:{}", if a.primary { "SMTP" } else { "smtp" }, a.address))
        .collect();
    let protocol_row = |p: Protocol| {
        let current = r.protocols.get(p);
        let id = format!("protocol-{}", p.name());
        let choices = [("default", None), ("on", Some(true)), ("off", Some(false))];
        let effective = snapshot.may_use(r.id, p);
        html! {
            div.row {
                label for=(id) { (protocol_label(p)) }
                select id=(id) name=(id) {
                    @for (name, value) in choices {
                        @if value == current { option value=(name) selected { (name) } } @else { option value=(name) { (name) } }
                    }
                }
                " " small { "now " (if effective { "allowed" } else { "not allowed" }) }
            }
        }
    };
    let kb = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    let body = html! {
        @if !query.done.is_empty() { p.note role="status" { (query.done) } }
        form method="post" action={"/directory/recipient/" (segment(&r.alias))} {
            (csrf_field(&session))
            input type="hidden" name="action" value="save";
            fieldset {
                legend { (kind_name(r.kind)) " " (r.alias) }
                (text_row("display_name", "Display name", &r.display_name))
                (text_row("given_name", "Given name", &r.given_name))
                (text_row("surname", "Surname", &r.surname))
                (text_row("initials", "Initials", &r.initials))
                div.row {
                    label for="addresses" { "Addresses, one per line" }
                    textarea id="addresses" name="addresses" rows="3" cols="50" aria-describedby="addresses-hint" { (addresses.join("\n")) }
                    " " small #addresses-hint { "SMTP: marks the primary, smtp: the others" }
                }
                @if r.kind == RecipientKind::Contact {
                    (text_row("target_address", "External address", r.target_address.as_deref().unwrap_or("")))
                }
                @if r.kind == RecipientKind::List {
                    (text_row("members", "Members (comma-separated)", &view.members.join(", ")))
                }
                div.row {
                    label for="hidden" { "Hidden from the address book" }
                    @if r.hidden { input type="checkbox" id="hidden" name="hidden" value="yes" checked; } @else { input type="checkbox" id="hidden" name="hidden" value="yes"; }
                }
            }
            @if r.kind == RecipientKind::Mailbox {
                fieldset {
                    legend { "Protocol settings" }
                    p { small { "default follows the server's settings (Directory → Site)." } }
                    @for p in Protocol::ALL { (protocol_row(p)) }
                }
                fieldset {
                    legend { "Quota (KB, empty or 0: none)" }
                    (text_row("quota_warning_kb", "Warning at", &kb(r.quota.warning_kb)))
                    (text_row("quota_prohibit_send_kb", "Prohibit send at", &kb(r.quota.prohibit_send_kb)))
                    (text_row("quota_prohibit_send_receive_kb", "Prohibit send and receive at", &kb(r.quota.prohibit_send_receive_kb)))
                }
                fieldset {
                    legend { "Sign-in" }
                    div.row {
                        label for="admin" { "Administrator (web admin)" }
                        @if r.admin { input type="checkbox" id="admin" name="admin" value="yes" checked; } @else { input type="checkbox" id="admin" name="admin" value="yes"; }
                    }
                    div.row { label for="password" { "New password (empty: unchanged)" } input type="password" id="password" name="password" autocomplete="new-password"; }
                }
            }
            button type="submit" id="save" { "Save" }
        }
        form method="post" action={"/directory/recipient/" (segment(&r.alias))} {
            (csrf_field(&session))
            input type="hidden" name="action" value="delete";
            button type="submit" { "Delete " (r.alias) }
            " " small { "A mailbox's mail is deleted with it." }
        }
    };
    page(
        &session,
        Nav::Directory,
        &format!("Recipient {}", r.alias),
        body,
    )
}

fn protocol_label(p: Protocol) -> &'static str {
    match p {
        Protocol::SmtpSubmission => "SMTP submission",
        Protocol::Imap => "IMAP",
        Protocol::Pop3 => "POP3",
    }
}

/// `POST /directory/recipient/{alias}`: save or delete.
pub async fn save_recipient(
    State(state): State<Arc<WebState>>,
    Extension(session): Signed,
    Path(alias): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let form = form_map(&body);
    let snapshot = state.admin.directory.snapshot();
    let Some(r) = snapshot.find(&alias).cloned() else {
        return error_page(
            &session,
            Nav::Directory,
            StatusCode::NOT_FOUND,
            &format!("No recipient {alias}."),
        );
    };
    if one(&form, "action").as_deref() == Some("delete") {
        return match state
            .admin
            .directory
            .apply(Change::DeleteRecipient {
                alias: r.alias.clone(),
            })
            .await
        {
            Ok(_) => see_other(&format!(
                "/directory?done={}",
                query_escape(&format!("Deleted {}.", r.alias))
            )),
            Err(e) => error_page(
                &session,
                Nav::Directory,
                StatusCode::UNPROCESSABLE_ENTITY,
                &e.to_string(),
            ),
        };
    }
    let number = |key: &str| -> Result<Option<u64>, String> {
        match one(&form, key) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(Some(0)),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| format!("{key}: {v:?} is not a whole number of KB")),
        }
    };
    let quotas = (|| {
        Ok::<_, String>((
            number("quota_warning_kb")?,
            number("quota_prohibit_send_kb")?,
            number("quota_prohibit_send_receive_kb")?,
        ))
    })();
    let (warning, send, send_receive) = match quotas {
        Ok(q) => q,
        Err(e) => {
            return error_page(
                &session,
                Nav::Directory,
                StatusCode::UNPROCESSABLE_ENTITY,
                &e,
            );
        }
    };
    let mailbox = r.kind == RecipientKind::Mailbox;
    let protocols = mailbox.then(|| {
        Protocol::ALL
            .iter()
            .filter_map(|p| {
                let value = one(&form, &format!("protocol-{}", p.name()))?;
                Some(format!("{}:{}", p.name(), value))
            })
            .collect::<Vec<_>>()
    });
    let fields = RecipientFields {
        display_name: one(&form, "display_name"),
        given_name: one(&form, "given_name"),
        surname: one(&form, "surname"),
        initials: one(&form, "initials"),
        addresses: one(&form, "addresses").map(|a| list(&a, &['\n', '\r'])),
        target_address: one(&form, "target_address"),
        members: one(&form, "members").map(|m| list(&m, &[',', ';', '\n'])),
        hidden: Some(one(&form, "hidden").is_some()),
        protocols,
        quota_warning_kb: warning,
        quota_prohibit_send_kb: send,
        quota_prohibit_send_receive_kb: send_receive,
        admin: mailbox.then(|| one(&form, "admin").is_some()),
        password_hash: password_hash(one(&form, "password")).await,
        ..RecipientFields::default()
    };
    match state
        .admin
        .directory
        .apply(Change::ModifyRecipient {
            alias: r.alias.clone(),
            fields,
        })
        .await
    {
        Ok(_) => see_other(&format!(
            "/directory/recipient/{}?done=Saved.",
            segment(&r.alias)
        )),
        Err(e) => error_page(
            &session,
            Nav::Directory,
            StatusCode::UNPROCESSABLE_ENTITY,
            &e.to_string(),
        ),
    }
}

/// `GET /directory/site`: site protocol settings and addressing, with the address
/// regeneration job's progress.
pub async fn site(
    State(state): State<Arc<WebState>>,
    Extension(session): Signed,
    Query(query): Query<SearchQuery>,
) -> Response {
    let snapshot = state.admin.directory.snapshot();
    let site = snapshot.site().clone();
    let jobs: Vec<JobReport> = state
        .admin
        .jobs
        .all()
        .iter()
        .map(|j| j.report())
        .filter(|r| r.kind.contains("regenerat"))
        .collect();
    let check = |id: &str, on: bool| {
        html! {
            @if on { input type="checkbox" id=(id) name=(id) value="yes" checked; } @else { input type="checkbox" id=(id) name=(id) value="yes"; }
        }
    };
    let body = html! {
        @if !query.done.is_empty() { p.note role="status" { (query.done) } }
        form method="post" action="/directory/site" {
            (csrf_field(&session))
            fieldset {
                legend { "Site protocol settings" }
                div.row { label for="site-smtp" { "SMTP submission" } (check("site-smtp", site.site_protocols.smtp_submission)) }
                div.row { label for="site-imap" { "IMAP" } (check("site-imap", site.site_protocols.imap)) }
                div.row { label for="site-pop3" { "POP3" } (check("site-pop3", site.site_protocols.pop3)) }
            }
            fieldset {
                legend { "Site addressing" }
                (text_row("template", "SMTP template (e.g. %g.%s@example.com)", site.addressing.get("SMTP").map(String::as_str).unwrap_or("")))
                div.row { label for="regenerate" { "Regenerate addresses now" } input type="checkbox" id="regenerate" name="regenerate" value="yes"; }
            }
            button type="submit" id="save" { "Save" }
        }
        @if !jobs.is_empty() {
            h2 { "Address regeneration" }
            ul { @for j in jobs.iter().rev().take(5) { li { a href={"/import/" (j.id)} { "Job " (j.id) } ": " (j.state) ", " (j.scanned) " of " (j.total) " scanned, " (j.updated) " updated" } } }
        }
        p { "Local domains: " (snapshot.local_domains().join(", ")) }
    };
    page(&session, Nav::Directory, "Site settings", body)
}

/// `POST /directory/site`.
pub async fn save_site(
    State(state): State<Arc<WebState>>,
    Extension(session): Signed,
    body: axum::body::Bytes,
) -> Response {
    let form = form_map(&body);
    let site = state.admin.directory.snapshot().site().clone();
    let mut changes = Vec::new();
    for (protocol, id, now) in [
        (
            Protocol::SmtpSubmission,
            "site-smtp",
            site.site_protocols.smtp_submission,
        ),
        (Protocol::Imap, "site-imap", site.site_protocols.imap),
        (Protocol::Pop3, "site-pop3", site.site_protocols.pop3),
    ] {
        let wanted = one(&form, id).is_some();
        if wanted != now {
            changes.push(SiteChange::SetSiteProtocol {
                protocol,
                enabled: wanted,
            });
        }
    }
    let template = one(&form, "template").unwrap_or_default();
    if site
        .addressing
        .get("SMTP")
        .map(String::as_str)
        .unwrap_or("")
        != template
    {
        changes.push(SiteChange::SetTemplate {
            address_type: "SMTP".into(),
            template: non_empty(&template),
        });
    }
    for change in changes {
        if let Err(e) = state.admin.directory.apply(Change::Site(change)).await {
            return error_page(
                &session,
                Nav::Directory,
                StatusCode::UNPROCESSABLE_ENTITY,
                &e.to_string(),
            );
        }
    }
    if one(&form, "regenerate").is_some() {
        let job = start_regeneration(state.admin.directory.clone(), &state.admin.jobs);
        return see_other(&format!("/import/{}", job.report().id));
    }
    see_other("/directory/site?done=Saved.")
}

// ----- import -----

/// `GET /import`.
pub async fn import(State(state): State<Arc<WebState>>, Extension(session): Signed) -> Response {
    let jobs: Vec<JobReport> = state.admin.jobs.all().iter().map(|j| j.report()).collect();
    let body = html! {
        form method="post" action="/import" enctype="multipart/form-data" {
            (csrf_field(&session))
            fieldset {
                legend { "Import recipients" }
                div.row { label for="file" { "CSV or LDIF file" } input type="file" id="file" name="file" accept=".csv,.ldif,.ldf,text/csv" required; }
                div.row {
                    label for="format" { "Format" }
                    select id="format" name="format" { option value="" { "by the file's name" } option value="csv" { "CSV" } option value="ldif" { "LDIF" } }
                }
                div.row { label for="dry_run" { "Only check, change nothing" } input type="checkbox" id="dry_run" name="dry_run" value="yes"; }
                div.row { label for="atomic" { "All rows or none" } input type="checkbox" id="atomic" name="atomic" value="yes"; }
                button type="submit" { "Upload and import" }
            }
        }
        @if !jobs.is_empty() {
            h2 { "Jobs" }
            table {
                thead { tr { th scope="col" { "Job" } th scope="col" { "What" } th scope="col" { "State" } th scope="col" { "Progress" } } }
                tbody { @for j in jobs.iter().rev() { tr { td { a href={"/import/" (j.id)} { (j.id) } } td { (j.kind) } td { (j.state) } td { (j.scanned) " / " (j.total) ", " (j.failed) " failed" } } } }
            }
        }
    };
    page(&session, Nav::Import, "Import", body)
}

/// `POST /import` (multipart: csrf first, then the file and options).
pub async fn upload(
    State(state): State<Arc<WebState>>,
    Extension(session): Signed,
    mut multipart: Multipart,
) -> Response {
    use tokio::io::AsyncWriteExt;
    let mut csrf_ok = false;
    let mut format = String::new();
    let (mut dry_run, mut atomic) = (false, false);
    let mut uploaded: Option<(std::path::PathBuf, String)> = None;
    let fail = |status, message: String| error_page(&session, Nav::Import, status, &message);
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                return fail(
                    StatusCode::BAD_REQUEST,
                    format!("the upload was cut off: {e}"),
                );
            }
        };
        let name = field.name().unwrap_or("").to_string();
        if name != "csrf" && !csrf_ok {
            // The token comes first; nothing is read or kept before it checks out.
            return crate::csrf_refusal();
        }
        match name.as_str() {
            "csrf" => {
                let token = field.text().await.unwrap_or_default();
                csrf_ok = session::same_secret(&token, &session.csrf);
                if !csrf_ok {
                    return crate::csrf_refusal();
                }
            }
            "format" => format = field.text().await.unwrap_or_default(),
            "dry_run" => dry_run = true,
            "atomic" => atomic = true,
            "file" => {
                let file_name = field.file_name().unwrap_or("upload").to_string();
                if let Err(e) = std::fs::create_dir_all(&state.admin.upload_dir) {
                    return fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
                }
                let kept = tempfile::Builder::new()
                    .prefix("import-")
                    .tempfile_in(&state.admin.upload_dir)
                    .and_then(|f| f.keep().map_err(|e| e.error));
                let (file, path) = match kept {
                    Ok(kept) => kept,
                    Err(e) => return fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                };
                let mut file = tokio::fs::File::from_std(file);
                let mut field = field;
                let mut received: u64 = 0;
                loop {
                    match field.chunk().await {
                        Ok(Some(chunk)) => {
                            received += chunk.len() as u64;
                            if received > state.admin.import_size_max {
                                let _ = std::fs::remove_file(&path);
                                return fail(
                                    StatusCode::PAYLOAD_TOO_LARGE,
                                    format!(
                                        "the file is larger than admin.import_size_max_bytes ({} bytes); nothing was imported",
                                        state.admin.import_size_max
                                    ),
                                );
                            }
                            if let Err(e) = file.write_all(&chunk).await {
                                let _ = std::fs::remove_file(&path);
                                return fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let _ = std::fs::remove_file(&path);
                            return fail(
                                StatusCode::BAD_REQUEST,
                                format!("the upload was cut off: {e}"),
                            );
                        }
                    }
                }
                if let Err(e) = file.flush().await {
                    return fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
                }
                uploaded = Some((path, file_name));
            }
            _ => {}
        }
    }
    let Some((path, name)) = uploaded else {
        return fail(StatusCode::BAD_REQUEST, "choose a file to import".into());
    };
    let format = match mailroom_admin::import_format(non_empty(&format).as_deref(), Some(&name)) {
        Ok(format) => format,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return fail(StatusCode::UNPROCESSABLE_ENTITY, e);
        }
    };
    let options = ImportOptions {
        format,
        dry_run,
        atomic,
    };
    let job = start_import(
        state.admin.directory.clone(),
        &state.admin.jobs,
        path,
        &name,
        options,
    );
    see_other(&format!("/import/{}", job.report().id))
}

const JOB_JS: &str = r#"
(function(){
  const root = document.getElementById('job');
  if (!root || !window.EventSource || root.dataset.state !== 'running') return;
  const source = new EventSource('/events/job/' + root.dataset.id);
  source.onmessage = function(e){
    const j = JSON.parse(e.data);
    const bar = document.getElementById('progress');
    bar.max = Math.max(1, j.total); bar.value = j.scanned;
    document.getElementById('state').textContent = j.state;
    document.getElementById('counts').textContent = j.scanned + ' of ' + j.total + ' rows; ' + j.updated + ' changed, ' + j.failed + ' failed' + (j.paced ? ' (yielding to mail)' : '');
    if (j.errors) {
      const list = document.getElementById('errors');
      list.replaceChildren(...j.errors.map(t => { const li = document.createElement('li'); li.textContent = t; return li; }));
    }
    document.getElementById('summary').textContent = j.summary;
    root.dataset.state = j.state;
    if (j.state !== 'running') source.close();
  };
})();
"#;

/// `GET /import/{id}`: a job's progress (live with JavaScript; without, the page
/// reloads itself every two seconds while the job runs) and every failed line.
pub async fn import_job(
    State(state): State<Arc<WebState>>,
    Extension(session): Signed,
    Path(id): Path<u64>,
) -> Response {
    let Some(job) = state.admin.jobs.get(id) else {
        return error_page(
            &session,
            Nav::Import,
            StatusCode::NOT_FOUND,
            &format!("No job {id}."),
        );
    };
    let j = job.report();
    let running = j.state == "running";
    let body = html! {
        @if running { noscript { meta http-equiv="refresh" content="2"; } }
        div #job data-id=(j.id) data-state=(j.state) {
            p { (j.kind) }
            div.row {
                label for="progress" { "Progress" }
                progress #progress max=(j.total.max(1)) value=(j.scanned) { (j.scanned) " of " (j.total) }
            }
            p { "State: " strong #state { (j.state) } }
            p #counts { (j.scanned) " of " (j.total) " rows; " (j.updated) " changed, " (j.failed) " failed" @if j.paced { " (yielding to mail)" } }
            p #summary { (j.summary) }
            h2 { "Failed lines" }
            ol #errors { @for e in &j.errors { li { (e) } } }
        }
        script src="/assets/job.js" {}
    };
    page(&session, Nav::Import, &format!("Job {id}"), body)
}

/// `GET /events/job/{id}`: the job's report twice a second until it ends.
pub async fn job_events(
    State(state): State<Arc<WebState>>,
    Extension(_session): Signed,
    Path(id): Path<u64>,
) -> Response {
    let Some(job) = state.admin.jobs.get(id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    // The failed lines (up to the job's 10,000) go out only when more have come, so a
    // long list is not sent twice a second.
    let stream = futures_util::stream::unfold(Some((job, None)), |step| async move {
        let (job, sent_errors) = step?;
        if sent_errors.is_some() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let report = job.report();
        let running = report.state == "running";
        let errors = report.errors.len();
        let mut value = serde_json::to_value(&report).unwrap_or_default();
        if sent_errors == Some(errors)
            && let Some(object) = value.as_object_mut()
        {
            object.remove("errors");
        }
        let event = Event::default().data(value.to_string());
        Some((
            Ok::<_, Infallible>(event),
            running.then_some((job, Some(errors))),
        ))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

// ----- routing and health -----

#[derive(Deserialize, Default)]
pub struct RouteQuery {
    #[serde(default)]
    address: String,
}

/// `GET /routing`: connectors, address spaces and costs; route an address.
pub async fn routing(
    State(state): State<Arc<WebState>>,
    Extension(session): Signed,
    Query(query): Query<RouteQuery>,
) -> Response {
    let snapshot = state.admin.directory.snapshot();
    let site = snapshot.site();
    let address = query.address.trim().to_string();
    let answer: Option<String> = (!address.is_empty()).then(|| match snapshot.resolve(&address) {
        mailroom_directory::Resolution::Local(r) => {
            format!("{address} is here: {} {}", kind_name(r.kind), r.alias)
        }
        mailroom_directory::Resolution::UnknownLocal => {
            format!("{address}: the domain is ours, but nobody has this address (5.1.1)")
        }
        mailroom_directory::Resolution::Remote => match snapshot
            .routing()
            .route("SMTP", &address, 0)
        {
            Some(route) => format!(
                "{address} goes out through connector {} (address space {}, cost {}){}",
                route.connector,
                route.pattern,
                route.cost,
                route
                    .instead_of
                    .map(|i| format!("; the cheaper {i} is unavailable"))
                    .unwrap_or_default()
            ),
            None => format!("{address}: no connector's address space matches (no route, 5.4.4)"),
        },
    });
    let body = html! {
        form method="get" action="/routing" role="search" {
            label for="address" { "Route this address" }
            input type="search" id="address" name="address" value=(query.address) size="40";
            button type="submit" { "Route" }
        }
        @if let Some(answer) = answer { p.note role="status" #route-answer { (answer) } }
        table #connectors {
            thead { tr { th scope="col" { "Connector" } th scope="col" { "Delivers by" } th scope="col" { "Address spaces (cost)" } th scope="col" { "Enabled" } th scope="col" { "Retry (minutes)" } } }
            tbody {
                @for c in site.connectors.values() {
                    tr {
                        td { (c.name) }
                        td { (match &c.kind { mailroom_directory::routing::ConnectorKind::Mx => "DNS MX".to_string(), mailroom_directory::routing::ConnectorKind::SmartHost { host } => format!("smart host {host}"), mailroom_directory::routing::ConnectorKind::Local => "local delivery".to_string() }) }
                        td { @for (i, s) in c.address_spaces.iter().enumerate() { @if i > 0 { ", " } (s.address_type) ":" (s.pattern) " (" (s.cost) ")" } }
                        td { (if c.enabled { "yes" } else { "no" }) }
                        td { (c.retry_minutes.as_ref().map(|m| m.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")).unwrap_or_else(|| "server default".into())) }
                    }
                }
            }
        }
        p { "Only least-cost routes: " (if site.only_least_cost_routes { "yes" } else { "no" }) ". Change connectors with " code { "mailroom connector" } "." }
    };
    page(&session, Nav::Routing, "Routing", body)
}

/// `GET /status`: the watchdog's whole report, and where the metrics are.
pub async fn status(State(state): State<Arc<WebState>>, Extension(session): Signed) -> Response {
    let health = state.admin.watch.health();
    let body = html! {
        p { "Verdict: " strong class=(if health.healthy { "ok" } else { "bad" }) { (if health.healthy { "healthy" } else { "unhealthy" }) } ", reached " (rfc3339(health.checked_at_ms)) ". Deadlocks found: " (health.deadlocks) "." }
        h2 { "Queues" }
        table {
            thead { tr { th scope="col" { "Queue" } th scope="col" { "Depth" } th scope="col" { "Oldest, s" } th scope="col" { "Progress" } th scope="col" { "No progress for, s" } } }
            tbody { @for q in &health.queues { tr { td { (q.queue) } td.num { (q.depth) } td.num { (q.oldest_age_seconds.map(|s| format!("{s:.1}")).unwrap_or_default()) } td.num { (q.progress) } td.num { (format!("{:.1}", q.no_progress_seconds)) } } } }
        }
        @if !health.conditions.is_empty() {
            h2 { "Conditions" }
            ul { @for c in &health.conditions { li { (c.condition) ": " (c.detail) " (" (format!("{:.0}", c.for_seconds)) " s)" } } }
        }
        h2 { "Workers" }
        table {
            thead { tr { th scope="col" { "Worker" } th scope="col" { "Doing" } th scope="col" { "For, s" } } }
            tbody { @for w in &health.workers { tr { td { (w.worker) } td { (w.doing) @if w.died { strong.bad { " (died)" } } } td.num { (format!("{:.1}", w.for_seconds)) } } } }
        }
        p { "Machine-readable: " a href="/health" { "/health" } " (JSON) and " a href="/metrics" { "/metrics" } " (Prometheus)." }
    };
    page(&session, Nav::Status, "Health", body)
}
