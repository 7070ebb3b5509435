//! Secret values at rest on the hub and on their way to one device.
//!
//! - **At rest** ([`SecretsKey`]): AES-256-GCM (ring) under a key the hub generates once in
//!   `pki/secrets.key`, with a fresh random nonce per write and the secret's name and
//!   version as associated data, so a stored ciphertext cannot be moved under another name or
//!   paired with another version. The store (and its backups) only ever hold ciphertext.
//! - **Version** ([`SecretsKey::version`]): an HMAC-SHA256 of the content under a key derived
//!   from the same file. It changes whenever the content does, so devices restart what uses a
//!   changed secret, yet it says nothing about the value to whoever reads desired states: a
//!   plain hash of a short password could be brute-forced.
//! - **In transit** ([`seal_to_device`], [`open_on_device`]): HPKE (RFC 9180) base mode with
//!   DHKEM(P-256, HKDF-SHA256), HKDF-SHA256 and AES-256-GCM, to the public key in the device's
//!   enrollment certificate. Only the key that never left the device opens it; the associated
//!   data binds the ciphertext to one device, secret and version. The same P-256 key signs the
//!   device's TLS handshakes: ECDSA and ECIES-style encryption under one key are known to be
//!   jointly secure, and a separate encryption key would need a second enrollment step.
//!
//! HPKE comes from the `hpke` crate (ring has no static-key ECDH); the device's PKCS#8 key is
//! read with `p256`.

use crate::{io_err, private_dir, read_string, write_atomic, PkiError};
use hpke::{Deserializable, Serializable};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::path::Path;

type Kem = hpke::kem::DhP256HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::AesGcm256;

/// HPKE `info`: names the protocol, so a ciphertext made for anything else never opens here.
const INFO: &[u8] = b"shoal secret v1";

/// The hub's key for secrets at rest.
pub struct SecretsKey {
    aead: LessSafeKey,
    mac: ring::hmac::Key,
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretsKey(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot encrypt secret {0:?}")]
    Encrypt(String),
    #[error("secret {0:?} does not decrypt with this hub's secrets key (pki/secrets.key replaced, or the store damaged)")]
    Decrypt(String),
    #[error("cannot seal secret {name:?} to device {device:?}: {reason}")]
    Seal {
        name: String,
        device: String,
        reason: String,
    },
    #[error("cannot open secret {name:?}: {reason}")]
    Open { name: String, reason: String },
}

impl SecretsKey {
    /// Loads the key from `path` (32 random bytes, hex), generating it if absent.
    pub fn load_or_create(path: &Path) -> Result<Self, PkiError> {
        if !path.exists() {
            if let Some(dir) = path.parent() {
                private_dir(dir)?;
            }
            let mut key = [0u8; 32];
            SystemRandom::new()
                .fill(&mut key)
                .map_err(|_| PkiError::Issue {
                    name: "the hub's secrets key".into(),
                    reason: "no randomness".into(),
                })?;
            write_atomic(path, hex::encode(key).as_bytes(), 0o600)?;
        }
        let bad = |reason: &str| PkiError::BadFile {
            what: "the hub's secrets key",
            path: path.display().to_string(),
            reason: reason.to_string(),
        };
        let bytes = hex::decode(read_string(path)?.trim()).map_err(|_| bad("not hex"))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| bad("not 32 bytes (64 hex digits)"))?;
        Self::from_bytes(&key)
    }

