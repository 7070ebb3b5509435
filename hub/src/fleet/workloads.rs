//! Workloads: apply (create or update), scale and delete; each reconciles placement.

use super::*;
use shoal_api::ids::WorkloadName;
use shoal_api::messages::DesiredState;
use shoal_api::workload::{Placement, Workload};
use tracing::info;

impl Fleet {
    /// Stores validated workloads (create or update), then reconciles.
    pub fn apply(
        &mut self,
        workloads: Vec<Workload>,
        now: u64,
    ) -> (ApplyOutcome, Vec<DesiredState>) {
        let mut outcome = ApplyOutcome::new();
        for w in workloads {
            let verdict = match self.workloads.get(&w.name) {
                None => "created",
                Some(old) if *old == w => "unchanged",
                Some(_) => "configured",
            };
            if verdict != "unchanged" {
                self.start_rollout(&w, now);
                self.changes.put_workload(&w);
                info!(workload = %w.name, revision = %w.revision(), verdict, "workload stored");
                self.workloads.insert(w.name.clone(), w.clone());
            }
            outcome.insert(w.name.to_string(), verdict.to_string());
        }
        let publish = self.reconcile();
        (outcome, publish)
    }

    /// `shoal scale`: a new replica count. `Err(why)`: not possible.
    pub fn scale(
        &mut self,
        name: &WorkloadName,
        replicas: u32,
    ) -> Result<Vec<DesiredState>, String> {
        let Some(mut w) = self.workloads.get(name).cloned() else {
            return Err(format!("workload {:?} not found", name.as_str()));
        };
        if w.placement == Placement::Every {
            return Err(format!(
                "workload {:?} runs on every matching device: it has no replica count",
                name.as_str()
            ));
        }
        if replicas > shoal_api::workload::MAX_REPLICAS {
            return Err(format!(
                "replicas {replicas} is invalid: must be at most {}",
                shoal_api::workload::MAX_REPLICAS
            ));
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
        self.changes.delete_workload(name);
        info!(workload = %name, "workload deleted");
        Some(self.reconcile())
    }

    pub fn has_workload(&self, name: &WorkloadName) -> bool {
        self.workloads.contains_key(name)
    }
}
