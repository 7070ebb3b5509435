//! Workloads: apply (create or update), scale and delete; each reconciles placement.
//! [`WorkloadRefusal`] says why an operator's command on a workload (scale, rollout) was
//! refused.

use super::*;
use shoal_api::model::ids::WorkloadName;
use shoal_api::model::workload::{Placement, Workload};
use shoal_api::wire::messages::DesiredState;
use tracing::info;

/// Why `shoal scale` or `shoal rollout …` changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadRefusal {
    #[error("workload {:?} not found", .0.as_str())]
    NotFound(WorkloadName),
    #[error("workload {:?} runs on every matching device: it has no replica count", .0.as_str())]
    NoReplicaCount(WorkloadName),
    #[error("replicas {replicas} is invalid: must be at most {max}")]
    TooManyReplicas { replicas: u32, max: u32 },
    #[error("workload {:?} is not a job (it has no spec.completion)", .0.as_str())]
    NotAJob(WorkloadName),
    #[error("workload {:?} is a job: its count is spec.completion.completions, changed by applying it", .0.as_str())]
    JobCount(WorkloadName),
    #[error("workload {:?} has no rollout in progress", .0.as_str())]
    NoRollout(WorkloadName),
    #[error("workload {:?} has no earlier revision to go back to", .0.as_str())]
    NoEarlierRevision(WorkloadName),
    #[error("--to-revision is empty: give a revision from `shoal rollout history`")]
    EmptyRevision,
    #[error("revision {revision:?} is not in the history of workload {:?} (see `shoal rollout history`)", .workload.as_str())]
    NotInHistory {
        revision: String,
        workload: WorkloadName,
    },
    #[error("revision {revision:?} is ambiguous in the history of workload {:?}: give more of it", .workload.as_str())]
    Ambiguous {
        revision: String,
        workload: WorkloadName,
    },
    #[error("workload {:?} already runs revision {revision}", .workload.as_str())]
    AlreadyRuns {
        workload: WorkloadName,
        revision: String,
    },
    /// The revision asked for differs from the current one only in the configs or secrets
    /// it read, which `rollout undo` does not bring back.
    #[error("workload {:?} would run its current revision {revision} again: the earlier revision differs only in the configs or secrets it read, which undo reads as they are now (apply the earlier config or secret to go back to its values)", .workload.as_str())]
    InputsOnly {
        workload: WorkloadName,
        revision: String,
    },
    /// Going back to `revision` would run what the fleet's policy no longer allows.
    #[error("cannot go back to revision {revision}: {}", .reasons.join("; "))]
    Policy {
        revision: String,
        reasons: Vec<String>,
    },
    /// Going back to `revision` would make a cycle of `spec.after`.
    #[error("cannot go back to revision {revision}: {reason}")]
    Order { revision: String, reason: String },
    /// Going back to `revision` would read secrets (or keys) that are gone.
    #[error("cannot go back to revision {revision}: {}", .missing.join("; "))]
    SecretsGone {
        revision: String,
        missing: Vec<String>,
    },
}

impl Fleet {
    /// Stores validated workloads (create or update), then reconciles.
    pub fn apply(
        &mut self,
        workloads: Vec<Workload>,
        now: u64,
    ) -> (ApplyOutcome, Vec<DesiredState>) {
        let mut outcome = ApplyOutcome::new();
        for mut w in workloads {
            self.pin_inputs(&mut w);
            let verdict = match self.workloads.get(&w.name) {
                None => "created",
                Some(old) if *old == w => "unchanged",
                Some(_) => "configured",
            };
            if verdict != "unchanged" {
                self.new_spec(&w, now);
                self.changes.put_workload(&w);
                info!(workload = %w.name, revision = %w.revision(), verdict, "workload stored");
                self.workloads.insert(w.name.clone(), w.clone());
            }
            outcome.insert(w.name.to_string(), verdict.to_string());
        }
        let publish = self.reconcile();
        (outcome, publish)
    }

