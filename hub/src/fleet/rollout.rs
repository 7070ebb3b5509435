//! Rolling updates: which replicas of a workload run the new revision, decided step by step
//! from what the devices report. Pure: [`step`] takes the rollout, the workload's update
//! policy, the observed replicas and the time, and changes the rollout; the hub's core
//! persists it and publishes the desired states that follow.
//!
//! - A rollout starts when a stored workload gets a new revision. Each replica placed then
//!   keeps the revision it runs (`running`: usually the previous one; after an apply in the
//!   middle of a rollout, some may run the superseded one) until it is replaced. Replicas
//!   placed later start on the new revision.
//! - Without `maxSurge`, replicas are replaced in place, in index order: first those their
//!   device reports as not ready (replacing them costs no availability), then the others
//!   while fewer than `maxUnavailable` of the wanted replicas (unplaced ones included) are
//!   unavailable. A replica nobody has reported on (a hub that just restarted) is not assumed
//!   down.
//! - With `maxSurge`, up to that many extra replicas of the new revision are placed (`surge`)
//!   before old ones stop; an old replica is retired (removed, not replaced in place) while at
//!   least `replicas - maxUnavailable` stay ready. `maxUnavailable` may then be 0. Replicas
//!   keep their index; new ones take the lowest free index, so indices may have gaps.
//! - A replica is ready when it reports the revision it should run, `Running` (and healthy,
//!   with a probe), for at least `minReadySeconds`.
//! - The progress deadline counts from the rollout's last progress, not its start, and also
//!   while the rollout waits for its canary (a canary that never gets ready fails it).
//! - With `canary: N`, once N replicas run the new revision the rollout waits until they are
//!   all ready (or `shoal rollout promote`). With `maxSurge`, the canaries are extra replicas
//!   (the surge grows to N if smaller), so the old revision keeps serving at full strength.
//! - A new-revision replica that fails (`CrashLoopBackOff`, `Failed`), or a rollout that
//!   misses its progress deadline, stops the rollout: with `autoRollback` every replica goes
//!   back to the last good revision, with the reason recorded; without it the rollout stays
//!   `Failed` where it is (updated replicas keep the new revision) until the operator acts.

use serde::{Deserialize, Serialize};
use shoal_api::model::ids::DeviceId;
use shoal_api::model::quantity::format_duration_ms;
use shoal_api::model::workload::{Placement, UpdatePolicy, Workload};
use shoal_api::wire::messages::Phase;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RolloutState {
    Progressing,
    Paused,
    /// Waiting for the canary replicas to become ready (or a promote).
    Canary,
    Complete,
    /// Stopped on failure, without automatic rollback.
    Failed,
    /// Stopped on failure and returned to the previous revision.
    RolledBack,
}

impl std::fmt::Display for RolloutState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// One workload's rollout, persisted with the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", from = "StoredRollout")]
pub struct Rollout {
    /// The revision being rolled out (the stored spec).
    pub revision: String,
    /// The last good revision, which a rollback restores; `None` once complete.
    pub previous: Option<Workload>,
    /// Replicas not yet on `revision` → the revision each runs (a key of `specs`).
    pub running: BTreeMap<u32, String>,
    /// The specs of the revisions in `running`.
    pub specs: BTreeMap<String, Workload>,
    /// Replicas wanted beyond `spec.replicas` while old ones still run (`maxSurge`).
    pub surge: u32,
    /// Old replicas the last step stopped for good (surge mode): the core removes them from
    /// the assignments and empties this.
    #[serde(skip)]
    pub retire: Vec<u32>,
    pub state: RolloutState,
    /// Why it stopped (failed, rolled back), or what it waits for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub started_ms: u64,
    /// Last time the rollout moved (replicas switched, resumed, promoted): the progress
    /// deadline counts from here, so a paused or steadily progressing rollout does not fail.
    pub progress_ms: u64,
    /// `shoal rollout promote`: go past the canary without waiting.
    pub promoted: bool,
}

