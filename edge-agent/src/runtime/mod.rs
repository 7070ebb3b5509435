//! The runtime seam: how the agent runs one replica, whatever executes it.
//!
//! One object-safe trait, [`Runtime`]: `pull` what a replica runs onto the device (a module
//! fetched by digest, an image pulled; retried by the caller while it fails), `prepare` it
//! (compile, cached), and `start` one run, which gives a [`Running`] handle to `wait` on
//! (cancelling its token stops the run). One [`RunSpec`]: what every run has (arguments,
//! environment, memory, CPU, mounts, the usage record) and, in [`VariantSpec`], what only
//! one runtime reads. One [`RuntimeError`]. [`Runtimes`] holds the device's runtimes and
//! hands each spec to the one for its variant, so the replica's supervisor never asks which
//! variant it runs.
//!
//! [`wasm`] (wasmtime) and [`containerd`] (feature `containerd`) are the implementations;
//! tests use in-memory fakes. Nothing here knows the agent's loop or the supervisor.

#[cfg(feature = "containerd")]
pub mod containerd;
pub mod wasm;

use crate::logs::LogSink;
pub use crate::volumes::Mount;
use shoal_api::model::ids::Digest;
use shoal_api::model::oci::OciRef;
use shoal_api::model::workload::{RunLimits, Variant};
use shoal_api::wire::messages::DesiredWorkload;
use std::any::Any;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where a consumer's service endpoint directory appears inside its sandbox (see
/// `crate::services`).
pub const SERVICES_GUEST_DIR: &str = "/shoal/services";

/// A boxed future, for the object-safe [`Runtime`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs replicas of one kind. Object-safe: the agent holds its runtimes as
/// `Arc<dyn Runtime>` ([`Runtimes`]), tests hold fakes. Implementations never block the
/// executor for long (a spinning guest yields at its CPU deadlines).
pub trait Runtime: Send + Sync + 'static {
    /// Gets what `spec` runs onto the device (downloads a module, pulls an image; verified,
    /// cached). The caller retries a failure with back-off unless it [`RuntimeError::is_final`].
    fn pull<'a>(&'a self, spec: &'a RunSpec) -> BoxFuture<'a, Result<Artifact, RuntimeError>>;

    /// Makes what `pull` got runnable (compiles a module; cached per digest). A failure is
    /// final for this revision.
    fn prepare<'a>(
        &'a self,
        spec: &'a RunSpec,
        pulled: Artifact,
    ) -> BoxFuture<'a, Result<Artifact, RuntimeError>>;

    /// Starts one run of `prepared` (returns once it runs; a container of the same id still
    /// running from before an agent restart is adopted, not started twice). Not to be
    /// dropped half-way: a failed start cleans up after itself, a started one is stopped
    /// and removed through [`Running::wait`].
    fn start<'a>(
        &'a self,
        prepared: &'a Artifact,
        spec: &'a RunSpec,
        log: &'a LogSink,
    ) -> BoxFuture<'a, Result<Box<dyn Running>, RuntimeError>>;
}

/// One started run.
pub trait Running: Send {
    /// Runs to the end, or until `stop` is cancelled (then stops the run, promptly for a
    /// module, after its grace period for a container, and returns [`Exit::Cancelled`]).
    /// What the run uses meanwhile is kept in its spec's [`Usage`].
    fn wait(self: Box<Self>, stop: CancellationToken) -> BoxFuture<'static, Exit>;
}

/// What a runtime pulled or prepared, handed back to it unopened by the caller.
#[derive(Clone)]
pub struct Artifact(Arc<dyn Any + Send + Sync>);

impl Artifact {
    pub fn new<T: Any + Send + Sync>(value: T) -> Self {
        Artifact(Arc::new(value))
    }

