//! The agent's reconcile decision: a pure function from desired and observed state to actions.
//!
//! `plan` only decides which replicas must start, stop or be replaced; what happens *within*
//! one replica's life (fetch, run, restart with back-off) belongs to its supervisor task and is
//! decided by the pure helpers [`restart_delay`] and [`after_exit`].

use shoal_api::model::ids::SecretName;
use shoal_api::model::ids::WorkloadName;
use shoal_api::model::workload::Restart;
use shoal_api::wire::messages::{DesiredWorkload, InstanceStatus, Phase};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// What the agent knows about a replica it supervises.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    pub revision: String,
    /// A job replica's run ([`shoal_api::model::job::JobRun::run`]).
    pub run: Option<u64>,
    /// The secrets it runs with, and their versions ([`secret_versions`]).
    pub secrets: BTreeSet<(SecretName, String)>,
    /// The config files it runs with ([`config_digests`]).
    pub configs: BTreeSet<String>,
}

/// The digests of the config files a replica runs with (see
/// [`shoal_api::model::config::ConfigFiles::digest`]).
pub fn config_digests(w: &DesiredWorkload) -> BTreeSet<String> {
    w.configs.iter().map(|c| c.digest()).collect()
}

/// The (secret, version) pairs a replica runs with.
pub fn secret_versions(w: &DesiredWorkload) -> BTreeSet<(SecretName, String)> {
    w.secrets
        .iter()
        .map(|m| (m.mount.name.clone(), m.version.clone()))
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start supervising a new replica.
    Start(DesiredWorkload),
    /// Stop the replica with this instance name and forget it.
    Stop(String),
    /// The replica's revision (or a secret's version) changed: stop the old one, then start
    /// this.
    Replace(DesiredWorkload),
}

/// Decides how to go from `observed` (instance name → what runs) to `desired`.
/// Stops come first, so resources are released before new replicas start.
pub fn plan(desired: &[DesiredWorkload], observed: &BTreeMap<String, Observed>) -> Vec<Action> {
    let wanted: BTreeSet<String> = desired.iter().map(DesiredWorkload::instance).collect();
    let mut actions: Vec<Action> = observed
        .keys()
        .filter(|i| !wanted.contains(*i))
        .map(|i| Action::Stop(i.clone()))
        .collect();
    for d in desired {
        match observed.get(&d.instance()) {
            None => actions.push(Action::Start(d.clone())),
            // A new revision, or a secret it uses changed, or its config values (its
            // device's labels moved it to another override): run it again.
            Some(o)
                if o.revision != d.revision
                    || o.run != d.job.map(|j| j.run)
                    || o.secrets != secret_versions(d)
                    || o.configs != config_digests(d) =>
            {
                actions.push(Action::Replace(d.clone()))
            }
            Some(_) => {}
        }
    }
    actions
}

/// Whether `result` (the saved final status of a job replica's run, if any) is the result
/// of the run `w` asks for: then that run is over and not run again.
pub fn finished(w: &DesiredWorkload, result: Option<&InstanceStatus>) -> bool {
    match (w.job, result) {
        (Some(j), Some(r)) => r.run == Some(j.run) && r.revision == w.revision,
        _ => false,
    }
}

/// What a replica of a workload this one starts after looks like here: its status, and
/// whether that workload has a health probe.
pub type Dependency<'a> = (&'a InstanceStatus, bool);

fn meets(c: shoal_api::model::order::Condition, (s, probed): Dependency<'_>) -> bool {
    use shoal_api::model::order::Condition;
    match c {
        Condition::Running => s.phase == Phase::Running,
        Condition::Healthy => {
            s.phase == Phase::Running
                && match s.healthy {
                    Some(h) => h,
                    None => !probed,
                }
        }
        Condition::Succeeded => s.phase == Phase::Succeeded,
    }
}

/// Why `w` may not start yet (`spec.after`): the first entry no replica of its workload on
/// this device meets (`replicas_of` gives them), in words; `None`: it may start.
pub fn waiting_for<'a>(
    w: &DesiredWorkload,
    replicas_of: impl Fn(&WorkloadName) -> Vec<Dependency<'a>>,
) -> Option<String> {
    unmet(w, false, replicas_of)
}

/// Why a running `w` must stop and wait again: an entry with `restartWith` that no replica
/// of its workload here meets any more; `None`: it keeps running.
pub fn lost_dependency<'a>(
    w: &DesiredWorkload,
    replicas_of: impl Fn(&WorkloadName) -> Vec<Dependency<'a>>,
) -> Option<String> {
    unmet(w, true, replicas_of)
}

