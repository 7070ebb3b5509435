//! What devices report: their status (taken newest first, across hub replicas, see
//! [`super::ingest`]) and the fact that they spoke.

use super::*;
use shoal_api::model::ids::DeviceId;
use shoal_api::wire::messages::DeviceStatus;

/// How long a status stays newer than a report with an older device time arriving after it.
/// Hub replicas take reports in parallel, so two of a device's reports can reach a hub out of
/// order, but only within this window; past it the arrival order wins, so a device whose
/// clock jumps back is not ignored for longer.
const REORDER_WINDOW_MS: u64 = 2_000;

/// What [`Fleet::accept_status`] made of a device's report.
#[derive(Debug, PartialEq)]
pub enum Accepted {
    /// New content, now the device's status (a copy for the other replicas).
    New(DeviceStatus),
    /// The content the hub had, newer: the device is alive.
    Same(shoal_api::wire::messages::Heard),
    /// Older than the status the hub has; `ours` is that status when its content differs
    /// (another replica may have taken the older report as the newest: it needs ours).
    Stale {
        heard: shoal_api::wire::messages::Heard,
        ours: Option<DeviceStatus>,
    },
}

impl Fleet {
    /// A device reported what it runs.
    pub fn status(&mut self, status: DeviceStatus, now: u64) {
        let id = status.device_id.clone();
        self.reported(&id, now);
        let live = self.live.entry(id).or_default();
        live.status = Some(status);
        live.status_at_ms = now;
        live.fingerprint = None;
    }

    /// A report of the device arrived (directly or through another replica).
    pub(super) fn reported(&mut self, id: &DeviceId, now: u64) {
        if let Some(rec) = self.devices.get_mut(id) {
            rec.last_seen_ms = now;
        }
        self.heard(id, now);
    }

    /// A device's report as hub replicas take it (see [`crate::fleet::ingest`]): reports may
    /// arrive out of order, so one older than the hub's status (by the device's clock, within
    /// [`REORDER_WINDOW_MS`] of taking that status) is not taken.
    pub fn accept_status(&mut self, status: DeviceStatus, now: u64) -> Accepted {
        let id = status.device_id.clone();
        self.reported(&id, now);
        let live = self.live.entry(id.clone()).or_default();
        let heard = |fingerprint: String| shoal_api::wire::messages::Heard {
            device_id: id.clone(),
            time_ms: status.time_ms,
            fingerprint,
        };
        let accepted = match &live.status {
            Some(cur)
                if status.time_ms < cur.time_ms
                    && now.saturating_sub(live.status_at_ms) < REORDER_WINDOW_MS =>
            {
                let theirs = crate::fleet::ingest::fingerprint(&status);
                let ours = live.fingerprint().map(str::to_string);
                let differs = ours.as_deref() != Some(theirs.as_str());
                let ours = live.status.clone().filter(|_| differs);
                return Accepted::Stale {
                    heard: heard(theirs),
                    ours,
                };
            }
            Some(cur)
                if cur.observed_generation == status.observed_generation
                    && cur.workloads == status.workloads =>
            {
                let fp = live.fingerprint().map(str::to_string).unwrap_or_default();
                Accepted::Same(heard(fp))
            }
            _ => {
                live.fingerprint = None;
                Accepted::New(status.clone())
            }
        };
        live.status = Some(status);
        live.status_at_ms = now;
        accepted
    }

    /// Another replica's ingest batch (see [`crate::fleet::ingest`]); returns the statuses this hub
    /// must pass on again: its own, where the batch brought an older one with other content.
    pub fn ingest_batch(
        &mut self,
        batch: shoal_api::wire::messages::IngestBatch,
        now: u64,
    ) -> Vec<DeviceStatus> {
        let mut again = Vec::new();
        for s in batch.statuses {
            if let Accepted::Stale { ours: Some(o), .. } = self.accept_status(s, now) {
                again.push(o);
            }
        }
        for h in &batch.heard {
            self.heard_status(h, now);
        }
        again
    }

    /// Another replica heard a device repeat a status: it is alive, and when the content is
    /// the one this hub has, that status is as new as the report.
    pub fn heard_status(&mut self, h: &shoal_api::wire::messages::Heard, now: u64) {
        self.reported(&h.device_id, now);
        let Some(live) = self.live.get_mut(&h.device_id) else {
            return;
        };
        let same = live.fingerprint() == Some(h.fingerprint.as_str());
        if let (true, Some(cur)) = (same, live.status.as_mut()) {
            if h.time_ms > cur.time_ms {
                cur.time_ms = h.time_ms;
                live.status_at_ms = now;
            }
        }
    }
}
