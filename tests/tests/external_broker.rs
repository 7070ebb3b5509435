//! The hub on Debian's mosquitto (`--broker`), driven by plain mosquitto clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_e2e::*;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Starts `mosquitto_sub` waiting for one message on `topic`, returning the child.
fn subscribe_one(broker: &BrokerAccess, topic: &str, v5: bool) -> std::process::Child {
    let mut c = Command::new("mosquitto_sub");
    c.args(broker.mosquitto_args())
        .args(["-t", topic, "-C", "1", "-W", "15"]);
    if v5 {
        c.args(["-V", "mqttv5"]);
    }
    c.stdout(Stdio::piped()).spawn().expect("mosquitto_sub")
}

fn publish(broker: &BrokerAccess, args: &[&str]) {
    let st = Command::new("mosquitto_pub")
        .args(broker.mosquitto_args())
        .args(["-q", "1"])
        .args(args)
        .status()
        .expect("mosquitto_pub");
    assert!(st.success());
}

fn wait_verdict(sub: std::process::Child) -> serde_json::Value {
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success(), "no verdict received");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn mosquitto_pub_apply_works_like_shoal_apply() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mq = Mosquitto::start(dir.path())?;
    let hub = Hub::start(dir.path(), Some(&mq.url()))?;
    let _a1 = Agent::start(dir.path(), "edge-1", "zone=a", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;

    // Upload the module, then refer to it by digest in a manifest sent by mosquitto_pub.
    let out = hub.shoal_ok(&["push", module("probe.wasm").to_str().unwrap()]);
    let digest = String::from_utf8(out.stdout)?.trim().to_string();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    let manifest = write_manifest(
        dir.path(),
        "fleet.yaml",
        &format!(
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: beat }}\nspec:\n  selector: {{ zone: a }}\n  wasm: {{ module: \"{digest}\" }}\n  args: [heartbeat, \"100\"]\n"
        ),
    );
    let sub = subscribe_one(&mq.access(), "shoal/v1/results/r1", false);
    std::thread::sleep(Duration::from_millis(300));
    publish(
        &mq.access(),
        &["-t", "shoal/v1/apply/r1", "-f", manifest.to_str().unwrap()],
    );
    let verdict = wait_verdict(sub);
    assert_eq!(verdict["accepted"], true, "{verdict}");
    assert_eq!(verdict["requestId"], "r1");
    assert_eq!(verdict["workloads"]["beat"], "created");
    let w = hub.wait_running("beat", 1, Duration::from_secs(60))?;
    assert_eq!(w["replicas"][0]["device"], "edge-1");

    // A bad manifest: every reason comes back, nothing changes.
    let bad = write_manifest(
        dir.path(),
        "bad.yaml",
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: Bad }\nspec:\n  replicas: -1\n",
    );
    let sub = subscribe_one(&mq.access(), "shoal/v1/results/r2", false);
    std::thread::sleep(Duration::from_millis(300));
    publish(
        &mq.access(),
        &["-t", "shoal/v1/apply/r2", "-f", bad.to_str().unwrap()],
    );
    let verdict = wait_verdict(sub);
    assert_eq!(verdict["accepted"], false, "{verdict}");
    let errors = verdict["errors"].as_array().unwrap();
    assert!(!errors.is_empty());
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .contains("spec.replicas"),
        "{verdict}"
    );
    assert_eq!(hub.workloads()?.len(), 1);

    // MQTT 5: the verdict also goes to the publish's response topic, with its correlation data.
    let reply = subscribe_one(&mq.access(), "ops/replies/42", true);
    std::thread::sleep(Duration::from_millis(300));
    publish(
        &mq.access(),
        &[
            "-V",
            "mqttv5",
            "-t",
            "shoal/v1/apply",
            "-f",
            manifest.to_str().unwrap(),
            "-D",
            "publish",
            "response-topic",
            "ops/replies/42",
            "-D",
            "publish",
            "correlation-data",
            "c-42",
        ],
    );
    let verdict = wait_verdict(reply);
    assert_eq!(verdict["accepted"], true, "{verdict}");
    assert_eq!(verdict["workloads"]["beat"], "unchanged");
    Ok(())
}

#[test]
fn embedded_broker_speaks_mqtt_3_and_5() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    for v5 in [false, true] {
        let topic = format!("shoal/v1/results/probe-{v5}");
        let sub = subscribe_one(&hub.access(), &topic, v5);
        std::thread::sleep(Duration::from_millis(300));
        let mut args = vec!["-t", "shoal/v1/apply/x", "-m", "not: [valid"];
        let t = topic.replace("results", "apply");
        args[1] = &t;
        if v5 {
            args.extend(["-V", "mqttv5"]);
        }
        publish(&hub.access(), &args);
        let verdict = wait_verdict(sub);
        assert_eq!(verdict["accepted"], false);
        assert!(
            verdict["errors"][0]["message"]
                .as_str()
                .unwrap()
                .starts_with("invalid YAML"),
            "{verdict}"
        );
    }
    Ok(())
}
