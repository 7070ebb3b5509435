//! What a replica learns about where it runs (like Kubernetes' downward API): the variables
//! every replica gets ([`env`]) and the references a manifest may write in `spec.env` values
//! and `spec.args` ([`check`], [`expand`]).
//!
//! Every replica gets `SHOAL_DEVICE_ID`, `SHOAL_WORKLOAD`, `SHOAL_REPLICA`, `SHOAL_REVISION`,
//! and one `SHOAL_LABEL_{KEY}` per operator label of its device (the key upper-cased, every
//! character but a letter or digit made `_`: `zone` → `SHOAL_LABEL_ZONE`,
//! `example.com/site` → `SHOAL_LABEL_EXAMPLE_COM_SITE`; of two keys that meet, the later in
//! key order wins). A manifest may not set `SHOAL_*` variables itself.
//!
//! References: `${device.id}`, `${device.labels.KEY}` (empty where the device has no such
//! label: select on it to be sure it has one), `${workload.name}`, `${replica}`,
//! `${revision}`; `$${` is a literal `${`. Any other `${device.…}`, `${workload.…}`,
//! `${replica…}` or `${revision…}` is refused at apply (a misspelt reference); other `${…}`
//! (a shell's `${HOME}`) is left as it is. Only `env` values and `args` are expanded (not
//! `container.command`).
//!
//! Values are fixed for a replica when it is placed and started, as Kubernetes fixes a
//! container's environment: relabelling a device gives its replicas the new values when they
//! are next replaced (a new revision), not at a crash restart, and restarts nothing by
//! itself.

use std::collections::BTreeMap;

/// Variables Shoal sets; a manifest's `spec.env` may not name one.
pub const RESERVED_PREFIX: &str = "SHOAL_";

/// Where one replica runs: what references expand to.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub device: &'a str,
    /// The device's operator labels (the ones placement sees).
    pub labels: &'a BTreeMap<String, String>,
    pub workload: &'a str,
    pub replica: u32,
    pub revision: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ref {
    DeviceId,
    Label(String),
    Workload,
    Replica,
    Revision,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Ref(Ref),
}

/// What a Shoal reference starts with; any other `${…}` (a shell's `${HOME}`, `${PORT:-80}`)
/// is left as it is.
const RESERVED_REFS: &[&str] = &["device.", "workload.", "replica", "revision"];

/// Splits `s` into text and references; the error names the bad reference.
fn parse(s: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        text.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            text.push_str("${");
            rest = tail;
        } else if let Some(tail) = after
            .strip_prefix('{')
            .filter(|t| RESERVED_REFS.iter().any(|r| t.starts_with(r)))
        {
            let end = tail
                .find('}')
                .ok_or_else(|| format!("\"${{{tail}\" is not closed with '}}'"))?;
            let name = &tail[..end];
            let r = match name {
                "device.id" => Ref::DeviceId,
                "workload.name" => Ref::Workload,
                "replica" => Ref::Replica,
                "revision" => Ref::Revision,
                _ => match name.strip_prefix("device.labels.") {
                    Some(key) if crate::model::ids::check_label_key(key).is_ok() => {
                        Ref::Label(key.to_string())
                    }
                    _ => {
                        return Err(format!(
                            "\"${{{name}}}\" is not a known reference: expected ${{device.id}}, ${{device.labels.KEY}}, ${{workload.name}}, ${{replica}} or ${{revision}} (write $${{ for a literal ${{)"
                        ))
                    }
                },
            };
            if !text.is_empty() {
                out.push(Piece::Text(std::mem::take(&mut text)));
            }
            out.push(Piece::Ref(r));
            rest = &tail[end + 1..];
        } else {
            text.push('$');
            rest = after;
        }
    }
    text.push_str(rest);
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    Ok(out)
}

/// Checks the references in `spec.env` values and `spec.args`, and that `spec.env` sets no
/// `SHOAL_*` variable.
pub fn check(env: &BTreeMap<String, String>, args: &[String], errs: &mut Vec<String>) {
    for (k, v) in env {
        if k.starts_with(RESERVED_PREFIX) {
            errs.push(format!(
                "spec.env: name {k:?} is reserved: Shoal sets the {RESERVED_PREFIX}* variables (SHOAL_DEVICE_ID, SHOAL_LABEL_ZONE, …)"
            ));
        }
        if let Err(e) = parse(v) {
            errs.push(format!("spec.env.{k}: {e}"));
        }
    }
    for (i, a) in args.iter().enumerate() {
        if let Err(e) = parse(a) {
            errs.push(format!("spec.args[{i}]: {e}"));
        }
    }
}

