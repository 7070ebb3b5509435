//! Hostile input against a fleet that runs secure by default: clients without (or with the
//! wrong) certificates, a device impersonating another or applying manifests, bad join
//! tokens, forged and replayed desired states through a compromised broker, a tampered
//! module. Each is refused with a logged reason, and nothing changes or runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use shoal_e2e::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// A probe workload printing a heartbeat.
fn heartbeat(dir: &Path, name: &str, beat_ms: u32) -> PathBuf {
    std::fs::copy(module("probe.wasm"), dir.join("probe.wasm")).unwrap();
    write_manifest(
        dir,
        &format!("{name}.yaml"),
        &format!(
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: {name} }}\nspec:\n  wasm: {{ module: ./probe.wasm }}\n  args: [heartbeat, \"{beat_ms}\"]\n"
        ),
    )
}

/// `mosquitto_pub`/`mosquitto_sub` with explicit TLS files (`None`: no TLS at all).
fn mosquitto(tool: &str, port: u16, tls: Option<(&Path, &Path, &Path)>, args: &[&str]) -> Output {
    let mut c = Command::new(tool);
    c.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if let Some((ca, cert, key)) = tls {
        c.arg("--cafile")
            .arg(ca)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key);
    }
    c.args(args).output().expect("mosquitto client")
}

/// A device's own credentials, as enrollment left them.
fn device_tls(agent: &Agent) -> (PathBuf, PathBuf, PathBuf) {
    let p = agent.data_dir.join("pki");
    (p.join("ca.pem"), p.join("device.pem"), p.join("device.key"))
}

fn as_refs(t: &(PathBuf, PathBuf, PathBuf)) -> Option<(&Path, &Path, &Path)> {
    Some((&t.0, &t.1, &t.2))
}

#[test]
fn the_broker_and_the_api_refuse_strangers_and_confine_devices() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let a = Agent::start(dir.path(), "edge-a", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    let bundle = hub.bundle().unwrap();
    let status_b = "shoal/v1/devices/edge-b/status";
    let fake_status = r#"{"protocol":1,"deviceId":"edge-b","observedGeneration":0,"workloads":[]}"#;

    // No TLS at all, and TLS without a client certificate: refused at the door.
    let out = mosquitto(
        "mosquitto_pub",
        hub.mqtt,
        None,
        &["-t", status_b, "-m", fake_status],
    );
    assert!(!out.status.success(), "plain MQTT accepted");
    let mut c = Command::new("mosquitto_pub");
    let out = c
        .args(["-h", "127.0.0.1", "-p", &hub.mqtt.to_string(), "--cafile"])
        .arg(bundle.join("ca.pem"))
        .args(["-t", status_b, "-m", fake_status])
        .output()?;
    assert!(
        !out.status.success(),
        "a client without a certificate was accepted"
    );

    // A certificate from another fleet's CA.
    let other = dir.path().join("other-hub");
    let st = Command::new(bin("shoal-hub"))
        .args(["cert", "broker", "--data-dir"])
        .arg(&other)
        .arg("--out")
        .arg(dir.path().join("other-broker"))
        .output()?;
    assert!(st.status.success());
    let o = other.join("operator");
    let foreign = (
        bundle.join("ca.pem"),
        o.join("operator.pem"),
        o.join("operator.key"),
    );
    let out = mosquitto(
        "mosquitto_pub",
        hub.mqtt,
        as_refs(&foreign),
        &["-t", "shoal/v1/apply", "-m", "x"],
    );
    assert!(
        !out.status.success(),
        "another CA's certificate was accepted"
    );

    // Device A's certificate: its own client id only, its own topics only.
    let tls = device_tls(&a);
    let out = mosquitto(
        "mosquitto_pub",
        hub.mqtt,
        as_refs(&tls),
        &[
            "-i",
            "shoal-agent-edge-b",
            "-t",
            "shoal/v1/devices/edge-a/status",
            "-m",
            "{}",
        ],
    );
    assert!(
        !out.status.success(),
        "device A connected as device B's client"
    );
    let publish_as_a = |topic: &str, msg: &str| {
        let args = [
            "-i",
            "shoal-agent-edge-a",
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            msg,
        ];
        mosquitto("mosquitto_pub", hub.mqtt, as_refs(&tls), &args)
    };
    publish_as_a(status_b, fake_status);
    let manifest = std::fs::read_to_string(heartbeat(dir.path(), "rogue", 1000))?;
    publish_as_a("shoal/v1/apply", &manifest);
    let out = mosquitto(
        "mosquitto_sub",
        hub.mqtt,
        as_refs(&tls),
        &[
            "-i",
            "shoal-agent-edge-a",
            "-t",
            "shoal/v1/devices/+/desired",
            "-C",
            "1",
            "-W",
            "3",
        ],
    );
    assert!(!out.status.success(), "device A read every desired state");

    let log = wait_until(
        Duration::from_secs(10),
        "the refusals in the hub log",
        || {
            let log = hub.proc.log_text();
            let all = [
                "no or untrusted client certificate",
                "\"shoal-agent-edge-b\"",
                "device edge-a may not publish to \"shoal/v1/devices/edge-b/status\"",
                "device edge-a may not publish to \"shoal/v1/apply\"",
                "device edge-a may not subscribe to \"shoal/v1/devices/+/desired\"",
            ]
            .iter()
            .all(|s| log.contains(s));
            Ok(all.then_some(log))
        },
    );
    let log = log.map_err(|e| anyhow::anyhow!("{e}\nhub log:\n{}", hub.proc.log_text()))?;
    assert!(log.contains("mqtt client refused"), "{log}");

    // Nothing changed: no device B, no workload.
    let devices = hub.devices()?;
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert!(hub.workloads()?.is_empty());

    // The HTTP API: nothing without a certificate; a device's certificate is not an operator's.
    let out = hub.shoal_with(
        &["get", "devices"],
        None,
        &[("SHOAL_CREDENTIALS", "/nonexistent")],
    );
    assert!(!out.status.success());
    let as_device = dir.path().join("as-device");
    std::fs::create_dir_all(&as_device)?;
    std::fs::copy(&tls.0, as_device.join("ca.pem"))?;
    std::fs::copy(&tls.1, as_device.join("operator.pem"))?;
    std::fs::copy(&tls.2, as_device.join("operator.key"))?;
    let out = hub.shoal_with(
        &["get", "devices"],
        None,
        &[("SHOAL_CREDENTIALS", as_device.to_str().unwrap())],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("device edge-a may not GET /v1/devices"),
        "{err}"
    );
    // The operator's bundle works with mosquitto's own clients too.
    let out = Command::new("mosquitto_sub")
        .args(hub.access().mosquitto_args())
        .args(["-t", "shoal/v1/devices/edge-a/status", "-C", "1", "-W", "5"])
        .output()?;
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("edge-a"));
    Ok(())
}

