//! Messages carried on the bus (JSON payloads), one per topic in [`crate::wire::topics`].
//!
//! Permissive by design: unknown fields are ignored and most fields default, so peers of
//! different versions keep talking. Each carries `protocol` so a breaking change can be detected.

use crate::model::ids::{DeviceId, Digest, WorkloadName};
use crate::model::workload::{Health, Port, Resources, Restart, Workload};
use crate::wire::manifest::ManifestError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

fn protocol() -> u32 {
    crate::PROTOCOL_VERSION
}

/// How often an agent publishes its status even when nothing changed (a heartbeat: the hub
/// marks a device lost that stays silent past its grace period).
pub const STATUS_PERIOD_MS: u64 = 10_000;

/// The runtime of an agent that compiles and runs WASM modules.
pub const RUNTIME_WASM: &str = "wasm";
/// The runtime of a runtime-only agent (built without a compiler): it runs WASM modules the hub
/// precompiled for it, so only modules the hub stores, not `oci://` ones.
pub const RUNTIME_WASM_PRECOMPILED: &str = "wasm-precompiled";
/// The runtime of an agent that runs OCI containers through containerd.
pub const RUNTIME_CONTAINER: &str = "container";

/// `devices/{d}/hello`: what a device is and can do. Sent on every (re)connect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    #[serde(default = "protocol")]
    pub protocol: u32,
    pub device_id: DeviceId,
    #[serde(default)]
    pub arch: String,
    /// The CPU variant as OCI names it (`v7` on a 32-bit ARMv7 board, `v8` on arm64; see
    /// `oci::native_variant`); absent elsewhere and from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default)]
    pub os: String,
    /// Runtimes the device offers: [`RUNTIME_WASM`] or [`RUNTIME_WASM_PRECOMPILED`], and/or
    /// [`RUNTIME_CONTAINER`].
    #[serde(default)]
    pub runtimes: Vec<String>,
    #[serde(default)]
    pub cpus: u32,
    /// Memory the agent offers to workloads, in bytes.
    #[serde(default)]
    pub memory: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub agent_version: String,
    /// Most replicas the device takes (`shoal-agent run --max-replicas`); absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas: Option<u32>,
    /// What the device lets containers ask for beyond the confined defaults
    /// (`shoal-agent run --allow`; see [`crate::policy::fleet`]). Absent from older agents:
    /// nothing.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::policy::fleet::known_privileges"
    )]
    pub allows: Vec<crate::policy::fleet::Privilege>,
    /// Hardware nodes the agent offers, per class (see [`crate::model::hardware`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: BTreeMap<String, u32>,
}

impl Hello {
    /// A hello that names `device_id` and nothing else: what the hub knows of a device that
    /// enrolled and has not connected yet.
    pub fn announcing(device_id: DeviceId) -> Self {
        Hello {
            allows: Vec::new(),
            protocol: protocol(),
            device_id,
            arch: String::new(),
            variant: None,
            os: String::new(),
            runtimes: Vec::new(),
            cpus: 0,
            memory: 0,
            labels: BTreeMap::new(),
            agent_version: String::new(),
            max_replicas: None,
            devices: BTreeMap::new(),
        }
    }
}

/// The lifecycle phase of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Not placed yet, or placed and not yet acted on by its device.
    Pending,
    /// Fetching the module.
    Pulling,
    /// Compiling/instantiating.
    Starting,
    Running,
    /// Exited successfully and will not be restarted.
    Succeeded,
    /// Exited (or could not start) and will not be restarted.
    Failed,
    /// Exited and waiting out a restart back-off.
    CrashLoopBackOff,
    /// Waiting for the workloads it starts after (`spec.after`) on its device.
    Waiting,
    /// Between the runs of its schedule (`spec.schedule`).
    Scheduled,
}

