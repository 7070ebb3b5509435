//! Read models served by the hub's HTTP API (`/v1/devices`, `/v1/workloads`) and printed by
//! `shoal get … -o json`. Permissive like every wire type.

use crate::model::workload::Workload;
use crate::wire::messages::Phase;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The request header that marks a call to the hub's API as made by a program, not by a
/// page in a browser: state-changing requests need it, or a JSON/YAML/binary body (see the
/// hub's `http` module).
pub const CLIENT_HEADER: &str = "x-shoal-client";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceView {
    pub id: String,
    pub online: bool,
    /// Offline or silent past the hub's grace period: its replicas were moved.
    #[serde(default)]
    pub lost: bool,
    /// Takes no new replicas (`shoal cordon`).
    #[serde(default)]
    pub cordoned: bool,
    /// Revoked (`shoal-hub device revoke`): refused by the hub, runs nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
    #[serde(default)]
    pub arch: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub runtimes: Vec<String>,
    #[serde(default)]
    pub cpus: u32,
    /// Memory offered to workloads, bytes.
    #[serde(default)]
    pub memory: u64,
    /// Memory requested by the replicas placed here, bytes.
    #[serde(default)]
    pub memory_allocated: u64,
    /// Hardware nodes the device offers, per class (`[devices.CLASS]` of its agent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hardware: BTreeMap<String, u32>,
    /// Hardware nodes asked for by the replicas placed here, per class.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hardware_allocated: BTreeMap<String, u32>,
    /// What the device lets containers ask for (`privileged`, `host-devices`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allows: Vec<String>,
    /// The labels placement sees: the operator's (join token, `shoal label device`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Labels the device asked for (`shoal-agent run --labels`) that it was not granted.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requested_labels: BTreeMap<String, String>,
    /// The operators' notes (`shoal annotate device`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub agent_version: String,
    /// When the device last spoke; 0 for a device that enrolled and never connected.
    #[serde(default)]
    pub last_seen_ms: u64,
    /// Generation of the desired state last published to the device.
    #[serde(default)]
    pub desired_generation: u64,
    /// Generation the device reports acting on.
    #[serde(default)]
    pub observed_generation: u64,
    /// Replicas placed on the device.
    #[serde(default)]
    pub replicas: usize,
    /// Addresses the device's agent advertises over mDNS, as the hub sees them; empty when
    /// the hub has not seen it on the LAN (other subnet, mDNS off).
    #[serde(default)]
    pub mdns_addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaView {
    pub replica: u32,
    /// `None` while unplaced.
    #[serde(default)]
    pub device: Option<String>,
    pub phase: Phase,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u64>,
    /// Revision the device reports for this replica.
    #[serde(default)]
    pub revision: String,
    #[serde(default)]
    pub variant: String,
    /// The health probe's last verdict while running (none without a probe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    /// The hardware nodes the device says the replica holds (`resources.devices`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// A scheduled replica: its next run and its last runs, as its device reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<crate::model::schedule::ScheduleStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadView {
    pub name: String,
    pub revision: String,
    /// `replicas` or `every`.
    pub placement: String,
    /// Wanted replica count (for `every`: the number of devices it is placed on).
    pub desired: u32,
    /// Replicas in phase `Running` at the current revision.
    pub ready: u32,
    pub replicas: Vec<ReplicaView>,
    /// Why some replicas are unplaced, if any are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_reason: Option<String>,
    /// The validated spec (for `shoal describe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Workload>,
    /// The latest rollout, if the workload has had a new revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutView>,
    /// A job's current run (see [`crate::model::job`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobView>,
}

/// A job's current run as `shoal get jobs` and `shoal describe` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    pub run: u64,
    /// Successful runs wanted; 0 for `placement: every` (once per matching device).
    pub completions: u32,
    pub succeeded: u32,
    pub failed: u32,
    /// Replicas placed and not finished.
    pub active: u32,
    /// `Running`, `Complete` or `Failed` (a `placement: every` job stays `Running`).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// Each slot's result: by completion index, or by device for `placement: every`.
    #[serde(default)]
    pub results: Vec<JobResultView>,
}

/// One slot's result in a job's run: the slot, and the result the hub keeps for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobResultView {
    pub slot: String,
    #[serde(flatten)]
    pub result: SlotResult,
}

