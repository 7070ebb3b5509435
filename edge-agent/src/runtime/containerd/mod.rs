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
//! [`ContainerRuntime`] seam), [`images`] (pull, import, unpack, the image cache), [`task`]
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

use crate::runtime::{BoxFuture, ContainerRuntime, Exit, UsageSample};
pub use crate::runtime::{ContainerRun, ImageConfig, PreparedImage};
use containerd_client::services::v1::ListContainersRequest;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Request, Status};
use shoal_api::oci::OciRef;
use shoal_registry::Registries;
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

impl ContainerRuntime for Containerd {
    fn prepare<'a>(
        &'a self,
        image: &'a OciRef,
    ) -> BoxFuture<'a, Result<Arc<PreparedImage>, String>> {
        Box::pin(async move {
            Containerd::prepare(self, image)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn start<'a>(
        &'a self,
        image: Arc<PreparedImage>,
        run: &'a ContainerRun,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let started = self.begin(&image, run).await;
            if started.is_err() {
                self.remove(&run.id).await;
            }
            started.map_err(|e| e.to_string())
        })
    }

    fn wait<'a>(
        &'a self,
        run: &'a ContainerRun,
        cancel: CancellationToken,
        detach: CancellationToken,
    ) -> BoxFuture<'a, Exit> {
        Box::pin(self.finish(run, cancel, detach))
    }

    fn usage(&self, id: &str) -> Option<UsageSample> {
        cgroup_usage(std::path::Path::new("/sys/fs/cgroup"), &self.namespace, id)
    }
}
