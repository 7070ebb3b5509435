//! Hub replicas (issue 9): three hubs on one etcd and one mosquitto (TLS, the shipped ACL),
//! real agents. The leader is SIGKILLed in the middle of a rolling update: a standby takes
//! over within seconds, the rollout completes, no replica is lost or doubled and no
//! acknowledged manifest is lost; standbys serve reads and refuse changes; the old leader
//! comes back as a standby. Device statuses reach the replicas through a shared
//! subscription, each report one replica, and the leader decides on what the others pass
//! on. The broker is SIGKILLed under load and restarted: everyone
//! reconnects and the fleet converges. Join tokens made against etcd enroll through any
//! replica, once; a board wiped and enrolled again through a standby gets its secret sealed
//! to its new key by the leader.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use shoal_e2e::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

const LEASE: &str = "2s";

fn web(dir: &Path, file: &str, every_ms: u32) -> std::path::PathBuf {
    write_manifest(
        dir,
        file,
        &format!(
            r#"apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: web }}
spec:
  replicas: 6
  wasm: {{ module: "{probe}" }}
  args: ["heartbeat", "{every_ms}"]
  resources: {{ memory: 16Mi }}
  update: {{ maxUnavailable: 1, minReadySeconds: 2 }}
"#,
            probe = module("probe.wasm").display()
        ),
    )
}

/// A hub replica with its data under `dir` (its own directory per replica).
fn replica(dir: &Path, broker: &str, etcd: &str) -> anyhow::Result<Hub> {
    std::fs::create_dir_all(dir)?;
    Hub::start_with(
        dir,
        Some(broker),
        free_port(),
        free_port(),
        &[
            "--store",
            etcd,
            "--leader-lease",
            LEASE,
            // Longer than the failover: no device may be taken for lost meanwhile.
            "--device-grace",
            "60s",
        ],
    )
}

fn leaders(hubs: &[&Hub]) -> Vec<usize> {
    hubs.iter()
        .enumerate()
        .filter(|(_, h)| h.is_leader() == Some(true))
        .map(|(i, _)| i)
        .collect()
}

/// A workload's replicas as (ordinal, device, revision, phase).
fn replicas(w: &Value) -> Vec<(String, String, String, String)> {
    w["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (
                r["replica"].to_string(),
                s("device"),
                s("revision"),
                s("phase"),
            )
        })
        .collect()
}

/// Waits until the agents' local `ps` shows exactly `want` (sorted instance names) running:
/// each once, nothing twice, nothing missing.
fn each_runs_once(agents: &[Agent], want: &[String], within: Duration) {
    let mut last = Vec::new();
    let settled = wait_until(within, "each replica running once", || {
        let mut running = Vec::new();
        for a in agents {
            let out = std::process::Command::new(bin("shoal-agent"))
                .args(["ps", "-o", "json", "--socket"])
                .arg(a.data_dir.join("agent.sock"))
                .output()?;
            let ps: Value = serde_json::from_slice(&out.stdout)?;
            running.extend(
                ps.as_array()
                    .unwrap()
                    .iter()
                    .filter(|r| r["phase"] == "Running")
                    .map(|r| r["instance"].as_str().unwrap().to_string()),
            );
        }
        running.sort();
        last = running.clone();
        Ok((running == want).then_some(()))
    });
    assert!(settled.is_ok(), "devices run {last:?}, want {want:?}");
}

