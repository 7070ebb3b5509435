//! Placement labels belong to the operator. A device that claims `role=vault` with its own
//! `--labels` (or in a hello it publishes itself) gets neither the vault's workload nor its
//! secret; the operator grants labels through the join token (`shoal-hub token create
//! --labels`) or on the hub (`shoal label device D k=v`, `k-`, `--overwrite`), and only then
//! do workload and secret follow. A device that reports an absurd capacity is not believed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use serde_json::Value;
use shoal_e2e::*;
use std::time::Duration;

/// The retained desired state of `device`, unwrapped from its signed envelope.
fn desired_state(hub: &Hub, device: &str) -> Result<Value> {
    use base64::Engine as _;
    let raw = retained(&hub.access(), &format!("shoal/v1/devices/{device}/desired"))?
        .ok_or_else(|| anyhow::anyhow!("no retained desired state for {device}"))?;
    let env: Value = serde_json::from_str(&raw)?;
    let state = base64::engine::general_purpose::STANDARD
        .decode(env["state"].as_str().unwrap_or_default())?;
    Ok(serde_json::from_slice(&state)?)
}

fn device(hub: &Hub, id: &str) -> Result<Value> {
    hub.devices()?
        .into_iter()
        .find(|d| d["id"] == id)
        .ok_or_else(|| anyhow::anyhow!("no device {id}"))
}

/// The devices the replicas of `workload` are placed on, sorted.
fn placed_on(hub: &Hub, workload: &str) -> Result<Vec<String>> {
    let w = hub.workload(workload)?.unwrap_or_default();
    let mut on: Vec<String> = w["replicas"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r["device"].as_str().map(str::to_string))
        .collect();
    on.sort();
    Ok(on)
}

