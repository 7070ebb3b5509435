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

mod rootfs;
pub mod seccomp;
pub mod user;

use crate::runtime::{BoxFuture, ContainerRuntime, Exit, UsageSample};
pub use crate::runtime::{ContainerRun, ImageConfig, PreparedImage};
use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, CommitSnapshotRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, Container, CreateContainerRequest, CreateImageRequest, CreateTaskRequest,
    DeleteContainerRequest, DeleteTaskRequest, Image, InfoRequest, KillRequest,
    ListContainersRequest, StartRequest, UpdateImageRequest, UpdateRequest, WaitRequest,
    WriteAction, WriteContentRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::Descriptor;
use shoal_api::messages::now_ms;
use shoal_api::oci::OciRef;
use shoal_registry::{PulledImage, Registries};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use user::{ProcessUser, UserError, UserSpec};

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

/// Why no runtime spec could be built.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("nothing to run: the image has no entrypoint or command, and the manifest gives none")]
    NothingToRun,
    #[error(transparent)]
    Oci(#[from] oci_spec::OciSpecError),
}

fn grpc(what: impl Into<String>) -> impl FnOnce(Status) -> ContainerdError {
    let what = what.into();
    move |s| ContainerdError::Grpc {
        what,
        reason: format!("{}: {}", s.code(), s.message()),
    }
}

