//! Placement throughput of the pure scheduler at fleet scale:
//! `cargo bench -p shoal-hub --bench schedule` (release build; `SHOAL_BENCH_DEVICES`,
//! `SHOAL_BENCH_REPLICAS` override the defaults of 10,000 devices and 100,000 replicas).
//!
//! 1,000 workloads share the replicas; devices carry a zone label (10 zones) and a role;
//! workloads mix equality and set-based selectors, CPU requests, `spread: zone` and
//! `strategy: binpack`. Baseline, side by side: the same placements made the naive way (scan
//! every device for every replica, as the scheduler did before), on a tenth of the replicas
//! because it is linear in devices per placement.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_api::model::ids::{DeviceId, Digest, WorkloadName};
use shoal_api::model::selector::{Requirement, Selector, SetRequirement};
use shoal_api::model::workload::{
    ModuleRef, Placement, Resources, Restart, RestartPolicy, Strategy, Workload,
};
use shoal_hub::fleet::scheduler::{schedule, Assignments, DeviceView};
use std::collections::BTreeMap;
use std::time::Instant;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fleet(devices: usize) -> Vec<DeviceView> {
    (0..devices)
        .map(|i| DeviceView {
            allows: Default::default(),
            id: DeviceId::try_from(format!("dev-{i:05}").as_str()).unwrap(),
            labels: [
                ("zone".to_string(), format!("z{}", i % 10)),
                (
                    "role".to_string(),
                    if i % 4 == 0 { "gateway" } else { "sensor" }.to_string(),
                ),
            ]
            .into(),
            runtimes: ["wasm".to_string()].into(),
            arch: "x86_64".into(),
            variant: None,
            memory: 4 << 30,
            cpu_millis: 64_000,
            max_replicas: None,
            hardware: Default::default(),
            online: true,
            lost: false,
            lost_for: Default::default(),
            cordoned: false,
        })
        .collect()
}

fn workloads(count: usize, replicas_each: u32) -> Vec<Workload> {
    (0..count)
        .map(|i| {
            let mut sel = BTreeMap::new();
            match i % 3 {
                0 => {}
                1 => {
                    sel.insert("role".to_string(), Requirement::Eq("sensor".into()));
                }
                _ => {
                    sel.insert(
                        "zone".to_string(),
                        Requirement::Set(SetRequirement::In(
                            ["z1", "z2", "z3", "z4", "z5"]
                                .iter()
                                .map(|s| s.to_string())
                                .collect(),
                        )),
                    );
                }
            }
            Workload {
                configs: Default::default(),
                configs_pinned: Default::default(),
                secrets_pinned: Default::default(),
                completion: None,
                after: Vec::new(),
                disconnect: None,
                schedule: None,
                name: WorkloadName::try_from(format!("w-{i:04}").as_str()).unwrap(),
                labels: BTreeMap::new(),
                placement: Placement::Replicas(replicas_each),
                selector: Selector(sel),
                spread: (i % 5 == 0).then(|| "zone".to_string()),
                strategy: if i % 7 == 0 {
                    Strategy::Binpack
                } else {
                    Strategy::Spread
                },
                module: Some(ModuleRef::Digest(Digest::of(b"m"))),
                container: None,
                args: vec![],
                env: BTreeMap::new(),
                resources: Resources {
                    memory: 16 << 20,
                    cpu: Some(50),
                },
                restart: Restart {
                    policy: RestartPolicy::Always,
                    initial_backoff_ms: 1000,
                    max_backoff_ms: 60_000,
                },
                update: Default::default(),
                health: None,
                ports: vec![],
                uses: vec![],
                volumes: vec![],
                network: vec![],
                limits: Default::default(),
                secrets: Default::default(),
                devices: Default::default(),
            }
        })
        .collect()
}

/// The baseline: for each replica, scan every device for the best fit (fewest of the
/// workload, then most free memory, then id).
fn naive(devices: &[DeviceView], workloads: &[Workload]) -> usize {
    let mut free: Vec<u64> = devices.iter().map(|d| d.memory).collect();
    let mut placed = 0;
    for w in workloads {
        let Placement::Replicas(n) = w.placement else {
            continue;
        };
        let mut same = vec![0u32; devices.len()];
        for _ in 0..n {
            let best = (0..devices.len())
                .filter(|&i| {
                    w.selects(&devices[i].labels)
                        && devices[i].runtimes.contains("wasm")
                        && free[i] >= w.resources.memory
                })
                .min_by_key(|&i| (same[i], std::cmp::Reverse(free[i]), &devices[i].id));
            if let Some(i) = best {
                same[i] += 1;
                free[i] -= w.resources.memory;
                placed += 1;
            }
        }
    }
    placed
}

fn main() {
    let d = env("SHOAL_BENCH_DEVICES", 10_000);
    let r = env("SHOAL_BENCH_REPLICAS", 100_000);
    let n_workloads = 1_000.min(r.max(1));
    let per = (r / n_workloads) as u32;
    let devices = fleet(d);
    let ws = workloads(n_workloads, per);
    let total = per as usize * n_workloads;

    let t = Instant::now();
    let s = schedule(&devices, &ws, &Assignments::new());
    let first = t.elapsed().as_secs_f64();
    let placed: usize = s.assignments.values().map(|m| m.len()).sum();
    assert_eq!(placed, total, "pending: {:?}", s.pending.values().next());

    let t = Instant::now();
    let again = schedule(&devices, &ws, &s.assignments);
    let steady = t.elapsed().as_secs_f64();
    assert_eq!(
        again.assignments, s.assignments,
        "placing again changes nothing"
    );

    let base_ws = workloads(n_workloads, (per / 10).max(1));
    let base_total = (per / 10).max(1) as usize * n_workloads;
    let t = Instant::now();
    let base_placed = naive(&devices, &base_ws);
    let base = t.elapsed().as_secs_f64();
    assert_eq!(base_placed, base_total);

    let rate = total as f64 / first;
    let base_rate = base_total as f64 / base;
    println!("| scheduler, {d} devices, {total} replicas in {n_workloads} workloads | value |");
    println!("|---|---|");
    println!("| place everything from scratch | {first:.2} s = **{rate:.0} placements/s** |");
    println!("| re-run with everything placed (no change) | {steady:.2} s |");
    println!(
        "| baseline: naive scan per replica ({base_total} replicas) | {base:.2} s = {base_rate:.0} placements/s |"
    );
    println!("| ratio | {:.0}× |", rate / base_rate);
}
