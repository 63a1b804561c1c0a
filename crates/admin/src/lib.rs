//! Mailroom's admin HTTP API: JSON under `/api/v1`, `/health`, `/metrics`.
//!
//! Purpose: every administrative action is an API call, so the CLI, scripts and a future
//! web page share one path. Inputs: HTTP requests (bearer token for `/api/v1`). Outputs:
//! JSON, Prometheus text, and directory changes submitted to the single writer.
//!
//! `/health` and `/metrics` need no token: they disclose counts, not mail, and
//! monitoring systems scrape them without credentials. The listener is on loopback by
//! default; put it elsewhere only behind a firewall.
//!
//! What it never does: write to the store directly (directory changes go through the
//! writer), or block the async runtime on the database (queries run on the blocking pool).

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use mailroom_directory::bulk::Format;
use mailroom_directory::jobs::{ImportOptions, JobReport, Jobs, start_import, start_regeneration};
use mailroom_directory::routing::Connector;
use mailroom_directory::{
    Change, Directory, DirectoryError, ProxyAddress, Quota, Recipient, RecipientFields,
    RecipientKind, SiteChange, Snapshot, hash_password,
};
use mailroom_store::{MailStore, QueueName, QueueSummary};
use mailroom_watch::now_ms;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use tokio_util::sync::CancellationToken;

type Labels = Vec<(String, String)>;

/// Gauges refreshed from the store at every scrape, so they are never stale.
#[derive(Clone, Default)]
pub struct QueueGauges {
    depth: Family<Labels, Gauge>,
    oldest_age_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    bytes: Family<Labels, Gauge>,
}

impl QueueGauges {
    /// Adds the gauges to a Prometheus registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mailroom_queue_depth",
            "Entries per queue",
            self.depth.clone(),
        );
        registry.register(
            "mailroom_queue_oldest_age_seconds",
            "Age of the oldest entry per queue (0 when empty)",
            self.oldest_age_seconds.clone(),
        );
        registry.register(
            "mailroom_queue_bytes",
            "Message bytes per queue",
            self.bytes.clone(),
        );
    }

    fn update(&self, summaries: &[QueueSummary], now_ms: i64) {
        for summary in summaries {
            let labels = vec![("queue".to_string(), summary.queue.as_str().to_string())];
            self.depth.get_or_create(&labels).set(summary.depth as i64);
            self.bytes.get_or_create(&labels).set(summary.bytes as i64);
            let age = summary
                .oldest_received_at_ms
                .map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0);
            self.oldest_age_seconds.get_or_create(&labels).set(age);
        }
    }
}

/// What the API handlers share.
pub struct AdminState {
    /// The store, for queries.
    pub store: Arc<dyn MailStore>,
    /// The directory: snapshots for reads, the writer for changes.
    pub directory: Directory,
    /// Every metric of the server.
    pub registry: Registry,
    /// Queue gauges refreshed at scrape time.
    pub queue_gauges: QueueGauges,
    /// The bearer token `/api/v1` requires.
    pub token: String,
    /// Background directory jobs.
    pub jobs: Arc<Jobs>,
    /// Where uploads (imports) are written while their job runs.
    pub upload_dir: std::path::PathBuf,
    /// Largest directory import accepted, in bytes; a larger upload is cut off with 413
    /// and nothing of it is kept.
    pub import_size_max: u64,
    /// The watchdog's probes and verdict.
    pub watch: Arc<mailroom_watch::Registry>,
    /// Outbound delivery: wake-ups, deletion with DSNs, the delivery clock.
    pub outbound: mailroom_outbound::OutboundHandle,
    /// The transfer mode switch.
    pub transfer: mailroom_queue::Transfer,
    /// Whether `POST /api/v1/clock/advance` is allowed (tests only).
    pub test_clock: bool,
}

/// An API error: a status and a message that says what to do.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({"error": self.1}))).into_response()
    }
}

