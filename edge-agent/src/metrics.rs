//! The agent's Prometheus metrics, rendered at each scrape from what the main loop reports
//! ([`AgentStatusView`], [`ReplicaView`]s): nothing is kept between scrapes, so a replica
//! that left the device leaves the output with it. Served at `GET /metrics` on the local
//! socket and, with `--metrics-listen ADDR`, on TCP for Prometheus (that listener serves
//! nothing else).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `shoal_agent_info` | gauge (1) | `device`, `fleet`, `version` |
//! | `shoal_agent_hub_connected` | gauge | |
//! | `shoal_agent_desired_generation` | gauge | |
//! | `shoal_agent_last_sync_timestamp_seconds` | gauge | |
//! | `shoal_agent_replica_phase` | gauge (1 for the current phase) | `workload`, `instance`, `variant`, `phase` |
//! | `shoal_agent_replica_restarts_total` | counter | `workload`, `instance` |
//! | `shoal_agent_replica_memory_bytes` | gauge | `workload`, `instance` |
//! | `shoal_agent_replica_memory_limit_bytes` | gauge | `workload`, `instance` |
//! | `shoal_agent_replica_cpu_seconds_total` | counter | `workload`, `instance` |
//! | `shoal_agent_memory_offered_bytes`, `shoal_agent_memory_allocated_bytes` | gauge | |
//! | `shoal_agent_disk_available_bytes` | gauge | |
//! | `process_resident_memory_bytes` | gauge | (the agent's own RSS) |