/// Builds the OCI runtime spec for `run` of `image`: argv from the command/args or the image,
/// environment from the image then the manifest, `user` (the image's `USER`, resolved), the
/// memory limit and CPU quota as cgroup limits, a read-only root unless asked otherwise,
/// volumes as bind mounts, the host network (ports behave like the WASM variant's: on the
/// device's addresses), containerd's usual device allow-list and its default seccomp
/// profile for `host`.
pub fn runtime_spec(
    image: &ImageConfig,
    run: &ContainerRun,
    namespace: &str,
    user: &ProcessUser,
    host: &seccomp::Host,
) -> Result<oci_spec::runtime::Spec, SpecError> {
    use oci_spec::runtime::{
        LinuxCpuBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxMemoryBuilder,
        LinuxNamespaceType, LinuxResourcesBuilder,
    };
    let entrypoint = if run.command.is_empty() {
        image.entrypoint.clone()
    } else {
        run.command.clone()
    };
    let cmd = if run.args.is_empty() && run.command.is_empty() {
        image.cmd.clone()
    } else {
        run.args.clone()
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(SpecError::NothingToRun);
    }
    let mut env: Vec<String> = image.env.clone();
    for (k, v) in &run.env {
        env.retain(|e| e.split_once('=').map(|(n, _)| n) != Some(k.as_str()));
        env.push(format!("{k}={v}"));
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    let mut spec = oci_spec::runtime::Spec::default();
    spec.set_hostname(Some(run.id.clone()));
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(argv));
    process.set_env(Some(env));
    process.set_terminal(Some(false));
    if !image.working_dir.is_empty() {
        process.set_cwd(PathBuf::from(&image.working_dir));
    }
    let mut who = process.user().clone();
    who.set_uid(user.uid);
    who.set_gid(user.gid);
    who.set_additional_gids(
        (!user.additional_gids.is_empty()).then(|| user.additional_gids.clone()),
    );
    process.set_user(who);
    let bounding = process
        .capabilities()
        .as_ref()
        .and_then(|c| c.bounding().clone())
        .unwrap_or_default();
    spec.set_process(Some(process));
    if let Some(root) = spec.root().clone() {
        let mut root = root;
        root.set_readonly(Some(run.read_only_root));
        spec.set_root(Some(root));
    }
    // Volumes: read-write bind mounts (writable under a read-only root; runc creates the
    // mount point before it makes the root read-only); secrets: read-only ones. Private
    // propagation: nothing mounted inside leaks back to the device; no set-uid programs or
    // device files from them.
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for m in &run.mounts {
        mounts.push(
            oci_spec::runtime::MountBuilder::default()
                .destination(PathBuf::from(&m.guest))
                .typ("bind")
                .source(m.host.clone())
                .options(vec![
                    "rbind".into(),
                    "rprivate".into(),
                    "nosuid".into(),
                    "nodev".into(),
                    if m.read_only { "ro" } else { "rw" }.into(),
                ])
                .build()?,
        );
    }
    spec.set_mounts(Some(mounts));
    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_cgroups_path(Some(PathBuf::from(format!("/{namespace}/{}", run.id))));
    // Host network: no network namespace.
    if let Some(ns) = linux.namespaces().clone() {
        linux.set_namespaces(Some(
            ns.into_iter()
                .filter(|n| n.typ() != LinuxNamespaceType::Network)
                .collect(),
        ));
    }
    let memory = i64::try_from(run.memory_limit).unwrap_or(i64::MAX);
    let mut resources = LinuxResourcesBuilder::default().memory(
        LinuxMemoryBuilder::default()
            .limit(memory)
            .swap(memory)
            .build()?,
    );
    if let Some(m) = run.cpu_millis {
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(i64::from(m) * 100)
                .period(100_000u64)
                .build()?,
        );
    }
    // Deny every device, then allow the ones every container needs (null, zero, full,
    // random, urandom, tty, console, ptmx, pts), as containerd's own default spec does.
    let mut devices = vec![LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()?];
    for (major, minor) in [
        (1, Some(3)),
        (1, Some(5)),
        (1, Some(7)),
        (1, Some(8)),
        (1, Some(9)),
        (5, Some(0)),
        (5, Some(1)),
        (5, Some(2)),
        (136, None),
    ] {
        let mut b = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(major)
            .access("rwm");
        if let Some(minor) = minor {
            b = b.minor(minor);
        }
        devices.push(b.build()?);
    }
    resources = resources.devices(devices);
    linux.set_resources(Some(resources.build()?));
    linux.set_seccomp(Some(seccomp::default_profile(host, &bounding)?));
    spec.set_linux(Some(linux));
    Ok(spec)
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

    /// Pulls and unpacks the pinned `image` for this device's architecture, unless it was
    /// prepared before and its snapshot still exists.
    pub async fn prepare(&self, image: &OciRef) -> Result<Arc<PreparedImage>, ContainerdError> {
        let Some(digest) = &image.digest else {
            return Err(ContainerdError::Image {
                image: image.to_string(),
                reason: "not pinned".into(),
            });
        };
        let record = self.cache.join(format!("{}.json", digest.hex()));
        if let Ok(bytes) = tokio::fs::read(&record).await {
            if let Ok(p) = serde_json::from_slice::<PreparedImage>(&bytes) {
                if self.snapshot_exists(&p.chain).await {
                    return Ok(Arc::new(p));
                }
            }
        }
        let blobs = self.cache.join("blobs");
        let pulled = self
            .registries
            .pull_image(
                image,
                std::env::consts::ARCH,
                shoal_api::oci::native_variant(),
                &blobs,
            )
            .await?;
        let prepared = self.import(&pulled).await?;
        let bytes = serde_json::to_vec(&prepared).unwrap_or_default();
        let tmp = record.with_extension("tmp");
        let io = |p: &Path| {
            let path = p.display().to_string();
            move |source| ContainerdError::Io { path, source }
        };
        tokio::fs::write(&tmp, bytes).await.map_err(io(&tmp))?;
        tokio::fs::rename(&tmp, &record)
            .await
            .map_err(io(&record))?;
        // The blobs now live in containerd's content store.
        for l in &pulled.layers {
            let _ = tokio::fs::remove_file(&l.path).await;
        }
        let _ = tokio::fs::remove_file(blobs.join(pulled.config.2.hex())).await;
        info!(image = %image, chain = %prepared.chain, "image pulled and unpacked");
        Ok(Arc::new(prepared))
    }

    async fn snapshot_exists(&self, key: &str) -> bool {
        SnapshotsClient::new(self.channel.clone())
            .stat(self.req(
                StatSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.into(),
                },
                None,
            ))
            .await
            .is_ok()
    }

    /// Writes a pulled image into containerd and unpacks it, under a lease so that nothing
    /// is collected half-way.
    async fn import(&self, p: &PulledImage) -> Result<PreparedImage, ContainerdError> {
        let lease = format!("shoal-pull-{}", rand::random::<u64>());
        let expire = humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() + Duration::from_secs(3600),
        )
        .to_string();
        self.client()
            .leases()
            .create(self.req(
                containerd_client::services::v1::CreateRequest {
                    id: lease.clone(),
                    labels: HashMap::from([("containerd.io/gc.expire".into(), expire)]),
                },
                None,
            ))
            .await
            .map_err(grpc("lease create"))?;
        let result = self.import_leased(p, &lease).await;
        let _ = self
            .client()
            .leases()
            .delete(self.req(
                containerd_client::services::v1::DeleteRequest {
                    id: lease,
                    sync: false,
                },
                None,
            ))
            .await;
        result
    }

    async fn import_leased(
        &self,
        p: &PulledImage,
        lease: &str,
    ) -> Result<PreparedImage, ContainerdError> {
        let image = p.reference.to_string();
        let bad = |reason: String| ContainerdError::Image {
            image: image.clone(),
            reason,
        };
        let config = ImageConfig::from_blob(&p.config.1).map_err(&bad)?;
        let config_json: serde_json::Value =
            serde_json::from_slice(&p.config.1).map_err(|e| bad(e.to_string()))?;
        let diff_ids: Vec<String> = config_json["rootfs"]["diff_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_str().map(str::to_string))
            .collect();
        if diff_ids.len() != p.layers.len() {
            return Err(bad(format!(
                "{} layers but {} diff ids in the config",
                p.layers.len(),
                diff_ids.len()
            )));
        }
        // Children first: layers, config, manifest, index; each parent labels its children
        // so that containerd's garbage collector keeps them.
        let mut manifest_labels = HashMap::new();
        for (i, l) in p.layers.iter().enumerate() {
            let bytes = tokio::fs::read(&l.path)
                .await
                .map_err(|source| ContainerdError::Io {
                    path: l.path.display().to_string(),
                    source,
                })?;
            self.write_blob(lease, l.digest.as_str(), &bytes, HashMap::new())
                .await?;
            manifest_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.to_string(),
            );
        }
        self.write_blob(lease, p.config.2.as_str(), &p.config.1, HashMap::new())
            .await?;
        manifest_labels.insert(
            "containerd.io/gc.ref.content.config".into(),
            p.config.2.to_string(),
        );
        self.write_blob(lease, p.manifest.2.as_str(), &p.manifest.1, manifest_labels)
            .await?;
        let target = match &p.index {
            Some((media, bytes)) => {
                let digest = shoal_api::ids::Digest::of(bytes);
                let labels = HashMap::from([(
                    "containerd.io/gc.ref.content.m.0".to_string(),
                    p.manifest.2.to_string(),
                )]);
                self.write_blob(lease, digest.as_str(), bytes, labels)
                    .await?;
                Descriptor {
                    media_type: media.clone(),
                    digest: digest.to_string(),
                    size: bytes.len() as i64,
                    annotations: HashMap::new(),
                }
            }
            None => Descriptor {
                media_type: p.manifest.0.clone(),
                digest: p.manifest.2.to_string(),
                size: p.manifest.1.len() as i64,
                annotations: HashMap::new(),
            },
        };
        let name = p.reference.without_scheme();
        let record = Image {
            name: name.clone(),
            target: Some(target),
            ..Default::default()
        };
        let mut images = self.client().images();
        match images
            .create(self.req(
                CreateImageRequest {
                    image: Some(record.clone()),
                    ..Default::default()
                },
                Some(lease),
            ))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {
                images
                    .update(self.req(
                        UpdateImageRequest {
                            image: Some(record),
                            ..Default::default()
                        },
                        Some(lease),
                    ))
                    .await
                    .map_err(grpc("image update"))?;
            }
            Err(s) => return Err(grpc("image create")(s)),
        }

        // Unpack: one committed snapshot per layer, named by its chain id.
        let mut snapshots = SnapshotsClient::new(self.channel.clone());
        let mut content = self.client().content();
        let mut parent = String::new();
        for (i, l) in p.layers.iter().enumerate() {
            let chain = if i == 0 {
                diff_ids[0].clone()
            } else {
                shoal_api::ids::Digest::of(format!("{parent} {}", diff_ids[i]).as_bytes())
                    .to_string()
            };
            if self.snapshot_exists(&chain).await {
                parent = chain;
                continue;
            }
            let key = format!("extract-{} {chain}", rand::random::<u32>());
            let mounts = snapshots
                .prepare(self.req(
                    PrepareSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key: key.clone(),
                        parent: parent.clone(),
                        labels: HashMap::from([(
                            "containerd.io/snapshot.ref".into(),
                            chain.clone(),
                        )]),
                    },
                    Some(lease),
                ))
                .await
                .map_err(grpc("snapshot prepare"))?
                .into_inner()
                .mounts;
            let applied = self
                .client()
                .diff()
                .apply(self.req(
                    ApplyRequest {
                        diff: Some(Descriptor {
                            media_type: l.media_type.clone(),
                            digest: l.digest.to_string(),
                            size: l.size as i64,
                            annotations: HashMap::new(),
                        }),
                        mounts,
                        ..Default::default()
                    },
                    Some(lease),
                ))
                .await
                .map_err(grpc("layer apply"))?
                .into_inner()
                .applied;
            let applied = applied.map(|a| a.digest).unwrap_or_default();
            if applied != diff_ids[i] {
                let _ = snapshots
                    .remove(self.req(
                        RemoveSnapshotRequest {
                            snapshotter: SNAPSHOTTER.into(),
                            key,
                        },
                        Some(lease),
                    ))
                    .await;
                return Err(bad(format!(
                    "layer {} unpacked to {applied}, but the config says {}",
                    l.digest, diff_ids[i]
                )));
            }
            snapshots
                .commit(self.req(
                    CommitSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        name: chain.clone(),
                        key,
                        labels: HashMap::new(),
                    },
                    Some(lease),
                ))
                .await
                .map_err(grpc("snapshot commit"))?;
            self.label(
                &mut content,
                lease,
                l.digest.as_str(),
                "containerd.io/uncompressed",
                &diff_ids[i],
            )
            .await?;
            parent = chain;
        }
        // This label keeps the unpacked chain alive as long as the image is.
        self.label(
            &mut content,
            lease,
            p.config.2.as_str(),
            &format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
            &parent,
        )
        .await?;
        Ok(PreparedImage {
            name,
            chain: parent,
            config,
        })
    }

    async fn label(
        &self,
        content: &mut containerd_client::services::v1::content_client::ContentClient<Channel>,
        lease: &str,
        digest: &str,
        key: &str,
        value: &str,
    ) -> Result<(), ContainerdError> {
        content
            .update(self.req(
                UpdateRequest {
                    info: Some(containerd_client::services::v1::Info {
                        digest: digest.into(),
                        labels: HashMap::from([(key.to_string(), value.to_string())]),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec![format!("labels.{key}")],
                    }),
                },
                Some(lease),
            ))
            .await
            .map_err(grpc("content label"))?;
        Ok(())
    }

    /// Writes `bytes` as blob `digest` into the content store, unless it is there.
    async fn write_blob(
        &self,
        lease: &str,
        digest: &str,
        bytes: &[u8],
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let mut content = self.client().content();
        match content
            .info(self.req(
                InfoRequest {
                    digest: digest.into(),
                },
                Some(lease),
            ))
            .await
        {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(grpc("content info")(s)),
        }
        let total = bytes.len() as i64;
        let r#ref = format!("shoal-{digest}");
        let mut msgs: Vec<WriteContentRequest> = bytes
            .chunks(1 << 20)
            .scan(0i64, |offset, chunk| {
                let m = WriteContentRequest {
                    action: WriteAction::Write as i32,
                    r#ref: r#ref.clone(),
                    total,
                    expected: digest.into(),
                    offset: *offset,
                    data: chunk.to_vec(),
                    labels: HashMap::new(),
                };
                *offset += chunk.len() as i64;
                Some(m)
            })
            .collect();
        msgs.push(WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref,
            total,
            expected: digest.into(),
            offset: total,
            data: Vec::new(),
            labels,
        });
        let written = content
            .write(self.req(tokio_stream::iter(msgs), Some(lease)))
            .await;
        match written {
            Ok(resp) => {
                let mut resp = resp.into_inner();
                while resp
                    .message()
                    .await
                    .map_err(grpc(format!("content write of {digest}")))?
                    .is_some()
                {}
                Ok(())
            }
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(grpc(format!("content write of {digest}"))(s)),
        }
    }

    /// Runs one container to its end (or until `cancel`), then removes it: [`Self::begin`]
    /// then [`Self::finish`].
    pub async fn run(
        &self,
        image: &PreparedImage,
        run: &ContainerRun,
        cancel: CancellationToken,
        detach: CancellationToken,
    ) -> Exit {
        if let Err(e) = self.begin(image, run).await {
            self.remove(&run.id).await;
            return Exit::Failure {
                code: None,
                reason: format!("cannot start the container: {e}"),
            };
        }
        self.finish(run, cancel, detach).await
    }

    /// Starts the container, or adopts a task of the same id that is still running (the
    /// agent restarted under it); anything else of that id (a crash's leftovers) is removed
    /// first.
    pub async fn begin(
        &self,
        image: &PreparedImage,
        run: &ContainerRun,
    ) -> Result<(), ContainerdError> {
        match self.task_state(&run.id).await {
            Some(true) => {
                info!(container = %run.id, "adopting the running container");
                return Ok(());
            }
            Some(false) => self.remove(&run.id).await,
            // No task: clean up only if a container record is left (a first start, the
            // common case, then costs no clean-up calls).
            None if self.container_exists(&run.id).await => self.remove(&run.id).await,
            None => {}
        }
        self.start(image, run).await
    }

    /// Waits for the started container's end (or stops it on `cancel`) and removes it,
    /// unless the agent is stopping (`detach`): then it is left running, to be adopted.
    pub async fn finish(
        &self,
        run: &ContainerRun,
        cancel: CancellationToken,
        detach: CancellationToken,
    ) -> Exit {
        let exit = self.wait(run, cancel, &detach).await;
        if exit == Exit::Cancelled && detach.is_cancelled() {
            info!(container = %run.id, "agent stopping: container left running, to be adopted");
        } else {
            self.remove(&run.id).await;
        }
        exit
    }

    /// Task `id`: `None` if there is none, else whether it runs.
    async fn task_state(&self, id: &str) -> Option<bool> {
        let got = self
            .client()
            .tasks()
            .get(self.req(
                containerd_client::services::v1::GetRequest {
                    container_id: id.into(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await
            .ok()?;
        Some(
            got.into_inner()
                .process
                .is_some_and(|p| p.status == containerd_client::types::v1::Status::Running as i32),
        )
    }

    async fn container_exists(&self, id: &str) -> bool {
        self.client()
            .containers()
            .get(self.req(
                containerd_client::services::v1::GetContainerRequest { id: id.into() },
                None,
            ))
            .await
            .is_ok()
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

    async fn start(
        &self,
        image: &PreparedImage,
        run: &ContainerRun,
    ) -> Result<(), ContainerdError> {
        let lease = format!("shoal-run-{}", run.id);
        let mut leases = self.client().leases();
        leases
            .create(self.req(
                containerd_client::services::v1::CreateRequest {
                    id: lease.clone(),
                    labels: HashMap::new(),
                },
                None,
            ))
            .await
            .map_err(grpc("lease create"))?;
        let created = self.create(image, run, &lease).await;
        let _ = leases
            .delete(self.req(
                containerd_client::services::v1::DeleteRequest {
                    id: lease,
                    sync: false,
                },
                None,
            ))
            .await;
        let mounts = created?;
        // The shim appends both streams to the replica's log (one `file://` URI for both:
        // containerd 1.6's shim mishandles a file stdout with an empty stderr).
        if let Some(dir) = run.log_path.parent() {
            let _ = tokio::fs::create_dir_all(dir).await;
        }
        let log = format!("file://{}", run.log_path.display());
        let mut tasks = self.client().tasks();
        tasks
            .create(self.req(
                CreateTaskRequest {
                    container_id: run.id.clone(),
                    rootfs: mounts,
                    stdout: log.clone(),
                    stderr: log,
                    ..Default::default()
                },
                None,
            ))
            .await
            .map_err(grpc("task create"))?;
        tasks
            .start(self.req(
                StartRequest {
                    container_id: run.id.clone(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await
            .map_err(grpc("task start"))?;
        Ok(())
    }

    /// Prepares the container's snapshot, builds its spec (the image's user is read from
    /// the snapshot) and creates the container.
    async fn create(
        &self,
        image: &PreparedImage,
        run: &ContainerRun,
        lease: &str,
    ) -> Result<Vec<containerd_client::types::Mount>, ContainerdError> {
        let mut snapshots = SnapshotsClient::new(self.channel.clone());
        let prepare = || {
            self.req(
                PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: run.id.clone(),
                    parent: image.chain.clone(),
                    labels: HashMap::new(),
                },
                Some(lease),
            )
        };
        let prepared = match snapshots.prepare(prepare()).await {
            // A snapshot left without its container (a crash between the two): replace it.
            Err(s) if s.code() == Code::AlreadyExists => {
                let _ = snapshots
                    .remove(self.req(
                        RemoveSnapshotRequest {
                            snapshotter: SNAPSHOTTER.into(),
                            key: run.id.clone(),
                        },
                        Some(lease),
                    ))
                    .await;
                snapshots.prepare(prepare()).await
            }
            other => other,
        };
        let mounts = prepared
            .map_err(grpc("snapshot prepare"))?
            .into_inner()
            .mounts;
        let user = image_user(image, &mounts).await?;
        let host = seccomp::Host {
            arch: std::env::consts::ARCH,
            kernel: tokio::fs::read_to_string("/proc/sys/kernel/osrelease")
                .await
                .ok()
                .and_then(|r| seccomp::kernel_version(&r)),
        };
        let spec =
            runtime_spec(&image.config, run, &self.namespace, &user, &host).map_err(|source| {
                ContainerdError::Spec {
                    image: image.name.clone(),
                    source,
                }
            })?;
        let spec = serde_json::to_vec(&spec).map_err(|e| ContainerdError::Image {
            image: image.name.clone(),
            reason: e.to_string(),
        })?;
        let mut labels: HashMap<String, String> = run
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(MANAGED_LABEL.into(), "true".into());
        self.client()
            .containers()
            .create(self.req(
                CreateContainerRequest {
                    container: Some(Container {
                        id: run.id.clone(),
                        image: image.name.clone(),
                        labels,
                        runtime: Some(Runtime {
                            name: RUNTIME.into(),
                            options: None,
                        }),
                        spec: Some(prost_types::Any {
                            type_url: SPEC_TYPE.into(),
                            value: spec,
                        }),
                        snapshotter: SNAPSHOTTER.into(),
                        snapshot_key: run.id.clone(),
                        ..Default::default()
                    }),
                },
                Some(lease),
            ))
            .await
            .map_err(grpc("container create"))?;
        Ok(mounts)
    }

    /// Waits for the task's exit; on cancel, SIGTERM, then SIGKILL after the grace period
    /// (unless `detach`: then it is left running).
    async fn wait(
        &self,
        run: &ContainerRun,
        cancel: CancellationToken,
        detach: &CancellationToken,
    ) -> Exit {
        let waiter = {
            let mut tasks = self.client().tasks();
            let req = self.req(
                WaitRequest {
                    container_id: run.id.clone(),
                    exec_id: String::new(),
                },
                None,
            );
            async move { tasks.wait(req).await }
        };
        tokio::pin!(waiter);
        // The shim writes the log itself; keep it bounded and time-indexed meanwhile.
        let mut check = tokio::time::interval(LOG_CHECK);
        let mut sampler = crate::logs::Sampler::new(&run.log_path, run.log_max_bytes);
        loop {
            tokio::select! {
                w = &mut waiter => {
                    // The cgroup goes with the task: read it before the task is deleted.
                    let oom = oom_kills(&self.namespace, &run.id).await;
                    return exit_of(w, run, oom);
                }
                _ = cancel.cancelled() => break,
                _ = check.tick() => {
                    match bound_log(&run.log_path, run.log_max_bytes).await {
                        Ok(true) => sampler.rotated(now_ms()),
                        Ok(false) => {}
                        Err(e) => warn!(container = %run.id, error = %e, "cannot rotate the container log"),
                    }
                    if let Ok(m) = tokio::fs::metadata(&run.log_path).await {
                        sampler.observe(now_ms(), m.len());
                    }
                }
            }
        }
        if detach.is_cancelled() {
            return Exit::Cancelled;
        }
        self.kill(&run.id, 15, false).await;
        match tokio::time::timeout(run.stop_grace, &mut waiter).await {
            Ok(_) => {}
            Err(_) => {
                warn!(container = %run.id, grace_ms = run.stop_grace.as_millis() as u64, "no exit after SIGTERM; sending SIGKILL");
                self.kill(&run.id, 9, true).await;
                let _ = tokio::time::timeout(Duration::from_secs(10), &mut waiter).await;
            }
        }
        Exit::Cancelled
    }

    async fn kill(&self, id: &str, signal: u32, all: bool) {
        let _ = self
            .client()
            .tasks()
            .kill(self.req(
                KillRequest {
                    container_id: id.into(),
                    exec_id: String::new(),
                    signal,
                    all,
                },
                None,
            ))
            .await;
    }

    /// Removes task, container and snapshot `id`, whatever of them exists.
    pub async fn remove(&self, id: &str) {
        let mut tasks = self.client().tasks();
        let _ = tasks
            .kill(self.req(
                KillRequest {
                    container_id: id.into(),
                    exec_id: String::new(),
                    signal: 9,
                    all: true,
                },
                None,
            ))
            .await;
        let _ = tasks
            .delete(self.req(
                DeleteTaskRequest {
                    container_id: id.into(),
                },
                None,
            ))
            .await;
        let _ = self
            .client()
            .containers()
            .delete(self.req(DeleteContainerRequest { id: id.into() }, None))
            .await;
        let _ = SnapshotsClient::new(self.channel.clone())
            .remove(self.req(
                RemoveSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: id.into(),
                },
                None,
            ))
            .await;
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

/// The user `image` runs as: its `USER`, resolved in the image's `/etc/passwd` and
/// `/etc/group`, which are read from the container's snapshot `mounts` only when a name (or
/// a uid without a group, for its gid) asks for them. Root when the image names no user.
async fn image_user(
    image: &PreparedImage,
    mounts: &[containerd_client::types::Mount],
) -> Result<ProcessUser, ContainerdError> {
    let bad_user = |source| ContainerdError::User {
        image: image.name.clone(),
        source,
    };
    let Some(spec) = UserSpec::parse(&image.config.user).map_err(bad_user)? else {
        return Ok(ProcessUser::default());
    };
    let (passwd, group) = if spec.needs_files() {
        let layers = rootfs::layers(mounts);
        let read = tokio::task::spawn_blocking(move || {
            let layers = layers?;
            let text = |path| {
                rootfs::read_file(&layers, path)
                    .map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()))
            };
            Ok((text("/etc/passwd")?, text("/etc/group")?))
        })
        .await
        .unwrap_or_else(|e| {
            Err(rootfs::RootfsError::Io {
                path: "/etc/passwd".into(),
                source: std::io::Error::other(e.to_string()),
            })
        });
        read.map_err(|source| ContainerdError::Rootfs {
            image: image.name.clone(),
            user: image.config.user.clone(),
            source,
        })?
    } else {
        (None, None)
    };
    user::resolve(&spec, passwd.as_deref(), group.as_deref()).map_err(bad_user)
}

/// Memory and CPU time of container `id`'s cgroup under `root` (cgroup v2:
/// `memory.current`, `cpu.stat` `usage_usec`; v1: `memory/…/memory.usage_in_bytes`,
/// `cpuacct/…/cpuacct.usage`). `None` when neither layout can be read.
pub fn cgroup_usage(root: &Path, namespace: &str, id: &str) -> Option<UsageSample> {
    let read = |p: PathBuf| std::fs::read_to_string(p).ok();
    let number = |t: String| t.trim().parse::<u64>().ok();
    let v2 = root.join(namespace).join(id);
    if let Some(memory) = read(v2.join("memory.current")).and_then(number) {
        let cpu_usec = read(v2.join("cpu.stat"))
            .and_then(|t| {
                t.lines().find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == "usage_usec")
                        .then(|| v.trim().parse::<u64>().ok())
                        .flatten()
                })
            })
            .unwrap_or(0);
        return Some(UsageSample {
            memory_bytes: memory,
            cpu_nanos: cpu_usec.saturating_mul(1000),
        });
    }
    let memory = read(
        root.join("memory")
            .join(namespace)
            .join(id)
            .join("memory.usage_in_bytes"),
    )
    .and_then(number)?;
    let cpu_nanos = read(
        root.join("cpuacct")
            .join(namespace)
            .join(id)
            .join("cpuacct.usage"),
    )
    .and_then(number)
    .unwrap_or(0);
    Some(UsageSample {
        memory_bytes: memory,
        cpu_nanos,
    })
}

/// How often a running container's log size is checked (also the precision of its time
/// index, see [`crate::logs::Sampler`]).
const LOG_CHECK: Duration = Duration::from_secs(1);

/// Keeps a log the shim appends to within about `max` bytes: once over, its content is copied
/// to `{path}.1` (replacing the older one) and the file truncated in place. The shim writes
/// with `O_APPEND`, so it simply goes on at the new end (copytruncate, as logrotate does: a
/// line written between the copy and the truncation may be lost). Written by hand: no crate
/// rotates a file another process holds open.
pub async fn bound_log(path: &Path, max: u64) -> std::io::Result<bool> {
    let len = match tokio::fs::metadata(path).await {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(false);
    }
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    tokio::fs::copy(path, PathBuf::from(rotated)).await?;
    tokio::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .await?
        .set_len(0)
        .await?;
    Ok(true)
}

/// How many processes of container `id` the kernel's OOM killer has killed, from its memory
/// cgroup (`runtime_spec` puts it at `/{namespace}/{id}`): `memory.events` under cgroup v2,
/// `memory.oom_control` under v1. `None` when neither can be read (another cgroup driver, or
/// a kernel without the counter).
async fn oom_kills(namespace: &str, id: &str) -> Option<u64> {
    let v2 = format!("/sys/fs/cgroup/{namespace}/{id}/memory.events");
    let v1 = format!("/sys/fs/cgroup/memory/{namespace}/{id}/memory.oom_control");
    for path in [v2, v1] {
        if let Ok(text) = tokio::fs::read_to_string(&path).await {
            if let Some(n) = parse_oom_kills(&text) {
                return Some(n);
            }
        }
    }
    None
}

/// The `oom_kill N` line of a `memory.events` or `memory.oom_control` file.
pub fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == "oom_kill").then(|| v.trim().parse().ok()).flatten()
    })
}

