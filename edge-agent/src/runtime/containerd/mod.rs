//! The container runtime: drives containerd over its gRPC API (the only module naming
//! `containerd-client`). Images are pulled client-side (containerd 1.6, Debian 12's, has no
//! Transfer service): [`shoal_registry`] fetches and verifies the blobs, this module writes
//! them into containerd's content store under a lease, records the image and unpacks its
//! layers into overlayfs snapshots, labelled so that containerd's garbage collector keeps
//! them. A run prepares a snapshot, creates the container with an OCI runtime spec built by
//! [`runtime_spec`] (pure), starts its task with stdout and stderr appended to the replica's
//! log, waits, and on cancel stops it with SIGTERM then SIGKILL after a grace period; task,
//! container and snapshot are removed afterwards. docs/research/containerd-1.6.md records the
//! protocol details this follows.
//!
//! Confinement: every container runs under containerd's default seccomp profile
//! ([`seccomp`]) and as its image's `USER`, resolved in the image's own `/etc/passwd` and
//! `/etc/group` ([`user`], read from the snapshot by [`rootfs`]); a user the image does not
//! know stops the start, never falls back to root.
//!
//! The parts: this module (the connection, its errors, the managed containers and the
//! [`Runtime`] seam), [`images`] (pull, import, unpack, the image cache), [`task`]
//! (a container's life: create, start or adopt, wait, stop, remove, and how its end becomes
//! an [`Exit`]), [`spec`] (the OCI runtime spec and the image's user), [`cgroup`] (usage and
//! OOM kills read from the container's cgroup), [`log`] (the shim-written log kept bounded),
//! and the confinement data in [`seccomp`], [`user`] and [`rootfs`].

mod cgroup;
mod images;
mod log;
mod rootfs;
pub mod seccomp;
mod spec;
mod task;
pub mod user;

pub use cgroup::{cgroup_usage, parse_oom_kills};
pub use log::bound_log;
pub use spec::{runtime_spec, SpecError};

use crate::logs::LogSink;
use crate::runtime::{
    Artifact, BoxFuture, ContainerSpec, Exit, Mount, RunSpec, Running, Runtime, RuntimeError,
    VariantSpec,
};
use containerd_client::services::v1::ListContainersRequest;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Request, Status};
use serde::{Deserialize, Serialize};
use shoal_api::policy::fleet::Privilege;
use shoal_registry::Registries;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use user::UserError;

/// containerd namespace of everything the agent creates.
pub const DEFAULT_NAMESPACE: &str = "shoal";
pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";
const SNAPSHOTTER: &str = "overlayfs";
const RUNTIME: &str = "io.containerd.runc.v2";
const SPEC_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// Label on every container the agent creates (adoption and cleanup look for it).
pub const MANAGED_LABEL: &str = "dev.shoal.managed";

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("containerd at {socket:?} does not answer: {reason}")]
    Connect { socket: String, reason: String },
    #[error("containerd {what} failed: {reason}")]
    Grpc { what: String, reason: String },
    #[error(transparent)]
    Pull(#[from] shoal_registry::RegistryError),
    #[error("image {image}: {reason}")]
    Image { image: String, reason: String },
    #[error("image {image}: {source}")]
    User { image: String, source: UserError },
    #[error("image {image}: cannot read its /etc/passwd or /etc/group to resolve user {user:?}: {source}")]
    Rootfs {
        image: String,
        user: String,
        source: rootfs::RootfsError,
    },
    #[error("image {image}: {source}")]
    Spec { image: String, source: SpecError },
    #[error("{path:?}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn grpc(what: impl Into<String>) -> impl FnOnce(Status) -> ContainerdError {
    let what = what.into();
    move |s| ContainerdError::Grpc {
        what,
        reason: format!("{}: {}", s.code(), s.message()),
    }
}