impl From<DirectoryError> for ApiError {
    fn from(e: DirectoryError) -> ApiError {
        let status = match &e {
            DirectoryError::Invalid { .. } | DirectoryError::RolledBack => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            DirectoryError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            DirectoryError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// Runs a blocking store query off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> mailroom_store::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(internal)?
        .map_err(store_error)
}

/// A store error as an HTTP answer: a storage fault is the server's temporary
/// condition (507 for a full disk, 503 for an I/O error), not a bug.
fn store_error(e: mailroom_store::StoreError) -> ApiError {
    let status = match e.fault() {
        Some(mailroom_store::Fault::DiskFull) => StatusCode::INSUFFICIENT_STORAGE,
        Some(mailroom_store::Fault::Io) => StatusCode::SERVICE_UNAVAILABLE,
        None => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(status, e.to_string())
}

/// The router with every route.
pub fn router(state: Arc<AdminState>) -> Router {
    let api = Router::new()
        .route("/recipients", get(list_recipients).post(create_recipient))
        .route(
            "/recipients/{address}",
            get(show_recipient)
                .patch(modify_recipient)
                .delete(delete_recipient),
        )
        .route("/recipients/{address}/password", post(set_password))
        .route("/site", get(show_site).post(change_site))
        .route("/connectors", get(list_connectors).post(put_connector))
        .route(
            "/connectors/{name}",
            get(show_connector).delete(delete_connector),
        )
        .route("/domains", get(list_domains).post(add_domain))
        .route("/domains/{domain}", delete(remove_domain))
        .route("/routing", get(show_routing))
        .route("/routing/route", get(route_address))
        .route("/protocols", get(show_protocols))
        .route("/protocols/check", get(check_protocol))
        .route("/directory/import", post(import_directory))
        .route("/directory/export", get(export_directory))
        .route("/backup", post(backup))
        .route("/jobs", get(list_jobs))
        .route("/jobs/{id}", get(show_job))
        .route("/mailboxes/{address}/messages", get(list_messages))
        .route("/mailboxes/{address}/messages/{uid}/raw", get(raw_message))
        .route("/queues", get(queues))
        .route("/queues/{queue}/items", get(queue_items))
        .route("/queue", get(queue_filter))
        .route("/queue/{id}", get(queue_item).delete(queue_delete))
        .route("/queue/{id}/retry", post(queue_retry))
        .route("/queue/{id}/hold", post(queue_hold))
        .route("/queue/{id}/release", post(queue_release))
        .route("/track", get(track))
        .route(
            "/transfer-mode",
            get(show_transfer_mode).post(set_transfer_mode),
        )
        .route("/clock/advance", post(advance_clock))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .nest("/api/v1", api)
        .with_state(state)
}

/// How many connections an admin listener holds at once, and how long a connection
/// may go without sending a complete request header.
///
/// Why: each connection is a file descriptor of the whole process. Without a bound, a
/// client that opens connections and never finishes a request (slowloris) exhausts the
/// descriptors, and then SMTP, IMAP and POP3 cannot accept either; the admin listener is
/// also where `/health` reports a stall, so it must stay answerable.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections served at once; one more is answered 503 and closed (and logged).
    pub connections_max: usize,
    /// A connection idle this long between requests, or this slow to send a request's
    /// header, is closed (hyper's header read timeout, which also covers keep-alive).
    pub idle_timeout: std::time::Duration,
}

/// What a connection beyond `admin.connections_max` is told before it is closed.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\
Content-Type: text/plain\r\nContent-Length: 61\r\n\r\n\
all admin connection slots are in use (admin.connections_max)";

/// Serves `app` on `listener` until `cancel` fires: over implicit TLS (HTTPS) when
/// `tls` is given (each connection a handshake bounded by the TLS crate's timeout),
/// else plain HTTP/1.1. The client's address is available to handlers as
/// `ConnectInfo`. Accepting is the protocol listeners' loop (`mailroom_listen`): the
/// connection bound, back-off when accept fails, the refusal beyond the bound.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<mailroom_tls::Tls>>,
    app: Router,
    limits: ConnectionLimits,
    cancel: CancellationToken,
) {
    let protocol = if tls.is_some() {
        "admin HTTPS"
    } else {
        "admin HTTP"
    };
    // Refusals are logged at most every 10 s: a flood must not flood the log too.
    let refused_logged_ms = AtomicU64::new(0);
    let refused = || {
        let now = now_ms() as u64;
        let last = refused_logged_ms.load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(last) > 10_000 {
            refused_logged_ms.store(now, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                "{protocol} connection refused: all admin connection slots are in use (admin.connections_max)"
            );
        }
    };
    let handle = |stream: tokio::net::TcpStream, peer: std::net::SocketAddr| {
        let (tls, app, cancel, idle) = (
            tls.clone(),
            app.clone(),
            cancel.clone(),
            limits.idle_timeout,
        );
        async move {
            let stream: mailroom_tls::BoxedIo = match tls {
                Some(tls) => match mailroom_tls::accept(&tls, Box::new(stream)).await {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "admin HTTPS handshake failed");
                        return;
                    }
                },
                None => Box::new(stream),
            };
            let service =
                hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
                    request
                        .extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    tower::ServiceExt::oneshot(app.clone(), request)
                });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(idle)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = cancel.cancelled() => connection.as_mut().graceful_shutdown(),
            }
        }
    };
    mailroom_listen::serve(
        listener,
        mailroom_listen::Limits {
            protocol,
            connections_max: limits.connections_max,
            // The bound is the whole listener's; the admin listener is loopback by
            // default, where every client has the same address.
            per_client_max: limits.connections_max,
            refusal: REFUSAL,
        },
        cancel.clone(),
        tokio_util::task::TaskTracker::new(),
        refused,
        handle,
    )
    .await;
}

async fn require_token(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(presented.as_bytes(), state.token.as_bytes()) {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token; the CLI reads it from the data folder (admin.token)"
                .into(),
        ));
    }
    Ok(next.run(request).await)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The body of `GET /health`: 200 when healthy, 503 when a queue is stalled or a