    /// The value a runtime put in; an error when another runtime made it.
    pub fn get<T: Any + Send + Sync>(&self, runtime: &'static str) -> Result<Arc<T>, RuntimeError> {
        self.0
            .clone()
            .downcast::<T>()
            .map_err(|_| RuntimeError::Foreign { runtime })
    }
}

impl std::fmt::Debug for Artifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Artifact")
    }
}

/// Everything needed to run a replica. Its `Debug` shows environment names only: values
/// may be secrets.
#[derive(Clone)]
pub struct RunSpec {
    /// Instance name on this device, e.g. `hello-0` (used in logs and spans).
    pub instance: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Bytes: a hard cap on a guest's linear memories and tables, a container's cgroup limit.
    pub memory_limit: u64,
    /// CPU share in millicores (1000 = one core); `None`: no cap.
    pub cpu_millis: Option<u32>,
    /// `spec.volumes` (read-write) and `spec.secrets` (read-only) at their guest paths.
    pub mounts: Vec<Mount>,
    /// The hardware nodes the replica holds (`resources.devices`), at the same paths for
    /// the workload as on the device.
    pub devices: Vec<PathBuf>,
    /// Where the runtime reports what the replica uses (shared with the agent).
    pub usage: Arc<Usage>,
    /// What only one runtime reads.
    pub variant: VariantSpec,
}

/// The part of a [`RunSpec`] only one runtime reads.
#[derive(Debug, Clone)]
pub enum VariantSpec {
    Wasm(WasmSpec),
    Container(ContainerSpec),
}

/// A WASM replica: its module and sandbox grants.
#[derive(Debug, Clone)]
pub struct WasmSpec {
    pub module: Digest,
    /// Where a pinned `oci://` module comes from (else the hub).
    pub oci: Option<OciRef>,
    /// The hub's HTTP API to fetch from; empty: the hub found over mDNS.
    pub artifact_base: String,
    pub network: Network,
    /// `spec.limits`: breaching one stops the run with the limit as its reason.
    pub limits: RunLimits,
}

/// A container replica: its image and how to run it.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// The pinned image.
    pub image: OciRef,
    /// containerd container id ([`container_id`]).
    pub id: String,
    /// Replaces the image's entrypoint when not empty.
    pub command: Vec<String>,
    pub read_only_root: bool,
    /// Between SIGTERM and SIGKILL when stopped.
    pub stop_grace: Duration,
    /// The log is kept within about this size.
    pub log_max_bytes: u64,
    /// Extra labels on the container (the replica it belongs to).
    pub labels: BTreeMap<String, String>,
    /// `capabilities.add` / `drop` (see `shoal_api::model::caps`).
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    /// `supplementalGroups`.
    pub groups: Vec<u32>,
    /// `privileged: true` (only if this device allows it).
    pub privileged: bool,
    /// `devices`: host device nodes by path (only if this device allows it).
    pub host_devices: Vec<shoal_api::model::workload::HostDevice>,
    /// Left running for the next agent when this one stops (adopted then); `false` for a
    /// replica with `spec.disconnect.stopAfter`, which runs only while an agent fences it.
    pub detach: bool,
}

