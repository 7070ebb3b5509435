//! Fleet events (`shoal get events`, the dashboard): what changed, in words, with a time.
//!
//! Events are derived, not emitted from every code path: the main loop takes a [`Snapshot`]
//! of the read models (devices and workloads, as the API serves them) whenever something may
//! have changed, at most once per tick, and [`diff`] — a pure function — says what happened
//! between two snapshots: devices joining, going offline, lost, back, cordoned; replicas
//! placed, moved, started, restarted, failing, unhealthy; workloads created and deleted;
//! rollouts started, progressing, paused, done, failed or rolled back. A transition that
//! comes and goes within one tick is seen through its traces (a restart count that grew).
//!
//! The hub keeps the newest [`RING`] events in memory ([`Events`]); they are not persisted
//! (as in Kubernetes, events are a recent-history aid, not state).

use shoal_api::wire::messages::Phase;
use shoal_api::wire::views::{DeviceView, EventView, WorkloadView};
use std::collections::{BTreeMap, VecDeque};

/// How many events the hub keeps.
pub const RING: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Dev {
    online: bool,
    lost: bool,
    cordoned: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rep {
    device: Option<String>,
    phase: Phase,
    restarts: u32,
    healthy: Option<bool>,
    revision: String,
    reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Roll {
    state: String,
    revision: String,
    previous: Option<String>,
    updated: u32,
    total: u32,
    reason: Option<String>,
}

/// What events are computed from: the fleet as the read models show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    devices: BTreeMap<String, Dev>,
    /// workload → its revision.
    workloads: BTreeMap<String, String>,
    /// (workload, replica index) → what its device reports.
    replicas: BTreeMap<(String, u32), Rep>,
    rollouts: BTreeMap<String, Roll>,
}

impl Snapshot {
    pub fn of(devices: &[DeviceView], workloads: &[WorkloadView]) -> Self {
        let mut s = Snapshot::default();
        for d in devices {
            s.devices.insert(
                d.id.clone(),
                Dev {
                    online: d.online,
                    lost: d.lost,
                    cordoned: d.cordoned,
                },
            );
        }
        for w in workloads {
            s.workloads.insert(w.name.clone(), w.revision.clone());
            for r in &w.replicas {
                s.replicas.insert(
                    (w.name.clone(), r.replica),
                    Rep {
                        device: r.device.clone(),
                        phase: r.phase,
                        restarts: r.restarts,
                        healthy: r.healthy,
                        revision: r.revision.clone(),
                        reason: r.reason.clone(),
                    },
                );
            }
            if let Some(r) = &w.rollout {
                s.rollouts.insert(
                    w.name.clone(),
                    Roll {
                        state: r.state.clone(),
                        revision: r.revision.clone(),
                        previous: r.previous_revision.clone(),
                        updated: r.updated,
                        total: r.total,
                        reason: r.reason.clone(),
                    },
                );
            }
        }
        s
    }
}

/// An event before it gets its number and time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Happened {
    pub warning: bool,
    pub reason: &'static str,
    pub object: String,
    pub message: String,
}

fn normal(reason: &'static str, object: String, message: String) -> Happened {
    Happened {
        warning: false,
        reason,
        object,
        message,
    }
}

fn warning(reason: &'static str, object: String, message: String) -> Happened {
    Happened {
        warning: true,
        reason,
        object,
        message,
    }
}

fn short(revision: &str) -> &str {
    revision.get(..12).unwrap_or(revision)
}

