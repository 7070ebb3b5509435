//! What the enrollment book granted devices (join tokens' labels), read off the loop's
//! thread.

use super::*;
use crate::app::command::Bus;
use crate::store::Store;
use shoal_api::ids::DeviceId;
use shoal_api::messages::{now_ms, DesiredState};
use tracing::warn;

impl<S: Store, B: Bus> MainLoop<S, B> {
    /// `read` on the enrollment book, off the loop's thread; `None` for an `--insecure` hub
    /// or when it fails (logged as `what`: the fleet then keeps the labels it has, fewer
    /// rights, never more).
    pub(super) async fn read_book<T: Send + 'static>(
        &self,
        what: &'static str,
        read: impl FnOnce(&dyn crate::enrollment::Enrollments) -> Result<T, crate::enrollment::EnrollError>
            + Send
            + 'static,
    ) -> Option<T> {
        let sec = self.security.clone()?;
        let r = tokio::task::spawn_blocking(move || read(&*sec.enrollments)).await;
        match r
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(error = %e, "cannot read {what} from the enrollment book");
                None
            }
        }
    }

    /// What the join token `device` last enrolled with granted it.
    pub(super) async fn grant_of(&self, device: &DeviceId) -> Option<shoal_api::labels::Grant> {
        let d = device.clone();
        self.read_book("a device's grant", move |b| b.grant(&d))
            .await
            .flatten()
    }

    /// Applies every grant of the enrollment book this store has not applied yet.
    pub(super) async fn catch_up_grants(&mut self) -> Vec<DesiredState> {
        let Some(grants) = self.read_book("the grants", |b| b.grants()).await else {
            return Vec::new();
        };
        let grants = grants.into_iter().map(|(d, g)| (d, Some(g))).collect();
        self.fleet(|f| f.apply_grants(grants, now_ms()))
    }
}
