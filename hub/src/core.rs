//! The hub's state machine: workloads, devices, placement and per-device desired state.
//!
//! [`HubCore`] is owned by the hub's main loop (one owner, no locks). Each input (an accepted
//! manifest, a delete, a device's hello/presence/status) updates the state, persists it, and
//! returns the desired-state messages to publish. It does no network I/O itself, so it is
//! tested with [`crate::store::MemStore`].

use crate::scheduler::{self, Assignments, DeviceView as SchedDevice, Schedule};
use crate::store::{DeviceRecord, Store, StoreError};
use shoal_api::ids::{DeviceId, WorkloadName};
use shoal_api::messages::{now_ms, DesiredState, DesiredWorkload, DeviceStatus, Hello, Phase};
use shoal_api::views::{DeviceView, ReplicaView, WorkloadView};
use shoal_api::workload::{Placement, Workload};
use std::collections::{BTreeMap, BTreeSet};
use tracing::{info, info_span};

/// Live (not persisted) knowledge about a device.
#[derive(Debug, Default, Clone)]
struct Live {
    online: bool,
    status: Option<DeviceStatus>,
    /// When the hub last heard from the device (any message), or when it started.
    last_heard_ms: u64,
    /// When presence went offline (last will or clean leave).
    offline_since_ms: Option<u64>,
    /// Offline, or silent, for longer than the grace period: its replicas move.
    lost: bool,
}

pub struct HubCore<S: Store> {
    store: S,
    artifact_base: String,
    /// The HTTP port agents use when `artifact_base` is empty.
    artifact_port: Option<u16>,
    workloads: BTreeMap<WorkloadName, Workload>,
    devices: BTreeMap<DeviceId, DeviceRecord>,
    live: BTreeMap<DeviceId, Live>,
    schedule: Schedule,
    desired: BTreeMap<DeviceId, DesiredState>,
    /// Agents of this fleet currently advertised over mDNS: record full name → (device,
    /// addresses). Live only: mDNS re-announces after a hub restart.
    mdns: BTreeMap<String, (DeviceId, Vec<std::net::IpAddr>)>,
}

/// What happened to each workload of an accepted apply.
pub type ApplyOutcome = BTreeMap<String, String>;

impl<S: Store> HubCore<S> {
    /// Loads persisted state. `artifact_base` is the URL agents fetch blobs from.
    pub fn open(store: S, artifact_base: String) -> Result<Self, StoreError> {
        let snap = store.load()?;
        let mut core = Self {
            store,
            artifact_base,
            artifact_port: None,
            workloads: snap.workloads,
            devices: snap.devices,
            live: BTreeMap::new(),
            schedule: Schedule {
                assignments: snap.assignments,
                pending: BTreeMap::new(),
            },
            desired: snap.desired,
            mdns: BTreeMap::new(),
        };
        // Recompute pending reasons; assignments are stable, so this changes nothing placed.
        core.schedule = scheduler::schedule(
            &core.sched_devices(),
            &core.workload_list(),
            &core.schedule.assignments,
        );
        Ok(core)
    }

    /// Every device's current desired state (republished when the hub (re)connects, since
    /// a broker may have lost its retained messages).
    pub fn all_desired(&self) -> Vec<DesiredState> {
        self.desired.values().cloned().collect()
    }

    pub fn has_workload(&self, name: &WorkloadName) -> bool {
        self.workloads.contains_key(name)
    }

    /// Stores validated workloads (create or update), then reconciles.
    pub fn apply(
        &mut self,
        workloads: Vec<Workload>,
    ) -> Result<(ApplyOutcome, Vec<DesiredState>), StoreError> {
        let mut outcome = ApplyOutcome::new();
        for w in workloads {
            let verdict = match self.workloads.get(&w.name) {
                None => "created",
                Some(old) if *old == w => "unchanged",
                Some(_) => "configured",
            };
            if verdict != "unchanged" {
                self.store.put_workload(&w)?;
                info!(workload = %w.name, revision = %w.revision(), verdict, "workload stored");
                self.workloads.insert(w.name.clone(), w.clone());
            }
            outcome.insert(w.name.to_string(), verdict.to_string());
        }
        let publish = self.reconcile()?;
        Ok((outcome, publish))
    }

