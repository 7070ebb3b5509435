//! What a device may download from the hub, tried with a device's own certificate as an
//! attacker holding one would: precompiled artifacts only for known targets (made-up
//! triples are refused before anything compiles, so no device makes the hub compile without
//! bound), only its own architecture's, and only of modules its desired state names; blobs
//! likewise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use shoal_e2e::*;
use std::path::Path;
use std::time::Duration;

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_device_makes_the_hub_compile_only_its_own_targets_of_its_own_modules() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let a = Agent::start(dir.path(), "edge-a", "role=a", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    std::fs::copy(module("probe.wasm"), dir.path().join("probe.wasm"))?;
    std::fs::copy(module("ticker.wasm"), dir.path().join("ticker.wasm"))?;
    let m = write_manifest(
        dir.path(),
        "w.yaml",
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: mine }\nspec:\n  selector: { role: a }\n  wasm: { module: ./probe.wasm }\n  args: [heartbeat, \"500\"]\n---\napiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: theirs }\nspec:\n  selector: { role: b }\n  wasm: { module: ./ticker.wasm }\n",
    );
    hub.apply(&m)?;
    hub.wait_running("mine", 1, Duration::from_secs(30))?;
    let digest = |file: &str| -> Result<String> {
        Ok(shoal_api::model::ids::Digest::of(&std::fs::read(module(file))?).to_string())
    };
    let (mine, theirs) = (digest("probe.wasm")?, digest("ticker.wasm")?);

    let pki = a.data_dir.join("pki");
    let tls = (
        pki.join("ca.pem"),
        pki.join("device.pem"),
        pki.join("device.key"),
    );
    let get = |path: &str| https_get(hub.http, path, (&tls.0, &tls.1, &tls.2));
    let precompiled = |d: &str, target: &str| {
        get(&format!(
            "/v1/blobs/{d}/precompiled?engine={}&target={target}",
            shoal_engine::ENGINE_ID.replace('+', "%2B")
        ))
    };
    let cache = hub.data_dir.join("blobs/precompiled");
    let before = files(&cache);

    // Eight made-up triples: each refused, naming it, and nothing compiled or kept.
    for t in [
        "x86_64-evil-linux-gnu",
        "x86_64-unknown-linux-gnu1",
        "aarch64-unknown-none",
        "i686-pc-windows-msvc",
        "riscv64gc-unknown-linux-gnux",
        "pulley16",
        "s390x-ibm-zos",
        "wasm32-unknown-unknown",
    ] {
        let (status, body) = precompiled(&mine, t)?;
        assert_eq!(status, 400, "{t}: {body}");
        assert!(body.contains(t), "{t}: {body}");
    }
    // A known target of another architecture, and a module of another device's workload.
    let other = if std::env::consts::ARCH == "aarch64" {
        "x86_64-unknown-linux-gnu"
    } else {
        "aarch64-unknown-linux-gnu"
    };
    let (status, body) = precompiled(&mine, other)?;
    assert_eq!(status, 403, "{body}");
    let own = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let (status, body) = precompiled(&theirs, &own)?;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("desired state"), "{body}");
    let (status, body) = get(&format!("/v1/blobs/{theirs}"))?;
    assert_eq!(status, 403, "{body}");
    assert_eq!(files(&cache), before, "something was compiled");
    let log = hub.proc.log_text();
    assert!(
        !log.contains("precompiled module"),
        "the hub compiled:\n{log}"
    );

    // What the device is owed it gets: its module, and its own target's artifact.
    let (status, _) = get(&format!("/v1/blobs/{mine}"))?;
    assert_eq!(status, 200);
    let (status, body) = precompiled(&mine, &own)?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(files(&cache).len(), before.len() + 1);
    Ok(())
}
