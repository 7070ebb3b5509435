//! A standby's share of the loop: it listens to devices and answers reads, follows the
//! leader's writes (store reloads, at most every 500 ms and every 30 s whatever the etcd
//! watch says), and never writes or publishes.

use super::request::Request;
use super::*;
use crate::app::command::{Bus, BusEvent};
use crate::store::Store;
use shoal_daemon::clock::now_ms;
use tracing::warn;

/// How often, at most, a standby reads the store again (a burst of the leader's writes is
/// read once), and asks who leads.
const STANDBY_RELOAD: std::time::Duration = std::time::Duration::from_millis(500);

/// How often a standby reads the store whatever its watch says (a watch stream can stall
/// silently on a broken network path).
const STANDBY_FULL_READ: std::time::Duration = std::time::Duration::from_secs(30);

impl<S: Store, B: Bus> MainLoop<S, B> {
    /// A standby's share of `handle`: it listens to devices and answers reads, and
    /// follows the leader's writes in the store; it decides nothing (the `http` module
    /// refuses changes before they get here).
    pub(super) async fn stand_by(&mut self, event: Event) {
        match event {
            // The leader answers manifests sent over MQTT.
            Event::Bus(BusEvent::Apply(_) | BusEvent::Connected) | Event::RolloutTick => {}
            Event::Bus(e) => self.on_message(e).await,
            // Standbys take their share of reports too.
            Event::RelayTick => self.relay().await,
            Event::Http(r) if r.reads_only() => self.on_request(r).await,
            // A device enrolled here: the leader applies its token's grant (from the book)
            // and seals its secrets to its new key.
            Event::Http(Request::Enrolled { device }) => match self.ingest.as_mut() {
                Some(i) => {
                    i.heard_enrolled(device.clone(), now_ms());
                    i.relay.enrolled(device)
                }
                None => {
                    warn!(%device, "a device enrolled through a standby without shared ingest: the leader applies its token's grant when it starts, and seals its secrets to its new key when its desired state changes (a minute after it last read the key at most)")
                }
            },
            Event::Http(_) => {} // refused by the http module
            Event::Mdns(_) => {}
            // The leader reads the book (a standby asks it nothing).
            Event::Book(_) => {}
            Event::Tick => {
                let now = std::time::Instant::now();
                let Role::Standby(sb) = &mut self.role else {
                    return;
                };
                if sb.last_reload.is_none_or(|t| now - t >= STANDBY_RELOAD) {
                    sb.last_reload = Some(now);
                    let leader = sb.elector.leader().await;
                    sb.leader
                        .send_replace(Some(leader.unwrap_or_else(|| "none yet".into())));
                    // Marked seen before reading: a write landing during the read moves
                    // the count again and is read next time. (Without its watch, at
                    // shutdown, it reads every time.)
                    let due = sb.last_read.is_none_or(|t| now - t >= STANDBY_FULL_READ);
                    if sb.changes.has_changed().unwrap_or(true) || due {
                        sb.changes.mark_unchanged();
                        sb.last_read = Some(now);
                        self.metrics.standby_reloads.inc();
                        match sb.read.load() {
                            Ok(snap) => self.core.reload(snap),
                            Err(e) => {
                                // Read again at the next tick.
                                sb.changes.mark_changed();
                                warn!(error = %e, "standby cannot read the hub store");
                            }
                        }
                    }
                }
                self.record_events(false);
                let due = self.logs.tick(now_ms());
                self.publish_log_requests(due).await;
            }
        }
    }
}
