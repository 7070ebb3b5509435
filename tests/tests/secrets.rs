//! Secrets end to end: a `kind: Secret` applied with a workload that reads it as a file and
//! an environment variable. The value reaches the workload on the device that runs it and
//! nowhere else: not `shoal get`/`describe`, not the retained desired states, not the hub's
//! store or logs, not the device that does not run it. A new value restarts the replica with
//! it; the agent re-opens it after a SIGKILL; bad references are refused and change nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use shoal_e2e::*;
use std::path::Path;
use std::time::Duration;

/// Every file under `dir` whose bytes contain `needle` (skipping `skip` subtrees).
fn files_containing(dir: &Path, needle: &[u8], skip: &[&Path]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if skip.iter().any(|s| p.starts_with(s)) {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(p.display().to_string());
                }
            }
        }
    }
    hits
}

fn secret_doc(value: &str) -> String {
    format!(
        "apiVersion: shoal.dev/v1\nkind: Secret\nmetadata: {{ name: db }}\nstringData: {{ password: \"{value}\", user: app }}\n"
    )
}

/// The retained desired state of `device`, unwrapped from its signed envelope.
fn desired_state(hub: &Hub, device: &str) -> Result<serde_json::Value> {
    use base64::Engine as _;
    let raw = retained(&hub.access(), &format!("shoal/v1/devices/{device}/desired"))?
        .ok_or_else(|| anyhow::anyhow!("no retained desired state for {device}"))?;
    let env: serde_json::Value = serde_json::from_str(&raw)?;
    let state = base64::engine::general_purpose::STANDARD
        .decode(env["state"].as_str().unwrap_or_default())?;
    Ok(serde_json::from_slice(&state)?)
}

