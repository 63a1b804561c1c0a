//! `mailroom serve` as its own process, for the tests that need what only a process
//! has: its own log output (on a filesystem that fills), an LD_PRELOAD fault injector,
//! kill -9 and restart on the same data folder.

use mailroom::client::AdminClient;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to start the server.
#[derive(Default)]
pub struct Spawn {
    /// The data folder.
    pub data: PathBuf,
    /// A config file's text (written next to the data folder).
    pub config: Option<String>,
    /// Where the server's log (stderr) goes; `None`: inherited.
    pub log: Option<PathBuf>,
    /// Connect stderr to a pipe nobody reads (it fills after 64 KiB).
    pub log_unread: bool,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// A command to run the binary under (`fiu-run -x ...`).
    pub wrapper: Vec<String>,
}

/// A running server process.
pub struct Process {
    pub child: Child,
    pub smtp: SocketAddr,
    pub imap: SocketAddr,
    /// IMAP over implicit TLS.
    pub imaps: SocketAddr,
    pub pop3: SocketAddr,
    pub admin: String,
    /// The postmaster's password, printed at the first start only.
    pub password: Option<String>,
    pub data: PathBuf,
    /// Lines printed on stdout after start-up (shutdown messages), collected by a thread.
    pub rest: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary under test (`MAILROOM_TEST_BIN` or this build's).
pub fn binary() -> String {
    std::env::var("MAILROOM_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_mailroom").into())
}

impl Spawn {
    /// `mailroom serve` on `data` with ephemeral ports and log level `log`.
    pub fn at(data: &Path, log: &str) -> Spawn {
        Spawn {
            data: data.to_path_buf(),
            env: vec![("MAILROOM_LOG".into(), log.into())],
            ..Spawn::default()
        }
    }

    /// Starts the server and waits until it prints its addresses.
    pub fn start(&self) -> Process {
        let mut args: Vec<String> = self.wrapper.clone();
        args.push(binary());
        args.extend(
            [
                "serve",
                "--domain",
                "example.test",
                "--smtp",
                "127.0.0.1:0",
                "--imap",
                "127.0.0.1:0",
                "--imaps",
                "127.0.0.1:0",
                "--submission",
                "127.0.0.1:0",
                "--smtps",
                "127.0.0.1:0",
                "--pop3",
                "127.0.0.1:0",
                "--pop3s",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--data",
            ]
            .map(String::from),
        );
        args.push(self.data.to_str().unwrap().into());
        if let Some(config) = &self.config {
            let path = self.data.with_extension("toml");
            std::fs::write(&path, config).unwrap();
            args.push("--config".into());
            args.push(path.to_str().unwrap().into());
        }
        let mut command = Command::new(&args[0]);
        command.args(&args[1..]).stdout(Stdio::piped());
        match &self.log {
            _ if self.log_unread => {
                command.stderr(Stdio::piped());
            }
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap();
                command.stderr(file);
            }
            None => {
                command.stderr(Stdio::inherit());
            }
        }
        for (k, v) in &self.env {
            command.env(k, v);
        }
        // The postmaster's password is printed after the other lines, at the first start.
        let first_start = !self.data.join("mailroom.db").exists();
        let mut child = command.spawn().expect("the binary starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut smtp, mut imap, mut imaps, mut pop3, mut admin, mut password) =
            (None, None, None, None, None, None);
        for line in lines.by_ref() {
            let line = line.unwrap();
            let field = |name: &str| -> Option<SocketAddr> {
                line.trim()
                    .strip_prefix(name)
                    .map(|a| a.trim().parse().unwrap())
            };
            smtp = smtp.or(field("SMTP:"));
            imap = imap.or(field("IMAP:"));
            imaps = imaps.or(field("IMAPS:"));
            pop3 = pop3.or(field("POP3:"));
            if let Some(rest) = line.trim().strip_prefix("admin API:") {
                admin = rest.split_whitespace().next().map(str::to_string);
            }
            if let Some(rest) = line.split("with password ").nth(1) {
                password = rest.split_whitespace().next().map(str::to_string);
            }
            if password.is_some() || (!first_start && line.trim().starts_with("directory:")) {
                break;
            }
        }
        // Keep reading stdout so the server never blocks on a full pipe.
        let rest = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = rest.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Process {
            child,
            smtp: smtp.expect("SMTP address printed"),
            imap: imap.expect("IMAP address printed"),
            imaps: imaps.expect("IMAPS address printed"),
            pop3: pop3.expect("POP3 address printed"),
            admin: admin.expect("admin address printed"),
            password,
            data: self.data.clone(),
            rest,
        }
    }
}

impl Process {
    /// The admin API client (its token is in the data folder).
    pub fn client(&self) -> AdminClient {
        AdminClient::from_data_dir(&self.data).expect("admin credentials in the data folder")
    }

    /// `GET /health` (200 or 503) as JSON.
    pub fn health(&self) -> serde_json::Value {
        let response = match ureq::get(&format!("{}/health", self.admin)).call() {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(e) => panic!("GET /health: {e}"),
        };
        response.into_json().expect("health is JSON")
    }

    /// `GET /metrics` as text.
    pub fn metrics(&self) -> String {
        ureq::get(&format!("{}/metrics", self.admin))
            .call()
            .expect("metrics")
            .into_string()
            .unwrap()
    }

    /// The value of the first sample of `name` (with `labels` in its label set).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| {
                l.split([' ', '{']).next() == Some(name)
                    && (labels.is_empty() || l.contains(labels))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// SIGKILL and wait.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}

/// A tmpfs of a fixed size mounted on a temporary folder (root only), unmounted on drop.
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts it; `None` when this machine does not allow it (not root), unless
    /// `MAILROOM_FAULT_TESTS=required` (CI), which makes that a failure.
    pub fn mount(size_mib: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(Tmpfs { dir });
        }
        fault_tests_unavailable("mounting a tmpfs needs root");
        None
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Says why a fault test cannot run here; fails when CI requires it to run.
pub fn fault_tests_unavailable(why: &str) {
    if std::env::var("MAILROOM_FAULT_TESTS").as_deref() == Ok("required") {
        panic!("fault test cannot run: {why} (MAILROOM_FAULT_TESTS=required)");
    }
    eprintln!("SKIPPED: {why}; set up as .ci/run does to run this fault test");
}
