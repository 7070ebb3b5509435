//! Validated workload definitions: what the hub stores and schedules.
//!
//! [`Workload::try_from`] turns a [`WorkloadManifest`] into a [`Workload`] and reports *every*
//! problem it finds, each naming the field, the bad value and the reason. [`parse_workloads`]
//! does this for a whole manifest stream and also rejects duplicate names.

use crate::model::ids::{check_label_key, check_label_value, Digest, WorkloadName};
use crate::model::quantity::{format_memory, parse_cpu, parse_duration, parse_memory};
use crate::model::selector::Selector;
use crate::wire::manifest::{parse_stream, ManifestError, WorkloadManifest};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Memory request and limit of a workload that does not declare `resources.memory`.
pub const DEFAULT_MEMORY: u64 = 64 << 20;
/// Upper bound on `spec.replicas`.
pub const MAX_REPLICAS: u32 = 10_000;
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Placement {
    /// A fixed number of replicas, spread over matching devices.
    Replicas(u32),
    /// One replica on every matching device.
    Every,
}

/// Where a module comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ModuleRef {
    /// A blob held by the hub.
    Digest(Digest),
    /// A file on the operator's machine; only `shoal apply` accepts it (it uploads the file and
    /// replaces the path with its digest). The hub rejects it.
    Path(String),
    /// An OCI artifact in a registry. The hub accepts only pinned references (`shoal apply`
    /// pins a tag to the manifest digest it points at); agents pull it themselves.
    Oci(crate::model::oci::OciRef),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// Whether an exit (`success` = exit status 0) leads to a restart.
    pub fn restarts_after(self, success: bool) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Restart {
    pub policy: RestartPolicy,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// Bytes; both the scheduling request and the enforced limit.
    pub memory: u64,
    /// Millicores; the scheduling request and the enforced share. `None`: no CPU cap.
    pub cpu: Option<u32>,
}

/// `spec.limits`: a WASM run that breaches one is stopped, with the limit as its reason, and
/// restarted by its restart policy (containers are not limited this way yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunLimits {
    /// Most CPU time one run may use, in milliseconds: a guard for jobs and runaway loops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time_ms: Option<u64>,
    /// Most bytes of output per second, averaged over [`RunLimits::LOG_WINDOW_SECS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_bytes_per_sec: Option<u64>,
}

impl RunLimits {
    /// The window output is measured over (a burst within it is fine).
    pub const LOG_WINDOW_SECS: u64 = 10;

    pub fn is_none(&self) -> bool {
        *self == RunLimits::default()
    }
}

/// Which variant of a workload a replica runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Variant {
    Wasm,
    Container,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Wasm => "wasm",
            Variant::Container => "container",
        }
    }
}

/// The container variant of a workload, run through containerd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub image: crate::model::oci::OciRef,
    /// Replaces the image's entrypoint; empty: the image's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    pub read_only_root: bool,
    /// Platforms the image offers; empty: unknown (then no device is filtered out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<crate::model::oci::Platform>,
    /// Between SIGTERM and SIGKILL when stopped (`stopGracePeriod`, default 10s).
    #[serde(default = "default_stop_grace")]
    pub stop_grace_ms: u64,
    /// `capabilities.add` (normalised: `NET_RAW`; see [`crate::model::caps`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// `capabilities.drop` (normalised; `ALL` drops every default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// `supplementalGroups`: extra group ids of the process.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<u32>,
    /// `privileged: true` (see [`crate::policy::fleet`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub privileged: bool,
    /// `devices`: host device nodes by path (see [`crate::policy::fleet`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_devices: Vec<HostDevice>,
}

/// A host device node a container is given by path (`spec.container.devices[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostDevice {
    /// On the device: an absolute, normalized path under `/dev/`.
    pub path: String,
    /// In the container (absolute, normalized; default `path`).
    pub container_path: String,
    /// A non-empty subset of `rwm`, in that order.
    pub permissions: String,
}

/// Most host device nodes one container is given by path.
pub const MAX_HOST_DEVICES: usize = 32;

fn host_devices(
    wire: Vec<crate::wire::manifest::HostDeviceSpec>,
    errs: &mut Vec<String>,
) -> Vec<HostDevice> {
    if wire.len() > MAX_HOST_DEVICES {
        errs.push(format!(
            "spec.container.devices has {} entries: at most {MAX_HOST_DEVICES} are allowed",
            wire.len()
        ));
        return Vec::new();
    }
    let mut out: Vec<HostDevice> = Vec::new();
    for (i, d) in wire.into_iter().enumerate() {
        let field = format!("spec.container.devices[{i}]");
        let before = errs.len();
        let container_path = d.container_path.unwrap_or_else(|| d.path.clone());
        let under_dev = |p: &str| match crate::model::volume::check_shape(p) {
            Ok(()) if !p.starts_with("/dev/") => Err(format!(
                "path {p:?} is invalid: a device node lives under /dev/"
            )),
            r => r,
        };
        if let Err(e) = under_dev(&d.path) {
            errs.push(format!("{field}.path: {e}"));
        }
        if let Err(e) = under_dev(&container_path) {
            errs.push(format!("{field}.containerPath: {e}"));
        } else if let Some(j) = out.iter().position(|o| o.container_path == container_path) {
            errs.push(format!(
                "{field}.containerPath {container_path:?} is given already in spec.container.devices[{j}]"
            ));
        }
        let given = d.permissions.unwrap_or_else(|| "rwm".into());
        let permissions: String = ['r', 'w', 'm']
            .into_iter()
            .filter(|c| given.contains(*c))
            .collect();
        if given.is_empty()
            || given.chars().any(|c| !"rwm".contains(c))
            || given.len() != permissions.len()
        {
            errs.push(format!(
                "{field}.permissions {given:?} is invalid: give r, w and/or m, each once"
            ));
        }
        if errs.len() == before {
            out.push(HostDevice {
                path: d.path,
                container_path,
                permissions,
            });
        }
    }
    out
}

/// `spec.container.stopGracePeriod` when not given, as Kubernetes' default is 30s but edge
/// devices restart more often.
pub const DEFAULT_STOP_GRACE_MS: u64 = 10_000;

fn default_stop_grace() -> u64 {
    DEFAULT_STOP_GRACE_MS
}

/// How a port is made known beyond its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Expose {
    /// Reachable on the device's addresses, but not advertised.
    None,
    /// Advertised as `_{workload}._tcp.local.` by the device that runs the replica.
    Mdns,
}

/// A TCP port a workload listens on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    /// 1–15 characters of `a-z`, `0-9` and `-`; defaults to the port number.
    pub name: String,
    pub port: u16,
    pub expose: Expose,
}

