//! The mDNS adapter (mdns-sd), shared by the hub and the agent. The only module that names
//! mdns-sd; what is advertised is defined in `shoal_api::wire::discovery`.
//!
//! [`Discovery`] is the seam: [`Mdns`] is the real implementation, [`NoDiscovery`] the one used
//! with `--no-mdns` (it advertises and finds nothing). Browse results arrive as
//! [`MdnsEvent`]s on a bounded channel, so the owner's main loop handles them like any other
//! event.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Which interfaces mDNS uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MdnsOptions {
    /// Interface names; empty: every interface except loopback.
    pub interfaces: Vec<String>,
    /// Also use loopback (single-host development).
    pub loopback: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MdnsError {
    #[error("cannot start mdns: {0}")]
    Start(String),
    #[error("cannot advertise {instance:?} as {ty:?}: {reason}")]
    Advertise {
        ty: String,
        instance: String,
        reason: String,
    },
    #[error("cannot browse for {ty:?}: {reason}")]
    Browse { ty: String, reason: String },
}

/// A service instance to advertise on this host's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    /// `_name._tcp.local.`
    pub ty: String,
    /// Instance name, without the type (dots are escaped).
    pub instance: String,
    pub port: u16,
    pub txt: Vec<(String, String)>,
}

/// A browse result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MdnsEvent {
    /// A service instance was resolved (again: addresses, port or TXT may have changed).
    Resolved(Resolved),
    /// A service instance said goodbye or expired.
    Removed { ty: String, fullname: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub ty: String,
    /// `instance._type._tcp.local.`
    pub fullname: String,
    pub addrs: Vec<IpAddr>,
    pub port: u16,
    pub txt: BTreeMap<String, String>,
}

/// Advertising and browsing, as the hub and the agent use them.
pub trait Discovery: Send + Sync + 'static {
    /// Advertises `ad`; returns its full name (the key for [`Discovery::withdraw`]).
    fn advertise(&self, ad: &Advert) -> Result<String, MdnsError>;
    /// Withdraws an advertisement (a goodbye packet tells browsers at once).
    fn withdraw(&self, fullname: &str);
    /// Browses for `ty` until [`Discovery::stop_browse`] or shutdown; events go to `tx`.
    fn browse(&self, ty: &str, tx: mpsc::Sender<MdnsEvent>) -> Result<(), MdnsError>;
    fn stop_browse(&self, ty: &str);
}

/// mDNS turned off.
pub struct NoDiscovery;

impl Discovery for NoDiscovery {
    fn advertise(&self, ad: &Advert) -> Result<String, MdnsError> {
        Ok(format!("{}.{}", ad.instance, ad.ty))
    }
    fn withdraw(&self, _fullname: &str) {}
    fn browse(&self, _ty: &str, _tx: mpsc::Sender<MdnsEvent>) -> Result<(), MdnsError> {
        Ok(())
    }
    fn stop_browse(&self, _ty: &str) {}
}

