//! The manifest parser and validator (`parse_workloads`), which the hub runs on every apply
//! from any MQTT client and the CLI runs on local files. Must never panic; what it accepts
//! must be a valid workload: its stored JSON form reads back to the same workload and
//! revision, and its volumes stay inside their directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_api::workload::{parse_workloads, Workload};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(workloads) = parse_workloads(text) else {
        return;
    };
    for w in &workloads {
        let revision = w.revision();
        assert_eq!(revision.len(), 12, "{revision:?}");
        let stored = serde_json::to_vec(w).expect("a workload serializes");
        let back: Workload = serde_json::from_slice(&stored).expect("a stored workload reads back");
        assert_eq!(&back, w);
        assert_eq!(back.revision(), revision);
        for v in &w.volumes {
            assert!(v.check().is_ok(), "{v:?}");
            assert!(!v.path.split('/').any(|c| c == ".." || c == "."), "{v:?}");
        }
    }
});
