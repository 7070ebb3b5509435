//! Zero-config discovery across hosts: network namespaces on a bridge (see
//! `shoal_e2e::netns`), real multicast, no broker address given to any agent.
//!
//! Skipped with a loud message where namespaces cannot be created (not root); CI runs as root
//! with `SHOAL_E2E_REQUIRE_NETNS=1`, which turns the skip into a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context, Result};
use serde_json::Value;
use shoal_e2e::netns::Lan;
use shoal_e2e::*;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

const FLEET: &str = "farm";

/// The operator bundle of hub-a, for the `shoal` CLI.
static CREDENTIALS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// A hub in namespace `host` of `lan`, listening on all its addresses.
fn start_hub(lan: &Lan, host: usize, dir: &Path, name: &str) -> Result<Proc> {
    start_hub_with(lan, host, dir, name, &[])
}

/// [`start_hub`] with more `serve` flags. Each name has its own data directory, hence its
/// own fleet CA.
fn start_hub_with(lan: &Lan, host: usize, dir: &Path, name: &str, extra: &[&str]) -> Result<Proc> {
    let mut cmd = lan.command(host, bin("shoal-hub"));
    cmd.args(["serve", "--data-dir"])
        .arg(dir.join(format!("hub-{name}")))
        .args([
            "--mqtt-listen",
            "0.0.0.0:8883",
            "--http-listen",
            "0.0.0.0:8080",
            "--fleet",
            FLEET,
            "--name",
            name,
        ])
        .args(extra);
    let p = Proc::spawn(name, &mut cmd, dir.join(format!("{name}.log")))?;
    let creds = dir.join(format!("hub-{name}")).join("operator");
    wait_until(Duration::from_secs(20), "hub up", || {
        Ok(shoal_as(lan, host, &creds, &["get", "devices"])
            .status
            .success()
            .then_some(()))
    })?;
    Ok(p)
}

/// Gives the hub data directory `to` the fleet CA of the one in `from` (a second hub of the
/// same fleet).
fn share_ca(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(to.join("pki"))?;
    for f in ["ca.key", "ca.pem"] {
        std::fs::copy(from.join("pki").join(f), to.join("pki").join(f))?;
    }
    Ok(())
}

/// The data directory of the fleet's hub `hub-a` (it keeps it when it moves hosts).
fn hub_a(dir: &Path) -> PathBuf {
    dir.join("hub-hub-a")
}

/// An agent in namespace `host`, told nothing but its fleet, the interface to use and a
/// join token (it finds the hub to enroll with over mDNS).
fn start_agent(lan: &Lan, host: usize, dir: &Path, id: &str, labels: &str) -> Result<Proc> {
    start_agent_with(lan, host, dir, id, labels, &[])
}

/// [`start_agent`] with more `run` flags.
fn start_agent_with(
    lan: &Lan,
    host: usize,
    dir: &Path,
    id: &str,
    labels: &str,
    extra: &[&str],
) -> Result<Proc> {
    let token = Join {
        broker: String::new(),
        hub: String::new(),
        hub_data: Some(hub_a(dir)),
        etcd: None,
        grant_labels: true,
    }
    .token_with_labels(labels)?
    .context("a join token")?;
    let mut cmd = lan.command(host, bin("shoal-agent"));
    cmd.env("SHOAL_AGENT_JOIN_TOKEN", token);
    cmd.args(["run", "--data-dir"])
        .arg(dir.join(id))
        .args([
            "--device-id",
            id,
            "--labels",
            labels,
            "--fleet",
            FLEET,
            "--memory",
            "512Mi",
            "--mdns-interface",
            lan.iface(host),
            "--socket",
        ])
        .arg(socket(dir, id))
        .args(extra);
    Proc::spawn(id, &mut cmd, dir.join(format!("{id}.log")))
}

fn socket(dir: &Path, id: &str) -> PathBuf {
    dir.join(id).join("agent.sock")
}

