//! Label selectors: which devices a workload may run on.
//!
//! In a manifest, `spec.selector` maps a label key to either a value (equality, as in
//! Kubernetes' `nodeSelector`) or one set-based requirement:
//!
//! ```yaml
//! selector:
//!   role: sensor                      # label role = sensor
//!   zone: { in: [greenhouse, barn] }  # label zone is one of these
//!   tier: { notIn: [test] }           # label tier absent, or not one of these
//!   gpu: { exists: true }             # label gpu present (false: absent)
//! ```
//!
//! [`Requirement`] serializes the same way, so a stored equality selector written before
//! set-based requirements existed still reads back.

use crate::model::ids::{check_label_key, check_label_value};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One label requirement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Requirement {
    /// The label has exactly this value.
    Eq(String),
    Set(SetRequirement),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SetRequirement {
    /// The label has one of these values.
    In(BTreeSet<String>),
    /// The label is absent or has none of these values.
    NotIn(BTreeSet<String>),
    /// The label is present (`true`) or absent (`false`).
    Exists(bool),
}

/// A validated selector: every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Selector(pub BTreeMap<String, Requirement>);

impl Selector {
    /// Equality on every given label (the form `spec.selector` had first).
    pub fn equals(labels: BTreeMap<String, String>) -> Self {
        Self(
            labels
                .into_iter()
                .map(|(k, v)| (k, Requirement::Eq(v)))
                .collect(),
        )
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.first_unmet(labels).is_none()
    }

    /// The first requirement `labels` do not meet, described for people ("zone=a",
    /// "zone in (a,b)", "no tier in (test)", "gpu", "!gpu").
    pub fn first_unmet(&self, labels: &BTreeMap<String, String>) -> Option<String> {
        self.0
            .iter()
            .find(|(k, r)| !r.holds(labels.get(*k).map(String::as_str)))
            .map(|(k, r)| r.describe(k))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Requirement {
    fn holds(&self, value: Option<&str>) -> bool {
        match self {
            Requirement::Eq(want) => value == Some(want.as_str()),
            Requirement::Set(SetRequirement::In(set)) => value.is_some_and(|v| set.contains(v)),
            Requirement::Set(SetRequirement::NotIn(set)) => value.is_none_or(|v| !set.contains(v)),
            Requirement::Set(SetRequirement::Exists(want)) => value.is_some() == *want,
        }
    }

    /// The requirement in selector-string form, e.g. `zone in (a,b)`.
    pub fn describe(&self, key: &str) -> String {
        let list = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(",");
        match self {
            Requirement::Eq(v) => format!("{key}={v}"),
            Requirement::Set(SetRequirement::In(s)) => format!("{key} in ({})", list(s)),
            Requirement::Set(SetRequirement::NotIn(s)) => format!("{key} notin ({})", list(s)),
            Requirement::Set(SetRequirement::Exists(true)) => key.to_string(),
            Requirement::Set(SetRequirement::Exists(false)) => format!("!{key}"),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, r)| r.describe(k)).collect();
        f.write_str(&parts.join(","))
    }
}

/// The manifest form of one selector entry: a value, or an object with exactly one of `in`,
/// `notIn`, `exists`. Kept loose here so that [`validate`] can say precisely what is wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WireRequirement {
    Eq(String),
    Expr(BTreeMap<String, serde_json::Value>),
}

/// Validates a manifest selector, pushing every problem (naming `field`, the key, the bad
/// value and the reason) to `errs`.
pub fn validate(
    field: &str,
    wire: &BTreeMap<String, WireRequirement>,
    errs: &mut Vec<String>,
) -> Selector {
    let mut out = BTreeMap::new();
    for (k, r) in wire {
        if let Err(e) = check_label_key(k) {
            errs.push(format!("{field}: {e}"));
            continue;
        }
        let req = match r {
            WireRequirement::Eq(v) => match check_label_value(v) {
                Ok(()) => Some(Requirement::Eq(v.clone())),
                Err(e) => {
                    errs.push(format!("{field}.{k}: {e}"));
                    None
                }
            },
            WireRequirement::Expr(m) => expr(&format!("{field}.{k}"), m, errs),
        };
        if let Some(req) = req {
            out.insert(k.clone(), req);
        }
    }
    Selector(out)
}

fn expr(
    field: &str,
    m: &BTreeMap<String, serde_json::Value>,
    errs: &mut Vec<String>,
) -> Option<Requirement> {
    if m.len() != 1 {
        let keys: Vec<&String> = m.keys().collect();
        errs.push(format!(
            "{field} {keys:?} is invalid: give a value, or exactly one of in, notIn, exists"
        ));
        return None;
    }
    let (op, v) = m.iter().next()?;
    let values = |errs: &mut Vec<String>| -> Option<BTreeSet<String>> {
        let list = v.as_array().filter(|a| !a.is_empty()).and_then(|a| {
            a.iter()
                .map(|x| x.as_str().map(String::from))
                .collect::<Option<BTreeSet<String>>>()
        });
        match list {
            None => {
                errs.push(format!(
                    "{field}.{op} {v} is invalid: expected a non-empty list of label values"
                ));
                None
            }
            Some(set) => {
                let before = errs.len();
                for value in &set {
                    if let Err(e) = check_label_value(value) {
                        errs.push(format!("{field}.{op}: {e}"));
                    }
                }
                (errs.len() == before).then_some(set)
            }
        }
    };
    match op.as_str() {
        "in" => values(errs).map(|s| Requirement::Set(SetRequirement::In(s))),
        "notIn" => values(errs).map(|s| Requirement::Set(SetRequirement::NotIn(s))),
        "exists" => match v.as_bool() {
            Some(b) => Some(Requirement::Set(SetRequirement::Exists(b))),
            None => {
                errs.push(format!(
                    "{field}.exists {v} is invalid: expected true or false"
                ));
                None
            }
        },
        other => {
            errs.push(format!(
                "{field}: operator {other:?} is invalid: expected in, notIn or exists"
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse(yaml: &str) -> (Selector, Vec<String>) {
        let wire: BTreeMap<String, WireRequirement> = serde_yaml_ng::from_str(yaml).unwrap();
        let mut errs = Vec::new();
        (validate("spec.selector", &wire, &mut errs), errs)
    }

    #[test]
    fn requirements_table() {
        let (s, errs) = parse(
            "role: sensor\nzone: { in: [a, b] }\ntier: { notIn: [test] }\ngpu: { exists: false }\n",
        );
        assert!(errs.is_empty(), "{errs:?}");
        type Labels<'a> = &'a [(&'a str, &'a str)];
        let cases: &[(Labels, Option<&str>)] = &[
            (&[("role", "sensor"), ("zone", "a")], None),
            (&[("role", "sensor"), ("zone", "b"), ("tier", "prod")], None),
            (&[("role", "sensor"), ("zone", "c")], Some("zone in (a,b)")),
            (
                &[("role", "sensor"), ("zone", "a"), ("tier", "test")],
                Some("tier notin (test)"),
            ),
            (
                &[("role", "sensor"), ("zone", "a"), ("gpu", "x")],
                Some("!gpu"),
            ),
            (&[("zone", "a")], Some("role=sensor")),
        ];
        for (l, want) in cases {
            assert_eq!(s.first_unmet(&labels(l)).as_deref(), *want, "{l:?}");
        }
        assert_eq!(
            s.to_string(),
            "gpu,role=sensor,tier notin (test),zone in (a,b)".replace("gpu,", "!gpu,")
        );
    }

    #[test]
    fn stored_equality_selectors_still_read() {
        let s: Selector = serde_json::from_str(r#"{"role":"sensor"}"#).unwrap();
        assert_eq!(s, Selector::equals(labels(&[("role", "sensor")])));
        let round: Selector =
            serde_json::from_str(&serde_json::to_string(&parse("z: { in: [a] }").0).unwrap())
                .unwrap();
        assert_eq!(round, parse("z: { in: [a] }").0);
    }

    #[test]
    fn bad_requirements_are_named() {
        let (_, errs) = parse(
            "a: { in: [] }\nb: { inn: [x] }\nc: { exists: maybe }\nd: { in: [x], notIn: [y] }\n\"bad key\": x\ne: { in: [\"bad value!\"] }\n",
        );
        let all = errs.join("\n");
        for needle in [
            "spec.selector.a.in [] is invalid: expected a non-empty list",
            "spec.selector.b: operator \"inn\" is invalid",
            "spec.selector.c.exists \"maybe\" is invalid",
            "spec.selector.d [\"in\", \"notIn\"] is invalid",
            "spec.selector: label key \"bad key\"",
            "spec.selector.e.in: label value \"bad value!\"",
        ] {
            assert!(all.contains(needle), "{needle} not in:\n{all}");
        }
    }
}
