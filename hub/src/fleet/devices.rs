//! Devices: hello, presence, loss, enrollment grants, labels, cordon, drain, revocation,
//! and the agents seen over mDNS.

use super::records::DeviceRecord;
use super::rollout::Observed;
use super::*;
use shoal_api::model::ids::{DeviceId, Digest, WorkloadName};
use shoal_api::model::labels::{self, Grant, LabelChange, LabelError, Labels, Meta};
use shoal_api::model::workload::Placement;
use shoal_api::wire::messages::{DesiredState, Hello, Phase};
use tracing::{info, info_span, warn};

/// Why a device may not download a blob.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchRefusal {
    #[error("device {:?} is not known to the hub", .0.as_str())]
    UnknownDevice(DeviceId),
    #[error("blob {digest:?} is not in device {device:?}'s desired state")]
    NotDesired { device: String, digest: String },
}

/// Why `shoal label device` changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelRefusal {
    #[error("device {:?} is not known to the hub (it has neither enrolled nor connected)", .0.as_str())]
    UnknownDevice(DeviceId),
    #[error(transparent)]
    Invalid(#[from] LabelError),
}

impl Fleet {
    /// A device announced itself (on every connect). A hello with values no real device has
    /// is refused (logged, nothing changes). The labels it asks for steer nothing unless the
    /// operator granted the same (see [`shoal_api::model::labels`]).
    pub fn hello(&mut self, hello: Hello, now: u64) -> Vec<DesiredState> {
        let id = hello.device_id.clone();
        let _span = info_span!("hello", device = %id).entered();
        if let Err(e) = shoal_api::wire::report::check_hello(&hello) {
            warn!(error = %e, "hello refused");
            return Vec::new();
        }
        let rec = match self.devices.get(&id) {
            Some(old) => DeviceRecord {
                first_seen_ms: old.first_seen_ms,
                last_seen_ms: now,
                cordoned: old.cordoned,
                draining: old.draining,
                granted_by: old.granted_by.clone(),
                // What the device reported before it was upgraded, never what it says now.
                // Never what the device says now: a record without labels of its own keeps
                // none (see `adopt_reported_labels`).
                labels: old.labels.clone(),
                annotations: old.annotations.clone(),
                hello,
            },
            None => {
                info!(arch = %hello.arch, "device joined");
                DeviceRecord {
                    hello,
                    first_seen_ms: now,
                    last_seen_ms: now,
                    cordoned: false,
                    draining: false,
                    labels: Some(Labels::new()),
                    granted_by: None,
                    annotations: Labels::new(),
                }
            }
        };
        let asked = labels::ungranted(&rec.hello.labels, &self.labels_of(&rec));
        if !asked.is_empty() {
            info!(labels = ?asked, "device asks for labels the operator has not granted: they steer nothing (shoal label device, or token create --labels)");
        }
        self.changes.put_device(&rec);
        self.devices.insert(id.clone(), rec);
        // A device that says hello is connected, whatever order hello and presence arrive in.
        let live = self.live.entry(id.clone()).or_default();
        live.online = true;
        live.offline_since_ms = None;
        self.heard(&id, now);
        // Placement can only change if there is something to place.
        let mut out = if self.workloads.is_empty() {
            Vec::new()
        } else {
            self.reconcile()
        };
        // A device that joins with no desired state yet still gets an (empty) one, so it
        // knows it is in sync; and a device whose desired state exists gets it again.
        if !out.iter().any(|d| d.device_id == id) {
            // A replica with `stopAfter` that its agent stopped for want of contact runs
            // again only on a desired state newer than the one it stopped under: one
            // issued now, after the hub heard the device (see `model::disconnect`).
            let fenced = self
                .desired
                .get(&id)
                .is_some_and(|d| d.workloads.iter().any(|w| w.stop_after_ms.is_some()));
            let d = match self.desired.get(&id) {
                Some(d) if fenced => {
                    let workloads = d.workloads.clone();
                    self.bump(&id, workloads)
                }
                Some(d) => d.clone(),
                None => self.bump(&id, Vec::new()),
            };
            out.push(d);
        }
        out
    }

