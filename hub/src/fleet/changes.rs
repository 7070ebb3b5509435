//! What the fleet decided to persist: [`Changes`] records each write in order, and cannot
//! fail; the shell takes them ([`super::Fleet::take_writes`]), writes them to the store and
//! flushes before it publishes or answers (`crate::app`'s `commit`). So the core names no
//! store and no store error, and "durable before acknowledged" is sequenced in one place.

use super::records::{DeviceRecord, StoredConfig, StoredSecret};
use super::rollout::Record;
use super::scheduler::Assignments;
use shoal_api::model::ids::{DeviceId, SecretName, WorkloadName};
use shoal_api::model::workload::Workload;
use shoal_api::policy::operator::AuditEntry;
use shoal_api::wire::messages::DesiredState;

/// One write for the store, in the order the fleet made it. Variants differ in size (a
/// desired state or a workload against a name); writes live only until the next commit.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Workload(Workload),
    DeleteWorkload(WorkloadName),
    Device(DeviceRecord),
    Assignments(Assignments),
    Desired(DesiredState),
    /// `None`: the workload's rollout record is gone.
    Rollout(WorkloadName, Option<Record>),
    /// `None`: the secret is deleted.
    Secret(SecretName, Option<StoredSecret>),
    /// The fleet's policy, as an admin set it.
    Policy(shoal_api::policy::fleet::FleetPolicy),
    /// A device forgotten: its record (its desired state stays, emptied).
    DeleteDevice(DeviceId),
    /// `None`: the config is deleted.
    Config(shoal_api::model::ids::ConfigName, Option<StoredConfig>),
    /// `None`: the job's runs are forgotten (deleted, or no longer a job).
    Job(WorkloadName, Option<super::job::JobState>),
    /// Device labels are the operator's in this store (see [`super::Fleet::open`]).
    LabelsOwned,
    Audit(AuditEntry),
}

/// The writes made since the shell last took them.
#[derive(Debug, Default)]
pub struct Changes {
    writes: Vec<Write>,
}

impl Changes {
    pub fn put_workload(&mut self, w: &Workload) {
        self.writes.push(Write::Workload(w.clone()));
    }

    pub fn delete_workload(&mut self, name: &WorkloadName) {
        self.writes.push(Write::DeleteWorkload(name.clone()));
    }

    pub fn put_device(&mut self, d: &DeviceRecord) {
        self.writes.push(Write::Device(d.clone()));
    }

    pub fn put_assignments(&mut self, a: &Assignments) {
        self.writes.push(Write::Assignments(a.clone()));
    }

    pub fn put_desired(&mut self, d: &DesiredState) {
        self.writes.push(Write::Desired(d.clone()));
    }

    pub fn put_rollout(&mut self, name: &WorkloadName, r: Option<&Record>) {
        self.writes.push(Write::Rollout(name.clone(), r.cloned()));
    }

    pub fn put_secret(&mut self, name: &SecretName, s: Option<&StoredSecret>) {
        self.writes.push(Write::Secret(name.clone(), s.cloned()));
    }

    pub fn put_policy(&mut self, p: shoal_api::policy::fleet::FleetPolicy) {
        self.writes.push(Write::Policy(p));
    }

    pub fn delete_device(&mut self, id: &DeviceId) {
        self.writes.push(Write::DeleteDevice(id.clone()));
    }

    pub fn put_config(
        &mut self,
        name: &shoal_api::model::ids::ConfigName,
        c: Option<&StoredConfig>,
    ) {
        self.writes.push(Write::Config(name.clone(), c.cloned()));
    }

    pub fn put_job(&mut self, name: &WorkloadName, j: Option<&super::job::JobState>) {
        self.writes.push(Write::Job(name.clone(), j.cloned()));
    }

    pub fn put_labels_owned(&mut self) {
        self.writes.push(Write::LabelsOwned);
    }

    pub fn put_audit(&mut self, e: &AuditEntry) {
        self.writes.push(Write::Audit(e.clone()));
    }

    /// The writes so far, oldest first; none are left.
    pub fn take(&mut self) -> Vec<Write> {
        std::mem::take(&mut self.writes)
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}
