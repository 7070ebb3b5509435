//! `oci://` references and image platforms (from manifests and image indexes) and the choice
//! of an index entry. Must never panic; a parsed reference prints as something that parses
//! back to it, and the chosen entry is one of the device's architecture.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_api::model::oci::{choose_platform, oci_arch, OciRef, Platform};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = text.parse::<OciRef>() {
        let printed = r.to_string();
        let back: OciRef = printed.parse().expect("a printed reference parses");
        assert_eq!(back, r, "{printed}");
    }
    // Lines as platforms, the first word as the device (`arch[/variant]`).
    let mut lines = text.lines();
    let device = lines.next().unwrap_or_default();
    let (arch, variant) = match device.split_once('/') {
        Some((a, v)) => (a, Some(v)),
        None => (device, None),
    };
    let platforms: Vec<Platform> = lines.filter_map(|l| l.parse().ok()).collect();
    if let Some(i) = choose_platform(&platforms, arch, variant) {
        assert_eq!(platforms[i].architecture, oci_arch(arch));
        assert_eq!(platforms[i].os, "linux");
    }
});
