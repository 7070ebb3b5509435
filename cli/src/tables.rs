//! What the CLI prints: tables sized to the terminal (`-o wide` for every column), or JSON
//! and YAML for scripts.

use super::*;

/// Prints `value` as JSON or YAML, or with `table` (told whether the view is wide).
pub(crate) fn emit<T: serde::Serialize + ?Sized>(
    value: &T,
    output: Output,
    table: impl FnOnce(bool) -> Table,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(value)?),
        Output::Table => {
            let mut t = table(false);
            if let Some((terminal_size::Width(w), _)) = terminal_size::terminal_size() {
                t.fit(usize::from(w));
            }
            print!("{t}");
        }
        Output::Wide => print!("{}", table(true)),
    }
    Ok(())
}

pub(crate) fn events_table(events: &[EventView], wide: bool, header: bool) -> Table {
    let mut t = Table::new(&[
        "SEQ",
        "LAST SEEN",
        "TIME",
        "TYPE",
        "REASON",
        "OBJECT",
        "MESSAGE",
    ]);
    if !header {
        t.no_header();
    }
    for e in events {
        t.row(vec![
            e.seq.to_string(),
            ago(e.time_ms),
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(e.time_ms),
            )
            .to_string(),
            e.kind.clone(),
            e.reason.clone(),
            e.object.clone(),
            e.message.clone(),
        ]);
    }
    if !wide {
        t.hide(&["SEQ", "TIME"]);
    }
    t
}

pub(crate) fn ago(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    shoal_api::model::quantity::format_age(now.saturating_sub(ms))
}

pub(crate) fn print_devices(devices: &[DeviceView], output: Output) -> anyhow::Result<()> {
    emit(devices, output, |wide| devices_table(devices, wide))
}

/// `Online`, `Offline`, `Lost`, `Enrolled` (never connected) or `Revoked`, and `Cordoned`.
pub(crate) fn device_status(d: &DeviceView) -> String {
    let state = match (d.online, d.lost) {
        _ if d.revoked => "Revoked",
        (true, _) => "Online",
        (false, true) => "Lost",
        // Enrolled, never connected.
        (false, false) if d.last_seen_ms == 0 => "Enrolled",
        (false, false) => "Offline",
    };
    if d.cordoned {
        format!("{state},Cordoned")
    } else {
        state.to_string()
    }
}

/// `serial=1/2,camera=0/1`: asked for by the replicas placed on `d` / offered, per class.
pub(crate) fn hardware_use(d: &DeviceView) -> String {
    if d.hardware.is_empty() {
        return "-".into();
    }
    let items: Vec<String> = d
        .hardware
        .iter()
        .map(|(c, n)| {
            let used = d.hardware_allocated.get(c).copied().unwrap_or(0);
            format!("{c}={used}/{n}")
        })
        .collect();
    items.join(",")
}

pub(crate) fn devices_table(devices: &[DeviceView], wide: bool) -> Table {
    let mut t = Table::new(&[
        "NAME",
        "STATUS",
        "ARCH",
        "RUNTIMES",
        "CPUS",
        "MEMORY",
        "ALLOCATED",
        "REPLICAS",
        "HARDWARE",
        "GENERATION",
        "LAST SEEN",
        "MDNS",
        "LABELS",
        "NOT GRANTED",
    ]);
    let list = |l: &std::collections::BTreeMap<String, String>| -> String {
        let items: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if items.is_empty() {
            "<none>".into()
        } else {
            items.join(",")
        }
    };
    for d in devices {
        t.row(vec![
            d.id.clone(),
            device_status(d),
            d.arch.clone(),
            d.runtimes.join(","),
            d.cpus.to_string(),
            format_memory_rounded(d.memory),
            format_memory_rounded(d.memory_allocated),
            d.replicas.to_string(),
            hardware_use(d),
            format!("{}/{}", d.observed_generation, d.desired_generation),
            ago(d.last_seen_ms),
            if d.mdns_addresses.is_empty() {
                "-".into()
            } else {
                d.mdns_addresses.join(",")
            },
            list(&d.labels),
            // What the device asked for (its own --labels) and was not given.
            list(&d.requested_labels),
        ]);
    }
    if !wide {
        t.hide(&["RUNTIMES", "HARDWARE", "GENERATION", "MDNS", "NOT GRANTED"]);
    }
    t
}

pub(crate) fn audit_table(entries: &[AuditEntry], wide: bool) -> Table {
    let mut t = Table::new(&["SEQ", "AGE", "WHO", "FROM", "ACTION", "OUTCOME"]);
    for e in entries {
        t.row(vec![
            e.seq.to_string(),
            ago(e.time_ms),
            e.who.clone(),
            e.from.clone(),
            e.action.clone(),
            e.outcome.clone(),
        ]);
    }
    if !wide {
        t.hide(&["FROM"]);
    }
    t
}

pub(crate) fn print_secrets(secrets: &[SecretView], output: Output) -> anyhow::Result<()> {
    emit(secrets, output, |_| secrets_table(secrets))
}

