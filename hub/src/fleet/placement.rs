//! Placement: the only code that crosses the parts. It runs the scheduler over devices,
//! workloads and rollouts, and turns assignments into each device's desired state under a
//! new generation.

use super::scheduler::{self, Assignments, DeviceView as SchedDevice, Schedule};
use super::*;
use shoal_api::model::ids::{DeviceId, WorkloadName};
use shoal_api::model::workload::{Placement, Workload};
use shoal_api::wire::messages::{DesiredState, DesiredWorkload};
use std::collections::{BTreeMap, BTreeSet};
use tracing::info;

/// One run of the scheduler: how long it took and what it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulingRun {
    /// Replicas given a device they did not have.
    pub placed: usize,
    /// Replicas moved from one device to another.
    pub moved: usize,
}

/// Bounds the runs kept when nobody takes them.
const RUNS_KEPT: usize = 1024;

impl Fleet {
    /// The workloads as the scheduler places them: a job with a count asks for the
    /// replicas its run wants now.
    pub(super) fn workload_list(&self) -> Vec<Workload> {
        self.workloads
            .values()
            .map(|w| {
                let mut w = w.clone();
                if let (Placement::Replicas(_), Some(wants)) =
                    (&w.placement, self.job_wants(&w.name))
                {
                    w.placement = Placement::Replicas(wants.replicas);
                }
                w
            })
            .collect()
    }

    pub(super) fn sched_devices(&self) -> Vec<SchedDevice> {
        self.devices
            .values()
            .filter(|r| !self.revoked.contains(&r.hello.device_id))
            .map(|r| {
                let live = self.live.get(&r.hello.device_id);
                SchedDevice {
                    id: r.hello.device_id.clone(),
                    labels: self.labels_of(r),
                    runtimes: r.hello.runtimes.iter().cloned().collect(),
                    arch: r.hello.arch.clone(),
                    variant: r.hello.variant.clone(),
                    memory: r.hello.memory,
                    cpu_millis: u64::from(r.hello.cpus) * 1000,
                    max_replicas: r.hello.max_replicas,
                    hardware: r.hello.devices.clone(),
                    allows: r.hello.allows.iter().copied().collect(),
                    online: live.is_some_and(|l| l.online),
                    lost: live.is_some_and(|l| l.lost),
                    lost_for: live.map(|l| l.lost_for.clone()).unwrap_or_default(),
                    cordoned: r.cordoned,
                }
            })
            .collect()
    }

    /// Runs the scheduler over the current state, rollouts in progress included.
    pub(super) fn place(&self) -> Schedule {
        let mut inflight: std::collections::HashMap<&WorkloadName, scheduler::InFlight<'_>> = self
            .rollouts
            .iter()
            .filter_map(|(name, rec)| {
                let r = rec.rollout.as_ref()?;
                let earlier: BTreeMap<u32, &Workload> = r
                    .running
                    .keys()
                    .filter_map(|&i| Some((i, r.spec_of(i)?)))
                    .collect();
                (!earlier.is_empty() || r.extra() > 0).then_some((
                    name,
                    scheduler::InFlight {
                        earlier,
                        surge: r.extra(),
                        ..Default::default()
                    },
                ))
            })
            .collect();
        for name in self.jobs.keys() {
            if let Some(wants) = self.job_wants(name) {
                let f = inflight.entry(name).or_default();
                f.done = wants.done_replicas;
                f.done_devices = wants.done_devices;
                f.cap = wants.cap;
            }
        }
        scheduler::schedule_with(
            &self.sched_devices(),
            &self.workload_list(),
            &self.schedule.assignments,
            &inflight,
        )
    }

