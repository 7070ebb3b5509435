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
//! [`shoal_api::mqtt_guard`], which enforces the fleet's topic ACL; rumqttd then only accepts the
//! private login the guard writes into CONNECT, so nothing reaches it around the front.
//!
//! On both paths, TLS and plain, the front keeps the client's keep-alive in place of rumqttd
//! ([`shoal_api::mqtt_keepalive`]): it accepts keep-alive 0 (rumqttd refuses it), and it cuts
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

use shoal_api::acl::Identity;
use shoal_api::mqtt_guard::{packet_len, packet_len_max, refusal, Guard, Pass};
use shoal_api::mqtt_keepalive::{silence_limit, take_keep_alive, timed_out};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
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
const _: () = assert!(shoal_api::mqtt_guard::MAX_PACKET > MAX_PAYLOAD);

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

/// Reads the CONNECT, takes the client's keep-alive (see [`shoal_api::mqtt_keepalive`]) and
/// splices the connection to the backend of its protocol level.
async fn dispatch(conn: TcpStream, v4: SocketAddr, v5: SocketAddr) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let (mut client_rx, mut client_tx) = conn.into_split();
    let mut buf = Vec::with_capacity(4096);
    let read = read_connect(&mut client_rx, &mut buf);
    let mut connect = match tokio::time::timeout(Duration::from_secs(10), read).await {
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no CONNECT within 10s",
            ))
        }
        Ok(r) => match r? {
            Some(p) => p,
            None => return Ok(()),
        },
    };
    let level = match parse_level(&connect) {
        Parse::Level(l) => l,
        Parse::Invalid(why) => {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why))
        }
        Parse::NeedMore => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "truncated CONNECT",
            ))
        }
    };
    let backend = match level {
        5 => v5,
        3 | 4 => v4,
        other => {
            // CONNACK with return code 1: unacceptable protocol version (3.1.1 framing).
            client_tx.write_all(&[0x20, 0x02, 0x00, 0x01]).await?;
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unsupported MQTT protocol level {other}"),
            ));
        }
    };
    let keep_alive = take_keep_alive(&mut connect).map_err(invalid)?;
    let up = TcpStream::connect(backend).await?;
    up.set_nodelay(true)?;
    let (up_rx, mut up_tx) = up.into_split();
    up_tx.write_all(&connect).await?;
    // Whatever the client sent right after its CONNECT.
    up_tx.write_all(&buf).await?;
    let client = (client_rx, client_tx);
    splice(client, (up_rx, up_tx), silence_limit(keep_alive), level).await
}

/// Reads a client's first packet (CONNECT, which picks the backend by protocol level) and
/// leaves what came after it in `buf`; `None` if the client left first. It must be small:
/// nothing is buffered for long before the client said who it is.
async fn read_connect<R: AsyncRead + Unpin>(
    rx: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        if let Some(n) = packet_len(buf).map_err(invalid)? {
            return Ok(Some(buf.drain(..n).collect()));
        }
        if buf.len() > MAX_CONNECT {
            return Err(invalid(shoal_api::mqtt_guard::Violation::Malformed(
                "CONNECT larger than 64 KiB",
            )));
        }
        let n = rx.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads what a client sends, for at most `silence` (1.5 × its keep-alive) when it has one.
/// Each read counts from when the front starts waiting, so time the front holds a client
/// back (its budget, a busy broker) is never taken for the client's silence.
async fn read_client<R: AsyncRead + Unpin>(
    rx: &mut R,
    buf: &mut [u8],
    silence: Option<Duration>,
) -> Result<usize, Violation> {
    match silence {
        Some(limit) => tokio::time::timeout(limit, rx.read(buf))
            .await
            .map_err(|_| Violation::Silent(limit))?,
        None => rx.read(buf).await,
    }
    .map_err(Violation::Io)
}

/// Says `last` (if anything) to a client that is being cut and closes its side, giving up
/// after a few seconds: a client cut for its silence may not be reading at all.
async fn farewell<W: tokio::io::AsyncWrite + Unpin>(tx: &mut W, last: Option<Vec<u8>>) {
    let bye = async {
        if let Some(p) = last {
            tx.write_all(&p).await?;
        }
        tx.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), bye).await;
}

