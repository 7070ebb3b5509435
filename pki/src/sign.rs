//! The hub's signature over desired state (ed25519, ring). The hub signs the exact bytes of
//! each [`DesiredState`](shoal_api::wire::messages::DesiredState) and publishes them in a
//! [`SignedDesired`] envelope; an agent opens the envelope with the hub's public key (from
//! enrollment) before it parses anything, so a forged retained message changes nothing.

use crate::{read_string, write_atomic, PkiError};
use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use shoal_api::wire::messages::SignedDesired;
use std::path::Path;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Why a desired-state message was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("not a signed desired state: {0}")]
    Malformed(String),
    #[error("the signature does not verify with the hub's key (forged or corrupted)")]
    BadSignature,
}

pub struct HubSigner {
    key: Ed25519KeyPair,
}

impl std::fmt::Debug for HubSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HubSigner({})", self.public_key_b64())
    }
}

impl HubSigner {
    /// Loads the key from `path` (PKCS#8, base64), generating it if absent.
    pub fn load_or_create(path: &Path) -> Result<Self, PkiError> {
        if !path.exists() {
            let rng = ring::rand::SystemRandom::new();
            let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| PkiError::Issue {
                name: "the hub's signing key".into(),
                reason: "key generation failed".into(),
            })?;
            write_atomic(path, B64.encode(doc.as_ref()).as_bytes(), 0o600)?;
        }
        let bad = |reason: String| PkiError::BadFile {
            what: "the hub's signing key",
            path: path.display().to_string(),
            reason,
        };
        let der = B64
            .decode(read_string(path)?.trim())
            .map_err(|e| bad(e.to_string()))?;
        let key = Ed25519KeyPair::from_pkcs8(&der).map_err(|e| bad(e.to_string()))?;
        Ok(Self { key })
    }

    pub fn public_key_b64(&self) -> String {
        B64.encode(self.key.public_key().as_ref())
    }

    /// The signature (base64) over a precompiled artifact: native code a runtime-only agent
    /// loads only if the hub's signing key vouches for it (see [`verify_artifact`]).
    pub fn sign_artifact(
        &self,
        digest: &str,
        target: &str,
        engine: &str,
        artifact: &[u8],
    ) -> String {
        let statement = artifact_statement(digest, target, engine, artifact);
        B64.encode(self.key.sign(&statement).as_ref())
    }

    /// The envelope for `state` (the exact bytes agents will parse).
    pub fn seal(&self, state: &[u8]) -> Vec<u8> {
        let env = SignedDesired {
            state: B64.encode(state),
            signature: B64.encode(self.key.sign(state).as_ref()),
        };
        // Serializing two strings cannot fail.
        serde_json::to_vec(&env).unwrap_or_default()
    }
}

/// The hub's public key as agents keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubKey(Vec<u8>);

impl HubKey {
    pub fn from_b64(s: &str) -> Result<Self, OpenError> {
        let raw = B64
            .decode(s.trim())
            .map_err(|e| OpenError::Malformed(format!("hub key {s:?}: {e}")))?;
        if raw.len() != 32 {
            return Err(OpenError::Malformed(format!(
                "hub key {s:?}: {} bytes, expected 32",
                raw.len()
            )));
        }
        Ok(Self(raw))
    }
}

/// Opens an envelope: the state's bytes if the signature verifies with `key`. With `key`
/// `None` (an agent run with `--insecure`, which has no hub key) the signature is not checked.
pub fn open(key: Option<&HubKey>, payload: &[u8]) -> Result<Vec<u8>, OpenError> {
    let env: SignedDesired =
        serde_json::from_slice(payload).map_err(|e| OpenError::Malformed(e.to_string()))?;
    let state = B64
        .decode(&env.state)
        .map_err(|e| OpenError::Malformed(format!("state: {e}")))?;
    if let Some(HubKey(k)) = key {
        let sig = B64
            .decode(&env.signature)
            .map_err(|e| OpenError::Malformed(format!("signature: {e}")))?;
        UnparsedPublicKey::new(&ED25519, k)
            .verify(&state, &sig)
            .map_err(|_| OpenError::BadSignature)?;
    }
    Ok(state)
}