    /// Deletes a workload; `None` if it did not exist.
    pub fn delete(&mut self, name: &WorkloadName) -> Result<Option<Vec<DesiredState>>, StoreError> {
        if self.workloads.remove(name).is_none() {
            return Ok(None);
        }
        self.store.delete_workload(name)?;
        info!(workload = %name, "workload deleted");
        self.reconcile().map(Some)
    }

    /// A device announced itself (on every connect).
    pub fn hello(&mut self, hello: Hello) -> Result<Vec<DesiredState>, StoreError> {
        let id = hello.device_id.clone();
        let _span = info_span!("hello", device = %id).entered();
        let now = now_ms();
        let rec = match self.devices.get(&id) {
            Some(old) => DeviceRecord {
                hello,
                first_seen_ms: old.first_seen_ms,
                last_seen_ms: now,
                cordoned: old.cordoned,
            },
            None => {
                info!(arch = %hello.arch, labels = ?hello.labels, "device joined");
                DeviceRecord {
                    hello,
                    first_seen_ms: now,
                    last_seen_ms: now,
                    cordoned: false,
                }
            }
        };
        self.store.put_device(&rec)?;
        self.devices.insert(id.clone(), rec);
        // A device that says hello is connected, whatever order hello and presence arrive in.
        let live = self.live.entry(id.clone()).or_default();
        live.online = true;
        live.offline_since_ms = None;
        self.heard(&id, now);
        let mut out = self.reconcile()?;
        // A device that joins with no desired state yet still gets an (empty) one, so it
        // knows it is in sync; and a device whose desired state exists gets it again.
        if !out.iter().any(|d| d.device_id == id) {
            let d = match self.desired.get(&id) {
                Some(d) => d.clone(),
                None => self.bump(&id, Vec::new())?,
            };
            out.push(d);
        }
        Ok(out)
    }

    /// Presence changed (`online`, or `offline` from the device or its last will).
    pub fn presence(
        &mut self,
        id: &DeviceId,
        online: bool,
    ) -> Result<Vec<DesiredState>, StoreError> {
        let now = now_ms();
        let live = self.live.entry(id.clone()).or_default();
        if live.online == online {
            return Ok(Vec::new());
        }
        live.online = online;
        live.offline_since_ms = (!online).then_some(now);
        info!(device = %id, online, "device presence changed");
        if let Some(rec) = self.devices.get_mut(id) {
            rec.last_seen_ms = now;
        }
        if online {
            self.heard(id, now);
        }
        self.reconcile()
    }

    /// The device spoke: it is not lost (any more).
    fn heard(&mut self, id: &DeviceId, now: u64) {
        let live = self.live.entry(id.clone()).or_default();
        live.last_heard_ms = now;
        if live.lost {
            live.lost = false;
            info!(device = %id, "lost device is back");
        }
    }

    /// Marks devices lost that have been offline, or silent, for longer than `grace_ms`, and
    /// reschedules their replicas. Call it periodically with the current time.
    pub fn check_lost(&mut self, now: u64, grace_ms: u64) -> Result<Vec<DesiredState>, StoreError> {
        let mut changed = false;
        for id in self.devices.keys() {
            let live = self.live.entry(id.clone()).or_insert_with(|| Live {
                last_heard_ms: now,
                ..Live::default()
            });
            if live.lost {
                continue;
            }
            // Offline (last will or leave): lost after the grace period. Online but silent:
            // agents send their status every STATUS_PERIOD_MS, so silence counts only past
            // three of those, even with a shorter grace.
            let (since, limit) = match live.offline_since_ms {
                Some(t) => (t, grace_ms),
                None => (
                    live.last_heard_ms,
                    grace_ms.max(3 * shoal_api::messages::STATUS_PERIOD_MS),
                ),
            };
            if now.saturating_sub(since) > limit {
                live.lost = true;
                changed = true;
                let why = if live.online { "silent" } else { "offline" };
                info!(device = %id, why, grace_ms, "device lost; rescheduling its replicas");
            }
        }
        if changed {
            self.reconcile()
        } else {
            Ok(Vec::new())
        }
    }

