//! The `WorkloadRuntime` seam: how the agent runs one replica, whatever executes it.
//!
//! The supervisor ([`crate::supervisor`]) drives a runtime through `prepare` (turn verified
//! module bytes into something runnable; cached) and `run` (execute until exit or cancel).
//! [`wasm::WasmRuntime`] is the real implementation; tests use in-memory fakes.

#[cfg(feature = "containerd")]
pub mod containerd;
pub mod wasm;

use crate::logs::LogSink;
pub use crate::volumes::Mount;
use serde::{Deserialize, Serialize};
use shoal_api::ids::Digest;
use shoal_api::oci::OciRef;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Everything needed to start one run of a replica. Its `Debug` shows environment names
/// only: values may be secrets.
#[derive(Clone)]
pub struct RunSpec {
    /// Instance name on this device, e.g. `hello-0` (used in logs and spans).
    pub instance: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Hard cap on the guest's linear memories and tables, in bytes.
    pub memory_limit: u64,
    /// CPU share in millicores (1000 = one core); `None`: no cap.
    pub cpu_millis: Option<u32>,
    pub network: Network,
    /// `spec.volumes`: directories preopened read-write at their guest paths.
    pub mounts: Vec<Mount>,
    /// `spec.limits`: breaching one stops the run with the limit as its reason.
    pub limits: shoal_api::workload::RunLimits,
    /// Where the runtime reports what the run uses (shared with the agent).
    pub usage: Arc<Usage>,
}

impl std::fmt::Debug for RunSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunSpec")
            .field("instance", &self.instance)
            .field("args", &self.args)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("memory_limit", &self.memory_limit)
            .field("cpu_millis", &self.cpu_millis)
            .field("network", &self.network)
            .field("mounts", &self.mounts)
            .field("limits", &self.limits)
            .field("usage", &self.usage)
            .finish()
    }
}

/// What one replica uses, kept current by the runtime that runs it (WASM) and read by the
/// agent for `shoal-agent ps` and its metrics. Atomics: written from the guest's poll, read
/// from the main loop, never locked.
#[derive(Debug, Default)]
pub struct Usage {
    /// Linear memories (and tables) of the current run, in bytes; 0 between runs.
    memory_bytes: AtomicU64,
    /// CPU time used by every run of the replica so far, in nanoseconds.
    cpu_nanos: AtomicU64,
}

impl Usage {
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes.load(Ordering::Relaxed)
    }
    pub fn cpu_nanos(&self) -> u64 {
        self.cpu_nanos.load(Ordering::Relaxed)
    }
    /// A memory grew (or was created) from `from` to `to` bytes.
    pub fn memory_grew(&self, from: u64, to: u64) {
        self.memory_bytes
            .fetch_add(to.saturating_sub(from), Ordering::Relaxed);
    }
    /// A run ended (its memories are freed) or is about to start.
    pub fn memory_freed(&self) {
        self.memory_bytes.store(0, Ordering::Relaxed);
    }
    pub fn add_cpu(&self, nanos: u64) {
        self.cpu_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// A reading of a container's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageSample {
    pub memory_bytes: u64,
    pub cpu_nanos: u64,
}

/// Addresses a replica may connect to, kept current by the agent while the replica runs.
pub type AllowList = Arc<std::sync::RwLock<std::collections::BTreeSet<std::net::SocketAddr>>>;

/// A replica's network grants. Default: none at all.
#[derive(Debug, Clone, Default)]
pub struct Network {
    /// TCP ports it may listen on (its `spec.ports`).
    pub listen: Vec<u16>,
    /// Endpoints of the services it `uses`; `None` when it uses none.
    pub connect: Option<AllowList>,
    /// `spec.network.allow`: destinations it may always connect to.
    pub allow: Vec<shoal_api::network::NetRule>,
    /// Host directory shown read-only at `/shoal/services` (endpoint files).
    pub services_dir: Option<PathBuf>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Exit status 0 (or returned normally from its entry point).
    Success,
    /// Non-zero exit, trap or host error. `reason` is for people: "exited with status 3",
    /// "memory limit exceeded: …", "trap: …".
    Failure { code: Option<i32>, reason: String },
    /// Stopped because the run was cancelled.
    Cancelled,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("module {digest} is not a valid wasm module or component: {reason}")]
    InvalidModule { digest: String, reason: String },
    #[error("failed to prepare module {digest}: {reason}")]
    Prepare { digest: String, reason: String },
}

/// A module ready to instantiate (compiled, or whatever the runtime needs).
pub trait Prepared: Send + Sync + std::fmt::Debug {}

