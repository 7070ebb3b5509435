//! Jobs: workloads that run to completion (`spec.completion`) rather than as services.
//!
//! A job's replicas run until they exit. A run that fails is retried **on its device** with
//! the restart back-off, up to `backoffLimit` times (so a board cut off from the hub still
//! retries), and then counts as failed; `activeDeadline` bounds one run, retries included,
//! also on the device. The hub counts results:
//!
//! - with a count (`completions`, default 1): each completion index is one replica, placed
//!   like any replica, at most `parallelism` (default 1) at once; the job is complete once
//!   every index succeeded, and failed as soon as one index failed for good;
//! - with `placement: every`: once on every matching device, devices that join later
//!   included, at most `parallelism` devices at once (default: all), with a result per
//!   device. Such a job is never "finished" (a device may join), so it has no
//!   `ttlAfterFinished`.
//!
//! Jobs do not roll out: a new revision (any change of the spec) is a new run, which starts
//! from no results, as does `shoal rerun`. A job's restart policy is `OnFailure` unless it
//! says `Never`; `Always` would never finish and is refused, as is `spec.update`.

use crate::model::quantity::parse_duration;
use serde::{Deserialize, Serialize};

/// Default `backoffLimit` (as Kubernetes').
pub const DEFAULT_BACKOFF_LIMIT: u32 = 6;
/// Most `backoffLimit` allows.
pub const MAX_BACKOFF_LIMIT: u32 = 1000;

/// A validated `spec.completion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Completion {
    /// Successful runs wanted; 0 with `placement: every` (once per device).
    pub completions: u32,
    /// Most runs at once; `None`: all (only with `placement: every`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
    pub backoff_limit: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_after_finished_ms: Option<u64>,
}

/// What else of the spec a job's validation needs to see.
pub struct Context<'a> {
    pub every: bool,
    /// `spec.replicas`, when given.
    pub replicas: Option<u32>,
    /// `spec.restart.policy`, when given.
    pub restart_policy: Option<&'a str>,
    pub update_given: bool,
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `backoffLimit` (default [`DEFAULT_BACKOFF_LIMIT`]) and `activeDeadline` of one run, as
/// jobs and schedules share them.
pub fn run_limits(
    wire: &crate::wire::manifest::Completion,
    restart_policy: Option<&str>,
    errs: &mut Vec<String>,
) -> (u32, Option<u64>) {
    if let (Some("Never"), Some(n)) = (restart_policy, wire.backoff_limit) {
        errs.push(format!(
            "spec.completion.backoffLimit {n} is invalid with spec.restart.policy \"Never\": a failed run is not retried (use OnFailure)"
        ));
    }
    let backoff_limit = wire.backoff_limit.unwrap_or(DEFAULT_BACKOFF_LIMIT);
    if backoff_limit > MAX_BACKOFF_LIMIT {
        errs.push(format!(
            "spec.completion.backoffLimit {backoff_limit} is invalid: must be at most {MAX_BACKOFF_LIMIT}"
        ));
    }
    let active_deadline_ms =
        wire.active_deadline
            .as_deref()
            .and_then(|s| match parse_duration(s) {
                Ok(d) if !d.is_zero() => Some(millis(d)),
                Ok(_) => {
                    errs.push(format!(
                        "spec.completion.activeDeadline {s:?} is invalid: must be more than 0"
                    ));
                    None
                }
                Err(e) => {
                    errs.push(format!("spec.completion.activeDeadline: {e}"));
                    None
                }
            });
    (backoff_limit, active_deadline_ms)
}

/// Validates `spec.completion` against the rest of the spec; every problem goes to `errs`.
pub fn validate(
    wire: crate::wire::manifest::Completion,
    cx: &Context<'_>,
    errs: &mut Vec<String>,
) -> Option<Completion> {
    let before = errs.len();
    if let Some(n) = cx.replicas {
        errs.push(format!(
            "spec.replicas {n} is invalid with spec.completion: a job counts runs, give spec.completion.completions (and parallelism)"
        ));
    }
    if cx.restart_policy == Some("Always") {
        errs.push(
            "spec.restart.policy \"Always\" is invalid with spec.completion: a job would never finish; use OnFailure or Never"
                .to_string(),
        );
    }
    if cx.update_given {
        errs.push(
            "spec.update is invalid with spec.completion: jobs do not roll out, a new revision starts a new run"
                .to_string(),
        );
    }
    let completions = match (cx.every, wire.completions) {
        (true, Some(n)) => {
            errs.push(format!(
                "spec.completion.completions {n} is invalid with placement \"every\": the job runs once on every matching device"
            ));
            0
        }
        (true, None) => 0,
        (false, None) => 1,
        (false, Some(n)) if n == 0 || n > crate::model::workload::MAX_REPLICAS => {
            errs.push(format!(
                "spec.completion.completions {n} is invalid: must be 1-{}",
                crate::model::workload::MAX_REPLICAS
            ));
            1
        }
        (false, Some(n)) => n,
    };
    let parallelism = match wire.parallelism {
        Some(0) => {
            errs.push("spec.completion.parallelism 0 is invalid: must be at least 1".into());
            None
        }
        Some(p) if !cx.every && p > completions => {
            errs.push(format!(
                "spec.completion.parallelism {p} is invalid: more than completions {completions}"
            ));
            None
        }
        Some(p) => Some(p),
        None if cx.every => None,
        None => Some(1),
    };
    let (backoff_limit, active_deadline_ms) = run_limits(&wire, cx.restart_policy, errs);
    let ttl_after_finished_ms = match (cx.every, wire.ttl_after_finished.as_deref()) {
        (_, None) => None,
        (true, Some(s)) => {
            errs.push(format!(
                "spec.completion.ttlAfterFinished {s:?} is invalid with placement \"every\": such a job never finishes (devices that join later run it too); delete it with `shoal delete workload`"
            ));
            None
        }
        (false, Some(s)) => parse_duration(s)
            .map(millis)
            .map_err(|e| errs.push(format!("spec.completion.ttlAfterFinished: {e}")))
            .ok(),
    };
    (errs.len() == before).then_some(Completion {
        completions,
        parallelism,
        backoff_limit,
        active_deadline_ms,
        ttl_after_finished_ms,
    })
}

