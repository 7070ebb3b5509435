//! What this agent knows about the LAN, from mDNS: hubs, peer devices and the endpoints of
//! exposed workloads. Pure state fed with [`MdnsEvent`]s; the agent's main loop owns it and
//! acts on the [`Change`] each event returns (look at the hubs again, rewrite endpoint
//! files). Which hub the agent then uses is [`hub_link`]'s decision.
//!
//! Nothing from mDNS is authenticated, so what a record may do is bounded here: hubs naming
//! another fleet CA are ignored ([`choose_hub`]); service endpoints are filtered like
//! `spec.network.allow` ([`shoal_api::model::network::lan_endpoint_allowed`]: no link-local, no
//! loopback and none of this device's own addresses unless mDNS itself runs on loopback,
//! IPv4-mapped IPv6 read as IPv4).

pub mod hub_link;

use shoal_api::model::ids::{DeviceId, WorkloadName};
use shoal_api::model::network::{canonical_ip, lan_endpoint_allowed};
use shoal_api::wire::discovery::{
    self, choose_hub, preferred_addr, AgentAd, HubAd, HubChoice, HubWanted, SeenHub, ServiceAd,
};
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
    /// The record's addresses, canonical ([`canonical_ip`]), without those no record may
    /// name; this device's own addresses are left out when endpoints are read, as they may
    /// change.
    pub addrs: Vec<IpAddr>,
    pub port: u16,
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
    /// SHA-256 of the fleet CA this agent trusts; hubs naming another are ignored.
    ca: Option<String>,
    /// This device's own addresses: no service endpoint may point at them.
    own_addrs: BTreeSet<IpAddr>,
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
            ca: None,
            own_addrs: BTreeSet::new(),
        }
    }

    /// Trust hubs of the fleet CA with this SHA-256 only (the one enrolled with, or the one
    /// a join token pins).
    pub fn with_ca(mut self, ca: Option<String>) -> Self {
        self.ca = ca;
        self
    }

    /// This device's addresses (they change: DHCP, interfaces coming and going); returns
    /// whether they did, and so whether service endpoints may have.
    pub fn set_own_addrs(&mut self, addrs: BTreeSet<IpAddr>) -> bool {
        let addrs: BTreeSet<IpAddr> = addrs.into_iter().map(canonical_ip).collect();
        let changed = addrs != self.own_addrs;
        self.own_addrs = addrs;
        changed
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
        for a in &mut r.addrs {
            *a = canonical_ip(*a);
        }
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
                let mut addrs: Vec<IpAddr> = r
                    .addrs
                    .iter()
                    .map(|a| canonical_ip(*a))
                    .filter(|a| lan_endpoint_allowed(*a, &BTreeSet::new(), self.allow_loopback))
                    .collect();
                addrs.sort();
                addrs.dedup();
                if ad.fleet != self.fleet
                    || ad.device == self.own
                    || discovery::workload_service(&ad.workload) != r.ty
                {
                    return Change::None;
                }
                if addrs.is_empty() {
                    // Nowhere a workload may be sent: not an endpoint (any more).
                    let eps = self.services.get_mut(&ad.workload);
                    return match eps.and_then(|e| e.remove(&r.fullname)) {
                        Some(_) => Change::Service(ad.workload),
                        None => Change::None,
                    };
                }
                let ep = Endpoint {
                    device: ad.device,
                    replica: ad.replica,
                    port_name: ad.port_name,
                    addrs,
                    port: r.port,
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

    /// The candidate hubs, best first, and those ignored (see [`choose_hub`]).
    pub fn hub_choice(&self) -> HubChoice {
        let hubs: Vec<SeenHub> = self.hubs.values().map(|h| h.hub.clone()).collect();
        let wanted = HubWanted {
            fleet: &self.fleet,
            protocol: self.protocol,
            tls: self.tls,
            ca: self.ca.as_deref(),
        };
        choose_hub(&wanted, &hubs)
    }

    pub fn hubs(&self) -> impl Iterator<Item = &HubEntry> {
        self.hubs.values()
    }

    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    /// Current endpoints of `service`, by port name: the remote ones from mDNS (at the
    /// preferred of their addresses that is not this device's own) plus `local` (this
    /// device's running replicas of it, reached on loopback). Sorted, no duplicates.
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
            let usable: Vec<IpAddr> = ep
                .addrs
                .iter()
                .copied()
                .filter(|a| lan_endpoint_allowed(*a, &self.own_addrs, self.allow_loopback))
                .collect();
            if let Some(addr) = preferred_addr(&usable) {
                out.entry(ep.port_name.clone())
                    .or_default()
                    .insert(SocketAddr::new(addr, ep.port));
            }
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
        hub_of(fleet, None)
    }

    fn hub_of(fleet: &str, ca: Option<&str>) -> Vec<(String, String)> {
        HubAd {
            protocol: 1,
            fleet: fleet.into(),
            http_port: 8080,
            mqtt: vec![discovery::MqttEndpoint::Local(1883)],
            ca: ca.map(String::from),
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
            d.hub_choice().candidates[0].broker.to_string(),
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
            d.hub_choice().candidates[0].broker.to_string(),
            "mqtts://10.0.0.7:1883"
        );
        assert_eq!(d.hubs().next().unwrap().first_seen_ms, 1);
        // Another fleet's hub is seen but never chosen.
        d.apply(resolved(h, "lab-x", &["10.0.0.2"], 8080, hub("lab")), 4);
        let c = d.hub_choice();
        assert!(c.candidates[0].instance.starts_with("farm-a") && c.ignored.len() == 1);
        let gone = MdnsEvent::Removed {
            ty: h.into(),
            fullname: format!("farm-a.{h}"),
        };
        assert_eq!(d.apply(gone, 5).0, Change::Hubs);
        assert!(d.hub_choice().candidates.is_empty());
    }

    #[test]
    fn loopback_addresses_from_the_lan_are_not_believed() {
        let mut d = Directory::new("farm", 1, "me".parse().unwrap());
        let h = discovery::HUB_SERVICE;
        d.apply(resolved(h, "farm-a", &["127.0.0.1"], 8080, hub("farm")), 1);
        assert!(d.hub_choice().candidates.is_empty());
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
        assert!(!d.hub_choice().candidates.is_empty());
    }

    #[test]
    fn hubs_of_another_fleet_ca_are_not_candidates() {
        let own = "a".repeat(64);
        let other = "b".repeat(64);
        let h = discovery::HUB_SERVICE;
        let mut d = Directory::new("farm", 1, "me".parse().unwrap()).with_ca(Some(own.clone()));
        d.apply(
            resolved(
                h,
                "farm-a-rogue",
                &["10.0.0.3"],
                8080,
                hub_of("farm", Some(&other)),
            ),
            1,
        );
        d.apply(
            resolved(
                h,
                "farm-hub-a",
                &["10.0.0.1"],
                8080,
                hub_of("farm", Some(&own)),
            ),
            1,
        );
        d.apply(
            resolved(h, "farm-0-old", &["10.0.0.2"], 8080, hub("farm")),
            1,
        );
        let c = d.hub_choice();
        let names: Vec<&str> = c.candidates.iter().map(|h| h.instance.as_str()).collect();
        assert_eq!(
            names,
            [
                "farm-hub-a._shoal-hub._tcp.local.",
                "farm-0-old._shoal-hub._tcp.local."
            ]
        );
        assert_eq!(c.ignored.len(), 1);
        assert!(c.ignored[0].0.starts_with("farm-a-rogue"), "{c:?}");
    }

    #[test]
    fn service_endpoints_are_filtered_like_network_rules() {
        let ty = "_greeter._tcp.local.";
        let g = WorkloadName::try_from("greeter").unwrap();
        let own: BTreeSet<IpAddr> = ["10.0.0.9".parse().unwrap()].into();
        // (record's addresses, endpoint seen from the LAN, seen with mDNS on loopback)
        let cases: &[(&[&str], Option<&str>, Option<&str>)] = &[
            (&["10.0.0.5"], Some("10.0.0.5:7000"), Some("10.0.0.5:7000")),
            // IPv4-mapped IPv6 is read as IPv4.
            (
                &["::ffff:10.0.0.5"],
                Some("10.0.0.5:7000"),
                Some("10.0.0.5:7000"),
            ),
            // Link-local: never; another address of the record is used instead.
            (&["169.254.169.254"], None, None),
            (&["fe80::1"], None, None),
            (
                &["169.254.1.1", "10.0.0.5"],
                Some("10.0.0.5:7000"),
                Some("10.0.0.5:7000"),
            ),
            // This device's own address, however written: only over loopback mDNS.
            (&["10.0.0.9"], None, Some("10.0.0.9:7000")),
            (&["::ffff:10.0.0.9"], None, Some("10.0.0.9:7000")),
            (
                &["10.0.0.9", "2001:db8::5"],
                Some("[2001:db8::5]:7000"),
                Some("10.0.0.9:7000"),
            ),
            (&["::ffff:127.0.0.1"], None, Some("127.0.0.1:7000")),
            (&["0.0.0.0"], None, None),
        ];
        for (addrs, lan, local) in cases {
            for (loopback, want) in [(false, lan), (true, local)] {
                let mut d =
                    Directory::new("farm", 1, "me".parse().unwrap()).with_loopback(loopback);
                assert!(d.set_own_addrs(own.clone()));
                assert!(!d.set_own_addrs(own.clone()));
                d.apply(
                    resolved(ty, "greeter-0-http@a", addrs, 7000, svc("a", 0)),
                    1,
                );
                let got: Vec<String> = d
                    .endpoints(&g, &[])
                    .get("http")
                    .into_iter()
                    .flatten()
                    .map(|a| a.to_string())
                    .collect();
                let want: Vec<String> = want.iter().map(|w| w.to_string()).collect();
                assert_eq!(got, want, "{addrs:?} loopback={loopback}");
            }
        }
        // A record that moves to addresses no workload may be sent to is no endpoint.
        let mut d = Directory::new("farm", 1, "me".parse().unwrap());
        d.apply(
            resolved(ty, "greeter-0-http@a", &["10.0.0.5"], 7000, svc("a", 0)),
            1,
        );
        assert_eq!(
            d.apply(
                resolved(ty, "greeter-0-http@a", &["fe80::5"], 7000, svc("a", 0)),
                2
            )
            .0,
            Change::Service(g.clone())
        );
        assert!(d.endpoints(&g, &[]).is_empty());
        // The device's addresses change: endpoints follow.
        let mut d = Directory::new("farm", 1, "me".parse().unwrap());
        d.apply(
            resolved(ty, "greeter-0-http@a", &["10.0.0.5"], 7000, svc("a", 0)),
            1,
        );
        assert_eq!(d.endpoints(&g, &[]).len(), 1);
        assert!(d.set_own_addrs(["10.0.0.5".parse().unwrap()].into()));
        assert!(d.endpoints(&g, &[]).is_empty());
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