/// deadlock was found.
#[derive(Debug, Serialize, Deserialize)]
pub struct HealthReport {
    /// `ok` or `unhealthy`.
    pub status: String,
    /// The organization.
    pub organization: String,
    /// The site.
    pub site: String,
    /// This server.
    pub server: String,
    /// The directory generation.
    pub directory_generation: u64,
    /// Recipients.
    pub recipients: usize,
    /// Stalled queues, by name.
    pub stalled: Vec<mailroom_watch::StalledQueue>,
    /// Sessions blocking a runtime thread (protocol, client, command) and runtimes
    /// that stopped running tasks.
    #[serde(default)]
    pub blocked: Vec<mailroom_watch::BlockedTask>,
    /// Deadlock cycles found.
    pub deadlocks: u64,
    /// Faults that last (the `disk` below its reserve or full, `storage` I/O errors),
    /// each with what the server does about it.
    #[serde(default)]
    pub conditions: Vec<mailroom_watch::ConditionReport>,
    /// Every watched queue: depth, oldest item, progress.
    pub queues: Vec<mailroom_watch::QueueHealth>,
    /// What every worker is doing.
    pub workers: Vec<mailroom_watch::WorkerReport>,
    /// When the watchdog reached this verdict (Unix ms); a verdict that stops moving
    /// means the watchdog itself fell behind.
    pub checked_at_ms: i64,
}

async fn health(State(state): State<Arc<AdminState>>) -> (StatusCode, Json<HealthReport>) {
    let verdict = state.watch.health();
    let snapshot = state.directory.snapshot();
    let topology = snapshot.topology().clone();
    let status = if verdict.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(HealthReport {
            status: if verdict.healthy { "ok" } else { "unhealthy" }.into(),
            organization: topology.organization,
            site: topology.site,
            server: topology.server,
            directory_generation: snapshot.generation(),
            recipients: snapshot.len(),
            stalled: verdict.stalled.clone(),
            blocked: verdict.blocked.clone(),
            deadlocks: verdict.deadlocks,
            conditions: verdict.conditions.clone(),
            queues: verdict.queues.clone(),
            workers: verdict.workers.clone(),
            checked_at_ms: verdict.checked_at_ms,
        }),
    )
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Result<Response, ApiError> {
    let store = state.store.clone();
    // Everything else here is in memory, and a full disk or an I/O fault is when an
    // operator's monitoring needs it most: when the queues cannot be read, their gauges
    // keep their last values, the storage fault counters say why, and the answer is
    // still 200 (the full-disk fault test saw this read fail while the disk was full).
    match tokio::task::spawn_blocking(move || store.queue_summaries()).await {
        Ok(Ok(summaries)) => state.queue_gauges.update(&summaries, now_ms()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "/metrics: cannot read the queues; their gauges keep their last values")
        }
        Err(e) => return Err(internal(e)),
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &state.registry).map_err(internal)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// A recipient as the API shows it: members and owner by alias.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecipientView {
    /// Identity.
    pub id: i64,
    /// Mailbox, contact or list.
    pub kind: RecipientKind,
    /// Mailbox name.
    pub alias: String,
    /// Display name.
    pub display_name: String,
    /// Given name.
    pub given_name: String,
    /// Surname.
    pub surname: String,
    /// Initials.
    pub initials: String,
    /// The primary address.
    pub primary_address: Option<String>,
    /// Every address, with its primary and generated marks.
    pub addresses: Vec<ProxyAddress>,
    /// A contact's target.
    pub target_address: Option<String>,
    /// A list's members, by alias.
    pub members: Vec<String>,
    /// A list's owner, by alias.
    pub owner: Option<String>,
    /// Mailboxes granted "send as" this recipient, by alias.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub send_as: Vec<String>,
    /// Hidden from the address book.
    pub hidden: bool,
    /// Protocol overrides (`imap:off` ...).
    pub protocols: Vec<String>,
    /// Size limits.
    pub quota: Quota,
    /// True when a password is set.
    pub has_password: bool,
    /// The administrator role: may sign in to the web admin.
    #[serde(default)]
    pub admin: bool,
    /// What the administrator should know about the change just made (for example a
    /// generated address that needed a numeric suffix).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The view of `r` in `snapshot`.
pub fn view(snapshot: &Snapshot, r: &Recipient) -> RecipientView {
    let alias_of = |id: i64| snapshot.recipient(id).map(|m| m.alias.clone());
    RecipientView {
        id: r.id,
        kind: r.kind,
        alias: r.alias.clone(),
        display_name: r.display_name.clone(),
        given_name: r.given_name.clone(),
        surname: r.surname.clone(),
        initials: r.initials.clone(),
        primary_address: r.primary_address().map(str::to_string),
        addresses: r.addresses.clone(),
        target_address: r.target_address.clone(),
        members: r.members.iter().filter_map(|m| alias_of(*m)).collect(),
        owner: r.owner.and_then(alias_of),
        send_as: r.send_as.iter().filter_map(|m| alias_of(*m)).collect(),
        hidden: r.hidden,
        protocols: r.protocols.to_csv(),
        quota: r.quota,
        has_password: r.password_hash.is_some(),
        admin: r.admin,
        notes: Vec::new(),
    }
}

#[derive(Deserialize)]
struct KindQuery {
    kind: Option<RecipientKind>,
}

async fn list_recipients(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<KindQuery>,
) -> Json<Vec<RecipientView>> {
    let snapshot = state.directory.snapshot();
    Json(
        snapshot
            .recipients_by_alias()
            .iter()
            .filter(|r| query.kind.is_none_or(|k| r.kind == k))
            .map(|r| view(&snapshot, r))
            .collect(),
    )
}

fn find_recipient(state: &AdminState, address: &str) -> Result<Arc<Recipient>, ApiError> {
    state
        .directory
        .snapshot()
        .find(address)
        .cloned()
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no recipient has the alias or address {address}"),
            )
        })
}

