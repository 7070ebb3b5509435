//! The embedded broker keeps to the MQTT protocol (issue 24): a third-party client (Python's
//! paho-mqtt, Debian's `python3-paho-mqtt`) runs the same probes against Debian's mosquitto
//! and against the hub's embedded broker, so what is expected is the spec's, not ours:
//! - keep-alive 0 is accepted and means no keep-alive (MQTT 3.1.1 §3.1.2.10, and MQTT 5);
//! - a client silent for 1.5 × its keep-alive is disconnected and its will published
//!   (§3.1.2.10), even while the broker keeps sending it messages;
//! - a topic starting with `$` reaches no filter starting with a wildcard (§4.7.2).
//!
//! Every probe connects with the fleet's certificates: operators as the operator bundle, and
//! what needs to publish anywhere as the hub (a client certificate this test issues from the
//! fleet CA), as the fleet's mosquitto ACL and the embedded broker's guard both allow.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{ensure, Context, Result};
use shoal_e2e::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The probes; `probe.py MODE PORT CA OPERATOR_CERT OPERATOR_KEY HUB_CERT HUB_KEY` prints one
/// fact per line (CA `-`: plain MQTT, no certificates).
const PROBE: &str = r##"
import socket, ssl, sys, time
import paho.mqtt.client as mqtt

mode, port = sys.argv[1], int(sys.argv[2])
ca, op_cert, op_key, hub_cert, hub_key = sys.argv[3:8]
V = {4: mqtt.MQTTv311, 5: mqtt.MQTTv5}

class Client(mqtt.Client):
    # paho 1.6 uses the keep-alive as its TLS handshake timeout, and 0 makes the handshake
    # non-blocking (it then fails): such a client connects with another keep-alive and
    # writes its own into CONNECT.
    sent_keepalive = None
    def _send_connect(self, keepalive, *args):
        if self.sent_keepalive is not None:
            keepalive = self.sent_keepalive
        return super()._send_connect(keepalive, *args)

def client(cid, cert, key, version=4):
    c = Client(client_id=cid, protocol=V[version])
    if ca != "-":
        c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
        # The servers' certificates name shoal-hub or shoal-broker, not 127.0.0.1.
        c.tls_insecure_set(True)
    c.seen, c.connack, c.subacks, c.version = [], None, 0, version
    def on_connect(cl, userdata, flags, rc, props=None):
        cl.connack = int(getattr(rc, "value", rc))
    def on_message(cl, userdata, msg):
        cl.seen.append(msg.topic)
    def on_subscribe(cl, userdata, mid, granted, props=None):
        cl.subacks += 1
    c.on_connect, c.on_message, c.on_subscribe = on_connect, on_message, on_subscribe
    return c

def pump(clients, until, within):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for c in clients:
            c.loop(timeout=0.02)
        if until():
            return True
    return False

def connect(c, keepalive):
    if keepalive == 0:
        c.sent_keepalive, keepalive = 0, 60
    try:
        c.connect("127.0.0.1", port, keepalive=keepalive)
        pump([c], lambda: c.connack is not None, 5.0)
    except OSError as e:
        print(f"connect error {e}", flush=True)
    return c.connack == 0

def subscribe(c, topic_filter):
    c.subscribe(topic_filter, qos=1)
    pump([c], lambda: c.subacks > 0, 5.0)
    c.subacks = 0

def publisher(cid):
    p = client(cid, hub_cert, hub_key)
    if not connect(p, 60):
        sys.exit("the publisher was refused")
    return p

def publish(p, topic, payload, retain=False):
    info = p.publish(topic, payload, qos=1, retain=retain)
    pump([p], info.is_published, 5.0)

if mode == "keepalive0":
    p = publisher("shoal-hub-probe-ka0")
    for v in (4, 5):
        c = client(f"shoal-probe-ka0-v{v}", op_cert, op_key, v)
        ok = connect(c, 0)
        print(f"v{v} connack {c.connack}", flush=True)
        if not ok:
            continue
        subscribe(c, "shoal-probe/ka0")
        # Idle (paho sends no PINGREQ with keep-alive 0), then use the connection.
        pump([c, p], lambda: False, 4.0)
        publish(p, "shoal-probe/ka0", "hi")
        if pump([c, p], lambda: "shoal-probe/ka0" in c.seen, 5.0):
            print(f"v{v} received", flush=True)
