//! Mailroom's web admin: the pages an administrator opens in a browser, served by the
//! admin listener at `/` beside the API (`/api/v1`), `/health` and `/metrics`.
//!
//! Why server-rendered (maud) with a little plain JavaScript: one binary, no front-end
//! build, pages that work without JavaScript and from the keyboard; scripts only draw
//! the dashboard's charts and follow live progress through server-sent events.
//!
//! Security: sign-in at `/login` with a mailbox that has the administrator role (its
//! address or alias and its password), counted by the same login limiter as IMAP and
//! POP3; a session cookie that is HttpOnly, SameSite=Strict and Secure under TLS; a
//! CSRF token in every form, checked before any change; and a Host-header check on
//! every page (a page answered under a foreign name is how DNS rebinding reaches a
//! loopback listener). Changes go through the same directory writer and store calls as
//! the API; queue actions are recorded on the message's trail with who did them.

mod pages;
pub mod recent;
pub mod session;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use mailroom_admin::AdminState;
use mailroom_directory::login::{LoginLimiter, Verifier};
use session::{Session, Sessions};
use std::net::SocketAddr;
use std::sync::Arc;

/// What the pages need.
pub struct WebState {
    /// The API's state: store, directory, jobs, watchdog, outbound handle.
    pub admin: Arc<AdminState>,
    /// Failed sign-ins count here, with IMAP's and POP3's.
    pub limiter: Arc<LoginLimiter>,
    /// Password checks on their own threads.
    pub verifier: Arc<Verifier>,
    /// Host header values the pages answer to (`host:port`, or a name for any port).
    pub hosts: Vec<String>,
    /// This listener is HTTPS: cookies are marked Secure, and passwords are welcome.
    pub tls: bool,
    /// Where passwords may come over plain HTTP (`login.plaintext_auth`).
    pub plaintext: mailroom_directory::login::Plaintext,
    /// Signed-in administrators (shared by the HTTP and HTTPS listeners).
    pub sessions: Arc<Sessions>,
    /// The last warnings and errors logged.
    pub recent: recent::RecentLog,
}

/// Largest form body accepted (everything but imports).
const FORM_BODY_MAX: usize = 256 * 1024;

/// The pages, to be merged with the API's router.
pub fn router(state: Arc<WebState>) -> Router {
    let signed_in = Router::new()
        .route("/", get(pages::dashboard))
        .route("/events/dashboard", get(pages::dashboard_events))
        .route("/queues", get(pages::queues))
        .route("/queues/{id}/{action}", post(pages::queue_action))
        .route("/track", get(pages::track))
        .route("/track/{queue_id}", get(pages::track_one))
        .route("/directory", get(pages::directory))
        .route(
            "/directory/new",
            get(pages::new_recipient).post(pages::create_recipient),
        )
        .route(
            "/directory/recipient/{alias}",
            get(pages::recipient).post(pages::save_recipient),
        )
        .route("/directory/site", get(pages::site).post(pages::save_site))
        .route("/import", get(pages::import).post(pages::upload))
        .route("/import/{id}", get(pages::import_job))
        .route("/events/job/{id}", get(pages::job_events))
        .route("/routing", get(pages::routing))
        .route("/status", get(pages::status))
        .route("/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(state.clone(), signed_in));
    Router::new()
        .route("/login", get(pages::login_form).post(login))
        .route("/assets/{name}", get(pages::asset))
        .merge(signed_in)
        .route_layer(middleware::from_fn_with_state(state.clone(), check_host))
        .with_state(state)
}

/// The Host-header check: pages answer only under the names they were given.
async fn check_host(State(state): State<Arc<WebState>>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !session::host_allowed(host, &state.hosts) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this server does not answer to the name {host:?}; open it as one of: {} \
                 (admin.web_hosts in the config adds names)",
                state.hosts.join(", ")
            ),
        )
            .into_response();
    }
    next.run(request).await
}

/// Pages need a session; every POST needs the session's CSRF token (form field
/// `csrf`; the import's multipart form is checked by its handler).
async fn signed_in(State(state): State<Arc<WebState>>, request: Request, next: Next) -> Response {
    let session = request
        .headers()
        .get(header::COOKIE)
        .and_then(|c| c.to_str().ok())
        .and_then(|c| session::cookie(c, session::SESSION_COOKIE))
        .and_then(|id| state.sessions.get(id));
    let Some(session) = session else {
        if request.method() == Method::GET {
            let path = request.uri().path().to_string();
            return Redirect::to(&format!("/login?next={}", pages::query_escape(&path)))
                .into_response();
        }
        return (
            StatusCode::UNAUTHORIZED,
            "sign in first (at /login); nothing was changed",
        )
            .into_response();
    };
    let (mut parts, body) = request.into_parts();
    // Only the import's upload is multipart; its handler checks the token (it comes
    // first in the form) before it reads anything else. Multipart anywhere else would
    // get past the check below, so it is refused.
    let upload = parts.method == Method::POST && parts.uri.path() == "/import";
    if parts.method == Method::POST && is_multipart(&parts.headers) && !upload {
        return csrf_refusal();
    }
    let body = if parts.method == Method::POST && !upload {
        let bytes = match axum::body::to_bytes(body, FORM_BODY_MAX).await {
            Ok(bytes) => bytes,
            Err(_) => {
                return (StatusCode::PAYLOAD_TOO_LARGE, "the form is too large").into_response();
            }
        };
        let token = session::form_field(&bytes, "csrf").unwrap_or_default();
        if !session::same_secret(&token, &session.csrf) {
            return csrf_refusal();
        }
        Body::from(bytes)
    } else {
        body
    };
    parts.extensions.insert(session);
    next.run(Request::from_parts(parts, body)).await
}

