//! The requests the HTTP handlers put to the main loop, with their typed replies: the port
//! the HTTP adapter (`crate::http`) uses. Here, with the shell that answers them, so that the
//! shell names no adapter but where it composes them (`compose.rs`).

use crate::fleet::{RolloutAction, WorkloadRefusal};
use shoal_api::model::ids::{ConfigName, DeviceId, Digest, SecretName, WorkloadName};
use shoal_api::model::labels::{LabelChange, Labels};
use shoal_api::wire::messages::ApplyResult;
use shoal_api::wire::views::{DeviceView, EventView, FleetView, SecretView, WorkloadView};
use tokio::sync::{mpsc, oneshot};

/// A question for the main loop.
#[derive(Debug)]
pub enum Request {
    Apply {
        text: ManifestText,
        reply: oneshot::Sender<ApplyResult>,
    },
    /// `Ok(false)`: no such workload.
    Delete {
        name: WorkloadName,
        reply: oneshot::Sender<Result<bool, NotDurable>>,
    },
    Devices {
        reply: oneshot::Sender<Vec<DeviceView>>,
    },
    Secrets {
        reply: oneshot::Sender<Vec<SecretView>>,
    },
    DeleteSecret {
        name: SecretName,
        reply: oneshot::Sender<Result<(), Failed<crate::fleet::SecretRefusal>>>,
    },
    /// `shoal policy get`.
    Policy {
        reply: oneshot::Sender<shoal_api::policy::fleet::FleetPolicy>,
    },
    /// `shoal policy set`.
    SetPolicy {
        policy: shoal_api::policy::fleet::FleetPolicy,
        reply: oneshot::Sender<Result<(), Failed<crate::fleet::PolicyRefusal>>>,
    },
    /// `shoal delete device`.
    DeleteDevice {
        id: DeviceId,
        reply: oneshot::Sender<Result<(), Failed<crate::fleet::DeviceRefusal>>>,
    },
    Configs {
        reply: oneshot::Sender<Vec<shoal_api::wire::views::ConfigView>>,
    },
    /// `None`: no such config.
    Config {
        name: ConfigName,
        reply: oneshot::Sender<Option<shoal_api::wire::views::ConfigDescription>>,
    },
    DeleteConfig {
        name: ConfigName,
        reply: oneshot::Sender<Result<(), Failed<crate::fleet::ConfigRefusal>>>,
    },
    /// A device enrolled (perhaps again, with a new key); what its token granted is in the
    /// enrollment book.
    Enrolled { device: DeviceId },
    /// May `device` download blob `digest` (its desired state names it)? Its reported
    /// architecture if so.
    MayFetch {
        device: DeviceId,
        digest: Digest,
        reply: oneshot::Sender<Result<String, crate::fleet::FetchRefusal>>,
    },
    /// `shoal label device` / `shoal annotate device`: the device's labels (annotations)
    /// afterwards.
    Label {
        id: DeviceId,
        meta: shoal_api::model::labels::Meta,
        change: LabelChange,
        reply: oneshot::Sender<Result<Labels, Failed<crate::fleet::LabelRefusal>>>,
    },
    Workloads {
        reply: oneshot::Sender<Vec<WorkloadView>>,
    },
    /// Record a change in the audit log, durably; its number.
    Audit {
        change: crate::fleet::audit::Change,
        reply: oneshot::Sender<Result<u64, NotDurable>>,
    },
    /// The audit log after entry `after` (the leader's: a standby's copy is as old as the
    /// standby, so it is not answered as a read).
    AuditLog {
        after: u64,
        reply: oneshot::Sender<Vec<shoal_api::policy::operator::AuditEntry>>,
    },
    /// The devices the enrollment book says are revoked (all of them; see
    /// [`crate::access::watch`]).
    Revoked {
        devices: std::collections::BTreeSet<DeviceId>,
    },
    /// Bring the gauges up to date before a scrape (computed on demand, not on every event).
    RefreshMetrics { reply: oneshot::Sender<()> },
    /// The fleet, and the events numbered after `after` (the dashboard's stream).
    Fleet {
        after: u64,
        reply: oneshot::Sender<FleetView>,
    },
    /// Recorded events numbered after `after`, about `object` when given.
    Events {
        after: u64,
        object: Option<String>,
        reply: oneshot::Sender<Vec<EventView>>,
    },
    Workload {
        name: WorkloadName,
        reply: oneshot::Sender<Option<WorkloadView>>,
    },
    /// Steer a rollout.
    Rollout {
        name: WorkloadName,
        action: RolloutAction,
        reply: oneshot::Sender<Result<(), Failed<WorkloadRefusal>>>,
    },
    Scale {
        name: WorkloadName,
        replicas: u32,
        reply: oneshot::Sender<Result<(), Failed<WorkloadRefusal>>>,
    },
    /// A job runs again (`shoal rerun`).
    Rerun {
        name: WorkloadName,
        reply: oneshot::Sender<Result<(), Failed<WorkloadRefusal>>>,
    },
    /// Cordon, uncordon or drain a device; `Ok(false)`: no such device.
    Device {
        id: DeviceId,
        action: DeviceAction,
        reply: oneshot::Sender<Result<bool, NotDurable>>,
    },
    /// Open a log session (`shoal logs`): all devices with a replica of `workload`, or only
    /// `device`.
    Logs {
        workload: WorkloadName,
        device: Option<DeviceId>,
        tail: Option<u32>,
        since_secs: Option<u64>,
        follow: bool,
        reply: oneshot::Sender<Result<LogStream, LogRefusal>>,
    },
}

