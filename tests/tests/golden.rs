//! Malformed manifests: each gets its expected error text (golden files in `tests/golden/`),
//! `shoal apply` exits non-zero, and the running fleet does not change.
//!
//! Regenerate the `.err` files with `SHOAL_BLESS=1` after an intended wording change, and
//! review the diff.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_e2e::*;
use std::time::Duration;

#[test]
fn malformed_manifests_are_rejected_with_golden_errors_and_change_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let _agent = Agent::start(dir.path(), "edge-1", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;

    // A copy of the golden directory with a real module next to the manifests.
    let golden = repo_root().join("tests").join("golden");
    let work = dir.path().join("golden");
    std::fs::create_dir_all(&work)?;
    for e in std::fs::read_dir(&golden)? {
        let p = e?.path();
        std::fs::copy(&p, work.join(p.file_name().unwrap()))?;
    }
    std::fs::copy(module("probe.wasm"), work.join("ok.wasm"))?;

    // A running workload named like the bad manifests' workloads.
    let good = write_manifest(
        &work,
        "good.yaml.in",
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: web }\nspec:\n  wasm: { module: ./ok.wasm }\n  args: [heartbeat, \"200\"]\n",
    );
    let out = hub.shoal_in(
        &["apply", "-f", good.file_name().unwrap().to_str().unwrap()],
        Some(&work),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = hub.wait_running("web", 1, Duration::from_secs(60))?;

    let bless = std::env::var_os("SHOAL_BLESS").is_some();
    let mut cases: Vec<_> = std::fs::read_dir(&golden)?
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 15, "golden cases missing");
    let mut failures = Vec::new();
    for case in &cases {
        let file = case.file_name().unwrap().to_str().unwrap();
        let out = hub.shoal_in(&["apply", "-f", file], Some(&work));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let expected_path = case.with_extension("err");
        if out.status.success() {
            failures.push(format!("{file}: accepted, but must be rejected"));
            continue;
        }
        if bless {
            std::fs::write(&expected_path, &stderr)?;
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if stderr != expected {
            failures.push(format!(
                "{file}:\n--- expected\n{expected}--- got\n{stderr}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Nothing changed: same workload, same revision, same run, no restart.
    let after = hub.workloads()?;
    assert_eq!(after.len(), 1);
    let w = &after[0];
    assert_eq!(w["revision"], before["revision"]);
    assert_eq!(w["replicas"][0]["phase"], "Running");
    assert_eq!(
        w["replicas"][0]["startedAtMs"],
        before["replicas"][0]["startedAtMs"]
    );
    assert_eq!(w["replicas"][0]["restarts"], 0);
    Ok(())
}
