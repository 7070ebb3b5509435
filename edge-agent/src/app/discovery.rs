//! The discovery part of the agent's loop: which hub is used, what this device advertises
//! and browses over mDNS, and the service endpoint files of its workloads.
//!
//! mDNS browse results update the [`Directory`]; a hub candidate is authenticated (a probe
//! task) before [`HubLink`] lets it retarget the bus (through a watch channel) and the
//! renewals, only when the hub in use has stopped working (the bus tells it), and never
//! replaces what `--broker`/`--hub` pinned. Service changes rewrite the endpoint files of
//! consuming workloads, and replicas entering or leaving `Running` are advertised or
//! withdrawn ([`Discovery::refresh_services`], given the desired and running replicas by the
//! loop).

use crate::config::AgentConfig;
use crate::core::directory::hub_link::{HubLink, Pins, Probe, Step, Target};
use crate::core::directory::{Change, Directory};
use crate::enroll::{EnrollError, Identity};
use crate::runtime::Network;
use crate::services::{self, ServiceFiles};
use shoal_api::model::ids::{DeviceId, WorkloadName};
use shoal_api::wire::discovery::{self, AgentAd, HubChoice};
use shoal_api::wire::endpoint::BrokerUrl;
use shoal_api::wire::messages::{DesiredWorkload, Hello};
use shoal_daemon::clock::now_ms;
use shoal_daemon::mdns::{Discovery as Dns, MdnsEvent};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// How a probe of a hub candidate went, as it comes back to the loop.
pub type Probed = (Target, Result<(), EnrollError>);

/// What discovery is wired to.
pub struct Wiring {
    /// mDNS (or [`shoal_daemon::mdns::NoDiscovery`]).
    pub dns: Arc<dyn Dns>,
    /// Where browse results go (the loop's inbox).
    pub mdns_tx: mpsc::Sender<MdnsEvent>,
    /// Where probe outcomes go (the loop's inbox).
    pub probe_tx: mpsc::Sender<Probed>,
    /// The broker the bus connects to.
    pub broker_tx: watch::Sender<Option<BrokerUrl>>,
    /// The hub's HTTP API (renewals, downloads).
    pub hub_http_tx: watch::Sender<Option<String>>,
    pub tracker: TaskTracker,
    /// Ends the probes (the agent is stopping).
    pub stopping: CancellationToken,
}

/// What the agent has said of its hub search (each thing once).
#[derive(Debug, Default)]
struct Said {
    /// Conflicting hubs last reported.
    conflicting: Vec<String>,
    /// Hubs already reported as ignored.
    ignored: BTreeSet<String>,
    /// The hub in use withdrew its record (said once).
    withdrawn: bool,
}

/// Hub choice, adverts, browsing and service files.
pub struct Discovery {
    fleet: String,
    device_id: DeviceId,
    /// `--broker` given.
    broker_pinned: bool,
    wiring: Wiring,
    directory: Directory,
    /// Which hub is used, candidates authenticated first.
    hub_link: HubLink,
    /// What hub candidates are authenticated with; `None` for an `--insecure` agent.
    identity: Option<Identity>,
    files: ServiceFiles,
    /// The hub service is browsed already (to find a hub to enroll with).
    hubs_browsed: bool,
    said: Said,
    /// Service adverts of this device's running replicas: instance name → mDNS full name.
    advertised: BTreeMap<String, String>,
    /// Service types browsed for the workloads that `use` them.
    browsing: BTreeSet<WorkloadName>,
}