/// `maxUnavailable` or `maxSurge`: a count or a percentage of the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Budget {
    Count(u32),
    Percent(u32),
}

impl Budget {
    /// Replicas that may be unavailable out of `total` when nothing surges: percentages
    /// round down, and at least one is always allowed (replicas are then replaced in place,
    /// so zero would never progress). Drains use it too.
    pub fn of(self, total: u32) -> u32 {
        self.floor(total).max(1)
    }

    /// The budget out of `total`, percentages rounded down.
    pub fn floor(self, total: u32) -> u32 {
        match self {
            Budget::Count(n) => n,
            Budget::Percent(p) => total.saturating_mul(p) / 100,
        }
    }

    /// The budget out of `total`, percentages rounded up (as Kubernetes rounds `maxSurge`).
    pub fn ceil(self, total: u32) -> u32 {
        match self {
            Budget::Count(n) => n,
            Budget::Percent(p) => total.saturating_mul(p).div_ceil(100),
        }
    }

    fn is_zero(&self) -> bool {
        matches!(self, Budget::Count(0) | Budget::Percent(0))
    }
}

fn no_surge() -> Budget {
    Budget::Count(0)
}

/// How a new revision replaces the old one (`spec.update`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdatePolicy {
    pub max_unavailable: Budget,
    /// Extra replicas a rollout may start before it stops old ones; `0`: replace in place.
    #[serde(default = "no_surge")]
    pub max_surge: Budget,
    pub canary: u32,
    pub auto_rollback: bool,
    pub min_ready_ms: u64,
    pub progress_deadline_ms: u64,
}

impl UpdatePolicy {
    /// Extra replicas allowed out of `total` wanted (percentages round up).
    pub fn surge(&self, total: u32) -> u32 {
        self.max_surge.ceil(total)
    }

    /// Replicas that may be unavailable out of `total` wanted. With a surge it may be 0
    /// (new replicas start before old ones stop); without, it is at least 1.
    pub fn unavailable(&self, total: u32) -> u32 {
        if self.surge(total) > 0 {
            self.max_unavailable.floor(total)
        } else {
            self.max_unavailable.of(total)
        }
    }
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        Self {
            max_unavailable: Budget::Percent(25),
            max_surge: no_surge(),
            canary: 0,
            auto_rollback: false,
            min_ready_ms: 0,
            progress_deadline_ms: 600_000,
        }
    }
}

/// What a health probe checks, on the device's loopback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Check {
    /// `GET http://127.0.0.1:{port}{path}` answers 2xx or 3xx.
    Http { port: u16, path: String },
    /// A TCP connection to `127.0.0.1:{port}` opens.
    Tcp { port: u16 },
}

/// `spec.health`: probed while the replica runs; `failure_threshold` failures in a row
/// restart it (per its restart policy) and make it unready for rollouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    pub check: Check,
    pub period_ms: u64,
    pub timeout_ms: u64,
    pub failure_threshold: u32,
}

/// How replicas are spread over eligible devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Strategy {
    /// Fewest replicas of this workload first, then the least loaded device.
    #[default]
    Spread,
    /// The most loaded device that still fits (leaves whole devices free).
    Binpack,
}

/// A validated workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub name: WorkloadName,
    pub labels: BTreeMap<String, String>,
    pub placement: Placement,
    pub selector: Selector,
    /// Topology label to spread replicas across (`spec.spread`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<String>,
    #[serde(default)]
    pub strategy: Strategy,
    /// The WASM variant (`spec.wasm.module`).
    pub module: Option<ModuleRef>,
    /// The container variant (`spec.container`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    pub restart: Restart,
    /// Not part of the revision: changing how updates roll out restarts nothing.
    #[serde(default)]
    pub update: UpdatePolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    pub ports: Vec<Port>,
    pub uses: Vec<WorkloadName>,
    /// `spec.volumes` (see [`crate::model::volume`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::model::volume::Volume>,
    /// `spec.network.allow` (see [`crate::model::network`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<crate::model::network::NetRule>,
    #[serde(default, skip_serializing_if = "RunLimits::is_none")]
    pub limits: RunLimits,
    /// `spec.secrets` (see [`crate::model::secret`]): references only, never values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<crate::model::secret::SecretMount>,
    /// `resources.devices`: hardware nodes per class (see [`crate::model::hardware`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: crate::model::hardware::DeviceRequests,
    /// `spec.configs` (see [`crate::model::config`]): references.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configs: Vec<crate::model::config::ConfigMount>,
    /// The version of each config `configs` names, as the hub pinned it when this revision
    /// was made (empty in a manifest): a new config is a new revision, which rolls out.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub configs_pinned: BTreeMap<crate::model::ids::ConfigName, String>,
    /// The version of each secret `secrets` names, as the hub pinned it when this revision
    /// was made (empty in a manifest): a new value is a new revision, which rolls out.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets_pinned: BTreeMap<crate::model::ids::SecretName, String>,
    /// `spec.completion`: a job (see [`crate::model::job`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<crate::model::job::Completion>,
    /// `spec.after` (see [`crate::model::order`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<crate::model::order::After>,
    /// `spec.disconnect` (see [`crate::model::disconnect`]). Not part of the revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnect: Option<crate::model::disconnect::Disconnect>,
    /// `spec.schedule`, with each run's limits (see [`crate::model::schedule`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<crate::model::schedule::DesiredSchedule>,
}

