//! Hardware on real agents (issue 26): a pseudo-terminal's slave (a real character device)
//! offered as `serial`, scheduled like an extended resource, and reached from a WASM guest
//! through the `shoal_device` host functions and from a container as its own node.
//!
//! - The hub counts what each device offers (`get devices`), places a workload asking for
//!   `resources.devices.serial` only where one is free, and leaves a second one Pending
//!   with a reason while the first holds the node; it takes the node once the first leaves.
//! - The guest writes a line to the device and reads the reply the test writes on the
//!   master side; `describe` says which replica holds which node.
//! - A container is given the node at its own path, and nothing else of `/dev`.
//! - Both learn where they run: `SHOAL_DEVICE_ID`, `SHOAL_WORKLOAD`, `SHOAL_REPLICA`, the
//!   device's operator labels as `SHOAL_LABEL_*`, and `${device.…}` references expanded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_e2e::pty::Pty;
use shoal_e2e::*;
use std::time::Duration;

fn serial_workload(name: &str, label: &str) -> String {
    format!(
        "---\napiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: {name} }}\nspec:\n  wasm: {{ module: \"{}\" }}\n  args: [\"{label}\"]\n  resources: {{ devices: {{ serial: 1 }} }}\n",
        module("serial.wasm").display()
    )
}

