//! A fleet of one hub (embedded broker) and two agents: apply, run, delete.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_e2e::*;
use std::time::Duration;

#[test]
fn manifest_runs_on_the_right_devices_and_delete_stops_it_everywhere() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let a1 = Agent::start(dir.path(), "edge-1", "role=sensor,zone=a", &hub.join())?;
    let a2 = Agent::start(dir.path(), "edge-2", "zone=b", &hub.join())?;
    hub.wait_devices_online(2, Duration::from_secs(20))?;

    let devices = hub.devices()?;
    let d1 = devices.iter().find(|d| d["id"] == "edge-1").unwrap();
    assert_eq!(d1["labels"]["role"], "sensor");
    assert_eq!(d1["runtimes"][0], "wasm");
    assert_eq!(d1["arch"], std::env::consts::ARCH);
    assert!(d1["cpus"].as_u64().unwrap() >= 1);
    assert_eq!(d1["memory"], 1u64 << 30);
    assert!(!d1["agentVersion"].as_str().unwrap().is_empty());

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
  wasm: {{ module: "{hello}" }}
  args: ["--e2e"]
  env: {{ GREETING: "howdy", INTERVAL_MS: "100" }}
  resources: {{ memory: 32Mi }}
---
apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: sensor }}
spec:
  placement: every
  selector: {{ role: sensor }}
  wasm: {{ module: "{probe}" }}
  args: ["heartbeat", "100"]
  resources: {{ memory: 16Mi, cpu: 100m }}
"#,
            hello = module("hello.wasm").display(),
            probe = module("probe.wasm").display()
        ),
    );
    let out = hub.apply(&manifest)?;
    assert!(out.contains("workload/web created"), "{out}");
    assert!(out.contains("workload/sensor created"), "{out}");

    let web = hub.wait_running("web", 2, Duration::from_secs(60))?;
    let mut web_devices: Vec<&str> = web["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["device"].as_str().unwrap())
        .collect();
    web_devices.sort();
    assert_eq!(
        web_devices,
        ["edge-1", "edge-2"],
        "replicas spread over both devices"
    );
    let sensor = hub.wait_running("sensor", 1, Duration::from_secs(60))?;
    assert_eq!(
        sensor["replicas"][0]["device"], "edge-1",
        "every + selector: only the sensor device"
    );
    assert_eq!(sensor["replicas"][0]["variant"], "wasm");

    // The modules' output reached the per-workload logs on the devices that run them.
    let instance_on = |agent: &Agent| {
        let r = web["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["device"] == agent.id.as_str())
            .unwrap();
        format!("web-{}", r["replica"])
    };
    wait_until(Duration::from_secs(10), "module output in logs", || {
        let l1 = a1.workload_log(&instance_on(&a1));
        let l2 = a2.workload_log(&instance_on(&a2));
        let s1 = a1.workload_log("sensor-0");
        Ok(
            (l1.contains("howdy from a wasip2 component; args=[\"--e2e\"]")
                && l2.contains("heartbeat 2")
                && s1.contains("beat 3"))
            .then_some(()),
        )
    })?;
    assert!(
        a2.workload_log("sensor-0").is_empty(),
        "sensor must not run on edge-2"
    );

    // Delete: the workloads stop everywhere.
    for name in ["web", "sensor"] {
        hub.shoal_ok(&["delete", "workload", name]);
    }
    assert!(hub.workloads()?.is_empty());
    for agent in [&a1, &a2] {
        wait_until(
            Duration::from_secs(10),
            "device reports no workloads",
            || {
                let Some(s) = retained(
                    &hub.access(),
                    &format!("shoal/v1/devices/{}/status", agent.id),
                )?
                else {
                    return Ok(None);
                };
                let v: serde_json::Value = serde_json::from_str(&s)?;
                Ok(v["workloads"]
                    .as_array()
                    .is_some_and(|w| w.is_empty())
                    .then_some(()))
            },
        )?;
    }
    // And they really stopped: their logs no longer grow.
    let sizes = |a: &Agent| {
        (
            a.workload_log("sensor-0").len(),
            a.workload_log(&instance_on(a)).len(),
        )
    };
    let before = (sizes(&a1), sizes(&a2));
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        (sizes(&a1), sizes(&a2)),
        before,
        "logs still growing after delete"
    );

    // Deleting again says so.
    let out = hub.shoal(&["delete", "workload", "web"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("workload \"web\" not found"));
    Ok(())
}

#[test]
fn graceful_shutdown_marks_device_offline() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut hub = Hub::start(dir.path(), None)?;
    let mut a1 = Agent::start(dir.path(), "edge-1", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    assert!(
        a1.proc.terminate(Duration::from_secs(5))?,
        "agent exits 0 on SIGTERM"
    );
    wait_until(Duration::from_secs(10), "device offline", || {
        Ok(hub
            .devices()?
            .iter()
            .any(|d| d["id"] == "edge-1" && d["online"] == false)
            .then_some(()))
    })?;
    assert!(
        hub.proc.terminate(Duration::from_secs(5))?,
        "hub exits 0 on SIGTERM"
    );
    Ok(())
}