    /// `shoal cordon` / `uncordon`: whether the device takes new replicas. `None`: unknown
    /// device.
    pub fn cordon(
        &mut self,
        id: &DeviceId,
        cordoned: bool,
    ) -> Result<Option<Vec<DesiredState>>, StoreError> {
        let Some(rec) = self.devices.get_mut(id) else {
            return Ok(None);
        };
        if rec.cordoned != cordoned {
            rec.cordoned = cordoned;
            let rec = rec.clone();
            self.store.put_device(&rec)?;
            info!(device = %id, cordoned, "device cordon changed");
        }
        self.reconcile().map(Some)
    }

    /// `shoal drain`: cordon, then move every replica off the device except `placement:
    /// every` ones (which belong to it).
    pub fn drain(&mut self, id: &DeviceId) -> Result<Option<Vec<DesiredState>>, StoreError> {
        if !self.devices.contains_key(id) {
            return Ok(None);
        }
        if let Some(rec) = self.devices.get_mut(id) {
            rec.cordoned = true;
            let rec = rec.clone();
            self.store.put_device(&rec)?;
        }
        for (name, placed) in self.schedule.assignments.iter_mut() {
            if self
                .workloads
                .get(name)
                .is_some_and(|w| w.placement != Placement::Every)
            {
                placed.retain(|_, d| d != id);
            }
        }
        info!(device = %id, "device drained");
        self.reconcile().map(Some)
    }

    /// A device reported what it runs.
    pub fn status(&mut self, status: DeviceStatus) {
        let id = status.device_id.clone();
        let now = now_ms();
        if let Some(rec) = self.devices.get_mut(&id) {
            rec.last_seen_ms = now;
        }
        self.live.entry(id.clone()).or_default().status = Some(status);
        self.heard(&id, now);
    }

    fn workload_list(&self) -> Vec<Workload> {
        self.workloads.values().cloned().collect()
    }

    fn sched_devices(&self) -> Vec<SchedDevice> {
        self.devices
            .values()
            .map(|r| {
                let live = self.live.get(&r.hello.device_id);
                SchedDevice {
                    id: r.hello.device_id.clone(),
                    labels: r.hello.labels.clone(),
                    runtimes: r.hello.runtimes.iter().cloned().collect(),
                    memory: r.hello.memory,
                    cpu_millis: u64::from(r.hello.cpus) * 1000,
                    max_replicas: r.hello.max_replicas,
                    online: live.is_some_and(|l| l.online),
                    lost: live.is_some_and(|l| l.lost),
                    cordoned: r.cordoned,
                }
            })
            .collect()
    }

