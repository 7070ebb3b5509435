//! `shoal rollout status|pause|resume|undo|history`: a rollout's progress, followed until
//! it completes or fails.

use super::*;

/// `shoal rollout ACTION WORKLOAD`.
pub(crate) async fn rollout(
    hub: &Hub,
    action: RolloutCmd,
    workload: &str,
    no_wait: bool,
    timeout: Duration,
    to_revision: Option<String>,
    output: Output,
) -> anyhow::Result<()> {
    if to_revision.is_some() && action != RolloutCmd::Undo {
        anyhow::bail!("--to-revision goes with `rollout undo` only");
    }
    let verb = match action {
        RolloutCmd::Pause => Some("pause"),
        RolloutCmd::Resume => Some("resume"),
        RolloutCmd::Promote => Some("promote"),
        RolloutCmd::Undo => Some("undo"),
        RolloutCmd::Status | RolloutCmd::History => None,
    };
    if let Some(verb) = verb {
        let body = match &to_revision {
            Some(rev) => serde_json::json!({ "toRevision": rev }),
            None => serde_json::json!({}),
        };
        hub.post_json(&format!("/v1/workloads/{workload}/rollout/{verb}"), &body)
            .await?;
        let done = match action {
            RolloutCmd::Undo => "undone",
            RolloutCmd::Pause => "paused",
            RolloutCmd::Resume => "resumed",
            _ => "promoted",
        };
        println!("workload/{workload} rollout {done}");
        return Ok(());
    }
    let path = format!("/v1/workloads/{workload}");
    if action == RolloutCmd::History {
        let w: WorkloadView = hub.get(&path).await?;
        let history = w.rollout.map(|r| r.history).unwrap_or_default();
        return emit(&history, output, |_| {
            let mut t = Table::new(&["REVISION", "APPLIED", "OUTCOME"]);
            for e in &history {
                t.row(vec![
                    e.revision.clone(),
                    ago(e.applied_ms),
                    e.outcome.clone(),
                ]);
            }
            t
        });
    }
    // Status until the rollout ends (kubectl rollout status): a live bar on a terminal,
    // otherwise one line per change (for logs and scripts). The last line always goes to
    // stdout.
    let deadline = tokio::time::Instant::now() + timeout;
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} {prefix} [{bar:30}] {pos}/{len} updated {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("#>.");
        let bar = indicatif::ProgressBar::new(0).with_style(style);
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let mut last = String::new();
    loop {
        let w: WorkloadView = hub.get(&path).await?;
        let Some(r) = w.rollout else {
            println!(
                "workload/{workload} has had no rollout (revision {})",
                w.revision
            );
            return Ok(());
        };
        // The reason may quote what a device reported: shown escaped.
        let reason = r
            .reason
            .map(|x| format!(" ({})", escaped(&x)))
            .unwrap_or_default();
        let line = format!(
            "workload/{workload} revision {}: {} {} {}/{} updated, {}/{} ready{reason}",
            r.revision,
            r.state,
            progress_bar(r.updated, r.total, 20),
            r.updated,
            r.total,
            w.ready,
            w.desired,
        );
        let finished = matches!(r.state.as_str(), "Complete" | "Failed" | "RolledBack");
        match &bar {
            Some(bar) => {
                bar.set_prefix(format!("workload/{workload} {} {}", r.revision, r.state));
                bar.set_length(u64::from(r.total));
                bar.set_position(u64::from(r.updated));
                bar.set_message(format!("{}/{} ready{reason}", w.ready, w.desired));
                if finished || no_wait {
                    bar.finish_and_clear();
                    println!("{line}");
                }
            }
            None if line != last => println!("{line}"),
            None => {}
        }
        last = line;
        match r.state.as_str() {
            "Complete" => return Ok(()),
            "Failed" | "RolledBack" => bail!("rollout of {workload} did not complete"),
            _ if no_wait => return Ok(()),
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            if let Some(bar) = &bar {
                bar.abandon();
            }
            bail!("rollout of {workload} still {} after {timeout:?}", r.state);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `[#####.....]`: `done` of `total` in `width` cells.
pub(crate) fn progress_bar(done: u32, total: u32, width: usize) -> String {
    let filled = if total == 0 {
        width
    } else {
        (done as usize * width) / total as usize
    };
    format!(
        "[{}{}]",
        "#".repeat(filled),
        ".".repeat(width - filled.min(width))
    )
}
