//! The agent's settings, as `app::run` takes them ([`AgentConfig`]).

use shoal_api::endpoint::BrokerUrl;
use shoal_api::ids::DeviceId;
use shoal_daemon::mdns::MdnsOptions;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Agent settings (from flags and environment; see `shoal-agent run --help`).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub device_id: DeviceId,
    pub labels: BTreeMap<String, String>,
    /// The broker; `None`: find the hub of `fleet` over mDNS.
    pub broker: Option<BrokerUrl>,
    /// Memory offered to workloads; default: the machine's total memory.
    pub memory: Option<u64>,
    /// Most replicas this device takes; `None`: no limit.
    pub max_replicas: Option<u32>,
    /// The fleet this device belongs to; hubs of other fleets are ignored.
    pub fleet: String,
    /// mDNS interfaces; `None`: mDNS off (then `broker` is required).
    pub mdns: Option<MdnsOptions>,
    /// The local API's Unix socket; `None`: no local API.
    pub socket: Option<LocalSocket>,
    /// Where Prometheus scrapes `/metrics` over TCP; `None`: only on the local socket.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How to reach the OCI registries `oci://` modules and images come from.
    pub registries: shoal_registry::RegistryConfig,
    /// containerd to run container workloads with; `None`: no container runtime.
    pub containerd: Option<ContainerdOptions>,
    /// Whether the device offers the WASM runtime (`--no-wasm` turns it off).
    pub wasm: bool,
    /// How long a workload's volumes outlive its leaving this device.
    pub volume_retention: Duration,
    /// Plain MQTT and HTTP, no device certificate, desired state not verified (local
    /// development with a hub run `--insecure`).
    pub insecure: bool,
    /// A join token for enrolling (used only while the device has no certificate).
    pub join_token: Option<shoal_pki::token::JoinToken>,
    /// The hub's HTTP API for enrollment, e.g. `https://hub.local:8080`.
    pub hub_url: Option<String>,
}

/// Where containerd listens, and the namespace the agent keeps its containers in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdOptions {
    pub socket: PathBuf,
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSocket {
    pub path: PathBuf,
    /// Given by the user: failing to serve it is an error. The default path is only tried
    /// (it needs root), with a warning if it cannot be used.
    pub explicit: bool,
}
