//! Durable hub state behind the [`Store`] trait: workloads, devices, assignments, rollouts
//! and revision history, the desired state last published to each device (with its
//! generation), and secrets, whose values are stored only encrypted ([`StoredSecret`]).
//!
//! [`SledStore`] (the default, `DATA_DIR/hub.db`, in `sled.rs`) and
//! [`crate::etcd::EtcdStore`] are the real implementations; [`MemStore`] (`memory.rs`) is an
//! in-memory fake for tests. The port ([`Store`], [`StoreError`]) names neither: adapters box
//! their errors. `crate::backend::StoreChoice` picks one from `--store`.
//! Every write is flushed before the hub acknowledges the change that caused it.

use crate::fleet::changes::Write;
/// The records the fleet keeps are the fleet's types; the store persists them.
pub use crate::fleet::records::{DeviceRecord, Snapshot, StoredConfig, StoredSecret};
use crate::fleet::scheduler::Assignments;
use shoal_api::model::ids::{ConfigName, DeviceId, SecretName, WorkloadName};
use shoal_api::model::workload::Workload;
use shoal_api::policy::fleet::FleetPolicy;
use shoal_api::policy::operator::AuditEntry;
use shoal_api::wire::messages::DesiredState;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open hub database at {path:?}: {source}")]
    Open {
        path: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store's own error (the port names no adapter).
    #[error("hub database error: {0}")]
    Db(Box<dyn std::error::Error + Send + Sync>),
    #[error("corrupt record {key:?} in hub database: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("cannot encode record: {0}")]
    Encode(serde_json::Error),
    #[error("hub store {url}: {reason}")]
    Etcd { url: String, reason: String },
    #[error("hub store {url}: this hub is no longer the leader (its election key {key:?} is gone): nothing it wrote since was committed")]
    Fenced { url: String, key: String },
    #[error("this hub stands by: the leader writes the store")]
    Standby,
}

/// A leader's claim, checked by every write it commits: its election key must still exist
/// with the creation revision it won with (see [`crate::ha`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub create_revision: i64,
}

/// Hub persistence. Methods are synchronous and short; `flush` makes prior writes durable.
pub trait Store: Send + 'static {
    fn load(&self) -> Result<Snapshot, StoreError>;
    fn put_workload(&self, w: &Workload) -> Result<(), StoreError>;
    fn delete_workload(&self, name: &WorkloadName) -> Result<(), StoreError>;
    fn put_device(&self, d: &DeviceRecord) -> Result<(), StoreError>;
    fn put_assignments(&self, a: &Assignments) -> Result<(), StoreError>;
    fn put_desired(&self, d: &DesiredState) -> Result<(), StoreError>;
    /// A workload's rollout and revision history (`None`: the workload is gone).
    fn put_rollout(
        &self,
        name: &WorkloadName,
        r: Option<&crate::fleet::rollout::Record>,
    ) -> Result<(), StoreError>;
    /// A secret, or its removal (`None`).
    fn put_secret(&self, name: &SecretName, s: Option<&StoredSecret>) -> Result<(), StoreError>;
    /// The fleet's policy.
    fn put_policy(&self, p: &FleetPolicy) -> Result<(), StoreError>;
    /// Forgets a device's record (its desired state is written as any other).
    fn delete_device(&self, id: &DeviceId) -> Result<(), StoreError>;
    /// A config, or its removal (`None`).
    fn put_config(&self, name: &ConfigName, c: Option<&StoredConfig>) -> Result<(), StoreError>;
    /// A job's current run, or its removal (`None`).
    fn put_job(
        &self,
        name: &WorkloadName,
        j: Option<&crate::fleet::job::JobState>,
    ) -> Result<(), StoreError>;
    /// Marks device labels as the operator's in this store, for good.
    fn put_labels_owned(&self) -> Result<(), StoreError>;
    /// Appends an audit entry (and forgets the one [`crate::fleet::audit::KEPT`] before it).
    fn put_audit(&self, e: &AuditEntry) -> Result<(), StoreError>;
    fn flush(&self) -> Result<(), StoreError>;
    /// From now on, commit writes only while `fence` holds. Only stores several hubs share
    /// (etcd) elect a leader; the others have nothing to fence.
    fn fence(&self, _fence: Fence) {}

    /// One of the fleet's writes (see [`crate::fleet::changes`]); durable at the next flush.
    fn write(&self, w: &Write) -> Result<(), StoreError> {
        match w {
            Write::Workload(x) => self.put_workload(x),
            Write::DeleteWorkload(n) => self.delete_workload(n),
            Write::Device(d) => self.put_device(d),
            Write::Assignments(a) => self.put_assignments(a),
            Write::Desired(d) => self.put_desired(d),
            Write::Rollout(n, r) => self.put_rollout(n, r.as_ref()),
            Write::Secret(n, s) => self.put_secret(n, s.as_ref()),
            Write::Config(n, c) => self.put_config(n, c.as_ref()),
            Write::Job(n, j) => self.put_job(n, j.as_ref()),
            Write::DeleteDevice(id) => self.delete_device(id),
            Write::Policy(p) => self.put_policy(p),
            Write::LabelsOwned => self.put_labels_owned(),
            Write::Audit(e) => self.put_audit(e),
        }
    }
}

