#![allow(clippy::unwrap_used)]
use super::*;
use crate::wire::manifest::parse_stream;

fn parse(text: &str) -> Result<Config, Vec<String>> {
    match parse_stream(text) {
        Ok(mut s) => Ok(s.configs.remove(0).1),
        Err(es) => Err(es.into_iter().map(|e| e.message).collect()),
    }
}

const SITE: &str = "apiVersion: shoal.dev/v1
kind: Config
metadata: {name: sensor}
data: {interval: '5', port: /dev/ttyUSB0, unit: C}
overrides:
  - device: board-7
    data: {port: /dev/ttyACM0}
  - selector: {site: berlin, floor: '2'}
    data: {interval: '20'}
  - selector: {site: berlin}
    data: {interval: '10', unit: F}
  - selector: {role: {in: [probe]}}
    data: {unit: K}
";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_most_specific_value_wins_key_by_key() {
    let c = parse(SITE).unwrap();
    let id = |s: &str| DeviceId::try_from(s).unwrap();
    // (device, labels) → (interval, port, unit)
    type Row<'a> = (&'a str, &'a [(&'a str, &'a str)], [&'a str; 3]);
    let table: &[Row] = &[
        ("a", &[], ["5", "/dev/ttyUSB0", "C"]),
        ("a", &[("site", "berlin")], ["10", "/dev/ttyUSB0", "F"]),
        // Two requirements beat one, whatever the list order.
        (
            "a",
            &[("site", "berlin"), ("floor", "2")],
            ["20", "/dev/ttyUSB0", "F"],
        ),
        // Equal counts: the later in the list wins.
        (
            "a",
            &[("site", "berlin"), ("role", "probe")],
            ["10", "/dev/ttyUSB0", "K"],
        ),
        // The device's own override beats every selector.
        (
            "board-7",
            &[("site", "berlin")],
            ["10", "/dev/ttyACM0", "F"],
        ),
    ];
    for (dev, l, [interval, port, unit]) in table {
        let v = c.values_for(&id(dev), &labels(l));
        assert_eq!(
            (
                v["interval"].as_str(),
                v["port"].as_str(),
                v["unit"].as_str()
            ),
            (*interval, *port, *unit),
            "{dev} {l:?}"
        );
    }
    let r = c.resolve(&id("board-7"), &labels(&[("site", "berlin")]));
    assert_eq!(r["port"].1, Source::Override(0));
    assert_eq!(r["unit"].1, Source::Override(2));
    assert_eq!(r["interval"].1, Source::Override(2));
    let plain = c.resolve(&id("x"), &BTreeMap::new());
    assert_eq!(plain["unit"].1, Source::Data);
}

#[test]
fn a_config_renders_back_to_the_same_config() {
    let c = parse(SITE).unwrap();
    let text = crate::wire::manifest::to_yaml_stream(&[], &[], std::slice::from_ref(&c)).unwrap();
    assert_eq!(parse(&text).unwrap(), c);
    let mut changed = c.clone();
    changed.overrides[1]
        .data
        .insert("interval".into(), "30".into());
    assert_ne!(changed.version(), c.version());
    assert_eq!(c.version(), parse(SITE).unwrap().version());
}

