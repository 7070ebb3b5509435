//! Jobs on the command line: `shoal get jobs` (each job's current run and its counts),
//! the run's results in `shoal describe workload`, and `shoal rerun`.

use super::*;
use shoal_api::wire::views::JobView;

/// `COMPLETIONS` as `kubectl get jobs` shows it (`2/3`); for `placement: every`, the
/// devices that succeeded out of those with a result or running (`2/3 devices`).
fn completions(j: &JobView) -> String {
    if j.completions == 0 {
        let seen = j.succeeded + j.failed + j.active;
        format!("{}/{} devices", j.succeeded, seen)
    } else {
        format!("{}/{}", j.succeeded, j.completions)
    }
}

/// How long the run took, or has been running (`-` before the clock says).
fn duration(j: &JobView) -> String {
    let end = j.finished_ms.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    });
    shoal_api::model::quantity::format_age(end.saturating_sub(j.started_ms))
}

pub(crate) fn jobs_table(workloads: &[WorkloadView], wide: bool) -> Table {
    let mut t = Table::new(&[
        "NAME",
        "STATUS",
        "COMPLETIONS",
        "ACTIVE",
        "FAILED",
        "RUN",
        "DURATION",
        "AGE",
        "REASON",
    ]);
    for w in workloads {
        let Some(j) = &w.job else { continue };
        t.row(vec![
            w.name.clone(),
            j.state.clone(),
            completions(j),
            j.active.to_string(),
            j.failed.to_string(),
            j.run.to_string(),
            duration(j),
            ago(j.started_ms),
            j.reason
                .as_deref()
                .map(|r| escaped(r).into_owned())
                .unwrap_or_default(),
        ]);
    }
    if !wide {
        t.hide(&["RUN", "REASON"]);
    }
    t
}

/// The schedule part of `shoal describe workload`: each device's next run and last runs.
pub(crate) fn describe_schedules(w: &WorkloadView) {
    // Formatted by hand through `write!`: a time past the year 9999 is not printable.
    let at = |ms: u64| {
        use std::fmt::Write as _;
        let mut out = String::new();
        let t =
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms));
        match write!(out, "{t}") {
            Ok(()) => out,
            Err(_) => "-".to_string(),
        }
    };
    for r in &w.replicas {
        let Some(s) = &r.schedule else { continue };
        println!(
            "Schedule of replica {} on {}: next run {}",
            r.replica,
            r.device.as_deref().unwrap_or("<none>"),
            s.next_ms.map_or("-".to_string(), at)
        );
        let mut t = Table::new(&["SCHEDULED", "OUTCOME", "EXIT", "FINISHED", "OFFLINE"]);
        for run in &s.runs {
            t.row(vec![
                at(run.scheduled_ms),
                escaped(&run.outcome).into_owned(),
                run.exit_code.map_or("-".into(), |c| c.to_string()),
                run.finished_ms.map_or("-".into(), ago),
                if run.offline { "yes" } else { "" }.to_string(),
            ]);
        }
        print!("{t}");
    }
}

/// The job part of `shoal describe workload`.
pub(crate) fn describe_job(j: &JobView) {
    println!(
        "Job:        run {} {} ({} succeeded, {} failed, {} active{})",
        j.run,
        j.state,
        j.succeeded,
        j.failed,
        j.active,
        if j.completions > 0 {
            format!(", {} wanted", j.completions)
        } else {
            ", once per device".to_string()
        }
    );
    if let Some(r) = &j.reason {
        println!("Finished:   {}", escaped(r));
    }
    if j.results.is_empty() {
        return;
    }
    println!("Results:");
    let mut t = Table::new(&[
        "SLOT", "DEVICE", "PHASE", "EXIT", "RETRIES", "FINISHED", "REASON",
    ]);
    for v in &j.results {
        let r = &v.result;
        t.row(vec![
            v.slot.clone(),
            r.device.to_string(),
            r.phase.to_string(),
            r.exit_code.map_or("-".into(), |c| c.to_string()),
            r.restarts.to_string(),
            r.finished_at_ms.map_or("-".into(), ago),
            r.reason
                .as_deref()
                .map(|r| escaped(r).into_owned())
                .unwrap_or_default(),
        ]);
    }
    print!("{t}");
}
