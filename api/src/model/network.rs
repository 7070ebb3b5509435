//! `spec.network`: the outbound TCP connections a WASM workload may open besides the
//! endpoints of the services it `uses`. Deny by default: with no rules and no `uses`, a guest
//! has no sockets at all.
//!
//! ```yaml
//! network:
//!   allow: ["192.168.1.20:1883", "10.0.0.0/8:443", "[2001:db8::/32]:443", "172.16.0.9"]
//! ```
//!
//! A rule is `ADDR[/PREFIX][:PORT]` (IPv6 in brackets when a port follows); no port means
//! every port. Addresses only: guests get no name lookup (a name would let whoever answers
//! DNS choose what the workload reaches).

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// One allowed destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NetRule {
    /// The network address (host bits zero).
    pub net: IpAddr,
    pub prefix: u8,
    /// `None`: any port.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a network rule: {reason} (expected ADDR[/PREFIX][:PORT], e.g. 10.0.0.0/8:443 or [2001:db8::1]:443)")]
pub struct NetRuleError {
    pub value: String,
    pub reason: String,
}

impl FromStr for NetRule {
    type Err = NetRuleError;
    fn from_str(s: &str) -> Result<Self, NetRuleError> {
        let err = |reason: &str| NetRuleError {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        // Split off the port: `[v6…]:port`, `v4…:port`; a bare IPv6 has no port.
        let (addr, port) = if let Some(rest) = s.strip_prefix('[') {
            let (inside, after) = rest.split_once(']').ok_or_else(|| err("unclosed '['"))?;
            match after {
                "" => (inside, None),
                p => (
                    inside,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| err("expected ':' after ']'"))?,
                    ),
                ),
            }
        } else if s.matches(':').count() == 1 {
            let (a, p) = s.split_once(':').ok_or_else(|| err("bad port"))?;
            (a, Some(p))
        } else {
            (s, None)
        };
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(err("the port must be a number 1-65535")),
                Ok(n) => Some(n),
            },
        };
        let (ip, prefix) = match addr.split_once('/') {
            Some((ip, pre)) => (ip, Some(pre)),
            None => (addr, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| err("not an IP address (names are not allowed)"))?;
        if let IpAddr::V6(v6) = ip {
            if v6.to_ipv4_mapped().is_some() {
                return Err(err("write an IPv4 address as IPv4, not IPv4-mapped IPv6"));
            }
        }
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(err(&format!("the prefix must be 0-{max}"))),
            },
        };
        if mask(ip, prefix) != ip {
            return Err(err(&format!(
                "host bits are set: the network is {}/{prefix}",
                mask(ip, prefix)
            )));
        }
        Ok(NetRule {
            net: ip,
            prefix,
            port,
        })
    }
}

impl TryFrom<String> for NetRule {
    type Error = NetRuleError;
    fn try_from(s: String) -> Result<Self, NetRuleError> {
        s.parse()
    }
}

impl From<NetRule> for String {
    fn from(r: NetRule) -> String {
        r.to_string()
    }
}

impl fmt::Display for NetRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max = if self.net.is_ipv4() { 32 } else { 128 };
        let addr = if self.prefix == max {
            self.net.to_string()
        } else {
            format!("{}/{}", self.net, self.prefix)
        };
        match (self.net, self.port) {
            (_, None) => f.write_str(&addr),
            (IpAddr::V6(_), Some(p)) => write!(f, "[{addr}]:{p}"),
            (IpAddr::V4(_), Some(p)) => write!(f, "{addr}:{p}"),
        }
    }
}

impl NetRule {
    /// Whether the rule's whole network is loopback, unspecified or link-local (then it may
    /// reach those addresses).
    fn within_local(&self) -> bool {
        let ranges: &[(IpAddr, u8)] = &[
            (IpAddr::V4([127, 0, 0, 0].into()), 8),
            (IpAddr::V4([169, 254, 0, 0].into()), 16),
            (IpAddr::V4([0, 0, 0, 0].into()), 32),
            (IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), 128),
            (IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 128),
            (IpAddr::V6([0xfe80, 0, 0, 0, 0, 0, 0, 0].into()), 10),
        ];
        ranges.iter().any(|&(net, prefix)| {
            self.net.is_ipv4() == net.is_ipv4()
                && self.prefix >= prefix
                && mask(self.net, prefix) == net
        })
    }
}

