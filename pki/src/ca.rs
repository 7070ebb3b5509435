//! The fleet CA (hub side): generated on the hub's first start under `DATA_DIR/pki/`
//! (`ca.key` owner-only, `ca.pem`), it signs the hub's server and client certificates, the
//! operator bundle and every device certificate (from the device's CSR, so device keys never
//! leave the device).

use crate::{io_err, read_string, write_atomic, PkiError};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Common name of the hub's certificates, and the server name every client verifies.
pub const HUB_NAME: &str = "shoal-hub";
/// The name HTTPS clients verify the hub by (enrollment, renewal, downloads, the API). Only
/// the hub's own server certificates carry it: broker certificates issued before brokers had
/// their own name carry `shoal-hub`, and must not pass as the hub over HTTPS.
pub const HUB_API_NAME: &str = "shoal-hub-api";
/// Common name of operator certificates.
pub const OPERATOR_NAME: &str = "shoal-operator";
/// Common name of an external broker's certificate (`shoal-hub cert broker`), and the name
/// MQTT clients accept beside [`HUB_NAME`]. Never the hub's name: a broker's key must not
/// pass as the hub over HTTPS (enrollment, module downloads).
pub const BROKER_NAME: &str = "shoal-broker";

/// How long a device certificate is valid; agents renew after two thirds of it.
pub const DEVICE_CERT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// How long the hub's own certificates and the operator's are valid (re-issued on start).
const SERVICE_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Clock skew tolerated between hub and devices.
const BACKDATE: Duration = Duration::from_secs(3600);

/// What a certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server (the hub's listeners, an external broker). `HUB_NAME` is always added to
    /// `names` (DNS names or IP addresses).
    Server { names: Vec<String> },
    /// An external MQTT broker: [`BROKER_NAME`] is always added to `names`, and
    /// [`HUB_NAME`] is never there.
    Broker { names: Vec<String> },
    /// A TLS client (mTLS): the hub, an operator, a device.
    Client,
}

pub struct FleetCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

impl std::fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCa").field("dir", &self.dir).finish()
    }
}

impl FleetCa {
    /// Loads the CA from `pki_dir`; an error if there is none (tools that must not start a
    /// new fleet by accident).
    pub fn load(pki_dir: &Path) -> Result<Self, PkiError> {
        let key_path = pki_dir.join("ca.key");
        if !key_path.exists() {
            return Err(PkiError::BadFile {
                what: "the fleet CA",
                path: key_path.display().to_string(),
                reason: "it does not exist: is this a hub's data directory, and has the hub run?"
                    .into(),
            });
        }
        Self::load_or_create(pki_dir)
    }

    /// Loads the CA from `pki_dir`, generating it (key first, then certificate) if absent.
    pub fn load_or_create(pki_dir: &Path) -> Result<Self, PkiError> {
        let key_path = pki_dir.join("ca.key");
        let pem_path = pki_dir.join("ca.pem");
        if !key_path.exists() || !pem_path.exists() {
            crate::private_dir(pki_dir)?;
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| issue_err("fleet CA", e))?;
            let mut params = CertificateParams::default();
            params.distinguished_name = name(&format!(
                "Shoal fleet CA {}",
                hex::encode(rand::random::<[u8; 4]>())
            ));
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            validity(&mut params, CA_LIFETIME)?;
            let cert = params
                .self_signed(&key)
                .map_err(|e| issue_err("fleet CA", e))?;
            write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_atomic(&pem_path, cert.pem().as_bytes(), 0o644)?;
        }
        let key_pem = read_string(&key_path)?;
        let pem = read_string(&pem_path)?;
        let bad = |reason: String| PkiError::BadFile {
            what: "the fleet CA",
            path: pki_dir.display().to_string(),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(e.to_string()))?;
        let der = crate::tls::first_cert(&pem).map_err(|e| bad(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            dir: pki_dir.to_path_buf(),
            issuer,
            der,
            pem,
        })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// SHA-256 (hex) of the CA certificate's DER: what join tokens pin.
    pub fn hash(&self) -> String {
        crate::sha256_hex(&self.der)
    }

    /// Issues a certificate for `cn` with a fresh key; returns (certificate PEM, key PEM).
    pub fn issue(&self, cn: &str, usage: &Usage) -> Result<(String, String), PkiError> {
        self.issue_for(cn, usage, SERVICE_CERT_LIFETIME)
    }

