//! How long a lost device is waited for, per workload (`spec.disconnect`).
//!
//! - `lostAfter`: the hub moves the workload's replicas off a device it has not heard from
//!   for this long (by default the hub's `--device-grace`, for every workload alike);
//! - `replace: false`: never move them (a workload bound to its device's data): the replica
//!   stays assigned, and runs again there when the device is back;
//! - `stopAfter`: the **agent** stops the replica when the broker has confirmed none of its
//!   messages for this long (the hub cannot have heard it either), and starts it again only
//!   once it has the hub's desired state again. A replica with `stopAfter` also does not
//!   start from the persisted state at boot before that.
//!
//! Together (`replicas: 1`, `replace: true`, `stopAfter`), a singleton never runs twice in a
//! partition: the hub waits `lostAfter ≥ stopAfter + stopGracePeriod + MARGIN_MS` (checked
//! at apply), from the last time it heard the device. The device's last confirmed contact
//! is at most one status period later than that (its status every
//! [`crate::wire::messages::STATUS_PERIOD_MS`]; keep-alive answers prove the link but reach
//! no hub), so the copy cut off has stopped before the replacement may start. This holds
//! while hub and broker are one (the embedded broker) or stay connected.

use crate::model::quantity::{format_duration_ms, parse_duration};
use serde::{Deserialize, Serialize};

/// What `lostAfter` must exceed `stopAfter` plus the stop grace period by: a status period
/// (how much later than the hub's last hearing the device's last confirmed contact can be)
/// and 5 s for delivery, the agent's and the hub's once-a-second checks and a busy loop.
pub const MARGIN_MS: u64 = crate::wire::messages::STATUS_PERIOD_MS + 5_000;

/// The shortest `stopAfter`.
pub const MIN_STOP_AFTER_MS: u64 = 5_000;

/// The shortest `lostAfter`: two status periods (a device is silent between its statuses).
pub const MIN_LOST_AFTER_MS: u64 = 2 * crate::wire::messages::STATUS_PERIOD_MS;

/// A validated `spec.disconnect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Disconnect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_after_ms: Option<u64>,
    pub replace: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_after_ms: Option<u64>,
}

fn duration(field: &str, v: Option<&str>, errs: &mut Vec<String>) -> Option<u64> {
    let s = v?;
    match parse_duration(s) {
        Ok(d) if d.as_millis() >= 1000 => Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        Ok(_) => {
            errs.push(format!("{field} {s:?} is invalid: must be at least 1s"));
            None
        }
        Err(e) => {
            errs.push(format!("{field}: {e}"));
            None
        }
    }
}