async fn show_recipient(
    State(state): State<Arc<AdminState>>,
    Path(address): Path<String>,
) -> Result<Json<RecipientView>, ApiError> {
    let recipient = find_recipient(&state, &address)?;
    Ok(Json(view(&state.directory.snapshot(), &recipient)))
}

/// The body of `POST /api/v1/recipients` and `PATCH /api/v1/recipients/{alias}`: every
/// field is optional on PATCH; absent fields are left as they are.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RecipientRequest {
    /// `mailbox` (default), `contact` or `list`.
    #[serde(default)]
    pub kind: Option<RecipientKind>,
    /// Primary SMTP address (shorthand for the first of `addresses`).
    #[serde(default)]
    pub address: Option<String>,
    /// More addresses delivering to the same recipient.
    #[serde(default)]
    pub secondary_addresses: Vec<String>,
    /// Every address in the classic form (`SMTP:` primary, `smtp:` secondary).
    #[serde(default)]
    pub addresses: Option<Vec<String>>,
    /// Mailbox name; defaults to the address's local part.
    #[serde(default)]
    pub alias: Option<String>,
    /// Display name.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Given name.
    #[serde(default)]
    pub given_name: Option<String>,
    /// Surname.
    #[serde(default)]
    pub surname: Option<String>,
    /// Initials.
    #[serde(default)]
    pub initials: Option<String>,
    /// A contact's external address.
    #[serde(default)]
    pub target_address: Option<String>,
    /// A list's members (aliases or addresses).
    #[serde(default)]
    pub members: Option<Vec<String>>,
    /// A list's owner.
    #[serde(default)]
    pub owner: Option<String>,
    /// Mailboxes (alias or address) granted "send as" this recipient; replaces them.
    #[serde(default)]
    pub send_as: Option<Vec<String>>,
    /// Hidden from the address book.
    #[serde(default)]
    pub hidden: Option<bool>,
    /// The administrator role (web admin sign-in); mailboxes only.
    #[serde(default)]
    pub admin: Option<bool>,
    /// Protocol overrides, `imap:off` etc.
    #[serde(default)]
    pub protocols: Option<Vec<String>>,
    /// Quota warning, KB (0: none).
    #[serde(default)]
    pub quota_warning_kb: Option<u64>,
    /// Quota prohibit send, KB (0: none).
    #[serde(default)]
    pub quota_prohibit_send_kb: Option<u64>,
    /// Quota prohibit send and receive, KB (0: none).
    #[serde(default)]
    pub quota_prohibit_send_receive_kb: Option<u64>,
    /// Initial password, if any.
    #[serde(default)]
    pub password: Option<String>,
}

impl RecipientRequest {
    async fn into_fields(self) -> Result<RecipientFields, ApiError> {
        let addresses = match (self.address, self.addresses) {
            (Some(primary), None) => {
                let mut all = vec![format!("SMTP:{primary}")];
                all.extend(self.secondary_addresses.iter().map(|a| format!("smtp:{a}")));
                Some(all)
            }
            (None, addresses) if self.secondary_addresses.is_empty() => addresses,
            _ => {
                return Err(ApiError(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "give either address (with secondary_addresses) or addresses, not both".into(),
                ));
            }
        };
        let password_hash = match self.password {
            Some(password) => Some(
                tokio::task::spawn_blocking(move || hash_password(&password))
                    .await
                    .map_err(internal)?,
            ),
            None => None,
        };
        Ok(RecipientFields {
            kind: self.kind,
            alias: self.alias,
            display_name: self.display_name,
            given_name: self.given_name,
            surname: self.surname,
            initials: self.initials,
            addresses,
            target_address: self.target_address,
            members: self.members,
            add_addresses: Vec::new(),
            remove_addresses: Vec::new(),
            add_members: Vec::new(),
            remove_members: Vec::new(),
            owner: self.owner,
            send_as: self.send_as,
            hidden: self.hidden,
            admin: self.admin,
            protocols: self.protocols,
            quota_warning_kb: self.quota_warning_kb,
            quota_prohibit_send_kb: self.quota_prohibit_send_kb,
            quota_prohibit_send_receive_kb: self.quota_prohibit_send_receive_kb,
            password_hash,
        })
    }
}

async fn create_recipient(
    State(state): State<Arc<AdminState>>,
    Json(request): Json<RecipientRequest>,
) -> Result<(StatusCode, Json<RecipientView>), ApiError> {
    let mut fields = request.into_fields().await?;
    fields.kind = Some(fields.kind.unwrap_or_default());
    let applied = state
        .directory
        .apply(Change::CreateRecipient(fields))
        .await?;
    let recipient = applied
        .recipient
        .ok_or_else(|| internal("no recipient returned"))?;
    let mut shown = view(&state.directory.snapshot(), &recipient);
    shown.notes = applied.notes;
    Ok((StatusCode::CREATED, Json(shown)))
}

async fn modify_recipient(
    State(state): State<Arc<AdminState>>,
    Path(alias): Path<String>,
    Json(request): Json<RecipientRequest>,
) -> Result<Json<RecipientView>, ApiError> {
    find_recipient(&state, &alias)?;
    let fields = request.into_fields().await?;
    let applied = state
        .directory
        .apply(Change::ModifyRecipient { alias, fields })
        .await?;
    let recipient = applied
        .recipient
        .ok_or_else(|| internal("no recipient returned"))?;
    Ok(Json(view(&state.directory.snapshot(), &recipient)))
}