    /// Presence changed (`online`, or `offline` from the device or its last will).
    pub fn presence(&mut self, id: &DeviceId, online: bool, now: u64) -> Vec<DesiredState> {
        let live = self.live.entry(id.clone()).or_default();
        if live.online == online {
            return Vec::new();
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
        // Placement can only change if there is something to place.
        if self.workloads.is_empty() {
            return Vec::new();
        }
        self.reconcile()
    }

    /// The device spoke: it is not lost (any more).
    pub(super) fn heard(&mut self, id: &DeviceId, now: u64) {
        let live = self.live.entry(id.clone()).or_default();
        live.last_heard_ms = now;
        if live.lost {
            live.lost = false;
            info!(device = %id, "lost device is back");
        }
        live.lost_for.clear();
    }

    /// Marks devices lost that have been offline, or silent, for longer than `grace_ms`, and
    /// reschedules their replicas. Call it periodically with the current time.
    pub fn check_lost(&mut self, now: u64, grace_ms: u64) -> Vec<DesiredState> {
        let mut changed = self.check_lost_for(now, grace_ms);
        // A device that enrolled and never connected has no replicas to move.
        for id in self
            .devices
            .values()
            .filter(|r| r.last_seen_ms > 0)
            .map(|r| &r.hello.device_id)
        {
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
                    grace_ms.max(3 * shoal_api::wire::messages::STATUS_PERIOD_MS),
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
            Vec::new()
        }
    }

    /// Workloads with their own `spec.disconnect.lostAfter`: a device not heard from for
    /// that long (by the last time it spoke, whatever its presence says) is lost for them.
    /// With `stopAfter`, the short wait holds only once the device has confirmed (its
    /// status's generation) the desired state that tells it to stop: until then, as during
    /// a rollout or on an agent that knows no `stopAfter`, it is waited for at least as
    /// long as for any workload. `true`: something changed.
    fn check_lost_for(&mut self, now: u64, grace_ms: u64) -> bool {
        let own: Vec<(&WorkloadName, u64, Option<u64>)> = self
            .workloads
            .values()
            .filter_map(|w| {
                let d = w.disconnect.filter(|d| d.replace)?;
                Some((&w.name, d.lost_after_ms?, d.stop_after_ms))
            })
            .collect();
        let default_wait = grace_ms.max(3 * shoal_api::wire::messages::STATUS_PERIOD_MS);
        let mut changed = false;
        for (id, live) in self.live.iter_mut() {
            let desired = self.desired.get(id);
            let acked = live.status.as_ref().map(|s| s.observed_generation);
            let confirmed = |name: &WorkloadName, stop: u64| {
                desired.is_some_and(|d| {
                    acked == Some(d.generation)
                        && d.workloads
                            .iter()
                            .any(|w| &w.name == name && w.stop_after_ms == Some(stop))
                })
            };
            // Not heard since this hub started: counted from when it went offline, if it
            // did (`check_lost` starts the others' clocks at its first run).
            let since = match (live.last_heard_ms, live.offline_since_ms) {
                (0, Some(t)) => t,
                (0, None) => continue,
                (t, _) => t,
            };
            let silent = now.saturating_sub(since);
            for (name, lost_after, stop_after) in &own {
                let after = match stop_after {
                    Some(stop) if !confirmed(name, *stop) => (*lost_after).max(default_wait),
                    _ => *lost_after,
                };
                if silent > after && !live.lost_for.contains(*name) {
                    info!(device = %id, workload = %name, silent_ms = silent, "device lost for this workload (its spec.disconnect.lostAfter passed)");
                    live.lost_for.insert((*name).clone());
                    changed = true;
                }
            }
        }
        changed
    }

    /// A device enrolled (or enrolled again, with a new key): what its join token granted
    /// (read from the enrollment book, see [`Fleet::apply_grants`]) is applied, and its
    /// desired state is issued anew, to be sealed to its new key.
    pub fn enrolled(&mut self, id: &DeviceId, grant: Option<Grant>, now: u64) -> Vec<DesiredState> {
        let mut out = self.apply_grants(vec![(id.clone(), grant)], now);
        if !out.iter().any(|d| &d.device_id == id) {
            out.extend(self.reissue(id));
        }
        out
    }

    /// Applies join-token grants (from the enrollment book, whose records only the hub's
    /// enrollment writes), each once: a device the hub did not know is recorded (it shows
    /// before it connects, and can be labelled); a fresh grant (an unbound token, a new
    /// identity) replaces the labels the id had, a bound one adds to them. One placement run
    /// for all.
    pub fn apply_grants(
        &mut self,
        grants: Vec<(DeviceId, Option<Grant>)>,
        now: u64,
    ) -> Vec<DesiredState> {
        let mut changed = false;
        for (id, grant) in grants {
            let known = self.devices.contains_key(&id);
            // A notice without a grant in the book names nothing to record: a device enrolls
            // only with a token, and every claim writes a grant.
            if !known && grant.is_none() {
                continue;
            }
            let rec = self
                .devices
                .entry(id.clone())
                .or_insert_with(|| DeviceRecord {
                    hello: Hello::announcing(id.clone()),
                    first_seen_ms: now,
                    last_seen_ms: 0,
                    cordoned: false,
                    draining: false,
                    labels: Some(Labels::new()),
                    granted_by: None,
                    annotations: Labels::new(),
                });
            let fresh_grant = grant.filter(|g| rec.granted_by.as_deref() != Some(g.token.as_str()));
            if known && fresh_grant.is_none() {
                continue;
            }
            if let Some(g) = fresh_grant {
                let mut labels = match g.fresh {
                    true => Labels::new(),
                    false => rec.labels.clone().unwrap_or_default(),
                };
                labels.extend(g.labels);
                info!(device = %id, ?labels, token = %g.token, "labels granted by the join token");
                rec.labels = Some(labels);
                rec.granted_by = Some(g.token);
            }
            let rec = rec.clone();
            self.changes.put_device(&rec);
            changed = true;
        }
        if changed && !self.workloads.is_empty() {
            self.reconcile()
        } else {
            Vec::new()
        }
    }

    /// Whether `device` may download blob `digest`: only a module its desired state names.
    /// `Ok`: the architecture it reported (which bounds the precompiled targets it may ask
    /// for).
    pub fn may_fetch(&self, device: &DeviceId, digest: &Digest) -> Result<String, FetchRefusal> {
        let rec = self
            .devices
            .get(device)
            .ok_or_else(|| FetchRefusal::UnknownDevice(device.clone()))?;
        let named = self.desired.get(device).is_some_and(|d| {
            d.workloads
                .iter()
                .any(|w| w.module.as_ref() == Some(digest))
        });
        if named {
            Ok(rec.hello.arch.clone())
        } else {
            Err(FetchRefusal::NotDesired {
                device: device.to_string(),
                digest: digest.to_string(),
            })
        }
    }

    /// The labels placement sees for device `id`, if the hub knows it.
    pub fn labels_of_device(&self, id: &DeviceId) -> Option<Labels> {
        self.devices.get(id).map(|r| self.labels_of(r))
    }

    /// The device's labels or annotations, as `meta` says.
    pub fn meta_of_device(&self, id: &DeviceId, meta: Meta) -> Option<Labels> {
        match meta {
            Meta::Label => self.labels_of_device(id),
            Meta::Annotation => self.devices.get(id).map(|r| r.annotations.clone()),
        }
    }

    /// `shoal annotate device ID k=text k-`: the operators' notes on a device. Placement
    /// never reads them, so nothing is placed again.
    pub fn annotate(
        &mut self,
        id: &DeviceId,
        change: &LabelChange,
    ) -> Result<Vec<DesiredState>, LabelRefusal> {
        let Some(rec) = self.devices.get(id) else {
            return Err(LabelRefusal::UnknownDevice(id.clone()));
        };
        let next = change.apply_as(Meta::Annotation, &rec.annotations)?;
        if next != rec.annotations {
            info!(device = %id, keys = ?next.keys().collect::<Vec<_>>(), "device annotated");
            let mut rec = rec.clone();
            rec.annotations = next;
            self.changes.put_device(&rec);
            self.devices.insert(id.clone(), rec);
        }
        Ok(Vec::new())
    }

    /// `shoal label device ID k=v k-`: the operator changes the labels placement sees.
    pub fn label(
        &mut self,
        id: &DeviceId,
        change: &LabelChange,
    ) -> Result<Vec<DesiredState>, LabelRefusal> {
        let Some(rec) = self.devices.get(id) else {
            return Err(LabelRefusal::UnknownDevice(id.clone()));
        };
        let current = rec.labels.clone().unwrap_or_default();
        let next = change.apply(&current)?;
        if next == current {
            return Ok(Vec::new());
        }
        info!(device = %id, labels = ?next, "device labelled");
        let mut rec = rec.clone();
        rec.labels = Some(next);
        self.changes.put_device(&rec);
        self.devices.insert(id.clone(), rec);
        Ok(self.reconcile())
    }

    /// `shoal cordon` / `uncordon`: whether the device takes new replicas. `None`: unknown
    /// device.
    pub fn cordon(&mut self, id: &DeviceId, cordoned: bool) -> Option<Vec<DesiredState>> {
        let rec = self.devices.get_mut(id)?;
        if rec.cordoned != cordoned {
            rec.cordoned = cordoned;
            let rec = rec.clone();
            self.changes.put_device(&rec);
            info!(device = %id, cordoned, "device cordon changed");
        }
        Some(self.reconcile())
    }

    /// `shoal drain`: cordon the device and move its replicas elsewhere, except `placement:
    /// every` ones (which belong to it), within each workload's `maxUnavailable` (see
    /// [`Fleet::advance_drains`]).
    pub fn drain(&mut self, id: &DeviceId) -> Option<Vec<DesiredState>> {
        let rec = self.devices.get_mut(id)?;
        rec.cordoned = true;
        rec.draining = true;
        let rec = rec.clone();
        self.changes.put_device(&rec);
        info!(device = %id, "drain started");
        let mut out = self.reconcile();
        out.extend(self.advance_drains());
        Some(out)
    }

    /// The devices the enrollment book says are revoked, as of now: placement forgets them
    /// (their replicas move, their desired states empty). `None`: nothing changed.
    pub fn set_revoked(
        &mut self,
        revoked: std::collections::BTreeSet<DeviceId>,
    ) -> Option<Vec<DesiredState>> {
        if revoked == self.revoked {
            return None;
        }
        info!(devices = ?revoked, "revoked devices");
        self.revoked = revoked;
        Some(self.reconcile())
    }

    /// Whether the book says `id` is revoked.
    pub fn is_revoked(&self, id: &DeviceId) -> bool {
        self.revoked.contains(id)
    }

    /// Whether a drain is in progress.
    pub fn draining(&self) -> bool {
        self.devices.values().any(|r| r.draining)
    }

    /// Moves replicas off draining devices: per workload, only while fewer than its
    /// `maxUnavailable` replicas are unavailable (a replica that is itself unavailable moves
    /// at once), like a Kubernetes drain honouring disruption budgets. Call it as reports
    /// arrive; a device is done when none of its movable replicas is left.
    pub fn advance_drains(&mut self) -> Vec<DesiredState> {
        let draining: Vec<DeviceId> = self
            .devices
            .values()
            .filter(|r| r.draining)
            .map(|r| r.hello.device_id.clone())
            .collect();
        let mut evicted = false;
        for dev in draining {
            let names: Vec<WorkloadName> = self
                .schedule
                .assignments
                .iter()
                .filter(|(_, m)| m.values().any(|d| d == &dev))
                .map(|(n, _)| n.clone())
                .collect();
            let mut left = 0usize;
            for name in names {
                let Some(w) = self.workloads.get(&name) else {
                    continue;
                };
                if w.placement == Placement::Every {
                    continue;
                }
                // A rollout spends the same budget: the drain waits for it to finish.
                if self
                    .rollouts
                    .get(&name)
                    .and_then(|r| r.rollout.as_ref())
                    .is_some_and(|r| r.active())
                {
                    left += 1;
                    continue;
                }
                let wanted = match w.placement {
                    Placement::Replicas(n) => n,
                    Placement::Every => 0,
                };
                let budget_total = w.update.max_unavailable;
                let observed = self.observe(&name);
                let ready = |o: &Observed| o.phase == Phase::Running && o.healthy != Some(false);
                // Unplaced replicas are unavailable too, so a drain with nowhere to go
                // stops instead of evicting everything.
                let total = wanted.max(observed.len() as u32);
                let unavailable = observed.iter().filter(|o| !ready(o)).count() as u32
                    + total.saturating_sub(observed.len() as u32);
                let mut budget = budget_total.of(total).saturating_sub(unavailable);
                let mut evict = Vec::new();
                for o in observed.iter().filter(|o| o.device == dev) {
                    if !ready(o) {
                        evict.push(o.replica);
                    } else if budget > 0 {
                        budget -= 1;
                        evict.push(o.replica);
                    } else {
                        left += 1;
                    }
                }
                if let Some(placed) = self.schedule.assignments.get_mut(&name) {
                    for i in &evict {
                        placed.remove(i);
                    }
                }
                if !evict.is_empty() {
                    info!(device = %dev, workload = %name, replicas = ?evict, "draining: moving replicas");
                    evicted = true;
                }
            }
            if left == 0 {
                if let Some(rec) = self.devices.get_mut(&dev) {
                    rec.draining = false;
                    let rec = rec.clone();
                    self.changes.put_device(&rec);
                    info!(device = %dev, "drain complete");
                }
            }
        }
        if evicted {
            self.reconcile()
        } else {
            Vec::new()
        }
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
}
