//! The hub's state machine: workloads, devices, placement and per-device desired state.
//!
//! [`HubCore`] is owned by the hub's main loop (one owner, no locks). Each input (an accepted
//! manifest, a delete, a device's hello/presence/status) updates the state, persists it, and
//! returns the desired-state messages to publish. It does no network I/O itself, so it is
//! tested with [`crate::store::MemStore`].

use crate::fleet::rollout::{self, Observed, Outcome, Record, Rollout, RolloutState};
use crate::fleet::scheduler::{self, Assignments, DeviceView as SchedDevice, Schedule};
use crate::store::{DeviceRecord, Store, StoreError, StoredSecret};
use shoal_api::ids::{DeviceId, Digest, SecretName, WorkloadName};
use shoal_api::labels::{self, Grant, LabelChange, LabelError, Labels};
use shoal_api::manifest::ManifestError;
use shoal_api::messages::{now_ms, DesiredState, DesiredWorkload, DeviceStatus, Hello, Phase};
use shoal_api::views::{DeviceView, ReplicaView, SecretView, WorkloadView};
use shoal_api::workload::{Placement, Workload};
use std::collections::{BTreeMap, BTreeSet};
use tracing::{info, info_span, warn};

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
    /// When this hub took `status` (its own clock; see [`HubCore::accept_status`]).
    status_at_ms: u64,
    /// `status`'s fingerprint, once asked for.
    fingerprint: Option<String>,
}

impl Live {
    fn fingerprint(&mut self) -> Option<&str> {
        let s = self.status.as_ref()?;
        Some(
            self.fingerprint
                .get_or_insert_with(|| crate::fleet::ingest::fingerprint(s)),
        )
    }
}

/// How long a status stays newer than a report with an older device time arriving after it.
/// Hub replicas take reports in parallel, so two of a device's reports can reach a hub out of
/// order, but only within this window; past it the arrival order wins, so a device whose
/// clock jumps back is not ignored for longer.
const REORDER_WINDOW_MS: u64 = 2_000;

/// What [`HubCore::accept_status`] made of a device's report.
#[derive(Debug, PartialEq)]
pub enum Accepted {
    /// New content, now the device's status (a copy for the other replicas).
    New(DeviceStatus),
    /// The content the hub had, newer: the device is alive.
    Same(shoal_api::messages::Heard),
    /// Older than the status the hub has; `ours` is that status when its content differs
    /// (another replica may have taken the older report as the newest: it needs ours).
    Stale {
        heard: shoal_api::messages::Heard,
        ours: Option<DeviceStatus>,
    },
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
    /// Per workload: its rollout and revision history (persisted).
    rollouts: BTreeMap<WorkloadName, Record>,
    /// Secrets: names, keys and versions; values only encrypted (persisted).
    secrets: BTreeMap<SecretName, StoredSecret>,
    /// Scheduler runs since the server last took them (for its metrics).
    runs: Vec<SchedulingRun>,
    /// Whether the labels devices report steer placement (an `--insecure` fleet, where any
    /// client can speak as any device anyway); otherwise only the operator's do.
    trust_reported_labels: bool,
    /// The newest audit entries (persisted).
    audit: crate::fleet::audit::AuditLog,
    /// Devices revoked in the enrollment book (`shoal-hub device revoke`; the book is the
    /// record, this its latest reading): placement does not see them, so they keep no
    /// replica, `placement: every` ones included, and are sealed no secret.
    revoked: std::collections::BTreeSet<DeviceId>,
}

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

/// One run of the scheduler: how long it took and what it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulingRun {
    pub took: std::time::Duration,
    /// Replicas given a device they did not have.
    pub placed: usize,
    /// Replicas moved from one device to another.
    pub moved: usize,
}

/// Bounds the runs kept when nobody takes them.
const RUNS_KEPT: usize = 1024;

/// What `shoal rollout ACTION` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutAction {
    Pause,
    Resume,
    Promote,
    /// Back to a revision of the history: the given one (a revision or a unique prefix of
    /// one), or else the newest that differs from the current (as `kubectl rollout undo`:
    /// after an automatic rollback, that is the revision that failed).
    Undo {
        to: Option<String>,
    },
}

/// What happened to each workload (or secret) of an accepted apply.
pub type ApplyOutcome = BTreeMap<String, String>;

/// Why a secret cannot be deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRefusal {
    NotFound,
    /// These workloads use it.
    InUse(Vec<String>),
}

/// `spec` (an earlier revision) with what is not part of a revision (how many replicas,
/// where, how updates roll, labels) taken from `current`: going back to a revision changes
/// what runs, not the fleet's shape.
fn keep_placement(mut spec: Workload, current: &Workload) -> Workload {
    spec.placement = current.placement.clone();
    spec.selector = current.selector.clone();
    spec.spread = current.spread.clone();
    spec.strategy = current.strategy;
    spec.labels = current.labels.clone();
    spec.update = current.update;
    spec
}

impl<S: Store> HubCore<S> {
    /// Loads persisted state. `artifact_base` is the URL agents fetch blobs from.
    pub fn open(store: S, artifact_base: String) -> Result<Self, StoreError> {
        Self::open_with(store, artifact_base, false)
    }