/// A rollout as stored, including the form earlier hubs wrote (`old` replicas at the start,
/// `updated` ones switched since; all old ones ran `previous`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredRollout {
    revision: String,
    previous: Option<Workload>,
    #[serde(default)]
    running: BTreeMap<u32, String>,
    #[serde(default)]
    specs: BTreeMap<String, Workload>,
    #[serde(default)]
    surge: u32,
    state: RolloutState,
    #[serde(default)]
    reason: Option<String>,
    started_ms: u64,
    #[serde(default)]
    progress_ms: u64,
    #[serde(default)]
    promoted: bool,
    #[serde(default)]
    old: BTreeSet<u32>,
    #[serde(default)]
    updated: BTreeSet<u32>,
}

impl From<StoredRollout> for Rollout {
    fn from(s: StoredRollout) -> Self {
        let mut running = s.running;
        let mut specs = s.specs;
        if let Some(prev) = &s.previous {
            let legacy: Vec<u32> = s.old.difference(&s.updated).copied().collect();
            if !legacy.is_empty() {
                let rev = prev.revision();
                for i in legacy {
                    running.insert(i, rev.clone());
                }
                specs.insert(rev, prev.clone());
            }
        }
        Self {
            revision: s.revision,
            previous: s.previous,
            running,
            specs,
            surge: s.surge,
            retire: Vec::new(),
            state: s.state,
            reason: s.reason,
            started_ms: s.started_ms,
            progress_ms: s.progress_ms,
            promoted: s.promoted,
        }
    }
}

impl Rollout {
    /// Starts rolling `target` out over `placed` (each replica with the spec it runs now).
    /// `stable` is the last good revision, the one a rollback restores.
    pub fn start<'a>(
        target: &Workload,
        stable: Workload,
        placed: impl IntoIterator<Item = (u32, &'a Workload)>,
        now: u64,
    ) -> Self {
        let revision = target.revision();
        let mut running = BTreeMap::new();
        let mut specs = BTreeMap::new();
        for (i, spec) in placed {
            let rev = spec.revision();
            if rev != revision {
                specs.entry(rev.clone()).or_insert_with(|| spec.clone());
                running.insert(i, rev);
            }
        }
        Self {
            revision,
            previous: Some(stable),
            running,
            specs,
            surge: 0,
            retire: Vec::new(),
            state: RolloutState::Progressing,
            reason: None,
            started_ms: now,
            progress_ms: now,
            promoted: false,
        }
    }

    /// The earlier spec replica `i` still runs, if it is not on the new revision.
    pub fn spec_of(&self, i: u32) -> Option<&Workload> {
        self.running.get(&i).and_then(|rev| self.specs.get(rev))
    }

    /// Forgets replicas that are gone or moved (they start afresh on the new revision), and
    /// specs no replica runs any more.
    pub fn keep_only(&mut self, still: impl Fn(u32) -> bool) {
        self.running.retain(|i, _| still(*i));
        let used: BTreeSet<&String> = self.running.values().collect();
        self.specs.retain(|rev, _| used.contains(rev));
    }

    /// Extra replicas the scheduler should place for this rollout now.
    pub fn extra(&self) -> u32 {
        match self.state {
            RolloutState::Complete | RolloutState::RolledBack => 0,
            _ => self.surge,
        }
    }

    pub fn active(&self) -> bool {
        matches!(
            self.state,
            RolloutState::Progressing | RolloutState::Paused | RolloutState::Canary
        )
    }

    fn finish(&mut self) {
        self.previous = None;
        self.running.clear();
        self.specs.clear();
        self.surge = 0;
    }
}

/// One revision a workload has had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub revision: String,
    pub applied_ms: u64,
    /// `in progress`, `complete`, `failed: …`, `rolled back: …`, `superseded`.
    pub outcome: String,
    /// The spec, for `shoal rollout undo`.
    pub spec: Workload,
}

/// Revisions kept per workload.
pub const HISTORY: usize = 10;

/// What the store keeps per workload: its current rollout and its revision history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub workload: shoal_api::model::ids::WorkloadName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
}

