//! Configs: checked at apply, resolved per device, rolled out replica by replica when they
//! change, kept while read, and persisted.
use super::*;
use shoal_api::model::ids::ConfigName;
use shoal_api::wire::manifest::parse_stream;
use std::collections::BTreeSet;

const SITE: &str = "apiVersion: shoal.dev/v1
kind: Config
metadata: {name: site}
data: {interval: '5', unit: C}
overrides:
  - selector: {site: berlin}
    data: {interval: 'INTERVAL'}
";

const WEB: &str = "apiVersion: shoal.dev/v1
kind: Workload
metadata: {name: web}
spec:
  replicas: 2
  spread: site
  update: {maxUnavailable: 1}
  wasm: {module: \"sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\"}
  configs:
    - {name: site, env: {INTERVAL: interval}}
    - {name: site, path: /etc/site}
";

fn config(berlin: &str) -> shoal_api::model::config::Config {
    let mut s = parse_stream(&SITE.replace("INTERVAL", berlin)).unwrap();
    s.configs.remove(0).1
}

/// Each device's INTERVAL, by device.
fn intervals(hub: &Fleet) -> BTreeMap<String, String> {
    hub.desired
        .iter()
        .flat_map(|(d, s)| s.workloads.iter().map(move |w| (d, w)))
        .map(|(d, w)| {
            assert_eq!(
                w.configs[0].data["interval"], w.env["INTERVAL"],
                "files and env agree"
            );
            (d.to_string(), w.env["INTERVAL"].clone())
        })
        .collect()
}

fn two_sites(store: &MemStore) -> Fleet {
    let mut hub = open_from(store, false);
    join(&mut hub, "a", &[("site", "berlin")]);
    join(&mut hub, "b", &[("site", "munich")]);
    hub
}

#[test]
fn a_config_reaches_each_device_with_its_values_and_a_change_rolls_out() {
    let store = MemStore::default();
    let mut hub = two_sites(&store);
    let web = parse_workloads(WEB).unwrap();
    let located: Vec<(usize, &Workload)> = web.iter().map(|w| (1, w)).collect();
    let missing = hub.check_configs(&located, &[]);
    assert!(
        missing[0]
            .message
            .contains("config \"site\" does not exist"),
        "{missing:?}"
    );
    let outcome = hub.apply_configs(vec![config("10")], &BTreeSet::new(), T0);
    assert_eq!(outcome["site"], "created");
    assert!(hub.check_configs(&located, &[]).is_empty());
    hub.apply(web.clone(), T0);
    let want: BTreeMap<String, String> =
        [("a".into(), "10".into()), ("b".into(), "5".into())].into();
    assert_eq!(intervals(&hub), want);
    let env_only = &hub.desired[&id("a")].workloads[0].configs[0];
    assert_eq!(env_only.path, None);
    assert_eq!(env_only.data.keys().collect::<Vec<_>>(), ["interval"]);
    let files = &hub.desired[&id("a")].workloads[0].configs[1];
    assert_eq!(files.path.as_deref(), Some("/etc/site"));
    assert_eq!(files.data["unit"], "C");

    // The same config again changes nothing; a new one rolls out one replica at a time.
    let same = hub.apply_configs(vec![config("10")], &BTreeSet::new(), T0);
    assert_eq!(same["site"], "unchanged");
    assert!(!hub.rolling());
    report_running(&mut hub);
    let changed = hub.apply_configs(vec![config("30")], &BTreeSet::new(), T0);
    assert_eq!(changed["site"], "configured");
    let (_, publish) = hub.apply(Vec::new(), T0);
    assert!(
        publish.is_empty(),
        "nothing switches before the rollout steps"
    );
    assert!(hub.rolling());
    // Only berlin's value changed, but the revision pins the whole config: both replicas
    // move, one at a time (maxUnavailable 1).
    report_running(&mut hub);
    let step = hub.advance_rollouts(T0);
    assert_eq!(step.len(), 1, "one device at a time: {step:?}");
    save(&mut hub, &store);
    let mut hub = open_from(&store, false);
    hub.hello(hello("a", &[]), T0);
    hub.hello(hello("b", &[]), T0);
    assert!(hub.rolling(), "the rollout outlives a restart");
    report_running(&mut hub);
    hub.advance_rollouts(T0);
    report_running(&mut hub);
    hub.advance_rollouts(T0);
    assert!(!hub.rolling(), "complete");
    let want: BTreeMap<String, String> =
        [("a".into(), "30".into()), ("b".into(), "5".into())].into();
    assert_eq!(intervals(&hub), want);
    let name = ConfigName::try_from("site").unwrap();
    assert!(
        hub.configs[&name].earlier.is_empty(),
        "no replica reads the earlier version: it is gone"
    );
    // Undo would only re-read the config as it is: refused, saying so.
    let undo = hub.rollout_action(
        &WorkloadName::try_from("web").unwrap(),
        RolloutAction::Undo { to: None },
        T0,
    );
    assert!(
        matches!(undo, Err(WorkloadRefusal::InputsOnly { .. })),
        "{undo:?}"
    );
}

#[test]
fn a_config_keeps_the_keys_its_readers_use_and_stays_while_read() {
    let store = MemStore::default();
    let mut hub = two_sites(&store);
    hub.apply_configs(vec![config("10")], &BTreeSet::new(), T0);
    hub.apply(parse_workloads(WEB).unwrap(), T0);
    let name = ConfigName::try_from("site").unwrap();

    let mut dropped = config("10");
    dropped.data.remove("interval");
    dropped.overrides.clear();
    let errs = hub.check_configs(&[], &[(2, &dropped)]);
    assert!(
        errs[0].to_string().contains(
            "document 2 (config \"site\"): key \"interval\" is missing, but workload \"web\" reads it"
        ),
        "{errs:?}"
    );
    assert!(matches!(
        hub.delete_config(&name),
        Err(ConfigRefusal::InUse { users, .. }) if users == ["web"]
    ));

    let d = hub.describe_config(&name).unwrap();
    let a = d.devices.iter().find(|v| v.device == "a").unwrap();
    assert_eq!(a.values["interval"].value, "10");
    assert_eq!(
        a.values["interval"].from,
        shoal_api::model::config::Source::Override(0)
    );
    assert_eq!(d.users[0].version, d.version);
    assert_eq!(hub.config_views()[0].used_by, ["web"]);

    // Relabelled, a device gets the other site's values.
    hub.label(&id("b"), &change(&["site=berlin"], true))
        .unwrap();
    assert_eq!(intervals(&hub)["b"], "10");

    hub.delete(&WorkloadName::try_from("web").unwrap());
    hub.delete_config(&name).unwrap();
    save(&mut hub, &store);
    assert!(open_from(&store, false).describe_config(&name).is_none());
}