/// An open log session, as the main loop hands it to the HTTP handler.
#[derive(Debug)]
pub struct LogStream {
    /// Devices that were asked.
    pub asked: Vec<DeviceId>,
    /// Devices that could not be asked, and why.
    pub unreachable: Vec<(DeviceId, String)>,
    /// Replicas of the workload on the devices concerned.
    pub replicas: usize,
    pub events: mpsc::Receiver<crate::logs::LogEvent>,
}

impl Request {
    /// Whether the request only reads (it changes nothing in the fleet).
    pub fn reads_only(&self) -> bool {
        matches!(
            self,
            Request::Devices { .. }
                | Request::MayFetch { .. }
                | Request::Secrets { .. }
                | Request::Configs { .. }
                | Request::Policy { .. }
                | Request::Config { .. }
                | Request::Workloads { .. }
                | Request::Workload { .. }
                | Request::RefreshMetrics { .. }
                | Request::Fleet { .. }
                | Request::Events { .. }
                | Request::Logs { .. }
        )
    }
}

/// A manifest as posted: its `Debug` shows only its size, since it may hold secret values.
pub struct ManifestText(pub String);

impl std::fmt::Debug for ManifestText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ManifestText({} bytes)", self.0.len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceAction {
    Cordon,
    Uncordon,
    Drain,
}

/// The change was decided but could not be made durable (the store's flush failed): nothing
/// was published, and whoever asked must not be told it worked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the hub could not make the change durable (store flush failed); it retries, check the hub's disk")]
pub struct NotDurable;

/// Why an operator's change was not made: refused by the fleet (`R`, the operator's to
/// fix), or not durable (the hub's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failed<R> {
    #[error(transparent)]
    Refused(R),
    #[error(transparent)]
    NotDurable(#[from] NotDurable),
}

/// Why `shoal logs` has nobody to ask.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogRefusal {
    #[error("workload {:?} not found", .0.as_str())]
    WorkloadNotFound(WorkloadName),
    #[error("device {:?} not found", .0.as_str())]
    DeviceNotFound(DeviceId),
    #[error("workload {:?} has no replica placed on a device yet", .0.as_str())]
    NotPlaced(WorkloadName),
}
