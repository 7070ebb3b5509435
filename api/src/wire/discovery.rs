//! The mDNS (DNS-SD) contract: service types, instance names and TXT records of what the hub,
//! the agents and exposed workloads advertise on the LAN, plus the pure choice an agent makes
//! among the hubs it sees.
//!
//! | service type | advertised by | SRV port | TXT |
//! |---|---|---|---|
//! | `_shoal-hub._tcp.local.` | the hub | HTTP API | `proto`, `fleet`, `http`, `mqtt`, `ca` |
//! | `_shoal-agent._tcp.local.` | every agent | 0 (no TCP service) | `proto`, `fleet`, `device`, `arch`, `runtimes`, `label:{key}` |
//! | `_{workload}._tcp.local.` | the device running a replica | the port | `proto`, `fleet`, `device`, `workload`, `replica`, `port` |
//!
//! `mqtt` lists broker endpoints separated by commas: a bare port (`1883`) means "on the
//! addresses this service resolved to" (the hub's embedded broker); `mqtt://HOST:PORT` names an
//! external broker. `http` is the HTTP API port on the hub's addresses. `ca` is the SHA-256
//! (hex) of the hub's fleet CA certificate, the hash join tokens pin; hubs from before it
//! (and `--insecure` hubs) leave it out. No I/O here: the adapters in the hub and the agent
//! turn these into mdns-sd calls.
//!
//! mDNS is unauthenticated, so a record only proposes a hub: [`choose_hub`] drops hubs whose
//! `ca` is not the agent's own and ranks the rest; the agent uses a candidate only once it
//! has authenticated it.

use crate::model::ids::{DeviceId, WorkloadName};
use crate::wire::endpoint::BrokerUrl;
use std::collections::BTreeMap;
use std::net::IpAddr;

pub const HUB_SERVICE: &str = "_shoal-hub._tcp.local.";
pub const AGENT_SERVICE: &str = "_shoal-agent._tcp.local.";
/// The fleet a hub or agent belongs to when none is configured.
pub const DEFAULT_FLEET: &str = "default";

/// `_{workload}._tcp.local.`: the service type of a workload's exposed ports.
pub fn workload_service(name: &WorkloadName) -> String {
    format!("_{name}._tcp.local.")
}

/// The workload a service type names, if it is one (`_greeter._tcp.local.` → `greeter`).
pub fn service_workload(ty: &str) -> Option<WorkloadName> {
    let name = ty.strip_prefix('_')?.strip_suffix("._tcp.local.")?;
    WorkloadName::try_from(name).ok()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mdns record {instance:?} ignored: {reason}")]
pub struct DiscoveryError {
    pub instance: String,
    pub reason: String,
}

/// Service names Shoal uses itself; a workload may not take them.
const RESERVED: [&str; 2] = ["shoal-hub", "shoal-agent"];

/// Checks that `name` can be a DNS-SD service name (RFC 6335 §5.1): 1–15 characters of
/// letters, digits and '-', at least one letter, no '-' at either end and no "--"; and that
/// it is not one of Shoal's own.
pub fn check_service_name(name: &str) -> Result<(), String> {
    let why = if name.is_empty() || name.len() > 15 {
        Some(format!(
            "is {} characters; service names are 1-15 (RFC 6335)",
            name.len()
        ))
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        Some("may contain only letters, digits and '-'".to_string())
    } else if !name.bytes().any(|b| b.is_ascii_alphabetic()) {
        Some("needs at least one letter (RFC 6335)".to_string())
    } else if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        Some("may not start or end with '-' or contain \"--\" (RFC 6335)".to_string())
    } else if RESERVED.contains(&name) {
        Some("is reserved for Shoal itself".to_string())
    } else {
        None
    };
    match why {
        Some(w) => Err(format!("service name {name:?} {w}")),
        None => Ok(()),
    }
}

/// Checks a port name (`spec.ports[].name`, and the endpoint file's name): 1–15 characters
/// of `a-z`, `0-9` and `-`, not starting or ending with '-'.
pub fn check_port_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "port name {name:?} is invalid: must be 1-15 characters of a-z, 0-9 and '-', not starting or ending with '-'"
        ))
    }
}

