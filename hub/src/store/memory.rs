//! An in-memory store, for tests.

use super::{DeviceRecord, Snapshot, Store, StoreError, StoredConfig, StoredSecret};
use crate::fleet::scheduler::Assignments;
use shoal_api::model::ids::{ConfigName, DeviceId, SecretName, WorkloadName};
use shoal_api::model::workload::Workload;
use shoal_api::policy::operator::AuditEntry;
use shoal_api::wire::messages::DesiredState;
use std::sync::Mutex;

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
    fn put_policy(&self, p: &shoal_api::policy::fleet::FleetPolicy) -> Result<(), StoreError> {
        self.with(|s| s.policy = *p);
        Ok(())
    }
    fn delete_device(&self, id: &DeviceId) -> Result<(), StoreError> {
        self.with(|s| s.devices.remove(id));
        Ok(())
    }
    fn put_job(
        &self,
        name: &WorkloadName,
        j: Option<&crate::fleet::job::JobState>,
    ) -> Result<(), StoreError> {
        self.with(|s| match j {
            Some(x) => s.jobs.insert(name.clone(), x.clone()),
            None => s.jobs.remove(name),
        });
        Ok(())
    }
    fn put_config(&self, name: &ConfigName, c: Option<&StoredConfig>) -> Result<(), StoreError> {
        self.with(|s| match c {
            Some(x) => s.configs.insert(name.clone(), x.clone()),
            None => s.configs.remove(name),
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