/// What happened between `before` and `after`, in a stable order (devices, workloads,
/// replicas, rollouts).
pub fn diff(before: &Snapshot, after: &Snapshot) -> Vec<Happened> {
    let mut out = Vec::new();
    for (id, d) in &after.devices {
        let obj = format!("device/{id}");
        let Some(b) = before.devices.get(id) else {
            out.push(normal(
                "DeviceJoined",
                obj.clone(),
                format!("device {id} joined the fleet"),
            ));
            if !d.online {
                out.push(warning(
                    "DeviceOffline",
                    obj,
                    format!("device {id} is offline"),
                ));
            }
            continue;
        };
        if d.lost && !b.lost {
            out.push(warning(
                "DeviceLost",
                obj.clone(),
                format!("device {id} is lost (offline past the grace period): its replicas move elsewhere"),
            ));
        } else if !d.online && b.online {
            out.push(warning(
                "DeviceOffline",
                obj.clone(),
                format!("device {id} went offline"),
            ));
        }
        if d.online && !b.online {
            out.push(normal(
                "DeviceOnline",
                obj.clone(),
                format!("device {id} is back online"),
            ));
        }
        if d.cordoned != b.cordoned {
            out.push(if d.cordoned {
                normal(
                    "Cordoned",
                    obj,
                    format!("device {id} takes no new replicas"),
                )
            } else {
                normal(
                    "Uncordoned",
                    obj,
                    format!("device {id} takes replicas again"),
                )
            });
        }
    }
    for id in before
        .devices
        .keys()
        .filter(|id| !after.devices.contains_key(*id))
    {
        out.push(normal(
            "DeviceRemoved",
            format!("device/{id}"),
            format!("device {id} was removed"),
        ));
    }
    for (name, revision) in &after.workloads {
        let obj = format!("workload/{name}");
        match before.workloads.get(name) {
            None => out.push(normal(
                "Created",
                obj,
                format!("workload {name} created at revision {}", short(revision)),
            )),
            Some(old) if old != revision && !after.rollouts.contains_key(name) => out.push(normal(
                "Updated",
                obj,
                format!("workload {name} updated to revision {}", short(revision)),
            )),
            Some(_) => {}
        }
    }
    for name in before
        .workloads
        .keys()
        .filter(|n| !after.workloads.contains_key(*n))
    {
        out.push(normal(
            "Deleted",
            format!("workload/{name}"),
            format!("workload {name} deleted"),
        ));
    }
    for ((name, index), r) in &after.replicas {
        let obj = format!("workload/{name}");
        let inst = format!("{name}-{index}");
        let b = before.replicas.get(&(name.clone(), *index));
        let on = |d: &Option<String>| d.clone().unwrap_or_default();
        match (b.and_then(|b| b.device.as_ref()), &r.device) {
            (None, Some(d)) => out.push(normal(
                "Scheduled",
                obj.clone(),
                format!("{inst} placed on device {d}"),
            )),
            (Some(a), Some(d)) if a != d => out.push(normal(
                "Rescheduled",
                obj.clone(),
                format!("{inst} moved from device {a} to device {d}"),
            )),
            (Some(a), None) => out.push(warning(
                "Unschedulable",
                obj.clone(),
                format!(
                    "{inst} left device {a} and has no device: {}",
                    r.reason.clone().unwrap_or_default()
                ),
            )),
            (None, None) if b.is_none() => out.push(warning(
                "Unschedulable",
                obj.clone(),
                format!(
                    "{inst} cannot be placed: {}",
                    r.reason.clone().unwrap_or_default()
                ),
            )),
            _ => {}
        }
        let was = b.map(|b| b.phase);
        let restarts_before = b.map_or(0, |b| b.restarts);
        let same_device = b.is_some_and(|b| b.device == r.device);
        let why = r
            .reason
            .clone()
            .map(|w| format!(": {w}"))
            .unwrap_or_default();
        if same_device && r.restarts > restarts_before {
            out.push(warning(
                "Restarted",
                obj.clone(),
                format!(
                    "{inst} on device {} restarted ({} restarts){why}",
                    on(&r.device),
                    r.restarts
                ),
            ));
        }
        // A replica replaced by a new revision within one snapshot is Running before and
        // after: its revision says it started again.
        let new_revision = b.is_some_and(|b| b.revision != r.revision);
        if was != Some(r.phase) || (new_revision && r.phase == Phase::Running) {
            match r.phase {
                Phase::Running => out.push(normal(
                    "Started",
                    obj.clone(),
                    format!(
                        "{inst} running on device {} at revision {}",
                        on(&r.device),
                        short(&r.revision)
                    ),
                )),
                Phase::Failed => out.push(warning(
                    "Failed",
                    obj.clone(),
                    format!("{inst} failed on device {}{why}", on(&r.device)),
                )),
                Phase::CrashLoopBackOff if !(same_device && r.restarts > restarts_before) => out
                    .push(warning(
                        "BackOff",
                        obj.clone(),
                        format!("{inst} on device {} is crash-looping{why}", on(&r.device)),
                    )),
                Phase::Succeeded => out.push(normal(
                    "Completed",
                    obj.clone(),
                    format!("{inst} completed on device {}", on(&r.device)),
                )),
                _ => {}
            }
        }
        if r.healthy == Some(false) && b.and_then(|b| b.healthy) != Some(false) {
            out.push(warning(
                "Unhealthy",
                obj.clone(),
                format!(
                    "{inst} on device {} fails its health check{why}",
                    on(&r.device)
                ),
            ));
        }
    }
    for (name, r) in &after.rollouts {
        let obj = format!("workload/{name}");
        let b = before.rollouts.get(name);
        let new_rollout = b.is_none_or(|b| b.revision != r.revision);
        if new_rollout {
            let from = r
                .previous
                .as_deref()
                .map(|p| format!(" from {}", short(p)))
                .unwrap_or_default();
            out.push(normal(
                "RolloutStarted",
                obj.clone(),
                format!("{name}: rolling out revision {}{from}", short(&r.revision)),
            ));
        }
        let state_changed = new_rollout || b.is_some_and(|b| b.state != r.state);
        if !new_rollout
            && !state_changed
            && b.is_some_and(|b| b.updated != r.updated)
            && r.state == "Progressing"
        {
            out.push(normal(
                "RolloutProgress",
                obj.clone(),
                format!(
                    "{name}: {}/{} replicas at revision {}",
                    r.updated,
                    r.total,
                    short(&r.revision)
                ),
            ));
        }
        if state_changed {
            let why = r
                .reason
                .clone()
                .map(|w| format!(": {w}"))
                .unwrap_or_default();
            match r.state.as_str() {
                "Complete" => out.push(normal(
                    "RolloutComplete",
                    obj,
                    format!(
                        "{name}: revision {} is out on {} replicas",
                        short(&r.revision),
                        r.total
                    ),
                )),
                "Failed" => out.push(warning(
                    "RolloutFailed",
                    obj,
                    format!("{name}: rollout of {} failed{why}", short(&r.revision)),
                )),
                "RolledBack" => out.push(warning(
                    "RolledBack",
                    obj,
                    format!(
                        "{name}: rolled back from revision {}{why}",
                        short(&r.revision)
                    ),
                )),
                "Paused" => out.push(normal(
                    "RolloutPaused",
                    obj,
                    format!("{name}: rollout paused{why}"),
                )),
                "Canary" => out.push(normal(
                    "RolloutCanary",
                    obj,
                    format!(
                        "{name}: canary of revision {} placed{why}",
                        short(&r.revision)
                    ),
                )),
                _ => {}
            }
        }
    }
    out
}