/// The `shoal` CLI, run next to the hub in namespace `host`.
fn shoal(lan: &Lan, host: usize, args: &[&str]) -> Output {
    shoal_as(lan, host, CREDENTIALS.get().expect("credentials set"), args)
}

/// The `shoal` CLI with the operator bundle in `creds`.
fn shoal_as(lan: &Lan, host: usize, creds: &Path, args: &[&str]) -> Output {
    lan.command(host, bin("shoal"))
        .args(args)
        .env("SHOAL_BROKER", "mqtts://127.0.0.1:8883")
        .env("SHOAL_HUB", "https://127.0.0.1:8080")
        .env("SHOAL_CREDENTIALS", creds)
        .output()
        .expect("run shoal")
}

fn json(lan: &Lan, host: usize, args: &[&str]) -> Result<Value> {
    json_as(lan, host, CREDENTIALS.get().expect("credentials set"), args)
}

/// [`json`] with the operator bundle in `creds`.
fn json_as(lan: &Lan, host: usize, creds: &Path, args: &[&str]) -> Result<Value> {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let out = shoal_as(lan, host, creds, &a);
    anyhow::ensure!(
        out.status.success(),
        "shoal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `shoal-agent peers -o json` against an agent's socket (Unix sockets are file-system
/// objects, reachable from any network namespace).
fn peers(dir: &Path, id: &str) -> Result<Value> {
    let out = std::process::Command::new(bin("shoal-agent"))
        .args(["peers", "-o", "json", "--socket"])
        .arg(socket(dir, id))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "shoal-agent peers: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `shoal-agent status -o json` against an agent's socket.
fn agent_status(dir: &Path, id: &str) -> Result<Value> {
    let out = std::process::Command::new(bin("shoal-agent"))
        .args(["status", "-o", "json", "--socket"])
        .arg(socket(dir, id))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "shoal-agent status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Whether a JSON array of addresses holds `addr`.
fn has(addrs: &Value, addr: std::net::Ipv4Addr) -> bool {
    addrs
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x == &addr.to_string()))
}

/// `Some` once every `(device, host)` is online at the hub and seen over mDNS at its IPv4
/// address (a record may first resolve with only its IPv6 link-local address).
fn online_with_mdns(lan: &Lan, hub_host: usize, ids: &[(&str, usize)]) -> Result<Option<()>> {
    let devices = json(lan, hub_host, &["get", "devices"])?;
    let ok = ids.iter().all(|(id, host)| {
        devices.as_array().unwrap().iter().any(|d| {
            d["id"] == *id && d["online"] == true && has(&d["mdnsAddresses"], lan.addr(*host))
        })
    });
    Ok(ok.then_some(()))
}

fn selected_hub(p: &Value) -> Option<String> {
    p["hubs"]
        .as_array()?
        .iter()
        .find(|h| h["state"] == "selected")
        .and_then(|h| h["instance"].as_str().map(String::from))
}

#[test]
fn agents_find_the_hub_each_other_and_services_without_addresses() -> Result<()> {
    let Some(lan) = Lan::new(4)? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    CREDENTIALS.get_or_init(|| hub_a(dir).join("operator"));
    let mut hub = start_hub(&lan, 0, dir, "hub-a")?;
    let _a = start_agent(&lan, 1, dir, "dev-a", "role=server")?;
    let mut b = start_agent(&lan, 2, dir, "dev-b", "role=client")?;

    // Both join with no broker address, and the hub saw both over mDNS too.
    wait_until(
        Duration::from_secs(20),
        "both devices online and seen over mDNS",
        || online_with_mdns(&lan, 0, &[("dev-a", 1), ("dev-b", 2)]),
    )?;

    // The hub counts them in its metrics too.
    let metrics = lan
        .command(0, "python3")
        .args([
            "-c",
            "import ssl, sys, urllib.request; b = sys.argv[1]; c = ssl.create_default_context(cafile=b + '/ca.pem'); c.load_cert_chain(b + '/operator.pem', b + '/operator.key'); print(urllib.request.urlopen('https://127.0.0.1:8080/metrics', context=c).read().decode())",
        ])
        .arg(hub_a(dir).join("operator"))
        .output()?;
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(metrics.contains("shoal_hub_devices_mdns 2"), "{metrics}");

    // Each agent lists the hub (selected) and the other device.
    let p = wait_until(Duration::from_secs(10), "dev-a sees dev-b", || {
        let p = peers(dir, "dev-a")?;
        let seen = p["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["device"] == "dev-b" && has(&d["addresses"], lan.addr(2)));
        Ok(seen.then_some(p))
    })?;
    assert!(selected_hub(&p).unwrap().starts_with("farm-hub-a"), "{p}");
    let dev_b = p["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == "dev-b")
        .unwrap();
    assert_eq!(dev_b["labels"]["role"], "client");
    assert_eq!(
        dev_b["addresses"][0],
        lan.addr(2).to_string(),
        "IPv4 sorts first"
    );
    let table = std::process::Command::new(bin("shoal-agent"))
        .args(["peers", "--socket"])
        .arg(socket(dir, "dev-a"))
        .output()?;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("farm-hub-a") && table.contains("selected") && table.contains("dev-b"),
        "{table}"
    );

    // An every-device workload runs on both; a service on dev-a is found by a workload on
    // dev-b, which connects to it through the endpoint file the agent keeps.
    let manifest = write_manifest(
        dir,
        "fleet.yaml",
        &format!(
            r#"
apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: sensor }}
spec:
  placement: every
  wasm: {{ module: "{probe}" }}
  args: ["heartbeat", "200"]
  resources: {{ memory: 16Mi }}
---
apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: greeter }}
spec:
  selector: {{ role: server }}
  wasm: {{ module: "{net}" }}
  args: ["serve", "7000"]
  ports: [{{ name: tcp, port: 7000, expose: mdns }}]
---
apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: caller }}
spec:
  selector: {{ role: client }}
  wasm: {{ module: "{net}" }}
  args: ["call", "greeter", "tcp", "200"]
  uses: [greeter]