    /// A key from its raw bytes (tests; [`Self::load_or_create`] otherwise).
    pub fn from_bytes(key: &[u8; 32]) -> Result<Self, PkiError> {
        // Two keys from one: HMAC-SHA256 of fixed labels under the master key (HKDF-Expand
        // with a single block, in effect), so the MAC never shares a key with the cipher.
        let master = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        let derive = |label: &[u8]| ring::hmac::sign(&master, label);
        let enc = derive(b"shoal secrets at rest: aes-256-gcm");
        let mac = derive(b"shoal secrets at rest: version");
        let unbound = UnboundKey::new(&AES_256_GCM, enc.as_ref()).map_err(|_| PkiError::Issue {
            name: "the hub's secrets key".into(),
            reason: "not an AES-256 key".into(),
        })?;
        Ok(Self {
            aead: LessSafeKey::new(unbound),
            mac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, mac.as_ref()),
        })
    }

    /// `nonce || ciphertext || tag` of `plaintext`, bound to `name` and `version`.
    pub fn encrypt(
        &self,
        name: &str,
        version: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, SecretError> {
        let fail = || SecretError::Encrypt(name.to_string());
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| fail())?;
        let mut buf = plaintext.to_vec();
        self.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(at_rest_aad(name, version)),
                &mut buf,
            )
            .map_err(|_| fail())?;
        let mut out = nonce.to_vec();
        out.append(&mut buf);
        Ok(out)
    }

    /// The plaintext of a blob [`Self::encrypt`] made for `name` at `version`.
    pub fn decrypt(&self, name: &str, version: &str, blob: &[u8]) -> Result<Vec<u8>, SecretError> {
        let fail = || SecretError::Decrypt(name.to_string());
        if blob.len() < NONCE_LEN {
            return Err(fail());
        }
        let (nonce, ct) = blob.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| fail())?;
        let mut buf = ct.to_vec();
        let plain = self
            .aead
            .open_in_place(nonce, Aad::from(at_rest_aad(name, version)), &mut buf)
            .map_err(|_| fail())?;
        Ok(plain.to_vec())
    }

    /// A 16-hex-digit keyed fingerprint of `name`'s content `plaintext`.
    pub fn version(&self, name: &str, plaintext: &[u8]) -> String {
        let mut ctx = ring::hmac::Context::with_key(&self.mac);
        ctx.update(&(name.len() as u64).to_be_bytes());
        ctx.update(name.as_bytes());
        ctx.update(plaintext);
        hex::encode(&ctx.sign().as_ref()[..8])
    }
}

/// The associated data of a secret at rest: its name and version.
fn at_rest_aad(name: &str, version: &str) -> Vec<u8> {
    format!("{name}\n{version}").into_bytes()
}

/// A secret sealed to one device: HPKE's encapsulated key and the ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub enc: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// The associated data of a sealed secret: which device, secret and version it is for.
fn aad(device: &str, name: &str, version: &str) -> Vec<u8> {
    format!("{device}\n{name}\n{version}").into_bytes()
}

/// Seals `plaintext` (secret `name` at `version`) to the key of `device`'s certificate
/// (`cert_pem`, the hub's enrollment record).
pub fn seal_to_device(
    cert_pem: &str,
    device: &str,
    name: &str,
    version: &str,
    plaintext: &[u8],
) -> Result<Sealed, SecretError> {
    let fail = |reason: String| SecretError::Seal {
        name: name.to_string(),
        device: device.to_string(),
        reason,
    };
    let der = crate::tls::first_cert(cert_pem).map_err(|e| fail(e.to_string()))?;
    let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| fail(format!("its certificate does not parse: {e}")))?;
    let point = &x509.public_key().subject_public_key.data;
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(point)
        .map_err(|_| fail("its certificate's key is not a P-256 key".into()))?;
    let (enc, ciphertext) = hpke::single_shot_seal::<Aead, Kdf, Kem>(
        &hpke::OpModeS::Base,
        &pk,
        INFO,
        plaintext,
        &aad(device, name, version),
    )
    .map_err(|e| fail(e.to_string()))?;
    Ok(Sealed {
        enc: enc.to_bytes().to_vec(),
        ciphertext,
    })
}

/// Opens a secret sealed to this device, with its private key (`key_pem`, PKCS#8).
pub fn open_on_device(
    key_pem: &str,
    device: &str,
    name: &str,
    version: &str,
    sealed: &Sealed,
) -> Result<Vec<u8>, SecretError> {
    use p256::pkcs8::DecodePrivateKey;
    use rustls::pki_types::pem::PemObject;
    let fail = |reason: &str| SecretError::Open {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| fail("the device key is not a PKCS#8 PEM key"))?;
    let sk = p256::SecretKey::from_pkcs8_der(der.secret_pkcs8_der())
        .map_err(|_| fail("the device key is not a P-256 key"))?;
    let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(&sk.to_bytes())
        .map_err(|_| fail("the device key is not a P-256 key"))?;
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&sealed.enc)
        .map_err(|_| fail("its encapsulated key is malformed"))?;
    hpke::single_shot_open::<Aead, Kdf, Kem>(
        &hpke::OpModeR::Base,
        &sk,
        &enc,
        INFO,
        &sealed.ciphertext,
        &aad(device, name, version),
    )
    .map_err(|_| {
        fail("it does not decrypt with this device's key (sealed to another key, or tampered with)")
    })
}