/// `s` as one DNS label (at most 63 bytes, RFC 1035): unchanged when it fits, otherwise a
/// prefix and a hash of the whole, so distinct long names stay distinct.
pub fn dns_label(s: &str) -> String {
    if s.len() <= 63 {
        return s.to_string();
    }
    let mut cut = 50;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(
        "{}~{}",
        &s[..cut],
        &crate::model::ids::Digest::of(s.as_bytes()).hex()[..12]
    )
}

/// The configured fleet (flag or file), or [`DEFAULT_FLEET`], checked.
pub fn fleet_or_default(configured: Option<String>) -> Result<String, String> {
    let fleet = configured.unwrap_or_else(|| DEFAULT_FLEET.to_string());
    check_fleet(&fleet)?;
    Ok(fleet)
}

/// Checks a fleet name: 1–63 characters of `a-z`, `0-9` and `-`.
pub fn check_fleet(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "fleet name {name:?} is invalid: must be 1-63 characters of a-z, 0-9 and '-'"
        ))
    }
}

/// Where the hub's broker is, as advertised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MqttEndpoint {
    /// A port on the addresses the hub's record resolved to.
    Local(u16),
    /// An external broker.
    Remote(BrokerUrl),
}

impl MqttEndpoint {
    /// The broker URL as reached from an agent that resolved the hub to `addr` (a hub's own
    /// broker speaks TLS unless the fleet runs `--insecure`).
    pub fn at(&self, addr: IpAddr, tls: bool) -> BrokerUrl {
        match self {
            MqttEndpoint::Local(port) => BrokerUrl {
                host: addr.to_string(),
                port: *port,
                tls,
            },
            MqttEndpoint::Remote(url) => url.clone(),
        }
    }
}

/// What a hub advertises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubAd {
    pub protocol: u32,
    pub fleet: String,
    pub http_port: u16,
    pub mqtt: Vec<MqttEndpoint>,
    /// SHA-256 (64 lowercase hex digits) of the hub's fleet CA certificate; `None` from
    /// hubs that do not say (older or `--insecure` ones).
    pub ca: Option<String>,
}

/// Whether `s` reads as a SHA-256 in lowercase hex (how CA hashes are written).
fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl HubAd {
    pub fn to_txt(&self) -> Vec<(String, String)> {
        let mqtt: Vec<String> = self
            .mqtt
            .iter()
            .map(|e| match e {
                MqttEndpoint::Local(p) => p.to_string(),
                MqttEndpoint::Remote(u) => u.to_string(),
            })
            .collect();
        let mut txt = vec![
            ("proto".into(), self.protocol.to_string()),
            ("fleet".into(), self.fleet.clone()),
            ("http".into(), self.http_port.to_string()),
            ("mqtt".into(), mqtt.join(",")),
        ];
        if let Some(ca) = &self.ca {
            txt.push(("ca".into(), ca.clone()));
        }
        txt
    }

    /// Reads a hub's TXT record; `instance` names it in errors.
    pub fn from_txt(
        instance: &str,
        txt: &BTreeMap<String, String>,
    ) -> Result<Self, DiscoveryError> {
        let t = Txt { instance, txt };
        let mut mqtt = Vec::new();
        for part in t.get("mqtt")?.split(',').map(str::trim) {
            if part.is_empty() {
                continue;
            }
            match part.parse::<u16>() {
                Ok(port) => mqtt.push(MqttEndpoint::Local(port)),
                Err(_) => mqtt.push(MqttEndpoint::Remote(
                    part.parse().map_err(|e| t.err(format!("mqtt: {e}")))?,
                )),
            }
        }
        if mqtt.is_empty() {
            return Err(t.err("no mqtt endpoint in TXT"));
        }
        let ca = match txt.get("ca") {
            None => None,
            Some(ca) if is_sha256_hex(ca) => Some(ca.clone()),
            Some(ca) => {
                return Err(t.err(format!(
                    "ca {ca:?} is not a SHA-256 in lowercase hex (64 digits)"
                )))
            }
        };
        Ok(Self {
            protocol: t.number("proto")?,
            fleet: t.get("fleet")?.to_string(),
            http_port: t.number("http")?,
            mqtt,
            ca,
        })
    }
}

/// Reads one record's TXT entries; every error names the record.
struct Txt<'a> {
    instance: &'a str,
    txt: &'a BTreeMap<String, String>,
}

