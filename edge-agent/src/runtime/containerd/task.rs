//! A container's life in containerd: begin (start it, or adopt a running task of the same
//! id, after removing a crash's leftovers), create (snapshot, spec, container) under a
//! lease, start its task with stdout and stderr appended to the replica's log, wait (the log
//! kept bounded meanwhile; on cancel SIGTERM, then SIGKILL after the grace period; left
//! running when the agent is stopping), remove task, container and snapshot, and how the
//! task's exit status (and the cgroup's OOM kill counter) becomes an [`Exit`].

use super::cgroup::oom_kills;
use super::log::{bound_log, LOG_CHECK};
use super::spec::{image_user, runtime_spec};
use super::{
    grpc, seccomp, ContainerRun, Containerd, ContainerdError, Exit, PreparedImage, MANAGED_LABEL,
    RUNTIME, SNAPSHOTTER, SPEC_TYPE,
};
use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteTaskRequest, KillRequest, StartRequest, WaitRequest,
};
use containerd_client::tonic::{Code, Status};
use shoal_daemon::clock::now_ms;
use std::collections::HashMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

impl Containerd {
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
            cap_bounding: tokio::fs::read_to_string("/proc/self/status")
                .await
                .ok()
                .and_then(|s| seccomp::cap_bounding(&s)),
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
}

pub(super) fn exit_of(
    w: Result<
        containerd_client::tonic::Response<containerd_client::services::v1::WaitResponse>,
        Status,
    >,
    run: &ContainerRun,
    oom_kills: Option<u64>,
) -> Exit {
    let limit = shoal_api::model::quantity::format_memory(run.memory_limit);
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
