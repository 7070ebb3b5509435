//! Jobs, the fleet's part: a job's run starts when it is applied (and again with each new
//! revision or `shoal rerun`), takes each slot's result from what devices report, ends,
//! and is deleted once its `ttlAfterFinished` has passed. The pure bookkeeping is
//! [`super::job`]; placement reads [`Fleet::job_wants`].

use super::job::{JobState, Wants};
use super::*;
use shoal_api::model::ids::WorkloadName;
use shoal_api::model::workload::{Placement, Workload};
use shoal_api::wire::messages::DesiredState;
use tracing::info;

impl Fleet {
    /// A job workload stored by an apply: a new job, or a new revision of one, starts a run
    /// with no results (jobs do not roll out); anything else keeps the run it has. A
    /// workload that is no longer a job forgets its runs.
    pub(super) fn start_run(&mut self, w: &Workload, now: u64) {
        if w.completion.is_none() {
            if self.jobs.remove(&w.name).is_some() {
                self.changes.put_job(&w.name, None);
            }
            return;
        }
        let revision = w.revision();
        let state = match self.jobs.get(&w.name) {
            Some(j) if j.revision == revision => return,
            Some(j) => j.next(revision, now),
            None => JobState::start(w.name.clone(), revision, 1, now),
        };
        info!(workload = %w.name, run = state.run, revision = %state.revision, "job run started");
        self.changes.put_job(&w.name, Some(&state));
        self.jobs.insert(w.name.clone(), state);
    }

    /// `shoal rerun`: the job runs again from no results, the same revision.
    pub fn rerun(
        &mut self,
        name: &WorkloadName,
        now: u64,
    ) -> Result<Vec<DesiredState>, WorkloadRefusal> {
        let Some(w) = self.workloads.get(name) else {
            return Err(WorkloadRefusal::NotFound(name.clone()));
        };
        let revision = w.revision();
        let next = match self.jobs.get(name) {
            Some(j) if w.completion.is_some() => j.next(revision, now),
            _ => return Err(WorkloadRefusal::NotAJob(name.clone())),
        };
        info!(workload = %name, run = next.run, "job runs again");
        self.changes.put_job(name, Some(&next));
        self.jobs.insert(name.clone(), next);
        Ok(self.reconcile())
    }

    /// Whether any job is unfinished or waits for its deletion (the loop steps them).
    pub fn has_jobs(&self) -> bool {
        !self.jobs.is_empty()
    }

    /// Takes the results devices reported, ends runs that are over and deletes jobs whose
    /// `ttlAfterFinished` has passed; returns the desired states that changed.
    pub fn advance_jobs(&mut self, now: u64) -> Vec<DesiredState> {
        let mut changed = false;
        let mut expired = Vec::new();
        let names: Vec<WorkloadName> = self.jobs.keys().cloned().collect();
        for name in names {
            let Some(c) = self.workloads.get(&name).and_then(|w| w.completion) else {
                continue;
            };
            let every = self
                .workloads
                .get(&name)
                .is_some_and(|w| w.placement == Placement::Every);
            let Some(mut state) = self.jobs.get(&name).cloned() else {
                continue;
            };
            let mut took = Vec::new();
            for (&replica, dev) in self.schedule.assignments.get(&name).into_iter().flatten() {
                let reported = self
                    .live
                    .get(dev)
                    .and_then(|l| l.status.as_ref())
                    .into_iter()
                    .flat_map(|s| &s.workloads)
                    .find(|i| i.name == name && i.replica == replica);
                if let Some(s) = reported {
                    if state.report(every, dev, replica, s) {
                        info!(workload = %name, replica, device = %dev, phase = %s.phase, exit_code = ?s.exit_code, "job result");
                        took.push(replica);
                    }
                }
            }
            let concluded = state.conclude(&c, every, now);
            if let Some(f) = state.finished.as_ref().filter(|_| concluded) {
                info!(workload = %name, run = state.run, succeeded = f.succeeded, reason = %f.reason, "job finished");
            }
            if state.expired(&c, now) {
                expired.push(name.clone());
            }
            if took.is_empty() && !concluded {
                continue;
            }
            // A slot with its result, and every slot of a finished run, leaves its device.
            if let Some(placed) = self.schedule.assignments.get_mut(&name) {
                if state.finished.is_some() {
                    placed.clear();
                } else {
                    placed.retain(|i, _| !took.contains(i));
                }
            }
            self.changes.put_job(&name, Some(&state));
            self.jobs.insert(name, state);
            changed = true;
        }
        if changed {
            let a = self.schedule.assignments.clone();
            self.changes.put_assignments(&a);
        }
        let mut publish = Vec::new();
        for name in &expired {
            info!(workload = %name, "job deleted: its ttlAfterFinished has passed");
            publish.extend(self.delete(name).unwrap_or_default()); // reconciled
            let change = super::audit::Change {
                who: "the hub".into(),
                from: "ttlAfterFinished".into(),
                action: format!("delete workload {name}"),
                outcome: "deleted: the job finished and its ttlAfterFinished passed".into(),
                accepted: true,
            };
            self.record_audit(change, now);
        }
        if changed && expired.is_empty() {
            publish = self.reconcile();
        }
        publish
    }

    /// What `name`'s current run asks of placement; `None` for a service.
    pub(super) fn job_wants(&self, name: &WorkloadName) -> Option<Wants> {
        let w = self.workloads.get(name)?;
        let c = w.completion?;
        let state = self.jobs.get(name)?;
        Some(state.wants(&c, w.placement == Placement::Every))
    }

    /// The run a job's replica belongs to, for its desired state.
    pub(super) fn job_run(&self, w: &Workload) -> Option<shoal_api::model::job::JobRun> {
        let c = w.completion?;
        let state = self.jobs.get(&w.name)?;
        Some(shoal_api::model::job::JobRun {
            run: state.id,
            backoff_limit: c.backoff_limit,
            active_deadline_ms: c.active_deadline_ms,
        })
    }

    /// A job's current run as `shoal get jobs` shows it; `active`: its replicas placed now.
    pub(super) fn job_view(
        &self,
        w: &Workload,
        active: u32,
    ) -> Option<shoal_api::wire::views::JobView> {
        let c = w.completion?;
        let j = self.jobs.get(&w.name)?;
        let state = match &j.finished {
            None => "Running",
            Some(f) if f.succeeded => "Complete",
            Some(_) => "Failed",
        };
        Some(shoal_api::wire::views::JobView {
            run: j.run,
            completions: c.completions,
            succeeded: j.succeeded() as u32,
            failed: j.failed() as u32,
            active,
            state: state.to_string(),
            reason: j.finished.as_ref().map(|f| f.reason.clone()),
            started_ms: j.started_ms,
            finished_ms: j.finished.as_ref().map(|f| f.at_ms),
            results: j
                .results
                .iter()
                .map(|(slot, r)| shoal_api::wire::views::JobResultView {
                    slot: slot.clone(),
                    result: r.clone(),
                })
                .collect(),
        })
    }

    /// A job's current run (for views and logs).
    pub fn job(&self, name: &WorkloadName) -> Option<&JobState> {
        self.jobs.get(name)
    }
}