impl Txt<'_> {
    fn err(&self, reason: impl Into<String>) -> DiscoveryError {
        DiscoveryError {
            instance: self.instance.to_string(),
            reason: reason.into(),
        }
    }

    fn get(&self, key: &str) -> Result<&str, DiscoveryError> {
        self.txt
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| self.err(format!("no {key} in TXT")))
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<T, DiscoveryError> {
        let v = self.get(key)?;
        v.parse()
            .map_err(|_| self.err(format!("{key} {v:?} is not a valid number")))
    }

    fn parse<T: std::str::FromStr>(&self, key: &str) -> Result<T, DiscoveryError>
    where
        T::Err: std::fmt::Display,
    {
        self.get(key)?
            .parse()
            .map_err(|e: T::Err| self.err(e.to_string()))
    }
}

/// What an agent advertises about its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAd {
    pub protocol: u32,
    pub fleet: String,
    pub device: DeviceId,
    pub arch: String,
    pub runtimes: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// TXT entries are at most 255 bytes (RFC 6763 §6.1); longer labels are left out.
const TXT_MAX: usize = 255;

impl AgentAd {
    pub fn to_txt(&self) -> Vec<(String, String)> {
        let mut txt = vec![
            ("proto".into(), self.protocol.to_string()),
            ("fleet".into(), self.fleet.clone()),
            ("device".into(), self.device.to_string()),
            ("arch".into(), self.arch.clone()),
            ("runtimes".into(), self.runtimes.join(",")),
        ];
        for (k, v) in &self.labels {
            let key = format!("label:{k}");
            if key.len() + 1 + v.len() <= TXT_MAX {
                txt.push((key, v.clone()));
            }
        }
        txt
    }

    pub fn from_txt(
        instance: &str,
        txt: &BTreeMap<String, String>,
    ) -> Result<Self, DiscoveryError> {
        let t = Txt { instance, txt };
        Ok(Self {
            protocol: t.number("proto")?,
            fleet: t.get("fleet").unwrap_or_default().to_string(),
            device: t.parse("device")?,
            arch: t.get("arch").unwrap_or_default().to_string(),
            runtimes: t
                .get("runtimes")
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            labels: txt
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix("label:")?.to_string(), v.clone())))
                .collect(),
        })
    }
}

/// One exposed port of one replica, as advertised by the device running it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAd {
    pub protocol: u32,
    pub fleet: String,
    pub device: DeviceId,
    pub workload: WorkloadName,
    pub replica: u32,
    /// The port's name (`spec.ports[].name`).
    pub port_name: String,
}

impl ServiceAd {
    /// The DNS-SD instance name: unique per replica, port and device (during a move, the same
    /// replica may briefly be advertised by two devices).
    pub fn instance_name(&self) -> String {
        dns_label(&format!(
            "{}-{}-{}@{}",
            self.workload, self.replica, self.port_name, self.device
        ))
    }

    pub fn to_txt(&self) -> Vec<(String, String)> {
        vec![
            ("proto".into(), self.protocol.to_string()),
            ("fleet".into(), self.fleet.clone()),
            ("device".into(), self.device.to_string()),
            ("workload".into(), self.workload.to_string()),
            ("replica".into(), self.replica.to_string()),
            ("port".into(), self.port_name.clone()),
        ]
    }

    pub fn from_txt(
        instance: &str,
        txt: &BTreeMap<String, String>,
    ) -> Result<Self, DiscoveryError> {
        let t = Txt { instance, txt };
        // The port name becomes a file name on the consumer's device: checked like a manifest's.
        let port_name = t.get("port")?;
        check_port_name(port_name).map_err(|e| t.err(e))?;
        Ok(Self {
            protocol: t.number("proto")?,
            fleet: t.get("fleet")?.to_string(),
            device: t.parse("device")?,
            workload: WorkloadName::try_from(t.get("workload")?)
                .map_err(|e| t.err(e.to_string()))?,
            replica: t.number("replica")?,
            port_name: port_name.to_string(),
        })
    }
}

/// A hub as one agent saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenHub {
    /// DNS-SD instance full name (unique on the LAN; the deterministic tie-breaker).
    pub instance: String,
    pub ad: HubAd,
    pub addrs: Vec<IpAddr>,
}

