//! What the agent shows about itself: the local API's answers (`shoal-agent ps`, `status`,
//! `inspect`, `peers`, `restart`) and what its metrics are rendered from.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One replica on this device, as `shoal-agent ps` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaView {
    pub instance: String,
    pub workload: String,
    pub replica: u32,
    pub revision: String,
    /// `wasm` or `container`.
    pub variant: String,
    pub phase: String,
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Memory in use (WASM: linear memories and tables; container: its cgroup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Its memory limit (`spec.resources.memory`).
    pub memory_limit: u64,
    /// CPU time used by all its runs (a container: the current one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_nanos: Option<u64>,
}

/// `shoal-agent status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatusView {
    pub device: String,
    pub fleet: String,
    pub agent_version: String,
    pub runtimes: Vec<String>,
    pub hub: HubLinkView,
    /// Generation of the desired state in force (0: none yet).
    pub generation: u64,
    /// When a desired state last came from the hub (the one in force or the same again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_ms: Option<u64>,
    pub replicas: usize,
    pub running: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskView>,
    pub memory: MemoryView,
    /// When the agent started.
    pub started_at_ms: u64,
}

/// The agent's link to the hub's broker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubLinkView {
    /// `mqtt(s)://HOST:PORT`, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    pub connected: bool,
    /// Since when it has been connected, or disconnected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// Why the last attempt failed, while disconnected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskView {
    pub path: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryView {
    /// Offered to workloads (`--memory`, or the machine's).
    pub offered_bytes: u64,
    /// The sum of the memory limits of the replicas here.
    pub allocated_bytes: u64,
    pub machine_total_bytes: u64,
    pub machine_available_bytes: u64,
    /// The agent's own resident set.
    pub agent_rss_bytes: u64,
}

/// `shoal-agent inspect`: what the hub wants here and what runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InspectView {
    pub workload: String,
    /// The replicas of it in the desired state in force.
    pub desired: Vec<shoal_api::wire::messages::DesiredWorkload>,
    pub observed: Vec<ReplicaView>,
    /// Its log files on this device.
    pub logs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestartView {
    pub restarted: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeersView {
    /// Whether mDNS is on.
    pub mdns: bool,
    pub fleet: String,
    pub hubs: Vec<HubPeer>,
    pub devices: Vec<DevicePeer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubPeer {
    pub instance: String,
    pub fleet: String,
    pub addresses: Vec<String>,
    /// `selected`, `conflict` (another hub of this fleet is used) or `ignored: {reason}`.
    pub state: String,
    pub first_seen_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DevicePeer {
    pub device: String,
    pub arch: String,
    pub runtimes: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub addresses: Vec<String>,
    pub first_seen_ms: u64,
}