impl Workload {
    /// A short hash of everything that, when changed, requires running replicas to restart.
    /// Labels are left out: relabelling a workload does not restart it.
    pub fn revision(&self) -> String {
        #[derive(Serialize, Debug)]
        struct RevisionInput<'a> {
            module: &'a Option<ModuleRef>,
            #[serde(skip_serializing_if = "Option::is_none")]
            container: &'a Option<Container>,
            args: &'a [String],
            env: &'a BTreeMap<String, String>,
            resources: &'a Resources,
            restart: &'a Restart,
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            ports: &'a [Port],
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            uses: &'a [WorkloadName],
            #[serde(skip_serializing_if = "Option::is_none")]
            health: &'a Option<Health>,
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            volumes: &'a [crate::model::volume::Volume],
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            network: &'a [crate::model::network::NetRule],
            #[serde(skip_serializing_if = "RunLimits::is_none")]
            limits: &'a RunLimits,
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            secrets: &'a [crate::model::secret::SecretMount],
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            devices: &'a crate::model::hardware::DeviceRequests,
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            configs: &'a [crate::model::config::ConfigMount],
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            configs_pinned: &'a BTreeMap<crate::model::ids::ConfigName, String>,
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            secrets_pinned: &'a BTreeMap<crate::model::ids::SecretName, String>,
            /// A job's `backoffLimit` and `activeDeadline` (what its devices enforce; the
            /// rest of `spec.completion` is the hub's to count, and changes no run).
            #[serde(skip_serializing_if = "Option::is_none")]
            completion: Option<(u32, Option<u64>)>,
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            after: &'a [crate::model::order::After],
            #[serde(skip_serializing_if = "Option::is_none")]
            schedule: &'a Option<crate::model::schedule::DesiredSchedule>,
        }
        // Empty lists are left out so that revisions of workloads written before ports and
        // uses existed do not change (which would restart every replica on upgrade).
        let input = RevisionInput {
            module: &self.module,
            container: &self.container,
            args: &self.args,
            env: &self.env,
            resources: &self.resources,
            restart: &self.restart,
            ports: &self.ports,
            uses: &self.uses,
            health: &self.health,
            volumes: &self.volumes,
            network: &self.network,
            limits: &self.limits,
            secrets: &self.secrets,
            devices: &self.devices,
            configs: &self.configs,
            configs_pinned: &self.configs_pinned,
            secrets_pinned: &self.secrets_pinned,
            completion: self
                .completion
                .map(|c| (c.backoff_limit, c.active_deadline_ms)),
            after: &self.after,
            schedule: &self.schedule,
        };
        // Serializing plain structs and BTreeMaps cannot fail; fall back to Debug regardless.
        let bytes =
            serde_json::to_vec(&input).unwrap_or_else(|_| format!("{input:?}").into_bytes());
        Digest::of(&bytes).hex()[..12].to_string()
    }

    /// The digest that names the module's content: a hub blob's digest, or a pinned OCI
    /// reference's manifest digest. `None` for a path or an unpinned reference.
    pub fn digest(&self) -> Option<&Digest> {
        match self.module.as_ref()? {
            ModuleRef::Digest(d) => Some(d),
            ModuleRef::Oci(r) => r.digest.as_ref(),
            ModuleRef::Path(_) => None,
        }
    }

    /// The variant a device runs, given the runtimes it offers and its architecture (Rust's
    /// `std::env::consts::ARCH`) and CPU variant: the WASM variant wherever the device has
    /// the `wasm` runtime, or the `wasm-precompiled` one and the module is a hub blob (the hub
    /// precompiles only what it stores); otherwise the container, where the device has the `container`
    /// runtime and the image offers a platform it runs (the same choice the device makes when
    /// it pulls: [`crate::model::oci::choose_platform`]), or its platforms are unknown. `None`:
    /// neither.
    pub fn variant_for(
        &self,
        has_runtime: impl Fn(&str) -> bool,
        arch: &str,
        cpu_variant: Option<&str>,
    ) -> Option<Variant> {
        use crate::wire::messages::{RUNTIME_CONTAINER, RUNTIME_WASM, RUNTIME_WASM_PRECOMPILED};
        let wasm = match &self.module {
            Some(ModuleRef::Digest(_)) => {
                has_runtime(RUNTIME_WASM) || has_runtime(RUNTIME_WASM_PRECOMPILED)
            }
            Some(ModuleRef::Oci(_) | ModuleRef::Path(_)) => has_runtime(RUNTIME_WASM),
            None => false,
        };
        if wasm {
            return Some(Variant::Wasm);
        }
        let c = self.container.as_ref()?;
        let platform_ok = c.platforms.is_empty()
            || crate::model::oci::choose_platform(&c.platforms, arch, cpu_variant).is_some();
        (has_runtime(RUNTIME_CONTAINER) && platform_ok).then_some(Variant::Container)
    }

    /// Whether a device with these labels satisfies the selector.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
    }
}

impl TryFrom<WorkloadManifest> for Workload {
    /// Every problem found, each a complete sentence fragment naming field, value and reason.
    type Error = Vec<String>;

