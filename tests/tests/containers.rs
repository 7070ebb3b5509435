//! Container workloads end to end: the real hub and agents, a private containerd (Debian's)
//! and a registry on loopback, with a busybox image the test builds and pushes.
//!
//! - Only agents whose containerd answers offer `container` (an agent given a socket nobody
//!   serves does not); a container workload lands on them alone, runs, logs, restarts by its
//!   policy, and keeps its volume across restarts; one over its memory limit is reported
//!   `OOMKilled` through the hub.
//! - A workload with both variants runs WASM where the device offers it, the container
//!   elsewhere, and says which runs where.
//! - An agent restart adopts its running containers (nothing starts twice); delete leaves
//!   nothing in containerd, and the volumes go.
//! - A container runs as its image's `USER`, resolved in the image's own `/etc/passwd` and
//!   `/etc/group`, under containerd's default seccomp profile; a `USER` the image does not
//!   know is refused, and the replica's reason names it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_e2e::*;
use std::time::Duration;

fn containers_of(
    rt: &tokio::runtime::Runtime,
    socket: &std::path::Path,
    ns: &str,
) -> anyhow::Result<Vec<String>> {
    rt.block_on(async {
        let regs = std::sync::Arc::new(shoal_registry::Registries::new(Default::default()));
        let (c, _) =
            shoal_agent::containerd::Containerd::connect(socket, ns, std::env::temp_dir(), regs)
                .await?;
        Ok(c.managed().await?)
    })
}

