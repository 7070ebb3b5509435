//! The hub's credentials (`DATA_DIR/pki/`): the fleet CA, the TLS configurations of its
//! listeners (MQTT requires a client certificate, HTTPS asks for one), the client identity
//! it uses towards an external broker, the operator bundle it writes for `shoal`, and where
//! join tokens and enrollment records live ([`crate::enrollment`]). Nothing here is used with `--insecure` except the
//! signing key, which always signs desired state.

use shoal_pki::ca::{FleetCa, Usage, HUB_NAME};
use shoal_pki::sign::HubSigner;
use shoal_pki::tls::{self, ClientAuth, ClientIdentity};
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
    /// Join tokens and enrollment records.
    pub enrollments: Box<dyn crate::enrollment::Enrollments>,
    pub mqtt: Arc<rustls::ServerConfig>,
    pub http: Arc<rustls::ServerConfig>,
    /// For the hub's connection to an external broker.
    pub client: Arc<rustls::ClientConfig>,
    /// The hub's public signing key (base64), handed to devices at enrollment.
    pub signing_key: String,
    /// Signs precompiled artifacts (the same key as desired states).
    pub signer: HubSigner,
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
    /// Loads (or on first start creates) the fleet CA, issues the hub's certificates for
    /// `names` (besides `shoal-hub`, `localhost` and the loopback addresses), and writes the
    /// operator bundle if it is missing.
    pub fn load(
        data_dir: &Path,
        names: &[String],
        signing_key: String,
        device_cert_lifetime: std::time::Duration,
        enrollments: Box<dyn crate::enrollment::Enrollments>,
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
        // The hub's MQTT client: to its embedded broker, or an external one (`shoal-broker`).
        let client = tls::mqtt_client_config(ca.pem(), Some(ClientIdentity::new(&ccert, &ckey)?))?;
        if ca.write_operator_bundle(&operator_dir(data_dir))? {
            tracing::info!(bundle = %operator_dir(data_dir).display(), "wrote the operator credential bundle (ca.pem, operator.pem, operator.key)");
        }
        Ok(Self {
            enrollments,
            ca,
            mqtt,
            http,
            client,
            signing_key,
            signer: signer(data_dir)?,
            device_cert_lifetime,
        })
    }
}
