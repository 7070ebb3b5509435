//! `shoal-bench`: measures the walking skeleton's figures against a baseline run side by side.
//! Run it through `scripts/bench.sh` (release builds); results go to stdout as Markdown.
//!
//! - apply → Running latency for a cached module: publish a manifest with a new workload on
//!   `shoal/v1/apply/{req}`, stop the clock when the device's retained status shows it
//!   `Running`. Baseline: one MQTT QoS 1 hop through the same broker (publish → delivery to a
//!   subscriber), measured in the same run; the protocol floor is three hops.
//! - the same latency with the hub's state in etcd (`--store etcds://…`, Debian's etcd over TLS with client certificates, on
//!   loopback), against the sled hub's of the same run.
//! - failover: three hub replicas on one etcd and one mosquitto; the leader is SIGKILLed
//!   `SHOAL_BENCH_KILLS` times (default 10, restarted as a standby each time), timed until
//!   another replica reports itself leader (`shoal_hub_leader`). Baseline: the lease TTL, the
//!   floor (a dead leader's lease must expire first).
//! - agent idle RSS with the engine loaded, and release binary sizes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{bail, Result};
use rumqttc::QoS;
use shoal_e2e::mqtt::{running, Mqtt};
use shoal_e2e::*;
use std::time::{Duration, Instant};