#[test]
fn a_device_cannot_label_itself_into_another_workloads_secrets() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    // The vault board's token grants it `role=vault`; the thief's token grants nothing, but
    // it asks for `role=vault` all the same.
    let vault = Agent::start(dir.path(), "edge-vault", "role=vault", &hub.join())?;
    let mut join = hub.join();
    join.grant_labels = false;
    let thief = Agent::start(dir.path(), "edge-thief", "role=vault", &join)?;
    hub.wait_devices_online(2, Duration::from_secs(20))?;

    let d = device(&hub, "edge-thief")?;
    assert!(d["labels"].get("role").is_none(), "granted itself: {d}");
    assert_eq!(d["requestedLabels"]["role"], "vault", "{d}");
    assert_eq!(device(&hub, "edge-vault")?["labels"]["role"], "vault");

    std::fs::copy(module("probe.wasm"), dir.path().join("probe.wasm"))?;
    let value = format!("v4ult-{:016x}", rand::random::<u64>());
    let m = write_manifest(
        dir.path(),
        "vault.yaml",
        &format!(
            "apiVersion: shoal.dev/v1\nkind: Secret\nmetadata: {{ name: vault }}\nstringData: {{ key: \"{value}\" }}\n---\napiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: vault }}\nspec:\n  placement: every\n  selector: {{ role: vault }}\n  wasm: {{ module: ./probe.wasm }}\n  args: [secret, /etc/vault/key, VAULT_KEY, /data/out]\n  volumes: [{{ name: data, path: /data }}]\n  secrets: [{{ name: vault, path: /etc/vault, env: {{ VAULT_KEY: key }} }}]\n"
        ),
    );
    hub.apply(&m)?;
    hub.wait_running("vault", 1, Duration::from_secs(30))?;
    let out = |a: &Agent| a.data_dir.join("volumes/vault/data/out");
    let want = format!("file={value}\nenv={value}\n");
    let sees = |a: &Agent| std::fs::read_to_string(out(a)).unwrap_or_default() == want;
    wait_until(
        Duration::from_secs(30),
        "the vault board sees its secret",
        || Ok(sees(&vault).then_some(())),
    )?;

    // The thief is not placed and is sealed nothing, however long it waits.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(placed_on(&hub, "vault")?, vec!["edge-vault".to_string()]);
    let state = desired_state(&hub, "edge-thief")?;
    assert!(state.get("secrets").is_none(), "{state}");
    assert!(
        state["workloads"].as_array().is_none_or(|w| w.is_empty()),
        "{state}"
    );
    assert!(!sees(&thief));

    // Changing a label's value needs --overwrite; the refusal names the label and changes
    // nothing.
    let o = hub.shoal(&["label", "device", "edge-vault", "role=other"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "relabelled without --overwrite");
    assert!(err.contains("role") && err.contains("--overwrite"), "{err}");
    // A device the hub has never heard of cannot be labelled.
    let o = hub.shoal(&["label", "device", "edge-nobody", "role=vault"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("edge-nobody"));
    assert_eq!(device(&hub, "edge-vault")?["labels"]["role"], "vault");

    // Once the operator labels it, it gets both the workload and the secret.
    hub.shoal_ok(&["label", "device", "edge-thief", "role=vault"]);
    assert_eq!(device(&hub, "edge-thief")?["labels"]["role"], "vault");
    hub.wait_running("vault", 2, Duration::from_secs(30))?;
    wait_until(
        Duration::from_secs(30),
        "the labelled board sees the secret",
        || Ok(sees(&thief).then_some(())),
    )?;
    // `get devices` shows the labels the operator gave.
    let table = hub.shoal_ok(&["get", "devices"]);
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    let row = table
        .lines()
        .find(|l| l.starts_with("edge-thief"))
        .unwrap_or_default();
    assert!(row.contains("role=vault"), "{table}");

    // `role-` takes it away again: the replica leaves the device.
    hub.shoal_ok(&["label", "device", "edge-thief", "role-"]);
    wait_until(
        Duration::from_secs(30),
        "the replica to leave edge-thief",
        || Ok((placed_on(&hub, "vault")? == vec!["edge-vault".to_string()]).then_some(())),
    )?;
    assert!(device(&hub, "edge-thief")?["labels"].get("role").is_none());
    Ok(())
}

#[test]
fn a_hello_claiming_absurd_capacity_or_reserved_labels_is_not_believed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let mut a = Agent::start(dir.path(), "edge-a", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    let before = device(&hub, "edge-a")?;
    // Whoever holds the device's key (its agent stopped, so it does not say hello again)
    // publishes, with its certificate on its own topic (which the broker allows), a hello
    // that claims an exabyte of memory, a million CPUs and a label under the operator-only
    // prefix.
    a.proc.kill();
    let publish = |hello: &serde_json::Value| -> Result<()> {
        let body = hello.to_string();
        let args = ["-t", "shoal/v1/devices/edge-a/hello", "-m", &body];
        let out = publish_as_device(hub.mqtt, &a, &args.map(std::ffi::OsStr::new))?;
        anyhow::ensure!(out.status.success(), "{out:?}");
        Ok(())
    };
    let hello = |memory: u64, cpus: u32| {
        serde_json::json!({
            "protocol": 1, "deviceId": "edge-a", "arch": "x86_64", "os": "linux",
            "runtimes": ["wasm"], "cpus": cpus, "memory": memory,
            "labels": { "shoal.dev/trusted": "yes", "role": "vault" }, "agentVersion": "x"
        })
    };
    publish(&hello(1 << 60, 1_000_000))?;
    std::thread::sleep(Duration::from_secs(2));
    let after = device(&hub, "edge-a")?;
    assert_eq!(after["memory"], before["memory"], "{after}");
    assert_eq!(after["cpus"], before["cpus"], "{after}");
    let log = std::fs::read_to_string(dir.path().join("hub.log")).unwrap_or_default();
    assert!(
        log.contains("hello refused") && log.contains("1152921504606846976"),
        "no refusal naming the value in the hub's log"
    );
    // Within bounds the hello is taken, but the labels it asks for are requests only.
    publish(&hello(2 << 30, 4))?;
    wait_until(
        Duration::from_secs(10),
        "the sane hello to be taken",
        || Ok((device(&hub, "edge-a")?["memory"] == 2u64 << 30).then_some(())),
    )?;
    let after = device(&hub, "edge-a")?;
    assert_eq!(after["labels"], serde_json::json!({}), "{after}");
    assert_eq!(
        after["requestedLabels"]["shoal.dev/trusted"], "yes",
        "{after}"
    );
    assert_eq!(after["requestedLabels"]["role"], "vault", "{after}");
    Ok(())
}
