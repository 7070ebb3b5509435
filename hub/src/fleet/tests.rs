//! The fleet's tests: outcomes of inputs (hellos, applies, reports, the clock moving), with
//! the store only where persistence is the point (reopen).
use super::*;
use crate::fleet::records::{DeviceRecord, Snapshot};
use crate::store::{MemStore, Store};
use shoal_api::model::labels::{Grant, LabelChange, LabelError};
use shoal_api::wire::messages::{DesiredState, DeviceStatus, Hello, Phase};

/// The clock in these tests: inputs take `now`, so time moves only when a test says.
const T0: u64 = 1_700_000_000_000;
use shoal_api::model::workload::{parse_workloads, Placement};

fn hello(id: &str, labels: &[(&str, &str)]) -> Hello {
    Hello {
        allows: Vec::new(),
        protocol: 1,
        device_id: DeviceId::try_from(id).unwrap(),
        arch: "x86_64".into(),
        variant: None,
        os: "linux".into(),
        runtimes: vec!["wasm".into()],
        cpus: 2,
        memory: 512 << 20,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        agent_version: "test".into(),
        max_replicas: None,
        devices: Default::default(),
    }
}

fn grant(token: &str, labels: &[(&str, &str)], fresh: bool) -> Grant {
    Grant {
        token: token.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        fresh,
    }
}

/// A device whose join token granted `labels` enrolls, then says hello asking for them.
fn join(hub: &mut Fleet, id: &str, labels: &[(&str, &str)]) -> Vec<DesiredState> {
    let h = hello(id, labels);
    hub.enrolled(
        &h.device_id,
        Some(grant(&format!("t-{id}"), labels, true)),
        T0,
    );
    hub.hello(h, T0)
}

const M: &str = r#"
apiVersion: shoal.dev/v1
kind: Workload
metadata: { name: web }
spec:
  replicas: 2
  wasm: { module: "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" }
---
apiVersion: shoal.dev/v1
kind: Workload
metadata: { name: sensor }
spec:
  placement: every
  selector: { role: sensor }
  wasm: { module: "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" }
"#;

/// A report of device `d1`: `content` picks one of three contents (so reports repeat).
fn d1_report(content: u8, time_ms: u64) -> DeviceStatus {
    let phase = [Phase::Running, Phase::Failed, Phase::Starting][usize::from(content % 3)];
    crate::fleet::ingest::tests::status("d1", 1, phase, time_ms)
}

proptest::proptest! {
    /// Three replicas take a device's reports as a shared subscription hands them out
    /// (any replica, any order of batches): once the batches are all through, every
    /// replica holds the content of the device's newest report.
    #[test]
    fn replicas_agree_on_the_newest_status(
        steps in proptest::collection::vec((0u8..3, 0usize..3, proptest::bool::ANY), 1..40)
    ) {
        let mut hubs: Vec<Fleet> = (0..3)
            .map(|_| fleet())
            .collect();
        let mut relays: Vec<crate::fleet::ingest::Relay> = (0..3).map(|_| Default::default()).collect();
        // Batches on the wire: (from, batch), delivered in order per sender.
        let mut wire: Vec<(usize, shoal_api::wire::messages::IngestBatch)> = Vec::new();
        let deliver = |hubs: &mut Vec<Fleet>,
                       relays: &mut Vec<crate::fleet::ingest::Relay>,
                       from: usize,
                       b: shoal_api::wire::messages::IngestBatch| {
            for to in (0..3).filter(|&t| t != from) {
                for again in hubs[to].ingest_batch(b.clone(), T0) {
                    relays[to].changed(again);
                }
            }
        };
        let mut newest = None;
        for (i, (content, to, flush)) in steps.iter().enumerate() {
            let r = d1_report(*content, 1000 + i as u64);
            newest = Some(r.clone());
            match hubs[*to].accept_status(r, T0) {
                Accepted::New(s) => relays[*to].changed(s),
                Accepted::Same(h) | Accepted::Stale { heard: h, .. } => relays[*to].heard(h),
            }
            if *flush {
                // One replica's batch goes out; an older one still on the wire goes first.
                for b in relays[*to].take() {
                    wire.push((*to, b));
                }
                if wire.len() > 1 {
                    let (from, b) = wire.remove(0);
                    deliver(&mut hubs, &mut relays, from, b);
                }
            }
        }
        // Drain: everything on the wire, then whatever that made the replicas pass on.
        for _ in 0..10 {
            for (from, b) in std::mem::take(&mut wire) {
                deliver(&mut hubs, &mut relays, from, b);
            }
            for (from, r) in relays.iter_mut().enumerate() {
                wire.extend(r.take().into_iter().map(|b| (from, b)));
            }
            if wire.is_empty() {
                break;
            }
        }
        let want = newest.unwrap().workloads;
        for (i, h) in hubs.iter().enumerate() {
            let have = h.live.get(&DeviceId::try_from("d1").unwrap())
                .and_then(|l| l.status.as_ref()).map(|s| s.workloads.clone());
            proptest::prop_assert_eq!(have.as_ref(), Some(&want), "replica {}", i);
        }
    }
}

/// The shell in miniature: writes what the fleet changed to `store` (flushing is the
/// store's business, and a `MemStore` has nothing to flush).
fn save(hub: &mut Fleet, store: &MemStore) {
    for w in hub.take_writes() {
        store.write(&w).unwrap();
    }
}

/// A fleet loaded from `store`, its first writes (labels adopted) saved.
fn open_from(store: &MemStore, trust_reported_labels: bool) -> Fleet {
    let mut hub = Fleet::open(
        store.load().unwrap(),
        "http://h".into(),
        trust_reported_labels,
    );
    save(&mut hub, store);
    hub
}