/// The real thing: one mdns-sd daemon (it runs its own thread) per process.
pub struct Mdns {
    daemon: mdns_sd::ServiceDaemon,
    /// The host name our records use for their addresses, `{name}.local.`.
    hostname: String,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Mdns {
    /// Starts the daemon on the interfaces `opts` selects. `host_label` becomes this host's
    /// mDNS name (`{host_label}.local.`); make it unique per process on the LAN.
    pub fn start(
        opts: &MdnsOptions,
        host_label: &str,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self, MdnsError> {
        use mdns_sd::IfKind;
        let daemon = mdns_sd::ServiceDaemon::new().map_err(|e| MdnsError::Start(e.to_string()))?;
        let start = |r: mdns_sd::Result<()>| r.map_err(|e| MdnsError::Start(e.to_string()));
        // Selections apply in order; the last one matching an interface wins.
        if opts.interfaces.is_empty() {
            start(daemon.disable_interface(vec![IfKind::LoopbackV4, IfKind::LoopbackV6]))?;
        } else {
            start(daemon.disable_interface(IfKind::All))?;
            start(
                daemon.enable_interface(
                    opts.interfaces
                        .iter()
                        .map(|i| IfKind::Name(i.clone()))
                        .collect::<Vec<_>>(),
                ),
            )?;
        }
        if opts.loopback {
            start(daemon.enable_interface(vec![IfKind::LoopbackV4, IfKind::LoopbackV6]))?;
        }
        Ok(Self {
            daemon,
            hostname: format!("{host_label}.local."),
            tracker,
            shutdown,
        })
    }

    /// Withdraws every advertisement (goodbye packets) and stops the daemon thread.
    pub async fn stop(self) {
        match self.daemon.shutdown() {
            Ok(rx) => {
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(2), rx.recv_async()).await;
            }
            Err(e) => debug!(error = %e, "mdns shutdown"),
        }
    }
}

impl Discovery for Mdns {
    fn advertise(&self, ad: &Advert) -> Result<String, MdnsError> {
        let err = |reason: String| MdnsError::Advertise {
            ty: ad.ty.clone(),
            instance: ad.instance.clone(),
            reason,
        };
        let props: Vec<(&str, &str)> = ad
            .txt
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let no_addrs: &[IpAddr] = &[];
        // Addresses are filled in (and kept current) from the selected interfaces.
        let info = mdns_sd::ServiceInfo::new(
            &ad.ty,
            &ad.instance,
            &self.hostname,
            no_addrs,
            ad.port,
            props.as_slice(),
        )
        .map_err(|e| err(e.to_string()))?
        .enable_addr_auto();
        let fullname = info.get_fullname().to_string();
        self.daemon.register(info).map_err(|e| err(e.to_string()))?;
        Ok(fullname)
    }

    fn withdraw(&self, fullname: &str) {
        if let Err(e) = self.daemon.unregister(fullname) {
            warn!(%fullname, error = %e, "cannot withdraw mdns advertisement");
        }
    }

    fn browse(&self, ty: &str, tx: mpsc::Sender<MdnsEvent>) -> Result<(), MdnsError> {
        let rx = self.daemon.browse(ty).map_err(|e| MdnsError::Browse {
            ty: ty.to_string(),
            reason: e.to_string(),
        })?;
        let shutdown = self.shutdown.clone();
        let ty = ty.to_string();
        self.tracker.spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    ev = rx.recv_async() => ev,
                };
                let out = match ev {
                    Err(_) => {
                        if !shutdown.is_cancelled() {
                            warn!(%ty, "mdns browse ended");
                        }
                        break;
                    }
                    Ok(mdns_sd::ServiceEvent::ServiceResolved(s)) => {
                        let mut addrs: Vec<IpAddr> =
                            s.addresses.iter().map(|a| a.to_ip_addr()).collect();
                        addrs.sort();
                        addrs.dedup();
                        MdnsEvent::Resolved(Resolved {
                            ty: s.ty_domain.clone(),
                            fullname: s.fullname.clone(),
                            addrs,
                            port: s.port,
                            txt: s
                                .txt_properties
                                .iter()
                                .map(|p| (p.key().to_string(), p.val_str().to_string()))
                                .collect(),
                        })
                    }
                    Ok(mdns_sd::ServiceEvent::ServiceRemoved(ty, fullname)) => {
                        MdnsEvent::Removed { ty, fullname }
                    }
                    Ok(mdns_sd::ServiceEvent::SearchStopped(_)) => break,
                    Ok(other) => {
                        debug!(event = ?other, "mdns");
                        continue;
                    }
                };
                if tx.send(out).await.is_err() {
                    break;
                }
            }
        });
        Ok(())
    }

    fn stop_browse(&self, ty: &str) {
        if let Err(e) = self.daemon.stop_browse(ty) {
            debug!(%ty, error = %e, "mdns stop_browse");
        }
    }
}