/// An empty [`Directory`] for this agent's fleet and fleet CA (`ca`: its SHA-256), believing
/// loopback addresses only when mDNS itself runs on loopback.
pub fn directory(config: &AgentConfig, ca: Option<String>) -> Directory {
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

impl Discovery {
    /// `hubs_browsed`: the hub service is browsed already (enrollment over mDNS did).
    pub fn new(
        config: &AgentConfig,
        identity: Option<Identity>,
        hubs_browsed: bool,
        wiring: Wiring,
    ) -> Self {
        let mut directory = directory(config, identity.as_ref().map(|i| i.ca_hash.clone()));
        directory.set_own_addrs(shoal_daemon::mdns::host_addrs());
        let hub_link = HubLink::new(
            Pins {
                broker: config.broker.is_some(),
                http: config.hub_url.is_some(),
            },
            identity.is_some(),
        );
        Discovery {
            fleet: config.fleet.clone(),
            device_id: config.device_id.clone(),
            broker_pinned: config.broker.is_some(),
            wiring,
            directory,
            hub_link,
            identity,
            files: ServiceFiles::new(&config.data_dir),
            hubs_browsed,
            said: Said::default(),
            advertised: BTreeMap::new(),
            browsing: BTreeSet::new(),
        }
    }

    /// Advertises this device as `_shoal-agent._tcp.local.` (with what `hello` says of it)
    /// and browses for hubs and peers.
    pub fn advertise_self(&mut self, hello: &Hello) {
        let ad = AgentAd {
            protocol: shoal_api::PROTOCOL_VERSION,
            fleet: self.fleet.clone(),
            device: self.device_id.clone(),
            arch: hello.arch.clone(),
            runtimes: hello.runtimes.clone(),
            labels: hello.labels.clone(),
        };
        let advert = shoal_daemon::mdns::Advert {
            ty: discovery::AGENT_SERVICE.to_string(),
            instance: self.device_id.to_string(),
            port: 0, // no TCP service: the record says "this device is here"
            txt: ad.to_txt(),
        };
        if let Err(e) = self.wiring.dns.advertise(&advert) {
            warn!(error = %e, "cannot advertise this device over mdns");
        }
        for ty in [discovery::HUB_SERVICE, discovery::AGENT_SERVICE] {
            if ty == discovery::HUB_SERVICE && self.hubs_browsed {
                continue; // already browsed for enrollment
            }
            if let Err(e) = self.wiring.dns.browse(ty, self.wiring.mdns_tx.clone()) {
                warn!(error = %e, "cannot browse over mdns");
            }
        }
    }

    /// A browse result. `true` when a service's endpoints changed (the loop then refreshes
    /// the services).
    pub fn on_mdns(&mut self, ev: MdnsEvent) -> bool {
        let (change, rejected) = self.directory.apply(ev, now_ms());
        if let Some(reason) = rejected {
            warn!(%reason, "mdns record ignored");
        }
        match change {
            Change::None | Change::Peers => false,
            Change::Hubs => {
                self.choose_hub();
                false
            }
            Change::Service(_) => true,
        }
    }

    /// The bus connected: the hub in use works.
    pub fn connected(&mut self) {
        self.hub_link.connected();
    }

    /// The bus lost its connection: the hub in use may have stopped working.
    pub fn disconnected(&mut self) {
        self.hub_link.disconnected(now_ms());
    }

    /// Follows the hubs mDNS shows through [`HubLink`]: a candidate is used once
    /// authenticated, and only while no hub is in use or the one in use has stopped working
    /// (then the last one that worked first); what `--broker`/`--hub` pinned is never
    /// replaced.
    pub fn choose_hub(&mut self) {
        let choice = self.directory.hub_choice();
        let step = self.hub_link.next(&choice.candidates, now_ms());
        self.follow(step, &choice);
    }

    /// Whether the device's addresses changed (no service endpoint may point at them):
    /// then the loop refreshes the services.
    pub fn own_addrs_changed(&mut self) -> bool {
        self.directory
            .set_own_addrs(shoal_daemon::mdns::host_addrs())
    }

    /// Says again that no hub was found, if still so (`searched_s`: for how long; `running`:
    /// the replicas that run offline meanwhile).
    pub fn report_search(&self, searched_s: u64, running: usize) {
        if !self.broker_pinned && self.hub_link.current().is_none() {
            warn!(
                fleet = %self.fleet,
                searched_s,
                running,
                "no hub for this fleet found over mDNS yet; running the persisted workloads offline and still looking"
            );
        }
    }

    /// A probe of a hub candidate ended.
    pub fn on_probed(&mut self, target: Target, result: Result<(), EnrollError>) {
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

    /// Authenticates a candidate in the background; the outcome comes back to the loop
    /// ([`Probed`]).
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
        let tx = self.wiring.probe_tx.clone();
        let stop = self.wiring.stopping.clone();
        self.wiring.tracker.spawn(async move {
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
            self.wiring.hub_http_tx.send_replace(Some(http.clone()));
        }
        if let Some(broker) = &t.broker {
            // Only a new address wakes the bus (a wake-up restarts a pending connect).
            self.wiring.broker_tx.send_if_modified(|b| {
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
            if self.said.ignored.insert(instance.clone()) {
                let ours = self
                    .directory
                    .hubs()
                    .any(|h| &h.hub.instance == instance && h.hub.ad.fleet == self.fleet);
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
        if others != self.said.conflicting {
            if let (Some(using), false) = (&current, others.is_empty()) {
                warn!(fleet = %self.fleet, %using, others = ?others, "several hubs serve this fleet; using the one in use while it works (run one hub per fleet)");
            }
            self.said.conflicting = others;
        }
        let withdrawn = current
            .as_ref()
            .is_some_and(|c| !choice.candidates.iter().any(|h| &h.instance == c));
        if withdrawn && !self.said.withdrawn {
            if let Some(old) = &current {
                warn!(hub = %old, "hub withdrew its mdns record; still trying its last address and looking for another");
            }
        }
        self.said.withdrawn = withdrawn;
    }

    /// Brings service adverts, browses, endpoint files and allow-lists in line with the
    /// `desired` replicas, those of them `running` here and the directory.
    pub fn refresh_services(&mut self, desired: &[DesiredWorkload], running: &[&DesiredWorkload]) {
        let want = services::adverts(&self.fleet, &self.device_id, running.iter().copied());
        let stale: Vec<String> = self
            .advertised
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        for key in stale {
            if let Some(fullname) = self.advertised.remove(&key) {
                info!(service = %key, "withdrawing service advert");
                self.wiring.dns.withdraw(&fullname);
            }
        }
        for (key, ad) in want {
            if self.advertised.contains_key(&key) {
                continue;
            }
            match self.wiring.dns.advertise(&ad) {
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
            self.wiring
                .dns
                .stop_browse(&discovery::workload_service(&svc));
            self.directory.forget_service(&svc);
            self.browsing.remove(&svc);
        }
        let new: Vec<WorkloadName> = used.difference(&self.browsing).cloned().collect();
        for svc in new {
            match self.wiring.dns.browse(
                &discovery::workload_service(&svc),
                self.wiring.mdns_tx.clone(),
            ) {
                Ok(()) => {
                    self.browsing.insert(svc);
                }
                // Tried again at the next refresh.
                Err(e) => warn!(error = %e, "cannot browse for service"),
            }
        }

        let wanted = services::wanted(desired, running.iter().copied(), &self.directory);
        if let Err(e) = self.files.sync(&wanted) {
            warn!(error = %e, "cannot write service endpoint files");
        }
    }

    /// The sandbox's network grants for a replica of `w` (see [`crate::services`]).
    pub fn network(&mut self, w: &DesiredWorkload) -> Network {
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

    /// Withdraws every service advert (shutdown).
    pub fn withdraw_all(&mut self) {
        for (_, fullname) in std::mem::take(&mut self.advertised) {
            self.wiring.dns.withdraw(&fullname);
        }
    }

    /// The broker the bus is pointed at.
    pub fn broker(&self) -> Option<String> {
        self.wiring
            .broker_tx
            .borrow()
            .as_ref()
            .map(ToString::to_string)
    }

    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    pub fn hub_link(&self) -> &HubLink {
        &self.hub_link
    }
}
