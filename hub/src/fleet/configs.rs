//! Configs: checked against the workloads that read them, stored, pinned into the specs of
//! the workloads that read them, and deleted only when no workload or running revision
//! does.
//!
//! Pinning is what makes a config change roll out: a workload's spec carries the version of
//! each config it reads (`Workload::configs_pinned`, part of its revision), so a new config
//! gives each user a new revision, which the rollout engine replaces replica by replica
//! under the workload's own budget and health gates, and rolls back on failure. Replicas not
//! yet replaced keep the values of the version their revision pinned: the hub keeps earlier
//! versions while a spec in use pins them ([`super::records::StoredConfig`]), secrets alike.

use super::records::StoredConfig;
use super::*;
use shoal_api::model::config::Config;
use shoal_api::model::ids::{ConfigName, WorkloadName};
use shoal_api::model::workload::Workload;
use shoal_api::wire::manifest::ManifestError;
use shoal_api::wire::views::{
    ConfigDescription, ConfigUser, ConfigView, DeviceValues, ResolvedValue,
};
use std::collections::BTreeSet;
use tracing::info;

/// Why a config cannot be deleted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigRefusal {
    #[error("config {:?} not found", .0.as_str())]
    NotFound(ConfigName),
    /// These workloads (or revisions rollouts still run) read it.
    #[error("config {:?} is used by workload(s) {}: change or delete them first", .name.as_str(), .users.join(", "))]
    InUse {
        name: ConfigName,
        users: Vec<String>,
    },
}

impl Fleet {
    /// What is wrong with the configs of an apply: references (`spec.configs`) of its
    /// `workloads` to configs neither the apply (`incoming`) nor the hub has, or to keys
    /// they lack; and keys an incoming config drops that a stored workload outside the apply
    /// reads. Each error is located by document.
    pub fn check_configs(
        &self,
        workloads: &[(usize, &Workload)],
        incoming: &[(usize, &Config)],
    ) -> Vec<ManifestError> {
        let mut errors = super::secrets::duplicated(
            incoming.iter().map(|(n, c)| (*n, c.name.as_str())),
            ManifestError::config,
        );
        let keys_of = |name: &ConfigName| {
            incoming
                .iter()
                .map(|(_, c)| *c)
                .chain(self.configs.get(name).map(|s| &s.config))
                .find(|c| &c.name == name)
                .map(Config::keys)
        };
        for (n, w) in workloads {
            for message in shoal_api::model::config::unresolved(&w.configs, keys_of) {
                errors.push(ManifestError {
                    document: *n,
                    workload: Some(w.name.to_string()),
                    kind: None,
                    message,
                });
            }
        }
        let applied: BTreeSet<&WorkloadName> = workloads.iter().map(|(_, w)| &w.name).collect();
        for (n, c) in incoming {
            // Its users outside the apply take the new content: it must have their keys.
            for w in self
                .workloads
                .values()
                .filter(|w| !applied.contains(&w.name))
            {
                for m in w.configs.iter().filter(|m| m.name == c.name) {
                    for (var, key) in m.env.iter().filter(|(_, k)| !c.data.contains_key(*k)) {
                        errors.push(ManifestError::config(
                            *n,
                            Some(c.name.to_string()),
                            format!(
                                "key {key:?} is missing, but workload {:?} reads it (spec.configs env {var}): keep the key or change the workload in the same apply",
                                w.name.as_str()
                            ),
                        ));
                    }
                }
            }
        }
        errors
    }

    /// Stores configs (created, configured or unchanged), and gives each stored workload
    /// outside the apply (`applied`) that reads a changed one a new revision with the new
    /// content, which starts its rollout. The [`Self::apply`] that follows pins the applied
    /// workloads and reconciles.
    pub fn apply_configs(
        &mut self,
        configs: Vec<Config>,
        applied: &BTreeSet<WorkloadName>,
        now: u64,
    ) -> ApplyOutcome {
        let mut outcome = ApplyOutcome::new();
        let mut changed = BTreeSet::new();
        for c in configs {
            let name = c.name.clone();
            let (verdict, earlier) = match self.configs.get(&c.name) {
                None => ("created", Vec::new()),
                Some(old) if old.config == c => ("unchanged", Vec::new()),
                Some(old) => {
                    let mut earlier = old.earlier.clone();
                    earlier.retain(|e| *e != c);
                    earlier.push(old.config.clone());
                    ("configured", earlier)
                }
            };
            if verdict != "unchanged" {
                info!(config = %c.name, version = %c.version(), verdict, "config stored");
                changed.insert(c.name.clone());
                let stored = StoredConfig { config: c, earlier };
                self.changes.put_config(&name, Some(&stored));
                self.configs.insert(name.clone(), stored);
            }
            outcome.insert(name.to_string(), verdict.to_string());
        }
        self.repin(applied, now, |w| {
            w.configs_pinned.retain(|n, _| !changed.contains(n));
            w.configs.iter().any(|m| changed.contains(&m.name))
        });
        outcome
    }