fn unmet<'a>(
    w: &DesiredWorkload,
    restart_with_only: bool,
    replicas_of: impl Fn(&WorkloadName) -> Vec<Dependency<'a>>,
) -> Option<String> {
    w.after
        .iter()
        .filter(|a| a.restart_with || !restart_with_only)
        .find_map(|a| {
            let here = replicas_of(&a.workload);
            if here.iter().any(|d| meets(a.condition, *d)) {
                return None;
            }
            let seen = match here.first() {
                None => "no replica of it on this device".to_string(),
                Some((s, _)) => format!("its replica is {}", s.phase),
            };
            Some(format!(
                "waiting for {} to be {:?} ({seen})",
                a.workload, a.condition
            ))
        })
}

/// A run lasting at least this long resets the back-off (it was healthy for a while).
pub const STABLE_RUN: Duration = Duration::from_secs(600);

/// The delay before restart number `restarts` (0-based count of restarts already done):
/// `initial * 2^restarts`, capped at `max`, plus up to 10 % jitter from `jitter` (in [0, 1)).
pub fn restart_delay(restart: &Restart, restarts: u32, jitter: f64) -> Duration {
    let base = restart
        .initial_backoff_ms
        .saturating_mul(1u64.checked_shl(restarts.min(32)).unwrap_or(u64::MAX))
        .min(restart.max_backoff_ms);
    let extra = (base as f64 * 0.1 * jitter.clamp(0.0, 1.0)) as u64;
    Duration::from_millis(base + extra)
}

/// What the supervisor does after a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Wait this long, then run again.
    Restart(Duration),
    /// Done for good.
    Stay,
}

