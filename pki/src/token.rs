//! One-time, expiring join tokens: `SHL1.<sha256 of the fleet CA>.<id>.<secret>`.
//!
//! The CA hash lets a new device pin the hub's CA before it trusts anything (as K3s's
//! `K10<hash>::…` tokens do); the id names the token's file on the hub; the secret proves the
//! holder was given the token. The hub keeps `DATA_DIR/pki/tokens/<id>.json` with the
//! secret's SHA-256 and the expiry, written atomically so that `shoal-hub token create` works
//! while the hub runs (sled locks the hub's store to one process). Enrollment checks the
//! secret and the expiry and then claims the token by renaming its file, which only one
//! enrollment can do.

use crate::{io_err, write_atomic, PkiError};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

const PREFIX: &str = "SHL1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The secret is never quoted: `shown` masks it.
    #[error("join token {shown:?} is malformed: {reason}")]
    Malformed { shown: String, reason: &'static str },
    #[error("join token {id:?} is refused: {reason}")]
    Refused { id: String, reason: &'static str },
}

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_hash: String,
    pub id: String,
    secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}.***", self.ca_hash, self.id)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}", self.ca_hash, self.id, self.secret)
    }
}

impl JoinToken {
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl FromStr for JoinToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, TokenError> {
        let s = s.trim();
        let parts: Vec<&str> = s.split('.').collect();
        let shown = match parts.as_slice() {
            [p, h, id, _] => format!("{p}.{h}.{id}.***"),
            _ => "(not four dot-separated parts)".to_string(),
        };
        let bad = |reason| TokenError::Malformed {
            shown: shown.clone(),
            reason,
        };
        let [p, h, id, secret] = parts.as_slice() else {
            return Err(bad("expected SHL1.<ca hash>.<id>.<secret>"));
        };
        if *p != PREFIX {
            return Err(bad("it does not start with SHL1"));
        }
        if !is_hex(h, 64) {
            return Err(bad("the CA hash is not 64 lowercase hex digits"));
        }
        if !is_hex(id, 16) {
            return Err(bad("the id is not 16 lowercase hex digits"));
        }
        if !is_hex(secret, 32) {
            return Err(bad("the secret is not 32 lowercase hex digits"));
        }
        Ok(Self {
            ca_hash: h.to_string(),
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }
}

/// A token as the hub stores it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    secret_sha256: String,
    expires_ms: u64,
    created_ms: u64,
    /// The only device id the token may enroll (`token create --device`); needed to enroll
    /// an id again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device: Option<String>,
}

/// The hub's token directory, `DATA_DIR/pki/tokens`.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

impl TokenStore {
    pub fn new(pki_dir: &Path) -> Self {
        Self {
            dir: pki_dir.join("tokens"),
        }
    }

    /// Issues a token valid for `ttl_ms` from `now_ms` for the CA whose hash is `ca_hash`,
    /// bound to `device` if given.
    pub fn create(
        &self,
        ca_hash: &str,
        now_ms: u64,
        ttl_ms: u64,
        device: Option<&str>,
    ) -> Result<JoinToken, PkiError> {
        crate::private_dir(&self.dir)?;
        let token = JoinToken {
            ca_hash: ca_hash.to_string(),
            id: hex::encode(rand::random::<[u8; 8]>()),
            secret: hex::encode(rand::random::<[u8; 16]>()),
        };
        let stored = Stored {
            secret_sha256: crate::sha256_hex(token.secret.as_bytes()),
            expires_ms: now_ms.saturating_add(ttl_ms),
            created_ms: now_ms,
            device: device.map(str::to_string),
        };
        let json = serde_json::to_vec_pretty(&stored).map_err(|e| PkiError::Tls(e.to_string()))?;
        write_atomic(&self.dir.join(format!("{}.json", token.id)), &json, 0o600)?;
        Ok(token)
    }

