//! Prometheus metrics of the hub, served at `GET /metrics` of its HTTP listener.
//!
//! Counters are bumped where things happen (applies, MQTT messages, scheduler runs,
//! events); gauges that describe the fleet (devices by state, replicas by phase, rollout
//! progress) are recomputed from the read models just before each scrape
//! ([`Metrics::refresh`]), so they can never drift from what `shoal get` shows.

use crate::fleet::SchedulingRun;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use shoal_api::wire::messages::Phase;
use shoal_api::wire::views::{DeviceView, EventView, WorkloadView};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadLabel {
    pub workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutLabel {
    pub workload: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    /// `Normal` or `Warning` (label `type`).
    pub r#type: String,
    pub reason: String,
}

/// The replica phases, in the order a replica goes through them.
/// Rollout states a workload can show (see `rollout`).
const ROLLOUT_STATES: [&str; 6] = [
    "Progressing",
    "Canary",
    "Paused",
    "Complete",
    "Failed",
    "RolledBack",
];

pub struct Metrics {
    pub applies: Family<ResultLabel, Counter>,
    pub desired_published: Counter,
    /// Device keys read from the enrollment book, to seal secrets to.
    pub device_key_reads: Counter,
    pub mqtt_received: Family<KindLabel, Counter>,
    pub placements: Family<KindLabel, Counter>,
    pub scheduling: Histogram,
    pub events: Family<EventLabel, Counter>,
    devices: Family<StateLabel, Gauge>,
    devices_cordoned: Gauge,
    pub devices_mdns: Gauge,
    workloads: Gauge,
    replicas: Family<PhaseLabel, Gauge>,
    rollout_updated: Family<WorkloadLabel, Gauge>,
    rollout_total: Family<WorkloadLabel, Gauge>,
    rollout_state: Family<RolloutLabel, Gauge>,
    /// 1 while this hub leads (always, on sled), 0 while it stands by.
    pub leader: Gauge,
    /// Times this hub was elected leader.
    pub elections_won: Counter,
    /// Times this hub, standing by, read the store again after the leader wrote.
    pub standby_reloads: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            applies: Family::default(),
            desired_published: Counter::default(),
            device_key_reads: Counter::default(),
            mqtt_received: Family::default(),
            placements: Family::default(),
            // 10 µs to ~5 s: a scheduler run over a small fleet takes microseconds, a
            // large one milliseconds.
            scheduling: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                1e-5, 4.0, 10,
            )),
            events: Family::default(),
            devices: Family::default(),
            devices_cordoned: Gauge::default(),
            devices_mdns: Gauge::default(),
            workloads: Gauge::default(),
            replicas: Family::default(),
            rollout_updated: Family::default(),
            rollout_total: Family::default(),
            rollout_state: Family::default(),
            leader: Gauge::default(),
            elections_won: Counter::default(),
            standby_reloads: Counter::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "shoal_hub_leader",
            "1 while this hub leads the fleet, 0 while it stands by (hubs on etcd elect one)",
            self.leader.clone(),
        );
        r.register(
            "shoal_hub_elections_won",
            "Times this hub was elected leader",
            self.elections_won.clone(),
        );
        r.register(
            "shoal_hub_standby_reloads",
            "Times this hub, standing by, read the store again because the leader changed it",
            self.standby_reloads.clone(),
        );
        r.register(
            "shoal_hub_applies",
            "Manifests received, by result",
            self.applies.clone(),
        );
        r.register(
            "shoal_hub_desired_published",
            "Desired-state messages published to devices",
            self.desired_published.clone(),
        );
        r.register(
            "shoal_hub_device_key_reads",
            "Device keys read from the enrollment book to seal secrets to (each is kept a minute)",
            self.device_key_reads.clone(),
        );
        r.register(
            "shoal_hub_mqtt_messages_received",
            "MQTT messages the hub received, by kind (apply, hello, presence, status, logs, ingest: other replicas' batches)",
            self.mqtt_received.clone(),
        );
        r.register(
            "shoal_hub_placements",
            "Replicas the scheduler gave a device (kind=\"placed\") or moved to another (kind=\"moved\")",
            self.placements.clone(),
        );
        r.register_with_unit(
            "shoal_hub_scheduling_duration",
            "How long one scheduler run over the whole fleet took",
            prometheus_client::registry::Unit::Seconds,
            self.scheduling.clone(),
        );
        r.register(
            "shoal_hub_events",
            "Fleet events recorded (shoal get events), by type and reason",
            self.events.clone(),
        );
        r.register(
            "shoal_hub_devices",
            "Devices known to the hub, by state (online, offline, lost)",
            self.devices.clone(),
        );
        r.register(
            "shoal_hub_devices_cordoned",
            "Devices cordoned (taking no new replicas)",
            self.devices_cordoned.clone(),
        );
        r.register(
            "shoal_hub_devices_mdns",
            "Devices of this fleet the hub sees advertised over mDNS",
            self.devices_mdns.clone(),
        );
        r.register(
            "shoal_hub_workloads",
            "Workloads stored",
            self.workloads.clone(),
        );
        r.register(
            "shoal_hub_replicas",
            "Replicas by phase",
            self.replicas.clone(),
        );
        r.register(
            "shoal_hub_rollout_updated_replicas",
            "Replicas at the revision being rolled out (workloads with a rollout)",
            self.rollout_updated.clone(),
        );
        r.register(
            "shoal_hub_rollout_replicas",
            "Replicas the rollout must bring to its revision",
            self.rollout_total.clone(),
        );
        r.register(
            "shoal_hub_rollout_state",
            "1 for the state the workload's latest rollout is in",
            self.rollout_state.clone(),
        );
    }

    /// Counts scheduler runs; `took`: how long the fleet input that caused them took (the
    /// fleet reads no clock, so the shell times its inputs), shared among them.
    pub fn scheduled(&self, runs: &[SchedulingRun], took: std::time::Duration) {
        let each = took.as_secs_f64() / runs.len().max(1) as f64;
        for r in runs {
            self.scheduling.observe(each);
            for (kind, n) in [("placed", r.placed), ("moved", r.moved)] {
                if n > 0 {
                    self.placements
                        .get_or_create(&KindLabel { kind: kind.into() })
                        .inc_by(n as u64);
                }
            }
        }
    }

    /// Counts recorded events.
    pub fn recorded(&self, events: &[EventView]) {
        for e in events {
            self.events
                .get_or_create(&EventLabel {
                    r#type: e.kind.clone(),
                    reason: e.reason.clone(),
                })
                .inc();
        }
    }

    /// Recomputes the fleet gauges from the read models.
    pub fn refresh(&self, devices: &[DeviceView], workloads: &[WorkloadView], mdns: usize) {
        for state in ["online", "offline", "lost"] {
            let n = devices
                .iter()
                .filter(|d| {
                    state
                        == if d.lost {
                            "lost"
                        } else if d.online {
                            "online"
                        } else {
                            "offline"
                        }
                })
                .count();
            self.devices
                .get_or_create(&StateLabel {
                    state: state.into(),
                })
                .set(n as i64);
        }
        self.devices_cordoned
            .set(devices.iter().filter(|d| d.cordoned).count() as i64);
        self.devices_mdns.set(mdns as i64);
        self.workloads.set(workloads.len() as i64);
        for phase in Phase::ALL {
            let n = workloads
                .iter()
                .flat_map(|w| &w.replicas)
                .filter(|r| r.phase == phase)
                .count();
            self.replicas
                .get_or_create(&PhaseLabel {
                    phase: phase.to_string(),
                })
                .set(n as i64);
        }
        // Per workload: start from nothing, so deleted workloads leave no series behind.
        self.rollout_updated.clear();
        self.rollout_total.clear();
        self.rollout_state.clear();
        for w in workloads {
            let Some(r) = &w.rollout else { continue };
            let workload = WorkloadLabel {
                workload: w.name.clone(),
            };
            self.rollout_updated
                .get_or_create(&workload)
                .set(i64::from(r.updated));
            self.rollout_total
                .get_or_create(&workload)
                .set(i64::from(r.total));
            for state in ROLLOUT_STATES {
                self.rollout_state
                    .get_or_create(&RolloutLabel {
                        workload: w.name.clone(),
                        state: state.into(),
                    })
                    .set(i64::from(r.state == state));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use shoal_api::wire::views::{ReplicaView, RolloutView};

    #[test]
    fn gauges_follow_the_fleet_and_counters_add_up() {
        let m = Metrics::default();
        let mut reg = Registry::default();
        m.register(&mut reg);
        let devices: Vec<DeviceView> = serde_json::from_value(serde_json::json!([
            { "id": "a", "online": true, "lost": false, "cordoned": true },
            { "id": "b", "online": false, "lost": false },
            { "id": "c", "online": false, "lost": true },
        ]))
        .unwrap();
        let rep = |phase| ReplicaView {
            schedule: None,
            replica: 0,
            device: Some("a".into()),
            phase,
            restarts: 0,
            reason: None,
            exit_code: None,
            started_at_ms: None,
            backoff_ms: None,
            revision: "r2".into(),
            variant: "wasm".into(),
            healthy: None,
            devices: Vec::new(),
        };
        let web = WorkloadView {
            name: "web".into(),
            revision: "r2".into(),
            placement: "replicas".into(),
            desired: 2,
            ready: 1,
            replicas: vec![rep(Phase::Running), rep(Phase::Pending)],
            pending_reason: None,
            spec: None,
            rollout: Some(RolloutView {
                state: "Progressing".into(),
                revision: "r2".into(),
                previous_revision: Some("r1".into()),
                updated: 1,
                total: 2,
                reason: None,
                started_ms: 0,
                history: vec![],
            }),
            job: None,
        };
        m.refresh(&devices, &[web], 2);
        m.scheduled(
            &[SchedulingRun {
                placed: 2,
                moved: 1,
            }],
            std::time::Duration::from_micros(30),
        );
        let mut text = String::new();
        encode(&mut text, &reg).unwrap();
        for line in [
            "shoal_hub_devices{state=\"online\"} 1",
            "shoal_hub_devices{state=\"offline\"} 1",
            "shoal_hub_devices{state=\"lost\"} 1",
            "shoal_hub_devices_cordoned 1",
            "shoal_hub_replicas{phase=\"Running\"} 1",
            "shoal_hub_replicas{phase=\"Pending\"} 1",
            "shoal_hub_replicas{phase=\"Failed\"} 0",
            "shoal_hub_rollout_updated_replicas{workload=\"web\"} 1",
            "shoal_hub_rollout_replicas{workload=\"web\"} 2",
            "shoal_hub_rollout_state{workload=\"web\",state=\"Progressing\"} 1",
            "shoal_hub_rollout_state{workload=\"web\",state=\"Complete\"} 0",
            "shoal_hub_placements_total{kind=\"placed\"} 2",
            "shoal_hub_placements_total{kind=\"moved\"} 1",
            "shoal_hub_scheduling_duration_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // The workload goes: its rollout series go with it.
        m.refresh(&devices, &[], 2);
        let mut text = String::new();
        encode(&mut text, &reg).unwrap();
        assert!(!text.contains("workload=\"web\""), "{text}");
    }
}