/// What a device needs to know of a job replica it runs (in its desired state): which run
/// it belongs to, and the limits it enforces on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRun {
    /// The run's id, unique per run of the job (never reused, even by a job deleted and
    /// applied again): a new one (`shoal rerun`) runs again what the last finished.
    pub run: u64,
    /// Retries of a failed run before it is failed for good.
    pub backoff_limit: u32,
    /// Longest the run may take, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline_ms: Option<u64>,
}

impl JobRun {
    /// Whether a run that failed after `retries` retries is failed for good.
    pub fn gives_up(&self, retries: u32) -> bool {
        retries >= self.backoff_limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::manifest::Completion as Wire;

    fn cx(every: bool) -> Context<'static> {
        Context {
            every,
            replicas: None,
            restart_policy: None,
            update_given: false,
        }
    }

    #[test]
    fn defaults() {
        let mut errs = Vec::new();
        let c = validate(Wire::default(), &cx(false), &mut errs).unwrap();
        assert_eq!(
            (c.completions, c.parallelism, c.backoff_limit),
            (1, Some(1), 6)
        );
        let c = validate(Wire::default(), &cx(true), &mut errs).unwrap();
        assert_eq!((c.completions, c.parallelism), (0, None));
        assert!(errs.is_empty());
    }

    #[test]
    fn every_refusal_names_field_and_value() {
        type Case = (&'static str, Wire, Context<'static>, &'static str);
        let cases: Vec<Case> = vec![
            (
                "completions on every",
                Wire {
                    completions: Some(3),
                    ..Default::default()
                },
                cx(true),
                "spec.completion.completions 3 is invalid with placement \"every\"",
            ),
            (
                "ttl on every",
                Wire {
                    ttl_after_finished: Some("1h".into()),
                    ..Default::default()
                },
                cx(true),
                "spec.completion.ttlAfterFinished \"1h\" is invalid with placement \"every\"",
            ),
            (
                "parallelism above completions",
                Wire {
                    completions: Some(2),
                    parallelism: Some(3),
                    ..Default::default()
                },
                cx(false),
                "spec.completion.parallelism 3 is invalid: more than completions 2",
            ),
            (
                "zero parallelism",
                Wire {
                    parallelism: Some(0),
                    ..Default::default()
                },
                cx(true),
                "spec.completion.parallelism 0 is invalid",
            ),
            (
                "zero deadline",
                Wire {
                    active_deadline: Some("0s".into()),
                    ..Default::default()
                },
                cx(false),
                "spec.completion.activeDeadline \"0s\" is invalid: must be more than 0",
            ),
            (
                "bad ttl",
                Wire {
                    ttl_after_finished: Some("soon".into()),
                    ..Default::default()
                },
                cx(false),
                "spec.completion.ttlAfterFinished:",
            ),
            (
                "replicas",
                Wire::default(),
                Context {
                    replicas: Some(2),
                    ..cx(false)
                },
                "spec.replicas 2 is invalid with spec.completion",
            ),
            (
                "always",
                Wire::default(),
                Context {
                    restart_policy: Some("Always"),
                    ..cx(false)
                },
                "spec.restart.policy \"Always\" is invalid with spec.completion",
            ),
            (
                "update",
                Wire::default(),
                Context {
                    update_given: true,
                    ..cx(false)
                },
                "spec.update is invalid with spec.completion",
            ),
            (
                "never retried",
                Wire {
                    backoff_limit: Some(2),
                    ..Default::default()
                },
                Context {
                    restart_policy: Some("Never"),
                    ..cx(false)
                },
                "spec.completion.backoffLimit 2 is invalid with spec.restart.policy \"Never\"",
            ),
            (
                "backoff limit",
                Wire {
                    backoff_limit: Some(5000),
                    ..Default::default()
                },
                cx(false),
                "spec.completion.backoffLimit 5000 is invalid",
            ),
        ];
        for (name, wire, cx, want) in cases {
            let mut errs = Vec::new();
            assert!(validate(wire, &cx, &mut errs).is_none(), "{name}");
            assert!(
                errs.iter().any(|e| e.starts_with(want)),
                "{name}: {errs:?} lacks {want:?}"
            );
        }
    }

    #[test]
    fn gives_up_after_backoff_limit_retries() {
        let j = JobRun {
            run: 1,
            backoff_limit: 2,
            active_deadline_ms: None,
        };
        assert!(!j.gives_up(0));
        assert!(!j.gives_up(1));
        assert!(j.gives_up(2));
    }
}