/// A containerd connection for one namespace.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    /// `DATA_DIR/cache/images`: pulled blobs and the record of prepared images, so that an
    /// image once pulled runs again without the registry.
    cache: PathBuf,
    registries: Arc<Registries>,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl Containerd {
    /// Connects and checks that containerd answers (its version is returned).
    pub async fn connect(
        socket: &Path,
        namespace: &str,
        cache: PathBuf,
        registries: Arc<Registries>,
    ) -> Result<(Self, String), ContainerdError> {
        let fail = |reason: String| ContainerdError::Connect {
            socket: socket.display().to_string(),
            reason,
        };
        if !socket.exists() {
            return Err(fail("no such socket".into()));
        }
        let channel =
            tokio::time::timeout(Duration::from_secs(3), containerd_client::connect(socket))
                .await
                .map_err(|_| fail("timed out".into()))?
                .map_err(|e| fail(e.to_string()))?;
        let c = Self {
            channel,
            namespace: namespace.to_string(),
            cache,
            registries,
        };
        let v = tokio::time::timeout(
            Duration::from_secs(3),
            containerd_client::Client::from(c.channel.clone())
                .version()
                .version(()),
        )
        .await
        .map_err(|_| fail("timed out".into()))?
        .map_err(|s| fail(s.message().to_string()))?
        .into_inner();
        Ok((c, v.version))
    }

    fn req<T>(&self, msg: T, lease: Option<&str>) -> Request<T> {
        let mut r = Request::new(msg);
        if let Ok(ns) = self.namespace.parse() {
            r.metadata_mut().insert("containerd-namespace", ns);
        }
        if let Some(l) = lease.and_then(|l| l.parse().ok()) {
            r.metadata_mut().insert("containerd-lease", l);
        }
        r
    }

    fn client(&self) -> containerd_client::Client {
        containerd_client::Client::from(self.channel.clone())
    }

    /// Removes every container the agent created that is not in `keep` (replicas deleted
    /// while the agent was down). Returns the ids removed.
    pub async fn sweep(&self, keep: &std::collections::BTreeSet<String>) -> Vec<String> {
        let mut removed = Vec::new();
        for id in self.managed().await.unwrap_or_default() {
            if !keep.contains(&id) {
                self.remove(&id).await;
                removed.push(id);
            }
        }
        removed
    }
    /// Ids of the containers the agent created in its namespace.
    pub async fn managed(&self) -> Result<Vec<String>, ContainerdError> {
        let list = self
            .client()
            .containers()
            .list(self.req(
                ListContainersRequest {
                    filters: vec![format!(r#"labels."{MANAGED_LABEL}"==true"#)],
                },
                None,
            ))
            .await
            .map_err(grpc("container list"))?
            .into_inner();
        Ok(list.containers.into_iter().map(|c| c.id).collect())
    }
}

/// containerd behind the one [`Runtime`] seam: `pull` prepares the image (pulled and
/// unpacked, cached), `prepare` has nothing left to do, `start` begins the container and
/// from then on its usage is read from its cgroup. Cancelled `stopping` (the agent is
/// shutting down) leaves running containers to be adopted by the next agent.
#[derive(Debug, Clone)]
pub struct ContainerdRuntime {
    containerd: Containerd,
    stopping: CancellationToken,
    /// What this device lets containers ask for (`shoal-agent run --allow`).
    allow: std::collections::BTreeSet<Privilege>,
}

impl ContainerdRuntime {
    pub fn new(
        containerd: Containerd,
        stopping: CancellationToken,
        allow: std::collections::BTreeSet<Privilege>,
    ) -> Self {
        ContainerdRuntime {
            containerd,
            stopping,
            allow,
        }
    }
}

const NAME: &str = "container";

fn container_spec(spec: &RunSpec) -> Result<&ContainerSpec, RuntimeError> {
    match &spec.variant {
        VariantSpec::Container(c) => Ok(c),
        VariantSpec::Wasm(_) => Err(RuntimeError::Foreign { runtime: NAME }),
    }
}

impl Runtime for ContainerdRuntime {
    fn pull<'a>(&'a self, spec: &'a RunSpec) -> BoxFuture<'a, Result<Artifact, RuntimeError>> {
        Box::pin(async move {
            let c = container_spec(spec)?;
            let (namespace, id) = (self.containerd.namespace.clone(), c.id.clone());
            spec.usage.measure_with(Box::new(move || {
                cgroup_usage(Path::new("/sys/fs/cgroup"), &namespace, &id)
            }));
            let image = self
                .containerd
                .prepare(&c.image)
                .await
                .map_err(RuntimeError::Image)?;
            Ok(Artifact::new(image))
        })
    }

    fn prepare<'a>(
        &'a self,
        _spec: &'a RunSpec,
        pulled: Artifact,
    ) -> BoxFuture<'a, Result<Artifact, RuntimeError>> {
        Box::pin(std::future::ready(Ok(pulled)))
    }

    fn start<'a>(
        &'a self,
        prepared: &'a Artifact,
        spec: &'a RunSpec,
        log: &'a LogSink,
    ) -> BoxFuture<'a, Result<Box<dyn Running>, RuntimeError>> {
        Box::pin(async move {
            let c = container_spec(spec)?;
            let image = prepared.get::<Arc<PreparedImage>>(NAME)?;
            // Read now, not when granted: a node replugged meanwhile has new numbers.
            let mut devices = Vec::new();
            for path in &spec.devices {
                let node =
                    crate::hardware::node_info(path).map_err(|error| RuntimeError::Device {
                        path: path.clone(),
                        error,
                    })?;
                devices.push(node);
            }
            let mut host_devices = Vec::new();
            for d in &c.host_devices {
                let path = PathBuf::from(&d.path);
                let mut node = crate::hardware::node_info(&path)
                    .map_err(|error| RuntimeError::Device { path, error })?;
                node.path = PathBuf::from(&d.container_path);
                host_devices.push((node, d.permissions.clone()));
            }
            // One container id per revision, so a replaced revision still stopping never
            // collides with its successor; restarts reuse it.
            let run = ContainerRun {
                id: c.id.clone(),
                command: c.command.clone(),
                args: spec.args.clone(),
                env: spec.env.clone(),
                memory_limit: spec.memory_limit,
                cpu_millis: spec.cpu_millis,
                read_only_root: c.read_only_root,
                mounts: spec.mounts.clone(),
                log_path: log.path(),
                log_max_bytes: c.log_max_bytes,
                stop_grace: c.stop_grace,
                labels: c.labels.clone(),
                devices,
                cap_add: c.cap_add.clone(),
                cap_drop: c.cap_drop.clone(),
                groups: c.groups.clone(),
                privileged: c.privileged,
                host_devices,
                allow: self.allow.clone(),
            };
            let started = self.containerd.begin(&image, &run).await;
            if let Err(e) = started {
                self.containerd.remove(&run.id).await;
                return Err(RuntimeError::Start(e));
            }
            // A replica that must not outlive its agent is stopped with it (a token never
            // cancelled: nothing detaches it).
            let detach = if c.detach {
                self.stopping.clone()
            } else {
                CancellationToken::new()
            };
            Ok(Box::new(ContainerdRunning {
                containerd: self.containerd.clone(),
                run,
                detach,
            }) as Box<dyn Running>)
        })
    }
}

