//! Crash safety and offline autonomy: SIGKILL an agent, bring it back with no broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_e2e::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One `probe heartbeat 100` workload named `beat`.
fn beat_manifest(dir: &Path) -> PathBuf {
    write_manifest(
        dir,
        "fleet.yaml",
        &format!(
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: beat }}\nspec:\n  wasm: {{ module: \"{}\" }}\n  args: [heartbeat, \"100\"]\n",
            module("probe.wasm").display()
        ),
    )
}

#[test]
fn killed_agent_restarts_its_workloads_from_sled_without_a_broker() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mq_port = free_port();
    let mut mq = Mosquitto::start_on(dir.path(), mq_port)?;
    let hub = Hub::start(dir.path(), Some(&mq.url()))?;
    let mut agent = Agent::start(dir.path(), "edge-1", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    let manifest = beat_manifest(dir.path());
    hub.apply(&manifest)?;
    hub.wait_running("beat", 1, Duration::from_secs(60))?;

    // Crash the agent, then take the broker away.
    agent.proc.kill();
    mq.proc.kill();
    let log_before = agent.workload_log("beat-0");
    let starts_before = count_lines(&log_before, "[shoal] started");
    assert_eq!(starts_before, 1);

    // Restarted with no broker reachable, it runs its last desired workloads from sled.
    let agent = Agent::start(dir.path(), "edge-1", "", &hub.join())?;
    wait_until(
        Duration::from_secs(30),
        "workload restarted offline",
        || {
            let log = agent.workload_log("beat-0");
            let tail = &log[log_before.len().min(log.len())..];
            Ok(
                (count_lines(&log, "[shoal] started") == 2 && count_lines(tail, "beat ") >= 5)
                    .then_some(()),
            )
        },
    )?;
    let agent_log = agent.proc.log_text();
    assert!(
        agent_log.contains("resuming persisted desired state"),
        "{agent_log}"
    );
    let retry_lines = agent_log
        .lines()
        .filter(|l| l.contains("broker unreachable"))
        .count();
    assert!(
        retry_lines <= 2,
        "one line per retry period, not a flood: {retry_lines}"
    );

    // The broker comes back: the agent reconnects by itself and reports to the hub.
    let _mq = Mosquitto::start_on(dir.path(), mq_port)?;
    wait_until(
        Duration::from_secs(30),
        "agent back online and Running",
        || {
            let online = hub
                .devices()?
                .iter()
                .any(|d| d["id"] == "edge-1" && d["online"] == true);
            let running = hub
                .workload("beat")?
                .is_some_and(|w| w["replicas"][0]["phase"] == "Running");
            Ok((online && running).then_some(()))
        },
    )?;
    // No duplicate: still exactly one run since the restart.
    assert_eq!(
        count_lines(&agent.workload_log("beat-0"), "[shoal] started"),
        2
    );
    Ok(())
}

#[test]
fn hub_killed_keeps_fleet_state() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mqtt, http) = (free_port(), free_port());
    let mut hub = Hub::start_on(dir.path(), None, mqtt, http)?;
    let agent = Agent::start(dir.path(), "edge-1", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    let manifest = beat_manifest(dir.path());
    hub.apply(&manifest)?;
    let before = hub.wait_running("beat", 1, Duration::from_secs(60))?;
    hub.proc.kill();

    // The agent keeps running it while the hub (and its embedded broker) is gone.
    let len = agent.workload_log("beat-0").len();
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        agent.workload_log("beat-0").len() > len,
        "workload kept running"
    );

    let hub = Hub::start_on(dir.path(), None, mqtt, http)?;
    let after = hub.wait_running("beat", 1, Duration::from_secs(30))?;
    assert_eq!(after["revision"], before["revision"]);
    assert_eq!(after["replicas"][0]["device"], "edge-1");
    // Not restarted needlessly by the hub's return.
    assert_eq!(
        count_lines(&agent.workload_log("beat-0"), "[shoal] started"),
        1
    );
    Ok(())
}