    /// A workload's spec is about to change to `w` (an apply, or a config or secret it
    /// reads): a job starts a new run if its revision changed (jobs do not roll out),
    /// anything else a rollout.
    pub(super) fn new_spec(&mut self, w: &Workload, now: u64) {
        // Scheduled runs do not roll out either: the next run takes the new spec.
        let runs = |w: &Workload| w.completion.is_some() || w.schedule.is_some();
        let job = runs(w) || self.workloads.get(&w.name).is_some_and(runs);
        if job {
            if self.rollouts.remove(&w.name).is_some() {
                self.changes.put_rollout(&w.name, None);
            }
        } else {
            self.start_rollout(w, now);
        }
        self.start_run(w, now);
    }

    /// `shoal scale`: a new replica count. `Err(why)`: not possible.
    pub fn scale(
        &mut self,
        name: &WorkloadName,
        replicas: u32,
    ) -> Result<Vec<DesiredState>, WorkloadRefusal> {
        let Some(mut w) = self.workloads.get(name).cloned() else {
            return Err(WorkloadRefusal::NotFound(name.clone()));
        };
        if w.placement == Placement::Every {
            return Err(WorkloadRefusal::NoReplicaCount(name.clone()));
        }
        if w.completion.is_some() {
            return Err(WorkloadRefusal::JobCount(name.clone()));
        }
        if replicas > shoal_api::model::workload::MAX_REPLICAS {
            return Err(WorkloadRefusal::TooManyReplicas {
                replicas,
                max: shoal_api::model::workload::MAX_REPLICAS,
            });
        }
        w.placement = Placement::Replicas(replicas);
        self.changes.put_workload(&w);
        info!(workload = %name, replicas, "scaled");
        self.workloads.insert(name.clone(), w);
        Ok(self.reconcile())
    }

    /// Deletes a workload; `None` if it did not exist.
    pub fn delete(&mut self, name: &WorkloadName) -> Option<Vec<DesiredState>> {
        self.workloads.remove(name)?;
        self.rollouts.remove(name);
        self.changes.put_rollout(name, None);
        if self.jobs.remove(name).is_some() {
            self.changes.put_job(name, None);
        }
        self.changes.delete_workload(name);
        info!(workload = %name, "workload deleted");
        Some(self.reconcile())
    }

    /// `spec.after` across the fleet as the apply would leave it: a cycle is an error on
    /// the first applied workload on it, naming the cycle.
    pub fn check_order(
        &self,
        workloads: &[(usize, &Workload)],
    ) -> Vec<shoal_api::wire::manifest::ManifestError> {
        let mut edges: std::collections::BTreeMap<&WorkloadName, Vec<&WorkloadName>> = self
            .workloads
            .values()
            .map(|w| (&w.name, w.after.iter().map(|a| &a.workload).collect()))
            .collect();
        for (_, w) in workloads {
            edges.insert(&w.name, w.after.iter().map(|a| &a.workload).collect());
        }
        let Some(cycle) = shoal_api::model::order::cycle(&edges) else {
            return Vec::new();
        };
        let on = |n: &WorkloadName| workloads.iter().find(|(_, w)| &w.name == n);
        let Some((doc, w)) = cycle.iter().find_map(on) else {
            return Vec::new(); // stored already: not this apply's doing
        };
        let names: Vec<&str> = cycle.iter().map(WorkloadName::as_str).collect();
        vec![shoal_api::wire::manifest::ManifestError {
            document: *doc,
            workload: Some(w.name.to_string()),
            kind: None,
            message: format!(
                "spec.after makes a cycle: {} (each waits for the next on its device, so none would start)",
                names.join(" → ")
            ),
        }]
    }

    pub fn has_workload(&self, name: &WorkloadName) -> bool {
        self.workloads.contains_key(name)
    }
}