/// Validates `spec.disconnect`; `every`: `placement: every`; `stop_grace_ms`: how long
/// stopping a replica may take (a container's `stopGracePeriod`, 0 for WASM only).
pub fn validate(
    wire: crate::wire::manifest::DisconnectSpec,
    every: bool,
    stop_grace_ms: u64,
    errs: &mut Vec<String>,
) -> Option<Disconnect> {
    let before = errs.len();
    if let Some(ms) = duration(
        "spec.disconnect.stopAfter",
        wire.stop_after.as_deref(),
        &mut Vec::new(),
    )
    .filter(|ms| *ms < MIN_STOP_AFTER_MS)
    {
        errs.push(format!(
            "spec.disconnect.stopAfter {:?} is invalid: must be at least {} (the device proves contact every quarter of it)",
            wire.stop_after.as_deref().unwrap_or_default(),
            format_duration_ms(MIN_STOP_AFTER_MS.max(ms)),
        ));
    }
    let lost_after_ms = duration(
        "spec.disconnect.lostAfter",
        wire.lost_after.as_deref(),
        errs,
    )
    .filter(|ms| {
        let ok = *ms >= MIN_LOST_AFTER_MS;
        if !ok {
            errs.push(format!(
                "spec.disconnect.lostAfter {:?} is invalid: must be at least {} (a device reports every {}, so a shorter wait moves replicas off devices that are fine)",
                wire.lost_after.as_deref().unwrap_or_default(),
                format_duration_ms(MIN_LOST_AFTER_MS),
                format_duration_ms(crate::wire::messages::STATUS_PERIOD_MS),
            ));
        }
        ok
    });
    let stop_after_ms = duration(
        "spec.disconnect.stopAfter",
        wire.stop_after.as_deref(),
        errs,
    );
    let replace = wire.replace.unwrap_or(true);
    if every && (wire.lost_after.is_some() || wire.replace.is_some()) {
        errs.push(
            "spec.disconnect.lostAfter and replace are invalid with placement \"every\": its replicas stay on their devices (stopAfter applies)"
                .to_string(),
        );
    }
    if !replace && wire.lost_after.is_some() {
        errs.push(
            "spec.disconnect.lostAfter is invalid with replace: false: the replicas never move"
                .to_string(),
        );
    }
    if let (Some(stop), true, false) = (stop_after_ms, replace, every) {
        let least = stop.saturating_add(stop_grace_ms).saturating_add(MARGIN_MS);
        match lost_after_ms {
            Some(lost) if lost >= least => {}
            _ => errs.push(format!(
                "spec.disconnect.lostAfter {} is invalid: with stopAfter {} and replace it must be at least {} (stopAfter + stop grace period {} + {}), so the copy cut off has stopped before a replacement may start",
                wire.lost_after.as_deref().map_or("(the hub's --device-grace)".to_string(), |s| format!("{s:?}")),
                format_duration_ms(stop),
                format_duration_ms(least),
                format_duration_ms(stop_grace_ms),
                format_duration_ms(MARGIN_MS),
            )),
        }
    }
    (errs.len() == before).then_some(Disconnect {
        lost_after_ms,
        replace,
        stop_after_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::manifest::DisconnectSpec;

    fn spec(lost: Option<&str>, replace: Option<bool>, stop: Option<&str>) -> DisconnectSpec {
        DisconnectSpec {
            lost_after: lost.map(Into::into),
            replace,
            stop_after: stop.map(Into::into),
        }
    }

    #[test]
    fn a_singleton_s_lost_after_leaves_room_for_the_stop() {
        let mut errs = Vec::new();
        let d = validate(spec(Some("20s"), None, Some("5s")), false, 0, &mut errs).unwrap();
        assert_eq!(
            (d.lost_after_ms, d.replace, d.stop_after_ms),
            (Some(20_000), true, Some(5_000))
        );
        // A container's grace period counts: 5s + 10s + 15s.
        assert!(validate(
            spec(Some("20s"), None, Some("5s")),
            false,
            10_000,
            &mut errs
        )
        .is_none());
        assert!(
            errs[0].starts_with("spec.disconnect.lostAfter \"20s\" is invalid: with stopAfter 5s and replace it must be at least 30s"),
            "{errs:?}"
        );
        // stopAfter without replace (the replica never moves): no constraint.
        let mut errs = Vec::new();
        assert!(validate(spec(None, Some(false), Some("5s")), false, 0, &mut errs).is_some());
        assert!(validate(spec(None, None, Some("1m")), true, 0, &mut errs).is_some());
        assert!(errs.is_empty(), "{errs:?}");
    }

    #[test]
    fn refusals_name_the_field() {
        type Case = (DisconnectSpec, bool, &'static str);
        let cases: Vec<Case> = vec![
            (
                spec(Some("500ms"), None, None),
                false,
                "spec.disconnect.lostAfter \"500ms\" is invalid: must be at least 1s",
            ),
            (
                spec(Some("10s"), None, None),
                false,
                "spec.disconnect.lostAfter \"10s\" is invalid: must be at least 20s",
            ),
            (
                spec(None, None, Some("soon")),
                false,
                "spec.disconnect.stopAfter: ",
            ),
            (
                spec(Some("1m"), None, None),
                true,
                "spec.disconnect.lostAfter and replace are invalid with placement \"every\"",
            ),
            (
                spec(Some("1m"), Some(false), None),
                false,
                "spec.disconnect.lostAfter is invalid with replace: false",
            ),
            (
                spec(None, None, Some("5s")),
                false,
                "spec.disconnect.lostAfter (the hub's --device-grace) is invalid",
            ),
        ];
        for (s, every, want) in cases {
            let mut errs = Vec::new();
            assert!(validate(s, every, 0, &mut errs).is_none(), "{want}");
            assert!(
                errs.iter().any(|e| e.starts_with(want)),
                "{errs:?} lacks {want:?}"
            );
        }
    }
}