elif mode == "silent":
    keepalive = 2
    watch = client("shoal-probe-watch", op_cert, op_key)
    connect(watch, 60)
    subscribe(watch, "shoal-probe/will")
    chatter = publisher("shoal-hub-probe-chatter")
    s = client("shoal-hub-probe-silent", hub_cert, hub_key)
    s.will_set("shoal-probe/will", "gone", qos=1)
    if not connect(s, keepalive):
        sys.exit("the silent client was refused")
    subscribe(s, "shoal-probe/chatter")
    # From here on the client sends nothing: its loop no longer runs, so no PINGREQ. The
    # broker keeps sending it what it subscribed to, which is no packet from the client.
    t0 = time.monotonic()
    sock = s.socket()
    sock.settimeout(0.05)
    closed = will = None
    last = 0.0
    while time.monotonic() - t0 < 14.0 and (closed is None or will is None):
        watch.loop(timeout=0.02)
        chatter.loop(timeout=0.01)
        if time.monotonic() - last > 0.5:
            chatter.publish("shoal-probe/chatter", "tick", qos=0)
            last = time.monotonic()
        if will is None and "shoal-probe/will" in watch.seen:
            will = time.monotonic() - t0
        if closed is None:
            try:
                if sock.recv(65536) == b"":
                    closed = time.monotonic() - t0
            except (socket.timeout, ssl.SSLWantReadError):
                pass
            except (OSError, ssl.SSLError):
                closed = time.monotonic() - t0
    print("closed", "never" if closed is None else f"{closed:.2f}", flush=True)
    print("will", "never" if will is None else f"{will:.2f}", flush=True)
elif mode == "dollar":
    p = publisher("shoal-hub-probe-dollar")
    publish(p, "$shoal-probe/r", "retained", retain=True)
    subs = []
    for n, (f, v) in enumerate([("#", 4), ("+/r", 4), ("+/+", 4), ("#", 5), ("$share/probe/#", 5)]):
        c = client(f"shoal-probe-sub{n}", op_cert, op_key, v)
        connect(c, 60)
        subscribe(c, f)
        c.filter = f
        subs.append(c)
    publish(p, "$shoal-probe/r", "live")
    publish(p, "shoal-probe/r", "marker")
    pump(subs + [p], lambda: all("shoal-probe/r" in c.seen for c in subs), 5.0)
    pump(subs + [p], lambda: False, 0.5)
    for c in subs:
        dollar = sorted({t for t in c.seen if t.startswith("$")})
        marker = "shoal-probe/r" in c.seen
        print(f"v{c.version} {c.filter} marker {marker} dollar {','.join(dollar) or '-'}", flush=True)
else:
    sys.exit(f"unknown mode {mode}")
"##;

/// A broker under test and the credentials to reach it.
struct Target {
    name: &'static str,
    port: u16,
    /// The fleet CA, an operator's certificate and key, the hub's (all `-` without TLS).
    credentials: Vec<PathBuf>,
    // Keeps the broker running.
    _broker: Box<dyn std::any::Any>,
}

/// A hub client certificate from the fleet CA in `hub_data`, written into `out`.
fn hub_client(hub_data: &Path, out: &Path) -> Result<(PathBuf, PathBuf)> {
    let ca = shoal_pki::ca::FleetCa::load_or_create(&hub_data.join("pki"))?;
    let (cert, key) = ca.issue(shoal_pki::ca::HUB_NAME, &shoal_pki::ca::Usage::Client)?;
    std::fs::create_dir_all(out)?;
    let (c, k) = (out.join("hub-client.pem"), out.join("hub-client.key"));
    std::fs::write(&c, cert)?;
    std::fs::write(&k, key)?;
    Ok((c, k))
}

