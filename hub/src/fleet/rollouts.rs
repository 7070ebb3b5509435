//! Rollouts of a workload's new revision: start, step from what devices report, and the
//! operator's pause, resume, promote and undo. The step itself is [`super::rollout::step`].

use super::rollout::{self, Observed, Outcome, Record, Rollout, RolloutState};
use super::*;
use shoal_api::model::ids::WorkloadName;
use shoal_api::model::workload::Workload;
use shoal_api::wire::messages::{DesiredState, Phase};
use tracing::{info, info_span};

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

impl Fleet {
    /// Notes a stored workload's new spec: a new revision of a workload that has replicas
    /// starts a rollout from the last good revision; anything else just enters the history.
    pub(super) fn start_rollout(&mut self, w: &Workload, now: u64) {
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
            Some(_) => return, // same revision: placement, labels or policy only
            None => rec.push(w, now, "complete"),
        }
        let rec = rec.clone();
        self.changes.put_rollout(&w.name, Some(&rec));
    }

    /// Whether any rollout needs stepping.
    pub fn rolling(&self) -> bool {
        self.rollouts
            .values()
            .any(|r| r.rollout.as_ref().is_some_and(|x| x.active()))
    }

    /// Advances every active rollout from what devices report; returns the desired states
    /// that changed.
    pub fn advance_rollouts(&mut self, now: u64) -> Vec<DesiredState> {
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
                    self.changes.put_workload(&restored);
                    self.workloads.insert(name.clone(), restored);
                }
            }
            let rec = self.rollouts.get(&name).cloned();
            self.changes.put_rollout(&name, rec.as_ref());
            changed = true;
        }
        if changed {
            self.reconcile()
        } else {
            Vec::new()
        }
    }

    /// Every placed replica of `name` as its device last reported it.
    pub(super) fn observe(&self, name: &WorkloadName) -> Vec<Observed> {
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

    /// `shoal rollout pause|resume|promote|undo`. `Err(why)`: not possible now.
    pub fn rollout_action(
        &mut self,
        name: &WorkloadName,
        action: RolloutAction,
        now: u64,
    ) -> Result<Vec<DesiredState>, WorkloadRefusal> {
        let Some(current) = self.workloads.get(name).cloned() else {
            return Err(WorkloadRefusal::NotFound(name.clone()));
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
                        None => return Err(WorkloadRefusal::NoEarlierRevision(name.clone())),
                    },
                    Some("") => return Err(WorkloadRefusal::EmptyRevision),
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
                                return Err(WorkloadRefusal::NotInHistory {
                                    revision: to.to_string(),
                                    workload: name.clone(),
                                })
                            }
                            _ => {
                                return Err(WorkloadRefusal::Ambiguous {
                                    revision: to.to_string(),
                                    workload: name.clone(),
                                })
                            }
                        }
                    }
                };
                if spec.revision() == rev {
                    return Err(WorkloadRefusal::AlreadyRuns {
                        workload: name.clone(),
                        revision: rev,
                    });
                }
                // Only what runs goes back; how many and where stay as they are now. Configs
                // and secrets are read as they are now: earlier versions are kept only for
                // the rollouts that still run them.
                let mut spec = keep_placement(spec, &current);
                spec.configs_pinned.clear();
                spec.secrets_pinned.clear();
                self.pin_inputs(&mut spec);
                if spec == current {
                    return Err(WorkloadRefusal::InputsOnly {
                        revision: rev,
                        workload: name.clone(),
                    });
                }
                // The fleet's policy now, not the one the revision was applied under.
                let refused = self.policy.refusals(&spec);
                if !refused.is_empty() {
                    return Err(WorkloadRefusal::Policy {
                        revision: spec.revision(),
                        reasons: refused,
                    });
                }
                // Its start order must make no cycle with the workloads as they are now.
                if let Some(e) = self.check_order(&[(0, &spec)]).into_iter().next() {
                    return Err(WorkloadRefusal::Order {
                        revision: spec.revision(),
                        reason: e.message,
                    });
                }
                // The secrets that revision reads must still be there.
                let missing = shoal_api::model::secret::unresolved(&spec.secrets, |n| {
                    self.secrets.get(n).map(|s| s.keys.clone())
                });
                if !missing.is_empty() {
                    return Err(WorkloadRefusal::SecretsGone {
                        revision: spec.revision(),
                        missing,
                    });
                }
                info!(workload = %name, to = %spec.revision(), "rollout undo");
                return Ok(self.apply(vec![spec], now).1);
            }
            _ if !active => return Err(WorkloadRefusal::NoRollout(name.clone())),
            _ => {}
        }
        if let Some(r) = self.rollouts.get_mut(name).and_then(|r| r.rollout.as_mut()) {
            match action {
                RolloutAction::Pause => r.state = RolloutState::Paused,
                RolloutAction::Resume => {
                    r.state = RolloutState::Progressing;
                    r.progress_ms = now;
                }
                RolloutAction::Promote => {
                    r.promoted = true;
                    r.state = RolloutState::Progressing;
                    r.progress_ms = now;
                }
                RolloutAction::Undo { .. } => {}
            }
            info!(workload = %name, state = %r.state, "rollout changed by operator");
        }
        let rec = self.rollouts.get(name).cloned();
        self.changes.put_rollout(name, rec.as_ref());
        Ok(self.advance_rollouts(now))
    }
}
