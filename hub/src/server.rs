//! `shoal-hub serve`: wires the broker, the bus, the HTTP API and [`HubCore`] together and runs
//! the main loop until shutdown.
//!
//! The main loop is the only owner of [`HubCore`]. It `select!`s over bus events, HTTP
//! requests and the shutdown token, turns each into an [`Event`], handles it, and publishes
//! whatever desired states changed. Every spawned task is tracked and awaited on shutdown.
//!
//! On an etcd store the loop first stands by (reads only, see [`crate::ha`]) until this hub
//! is elected, then leads until shutdown or until it loses the leadership.

use crate::blobs::BlobStore;
use crate::bus::{self, Bus, BusEvent, Outgoing};
use crate::core::{ApplyOutcome, HubCore, SecretRefusal};
use crate::http::{self, AppState, DeviceAction, LabelFailure, Request};
use crate::metrics::{Metrics, ResultLabel};
use crate::store::{Store, StoredSecret};
use shoal_api::discovery::{self, AgentAd, HubAd, MqttEndpoint};
use shoal_api::endpoint::BrokerUrl;
use shoal_api::ids::DeviceId;
use shoal_api::manifest::{parse_stream, ManifestError};
use shoal_api::messages::{now_ms, ApplyResult, DesiredState, DeviceStatus, Hello, LogChunk};
use shoal_api::topics::{self, Inbound};
use shoal_api::workload::validate_all;
use shoal_daemon::mdns::{Advert, Discovery, Mdns, MdnsEvent, MdnsOptions};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};

