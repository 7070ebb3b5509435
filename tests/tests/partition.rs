//! A device cut off the network (issue 9's partition test): hosts in network namespaces, the
//! device's switch port goes down for longer than the grace period. Meanwhile the device
//! keeps running what it has (offline autonomy) and the hub moves its replicas; when the
//! link comes back the device takes the newer desired state and stops what moved away, so
//! no replica runs twice. Needs root (see `shoal_e2e::netns`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use serde_json::Value;
use shoal_e2e::netns::Lan;
use shoal_e2e::*;
use std::time::Duration;

/// Instances running on an agent, by its local `ps` (its socket is a file: reachable from
/// outside its namespace).
fn running(agent: &Agent) -> Result<Vec<String>> {
    let out = std::process::Command::new(bin("shoal-agent"))
        .args(["ps", "-o", "json", "--socket"])
        .arg(agent.data_dir.join("agent.sock"))
        .output()?;
    let ps: Value = serde_json::from_slice(&out.stdout)?;
    let mut v: Vec<String> = ps
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["phase"] == "Running")
                .map(|r| r["instance"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    Ok(v)
}

/// The hub on host 0 of `lan` (with `extra` serve flags), up, and how agents join it.
fn hub_on(lan: &Lan, dir: &std::path::Path, extra: &[&str]) -> Result<(Proc, Join)> {
    let hub_dir = dir.join("hub");
    let mut cmd = lan.command(0, bin("shoal-hub"));
    cmd.args(["serve", "--data-dir"])
        .arg(&hub_dir)
        .args([
            "--mqtt-listen",
            "0.0.0.0:8883",
            "--http-listen",
            "0.0.0.0:8080",
            "--no-mdns",
        ])
        .args(extra);
    let hub = Proc::spawn("hub", &mut cmd, dir.join("hub.log"))?;
    wait_until(Duration::from_secs(20), "hub up", || {
        Ok(shoal_on(lan, dir, &["get", "devices"])
            .status
            .success()
            .then_some(()))
    })?;
    let join = Join {
        broker: format!("mqtts://{}:8883", lan.addr(0)),
        hub: format!("https://{}:8080", lan.addr(0)),
        hub_data: Some(hub_dir),
        etcd: None,
        grant_labels: true,
    };
    Ok((hub, join))
}

/// `shoal ARGS` on host 0, as the operator of the hub [`hub_on`] started under `dir`.
fn shoal_on(lan: &Lan, dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    lan.command(0, bin("shoal"))
        .args(args)
        .env("SHOAL_BROKER", "mqtts://127.0.0.1:8883")
        .env("SHOAL_HUB", "https://127.0.0.1:8080")
        .env("SHOAL_CREDENTIALS", dir.join("hub").join("operator"))
        .output()
        .expect("run shoal")
}

#[test]
fn a_partitioned_device_loses_its_replicas_and_on_return_runs_no_duplicates() -> Result<()> {
    let Some(lan) = Lan::new(3)? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let (_hub, join) = hub_on(&lan, dir.path(), &["--device-grace", "3s"])?;
    let shoal = |args: &[&str]| shoal_on(&lan, dir.path(), args);
    let json = |args: &[&str]| -> Result<Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = shoal(&a);
        anyhow::ensure!(
            out.status.success(),
            "shoal {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let cut = Agent::start_program(
        dir.path(),
        "p1",
        "",
        &join,
        &[],
        lan.command(1, bin("shoal-agent")),
    )?;
    let other = Agent::start_program(
        dir.path(),
        "p2",
        "",
        &join,
        &[],
        lan.command(2, bin("shoal-agent")),
    )?;
    let online = |n: usize| -> Result<Option<()>> {
        let d = json(&["get", "devices"])?;
        let up = d
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["online"] == true && d["lost"] == false)
            .count();
        Ok((up == n).then_some(()))
    };
    wait_until(Duration::from_secs(30), "two devices online", || online(2))?;
    // Spread: one replica on each device.
    let manifest = write_manifest(
        dir.path(),
        "web.yaml",
        &format!(
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: web }}\nspec:\n  replicas: 2\n  wasm: {{ module: \"{}\" }}\n  args: [heartbeat, \"200\"]\n  resources: {{ memory: 16Mi }}\n",
            module("probe.wasm").display()
        ),
    );
    let out = shoal(&["apply", "-f", manifest.to_str().unwrap()]);
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(Duration::from_secs(60), "one replica per device", || {
        Ok((running(&cut)?.len() == 1 && running(&other)?.len() == 1).then_some(()))
    })?;
    let mine = running(&cut)?;

    // Unplugged: lost after its MQTT keep-alive runs out and the grace period passes; its
    // replica moves to the other device. The cut-off device keeps running its own.
    lan.set_link(1, false)?;
    wait_until(
        Duration::from_secs(60),
        "the replica moved off the cut-off device",
        || Ok((running(&other)?.len() == 2).then_some(())),
    )?;
    let devices = json(&["get", "devices"])?;
    let p1 = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "p1")
        .unwrap();
    assert_eq!(p1["lost"], true, "{p1}");
    assert_eq!(
        running(&cut)?,
        mine,
        "offline, the device keeps what it runs"
    );

    // Plugged back in: it learns its replica moved and stops it; nothing runs twice.
    lan.set_link(1, true)?;
    wait_until(
        Duration::from_secs(60),
        "the device back and reconciled",
        || Ok((online(2)?.is_some() && running(&cut)?.is_empty()).then_some(())),
    )?;
    let both = running(&other)?;
    assert_eq!(
        both,
        ["web-0", "web-1"],
        "every replica once, on the other device"
    );
    // And it stays that way (placement is stable: nothing moves back).
    std::thread::sleep(Duration::from_secs(2));
    assert!(running(&cut)?.is_empty());
    assert_eq!(running(&other)?, both);
    Ok(())
}

