//! The manifest parser and validator (`parse_stream`, `validate_all`), which the hub runs on
//! every apply from any MQTT client and the CLI runs on local files. Must never panic; what
//! it accepts must be a valid workload: its stored JSON form reads back to the same workload
//! and revision, and its volumes and secret mounts stay inside their directory. An accepted
//! secret's keys are safe file names and its stored form reads back to the same values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_api::model::secret::{check_key, Secret};
use shoal_api::model::workload::{validate_all, Workload};
use shoal_api::wire::manifest::parse_stream;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(stream) = parse_stream(text) else {
        return;
    };
    for (_, s) in &stream.secrets {
        for k in s.data.keys() {
            assert!(check_key(k).is_ok(), "{k:?}");
        }
        let bytes = s.to_bytes().expect("a parsed secret encodes");
        let back = Secret::from_bytes(s.name.clone(), &bytes).expect("reads back");
        assert_eq!(&back, s);
    }
    let Ok(workloads) = validate_all(stream.workloads) else {
        return;
    };
    for w in &workloads {
        let revision = w.revision();
        assert_eq!(revision.len(), 12, "{revision:?}");
        let stored = serde_json::to_vec(w).expect("a workload serializes");
        let back: Workload = serde_json::from_slice(&stored).expect("a stored workload reads back");
        assert_eq!(&back, w);
        assert_eq!(back.revision(), revision);
        for m in &w.secrets {
            if let Some(p) = &m.path {
                assert!(!p.split('/').any(|c| c == ".." || c == "."), "{m:?}");
            }
        }
        for v in &w.volumes {
            assert!(v.check().is_ok(), "{v:?}");
            assert!(!v.path.split('/').any(|c| c == ".." || c == "."), "{v:?}");
        }
    }
});