async fn delete_recipient(
    State(state): State<Arc<AdminState>>,
    Path(alias): Path<String>,
) -> Result<StatusCode, ApiError> {
    find_recipient(&state, &alias)?;
    state
        .directory
        .apply(Change::DeleteRecipient { alias })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The body of `POST /api/v1/recipients/{address}/password`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordRequest {
    /// The new password.
    pub password: String,
}

async fn set_password(
    State(state): State<Arc<AdminState>>,
    Path(address): Path<String>,
    Json(request): Json<PasswordRequest>,
) -> Result<StatusCode, ApiError> {
    find_recipient(&state, &address)?;
    let password = request.password;
    let password_hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(internal)?;
    state
        .directory
        .apply(Change::SetPassword {
            address,
            password_hash,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The answer to a site change: the job it started, if any.
#[derive(Debug, Serialize, Deserialize)]
pub struct SiteChangeReport {
    /// The address regeneration job a template change started.
    pub job: Option<u64>,
    /// The directory generation that published the change (0: nothing changed).
    pub generation: u64,
    /// The site configuration now.
    pub site: mailroom_directory::SiteConfig,
}

async fn show_site(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    let snapshot = state.directory.snapshot();
    Json(serde_json::json!({
        "site": snapshot.site(),
        "accepted_domains": snapshot.local_domains(),
        "topology": snapshot.topology(),
        "generation": snapshot.generation(),
    }))
}

async fn change_site(
    State(state): State<Arc<AdminState>>,
    Json(change): Json<SiteChange>,
) -> Result<Json<SiteChangeReport>, ApiError> {
    let template_change = matches!(
        change,
        SiteChange::SetTemplate {
            template: Some(_),
            ..
        }
    );
    let applied = state.directory.apply(Change::Site(change)).await?;
    let job = template_change.then(|| start_regeneration(state.directory.clone(), &state.jobs).id);
    Ok(Json(SiteChangeReport {
        job,
        generation: applied.generation,
        site: state.directory.snapshot().site().clone(),
    }))
}

async fn list_connectors(State(state): State<Arc<AdminState>>) -> Json<Vec<Connector>> {
    Json(
        state
            .directory
            .snapshot()
            .site()
            .connectors
            .values()
            .cloned()
            .collect(),
    )
}

async fn show_connector(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<Json<Connector>, ApiError> {
    state
        .directory
        .snapshot()
        .site()
        .connectors
        .get(&name)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no connector {name:?}")))
}

async fn put_connector(
    State(state): State<Arc<AdminState>>,
    Json(connector): Json<Connector>,
) -> Result<Json<Connector>, ApiError> {
    let name = connector.name.clone();
    state
        .directory
        .apply(Change::Site(SiteChange::PutConnector { connector }))
        .await?;
    show_connector(State(state), Path(name)).await
}

async fn delete_connector(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state
        .directory
        .apply(Change::Site(SiteChange::DeleteConnector { name }))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_domains(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    let snapshot = state.directory.snapshot();
    Json(serde_json::json!({
        "accepted": snapshot.local_domains(),
        "explicit": snapshot.site().accepted_domains,
    }))
}

/// The body of `POST /api/v1/domains`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DomainRequest {
    /// The domain to accept.
    pub domain: String,
}

async fn add_domain(
    State(state): State<Arc<AdminState>>,
    Json(request): Json<DomainRequest>,
) -> Result<StatusCode, ApiError> {
    state
        .directory
        .apply(Change::Site(SiteChange::AddAcceptedDomain {
            domain: request.domain,
        }))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_domain(
    State(state): State<Arc<AdminState>>,
    Path(domain): Path<String>,
) -> Result<StatusCode, ApiError> {
    state
        .directory
        .apply(Change::Site(SiteChange::RemoveAcceptedDomain { domain }))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The body of `GET /api/v1/routing`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RoutingReport {
    /// The table now, as text.
    pub table: String,
    /// The table before its last change.
    pub previous: String,
    /// What changed (`- ` left, `+ ` joined).
    pub diff: String,
    /// The directory generation of the table.
    pub generation: u64,
}

async fn show_routing(State(state): State<Arc<AdminState>>) -> Json<RoutingReport> {
    let snapshot = state.directory.snapshot();
    let table = snapshot.routing().render();
    Json(RoutingReport {
        diff: mailroom_directory::routing::diff(snapshot.previous_routing(), &table),
        previous: snapshot.previous_routing().to_string(),
        table,
        generation: snapshot.generation(),
    })
}

#[derive(Deserialize)]
struct AddressQuery {
    address: String,
}

async fn route_address(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<AddressQuery>,
) -> Result<Json<mailroom_directory::routing::Route>, ApiError> {
    state
        .directory
        .snapshot()
        .routing()
        .route("SMTP", &query.address, 0)
        .map(Json)
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no connector's address space matches {}", query.address),
            )
        })
}

async fn show_protocols(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    let snapshot = state.directory.snapshot();
    let site = snapshot.site();
    Json(serde_json::json!({
        "site": site.site_protocols,
        "server": {
            "name": snapshot.topology().server,
            "use_site_defaults": site.server_uses_site_defaults,
            "own": site.server_protocols,
            "effective": site.server_effective(),
        },
    }))
}

#[derive(Deserialize)]
struct ProtocolQuery {
    recipient: String,
    protocol: String,
}

async fn check_protocol(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<ProtocolQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let recipient = find_recipient(&state, &query.recipient)?;
    let protocol = mailroom_directory::Protocol::parse(&query.protocol).ok_or_else(|| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("unknown protocol {:?} (smtp, imap, pop3)", query.protocol),
        )
    })?;
    let allowed = state.directory.snapshot().may_use(recipient.id, protocol);
    Ok(Json(
        serde_json::json!({"recipient": recipient.alias, "protocol": protocol.name(), "allowed": allowed}),
    ))
}

#[derive(Deserialize)]
struct ImportQuery {
    format: Option<String>,
    name: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    atomic: bool,
}

fn format_of(format: Option<&str>, name: Option<&str>) -> Result<Format, ApiError> {
    import_format(format, name).map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e))
}

