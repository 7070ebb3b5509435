//! `shoal-agent run`: the agent's main loop.
//!
//! One loop owns the device's state: the persisted desired state, the supervised replicas and
//! their last statuses. It `select!`s over bus events, replica updates and shutdown. A desired
//! state is acted on only if its generation is newer than the persisted one, and only after it
//! has been saved durably. At start the persisted desired state is acted on at once, so a
//! device runs its workloads even when the hub and the broker are unreachable.
//!
//! Discovery runs in the same loop: mDNS browse results update the [`Directory`]; a hub
//! candidate is authenticated (a probe task) before [`HubLink`] lets it retarget the bus
//! (through a watch channel) and the renewals, only when the hub in use has stopped working
//! (the bus tells it), and never replaces what `--broker`/`--hub` pinned; service changes
//! rewrite the endpoint files of consuming workloads, and replicas entering or leaving
//! `Running` are advertised or withdrawn.

use crate::bus::{self, Bus, BusEvent};
use crate::core::directory::hub_link::{HubLink, Pins, Probe, Step, Target};
use crate::core::directory::{Change, Directory};
use crate::core::plan::{plan, Action, Observed};
use crate::fetch::Fetcher;
use crate::local::{
    self, AgentStatusView, DevicePeer, HubLinkView, HubPeer, InspectView, LocalRequest, PeersView,
    ReplicaView, RestartView,
};
use crate::replica::supervisor::{self, Shared, Update};
use crate::runtime::wasm::WasmRuntime;
use crate::runtime::wasm::WasmWorkloads;
use crate::runtime::{Network, Runtime, Runtimes};
use crate::services::{self, ServiceFiles};
use crate::store::{SledStore, Store};
use crate::volumes::Swept;
use shoal_api::discovery::{self, AgentAd, HubChoice};
use shoal_api::endpoint::BrokerUrl;
use shoal_api::ids::{DeviceId, SecretName, WorkloadName};
use shoal_api::messages::{
    now_ms, DesiredState, DesiredWorkload, DeviceStatus, Hello, InstanceStatus, Phase,
    RUNTIME_CONTAINER, RUNTIME_WASM, RUNTIME_WASM_PRECOMPILED,
};
use shoal_api::topics;
use shoal_daemon::mdns::{Discovery, Mdns, MdnsEvent, MdnsOptions, NoDiscovery};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

/// Agent settings (from flags and environment; see `shoal-agent run --help`).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub device_id: DeviceId,
    pub labels: BTreeMap<String, String>,
    /// The broker; `None`: find the hub of `fleet` over mDNS.
    pub broker: Option<BrokerUrl>,
    /// Memory offered to workloads; default: the machine's total memory.
    pub memory: Option<u64>,
    /// Most replicas this device takes; `None`: no limit.
    pub max_replicas: Option<u32>,
    /// The fleet this device belongs to; hubs of other fleets are ignored.
    pub fleet: String,
    /// mDNS interfaces; `None`: mDNS off (then `broker` is required).
    pub mdns: Option<MdnsOptions>,
    /// The local API's Unix socket; `None`: no local API.
    pub socket: Option<LocalSocket>,
    /// Where Prometheus scrapes `/metrics` over TCP; `None`: only on the local socket.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How to reach the OCI registries `oci://` modules and images come from.
    pub registries: shoal_registry::RegistryConfig,
    /// containerd to run container workloads with; `None`: no container runtime.
    pub containerd: Option<ContainerdOptions>,
    /// Whether the device offers the WASM runtime (`--no-wasm` turns it off).
    pub wasm: bool,
    /// How long a workload's volumes outlive its leaving this device.
    pub volume_retention: Duration,
    /// Plain MQTT and HTTP, no device certificate, desired state not verified (local
    /// development with a hub run `--insecure`).
    pub insecure: bool,
    /// A join token for enrolling (used only while the device has no certificate).
    pub join_token: Option<shoal_pki::token::JoinToken>,
    /// The hub's HTTP API for enrollment, e.g. `https://hub.local:8080`.
    pub hub_url: Option<String>,
}

/// Where containerd listens, and the namespace the agent keeps its containers in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdOptions {
    pub socket: PathBuf,
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSocket {
    pub path: PathBuf,
    /// Given by the user: failing to serve it is an error. The default path is only tried
    /// (it needs root), with a warning if it cannot be used.
    pub explicit: bool,
}