#[test]
fn a_killed_leader_is_replaced_within_seconds_and_its_rollout_completes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start(dir.path())?;
    // The broker's certificate comes from the first replica's fleet CA (`DIR/hub`), which
    // the others then take from etcd.
    let mq = Mosquitto::start(dir.path())?;
    let mut first = replica(dir.path(), &mq.url(), &etcd.url())?;
    wait_until(Duration::from_secs(15), "the first hub leads", || {
        Ok((first.is_leader() == Some(true)).then_some(()))
    })?;
    let second = replica(&dir.path().join("r2"), &mq.url(), &etcd.url())?;
    let third = replica(&dir.path().join("r3"), &mq.url(), &etcd.url())?;
    assert_eq!(second.is_leader(), Some(false));
    assert_eq!(third.is_leader(), Some(false));

    let agents: Vec<Agent> = ["a1", "a2", "a3"]
        .iter()
        .map(|id| Agent::start(dir.path(), id, "", &first.join()).unwrap())
        .collect();
    first.wait_devices_online(3, Duration::from_secs(30))?;
    first.apply(&web(dir.path(), "v1.yaml", 100))?;
    let v1 = first.wait_running("web", 6, Duration::from_secs(60))?;
    let rev1 = v1["revision"].as_str().unwrap().to_string();

    // A standby answers reads from what the leader stored and what devices report...
    let seen = second.wait_running("web", 6, Duration::from_secs(15))?;
    assert_eq!(seen["revision"], rev1.as_str());
    // ...which it reads again when etcd says the leader wrote, not on every tick (500 ms).
    let reloads = |h: &Hub| {
        metric(
            &h.metrics().unwrap_or_default(),
            "shoal_hub_standby_reloads_total",
            &[],
        )
        .unwrap_or(-1.0)
    };
    let before = reloads(&third);
    std::thread::sleep(Duration::from_secs(3));
    let idle = reloads(&third) - before;
    eprintln!("standby reloads in 3 s of a steady fleet: {idle}");
    assert!(
        before >= 1.0,
        "the standby never read the leader's writes: {before}"
    );
    assert!(
        idle <= 2.0,
        "a steady fleet made a standby read the store {idle} times in 3 s"
    );
    // Status ingest is spread: the broker hands each report to one replica (a shared
    // subscription), and the others learn it from that replica's ingest batches.
    let ingest = wait_until(
        Duration::from_secs(30),
        "every replica takes reports",
        || {
            let counts: Vec<(f64, f64)> = [&first, &second, &third]
                .iter()
                .map(|h| {
                    let m = h.metrics().unwrap_or_default();
                    let got = |kind| {
                        metric(
                            &m,
                            "shoal_hub_mqtt_messages_received_total",
                            &[("kind", kind)],
                        )
                        .unwrap_or(0.0)
                    };
                    (got("status"), got("ingest"))
                })
                .collect();
            Ok(counts
                .iter()
                .all(|&(status, ingest)| status > 0.0 && ingest > 0.0)
                .then_some(counts))
        },
    )?;
    eprintln!("(status, ingest) received per replica: {ingest:?}");
    // ...and refuses changes over its HTTP API, naming the leader (`shoal apply` goes over
    // MQTT, where only the leader answers).
    let out = second.shoal(&["scale", "web", "--replicas", "7"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "a standby scaled a workload");
    assert!(
        err.contains("standby") && err.contains(&first.hub_url()),
        "{err}"
    );

    // A rolling update, replica by replica, at least 2 s each (once v1's replicas count as
    // ready: unready ones would be replaced at once); the leader dies during it.
    std::thread::sleep(Duration::from_secs(3));
    first.apply(&web(dir.path(), "v2.yaml", 50))?;
    let other = write_manifest(
        dir.path(),
        "other.yaml",
        &format!(
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: other }}\nspec:\n  wasm: {{ module: \"{}\" }}\n  args: [heartbeat, \"200\"]\n  resources: {{ memory: 16Mi }}\n",
            module("probe.wasm").display()
        ),
    );
    first.apply(&other)?;
    let mut seen = Value::Null;
    let under_way = wait_until(Duration::from_secs(30), "the rollout under way", || {
        let w = first.workload("web")?.unwrap();
        let updated = w["rollout"]["updated"].as_u64().unwrap_or(0);
        let ok = w["rollout"]["state"] == "Progressing" && (1..6).contains(&updated);
        seen = w;
        Ok(ok.then_some(()))
    });
    assert!(under_way.is_ok(), "no rollout under way: {seen}");
    // A module uploaded to the leader only; a workload uses it after the failover.
    let out = first.shoal_ok(&["push", module("ticker.wasm").to_str().unwrap()]);
    let ticker = String::from_utf8(out.stdout)?.trim().to_string();
    first.proc.kill();
    let killed = Instant::now();
    let hubs = [&second, &third];
    let leader = wait_until(Duration::from_secs(15), "a new leader", || {
        Ok(leaders(&hubs).first().copied())
    })?;
    let failover = killed.elapsed();
    eprintln!("new leader after {failover:?}");
    assert!(
        failover < Duration::from_secs(5),
        "a new leader took {failover:?}"
    );
    let (leader, standby) = (hubs[leader], hubs[1 - leader]);
    assert_eq!(leaders(&hubs).len(), 1, "one leader");

    // The rollout goes on where it was and completes.
    let done = wait_until(Duration::from_secs(90), "the rollout completes", || {
        let w = leader.workload("web")?.unwrap();
        let reps = replicas(&w);
        let ok = w["rollout"]["state"] == "Complete"
            && reps.len() == 6
            && reps.iter().all(|r| r.3 == "Running" && r.2 != rev1);
        Ok(ok.then_some(w))
    })?;
    // Each replica exactly once, in the hub's view and on the devices: what the agents run
    // (their local `ps`) settles on each instance once, nothing twice, nothing missing.
    let reps = replicas(&done);
    let names: BTreeSet<&str> = reps.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(names.len(), 6, "{reps:?}");
    let mut want: Vec<String> = (0..6)
        .map(|i| format!("web-{i}"))
        .chain(["other-0".to_string()])
        .collect();
    want.sort();
    each_runs_once(&agents, &want, Duration::from_secs(30));
    // The new leader has the blob the old one took (through etcd), and the device that
    // runs it downloads it from the new leader.
    let late = write_manifest(
        dir.path(),
        "late.yaml",
        &format!(
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: late }}\nspec:\n  wasm: {{ module: \"{ticker}\" }}\n  args: [late]\n  resources: {{ memory: 16Mi }}\n"
        ),
    );
    leader.apply(&late)?;
    leader.wait_running("late", 1, Duration::from_secs(30))?;
    // Nothing acknowledged was lost.
    let w = leader.wait_running("other", 1, Duration::from_secs(30))?;
    assert_eq!(w["name"], "other");
    let history = leader.json(&["rollout", "history", "web"])?;
    assert!(history.as_array().unwrap().len() >= 2, "{history}");
    // The standby follows.
    wait_until(Duration::from_secs(15), "the standby follows", || {
        let w = standby.workload("web")?.unwrap();
        Ok((w["revision"] == done["revision"]).then_some(()))
    })?;

    // The old leader comes back (same data directory) and stands by.
    let back = replica(dir.path(), &mq.url(), &etcd.url())?;
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(back.is_leader(), Some(false));
    assert_eq!(leaders(&[&second, &third, &back]).len(), 1);
    drop(first);
    Ok(())
}

