//! One task per replica: it owns that replica's state for its whole life.
//!
//! Pulling (fetch the module, or pull the container image, retried with back-off while the
//! hub or registry is unreachable) → Starting (compile, cached) → Running → on exit, the restart policy decides: `CrashLoopBackOff` while
//! waiting out an exponential back-off, or `Succeeded`/`Failed` for good. Every phase change is
//! sent to the agent's main loop as an [`Update`]; cancellation stops the replica at once.

use super::health;
use super::prestart::prestart;
use crate::core::plan::{after_exit, AfterExit};
use crate::logs::LogSink;
use crate::runtime::{BoxFuture, Exit, Network, RunSpec, Runtime, RuntimeError};
use crate::volumes::Volumes;
use shoal_api::model::workload::Variant;
use shoal_api::wire::messages::{DesiredWorkload, InstanceStatus, Phase};
use shoal_daemon::clock::now_ms;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

/// Bytes of log kept on disk per replica (plus one rotated file).
pub const LOG_MAX_BYTES: u64 = 1 << 20;

/// How often a replica that could not get its volumes or secrets looks again.
const PREPARE_RETRY: Duration = Duration::from_secs(5);

/// A status change of one replica, tagged with the supervising task so that late updates
/// from a replaced task are recognised and dropped.
#[derive(Debug, Clone)]
pub struct Update {
    pub instance: String,
    pub task: u64,
    pub status: InstanceStatus,
}

/// What every supervisor shares.
#[derive(Clone)]
pub struct Shared {
    /// The device's runtimes ([`crate::runtime::Runtimes`]; a fake in tests).
    pub runtime: Arc<dyn Runtime>,
    pub logs_dir: PathBuf,
    /// Where `spec.volumes` live.
    pub volumes: Volumes,
    /// Where opened secrets live.
    pub secrets: crate::secrets::SecretFiles,
    /// Where config files are written.
    pub configs: crate::configs::ConfigDirs,
    pub updates: mpsc::Sender<Update>,
    /// For HTTP health probes.
    pub http: reqwest::Client,
}

struct Reporter {
    instance: String,
    task: u64,
    status: InstanceStatus,
    tx: mpsc::Sender<Update>,
}

impl Reporter {
    async fn send(&self) {
        let _ = self
            .tx
            .send(Update {
                instance: self.instance.clone(),
                task: self.task,
                status: self.status.clone(),
            })
            .await;
    }

    /// The replica is done: `Succeeded` or `Failed`, for good (until its desired state
    /// changes, or, for a service, `shoal-agent restart`).
    async fn finish(&mut self, phase: Phase, reason: String) {
        self.status.finished_at_ms = Some(now_ms());
        self.status.backoff_ms = None;
        self.phase(phase, Some(reason)).await;
    }

    async fn phase(&mut self, phase: Phase, reason: Option<String>) {
        if self.status.phase != phase {
            info!(from = %self.status.phase, to = %phase, reason = reason.as_deref().unwrap_or(""), "replica phase");
        }
        self.status.phase = phase;
        self.status.reason = reason;
        self.send().await;
    }
}

