//! The device's identity: enrollment with a join token, the TLS configuration every
//! connection to the hub uses, and certificate renewal.
//!
//! Enrollment (once, `--join-token`): fetch `GET /v1/ca` without trusting anything yet,
//! check that its SHA-256 is the one the token pins (as K3s does with its tokens), then —
//! now verifying the hub against that CA — send the token with a CSR for a key generated
//! here. The key never leaves the device. The credentials land in `DATA_DIR/pki/` (see
//! [`DeviceCredentials`]); later starts use them without a token.
//!
//! Enrolling at a hub found over mDNS, the agent tries the candidates in turn: one that
//! serves another CA, or cannot be reached over TLS with the pinned one, is skipped
//! ([`EnrollError::is_wrong_hub`]); a refusal from the right hub (token used, expired) ends
//! the attempt as before.
//!
//! Renewal: once the certificate is past two thirds of its lifetime, `POST /v1/renew` with a
//! CSR for the same key, authenticated by the current certificate; the new certificate is
//! saved (one atomic rename) and presented from the next handshake on
//! ([`ClientIdentity::replace`]). Renewal goes to the hub the agent last authenticated
//! (`--hub`, or the one [`authenticate`] accepted), never to whatever mDNS shows.
//!
//! [`authenticate`]: a TLS handshake with each endpoint of a candidate hub (its HTTP API
//! as `shoal-hub-api`, its broker as `shoal-hub` or `shoal-broker`, both from this device's
//! fleet CA) before the agent uses it; nothing is sent over them.

use shoal_api::model::ids::DeviceId;
use shoal_api::wire::views::{EnrollRequest, Enrolled, RenewRequest};
use shoal_pki::device::{key_and_csr, DeviceCredentials};
use shoal_pki::sign::HubKey;
use shoal_pki::tls::{self, ClientIdentity};
use shoal_pki::token::JoinToken;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("this device has no fleet certificate in {dir:?}: start it once with --join-token TOKEN (from `shoal-hub token create`), or --insecure for a hub run with --insecure")]
    NotEnrolled { dir: String },
    #[error("enrollment needs the hub's address: give --hub https://HOST:PORT")]
    NoHub,
    #[error("the credentials in {dir:?} are for {found:?}, not for device {device:?}")]
    OtherDevice {
        dir: String,
        found: String,
        device: String,
    },
    #[error("the hub at {url} serves a fleet CA with SHA-256 {actual}, but the join token pins {pinned}: not the hub the token was made for")]
    WrongCa {
        url: String,
        actual: String,
        pinned: String,
    },
    #[error("enrollment at {url} failed: {reason}")]
    Http { url: String, reason: HttpError },
    #[error(
        "enrollment at {url} failed: cannot reach the hub over TLS with the fleet CA: {}",
        crate::with_causes(.reason)
    )]
    Unreachable { url: String, reason: reqwest::Error },
    #[error("hub endpoint {url} not authenticated: {reason}")]
    Unauthenticated { url: String, reason: HandshakeError },
    #[error(transparent)]
    Pki(#[from] shoal_pki::PkiError),
}

/// Why a request to the hub got no answer the agent can use.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The HTTPS client cannot be built.
    #[error("{0}")]
    Client(reqwest::Error),
    /// The request did not get through (the message says why, down to the TLS error).
    #[error("{}", crate::with_causes(.0))]
    Send(reqwest::Error),
    /// The answer is an error status, or its body cannot be read.
    #[error("{0}")]
    Answer(reqwest::Error),
    /// The hub refused, saying why.
    #[error("{status}: {message}")]
    Refused {
        status: reqwest::StatusCode,
        message: String,
    },
    /// The hub refused without saying why.
    #[error("{0}")]
    Status(reqwest::StatusCode),
}