#[test]
fn a_serial_device_is_scheduled_held_and_reached_from_wasm() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pty = Pty::open()?;
    let hub = Hub::start(dir.path(), None)?;
    let device_flag = format!("serial={}", pty.path);
    let edge1 = Agent::start_with(
        dir.path(),
        "edge-1",
        "",
        &hub.join(),
        &["--device", &device_flag],
    )?;
    // A node that does not exist is not offered (and not counted).
    let _edge2 = Agent::start_with(
        dir.path(),
        "edge-2",
        "",
        &hub.join(),
        &["--device", "serial=/dev/shoal-no-such-tty"],
    )?;
    hub.wait_devices_online(2, Duration::from_secs(20))?;
    let devices = hub.json(&["get", "devices"])?;
    let hardware = |id: &str| {
        devices
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .map(|d| d["hardware"].clone())
            .unwrap()
    };
    assert_eq!(hardware("edge-1"), serde_json::json!({ "serial": 1 }));
    assert_eq!(hardware("edge-2"), serde_json::Value::Null);

    hub.apply(&write_manifest(
        dir.path(),
        "a.yaml",
        &serial_workload("modbus", "site-a"),
    ))?;
    if let Err(e) = hub.wait_running("modbus", 1, Duration::from_secs(30)) {
        panic!("{e}: {}", hub.workload("modbus")?.unwrap());
    }
    let ping = pty.expect_line("ping from", Duration::from_secs(20))?;
    // The guest learnt where it runs (SHOAL_DEVICE_ID).
    assert_eq!(ping, "ping from edge-1 site-a");
    pty.send("temperature 21.5\n")?;
    wait_until(
        Duration::from_secs(20),
        "the reply in the guest's log",
        || {
            Ok(edge1
                .workload_log("modbus-0")
                .contains("reply: temperature 21.5")
                .then_some(()))
        },
    )?;
    let w = hub.workload("modbus")?.unwrap();
    assert_eq!(w["replicas"][0]["device"], "edge-1");
    assert_eq!(w["replicas"][0]["devices"], serde_json::json!([pty.path]));
    let wide = hub.shoal(&["get", "devices", "-o", "wide"]);
    let text = String::from_utf8_lossy(&wide.stdout);
    assert!(text.contains("serial=1/1"), "{text}");
    // `describe device`: its hardware, and which replica holds which node.
    let described = hub.shoal(&["describe", "device", "edge-1"]);
    let text = String::from_utf8_lossy(&described.stdout).to_string();
    assert!(described.status.success(), "{text}");
    assert!(text.contains("Hardware:    serial=1/1"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("modbus"))
        .unwrap_or_else(|| panic!("no modbus row in {text}"));
    assert!(row.contains("Running") && row.contains(&pty.path), "{row}");
    assert!(
        text.contains("DeviceJoined") || text.contains("Scheduled"),
        "{text}"
    );
    // The operators' notes: shown, kept, and refused when they would overwrite silently.
    let out = hub.shoal(&["annotate", "device", "edge-1", "owner=plant 7, line 2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = hub.shoal(&["annotate", "device", "edge-1", "owner=someone"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("pass --overwrite"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let text =
        String::from_utf8_lossy(&hub.shoal(&["describe", "device", "edge-1"]).stdout).to_string();
    assert!(
        text.contains("Annotation:  owner: plant 7, line 2"),
        "{text}"
    );
    let json = hub.json(&["describe", "device", "edge-1"])?;
    assert_eq!(json["device"]["annotations"]["owner"], "plant 7, line 2");
    assert_eq!(json["replicas"][0]["workload"], "modbus");
    assert_eq!(
        json["replicas"][0]["devices"],
        serde_json::json!([pty.path])
    );
    let missing = hub.shoal(&["describe", "device", "nope"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("device \"nope\" not found"));

    // A second workload asking for the same class: nowhere to go while the node is held.
    hub.apply(&write_manifest(
        dir.path(),
        "b.yaml",
        &serial_workload("logger", "site-b"),
    ))?;
    let reason = wait_until(Duration::from_secs(20), "logger pending", || {
        let w = hub.workload("logger")?.unwrap();
        Ok(w["pendingReason"].as_str().map(str::to_string))
    })?;
    assert_eq!(
        reason,
        "0/2 devices: 2 insufficient serial devices (need 1, max free 0)"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(hub.workload("logger")?.unwrap()["ready"], 0);

    // The holder leaves: the node is handed to the waiting workload.
    assert!(hub
        .shoal(&["delete", "workload", "modbus"])
        .status
        .success());
    hub.wait_running("logger", 1, Duration::from_secs(30))?;
    let ping = pty.expect_line("ping from", Duration::from_secs(20))?;
    assert_eq!(ping, "ping from edge-1 site-b");
    Ok(())
}

/// A private containerd and a registry holding busybox as `shoal/busybox:1`; `None` where
/// containerd cannot run (the test then has nothing to do).
fn busybox_rig(dir: &std::path::Path) -> anyhow::Result<Option<(PrivateContainerd, Registry)>> {
    let Some(ctrd) = PrivateContainerd::start(dir)? else {
        return Ok(None);
    };
    let registry = Registry::start(dir)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let regs = shoal_registry::Registries::new(Default::default());
        let tag = registry.reference("shoal/busybox:1").parse()?;
        shoal_e2e::image::push_busybox(&regs, &tag, &[("amd64", None), ("arm64", Some("v8"))]).await
    })?;
    Ok(Some((ctrd, registry)))
}

#[test]
fn a_container_gets_its_serial_node_at_the_same_path() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let Some((ctrd, registry)) = busybox_rig(dir.path())? else {
        return Ok(());
    };
    let pty = Pty::open()?;
    // Offered by a name outside /dev/pts (the container mounts its own devpts there), as a
    // board names its adapter by /dev/serial/by-id/…: a link the agent follows.
    let link = dir.path().join("ttySENSOR0");
    std::os::unix::fs::symlink(&pty.path, &link)?;
    let link = link.to_str().unwrap().to_string();
    let hub = Hub::start(dir.path(), None)?;
    let namespace = format!("shoal-e2e-{}-hw", std::process::id());
    let _agent = Agent::start_with(
        dir.path(),
        "c1",
        "zone=north",
        &hub.join(),
        &[
            "--no-wasm",
            "--containerd-socket",
            ctrd.socket.to_str().unwrap(),
            "--containerd-namespace",
            &namespace,
            "--device",
            &format!("serial={link}"),
        ],
    )?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    let tag = registry.reference("shoal/busybox:1");
    let manifest = format!(
        r#"apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: meter }}
spec:
  container:
    image: "{tag}"
    command: [/bin/sh]
    capabilities: {{ add: [CHOWN], drop: [KILL] }}
    supplementalGroups: [4242]
  args: ["-c", "echo ping from container > $SHOAL_DEVICES_SERIAL; read -r reply < $SHOAL_DEVICES_SERIAL; echo got $reply; echo I am $SHOAL_WORKLOAD-$SHOAL_REPLICA on $SHOAL_DEVICE_ID in $SHOAL_LABEL_ZONE, topic $TOPIC; grep -E '^(CapEff|Groups)' /proc/self/status; ls /dev /dev/pts; sleep 3600"]
  env: {{ TOPIC: "site/${{device.labels.zone}}/${{device.id}}" }}
  resources: {{ memory: 32Mi, devices: {{ serial: 1 }} }}
"#
    );
    hub.apply(&write_manifest(dir.path(), "meter.yaml", &manifest))?;
    let ping = pty.expect_line("ping from", Duration::from_secs(60));
    if ping.is_err() {
        let logs = hub.shoal(&["logs", "meter"]);
        panic!(
            "{ping:?}: {} {}",
            hub.workload("meter")?.unwrap(),
            String::from_utf8_lossy(&logs.stdout)
        );
    }
    assert_eq!(ping?, "ping from container");
    pty.send("pressure 1013\n")?;
    let log = wait_until(
        Duration::from_secs(20),
        "the reply in the container's log",
        || {
            let log = hub.shoal(&["logs", "meter"]);
            let text = String::from_utf8_lossy(&log.stdout).to_string();
            Ok(text.contains("got pressure 1013").then_some(text))
        },
    )?;
    // It learnt where it runs, and the manifest's references were filled in for its device.
    assert!(
        log.contains("I am meter-0 on c1 in north, topic site/north/c1"),
        "{log}"
    );
    // Its capabilities: the defaults (AUDIT_WRITE, KILL, NET_BIND_SERVICE) less KILL, plus
    // CHOWN: bits 29, 10 and 0. And the group it was given.
    assert!(log.contains("CapEff:\t0000000020000401"), "{log}");
    let groups = log
        .lines()
        .find(|l| l.starts_with("Groups:"))
        .unwrap_or_default();
    assert!(groups.split_whitespace().any(|g| g == "4242"), "{log}");
    // Its /dev is containerd's usual few nodes: not the device's other terminals.
    assert!(!log.contains("ttyS0") && !log.contains("ttyUSB"), "{log}");
    let w = hub.workload("meter")?.unwrap();
    assert_eq!(w["replicas"][0]["devices"], serde_json::json!([link]));
    assert!(hub.shoal(&["delete", "workload", "meter"]).status.success());
    Ok(())
}

/// A container given a host node by path, and a privileged one: refused until an admin
/// allows them in the fleet's policy, pending on a device that does not allow them, then
/// run by one that does, with what they asked for.
#[test]
fn host_nodes_and_privileged_containers_need_the_policy_and_the_device() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let Some((ctrd, registry)) = busybox_rig(dir.path())? else {
        return Ok(());
    };
    let pty = Pty::open()?;
    let hub = Hub::start(dir.path(), None)?;
    let namespace = format!("shoal-e2e-{}-priv", std::process::id());
    let agent = |allow: &[&str]| {
        let mut args = vec![
            "--no-wasm",
            "--containerd-socket",
            ctrd.socket.to_str().unwrap(),
            "--containerd-namespace",
            &namespace,
        ];
        args.extend_from_slice(allow);
        Agent::start_with(dir.path(), "c1", "", &hub.join(), &args)
    };
    let mut c1 = agent(&[])?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    let tag = registry.reference("shoal/busybox:1");
    let manifest = format!(
        r#"apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: meter }}
spec:
  container:
    image: "{tag}"
    command: [/bin/sh]
    devices: [{{ path: "{slave}", containerPath: /dev/ttyS7, permissions: rw }}]
  args: ["-c", "echo ping by path > /dev/ttyS7; read -r reply < /dev/ttyS7; echo got $reply; sleep 3600"]
  resources: {{ memory: 32Mi }}
---
apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: root }}
spec:
  container:
    image: "{tag}"
    command: [/bin/sh]
    privileged: true
  args: ["-c", "grep -E '^(CapEff|Seccomp):' /proc/self/status; [ -e /dev/loop-control ] && echo sees the device nodes; sleep 3600"]
  resources: {{ memory: 32Mi }}
