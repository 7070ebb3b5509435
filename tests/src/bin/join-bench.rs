//! `shoal-join-bench`: time from `shoal-agent run` (no broker given) to the hub listing the device
//! online, over real multicast between network namespaces (see `shoal_e2e::netns`). Baseline,
//! interleaved in the same run: the same agent started with `--broker` (no discovery).
//! Run it through `scripts/bench.sh`; needs root. `SHOAL_BENCH_JOINS` sets the number of joins
//! per variant (default 20).
//!
//! The clock stops when a watcher process inside the hub's namespace, polling the hub's HTTP
//! API every 2 ms, sees the device online (`shoal-join-bench watch PORT DEVICE`, the same
//! binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{bail, Context, Result};
use shoal_e2e::netns::Lan;
use shoal_e2e::*;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("watch") {
        return watch(&args[2], &args[3]);
    }
    let n: usize = std::env::var("SHOAL_BENCH_JOINS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let Some(lan) = Lan::new(2)? else {
        bail!("join-bench needs root (network namespaces)");
    };
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mut cmd = lan.command(0, bin("shoal-hub"));
    cmd.args(["serve", "--data-dir"])
        .arg(dir.join("hub"))
        .args([
            "--mqtt-listen",
            "0.0.0.0:1883",
            "--http-listen",
            "0.0.0.0:8080",
        ]);
    let _hub = Proc::spawn("hub", &mut cmd, dir.join("hub.log"))?;
    std::thread::sleep(Duration::from_secs(2)); // listening and announced
    let broker = format!("mqtt://{}:1883", lan.addr(0));

    // Isolated joins (the hub has not answered a query for over a second) and back-to-back
    // joins (RFC 6762 §6: a responder multicasts a record at most once per second per
    // interface, so a second querier within that second waits for its next query), each
    // interleaved with the baseline.
    let mut mdns = Vec::new();
    let mut burst = Vec::new();
    let mut fixed = Vec::new();
    let (mut rss_mdns, mut rss_fixed) = (Vec::new(), Vec::new());
    for i in 0..n {
        std::thread::sleep(Duration::from_millis(1500));
        let (ms, rss) = join_once(&lan, dir, &format!("j{i}-mdns"), None)?;
        mdns.push(ms);
        rss_mdns.push(rss);
        burst.push(join_once(&lan, dir, &format!("j{i}-burst"), None)?.0);
        let (ms, rss) = join_once(&lan, dir, &format!("j{i}-fixed"), Some(&broker))?;
        fixed.push(ms);
        rss_fixed.push(rss);
    }
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (percentile(v, 0.5), percentile(v, 0.95))
    };
    let (m50, m95) = stats(&mut mdns);
    let (b50, b95) = stats(&mut burst);
    let (f50, f95) = stats(&mut fixed);
    let (rm, _) = stats(&mut rss_mdns);
    let (rf, _) = stats(&mut rss_fixed);
    println!("| join (agent start → hub lists it online), n={n} each | p50 | p95 |");
    println!("|---|---|---|");
    println!("| no broker given: hub found over mDNS | {m50:.0} ms | {m95:.0} ms |");
    println!("| same, right after another join (RFC 6762 once-per-second rule) | {b50:.0} ms | {b95:.0} ms |");
    println!("| baseline: `--broker` given | {f50:.0} ms | {f95:.0} ms |");
    println!(
        "| ratio mDNS / baseline | {:.1}× | {:.1}× |",
        m50 / f50.max(1.0),
        m95 / f95.max(1.0)
    );
    println!();
    println!(
        "| agent RSS 0.5 s after joining, no workloads (p50) | mDNS on | `--no-mdns --broker` |"
    );
    println!("|---|---|---|");
    println!("| | {:.1} MiB | {:.1} MiB |", rm / 1024.0, rf / 1024.0);
    Ok(())
}

/// Starts a fresh agent in namespace 1; returns the milliseconds until the hub lists it and
/// the agent's RSS (KiB) half a second later.
fn join_once(
    lan: &Lan,
    dir: &std::path::Path,
    id: &str,
    broker: Option<&str>,
) -> Result<(f64, f64)> {
    let mut watcher = lan
        .command(0, std::env::current_exe()?)
        .args(["watch", "8080", id])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(watcher.stdout.take().context("watcher stdout")?).lines();
    let ready = lines.next().context("watcher ended")??;
    anyhow::ensure!(ready == "ready", "watcher said {ready:?}");

    let mut cmd = lan.command(1, bin("shoal-agent"));
    cmd.args(["run", "--data-dir"])
        .arg(dir.join(id))
        .args(["--device-id", id, "--memory", "256Mi", "--socket"])
        .arg(dir.join(id).join("agent.sock"));
    match broker {
        Some(b) => cmd.args(["--broker", b, "--no-mdns"]),
        None => cmd.args(["--mdns-interface", lan.iface(1)]),
    };
    let t0 = Instant::now();
    let mut agent = Proc::spawn(id, &mut cmd, dir.join(format!("{id}.log")))?;
    let line = lines.next().context("watcher ended")??;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(line == "online", "watcher said {line:?}");
    let _ = watcher.wait();
    std::thread::sleep(Duration::from_millis(500));
    let rss = rss_kib(agent.pid())?.0 as f64;
    agent.terminate(Duration::from_secs(5))?;
    let log = agent.log_text();
    let at = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .and_then(time_of_day)
    };
    if let (Some(a), Some(b), Some(c)) = (
        at("local api listening"),
        at("hub found over mdns"),
        at("connected to broker"),
    ) {
        eprintln!(
            "{id}: {ms:.0} ms; started → hub found {:.0} ms → connected {:.0} ms",
            (b - a) * 1000.0,
            (c - b) * 1000.0
        );
    } else {
        eprintln!("{id}: {ms:.0} ms");
    }
    Ok((ms, rss))
}

/// Seconds since midnight of a log line's RFC 3339 timestamp.
fn time_of_day(line: &str) -> Option<f64> {
    let t = &line[line.find('T')? + 1..];
    let t = t.get(..15)?; // HH:MM:SS.ffffff
    let h: f64 = t.get(0..2)?.parse().ok()?;
    let m: f64 = t.get(3..5)?.parse().ok()?;
    let s: f64 = t.get(6..15)?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Inside the hub's namespace: print `ready`, then `online` once `device` is listed online.
fn watch(port: &str, device: &str) -> Result<()> {
    let port: u16 = port.parse()?;
    println!("ready");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(resp) = http_get(port, "/v1/devices") {
            let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            let online = v
                .as_array()
                .is_some_and(|a| a.iter().any(|d| d["id"] == device && d["online"] == true));
            if online {
                println!("online");
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("{device} not online within 30s")
}
