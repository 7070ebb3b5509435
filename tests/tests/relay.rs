//! A broker's key is not the hub's. An external broker gets its certificate from the fleet
//! CA (`shoal-hub cert broker`); whoever holds its key (a compromised broker host, or a
//! relay in the path) used to pass as the hub over HTTPS too, since brokers were issued the
//! hub's name: a relay could enroll a new device against the real hub while swapping in its
//! own signing key, and the device would then run whatever the relay signed. Now a broker
//! certificate names `shoal-broker`, which MQTT clients accept and HTTPS clients do not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context, Result};
use shoal_e2e::*;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

/// An HTTPS "hub" on loopback with the broker's certificate: it answers `GET /v1/ca` with the
/// real fleet CA (so the token's pin matches) and records any enrollment that reaches it.
const RELAY: &str = r#"
import http.server, ssl, sys
cert, key, ca_file, seen = sys.argv[1:5]
ca = open(ca_file, 'rb').read()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header('content-type', 'application/x-pem-file')
        self.send_header('content-length', str(len(ca)))
        self.end_headers()
        self.wfile.write(ca)
    def do_POST(self):
        open(seen, 'a').write(self.path + '\n')
        self.send_response(503)
        self.end_headers()
srv = http.server.HTTPServer(('127.0.0.1', 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

#[test]
fn a_relay_holding_the_brokers_key_cannot_pass_as_the_hub() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let certs = dir.path().join("broker-certs");
    let out = Command::new(bin("shoal-hub"))
        .args(["cert", "broker", "--data-dir"])
        .arg(&hub.data_dir)
        .arg("--out")
        .arg(&certs)
        .args(["--name", "127.0.0.1"])
        .output()?;
    anyhow::ensure!(out.status.success(), "{out:?}");
    let seen = dir.path().join("relay-saw");
    let mut relay = Command::new("python3")
        .arg("-c")
        .arg(RELAY)
        .arg(certs.join("broker.pem"))
        .arg(certs.join("broker.key"))
        .arg(certs.join("ca.pem"))
        .arg(&seen)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let port: u16 = {
        let mut line = String::new();
        std::io::BufReader::new(relay.stdout.take().context("relay stdout")?)
            .read_line(&mut line)?;
        line.trim().parse().context("relay port")?
    };
    let result = (|| -> Result<()> {
        // A new device is sent to the relay with a good token of the real fleet.
        let token = hub.join().token()?.context("a token")?;
        let data = dir.path().join("edge-r");
        let run = |hub_url: &str| {
            Command::new(bin("shoal-agent"))
                .args([
                    "run",
                    "--no-mdns",
                    "--no-containerd",
                    "--device-id",
                    "edge-r",
                ])
                .arg("--data-dir")
                .arg(&data)
                .args(["--broker", &hub.broker_url, "--hub", hub_url, "--socket"])
                .arg(dir.path().join("edge-r.sock"))
                .env("SHOAL_AGENT_JOIN_TOKEN", &token)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
        };
        let out = run(&format!("https://127.0.0.1:{port}"))?.wait_with_output()?;
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "enrolled through the relay: {err}");
        assert!(err.contains("not valid for name"), "{err}");
        // The enrollment never reached the relay, so its token was never shown to it.
        assert!(
            !seen.exists(),
            "the relay received {:?}",
            std::fs::read_to_string(&seen)
        );
        assert!(!data.join("pki/device.pem").exists());
        // The same token still enrolls at the real hub: nothing was burned.
        let mut agent = run(&hub.hub_url())?;
        let online = hub.wait_devices_online(1, Duration::from_secs(30));
        let _ = agent.kill();
        let _ = agent.wait();
        online
    })();
    let _ = relay.kill();
    let _ = relay.wait();
    result
}
