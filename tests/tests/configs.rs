//! Configs end to end: a `kind: Config` with a value per site (a label selector) and one
//! for a single device reaches each device's replica as a read-only file and a variable;
//! `describe config` says which device gets which value and from where; a new config rolls
//! out through the workload's rollout (a new revision, in its history), the old files are
//! swept, and a config in use cannot be deleted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use shoal_e2e::*;
use std::time::Duration;

fn config(berlin: &str) -> String {
    format!(
        "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {{ name: site }}\ndata: {{ interval: \"5\", unit: C }}\noverrides:\n  - selector: {{ site: berlin }}\n    data: {{ interval: \"{berlin}\" }}\n  - device: edge-c\n    data: {{ interval: \"7\" }}\n"
    )
}

const APP: &str = "apiVersion: shoal.dev/v1
kind: Workload
metadata: { name: app }
spec:
  placement: every
  update: { maxUnavailable: 1 }
  wasm: { module: ./probe.wasm }
  args: [secret, /etc/site/interval, INTERVAL, /data/out]
  volumes: [{ name: data, path: /data }]
  configs: [{ name: site, path: /etc/site, env: { INTERVAL: interval } }]
";

#[test]
fn a_config_gives_each_device_its_values_and_a_change_rolls_out() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let a = Agent::start(dir.path(), "edge-a", "site=berlin", &hub.join())?;
    let b = Agent::start(dir.path(), "edge-b", "site=munich", &hub.join())?;
    let c = Agent::start(dir.path(), "edge-c", "site=berlin", &hub.join())?;
    hub.wait_devices_online(3, Duration::from_secs(20))?;
    std::fs::copy(module("probe.wasm"), dir.path().join("probe.wasm"))?;
    let m = write_manifest(
        dir.path(),
        "app.yaml",
        &format!("{}---\n{APP}", config("10")),
    );
    let out = hub.apply(&m)?;
    assert!(out.contains("config/site created"), "{out}");
    hub.wait_running("app", 3, Duration::from_secs(30))?;

    let seen = |agent: &Agent, v: &str| {
        let want = format!("file={v}\nenv={v}\n");
        let path = agent.data_dir.join("volumes/app/data/out");
        wait_until(
            Duration::from_secs(30),
            &format!("{} to see interval {v}", agent.id),
            move || Ok((std::fs::read_to_string(&path).unwrap_or_default() == want).then_some(())),
        )
    };
    // The site's value, the default, and one device's own (beating its site's).
    seen(&a, "10")?;
    seen(&b, "5")?;
    seen(&c, "7")?;
    assert!(a.workload_log("app-0").contains("file read-only"));

    let d = hub.json(&["describe", "config", "site"])?;
    let value = |dev: &str| {
        let v = d["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["device"] == dev)
            .unwrap_or_else(|| panic!("{dev} missing in {d}"));
        (
            v["values"]["interval"]["value"]
                .as_str()
                .unwrap()
                .to_string(),
            v["values"]["interval"]["from"].to_string(),
        )
    };
    assert_eq!(value("edge-a"), ("10".into(), r#"{"override":0}"#.into()));
    assert_eq!(value("edge-b"), ("5".into(), r#""data""#.into()));
    assert_eq!(value("edge-c"), ("7".into(), r#"{"override":1}"#.into()));
    let table = hub.shoal_ok(&["describe", "config", "site"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("overrides[1] device edge-c sets interval"),
        "{table}"
    );
    assert!(table.contains("Used by:     app"), "{table}");
    // A config in use stays.
    let out = hub.shoal(&["delete", "config", "site"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("used by workload(s) app"),
        "{err}"
    );

    // A new value for berlin: a new revision of the workload, rolled out.
    let m2 = write_manifest(dir.path(), "site.yaml", &config("20"));
    let out = hub.apply(&m2)?;
    assert!(out.contains("config/site configured"), "{out}");
    seen(&a, "20")?;
    let status = hub.shoal_ok(&["rollout", "status", "app", "--timeout", "60s"]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("Complete"), "{status}");
    // The first revision and the config's: the change went through the rollout engine.
    let history = hub.json(&["rollout", "history", "app"])?;
    let entries = history.as_array().unwrap();
    assert_eq!(entries.len(), 2, "{history}");
    assert_eq!(entries[1]["outcome"], "complete", "{history}");
    assert_ne!(entries[0]["revision"], entries[1]["revision"]);
    seen(&b, "5")?;
    seen(&c, "7")?;
    // The old values' files are gone from the device.
    let dirs = a.data_dir.join("run/configs");
    wait_until(Duration::from_secs(10), "old config files swept", || {
        Ok((std::fs::read_dir(&dirs)?.count() == 1).then_some(()))
    })?;
    Ok(())
}