/// What the hub signs for a precompiled artifact: module digest, target, engine and the
/// artifact's SHA-256, under a prefix no desired state (JSON) starts with, so neither
/// signature can pass for the other.
fn artifact_statement(digest: &str, target: &str, engine: &str, artifact: &[u8]) -> Vec<u8> {
    format!(
        "shoal precompiled artifact v1\n{digest}\n{target}\n{engine}\n{}",
        crate::sha256_hex(artifact)
    )
    .into_bytes()
}

/// Checks the hub's signature (`signature`, base64) over an artifact compiled from module
/// `digest` for `target` and `engine`, before a runtime-only agent keeps or loads it.
pub fn verify_artifact(
    key: &HubKey,
    digest: &str,
    target: &str,
    engine: &str,
    artifact: &[u8],
    signature: &str,
) -> Result<(), OpenError> {
    let sig = B64
        .decode(signature.trim())
        .map_err(|e| OpenError::Malformed(format!("artifact signature: {e}")))?;
    UnparsedPublicKey::new(&ED25519, &key.0)
        .verify(&artifact_statement(digest, target, engine, artifact), &sig)
        .map_err(|_| OpenError::BadSignature)
}

/// Why an agent did not take a log request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogRequestRefused {
    #[error(
        "log request {0:?} is not signed (a hub older than this agent, or forged): upgrade the hub"
    )]
    Unsigned(String),
    #[error(
        "log request {0:?}: the signature does not verify with the hub's key (forged or corrupted)"
    )]
    BadSignature(String),
    #[error("log request {request:?} is for device {device:?}, not this one")]
    OtherDevice { request: String, device: String },
    #[error("log request {request:?} was issued at {issued_ms}, long before the newest one taken ({newest_ms}): a replay?")]
    Stale {
        request: String,
        issued_ms: u64,
        newest_ms: u64,
    },
}

/// How much older than the newest request taken a request may be (hub clock): more than a
/// follow request's lease, so renewals in flight pass.
pub const LOG_REQUEST_WINDOW_MS: u64 = 5 * 60 * 1000;

impl HubSigner {
    /// Signs a log request for `device` at `now_ms` (its device and time set here).
    pub fn sign_log_request(
        &self,
        req: &mut shoal_api::wire::messages::LogRequest,
        device: &shoal_api::model::ids::DeviceId,
        now_ms: u64,
    ) {
        req.device_id = Some(device.clone());
        req.issued_ms = now_ms;
        req.signature = None;
        req.signature = Some(B64.encode(self.key.sign(&req.statement()).as_ref()));
    }
}

/// The agent's check of a log request: the hub's signature, this device, and not older than
/// the newest taken (`newest_ms`) by more than [`LOG_REQUEST_WINDOW_MS`].
pub fn verify_log_request(
    key: &HubKey,
    own: &shoal_api::model::ids::DeviceId,
    newest_ms: u64,
    req: &shoal_api::wire::messages::LogRequest,
) -> Result<(), LogRequestRefused> {
    let id = || req.request.clone();
    let sig = req
        .signature
        .as_deref()
        .ok_or_else(|| LogRequestRefused::Unsigned(id()))?;
    let sig = B64
        .decode(sig)
        .map_err(|_| LogRequestRefused::BadSignature(id()))?;
    UnparsedPublicKey::new(&ED25519, &key.0)
        .verify(&req.statement(), &sig)
        .map_err(|_| LogRequestRefused::BadSignature(id()))?;
    if req.device_id.as_ref() != Some(own) {
        return Err(LogRequestRefused::OtherDevice {
            request: id(),
            device: req
                .device_id
                .as_ref()
                .map_or_else(String::new, ToString::to_string),
        });
    }
    if req.issued_ms.saturating_add(LOG_REQUEST_WINDOW_MS) < newest_ms {
        return Err(LogRequestRefused::Stale {
            request: id(),
            issued_ms: req.issued_ms,
            newest_ms,
        });
    }
    Ok(())
}

/// Why an agent did not take a desired-state message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error(transparent)]
    Envelope(#[from] OpenError),
    #[error("the signed state is not a desired state: {0}")]
    Malformed(String),
    #[error("the state is for device {0:?}, not this one")]
    OtherDevice(String),
    #[error("generation {got} is older than generation {have} in force (a replay?)")]
    Replayed { got: u64, have: u64 },
    /// The state in force, delivered again (every reconnect re-delivers the retained one).
    #[error("generation {0} is the one in force")]
    Same(u64),
}

