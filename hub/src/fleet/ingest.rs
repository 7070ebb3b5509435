//! Status ingest spread over hub replicas. Pure: no I/O.
//!
//! Replicas on one store and one external broker subscribe to device statuses through the
//! MQTT 5 shared subscription [`shoal_api::wire::topics::SHARED_STATUS`]: the broker hands each
//! report to one replica, so decoding and checking them is spread over all of them. Yet the
//! leader decides on every device, and every standby must be ready to: so the replica that
//! took a report passes on what the others need, batched, on its own
//! [`shoal_api::wire::topics::hub_ingest`] topic (which only the hub identity may publish to):
//!
//! - a status whose content changed, whole;
//! - a status that repeats known content (the 10 s heartbeat, nearly all of the traffic)
//!   as a [`Heard`]: device, time, fingerprint, a few dozen bytes;
//! - the devices that enrolled through this replica (their secrets must be sealed to their
//!   new keys, which only the leader publishes).
//!
//! Reports of one device can reach different replicas, so batches can bring them out of
//! order: [`crate::core::HubCore::accept_status`] keeps the newest by the device's clock, and
//! a replica that receives a status older than its own, with other content, passes its own
//! on again (another replica may have taken the older one as current).

use sha2::{Digest, Sha256};
use shoal_api::model::ids::DeviceId;
use shoal_api::wire::messages::{DeviceStatus, Heard, IngestBatch};
use std::collections::BTreeMap;

/// Whole statuses per batch: a status lists every replica on its device, so batches stay
/// well under the broker's payload limit even for full devices.
const STATUSES_PER_BATCH: usize = 64;
/// Heard entries per batch (each well under 100 bytes).
const HEARD_PER_BATCH: usize = 4096;
/// Most enrolled devices one batch names (each makes the leader read the enrollment book; a
/// batch naming more is refused as not a replica's).
pub const ENROLLED_PER_BATCH: usize = 256;