/// An import's format: as given (`csv`, `ldif`), or by the file name's extension; the
/// error says what to give. Shared with the web admin's upload form.
pub fn import_format(format: Option<&str>, name: Option<&str>) -> Result<Format, String> {
    let from_name = name.and_then(|n| Format::from_path(std::path::Path::new(n)));
    match format {
        Some(f) => Format::parse(f).ok_or_else(|| format!("format {f:?}: say csv or ldif")),
        None => from_name.ok_or_else(|| {
            "say format=csv or format=ldif (or give a name ending in .csv or .ldif)".into()
        }),
    }
}

/// `POST /api/v1/directory/import?format=csv|ldif&dry_run=&atomic=&name=`: the body is
/// the file, streamed to disk; the answer names the job that imports it.
async fn import_directory(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<ImportQuery>,
    body: Body,
) -> Result<(StatusCode, Json<JobReport>), ApiError> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let format = format_of(query.format.as_deref(), query.name.as_deref())?;
    std::fs::create_dir_all(&state.upload_dir).map_err(internal)?;
    let (file, path) = tempfile::Builder::new()
        .prefix("import-")
        .tempfile_in(&state.upload_dir)
        .map_err(internal)?
        .keep()
        .map_err(internal)?;
    let mut file = tokio::fs::File::from_std(file);
    let mut stream = body.into_data_stream();
    let mut received: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("upload interrupted: {e}"),
                ));
            }
        };
        received = received.saturating_add(chunk.len() as u64);
        if received > state.import_size_max {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the import is larger than admin.import_size_max_bytes ({} bytes); nothing was imported",
                    state.import_size_max
                ),
            ));
        }
        if let Err(e) = file.write_all(&chunk).await {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(internal(e));
        }
    }
    file.flush().await.map_err(internal)?;
    let name = query.name.unwrap_or_else(|| "upload".into());
    let options = ImportOptions {
        format,
        dry_run: query.dry_run,
        atomic: query.atomic,
    };
    let job = start_import(state.directory.clone(), &state.jobs, path, &name, options);
    Ok((StatusCode::ACCEPTED, Json(job.report())))
}

#[derive(Deserialize)]
struct ExportQuery {
    format: Option<String>,
}

async fn export_directory(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let format = format_of(Some(query.format.as_deref().unwrap_or("csv")), None)?;
    let snapshot = state.directory.snapshot();
    let text =
        tokio::task::spawn_blocking(move || mailroom_directory::bulk::export(format, &snapshot))
            .await
            .map_err(internal)?;
    let content_type = match format {
        Format::Csv => "text/csv; charset=utf-8",
        Format::Ldif => "text/x-ldif; charset=utf-8",
    };
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}

/// `POST /api/v1/backup`: the body names the folder (on the server's machine).
#[derive(Debug, Deserialize)]
pub struct BackupRequest {
    /// An absent or empty folder the server can write.
    pub dir: std::path::PathBuf,
}

/// Takes a consistent online copy of the database while mail flows.
async fn backup(
    State(state): State<Arc<AdminState>>,
    Json(request): Json<BackupRequest>,
) -> Result<Json<mailroom_store::BackupManifest>, ApiError> {
    if !request.dir.is_absolute() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "dir must be an absolute path on the server's machine".into(),
        ));
    }
    let store = state.store.clone();
    let manifest = tokio::task::spawn_blocking(move || store.backup_to(&request.dir))
        .await
        .map_err(internal)?
        .map_err(|e| match e {
            mailroom_store::StoreError::Conflict(why) => ApiError(StatusCode::CONFLICT, why),
            other => internal(other),
        })?;
    tracing::info!(
        messages = manifest.messages,
        bytes = manifest.bytes,
        "backup taken"
    );
    Ok(Json(manifest))
}

async fn list_jobs(State(state): State<Arc<AdminState>>) -> Json<Vec<JobReport>> {
    Json(state.jobs.all().iter().map(|j| j.report()).collect())
}

async fn show_job(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<u64>,
) -> Result<Json<JobReport>, ApiError> {
    state
        .jobs
        .get(id)
        .map(|j| Json(j.report()))
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no job {id}")))
}

#[derive(Deserialize)]
struct FolderQuery {
    folder: Option<String>,
}

