//! The fleet's policy on privileged containers: refused at apply unless an admin allows it,
//! placed only on devices that allow it too, and never withdrawn from under a workload.
use super::*;
use shoal_api::policy::fleet::{FleetPolicy, Privilege};

const PRIV: &str = "apiVersion: shoal.dev/v1
kind: Workload
metadata: {name: modbus}
spec:
  container:
    image: oci://registry.example/modbus:1@sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
    privileged: true
---
apiVersion: shoal.dev/v1
kind: Workload
metadata: {name: meter}
spec:
  container:
    image: oci://registry.example/modbus:1@sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
    devices: [{path: /dev/ttyUSB0, containerPath: /dev/ttyS0, permissions: rw}]
";

fn container_device(id: &str, allows: &[Privilege]) -> Hello {
    let mut h = hello(id, &[]);
    h.runtimes = vec!["container".into()];
    h.allows = allows.to_vec();
    h
}

#[test]
fn privileged_containers_need_the_fleet_and_the_device() {
    let mut hub = fleet();
    hub.hello(container_device("plain", &[]), T0);
    hub.presence(&id("plain"), true, T0);
    let w = parse_workloads(PRIV).unwrap();
    let located: Vec<(usize, &Workload)> = w.iter().map(|w| (1, w)).collect();
    let errs: Vec<String> = hub
        .check_policy(&located)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs[0].contains("spec.container.privileged is refused by the fleet's policy: an admin allows it with `shoal policy set --allow privileged`"), "{errs:?}");
    assert!(
        errs[1].contains("document 1 (workload \"meter\"): spec.container.devices is refused"),
        "{errs:?}"
    );

    let all = FleetPolicy {
        allow_privileged: true,
        allow_host_devices: true,
    };
    hub.set_policy(all).unwrap();
    assert!(hub.check_policy(&located).is_empty());
    hub.apply(w, T0);
    let name = WorkloadName::try_from("modbus").unwrap();
    // The only device does not allow it: pending, saying why.
    let view = hub.workload_view(&name).unwrap();
    let pending = view.pending_reason.unwrap_or_default();
    assert!(
        pending.contains("1 not allowing host-devices containers")
            || pending.contains("1 not allowing privileged containers"),
        "{pending}"
    );
    assert!(hub.assignments().get(&name).is_none_or(|m| m.is_empty()));
    // A device that allows both gets it.
    hub.hello(
        container_device("rig", &[Privilege::Privileged, Privilege::HostDevices]),
        T0,
    );
    hub.presence(&id("rig"), true, T0);
    assert_eq!(placed(&hub, "modbus"), ["rig"]);
    assert_eq!(placed(&hub, "meter"), ["rig"]);
    // Withdrawing what a workload uses is refused, naming it.
    assert_eq!(
        hub.set_policy(FleetPolicy::default()),
        Err(PolicyRefusal::InUse {
            privilege: Privilege::Privileged,
            users: vec!["modbus".into()]
        })
    );
    assert_eq!(hub.policy(), all);
    hub.delete(&name);
    assert_eq!(
        hub.set_policy(FleetPolicy::default()),
        Err(PolicyRefusal::InUse {
            privilege: Privilege::HostDevices,
            users: vec!["meter".into()]
        })
    );
    hub.delete(&WorkloadName::try_from("meter").unwrap());
    hub.set_policy(FleetPolicy::default()).unwrap();
}

#[test]
fn undo_does_not_bring_back_what_the_policy_no_longer_allows() {
    let mut hub = fleet();
    hub.hello(container_device("rig", &[Privilege::Privileged]), T0);
    hub.presence(&id("rig"), true, T0);
    hub.set_policy(FleetPolicy {
        allow_privileged: true,
        allow_host_devices: false,
    })
    .unwrap();
    let first = PRIV.split("---").next().unwrap();
    hub.apply(parse_workloads(first).unwrap(), T0);
    let confined = first.replace("    privileged: true\n", "");
    hub.apply(parse_workloads(&confined).unwrap(), T0);
    report(&mut hub, |_| Phase::Running);
    hub.advance_rollouts(T0);
    report(&mut hub, |_| Phase::Running);
    hub.advance_rollouts(T0);
    // Nothing uses it now: withdrawn.
    hub.set_policy(FleetPolicy::default()).unwrap();
    let undo = hub.rollout_action(
        &WorkloadName::try_from("modbus").unwrap(),
        RolloutAction::Undo { to: None },
        T0,
    );
    match undo {
        Err(WorkloadRefusal::Policy { reasons, .. }) => {
            assert!(
                reasons[0].contains("spec.container.privileged is refused"),
                "{reasons:?}"
            )
        }
        other => panic!("{other:?}"),
    }
}
