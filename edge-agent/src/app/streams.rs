//! The log-streams part of the agent's loop: the hub's log requests (`shoal logs`), checked
//! (signed by the hub, for this device, not a replay) and handed to
//! [`crate::remote_logs::Streams`], which serves each on a task of its own.

use crate::bus::Bus;
use shoal_api::model::ids::DeviceId;
use shoal_api::wire::messages::LogRequest;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

/// The log streams the hub asked for.
pub struct LogStreams {
    device_id: DeviceId,
    /// The hub's signing key; `None` for an `--insecure` agent (nothing to verify with).
    hub_key: Option<shoal_pki::sign::HubKey>,
    logs_dir: PathBuf,
    tracker: TaskTracker,
    /// Ends every stream (the agent is stopping).
    stopping: CancellationToken,
    /// When the newest log request taken was issued (the hub's clock): much older ones are
    /// replays.
    newest_ms: u64,
    streams: crate::remote_logs::Streams,
}

impl LogStreams {
    pub fn new(
        device_id: DeviceId,
        hub_key: Option<shoal_pki::sign::HubKey>,
        logs_dir: PathBuf,
        tracker: TaskTracker,
        stopping: CancellationToken,
    ) -> Self {
        LogStreams {
            device_id,
            hub_key,
            logs_dir,
            tracker,
            stopping,
            newest_ms: 0,
            streams: crate::remote_logs::Streams::default(),
        }
    }

    /// The hub asks for log lines: served by a task of their own, publishing on `bus`.
    pub fn on_request<B: Bus>(&mut self, payload: &[u8], bus: &B) {
        let req = match serde_json::from_slice::<LogRequest>(payload) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "malformed log request ignored");
                return;
            }
        };
        // Only what the hub signed, for this device, and not a replay of an old request (an
        // agent run --insecure has no hub key to check with).
        if let Some(key) = &self.hub_key {
            if let Err(e) =
                shoal_pki::sign::verify_log_request(key, &self.device_id, self.newest_ms, &req)
            {
                warn!(reason = %e, "log request refused");
                return;
            }
        }
        self.newest_ms = self.newest_ms.max(req.issued_ms);
        self.streams.handle(
            req,
            crate::remote_logs::Context {
                device: &self.device_id,
                logs_dir: &self.logs_dir,
                bus,
                tracker: &self.tracker,
                shutdown: &self.stopping,
            },
        );
    }
}