impl RunSpec {
    /// The spec of replica `d` (mounts and the secrets' environment are added once its
    /// volumes and secrets are ready). `artifact_base`: where its module comes from;
    /// `log_max_bytes`: the bound of its log.
    pub fn for_replica(
        d: &DesiredWorkload,
        artifact_base: String,
        network: Network,
        usage: Arc<Usage>,
        log_max_bytes: u64,
    ) -> Result<RunSpec, RuntimeError> {
        let variant = match (&d.module, &d.container) {
            (Some(digest), _) => VariantSpec::Wasm(WasmSpec {
                module: digest.clone(),
                oci: d.oci.clone(),
                artifact_base,
                network,
                limits: d.limits,
            }),
            (None, Some(c)) => VariantSpec::Container(ContainerSpec {
                image: c.image.clone(),
                id: container_id(d),
                command: c.command.clone(),
                read_only_root: c.read_only_root,
                stop_grace: Duration::from_millis(c.stop_grace_ms),
                log_max_bytes,
                labels: [
                    ("dev.shoal.instance".to_string(), d.instance()),
                    ("dev.shoal.revision".to_string(), d.revision.clone()),
                ]
                .into(),
                privileged: c.privileged,
                host_devices: c.host_devices.clone(),
                cap_add: c.cap_add.clone(),
                cap_drop: c.cap_drop.clone(),
                groups: c.groups.clone(),
                // Neither a fenced nor a scheduled run may outlive its agent (unsupervised,
                // it would be adopted as the next run, or run on unfenced).
                detach: d.stop_after_ms.is_none() && d.schedule.is_none(),
            }),
            (None, None) => return Err(RuntimeError::NothingToRun),
        };
        Ok(RunSpec {
            instance: d.instance(),
            args: d.args.clone(),
            env: d.env.clone(),
            memory_limit: d.resources.memory,
            cpu_millis: d.resources.cpu,
            mounts: Vec::new(),
            devices: Vec::new(),
            usage,
            variant,
        })
    }

    /// Gives the run the hardware nodes `grant` holds: each class's paths in
    /// `SHOAL_DEVICES_{CLASS}` (comma-separated), and the nodes themselves to the runtime.
    pub fn grant_devices(&mut self, grant: &crate::core::hardware::Grant) {
        for (class, nodes) in grant {
            self.env
                .insert(shoal_api::model::hardware::env_name(class), nodes.join(","));
            self.devices.extend(nodes.iter().map(PathBuf::from));
        }
    }

    /// Which variant this runs, as replica statuses name it.
    pub fn variant_name(&self) -> &'static str {
        match self.variant {
            VariantSpec::Wasm(_) => Variant::Wasm.as_str(),
            VariantSpec::Container(_) => Variant::Container.as_str(),
        }
    }
}

impl std::fmt::Debug for RunSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunSpec")
            .field("instance", &self.instance)
            .field("args", &self.args)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("memory_limit", &self.memory_limit)
            .field("cpu_millis", &self.cpu_millis)
            .field("mounts", &self.mounts)
            .field("devices", &self.devices)
            .field("usage", &self.usage)
            .field("variant", &self.variant)
            .finish()
    }
}

/// The containerd id of a container replica: one per revision, so that a replaced revision
/// still stopping never collides with its successor (restarts reuse it).
pub fn container_id(d: &DesiredWorkload) -> String {
    let secrets = crate::core::plan::secret_versions(d);
    let configs = crate::core::plan::config_digests(d);
    if secrets.is_empty() && configs.is_empty() {
        format!("{}-{}", d.instance(), d.revision)
    } else {
        // A new secret version (or config values) is a new container too: the old one may
        // still be stopping.
        use sha2::Digest as _;
        let text: Vec<String> = secrets
            .iter()
            .map(|(n, v)| format!("{n}@{v}"))
            .chain(configs)
            .collect();
        let h = hex::encode(sha2::Sha256::digest(text.join(",").as_bytes()));
        format!("{}-{}-{}", d.instance(), d.revision, &h[..8])
    }
}

/// The device's runtimes: each spec goes to the one for its variant.
#[derive(Clone)]
pub struct Runtimes {
    pub wasm: Arc<dyn Runtime>,
    /// The container runtime, when the device has one.
    pub container: Option<Arc<dyn Runtime>>,
}

impl Runtimes {
    fn pick(&self, spec: &RunSpec) -> Result<&dyn Runtime, RuntimeError> {
        match spec.variant {
            VariantSpec::Wasm(_) => Ok(self.wasm.as_ref()),
            // The hub sends the container variant only to devices that advertise the
            // `container` runtime.
            VariantSpec::Container(_) => self
                .container
                .as_deref()
                .ok_or(RuntimeError::NoContainerRuntime),
        }
    }
}

