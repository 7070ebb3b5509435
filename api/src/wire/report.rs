//! What the hub believes of a device's report about itself ([`Hello`]).
//!
//! A device is trusted with nothing the operator did not give it. Its hello says what it is
//! (architecture, runtimes, capacity) and steers placement through capacity, so the hub
//! refuses a hello with values no real device has (an exabyte of memory attracts every
//! replica) or with strings that could forge lines in logs and tables (control characters,
//! unbounded lengths). Labels in a hello are requests (see [`crate::model::labels`]); they are
//! checked for syntax and number here. Pure.

use crate::model::labels::MAX_LABELS;
use crate::wire::messages::{Hello, RUNTIME_CONTAINER, RUNTIME_WASM, RUNTIME_WASM_PRECOMPILED};

/// Most memory a device may offer: 16 TiB.
pub const MAX_MEMORY: u64 = 16 << 40;
/// Most CPUs a device may report.
pub const MAX_CPUS: u32 = 1024;
/// Longest architecture, OS, variant or version string.
pub const MAX_WORD: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hello from device {device:?} is refused: {field} {value:?} {reason}")]
pub struct ReportError {
    pub device: String,
    pub field: &'static str,
    /// The value as reported, shortened; `Debug` escapes control characters.
    pub value: String,
    pub reason: String,
}

/// Checks a hello: capacity within bounds, known runtimes, plain short words, well-formed
/// labels.
pub fn check_hello(h: &Hello) -> Result<(), ReportError> {
    let bad = |field: &'static str, value: String, reason: String| ReportError {
        device: h.device_id.to_string(),
        field,
        value: value.chars().take(80).collect(),
        reason,
    };
    if h.memory > MAX_MEMORY {
        return Err(bad(
            "memory",
            h.memory.to_string(),
            format!("is more than {MAX_MEMORY} bytes (16Ti)"),
        ));
    }
    if h.cpus > MAX_CPUS {
        return Err(bad(
            "cpus",
            h.cpus.to_string(),
            format!("is more than {MAX_CPUS}"),
        ));
    }
    if let Some(n) = h
        .max_replicas
        .filter(|&n| n > crate::model::workload::MAX_REPLICAS)
    {
        return Err(bad(
            "maxReplicas",
            n.to_string(),
            format!("is more than {}", crate::model::workload::MAX_REPLICAS),
        ));
    }
    let words = [
        ("arch", h.arch.as_str(), false),
        ("os", h.os.as_str(), false),
        ("variant", h.variant.as_deref().unwrap_or(""), false),
        ("agentVersion", h.agent_version.as_str(), true),
    ];
    for (field, v, spaces) in words {
        if v.len() > MAX_WORD {
            return Err(bad(
                field,
                v.to_string(),
                format!("is longer than {MAX_WORD} bytes"),
            ));
        }
        let plain = |c: char| {
            c.is_ascii_alphanumeric() || "._+-~:".contains(c) || (spaces && " ()/".contains(c))
        };
        if !v.chars().all(plain) {
            return Err(bad(
                field,
                v.to_string(),
                "may hold only letters, digits and . _ + - ~ :".into(),
            ));
        }
    }
    if h.runtimes.len() > 8 {
        return Err(bad(
            "runtimes",
            h.runtimes.join(","),
            "are more than 8".into(),
        ));
    }
    for r in &h.runtimes {
        if ![RUNTIME_WASM, RUNTIME_WASM_PRECOMPILED, RUNTIME_CONTAINER].contains(&r.as_str()) {
            return Err(bad(
                "runtime",
                r.clone(),
                "is unknown: expected wasm, wasm-precompiled or container".into(),
            ));
        }
    }
    if let Err(reason) = crate::model::hardware::check_counts(&h.devices) {
        let value: Vec<String> = h.devices.iter().map(|(k, v)| format!("{k}={v}")).collect();
        return Err(bad("devices", value.join(","), reason));
    }
    if h.labels.len() > MAX_LABELS {
        return Err(bad(
            "labels",
            format!("{} labels", h.labels.len()),
            format!("are more than {MAX_LABELS}"),
        ));
    }
    for (k, v) in &h.labels {
        let syntax = crate::model::ids::check_label_key(k)
            .and_then(|()| crate::model::ids::check_label_value(v));
        if let Err(e) = syntax {
            return Err(bad(
                "label",
                format!("{k}={v}"),
                format!("is invalid ({e})"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        serde_json::from_value(serde_json::json!({
            "deviceId": "d1", "arch": "aarch64", "os": "linux", "variant": "v8",
            "runtimes": ["wasm", "container"], "cpus": 4, "memory": 1u64 << 30,
            "labels": { "zone": "a" }, "agentVersion": "0.1.0 (abc123)", "maxReplicas": 10
        }))
        .unwrap()
    }

    #[test]
    fn real_devices_pass_and_absurd_or_forged_reports_are_refused() {
        assert_eq!(check_hello(&hello()), Ok(()));
        type Change = fn(&mut Hello);
        let cases: Vec<(Change, &str)> = vec![
            (
                |h| h.memory = 1 << 60,
                "memory \"1152921504606846976\" is more than",
            ),
            (|h| h.memory = MAX_MEMORY, ""),
            (|h| h.cpus = 1_000_000, "cpus \"1000000\""),
            (|h| h.max_replicas = Some(u32::MAX), "maxReplicas"),
            (
                |h| h.arch = "x86_64\n2026-12-07 INFO forged".into(),
                "arch \"x86_64\\n2026",
            ),
            (|h| h.arch = "a".repeat(65), "longer than 64"),
            (
                |h| h.agent_version = "0.1\u{1b}[31m".into(),
                "agentVersion \"0.1\\u{1b}[31m\"",
            ),
            (
                |h| h.runtimes = vec!["docker".into()],
                "runtime \"docker\" is unknown",
            ),
            (
                |h| {
                    h.labels.insert("bad key".into(), "x".into());
                },
                "label \"bad key=x\"",
            ),
            (
                |h| h.labels = (0..65).map(|i| (format!("k{i}"), String::new())).collect(),
                "labels \"65 labels\" are more than 64",
            ),
            (
                |h| {
                    h.devices.insert("serial".into(), 2);
                },
                "",
            ),
            (
                |h| {
                    h.devices.insert("serial".into(), 1_000_000);
                },
                "devices \"serial=1000000\" 1000000 serial devices are more than 64",
            ),
            (
                |h| {
                    h.devices.insert("se\nrial".into(), 1);
                },
                "devices \"se\\nrial=1\"",
            ),
        ];
        for (change, want) in cases {
            let mut h = hello();
            change(&mut h);
            match (check_hello(&h), want) {
                (Ok(()), "") => {}
                (Err(e), w) if !w.is_empty() => {
                    let e = e.to_string();
                    assert!(e.contains(w) && e.contains("\"d1\""), "{e} lacks {w}");
                }
                (got, w) => panic!("{got:?}, wanted {w:?}"),
            }
        }
    }
}