/// The TLS front: handshake (client certificate required), identity from the certificate,
/// then every client packet through the [`Guard`]; a violation closes the connection with a
/// logged reason (and a "not authorized" CONNACK or MQTT 5 DISCONNECT where the protocol has
/// one).
async fn dispatch_tls(
    conn: TcpStream,
    peer: SocketAddr,
    (acceptor, sec, verdicts): (
        tokio_rustls::TlsAcceptor,
        Arc<crate::security::Security>,
        crate::access::VerdictsRx,
    ),
    ticket: &crate::gate::Ticket,
    (v4, v5): (SocketAddr, SocketAddr),
    login: (String, String),
) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let timeout = |what: &'static str| std::io::Error::new(std::io::ErrorKind::TimedOut, what);
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(conn)).await {
        Err(_) => return Err(timeout("no TLS handshake within 10s")),
        Ok(Err(e)) => {
            warn!(%peer, error = %e, "mqtt client refused: TLS handshake failed (no or untrusted client certificate?)");
            return Err(e);
        }
        Ok(Ok(t)) => t,
    };
    // Who it is, from its certificate and the enrollment book (revoked devices and
    // operators, replaced device keys and unknown operators stay out), and the revocation
    // watch marked seen before the book was read.
    let (admission, fingerprint, verdicts) =
        crate::access::admit_tls(&sec, tls.get_ref().1, verdicts).await;
    let who = match admission {
        crate::access::Admission::In(who) => {
            if !ticket.verified_as(&who) {
                warn!(%peer, identity = %who, "mqtt client refused: this identity holds as many connections as it may");
                return Ok(());
            }
            who
        }
        crate::access::Admission::Out(why) => {
            warn!(%peer, reason = %why, "mqtt client refused");
            return Ok(());
        }
        crate::access::Admission::Anonymous => {
            warn!(%peer, "mqtt client refused: no client certificate");
            return Ok(());
        }
    };
    let (mut client_rx, mut client_tx) = tokio::io::split(tls);
    // The session ends when the book shuts its holder out (a revocation after it connected).
    let shut_out = crate::access::until_shut_out(verdicts, who.clone(), fingerprint);
    let mut guard = Guard::new(who, login);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    // The first packet, CONNECT, must arrive whole within 10 s.
    let read = read_connect(&mut client_rx, &mut buf);
    let first = match tokio::time::timeout(Duration::from_secs(10), read).await {
        Err(_) => return Err(timeout("no CONNECT within 10s")),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(p))) => p,
    };
    let level = match parse_level(&first) {
        Parse::Level(l) => l,
        _ => 4,
    };
    let mut connect = match guard.check(&first) {
        Ok(Pass::Rewritten(c)) => c,
        // A CONNECT is never stripped; the guard rewrites it.
        Ok(Pass::AsIs | Pass::StripRetain) => first,
        Err(v) => {
            warn!(%peer, identity = %guard.identity(), reason = %v, "mqtt client refused at CONNECT");
            if let Some(r) = refusal(None, true, level) {
                let _ = client_tx.write_all(&r).await;
            }
            return Ok(());
        }
    };
    // The guard's CONNECT is well formed: this only fails on a bug.
    let silence = silence_limit(take_keep_alive(&mut connect).map_err(invalid)?);
    let up = TcpStream::connect(if guard.level() == Some(5) { v5 } else { v4 }).await?;
    up.set_nodelay(true)?;
    let (mut up_rx, mut up_tx) = up.into_split();
    up_tx.write_all(&connect).await?;
    let mut chunk = vec![0u8; 16 * 1024];
    let mut budget = (guard.identity() != &Identity::Hub).then(|| Budget::new(Instant::now()));
    let to_broker = async {
        loop {
            while let Some(n) = packet_len_max(&buf, guard.max_packet())? {
                let mut packet: Vec<u8> = buf.drain(..n).collect();
                let pass = guard.check(&packet)?;
                // Over its budget, a client waits (so does everything it sends after).
                if let Some(b) = budget.as_mut() {
                    let wait = b.take(Instant::now(), packet.len());
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
                match pass {
                    Pass::AsIs => up_tx.write_all(&packet).await,
                    Pass::Rewritten(p) => up_tx.write_all(&p).await,
                    Pass::StripRetain => {
                        packet[0] &= !0x01;
                        up_tx.write_all(&packet).await
                    }
                }
                .map_err(Violation::Io)?;
            }
            let n = read_client(&mut client_rx, &mut chunk, silence).await?;
            if n == 0 {
                return Ok::<(), Violation>(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let mut out = vec![0u8; 16 * 1024];
    let to_client = async {
        loop {
            let n = up_rx.read(&mut out).await?;
            quick_ack(up_rx.as_ref());
            if n == 0 {
                return client_tx.shutdown().await;
            }
            client_tx.write_all(&out[..n]).await?;
        }
    };
    let r = tokio::select! {
        r = to_broker => r,
        r = to_client => r.map_err(Violation::Io),
        _ = shut_out => Err(Violation::ShutOut),
    };
    // rumqttd's side closes first, and without a DISCONNECT, so rumqttd publishes the will of
    // a client that left without one, broke the rules or went silent; then the client's.
    drop((up_rx, up_tx));
    let level = guard.level().unwrap_or(level);
    match r {
        Err(Violation::Guard(v)) => {
            warn!(%peer, identity = %guard.identity(), reason = %v, "mqtt client disconnected");
            farewell(&mut client_tx, refusal(Some(level), false, level)).await;
            Ok(())
        }
        Err(Violation::Silent(limit)) => {
            info!(%peer, identity = %guard.identity(), ?limit, "mqtt client disconnected: silent for 1.5 × its keep-alive");
            farewell(&mut client_tx, timed_out(level)).await;
            Ok(())
        }
        Err(Violation::ShutOut) => {
            warn!(%peer, identity = %guard.identity(), "mqtt client disconnected: its certificate was revoked");
            farewell(&mut client_tx, refusal(Some(level), false, level)).await;
            Ok(())
        }
        Err(Violation::Io(e)) => Err(e),
        Ok(()) => Ok(()),
    }
}

fn invalid(v: shoal_api::mqtt_guard::Violation) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, v.to_string())
}

/// How a connection ended badly.
enum Violation {
    Guard(shoal_api::mqtt_guard::Violation),
    /// The client sent nothing for this long: 1.5 × its keep-alive.
    Silent(Duration),
    /// The enrollment book no longer lets the client in (revoked).
    ShutOut,
    Io(std::io::Error),
}

impl From<shoal_api::mqtt_guard::Violation> for Violation {
    fn from(v: shoal_api::mqtt_guard::Violation) -> Self {
        Violation::Guard(v)
    }
}

type Halves = (
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
);

/// Copies both ways until either side closes, or until the client has been silent for
/// `silence`: then rumqttd's side closes at once (no DISCONNECT, so it publishes the will),
/// and the client's after a word to an MQTT 5 client (`level`). rumqttd does not set
/// TCP_NODELAY on the sockets it accepts, so two small packets in a row from the broker (a
/// PUBACK then a PUBLISH) would wait for our delayed ACK (~40 ms, Nagle). Acknowledging at
/// once (TCP_QUICKACK, which Linux resets after each read) on the broker-facing socket
/// removes that stall.
async fn splice(
    client: Halves,
    up: Halves,
    silence: Option<Duration>,
    level: u8,
) -> std::io::Result<()> {
    let ((mut client_rx, mut client_tx), (mut up_rx, mut up_tx)) = (client, up);
    let to_broker = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = read_client(&mut client_rx, &mut buf, silence).await?;
            if n == 0 {
                return up_tx.shutdown().await.map_err(Violation::Io);
            }
            up_tx.write_all(&buf[..n]).await.map_err(Violation::Io)?;
        }
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
    let r = tokio::try_join!(to_broker, async { to_client.await.map_err(Violation::Io) });
    match r {
        Ok(_) => Ok(()),
        Err(Violation::Silent(limit)) => {
            drop((up_rx, up_tx));
            farewell(&mut client_tx, timed_out(level)).await;
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("client silent for {limit:?}, 1.5 × its keep-alive"),
            ))
        }
        Err(Violation::Io(e)) => Err(e),
        Err(Violation::Guard(v)) => Err(invalid(v)),
        // Only TLS connections are watched for revocations.
        Err(Violation::ShutOut) => Ok(()),
    }
}