/// `shoal-agent run` for device `id` with its data in `dir/data`, joining `join`'s fleet,
/// with `token` (as the environment variable) when given.
fn agent_command(dir: &Path, data: &str, id: &str, join: &Join, token: Option<&str>) -> Command {
    let mut c = Command::new(bin("shoal-agent"));
    c.args([
        "run",
        "--no-mdns",
        "--no-containerd",
        "--device-id",
        id,
        "--data-dir",
    ])
    .arg(dir.join(data))
    .args(["--broker", &join.broker, "--hub", &join.hub, "--socket"])
    .arg(dir.join(format!("{data}.sock")));
    if let Some(t) = token {
        c.env("SHOAL_AGENT_JOIN_TOKEN", t);
    }
    c
}

#[test]
fn join_tokens_pin_the_ca_and_work_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let join = hub.join();
    let agent_at = |data: &str, id: &str, token: &str| -> Output {
        agent_command(dir.path(), data, id, &join, Some(token))
            .output()
            .expect("shoal-agent")
    };
    let agent = |id: &str, token: &str| agent_at(id, id, token);
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // A token made by another hub pins another CA: the agent refuses to talk further.
    let other = Join {
        broker: String::new(),
        hub: String::new(),
        hub_data: Some(dir.path().join("elsewhere")),
        etcd: None,
        grant_labels: true,
    };
    let st = Command::new(bin("shoal-hub"))
        .args(["cert", "broker", "--data-dir"])
        .arg(dir.path().join("elsewhere"))
        .arg("--out")
        .arg(dir.path().join("elsewhere-broker"))
        .output()?;
    assert!(st.status.success());
    let out = agent("edge-x", &other.token()?.unwrap());
    assert!(
        stderr(&out).contains("but the join token pins"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.path().join("edge-x/pki/device.pem").exists());

    // A malformed token names the problem without echoing the secret.
    let out = agent("edge-x", "SHL1.abc.def.0123456789abcdef0123456789abcdef");
    let e = stderr(&out);
    assert!(
        !out.status.success()
            && e.contains("CA hash")
            && !e.contains("0123456789abcdef0123456789abcdef"),
        "{e}"
    );

    // A good token enrolls once; the second use is refused by the hub.
    let token = join.token()?.unwrap();
    let mut first = Proc::spawn(
        "edge-1",
        &mut agent_command(dir.path(), "edge-1", "edge-1", &join, Some(&token)),
        dir.path().join("edge-1.log"),
    )?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    let out = agent("edge-2", &token);
    assert!(stderr(&out).contains("already used"), "{}", stderr(&out));
    // Reserved names cannot be enrolled.
    let out = agent("shoal-hub", &join.token()?.unwrap());
    assert!(stderr(&out).contains("reserved"), "{}", stderr(&out));
    // An expired token.
    let st = Command::new(bin("shoal-hub"))
        .args(["token", "create", "--ttl", "1ms", "--data-dir"])
        .arg(&hub.data_dir)
        .output()?;
    std::thread::sleep(Duration::from_millis(20));
    let out = agent("edge-3", String::from_utf8_lossy(&st.stdout).trim());
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));

    // A wiped board (fresh data directory) cannot take over an enrolled id with an ordinary
    // token; a token made for that id enrolls it again.
    let out = agent_at("edge-1-wiped", "edge-1", &join.token()?.unwrap());
    assert!(
        stderr(&out).contains("enrolled already"),
        "{}",
        stderr(&out)
    );
    let bound = Command::new(bin("shoal-hub"))
        .args(["token", "create", "--device", "edge-1", "--data-dir"])
        .arg(&hub.data_dir)
        .output()?;
    let bound = String::from_utf8(bound.stdout)?.trim().to_string();
    let out = agent_at("edge-2-data", "edge-2", &bound);
    assert!(
        stderr(&out).contains("bound to another device"),
        "{}",
        stderr(&out)
    );
    let mut wiped = Proc::spawn(
        "edge-1-wiped",
        &mut agent_command(dir.path(), "edge-1-wiped", "edge-1", &join, Some(&bound)),
        dir.path().join("edge-1-wiped.log"),
    )?;
    wait_until(
        Duration::from_secs(20),
        "the wiped board enrolls again",
        || {
            Ok(wiped
                .log_text()
                .contains("enrolled: device certificate saved")
                .then_some(()))
        },
    )?;
    wiped.kill();

    // The re-enrolled board restarts without a token, from its saved credentials; the
    // board it replaced (its old key, still a valid certificate) is shut out.
    first.kill();
    let again = Proc::spawn(
        "edge-1-wiped",
        &mut agent_command(dir.path(), "edge-1-wiped", "edge-1", &join, None),
        dir.path().join("edge-1-again.log"),
    )?;
    wait_until(
        Duration::from_secs(20),
        "the restarted device connects",
        || {
            Ok(again
                .log_text()
                .contains("connected to broker")
                .then_some(()))
        },
    )?;
    drop(again);
    let stale = Proc::spawn(
        "edge-1",
        &mut agent_command(dir.path(), "edge-1", "edge-1", &join, None),
        dir.path().join("edge-1-stale.log"),
    )?;
    wait_until(
        Duration::from_secs(20),
        "the hub refuses the replaced board",
        || {
            Ok(hub
                .proc
                .log_text()
                .contains("for a key the device no longer has")
                .then_some(()))
        },
    )?;
    assert!(
        !stale.log_text().contains("connected to broker"),
        "{}",
        stale.log_text()
    );
    let key = std::fs::metadata(dir.path().join("edge-1/pki/device.key"))?;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    Ok(())
}

