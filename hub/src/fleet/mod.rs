//! The functional core: the fleet's decisions as plain functions and types, with no I/O, no
//! clock (`now` is a parameter), no tokio, no store and no network crate. `cargo xtask
//! boundaries` fails CI on a forbidden import here.
//!
//! [`Fleet`] (owned by the hub's main loop, one owner, no locks) is the façade: each input (an
//! accepted manifest, a delete, a device's hello, presence or status, the clock moving)
//! updates the state and returns the desired states to publish; what must be persisted is
//! recorded as [`changes::Write`]s, which the shell writes and flushes before it publishes
//! or answers. Its parts, one file each, are `impl Fleet` blocks over the state below:
//!
//! - [`workloads`]: apply, scale, delete;
//! - [`rollouts`]: start, advance and steer rolling updates;
//! - [`jobs`]: runs of workloads that run to completion, their results, rerun and expiry;
//! - [`devices`]: hello, presence, loss, grants, labels, cordon, drain, revocation, mDNS;
//! - [`forget`]: deleting a device that is gone for good;
//! - [`policy`]: what an admin lets containers ask for (privileged, host device nodes);
//! - [`reports`]: what devices report, across hub replicas;
//! - [`secrets`]: checks, storage and deletion of secrets;
//! - [`configs`]: checks, storage and deletion of configs, pinned into their users' revisions;
//! - [`placement`]: the only part that crosses the others (scheduler → desired states);
//! - [`views`]: read models for `shoal get` and the dashboard.
//!
//! The pure engines they use:
//!
//! - [`scheduler`]: placement (which device runs which replica);
//! - [`rollout`]: rolling updates, step by step;
//! - [`job`]: a job run's results and end;
//! - [`ingest`]: status reports spread over hub replicas;
//! - [`events`]: fleet events from one view to the next;
//! - [`audit`]: the audit log's numbering and bounds.
//!
//! Why `impl` blocks per file rather than sub-types each owning its state: placement reads
//! every part (devices, workloads, rollouts, secrets) at once, and rollouts and drains write
//! assignments; sub-types would have to lend each other their state on every call. The
//! files keep the concerns apart to read; the fields stay one struct's.

pub mod audit;
pub mod changes;
pub mod configs;
pub mod devices;
pub mod events;
pub mod forget;
pub mod ingest;
pub mod job;
pub mod jobs;
pub mod placement;
pub mod policy;
pub mod records;
pub mod reports;
pub mod rollout;
pub mod rollouts;
pub mod scheduler;
pub mod secrets;
pub mod views;
pub mod workloads;

#[cfg(test)]
mod tests;

pub use configs::ConfigRefusal;
pub use devices::{FetchRefusal, LabelRefusal};
pub use forget::DeviceRefusal;
pub use placement::SchedulingRun;
pub use policy::PolicyRefusal;
pub use reports::Accepted;
pub use rollouts::RolloutAction;
pub use secrets::SecretRefusal;
pub use workloads::WorkloadRefusal;

use changes::{Changes, Write};
use records::{DeviceRecord, Snapshot, StoredSecret};
use rollout::Record;
use scheduler::Schedule;
use shoal_api::model::ids::{DeviceId, SecretName, WorkloadName};
use shoal_api::model::labels::{self, Labels};
use shoal_api::model::workload::Workload;
use shoal_api::wire::messages::{DesiredState, DeviceStatus};
use std::collections::BTreeMap;
use tracing::{info, warn};

/// Live (not persisted) knowledge about a device.
#[derive(Debug, Default, Clone)]
struct Live {
    online: bool,
    status: Option<DeviceStatus>,
    /// When the hub last heard from the device (any message), or when it started.
    last_heard_ms: u64,
    /// When presence went offline (last will or clean leave).
    offline_since_ms: Option<u64>,
    /// Offline, or silent, for longer than the grace period: its replicas move.
    lost: bool,
    /// Workloads whose own `spec.disconnect.lostAfter` has passed since the device was last
    /// heard (see [`Fleet::check_lost`]).
    lost_for: std::collections::BTreeSet<WorkloadName>,
    /// When this hub took `status` (its own clock; see [`Fleet::accept_status`]).
    status_at_ms: u64,
    /// `status`'s fingerprint, once asked for.
    fingerprint: Option<String>,
}