impl Record {
    /// Notes a new revision (the last `HISTORY` are kept); an unfinished one is superseded.
    pub fn push(&mut self, spec: &Workload, now: u64, outcome: &str) {
        if let Some(last) = self.history.last_mut() {
            if last.outcome == "in progress" {
                last.outcome = "superseded".into();
            }
        }
        self.history.push(HistoryEntry {
            revision: spec.revision(),
            applied_ms: now,
            outcome: outcome.to_string(),
            spec: spec.clone(),
        });
        let excess = self.history.len().saturating_sub(HISTORY);
        self.history.drain(..excess);
    }

    /// Sets the outcome of the latest entry for `revision`.
    pub fn finish(&mut self, revision: &str, outcome: &str) {
        if let Some(e) = self
            .history
            .iter_mut()
            .rev()
            .find(|e| e.revision == revision)
        {
            e.outcome = outcome.to_string();
        }
    }
}

/// What a device last reported about one replica (and where it is placed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub replica: u32,
    pub device: DeviceId,
    /// `None`: nothing reported (yet), or the device is offline.
    pub revision: Option<String>,
    pub phase: Phase,
    pub started_at_ms: Option<u64>,
    pub reason: Option<String>,
    /// The health probe's verdict, if the replica has one.
    pub healthy: Option<bool>,
}

/// What a step decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing changed.
    Unchanged,
    /// Replicas were switched, or the state changed: publish desired states.
    Changed,
    /// Failed with auto-rollback: the core restores `previous` as the workload's spec.
    RollBack {
        previous: Box<Workload>,
        reason: String,
    },
}