#[test]
fn bad_configs_name_every_problem() {
    let text = "apiVersion: shoal.dev/v1
kind: Config
metadata: {name: Bad_Name}
data: {'../x': a, ok: \"a\\0b\"}
overrides:
  - data: {ok: b}
  - device: a
    selector: {x: y}
    data: {ok: c}
  - selector: {}
    data: {ok: d}
  - device: board-1
    data: {extra: e}
  - device: board-1
    data: {}
";
    let errs = parse(text).unwrap_err().join("\n");
    for want in [
        "metadata.name: config name \"Bad_Name\" is invalid",
        "data: key \"../x\" is invalid",
        "data.ok: the value contains NUL",
        "overrides[0]: give device or selector",
        "overrides[1]: give device or selector, not both",
        "overrides[2].selector is empty",
        "overrides[3].data.extra: key \"extra\" is not in data",
        "overrides[4]: device board-1 is given already in overrides[3]",
        "overrides[4].data is empty",
    ] {
        assert!(errs.contains(want), "missing {want:?} in:\n{errs}");
    }
    let unknown = "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {name: a}\ndata: {k: v}\nbinaryData: {}\n";
    let errs = parse(unknown).unwrap_err().join("\n");
    assert!(errs.contains("unknown field `binaryData`"), "{errs}");
    // Scalars are their text (as in spec.env); a mapping is not a value.
    let number = "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {name: a}\ndata: {k: 5}\n";
    assert_eq!(parse(number).unwrap().data["k"], "5");
    let nested = "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {name: a}\ndata: {k: {x: 1}}\n";
    let errs = parse(nested).unwrap_err().join("\n");
    assert!(
        errs.contains("data.k") || errs.contains("expected a string"),
        "{errs}"
    );
    let big = format!(
        "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {{name: a}}\ndata: {{k: {}}}\n",
        "x".repeat(MAX_CONFIG_BYTES)
    );
    assert!(parse(&big).unwrap_err()[0].contains("at most 65536"));
    // Escapes count as stored: 20k control characters take 120k bytes.
    let escaped = format!(
        "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {{name: a}}\ndata: {{k: \"{}\"}}\n",
        "\\x01".repeat(20_000)
    );
    assert!(parse(&escaped).unwrap_err()[0].contains("as stored: at most 65536"));
    // Too many overrides is said at once, without comparing them all.
    let many: String = (0..MAX_OVERRIDES + 1)
        .map(|i| format!("  - {{device: d{i}, data: {{k: v}}}}\n"))
        .collect();
    let text = format!(
        "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {{name: a}}\ndata: {{k: v}}\noverrides:\n{many}"
    );
    let errs = parse(&text).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("at most 256"));
}

#[test]
fn a_replica_gets_its_devices_values_as_files_and_env() {
    let c = parse(SITE).unwrap();
    let mut errs = Vec::new();
    let wire = |name: &str, path: Option<&str>, env: &[(&str, &str)]| SecretRef {
        name: name.into(),
        path: path.map(str::to_string),
        env: env
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
    };
    let mounts = validate_mounts(
        vec![
            wire("sensor", None, &[]),
            wire("sensor", Some("/etc/s"), &[("INTERVAL", "interval")]),
        ],
        &BTreeMap::new(),
        &mut Vec::new(),
        &mut errs,
    );
    assert!(errs.is_empty(), "{errs:?}");
    let dev = DeviceId::try_from("board-7").unwrap();
    let (files, env) = for_device(&mounts, |_| Some(&c), &dev, &labels(&[("site", "berlin")]));
    assert_eq!(files[0].path.as_deref(), Some("/run/configs/sensor"));
    assert_eq!(files[1].path.as_deref(), Some("/etc/s"));
    assert_eq!(files[0].data["port"], "/dev/ttyACM0");
    assert_eq!(env["INTERVAL"], "10");

    // A config's variable may not clash with a secret's or a volume's path.
    let mut taken = crate::model::refs::volumes(&[crate::model::volume::Volume {
        name: "data".into(),
        path: "/data".into(),
    }]);
    taken.push(crate::model::refs::Taken {
        kind: "secret",
        name: "db".into(),
        path: None,
        env: vec!["INTERVAL".into()],
    });
    let mut errs = Vec::new();
    validate_mounts(
        vec![
            wire("sensor", Some("/data/x"), &[]),
            wire("other", None, &[("INTERVAL", "interval")]),
        ],
        &BTreeMap::new(),
        &mut taken,
        &mut errs,
    );
    let all = errs.join("\n");
    assert!(
        all.contains("spec.configs[0].path \"/data/x\" overlaps volume \"data\""),
        "{all}"
    );
    assert!(
        all.contains("spec.configs[1].env.INTERVAL is set by secret \"db\" too"),
        "{all}"
    );
    let missing = unresolved(&mounts, |_| Some(vec!["port".into()]));
    assert!(
        missing[0].contains("config \"sensor\" has no key \"interval\""),
        "{missing:?}"
    );
}
