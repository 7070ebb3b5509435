//! The embedded MQTT broker (rumqttd), so a single `shoal-hub serve` is a working fleet.
//!
//! rumqttd binds one protocol version per listener, while clients expect one port for both
//! MQTT 3.1.1 and 5. So rumqttd listens on two private loopback ports (v4 and v5) and a small
//! front listener on `--mqtt-listen` reads each connection's CONNECT header, picks the backend
//! by protocol level, and splices the bytes through. That dispatcher is written here because it
//! is a dozen lines of framing that no crate offers on its own.
//!
//! rumqttd has no shutdown API: its threads live for the life of the process (see
//! docs/adr/0001-embedded-broker.md). The front listener does stop on shutdown, which closes
//! the port to new clients.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
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

/// Largest MQTT payload the embedded broker accepts (manifests, desired state).
pub const MAX_PAYLOAD: usize = 4 << 20;

/// Starts rumqttd and the front listener on `listen`. Returns the bound address.
pub async fn start(
    listen: SocketAddr,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<SocketAddr, BrokerError> {
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
    let config = rumqttd_config(v4, v5);
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
    info!(%bound, "embedded MQTT broker listening (3.1.1 and 5)");
    let t = tracker.clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = front.accept() => match accepted {
                    Ok((conn, peer)) => {
                        let stop = shutdown.clone();
                        t.spawn(async move {
                            tokio::select! {
                                _ = stop.cancelled() => {}
                                r = dispatch(conn, v4, v5) => if let Err(e) = r {
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
    Ok(bound)
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

fn rumqttd_config(v4: SocketAddr, v5: SocketAddr) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PAYLOAD,
        max_inflight_count: 100,
        auth: None,
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

/// Reads the CONNECT header and splices the connection to the matching backend.
async fn dispatch(mut conn: TcpStream, v4: SocketAddr, v5: SocketAddr) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let level = tokio::time::timeout(Duration::from_secs(10), protocol_level(&conn))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no CONNECT within 10s")
        })??;
    let backend = match level {
        5 => v5,
        3 | 4 => v4,
        other => {
            // CONNACK with return code 1: unacceptable protocol version (3.1.1 framing).
            conn.write_all(&[0x20, 0x02, 0x00, 0x01]).await?;
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unsupported MQTT protocol level {other}"),
            ));
        }
    };
    let up = TcpStream::connect(backend).await?;
    up.set_nodelay(true)?;
    splice(conn, up).await
}

/// Copies both ways until either side closes. rumqttd does not set TCP_NODELAY on the sockets
/// it accepts, so two small packets in a row from the broker (a PUBACK then a PUBLISH) would
/// wait for our delayed ACK (~40 ms, Nagle). Acknowledging at once (TCP_QUICKACK, which Linux
/// resets after each read) on the broker-facing socket removes that stall.
async fn splice(conn: TcpStream, up: TcpStream) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let (mut client_rx, mut client_tx) = conn.into_split();
    let (mut up_rx, mut up_tx) = up.into_split();
    let to_broker = async {
        tokio::io::copy(&mut client_rx, &mut up_tx).await?;
        up_tx.shutdown().await
    };
    let to_client = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = up_rx.read(&mut buf).await?;
            quick_ack(up_rx.as_ref());
            if n == 0 {
                return client_tx.shutdown().await;
            }
            client_tx.write_all(&buf[..n]).await?;
        }
    };
    tokio::try_join!(to_broker, to_client).map(|_| ())
}

#[cfg(target_os = "linux")]
fn quick_ack(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_tcp_quickack(true);
}

#[cfg(not(target_os = "linux"))]
fn quick_ack(_: &TcpStream) {}

/// Peeks (without consuming) at the CONNECT packet's protocol level byte.
async fn protocol_level(conn: &TcpStream) -> std::io::Result<u8> {
    let mut buf = [0u8; 16];
    loop {
        let n = conn.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        match parse_level(&buf[..n]) {
            Parse::Level(l) => return Ok(l),
            Parse::Invalid(why) => {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
            }
            Parse::NeedMore if n == buf.len() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "oversized header",
                ));
            }
            // Wait for more bytes to arrive; `peek` returns at once when data is buffered.
            Parse::NeedMore => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

#[derive(Debug, PartialEq)]
enum Parse {
    Level(u8),
    NeedMore,
    Invalid(&'static str),
}

fn parse_level(b: &[u8]) -> Parse {
    let Some(&first) = b.first() else {
        return Parse::NeedMore;
    };
    if first != 0x10 {
        return Parse::Invalid("first packet is not CONNECT");
    }
    // Remaining length: 1-4 bytes, 7 bits each, high bit = continuation.
    let mut i = 1;
    loop {
        let Some(&byte) = b.get(i) else {
            return Parse::NeedMore;
        };
        i += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Parse::Invalid("malformed remaining length");
        }
    }
    let Some(name_len) = b
        .get(i..i + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]) as usize)
    else {
        return Parse::NeedMore;
    };
    if name_len > 6 {
        return Parse::Invalid("unknown protocol name");
    }
    match b.get(i + 2 + name_len) {
        Some(&level) => Parse::Level(level),
        None => Parse::NeedMore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_header_table() {
        // 3.1.1: 10 <len> 00 04 'MQTT' 04
        assert_eq!(
            parse_level(&[0x10, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 4]),
            Parse::Level(4)
        );
        assert_eq!(
            parse_level(&[0x10, 0x80, 0x01, 0, 4, b'M', b'Q', b'T', b'T', 5]),
            Parse::Level(5)
        );
        assert_eq!(
            parse_level(&[0x10, 0x10, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3]),
            Parse::Level(3)
        );
        assert_eq!(parse_level(&[0x10, 0x10, 0, 4, b'M']), Parse::NeedMore);
        assert_eq!(parse_level(&[]), Parse::NeedMore);
        assert!(matches!(parse_level(&[0x30, 0]), Parse::Invalid(_)));
        assert!(matches!(
            parse_level(&[0x10, 0x80, 0x80, 0x80, 0x80, 0x01]),
            Parse::Invalid(_)
        ));
    }
}
