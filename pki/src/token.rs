//! One-time, expiring join tokens: `SHL1.<sha256 of the fleet CA>.<id>.<secret>`.
//!
//! The CA hash lets a new device pin the hub's CA before it trusts anything (as K3s's
//! `K10<hash>::…` tokens do); the id names the token's record on the hub; the secret proves
//! the holder was given the token. The hub keeps a [`TokenRecord`] per token (the secret's
//! SHA-256, the expiry, the device it is bound to) and claims it at enrollment, once: where
//! and how atomically is the hub's `enrollment` module's business (files in
//! `DATA_DIR/pki/tokens`, or etcd for hub replicas). This module is pure.

use crate::PkiError;
use std::fmt;
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

/// Whether `id` can be a token id (16 lowercase hex digits): checked before it names a file
/// or a key.
pub fn valid_id(id: &str) -> bool {
    is_hex(id, 16)
}

impl JoinToken {
    /// A fresh token pinning the CA whose hash is `ca_hash`.
    pub fn generate(ca_hash: &str) -> JoinToken {
        JoinToken {
            ca_hash: ca_hash.to_string(),
            id: hex::encode(rand::random::<[u8; 8]>()),
            secret: hex::encode(rand::random::<[u8; 16]>()),
        }
    }
}

/// A token as the hub stores it (a file, or an etcd key): the secret's hash, never the
/// secret. Pure: where records live is the hub's business.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    secret_sha256: String,
    expires_ms: u64,
    created_ms: u64,
    /// The only device id the token may enroll (`token create --device`); needed to enroll
    /// an id again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    /// Labels the operator grants the device it enrolls (`token create --labels`): they
    /// steer placement, which a device's own labels never do.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    labels: std::collections::BTreeMap<String, String>,
    /// The device that used the token (stores that keep used tokens in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    used_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    used_ms: Option<u64>,
}

impl TokenRecord {
    /// The record of `token`, valid for `ttl_ms` from `now_ms`, bound to `device` if given,
    /// granting `labels` to the device it enrolls.
    pub fn new(
        token: &JoinToken,
        now_ms: u64,
        ttl_ms: u64,
        device: Option<&str>,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Self {
        TokenRecord {
            secret_sha256: crate::sha256_hex(token.secret.as_bytes()),
            expires_ms: now_ms.saturating_add(ttl_ms),
            created_ms: now_ms,
            device: device.map(str::to_string),
            labels,
            used_by: None,
            used_ms: None,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Plain strings and numbers: serializing cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Parses a stored record; `whence` (its file or key) names it in the error.
    pub fn from_json(bytes: &[u8], whence: &str) -> Result<Self, PkiError> {
        serde_json::from_slice(bytes).map_err(|e| PkiError::BadFile {
            what: "join token",
            path: whence.to_string(),
            reason: e.to_string(),
        })
    }

    /// Whether the holder of `secret` may enroll `device` with token `id` at `now_ms`. A token
    /// bound to a device enrolls only that one; an id that is `enrolled` already needs a
    /// token bound to it (so a token cannot take over an existing device).
    pub fn check(
        &self,
        id: &str,
        secret: &str,
        device: &str,
        enrolled: bool,
        now_ms: u64,
    ) -> Result<(), TokenError> {
        let refused = |reason| refused(id, reason);
        // The secret first: whoever knows only a token's id learns nothing of its state.
        // Comparing hashes: equal-time comparison is not needed, the hash hides the secret.
        if crate::sha256_hex(secret.as_bytes()) != self.secret_sha256 {
            return Err(refused("wrong secret"));
        }
        if self.used_by.is_some() {
            return Err(refused(USED));
        }
        if now_ms > self.expires_ms {
            return Err(refused("expired"));
        }
        match &self.device {
            Some(d) if d != device => Err(refused("it is bound to another device id")),
            None if enrolled => Err(refused(ENROLLED)),
            _ => Ok(()),
        }
    }

    /// The device id the token is bound to, if any (an unbound token enrolls new ids only).
    pub fn bound_to(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// The labels the token grants the device it enrolls.
    pub fn labels(&self) -> &std::collections::BTreeMap<String, String> {
        &self.labels
    }

    /// The record once `device` has used the token at `now_ms`.
    pub fn used(mut self, device: &str, now_ms: u64) -> Self {
        self.used_by = Some(device.to_string());
        self.used_ms = Some(now_ms);
        self
    }
}

/// Why a token that was used is refused.
pub const USED: &str = "it was already used";
/// Why a token the hub does not know is refused.
pub const UNKNOWN: &str = "no such token";
/// Why an unbound token is refused for an id that is enrolled.
pub const ENROLLED: &str = "this device id is enrolled already; to enroll it again, use a token made for it (shoal-hub token create --device ID)";

/// A refusal of token `id`.
pub fn refused(id: &str, reason: &'static str) -> TokenError {
    TokenError::Refused {
        id: id.to_string(),
        reason,
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
    fn a_token_is_checked_for_secret_expiry_binding_and_use() {
        let t = JoinToken::generate(&"a".repeat(64));
        let r = TokenRecord::new(&t, 1000, 500, None, Default::default());
        let check = |r: &TokenRecord, secret: &str, device, enrolled, now| {
            r.check(&t.id, secret, device, enrolled, now)
                .map_err(|e| e.to_string())
        };
        let e = check(&r, &"0".repeat(32), "d", false, 1001).unwrap_err();
        assert!(e.contains("wrong secret") && e.contains(&t.id), "{e}");
        // An unbound token does not enroll an id that is enrolled already.
        let e = check(&r, t.secret(), "d", true, 1001).unwrap_err();
        assert!(e.contains("enrolled already"), "{e}");
        check(&r, t.secret(), "d", false, 1500).unwrap();
        let e = check(&r, t.secret(), "d", false, 1501).unwrap_err();
        assert!(e.contains("expired"), "{e}");
        let used = r.clone().used("d", 1001);
        let e = check(&used, t.secret(), "d", false, 1002).unwrap_err();
        assert!(e.contains("already used"), "{e}");
        // Without the secret, a used token reads as any wrong one: its id alone tells
        // nothing of its state.
        let e = check(&used, &"0".repeat(32), "d", false, 1002).unwrap_err();
        assert!(
            e.contains("wrong secret") && !e.contains("already used"),
            "{e}"
        );
        // Records round-trip, and the secret is not in them.
        let json = used.to_json();
        assert_eq!(TokenRecord::from_json(&json, "k").unwrap(), used);
        assert!(!String::from_utf8_lossy(&json).contains(t.secret()));
        let e = TokenRecord::from_json(b"{", "tokens/x").unwrap_err();
        assert!(e.to_string().contains("tokens/x"), "{e}");
        // A bound token enrolls its device, even again, and no other.
        let b = TokenRecord::new(&t, 1000, 500, Some("d"), Default::default());
        let e = check(&b, t.secret(), "e", false, 1001).unwrap_err();
        assert!(e.contains("another device"), "{e}");
        check(&b, t.secret(), "d", true, 1001).unwrap();
        assert!(valid_id(&t.id) && !valid_id("../../etc/passwd"));
    }
}