    /// [`FleetCa::issue`], valid for `lifetime`.
    pub fn issue_for(
        &self,
        cn: &str,
        usage: &Usage,
        lifetime: Duration,
    ) -> Result<(String, String), PkiError> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| issue_err(cn, e))?;
        let params = leaf_params(cn, usage, lifetime)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| issue_err(cn, e))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs a device's certificate signing request: the CSR proves possession of the key;
    /// its subject and extensions are ignored and replaced by `cn` as a client certificate.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        cn: &str,
        lifetime: Duration,
    ) -> Result<String, PkiError> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| PkiError::Issue {
                name: cn.to_string(),
                reason: format!("the certificate signing request is invalid: {e}"),
            })?;
        let req = CertificateSigningRequestParams {
            params: leaf_params(cn, &Usage::Client, lifetime)?,
            public_key: csr.public_key,
        };
        let cert = req.signed_by(&self.issuer).map_err(|e| issue_err(cn, e))?;
        Ok(cert.pem())
    }

    /// Writes the operator bundle (`ca.pem`, `operator.pem`, `operator.key`) to `dir` unless
    /// one signed by this CA, with more than a third of its life left, is already there. Usable by `shoal` and by
    /// `mosquitto_pub --cafile ca.pem --cert operator.pem --key operator.key`.
    pub fn write_operator_bundle(&self, dir: &Path) -> Result<bool, PkiError> {
        let ca_path = dir.join("ca.pem");
        // Renewed at the hub's start once a third of its life is left.
        let fresh = std::fs::read_to_string(dir.join("operator.pem"))
            .ok()
            .and_then(|pem| crate::tls::validity(&pem).ok())
            .is_some_and(|(_, not_after)| {
                let left = not_after - time::OffsetDateTime::now_utc().unix_timestamp();
                left > i64::try_from(SERVICE_CERT_LIFETIME.as_secs() / 3).unwrap_or(i64::MAX)
            });
        if std::fs::read_to_string(&ca_path).ok().as_deref() == Some(self.pem.as_str())
            && dir.join("operator.key").exists()
            && fresh
        {
            return Ok(false);
        }
        self.issue_operator_bundle(dir)?;
        Ok(true)
    }

    /// Writes a new operator bundle to `dir`, whatever is there (rotation).
    pub fn issue_operator_bundle(&self, dir: &Path) -> Result<(), PkiError> {
        let ca_path = dir.join("ca.pem");
        crate::private_dir(dir)?;
        let (cert, key) = self.issue(OPERATOR_NAME, &Usage::Client)?;
        write_atomic(&dir.join("operator.key"), key.as_bytes(), 0o600)?;
        write_atomic(&dir.join("operator.pem"), cert.as_bytes(), 0o644)?;
        write_atomic(&ca_path, self.pem.as_bytes(), 0o644)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The CA certificate's hash from `pki_dir/ca.pem`, without its key (for tools).
pub fn hash_of(pki_dir: &Path) -> Result<String, PkiError> {
    let path = pki_dir.join("ca.pem");
    let pem = std::fs::read_to_string(&path).map_err(io_err("read", &path))?;
    hash_of_pem(&pem, &path.display().to_string())
}

/// The hash of the CA certificate `pem`, read from `whence` (a file, or a key in a store).
pub fn hash_of_pem(pem: &str, whence: &str) -> Result<String, PkiError> {
    let der = crate::tls::first_cert(pem).map_err(|e| PkiError::BadFile {
        what: "the fleet CA",
        path: whence.to_string(),
        reason: e.to_string(),
    })?;
    Ok(crate::sha256_hex(&der))
}

fn issue_err(name: &str, e: rcgen::Error) -> PkiError {
    PkiError::Issue {
        name: name.to_string(),
        reason: e.to_string(),
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Shoal");
    dn.push(DnType::CommonName, cn);
    dn
}

fn validity(p: &mut CertificateParams, lifetime: Duration) -> Result<(), PkiError> {
    let now = time::OffsetDateTime::now_utc();
    // Short-lived certificates (tests, or fleets that want them) are backdated less, so that
    // "two thirds of the lifetime" stays in the future.
    p.not_before = now - BACKDATE.min(lifetime / 10);
    p.not_after = now + lifetime;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
    Ok(())
}

fn leaf_params(cn: &str, usage: &Usage, lifetime: Duration) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = name(cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    match usage {
        Usage::Server { names } | Usage::Broker { names } => {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let mut all: Vec<String> = match usage {
                Usage::Broker { .. } => vec![BROKER_NAME.into()],
                _ => vec![HUB_NAME.into(), HUB_API_NAME.into()],
            };
            all.extend(
                names
                    .iter()
                    .filter(|n| ![HUB_NAME, HUB_API_NAME, BROKER_NAME].contains(&n.as_str()))
                    .cloned(),
            );
            for n in all {
                let san = match n.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => {
                        SanType::DnsName(n.as_str().try_into().map_err(|e| PkiError::Issue {
                            name: cn.to_string(),
                            reason: format!("{n:?} is not a DNS name: {e}"),
                        })?)
                    }
                };
                if !p.subject_alt_names.contains(&san) {
                    p.subject_alt_names.push(san);
                }
            }
        }
        Usage::Client => p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth],
    }
    validity(&mut p, lifetime)?;
    Ok(p)
}
