//! Fleet manifest wire format (`apiVersion: shoal.dev/v1`, `kind: Workload`, `Secret` or
//! `Config`).
//!
//! A manifest is a YAML stream: several documents separated by `---`, each one workload or
//! secret (a document may also be a sequence of them, which is how a JSON array arrives).
//! Fields are strict: an unknown field is almost always a typo, so it is rejected rather than
//! ignored. [`parse_stream`] returns the raw workload documents, which [`crate::model::workload`]
//! validates, and the secrets, already validated by [`crate::model::secret::parse`] (which never
//! quotes a value in an error).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadManifest {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: WorkloadSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// Number of replicas to run (default 1). Exclusive with `placement: every`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// `every`: one replica on every matching device, including devices that join later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
    /// Device label requirements: a value (equality) or `{in: [...]}`, `{notIn: [...]}`,
    /// `{exists: bool}` (see [`crate::model::selector`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, crate::model::selector::WireRequirement>,
    /// A device label to spread replicas across (e.g. `zone`): fewest replicas per value first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<String>,
    /// `spread` (default: fewest replicas of the workload, then least loaded) or `binpack`
    /// (fill the most loaded device that fits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// The WASM variant. A workload has it, `container`, or both (then WASM runs where it can).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<WasmSpec>,
    /// The container variant, run through containerd on devices that offer it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerSpec>,
    /// Arguments: the module's argv, or the container's command arguments (replacing the
    /// image's `Cmd`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<Restart>,
    /// How a new revision rolls out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<Update>,
    /// A probe of the running replica (besides its exit): `httpGet` or `tcpSocket`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// TCP ports the workload listens on; `expose: mdns` advertises them on the LAN.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    /// Services (workload names) this workload connects to: the agent keeps their endpoints in
    /// `/shoal/services/{name}/{port}` inside the sandbox and allows connections to them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uses: Vec<String>,
    /// Directories on the device that outlive a run (see [`crate::model::volume`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Outbound connections a WASM guest may open (see [`crate::model::network`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// Limits that stop a WASM run when it breaches them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// Secrets the workload reads, as files or environment variables (see
    /// [`crate::model::secret`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretRef>,
    /// Configs the workload reads, as files or environment variables (see
    /// [`crate::model::config`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configs: Vec<SecretRef>,
    /// Workloads whose replica on the same device must be up first (see
    /// [`crate::model::order`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<AfterSpec>,
    /// How long a lost device is waited for (see [`crate::model::disconnect`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnect: Option<DisconnectSpec>,
    /// Runs fired by the device on a cron schedule (see [`crate::model::schedule`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleSpec>,
    /// Run to completion rather than as a service (see [`crate::model::job`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<Completion>,
}

/// `spec.after[]`: `{ workload: broker, condition: Running|Healthy|Succeeded, restartWith: false }`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AfterSpec {
    pub workload: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Stop and wait again when the dependency stops meeting the condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_with: Option<bool>,
}

/// `spec.schedule`: `{ cron: "0 3 * * *", timeZone: Europe/Berlin, concurrency: Forbid,
/// startingDeadline: 1h }`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ScheduleSpec {
    pub cron: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting_deadline: Option<String>,
}

/// `spec.disconnect`: `{ lostAfter: 5m, replace: true, stopAfter: 2m }`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DisconnectSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_after: Option<String>,
}

/// `spec.completion`: the workload is a job (see [`crate::model::job`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Completion {
    /// Successful runs wanted (default 1). Not with `placement: every` (once per device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completions: Option<u32>,
    /// Most runs at once (default 1; with `placement: every`, every matching device at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
    /// Retries of a failed run on its device before it counts as failed (default 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_limit: Option<u32>,
    /// Longest a run may take on its device, retries included (e.g. `10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline: Option<String>,
    /// Delete the workload this long after the job finished (e.g. `1h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_after_finished: Option<String>,
}

