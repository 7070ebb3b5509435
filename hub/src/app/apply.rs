//! The apply use case: parse, validate, check modules against the blob store, encrypt
//! secrets, then apply to the fleet, all or nothing.

use super::*;
use crate::app::command::Bus;
use crate::fleet::ApplyOutcome;
use crate::metrics::ResultLabel;
use crate::store::{Store, StoredSecret};
use shoal_api::model::workload::validate_all;
use shoal_api::wire::manifest::{parse_stream, ManifestError};
use shoal_api::wire::messages::ApplyResult;
use shoal_daemon::clock::now_ms;
use tracing::info;

impl<S: Store, B: Bus> MainLoop<S, B> {
    /// Validates a manifest completely (schema, then modules against the blob store) and
    /// applies it only if everything is right: a rejected manifest changes nothing.
    pub(super) async fn apply(
        &mut self,
        text: &str,
        req: Option<String>,
        over_mqtt: bool,
    ) -> ApplyResult {
        let reject = |errors: Vec<ManifestError>| ApplyResult {
            protocol: shoal_api::PROTOCOL_VERSION,
            request_id: req.clone(),
            accepted: false,
            workloads: Default::default(),
            secrets: Default::default(),
            configs: Default::default(),
            errors,
        };
        let result = match self.try_apply(text, over_mqtt).await {
            Ok(Outcomes {
                workloads,
                secrets,
                configs,
            }) => ApplyResult {
                protocol: shoal_api::PROTOCOL_VERSION,
                request_id: req.clone(),
                accepted: true,
                workloads,
                secrets,
                configs,
                errors: Vec::new(),
            },
            Err(errors) => reject(errors),
        };
        if result.accepted {
            info!(workloads = ?result.workloads, secrets = ?result.secrets, configs = ?result.configs, "manifest accepted");
            self.metrics
                .applies
                .get_or_create(&ResultLabel {
                    result: "accepted".into(),
                })
                .inc();
        } else {
            let reasons: Vec<String> = result.errors.iter().map(ToString::to_string).collect();
            info!(?reasons, "manifest rejected");
            self.metrics
                .applies
                .get_or_create(&ResultLabel {
                    result: "rejected".into(),
                })
                .inc();
        }
        result
    }

    /// Checks a manifest completely, then stores and publishes it; every error otherwise.
    pub(super) async fn try_apply(
        &mut self,
        text: &str,
        over_mqtt: bool,
    ) -> Result<Outcomes, Vec<ManifestError>> {
        let stream = parse_stream(text)?;
        let positions: Vec<usize> = stream.workloads.iter().map(|(n, _)| *n).collect();
        let workloads = validate_all(stream.workloads)?;
        let located: Vec<(usize, &_)> = positions.iter().copied().zip(workloads.iter()).collect();
        let mut errors = self.blobs.check_modules(&located);
        errors.extend(self.core.check_policy(&located));
        let now = now_ms();
        let mut secrets = Vec::new();
        for (n, s) in &stream.secrets {
            if over_mqtt {
                errors.push(ManifestError::secret(
                    *n,
                    Some(s.name.to_string()),
                    "secrets are applied over the HTTPS API only (shoal apply does so): on MQTT the broker and every operator subscribed to shoal/v1/apply see the values".into(),
                ));
                continue;
            }
            let sealed = s.to_bytes().and_then(|plain| {
                let version = self.publisher.secrets_key.version(s.name.as_str(), &plain);
                self.publisher
                    .secrets_key
                    .encrypt(s.name.as_str(), &version, &plain)
                    .map(|blob| (version, blob))
                    .map_err(|e| e.to_string())
            });
            match sealed {
                Ok((version, blob)) => secrets.push((
                    *n,
                    StoredSecret {
                        name: s.name.clone(),
                        keys: s.data.keys().cloned().collect(),
                        version,
                        encrypted: shoal_api::model::secret::b64::encode(&blob),
                        updated_ms: now,
                        earlier: Vec::new(),
                    },
                )),
                Err(e) => errors.push(ManifestError::secret(*n, Some(s.name.to_string()), e)),
            }
        }
        let refs: Vec<(usize, &StoredSecret)> = secrets.iter().map(|(n, s)| (*n, s)).collect();
        errors.extend(self.core.check_secrets(&located, &refs));
        let configs: Vec<(usize, &_)> = stream.configs.iter().map(|(n, c)| (*n, c)).collect();
        errors.extend(self.core.check_configs(&located, &configs));
        errors.extend(self.core.check_order(&located));
        if !errors.is_empty() {
            return Err(errors);
        }
        let applied = workloads.iter().map(|w| w.name.clone()).collect();
        let stored =
            self.core
                .apply_secrets(secrets.into_iter().map(|(_, s)| s).collect(), &applied, now);
        let configs = self.core.apply_configs(
            stream.configs.into_iter().map(|(_, c)| c).collect(),
            &applied,
            now,
        );
        let (outcome, publish) = self.fleet(|f| f.apply(workloads, now));
        if !self.publish_desired(publish).await {
            return Err(vec![ManifestError {
                message: NotDurable.to_string(),
                ..Default::default()
            }]);
        }
        Ok(Outcomes {
            workloads: outcome,
            secrets: stored,
            configs,
        })
    }
}

/// What happened to each object of an accepted apply, by kind.
pub(super) struct Outcomes {
    workloads: ApplyOutcome,
    secrets: ApplyOutcome,
    configs: ApplyOutcome,
}
