//! Restart back-off, memory limits and CPU shares, on a real agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_e2e::*;
use std::time::{Duration, Instant};

fn probe_workload(name: &str, args: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: {name} }}\nspec:\n  wasm: {{ module: \"{}\" }}\n  args: [{args}]\n{extra}",
        module("probe.wasm").display()
    )
}

#[test]
fn crash_loop_memory_limit_and_cpu_share() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let agent = Agent::start(dir.path(), "edge-1", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;

    let text = [
        probe_workload(
            "crasher",
            "crash",
            "  restart: { policy: Always, backoff: { initial: 200ms, max: 10s } }\n",
        ),
        probe_workload(
            "hog",
            "hog",
            "  resources: { memory: 16Mi }\n  restart: { policy: Never }\n",
        ),
    ]
    .concat();
    hub.apply(&write_manifest(dir.path(), "a.yaml", &text))?;

    // The crash-looping module: CrashLoopBackOff with growing delays.
    let mut backoffs: Vec<u64> = Vec::new();
    wait_until(Duration::from_secs(30), "three growing back-offs", || {
        let w = hub.workload("crasher")?.unwrap();
        let r = &w["replicas"][0];
        if r["phase"] == "CrashLoopBackOff" {
            let b = r["backoffMs"].as_u64().unwrap();
            if backoffs.last() != Some(&b) {
                backoffs.push(b);
                assert_eq!(r["exitCode"], 3);
                assert!(
                    r["reason"]
                        .as_str()
                        .unwrap()
                        .contains("exited with status 3"),
                    "{r}"
                );
            }
        }
        Ok((backoffs.len() >= 3).then_some(()))
    })?;
    assert!(
        backoffs.windows(2).all(|p| p[1] > p[0]),
        "delays grow: {backoffs:?}"
    );
    assert!(backoffs[0] >= 200 && backoffs[0] < 1000, "{backoffs:?}");

    // The memory hog fails with a reason that says so.
    let hog = wait_until(Duration::from_secs(30), "hog failed", || {
        let w = hub.workload("hog")?.unwrap();
        Ok((w["replicas"][0]["phase"] == "Failed").then_some(w))
    })?;
    let reason = hog["replicas"][0]["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("memory limit exceeded"), "{reason}");
    assert!(reason.contains("16 MiB"), "{reason}");

    // A spinning module is held to its share; a neighbour keeps its pace.
    for w in ["crasher", "hog"] {
        assert!(hub.shoal(&["delete", "workload", w]).status.success());
    }
    let text = [
        probe_workload("spinner", "spin", "  resources: { cpu: 100m }\n"),
        probe_workload("beat", "heartbeat, \"100\"", "  resources: { cpu: 100m }\n"),
    ]
    .concat();
    hub.apply(&write_manifest(dir.path(), "b.yaml", &text))?;
    hub.wait_running("spinner", 1, Duration::from_secs(60))?;
    hub.wait_running("beat", 1, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(500));

    let window = Duration::from_secs(3);
    let beats0 = count_lines(&agent.workload_log("beat-0"), "beat ");
    let cpu0 = cpu_seconds(agent.proc.pid())?;
    let t0 = Instant::now();
    // Meanwhile the agent keeps answering: a new workload reaches Running.
    let probe = probe_workload("late", "heartbeat, \"1000\"", "");
    hub.apply(&write_manifest(dir.path(), "c.yaml", &probe))?;
    hub.wait_running("late", 1, Duration::from_secs(20))?;
    std::thread::sleep(window.saturating_sub(t0.elapsed()));
    let elapsed = t0.elapsed().as_secs_f64();
    let beats = count_lines(&agent.workload_log("beat-0"), "beat ") - beats0;
    let cpu = (cpu_seconds(agent.proc.pid())? - cpu0) / elapsed;

    let expected = elapsed / 0.1;
    assert!(
        beats as f64 >= expected * 0.7,
        "heartbeat slowed down: {beats} beats in {elapsed:.1}s"
    );
    // 100m for the spinner plus the agent's own work; a spinner left alone would take a core.
    assert!(
        cpu < 0.5,
        "agent used {:.0}% of a core with a 100m spinner",
        cpu * 100.0
    );
    let spins = count_lines(&agent.workload_log("spinner-0"), "spin ");
    assert!(spins > 0, "the spinner did run");
    Ok(())
}