/// Loopback, unspecified and link-local addresses.
fn local_only(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_loopback() || a.is_unspecified() || a.is_link_local(),
        IpAddr::V6(a) => a.is_loopback() || a.is_unspecified() || a.is_unicast_link_local(),
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl NetRule {
    /// Whether a connection to `to` is allowed by this rule. An IPv4-mapped IPv6 address
    /// counts as its IPv4 address. The device's own and local-only addresses (loopback,
    /// unspecified, link-local, e.g. a cloud metadata service at 169.254.169.254) are
    /// reached only through a rule inside those ranges, never through a broad one such as
    /// `0.0.0.0/0`.
    pub fn allows(&self, to: SocketAddr) -> bool {
        let ip = match to.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.port.is_none_or(|p| p == to.port())
            && ip.is_ipv4() == self.net.is_ipv4()
            && mask(ip, self.prefix) == self.net
            && (!local_only(ip) || self.within_local())
    }
}

/// `ip` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) written as the IPv4 address it
/// is, as [`NetRule::allows`] reads destinations.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Whether a workload may be pointed at `ip` because the LAN said so (an address in a
/// service's mDNS record): the filtering of `spec.network.allow` applied to what a broad
/// rule would let through. The address is read canonically ([`canonical_ip`]); local-only
/// addresses (loopback, unspecified, link-local) and the device's own addresses (`own`)
/// are refused, since anyone on the LAN can advertise them, except with `local` (mDNS runs
/// on loopback: every record comes from this machine), which lets loopback and own
/// addresses through but still no link-local or unspecified one.
pub fn lan_endpoint_allowed(ip: IpAddr, own: &BTreeSet<IpAddr>, local: bool) -> bool {
    let ip = canonical_ip(ip);
    let link_local = match ip {
        IpAddr::V4(a) => a.is_link_local() || a.is_unspecified(),
        IpAddr::V6(a) => a.is_unicast_link_local() || a.is_unspecified(),
    };
    if link_local {
        return false;
    }
    local || !(local_only(ip) || own.contains(&ip))
}

/// Validates `spec.network.allow`, pushing one error per bad rule.
pub fn validate(allow: Vec<String>, errs: &mut Vec<String>) -> Vec<NetRule> {
    let mut out: Vec<NetRule> = Vec::new();
    for (i, r) in allow.into_iter().enumerate() {
        match r.parse::<NetRule>() {
            Ok(rule) if !out.contains(&rule) => out.push(rule),
            Ok(_) => {}
            Err(e) => errs.push(format!("spec.network.allow[{i}]: {e}")),
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_endpoints_are_filtered_like_allow_rules() {
        let own: BTreeSet<IpAddr> = ["10.0.0.2", "2001:db8::2"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        // (address, allowed from the LAN, allowed with mDNS on loopback)
        let cases = [
            ("10.0.0.5", true, true),
            ("2001:db8::5", true, true),
            ("::ffff:10.0.0.5", true, true),
            // The device's own addresses, in any spelling.
            ("10.0.0.2", false, true),
            ("::ffff:10.0.0.2", false, true),
            ("2001:db8::2", false, true),
            // Loopback.
            ("127.0.0.1", false, true),
            ("127.8.9.10", false, true),
            ("::1", false, true),
            ("::ffff:127.0.0.1", false, true),
            // Link-local and unspecified: never.
            ("169.254.169.254", false, false),
            ("::ffff:169.254.169.254", false, false),
            ("fe80::1", false, false),
            ("0.0.0.0", false, false),
            ("::", false, false),
        ];
        for (addr, lan, local) in cases {
            let ip: IpAddr = addr.parse().unwrap();
            assert_eq!(lan_endpoint_allowed(ip, &own, false), lan, "{addr}");
            assert_eq!(
                lan_endpoint_allowed(ip, &own, true),
                local,
                "{addr} (local)"
            );
        }
        assert_eq!(
            canonical_ip("::ffff:10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            canonical_ip("2001:db8::1".parse().unwrap()),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn rules_parse_print_and_match() {
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, bool)]);
        let cases: &[Case] = &[
            (
                "192.168.1.20:1883",
                "192.168.1.20:1883",
                &[
                    ("192.168.1.20:1883", true),
                    ("192.168.1.20:1884", false),
                    ("192.168.1.21:1883", false),
                ],
            ),
            (
                "10.0.0.0/8:443",
                "10.0.0.0/8:443",
                &[
                    ("10.200.3.4:443", true),
                    ("11.0.0.1:443", false),
                    ("10.0.0.1:80", false),
                ],
            ),
            (
                "172.16.0.9",
                "172.16.0.9",
                &[("172.16.0.9:1", true), ("172.16.0.9:65535", true)],
            ),
            (
                "[2001:db8::/32]:443",
                "[2001:db8::/32]:443",
                &[("[2001:db8:1::5]:443", true), ("[2001:db9::5]:443", false)],
            ),
            ("2001:db8::1", "2001:db8::1", &[("[2001:db8::1]:22", true)]),
            (
                "0.0.0.0/0:53",
                "0.0.0.0/0:53",
                &[
                    ("8.8.8.8:53", true),
                    ("[::ffff:8.8.8.8]:53", true),
                    ("[2001:db8::1]:53", false),
                    ("127.0.0.1:53", false),
                    ("169.254.169.254:53", false),
                ],
            ),
            (
                "::/0",
                "::/0",
                &[
                    ("[2001:db8::1]:1", true),
                    ("[::1]:1", false),
                    ("[fe80::1]:1", false),
                ],
            ),
            (
                "127.0.0.1:8080",
                "127.0.0.1:8080",
                &[("127.0.0.1:8080", true)],
            ),
        ];
        for (text, shown, probes) in cases {
            let r: NetRule = text.parse().unwrap();
            assert_eq!(&r.to_string(), shown);
            assert_eq!(r.to_string().parse::<NetRule>().unwrap(), r);
            for (to, want) in *probes {
                assert_eq!(r.allows(to.parse().unwrap()), *want, "{text} → {to}");
            }
        }
        for (bad, why) in [
            ("example.com:443", "names are not allowed"),
            ("10.0.0.1/8", "host bits"),
            ("10.0.0.0/33", "prefix"),
            ("10.0.0.1:0", "port"),
            ("10.0.0.1:http", "port"),
            ("[2001:db8::1:443", "unclosed"),
            ("::ffff:10.0.0.1", "IPv4-mapped"),
            ("", "not an IP"),
        ] {
            let e = bad.parse::<NetRule>().unwrap_err().to_string();
            assert!(
                e.contains(why) && e.contains(&format!("{bad:?}")),
                "{bad}: {e}"
            );
        }
        let mut errs = Vec::new();
        let rules = validate(
            vec!["10.0.0.1".into(), "bad".into(), "10.0.0.1".into()],
            &mut errs,
        );
        assert_eq!(rules.len(), 1);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("spec.network.allow[1]: \"bad\""),
            "{errs:?}"
        );
    }
}
