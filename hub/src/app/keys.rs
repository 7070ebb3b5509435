//! The device keys secrets are sealed to, and the desired states that wait for one.
//!
//! A device's key is in its enrollment record, in the enrollment book (a file, or an etcd
//! round trip away). The loop never waits for the book: a desired state that carries
//! secrets for a device whose key is not at hand is parked here, the key is read off the
//! loop ([`super::book`]), and the state is sealed and sent when the answer arrives. Keys
//! read are kept for [`FRESH_MS`], so a rollout over devices that use secrets reads each
//! key once, not once per step.
//!
//! The book is the truth; this is a cache of it, and it is forgotten
//! ([`DeviceKeys::forget`]) where a key can change: a device that enrolls again (through
//! this replica or another) gets a new key; a new leader starts with an empty cache. A
//! renewal keeps the key (see `http::enroll`). A change the leader is not told of (an
//! enrollment through a standby without shared ingest, an edit of the book by hand) is read
//! for the device's first state [`FRESH_MS`] or more after its key was. A device's hello does not forget its key: hellos are retained, so
//! every reconnect of the hub's bus would read the whole fleet's keys again, and a device
//! could keep the reads busy by reconnecting.
//!
//! A read the book could not answer (etcd unreachable) is tried again after [`RETRY_MS`];
//! the state waits meanwhile, sent neither without its secrets nor to a guessed key.
//!
//! A parked state keeps the stored (encrypted) secrets it was committed with: it is sealed
//! with those, not with whatever the fleet holds when the key arrives (a later change may
//! not be durable yet).
//!
//! Decisions only: no I/O and no clock (`now` is a parameter), tested below with tables.

use crate::fleet::records::StoredSecret;
use shoal_api::model::ids::DeviceId;
use shoal_api::wire::messages::DesiredState;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

/// How long a key read from the book is used without reading it again.
pub(super) const FRESH_MS: u64 = 60_000;
/// Reads of the book in flight at once (a new leader may need every device's key).
pub(super) const MAX_READS: usize = 16;
/// How long after a failed read its device is read again.
pub(super) const RETRY_MS: u64 = 2_000;

/// Keys at hand, states waiting for theirs, and the reads that will bring them.
#[derive(Debug, Default)]
pub(super) struct DeviceKeys {
    /// Certificates read from the book, and when.
    known: HashMap<DeviceId, (Arc<str>, u64)>,
    /// The newest desired state of each device that waits for its key.
    parked: BTreeMap<DeviceId, Sealable>,
    /// Reads in flight; `false` once the answer is known to be stale (the device enrolled
    /// again after the read began): it is read again.
    reading: BTreeMap<DeviceId, bool>,
    /// Devices whose key is to be read, in order, once a read slot is free.
    queue: VecDeque<DeviceId>,
    queued: BTreeSet<DeviceId>,
    /// Devices whose last read failed, and when they may be read again.
    retry_at: BTreeMap<DeviceId, u64>,
}

/// Why there is no device key to seal secrets to.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NoDeviceKey {
    #[error("the hub runs --insecure: devices hold no keys to seal secrets to")]
    Insecure,
    #[error("the device has no enrollment record")]
    NotEnrolled,
    #[error("cannot read the enrollment record: {0}")]
    Unreadable(String),
    #[error("the device is revoked")]
    Revoked,
}

/// A durable desired state and the stored secrets it was committed with, to seal with them.
#[derive(Debug, Clone)]
pub(super) struct Sealable {
    pub(super) state: DesiredState,
    pub(super) secrets: Vec<StoredSecret>,
}

/// What to do with a desired state now.
#[derive(Debug)]
pub(super) enum Route {
    /// It carries no secret: send it as it is.
    Send(DesiredState),
    /// Seal its secrets to this certificate's key, then send it.
    Seal(Sealable, Arc<str>),
    /// It waits for its device's key (see [`DeviceKeys::reads`]).
    Parked,
}

/// Whether a key read at `at` may still be used at `now` (a clock that went back makes it
/// stale, never fresher).
fn fresh(at: u64, now: u64) -> bool {
    at <= now && now - at < FRESH_MS
}

/// Whether `state` carries secrets to seal.
fn wants_secrets(state: &DesiredState) -> bool {
    state.workloads.iter().any(|w| !w.secrets.is_empty())
}