impl Live {
    fn fingerprint(&mut self) -> Option<&str> {
        let s = self.status.as_ref()?;
        Some(
            self.fingerprint
                .get_or_insert_with(|| ingest::fingerprint(s)),
        )
    }
}

pub struct Fleet {
    /// Writes not yet taken by the shell (see [`Fleet::take_writes`]).
    changes: Changes,
    artifact_base: String,
    /// The HTTP port agents use when `artifact_base` is empty.
    artifact_port: Option<u16>,
    workloads: BTreeMap<WorkloadName, Workload>,
    devices: BTreeMap<DeviceId, DeviceRecord>,
    live: BTreeMap<DeviceId, Live>,
    schedule: Schedule,
    desired: BTreeMap<DeviceId, DesiredState>,
    /// Agents of this fleet currently advertised over mDNS: record full name → (device,
    /// addresses). Live only: mDNS re-announces after a hub restart.
    mdns: BTreeMap<String, (DeviceId, Vec<std::net::IpAddr>)>,
    /// Per workload: its rollout and revision history (persisted).
    rollouts: BTreeMap<WorkloadName, Record>,
    /// Secrets: names, keys and versions; values only encrypted (persisted).
    secrets: BTreeMap<SecretName, StoredSecret>,
    /// Configs as last applied (persisted); workloads read the copies pinned in their specs.
    configs: BTreeMap<shoal_api::model::ids::ConfigName, records::StoredConfig>,
    /// What an admin lets containers ask for (persisted).
    policy: shoal_api::policy::fleet::FleetPolicy,
    /// Per job workload: its current run (persisted).
    jobs: BTreeMap<WorkloadName, job::JobState>,
    /// Scheduler runs since the server last took them (for its metrics).
    runs: Vec<SchedulingRun>,
    /// Whether the labels devices report steer placement (an `--insecure` fleet, where any
    /// client can speak as any device anyway); otherwise only the operator's do.
    trust_reported_labels: bool,
    /// The newest audit entries (persisted).
    audit: audit::AuditLog,
    /// Devices revoked in the enrollment book (`shoal-hub device revoke`; the book is the
    /// record, this its latest reading): placement does not see them, so they keep no
    /// replica, `placement: every` ones included, and are sealed no secret.
    revoked: std::collections::BTreeSet<DeviceId>,
}

/// What happened to each workload (or secret) of an accepted apply.
pub type ApplyOutcome = BTreeMap<String, String>;

impl Fleet {
    /// The fleet as persisted (`snap`, the store's load). `artifact_base` is the URL agents
    /// fetch blobs from; `trust_reported_labels`: the labels devices report steer placement
    /// too, beside the operator's (`--insecure` fleets, whose devices have no identity to
    /// bind labels to). Reserved keys (`shoal.dev/…`) stay the operator's.
    pub fn open(snap: Snapshot, artifact_base: String, trust_reported_labels: bool) -> Self {
        let labels_owned = snap.labels_owned;
        let mut core = Self {
            changes: Changes::default(),
            artifact_base,
            artifact_port: None,
            workloads: snap.workloads,
            devices: snap.devices,
            live: BTreeMap::new(),
            schedule: Schedule {
                assignments: snap.assignments,
                pending: BTreeMap::new(),
            },
            desired: snap.desired,
            mdns: BTreeMap::new(),
            rollouts: snap.rollouts,
            secrets: snap.secrets,
            configs: snap.configs,
            policy: snap.policy,
            jobs: snap.jobs,
            runs: Vec::new(),
            trust_reported_labels,
            audit: audit::AuditLog::from_loaded(snap.audit),
            revoked: Default::default(),
        };
        core.adopt_reported_labels(labels_owned);
        // Recompute pending reasons; assignments are stable, so this changes nothing placed.
        core.schedule = core.place();
        core
    }