/// Advances `r` by one step. `target` is the stored (new) spec; `observed` every placed
/// replica of the workload.
pub fn step(r: &mut Rollout, target: &Workload, observed: &[Observed], now: u64) -> Outcome {
    let policy: UpdatePolicy = target.update;
    if !matches!(r.state, RolloutState::Progressing | RolloutState::Canary) {
        return Outcome::Unchanged;
    }
    let Some(previous) = r.previous.clone() else {
        return Outcome::Unchanged;
    };
    let should_run = |i: u32| -> &str { r.running.get(&i).map_or(r.revision.as_str(), |x| x) };
    // With a health probe, ready means probed healthy; without, running is enough.
    let probed = |i: u32| r.spec_of(i).unwrap_or(target).health.is_some();
    let ready = |o: &Observed| {
        o.phase == Phase::Running
            && o.healthy != Some(false)
            && (!probed(o.replica) || o.healthy == Some(true))
            && o.revision.as_deref() == Some(should_run(o.replica))
            && o.started_at_ms
                .is_some_and(|t| now.saturating_sub(t) >= policy.min_ready_ms)
    };

    // Failure of the new revision stops the rollout.
    let failed = observed.iter().find(|o| {
        o.revision.as_deref() == Some(r.revision.as_str())
            && matches!(o.phase, Phase::CrashLoopBackOff | Phase::Failed)
            && !r.running.contains_key(&o.replica)
    });
    // The canary gate counts too: a canary that never becomes ready (stuck pulling, never
    // healthy, nowhere to run) fails the rollout like any other lack of progress.
    let since = r.started_ms.max(r.progress_ms);
    let overdue = now.saturating_sub(since) > policy.progress_deadline_ms;
    if failed.is_some() || overdue {
        let reason = match failed {
            Some(o) => format!(
                "replica {} on {} is {}{}",
                o.replica,
                o.device,
                o.phase,
                o.reason
                    .as_deref()
                    .map(|x| format!(": {x}"))
                    .unwrap_or_default()
            ),
            None => format!(
                "progress deadline of {} exceeded{}",
                format_duration_ms(policy.progress_deadline_ms),
                if r.state == RolloutState::Canary {
                    " waiting for the canary to be ready"
                } else {
                    ""
                }
            ),
        };
        r.reason = Some(reason.clone());
        if policy.auto_rollback {
            r.state = RolloutState::RolledBack;
            r.finish();
            return Outcome::RollBack {
                previous: Box::new(previous),
                reason,
            };
        }
        r.state = RolloutState::Failed;
        return Outcome::Changed;
    }

    let wanted = match target.placement {
        Placement::Replicas(n) => n,
        Placement::Every => observed.len() as u32,
    };
    let ready_set: BTreeSet<u32> = observed
        .iter()
        .filter(|o| ready(o))
        .map(|o| o.replica)
        .collect();
    // Old replicas still to replace, in index order.
    let pending: Vec<u32> = observed
        .iter()
        .map(|o| o.replica)
        .filter(|i| r.running.contains_key(i))
        .collect();
    let new_count = observed.len() - pending.len();

    // Done when every replica runs the new revision and is ready.
    if pending.is_empty() && observed.iter().all(|o| ready_set.contains(&o.replica)) {
        r.state = RolloutState::Complete;
        r.reason = None;
        r.finish();
        return Outcome::Changed;
    }

    // The canary gate: a canary larger than the workload is all of it.
    let canary = policy.canary.min(wanted);
    let mut canary_phase = canary > 0 && !r.promoted;
    if canary_phase && new_count as u32 >= canary {
        let canary_ready = observed
            .iter()
            .filter(|o| !r.running.contains_key(&o.replica))
            .all(|o| ready_set.contains(&o.replica));
        if !canary_ready {
            if r.state != RolloutState::Canary {
                r.state = RolloutState::Canary;
                r.reason = Some(format!(
                    "waiting for {canary} canary replica(s) to be ready (or `shoal rollout promote`)"
                ));
                return Outcome::Changed;
            }
            return Outcome::Unchanged;
        }
        r.promoted = true;
        r.state = RolloutState::Progressing;
        r.reason = None;
        canary_phase = false;
    }

    // Old replicas their device reports as not ready (starting, crash-looping) go first:
    // replacing them costs nothing. One with no report at all (device silent, hub just
    // restarted) is not known to be down: it goes through the budget like a ready one.
    let reported_down = |i: &u32| {
        !ready_set.contains(i)
            && observed
                .iter()
                .any(|o| o.replica == *i && o.revision.is_some())
    };
    let order = pending
        .iter()
        .filter(|i| reported_down(i))
        .chain(pending.iter().filter(|i| !reported_down(i)))
        .copied();
    let surge = policy.surge(wanted);
    let changed = if surge == 0 {
        // In place: switch old replicas to the new spec, within the budget. Unplaced
        // replicas count as unavailable too.
        let total = wanted.max(observed.len() as u32);
        let limit = if canary_phase {
            canary.saturating_sub(new_count as u32) as usize
        } else {
            usize::MAX
        };
        let unavailable = total.saturating_sub(ready_set.len() as u32);
        let mut budget = policy.unavailable(total).saturating_sub(unavailable);
        let mut picked = Vec::new();
        for i in order {
            if picked.len() >= limit {
                break;
            }
            if !reported_down(&i) {
                if budget == 0 {
                    break;
                }
                budget -= 1;
            }
            picked.push(i);
        }
        for i in &picked {
            r.running.remove(i);
        }
        !picked.is_empty()
    } else {
        // Surge: extra new replicas first; old ones retire while enough stay ready.
        let mut left = pending.len() as u32;
        if !canary_phase {
            let floor = wanted.saturating_sub(policy.unavailable(wanted));
            let mut available = ready_set.len() as u32;
            for i in order {
                let up = ready_set.contains(&i);
                if up && available <= floor {
                    break;
                }
                if up {
                    available -= 1;
                }
                r.running.remove(&i);
                r.retire.push(i);
                left -= 1;
            }
        }
        let want = if canary_phase {
            surge.max(canary).min(left)
        } else {
            surge.min(left)
        };
        let changed = !r.retire.is_empty() || want != r.surge;
        r.surge = want;
        changed
    };
    r.keep_only(|_| true);
    if !changed {
        return Outcome::Unchanged;
    }
    r.progress_ms = now;
    Outcome::Changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::model::workload::{parse_workloads, Budget};

    fn spec(args: &str, replicas: u32) -> Workload {
        let text = format!(
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: web }}\nspec:\n  replicas: {replicas}\n  wasm: {{ module: \"sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\" }}\n  args: [{args}]\n"
        );
        parse_workloads(&text).unwrap().remove(0)
    }

    fn begin(new: &Workload, old: &Workload, n: u32) -> Rollout {
        Rollout::start(new, old.clone(), (0..n).map(|i| (i, old)), 0)
    }

    /// Replicas among `0..n` on the new revision.
    fn updated(r: &Rollout, n: u32) -> BTreeSet<u32> {
        (0..n).filter(|i| !r.running.contains_key(i)).collect()
    }

    fn obs(r: &Rollout, n: u32, phases: &[(u32, Phase, &str)]) -> Vec<Observed> {
        obs_of(r, (0..n).collect(), phases)
    }

    fn obs_of(r: &Rollout, placed: Vec<u32>, phases: &[(u32, Phase, &str)]) -> Vec<Observed> {
        let prev = r
            .previous
            .as_ref()
            .map(|p| p.revision())
            .unwrap_or_default();
        placed
            .into_iter()
            .map(|i| {
                let (phase, rev) = phases
                    .iter()
                    .find(|(j, _, _)| *j == i)
                    .map(|(_, p, which)| {
                        let rev = if *which == "new" {
                            r.revision.clone()
                        } else {
                            prev.clone()
                        };
                        (*p, rev)
                    })
                    .unwrap_or((
                        Phase::Running,
                        r.running.get(&i).cloned().unwrap_or(r.revision.clone()),
                    ));
                Observed {
                    replica: i,
                    device: format!("d{i}").parse().unwrap(),
                    revision: Some(rev),
                    phase,
                    started_at_ms: Some(0),
                    reason: None,
                    healthy: None,
                }
            })
            .collect()
    }

    /// One step with every replica ready on the revision it should run.
    fn tick(r: &mut Rollout, new: &Workload, n: u32, now: u64) -> Outcome {
        let o = obs(r, n, &[]);
        step(r, new, &o, now)
    }

    #[test]
    fn rolls_within_max_unavailable_and_completes() {
        let old = spec("a", 4);
        let mut new = spec("b", 4);
        new.update.max_unavailable = Budget::Count(1);
        let mut r = begin(&new, &old, 4);
        // Everyone ready on the old revision: one at a time.
        assert_eq!(tick(&mut r, &new, 4, 1), Outcome::Changed);
        assert_eq!(updated(&r, 4), [0].into());
        // Replica 0 restarting on the new revision: no budget left.
        let o = obs(&r, 4, &[(0, Phase::Starting, "new")]);
        assert_eq!(step(&mut r, &new, &o, 2), Outcome::Unchanged);
        // Ready: the next one.
        assert_eq!(tick(&mut r, &new, 4, 3), Outcome::Changed);
        assert_eq!(updated(&r, 4), [0, 1].into());
        tick(&mut r, &new, 4, 4);
        tick(&mut r, &new, 4, 5);
        assert_eq!(updated(&r, 4).len(), 4);
        assert_eq!(tick(&mut r, &new, 4, 6), Outcome::Changed);
        assert_eq!(r.state, RolloutState::Complete);
        assert!(r.spec_of(0).is_none());
    }

    #[test]
    fn unready_old_replicas_are_replaced_for_free() {
        let old = spec("a", 3);
        let mut new = spec("b", 3);
        new.update.max_unavailable = Budget::Count(1);
        let mut r = begin(&new, &old, 3);
        let o = obs(&r, 3, &[(2, Phase::CrashLoopBackOff, "old")]);
        step(&mut r, &new, &o, 1);
        assert_eq!(
            updated(&r, 3),
            [2].into(),
            "the broken old one goes first, budget intact"
        );
    }

    #[test]
    fn canary_waits_then_promotes_itself() {
        let old = spec("a", 4);
        let mut new = spec("b", 4);
        new.update.canary = 1;
        new.update.max_unavailable = Budget::Count(4);
        let mut r = begin(&new, &old, 4);
        tick(&mut r, &new, 4, 1);
        assert_eq!(updated(&r, 4), [0].into(), "only the canary");
        let o = obs(&r, 4, &[(0, Phase::Starting, "new")]);
        step(&mut r, &new, &o, 2);
        assert_eq!(r.state, RolloutState::Canary);
        assert_eq!(updated(&r, 4).len(), 1);
        tick(&mut r, &new, 4, 3);
        assert_eq!(
            updated(&r, 4).len(),
            4,
            "canary ready: the rest at once within the budget"
        );
    }

    #[test]
    fn a_canary_that_never_gets_ready_misses_the_deadline() {
        let old = spec("a", 3);
        let mut new = spec("b", 3);
        new.update.canary = 1;
        new.update.auto_rollback = true;
        new.update.progress_deadline_ms = 60_000;
        let mut r = begin(&new, &old, 3);
        tick(&mut r, &new, 3, 1);
        let stuck = |r: &Rollout| obs(r, 3, &[(0, Phase::Pulling, "new")]);
        let o = stuck(&r);
        step(&mut r, &new, &o, 2);
        assert_eq!(r.state, RolloutState::Canary);
        let o = stuck(&r);
        assert_eq!(step(&mut r, &new, &o, 60_001), Outcome::Unchanged);
        let o = stuck(&r);
        match step(&mut r, &new, &o, 60_002) {
            Outcome::RollBack { reason, .. } => assert_eq!(
                reason,
                "progress deadline of 1m exceeded waiting for the canary to be ready"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(r.state, RolloutState::RolledBack);
    }

    #[test]
    fn a_failing_new_revision_rolls_back_or_stops() {
        let old = spec("a", 3);
        let mut new = spec("b", 3);
        new.update.auto_rollback = true;
        let mut r = begin(&new, &old, 3);
        tick(&mut r, &new, 3, 1);
        let o = obs(&r, 3, &[(0, Phase::CrashLoopBackOff, "new")]);
        match step(&mut r, &new, &o, 2) {
            Outcome::RollBack { previous, reason } => {
                assert_eq!(*previous, old);
                assert!(
                    reason.contains("replica 0 on d0 is CrashLoopBackOff"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.state, RolloutState::RolledBack);
        // Without auto-rollback it stops where it is.
        new.update.auto_rollback = false;
        let mut r = begin(&new, &old, 3);
        tick(&mut r, &new, 3, 1);
        let o = obs(&r, 3, &[(0, Phase::CrashLoopBackOff, "new")]);
        assert_eq!(step(&mut r, &new, &o, 2), Outcome::Changed);
        assert_eq!(r.state, RolloutState::Failed);
        assert_eq!(
            step(&mut r, &new, &o, 3),
            Outcome::Unchanged,
            "stays stopped"
        );
    }

    #[test]
    fn deadline_and_min_ready() {
        let old = spec("a", 2);
        let mut new = spec("b", 2);
        new.update.min_ready_ms = 5000;
        new.update.progress_deadline_ms = 60_000;
        new.update.max_unavailable = Budget::Count(1);
        let mut r = begin(&new, &old, 2);
        tick(&mut r, &new, 2, 10_000);
        // Running for 1 s only (started at 9 s): not ready yet, so no second replica.
        let mut o = obs(&r, 2, &[]);
        o[0].started_at_ms = Some(9_000);
        assert_eq!(step(&mut r, &new, &o, 10_000), Outcome::Unchanged);
        o[0].started_at_ms = Some(4_000);
        assert_eq!(step(&mut r, &new, &o, 10_000), Outcome::Changed);
        assert_eq!(step(&mut r, &new, &o, 70_001), Outcome::Changed);
        assert_eq!(r.state, RolloutState::Failed);
        assert!(r.reason.as_deref().unwrap().contains("deadline"));
    }

    #[test]
    fn with_a_health_probe_ready_means_probed_healthy() {
        let old = spec("a", 2);
        let mut new = spec("b", 2);
        new.update.max_unavailable = Budget::Count(1);
        new.health = Some(shoal_api::model::workload::Health {
            check: shoal_api::model::workload::Check::Tcp { port: 80 },
            period_ms: 1000,
            timeout_ms: 100,
            failure_threshold: 1,
        });
        let mut r = begin(&new, &old, 2);
        tick(&mut r, &new, 2, 1);
        assert_eq!(updated(&r, 2), [0].into());
        // Running but not yet probed: not ready, so replica 1 waits.
        assert_eq!(tick(&mut r, &new, 2, 2), Outcome::Unchanged);
        let mut o = obs(&r, 2, &[]);
        o[0].healthy = Some(true);
        assert_eq!(step(&mut r, &new, &o, 3), Outcome::Changed);
        assert_eq!(updated(&r, 2), [0, 1].into());
    }

    #[test]
    fn unreported_replicas_are_not_free_to_replace() {
        // Right after a hub restart nothing has reported yet: the budget still holds.
        let old = spec("a", 4);
        let mut new = spec("b", 4);
        new.update.max_unavailable = Budget::Count(1);
        let mut r = begin(&new, &old, 4);
        let mut o = obs(&r, 4, &[]);
        for x in &mut o {
            x.revision = None;
            x.phase = Phase::Pending;
        }
        step(&mut r, &new, &o, 1);
        assert!(updated(&r, 4).len() <= 1, "{:?}", r.running);
    }

    #[test]
    fn the_deadline_counts_from_the_last_progress() {
        let old = spec("a", 2);
        let mut new = spec("b", 2);
        new.update.progress_deadline_ms = 1000;
        new.update.max_unavailable = Budget::Count(1);
        let mut r = begin(&new, &old, 2);
        tick(&mut r, &new, 2, 10);
        // Progress at 10 ms; still progressing at 900 ms and 1,500 ms (progress moved on).
        tick(&mut r, &new, 2, 900);
        assert_eq!(r.state, RolloutState::Progressing);
        assert_eq!(tick(&mut r, &new, 2, 1500), Outcome::Changed);
        assert_eq!(r.state, RolloutState::Complete);
    }

    /// A toy fleet for whole rollouts: placed replicas with their revision and the step at
    /// which they became ready. A new or switched replica is ready one step later; the
    /// "scheduler" keeps `replicas + surge` replicas at the lowest free indices.
    struct Fleet {
        placed: BTreeMap<u32, (String, u64)>,
    }

    impl Fleet {
        fn new(old: &Workload, n: u32) -> Self {
            Self {
                placed: (0..n).map(|i| (i, (old.revision(), 0))).collect(),
            }
        }

        fn observe(&self) -> Vec<Observed> {
            self.placed
                .iter()
                .map(|(&i, (rev, since))| Observed {
                    replica: i,
                    device: format!("d{i}").parse().unwrap(),
                    revision: Some(rev.clone()),
                    phase: Phase::Running,
                    started_at_ms: Some(*since),
                    reason: None,
                    healthy: None,
                })
                .collect()
        }

        /// What the core and the agents do after a step, at time `now`.
        fn apply(&mut self, r: &mut Rollout, n: u32, now: u64) {
            for i in std::mem::take(&mut r.retire) {
                assert!(self.placed.remove(&i).is_some(), "retired unplaced {i}");
            }
            let count = (n + r.extra()) as usize;
            assert!(
                self.placed.len() <= count,
                "the scheduler would have to drop a replica: {} placed, {count} wanted",
                self.placed.len()
            );
            let mut next = 0;
            while self.placed.len() < count {
                while self.placed.contains_key(&next) {
                    next += 1;
                }
                assert!(
                    !r.running.contains_key(&next),
                    "new replica {next} on an old revision"
                );
                self.placed.insert(next, (r.revision.clone(), now + 1));
            }
            for (i, (rev, since)) in self.placed.iter_mut() {
                let want = r.running.get(i).unwrap_or(&r.revision);
                if rev != want {
                    *rev = want.clone();
                    *since = now + 1;
                }
            }
        }

        /// Replicas ready at `now` on the revision they should run.
        fn ready(&self, r: &Rollout, now: u64) -> u32 {
            self.placed
                .iter()
                .filter(|(i, (rev, since))| {
                    *since <= now && rev == r.running.get(i).unwrap_or(&r.revision)
                })
                .count() as u32
        }
    }

    /// Runs a rollout to the end; returns the number of steps, checking the budgets as it
    /// goes.
    fn roll(n: u32, unavailable: Budget, surge: Budget, canary: u32) -> u64 {
        let old = spec("a", n);
        let mut new = spec("b", n);
        new.update.max_unavailable = unavailable;
        new.update.max_surge = surge;
        new.update.canary = canary;
        new.update.min_ready_ms = 1;
        let (max_down, max_extra) = (new.update.unavailable(n), new.update.surge(n));
        let mut r = begin(&new, &old, n);
        let mut fleet = Fleet::new(&old, n);
        for now in 1..(4 * u64::from(n) + 20) {
            step(&mut r, &new, &fleet.observe(), now * 10);
            if r.state == RolloutState::Complete {
                assert!(fleet.placed.values().all(|(rev, _)| *rev == r.revision));
                assert_eq!(fleet.placed.len() as u32, n);
                return now;
            }
            assert_eq!(r.state, RolloutState::Progressing, "{:?}", r.reason);
            fleet.apply(&mut r, n, now * 10);
            let extra = fleet.placed.len() as u32 - n.min(fleet.placed.len() as u32);
            assert!(
                extra <= max_extra.max(canary.min(n)),
                "{extra} extra replicas"
            );
            // Replicas switched this step are down until the next one.
            let down = n.saturating_sub(fleet.ready(&r, now * 10));
            assert!(down <= max_down, "{down} unavailable, budget {max_down}");
        }
        panic!("no convergence: {r:?}");
    }

    #[test]
    fn surge_starts_new_replicas_before_old_ones_stop() {
        // maxUnavailable 0: never fewer than 4 ready, at most one extra.
        let steps = roll(4, Budget::Count(0), Budget::Count(1), 0);
        assert!(steps <= 12, "{steps} steps");
        // A percentage surge rounds up: 10% of 4 is 1.
        roll(4, Budget::Count(0), Budget::Percent(10), 0);
        // Both budgets at once.
        roll(10, Budget::Count(2), Budget::Count(3), 0);
    }

    #[test]
    fn surge_canaries_are_extra_replicas() {
        let old = spec("a", 3);
        let mut new = spec("b", 3);
        new.update.max_unavailable = Budget::Count(0);
        new.update.max_surge = Budget::Count(1);
        new.update.canary = 2;
        let mut r = begin(&new, &old, 3);
        assert_eq!(tick(&mut r, &new, 3, 1), Outcome::Changed);
        assert_eq!(r.surge, 2, "the surge grows to the canary");
        assert!(r.retire.is_empty());
        // Canaries placed as 3 and 4, not ready yet: the old three keep serving.
        let o = obs_of(&r, vec![0, 1, 2, 3, 4], &[(3, Phase::Starting, "new")]);
        step(&mut r, &new, &o, 2);
        assert_eq!(r.state, RolloutState::Canary);
        assert!(r.retire.is_empty() && r.running.len() == 3);
        // Ready: promoted, an old one retires, and the surge drops to maxSurge.
        let o = obs_of(&r, vec![0, 1, 2, 3, 4], &[]);
        assert_eq!(step(&mut r, &new, &o, 3), Outcome::Changed);
        assert!(r.promoted);
        assert_eq!(r.retire, vec![0, 1]);
        assert_eq!(r.surge, 1);
    }

    #[test]
    fn in_place_and_canary_rollouts_converge_within_budget() {
        roll(5, Budget::Count(1), Budget::Count(0), 0);
        roll(8, Budget::Percent(25), Budget::Count(0), 2);
        roll(7, Budget::Count(0), Budget::Count(2), 3);
    }

    proptest::proptest! {
        #[test]
        fn every_rollout_converges_within_its_budgets(
            n in 1u32..12,
            u in 0u32..4,
            su in 0u32..4,
            canary in 0u32..4,
        ) {
            roll(n, Budget::Count(u), Budget::Count(su), canary);
        }
    }

    #[test]
    fn rollouts_stored_by_earlier_hubs_still_load() {
        let old = spec("a", 3);
        let new = spec("b", 3);
        let stored = serde_json::json!({
            "revision": new.revision(),
            "previous": old,
            "old": [0, 1, 2],
            "updated": [0],
            "state": "progressing",
            "startedMs": 5,
        });
        let r: Rollout = serde_json::from_value(stored).unwrap();
        assert_eq!(r.spec_of(0), None);
        assert_eq!(r.spec_of(1), Some(&old));
        assert_eq!(r.running.len(), 2);
        // And the current form round-trips.
        let back: Rollout = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