use crate::status::{AgentStatusView, ReplicaView};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Info {
    device: String,
    fleet: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    workload: String,
    instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    workload: String,
    instance: String,
    variant: String,
    phase: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;

fn gauge(r: &mut Registry, name: &str, help: &str, v: i64) {
    let g: Gauge = Gauge::default();
    g.set(v);
    r.register(name, help, g);
}

fn bytes(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The OpenMetrics text for one scrape.
pub fn render(
    status: &AgentStatusView,
    replicas: &[ReplicaView],
) -> Result<String, std::fmt::Error> {
    let mut r = Registry::default();
    let info = Family::<Info, Gauge>::default();
    info.get_or_create(&Info {
        device: status.device.clone(),
        fleet: status.fleet.clone(),
        version: status.agent_version.clone(),
    })
    .set(1);
    r.register(
        "shoal_agent_info",
        "The agent's device, fleet and version",
        info,
    );
    gauge(
        &mut r,
        "shoal_agent_hub_connected",
        "Whether the agent is connected to its hub's broker",
        i64::from(status.hub.connected),
    );
    gauge(
        &mut r,
        "shoal_agent_desired_generation",
        "Generation of the desired state in force",
        bytes(status.generation),
    );
    if let Some(t) = status.last_sync_ms {
        let g = FloatGauge::default();
        g.set(t as f64 / 1000.0);
        r.register(
            "shoal_agent_last_sync_timestamp_seconds",
            "When a desired state last came from the hub",
            g,
        );
    }
    gauge(
        &mut r,
        "shoal_agent_memory_offered_bytes",
        "Memory the device offers to workloads",
        bytes(status.memory.offered_bytes),
    );
    gauge(
        &mut r,
        "shoal_agent_memory_allocated_bytes",
        "Sum of the memory limits of the replicas desired here",
        bytes(status.memory.allocated_bytes),
    );
    if let Some(d) = &status.disk {
        gauge(
            &mut r,
            "shoal_agent_disk_available_bytes",
            "Free space on the filesystem of the agent's data directory",
            bytes(d.available_bytes),
        );
    }
    gauge(
        &mut r,
        "process_resident_memory_bytes",
        "Resident memory of the agent process",
        bytes(status.memory.agent_rss_bytes),
    );

    let phase = Family::<PhaseLabels, Gauge>::default();
    let restarts = Family::<ReplicaLabels, Counter>::default();
    let memory = Family::<ReplicaLabels, Gauge>::default();
    let limit = Family::<ReplicaLabels, Gauge>::default();
    let cpu = Family::<ReplicaLabels, FloatCounter>::default();
    for rep in replicas {
        let labels = ReplicaLabels {
            workload: rep.workload.clone(),
            instance: rep.instance.clone(),
        };
        // Every phase gets a series (1 for the current one), so that `sum by (phase)`
        // counts replicas per phase without gaps.
        for p in shoal_api::wire::messages::Phase::ALL {
            let p = p.to_string();
            phase
                .get_or_create(&PhaseLabels {
                    workload: rep.workload.clone(),
                    instance: rep.instance.clone(),
                    variant: rep.variant.clone(),
                    phase: p.clone(),
                })
                .set(i64::from(rep.phase == p));
        }
        restarts
            .get_or_create(&labels)
            .inc_by(u64::from(rep.restarts));
        if let Some(m) = rep.memory_bytes {
            memory.get_or_create(&labels).set(bytes(m));
        }
        limit.get_or_create(&labels).set(bytes(rep.memory_limit));
        if let Some(n) = rep.cpu_nanos {
            cpu.get_or_create(&labels).inc_by(n as f64 / 1e9);
        }
    }
    r.register(
        "shoal_agent_replica_phase",
        "Replicas on this device, 1 for their current phase",
        phase,
    );
    r.register(
        "shoal_agent_replica_restarts",
        "Restarts of a replica",
        restarts,
    );
    r.register(
        "shoal_agent_replica_memory_bytes",
        "Memory a replica uses",
        memory,
    );
    r.register(
        "shoal_agent_replica_memory_limit_bytes",
        "A replica's memory limit",
        limit,
    );
    r.register(
        "shoal_agent_replica_cpu_seconds",
        "CPU time a replica used",
        cpu,
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{HubLinkView, MemoryView};

    #[test]
    fn a_scrape_names_each_replica_and_its_phase() {
        let status = AgentStatusView {
            device: "d1".into(),
            fleet: "farm".into(),
            agent_version: "0.1.0".into(),
            runtimes: vec!["wasm".into()],
            hub: HubLinkView {
                connected: true,
                ..Default::default()
            },
            generation: 7,
            last_sync_ms: Some(1_500),
            replicas: 1,
            running: 1,
            disk: None,
            memory: MemoryView {
                agent_rss_bytes: 5 << 20,
                ..Default::default()
            },
            started_at_ms: 0,
        };
        let rep = ReplicaView {
            instance: "web-0".into(),
            workload: "web".into(),
            replica: 0,
            revision: "r1".into(),
            variant: "wasm".into(),
            phase: "Running".into(),
            restarts: 3,
            started_at_ms: None,
            reason: None,
            healthy: None,
            exit_code: None,
            memory_bytes: Some(1 << 20),
            memory_limit: 16 << 20,
            cpu_nanos: Some(2_500_000_000),
        };
        let text = render(&status, &[rep]).unwrap();
        for line in [
            "shoal_agent_info{device=\"d1\",fleet=\"farm\",version=\"0.1.0\"} 1",
            "shoal_agent_hub_connected 1",
            "shoal_agent_desired_generation 7",
            "shoal_agent_last_sync_timestamp_seconds 1.5",
            "shoal_agent_replica_phase{workload=\"web\",instance=\"web-0\",variant=\"wasm\",phase=\"Running\"} 1",
            "shoal_agent_replica_phase{workload=\"web\",instance=\"web-0\",variant=\"wasm\",phase=\"Failed\"} 0",
            "shoal_agent_replica_restarts_total{workload=\"web\",instance=\"web-0\"} 3",
            "shoal_agent_replica_memory_bytes{workload=\"web\",instance=\"web-0\"} 1048576",
            "shoal_agent_replica_cpu_seconds_total{workload=\"web\",instance=\"web-0\"} 2.5",
            "process_resident_memory_bytes 5242880",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