impl Runtime for Runtimes {
    fn pull<'a>(&'a self, spec: &'a RunSpec) -> BoxFuture<'a, Result<Artifact, RuntimeError>> {
        match self.pick(spec) {
            Ok(rt) => rt.pull(spec),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn prepare<'a>(
        &'a self,
        spec: &'a RunSpec,
        pulled: Artifact,
    ) -> BoxFuture<'a, Result<Artifact, RuntimeError>> {
        match self.pick(spec) {
            Ok(rt) => rt.prepare(spec, pulled),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn start<'a>(
        &'a self,
        prepared: &'a Artifact,
        spec: &'a RunSpec,
        log: &'a LogSink,
    ) -> BoxFuture<'a, Result<Box<dyn Running>, RuntimeError>> {
        match self.pick(spec) {
            Ok(rt) => rt.start(prepared, spec, log),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
}

/// What one replica uses, kept current by the runtime that runs it (WASM) and read by the
/// agent for `shoal-agent ps` and its metrics. Atomics: written from the guest's poll, read
/// from the main loop, never locked.
#[derive(Default)]
pub struct Usage {
    /// Linear memories (and tables) of the current run, in bytes; 0 between runs.
    memory_bytes: AtomicU64,
    /// CPU time used by every run of the replica so far, in nanoseconds.
    cpu_nanos: AtomicU64,
    /// Reads what the replica uses from outside (a container's cgroup) instead of the
    /// counters above, which its runtime then leaves alone.
    meter: OnceLock<Meter>,
}

/// Reads a replica's usage from outside the agent; `None` when unknown.
pub type Meter = Box<dyn Fn() -> Option<UsageSample> + Send + Sync>;

impl Usage {
    /// From now on, what the replica uses is read with `meter` (set once; later calls
    /// keep the first).
    pub fn measure_with(&self, meter: Meter) {
        let _ = self.meter.set(meter);
    }

    /// Memory and CPU time for `ps` and the metrics: the meter's reading when there is one
    /// (both or neither), else the counters (memory only while `running`).
    pub fn view(&self, running: bool) -> (Option<u64>, Option<u64>) {
        match self.meter.get() {
            Some(meter) => match meter() {
                Some(u) => (Some(u.memory_bytes), Some(u.cpu_nanos)),
                None => (None, None),
            },
            None => (running.then(|| self.memory_bytes()), Some(self.cpu_nanos())),
        }
    }

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

impl std::fmt::Debug for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Usage")
            .field("memory_bytes", &self.memory_bytes())
            .field("cpu_nanos", &self.cpu_nanos())
            .field("metered", &self.meter.get().is_some())
            .finish()
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
    pub allow: Vec<shoal_api::model::network::NetRule>,
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

/// Why a replica could not be pulled, prepared or started.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("module {digest} is not a valid wasm module or component: {reason}")]
    InvalidModule { digest: String, reason: String },
    #[error("failed to prepare module {digest}: {reason}")]
    Prepare { digest: String, reason: String },
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    /// Pulling or unpacking an image failed.
    #[cfg(feature = "containerd")]
    #[error(transparent)]
    Image(containerd::ContainerdError),
    #[cfg(feature = "containerd")]
    #[error("cannot start the container: {0}")]
    Start(containerd::ContainerdError),
    #[error("cannot hand device {} to the replica: {error}", .path.display())]
    Device {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("this device has no container runtime (containerd did not answer at startup)")]
    NoContainerRuntime,
    #[error("the desired state names neither a module nor a container")]
    NothingToRun,
    #[error("the {runtime} runtime was handed what another runtime pulled or prepared")]
    Foreign { runtime: &'static str },
}

impl RuntimeError {
    /// Whether trying again cannot help (the device lacks what the spec asks for); pulls
    /// that fail otherwise are retried.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            RuntimeError::NoContainerRuntime
                | RuntimeError::NothingToRun
                | RuntimeError::Foreign { .. }
        )
    }
}
