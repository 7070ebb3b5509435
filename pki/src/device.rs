//! The credentials a device keeps in `DATA_DIR/pki/`: its key (generated on the device,
//! owner-only, never sent anywhere), its certificate, the fleet CA and the hub's signing key.
//! The certificate is written last, so its presence means the set is complete.

use crate::sign::HubKey;
use crate::{read_string, write_atomic, PkiError};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use std::path::{Path, PathBuf};

#[derive(Clone)]
pub struct DeviceCredentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub hub_key: String,
}

impl std::fmt::Debug for DeviceCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCredentials")
            .field("hub_key", &self.hub_key)
            .finish_non_exhaustive()
    }
}

impl DeviceCredentials {
    /// The saved credentials, or `None` if this device has not enrolled yet.
    pub fn load(dir: &Path) -> Result<Option<Self>, PkiError> {
        if !dir.join("device.pem").exists() {
            return Ok(None);
        }
        Ok(Some(Self {
            ca_pem: read_string(&dir.join("ca.pem"))?,
            cert_pem: read_string(&dir.join("device.pem"))?,
            key_pem: read_string(&key_file(dir))?,
            hub_key: read_string(&dir.join("hub-signing.pub"))?
                .trim()
                .to_string(),
        }))
    }

    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        crate::private_dir(dir)?;
        write_atomic(&key_file(dir), self.key_pem.as_bytes(), 0o600)?;
        write_atomic(&dir.join("ca.pem"), self.ca_pem.as_bytes(), 0o644)?;
        write_atomic(&dir.join("hub-signing.pub"), self.hub_key.as_bytes(), 0o644)?;
        write_atomic(&dir.join("device.pem"), self.cert_pem.as_bytes(), 0o644)
    }

    /// Replaces the saved certificate (renewal: same key), atomically.
    pub fn save_cert(&self, dir: &Path) -> Result<(), PkiError> {
        write_atomic(&dir.join("device.pem"), self.cert_pem.as_bytes(), 0o644)
    }

    pub fn hub_key(&self) -> Result<HubKey, PkiError> {
        HubKey::from_b64(&self.hub_key).map_err(|e| PkiError::Tls(e.to_string()))
    }

    /// When the certificate is due for renewal: two thirds into its lifetime (Unix seconds).
    pub fn renewal_at(&self) -> Result<i64, PkiError> {
        let (from, to) = crate::tls::validity(&self.cert_pem)?;
        Ok(from + (to - from) * 2 / 3)
    }

    /// When the certificate expires (Unix seconds).
    pub fn expires_at(&self) -> Result<i64, PkiError> {
        Ok(crate::tls::validity(&self.cert_pem)?.1)
    }

    /// Whether the certificate is past two thirds of its lifetime at `now` (Unix seconds).
    pub fn renewal_due(&self, now: i64) -> Result<bool, PkiError> {
        Ok(now >= self.renewal_at()?)
    }

    /// The identity the certificate names.
    pub fn name(&self) -> Option<String> {
        crate::tls::first_cert(&self.cert_pem)
            .ok()
            .and_then(|c| crate::tls::common_name(&c))
    }
}

/// The device's private key in credentials directory `dir`: it never leaves the device.
pub fn key_file(dir: &Path) -> PathBuf {
    dir.join("device.key")
}

/// A fresh key pair and a certificate signing request for `device`: (key PEM, CSR PEM).
pub fn key_and_csr(device: &str) -> Result<(String, String), PkiError> {
    let key =
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| PkiError::Issue {
            name: device.to_string(),
            reason: e.to_string(),
        })?;
    let csr = csr_for(device, &key)?;
    Ok((key.serialize_pem(), csr))
}

/// A certificate signing request for `device` with the key it has (renewal keeps the key,
/// so only the certificate file changes, in one atomic rename).
pub fn csr_for_key(device: &str, key_pem: &str) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Issue {
        name: device.to_string(),
        reason: format!("the device key is unusable: {e}"),
    })?;
    csr_for(device, &key)
}

fn csr_for(device: &str, key: &KeyPair) -> Result<String, PkiError> {
    let err = |e: rcgen::Error| PkiError::Issue {
        name: device.to_string(),
        reason: e.to_string(),
    };
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, device);
    params.distinguished_name = dn;
    let csr = params.serialize_request(key).map_err(err)?;
    csr.pem().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{FleetCa, Usage, DEVICE_CERT_LIFETIME};

    #[test]
    fn a_signed_csr_names_the_device_and_chains_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::load_or_create(&dir.path().join("pki")).unwrap();
        let again = FleetCa::load_or_create(&dir.path().join("pki")).unwrap();
        assert_eq!(ca.hash(), again.hash());
        assert_eq!(
            crate::ca::hash_of(&dir.path().join("pki")).unwrap(),
            ca.hash()
        );
        // The CSR asks for "shoal-hub"; the CA ignores the request's subject.
        let (key, csr) = key_and_csr("shoal-hub").unwrap();
        let cert = ca.sign_csr(&csr, "edge-1", DEVICE_CERT_LIFETIME).unwrap();
        let creds = DeviceCredentials {
            ca_pem: ca.pem().to_string(),
            cert_pem: cert,
            key_pem: key,
            hub_key: "x".into(),
        };
        assert_eq!(creds.name().as_deref(), Some("edge-1"));
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!(!creds.renewal_due(now).unwrap());
        assert!(creds.renewal_due(now + 61 * 24 * 3600).unwrap());
        creds.save(&dir.path().join("dev")).unwrap();
        let loaded = DeviceCredentials::load(&dir.path().join("dev"))
            .unwrap()
            .unwrap();
        assert_eq!(loaded.cert_pem, creds.cert_pem);
        assert!(DeviceCredentials::load(dir.path()).unwrap().is_none());
        assert!(ca
            .sign_csr("garbage", "edge-1", DEVICE_CERT_LIFETIME)
            .is_err());

        // What a new device trusts is exactly the one certificate the token pins: a CA text
        // with a second certificate (or a key) appended is refused.
        let (der, pem) = crate::tls::only_cert(ca.pem()).unwrap();
        assert_eq!(crate::sha256_hex(&der), ca.hash());
        assert_eq!(crate::tls::only_cert(&pem).unwrap().0, der);
        let other = FleetCa::load_or_create(&dir.path().join("other")).unwrap();
        assert!(crate::tls::only_cert(&format!("{}{}", ca.pem(), other.pem())).is_err());
        assert!(crate::tls::only_cert(&format!("{}{}", ca.pem(), creds.key_pem)).is_err());
        assert!(crate::tls::only_cert("").is_err());

        let (server, _) = ca
            .issue(
                "shoal-hub",
                &Usage::Server {
                    names: vec!["127.0.0.1".into(), "localhost".into()],
                },
            )
            .unwrap();
        assert_eq!(
            crate::tls::common_name(&crate::tls::first_cert(&server).unwrap()).as_deref(),
            Some("shoal-hub")
        );
    }
}
