//! Before a replica's first run: its volumes made (or found) and its secrets opened, as the
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

/// Volumes, then secrets: their mounts and the environment variables they give.
pub fn prestart(
    volumes: &Volumes,
    secrets: &SecretFiles,
    desired: &DesiredWorkload,
) -> Result<Prestart, PrestartError> {
    let mut mounts = volumes.prepare(&desired.name, &desired.volumes)?;
    let (secret_mounts, secret_env) = secrets.for_run(&desired.secrets)?;
    mounts.extend(secret_mounts);
    let mut env = desired.env.clone();
    env.extend(secret_env);
    Ok(Prestart { mounts, env })
}
