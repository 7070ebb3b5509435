//! The link part of the agent's loop: the bus to the hub and what travels on it from this
//! device (presence, hello, status), the state of the connection and when the hub was last
//! in sync.

use crate::bus::{Bus, MqttBus};
use crate::status::HubLinkView;
use shoal_api::model::ids::DeviceId;
use shoal_api::wire::messages::{DeviceStatus, Hello, InstanceStatus};
use shoal_api::wire::topics;
use shoal_daemon::clock::now_ms;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::{debug, warn};

/// The bus, the device's hello, the link's state.
pub struct Link {
    device_id: DeviceId,
    bus: MqttBus,
    /// The device's capabilities, sent on every connect.
    hello: Hello,
    /// The time of the last status sent: each status is strictly newer (hub replicas order
    /// a device's reports by it, and two can fall in one millisecond).
    status_ms: AtomicU64,
    /// The link to the broker, for `shoal-agent status`.
    view: HubLinkView,
    /// When a verified desired state last arrived.
    last_sync_ms: Option<u64>,
    /// When the broker last confirmed something this device sent (see [`crate::bus::connect`]).
    contact: tokio::sync::watch::Receiver<Option<std::time::Instant>>,
}

impl Link {
    pub fn new(
        device_id: DeviceId,
        bus: MqttBus,
        hello: Hello,
        contact: tokio::sync::watch::Receiver<Option<std::time::Instant>>,
    ) -> Self {
        Link {
            device_id,
            bus,
            hello,
            status_ms: AtomicU64::new(0),
            view: HubLinkView::default(),
            last_sync_ms: None,
            contact,
        }
    }

    /// Whether the bus is connected now.
    pub fn connected(&self) -> bool {
        self.view.connected
    }

    /// When the broker last confirmed something this device sent.
    pub fn contact(&self) -> Option<std::time::Instant> {
        *self.contact.borrow()
    }

    /// The bus connected (`true`) or lost its connection (`false`, with why).
    pub fn changed(&mut self, connected: bool, error: Option<String>) {
        if self.view.connected != connected || self.view.since_ms.is_none() {
            self.view.since_ms = Some(now_ms());
        }
        self.view.connected = connected;
        self.view.last_error = error;
    }

    /// A verified desired state arrived (new, or the one in force again).
    pub fn synced(&mut self) {
        self.last_sync_ms = Some(now_ms());
    }

    /// On every connect: presence `online`, hello, then the status (of the desired state's
    /// `generation`, with the replicas' `statuses`), all retained.
    pub async fn announce<'a>(
        &self,
        generation: u64,
        statuses: impl Iterator<Item = &'a InstanceStatus>,
    ) {
        let id = &self.device_id;
        self.publish(
            topics::presence(id),
            topics::ONLINE.as_bytes().to_vec(),
            true,
        )
        .await;
        match serde_json::to_vec(&self.hello) {
            Ok(h) => self.publish(topics::hello(id), h, true).await,
            Err(e) => warn!(error = %e, "cannot encode hello"),
        }
        self.publish_status(generation, statuses).await;
    }

    /// Publishes the device's status (retained), timed strictly after the previous one.
    pub async fn publish_status<'a>(
        &self,
        generation: u64,
        statuses: impl Iterator<Item = &'a InstanceStatus>,
    ) {
        let status = DeviceStatus {
            protocol: shoal_api::PROTOCOL_VERSION,
            device_id: self.device_id.clone(),
            observed_generation: generation,
            workloads: statuses.cloned().collect(),
            time_ms: strictly_after(&self.status_ms, now_ms()),
        };
        match serde_json::to_vec(&status) {
            Ok(p) => self.publish(topics::status(&self.device_id), p, true).await,
            Err(e) => warn!(error = %e, "cannot encode status"),
        }
    }

    async fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) {
        if let Err(e) = self.bus.publish(topic, payload, retain).await {
            debug!(error = %e, "publish dropped (will resend on reconnect)");
        }
    }

    /// Announces a clean departure (shutdown).
    pub async fn leave(&self) {
        self.bus.leave(&self.device_id).await;
    }

    /// For tasks that publish on their own (log streams).
    pub fn bus(&self) -> &MqttBus {
        &self.bus
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    pub fn view(&self) -> &HubLinkView {
        &self.view
    }

    pub fn last_sync_ms(&self) -> Option<u64> {
        self.last_sync_ms
    }
}

/// `now`, or one past the last time handed out when that is not older: successive calls
/// return strictly increasing times.
fn strictly_after(last: &AtomicU64, now: u64) -> u64 {
    let next = |prev: u64| now.max(prev + 1);
    match last.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| Some(next(p))) {
        Ok(prev) | Err(prev) => next(prev),
    }
}

#[cfg(test)]
mod tests {
    use super::strictly_after;

    #[test]
    fn status_times_strictly_increase() {
        let last = std::sync::atomic::AtomicU64::new(0);
        assert_eq!(strictly_after(&last, 100), 100);
        assert_eq!(strictly_after(&last, 100), 101); // same millisecond
        assert_eq!(strictly_after(&last, 50), 102); // the clock stepped back
        assert_eq!(strictly_after(&last, 500), 500);
    }
}