/// Pulls with `attempt` until it works (like an image pull back-off: 0.5 s doubling to 30 s),
/// reporting `Pulling` with the last error. `None` when cancelled, or (once cancelled) after
/// an error that trying again cannot help, which fails the replica.
async fn pull<T, Fut>(
    r: &mut Reporter,
    log: &LogSink,
    cancel: &CancellationToken,
    mut attempt: impl FnMut() -> Fut,
) -> Option<T>
where
    Fut: std::future::Future<Output = Result<T, RuntimeError>>,
{
    let mut n = 0u32;
    loop {
        r.phase(Phase::Pulling, r.status.reason.clone()).await;
        let got = tokio::select! {
            _ = cancel.cancelled() => return None,
            got = attempt() => got,
        };
        match got {
            Ok(t) => return Some(t),
            Err(e) if e.is_final() => {
                // Trying again cannot help: failed until the desired state changes.
                let why = e.to_string();
                log.system(&why);
                r.finish(Phase::Failed, why).await;
                return None;
            }
            Err(e) => {
                let delay = Duration::from_millis((500u64 << n.min(6)).min(30_000));
                n += 1;
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "pull failed");
                r.status.reason = Some(format!("{e}; retrying in {}ms", delay.as_millis()));
                r.send().await;
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// How the agent reaches one supervised replica.
#[derive(Debug, Clone, Default)]
pub struct Controls {
    /// Stops the replica for good.
    pub cancel: CancellationToken,
    /// Restarts the current run now (`shoal-agent restart`): a running replica is stopped and
    /// started again, one waiting out a back-off or stopped by its restart policy starts at
    /// once. Counted as a restart.
    pub restart: Arc<tokio::sync::Notify>,
    /// What the replica's runs use (kept by its runtime).
    pub usage: Arc<crate::runtime::Usage>,
}

/// Supervises one replica until `controls.cancel` fires: Pending → Pulling (retried) →
/// Starting (prepare, then volumes and secrets) → Running → on exit, the restart policy.
pub async fn supervise(
    shared: Shared,
    desired: DesiredWorkload,
    artifact_base: String,
    network: Network,
    devices: crate::core::hardware::Grant,
    task: u64,
    controls: Controls,
) {
    let outer = controls.cancel.clone();
    // A job's run ends at its deadline: the life below sees it as a stop (so a run is stopped
    // and removed the usual way), and the deadline's verdict is reported after it.
    let deadline = desired
        .job
        .and_then(|j| j.active_deadline_ms)
        .map(|ms| (ms, tokio::time::Instant::now() + Duration::from_millis(ms)));
    let cancel = match deadline {
        Some(_) => outer.child_token(),
        None => outer.clone(),
    };
    let instance = desired.instance();
    let span = info_span!("replica", instance = %instance, revision = %desired.revision);
    async move {
        let mut r = Reporter {
            instance: instance.clone(),
            task,
            status: InstanceStatus {
                schedule: None,
                name: desired.name.clone(),
                replica: desired.replica,
                revision: desired.revision.clone(),
                phase: Phase::Pending,
                restarts: 0,
                reason: None,
                exit_code: None,
                started_at_ms: None,
                backoff_ms: None,
                variant: Variant::Wasm.as_str().into(),
                healthy: None,
                devices: devices.values().flatten().cloned().collect(),
                run: desired.job.map(|j| j.run),
                finished_at_ms: None,
            },
            tx: shared.updates.clone(),
        };
        let life = life(
            &shared,
            &desired,
            artifact_base,
            network,
            &devices,
            &controls,
            &cancel,
            &mut r,
        );
        match deadline {
            None => life.await,
            Some((ms, at)) => {
                let watchdog = async {
                    tokio::time::sleep_until(at).await;
                    cancel.cancel();
                    std::future::pending::<()>().await
                };
                tokio::select! {
                    _ = life => {}
                    _ = watchdog => {}
                }
                if r.status.finished_at_ms.is_none() && !outer.is_cancelled() {
                    let why = format!(
                        "deadline exceeded: the run took longer than activeDeadline {}",
                        shoal_api::model::quantity::format_duration_ms(ms)
                    );
                    warn!(%why, "job run stopped");
                    r.finish(Phase::Failed, why).await;
                }
            }
        }
        outer.cancelled().await;
    }
    .instrument(span)
    .await
}

/// The replica's life until it is stopped (`cancel`) or done for good (`finished_at_ms` set
/// in its last status, which is sent).
#[allow(clippy::too_many_arguments)]
async fn life(
    shared: &Shared,
    desired: &DesiredWorkload,
    artifact_base: String,
    network: Network,
    devices: &crate::core::hardware::Grant,
    controls: &Controls,
    cancel: &CancellationToken,
    r: &mut Reporter,
) {
    let instance = desired.instance();
    {
        let job = desired.job;
        let log = match LogSink::open(&shared.logs_dir, &instance, LOG_MAX_BYTES) {
            Ok(l) => l,
            Err(e) => {
                r.finish(Phase::Failed, format!("cannot open log file: {e}"))
                    .await;
                return;
            }
        };
        let runtime = shared.runtime.as_ref();
        let spec = RunSpec::for_replica(
            desired,
            artifact_base,
            network,
            controls.usage.clone(),
            LOG_MAX_BYTES,
        );
        let mut spec = match spec {
            Ok(spec) => spec,
            Err(e) => {
                let why = e.to_string();
                log.system(&why);
                r.finish(Phase::Failed, why).await;
                return;
            }
        };
        r.status.variant = spec.variant_name().into();

        let Some(pulled) = pull(r, &log, cancel, || runtime.pull(&spec)).await else {
            return;
        };
        r.phase(Phase::Starting, None).await;
        let prepared = tokio::select! {
            _ = cancel.cancelled() => return,
            p = runtime.prepare(&spec, pulled) => p,
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                log.system(&format!("cannot start: {e}"));
                r.finish(Phase::Failed, e.to_string()).await;
                return;
            }
        };

        let ready = match prestart(&shared.volumes, &shared.secrets, &shared.configs, desired) {
            Ok(x) => x,
            Err(e) => {
                log.system(&format!("cannot start: {e}"));
                // A job's run has not started: it waits rather than fails (which would be
                // its result).
                let phase = if job.is_some() {
                    Phase::Pending
                } else {
                    Phase::Failed
                };
                r.phase(phase, Some(e.to_string())).await;
                // A secret may still arrive under the same version (opened once the hub
                // re-sealed it, e.g. after the device enrolled again): look again now and
                // then rather than stay failed until the desired state changes.
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(PREPARE_RETRY) => {}
                    }
                    if let Ok(x) =
                        prestart(&shared.volumes, &shared.secrets, &shared.configs, desired)
                    {
                        break x;
                    }
                }
            }
        };
        ready.apply(&mut spec);
        spec.grant_devices(devices);
        let mut step = 0u32;
        loop {
            r.status.exit_code = None;
            r.status.backoff_ms = None;
            r.status.healthy = None;
            // A run is Running once it has started (a container's create and start take a
            // while); a failed start counts as a failed run for the restart policy.
            // The start is not raced against `cancel`: dropped half-way, it would leave a
            // created (or started) container behind that nothing removes. A cancel that
            // arrives meanwhile stops the started run through `wait` below, which also
            // removes it (or, when the agent is stopping, leaves it to be adopted).
            let started = runtime.start(&prepared, &spec, &log).await;
            if started.is_err() && cancel.is_cancelled() {
                // A failed start cleans up after itself.
                return;
            }
            r.status.started_at_ms = Some(now_ms());
            if started.is_ok() && !cancel.is_cancelled() {
                r.phase(Phase::Running, None).await;
            }
            let t0 = Instant::now();
            // The run has its own token, so that a failing health probe can stop it.
            let run_cancel = cancel.child_token();
            let run: BoxFuture<'_, Exit> = match started {
                Err(e) => Box::pin(std::future::ready(Exit::Failure {
                    code: None,
                    reason: e.to_string(),
                })),
                Ok(running) => running.wait(run_cancel.clone()),
            };
            // A restart request stops the run through its token, and the run is still
            // awaited to its end (a container is removed by `wait`, not dropped half-way).
            let run: BoxFuture<'_, Exit> = {
                let restart = controls.restart.clone();
                let stop = run_cancel.clone();
                Box::pin(async move {
                    tokio::select! {
                        exit = run => exit,
                        exit = async {
                            restart.notified().await;
                            stop.cancel();
                            std::future::pending::<Exit>().await
                        } => exit,
                    }
                })
            };
            let mut unhealthy = None;
            let exit = match &desired.health {
                None => run.await,
                Some(h) => {
                    tokio::pin!(run);
                    let mut probe = Box::pin(health::next_probe(h, &shared.http));
                    let mut failures = 0u32;
                    loop {
                        tokio::select! {
                            exit = &mut run => break exit,
                            res = &mut probe => {
                                let healthy = match res {
                                    Ok(()) => {
                                        failures = 0;
                                        true
                                    }
                                    Err(why) => {
                                        failures += 1;
                                        warn!(%why, failures, "health probe failed");
                                        if failures >= h.failure_threshold {
                                            let reason = format!("health check failed {failures} times: {why}");
                                            log.system(&reason);
                                            unhealthy = Some(reason);
                                            run_cancel.cancel();
                                        }
                                        false
                                    }
                                };
                                if r.status.healthy != Some(healthy) && (healthy || unhealthy.is_some()) {
                                    r.status.healthy = Some(healthy);
                                    r.send().await;
                                }
                                probe = Box::pin(health::next_probe(h, &shared.http));
                            }
                        }
                    }
                }
            };
            let exit = match (exit, unhealthy) {
                (Exit::Cancelled, Some(reason)) if !cancel.is_cancelled() => {
                    Exit::Failure { code: None, reason }
                }
                (Exit::Cancelled, None) if !cancel.is_cancelled() => {
                    info!("restarting on request");
                    log.system("restarting on request (shoal-agent restart)");
                    r.status.restarts += 1;
                    continue;
                }
                (exit, _) => exit,
            };
            let (success, code, reason) = match exit {
                Exit::Cancelled => return,
                Exit::Success => (true, Some(0), "completed (exit status 0)".to_string()),
                Exit::Failure { code, reason } => (false, code, reason),
            };
            r.status.exit_code = code;
            let (next, next_step) = after_exit(
                &desired.restart,
                success,
                step,
                t0.elapsed(),
                rand::random::<f64>(),
            );
            step = next_step;
            let gave_up = job.filter(|j| !success && j.gives_up(r.status.restarts));
            let next = if gave_up.is_some() {
                AfterExit::Stay
            } else {
                next
            };
            match next {
                AfterExit::Stay => {
                    let phase = if success {
                        Phase::Succeeded
                    } else {
                        Phase::Failed
                    };
                    match gave_up {
                        Some(j) => log.system(&format!(
                            "{reason}; backoffLimit {} reached: not retrying",
                            j.backoff_limit
                        )),
                        None => log.system(&format!(
                            "{reason}; restart policy {:?}: not restarting",
                            desired.restart.policy
                        )),
                    }
                    r.finish(phase, reason).await;
                    if job.is_some() {
                        // A job's run is over: its result stands until the next run.
                        return;
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = controls.restart.notified() => {
                            log.system("starting again on request (shoal-agent restart)");
                            r.status.restarts += 1;
                            r.status.finished_at_ms = None;
                            step = 0;
                        }
                    }
                }
                AfterExit::Restart(delay) => {
                    let ms = delay.as_millis() as u64;
                    log.system(&format!("{reason}; restarting in {ms}ms"));
                    r.status.backoff_ms = Some(ms);
                    r.phase(
                        Phase::CrashLoopBackOff,
                        Some(format!("{reason}; restarting in {ms}ms")),
                    )
                    .await;
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                        _ = controls.restart.notified() => {
                            log.system("back-off cut short on request (shoal-agent restart)");
                        }
                    }
                    r.status.restarts += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{Artifact, Running, RuntimeError, Runtimes, VariantSpec};
    use shoal_api::model::ids::{Digest, WorkloadName};
    use shoal_api::model::workload::{Resources, Restart, RestartPolicy};
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// A run that ends with its scripted exit, or (none) lasts until stopped; `done` runs
    /// when it ends.
    struct FakeRun {
        exit: Option<Exit>,
        done: Box<dyn FnOnce() + Send>,
    }
    impl Running for FakeRun {
        fn wait(self: Box<Self>, stop: CancellationToken) -> BoxFuture<'static, Exit> {
            Box::pin(async move {
                let exit = match self.exit {
                    Some(e) => e,
                    None => {
                        stop.cancelled().await;
                        Exit::Cancelled
                    }
                };
                (self.done)();
                exit
            })
        }
    }

    /// A WASM runtime that replays a scripted list of exits.
    struct FakeRuntime {
        exits: Mutex<VecDeque<Exit>>,
    }
    impl Runtime for FakeRuntime {
        fn pull<'a>(&'a self, _s: &'a RunSpec) -> BoxFuture<'a, Result<Artifact, RuntimeError>> {
            Box::pin(std::future::ready(Ok(Artifact::new(PathBuf::from(
                "/dev/null",
            )))))
        }
        fn prepare<'a>(
            &'a self,
            _s: &'a RunSpec,
            pulled: Artifact,
        ) -> BoxFuture<'a, Result<Artifact, RuntimeError>> {
            Box::pin(std::future::ready(Ok(pulled)))
        }
        fn start<'a>(
            &'a self,
            _p: &'a Artifact,
            _s: &'a RunSpec,
            _l: &'a LogSink,
        ) -> BoxFuture<'a, Result<Box<dyn Running>, RuntimeError>> {
            let exit = self.exits.lock().unwrap().pop_front();
            Box::pin(std::future::ready(Ok(Box::new(FakeRun {
                exit,
                done: Box::new(|| {}),
            }) as Box<dyn Running>)))
        }
    }

    fn desired(policy: RestartPolicy) -> DesiredWorkload {
        DesiredWorkload {
            job: None,
            stop_after_ms: None,
            schedule: None,
            after: Vec::new(),
            configs: Vec::new(),
            name: WorkloadName::try_from("w").unwrap(),
            replica: 0,
            revision: "r".into(),
            module: Some(Digest::of(b"m")),
            oci: None,
            container: None,
            args: vec![],
            env: Default::default(),
            resources: Resources {
                memory: 1 << 20,
                cpu: None,
            },
            restart: Restart {
                policy,
                initial_backoff_ms: 10,
                max_backoff_ms: 40,
            },
            health: None,
            ports: vec![],
            uses: vec![],
            volumes: vec![],
            network: vec![],
            limits: Default::default(),
            secrets: Default::default(),
            devices: Default::default(),
        }
    }

    async fn phases(
        policy: RestartPolicy,
        exits: Vec<Exit>,
        until: Phase,
        min_restarts: u32,
    ) -> Vec<(Phase, u32, Option<u64>)> {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let shared = fake_shared(dir.path(), exits, None, tx);
        let cancel = CancellationToken::new();
        let h = tokio::spawn(supervise(
            shared,
            desired(policy),
            "http://x".into(),
            Network::default(),
            Default::default(),
            1,
            Controls {
                cancel: cancel.clone(),
                ..Controls::default()
            },
        ));
        let mut seen = Vec::new();
        while let Some(u) = rx.recv().await {
            seen.push((u.status.phase, u.status.restarts, u.status.backoff_ms));
            if u.status.phase == until && u.status.restarts >= min_restarts {
                break;
            }
        }
        cancel.cancel();
        h.await.unwrap();
        seen
    }

    /// The supervisor's collaborators, faked: `exits` scripts the WASM runs (none: every run
    /// lasts until cancelled); `containers`, the container runtime if any.
    fn fake_shared(
        dir: &std::path::Path,
        exits: Vec<Exit>,
        containers: Option<Arc<dyn Runtime>>,
        updates: mpsc::Sender<Update>,
    ) -> Shared {
        Shared {
            runtime: Arc::new(Runtimes {
                wasm: Arc::new(FakeRuntime {
                    exits: Mutex::new(exits.into()),
                }),
                container: containers,
            }),
            logs_dir: dir.to_path_buf(),
            volumes: Volumes::new(dir.join("volumes")),
            secrets: crate::secrets::SecretFiles::new(dir),
            configs: crate::configs::ConfigDirs::new(dir),
            updates,
            http: crate::http_client(reqwest::Client::builder()).unwrap_or_default(),
        }
    }

    #[tokio::test]
    async fn a_restart_request_restarts_a_running_or_stopped_replica_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        // First run: until cancelled (a restart); second: fails for good (policy Never).
        let exits = vec![];
        let shared = fake_shared(dir.path(), exits, None, tx);
        let controls = Controls::default();
        let h = tokio::spawn(supervise(
            shared,
            desired(RestartPolicy::Never),
            "http://x".into(),
            Network::default(),
            Default::default(),
            1,
            controls.clone(),
        ));
        async fn until(
            rx: &mut mpsc::Receiver<Update>,
            phase: Phase,
            restarts: u32,
        ) -> InstanceStatus {
            loop {
                let u = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                    .await
                    .expect("an update")
                    .expect("supervisor alive");
                if u.status.phase == phase && u.status.restarts == restarts {
                    return u.status;
                }
            }
        }
        until(&mut rx, Phase::Running, 0).await;
        controls.restart.notify_one();
        let s = until(&mut rx, Phase::Running, 1).await;
        assert!(s.started_at_ms.is_some());
        let log = std::fs::read_to_string(dir.path().join("w-0.log")).unwrap();
        assert!(log.contains("restarting on request"), "{log}");
        controls.cancel.cancel();
        h.await.unwrap();

        // A replica its restart policy left Failed starts again on request.
        let (tx, mut rx) = mpsc::channel(64);
        let shared = fake_shared(
            dir.path(),
            vec![Exit::Failure {
                code: Some(3),
                reason: "exited with status 3".into(),
            }],
            None,
            tx,
        );
        let controls = Controls::default();
        let h = tokio::spawn(supervise(
            shared,
            desired(RestartPolicy::Never),
            "http://x".into(),
            Network::default(),
            Default::default(),
            1,
            controls.clone(),
        ));
        let mut seen = Vec::new();
        loop {
            let u = rx.recv().await.unwrap();
            seen.push((u.status.phase, u.status.restarts));
            if u.status.phase == Phase::Failed {
                controls.restart.notify_one();
            }
            if u.status.phase == Phase::Running && u.status.restarts == 1 {
                break;
            }
        }
        assert!(seen.contains(&(Phase::Failed, 0)), "{seen:?}");
        controls.cancel.cancel();
        h.await.unwrap();
    }

    #[tokio::test]
    async fn a_job_run_stops_at_its_deadline_and_fails_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        // Every run lasts until it is stopped.
        let shared = fake_shared(dir.path(), vec![], None, tx);
        let mut d = desired(RestartPolicy::OnFailure);
        d.job = Some(shoal_api::model::job::JobRun {
            run: 3,
            backoff_limit: 5,
            active_deadline_ms: Some(200),
        });
        let controls = Controls::default();
        let h = tokio::spawn(supervise(
            shared,
            d,
            "http://x".into(),
            Network::default(),
            Default::default(),
            1,
            controls.clone(),
        ));
        let last = loop {
            let u = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("an update")
                .expect("supervisor alive");
            if u.status.phase == Phase::Failed {
                break u.status;
            }
        };
        assert_eq!(last.run, Some(3));
        assert!(last.finished_at_ms.is_some());
        assert!(
            last.reason
                .as_deref()
                .unwrap_or("")
                .contains("activeDeadline 200ms"),
            "{last:?}"
        );
        assert_eq!(last.restarts, 0, "a stop at the deadline is not retried");
        // It stays so until stopped.
        assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err());
        controls.cancel.cancel();
        h.await.unwrap();
    }

    /// A replica of a container-only workload (busybox, image pinned; the fakes never pull
    /// it), restarted always.
    fn container_desired() -> DesiredWorkload {
        let mut d = desired(RestartPolicy::Always);
        d.module = None;
        d.container = Some(box_container());
        d
    }

    fn box_container() -> shoal_api::model::workload::Container {
        shoal_api::model::workload::Container {
            image: format!("oci://localhost:5000/box:1@{}", Digest::of(b"i"))
                .parse()
                .unwrap(),
            command: vec!["/bin/sh".into()],
            read_only_root: true,
            platforms: vec![],
            stop_grace_ms: 100,
            cap_add: vec![],
            cap_drop: vec![],
            groups: vec![],
            privileged: false,
            host_devices: vec![],
        }
    }

    fn fail() -> Exit {
        Exit::Failure {
            code: Some(1),
            reason: "exited with status 1".into(),
        }
    }

    #[tokio::test]
    async fn crash_loop_backs_off_exponentially_then_runs() {
        let seen = phases(
            RestartPolicy::Always,
            vec![fail(), fail(), fail()],
            Phase::Running,
            3,
        )
        .await;
        let backoffs: Vec<u64> = seen
            .iter()
            .filter_map(|s| s.2.filter(|_| s.0 == Phase::CrashLoopBackOff))
            .collect();
        assert_eq!(backoffs.len(), 3, "{seen:?}");
        assert!(backoffs[0] >= 10 && backoffs[0] <= 11, "{backoffs:?}");
        assert!(backoffs[1] >= 20 && backoffs[1] <= 22, "{backoffs:?}");
        assert!(backoffs[2] >= 40 && backoffs[2] <= 44, "{backoffs:?}");
        assert_eq!(
            seen.iter().map(|s| s.1).max(),
            Some(3),
            "three restarts counted"
        );
    }

    #[tokio::test]
    async fn policies_end_in_terminal_phases() {
        let seen = phases(RestartPolicy::Never, vec![fail()], Phase::Failed, 0).await;
        assert_eq!(seen.last().unwrap().0, Phase::Failed);
        let seen = phases(
            RestartPolicy::OnFailure,
            vec![Exit::Success],
            Phase::Succeeded,
            0,
        )
        .await;
        assert_eq!(seen.last().unwrap().0, Phase::Succeeded);
        let order: Vec<Phase> = seen.iter().map(|s| s.0).collect();
        assert_eq!(
            order,
            vec![
                Phase::Pulling,
                Phase::Starting,
                Phase::Running,
                Phase::Succeeded
            ]
        );
    }

    /// A container runtime that fails its first pull, then replays scripted exits.
    struct FakeContainers {
        pulls: Mutex<u32>,
        exits: Mutex<VecDeque<Exit>>,
        /// Each start's spec and log file.
        runs: Mutex<Vec<(RunSpec, PathBuf)>>,
        /// How long a start takes (create, then start the task).
        start_takes: Duration,
        /// Containers started and not yet stopped and removed by `wait`.
        live: Arc<Mutex<Vec<String>>>,
    }
    impl Runtime for FakeContainers {
        fn pull<'a>(&'a self, spec: &'a RunSpec) -> BoxFuture<'a, Result<Artifact, RuntimeError>> {
            Box::pin(async move {
                let mut n = self.pulls.lock().unwrap();
                *n += 1;
                if *n == 1 {
                    return Err(RuntimeError::Prepare {
                        digest: spec.instance.clone(),
                        reason: "registry unreachable".into(),
                    });
                }
                Ok(Artifact::new(()))
            })
        }
        fn prepare<'a>(
            &'a self,
            _s: &'a RunSpec,
            pulled: Artifact,
        ) -> BoxFuture<'a, Result<Artifact, RuntimeError>> {
            Box::pin(std::future::ready(Ok(pulled)))
        }
        fn start<'a>(
            &'a self,
            _p: &'a Artifact,
            spec: &'a RunSpec,
            log: &'a LogSink,
        ) -> BoxFuture<'a, Result<Box<dyn Running>, RuntimeError>> {
            self.runs.lock().unwrap().push((spec.clone(), log.path()));
            let VariantSpec::Container(c) = &spec.variant else {
                panic!("not a container: {spec:?}");
            };
            let id = c.id.clone();
            Box::pin(async move {
                // The container exists from the first step on; the task starts later.
                self.live.lock().unwrap().push(id.clone());
                tokio::time::sleep(self.start_takes).await;
                let exit = self.exits.lock().unwrap().pop_front();
                let live = self.live.clone();
                Ok(Box::new(FakeRun {
                    exit,
                    done: Box::new(move || live.lock().unwrap().retain(|x| *x != id)),
                }) as Box<dyn Running>)
            })
        }
    }

    #[tokio::test]
    async fn container_replicas_pull_with_back_off_and_follow_the_restart_policy() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let containers = Arc::new(FakeContainers {
            pulls: Mutex::new(0),
            exits: Mutex::new(vec![fail()].into()),
            runs: Mutex::new(Vec::new()),
            start_takes: Duration::ZERO,
            live: Default::default(),
        });
        let shared = fake_shared(
            dir.path(),
            Vec::new(),
            Some(containers.clone() as Arc<dyn Runtime>),
            tx,
        );
        let mut d = container_desired();
        d.args = vec!["-c".into(), "exit 1".into()];
        let cancel = CancellationToken::new();
        let h = tokio::spawn(supervise(
            shared,
            d,
            "http://x".into(),
            Network::default(),
            Default::default(),
            1,
            Controls {
                cancel: cancel.clone(),
                ..Controls::default()
            },
        ));
        let mut seen = Vec::new();
        while let Some(u) = rx.recv().await {
            assert_eq!(u.status.variant, "container");
            seen.push((u.status.phase, u.status.reason.clone()));
            if u.status.phase == Phase::Running && u.status.restarts == 1 {
                break;
            }
        }
        cancel.cancel();
        h.await.unwrap();
        let pull_error = seen
            .iter()
            .find_map(|(p, r)| (*p == Phase::Pulling).then_some(r.clone()).flatten());
        assert!(
            pull_error.is_some_and(|r| r.contains("registry unreachable; retrying in 500ms")),
            "{seen:?}"
        );
        assert!(
            seen.iter().any(|(p, _)| *p == Phase::CrashLoopBackOff),
            "{seen:?}"
        );
        let runs = containers.runs.lock().unwrap();
        assert_eq!(runs.len(), 2, "run, exit 1, run again");
        let (spec, log) = &runs[0];
        let VariantSpec::Container(c) = &spec.variant else {
            panic!("{spec:?}")
        };
        assert_eq!(c.id, "w-0-r", "one container id per revision");
        assert_eq!(c.command, ["/bin/sh"]);
        assert_eq!(spec.args, ["-c", "exit 1"]);
        assert!(log.ends_with("w-0.log"));
    }

    #[tokio::test]
    async fn a_replica_cancelled_while_its_container_starts_leaves_no_container() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let containers = Arc::new(FakeContainers {
            pulls: Mutex::new(1),
            exits: Mutex::new(VecDeque::new()),
            runs: Mutex::new(Vec::new()),
            start_takes: Duration::from_millis(300),
            live: Default::default(),
        });
        let shared = fake_shared(
            dir.path(),
            Vec::new(),
            Some(containers.clone() as Arc<dyn Runtime>),
            tx,
        );
        let d = container_desired();
        let cancel = CancellationToken::new();
        let h = tokio::spawn(supervise(
            shared,
            d,
            "http://x".into(),
            Network::default(),
            Default::default(),
            1,
            Controls {
                cancel: cancel.clone(),
                ..Controls::default()
            },
        ));
        // Deleted while the container is being created and started.
        while let Some(u) = rx.recv().await {
            if u.status.phase == Phase::Starting {
                break;
            }
        }
        cancel.cancel();
        h.await.unwrap();
        assert_eq!(containers.runs.lock().unwrap().len(), 1, "it was started");
        let live = containers.live.lock().unwrap().clone();
        assert!(live.is_empty(), "left behind: {live:?}");
        while let Ok(u) = rx.try_recv() {
            assert_ne!(
                u.status.phase,
                Phase::Running,
                "reported Running after the cancel"
            );
        }
    }

    #[tokio::test]
    async fn failing_health_probe_restarts_a_running_replica() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let shared = fake_shared(dir.path(), Vec::new(), None, tx);
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut d = desired(RestartPolicy::Always);
        d.health = Some(shoal_api::model::workload::Health {
            check: shoal_api::model::workload::Check::Tcp { port: closed },
            period_ms: 10,
            timeout_ms: 100,
            failure_threshold: 2,
        });
        let cancel = CancellationToken::new();
        let h = tokio::spawn(supervise(
            shared,
            d,
            "http://x".into(),
            Network::default(),
            Default::default(),
            1,
            Controls {
                cancel: cancel.clone(),
                ..Controls::default()
            },
        ));
        let mut reasons = Vec::new();
        let mut unhealthy_seen = false;
        while let Some(u) = rx.recv().await {
            unhealthy_seen |= u.status.healthy == Some(false);
            if u.status.phase == Phase::CrashLoopBackOff {
                reasons.push(u.status.reason.clone().unwrap_or_default());
                if u.status.restarts >= 1 {
                    break;
                }
            }
        }
        cancel.cancel();
        h.await.unwrap();
        assert!(unhealthy_seen, "the status says unhealthy");
        assert!(
            reasons[0].contains("health check failed 2 times")
                && reasons[0].contains(&format!("port {closed}")),
            "{reasons:?}"
        );
        let log = std::fs::read_to_string(dir.path().join("w-0.log")).unwrap();
        assert!(log.contains("health check failed"), "{log}");
    }
}
