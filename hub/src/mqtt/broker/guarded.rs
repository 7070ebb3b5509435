//! The TLS front: a client certificate from the fleet CA required, the identity it names,
//! every packet through the topic ACL ([`shoal_api::policy::mqtt_guard`]), revocations watched, and
//! a budget per client.

use super::front::{
    farewell, invalid, parse_level, quick_ack, read_client, read_connect, Parse, Violation,
};
use shoal_api::policy::acl::Identity;
use shoal_api::policy::mqtt_guard::{packet_len_max, refusal, Guard, Pass};
use shoal_api::policy::mqtt_keepalive::{silence_limit, take_keep_alive, timed_out};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

/// The TLS front: handshake (client certificate required), identity from the certificate,
/// then every client packet through the [`Guard`]; a violation closes the connection with a
/// logged reason (and a "not authorized" CONNACK or MQTT 5 DISCONNECT where the protocol has
/// one).
pub(super) async fn dispatch_tls(
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
}