/// `n` applies of a new workload each, timed from the publish until the device's status shows
/// it `Running` (each deleted again, untimed, so that every iteration starts one replica).
async fn apply_latencies(
    hub: &Hub,
    m: &mut Mqtt,
    status_topic: &str,
    manifest: &dyn Fn(&str) -> String,
    prefix: &str,
    n: usize,
) -> Result<Vec<f64>> {
    let mut lat = Vec::new();
    for i in 0..n {
        let name = format!("{prefix}{i}");
        let t0 = Instant::now();
        m.client
            .publish(
                format!("shoal/v1/apply/{prefix}r{i}"),
                QoS::AtLeastOnce,
                false,
                manifest(&name),
            )
            .await?;
        tokio::time::timeout(
            Duration::from_secs(10),
            m.wait(status_topic, |p| running(p, &name)),
        )
        .await??;
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
        let out = hub.shoal(&["delete", "workload", &name]);
        if !out.status.success() {
            bail!("delete failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

/// The same applies against a hub (and device) whose state is in etcd: the figure is the
/// etcd hub's latency, the baseline the sled hub's of the same run.
async fn etcd_latencies(dir: &std::path::Path, n: usize) -> Result<Vec<f64>> {
    let etcd = Etcd::start(dir)?;
    let hub_dir = dir.join("on-etcd");
    std::fs::create_dir_all(&hub_dir)?;
    let hub = Hub::start_with(
        &hub_dir,
        None,
        free_port(),
        free_port(),
        &["--store", &etcd.url()],
    )?;
    let _agent = Agent::start(&hub_dir, "bench-2", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    let out = hub.shoal(&["push", module("probe.wasm").to_str().unwrap()]);
    if !out.status.success() {
        bail!("push failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let digest = String::from_utf8(out.stdout)?.trim().to_string();
    let mut m = Mqtt::connect(&hub.access(), "bench-etcd").await?;
    let status_topic = "shoal/v1/devices/bench-2/status";
    m.subscribe(status_topic).await?;
    let manifest = |name: &str| bench_manifest(name, &digest);
    // Warm-up (download and compile), untimed.
    apply_latencies(&hub, &mut m, status_topic, &manifest, "w", 1).await?;
    apply_latencies(&hub, &mut m, status_topic, &manifest, "e", n).await
}

/// Seconds from SIGKILL of the leader until another replica leads, `kills` times.
fn failover_times(dir: &std::path::Path, kills: usize, lease: &str) -> Result<Vec<f64>> {
    let dir = dir.join("ha");
    std::fs::create_dir_all(&dir)?;
    let etcd = Etcd::start(&dir)?;
    let mq = Mosquitto::start(&dir)?;
    let start = |i: usize| -> Result<Hub> {
        // The first replica's data directory is the one the broker's certificate came from.
        let d = if i == 0 {
            dir.clone()
        } else {
            dir.join(format!("r{i}"))
        };
        std::fs::create_dir_all(&d)?;
        Hub::start_with(
            &d,
            Some(&mq.url()),
            free_port(),
            free_port(),
            &["--store", &etcd.url(), "--leader-lease", lease],
        )
    };
    let mut hubs: Vec<Hub> = Vec::new();
    for i in 0..3 {
        hubs.push(start(i)?);
    }
    let leader = |hubs: &[Hub], not: Option<usize>| -> Option<usize> {
        (0..hubs.len()).find(|&i| Some(i) != not && hubs[i].is_leader() == Some(true))
    };
    let mut times = Vec::new();
    for _ in 0..kills {
        let old = wait_until(Duration::from_secs(20), "a leader", || {
            Ok(leader(&hubs, None))
        })?;
        hubs[old].proc.kill();
        let t0 = Instant::now();
        wait_until(Duration::from_secs(20), "a new leader", || {
            Ok(leader(&hubs, Some(old)))
        })?;
        times.push(t0.elapsed().as_secs_f64());
        hubs[old] = start(old)?;
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// A workload of one replica of the probe module (`digest`) beating once a second.
fn bench_manifest(name: &str, digest: &str) -> String {
    format!(
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: {name} }}\nspec:\n  wasm: {{ module: \"{digest}\" }}\n  args: [heartbeat, \"1000\"]\n  resources: {{ memory: 16Mi }}\n"
    )
}

fn mib((total, anon, file): (u64, u64, u64)) -> String {
    format!(
        "{:.1} MiB ({:.1} anonymous, {:.1} file-backed)",
        total as f64 / 1024.0,
        anon as f64 / 1024.0,
        file as f64 / 1024.0
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = std::env::var("SHOAL_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let agent = Agent::start(dir.path(), "bench-1", "", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    let out = hub.shoal(&["push", module("probe.wasm").to_str().unwrap()]);
    if !out.status.success() {
        bail!("push failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let digest = String::from_utf8(out.stdout)?.trim().to_string();

    let mut m = Mqtt::connect(&hub.access(), "bench").await?;
    let status_topic = "shoal/v1/devices/bench-1/status";
    m.subscribe(status_topic).await?;

    // Baseline: one QoS 1 hop through the same broker, over the same TLS front listener
    // (as the hub's identity: operators may not publish on a scratch topic).
    let mut echo = Mqtt::connect_as_hub(hub.mqtt, &hub.data_dir, "bench-echo").await?;
    echo.subscribe("bench/echo").await?;
    let mut hop = Vec::new();
    for i in 0..n {
        let t0 = Instant::now();
        echo.client
            .publish("bench/echo", QoS::AtLeastOnce, false, i.to_string())
            .await?;
        let want = i.to_string();
        echo.wait("bench/echo", |p| p == want.as_bytes()).await?;
        hop.push(t0.elapsed().as_secs_f64() * 1000.0);
    }

    let manifest = |name: &str| bench_manifest(name, &digest);
    // Warm-up: the first run downloads and compiles the module.
    let t0 = Instant::now();
    m.client
        .publish(
            "shoal/v1/apply/warm",
            QoS::AtLeastOnce,
            false,
            manifest("warm"),
        )
        .await?;
    tokio::time::timeout(
        Duration::from_secs(60),
        m.wait(status_topic, |p| running(p, "warm")),
    )
    .await??;
    let cold_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let rss_idle_loaded = rss_kib(agent.proc.pid())?;

    let mut lat = apply_latencies(&hub, &mut m, status_topic, &manifest, "b", n).await?;
    lat.sort_by(f64::total_cmp);
    hop.sort_by(f64::total_cmp);
    let on_etcd = etcd_latencies(dir.path(), n).await?;
    let kills: usize = std::env::var("SHOAL_BENCH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let lease_s = 3.0;
    let failover = failover_times(dir.path(), kills, "3s")?;
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    let (h50, h99) = (percentile(&hop, 0.5), percentile(&hop, 0.99));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(agent.proc.pid())?;

    let size = |name: &str| std::fs::metadata(bin(name)).map(|m| m.len()).unwrap_or(0);
    println!("| figure | value | baseline (same run) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| apply → Running p50 (n={n}) | {p50:.2} ms | 3 MQTT hops p50 {:.2} ms | {:.1}× |",
        3.0 * h50,
        p50 / (3.0 * h50)
    );
    println!(
        "| apply → Running p99 (n={n}) | {p99:.2} ms | 3 MQTT hops p99 {:.2} ms | {:.1}× |",
        3.0 * h99,
        p99 / (3.0 * h99)
    );
    let (e50, e99) = (percentile(&on_etcd, 0.5), percentile(&on_etcd, 0.99));
    println!(
        "| apply → Running p50, hub state in etcd (n={n}) | {e50:.2} ms | same on sled {p50:.2} ms | {:.2}× |",
        e50 / p50
    );
    println!(
        "| apply → Running p99, hub state in etcd (n={n}) | {e99:.2} ms | same on sled {p99:.2} ms | {:.2}× |",
        e99 / p99
    );
    let (f50, f95) = (percentile(&failover, 0.5), percentile(&failover, 0.95));
    println!(
        "| leader SIGKILLed → new leader p50 / p95 ({kills} kills, 3 replicas) | {f50:.2} / {f95:.2} s | lease TTL {lease_s:.0} s | {:.2}× / {:.2}× |",
        f50 / lease_s,
        f95 / lease_s
    );
    println!("| one MQTT QoS 1 hop p50 / p99 | {h50:.3} / {h99:.3} ms | | |");
    println!("| first apply → Running (download + compile) | {cold_ms:.0} ms | | |");
    println!(
        "| agent RSS, engine loaded, one replica | {} | | |",
        mib(rss_idle_loaded)
    );
    println!(
        "| agent RSS after {n} replicas came and went (1 running) | {} | | |",
        mib(rss_after)
    );
    println!(
        "| shoal-agent binary ({}) | {:.1} MiB | shoal-hub {:.1} MiB | |",
        bin_dir().display(),
        size("shoal-agent") as f64 / 1048576.0,
        size("shoal-hub") as f64 / 1048576.0
    );
    Ok(())
}