#[test]
fn a_secret_reaches_only_the_workload_that_uses_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut hub = Hub::start(dir.path(), None)?;
    let mut a = Agent::start(dir.path(), "edge-a", "role=db", &hub.join())?;
    let b = Agent::start(dir.path(), "edge-b", "", &hub.join())?;
    hub.wait_devices_online(2, Duration::from_secs(20))?;
    std::fs::copy(module("probe.wasm"), dir.path().join("probe.wasm"))?;
    let v1 = format!("s3cr3t-{:016x}", rand::random::<u64>());
    let v2 = format!("r0tated-{:016x}", rand::random::<u64>());
    let workloads = "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: app }\nspec:\n  selector: { role: db }\n  wasm: { module: ./probe.wasm }\n  args: [secret, /etc/db/password, DB_PASSWORD, /data/out]\n  volumes: [{ name: data, path: /data }]\n  secrets: [{ name: db, path: /etc/db, env: { DB_PASSWORD: password } }]\n---\napiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: plain }\nspec:\n  selector: { role: { notIn: [db] } }\n  wasm: { module: ./probe.wasm }\n  args: [heartbeat, \"500\"]\n";
    let m = write_manifest(
        dir.path(),
        "app.yaml",
        &format!("{}---\n{workloads}", secret_doc(&v1)),
    );
    let out = hub.apply(&m)?;
    assert!(out.contains("secret/db created"), "{out}");
    hub.wait_running("app", 1, Duration::from_secs(30))?;
    hub.wait_running("plain", 1, Duration::from_secs(30))?;

    // The workload sees the value as a read-only file and as its environment variable.
    let out_file = a.data_dir.join("volumes/app/data/out");
    let seen = |v: &str| {
        let want = format!("file={v}\nenv={v}\n");
        let path = out_file.clone();
        wait_until(
            Duration::from_secs(30),
            "the workload to see the secret",
            move || Ok((std::fs::read_to_string(&path).unwrap_or_default() == want).then_some(())),
        )
    };
    seen(&v1)?;
    let log = a.workload_log("app-0");
    assert!(log.contains("file read-only"), "{log}");

    // Operators see names, keys, versions and users; never the value.
    let listed = hub.shoal_ok(&["get", "secrets"]);
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(
        listed.contains("db") && listed.contains("password,user") && listed.contains("app"),
        "{listed}"
    );
    let views = [
        listed,
        hub.json(&["get", "secrets"])?.to_string(),
        hub.json(&["describe", "secret", "db"])?.to_string(),
        hub.json(&["describe", "workload", "app"])?.to_string(),
        hub.json(&["get", "workloads"])?.to_string(),
    ];
    for v in &views {
        assert!(!v.contains(&v1), "a view shows the value: {v}");
    }

    // The device that runs it gets it sealed; the other device gets nothing of it.
    let state_a = desired_state(&hub, "edge-a")?;
    assert_eq!(state_a["secrets"][0]["name"], "db", "{state_a}");
    assert!(!state_a.to_string().contains(&v1));
    let state_b = desired_state(&hub, "edge-b")?;
    assert!(state_b.get("secrets").is_none(), "{state_b}");

    // Nowhere at rest but the device's run directory (and the test's own manifest and volume
    // file): not
    // the hub's store, keys or logs; not the other device; not the agent's store or logs.
    assert_eq!(
        files_containing(
            dir.path(),
            v1.as_bytes(),
            &[&a.data_dir.join("run"), &out_file, &m]
        ),
        Vec::<String>::new()
    );
    let opened = a.data_dir.join("run/secrets/db");
    assert_eq!(std::fs::read_dir(&opened)?.count(), 1, "one version opened");

    // Bad input changes nothing: a missing secret, a bad base64 value, deleting one in use.
    let bad = write_manifest(
        dir.path(),
        "bad.yaml",
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: app }\nspec:\n  selector: { role: db }\n  wasm: { module: ./probe.wasm }\n  secrets: [{ name: nope }]\n---\napiVersion: shoal.dev/v1\nkind: Secret\nmetadata: { name: db }\ndata: { password: \"not base64 hunter2!\" }\n",
    );
    let out = hub.shoal(&["apply", "-f", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success());
    assert!(
        err.contains("data.password is not valid base64") && !err.contains("hunter2"),
        "{err}"
    );
    let bad = write_manifest(
        dir.path(),
        "bad2.yaml",
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: app }\nspec:\n  selector: { role: db }\n  wasm: { module: ./probe.wasm }\n  secrets: [{ name: nope }]\n",
    );
    let out = hub.shoal(&["apply", "-f", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("secret \"nope\" does not exist"), "{err}");
    // Over MQTT the broker would see the values: refused (shoal apply uses HTTPS).
    let raw = secret_doc("seen-by-the-broker");
    let out = std::process::Command::new("mosquitto_pub")
        .args(hub.access().mosquitto_args())
        .args(["-t", "shoal/v1/apply/raw", "-m", &raw, "-q", "1"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(Duration::from_secs(10), "the MQTT apply refused", || {
        let log = std::fs::read_to_string(dir.path().join("hub.log"))?;
        Ok(log
            .contains("secrets are applied over the HTTPS API only")
            .then_some(()))
    })?;
    assert!(files_containing(&hub.data_dir, b"seen-by-the-broker", &[]).is_empty());
    let hub_log = std::fs::read_to_string(dir.path().join("hub.log"))?;
    assert!(!hub_log.contains("seen-by-the-broker"));
    let out = hub.shoal(&["delete", "secret", "db"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("used by workload(s) app"),
        "{err}"
    );
    assert_eq!(
        desired_state(&hub, "edge-a")?["generation"],
        state_a["generation"]
    );

    // A new value restarts the replica with it; the old version's files go.
    let m2 = write_manifest(dir.path(), "rotate.yaml", &secret_doc(&v2));
    let out = hub.apply(&m2)?;
    assert!(out.contains("secret/db configured"), "{out}");
    seen(&v2)?;
    wait_until(Duration::from_secs(10), "the old version removed", || {
        Ok((std::fs::read_dir(&opened)?.count() == 1).then_some(()))
    })?;
    assert_eq!(
        files_containing(&a.data_dir, v1.as_bytes(), &[]),
        Vec::<String>::new()
    );

    // SIGKILL the agent: its opened secrets are wiped at start and opened again from the
    // sealed desired state it persisted.
    a.proc.kill();
    std::fs::remove_file(&out_file)?;
    let mut a = Agent::start(dir.path(), "edge-a", "role=db", &hub.join())?;
    seen(&v2)?;

    // The board is wiped and enrolls again under its id: a new key, which the hub learns
    // from the enrollment (the key it sealed to before is no longer the device's).
    let key_reads = |hub: &Hub| -> Result<f64> {
        Ok(hub
            .metrics()?
            .iter()
            .find(|s| s.name == "shoal_hub_device_key_reads_total")
            .map_or(0.0, |s| s.value))
    };
    let reads_before = key_reads(&hub)?;
    a.proc.kill();
    let _a = Agent::enroll_again(dir.path(), "edge-a", "role=db", &hub.join())?;
    seen(&v2)?;
    // The new key was read from the book, not taken from what the hub had kept.
    assert!(key_reads(&hub)? > reads_before);

    // SIGKILL the hub. With another secrets key it refuses to start, saying what to do;
    // with its own key the secret is there again (encrypted in its store all along).
    hub.proc.kill();
    let key = hub.data_dir.join("pki/secrets.key");
    std::fs::rename(&key, key.with_extension("saved"))?;
    let out = std::process::Command::new(bin("shoal-hub"))
        .args(["serve", "--no-mdns", "--data-dir"])
        .arg(&hub.data_dir)
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("restore DATA_DIR/pki/secrets.key"), "{err}");
    std::fs::rename(key.with_extension("saved"), &key)?;
    let hub = Hub::start_on(dir.path(), None, hub.mqtt, hub.http)?;
    let listed = hub.json(&["get", "secrets"])?;
    assert_eq!(listed[0]["name"], "db", "{listed}");
    hub.wait_running("app", 1, Duration::from_secs(30))?;

    // Once nothing uses it, it can be deleted.
    hub.shoal_ok(&["delete", "workload", "app"]);
    hub.shoal_ok(&["delete", "secret", "db"]);
    assert_eq!(hub.json(&["get", "secrets"])?, serde_json::json!([]));
    wait_until(Duration::from_secs(10), "opened secrets removed", || {
        Ok((!opened.exists() || std::fs::read_dir(&opened)?.count() == 0).then_some(()))
    })?;
    drop(b);
    Ok(())
}