/// `s` with its references expanded for `ctx` (a value that does not parse, which a stored
/// workload never has, is left as it is).
pub fn expand(s: &str, ctx: &Context<'_>) -> String {
    let Ok(pieces) = parse(s) else {
        return s.to_string();
    };
    let mut out = String::with_capacity(s.len());
    for p in pieces {
        match p {
            Piece::Text(t) => out.push_str(&t),
            Piece::Ref(Ref::DeviceId) => out.push_str(ctx.device),
            Piece::Ref(Ref::Label(k)) => {
                out.push_str(ctx.labels.get(&k).map(String::as_str).unwrap_or(""))
            }
            Piece::Ref(Ref::Workload) => out.push_str(ctx.workload),
            Piece::Ref(Ref::Replica) => out.push_str(&ctx.replica.to_string()),
            Piece::Ref(Ref::Revision) => out.push_str(ctx.revision),
        }
    }
    out
}

/// The variables every replica gets (see the module docs).
pub fn env(ctx: &Context<'_>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::from([
        ("SHOAL_DEVICE_ID".to_string(), ctx.device.to_string()),
        ("SHOAL_WORKLOAD".to_string(), ctx.workload.to_string()),
        ("SHOAL_REPLICA".to_string(), ctx.replica.to_string()),
        ("SHOAL_REVISION".to_string(), ctx.revision.to_string()),
    ]);
    for (k, v) in ctx.labels {
        out.insert(label_env(k), v.clone());
    }
    out
}

/// `SHOAL_LABEL_{KEY}` for label `key`.
pub fn label_env(key: &str) -> String {
    let k: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("SHOAL_LABEL_{k}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(labels: &BTreeMap<String, String>) -> Context<'_> {
        Context {
            device: "edge-1",
            labels,
            workload: "meter",
            replica: 2,
            revision: "abc123",
        }
    }

    #[test]
    fn references_expand_per_device_and_literals_stay() {
        let labels = BTreeMap::from([("zone".to_string(), "north".to_string())]);
        let c = ctx(&labels);
        let table = [
            (
                "site/${device.labels.zone}/${device.id}",
                "site/north/edge-1",
            ),
            ("${workload.name}-${replica}@${revision}", "meter-2@abc123"),
            ("${device.labels.floor}", ""),
            (
                "$HOME and $$ and $${device.id}",
                "$HOME and $$ and ${device.id}",
            ),
            ("cost: 5$", "cost: 5$"),
            ("plain", "plain"),
            // A shell's own references are left alone.
            (
                "${HOME}/x ${PORT:-80} ${unclosed",
                "${HOME}/x ${PORT:-80} ${unclosed",
            ),
        ];
        for (input, want) in table {
            assert_eq!(expand(input, &c), want, "{input}");
        }
    }

    #[test]
    fn unknown_references_and_reserved_names_are_refused_by_name() {
        let env = BTreeMap::from([
            ("TOPIC".to_string(), "${device.name}".to_string()),
            ("SHOAL_DEVICE_ID".to_string(), "x".to_string()),
            ("OK".to_string(), "${device.labels.zone} $${x}".to_string()),
        ]);
        let mut errs = Vec::new();
        check(
            &env,
            &[
                "${replica".to_string(),
                "${device.labels.bad key}".to_string(),
            ],
            &mut errs,
        );
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(
            errs[0].starts_with("spec.env: name \"SHOAL_DEVICE_ID\" is reserved"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("spec.env.TOPIC: \"${device.name}\" is not a known reference"),
            "{errs:?}"
        );
        assert_eq!(
            errs[2],
            "spec.args[0]: \"${replica\" is not closed with '}'"
        );
        assert!(
            errs[3].starts_with("spec.args[1]: \"${device.labels.bad key}\""),
            "{errs:?}"
        );
    }

    #[test]
    fn every_replica_learns_its_device_workload_and_labels() {
        let labels = BTreeMap::from([
            ("zone".to_string(), "north".to_string()),
            ("example.com/site".to_string(), "plant-7".to_string()),
        ]);
        let e = env(&ctx(&labels));
        assert_eq!(e["SHOAL_DEVICE_ID"], "edge-1");
        assert_eq!(e["SHOAL_WORKLOAD"], "meter");
        assert_eq!(e["SHOAL_REPLICA"], "2");
        assert_eq!(e["SHOAL_REVISION"], "abc123");
        assert_eq!(e["SHOAL_LABEL_ZONE"], "north");
        assert_eq!(e["SHOAL_LABEL_EXAMPLE_COM_SITE"], "plant-7");
        assert_eq!(e.len(), 6);
    }
}
