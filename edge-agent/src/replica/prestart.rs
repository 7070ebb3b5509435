//! Before a replica's first run: its volumes made (or found), its secrets opened and its
//! config files written, as the
//! mounts and environment variables the run gets. A secret not on the device yet is an
//! error the supervisor retries now and then (it may arrive under the same version).

use crate::runtime::{Mount, RunSpec};
use crate::secrets::SecretFiles;
use crate::volumes::Volumes;
use shoal_api::wire::messages::DesiredWorkload;
use std::collections::BTreeMap;

/// Why a replica's volumes or secrets are not ready; shown as it is.
#[derive(Debug, thiserror::Error)]
pub enum PrestartError {
    #[error(transparent)]
    Volumes(#[from] crate::volumes::VolumeError),
    #[error(transparent)]
    Secrets(#[from] crate::secrets::ForRunError),
    #[error(transparent)]
    Configs(#[from] crate::configs::ConfigError),
}

/// What a run gets from its volumes and secrets.
#[derive(Debug, Clone, Default)]
pub struct Prestart {
    pub mounts: Vec<Mount>,
    /// The desired environment with the secrets' variables added.
    pub env: BTreeMap<String, String>,
}

impl Prestart {
    /// Puts the mounts and environment into `spec`.
    pub fn apply(self, spec: &mut RunSpec) {
        spec.mounts = self.mounts;
        spec.env = self.env;
    }
}

/// Volumes, then secrets, then configs: their mounts and the environment variables they
/// give (those from configs are in the desired environment already).
pub fn prestart(
    volumes: &Volumes,
    secrets: &SecretFiles,
    configs: &crate::configs::ConfigDirs,
    desired: &DesiredWorkload,
) -> Result<Prestart, PrestartError> {
    let mut mounts = volumes.prepare(&desired.name, &desired.volumes)?;
    let (secret_mounts, secret_env) = secrets.for_run(&desired.secrets)?;
    mounts.extend(secret_mounts);
    mounts.extend(configs.for_run(&desired.configs)?);
    let mut env = desired.env.clone();
    env.extend(secret_env);
    Ok(Prestart { mounts, env })
}