pub(crate) fn secrets_table(secrets: &[SecretView]) -> Table {
    let mut t = Table::new(&["NAME", "KEYS", "VERSION", "USED BY", "BEHIND"]);
    for s in secrets {
        let list = |l: &[String]| {
            if l.is_empty() {
                "-".into()
            } else {
                l.join(",")
            }
        };
        t.row(vec![
            s.name.clone(),
            s.keys.join(","),
            s.version.clone(),
            list(&s.used_by),
            list(&s.behind),
        ]);
    }
    t
}

pub(crate) fn print_workloads(workloads: &[WorkloadView], output: Output) -> anyhow::Result<()> {
    emit(workloads, output, |wide| workloads_table(workloads, wide))
}

pub(crate) fn workloads_table(workloads: &[WorkloadView], wide: bool) -> Table {
    let mut t = Table::new(&[
        "NAME",
        "READY",
        "PLACEMENT",
        "REVISION",
        "PHASES",
        "DEVICES",
    ]);
    for w in workloads {
        let mut phases: std::collections::BTreeMap<String, usize> = Default::default();
        for r in &w.replicas {
            *phases.entry(r.phase.to_string()).or_default() += 1;
        }
        let phases: Vec<String> = phases.iter().map(|(p, n)| format!("{p}:{n}")).collect();
        let mut devices: Vec<String> = w.replicas.iter().filter_map(|r| r.device.clone()).collect();
        devices.dedup();
        t.row(vec![
            w.name.clone(),
            format!("{}/{}", w.ready, w.desired),
            w.placement.clone(),
            if wide {
                w.revision.clone()
            } else {
                w.revision.chars().take(12).collect()
            },
            if phases.is_empty() {
                "-".into()
            } else {
                phases.join(",")
            },
            if devices.is_empty() {
                "-".into()
            } else {
                devices.join(",")
            },
        ]);
    }
    t
}

pub(crate) fn describe(w: &WorkloadView, output: Output) -> anyhow::Result<()> {
    if matches!(output, Output::Json | Output::Yaml) {
        return emit(w, output, |_| Table::new(&[]));
    }
    println!("Name:       {}", w.name);
    println!("Revision:   {}", w.revision);
    println!(
        "Placement:  {} ({} ready / {} desired)",
        w.placement, w.ready, w.desired
    );
    if let Some(spec) = &w.spec {
        if let Some(module) = &spec.module {
            let module = match module {
                ModuleRef::Digest(d) => d.to_string(),
                ModuleRef::Path(p) => p.clone(),
                ModuleRef::Oci(r) => r.to_string(),
            };
            println!("Module:     {module}");
        }
        if let Some(c) = &spec.container {
            let platforms: Vec<String> = c.platforms.iter().map(|p| p.to_string()).collect();
            println!("Image:      {} ({})", c.image, platforms.join(", "));
        }
        println!(
            "Selector:   {}",
            if spec.selector.is_empty() {
                "<none>".to_string()
            } else {
                spec.selector.to_string()
            }
        );
        if let Some(key) = &spec.spread {
            println!("Spread:     by label {key}");
        }
        println!(
            "Resources:  {}",
            shoal_api::model::workload::describe_resources(&spec.resources)
        );
        if !spec.devices.is_empty() {
            let d: Vec<String> = spec
                .devices
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect();
            println!("Hardware:   {}", d.join(", "));
        }
        if !spec.volumes.is_empty() {
            let v: Vec<String> = spec
                .volumes
                .iter()
                .map(|v| format!("{} at {}", v.name, v.path))
                .collect();
            println!("Volumes:    {}", v.join(", "));
        }
        println!(
            "Restart:    {:?} (back-off {}ms .. {}ms)",
            spec.restart.policy, spec.restart.initial_backoff_ms, spec.restart.max_backoff_ms
        );
        if !spec.args.is_empty() {
            println!("Args:       {:?}", spec.args);
        }
        for (k, v) in &spec.env {
            println!("Env:        {k}={v}");
        }
    }
    if let Some(p) = &w.pending_reason {
        println!("Pending:    {}", escaped(p));
    }
    if let Some(j) = &w.job {
        describe_job(j);
    }
    println!("Replicas:");
    let mut t = Table::new(&[
        "REPLICA", "DEVICE", "VARIANT", "PHASE", "RESTARTS", "STARTED", "HOLDS", "REASON",
    ]);
    for r in &w.replicas {
        t.row(vec![
            r.replica.to_string(),
            r.device.clone().unwrap_or_else(|| "<none>".into()),
            if r.variant.is_empty() {
                "-".into()
            } else {
                r.variant.clone()
            },
            r.phase.to_string(),
            r.restarts.to_string(),
            r.started_at_ms.map_or("-".into(), ago),
            if r.devices.is_empty() {
                "-".into()
            } else {
                r.devices.join(",")
            },
            r.reason.clone().unwrap_or_default(),
        ]);
    }
    if w.replicas.iter().all(|r| r.devices.is_empty()) {
        t.hide(&["HOLDS"]);
    }
    print!("{t}");
    describe_schedules(w);
    Ok(())
}