    /// [`HubCore::open`]; `trust_reported_labels`: the labels devices report steer
    /// placement too, beside the operator's (`--insecure` fleets, whose devices have no
    /// identity to bind labels to). Reserved keys (`shoal.dev/…`) stay the operator's.
    pub fn open_with(
        store: S,
        artifact_base: String,
        trust_reported_labels: bool,
    ) -> Result<Self, StoreError> {
        let snap = store.load()?;
        let labels_owned = snap.labels_owned;
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
            rollouts: snap.rollouts,
            secrets: snap.secrets,
            runs: Vec::new(),
            trust_reported_labels,
            audit: crate::fleet::audit::AuditLog::from_loaded(snap.audit),
            revoked: Default::default(),
        };
        core.adopt_reported_labels(labels_owned)?;
        // Recompute pending reasons; assignments are stable, so this changes nothing placed.
        core.schedule = core.place();
        Ok(core)
    }

    /// Upgrade: records from before labels were the operator's have none of their own; the
    /// labels their devices reported then (when they steered placement) become the
    /// operator's, once for the whole store (`labels_owned`, a marker written with them), so
    /// a fleet places as it did. After that, a record without labels (one an older replica
    /// rewrote) gets none: reports made after the upgrade are never adopted. A hub that
    /// trusts reports (`--insecure`) adopts nothing: reports count there anyway.
    fn adopt_reported_labels(&mut self, labels_owned: bool) -> Result<(), StoreError> {
        // A hub that trusts reports (`--insecure`) leaves records and store as they are: a
        // later hub with identities adopts then.
        if self.trust_reported_labels {
            return Ok(());
        }
        let adopt = !labels_owned;
        let mut adopted = 0;
        for rec in self.devices.values_mut().filter(|r| r.labels.is_none()) {
            rec.labels = Some(match adopt {
                true => labels::requestable(&rec.hello.labels),
                false => Labels::new(),
            });
            self.store.put_device(rec)?;
            adopted += 1;
        }
        if !labels_owned {
            self.store.put_labels_owned()?;
        }
        if adopted > 0 && adopt {
            info!(
                devices = adopted,
                "labels are the operator's now: kept the labels these devices reported before (see `shoal label device`)"
            );
        } else if adopted > 0 {
            warn!(
                devices = adopted,
                "device records without labels of their own (written by an older hub replica?) get none: label them with `shoal label device`"
            );
        }
        Ok(())
    }

    /// The labels placement sees for `rec`.
    fn labels_of(&self, rec: &DeviceRecord) -> Labels {
        let own = rec.labels.clone().unwrap_or_default();
        if self.trust_reported_labels {
            let mut l = labels::requestable(&rec.hello.labels);
            l.extend(own);
            l
        } else {
            own
        }
    }

    /// Reads the persistent state again (a standby hub follows its leader's writes this
    /// way), keeping what devices reported.
    pub fn reload(&mut self) -> Result<(), StoreError> {
        let snap = self.store.load()?;
        self.workloads = snap.workloads;
        self.devices = snap.devices;
        self.schedule.assignments = snap.assignments;
        self.desired = snap.desired;
        self.rollouts = snap.rollouts;
        self.secrets = snap.secrets;
        // A standby's store drops the writes: the leader adopts and writes the same.
        self.adopt_reported_labels(snap.labels_owned)?;
        self.schedule = self.place();
        Ok(())
    }

    /// Takes over what `standby` heard from devices (their liveness, status and mDNS
    /// records), so that a hub promoted to leader starts from what it already knows.
    pub fn adopt_live<T: Store>(&mut self, standby: &mut HubCore<T>) {
        self.live = std::mem::take(&mut standby.live);
        self.mdns = std::mem::take(&mut standby.mdns);
    }

    /// Desired states that name another place to fetch blobs from than this hub's (stored
    /// by an earlier hub, or one with another `--public-url`), moved to this hub's under a
    /// new generation. Agents keep what runs: only the address changes.
    pub fn relocate_artifacts(&mut self) -> Result<Vec<DesiredState>, StoreError> {
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
            moved.push(self.bump(&dev, workloads)?);
        }
        Ok(moved)
    }

    /// Records a change in the audit log (durable at the next [`HubCore::flush`], which the
    /// caller does before it answers).
    pub fn record_audit(
        &mut self,
        change: crate::fleet::audit::Change,
        now_ms: u64,
    ) -> Result<shoal_api::operator::AuditEntry, StoreError> {
        let e = self.audit.record(change, now_ms);
        self.store.put_audit(&e)?;
        Ok(e)
    }

    /// Audit entries numbered after `after`, oldest first, at most `limit`.
    pub fn audit_since(&self, after: u64, limit: usize) -> Vec<shoal_api::operator::AuditEntry> {
        self.audit.since(after, limit)
    }

    /// Makes every change so far durable. Changes are written as they happen but flushed
    /// only here: the server calls it once per batch of events, before it publishes the
    /// desired states or answers the requests that follow from them (group commit).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.store.flush()
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
                self.start_rollout(&w)?;
                self.store.put_workload(&w)?;
                info!(workload = %w.name, revision = %w.revision(), verdict, "workload stored");
                self.workloads.insert(w.name.clone(), w.clone());
            }
            outcome.insert(w.name.to_string(), verdict.to_string());
        }
        let publish = self.reconcile()?;
        Ok((outcome, publish))
    }

    /// Notes a stored workload's new spec: a new revision of a workload that has replicas
    /// starts a rollout from the last good revision; anything else just enters the history.
    fn start_rollout(&mut self, w: &Workload) -> Result<(), StoreError> {
        let now = now_ms();
        let rec = self
            .rollouts
            .entry(w.name.clone())
            .or_insert_with(|| Record {
                workload: w.name.clone(),
                rollout: None,
                history: Vec::new(),
            });
        let old = self.workloads.get(&w.name);
        match old {
            Some(old) if old.revision() != w.revision() => {
                // Mid-rollout, the last good revision is the one it started from.
                // A failed one (without rollback) too: its replicas not yet switched still
                // run the last good revision.
                let unfinished = rec
                    .rollout
                    .as_ref()
                    .filter(|r| r.active() || r.state == RolloutState::Failed);
                let stable = unfinished
                    .and_then(|r| r.previous.clone())
                    .unwrap_or_else(|| old.clone());
                // Each placed replica keeps the spec it runs until the new rollout replaces
                // it: a replica already updated by an unfinished rollout does not go back.
                let placed: Vec<(u32, &Workload)> = self
                    .schedule
                    .assignments
                    .get(&w.name)
                    .into_iter()
                    .flat_map(|m| m.keys())
                    .map(|&i| (i, unfinished.and_then(|r| r.spec_of(i)).unwrap_or(old)))
                    .collect();
                if placed.is_empty() {
                    rec.rollout = None;
                    rec.push(w, now, "complete");
                } else {
                    info!(workload = %w.name, from = %stable.revision(), to = %w.revision(), replicas = placed.len(), "rollout started");
                    rec.rollout = Some(Rollout::start(w, stable, placed, now));
                    rec.push(w, now, "in progress");
                }
            }
            Some(_) => return Ok(()), // same revision: placement, labels or policy only
            None => rec.push(w, now, "complete"),
        }
        let rec = rec.clone();
        self.store.put_rollout(&w.name, Some(&rec))
    }

    /// Whether any rollout needs stepping.
    pub fn rolling(&self) -> bool {
        self.rollouts
            .values()
            .any(|r| r.rollout.as_ref().is_some_and(|x| x.active()))
    }

    /// Advances every active rollout from what devices report; returns the desired states
    /// that changed.
    pub fn advance_rollouts(&mut self, now: u64) -> Result<Vec<DesiredState>, StoreError> {
        let names: Vec<WorkloadName> = self
            .rollouts
            .iter()
            .filter(|(_, r)| r.rollout.as_ref().is_some_and(|x| x.active()))
            .map(|(n, _)| n.clone())
            .collect();
        let mut changed = false;
        for name in names {
            let Some(target) = self.workloads.get(&name).cloned() else {
                continue;
            };
            let observed = self.observe(&name);
            let Some(rec) = self.rollouts.get_mut(&name) else {
                continue;
            };
            let Some(mut r) = rec.rollout.clone() else {
                continue;
            };
            let _span = info_span!("rollout", workload = %name, revision = %r.revision).entered();
            let outcome = rollout::step(&mut r, &target, &observed, now);
            if outcome == Outcome::Unchanged {
                continue;
            }
            let (state, rev, reason) = (r.state, r.revision.clone(), r.reason.clone());
            let old = r.running.len();
            let retire = std::mem::take(&mut r.retire);
            rec.rollout = Some(r);
            if !retire.is_empty() {
                if let Some(placed) = self.schedule.assignments.get_mut(&name) {
                    for i in &retire {
                        placed.remove(i);
                    }
                }
                info!(replicas = ?retire, "old replicas retired");
            }
            match outcome {
                Outcome::Unchanged => {}
                Outcome::Changed => {
                    match state {
                        RolloutState::Complete => rec.finish(&rev, "complete"),
                        RolloutState::Failed => rec.finish(
                            &rev,
                            &format!("failed: {}", reason.as_deref().unwrap_or("")),
                        ),
                        _ => {}
                    }
                    info!(%state, old, reason = reason.as_deref().unwrap_or(""), "rollout step");
                }
                Outcome::RollBack { previous, reason } => {
                    rec.finish(&rev, &format!("rolled back: {reason}"));
                    tracing::warn!(%reason, to = %previous.revision(), "rollout failed; rolling back");
                    // Back to the previous revision's spec; where and how many (scaled or
                    // re-placed during the rollout) stay as they are now.
                    let restored = keep_placement(*previous, &target);
                    self.store.put_workload(&restored)?;
                    self.workloads.insert(name.clone(), restored);
                }
            }
            let rec = self.rollouts.get(&name).cloned();
            self.store.put_rollout(&name, rec.as_ref())?;
            changed = true;
        }
        if changed {
            self.reconcile()
        } else {
            Ok(Vec::new())
        }
    }

    /// Every placed replica of `name` as its device last reported it.
    fn observe(&self, name: &WorkloadName) -> Vec<Observed> {
        let Some(placed) = self.schedule.assignments.get(name) else {
            return Vec::new();
        };
        placed
            .iter()
            .map(|(&replica, dev)| {
                let live = self.live.get(dev).filter(|l| l.online);
                let reported = live.and_then(|l| l.status.as_ref()).and_then(|s| {
                    s.workloads
                        .iter()
                        .find(|i| &i.name == name && i.replica == replica)
                });
                Observed {
                    replica,
                    device: dev.clone(),
                    revision: reported.map(|i| i.revision.clone()),
                    phase: reported.map_or(Phase::Pending, |i| i.phase),
                    started_at_ms: reported.and_then(|i| i.started_at_ms),
                    reason: reported.and_then(|i| i.reason.clone()),
                    healthy: reported.and_then(|i| i.healthy),
                }
            })
            .collect()
    }

    /// `shoal rollout pause|resume|promote|undo`. `Ok(Err(why))`: not possible now.
    pub fn rollout_action(
        &mut self,
        name: &WorkloadName,
        action: RolloutAction,
    ) -> Result<Result<Vec<DesiredState>, String>, StoreError> {
        let Some(current) = self.workloads.get(name).cloned() else {
            return Ok(Err(format!("workload {:?} not found", name.as_str())));
        };
        let rec = self.rollouts.get_mut(name);
        let active = rec
            .as_ref()
            .and_then(|r| r.rollout.as_ref())
            .filter(|r| r.active())
            .is_some();
        match action {
            RolloutAction::Undo { to } => {
                let rev = current.revision();
                let history = rec.map(|r| r.history.as_slice()).unwrap_or_default();
                let spec = match to.as_deref() {
                    None => match history.iter().rev().find(|e| e.revision != rev) {
                        Some(e) => e.spec.clone(),
                        None => {
                            return Ok(Err(format!(
                                "workload {:?} has no earlier revision to go back to",
                                name.as_str()
                            )))
                        }
                    },
                    Some("") => {
                        return Ok(Err(
                            "--to-revision is empty: give a revision from `shoal rollout history`"
                                .to_string(),
                        ))
                    }
                    Some(to) => {
                        // Newest entry per revision (a revision may be applied more than once).
                        let mut found: Vec<(&str, &Workload)> = Vec::new();
                        for e in history.iter().rev() {
                            if e.revision.starts_with(to)
                                && !found.iter().any(|(r, _)| *r == e.revision)
                            {
                                found.push((&e.revision, &e.spec));
                            }
                        }
                        match found.as_slice() {
                            [(_, one)] => (*one).clone(),
                            [] => {
                                return Ok(Err(format!(
                                    "revision {to:?} is not in the history of workload {:?} (see `shoal rollout history`)",
                                    name.as_str()
                                )))
                            }
                            _ => {
                                return Ok(Err(format!(
                                    "revision {to:?} is ambiguous in the history of workload {:?}: give more of it",
                                    name.as_str()
                                )))
                            }
                        }
                    }
                };
                if spec.revision() == rev {
                    return Ok(Err(format!(
                        "workload {:?} already runs revision {rev}",
                        name.as_str()
                    )));
                }
                // Only what runs goes back; how many and where stay as they are now.
                let spec = keep_placement(spec, &current);
                // The secrets that revision reads must still be there.
                let missing = shoal_api::secret::unresolved(&spec.secrets, |n| {
                    self.secrets.get(n).map(|s| s.keys.clone())
                });
                if !missing.is_empty() {
                    return Ok(Err(format!(
                        "cannot go back to revision {}: {}",
                        spec.revision(),
                        missing.join("; ")
                    )));
                }
                info!(workload = %name, to = %spec.revision(), "rollout undo");
                return self.apply(vec![spec]).map(|(_, publish)| Ok(publish));
            }
            _ if !active => {
                return Ok(Err(format!(
                    "workload {:?} has no rollout in progress",
                    name.as_str()
                )))
            }
            _ => {}
        }
        if let Some(r) = self.rollouts.get_mut(name).and_then(|r| r.rollout.as_mut()) {
            match action {
                RolloutAction::Pause => r.state = RolloutState::Paused,
                RolloutAction::Resume => {
                    r.state = RolloutState::Progressing;
                    r.progress_ms = now_ms();
                }
                RolloutAction::Promote => {
                    r.promoted = true;
                    r.state = RolloutState::Progressing;
                    r.progress_ms = now_ms();
                }
                RolloutAction::Undo { .. } => {}
            }
            info!(workload = %name, state = %r.state, "rollout changed by operator");
        }
        let rec = self.rollouts.get(name).cloned();
        self.store.put_rollout(name, rec.as_ref())?;
        self.advance_rollouts(now_ms()).map(Ok)
    }

    /// `shoal scale`: a new replica count. `Ok(Err(why))`: not possible.
    pub fn scale(
        &mut self,
        name: &WorkloadName,
        replicas: u32,
    ) -> Result<Result<Vec<DesiredState>, String>, StoreError> {
        let Some(mut w) = self.workloads.get(name).cloned() else {
            return Ok(Err(format!("workload {:?} not found", name.as_str())));
        };
        if w.placement == Placement::Every {
            return Ok(Err(format!(
                "workload {:?} runs on every matching device: it has no replica count",
                name.as_str()
            )));
        }
        if replicas > shoal_api::workload::MAX_REPLICAS {
            return Ok(Err(format!(
                "replicas {replicas} is invalid: must be at most {}",
                shoal_api::workload::MAX_REPLICAS
            )));
        }
        w.placement = Placement::Replicas(replicas);
        self.store.put_workload(&w)?;
        info!(workload = %name, replicas, "scaled");
        self.workloads.insert(name.clone(), w);
        self.reconcile().map(Ok)
    }

    /// Deletes a workload; `None` if it did not exist.
    pub fn delete(&mut self, name: &WorkloadName) -> Result<Option<Vec<DesiredState>>, StoreError> {
        if self.workloads.remove(name).is_none() {
            return Ok(None);
        }
        self.rollouts.remove(name);
        self.store.put_rollout(name, None)?;
        self.store.delete_workload(name)?;
        info!(workload = %name, "workload deleted");
        self.reconcile().map(Some)
    }

    /// A device announced itself (on every connect). A hello with values no real device has
    /// is refused (logged, nothing changes). The labels it asks for steer nothing unless the
    /// operator granted the same (see [`shoal_api::labels`]).
    pub fn hello(&mut self, hello: Hello) -> Result<Vec<DesiredState>, StoreError> {
        let id = hello.device_id.clone();
        let _span = info_span!("hello", device = %id).entered();
        if let Err(e) = shoal_api::report::check_hello(&hello) {
            warn!(error = %e, "hello refused");
            return Ok(Vec::new());
        }
        let now = now_ms();
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
                }
            }
        };
        let asked = labels::ungranted(&rec.hello.labels, &self.labels_of(&rec));
        if !asked.is_empty() {
            info!(labels = ?asked, "device asks for labels the operator has not granted: they steer nothing (shoal label device, or token create --labels)");
        }
        self.store.put_device(&rec)?;
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
            self.reconcile()?
        };
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
        // Placement can only change if there is something to place.
        if self.workloads.is_empty() {
            return Ok(Vec::new());
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

    /// A device enrolled (or enrolled again, with a new key): what its join token granted
    /// (read from the enrollment book, see [`HubCore::apply_grants`]) is applied, and its
    /// desired state is issued anew, to be sealed to its new key.
    pub fn enrolled(
        &mut self,
        id: &DeviceId,
        grant: Option<Grant>,
    ) -> Result<Vec<DesiredState>, StoreError> {
        let mut out = self.apply_grants(vec![(id.clone(), grant)])?;
        if !out.iter().any(|d| &d.device_id == id) {
            out.extend(self.reissue(id)?);
        }
        Ok(out)
    }

    /// Applies join-token grants (from the enrollment book, whose records only the hub's
    /// enrollment writes), each once: a device the hub did not know is recorded (it shows
    /// before it connects, and can be labelled); a fresh grant (an unbound token, a new
    /// identity) replaces the labels the id had, a bound one adds to them. One placement run
    /// for all.
    pub fn apply_grants(
        &mut self,
        grants: Vec<(DeviceId, Option<Grant>)>,
    ) -> Result<Vec<DesiredState>, StoreError> {
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
                    first_seen_ms: now_ms(),
                    last_seen_ms: 0,
                    cordoned: false,
                    draining: false,
                    labels: Some(Labels::new()),
                    granted_by: None,
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
            self.store.put_device(&rec)?;
            changed = true;
        }
        if changed && !self.workloads.is_empty() {
            self.reconcile()
        } else {
            Ok(Vec::new())
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

    /// `shoal label device ID k=v k-`: the operator changes the labels placement sees.
    pub fn label(
        &mut self,
        id: &DeviceId,
        change: &LabelChange,
    ) -> Result<Result<Vec<DesiredState>, LabelRefusal>, StoreError> {
        let Some(rec) = self.devices.get(id) else {
            return Ok(Err(LabelRefusal::UnknownDevice(id.clone())));
        };
        let current = rec.labels.clone().unwrap_or_default();
        let next = match change.apply(&current) {
            Ok(l) => l,
            Err(e) => return Ok(Err(e.into())),
        };
        if next == current {
            return Ok(Ok(Vec::new()));
        }
        info!(device = %id, labels = ?next, "device labelled");
        let mut rec = rec.clone();
        rec.labels = Some(next);
        self.store.put_device(&rec)?;
        self.devices.insert(id.clone(), rec);
        self.reconcile().map(Ok)
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

    /// `shoal drain`: cordon the device and move its replicas elsewhere, except `placement:
    /// every` ones (which belong to it), within each workload's `maxUnavailable` (see
    /// [`HubCore::advance_drains`]).
    pub fn drain(&mut self, id: &DeviceId) -> Result<Option<Vec<DesiredState>>, StoreError> {
        let Some(rec) = self.devices.get_mut(id) else {
            return Ok(None);
        };
        rec.cordoned = true;
        rec.draining = true;
        let rec = rec.clone();
        self.store.put_device(&rec)?;
        info!(device = %id, "drain started");
        let mut out = self.reconcile()?;
        out.extend(self.advance_drains()?);
        Ok(Some(out))
    }

    /// The devices the enrollment book says are revoked, as of now: placement forgets them
    /// (their replicas move, their desired states empty). `None`: nothing changed.
    pub fn set_revoked(
        &mut self,
        revoked: std::collections::BTreeSet<DeviceId>,
    ) -> Result<Option<Vec<DesiredState>>, StoreError> {
        if revoked == self.revoked {
            return Ok(None);
        }
        info!(devices = ?revoked, "revoked devices");
        self.revoked = revoked;
        self.reconcile().map(Some)
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
    pub fn advance_drains(&mut self) -> Result<Vec<DesiredState>, StoreError> {
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
                    self.store.put_device(&rec)?;
                    info!(device = %dev, "drain complete");
                }
            }
        }
        if evicted {
            self.reconcile()
        } else {
            Ok(Vec::new())
        }
    }

    /// A device reported what it runs.
    pub fn status(&mut self, status: DeviceStatus) {
        let id = status.device_id.clone();
        let now = now_ms();
        self.reported(&id, now);
        let live = self.live.entry(id).or_default();
        live.status = Some(status);
        live.status_at_ms = now;
        live.fingerprint = None;
    }

    /// A report of the device arrived (directly or through another replica).
    fn reported(&mut self, id: &DeviceId, now: u64) {
        if let Some(rec) = self.devices.get_mut(id) {
            rec.last_seen_ms = now;
        }
        self.heard(id, now);
    }

    /// A device's report as hub replicas take it (see [`crate::fleet::ingest`]): reports may
    /// arrive out of order, so one older than the hub's status (by the device's clock, within
    /// [`REORDER_WINDOW_MS`] of taking that status) is not taken.
    pub fn accept_status(&mut self, status: DeviceStatus) -> Accepted {
        let id = status.device_id.clone();
        let now = now_ms();
        self.reported(&id, now);
        let live = self.live.entry(id.clone()).or_default();
        let heard = |fingerprint: String| shoal_api::messages::Heard {
            device_id: id.clone(),
            time_ms: status.time_ms,
            fingerprint,
        };
        let accepted = match &live.status {
            Some(cur)
                if status.time_ms < cur.time_ms
                    && now.saturating_sub(live.status_at_ms) < REORDER_WINDOW_MS =>
            {
                let theirs = crate::fleet::ingest::fingerprint(&status);
                let ours = live.fingerprint().map(str::to_string);
                let differs = ours.as_deref() != Some(theirs.as_str());
                let ours = live.status.clone().filter(|_| differs);
                return Accepted::Stale {
                    heard: heard(theirs),
                    ours,
                };
            }
            Some(cur)
                if cur.observed_generation == status.observed_generation
                    && cur.workloads == status.workloads =>
            {
                let fp = live.fingerprint().map(str::to_string).unwrap_or_default();
                Accepted::Same(heard(fp))
            }
            _ => {
                live.fingerprint = None;
                Accepted::New(status.clone())
            }
        };
        live.status = Some(status);
        live.status_at_ms = now;
        accepted
    }

    /// Another replica's ingest batch (see [`crate::fleet::ingest`]); returns the statuses this hub
    /// must pass on again: its own, where the batch brought an older one with other content.
    pub fn ingest_batch(&mut self, batch: shoal_api::messages::IngestBatch) -> Vec<DeviceStatus> {
        let mut again = Vec::new();
        for s in batch.statuses {
            if let Accepted::Stale { ours: Some(o), .. } = self.accept_status(s) {
                again.push(o);
            }
        }
        for h in &batch.heard {
            self.heard_status(h);
        }
        again
    }

    /// Another replica heard a device repeat a status: it is alive, and when the content is
    /// the one this hub has, that status is as new as the report.
    pub fn heard_status(&mut self, h: &shoal_api::messages::Heard) {
        let now = now_ms();
        self.reported(&h.device_id, now);
        let Some(live) = self.live.get_mut(&h.device_id) else {
            return;
        };
        let same = live.fingerprint() == Some(h.fingerprint.as_str());
        if let (true, Some(cur)) = (same, live.status.as_mut()) {
            if h.time_ms > cur.time_ms {
                cur.time_ms = h.time_ms;
                live.status_at_ms = now;
            }
        }
    }

    fn workload_list(&self) -> Vec<Workload> {
        self.workloads.values().cloned().collect()
    }

    fn sched_devices(&self) -> Vec<SchedDevice> {
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
                    online: live.is_some_and(|l| l.online),
                    lost: live.is_some_and(|l| l.lost),
                    cordoned: r.cordoned,
                }
            })
            .collect()
    }

    /// Runs the scheduler over the current state, rollouts in progress included.
    fn place(&self) -> Schedule {
        let inflight: std::collections::HashMap<&WorkloadName, scheduler::InFlight<'_>> = self
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
                    },
                ))
            })
            .collect();
        scheduler::schedule_with(
            &self.sched_devices(),
            &self.workload_list(),
            &self.schedule.assignments,
            &inflight,
        )
    }

    /// Re-runs placement and returns the desired states that changed (already persisted, with
    /// bumped generations).
    fn reconcile(&mut self) -> Result<Vec<DesiredState>, StoreError> {
        let started = std::time::Instant::now();
        let next = self.place();
        let took = started.elapsed();
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
            self.runs.push(SchedulingRun {
                took,
                placed,
                moved,
            });
        }
        if next.assignments != self.schedule.assignments {
            self.store.put_assignments(&next.assignments)?;
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
                    self.store.put_rollout(name, Some(rec))?;
                }
            }
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
            let rollout = self.rollouts.get(name).and_then(|r| r.rollout.as_ref());
            for (&replica, dev) in replicas {
                let spec = rollout.and_then(|r| r.spec_of(replica)).unwrap_or(w);
                // WASM where the device can, else the container (the scheduler only places
                // a replica where one of them runs).
                let Some(variant) = self.devices.get(dev).and_then(|d| {
                    spec.variant_for(
                        |r| d.hello.runtimes.iter().any(|x| x == r),
                        &d.hello.arch,
                        d.hello.variant.as_deref(),
                    )
                }) else {
                    continue;
                };
                if let Some(mut dw) = DesiredWorkload::from_workload(spec, replica, variant) {
                    // A new version of a secret restarts the replicas that use it.
                    for m in &mut dw.secrets {
                        m.version = self
                            .secrets
                            .get(&m.mount.name)
                            .map(|s| s.version.clone())
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
                changed.push(self.bump(&dev, want)?);
            }
        }
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
            // Sealed per device when published (see `crate::server`).
            secrets: Vec::new(),
        };
        // Callers flush once for all the devices they change (before publishing).
        self.store.put_desired(&d)?;
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
                    requested_labels: labels::ungranted(&r.hello.labels, &labels),
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

    /// Every spec replicas may run: the workloads', and those of the revisions rollouts
    /// still run (the last good one, and each replica's not yet replaced).
    fn specs_in_use(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.values().chain(
            self.rollouts
                .values()
                .filter_map(|r| r.rollout.as_ref())
                .flat_map(|r| r.previous.iter().chain(r.specs.values())),
        )
    }

    /// What is wrong with the secrets of an apply: references (`spec.secrets`) of its
    /// `workloads` to secrets that neither the apply (`incoming`) nor the hub has, or to keys
    /// they lack; and keys an incoming secret drops that a stored workload outside the apply
    /// still reads. Each error is located by document.
    pub fn check_secrets(
        &self,
        workloads: &[(usize, &Workload)],
        incoming: &[(usize, &StoredSecret)],
    ) -> Vec<ManifestError> {
        let mut errors = Vec::new();
        let mut seen = BTreeMap::new();
        for (n, s) in incoming {
            if let Some(first) = seen.insert(s.name.clone(), *n) {
                errors.push(ManifestError::secret(
                    *n,
                    Some(s.name.to_string()),
                    format!(
                        "metadata.name {:?} is duplicated: already defined in document {first}",
                        s.name.as_str()
                    ),
                ));
            }
        }
        let keys_of = |name: &SecretName| {
            incoming
                .iter()
                .map(|(_, s)| *s)
                .chain(self.secrets.get(name))
                .find(|s| &s.name == name)
                .map(|s| s.keys.clone())
        };
        for (n, w) in workloads {
            for message in shoal_api::secret::unresolved(&w.secrets, keys_of) {
                errors.push(ManifestError {
                    document: *n,
                    workload: Some(w.name.to_string()),
                    kind: None,
                    message,
                });
            }
        }
        let applied: BTreeSet<&WorkloadName> = workloads.iter().map(|(_, w)| &w.name).collect();
        for (n, s) in incoming {
            // Replicas of other workloads, and revisions rollouts still run, keep reading it.
            for w in self.specs_in_use().filter(|w| !applied.contains(&w.name)) {
                for m in w.secrets.iter().filter(|m| m.name == s.name) {
                    for (var, key) in &m.env {
                        if !s.keys.contains(key) {
                            errors.push(ManifestError::secret(
                                *n,
                                Some(s.name.to_string()),
                                format!(
                                    "key {key:?} is missing, but workload {:?} reads it (spec.secrets env {var}): keep the key or change the workload in the same apply",
                                    w.name.as_str()
                                ),
                            ));
                        }
                    }
                }
            }
        }
        errors
    }

    /// Stores secrets (created, configured or unchanged); the [`Self::apply`] that follows
    /// reconciles, which hands new versions to the replicas that use them.
    pub fn apply_secrets(
        &mut self,
        secrets: Vec<StoredSecret>,
    ) -> Result<ApplyOutcome, StoreError> {
        let mut outcome = ApplyOutcome::new();
        for s in secrets {
            let verdict = match self.secrets.get(&s.name) {
                None => "created",
                Some(old) if old.version == s.version && old.keys == s.keys => "unchanged",
                Some(_) => "configured",
            };
            if verdict != "unchanged" {
                self.store.put_secret(&s.name, Some(&s))?;
                info!(secret = %s.name, version = %s.version, verdict, "secret stored");
                self.secrets.insert(s.name.clone(), s.clone());
            }
            outcome.insert(s.name.to_string(), verdict.to_string());
        }
        Ok(outcome)
    }

    /// Deletes a secret no workload uses. `Ok(Err(why))`: not found, or still in use (by a
    /// workload's spec or a revision a rollout still runs).
    pub fn delete_secret(
        &mut self,
        name: &SecretName,
    ) -> Result<Result<(), SecretRefusal>, StoreError> {
        if !self.secrets.contains_key(name) {
            return Ok(Err(SecretRefusal::NotFound));
        }
        let users: BTreeSet<String> = self
            .specs_in_use()
            .filter(|w| w.secrets.iter().any(|m| &m.name == name))
            .map(|w| w.name.to_string())
            .collect();
        if !users.is_empty() {
            return Ok(Err(SecretRefusal::InUse(users.into_iter().collect())));
        }
        self.store.put_secret(name, None)?;
        self.secrets.remove(name);
        info!(secret = %name, "secret deleted");
        Ok(Ok(()))
    }

    /// Every stored secret (values encrypted).
    pub fn stored_secrets(&self) -> impl Iterator<Item = &StoredSecret> {
        self.secrets.values()
    }

    /// A stored secret (its values encrypted), for sealing to devices.
    pub fn secret(&self, name: &SecretName) -> Option<&StoredSecret> {
        self.secrets.get(name)
    }

    /// `shoal get secrets`: names, keys, versions and users; never values.
    pub fn secret_views(&self) -> Vec<SecretView> {
        self.secrets
            .values()
            .map(|s| SecretView {
                name: s.name.to_string(),
                keys: s.keys.clone(),
                version: s.version.clone(),
                used_by: self
                    .specs_in_use()
                    .filter(|w| w.secrets.iter().any(|m| m.name == s.name))
                    .map(|w| w.name.to_string())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                updated_ms: s.updated_ms,
            })
            .collect()
    }

    /// The device's desired state again under a new generation, so that it is sealed anew
    /// (a device that enrolled again has a new key and cannot open what was sealed before).
    pub fn reissue(&mut self, dev: &DeviceId) -> Result<Option<DesiredState>, StoreError> {
        match self.desired.get(dev) {
            Some(d) => {
                let workloads = d.workloads.clone();
                self.bump(dev, workloads).map(Some)
            }
            None => Ok(None),
        }
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
        }
    }

    fn rollout_view(
        &self,
        name: &WorkloadName,
        placed: &BTreeMap<u32, DeviceId>,
    ) -> Option<shoal_api::views::RolloutView> {
        let rec = self.rollouts.get(name)?;
        let history = rec
            .history
            .iter()
            .map(|e| shoal_api::views::RevisionView {
                revision: e.revision.clone(),
                applied_ms: e.applied_ms,
                outcome: e.outcome.clone(),
            })
            .collect();
        let r = rec.rollout.as_ref()?;
        Some(shoal_api::views::RolloutView {
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
            healthy: None,
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

    /// The scheduler runs since the last call.
    pub fn take_scheduling_runs(&mut self) -> Vec<SchedulingRun> {
        std::mem::take(&mut self.runs)
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
            variant: None,
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

    fn grant(token: &str, labels: &[(&str, &str)], fresh: bool) -> Grant {
        Grant {
            token: token.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            fresh,
        }
    }

    /// A device whose join token granted `labels` enrolls, then says hello asking for them.
    fn join(hub: &mut HubCore<MemStore>, id: &str, labels: &[(&str, &str)]) -> Vec<DesiredState> {
        let h = hello(id, labels);
        hub.enrolled(&h.device_id, Some(grant(&format!("t-{id}"), labels, true)))
            .unwrap();
        hub.hello(h).unwrap()
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

    /// A report of device `d1`: `content` picks one of three contents (so reports repeat).
    fn d1_report(content: u8, time_ms: u64) -> DeviceStatus {
        let phase = [Phase::Running, Phase::Failed, Phase::Starting][usize::from(content % 3)];
        crate::fleet::ingest::tests::status("d1", 1, phase, time_ms)
    }

    proptest::proptest! {
        /// Three replicas take a device's reports as a shared subscription hands them out
        /// (any replica, any order of batches): once the batches are all through, every
        /// replica holds the content of the device's newest report.
        #[test]
        fn replicas_agree_on_the_newest_status(
            steps in proptest::collection::vec((0u8..3, 0usize..3, proptest::bool::ANY), 1..40)
        ) {
            let mut hubs: Vec<HubCore<MemStore>> = (0..3)
                .map(|_| HubCore::open(MemStore::default(), "http://h".into()).unwrap())
                .collect();
            let mut relays: Vec<crate::fleet::ingest::Relay> = (0..3).map(|_| Default::default()).collect();
            // Batches on the wire: (from, batch), delivered in order per sender.
            let mut wire: Vec<(usize, shoal_api::messages::IngestBatch)> = Vec::new();
            let deliver = |hubs: &mut Vec<HubCore<MemStore>>,
                           relays: &mut Vec<crate::fleet::ingest::Relay>,
                           from: usize,
                           b: shoal_api::messages::IngestBatch| {
                for to in (0..3).filter(|&t| t != from) {
                    for again in hubs[to].ingest_batch(b.clone()) {
                        relays[to].changed(again);
                    }
                }
            };
            let mut newest = None;
            for (i, (content, to, flush)) in steps.iter().enumerate() {
                let r = d1_report(*content, 1000 + i as u64);
                newest = Some(r.clone());
                match hubs[*to].accept_status(r) {
                    Accepted::New(s) => relays[*to].changed(s),
                    Accepted::Same(h) | Accepted::Stale { heard: h, .. } => relays[*to].heard(h),
                }
                if *flush {
                    // One replica's batch goes out; an older one still on the wire goes first.
                    for b in relays[*to].take() {
                        wire.push((*to, b));
                    }
                    if wire.len() > 1 {
                        let (from, b) = wire.remove(0);
                        deliver(&mut hubs, &mut relays, from, b);
                    }
                }
            }
            // Drain: everything on the wire, then whatever that made the replicas pass on.
            for _ in 0..10 {
                for (from, b) in std::mem::take(&mut wire) {
                    deliver(&mut hubs, &mut relays, from, b);
                }
                for (from, r) in relays.iter_mut().enumerate() {
                    wire.extend(r.take().into_iter().map(|b| (from, b)));
                }
                if wire.is_empty() {
                    break;
                }
            }
            let want = newest.unwrap().workloads;
            for (i, h) in hubs.iter().enumerate() {
                let have = h.live.get(&DeviceId::try_from("d1").unwrap())
                    .and_then(|l| l.status.as_ref()).map(|s| s.workloads.clone());
                proptest::prop_assert_eq!(have.as_ref(), Some(&want), "replica {}", i);
            }
        }
    }

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
        fn put_rollout(&self, name: &WorkloadName, r: Option<&Record>) -> Result<(), StoreError> {
            self.0.put_rollout(name, r)
        }
        fn put_secret(
            &self,
            name: &SecretName,
            s: Option<&StoredSecret>,
        ) -> Result<(), StoreError> {
            self.0.put_secret(name, s)
        }
        fn put_labels_owned(&self) -> Result<(), StoreError> {
            self.0.put_labels_owned()
        }
        fn put_audit(&self, e: &shoal_api::operator::AuditEntry) -> Result<(), StoreError> {
            self.0.put_audit(e)
        }
        fn flush(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn placed(hub: &HubCore<impl Store>, w: &str) -> Vec<String> {
        hub.assignments()[&WorkloadName::try_from(w).unwrap()]
            .values()
            .map(|d| d.to_string())
            .collect()
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::try_from(s).unwrap()
    }

    fn change(words: &[&str], overwrite: bool) -> LabelChange {
        LabelChange::parse(words, overwrite).unwrap()
    }

    fn labels_of(hub: &HubCore<impl Store>, d: &str) -> Vec<String> {
        hub.labels_of_device(&id(d))
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }

    #[test]
    fn placement_sees_the_operators_labels_never_the_devices() {
        let mut hub = HubCore::open(MemStore::default(), "http://h".into()).unwrap();
        // `thief` asks for role=sensor (and an operator-only key); nobody granted either.
        hub.hello(hello("thief", &[("role", "sensor"), ("shoal.dev/x", "y")]))
            .unwrap();
        join(&mut hub, "a", &[("role", "sensor")]);
        hub.apply(parse_workloads(M).unwrap()).unwrap();
        assert_eq!(placed(&hub, "sensor"), ["a"]);
        let view = |hub: &HubCore<MemStore>| {
            hub.device_views()
                .into_iter()
                .find(|v| v.id == "thief")
                .unwrap()
        };
        assert!(view(&hub).labels.is_empty());
        assert_eq!(view(&hub).requested_labels.len(), 2);

        // Refusals change nothing: an unknown device, a value changed without --overwrite.
        let r = hub
            .label(&id("nobody"), &change(&["role=sensor"], false))
            .unwrap();
        assert_eq!(r, Err(LabelRefusal::UnknownDevice(id("nobody"))));
        let r = hub.label(&id("a"), &change(&["role=db"], false)).unwrap();
        assert!(
            matches!(r, Err(LabelRefusal::Invalid(LabelError::Exists { .. }))),
            "{r:?}"
        );
        assert_eq!(labels_of(&hub, "a"), ["role=sensor"]);

        // The operator grants it: placed; the device's next hello cannot change that.
        let out = hub
            .label(&id("thief"), &change(&["role=sensor"], false))
            .unwrap()
            .unwrap();
        assert!(out.iter().any(|d| d.device_id == id("thief")));
        assert_eq!(placed(&hub, "sensor"), ["a", "thief"]);
        assert_eq!(
            view(&hub).requested_labels.len(),
            1,
            "the reserved key stays ungranted"
        );
        hub.hello(hello("thief", &[("role", "db")])).unwrap();
        assert_eq!(labels_of(&hub, "thief"), ["role=sensor"]);
        assert_eq!(placed(&hub, "sensor"), ["a", "thief"]);
        // Taken away again: the replica leaves.
        hub.label(&id("thief"), &change(&["role-"], false))
            .unwrap()
            .unwrap();
        assert_eq!(placed(&hub, "sensor"), ["a"]);
        // An operator may use the reserved prefix.
        hub.label(&id("thief"), &change(&["shoal.dev/ring=canary"], false))
            .unwrap()
            .unwrap();
        assert_eq!(labels_of(&hub, "thief"), ["shoal.dev/ring=canary"]);
    }

    #[test]
    fn an_enrolled_device_shows_before_it_connects_and_keeps_its_grant_on_reenrolment() {
        let mut hub = HubCore::open(MemStore::default(), "http://h".into()).unwrap();
        hub.apply(parse_workloads(M).unwrap()).unwrap();
        hub.enrolled(&id("new"), Some(grant("t1", &[("role", "sensor")], true)))
            .unwrap();
        let v = hub.device_views();
        assert_eq!((v.len(), v[0].online, v[0].last_seen_ms), (1, false, 0));
        assert_eq!(labels_of(&hub, "new"), ["role=sensor"]);
        // Never connected: never lost, nothing placed on it until it is online.
        let far = now_ms() + 10 * 3_600_000;
        hub.check_lost(far, 30_000).unwrap();
        assert!(!hub.device_views()[0].lost);
        assert!(hub
            .assignments()
            .get(&WorkloadName::try_from("sensor").unwrap())
            .is_none_or(|a| a.is_empty()));
        hub.hello(hello("new", &[])).unwrap();
        assert_eq!(placed(&hub, "sensor"), ["new"]);
        // Enrolling again (a wiped board, a token bound to it) keeps the labels it has and
        // adds what the new token grants; the state is issued anew for its new key.
        let g = hub.desired[&id("new")].generation;
        let out = hub
            .enrolled(&id("new"), Some(grant("t2", &[("zone", "a")], false)))
            .unwrap();
        assert!(out
            .iter()
            .any(|d| d.device_id == id("new") && d.generation > g));
        assert_eq!(labels_of(&hub, "new"), ["role=sensor", "zone=a"]);
        // A grant applies once: told of the same enrollment again (a replayed message),
        // the hub does not bring back a label the operator removed since.
        hub.label(&id("new"), &change(&["zone-"], false))
            .unwrap()
            .unwrap();
        hub.enrolled(&id("new"), Some(grant("t2", &[("zone", "a")], false)))
            .unwrap();
        assert_eq!(labels_of(&hub, "new"), ["role=sensor"]);
        // An unbound token enrolls a new identity (the id's enrollment record was gone):
        // it gets what its token grants, not what the id had.
        hub.enrolled(&id("new"), Some(grant("t3", &[("zone", "b")], true)))
            .unwrap();
        assert_eq!(labels_of(&hub, "new"), ["zone=b"]);
        // A notice about an id with no grant in the book (forged, or a lost record) records
        // nothing.
        hub.enrolled(&id("ghost"), None).unwrap();
        assert!(hub.labels_of_device(&id("ghost")).is_none());
        // A new leader catching up on the book applies nothing twice.
        let before = hub.device_views();
        let out = hub
            .apply_grants(vec![(id("new"), Some(grant("t3", &[("zone", "b")], true)))])
            .unwrap();
        assert!(out.is_empty());
        assert_eq!(hub.device_views(), before);
    }

    #[test]
    fn records_from_before_the_upgrade_keep_what_their_devices_reported_then() {
        let store = std::sync::Arc::new(MemStore::default());
        let old = DeviceRecord {
            hello: hello("old", &[("role", "sensor"), ("shoal.dev/x", "y")]),
            first_seen_ms: 1,
            last_seen_ms: 1,
            cordoned: false,
            draining: false,
            labels: None,
            granted_by: None,
        };
        store.put_device(&old).unwrap();
        let mut hub = HubCore::open(Shared(store.clone()), "http://h".into()).unwrap();
        assert_eq!(labels_of(&hub, "old"), ["role=sensor"]);
        // Written back as the operator's, so what the device says later is a request only.
        let rec = &store.load().unwrap().devices[&id("old")];
        assert_eq!(rec.labels.as_ref().map(|l| l.len()), Some(1));
        hub.hello(hello("old", &[("role", "vault")])).unwrap();
        assert_eq!(labels_of(&hub, "old"), ["role=sensor"]);
        let again = HubCore::open(Shared(store.clone()), "http://h".into()).unwrap();
        assert_eq!(labels_of(&again, "old"), ["role=sensor"]);
        // Once the store's labels are the operator's, a record without labels (an older
        // replica rewrote it) adopts nothing the device says.
        let mut rewritten = store.load().unwrap().devices[&id("old")].clone();
        rewritten.labels = None;
        rewritten.hello = hello("old", &[("role", "vault")]);
        store.put_device(&rewritten).unwrap();
        let third = HubCore::open(Shared(store), "http://h".into()).unwrap();
        assert!(labels_of(&third, "old").is_empty());
    }

    #[test]
    fn an_insecure_fleet_lets_reports_steer_except_reserved_keys() {
        let store = std::sync::Arc::new(MemStore::default());
        let mut hub = HubCore::open_with(Shared(store.clone()), "http://h".into(), true).unwrap();
        // It adopts nothing, and leaves the store unmarked: a hub with identities adopts
        // the reports of before when the fleet moves to TLS.
        assert!(!store.load().unwrap().labels_owned);
        hub.hello(hello("a", &[("role", "sensor"), ("shoal.dev/x", "y")]))
            .unwrap();
        assert_eq!(labels_of(&hub, "a"), ["role=sensor"]);
        hub.apply(parse_workloads(M).unwrap()).unwrap();
        assert_eq!(placed(&hub, "sensor"), ["a"]);
        // The operator's word wins over the report.
        hub.label(&id("a"), &change(&["role=db"], false))
            .unwrap()
            .unwrap();
        assert_eq!(labels_of(&hub, "a"), ["role=db"]);
    }

    #[test]
    fn a_hello_with_absurd_capacity_changes_nothing() {
        let mut hub = HubCore::open(MemStore::default(), "http://h".into()).unwrap();
        hub.hello(hello("a", &[])).unwrap();
        let mut h = hello("a", &[]);
        h.memory = 1 << 60;
        assert!(hub.hello(h).unwrap().is_empty());
        assert_eq!(hub.device_views()[0].memory, 512 << 20);
        let mut h = hello("b", &[]);
        h.arch = "x86\nforged".into();
        hub.hello(h).unwrap();
        assert_eq!(hub.device_views().len(), 1, "b is not recorded");
    }

    #[test]
    fn lost_devices_are_rescheduled_and_return_without_churn() {
        let grace = 30_000;
        let mut hub = HubCore::open(MemStore::default(), "http://h".into()).unwrap();
        join(&mut hub, "a", &[("role", "sensor")]);
        join(&mut hub, "b", &[("role", "sensor")]);
        hub.take_scheduling_runs();
        hub.apply(parse_workloads(M).unwrap()).unwrap();
        assert_eq!(placed(&hub, "web"), ["a", "b"]);
        // web on a and b, sensor on both: four placements, nothing moved.
        let runs = hub.take_scheduling_runs();
        assert_eq!(runs.iter().map(|r| r.placed).sum::<usize>(), 4, "{runs:?}");
        assert_eq!(runs.iter().map(|r| r.moved).sum::<usize>(), 0, "{runs:?}");
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
        let runs = hub.take_scheduling_runs();
        assert_eq!(
            runs.iter().map(|r| r.moved).sum::<usize>(),
            1,
            "web-0 moved: {runs:?}"
        );
        // a comes back: it is no longer lost, and nothing moves back (no churn).
        join(&mut hub, "a", &[("role", "sensor")]);
        assert!(hub.device_views().iter().any(|d| d.id == "a" && !d.lost));
        assert_eq!(placed(&hub, "web"), ["b", "b"]);
        // An online device that stops reporting is lost too.
        beat(&mut hub, "a", later + grace);
        let b_silent = hub.check_lost(later + grace + 1, grace).unwrap();
        assert!(!b_silent.is_empty(), "silent devices are lost");
        assert_eq!(placed(&hub, "web"), ["a", "a"]);
    }

    #[test]
    fn a_new_revision_rolls_out_within_the_budget_and_survives_reopen() {
        let store = std::sync::Arc::new(MemStore::default());
        let mut hub = HubCore::open(Shared(store.clone()), "http://h".into()).unwrap();
        hub.hello(hello("a", &[])).unwrap();
        hub.hello(hello("b", &[])).unwrap();
        let v = |arg: &str| {
            let text = M.split("---").next().unwrap().replace(
                "  replicas: 2\n",
                &format!("  replicas: 2\n  args: [{arg}]\n  update: {{ maxUnavailable: 1 }}\n"),
            );
            parse_workloads(&text).unwrap()
        };
        hub.apply(v("one")).unwrap();
        let (_, publish) = hub.apply(v("two")).unwrap();
        let args: Vec<Vec<String>> = hub
            .desired
            .values()
            .flat_map(|d| d.workloads.iter().map(|w| w.args.clone()))
            .collect();
        assert!(args.contains(&vec!["one".to_string()]), "{args:?}");
        assert!(
            publish.is_empty(),
            "nothing switches before the rollout steps"
        );
        assert!(hub.rolling());
        // Report both running their revisions: the first step switches one replica.
        report_running(&mut hub);
        let step1 = hub.advance_rollouts(now_ms()).unwrap();
        assert_eq!(step1.len(), 1, "one device changes: {step1:?}");
        // The hub restarts mid-rollout: the rollout is still there.
        let mut hub = HubCore::open(Shared(store), "http://h".into()).unwrap();
        hub.hello(hello("a", &[])).unwrap();
        hub.hello(hello("b", &[])).unwrap();
        assert!(hub.rolling());
        report_running(&mut hub);
        hub.advance_rollouts(now_ms()).unwrap();
        report_running(&mut hub);
        hub.advance_rollouts(now_ms()).unwrap();
        assert!(!hub.rolling(), "complete");
        let view = hub
            .workload_view(&WorkloadName::try_from("web").unwrap())
            .unwrap();
        assert_eq!(view.rollout.unwrap().state, "Complete");
        assert!(hub
            .desired
            .values()
            .flat_map(|d| d.workloads.iter())
            .all(|w| w.args == ["two"]));
    }

    #[test]
    fn each_device_gets_the_variant_it_can_run() {
        let mut hub = HubCore::open(MemStore::default(), "http://h".into()).unwrap();
        hub.hello(hello("w1", &[])).unwrap();
        let mut boxed = hello("c1", &[]);
        boxed.runtimes = vec!["container".into()];
        boxed.arch = "aarch64".into();
        hub.hello(boxed).unwrap();
        let text = format!(
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: both }}\nspec:\n  placement: every\n  wasm: {{ module: \"sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\" }}\n  container: {{ image: \"oci://localhost:5000/both:1@{}\", platforms: [linux/arm64] }}\n",
            shoal_api::ids::Digest::of(b"image")
        );
        hub.apply(parse_workloads(&text).unwrap()).unwrap();
        let on = |d: &str| hub.desired[&DeviceId::try_from(d).unwrap()].workloads[0].clone();
        let (w, c) = (on("w1"), on("c1"));
        assert!(w.module.is_some() && w.container.is_none(), "{w:?}");
        assert!(c.module.is_none() && c.container.is_some(), "{c:?}");
        assert_eq!(w.revision, c.revision, "one revision, two variants");
    }

    /// Every replica's args as the desired states say, by replica index.
    fn args_by_replica<S: Store>(hub: &HubCore<S>) -> BTreeMap<u32, String> {
        hub.desired
            .values()
            .flat_map(|d| d.workloads.iter())
            .map(|w| (w.replica, w.args.join(" ")))
            .collect()
    }

    fn web(replicas: u32, arg: &str, update: &str) -> Vec<Workload> {
        let text = M.split("---").next().unwrap().replace(
            "  replicas: 2\n",
            &format!("  replicas: {replicas}\n  args: [{arg}]\n  update: {{ {update} }}\n"),
        );
        parse_workloads(&text).unwrap()
    }

    #[test]
    fn a_surge_rollout_adds_before_it_removes_and_survives_reopen() {
        let store = std::sync::Arc::new(MemStore::default());
        let mut hub = HubCore::open(Shared(store.clone()), "http://h".into()).unwrap();
        for d in ["a", "b", "c"] {
            hub.hello(hello(d, &[])).unwrap();
        }
        let update = "maxUnavailable: 0, maxSurge: 1";
        hub.apply(web(2, "one", update)).unwrap();
        hub.apply(web(2, "two", update)).unwrap();
        report_running(&mut hub);
        hub.advance_rollouts(now_ms()).unwrap();
        // A third replica on the new revision; both old ones still run.
        let by = args_by_replica(&hub);
        assert_eq!(
            by,
            BTreeMap::from([(0, "one".into()), (1, "one".into()), (2, "two".into())])
        );
        // The hub restarts: the surge replica stays.
        let mut hub = HubCore::open(Shared(store), "http://h".into()).unwrap();
        for d in ["a", "b", "c"] {
            hub.hello(hello(d, &[])).unwrap();
        }
        assert_eq!(
            args_by_replica(&hub).len(),
            3,
            "the surge survives a restart"
        );
        let mut most = 0;
        for _ in 0..6 {
            report_running(&mut hub);
            hub.advance_rollouts(now_ms()).unwrap();
            most = most.max(args_by_replica(&hub).len());
            if !hub.rolling() {
                break;
            }
        }
        assert!(!hub.rolling(), "complete");
        assert_eq!(most, 3, "never more than replicas + maxSurge");
        let by = args_by_replica(&hub);
        assert_eq!(by.len(), 2, "{by:?}");
        assert!(by.values().all(|a| a == "two"), "{by:?}");
    }

    #[test]
    fn a_third_revision_mid_rollout_keeps_updated_replicas() {
        let mut hub = HubCore::open(MemStore::default(), "http://h".into()).unwrap();
        for d in ["a", "b", "c", "d"] {
            hub.hello(hello(d, &[])).unwrap();
        }
        let update = "maxUnavailable: 1";
        hub.apply(web(4, "one", update)).unwrap();
        hub.apply(web(4, "two", update)).unwrap();
        report_running(&mut hub);
        hub.advance_rollouts(now_ms()).unwrap();
        let by = args_by_replica(&hub);
        assert_eq!(by.values().filter(|a| *a == "two").count(), 1, "{by:?}");
        let switched = by
            .iter()
            .find(|(_, a)| *a == "two")
            .map(|(i, _)| *i)
            .unwrap();
        // v3 arrives: nothing changes before it steps, and the v2 replica is not sent back.
        let (_, publish) = hub.apply(web(4, "three", update)).unwrap();
        assert!(publish.is_empty(), "{publish:?}");
        assert_eq!(args_by_replica(&hub)[&switched], "two");
        // The rollback target is still the last good revision.
        let view = hub
            .workload_view(&WorkloadName::try_from("web").unwrap())
            .unwrap();
        let rollout = view.rollout.unwrap();
        let first = web(4, "one", update).remove(0).revision();
        assert_eq!(rollout.previous_revision.as_deref(), Some(first.as_str()));
        for _ in 0..8 {
            report_running(&mut hub);
            hub.advance_rollouts(now_ms()).unwrap();
        }
        assert!(!hub.rolling());
        assert!(args_by_replica(&hub).values().all(|a| a == "three"));
    }

    #[test]
    fn operators_pause_resume_promote_and_undo() {
        let mut hub = HubCore::open(MemStore::default(), "http://h".into()).unwrap();
        for d in ["a", "b", "c", "d"] {
            hub.hello(hello(d, &[])).unwrap();
        }
        let name = WorkloadName::try_from("web").unwrap();
        let state =
            |hub: &HubCore<MemStore>| hub.workload_view(&name).unwrap().rollout.unwrap().state;
        let count = |hub: &HubCore<MemStore>, a: &str| {
            args_by_replica(hub).values().filter(|x| *x == a).count()
        };
        // Nothing to steer before a rollout.
        let none = hub.rollout_action(&name, RolloutAction::Pause).unwrap();
        assert!(none.unwrap_err().contains("not found"));
        hub.apply(web(4, "one", "maxUnavailable: 1")).unwrap();
        let none = hub.rollout_action(&name, RolloutAction::Resume).unwrap();
        assert!(none.unwrap_err().contains("no rollout in progress"));

        // Paused: reports come in, nothing switches; resumed: it goes on.
        hub.apply(web(4, "two", "maxUnavailable: 1")).unwrap();
        hub.rollout_action(&name, RolloutAction::Pause)
            .unwrap()
            .unwrap();
        assert_eq!(state(&hub), "Paused");
        for _ in 0..3 {
            report_running(&mut hub);
            hub.advance_rollouts(now_ms()).unwrap();
        }
        assert_eq!(count(&hub, "two"), 0, "a paused rollout switches nothing");
        hub.rollout_action(&name, RolloutAction::Resume)
            .unwrap()
            .unwrap();
        assert_eq!(
            count(&hub, "two"),
            1,
            "resumed: a step at once, within the budget"
        );

        // A canary that does not get ready holds the rest until `promote`.
        hub.apply(web(4, "three", "maxUnavailable: 4, canary: 1"))
            .unwrap();
        let starting = |a: &str| {
            if a == "three" {
                Phase::Starting
            } else {
                Phase::Running
            }
        };
        for _ in 0..4 {
            report(&mut hub, starting);
            hub.advance_rollouts(now_ms()).unwrap();
        }
        assert_eq!(state(&hub), "Canary");
        assert_eq!(count(&hub, "three"), 1, "only the canary");
        hub.rollout_action(&name, RolloutAction::Promote)
            .unwrap()
            .unwrap();
        report(&mut hub, starting);
        hub.advance_rollouts(now_ms()).unwrap();
        assert_eq!(
            count(&hub, "three"),
            4,
            "promoted: the rest within the budget"
        );
        for _ in 0..4 {
            report_running(&mut hub);
            hub.advance_rollouts(now_ms()).unwrap();
        }
        assert_eq!(state(&hub), "Complete");
        assert_eq!(count(&hub, "three"), 4);

        // Scale, then undo: the previous revision's spec, the current replica count.
        hub.scale(&name, 2).unwrap().unwrap();
        hub.rollout_action(&name, RolloutAction::Undo { to: None })
            .unwrap()
            .unwrap();
        assert_eq!(hub.workloads[&name].args, ["two"]);
        assert_eq!(hub.workloads[&name].placement, Placement::Replicas(2));
        // To a named revision (a prefix will do); unknown and current ones are refused.
        let first = web(4, "one", "").remove(0).revision();
        let bad = hub
            .rollout_action(
                &name,
                RolloutAction::Undo {
                    to: Some("zzz".into()),
                },
            )
            .unwrap();
        assert!(bad
            .unwrap_err()
            .contains(r#"revision "zzz" is not in the history"#));
        hub.rollout_action(
            &name,
            RolloutAction::Undo {
                to: Some(first[..6].into()),
            },
        )
        .unwrap()
        .unwrap();
        assert_eq!(hub.workloads[&name].args, ["one"]);
        assert_eq!(hub.workloads[&name].placement, Placement::Replicas(2));
        let same = hub
            .rollout_action(
                &name,
                RolloutAction::Undo {
                    to: Some(first.clone()),
                },
            )
            .unwrap();
        assert!(same.unwrap_err().contains("already runs"));
    }

    /// Every device reports every replica it should run as Running.
    fn report_running<S: Store>(hub: &mut HubCore<S>) {
        report(hub, |_| Phase::Running)
    }

    /// Every device reports every replica it should run, in the phase `phase_of` its args.
    fn report<S: Store>(hub: &mut HubCore<S>, phase_of: impl Fn(&str) -> Phase) {
        let ids: Vec<DeviceId> = hub.desired.keys().cloned().collect();
        for id in ids {
            let workloads = hub.desired[&id]
                .workloads
                .iter()
                .map(|w| shoal_api::messages::InstanceStatus {
                    name: w.name.clone(),
                    replica: w.replica,
                    revision: w.revision.clone(),
                    phase: phase_of(&w.args.join(" ")),
                    restarts: 0,
                    reason: None,
                    exit_code: None,
                    started_at_ms: Some(0),
                    backoff_ms: None,
                    variant: "wasm".into(),
                    healthy: None,
                })
                .collect();
            hub.status(DeviceStatus {
                protocol: 1,
                device_id: id,
                observed_generation: 0,
                workloads,
                time_ms: 0,
            });
        }
    }

    #[test]
    fn drain_moves_replicas_within_the_budget() {
        let mut hub = HubCore::open(MemStore::default(), "http://h".into()).unwrap();
        for d in ["a", "b", "c"] {
            hub.hello(hello(d, &[])).unwrap();
        }
        let text = M.split("---").next().unwrap().replace(
            "  replicas: 2\n",
            "  replicas: 6\n  update: { maxUnavailable: 1 }\n",
        );
        hub.apply(parse_workloads(&text).unwrap()).unwrap();
        assert_eq!(placed(&hub, "web").iter().filter(|d| *d == "b").count(), 2);
        report_running(&mut hub);
        let b: DeviceId = "b".parse().unwrap();
        hub.drain(&b).unwrap().unwrap();
        assert_eq!(
            placed(&hub, "web").iter().filter(|d| *d == "b").count(),
            1,
            "one at a time: {:?}",
            placed(&hub, "web")
        );
        assert!(hub.draining());
        // Until the moved replica reports Running, nothing else moves.
        hub.advance_drains().unwrap();
        assert_eq!(placed(&hub, "web").iter().filter(|d| *d == "b").count(), 1);
        report_running(&mut hub);
        hub.advance_drains().unwrap();
        assert!(!placed(&hub, "web").contains(&"b".to_string()));
        report_running(&mut hub);
        hub.advance_drains().unwrap();
        assert!(!hub.draining(), "drain complete");
        assert!(hub.device_views().iter().any(|d| d.id == "b" && d.cordoned));
    }

    #[test]
    fn cordon_and_drain() {
        let mut hub = HubCore::open(MemStore::default(), "http://h".into()).unwrap();
        join(&mut hub, "a", &[("role", "sensor")]);
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

    fn stored(name: &str, keys: &[&str], version: &str) -> StoredSecret {
        StoredSecret {
            name: SecretName::try_from(name).unwrap(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            version: version.into(),
            encrypted: "opaque".into(),
            updated_ms: 1,
        }
    }

    #[test]
    fn secrets_are_checked_versioned_and_kept_while_used() {
        let mut hub = HubCore::open(MemStore::default(), "http://h".into()).unwrap();
        join(&mut hub, "a", &[("role", "sensor")]);
        hub.hello(hello("b", &[])).unwrap();
        let uses = parse_workloads(
            r#"
apiVersion: shoal.dev/v1
kind: Workload
metadata: { name: sensor }
spec:
  placement: every
  selector: { role: sensor }
  wasm: { module: "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" }
  secrets: [{ name: db, env: { PASS: password } }]
"#,
        )
        .unwrap();
        let located: Vec<(usize, &Workload)> = uses.iter().map(|w| (1, w)).collect();
        // Missing secret, then a secret without the key the workload reads.
        let errs = hub.check_secrets(&located, &[]);
        assert!(
            errs[0].message.contains("secret \"db\" does not exist"),
            "{errs:?}"
        );
        let wrong = stored("db", &["user"], "01");
        let errs = hub.check_secrets(&located, &[(2, &wrong)]);
        assert!(
            errs[0].message.contains("has no key \"password\""),
            "{errs:?}"
        );
        let v1 = stored("db", &["password"], "01");
        assert!(hub.check_secrets(&located, &[(2, &v1)]).is_empty());
        assert_eq!(
            hub.apply_secrets(vec![v1.clone()]).unwrap()["db"],
            "created"
        );
        let (_, publish) = hub.apply(uses.clone()).unwrap();
        // Only the device that runs the workload is told about the secret, at its version.
        assert_eq!(publish.len(), 1);
        assert_eq!(publish[0].device_id.as_str(), "a");
        assert_eq!(publish[0].workloads[0].secrets[0].version, "01");
        assert!(
            publish[0].secrets.is_empty(),
            "values are sealed by the server"
        );
        let gen = publish[0].generation;

        // The same content again: unchanged, nothing published.
        assert_eq!(
            hub.apply_secrets(vec![v1.clone()]).unwrap()["db"],
            "unchanged"
        );
        assert!(hub.apply(vec![]).unwrap().1.is_empty());
        // New content: a new version reaches device a under a new generation.
        let v2 = stored("db", &["password"], "02");
        assert_eq!(hub.apply_secrets(vec![v2]).unwrap()["db"], "configured");
        let (_, publish) = hub.apply(vec![]).unwrap();
        assert_eq!(publish.len(), 1);
        assert_eq!(publish[0].workloads[0].secrets[0].version, "02");
        assert!(publish[0].generation > gen);
        // Dropping the key the stored workload reads is refused.
        let errs = hub.check_secrets(&[], &[(1, &stored("db", &["user"], "03"))]);
        assert!(
            errs[0].message.contains("workload \"sensor\" reads it"),
            "{errs:?}"
        );
        // Two definitions in one apply are refused.
        let errs = hub.check_secrets(&[], &[(1, &v1), (2, &v1)]);
        assert!(errs[0].message.contains("duplicated"), "{errs:?}");

        // In use: not deleted; unused: deleted; gone: not found. Views never hold values.
        let db = SecretName::try_from("db").unwrap();
        assert_eq!(
            hub.delete_secret(&db).unwrap(),
            Err(SecretRefusal::InUse(vec!["sensor".into()]))
        );
        let view = &hub.secret_views()[0];
        assert_eq!(
            (view.keys.clone(), view.used_by.clone()),
            (vec!["password".to_string()], vec!["sensor".to_string()])
        );
        hub.delete(&WorkloadName::try_from("sensor").unwrap())
            .unwrap();
        assert_eq!(hub.delete_secret(&db).unwrap(), Ok(()));
        assert_eq!(
            hub.delete_secret(&db).unwrap(),
            Err(SecretRefusal::NotFound)
        );
        assert!(hub.secret_views().is_empty());
    }

    #[test]
    fn apply_places_and_bumps_generations() {
        let mut hub = HubCore::open(MemStore::default(), "http://h".into()).unwrap();
        let a = join(&mut hub, "a", &[("role", "sensor")]);
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
        let c = join(&mut hub, "c", &[("role", "sensor")]);
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

        let mut hub = HubCore::open(Shared(store.clone()), "x".into()).unwrap();
        hub.hello(hello("a", &[])).unwrap();
        hub.apply(parse_workloads(M).unwrap()).unwrap();
        let before = hub.all_desired();
        let hub2 = HubCore::open(Shared(store), "x".into()).unwrap();
        assert_eq!(hub2.all_desired(), before);
        assert_eq!(hub2.assignments(), hub.assignments());
    }
}