impl Phase {
    /// Every phase, in lifecycle order (metrics give each one a series so that
    /// `sum by (phase)` has no gaps).
    pub const ALL: [Phase; 9] = [
        Phase::Pending,
        Phase::Pulling,
        Phase::Starting,
        Phase::Running,
        Phase::Succeeded,
        Phase::Failed,
        Phase::CrashLoopBackOff,
        Phase::Waiting,
        Phase::Scheduled,
    ];
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// One workload replica as a device should run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredWorkload {
    pub name: WorkloadName,
    /// Replica index within the workload (0 for `placement: every`).
    #[serde(default)]
    pub replica: u32,
    /// Changes whenever a restart is needed.
    pub revision: String,
    /// The WASM variant's module: a hub blob's digest, or with `oci` the pinned manifest's
    /// digest. Absent when the replica runs its container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<Digest>,
    /// Where to pull the module when it is not a hub blob: a pinned OCI reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<crate::model::oci::OciRef>,
    /// The container variant, when the replica runs it (then `module` is absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<crate::model::workload::Container>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    pub restart: Restart,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uses: Vec<WorkloadName>,
    /// Directories kept on the device for the workload (see [`crate::model::volume`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::model::volume::Volume>,
    /// Outbound connections the WASM guest may open (see [`crate::model::network`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<crate::model::network::NetRule>,
    /// Limits that stop a run (see [`crate::model::workload::RunLimits`]).
    #[serde(
        default,
        skip_serializing_if = "crate::model::workload::RunLimits::is_none"
    )]
    pub limits: crate::model::workload::RunLimits,
    /// Secrets the replica reads, at the version it runs with; their values travel sealed in
    /// [`DesiredState::secrets`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<crate::model::secret::DesiredSecretMount>,
    /// Hardware nodes per class the device hands the replica (`resources.devices`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: crate::model::hardware::DeviceRequests,
    /// The configs the replica reads as files, with this device's values (the variables it
    /// reads from configs are in `env` already).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configs: Vec<crate::model::config::ConfigFiles>,
    /// A job's replica: the run it belongs to and the limits the device enforces (see
    /// [`crate::model::job`]). Absent for services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<crate::model::job::JobRun>,
    /// Workloads whose replica on this device must meet a condition before this one starts
    /// (see [`crate::model::order`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<crate::model::order::After>,
    /// `spec.disconnect.stopAfter`: stop the replica when the broker confirmed nothing of
    /// the device's for this long (see [`crate::model::disconnect`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_after_ms: Option<u64>,
    /// `spec.schedule`: the device fires this replica's runs itself (see
    /// [`crate::model::schedule`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<crate::model::schedule::DesiredSchedule>,
}

impl DesiredWorkload {
    /// Builds a device's view of replica `replica` of `w` running `variant`; `None` when that
    /// variant is missing or its module is not a hub blob or pinned reference (the hub never
    /// stores such workloads).
    pub fn from_workload(
        w: &Workload,
        replica: u32,
        variant: crate::model::workload::Variant,
    ) -> Option<Self> {
        let (module, oci, container) = match variant {
            crate::model::workload::Variant::Wasm => (
                Some(w.digest()?.clone()),
                match &w.module {
                    Some(crate::model::workload::ModuleRef::Oci(r)) => Some(r.clone()),
                    _ => None,
                },
                None,
            ),
            crate::model::workload::Variant::Container => (None, None, Some(w.container.clone()?)),
        };
        Some(Self {
            name: w.name.clone(),
            replica,
            revision: w.revision(),
            module,
            oci,
            container,
            args: w.args.clone(),
            env: w.env.clone(),
            resources: w.resources,
            restart: w.restart,
            health: w.health.clone(),
            ports: w.ports.clone(),
            uses: w.uses.clone(),
            volumes: w.volumes.clone(),
            network: w.network.clone(),
            limits: w.limits,
            devices: w.devices.clone(),
            // The hub resolves them per device (`Self::read_configs`).
            configs: Vec::new(),
            // The hub names the run.
            job: None,
            after: w.after.clone(),
            stop_after_ms: w.disconnect.and_then(|d| d.stop_after_ms),
            schedule: w.schedule.clone(),
            // The hub fills in each secret's version.
            secrets: w
                .secrets
                .iter()
                .map(|m| crate::model::secret::DesiredSecretMount {
                    mount: m.clone(),
                    version: String::new(),
                })
                .collect(),
        })
    }

    /// Fills in where the replica runs (see [`crate::model::downward`]): the references in
    /// its environment and arguments expanded for device `device` with operator labels
    /// `labels`, and the `SHOAL_*` variables added.
    pub fn place_on(&mut self, device: &DeviceId, labels: &BTreeMap<String, String>) {
        use crate::model::downward::{env, expand, Context};
        let ctx = Context {
            device: device.as_str(),
            labels,
            workload: self.name.as_str(),
            replica: self.replica,
            revision: &self.revision,
        };
        for v in self.env.values_mut() {
            *v = expand(v, &ctx);
        }
        for a in &mut self.args {
            *a = expand(a, &ctx);
        }
        self.env.extend(env(&ctx));
    }

