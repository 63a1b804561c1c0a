//! The admin API client behind the CLI's subcommands.
//!
//! It finds a local server through the data folder (`admin.url`, `admin.token`, written
//! by `serve` with owner-only permissions), or a remote one with `--server` and `--token`.

use crate::server::{ADMIN_TOKEN_FILE, ADMIN_URL_FILE};
use anyhow::{Context, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::Path;

/// A client of one server's admin API. Clones share one connection pool: requests
/// reuse kept-alive connections (`ureq::get` and friends build a new agent, and so a
/// new TCP connection, for every request; a CLI command that polls a job's progress,
/// or the stress's readers at thousands of requests a second, paid an accept each).
#[derive(Clone)]
pub struct AdminClient {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl AdminClient {
    /// A client for the API at `base` (e.g. `http://127.0.0.1:8025`).
    pub fn new(base: &str, token: &str) -> AdminClient {
        AdminClient {
            base: base.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
            agent: ureq::AgentBuilder::new().build(),
        }
    }

    /// A client for the server whose data folder is `dir`.
    pub fn from_data_dir(dir: &Path) -> anyhow::Result<AdminClient> {
        let url = std::fs::read_to_string(dir.join(ADMIN_URL_FILE)).with_context(|| {
            format!(
                "no running Mailroom found in the data folder {} (is `mailroom serve` running? \
                 use --data DIR, or --server URL --token T)",
                dir.display()
            )
        })?;
        let token = std::fs::read_to_string(dir.join(ADMIN_TOKEN_FILE))
            .with_context(|| format!("cannot read {} in {}", ADMIN_TOKEN_FILE, dir.display()))?;
        Ok(AdminClient::new(url.trim(), &token))
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{}", self.base, path)
    }

    /// A request under `/api/v1` with the token, naming the operating-system user as
    /// the actor the trail records for queue actions (`cli:USER`).
    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let user = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata("/proc/self")
                    .map_or("unknown".to_string(), |m| format!("uid {}", m.uid()))
            });
        self.agent
            .request(method, &self.url(path))
            .set("Authorization", &format!("Bearer {}", self.token))
            .set("X-Mailroom-Actor", &format!("cli:{user}"))
    }

    fn answer<T: DeserializeOwned>(
        &self,
        result: Result<ureq::Response, ureq::Error>,
    ) -> anyhow::Result<T> {
        match result {
            Ok(response) => Ok(response.into_json()?),
            Err(ureq::Error::Status(code, response)) => {
                let body: serde_json::Value = response.into_json().unwrap_or_default();
                let message = body["error"].as_str().unwrap_or("no details").to_string();
                bail!("the server refused ({code}): {message}")
            }
            Err(e) => bail!(
                "cannot reach the Mailroom admin API at {}: {e} (is `mailroom serve` running?)",
                self.base
            ),
        }
    }

    /// `GET /health`: the report whether healthy (200) or not (503).
    pub fn health(&self) -> anyhow::Result<serde_json::Value> {
        match self.agent.get(&format!("{}/health", self.base)).call() {
            Ok(response) => Ok(response.into_json()?),
            Err(ureq::Error::Status(503, response)) => Ok(response.into_json()?),
            Err(e) => bail!("cannot reach {}/health: {e}", self.base),
        }
    }

    /// The server's `/metrics` (OpenMetrics text).
    pub fn metrics(&self) -> anyhow::Result<String> {
        match self.agent.get(&format!("{}/metrics", self.base)).call() {
            Ok(response) => Ok(response.into_string()?),
            Err(e) => bail!("cannot reach {}/metrics: {e}", self.base),
        }
    }

    /// GET a JSON resource under `/api/v1`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let request = self.request("GET", path);
        self.answer(request.call())
    }

    /// PATCH a resource under `/api/v1` with a JSON body.
    pub fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let request = self.request("PATCH", path);
        self.answer(request.send_json(body))
    }

    /// DELETE a resource under `/api/v1`.
    pub fn delete(&self, path: &str) -> anyhow::Result<()> {
        let request = self.request("DELETE", path);
        match request.call() {
            Ok(_) => Ok(()),
            Err(e) => self.answer::<serde_json::Value>(Err(e)).map(|_| ()),
        }
    }

    /// POST a JSON body and ignore an empty answer.
    pub fn post_no_content<B: Serialize>(&self, path: &str, body: &B) -> anyhow::Result<()> {
        let request = self.request("POST", path);
        match request.send_json(body) {
            Ok(_) => Ok(()),
            Err(e) => self.answer::<serde_json::Value>(Err(e)).map(|_| ()),
        }
    }

    /// POST a stream (a file being imported) to a resource under `/api/v1`.
    pub fn post_stream<T: DeserializeOwned>(
        &self,
        path: &str,
        body: impl std::io::Read,
    ) -> anyhow::Result<T> {
        let request = self
            .request("POST", path)
            .set("Content-Type", "application/octet-stream");
        self.answer(request.send(body))
    }

    /// GET a text resource under `/api/v1`.
    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let request = self.request("GET", path);
        match request.call() {
            Ok(response) => Ok(response.into_string()?),
            Err(e) => self
                .answer::<serde_json::Value>(Err(e))
                .map(|_| String::new()),
        }
    }

    /// POST a JSON body to a resource under `/api/v1`.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let request = self.request("POST", path);
        self.answer(request.send_json(body))
    }
}

/// Percent-encodes one URL path segment (addresses may hold any character).
pub fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~@+".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