/// Why an endpoint of a candidate hub is not authenticated: its URL, or the TLS handshake
/// with it.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("not a URL: {0}")]
    Url(String),
    #[error("no host in the URL")]
    NoHost,
    #[error("no port in the URL")]
    NoPort,
    #[error("plain MQTT: this agent speaks TLS only")]
    PlainMqtt,
    #[error("cannot resolve {host:?}: {error}")]
    Resolve { host: String, error: std::io::Error },
    #[error("{host:?} has no address")]
    NoAddress { host: String },
    #[error("cannot connect to {addr}: {error}")]
    Connect {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("TLS with {addr}: {error}")]
    Io {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("TLS with {addr}: no handshake within {PROBE_TIMEOUT:?}")]
    Timeout { addr: std::net::SocketAddr },
    #[error("{0}")]
    Name(rustls::pki_types::InvalidDnsNameError),
    #[error("{0}")]
    Tls(rustls::Error),
    #[error("probe task failed: {0}")]
    Task(tokio::task::JoinError),
}

impl EnrollError {
    /// Whether the hub tried is not the fleet's (another CA, or not reachable with the
    /// pinned one), so that another candidate may be: not an answer from the right hub.
    pub fn is_wrong_hub(&self) -> bool {
        matches!(
            self,
            EnrollError::WrongCa { .. }
                | EnrollError::Unreachable { .. }
                | EnrollError::Unauthenticated { .. }
        )
    }
}

/// What the agent's connections to the hub use.
#[derive(Clone, Debug)]
pub struct Identity {
    /// HTTPS to the hub (enrollment, renewal, module downloads): the hub only.
    pub client: Arc<rustls::ClientConfig>,
    /// MQTT: the hub's embedded broker, or an external broker of the fleet.
    pub mqtt: Arc<rustls::ClientConfig>,
    pub cert: Arc<ClientIdentity>,
    pub hub_key: HubKey,
    pub dir: PathBuf,
    /// SHA-256 (hex) of the fleet CA this device enrolled with: hubs advertising another
    /// are not this device's.
    pub ca_hash: String,
}

pub fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki")
}

/// The device's credentials: those saved, else enrolled now with `token` at `hub`.
pub async fn identity(
    data_dir: &Path,
    device: &DeviceId,
    token: Option<&JoinToken>,
    hub: Option<&str>,
) -> Result<Identity, EnrollError> {
    let dir = pki_dir(data_dir);
    let creds = match DeviceCredentials::load(&dir)? {
        Some(c) => {
            if token.is_some() {
                info!("already enrolled; --join-token is not needed any more and was not used");
            }
            c
        }
        None => {
            let token = token.ok_or_else(|| EnrollError::NotEnrolled {
                dir: dir.display().to_string(),
            })?;
            let hub = hub.ok_or(EnrollError::NoHub)?;
            let c = enroll(hub, device, token).await?;
            c.save(&dir)?;
            info!(hub, "enrolled: device certificate saved");
            c
        }
    };
    let found = creds.name().unwrap_or_default();
    if found != device.as_str() {
        return Err(EnrollError::OtherDevice {
            dir: dir.display().to_string(),
            found,
            device: device.to_string(),
        });
    }
    let cert = ClientIdentity::new(&creds.cert_pem, &creds.key_pem)?;
    let ca_hash = shoal_pki::ca::hash_of_pem(&creds.ca_pem, &dir.display().to_string())?;
    Ok(Identity {
        client: tls::client_config(&creds.ca_pem, Some(cert.clone()))?,
        mqtt: tls::mqtt_client_config(&creds.ca_pem, Some(cert.clone()))?,
        hub_key: creds.hub_key()?,
        cert,
        dir,
        ca_hash,
    })
}

fn client(tls: Arc<rustls::ClientConfig>) -> Result<reqwest::Client, HttpError> {
    crate::http_client(
        reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30)),
    )
    .map_err(HttpError::Client)
}