/// Whether `instance` runs on `agent`, by its local `ps`; `None` while `ps` fails.
fn runs(agent: &Agent, instance: &str) -> Option<bool> {
    running(agent).ok().map(|r| r.iter().any(|i| i == instance))
}

/// A singleton that must never run twice (`spec.disconnect: { lostAfter: 20s, stopAfter:
/// 5s }`): its device is cut off; sampling both devices' local APIs throughout, at no
/// instant do two copies run. The cut-off copy stops by itself, the replacement starts on
/// the other device once `lostAfter` has passed, and after the heal exactly one copy runs.
#[test]
fn a_singleton_with_stop_after_never_runs_twice_in_a_partition() -> Result<()> {
    let Some(lan) = Lan::new(3)? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let (_hub, join) = hub_on(&lan, dir.path(), &[])?;
    let shoal = |args: &[&str]| shoal_on(&lan, dir.path(), args);
    let agents = [
        Agent::start_program(
            dir.path(),
            "p1",
            "",
            &join,
            &[],
            lan.command(1, bin("shoal-agent")),
        )?,
        Agent::start_program(
            dir.path(),
            "p2",
            "",
            &join,
            &[],
            lan.command(2, bin("shoal-agent")),
        )?,
    ];
    wait_until(Duration::from_secs(30), "two devices online", || {
        let out = shoal(&["get", "devices", "-o", "json"]);
        let d: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let up = d
            .as_array()
            .map_or(0, |a| a.iter().filter(|d| d["online"] == true).count());
        Ok((up == 2).then_some(()))
    })?;
    let manifest = write_manifest(
        dir.path(),
        "valve.yaml",
        &format!(
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: valve }}\nspec:\n  wasm: {{ module: \"{}\" }}\n  args: [heartbeat, \"200\"]\n  disconnect: {{ lostAfter: 20s, stopAfter: 5s }}\n",
            module("probe.wasm").display()
        ),
    );
    let out = shoal(&["apply", "-f", manifest.to_str().unwrap()]);
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let holder = wait_until(Duration::from_secs(60), "valve running", || {
        Ok((0..2).find(|&i| runs(&agents[i], "valve-0") == Some(true)))
    })?;
    let other = 1 - holder;

    // Cut off the holder, and watch both devices until the replacement runs.
    let cut_at = std::time::Instant::now();
    lan.set_link(holder + 1, false)?;
    let (mut stopped_after, mut replaced_after) = (None, None);
    while replaced_after.is_none() {
        anyhow::ensure!(
            cut_at.elapsed() < Duration::from_secs(90),
            "no replacement after 90s"
        );
        let (h, o) = (
            runs(&agents[holder], "valve-0"),
            runs(&agents[other], "valve-0"),
        );
        assert!(
            !(h == Some(true) && o == Some(true)),
            "two copies run at once, {:?} after the cut",
            cut_at.elapsed()
        );
        if h == Some(false) && stopped_after.is_none() {
            stopped_after = Some(cut_at.elapsed());
        }
        if o == Some(true) {
            replaced_after = Some(cut_at.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (stopped, replaced) = (stopped_after.unwrap(), replaced_after.unwrap());
    println!("cut-off copy stopped after {stopped:?}, replacement running after {replaced:?}");
    assert!(stopped < replaced);
    // stopAfter counts from the last confirmed message (at most a status period before the cut).
    assert!(stopped <= Duration::from_secs(5 + 10 + 2), "{stopped:?}");
    // lostAfter counts from the hub's last hearing (at most a status period before the cut),
    // then the hub's check (1 s) and the start.
    assert!(replaced <= Duration::from_secs(20 + 10 + 5), "{replaced:?}");

    // Heal: the device takes the hub's newer state, the copy it had stays stopped.
    lan.set_link(holder + 1, true)?;
    let healed = std::time::Instant::now();
    while healed.elapsed() < Duration::from_secs(20) {
        let (h, o) = (
            runs(&agents[holder], "valve-0"),
            runs(&agents[other], "valve-0"),
        );
        assert!(
            !(h == Some(true) && o == Some(true)),
            "two copies after the heal"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let other_log = agents[other].proc.log_text();
    assert_eq!(
        runs(&agents[other], "valve-0"),
        Some(true),
        "{}",
        &other_log[other_log.len().saturating_sub(6000)..]
    );
    assert_eq!(runs(&agents[holder], "valve-0"), Some(false));
    let log = agents[holder].proc.log_text();
    assert!(log.contains("replica fenced"), "{log}");
    Ok(())
}