    fn try_from(m: WorkloadManifest) -> Result<Self, Vec<String>> {
        let mut errs = Vec::new();
        if m.api_version != crate::API_VERSION {
            errs.push(format!(
                "apiVersion {:?} is not supported: expected {:?}",
                m.api_version,
                crate::API_VERSION
            ));
        }
        if m.kind != "Workload" {
            errs.push(format!(
                "kind {:?} is not supported: expected \"Workload\"",
                m.kind
            ));
        }
        let name = WorkloadName::try_from(m.metadata.name.as_str())
            .map_err(|e| errs.push(format!("metadata.name: {e}")))
            .ok();
        check_labels("metadata.labels", &m.metadata.labels, &mut errs);
        let mut spec = m.spec;

        let placement = match (spec.replicas, spec.placement.as_deref()) {
            (Some(_), Some(p)) => {
                errs.push(format!(
                    "spec.replicas and spec.placement {p:?} are mutually exclusive: give one"
                ));
                None
            }
            (_, Some("every")) => Some(Placement::Every),
            (_, Some(other)) => {
                errs.push(format!(
                    "spec.placement {other:?} is invalid: the only placement is \"every\" (or use spec.replicas)"
                ));
                None
            }
            (Some(0), None) => Some(Placement::Replicas(0)),
            (Some(n), None) if n > MAX_REPLICAS => {
                errs.push(format!(
                    "spec.replicas {n} is invalid: must be at most {MAX_REPLICAS}"
                ));
                None
            }
            (Some(n), None) => Some(Placement::Replicas(n)),
            (None, None) => Some(Placement::Replicas(1)),
        };
        let selector = crate::model::selector::validate("spec.selector", &spec.selector, &mut errs);
        if let Some(key) = &spec.spread {
            if let Err(e) = check_label_key(key) {
                errs.push(format!("spec.spread: {e}"));
            }
        }
        let strategy = match spec.strategy.as_deref() {
            None | Some("spread") => Strategy::Spread,
            Some("binpack") => Strategy::Binpack,
            Some(other) => {
                errs.push(format!(
                    "spec.strategy {other:?} is invalid: expected \"spread\" or \"binpack\""
                ));
                Strategy::Spread
            }
        };

        // `variants` is None when a variant is invalid (already reported).
        let wasm = spec
            .wasm
            .map(|w| module_ref(&w.module, w.sha256.as_deref(), &mut errs));
        let container = spec.container.map(|c| container(c, &mut errs));
        let variants = match (wasm, container) {
            (None, None) => {
                errs.push(
                    "spec.wasm or spec.container is required: give spec.wasm.module, spec.container.image, or both"
                        .to_string(),
                );
                None
            }
            (Some(None), _) | (_, Some(None)) => None,
            (w, c) => Some((w.flatten(), c.flatten())),
        };

        for k in spec.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                errs.push(format!(
                    "spec.env: name {k:?} is invalid: must be non-empty without '=' or NUL"
                ));
            }
        }
        for (k, v) in &spec.env {
            if v.contains('\0') {
                errs.push(format!(
                    "spec.env.{k}: value {v:?} is invalid: must not contain NUL"
                ));
            }
        }
        for a in &spec.args {
            if a.contains('\0') {
                errs.push(format!("spec.args: {a:?} is invalid: must not contain NUL"));
            }
        }
        crate::model::downward::check(&spec.env, &spec.args, &mut errs);

        let res = spec.resources.unwrap_or_default();
        let memory = match res.memory.as_deref() {
            None => Some(DEFAULT_MEMORY),
            Some(s) => parse_memory(s)
                .map_err(|e| errs.push(format!("spec.resources.memory: {e}")))
                .ok(),
        };
        let devices = crate::model::hardware::validate_requests(
            "spec.resources.devices",
            &res.devices,
            &mut errs,
        );
        let cpu = match res.cpu.as_deref() {
            None => Some(None),
            Some(s) => parse_cpu(s)
                .map(Some)
                .map_err(|e| errs.push(format!("spec.resources.cpu: {e}")))
                .ok(),
        };

        let schedule = spec.schedule.take().map(|s| {
            let policy = spec.restart.as_ref().and_then(|r| r.policy.as_deref());
            if policy == Some("Always") {
                errs.push(
                    "spec.restart.policy \"Always\" is invalid with spec.schedule: each run would never finish; use OnFailure or Never"
                        .to_string(),
                );
            }
            if spec.update.is_some() {
                errs.push(
                    "spec.update is invalid with spec.schedule: scheduled runs do not roll out, the next run takes the new spec"
                        .to_string(),
                );
            }
            let c = spec.completion.take().unwrap_or_default();
            let (backoff_limit, active_deadline_ms) =
                crate::model::job::run_limits(&c, policy, &mut errs);
            crate::model::schedule::validate(s, Some(&c), &mut errs).map(|schedule| {
                crate::model::schedule::DesiredSchedule {
                    schedule,
                    backoff_limit,
                    active_deadline_ms,
                }
            })
        });
        let completion = spec.completion.and_then(|c| {
            let cx = crate::model::job::Context {
                every: placement == Some(Placement::Every),
                replicas: spec.replicas,
                restart_policy: spec.restart.as_ref().and_then(|r| r.policy.as_deref()),
                update_given: spec.update.is_some(),
            };
            crate::model::job::validate(c, &cx, &mut errs)
        });
        let job_restart_default = (completion.is_some() || schedule.is_some())
            && spec.restart.as_ref().is_none_or(|r| r.policy.is_none());
        let mut restart = restart(spec.restart.unwrap_or_default(), &mut errs);
        if let (true, Some(r)) = (job_restart_default, restart.as_mut()) {
            r.policy = RestartPolicy::OnFailure;
        }
        let placement = match (placement, completion) {
            (Some(Placement::Replicas(_)), Some(c)) => Some(Placement::Replicas(c.completions)),
            (p, _) => p,
        };
        let update = update(spec.update.unwrap_or_default(), &mut errs);
        let after = crate::model::order::validate(spec.after, name.as_ref(), &mut errs);
        let stop_grace = variants
            .as_ref()
            .and_then(|(_, c)| c.as_ref())
            .map_or(0, |c| c.stop_grace_ms);
        let disconnect = spec.disconnect.and_then(|d| {
            crate::model::disconnect::validate(
                d,
                placement == Some(Placement::Every),
                stop_grace,
                &mut errs,
            )
        });
        if placement == Some(Placement::Every) && !update.max_surge.is_zero() {
            errs.push(
                "spec.update.maxSurge is invalid with placement \"every\": each device runs one replica, which is replaced in place"
                    .to_string(),
            );
        }
        let health = spec.health.and_then(|h| health(h, &mut errs));
        let ports = ports(name.as_ref(), spec.ports, &mut errs);
        let uses = uses(spec.uses, &mut errs);
        let volumes = crate::model::volume::validate(spec.volumes, &mut errs);
        let network = crate::model::network::validate(
            spec.network.map(|n| n.allow).unwrap_or_default(),
            &mut errs,
        );
        let limits = run_limits(spec.limits, &mut errs);
        let mut taken = crate::model::refs::volumes(&volumes);
        let secrets =
            crate::model::secret::validate_mounts(spec.secrets, &spec.env, &mut taken, &mut errs);
        let configs =
            crate::model::config::validate_mounts(spec.configs, &spec.env, &mut taken, &mut errs);

        match (name, placement, variants, memory, cpu, restart) {
            (
                Some(name),
                Some(placement),
                Some((module, container)),
                Some(memory),
                Some(cpu),
                Some(restart),
            ) if errs.is_empty() => Ok(Workload {
                name,
                labels: m.metadata.labels,
                placement,
                selector,
                spread: spec.spread,
                strategy,
                module,
                container,
                args: spec.args,
                env: spec.env,
                resources: Resources { memory, cpu },
                restart,
                update,
                health,
                ports,
                uses,
                volumes,
                network,
                limits,
                secrets,
                devices,
                configs,
                configs_pinned: BTreeMap::new(),
                secrets_pinned: BTreeMap::new(),
                completion,
                after,
                disconnect,
                schedule: schedule.flatten(),
            }),
            _ => Err(errs),
        }
    }
}

fn run_limits(l: Option<crate::wire::manifest::Limits>, errs: &mut Vec<String>) -> RunLimits {
    let Some(l) = l else {
        return RunLimits::default();
    };
    let cpu_time_ms = l.cpu_time.and_then(|s| match parse_duration(&s) {
        Ok(d) if !d.is_zero() => Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        Ok(_) => {
            errs.push(format!(
                "spec.limits.cpuTime {s:?} is invalid: must be more than 0"
            ));
            None
        }
        Err(e) => {
            errs.push(format!("spec.limits.cpuTime: {e}"));
            None
        }
    });
    let log_bytes_per_sec = l.log_rate.and_then(|s| match parse_memory(&s) {
        Ok(0) => {
            errs.push(format!(
                "spec.limits.logRate {s:?} is invalid: must be more than 0 (bytes per second)"
            ));
            None
        }
        Ok(n) => Some(n),
        Err(_) => {
            errs.push(format!(
                "spec.limits.logRate {s:?} is invalid: expected bytes per second like 64Ki or 1Mi"
            ));
            None
        }
    });
    RunLimits {
        cpu_time_ms,
        log_bytes_per_sec,
    }
}

