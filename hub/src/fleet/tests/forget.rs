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
    let publish = hub.delete_device(&id("a")).unwrap();
    assert!(
        publish.iter().all(|d| d.device_id.as_str() == "b"),
        "{publish:?}"
    );
    assert_eq!(placed(&hub, "web"), ["b", "b"]);
    assert!(hub.labels_of_device(&id("a")).is_none());
    assert!(!hub.desired.contains_key(&id("a")));
    save(&mut hub, &store);
    let hub = open_from(&store, false);
    assert!(hub.labels_of_device(&id("a")).is_none(), "gone for good");
    assert!(!hub.desired.contains_key(&id("a")));
}
