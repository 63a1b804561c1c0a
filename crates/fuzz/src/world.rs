//! The server the session targets talk to: a real SQLite store in a temporary folder,
//! a real directory with a few recipients, and the IMAP and POP3 servers built on them,
//! driven over in-memory byte streams (the same `handle` the TCP listeners call).
//!
//! Built once per process: a fuzzer runs millions of inputs and cannot open a database
//! for each. Inputs change the mailbox (APPEND, EXPUNGE, CREATE ...); [`World::reset`]
//! puts it back when it has drifted, so one input's effect does not pile up forever.

use argon2::{Algorithm, Argon2, Params, PasswordHasher, Version};
use mailroom_directory::login::{LoginLimiter, LoginLimits, Verifier};
use mailroom_directory::routing::{AddressSpace, Connector, ConnectorKind};
use mailroom_directory::{Change, Directory, RecipientFields, RecipientKind, SiteConfig};
use mailroom_imap::{ImapConfig, ImapServer, ImapStats, Plaintext};
use mailroom_pop3::{Pop3Config, Pop3Server, Pop3Stats};
use mailroom_store::{MailStore, SqliteStore, Topology};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The mail domain of the fuzz world.
pub const DOMAIN: &str = "fuzz.test";
/// The mailbox the session targets log in as.
pub const USER: &str = "fuzz";
/// Its password.
pub const PASSWORD: &str = "secret";

/// Messages put into INBOX at the start (and after a reset): a plain one, a multipart
/// one with an attachment and an encoded subject, a message/rfc822 inside a multipart.
pub const SEED_MESSAGES: &[&[u8]] = &[
    b"From: Alice <alice@remote.test>\r\nTo: fuzz@fuzz.test\r\nSubject: hello\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@remote.test>\r\n\r\nHello there.\r\n",
    b"From: =?utf-8?q?B=C3=B6b?= <bob@remote.test>\r\nTo: fuzz@fuzz.test, team@fuzz.test\r\nCc: ext@fuzz.test\r\nSubject: =?utf-8?b?w6lsw6hz?=\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npreamble\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n--b1\r\nContent-Type: application/octet-stream; name=\"a.bin\"\r\nContent-Disposition: attachment; filename=\"a.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAwQFBgcICQ==\r\n--b1--\r\n",
    b"From: carol@remote.test\r\nSubject: fwd\r\nContent-Type: multipart/mixed; boundary=\"x\"\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nsee below\r\n--x\r\nContent-Type: message/rfc822\r\n\r\nFrom: dave@remote.test\r\nSubject: inner\r\nContent-Type: multipart/alternative; boundary=\"y\"\r\n\r\n--y\r\nContent-Type: text/plain\r\n\r\ninner text\r\n--y\r\nContent-Type: text/html\r\n\r\n<p>inner</p>\r\n--y--\r\n--x--\r\n",
];

/// One process's fuzz world; see the module documentation.
pub struct World {
    /// Runs the sessions (one thread; blocking store calls go to its blocking pool).
    pub runtime: tokio::runtime::Runtime,
    /// The directory (a real writer thread over the real store).
    pub directory: Directory,
    /// The store.
    pub store: Arc<dyn MailStore>,
    /// The IMAP server, as the listener would call it.
    pub imap: Arc<ImapServer>,
    /// The POP3 server, as the listener would call it.
    pub pop3: Arc<Pop3Server>,
    /// The fuzz mailbox's recipient id.
    pub user_id: i64,
    /// Where a session's peer appears to be (loopback: plaintext logins allowed).
    pub peer: SocketAddr,
    _folder: tempfile::TempDir,
}

/// A password hash with the cheapest Argon2 parameters, so a login costs microseconds
/// and the fuzzer spends its time in the protocol (verification reads the parameters
/// from the hash, so the server's code path is the real one).
fn cheap_hash(password: &str) -> String {
    let params = Params::new(8, 1, 1, None).expect("valid Argon2 parameters");
    let salt = argon2::password_hash::SaltString::encode_b64(b"fuzz-world-salt!")
        .expect("16 bytes is a valid salt");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .expect("hashing cannot fail")
        .to_string()
}

fn site() -> SiteConfig {
    let mut site = SiteConfig::default();
    site.connectors.insert(
        "internet".into(),
        Connector {
            name: "internet".into(),
            kind: ConnectorKind::Mx,
            address_spaces: vec![AddressSpace::parse("SMTP:*", 1).expect("valid address space")],
            enabled: true,
            retry_minutes: None,
        },
    );
    site
}