fn ports(
    workload: Option<&WorkloadName>,
    wire: Vec<crate::wire::manifest::Port>,
    errs: &mut Vec<String>,
) -> Vec<Port> {
    let mut out: Vec<Port> = Vec::new();
    let mut seen_ports = std::collections::BTreeSet::new();
    let mut seen_names = std::collections::BTreeSet::new();
    for (i, p) in wire.into_iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let before = errs.len();
        let number = u16::try_from(p.port).ok().filter(|n| *n != 0);
        if number.is_none() {
            errs.push(format!(
                "{field}.port {} is invalid: must be 1-65535",
                p.port
            ));
        }
        match p.protocol.as_deref() {
            None | Some("tcp") => {}
            Some(other) => errs.push(format!(
                "{field}.protocol {other:?} is not supported: only \"tcp\""
            )),
        }
        let expose = match p.expose.as_deref() {
            None | Some("none") => Expose::None,
            Some("mdns") => Expose::Mdns,
            Some(other) => {
                errs.push(format!(
                    "{field}.expose {other:?} is invalid: expected \"mdns\" or \"none\""
                ));
                Expose::None
            }
        };
        let name = p
            .name
            .clone()
            .unwrap_or_else(|| number.map(|n| n.to_string()).unwrap_or_default());
        if let (Some(_), Err(e)) = (&p.name, crate::wire::discovery::check_port_name(&name)) {
            errs.push(format!("{field}.name: {e}"));
        }
        if let Some(n) = number {
            if !seen_ports.insert(n) {
                errs.push(format!("{field}.port {n} is declared twice"));
            }
        }
        if !name.is_empty() && !seen_names.insert(name.clone()) {
            errs.push(format!("{field}.name {name:?} is declared twice"));
        }
        if expose == Expose::Mdns {
            if let Some(Err(e)) =
                workload.map(|w| crate::wire::discovery::check_service_name(w.as_str()))
            {
                errs.push(format!(
                    "{field}.expose: mdns advertises the workload under its name, but {e}; rename the workload or drop expose"
                ));
            }
        }
        if let (Some(port), true) = (number, errs.len() == before) {
            out.push(Port { name, port, expose });
        }
    }
    out
}

fn uses(wire: Vec<String>, errs: &mut Vec<String>) -> Vec<WorkloadName> {
    let mut out: Vec<WorkloadName> = Vec::new();
    for (i, u) in wire.iter().enumerate() {
        match WorkloadName::try_from(u.as_str()) {
            Err(e) => errs.push(format!("spec.uses[{i}]: {e}")),
            Ok(n) => match crate::wire::discovery::check_service_name(u) {
                Err(e) => errs.push(format!("spec.uses[{i}] can never be found: {e}")),
                Ok(()) if out.contains(&n) => {
                    errs.push(format!("spec.uses[{i}] {u:?} is listed twice"))
                }
                Ok(()) => out.push(n),
            },
        }
    }
    out
}

fn check_labels(field: &str, labels: &BTreeMap<String, String>, errs: &mut Vec<String>) {
    for (k, v) in labels {
        if let Err(e) = check_label_key(k) {
            errs.push(format!("{field}: {e}"));
        }
        if let Err(e) = check_label_value(v) {
            errs.push(format!("{field}.{k}: {e}"));
        }
    }
}

fn module_ref(module: &str, sha256: Option<&str>, errs: &mut Vec<String>) -> Option<ModuleRef> {
    let expected = match sha256 {
        None => None,
        Some(s) => {
            let full = if s.starts_with("sha256:") {
                s.to_string()
            } else {
                format!("sha256:{s}")
            };
            match full.parse::<Digest>() {
                Ok(d) => Some(d),
                Err(e) => {
                    errs.push(format!("spec.wasm.sha256: {e}"));
                    return None;
                }
            }
        }
    };
    if module.is_empty() {
        errs.push("spec.wasm.module is empty: give a sha256:<hex> digest or a file path".into());
        return None;
    }
    if module.starts_with("sha256:") {
        return match module.parse::<Digest>() {
            Ok(d) => {
                if let Some(x) = expected.filter(|x| *x != d) {
                    errs.push(format!(
                        "spec.wasm.sha256 {:?} does not match spec.wasm.module {:?}",
                        x.as_str(),
                        d.as_str()
                    ));
                    return None;
                }
                Some(ModuleRef::Digest(d))
            }
            Err(e) => {
                errs.push(format!("spec.wasm.module: {e}"));
                None
            }
        };
    }
    if module.starts_with(crate::model::oci::SCHEME) {
        if expected.is_some() {
            errs.push(format!(
                "spec.wasm.sha256 is invalid with an OCI module {module:?}: pin the reference itself (REPOSITORY@sha256:...)"
            ));
            return None;
        }
        return match module.parse::<crate::model::oci::OciRef>() {
            Ok(r) => Some(ModuleRef::Oci(r)),
            Err(e) => {
                errs.push(format!("spec.wasm.module: {e}"));
                None
            }
        };
    }
    if let Some((scheme, _)) = module.split_once("://") {
        errs.push(format!(
            "spec.wasm.module {module:?} is not supported: {scheme}:// is not a module source; give oci://REGISTRY/REPOSITORY:TAG, a sha256:<hex> digest of a blob pushed with `shoal push`, or a file path for `shoal apply`"
        ));
        return None;
    }
    Some(ModuleRef::Path(module.to_string()))
}

fn health(h: crate::wire::manifest::Health, errs: &mut Vec<String>) -> Option<Health> {
    let port = |field: &str, p: i64, errs: &mut Vec<String>| {
        let ok = u16::try_from(p).ok().filter(|p| *p != 0);
        if ok.is_none() {
            errs.push(format!("{field} {p} is invalid: must be 1-65535"));
        }
        ok
    };
    let check = match (h.http_get, h.tcp_socket) {
        (Some(g), None) => {
            let path = g.path.unwrap_or_else(|| "/".to_string());
            if !path.starts_with('/') || path.contains(char::is_whitespace) {
                errs.push(format!(
                    "spec.health.httpGet.path {path:?} is invalid: must start with '/' and have no spaces"
                ));
            }
            port("spec.health.httpGet.port", g.port, errs).map(|port| Check::Http { port, path })
        }
        (None, Some(t)) => {
            port("spec.health.tcpSocket.port", t.port, errs).map(|port| Check::Tcp { port })
        }
        (Some(_), Some(_)) => {
            errs.push("spec.health: give one of httpGet and tcpSocket, not both".to_string());
            None
        }
        (None, None) => {
            errs.push("spec.health: give httpGet or tcpSocket".to_string());
            None
        }
    };
    let ms = |field: &str, v: Option<&str>, default: u64, errs: &mut Vec<String>| match v {
        None => default,
        Some(s) => match parse_duration(s) {
            Ok(d) if !d.is_zero() => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            Ok(_) => {
                errs.push(format!("{field} {s:?} is invalid: must be more than zero"));
                default
            }
            Err(e) => {
                errs.push(format!("{field}: {e}"));
                default
            }
        },
    };
    let period_ms = ms("spec.health.period", h.period.as_deref(), 10_000, errs);
    let timeout_ms = ms("spec.health.timeout", h.timeout.as_deref(), 1_000, errs);
    let failure_threshold = h.failure_threshold.unwrap_or(3);
    if failure_threshold == 0 {
        errs.push("spec.health.failureThreshold 0 is invalid: must be at least 1".to_string());
    }
    check.map(|check| Health {
        check,
        period_ms,
        timeout_ms,
        failure_threshold: failure_threshold.max(1),
    })
}

