//! The hub's mDNS advert (what agents on the LAN find) and the agents it sees.

use super::*;
use shoal_api::wire::discovery::{self, HubAd, MqttEndpoint};
use shoal_api::wire::endpoint::BrokerUrl;
use shoal_daemon::mdns::{Advert, Discovery, Mdns, MdnsEvent, MdnsOptions};
use std::net::SocketAddr;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Advertises the hub as `_shoal-hub._tcp.local.` and browses for the fleet's agents.
pub(super) async fn advertise(
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

pub(super) async fn stop_mdns(mdns: Option<Mdns>) {
    if let Some(m) = mdns {
        m.stop().await; // goodbye packets: agents learn at once that this hub left
    }
}

/// How agents reach the broker: the embedded one (or an external one on this host) at a port
/// of the addresses they found the hub at; any other external broker by its own address.
pub(super) fn advertised_mqtt(external: Option<&BrokerUrl>, embedded: &BrokerUrl) -> MqttEndpoint {
    match external {
        Some(b) if is_local_host(&b.host) => MqttEndpoint::Local(b.port),
        Some(b) => MqttEndpoint::Remote(b.clone()),
        None => MqttEndpoint::Local(embedded.port),
    }
}

pub(super) fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Loopback, or the wildcard address (a broker bound to it is on this host too).
pub(super) fn is_local_host(host: &str) -> bool {
    is_loopback_host(host)
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified())
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