/// The newest [`RING`] events, numbered.
#[derive(Debug, Default)]
pub struct Events {
    ring: VecDeque<EventView>,
    next: u64,
    last: Option<Snapshot>,
}

impl Events {
    /// Records what changed since the last snapshot; returns the new events. The first
    /// snapshot (at hub start) records nothing: it is the baseline.
    pub fn observe(&mut self, now: Snapshot, time_ms: u64) -> Vec<EventView> {
        let Some(before) = self.last.replace(now) else {
            return Vec::new();
        };
        let Some(after) = &self.last else {
            return Vec::new();
        };
        if before == *after {
            return Vec::new();
        }
        let happened = diff(&before, after);
        let mut added = Vec::with_capacity(happened.len());
        for h in happened {
            self.next += 1;
            let e = EventView {
                seq: self.next,
                time_ms,
                kind: if h.warning { "Warning" } else { "Normal" }.to_string(),
                reason: h.reason.to_string(),
                object: h.object,
                message: h.message,
            };
            if self.ring.len() == RING {
                self.ring.pop_front();
            }
            self.ring.push_back(e.clone());
            added.push(e);
        }
        added
    }

    /// Events numbered after `after` (all kept ones for 0), oldest first, about `object`
    /// when given.
    pub fn since(&self, after: u64, object: Option<&str>) -> Vec<EventView> {
        self.ring
            .iter()
            .filter(|e| e.seq > after && object.is_none_or(|o| e.object == o))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::wire::views::{ReplicaView, RolloutView};

    fn dev(id: &str, online: bool, lost: bool) -> DeviceView {
        serde_json::from_value(serde_json::json!({
            "id": id, "online": online, "lost": lost
        }))
        .unwrap()
    }

    fn rep(i: u32, device: Option<&str>, phase: Phase, restarts: u32) -> ReplicaView {
        ReplicaView {
            schedule: None,
            replica: i,
            device: device.map(String::from),
            phase,
            restarts,
            reason: None,
            exit_code: None,
            started_at_ms: None,
            backoff_ms: None,
            revision: "rev1".into(),
            variant: "wasm".into(),
            healthy: None,
            devices: Vec::new(),
        }
    }

    fn wl(name: &str, replicas: Vec<ReplicaView>, rollout: Option<RolloutView>) -> WorkloadView {
        WorkloadView {
            name: name.into(),
            revision: "rev1".into(),
            placement: "replicas".into(),
            desired: replicas.len() as u32,
            ready: 0,
            replicas,
            pending_reason: None,
            spec: None,
            rollout,
            job: None,
        }
    }

    fn reasons(before: Snapshot, after: Snapshot) -> Vec<String> {
        diff(&before, &after)
            .into_iter()
            .map(|h| format!("{} {} {}", h.reason, h.object, h.message))
            .collect()
    }

    #[test]
    fn device_transitions() {
        let s = |d: Vec<DeviceView>| Snapshot::of(&d, &[]);
        let table: Vec<(Vec<DeviceView>, Vec<DeviceView>, Vec<&str>)> = vec![
            (
                vec![],
                vec![dev("d1", true, false)],
                vec!["DeviceJoined device/d1"],
            ),
            (
                vec![dev("d1", true, false)],
                vec![dev("d1", false, false)],
                vec!["DeviceOffline device/d1"],
            ),
            (
                vec![dev("d1", false, false)],
                vec![dev("d1", false, true)],
                vec!["DeviceLost device/d1"],
            ),
            (
                vec![dev("d1", true, false)],
                vec![dev("d1", false, true)],
                vec!["DeviceLost device/d1"],
            ),
            (
                vec![dev("d1", false, true)],
                vec![dev("d1", true, false)],
                vec!["DeviceOnline device/d1"],
            ),
            (
                vec![dev("d1", true, false)],
                vec![dev("d1", true, false)],
                vec![],
            ),
        ];
        for (before, after, want) in table {
            let got = reasons(s(before), s(after));
            assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
            for (g, w) in got.iter().zip(&want) {
                assert!(g.starts_with(w), "{g:?} should start with {w:?}");
            }
        }
    }

    #[test]
    fn replica_transitions() {
        let s = |r: Vec<ReplicaView>| Snapshot::of(&[], &[wl("web", r, None)]);
        let base = s(vec![rep(0, Some("d1"), Phase::Running, 0)]);
        let table: Vec<(Snapshot, Snapshot, Vec<&str>)> = vec![
            (
                s(vec![rep(0, None, Phase::Pending, 0)]),
                s(vec![rep(0, Some("d1"), Phase::Pending, 0)]),
                vec!["Scheduled workload/web web-0 placed on device d1"],
            ),
            (
                s(vec![rep(0, Some("d1"), Phase::Starting, 0)]),
                base.clone(),
                vec!["Started workload/web web-0 running on device d1 at revision rev1"],
            ),
            (
                base.clone(),
                s(vec![rep(0, Some("d1"), Phase::Running, 2)]),
                vec!["Restarted workload/web web-0 on device d1 restarted (2 restarts)"],
            ),
            (
                base.clone(),
                s(vec![rep(0, Some("d1"), Phase::CrashLoopBackOff, 1)]),
                vec!["Restarted workload/web"],
            ),
            (
                base.clone(),
                s(vec![rep(0, Some("d1"), Phase::Failed, 0)]),
                vec!["Failed workload/web web-0 failed on device d1"],
            ),
            (
                base.clone(),
                s(vec![rep(0, Some("d2"), Phase::Pending, 0)]),
                vec!["Rescheduled workload/web web-0 moved from device d1 to device d2"],
            ),
            (
                base.clone(),
                s(vec![ReplicaView {
                    healthy: Some(false),
                    ..rep(0, Some("d1"), Phase::Running, 0)
                }]),
                vec!["Unhealthy workload/web"],
            ),
            (
                base.clone(),
                s(vec![ReplicaView {
                    revision: "rev2".into(),
                    ..rep(0, Some("d1"), Phase::Running, 0)
                }]),
                vec!["Started workload/web web-0 running on device d1 at revision rev2"],
            ),
            (base.clone(), base.clone(), vec![]),
        ];
        for (before, after, want) in table {
            let got = reasons(before, after);
            assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
            for (g, w) in got.iter().zip(&want) {
                assert!(g.starts_with(w), "{g:?} should start with {w:?}");
            }
        }
        // A new workload: created, and its replicas placed.
        let got = reasons(Snapshot::default(), base);
        assert!(got[0].starts_with("Created workload/web"), "{got:?}");
        assert!(got[1].starts_with("Scheduled"), "{got:?}");
    }

    #[test]
    fn rollout_transitions() {
        let roll = |state: &str, revision: &str, updated: u32| RolloutView {
            state: state.into(),
            revision: revision.into(),
            previous_revision: Some("rev1".into()),
            updated,
            total: 3,
            reason: None,
            started_ms: 0,
            history: vec![],
        };
        let s = |r: Option<RolloutView>| Snapshot::of(&[], &[wl("web", vec![], r)]);
        let got = reasons(s(None), s(Some(roll("Progressing", "rev2", 0))));
        assert_eq!(
            got,
            ["RolloutStarted workload/web web: rolling out revision rev2 from rev1"]
        );
        let got = reasons(
            s(Some(roll("Progressing", "rev2", 0))),
            s(Some(roll("Progressing", "rev2", 1))),
        );
        assert_eq!(
            got,
            ["RolloutProgress workload/web web: 1/3 replicas at revision rev2"]
        );
        let got = reasons(
            s(Some(roll("Progressing", "rev2", 2))),
            s(Some(roll("Complete", "rev2", 3))),
        );
        assert_eq!(
            got,
            ["RolloutComplete workload/web web: revision rev2 is out on 3 replicas"]
        );
        let got = reasons(
            s(Some(roll("Progressing", "rev2", 1))),
            s(Some(roll("RolledBack", "rev2", 0))),
        );
        assert!(got[0].starts_with("RolledBack workload/web"), "{got:?}");
    }

    #[test]
    fn the_ring_numbers_keeps_the_newest_and_filters() {
        let mut ev = Events::default();
        assert!(ev.observe(Snapshot::default(), 1).is_empty(), "baseline");
        for i in 0..(RING + 5) {
            let d = vec![dev(&format!("d{i}"), true, false)];
            let mut all: Vec<DeviceView> = (0..=i)
                .map(|j| dev(&format!("d{j}"), true, false))
                .collect();
            all.extend(d);
            ev.observe(Snapshot::of(&all, &[]), i as u64);
        }
        let all = ev.since(0, None);
        assert_eq!(all.len(), RING);
        assert_eq!(all.last().unwrap().seq, (RING + 5) as u64);
        assert_eq!(all[0].seq, 6);
        let after = ev.since(all.last().unwrap().seq - 2, None);
        assert_eq!(after.len(), 2);
        let one = ev.since(0, Some("device/d7"));
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].reason, "DeviceJoined");
        assert_eq!(one[0].kind, "Normal");
    }
}
