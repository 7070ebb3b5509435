//! Schedules that run on the device (`spec.schedule`): each replica of the workload fires
//! runs to completion at the times a cron expression names, in a time zone, **by its
//! device's clock**, so a board cut off from the hub still runs its 03:00 job at 03:00.
//!
//! - `cron`: five fields (minute hour day-of-month month day-of-week), or six with seconds
//!   first; names (`MON`, `JAN`), ranges, lists and steps. Parsed by the `croner` crate,
//!   which also walks daylight-saving changes (a skipped local time fires after the change,
//!   a repeated one once).
//! - `timeZone`: an IANA name (`Europe/Berlin`; default `UTC`), from the `chrono-tz`
//!   database compiled in, so a device without `/usr/share/zoneinfo` agrees with the hub.
//! - `concurrency`: what a run due while the previous one still runs does: `Forbid` (the
//!   default: it is skipped and recorded so) or `Replace` (the running one is stopped).
//!   `Allow` is refused: runs of one replica would share its identity on the device (its log,
//!   its status, a container's id).
//! - `startingDeadline`: a run found due later than this after its time (the device was off,
//!   or its agent down) is recorded as missed instead of started. Without it, the latest
//!   missed run starts once, however late (never more than one catch-up).
//!
//! A run is a job's run: `spec.completion.backoffLimit` and `activeDeadline` apply to each
//! (its other fields do not: a schedule has no count and never finishes).

use crate::model::quantity::parse_duration;
use chrono::{TimeZone as _, Utc};
use serde::{Deserialize, Serialize};

/// Runs a device keeps (and reports) per scheduled replica.
pub const HISTORY: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Concurrency {
    Forbid,
    Replace,
}

/// A validated `spec.schedule`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Schedule {
    pub cron: String,
    pub time_zone: String,
    pub concurrency: Concurrency,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting_deadline_ms: Option<u64>,
}

fn parser() -> croner::parser::CronParser {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build()
}

/// Why a schedule cannot be evaluated (never for a validated one, whose cron and zone
/// parsed at apply; a device gets only those).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("cron {cron:?} is invalid: {reason}")]
    Cron { cron: String, reason: String },
    #[error("time zone {0:?} is unknown: give an IANA name such as Europe/Berlin or UTC")]
    Zone(String),
}

impl Schedule {
    fn parts(&self) -> Result<(croner::Cron, chrono_tz::Tz), ScheduleError> {
        let cron = parser()
            .parse(&self.cron)
            .map_err(|e| ScheduleError::Cron {
                cron: self.cron.clone(),
                reason: e.to_string(),
            })?;
        let tz: chrono_tz::Tz = self
            .time_zone
            .parse()
            .map_err(|_| ScheduleError::Zone(self.time_zone.clone()))?;
        Ok((cron, tz))
    }

    /// The first time the schedule names strictly after `after_ms` (Unix ms); `Ok(None)`
    /// when there is none (an impossible date such as 30 February).
    pub fn next_after(&self, after_ms: u64) -> Result<Option<u64>, ScheduleError> {
        let (cron, tz) = self.parts()?;
        // croner keeps the start's fraction of a second: times are whole seconds here.
        let Some(t) = Utc
            .timestamp_millis_opt(ms_i64(after_ms / 1000 * 1000))
            .single()
        else {
            return Ok(None);
        };
        Ok(cron
            .find_next_occurrence(&t.with_timezone(&tz), false)
            .ok()
            .map(|d| d.timestamp_millis().max(0) as u64))
    }

    /// The latest time the schedule names in `(after_ms, now_ms]`: the run due now, if any.
    pub fn due(&self, after_ms: u64, now_ms: u64) -> Result<Option<u64>, ScheduleError> {
        let (cron, tz) = self.parts()?;
        let Some(now) = Utc
            .timestamp_millis_opt(ms_i64(now_ms / 1000 * 1000))
            .single()
        else {
            return Ok(None);
        };
        let latest = cron
            .find_previous_occurrence(&now.with_timezone(&tz), true)
            .ok()
            .map(|d| d.timestamp_millis().max(0) as u64);
        Ok(latest.filter(|t| *t > after_ms))
    }
}

fn ms_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// Validates `spec.schedule`; `every` and the job fields given decide what else is allowed.
pub fn validate(
    wire: crate::wire::manifest::ScheduleSpec,
    completion: Option<&crate::wire::manifest::Completion>,
    errs: &mut Vec<String>,
) -> Option<Schedule> {
    let before = errs.len();
    if let Some(c) = completion {
        for (given, field) in [
            (c.completions.is_some(), "completions"),
            (c.parallelism.is_some(), "parallelism"),
            (c.ttl_after_finished.is_some(), "ttlAfterFinished"),
        ] {
            if given {
                errs.push(format!(
                    "spec.completion.{field} is invalid with spec.schedule: each replica runs on its own schedule and never finishes (backoffLimit and activeDeadline apply to each run)"
                ));
            }
        }
    }
    let concurrency = match wire.concurrency.as_deref() {
        None | Some("Forbid") => Concurrency::Forbid,
        Some("Replace") => Concurrency::Replace,
        Some("Allow") => {
            errs.push(
                "spec.schedule.concurrency \"Allow\" is not supported: runs of one replica would share its log, status and container on the device; use Forbid or Replace (or more replicas)"
                    .to_string(),
            );
            Concurrency::Forbid
        }
        Some(other) => {
            errs.push(format!(
                "spec.schedule.concurrency {other:?} is invalid: expected Forbid or Replace"
            ));
            Concurrency::Forbid
        }
    };
    let starting_deadline_ms =
        wire.starting_deadline
            .as_deref()
            .and_then(|s| match parse_duration(s) {
                Ok(d) if d.as_millis() >= 1000 => {
                    Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                }
                Ok(_) => {
                    errs.push(format!(
                        "spec.schedule.startingDeadline {s:?} is invalid: must be at least 1s (the device checks once a second)"
                    ));
                    None
                }
                Err(e) => {
                    errs.push(format!("spec.schedule.startingDeadline: {e}"));
                    None
                }
            });
    let s = Schedule {
        cron: wire.cron.trim().to_string(),
        time_zone: wire.time_zone.unwrap_or_else(|| "UTC".to_string()),
        concurrency,
        starting_deadline_ms,
    };
    if let Err(e) = parser().parse(&s.cron) {
        errs.push(format!(
            "spec.schedule.cron {:?} is invalid: {e} (expected five fields, minute hour day-of-month month day-of-week, or six with seconds first)",
            s.cron
        ));
    }
    if s.time_zone.parse::<chrono_tz::Tz>().is_err() {
        errs.push(format!(
            "spec.schedule.timeZone: {}",
            ScheduleError::Zone(s.time_zone.clone())
        ));
    }
    (errs.len() == before).then_some(s)
}