async fn list_messages(
    State(state): State<Arc<AdminState>>,
    Path(address): Path<String>,
    Query(query): Query<FolderQuery>,
) -> Result<Json<Vec<mailroom_store::MessageSummary>>, ApiError> {
    let recipient = find_recipient(&state, &address)?;
    let folder = query.folder.unwrap_or_else(|| "INBOX".into());
    let store = state.store.clone();
    Ok(Json(
        blocking(move || store.mailbox_messages(recipient.id, &folder)).await?,
    ))
}

async fn raw_message(
    State(state): State<Arc<AdminState>>,
    Path((address, uid)): Path<(String, u32)>,
    Query(query): Query<FolderQuery>,
) -> Result<Response, ApiError> {
    let recipient = find_recipient(&state, &address)?;
    let folder = query.folder.unwrap_or_else(|| "INBOX".into());
    let store = state.store.clone();
    let raw = blocking(move || store.message_raw(recipient.id, &folder, uid))
        .await?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no message with UID {uid}")))?;
    Ok(([(header::CONTENT_TYPE, "message/rfc822")], Body::from(raw)).into_response())
}

/// One queue in `GET /api/v1/queues`.
#[derive(Debug, Serialize, Deserialize)]
pub struct QueueReport {
    /// Depth, bytes and oldest entry.
    #[serde(flatten)]
    pub summary: QueueSummary,
    /// Age of the oldest entry in seconds.
    pub oldest_age_seconds: Option<f64>,
}

/// The body of `GET /api/v1/queues`.
#[derive(Debug, Serialize, Deserialize)]
pub struct QueuesReport {
    /// Every queue.
    pub queues: Vec<QueueReport>,
    /// Quarantined messages with their reasons.
    pub quarantine: Vec<mailroom_store::QueueItemInfo>,
}

async fn queues(State(state): State<Arc<AdminState>>) -> Result<Json<QueuesReport>, ApiError> {
    let store = state.store.clone();
    let (summaries, quarantine) = blocking(move || {
        Ok((
            store.queue_summaries()?,
            store.queue_items(Some(QueueName::Quarantine), None, 1000)?,
        ))
    })
    .await?;
    let now = now_ms();
    let queues = summaries
        .into_iter()
        .map(|summary| QueueReport {
            oldest_age_seconds: summary
                .oldest_received_at_ms
                .map(|t| (now - t).max(0) as f64 / 1000.0),
            summary,
        })
        .collect();
    Ok(Json(QueuesReport { queues, quarantine }))
}

/// A page of a queue: at most `limit` entries (default 1,000, at most 100,000) after the
/// entry whose `id` is `after`.
#[derive(Deserialize)]
struct LimitQuery {
    limit: Option<u32>,
    after: Option<i64>,
}

async fn queue_items(
    State(state): State<Arc<AdminState>>,
    Path(queue): Path<String>,
    Query(query): Query<LimitQuery>,
) -> Result<Json<Vec<mailroom_store::QueueItemInfo>>, ApiError> {
    let name = QueueName::parse(&queue).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no queue {queue:?}; queues are inbound, outbound, quarantine, undeliverable"),
        )
    })?;
    let limit = query.limit.unwrap_or(1000).min(100_000);
    let store = state.store.clone();
    Ok(Json(
        blocking(move || store.queue_items(Some(name), query.after, limit)).await?,
    ))
}

/// `GET /api/v1/queue?queue=&state=&destination=&sender=&recipient=&older_than_secs=&after=&limit=`
#[derive(Debug, Deserialize)]
struct FilterQuery {
    queue: Option<String>,
    state: Option<String>,
    destination: Option<String>,
    sender: Option<String>,
    recipient: Option<String>,
    older_than_secs: Option<i64>,
    after: Option<i64>,
    limit: Option<u32>,
}

async fn queue_filter(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<FilterQuery>,
) -> Result<Json<Vec<mailroom_store::QueueItemInfo>>, ApiError> {
    let queue = match &query.queue {
        None => None,
        Some(q) => Some(QueueName::parse(q).ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("no queue {q:?}; queues are inbound, outbound, quarantine, undeliverable"),
            )
        })?),
    };
    if let Some(s) = &query.state
        && !["held", "deferred", "active"].contains(&s.as_str())
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("no state {s:?}; states are held, deferred, active"),
        ));
    }
    let filter = mailroom_store::QueueFilter {
        queue,
        state: query.state,
        destination: query.destination,
        sender: query.sender,
        recipient: query.recipient,
        older_than_ms: query.older_than_secs.map(|s| s * 1000),
        after: query.after,
        limit: query.limit,
    };
    let store = state.store.clone();
    let now = state.outbound.clock().now_ms();
    Ok(Json(
        blocking(move || store.queue_filter(&filter, now)).await?,
    ))
}

fn no_entry(id: i64) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no queue entry {id}"))
}

fn action_error(id: i64, e: mailroom_store::QueueActionError) -> ApiError {
    match e {
        mailroom_store::QueueActionError::NotFound => no_entry(id),
        mailroom_store::QueueActionError::Busy => ApiError(
            StatusCode::CONFLICT,
            format!("queue entry {id} is being worked on right now; try again in a moment"),
        ),
    }
}

async fn queue_item(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<i64>,
) -> Result<Json<mailroom_store::QueueItemInfo>, ApiError> {
    let store = state.store.clone();
    blocking(move || store.queue_item(id))
        .await?
        .map(Json)
        .ok_or_else(|| no_entry(id))
}

