//! What this agent knows about the LAN, from mDNS: hubs, peer devices and the endpoints of
//! exposed workloads. Pure state fed with [`MdnsEvent`]s; the agent's main loop owns it and
//! acts on the [`Change`] each event returns (reconnect to another hub, rewrite endpoint files).

use shoal_api::discovery::{
    self, choose_hub, preferred_addr, AgentAd, HubAd, HubChoice, SeenHub, ServiceAd,
};
use shoal_api::ids::{DeviceId, WorkloadName};
use shoal_daemon::mdns::{MdnsEvent, Resolved};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

/// What an event changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    None,
    Hubs,
    Peers,
    /// The endpoints of this service (workload) changed.
    Service(WorkloadName),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub ad: AgentAd,
    pub addrs: Vec<IpAddr>,
    /// When this agent first saw the record (ms since the epoch).
    pub first_seen_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEntry {
    pub hub: SeenHub,
    pub first_seen_ms: u64,
}

/// One advertised port of one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub device: DeviceId,
    pub replica: u32,
    pub port_name: String,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct Directory {
    fleet: String,
    protocol: u32,
    own: DeviceId,
    hubs: BTreeMap<String, HubEntry>,
    /// Records that failed to parse, by full name, with the reason (reported once).
    rejected: BTreeMap<String, String>,
    peers: BTreeMap<String, Peer>,
    /// Service → record full name → endpoint. Records of this device are left out: the agent
    /// knows its own replicas better than mDNS does (see [`Directory::endpoints`]).
    services: BTreeMap<WorkloadName, BTreeMap<String, Endpoint>>,
    /// Whether loopback addresses in records are believed (only when mDNS itself runs on
    /// loopback): otherwise anyone on the LAN could point a hub or a service endpoint at this
    /// device's own loopback services.
    allow_loopback: bool,
    /// Reach hubs over TLS (`mqtts://`, `https://`); off only for `--insecure` agents.
    tls: bool,
}

impl Directory {
    pub fn new(fleet: &str, protocol: u32, own: DeviceId) -> Self {
        Self {
            fleet: fleet.to_string(),
            protocol,
            own,
            hubs: BTreeMap::new(),
            rejected: BTreeMap::new(),
            peers: BTreeMap::new(),
            services: BTreeMap::new(),
            allow_loopback: false,
            tls: true,
        }
    }

    /// Reach hubs in the clear (an agent run with `--insecure`).
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Believe loopback addresses in records (single-host development over loopback mDNS).
    pub fn with_loopback(mut self, allow: bool) -> Self {
        self.allow_loopback = allow;
        self
    }

    /// Applies one browse result. A record that cannot be read is remembered with its reason
    /// (the second return value is `Some` the first time, for one log line).
    pub fn apply(&mut self, ev: MdnsEvent, now_ms: u64) -> (Change, Option<String>) {
        match ev {
            MdnsEvent::Resolved(r) => self.resolved(r, now_ms),
            MdnsEvent::Removed { ty, fullname } => {
                self.rejected.remove(&fullname);
                let change = if ty == discovery::HUB_SERVICE {
                    self.hubs.remove(&fullname).map(|_| Change::Hubs)
                } else if ty == discovery::AGENT_SERVICE {
                    self.peers.remove(&fullname).map(|_| Change::Peers)
                } else {
                    discovery::service_workload(&ty).and_then(|svc| {
                        let eps = self.services.get_mut(&svc)?;
                        eps.remove(&fullname)?;
                        Some(Change::Service(svc))
                    })
                };
                (change.unwrap_or(Change::None), None)
            }
        }
    }

