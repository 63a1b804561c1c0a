//! dnsmasq (Debian's dnsmasq-base) serving a test zone on a loopback port: the DNS the
//! outbound and inbound-check tests point the server at, so nothing asks the real DNS.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// dnsmasq serving the test zone on a loopback port; killed when dropped.
pub struct Dns {
    child: Child,
    /// Where it answers.
    pub addr: SocketAddr,
}

impl Dns {
    /// Starts dnsmasq with these options (records such as `--txt-record=...`).
    pub fn start(records: &[&str]) -> Dns {
        let port = free_port();
        let dnsmasq = ["/usr/sbin/dnsmasq", "dnsmasq"]
            .into_iter()
            .find(|p| !p.starts_with('/') || Path::new(p).exists())
            .unwrap();
        let mut command = Command::new(dnsmasq);
        command.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--pid-file=",
            &format!("--port={port}"),
        ]);
        command.args(records);
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (Debian: dnsmasq-base)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // Ready once it answers a query.
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let query = [
            0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2, b'm', b'x', 4, b't', b'e', b's', b't', 0,
            0, 15, 0, 1,
        ];
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 512];
        loop {
            assert!(Instant::now() < deadline, "dnsmasq did not answer");
            let _ = socket.send_to(&query, addr);
            if socket.recv_from(&mut buf).is_ok() {
                break;
            }
        }
        Dns { child, addr }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