/// The header naming who acts through the API, for the trail's "admin" events: the CLI
/// sends `cli:USER` (the operating-system user); a script may send its own name.
pub const ACTOR_HEADER: &str = "x-mailroom-actor";

/// Who asked for an action: the actor header (printable ASCII, at most 100 characters),
/// or "api" (the token's holder) without one.
fn actor(headers: &HeaderMap) -> String {
    headers
        .get(ACTOR_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .take(100)
                .collect::<String>()
        })
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "api".to_string())
}

async fn queue_retry(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Result<Json<mailroom_store::QueueItemInfo>, ApiError> {
    let store = state.store.clone();
    let now = state.outbound.clock().now_ms();
    let by = actor(&headers);
    let before = blocking({
        let store = store.clone();
        move || store.queue_item(id)
    })
    .await?;
    blocking(move || store.retry_now(id, now, &by))
        .await?
        .map_err(|e| action_error(id, e))?;
    acted(state, id, before, |item| item.next_attempt_at_ms = now).await
}

/// The answer to a retry or a release, which succeeded: the entry as it is now, read
/// before the delivery worker is woken; or, when a worker took it and finished it
/// meanwhile (it was due at once), the entry as it was with the change applied. Why:
/// a release whose entry was delivered before the answer was read used to answer
/// 404 "no queue entry" although it had worked (seen in the outbound test under load).
async fn acted(
    state: Arc<AdminState>,
    id: i64,
    before: Option<mailroom_store::QueueItemInfo>,
    change: impl FnOnce(&mut mailroom_store::QueueItemInfo),
) -> Result<Json<mailroom_store::QueueItemInfo>, ApiError> {
    let store = state.store.clone();
    let now = blocking(move || store.queue_item(id)).await?;
    state.outbound.wake();
    match (now, before) {
        (Some(now), _) => Ok(Json(now)),
        (None, Some(mut before)) => {
            change(&mut before);
            Ok(Json(before))
        }
        (None, None) => Err(no_entry(id)),
    }
}

async fn queue_hold(
    state: State<Arc<AdminState>>,
    id: Path<i64>,
    headers: HeaderMap,
) -> Result<Json<mailroom_store::QueueItemInfo>, ApiError> {
    set_held(state, id, true, actor(&headers)).await
}

async fn queue_release(
    state: State<Arc<AdminState>>,
    id: Path<i64>,
    headers: HeaderMap,
) -> Result<Json<mailroom_store::QueueItemInfo>, ApiError> {
    set_held(state, id, false, actor(&headers)).await
}

/// Holds or releases an entry; a release wakes the delivery workers.
async fn set_held(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<i64>,
    held: bool,
    by: String,
) -> Result<Json<mailroom_store::QueueItemInfo>, ApiError> {
    let store = state.store.clone();
    let before = blocking({
        let store = store.clone();
        move || store.queue_item(id)
    })
    .await?;
    blocking(move || store.set_held(id, held, &by))
        .await?
        .map_err(|e| action_error(id, e))?;
    acted(state, id, before, |item| item.held = held).await
}

#[derive(Debug, Deserialize)]
struct DeleteQuery {
    /// Send the sender a failure DSN for the recipients still pending.
    #[serde(default)]
    dsn: bool,
}

async fn queue_delete(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<i64>,
    Query(query): Query<DeleteQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = state.store.clone();
    let item = blocking(move || store.claim_one(id))
        .await?
        .map_err(|e| action_error(id, e))?;
    let handle = state.outbound.clone();
    let by = actor(&headers);
    let notices = tokio::task::spawn_blocking(move || handle.delete(item, query.dsn, &by))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    Ok(Json(serde_json::json!({"deleted": id, "notices": notices})))
}

/// `GET /api/v1/track?message_id=&sender=&recipient=&queue_id=&since_ms=&limit=`: the
/// trails of the matching messages (newest message first), every event an object with
/// an `event` field.
async fn track(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<mailroom_store::TrackQuery>,
) -> Result<Json<Vec<mailroom_store::TrackEvent>>, ApiError> {
    let store = state.store.clone();
    Ok(Json(blocking(move || store.track(&query)).await?))
}

async fn show_transfer_mode(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"mode": state.transfer.get()}))
}

#[derive(Debug, Deserialize)]
struct ModeBody {
    mode: mailroom_queue::TransferMode,
}

async fn set_transfer_mode(
    State(state): State<Arc<AdminState>>,
    Json(body): Json<ModeBody>,
) -> Json<serde_json::Value> {
    state.transfer.set(body.mode);
    tracing::info!(mode = ?body.mode, "transfer mode changed");
    Json(serde_json::json!({"mode": state.transfer.get()}))
}

#[derive(Debug, Deserialize)]
struct AdvanceBody {
    secs: u64,
}

async fn advance_clock(
    State(state): State<Arc<AdminState>>,
    Json(body): Json<AdvanceBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !state.test_clock {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "the delivery clock can only be moved when outbound.test_clock = true (tests)".into(),
        ));
    }
    state
        .outbound
        .clock()
        .advance(std::time::Duration::from_secs(body.secs));
    state.outbound.wake();
    Ok(Json(
        serde_json::json!({"now_ms": state.outbound.clock().now_ms()}),
    ))
}
