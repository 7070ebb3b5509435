//! The replicas part of the agent's loop: the persisted desired state, the supervised
//! replicas and their last statuses.
//!
//! [`Replicas`] takes a desired state (verified, newer, saved durably before it is acted
//! on), reconciles the replicas with it (`plan`, then one supervisor task per replica to
//! start, stop or replace), keeps the statuses the supervisors report, and sweeps what no
//! replica uses any more (volumes, opened secrets). A job replica's result is saved durably
//! before it is reported, and a desired job replica with a result for its run is not run
//! again (`crate::core::plan::finished`), whatever restarts in between. It knows nothing of the bus or mDNS:
//! the loop hands it the network grants of a replica and publishes what it reports.

use crate::core::hardware::{Grant, Holder, Holdings, Inventory};
use crate::core::plan::{
    config_digests, finished, lost_dependency, plan, secret_versions, waiting_for, Action, Observed,
};
use crate::core::schedule::{decide, Decision, ScheduleState};
use crate::local::RestartError;
use crate::replica::supervisor::{self, Shared, Update};
use crate::runtime::Network;
use crate::status::RestartView;
use crate::store::{Runs, Schedules, Store, StoreError};
use crate::volumes::Swept;
use shoal_api::model::ids::{DeviceId, SecretName, WorkloadName};
use shoal_api::wire::endpoint::BrokerUrl;
use shoal_api::wire::messages::{DesiredState, DesiredWorkload, InstanceStatus, Phase};
use shoal_daemon::clock::now_ms;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// What [`Replicas`] is told once, at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub device_id: DeviceId,
    /// The hub's signing key; `None` for an `--insecure` agent (nothing to verify with).
    pub hub_key: Option<shoal_pki::sign::HubKey>,
    /// The device's private key, which opens the secrets sealed to it; `None` for an
    /// `--insecure` agent.
    pub device_key: Option<PathBuf>,
    /// Where modules come from when the desired state does not say.
    pub artifacts: ArtifactSource,
    /// How long a workload's volumes outlive its leaving this device.
    pub volume_retention: Duration,
    /// The hardware nodes the device offers (`resources.devices`).
    pub hardware: Inventory,
}

/// What the agent was pointed at, for [`Replicas::artifact_base`].
#[derive(Debug, Clone, Default)]
pub struct ArtifactSource {
    /// `--hub`.
    pub hub_url: Option<String>,
    /// `--broker`.
    pub broker: Option<BrokerUrl>,
    pub insecure: bool,
}

/// What came of a desired-state message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desired {
    /// Newer, saved: to be reconciled.
    Accepted,
    /// The one in force, delivered again (the hub is in sync).
    Same,
    /// Rejected or not saved: nothing changes.
    Ignored,
}

/// One supervised replica.
struct Replica {
    workload: WorkloadName,
    revision: String,
    /// A job replica's run.
    run: Option<u64>,
    /// The secrets it runs with, at their versions ([`crate::core::plan::secret_versions`]).
    secrets: BTreeSet<(SecretName, String)>,
    /// Its config files ([`crate::core::plan::config_digests`]).
    configs: BTreeSet<String>,
    /// The container's id when it runs the container variant (its stop may take a grace
    /// period).
    container: Option<String>,
    task: u64,
    controls: supervisor::Controls,
    handle: JoinHandle<()>,
}

/// A container stopping in the background: its workload, and the secrets and config files
/// it may still read.
type Stopping = (
    WorkloadName,
    BTreeSet<(SecretName, String)>,
    BTreeSet<String>,
);

/// The desired state, the replicas and their statuses.
pub struct Replicas {
    settings: Settings,
    store: Box<dyn Store>,
    shared: Shared,
    tracker: TaskTracker,
    desired: Option<DesiredState>,
    replicas: BTreeMap<String, Replica>,
    statuses: BTreeMap<String, InstanceStatus>,
    /// Containers still stopping in the background (id → workload): their workloads'
    /// volumes stay, and a replica that would reuse the id waits for them.
    stopping: BTreeMap<String, Stopping>,
    /// Where a container that stopped in the background says so ([`Replicas::gone`]).
    gone_tx: mpsc::Sender<String>,
    next_task: u64,
    /// Which replica (or stopping container) holds which hardware node.
    hardware: Holdings,
    /// What of it was last saved (the replicas' part).
    hardware_saved: crate::store::Holdings,
    /// The results of job runs that finished here (saved before reported).
    runs: Runs,
    /// Results not saved yet (the store failed): reported without `finishedAtMs` meanwhile.
    unsaved: Runs,
    /// Replicas with `spec.disconnect.stopAfter` that may not run for want of contact with
    /// the hub (stopped, or never started): instance → why, and the generation of the
    /// desired state in force when they were fenced.
    fenced: BTreeMap<String, (String, u64)>,
    /// Each scheduled replica's state (`spec.schedule`; saved before a run starts).
    schedules: Schedules,
    /// Scheduled replicas with a run in progress: instance → the time it was scheduled at
    /// (its run id) and the spec it started with (a change of the desired state mid-run is
    /// for the next run, never a restart of this one).
    active: BTreeMap<String, (u64, DesiredWorkload)>,
    /// The device's clock as [`Self::check_schedules`] last read it (what statuses show the
    /// next run from).
    schedule_now: u64,
}

/// What a supervisor's report changed ([`Replicas::on_update`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Updated {
    /// The replica entered or left `Running`.
    pub running_changed: bool,
    /// A job's run finished: its supervisor can go (at the next reconcile).
    pub run_finished: bool,
    /// A replica others may wait for (`spec.after`) changed phase or health: they may start,
    /// or stop to wait again, at the next reconcile.
    pub order: bool,
}

impl Replicas {
    /// `shared` goes to every supervisor (its `updates` come back through the loop to
    /// [`Replicas::on_update`]); `gone` receives the ids of containers that finished
    /// stopping in the background.
    pub fn new(
        settings: Settings,
        store: Box<dyn Store>,
        shared: Shared,
        gone: mpsc::Sender<String>,
        tracker: TaskTracker,
    ) -> Self {
        Replicas {
            hardware: Holdings::new(settings.hardware.clone()),
            hardware_saved: Default::default(),
            settings,
            store,
            shared,
            tracker,
            desired: None,
            replicas: BTreeMap::new(),
            statuses: BTreeMap::new(),
            stopping: BTreeMap::new(),
            gone_tx: gone,
            next_task: 0,
            runs: Runs::new(),
            unsaved: Runs::new(),
            fenced: BTreeMap::new(),
            schedules: Schedules::new(),
            active: BTreeMap::new(),
            schedule_now: 0,
        }
    }

    /// Whether the loop should call [`Self::check_contact`] and [`Self::check_schedules`]
    /// every second: a desired replica has `stopAfter` or a schedule.
    pub fn ticks(&self) -> bool {
        !self.schedules.is_empty()
            || !self.fenced.is_empty()
            || self
                .desired_workloads()
                .iter()
                .any(|w| w.stop_after_ms.is_some() || w.schedule.is_some())
    }

    /// Whether a replica is fenced (the loop then says hello again once contact is back,
    /// for the hub to issue the state that lets it run).
    pub fn has_fenced(&self) -> bool {
        !self.fenced.is_empty()
    }

    /// The shortest `stopAfter` of the desired replicas (the loop keeps contact fresher
    /// than a quarter of it).
    pub fn min_stop_after(&self) -> Option<u64> {
        self.desired_workloads()
            .iter()
            .filter_map(|w| w.stop_after_ms)
            .min()
    }