"#,
        slave = pty.path
    );
    let m = write_manifest(dir.path(), "priv.yaml", &manifest);
    // The fleet's policy allows neither yet.
    let out = hub.shoal(&["apply", "-f", m.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("spec.container.privileged is refused by the fleet's policy"),
        "{err}"
    );
    let set = hub.shoal_ok(&["policy", "set", "--allow", "privileged,host-devices"]);
    assert!(String::from_utf8_lossy(&set.stdout).contains("privileged"));
    hub.apply(&m)?;
    // The device does not allow them: pending, saying so.
    wait_until(Duration::from_secs(20), "meter pending on consent", || {
        let w = hub.workload("meter")?.unwrap_or_default();
        let reason = w["pendingReason"].as_str().unwrap_or_default().to_string();
        Ok(reason
            .contains(
                "1 not allowing host-devices containers (shoal-agent run --allow host-devices)",
            )
            .then_some(()))
    })?;
    // The same device, now consenting.
    c1.proc.kill();
    let _c1 = agent(&["--allow", "host-devices,privileged"])?;
    let ping = pty.expect_line("ping by", Duration::from_secs(60));
    if ping.is_err() {
        let logs = hub.shoal(&["logs", "meter"]);
        panic!("{ping:?}: {}", String::from_utf8_lossy(&logs.stdout));
    }
    pty.send("ok\n")?;
    wait_until(Duration::from_secs(20), "the reply read by path", || {
        let log = hub.shoal(&["logs", "meter"]);
        Ok(String::from_utf8_lossy(&log.stdout)
            .contains("got ok")
            .then_some(()))
    })?;
    let log = wait_until(
        Duration::from_secs(60),
        "the privileged container's view",
        || {
            let log = hub.shoal(&["logs", "root"]);
            let text = String::from_utf8_lossy(&log.stdout).to_string();
            Ok(text.contains("sees the device nodes").then_some(text))
        },
    );
    let log = match log {
        Ok(l) => l,
        Err(e) => panic!("{e}: {}", hub.workload("root")?.unwrap_or_default()),
    };
    // Every capability (not the confined 00000000a80425fb-style set), no seccomp filter.
    let cap = log
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
        .unwrap_or_default();
    let bits = u64::from_str_radix(cap, 16).unwrap_or(0);
    assert!(bits.count_ones() >= 38, "{log}");
    assert!(log.contains("Seccomp:\t0"), "{log}");
    // The policy is not withdrawn from under them.
    let out = hub.shoal(&["policy", "set", "--allow", "none"]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot be withdrawn: workload(s) root use it"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(hub.shoal(&["delete", "workload", "meter"]).status.success());
    assert!(hub.shoal(&["delete", "workload", "root"]).status.success());
    Ok(())
}