/// `spec.secrets[]` and `spec.configs[]`: `{ name: db, path: /etc/db, env: { DB_PASSWORD:
/// password } }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    /// The secret's (config's) `metadata.name`.
    pub name: String,
    /// Directory where each key is a read-only file (default `/run/secrets/{name}`, or
    /// `/run/configs/{name}`, unless `env` is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Environment variable → the key whose value it takes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// `spec.limits`: `{ cpuTime: 30s, logRate: 64Ki }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Limits {
    /// Most CPU time one run may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time: Option<String>,
    /// Most bytes of output per second (averaged over 10 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_rate: Option<String>,
}

/// `spec.network`: `{ allow: ["10.0.0.0/8:443", …] }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Network {
    #[serde(default)]
    pub allow: Vec<String>,
}

/// `spec.volumes[]`: `{ name: data, path: /data }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    /// Where the workload sees it (`mountPath`, as Kubernetes spells it, is accepted too).
    #[serde(alias = "mountPath")]
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    /// Port name (default: the port number), used in endpoint file names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Wide integer so that out-of-range values get a clear error rather than a serde one.
    pub port: i64,
    /// `tcp` (the default and only protocol for now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// `none` (default) or `mdns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expose: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WasmSpec {
    /// `sha256:<hex>` of a blob the hub has, or (for `shoal apply` only) a local file path.
    pub module: String,
    /// Optional expected digest of the module (hex, with or without `sha256:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerSpec {
    /// `oci://REGISTRY/REPOSITORY:TAG` (or `@sha256:`); `shoal apply` pins tags.
    pub image: String,
    /// Replaces the image's entrypoint; default: the image's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// The root filesystem is read-only unless this is `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_root_filesystem: Option<bool>,
    /// How long a stopping container gets between SIGTERM and SIGKILL (default `10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_period: Option<String>,
    /// Platforms the image offers (`linux/arm64`, `linux/arm/v7`, ...); the scheduler only
    /// sends the container to devices of these. `shoal apply` fills it from the image index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// Linux capabilities to add to or drop from containerd's defaults (see
    /// [`crate::model::caps`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// Extra group ids of the container's process (numbers, as Kubernetes takes them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supplemental_groups: Vec<serde_json::Value>,
    /// Every capability, no seccomp filter, every device node: only where the fleet's policy
    /// and the device allow it (see [`crate::policy::fleet`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privileged: Option<bool>,
    /// Host device nodes by path: only where the fleet's policy and the device allow it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<HostDeviceSpec>,
}

/// `spec.container.devices[]`: `{ path: /dev/ttyUSB0, containerPath: /dev/ttyS0,
/// permissions: rw }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostDeviceSpec {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_path: Option<String>,
    /// Any of `r`, `w`, `m` (mknod); default `rwm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
}

/// `spec.container.capabilities`: `{ add: [NET_RAW], drop: [ALL] }`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Hardware nodes per device class (`serial: 1`), handed out by the device's agent (see
    /// [`crate::model::hardware`]). Wide integers: a negative count gets a clear error.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Health {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocket>,
    /// Time between probes (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<String>,
    /// How long one probe may take (default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Consecutive failures that make the replica unhealthy (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpGet {
    pub port: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpSocket {
    pub port: i64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Update {
    /// Replicas that may be unavailable during a rollout: a count (`1`) or a percentage
    /// (`"25%"`, rounded down). Default 25%. At least 1 unless `maxSurge` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<serde_json::Value>,
    /// Extra replicas a rollout may start before stopping old ones: a count or a percentage
    /// (rounded up). Default 0: replicas are replaced in place, within `maxUnavailable`.
    /// Only for `replicas` placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_surge: Option<serde_json::Value>,
    /// Update this many replicas first, and go on only once they are ready (or promoted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<u32>,
    /// Roll back to the last good revision when updated replicas fail or the rollout misses
    /// its progress deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_rollback: Option<bool>,
    /// A replica counts as updated once it has run this long (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ready_seconds: Option<u32>,
    /// How long a rollout may take (default 10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<String>,
}

/// One problem found in a manifest, located by document (1-based) and object name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ManifestError {
    pub document: usize,
    /// The object's name (a workload's, unless `kind` says otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// `Secret` or `Config` when the object is one; absent for workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub message: String,
}

impl ManifestError {
    /// A problem with secret `name` (if known) in document `document`.
    pub fn secret(document: usize, name: Option<String>, message: String) -> Self {
        Self {
            document,
            workload: name,
            kind: Some(SECRET.into()),
            message,
        }
    }

