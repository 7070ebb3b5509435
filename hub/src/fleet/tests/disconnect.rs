//! `spec.disconnect` in the fleet: a workload's own `lostAfter` decides when its replicas
//! leave a silent device (later or sooner than the hub's grace), `replace: false` keeps them
//! there, and a device heard again is no longer lost for anyone.
use super::*;
use shoal_api::model::workload::parse_workloads;

const MODULE: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

fn workload(name: &str, disconnect: &str) -> Vec<Workload> {
    parse_workloads(&format!(
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: {name} }}\nspec:\n  wasm: {{ module: \"{MODULE}\" }}\n{disconnect}"
    ))
    .unwrap()
}

fn on(hub: &Fleet, w: &str) -> Vec<String> {
    hub.assignments()
        .get(&WorkloadName::try_from(w).unwrap())
        .map(|m| m.values().map(|d| d.to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn each_workload_waits_for_a_silent_device_as_long_as_it_says() {
    let mut hub = fleet();
    hub.hello(hello("a", &[]), T0);
    let mut all = workload("web", "");
    all.extend(workload(
        "valve",
        "  disconnect: { lostAfter: 60s, stopAfter: 5s }\n",
    ));
    all.extend(workload("store", "  disconnect: { replace: false }\n"));
    all.extend(workload("quick", "  disconnect: { lostAfter: 20s }\n"));
    all.extend(workload(
        "guard",
        "  disconnect: { lostAfter: 20s, stopAfter: 5s }\n",
    ));
    hub.apply(all, T0);
    hub.hello(hello("b", &[]), T0);
    for w in ["web", "valve", "store", "quick"] {
        assert_eq!(on(&hub, w), ["a"], "{w}");
    }
    // b keeps talking; a falls silent at T0.
    let b: DeviceId = "b".parse().unwrap();
    let heard_b = |hub: &mut Fleet, t: u64| hub.reported(&b, t);
    heard_b(&mut hub, T0 + 21_000);
    hub.check_lost(T0 + 21_000, 30_000);
    assert_eq!(
        on(&hub, "quick"),
        ["b"],
        "its own 20s passed, the hub's grace not"
    );
    // a never confirmed the desired state that tells it to stop the guard: its short
    // wait does not hold, a device is waited for as long as for any workload.
    assert_eq!(on(&hub, "guard"), ["a"]);
    assert_eq!(on(&hub, "web"), ["a"]);
    heard_b(&mut hub, T0 + 31_000);
    hub.check_lost(T0 + 31_000, 30_000);
    assert_eq!(on(&hub, "web"), ["b"], "the hub's grace passed");
    assert_eq!(on(&hub, "guard"), ["b"]);
    assert_eq!(on(&hub, "valve"), ["a"], "its own lostAfter has not");
    assert_eq!(on(&hub, "store"), ["a"]);
    heard_b(&mut hub, T0 + 61_000);
    hub.check_lost(T0 + 61_000, 30_000);
    assert_eq!(on(&hub, "valve"), ["b"]);
    assert_eq!(on(&hub, "store"), ["a"], "replace: false never moves");
    // The valve's desired state on b carries stopAfter for b's agent.
    let d = &hub.desired[&b];
    let valve = d
        .workloads
        .iter()
        .find(|w| w.name.as_str() == "valve")
        .unwrap();
    assert_eq!(valve.stop_after_ms, Some(5_000));
    // a speaks again: lost for nobody; nothing moves back (placement is stable).
    let a: DeviceId = "a".parse().unwrap();
    hub.reported(&a, T0 + 70_000);
    hub.check_lost(T0 + 70_000, 30_000);
    assert!(hub.live[&a].lost_for.is_empty());
    assert_eq!(on(&hub, "valve"), ["b"]);
    assert_eq!(on(&hub, "store"), ["a"]);
}
