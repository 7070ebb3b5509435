//! Secrets: checked against the workloads that read them, stored (values only encrypted),
//! deleted only when no workload or running revision uses them.

use super::records::{EarlierSecret, StoredSecret};
use super::*;
use shoal_api::model::ids::{ConfigName, SecretName, WorkloadName};
use shoal_api::model::workload::Workload;
use shoal_api::wire::manifest::ManifestError;
use shoal_api::wire::views::SecretView;
use std::collections::{BTreeMap, BTreeSet};
use tracing::info;

/// Why a secret cannot be deleted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretRefusal {
    #[error("secret {:?} not found", .0.as_str())]
    NotFound(SecretName),
    /// These workloads (or revisions rollouts still run) use it.
    #[error("secret {:?} is used by workload(s) {}: change or delete them first", .name.as_str(), .users.join(", "))]
    InUse {
        name: SecretName,
        users: Vec<String>,
    },
}

/// An error for each name given again after its first document: `at(document, name,
/// message)` locates it.
pub(super) fn duplicated<'a>(
    names: impl Iterator<Item = (usize, &'a str)>,
    at: fn(usize, Option<String>, String) -> ManifestError,
) -> Vec<ManifestError> {
    let mut seen = BTreeMap::new();
    let mut errors = Vec::new();
    for (n, name) in names {
        if let Some(first) = seen.insert(name, n) {
            errors.push(at(
                n,
                Some(name.to_string()),
                format!(
                    "metadata.name {name:?} is duplicated: already defined in document {first}"
                ),
            ));
        }
    }
    errors
}

impl Fleet {
    /// Every spec replicas may run: the workloads', and those of the revisions rollouts
    /// still run (the last good one, and each replica's not yet replaced).
    pub(super) fn specs_in_use(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.values().chain(
            self.rollouts
                .values()
                .filter_map(|r| r.rollout.as_ref())
                .flat_map(|r| r.previous.iter().chain(r.specs.values())),
        )
    }

    /// What is wrong with the secrets of an apply: references (`spec.secrets`) of its
    /// `workloads` to secrets that neither the apply (`incoming`) nor the hub has, or to keys
    /// they lack; and keys an incoming secret drops that a stored workload outside the apply
    /// still reads. Each error is located by document.
    pub fn check_secrets(
        &self,
        workloads: &[(usize, &Workload)],
        incoming: &[(usize, &StoredSecret)],
    ) -> Vec<ManifestError> {
        let mut errors = duplicated(
            incoming.iter().map(|(n, s)| (*n, s.name.as_str())),
            ManifestError::secret,
        );
        let keys_of = |name: &SecretName| {
            incoming
                .iter()
                .map(|(_, s)| *s)
                .chain(self.secrets.get(name))
                .find(|s| &s.name == name)
                .map(|s| s.keys.clone())
        };
        for (n, w) in workloads {
            for message in shoal_api::model::secret::unresolved(&w.secrets, keys_of) {
                errors.push(ManifestError {
                    document: *n,
                    workload: Some(w.name.to_string()),
                    kind: None,
                    message,
                });
            }
        }
        let applied: BTreeSet<&WorkloadName> = workloads.iter().map(|(_, w)| &w.name).collect();
        for (n, s) in incoming {
            // Replicas of other workloads, and revisions rollouts still run, keep reading it.
            for w in self.specs_in_use().filter(|w| !applied.contains(&w.name)) {
                for m in w.secrets.iter().filter(|m| m.name == s.name) {
                    for (var, key) in &m.env {
                        if !s.keys.contains(key) {
                            errors.push(ManifestError::secret(
                                *n,
                                Some(s.name.to_string()),
                                format!(
                                    "key {key:?} is missing, but workload {:?} reads it (spec.secrets env {var}): keep the key or change the workload in the same apply",
                                    w.name.as_str()
                                ),
                            ));
                        }
                    }
                }
            }
        }
        errors
    }