#[test]
fn forged_and_replayed_desired_states_change_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut hub = Hub::start(dir.path(), None)?;
    let a = Agent::start(dir.path(), "edge-a", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    let desired = "shoal/v1/devices/edge-a/desired";

    // Generation g1: one workload. Capture its signed desired state (operators may read it).
    hub.apply(&heartbeat(dir.path(), "first", 200))?;
    hub.wait_running("first", 1, Duration::from_secs(30))?;
    let old = retained(&hub.access(), desired)?.expect("a retained desired state");
    // Generation g2: a second workload.
    hub.apply(&heartbeat(dir.path(), "second", 200))?;
    hub.wait_running("second", 1, Duration::from_secs(30))?;

    // The hub goes away, and a compromised broker with the fleet's certificates but no ACL
    // takes its port: any client with a fleet certificate may publish desired states.
    hub.proc.kill();
    let log_at = a.proc.log_text().len();
    let mq = Mosquitto::start_without_acl(dir.path(), hub.mqtt)?;
    wait_until(
        Duration::from_secs(20),
        "the agent reconnects to the broker",
        || {
            Ok(a.proc.log_text()[log_at..]
                .contains("connected to broker")
                .then_some(()))
        },
    )?;

    // A forged state: well-formed, newer, empty, but signed by some other key.
    let forged = format!(
        r#"{{"state":"{}","signature":"{}"}}"#,
        b64(br#"{"protocol":1,"deviceId":"edge-a","generation":999,"workloads":[]}"#),
        b64(&[7u8; 64])
    );
    let publish = |payload: &str| {
        let out = Command::new("mosquitto_pub")
            .args(mq.access().mosquitto_args())
            .args(["-q", "1", "-r", "-t", desired, "-m", payload])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    publish(&forged);
    // A replay of the genuine, older generation.
    publish(&old);
    // A bare, unsigned desired state.
    publish(r#"{"protocol":1,"deviceId":"edge-a","generation":1000,"workloads":[]}"#);

    let log = wait_until(Duration::from_secs(15), "three rejections", || {
        let log = a.proc.log_text()[log_at..].to_string();
        Ok((log.matches("desired state rejected").count() >= 3).then_some(log))
    })?;
    assert!(log.contains("does not verify with the hub's key"), "{log}");
    assert!(log.contains("is older than generation"), "{log}");
    assert!(log.contains("not a signed desired state"), "{log}");
    assert!(!log.contains("desired state accepted"), "{log}");

    // Both workloads still run: their output keeps growing.
    let before: Vec<usize> = ["first-0", "second-0"]
        .iter()
        .map(|w| a.workload_log(w).len())
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    for (w, n) in ["first-0", "second-0"].iter().zip(before) {
        assert!(a.workload_log(w).len() > n, "{w} stopped");
    }
    Ok(())
}

/// Standard base64, for hand-made envelopes.
fn b64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn a_tampered_module_is_refused_and_never_runs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let a = Agent::start(dir.path(), "edge-a", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    // Upload the module, then corrupt the hub's copy before any device fetched it.
    std::fs::copy(module("probe.wasm"), dir.path().join("probe.wasm"))?;
    let digest = String::from_utf8(
        hub.shoal_ok(&["push", dir.path().join("probe.wasm").to_str().unwrap()])
            .stdout,
    )?;
    let digest = digest.trim();
    let blob = hub
        .data_dir
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&blob)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes)?;
    let m = write_manifest(
        dir.path(),
        "t.yaml",
        &format!("apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: tampered }}\nspec:\n  wasm: {{ module: \"{digest}\" }}\n  args: [heartbeat, \"100\"]\n"),
    );
    hub.apply(&m)?;
    let w = wait_until(
        Duration::from_secs(20),
        "the digest failure reported",
        || {
            let w = hub.workload("tampered")?.unwrap_or_default();
            let msg = w["replicas"][0]["reason"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            Ok(msg.contains("failed verification").then_some(w))
        },
    )?;
    assert_ne!(w["replicas"][0]["phase"], "Running", "{w}");
    assert!(
        a.workload_log("tampered-0").is_empty(),
        "the tampered module ran"
    );
    Ok(())
}

#[test]
fn a_wasm_guest_connects_only_where_spec_network_allows() -> Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    // Two TCP servers on loopback; the manifest allows one.
    let serve = |name: &'static str| -> Result<(String, Arc<AtomicUsize>)> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?.to_string();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                h.fetch_add(1, Ordering::SeqCst);
                let _ = writeln!(c, "pong from {name}");
            }
        });
        Ok((addr, hits))
    };
    let (allowed, _) = serve("allowed")?;
    let (other, other_hits) = serve("other")?;

    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let a = Agent::start(dir.path(), "edge-a", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    std::fs::copy(module("netprobe.wasm"), dir.path().join("netprobe.wasm"))?;
    let m = write_manifest(
        dir.path(),
        "net.yaml",
        &format!(
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: uplink }}\nspec:\n  wasm: {{ module: ./netprobe.wasm }}\n  args: [connect, \"{allowed}\", \"{other}\"]\n  network: {{ allow: [\"{allowed}\"] }}\n"
        ),
    );
    hub.apply(&m)?;
    let log = wait_until(Duration::from_secs(30), "both attempts logged", || {
        let log = a.workload_log("uplink-0");
        let done = log.contains(&format!("reply from {allowed}: pong from allowed"))
            && log.contains(&format!("cannot connect to {other}"))
            && log.contains(&format!("[shoal] connect to {other} denied"));
        Ok(done.then_some(log))
    })?;
    assert!(!log.contains("pong from other"), "{log}");
    assert_eq!(
        other_hits.load(Ordering::SeqCst),
        0,
        "the denied server was reached"
    );
    Ok(())
}

