//! The embedded MQTT broker (rumqttd), so a single `shoal-hub serve` is a working fleet.
//!
//! rumqttd binds one protocol version per listener, while clients expect one port for both
//! MQTT 3.1.1 and 5. So rumqttd listens on two private loopback ports (v4 and v5) and a small
//! front listener on `--mqtt-listen` reads each connection's CONNECT header, picks the backend
//! by protocol level, and splices the bytes through. That dispatcher is written here because it
//! is a dozen lines of framing that no crate offers on its own.
//!
//! With TLS (the default) the front listener also terminates TLS, requires a client
//! certificate from the fleet CA, and passes every packet the client sends through
//! [`shoal_api::policy::mqtt_guard`], which enforces the fleet's topic ACL; rumqttd then only accepts the
//! private login the guard writes into CONNECT, so nothing reaches it around the front.
//!
//! On both paths, TLS and plain, the front keeps the client's keep-alive in place of rumqttd
//! ([`shoal_api::policy::mqtt_keepalive`]): it accepts keep-alive 0 (rumqttd refuses it), and it cuts
//! a client silent for 1.5 × its keep-alive by closing rumqttd's side without a DISCONNECT,
//! so rumqttd publishes the client's will. Topics starting with `$` need nothing from the
//! front: rumqttd matches them to no filter at all (`rumqttd::protocol::matches`), so no
//! filter starting with a wildcard sees them (MQTT 3.1.1 §4.7.2; a server should keep clients
//! from exchanging messages on `$` topics anyway). tests/tests/mqtt_protocol.rs holds all
//! three to what Debian's mosquitto does.
//!
//! rumqttd has no shutdown API: its threads live for the life of the process (see
//! docs/adr/0001-embedded-broker.md). The front listener does stop on shutdown, which closes
//! the port to new clients.
//!
//! - this file: rumqttd on its two loopback ports, and the front listener's accept loop;
//! - [`front`]: a connection's CONNECT read, its backend picked, the bytes spliced through;
//! - [`guarded`]: the TLS front: the client's certificate, the topic ACL, its budget.

mod front;
mod guarded;

use front::dispatch;
use guarded::dispatch_tls;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the embedded broker: {0}")]
    Start(String),
}

/// Largest CONNECT the TLS front accepts (client id, will, login: small).
const MAX_CONNECT: usize = 64 << 10;

/// Largest MQTT payload the embedded broker accepts (manifests, desired state).
pub const MAX_PAYLOAD: usize = 4 << 20;
const _: () = assert!(shoal_api::policy::mqtt_guard::MAX_PACKET > MAX_PAYLOAD);

/// The running embedded broker.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// The front listener's address (what devices and operators dial).
    pub addr: SocketAddr,
}

/// Starts rumqttd and the front listener on `listen`: TLS with client certificates and the
/// ACL when `tls` is given, plain TCP otherwise (`--insecure`).
pub async fn start(
    listen: SocketAddr,
    security: Option<(Arc<crate::security::Security>, crate::access::VerdictsRx)>,
    gate: Arc<crate::gate::Gate>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<Embedded, BrokerError> {
    let front = TcpListener::bind(listen)
        .await
        .map_err(|source| BrokerError::Listen {
            addr: listen,
            source,
        })?;
    let bound = front.local_addr().map_err(|source| BrokerError::Listen {
        addr: listen,
        source,
    })?;
    let v4 = free_loopback_port()?;
    let v5 = free_loopback_port()?;
    let login = security.as_ref().map(|_| {
        (
            "shoal-front".to_string(),
            hex::encode(rand::random::<[u8; 16]>()),
        )
    });
    let config = rumqttd_config(v4, v5, login.clone());
    let acceptor = security.map(|(sec, verdicts)| {
        (
            tokio_rustls::TlsAcceptor::from(sec.mqtt.clone()),
            sec,
            verdicts,
        )
    });
    // rumqttd's `start` blocks for the life of its servers; give it a thread of its own.
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    wait_for(v4).await?;
    wait_for(v5).await?;
    info!(%bound, tls = acceptor.is_some(), "embedded MQTT broker listening (3.1.1 and 5)");
    let t = tracker.clone();
    let front_login = login;
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = front.accept() => match accepted {
                    Ok((conn, peer)) => {
                        // Past the descriptor budget, closed at once (see crate::gate).
                        let Some(ticket) = gate.enter(crate::gate::MQTT_COST) else {
                            debug!(%peer, "mqtt connection refused: the hub holds as many as it may");
                            continue;
                        };
                        let stop = shutdown.clone();
                        let secure = acceptor.clone().zip(front_login.clone());
                        t.spawn(async move {
                            let evicted = ticket.evicted();
                            let serve = async {
                                match secure {
                                    Some((front, login)) => dispatch_tls(conn, peer, front, &ticket, (v4, v5), login).await,
                                    None => {
                                        ticket.verified(); // --insecure: nobody to tell apart
                                        dispatch(conn, v4, v5).await
                                    }
                                }
                            };
                            tokio::select! {
                                _ = stop.cancelled() => {}
                                _ = evicted.cancelled() => {
                                    debug!(%peer, "mqtt connection closed before it showed a certificate: room for newer ones");
                                }
                                r = serve => if let Err(e) = r {
                                    debug!(%peer, error = %e, "mqtt connection ended");
                                }
                            }
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "mqtt accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    });
    Ok(Embedded { addr: bound })
}

fn free_loopback_port() -> Result<SocketAddr, BrokerError> {
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
    let l =
        std::net::TcpListener::bind(addr).map_err(|source| BrokerError::Listen { addr, source })?;
    l.local_addr()
        .map_err(|source| BrokerError::Listen { addr, source })
}

async fn wait_for(addr: SocketAddr) -> Result<(), BrokerError> {
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(BrokerError::Start(format!(
        "backend listener {addr} did not come up"
    )))
}

fn rumqttd_config(
    v4: SocketAddr,
    v5: SocketAddr,
    login: Option<(String, String)>,
) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PAYLOAD,
        max_inflight_count: 100,
        auth: login.map(|(u, p)| HashMap::from([(u, p)])),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = |name: &str, listen| rumqttd::ServerSettings {
        name: name.to_string(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 20_000,
            max_outgoing_packet_count: 200,
            // Small segments keep the broker's memory bounded under load.
            max_segment_size: 1 << 20,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4".to_string(), server("v4", v4))])),
        v5: Some(HashMap::from([("v5".to_string(), server("v5", v5))])),
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}