/// `spec.container`, validated.
fn container(c: crate::wire::manifest::ContainerSpec, errs: &mut Vec<String>) -> Option<Container> {
    let image = if c.image.starts_with(crate::model::oci::SCHEME) {
        c.image
            .parse::<crate::model::oci::OciRef>()
            .map_err(|e| errs.push(format!("spec.container.image: {e}")))
            .ok()
    } else {
        errs.push(format!(
            "spec.container.image {:?} is invalid: give oci://REGISTRY/REPOSITORY:TAG (or @sha256:...)",
            c.image
        ));
        None
    };
    let mut platforms = Vec::new();
    for p in &c.platforms {
        match p.parse::<crate::model::oci::Platform>() {
            Ok(p) if !platforms.contains(&p) => platforms.push(p),
            Ok(_) => {}
            Err(e) => errs.push(format!("spec.container.platforms: {e}")),
        }
    }
    let stop_grace_ms = match c.stop_grace_period.as_deref().map(parse_duration) {
        None => DEFAULT_STOP_GRACE_MS,
        Some(Ok(d)) if d <= Duration::from_secs(3600) => d.as_millis() as u64,
        Some(Ok(_)) => {
            errs.push(format!(
                "spec.container.stopGracePeriod {:?} is invalid: at most 1h",
                c.stop_grace_period.unwrap_or_default()
            ));
            return None;
        }
        Some(Err(e)) => {
            errs.push(format!("spec.container.stopGracePeriod: {e}"));
            return None;
        }
    };
    let caps = c.capabilities.unwrap_or_default();
    let (cap_add, cap_drop) =
        crate::model::caps::validate("spec.container.capabilities", &caps.add, &caps.drop, errs);
    let mut groups = Vec::new();
    for (i, g) in c.supplemental_groups.iter().enumerate() {
        match g
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n != u32::MAX)
        {
            Some(_) if groups.len() >= 32 => {
                errs.push("spec.container.supplementalGroups: more than 32 groups".to_string());
                break;
            }
            Some(n) if !groups.contains(&n) => groups.push(n),
            Some(_) => {}
            None => errs.push(format!(
                "spec.container.supplementalGroups[{i}] {g} is invalid: give a group id (a number; a name like dialout has different ids in different images)"
            )),
        }
    }
    let privileged = c.privileged.unwrap_or(false);
    if privileged && !c.devices.is_empty() {
        errs.push(
            "spec.container.devices is not needed with privileged: every device node is there, at its own path"
                .to_string(),
        );
    }
    let host_devices = host_devices(c.devices, errs);
    Some(Container {
        cap_add,
        cap_drop,
        groups,
        privileged,
        host_devices,
        image: image?,
        command: c.command,
        read_only_root: c.read_only_root_filesystem.unwrap_or(true),
        platforms,
        stop_grace_ms,
    })
}

/// A count (`1`) or a percentage (`"25%"`, at most 100).
fn budget(v: &serde_json::Value) -> Option<Budget> {
    match v {
        serde_json::Value::Number(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Budget::Count),
        serde_json::Value::String(s) => s
            .strip_suffix('%')
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| *n <= 100)
            .map(Budget::Percent),
        _ => None,
    }
}

fn update(u: crate::wire::manifest::Update, errs: &mut Vec<String>) -> UpdatePolicy {
    let mut p = UpdatePolicy::default();
    if let Some(v) = &u.max_unavailable {
        match budget(v) {
            Some(b) => p.max_unavailable = b,
            None => errs.push(format!(
                "spec.update.maxUnavailable {v} is invalid: expected a count (1) or a percentage (\"25%\")"
            )),
        }
    }
    if let Some(v) = &u.max_surge {
        match budget(v) {
            Some(b) => p.max_surge = b,
            None => errs.push(format!(
                "spec.update.maxSurge {v} is invalid: expected a count (1) or a percentage (\"25%\")"
            )),
        }
    }
    if u.max_unavailable.is_some() && p.max_unavailable.is_zero() && p.max_surge.is_zero() {
        errs.push(
            "spec.update: maxUnavailable and maxSurge are both 0: a rollout could never replace a replica; allow one of them"
                .to_string(),
        );
    }
    p.canary = u.canary.unwrap_or(0);
    p.auto_rollback = u.auto_rollback.unwrap_or(false);
    p.min_ready_ms = u64::from(u.min_ready_seconds.unwrap_or(0)) * 1000;
    let deadline_ok = match &u.progress_deadline {
        Some(d) => match parse_duration(d) {
            Ok(d) => {
                p.progress_deadline_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                true
            }
            Err(e) => {
                errs.push(format!("spec.update.progressDeadline: {e}"));
                false
            }
        },
        None => true,
    };
    if deadline_ok && p.progress_deadline_ms <= p.min_ready_ms {
        let given = match &u.progress_deadline {
            Some(d) => format!("{d:?}"),
            None => format!(
                "(the default, {})",
                crate::model::quantity::format_duration_ms(p.progress_deadline_ms)
            ),
        };
        errs.push(format!(
            "spec.update.progressDeadline {given} is invalid: must be longer than minReadySeconds ({}s), or no replica could ever count as ready in time",
            p.min_ready_ms / 1000
        ));
    }
    p
}

