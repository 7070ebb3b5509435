//! Hardening, each tried from the weaker side: a page in a browser holding the operator's
//! certificate cannot change the fleet (cross-site request forgery); another local user
//! cannot read the hub's or an agent's data directory; a used join token's id alone tells
//! nothing (without its secret it reads as any wrong token).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use shoal_e2e::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

#[test]
fn a_page_in_the_operators_browser_cannot_change_the_fleet() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let _a = Agent::start(dir.path(), "edge-a", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    let b = hub.bundle().unwrap();
    let tls = (
        b.join("ca.pem"),
        b.join("operator.pem"),
        b.join("operator.key"),
    );
    let call = |method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]| {
        https_request(
            hub.http,
            method,
            path,
            headers,
            body,
            (&tls.0, &tls.1, &tls.2),
        )
    };
    let cordon = "/v1/devices/edge-a/cordon";
    // What a cross-site form or fetch may send without the hub's consent: refused, each
    // saying why.
    for (headers, body) in [
        (vec![("Content-Type", "text/plain")], &b"x"[..]),
        (
            vec![("Content-Type", "application/x-www-form-urlencoded")],
            &b"a=b"[..],
        ),
        (
            vec![("Content-Type", "multipart/form-data; boundary=x")],
            &b"--x--"[..],
        ),
        (vec![], &b""[..]),
        (
            vec![
                ("Content-Type", "application/json"),
                ("Origin", "https://evil.example"),
            ],
            &b"{}"[..],
        ),
    ] {
        let (status, answer) = call("POST", cordon, &headers, body)?;
        assert_eq!(status, 403, "{headers:?}: {answer}");
    }
    let (status, answer) = call(
        "DELETE",
        "/v1/workloads/anything",
        &[("Origin", "https://evil.example"), ("x-shoal-client", "x")],
        b"",
    )?;
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("evil.example"), "{answer}");
    let d = hub.devices()?;
    assert_eq!(
        d[0]["cordoned"], false,
        "a forged request cordoned the device"
    );
    // The CLI (and any program that says so) still works.
    hub.shoal_ok(&["cordon", "edge-a"]);
    assert_eq!(hub.devices()?[0]["cordoned"], true);
    let (status, answer) = call(
        "POST",
        "/v1/devices/edge-a/uncordon",
        &[("x-shoal-client", "curl")],
        b"",
    )?;
    assert_eq!(status, 200, "{answer}");
    Ok(())
}

#[test]
fn data_directories_are_the_owners_alone_and_a_used_token_says_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let join = hub.join();
    let token = join.token()?.unwrap();
    let mut agent = Command::new(bin("shoal-agent"));
    agent
        .args([
            "run",
            "--no-mdns",
            "--no-containerd",
            "--device-id",
            "edge-b",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("edge-b"))
        .args(["--broker", &join.broker, "--hub", &join.hub, "--socket"])
        .arg(dir.path().join("edge-b.sock"))
        .env("SHOAL_AGENT_JOIN_TOKEN", &token);
    let mut b = Proc::spawn("edge-b", &mut agent, dir.path().join("edge-b.log"))?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;

    for d in [hub.data_dir.clone(), dir.path().join("edge-b")] {
        let mode = std::fs::metadata(&d)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", d.display());
        // Another local user cannot even list it.
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "ls"])
            .arg(&d)
            .output()?;
        assert!(!out.status.success(), "nobody listed {}", d.display());
    }
    b.kill();

    // The used token's id with a wrong secret: "wrong secret", as for any other token.
    let (prefix, _secret) = token.rsplit_once('.').unwrap();
    let forged = format!("{prefix}.{}", "0".repeat(32));
    let out = Command::new(bin("shoal-agent"))
        .args([
            "run",
            "--no-mdns",
            "--no-containerd",
            "--device-id",
            "edge-c",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("edge-c"))
        .args(["--broker", &join.broker, "--hub", &join.hub, "--socket"])
        .arg(dir.path().join("edge-c.sock"))
        .env("SHOAL_AGENT_JOIN_TOKEN", &forged)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success());
    assert!(
        err.contains("wrong secret") && !err.contains("already used"),
        "{err}"
    );
    Ok(())
}