/// Runs workloads. Implementations must never block the async executor for long: a guest that
/// spins must yield at its CPU deadlines.
pub trait WorkloadRuntime: Send + Sync + 'static {
    type Module: Prepared + 'static;

    /// Prepares the module whose verified bytes are at `path` (content digest `digest`).
    /// May be slow (compilation); implementations cache per digest.
    fn prepare(
        &self,
        digest: &Digest,
        path: PathBuf,
    ) -> impl Future<Output = Result<Arc<Self::Module>, RuntimeError>> + Send;

    /// Runs the module to completion, writing its stdout/stderr to `log`, or until `cancel`
    /// fires (then returns [`Exit::Cancelled`] promptly).
    fn run(
        &self,
        module: Arc<Self::Module>,
        spec: RunSpec,
        log: LogSink,
        cancel: CancellationToken,
    ) -> impl Future<Output = Exit> + Send;
}

/// What the image config says about running it (the parts a runtime spec needs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

impl ImageConfig {
    /// Reads the `config` object of an OCI/Docker image config blob.
    pub fn from_blob(bytes: &[u8]) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| format!("the image config is not JSON: {e}"))?;
        let c = &v["config"];
        let strings = |x: &serde_json::Value| -> Vec<String> {
            x.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        };
        Ok(Self {
            env: strings(&c["Env"]),
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            working_dir: c["WorkingDir"].as_str().unwrap_or_default().to_string(),
            user: c["User"].as_str().unwrap_or_default().to_string(),
        })
    }
}

/// An image unpacked in containerd and ready to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedImage {
    /// The image record's name (the pinned reference without `oci://`).
    pub name: String,
    /// Chain id of the top layer: the parent of each container's snapshot.
    pub chain: String,
    pub config: ImageConfig,
}

/// One run of a container replica. Its `Debug` shows environment names only.
#[derive(Clone)]
pub struct ContainerRun {
    /// containerd container id (also the snapshot key and the cgroup name).
    pub id: String,
    /// Replaces the image's entrypoint when not empty.
    pub command: Vec<String>,
    /// Replaces the image's `Cmd` when not empty.
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Bytes; the cgroup memory limit.
    pub memory_limit: u64,
    /// Millicores; a CFS quota. `None`: no CPU cap.
    pub cpu_millis: Option<u32>,
    pub read_only_root: bool,
    /// `spec.volumes`: bind-mounted read-write at their guest paths.
    pub mounts: Vec<Mount>,
    /// stdout and stderr are appended here.
    pub log_path: PathBuf,
    /// The log is kept within about this size (copytruncate to `{log_path}.1`).
    pub log_max_bytes: u64,
    /// Between SIGTERM and SIGKILL when stopped.
    pub stop_grace: Duration,
    /// Extra labels on the container (e.g. the replica it belongs to).
    pub labels: BTreeMap<String, String>,
}

impl std::fmt::Debug for ContainerRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerRun")
            .field("id", &self.id)
            .field("command", &self.command)
            .field("args", &self.args)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("memory_limit", &self.memory_limit)
            .field("cpu_millis", &self.cpu_millis)
            .field("read_only_root", &self.read_only_root)
            .field("mounts", &self.mounts)
            .field("log_path", &self.log_path)
            .finish_non_exhaustive()
    }
}

/// A boxed future, for the object-safe [`ContainerRuntime`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs container replicas. Object-safe, so supervisors hold an
/// `Option<Arc<dyn ContainerRuntime>>` (none when the device has no container runtime) and
/// tests use a fake. [`containerd::Containerd`] is the real one.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Pulls and unpacks the pinned `image` (cached: a prepared image needs no registry).
    fn prepare<'a>(
        &'a self,
        image: &'a OciRef,
    ) -> BoxFuture<'a, Result<Arc<PreparedImage>, String>>;

    /// Starts container `run` (returns once its task runs). A container of the same id
    /// still running from before an agent restart is adopted, not started twice.
    fn start<'a>(
        &'a self,
        image: Arc<PreparedImage>,
        run: &'a ContainerRun,
    ) -> BoxFuture<'a, Result<(), String>>;

    /// Waits for a started container to end, or until `cancel` (then stops it and returns
    /// [`Exit::Cancelled`]), and removes it. If `detach` is cancelled by then (the agent is
    /// shutting down), the container is left running instead, for the next agent to adopt.
    fn wait<'a>(
        &'a self,
        run: &'a ContainerRun,
        cancel: CancellationToken,
        detach: CancellationToken,
    ) -> BoxFuture<'a, Exit>;

    /// What container `id` uses now (memory, CPU time of its cgroup); `None` when unknown
    /// (not running, or its cgroup cannot be read). Quick and synchronous.
    fn usage(&self, _id: &str) -> Option<UsageSample> {
        None
    }
}
