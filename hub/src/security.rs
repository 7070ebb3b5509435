//! The hub's credentials (`DATA_DIR/pki/`): the fleet CA, the TLS configurations of its
//! listeners (MQTT requires a client certificate, HTTPS asks for one), the client identity
//! it uses towards an external broker, the operator bundle it writes for `shoal`, and the
//! join tokens devices enroll with. Nothing here is used with `--insecure` except the
//! signing key, which always signs desired state.

use shoal_pki::ca::{FleetCa, Usage, HUB_NAME};
use shoal_pki::sign::HubSigner;
use shoal_pki::tls::{self, ClientAuth, ClientIdentity};
use shoal_pki::token::TokenStore;
use shoal_pki::PkiError;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki")
}

/// Where the hub writes the operator bundle.
pub fn operator_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("operator")
}

/// The hub's key for secrets at rest (`DATA_DIR/pki/secrets.key`). Used with `--insecure`
/// too: secrets stay encrypted in the store whatever the transport.
pub fn secrets_key(data_dir: &Path) -> Result<shoal_pki::secret::SecretsKey, PkiError> {
    shoal_pki::secret::SecretsKey::load_or_create(&pki_dir(data_dir).join("secrets.key"))
}

/// The hub's signing key (`DATA_DIR/pki/signing.key`).
pub fn signer(data_dir: &Path) -> Result<HubSigner, PkiError> {
    HubSigner::load_or_create(&pki_dir(data_dir).join("signing.key"))
}

pub struct Security {
    pub ca: FleetCa,
    pub tokens: TokenStore,
    pub mqtt: Arc<rustls::ServerConfig>,
    pub http: Arc<rustls::ServerConfig>,
    /// For the hub's connection to an external broker.
    pub client: Arc<rustls::ClientConfig>,
    /// The hub's public signing key (base64), handed to devices at enrollment.
    pub signing_key: String,
    /// How long device certificates are valid.
    pub device_cert_lifetime: std::time::Duration,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl Security {
    /// `DATA_DIR/pki/devices/{id}.pem`: the device's latest certificate, the record that it
    /// is enrolled.
    fn record_path(&self, device: &shoal_api::ids::DeviceId) -> PathBuf {
        self.ca.dir().join("devices").join(format!("{device}.pem"))
    }

    /// The certificate `device` enrolled with (its key is what secrets are sealed to).
    pub fn enrolled_cert(&self, device: &shoal_api::ids::DeviceId) -> Result<String, PkiError> {
        shoal_pki::secret::read_cert(&self.record_path(device))
    }

    pub fn is_enrolled(&self, device: &shoal_api::ids::DeviceId) -> bool {
        self.record_path(device).exists()
    }

    /// Records a certificate issued to `device`.
    pub fn record(
        &self,
        device: &shoal_api::ids::DeviceId,
        cert_pem: &str,
    ) -> Result<(), PkiError> {
        // Durable before the certificate is handed out (fsync, then rename).
        shoal_pki::write_atomic(&self.record_path(device), cert_pem.as_bytes(), 0o644)
    }

    /// Loads (or on first start creates) the fleet CA, issues the hub's certificates for
    /// `names` (besides `shoal-hub`, `localhost` and the loopback addresses), and writes the
    /// operator bundle if it is missing.
    pub fn load(
        data_dir: &Path,
        names: &[String],
        signing_key: String,
        device_cert_lifetime: std::time::Duration,
    ) -> Result<Self, PkiError> {
        let dir = pki_dir(data_dir);
        let ca = FleetCa::load_or_create(&dir)?;
        let mut all: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        all.extend(names.iter().cloned());
        let (cert, key) = ca.issue(HUB_NAME, &Usage::Server { names: all })?;
        let mqtt = tls::server_config(ca.pem(), &cert, &key, ClientAuth::Required, &[])?;
        let http = tls::server_config(ca.pem(), &cert, &key, ClientAuth::Optional, &[b"http/1.1"])?;
        let (ccert, ckey) = ca.issue(HUB_NAME, &Usage::Client)?;
        let client = tls::client_config(ca.pem(), Some(ClientIdentity::new(&ccert, &ckey)?))?;
        if ca.write_operator_bundle(&operator_dir(data_dir))? {
            tracing::info!(bundle = %operator_dir(data_dir).display(), "wrote the operator credential bundle (ca.pem, operator.pem, operator.key)");
        }
        Ok(Self {
            tokens: TokenStore::new(&dir),
            ca,
            mqtt,
            http,
            client,
            signing_key,
            device_cert_lifetime,
        })
    }
}
