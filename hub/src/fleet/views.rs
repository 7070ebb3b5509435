//! Read models (`shoal get`, `describe`, the dashboard): devices and workloads as the
//! operator sees them, built from the fleet's state.

use super::rollout::RolloutState;
use super::*;
use shoal_api::model::ids::{DeviceId, WorkloadName};
use shoal_api::model::labels::{self};
use shoal_api::model::workload::{Placement, Workload};
use shoal_api::wire::messages::{DesiredWorkload, Phase};
use shoal_api::wire::views::{DeviceView, ReplicaView, WorkloadView};
use std::collections::BTreeMap;

impl Fleet {
    pub fn device_views(&self) -> Vec<DeviceView> {
        self.devices
            .values()
            .map(|r| {
                let id = &r.hello.device_id;
                let live = self.live.get(id).cloned().unwrap_or_default();
                let labels = self.labels_of(r);
                let placed: Vec<&DesiredWorkload> = self
                    .desired
                    .get(id)
                    .map(|d| d.workloads.iter().collect())
                    .unwrap_or_default();
                DeviceView {
                    id: id.to_string(),
                    online: live.online,
                    lost: live.lost,
                    cordoned: r.cordoned,
                    revoked: self.revoked.contains(id),
                    arch: r.hello.arch.clone(),
                    os: r.hello.os.clone(),
                    runtimes: r.hello.runtimes.clone(),
                    cpus: r.hello.cpus,
                    memory: r.hello.memory,
                    memory_allocated: placed.iter().map(|w| w.resources.memory).sum(),
                    hardware: r.hello.devices.clone(),
                    hardware_allocated: placed.iter().fold(BTreeMap::new(), |mut m, w| {
                        for (class, n) in &w.devices {
                            *m.entry(class.to_string()).or_default() += n;
                        }
                        m
                    }),
                    allows: r
                        .hello
                        .allows
                        .iter()
                        .map(|p| p.name().to_string())
                        .collect(),
                    requested_labels: labels::ungranted(&r.hello.labels, &labels),
                    annotations: r.annotations.clone(),
                    labels,
                    agent_version: r.hello.agent_version.clone(),
                    last_seen_ms: r.last_seen_ms,
                    desired_generation: self.desired.get(id).map_or(0, |d| d.generation),
                    observed_generation: live.status.as_ref().map_or(0, |s| s.observed_generation),
                    replicas: placed.len(),
                    mdns_addresses: self
                        .mdns
                        .values()
                        .filter(|(d, _)| d == id)
                        .flat_map(|(_, a)| a.iter().map(|a| a.to_string()))
                        .collect(),
                }
            })
            .collect()
    }

    pub fn workload_views(&self) -> Vec<WorkloadView> {
        self.workloads
            .values()
            .map(|w| self.view(w, false))
            .collect()
    }

    pub fn workload_view(&self, name: &WorkloadName) -> Option<WorkloadView> {
        self.workloads.get(name).map(|w| self.view(w, true))
    }

    pub(super) fn view(&self, w: &Workload, with_spec: bool) -> WorkloadView {
        let revision = w.revision();
        let placed = self
            .schedule
            .assignments
            .get(&w.name)
            .cloned()
            .unwrap_or_default();
        let pending = self.schedule.pending.get(&w.name);
        let rollout = self.rollouts.get(&w.name).and_then(|r| r.rollout.as_ref());
        // Mid-rollout, a replica not yet replaced is expected on its earlier revision.
        let mut replicas: Vec<ReplicaView> = placed
            .iter()
            .map(|(&replica, dev)| {
                let expected = rollout
                    .and_then(|r| r.running.get(&replica))
                    .unwrap_or(&revision);
                self.replica_view(w, expected, replica, dev)
            })
            .collect();
        if let Some(p) = pending {
            for &replica in &p.replicas {
                replicas.push(ReplicaView {
                    schedule: None,
                    replica,
                    device: None,
                    phase: Phase::Pending,
                    restarts: 0,
                    reason: Some(format!("unschedulable: {}", p.reason)),
                    exit_code: None,
                    started_at_ms: None,
                    backoff_ms: None,
                    revision: String::new(),
                    variant: String::new(),
                    healthy: None,
                    devices: Vec::new(),
                });
            }
        }
        replicas.sort_by_key(|r| r.replica);
        let (placement, desired) = match w.placement {
            Placement::Replicas(n) => ("replicas", n),
            Placement::Every => ("every", placed.len() as u32),
        };
        WorkloadView {
            name: w.name.to_string(),
            revision: revision.clone(),
            placement: placement.to_string(),
            desired,
            // A replica shows its reported phase only on the revision it should run.
            ready: replicas
                .iter()
                .filter(|r| r.phase == Phase::Running)
                .count() as u32,
            replicas,
            pending_reason: pending.map(|p| p.reason.clone()),
            spec: with_spec.then(|| w.clone()),
            rollout: self.rollout_view(&w.name, &placed),
            job: self.job_view(w, placed.len() as u32),
        }
    }

