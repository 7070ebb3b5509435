//! Composition: opens the store, blobs, security, broker, bus, HTTP server and mDNS, and
//! runs the loop, standing by first when hubs share an etcd store.

use super::mdns::{advertise, stop_mdns};
use super::publish::open_stored;
use super::*;
use crate::blobs::BlobStore;
use crate::fleet::Fleet;
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::mqtt::bus;
use crate::store::Store;
use shoal_api::wire::endpoint::BrokerUrl;
use shoal_daemon::clock::now_ms;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub(super) async fn serve(
    config: &HubConfig,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), HubError> {
    if let crate::backend::StoreChoice::Etcd(url) = &config.store {
        if url.plaintext() && !config.insecure {
            return Err(HubError::PlainEtcd(url.to_string()));
        }
    }
    let store = config.store.open(&config.data_dir)?;
    // Replicas on etcd share the fleet's keys and elect a leader (see crate::ha).
    let elector = match &config.store {
        crate::backend::StoreChoice::Etcd(url) => {
            if config.broker.is_none() {
                warn!("hub state in etcd with the embedded broker: other hub replicas cannot take over this one's devices (give every replica the same --broker)");
            }
            let e = crate::ha::Elector::connect(url, config.leader_lease).await?;
            e.share_keys(&crate::security::pki_dir(&config.data_dir))
                .await?;
            Some(e)
        }
        crate::backend::StoreChoice::Sled => None,
    };
    let mut blobs = BlobStore::open(&config.data_dir)?;
    if let crate::backend::StoreChoice::Etcd(url) = &config.store {
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
            crate::backend::StoreChoice::Etcd(url) => {
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
            crate::backend::StoreChoice::Sled => Box::new(files),
        };
        let sec = crate::security::Security::load(
            &config.data_dir,
            &names,
            signer.public_key_b64(),
            config.device_cert_lifetime,
            enrollments,
        )?;
        // The bundle the hub wrote is its bootstrap operator's: pinned in the book.
        let bundle = crate::security::operator_dir(&config.data_dir);
        crate::access::pin_bootstrap(&*sec.enrollments, &sec.ca, &bundle, now_ms()).map_err(
            |e| shoal_pki::PkiError::BadFile {
                what: "the bootstrap operator's record",
                path: bundle.display().to_string(),
                reason: e.to_string(),
            },
        )?;
        Some(Arc::new(sec))
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
            shoal_api::wire::endpoint::check_public_url(u, security.is_some())
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
            let e = crate::mqtt::broker::start(
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
            let read: Box<dyn crate::store::Load> = Box::new(config.store.open(&config.data_dir)?);
            let mut c = Fleet::open(read.load()?, public_url.clone(), config.insecure);
            c.set_artifact_port(artifact_port);
            Some((c, read))
        }
        None => None,
    };
    // Every stored secret must open with this key: a lost or replaced key file would
    // otherwise show only as secrets that never reach devices.
    if let Some((c, _)) = &standby_core {
        for s in c.stored_secrets() {
            open_stored(&secrets_key, s).map_err(|e| HubError::SecretsKey(e.to_string()))?;
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
        &format!("{}{replica}", shoal_api::policy::acl::HUB_CLIENT_PREFIX),
        auth,
        bus::BusOptions {
            shared_ingest: ingest.is_some(),
            received: metrics.mqtt_received.clone(),
        },
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
        let requests = req_tx.clone();
        tracker.spawn(crate::access::watch(
            sec.clone(),
            verdicts_tx,
            move |devices| {
                // Never waits: the set is sent again within 30 s if the loop is full now.
                let _ = requests.try_send(Request::Revoked { devices });
            },
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

    let (book_tx, book_rx) = mpsc::channel(book::ANSWERS);
    let mut chans = Channels {
        bus: bus_rx,
        requests: req_rx,
        mdns: mdns_rx,
        book: book_rx,
    };
    let mut parts = Parts {
        publisher: Publisher {
            bus,
            signer,
            secrets_key,
            security: security.clone(),
            book: book::BookReads::new(book_tx, tracker.clone()),
            keys: Default::default(),
        },
        views: Views {
            events: crate::fleet::events::Events::default(),
            fleet_changed,
            changed: true,
            last_snapshot: None,
        },
        settings: LoopSettings {
            fleet: config.fleet.clone(),
            grace_ms: u64::try_from(config.device_grace.as_millis()).unwrap_or(u64::MAX),
            // Only the embedded broker's guard writes `apply-as` topics; through an external
            // broker (or with no guard, --insecure) anyone allowed to publish there could.
            attributed_applies: config.broker.is_none() && security.is_some(),
        },
        blobs,
        metrics,
        logs: crate::logs::LogSessions::default(),
        ingest,
    };
    let mut lost = None;
    let mut heard = None;
    if let (Some(elector), Some((core, read))) = (elector, standby_core.take()) {
        // Stand by (serving reads) until elected.
        let value = if public_url.is_empty() {
            format!("{} http://{http_addr}", config.name)
        } else {
            format!("{} {public_url}", config.name)
        };
        let mut standby: MainLoop<Box<dyn Store>, _> = MainLoop::new(
            core,
            parts,
            Role::Standby(Box::new(Standby {
                read,
                elector: elector.clone(),
                leader: standby_tx.clone(),
                last_reload: None,
                changes: elector.watch_state(tracker, shutdown.clone()),
                last_read: None,
            })),
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
    let mut core = Fleet::open(
        store.load()?,
        public_url.clone(),
        parts.publisher.security.is_none(),
    );
    core.set_artifact_port(artifact_port);
    for s in core.stored_secrets() {
        open_stored(&parts.publisher.secrets_key, s)
            .map_err(|e| HubError::SecretsKey(e.to_string()))?;
    }
    if let Some(mut standby) = heard {
        core.adopt_live(&mut standby);
    }
    // Revoked devices are known before anything is placed or sealed (the watch tells the
    // loop again later, but a leader must not place on them meanwhile).
    let mut revoked_states = Vec::new();
    if let Some(sec) = parts.publisher.security.clone() {
        let read = tokio::task::spawn_blocking(move || {
            crate::access::Verdicts::read(&*sec.enrollments).map(|v| v.revoked)
        })
        .await;
        match read {
            Ok(Ok(revoked)) => {
                revoked_states = core.set_revoked(revoked).unwrap_or_default();
            }
            Ok(Err(e)) => warn!(error = %e, "cannot read revoked devices at start; the watch will"),
            Err(e) => warn!(error = %e, "cannot read revoked devices at start; the watch will"),
        }
    }
    let moved = core.relocate_artifacts();
    parts.metrics.leader.set(1);
    let writer = Writer {
        store,
        unwritten: Default::default(),
        lost: lost.clone(),
    };
    let mut main = MainLoop::new(core, parts, Role::Leader(writer));
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
            let reissued = main.core.reissue(&device);
            main.queue(reissued.into_iter().collect());
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
