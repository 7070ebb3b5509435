//! The fleet's state in etcd: loads, buffered writes, fenced flushes (see [`super`]).

use super::client::{Cmd, Op, Refused};
use super::EtcdStore;
use crate::store::{Fence, Snapshot, Store, StoreError, StoredConfig, StoredSecret};
use serde::de::DeserializeOwned;
use shoal_api::model::ids::{ConfigName, DeviceId, SecretName, WorkloadName};
use shoal_api::model::workload::Workload;
use shoal_api::wire::messages::DesiredState;

fn dec<T: DeserializeOwned>(key: &str, v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

impl Store for EtcdStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let mut snap = Snapshot::default();
        let base = format!("{}/", self.url.prefix);
        for (key, value) in self
            .ask(|reply| Cmd::Load(base.clone(), reply))?
            .map_err(|e| self.fail(e))?
        {
            let Some((kind, _name)) = key.strip_prefix(&base).and_then(|r| r.split_once('/'))
            else {
                continue;
            };
            match kind {
                "workloads" => {
                    let w: Workload = dec(&key, &value)?;
                    snap.workloads.insert(w.name.clone(), w);
                }
                "devices" => {
                    let d: crate::store::DeviceRecord = dec(&key, &value)?;
                    snap.devices.insert(d.hello.device_id.clone(), d);
                }
                "desired" => {
                    let d: DesiredState = dec(&key, &value)?;
                    snap.desired.insert(d.device_id.clone(), d);
                }
                "rollouts" => {
                    let r: crate::fleet::rollout::Record = dec(&key, &value)?;
                    snap.rollouts.insert(r.workload.clone(), r);
                }
                "configs" => {
                    let c: StoredConfig = dec(&key, &value)?;
                    snap.configs.insert(c.config.name.clone(), c);
                }
                "jobs" => {
                    let j: crate::fleet::job::JobState = dec(&key, &value)?;
                    snap.jobs.insert(j.workload.clone(), j);
                }
                "secrets" => {
                    let s: StoredSecret = dec(&key, &value)?;
                    snap.secrets.insert(s.name.clone(), s);
                }
                "meta" if key.ends_with("/meta/assignments") => {
                    snap.assignments = dec(&key, &value)?;
                }
                "meta" if key.ends_with("/meta/labels-owned") => snap.labels_owned = true,
                "meta" if key.ends_with("/meta/policy") => snap.policy = dec(&key, &value)?,
                _ => {} // written by a newer hub: not ours to judge
            }
        }
        // The audit log lives beside the state (`{prefix}.audit/{seq}`, zero-padded), so the
        // state's loads and the standbys' watch never carry it: only its newest entries.
        let limit = i64::try_from(crate::fleet::audit::IN_MEMORY).unwrap_or(i64::MAX);
        let under = self.audit_key("");
        for (key, value) in self
            .ask(|reply| Cmd::Newest(under, limit, reply))?
            .map_err(|e| self.fail(e))?
        {
            snap.audit.push(dec(&key, &value)?);
        }
        snap.audit.reverse();
        Ok(snap)
    }
    fn put_workload(&self, w: &Workload) -> Result<(), StoreError> {
        self.put("workloads", w.name.as_str(), w)
    }
    fn delete_workload(&self, name: &WorkloadName) -> Result<(), StoreError> {
        self.push(Op::Delete(self.key("workloads", name.as_str())));
        Ok(())
    }
    fn put_device(&self, d: &crate::store::DeviceRecord) -> Result<(), StoreError> {
        self.put("devices", d.hello.device_id.as_str(), d)
    }
    fn put_assignments(&self, a: &crate::fleet::scheduler::Assignments) -> Result<(), StoreError> {
        self.put("meta", "assignments", a)
    }
    fn put_labels_owned(&self) -> Result<(), StoreError> {
        self.put("meta", "labels-owned", &true)
    }
    fn put_audit(&self, e: &shoal_api::policy::operator::AuditEntry) -> Result<(), StoreError> {
        if let Some(old) = e.seq.checked_sub(crate::fleet::audit::KEPT) {
            self.push(Op::Delete(self.audit_key(&format!("{old:020}"))));
        }
        let bytes = serde_json::to_vec(e).map_err(StoreError::Encode)?;
        self.push(Op::Put(self.audit_key(&format!("{:020}", e.seq)), bytes));
        Ok(())
    }
    fn put_desired(&self, d: &DesiredState) -> Result<(), StoreError> {
        self.put("desired", d.device_id.as_str(), d)
    }
    fn put_rollout(
        &self,
        name: &WorkloadName,
        r: Option<&crate::fleet::rollout::Record>,
    ) -> Result<(), StoreError> {
        match r {
            Some(r) => self.put("rollouts", name.as_str(), r),
            None => {
                self.push(Op::Delete(self.key("rollouts", name.as_str())));
                Ok(())
            }
        }
    }
    fn put_policy(&self, p: &shoal_api::policy::fleet::FleetPolicy) -> Result<(), StoreError> {
        self.put("meta", "policy", p)
    }
    fn delete_device(&self, id: &DeviceId) -> Result<(), StoreError> {
        self.push(Op::Delete(self.key("devices", id.as_str())));
        Ok(())
    }
    fn put_job(
        &self,
        name: &WorkloadName,
        j: Option<&crate::fleet::job::JobState>,
    ) -> Result<(), StoreError> {
        match j {
            Some(j) => self.put("jobs", name.as_str(), j),
            None => {
                self.push(Op::Delete(self.key("jobs", name.as_str())));
                Ok(())
            }
        }
    }
    fn put_config(&self, name: &ConfigName, c: Option<&StoredConfig>) -> Result<(), StoreError> {
        match c {
            Some(c) => self.put("configs", name.as_str(), c),
            None => {
                self.push(Op::Delete(self.key("configs", name.as_str())));
                Ok(())
            }
        }
    }
    fn put_secret(&self, name: &SecretName, s: Option<&StoredSecret>) -> Result<(), StoreError> {
        match s {
            Some(s) => self.put("secrets", name.as_str(), s),
            None => {
                self.push(Op::Delete(self.key("secrets", name.as_str())));
                Ok(())
            }
        }
    }
    fn flush(&self) -> Result<(), StoreError> {
        let ops = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if ops.is_empty() {
            return Ok(());
        }
        let fence = self.fence.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let r = self
            .ask(|reply| Cmd::Commit(ops.clone(), fence, reply))
            .and_then(|r| {
                r.map_err(|e| match e {
                    Refused::Failed(why) => self.fail(why),
                    Refused::Fenced(f) => StoreError::Fenced {
                        url: self.url.to_string(),
                        key: String::from_utf8_lossy(&f.key).into_owned(),
                    },
                })
            });
        match r {
            Ok(()) => Ok(()),
            Err(e) => {
                // Kept, in order, ahead of anything written since: the next flush retries.
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                let newer = std::mem::take(&mut *pending);
                *pending = ops;
                pending.extend(newer);
                Err(e)
            }
        }
    }
    fn fence(&self, fence: Fence) {
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = Some(fence);
    }
}