impl DeviceKeys {
    /// Routes a desired state that is durable and due to be sent. It supersedes any older
    /// one of its device still parked (an older state is never sent after a newer one).
    pub(super) fn route(&mut self, s: Sealable, now: u64) -> Route {
        let device = s.state.device_id.clone();
        self.parked.remove(&device);
        if !wants_secrets(&s.state) {
            return Route::Send(s.state);
        }
        match self.known.get(&device) {
            Some((cert, at)) if fresh(*at, now) => {
                return Route::Seal(s, cert.clone());
            }
            Some(_) => {
                self.known.remove(&device);
            }
            None => {}
        }
        if !self.reading.contains_key(&device) && self.queued.insert(device.clone()) {
            self.queue.push_back(device.clone());
        }
        self.parked.insert(device, s);
        Route::Parked
    }

    /// Devices whose key to read now, each answered by [`DeviceKeys::answer`]: at most
    /// [`MAX_READS`] in flight, only for states still parked, and not before a failed
    /// read's [`RETRY_MS`] have passed (called again on the loop's tick).
    pub(super) fn reads(&mut self, now: u64) -> Vec<DeviceId> {
        let due: Vec<DeviceId> = self
            .retry_at
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(d, _)| d.clone())
            .collect();
        for device in due {
            self.retry_at.remove(&device);
            if self.parked.contains_key(&device) && self.queued.insert(device.clone()) {
                self.queue.push_back(device);
            }
        }
        let mut start = Vec::new();
        while self.reading.len() < MAX_READS {
            let Some(device) = self.queue.pop_front() else {
                break;
            };
            self.queued.remove(&device);
            if self.parked.contains_key(&device)
                && !self.reading.contains_key(&device)
                && !self.retry_at.contains_key(&device)
            {
                self.reading.insert(device.clone(), true);
                start.push(device);
            }
        }
        start
    }

    /// The book's answer for `device`'s certificate (`None`: it is not enrolled). Returns
    /// the parked state to send and the key to seal it to, or why there is none (not
    /// enrolled, revoked: its secrets are then left out). A stale answer is not used: the
    /// device is read again, behind the others; a failed read is tried again after
    /// [`RETRY_MS`].
    pub(super) fn answer(
        &mut self,
        device: &DeviceId,
        cert: Result<Option<String>, NoDeviceKey>,
        now: u64,
    ) -> Option<(Sealable, Result<Arc<str>, NoDeviceKey>)> {
        let fresh = self.reading.remove(device)?;
        if !fresh {
            if self.parked.contains_key(device) && self.queued.insert(device.clone()) {
                self.queue.push_back(device.clone());
            }
            return None;
        }
        if matches!(cert, Err(NoDeviceKey::Unreadable(_))) {
            if self.parked.contains_key(device) {
                self.retry_at
                    .insert(device.clone(), now.saturating_add(RETRY_MS));
            }
            return None;
        }
        let key = match cert {
            Ok(Some(pem)) => {
                let pem: Arc<str> = pem.into();
                self.known.insert(device.clone(), (pem.clone(), now));
                Ok(pem)
            }
            Ok(None) => Err(NoDeviceKey::NotEnrolled),
            Err(e) => Err(e),
        };
        self.parked.remove(device).map(|state| (state, key))
    }

    /// `device` enrolled again (or was revoked): its key is read from the book next time,
    /// and a read already in flight is not trusted.
    pub(super) fn forget(&mut self, device: &DeviceId) {
        self.known.remove(device);
        if let Some(fresh) = self.reading.get_mut(device) {
            *fresh = false;
        }
    }

    /// Drops keys no longer fresh (devices that left, or whose states stopped changing).
    pub(super) fn prune(&mut self, now: u64) {
        self.known.retain(|_, (_, at)| fresh(*at, now));
    }

    /// Keys at hand.
    #[cfg(test)]
    fn known(&self) -> usize {
        self.known.len()
    }

    /// Desired states waiting for a key.
    #[cfg(test)]
    fn parked(&self) -> usize {
        self.parked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::wire::messages::DesiredWorkload;

    const T0: u64 = 1_000_000;

    fn dev(id: &str) -> DeviceId {
        DeviceId::try_from(id.to_string()).unwrap()
    }

    fn state(id: &str, generation: u64, secrets: bool) -> DesiredState {
        let mounts = if secrets {
            serde_json::json!([{ "name": "db", "path": "/etc/db", "version": "1" }])
        } else {
            serde_json::json!([])
        };
        let w: DesiredWorkload = serde_json::from_value(serde_json::json!({
            "name": "app", "revision": "r1", "secrets": mounts,
            "resources": { "memory": 1024, "cpu": null },
            "restart": { "policy": "Always", "initialBackoffMs": 1, "maxBackoffMs": 1 },
        }))
        .unwrap();
        let mut s: DesiredState = serde_json::from_value(serde_json::json!({
            "deviceId": id, "generation": generation
        }))
        .unwrap();
        s.workloads = vec![w];
        s
    }

    fn sealable(id: &str, generation: u64, secrets: bool) -> Sealable {
        Sealable {
            state: state(id, generation, secrets),
            secrets: Vec::new(),
        }
    }

    fn generation(r: &Route) -> Option<u64> {
        match r {
            Route::Send(s) => Some(s.generation),
            Route::Seal(s, _) => Some(s.state.generation),
            Route::Parked => None,
        }
    }

    #[test]
    fn a_state_without_secrets_is_sent_at_once() {
        let mut k = DeviceKeys::default();
        assert!(matches!(
            k.route(sealable("a", 1, false), T0),
            Route::Send(_)
        ));
        assert!(k.reads(T0).is_empty());
    }

    #[test]
    fn a_state_waits_for_its_key_then_goes_sealed_to_it() {
        let mut k = DeviceKeys::default();
        assert!(matches!(k.route(sealable("a", 1, true), T0), Route::Parked));
        assert_eq!(k.reads(T0), vec![dev("a")]);
        assert!(k.reads(T0).is_empty(), "one read per device");
        let (s, key) = k.answer(&dev("a"), Ok(Some("A1".into())), T0).unwrap();
        assert_eq!((s.state.generation, key.unwrap().as_ref()), (1, "A1"));
        // The key is at hand now: the next state is sealed without a read.
        let r = k.route(sealable("a", 2, true), T0 + 1);
        assert!(
            matches!(&r, Route::Seal(_, c) if c.as_ref() == "A1"),
            "{r:?}"
        );
        assert_eq!(k.parked(), 0);
    }

    #[test]
    fn a_newer_state_supersedes_a_parked_one() {
        let mut k = DeviceKeys::default();
        k.route(sealable("a", 1, true), T0);
        let reads = k.reads(T0);
        k.route(sealable("a", 2, true), T0);
        assert!(
            k.reads(T0).is_empty(),
            "the read in flight serves the newer state"
        );
        let (s, _) = k.answer(&reads[0], Ok(Some("A".into())), T0).unwrap();
        assert_eq!(s.state.generation, 2);
        // A newer state without secrets goes at once, and the parked one never goes.
        k.forget(&dev("a"));
        k.route(sealable("a", 3, true), T0);
        let reads = k.reads(T0);
        assert_eq!(generation(&k.route(sealable("a", 4, false), T0)), Some(4));
        assert!(k.answer(&reads[0], Ok(Some("A".into())), T0).is_none());
        assert_eq!(k.parked(), 0);
    }

    #[test]
    fn an_answer_begun_before_the_device_enrolled_again_is_not_used() {
        let mut k = DeviceKeys::default();
        k.route(sealable("a", 1, true), T0);
        let reads = k.reads(T0);
        k.forget(&dev("a")); // enrolled again while the old key was being read
        assert!(k.answer(&reads[0], Ok(Some("OLD".into())), T0).is_none());
        // A newer state meanwhile waits too: the old key was not kept.
        assert!(matches!(k.route(sealable("a", 2, true), T0), Route::Parked));
        assert_eq!(k.reads(T0), vec![dev("a")], "read again");
        let (_, key) = k.answer(&dev("a"), Ok(Some("NEW".into())), T0).unwrap();
        assert_eq!(key.unwrap().as_ref(), "NEW");
        // And the old key was never kept.
        assert!(
            matches!(k.route(sealable("a", 2, true), T0), Route::Seal(_, c) if c.as_ref() == "NEW")
        );
    }

    #[test]
    fn a_forgotten_or_stale_key_is_read_again() {
        let mut k = DeviceKeys::default();
        k.route(sealable("a", 1, true), T0);
        k.reads(T0);
        k.answer(&dev("a"), Ok(Some("A".into())), T0);
        k.forget(&dev("a"));
        assert!(matches!(k.route(sealable("a", 2, true), T0), Route::Parked));
        k.reads(T0);
        k.answer(&dev("a"), Ok(Some("A".into())), T0);
        assert!(matches!(
            k.route(sealable("a", 3, true), T0 + FRESH_MS - 1),
            Route::Seal(..)
        ));
        assert!(matches!(
            k.route(sealable("a", 4, true), T0 + FRESH_MS),
            Route::Parked
        ));
        k.reads(T0);
        k.answer(&dev("a"), Ok(Some("A".into())), T0 + FRESH_MS);
        k.prune(T0 + FRESH_MS + 1);
        assert_eq!(k.known(), 1, "still fresh");
        k.prune(T0 + 2 * FRESH_MS);
        assert_eq!(k.known(), 0);
        assert!(matches!(
            k.route(sealable("a", 5, true), T0 + 2 * FRESH_MS),
            Route::Parked
        ));
    }

    #[test]
    fn a_clock_that_went_back_makes_a_key_stale() {
        let mut k = DeviceKeys::default();
        k.route(sealable("a", 1, true), T0);
        k.reads(T0);
        k.answer(&dev("a"), Ok(Some("A".into())), T0);
        assert!(matches!(
            k.route(sealable("a", 2, true), T0 - 1),
            Route::Parked
        ));
    }

    #[test]
    fn a_parked_state_keeps_the_secrets_it_was_committed_with() {
        let mut k = DeviceKeys::default();
        let mut s = sealable("a", 1, true);
        s.secrets = vec![StoredSecret {
            name: serde_json::from_value(serde_json::json!("db")).unwrap(),
            keys: vec!["password".into()],
            version: "1".into(),
            encrypted: "AAAA".into(),
            updated_ms: T0,
            earlier: Vec::new(),
        }];
        k.route(s, T0);
        k.reads(T0);
        let (s, _) = k.answer(&dev("a"), Ok(Some("A".into())), T0).unwrap();
        assert_eq!(s.secrets[0].version, "1");
    }

    #[test]
    fn no_key_is_kept_for_a_device_without_a_record_or_revoked() {
        let mut k = DeviceKeys::default();
        for (answer, want) in [
            (Ok(None), "the device has no enrollment record"),
            (Err(NoDeviceKey::Revoked), "the device is revoked"),
        ] {
            k.route(sealable("a", 1, true), T0);
            assert_eq!(k.reads(T0), vec![dev("a")]);
            let (_, key) = k.answer(&dev("a"), answer, T0).unwrap();
            assert_eq!(key.unwrap_err().to_string(), want);
            assert!(matches!(k.route(sealable("a", 2, true), T0), Route::Parked));
            k.reads(T0);
            assert!(k.answer(&dev("a"), Ok(Some("A".into())), T0).is_some());
            k.forget(&dev("a"));
        }
    }

    #[test]
    fn a_read_the_book_could_not_answer_is_tried_again_later() {
        let mut k = DeviceKeys::default();
        k.route(sealable("a", 1, true), T0);
        assert_eq!(k.reads(T0), vec![dev("a")]);
        let down = Err(NoDeviceKey::Unreadable("etcd is down".into()));
        assert!(k.answer(&dev("a"), down, T0).is_none(), "the state waits");
        assert_eq!(k.parked(), 1);
        assert!(k.reads(T0 + RETRY_MS - 1).is_empty(), "not at once");
        assert_eq!(k.reads(T0 + RETRY_MS), vec![dev("a")]);
        let (s, key) = k
            .answer(&dev("a"), Ok(Some("A".into())), T0 + RETRY_MS)
            .unwrap();
        assert_eq!((s.state.generation, key.unwrap().as_ref()), (1, "A"));
    }

    #[test]
    fn a_stale_answer_goes_behind_the_others() {
        let mut k = DeviceKeys::default();
        for i in 0..=MAX_READS {
            k.route(sealable(&format!("d{i}"), 1, true), T0);
        }
        let first = k.reads(T0);
        k.forget(&first[0]);
        assert!(k.answer(&first[0], Ok(Some("OLD".into())), T0).is_none());
        assert_eq!(
            k.reads(T0),
            vec![dev(&format!("d{MAX_READS}"))],
            "the waiting one first"
        );
    }

    #[test]
    fn reads_in_flight_are_bounded_and_unasked_answers_ignored() {
        let mut k = DeviceKeys::default();
        for i in 0..(MAX_READS + 5) {
            k.route(sealable(&format!("d{i}"), 1, true), T0);
        }
        let first = k.reads(T0);
        assert_eq!(first.len(), MAX_READS);
        assert!(k.reads(T0).is_empty());
        assert!(k
            .answer(&dev("stranger"), Ok(Some("X".into())), T0)
            .is_none());
        assert!(k.answer(&first[0], Ok(Some("K".into())), T0).is_some());
        assert_eq!(k.reads(T0), vec![dev(&format!("d{MAX_READS}"))]);
        assert_eq!(k.parked(), MAX_READS + 4);
    }
}
