//! `shoal delete device`: refused while the device is online; once it is offline its record,
//! labels and desired state go, durably, and its replicas go elsewhere.
use super::*;

#[test]
fn an_offline_device_is_forgotten_and_its_replicas_move() {
    let store = MemStore::default();
    let mut hub = open_from(&store, false);
    join(&mut hub, "a", &[("zone", "x")]);
    join(&mut hub, "b", &[]);
    hub.presence(&id("a"), true, T0);
    hub.presence(&id("b"), true, T0);
    hub.apply(web(2, "x", "maxUnavailable: 1"), T0);
    assert_eq!(placed(&hub, "web").len(), 2);
    assert!(placed(&hub, "web").contains(&"a".to_string()));

    assert_eq!(
        hub.delete_device(&id("a")),
        Err(DeviceRefusal::Online(id("a")))
    );
    assert_eq!(
        hub.delete_device(&id("nope")),
        Err(DeviceRefusal::NotFound(id("nope")))
    );
    hub.presence(&id("a"), false, T0);
    let generation = hub.desired[&id("a")].generation;
    let publish = hub.delete_device(&id("a")).unwrap();
    assert_eq!(placed(&hub, "web"), ["b", "b"]);
    assert!(hub.labels_of_device(&id("a")).is_none());
    // Its desired state stays, emptied under a newer generation: a board that comes back
    // anyway stops what it ran, and takes the hub's next states.
    let emptied = publish
        .iter()
        .find(|d| d.device_id.as_str() == "a")
        .cloned()
        .unwrap();
    assert!(emptied.workloads.is_empty() && emptied.generation > generation);
    save(&mut hub, &store);
    let mut hub = open_from(&store, false);
    assert!(hub.labels_of_device(&id("a")).is_none(), "gone for good");
    assert!(hub.desired[&id("a")].workloads.is_empty());
    join(&mut hub, "a", &[]);
    hub.presence(&id("a"), true, T0);
    hub.apply(web(3, "x", "maxUnavailable: 1"), T0);
    assert!(
        hub.desired[&id("a")].generation > emptied.generation,
        "it continues"
    );
}