#[cfg(target_os = "linux")]
fn quick_ack(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_tcp_quickack(true);
}

#[cfg(not(target_os = "linux"))]
fn quick_ack(_: &TcpStream) {}

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

/// What one client (anyone but the hub) may send through the front listener: token buckets
/// of bytes and of packets. Past its budget a client is slowed down, its packets held back,
/// rather than disconnected: a device streaming a large log only takes longer, while one
/// that floods the broker cannot take its memory or the hub's. Pure: the caller passes the
/// time.
#[derive(Debug)]
struct Budget {
    bytes: f64,
    packets: f64,
    last: Instant,
}

/// Sustained bytes per second per client, and the burst.
const BYTES_PER_SEC: f64 = 8.0 * 1024.0 * 1024.0;
const BYTES_BURST: f64 = 64.0 * 1024.0 * 1024.0;
/// Sustained packets per second per client, and the burst.
const PACKETS_PER_SEC: f64 = 500.0;
const PACKETS_BURST: f64 = 5_000.0;

impl Budget {
    fn new(now: Instant) -> Self {
        Budget {
            bytes: BYTES_BURST,
            packets: PACKETS_BURST,
            last: now,
        }
    }

    /// Charges a packet of `len` bytes at `now`; how long the client must wait for it.
    fn take(&mut self, now: Instant, len: usize) -> Duration {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.bytes = (self.bytes + dt * BYTES_PER_SEC).min(BYTES_BURST) - len as f64;
        self.packets = (self.packets + dt * PACKETS_PER_SEC).min(PACKETS_BURST) - 1.0;
        let debt = (-self.bytes / BYTES_PER_SEC).max(-self.packets / PACKETS_PER_SEC);
        Duration::from_secs_f64(debt.max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_past_its_budget_waits_as_long_as_it_overspent() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        // The burst passes at once.
        assert_eq!(b.take(t0, 60 << 20), Duration::ZERO);
        // 8 MiB more than the burst: one second's worth of waiting.
        let wait = b.take(t0, 12 << 20);
        assert!((wait.as_secs_f64() - 1.0).abs() < 0.01, "{wait:?}");
        // Time pays the debt back.
        assert_eq!(b.take(t0 + Duration::from_secs(2), 1024), Duration::ZERO);
        // Packets count too: 5,000 small ones pass, the next waits.
        let mut b = Budget::new(t0);
        for _ in 0..5_000 {
            assert_eq!(b.take(t0, 10), Duration::ZERO);
        }
        assert!(b.take(t0, 10) > Duration::ZERO);
        // A full budget never grows past its burst, however long the client was idle.
        let mut b = Budget::new(t0);
        assert!(b.take(t0 + Duration::from_secs(3600), 65 << 20) > Duration::ZERO);
    }

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
