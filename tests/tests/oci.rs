//! WASM modules from an OCI registry (Debian's docker-registry on loopback): `shoal push`
//! publishes one, `shoal apply` pins its tag, the agent pulls and runs it; a tampered layer
//! is refused and nothing runs. A registry behind a password: the CLI and agents that have
//! its credentials get through, an agent without them says why it cannot pull.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_e2e::*;
use std::time::Duration;

fn manifest(name: &str, module: &str) -> String {
    format!(
        r#"apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: {name} }}
spec:
  replicas: 1
  wasm: {{ module: "{module}" }}
  args: [from-oci]
  env: {{ INTERVAL_MS: "100" }}
  resources: {{ memory: 32Mi }}
"#
    )
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn modules_pulled_from_a_registry_run_and_tampered_ones_do_not() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let registry = Registry::start(dir.path())?;
    let hub = Hub::start(dir.path(), None)?;
    let agent = Agent::start(dir.path(), "o1", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;

    // Publish: the CNCF layout, printed back pinned.
    let hello = module("hello.wasm");
    let tag = registry.reference("shoal/hello:v1");
    let out = hub.shoal_ok(&["push", hello.to_str().unwrap(), &tag]);
    let pinned = stdout(&out);
    assert!(pinned.starts_with(&format!("{tag}@sha256:")), "{pinned}");
    let manifest_digest = pinned.rsplit_once('@').unwrap().1.to_string();
    let raw = http_get(
        registry.port,
        &format!("/v2/shoal/hello/manifests/{manifest_digest}"),
    )?;
    // docker-registry answers an HTTP/1.0 GET without Accept with the manifest or a 404
    // naming the OCI type; either way the stored manifest is an OCI one with our config.
    let config_seen =
        raw.contains("application/vnd.wasm.config.v0+json") || raw.contains("OCI manifest found");
    assert!(config_seen, "{raw}");

    // Apply by tag: the CLI pins it, the device pulls it and runs it.
    let m = write_manifest(dir.path(), "hello.yaml", &manifest("greeter", &tag));
    hub.apply(&m)?;
    hub.wait_running("greeter", 1, Duration::from_secs(60))?;
    let described = hub.json(&["describe", "workload", "greeter"])?;
    let stored = described["spec"]["module"]["oci"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(
        stored, pinned,
        "the hub stores the pinned reference: {described}"
    );
    wait_until(
        Duration::from_secs(20),
        "output of the pulled module",
        || {
            Ok(agent
                .workload_log("greeter-0")
                .contains("args=[\"from-oci\"]")
                .then_some(()))
        },
    )?;
    let cached = agent.data_dir.join("cache/modules").join(format!(
        "oci-{}.wasm",
        manifest_digest.trim_start_matches("sha256:")
    ));
    assert_eq!(
        std::fs::read(&cached)?,
        std::fs::read(&hello)?,
        "cached as pulled"
    );

    // Tamper with another artifact's layer in the registry's storage: the agent refuses it.
    let ticker = module("ticker.wasm");
    let out = hub.shoal_ok(&[
        "push",
        ticker.to_str().unwrap(),
        &registry.reference("shoal/ticker:v1"),
    ]);
    let ticker_pinned = stdout(&out);
    let layer = shoal_api::model::ids::Digest::of(&std::fs::read(&ticker)?);
    let blob = registry.blob_path(layer.as_str());
    let mut bytes = std::fs::read(&blob)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, &bytes)?;
    let m = write_manifest(
        dir.path(),
        "bad.yaml",
        &manifest("tampered", &ticker_pinned),
    );
    hub.apply(&m)?;
    let refused = wait_until(
        Duration::from_secs(30),
        "the agent refusing the layer",
        || {
            Ok(agent
                .proc
                .log_text()
                .contains("failed verification")
                .then_some(()))
        },
    );
    if let Err(e) = refused {
        let log = agent.proc.log_text();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        anyhow::bail!("{e}; agent log ends:\n{}", tail.join("\n"));
    }
    let w = hub.workload("tampered")?.unwrap();
    assert_ne!(w["replicas"][0]["phase"], "Running", "{w}");
    assert!(
        agent.workload_log("tampered-0").is_empty(),
        "nothing ran: {}",
        agent.workload_log("tampered-0")
    );
    let digest = ticker_pinned.rsplit_once("@sha256:").unwrap().1;
    assert!(!agent
        .data_dir
        .join(format!("cache/modules/oci-{digest}.wasm"))
        .exists());
    Ok(())
}

#[test]
fn a_registry_behind_a_password_takes_the_configured_credentials() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let registry = Registry::start_with_auth(dir.path(), "fleet", "s3cret-pass")?;
    let hub = Hub::start(dir.path(), None)?;
    let host = format!("127.0.0.1:{}", registry.port);
    // One agent with the registry's credentials in its config file, one without.
    let config = dir.path().join("agent-creds.toml");
    std::fs::write(
        &config,
        format!("[registries.\"{host}\"]\nusername = \"fleet\"\npassword = \"s3cret-pass\"\n"),
    )?;
    let with = Agent::start_with(
        dir.path(),
        "with",
        "",
        &hub.join(),
        &["--config", config.to_str().unwrap()],
    )?;
    let _without = Agent::start(dir.path(), "without", "", &hub.join())?;
    hub.wait_devices_online(2, Duration::from_secs(20))?;

    // `shoal push` without credentials is refused, with them it publishes.
    let hello = module("hello.wasm");
    let tag = registry.reference("shoal/private:v1");
    let out = hub.shoal(&["push", hello.to_str().unwrap(), &tag]);
    assert!(!out.status.success(), "pushed without credentials");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains(&host), "the error names the registry: {err}");
    let creds = [
        ("SHOAL_REGISTRY_USERNAME", "fleet"),
        ("SHOAL_REGISTRY_PASSWORD", "s3cret-pass"),
    ];
    let out = hub.shoal_with(&["push", hello.to_str().unwrap(), &tag], None, &creds);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Applied by tag (the CLI pins it with the same credentials) to every device: the agent
    // with credentials runs it; the other keeps retrying its pull, saying why.
    let text = manifest("private", &tag).replace("replicas: 1", "placement: every");
    let m = write_manifest(dir.path(), "private.yaml", &text);
    let out = hub.shoal_with(&["apply", "-f", m.to_str().unwrap()], None, &creds);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = wait_until(Duration::from_secs(60), "private on both devices", || {
        let w = hub.workload("private")?.unwrap();
        let replicas = w["replicas"].as_array().unwrap().clone();
        let on = |d: &str| replicas.iter().find(|r| r["device"] == d).cloned();
        Ok(match (on("with"), on("without")) {
            (Some(a), Some(b)) if a["phase"] == "Running" && b["reason"].is_string() => {
                Some((a, b))
            }
            _ => None,
        })
    })?;
    assert_eq!(w.1["phase"], "Pulling", "{:?}", w.1);
    let reason = w.1["reason"].as_str().unwrap();
    assert!(reason.contains(&host), "{reason}");
    wait_until(
        Duration::from_secs(20),
        "output of the private module",
        || {
            Ok(with
                .workload_log(&format!("private-{}", w.0["replica"]))
                .contains("from-oci")
                .then_some(()))
        },
    )?;
    Ok(())
}
