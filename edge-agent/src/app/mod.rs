//! `shoal-agent run`: the agent's imperative shell and its main loop.
//!
//! [`run`] opens what the agent works with ([`start`]: mDNS, identity, runtimes, the local
//! API, the bus), then one loop owns the device's state, in parts that never call each other:
//! [`replicas`] (the persisted desired state, the supervised replicas and their statuses),
//! [`discovery`] (hub choice, adverts, browsing, service files), [`link`] (the bus: presence,
//! hello, status, the link's state) and [`streams`] (the hub's log requests); [`views`]
//! answers the local API from them. The loop `select!`s over one closed set of [`Event`]s and
//! sequences the parts for each: a desired state is acted on only if its generation is newer
//! than the persisted one, and only after it has been saved durably; after a reconcile the
//! services are refreshed, unused volumes and secrets swept, and the status published. At
//! start the persisted desired state is acted on at once, so a device runs its workloads even
//! when the hub and the broker are unreachable.

mod discovery;
mod link;
mod replicas;
mod start;
mod streams;
mod views;

use crate::bus::{self, BusEvent};
use crate::config::AgentConfig;
use crate::fetch::Fetcher;
use crate::local::LocalRequest;
use crate::replica::supervisor::{Shared, Update};
use crate::runtime::wasm::{WasmRuntime, WasmWorkloads};
use crate::runtime::Runtimes;
use crate::store::SledStore;
use discovery::{Discovery, Probed, Wiring};
use link::Link;
use replicas::{ArtifactSource, Desired, Replicas, Settings};
use shoal_daemon::clock::now_ms;
use shoal_daemon::mdns::MdnsEvent;
use std::sync::Arc;
use std::time::Duration;
use streams::LogStreams;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