#[test]
fn container_workloads_run_where_containerd_answers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let Some(ctrd) = PrivateContainerd::start(dir.path())? else {
        return Ok(());
    };
    let registry = Registry::start(dir.path())?;
    let rt = tokio::runtime::Runtime::new()?;
    let image = rt.block_on(async {
        let regs = shoal_registry::Registries::new(Default::default());
        let tag = registry.reference("shoal/busybox:1").parse()?;
        shoal_e2e::image::push_busybox(&regs, &tag, &[("amd64", None), ("arm64", Some("v8"))]).await
    })?;
    let hub = Hub::start(dir.path(), None)?;
    let socket = ctrd.socket.to_str().unwrap().to_string();
    let ns = |id: &str| format!("shoal-e2e-{}-{id}", std::process::id());
    let with_containerd = |id: &str, extra: &[&str]| {
        let namespace = ns(id);
        // Volumes go as soon as their workload leaves (the default keeps them for 24h).
        let mut args = vec![
            "--volume-retention",
            "0s",
            "--containerd-socket",
            socket.as_str(),
            "--containerd-namespace",
        ];
        args.push(&namespace);
        args.extend_from_slice(extra);
        Agent::start_with(dir.path(), id, "", &hub.join(), &args)
    };
    let c1 = with_containerd("c1", &[])?;
    let mut c2 = with_containerd("c2", &["--no-wasm"])?;
    // A containerd socket that nobody serves: the agent runs, WASM only.
    let silent = dir.path().join("no-containerd.sock");
    let _w1 = Agent::start_with(
        dir.path(),
        "w1",
        "",
        &hub.join(),
        &["--containerd-socket", silent.to_str().unwrap()],
    )?;
    hub.wait_devices_online(3, Duration::from_secs(20))?;
    let devices = hub.json(&["get", "devices"])?;
    let runtimes = |id: &str| -> Vec<String> {
        let d = devices
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .unwrap_or_else(|| panic!("{id} in {devices}"));
        serde_json::from_value(d["runtimes"].clone()).unwrap()
    };
    assert_eq!(runtimes("c1"), ["wasm", "container"]);
    assert_eq!(runtimes("c2"), ["container"]);
    assert_eq!(runtimes("w1"), ["wasm"], "no answer, no container runtime");

    // The image's tag, pinned by `shoal apply`; the container variant only.
    let tag = registry.reference("shoal/busybox:1");
    let manifest = format!(
        r#"apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: box }}
spec:
  placement: every
  container: {{ image: "{tag}", command: [/bin/sh] }}
  args: ["-c", "echo hello from box $ZONE; n=$(cat /data/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /data/n; echo run $n; sleep 2; exit 3"]
  env: {{ ZONE: greenhouse }}
  resources: {{ memory: 32Mi }}
  restart: {{ backoff: {{ initial: 200ms, max: 1s }} }}
  volumes: [{{ name: data, path: /data }}]
"#
    );
    let m = write_manifest(dir.path(), "box.yaml", &manifest);
    hub.apply(&m)?;
    let w = wait_until(Duration::from_secs(60), "box running on both", || {
        let w = hub.workload("box")?.unwrap();
        let running = w["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["phase"] == "Running")
            .count();
        Ok((running == 2).then_some(w))
    })?;
    let mut devices: Vec<&str> = w["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["device"].as_str().unwrap())
        .collect();
    devices.sort();
    assert_eq!(devices, ["c1", "c2"], "only devices with containerd: {w}");
    assert!(w["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["variant"] == "container"));
    let described = hub.json(&["describe", "workload", "box"])?;
    let stored = described["spec"]["container"]["image"].as_str().unwrap();
    assert_eq!(stored, image.to_string(), "pinned to the pushed index");
    // Its output reaches the replica log, and exit 3 restarts it by policy.
    wait_until(Duration::from_secs(30), "a restart after exit 3", || {
        let w = hub.workload("box")?.unwrap();
        let restarted = w["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["restarts"].as_u64().unwrap_or(0) >= 1);
        Ok(restarted.then_some(()))
    })?;
    // The restart counted may be c2's replica's: c1's log shows its own second run when
    // that has started.
    wait_until(Duration::from_secs(30), "c1's replica run twice", || {
        let log = c1.workload_log("box-0") + &c1.workload_log("box-1");
        let twice = log.matches("hello from box greenhouse").count() >= 2
            && log.contains("exited with status 3");
        Ok(twice.then_some(()))
    })?;
    // The volume outlived the first run: the second counted on from it.
    wait_until(Duration::from_secs(30), "a second run on c1", || {
        let log = c1.workload_log("box-0") + &c1.workload_log("box-1");
        Ok(log.contains("run 2").then_some(()))
    })?;
    let volume = c1.data_dir.join("volumes/box/data");
    let runs: u32 = std::fs::read_to_string(volume.join("n"))?.trim().parse()?;
    assert!(runs >= 2, "{runs}");

    // Over its memory limit: the kernel kills it, and the hub says why.
    let hog = format!(
        r#"apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: hog }}
spec:
  container: {{ image: "{tag}", command: [/bin/sh] }}
  args: ["-c", "x=$(yes | head -c 100000000); echo survived"]
  resources: {{ memory: 16Mi }}
  restart: {{ policy: Never }}
"#
    );
    let m = write_manifest(dir.path(), "hog.yaml", &hog);
    hub.apply(&m)?;
    let r = wait_until(Duration::from_secs(60), "hog failed", || {
        let w = hub.workload("hog")?.unwrap();
        let r = w["replicas"][0].clone();
        Ok((r["phase"] == "Failed").then_some(r))
    })?;
    assert_eq!(
        r["reason"], "OOMKilled: memory limit of 16Mi exceeded (status 137)",
        "{r}"
    );

    // Both variants: WASM on c1 and w1, the container on c2 (no WASM there).
    let both = format!(
        r#"apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: both }}
spec:
  placement: every
  wasm: {{ module: "{hello}" }}
  container: {{ image: "{tag}", command: [/bin/sh], stopGracePeriod: 1s }}
  args: ["-c", "echo started; exec sleep 1000"]
  resources: {{ memory: 32Mi }}
"#,
        hello = module("hello.wasm").display()
    );
    let m = write_manifest(dir.path(), "both.yaml", &both);
    hub.apply(&m)?;
    let w = hub.wait_running("both", 3, Duration::from_secs(60))?;
    let variants: std::collections::BTreeMap<String, String> = w["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["device"].as_str().unwrap().to_string(),
                r["variant"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        variants,
        [
            ("c1".to_string(), "wasm".to_string()),
            ("c2".to_string(), "container".to_string()),
            ("w1".to_string(), "wasm".to_string()),
        ]
        .into()
    );

    // Restart c2: its container keeps running and is adopted, not started twice.
    // Every replica log of `both` on a device (its replica index is not known here).
    let logs_of = |a: &Agent| -> String {
        (0..3)
            .map(|i| a.workload_log(&format!("both-{i}")))
            .collect()
    };
    wait_until(Duration::from_secs(20), "the container's output", || {
        Ok(logs_of(&c2).contains("started").then_some(()))
    })?;
    assert!(c2.proc.terminate(Duration::from_secs(20))?, "clean exit");
    let before = containers_of(&rt, &ctrd.socket, &ns("c2"))?;
    assert!(
        before.iter().any(|id| id.starts_with("both-")),
        "left running while the agent is down: {before:?}"
    );
    c2 = with_containerd("c2", &["--no-wasm"])?;
    wait_until(Duration::from_secs(30), "c2 adopting", || {
        Ok(c2
            .proc
            .log_text()
            .contains("adopting the running container")
            .then_some(()))
    })?;
    hub.wait_running("both", 3, Duration::from_secs(30))?;
    let text = logs_of(&c2);
    assert_eq!(text.matches("started").count(), 1, "{text}");

    // Deleted and applied again within its stop grace period (`sleep` ignores SIGTERM, so
    // the old container lives 1 s more under the same id): the new one waits for it, then
    // starts afresh, neither adopting the dying task nor restarting.
    hub.shoal_ok(&["delete", "workload", "both"]);
    hub.apply(&m)?;
    let w = hub.wait_running("both", 3, Duration::from_secs(30))?;
    wait_until(
        Duration::from_secs(20),
        "the container started again",
        || Ok((logs_of(&c2).matches("started").count() == 2).then_some(())),
    )?;
    let on_c2 = |w: &serde_json::Value| {
        w["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["device"] == "c2")
            .cloned()
            .unwrap()
    };
    let was_c2 = on_c2(&w);
    std::thread::sleep(Duration::from_secs(2));
    let now_c2 = on_c2(&hub.workload("both")?.unwrap());
    assert_eq!(now_c2["phase"], "Running", "{now_c2}");
    assert_eq!(now_c2["restarts"], 0, "{now_c2} (was {was_c2})");
    let adopted_both = c2
        .proc
        .log_text()
        .lines()
        .filter(|l| l.contains("adopting the running container") && l.contains("both-"))
        .count();
    assert_eq!(adopted_both, 1, "only the agent restart adopted `both`");

    // Delete: nothing of these workloads is left in containerd, nor their volumes.
    for name in ["box", "both", "hog"] {
        hub.shoal_ok(&["delete", "workload", name]);
    }
    wait_until(Duration::from_secs(30), "box's volumes removed", || {
        Ok(
            (!c1.data_dir.join("volumes/box").exists()
                && !c2.data_dir.join("volumes/box").exists())
            .then_some(()),
        )
    })?;
    for id in ["c1", "c2"] {
        let removed = wait_until(Duration::from_secs(30), "containers removed", || {
            Ok(containers_of(&rt, &ctrd.socket, &ns(id))?
                .is_empty()
                .then_some(()))
        });
        if let Err(e) = removed {
            // What is left, and what the agent said about it (a flaky failure once in CI).
            let left = containers_of(&rt, &ctrd.socket, &ns(id)).unwrap_or_default();
            let agent = if id == "c1" { &c1 } else { &c2 };
            eprintln!("{id}: left {left:?}\n{}", agent.proc.log_text());
            return Err(e);
        }
        // No task and no container snapshot left: only the image's committed layers.
        let ctr = |args: &[&str]| {
            let out = std::process::Command::new("ctr")
                .args(["-a", &socket, "-n", &ns(id)])
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        let tasks = ctr(&["tasks", "ls", "-q"]);
        assert!(tasks.trim().is_empty(), "tasks left in {id}: {tasks}");
        let snapshots = ctr(&["snapshots", "ls"]);
        assert!(
            !snapshots.lines().any(|l| l.contains("Active")),
            "active snapshots left in {id}: {snapshots}"
        );
        assert!(
            snapshots.lines().any(|l| l.contains("Committed")),
            "{snapshots}"
        );
    }
    drop(c2);
    drop(c1);
    drop(ctrd);
    Ok(())
}

#[test]
fn containers_run_as_the_image_user_under_seccomp() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let Some(ctrd) = PrivateContainerd::start(dir.path())? else {
        return Ok(());
    };
    let registry = Registry::start(dir.path())?;
    let rt = tokio::runtime::Runtime::new()?;
    let files = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234::/home/app:/bin/sh\n",
        ),
        (
            "etc/group",
            "root:x:0:\napp:x:1234:\nsensors:x:2000:app,root\n",
        ),
    ];
    let platforms = [("amd64", None), ("arm64", Some("v8"))];
    rt.block_on(async {
        let regs = shoal_registry::Registries::new(Default::default());
        for (tag, user) in [("shoal/app:1", "app"), ("shoal/stranger:1", "nobody-here")] {
            let tag = registry.reference(tag).parse()?;
            shoal_e2e::image::push_busybox_with(&regs, &tag, &platforms, &files, Some(user))
                .await?;
        }
        anyhow::Ok(())
    })?;
    let hub = Hub::start(dir.path(), None)?;
    let socket = ctrd.socket.to_str().unwrap().to_string();
    let ns = format!("shoal-e2e-{}-u1", std::process::id());
    let agent = Agent::start_with(
        dir.path(),
        "u1",
        "",
        &hub.join(),
        &[
            "--no-wasm",
            "--containerd-socket",
            &socket,
            "--containerd-namespace",
            &ns,
        ],
    )?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;

    // `USER app`: uid and primary gid from the image's /etc/passwd, its other groups from
    // /etc/group; seccomp in filter mode (2).
    let tag = registry.reference("shoal/app:1");
    let who = format!(
        r#"apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: who }}
spec:
  container: {{ image: "{tag}", command: [/bin/sh] }}
  args: ["-c", "id; cat /proc/self/status"]
  resources: {{ memory: 32Mi }}
  restart: {{ policy: Never }}
"#
    );
    hub.apply(&write_manifest(dir.path(), "who.yaml", &who))?;
    let log = wait_until(Duration::from_secs(60), "who's output", || {
        let log = agent.workload_log("who-0");
        Ok(log.contains("Seccomp:").then_some(log))
    })?;
    assert!(log.contains("uid=1234(app) gid=1234(app)"), "{log}");
    assert!(log.contains("2000(sensors)"), "supplementary group: {log}");
    assert!(log.contains("Seccomp:\t2"), "{log}");

    // `USER nobody-here`: not in the image's /etc/passwd, so it never starts.
    let tag = registry.reference("shoal/stranger:1");
    let stranger = format!(
        r#"apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: stranger }}
spec:
  container: {{ image: "{tag}", command: [/bin/sh] }}
  args: ["-c", "echo ran as $(id -u)"]
  resources: {{ memory: 32Mi }}
  restart: {{ policy: Never }}
"#
    );
    hub.apply(&write_manifest(dir.path(), "stranger.yaml", &stranger))?;
    let r = wait_until(Duration::from_secs(60), "stranger failed", || {
        let w = hub.workload("stranger")?.unwrap();
        let r = w["replicas"][0].clone();
        Ok((r["phase"] == "Failed").then_some(r))
    })?;
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(r#"user "nobody-here""#) && reason.contains("shoal/stranger"),
        "{r}"
    );
    assert!(!agent.workload_log("stranger-0").contains("ran as"));
    drop(agent);
    drop(ctrd);
    Ok(())
}
