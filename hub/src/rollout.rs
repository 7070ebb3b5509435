//! Rolling updates: which replicas of a workload run the new revision, decided step by step
//! from what the devices report. Pure: [`step`] takes the rollout, the workload's update
//! policy, the observed replicas and the time, and changes the rollout; the hub's core
//! persists it and publishes the desired states that follow.
//!
//! - A rollout starts when a stored workload gets a new revision. Replicas that existed then
//!   (`old`) keep the previous spec until they are picked; replicas placed later start on the
//!   new one.
//! - Each step replaces old replicas in index order: first those their device reports as not
//!   ready (replacing them costs no availability), then the others while fewer than
//!   `maxUnavailable` of the wanted replicas (unplaced ones included) are unavailable. A
//!   replica nobody has reported on (a hub that just restarted) is not assumed down. A
//!   replica is ready when it reports the revision it should run, `Running` (and healthy,
//!   with a probe), for at least `minReadySeconds`.
//! - The progress deadline counts from the rollout's last progress, not its start.
//! - With `canary: N`, after N replicas are updated the rollout waits until they are all
//!   ready (or `shoal rollout promote`).
//! - An updated replica that fails (`CrashLoopBackOff`, `Failed`), or a rollout that misses
//!   its progress deadline, stops the rollout: with `autoRollback` every replica goes back to
//!   the previous revision, with the reason recorded; without it the rollout stays `Failed`
//!   where it is (updated replicas keep the new revision) until the operator acts.

use serde::{Deserialize, Serialize};
use shoal_api::ids::DeviceId;
use shoal_api::messages::Phase;
use shoal_api::workload::{UpdatePolicy, Workload};
use std::collections::BTreeSet;

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
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// The revision being rolled out (the stored spec).
    pub revision: String,
    /// The spec not-yet-updated replicas keep running; `None` once complete.
    pub previous: Option<Workload>,
    /// Replicas that existed when the rollout started.
    pub old: BTreeSet<u32>,
    /// Old replicas switched to the new revision.
    pub updated: BTreeSet<u32>,
    pub state: RolloutState,
    /// Why it stopped (failed, rolled back), or what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub started_ms: u64,
    /// Last time the rollout moved (replicas switched, resumed, promoted): the progress
    /// deadline counts from here, so a paused or steadily progressing rollout does not fail.
    #[serde(default)]
    pub progress_ms: u64,
    /// `shoal rollout promote`: go past the canary without waiting.
    #[serde(default)]
    pub promoted: bool,
}

impl Rollout {
    pub fn start(target: &Workload, previous: Workload, old: BTreeSet<u32>, now: u64) -> Self {
        Self {
            revision: target.revision(),
            previous: Some(previous),
            old,
            updated: BTreeSet::new(),
            state: RolloutState::Progressing,
            reason: None,
            started_ms: now,
            progress_ms: now,
            promoted: false,
        }
    }

    /// Whether replica `i` runs the previous spec.
    pub fn on_previous(&self, i: u32) -> bool {
        self.previous.is_some() && self.old.contains(&i) && !self.updated.contains(&i)
    }