    /// Fires, skips or misses the scheduled replicas' runs due at `now` (Unix ms, the
    /// device's clock); `online`: the hub's broker is connected (runs fired offline say
    /// so). The schedules' state is saved before a run starts: each scheduled time runs at
    /// most once. `true`: something changed (reconcile).
    pub fn check_schedules(&mut self, now: u64, online: bool) -> bool {
        self.schedule_now = now;
        let scheduled: Vec<(
            String,
            shoal_api::model::schedule::DesiredSchedule,
            DesiredWorkload,
        )> = self
            .desired_workloads()
            .iter()
            .filter_map(|w| Some((w.instance(), w.schedule.clone()?, w.clone())))
            .collect();
        let before = self.schedules.clone();
        let active_before = self.active.clone();
        self.schedules
            .retain(|i, _| scheduled.iter().any(|(s, _, _)| s == i));
        self.active
            .retain(|i, _| scheduled.iter().any(|(s, _, _)| s == i));
        use crate::core::schedule::run;
        for (instance, s, w) in &scheduled {
            // First seen now, or its schedule changed: no catching up on the past.
            let st = self
                .schedules
                .entry(instance.clone())
                .or_insert_with(|| ScheduleState {
                    last_ms: now,
                    runs: Vec::new(),
                    schedule: None,
                });
            if st.schedule.as_ref() != Some(&s.schedule) {
                st.schedule = Some(s.schedule.clone());
                st.last_ms = now;
            }
            // The clock went back (a wrong time corrected): not a day of silence for that.
            if st.last_ms > now.saturating_add(86_400_000) {
                warn!(%instance, last_ms = st.last_ms, now, "the device's clock went back: the schedule counts from now");
                st.last_ms = now;
            }
            let running = self.active.get(instance).map(|(at, _)| *at);
            let decision = match decide(s, st, running.is_some(), now) {
                // A fenced replica may not run: the hub has not heard this device.
                Ok(Decision::Fire(at) | Decision::Replace(at))
                    if self.fenced.contains_key(instance) =>
                {
                    warn!(%instance, scheduled_ms = at, "scheduled run not started: the replica is fenced (spec.disconnect.stopAfter)");
                    Ok(Decision::Miss(at))
                }
                d => d,
            };
            match decision {
                Ok(Decision::Idle) => {}
                Ok(Decision::Fire(at)) => {
                    info!(%instance, scheduled_ms = at, online, "scheduled run starts");
                    st.record(run(at, "Running", !online));
                    self.active.insert(instance.clone(), (at, w.clone()));
                }
                Ok(Decision::Replace(at)) => {
                    info!(%instance, scheduled_ms = at, "scheduled run replaces the one still running");
                    if let Some(prev) = running {
                        st.finish(prev, "Replaced", None, now);
                    }
                    st.record(run(at, "Running", !online));
                    self.active.insert(instance.clone(), (at, w.clone()));
                }
                Ok(Decision::Skip(at)) => {
                    info!(%instance, scheduled_ms = at, "scheduled run skipped: the previous one still runs (concurrency Forbid)");
                    let mut r = run(at, "Skipped", !online);
                    r.finished_ms = Some(now);
                    st.record(r);
                }
                Ok(Decision::Miss(at)) => {
                    warn!(%instance, scheduled_ms = at, "scheduled run missed");
                    let mut r = run(at, "Missed", !online);
                    r.finished_ms = Some(now);
                    st.record(r);
                }
                Err(e) => warn!(%instance, error = %e, "schedule cannot be evaluated"),
            }
        }
        if self.schedules == before {
            return self.active != active_before;
        }
        if let Err(e) = self.store.save_schedules(&self.schedules) {
            // Nothing starts unsaved: it would run again after a restart.
            warn!(error = %e, "cannot save the schedules' state: no run starts until it is");
            self.schedules = before;
            self.active = active_before;
            return false;
        }
        true
    }

    /// A scheduled replica's status part.
    fn schedule_status(
        &self,
        w: &DesiredWorkload,
        now: u64,
    ) -> Option<shoal_api::model::schedule::ScheduleStatus> {
        let s = w.schedule.as_ref()?;
        let st = self.schedules.get(&w.instance())?;
        Some(st.status(s, now))
    }

    /// Saves the results not saved yet with the others; `true` when all are saved (their
    /// statuses then carry `finishedAtMs`).
    pub fn save_results(&mut self) -> bool {
        if self.unsaved.is_empty() {
            return true;
        }
        let mut all = self.runs.clone();
        all.extend(self.unsaved.clone());
        if let Err(e) = self.store.save_runs(&all) {
            warn!(error = %e, results = self.unsaved.len(), "cannot save job runs' results: not reported until they are");
            return false;
        }
        for (instance, s) in std::mem::take(&mut self.unsaved) {
            if let Some(shown) = self.statuses.get_mut(&instance) {
                shown.finished_at_ms = s.finished_at_ms;
            }
        }
        self.runs = all;
        true
    }

    /// Whether results wait to be saved (see [`Self::save_results`]).
    pub fn results_unsaved(&self) -> bool {
        !self.unsaved.is_empty()
    }

    /// Replicas with `stopAfter` run only while the broker has confirmed this device's
    /// messages within that time (`contact`). One that was not is fenced (stopped at the
    /// next reconcile, or not started, at boot too) until contact is back **and** a desired
    /// state newer than the one in force when it was fenced has arrived: the hub issues one
    /// when it hears the device again (its hello), so the replica runs again only on the
    /// hub's word given after that, never on a retained state the broker replays.
    /// `true`: a replica was fenced or let go (reconcile).
    pub fn check_contact(
        &mut self,
        contact: Option<std::time::Instant>,
        now: std::time::Instant,
    ) -> bool {
        let generation = self.generation();
        let mut changed = false;
        let mut fenced = BTreeMap::new();
        for w in self.desired_workloads() {
            let Some(ms) = w.stop_after_ms else { continue };
            let limit = Duration::from_millis(ms);
            let heard = contact.is_some_and(|c| now.saturating_duration_since(c) <= limit);
            let instance = w.instance();
            match self.fenced.get(&instance) {
                None if heard => continue,
                Some((_, at)) if heard && generation > *at => {
                    info!(%instance, "the hub heard this device again: the replica may run");
                    changed = true;
                    continue;
                }
                Some(kept) => {
                    fenced.insert(instance, kept.clone());
                }
                None => {
                    let why = format!(
                        "stopped: the hub has not heard this device for {} (spec.disconnect.stopAfter); it runs again once the hub is back",
                        shoal_api::model::quantity::format_duration_ms(ms)
                    );
                    warn!(%instance, reason = %why, "replica fenced");
                    changed = true;
                    fenced.insert(instance, (why, generation));
                }
            }
        }
        changed |= fenced.len() != self.fenced.len();
        self.fenced = fenced;
        changed
    }

    /// Takes the persisted desired state, if any (offline autonomy): `true` when there is
    /// one to reconcile.
    pub fn resume(&mut self) -> Result<bool, StoreError> {
        let Some(d) = self.store.load_desired()? else {
            return Ok(false);
        };
        info!(
            generation = d.generation,
            replicas = d.workloads.len(),
            "resuming persisted desired state"
        );
        self.open_secrets(&d);
        // What the replicas held before (their containers may still run with it), for
        // those still desired.
        let held = self.store.load_hardware()?;
        let desired: BTreeSet<String> = d.workloads.iter().map(|w| w.instance()).collect();
        for (instance, grant) in held {
            if desired.contains(&instance) && !self.hardware.resume(&instance, grant) {
                warn!(%instance, "hardware it held is no longer offered or is taken: it asks again");
            }
        }
        self.hardware_saved = self.hardware.replicas();
        self.runs = self.store.load_runs()?;
        self.schedules = self.store.load_schedules()?;
        // Runs that were going when the agent stopped are over (never run again).
        let now = now_ms();
        let mut cut = false;
        for st in self.schedules.values_mut() {
            cut |= st.interrupted(now);
        }
        if cut {
            self.store.save_schedules(&self.schedules)?;
        }
        self.desired = Some(d);
        Ok(true)
    }