fn exit_of(
    w: Result<
        containerd_client::tonic::Response<containerd_client::services::v1::WaitResponse>,
        Status,
    >,
    run: &ContainerRun,
    oom_kills: Option<u64>,
) -> Exit {
    let limit = shoal_api::quantity::format_memory(run.memory_limit);
    match w {
        Ok(r) => match r.into_inner().exit_status {
            0 => Exit::Success,
            // The OOM killer may also take a child while the main process lives on and
            // exits otherwise: a failure says so whatever its status (the counter is the
            // container's own cgroup's: its limit was hit, not the machine's memory).
            n if oom_kills.is_some_and(|k| k > 0) => Exit::Failure {
                code: i32::try_from(n).ok(),
                reason: format!("OOMKilled: memory limit of {limit} exceeded (status {n})"),
            },
            137 if oom_kills == Some(0) => Exit::Failure {
                code: Some(137),
                reason: "killed by SIGKILL (status 137)".to_string(),
            },
            // 128 + SIGKILL, cgroup unreadable: with a memory limit, most likely the OOM
            // killer.
            137 => Exit::Failure {
                code: Some(137),
                reason: format!(
                    "killed (status 137): memory limit of {limit} exceeded, or SIGKILL"
                ),
            },
            n => Exit::Failure {
                code: i32::try_from(n).ok(),
                reason: format!("exited with status {n}"),
            },
        },
        Err(s) => Exit::Failure {
            code: None,
            reason: format!("lost the task: {}: {}", s.code(), s.message()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn run() -> ContainerRun {
        ContainerRun {
            id: "web-0".into(),
            command: vec![],
            args: vec![],
            env: BTreeMap::from([
                ("GREETING".into(), "hi".into()),
                ("PATH".into(), "/x".into()),
            ]),
            memory_limit: 64 << 20,
            cpu_millis: Some(250),
            read_only_root: true,
            mounts: vec![crate::runtime::Mount {
                host: "/var/lib/shoal/volumes/web/data".into(),
                guest: "/data".into(),
                read_only: false,
            }],
            log_path: "/l".into(),
            log_max_bytes: 1 << 20,
            stop_grace: Duration::from_secs(1),
            labels: BTreeMap::new(),
        }
    }

    fn image() -> ImageConfig {
        ImageConfig::from_blob(
            br#"{"config":{"Env":["PATH=/bin","A=1"],"Entrypoint":["/bin/busybox"],"Cmd":["sh"],"WorkingDir":"/w","User":"1000:1000"},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap()
    }

    #[test]
    fn usage_is_read_from_either_cgroup_version() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(cgroup_usage(root.path(), "shoal", "c1"), None);
        let v2 = root.path().join("shoal/c1");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("memory.current"), "4096\n").unwrap();
        std::fs::write(v2.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        assert_eq!(
            cgroup_usage(root.path(), "shoal", "c1"),
            Some(UsageSample {
                memory_bytes: 4096,
                cpu_nanos: 1_500_000
            })
        );
        let v1 = root.path().join("memory/shoal/c2");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.usage_in_bytes"), "8192\n").unwrap();
        let cpu = root.path().join("cpuacct/shoal/c2");
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::write(cpu.join("cpuacct.usage"), "777\n").unwrap();
        assert_eq!(
            cgroup_usage(root.path(), "shoal", "c2"),
            Some(UsageSample {
                memory_bytes: 8192,
                cpu_nanos: 777
            })
        );
    }

    #[test]
    fn oom_kill_counters_are_read_from_either_cgroup_version() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n";
        assert_eq!(parse_oom_kills(v2), Some(1));
        assert_eq!(parse_oom_kills(v1), Some(0));
        assert_eq!(parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n"), None);
    }

    #[tokio::test]
    async fn container_logs_are_bounded_by_copytruncate() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("box-0.log");
        assert!(!bound_log(&log, 10).await.unwrap(), "no file yet");
        std::fs::write(&log, "0123456789").unwrap();
        assert!(!bound_log(&log, 10).await.unwrap(), "within the bound");
        std::fs::write(&log, "0123456789abc").unwrap();
        assert!(bound_log(&log, 10).await.unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("box-0.log.1")).unwrap(),
            "0123456789abc"
        );
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
    }

    const HOST: seccomp::Host = seccomp::Host {
        arch: "x86_64",
        kernel: Some((6, 1)),
    };

    fn app_user() -> ProcessUser {
        ProcessUser {
            uid: 1000,
            gid: 1000,
            additional_gids: vec![1000, 2000],
        }
    }

    fn spec_of(image: &ImageConfig, run: &ContainerRun) -> oci_spec::runtime::Spec {
        runtime_spec(image, run, "shoal", &app_user(), &HOST).unwrap()
    }

    #[test]
    fn the_spec_confines_the_process() {
        let spec = spec_of(&image(), &run());
        let p = spec.process().as_ref().unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1000));
        assert_eq!(
            p.user().additional_gids().as_deref(),
            Some(&[1000, 2000][..])
        );
        let seccomp = spec.linux().as_ref().unwrap().seccomp().as_ref().unwrap();
        assert_eq!(
            seccomp.default_action(),
            oci_spec::runtime::LinuxSeccompAction::ScmpActErrno
        );
        assert!(seccomp.syscalls().as_ref().is_some_and(|s| !s.is_empty()));
        // Root, when the image names no user: no supplementary groups forced on it.
        let root = runtime_spec(&image(), &run(), "shoal", &ProcessUser::default(), &HOST).unwrap();
        let u = root.process().as_ref().unwrap().user().clone();
        assert_eq!(
            (u.uid(), u.gid(), u.additional_gids().clone()),
            (0, 0, None)
        );
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(json["process"]["user"]["additionalGids"][1], 2000);
    }

    #[tokio::test]
    async fn the_image_user_is_read_from_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (lower, upper) = (dir.path().join("1/fs"), dir.path().join("2/fs"));
        std::fs::create_dir_all(lower.join("etc")).unwrap();
        std::fs::create_dir_all(&upper).unwrap();
        std::fs::write(
            lower.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1234:1234::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(lower.join("etc/group"), "app:x:1234:\nsensors:x:2000:app\n").unwrap();
        let overlay = containerd_client::types::Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                format!("upperdir={}", upper.display()),
                format!("lowerdir={}", lower.display()),
            ],
            ..Default::default()
        };
        let zfs = containerd_client::types::Mount {
            r#type: "zfs".into(),
            ..Default::default()
        };
        let image = |user: &str| PreparedImage {
            name: "reg/app@sha256:ab".into(),
            chain: String::new(),
            config: ImageConfig {
                user: user.into(),
                ..Default::default()
            },
        };
        let user = |uid, gid, more: &[u32]| ProcessUser {
            uid,
            gid,
            additional_gids: more.to_vec(),
        };
        let ok = [
            ("", &overlay, ProcessUser::default()),
            ("app", &overlay, user(1234, 1234, &[1234, 2000])),
            ("1234", &overlay, user(1234, 1234, &[1234, 2000])),
            ("app:5", &overlay, user(1234, 5, &[])),
            // Both numbers: nothing to read, whatever the mount.
            ("7:8", &zfs, user(7, 8, &[])),
        ];
        for (name, mount, want) in ok {
            let got = image_user(&image(name), std::slice::from_ref(mount)).await;
            assert_eq!(got.unwrap(), want, "{name:?}");
        }
        let err = |name: &str, mount: &containerd_client::types::Mount| {
            let image = image(name);
            let mounts = [mount.clone()];
            async move { image_user(&image, &mounts).await.unwrap_err().to_string() }
        };
        assert_eq!(
            err("nobody-here", &overlay).await,
            r#"image reg/app@sha256:ab: user "nobody-here" is not in the image's /etc/passwd"#
        );
        assert_eq!(
            err("app:", &overlay).await,
            r#"image reg/app@sha256:ab: invalid user "app:": expected user or user:group, each a name or a number"#
        );
        let e = err("app", &zfs).await;
        assert!(
            e.contains(r#"resolve user "app""#) && e.contains(r#""zfs" mount"#),
            "{e}"
        );
    }

    #[test]
    fn the_spec_merges_image_and_manifest() {
        let spec = spec_of(&image(), &run());
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &["/bin/busybox", "sh"]);
        let env = p.env().as_ref().unwrap();
        assert!(env.contains(&"PATH=/x".to_string()) && !env.contains(&"PATH=/bin".to_string()));
        assert!(env.contains(&"A=1".to_string()) && env.contains(&"GREETING=hi".to_string()));
        assert_eq!(p.cwd(), &PathBuf::from("/w"));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1000));
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        let data = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == &PathBuf::from("/data"))
            .unwrap();
        assert_eq!(data.typ().as_deref(), Some("bind"));
        assert_eq!(
            data.source().as_deref(),
            Some(Path::new("/var/lib/shoal/volumes/web/data"))
        );
        assert!(data.options().as_ref().unwrap().contains(&"rw".to_string()));
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_ref().unwrap(),
            &PathBuf::from("/shoal/web-0")
        );
        let res = linux.resources().as_ref().unwrap();
        assert_eq!(res.memory().as_ref().unwrap().limit(), Some(64 << 20));
        assert_eq!(res.cpu().as_ref().unwrap().quota(), Some(25_000));
        assert!(linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .all(|n| n.typ() != oci_spec::runtime::LinuxNamespaceType::Network));
        // Manifest args replace Cmd; a command replaces the entrypoint (and Cmd).
        let mut r = run();
        r.args = vec!["-c".into(), "echo hi".into()];
        let spec = spec_of(&image(), &r);
        assert_eq!(
            spec.process().as_ref().unwrap().args().as_ref().unwrap(),
            &["/bin/busybox", "-c", "echo hi"]
        );
        r.command = vec!["/bin/true".into()];
        r.args.clear();
        let spec = spec_of(&image(), &r);
        assert_eq!(
            spec.process().as_ref().unwrap().args().as_ref().unwrap(),
            &["/bin/true"]
        );
        let e =
            runtime_spec(&ImageConfig::default(), &run(), "shoal", &app_user(), &HOST).unwrap_err();
        assert!(matches!(e, SpecError::NothingToRun), "{e}");
    }
}
