//! Quantities written the Kubernetes way: memory (`16Mi`, `1G`, `512Ki`, plain bytes), CPU
//! (`100m`, `0.5`, `2`) and durations (`500ms`, `3s`, `2m`, `1h`).
//!
//! Parsed by hand: the grammar is a few suffixes, and no maintained crate speaks exactly the
//! Kubernetes quantity and Shoal duration forms without pulling in a large dependency.

use std::time::Duration;

/// Why a quantity was refused. Messages quote the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {value:?} is invalid: {reason}")]
pub struct QuantityError {
    pub kind: &'static str,
    pub value: String,
    pub reason: &'static str,
}

fn err(kind: &'static str, value: &str, reason: &'static str) -> QuantityError {
    QuantityError {
        kind,
        value: value.to_string(),
        reason,
    }
}

const MEMORY_HINT: &str =
    "expected a number of bytes with an optional suffix Ki, Mi, Gi, k, M or G (e.g. 16Mi)";

/// Parses a memory quantity into bytes.
pub fn parse_memory(s: &str) -> Result<u64, QuantityError> {
    let t = s.trim();
    let (num, mult): (&str, u64) = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ]
    .iter()
    .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n, *m)))
    .unwrap_or((t, 1));
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("memory", s, MEMORY_HINT));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| err("memory", s, "number too large"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| err("memory", s, "number too large"))?;
    if bytes == 0 {
        return Err(err("memory", s, "must be greater than zero"));
    }
    Ok(bytes)
}

/// Formats bytes the way a person writes them (`16Mi`, `1536Ki`, `100`).
pub fn format_memory(bytes: u64) -> String {
    for (suf, m) in [("Gi", 1u64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if bytes >= m && bytes.is_multiple_of(m) {
            return format!("{}{suf}", bytes / m);
        }
    }
    bytes.to_string()
}

/// Memory for tables: exact quantities as written in manifests (`16Mi`), others rounded to
/// one decimal (`23.5Gi`, `1.2Mi`).
pub fn format_memory_rounded(bytes: u64) -> String {
    let exact = format_memory(bytes);
    if exact.len() <= 6 {
        return exact;
    }
    for (suf, m) in [
        ("Gi", (1u64 << 30) as f64),
        ("Mi", (1u64 << 20) as f64),
        ("Ki", 1024.0),
    ] {
        if bytes as f64 >= m {
            return format!("{:.1}{suf}", bytes as f64 / m);
        }
    }
    exact
}

/// An age the way kubectl prints it: `42s`, `17m`, `5h`.
pub fn format_age(elapsed_ms: u64) -> String {
    let s = elapsed_ms / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// A duration in the largest unit [`parse_duration`] reads back exactly: `2m`, `90s`, `500ms`.
pub fn format_duration_ms(ms: u64) -> String {
    for (unit, m) in [("h", 3_600_000u64), ("m", 60_000), ("s", 1000)] {
        if ms >= m && ms.is_multiple_of(m) {
            return format!("{}{unit}", ms / m);
        }
    }
    format!("{ms}ms")
}

/// Parses a CPU quantity into millicores (`100m` → 100, `0.5` → 500, `2` → 2000).
pub fn parse_cpu(s: &str) -> Result<u32, QuantityError> {
    const HINT: &str = "expected millicores like 100m or cores like 0.5 or 2";
    let t = s.trim();
    let millis: f64 = if let Some(m) = t.strip_suffix('m') {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("cpu", s, HINT));
        }
        m.parse::<f64>().map_err(|_| err("cpu", s, HINT))?
    } else {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(err("cpu", s, HINT));
        }
        t.parse::<f64>().map_err(|_| err("cpu", s, HINT))? * 1000.0
    };
    if millis < 1.0 {
        return Err(err("cpu", s, "must be at least 1m"));
    }
    if millis > 1_000_000.0 {
        return Err(err("cpu", s, "must be at most 1000 cores"));
    }
    Ok(millis.round() as u32)
}

/// Parses a duration: an integer followed by `ms`, `s`, `m` or `h`.
pub fn parse_duration(s: &str) -> Result<Duration, QuantityError> {
    const HINT: &str = "expected an integer with a unit ms, s, m or h (e.g. 500ms, 3s, 2m)";
    let t = s.trim();
    let (num, unit_ms): (&str, u64) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        return Err(err("duration", s, HINT));
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("duration", s, HINT));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| err("duration", s, "number too large"))?;
    let ms = n
        .checked_mul(unit_ms)
        .ok_or_else(|| err("duration", s, "number too large"))?;
    Ok(Duration::from_millis(ms))
}

/// [`parse_duration`] for command-line parsers (clap's `value_parser` wants a `String`
/// error).
pub fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_table() {
        for (s, want) in [
            ("16Mi", 16 << 20),
            ("1Gi", 1 << 30),
            ("512Ki", 512 << 10),
            ("100", 100),
            ("2M", 2_000_000),
            ("3k", 3000),
        ] {
            assert_eq!(parse_memory(s), Ok(want), "{s}");
        }
        for s in [
            "",
            "Mi",
            "1.5Mi",
            "16MB",
            "-1",
            "0",
            "99999999999999999999Gi",
        ] {
            assert!(parse_memory(s).is_err(), "{s}");
        }
        assert_eq!(format_memory(16 << 20), "16Mi");
        assert_eq!(format_memory(1536 << 10), "1536Ki");
        assert_eq!(format_memory(100), "100");
    }

    #[test]
    fn cpu_table() {
        for (s, want) in [("100m", 100), ("0.5", 500), ("2", 2000), ("1m", 1)] {
            assert_eq!(parse_cpu(s), Ok(want), "{s}");
        }
        for s in ["", "m", "0", "0.0001", "abc", "-1", "1.5m"] {
            assert!(parse_cpu(s).is_err(), "{s}");
        }
    }

    #[test]
    fn duration_table() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(format_duration_ms(90_000), "90s");
        assert_eq!(format_duration_ms(120_000), "2m");
        assert_eq!(format_duration_ms(1500), "1500ms");
        for s in ["", "3", "s", "1.5s", "-1s", "3d"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }

    proptest::proptest! {
        #[test]
        fn memory_roundtrip(n in 1u64..(1 << 40)) {
            proptest::prop_assert_eq!(parse_memory(&format_memory(n)), Ok(n));
        }

        #[test]
        fn duration_roundtrip(ms in 0u64..(1 << 40)) {
            let text = format_duration_ms(ms);
            proptest::prop_assert_eq!(parse_duration(&text), Ok(Duration::from_millis(ms)));
        }
    }
}
