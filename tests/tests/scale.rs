//! A simulated fleet of 1,000 devices (`shoal-sim`, the real wire protocol) against the real
//! hub: everyone joins, an every-device workload converges, a new revision rolls out to all
//! of them, and a crashing one stops at its canary and rolls back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_e2e::*;
use std::process::Command;
use std::time::{Duration, Instant};

const DEVICES: usize = 1000;

fn manifest(args: &str, canary: u32) -> String {
    format!(
        r#"apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: fleet-app }}
spec:
  placement: every
  wasm: {{ module: "{probe}" }}
  args: [{args}]
  resources: {{ memory: 16Mi }}
  update: {{ maxUnavailable: "25%", canary: {canary}, autoRollback: true }}
"#,
        probe = module("probe.wasm").display()
    )
}

#[test]
fn a_thousand_simulated_devices_join_converge_and_roll_out() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Simulated devices hold no certificates: this test is about scheduling and the bus.
    let hub = Hub::start_with(dir.path(), None, free_port(), free_port(), &["--insecure"])?;
    let _sim = Proc::spawn(
        "shoal-sim",
        Command::new(bin("shoal-sim")).args([
            "--broker",
            &hub.broker_url,
            "--devices",
            &DEVICES.to_string(),
            "--start-delay",
            "20ms",
        ]),
        dir.path().join("sim.log"),
    )?;
    hub.wait_devices_online(DEVICES, Duration::from_secs(120))?;

    let v1 = write_manifest(
        dir.path(),
        "v1.yaml",
        &manifest(r#""heartbeat", "1000""#, 0),
    );
    hub.apply(&v1)?;
    let w1 = hub.wait_running("fleet-app", DEVICES, Duration::from_secs(120))?;

    // A new revision rolls out to every device, a quarter at a time at most.
    let v2 = write_manifest(dir.path(), "v2.yaml", &manifest(r#""heartbeat", "500""#, 0));
    let t = Instant::now();
    hub.apply(&v2)?;
    let w2 = wait_until(Duration::from_secs(120), "v2 rolled out everywhere", || {
        let w = hub.workload("fleet-app")?.unwrap();
        let done = w["rollout"]["state"] == "Complete" && w["ready"] == DEVICES as u64;
        Ok(done.then_some(w))
    })?;
    eprintln!("rollout to {DEVICES} simulated devices: {:?}", t.elapsed());
    assert_ne!(w2["revision"], w1["revision"]);

    // A crashing revision: only its canary runs it, then all are back on v2.
    let v3 = write_manifest(dir.path(), "v3.yaml", &manifest(r#""crash""#, 10));
    hub.apply(&v3)?;
    let most_updated = std::cell::Cell::new(0u64);
    let w3 = wait_until(Duration::from_secs(60), "v3 rolled back", || {
        let w = hub.workload("fleet-app")?.unwrap();
        if matches!(
            w["rollout"]["state"].as_str(),
            Some("Progressing" | "Canary")
        ) {
            let updated = w["rollout"]["updated"].as_u64().unwrap_or(0);
            most_updated.set(most_updated.get().max(updated));
        }
        let back = w["rollout"]["state"] == "RolledBack"
            && w["revision"] == w2["revision"]
            && w["ready"] == DEVICES as u64;
        Ok(back.then_some(w))
    })?;
    if std::env::var_os("SHOAL_E2E_KEEP").is_some() {
        eprintln!("kept {}", dir.keep().display());
    }
    let history = &w3["rollout"]["history"];
    let last = history.as_array().unwrap().last().unwrap();
    assert!(
        last["outcome"]
            .as_str()
            .unwrap()
            .starts_with("rolled back: replica"),
        "{history}"
    );
    assert!(
        most_updated.get() <= 10,
        "never more than the canary on v3: {}",
        most_updated.get()
    );
    Ok(())
}