    /// A desired-state message: verified (for this device, newer, signed by the hub unless
    /// `--insecure`), then saved durably before it is taken.
    pub fn on_desired(&mut self, payload: &[u8]) -> Desired {
        if payload.is_empty() {
            return Desired::Ignored; // a cleared retained message
        }
        let have = self.generation();
        let d = match shoal_pki::sign::verify_desired(
            self.settings.hub_key.as_ref(),
            &self.settings.device_id,
            have,
            payload,
        ) {
            Ok(d) => d,
            Err(shoal_pki::sign::Rejected::Same(g)) => {
                debug!(generation = g, "desired state in force delivered again");
                return Desired::Same;
            }
            Err(e) => {
                warn!(reason = %e, "desired state rejected; nothing changes");
                return Desired::Ignored;
            }
        };
        // Durable before acted on.
        if let Err(e) = self.store.save_desired(&d) {
            warn!(generation = d.generation, error = %e, "cannot persist desired state; not acting on it");
            return Desired::Ignored;
        }
        info!(
            generation = d.generation,
            replicas = d.workloads.len(),
            "desired state accepted"
        );
        self.open_secrets(&d);
        self.desired = Some(d);
        Desired::Accepted
    }

    /// Opens the secrets sealed in `d` that are not on disk yet. One that cannot be opened
    /// is logged (never its value); the replicas that need it fail with that said.
    fn open_secrets(&self, d: &DesiredState) {
        let failed = self.shared.secrets.open_all(
            self.settings.device_id.as_str(),
            self.settings.device_key.as_deref(),
            &d.secrets,
        );
        for (secret, reason) in failed {
            warn!(%secret, %reason, "cannot open secret");
        }
    }

