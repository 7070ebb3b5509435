//! etcd as an attacker sees it. Hub replicas keep the fleet's state in etcd, and the fleet's
//! root keys pass through it; whoever reads etcd (or its backups, or the path to it) must
//! not get the power to sign desired states. Against Debian's etcd serving TLS and
//! accepting only client certificates (tests/src's `Etcd`): a hub refuses a plaintext
//! `etcd://` store; a client without a certificate reads nothing; every key under the
//! prefix, read with a valid certificate, holds no private key; a replica without the
//! key-encryption key cannot start; raw keys an older hub uploaded are wrapped in place.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use shoal_e2e::*;
use shoal_hub::etcd::{EtcdStore, EtcdUrl};
use std::process::Command;
use std::time::Duration;

fn store(url: &str) -> Result<EtcdStore> {
    let url: EtcdUrl = url.parse().map_err(anyhow::Error::msg)?;
    Ok(EtcdStore::connect(&url)?)
}

/// `shoal-hub serve` on `store` in `dir`, expected to stop at once: its stderr.
fn refused_serve(dir: &std::path::Path, store: &str, extra: &[&str]) -> Result<String> {
    let out = Command::new(bin("shoal-hub"))
        .args(["serve", "--no-mdns", "--data-dir"])
        .arg(dir)
        .args(["--http-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--mqtt-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--store", store])
        .args(extra)
        .output()?;
    assert!(!out.status.success(), "{out:?}");
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Every private key file of a hub's `pki/`, as the hub holds it.
fn private_keys(hub_data: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    ["ca.key", "signing.key", "secrets.key"]
        .iter()
        .map(|n| {
            let b = std::fs::read(hub_data.join("pki").join(n)).unwrap();
            (n.to_string(), b)
        })
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let needle = needle.trim_ascii();
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn etcd_speaks_tls_only_and_never_holds_a_private_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start(dir.path())?;

    // Plaintext is refused by the hub and by token create, before anything connects.
    let plain = format!("etcd://127.0.0.1:{}", etcd.port);
    let err = refused_serve(&dir.path().join("plain"), &plain, &[])?;
    assert!(
        err.contains("plaintext") && err.contains("etcds://"),
        "{err}"
    );
    let out = Command::new(bin("shoal-hub"))
        .args(["token", "create", "--store", &plain])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("plaintext"));
    // etcd itself lets no one in without a client certificate of its CA.
    let anonymous = format!(
        "etcds://127.0.0.1:{}/shoal?ca={}",
        etcd.port,
        etcd.pki.join("ca.pem").display()
    );
    assert!(store(&anonymous).and_then(|s| Ok(s.entries("/")?)).is_err());

    // Two replicas on it, sharing the key-encryption key; a workload with a secret, so
    // that everything a fleet writes is there.
    for r in ["r1", "r2"] {
        std::fs::create_dir_all(dir.path().join(r))?;
    }
    let hub = Hub::start_with(
        &dir.path().join("r1"),
        None,
        free_port(),
        free_port(),
        &["--store", &etcd.url()],
    )?;
    let second = Hub::start_with(
        &dir.path().join("r2"),
        None,
        free_port(),
        free_port(),
        &["--store", &etcd.url()],
    )?;
    let keys = private_keys(&hub.data_dir);
    assert_eq!(
        keys,
        private_keys(&second.data_dir),
        "replicas share the keys"
    );
    let _a = Agent::start(dir.path(), "edge-a", "role=db", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    let value = format!("hunter2-{:016x}", rand::random::<u64>());
    let m = write_manifest(
        dir.path(),
        "app.yaml",
        &format!(
            "apiVersion: shoal.dev/v1\nkind: Secret\nmetadata: {{ name: db }}\nstringData: {{ password: {value} }}\n---\napiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: app }}\nspec:\n  selector: {{ role: db }}\n  wasm: {{ module: \"{}\" }}\n  args: [heartbeat, \"500\"]\n  secrets: [{{ name: db }}]\n",
            module("probe.wasm").display()
        ),
    );
    hub.apply(&m)?;
    hub.wait_running("app", 1, Duration::from_secs(30))?;

    // Read everything under the prefix with a valid certificate: no private key.
    let all = store(&etcd.url())?.entries("/shoal")?;
    assert!(
        all.iter().any(|(k, _)| k.ends_with("/pki/ca.key")),
        "{:?}",
        all.iter().map(|e| &e.0).collect::<Vec<_>>()
    );
    assert!(all.len() > 8, "the fleet wrote its state: {}", all.len());
    for (k, v) in &all {
        assert!(!contains(v, b"PRIVATE KEY"), "{k} holds a PEM private key");
        assert!(
            !contains(v, value.as_bytes()),
            "{k} holds the secret's value"
        );
        for (name, raw) in &keys {
            assert!(!contains(v, raw), "{k} holds {name} in the clear");
        }
    }

    // A replica without the key-encryption key cannot take the keys, and says what to do.
    let err = refused_serve(
        &dir.path().join("r3/hub"),
        &etcd.url_without_kek("/shoal"),
        &[],
    )?;
    assert!(
        err.contains("key-encryption key") && err.contains("etcd.kek"),
        "{err}"
    );
    // Nor with another one.
    let wrong = dir.path().join("wrong.kek");
    std::fs::write(&wrong, format!("{:064x}", 7))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600))?;
    }
    let err = refused_serve(
        &dir.path().join("r4/hub"),
        &format!("{}&kek={}", etcd.url_without_kek("/shoal"), wrong.display()),
        &[],
    )?;
    assert!(
        err.contains("does not open") && err.contains("wrong.kek"),
        "{err}"
    );
    Ok(())
}

#[test]
fn raw_keys_an_older_hub_uploaded_are_taken_and_wrapped() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start(dir.path())?;
    // What an older hub left: its pki files, raw, under /old/pki/.
    let old = dir.path().join("old-pki");
    let ca = shoal_pki::ca::FleetCa::load_or_create(&old)?;
    shoal_pki::sign::HubSigner::load_or_create(&old.join("signing.key"))?;
    shoal_pki::secret::SecretsKey::load_or_create(&old.join("secrets.key"))?;
    let s = store(&etcd.url_at("/old"))?;
    for n in ["ca.pem", "ca.key", "signing.key", "secrets.key"] {
        s.put_raw(&format!("/old/pki/{n}"), &std::fs::read(old.join(n))?)?;
    }
    let hub = Hub::start_with(
        dir.path(),
        None,
        free_port(),
        free_port(),
        &["--store", &etcd.url_at("/old")],
    )?;
    // The hub runs with the old fleet's CA (its devices keep working)…
    assert_eq!(
        std::fs::read_to_string(hub.data_dir.join("pki/ca.pem"))?,
        ca.pem()
    );
    assert_eq!(
        std::fs::read(hub.data_dir.join("pki/signing.key"))?,
        std::fs::read(old.join("signing.key"))?
    );
    // …and etcd holds them wrapped now.
    let all = s.entries("/old/pki/")?;
    assert_eq!(all.len(), 4);
    for (k, v) in &all {
        if k.ends_with(".key") {
            assert!(shoal_pki::wrap::is_wrapped(v), "{k} is still raw");
        }
        assert!(!contains(v, b"PRIVATE KEY"), "{k}");
    }
    let log = hub.proc.log_text();
    assert!(
        log.contains("wrapped them with this key-encryption key"),
        "{log}"
    );
    Ok(())
}