    pub fn active(&self) -> bool {
        matches!(
            self.state,
            RolloutState::Progressing | RolloutState::Paused | RolloutState::Canary
        )
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
    pub workload: shoal_api::ids::WorkloadName,
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
    let prev_rev = previous.revision();
    let should_run = |i: u32| -> &str {
        if r.on_previous(i) {
            &prev_rev
        } else {
            &r.revision
        }
    };
    // With a health probe, ready means probed healthy; without, running is enough.
    let probed = |i: u32| {
        if r.on_previous(i) {
            previous.health.is_some()
        } else {
            target.health.is_some()
        }
    };
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
            && !r.on_previous(o.replica)
    });
    let since = r.started_ms.max(r.progress_ms);
    let overdue =
        r.state != RolloutState::Canary && now.saturating_sub(since) > policy.progress_deadline_ms;
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
                "progress deadline of {}s exceeded",
                policy.progress_deadline_ms / 1000
            ),
        };
        r.reason = Some(reason.clone());
        if policy.auto_rollback {
            r.state = RolloutState::RolledBack;
            r.previous = None;
            r.updated.clear();
            return Outcome::RollBack {
                previous: Box::new(previous),
                reason,
            };
        }
        r.state = RolloutState::Failed;
        return Outcome::Changed;
    }

    // Unplaced replicas count as unavailable: the budget is out of the wanted count.
    let total = match target.placement {
        shoal_api::workload::Placement::Replicas(n) => n.max(observed.len() as u32),
        shoal_api::workload::Placement::Every => observed.len() as u32,
    };
    let ready_set: BTreeSet<u32> = observed
        .iter()
        .filter(|o| ready(o))
        .map(|o| o.replica)
        .collect();
    let pending: Vec<u32> = r
        .old
        .iter()
        .copied()
        .filter(|i| !r.updated.contains(i) && observed.iter().any(|o| o.replica == *i))
        .collect();

    // Done when every replica runs the new revision and is ready.
    if pending.is_empty() && observed.iter().all(|o| ready_set.contains(&o.replica)) {
        r.state = RolloutState::Complete;
        r.previous = None;
        r.reason = None;
        return Outcome::Changed;
    }

    // The canary gate.
    if policy.canary > 0 && !r.promoted && r.updated.len() as u32 >= policy.canary {
        let canary_ready = r.updated.iter().all(|i| ready_set.contains(i));
        if !canary_ready {
            if r.state != RolloutState::Canary {
                r.state = RolloutState::Canary;
                r.reason = Some(format!(
                    "waiting for {} canary replica(s) to be ready (or `shoal rollout promote`)",
                    policy.canary
                ));
                return Outcome::Changed;
            }
            return Outcome::Unchanged;
        }
        r.promoted = true;
        r.state = RolloutState::Progressing;
        r.reason = None;
    }

    let limit = if policy.canary > 0 && !r.promoted {
        policy.canary.saturating_sub(r.updated.len() as u32) as usize
    } else {
        usize::MAX
    };
    let unavailable = total.saturating_sub(ready_set.len() as u32);
    let mut budget = policy.max_unavailable.of(total).saturating_sub(unavailable);
    let mut picked = Vec::new();
    // Old replicas their device reports as not ready (starting, crash-looping) first:
    // replacing them costs nothing. One with no report at all (device silent, hub just
    // restarted) is not known to be down: it goes through the budget like a ready one.
    let reported_down = |i: &u32| {
        !ready_set.contains(i)
            && observed
                .iter()
                .any(|o| o.replica == *i && o.revision.is_some())
    };
    for &i in pending.iter().filter(|i| reported_down(i)) {
        if picked.len() >= limit {
            break;
        }
        picked.push(i);
    }
    for &i in pending.iter().filter(|i| !reported_down(i)) {
        if picked.len() >= limit || budget == 0 {
            break;
        }
        picked.push(i);
        budget -= 1;
    }
    if picked.is_empty() {
        return Outcome::Unchanged;
    }
    r.updated.extend(picked);
    r.progress_ms = now;
    Outcome::Changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::workload::{parse_workloads, Budget};

    fn spec(args: &str, replicas: u32) -> Workload {
        let text = format!(
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: web }}\nspec:\n  replicas: {replicas}\n  wasm: {{ module: \"sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\" }}\n  args: [{args}]\n"
        );
        parse_workloads(&text).unwrap().remove(0)
    }

    fn obs(r: &Rollout, n: u32, phases: &[(u32, Phase, &str)]) -> Vec<Observed> {
        (0..n)
            .map(|i| {
                let (phase, rev) = phases
                    .iter()
                    .find(|(j, _, _)| *j == i)
                    .map(|(_, p, which)| {
                        let rev = if *which == "new" {
                            r.revision.clone()
                        } else {
                            r.previous
                                .as_ref()
                                .map(|p| p.revision())
                                .unwrap_or_default()
                        };
                        (*p, rev)
                    })
                    .unwrap_or((
                        Phase::Running,
                        if r.on_previous(i) {
                            r.previous
                                .as_ref()
                                .map(|p| p.revision())
                                .unwrap_or_default()
                        } else {
                            r.revision.clone()
                        },
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
        let mut r = Rollout::start(&new, old, (0..4).collect(), 0);
        // Everyone ready on the old revision: one at a time.
        assert_eq!(tick(&mut r, &new, 4, 1), Outcome::Changed);
        assert_eq!(r.updated, [0].into());
        // Replica 0 restarting on the new revision: no budget left.
        let o = obs(&r, 4, &[(0, Phase::Starting, "new")]);
        assert_eq!(step(&mut r, &new, &o, 2), Outcome::Unchanged);
        // Ready: the next one.
        assert_eq!(tick(&mut r, &new, 4, 3), Outcome::Changed);
        assert_eq!(r.updated, [0, 1].into());
        tick(&mut r, &new, 4, 4);
        tick(&mut r, &new, 4, 5);
        assert_eq!(r.updated.len(), 4);
        assert_eq!(tick(&mut r, &new, 4, 6), Outcome::Changed);
        assert_eq!(r.state, RolloutState::Complete);
        assert!(!r.on_previous(0));
    }

    #[test]
    fn unready_old_replicas_are_replaced_for_free() {
        let old = spec("a", 3);
        let mut new = spec("b", 3);
        new.update.max_unavailable = Budget::Count(1);
        let mut r = Rollout::start(&new, old, (0..3).collect(), 0);
        let o = obs(&r, 3, &[(2, Phase::CrashLoopBackOff, "old")]);
        step(&mut r, &new, &o, 1);
        assert_eq!(
            r.updated,
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
        let mut r = Rollout::start(&new, old, (0..4).collect(), 0);
        tick(&mut r, &new, 4, 1);
        assert_eq!(r.updated, [0].into(), "only the canary");
        let o = obs(&r, 4, &[(0, Phase::Starting, "new")]);
        step(&mut r, &new, &o, 2);
        assert_eq!(r.state, RolloutState::Canary);
        assert_eq!(r.updated.len(), 1);
        tick(&mut r, &new, 4, 3);
        assert_eq!(
            r.updated.len(),
            4,
            "canary ready: the rest at once within the budget"
        );
    }

    #[test]
    fn a_failing_new_revision_rolls_back_or_stops() {
        let old = spec("a", 3);
        let mut new = spec("b", 3);
        new.update.auto_rollback = true;
        let mut r = Rollout::start(&new, old.clone(), (0..3).collect(), 0);
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
        let mut r = Rollout::start(&new, old, (0..3).collect(), 0);
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
        let mut r = Rollout::start(&new, old, (0..2).collect(), 0);
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
        new.health = Some(shoal_api::workload::Health {
            check: shoal_api::workload::Check::Tcp { port: 80 },
            period_ms: 1000,
            timeout_ms: 100,
            failure_threshold: 1,
        });
        let mut r = Rollout::start(&new, old, (0..2).collect(), 0);
        tick(&mut r, &new, 2, 1);
        assert_eq!(r.updated, [0].into());
        // Running but not yet probed: not ready, so replica 1 waits.
        assert_eq!(tick(&mut r, &new, 2, 2), Outcome::Unchanged);
        let mut o = obs(&r, 2, &[]);
        o[0].healthy = Some(true);
        assert_eq!(step(&mut r, &new, &o, 3), Outcome::Changed);
        assert_eq!(r.updated, [0, 1].into());
    }

    #[test]
    fn unreported_replicas_are_not_free_to_replace() {
        // Right after a hub restart nothing has reported yet: the budget still holds.
        let old = spec("a", 4);
        let mut new = spec("b", 4);
        new.update.max_unavailable = Budget::Count(1);
        let mut r = Rollout::start(&new, old, (0..4).collect(), 0);
        let mut o = obs(&r, 4, &[]);
        for x in &mut o {
            x.revision = None;
            x.phase = Phase::Pending;
        }
        step(&mut r, &new, &o, 1);
        assert!(r.updated.len() <= 1, "{:?}", r.updated);
    }

    #[test]
    fn the_deadline_counts_from_the_last_progress() {
        let old = spec("a", 2);
        let mut new = spec("b", 2);
        new.update.progress_deadline_ms = 1000;
        new.update.max_unavailable = Budget::Count(1);
        let mut r = Rollout::start(&new, old, (0..2).collect(), 0);
        tick(&mut r, &new, 2, 10);
        // Progress at 10 ms; still progressing at 900 ms and 1,500 ms (progress moved on).
        tick(&mut r, &new, 2, 900);
        assert_eq!(r.state, RolloutState::Progressing);
        assert_eq!(tick(&mut r, &new, 2, 1500), Outcome::Changed);
        assert_eq!(r.state, RolloutState::Complete);
    }
}