    /// The writes made since the last call, oldest first, for the shell to write and flush
    /// before it publishes or answers. A standby drops them: the leader writes the same.
    pub fn take_writes(&mut self) -> Vec<Write> {
        self.changes.take()
    }

    /// Upgrade: records from before labels were the operator's have none of their own; the
    /// labels their devices reported then (when they steered placement) become the
    /// operator's, once for the whole store (`labels_owned`, a marker written with them), so
    /// a fleet places as it did. After that, a record without labels (one an older replica
    /// rewrote) gets none: reports made after the upgrade are never adopted. A hub that
    /// trusts reports (`--insecure`) adopts nothing: reports count there anyway.
    pub(super) fn adopt_reported_labels(&mut self, labels_owned: bool) {
        // A hub that trusts reports (`--insecure`) leaves records and store as they are: a
        // later hub with identities adopts then.
        if self.trust_reported_labels {
            return;
        }
        let adopt = !labels_owned;
        let mut adopted = 0;
        for rec in self.devices.values_mut().filter(|r| r.labels.is_none()) {
            rec.labels = Some(match adopt {
                true => labels::requestable(&rec.hello.labels),
                false => Labels::new(),
            });
            self.changes.put_device(rec);
            adopted += 1;
        }
        if !labels_owned {
            self.changes.put_labels_owned();
        }
        if adopted > 0 && adopt {
            info!(
                devices = adopted,
                "labels are the operator's now: kept the labels these devices reported before (see `shoal label device`)"
            );
        } else if adopted > 0 {
            warn!(
                devices = adopted,
                "device records without labels of their own (written by an older hub replica?) get none: label them with `shoal label device`"
            );
        }
    }

    /// The labels placement sees for `rec`.
    pub(super) fn labels_of(&self, rec: &DeviceRecord) -> Labels {
        let own = rec.labels.clone().unwrap_or_default();
        if self.trust_reported_labels {
            let mut l = labels::requestable(&rec.hello.labels);
            l.extend(own);
            l
        } else {
            own
        }
    }

    /// Reads the persistent state again (a standby hub follows its leader's writes this
    /// way), keeping what devices reported.
    pub fn reload(&mut self, snap: Snapshot) {
        self.workloads = snap.workloads;
        self.devices = snap.devices;
        self.schedule.assignments = snap.assignments;
        self.desired = snap.desired;
        self.rollouts = snap.rollouts;
        self.secrets = snap.secrets;
        self.configs = snap.configs;
        self.policy = snap.policy;
        self.jobs = snap.jobs;
        // A standby's store drops the writes: the leader adopts and writes the same.
        self.adopt_reported_labels(snap.labels_owned);
        self.schedule = self.place();
    }

    /// Takes over what `standby` heard from devices (their liveness, status and mDNS
    /// records), so that a hub promoted to leader starts from what it already knows.
    pub fn adopt_live(&mut self, standby: &mut Fleet) {
        self.live = std::mem::take(&mut standby.live);
        self.mdns = std::mem::take(&mut standby.mdns);
    }

    /// Records a change in the audit log (durable once the shell has written and flushed
    /// the fleet's writes, which it does before it answers).
    pub fn record_audit(
        &mut self,
        change: audit::Change,
        now_ms: u64,
    ) -> shoal_api::policy::operator::AuditEntry {
        let e = self.audit.record(change, now_ms);
        self.changes.put_audit(&e);
        e
    }

    /// Audit entries numbered after `after`, oldest first, at most `limit`.
    pub fn audit_since(
        &self,
        after: u64,
        limit: usize,
    ) -> Vec<shoal_api::policy::operator::AuditEntry> {
        self.audit.since(after, limit)
    }

    /// Every device's current desired state (republished when the hub (re)connects, since
    /// a broker may have lost its retained messages).
    pub fn all_desired(&self) -> Vec<DesiredState> {
        self.desired.values().cloned().collect()
    }
}
