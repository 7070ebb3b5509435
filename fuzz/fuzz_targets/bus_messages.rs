//! Every payload the hub and the agents decode from the bus (`hello`, `status`, `desired`,
//! apply results) and the topic classifier. Must never panic; a decoded desired state
//! encodes and decodes to itself (the agent persists it and compares generations).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_api::wire::messages::{ApplyResult, DesiredState, DeviceStatus, Hello};

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = serde_json::from_slice::<DesiredState>(data) {
        let again = serde_json::to_vec(&d).expect("a desired state serializes");
        let back: DesiredState = serde_json::from_slice(&again).expect("and reads back");
        assert_eq!(back, d);
        for w in &d.workloads {
            let _ = w.instance();
            for v in &w.volumes {
                // The agent checks each volume before it becomes a path; the check must
                // never pass one that leaves its directory.
                if v.check().is_ok() {
                    assert!(!v.name.contains('/') && !v.name.starts_with('.'), "{v:?}");
                }
            }
        }
    }
    let _ = serde_json::from_slice::<DeviceStatus>(data);
    let _ = serde_json::from_slice::<Hello>(data);
    let _ = serde_json::from_slice::<ApplyResult>(data);
    if let Ok(topic) = std::str::from_utf8(data) {
        let _ = shoal_api::wire::topics::classify(topic);
    }
});