    fn resolved(&mut self, mut r: Resolved, now_ms: u64) -> (Change, Option<String>) {
        if !self.allow_loopback {
            r.addrs.retain(|a| !a.is_loopback() && !a.is_unspecified());
        }
        let parsed = if r.ty == discovery::HUB_SERVICE {
            HubAd::from_txt(&r.fullname, &r.txt).map(|ad| {
                let first_seen_ms = self
                    .hubs
                    .get(&r.fullname)
                    .map_or(now_ms, |h| h.first_seen_ms);
                let entry = HubEntry {
                    hub: SeenHub {
                        instance: r.fullname.clone(),
                        ad,
                        addrs: r.addrs.clone(),
                    },
                    first_seen_ms,
                };
                let changed = self.hubs.get(&r.fullname).map(|e| &e.hub) != Some(&entry.hub);
                self.hubs.insert(r.fullname.clone(), entry);
                if changed {
                    Change::Hubs
                } else {
                    Change::None
                }
            })
        } else if r.ty == discovery::AGENT_SERVICE {
            AgentAd::from_txt(&r.fullname, &r.txt).map(|ad| {
                if ad.fleet != self.fleet || ad.device == self.own {
                    return Change::None;
                }
                let first_seen_ms = self
                    .peers
                    .get(&r.fullname)
                    .map_or(now_ms, |p| p.first_seen_ms);
                let peer = Peer {
                    ad,
                    addrs: r.addrs.clone(),
                    first_seen_ms,
                };
                if self.peers.insert(r.fullname.clone(), peer.clone()) == Some(peer) {
                    Change::None
                } else {
                    Change::Peers
                }
            })
        } else {
            ServiceAd::from_txt(&r.fullname, &r.txt).map(|ad| {
                let Some(addr) = preferred_addr(&r.addrs) else {
                    return Change::None;
                };
                if ad.fleet != self.fleet
                    || ad.device == self.own
                    || discovery::workload_service(&ad.workload) != r.ty
                {
                    return Change::None;
                }
                let ep = Endpoint {
                    device: ad.device,
                    replica: ad.replica,
                    port_name: ad.port_name,
                    addr: SocketAddr::new(addr, r.port),
                };
                let eps = self.services.entry(ad.workload.clone()).or_default();
                if eps.insert(r.fullname.clone(), ep.clone()) == Some(ep) {
                    Change::None
                } else {
                    Change::Service(ad.workload)
                }
            })
        };
        match parsed {
            Ok(change) => {
                self.rejected.remove(&r.fullname);
                (change, None)
            }
            Err(e) => {
                let reason = e.to_string();
                let first =
                    self.rejected.insert(r.fullname, reason.clone()) != Some(reason.clone());
                (Change::None, first.then_some(reason))
            }
        }
    }

    /// Drops what is known of `service` (its browse stopped; no removal would arrive).
    pub fn forget_service(&mut self, service: &WorkloadName) {
        self.services.remove(service);
    }

    /// The hub to use (see [`choose_hub`]).
    pub fn hub_choice(&self) -> HubChoice {
        let hubs: Vec<SeenHub> = self.hubs.values().map(|h| h.hub.clone()).collect();
        choose_hub(&self.fleet, self.protocol, self.tls, &hubs)
    }

