//! Rolling updates with real agents: a new revision that crashes stops at the canary and
//! rolls back by itself while the old revision keeps serving; a good one completes; one with
//! `maxSurge` never drops below the wanted count; scale; undo to the previous revision and to
//! a named one, keeping the replica count.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_e2e::*;
use std::time::Duration;

const CANARY: &str = "maxUnavailable: 1, canary: 1, autoRollback: true, minReadySeconds: 1";

fn manifest(args: &str) -> String {
    manifest_with(args, CANARY)
}

fn manifest_with(args: &str, update: &str) -> String {
    format!(
        r#"apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: web }}
spec:
  replicas: 3
  wasm: {{ module: "{probe}" }}
  args: [{args}]
  resources: {{ memory: 16Mi }}
  restart: {{ backoff: {{ initial: 200ms, max: 1s }} }}
  update: {{ {update} }}
"#,
        probe = module("probe.wasm").display()
    )
}

#[test]
fn crashing_revision_rolls_back_at_the_canary_and_a_good_one_completes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let agents: Vec<Agent> = ["r1", "r2", "r3"]
        .iter()
        .map(|id| Agent::start(dir.path(), id, "", &hub.join()).unwrap())
        .collect();
    hub.wait_devices_online(3, Duration::from_secs(20))?;
    let v1 = write_manifest(dir.path(), "v1.yaml", &manifest(r#""heartbeat", "100""#));
    hub.apply(&v1)?;
    let w1 = hub.wait_running("web", 3, Duration::from_secs(60))?;
    let rev1 = w1["revision"].as_str().unwrap().to_string();

    // v2 crashes: only the canary ever runs it, then everything is back on v1.
    let v2 = write_manifest(dir.path(), "v2.yaml", &manifest(r#""crash""#));
    hub.apply(&v2)?;
    // Meanwhile the two replicas beyond the canary keep running v1, sampled every poll.
    let mut least_on_v1 = usize::MAX;
    let r = wait_until(Duration::from_secs(30), "rollback", || {
        let w = hub.workload("web")?.unwrap();
        let on_v1 = w["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["phase"] == "Running" && x["revision"] == rev1.as_str())
            .count();
        least_on_v1 = least_on_v1.min(on_v1);
        let r = w["rollout"].clone();
        Ok((r["state"] == "RolledBack").then_some(r))
    })?;
    assert!(
        least_on_v1 >= 2,
        "v1 served by {least_on_v1} replica(s) at one point"
    );
    assert!(
        r["reason"].as_str().unwrap().contains("CrashLoopBackOff"),
        "{r}"
    );
    let w = hub.wait_running("web", 3, Duration::from_secs(30))?;
    assert_eq!(w["revision"], rev1.as_str(), "back on the old revision");
    let crashed: Vec<&str> = agents
        .iter()
        .filter(|a| {
            (0..3).any(|i| {
                a.workload_log(&format!("web-{i}"))
                    .contains("about to crash")
            })
        })
        .map(|a| a.id.as_str())
        .collect();
    assert_eq!(crashed.len(), 1, "only the canary ran v2: {crashed:?}");
    let status = hub.shoal(&["rollout", "status", "web"]);
    assert!(
        !status.status.success(),
        "status fails on a rolled-back rollout"
    );
    let history =
        String::from_utf8_lossy(&hub.shoal(&["rollout", "history", "web"]).stdout).to_string();
    assert!(history.contains("rolled back: replica"), "{history}");
    let as_json = hub.json(&["rollout", "history", "web"])?;
    assert!(
        as_json
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["outcome"].as_str().unwrap().starts_with("rolled back")),
        "{as_json}"
    );

    // v3 is good: it rolls out replica by replica and completes.
    let v3 = write_manifest(dir.path(), "v3.yaml", &manifest(r#""heartbeat", "50""#));
    hub.apply(&v3)?;
    let out = hub.shoal(&["rollout", "status", "web", "--timeout", "60s"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Complete") && text.contains("3/3 updated"),
        "{text}"
    );
    let w3 = hub.wait_running("web", 3, Duration::from_secs(30))?;
    assert_ne!(w3["revision"], rev1.as_str());
    let w = w3.clone();

    // v4 surges: a fourth replica starts before an old one stops, so at least 3 stay
    // running the whole time and never more than 4 are placed.
    let v4 = write_manifest(
        dir.path(),
        "v4.yaml",
        &manifest_with(
            r#""heartbeat", "60""#,
            "maxUnavailable: 0, maxSurge: 1, minReadySeconds: 1",
        ),
    );
    hub.apply(&v4)?;
    let (mut least_ready, mut most_placed) = (u64::MAX, 0usize);
    let w4 = wait_until(Duration::from_secs(60), "surge rollout", || {
        let w = hub.workload("web")?.unwrap();
        least_ready = least_ready.min(w["ready"].as_u64().unwrap_or(0));
        let placed = w["replicas"]
            .as_array()
            .map_or(0, |r| r.iter().filter(|x| !x["device"].is_null()).count());
        most_placed = most_placed.max(placed);
        let done = w["rollout"]["state"] == "Complete" && w["ready"] == 3;
        Ok(done.then_some(w))
    })?;
    assert!(
        least_ready >= 3,
        "ready fell to {least_ready} during a surge"
    );
    assert_eq!(most_placed, 4, "one surge replica at a time");
    assert_ne!(w4["revision"], w["revision"]);
    let w = w4;

    // Scaling changes the count, not the revision.
    hub.shoal_ok(&["scale", "web", "--replicas", "2"]);
    let w2 = hub.wait_running("web", 2, Duration::from_secs(30))?;
    assert_eq!(w2["revision"], w["revision"]);

    // Undo goes back to the revision before (v3), keeping the replica count; then to v1 by
    // a prefix of its revision from the history.
    let rev3 = w3["revision"].as_str().unwrap().to_string();
    for (args, want) in [
        (vec!["rollout", "undo", "web"], rev3.as_str()),
        (
            vec!["rollout", "undo", "web", "--to-revision", &rev1[..6]],
            rev1.as_str(),
        ),
    ] {
        hub.shoal_ok(&args);
        let w = wait_until(Duration::from_secs(60), "undo rolled out", || {
            let w = hub.workload("web")?.unwrap();
            let done =
                w["revision"] == want && w["rollout"]["state"] == "Complete" && w["ready"] == 2;
            Ok(done.then_some(w))
        })?;
        assert_eq!(w["desired"], 2, "undo keeps the replica count: {w}");
    }
    let out = hub.shoal(&["rollout", "undo", "web", "--to-revision", "zzz"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("revision \"zzz\" is not in the history"),
        "{err}"
    );
    Ok(())
}