/// A fleet with nothing stored yet.
fn fleet() -> Fleet {
    Fleet::open(Snapshot::default(), "http://h".into(), false)
}

fn placed(hub: &Fleet, w: &str) -> Vec<String> {
    hub.assignments()[&WorkloadName::try_from(w).unwrap()]
        .values()
        .map(|d| d.to_string())
        .collect()
}

fn id(s: &str) -> DeviceId {
    DeviceId::try_from(s).unwrap()
}

fn change(words: &[&str], overwrite: bool) -> LabelChange {
    LabelChange::parse(words, overwrite).unwrap()
}

fn labels_of(hub: &Fleet, d: &str) -> Vec<String> {
    hub.labels_of_device(&id(d))
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

#[test]
fn placement_sees_the_operators_labels_never_the_devices() {
    let mut hub = fleet();
    // `thief` asks for role=sensor (and an operator-only key); nobody granted either.
    hub.hello(
        hello("thief", &[("role", "sensor"), ("shoal.dev/x", "y")]),
        T0,
    );
    join(&mut hub, "a", &[("role", "sensor")]);
    hub.apply(parse_workloads(M).unwrap(), T0);
    assert_eq!(placed(&hub, "sensor"), ["a"]);
    let view = |hub: &Fleet| {
        hub.device_views()
            .into_iter()
            .find(|v| v.id == "thief")
            .unwrap()
    };
    assert!(view(&hub).labels.is_empty());
    assert_eq!(view(&hub).requested_labels.len(), 2);

    // Refusals change nothing: an unknown device, a value changed without --overwrite.
    let r = hub.label(&id("nobody"), &change(&["role=sensor"], false));
    assert_eq!(r, Err(LabelRefusal::UnknownDevice(id("nobody"))));
    let r = hub.label(&id("a"), &change(&["role=db"], false));
    assert!(
        matches!(r, Err(LabelRefusal::Invalid(LabelError::Exists { .. }))),
        "{r:?}"
    );
    assert_eq!(labels_of(&hub, "a"), ["role=sensor"]);

    // The operator grants it: placed; the device's next hello cannot change that.
    let out = hub
        .label(&id("thief"), &change(&["role=sensor"], false))
        .unwrap();
    assert!(out.iter().any(|d| d.device_id == id("thief")));
    assert_eq!(placed(&hub, "sensor"), ["a", "thief"]);
    assert_eq!(
        view(&hub).requested_labels.len(),
        1,
        "the reserved key stays ungranted"
    );
    hub.hello(hello("thief", &[("role", "db")]), T0);
    assert_eq!(labels_of(&hub, "thief"), ["role=sensor"]);
    assert_eq!(placed(&hub, "sensor"), ["a", "thief"]);
    // Taken away again: the replica leaves.
    hub.label(&id("thief"), &change(&["role-"], false)).unwrap();
    assert_eq!(placed(&hub, "sensor"), ["a"]);
    // An operator may use the reserved prefix.
    hub.label(&id("thief"), &change(&["shoal.dev/ring=canary"], false))
        .unwrap();
    assert_eq!(labels_of(&hub, "thief"), ["shoal.dev/ring=canary"]);
}

#[test]
fn an_enrolled_device_shows_before_it_connects_and_keeps_its_grant_on_reenrolment() {
    let mut hub = fleet();
    hub.apply(parse_workloads(M).unwrap(), T0);
    hub.enrolled(
        &id("new"),
        Some(grant("t1", &[("role", "sensor")], true)),
        T0,
    );
    let v = hub.device_views();
    assert_eq!((v.len(), v[0].online, v[0].last_seen_ms), (1, false, 0));
    assert_eq!(labels_of(&hub, "new"), ["role=sensor"]);
    // Never connected: never lost, nothing placed on it until it is online.
    let far = T0 + 10 * 3_600_000;
    hub.check_lost(far, 30_000);
    assert!(!hub.device_views()[0].lost);
    assert!(hub
        .assignments()
        .get(&WorkloadName::try_from("sensor").unwrap())
        .is_none_or(|a| a.is_empty()));
    hub.hello(hello("new", &[]), T0);
    assert_eq!(placed(&hub, "sensor"), ["new"]);
    // Enrolling again (a wiped board, a token bound to it) keeps the labels it has and
    // adds what the new token grants; the state is issued anew for its new key.
    let g = hub.desired[&id("new")].generation;
    let out = hub.enrolled(&id("new"), Some(grant("t2", &[("zone", "a")], false)), T0);
    assert!(out
        .iter()
        .any(|d| d.device_id == id("new") && d.generation > g));
    assert_eq!(labels_of(&hub, "new"), ["role=sensor", "zone=a"]);
    // A grant applies once: told of the same enrollment again (a replayed message),
    // the hub does not bring back a label the operator removed since.
    hub.label(&id("new"), &change(&["zone-"], false)).unwrap();
    hub.enrolled(&id("new"), Some(grant("t2", &[("zone", "a")], false)), T0);
    assert_eq!(labels_of(&hub, "new"), ["role=sensor"]);
    // An unbound token enrolls a new identity (the id's enrollment record was gone):
    // it gets what its token grants, not what the id had.
    hub.enrolled(&id("new"), Some(grant("t3", &[("zone", "b")], true)), T0);
    assert_eq!(labels_of(&hub, "new"), ["zone=b"]);
    // A notice about an id with no grant in the book (forged, or a lost record) records
    // nothing.
    hub.enrolled(&id("ghost"), None, T0);
    assert!(hub.labels_of_device(&id("ghost")).is_none());
    // A new leader catching up on the book applies nothing twice.
    let before = hub.device_views();
    let out = hub.apply_grants(
        vec![(id("new"), Some(grant("t3", &[("zone", "b")], true)))],
        T0,
    );
    assert!(out.is_empty());
    assert_eq!(hub.device_views(), before);
}

#[test]
fn records_from_before_the_upgrade_keep_what_their_devices_reported_then() {
    let store = std::sync::Arc::new(MemStore::default());
    let old = DeviceRecord {
        hello: hello("old", &[("role", "sensor"), ("shoal.dev/x", "y")]),
        first_seen_ms: 1,
        last_seen_ms: 1,
        cordoned: false,
        draining: false,
        labels: None,
        granted_by: None,
        annotations: Default::default(),
    };
    store.put_device(&old).unwrap();
    let mut hub = open_from(&store, false);
    assert_eq!(labels_of(&hub, "old"), ["role=sensor"]);
    // Written back as the operator's, so what the device says later is a request only.
    let rec = &store.load().unwrap().devices[&id("old")];
    assert_eq!(rec.labels.as_ref().map(|l| l.len()), Some(1));
    hub.hello(hello("old", &[("role", "vault")]), T0);
    assert_eq!(labels_of(&hub, "old"), ["role=sensor"]);
    save(&mut hub, &store);
    let again = open_from(&store, false);
    assert_eq!(labels_of(&again, "old"), ["role=sensor"]);
    // Once the store's labels are the operator's, a record without labels (an older
    // replica rewrote it) adopts nothing the device says.
    let mut rewritten = store.load().unwrap().devices[&id("old")].clone();
    rewritten.labels = None;
    rewritten.hello = hello("old", &[("role", "vault")]);
    store.put_device(&rewritten).unwrap();
    let third = open_from(&store, false);
    assert!(labels_of(&third, "old").is_empty());
}

#[test]
fn an_insecure_fleet_lets_reports_steer_except_reserved_keys() {
    let store = std::sync::Arc::new(MemStore::default());
    let mut hub = open_from(&store, true);
    // It adopts nothing, and leaves the store unmarked: a hub with identities adopts
    // the reports of before when the fleet moves to TLS.
    assert!(!store.load().unwrap().labels_owned);
    hub.hello(hello("a", &[("role", "sensor"), ("shoal.dev/x", "y")]), T0);
    assert_eq!(labels_of(&hub, "a"), ["role=sensor"]);
    hub.apply(parse_workloads(M).unwrap(), T0);
    assert_eq!(placed(&hub, "sensor"), ["a"]);
    // The operator's word wins over the report.
    hub.label(&id("a"), &change(&["role=db"], false)).unwrap();
    assert_eq!(labels_of(&hub, "a"), ["role=db"]);
}

#[test]
fn a_hello_with_absurd_capacity_changes_nothing() {
    let mut hub = fleet();
    hub.hello(hello("a", &[]), T0);
    let mut h = hello("a", &[]);
    h.memory = 1 << 60;
    assert!(hub.hello(h, T0).is_empty());
    assert_eq!(hub.device_views()[0].memory, 512 << 20);
    let mut h = hello("b", &[]);
    h.arch = "x86\nforged".into();
    hub.hello(h, T0);
    assert_eq!(hub.device_views().len(), 1, "b is not recorded");
}

#[test]
fn lost_devices_are_rescheduled_and_return_without_churn() {
    let grace = 30_000;
    let mut hub = fleet();
    join(&mut hub, "a", &[("role", "sensor")]);
    join(&mut hub, "b", &[("role", "sensor")]);
    hub.take_scheduling_runs();
    hub.apply(parse_workloads(M).unwrap(), T0);
    assert_eq!(placed(&hub, "web"), ["a", "b"]);
    // web on a and b, sensor on both: four placements, nothing moved.
    let runs = hub.take_scheduling_runs();
    assert_eq!(runs.iter().map(|r| r.placed).sum::<usize>(), 4, "{runs:?}");
    assert_eq!(runs.iter().map(|r| r.moved).sum::<usize>(), 0, "{runs:?}");
    let a: DeviceId = "a".parse().unwrap();
    hub.presence(&a, false, T0);
    // Within the grace period nothing moves.
    assert!(hub.check_lost(T0 + grace / 2, grace).is_empty());
    assert_eq!(placed(&hub, "web"), ["a", "b"]);
    // Past it (b keeps reporting), a's `web` replica moves to b; its `sensor` (every)
    // replica stays.
    let later = T0 + grace + 1;
    let beat = |hub: &mut Fleet, id: &str, at: u64| {
        hub.status(
            DeviceStatus {
                protocol: 1,
                device_id: id.parse().unwrap(),
                observed_generation: 0,
                workloads: vec![],
                time_ms: at,
            },
            T0,
        );
        hub.live
            .get_mut(&id.parse::<DeviceId>().unwrap())
            .unwrap()
            .last_heard_ms = at;
    };
    beat(&mut hub, "b", later);
    let publish = hub.check_lost(later, grace);
    assert_eq!(placed(&hub, "web"), ["b", "b"]);
    assert_eq!(placed(&hub, "sensor"), ["a", "b"]);
    let to_a = publish
        .iter()
        .find(|d| d.device_id == a)
        .expect("a's desired state changes");
    assert!(
        to_a.workloads.iter().all(|w| w.name.as_str() == "sensor"),
        "{to_a:?}"
    );
    assert!(hub.device_views().iter().any(|d| d.id == "a" && d.lost));
    let runs = hub.take_scheduling_runs();
    assert_eq!(
        runs.iter().map(|r| r.moved).sum::<usize>(),
        1,
        "web-0 moved: {runs:?}"
    );
    // a comes back: it is no longer lost, and nothing moves back (no churn).
    join(&mut hub, "a", &[("role", "sensor")]);
    assert!(hub.device_views().iter().any(|d| d.id == "a" && !d.lost));
    assert_eq!(placed(&hub, "web"), ["b", "b"]);
    // An online device that stops reporting is lost too.
    beat(&mut hub, "a", later + grace);
    let b_silent = hub.check_lost(later + grace + 1, grace);
    assert!(!b_silent.is_empty(), "silent devices are lost");
    assert_eq!(placed(&hub, "web"), ["a", "a"]);
}

#[test]
fn a_new_revision_rolls_out_within_the_budget_and_survives_reopen() {
    let store = std::sync::Arc::new(MemStore::default());
    let mut hub = open_from(&store, false);
    hub.hello(hello("a", &[]), T0);
    hub.hello(hello("b", &[]), T0);
    let v = |arg: &str| {
        let text = M.split("---").next().unwrap().replace(
            "  replicas: 2\n",
            &format!("  replicas: 2\n  args: [{arg}]\n  update: {{ maxUnavailable: 1 }}\n"),
        );
        parse_workloads(&text).unwrap()
    };
    hub.apply(v("one"), T0);
    let (_, publish) = hub.apply(v("two"), T0);
    let args: Vec<Vec<String>> = hub
        .desired
        .values()
        .flat_map(|d| d.workloads.iter().map(|w| w.args.clone()))
        .collect();
    assert!(args.contains(&vec!["one".to_string()]), "{args:?}");
    assert!(
        publish.is_empty(),
        "nothing switches before the rollout steps"
    );
    assert!(hub.rolling());
    // Report both running their revisions: the first step switches one replica.
    report_running(&mut hub);
    let step1 = hub.advance_rollouts(T0);
    assert_eq!(step1.len(), 1, "one device changes: {step1:?}");
    // The hub restarts mid-rollout: the rollout is still there.
    save(&mut hub, &store);
    let mut hub = open_from(&store, false);
    hub.hello(hello("a", &[]), T0);
    hub.hello(hello("b", &[]), T0);
    assert!(hub.rolling());
    report_running(&mut hub);
    hub.advance_rollouts(T0);
    report_running(&mut hub);
    hub.advance_rollouts(T0);
    assert!(!hub.rolling(), "complete");
    let view = hub
        .workload_view(&WorkloadName::try_from("web").unwrap())
        .unwrap();
    assert_eq!(view.rollout.unwrap().state, "Complete");
    assert!(hub
        .desired
        .values()
        .flat_map(|d| d.workloads.iter())
        .all(|w| w.args == ["two"]));
}

#[test]
fn each_device_gets_the_variant_it_can_run() {
    let mut hub = fleet();
    hub.hello(hello("w1", &[]), T0);
    let mut boxed = hello("c1", &[]);
    boxed.runtimes = vec!["container".into()];
    boxed.arch = "aarch64".into();
    hub.hello(boxed, T0);
    let text = format!(
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: both }}\nspec:\n  placement: every\n  wasm: {{ module: \"sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\" }}\n  container: {{ image: \"oci://localhost:5000/both:1@{}\", platforms: [linux/arm64] }}\n",
        shoal_api::model::ids::Digest::of(b"image")
    );
    hub.apply(parse_workloads(&text).unwrap(), T0);
    let on = |d: &str| hub.desired[&DeviceId::try_from(d).unwrap()].workloads[0].clone();
    let (w, c) = (on("w1"), on("c1"));
    assert!(w.module.is_some() && w.container.is_none(), "{w:?}");
    assert!(c.module.is_none() && c.container.is_some(), "{c:?}");
    assert_eq!(w.revision, c.revision, "one revision, two variants");
}

/// Every replica's args as the desired states say, by replica index.
fn args_by_replica(hub: &Fleet) -> BTreeMap<u32, String> {
    hub.desired
        .values()
        .flat_map(|d| d.workloads.iter())
        .map(|w| (w.replica, w.args.join(" ")))
        .collect()
}

fn web(replicas: u32, arg: &str, update: &str) -> Vec<Workload> {
    let text = M.split("---").next().unwrap().replace(
        "  replicas: 2\n",
        &format!("  replicas: {replicas}\n  args: [{arg}]\n  update: {{ {update} }}\n"),
    );
    parse_workloads(&text).unwrap()
}

#[test]
fn a_surge_rollout_adds_before_it_removes_and_survives_reopen() {
    let store = std::sync::Arc::new(MemStore::default());
    let mut hub = open_from(&store, false);
    for d in ["a", "b", "c"] {
        hub.hello(hello(d, &[]), T0);
    }
    let update = "maxUnavailable: 0, maxSurge: 1";
    hub.apply(web(2, "one", update), T0);
    hub.apply(web(2, "two", update), T0);
    report_running(&mut hub);
    hub.advance_rollouts(T0);
    // A third replica on the new revision; both old ones still run.
    let by = args_by_replica(&hub);
    assert_eq!(
        by,
        BTreeMap::from([(0, "one".into()), (1, "one".into()), (2, "two".into())])
    );
    // The hub restarts: the surge replica stays.
    save(&mut hub, &store);
    let mut hub = open_from(&store, false);
    for d in ["a", "b", "c"] {
        hub.hello(hello(d, &[]), T0);
    }
    assert_eq!(
        args_by_replica(&hub).len(),
        3,
        "the surge survives a restart"
    );
    let mut most = 0;
    for _ in 0..6 {
        report_running(&mut hub);
        hub.advance_rollouts(T0);
        most = most.max(args_by_replica(&hub).len());
        if !hub.rolling() {
            break;
        }
    }
    assert!(!hub.rolling(), "complete");
    assert_eq!(most, 3, "never more than replicas + maxSurge");
    let by = args_by_replica(&hub);
    assert_eq!(by.len(), 2, "{by:?}");
    assert!(by.values().all(|a| a == "two"), "{by:?}");
}

#[test]
fn a_third_revision_mid_rollout_keeps_updated_replicas() {
    let mut hub = fleet();
    for d in ["a", "b", "c", "d"] {
        hub.hello(hello(d, &[]), T0);
    }
    let update = "maxUnavailable: 1";
    hub.apply(web(4, "one", update), T0);
    hub.apply(web(4, "two", update), T0);
    report_running(&mut hub);
    hub.advance_rollouts(T0);
    let by = args_by_replica(&hub);
    assert_eq!(by.values().filter(|a| *a == "two").count(), 1, "{by:?}");
    let switched = by
        .iter()
        .find(|(_, a)| *a == "two")
        .map(|(i, _)| *i)
        .unwrap();
    // v3 arrives: nothing changes before it steps, and the v2 replica is not sent back.
    let (_, publish) = hub.apply(web(4, "three", update), T0);
    assert!(publish.is_empty(), "{publish:?}");
    assert_eq!(args_by_replica(&hub)[&switched], "two");
    // The rollback target is still the last good revision.
    let view = hub
        .workload_view(&WorkloadName::try_from("web").unwrap())
        .unwrap();
    let rollout = view.rollout.unwrap();
    let first = web(4, "one", update).remove(0).revision();
    assert_eq!(rollout.previous_revision.as_deref(), Some(first.as_str()));
    for _ in 0..8 {
        report_running(&mut hub);
        hub.advance_rollouts(T0);
    }
    assert!(!hub.rolling());
    assert!(args_by_replica(&hub).values().all(|a| a == "three"));
}

#[test]
fn operators_pause_resume_promote_and_undo() {
    let mut hub = fleet();
    for d in ["a", "b", "c", "d"] {
        hub.hello(hello(d, &[]), T0);
    }
    let name = WorkloadName::try_from("web").unwrap();
    let state = |hub: &Fleet| hub.workload_view(&name).unwrap().rollout.unwrap().state;
    let count = |hub: &Fleet, a: &str| args_by_replica(hub).values().filter(|x| *x == a).count();
    // Nothing to steer before a rollout.
    let none = hub.rollout_action(&name, RolloutAction::Pause, T0);
    assert!(matches!(none, Err(WorkloadRefusal::NotFound(_))));
    hub.apply(web(4, "one", "maxUnavailable: 1"), T0);
    let none = hub.rollout_action(&name, RolloutAction::Resume, T0);
    assert!(none
        .unwrap_err()
        .to_string()
        .contains("no rollout in progress"));

    // Paused: reports come in, nothing switches; resumed: it goes on.
    hub.apply(web(4, "two", "maxUnavailable: 1"), T0);
    hub.rollout_action(&name, RolloutAction::Pause, T0).unwrap();
    assert_eq!(state(&hub), "Paused");
    for _ in 0..3 {
        report_running(&mut hub);
        hub.advance_rollouts(T0);
    }
    assert_eq!(count(&hub, "two"), 0, "a paused rollout switches nothing");
    hub.rollout_action(&name, RolloutAction::Resume, T0)
        .unwrap();
    assert_eq!(
        count(&hub, "two"),
        1,
        "resumed: a step at once, within the budget"
    );

    // A canary that does not get ready holds the rest until `promote`.
    hub.apply(web(4, "three", "maxUnavailable: 4, canary: 1"), T0);
    let starting = |a: &str| {
        if a == "three" {
            Phase::Starting
        } else {
            Phase::Running
        }
    };
    for _ in 0..4 {
        report(&mut hub, starting);
        hub.advance_rollouts(T0);
    }
    assert_eq!(state(&hub), "Canary");
    assert_eq!(count(&hub, "three"), 1, "only the canary");
    hub.rollout_action(&name, RolloutAction::Promote, T0)
        .unwrap();
    report(&mut hub, starting);
    hub.advance_rollouts(T0);
    assert_eq!(
        count(&hub, "three"),
        4,
        "promoted: the rest within the budget"
    );
    for _ in 0..4 {
        report_running(&mut hub);
        hub.advance_rollouts(T0);
    }
    assert_eq!(state(&hub), "Complete");
    assert_eq!(count(&hub, "three"), 4);

    // Scale, then undo: the previous revision's spec, the current replica count.
    hub.scale(&name, 2).unwrap();
    hub.rollout_action(&name, RolloutAction::Undo { to: None }, T0)
        .unwrap();
    assert_eq!(hub.workloads[&name].args, ["two"]);
    assert_eq!(hub.workloads[&name].placement, Placement::Replicas(2));
    // To a named revision (a prefix will do); unknown and current ones are refused.
    let first = web(4, "one", "").remove(0).revision();
    let bad = hub.rollout_action(
        &name,
        RolloutAction::Undo {
            to: Some("zzz".into()),
        },
        T0,
    );
    assert!(bad
        .unwrap_err()
        .to_string()
        .contains(r#"revision "zzz" is not in the history"#));
    hub.rollout_action(
        &name,
        RolloutAction::Undo {
            to: Some(first[..6].into()),
        },
        T0,
    )
    .unwrap();
    assert_eq!(hub.workloads[&name].args, ["one"]);
    assert_eq!(hub.workloads[&name].placement, Placement::Replicas(2));
    let same = hub.rollout_action(
        &name,
        RolloutAction::Undo {
            to: Some(first.clone()),
        },
        T0,
    );
    assert!(matches!(same, Err(WorkloadRefusal::AlreadyRuns { .. })));
}

/// Every device reports every replica it should run as Running.
fn report_running(hub: &mut Fleet) {
    report(hub, |_| Phase::Running)
}

/// Every device reports every replica it should run, in the phase `phase_of` its args.
fn report(hub: &mut Fleet, phase_of: impl Fn(&str) -> Phase) {
    let ids: Vec<DeviceId> = hub.desired.keys().cloned().collect();
    for id in ids {
        let workloads = hub.desired[&id]
            .workloads
            .iter()
            .map(|w| shoal_api::wire::messages::InstanceStatus {
                schedule: None,
                name: w.name.clone(),
                replica: w.replica,
                revision: w.revision.clone(),
                phase: phase_of(&w.args.join(" ")),
                restarts: 0,
                reason: None,
                exit_code: None,
                started_at_ms: Some(0),
                backoff_ms: None,
                variant: "wasm".into(),
                healthy: None,
                devices: Vec::new(),
                run: None,
                finished_at_ms: None,
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
}

#[test]
fn drain_moves_replicas_within_the_budget() {
    let mut hub = fleet();
    for d in ["a", "b", "c"] {
        hub.hello(hello(d, &[]), T0);
    }
    let text = M.split("---").next().unwrap().replace(
        "  replicas: 2\n",
        "  replicas: 6\n  update: { maxUnavailable: 1 }\n",
    );
    hub.apply(parse_workloads(&text).unwrap(), T0);
    assert_eq!(placed(&hub, "web").iter().filter(|d| *d == "b").count(), 2);
    report_running(&mut hub);
    let b: DeviceId = "b".parse().unwrap();
    hub.drain(&b).unwrap();
    assert_eq!(
        placed(&hub, "web").iter().filter(|d| *d == "b").count(),
        1,
        "one at a time: {:?}",
        placed(&hub, "web")
    );
    assert!(hub.draining());
    // Until the moved replica reports Running, nothing else moves.
    hub.advance_drains();
    assert_eq!(placed(&hub, "web").iter().filter(|d| *d == "b").count(), 1);
    report_running(&mut hub);
    hub.advance_drains();
    assert!(!placed(&hub, "web").contains(&"b".to_string()));
    report_running(&mut hub);
    hub.advance_drains();
    assert!(!hub.draining(), "drain complete");
    assert!(hub.device_views().iter().any(|d| d.id == "b" && d.cordoned));
}

#[test]
fn cordon_and_drain() {
    let mut hub = fleet();
    join(&mut hub, "a", &[("role", "sensor")]);
    hub.hello(hello("b", &[]), T0);
    let a: DeviceId = "a".parse().unwrap();
    hub.cordon(&a, true).unwrap();
    hub.apply(parse_workloads(M).unwrap(), T0);
    assert_eq!(
        placed(&hub, "web"),
        ["b", "b"],
        "cordoned a takes nothing new"
    );
    assert!(placed(&hub, "sensor").is_empty());
    hub.cordon(&a, false).unwrap();
    assert_eq!(placed(&hub, "sensor"), ["a"]);
    assert_eq!(
        placed(&hub, "web"),
        ["b", "b"],
        "uncordon does not move running replicas"
    );
    hub.drain(&"b".parse().unwrap()).unwrap();
    assert_eq!(placed(&hub, "web"), ["a", "a"]);
    assert!(hub.cordon(&"nope".parse().unwrap(), true).is_none());
}

fn stored(name: &str, keys: &[&str], version: &str) -> StoredSecret {
    StoredSecret {
        name: SecretName::try_from(name).unwrap(),
        keys: keys.iter().map(|k| k.to_string()).collect(),
        version: version.into(),
        encrypted: "opaque".into(),
        updated_ms: 1,
        earlier: Vec::new(),
    }
}

#[test]
fn secrets_are_checked_versioned_and_kept_while_used() {
    let mut hub = fleet();
    join(&mut hub, "a", &[("role", "sensor")]);
    hub.hello(hello("b", &[]), T0);
    let uses = parse_workloads(
        r#"
apiVersion: shoal.dev/v1
kind: Workload
metadata: { name: sensor }
spec:
  placement: every
  selector: { role: sensor }
  wasm: { module: "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" }
  secrets: [{ name: db, env: { PASS: password } }]
"#,
    )
    .unwrap();
    let located: Vec<(usize, &Workload)> = uses.iter().map(|w| (1, w)).collect();
    // Missing secret, then a secret without the key the workload reads.
    let errs = hub.check_secrets(&located, &[]);
    assert!(
        errs[0].message.contains("secret \"db\" does not exist"),
        "{errs:?}"
    );
    let wrong = stored("db", &["user"], "01");
    let errs = hub.check_secrets(&located, &[(2, &wrong)]);
    assert!(
        errs[0].message.contains("has no key \"password\""),
        "{errs:?}"
    );
    let v1 = stored("db", &["password"], "01");
    assert!(hub.check_secrets(&located, &[(2, &v1)]).is_empty());
    assert_eq!(
        hub.apply_secrets(vec![v1.clone()], &Default::default(), T0)["db"],
        "created"
    );
    let (_, publish) = hub.apply(uses.clone(), T0);
    // Only the device that runs the workload is told about the secret, at its version.
    assert_eq!(publish.len(), 1);
    assert_eq!(publish[0].device_id.as_str(), "a");
    assert_eq!(publish[0].workloads[0].secrets[0].version, "01");
    assert!(
        publish[0].secrets.is_empty(),
        "values are sealed by the server"
    );
    let gen = publish[0].generation;

    // The same content again: unchanged, nothing published.
    assert_eq!(
        hub.apply_secrets(vec![v1.clone()], &Default::default(), T0)["db"],
        "unchanged"
    );
    assert!(hub.apply(vec![], T0).1.is_empty());
    // New content: a new revision of the workload, which rolls out; the version before
    // stays (encrypted) while a replica still runs it, and goes once none does.
    let v2 = stored("db", &["password"], "02");
    assert_eq!(
        hub.apply_secrets(vec![v2], &Default::default(), T0)["db"],
        "configured"
    );
    let (_, publish) = hub.apply(vec![], T0);
    assert!(
        publish.is_empty(),
        "nothing switches before the rollout steps"
    );
    assert!(hub.rolling());
    let db = SecretName::try_from("db").unwrap();
    assert_eq!(hub.secret(&db).unwrap().earlier.len(), 1);
    assert_eq!(
        hub.secret_views()[0].behind,
        ["sensor"],
        "a replica still reads 01"
    );
    assert!(hub.secret(&db).unwrap().at("01").is_some());
    report_running(&mut hub);
    let publish = hub.advance_rollouts(T0);
    assert_eq!(publish.len(), 1);
    assert_eq!(publish[0].workloads[0].secrets[0].version, "02");
    assert!(publish[0].generation > gen);
    report_running(&mut hub);
    hub.advance_rollouts(T0);
    assert!(!hub.rolling(), "complete");
    assert!(
        hub.secret(&db).unwrap().earlier.is_empty(),
        "the old value left the store"
    );
    // Dropping the key the stored workload reads is refused.
    let errs = hub.check_secrets(&[], &[(1, &stored("db", &["user"], "03"))]);
    assert!(
        errs[0].message.contains("workload \"sensor\" reads it"),
        "{errs:?}"
    );
    // Two definitions in one apply are refused.
    let errs = hub.check_secrets(&[], &[(1, &v1), (2, &v1)]);
    assert!(errs[0].message.contains("duplicated"), "{errs:?}");

    // In use: not deleted; unused: deleted; gone: not found. Views never hold values.
    assert_eq!(
        hub.delete_secret(&db),
        Err(SecretRefusal::InUse {
            name: db.clone(),
            users: vec!["sensor".into()]
        })
    );
    let view = &hub.secret_views()[0];
    assert_eq!(
        (view.keys.clone(), view.used_by.clone()),
        (vec!["password".to_string()], vec!["sensor".to_string()])
    );
    hub.delete(&WorkloadName::try_from("sensor").unwrap());
    assert_eq!(hub.delete_secret(&db), Ok(()));
    assert_eq!(
        hub.delete_secret(&db),
        Err(SecretRefusal::NotFound(db.clone()))
    );
    assert!(hub.secret_views().is_empty());
}

#[test]
fn apply_places_and_bumps_generations() {
    let mut hub = fleet();
    let a = join(&mut hub, "a", &[("role", "sensor")]);
    assert_eq!(
        a.len(),
        1,
        "a joining device gets its (empty) desired state"
    );
    hub.hello(hello("b", &[]), T0);
    let (outcome, publish) = hub.apply(parse_workloads(M).unwrap(), T0);
    assert_eq!(outcome["web"], "created");
    let by_dev: BTreeMap<String, &DesiredState> = publish
        .iter()
        .map(|d| (d.device_id.to_string(), d))
        .collect();
    assert_eq!(by_dev["a"].workloads.len(), 2, "web-0 + sensor");
    assert_eq!(by_dev["b"].workloads.len(), 1, "web-1");
    assert_eq!(by_dev["a"].generation, 2);

    // Re-applying the same manifest changes nothing and publishes nothing.
    let (outcome, publish) = hub.apply(parse_workloads(M).unwrap(), T0);
    assert_eq!(outcome["web"], "unchanged");
    assert!(publish.is_empty());

    // A device joining later gets the `every` workload.
    let c = join(&mut hub, "c", &[("role", "sensor")]);
    let c = c.iter().find(|d| d.device_id.as_str() == "c").unwrap();
    assert_eq!(c.workloads.len(), 1);
    assert_eq!(c.workloads[0].name.as_str(), "sensor");

    // Delete removes it everywhere.
    let publish = hub
        .delete(&WorkloadName::try_from("sensor").unwrap())
        .unwrap();
    assert_eq!(publish.len(), 2, "a and c");
    assert!(publish
        .iter()
        .all(|d| d.workloads.iter().all(|w| w.name.as_str() != "sensor")));
    assert!(hub
        .delete(&WorkloadName::try_from("sensor").unwrap())
        .is_none());
}

#[test]
fn devices_seen_over_mdns_are_marked_until_they_leave() {
    let mut hub = fleet();
    hub.hello(hello("a", &[]), T0);
    hub.hello(hello("b", &[]), T0);
    let ip: std::net::IpAddr = "10.0.0.7".parse().unwrap();
    hub.mdns_seen(
        "a._shoal-agent._tcp.local.".into(),
        "a".parse().unwrap(),
        vec![ip],
    );
    // A record not (yet) matching a joined device is counted, not shown.
    hub.mdns_seen(
        "c._shoal-agent._tcp.local.".into(),
        "c".parse().unwrap(),
        vec![ip],
    );
    let views = hub.device_views();
    let addrs = |id: &str| {
        views
            .iter()
            .find(|d| d.id == id)
            .unwrap()
            .mdns_addresses
            .clone()
    };
    assert_eq!(addrs("a"), ["10.0.0.7"]);
    assert!(addrs("b").is_empty());
    assert_eq!(hub.mdns_devices(), 2);
    hub.mdns_gone("a._shoal-agent._tcp.local.");
    assert!(hub
        .device_views()
        .iter()
        .all(|d| d.mdns_addresses.is_empty()));
    assert_eq!(hub.mdns_devices(), 1);
}

#[test]
fn state_survives_reopen() {
    let store = std::sync::Arc::new(MemStore::default());

    let mut hub = open_from(&store, false);
    hub.hello(hello("a", &[]), T0);
    hub.apply(parse_workloads(M).unwrap(), T0);
    let before = hub.all_desired();
    save(&mut hub, &store);
    let hub2 = open_from(&store, false);
    assert_eq!(hub2.all_desired(), before);
    assert_eq!(hub2.assignments(), hub.assignments());
}

#[test]
fn each_replica_learns_its_device_and_labels_and_a_relabel_restarts_nothing() {
    let mut hub = fleet();
    join(&mut hub, "a", &[("zone", "north")]);
    join(&mut hub, "b", &[]);
    let m = r#"
apiVersion: shoal.dev/v1
kind: Workload
metadata: { name: meter }
spec:
  placement: every
  wasm: { module: "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" }
  env: { TOPIC: "site/${device.labels.zone}/${device.id}", RAW: "$${device.id}" }
  args: ["--name", "${workload.name}-${replica}"]
"#;
    hub.apply(parse_workloads(m).unwrap(), T0);
    let desired = |hub: &Fleet, d: &str| hub.desired[&id(d)].workloads[0].clone();
    let a = desired(&hub, "a");
    assert_eq!(a.env["TOPIC"], "site/north/a");
    assert_eq!(a.env["RAW"], "${device.id}");
    assert_eq!(a.env["SHOAL_DEVICE_ID"], "a");
    assert_eq!(a.env["SHOAL_WORKLOAD"], "meter");
    assert_eq!(a.env["SHOAL_REVISION"], a.revision);
    assert_eq!(a.env["SHOAL_LABEL_ZONE"], "north");
    assert_eq!(a.args, ["--name", &format!("meter-{}", a.replica)]);
    let b = desired(&hub, "b");
    assert_eq!(
        b.env["TOPIC"], "site//b",
        "a label the device lacks is empty"
    );
    assert!(!b.env.contains_key("SHOAL_LABEL_ZONE"));
    assert_eq!(a.revision, b.revision, "one revision fleet-wide");

    // The operator moves `a` to another zone: its next state says so, same revision (what
    // runs keeps what it started with, as a container keeps its environment).
    let changed = hub.label(&id("a"), &change(&["zone=south"], true)).unwrap();
    assert_eq!(changed.len(), 1);
    let a2 = desired(&hub, "a");
    assert_eq!(a2.env["TOPIC"], "site/south/a");
    assert_eq!(a2.env["SHOAL_LABEL_ZONE"], "south");
    assert_eq!(a2.revision, a.revision);

    // A manifest may not set SHOAL_* itself, nor name an unknown reference.
    let bad = m
        .replace("RAW:", "SHOAL_DEVICE_ID:")
        .replace("${device.id}\"", "${device.name}\"");
    let errs = parse_workloads(&bad).unwrap_err();
    let text = format!("{errs:?}");
    assert!(
        text.contains("\\\"SHOAL_DEVICE_ID\\\" is reserved"),
        "{text}"
    );
    assert!(text.contains("${device.name}"), "{text}");
}

#[test]
fn annotations_are_the_operators_notes_kept_across_hellos_and_reopen() {
    let store = std::sync::Arc::new(MemStore::default());
    let mut hub = open_from(&store, false);
    join(&mut hub, "a", &[("zone", "north")]);
    hub.apply(parse_workloads(M).unwrap(), T0);
    let before = hub.desired.clone();
    let note = LabelChange::parse_as(
        shoal_api::model::labels::Meta::Annotation,
        &["owner=plant 7, line 2", "note=fan replaced"],
        false,
    )
    .unwrap();
    assert!(
        hub.annotate(&id("a"), &note).unwrap().is_empty(),
        "nothing placed again"
    );
    assert_eq!(hub.desired, before);
    let view = |hub: &Fleet| {
        hub.device_views()
            .into_iter()
            .find(|v| v.id == "a")
            .unwrap()
    };
    assert_eq!(view(&hub).annotations["owner"], "plant 7, line 2");
    // A hello (every reconnect) keeps them; so does a reopen from the store.
    hub.hello(hello("a", &[]), T0 + 1);
    assert_eq!(view(&hub).annotations.len(), 2);
    save(&mut hub, &store);
    let hub = open_from(&store, false);
    assert_eq!(view(&hub).annotations["note"], "fan replaced");
    assert!(matches!(
        fleet().annotate(&id("nope"), &note),
        Err(LabelRefusal::UnknownDevice(_))
    ));
}

mod configs;
mod disconnect;
mod forget;
mod jobs;
mod policy;
