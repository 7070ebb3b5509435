//! The default store: sled in `DATA_DIR/hub.db`, one tree per kind of record, JSON values.

use super::{DeviceRecord, Snapshot, Store, StoreError, StoredConfig, StoredSecret};
use crate::fleet::scheduler::Assignments;
use serde::{de::DeserializeOwned, Serialize};
use shoal_api::model::ids::{ConfigName, DeviceId, SecretName, WorkloadName};
use shoal_api::model::workload::Workload;
use shoal_api::policy::operator::AuditEntry;
use shoal_api::wire::messages::DesiredState;
use std::collections::BTreeMap;
use std::path::Path;

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Db(Box::new(e))
    }
}

const WORKLOADS: &str = "workloads";
const DEVICES: &str = "devices";
const DESIRED: &str = "desired";
const META: &str = "meta";
const ROLLOUTS: &str = "rollouts";
const SECRETS: &str = "secrets";
const CONFIGS: &str = "configs";
const JOBS: &str = "jobs";
const AUDIT: &str = "audit";
const ASSIGNMENTS_KEY: &[u8] = b"assignments";
const LABELS_OWNED_KEY: &[u8] = b"labels-owned";
const POLICY_KEY: &[u8] = b"policy";

/// sled-backed store in `DATA_DIR/hub.db`.
pub struct SledStore {
    db: sled::Db,
    workloads: sled::Tree,
    devices: sled::Tree,
    desired: sled::Tree,
    meta: sled::Tree,
    rollouts: sled::Tree,
    secrets: sled::Tree,
    configs: sled::Tree,
    jobs: sled::Tree,
    audit: sled::Tree,
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("hub.db");
        let db = sled::open(&path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source: Box::new(source),
        })?;
        Ok(Self {
            workloads: db.open_tree(WORKLOADS)?,
            devices: db.open_tree(DEVICES)?,
            desired: db.open_tree(DESIRED)?,
            meta: db.open_tree(META)?,
            rollouts: db.open_tree(ROLLOUTS)?,
            secrets: db.open_tree(SECRETS)?,
            configs: db.open_tree(CONFIGS)?,
            jobs: db.open_tree(JOBS)?,
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
        let policy = match self.meta.get(POLICY_KEY)? {
            Some(v) => dec(POLICY_KEY, &v)?,
            None => Default::default(),
        };
        Ok(Snapshot {
            policy,
            workloads: load_tree(&self.workloads, |w: &Workload| w.name.clone())?,
            devices: load_tree(&self.devices, |d: &DeviceRecord| d.hello.device_id.clone())?,
            desired: load_tree(&self.desired, |d: &DesiredState| d.device_id.clone())?,
            rollouts: load_tree(&self.rollouts, |r: &crate::fleet::rollout::Record| {
                r.workload.clone()
            })?,
            secrets: load_tree(&self.secrets, |s: &StoredSecret| s.name.clone())?,
            configs: load_tree(&self.configs, |c: &StoredConfig| c.config.name.clone())?,
            jobs: load_tree(&self.jobs, |j: &crate::fleet::job::JobState| {
                j.workload.clone()
            })?,
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
    fn put_policy(&self, p: &shoal_api::policy::fleet::FleetPolicy) -> Result<(), StoreError> {
        self.meta.insert(POLICY_KEY, enc(p)?)?;
        Ok(())
    }
    fn delete_device(&self, id: &DeviceId) -> Result<(), StoreError> {
        self.devices.remove(id.as_str())?;
        Ok(())
    }
    fn put_job(
        &self,
        name: &WorkloadName,
        j: Option<&crate::fleet::job::JobState>,
    ) -> Result<(), StoreError> {
        match j {
            Some(j) => self.jobs.insert(name.as_str(), enc(j)?)?,
            None => self.jobs.remove(name.as_str())?,
        };
        Ok(())
    }
    fn put_config(&self, name: &ConfigName, c: Option<&StoredConfig>) -> Result<(), StoreError> {
        match c {
            Some(c) => self.configs.insert(name.as_str(), enc(c)?)?,
            None => self.configs.remove(name.as_str())?,
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

#[cfg(test)]
mod tests {
    use super::*;

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
