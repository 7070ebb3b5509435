//! Read models and their side effects: metrics, events for the dashboard and `shoal get
//! events`, and where `shoal logs` asks.

use super::*;
use crate::app::command::Bus;
use crate::store::Store;
use shoal_api::model::ids::DeviceId;
use shoal_daemon::clock::now_ms;
use tracing::info;

impl<S: Store, B: Bus> MainLoop<S, B> {
    pub(super) fn update_metrics(&mut self) {
        self.metrics.refresh(
            &self.core.device_views(),
            &self.core.workload_views(),
            self.core.mdns_devices(),
        );
    }

    /// Whom to ask for `workload`'s logs: the online devices among those with a replica of it
    /// (or `device` alone), the offline ones with why, and how many replicas they hold.
    #[allow(clippy::type_complexity)]
    pub(super) fn log_targets(
        &self,
        workload: &shoal_api::model::ids::WorkloadName,
        device: Option<&DeviceId>,
    ) -> Result<(Vec<DeviceId>, Vec<(DeviceId, String)>, usize), LogRefusal> {
        let Some(view) = self.core.workload_view(workload) else {
            return Err(LogRefusal::WorkloadNotFound(workload.clone()));
        };
        let devices = self.core.device_views();
        // A job's finished replicas left their devices; their logs are still there.
        let finished = view.job.iter().flat_map(|j| &j.results);
        let placed: std::collections::BTreeSet<&str> = view
            .replicas
            .iter()
            .filter_map(|r| r.device.as_deref())
            .chain(finished.clone().map(|r| r.result.device.as_str()))
            .collect();
        let wanted: Vec<&str> = match device {
            Some(d) if devices.iter().any(|v| v.id == d.as_str()) => vec![d.as_str()],
            Some(d) => return Err(LogRefusal::DeviceNotFound(d.clone())),
            None if placed.is_empty() => return Err(LogRefusal::NotPlaced(workload.clone())),
            None => placed.into_iter().collect(),
        };
        let replicas = view
            .replicas
            .iter()
            .filter(|r| r.device.as_deref().is_some_and(|d| wanted.contains(&d)))
            .count()
            + finished
                .filter(|r| wanted.contains(&r.result.device.as_str()))
                .count();
        let (mut asked, mut unreachable) = (Vec::new(), Vec::new());
        for v in devices.iter().filter(|v| wanted.contains(&v.id.as_str())) {
            let Ok(id) = DeviceId::try_from(v.id.as_str()) else {
                continue;
            };
            if v.online {
                asked.push(id);
            } else {
                let why = format!("device {id} is offline: its logs can be read when it is back");
                unreachable.push((id, why));
            }
        }
        Ok((asked, unreachable, replicas))
    }

    /// Takes a snapshot of the fleet and records what changed since the last one: when
    /// something happened, at least every second (devices go offline with time), and
    /// whenever `now` (a reader wants the latest).
    pub(super) fn record_events(&mut self, now: bool) {
        let due = self
            .views
            .last_snapshot
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
        if !(self.views.changed || due || now) {
            return;
        }
        let devices = self.core.device_views();
        let workloads = self.core.workload_views();
        self.observe(&devices, &workloads);
    }

    /// Records the events between the last snapshot and these views of the fleet.
    pub(super) fn observe(
        &mut self,
        devices: &[shoal_api::wire::views::DeviceView],
        workloads: &[shoal_api::wire::views::WorkloadView],
    ) {
        let changed = std::mem::take(&mut self.views.changed);
        self.views.last_snapshot = Some(std::time::Instant::now());
        let snapshot = crate::fleet::events::Snapshot::of(devices, workloads);
        let added = self.views.events.observe(snapshot, now_ms());
        for e in &added {
            info!(target: "shoal_hub::fleet::events", kind = %e.kind, reason = %e.reason, object = %e.object, "{}", e.message);
        }
        self.metrics.recorded(&added);
        if changed || !added.is_empty() {
            self.views
                .fleet_changed
                .send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}