    /// Checks `id`/`secret` for enrolling `device` and claims the token: it can never be used
    /// again. A token bound to a device enrolls only that one; an id that is `enrolled`
    /// already needs a token bound to it (so a token cannot take over an existing device).
    /// A refused token stays as it was.
    pub fn consume(
        &self,
        id: &str,
        secret: &str,
        device: &str,
        enrolled: bool,
        now_ms: u64,
    ) -> Result<(), PkiError> {
        let refused = |reason| {
            PkiError::Token(TokenError::Refused {
                id: id.to_string(),
                reason,
            })
        };
        if !is_hex(id, 16) {
            return Err(refused("no such token"));
        }
        let path = self.dir.join(format!("{id}.json"));
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(refused("no such token, or it was already used"))
            }
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let stored: Stored = serde_json::from_slice(&bytes).map_err(|e| PkiError::BadFile {
            what: "join token",
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        // Comparing hashes: equal-time comparison is not needed, the hash hides the secret.
        if crate::sha256_hex(secret.as_bytes()) != stored.secret_sha256 {
            return Err(refused("wrong secret"));
        }
        if now_ms > stored.expires_ms {
            return Err(refused("expired"));
        }
        match &stored.device {
            Some(d) if d != device => return Err(refused("it is bound to another device id")),
            None if enrolled => {
                return Err(refused(
                    "this device id is enrolled already; to enroll it again, use a token made for it (shoal-hub token create --device ID)",
                ))
            }
            _ => {}
        }
        let used = self.dir.join(format!("{id}.used"));
        match std::fs::rename(&path, &used) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(refused("no such token, or it was already used"))
            }
            Err(e) => Err(io_err("claim", &path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_round_trips_and_masks_the_secret() {
        let t = JoinToken {
            ca_hash: "a".repeat(64),
            id: "0123456789abcdef".into(),
            secret: "f".repeat(32),
        };
        let s = t.to_string();
        assert_eq!(s.parse::<JoinToken>().unwrap(), t);
        assert!(!format!("{t:?}").contains(&"f".repeat(32)));
        for (bad, why) in [
            ("SHL2.x.y.z", "SHL1"),
            ("nope", "four"),
            (
                &format!("SHL1.{}.0123.{}", "a".repeat(64), "f".repeat(32)),
                "id",
            ),
            (
                &format!(
                    "SHL1.{}.0123456789abcdef.{}",
                    "A".repeat(64),
                    "f".repeat(32)
                ),
                "CA hash",
            ),
        ] {
            let e = bad.parse::<JoinToken>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains(&"f".repeat(32)), "{e}");
        }
    }

    #[test]
    fn a_token_is_used_once_and_not_after_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        let t = store.create(&"a".repeat(64), 1000, 500, None).unwrap();
        let e = store
            .consume(&t.id, &"0".repeat(32), "d", false, 1001)
            .unwrap_err();
        assert!(e.to_string().contains("wrong secret"), "{e}");
        // An unbound token does not enroll an id that is enrolled already.
        let e = store
            .consume(&t.id, t.secret(), "d", true, 1001)
            .unwrap_err();
        assert!(e.to_string().contains("enrolled already"), "{e}");
        store.consume(&t.id, t.secret(), "d", false, 1001).unwrap();
        let e = store
            .consume(&t.id, t.secret(), "d", false, 1002)
            .unwrap_err();
        assert!(e.to_string().contains("already used"), "{e}");
        let t = store.create(&"a".repeat(64), 1000, 500, None).unwrap();
        let e = store
            .consume(&t.id, t.secret(), "d", false, 1501)
            .unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
        // A bound token enrolls its device, even again, and no other.
        let b = store.create(&"a".repeat(64), 1000, 500, Some("d")).unwrap();
        let e = store
            .consume(&b.id, b.secret(), "e", false, 1001)
            .unwrap_err();
        assert!(e.to_string().contains("another device"), "{e}");
        store.consume(&b.id, b.secret(), "d", true, 1001).unwrap();
        let e = store
            .consume("../../etc/passwd", t.secret(), "d", false, 1000)
            .unwrap_err();
        assert!(e.to_string().contains("no such token"), "{e}");
    }
}
