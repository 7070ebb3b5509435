//! `shoal delete device`: the hub forgets a device that is gone for good (a board replaced,
//! a site closed). Its record, labels and annotations go; its replicas are placed elsewhere.
//! Its desired state stays, emptied, under a new generation: a board that comes back anyway
//! stops what it ran (it would otherwise keep running replicas that now run elsewhere, and
//! refuse the hub's states as older than the one it holds). A device that is connected is
//! refused: it would only say hello again. Forgetting is not revoking: a device whose
//! certificate is still valid that connects again comes back as new (without the
//! operator's labels), so revoke it first (`shoal-hub device revoke`) to keep it out.

use super::*;
use tracing::info;

/// Why `shoal delete device` changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceRefusal {
    #[error("device {:?} not found", .0.as_str())]
    NotFound(DeviceId),
    #[error("device {:?} is online: stop its agent first (and revoke it with `shoal-hub device revoke` to keep it out), or cordon and drain it to move its replicas", .0.as_str())]
    Online(DeviceId),
}

impl Fleet {
    /// Forgets device `id` (see the module's documentation); the desired states that
    /// changed (its replicas placed elsewhere).
    pub fn delete_device(&mut self, id: &DeviceId) -> Result<Vec<DesiredState>, DeviceRefusal> {
        if !self.devices.contains_key(id) {
            return Err(DeviceRefusal::NotFound(id.clone()));
        }
        if self.live.get(id).is_some_and(|l| l.online) {
            return Err(DeviceRefusal::Online(id.clone()));
        }
        self.devices.remove(id);
        self.live.remove(id);
        self.mdns.retain(|_, (d, _)| d != id);
        self.changes.delete_device(id);
        info!(device = %id, "device deleted");
        // Placement no longer sees it: its desired state is emptied like any other's.
        Ok(self.reconcile())
    }
}