/// The hub's resident memory, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[test]
fn a_device_cannot_fill_the_hubs_memory_with_retained_messages() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let mut a = Agent::start(dir.path(), "edge-a", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    // Whoever holds the device's key publishes, as the device, on its own logs topics (the
    // ACL allows those), 25 retained messages of 4 MB each.
    a.proc.kill();
    let payload = dir.path().join("4mb");
    std::fs::write(
        &payload,
        (0..4_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    )?;
    let before = rss_bytes(hub.proc.pid());
    for i in 0..25 {
        let topic = format!("shoal/v1/devices/edge-a/logs/r{i}");
        let args = ["-q", "1", "-r", "-t", &topic, "-f"].map(std::ffi::OsStr::new);
        let out = publish_as_device(hub.mqtt, &a, &[&args[..], &[payload.as_os_str()]].concat())?;
        // Refused as soon as its length is known (a device's packets are at most 1 MiB):
        // the broker never buffers the rest.
        assert!(!out.status.success(), "{out:?}");
    }
    // A small one, retained: passed on, but not kept.
    let small = [
        "-q",
        "1",
        "-r",
        "-t",
        "shoal/v1/devices/edge-a/logs/small",
        "-m",
        "{}",
    ];
    let out = publish_as_device(hub.mqtt, &a, &small.map(std::ffi::OsStr::new))?;
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_bytes(hub.proc.pid());
    let grew = after.saturating_sub(before);
    assert!(
        grew < 10 << 20,
        "hub RSS grew by {} MiB ({before} → {after})",
        grew >> 20
    );
    let kept = Command::new("mosquitto_sub")
        .args(hub.access().mosquitto_args())
        .args([
            "-t",
            "shoal/v1/devices/edge-a/logs/#",
            "--retained-only",
            "-W",
            "2",
        ])
        .output()?;
    assert!(
        kept.stdout.is_empty(),
        "{} bytes retained",
        kept.stdout.len()
    );
    // What is retained by design still is: the device's presence (its last will).
    assert!(retained(&hub.access(), "shoal/v1/devices/edge-a/presence")?.is_some());
    Ok(())
}

/// Holds `n` HTTPS connections to the hub without a client certificate, each sending
/// `POST /v1/enroll` with a body it trickles a byte at a time, reconnecting whenever the hub
/// closes one, until `stop`. Returns how many connections it opened in all.
fn slow_bodies(
    port: u16,
    ca: &str,
    n: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<u64>> {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    let config = shoal_pki::tls::client_config(ca, None).unwrap();
    (0..n)
        .map(|_| {
            let (config, stop) = (config.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut opened = 0;
                while !stop.load(Ordering::Relaxed) {
                    let attempt = || -> anyhow::Result<()> {
                        let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
                        let conn = rustls::ClientConnection::new(config.clone(), name)?;
                        let sock = std::net::TcpStream::connect(("127.0.0.1", port))?;
                        sock.set_write_timeout(Some(Duration::from_secs(2)))?;
                        let mut tls = rustls::StreamOwned::new(conn, sock);
                        tls.write_all(
                            b"POST /v1/enroll HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{",
                        )?;
                        while !stop.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(300));
                            tls.write_all(b" ")?;
                        }
                        Ok(())
                    };
                    opened += 1;
                    if attempt().is_err() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                opened
            })
        })
        .collect()
}

#[test]
fn slow_clients_without_certificates_do_not_take_the_hub_away() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A hub allowed 256 descriptors, as a small board's might be.
    let mut limited = Command::new("prlimit");
    limited
        .args(["--nofile=256:256", "--"])
        .arg(bin("shoal-hub"));
    let hub = Hub::start_program(dir.path(), None, (free_port(), free_port()), &[], limited)?;
    let _a = Agent::start(dir.path(), "edge-a", "", &hub.join())?;
    let _b = Agent::start(dir.path(), "edge-b", "", &hub.join())?;
    hub.wait_devices_online(2, Duration::from_secs(20))?;
    let ca = std::fs::read_to_string(hub.bundle().unwrap().join("ca.pem"))?;

    // 300 slow enrollments, more than the hub has descriptors.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attackers = slow_bodies(hub.http, &ca, 300, stop.clone());
    std::thread::sleep(Duration::from_secs(3));

    // Meanwhile operators and devices go on: reads over HTTPS, an apply over MQTT that the
    // devices run, both devices online throughout.
    std::fs::copy(module("probe.wasm"), dir.path().join("probe.wasm"))?;
    let m = write_manifest(
        dir.path(),
        "beat.yaml",
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: beat }\nspec:\n  placement: every\n  wasm: { module: ./probe.wasm }\n  args: [heartbeat, \"1000\"]\n",
    );
    let outcome = (|| -> Result<()> {
        for round in 0..10 {
            let out = hub.shoal(&["get", "devices", "-o", "json"]);
            anyhow::ensure!(
                out.status.success(),
                "round {round}: an operator's read failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let devices: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let online = devices
                .as_array()
                .map_or(0, |d| d.iter().filter(|d| d["online"] == true).count());
            anyhow::ensure!(online == 2, "round {round}: {online} of 2 devices online");
            if round == 2 {
                hub.apply(&m)?;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        hub.wait_running("beat", 2, Duration::from_secs(30))?;
        Ok(())
    })();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let opened: u64 = attackers.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    outcome?;
    assert!(opened >= 300, "the attack opened {opened} connections");
    assert!(
        hub.proc
            .log_text()
            .contains("connection budget set from the open-file limit"),
        "{}",
        hub.proc.log_text()
    );
    Ok(())
}