fn target(
    name: &'static str,
    dir: &Path,
    port: u16,
    broker: Box<dyn std::any::Any>,
) -> Result<Target> {
    let bundle = dir.join("hub").join("operator");
    let (hub_cert, hub_key) = hub_client(&dir.join("hub"), &dir.join("probe-certs"))?;
    let credentials = ["ca.pem", "operator.pem", "operator.key"]
        .iter()
        .map(|f| bundle.join(f))
        .chain([hub_cert, hub_key])
        .collect();
    Ok(Target {
        name,
        port,
        credentials,
        _broker: broker,
    })
}

/// Debian's mosquitto as `examples/mosquitto/` sets it up (TLS, the fleet's ACL), and the
/// hub's embedded broker, behind its TLS front and behind its plain one (`--insecure`).
fn targets(dir: &Path) -> Result<Vec<Target>> {
    let [m, e, p] = ["mosquitto", "embedded", "plain"].map(|d| dir.join(d));
    for d in [&m, &e, &p] {
        std::fs::create_dir_all(d)?;
    }
    let mq = Mosquitto::start(&m)?;
    let mq_port = mq.port;
    let hub = Hub::start(&e, None)?;
    let hub_port = hub.mqtt;
    let plain = Hub::start_with(&p, None, free_port(), free_port(), &["--insecure"])?;
    Ok(vec![
        target("mosquitto", &m, mq_port, Box::new(mq))?,
        target("embedded", &e, hub_port, Box::new(hub))?,
        Target {
            name: "embedded --insecure",
            port: plain.mqtt,
            credentials: vec![PathBuf::from("-"); 5],
            _broker: Box::new(plain),
        },
    ])
}

/// Debian's python3 (where apt installs paho-mqtt), else whatever `python3` is.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Runs probe `mode` against `t`; its output.
fn probe(t: &Target, mode: &str) -> Result<String> {
    let has_paho = Command::new(python())
        .args(["-c", "import paho.mqtt.client"])
        .status()?;
    ensure!(
        has_paho.success(),
        "paho-mqtt is missing: apt-get install python3-paho-mqtt (scripts/install-deps.sh)"
    );
    let out = Command::new(python())
        .arg("-c")
        .arg(PROBE)
        .arg(mode)
        .arg(t.port.to_string())
        .args(&t.credentials)
        .output()
        .context("python3")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "{}: probe {mode} failed: {text}{}",
        t.name,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{} {mode}:\n{text}", t.name);
    Ok(text)
}

/// The seconds a `silent` probe line reports (`closed 3.01`), if any.
fn seconds(out: &str, what: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix(what)?.trim().parse().ok())
}

#[test]
fn keep_alive_zero_is_accepted_and_means_none() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut failures = Vec::new();
    for t in targets(dir.path())? {
        let out = probe(&t, "keepalive0")?;
        for v in ["v4", "v5"] {
            for fact in [format!("{v} connack 0"), format!("{v} received")] {
                if !out.lines().any(|l| l == fact) {
                    failures.push(format!("{}: no {fact:?} in\n{out}", t.name));
                }
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn a_silent_client_is_disconnected_and_its_will_published() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut failures = Vec::new();
    for t in targets(dir.path())? {
        let out = probe(&t, "silent")?;
        let closed = seconds(&out, "closed");
        let will = seconds(&out, "will");
        // Keep-alive 2 s: not before 1.5 × 2 s (less a little for timing), and soon after;
        // mosquitto checks keep-alives only every few seconds (3 to 6 s seen here), so "soon"
        // allows it that much.
        let soon = if t.name.starts_with("embedded") {
            4.5
        } else {
            10.0
        };
        match (closed, will) {
            (Some(c), Some(w)) if (2.5..=soon).contains(&c) && w <= c + 2.0 => {}
            _ => failures.push(format!(
                "{}: expected a close within 2.5..{soon} s and the will with it, got\n{out}",
                t.name
            )),
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn dollar_topics_reach_no_wildcard_filter() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut failures = Vec::new();
    for t in targets(dir.path())? {
        let out = probe(&t, "dollar")?;
        let lines: Vec<&str> = out.lines().filter(|l| l.contains(" marker ")).collect();
        if lines.len() != 5 {
            failures.push(format!("{}: expected 5 subscribers, got\n{out}", t.name));
        }
        for l in lines {
            if !l.ends_with("marker True dollar -") {
                failures.push(format!("{}: {l}", t.name));
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