/// The broker (mosquitto, no persistence: it forgets every retained message) is SIGKILLed
/// while manifests keep arriving, and started again on its port. Hubs and agents reconnect,
/// the leader publishes every desired state again, and the fleet converges: every
/// acknowledged manifest runs, nothing runs twice.
#[test]
fn the_fleet_reconverges_after_the_broker_restarts_under_load() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start(dir.path())?;
    let mut mq = Mosquitto::start(dir.path())?;
    let leader = replica(dir.path(), &mq.url(), &etcd.url())?;
    wait_until(Duration::from_secs(15), "the first hub leads", || {
        Ok((leader.is_leader() == Some(true)).then_some(()))
    })?;
    let standby = replica(&dir.path().join("r2"), &mq.url(), &etcd.url())?;
    let agents: Vec<Agent> = ["b1", "b2", "b3"]
        .iter()
        .map(|id| Agent::start(dir.path(), id, "", &leader.join()).unwrap())
        .collect();
    leader.wait_devices_online(3, Duration::from_secs(30))?;
    let out = leader.shoal_ok(&["push", module("probe.wasm").to_str().unwrap()]);
    let digest = String::from_utf8(out.stdout)?.trim().to_string();

    // Load: one new workload after another, each acknowledged or not.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let applier = {
        let stop = stop.clone();
        let (dir, digest) = (dir.path().to_path_buf(), digest.clone());
        let env = [
            ("SHOAL_HUB", leader.hub_url()),
            ("SHOAL_BROKER", leader.broker_url.clone()),
            (
                "SHOAL_CREDENTIALS",
                leader.data_dir.join("operator").display().to_string(),
            ),
        ];
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 60 {
                let name = format!("w{n}");
                n += 1;
                let path = write_manifest(
                    &dir,
                    "load.yaml",
                    &format!(
                        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: {name} }}\nspec:\n  wasm: {{ module: \"{digest}\" }}\n  args: [heartbeat, \"500\"]\n  resources: {{ memory: 16Mi }}\n"
                    ),
                );
                let out = std::process::Command::new(bin("shoal"))
                    .args(["apply", "--timeout", "3s", "-f"])
                    .arg(&path)
                    .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                    .output()
                    .unwrap();
                if out.status.success() {
                    acked.push(name);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (acked, n)
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let port = mq.port;
    mq.proc.kill();
    std::thread::sleep(Duration::from_secs(2));
    mq = Mosquitto::start_on(dir.path(), port)?;
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, tried) = applier.join().unwrap();
    eprintln!(
        "{} of {tried} applies acknowledged around the broker restart",
        acked.len()
    );
    assert!(acked.len() >= 5, "only {} acknowledged", acked.len());

    // Everything acknowledged is stored and runs, once; devices are back online.
    leader.wait_devices_online(3, Duration::from_secs(30))?;
    for name in &acked {
        leader.wait_running(name, 1, Duration::from_secs(60))?;
    }
    let stored: BTreeSet<String> = leader
        .workloads()?
        .iter()
        .map(|w| w["name"].as_str().unwrap().to_string())
        .collect();
    let mut want: Vec<String> = stored.iter().map(|n| format!("{n}-0")).collect();
    want.sort();
    each_runs_once(&agents, &want, Duration::from_secs(60));
    // The restarted broker holds every device's desired state again (retained).
    for a in &agents {
        let topic = format!("shoal/v1/devices/{}/desired", a.id);
        assert!(retained(&mq.access(), &topic)?.is_some(), "{topic}");
    }
    // Leadership did not move: it lives in etcd, not in the broker.
    assert_eq!(leader.is_leader(), Some(true));
    assert_eq!(standby.is_leader(), Some(false));
    Ok(())
}

