//! Every manifest in `examples/` parses and validates: the examples are documentation, and
//! documentation that is refused teaches nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn every_example_manifest_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        if !text.contains("apiVersion: shoal.dev/v1") {
            continue;
        }
        let stream = shoal_api::wire::manifest::parse_stream(&text)
            .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        shoal_api::model::workload::validate_all(stream.workloads)
            .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        seen += 1;
    }
    assert!(
        seen >= 3,
        "only {seen} example manifests found in {}",
        dir.display()
    );
}