/// A fingerprint of a status's content (its generation and replicas, not its time): equal
/// content, equal fingerprint, on every replica whatever its build (SHA-256, not `Hash`).
pub fn fingerprint(s: &DeviceStatus) -> String {
    let mut h = Sha256::new();
    // Serializing these plain types cannot fail; an empty input would only weaken the
    // comparison to "always different", which costs a whole status, not correctness.
    h.update(serde_json::to_vec(&(s.observed_generation, &s.workloads)).unwrap_or_default());
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What this replica has to pass on since its last batch: the newest per device.
#[derive(Debug, Default)]
pub struct Relay {
    statuses: BTreeMap<DeviceId, DeviceStatus>,
    heard: BTreeMap<DeviceId, Heard>,
    enrolled: std::collections::BTreeSet<DeviceId>,
}

impl Relay {
    /// A status to pass on whole.
    pub fn changed(&mut self, s: DeviceStatus) {
        self.heard.remove(&s.device_id);
        match self.statuses.get(&s.device_id) {
            Some(have) if have.time_ms > s.time_ms => {}
            _ => {
                self.statuses.insert(s.device_id.clone(), s);
            }
        }
    }

    /// A repeated status: only that the device is alive, and how recently.
    pub fn heard(&mut self, h: Heard) {
        if let Some(s) = self.statuses.get_mut(&h.device_id) {
            // The whole status goes anyway; when it is the same content, it goes as new.
            if h.fingerprint == fingerprint(s) && h.time_ms > s.time_ms {
                s.time_ms = h.time_ms;
            }
            return;
        }
        match self.heard.get(&h.device_id) {
            Some(have) if have.time_ms > h.time_ms => {}
            _ => {
                self.heard.insert(h.device_id.clone(), h);
            }
        }
    }

    /// A device enrolled through this replica.
    pub fn enrolled(&mut self, device: DeviceId) {
        self.enrolled.insert(device);
    }

    pub fn is_empty(&self) -> bool {
        self.statuses.is_empty() && self.heard.is_empty() && self.enrolled.is_empty()
    }

    /// Everything gathered, as batches of bounded size; the relay is empty afterwards.
    pub fn take(&mut self) -> Vec<IngestBatch> {
        let mut statuses = std::mem::take(&mut self.statuses).into_values().peekable();
        let mut heard = std::mem::take(&mut self.heard).into_values().peekable();
        let mut enrolled = std::mem::take(&mut self.enrolled).into_iter().peekable();
        let mut out = Vec::new();
        while statuses.peek().is_some() || heard.peek().is_some() || enrolled.peek().is_some() {
            out.push(IngestBatch {
                protocol: shoal_api::PROTOCOL_VERSION,
                statuses: statuses.by_ref().take(STATUSES_PER_BATCH).collect(),
                heard: heard.by_ref().take(HEARD_PER_BATCH).collect(),
                enrolled: enrolled.by_ref().take(ENROLLED_PER_BATCH).collect(),
            });
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use shoal_api::wire::messages::{InstanceStatus, Phase};

    /// A status of device `d` with one replica of `web` in `phase` (also used by `core`'s tests).
    pub(crate) fn status(d: &str, generation: u64, phase: Phase, time_ms: u64) -> DeviceStatus {
        DeviceStatus {
            protocol: 1,
            device_id: DeviceId::try_from(d).unwrap(),
            observed_generation: generation,
            workloads: vec![InstanceStatus {
                schedule: None,
                name: "web".try_into().unwrap(),
                replica: 0,
                revision: "r1".into(),
                phase,
                restarts: 0,
                reason: None,
                exit_code: None,
                started_at_ms: Some(5),
                backoff_ms: None,
                variant: "wasm".into(),
                healthy: None,
                devices: Vec::new(),
                run: None,
                finished_at_ms: None,
            }],
            time_ms,
        }
    }

    pub(super) fn heard(s: &DeviceStatus) -> Heard {
        Heard {
            device_id: s.device_id.clone(),
            time_ms: s.time_ms,
            fingerprint: fingerprint(s),
        }
    }

    #[test]
    fn fingerprints_follow_content_not_time() {
        let a = status("d1", 3, Phase::Running, 10);
        assert_eq!(
            fingerprint(&a),
            fingerprint(&status("d1", 3, Phase::Running, 99))
        );
        assert_ne!(
            fingerprint(&a),
            fingerprint(&status("d1", 4, Phase::Running, 10))
        );
        assert_ne!(
            fingerprint(&a),
            fingerprint(&status("d1", 3, Phase::Failed, 10))
        );
        assert_eq!(fingerprint(&a).len(), 16);
    }

    #[test]
    fn newest_per_device_and_a_whole_status_covers_its_heartbeat() {
        let mut r = Relay::default();
        assert!(r.is_empty() && r.take().is_empty());
        let old = status("d1", 1, Phase::Running, 10);
        let new = status("d1", 2, Phase::Running, 20);
        r.changed(new.clone());
        r.changed(old.clone()); // late: the newer stays
        r.heard(heard(&status("d1", 2, Phase::Running, 30))); // same content, newer
        r.heard(heard(&status("d2", 1, Phase::Running, 7)));
        r.heard(heard(&status("d2", 1, Phase::Running, 5))); // older heartbeat
        let batches = r.take();
        assert!(r.is_empty());
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        assert_eq!(b.statuses.len(), 1);
        assert_eq!(b.statuses[0].observed_generation, 2);
        assert_eq!(b.statuses[0].time_ms, 30);
        assert_eq!(b.heard.len(), 1);
        assert_eq!(
            (b.heard[0].device_id.as_str(), b.heard[0].time_ms),
            ("d2", 7)
        );
        // A changed status replaces a pending heartbeat of its device.
        r.heard(heard(&status("d3", 1, Phase::Running, 1)));
        r.changed(status("d3", 2, Phase::Running, 2));
        let b = r.take();
        assert_eq!((b[0].statuses.len(), b[0].heard.len()), (1, 0));
        // Enrollments go on their own too, each device once.
        r.enrolled(DeviceId::try_from("d4").unwrap());
        r.enrolled(DeviceId::try_from("d4").unwrap());
        assert!(!r.is_empty());
        let b = r.take();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].enrolled, vec![DeviceId::try_from("d4").unwrap()]);
        assert!(r.is_empty());
    }

    #[test]
    fn batches_are_bounded() {
        let mut r = Relay::default();
        for i in 0..(STATUSES_PER_BATCH * 2 + 1) {
            r.changed(status(&format!("s{i}"), 1, Phase::Running, 1));
        }
        for i in 0..(HEARD_PER_BATCH + 1) {
            r.heard(heard(&status(&format!("h{i}"), 1, Phase::Running, 1)));
        }
        let b = r.take();
        assert_eq!(b.len(), 3);
        assert!(b
            .iter()
            .all(|b| b.statuses.len() <= STATUSES_PER_BATCH && b.heard.len() <= HEARD_PER_BATCH));
        assert_eq!(
            b.iter().map(|b| b.statuses.len()).sum::<usize>(),
            STATUSES_PER_BATCH * 2 + 1
        );
        assert_eq!(
            b.iter().map(|b| b.heard.len()).sum::<usize>(),
            HEARD_PER_BATCH + 1
        );
    }
}