/// `shoal-agent run` as device `id` (data in `dir/data`; `edge-a` is labelled `role=db`,
/// where the workload with a secret goes) enrolling through `join`'s hub with `token`.
fn enrolling(dir: &Path, data: &str, id: &str, join: &Join, token: &str) -> std::process::Command {
    let mut c = std::process::Command::new(bin("shoal-agent"));
    let role = if id == "edge-a" {
        "role=db"
    } else {
        "role=other"
    };
    c.args(["run", "--no-mdns", "--no-containerd", "--labels", role])
        .args(["--device-id", id, "--data-dir"])
        .arg(dir.join(data))
        .args(["--broker", &join.broker, "--hub", &join.hub, "--socket"])
        .arg(dir.join(format!("{data}.sock")))
        .env("SHOAL_AGENT_JOIN_TOKEN", token);
    c
}

#[test]
fn join_tokens_and_enrollments_are_shared_by_the_replicas() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start(dir.path())?;
    let mq = Mosquitto::start(dir.path())?;
    let leader = replica(dir.path(), &mq.url(), &etcd.url())?;
    wait_until(Duration::from_secs(15), "the first hub leads", || {
        Ok((leader.is_leader() == Some(true)).then_some(()))
    })?;
    let standby = replica(&dir.path().join("r2"), &mq.url(), &etcd.url())?;
    let (to_leader, to_standby) = (leader.join(), standby.join());
    // `token create --store etcd://…` needs no replica's data dir: the token is in etcd.
    // Labels steer placement only when the operator grants them: here, through the token.
    let token = |device: Option<&str>, labels: &str| -> anyhow::Result<String> {
        let mut c = std::process::Command::new(bin("shoal-hub"));
        c.args([
            "token",
            "create",
            "--store",
            &etcd.url(),
            "--labels",
            labels,
        ]);
        if let Some(d) = device {
            c.args(["--device", d]);
        }
        let out = c.output()?;
        anyhow::ensure!(out.status.success(), "{out:?}");
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    };

    // A device enrolls through the standby; the leader seals its secret to the key the
    // standby recorded (and the label its token grants reaches the leader).
    let t = token(None, "role=db")?;
    let mut edge_a = Proc::spawn(
        "edge-a",
        &mut enrolling(dir.path(), "edge-a", "edge-a", &to_standby, &t),
        dir.path().join("edge-a.log"),
    )?;
    leader.wait_devices_online(1, Duration::from_secs(30))?;
    // The same token, used again through the leader: refused there as used (not unknown).
    let out = enrolling(dir.path(), "edge-b", "edge-b", &to_leader, &t).output()?;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("already used"), "{err}");
    // A token enrolls through the leader as well.
    let mut edge_c = Proc::spawn(
        "edge-c",
        &mut enrolling(
            dir.path(),
            "edge-c",
            "edge-c",
            &to_leader,
            &token(None, "role=other")?,
        ),
        dir.path().join("edge-c.log"),
    )?;
    leader.wait_devices_online(2, Duration::from_secs(30))?;
    for hub in [&leader, &standby] {
        for local in ["pki/tokens", "pki/devices"] {
            let path = hub.data_dir.join(local);
            assert!(
                !path.exists(),
                "{} exists: etcd holds these",
                path.display()
            );
        }
    }
    let value = format!("s3cr3t-{:016x}", rand::random::<u64>());
    let m = write_manifest(
        dir.path(),
        "app.yaml",
        &format!(
            "apiVersion: shoal.dev/v1\nkind: Secret\nmetadata: {{ name: db }}\nstringData: {{ password: \"{value}\" }}\n---\napiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: app }}\nspec:\n  selector: {{ role: db }}\n  wasm: {{ module: \"{}\" }}\n  args: [secret, /etc/db/password, DB_PASSWORD, /data/out]\n  volumes: [{{ name: data, path: /data }}]\n  secrets: [{{ name: db, path: /etc/db, env: {{ DB_PASSWORD: password }} }}]\n",
            module("probe.wasm").display()
        ),
    );
    leader.apply(&m)?;
    let seen = |data: &str| {
        let path = dir.path().join(data).join("volumes/app/data/out");
        let want = format!("file={value}\nenv={value}\n");
        let mut last = String::new();
        let r = wait_until(
            Duration::from_secs(30),
            "the workload sees the secret",
            || {
                last = std::fs::read_to_string(&path).unwrap_or_default();
                Ok((last == want).then_some(()))
            },
        );
        assert!(r.is_ok(), "{} holds {last:?}", path.display());
    };
    seen("edge-a");
    edge_c.kill();

    // The board is wiped and enrolls again through the standby, with a new key and a token
    // bound to it: the standby tells the leader, which seals the secret to the new key.
    edge_a.kill();
    let t = token(Some("edge-a"), "role=db")?;
    let mut wiped = Proc::spawn(
        "edge-a-wiped",
        &mut enrolling(dir.path(), "edge-a-wiped", "edge-a", &to_standby, &t),
        dir.path().join("edge-a-wiped.log"),
    )?;
    seen("edge-a-wiped");
    wiped.kill();
    Ok(())
}
