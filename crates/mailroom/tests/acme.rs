//! ACME (RFC 8555) against Debian's pebble, the test CA from the Let's Encrypt project:
//! the server starts on a self-signed placeholder, proves its name over HTTP-01 (pebble
//! resolves the name through dnsmasq and fetches the token from our listener), and then
//! serves the issued chain on every TLS port without a restart. Python's ssl (a client we
//! did not write) checks the chain against pebble's root.

mod common;

use common::dns::Dns;
use common::{TestServer, free_port, python};
use mailroom::ServerOptions;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// pebble on loopback ports; killed when dropped.
struct Pebble {
    child: Child,
    directory: String,
    management: u16,
    /// The root pebble's own HTTPS is signed by (made here, as Debian ships no test certs).
    api_root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Pebble {
    fn start(dns: &Dns, http_port: u16) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        // A CA and a certificate for 127.0.0.1 and localhost, for pebble's API.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pebble API test root");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut leaf_params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf_params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
        let api_root = dir.path().join("api-root.pem");
        std::fs::write(&api_root, ca.pem()).unwrap();
        std::fs::write(dir.path().join("api.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("api.key"), leaf_key.serialize_pem()).unwrap();
        let api = free_port();
        let management = free_port();
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{api}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.path().join("api.pem"),
            "privateKey": dir.path().join("api.key"),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        let config_path = dir.path().join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(dns.addr.to_string())
            // No random sleeps before validation, and no nonces rejected on purpose.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble (Debian: pebble)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", api)).is_err() {
            assert!(Instant::now() < deadline, "pebble did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Pebble {
            child,
            directory: format!("https://127.0.0.1:{api}/dir"),
            management,
            api_root,
            _dir: dir,
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A certificate from pebble replaces the placeholder on a running server; Python
/// verifies IMAPS and SMTP STARTTLS against pebble's root by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_an_acme_ca_replaces_the_placeholder() {
    let dns = Dns::start(&["--local=/test/", "--host-record=mx.example.test,127.0.0.1"]);
    let http_port = free_port();
    let pebble = Pebble::start(&dns, http_port);
    let (directory, api_root) = (pebble.directory.clone(), pebble.api_root.clone());
    let server = TestServer::start_with(
        move |c| {
            c.tls.acme.directory = directory;
            c.tls.acme.ca_file = Some(api_root);
            c.tls.acme.contact = vec!["mailto:postmaster@example.test".into()];
            c.tls.acme.http_listen = format!("127.0.0.1:{http_port}").parse().unwrap();
        },
        ServerOptions::default(),
    )
    .await;
    // Until the CA answers, a self-signed placeholder is served.
    let tls = server.server.tls.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let served = tls.served();
        if served[0].issuer != served[0].subject {
            assert!(
                served[0].issuer.to_lowercase().contains("pebble"),
                "{served:?}"
            );
            assert_eq!(served[0].names, vec!["mx.example.test".to_string()]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no certificate from pebble within 60 s: {served:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let acme_dir = server.server.data_dir.join("tls").join("acme");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for private in ["key.pem", "account.json"] {
            let mode = std::fs::metadata(acme_dir.join(private))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{private}");
        }
    }

    // A client we did not write checks the chain against pebble's root, by name.
    let script = r#"
import json, socket, ssl, sys, urllib.request
api_root, management, imaps, smtp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
api = ssl.create_default_context(cafile=api_root)
root = urllib.request.urlopen(f"https://127.0.0.1:{management}/roots/0", context=api).read().decode()
ctx = ssl.create_default_context(cadata=root)
with ctx.wrap_socket(socket.create_connection(("127.0.0.1", imaps)), server_hostname="mx.example.test") as s:
    greeting = s.recv(200).decode()
    issuer = dict(x[0] for x in s.getpeercert()["issuer"])
import smtplib
with smtplib.SMTP("127.0.0.1", smtp) as c:
    c._host = "mx.example.test"
    c.ehlo("client.test")
    c.starttls(context=ctx)
    code = c.ehlo("client.test")[0]
print(json.dumps({"greeting": greeting, "issuer": issuer.get("commonName", ""), "ehlo": code}))
"#;
    let output = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(&pebble.api_root)
        .arg(pebble.management.to_string())
        .arg(server.server.imaps_addr.unwrap().port().to_string())
        .arg(server.smtp().port().to_string())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(
        out["greeting"].as_str().unwrap().starts_with("* OK"),
        "{out}"
    );
    assert!(
        out["issuer"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("pebble"),
        "{out}"
    );
    assert_eq!(out["ehlo"], 250, "{out}");

    // `mailroom tls show` reports it.
    let config = server.server.data_dir.join("acme-show.toml");
    std::fs::write(
        &config,
        format!(
            "[tls.acme]\ndirectory = \"{}\"\n",
            pebble.directory.replace('\\', "\\\\")
        ),
    )
    .unwrap();
    let show = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args(["tls", "show", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(&server.server.data_dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(show.status.success(), "{text}");
    assert!(
        text.contains("(ACME)") && text.contains("mx.example.test"),
        "{text}"
    );
}
