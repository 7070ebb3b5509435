//! Jobs end to end, on real agents: a job with a count runs each completion once within its
//! parallelism and completes; its finished replicas' logs are still read with `shoal logs`;
//! an agent killed with SIGKILL and restarted runs none of them again (each run bumps a
//! counter in a volume); a `placement: every` job that fails keeps a result per device with
//! its exit code and retries; `shoal rerun` runs a job again; `ttlAfterFinished` deletes it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use serde_json::Value;
use shoal_e2e::*;
use std::time::Duration;

const BATCH: &str = "apiVersion: shoal.dev/v1
kind: Workload
metadata: { name: batch }
spec:
  wasm: { module: ./probe.wasm }
  args: [count, /data/runs]
  volumes: [{ name: data, path: /data }]
  completion: { completions: 3, parallelism: 2 }
";

const CHECK: &str = "apiVersion: shoal.dev/v1
kind: Workload
metadata: { name: check }
spec:
  placement: every
  wasm: { module: ./probe.wasm }
  args: [crash]
  restart: { backoff: { initial: 100ms, max: 200ms } }
  completion: { backoffLimit: 1 }
";

const ONCE: &str = "apiVersion: shoal.dev/v1
kind: Workload
metadata: { name: once }
spec:
  wasm: { module: ./probe.wasm }
  args: [work, \"1000\"]
  completion: { ttlAfterFinished: 2s }
";

/// The job part of `name`'s view, once `done` says it is as wanted.
fn wait_job(hub: &Hub, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
    wait_until(Duration::from_secs(60), what, || {
        let w = hub.workload(name)?;
        Ok(w.map(|w| w["job"].clone()).filter(|j| done(j)))
    })
}

/// Runs of `batch` each device's volume counted.
fn runs(agents: &[&Agent]) -> u64 {
    agents
        .iter()
        .map(|a| {
            std::fs::read_to_string(a.data_dir.join("volumes/batch/data/runs"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn jobs_run_to_completion_once_and_again_on_rerun() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let mut a = Agent::start(dir.path(), "edge-a", "", &hub.join())?;
    let b = Agent::start(dir.path(), "edge-b", "", &hub.join())?;
    hub.wait_devices_online(2, Duration::from_secs(20))?;
    std::fs::copy(module("probe.wasm"), dir.path().join("probe.wasm"))?;

    let m = write_manifest(dir.path(), "batch.yaml", BATCH);
    let out = hub.apply(&m)?;
    assert!(out.contains("workload/batch created"), "{out}");
    let job = wait_job(&hub, "batch", "batch complete", |j| {
        j["state"] == "Complete"
    })?;
    assert_eq!(job["succeeded"], 3, "{job}");
    assert_eq!(job["failed"], 0, "{job}");
    assert_eq!(job["run"], 1, "{job}");
    let results = job["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{job}");
    assert!(results.iter().all(|r| r["exitCode"] == 0), "{job}");
    assert_eq!(runs(&[&a, &b]), 3, "each completion ran once");
    // Finished: no replica left on a device.
    let w = hub.workload("batch")?.unwrap();
    assert!(w["replicas"].as_array().unwrap().is_empty(), "{w}");

    let table = hub.shoal_ok(&["get", "jobs"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("batch") && l.contains("Complete") && l.contains("3/3")),
        "{table}"
    );
    let described = hub.shoal_ok(&["describe", "workload", "batch"]);
    let described = String::from_utf8_lossy(&described.stdout);
    assert!(
        described.contains("Job:        run 1 Complete"),
        "{described}"
    );
    assert!(described.contains("Results:"), "{described}");
    // The finished replicas' logs, from their devices.
    let logs = hub.shoal_ok(&["logs", "batch"]);
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("count 1"), "{logs}");

    // A crash and a restart of a device that ran completions: nothing runs again.
    a.proc.kill();
    a = Agent::start(dir.path(), "edge-a", "", &hub.join())?;
    hub.wait_devices_online(2, Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(runs(&[&a, &b]), 3, "a finished run is never run again");

    // A job on every device that always fails: a result per device, retried backoffLimit
    // times, and no end (a device may join).
    let m = write_manifest(dir.path(), "check.yaml", CHECK);
    hub.apply(&m)?;
    let job = wait_job(&hub, "check", "check failed on both devices", |j| {
        j["failed"] == 2
    })?;
    assert_eq!(job["state"], "Running", "{job}");
    for r in job["results"].as_array().unwrap() {
        assert_eq!(r["phase"], "Failed", "{job}");
        assert_eq!(r["exitCode"], 3, "{job}");
        assert_eq!(r["restarts"], 1, "{job}");
    }
    let described = hub.shoal_ok(&["describe", "workload", "check"]);
    let described = String::from_utf8_lossy(&described.stdout);
    assert!(
        described.contains("edge-a") && described.contains("edge-b"),
        "{described}"
    );

    // A rerun: run 2, every completion again.
    let out = hub.shoal_ok(&["rerun", "batch"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("job/batch runs again"));
    wait_job(&hub, "batch", "batch run 2 complete", |j| {
        j["run"] == 2 && j["state"] == "Complete"
    })?;
    assert_eq!(runs(&[&a, &b]), 6);
    // A service cannot be rerun.
    let svc = heartbeat_manifest(dir.path(), 1, 500);
    hub.apply(&svc)?;
    let out = hub.shoal(&["rerun", "beat"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a job"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // ttlAfterFinished: gone two seconds after it completed.
    let m = write_manifest(dir.path(), "once.yaml", ONCE);
    hub.apply(&m)?;
    wait_until(
        Duration::from_secs(60),
        "once deleted after its ttl",
        || Ok(hub.workload("once")?.is_none().then_some(())),
    )?;
    let ran = [&a, &b].iter().any(|x| {
        x.workload_log("once-0")
            .contains("completed (exit status 0)")
    });
    assert!(ran, "once ran to completion before it was deleted");
    Ok(())
}