/// The agent's whole check of a desired-state message, before anything is stored or run:
/// the hub's signature over the exact bytes (unless `key` is `None`, `--insecure`), then the
/// device id, then a generation newer than `have`.
pub fn verify_desired(
    key: Option<&HubKey>,
    own: &shoal_api::model::ids::DeviceId,
    have: u64,
    payload: &[u8],
) -> Result<shoal_api::wire::messages::DesiredState, Rejected> {
    let bytes = open(key, payload)?;
    let d: shoal_api::wire::messages::DesiredState =
        serde_json::from_slice(&bytes).map_err(|e| Rejected::Malformed(e.to_string()))?;
    if &d.device_id != own {
        return Err(Rejected::OtherDevice(d.device_id.to_string()));
    }
    match d.generation {
        g if g < have => Err(Rejected::Replayed { got: g, have }),
        g if g == have => Err(Rejected::Same(g)),
        _ => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_request_works_only_as_the_hub_signed_it_for_this_device() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubSigner::load_or_create(&dir.path().join("k")).unwrap();
        let key = HubKey::from_b64(&hub.public_key_b64()).unwrap();
        let d1 = shoal_api::model::ids::DeviceId::try_from("d1").unwrap();
        let d2 = shoal_api::model::ids::DeviceId::try_from("d2").unwrap();
        let mut req = shoal_api::wire::messages::LogRequest {
            protocol: 1,
            request: "r1".into(),
            workload: "web".into(),
            tail: Some(5),
            since_secs: None,
            follow: true,
            lease_secs: 30,
            cancel: false,
            device_id: None,
            issued_ms: 0,
            signature: None,
        };
        let unsigned = req.clone();
        hub.sign_log_request(&mut req, &d1, 1_000_000);
        assert_eq!(verify_log_request(&key, &d1, 0, &req), Ok(()));
        // Within the window of the newest taken, a renewal passes; far older does not.
        assert_eq!(
            verify_log_request(&key, &d1, 1_000_000 + LOG_REQUEST_WINDOW_MS, &req),
            Ok(())
        );
        assert!(matches!(
            verify_log_request(&key, &d1, 1_000_001 + LOG_REQUEST_WINDOW_MS, &req),
            Err(LogRequestRefused::Stale { .. })
        ));
        assert!(matches!(
            verify_log_request(&key, &d2, 0, &req),
            Err(LogRequestRefused::OtherDevice { .. })
        ));
        assert!(matches!(
            verify_log_request(&key, &d1, 0, &unsigned),
            Err(LogRequestRefused::Unsigned(_))
        ));
        for tamper in [
            |r: &mut shoal_api::wire::messages::LogRequest| r.workload = "vault".into(),
            |r: &mut shoal_api::wire::messages::LogRequest| {
                r.device_id = shoal_api::model::ids::DeviceId::try_from("d2").ok()
            },
            |r: &mut shoal_api::wire::messages::LogRequest| r.issued_ms += 1,
            |r: &mut shoal_api::wire::messages::LogRequest| r.cancel = true,
        ] {
            let mut t = req.clone();
            tamper(&mut t);
            assert!(
                matches!(
                    verify_log_request(&key, &d1, 0, &t),
                    Err(LogRequestRefused::BadSignature(_))
                        | Err(LogRequestRefused::OtherDevice { .. })
                ),
                "{t:?}"
            );
        }
        let other = HubSigner::load_or_create(&dir.path().join("k2")).unwrap();
        let mut forged = unsigned;
        other.sign_log_request(&mut forged, &d1, 1_000_000);
        assert!(matches!(
            verify_log_request(&key, &d1, 0, &forged),
            Err(LogRequestRefused::BadSignature(_))
        ));
    }

    #[test]
    fn an_artifact_loads_only_as_the_hub_signed_it() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubSigner::load_or_create(&dir.path().join("k")).unwrap();
        let key = HubKey::from_b64(&hub.public_key_b64()).unwrap();
        let (d, t, e) = ("sha256:ab", "pulley32", "wasmtime-48+shoal.1");
        let sig = hub.sign_artifact(d, t, e, b"\x7fELF code");
        assert_eq!(
            verify_artifact(&key, d, t, e, b"\x7fELF code", &sig),
            Ok(())
        );
        // Tampered code, another module, another target, another key: refused.
        let bad = [
            verify_artifact(&key, d, t, e, b"\x7fELF c0de", &sig),
            verify_artifact(&key, "sha256:cd", t, e, b"\x7fELF code", &sig),
            verify_artifact(&key, d, "pulley64", e, b"\x7fELF code", &sig),
        ];
        assert!(
            bad.iter().all(|r| *r == Err(OpenError::BadSignature)),
            "{bad:?}"
        );
        let other = HubSigner::load_or_create(&dir.path().join("o")).unwrap();
        let forged = other.sign_artifact(d, t, e, b"\x7fELF code");
        assert_eq!(
            verify_artifact(&key, d, t, e, b"\x7fELF code", &forged),
            Err(OpenError::BadSignature)
        );
        // A desired state's signature is no artifact's.
        let env: SignedDesired = serde_json::from_slice(&hub.seal(b"\x7fELF code")).unwrap();
        assert!(verify_artifact(&key, d, t, e, b"\x7fELF code", &env.signature).is_err());
        assert!(matches!(
            verify_artifact(&key, d, t, e, b"x", "not base64!"),
            Err(OpenError::Malformed(_))
        ));
    }

    #[test]
    fn sealed_state_opens_only_with_the_hub_key_and_untampered() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubSigner::load_or_create(&dir.path().join("k")).unwrap();
        let again = HubSigner::load_or_create(&dir.path().join("k")).unwrap();
        assert_eq!(hub.public_key_b64(), again.public_key_b64());
        let key = HubKey::from_b64(&hub.public_key_b64()).unwrap();
        let sealed = hub.seal(b"{\"generation\":7}");
        assert_eq!(open(Some(&key), &sealed).unwrap(), b"{\"generation\":7}");

        // Tampered state: same signature, other bytes.
        let mut env: SignedDesired = serde_json::from_slice(&sealed).unwrap();
        env.state = B64.encode(b"{\"generation\":8}");
        let forged = serde_json::to_vec(&env).unwrap();
        assert_eq!(open(Some(&key), &forged), Err(OpenError::BadSignature));
        // Signed by another key.
        let other = HubSigner::load_or_create(&dir.path().join("other")).unwrap();
        assert_eq!(
            open(Some(&key), &other.seal(b"{}")),
            Err(OpenError::BadSignature)
        );
        // Not an envelope at all (a bare desired state).
        assert!(matches!(
            open(Some(&key), b"{\"generation\":9}"),
            Err(OpenError::Malformed(_))
        ));
        // Without a key (--insecure) the signature is not checked.
        assert_eq!(open(None, &forged).unwrap(), b"{\"generation\":8}");
        assert!(HubKey::from_b64("AAAA").is_err());
    }

    #[test]
    fn verify_desired_table() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubSigner::load_or_create(&dir.path().join("k")).unwrap();
        let key = HubKey::from_b64(&hub.public_key_b64()).unwrap();
        let me = shoal_api::model::ids::DeviceId::try_from("edge-a").unwrap();
        let state = |dev: &str, g: u64| {
            hub.seal(format!(r#"{{"deviceId":"{dev}","generation":{g}}}"#).as_bytes())
        };
        assert_eq!(
            verify_desired(Some(&key), &me, 4, &state("edge-a", 5))
                .unwrap()
                .generation,
            5
        );
        assert_eq!(
            verify_desired(Some(&key), &me, 5, &state("edge-a", 5)),
            Err(Rejected::Same(5))
        );
        assert_eq!(
            verify_desired(Some(&key), &me, 6, &state("edge-a", 5)),
            Err(Rejected::Replayed { got: 5, have: 6 })
        );
        assert!(matches!(
            verify_desired(Some(&key), &me, 0, &state("edge-b", 9)),
            Err(Rejected::OtherDevice(_))
        ));
        assert!(matches!(
            verify_desired(Some(&key), &me, 0, &hub.seal(b"[1,2]")),
            Err(Rejected::Malformed(_))
        ));
        let other = HubSigner::load_or_create(&dir.path().join("o")).unwrap();
        let forged = other.seal(br#"{"deviceId":"edge-a","generation":99}"#);
        assert_eq!(
            verify_desired(Some(&key), &me, 0, &forged),
            Err(Rejected::Envelope(OpenError::BadSignature))
        );
    }
}