fn is_multipart(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"))
}

/// The answer to a form without the right CSRF token.
pub(crate) fn csrf_refusal() -> Response {
    (
        StatusCode::FORBIDDEN,
        "the form's security token is missing or stale (reload the page and try again); \
         nothing was changed",
    )
        .into_response()
}

/// `POST /login`: username (address or alias) and password of a mailbox with the
/// administrator role.
async fn login(
    State(state): State<Arc<WebState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let cookie_token = request
        .headers()
        .get(header::COOKIE)
        .and_then(|c| c.to_str().ok())
        .and_then(|c| session::cookie(c, session::LOGIN_COOKIE))
        .map(str::to_string);
    let Ok(body) = axum::body::to_bytes(request.into_body(), FORM_BODY_MAX).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "the form is too large").into_response();
    };
    let field = |name| session::form_field(&body, name).unwrap_or_default();
    let (username, password, next) = (field("username"), field("password"), field("next"));
    match cookie_token {
        Some(token) if session::same_secret(&token, &field("csrf")) => {}
        _ => return csrf_refusal(),
    }
    let refused = |status: StatusCode, why: &str| {
        pages::login_page(&state, status, Some(why), &username, &next)
    };
    if !state.plaintext.allows(peer.ip(), state.tls) {
        return refused(
            StatusCode::FORBIDDEN,
            "passwords are accepted only over HTTPS from other machines: open the web admin \
             on the admin listener's HTTPS address (admin.tls_listen)",
        );
    }
    let attempt = match state.limiter.begin(peer.ip(), &username).await {
        Ok(attempt) => attempt,
        Err(e) => return refused(StatusCode::TOO_MANY_REQUESTS, &e.to_string()),
    };
    let snapshot = state.admin.directory.snapshot();
    let recipient = match mailroom_directory::login::check_password(
        &snapshot,
        &username,
        password,
        &state.verifier,
    )
    .await
    {
        Ok(recipient) => recipient,
        Err(mailroom_directory::login::LoginError::Invalid) => {
            attempt.failed();
            tracing::info!(%peer, user = %username, "web admin sign-in refused");
            return refused(StatusCode::UNAUTHORIZED, "invalid user name or password");
        }
        Err(e) => {
            attempt.void();
            return refused(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
        }
    };
    if !recipient.admin {
        attempt.void();
        tracing::info!(%peer, user = %username, "web admin sign-in by a non-administrator");
        return refused(
            StatusCode::FORBIDDEN,
            "this mailbox is not an administrator (mailroom recipient role ADDRESS admin)",
        );
    }
    attempt.succeeded();
    let user = recipient
        .primary_address()
        .unwrap_or(&recipient.alias)
        .to_string();
    tracing::info!(%peer, %user, "web admin sign-in");
    let id = state.sessions.create(&user);
    let target = if local_path(&next) {
        next
    } else {
        "/".to_string()
    };
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, target)
        .header(
            header::SET_COOKIE,
            session::set_cookie(session::SESSION_COOKIE, &id, state.tls, None),
        )
        .header(
            header::SET_COOKIE,
            session::set_cookie(session::LOGIN_COOKIE, "", state.tls, Some(0)),
        )
        .body(Body::empty())
        .expect("a valid response")
}

/// Whether `next` (after sign-in) is a path on this server: `/x`, never `//host` or
/// `/\\host` (browsers read both as another host: an open redirect).
fn local_path(next: &str) -> bool {
    let mut chars = next.chars();
    chars.next() == Some('/')
        && !matches!(chars.next(), Some('/' | '\\'))
        && !next.chars().any(|c| c.is_control())
}

/// `POST /logout`.
async fn logout(State(state): State<Arc<WebState>>, request: Request) -> Response {
    if let Some(id) = request
        .headers()
        .get(header::COOKIE)
        .and_then(|c| c.to_str().ok())
        .and_then(|c| session::cookie(c, session::SESSION_COOKIE))
    {
        state.sessions.remove(id);
    }
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, "/login")
        .header(
            header::SET_COOKIE,
            session::set_cookie(session::SESSION_COOKIE, "", state.tls, Some(0)),
        )
        .body(Body::empty())
        .expect("a valid response")
}

/// The signed-in administrator, as the middleware found them.
pub(crate) type Signed = axum::Extension<Session>;

#[cfg(test)]
mod tests {
    #[test]
    fn after_sign_in_only_paths_here_are_followed() {
        assert!(super::local_path("/queues?queue=outbound"));
        for foreign in [
            "//evil.example/",
            "/\\evil.example",
            "https://evil.example",
            "",
            "/\n",
        ] {
            assert!(!super::local_path(foreign), "{foreign:?}");
        }
    }
}
