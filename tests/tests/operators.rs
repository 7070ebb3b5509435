//! Operators are people, and a device's certificate is not a lifetime pass.
//!
//! - Named operators (`shoal-hub operator create NAME --role R`) do what their role allows
//!   and nothing more, over HTTPS and over the embedded broker: a viewer's apply is refused
//!   with the reason, a deployer's is accepted, only an admin reads the audit log.
//! - The audit log names who applied what, from where, refusals included, and survives a
//!   SIGKILL of the hub.
//! - A revoked operator is refused from its next connection on.
//! - A device renews only for the key it enrolled with; a revoked device is refused at MQTT
//!   accept and on HTTPS, and no join token enrolls its id again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use serde_json::Value;
use shoal_e2e::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn hub_cmd(hub: &Hub, args: &[&str]) -> Output {
    Command::new(bin("shoal-hub"))
        .args(args)
        .arg("--data-dir")
        .arg(&hub.data_dir)
        .output()
        .expect("run shoal-hub")
}

/// Creates operator `name` with `role`; its bundle's directory.
fn create_operator(hub: &Hub, dir: &Path, name: &str, role: &str) -> PathBuf {
    let out = dir.join(format!("op-{name}"));
    let o = hub_cmd(
        hub,
        &[
            "operator",
            "create",
            name,
            "--role",
            role,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// `shoal ARGS` with operator bundle `creds`.
fn shoal_as(hub: &Hub, creds: &Path, args: &[&str]) -> Output {
    hub.shoal_with(
        args,
        None,
        &[("SHOAL_CREDENTIALS", creds.to_str().unwrap())],
    )
}

fn tls(creds: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        creds.join("ca.pem"),
        creds.join("operator.pem"),
        creds.join("operator.key"),
    )
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn audit(hub: &Hub) -> Result<Vec<Value>> {
    Ok(hub
        .json(&["get", "audit"])?
        .as_array()
        .cloned()
        .unwrap_or_default())
}

#[test]
fn operators_act_by_role_are_audited_and_can_be_revoked() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut hub = Hub::start(dir.path(), None)?;
    let vic = create_operator(&hub, dir.path(), "vic", "viewer");
    let alice = create_operator(&hub, dir.path(), "alice", "deployer");
    // Names are unique while an operator exists.
    let o = hub_cmd(
        &hub,
        &[
            "operator",
            "create",
            "alice",
            "--role",
            "admin",
            "--out",
            "/nonexistent/x",
        ],
    );
    assert!(
        !o.status.success() && text(&o).contains("exists"),
        "{}",
        text(&o)
    );

    let manifest = write_manifest(
        dir.path(),
        "web.yaml",
        &format!(
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: web }}\nspec:\n  replicas: 1\n  wasm: {{ module: \"{}\" }}\n",
            module_digest_or_path(&hub, dir.path())?
        ),
    );
    let m = manifest.to_str().unwrap();

    // A viewer reads, and cannot apply: over HTTPS the hub says why; over MQTT the embedded
    // broker refuses the publish.
    assert!(shoal_as(&hub, &vic, &["get", "devices"]).status.success());
    let (v, vt, vk) = tls(&vic);
    let (status, body) = https_request(
        hub.http,
        "POST",
        "/v1/apply",
        &[("content-type", "application/yaml")],
        std::fs::read(&manifest)?.as_slice(),
        (&v, &vt, &vk),
    )?;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("operator vic (viewer)") && body.contains("deployer role"),
        "{body}"
    );
    let o = shoal_as(&hub, &vic, &["apply", "-f", m, "--timeout", "5s"]);
    assert!(!o.status.success(), "a viewer applied: {}", text(&o));
    assert!(hub.workload("web")?.is_none());

    // A deployer applies (through the embedded broker, as `shoal apply` does) but does not
    // manage devices or read the audit log.
    let o = shoal_as(&hub, &alice, &["apply", "-f", m]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(hub.workload("web")?.is_some());
    let o = shoal_as(&hub, &alice, &["get", "audit"]);
    assert!(
        !o.status.success() && text(&o).contains("admin role"),
        "{}",
        text(&o)
    );
    let o = shoal_as(&hub, &alice, &["cordon", "nobody"]);
    assert!(
        !o.status.success() && text(&o).contains("admin role"),
        "{}",
        text(&o)
    );
    // Nor edits what operators note about a device.
    let o = shoal_as(
        &hub,
        &alice,
        &["annotate", "device", "nobody", "owner=alice"],
    );
    assert!(
        !o.status.success() && text(&o).contains("admin role"),
        "{}",
        text(&o)
    );

    // The audit log, read by an admin (the hub's bootstrap bundle), says who did what.
    let entries = audit(&hub)?;
    let applied = entries
        .iter()
        .find(|e| e["who"] == "operator alice" && e["accepted"] == true)
        .unwrap_or_else(|| panic!("no apply by alice in {entries:#?}"));
    assert!(
        applied["action"].as_str().unwrap().contains("apply"),
        "{applied}"
    );
    assert!(
        applied["outcome"]
            .as_str()
            .unwrap()
            .contains("workload/web created"),
        "{applied}"
    );
    let refused = entries
        .iter()
        .find(|e| e["who"] == "operator vic (viewer)")
        .unwrap_or_else(|| panic!("no refusal of vic in {entries:#?}"));
    assert_eq!(refused["accepted"], false, "{refused}");
    assert!(
        refused["from"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{refused}"
    );
    assert_eq!(refused["action"], "POST /v1/apply", "{refused}");

    // The log is durable: a SIGKILLed hub still has it.
    let seq = applied["seq"].clone();
    hub.proc.kill();
    hub = Hub::start_on(dir.path(), None, hub.mqtt, hub.http)?;
    let entries = audit(&hub)?;
    assert!(
        entries
            .iter()
            .any(|e| e["seq"] == seq && e["who"] == "operator alice"),
        "lost at restart: {entries:#?}"
    );

    // Revoked: refused from the next connection on, over HTTPS and MQTT.
    let o = hub_cmd(&hub, &["operator", "revoke", "alice"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = shoal_as(&hub, &alice, &["get", "workloads"]);
    assert!(
        !o.status.success() && text(&o).contains("revoked"),
        "{}",
        text(&o)
    );
    let o = shoal_as(&hub, &alice, &["delete", "workload", "web"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(hub.workload("web")?.is_some());
    let o = hub_cmd(&hub, &["operator", "list"]);
    let list = text(&o);
    let row = list
        .lines()
        .find(|l| l.starts_with("alice"))
        .unwrap_or_default();
    assert!(
        row.contains("deployer") && !row.trim_end().ends_with('-'),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with("vic") && l.trim_end().ends_with('-')),
        "{list}"
    );

    // The hub's own bundle is pinned too: revoked, its copies stop working, and a restart
    // rotates it.
    let copy = dir.path().join("bootstrap-copy");
    std::fs::create_dir_all(&copy)?;
    for f in ["ca.pem", "operator.pem", "operator.key"] {
        std::fs::copy(hub.bundle().unwrap().join(f), copy.join(f))?;
    }
    assert!(shoal_as(&hub, &copy, &["get", "devices"]).status.success());
    let o = hub_cmd(&hub, &["operator", "revoke", "shoal-operator"]);
    assert!(
        o.status.success() && text(&o).contains("rotate"),
        "{}",
        text(&o)
    );
    let o = shoal_as(&hub, &copy, &["get", "devices"]);
    assert!(
        !o.status.success() && text(&o).contains("revoked"),
        "{}",
        text(&o)
    );
    hub.proc.kill();
    hub = Hub::start_on(dir.path(), None, hub.mqtt, hub.http)?;
    assert!(
        hub.shoal(&["get", "devices"]).status.success(),
        "the rotated bundle works"
    );
    let o = shoal_as(&hub, &copy, &["get", "devices"]);
    assert!(
        !o.status.success(),
        "the old bundle still works: {}",
        text(&o)
    );
    Ok(())
}

/// A module the hub holds: `probe.wasm` pushed as a blob, by digest.
fn module_digest_or_path(hub: &Hub, dir: &Path) -> Result<String> {
    let path = dir.join("probe.wasm");
    std::fs::copy(module("probe.wasm"), &path)?;
    let o = hub.shoal_ok(&["push", path.to_str().unwrap()]);
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

#[test]
fn a_device_renews_only_its_own_key_and_a_revoked_one_is_out_for_good() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let mut agent = Agent::start(dir.path(), "edge-a", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    let pki = agent.data_dir.join("pki");
    let device = (
        pki.join("ca.pem"),
        pki.join("device.pem"),
        pki.join("device.key"),
    );
    let as_device = || (device.0.as_path(), device.1.as_path(), device.2.as_path());
    let renew = |csr: &str| {
        let body = serde_json::json!({ "csr": csr }).to_string();
        https_request(
            hub.http,
            "POST",
            "/v1/renew",
            &[("content-type", "application/json")],
            body.as_bytes(),
            as_device(),
        )
    };

    // Renewal for another key is refused; for its own it works.
    let (_, other_csr) = shoal_pki::device::key_and_csr("edge-a")?;
    let (status, body) = renew(&other_csr)?;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("did not enroll with"), "{body}");
    let own_csr = shoal_pki::device::csr_for_key("edge-a", &std::fs::read_to_string(&device.2)?)?;
    let (status, body) = renew(&own_csr)?;
    assert_eq!(status, 200, "{body}");

    // A workload on every device runs there until the revocation.
    std::fs::copy(module("probe.wasm"), dir.path().join("probe.wasm"))?;
    let m = write_manifest(
        dir.path(),
        "every.yaml",
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: every }\nspec:\n  placement: every\n  wasm: { module: ./probe.wasm }\n  args: [heartbeat, \"1000\"]\n",
    );
    hub.apply(&m)?;
    hub.wait_running("every", 1, Duration::from_secs(30))?;

    // Revoked: the open MQTT session ends, the device keeps no replica (`every` included),
    // and the hub refuses its certificate on HTTPS and at MQTT accept.
    let o = hub_cmd(&hub, &["device", "revoke", "edge-a"]);
    assert!(o.status.success(), "{}", text(&o));
    wait_until(
        Duration::from_secs(20),
        "the session of the revoked device ends",
        || {
            Ok(hub
                .proc
                .log_text()
                .contains("mqtt client disconnected: its certificate was revoked")
                .then_some(()))
        },
    )?;
    wait_until(
        Duration::from_secs(20),
        "the device shows revoked, with nothing placed",
        || {
            let d = hub.devices()?.into_iter().find(|d| d["id"] == "edge-a");
            let w = hub.workload("every")?.unwrap_or_default();
            let placed = w["replicas"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["device"] == "edge-a"));
            Ok((d.is_some_and(|d| d["revoked"] == true) && !placed).then_some(()))
        },
    )?;
    let table = text(&hub.shoal_ok(&["get", "devices"]));
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("edge-a") && l.contains("Revoked")),
        "{table}"
    );
    agent.proc.kill();
    let (status, body) = renew(&own_csr)?;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("revoked"), "{body}");
    let o = publish_as_device(
        hub.mqtt,
        &agent,
        &[
            "-t".as_ref(),
            "shoal/v1/devices/edge-a/presence".as_ref(),
            "-m".as_ref(),
            "online".as_ref(),
        ],
    )?;
    assert!(
        !o.status.success(),
        "a revoked device published: {}",
        text(&o)
    );
    assert!(
        hub.proc.log_text().contains("revoked"),
        "the hub did not say why"
    );

    // No token enrolls the id again, unbound or bound.
    let bundle = hub.bundle().unwrap();
    let op = (
        bundle.join("ca.pem"),
        bundle.join("operator.pem"),
        bundle.join("operator.key"),
    );
    for bound in [false, true] {
        let mut cmd = Command::new(bin("shoal-hub"));
        cmd.args(["token", "create", "--data-dir"])
            .arg(&hub.data_dir);
        if bound {
            cmd.args(["--device", "edge-a"]);
        }
        let token = String::from_utf8(cmd.output()?.stdout)?.trim().to_string();
        let (_, csr) = shoal_pki::device::key_and_csr("edge-a")?;
        let body =
            serde_json::json!({ "token": token, "device": "edge-a", "csr": csr }).to_string();
        let (status, reply) = https_request(
            hub.http,
            "POST",
            "/v1/enroll",
            &[("content-type", "application/json")],
            body.as_bytes(),
            (&op.0, &op.1, &op.2),
        )?;
        assert_eq!(status, 403, "bound={bound}: {reply}");
        assert!(reply.contains("revoked"), "bound={bound}: {reply}");
    }
    Ok(())
}
