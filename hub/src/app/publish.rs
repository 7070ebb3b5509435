//! Publishing: secrets sealed to each device's key, desired states signed and sent, log
//! requests signed.

use super::*;
use crate::app::command::{Bus, Outbound};
use crate::app::keys::{NoDeviceKey, Route, Sealable};
use crate::store::{Store, StoredSecret};
use shoal_api::model::ids::DeviceId;
use shoal_api::wire::messages::DesiredState;
use shoal_daemon::clock::now_ms;
use std::collections::BTreeSet;
use tracing::warn;

/// The values of a stored secret, decrypted with the hub's secrets key.
pub(super) fn open_stored(
    key: &shoal_pki::secret::SecretsKey,
    s: &StoredSecret,
) -> Result<Vec<u8>, SealError> {
    let blob = shoal_api::model::secret::b64::decode(&s.encrypted)
        .ok_or_else(|| SealError::NotBase64(s.name.clone()))?;
    Ok(key.decrypt(s.name.as_str(), &s.version, &blob)?)
}

/// Why a secret was not sealed to a device (logged; the replicas that need it report it
/// missing).
#[derive(Debug, thiserror::Error)]
pub(super) enum SealError {
    #[error("the stored form of secret {:?} is not base64", .0.as_str())]
    NotBase64(shoal_api::model::ids::SecretName),
    #[error(transparent)]
    Crypto(#[from] shoal_pki::secret::SecretError),
    #[error(transparent)]
    NoKey(#[from] NoDeviceKey),
    #[error("the hub has no such secret")]
    Unknown,
    #[error("the desired state wants version {wanted}, the hub has {have}")]
    Version { wanted: String, have: String },
}

/// The state with the values of the secrets its workloads use, each sealed to `key` (the
/// certificate the device enrolled with), from the stored secrets it was committed with.
/// A secret that cannot be sealed is left out (the replicas that need it report it
/// missing) and the reason logged. CPU only: the key was read off the loop
/// ([`super::keys`]).
pub(super) fn seal(
    s: Sealable,
    key: Result<&str, NoDeviceKey>,
    secrets_key: &shoal_pki::secret::SecretsKey,
) -> DesiredState {
    let Sealable { mut state, secrets } = s;
    let wanted = wanted(&state);
    if wanted.is_empty() {
        return state;
    }
    let dev = &state.device_id;
    let mut sealed = Vec::new();
    for (name, version) in wanted {
        let r = key.clone().map_err(SealError::from).and_then(|cert| {
            let s = secrets
                .iter()
                .filter(|s| &s.name == name)
                .find(|s| s.version == version)
                .or_else(|| secrets.iter().find(|s| &s.name == name))
                .ok_or(SealError::Unknown)?;
            if s.version != version {
                return Err(SealError::Version {
                    wanted: version.to_string(),
                    have: s.version.clone(),
                });
            }
            let plain = open_stored(secrets_key, s)?;
            shoal_pki::secret::seal_to_device(cert, dev.as_str(), name.as_str(), version, &plain)
                .map_err(SealError::from)
        });
        match r {
            Ok(x) => sealed.push(shoal_api::model::secret::SealedSecret {
                name: name.clone(),
                version: version.to_string(),
                enc: shoal_api::model::secret::b64::encode(&x.enc),
                ciphertext: shoal_api::model::secret::b64::encode(&x.ciphertext),
            }),
            Err(why) => {
                warn!(device = %dev, secret = %name, reason = %why, "cannot deliver secret")
            }
        }
    }
    state.secrets = sealed;
    state
}

/// The secrets `state`'s workloads use, at the version each runs with (replicas of one
/// workload mid-rollout may run two versions of one secret).
fn wanted(state: &DesiredState) -> BTreeSet<(&shoal_api::model::ids::SecretName, &str)> {
    state
        .workloads
        .iter()
        .flat_map(|w| &w.secrets)
        .map(|m| (&m.mount.name, m.version.as_str()))
        .collect()
}

impl<S: Store, B: Bus> MainLoop<S, B> {
    /// A durable desired state with the stored secrets it names, as the fleet holds them
    /// now (right after the commit that made the state durable).
    pub(super) fn sealable(&self, state: DesiredState) -> Sealable {
        let secrets = wanted(&state)
            .into_iter()
            .filter_map(|(name, version)| self.core.secret(name)?.at(version))
            .collect();
        Sealable { state, secrets }
    }

    /// [`seal`] with the hub's secrets key.
    pub(super) fn sealed(&self, s: Sealable, key: Result<&str, NoDeviceKey>) -> DesiredState {
        seal(s, key, &self.publisher.secrets_key)
    }

    /// Sends durable desired states: each sealed to its device's key and signed now, or
    /// (its key not at hand) once the key is read off the loop.
    pub(super) async fn send_desired(&mut self, states: Vec<DesiredState>) {
        let now = now_ms();
        for d in states {
            let d = self.sealable(d);
            let ready = match &self.publisher.security {
                None => Some(self.sealed(d, Err(NoDeviceKey::Insecure))),
                Some(_) => match self.publisher.keys.route(d, now) {
                    Route::Send(d) => Some(d),
                    Route::Seal(d, key) => Some(self.sealed(d, Ok(&key))),
                    Route::Parked => None,
                },
            };
            if let Some(d) = ready {
                self.send_signed(d).await;
            }
        }
        self.read_keys();
    }

    /// Signs `d` and publishes it.
    pub(super) async fn send_signed(&self, d: DesiredState) {
        let payload = match serde_json::to_vec(&d) {
            Ok(p) => self.publisher.signer.seal(&p),
            Err(e) => {
                warn!(device = %d.device_id, error = %e, "cannot encode desired state");
                return;
            }
        };
        let msg = Outbound::Desired {
            device: d.device_id.clone(),
            signed: payload,
        };
        match self.publisher.bus.send(msg).await {
            Ok(()) => {
                self.metrics.desired_published.inc();
            }
            Err(e) => {
                warn!(device = %d.device_id, generation = d.generation, error = %e, "cannot publish desired state")
            }
        }
    }

    /// Signs each log request for its device (agents take only what the hub signed) and
    /// publishes it.
    pub(super) async fn publish_log_requests(
        &mut self,
        out: Vec<(DeviceId, shoal_api::wire::messages::LogRequest)>,
    ) {
        let now = now_ms();
        for (device, mut req) in out {
            self.publisher
                .signer
                .sign_log_request(&mut req, &device, now);
            let msg = Outbound::LogRequest {
                device: device.clone(),
                req,
            };
            if let Err(e) = self.publisher.bus.send(msg).await {
                warn!(%device, error = %e, "cannot publish a log request");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use shoal_api::wire::messages::DesiredWorkload;

    /// A device's key and certificate from a fresh fleet CA.
    fn device(name: &str) -> (String, String) {
        let dir = tempfile::tempdir().unwrap();
        let ca = shoal_pki::ca::FleetCa::load_or_create(dir.path()).unwrap();
        let (key, csr) = shoal_pki::device::key_and_csr(name).unwrap();
        let cert = ca
            .sign_csr(&csr, name, std::time::Duration::from_secs(3600))
            .unwrap();
        (key, cert)
    }

    fn stored(key: &shoal_pki::secret::SecretsKey, version: &str, value: &[u8]) -> StoredSecret {
        StoredSecret {
            name: serde_json::from_value(serde_json::json!("db")).unwrap(),
            keys: vec!["password".into()],
            version: version.into(),
            encrypted: shoal_api::model::secret::b64::encode(
                &key.encrypt("db", version, value).unwrap(),
            ),
            updated_ms: 0,
            earlier: Vec::new(),
        }
    }

    fn state(version: &str) -> DesiredState {
        let w: DesiredWorkload = serde_json::from_value(serde_json::json!({
            "name": "app", "revision": "r1",
            "secrets": [{ "name": "db", "path": "/etc/db", "version": version }],
            "resources": { "memory": 1024, "cpu": null },
            "restart": { "policy": "Always", "initialBackoffMs": 1, "maxBackoffMs": 1 },
        }))
        .unwrap();
        let mut s: DesiredState =
            serde_json::from_value(serde_json::json!({ "deviceId": "edge-a", "generation": 7 }))
                .unwrap();
        s.workloads = vec![w];
        s
    }

    #[test]
    fn a_state_is_sealed_with_the_secrets_it_was_committed_with_and_opens_on_its_device() {
        let dir = tempfile::tempdir().unwrap();
        let at_rest = shoal_pki::secret::SecretsKey::load_or_create(&dir.path().join("k")).unwrap();
        let (device_key, cert) = device("edge-a");
        let s = Sealable {
            state: state("v1"),
            secrets: vec![stored(&at_rest, "v1", b"hunter2")],
        };
        let out = seal(s, Ok(&cert), &at_rest);
        let sealed = &out.secrets[0];
        let opened = shoal_pki::secret::open_on_device(
            &device_key,
            "edge-a",
            "db",
            "v1",
            &shoal_pki::secret::Sealed {
                enc: shoal_api::model::secret::b64::decode(&sealed.enc).unwrap(),
                ciphertext: shoal_api::model::secret::b64::decode(&sealed.ciphertext).unwrap(),
            },
        )
        .unwrap();
        assert_eq!(opened, b"hunter2");
        // The committed version is what is sealed: a state naming v1 whose snapshot holds
        // another version gets nothing (never a value it was not committed with).
        let s = Sealable {
            state: state("v1"),
            secrets: vec![stored(&at_rest, "v2", b"newer")],
        };
        assert!(seal(s, Ok(&cert), &at_rest).secrets.is_empty());
        // No key, no secret.
        let s = Sealable {
            state: state("v1"),
            secrets: vec![stored(&at_rest, "v1", b"hunter2")],
        };
        assert!(seal(s, Err(NoDeviceKey::Revoked), &at_rest)
            .secrets
            .is_empty());
    }
}
