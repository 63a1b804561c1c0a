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
use axum::routing::{get, post};
use axum::{Json, Router};
use mailroom_directory::{Change, Directory, DirectoryError, Recipient, hash_password};
use mailroom_store::{MailStore, QueueName, QueueSummary};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};
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
            DirectoryError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
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
        .map_err(internal)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The router with every route.
pub fn router(state: Arc<AdminState>) -> Router {
    let api = Router::new()
        .route("/recipients", get(list_recipients).post(create_recipient))
        .route("/recipients/{address}", get(show_recipient))
        .route("/recipients/{address}/password", post(set_password))
        .route("/mailboxes/{address}/messages", get(list_messages))
        .route("/mailboxes/{address}/messages/{uid}/raw", get(raw_message))
        .route("/queues", get(queues))
        .route("/queues/{queue}/items", get(queue_items))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .nest("/api/v1", api)
        .with_state(state)
}

/// Serves the API on `listener` until `cancel` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AdminState>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
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

#[derive(Serialize)]
struct HealthReport {
    status: &'static str,
    organization: String,
    site: String,
    server: String,
    directory_generation: u64,
    recipients: usize,
    queues: Vec<QueueSummary>,
}

async fn health(State(state): State<Arc<AdminState>>) -> Result<Json<HealthReport>, ApiError> {
    let store = state.store.clone();
    let queues = blocking(move || store.queue_summaries()).await?;
    let snapshot = state.directory.snapshot();
    let topology = snapshot.topology().clone();
    Ok(Json(HealthReport {
        status: "ok",
        organization: topology.organization,
        site: topology.site,
        server: topology.server,
        directory_generation: snapshot.generation(),
        recipients: snapshot.len(),
        queues,
    }))
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Result<Response, ApiError> {
    let store = state.store.clone();
    let summaries = blocking(move || store.queue_summaries()).await?;
    state.queue_gauges.update(&summaries, now_ms());
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

async fn list_recipients(State(state): State<Arc<AdminState>>) -> Json<Vec<Recipient>> {
    let snapshot = state.directory.snapshot();
    let mut recipients: Vec<Recipient> = snapshot.recipients().map(|r| (**r).clone()).collect();
    recipients.sort_by(|a, b| a.primary_address.cmp(&b.primary_address));
    Json(recipients)
}

fn find_recipient(state: &AdminState, address: &str) -> Result<Arc<Recipient>, ApiError> {
    state
        .directory
        .snapshot()
        .by_address(address)
        .cloned()
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no recipient has the address {address}"),
            )
        })
}

async fn show_recipient(
    State(state): State<Arc<AdminState>>,
    Path(address): Path<String>,
) -> Result<Json<Recipient>, ApiError> {
    Ok(Json((*find_recipient(&state, &address)?).clone()))
}

/// The body of `POST /api/v1/recipients`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewRecipientRequest {
    /// Primary SMTP address.
    pub address: String,
    /// Display name.
    #[serde(default)]
    pub display_name: String,
    /// Mailbox name; defaults to the address's local part.
    #[serde(default)]
    pub alias: Option<String>,
    /// More addresses delivering to the same mailbox.
    #[serde(default)]
    pub secondary_addresses: Vec<String>,
    /// Initial password, if any.
    #[serde(default)]
    pub password: Option<String>,
}

async fn create_recipient(
    State(state): State<Arc<AdminState>>,
    Json(request): Json<NewRecipientRequest>,
) -> Result<(StatusCode, Json<Recipient>), ApiError> {
    let password_hash = match request.password {
        Some(password) => Some(
            tokio::task::spawn_blocking(move || hash_password(&password))
                .await
                .map_err(internal)?,
        ),
        None => None,
    };
    let recipient = state
        .directory
        .apply(Change::CreateMailbox {
            address: request.address,
            display_name: request.display_name,
            alias: request.alias,
            secondary_addresses: request.secondary_addresses,
            password_hash,
        })
        .await?;
    Ok((StatusCode::CREATED, Json((*recipient).clone())))
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
            store.queue_items(Some(QueueName::Quarantine), 1000)?,
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

#[derive(Deserialize)]
struct LimitQuery {
    limit: Option<u32>,
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
        blocking(move || store.queue_items(Some(name), limit)).await?,
    ))
}
