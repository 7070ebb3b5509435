//! rustls configurations for the fleet: servers that require (or accept) client
//! certificates from the fleet CA, clients that present one and verify the server as
//! [`HUB_NAME`](crate::ca::HUB_NAME), and the identity a peer certificate names.

use crate::PkiError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::sync::{Arc, RwLock};

pub use tokio_rustls::{TlsAcceptor, TlsConnector};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: &str) -> impl FnOnce(rustls::Error) -> PkiError + '_ {
    move |e| PkiError::Tls(format!("{what}: {e}"))
}

/// The first certificate of a PEM text.
pub fn first_cert(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    certs(pem)?
        .into_iter()
        .next()
        .ok_or_else(|| PkiError::Tls("no certificate in the PEM text".into()))
}

/// Every certificate of a PEM text.
pub fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Tls(format!("cannot read a certificate: {e}")))
}

/// The one certificate of a PEM text that must hold exactly one (the fleet CA as a new
/// device fetches it): its DER and a canonical PEM of it alone. Anything else in the text
/// (a second certificate, a key, any other section) is refused, so that what the join token's
/// hash pins is all that is ever trusted.
pub fn only_cert(pem: &str) -> Result<(CertificateDer<'static>, String), PkiError> {
    use rustls::pki_types::pem::SectionKind;
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Tls(format!("cannot read the CA certificate: {e}")))?;
    match sections.as_slice() {
        [(SectionKind::Certificate, der)] => {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
            for chunk in b64.as_bytes().chunks(64) {
                out.push_str(&String::from_utf8_lossy(chunk));
                out.push('\n');
            }
            out.push_str("-----END CERTIFICATE-----\n");
            Ok((CertificateDer::from(der.clone()), out))
        }
        other => Err(PkiError::Tls(format!(
            "expected exactly one certificate, found {} PEM section(s)",
            other.len()
        ))),
    }
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::Tls(format!("cannot read a private key: {e}")))
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem)? {
        roots.add(c).map_err(tls_err("the fleet CA"))?;
    }
    Ok(Arc::new(roots))
}

/// Whether a server insists on client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// MQTT: every client is a device, an operator or the hub.
    Required,
    /// HTTPS: enrollment (`/v1/ca`, `/v1/enroll`) is open, every other route checks the
    /// identity itself.
    Optional,
}

/// A server configuration presenting `cert_pem`/`key_pem` and verifying client certificates
/// against the fleet CA.
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, PkiError> {
    let builder = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider());
    let verifier = match auth {
        ClientAuth::Required => builder.build(),
        ClientAuth::Optional => builder.allow_unauthenticated().build(),
    }
    .map_err(|e| PkiError::Tls(format!("client verifier: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("protocol versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem)?, key(key_pem)?)
        .map_err(tls_err("server certificate"))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client configuration trusting only the fleet CA, verifying the server as the hub
/// (`shoal-hub-api`, which only the hub's own certificates carry) whatever address was
/// dialled, and presenting `identity` when given. For HTTPS to the hub (enrollment,
/// renewal, module downloads, the API).
pub fn client_config(
    ca_pem: &str,
    identity: Option<Arc<ClientIdentity>>,
) -> Result<Arc<ClientConfig>, PkiError> {
    fleet_client_config(ca_pem, identity, &[crate::ca::HUB_API_NAME])
}

/// [`client_config`] for MQTT: the server may also be an external broker of the fleet
/// (`shoal-broker`), which may carry messages but never passes as the hub over HTTPS.
pub fn mqtt_client_config(
    ca_pem: &str,
    identity: Option<Arc<ClientIdentity>>,
) -> Result<Arc<ClientConfig>, PkiError> {
    fleet_client_config(
        ca_pem,
        identity,
        &[crate::ca::HUB_NAME, crate::ca::BROKER_NAME],
    )
}

fn fleet_client_config(
    ca_pem: &str,
    identity: Option<Arc<ClientIdentity>>,
    names: &'static [&'static str],
) -> Result<Arc<ClientConfig>, PkiError> {
    let inner = WebPkiServerVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .build()
        .map_err(|e| PkiError::Tls(format!("server verifier: {e}")))?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("protocol versions"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FleetServerVerifier { inner, names }));
    let config = match identity {
        Some(id) => builder.with_client_cert_resolver(id),
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Verifies the server's chain against the fleet CA as usual (signatures, validity,
/// server-auth usage), but for one of `names` (`shoal-hub`, and for MQTT `shoal-broker`)
/// instead of the dialled address: devices reach the hub at whatever address mDNS reports,
/// and the fleet CA issues server certificates only to the hub and, under their own name,
/// to its brokers.
#[derive(Debug)]
struct FleetServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    names: &'static [&'static str],
}