fn restart(r: crate::wire::manifest::Restart, errs: &mut Vec<String>) -> Option<Restart> {
    let policy = match r.policy.as_deref() {
        None | Some("Always") => Some(RestartPolicy::Always),
        Some("OnFailure") => Some(RestartPolicy::OnFailure),
        Some("Never") => Some(RestartPolicy::Never),
        Some(other) => {
            errs.push(format!(
                "spec.restart.policy {other:?} is invalid: expected Always, OnFailure or Never"
            ));
            None
        }
    };
    let b = r.backoff.unwrap_or_default();
    let dur = |field: &str, v: Option<&str>, default: Duration, errs: &mut Vec<String>| match v {
        None => Some(default),
        Some(s) => parse_duration(s)
            .map_err(|e| errs.push(format!("{field}: {e}")))
            .ok(),
    };
    let initial = dur(
        "spec.restart.backoff.initial",
        b.initial.as_deref(),
        DEFAULT_BACKOFF_INITIAL,
        errs,
    );
    let max = dur(
        "spec.restart.backoff.max",
        b.max.as_deref(),
        DEFAULT_BACKOFF_MAX,
        errs,
    );
    let (initial, max) = (initial?, max?);
    if initial < Duration::from_millis(10) {
        errs.push(format!(
            "spec.restart.backoff.initial {:?} is invalid: must be at least 10ms",
            b.initial.unwrap_or_default()
        ));
        return None;
    }
    if max < initial {
        errs.push(format!(
            "spec.restart.backoff.max {:?} is invalid: must not be below initial ({}ms)",
            b.max.unwrap_or_default(),
            initial.as_millis()
        ));
        return None;
    }
    Some(Restart {
        policy: policy?,
        initial_backoff_ms: initial.as_millis() as u64,
        max_backoff_ms: max.as_millis() as u64,
    })
}

/// Parses and validates the workloads of a manifest stream (its secrets are checked and
/// dropped). All-or-nothing: any error rejects the lot.
pub fn parse_workloads(text: &str) -> Result<Vec<Workload>, Vec<ManifestError>> {
    let stream = parse_stream(text)?;
    validate_all(stream.workloads)
}

/// Validates already-parsed documents (see [`parse_workloads`]).
pub fn validate_all(
    docs: Vec<crate::wire::manifest::Located<WorkloadManifest>>,
) -> Result<Vec<Workload>, Vec<ManifestError>> {
    let mut errors = Vec::new();
    let mut out: Vec<(usize, Workload)> = Vec::new();
    for (n, m) in docs {
        let hint = Some(m.metadata.name.clone());
        match Workload::try_from(m) {
            Ok(w) => out.push((n, w)),
            Err(es) => errors.extend(es.into_iter().map(|message| ManifestError {
                document: n,
                kind: None,
                workload: hint.clone(),
                message,
            })),
        }
    }
    let mut seen = BTreeMap::new();
    for (n, w) in &out {
        if let Some(first) = seen.insert(w.name.clone(), *n) {
            errors.push(ManifestError {
                document: *n,
                kind: None,
                workload: Some(w.name.to_string()),
                message: format!(
                    "metadata.name {:?} is duplicated: already defined in document {first}",
                    w.name.as_str()
                ),
            });
        }
    }
    if errors.is_empty() {
        Ok(out.into_iter().map(|(_, w)| w).collect())
    } else {
        Err(errors)
    }
}