/// Reads a device's enrollment certificate (for [`seal_to_device`]).
pub fn read_cert(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(io_err("read", path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn device(name: &str) -> (String, String) {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::ca::FleetCa::load_or_create(dir.path()).unwrap();
        let (key, csr) = crate::device::key_and_csr(name).unwrap();
        let cert = ca
            .sign_csr(&csr, name, std::time::Duration::from_secs(3600))
            .unwrap();
        (key, cert)
    }

    #[test]
    fn at_rest_roundtrip_bound_to_name_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pki/secrets.key");
        let k = SecretsKey::load_or_create(&path).unwrap();
        let blob = k.encrypt("db", "v1", b"hunter2").unwrap();
        assert!(!blob.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(k.decrypt("db", "v1", &blob).unwrap(), b"hunter2");
        // Same file, same key; another name, version or key does not open it.
        let again = SecretsKey::load_or_create(&path).unwrap();
        assert_eq!(again.decrypt("db", "v1", &blob).unwrap(), b"hunter2");
        assert!(k.decrypt("web", "v1", &blob).is_err());
        assert!(k.decrypt("db", "v2", &blob).is_err());
        let other = SecretsKey::from_bytes(&[7; 32]).unwrap();
        assert!(other.decrypt("db", "v1", &blob).is_err());
        let mut bad = blob.clone();
        bad[20] ^= 1;
        assert!(k.decrypt("db", "v1", &bad).is_err());
        assert!(k.decrypt("db", "v1", &blob[..5]).is_err());
        // A fresh nonce every time.
        assert_ne!(k.encrypt("db", "v1", b"hunter2").unwrap(), blob);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn versions_follow_content_and_key() {
        let k = SecretsKey::from_bytes(&[1; 32]).unwrap();
        assert_eq!(k.version("db", b"a"), k.version("db", b"a"));
        assert_ne!(k.version("db", b"a"), k.version("db", b"b"));
        assert_ne!(k.version("db", b"a"), k.version("dc", b"a"));
        assert_ne!(
            k.version("db", b"a"),
            SecretsKey::from_bytes(&[2; 32])
                .unwrap()
                .version("db", b"a")
        );
        assert_eq!(k.version("db", b"a").len(), 16);
    }

    #[test]
    fn sealed_to_one_device_opens_only_there() {
        let (key_a, cert_a) = device("dev-a");
        let (key_b, _) = device("dev-b");
        let s = seal_to_device(&cert_a, "dev-a", "db", "v1", b"hunter2").unwrap();
        assert!(!s.ciphertext.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(
            open_on_device(&key_a, "dev-a", "db", "v1", &s).unwrap(),
            b"hunter2"
        );
        // Another device's key, or another device / name / version in the binding: refused.
        let err = open_on_device(&key_b, "dev-a", "db", "v1", &s).unwrap_err();
        assert!(err.to_string().contains("does not decrypt"), "{err}");
        assert!(open_on_device(&key_a, "dev-b", "db", "v1", &s).is_err());
        assert!(open_on_device(&key_a, "dev-a", "dc", "v1", &s).is_err());
        assert!(open_on_device(&key_a, "dev-a", "db", "v2", &s).is_err());
        let mut t = s.clone();
        t.ciphertext[0] ^= 1;
        assert!(open_on_device(&key_a, "dev-a", "db", "v1", &t).is_err());
        let mut t = s.clone();
        t.enc.truncate(10);
        assert!(open_on_device(&key_a, "dev-a", "db", "v1", &t).is_err());
        assert!(open_on_device("not a key", "dev-a", "db", "v1", &s).is_err());
        assert!(seal_to_device("not a cert", "dev-a", "db", "v1", b"x").is_err());
    }
}
