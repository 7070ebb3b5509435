//! `shoal-container-bench`: container deploy latency through Shoal against `ctr` on the same
//! containerd and cached image, in the same run, and WASM deploy latency next to it. Needs
//! root (it starts a private containerd). Run through `scripts/bench.sh`; Markdown to stdout.
//!
//! - Shoal: publish a manifest with a new container workload, stop the clock when the
//!   device's retained status shows it `Running` (the image was pulled by a warm-up apply).
//! - Baseline: `ctr run -d` of the same image in the agent's namespace (create + start,
//!   returning once started).
//! - Start to finish: a container running `/bin/true` (restart policy `Never`) from apply
//!   until the device reports it `Succeeded` (its task, container and snapshot removed by
//!   then), against `ctr run --rm … /bin/true`.
//! - WASM: the same apply → Running for a cached module on the same agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{bail, Context, Result};
use rumqttc::QoS;
use shoal_e2e::mqtt::{in_phase, Mqtt};
use shoal_e2e::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// Applies `manifest` as `name` and returns milliseconds until the device reports it Running.
async fn deploy(m: &mut Mqtt, status: &str, name: &str, manifest: String) -> Result<f64> {
    deploy_until(m, status, name, manifest, "Running").await
}

/// Applies `manifest` as `name` and returns milliseconds until the device reports it in
/// `phase`.
async fn deploy_until(
    m: &mut Mqtt,
    status: &str,
    name: &str,
    manifest: String,
    phase: &str,
) -> Result<f64> {
    let t0 = Instant::now();
    m.client
        .publish(
            format!("shoal/v1/apply/{name}"),
            QoS::AtLeastOnce,
            false,
            manifest,
        )
        .await?;
    tokio::time::timeout(
        Duration::from_secs(60),
        m.wait(status, |p| in_phase(p, name, phase)),
    )
    .await
    .with_context(|| format!("{name} not {phase} within 60s"))??;
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

fn ctr(socket: &str, ns: &str, args: &[&str]) -> Result<f64> {
    let t0 = Instant::now();
    let out = Command::new("ctr")
        .args(["-a", socket, "-n", ns])
        .args(args)
        .output()?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        bail!("ctr {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(ms)
}

fn row(what: &str, v: &mut [f64], base: &mut [f64], base_name: &str) {
    v.sort_by(f64::total_cmp);
    base.sort_by(f64::total_cmp);
    let (p50, b50) = (percentile(v, 0.5), percentile(base, 0.5));
    println!(
        "| {what} p50 (n={}) | {p50:.1} ms | {base_name} p50 {b50:.1} ms | {:.2}× |",
        v.len(),
        p50 / b50
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = std::env::var("SHOAL_BENCH_CONTAINERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir()?;
    let Some(ctrd) = PrivateContainerd::start(dir.path())? else {
        bail!("the container benchmark needs root and containerd");
    };
    let registry = Registry::start(dir.path())?;
    let regs = shoal_registry::Registries::new(Default::default());
    let tag = registry.reference("shoal/busybox:1");
    let image = shoal_e2e::image::push_busybox(&regs, &tag.parse()?, &[("amd64", None)]).await?;
    let hub = Hub::start(dir.path(), None)?;
    let socket = ctrd.socket.to_str().unwrap().to_string();
    let ns = format!("shoal-bench-{}", std::process::id());
    let _agent = Agent::start_with(
        dir.path(),
        "cb-1",
        "",
        &hub.join(),
        &[
            "--containerd-socket",
            &socket,
            "--containerd-namespace",
            &ns,
        ],
    )?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    let out = hub.shoal(&["push", module("probe.wasm").to_str().unwrap()]);
    if !out.status.success() {
        bail!("push failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let digest = String::from_utf8(out.stdout)?.trim().to_string();
    let container = |name: &str| {
        format!(
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: {name} }}\nspec:\n  container: {{ image: \"{image}\", command: [/bin/sleep] }}\n  args: [\"1000\"]\n  resources: {{ memory: 16Mi }}\n"
        )
    };
    let once = |name: &str| {
        format!(
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: {name} }}\nspec:\n  container: {{ image: \"{image}\", command: [/bin/true] }}\n  resources: {{ memory: 16Mi }}\n  restart: {{ policy: Never }}\n"
        )
    };
    let wasm = |name: &str| {
        format!(
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: {name} }}\nspec:\n  wasm: {{ module: \"{digest}\" }}\n  args: [heartbeat, \"1000\"]\n  resources: {{ memory: 16Mi }}\n"
        )
    };
    let mut m = Mqtt::connect(&hub.access(), "container-bench").await?;
    let status = "shoal/v1/devices/cb-1/status";
    m.subscribe(status).await?;

    // Warm-up: pull and unpack the image, compile the module.
    let cold = deploy(&mut m, status, "warm", container("warm")).await?;
    deploy(&mut m, status, "warmw", wasm("warmw")).await?;
    let delete = |name: &str| {
        let out = hub.shoal(&["delete", "workload", name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    delete("warm");
    delete("warmw");

    let (mut shoal_c, mut shoal_w, mut ctr_d, mut ctr_rm) = (vec![], vec![], vec![], vec![]);
    let mut shoal_once = vec![];
    let image_name = image.without_scheme();
    for i in 0..n {
        let name = format!("c{i}");
        shoal_c.push(deploy(&mut m, status, &name, container(&name)).await?);
        delete(&name);
        let name = format!("w{i}");
        shoal_w.push(deploy(&mut m, status, &name, wasm(&name)).await?);
        delete(&name);
        let name = format!("t{i}");
        shoal_once.push(deploy_until(&mut m, status, &name, once(&name), "Succeeded").await?);
        delete(&name);
        let id = format!("ctr-{i}");
        ctr_d.push(ctr(
            &socket,
            &ns,
            &["run", "-d", &image_name, &id, "/bin/sleep", "1000"],
        )?);
        let _ = ctr(&socket, &ns, &["task", "kill", "-s", "SIGKILL", &id]);
        std::thread::sleep(Duration::from_millis(100));
        let _ = ctr(&socket, &ns, &["task", "rm", "-f", &id]);
        let _ = ctr(&socket, &ns, &["container", "rm", &id]);
        let id = format!("ctr-rm-{i}");
        ctr_rm.push(ctr(
            &socket,
            &ns,
            &["run", "--rm", &image_name, &id, "/bin/true"],
        )?);
    }
    println!("| figure | value | baseline (same run) | ratio |");
    println!("|---|---|---|---|");
    row(
        "container apply → Running",
        &mut shoal_c,
        &mut ctr_d,
        "`ctr run -d`",
    );
    row(
        "WASM apply → Running",
        &mut shoal_w,
        &mut shoal_c.clone(),
        "container apply → Running",
    );
    row(
        "container apply → Succeeded, `/bin/true` (start to finish)",
        &mut shoal_once,
        &mut ctr_rm,
        "`ctr run --rm … true`",
    );
    println!("| first container apply → Running (pull + unpack) | {cold:.0} ms | | |");
    if std::env::var("SHOAL_BENCH_KEEP").is_ok() {
        eprintln!("logs kept in {}", dir.keep().display());
    }
    Ok(())
}
