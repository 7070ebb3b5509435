//! The fleet's jobs: runs placed within their parallelism, results taken from reports, a
//! failed completion failing the run, `placement: every` per device, rerun, expiry, and a
//! run's results surviving a reopen.
use super::*;
use shoal_api::model::workload::parse_workloads;
use shoal_api::wire::messages::{DeviceStatus, InstanceStatus, Phase};

const MODULE: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

fn job(name: &str, completion: &str, placement: &str) -> Vec<Workload> {
    parse_workloads(&format!(
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: {name} }}\nspec:\n{placement}  completion: {completion}\n  wasm: {{ module: \"{MODULE}\" }}\n"
    ))
    .unwrap()
}

/// Device `dev` reports each job replica it is given as `phase_of(replica)` (Running, or a
/// final phase with its exit code), for the run its desired state names.
fn report(hub: &mut Fleet, dev: &str, phase_of: impl Fn(u32) -> (Phase, i32)) {
    let id: DeviceId = dev.parse().unwrap();
    let workloads = hub
        .desired
        .get(&id)
        .map(|d| d.workloads.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|w| {
            let (phase, code) = phase_of(w.replica);
            let done = matches!(phase, Phase::Succeeded | Phase::Failed);
            InstanceStatus {
                schedule: None,
                name: w.name.clone(),
                replica: w.replica,
                revision: w.revision.clone(),
                phase,
                restarts: 0,
                reason: None,
                exit_code: done.then_some(code),
                started_at_ms: Some(T0),
                backoff_ms: None,
                variant: "wasm".into(),
                healthy: None,
                devices: Vec::new(),
                run: w.job.map(|j| j.run),
                finished_at_ms: done.then_some(T0 + 1),
            }
        })
        .collect();
    hub.status(
        DeviceStatus {
            protocol: 1,
            device_id: id,
            observed_generation: 0,
            workloads,
            time_ms: 0,
        },
        T0,
    );
}

fn replicas(hub: &Fleet, w: &str) -> Vec<u32> {
    hub.assignments()
        .get(&WorkloadName::try_from(w).unwrap())
        .map(|m| m.keys().copied().collect())
        .unwrap_or_default()
}

#[test]
fn a_count_runs_within_parallelism_until_every_completion_succeeded() {
    let mut hub = fleet();
    hub.hello(hello("a", &[]), T0);
    hub.hello(hello("b", &[]), T0);
    hub.apply(job("batch", "{ completions: 3, parallelism: 2 }", ""), T0);
    assert_eq!(replicas(&hub, "batch"), [0, 1]);
    let name = WorkloadName::try_from("batch").unwrap();
    let run = hub
        .desired
        .values()
        .flat_map(|d| &d.workloads)
        .find_map(|w| w.job);
    let first = hub.job(&name).unwrap().id;
    assert_eq!(run.map(|j| (j.run, j.backoff_limit)), Some((first, 6)));
    // Replica 0 succeeds: it leaves, and completion 2 starts (never 0 again).
    for d in ["a", "b"] {
        report(&mut hub, d, |r| {
            if r == 0 {
                (Phase::Succeeded, 0)
            } else {
                (Phase::Running, 0)
            }
        });
    }
    hub.advance_jobs(T0 + 10);
    assert_eq!(replicas(&hub, "batch"), [1, 2]);
    for d in ["a", "b"] {
        report(&mut hub, d, |_| (Phase::Succeeded, 0));
    }
    hub.advance_jobs(T0 + 20);
    assert_eq!(replicas(&hub, "batch"), Vec::<u32>::new());
    let state = hub.job(&name).unwrap();
    assert_eq!(state.succeeded(), 3);
    assert!(state.finished.as_ref().is_some_and(|f| f.succeeded));
    // Finished: no desired state names it any more.
    assert!(hub.desired.values().all(|d| d.workloads.is_empty()));
    // Rerun: run 2, from no results, the same revision.
    hub.rerun(&name, T0 + 30).unwrap();
    assert_eq!(hub.job(&name).unwrap().run, 2);
    assert_eq!(replicas(&hub, "batch"), [0, 1]);
    let run = hub
        .desired
        .values()
        .flat_map(|d| &d.workloads)
        .find_map(|w| w.job);
    let second = hub.job(&name).unwrap().id;
    assert!(second > first);
    assert_eq!(run.map(|j| j.run), Some(second));
}