/// Human summary of resources, e.g. `memory 16Mi, cpu 100m`.
pub fn describe_resources(r: &Resources) -> String {
    match r.cpu {
        Some(c) => format!("memory {}, cpu {c}m", format_memory(r.memory)),
        None => format!("memory {}, cpu unlimited", format_memory(r.memory)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: shoal.dev/v1
kind: Workload
metadata: { name: hello, labels: { app: demo } }
spec:
  replicas: 2
  selector: { zone: a }
  wasm: { module: "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" }
  args: ["--x"]
  env: { GREETING: hi }
  resources: { memory: 16Mi, cpu: 100m }
  restart: { policy: OnFailure, backoff: { initial: 200ms, max: 5s } }
---
apiVersion: shoal.dev/v1
kind: Workload
metadata: { name: sensor }
spec:
  placement: every
  wasm: { module: ./sensor.wasm }
"#;

    #[test]
    fn parses_good_stream() {
        let ws = parse_workloads(GOOD).unwrap();
        assert_eq!(ws.len(), 2);
        assert_eq!(ws[0].placement, Placement::Replicas(2));
        assert_eq!(
            ws[0].resources,
            Resources {
                memory: 16 << 20,
                cpu: Some(100)
            }
        );
        assert_eq!(ws[0].restart.policy, RestartPolicy::OnFailure);
        assert_eq!(ws[0].restart.initial_backoff_ms, 200);
        assert_eq!(ws[1].placement, Placement::Every);
        assert_eq!(ws[1].module, Some(ModuleRef::Path("./sensor.wasm".into())));
        assert_eq!(ws[1].resources.memory, DEFAULT_MEMORY);
    }

    #[test]
    fn json_array_is_accepted() {
        let ws = parse_workloads(GOOD).unwrap();
        let _ = ws;
        let json = r#"[{"apiVersion":"shoal.dev/v1","kind":"Workload","metadata":{"name":"a"},"spec":{"wasm":{"module":"x.wasm"}}}]"#;
        assert_eq!(parse_workloads(json).unwrap().len(), 1);
    }

    #[test]
    fn revision_tracks_spec_not_labels() {
        let ws = parse_workloads(GOOD).unwrap();
        let mut a = ws[0].clone();
        let r0 = a.revision();
        a.labels.insert("x".into(), "y".into());
        assert_eq!(a.revision(), r0);
        a.env.insert("K".into(), "V".into());
        assert_ne!(a.revision(), r0);
    }

    #[test]
    fn every_error_is_reported() {
        let bad = r#"
apiVersion: shoal.dev/v2
kind: Pod
metadata: { name: Bad_Name }
spec:
  replicas: 1
  placement: every
  selector: { "bad key": x }
  resources: { memory: 16MB, cpu: lots }
  restart: { policy: Sometimes }
"#;
        let errs = parse_workloads(bad).unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 9, "{text:#?}");
        assert!(text
            .iter()
            .all(|t| t.starts_with("document 1 (workload \"Bad_Name\")")));
    }

    #[test]
    fn ports_and_uses_are_validated() {
        let doc = |spec: &str| {
            format!("apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: greeter }}\nspec:\n  wasm: {{ module: x.wasm }}\n{spec}")
        };
        let w = &parse_workloads(&doc(
            "  ports: [{ port: 8080, expose: mdns }, { name: admin, port: 9000 }]\n  uses: [store]\n",
        ))
        .unwrap()[0];
        assert_eq!(
            w.ports,
            vec![
                Port {
                    name: "8080".into(),
                    port: 8080,
                    expose: Expose::Mdns
                },
                Port {
                    name: "admin".into(),
                    port: 9000,
                    expose: Expose::None
                },
            ]
        );
        assert_eq!(w.uses, vec![WorkloadName::try_from("store").unwrap()]);
        let errs = parse_workloads(&doc(
            "  ports: [{ port: 70000 }, { port: 80, protocol: udp, expose: dns }, { port: 80, name: Web }]\n  uses: [Bad, a-service-name-longer-than-15]\n",
        ))
        .unwrap_err();
        let all: Vec<String> = errs.iter().map(|e| e.message.clone()).collect();
        for needle in [
            "spec.ports[0].port 70000 is invalid",
            "spec.ports[1].protocol \"udp\" is not supported",
            "spec.ports[1].expose \"dns\" is invalid",
            "spec.ports[2].name: port name \"Web\" is invalid",
            "spec.uses[0]",
            "spec.uses[1] can never be found: service name \"a-service-name-longer-than-15\"",
        ] {
            assert!(
                all.iter().any(|m| m.contains(needle)),
                "{needle} not in {all:#?}"
            );
        }
        let long = doc("  ports: [{ port: 80, expose: mdns }]\n")
            .replace("greeter", "a-very-long-greeter");
        let errs = parse_workloads(&long).unwrap_err();
        assert!(errs[0].message.contains("1-15 (RFC 6335)"), "{errs:?}");
        // The same port twice.
        let errs = parse_workloads(&doc("  ports: [{ port: 80 }, { port: 80, name: again }]\n"))
            .unwrap_err();
        assert!(
            errs[0].message.contains("port 80 is declared twice"),
            "{errs:?}"
        );
    }

    #[test]
    fn revision_without_ports_is_unchanged_by_their_introduction() {
        // The revision computed by the code before ports and uses existed: it must not change
        // (every replica would restart on upgrade).
        let w = &parse_workloads(GOOD).unwrap()[0];
        assert_eq!(w.revision(), "a081638dc26f");
        let mut with = w.clone();
        with.ports.push(Port {
            name: "80".into(),
            port: 80,
            expose: Expose::None,
        });
        assert_ne!(with.revision(), w.revision());
    }

    #[test]
    fn runtime_only_devices_run_hub_blobs_only() {
        let doc = |module: &str| {
            format!("apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: w }}\nspec:\n  wasm: {{ module: \"{module}\" }}\n")
        };
        let blob = format!("sha256:{}", "ab".repeat(32));
        let oci = format!("oci://localhost:5000/m@sha256:{}", "cd".repeat(32));
        let has = |rs: &'static [&'static str]| move |r: &str| rs.contains(&r);
        for (module, runtimes, want) in [
            (&blob, &["wasm-precompiled"][..], Some(Variant::Wasm)),
            (&blob, &["wasm"][..], Some(Variant::Wasm)),
            (&oci, &["wasm"][..], Some(Variant::Wasm)),
            (&oci, &["wasm-precompiled"][..], None),
            (&oci, &["wasm-precompiled", "container"][..], None),
        ] {
            let w = parse_workloads(&doc(module)).unwrap().remove(0);
            assert_eq!(
                w.variant_for(has(runtimes), "aarch64", None),
                want,
                "{module} on {runtimes:?}"
            );
        }
    }

    #[test]
    fn containers_validate_and_pick_a_variant_per_device() {
        let doc = |spec: &str| {
            format!("apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: box }}\nspec:\n{spec}")
        };
        let both = parse_workloads(&doc(
            "  wasm: { module: ./m.wasm }\n  container: { image: \"oci://localhost:5000/box:1\", platforms: [linux/arm64, linux/arm/v7] }\n",
        ))
        .unwrap()
        .remove(0);
        let c = both.container.as_ref().unwrap();
        assert!(c.read_only_root && c.command.is_empty());
        assert_eq!(c.stop_grace_ms, DEFAULT_STOP_GRACE_MS);
        assert_eq!(c.platforms.len(), 2);
        let has = |rs: &'static [&'static str]| move |r: &str| rs.contains(&r);
        // (runtimes, arch) → variant: WASM wherever possible; containers where the platform fits.
        for (runtimes, arch, want) in [
            (&["wasm", "container"][..], "aarch64", Some(Variant::Wasm)),
            (&["wasm"][..], "x86_64", Some(Variant::Wasm)),
            (&["container"][..], "aarch64", Some(Variant::Container)),
            (&["container"][..], "arm", Some(Variant::Container)),
            (&["container"][..], "x86_64", None),
            (&[][..], "aarch64", None),
        ] {
            assert_eq!(
                both.variant_for(has(runtimes), arch, None),
                want,
                "{runtimes:?} {arch}"
            );
        }
        let only = parse_workloads(&doc(
            "  container: { image: \"oci://localhost:5000/box:1\" }\n",
        ))
        .unwrap()
        .remove(0);
        assert_eq!(only.variant_for(has(&["wasm"]), "x86_64", None), None);
        assert_eq!(
            only.variant_for(has(&["container"]), "riscv64", None),
            Some(Variant::Container),
            "unknown platforms filter nothing"
        );
        assert_ne!(only.revision(), both.revision());
        // Errors name the field and the value.
        let quick = parse_workloads(&doc(
            "  container: { image: \"oci://localhost:5000/box:1\", stopGracePeriod: 1500ms }\n",
        ))
        .unwrap();
        assert_eq!(quick[0].container.as_ref().unwrap().stop_grace_ms, 1500);
        let errs = parse_workloads(&doc(
            "  container: { image: \"oci://localhost:5000/box:1\", stopGracePeriod: 2h }\n",
        ))
        .unwrap_err();
        assert!(
            errs[0]
                .message
                .contains("stopGracePeriod \"2h\" is invalid: at most 1h"),
            "{errs:?}"
        );
        let errs = parse_workloads(&doc(
            "  container: { image: \"box:1\", platforms: [linux] }\n",
        ))
        .unwrap_err();
        let text: Vec<&str> = errs.iter().map(|e| e.message.as_str()).collect();
        assert!(
            text.iter()
                .any(|m| m.contains("spec.container.image \"box:1\" is invalid")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|m| m.contains("platform \"linux\" is invalid")),
            "{text:?}"
        );
    }

    #[test]
    fn example_manifests_are_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let ws = parse_workloads(&text).unwrap_or_else(|e| panic!("{path:?}: {e:?}"));
                assert!(!ws.is_empty(), "{path:?}");
                n += 1;
            }
        }
        assert!(n >= 2, "examples found: {n}");
    }

    #[test]
    fn policy_table() {
        use RestartPolicy::*;
        for (p, ok, fail) in [
            (Always, true, true),
            (OnFailure, false, true),
            (Never, false, false),
        ] {
            assert_eq!(p.restarts_after(true), ok);
            assert_eq!(p.restarts_after(false), fail);
        }
    }
}
