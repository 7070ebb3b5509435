//! Start order on a device (`spec.after`), end to end on a real agent: a replica waits,
//! phase `Waiting` with the reason, until the workload it starts after runs on its device;
//! when that one goes, a dependent with `restartWith` stops to wait again and one without
//! keeps running; a cycle is refused at apply (golden `after-cycle`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use serde_json::Value;
use shoal_e2e::*;
use std::time::Duration;

fn workload(name: &str, after: &str) -> String {
    format!(
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: {name} }}\nspec:\n  wasm: {{ module: ./probe.wasm }}\n  args: [heartbeat, \"500\"]\n{after}"
    )
}

/// The first replica of `name` once `ok` says it is as wanted.
fn wait_replica(hub: &Hub, name: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Result<Value> {
    wait_until(Duration::from_secs(30), what, || {
        let r = hub
            .workload(name)?
            .and_then(|w| w["replicas"].as_array().and_then(|r| r.first().cloned()));
        Ok(r.filter(|r| ok(r)))
    })
}

#[test]
fn a_replica_starts_after_the_workloads_it_names_on_its_device() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let a = Agent::start(dir.path(), "edge-a", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    std::fs::copy(module("probe.wasm"), dir.path().join("probe.wasm"))?;

    let app = workload("app", "  after: [{ workload: broker }]\n");
    let watcher = workload(
        "watcher",
        "  after: [{ workload: broker, condition: Running, restartWith: true }]\n",
    );
    hub.apply(&write_manifest(
        dir.path(),
        "app.yaml",
        &format!("{app}---\n{watcher}"),
    ))?;
    let r = wait_replica(&hub, "app", "app waiting", |r| r["phase"] == "Waiting")?;
    assert_eq!(
        r["reason"], "waiting for broker to be Running (no replica of it on this device)",
        "{r}"
    );
    assert!(a.workload_log("app-0").is_empty(), "app never started");

    hub.apply(&write_manifest(
        dir.path(),
        "broker.yaml",
        &workload("broker", ""),
    ))?;
    let app_r = wait_replica(&hub, "app", "app running", |r| r["phase"] == "Running")?;
    let broker = wait_replica(&hub, "broker", "broker running", |r| {
        r["phase"] == "Running"
    })?;
    wait_replica(&hub, "watcher", "watcher running", |r| {
        r["phase"] == "Running"
    })?;
    assert!(
        app_r["startedAtMs"].as_u64() >= broker["startedAtMs"].as_u64(),
        "app {app_r} started before broker {broker}"
    );

    // The broker goes: the watcher (restartWith) stops to wait again, app keeps running.
    hub.shoal_ok(&["delete", "workload", "broker"]);
    let w = wait_replica(&hub, "watcher", "watcher waiting again", |r| {
        r["phase"] == "Waiting"
    })?;
    assert!(
        w["reason"].as_str().unwrap().contains("waiting for broker"),
        "{w}"
    );
    let app_now = wait_replica(&hub, "app", "app still running", |r| {
        r["phase"] == "Running"
    })?;
    assert_eq!(
        app_now["startedAtMs"], app_r["startedAtMs"],
        "app was not restarted"
    );
    assert_eq!(app_now["restarts"], 0);
    Ok(())
}