"#,
            probe = module("probe.wasm").display(),
            net = module("netprobe.wasm").display(),
        ),
    );
    let out = shoal(&lan, 0, &["apply", "-f", manifest.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let caller_log =
        || std::fs::read_to_string(dir.join("dev-b/logs/caller-0.log")).unwrap_or_default();
    let want = format!("reply from {}:7000: hello from greeter-0", lan.addr(1));
    wait_until(
        Duration::from_secs(30),
        "caller on dev-b reaches greeter on dev-a",
        || Ok(caller_log().contains(&want).then_some(())),
    )
    .with_context(|| format!("caller log:\n{}", caller_log()))?;
    let sensor = json(&lan, 0, &["get", "workloads"])?;
    let sensor = sensor
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "sensor")
        .unwrap()
        .clone();
    // Replica logs are `{data}/logs/sensor-{replica}.log` on each device.
    let mut sensor_logs: Vec<(String, PathBuf)> = sensor["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let dev = r["device"].as_str().unwrap().to_string();
            let log = dir
                .join(&dev)
                .join(format!("logs/sensor-{}.log", r["replica"]));
            (dev, log)
        })
        .collect();
    sensor_logs.sort();
    let on: Vec<&str> = sensor_logs.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(on, ["dev-a", "dev-b"], "{sensor}");
    for (_, log) in &sensor_logs {
        wait_until(
            Duration::from_secs(20),
            "sensor beats on both devices",
            || {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                Ok(text.contains("beat 2").then_some(()))
            },
        )?;
    }
    let b_sensor_log = sensor_logs[1].1.clone();

    // The service moves to the caller's device: the remote advert is withdrawn and the caller
    // follows it to the local replica (served on loopback).
    let moved = std::fs::read_to_string(&manifest)?.replacen(
        "selector: { role: server }",
        "selector: { role: client }",
        1,
    );
    let manifest2 = write_manifest(dir, "fleet2.yaml", &moved);
    let out = shoal(&lan, 0, &["apply", "-f", manifest2.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        Duration::from_secs(30),
        "caller follows greeter to its own device",
        || {
            let log = caller_log();
            let tail = &log[log
                .rfind("endpoints of greeter/tcp: [127.0.0.1:7000]")
                .unwrap_or(log.len())..];
            Ok(tail
                .contains("reply from 127.0.0.1:7000: hello from greeter-0")
                .then_some(()))
        },
    )
    .with_context(|| format!("caller log:\n{}", caller_log()))?;

    // The service stops: its advert is withdrawn and the caller's endpoint list empties.
    let before_delete = caller_log().len();
    let out = shoal(&lan, 0, &["delete", "workload", "greeter"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        Duration::from_secs(15),
        "greeter endpoints withdrawn",
        || {
            Ok(caller_log()[before_delete..]
                .contains("endpoints of greeter/tcp: []")
                .then_some(()))
        },
    )
    .with_context(|| format!("caller log:\n{}", caller_log()))?;

    // The hub moves to another host (new address): the agents follow it, once its old
    // address has been unreachable for 15 s (a hub in use is not left sooner).
    assert!(
        hub.terminate(Duration::from_secs(10))?,
        "hub stops on SIGTERM"
    );
    let _hub3 = start_hub(&lan, 3, dir, "hub-a")?;
    wait_until(
        Duration::from_secs(40),
        "agents reconnect to the moved hub",
        || online_with_mdns(&lan, 3, &[("dev-a", 1), ("dev-b", 2)]),
    )?;
    let p = peers(dir, "dev-b")?;
    let hub_entry = p["hubs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["state"] == "selected")
        .unwrap();
    assert!(has(&hub_entry["addresses"], lan.addr(3)), "{p}");

    // A second hub for the same fleet (same fleet CA: a hub with a CA of its own is not
    // this fleet's, see `a_rogue_hub_takes_no_device_off_the_fleet`): both agents report the
    // conflict and keep the hub they use while it works.
    share_ca(&hub_a(dir), &dir.join("hub-hub-b"))?;
    let _hub_b = start_hub(&lan, 0, dir, "hub-b")?;
    for id in ["dev-a", "dev-b"] {
        let p = wait_until(Duration::from_secs(15), "conflict seen", || {
            let p = peers(dir, id)?;
            let conflict = p["hubs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["state"] == "conflict");
            Ok(conflict.then_some(p))
        })?;
        assert!(
            selected_hub(&p).unwrap().starts_with("farm-hub-a"),
            "{id}: {p}"
        );
        let log = std::fs::read_to_string(dir.join(format!("{id}.log")))?;
        assert!(log.contains("several hubs serve this fleet"), "{id} log");
    }

    // Offline autonomy: with no hub at all, a restarted agent runs its persisted workloads
    // and says so once per period, not in a flood.
    drop(_hub_b);
    drop(_hub3);
    b.kill();
    let b_log_len = std::fs::read_to_string(dir.join("dev-b.log"))?.len();
    let sensor_len = std::fs::read_to_string(&b_sensor_log)?.len();
    let _b2 = start_agent(&lan, 2, dir, "dev-b", "role=client")?;
    let no_hub = "no hub for this fleet found over mDNS yet";
    let since_restart = || -> Result<String> {
        Ok(std::fs::read_to_string(dir.join("dev-b.log"))?[b_log_len..].to_string())
    };
    wait_until(Duration::from_secs(20), "the no-hub line", || {
        Ok(since_restart()?.contains(no_hub).then_some(()))
    })?;
    // The next one is due a period (30 s) later: none in the next few seconds.
    std::thread::sleep(Duration::from_secs(4));
    let log = since_restart()?;
    assert_eq!(
        log.matches(no_hub).count(),
        1,
        "one line per period:\n{log}"
    );
    let sensor_log = std::fs::read_to_string(&b_sensor_log)?;
    assert!(
        sensor_log[sensor_len..].contains("beat 3"),
        "persisted workload runs without a hub"
    );
    if std::env::var_os("SHOAL_E2E_KEEP").is_some() {
        eprintln!("kept {}", tmp.keep().display());
    }
    Ok(())
}

/// Whether `device` is online at the hub the operator bundle `creds` belongs to.
fn online_at(lan: &Lan, host: usize, creds: &Path, device: &str) -> Result<bool> {
    let devices = json_as(lan, host, creds, &["get", "devices"])?;
    Ok(devices
        .as_array()
        .context("devices")?
        .iter()
        .any(|d| d["id"] == device && d["online"] == true))
}

/// The part of a log written after `from` bytes.
fn log_since(path: &Path, from: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.get(from..).unwrap_or_default().to_string()
}

/// A rogue hub on the LAN (its own data directory, hence its own fleet CA) advertising the
/// same fleet under a name that sorts before the real hub's takes no device off the fleet:
/// enrolled agents stay connected to the real hub (with or without `--hub`), keep running
/// their workloads and renew their certificates there; a new device enrolling over mDNS
/// with the real hub's join token still finds the real hub.
#[test]
fn a_rogue_hub_takes_no_device_off_the_fleet() -> Result<()> {
    let Some(lan) = Lan::new(5)? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let creds = hub_a(dir).join("operator");
    // Short-lived device certificates: renewals happen while the rogue advertises.
    let _hub = start_hub_with(&lan, 0, dir, "hub-a", &["--device-cert-lifetime", "30s"])?;
    let hub_url = format!("https://{}:8080", lan.addr(0));
    let _a = start_agent(&lan, 1, dir, "dev-a", "role=a")?;
    // dev-c is told where the hub is; mDNS then only finds the broker.
    let _c = start_agent_with(&lan, 4, dir, "dev-c", "role=c", &["--hub", &hub_url])?;
    wait_until(Duration::from_secs(30), "dev-a and dev-c online", || {
        Ok(
            (online_at(&lan, 0, &creds, "dev-a")? && online_at(&lan, 0, &creds, "dev-c")?)
                .then_some(()),
        )
    })?;
    let manifest = write_manifest(
        dir,
        "sensor.yaml",
        &format!(
            r#"
apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: sensor }}
spec:
  placement: every
  wasm: {{ module: "{probe}" }}
  args: ["heartbeat", "200"]
  resources: {{ memory: 16Mi }}
"#,
            probe = module("probe.wasm").display(),
        ),
    );
    let out = shoal_as(
        &lan,
        0,
        &creds,
        &["apply", "-f", manifest.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sensor_logs = || -> Vec<PathBuf> {
        ["dev-a", "dev-c"]
            .iter()
            .flat_map(|id| (0..3).map(move |r| dir.join(id).join(format!("logs/sensor-{r}.log"))))
            .filter(|p| p.is_file())
            .collect()
    };
    wait_until(
        Duration::from_secs(30),
        "sensor beats on dev-a and dev-c",
        || {
            let beating = sensor_logs()
                .iter()
                .filter(|p| {
                    std::fs::read_to_string(p)
                        .unwrap_or_default()
                        .contains("beat 2")
                })
                .count();
            Ok((beating == 2).then_some(()))
        },
    )?;

    // The rogue: same fleet, its own CA, a name that sorts first ("farm-a-rogue" <
    // "farm-hub-a"), reachable on the LAN.
    let a_log = dir.join("dev-a.log");
    let c_log = dir.join("dev-c.log");
    let (a_from, c_from) = (
        std::fs::read_to_string(&a_log)?.len(),
        std::fs::read_to_string(&c_log)?.len(),
    );
    let _rogue = start_hub(&lan, 2, dir, "a-rogue")?;
    for id in ["dev-a", "dev-c"] {
        wait_until(Duration::from_secs(20), "the rogue seen over mDNS", || {
            let p = peers(dir, id)?;
            let seen = p["hubs"].as_array().unwrap().iter().any(|h| {
                h["instance"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("farm-a-rogue"))
                    && has(&h["addresses"], lan.addr(2))
            });
            Ok(seen.then_some(()))
        })?;
    }
    let sizes = || -> Vec<u64> {
        sensor_logs()
            .iter()
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
            .collect()
    };
    let beats_before = sizes();

    // For longer than a certificate's renewal period: both stay online at the real hub,
    // connected to its broker, and never select the rogue.
    let hub_broker = format!("mqtts://{}:8883", lan.addr(0));
    let until = std::time::Instant::now() + Duration::from_secs(25);
    while std::time::Instant::now() < until {
        for id in ["dev-a", "dev-c"] {
            assert!(
                online_at(&lan, 0, &creds, id)?,
                "{id} went offline at the real hub while the rogue advertises:\n{}",
                log_since(&dir.join(format!("{id}.log")), 0)
            );
            let s = agent_status(dir, id)?;
            assert_eq!(s["hub"]["connected"], true, "{id}: {s}");
            assert_eq!(s["hub"]["broker"], hub_broker.as_str(), "{id}: {s}");
            let p = peers(dir, id)?;
            let sel = selected_hub(&p).unwrap_or_default();
            assert!(sel.starts_with("farm-hub-a"), "{id} selected {sel:?}: {p}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // The workload ran on throughout.
    let beats_after = sizes();
    assert!(
        beats_after.iter().zip(&beats_before).all(|(a, b)| a > b),
        "sensor stopped: {beats_before:?} → {beats_after:?}"
    );
    // Certificates were renewed at the real hub, never tried at the rogue.
    for (id, log, from) in [("dev-a", &a_log, a_from), ("dev-c", &c_log, c_from)] {
        let text = log_since(log, from);
        assert!(
            text.contains("device certificate renewed"),
            "{id} did not renew while the rogue advertised:\n{text}"
        );
        assert!(
            !text.contains("certificate renewal failed"),
            "{id} tried to renew elsewhere:\n{text}"
        );
    }
    // The rogue is shown as ignored (for its CA; one naming no CA, an older hub, for
    // failing authentication).
    let p = peers(dir, "dev-a")?;
    let rogue = p["hubs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| {
            h["instance"]
                .as_str()
                .is_some_and(|i| i.starts_with("farm-a-rogue"))
        })
        .cloned()
        .unwrap_or_default();
    let state = rogue["state"].as_str().unwrap_or_default();
    assert!(
        state.starts_with("ignored: ")
            && (state.contains("fleet CA") || state.contains("not authenticated")),
        "{p}"
    );

    // A new device enrolling over mDNS with the real hub's token finds the real hub, not
    // the rogue that sorts first.
    let _b = start_agent(&lan, 3, dir, "dev-b", "role=b")?;
    wait_until(
        Duration::from_secs(30),
        "dev-b enrolled at the real hub",
        || Ok(online_at(&lan, 0, &creds, "dev-b")?.then_some(())),
    )
    .with_context(|| log_since(&dir.join("dev-b.log"), 0))?;
    let rogue_creds = dir.join("hub-a-rogue").join("operator");
    assert!(
        !online_at(&lan, 2, &rogue_creds, "dev-b")?,
        "dev-b joined the rogue"
    );
    if std::env::var_os("SHOAL_E2E_KEEP").is_some() {
        eprintln!("kept {}", tmp.keep().display());
    }
    Ok(())
}