/// A slot's result in a job's run, as the hub keeps it (and shows it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotResult {
    pub device: crate::model::ids::DeviceId,
    pub replica: u32,
    /// `Succeeded` or `Failed`.
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Retries on the device before this result.
    #[serde(default)]
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    /// By the device's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
}

/// A secret as `shoal get secrets` shows it: never its values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretView {
    pub name: String,
    pub keys: Vec<String>,
    /// Changes with the content (a keyed fingerprint, not a hash of the values).
    pub version: String,
    /// Workloads that reference it.
    #[serde(default)]
    pub used_by: Vec<String>,
    pub updated_ms: u64,
    /// Workloads whose spec still pins an earlier version (a rollout not finished, or rolled
    /// back): their replicas still read the earlier value, which the hub keeps until none does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub behind: Vec<String>,
}

/// A config as `shoal get configs` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigView {
    pub name: String,
    pub keys: Vec<String>,
    /// How many overrides it has.
    pub overrides: usize,
    /// Changes with the content.
    pub version: String,
    /// Workloads that read it.
    #[serde(default)]
    pub used_by: Vec<String>,
}

/// `shoal describe config`: the config, who reads which version of it, and which value each
/// device gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDescription {
    pub config: crate::model::config::Config,
    pub version: String,
    #[serde(default)]
    pub users: Vec<ConfigUser>,
    /// Every device the hub knows, with its values.
    #[serde(default)]
    pub devices: Vec<DeviceValues>,
}

/// A workload that reads a config, and the version its current spec pinned (an older one
/// after a rollback, until the config or the workload is applied again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigUser {
    pub workload: String,
    pub version: String,
}

/// One device's values of a config, each with where it comes from (`data` or
/// `overrides[i]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceValues {
    pub device: String,
    pub values: BTreeMap<String, ResolvedValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedValue {
    pub value: String,
    pub from: crate::model::config::Source,
}

/// A workload's latest rollout (`shoal rollout status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutView {
    /// `Progressing`, `Paused`, `Canary`, `Complete`, `Failed` or `RolledBack`.
    pub state: String,
    pub revision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_revision: Option<String>,
    /// Replicas on the new revision / all replicas.
    pub updated: u32,
    pub total: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub started_ms: u64,
    #[serde(default)]
    pub history: Vec<RevisionView>,
}

/// One past revision (`shoal rollout history`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionView {
    pub revision: String,
    pub applied_ms: u64,
    pub outcome: String,
}

/// One entry of `GET /v1/workloads/{name}/logs` (newline-delimited JSON): a line of a
/// replica's log, or a device that could not answer (`error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogEntry {
    pub device: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub line: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Something that happened in the fleet (`shoal get events`, the dashboard), in the spirit
/// of Kubernetes events: kept by the hub in a bounded in-memory ring, not persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    /// Increases by one per event, across the hub's life (`/v1/events?after=SEQ`).
    pub seq: u64,
    pub time_ms: u64,
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A CamelCase word: `Scheduled`, `Started`, `Restarted`, `Failed`, `Unhealthy`,
    /// `DeviceJoined`, `DeviceOffline`, `DeviceLost`, `RolloutStarted`, …
    pub reason: String,
    /// What it is about: `workload/web`, `device/d1`.
    pub object: String,
    pub message: String,
}

/// One message of the dashboard's live stream (`GET /v1/stream`, server-sent events):
/// the fleet as it is now, and the events recorded since the previous message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetView {
    pub devices: Vec<DeviceView>,
    pub workloads: Vec<WorkloadView>,
    pub events: Vec<EventView>,
}

/// Answer of `POST /v1/blobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub digest: String,
    pub size: u64,
}

/// Error body of the HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// `POST /v1/enroll`: a device joins with a one-time token and a certificate signing
/// request for the key it generated (the key itself never leaves the device). Its `Debug`
/// leaves the token out.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollRequest {
    /// The whole join token (`SHL1.…`), sent only after the hub proved it holds the CA the
    /// token pins.
    pub token: String,
    pub device: String,
    pub csr: String,
}

/// `POST /v1/renew`, authenticated by the device's current certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenewRequest {
    pub csr: String,
}

/// The answer to an enrollment or renewal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Enrolled {
    /// The device certificate (PEM), its common name the device id.
    pub certificate: String,
    /// The fleet CA (PEM).
    pub ca: String,
    /// The hub's ed25519 public key (base64) that signs desired states.
    pub signing_key: String,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}
