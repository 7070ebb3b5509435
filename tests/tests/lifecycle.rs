//! Fleet lifecycle with real agents: a device lost past the grace period has its replicas
//! moved; when it returns, no duplicate is left running and what still belongs on it is not
//! restarted; cordon and drain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use shoal_e2e::*;
use std::time::Duration;

fn devices_of(w: &Value) -> Vec<String> {
    let mut d: Vec<String> = w["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["device"].as_str().unwrap_or("").to_string())
        .collect();
    d.sort();
    d
}

/// The instances a device reports running, from its retained status on the broker.
fn reported(mq: &shoal_e2e::BrokerAccess, device: &str) -> anyhow::Result<Vec<String>> {
    let Some(s) = retained(mq, &format!("shoal/v1/devices/{device}/status"))? else {
        return Ok(vec![]);
    };
    let v: Value = serde_json::from_str(&s)?;
    Ok(v["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| format!("{}-{}", w["name"].as_str().unwrap(), w["replica"]))
        .collect())
}

#[test]
fn lost_device_is_rescheduled_and_returns_without_duplicates() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mq = Mosquitto::start(dir.path())?;
    let hub = Hub::start_with(
        dir.path(),
        Some(&mq.url()),
        free_port(),
        free_port(),
        &["--device-grace", "2s"],
    )?;
    let mut agents: Vec<Agent> = ["d1", "d2", "d3"]
        .iter()
        .map(|id| Agent::start(dir.path(), id, "role=edge", &hub.join()).unwrap())
        .collect();
    hub.wait_devices_online(3, Duration::from_secs(20))?;
    let manifest = write_manifest(
        dir.path(),
        "fleet.yaml",
        &format!(
            r#"
apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: web }}
spec:
  replicas: 2
  wasm: {{ module: "{probe}" }}
  args: ["heartbeat", "200"]
  resources: {{ memory: 16Mi }}
---
apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: sensor }}
spec:
  placement: every
  wasm: {{ module: "{probe}" }}
  args: ["heartbeat", "200"]
  resources: {{ memory: 16Mi }}
"#,
            probe = module("probe.wasm").display()
        ),
    );
    hub.apply(&manifest)?;
    let web = hub.wait_running("web", 2, Duration::from_secs(60))?;
    hub.wait_running("sensor", 3, Duration::from_secs(60))?;
    let victim = devices_of(&web)[0].clone();
    let idx = agents.iter().position(|a| a.id == victim).unwrap();

    // SIGKILL the victim: after the 2 s grace its `web` replica runs elsewhere.
    agents[idx].proc.kill();
    let web = wait_until(
        Duration::from_secs(20),
        "web moved off the lost device",
        || {
            let w = hub.workload("web")?.unwrap();
            let running = w["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["phase"] == "Running")
                .count();
            Ok((running == 2 && !devices_of(&w).contains(&victim)).then_some(w))
        },
    )
    .map_err(|e| {
        e.context(format!(
            "web: {}\nhub log:\n{}",
            hub.workload("web").ok().flatten().unwrap_or_default(),
            hub.proc.log_text()
        ))
    })?;
    let devices = hub.devices()?;
    let v = devices.iter().find(|d| d["id"] == victim.as_str()).unwrap();
    assert_eq!(v["lost"], true, "{v}");
    let sensor = hub.workload("sensor")?.unwrap();
    assert!(
        devices_of(&sensor).contains(&victim),
        "every replicas stay: {sensor}"
    );

    // It comes back (same data dir): it first resumes its persisted state, then the hub's
    // newer desired state stops the moved replica. Nothing is left running twice, and its
    // `sensor` replica is not restarted by the hub.
    agents[idx] = Agent::start(dir.path(), &victim, "role=edge", &hub.join())?;
    wait_until(
        Duration::from_secs(20),
        "victim back and reconciled",
        || {
            let mine = reported(&mq.access(), &victim)?;
            let online = hub
                .devices()?
                .iter()
                .any(|d| d["id"] == victim.as_str() && d["online"] == true && d["lost"] == false);
            Ok(
                (online && !mine.is_empty() && mine.iter().all(|i| i.starts_with("sensor-")))
                    .then_some(()),
            )
        },
    )?;
    let mut running_web = Vec::new();
    for a in &agents {
        running_web.extend(
            reported(&mq.access(), &a.id)?
                .into_iter()
                .filter(|i| i.starts_with("web-"))
                .map(|i| format!("{i}@{}", a.id)),
        );
    }
    assert_eq!(
        running_web.len(),
        2,
        "no duplicate web replicas: {running_web:?}"
    );
    assert_eq!(
        devices_of(&hub.workload("web")?.unwrap()),
        devices_of(&web),
        "no churn"
    );
    let sensor_log = std::fs::read_dir(agents[idx].data_dir.join("logs"))?
        .filter_map(|e| e.ok())
        .find(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("sensor-") && name.ends_with(".log")
        })
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .unwrap();
    assert_eq!(
        count_lines(&sensor_log, "[shoal] started"),
        2,
        "started before the kill and once after the restart, not again:\n{sensor_log}"
    );

    // Drain another device: its web replica moves, nothing new lands on it.
    let other = devices_of(&web).into_iter().find(|d| d != &victim).unwrap();
    hub.shoal_ok(&["drain", &other]);
    let w = wait_until(Duration::from_secs(20), "web drained", || {
        let w = hub.workload("web")?.unwrap();
        Ok((!devices_of(&w).contains(&other)).then_some(w))
    })?;
    assert_eq!(devices_of(&w).len(), 2);
    let listing = String::from_utf8_lossy(&hub.shoal(&["get", "devices"]).stdout).to_string();
    assert!(listing.contains("Online,Cordoned"), "{listing}");
    let out = hub.shoal(&["uncordon", &other]);
    assert!(out.status.success());
    let out = hub.shoal(&["cordon", "no-such-device"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("device \"no-such-device\" not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