#[test]
fn a_failed_completion_fails_the_run_stops_the_rest_and_expires() {
    let mut hub = fleet();
    hub.hello(hello("a", &[]), T0);
    hub.apply(
        job(
            "batch",
            "{ completions: 2, parallelism: 2, ttlAfterFinished: 1m }",
            "",
        ),
        T0,
    );
    report(&mut hub, "a", |r| {
        if r == 1 {
            (Phase::Failed, 3)
        } else {
            (Phase::Running, 0)
        }
    });
    hub.advance_jobs(T0 + 10);
    let name = WorkloadName::try_from("batch").unwrap();
    let f = hub.job(&name).unwrap().finished.clone().unwrap();
    assert!(!f.succeeded);
    assert!(
        f.reason.contains("completion 1 failed on device a"),
        "{}",
        f.reason
    );
    assert!(
        f.reason.contains("exit status 3") || f.reason.contains("3"),
        "{}",
        f.reason
    );
    assert!(
        replicas(&hub, "batch").is_empty(),
        "the running completion stops too"
    );
    // ttlAfterFinished: deleted a minute after it finished, not before.
    hub.advance_jobs(T0 + 10 + 59_000);
    assert!(hub.has_workload(&name));
    hub.advance_jobs(T0 + 10 + 60_000);
    assert!(!hub.has_workload(&name));
    assert!(hub.job(&name).is_none());
}

#[test]
fn every_runs_once_per_device_including_devices_that_join_later() {
    let mut hub = fleet();
    hub.hello(hello("a", &[]), T0);
    hub.hello(hello("b", &[]), T0);
    hub.apply(
        job("check", "{ parallelism: 1 }", "  placement: every\n"),
        T0,
    );
    let name = WorkloadName::try_from("check").unwrap();
    // One device at a time.
    assert_eq!(hub.assignments()[&name].len(), 1);
    let first = hub.assignments()[&name]
        .values()
        .next()
        .unwrap()
        .to_string();
    report(&mut hub, &first, |_| (Phase::Succeeded, 0));
    hub.advance_jobs(T0 + 10);
    let second = hub.assignments()[&name]
        .values()
        .next()
        .unwrap()
        .to_string();
    assert_ne!(first, second);
    report(&mut hub, &second, |_| (Phase::Failed, 2));
    hub.advance_jobs(T0 + 20);
    assert!(hub.assignments()[&name].is_empty());
    let state = hub.job(&name).unwrap();
    assert_eq!((state.succeeded(), state.failed()), (1, 1));
    assert_eq!(state.finished, None, "an every job never finishes");
    assert!(
        !hub.place().pending.contains_key(&name),
        "nothing left is not pending"
    );
    // A device that joins later runs it too.
    hub.hello(hello("c", &[]), T0 + 30);
    assert_eq!(
        hub.assignments()[&name]
            .values()
            .map(|d| d.to_string())
            .collect::<Vec<_>>(),
        ["c"]
    );
}