async fn enroll(
    hub: &str,
    device: &DeviceId,
    token: &JoinToken,
) -> Result<DeviceCredentials, EnrollError> {
    let hub = hub.trim_end_matches('/');
    let http = |reason: HttpError| EnrollError::Http {
        url: hub.to_string(),
        reason,
    };
    let unreachable = |reason: reqwest::Error| EnrollError::Unreachable {
        url: hub.to_string(),
        reason,
    };
    let unverified = client(tls::unverified_client_config()?).map_err(http)?;
    let ca_pem = unverified
        .get(format!("{hub}/v1/ca"))
        .send()
        .await
        .map_err(unreachable)?
        .error_for_status()
        .map_err(|e| http(HttpError::Answer(e)))?
        .text()
        .await
        .map_err(|e| http(HttpError::Answer(e)))?;
    // Exactly one certificate, the one the token pins; only it is trusted and saved.
    let (ca_der, ca_pem) = tls::only_cert(&ca_pem)?;
    let actual = shoal_pki::sha256_hex(&ca_der);
    if actual != token.ca_hash {
        return Err(EnrollError::WrongCa {
            url: hub.to_string(),
            actual,
            pinned: token.ca_hash.clone(),
        });
    }
    let (key_pem, csr) = key_and_csr(device.as_str())?;
    let pinned = client(tls::client_config(&ca_pem, None)?).map_err(http)?;
    // A failure to connect (TLS with the pinned CA included) says nothing of the fleet's
    // hub: a host that served the fleet CA's (public) certificate cannot prove it holds it.
    let sent = pinned
        .post(format!("{hub}/v1/enroll"))
        .json(&EnrollRequest {
            token: token.to_string(),
            device: device.to_string(),
            csr,
        })
        .send()
        .await
        .map_err(unreachable)?;
    let out: Enrolled = answer(Ok(sent)).await.map_err(http)?;
    Ok(DeviceCredentials {
        ca_pem,
        cert_pem: out.certificate,
        key_pem,
        hub_key: out.signing_key,
    })
}

/// The JSON answer, or the hub's error message.
async fn answer<T: serde::de::DeserializeOwned>(
    r: reqwest::Result<reqwest::Response>,
) -> Result<T, HttpError> {
    let r = r.map_err(HttpError::Send)?;
    if r.status().is_success() {
        return r.json().await.map_err(HttpError::Answer);
    }
    let status = r.status();
    let body: Option<shoal_api::wire::views::ApiError> = r.json().await.ok();
    Err(match body {
        Some(b) => HttpError::Refused {
            status,
            message: b.error,
        },
        None => HttpError::Status(status),
    })
}

/// Longest wait between two looks at the certificate, and the longest retry delay after a
/// failed renewal (shorter as expiry nears: a certificate that expires cannot be renewed).
const RENEW_CHECK_MAX: Duration = Duration::from_secs(3600);
const RENEW_RETRY: Duration = Duration::from_secs(300);

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Renews the certificate when it is due (two thirds into its lifetime), sleeping until then
/// (at most an hour at a time), until `shutdown`. `hub` is the current hub URL (it may move;
/// `None` while unknown).
pub async fn renew_loop(
    id: Identity,
    mut hub: tokio::sync::watch::Receiver<Option<String>>,
    shutdown: CancellationToken,
) {
    loop {
        let url = hub.borrow_and_update().clone();
        let Some(url) = url else {
            // No hub known yet: wait for one.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = hub.changed() => if r.is_err() { return },
            }
            continue;
        };
        let wait = match DeviceCredentials::load(&id.dir) {
            Ok(Some(creds)) => match creds.renewal_at() {
                Ok(at) if unix_now() >= at => {
                    // Retry well before expiry: a tenth of the time left, at most RENEW_RETRY.
                    let left = creds.expires_at().map_or(0, |to| to - unix_now());
                    let retry = Duration::from_secs(u64::try_from(left / 10).unwrap_or(1));
                    match renew(&id, &url, creds).await {
                        Ok(()) => Duration::from_secs(1),
                        Err(e) => {
                            warn!(error = %e, "certificate renewal failed; retrying");
                            retry.min(RENEW_RETRY)
                        }
                    }
                }
                Ok(at) => Duration::from_secs(u64::try_from(at - unix_now()).unwrap_or(1)),
                Err(e) => {
                    warn!(error = %e, "cannot read the device certificate");
                    RENEW_CHECK_MAX
                }
            },
            Ok(None) => return, // not enrolled: nothing to renew
            Err(e) => {
                warn!(error = %e, "cannot read the device credentials");
                RENEW_CHECK_MAX
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait.clamp(Duration::from_secs(1), RENEW_CHECK_MAX)) => {}
        }
    }
}

