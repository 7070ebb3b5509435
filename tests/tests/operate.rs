//! Operating a fleet (issue 8): the device CLI against a real agent (ps, status, inspect,
//! logs, restart), working on while the hub is gone; `shoal logs` read from the devices over
//! MQTT; events and metrics; log filters and JSON log lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use shoal_e2e::*;
use std::io::BufRead;
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
    hub.apply(&heartbeat_manifest(dir.path(), 1, 100))?;
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

    // logs --tail (once the replica has written more than its start line and a beat).
    wait_until(Duration::from_secs(10), "a few beats logged", || {
        Ok((count_lines(&agent.workload_log("beat-0"), "beat ") >= 3).then_some(()))
    })?;
    let tail = text(&device_cli(&agent, &["logs", "beat", "--tail", "2"]));
    assert_eq!(tail.lines().count(), 2, "{tail}");
    assert!(tail.lines().all(|l| l.starts_with("beat ")), "{tail}");

    // logs -f: lines keep coming.
    let mut follow = KillOnDrop(
        Command::new(bin("shoal-agent"))
            .args(["logs", "beat", "-f", "--tail", "0", "--socket"])
            .arg(agent.data_dir.join("agent.sock"))
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let mut lines = std::io::BufReader::new(follow.0.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap()?;
    let second = lines.next().unwrap()?;
    assert!(
        first.starts_with("beat ") && second.starts_with("beat "),
        "{first} / {second}"
    );
    assert_ne!(first, second);
    drop(follow);

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

/// The events of `shoal get events -o json`, as "REASON OBJECT" strings.
fn event_keys(hub: &Hub, extra: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut args = vec!["get", "events"];
    args.extend(extra);
    Ok(hub
        .json(&args)?
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["reason"].as_str().unwrap(),
                e["object"].as_str().unwrap()
            )
        })
        .collect())
}

fn wait_event(hub: &Hub, key: &str) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(30), key, || {
        Ok(event_keys(hub, &[])?.iter().any(|k| k == key).then_some(()))
    })
    .map_err(|e| e.context(format!("events: {:?}", event_keys(hub, &[]))))
}

#[test]
fn events_and_hub_metrics_follow_placements_restarts_losses_and_rollouts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start_with(
        dir.path(),
        None,
        free_port(),
        free_port(),
        &["--insecure", "--device-grace", "2s"],
    )?;
    let _a1 = Agent::start(dir.path(), "dev1", "role=edge", &hub.join())?;
    let mut a2 = Agent::start(dir.path(), "dev2", "role=edge", &hub.join())?;
    hub.wait_devices_online(2, Duration::from_secs(20))?;

    // A watcher started now sees what follows, one JSON object per line.
    let mut watch = KillOnDrop(
        hub.shoal_command(&["get", "events", "-w", "-o", "json", "--for", "workload/web"])
            .stdout(Stdio::piped())
            .spawn()?,
    );

    let manifest = |args: &str| {
        write_manifest(
            dir.path(),
            "fleet.yaml",
            &format!(
                r#"
apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: web }}
spec:
  replicas: 2
  wasm: {{ module: "{probe}" }}
  args: [{args}]
  resources: {{ memory: 16Mi }}
  update: {{ maxUnavailable: 1 }}
---
apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: crashy }}
spec:
  replicas: 1
  wasm: {{ module: "{probe}" }}
  args: ["crash"]
  resources: {{ memory: 16Mi }}
  restart: {{ policy: Always, backoff: {{ initial: 100ms, max: 200ms }} }}