    /// Stores secrets (created, configured or unchanged), keeping the version before as an
    /// earlier one while revisions pin it, and gives each stored workload outside the apply
    /// (`applied`) that reads a changed one a new revision pinning the new version, which
    /// starts its rollout. The [`Self::apply`] that follows pins the applied workloads and
    /// reconciles.
    pub fn apply_secrets(
        &mut self,
        secrets: Vec<StoredSecret>,
        applied: &BTreeSet<WorkloadName>,
        now: u64,
    ) -> ApplyOutcome {
        let mut outcome = ApplyOutcome::new();
        let mut changed = BTreeSet::new();
        for mut s in secrets {
            let verdict = match self.secrets.get(&s.name) {
                None => "created",
                Some(old) if old.version == s.version && old.keys == s.keys => "unchanged",
                Some(old) => {
                    s.earlier = old.earlier.clone();
                    s.earlier.retain(|e| e.version != s.version);
                    s.earlier.push(EarlierSecret {
                        version: old.version.clone(),
                        keys: old.keys.clone(),
                        encrypted: old.encrypted.clone(),
                    });
                    "configured"
                }
            };
            if verdict != "unchanged" {
                self.changes.put_secret(&s.name, Some(&s));
                info!(secret = %s.name, version = %s.version, verdict, "secret stored");
                changed.insert(s.name.clone());
                self.secrets.insert(s.name.clone(), s.clone());
            }
            outcome.insert(s.name.to_string(), verdict.to_string());
        }
        self.repin(applied, now, |w| {
            w.secrets_pinned.retain(|n, _| !changed.contains(n));
            w.secrets.iter().any(|m| changed.contains(&m.name))
        });
        outcome
    }

    /// Drops the earlier versions of secrets and configs that no spec in use pins any more
    /// (the rollout that replaced them finished): an old value leaves the store as soon as
    /// nothing runs it.
    pub(super) fn prune_earlier_versions(&mut self) {
        let secrets: BTreeSet<(&SecretName, &String)> = self
            .specs_in_use()
            .flat_map(|w| w.secrets_pinned.iter())
            .collect();
        let configs: BTreeSet<(&ConfigName, &String)> = self
            .specs_in_use()
            .flat_map(|w| w.configs_pinned.iter())
            .collect();
        let mut gone_secrets = Vec::new();
        for s in self.secrets.values() {
            if s.earlier
                .iter()
                .any(|e| !secrets.contains(&(&s.name, &e.version)))
            {
                let mut kept = s.clone();
                kept.earlier
                    .retain(|e| secrets.contains(&(&s.name, &e.version)));
                gone_secrets.push(kept);
            }
        }
        let mut gone_configs = Vec::new();
        for (name, c) in &self.configs {
            if c.earlier
                .iter()
                .any(|e| !configs.contains(&(name, &e.version())))
            {
                let mut kept = c.clone();
                kept.earlier
                    .retain(|e| configs.contains(&(name, &e.version())));
                gone_configs.push((name.clone(), kept));
            }
        }
        for s in gone_secrets {
            self.changes.put_secret(&s.name, Some(&s));
            self.secrets.insert(s.name.clone(), s);
        }
        for (name, c) in gone_configs {
            self.changes.put_config(&name, Some(&c));
            self.configs.insert(name, c);
        }
    }

    /// Deletes a secret no workload uses. `Err(why)`: not found, or still in use (by a
    /// workload's spec or a revision a rollout still runs).
    pub fn delete_secret(&mut self, name: &SecretName) -> Result<(), SecretRefusal> {
        if !self.secrets.contains_key(name) {
            return Err(SecretRefusal::NotFound(name.clone()));
        }
        let users: BTreeSet<String> = self
            .specs_in_use()
            .filter(|w| w.secrets.iter().any(|m| &m.name == name))
            .map(|w| w.name.to_string())
            .collect();
        if !users.is_empty() {
            return Err(SecretRefusal::InUse {
                name: name.clone(),
                users: users.into_iter().collect(),
            });
        }
        self.changes.put_secret(name, None);
        self.secrets.remove(name);
        info!(secret = %name, "secret deleted");
        Ok(())
    }

    /// Every stored secret (values encrypted).
    pub fn stored_secrets(&self) -> impl Iterator<Item = &StoredSecret> {
        self.secrets.values()
    }

    /// A stored secret (its values encrypted), for sealing to devices.
    pub fn secret(&self, name: &SecretName) -> Option<&StoredSecret> {
        self.secrets.get(name)
    }

    /// `shoal get secrets`: names, keys, versions and users; never values.
    pub fn secret_views(&self) -> Vec<SecretView> {
        self.secrets
            .values()
            .map(|s| SecretView {
                name: s.name.to_string(),
                keys: s.keys.clone(),
                version: s.version.clone(),
                used_by: self
                    .specs_in_use()
                    .filter(|w| w.secrets.iter().any(|m| m.name == s.name))
                    .map(|w| w.name.to_string())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                updated_ms: s.updated_ms,
                behind: self
                    .specs_in_use()
                    .filter(|w| {
                        w.secrets_pinned
                            .get(&s.name)
                            .is_some_and(|v| *v != s.version)
                    })
                    .map(|w| w.name.to_string())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            })
            .collect()
    }
}