/// Hub settings (from flags and environment; see `shoal-hub serve --help`).
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub data_dir: PathBuf,
    /// Where the embedded broker listens (ignored with `broker`).
    pub mqtt_listen: SocketAddr,
    /// External broker; `None` runs the embedded one.
    pub broker: Option<BrokerUrl>,
    pub http_listen: SocketAddr,
    /// URL agents use to fetch blobs; default `http://{http_listen}` (empty when that is a
    /// wildcard address: agents then use the address they reached the hub at).
    pub public_url: Option<String>,
    /// The fleet this hub serves (agents of other fleets ignore it).
    pub fleet: String,
    /// This hub's name on the LAN (its mDNS instance is `{fleet}-{name}`).
    pub name: String,
    /// mDNS interfaces; `None`: mDNS off.
    pub mdns: Option<MdnsOptions>,
    /// How long a device may be offline or silent before it is lost and its replicas move.
    pub device_grace: std::time::Duration,
    /// Plain MQTT and HTTP, no client certificates, no ACL (local development only).
    pub insecure: bool,
    /// Extra names (DNS names or IP addresses) for the hub's server certificate, besides
    /// `shoal-hub`, `localhost`, the loopback addresses, the host name and the listen addresses.
    pub tls_names: Vec<String>,
    /// How long a device certificate is valid (agents renew after two thirds of it).
    pub device_cert_lifetime: std::time::Duration,
    /// Where the hub's state lives: sled in `data_dir` (default), or etcd.
    pub store: crate::store::StoreChoice,
    /// With etcd: the TTL of the lease leadership is held with (a dead leader is replaced
    /// about this long after it died; see [`crate::ha`]).
    pub leader_lease: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Blob(#[from] crate::blobs::BlobError),
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error("cannot create data directory {path:?}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Mdns(#[from] shoal_daemon::mdns::MdnsError),
    #[error("fleet credentials: {0}")]
    Pki(#[from] shoal_pki::PkiError),
    #[error("enrollment records: {0}")]
    Enrollments(#[from] crate::enrollment::EnrollError),
    #[error("external broker {0} is plain MQTT: use mqtts:// (or run the hub with --insecure)")]
    PlainBroker(String),
    #[error("store {0}: {msg}", msg = crate::etcd::PLAINTEXT_REFUSED)]
    PlainEtcd(String),
    #[error(transparent)]
    PublicUrl(#[from] shoal_api::endpoint::PublicUrlError),
    #[error("cannot listen for HTTP on {addr}: {source}")]
    HttpListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}: restore DATA_DIR/pki/secrets.key from the backup it came with (a new key cannot read secrets stored under the old one)")]
    SecretsKey(String),
    #[error("lost the leadership (its etcd lease expired or its key is gone): stopping so that a supervisor starts this hub again, as a standby")]
    LeadershipLost,
}

/// What the main loop reacts to.
#[derive(Debug)]
pub enum Event {
    Bus(BusEvent),
    Http(Request),
    Mdns(MdnsEvent),
    /// Time to look for lost devices.
    Tick,
    /// Time to step rollouts that have new reports.
    RolloutTick,
    /// Time to pass what this replica heard on to the others (see [`crate::fleet::ingest`]).
    RelayTick,
}

const NOT_DURABLE: &str = "the hub could not make the change durable (store flush failed); it retries, check the hub's disk";

/// Bus events handled before one commit (flush, then publish).
const BATCH: usize = 256;

/// How long status reports are gathered before a rollout steps on them.
const ROLLOUT_BATCH_MS: u64 = 50;

/// How long a replica gathers device reports before passing them on (see [`crate::fleet::ingest`]).
const RELAY_BATCH_MS: u64 = 50;

/// Runs the hub until `shutdown` is cancelled.
pub async fn run(config: HubConfig, shutdown: CancellationToken) -> Result<(), HubError> {
    shoal_daemon::private_dir(&config.data_dir).map_err(|source| HubError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let tracker = TaskTracker::new();
    let result = serve(&config, &tracker, shutdown.clone()).await;
    // Whatever happened, stop and await every task we started.
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    result
}

async fn serve(
    config: &HubConfig,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), HubError> {
    if let crate::store::StoreChoice::Etcd(url) = &config.store {
        if url.plaintext() && !config.insecure {
            return Err(HubError::PlainEtcd(url.to_string()));
        }
    }
    let store = config.store.open(&config.data_dir)?;
    // Replicas on etcd share the fleet's keys and elect a leader (see crate::ha).
    let elector = match &config.store {
        crate::store::StoreChoice::Etcd(url) => {
            if config.broker.is_none() {
                warn!("hub state in etcd with the embedded broker: other hub replicas cannot take over this one's devices (give every replica the same --broker)");
            }
            let e = crate::ha::Elector::connect(url, config.leader_lease).await?;
            e.share_keys(&crate::security::pki_dir(&config.data_dir))
                .await?;
            Some(e)
        }
        crate::store::StoreChoice::Sled => None,
    };
    let mut blobs = BlobStore::open(&config.data_dir)?;
    if let crate::store::StoreChoice::Etcd(url) = &config.store {
        blobs = blobs.with_shared(Box::new(crate::etcd::EtcdStore::connect(url)?));
    }
    let blobs = Arc::new(blobs);
    let signer = crate::security::signer(&config.data_dir)?;
    let secrets_key = crate::security::secrets_key(&config.data_dir)?;
    let security = if config.insecure {
        warn!("--insecure: MQTT and HTTP in the clear, no client certificates, no topic ACL; for local development only");
        None
    } else {
        let mut names = config.tls_names.clone();
        names.push(shoal_daemon::host_name());
        for ip in [config.mqtt_listen.ip(), config.http_listen.ip()] {
            if !ip.is_unspecified() {
                names.push(ip.to_string());
            }
        }
        // Replicas share tokens and enrollment records through etcd.
        let files = crate::enrollment::Files::new(&crate::security::pki_dir(&config.data_dir));
        let enrollments: Box<dyn crate::enrollment::Enrollments> = match &config.store {
            crate::store::StoreChoice::Etcd(url) => {
                let etcd = crate::etcd::EtcdStore::connect(url)?;
                // A hub that kept its devices on disk (sled, or an older hub on etcd) brings
                // them along; etcd's own records win.
                let adopted = crate::enrollment::adopt_files(&files, &etcd)?;
                if adopted > 0 {
                    info!(
                        adopted,
                        "copied this hub's enrollment records and unused join tokens into etcd"
                    );
                }
                Box::new(etcd)
            }
            crate::store::StoreChoice::Sled => Box::new(files),
        };
        Some(Arc::new(crate::security::Security::load(
            &config.data_dir,
            &names,
            signer.public_key_b64(),
            config.device_cert_lifetime,
            enrollments,
        )?))
    };

    let http_listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| HubError::HttpListen {
            addr: config.http_listen,
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| HubError::HttpListen {
            addr: config.http_listen,
            source,
        })?;
    let scheme = if security.is_some() { "https" } else { "http" };
    let public_url = match &config.public_url {
        Some(u) => Some(
            shoal_api::endpoint::check_public_url(u, security.is_some())
                .map_err(HubError::PublicUrl)?,
        ),
        None => None,
    };
    let public_url = public_url.unwrap_or_else(|| {
        let a = http_addr;
        if a.ip().is_unspecified() {
            // Empty (with the port alongside): each agent fetches from its `--hub`, or from the
            // address it found the hub at over mDNS (an --insecure one also tries its broker's
            // host: a TLS agent never does, a broker is not the hub).
            info!("--http-listen is a wildcard address: agents fetch modules from their --hub or the hub they find over mDNS (set --public-url to name one address)");
            return String::new();
        }
        format!("{scheme}://{a}")
    });

    // How many connections the hub holds (the open-file limit, raised first).
    let open_files = shoal_daemon::raise_open_files().unwrap_or(1024);
    let gate = crate::gate::Gate::new(open_files);
    info!(open_files, "connection budget set from the open-file limit");

    // What the enrollment book says of revocations, for connections let in before one.
    let (verdicts_tx, verdicts) =
        tokio::sync::watch::channel(Arc::new(crate::access::Verdicts::default()));

    // The broker devices are told about, and how the hub itself connects.
    let (broker, hub_link, auth) = match &config.broker {
        Some(b) if !b.tls && security.is_some() => {
            return Err(HubError::PlainBroker(b.to_string()));
        }
        Some(b) => {
            let auth = match &security {
                Some(sec) => bus::BusAuth::Tls(sec.client.clone()),
                None => bus::BusAuth::None,
            };
            (b.clone(), b.clone(), auth)
        }
        None => {
            let e = crate::broker::start(
                config.mqtt_listen,
                security.clone().map(|sec| (sec, verdicts.clone())),
                gate.clone(),
                tracker,
                shutdown.clone(),
            )
            .await?;
            let front = BrokerUrl {
                host: e.addr.ip().to_string(),
                port: e.addr.port(),
                tls: security.is_some(),
            };
            // The hub connects through the front listener like everyone else (as `shoal-hub`).
            // Not straight to rumqttd: rumqttd leaves Nagle on for the sockets it accepts,
            // and its PUBACK-then-PUBLISH pairs would stall on delayed ACKs (~40 ms per
            // apply, measured); the front listener acknowledges at once.
            let auth = match &security {
                Some(sec) => bus::BusAuth::Tls(sec.client.clone()),
                None => bus::BusAuth::None,
            };
            (front.clone(), front, auth)
        }
    };

    let artifact_port = public_url.is_empty().then_some(http_addr.port());
    // A standby reads the store through a connection of its own; the leader's is fenced.
    let mut standby_core = match &elector {
        Some(_) => {
            let mut c = HubCore::open_with(
                crate::store::ReadOnly(config.store.open(&config.data_dir)?),
                public_url.clone(),
                config.insecure,
            )?;
            c.set_artifact_port(artifact_port);
            Some(c)
        }
        None => None,
    };
    // Every stored secret must open with this key: a lost or replaced key file would
    // otherwise show only as secrets that never reach devices.
    if let Some(c) = &standby_core {
        for s in c.stored_secrets() {
            open_stored(&secrets_key, s).map_err(HubError::SecretsKey)?;
        }
    }
    let metrics = Arc::new(Metrics::default());
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);

    // Deep enough for a fleet's join burst: while it is full the bus task cannot poll the
    // connection, and a broker drops a client that misses its keep-alive.
    let (bus_tx, bus_rx) = mpsc::channel(16_384);
    let replica = format!("{:016x}", rand::random::<u64>());
    // Replicas on one external broker share status ingest; the embedded broker serves one
    // hub, which takes every report itself.
    let ingest = (elector.is_some() && config.broker.is_some()).then(|| Ingest {
        replica: replica.clone(),
        relay: crate::fleet::ingest::Relay::default(),
        enrolled_lately: BTreeMap::new(),
    });
    let bus = bus::connect(
        &hub_link,
        &format!("{}{replica}", shoal_api::acl::HUB_CLIENT_PREFIX),
        auth,
        ingest.is_some(),
        bus_tx,
        tracker,
        shutdown.clone(),
    );

    let (req_tx, req_rx) = mpsc::channel(256);
    let (fleet_changed, fleet_changed_rx) = tokio::sync::watch::channel(0u64);
    let (standby_tx, standby_rx) =
        tokio::sync::watch::channel(elector.as_ref().map(|_| "not yet elected".to_string()));
    let app = http::router(AppState {
        requests: req_tx.clone(),
        blobs: blobs.clone(),
        registry: Arc::new(registry),
        security: security.clone(),
        fleet_changed: fleet_changed_rx,
        shutdown: shutdown.clone(),
        sessions: Default::default(),
        standby: standby_rx,
        refusals: Default::default(),
        verdicts: security.as_ref().map(|_| verdicts.clone()),
    });
    if let Some(sec) = &security {
        tracker.spawn(crate::access::watch(
            sec.clone(),
            verdicts_tx,
            req_tx.clone(),
            shutdown.clone(),
        ));
    }
    tracker.spawn(http::serve(
        http_listener,
        app,
        security.clone().map(|sec| (sec, verdicts)),
        gate,
        tracker.clone(),
        shutdown.clone(),
    ));
    info!(http = %http_addr, %broker, public_url, data_dir = %config.data_dir.display(), "hub serving");

    let (mdns_tx, mdns_rx) = mpsc::channel(256);
    let mdns = match &config.mdns {
        None => None,
        // Serving the fleet does not depend on mDNS: without it, agents need --broker.
        Some(opts) => {
            match advertise(
                config, opts, http_addr, &broker, mdns_tx, tracker, &shutdown,
            )
            .await
            {
                Ok(m) => Some(m),
                Err(e) => {
                    error!(error = %e, "mDNS is off: agents must be given --broker");
                    None
                }
            }
        }
    };

    let mut chans = Channels {
        bus: bus_rx,
        requests: req_rx,
        mdns: mdns_rx,
    };
    let mut parts = Parts {
        bus,
        blobs,
        metrics,
        fleet: config.fleet.clone(),
        grace_ms: u64::try_from(config.device_grace.as_millis()).unwrap_or(u64::MAX),
        signer,
        secrets_key,
        security: security.clone(),
        events: crate::fleet::events::Events::default(),
        fleet_changed,
        logs: crate::logs::LogSessions::default(),
        ingest,
        // Only the embedded broker's guard writes `apply-as` topics; through an external
        // broker (or with no guard, --insecure) anyone allowed to publish there could.
        attributed_applies: config.broker.is_none() && security.is_some(),
    };
    let mut lost = None;
    let mut heard = None;
    if let (Some(elector), Some(core)) = (elector, standby_core.take()) {
        // Stand by (serving reads) until elected.
        let value = if public_url.is_empty() {
            format!("{} http://{http_addr}", config.name)
        } else {
            format!("{} {public_url}", config.name)
        };
        let mut standby = MainLoop::new(
            core,
            parts,
            Some(Standby {
                elector: elector.clone(),
                leader: standby_tx.clone(),
                last_reload: None,
                changes: elector.watch_state(tracker, shutdown.clone()),
                last_read: None,
            }),
        );
        let campaign = elector.campaign(value, tracker, shutdown.clone());
        let won = standby.run(&mut chans, &shutdown, campaign).await;
        let leadership = match won {
            None => {
                stop_mdns(mdns).await;
                return Ok(());
            }
            Some(r) => r?,
        };
        store.fence(leadership.fence.clone());
        lost = Some(leadership.lost);
        let _ = standby_tx.send(None);
        let (core, p) = standby.into_parts();
        parts = p;
        parts.metrics.elections_won.inc();
        heard = Some(core);
    }
    let mut core = HubCore::open_with(store, public_url.clone(), parts.security.is_none())?;
    core.set_artifact_port(artifact_port);
    for s in core.stored_secrets() {
        open_stored(&parts.secrets_key, s).map_err(HubError::SecretsKey)?;
    }
    if let Some(mut standby) = heard {
        core.adopt_live(&mut standby);
    }
    // Revoked devices are known before anything is placed or sealed (the watch tells the
    // loop again later, but a leader must not place on them meanwhile).
    let mut revoked_states = Vec::new();
    if let Some(sec) = parts.security.clone() {
        let read = tokio::task::spawn_blocking(move || {
            crate::access::Verdicts::read(&*sec.enrollments).map(|v| v.revoked)
        })
        .await;
        match read {
            Ok(Ok(revoked)) => {
                revoked_states = core.set_revoked(revoked)?.unwrap_or_default();
            }
            Ok(Err(e)) => warn!(error = %e, "cannot read revoked devices at start; the watch will"),
            Err(e) => warn!(error = %e, "cannot read revoked devices at start; the watch will"),
        }
    }
    let moved = core.relocate_artifacts()?;
    parts.metrics.leader.set(1);
    let mut main = MainLoop::new(core, parts, None);
    main.lost = lost.clone();
    // Grants of enrollments the last leader did not apply (it died first, or a relay was
    // lost): every device's, from the book, each applied once.
    main.queue(revoked_states);
    let granted = main.catch_up_grants().await;
    main.queue(granted);
    let promoted = lost.is_some();
    if promoted {
        // Devices that enrolled through a standby lately may have new keys the old leader
        // did not seal to yet.
        let lately = main
            .ingest
            .as_mut()
            .map(|i| std::mem::take(&mut i.enrolled_lately))
            .unwrap_or_default();
        for device in lately.into_keys() {
            if let Err(e) = main.core.reissue(&device) {
                warn!(%device, error = %e, "cannot re-seal the state of a device that enrolled lately");
            }
        }
        // Leading now: the broker's retained desired states may be older than the store's.
        let mut all = main.core.all_desired();
        all.extend(moved);
        main.publish_desired(all).await;
    } else {
        main.queue(moved);
    }
    let until = async {
        match &lost {
            Some(l) => l.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let ended = main.run(&mut chans, &shutdown, until).await;
    stop_mdns(mdns).await;
    if ended.is_some() {
        error!("lost the leadership; stopping");
        return Err(HubError::LeadershipLost);
    }
    info!("hub stopped");
    Ok(())
}

async fn stop_mdns(mdns: Option<Mdns>) {
    if let Some(m) = mdns {
        m.stop().await; // goodbye packets: agents learn at once that this hub left
    }
}

/// The values of a stored secret, decrypted with the hub's secrets key.
fn open_stored(key: &shoal_pki::secret::SecretsKey, s: &StoredSecret) -> Result<Vec<u8>, String> {
    let blob = shoal_api::secret::b64::decode(&s.encrypted).ok_or_else(|| {
        format!(
            "the stored form of secret {:?} is not base64",
            s.name.as_str()
        )
    })?;
    key.decrypt(s.name.as_str(), &s.version, &blob)
        .map_err(|e| e.to_string())
}

/// Advertises the hub as `_shoal-hub._tcp.local.` and browses for the fleet's agents.
async fn advertise(
    config: &HubConfig,
    opts: &MdnsOptions,
    http_addr: SocketAddr,
    broker: &BrokerUrl,
    tx: mpsc::Sender<MdnsEvent>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Mdns, HubError> {
    let mqtt = advertised_mqtt(config.broker.as_ref(), broker);
    // A hub listening on loopback only (the default) cannot serve the LAN: advertising it
    // there would send every agent to an address that refuses it.
    let unreachable = (config.broker.is_none() && is_loopback_host(&broker.host))
        || (http_addr.ip().is_loopback() && config.public_url.is_none());
    let mut opts = opts.clone();
    if unreachable && opts.interfaces.is_empty() {
        info!(http = %http_addr, mqtt = %broker, "the hub listens on loopback only, so it advertises on loopback only (agents on this machine: --mdns-loopback); to serve the LAN, listen on 0.0.0.0 or a LAN address");
        opts.interfaces = vec!["lo".to_string()];
    } else if unreachable && opts.interfaces.iter().any(|i| i != "lo") {
        warn!(http = %http_addr, mqtt = %broker, interfaces = ?opts.interfaces, "advertising on the LAN, but the hub listens on loopback only: devices cannot reach it (listen on 0.0.0.0 or a LAN address)");
    }
    let pki = crate::security::pki_dir(&config.data_dir);
    let ad = HubAd {
        protocol: shoal_api::PROTOCOL_VERSION,
        fleet: config.fleet.clone(),
        http_port: http_addr.port(),
        mqtt: vec![mqtt],
        // The fleet CA (loaded from here at start): agents trusting another CA ignore us.
        ca: if config.insecure {
            None
        } else {
            Some(shoal_pki::ca::hash_of(&pki)?)
        },
    };
    let label: String = config
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let mdns = Mdns::start(
        &opts,
        &discovery::dns_label(&format!("shoal-hub-{label}")),
        tracker.clone(),
        shutdown.clone(),
    )?;
    let advertised = mdns
        .advertise(&Advert {
            ty: discovery::HUB_SERVICE.to_string(),
            instance: discovery::dns_label(&format!("{}-{}", config.fleet, config.name)),
            port: http_addr.port(),
            txt: ad.to_txt(),
        })
        .and_then(|fullname| mdns.browse(discovery::AGENT_SERVICE, tx).map(|()| fullname));
    match advertised {
        Ok(fullname) => {
            info!(%fullname, fleet = %config.fleet, ?opts, "advertising over mdns");
            Ok(mdns)
        }
        Err(e) => {
            mdns.stop().await;
            Err(e.into())
        }
    }
}

/// How agents reach the broker: the embedded one (or an external one on this host) at a port
/// of the addresses they found the hub at; any other external broker by its own address.
fn advertised_mqtt(external: Option<&BrokerUrl>, embedded: &BrokerUrl) -> MqttEndpoint {
    match external {
        Some(b) if is_local_host(&b.host) => MqttEndpoint::Local(b.port),
        Some(b) => MqttEndpoint::Remote(b.clone()),
        None => MqttEndpoint::Local(embedded.port),
    }
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Loopback, or the wildcard address (a broker bound to it is on this host too).
fn is_local_host(host: &str) -> bool {
    is_loopback_host(host)
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified())
}

/// What the main loop receives from.
struct Channels {
    bus: mpsc::Receiver<BusEvent>,
    requests: mpsc::Receiver<Request>,
    mdns: mpsc::Receiver<MdnsEvent>,
}

/// What a standby main loop hands to the leader's when it is elected.
struct Parts<B: Bus> {
    bus: B,
    blobs: Arc<BlobStore>,
    metrics: Arc<Metrics>,
    fleet: String,
    grace_ms: u64,
    signer: shoal_pki::sign::HubSigner,
    secrets_key: shoal_pki::secret::SecretsKey,
    security: Option<Arc<crate::security::Security>>,
    events: crate::fleet::events::Events,
    fleet_changed: tokio::sync::watch::Sender<u64>,
    logs: crate::logs::LogSessions,
    ingest: Option<Ingest>,
    /// Whether an `apply-as/{operator}` topic says who applied (the embedded broker's
    /// guard writes it) or is only a claim.
    attributed_applies: bool,
}

/// This replica's share of status ingest (see [`crate::fleet::ingest`]).
struct Ingest {
    /// Names this replica's batches (its MQTT client id's suffix).
    replica: String,
    relay: crate::fleet::ingest::Relay,
    /// Devices that enrolled through a standby lately (this one, or another by its
    /// batches), with when this replica heard: should it be elected before the leader
    /// re-sealed their states, it does so itself.
    enrolled_lately: BTreeMap<DeviceId, u64>,
}

/// How long a standby remembers that a device enrolled (well beyond a failover).
const ENROLLED_MEMORY_MS: u64 = 60_000;

impl Ingest {
    fn heard_enrolled(&mut self, device: DeviceId, now_ms: u64) {
        self.enrolled_lately
            .retain(|_, at| now_ms.saturating_sub(*at) < ENROLLED_MEMORY_MS);
        self.enrolled_lately.insert(device, now_ms);
    }
}

/// A hub standing by for the leadership (see [`crate::ha`]).
struct Standby {
    elector: crate::ha::Elector,
    /// The leader as it announced itself (for the `http` module's refusals).
    leader: tokio::sync::watch::Sender<Option<String>>,
    last_reload: Option<std::time::Instant>,
    /// Moves when the store changed ([`crate::ha::Elector::watch_state`]).
    changes: tokio::sync::watch::Receiver<u64>,
    /// When the store was last read.
    last_read: Option<std::time::Instant>,
}

/// How often, at most, a standby reads the store again (a burst of the leader's writes is
/// read once), and asks who leads.
const STANDBY_RELOAD: std::time::Duration = std::time::Duration::from_millis(500);
/// How often a standby reads the store whatever its watch says (a watch stream can stall
/// silently on a broken network path).
const STANDBY_FULL_READ: std::time::Duration = std::time::Duration::from_secs(30);

struct MainLoop<S: Store, B: Bus> {
    core: HubCore<S>,
    /// `Some` while standing by: reads are answered, devices are listened to, nothing is
    /// written or published.
    standby: Option<Standby>,
    /// The leader's: cancelled when its leadership is lost (by the lease keeper, or here
    /// when the store refuses a write as fenced).
    lost: Option<CancellationToken>,
    bus: B,
    blobs: Arc<BlobStore>,
    metrics: Arc<Metrics>,
    fleet: String,
    grace_ms: u64,
    /// Desired states to publish at the next commit.
    outbox: Vec<DesiredState>,
    /// Status reports arrived during a rollout since its last step.
    rollout_due: bool,
    /// Signs every desired state before it is published.
    signer: shoal_pki::sign::HubSigner,
    /// Encrypts secrets at rest.
    secrets_key: shoal_pki::secret::SecretsKey,
    /// Enrollment records: the device keys secrets are sealed to (`None`: `--insecure`).
    security: Option<Arc<crate::security::Security>>,
    /// Recent fleet events (see [`crate::fleet::events`]).
    events: crate::fleet::events::Events,
    /// Bumped when the fleet changed (the dashboard streams wait on it).
    fleet_changed: tokio::sync::watch::Sender<u64>,
    /// Something happened since the last events snapshot.
    changed: bool,
    last_snapshot: Option<std::time::Instant>,
    /// Open `shoal logs` sessions.
    logs: crate::logs::LogSessions,
    /// `Some` for replicas sharing status ingest.
    ingest: Option<Ingest>,
    /// Whether an `apply-as/{operator}` topic says who applied (the embedded broker's
    /// guard writes it) or is only a claim.
    attributed_applies: bool,
}

impl<S: Store, B: Bus> MainLoop<S, B> {
    fn new(core: HubCore<S>, p: Parts<B>, standby: Option<Standby>) -> Self {
        MainLoop {
            core,
            standby,
            lost: None,
            bus: p.bus,
            blobs: p.blobs,
            metrics: p.metrics,
            fleet: p.fleet,
            grace_ms: p.grace_ms,
            rollout_due: false,
            outbox: Vec::new(),
            signer: p.signer,
            secrets_key: p.secrets_key,
            security: p.security,
            events: p.events,
            fleet_changed: p.fleet_changed,
            changed: true,
            last_snapshot: None,
            logs: p.logs,
            ingest: p.ingest,
            attributed_applies: p.attributed_applies,
        }
    }

    fn into_parts(self) -> (HubCore<S>, Parts<B>) {
        let p = Parts {
            bus: self.bus,
            blobs: self.blobs,
            metrics: self.metrics,
            fleet: self.fleet,
            grace_ms: self.grace_ms,
            signer: self.signer,
            secrets_key: self.secrets_key,
            security: self.security,
            events: self.events,
            fleet_changed: self.fleet_changed,
            logs: self.logs,
            ingest: self.ingest,
            attributed_applies: self.attributed_applies,
        };
        (self.core, p)
    }

    /// Handles events until `shutdown` (`None`) or until `until` is ready (its output).
    async fn run<R>(
        &mut self,
        chans: &mut Channels,
        shutdown: &CancellationToken,
        until: impl std::future::Future<Output = R>,
    ) -> Option<R> {
        tokio::pin!(until);
        // Often enough that a lost device is noticed within a second of its grace period.
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(
            (self.grace_ms / 4).clamp(50, 1000),
        ));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rollout_tick =
            tokio::time::interval(std::time::Duration::from_millis(ROLLOUT_BATCH_MS));
        rollout_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut relay_tick =
            tokio::time::interval(std::time::Duration::from_millis(RELAY_BATCH_MS));
        relay_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let relay_due = self.ingest.as_ref().is_some_and(|i| !i.relay.is_empty());
            let event = tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = &mut until => return Some(r),
                Some(e) = chans.bus.recv() => Event::Bus(e),
                Some(r) = chans.requests.recv() => Event::Http(r),
                Some(m) = chans.mdns.recv() => Event::Mdns(m),
                _ = tick.tick() => Event::Tick,
                _ = rollout_tick.tick(), if self.rollout_due => Event::RolloutTick,
                _ = relay_tick.tick(), if relay_due => Event::RelayTick,
            };
            self.handle(event).await;
            // Group commit: handle whatever else the bus has ready (bounded), then flush
            // once and publish everything those events changed.
            for _ in 0..BATCH {
                match chans.bus.try_recv() {
                    Ok(e) => self.handle(Event::Bus(e)).await,
                    Err(_) => break,
                }
            }
            self.commit().await;
        }
    }

    /// Flushes the store, then publishes the queued desired states (the newest per device).
    /// `false` if the store could not be flushed: nothing is published then (the queue is
    /// kept for the next commit), and whoever asked must not be told it worked.
    async fn commit(&mut self) -> bool {
        if self.standby.is_some() {
            self.outbox.clear(); // the leader publishes
            return true;
        }
        // Always flush: an accepted apply is acknowledged right after, even when it changes
        // no device (sled's flush is cheap when nothing is dirty).
        if let Err(e) = self.core.flush() {
            // Not durable: do not tell devices (they would act on state a crash could lose).
            warn!(error = %e, "cannot flush the hub store; desired states held back");
            if let (crate::store::StoreError::Fenced { .. }, Some(lost)) = (&e, &self.lost) {
                lost.cancel();
            }
            return false;
        }
        let mut newest: std::collections::BTreeMap<DeviceId, DesiredState> =
            std::collections::BTreeMap::new();
        for d in self.outbox.drain(..) {
            match newest.get(&d.device_id) {
                Some(have) if have.generation >= d.generation => {}
                _ => {
                    newest.insert(d.device_id.clone(), d);
                }
            }
        }
        self.send_desired(newest.into_values().collect()).await;
        true
    }

    /// Queues desired states for the next commit (bus events, handled in batches).
    fn queue(&mut self, states: Vec<DesiredState>) {
        self.outbox.extend(states);
    }

    /// Queues desired states and commits at once (requests answered right after);
    /// `false`: not durable, see [`MainLoop::commit`].
    async fn publish_desired(&mut self, states: Vec<DesiredState>) -> bool {
        self.queue(states);
        self.commit().await
    }

    async fn handle(&mut self, event: Event) {
        match &event {
            Event::Tick | Event::RolloutTick | Event::RelayTick => {}
            Event::Http(r) if r.reads_only() => {}
            // Log lines change nothing in the fleet.
            Event::Bus(BusEvent::Message { topic, .. })
                if matches!(topics::classify(topic), Some(Inbound::Logs(..))) => {}
            _ => self.changed = true,
        }
        if self.standby.is_some() {
            return self.stand_by(event).await;
        }
        match event {
            Event::Bus(BusEvent::Connected) => {
                // The broker may have lost retained desired states (e.g. the embedded broker
                // after a hub restart): publish them all again. Agents ignore generations they
                // already have.
                let all = self.core.all_desired();
                self.publish_desired(all).await;
            }
            Event::Bus(BusEvent::Message {
                topic,
                payload,
                response_topic,
                correlation,
            }) => {
                self.on_message(&topic, &payload, response_topic, correlation)
                    .await
            }
            Event::Http(r) => self.on_request(r).await,
            Event::RelayTick => self.relay().await,
            Event::RolloutTick => {
                self.rollout_due = false;
                self.advance_rollouts().await;
            }
            Event::Tick => {
                match self.core.check_lost(now_ms(), self.grace_ms) {
                    Ok(publish) => {
                        self.publish_desired(publish).await;
                    }
                    Err(e) => warn!(error = %e, "cannot persist rescheduling of lost devices"),
                }
                // Readiness periods and deadlines pass with time, not only with reports.
                if self.core.rolling() || self.core.draining() {
                    self.advance_rollouts().await;
                }
                self.record_events(false);
                let due = self.logs.tick(now_ms());
                self.publish_log_requests(due).await;
            }
            Event::Mdns(MdnsEvent::Resolved(r)) => match AgentAd::from_txt(&r.fullname, &r.txt) {
                Ok(ad) if ad.fleet == self.fleet => {
                    self.core.mdns_seen(r.fullname, ad.device, r.addrs)
                }
                Ok(_) => {} // another fleet's device
                Err(e) => warn!(error = %e, "agent advertisement ignored"),
            },
            Event::Mdns(MdnsEvent::Removed { fullname, .. }) => self.core.mdns_gone(&fullname),
        }
    }

    /// A standby's share of `handle`: it listens to devices and answers reads, and
    /// follows the leader's writes in the store; it decides nothing (the `http` module
    /// refuses changes before they get here).
    async fn stand_by(&mut self, event: Event) {
        match event {
            Event::Bus(BusEvent::Message {
                topic,
                payload,
                response_topic,
                correlation,
            }) => {
                // The leader answers manifests sent over MQTT.
                if !matches!(topics::classify(&topic), Some(Inbound::Apply { .. }) | None) {
                    self.on_message(&topic, &payload, response_topic, correlation)
                        .await
                }
            }
            Event::Bus(BusEvent::Connected) | Event::RolloutTick => {}
            // Standbys take their share of reports too.
            Event::RelayTick => self.relay().await,
            Event::Http(r) if r.reads_only() => self.on_request(r).await,
            // A device enrolled here: the leader applies its token's grant (from the book)
            // and seals its secrets to its new key.
            Event::Http(Request::Enrolled { device }) => match self.ingest.as_mut() {
                Some(i) => {
                    i.heard_enrolled(device.clone(), now_ms());
                    i.relay.enrolled(device)
                }
                None => {
                    warn!(%device, "a device enrolled through a standby without shared ingest: the leader applies its token's grant when it starts, and seals its secrets to its new key when its desired state changes")
                }
            },
            Event::Http(_) => {} // refused by the http module
            Event::Mdns(_) => {}
            Event::Tick => {
                let now = std::time::Instant::now();
                let Some(sb) = self.standby.as_mut() else {
                    return;
                };
                if sb.last_reload.is_none_or(|t| now - t >= STANDBY_RELOAD) {
                    sb.last_reload = Some(now);
                    let leader = sb.elector.leader().await;
                    sb.leader
                        .send_replace(Some(leader.unwrap_or_else(|| "none yet".into())));
                    // Marked seen before reading: a write landing during the read moves
                    // the count again and is read next time. (Without its watch, at
                    // shutdown, it reads every time.)
                    let due = sb.last_read.is_none_or(|t| now - t >= STANDBY_FULL_READ);
                    if sb.changes.has_changed().unwrap_or(true) || due {
                        sb.changes.mark_unchanged();
                        sb.last_read = Some(now);
                        self.metrics.standby_reloads.inc();
                        if let Err(e) = self.core.reload() {
                            // Read again at the next tick.
                            sb.changes.mark_changed();
                            warn!(error = %e, "standby cannot read the hub store");
                        }
                    }
                }
                self.record_events(false);
                let due = self.logs.tick(now_ms());
                self.publish_log_requests(due).await;
            }
        }
    }

    /// Passes what this replica heard from devices on to the other replicas.
    async fn relay(&mut self) {
        let Some(ingest) = self.ingest.as_mut() else {
            return;
        };
        let topic = topics::hub_ingest(&ingest.replica);
        for batch in ingest.relay.take() {
            let msg = Outgoing {
                topic: topic.clone(),
                payload: serde_json::to_vec(&batch).unwrap_or_default(),
                retain: false,
                correlation: None,
            };
            if let Err(e) = self.bus.publish(msg).await {
                warn!(error = %e, "cannot pass device reports on to the other hub replicas");
            }
        }
    }

    async fn on_message(
        &mut self,
        topic: &str,
        payload: &[u8],
        response_topic: Option<String>,
        correlation: Option<bytes::Bytes>,
    ) {
        let Some(kind) = topics::classify(topic) else {
            return;
        };
        let label = match &kind {
            Inbound::Apply { .. } => "apply",
            Inbound::Hello(_) => "hello",
            Inbound::Presence(_) => "presence",
            Inbound::Status(_) => "status",
            Inbound::Logs(..) => "logs",
            Inbound::Ingest(_) => "ingest",
        };
        self.metrics
            .mqtt_received
            .get_or_create(&crate::metrics::KindLabel { kind: label.into() })
            .inc();
        match kind {
            Inbound::Apply { req, by } => {
                let text = String::from_utf8_lossy(payload);
                let span = info_span!(
                    "apply",
                    source = "mqtt",
                    req = req.as_deref().unwrap_or(""),
                    operator = by.as_deref().unwrap_or("")
                );
                let result = self.apply(&text, req.clone(), true).instrument(span).await;
                // Who sent it: the embedded broker names the operator; through an external
                // broker the hub cannot know (its ACL decides who may apply).
                let named = by
                    .as_deref()
                    .filter(|_| self.attributed_applies)
                    .and_then(|b| shoal_api::ids::OperatorName::try_from(b).ok());
                let who = match named {
                    Some(name) => format!("operator {name}"),
                    None => "unknown (an MQTT apply the broker did not attribute)".to_string(),
                };
                let change = crate::fleet::audit::Change {
                    who,
                    from: "mqtt".into(),
                    action: format!("mqtt apply {}", req.as_deref().unwrap_or(""))
                        .trim_end()
                        .to_string(),
                    outcome: crate::fleet::audit::apply_outcome(&result),
                    accepted: result.accepted,
                };
                if let Err(e) = self.record_audit(change) {
                    warn!(error = %e, "cannot record an apply in the audit log");
                }
                let body = serde_json::to_vec(&result).unwrap_or_default();
                let mut targets = Vec::new();
                if let Some(r) = &req {
                    targets.push(topics::results(r));
                }
                // The hub may publish anywhere; an operator must not steer that into Shoal's
                // own topics (e.g. another device's), so a response topic under shoal/v1/ is
                // honoured only among the results.
                match response_topic.filter(|t| !targets.contains(t)) {
                    Some(rt) if topics::response_topic_allowed(&rt) => targets.push(rt),
                    Some(rt) => {
                        warn!(response_topic = %rt, "response topic refused: inside shoal/v1/ only shoal/v1/results/… may be used")
                    }
                    None => {}
                }
                for topic in targets {
                    let msg = Outgoing {
                        topic,
                        payload: body.clone(),
                        retain: false,
                        correlation: correlation.clone(),
                    };
                    if let Err(e) = self.bus.publish(msg).await {
                        warn!(error = %e, "cannot publish apply result");
                    }
                }
            }
            Inbound::Hello(raw) => {
                let Some(hello) = decode::<Hello>(topic, payload, &raw) else {
                    return;
                };
                match self.core.hello(hello) {
                    Ok(publish) => self.queue(publish),
                    Err(e) => warn!(device = %raw, error = %e, "cannot record hello"),
                }
            }
            Inbound::Presence(raw) => {
                let Ok(id) = DeviceId::try_from(raw.as_str()) else {
                    warn!(topic, "presence for an invalid device id ignored");
                    return;
                };
                let online = match payload {
                    b"online" => true,
                    b"offline" | b"" => false,
                    other => {
                        warn!(device = %id, payload = %String::from_utf8_lossy(other), "unknown presence payload ignored");
                        return;
                    }
                };
                match self.core.presence(&id, online) {
                    Ok(publish) => self.queue(publish),
                    Err(e) => warn!(device = %id, error = %e, "cannot record presence"),
                }
            }
            Inbound::Status(raw) => {
                if payload.is_empty() {
                    return; // a cleared retained status
                }
                if let Some(status) = decode::<DeviceStatus>(topic, payload, &raw) {
                    match self.ingest.as_mut() {
                        None => self.core.status(status),
                        Some(i) => match self.core.accept_status(status) {
                            crate::core::Accepted::New(s) => i.relay.changed(s),
                            crate::core::Accepted::Same(h)
                            | crate::core::Accepted::Stale { heard: h, .. } => i.relay.heard(h),
                        },
                    }
                    // Stepped in batches (see RolloutTick): one step per report would
                    // republish desired states once per freed slot.
                    self.rollout_due |= self.core.rolling() || self.core.draining();
                }
            }
            Inbound::Ingest(replica) => {
                let Some(i) = self.ingest.as_mut() else {
                    return;
                };
                if replica == i.replica {
                    return; // our own, back from the broker
                }
                let mut batch = match serde_json::from_slice::<shoal_api::messages::IngestBatch>(
                    payload,
                ) {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(%replica, error = %e, "undecodable ingest batch from a hub replica ignored");
                        return;
                    }
                };
                let mut enrolled = std::mem::take(&mut batch.enrolled);
                // Enrollments are rare: a batch naming more is not from a hub that took them.
                if enrolled.len() > crate::fleet::ingest::ENROLLED_PER_BATCH {
                    warn!(%replica, enrolled = enrolled.len(), "ingest batch names too many enrolled devices: ignored them");
                    enrolled.clear();
                }
                for again in self.core.ingest_batch(batch) {
                    i.relay.changed(again);
                }
                self.rollout_due |= self.core.rolling() || self.core.draining();
                if self.standby.is_some() {
                    for device in enrolled {
                        i.heard_enrolled(device, now_ms());
                    }
                } else {
                    for device in enrolled {
                        // Enrolled through another replica: its grant from the book (never
                        // from the message), its state sealed for its new key.
                        let grant = self.grant_of(&device).await;
                        let done = self.core.enrolled(&device, grant).map(Some);
                        let _ = self.published(done).await;
                    }
                }
            }
            Inbound::Logs(raw, _req) => {
                if let Some(chunk) = decode::<LogChunk>(topic, payload, &raw) {
                    let device = chunk.device_id.clone();
                    self.logs.deliver(&device, chunk);
                }
            }
        }
    }

    /// `read` on the enrollment book, off the loop's thread; `None` for an `--insecure` hub
    /// or when it fails (logged as `what`: the fleet then keeps the labels it has, fewer
    /// rights, never more).
    async fn read_book<T: Send + 'static>(
        &self,
        what: &'static str,
        read: impl FnOnce(&dyn crate::enrollment::Enrollments) -> Result<T, crate::enrollment::EnrollError>
            + Send
            + 'static,
    ) -> Option<T> {
        let sec = self.security.clone()?;
        let r = tokio::task::spawn_blocking(move || read(&*sec.enrollments)).await;
        match r
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(error = %e, "cannot read {what} from the enrollment book");
                None
            }
        }
    }

    /// What the join token `device` last enrolled with granted it.
    async fn grant_of(&self, device: &DeviceId) -> Option<shoal_api::labels::Grant> {
        let d = device.clone();
        self.read_book("a device's grant", move |b| b.grant(&d))
            .await
            .flatten()
    }

    /// Applies every grant of the enrollment book this store has not applied yet.
    async fn catch_up_grants(&mut self) -> Vec<DesiredState> {
        let Some(grants) = self.read_book("the grants", |b| b.grants()).await else {
            return Vec::new();
        };
        let grants = grants.into_iter().map(|(d, g)| (d, Some(g))).collect();
        match self.core.apply_grants(grants) {
            Ok(out) => out,
            Err(e) => {
                warn!(error = %e, "cannot store the join tokens' grants");
                Vec::new()
            }
        }
    }

    /// Publishes what a delete or device action changed: `Ok(false)` when its target does
    /// not exist, `Err` when it could not be stored or made durable.
    async fn published(
        &mut self,
        r: Result<Option<Vec<DesiredState>>, crate::store::StoreError>,
    ) -> Result<bool, String> {
        match r {
            Ok(Some(publish)) => match self.publish_desired(publish).await {
                true => Ok(true),
                false => Err(NOT_DURABLE.to_string()),
            },
            Ok(None) => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Publishes what an operator command changed; `Err((server fault, message))`.
    async fn command(
        &mut self,
        r: Result<Result<Vec<DesiredState>, String>, crate::store::StoreError>,
    ) -> Result<(), (bool, String)> {
        match r {
            Ok(Ok(publish)) => {
                if self.publish_desired(publish).await {
                    Ok(())
                } else {
                    Err((true, NOT_DURABLE.to_string()))
                }
            }
            Ok(Err(why)) => Err((false, why)),
            Err(e) => Err((true, e.to_string())),
        }
    }

    /// Steps rollouts and drains on what devices reported.
    async fn advance_rollouts(&mut self) {
        match self.core.advance_rollouts(now_ms()) {
            Ok(publish) => {
                self.publish_desired(publish).await;
            }
            Err(e) => warn!(error = %e, "cannot persist rollout progress"),
        }
        if self.core.draining() {
            match self.core.advance_drains() {
                Ok(publish) => {
                    self.publish_desired(publish).await;
                }
                Err(e) => warn!(error = %e, "cannot persist drain progress"),
            }
        }
    }

    /// Signs each log request for its device (agents take only what the hub signed) and
    /// publishes it.
    async fn publish_log_requests(
        &mut self,
        out: Vec<(DeviceId, shoal_api::messages::LogRequest)>,
    ) {
        let now = now_ms();
        for (device, mut req) in out {
            self.signer.sign_log_request(&mut req, &device, now);
            if let Err(e) = self.bus.publish(crate::logs::message(&device, &req)).await {
                warn!(%device, error = %e, "cannot publish a log request");
            }
        }
    }

    /// Records `change` in the audit log, durably, and returns its number.
    fn record_audit(
        &mut self,
        change: crate::fleet::audit::Change,
    ) -> Result<u64, crate::store::StoreError> {
        let e = self.core.record_audit(change, now_ms())?;
        self.core.flush()?;
        Ok(e.seq)
    }

    async fn on_request(&mut self, r: Request) {
        match r {
            Request::Revoked { devices } => {
                let r = self.core.set_revoked(devices);
                if let Err(e) = self.published(r).await {
                    warn!(error = %e, "cannot move replicas off revoked devices");
                }
            }
            Request::Audit { change, reply } => {
                let _ = reply.send(self.record_audit(change).map_err(|e| e.to_string()));
            }
            Request::AuditLog { after, reply } => {
                let _ = reply.send(self.core.audit_since(after, crate::fleet::audit::IN_MEMORY));
            }
            Request::Apply { text, reply } => {
                let result = self
                    .apply(&text.0, None, false)
                    .instrument(info_span!("apply", source = "http"))
                    .await;
                let _ = reply.send(result);
            }
            Request::Delete { name, reply } => {
                let done = self.core.delete(&name);
                let r = self.published(done).await;
                let _ = reply.send(r);
            }
            Request::Secrets { reply } => {
                let _ = reply.send(self.core.secret_views());
            }
            Request::DeleteSecret { name, reply } => {
                let r = match self.core.delete_secret(&name) {
                    Ok(Ok(())) => match self.core.flush() {
                        Ok(()) => Ok(()),
                        Err(e) => Err((500, e.to_string())),
                    },
                    Ok(Err(SecretRefusal::NotFound)) => {
                        Err((404, format!("secret {:?} not found", name.as_str())))
                    }
                    Ok(Err(SecretRefusal::InUse(users))) => Err((
                        409,
                        format!(
                            "secret {:?} is used by workload(s) {}: change or delete them first",
                            name.as_str(),
                            users.join(", ")
                        ),
                    )),
                    Err(e) => Err((500, e.to_string())),
                };
                let _ = reply.send(r);
            }
            Request::Enrolled { device } => {
                // Its token's grant, and (a device that enrolled again has a new key) its
                // state sealed anew.
                let grant = self.grant_of(&device).await;
                let r = self.core.enrolled(&device, grant).map(Some);
                if let Err(e) = self.published(r).await {
                    warn!(%device, error = %e, "cannot store what a device's enrollment granted");
                }
            }
            Request::Label { id, change, reply } => {
                let r = match self.core.label(&id, &change) {
                    Ok(Ok(publish)) => match self.publish_desired(publish).await {
                        true => Ok(self.core.labels_of_device(&id).unwrap_or_default()),
                        false => Err(LabelFailure::Store(NOT_DURABLE.to_string())),
                    },
                    Ok(Err(refused)) => Err(LabelFailure::Refused(refused)),
                    Err(e) => Err(LabelFailure::Store(e.to_string())),
                };
                let _ = reply.send(r);
            }
            Request::Logs {
                workload,
                device,
                tail,
                since_secs,
                follow,
                reply,
            } => {
                let ask = self.log_targets(&workload, device.as_ref());
                let opened = match ask {
                    Ok((devices, unreachable, replicas)) => {
                        let (events, out) = self.logs.open(
                            crate::logs::LogAsk {
                                workload,
                                devices: devices.clone(),
                                tail,
                                since_secs,
                                follow,
                            },
                            now_ms(),
                        );
                        self.publish_log_requests(out).await;
                        Ok(crate::http::LogStream {
                            asked: devices,
                            unreachable,
                            replicas,
                            events,
                        })
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(opened);
            }
            Request::RefreshMetrics { reply } => {
                self.update_metrics();
                let _ = reply.send(());
            }
            Request::Fleet { after, reply } => {
                // One set of views serves both the event diff and the reply.
                let devices = self.core.device_views();
                let workloads = self.core.workload_views();
                self.observe(&devices, &workloads);
                let _ = reply.send(shoal_api::views::FleetView {
                    devices,
                    workloads,
                    events: self.events.since(after, None),
                });
            }
            Request::Events {
                after,
                object,
                reply,
            } => {
                // Up to date with what the requester may just have done.
                self.record_events(true);
                let _ = reply.send(self.events.since(after, object.as_deref()));
            }
            Request::Devices { reply } => {
                let _ = reply.send(self.core.device_views());
            }
            Request::MayFetch {
                device,
                digest,
                reply,
            } => {
                let _ = reply.send(self.core.may_fetch(&device, &digest));
            }
            Request::Workloads { reply } => {
                let _ = reply.send(self.core.workload_views());
            }
            Request::Workload { name, reply } => {
                let _ = reply.send(self.core.workload_view(&name));
            }
            Request::Rollout {
                name,
                action,
                reply,
            } => {
                let done = self.core.rollout_action(&name, action);
                let r = self.command(done).await;
                let _ = reply.send(r);
            }
            Request::Scale {
                name,
                replicas,
                reply,
            } => {
                let done = self.core.scale(&name, replicas);
                let r = self.command(done).await;
                let _ = reply.send(r);
            }
            Request::Device { id, action, reply } => {
                let r = match action {
                    DeviceAction::Cordon => self.core.cordon(&id, true),
                    DeviceAction::Uncordon => self.core.cordon(&id, false),
                    DeviceAction::Drain => self.core.drain(&id),
                };
                let r = self.published(r).await;
                let _ = reply.send(r);
            }
        }
    }

    /// Validates a manifest completely (schema, then modules against the blob store) and
    /// applies it only if everything is right: a rejected manifest changes nothing.
    async fn apply(&mut self, text: &str, req: Option<String>, over_mqtt: bool) -> ApplyResult {
        let reject = |errors: Vec<ManifestError>| ApplyResult {
            protocol: shoal_api::PROTOCOL_VERSION,
            request_id: req.clone(),
            accepted: false,
            workloads: Default::default(),
            secrets: Default::default(),
            errors,
        };
        let result = match self.try_apply(text, over_mqtt).await {
            Ok((workloads, secrets)) => ApplyResult {
                protocol: shoal_api::PROTOCOL_VERSION,
                request_id: req.clone(),
                accepted: true,
                workloads,
                secrets,
                errors: Vec::new(),
            },
            Err(errors) => reject(errors),
        };
        if result.accepted {
            info!(workloads = ?result.workloads, secrets = ?result.secrets, "manifest accepted");
            self.metrics
                .applies
                .get_or_create(&ResultLabel {
                    result: "accepted".into(),
                })
                .inc();
        } else {
            let reasons: Vec<String> = result.errors.iter().map(ToString::to_string).collect();
            info!(?reasons, "manifest rejected");
            self.metrics
                .applies
                .get_or_create(&ResultLabel {
                    result: "rejected".into(),
                })
                .inc();
        }
        result
    }

    /// Checks a manifest completely, then stores and publishes it; every error otherwise.
    async fn try_apply(
        &mut self,
        text: &str,
        over_mqtt: bool,
    ) -> Result<(ApplyOutcome, ApplyOutcome), Vec<ManifestError>> {
        let stream = parse_stream(text)?;
        let positions: Vec<usize> = stream.workloads.iter().map(|(n, _)| *n).collect();
        let workloads = validate_all(stream.workloads)?;
        let located: Vec<(usize, &_)> = positions.iter().copied().zip(workloads.iter()).collect();
        let mut errors = self.blobs.check_modules(&located);
        let now = now_ms();
        let mut secrets = Vec::new();
        for (n, s) in &stream.secrets {
            if over_mqtt {
                errors.push(ManifestError::secret(
                    *n,
                    Some(s.name.to_string()),
                    "secrets are applied over the HTTPS API only (shoal apply does so): on MQTT the broker and every operator subscribed to shoal/v1/apply see the values".into(),
                ));
                continue;
            }
            let sealed = s.to_bytes().and_then(|plain| {
                let version = self.secrets_key.version(s.name.as_str(), &plain);
                self.secrets_key
                    .encrypt(s.name.as_str(), &version, &plain)
                    .map(|blob| (version, blob))
                    .map_err(|e| e.to_string())
            });
            match sealed {
                Ok((version, blob)) => secrets.push((
                    *n,
                    StoredSecret {
                        name: s.name.clone(),
                        keys: s.data.keys().cloned().collect(),
                        version,
                        encrypted: shoal_api::secret::b64::encode(&blob),
                        updated_ms: now,
                    },
                )),
                Err(e) => errors.push(ManifestError::secret(*n, Some(s.name.to_string()), e)),
            }
        }
        let refs: Vec<(usize, &StoredSecret)> = secrets.iter().map(|(n, s)| (*n, s)).collect();
        errors.extend(self.core.check_secrets(&located, &refs));
        if !errors.is_empty() {
            return Err(errors);
        }
        let server_fault = |message: String| {
            vec![ManifestError {
                message,
                ..Default::default()
            }]
        };
        let stored = self
            .core
            .apply_secrets(secrets.into_iter().map(|(_, s)| s).collect())
            .map_err(|e| server_fault(format!("hub could not store the manifest: {e}")))?;
        let (outcome, publish) = self
            .core
            .apply(workloads)
            .map_err(|e| server_fault(format!("hub could not store the manifest: {e}")))?;
        if !self.publish_desired(publish).await {
            return Err(server_fault(NOT_DURABLE.to_string()));
        }
        Ok((outcome, stored))
    }

    /// `state` with the values of the secrets its workloads use, each sealed to the
    /// device's enrolled key. A secret that cannot be sealed is left out (the replicas that
    /// need it report it missing) and the reason logged.
    fn seal_secrets(&self, mut state: DesiredState) -> DesiredState {
        let wanted: BTreeMap<&shoal_api::ids::SecretName, &str> = state
            .workloads
            .iter()
            .flat_map(|w| &w.secrets)
            .map(|m| (&m.mount.name, m.version.as_str()))
            .collect();
        if wanted.is_empty() {
            return state;
        }
        let dev = &state.device_id;
        let cert = match &self.security {
            None => {
                Err("the hub runs --insecure: devices hold no keys to seal secrets to".to_string())
            }
            // A blocking read (a file, or one etcd round trip), for devices whose
            // workloads use secrets only.
            Some(sec) => match sec.enrollments.enrolled_cert(dev) {
                Ok(Some(cert)) => Ok(cert),
                Ok(None) => Err("the device has no enrollment record".to_string()),
                Err(e) => Err(format!("cannot read the enrollment record: {e}")),
            },
        };
        let mut sealed = Vec::new();
        for (name, version) in wanted {
            let r = cert.clone().and_then(|cert| {
                let s = self
                    .core
                    .secret(name)
                    .ok_or_else(|| "the hub has no such secret".to_string())?;
                if s.version != version {
                    return Err(format!(
                        "the desired state wants version {version}, the hub has {}",
                        s.version
                    ));
                }
                let plain = open_stored(&self.secrets_key, s)?;
                shoal_pki::secret::seal_to_device(
                    &cert,
                    dev.as_str(),
                    name.as_str(),
                    version,
                    &plain,
                )
                .map_err(|e| e.to_string())
            });
            match r {
                Ok(x) => sealed.push(shoal_api::secret::SealedSecret {
                    name: name.clone(),
                    version: version.to_string(),
                    enc: shoal_api::secret::b64::encode(&x.enc),
                    ciphertext: shoal_api::secret::b64::encode(&x.ciphertext),
                }),
                Err(why) => {
                    warn!(device = %dev, secret = %name, reason = %why, "cannot deliver secret")
                }
            }
        }
        state.secrets = sealed;
        state
    }

    async fn send_desired(&self, states: Vec<DesiredState>) {
        for d in states {
            let d = self.seal_secrets(d);
            let payload = match serde_json::to_vec(&d) {
                Ok(p) => self.signer.seal(&p),
                Err(e) => {
                    warn!(device = %d.device_id, error = %e, "cannot encode desired state");
                    continue;
                }
            };
            let msg = Outgoing {
                topic: topics::desired(&d.device_id),
                payload,
                retain: true,
                correlation: None,
            };
            match self.bus.publish(msg).await {
                Ok(()) => {
                    self.metrics.desired_published.inc();
                }
                Err(e) => {
                    warn!(device = %d.device_id, generation = d.generation, error = %e, "cannot publish desired state")
                }
            }
        }
    }

    fn update_metrics(&mut self) {
        self.metrics.scheduled(&self.core.take_scheduling_runs());
        self.metrics.refresh(
            &self.core.device_views(),
            &self.core.workload_views(),
            self.core.mdns_devices(),
        );
    }

    /// Whom to ask for `workload`'s logs: the online devices among those with a replica of it
    /// (or `device` alone), the offline ones with why, and how many replicas they hold.
    #[allow(clippy::type_complexity)]
    fn log_targets(
        &self,
        workload: &shoal_api::ids::WorkloadName,
        device: Option<&DeviceId>,
    ) -> Result<(Vec<DeviceId>, Vec<(DeviceId, String)>, usize), (u16, String)> {
        let Some(view) = self.core.workload_view(workload) else {
            return Err((404, format!("workload {:?} not found", workload.as_str())));
        };
        let devices = self.core.device_views();
        let placed: std::collections::BTreeSet<&str> = view
            .replicas
            .iter()
            .filter_map(|r| r.device.as_deref())
            .collect();
        let wanted: Vec<&str> = match device {
            Some(d) if devices.iter().any(|v| v.id == d.as_str()) => vec![d.as_str()],
            Some(d) => return Err((404, format!("device {:?} not found", d.as_str()))),
            None if placed.is_empty() => {
                return Err((
                    404,
                    format!(
                        "workload {:?} has no replica placed on a device yet",
                        workload.as_str()
                    ),
                ))
            }
            None => placed.into_iter().collect(),
        };
        let replicas = view
            .replicas
            .iter()
            .filter(|r| r.device.as_deref().is_some_and(|d| wanted.contains(&d)))
            .count();
        let (mut asked, mut unreachable) = (Vec::new(), Vec::new());
        for v in devices.iter().filter(|v| wanted.contains(&v.id.as_str())) {
            let Ok(id) = DeviceId::try_from(v.id.as_str()) else {
                continue;
            };
            if v.online {
                asked.push(id);
            } else {
                let why = format!("device {id} is offline: its logs can be read when it is back");
                unreachable.push((id, why));
            }
        }
        Ok((asked, unreachable, replicas))
    }

    /// Takes a snapshot of the fleet and records what changed since the last one: when
    /// something happened, at least every second (devices go offline with time), and
    /// whenever `now` (a reader wants the latest).
    fn record_events(&mut self, now: bool) {
        let due = self
            .last_snapshot
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
        if !(self.changed || due || now) {
            return;
        }
        let devices = self.core.device_views();
        let workloads = self.core.workload_views();
        self.observe(&devices, &workloads);
    }

    /// Records the events between the last snapshot and these views of the fleet.
    fn observe(
        &mut self,
        devices: &[shoal_api::views::DeviceView],
        workloads: &[shoal_api::views::WorkloadView],
    ) {
        let changed = std::mem::take(&mut self.changed);
        self.last_snapshot = Some(std::time::Instant::now());
        self.metrics.scheduled(&self.core.take_scheduling_runs());
        let snapshot = crate::fleet::events::Snapshot::of(devices, workloads);
        let added = self.events.observe(snapshot, now_ms());
        for e in &added {
            info!(target: "shoal_hub::fleet::events", kind = %e.kind, reason = %e.reason, object = %e.object, "{}", e.message);
        }
        self.metrics.recorded(&added);
        if changed || !added.is_empty() {
            self.fleet_changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}

fn decode<T: serde::de::DeserializeOwned + HasDevice>(
    topic: &str,
    payload: &[u8],
    raw: &str,
) -> Option<T> {
    match serde_json::from_slice::<T>(payload) {
        Ok(v) if v.device().as_str() == raw => Some(v),
        Ok(v) => {
            warn!(topic, claimed = %v.device(), "message for another device ignored");
            None
        }
        Err(e) => {
            warn!(topic, error = %e, "malformed message ignored");
            None
        }
    }
}

trait HasDevice {
    fn device(&self) -> &DeviceId;
}
impl HasDevice for Hello {
    fn device(&self) -> &DeviceId {
        &self.device_id
    }
}
impl HasDevice for LogChunk {
    fn device(&self) -> &DeviceId {
        &self.device_id
    }
}
impl HasDevice for DeviceStatus {
    fn device(&self) -> &DeviceId {
        &self.device_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_broker_is_reachable_from_the_lan() {
        let url = |s: &str| s.parse::<BrokerUrl>().unwrap();
        let embedded = url("mqtt://0.0.0.0:1883");
        assert_eq!(advertised_mqtt(None, &embedded), MqttEndpoint::Local(1883));
        for local in [
            "mqtt://127.0.0.1:1884",
            "mqtt://localhost:1884",
            "mqtt://[::1]:1884",
        ] {
            assert_eq!(
                advertised_mqtt(Some(&url(local)), &embedded),
                MqttEndpoint::Local(1884),
                "{local}"
            );
        }
        let remote = url("mqtt://broker.lan:1883");
        assert_eq!(
            advertised_mqtt(Some(&remote), &embedded),
            MqttEndpoint::Remote(remote.clone())
        );
    }
}
