//! Jobs, the pure part (see `shoal_api::model::job` for what a job is): the persisted
//! [`JobState`] of a job's current run, what a device's report adds to it, and when the run
//! is finished. No clock: `now` is a parameter.
//!
//! A result is kept per **slot**: the completion index (`"0"`, `"1"`, …) of a job with a
//! count, the device id of a `placement: every` job. A slot with a result is not placed
//! again in this run; `shoal rerun` and a new revision start a run with no results.

use serde::{Deserialize, Serialize};
use shoal_api::model::ids::{DeviceId, WorkloadName};
use shoal_api::model::job::Completion;
use shoal_api::wire::messages::{InstanceStatus, Phase};
use std::collections::{BTreeMap, BTreeSet};

pub use shoal_api::wire::views::SlotResult;

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Finished {
    /// By the hub's clock.
    pub at_ms: u64,
    pub succeeded: bool,
    pub reason: String,
}

/// A job's current run, as the hub keeps it (persisted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobState {
    pub workload: WorkloadName,
    /// The revision this run runs.
    pub revision: String,
    /// 1 for the first run; each rerun or new revision adds one (what people read).
    pub run: u64,
    /// What devices tell runs apart by: the hub's clock when the run started, and always
    /// more than the previous run's (a job deleted and applied again starts at run 1, but
    /// with a new id, so no device takes an old result for the new run).
    #[serde(default)]
    pub id: u64,
    pub started_ms: u64,
    /// Slot (completion index, or device id for `placement: every`) → its result.
    #[serde(default)]
    pub results: BTreeMap<String, SlotResult>,
    /// Jobs with a count only: set once the run is complete or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<Finished>,
}

impl JobState {
    /// Run `run` of revision `revision`, started at `now`.
    pub fn start(workload: WorkloadName, revision: String, run: u64, now: u64) -> Self {
        JobState {
            workload,
            revision,
            run,
            id: now,
            started_ms: now,
            results: BTreeMap::new(),
            finished: None,
        }
    }

    /// The next run of the same job (a rerun or a new revision).
    pub fn next(&self, revision: String, now: u64) -> Self {
        let mut next = Self::start(self.workload.clone(), revision, self.run + 1, now);
        next.id = now.max(self.id + 1);
        next
    }

    /// The slot of replica `replica` on `device`.
    pub fn slot(every: bool, replica: u32, device: &DeviceId) -> String {
        if every {
            device.to_string()
        } else {
            replica.to_string()
        }
    }

    /// Takes what `device` reports of replica `replica` placed there: a final status of
    /// this run becomes the slot's result. `true`: a new result.
    pub fn report(
        &mut self,
        every: bool,
        device: &DeviceId,
        replica: u32,
        status: &InstanceStatus,
    ) -> bool {
        let ours = status.name == self.workload
            && status.replica == replica
            && status.revision == self.revision
            && status.run == Some(self.id);
        let done = matches!(status.phase, Phase::Succeeded | Phase::Failed)
            && status.finished_at_ms.is_some();
        let slot = Self::slot(every, replica, device);
        if !ours || !done || self.finished.is_some() || self.results.contains_key(&slot) {
            return false;
        }
        self.results.insert(
            slot,
            SlotResult {
                device: device.clone(),
                replica,
                phase: status.phase,
                exit_code: status.exit_code,
                restarts: status.restarts,
                // A device's words, kept with the job: bounded.
                reason: status.reason.as_deref().map(bounded),
                started_at_ms: status.started_at_ms,
                finished_at_ms: status.finished_at_ms,
            },
        );
        true
    }

    pub fn succeeded(&self) -> usize {
        self.results
            .values()
            .filter(|r| r.phase == Phase::Succeeded)
            .count()
    }

    pub fn failed(&self) -> usize {
        self.results
            .values()
            .filter(|r| r.phase == Phase::Failed)
            .count()
    }

    /// A job with a count: finishes the run once every completion succeeded, or as soon as
    /// one failed for good. `true`: it just finished.
    pub fn conclude(&mut self, c: &Completion, every: bool, now: u64) -> bool {
        if every || self.finished.is_some() {
            return false;
        }
        let failed = self.results.iter().find(|(_, r)| r.phase == Phase::Failed);
        let finished = if let Some((slot, r)) = failed {
            let how = match (r.exit_code, &r.reason) {
                (_, Some(reason)) => reason.clone(),
                (Some(code), None) => format!("exit status {code}"),
                (None, None) => "failed".to_string(),
            };
            Some(Finished {
                at_ms: now,
                succeeded: false,
                reason: format!(
                    "completion {slot} failed on device {} after {} retries: {how}",
                    r.device, r.restarts
                ),
            })
        } else if self.succeeded() as u64 >= u64::from(c.completions) {
            Some(Finished {
                at_ms: now,
                succeeded: true,
                reason: format!(
                    "{} of {} completions succeeded",
                    self.succeeded(),
                    c.completions
                ),
            })
        } else {
            None
        };
        let done = finished.is_some();
        self.finished = finished;
        done
    }

    /// Whether a finished job's `ttlAfterFinished` has passed: it is to be deleted.
    pub fn expired(&self, c: &Completion, now: u64) -> bool {
        match (&self.finished, c.ttl_after_finished_ms) {
            (Some(f), Some(ttl)) => now.saturating_sub(f.at_ms) >= ttl,
            _ => false,
        }
    }