/// The outcome of [`choose_hub`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HubChoice {
    /// The compatible hubs, best first, with the broker and HTTP URLs as reached from here.
    /// More than one is a misconfiguration to report; none of them is trusted before the
    /// agent has authenticated it.
    pub candidates: Vec<SelectedHub>,
    /// Hubs ignored, with the reason (other fleet, other protocol, another fleet CA, no
    /// usable address).
    pub ignored: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedHub {
    pub instance: String,
    pub broker: BrokerUrl,
    pub http: String,
    /// Whether the advert named the agent's fleet CA (`false`: it named none).
    pub pins_ca: bool,
}

/// What an agent asks of a hub before it is a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubWanted<'a> {
    pub fleet: &'a str,
    pub protocol: u32,
    /// The agent speaks TLS to the hub (`mqtts://`, `https://`).
    pub tls: bool,
    /// SHA-256 of the fleet CA the agent trusts (enrolled with, or pinned by its join
    /// token); `None`: no CA (an `--insecure` agent), any advert will do.
    pub ca: Option<&'a str>,
}

/// Ranks the hubs an agent sees: compatible hubs (same fleet, same protocol, the agent's
/// fleet CA or none named, at least one address) are candidates, those naming the agent's CA
/// before those naming none (older hubs), each group by instance name, so that every agent
/// that sees the same hubs ranks them alike. A hub naming another CA is ignored: it is not
/// this agent's hub, whatever fleet it claims. Within a hub, the address is chosen by
/// [`preferred_addr`].
pub fn choose_hub(wanted: &HubWanted<'_>, hubs: &[SeenHub]) -> HubChoice {
    let mut choice = HubChoice::default();
    let mut compatible: Vec<(bool, &SeenHub, IpAddr)> = Vec::new();
    for h in hubs {
        let ca_differs = match (wanted.ca, &h.ad.ca) {
            (Some(own), Some(theirs)) => own != theirs,
            _ => false,
        };
        if h.ad.fleet != wanted.fleet {
            choice
                .ignored
                .push((h.instance.clone(), format!("serves fleet {:?}", h.ad.fleet)));
        } else if h.ad.protocol != wanted.protocol {
            choice.ignored.push((
                h.instance.clone(),
                format!(
                    "speaks protocol {} (this agent: {})",
                    h.ad.protocol, wanted.protocol
                ),
            ));
        } else if ca_differs {
            choice.ignored.push((
                h.instance.clone(),
                format!(
                    "its fleet CA is {:?}, not {:?}, the one this device trusts (a misconfigured or rogue hub)",
                    short_hash(h.ad.ca.as_deref().unwrap_or_default()),
                    short_hash(wanted.ca.unwrap_or_default())
                ),
            ));
        } else if let Some(addr) = preferred_addr(&h.addrs) {
            let pins_ca = wanted.ca.is_some() && h.ad.ca.is_some();
            compatible.push((pins_ca, h, addr));
        } else {
            choice
                .ignored
                .push((h.instance.clone(), "no usable address".into()));
        }
    }
    // Naming the CA first (`true` sorts last, hence the `!`), then by name.
    compatible.sort_by(|a, b| (!a.0, &a.1.instance).cmp(&(!b.0, &b.1.instance)));
    let tls = wanted.tls;
    choice.candidates = compatible
        .into_iter()
        .filter_map(|(pins_ca, h, addr)| {
            let host = match addr {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("[{a}]"),
            };
            h.ad.mqtt.first().map(|m| SelectedHub {
                instance: h.instance.clone(),
                broker: m.at(addr, tls),
                http: format!(
                    "{}://{host}:{}",
                    if tls { "https" } else { "http" },
                    h.ad.http_port
                ),
                pins_ca,
            })
        })
        .collect();
    choice
}