    pub fn hubs(&self) -> impl Iterator<Item = &HubEntry> {
        self.hubs.values()
    }

    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    /// Current endpoints of `service`, by port name: the remote ones from mDNS plus
    /// `local` (this device's running replicas of it, reached on loopback). Sorted, no
    /// duplicates.
    pub fn endpoints(
        &self,
        service: &WorkloadName,
        local: &[(String, u16)],
    ) -> BTreeMap<String, BTreeSet<SocketAddr>> {
        let mut out: BTreeMap<String, BTreeSet<SocketAddr>> = BTreeMap::new();
        for (name, port) in local {
            out.entry(name.clone())
                .or_default()
                .insert(SocketAddr::new(IpAddr::from([127, 0, 0, 1]), *port));
        }
        for ep in self
            .services
            .get(service)
            .into_iter()
            .flat_map(|m| m.values())
        {
            out.entry(ep.port_name.clone()).or_default().insert(ep.addr);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(
        ty: &str,
        name: &str,
        addrs: &[&str],
        port: u16,
        txt: Vec<(String, String)>,
    ) -> MdnsEvent {
        MdnsEvent::Resolved(Resolved {
            ty: ty.into(),
            fullname: format!("{name}.{ty}"),
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            port,
            txt: txt.into_iter().collect(),
        })
    }

    fn hub(fleet: &str) -> Vec<(String, String)> {
        HubAd {
            protocol: 1,
            fleet: fleet.into(),
            http_port: 8080,
            mqtt: vec![discovery::MqttEndpoint::Local(1883)],
        }
        .to_txt()
    }

    fn svc(device: &str, replica: u32) -> Vec<(String, String)> {
        ServiceAd {
            protocol: 1,
            fleet: "farm".into(),
            device: device.parse().unwrap(),
            workload: WorkloadName::try_from("greeter").unwrap(),
            replica,
            port_name: "http".into(),
        }
        .to_txt()
    }

    #[test]
    fn hub_moves_and_leaves() {
        let mut d = Directory::new("farm", 1, "me".parse().unwrap());
        let h = discovery::HUB_SERVICE;
        assert_eq!(
            d.apply(resolved(h, "farm-a", &["10.0.0.1"], 8080, hub("farm")), 1)
                .0,
            Change::Hubs
        );
        assert_eq!(
            d.hub_choice().selected.unwrap().broker.to_string(),
            "mqtts://10.0.0.1:1883"
        );
        // The same record again changes nothing; a new address does.
        assert_eq!(
            d.apply(resolved(h, "farm-a", &["10.0.0.1"], 8080, hub("farm")), 2)
                .0,
            Change::None
        );
        assert_eq!(
            d.apply(resolved(h, "farm-a", &["10.0.0.7"], 8080, hub("farm")), 3)
                .0,
            Change::Hubs
        );
        assert_eq!(
            d.hub_choice().selected.unwrap().broker.to_string(),
            "mqtts://10.0.0.7:1883"
        );
        assert_eq!(d.hubs().next().unwrap().first_seen_ms, 1);
        // Another fleet's hub is seen but never chosen.
        d.apply(resolved(h, "lab-x", &["10.0.0.2"], 8080, hub("lab")), 4);
        let c = d.hub_choice();
        assert!(c.selected.unwrap().instance.starts_with("farm-a") && c.ignored.len() == 1);
        let gone = MdnsEvent::Removed {
            ty: h.into(),
            fullname: format!("farm-a.{h}"),
        };
        assert_eq!(d.apply(gone, 5).0, Change::Hubs);
        assert!(d.hub_choice().selected.is_none());
    }

    #[test]
    fn loopback_addresses_from_the_lan_are_not_believed() {
        let mut d = Directory::new("farm", 1, "me".parse().unwrap());
        let h = discovery::HUB_SERVICE;
        d.apply(resolved(h, "farm-a", &["127.0.0.1"], 8080, hub("farm")), 1);
        assert!(d.hub_choice().selected.is_none());
        let ty = "_greeter._tcp.local.";
        d.apply(
            resolved(
                ty,
                "greeter-0-http@a",
                &["127.0.0.1", "10.0.0.5"],
                22,
                svc("a", 0),
            ),
            1,
        );
        let g = WorkloadName::try_from("greeter").unwrap();
        let eps: Vec<String> = d.endpoints(&g, &[])["http"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(eps, ["10.0.0.5:22"]);
        let mut d = Directory::new("farm", 1, "me".parse().unwrap()).with_loopback(true);
        d.apply(resolved(h, "farm-a", &["127.0.0.1"], 8080, hub("farm")), 1);
        assert!(d.hub_choice().selected.is_some());
    }

    #[test]
    fn unreadable_records_are_reported_once() {
        let mut d = Directory::new("farm", 1, "me".parse().unwrap());
        let bad = || resolved(discovery::HUB_SERVICE, "x", &["10.0.0.1"], 1, vec![]);
        assert!(d.apply(bad(), 1).1.is_some());
        assert!(d.apply(bad(), 2).1.is_none());
    }

    #[test]
    fn service_endpoints_follow_records_and_skip_own_device() {
        let mut d = Directory::new("farm", 1, "me".parse().unwrap());
        let ty = "_greeter._tcp.local.";
        let g = WorkloadName::try_from("greeter").unwrap();
        assert_eq!(
            d.apply(
                resolved(ty, "greeter-0-http@a", &["10.0.0.5"], 8080, svc("a", 0)),
                1
            )
            .0,
            Change::Service(g.clone())
        );
        // Our own advertisement comes back over multicast: ignored.
        assert_eq!(
            d.apply(
                resolved(ty, "greeter-1-http@me", &["10.0.0.9"], 8080, svc("me", 1)),
                1
            )
            .0,
            Change::None
        );
        let eps = d.endpoints(&g, &[("http".into(), 8080)]);
        let http: Vec<String> = eps["http"].iter().map(|a| a.to_string()).collect();
        assert_eq!(http, ["10.0.0.5:8080", "127.0.0.1:8080"]);
        // Advertised under another type than its TXT says: ignored.
        assert_eq!(
            d.apply(
                resolved("_other._tcp.local.", "x", &["10.0.0.6"], 1, svc("b", 0)),
                1
            )
            .0,
            Change::None
        );
        let gone = MdnsEvent::Removed {
            ty: ty.into(),
            fullname: format!("greeter-0-http@a.{ty}"),
        };
        assert_eq!(d.apply(gone, 2).0, Change::Service(g.clone()));
        assert!(d.endpoints(&g, &[]).is_empty());
    }

    #[test]
    fn peers_of_this_fleet_only() {
        let mut d = Directory::new("farm", 1, "me".parse().unwrap());
        let ad = |dev: &str, fleet: &str| {
            AgentAd {
                protocol: 1,
                fleet: fleet.into(),
                device: dev.parse().unwrap(),
                arch: "aarch64".into(),
                runtimes: vec!["wasm".into()],
                labels: BTreeMap::new(),
            }
            .to_txt()
        };
        let a = discovery::AGENT_SERVICE;
        assert_eq!(
            d.apply(resolved(a, "pi", &["10.0.0.3"], 0, ad("pi", "farm")), 7)
                .0,
            Change::Peers
        );
        assert_eq!(
            d.apply(resolved(a, "me", &["10.0.0.4"], 0, ad("me", "farm")), 7)
                .0,
            Change::None
        );
        assert_eq!(
            d.apply(resolved(a, "lab", &["10.0.0.5"], 0, ad("lab", "lab")), 7)
                .0,
            Change::None
        );
        let peers: Vec<&Peer> = d.peers().collect();
        assert_eq!(peers.len(), 1);
        assert_eq!(
            (peers[0].ad.device.as_str(), peers[0].first_seen_ms),
            ("pi", 7)
        );
    }
}