    /// Adds what the replica reads from `spec`'s configs (`config_of` gives the version
    /// `spec` pinned) on `device` (operator labels `labels`): files, and variables. After
    /// [`Self::place_on`]: config values are literal, never expanded.
    pub fn read_configs<'a>(
        &mut self,
        spec: &Workload,
        config_of: impl Fn(&crate::model::ids::ConfigName) -> Option<&'a crate::model::config::Config>,
        device: &DeviceId,
        labels: &BTreeMap<String, String>,
    ) {
        let (files, env) =
            crate::model::config::for_device(&spec.configs, config_of, device, labels);
        self.configs = files;
        self.env.extend(env);
    }

    /// The replica's identity on its device, e.g. `hello-0`.
    pub fn instance(&self) -> String {
        instance_name(&self.name, self.replica)
    }
}

/// `{workload}-{replica}`: a replica's identity on a device (also its log file stem).
pub fn instance_name(name: &WorkloadName, replica: u32) -> String {
    format!("{name}-{replica}")
}

/// `devices/{d}/desired` (retained): everything device `d` should run. Level-based: each
/// message replaces the previous one entirely.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredState {
    #[serde(default = "protocol")]
    pub protocol: u32,
    pub device_id: DeviceId,
    /// Strictly increases with every change for this device.
    pub generation: u64,
    /// Base URL where modules are fetched as `{artifactBase}/v1/blobs/{digest}`. Empty: the
    /// hub's own HTTP API at the address the agent knows the hub by (mDNS, else its broker's
    /// host) and `artifactPort`.
    #[serde(default)]
    pub artifact_base: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_port: Option<u16>,
    #[serde(default)]
    pub workloads: Vec<DesiredWorkload>,
    /// The values of the secrets these workloads use, each sealed to this device's key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<crate::model::secret::SealedSecret>,
}

/// What the hub publishes on `devices/{d}/desired`: a [`DesiredState`]'s exact JSON bytes
/// (base64) and the hub's ed25519 signature over them (base64). Agents verify the signature
/// with the key they received at enrollment *before* parsing the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignedDesired {
    pub state: String,
    pub signature: String,
}

/// The observed state of one replica on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    pub name: WorkloadName,
    #[serde(default)]
    pub replica: u32,
    #[serde(default)]
    pub revision: String,
    pub phase: Phase,
    #[serde(default)]
    pub restarts: u32,
    /// Why the replica is not running, in words a person can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Exit status of the last run, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Milliseconds since the Unix epoch when the current run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    /// In `CrashLoopBackOff`: how long the agent waits before the next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u64>,
    /// Which runtime variant runs this replica (`wasm`).
    #[serde(default)]
    pub variant: String,
    /// The health probe's verdict while running; absent without a probe or before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    /// The hardware nodes the replica holds (`resources.devices`), by path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// A job's replica: the run this status is about ([`crate::model::job::JobRun::run`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<u64>,
    /// Milliseconds since the Unix epoch when the replica finished (`Succeeded`/`Failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// A scheduled replica: its next run and its last runs on this device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<crate::model::schedule::ScheduleStatus>,
}

/// `devices/{d}/status` (retained): what the device observes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    #[serde(default = "protocol")]
    pub protocol: u32,
    pub device_id: DeviceId,
    /// The generation of the desired state the device has persisted and is acting on.
    #[serde(default)]
    pub observed_generation: u64,
    #[serde(default)]
    pub workloads: Vec<InstanceStatus>,
    /// Milliseconds since the Unix epoch when the status was produced; strictly increasing
    /// across an agent's reports (hub replicas take them in parallel and order them by it).
    #[serde(default)]
    pub time_ms: u64,
}

/// `hubs/{replica}/ingest`: what one hub replica heard from devices since its last batch,
/// for the other replicas (the leader decides on it, standbys answer reads with it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngestBatch {
    #[serde(default = "protocol")]
    pub protocol: u32,
    /// Statuses whose content changed (or that another replica has older).
    #[serde(default)]
    pub statuses: Vec<DeviceStatus>,
    /// Statuses that only repeated what was known: the device is alive.
    #[serde(default)]
    pub heard: Vec<Heard>,
    /// Devices that enrolled (again) through this replica: their keys may be new, so the
    /// leader seals their secrets anew.
    /// The leader reads what their tokens granted from the enrollment book, not from here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enrolled: Vec<DeviceId>,
}