impl ServerCertVerifier for FleetServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut first_err = None;
        for name in self.names {
            let fleet =
                ServerName::try_from(*name).map_err(|e| rustls::Error::General(e.to_string()))?;
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, &fleet, ocsp, now)
            {
                Ok(v) => return Ok(v),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| rustls::Error::General("no server name to verify".into())))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client certificate that can be replaced while connections use it (a renewed device
/// certificate is presented from the next handshake on, without rebuilding clients).
#[derive(Debug)]
pub struct ClientIdentity {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ClientIdentity {
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Arc<Self>, PkiError> {
        Ok(Arc::new(Self {
            current: RwLock::new(certified(cert_pem, key_pem)?),
        }))
    }

    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
        let new = certified(cert_pem, key_pem)?;
        match self.current.write() {
            Ok(mut g) => *g = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
        Ok(())
    }
}

fn certified(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, PkiError> {
    let signer = provider()
        .key_provider
        .load_private_key(key(key_pem)?)
        .map_err(tls_err("client key"))?;
    Ok(Arc::new(CertifiedKey::new(certs(cert_pem)?, signer)))
}

impl ResolvesClientCert for ClientIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        match self.current.read() {
            Ok(g) => Some(g.clone()),
            Err(poisoned) => Some(poisoned.into_inner().clone()),
        }
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The common name of a (verified) peer certificate: who the peer is.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = x509.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// Validity of the first certificate in `pem`, as Unix seconds (not before, not after).
pub fn validity(pem: &str) -> Result<(i64, i64), PkiError> {
    let der = first_cert(pem)?;
    let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| PkiError::Tls(format!("cannot parse a certificate: {e}")))?;
    let v = x509.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// A client configuration that accepts any server: used for one request only, fetching the
/// fleet CA before enrollment, whose hash the join token then checks.
pub fn unverified_client_config() -> Result<Arc<ClientConfig>, PkiError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("protocol versions"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider())))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The public key (SubjectPublicKeyInfo, DER) of the first certificate in `pem`.
pub fn public_key_of_pem(pem: &str) -> Result<Vec<u8>, PkiError> {
    public_key_of(&first_cert(pem)?)
}

/// The public key (SubjectPublicKeyInfo, DER) of certificate `cert`.
pub fn public_key_of(cert: &CertificateDer<'_>) -> Result<Vec<u8>, PkiError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| PkiError::Tls(format!("cannot parse a certificate: {e}")))?;
    Ok(x509.public_key().raw.to_vec())
}

/// The public key (SubjectPublicKeyInfo, DER) a certificate signing request asks for.
pub fn public_key_of_csr(csr_pem: &str) -> Result<Vec<u8>, PkiError> {
    use x509_parser::prelude::FromDer;
    let bad = |e: String| PkiError::Tls(format!("cannot parse a certificate signing request: {e}"));
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .map_err(|e| bad(e.to_string()))?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

/// SHA-256 (hex) of certificate `cert`'s DER: what operator records pin.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    crate::sha256_hex(cert.as_ref())
}

/// The first certificate in `pem`: its [`fingerprint`], and when it expires (Unix ms).
pub fn pin_of_pem(pem: &str) -> Result<(String, u64), PkiError> {
    let (_, not_after) = validity(pem)?;
    let expires_ms = u64::try_from(not_after).unwrap_or(0).saturating_mul(1000);
    Ok((fingerprint(&first_cert(pem)?), expires_ms))
}