/// How long the agent looks for a hub before saying it found none, and how often it says so
/// again (one line per period, not a flood).
pub const HUB_SEARCH_REPORT: Duration = Duration::from_secs(5);
pub const HUB_SEARCH_REPORT_PERIOD: Duration = Duration::from_secs(30);
/// How often the choice of hub is looked at again (a hub in use that stopped working is
/// left [`crate::core::directory::hub_link::DOWN_MS`] after, not a heartbeat later).
const HUB_CHECK_PERIOD: Duration = Duration::from_secs(2);

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
    #[error(transparent)]
    Mdns(#[from] shoal_daemon::mdns::MdnsError),
    #[error(transparent)]
    Local(#[from] crate::local::LocalError),
    #[error("no broker given and mDNS is off: give --broker, or drop --no-mdns to find the hub")]
    NoBroker,
    #[error(transparent)]
    Enroll(#[from] crate::enroll::EnrollError),
    #[error("secrets directory: {0}")]
    Secrets(String),
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    for dir in [config.data_dir.clone(), config.data_dir.join("logs")] {
        shoal_daemon::private_dir(&dir).map_err(|source| AgentError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let store = SledStore::open(&config.data_dir)?;
    let registries = Arc::new(shoal_registry::Registries::new(config.registries.clone()));
    let containers = containers(&config, &store, registries.clone(), shutdown.clone()).await;
    let tracker = TaskTracker::new();
    let engine_stop = CancellationToken::new();
    let (runtime, ticker) = WasmRuntime::new(
        config.data_dir.join("cache").join("compiled"),
        engine_stop.clone(),
    )
    .map_err(|e| AgentError::Runtime(e.to_string()))?;

    if config.broker.is_none() && config.mdns.is_none() {
        return Err(AgentError::NoBroker);
    }
    // Discovery and the local API stop with the main loop; the bus outlives it by a moment,
    // to announce a clean departure.
    let loop_stop = shutdown.child_token();
    let (mdns_tx, mut mdns_rx) = mpsc::channel(256);
    // Neither discovery nor the local API is worth refusing to run the persisted workloads
    // for: without them the agent still works offline (and with --broker, online).
    let started = config.mdns.as_ref().map(|opts| {
        Mdns::start(
            opts,
            &discovery::dns_label(&format!("shoal-agent-{}", config.device_id)),
            tracker.clone(),
            loop_stop.clone(),
        )
    });
    let (mdns, discovery): (Option<Arc<Mdns>>, Arc<dyn Discovery>) = match started {
        Some(Ok(m)) => {
            let m = Arc::new(m);
            (Some(m.clone()), m)
        }
        Some(Err(e)) => {
            error!(error = %e, "mDNS is off: this device neither finds the hub nor is found");
            (None, Arc::new(NoDiscovery))
        }
        None => (None, Arc::new(NoDiscovery)),
    };
    // The device's identity: saved credentials, or enrollment now (at --hub, or at the hub
    // mDNS finds; browse results seen meanwhile are replayed into the main loop).
    let mut early_mdns = Vec::new();
    let mut hubs_browsed = false;
    let identity = if config.insecure {
        warn!("--insecure: plain MQTT and HTTP, desired state not verified; for local development only");
        None
    } else {
        let enrolled =
            shoal_pki::device::DeviceCredentials::load(&crate::enroll::pki_dir(&config.data_dir))
                .map_err(crate::enroll::EnrollError::from)?
                .is_some();
        let over_mdns = config.hub_url.is_none() && !enrolled && mdns.is_some();
        let browsed = match (&config.join_token, over_mdns) {
            (Some(token), true) => {
                match discovery.browse(discovery::HUB_SERVICE, mdns_tx.clone()) {
                    Ok(()) => Some(token),
                    Err(e) => {
                        warn!(error = %e, "cannot browse for the hub over mdns");
                        None
                    }
                }
            }
            _ => None,
        };
        match browsed {
            Some(token) => {
                hubs_browsed = true;
                let found =
                    enroll_over_mdns(&config, token, &mut mdns_rx, &mut early_mdns, &shutdown)
                        .await?;
                let Some(id) = found else {
                    info!("stopped before enrolling");
                    engine_stop.cancel();
                    return Ok(());
                };
                Some(id)
            }
            None => Some(
                crate::enroll::identity(
                    &config.data_dir,
                    &config.device_id,
                    config.join_token.as_ref(),
                    config.hub_url.as_deref(),
                )
                .await?,
            ),
        }
    };
    let tls = identity.as_ref().map(|i| i.client.clone());
    let mut fetcher = Fetcher::new(&config.data_dir, registries.clone(), tls.clone())?;
    if !WasmRuntime::compiles() {
        fetcher = fetcher.precompiled_for(
            runtime.target(),
            identity.as_ref().map(|i| i.hub_key.clone()),
        );
    }
    let (local_tx, local_rx) = mpsc::channel(16);
    if let Some(addr) = config.metrics_listen {
        let bound =
            local::serve_metrics(addr, local_tx.clone(), &tracker, loop_stop.clone()).await?;
        info!(%bound, "metrics listening");
    }
    if let Some(sock) = &config.socket {
        let logs = config.data_dir.join("logs");
        match local::serve(&sock.path, local_tx, logs, &tracker, loop_stop.clone()).await {
            Ok(()) => info!(socket = %sock.path.display(), "local api listening"),
            Err(e) if !sock.explicit => {
                warn!(error = %e, "local api off (the default socket needs root; give --socket PATH)")
            }
            Err(e) => return Err(e.into()),
        }
    }

    let bus_stop = CancellationToken::new();
    let (bus_tx, bus_rx) = mpsc::channel(64);
    let (broker_tx, broker_rx) = watch::channel(config.broker.clone());
    let (hub_http_tx, hub_http_rx) = watch::channel(config.hub_url.clone());
    if let Some(id) = &identity {
        tracker.spawn(crate::enroll::renew_loop(
            id.clone(),
            hub_http_rx.clone(),
            loop_stop.clone(),
        ));
    }
    let bus = bus::connect(
        broker_rx,
        &config.device_id,
        identity.as_ref().map(|i| i.mqtt.clone()),
        bus_tx,
        &tracker,
        bus_stop.clone(),
    );

    let (up_tx, up_rx) = mpsc::channel(256);
    let (gone_tx, gone_rx) = mpsc::channel(64);
    let (probe_tx, probe_rx) = mpsc::channel(8);
    // Opened secrets stay while replicas (containers adopted after a restart, too) use them;
    // the first reconcile sweeps the rest.
    let secrets = crate::secrets::SecretFiles::new(&config.data_dir);
    secrets.prepare().map_err(AgentError::Secrets)?;
    let shared = Shared {
        runtime: Arc::new(Runtimes {
            wasm: Arc::new(WasmWorkloads::new(runtime, fetcher, hub_http_rx.clone())),
            container: containers.clone(),
        }),
        stopping: shutdown.clone(),
        logs_dir: config.data_dir.join("logs"),
        volumes: crate::volumes::Volumes::new(config.data_dir.join("volumes")),
        secrets,
        updates: up_tx,
        http: crate::http_client(reqwest::Client::builder()).unwrap_or_default(),
    };
    let mut directory = directory(&config, identity.as_ref().map(|i| i.ca_hash.clone()));
    directory.set_own_addrs(shoal_daemon::mdns::host_addrs());
    let hub_link = HubLink::new(
        Pins {
            broker: config.broker.is_some(),
            http: config.hub_url.is_some(),
        },
        identity.is_some(),
    );
    let mut agent = Agent {
        hello: hello(&config, containers.is_some()),
        directory,
        hub_link,
        identity: identity.clone(),
        probe_tx,
        device_key: identity
            .as_ref()
            .map(|i| shoal_pki::device::key_file(&i.dir)),
        hub_key: identity.map(|i| i.hub_key),
        newest_log_request_ms: 0,
        hubs_browsed,
        files: ServiceFiles::new(&config.data_dir),
        config,
        store,
        bus,
        shared,
        tracker: tracker.clone(),
        desired: None,
        replicas: BTreeMap::new(),
        statuses: BTreeMap::new(),
        status_ms: std::sync::atomic::AtomicU64::new(0),
        next_task: 0,
        discovery,
        mdns_tx,
        broker_tx,
        hub_http_tx,
        hub: HubState::default(),
        advertised: BTreeMap::new(),
        browsing: BTreeSet::new(),
        stopping: BTreeMap::new(),
        gone_tx,
        link: HubLinkView::default(),
        last_sync_ms: None,
        started_at_ms: now_ms(),
        log_streams: crate::remote_logs::Streams::default(),
    };
    agent.advertise_self();
    for ev in early_mdns {
        agent.on_mdns(ev);
    }
    for trash in agent.shared.volumes.leftover_trash() {
        agent.delete_in_background(trash);
    }
    agent.start().await?;
    agent
        .main_loop(
            Inbox {
                bus: bus_rx,
                replicas: up_rx,
                gone: gone_rx,
                mdns: mdns_rx,
                probes: probe_rx,
                local: local_rx,
            },
            shutdown,
        )
        .await;
    agent.stop_all().await;
    agent.withdraw_all();
    agent.bus.leave(&agent.config.device_id).await;
    loop_stop.cancel();
    if let Some(m) = mdns {
        drop(agent);
        match Arc::try_unwrap(m) {
            Ok(m) => m.stop().await,
            Err(_) => debug!("mdns still shared at shutdown"),
        }
    }
    bus_stop.cancel();
    engine_stop.cancel();
    let _ = ticker.await;
    tracker.close();
    tracker.wait().await;
    info!("agent stopped");
    Ok(())
}

/// An empty [`Directory`] for this agent's fleet and fleet CA (`ca`: its SHA-256), believing
/// loopback addresses only when mDNS itself runs on loopback.
fn directory(config: &AgentConfig, ca: Option<String>) -> Directory {
    Directory::new(
        &config.fleet,
        shoal_api::PROTOCOL_VERSION,
        config.device_id.clone(),
    )
    .with_loopback(
        config
            .mdns
            .as_ref()
            .is_some_and(|m| m.loopback || m.interfaces.iter().any(|i| i == "lo")),
    )
    .with_tls(!config.insecure)
    .with_ca(ca)
}

/// Browses until the device has enrolled at the fleet's hub found over mDNS (`None` on
/// shutdown). Hubs whose advert names another CA than `token` pins are not tried; one that
/// turns out not to be the fleet's hub (it serves another CA, or cannot be reached over TLS
/// with the pinned one) is skipped for the next candidate, and tried again only later
/// ([`HubLink`]), so a rogue hub that sorts first does not stop the enrollment. A refusal
/// from the right hub (token used or expired) is an error, as with `--hub`. Every browse
/// result is kept in `seen` for the main loop.
async fn enroll_over_mdns(
    config: &AgentConfig,
    token: &shoal_pki::token::JoinToken,
    rx: &mut mpsc::Receiver<MdnsEvent>,
    seen: &mut Vec<MdnsEvent>,
    shutdown: &CancellationToken,
) -> Result<Option<crate::enroll::Identity>, AgentError> {
    info!("not enrolled yet: looking for the fleet's hub over mDNS to enroll with");
    let mut dir = directory(config, Some(token.ca_hash.clone()));
    // Enrolling authenticates the hub (its CA against the token's pin): only its HTTP API
    // matters here.
    let pins = Pins {
        broker: true,
        http: false,
    };
    let mut link = HubLink::new(pins, true);
    // Skipped candidates are tried again after a while, even if mDNS stays quiet.
    let mut retry = tokio::time::interval(Duration::from_secs(5));
    loop {
        let mut step = link.next(&dir.hub_choice().candidates, now_ms());
        while let Step::Probe(t) = step {
            let http = t.http.clone().unwrap_or_default();
            info!(hub = %t.instance, %http, "hub found over mDNS; enrolling");
            let enrolled = crate::enroll::identity(
                &config.data_dir,
                &config.device_id,
                Some(token),
                Some(&http),
            )
            .await;
            match enrolled {
                Ok(id) => return Ok(Some(id)),
                Err(e) if e.is_wrong_hub() => {
                    warn!(hub = %t.instance, error = %e, "not the fleet's hub (a misconfigured or rogue hub?); trying another");
                    let failed = Probe::Failed(e.to_string());
                    step = link.probed(&t, failed, &dir.hub_choice().candidates, now_ms());
                }
                Err(e) => return Err(e.into()),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            ev = rx.recv() => {
                let Some(ev) = ev else { return Ok(None) };
                seen.push(ev.clone());
                dir.apply(ev, now_ms());
            }
            _ = retry.tick() => {}
        }
    }
}

/// The container runtime: containerd, when configured and answering (then the device offers
/// the `container` runtime). Containers the agent created that its persisted desired state no
/// longer names (deleted while it was down) are removed.
#[cfg(feature = "containerd")]
async fn containers(
    config: &AgentConfig,
    store: &SledStore,
    registries: Arc<shoal_registry::Registries>,
    stopping: CancellationToken,
) -> Option<Arc<dyn Runtime>> {
    let opts = config.containerd.as_ref()?;
    let cache = config.data_dir.join("cache").join("images");
    if let Err(e) = std::fs::create_dir_all(&cache) {
        warn!(error = %e, "no container runtime: cannot create the image cache");
        return None;
    }
    match crate::runtime::containerd::Containerd::connect(
        &opts.socket,
        &opts.namespace,
        cache,
        registries,
    )
    .await
    {
        Ok((c, version)) => {
            info!(socket = %opts.socket.display(), %version, namespace = %opts.namespace, "containerd found: offering the container runtime");
            let keep: BTreeSet<String> = store
                .load_desired()
                .ok()
                .flatten()
                .map(|d| {
                    d.workloads
                        .iter()
                        .filter(|w| w.container.is_some())
                        .map(crate::runtime::container_id)
                        .collect()
                })
                .unwrap_or_default();
            let removed = c.sweep(&keep).await;
            if !removed.is_empty() {
                info!(containers = ?removed, "removed containers no longer desired");
            }
            Some(Arc::new(
                crate::runtime::containerd::ContainerdRuntime::new(c, stopping),
            ))
        }
        Err(e) => {
            info!(error = %e, "no container runtime (containers will not be scheduled here)");
            None
        }
    }
}

#[cfg(not(feature = "containerd"))]
async fn containers(
    _config: &AgentConfig,
    _store: &SledStore,
    _registries: Arc<shoal_registry::Registries>,
    _stopping: CancellationToken,
) -> Option<Arc<dyn Runtime>> {
    None
}

/// What the agent has said of its hub search (each thing once).
#[derive(Debug, Default)]
struct HubState {
    /// Conflicting hubs last reported.
    conflicting: Vec<String>,
    /// Hubs already reported as ignored.
    ignored: BTreeSet<String>,
    /// The hub in use withdrew its record (said once).
    withdrawn: bool,
}

/// The channels the main loop reads.
struct Inbox {
    bus: mpsc::Receiver<BusEvent>,
    replicas: mpsc::Receiver<Update>,
    gone: mpsc::Receiver<String>,
    mdns: mpsc::Receiver<MdnsEvent>,
    probes: mpsc::Receiver<(Target, Result<(), crate::enroll::EnrollError>)>,
    local: mpsc::Receiver<LocalRequest>,
}

struct Replica {
    workload: WorkloadName,
    revision: String,
    /// The secrets it runs with, at their versions ([`crate::core::plan::secret_versions`]).
    secrets: BTreeSet<(SecretName, String)>,
    /// The container's id when it runs the container variant (its stop may take a grace
    /// period).
    container: Option<String>,
    task: u64,
    controls: supervisor::Controls,
    handle: JoinHandle<()>,
}

/// What the main loop reacts to.
#[derive(Debug)]
enum Event {
    Bus(BusEvent),
    Replica(Update),
    /// A container stopping in the background (in its grace period) has ended: its id.
    Gone(String),
    Mdns(MdnsEvent),
    /// How authenticating a hub candidate went.
    Probed(Target, Result<(), crate::enroll::EnrollError>),
    Local(LocalRequest),
    /// Time to say again that no hub was found, if still so.
    HubSearchReport,
    /// Time for the periodic status (the hub's sign of life from this device).
    Heartbeat,
    /// Time to look at the choice of hub again.
    HubCheck,
}

struct Agent<S: Store, B: Bus> {
    config: AgentConfig,
    hello: Hello,
    store: S,
    bus: B,
    shared: Shared,
    tracker: TaskTracker,
    desired: Option<DesiredState>,
    replicas: BTreeMap<String, Replica>,
    statuses: BTreeMap<String, InstanceStatus>,
    /// The time of the last status sent: each status is strictly newer (hub replicas order
    /// a device's reports by it, and two can fall in one millisecond).
    status_ms: std::sync::atomic::AtomicU64,
    next_task: u64,
    discovery: Arc<dyn Discovery>,
    mdns_tx: mpsc::Sender<MdnsEvent>,
    directory: Directory,
    /// Which hub is used, candidates authenticated first.
    hub_link: HubLink,
    /// What hub candidates are authenticated with; `None` for an `--insecure` agent.
    identity: Option<crate::enroll::Identity>,
    probe_tx: mpsc::Sender<(Target, Result<(), crate::enroll::EnrollError>)>,
    files: ServiceFiles,
    broker_tx: watch::Sender<Option<BrokerUrl>>,
    hub_http_tx: watch::Sender<Option<String>>,
    /// The hub service is browsed already (to find a hub to enroll with).
    hubs_browsed: bool,
    /// The hub's signing key; `None` for an `--insecure` agent (nothing to verify with).
    hub_key: Option<shoal_pki::sign::HubKey>,
    /// When the newest log request taken was issued (the hub's clock): much older ones are
    /// replays.
    newest_log_request_ms: u64,
    /// The device's private key, which opens the secrets sealed to it; `None` for an
    /// `--insecure` agent.
    device_key: Option<PathBuf>,
    hub: HubState,
    /// Service adverts of this device's running replicas: instance name → mDNS full name.
    advertised: BTreeMap<String, String>,
    /// Service types browsed for the workloads that `use` them.
    browsing: BTreeSet<WorkloadName>,
    /// Containers still stopping in the background (id → workload): their workloads'
    /// volumes stay, and a replica that would reuse the id waits for them.
    stopping: BTreeMap<String, (WorkloadName, BTreeSet<(SecretName, String)>)>,
    gone_tx: mpsc::Sender<String>,
    /// The link to the broker, for `shoal-agent status`.
    link: HubLinkView,
    /// When a verified desired state last arrived.
    last_sync_ms: Option<u64>,
    started_at_ms: u64,
    /// Log streams the hub asked for (`shoal logs`).
    log_streams: crate::remote_logs::Streams,
}

impl<S: Store, B: Bus> Agent<S, B> {
    /// Resumes from the persisted desired state (offline autonomy).
    async fn start(&mut self) -> Result<(), AgentError> {
        if let Some(d) = self.store.load_desired()? {
            info!(
                generation = d.generation,
                replicas = d.workloads.len(),
                "resuming persisted desired state"
            );
            self.open_secrets(&d);
            self.desired = Some(d);
            self.reconcile().await;
        }
        Ok(())
    }

    /// Opens the secrets sealed in `d` that are not on disk yet. One that cannot be opened
    /// is logged (never its value); the replicas that need it fail with that said.
    fn open_secrets(&self, d: &DesiredState) {
        let failed = self.shared.secrets.open_all(
            self.config.device_id.as_str(),
            self.device_key.as_deref(),
            &d.secrets,
        );
        for (secret, reason) in failed {
            warn!(%secret, %reason, "cannot open secret");
        }
    }

    /// Removes opened secrets that neither the desired state nor a running replica uses.
    fn sweep_secrets(&self) {
        let Some(desired) = &self.desired else {
            return;
        };
        let keep: BTreeSet<(SecretName, String)> = desired
            .workloads
            .iter()
            .flat_map(crate::core::plan::secret_versions)
            .chain(
                self.replicas
                    .values()
                    .flat_map(|r| r.secrets.iter().cloned()),
            )
            .chain(self.stopping.values().flat_map(|(_, s)| s.iter().cloned()))
            .collect();
        self.shared.secrets.sweep(&keep);
    }

    async fn main_loop(&mut self, mut inbox: Inbox, shutdown: CancellationToken) {
        let mut report = tokio::time::interval_at(
            tokio::time::Instant::now() + HUB_SEARCH_REPORT,
            HUB_SEARCH_REPORT_PERIOD,
        );
        let searched_since = std::time::Instant::now();
        let period = Duration::from_millis(shoal_api::messages::STATUS_PERIOD_MS);
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut hub_check = tokio::time::interval(HUB_CHECK_PERIOD);
        hub_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(e) = inbox.bus.recv() => Event::Bus(e),
                Some(u) = inbox.replicas.recv() => Event::Replica(u),
                Some(w) = inbox.gone.recv() => Event::Gone(w),
                Some(m) = inbox.mdns.recv() => Event::Mdns(m),
                Some((t, r)) = inbox.probes.recv() => Event::Probed(t, r),
                Some(r) = inbox.local.recv() => Event::Local(r),
                _ = report.tick() => Event::HubSearchReport,
                _ = heartbeat.tick() => Event::Heartbeat,
                _ = hub_check.tick() => Event::HubCheck,
            };
            match event {
                Event::Bus(BusEvent::Connected) => {
                    self.link_changed(true, None);
                    self.hub_link.connected();
                    self.announce().await
                }
                Event::Bus(BusEvent::Disconnected(reason)) => {
                    self.link_changed(false, Some(reason));
                    self.hub_link.disconnected(now_ms());
                }
                Event::Bus(BusEvent::Desired(payload)) => self.on_desired(&payload).await,
                Event::Bus(BusEvent::LogRequest(payload)) => self.on_log_request(&payload),
                Event::Replica(u) => {
                    let current = self
                        .replicas
                        .get(&u.instance)
                        .is_some_and(|r| r.task == u.task);
                    if current {
                        let was_running = self.is_running(&u.instance);
                        self.statuses.insert(u.instance.clone(), u.status);
                        if was_running != self.is_running(&u.instance) {
                            self.refresh_services();
                        }
                        self.publish_status().await;
                    }
                }
                Event::Gone(id) => {
                    self.stopping.remove(&id);
                    // A replica held back for this id may start now; volumes may go.
                    self.reconcile().await;
                }
                Event::Mdns(m) => self.on_mdns(m),
                Event::Probed(target, result) => self.on_probed(target, result),
                Event::Local(request) => self.on_local(request),
                Event::Heartbeat => {
                    self.publish_status().await;
                    self.sweep_volumes(); // orphaned volumes expire
                    self.on_heartbeat_discovery();
                }
                Event::HubCheck => self.choose_hub(),
                Event::HubSearchReport => {
                    if self.config.broker.is_none() && self.hub_link.current().is_none() {
                        warn!(
                            fleet = %self.config.fleet,
                            searched_s = searched_since.elapsed().as_secs(),
                            running = self.replicas.len(),
                            "no hub for this fleet found over mDNS yet; running the persisted workloads offline and still looking"
                        );
                    }
                }
            }
        }
    }

    fn is_running(&self, instance: &str) -> bool {
        self.statuses
            .get(instance)
            .is_some_and(|s| s.phase == Phase::Running)
    }

    /// Advertises this device as `_shoal-agent._tcp.local.` and browses for hubs and peers.
    fn advertise_self(&mut self) {
        let ad = AgentAd {
            protocol: shoal_api::PROTOCOL_VERSION,
            fleet: self.config.fleet.clone(),
            device: self.config.device_id.clone(),
            arch: self.hello.arch.clone(),
            runtimes: self.hello.runtimes.clone(),
            labels: self.hello.labels.clone(),
        };
        let advert = shoal_daemon::mdns::Advert {
            ty: discovery::AGENT_SERVICE.to_string(),
            instance: self.config.device_id.to_string(),
            port: 0, // no TCP service: the record says "this device is here"
            txt: ad.to_txt(),
        };
        if let Err(e) = self.discovery.advertise(&advert) {
            warn!(error = %e, "cannot advertise this device over mdns");
        }
        for ty in [discovery::HUB_SERVICE, discovery::AGENT_SERVICE] {
            if ty == discovery::HUB_SERVICE && self.hubs_browsed {
                continue; // already browsed for enrollment
            }
            if let Err(e) = self.discovery.browse(ty, self.mdns_tx.clone()) {
                warn!(error = %e, "cannot browse over mdns");
            }
        }
    }

    fn on_mdns(&mut self, ev: MdnsEvent) {
        let (change, rejected) = self.directory.apply(ev, now_ms());
        if let Some(reason) = rejected {
            warn!(%reason, "mdns record ignored");
        }
        match change {
            Change::None | Change::Peers => {}
            Change::Hubs => self.choose_hub(),
            Change::Service(_) => self.refresh_services(),
        }
    }

    /// Follows the hubs mDNS shows through [`HubLink`]: a candidate is used once
    /// authenticated, and only while no hub is in use or the one in use has stopped working
    /// (then the last one that worked first); what `--broker`/`--hub` pinned is never
    /// replaced.
    fn choose_hub(&mut self) {
        let choice = self.directory.hub_choice();
        let step = self.hub_link.next(&choice.candidates, now_ms());
        self.follow(step, &choice);
    }

    /// The device's addresses may have changed (no service endpoint may point at them).
    fn on_heartbeat_discovery(&mut self) {
        if self
            .directory
            .set_own_addrs(shoal_daemon::mdns::host_addrs())
        {
            self.refresh_services();
        }
    }

    /// A probe of a hub candidate ended.
    fn on_probed(&mut self, target: Target, result: Result<(), crate::enroll::EnrollError>) {
        let probe = match result {
            Ok(()) => Probe::Authenticated,
            Err(e) => {
                let again = self
                    .hub_link
                    .failure(&target.instance)
                    .is_some_and(|(t, _)| t == &target);
                if again {
                    debug!(hub = %target.instance, error = %e, "hub candidate still not authenticated");
                } else {
                    warn!(hub = %target.instance, error = %e, "hub candidate not authenticated: ignored (a misconfigured or rogue hub?)");
                }
                Probe::Failed(e.to_string())
            }
        };
        let choice = self.directory.hub_choice();
        let step = self
            .hub_link
            .probed(&target, probe, &choice.candidates, now_ms());
        self.follow(step, &choice);
    }

    /// Carries out `step` (and those it leads to), then reports what changed.
    fn follow(&mut self, mut step: Step, choice: &HubChoice) {
        loop {
            match step {
                Step::Wait => break,
                Step::Probe(t) => {
                    self.probe(t);
                    break;
                }
                Step::Use(t) => {
                    self.use_hub(&t);
                    step = self.hub_link.next(&choice.candidates, now_ms());
                }
            }
        }
        self.report_hubs(choice);
    }

    /// Authenticates a candidate in the background; the outcome comes back as
    /// [`Event::Probed`].
    fn probe(&self, target: Target) {
        let Some(id) = self.identity.clone() else {
            // Not reached: an agent without an identity does not authenticate.
            warn!(hub = %target.instance, "cannot authenticate a hub without credentials");
            return;
        };
        // A candidate tried again (it failed before) is said once, not at every retry.
        if self.hub_link.failure(&target.instance).is_some() {
            debug!(hub = %target.instance, "authenticating a hub candidate again");
        } else {
            info!(hub = %target.instance, broker = ?target.broker.as_ref().map(ToString::to_string), http = ?target.http, "hub found over mdns; authenticating it");
        }
        let tx = self.probe_tx.clone();
        let stop = self.shared.stopping.clone();
        self.tracker.spawn(async move {
            let auth =
                crate::enroll::authenticate(&id, target.http.as_deref(), target.broker.as_ref());
            tokio::select! {
                _ = stop.cancelled() => {}
                r = auth => { let _ = tx.send((target, r)).await; }
            }
        });
    }

    /// Points the bus (unless `--broker`) and renewals and downloads (unless `--hub`) at
    /// an authenticated hub.
    fn use_hub(&mut self, t: &Target) {
        info!(hub = %t.instance, broker = ?t.broker.as_ref().map(ToString::to_string), http = ?t.http, "using the hub found over mdns");
        if let Some(http) = &t.http {
            self.hub_http_tx.send_replace(Some(http.clone()));
        }
        if let Some(broker) = &t.broker {
            // Only a new address wakes the bus (a wake-up restarts a pending connect).
            self.broker_tx.send_if_modified(|b| {
                let changed = b.as_ref() != Some(broker);
                *b = Some(broker.clone());
                changed
            });
        }
    }

    /// Says, once each, which hubs are ignored, which others serve the fleet, and when the
    /// hub in use withdrew.
    fn report_hubs(&mut self, choice: &HubChoice) {
        for (instance, reason) in &choice.ignored {
            if self.hub.ignored.insert(instance.clone()) {
                let ours = self
                    .directory
                    .hubs()
                    .any(|h| &h.hub.instance == instance && h.hub.ad.fleet == self.config.fleet);
                if ours {
                    warn!(hub = %instance, %reason, "hub advertising this fleet ignored");
                } else {
                    info!(hub = %instance, %reason, "hub ignored");
                }
            }
        }
        let current = self.hub_link.current().map(|t| t.instance.clone());
        let others: Vec<String> = choice
            .candidates
            .iter()
            .map(|c| c.instance.clone())
            .filter(|i| Some(i) != current.as_ref())
            .collect();
        if others != self.hub.conflicting {
            if let (Some(using), false) = (&current, others.is_empty()) {
                warn!(fleet = %self.config.fleet, %using, others = ?others, "several hubs serve this fleet; using the one in use while it works (run one hub per fleet)");
            }
            self.hub.conflicting = others;
        }
        let withdrawn = current
            .as_ref()
            .is_some_and(|c| !choice.candidates.iter().any(|h| &h.instance == c));
        if withdrawn && !self.hub.withdrawn {
            if let Some(old) = &current {
                warn!(hub = %old, "hub withdrew its mdns record; still trying its last address and looking for another");
            }
        }
        self.hub.withdrawn = withdrawn;
    }

    /// Brings service adverts, browses, endpoint files and allow-lists in line with the
    /// desired state, the replicas running here and the directory.
    fn refresh_services(&mut self) {
        let desired: Vec<DesiredWorkload> = self
            .desired
            .as_ref()
            .map(|d| d.workloads.clone())
            .unwrap_or_default();
        let running: Vec<&DesiredWorkload> = desired
            .iter()
            .filter(|w| self.is_running(&w.instance()))
            .collect();

        let want = services::adverts(
            &self.config.fleet,
            &self.config.device_id,
            running.iter().copied(),
        );
        let stale: Vec<String> = self
            .advertised
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        for key in stale {
            if let Some(fullname) = self.advertised.remove(&key) {
                info!(service = %key, "withdrawing service advert");
                self.discovery.withdraw(&fullname);
            }
        }
        for (key, ad) in want {
            if self.advertised.contains_key(&key) {
                continue;
            }
            match self.discovery.advertise(&ad) {
                Ok(fullname) => {
                    info!(service = %key, port = ad.port, "advertising service");
                    self.advertised.insert(key, fullname);
                }
                Err(e) => warn!(error = %e, "cannot advertise service"),
            }
        }

        let used: BTreeSet<WorkloadName> = desired
            .iter()
            .flat_map(|w| w.uses.iter().cloned())
            .collect();
        let unused: Vec<WorkloadName> = self.browsing.difference(&used).cloned().collect();
        for svc in unused {
            // No more events come for it: forget its endpoints, or they would linger.
            self.discovery
                .stop_browse(&discovery::workload_service(&svc));
            self.directory.forget_service(&svc);
            self.browsing.remove(&svc);
        }
        let new: Vec<WorkloadName> = used.difference(&self.browsing).cloned().collect();
        for svc in new {
            match self
                .discovery
                .browse(&discovery::workload_service(&svc), self.mdns_tx.clone())
            {
                Ok(()) => {
                    self.browsing.insert(svc);
                }
                // Tried again at the next refresh.
                Err(e) => warn!(error = %e, "cannot browse for service"),
            }
        }

        let wanted = services::wanted(&desired, running.iter().copied(), &self.directory);
        if let Err(e) = self.files.sync(&wanted) {
            warn!(error = %e, "cannot write service endpoint files");
        }
    }

    fn withdraw_all(&mut self) {
        for (_, fullname) in std::mem::take(&mut self.advertised) {
            self.discovery.withdraw(&fullname);
        }
    }

    fn link_changed(&mut self, connected: bool, error: Option<String>) {
        if self.link.connected != connected || self.link.since_ms.is_none() {
            self.link.since_ms = Some(now_ms());
        }
        self.link.connected = connected;
        self.link.last_error = error;
    }

    /// Answers the local API (`shoal-agent ps`, …): from state the loop owns, at once.
    fn on_local(&mut self, request: LocalRequest) {
        match request {
            LocalRequest::Peers(reply) => {
                let _ = reply.send(self.peers_view());
            }
            LocalRequest::Status(reply) => {
                let _ = reply.send(self.status_view());
            }
            LocalRequest::Replicas(reply) => {
                let _ = reply.send(self.replica_views());
            }
            LocalRequest::Inspect(name, reply) => {
                let desired: Vec<DesiredWorkload> = self
                    .desired
                    .iter()
                    .flat_map(|d| &d.workloads)
                    .filter(|w| w.name == name)
                    .cloned()
                    .collect();
                let observed: Vec<ReplicaView> = self
                    .replica_views()
                    .into_iter()
                    .filter(|r| r.workload == name.as_str())
                    .collect();
                let view = (!desired.is_empty() || !observed.is_empty()).then(|| InspectView {
                    workload: name.to_string(),
                    desired,
                    observed,
                    logs: Vec::new(),
                });
                let _ = reply.send(view);
            }
            LocalRequest::Restart(name, reply) => {
                let mut restarted = Vec::new();
                for (instance, r) in &self.replicas {
                    if r.workload == name {
                        info!(%instance, "restart requested over the local api");
                        r.controls.restart.notify_one();
                        restarted.push(instance.clone());
                    }
                }
                let _ = reply.send(if restarted.is_empty() {
                    Err(format!(
                        "no replica of workload {:?} runs on this device (see `shoal-agent ps`)",
                        name.as_str()
                    ))
                } else {
                    Ok(RestartView { restarted })
                });
            }
        }
    }

    /// Every replica supervised here, with what it uses.
    fn replica_views(&self) -> Vec<ReplicaView> {
        let desired: BTreeMap<String, &DesiredWorkload> = self
            .desired
            .iter()
            .flat_map(|d| &d.workloads)
            .map(|w| (w.instance(), w))
            .collect();
        self.replicas
            .iter()
            .map(|(instance, r)| {
                let status = self.statuses.get(instance);
                let phase = status.map_or(Phase::Pending, |s| s.phase);
                let (memory, cpu) = r.controls.usage.view(phase == Phase::Running);
                ReplicaView {
                    instance: instance.clone(),
                    workload: r.workload.to_string(),
                    replica: desired.get(instance).map_or(0, |w| w.replica),
                    revision: r.revision.clone(),
                    variant: status.map(|s| s.variant.clone()).unwrap_or_default(),
                    phase: phase.to_string(),
                    restarts: status.map_or(0, |s| s.restarts),
                    started_at_ms: status.and_then(|s| s.started_at_ms),
                    reason: status.and_then(|s| s.reason.clone()),
                    healthy: status.and_then(|s| s.healthy),
                    exit_code: status.and_then(|s| s.exit_code),
                    memory_bytes: memory,
                    memory_limit: desired.get(instance).map_or(0, |w| w.resources.memory),
                    cpu_nanos: cpu,
                }
            })
            .collect()
    }

    fn status_view(&self) -> AgentStatusView {
        let mut hub = self.link.clone();
        hub.broker = self.broker_tx.borrow().as_ref().map(ToString::to_string);
        let allocated = self
            .desired
            .iter()
            .flat_map(|d| &d.workloads)
            .map(|w| w.resources.memory)
            .sum();
        AgentStatusView {
            device: self.config.device_id.to_string(),
            fleet: self.config.fleet.clone(),
            agent_version: self.hello.agent_version.clone(),
            runtimes: self.hello.runtimes.clone(),
            hub,
            generation: self.desired.as_ref().map_or(0, |d| d.generation),
            last_sync_ms: self.last_sync_ms,
            replicas: self.replicas.len(),
            running: self.replicas.keys().filter(|i| self.is_running(i)).count(),
            disk: crate::host::disk(&self.config.data_dir).map(|(total, available)| {
                local::DiskView {
                    path: self.config.data_dir.display().to_string(),
                    total_bytes: total,
                    available_bytes: available,
                }
            }),
            memory: local::MemoryView {
                offered_bytes: self.hello.memory,
                allocated_bytes: allocated,
                machine_total_bytes: crate::host::total_memory(),
                machine_available_bytes: crate::host::available_memory(),
                agent_rss_bytes: crate::host::agent_rss(),
            },
            started_at_ms: self.started_at_ms,
        }
    }

    fn peers_view(&self) -> PeersView {
        let choice = self.directory.hub_choice();
        let current = self.hub_link.current().map(|t| t.instance.as_str());
        let pinned = self.config.broker.is_some() && self.config.hub_url.is_some();
        let state = |instance: &str| {
            let candidate = choice.candidates.iter().any(|c| c.instance == instance);
            if current == Some(instance) {
                "selected".to_string()
            } else if let Some((_, why)) = self.hub_link.failure(instance) {
                format!("ignored: not authenticated: {why}")
            } else if candidate && pinned {
                "ignored: --broker and --hub given".to_string()
            } else if candidate {
                "conflict".to_string()
            } else {
                choice
                    .ignored
                    .iter()
                    .find(|(i, _)| i == instance)
                    .map_or("ignored".to_string(), |(_, r)| format!("ignored: {r}"))
            }
        };
        let addrs = |a: &[std::net::IpAddr]| a.iter().map(|a| a.to_string()).collect();
        PeersView {
            mdns: self.config.mdns.is_some(),
            fleet: self.config.fleet.clone(),
            hubs: self
                .directory
                .hubs()
                .map(|h| HubPeer {
                    instance: h.hub.instance.clone(),
                    fleet: h.hub.ad.fleet.clone(),
                    addresses: addrs(&h.hub.addrs),
                    state: state(&h.hub.instance),
                    first_seen_ms: h.first_seen_ms,
                })
                .collect(),
            devices: self
                .directory
                .peers()
                .map(|p| DevicePeer {
                    device: p.ad.device.to_string(),
                    arch: p.ad.arch.clone(),
                    runtimes: p.ad.runtimes.clone(),
                    labels: p.ad.labels.clone(),
                    addresses: addrs(&p.addrs),
                    first_seen_ms: p.first_seen_ms,
                })
                .collect(),
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

    /// The hub asks for log lines: served by a task of their own (see [`crate::remote_logs`]).
    fn on_log_request(&mut self, payload: &[u8]) {
        let req = match serde_json::from_slice::<shoal_api::messages::LogRequest>(payload) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "malformed log request ignored");
                return;
            }
        };
        // Only what the hub signed, for this device, and not a replay of an old request (an
        // agent run --insecure has no hub key to check with).
        if let Some(key) = &self.hub_key {
            let newest = self.newest_log_request_ms;
            if let Err(e) =
                shoal_pki::sign::verify_log_request(key, &self.config.device_id, newest, &req)
            {
                warn!(reason = %e, "log request refused");
                return;
            }
        }
        self.newest_log_request_ms = self.newest_log_request_ms.max(req.issued_ms);
        self.log_streams.handle(
            req,
            crate::remote_logs::Context {
                device: &self.config.device_id,
                logs_dir: &self.shared.logs_dir,
                bus: &self.bus,
                tracker: &self.tracker,
                shutdown: &self.shared.stopping,
            },
        );
    }

    async fn on_desired(&mut self, payload: &[u8]) {
        if payload.is_empty() {
            return; // a cleared retained message
        }
        let have = self.desired.as_ref().map_or(0, |c| c.generation);
        let d = match shoal_pki::sign::verify_desired(
            self.hub_key.as_ref(),
            &self.config.device_id,
            have,
            payload,
        ) {
            Ok(d) => d,
            Err(shoal_pki::sign::Rejected::Same(g)) => {
                debug!(generation = g, "desired state in force delivered again");
                self.last_sync_ms = Some(now_ms());
                return;
            }
            Err(e) => {
                warn!(reason = %e, "desired state rejected; nothing changes");
                return;
            }
        };
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
        self.last_sync_ms = Some(now_ms());
        self.open_secrets(&d);
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
                        secrets: r.secrets.clone(),
                    },
                )
            })
            .collect();
        for action in plan(&desired.workloads, &observed) {
            match action {
                Action::Stop(instance) => self.stop(&instance).await,
                // The same replica and revision again while its old container still stops
                // (deleted and applied again within the grace period): containerd would
                // see one id twice. It starts once that container is gone.
                Action::Start(w)
                    if w.container.is_some()
                        && self
                            .stopping
                            .contains_key(&crate::runtime::container_id(&w)) =>
                {
                    info!(instance = %w.instance(), "waiting for the previous container of this replica to stop");
                }
                Action::Start(w) => self.spawn(w, &self.artifact_base(&desired)),
                Action::Replace(w) => {
                    self.stop(&w.instance()).await;
                    self.spawn(w, &self.artifact_base(&desired));
                }
            }
        }
        self.refresh_services();
        self.sweep_volumes();
        self.sweep_secrets();
        self.publish_status().await;
    }

    /// Sweeps the volumes of workloads this device no longer runs (not desired, no replica
    /// left, none still stopping: a container may write during its grace period): kept for
    /// the retention period, then deleted in the background.
    fn sweep_volumes(&self) {
        let Some(desired) = &self.desired else {
            return; // nothing known yet: keep everything
        };
        let keep: BTreeSet<&str> = desired
            .workloads
            .iter()
            .map(|w| w.name.as_str())
            .chain(self.replicas.values().map(|r| r.workload.as_str()))
            .chain(self.stopping.values().map(|(w, _)| w.as_str()))
            .collect();
        let retention = self.config.volume_retention;
        for swept in self.shared.volumes.sweep(&keep, now_ms(), retention) {
            match swept {
                Swept::Orphaned(workload) => info!(
                    %workload,
                    retention = %shoal_api::quantity::format_duration_ms(
                        u64::try_from(retention.as_millis()).unwrap_or(u64::MAX)
                    ),
                    "the workload left this device; its volumes are kept for the retention period"
                ),
                Swept::Expired(workload, trash) => {
                    info!(%workload, "volumes deleted: the workload left this device");
                    self.delete_in_background(trash);
                }
                Swept::Failed(workload, e) => warn!(%workload, error = %e, "cannot sweep volumes"),
            }
        }
    }

    /// Deletes a directory on the blocking pool (a large volume takes a while on an SD card).
    fn delete_in_background(&self, dir: PathBuf) {
        self.tracker.spawn(async move {
            let shown = dir.display().to_string();
            match tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(dir = %shown, error = %e, "cannot delete"),
                Err(e) => warn!(dir = %shown, error = %e, "delete task failed"),
            }
        });
    }

    fn spawn(&mut self, w: DesiredWorkload, artifact_base: &str) {
        self.next_task += 1;
        let task = self.next_task;
        let controls = supervisor::Controls::default();
        let instance = w.instance();
        info!(%instance, revision = %w.revision, "starting replica");
        let revision = w.revision.clone();
        let workload = w.name.clone();
        let secrets = crate::core::plan::secret_versions(&w);
        let container = w
            .container
            .is_some()
            .then(|| crate::runtime::container_id(&w));
        let network = self.network(&w);
        let handle = self.tracker.spawn(supervisor::supervise(
            self.shared.clone(),
            w,
            artifact_base.to_string(),
            network,
            task,
            controls.clone(),
        ));
        self.replicas.insert(
            instance,
            Replica {
                workload,
                revision,
                secrets,
                container,
                task,
                controls,
                handle,
            },
        );
    }

    /// Where modules come from: the hub's URL if it gave one; otherwise the hub this agent
    /// was pointed at (`--hub`); otherwise empty, and the supervisor uses the hub found over
    /// mDNS. Never the broker's host on a TLS fleet: a broker (`shoal-broker`) is not the
    /// hub, and the fetcher verifies the hub as `shoal-hub`. An `--insecure` agent, which
    /// authenticates nobody, still tries the hub's port at the broker's host.
    fn artifact_base(&self, desired: &DesiredState) -> String {
        if !desired.artifact_base.is_empty() {
            return desired.artifact_base.clone();
        }
        if let Some(hub) = &self.config.hub_url {
            return hub.trim_end_matches('/').to_string();
        }
        if !self.config.insecure {
            return String::new();
        }
        let scheme = "http";
        match (desired.artifact_port, &self.config.broker) {
            (Some(port), Some(b)) if b.host.contains(':') => {
                format!("{scheme}://[{}]:{port}", b.host)
            }
            (Some(port), Some(b)) => format!("{scheme}://{}:{port}", b.host),
            _ => String::new(),
        }
    }

    /// The sandbox's network grants for a replica of `w` (see [`crate::services`]).
    fn network(&mut self, w: &DesiredWorkload) -> Network {
        let mut net = Network {
            listen: w.ports.iter().map(|p| p.port).collect(),
            allow: w.network.clone(),
            ..Network::default()
        };
        if !w.uses.is_empty() {
            net.connect = Some(self.files.allow_list(&w.name));
            match self.files.dir(&w.name) {
                Ok(d) => net.services_dir = Some(d),
                Err(e) => {
                    warn!(workload = %w.name, error = %e, "cannot create service endpoint directory")
                }
            }
        }
        net
    }

    /// Stops a replica. A WASM guest stops within milliseconds and is waited for (its
    /// successor may need its ports). A container may take its whole stop grace period
    /// (SIGTERM, then SIGKILL), which must not hold up the main loop: its supervisor finishes
    /// in the background (the task tracker still awaits it at shutdown; its container id is
    /// per revision, so a successor of another revision never collides with it, and one of
    /// the same revision waits for [`Event::Gone`]).
    async fn stop(&mut self, instance: &str) {
        if let Some(r) = self.replicas.remove(instance) {
            info!(%instance, "stopping replica");
            r.controls.cancel.cancel();
            if let Some(id) = r.container {
                // Its volumes and secret files stay until it is gone.
                self.stopping.insert(id.clone(), (r.workload, r.secrets));
                let gone = self.gone_tx.clone();
                self.tracker.spawn(async move {
                    let _ = r.handle.await;
                    let _ = gone.send(id).await;
                });
            } else {
                let _ = r.handle.await;
            }
        }
        self.statuses.remove(instance);
    }

    async fn stop_all(&mut self) {
        for r in self.replicas.values() {
            r.controls.cancel.cancel();
        }
        for (_, r) in std::mem::take(&mut self.replicas) {
            let _ = r.handle.await;
        }
        self.statuses.clear();
    }

    async fn publish_status(&self) {
        let status = DeviceStatus {
            protocol: shoal_api::PROTOCOL_VERSION,
            device_id: self.config.device_id.clone(),
            observed_generation: self.desired.as_ref().map_or(0, |d| d.generation),
            workloads: self.statuses.values().cloned().collect(),
            time_ms: strictly_after(&self.status_ms, now_ms()),
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

/// `now`, or one past the last time handed out when that is not older: successive calls
/// return strictly increasing times.
fn strictly_after(last: &std::sync::atomic::AtomicU64, now: u64) -> u64 {
    use std::sync::atomic::Ordering;
    let next = |prev: u64| now.max(prev + 1);
    match last.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| Some(next(p))) {
        Ok(prev) | Err(prev) => next(prev),
    }
}

/// The device's capabilities, sent on every connect.
fn hello(config: &AgentConfig, containers: bool) -> Hello {
    let mut runtimes = Vec::new();
    if config.wasm {
        runtimes.push(if WasmRuntime::compiles() {
            RUNTIME_WASM.to_string()
        } else {
            RUNTIME_WASM_PRECOMPILED.to_string()
        });
    }
    if containers {
        runtimes.push(RUNTIME_CONTAINER.to_string());
    }
    Hello {
        protocol: shoal_api::PROTOCOL_VERSION,
        device_id: config.device_id.clone(),
        arch: std::env::consts::ARCH.to_string(),
        variant: shoal_api::oci::native_variant().map(String::from),
        os: std::env::consts::OS.to_string(),
        runtimes,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory: config.memory.unwrap_or_else(crate::host::total_memory),
        labels: config.labels.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        max_replicas: config.max_replicas,
    }
}

impl<S: Store, B: Bus> Drop for Agent<S, B> {
    fn drop(&mut self) {
        for r in self.replicas.values() {
            r.controls.cancel.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::strictly_after;

    #[test]
    fn status_times_strictly_increase() {
        let last = std::sync::atomic::AtomicU64::new(0);
        assert_eq!(strictly_after(&last, 100), 100);
        assert_eq!(strictly_after(&last, 100), 101); // same millisecond
        assert_eq!(strictly_after(&last, 50), 102); // the clock stepped back
        assert_eq!(strictly_after(&last, 500), 500);
    }
}