#[test]
fn a_new_revision_is_a_new_run_and_runs_survive_a_reopen() {
    let store = MemStore::default();
    let mut hub = fleet();
    hub.hello(hello("a", &[]), T0);
    hub.apply(job("batch", "{ completions: 2 }", ""), T0);
    report(&mut hub, "a", |_| (Phase::Succeeded, 0));
    hub.advance_jobs(T0 + 10);
    for w in hub.take_writes() {
        store.write(&w).unwrap();
    }
    let snap: Snapshot = store.load().unwrap();
    let name = WorkloadName::try_from("batch").unwrap();
    let again = Fleet::open(snap, "http://h".into(), false);
    assert_eq!(again.job(&name), hub.job(&name));
    assert_eq!(again.job(&name).unwrap().succeeded(), 1);
    assert_eq!(
        replicas(&again, "batch"),
        [1],
        "completion 0 is not run again"
    );
    // A changed spec: run 2, no results, no rollout.
    hub.apply(
        job("batch", "{ completions: 2, backoffLimit: 1 }", ""),
        T0 + 20,
    );
    let state = hub.job(&name).unwrap();
    assert_eq!((state.run, state.results.len()), (2, 0));
    assert!(!hub.rolling());
    assert_eq!(replicas(&hub, "batch").len(), 1, "parallelism 1");
    let run = hub
        .desired
        .values()
        .flat_map(|d| &d.workloads)
        .find_map(|w| w.job);
    let id = hub.job(&name).unwrap().id;
    assert_eq!(run.map(|j| (j.run, j.backoff_limit)), Some((id, 1)));
    // What only the hub reads (parallelism, ttl) is no new run.
    hub.apply(
        job(
            "batch",
            "{ completions: 2, backoffLimit: 1, ttlAfterFinished: 1h }",
            "",
        ),
        T0 + 25,
    );
    assert_eq!(hub.job(&name).unwrap().id, id);
    // Not a job: rerun and scale say so.
    hub.apply(
        parse_workloads(&format!(
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: batch }}\nspec:\n  wasm: {{ module: \"{MODULE}\" }}\n"
        ))
        .unwrap(),
        T0 + 30,
    );
    assert!(hub.job(&name).is_none());
    assert!(matches!(
        hub.rerun(&name, T0 + 40),
        Err(WorkloadRefusal::NotAJob(_))
    ));
}

#[test]
fn a_config_the_job_reads_changing_starts_a_new_run_not_a_rollout() {
    let config = |v: &str| {
        let mut s = shoal_api::wire::manifest::parse_stream(&format!(
            "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {{name: site}}\ndata: {{interval: '{v}'}}\n"
        ))
        .unwrap();
        s.configs.remove(0).1
    };
    let mut hub = fleet();
    hub.hello(hello("a", &[]), T0);
    let none = std::collections::BTreeSet::new();
    hub.apply_configs(vec![config("5")], &none, T0);
    hub.apply(
        job(
            "batch",
            "{ completions: 2 }\n  configs: [{ name: site, env: { INTERVAL: interval } }]",
            "",
        ),
        T0,
    );
    let name = WorkloadName::try_from("batch").unwrap();
    let first = hub.job(&name).unwrap().clone();
    hub.apply_configs(vec![config("7")], &none, T0 + 10);
    hub.reconcile();
    let w = hub.workloads[&name].clone();
    let state = hub.job(&name).unwrap();
    assert_eq!(
        state.revision,
        w.revision(),
        "the run follows the new revision"
    );
    assert_eq!(state.run, first.run + 1);
    assert!(state.id > first.id);
    assert!(!hub.rolling(), "jobs do not roll out");
    // Its replica reports under the new run, and the result counts.
    report(&mut hub, "a", |_| (Phase::Succeeded, 0));
    hub.advance_jobs(T0 + 20);
    assert_eq!(hub.job(&name).unwrap().succeeded(), 1);
}

#[test]
fn a_lost_device_holds_no_slot_of_an_every_job() {
    let mut hub = fleet();
    hub.hello(hello("a", &[]), T0);
    hub.hello(hello("b", &[]), T0);
    hub.apply(
        job("check", "{ parallelism: 1 }", "  placement: every\n"),
        T0,
    );
    let name = WorkloadName::try_from("check").unwrap();
    let first = hub.assignments()[&name].values().next().unwrap().clone();
    let other: DeviceId = if first.as_str() == "a" { "b" } else { "a" }
        .parse()
        .unwrap();
    // The holder falls silent past the grace; the other goes on.
    hub.reported(&other, T0 + 31_000);
    hub.check_lost(T0 + 31_000, 30_000);
    let on: Vec<&DeviceId> = hub.assignments()[&name].values().collect();
    assert!(on.contains(&&other), "{on:?}");
    assert!(
        on.contains(&&first),
        "an every replica stays on its lost device"
    );
}