    /// A problem with config `name` (if known) in document `document`.
    pub fn config(document: usize, name: Option<String>, message: String) -> Self {
        Self {
            document,
            workload: name,
            kind: Some(CONFIG.into()),
            message,
        }
    }
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind.as_deref() {
            Some(SECRET) => "secret",
            Some(CONFIG) => "config",
            _ => "workload",
        };
        match &self.workload {
            Some(w) => write!(
                f,
                "document {} ({kind} {w:?}): {}",
                self.document, self.message
            ),
            None => write!(f, "document {}: {}", self.document, self.message),
        }
    }
}

/// The `kind` of a secret document.
pub const SECRET: &str = "Secret";

/// The `kind` of a config document.
pub const CONFIG: &str = "Config";

/// A `kind: Config` document as written (see [`crate::model::config`], which validates it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigManifest {
    pub api_version: String,
    pub kind: String,
    pub metadata: ConfigMetadata,
    /// Key → text value: every key a workload may read.
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    /// Values for some devices: by id, or by a selector on the operator's labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<OverrideManifest>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigMetadata {
    pub name: String,
}

/// `overrides[]`: `{ device: board-7, data: {…} }` or `{ selector: { site: berlin }, data: {…} }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideManifest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, crate::model::selector::WireRequirement>>,
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

/// A manifest stream, parsed: its workload documents (to validate) and its secrets.
#[derive(Debug, Default)]
pub struct Stream {
    pub workloads: Vec<Located<WorkloadManifest>>,
    pub secrets: Vec<Located<crate::model::secret::Secret>>,
    pub configs: Vec<Located<crate::model::config::Config>>,
}

/// A parsed document: its 1-based position in the stream and its content.
pub type Located<T> = (usize, T);

