//! The front listener's framing: a client's CONNECT read (it picks the backend by protocol
//! level), the client's keep-alive taken over, and the bytes spliced both ways. Written
//! here because it is a few dozen lines of framing that no crate offers on its own.

use super::MAX_CONNECT;
use shoal_api::policy::mqtt_guard::packet_len;
use shoal_api::policy::mqtt_keepalive::{silence_limit, take_keep_alive, timed_out};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads the CONNECT, takes the client's keep-alive (see [`shoal_api::policy::mqtt_keepalive`]) and
/// splices the connection to the backend of its protocol level.
pub(super) async fn dispatch(
    conn: TcpStream,
    v4: SocketAddr,
    v5: SocketAddr,
) -> std::io::Result<()> {
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
pub(super) async fn read_connect<R: AsyncRead + Unpin>(
    rx: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        if let Some(n) = packet_len(buf).map_err(invalid)? {
            return Ok(Some(buf.drain(..n).collect()));
        }
        if buf.len() > MAX_CONNECT {
            return Err(invalid(
                shoal_api::policy::mqtt_guard::Violation::Malformed("CONNECT larger than 64 KiB"),
            ));
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
pub(super) async fn read_client<R: AsyncRead + Unpin>(
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
pub(super) async fn farewell<W: tokio::io::AsyncWrite + Unpin>(tx: &mut W, last: Option<Vec<u8>>) {
    let bye = async {
        if let Some(p) = last {
            tx.write_all(&p).await?;
        }
        tx.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), bye).await;
}

pub(super) fn invalid(v: shoal_api::policy::mqtt_guard::Violation) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, v.to_string())
}

/// How a connection ended badly.
pub(super) enum Violation {
    Guard(shoal_api::policy::mqtt_guard::Violation),
    /// The client sent nothing for this long: 1.5 × its keep-alive.
    Silent(Duration),
    /// The enrollment book no longer lets the client in (revoked).
    ShutOut,
    Io(std::io::Error),
}

impl From<shoal_api::policy::mqtt_guard::Violation> for Violation {
    fn from(v: shoal_api::policy::mqtt_guard::Violation) -> Self {
        Violation::Guard(v)
    }
}

pub(super) type Halves = (
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
pub(super) async fn splice(
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
pub(super) fn quick_ack(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_tcp_quickack(true);
}

#[cfg(not(target_os = "linux"))]
pub(super) fn quick_ack(_: &TcpStream) {}

#[derive(Debug, PartialEq)]
pub(super) enum Parse {
    Level(u8),
    NeedMore,
    Invalid(&'static str),
}

pub(super) fn parse_level(b: &[u8]) -> Parse {
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