pub use crate::config::{ContainerdOptions, LocalSocket};

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
    Runtime(crate::runtime::wasm::WasmInitError),
    #[error(transparent)]
    Mdns(#[from] shoal_daemon::mdns::MdnsError),
    #[error(transparent)]
    Local(#[from] crate::local::LocalError),
    #[error("no broker given and mDNS is off: give --broker, or drop --no-mdns to find the hub")]
    NoBroker,
    #[error(transparent)]
    Enroll(#[from] crate::enroll::EnrollError),
    #[error("secrets or configs directory: {0}")]
    Secrets(crate::secrets::FileError),
}

/// What the main loop reacts to: one closed set, each from one source.
#[derive(Debug)]
enum Event {
    Bus(BusEvent),
    Replica(Update),
    /// A container stopping in the background (in its grace period) has ended: its id.
    Gone(String),
    Mdns(MdnsEvent),
    /// How authenticating a hub candidate went.
    Probed(Probed),
    Local(LocalRequest),
    /// Time to say again that no hub was found, if still so.
    HubSearchReport,
    /// Time for the periodic status (the hub's sign of life from this device).
    Heartbeat,
    /// Time to look at the choice of hub again.
    HubCheck,
    /// Time to see whether replicas with `spec.disconnect.stopAfter` still may run, and
    /// whether a scheduled run is due.
    ContactCheck,
}

/// The channels the main loop reads (all bounded).
struct Inbox {
    bus: mpsc::Receiver<BusEvent>,
    replicas: mpsc::Receiver<Update>,
    gone: mpsc::Receiver<String>,
    mdns: mpsc::Receiver<MdnsEvent>,
    probes: mpsc::Receiver<Probed>,
    local: mpsc::Receiver<LocalRequest>,
}

/// What the loop owns: its parts, and what the local API's views add to them.
struct Agent {
    config: AgentConfig,
    replicas: Replicas,
    discovery: Discovery,
    link: Link,
    streams: LogStreams,
    started_at_ms: u64,
    /// When the loop last said hello again for a fenced replica (see `ContactCheck`).
    reannounced: Option<std::time::Instant>,
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
    let containers = start::containers(&config, &store, registries.clone(), shutdown.clone()).await;
    let tracker = TaskTracker::new();
    let engine_stop = CancellationToken::new();
    let (runtime, ticker) = WasmRuntime::new(
        config.data_dir.join("cache").join("compiled"),
        engine_stop.clone(),
    )
    .map_err(AgentError::Runtime)?;

    if config.broker.is_none() && config.mdns.is_none() {
        return Err(AgentError::NoBroker);
    }
    // Discovery and the local API stop with the main loop; the bus outlives it by a moment,
    // to announce a clean departure.
    let loop_stop = shutdown.child_token();
    let (mdns_tx, mut mdns_rx) = mpsc::channel(256);
    let (mdns, dns) = start::mdns(&config, &tracker, &loop_stop);
    let found = start::identity(
        &config,
        dns.as_ref(),
        (&mdns_tx, &mut mdns_rx),
        mdns.is_some(),
        &shutdown,
    )
    .await?;
    let start::Found::Identity {
        identity,
        hubs_browsed,
        early,
    } = found
    else {
        info!("stopped before enrolling");
        engine_stop.cancel();
        return Ok(());
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
    start::local_api(&config, local_tx, &tracker, &loop_stop).await?;

    let bus_stop = CancellationToken::new();
    let (bus_tx, bus_rx) = mpsc::channel(64);
    let (broker_tx, broker_rx) = watch::channel(config.broker.clone());
    let (contact_tx, contact_rx) = watch::channel(None);
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
        contact_tx,
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
    let configs = crate::configs::ConfigDirs::new(&config.data_dir);
    configs.prepare().map_err(AgentError::Secrets)?;
    let shared = Shared {
        runtime: Arc::new(Runtimes {
            wasm: Arc::new(WasmWorkloads::new(runtime, fetcher, hub_http_rx.clone())),
            container: containers.clone(),
        }),
        logs_dir: config.data_dir.join("logs"),
        volumes: crate::volumes::Volumes::new(config.data_dir.join("volumes")),
        secrets,
        configs,
        updates: up_tx,
        http: crate::http_client(reqwest::Client::builder()).unwrap_or_default(),
    };
    let hub_key = identity.as_ref().map(|i| i.hub_key.clone());
    let hardware = crate::hardware::inventory(&config.devices);
    for (class, nodes) in &hardware {
        info!(class = %class, nodes = ?nodes, "offering hardware to workloads");
    }
    let settings = Settings {
        device_id: config.device_id.clone(),
        hub_key: hub_key.clone(),
        device_key: identity
            .as_ref()
            .map(|i| shoal_pki::device::key_file(&i.dir)),
        artifacts: ArtifactSource {
            hub_url: config.hub_url.clone(),
            broker: config.broker.clone(),
            insecure: config.insecure,
        },
        volume_retention: config.volume_retention,
        hardware: hardware.clone(),
    };
    let wiring = Wiring {
        dns,
        mdns_tx,
        probe_tx,
        broker_tx,
        hub_http_tx,
        tracker: tracker.clone(),
        stopping: shutdown.clone(),
    };
    let mut agent = Agent {
        replicas: Replicas::new(settings, Box::new(store), shared, gone_tx, tracker.clone()),
        discovery: Discovery::new(&config, identity, hubs_browsed, wiring),
        link: Link::new(
            config.device_id.clone(),
            bus,
            start::hello(&config, containers.is_some(), &hardware),
            contact_rx,
        ),
        streams: LogStreams::new(
            config.device_id.clone(),
            hub_key,
            config.data_dir.join("logs"),
            tracker.clone(),
            shutdown.clone(),
        ),
        config,
        started_at_ms: now_ms(),
        reannounced: None,
    };
    agent.discovery.advertise_self(agent.link.hello());
    for ev in early {
        agent.on_mdns(ev);
    }
    agent.replicas.empty_trash();
    if agent.replicas.resume()? {
        // Before anything starts: with no contact yet, replicas with `stopAfter` wait for
        // the hub's word.
        agent
            .replicas
            .check_contact(agent.link.contact(), std::time::Instant::now());
        agent.reconcile().await;
    }
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
    agent.replicas.stop_all().await;
    agent.discovery.withdraw_all();
    agent.link.leave().await;
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

impl Agent {
    async fn main_loop(&mut self, mut inbox: Inbox, shutdown: CancellationToken) {
        let mut report = tokio::time::interval_at(
            tokio::time::Instant::now() + HUB_SEARCH_REPORT,
            HUB_SEARCH_REPORT_PERIOD,
        );
        let searched_since = std::time::Instant::now();
        let period = Duration::from_millis(shoal_api::wire::messages::STATUS_PERIOD_MS);
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut contact_check = tokio::time::interval(Duration::from_secs(1));
        contact_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hub_check = tokio::time::interval(HUB_CHECK_PERIOD);
        hub_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(e) = inbox.bus.recv() => Event::Bus(e),
                Some(u) = inbox.replicas.recv() => Event::Replica(u),
                Some(w) = inbox.gone.recv() => Event::Gone(w),
                Some(m) = inbox.mdns.recv() => Event::Mdns(m),
                Some(p) = inbox.probes.recv() => Event::Probed(p),
                Some(r) = inbox.local.recv() => Event::Local(r),
                _ = report.tick() => Event::HubSearchReport,
                _ = heartbeat.tick() => Event::Heartbeat,
                _ = hub_check.tick() => Event::HubCheck,
                _ = contact_check.tick(), if self.replicas.ticks() => Event::ContactCheck,
            };
            self.handle(event, searched_since).await;
        }
    }

    /// One event, through the parts it concerns, in order.
    async fn handle(&mut self, event: Event, searched_since: std::time::Instant) {
        match event {
            Event::Bus(BusEvent::Connected) => {
                self.link.changed(true, None);
                self.discovery.connected();
                self.link
                    .announce(self.replicas.generation(), self.replicas.statuses())
                    .await;
            }
            Event::Bus(BusEvent::Disconnected(reason)) => {
                self.link.changed(false, Some(reason));
                self.discovery.disconnected();
            }
            Event::Bus(BusEvent::Desired(payload)) => match self.replicas.on_desired(&payload) {
                Desired::Accepted => {
                    self.link.synced();
                    self.replicas
                        .check_contact(self.link.contact(), std::time::Instant::now());
                    self.reconcile().await;
                }
                Desired::Same => self.link.synced(),
                Desired::Ignored => {}
            },
            Event::Bus(BusEvent::LogRequest(payload)) => {
                self.streams.on_request(&payload, self.link.bus());
            }
            Event::Replica(u) => {
                if let Some(updated) = self.replicas.on_update(u) {
                    if updated.running_changed {
                        self.refresh_services();
                    }
                    if updated.run_finished || updated.order {
                        // Its supervisor goes and its hardware is given back; the
                        // status follows.
                        self.reconcile().await;
                    } else {
                        self.publish_status().await;
                    }
                }
            }
            Event::Gone(id) => {
                self.replicas.gone(&id);
                // A replica held back for this id may start now; volumes may go.
                self.reconcile().await;
            }
            Event::Mdns(m) => self.on_mdns(m),
            Event::Probed((target, result)) => self.discovery.on_probed(target, result),
            Event::Local(request) => self.on_local(request),
            Event::Heartbeat => {
                if self.replicas.results_unsaved() && self.replicas.save_results() {
                    self.reconcile().await; // the finished supervisors go
                }
                self.publish_status().await;
                self.replicas.sweep_volumes(); // orphaned volumes expire
                if self.discovery.own_addrs_changed() {
                    self.refresh_services();
                }
            }
            Event::HubCheck => self.discovery.choose_hub(),
            Event::ContactCheck => {
                // Statuses (and their acknowledgements) come every 10 s: with a shorter
                // `stopAfter`, one is sent whenever contact is older than a quarter of it,
                // so a device that is fine never fences itself.
                if let Some(ms) = self.replicas.min_stop_after() {
                    let stale = self
                        .link
                        .contact()
                        .is_none_or(|c| c.elapsed() > Duration::from_millis(ms / 4));
                    if stale && self.link.connected() {
                        self.publish_status().await;
                    }
                }
                let fenced = self
                    .replicas
                    .check_contact(self.link.contact(), std::time::Instant::now());
                // Fenced, but the broker hears this device again without a reconnect (a
                // stall shorter than the keep-alive): hello again, at most every 5 s, for
                // the hub to issue the state that lets the replica run.
                let fresh = self
                    .link
                    .contact()
                    .is_some_and(|c| c.elapsed() < Duration::from_secs(2));
                let due = self
                    .reannounced
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
                if self.replicas.has_fenced() && fresh && due && self.link.connected() {
                    self.reannounced = Some(std::time::Instant::now());
                    self.link
                        .announce(self.replicas.generation(), self.replicas.statuses())
                        .await;
                }
                let fired = self
                    .replicas
                    .check_schedules(now_ms(), self.link.connected());
                if fenced || fired {
                    self.reconcile().await;
                }
            }
            Event::HubSearchReport => self
                .discovery
                .report_search(searched_since.elapsed().as_secs(), self.replicas.len()),
        }
    }

    fn on_mdns(&mut self, ev: MdnsEvent) {
        if self.discovery.on_mdns(ev) {
            self.refresh_services();
        }
    }

    /// Brings the replicas in line with the desired state (each new one with its network
    /// grants from discovery), then the services, the sweeps and the status.
    async fn reconcile(&mut self) {
        let discovery = &mut self.discovery;
        if !self.replicas.reconcile(&mut |w| discovery.network(w)).await {
            return;
        }
        self.refresh_services();
        self.replicas.sweep();
        self.publish_status().await;
    }

    fn refresh_services(&mut self) {
        self.discovery
            .refresh_services(self.replicas.desired_workloads(), &self.replicas.running());
    }

    async fn publish_status(&self) {
        self.link
            .publish_status(self.replicas.generation(), self.replicas.statuses())
            .await;
    }
}