    /// Re-runs placement and returns the desired states that changed (already persisted, with
    /// bumped generations).
    pub(super) fn reconcile(&mut self) -> Vec<DesiredState> {
        let next = self.place();
        let (mut placed, mut moved) = (0, 0);
        for (name, replicas) in &next.assignments {
            let before = self.schedule.assignments.get(name);
            for (i, dev) in replicas {
                match before.and_then(|b| b.get(i)) {
                    None => placed += 1,
                    Some(d) if d != dev => moved += 1,
                    Some(_) => {}
                }
            }
        }
        if self.runs.len() < RUNS_KEPT {
            self.runs.push(SchedulingRun { placed, moved });
        }
        if next.assignments != self.schedule.assignments {
            self.changes.put_assignments(&next.assignments);
            // A replica that moved or went away no longer runs its earlier spec: it starts
            // afresh on the new revision.
            for (name, rec) in self.rollouts.iter_mut() {
                let Some(r) = rec.rollout.as_mut() else {
                    continue;
                };
                let (before, after) = (
                    self.schedule.assignments.get(name),
                    next.assignments.get(name),
                );
                let old = r.running.len();
                r.keep_only(|i| {
                    let dev = after.and_then(|m| m.get(&i));
                    dev.is_some() && dev == before.and_then(|m| m.get(&i))
                });
                if r.running.len() != old {
                    self.changes.put_rollout(name, Some(rec));
                }
            }
        }
        for (w, p) in &next.pending {
            if self.schedule.pending.get(w) != Some(p) {
                info!(workload = %w, reason = %p.reason, "replicas pending");
            }
        }
        self.schedule = next;
        self.prune_earlier_versions();

        let mut per_device: BTreeMap<DeviceId, Vec<DesiredWorkload>> = BTreeMap::new();
        // The operator's labels of each device a replica goes to (`SHOAL_LABEL_*`).
        let mut labels_by_device: BTreeMap<DeviceId, BTreeMap<String, String>> = BTreeMap::new();
        for (name, replicas) in &self.schedule.assignments {
            let Some(w) = self.workloads.get(name) else {
                continue;
            };
            let rollout = self.rollouts.get(name).and_then(|r| r.rollout.as_ref());
            for (&replica, dev) in replicas {
                let spec = rollout.and_then(|r| r.spec_of(replica)).unwrap_or(w);
                // WASM where the device can, else the container (the scheduler only places
                // a replica where one of them runs).
                let Some(variant) = self.devices.get(dev).and_then(|d| {
                    let permitted =
                        shoal_api::policy::fleet::permits(spec, |p| d.hello.allows.contains(&p));
                    spec.variant_for(
                        |r| {
                            d.hello.runtimes.iter().any(|x| x == r)
                                && (permitted || r != shoal_api::wire::messages::RUNTIME_CONTAINER)
                        },
                        &d.hello.arch,
                        d.hello.variant.as_deref(),
                    )
                }) else {
                    continue;
                };
                if let Some(mut dw) = DesiredWorkload::from_workload(spec, replica, variant) {
                    dw.job = self.job_run(spec);
                    let labels = labels_by_device.entry(dev.clone()).or_insert_with(|| {
                        self.devices
                            .get(dev)
                            .map(|r| self.labels_of(r))
                            .unwrap_or_default()
                    });
                    dw.place_on(dev, labels);
                    dw.read_configs(spec, |n| self.config_of(spec, n), dev, labels);
                    // The version the replica's revision pinned (specs stored before pins
                    // existed: the current one).
                    for m in &mut dw.secrets {
                        m.version = spec
                            .secrets_pinned
                            .get(&m.mount.name)
                            .cloned()
                            .or_else(|| Some(self.secrets.get(&m.mount.name)?.version.clone()))
                            .unwrap_or_default();
                    }
                    per_device.entry(dev.clone()).or_default().push(dw);
                }
            }
        }
        let mut changed = Vec::new();
        let devices: BTreeSet<DeviceId> = self
            .desired
            .keys()
            .chain(per_device.keys())
            .cloned()
            .collect();
        for dev in devices {
            let want = per_device.remove(&dev).unwrap_or_default();
            let same = self.desired.get(&dev).is_some_and(|d| d.workloads == want);
            if !same {
                changed.push(self.bump(&dev, want));
            }
        }
        changed
    }

    pub(super) fn bump(&mut self, dev: &DeviceId, workloads: Vec<DesiredWorkload>) -> DesiredState {
        let generation = self.desired.get(dev).map_or(0, |d| d.generation) + 1;
        let d = DesiredState {
            protocol: shoal_api::PROTOCOL_VERSION,
            device_id: dev.clone(),
            generation,
            artifact_base: self.artifact_base.clone(),
            artifact_port: self.artifact_port,
            workloads,
            // Sealed per device when published (see `crate::app::publish`).
            secrets: Vec::new(),
        };
        // Callers flush once for all the devices they change (before publishing).
        self.changes.put_desired(&d);
        info!(device = %dev, generation, replicas = d.workloads.len(), "desired state changed");
        self.desired.insert(dev.clone(), d.clone());
        d
    }

    /// Desired states that name another place to fetch blobs from than this hub's (stored
    /// by an earlier hub, or one with another `--public-url`), moved to this hub's under a
    /// new generation. Agents keep what runs: only the address changes.
    pub fn relocate_artifacts(&mut self) -> Vec<DesiredState> {
        let stale: Vec<(DeviceId, Vec<DesiredWorkload>)> = self
            .desired
            .values()
            .filter(|d| {
                d.artifact_base != self.artifact_base || d.artifact_port != self.artifact_port
            })
            .map(|d| (d.device_id.clone(), d.workloads.clone()))
            .collect();
        let mut moved = Vec::new();
        for (dev, workloads) in stale {
            moved.push(self.bump(&dev, workloads));
        }
        moved
    }

    /// With an empty artifact base, agents fetch from the hub's address they know, on `port`.
    pub fn set_artifact_port(&mut self, port: Option<u16>) {
        self.artifact_port = port;
    }

    /// The device's desired state again under a new generation, so that it is sealed anew
    /// (a device that enrolled again has a new key and cannot open what was sealed before).
    pub fn reissue(&mut self, dev: &DeviceId) -> Option<DesiredState> {
        match self.desired.get(dev) {
            Some(d) => {
                let workloads = d.workloads.clone();
                Some(self.bump(dev, workloads))
            }
            None => None,
        }
    }

    /// The scheduler runs since the last call.
    pub fn take_scheduling_runs(&mut self) -> Vec<SchedulingRun> {
        std::mem::take(&mut self.runs)
    }

    /// Assignments as placed now (for tests and metrics).
    pub fn assignments(&self) -> &Assignments {
        &self.schedule.assignments
    }
}