    /// Re-runs placement and returns the desired states that changed (already persisted, with
    /// bumped generations).
    fn reconcile(&mut self) -> Result<Vec<DesiredState>, StoreError> {
        let next = scheduler::schedule(
            &self.sched_devices(),
            &self.workload_list(),
            &self.schedule.assignments,
        );
        if next.assignments != self.schedule.assignments {
            self.store.put_assignments(&next.assignments)?;
        }
        for (w, p) in &next.pending {
            if self.schedule.pending.get(w) != Some(p) {
                info!(workload = %w, reason = %p.reason, "replicas pending");
            }
        }
        self.schedule = next;

        let mut per_device: BTreeMap<DeviceId, Vec<DesiredWorkload>> = BTreeMap::new();
        for (name, replicas) in &self.schedule.assignments {
            let Some(w) = self.workloads.get(name) else {
                continue;
            };
            for (&replica, dev) in replicas {
                if let Some(dw) = DesiredWorkload::from_workload(w, replica) {
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
                changed.push(self.bump(&dev, want)?);
            }
        }
        self.store.flush()?;
        Ok(changed)
    }

    fn bump(
        &mut self,
        dev: &DeviceId,
        workloads: Vec<DesiredWorkload>,
    ) -> Result<DesiredState, StoreError> {
        let generation = self.desired.get(dev).map_or(0, |d| d.generation) + 1;
        let d = DesiredState {
            protocol: shoal_api::PROTOCOL_VERSION,
            device_id: dev.clone(),
            generation,
            artifact_base: self.artifact_base.clone(),
            artifact_port: self.artifact_port,
            workloads,
        };
        self.store.put_desired(&d)?;
        self.store.flush()?;
        info!(device = %dev, generation, replicas = d.workloads.len(), "desired state changed");
        self.desired.insert(dev.clone(), d.clone());
        Ok(d)
    }

    /// With an empty artifact base, agents fetch from the hub's address they know, on `port`.
    pub fn set_artifact_port(&mut self, port: Option<u16>) {
        self.artifact_port = port;
    }

    /// An agent's mDNS record appeared or changed.
    pub fn mdns_seen(&mut self, fullname: String, device: DeviceId, addrs: Vec<std::net::IpAddr>) {
        if self.mdns.get(&fullname).is_none_or(|(d, _)| d != &device) {
            info!(%device, ?addrs, "device seen over mdns");
        }
        self.mdns.insert(fullname, (device, addrs));
    }

    /// An agent's mDNS record said goodbye or expired.
    pub fn mdns_gone(&mut self, fullname: &str) {
        if let Some((device, _)) = self.mdns.remove(fullname) {
            info!(%device, "device no longer advertised over mdns");
        }
    }

    /// How many distinct devices of the fleet are advertised over mDNS.
    pub fn mdns_devices(&self) -> usize {
        self.mdns
            .values()
            .map(|(d, _)| d)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    }

    pub fn device_views(&self) -> Vec<DeviceView> {
        self.devices
            .values()
            .map(|r| {
                let id = &r.hello.device_id;
                let live = self.live.get(id).cloned().unwrap_or_default();
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
                    arch: r.hello.arch.clone(),
                    os: r.hello.os.clone(),
                    runtimes: r.hello.runtimes.clone(),
                    cpus: r.hello.cpus,
                    memory: r.hello.memory,
                    memory_allocated: placed.iter().map(|w| w.resources.memory).sum(),
                    labels: r.hello.labels.clone(),
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

    fn view(&self, w: &Workload, with_spec: bool) -> WorkloadView {
        let revision = w.revision();
        let placed = self
            .schedule
            .assignments
            .get(&w.name)
            .cloned()
            .unwrap_or_default();
        let pending = self.schedule.pending.get(&w.name);
        let mut replicas: Vec<ReplicaView> = placed
            .iter()
            .map(|(&replica, dev)| self.replica_view(w, &revision, replica, dev))
            .collect();
        if let Some(p) = pending {
            for &replica in &p.replicas {
                replicas.push(ReplicaView {
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
            ready: replicas
                .iter()
                .filter(|r| r.phase == Phase::Running && r.revision == revision)
                .count() as u32,
            replicas,
            pending_reason: pending.map(|p| p.reason.clone()),
            spec: with_spec.then(|| w.clone()),
        }
    }

    fn replica_view(
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

    /// Assignments as placed now (for tests and metrics).
    pub fn assignments(&self) -> &Assignments {
        &self.schedule.assignments
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;
    use shoal_api::workload::parse_workloads;

    fn hello(id: &str, labels: &[(&str, &str)]) -> Hello {
        Hello {
            protocol: 1,
            device_id: DeviceId::try_from(id).unwrap(),
            arch: "x86_64".into(),
            os: "linux".into(),
            runtimes: vec!["wasm".into()],
            cpus: 2,
            memory: 512 << 20,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            agent_version: "test".into(),
            max_replicas: None,
        }
    }

    const M: &str = r#"
apiVersion: shoal.dev/v1
kind: Workload
metadata: { name: web }
spec:
  replicas: 2
  wasm: { module: "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" }
---
apiVersion: shoal.dev/v1
kind: Workload
metadata: { name: sensor }
spec:
  placement: every
  selector: { role: sensor }
  wasm: { module: "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" }
"#;

    fn placed(hub: &HubCore<MemStore>, w: &str) -> Vec<String> {
        hub.assignments()[&WorkloadName::try_from(w).unwrap()]
            .values()
            .map(|d| d.to_string())
            .collect()
    }

    #[test]
    fn lost_devices_are_rescheduled_and_return_without_churn() {
        let grace = 30_000;
        let mut hub = HubCore::open(MemStore::default(), "http://h".into()).unwrap();
        hub.hello(hello("a", &[("role", "sensor")])).unwrap();
        hub.hello(hello("b", &[("role", "sensor")])).unwrap();
        hub.apply(parse_workloads(M).unwrap()).unwrap();
        assert_eq!(placed(&hub, "web"), ["a", "b"]);
        let a: DeviceId = "a".parse().unwrap();
        hub.presence(&a, false).unwrap();
        // Within the grace period nothing moves.
        assert!(hub
            .check_lost(now_ms() + grace / 2, grace)
            .unwrap()
            .is_empty());
        assert_eq!(placed(&hub, "web"), ["a", "b"]);
        // Past it (b keeps reporting), a's `web` replica moves to b; its `sensor` (every)
        // replica stays.
        let later = now_ms() + grace + 1;
        let beat = |hub: &mut HubCore<MemStore>, id: &str, at: u64| {
            hub.status(DeviceStatus {
                protocol: 1,
                device_id: id.parse().unwrap(),
                observed_generation: 0,
                workloads: vec![],
                time_ms: at,
            });
            hub.live
                .get_mut(&id.parse::<DeviceId>().unwrap())
                .unwrap()
                .last_heard_ms = at;
        };
        beat(&mut hub, "b", later);
        let publish = hub.check_lost(later, grace).unwrap();
        assert_eq!(placed(&hub, "web"), ["b", "b"]);
        assert_eq!(placed(&hub, "sensor"), ["a", "b"]);
        let to_a = publish
            .iter()
            .find(|d| d.device_id == a)
            .expect("a's desired state changes");
        assert!(
            to_a.workloads.iter().all(|w| w.name.as_str() == "sensor"),
            "{to_a:?}"
        );
        assert!(hub.device_views().iter().any(|d| d.id == "a" && d.lost));
        // a comes back: it is no longer lost, and nothing moves back (no churn).
        hub.hello(hello("a", &[("role", "sensor")])).unwrap();
        assert!(hub.device_views().iter().any(|d| d.id == "a" && !d.lost));
        assert_eq!(placed(&hub, "web"), ["b", "b"]);
        // An online device that stops reporting is lost too.
        beat(&mut hub, "a", later + grace);
        let b_silent = hub.check_lost(later + grace + 1, grace).unwrap();
        assert!(!b_silent.is_empty(), "silent devices are lost");
        assert_eq!(placed(&hub, "web"), ["a", "a"]);
    }

    #[test]
    fn cordon_and_drain() {
        let mut hub = HubCore::open(MemStore::default(), "http://h".into()).unwrap();
        hub.hello(hello("a", &[("role", "sensor")])).unwrap();
        hub.hello(hello("b", &[])).unwrap();
        let a: DeviceId = "a".parse().unwrap();
        hub.cordon(&a, true).unwrap().unwrap();
        hub.apply(parse_workloads(M).unwrap()).unwrap();
        assert_eq!(
            placed(&hub, "web"),
            ["b", "b"],
            "cordoned a takes nothing new"
        );
        assert!(placed(&hub, "sensor").is_empty());
        hub.cordon(&a, false).unwrap().unwrap();
        assert_eq!(placed(&hub, "sensor"), ["a"]);
        assert_eq!(
            placed(&hub, "web"),
            ["b", "b"],
            "uncordon does not move running replicas"
        );
        hub.drain(&"b".parse().unwrap()).unwrap().unwrap();
        assert_eq!(placed(&hub, "web"), ["a", "a"]);
        assert!(hub
            .cordon(&"nope".parse().unwrap(), true)
            .unwrap()
            .is_none());
    }

    #[test]
    fn apply_places_and_bumps_generations() {
        let mut hub = HubCore::open(MemStore::default(), "http://h".into()).unwrap();
        let a = hub.hello(hello("a", &[("role", "sensor")])).unwrap();
        assert_eq!(
            a.len(),
            1,
            "a joining device gets its (empty) desired state"
        );
        hub.hello(hello("b", &[])).unwrap();
        let (outcome, publish) = hub.apply(parse_workloads(M).unwrap()).unwrap();
        assert_eq!(outcome["web"], "created");
        let by_dev: BTreeMap<String, &DesiredState> = publish
            .iter()
            .map(|d| (d.device_id.to_string(), d))
            .collect();
        assert_eq!(by_dev["a"].workloads.len(), 2, "web-0 + sensor");
        assert_eq!(by_dev["b"].workloads.len(), 1, "web-1");
        assert_eq!(by_dev["a"].generation, 2);

        // Re-applying the same manifest changes nothing and publishes nothing.
        let (outcome, publish) = hub.apply(parse_workloads(M).unwrap()).unwrap();
        assert_eq!(outcome["web"], "unchanged");
        assert!(publish.is_empty());

        // A device joining later gets the `every` workload.
        let c = hub.hello(hello("c", &[("role", "sensor")])).unwrap();
        let c = c.iter().find(|d| d.device_id.as_str() == "c").unwrap();
        assert_eq!(c.workloads.len(), 1);
        assert_eq!(c.workloads[0].name.as_str(), "sensor");

        // Delete removes it everywhere.
        let publish = hub
            .delete(&WorkloadName::try_from("sensor").unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(publish.len(), 2, "a and c");
        assert!(publish
            .iter()
            .all(|d| d.workloads.iter().all(|w| w.name.as_str() != "sensor")));
        assert!(hub
            .delete(&WorkloadName::try_from("sensor").unwrap())
            .unwrap()
            .is_none());
    }

    #[test]
    fn devices_seen_over_mdns_are_marked_until_they_leave() {
        let mut hub = HubCore::open(MemStore::default(), "http://h".into()).unwrap();
        hub.hello(hello("a", &[])).unwrap();
        hub.hello(hello("b", &[])).unwrap();
        let ip: std::net::IpAddr = "10.0.0.7".parse().unwrap();
        hub.mdns_seen(
            "a._shoal-agent._tcp.local.".into(),
            "a".parse().unwrap(),
            vec![ip],
        );
        // A record not (yet) matching a joined device is counted, not shown.
        hub.mdns_seen(
            "c._shoal-agent._tcp.local.".into(),
            "c".parse().unwrap(),
            vec![ip],
        );
        let views = hub.device_views();
        let addrs = |id: &str| {
            views
                .iter()
                .find(|d| d.id == id)
                .unwrap()
                .mdns_addresses
                .clone()
        };
        assert_eq!(addrs("a"), ["10.0.0.7"]);
        assert!(addrs("b").is_empty());
        assert_eq!(hub.mdns_devices(), 2);
        hub.mdns_gone("a._shoal-agent._tcp.local.");
        assert!(hub
            .device_views()
            .iter()
            .all(|d| d.mdns_addresses.is_empty()));
        assert_eq!(hub.mdns_devices(), 1);
    }

    #[test]
    fn state_survives_reopen() {
        let store = std::sync::Arc::new(MemStore::default());
        struct Shared(std::sync::Arc<MemStore>);
        impl Store for Shared {
            fn load(&self) -> Result<crate::store::Snapshot, StoreError> {
                self.0.load()
            }
            fn put_workload(&self, w: &Workload) -> Result<(), StoreError> {
                self.0.put_workload(w)
            }
            fn delete_workload(&self, n: &WorkloadName) -> Result<(), StoreError> {
                self.0.delete_workload(n)
            }
            fn put_device(&self, d: &DeviceRecord) -> Result<(), StoreError> {
                self.0.put_device(d)
            }
            fn put_assignments(&self, a: &Assignments) -> Result<(), StoreError> {
                self.0.put_assignments(a)
            }
            fn put_desired(&self, d: &DesiredState) -> Result<(), StoreError> {
                self.0.put_desired(d)
            }
            fn flush(&self) -> Result<(), StoreError> {
                Ok(())
            }
        }
        let mut hub = HubCore::open(Shared(store.clone()), "x".into()).unwrap();
        hub.hello(hello("a", &[])).unwrap();
        hub.apply(parse_workloads(M).unwrap()).unwrap();
        let before = hub.all_desired();
        let hub2 = HubCore::open(Shared(store), "x".into()).unwrap();
        assert_eq!(hub2.all_desired(), before);
        assert_eq!(hub2.assignments(), hub.assignments());
    }
}
