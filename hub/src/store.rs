//! Durable hub state behind the [`Store`] trait: workloads, devices, assignments, rollouts
//! and revision history, the desired state last published to each device (with its
//! generation), and secrets, whose values are stored only encrypted ([`StoredSecret`]).
//!
//! [`SledStore`] (the default, `DATA_DIR/hub.db`) and [`crate::etcd::EtcdStore`] are the real
//! implementations; [`MemStore`] is an in-memory fake for tests.
//! Every write is flushed before the hub acknowledges the change that caused it.

use crate::fleet::changes::Write;
/// The records the fleet keeps are the fleet's types; the store persists them.
pub use crate::fleet::records::{DeviceRecord, Snapshot, StoredSecret};
use crate::fleet::scheduler::Assignments;
use serde::{de::DeserializeOwned, Serialize};
use shoal_api::ids::{SecretName, WorkloadName};
use shoal_api::messages::DesiredState;
use shoal_api::operator::AuditEntry;
use shoal_api::workload::Workload;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open hub database at {path:?}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("hub database error: {0}")]
    Db(#[from] sled::Error),
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

/// A view of a store that reads and never writes: a standby hub's (see [`crate::ha`]),
/// whose in-memory changes (device reports) are its own and whose persistent state the
/// leader writes.
pub struct ReadOnly<S: Store>(pub S);

impl<S: Store> Store for ReadOnly<S> {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.0.load()
    }
    fn put_workload(&self, _: &Workload) -> Result<(), StoreError> {
        Ok(())
    }
    fn delete_workload(&self, _: &WorkloadName) -> Result<(), StoreError> {
        Ok(())
    }
    fn put_device(&self, _: &DeviceRecord) -> Result<(), StoreError> {
        Ok(())
    }
    fn put_assignments(&self, _: &Assignments) -> Result<(), StoreError> {
        Ok(())
    }
    fn put_desired(&self, _: &DesiredState) -> Result<(), StoreError> {
        Ok(())
    }
    fn put_rollout(
        &self,
        _: &WorkloadName,
        _: Option<&crate::fleet::rollout::Record>,
    ) -> Result<(), StoreError> {
        Ok(())
    }
    fn put_secret(&self, _: &SecretName, _: Option<&StoredSecret>) -> Result<(), StoreError> {
        Ok(())
    }
    fn put_labels_owned(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn put_audit(&self, _: &AuditEntry) -> Result<(), StoreError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Where the hub keeps its state (`--store`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreChoice {
    /// sled in `DATA_DIR/hub.db`.
    #[default]
    Sled,
    Etcd(crate::etcd::EtcdUrl),
}

impl std::str::FromStr for StoreChoice {
    type Err = crate::etcd::BadStoreUrl;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "sled" {
            return Ok(StoreChoice::Sled);
        }
        if s.starts_with("etcd://") || s.starts_with("etcds://") {
            return s.parse().map(StoreChoice::Etcd);
        }
        Err(crate::etcd::BadStoreUrl {
            what: "store",
            url: s.to_string(),
            reason: "expected sled or etcds://HOST:PORT[,HOST:PORT…][/PREFIX]?ca=FILE…".into(),
        })
    }
}

impl StoreChoice {
    /// Opens the store (`data_dir` holds sled's database).
    pub fn open(&self, data_dir: &Path) -> Result<Box<dyn Store>, StoreError> {
        Ok(match self {
            StoreChoice::Sled => Box::new(SledStore::open(data_dir)?),
            StoreChoice::Etcd(url) => Box::new(crate::etcd::EtcdStore::connect(url)?),
        })
    }
}

const WORKLOADS: &str = "workloads";
const DEVICES: &str = "devices";
const DESIRED: &str = "desired";
const META: &str = "meta";
const ROLLOUTS: &str = "rollouts";
const SECRETS: &str = "secrets";
const AUDIT: &str = "audit";
const ASSIGNMENTS_KEY: &[u8] = b"assignments";
const LABELS_OWNED_KEY: &[u8] = b"labels-owned";

/// sled-backed store in `DATA_DIR/hub.db`.
pub struct SledStore {
    db: sled::Db,
    workloads: sled::Tree,
    devices: sled::Tree,
    desired: sled::Tree,
    meta: sled::Tree,
    rollouts: sled::Tree,
    secrets: sled::Tree,
    audit: sled::Tree,
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("hub.db");
        let db = sled::open(&path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self {
            workloads: db.open_tree(WORKLOADS)?,
            devices: db.open_tree(DEVICES)?,
            desired: db.open_tree(DESIRED)?,
            meta: db.open_tree(META)?,
            rollouts: db.open_tree(ROLLOUTS)?,
            secrets: db.open_tree(SECRETS)?,
            audit: db.open_tree(AUDIT)?,
            db,
        })
    }
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(StoreError::Encode)
}

fn dec<T: DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn load_tree<K: Ord, V: DeserializeOwned>(
    tree: &sled::Tree,
    key: impl Fn(&V) -> K,
) -> Result<BTreeMap<K, V>, StoreError> {
    let mut out = BTreeMap::new();
    for item in tree.iter() {
        let (k, v) = item?;
        let v: V = dec(&k, &v)?;
        out.insert(key(&v), v);
    }
    Ok(out)
}

impl Store for SledStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let assignments = match self.meta.get(ASSIGNMENTS_KEY)? {
            Some(v) => dec(ASSIGNMENTS_KEY, &v)?,
            None => Assignments::new(),
        };
        Ok(Snapshot {
            workloads: load_tree(&self.workloads, |w: &Workload| w.name.clone())?,
            devices: load_tree(&self.devices, |d: &DeviceRecord| d.hello.device_id.clone())?,
            desired: load_tree(&self.desired, |d: &DesiredState| d.device_id.clone())?,
            rollouts: load_tree(&self.rollouts, |r: &crate::fleet::rollout::Record| {
                r.workload.clone()
            })?,
            secrets: load_tree(&self.secrets, |s: &StoredSecret| s.name.clone())?,
            assignments,
            labels_owned: self.meta.contains_key(LABELS_OWNED_KEY)?,
            audit: {
                let mut newest = Vec::new();
                for item in self.audit.iter().rev().take(crate::fleet::audit::IN_MEMORY) {
                    let (k, v) = item?;
                    newest.push(dec(&k, &v)?);
                }
                newest.reverse();
                newest
            },
        })
    }
    fn put_workload(&self, w: &Workload) -> Result<(), StoreError> {
        self.workloads.insert(w.name.as_str(), enc(w)?)?;
        Ok(())
    }
    fn delete_workload(&self, name: &WorkloadName) -> Result<(), StoreError> {
        self.workloads.remove(name.as_str())?;
        Ok(())
    }
    fn put_device(&self, d: &DeviceRecord) -> Result<(), StoreError> {
        self.devices.insert(d.hello.device_id.as_str(), enc(d)?)?;
        Ok(())
    }
    fn put_assignments(&self, a: &Assignments) -> Result<(), StoreError> {
        self.meta.insert(ASSIGNMENTS_KEY, enc(a)?)?;
        Ok(())
    }
    fn put_desired(&self, d: &DesiredState) -> Result<(), StoreError> {
        self.desired.insert(d.device_id.as_str(), enc(d)?)?;
        Ok(())
    }
    fn put_rollout(
        &self,
        name: &WorkloadName,
        r: Option<&crate::fleet::rollout::Record>,
    ) -> Result<(), StoreError> {
        match r {
            Some(r) => self.rollouts.insert(name.as_str(), enc(r)?)?,
            None => self.rollouts.remove(name.as_str())?,
        };
        Ok(())
    }
    fn put_secret(&self, name: &SecretName, s: Option<&StoredSecret>) -> Result<(), StoreError> {
        match s {
            Some(s) => self.secrets.insert(name.as_str(), enc(s)?)?,
            None => self.secrets.remove(name.as_str())?,
        };
        Ok(())
    }
    fn put_labels_owned(&self) -> Result<(), StoreError> {
        self.meta.insert(LABELS_OWNED_KEY, b"true".to_vec())?;
        Ok(())
    }
    fn put_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        // Big-endian numbers sort as they count.
        self.audit.insert(e.seq.to_be_bytes(), enc(e)?)?;
        if let Some(old) = e.seq.checked_sub(crate::fleet::audit::KEPT) {
            self.audit.remove(old.to_be_bytes())?;
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

/// In-memory fake for unit tests.
#[derive(Default)]
pub struct MemStore {
    inner: Mutex<Snapshot>,
}

impl MemStore {
    fn with<R>(&self, f: impl FnOnce(&mut Snapshot) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }
}

impl Store for MemStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(self.with(|s| s.clone()))
    }
    fn put_workload(&self, w: &Workload) -> Result<(), StoreError> {
        self.with(|s| s.workloads.insert(w.name.clone(), w.clone()));
        Ok(())
    }
    fn delete_workload(&self, name: &WorkloadName) -> Result<(), StoreError> {
        self.with(|s| s.workloads.remove(name));
        Ok(())
    }
    fn put_device(&self, d: &DeviceRecord) -> Result<(), StoreError> {
        self.with(|s| s.devices.insert(d.hello.device_id.clone(), d.clone()));
        Ok(())
    }
    fn put_assignments(&self, a: &Assignments) -> Result<(), StoreError> {
        self.with(|s| s.assignments = a.clone());
        Ok(())
    }
    fn put_desired(&self, d: &DesiredState) -> Result<(), StoreError> {
        self.with(|s| s.desired.insert(d.device_id.clone(), d.clone()));
        Ok(())
    }
    fn put_rollout(
        &self,
        name: &WorkloadName,
        r: Option<&crate::fleet::rollout::Record>,
    ) -> Result<(), StoreError> {
        self.with(|s| match r {
            Some(r) => s.rollouts.insert(name.clone(), r.clone()),
            None => s.rollouts.remove(name),
        });
        Ok(())
    }
    fn put_secret(&self, name: &SecretName, sec: Option<&StoredSecret>) -> Result<(), StoreError> {
        self.with(|s| match sec {
            Some(x) => s.secrets.insert(name.clone(), x.clone()),
            None => s.secrets.remove(name),
        });
        Ok(())
    }
    fn put_labels_owned(&self) -> Result<(), StoreError> {
        self.with(|s| s.labels_owned = true);
        Ok(())
    }
    fn put_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        self.with(|s| {
            s.audit.push(e.clone());
            if s.audit.len() > crate::fleet::audit::IN_MEMORY {
                s.audit.remove(0);
            }
        });
        Ok(())
    }
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::ids::DeviceId;

    #[test]
    fn sled_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let d = DeviceId::try_from("e1").unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.put_desired(&DesiredState {
                protocol: 1,
                device_id: d.clone(),
                generation: 7,
                artifact_base: String::new(),
                artifact_port: None,
                workloads: vec![],
                secrets: vec![],
            })
            .unwrap();
            let mut a = Assignments::new();
            a.insert(
                WorkloadName::try_from("w").unwrap(),
                [(0, d.clone())].into(),
            );
            s.put_assignments(&a).unwrap();
            s.flush().unwrap();
        }
        // sled's flusher thread may hold the file lock a moment after the drop.
        let s = (0..100)
            .find_map(|_| {
                SledStore::open(dir.path())
                    .map_err(|_| std::thread::sleep(std::time::Duration::from_millis(20)))
                    .ok()
            })
            .expect("reopen");
        let snap = s.load().unwrap();
        assert_eq!(snap.desired[&d].generation, 7);
        assert_eq!(snap.assignments.len(), 1);
    }
}
