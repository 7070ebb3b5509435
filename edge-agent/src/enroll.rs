//! The device's identity: enrollment with a join token, the TLS configuration every
//! connection to the hub uses, and certificate renewal.
//!
//! Enrollment (once, `--join-token`): fetch `GET /v1/ca` without trusting anything yet,
//! check that its SHA-256 is the one the token pins (as K3s does with its tokens), then —
//! now verifying the hub against that CA — send the token with a CSR for a key generated
//! here. The key never leaves the device. The credentials land in `DATA_DIR/pki/` (see
//! [`DeviceCredentials`]); later starts use them without a token.
//!
//! Renewal: once the certificate is past two thirds of its lifetime, `POST /v1/renew` with a
//! CSR for the same key, authenticated by the current certificate; the new certificate is
//! saved (one atomic rename) and presented from the next handshake on
//! ([`ClientIdentity::replace`]).

use shoal_api::ids::DeviceId;
use shoal_api::views::{EnrollRequest, Enrolled, RenewRequest};
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
    Http { url: String, reason: String },
    #[error(transparent)]
    Pki(#[from] shoal_pki::PkiError),
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
    Ok(Identity {
        client: tls::client_config(&creds.ca_pem, Some(cert.clone()))?,
        mqtt: tls::mqtt_client_config(&creds.ca_pem, Some(cert.clone()))?,
        hub_key: creds.hub_key()?,
        cert,
        dir,
    })
}

fn client(tls: Arc<rustls::ClientConfig>) -> Result<reqwest::Client, String> {
    crate::http_client(
        reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30)),
    )
    .map_err(|e| e.to_string())
}

async fn enroll(
    hub: &str,
    device: &DeviceId,
    token: &JoinToken,
) -> Result<DeviceCredentials, EnrollError> {
    let hub = hub.trim_end_matches('/');
    let http = |reason: String| EnrollError::Http {
        url: hub.to_string(),
        reason,
    };
    let unverified = client(tls::unverified_client_config()?).map_err(http)?;
    let ca_pem = unverified
        .get(format!("{hub}/v1/ca"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| http(e.to_string()))?
        .text()
        .await
        .map_err(|e| http(e.to_string()))?;
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
    let out: Enrolled = answer(
        pinned
            .post(format!("{hub}/v1/enroll"))
            .json(&EnrollRequest {
                token: token.to_string(),
                device: device.to_string(),
                csr,
            })
            .send()
            .await,
    )
    .await
    .map_err(http)?;
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
) -> Result<T, String> {
    let r = r.map_err(|e| crate::with_causes(&e))?;
    if r.status().is_success() {
        return r.json().await.map_err(|e| e.to_string());
    }
    let status = r.status();
    let body: Option<shoal_api::views::ApiError> = r.json().await.ok();
    Err(match body {
        Some(b) => format!("{status}: {}", b.error),
        None => status.to_string(),
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
    let http = |reason: String| EnrollError::Http {
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