    /// Starts, stops and replaces replicas as `plan` says; `grants` gives a new replica its
    /// network grants. `false` when there is no desired state yet (nothing done).
    pub async fn reconcile(&mut self, grants: &mut dyn FnMut(&DesiredWorkload) -> Network) -> bool {
        let Some(desired) = self.desired.clone() else {
            return false;
        };
        let observed: BTreeMap<String, Observed> = self
            .replicas
            .iter()
            .map(|(k, r)| {
                (
                    k.clone(),
                    Observed {
                        revision: r.revision.clone(),
                        run: r.run,
                        secrets: r.secrets.clone(),
                        configs: r.configs.clone(),
                    },
                )
            })
            .collect();
        let base = self.artifact_base(&desired);
        // A replica that waited for hardware has no supervisor: its status is made anew.
        let replicas = &self.replicas;
        self.statuses.retain(|i, _| replicas.contains_key(i));
        // Results of runs no longer desired go; finished runs are not run again (their
        // supervisors, idle, are stopped).
        let kept: Runs = desired
            .workloads
            .iter()
            .filter_map(|w| {
                let i = w.instance();
                let r = self.runs.get(&i).filter(|r| finished(w, Some(r)))?;
                Some((i, r.clone()))
            })
            .collect();
        if kept != self.runs {
            self.runs = kept;
            if let Err(e) = self.store.save_runs(&self.runs) {
                warn!(error = %e, "cannot forget the results of earlier job runs");
            }
        }
        // Runs of scheduled replicas no longer desired are over.
        let desired_here: BTreeSet<String> =
            desired.workloads.iter().map(|w| w.instance()).collect();
        self.active.retain(|i, _| desired_here.contains(i));
        // A scheduled replica runs only while one of its runs is on, as that run (a job's).
        let todo: Vec<DesiredWorkload> = desired
            .workloads
            .iter()
            .filter(|w| !finished(w, self.runs.get(&w.instance())))
            .filter(|w| !self.fenced.contains_key(&w.instance()))
            .filter_map(|w| match &w.schedule {
                None => Some(w.clone()),
                Some(s) => {
                    // The run goes on with the spec it started with.
                    let (at, started) = self.active.get(&w.instance())?;
                    let at = *at;
                    let mut run = started.clone();
                    run.job = Some(shoal_api::model::job::JobRun {
                        run: at,
                        backoff_limit: s.backoff_limit,
                        active_deadline_ms: s.active_deadline_ms,
                    });
                    Some(run)
                }
            })
            .collect();
        // `spec.after`: what each waiting replica would wait for, from the statuses now.
        // Only replicas that stay desired count: one about to stop is gone already.
        let staying: BTreeSet<String> = desired.workloads.iter().map(|w| w.instance()).collect();
        let known: Vec<InstanceStatus> = self
            .statuses()
            .filter(|s| {
                staying.contains(&shoal_api::wire::messages::instance_name(
                    &s.name, s.replica,
                ))
            })
            .cloned()
            .collect();
        let probed: BTreeSet<&WorkloadName> = desired
            .workloads
            .iter()
            .filter(|w| w.health.is_some())
            .map(|w| &w.name)
            .collect();
        let replicas_of = |n: &WorkloadName| -> Vec<crate::core::plan::Dependency<'_>> {
            known
                .iter()
                .filter(|s| &s.name == n)
                .map(|s| (s, probed.contains(n)))
                .collect()
        };
        // A running replica whose dependency (`restartWith`) failed stops, to wait again.
        let mut lost = Vec::new();
        for w in &todo {
            if !self.replicas.contains_key(&w.instance()) || w.after.is_empty() {
                continue;
            }
            if let Some(why) = lost_dependency(w, replicas_of) {
                lost.push((w.instance(), why));
            }
        }
        let mut waits: BTreeMap<String, String> = BTreeMap::new();
        for w in todo.iter().filter(|w| !w.after.is_empty()) {
            if let Some(why) = waiting_for(w, replicas_of) {
                waits.insert(w.instance(), why);
            }
        }
        drop(known);
        let mut observed = observed;
        for (instance, why) in lost {
            info!(%instance, reason = %why, "a workload it starts after stopped: stopping to wait again");
            self.stop(&instance).await;
            observed.remove(&instance);
        }
        let mut actions = plan(&todo, &observed);
        // Stops, then replacements, then new replicas: hardware nodes are given back before
        // they are handed out again.
        actions.sort_by_key(|a| match a {
            Action::Stop(_) => 0,
            Action::Replace(_) => 1,
            Action::Start(_) => 2,
        });
        for action in actions {
            match action {
                Action::Stop(instance) => self.stop(&instance).await,
                // The same replica and revision again while its old container still stops
                // (deleted and applied again within the grace period): containerd would
                // see one id twice. It starts once that container is gone.
                Action::Start(w)
                    if w.container.is_some()
                        && self
                            .stopping
                            .contains_key(&crate::runtime::container_id(&w)) =>
                {
                    info!(instance = %w.instance(), "waiting for the previous container of this replica to stop");
                }
                Action::Start(w) | Action::Replace(w) if waits.contains_key(&w.instance()) => {
                    let instance = w.instance();
                    self.stop(&instance).await;
                    let why = waits.remove(&instance).unwrap_or_default();
                    self.held_back(&w, Phase::Waiting, why);
                }
                Action::Start(w) => {
                    if let Some(devices) = self.take_hardware(&w) {
                        let network = grants(&w);
                        self.spawn(w, &base, network, devices);
                    }
                }
                Action::Replace(w) => {
                    self.stop(&w.instance()).await;
                    // A job's next run on the same revision has the same container id as
                    // the run still stopping: it starts once that one is gone.
                    if w.container.is_some()
                        && self
                            .stopping
                            .contains_key(&crate::runtime::container_id(&w))
                    {
                        info!(instance = %w.instance(), "waiting for the previous container of this replica to stop");
                        continue;
                    }
                    if let Some(devices) = self.take_hardware(&w) {
                        let network = grants(&w);
                        self.spawn(w, &base, network, devices);
                    }
                }
            }
        }
        // Fenced replicas (stopped above, or never started) say why; scheduled ones between
        // runs, when the next is.
        let now = self.schedule_now;
        for w in &desired.workloads {
            let instance = w.instance();
            if let Some((why, _)) = self.fenced.get(&instance).cloned() {
                self.held_back(w, Phase::Pending, why);
            } else if w.schedule.is_some() && !self.active.contains_key(&instance) {
                let schedule = self.schedule_status(w, now);
                let next = schedule.as_ref().and_then(|s| s.next_ms).map_or(
                    "none (the schedule names no later time)".to_string(),
                    |t| {
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_millis(t),
                        )
                        .to_string()
                    },
                );
                self.held_back(w, Phase::Scheduled, format!("next run at {next}"));
                if let Some(s) = self.statuses.get_mut(&instance) {
                    s.schedule = schedule;
                }
            }
        }
        true
    }

    /// The hardware nodes `w` asks for, or `None` while they are held by others: then `w`
    /// is Pending with the reason, and asks again at the next reconcile (one runs when a
    /// replica stops or a container is gone).
    fn take_hardware(&mut self, w: &DesiredWorkload) -> Option<Grant> {
        let instance = w.instance();
        let taken = self
            .hardware
            .take(Holder::Replica(instance.clone()), &w.devices)
            .map_err(|short| short.to_string())
            .and_then(|g| {
                // Durable before a container is made with it: after a crash, the agent
                // knows which node its adopted container holds.
                self.save_hardware().map(|()| g).map_err(|e| {
                    self.hardware.release(&Holder::Replica(instance.clone()));
                    format!("cannot record the hardware it is given: {e}")
                })
            });
        match taken {
            Ok(g) => Some(g),
            Err(reason) => {
                self.held_back(w, Phase::Pending, reason);
                None
            }
        }
    }

    /// `w` does not start yet, in `phase` (`Pending` for hardware, `Waiting` for the
    /// workloads it starts after) with the reason; it asks again at the next reconcile.
    fn held_back(&mut self, w: &DesiredWorkload, phase: Phase, reason: String) {
        let instance = w.instance();
        let said = self.statuses.get(&instance).and_then(|s| s.reason.as_ref());
        if said != Some(&reason) {
            info!(%instance, %reason, "replica held back");
        }
        self.statuses.insert(
            instance,
            InstanceStatus {
                schedule: None,
                name: w.name.clone(),
                replica: w.replica,
                revision: w.revision.clone(),
                phase,
                restarts: 0,
                reason: Some(reason),
                exit_code: None,
                started_at_ms: None,
                backoff_ms: None,
                variant: String::new(),
                healthy: None,
                devices: Vec::new(),
                run: w.job.map(|j| j.run),
                finished_at_ms: None,
            },
        );
    }

    /// Saves which replica holds which node, when that changed.
    fn save_hardware(&mut self) -> Result<(), StoreError> {
        let now = self.hardware.replicas();
        if now != self.hardware_saved {
            self.store.save_hardware(&now)?;
            self.hardware_saved = now;
        }
        Ok(())
    }

    /// After a reconcile: volumes and opened secrets nothing uses any more.
    pub fn sweep(&self) {
        self.sweep_volumes();
        self.sweep_secrets();
    }

    /// A supervisor's report. `None` when it comes from a task that no longer supervises
    /// its replica (dropped). A job run's result is saved durably first: reported, it is
    /// never run again.
    pub fn on_update(&mut self, u: Update) -> Option<Updated> {
        let current = self
            .replicas
            .get(&u.instance)
            .is_some_and(|r| r.task == u.task);
        if !current {
            return None;
        }
        let mut u = u;
        let mut run_finished = u.status.run.is_some()
            && u.status.finished_at_ms.is_some()
            && matches!(u.status.phase, Phase::Succeeded | Phase::Failed);
        let scheduled = self.active.get(&u.instance).map(|(at, _)| *at);
        if let Some(at) = scheduled.filter(|at| u.status.run == Some(*at)) {
            // A scheduled run: its end goes to the schedule's history (saved), not to the
            // job results.
            if run_finished {
                if let Some(st) = self.schedules.get_mut(&u.instance) {
                    let outcome = u.status.phase.to_string();
                    st.finish(
                        at,
                        &outcome,
                        u.status.exit_code,
                        u.status.finished_at_ms.unwrap_or_default(),
                    );
                }
                self.active.remove(&u.instance);
                if let Err(e) = self.store.save_schedules(&self.schedules) {
                    warn!(instance = %u.instance, error = %e, "cannot save a scheduled run's end");
                }
                info!(instance = %u.instance, phase = %u.status.phase, scheduled_ms = at, "scheduled run finished");
            }
            let w = self
                .desired_workloads()
                .iter()
                .find(|w| w.instance() == u.instance)
                .cloned();
            u.status.schedule = w.and_then(|w| self.schedule_status(&w, self.schedule_now));
        } else if run_finished {
            self.unsaved.insert(u.instance.clone(), u.status.clone());
            if self.save_results() {
                info!(instance = %u.instance, phase = %u.status.phase, "job run finished");
            } else {
                // Not reported as a result until saved (`finishedAtMs` is what the hub
                // takes): tried again with each heartbeat.
                u.status.finished_at_ms = None;
                run_finished = false;
            }
        }
        let was_running = self.is_running(&u.instance);
        let before = self.statuses.get(&u.instance).map(|s| (s.phase, s.healthy));
        let now = (u.status.phase, u.status.healthy);
        let awaited = self
            .desired_workloads()
            .iter()
            .any(|w| w.after.iter().any(|a| a.workload == u.status.name));
        self.statuses.insert(u.instance.clone(), u.status);
        Some(Updated {
            running_changed: was_running != self.is_running(&u.instance),
            run_finished,
            order: awaited && before != Some(now),
        })
    }

    /// A container stopping in the background has ended (a replica held back for its id may
    /// start at the next reconcile; its volumes may go).
    pub fn gone(&mut self, id: &str) {
        self.stopping.remove(id);
        self.hardware.release(&Holder::Stopping(id.to_string()));
    }

    /// Restarts the replicas of `name` (`shoal-agent restart`); `Err`: why none was.
    pub fn restart(&self, name: &WorkloadName) -> Result<RestartView, RestartError> {
        let mut restarted = Vec::new();
        for (instance, r) in &self.replicas {
            if &r.workload == name {
                info!(%instance, "restart requested over the local api");
                r.controls.restart.notify_one();
                restarted.push(instance.clone());
            }
        }
        if restarted.is_empty() {
            Err(RestartError::NotHere(name.clone()))
        } else {
            Ok(RestartView { restarted })
        }
    }

    /// The desired replicas (none before a desired state is known).
    pub fn desired_workloads(&self) -> &[DesiredWorkload] {
        self.desired.as_ref().map_or(&[], |d| &d.workloads)
    }

    /// The desired replicas running here.
    pub fn running(&self) -> Vec<&DesiredWorkload> {
        self.desired_workloads()
            .iter()
            .filter(|w| self.is_running(&w.instance()))
            .collect()
    }

    /// The generation of the desired state in force (0: none).
    pub fn generation(&self) -> u64 {
        self.desired.as_ref().map_or(0, |d| d.generation)
    }

    /// The last status of every supervised replica, and the result of every desired job
    /// run that finished here, by instance.
    pub fn statuses(&self) -> impl Iterator<Item = &InstanceStatus> {
        let finished = self
            .runs
            .iter()
            .filter(|(i, _)| !self.statuses.contains_key(*i))
            .map(|(_, s)| s);
        self.statuses.values().chain(finished)
    }

    /// How many replicas are supervised.
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    pub fn is_running(&self, instance: &str) -> bool {
        self.statuses
            .get(instance)
            .is_some_and(|s| s.phase == Phase::Running)
    }

    /// Every supervised replica as the local API shows it: instance, workload, revision,
    /// last status, and its usage (memory, CPU time) while it runs.
    pub fn supervised(&self) -> impl Iterator<Item = Supervised<'_>> {
        self.replicas.iter().map(|(instance, r)| {
            let status = self.statuses.get(instance);
            let running = status.is_some_and(|s| s.phase == Phase::Running);
            let (memory, cpu) = r.controls.usage.view(running);
            Supervised {
                instance,
                workload: &r.workload,
                revision: &r.revision,
                status,
                memory,
                cpu,
            }
        })
    }

    /// Removes opened secrets and config files that neither the desired state nor a running
    /// replica uses.
    fn sweep_secrets(&self) {
        let Some(desired) = &self.desired else {
            return;
        };
        let keep: BTreeSet<(SecretName, String)> = desired
            .workloads
            .iter()
            .flat_map(secret_versions)
            .chain(
                self.replicas
                    .values()
                    .flat_map(|r| r.secrets.iter().cloned()),
            )
            .chain(
                self.stopping
                    .values()
                    .flat_map(|(_, s, _)| s.iter().cloned()),
            )
            .collect();
        self.shared.secrets.sweep(&keep);
        let keep: BTreeSet<String> = desired
            .workloads
            .iter()
            .flat_map(config_digests)
            .chain(
                self.replicas
                    .values()
                    .flat_map(|r| r.configs.iter().cloned()),
            )
            .chain(
                self.stopping
                    .values()
                    .flat_map(|(_, _, c)| c.iter().cloned()),
            )
            .collect();
        self.shared.configs.sweep(&keep);
    }

    /// Sweeps the volumes of workloads this device no longer runs (not desired, no replica
    /// left, none still stopping: a container may write during its grace period): kept for
    /// the retention period, then deleted in the background.
    pub fn sweep_volumes(&self) {
        let Some(desired) = &self.desired else {
            return; // nothing known yet: keep everything
        };
        let keep: BTreeSet<&str> = desired
            .workloads
            .iter()
            .map(|w| w.name.as_str())
            .chain(self.replicas.values().map(|r| r.workload.as_str()))
            .chain(self.stopping.values().map(|(w, _, _)| w.as_str()))
            .collect();
        let retention = self.settings.volume_retention;
        for swept in self.shared.volumes.sweep(&keep, now_ms(), retention) {
            match swept {
                Swept::Orphaned(workload) => info!(
                    %workload,
                    retention = %shoal_api::model::quantity::format_duration_ms(
                        u64::try_from(retention.as_millis()).unwrap_or(u64::MAX)
                    ),
                    "the workload left this device; its volumes are kept for the retention period"
                ),
                Swept::Expired(workload, trash) => {
                    info!(%workload, "volumes deleted: the workload left this device");
                    self.delete_in_background(trash);
                }
                Swept::Failed(workload, e) => warn!(%workload, error = %e, "cannot sweep volumes"),
            }
        }
    }

    /// Deletes what earlier runs left in the volumes' trash (interrupted deletes).
    pub fn empty_trash(&self) {
        for trash in self.shared.volumes.leftover_trash() {
            self.delete_in_background(trash);
        }
    }

    /// Deletes a directory on the blocking pool (a large volume takes a while on an SD card).
    fn delete_in_background(&self, dir: PathBuf) {
        self.tracker.spawn(async move {
            let shown = dir.display().to_string();
            match tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(dir = %shown, error = %e, "cannot delete"),
                Err(e) => warn!(dir = %shown, error = %e, "delete task failed"),
            }
        });
    }

    fn spawn(&mut self, w: DesiredWorkload, artifact_base: &str, network: Network, devices: Grant) {
        self.next_task += 1;
        let task = self.next_task;
        let controls = supervisor::Controls::default();
        let instance = w.instance();
        info!(%instance, revision = %w.revision, "starting replica");
        let revision = w.revision.clone();
        let run = w.job.map(|j| j.run);
        let workload = w.name.clone();
        let secrets = secret_versions(&w);
        let configs = config_digests(&w);
        let container = w
            .container
            .is_some()
            .then(|| crate::runtime::container_id(&w));
        let handle = self.tracker.spawn(supervisor::supervise(
            self.shared.clone(),
            w,
            artifact_base.to_string(),
            network,
            devices,
            task,
            controls.clone(),
        ));
        self.replicas.insert(
            instance,
            Replica {
                workload,
                revision,
                run,
                secrets,
                configs,
                container,
                task,
                controls,
                handle,
            },
        );
    }

    /// Where modules come from: the hub's URL if it gave one; otherwise the hub this agent
    /// was pointed at (`--hub`); otherwise empty, and the supervisor uses the hub found over
    /// mDNS. Never the broker's host on a TLS fleet: a broker (`shoal-broker`) is not the
    /// hub, and the fetcher verifies the hub as `shoal-hub`. An `--insecure` agent, which
    /// authenticates nobody, still tries the hub's port at the broker's host.
    fn artifact_base(&self, desired: &DesiredState) -> String {
        if !desired.artifact_base.is_empty() {
            return desired.artifact_base.clone();
        }
        let source = &self.settings.artifacts;
        if let Some(hub) = &source.hub_url {
            return hub.trim_end_matches('/').to_string();
        }
        if !source.insecure {
            return String::new();
        }
        let scheme = "http";
        match (desired.artifact_port, &source.broker) {
            (Some(port), Some(b)) if b.host.contains(':') => {
                format!("{scheme}://[{}]:{port}", b.host)
            }
            (Some(port), Some(b)) => format!("{scheme}://{}:{port}", b.host),
            _ => String::new(),
        }
    }

    /// Stops a replica. A WASM guest stops within milliseconds and is waited for (its
    /// successor may need its ports). A container may take its whole stop grace period
    /// (SIGTERM, then SIGKILL), which must not hold up the main loop: its supervisor finishes
    /// in the background (the task tracker still awaits it at shutdown; its container id is
    /// per revision, so a successor of another revision never collides with it, and one of
    /// the same revision waits for [`Replicas::gone`]).
    async fn stop(&mut self, instance: &str) {
        if let Some(r) = self.replicas.remove(instance) {
            info!(%instance, "stopping replica");
            r.controls.cancel.cancel();
            let holder = Holder::Replica(instance.to_string());
            if let Some(id) = r.container {
                // Its volumes, secret files and hardware nodes stay until it is gone.
                self.hardware
                    .hand_over(&holder, Holder::Stopping(id.clone()));
                self.stopping
                    .insert(id.clone(), (r.workload, r.secrets, r.configs));
                let gone = self.gone_tx.clone();
                self.tracker.spawn(async move {
                    let _ = r.handle.await;
                    let _ = gone.send(id).await;
                });
            } else {
                let _ = r.handle.await;
                self.hardware.release(&holder);
            }
            // Losing this save only keeps a grant of a replica no longer desired, which
            // the next start drops.
            if let Err(e) = self.save_hardware() {
                warn!(%instance, error = %e, "cannot record the hardware it gave back");
            }
        }
        self.statuses.remove(instance);
    }

    /// Stops every replica and waits for their supervisors (shutdown).
    pub async fn stop_all(&mut self) {
        for r in self.replicas.values() {
            r.controls.cancel.cancel();
        }
        for (_, r) in std::mem::take(&mut self.replicas) {
            let _ = r.handle.await;
        }
        self.statuses.clear();
    }
}

