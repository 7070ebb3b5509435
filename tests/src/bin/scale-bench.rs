//! `shoal-scale-bench`: the hub under a simulated fleet (release builds; `scripts/bench.sh`).
//!
//! 1. `SHOAL_BENCH_FLEET` (default 10,000) simulated devices (`shoal_e2e::sim`, in this
//!    process, one MQTT connection each) join a release hub through Debian's mosquitto; they
//!    report status every 10 s. Measured: time to join, then the hub's CPU (as a share of one
//!    core) and RSS over 60 s of steady state.
//! 2. A `placement: every` workload restricted to 1,000 of them (`role=canary-ring`)
//!    converges, then a new revision rolls out (`maxUnavailable: 25%`): time from apply until
//!    every replica reports `Running` on it. Baseline, side by side: the first placement of
//!    the same workload (no rollout gating), so the ratio is what rollout safety costs.
//!
//! `SHOAL_BENCH_REPLICAS=N` (N > 1) runs N hub replicas on one etcd (Debian's) instead of
//! one hub on sled: status ingest is shared (MQTT 5 shared subscription), and the CPU of
//! each replica is reported, the leader's first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use shoal_e2e::sim::{self, SimConfig, SimStats};
use shoal_e2e::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn manifest(args: &str) -> String {
    format!(
        r#"apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: ring }}
spec:
  placement: every
  selector: {{ role: canary-ring }}
  wasm: {{ module: "{probe}" }}
  args: [{args}]
  resources: {{ memory: 16Mi }}
  update: {{ maxUnavailable: "25%" }}
"#,
        probe = module("probe.wasm").display()
    )
}

fn until_converged(
    hub: &Hub,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Result<()> {
    wait_until(Duration::from_secs(300), what, || {
        let w = hub.workload("ring")?.unwrap_or_default();
        Ok(check(&w).then_some(()))
    })
}

fn main() -> Result<()> {
    let fleet: usize = std::env::var("SHOAL_BENCH_FLEET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let ring = 1000.min(fleet);
    let replicas: usize = std::env::var("SHOAL_BENCH_REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let tmp = tempfile::tempdir()?;
    // Debian's mosquitto as the broker: the production shape for a fleet this size (the
    // embedded rumqttd's join rate falls off past a few thousand connections; BENCHMARKS.md).
    // Simulated devices hold no certificates: plain MQTT (the bench measures the hub).
    let mq = Mosquitto::start_insecure(tmp.path())?;
    let etcd = match replicas {
        1 => None,
        _ => Some(Etcd::start(tmp.path())?),
    };
    let mut hubs = Vec::new();
    for i in 0..replicas {
        let dir = tmp.path().join(format!("r{i}"));
        std::fs::create_dir_all(&dir)?;
        let mut args = vec!["--insecure".to_string()];
        if let Some(e) = &etcd {
            args.extend(["--store".into(), e.url()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        hubs.push(Hub::start_with(
            &dir,
            Some(&mq.url()),
            free_port(),
            free_port(),
            &args,
        )?);
        if i == 0 && replicas > 1 {
            wait_until(Duration::from_secs(30), "the first hub leads", || {
                Ok((hubs[0].is_leader() == Some(true)).then_some(()))
            })?;
        }
    }
    let hub = &hubs[0];
    let rt = tokio::runtime::Runtime::new()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let stats = Arc::new(SimStats::default());
    let base = SimConfig {
        host: "127.0.0.1".into(),
        port: mq.port,
        prefix: "ring".into(),
        devices: ring,
        labels: [("role".to_string(), "canary-ring".to_string())].into(),
        start_delay: Duration::from_millis(20),
        failure_rate: 0.0,
        memory: 1 << 30,
    };
    let rest = SimConfig {
        prefix: "fleet".into(),
        devices: fleet - ring,
        labels: Default::default(),
        ..base.clone()
    };
    let t = Instant::now();
    let a = rt.spawn(sim::run(base, stats.clone(), stop.clone()));
    let b = rt.spawn(sim::run(rest, stats.clone(), stop.clone()));
    hub.wait_devices_online(fleet, Duration::from_secs(600))?;
    let join = t.elapsed();

    // Steady state: statuses every 10 s from everyone.
    std::thread::sleep(Duration::from_secs(5));
    let pids: Vec<u32> = hubs.iter().map(|h| h.proc.pid()).collect();
    let cpu0 = pids
        .iter()
        .map(|&p| cpu_seconds(p))
        .collect::<Result<Vec<f64>>>()?;
    let t0 = Instant::now();
    let sent0 = stats.statuses_sent.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(60));
    let cpus = pids
        .iter()
        .zip(&cpu0)
        .map(|(&p, c0)| Ok((cpu_seconds(p)? - c0) / t0.elapsed().as_secs_f64()))
        .collect::<Result<Vec<f64>>>()?;
    let cpu = cpus[0];
    let pid = pids[0];
    let rate =
        (stats.statuses_sent.load(Ordering::Relaxed) - sent0) as f64 / t0.elapsed().as_secs_f64();
    let rss = rss_kib(pid)?.0 as f64 / 1024.0;

    // First placement (baseline), then a rollout of a new revision.
    let t = Instant::now();
    hub.apply(&write_manifest(
        tmp.path(),
        "v1.yaml",
        &manifest(r#""heartbeat", "1000""#),
    ))?;
    until_converged(hub, "v1 everywhere", |w| w["ready"] == ring as u64)?;
    let place = t.elapsed();
    let t = Instant::now();
    hub.apply(&write_manifest(
        tmp.path(),
        "v2.yaml",
        &manifest(r#""heartbeat", "500""#),
    ))?;
    until_converged(hub, "v2 everywhere", |w| {
        w["rollout"]["state"] == "Complete" && w["ready"] == ring as u64
    })?;
    let rollout = t.elapsed();

    println!("| hub under a simulated fleet | value |");
    println!("|---|---|");
    println!(
        "| {fleet} devices join (from first connect to all online) | {:.1} s |",
        join.as_secs_f64()
    );
    println!("| steady state: status reports sent by the simulated fleet | {rate:.0}/s |");
    println!(
        "| hub CPU, steady state | **{:.1} % of one core** |",
        cpu * 100.0
    );
    println!("| hub RSS, steady state | {rss:.0} MiB |");
    if replicas > 1 {
        let standbys: Vec<String> = cpus[1..]
            .iter()
            .map(|c| format!("{:.1} %", c * 100.0))
            .collect();
        println!(
            "| {replicas} replicas on etcd: leader CPU above; standbys' CPU | {} |",
            standbys.join(", ")
        );
    }
    println!(
        "| baseline: first placement on {ring} devices until all Running | {:.2} s |",
        place.as_secs_f64()
    );
    println!("| rollout of a new revision to {ring} devices (maxUnavailable 25%) until all Running | **{:.2} s** |", rollout.as_secs_f64());
    println!(
        "| ratio rollout / first placement | {:.1}× |",
        rollout.as_secs_f64() / place.as_secs_f64().max(0.001)
    );

    stop.cancel();
    let _ = rt.block_on(async { tokio::join!(a, b) });
    Ok(())
}