#[test]
fn hostile_modules_are_stopped_by_their_limits_and_neighbours_keep_running() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let a = Agent::start(dir.path(), "edge-a", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    std::fs::copy(module("probe.wasm"), dir.path().join("probe.wasm"))?;
    let m = write_manifest(
        dir.path(),
        "hostile.yaml",
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: loop }\nspec:\n  wasm: { module: ./probe.wasm }\n  args: [spin]\n  restart: { policy: Never }\n  limits: { cpuTime: 500ms }\n---\napiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: chatty }\nspec:\n  wasm: { module: ./probe.wasm }\n  args: [flood]\n  restart: { policy: Never }\n  limits: { logRate: 16Ki }\n---\napiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: calm }\nspec:\n  wasm: { module: ./probe.wasm }\n  args: [heartbeat, \"100\"]\n",
    );
    hub.apply(&m)?;
    for (name, why) in [
        ("loop", "CPU time limit exceeded"),
        ("chatty", "log rate limit exceeded"),
    ] {
        let w = wait_until(Duration::from_secs(30), &format!("{name} stopped"), || {
            let w = hub.workload(name)?.unwrap_or_default();
            let r = &w["replicas"][0];
            Ok(
                (r["phase"] == "Failed" && r["reason"].as_str().unwrap_or("").contains(why))
                    .then_some(w),
            )
        })?;
        assert!(
            w["replicas"][0]["reason"]
                .as_str()
                .unwrap()
                .contains("spec.limits"),
            "{w}"
        );
    }
    // The flood was cut short: its log is about one window's allowance, not megabytes.
    let flood = std::fs::metadata(a.data_dir.join("logs/chatty-0.log"))?.len();
    assert!(flood < 1 << 20, "chatty wrote {flood} bytes");
    // The neighbour runs on.
    hub.wait_running("calm", 1, Duration::from_secs(10))?;
    let before = a.workload_log("calm-0").len();
    std::thread::sleep(Duration::from_millis(800));
    assert!(a.workload_log("calm-0").len() > before, "calm stopped");
    Ok(())
}