    /// What placement must know of this run: the replicas wanted now and the slots not to
    /// place again.
    pub fn wants(&self, c: &Completion, every: bool) -> Wants {
        if self.finished.is_some() {
            return Wants {
                replicas: 0,
                cap: Some(0),
                done_replicas: BTreeSet::new(),
                done_devices: BTreeSet::new(),
            };
        }
        if every {
            return Wants {
                replicas: 0,
                cap: c.parallelism,
                done_replicas: BTreeSet::new(),
                done_devices: self.results.values().map(|r| r.device.clone()).collect(),
            };
        }
        let done: BTreeSet<u32> = self.results.keys().filter_map(|k| k.parse().ok()).collect();
        let left = (c.completions as usize).saturating_sub(done.len()) as u32;
        Wants {
            replicas: left.min(c.parallelism.unwrap_or(1)),
            cap: None,
            done_replicas: done,
            done_devices: BTreeSet::new(),
        }
    }
}

/// Most bytes of a device's reason kept in a result.
pub const REASON_BYTES: usize = 256;

fn bounded(s: &str) -> String {
    if s.len() <= REASON_BYTES {
        return s.to_string();
    }
    let mut end = REASON_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// What a job's run asks of placement ([`JobState::wants`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wants {
    /// A job with a count: replicas to run at once (its remaining completions, at most its
    /// parallelism).
    pub replicas: u32,
    /// `placement: every`: most devices at once (`None`: all).
    pub cap: Option<u32>,
    /// Completion indices with a result.
    pub done_replicas: BTreeSet<u32>,
    /// Devices with a result (`placement: every`).
    pub done_devices: BTreeSet<DeviceId>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(completions: u32, parallelism: Option<u32>) -> Completion {
        Completion {
            completions,
            parallelism,
            backoff_limit: 1,
            active_deadline_ms: None,
            ttl_after_finished_ms: Some(1000),
        }
    }

    fn dev(s: &str) -> DeviceId {
        s.parse().unwrap()
    }

    fn status(replica: u32, run: u64, phase: Phase, code: i32) -> InstanceStatus {
        InstanceStatus {
            schedule: None,
            name: "j".try_into().unwrap(),
            replica,
            revision: "r1".into(),
            phase,
            restarts: 0,
            reason: None,
            exit_code: Some(code),
            started_at_ms: Some(1),
            backoff_ms: None,
            variant: "wasm".into(),
            healthy: None,
            devices: vec![],
            run: Some(run),
            finished_at_ms: Some(2),
        }
    }

    #[test]
    fn a_count_completes_slot_by_slot_within_parallelism() {
        let c = c(3, Some(2));
        let mut j = JobState::start("j".try_into().unwrap(), "r1".into(), 1, 1);
        assert_eq!(j.wants(&c, false).replicas, 2);
        // Running, an earlier run's result, and another revision's: not results.
        assert!(!j.report(false, &dev("a"), 0, &status(0, 1, Phase::Running, 0)));
        assert!(!j.report(false, &dev("a"), 0, &status(0, 0, Phase::Succeeded, 0)));
        let mut other = status(0, 1, Phase::Succeeded, 0);
        other.revision = "r0".into();
        assert!(!j.report(false, &dev("a"), 0, &other));
        assert!(j.report(false, &dev("a"), 0, &status(0, 1, Phase::Succeeded, 0)));
        assert!(
            !j.report(false, &dev("a"), 0, &status(0, 1, Phase::Succeeded, 0)),
            "once"
        );
        assert!(!j.conclude(&c, false, 5));
        let w = j.wants(&c, false);
        assert_eq!((w.replicas, w.done_replicas), (2, BTreeSet::from([0])));
        j.report(false, &dev("b"), 1, &status(1, 1, Phase::Succeeded, 0));
        assert_eq!(j.wants(&c, false).replicas, 1);
        j.report(false, &dev("a"), 2, &status(2, 1, Phase::Succeeded, 0));
        assert!(j.conclude(&c, false, 7));
        let f = j.finished.clone().unwrap();
        assert!(f.succeeded);
        assert_eq!(f.at_ms, 7);
        assert_eq!(j.wants(&c, false).replicas, 0);
        assert!(!j.expired(&c, 1006));
        assert!(j.expired(&c, 1007));
        let next = j.next("r1".into(), 9);
        assert_eq!((next.run, next.results.len(), next.finished), (2, 0, None));
        assert!(next.id > j.id);
        // The same millisecond: still a new id.
        assert_eq!(j.next("r1".into(), 0).id, j.id + 1);
    }

    #[test]
    fn one_failed_completion_fails_the_run_and_says_where() {
        let c = c(2, Some(2));
        let mut j = JobState::start("j".try_into().unwrap(), "r1".into(), 1, 1);
        let mut s = status(1, 1, Phase::Failed, 3);
        s.restarts = 1;
        j.report(false, &dev("b"), 1, &s);
        assert!(j.conclude(&c, false, 4));
        let f = j.finished.clone().unwrap();
        assert!(!f.succeeded);
        assert_eq!(
            f.reason,
            "completion 1 failed on device b after 1 retries: exit status 3"
        );
        assert_eq!(j.wants(&c, false).replicas, 0);
    }

    #[test]
    fn every_keeps_a_result_per_device_and_never_finishes() {
        let c = Completion {
            completions: 0,
            parallelism: Some(1),
            ..c(0, None)
        };
        let mut j = JobState::start("j".try_into().unwrap(), "r1".into(), 1, 1);
        // The same replica index on two devices (each device's own replica 0 over time).
        assert!(j.report(true, &dev("a"), 0, &status(0, 1, Phase::Succeeded, 0)));
        assert!(j.report(true, &dev("b"), 0, &status(0, 1, Phase::Failed, 2)));
        assert!(!j.conclude(&c, true, 3));
        assert_eq!(j.finished, None);
        let w = j.wants(&c, true);
        assert_eq!(w.cap, Some(1));
        assert_eq!(w.done_devices, BTreeSet::from([dev("a"), dev("b")]));
        assert_eq!((j.succeeded(), j.failed()), (1, 1));
    }
}
