//! The device-side scheduler's decisions (`spec.schedule`, see
//! [`shoal_api::model::schedule`]): pure, over times in Unix milliseconds, with `now` a
//! parameter; the agent persists [`ScheduleState`] per scheduled replica *before* it starts
//! a run, so each time the schedule names is run at most once, whatever restarts.

use serde::{Deserialize, Serialize};
use shoal_api::model::schedule::{
    Concurrency, DesiredSchedule, ScheduleError, ScheduleStatus, ScheduledRun, HISTORY,
};

/// What the device remembers of one scheduled replica.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleState {
    /// The scheduled time of the last run handled (started, skipped or missed): only later
    /// times are due. Set to the time the replica was first seen, so a new schedule does
    /// not catch up on the past.
    pub last_ms: u64,
    /// The last runs, newest last (at most [`HISTORY`]).
    pub runs: Vec<ScheduledRun>,
    /// The schedule `last_ms` counts for: a changed one starts from when it changed (no
    /// catching up on times the old one did not name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<shoal_api::model::schedule::Schedule>,
}

/// What to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing due.
    Idle,
    /// Start the run scheduled at this time.
    Fire(u64),
    /// Stop the run in progress and start the one scheduled at this time (`Replace`).
    Replace(u64),
    /// The run scheduled at this time is due while the previous one runs (`Forbid`).
    Skip(u64),
    /// The run scheduled at this time was found past its `startingDeadline`.
    Miss(u64),
}

/// The decision for a replica whose state is `state`, at `now`; `running`: a run of it is
/// still in progress.
pub fn decide(
    s: &DesiredSchedule,
    state: &ScheduleState,
    running: bool,
    now: u64,
) -> Result<Decision, ScheduleError> {
    let Some(at) = s.schedule.due(state.last_ms, now)? else {
        return Ok(Decision::Idle);
    };
    let late = now.saturating_sub(at);
    Ok(
        match (
            s.schedule.starting_deadline_ms,
            running,
            s.schedule.concurrency,
        ) {
            (Some(d), _, _) if late > d => Decision::Miss(at),
            (_, false, _) => Decision::Fire(at),
            (_, true, Concurrency::Forbid) => Decision::Skip(at),
            (_, true, Concurrency::Replace) => Decision::Replace(at),
        },
    )
}

impl ScheduleState {
    /// Notes a run (handled at its scheduled time), keeping the newest [`HISTORY`].
    pub fn record(&mut self, run: ScheduledRun) {
        self.last_ms = self.last_ms.max(run.scheduled_ms);
        self.runs.push(run);
        let extra = self.runs.len().saturating_sub(HISTORY);
        self.runs.drain(..extra);
    }

    /// The run scheduled at `at` ended as `outcome`.
    pub fn finish(&mut self, at: u64, outcome: &str, exit_code: Option<i32>, finished_ms: u64) {
        if let Some(r) = self.runs.iter_mut().rev().find(|r| r.scheduled_ms == at) {
            r.outcome = outcome.to_string();
            r.exit_code = exit_code;
            r.finished_ms = Some(finished_ms);
        }
    }

    /// After an agent restart: runs still marked running were cut short.
    pub fn interrupted(&mut self, now: u64) -> bool {
        let mut changed = false;
        for r in self.runs.iter_mut().filter(|r| r.outcome == "Running") {
            r.outcome = "Interrupted".into();
            r.finished_ms = Some(now);
            changed = true;
        }
        changed
    }

    /// What the replica's status shows.
    pub fn status(&self, s: &DesiredSchedule, now: u64) -> ScheduleStatus {
        ScheduleStatus {
            next_ms: s.schedule.next_after(self.last_ms.max(now)).ok().flatten(),
            runs: self.runs.clone(),
        }
    }
}

/// A history entry for a run handled at `at`.
pub fn run(at: u64, outcome: &str, offline: bool) -> ScheduledRun {
    ScheduledRun {
        scheduled_ms: at,
        outcome: outcome.to_string(),
        exit_code: None,
        finished_ms: None,
        offline,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::model::schedule::Schedule;

    fn every_two_seconds(concurrency: Concurrency, deadline: Option<u64>) -> DesiredSchedule {
        DesiredSchedule {
            schedule: Schedule {
                cron: "*/2 * * * * *".into(),
                time_zone: "UTC".into(),
                concurrency,
                starting_deadline_ms: deadline,
            },
            backoff_limit: 0,
            active_deadline_ms: None,
        }
    }

    #[test]
    fn decisions_over_a_mocked_clock() {
        let s = every_two_seconds(Concurrency::Forbid, Some(3_000));
        let state = |last| ScheduleState {
            last_ms: last,
            runs: vec![],
            schedule: None,
        };
        type Case = (&'static str, u64, bool, u64, Decision);
        let cases: Vec<Case> = vec![
            ("nothing yet", 10_000, false, 11_999, Decision::Idle),
            (
                "due on the second",
                10_000,
                false,
                12_000,
                Decision::Fire(12_000),
            ),
            (
                "due, a little late",
                10_000,
                false,
                12_900,
                Decision::Fire(12_000),
            ),
            (
                "the latest of several missed",
                10_000,
                false,
                17_500,
                Decision::Fire(16_000),
            ),
            (
                "the latest, within its deadline",
                10_000,
                false,
                19_999,
                Decision::Fire(18_000),
            ),
            (
                "still running, Forbid",
                10_000,
                true,
                12_000,
                Decision::Skip(12_000),
            ),
            ("handled already", 12_000, false, 12_500, Decision::Idle),
        ];
        for (name, last, running, now, want) in cases {
            assert_eq!(
                decide(&s, &state(last), running, now).unwrap(),
                want,
                "{name}"
            );
        }
        // Off for a while: the last due time is older than the deadline allows.
        let strict = every_two_seconds(Concurrency::Forbid, Some(500));
        assert_eq!(
            decide(&strict, &state(10_000), false, 12_900).unwrap(),
            Decision::Miss(12_000)
        );
        let replace = every_two_seconds(Concurrency::Replace, None);
        assert_eq!(
            decide(&replace, &state(10_000), true, 14_000).unwrap(),
            Decision::Replace(14_000)
        );
    }

    #[test]
    fn history_keeps_the_newest_and_marks_interrupted_runs() {
        let s = every_two_seconds(Concurrency::Forbid, None);
        let mut st = ScheduleState::default();
        for i in 0..12u64 {
            st.record(run(i * 2_000, "Running", i % 2 == 0));
            st.finish(i * 2_000, "Succeeded", Some(0), i * 2_000 + 100);
        }
        st.record(run(24_000, "Running", false));
        assert_eq!(st.runs.len(), HISTORY);
        assert_eq!(st.runs[0].scheduled_ms, 6_000);
        assert_eq!(st.last_ms, 24_000);
        assert!(st.interrupted(25_000));
        assert_eq!(st.runs.last().unwrap().outcome, "Interrupted");
        assert_eq!(st.status(&s, 24_500).next_ms, Some(26_000));
    }
}