/// This host's own unicast addresses, every interface, from `/proc/net/fib_trie` (IPv4: its
/// `/32 host LOCAL` entries) and `/proc/net/if_inet6` (IPv6), as the kernel sees them in this
/// process's network namespace. Empty where those files cannot be read (not Linux): the
/// caller then knows no own address. A LAN record naming one of them points at this host.
pub fn host_addrs() -> BTreeSet<IpAddr> {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let mut out = local_v4(&read("/proc/net/fib_trie"));
    out.extend(local_v6(&read("/proc/net/if_inet6")));
    out
}

/// The addresses `fib_trie` marks `/32 host LOCAL` (an address line `|-- a.b.c.d`, then
/// its route lines).
fn local_v4(fib_trie: &str) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    let mut last: Option<IpAddr> = None;
    for line in fib_trie.lines().map(str::trim) {
        if let Some(addr) = line.strip_prefix("|-- ") {
            last = addr.trim().parse().ok();
        } else if line.starts_with("/32 host LOCAL") {
            out.extend(last);
        }
    }
    out
}

/// The addresses in `if_inet6` (32 hex digits first on each line).
fn local_v6(if_inet6: &str) -> BTreeSet<IpAddr> {
    if_inet6
        .lines()
        .filter_map(|l| {
            let hex = l.split_whitespace().next()?;
            let bits = u128::from_str_radix(hex, 16)
                .ok()
                .filter(|_| hex.len() == 32)?;
            Some(IpAddr::V6(bits.into()))
        })
        .collect()
}

/// The mDNS flags of `shoal-hub serve` and `shoal-agent run`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MdnsArgs {
    /// Turn mDNS off: do not advertise, do not browse.
    #[arg(long, env = "SHOAL_NO_MDNS")]
    pub no_mdns: bool,
    /// Use mDNS on these interfaces only (repeat or comma-separate) [default: every interface
    /// except loopback].
    #[arg(long, env = "SHOAL_MDNS_INTERFACE", value_delimiter = ',')]
    pub mdns_interface: Vec<String>,
    /// Also use mDNS on loopback (single-host development).
    #[arg(long, env = "SHOAL_MDNS_LOOPBACK")]
    pub mdns_loopback: bool,
}

/// The mDNS keys of the config files.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MdnsFile {
    /// `false` turns mDNS off.
    pub enabled: Option<bool>,
    pub interfaces: Option<Vec<String>>,
    pub loopback: Option<bool>,
}

impl MdnsArgs {
    /// Merges flags over the file's `[mdns]` table; `None`: mDNS is off.
    pub fn options(&self, file: &MdnsFile) -> Option<MdnsOptions> {
        if self.no_mdns || file.enabled == Some(false) {
            return None;
        }
        Some(MdnsOptions {
            interfaces: if self.mdns_interface.is_empty() {
                file.interfaces.clone().unwrap_or_default()
            } else {
                self.mdns_interface.clone()
            },
            loopback: self.mdns_loopback || file.loopback.unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_addresses_from_proc() {
        let fib = "Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 10.200.1.0/24 2 0 2
           |-- 10.200.1.0
              /24 link UNICAST
           |-- 10.200.1.2
              /32 host LOCAL
Local:
           |-- 10.200.1.2
              /32 host LOCAL
";
        let v4: Vec<String> = local_v4(fib).iter().map(|a| a.to_string()).collect();
        assert_eq!(v4, ["10.200.1.2", "127.0.0.1"]);
        let inet6 = "fe8000000000000000fc00fffe000001 04 40 20 80     eth0
fd000000000000000000000000000002 04 40 00 82     eth0
00000000000000000000000000000001 01 80 10 80       lo
garbage
";
        let v6: Vec<String> = local_v6(inet6).iter().map(|a| a.to_string()).collect();
        assert_eq!(v6, ["::1", "fd00::2", "fe80::fc:ff:fe00:1"]);
        assert!(local_v4("").is_empty() && local_v6("").is_empty());
    }
}