/// What a device needs to run a scheduled replica (in its desired state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredSchedule {
    pub schedule: Schedule,
    /// Retries of a failed run (`spec.completion.backoffLimit`, default 6).
    pub backoff_limit: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline_ms: Option<u64>,
}

/// How one scheduled run went, as the device keeps and reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledRun {
    /// The time the schedule named (Unix ms).
    pub scheduled_ms: u64,
    /// `Running`, `Succeeded`, `Failed`, `Skipped` (the previous run still ran, `Forbid`) or
    /// `Missed` (found past its `startingDeadline`).
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// Whether the device heard the hub when the run was started (runs fired offline are
    /// reported once it does again).
    #[serde(default)]
    pub offline: bool,
}

/// A scheduled replica's state on its device, as reported: its next run and the last
/// [`HISTORY`] runs, newest last.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_ms: Option<u64>,
    #[serde(default)]
    pub runs: Vec<ScheduledRun>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::manifest::ScheduleSpec;

    fn spec(cron: &str, tz: Option<&str>) -> ScheduleSpec {
        ScheduleSpec {
            cron: cron.into(),
            time_zone: tz.map(Into::into),
            concurrency: None,
            starting_deadline: None,
        }
    }

    /// 2026-03-28T12:00:00Z, the Saturday before Europe/Berlin moves to summer time.
    const SAT_NOON: u64 = 1_774_699_200_000;

    #[test]
    fn three_in_the_morning_in_berlin_follows_daylight_saving() {
        let mut errs = Vec::new();
        let s = validate(spec("0 3 * * *", Some("Europe/Berlin")), None, &mut errs).unwrap();
        // Sunday 29 March 03:00 CEST is 01:00 UTC (the clocks jumped 02:00 → 03:00).
        let sunday = s.next_after(SAT_NOON).unwrap().unwrap();
        assert_eq!(sunday, 1_774_746_000_000);
        // Saturday 28 March 03:00 CET was 02:00 UTC: one day and one hour earlier.
        assert_eq!(s.due(0, SAT_NOON).unwrap(), Some(sunday - 23 * 3_600_000));
        // Nothing due again until then.
        assert_eq!(s.due(sunday - 23 * 3_600_000, SAT_NOON).unwrap(), None);
        assert_eq!(s.due(0, sunday).unwrap(), Some(sunday), "inclusive of now");
    }

    #[test]
    fn seconds_are_a_sixth_field() {
        let mut errs = Vec::new();
        let s = validate(spec("*/2 * * * * *", None), None, &mut errs).unwrap();
        assert_eq!(s.next_after(1_000).unwrap(), Some(2_000));
        assert_eq!(s.due(1_000, 5_500).unwrap(), Some(4_000));
        assert_eq!(s.next_after(1_500).unwrap(), Some(2_000));
        assert_eq!(s.due(4_000, 5_999).unwrap(), None);
    }

    #[test]
    fn refusals_name_field_value_and_reason() {
        let cases: Vec<(
            ScheduleSpec,
            Option<crate::wire::manifest::Completion>,
            &str,
        )> = vec![
            (
                spec("61 * * * *", None),
                None,
                "spec.schedule.cron \"61 * * * *\" is invalid: ",
            ),
            (
                spec("0 3 * * *", Some("Mars/Olympus")),
                None,
                "spec.schedule.timeZone: time zone \"Mars/Olympus\" is unknown",
            ),
            (
                ScheduleSpec {
                    concurrency: Some("Allow".into()),
                    ..spec("0 3 * * *", None)
                },
                None,
                "spec.schedule.concurrency \"Allow\" is not supported",
            ),
            (
                ScheduleSpec {
                    starting_deadline: Some("0s".into()),
                    ..spec("0 3 * * *", None)
                },
                None,
                "spec.schedule.startingDeadline \"0s\" is invalid",
            ),
            (
                spec("0 3 * * *", None),
                Some(crate::wire::manifest::Completion {
                    completions: Some(2),
                    ..Default::default()
                }),
                "spec.completion.completions is invalid with spec.schedule",
            ),
        ];
        for (s, c, want) in cases {
            let mut errs = Vec::new();
            assert!(validate(s, c.as_ref(), &mut errs).is_none(), "{want}");
            assert!(
                errs.iter().any(|e| e.starts_with(want)),
                "{errs:?} lacks {want:?}"
            );
        }
    }
}