/// A started container.
struct ContainerdRunning {
    containerd: Containerd,
    run: ContainerRun,
    detach: CancellationToken,
}

impl Running for ContainerdRunning {
    fn wait(self: Box<Self>, stop: CancellationToken) -> BoxFuture<'static, Exit> {
        Box::pin(async move {
            self.containerd
                .finish(&self.run, stop, self.detach.clone())
                .await
        })
    }
}

/// An image config blob that is not JSON.
#[derive(Debug, thiserror::Error)]
#[error("the image config is not JSON: {0}")]
pub struct ImageConfigError(serde_json::Error);

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
    pub fn from_blob(bytes: &[u8]) -> Result<Self, ImageConfigError> {
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(ImageConfigError)?;
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
    /// Hardware nodes the container is given (`resources.devices`), at their own paths.
    pub devices: Vec<crate::hardware::NodeInfo>,
    /// `capabilities.add` / `drop` (see `shoal_api::model::caps`).
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    /// `supplementalGroups`.
    pub groups: Vec<u32>,
    /// `privileged: true`.
    pub privileged: bool,
    /// `devices`: host nodes at their container paths, with their cgroup access (`rwm`).
    pub host_devices: Vec<(crate::hardware::NodeInfo, String)>,
    /// What this device lets containers ask for (`shoal-agent run --allow`): checked again
    /// when the spec is built, whatever the hub sent.
    pub allow: std::collections::BTreeSet<Privilege>,
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
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}