async fn renew(id: &Identity, hub: &str, mut creds: DeviceCredentials) -> Result<(), EnrollError> {
    let device = creds.name().unwrap_or_default();
    let http = |reason: HttpError| EnrollError::Http {
        url: hub.to_string(),
        reason,
    };
    let csr = shoal_pki::device::csr_for_key(&device, &creds.key_pem)?;
    let out: Enrolled = answer(
        client(id.client.clone())
            .map_err(http)?
            .post(format!("{}/v1/renew", hub.trim_end_matches('/')))
            .json(&RenewRequest { csr })
            .send()
            .await,
    )
    .await
    .map_err(http)?;
    creds.cert_pem = out.certificate;
    // Same key: only the certificate file changes (one atomic rename, so a crash leaves the
    // old pair or the new one, never a key without its certificate).
    creds.save_cert(&id.dir)?;
    id.cert.replace(&creds.cert_pem, &creds.key_pem)?;
    info!(device, "device certificate renewed");
    Ok(())
}

/// How long authenticating one endpoint of a candidate hub may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Authenticates a candidate hub before the agent uses it: a TLS handshake with its HTTP
/// API (`http`, verified as the hub's API against this device's fleet CA) and with its
/// broker (`broker`, as the hub or the fleet's broker), each when given. Nothing is sent
/// over them. A plain-MQTT broker cannot be authenticated.
pub async fn authenticate(
    id: &Identity,
    http: Option<&str>,
    broker: Option<&shoal_api::wire::endpoint::BrokerUrl>,
) -> Result<(), EnrollError> {
    authenticate_with(&id.client, &id.mqtt, http, broker).await
}

/// [`authenticate`] with the HTTPS (`client`) and MQTT (`mqtt`) TLS configurations.
async fn authenticate_with(
    client: &Arc<rustls::ClientConfig>,
    mqtt: &Arc<rustls::ClientConfig>,
    http: Option<&str>,
    broker: Option<&shoal_api::wire::endpoint::BrokerUrl>,
) -> Result<(), EnrollError> {
    if let Some(url) = http {
        let unauthenticated = |reason: HandshakeError| EnrollError::Unauthenticated {
            url: url.to_string(),
            reason,
        };
        let (host, port) = http_endpoint(url).map_err(unauthenticated)?;
        handshake(host, port, client.clone())
            .await
            .map_err(unauthenticated)?;
    }
    if let Some(b) = broker {
        let unauthenticated = |reason: HandshakeError| EnrollError::Unauthenticated {
            url: b.to_string(),
            reason,
        };
        if !b.tls {
            return Err(unauthenticated(HandshakeError::PlainMqtt));
        }
        handshake(b.host.clone(), b.port, mqtt.clone())
            .await
            .map_err(unauthenticated)?;
    }
    Ok(())
}

/// Host and port of an `https://HOST:PORT` URL (IPv6 hosts without their brackets).
fn http_endpoint(url: &str) -> Result<(String, u16), HandshakeError> {
    let u = reqwest::Url::parse(url).map_err(|e| HandshakeError::Url(e.to_string()))?;
    let host = u
        .host_str()
        .ok_or(HandshakeError::NoHost)?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = u.port_or_known_default().ok_or(HandshakeError::NoPort)?;
    Ok((host, port))
}

