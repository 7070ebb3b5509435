//! `shoal-agent run`: the agent's main loop.
//!
//! One loop owns the device's state: the persisted desired state, the supervised replicas and
//! their last statuses. It `select!`s over bus events, replica updates and shutdown. A desired
//! state is acted on only if its generation is newer than the persisted one, and only after it
//! has been saved durably. At start the persisted desired state is acted on at once, so a
//! device runs its workloads even when the hub and the broker are unreachable.

use crate::bus::{self, Bus, BusEvent};
use crate::fetch::{Fetcher, ModuleSource};
use crate::plan::{plan, Action, Observed};
use crate::runtime::WorkloadRuntime;
use crate::store::{SledStore, Store};
use crate::supervisor::{self, Shared, Update};
use crate::wasm::WasmRuntime;
use shoal_api::endpoint::BrokerUrl;
use shoal_api::ids::DeviceId;
use shoal_api::messages::{
    now_ms, DesiredState, DesiredWorkload, DeviceStatus, Hello, InstanceStatus,
};
use shoal_api::topics;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Agent settings (from flags and environment; see `shoal-agent run --help`).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub device_id: DeviceId,
    pub labels: BTreeMap<String, String>,
    pub broker: BrokerUrl,
    /// Memory offered to workloads; default: the machine's total memory.
    pub memory: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot create data directory {path:?}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    #[error("cannot start the wasm runtime: {0}")]
    Runtime(String),
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    for dir in [config.data_dir.clone(), config.data_dir.join("logs")] {
        std::fs::create_dir_all(&dir).map_err(|source| AgentError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let store = SledStore::open(&config.data_dir)?;
    let fetcher = Fetcher::new(&config.data_dir)?;
    let tracker = TaskTracker::new();
    let engine_stop = CancellationToken::new();
    let (runtime, ticker) = WasmRuntime::new(
        config.data_dir.join("cache").join("compiled"),
        engine_stop.clone(),
    )
    .map_err(|e| AgentError::Runtime(e.to_string()))?;

    // The bus outlives the main loop by a moment, to announce a clean departure.
    let bus_stop = CancellationToken::new();
    let (bus_tx, bus_rx) = mpsc::channel(64);
    let bus = bus::connect(
        &config.broker,
        &config.device_id,
        bus_tx,
        &tracker,
        bus_stop.clone(),
    );

    let (up_tx, up_rx) = mpsc::channel(256);
    let shared = Shared {
        runtime: Arc::new(runtime),
        source: fetcher,
        logs_dir: config.data_dir.join("logs"),
        updates: up_tx,
    };
    let mut agent = Agent {
        hello: hello(&config),
        config,
        store,
        bus,
        shared,
        tracker: tracker.clone(),
        desired: None,
        replicas: BTreeMap::new(),
        statuses: BTreeMap::new(),
        next_task: 0,
    };
    agent.start().await?;
    agent.main_loop(bus_rx, up_rx, shutdown).await;
    agent.stop_all().await;
    agent.bus.leave(&agent.config.device_id).await;
    bus_stop.cancel();
    engine_stop.cancel();
    let _ = ticker.await;
    tracker.close();
    tracker.wait().await;
    info!("agent stopped");
    Ok(())
}

struct Replica {
    revision: String,
    task: u64,
    cancel: CancellationToken,
    handle: JoinHandle<()>,
}

/// What the main loop reacts to.
#[derive(Debug)]
enum Event {
    Bus(BusEvent),
    Replica(Update),
}

struct Agent<S: Store, B: Bus, R: WorkloadRuntime, F: ModuleSource> {
    config: AgentConfig,
    hello: Hello,
    store: S,
    bus: B,
    shared: Shared<R, F>,
    tracker: TaskTracker,
    desired: Option<DesiredState>,
    replicas: BTreeMap<String, Replica>,
    statuses: BTreeMap<String, InstanceStatus>,
    next_task: u64,
}

impl<S: Store, B: Bus, R: WorkloadRuntime, F: ModuleSource> Agent<S, B, R, F> {
    /// Resumes from the persisted desired state (offline autonomy).
    async fn start(&mut self) -> Result<(), AgentError> {
        if let Some(d) = self.store.load_desired()? {
            info!(
                generation = d.generation,
                replicas = d.workloads.len(),
                "resuming persisted desired state"
            );
            self.desired = Some(d);
            self.reconcile().await;
        }
        Ok(())
    }

    async fn main_loop(
        &mut self,
        mut bus_rx: mpsc::Receiver<BusEvent>,
        mut up_rx: mpsc::Receiver<Update>,
        shutdown: CancellationToken,
    ) {
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(e) = bus_rx.recv() => Event::Bus(e),
                Some(u) = up_rx.recv() => Event::Replica(u),
                else => break,
            };
            match event {
                Event::Bus(BusEvent::Connected) => self.announce().await,
                Event::Bus(BusEvent::Desired(payload)) => self.on_desired(&payload).await,
                Event::Replica(u) => {
                    let current = self
                        .replicas
                        .get(&u.instance)
                        .is_some_and(|r| r.task == u.task);
                    if current {
                        self.statuses.insert(u.instance, u.status);
                        self.publish_status().await;
                    }
                }
            }
        }
    }

    async fn announce(&self) {
        let id = &self.config.device_id;
        self.publish(
            topics::presence(id),
            topics::ONLINE.as_bytes().to_vec(),
            true,
        )
        .await;
        match serde_json::to_vec(&self.hello) {
            Ok(h) => self.publish(topics::hello(id), h, true).await,
            Err(e) => warn!(error = %e, "cannot encode hello"),
        }
        self.publish_status().await;
    }

    async fn on_desired(&mut self, payload: &[u8]) {
        if payload.is_empty() {
            return; // a cleared retained message
        }
        let d: DesiredState = match serde_json::from_slice(payload) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "malformed desired state ignored");
                return;
            }
        };
        if d.device_id != self.config.device_id {
            warn!(claimed = %d.device_id, "desired state for another device ignored");
            return;
        }
        let have = self.desired.as_ref().map_or(0, |c| c.generation);
        if d.generation <= have {
            debug!(
                generation = d.generation,
                have, "desired state not newer; ignored"
            );
            return;
        }
        // Durable before acted on.
        if let Err(e) = self.store.save_desired(&d) {
            warn!(generation = d.generation, error = %e, "cannot persist desired state; not acting on it");
            return;
        }
        info!(
            generation = d.generation,
            replicas = d.workloads.len(),
            "desired state accepted"
        );
        self.desired = Some(d);
        self.reconcile().await;
    }

    async fn reconcile(&mut self) {
        let Some(desired) = self.desired.clone() else {
            return;
        };
        let observed: BTreeMap<String, Observed> = self
            .replicas
            .iter()
            .map(|(k, r)| {
                (
                    k.clone(),
                    Observed {
                        revision: r.revision.clone(),
                    },
                )
            })
            .collect();
        for action in plan(&desired.workloads, &observed) {
            match action {
                Action::Stop(instance) => self.stop(&instance).await,
                Action::Start(w) => self.spawn(w, &desired.artifact_base),
                Action::Replace(w) => {
                    self.stop(&w.instance()).await;
                    self.spawn(w, &desired.artifact_base);
                }
            }
        }
        self.publish_status().await;
    }

    fn spawn(&mut self, w: DesiredWorkload, artifact_base: &str) {
        self.next_task += 1;
        let task = self.next_task;
        let cancel = CancellationToken::new();
        let instance = w.instance();
        info!(%instance, revision = %w.revision, "starting replica");
        let revision = w.revision.clone();
        let handle = self.tracker.spawn(supervisor::supervise(
            self.shared.clone(),
            w,
            artifact_base.to_string(),
            task,
            cancel.clone(),
        ));
        self.replicas.insert(
            instance,
            Replica {
                revision,
                task,
                cancel,
                handle,
            },
        );
    }

    async fn stop(&mut self, instance: &str) {
        if let Some(r) = self.replicas.remove(instance) {
            info!(%instance, "stopping replica");
            r.cancel.cancel();
            let _ = r.handle.await;
        }
        self.statuses.remove(instance);
    }

    async fn stop_all(&mut self) {
        let all: Vec<String> = self.replicas.keys().cloned().collect();
        for r in self.replicas.values() {
            r.cancel.cancel();
        }
        for i in all {
            self.stop(&i).await;
        }
    }

    async fn publish_status(&self) {
        let status = DeviceStatus {
            protocol: shoal_api::PROTOCOL_VERSION,
            device_id: self.config.device_id.clone(),
            observed_generation: self.desired.as_ref().map_or(0, |d| d.generation),
            workloads: self.statuses.values().cloned().collect(),
            time_ms: now_ms(),
        };
        match serde_json::to_vec(&status) {
            Ok(p) => {
                self.publish(topics::status(&self.config.device_id), p, true)
                    .await
            }
            Err(e) => warn!(error = %e, "cannot encode status"),
        }
    }

    async fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) {
        if let Err(e) = self.bus.publish(topic, payload, retain).await {
            debug!(error = %e, "publish dropped (will resend on reconnect)");
        }
    }
}

/// The device's capabilities, sent on every connect.
fn hello(config: &AgentConfig) -> Hello {
    Hello {
        protocol: shoal_api::PROTOCOL_VERSION,
        device_id: config.device_id.clone(),
        arch: std::env::consts::ARCH.to_string(),
        os: std::env::consts::OS.to_string(),
        runtimes: vec!["wasm".to_string()],
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory: config.memory.unwrap_or_else(total_memory),
        labels: config.labels.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Total memory from `/proc/meminfo` (0 if unreadable, e.g. off Linux).
fn total_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

impl<S: Store, B: Bus, R: WorkloadRuntime, F: ModuleSource> Drop for Agent<S, B, R, F> {
    fn drop(&mut self) {
        for r in self.replicas.values() {
            r.cancel.cancel();
        }
    }
}