/// One supervised replica, read ([`Replicas::supervised`]).
pub struct Supervised<'a> {
    pub instance: &'a str,
    pub workload: &'a WorkloadName,
    pub revision: &'a str,
    pub status: Option<&'a InstanceStatus>,
    pub memory: Option<u64>,
    pub cpu: Option<u64>,
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for r in self.replicas.values() {
            r.controls.cancel.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::LogSink;
    use crate::runtime::{
        Artifact, BoxFuture, Exit, RunSpec, Running, Runtime, RuntimeError, Runtimes,
    };
    use crate::store::MemStore;
    use shoal_api::model::ids::Digest;
    use shoal_api::model::workload::{Resources, Restart, RestartPolicy};
    use shoal_pki::sign::{HubKey, HubSigner};
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    /// A run that lasts until stopped, except for replicas of the workload `bad`, which
    /// fail at once.
    struct FakeRuntime;
    struct FakeRun(Option<Exit>);
    impl Running for FakeRun {
        fn wait(self: Box<Self>, stop: CancellationToken) -> BoxFuture<'static, Exit> {
            Box::pin(async move {
                match self.0 {
                    Some(exit) => exit,
                    None => {
                        stop.cancelled().await;
                        Exit::Cancelled
                    }
                }
            })
        }
    }
    impl Runtime for FakeRuntime {
        fn pull<'a>(&'a self, _s: &'a RunSpec) -> BoxFuture<'a, Result<Artifact, RuntimeError>> {
            Box::pin(std::future::ready(Ok(Artifact::new(()))))
        }
        fn prepare<'a>(
            &'a self,
            _s: &'a RunSpec,
            pulled: Artifact,
        ) -> BoxFuture<'a, Result<Artifact, RuntimeError>> {
            Box::pin(std::future::ready(Ok(pulled)))
        }
        fn start<'a>(
            &'a self,
            _p: &'a Artifact,
            spec: &'a RunSpec,
            _l: &'a LogSink,
        ) -> BoxFuture<'a, Result<Box<dyn Running>, RuntimeError>> {
            // A run given hardware must find each node in its SHOAL_DEVICES_* variables.
            let named = |p: &std::path::PathBuf| {
                spec.env.iter().any(|(k, v)| {
                    k.starts_with("SHOAL_DEVICES_") && v.split(',').any(|n| p.as_os_str() == n)
                })
            };
            let unnamed = !spec.devices.iter().all(named);
            let exit = (spec.instance.starts_with("bad-") || unnamed).then(|| Exit::Failure {
                code: Some(2),
                reason: "exited with status 2".into(),
            });
            // Replicas of `ok` succeed at once.
            let exit = exit.or_else(|| spec.instance.starts_with("ok-").then_some(Exit::Success));
            Box::pin(std::future::ready(Ok(
                Box::new(FakeRun(exit)) as Box<dyn Running>
            )))
        }
    }

    fn workload(name: &str, replica: u32, revision: &str) -> DesiredWorkload {
        DesiredWorkload {
            job: None,
            stop_after_ms: None,
            schedule: None,
            after: Vec::new(),
            configs: Vec::new(),
            name: WorkloadName::try_from(name).unwrap(),
            replica,
            revision: revision.into(),
            module: Some(Digest::of(name.as_bytes())),
            oci: None,
            container: None,
            args: vec![],
            env: Default::default(),
            resources: Resources {
                memory: 1 << 20,
                cpu: None,
            },
            restart: Restart {
                policy: RestartPolicy::Never,
                initial_backoff_ms: 10,
                max_backoff_ms: 40,
            },
            health: None,
            ports: vec![],
            uses: vec![],
            volumes: vec![],
            network: vec![],
            limits: Default::default(),
            secrets: Default::default(),
            devices: Default::default(),
        }
    }

    fn state(device: &str, generation: u64, workloads: Vec<DesiredWorkload>) -> DesiredState {
        DesiredState {
            protocol: shoal_api::PROTOCOL_VERSION,
            device_id: device.parse().unwrap(),
            generation,
            artifact_base: "http://hub".into(),
            artifact_port: None,
            workloads,
            secrets: vec![],
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        hub: HubSigner,
        store: Arc<MemStore>,
        replicas: Replicas,
        updates: mpsc::Receiver<Update>,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let hub = HubSigner::load_or_create(&dir.path().join("hub.key")).unwrap();
            let store = Arc::new(MemStore::default());
            let (replicas, updates) =
                Self::replicas(dir.path(), &hub, store.clone(), Inventory::new());
            Fixture {
                _dir: dir,
                hub,
                store,
                replicas,
                updates,
            }
        }

        /// Replicas over `store`, with the fake runtime and no bus, mDNS or hub.
        fn replicas(
            dir: &std::path::Path,
            hub: &HubSigner,
            store: Arc<MemStore>,
            hardware: Inventory,
        ) -> (Replicas, mpsc::Receiver<Update>) {
            let (tx, rx) = mpsc::channel(64);
            let (gone, _) = mpsc::channel(8);
            let shared = Shared {
                runtime: Arc::new(Runtimes {
                    wasm: Arc::new(FakeRuntime),
                    container: None,
                }),
                logs_dir: dir.join("logs"),
                volumes: crate::volumes::Volumes::new(dir.join("volumes")),
                secrets: crate::secrets::SecretFiles::new(dir),
                configs: crate::configs::ConfigDirs::new(dir),
                updates: tx,
                http: crate::http_client(reqwest::Client::builder()).unwrap(),
            };
            let settings = Settings {
                device_id: "d1".parse().unwrap(),
                hub_key: Some(HubKey::from_b64(&hub.public_key_b64()).unwrap()),
                device_key: None,
                artifacts: ArtifactSource::default(),
                volume_retention: Duration::from_secs(3600),
                hardware,
            };
            let replicas =
                Replicas::new(settings, Box::new(store), shared, gone, TaskTracker::new());
            (replicas, rx)
        }

        fn desired(&mut self, d: &DesiredState) -> Desired {
            let payload = self.hub.seal(&serde_json::to_vec(d).unwrap());
            self.replicas.on_desired(&payload)
        }

        async fn reconcile(&mut self) {
            assert!(self.replicas.reconcile(&mut |_| Network::default()).await);
            self.replicas.sweep();
        }

        /// Takes the supervisors' reports until the replicas' statuses are `want`
        /// (instance → phase, revision).
        async fn settle(&mut self, want: &[(&str, Phase, &str)]) {
            let want: BTreeMap<String, (Phase, String)> = want
                .iter()
                .map(|(i, p, r)| (i.to_string(), (*p, r.to_string())))
                .collect();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let have: BTreeMap<String, (Phase, String)> = self
                    .replicas
                    .statuses()
                    .map(|s| {
                        (
                            format!("{}-{}", s.name, s.replica),
                            (s.phase, s.revision.clone()),
                        )
                    })
                    .collect();
                if have == want {
                    return;
                }
                let u = tokio::time::timeout_at(deadline, self.updates.recv())
                    .await
                    .unwrap_or_else(|_| panic!("statuses {have:?}, want {want:?}"))
                    .expect("a supervisor alive");
                self.replicas.on_update(u);
            }
        }

        fn running(&self) -> Vec<String> {
            self.replicas
                .running()
                .iter()
                .map(|w| w.instance())
                .collect()
        }
    }

    #[tokio::test]
    async fn reconciles_replicas_with_the_desired_state_and_reports_their_status() {
        let mut f = Fixture::new();
        assert!(!f.replicas.resume().unwrap(), "nothing persisted yet");
        assert!(!f.replicas.reconcile(&mut |_| Network::default()).await);

        let one = state(
            "d1",
            1,
            vec![
                workload("web", 0, "r1"),
                workload("web", 1, "r1"),
                workload("bad", 0, "r1"),
            ],
        );
        assert_eq!(f.desired(&one), Desired::Accepted);
        assert_eq!(
            f.store.load_desired().unwrap(),
            Some(one.clone()),
            "saved first"
        );
        f.reconcile().await;
        f.settle(&[
            ("bad-0", Phase::Failed, "r1"),
            ("web-0", Phase::Running, "r1"),
            ("web-1", Phase::Running, "r1"),
        ])
        .await;
        assert_eq!(f.running(), ["web-0", "web-1"]);
        let bad = f.replicas.statuses().find(|s| s.name.as_str() == "bad");
        assert_eq!(bad.and_then(|s| s.exit_code), Some(2));

        // The state in force again, an older one, one for another device, one the hub did
        // not sign: nothing changes.
        assert_eq!(f.desired(&one), Desired::Same);
        assert_eq!(f.desired(&state("d1", 0, vec![])), Desired::Ignored);
        assert_eq!(f.desired(&state("d2", 5, vec![])), Desired::Ignored);
        let unsigned = serde_json::to_vec(&state("d1", 5, vec![])).unwrap();
        assert_eq!(f.replicas.on_desired(&unsigned), Desired::Ignored);
        assert_eq!(f.replicas.generation(), 1);
        assert_eq!(f.replicas.len(), 3);

        // web-0 moves to a new revision, web-1 stays as it runs, bad leaves.
        let two = state(
            "d1",
            2,
            vec![workload("web", 0, "r2"), workload("web", 1, "r1")],
        );
        assert_eq!(f.desired(&two), Desired::Accepted);
        f.reconcile().await;
        f.settle(&[
            ("web-0", Phase::Running, "r2"),
            ("web-1", Phase::Running, "r1"),
        ])
        .await;
        assert_eq!(f.replicas.len(), 2);
        let restarts: Vec<u32> = f.replicas.statuses().map(|s| s.restarts).collect();
        assert_eq!(
            restarts,
            [0, 0],
            "a new revision is a new replica, not a restart"
        );

        // A restart request reaches the replicas of a workload, and only those that run.
        let web = WorkloadName::try_from("web").unwrap();
        let restarted = f.replicas.restart(&web).unwrap().restarted;
        assert_eq!(restarted, ["web-0", "web-1"]);
        let bad = WorkloadName::try_from("bad").unwrap();
        let e = f.replicas.restart(&bad).unwrap_err();
        assert_eq!(e, RestartError::NotHere(bad.clone()));
        assert!(e.to_string().contains("\"bad\""), "{e}");

        f.replicas.stop_all().await;
        assert_eq!(f.replicas.len(), 0);
        assert_eq!(f.replicas.statuses().count(), 0);

        // After a restart of the agent, the persisted state is taken up again, offline.
        let (mut again, _updates) =
            Fixture::replicas(f._dir.path(), &f.hub, f.store.clone(), Inventory::new());
        assert!(again.resume().unwrap());
        assert_eq!(again.generation(), 2);
        assert!(again.reconcile(&mut |_| Network::default()).await);
        assert_eq!(again.len(), 2);
        again.stop_all().await;
    }

    #[tokio::test]
    async fn a_replica_waits_for_hardware_another_holds_and_gets_it_when_freed() {
        let mut f = Fixture::new();
        let serial = shoal_api::model::ids::DeviceClass::try_from("serial").unwrap();
        let inventory: Inventory = [(serial.clone(), vec!["/dev/ttyS9".to_string()])].into();
        let (replicas, updates) =
            Fixture::replicas(f._dir.path(), &f.hub, f.store.clone(), inventory);
        (f.replicas, f.updates) = (replicas, updates);
        let wants = |name: &str| {
            let mut w = workload(name, 0, "r1");
            w.devices.insert(serial.clone(), 1);
            w
        };
        let devices_of = |r: &Replicas, instance: &str| {
            r.statuses()
                .find(|s| format!("{}-{}", s.name, s.replica) == instance)
                .map(|s| (s.devices.clone(), s.reason.clone()))
        };

        assert_eq!(
            f.desired(&state("d1", 1, vec![wants("logger"), wants("reader")])),
            Desired::Accepted
        );
        f.reconcile().await;
        f.settle(&[
            ("logger-0", Phase::Running, "r1"),
            ("reader-0", Phase::Pending, "r1"),
        ])
        .await;
        assert_eq!(
            devices_of(&f.replicas, "logger-0"),
            Some((vec!["/dev/ttyS9".to_string()], None))
        );
        assert_eq!(
            devices_of(&f.replicas, "reader-0"),
            Some((
                vec![],
                Some("waiting for a free serial device: needs 1, 0 of 1 free (/dev/ttyS9 held by logger-0)".into())
            ))
        );
        assert_eq!(f.running(), ["logger-0"]);

        // The holder leaves: the node is free again, and the waiting replica takes it.
        assert_eq!(
            f.desired(&state("d1", 2, vec![wants("reader")])),
            Desired::Accepted
        );
        f.reconcile().await;
        f.settle(&[("reader-0", Phase::Running, "r1")]).await;
        assert_eq!(
            devices_of(&f.replicas, "reader-0"),
            Some((vec!["/dev/ttyS9".to_string()], None))
        );
        f.replicas.stop_all().await;
    }

    #[tokio::test]
    async fn after_an_agent_restart_each_replica_keeps_the_node_it_held() {
        let mut f = Fixture::new();
        let serial = shoal_api::model::ids::DeviceClass::try_from("serial").unwrap();
        let inventory: Inventory = [(
            serial.clone(),
            vec!["/dev/ttyA".to_string(), "/dev/ttyB".to_string()],
        )]
        .into();
        let (replicas, updates) =
            Fixture::replicas(f._dir.path(), &f.hub, f.store.clone(), inventory.clone());
        (f.replicas, f.updates) = (replicas, updates);
        let wants = |name: &str| {
            let mut w = workload(name, 0, "r1");
            w.devices.insert(serial.clone(), 1);
            w
        };
        f.desired(&state("d1", 1, vec![wants("x"), wants("y")]));
        f.reconcile().await;
        f.settle(&[("x-0", Phase::Running, "r1"), ("y-0", Phase::Running, "r1")])
            .await;
        f.desired(&state("d1", 2, vec![wants("y")]));
        f.reconcile().await;
        f.settle(&[("y-0", Phase::Running, "r1")]).await;
        let held = |r: &Replicas, i: &str| {
            r.statuses()
                .find(|s| format!("{}-{}", s.name, s.replica) == i)
                .map(|s| s.devices.clone())
        };
        assert_eq!(
            held(&f.replicas, "y-0"),
            Some(vec!["/dev/ttyB".to_string()])
        );
        f.replicas.stop_all().await;

        // A new agent over the same store (y-0's container would still run with ttyB).
        let (again, updates) = Fixture::replicas(f._dir.path(), &f.hub, f.store.clone(), inventory);
        (f.replicas, f.updates) = (again, updates);
        assert!(f.replicas.resume().unwrap());
        f.desired(&state("d1", 3, vec![wants("y"), wants("z")]));
        f.reconcile().await;
        f.settle(&[("y-0", Phase::Running, "r1"), ("z-0", Phase::Running, "r1")])
            .await;
        assert_eq!(
            held(&f.replicas, "y-0"),
            Some(vec!["/dev/ttyB".to_string()])
        );
        assert_eq!(
            held(&f.replicas, "z-0"),
            Some(vec!["/dev/ttyA".to_string()])
        );
        f.replicas.stop_all().await;
    }

    #[tokio::test]
    async fn a_job_run_s_result_is_saved_and_never_run_again_until_the_next_run() {
        let mut f = Fixture::new();
        let job = |name: &str, run: u64| {
            let mut w = workload(name, 0, "r1");
            w.restart.policy = RestartPolicy::OnFailure;
            w.job = Some(shoal_api::model::job::JobRun {
                run,
                backoff_limit: 2,
                active_deadline_ms: None,
            });
            w
        };
        f.desired(&state("d1", 1, vec![job("ok", 1), job("bad", 1)]));
        f.reconcile().await;
        f.settle(&[
            ("bad-0", Phase::Failed, "r1"),
            ("ok-0", Phase::Succeeded, "r1"),
        ])
        .await;
        // Saved before it was taken: the store has both results, with their runs.
        let saved = f.store.load_runs().unwrap();
        assert_eq!(saved["ok-0"].phase, Phase::Succeeded);
        assert_eq!(saved["bad-0"].run, Some(1));
        assert_eq!(saved["bad-0"].restarts, 2, "retried backoffLimit times");
        assert!(saved["bad-0"].finished_at_ms.is_some());
        // The finished supervisors go at the next reconcile; the results stay reported.
        f.reconcile().await;
        assert_eq!(f.replicas.len(), 0);
        assert_eq!(f.replicas.statuses().count(), 2);
        f.replicas.stop_all().await;

        // A new agent over the same store runs neither again.
        let (again, updates) =
            Fixture::replicas(f._dir.path(), &f.hub, f.store.clone(), Inventory::new());
        (f.replicas, f.updates) = (again, updates);
        assert!(f.replicas.resume().unwrap());
        f.reconcile().await;
        assert_eq!(f.replicas.len(), 0, "nothing runs again after a restart");
        let phases: Vec<Phase> = f.replicas.statuses().map(|s| s.phase).collect();
        assert_eq!(phases, [Phase::Failed, Phase::Succeeded]);

        // The next run (`shoal rerun`) runs `ok` again; `bad` left: its result goes.
        f.desired(&state("d1", 2, vec![job("ok", 2)]));
        f.reconcile().await;
        assert_eq!(f.replicas.len(), 1);
        assert!(
            f.store.load_runs().unwrap().is_empty(),
            "earlier results forgotten"
        );
        f.settle(&[("ok-0", Phase::Succeeded, "r1")]).await;
        assert_eq!(f.store.load_runs().unwrap()["ok-0"].run, Some(2));
        f.replicas.stop_all().await;
    }

    #[tokio::test]
    async fn a_replica_with_stop_after_runs_only_while_the_hub_is_heard() {
        let mut f = Fixture::new();
        let mut valve = workload("valve", 0, "r1");
        valve.stop_after_ms = Some(5_000);
        let both = |g| state("d1", g, vec![valve.clone(), workload("web", 0, "r1")]);
        f.desired(&both(1));
        let t0 = std::time::Instant::now();
        // At boot, before any contact: fenced, not started; the other replica runs.
        assert!(f.replicas.check_contact(None, t0));
        f.reconcile().await;
        f.settle(&[
            ("valve-0", Phase::Pending, "r1"),
            ("web-0", Phase::Running, "r1"),
        ])
        .await;
        let why = f
            .replicas
            .statuses()
            .find(|s| s.name.as_str() == "valve")
            .unwrap();
        assert!(why
            .reason
            .as_deref()
            .unwrap()
            .contains("spec.disconnect.stopAfter"));
        // Contact, but no desired state newer than the one it was fenced under: the
        // broker may be replaying a retained one the hub gave before it lost the device.
        assert!(!f.replicas.check_contact(Some(t0), t0));
        assert_eq!(f.desired(&both(1)), Desired::Same);
        assert!(!f.replicas.check_contact(Some(t0), t0));
        // The hub heard the device and issued its state anew: it runs.
        f.desired(&both(2));
        assert!(f.replicas.check_contact(Some(t0), t0));
        f.reconcile().await;
        f.settle(&[
            ("valve-0", Phase::Running, "r1"),
            ("web-0", Phase::Running, "r1"),
        ])
        .await;
        // 5 s without a confirmed message: stopped; the other keeps running.
        assert!(!f
            .replicas
            .check_contact(Some(t0), t0 + Duration::from_secs(5)));
        let later = t0 + Duration::from_millis(5_001);
        assert!(f.replicas.check_contact(Some(t0), later));
        f.reconcile().await;
        assert_eq!(f.running(), ["web-0"]);
        // Contact again alone does not let it run; the hub's next word does.
        assert!(!f.replicas.check_contact(Some(later), later));
        f.desired(&both(3));
        assert!(f.replicas.check_contact(Some(later), later));
        f.reconcile().await;
        f.settle(&[
            ("valve-0", Phase::Running, "r1"),
            ("web-0", Phase::Running, "r1"),
        ])
        .await;
        f.replicas.stop_all().await;
    }

    #[tokio::test]
    async fn scheduled_runs_fire_by_the_device_clock_once_each_across_restarts() {
        use shoal_api::model::schedule::{Concurrency, DesiredSchedule, Schedule};
        let mut f = Fixture::new();
        let mut ok = workload("ok", 0, "r1");
        ok.restart.policy = RestartPolicy::OnFailure;
        ok.schedule = Some(DesiredSchedule {
            schedule: Schedule {
                cron: "*/2 * * * * *".into(),
                time_zone: "UTC".into(),
                concurrency: Concurrency::Forbid,
                starting_deadline_ms: None,
            },
            backoff_limit: 0,
            active_deadline_ms: None,
        });
        f.desired(&state("d1", 1, vec![ok.clone()]));
        // First seen at 10 s: nothing from the past; between runs it says when the next is.
        assert!(f.replicas.check_schedules(10_000, true));
        f.reconcile().await;
        let s = f.replicas.statuses().next().unwrap().clone();
        assert_eq!(s.phase, Phase::Scheduled);
        assert_eq!(s.schedule.as_ref().and_then(|s| s.next_ms), Some(12_000));
        assert!(!f.replicas.check_schedules(11_000, true));
        // 12 s: it fires (offline: the broker is down), runs to completion, and is recorded.
        assert!(f.replicas.check_schedules(12_300, false));
        f.reconcile().await;
        assert_eq!(f.replicas.len(), 1);
        let u = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let u = f.updates.recv().await.expect("a supervisor alive");
                let done = u.status.phase == Phase::Succeeded;
                let updated = f.replicas.on_update(u);
                if done {
                    break updated;
                }
            }
        })
        .await
        .unwrap()
        .unwrap();
        assert!(u.run_finished);
        f.reconcile().await;
        assert_eq!(f.replicas.len(), 0, "between runs nothing runs");
        let saved = f.store.load_schedules().unwrap();
        let runs = &saved["ok-0"].runs;
        assert_eq!(runs.len(), 1);
        assert_eq!(
            (
                runs[0].scheduled_ms,
                runs[0].outcome.as_str(),
                runs[0].offline
            ),
            (12_000, "Succeeded", true)
        );
        f.replicas.stop_all().await;

        // A new agent over the same store, at 13 s: 12 s is not run again.
        let (again, updates) =
            Fixture::replicas(f._dir.path(), &f.hub, f.store.clone(), Inventory::new());
        (f.replicas, f.updates) = (again, updates);
        assert!(f.replicas.resume().unwrap());
        assert!(!f.replicas.check_schedules(13_000, true));
        // Off until 21.5 s: of 14, 16, 18 and 20 s only the latest runs.
        assert!(f.replicas.check_schedules(21_500, true));
        let runs = &f.store.load_schedules().unwrap()["ok-0"].runs;
        assert_eq!(runs.len(), 2);
        assert_eq!(
            (runs[1].scheduled_ms, runs[1].outcome.as_str()),
            (20_000, "Running")
        );
        f.reconcile().await;
        assert_eq!(f.replicas.len(), 1);
        f.replicas.stop_all().await;
    }

    #[tokio::test]
    async fn a_run_keeps_its_spec_and_a_changed_schedule_counts_from_the_change() {
        use shoal_api::model::schedule::{Concurrency, DesiredSchedule, Schedule};
        let mut f = Fixture::new();
        let scheduled = |name: &str, rev: &str, cron: &str| {
            let mut w = workload(name, 0, rev);
            w.restart.policy = RestartPolicy::OnFailure;
            w.schedule = Some(DesiredSchedule {
                schedule: Schedule {
                    cron: cron.into(),
                    time_zone: "UTC".into(),
                    concurrency: Concurrency::Forbid,
                    starting_deadline_ms: None,
                },
                backoff_limit: 0,
                active_deadline_ms: None,
            });
            w
        };
        // `long` runs until stopped (the fake runtime's default).
        f.desired(&state(
            "d1",
            1,
            vec![scheduled("long", "r1", "*/2 * * * * *")],
        ));
        f.replicas.check_schedules(10_000, true);
        assert!(f.replicas.check_schedules(12_000, true));
        f.reconcile().await;
        // A new revision mid-run: the run goes on as it started; the next run takes r2.
        f.desired(&state(
            "d1",
            2,
            vec![scheduled("long", "r2", "*/2 * * * * *")],
        ));
        f.reconcile().await;
        let revs: Vec<String> = f
            .replicas
            .supervised()
            .map(|s| s.revision.to_string())
            .collect();
        assert_eq!(revs, ["r1"]);
        // A changed schedule counts from the change: 14 s (due under the old one) is not run.
        f.desired(&state(
            "d1",
            3,
            vec![scheduled("long", "r2", "*/5 * * * * *")],
        ));
        f.replicas.check_schedules(13_000, true);
        f.replicas.check_schedules(14_500, true);
        let runs = &f.store.load_schedules().unwrap()["long-0"].runs;
        assert_eq!(
            runs.iter().map(|r| r.scheduled_ms).collect::<Vec<_>>(),
            [12_000]
        );
        // At 15 s the new schedule is due, while the 12 s run still runs: skipped (Forbid).
        assert!(f.replicas.check_schedules(15_000, true));
        let runs = &f.store.load_schedules().unwrap()["long-0"].runs;
        assert_eq!(
            (runs[1].scheduled_ms, runs[1].outcome.as_str()),
            (15_000, "Skipped")
        );
        f.replicas.stop_all().await;
    }
}