/// The first 12 digits of a hash, for messages.
fn short_hash(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// The address to use among those a record resolved to: IPv4 before IPv6, routable before
/// link-local (an IPv6 link-local address needs a scope this layer does not carry), then the
/// smallest, so the choice is stable.
pub fn preferred_addr(addrs: &[IpAddr]) -> Option<IpAddr> {
    let rank = |a: &IpAddr| match a {
        IpAddr::V4(v) if v.is_link_local() => 1,
        IpAddr::V4(_) => 0,
        IpAddr::V6(v) if v.is_unicast_link_local() => 3,
        IpAddr::V6(_) => 2,
    };
    addrs
        .iter()
        .filter(|a| !matches!(a, IpAddr::V6(v) if v.is_unicast_link_local()))
        .min_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(instance: &str, fleet: &str, addrs: &[&str]) -> SeenHub {
        SeenHub {
            instance: instance.into(),
            ad: HubAd {
                protocol: 1,
                fleet: fleet.into(),
                http_port: 8080,
                mqtt: vec![MqttEndpoint::Local(1883)],
                ca: None,
            },
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn farm(ca: Option<&str>) -> HubWanted<'_> {
        HubWanted {
            fleet: "farm",
            protocol: 1,
            tls: false,
            ca,
        }
    }

    fn names(c: &HubChoice) -> Vec<&str> {
        c.candidates.iter().map(|h| h.instance.as_str()).collect()
    }

    #[test]
    fn hub_txt_round_trips_and_rejects_garbage() {
        let ad = HubAd {
            protocol: 1,
            fleet: "farm".into(),
            http_port: 8080,
            mqtt: vec![
                MqttEndpoint::Local(1883),
                MqttEndpoint::Remote("mqtt://broker.lan:1884".parse().unwrap()),
            ],
            ca: Some("ab".repeat(32)),
        };
        let txt: BTreeMap<_, _> = ad.to_txt().into_iter().collect();
        assert_eq!(HubAd::from_txt("h", &txt).unwrap(), ad);
        let mut bad = txt.clone();
        bad.insert("http".into(), "eighty".into());
        let e = HubAd::from_txt("h", &bad).unwrap_err().to_string();
        assert!(e.contains("\"h\"") && e.contains("\"eighty\""), "{e}");
        let mut bad = txt.clone();
        bad.insert("mqtt".into(), "".into());
        assert!(HubAd::from_txt("h", &bad).is_err());
        // A hub from before the CA hash: still readable, naming no CA.
        let mut old = txt.clone();
        old.remove("ca");
        assert_eq!(HubAd::from_txt("h", &old).unwrap().ca, None);
        for evil in [
            "AB".repeat(32),
            "ab".repeat(31),
            "xy".repeat(32),
            String::new(),
        ] {
            let mut bad = txt.clone();
            bad.insert("ca".into(), evil.clone());
            let e = HubAd::from_txt("h", &bad).unwrap_err().to_string();
            assert!(e.contains(&format!("ca {evil:?}")), "{evil}: {e}");
        }
    }

    #[test]
    fn agent_and_service_txt_round_trip() {
        let ad = AgentAd {
            protocol: 1,
            fleet: "farm".into(),
            device: "pi-1".parse().unwrap(),
            arch: "aarch64".into(),
            runtimes: vec!["wasm".into()],
            labels: [("zone".to_string(), "greenhouse".to_string())].into(),
        };
        let txt: BTreeMap<_, _> = ad.to_txt().into_iter().collect();
        assert_eq!(AgentAd::from_txt("a", &txt).unwrap(), ad);
        let s = ServiceAd {
            protocol: 1,
            fleet: "farm".into(),
            device: "pi-1".parse().unwrap(),
            workload: WorkloadName::try_from("greeter").unwrap(),
            replica: 2,
            port_name: "http".into(),
        };
        let txt: BTreeMap<_, _> = s.to_txt().into_iter().collect();
        assert_eq!(ServiceAd::from_txt("s", &txt).unwrap(), s);
        assert_eq!(s.instance_name(), "greeter-2-http@pi-1");
        // A port name is a file name on the consumer: no paths, no dots.
        for evil in ["/etc/passwd", "..", "a/b", "", "x.y"] {
            let mut bad = txt.clone();
            bad.insert("port".into(), evil.into());
            let e = ServiceAd::from_txt("s", &bad).unwrap_err().to_string();
            assert!(e.contains("port name"), "{evil}: {e}");
        }
        let long = ServiceAd {
            device: "d".repeat(63).parse().unwrap(),
            ..s.clone()
        };
        assert!(long.instance_name().len() <= 63);
        assert_ne!(
            long.instance_name(),
            ServiceAd {
                replica: 3,
                ..long.clone()
            }
            .instance_name()
        );
        assert_eq!(
            service_workload(&workload_service(&s.workload)),
            Some(s.workload)
        );
        assert_eq!(service_workload("_shoal-hub._udp.local."), None);
    }

    #[test]
    fn choice_is_deterministic_and_reports_conflicts() {
        let a = hub("b-hub._shoal-hub._tcp.local.", "farm", &["10.0.0.2"]);
        let b = hub(
            "a-hub._shoal-hub._tcp.local.",
            "farm",
            &["fe80::1", "10.0.0.9", "10.0.0.3"],
        );
        let other = hub("0-hub._shoal-hub._tcp.local.", "lab", &["10.0.0.4"]);
        for order in [
            vec![a.clone(), b.clone(), other.clone()],
            vec![other.clone(), b.clone(), a.clone()],
        ] {
            let c = choose_hub(&farm(None), &order);
            let s = &c.candidates[0];
            assert_eq!(s.instance, b.instance);
            assert_eq!(s.broker.to_string(), "mqtt://10.0.0.3:1883");
            assert_eq!(s.http, "http://10.0.0.3:8080");
            assert_eq!(names(&c), [b.instance.as_str(), a.instance.as_str()]);
            assert_eq!(c.ignored.len(), 1);
            assert!(c.ignored[0].1.contains("\"lab\""));
        }
        let mut old = a.clone();
        old.ad.protocol = 2;
        let c = choose_hub(&farm(None), &[old]);
        assert!(c.candidates.is_empty() && c.ignored[0].1.contains("protocol 2"));
        let c = choose_hub(&farm(None), &[hub("x", "farm", &["fe80::1"])]);
        assert!(c.candidates.is_empty(), "link-local v6 only is unusable");
    }

    #[test]
    fn hubs_of_another_ca_are_ignored_and_unnamed_ones_come_last() {
        let own = "a".repeat(64);
        let other = "b".repeat(64);
        let with = |name: &str, ca: Option<&str>| {
            let mut h = hub(name, "farm", &["10.0.0.2"]);
            h.ad.ca = ca.map(String::from);
            h
        };
        // (agent's CA, hubs seen) → (candidates in order, ignored)
        type Case<'a> = (Option<&'a str>, Vec<SeenHub>, &'a [&'a str], &'a [&'a str]);
        let cases: Vec<Case> = vec![
            // A rogue with its own CA and a smaller name: ignored, whatever it claims.
            (
                Some(&own),
                vec![with("a-rogue", Some(&other)), with("hub", Some(&own))],
                &["hub"],
                &["a-rogue"],
            ),
            // An older hub (no CA named) is a candidate, after those naming ours.
            (
                Some(&own),
                vec![with("a-old", None), with("hub", Some(&own))],
                &["hub", "a-old"],
                &[],
            ),
            (Some(&own), vec![with("a-old", None)], &["a-old"], &[]),
            // Only a foreign CA around: nothing to use.
            (Some(&own), vec![with("x", Some(&other))], &[], &["x"]),
            // An insecure agent trusts no CA: any advert, by name.
            (
                None,
                vec![with("b", Some(&own)), with("a", Some(&other))],
                &["a", "b"],
                &[],
            ),
        ];
        for (i, (ca, hubs, want, ignored)) in cases.into_iter().enumerate() {
            let c = choose_hub(&farm(ca), &hubs);
            assert_eq!(names(&c), want, "case {i}");
            let got: Vec<&str> = c.ignored.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(got, ignored, "case {i}");
            for (_, why) in &c.ignored {
                assert!(
                    why.contains("bbbbbbbbbbbb") && why.contains("rogue"),
                    "{why}"
                );
            }
            for h in &c.candidates {
                let named = hubs
                    .iter()
                    .any(|s| s.instance == h.instance && s.ad.ca.is_some());
                assert_eq!(h.pins_ca, ca.is_some() && named, "case {i}");
            }
        }
    }

    #[test]
    fn service_names_follow_rfc_6335() {
        for ok in ["greeter", "a1", "web-2", "x"] {
            assert!(check_service_name(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("a-long-service-nm", "1-15"),
            ("123", "letter"),
            ("a--b", "--"),
            ("shoal-hub", "reserved"),
            ("", "1-15"),
        ] {
            let e = check_service_name(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        let c = choose_hub(&farm(None), &[hub("x", "farm", &["2001:db8::5"])]);
        let s = &c.candidates[0];
        assert_eq!(s.http, "http://[2001:db8::5]:8080");
        assert_eq!(s.broker.host, "2001:db8::5");
    }
}
