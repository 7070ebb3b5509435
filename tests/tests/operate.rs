//! Operating a fleet (issue 8): the device CLI against a real agent (ps, status, inspect,
//! logs, restart), working on while the hub is gone; log filters and JSON log lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use shoal_e2e::*;
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// `shoal-agent ARGS --socket SOCKET`.
fn device_cli(agent: &Agent, args: &[&str]) -> Output {
    Command::new(bin("shoal-agent"))
        .args(args)
        .arg("--socket")
        .arg(agent.data_dir.join("agent.sock"))
        .output()
        .unwrap()
}

fn device_json(agent: &Agent, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = device_cli(agent, &all);
    anyhow::ensure!(
        out.status.success(),
        "shoal-agent {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn heartbeat_manifest(dir: &Path) -> std::path::PathBuf {
    write_manifest(
        dir,
        "beat.yaml",
        &format!(
            r#"
apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: beat }}
spec:
  replicas: 1
  wasm: {{ module: "{probe}" }}
  args: ["heartbeat", "100"]
  resources: {{ memory: 16Mi }}
"#,
            probe = module("probe.wasm").display()
        ),
    )
}

#[test]
fn device_cli_shows_restarts_and_tails_a_workload_also_without_the_hub() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut hub = Hub::start(dir.path(), None)?;
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let agent = Agent::start_with(
        dir.path(),
        "dev1",
        "role=edge",
        &hub.join(),
        &["--log-format", "json", "--metrics-listen", &metrics_addr],
    )?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    hub.apply(&heartbeat_manifest(dir.path()))?;
    hub.wait_running("beat", 1, Duration::from_secs(60))?;

    // ps: the replica, its phase and what it uses.
    let ps = wait_until(Duration::from_secs(10), "beat-0 running in ps", || {
        let ps = device_json(&agent, &["ps"])?;
        let r = &ps[0];
        Ok((r["phase"] == "Running" && r["memoryBytes"].as_u64().unwrap_or(0) > 0).then_some(ps))
    })?;
    let r = &ps[0];
    assert_eq!(ps.as_array().unwrap().len(), 1, "{ps}");
    assert_eq!(r["instance"], "beat-0");
    assert_eq!(r["variant"], "wasm");
    assert_eq!(r["restarts"], 0);
    assert_eq!(r["memoryLimit"], 16 << 20);
    assert!(r["memoryBytes"].as_u64().unwrap() <= 16 << 20, "{r}");
    let table = text(&device_cli(&agent, &["ps"]));
    assert!(
        table.starts_with("INSTANCE") && table.contains("beat-0") && table.contains("Running"),
        "{table}"
    );

    // status: connected to the hub, the generation in force, a recent sync.
    let st = device_json(&agent, &["status"])?;
    assert_eq!(st["device"], "dev1");
    assert_eq!(st["hub"]["connected"], true, "{st}");
    assert!(st["generation"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["lastSyncMs"].as_u64().is_some(), "{st}");
    assert!(st["memory"]["agentRssBytes"].as_u64().unwrap() > 0, "{st}");
    assert!(st["disk"]["availableBytes"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["running"], 1);

    // inspect: desired and observed agree on the revision.
    let i = device_json(&agent, &["inspect", "beat"])?;
    assert_eq!(
        i["desired"][0]["revision"], i["observed"][0]["revision"],
        "{i}"
    );
    assert!(
        i["logs"][0].as_str().unwrap().ends_with("beat-0.log"),
        "{i}"
    );

    // logs --tail.
    let tail = text(&device_cli(&agent, &["logs", "beat", "--tail", "2"]));
    assert_eq!(tail.lines().count(), 2, "{tail}");
    assert!(tail.lines().all(|l| l.starts_with("beat ")), "{tail}");

    // logs -f: lines keep coming.
    let mut follow = Command::new(bin("shoal-agent"))
        .args(["logs", "beat", "-f", "--tail", "0", "--socket"])
        .arg(agent.data_dir.join("agent.sock"))
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = std::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap()?;
    let second = lines.next().unwrap()?;
    assert!(
        first.starts_with("beat ") && second.starts_with("beat "),
        "{first} / {second}"
    );
    assert_ne!(first, second);
    follow.kill()?;
    follow.wait()?;

    // restart: counted, and running again.
    let out = device_cli(&agent, &["restart", "beat"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text(&out).trim(), "beat-0 restarted");
    wait_until(Duration::from_secs(10), "beat-0 restarted once", || {
        let r = device_json(&agent, &["ps"])?;
        Ok((r[0]["restarts"] == 1 && r[0]["phase"] == "Running").then_some(()))
    })?;
    let log = agent.workload_log("beat-0");
    assert!(log.contains("restarting on request"), "{log}");

    // Bad input: a clear error naming the value, and a failing exit status.
    let out = device_cli(&agent, &["logs", "nope"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no workload \"nope\""),
        "{err}"
    );
    let out = device_cli(&agent, &["restart", "Bad_Name"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Bad_Name"), "{err}");

    // Prometheus metrics over TCP: parsed, per replica.
    let scrape = http_get(metrics_port, "/metrics")?;
    let (head, body) = scrape.split_once("\r\n\r\n").unwrap();
    assert!(
        head.contains(" 200 ") && head.contains("openmetrics-text"),
        "{head}"
    );
    let m = parse_metrics(body)?;
    let beat = [("workload", "beat"), ("instance", "beat-0")];
    assert_eq!(
        metric(&m, "shoal_agent_replica_restarts_total", &beat),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        metric(
            &m,
            "shoal_agent_replica_phase",
            &[("instance", "beat-0"), ("phase", "Running")]
        ),
        Some(1.0),
        "{body}"
    );
    assert!(
        metric(&m, "shoal_agent_replica_memory_bytes", &beat).unwrap() > 0.0,
        "{body}"
    );
    assert_eq!(
        metric(&m, "shoal_agent_replica_memory_limit_bytes", &beat),
        Some(16.0 * 1048576.0)
    );
    assert!(
        metric(&m, "shoal_agent_replica_cpu_seconds_total", &beat).unwrap() > 0.0,
        "{body}"
    );
    assert_eq!(
        metric(&m, "shoal_agent_hub_connected", &[]),
        Some(1.0),
        "{body}"
    );
    assert!(
        metric(&m, "process_resident_memory_bytes", &[]).unwrap() > 1e6,
        "{body}"
    );
    // Only /metrics on that listener: the control API stays on the owner-only socket.
    let other = http_get(metrics_port, "/v1/workloads")?;
    assert!(other.lines().next().unwrap().contains(" 404 "), "{other}");

    // The hub goes away: the device CLI still answers, and says the link is down.
    hub.proc.kill();
    let st = wait_until(Duration::from_secs(30), "agent sees the hub gone", || {
        let st = device_json(&agent, &["status"])?;
        Ok((st["hub"]["connected"] == false).then_some(st))
    })?;
    assert!(st["hub"]["lastError"].as_str().is_some(), "{st}");
    let table = text(&device_cli(&agent, &["status"]));
    assert!(table.contains("DISCONNECTED"), "{table}");
    let ps = device_json(&agent, &["ps"])?;
    assert_eq!(ps[0]["phase"], "Running", "{ps}");
    let out = device_cli(&agent, &["restart", "beat"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(Duration::from_secs(10), "beat-0 restarted offline", || {
        let r = device_json(&agent, &["ps"])?;
        Ok((r[0]["restarts"] == 2 && r[0]["phase"] == "Running").then_some(()))
    })?;

    // --log-format json: every line the agent wrote is a JSON object with a level.
    let agent_log = agent.proc.log_text();
    let mut n = 0;
    for line in agent_log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        n += 1;
    }
    assert!(n > 3, "{agent_log}");
    Ok(())
}

#[test]
fn a_bad_log_filter_is_refused_by_name() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = Command::new(bin("shoal-hub"))
        .args(["serve", "--insecure", "--no-mdns", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "shoal_hub=loud")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("RUST_LOG=\"shoal_hub=loud\""), "{err}");
    let out = Command::new(bin("shoal-agent"))
        .args(["ps", "--log-format", "yaml"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("yaml"), "{err}");
    Ok(())
}