#[test]
fn device_certificates_are_renewed_before_they_expire() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mqtt, http) = (free_port(), free_port());
    let flags = ["--device-cert-lifetime", "20s"];
    let mut hub = Hub::start_with(dir.path(), None, mqtt, http, &flags)?;
    let a = Agent::start(dir.path(), "edge-a", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    let enrolled_at = std::time::Instant::now();
    let cert = a.data_dir.join("pki/device.pem");
    let first = std::fs::read_to_string(&cert)?;
    let key = std::fs::read_to_string(a.data_dir.join("pki/device.key"))?;

    // Two thirds into its 20 s, the agent renews (same key, new certificate).
    wait_until(Duration::from_secs(20), "a renewal", || {
        Ok(a.proc
            .log_text()
            .contains("device certificate renewed")
            .then_some(()))
    })?;
    assert_ne!(std::fs::read_to_string(&cert)?, first);
    assert_eq!(
        std::fs::read_to_string(a.data_dir.join("pki/device.key"))?,
        key
    );

    // Once the first certificate has expired, a restarted hub still lets the agent in: it
    // presents the renewed one.
    hub.proc.kill();
    let expired = Duration::from_secs(21);
    std::thread::sleep(expired.saturating_sub(enrolled_at.elapsed()));
    // Where the agent's log stands before the hub is back (it may reconnect while the
    // restarted hub is still being waited for).
    let at = a.proc.log_text().len();
    let hub = Hub::start_with(dir.path(), None, mqtt, http, &flags)?;
    wait_until(Duration::from_secs(20), "the agent reconnects", || {
        Ok(a.proc.log_text()[at..]
            .contains("connected to broker")
            .then_some(()))
    })?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    Ok(())
}
