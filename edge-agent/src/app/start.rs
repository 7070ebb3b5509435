//! What `run` opens before the loop starts: mDNS, the device's identity (enrolling over
//! mDNS when it has none and no `--hub`), the container runtime, the local API, and the
//! device's hello.

use super::discovery::directory;
use super::AgentError;
use crate::config::AgentConfig;
use crate::core::directory::hub_link::{HubLink, Pins, Probe, Step};
use crate::enroll::Identity;
use crate::local::{self, LocalRequest};
use crate::runtime::wasm::WasmRuntime;
use crate::runtime::Runtime;
use crate::store::Store;
use shoal_api::wire::discovery;
use shoal_api::wire::messages::{Hello, RUNTIME_CONTAINER, RUNTIME_WASM, RUNTIME_WASM_PRECOMPILED};
use shoal_daemon::clock::now_ms;
use shoal_daemon::mdns::{Discovery, Mdns, MdnsEvent, NoDiscovery};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

/// mDNS as the agent uses it: the running responder (`None` when off or failed to start,
/// which is not worth refusing to run the persisted workloads for) and the port over it.
pub fn mdns(
    config: &AgentConfig,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> (Option<Arc<Mdns>>, Arc<dyn Discovery>) {
    let started = config.mdns.as_ref().map(|opts| {
        Mdns::start(
            opts,
            &discovery::dns_label(&format!("shoal-agent-{}", config.device_id)),
            tracker.clone(),
            stop.clone(),
        )
    });
    match started {
        Some(Ok(m)) => {
            let m = Arc::new(m);
            (Some(m.clone()), m)
        }
        Some(Err(e)) => {
            error!(error = %e, "mDNS is off: this device neither finds the hub nor is found");
            (None, Arc::new(NoDiscovery))
        }
        None => (None, Arc::new(NoDiscovery)),
    }
}

/// The device's identity as `run` found it.
pub enum Found {
    /// `None` for an `--insecure` agent. `hubs_browsed`: the hub service is browsed already
    /// (enrollment over mDNS did); browse results seen meanwhile are in `early`.
    Identity {
        identity: Option<Identity>,
        hubs_browsed: bool,
        early: Vec<MdnsEvent>,
    },
    /// Stopped while looking for a hub to enroll with.
    Stopped,
}

/// The device's identity: saved credentials, or enrollment now (at `--hub`, or at the hub
/// mDNS finds, browsing through `dns` into `mdns_rx`).
pub async fn identity(
    config: &AgentConfig,
    dns: &dyn Discovery,
    mdns: (&mpsc::Sender<MdnsEvent>, &mut mpsc::Receiver<MdnsEvent>),
    mdns_on: bool,
    shutdown: &CancellationToken,
) -> Result<Found, AgentError> {
    let (mdns_tx, mdns_rx) = mdns;
    if config.insecure {
        warn!("--insecure: plain MQTT and HTTP, desired state not verified; for local development only");
        return Ok(Found::Identity {
            identity: None,
            hubs_browsed: false,
            early: Vec::new(),
        });
    }
    let enrolled =
        shoal_pki::device::DeviceCredentials::load(&crate::enroll::pki_dir(&config.data_dir))
            .map_err(crate::enroll::EnrollError::from)?
            .is_some();
    let over_mdns = config.hub_url.is_none() && !enrolled && mdns_on;
    let browsed = match (&config.join_token, over_mdns) {
        (Some(token), true) => match dns.browse(discovery::HUB_SERVICE, mdns_tx.clone()) {
            Ok(()) => Some(token),
            Err(e) => {
                warn!(error = %e, "cannot browse for the hub over mdns");
                None
            }
        },
        _ => None,
    };
    let Some(token) = browsed else {
        let id = crate::enroll::identity(
            &config.data_dir,
            &config.device_id,
            config.join_token.as_ref(),
            config.hub_url.as_deref(),
        )
        .await?;
        return Ok(Found::Identity {
            identity: Some(id),
            hubs_browsed: false,
            early: Vec::new(),
        });
    };
    let mut early = Vec::new();
    match enroll_over_mdns(config, token, mdns_rx, &mut early, shutdown).await? {
        Some(id) => Ok(Found::Identity {
            identity: Some(id),
            hubs_browsed: true,
            early,
        }),
        None => Ok(Found::Stopped),
    }
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
) -> Result<Option<Identity>, AgentError> {
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

/// Serves the local API (and `/metrics` over TCP if asked); requests go to `tx`.
pub async fn local_api(
    config: &AgentConfig,
    tx: mpsc::Sender<LocalRequest>,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> Result<(), AgentError> {
    if let Some(addr) = config.metrics_listen {
        let bound = local::serve_metrics(addr, tx.clone(), tracker, stop.clone()).await?;
        info!(%bound, "metrics listening");
    }
    if let Some(sock) = &config.socket {
        let logs = config.data_dir.join("logs");
        match local::serve(&sock.path, tx, logs, tracker, stop.clone()).await {
            Ok(()) => info!(socket = %sock.path.display(), "local api listening"),
            Err(e) if !sock.explicit => {
                warn!(error = %e, "local api off (the default socket needs root; give --socket PATH)")
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The container runtime: containerd, when configured and answering (then the device offers
/// the `container` runtime). Containers the agent created that its persisted desired state no
/// longer names (deleted while it was down) are removed.
#[cfg(feature = "containerd")]
pub async fn containers(
    config: &AgentConfig,
    store: &dyn Store,
    registries: Arc<shoal_registry::Registries>,
    stopping: CancellationToken,
) -> Option<Arc<dyn Runtime>> {
    use std::collections::BTreeSet;
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
                crate::runtime::containerd::ContainerdRuntime::new(
                    c,
                    stopping,
                    config.allow.clone(),
                ),
            ))
        }
        Err(e) => {
            info!(error = %e, "no container runtime (containers will not be scheduled here)");
            None
        }
    }
}

#[cfg(not(feature = "containerd"))]
pub async fn containers(
    _config: &AgentConfig,
    _store: &dyn Store,
    _registries: Arc<shoal_registry::Registries>,
    _stopping: CancellationToken,
) -> Option<Arc<dyn Runtime>> {
    None
}

/// The device's capabilities, sent on every connect.
pub fn hello(
    config: &AgentConfig,
    containers: bool,
    hardware: &crate::core::hardware::Inventory,
) -> Hello {
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
        allows: config.allow.iter().copied().collect(),
        protocol: shoal_api::PROTOCOL_VERSION,
        device_id: config.device_id.clone(),
        arch: std::env::consts::ARCH.to_string(),
        variant: shoal_api::model::oci::native_variant().map(String::from),
        os: std::env::consts::OS.to_string(),
        runtimes,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory: config.memory.unwrap_or_else(crate::host::total_memory),
        labels: config.labels.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        max_replicas: config.max_replicas,
        devices: crate::core::hardware::Holdings::new(hardware.clone()).counts(),
    }
}