    /// Gives each stored workload outside the apply (`applied`) for which `unpin` says it
    /// reads a changed config or secret (after dropping that pin) the current versions: a
    /// new revision, whose rollout starts.
    pub(super) fn repin(
        &mut self,
        applied: &BTreeSet<WorkloadName>,
        now: u64,
        unpin: impl Fn(&mut Workload) -> bool,
    ) {
        let users: Vec<Workload> = self
            .workloads
            .values()
            .filter(|w| !applied.contains(&w.name))
            .filter_map(|w| {
                let mut w = w.clone();
                unpin(&mut w).then_some(w)
            })
            .collect();
        for mut w in users {
            self.pin_inputs(&mut w);
            if self.workloads.get(&w.name) != Some(&w) {
                self.new_spec(&w, now);
                self.changes.put_workload(&w);
                info!(workload = %w.name, revision = %w.revision(), "input changed: new revision");
                self.workloads.insert(w.name.clone(), w);
            }
        }
    }

    /// Pins what `w` reads and has not pinned yet: each config's and each secret's current
    /// version. Pins of objects it no longer reads go.
    pub(super) fn pin_inputs(&self, w: &mut Workload) {
        let mut configs = std::mem::take(&mut w.configs_pinned);
        w.configs_pinned = w
            .configs
            .iter()
            .filter_map(|m| {
                let v = configs
                    .remove(&m.name)
                    .or_else(|| Some(self.configs.get(&m.name)?.config.version()))?;
                Some((m.name.clone(), v))
            })
            .collect();
        let mut secrets = std::mem::take(&mut w.secrets_pinned);
        w.secrets_pinned = w
            .secrets
            .iter()
            .filter_map(|m| {
                let v = secrets
                    .remove(&m.name)
                    .or_else(|| Some(self.secrets.get(&m.name)?.version.clone()))?;
                Some((m.name.clone(), v))
            })
            .collect();
    }

    /// Deletes a config no workload reads. `Err(why)`: not found, or still read (by a
    /// workload's spec or a revision a rollout still runs).
    pub fn delete_config(&mut self, name: &ConfigName) -> Result<(), ConfigRefusal> {
        if !self.configs.contains_key(name) {
            return Err(ConfigRefusal::NotFound(name.clone()));
        }
        let users = self.config_users(name);
        if !users.is_empty() {
            return Err(ConfigRefusal::InUse {
                name: name.clone(),
                users,
            });
        }
        self.changes.put_config(name, None);
        self.configs.remove(name);
        info!(config = %name, "config deleted");
        Ok(())
    }

    fn config_users(&self, name: &ConfigName) -> Vec<String> {
        self.specs_in_use()
            .filter(|w| w.configs.iter().any(|m| &m.name == name))
            .map(|w| w.name.to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// The config `spec` reads as `name`: the version it pinned (the current one for specs
    /// stored before pins existed).
    pub(super) fn config_of<'a>(
        &'a self,
        spec: &Workload,
        name: &ConfigName,
    ) -> Option<&'a Config> {
        let stored = self.configs.get(name)?;
        match spec.configs_pinned.get(name) {
            Some(v) => stored.at(v),
            None => Some(&stored.config),
        }
    }

    /// `shoal get configs`.
    pub fn config_views(&self) -> Vec<ConfigView> {
        self.configs
            .values()
            .map(|s| &s.config)
            .map(|c| ConfigView {
                name: c.name.to_string(),
                keys: c.keys(),
                overrides: c.overrides.len(),
                version: c.version(),
                used_by: self.config_users(&c.name),
            })
            .collect()
    }

    /// `shoal describe config`: who reads which version, and each device's values.
    pub fn describe_config(&self, name: &ConfigName) -> Option<ConfigDescription> {
        let c = &self.configs.get(name)?.config;
        let users = self
            .workloads
            .values()
            .filter_map(|w| {
                w.configs.iter().find(|m| &m.name == name)?;
                Some(ConfigUser {
                    workload: w.name.to_string(),
                    version: w.configs_pinned.get(name).cloned().unwrap_or_default(),
                })
            })
            .collect();
        let devices = self
            .devices
            .values()
            .filter(|r| !self.revoked.contains(&r.hello.device_id))
            .map(|r| DeviceValues {
                device: r.hello.device_id.to_string(),
                values: c
                    .resolve(&r.hello.device_id, &self.labels_of(r))
                    .into_iter()
                    .map(|(k, (value, from))| (k, ResolvedValue { value, from }))
                    .collect(),
            })
            .collect();
        Some(ConfigDescription {
            config: c.clone(),
            version: c.version(),
            users,
            devices,
        })
    }
}