/// Applies the restart policy to an exit. `step` is the current back-off step (restarts since
/// the last stable run); `ran_for` is how long the run lasted. Returns the decision and the
/// next back-off step: a run of at least [`STABLE_RUN`] resets the back-off.
pub fn after_exit(
    restart: &Restart,
    success: bool,
    step: u32,
    ran_for: Duration,
    jitter: f64,
) -> (AfterExit, u32) {
    let step = if ran_for >= STABLE_RUN { 0 } else { step };
    if !restart.policy.restarts_after(success) {
        return (AfterExit::Stay, step);
    }
    (
        AfterExit::Restart(restart_delay(restart, step, jitter)),
        step.saturating_add(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::model::ids::{Digest, WorkloadName};
    use shoal_api::model::workload::{Resources, RestartPolicy};

    fn dw(name: &str, replica: u32, rev: &str) -> DesiredWorkload {
        DesiredWorkload {
            job: None,
            stop_after_ms: None,
            schedule: None,
            after: Vec::new(),
            configs: Vec::new(),
            name: WorkloadName::try_from(name).unwrap(),
            replica,
            revision: rev.into(),
            module: Some(Digest::of(b"m")),
            oci: None,
            container: None,
            args: vec![],
            env: Default::default(),
            resources: Resources {
                memory: 1 << 20,
                cpu: None,
            },
            restart: Restart {
                policy: RestartPolicy::Always,
                initial_backoff_ms: 100,
                max_backoff_ms: 1000,
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

    fn obs(items: &[(&str, &str)]) -> BTreeMap<String, Observed> {
        items
            .iter()
            .map(|(i, r)| {
                (
                    i.to_string(),
                    Observed {
                        revision: r.to_string(),
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    type Case = (
        &'static str,
        Vec<DesiredWorkload>,
        BTreeMap<String, Observed>,
        Vec<Action>,
    );

    #[test]
    fn plan_table() {
        let cases: Vec<Case> = vec![
            ("nothing to do", vec![], obs(&[]), vec![]),
            (
                "start new",
                vec![dw("a", 0, "r1")],
                obs(&[]),
                vec![Action::Start(dw("a", 0, "r1"))],
            ),
            (
                "in sync",
                vec![dw("a", 0, "r1")],
                obs(&[("a-0", "r1")]),
                vec![],
            ),
            (
                "stop removed",
                vec![],
                obs(&[("a-0", "r1")]),
                vec![Action::Stop("a-0".into())],
            ),
            (
                "replace changed",
                vec![dw("a", 0, "r2")],
                obs(&[("a-0", "r1")]),
                vec![Action::Replace(dw("a", 0, "r2"))],
            ),
            (
                "stops before starts",
                vec![dw("b", 0, "r1"), dw("a", 1, "r1")],
                obs(&[("a-0", "r1")]),
                vec![
                    Action::Stop("a-0".into()),
                    Action::Start(dw("b", 0, "r1")),
                    Action::Start(dw("a", 1, "r1")),
                ],
            ),
        ];
        for (name, desired, observed, want) in cases {
            assert_eq!(plan(&desired, &observed), want, "{name}");
        }
    }

    #[test]
    fn a_new_secret_version_replaces_the_replica() {
        let with = |version: &str| {
            let mut d = dw("a", 0, "r1");
            d.secrets = vec![shoal_api::model::secret::DesiredSecretMount {
                mount: shoal_api::model::secret::SecretMount {
                    name: shoal_api::model::ids::SecretName::try_from("db").unwrap(),
                    path: Some("/run/secrets/db".into()),
                    env: Default::default(),
                },
                version: version.into(),
            }];
            d
        };
        let running = |d: &DesiredWorkload| {
            BTreeMap::from([(
                d.instance(),
                Observed {
                    configs: config_digests(d),
                    revision: d.revision.clone(),
                    run: None,
                    secrets: secret_versions(d),
                },
            )])
        };
        assert_eq!(
            secret_versions(&with("v1")),
            BTreeSet::from([(SecretName::try_from("db").unwrap(), "v1".to_string())])
        );
        assert!(plan(&[with("v1")], &running(&with("v1"))).is_empty());
        assert_eq!(
            plan(&[with("v2")], &running(&with("v1"))),
            vec![Action::Replace(with("v2"))]
        );
        // Adding a secret reference changes the revision anyway; dropping the last one too.
        assert_eq!(
            plan(&[dw("a", 0, "r1")], &running(&with("v1"))),
            vec![Action::Replace(dw("a", 0, "r1"))]
        );
        // Same revision, other config values (the device was relabelled into another
        // override), read as variables only: replaced too.
        let read = |value: &str| {
            let mut d = dw("a", 0, "r1");
            d.configs = vec![shoal_api::model::config::ConfigFiles {
                name: "site".try_into().unwrap(),
                path: None,
                data: [("interval".to_string(), value.to_string())].into(),
            }];
            d
        };
        assert!(plan(&[read("5")], &running(&read("5"))).is_empty());
        assert_eq!(
            plan(&[read("10")], &running(&read("5"))),
            vec![Action::Replace(read("10"))]
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        let r = dw("a", 0, "r").restart;
        let delays: Vec<u64> = (0..6)
            .map(|n| restart_delay(&r, n, 0.0).as_millis() as u64)
            .collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(restart_delay(&r, 1, 1.0).as_millis(), 220);
        assert_eq!(restart_delay(&r, 10_000, 0.0).as_millis(), 1000);
    }

    #[test]
    fn after_exit_table() {
        let mut r = dw("a", 0, "r").restart;
        let short = Duration::from_secs(1);
        assert_eq!(
            after_exit(&r, true, 2, short, 0.0),
            (AfterExit::Restart(Duration::from_millis(400)), 3)
        );
        assert_eq!(
            after_exit(&r, false, 2, STABLE_RUN, 0.0),
            (AfterExit::Restart(Duration::from_millis(100)), 1)
        );
        r.policy = RestartPolicy::OnFailure;
        assert_eq!(after_exit(&r, true, 0, short, 0.0), (AfterExit::Stay, 0));
        assert_eq!(
            after_exit(&r, false, 0, short, 0.0),
            (AfterExit::Restart(Duration::from_millis(100)), 1)
        );
        r.policy = RestartPolicy::Never;
        assert_eq!(after_exit(&r, false, 0, short, 0.0).0, AfterExit::Stay);
    }

    proptest::proptest! {
        #[test]
        fn applying_the_plan_converges(
            desired_set in proptest::collection::btree_map(0u32..6, 0u8..3, 0..6),
            observed_set in proptest::collection::btree_map(0u32..6, 0u8..3, 0..6),
        ) {
            let desired: Vec<DesiredWorkload> =
                desired_set.iter().map(|(i, r)| dw("w", *i, &format!("r{r}"))).collect();
            let mut observed: BTreeMap<String, Observed> = observed_set
                .iter()
                .map(|(i, r)| (format!("w-{i}"), Observed { revision: format!("r{r}"), ..Default::default() }))
                .collect();
            for a in plan(&desired, &observed) {
                match a {
                    Action::Stop(i) => { observed.remove(&i); }
                    Action::Start(d) | Action::Replace(d) => {
                        observed.insert(d.instance(), Observed { revision: d.revision.clone(), ..Default::default() });
                    }
                }
            }
            proptest::prop_assert!(plan(&desired, &observed).is_empty());
            proptest::prop_assert_eq!(observed.len(), desired.len());
        }
    }

    #[test]
    fn a_finished_run_is_not_run_again_and_a_new_run_replaces() {
        let job = |run| {
            let mut d = dw("j", 0, "r1");
            d.job = Some(shoal_api::model::job::JobRun {
                run,
                backoff_limit: 1,
                active_deadline_ms: None,
            });
            d
        };
        let result = |rev: &str, run: Option<u64>| InstanceStatus {
            schedule: None,
            name: WorkloadName::try_from("j").unwrap(),
            replica: 0,
            revision: rev.into(),
            phase: shoal_api::wire::messages::Phase::Succeeded,
            restarts: 0,
            reason: None,
            exit_code: Some(0),
            started_at_ms: None,
            backoff_ms: None,
            variant: "wasm".into(),
            healthy: None,
            devices: vec![],
            run,
            finished_at_ms: Some(1),
        };
        type Case = (&'static str, DesiredWorkload, Option<InstanceStatus>, bool);
        let cases: Vec<Case> = vec![
            ("no result", job(1), None, false),
            (
                "this run's result",
                job(1),
                Some(result("r1", Some(1))),
                true,
            ),
            (
                "an earlier run's",
                job(2),
                Some(result("r1", Some(1))),
                false,
            ),
            (
                "another revision's",
                job(1),
                Some(result("r0", Some(1))),
                false,
            ),
            (
                "a service is never finished",
                dw("j", 0, "r1"),
                Some(result("r1", None)),
                false,
            ),
        ];
        for (name, w, r, want) in cases {
            assert_eq!(finished(&w, r.as_ref()), want, "{name}");
        }
        // A rerun (same revision, next run) replaces what still runs the earlier run.
        let observed = BTreeMap::from([(
            "j-0".to_string(),
            Observed {
                revision: "r1".into(),
                run: Some(1),
                ..Default::default()
            },
        )]);
        assert_eq!(plan(&[job(2)], &observed), vec![Action::Replace(job(2))]);
        assert_eq!(plan(&[job(1)], &observed), vec![]);
    }

    #[test]
    fn start_order_waits_for_each_condition_on_this_device() {
        use shoal_api::model::order::{After, Condition};
        let st = |name: &str, phase: Phase, healthy: Option<bool>| InstanceStatus {
            schedule: None,
            name: WorkloadName::try_from(name).unwrap(),
            replica: 0,
            revision: "r".into(),
            phase,
            restarts: 0,
            reason: None,
            exit_code: None,
            started_at_ms: None,
            backoff_ms: None,
            variant: String::new(),
            healthy,
            devices: vec![],
            run: None,
            finished_at_ms: None,
        };
        let after = |c: Condition, restart_with: bool| {
            let mut d = dw("app", 0, "r1");
            d.after = vec![After {
                workload: WorkloadName::try_from("dep").unwrap(),
                condition: c,
                restart_with,
            }];
            d
        };
        type Case = (
            &'static str,
            Condition,
            Vec<(InstanceStatus, bool)>,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "none here",
                Condition::Running,
                vec![],
                Some("waiting for dep to be Running (no replica of it on this device)"),
            ),
            (
                "starting",
                Condition::Running,
                vec![(st("dep", Phase::Starting, None), false)],
                Some("waiting for dep to be Running (its replica is Starting)"),
            ),
            (
                "running",
                Condition::Running,
                vec![(st("dep", Phase::Running, None), false)],
                None,
            ),
            (
                "healthy, no probe",
                Condition::Healthy,
                vec![(st("dep", Phase::Running, None), false)],
                None,
            ),
            (
                "healthy, probe not yet",
                Condition::Healthy,
                vec![(st("dep", Phase::Running, None), true)],
                Some("waiting for dep to be Healthy (its replica is Running)"),
            ),
            (
                "healthy, probe passed",
                Condition::Healthy,
                vec![(st("dep", Phase::Running, Some(true)), true)],
                None,
            ),
            (
                "one of two meets it",
                Condition::Running,
                vec![
                    (st("dep", Phase::Failed, None), false),
                    (st("dep", Phase::Running, None), false),
                ],
                None,
            ),
            (
                "succeeded",
                Condition::Succeeded,
                vec![(st("dep", Phase::Succeeded, None), false)],
                None,
            ),
            (
                "failed is not succeeded",
                Condition::Succeeded,
                vec![(st("dep", Phase::Failed, None), false)],
                Some("waiting for dep to be Succeeded (its replica is Failed)"),
            ),
        ];
        for (name, c, deps, want) in cases {
            let w = after(c, false);
            let got = waiting_for(&w, |n| {
                deps.iter()
                    .filter(|(s, _)| &s.name == n)
                    .map(|(s, p)| (s, *p))
                    .collect()
            });
            assert_eq!(got.as_deref(), want, "{name}");
            // Without restartWith a running dependent never stops for it.
            assert_eq!(lost_dependency(&w, |_| Vec::new()), None, "{name}");
        }
        let w = after(Condition::Running, true);
        let crashed = st("dep", Phase::CrashLoopBackOff, None);
        assert!(lost_dependency(&w, |_| vec![(&crashed, false)]).is_some());
    }
}