impl World {
    /// The process's world, built on first use.
    pub fn get() -> &'static World {
        static WORLD: OnceLock<World> = OnceLock::new();
        WORLD.get_or_init(World::build)
    }

    fn build() -> World {
        // In memory when the machine has a tmpfs: the store syncs every commit, and a
        // fuzzer commits thousands of times a second.
        let shm = std::path::Path::new("/dev/shm");
        let folder = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("a temporary folder");
        let sqlite =
            Arc::new(SqliteStore::open(&folder.path().join("fuzz.db")).expect("open the store"));
        let store: Arc<dyn MailStore> = sqlite;
        let topology = Topology {
            organization: "Fuzz".into(),
            site: "Site".into(),
            server: "fuzz".into(),
        };
        let (directory, _writer) =
            Directory::start(store.clone(), &[DOMAIN.to_string()], &topology, site())
                .expect("start the directory");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let create = |fields: RecipientFields| {
            runtime
                .block_on(directory.apply(Change::CreateRecipient(fields)))
                .expect("create a recipient");
        };
        create(RecipientFields {
            kind: Some(RecipientKind::Mailbox),
            alias: Some(USER.into()),
            display_name: Some("Fuzz Target".into()),
            addresses: Some(vec![format!("{USER}@{DOMAIN}")]),
            password_hash: Some(cheap_hash(PASSWORD)),
            ..RecipientFields::default()
        });
        create(RecipientFields {
            kind: Some(RecipientKind::List),
            alias: Some("team".into()),
            addresses: Some(vec![format!("team@{DOMAIN}")]),
            members: Some(vec![format!("{USER}@{DOMAIN}")]),
            ..RecipientFields::default()
        });
        create(RecipientFields {
            kind: Some(RecipientKind::List),
            alias: Some("empty".into()),
            addresses: Some(vec![format!("empty@{DOMAIN}")]),
            ..RecipientFields::default()
        });
        create(RecipientFields {
            kind: Some(RecipientKind::Contact),
            alias: Some("ext".into()),
            addresses: Some(vec![format!("ext@{DOMAIN}")]),
            target_address: Some("someone@remote.test".into()),
            ..RecipientFields::default()
        });
        let user_id = directory
            .snapshot()
            .by_address(&format!("{USER}@{DOMAIN}"))
            .expect("the fuzz mailbox exists")
            .id;

        let limiter = Arc::new(LoginLimiter::new(LoginLimits {
            per_client: u32::MAX,
            per_account: u32::MAX,
            window: Duration::from_secs(1),
        }));
        let verifier = Arc::new(Verifier::start(1).expect("a verifier thread"));
        let imap = ImapServer::new(
            ImapConfig {
                hostname: "fuzz".into(),
                sessions_max: 16,
                sessions_per_client_max: 16,
                command_before_login_max: 8192,
                idle_timeout: Duration::from_secs(60),
                plaintext: Plaintext::Always,
                append_limit: 1 << 20,
                literals_in_memory_max: 4 << 20,
                command_line_max: mailroom_imap::server::LINE_MAX,
                folder_name_max: 1024,
                parse_limits: mailroom_imap::parse::ParseLimits::default(),
            },
            directory.clone(),
            store.clone(),
            limiter.clone(),
            verifier.clone(),
            ImapStats::default(),
        );
        let pop3 = Pop3Server::new(
            Pop3Config {
                hostname: "fuzz".into(),
                sessions_max: 16,
                sessions_per_client_max: 16,
                idle_timeout: Duration::from_secs(60),
                plaintext: Plaintext::Always,
                command_line_max: mailroom_pop3::server::LINE_MAX,
            },
            directory.clone(),
            store.clone(),
            limiter,
            verifier,
            Pop3Stats::default(),
        );
        let world = World {
            runtime,
            directory,
            store,
            imap,
            pop3,
            user_id,
            peer: "127.0.0.1:40000".parse().expect("an address"),
            _folder: folder,
        };
        world.reset();
        world
    }

    /// Puts the mailbox back to INBOX with the seed messages and one other folder
    /// ("Archive"), unless it already is (checked cheaply, so most inputs cost no write).
    pub fn reset(&self) {
        let store = &self.store;
        let id = self.user_id;
        let folders = store.folders(id).unwrap_or_default();
        let inbox = store.folder_messages(id, "INBOX").unwrap_or_default();
        let intact = folders.len() == 2
            && folders.iter().any(|f| f.name == "Archive")
            && inbox.len() == SEED_MESSAGES.len();
        if intact {
            return;
        }
        for folder in folders {
            if !folder.name.eq_ignore_ascii_case("INBOX") {
                let _ = store.delete_folder(id, &folder.name);
            }
        }
        let uids: Vec<u32> = inbox.iter().map(|m| m.uid).collect();
        let _ = store.expunge(id, "INBOX", &uids);
        store
            .ensure_folder(id, "INBOX", None)
            .expect("INBOX can be made");
        store
            .ensure_folder(id, "Archive", None)
            .expect("Archive can be made");
        for (i, raw) in SEED_MESSAGES.iter().enumerate() {
            let flags: Vec<String> = if i == 0 {
                vec!["\\Seen".into()]
            } else {
                Vec::new()
            };
            store
                .append(id, "INBOX", &flags, 1_790_000_000_000, raw, None)
                .expect("append a seed message");
        }
    }
}