/// A status that repeated known content: its device, time and content fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heard {
    pub device_id: DeviceId,
    #[serde(default)]
    pub time_ms: u64,
    /// See `DeviceStatus::fingerprint` in the hub: equal content, equal fingerprint.
    #[serde(default)]
    pub fingerprint: String,
}

/// `results/{req}`: the hub's verdict on an apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResult {
    #[serde(default = "protocol")]
    pub protocol: u32,
    #[serde(default)]
    pub request_id: Option<String>,
    pub accepted: bool,
    /// Per accepted workload: `created`, `configured` or `unchanged`.
    #[serde(default)]
    pub workloads: BTreeMap<String, String>,
    /// The same for each accepted secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
    /// The same for each accepted config.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub configs: BTreeMap<String, String>,
    /// Every reason the manifest was rejected (empty when accepted).
    #[serde(default)]
    pub errors: Vec<ManifestError>,
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
/// `devices/{d}/logreq`, hub → device: send lines of a workload's log on
/// `devices/{d}/logs/{request}`. A follow request runs until the hub sends it again with
/// `cancel`, or fails to renew it (publish it again) within `lease_secs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogRequest {
    #[serde(default = "protocol")]
    pub protocol: u32,
    /// The request id (a topic level: letters, digits, `-`).
    pub request: String,
    pub workload: String,
    /// Only the last this many lines of each replica (before following).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<u32>,
    /// Only lines written in the last this many seconds, by the device's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_secs: Option<u64>,
    #[serde(default)]
    pub follow: bool,
    #[serde(default)]
    pub lease_secs: u32,
    #[serde(default)]
    pub cancel: bool,
    /// The device it is for (signed: a request for one device does not work on another).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<DeviceId>,
    /// When the hub issued it, by the hub's clock (signed: an agent refuses one much older
    /// than the newest it took, so an old request cannot be replayed).
    #[serde(default)]
    pub issued_ms: u64,
    /// The hub's signature (ed25519, base64) over [`LogRequest::statement`], made with the
    /// key desired states are signed with. Hubs before it sent none; agents that hold the
    /// hub's key refuse unsigned requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl LogRequest {
    /// The bytes the hub signs: every field but the signature, as one JSON array under a
    /// prefix no desired state (a JSON object) or artifact statement starts with.
    pub fn statement(&self) -> Vec<u8> {
        let fields = (
            "shoal log request v1",
            self.protocol,
            &self.request,
            &self.workload,
            self.tail,
            self.since_secs,
            self.follow,
            self.lease_secs,
            self.cancel,
            self.device_id.as_ref().map(DeviceId::as_str),
            self.issued_ms,
        );
        // Strings, numbers and booleans: serializing cannot fail.
        serde_json::to_vec(&fields).unwrap_or_default()
    }
}

/// Most bytes of log lines in one [`LogChunk`] (a chunk is one MQTT message).
pub const LOG_CHUNK_BYTES: usize = 64 * 1024;

/// `devices/{d}/logs/{request}`, device → hub: lines answering a [`LogRequest`], in `seq`
/// order. The last chunk of a request has `done` (and `error` when it failed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogChunk {
    #[serde(default = "protocol")]
    pub protocol: u32,
    pub device_id: DeviceId,
    pub request: String,
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub lines: Vec<LogLine>,
    #[serde(default)]
    pub done: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One line of one replica's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogLine {
    pub instance: String,
    pub line: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_permissive() {
        let s: DeviceStatus =
            serde_json::from_str(r#"{"deviceId":"e1","futureField":1,"workloads":[{"name":"w","phase":"Running","x":2}]}"#)
                .unwrap();
        assert_eq!(s.protocol, 1);
        assert_eq!(s.workloads[0].phase, Phase::Running);
        let h: Hello = serde_json::from_str(r#"{"deviceId":"e1"}"#).unwrap();
        assert!(h.runtimes.is_empty());
        // but ids are still validated
        assert!(serde_json::from_str::<Hello>(r#"{"deviceId":"E 1"}"#).is_err());
    }
}
