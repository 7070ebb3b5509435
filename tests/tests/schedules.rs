//! Schedules that run on the device, end to end: a real agent fires a workload's runs on a
//! short cron schedule by its own clock, each run bumping a counter in a volume; with the
//! broker stopped (a mosquitto the hub and agent both use), runs still fire on the device,
//! and once the broker is back the device reports them, marked as fired offline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use serde_json::Value;
use shoal_e2e::*;
use std::time::Duration;

const NIGHTLY: &str = "apiVersion: shoal.dev/v1
kind: Workload
metadata: { name: nightly }
spec:
  wasm: { module: ./probe.wasm }
  args: [count, /data/runs]
  volumes: [{ name: data, path: /data }]
  schedule: { cron: \"*/2 * * * * *\", timeZone: Europe/Berlin }
  completion: { backoffLimit: 1 }
";

fn runs(agent: &Agent) -> u64 {
    std::fs::read_to_string(agent.data_dir.join("volumes/nightly/data/runs"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The scheduled replica's status part, as the hub shows it.
fn schedule(hub: &Hub) -> Result<Option<Value>> {
    Ok(hub.workload("nightly")?.and_then(|w| {
        w["replicas"][0]["schedule"]
            .as_object()
            .map(|o| Value::Object(o.clone()))
    }))
}

#[test]
fn a_schedule_fires_on_the_device_also_while_the_broker_is_down() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut mq = Mosquitto::start(dir.path())?;
    let hub = Hub::start(dir.path(), Some(&mq.url()))?;
    let agent = Agent::start(dir.path(), "edge-1", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    std::fs::copy(module("probe.wasm"), dir.path().join("probe.wasm"))?;
    hub.apply(&write_manifest(dir.path(), "nightly.yaml", NIGHTLY))?;

    wait_until(Duration::from_secs(30), "two scheduled runs", || {
        Ok((runs(&agent) >= 2).then_some(()))
    })?;
    let s = wait_until(Duration::from_secs(20), "the runs reported", || {
        Ok(schedule(&hub)?.filter(|s| {
            s["runs"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["outcome"] == "Succeeded"))
        }))
    })?;
    assert!(s["nextMs"].as_u64().is_some(), "{s}");
    let described = hub.shoal_ok(&["get", "workloads"]);
    let described = String::from_utf8_lossy(&described.stdout);
    assert!(described.contains("nightly"), "{described}");

    // The broker goes: the device keeps firing on its own clock.
    let port = mq.port;
    mq.proc.kill();
    let before = runs(&agent);
    wait_until(
        Duration::from_secs(30),
        "runs while the broker is down",
        || Ok((runs(&agent) >= before + 2).then_some(())),
    )?;
    // Back: the runs fired offline are reported.
    mq = Mosquitto::start_on(dir.path(), port)?;
    let s = wait_until(Duration::from_secs(60), "offline runs reported", || {
        Ok(schedule(&hub)?.filter(|s| {
            s["runs"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|r| r["offline"] == true && r["outcome"] == "Succeeded")
            })
        }))
    })?;
    let history = s["runs"].as_array().unwrap();
    assert!(history.len() <= 10, "{s}");
    // Each scheduled second ran once.
    let mut times: Vec<u64> = history
        .iter()
        .map(|r| r["scheduledMs"].as_u64().unwrap())
        .collect();
    let n = times.len();
    times.dedup();
    assert_eq!(times.len(), n, "{s}");
    assert!(times.iter().all(|t| t % 2_000 == 0), "{s}");
    drop(mq);
    Ok(())
}