/// The store chosen at start (`--store`), whichever it is.
impl Store for Box<dyn Store> {
    fn load(&self) -> Result<Snapshot, StoreError> {
        (**self).load()
    }
    fn put_workload(&self, w: &Workload) -> Result<(), StoreError> {
        (**self).put_workload(w)
    }
    fn delete_workload(&self, name: &WorkloadName) -> Result<(), StoreError> {
        (**self).delete_workload(name)
    }
    fn put_device(&self, d: &DeviceRecord) -> Result<(), StoreError> {
        (**self).put_device(d)
    }
    fn put_assignments(&self, a: &Assignments) -> Result<(), StoreError> {
        (**self).put_assignments(a)
    }
    fn put_desired(&self, d: &DesiredState) -> Result<(), StoreError> {
        (**self).put_desired(d)
    }
    fn put_rollout(
        &self,
        name: &WorkloadName,
        r: Option<&crate::fleet::rollout::Record>,
    ) -> Result<(), StoreError> {
        (**self).put_rollout(name, r)
    }
    fn put_secret(&self, name: &SecretName, s: Option<&StoredSecret>) -> Result<(), StoreError> {
        (**self).put_secret(name, s)
    }
    fn put_config(&self, name: &ConfigName, c: Option<&StoredConfig>) -> Result<(), StoreError> {
        (**self).put_config(name, c)
    }
    fn delete_device(&self, id: &DeviceId) -> Result<(), StoreError> {
        (**self).delete_device(id)
    }
    fn put_job(
        &self,
        name: &WorkloadName,
        j: Option<&crate::fleet::job::JobState>,
    ) -> Result<(), StoreError> {
        (**self).put_job(name, j)
    }
    fn put_policy(&self, p: &FleetPolicy) -> Result<(), StoreError> {
        (**self).put_policy(p)
    }
    fn put_labels_owned(&self) -> Result<(), StoreError> {
        (**self).put_labels_owned()
    }
    fn put_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        (**self).put_audit(e)
    }
    fn flush(&self) -> Result<(), StoreError> {
        (**self).flush()
    }
    fn fence(&self, fence: Fence) {
        (**self).fence(fence)
    }
}

/// Reading a store, and nothing else: a standby hub's view (see [`crate::ha`]), whose
/// persistent state the leader writes. It has no write method to call.
pub trait Load: Send {
    fn load(&self) -> Result<Snapshot, StoreError>;
}

impl<S: Store + ?Sized> Load for S {
    fn load(&self) -> Result<Snapshot, StoreError> {
        Store::load(self)
    }
}

mod memory;
mod sled;

pub use self::sled::SledStore;
pub use memory::MemStore;
