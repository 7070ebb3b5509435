//! The records the fleet keeps and the store persists: devices as the hub remembers them,
//! secrets (values only encrypted), and the [`Snapshot`] a fleet is loaded from. Plain data:
//! the store (`crate::store`) writes them, the fleet decides them.

use super::scheduler::Assignments;
use serde::{Deserialize, Serialize};
use shoal_api::model::ids::{DeviceId, SecretName, WorkloadName};
use shoal_api::model::workload::Workload;
use shoal_api::policy::operator::AuditEntry;
use shoal_api::wire::messages::{DesiredState, Hello};
use std::collections::BTreeMap;

/// A device as the hub remembers it: what it last said of itself (`hello`), and what the
/// operator decided about it. A device that enrolled and has not connected yet has a hello
/// with its id only, and `last_seen_ms` 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRecord {
    pub hello: Hello,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// The labels placement sees, the operator's: granted by the join token, or set with
    /// `shoal label device`. `None` only in records written before labels were the
    /// operator's; the hub then adopts what the device had reported (see
    /// `Fleet::open`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<shoal_api::model::labels::Labels>,
    /// The join token whose grant was applied last (each grant is applied once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted_by: Option<String>,
    /// `shoal cordon`: no new replicas (persisted: an operator's decision outlives restarts).
    #[serde(default)]
    pub cordoned: bool,
    /// `shoal drain` in progress: replicas are being moved off within their budgets.
    #[serde(default)]
    pub draining: bool,
    /// `shoal annotate device`: the operators' free text about the device (steers nothing).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: shoal_api::model::labels::Labels,
}

/// A secret as the hub keeps it: names and a version in the clear, the values encrypted
/// with the hub's secrets key (`shoal_pki::secret::SecretsKey`, base64 of nonce, ciphertext
/// and tag). Nothing in the store or its backups reveals a value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredSecret {
    pub name: SecretName,
    pub keys: Vec<String>,
    pub version: String,
    pub encrypted: String,
    pub updated_ms: u64,
    /// Earlier versions that revisions still running pin (replicas a rollout has not
    /// replaced yet, the revision a rollback returns to); dropped as soon as none does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<EarlierSecret>,
}

/// An earlier version of a stored secret (values encrypted, as the current one's).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EarlierSecret {
    pub version: String,
    pub keys: Vec<String>,
    pub encrypted: String,
}

impl StoredSecret {
    /// Version `version` of the secret, current or earlier, as a secret of its own.
    pub fn at(&self, version: &str) -> Option<StoredSecret> {
        if self.version == version {
            return Some(StoredSecret {
                earlier: Vec::new(),
                ..self.clone()
            });
        }
        let e = self.earlier.iter().find(|e| e.version == version)?;
        Some(StoredSecret {
            name: self.name.clone(),
            keys: e.keys.clone(),
            version: e.version.clone(),
            encrypted: e.encrypted.clone(),
            updated_ms: self.updated_ms,
            earlier: Vec::new(),
        })
    }
}

impl std::fmt::Debug for StoredSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSecret")
            .field("name", &self.name)
            .field("keys", &self.keys)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// A config as the hub keeps it: the one last applied, and earlier versions that specs in
/// use still pin (replicas a rollout has not replaced yet, the revision a rollback returns
/// to), dropped as soon as none does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredConfig {
    pub config: shoal_api::model::config::Config,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<shoal_api::model::config::Config>,
}

impl StoredConfig {
    /// Version `version`, current or earlier.
    pub fn at(&self, version: &str) -> Option<&shoal_api::model::config::Config> {
        std::iter::once(&self.config)
            .chain(&self.earlier)
            .find(|c| c.version() == version)
    }
}

/// Everything the hub loads at start.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub workloads: BTreeMap<WorkloadName, Workload>,
    pub devices: BTreeMap<DeviceId, DeviceRecord>,
    pub assignments: Assignments,
    pub desired: BTreeMap<DeviceId, DesiredState>,
    pub rollouts: BTreeMap<WorkloadName, super::rollout::Record>,
    pub secrets: BTreeMap<SecretName, StoredSecret>,
    pub configs: BTreeMap<shoal_api::model::ids::ConfigName, StoredConfig>,
    /// What an admin lets containers ask for.
    pub policy: shoal_api::policy::fleet::FleetPolicy,
    /// Each job's current run.
    pub jobs: BTreeMap<WorkloadName, super::job::JobState>,
    /// Device labels are the operator's in this store (see `Fleet::open`): a record
    /// without labels gets none, its device's reports are not adopted.
    pub labels_owned: bool,
    /// The newest audit entries (at most [`super::audit::IN_MEMORY`]), oldest first.
    pub audit: Vec<AuditEntry>,
}
