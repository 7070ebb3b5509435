//! `shoal delete device`: refused while the device is online; once its
//! agent is gone the hub forgets it: `get devices` no longer lists it, its replica runs
//! elsewhere, and the broker keeps only an emptied desired state for it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use shoal_e2e::*;
use std::time::Duration;

/// What the broker has retained on `topic` (empty: nothing).
fn retained(hub: &Hub, topic: &str) -> Result<String> {
    let out = std::process::Command::new("mosquitto_sub")
        .args(hub.access().mosquitto_args())
        .args(["-t", topic, "-C", "1", "-W", "2", "--retained-only"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn an_offline_device_is_forgotten() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let mut a = Agent::start(dir.path(), "edge-a", "", &hub.join())?;
    let _b = Agent::start(dir.path(), "edge-b", "", &hub.join())?;
    hub.wait_devices_online(2, Duration::from_secs(20))?;
    std::fs::copy(module("probe.wasm"), dir.path().join("probe.wasm"))?;
    let m = write_manifest(
        dir.path(),
        "app.yaml",
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: app }\nspec:\n  replicas: 2\n  wasm: { module: ./probe.wasm }\n  args: [heartbeat, \"500\"]\n",
    );
    hub.apply(&m)?;
    hub.wait_running("app", 2, Duration::from_secs(30))?;
    let desired = "shoal/v1/devices/edge-a/desired";
    let before = retained(&hub, desired)?;
    assert!(!before.is_empty(), "a retained desired state");

    let out = hub.shoal(&["delete", "device", "edge-a"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("device \"edge-a\" is online"),
        "{err}"
    );
    a.proc.kill();
    wait_until(Duration::from_secs(30), "edge-a offline", || {
        let d = hub.devices()?;
        Ok(d.iter()
            .any(|x| x["id"] == "edge-a" && x["online"] == false)
            .then_some(()))
    })?;
    let out = hub.shoal_ok(&["delete", "device", "edge-a"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("device/edge-a deleted"));
    let devices = hub.devices()?;
    assert!(devices.iter().all(|x| x["id"] != "edge-a"), "{devices:?}");
    // Its hello, status and presence are gone; an emptied desired state (newer) stays, so
    // that a board that comes back stops what it ran.
    assert_eq!(retained(&hub, "shoal/v1/devices/edge-a/status")?, "");
    assert_eq!(retained(&hub, "shoal/v1/devices/edge-a/hello")?, "");
    assert_eq!(retained(&hub, "shoal/v1/devices/edge-a/presence")?, "");
    let after = retained(&hub, desired)?;
    assert!(!after.is_empty() && after != before, "{after}");
    // Both replicas run on the device that is left.
    wait_until(Duration::from_secs(30), "both replicas on edge-b", || {
        let w = hub.json(&["describe", "workload", "app"])?;
        let on_b = w["replicas"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter(|x| x["device"] == "edge-b" && x["phase"] == "Running")
                    .count()
            })
            .unwrap_or(0);
        Ok((on_b == 2).then_some(()))
    })?;
    let out = hub.shoal(&["delete", "device", "edge-a"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    Ok(())
}