/// Splits a YAML stream (or a JSON document or array) into workload manifests, secrets and
/// configs.
///
/// Each document is parsed independently, so one broken document does not hide the problems of
/// the others; every error found is returned. Empty documents are skipped.
pub fn parse_stream(text: &str) -> Result<Stream, Vec<ManifestError>> {
    use serde::de::Deserialize as _;
    use serde_yaml_ng::Value;
    // First pass: learn each document's shape (mapping, sequence, empty). The second pass
    // parses workload mappings straight from the text so that errors keep their line and
    // column.
    let mut shapes = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        match Value::deserialize(doc) {
            Ok(v) => shapes.push(Some(v)),
            Err(e) => {
                errors.push(ManifestError {
                    document: i + 1,
                    message: format!("invalid YAML: {}", unquote(&e.to_string())),
                    ..Default::default()
                });
                shapes.push(None);
                // The YAML parser cannot resume after a syntax error.
                break;
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let name_of = |v: &Value| {
        v.get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .map(str::to_string)
    };
    let kind_of = |v: &Value| v.get("kind").and_then(|k| k.as_str()).map(str::to_string);
    let mut out = Stream::default();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let shape = shapes.get(i).and_then(|v| v.as_ref());
        let items: Vec<&Value> = match shape {
            Some(Value::Null) => continue,
            Some(Value::Sequence(items)) => items.iter().collect(),
            Some(v @ Value::Mapping(_)) => vec![v],
            _ => {
                errors.push(ManifestError {
                    document: n,
                    message:
                        "expected a Workload, Secret or Config mapping (apiVersion, kind, metadata, ...)"
                            .into(),
                    ..Default::default()
                });
                continue;
            }
        };
        let mut doc = matches!(shape, Some(Value::Mapping(_))).then_some(doc);
        for item in items {
            let kind = kind_of(item);
            if kind.as_deref() == Some(CONFIG) {
                let parsed = match doc.take() {
                    Some(d) => ConfigManifest::deserialize(d),
                    None => serde_yaml_ng::from_value::<ConfigManifest>(item.clone()),
                };
                let checked = parsed
                    .map_err(|e| vec![e.to_string()])
                    .and_then(crate::model::config::Config::try_from);
                match checked {
                    Ok(c) => out.configs.push((n, c)),
                    Err(es) => errors.extend(
                        es.into_iter()
                            .map(|m| ManifestError::config(n, name_of(item), m)),
                    ),
                }
                continue;
            }
            if kind.as_deref() == Some(SECRET) {
                match crate::model::secret::parse(item) {
                    Ok(s) => out.secrets.push((n, s)),
                    Err(es) => errors.extend(
                        es.into_iter()
                            .map(|m| ManifestError::secret(n, name_of(item), m)),
                    ),
                }
                continue;
            }
            // A lone mapping is parsed from the text, so that errors keep their line and
            // column; items of a sequence from their tree.
            let parsed = match doc.take() {
                Some(d) => WorkloadManifest::deserialize(d),
                None => serde_yaml_ng::from_value::<WorkloadManifest>(item.clone()),
            };
            match parsed {
                Ok(m) => out.workloads.push((n, m)),
                Err(e) => errors.push(ManifestError {
                    document: n,
                    workload: name_of(item),
                    message: e.to_string(),
                    ..Default::default()
                }),
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    if out.workloads.is_empty() && out.secrets.is_empty() && out.configs.is_empty() {
        return Err(vec![ManifestError {
            document: 1,
            message: "manifest contains no workloads, secrets or configs".into(),
            ..Default::default()
        }]);
    }
    Ok(out)
}

/// `text` with what it quotes (`"…"` or `` `…` ``) elided. YAML-level errors come before the
/// document's kind is known, and serde quotes the offending value (`!!int hunter2` gives
/// `invalid value: string "hunter2"`): in a Secret that value is secret. The location stays.
fn unquote(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut open: Option<char> = None;
    for c in text.chars() {
        match open {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None if c == '"' || c == '`' => {
                out.push(c);
                open = Some(c);
            }
            None => out.push(c),
        }
    }
    if open.is_some() {
        out.push('…');
    }
    out
}

/// Renders manifests (and secrets, values base64, and configs) back to a YAML stream: what
/// `shoal apply` publishes after uploading local modules.
pub fn to_yaml_stream(
    manifests: &[WorkloadManifest],
    secrets: &[crate::model::secret::Secret],
    configs: &[crate::model::config::Config],
) -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for c in configs {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&c.to_manifest())?);
    }
    for s in secrets {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&s.to_manifest())?);
    }
    for m in manifests {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(m)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn yaml_errors_keep_the_location_but_never_a_value() {
        let text = "apiVersion: shoal.dev/v1\nkind: Secret\nmetadata: {name: db}\nstringData: {password: !!int hunter2}\n";
        let errs = parse_stream(text).unwrap_err();
        let all: Vec<String> = errs.iter().map(ToString::to_string).collect();
        let all = all.join("\n");
        assert!(!all.contains("hunter2"), "{all}");
        assert!(all.contains("line 4"), "{all}");
        assert_eq!(unquote(r#"a "b" `c` "d"#), r#"a "…" `…` "…"#);
    }

    #[test]
    fn a_stream_mixes_workloads_and_secrets() {
        let text = "apiVersion: shoal.dev/v1\nkind: Secret\nmetadata: {name: db}\nstringData: {k: v}\n---\n- apiVersion: shoal.dev/v1\n  kind: Workload\n  metadata: {name: w}\n  spec: {wasm: {module: x.wasm}}\n- apiVersion: shoal.dev/v1\n  kind: Secret\n  metadata: {name: tls}\n  stringData: {k: v}\n";
        let s = parse_stream(text).unwrap();
        assert_eq!(s.workloads.len(), 1);
        let names: Vec<(usize, &str)> = s
            .secrets
            .iter()
            .map(|(n, x)| (*n, x.name.as_str()))
            .collect();
        assert_eq!(names, vec![(1, "db"), (2, "tls")]);
        let again = to_yaml_stream(
            &[s.workloads[0].1.clone()],
            &s.secrets.iter().map(|(_, x)| x.clone()).collect::<Vec<_>>(),
            &[],
        )
        .unwrap();
        let back = parse_stream(&again).unwrap();
        assert_eq!(back.secrets.len(), 2);
        assert_eq!(back.secrets[0].1, s.secrets[0].1);
    }
}