    pub(super) fn rollout_view(
        &self,
        name: &WorkloadName,
        placed: &BTreeMap<u32, DeviceId>,
    ) -> Option<shoal_api::wire::views::RolloutView> {
        let rec = self.rollouts.get(name)?;
        let history = rec
            .history
            .iter()
            .map(|e| shoal_api::wire::views::RevisionView {
                revision: e.revision.clone(),
                applied_ms: e.applied_ms,
                outcome: e.outcome.clone(),
            })
            .collect();
        let r = rec.rollout.as_ref()?;
        Some(shoal_api::wire::views::RolloutView {
            state: r.state.to_string(),
            revision: r.revision.clone(),
            previous_revision: r.previous.as_ref().map(|p| p.revision()),
            updated: match r.state {
                RolloutState::RolledBack => 0,
                _ => placed.keys().filter(|i| r.spec_of(**i).is_none()).count() as u32,
            },
            total: placed.len() as u32,
            reason: r.reason.clone(),
            started_ms: r.started_ms,
            history,
        })
    }

    pub(super) fn replica_view(
        &self,
        w: &Workload,
        revision: &str,
        replica: u32,
        dev: &DeviceId,
    ) -> ReplicaView {
        let live = self.live.get(dev);
        let online = live.is_some_and(|l| l.online);
        let reported = live.and_then(|l| l.status.as_ref()).and_then(|s| {
            s.workloads
                .iter()
                .find(|i| i.name == w.name && i.replica == replica)
        });
        let mut v = ReplicaView {
            replica,
            device: Some(dev.to_string()),
            phase: Phase::Pending,
            restarts: 0,
            reason: None,
            exit_code: None,
            started_at_ms: None,
            backoff_ms: None,
            revision: String::new(),
            variant: String::new(),
            healthy: None,
            devices: Vec::new(),
            schedule: None,
        };
        match reported {
            Some(i) if i.revision == revision => {
                v.phase = i.phase;
                v.restarts = i.restarts;
                v.reason = i.reason.clone();
                v.exit_code = i.exit_code;
                v.started_at_ms = i.started_at_ms;
                v.backoff_ms = i.backoff_ms;
                v.revision = i.revision.clone();
                v.variant = i.variant.clone();
                v.healthy = i.healthy;
                // The device's word, bounded: shown to operators, trusted for nothing.
                v.devices = i
                    .devices
                    .iter()
                    .take(64)
                    .map(|d| d.chars().take(256).collect())
                    .collect();
                v.schedule = i.schedule.as_ref().map(|s| {
                    let mut s = s.clone();
                    // Bounded as the device keeps it.
                    let extra = s
                        .runs
                        .len()
                        .saturating_sub(shoal_api::model::schedule::HISTORY);
                    s.runs.drain(..extra);
                    for r in &mut s.runs {
                        r.outcome = r.outcome.chars().take(32).collect();
                    }
                    // Times a person's tools can print (before the year 10000).
                    const LAST_MS: u64 = 253_402_300_799_999;
                    s.next_ms = s.next_ms.filter(|t| *t <= LAST_MS);
                    s.runs.retain(|r| r.scheduled_ms <= LAST_MS);
                    for r in &mut s.runs {
                        r.finished_ms = r.finished_ms.filter(|t| *t <= LAST_MS);
                    }
                    s
                });
                if !online {
                    v.reason = Some(format!(
                        "device {dev} is offline; last reported {}",
                        i.phase
                    ));
                }
            }
            Some(i) => {
                v.revision = i.revision.clone();
                v.reason = Some(format!(
                    "device {dev} is updating from revision {} to {revision}",
                    i.revision
                ));
            }
            None if !online => v.reason = Some(format!("device {dev} is offline")),
            None => v.reason = Some(format!("waiting for device {dev} to start it")),
        }
        v
    }
}