"#,
                probe = module("probe.wasm").display()
            ),
        )
    };
    hub.apply(&manifest(r#""heartbeat", "100""#))?;
    hub.wait_running("web", 2, Duration::from_secs(60))?;
    for key in [
        "DeviceJoined device/dev1",
        "DeviceJoined device/dev2",
        "Created workload/web",
        "Scheduled workload/web",
        "Started workload/web",
        "Created workload/crashy",
        "Restarted workload/crashy",
    ] {
        wait_event(&hub, key)?;
    }
    let mut lines = std::io::BufReader::new(watch.0.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap()?)?;
    assert_eq!(first["object"], "workload/web", "{first}");
    assert!(first["seq"].as_u64().unwrap() > 0 && first["timeMs"].as_u64().unwrap() > 0);

    // dev2 dies: offline, then lost; its web replica moves to dev1.
    a2.proc.kill();
    wait_event(&hub, "DeviceLost device/dev2")?;
    wait_event(&hub, "Rescheduled workload/web")?;
    let only_web = event_keys(&hub, &["--for", "workload/web"])?;
    assert!(
        only_web.iter().all(|k| k.ends_with(" workload/web")),
        "{only_web:?}"
    );
    assert!(
        only_web.iter().any(|k| k.starts_with("Rescheduled")),
        "{only_web:?}"
    );

    // A new revision rolls out.
    hub.apply(&manifest(r#""heartbeat", "150""#))?;
    wait_event(&hub, "RolloutStarted workload/web")?;
    wait_event(&hub, "RolloutComplete workload/web")?;

    // The table: kubectl's columns; -o yaml: the same events.
    let table = text(&hub.shoal_ok(&["get", "events"]));
    let head = table.lines().next().unwrap();
    assert!(
        head.starts_with("LAST SEEN") && head.contains("REASON") && head.ends_with("MESSAGE"),
        "{table}"
    );
    assert!(
        table.contains("DeviceLost") && table.contains("device dev2 is lost"),
        "{table}"
    );
    let wide = text(&hub.shoal_ok(&["get", "events", "-o", "wide"]));
    assert!(wide.lines().next().unwrap().starts_with("SEQ"), "{wide}");
    let yaml = text(&hub.shoal_ok(&["get", "events", "-o", "yaml"]));
    assert!(yaml.contains("reason: RolloutComplete"), "{yaml}");
    let devices = text(&hub.shoal_ok(&["get", "devices"]));
    let devices_wide = text(&hub.shoal_ok(&["get", "devices", "-o", "wide"]));
    assert!(
        !devices.contains("RUNTIMES") && devices_wide.contains("RUNTIMES"),
        "{devices}\n{devices_wide}"
    );

    // The watcher saw the loss's consequence and the rollout, in order.
    let mut seen = Vec::new();
    while !seen.iter().any(|r| r == "RolloutComplete") {
        let e: Value = serde_json::from_str(&lines.next().unwrap()?)?;
        assert_eq!(e["object"], "workload/web", "{e}");
        seen.push(e["reason"].as_str().unwrap().to_string());
    }
    let pos = |r: &str| seen.iter().position(|s| s == r);
    assert!(pos("Rescheduled") < pos("RolloutStarted"), "{seen:?}");
    drop(watch);

    // Hub metrics, parsed.
    let scrape = http_get(hub.http, "/metrics")?;
    let (_, body) = scrape.split_once("\r\n\r\n").unwrap();
    let m = parse_metrics(body)?;
    let get = |name: &str, labels: &[(&str, &str)]| {
        metric(&m, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} in\n{body}"))
    };
    assert_eq!(get("shoal_hub_devices", &[("state", "online")]), 1.0);
    assert_eq!(get("shoal_hub_devices", &[("state", "lost")]), 1.0);
    assert_eq!(get("shoal_hub_workloads", &[]), 2.0);
    assert!(get("shoal_hub_replicas", &[("phase", "Running")]) >= 2.0);
    // web 0 and 1 and crashy 0 placed; what ran on dev2 moved.
    assert!(
        get("shoal_hub_placements_total", &[("kind", "placed")]) >= 3.0,
        "{body}"
    );
    assert!(
        get("shoal_hub_placements_total", &[("kind", "moved")]) >= 1.0,
        "{body}"
    );
    assert!(get("shoal_hub_scheduling_duration_seconds_count", &[]) >= 2.0);
    assert!(
        get(
            "shoal_hub_mqtt_messages_received_total",
            &[("kind", "status")]
        ) > 0.0
    );
    assert!(
        get(
            "shoal_hub_mqtt_messages_received_total",
            &[("kind", "apply")]
        ) >= 2.0
    );
    assert_eq!(
        get(
            "shoal_hub_rollout_state",
            &[("workload", "web"), ("state", "Complete")]
        ),
        1.0
    );
    assert_eq!(
        get("shoal_hub_rollout_updated_replicas", &[("workload", "web")]),
        2.0
    );
    assert_eq!(
        get(
            "shoal_hub_events_total",
            &[("type", "Warning"), ("reason", "DeviceLost")]
        ),
        1.0
    );

    // Conventions: completions, clear errors with a failing status.
    let bash = text(&hub.shoal_ok(&["completion", "bash"]));
    assert!(
        bash.contains("complete") && bash.contains("shoal"),
        "{bash}"
    );
    let out = hub.shoal(&["get", "events", "--for", "bogus"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && err.contains("\"bogus\""),
        "{err}"
    );
    let out = hub.shoal(&["get", "nothing"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
    Ok(())
}

/// A child process killed if the test fails before it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agent_runs_a_module_locally_with_its_limits_and_exit_status() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let run = |args: &[&str]| {
        Command::new(bin("shoal-agent"))
            .arg("run")
            .arg(module("probe.wasm"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap()
    };
    // The module's own exit status and output.
    let out = run(&["--", "crash"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // Over its memory limit: stopped, and told why.
    let out = run(&["--limit-memory", "8Mi", "--", "hog", "64"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("memory limit"),
        "{err}"
    );
    assert!(text(&out).contains("hog: holding"), "{out:?}");
    // Sandboxed: no host files.
    let out = run(&["--", "cat", "/etc/hostname"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out).contains("cannot read /etc/hostname"), "{out:?}");
    // Forever, until Ctrl-C (SIGINT): lines stream to the terminal meanwhile.
    let mut child = KillOnDrop(
        Command::new(bin("shoal-agent"))
            .arg("run")
            .arg(module("probe.wasm"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--", "heartbeat", "50"])
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let mut lines = std::io::BufReader::new(child.0.stdout.take().unwrap())
        .lines()
        .map(|l| l.unwrap())
        .filter(|l| !l.starts_with("[shoal] "));
    assert_eq!(lines.next().unwrap(), "beat 1");
    assert_eq!(lines.next().unwrap(), "beat 2");
    Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()?;
    let status = child.0.wait()?;
    assert_eq!(status.code(), Some(130));
    // Bad input: named, and nothing runs.
    let out = Command::new(bin("shoal-agent"))
        .args(["run", "/nonexistent/m.wasm"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nonexistent/m.wasm"),
        "{err}"
    );
    Ok(())
}

#[test]
fn both_command_lines_print_shell_completions() -> anyhow::Result<()> {
    for (bin_name, shell, marker) in [
        ("shoal-agent", "zsh", "#compdef shoal-agent"),
        ("shoal", "fish", "complete -c shoal"),
    ] {
        let out = Command::new(bin(bin_name))
            .args(["completion", shell])
            .output()?;
        assert!(out.status.success(), "{out:?}");
        assert!(
            text(&out).contains(marker),
            "{bin_name} {shell}: {}",
            text(&out)
        );
    }
    let out = Command::new(bin("shoal"))
        .args(["completion", "tcsh"])
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
    Ok(())
}

/// The beat number of a probe heartbeat line (`beat N`, maybe after a `[replica] ` prefix).
fn beat(line: &str) -> Option<u64> {
    line.rsplit_once("beat ")?.1.trim().parse().ok()
}

/// `shoal logs ARGS -o json`: the entries, and whether the command succeeded.
fn log_entries(hub: &Hub, args: &[&str]) -> (Vec<Value>, Output) {
    let mut all = vec!["logs"];
    all.extend(args);
    all.extend(["-o", "json"]);
    let out = hub.shoal(&all);
    let entries = text(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (entries, out)
}

#[test]
fn shoal_logs_reads_replicas_from_their_devices_over_mqtt() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // TLS and the topic ACL: devices may read their log requests and answer them.
    let hub = Hub::start(dir.path(), None)?;
    let a1 = Agent::start(dir.path(), "dev1", "role=edge", &hub.join())?;
    let mut a2 = Agent::start(dir.path(), "dev2", "role=edge", &hub.join())?;
    hub.wait_devices_online(2, Duration::from_secs(30))?;
    // A beat every 20 ms: enough bytes that the logs' time index is marked every second.
    hub.apply(&heartbeat_manifest(dir.path(), 2, 20))?;
    let view = hub.wait_running("beat", 2, Duration::from_secs(60))?;
    let on = |replica: u64| {
        view["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["replica"] == replica)
            .and_then(|r| r["device"].as_str())
            .unwrap()
            .to_string()
    };
    let (d0, d1) = (on(0), on(1));
    assert_ne!(d0, d1, "the two replicas are spread over both devices");
    std::thread::sleep(Duration::from_secs(2));

    // Everything: both replicas' lines, prefixed since there are two.
    let all = text(&hub.shoal_ok(&["logs", "beat"]));
    for instance in ["beat-0", "beat-1"] {
        let n = all
            .lines()
            .filter(|l| l.starts_with(&format!("[{instance}] beat ")))
            .count();
        assert!(n >= 20, "{n} lines of {instance} in:\n{all}");
    }
    // The replicas' output, and the agent's own lines about their runs.
    assert!(
        all.lines()
            .all(|l| beat(l).is_some() || l.contains("] [shoal] started")),
        "{all}"
    );

    // One device: its replica alone, unprefixed; the JSON entries name device and replica.
    let only = text(&hub.shoal_ok(&["logs", "beat", "--device", &d1]));
    assert!(
        only.lines()
            .all(|l| l.starts_with("beat ") || l.starts_with("[shoal] ")),
        "{only}"
    );
    let (entries, out) = log_entries(&hub, &["beat", "--device", &d1]);
    assert!(out.status.success());
    assert!(!entries.is_empty());
    assert!(
        entries
            .iter()
            .all(|e| e["device"] == d1.as_str() && e["instance"] == "beat-1"),
        "{entries:?}"
    );

    // --tail: per replica.
    let tail = text(&hub.shoal_ok(&["logs", "beat", "--tail", "3"]));
    assert_eq!(tail.lines().count(), 6, "{tail}");
    assert_eq!(
        tail.lines().filter(|l| l.starts_with("[beat-0]")).count(),
        3
    );

    // --since: what was there 3 s ago is left out, what came after is not.
    let (before, _) = log_entries(&hub, &["beat", "--device", &d0]);
    let last_before = before
        .iter()
        .filter_map(|e| beat(e["line"].as_str()?))
        .max()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let (recent, out) = log_entries(&hub, &["beat", "--device", &d0, "--since", "1s"]);
    assert!(out.status.success());
    let numbers: Vec<u64> = recent
        .iter()
        .filter_map(|e| beat(e["line"].as_str()?))
        .collect();
    assert!(!numbers.is_empty());
    assert!(
        numbers[0] > last_before,
        "--since 1s began at beat {} though beat {last_before} was 3 s old",
        numbers[0]
    );
    assert!(numbers.len() < before.len(), "fewer lines than everything");

    // -f: new lines as they come, until the reader goes; then the device stops streaming.
    let mut follow = KillOnDrop(
        hub.shoal_command(&["logs", "beat", "--device", &d0, "--tail", "1", "-f"])
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let mut lines = std::io::BufReader::new(follow.0.stdout.take().unwrap()).lines();
    let first = beat(&lines.next().unwrap()?).unwrap();
    let mut last = first;
    // Well past the first renewal of the session (5 s).
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(7) {
        let n = beat(&lines.next().unwrap()?).unwrap();
        assert!(n > last, "beat {n} after {last}");
        last = n;
    }
    assert!(last > first + 100, "followed from {first} to {last}");
    drop(lines);
    drop(follow);
    let streamer = if d0 == "dev1" { &a1 } else { &a2 };
    wait_until(Duration::from_secs(10), "the stream cancelled", || {
        Ok(streamer
            .proc
            .log_text()
            .contains("log stream cancelled by the hub")
            .then_some(()))
    })?;

    // Bad input names itself; nothing is asked of anyone.
    let out = hub.shoal(&["logs", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("workload \"nope\" not found"), "{err}");
    let out = hub.shoal(&["logs", "beat", "--device", "Bad_Id"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Bad_Id"));

    // A device gone: the others' lines still come, its absence is said, and the exit
    // status says the output is incomplete.
    a2.proc.kill();
    wait_until(Duration::from_secs(20), "dev2 offline", || {
        let devices = hub.devices()?;
        Ok(devices
            .iter()
            .any(|d| d["id"] == "dev2" && d["online"] == false)
            .then_some(()))
    })?;
    let out = hub.shoal(&["logs", "beat", "--tail", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("device dev2 is offline"), "{err}");
    let alive = if d0 == "dev1" { "beat-0" } else { "beat-1" };
    let got = text(&out);
    assert_eq!(got.lines().count(), 2, "{got}");
    assert!(
        got.lines().all(|l| l.starts_with(&format!("[{alive}]"))),
        "{got}"
    );
    Ok(())
}
