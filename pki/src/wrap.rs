//! Private keys wrapped for a store the hub does not fully trust (etcd, shared by hub
//! replicas): the fleet CA's key, the signing key and the secrets key travel through it only
//! encrypted under a key-encryption key ([`Kek`]) that each replica gets out of band (a file
//! the operator copies), so whoever reads etcd, or its backups, or the path to it, holds
//! ciphertext only.
//!
//! A wrapped key is [`MAGIC`] followed by what [`SecretsKey::encrypt`] makes (AES-256-GCM, a
//! fresh nonce, the key's file name as associated data, so a wrapped key cannot be swapped
//! for another). The KEK file has the secrets key's format (64 hex digits) under its own
//! random value.

use crate::secret::SecretsKey;
use crate::PkiError;
use std::path::Path;

/// How a wrapped key starts (a raw key, PEM or hex, never does).
pub const MAGIC: &[u8] = b"shoal-wrapped-v1\n";

/// Associated-data "version" of wrapped keys.
const WRAP_VERSION: &str = "kek-v1";

/// The key-encryption key.
#[derive(Debug)]
pub struct Kek(SecretsKey);

#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    #[error("cannot wrap {0:?}")]
    Wrap(String),
    #[error("{name:?} does not open with the key-encryption key {kek:?}: it is not the one the fleet's keys were wrapped with (copy that file from a replica that runs)")]
    WrongKek { name: String, kek: String },
}

impl Kek {
    /// The KEK in `path`, created there (owner-only, 32 random bytes as hex, the directory
    /// left as it is) if there is none and `create` says so. `Ok(None)`: no file, and not to
    /// be created. A KEK that other users may read is refused.
    pub fn load(path: &Path, create: bool) -> Result<Option<Kek>, PkiError> {
        use std::os::unix::fs::PermissionsExt;
        if !path.exists() {
            if !create {
                return Ok(None);
            }
            let mut key = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).map_err(
                |_| PkiError::Issue {
                    name: "the key-encryption key".into(),
                    reason: "no randomness".into(),
                },
            )?;
            // Another replica (or hub) creating it at once: the first one's is the key.
            crate::write_new(path, hex::encode(key).as_bytes(), 0o600)?;
        }
        let bad = |reason: &str| PkiError::BadFile {
            what: "the key-encryption key",
            path: path.display().to_string(),
            reason: reason.to_string(),
        };
        let meta = std::fs::metadata(path).map_err(crate::io_err("read", path))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(bad("other users may read it: chmod 600"));
        }
        let bytes = hex::decode(crate::read_string(path)?.trim()).map_err(|_| bad("not hex"))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| bad("not 32 bytes (64 hex digits)"))?;
        SecretsKey::from_bytes(&key).map(|k| Some(Kek(k)))
    }

    /// `bytes` (the file `name`) wrapped.
    pub fn wrap(&self, name: &str, bytes: &[u8]) -> Result<Vec<u8>, WrapError> {
        let sealed = self
            .0
            .encrypt(&format!("kek:{name}"), WRAP_VERSION, bytes)
            .map_err(|_| WrapError::Wrap(name.to_string()))?;
        let mut out = MAGIC.to_vec();
        out.extend(sealed);
        Ok(out)
    }

    /// The key `name` that [`Kek::wrap`] wrapped into `blob`; `kek` names the file in errors.
    pub fn unwrap(&self, name: &str, blob: &[u8], kek: &Path) -> Result<Vec<u8>, WrapError> {
        let wrong = || WrapError::WrongKek {
            name: name.to_string(),
            kek: kek.display().to_string(),
        };
        let sealed = blob.strip_prefix(MAGIC).ok_or_else(wrong)?;
        self.0
            .decrypt(&format!("kek:{name}"), WRAP_VERSION, sealed)
            .map_err(|_| wrong())
    }
}

/// Whether `blob` is a wrapped key (else it is a raw one, stored by an older hub).
pub fn is_wrapped(blob: &[u8]) -> bool {
    blob.starts_with(MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_open_only_under_their_name_and_kek() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etcd.kek");
        assert!(Kek::load(&path, false).unwrap().is_none());
        let kek = Kek::load(&path, true).unwrap().unwrap();
        let raw = b"-----BEGIN PRIVATE KEY-----\nMIG...\n";
        let w = kek.wrap("ca.key", raw).unwrap();
        assert!(is_wrapped(&w) && !is_wrapped(raw));
        assert!(!w.windows(11).any(|x| x == b"PRIVATE KEY"));
        assert_eq!(kek.unwrap("ca.key", &w, &path).unwrap(), raw);
        // Under another name, or another KEK, it does not open; a raw key is no wrapped one.
        assert!(kek.unwrap("signing.key", &w, &path).is_err());
        let other = Kek::load(&dir.path().join("other.kek"), true)
            .unwrap()
            .unwrap();
        let e = other.unwrap("ca.key", &w, &path).unwrap_err().to_string();
        assert!(e.contains("\"ca.key\"") && e.contains("etcd.kek"), "{e}");
        assert!(kek.unwrap("ca.key", raw, &path).is_err());
        // The file is the owner's alone, and loads again as the same key; the directory it
        // is in keeps its mode.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let shared = tempfile::tempdir().unwrap();
        std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Kek::load(&shared.path().join("k"), true).unwrap().unwrap();
        let dir_mode = std::fs::metadata(shared.path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o755, "a KEK does not change its directory");
        let again = Kek::load(&path, false).unwrap().unwrap();
        assert_eq!(again.unwrap("ca.key", &w, &path).unwrap(), raw);
        // Readable by others: refused.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Kek::load(&path, false).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }
}