/// A TLS handshake with `host:port` under `tls` (which verifies the peer against the fleet
/// CA for the fleet's names, whatever address was dialled), then a close; within
/// [`PROBE_TIMEOUT`]. On the blocking pool: rustls over a std socket.
async fn handshake(
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(), HandshakeError> {
    tokio::task::spawn_blocking(move || handshake_blocking(&host, port, tls))
        .await
        .map_err(HandshakeError::Task)?
}

fn handshake_blocking(
    host: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(), HandshakeError> {
    use std::net::ToSocketAddrs;
    let started = std::time::Instant::now();
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|error| HandshakeError::Resolve {
            host: host.to_string(),
            error,
        })?
        .next()
        .ok_or_else(|| HandshakeError::NoAddress {
            host: host.to_string(),
        })?;
    let mut sock = std::net::TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
        .map_err(|error| HandshakeError::Connect { addr, error })?;
    let io = |error: std::io::Error| HandshakeError::Io { addr, error };
    sock.set_read_timeout(Some(PROBE_TIMEOUT)).map_err(io)?;
    sock.set_write_timeout(Some(PROBE_TIMEOUT)).map_err(io)?;
    // The verifier checks the fleet's names, not this one.
    let name = rustls::pki_types::ServerName::try_from(shoal_pki::ca::HUB_NAME)
        .map_err(HandshakeError::Name)?;
    let mut conn = rustls::ClientConnection::new(tls, name).map_err(HandshakeError::Tls)?;
    while conn.is_handshaking() {
        if started.elapsed() > PROBE_TIMEOUT {
            return Err(HandshakeError::Timeout { addr });
        }
        conn.complete_io(&mut sock).map_err(io)?;
    }
    conn.send_close_notify();
    let _ = conn.complete_io(&mut sock);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_pki::ca::{FleetCa, Usage};
    use shoal_pki::tls::ClientAuth;

    /// A TLS server on loopback presenting `cn`'s certificate from `ca` (as `usage`), for
    /// `conns` connections; returns its port.
    fn tls_server(ca: &FleetCa, cn: &str, usage: &Usage, conns: usize) -> u16 {
        let (cert, key) = ca.issue(cn, usage).unwrap();
        let cfg = shoal_pki::tls::server_config(ca.pem(), &cert, &key, ClientAuth::Optional, &[])
            .unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for sock in l.incoming().take(conns) {
                let Ok(mut sock) = sock else { continue };
                let Ok(mut conn) = rustls::ServerConnection::new(cfg.clone()) else {
                    continue;
                };
                while conn.is_handshaking() {
                    if conn.complete_io(&mut sock).is_err() {
                        break;
                    }
                }
            }
        });
        port
    }

    #[tokio::test]
    async fn only_the_fleets_hub_and_broker_authenticate() {
        let tmp = tempfile::tempdir().unwrap();
        let fleet = FleetCa::load_or_create(&tmp.path().join("fleet")).unwrap();
        let rogue = FleetCa::load_or_create(&tmp.path().join("rogue")).unwrap();
        let client = tls::client_config(fleet.pem(), None).unwrap();
        let mqtt = tls::mqtt_client_config(fleet.pem(), None).unwrap();
        let server = |names: Vec<String>| Usage::Server { names };
        let hub = tls_server(&fleet, "shoal-hub", &server(vec![]), 2);
        let fake = tls_server(&rogue, "shoal-hub", &server(vec![]), 2);
        let broker = tls_server(&fleet, "shoal-broker", &Usage::Broker { names: vec![] }, 2);
        let device = tls_server(&fleet, "pi-1", &Usage::Client, 2);
        // A port nobody listens on (bound, then released).
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let http = |p: u16| format!("https://127.0.0.1:{p}");
        let mqtts = |p: u16| -> shoal_api::wire::endpoint::BrokerUrl {
            format!("mqtts://127.0.0.1:{p}").parse().unwrap()
        };
        // (HTTP API, broker, authenticated)
        let cases = [
            (Some(http(hub)), Some(mqtts(hub)), true),
            // A CA of its own: neither endpoint.
            (Some(http(fake)), None, false),
            (None, Some(mqtts(fake)), false),
            // The fleet's broker is no hub API; a device's certificate is neither.
            (None, Some(mqtts(broker)), true),
            (Some(http(broker)), None, false),
            (Some(http(device)), None, false),
            (None, Some(mqtts(device)), false),
            // Plain MQTT cannot be authenticated; nobody listening is not authenticated.
            (
                None,
                Some(format!("mqtt://127.0.0.1:{hub}").parse().unwrap()),
                false,
            ),
            (Some(http(closed)), None, false),
        ];
        for (h, b, ok) in cases {
            let r = authenticate_with(&client, &mqtt, h.as_deref(), b.as_ref()).await;
            assert_eq!(r.is_ok(), ok, "{h:?} {b:?}: {r:?}");
            if let Err(e) = r {
                assert!(e.is_wrong_hub(), "{e}");
                assert!(e.to_string().contains("127.0.0.1"), "{e}");
            }
        }
    }

    #[test]
    fn hub_urls_split_into_host_and_port() {
        for (url, host, port) in [
            ("https://10.0.0.1:8080", "10.0.0.1", 8080),
            ("https://[2001:db8::1]:8443/", "2001:db8::1", 8443),
            ("https://hub.lan", "hub.lan", 443),
        ] {
            assert_eq!(http_endpoint(url).unwrap(), (host.to_string(), port));
        }
        assert!(http_endpoint("hub.lan:8080").is_err());
    }
}
