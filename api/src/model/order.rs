//! Start order on a device (`spec.after`): a replica waits (phase `Waiting`, with the
//! reason) until a replica of each named workload **on the same device** meets its
//! condition: `Running` (the default), `Healthy` (running and its probe passed, or running
//! when it has no probe) or `Succeeded` (a job's run finished well). Once started, a
//! dependent keeps running when its dependency fails later, unless that entry says
//! `restartWith: true`: then it is stopped and waits again.
//!
//! Checked at apply: names, duplicates, the workload itself, and cycles across everything
//! the fleet would then hold ([`cycle`]), named in the error.

use crate::model::ids::WorkloadName;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most entries `spec.after` may have.
pub const MAX_AFTER: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    Running,
    Healthy,
    Succeeded,
}

/// One `spec.after` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct After {
    pub workload: WorkloadName,
    pub condition: Condition,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restart_with: bool,
}

/// Validates `spec.after` of workload `me` (when its name is valid).
pub fn validate(
    wire: Vec<crate::wire::manifest::AfterSpec>,
    me: Option<&WorkloadName>,
    errs: &mut Vec<String>,
) -> Vec<After> {
    if wire.len() > MAX_AFTER {
        errs.push(format!(
            "spec.after has {} entries: at most {MAX_AFTER} are allowed",
            wire.len()
        ));
        return Vec::new();
    }
    let mut out: Vec<After> = Vec::new();
    for (i, a) in wire.into_iter().enumerate() {
        let field = format!("spec.after[{i}]");
        let name = match WorkloadName::try_from(a.workload.as_str()) {
            Ok(n) => n,
            Err(e) => {
                errs.push(format!("{field}.workload: {e}"));
                continue;
            }
        };
        let condition = match a.condition.as_deref() {
            None | Some("Running") => Condition::Running,
            Some("Healthy") => Condition::Healthy,
            Some("Succeeded") => Condition::Succeeded,
            Some(other) => {
                errs.push(format!(
                    "{field}.condition {other:?} is invalid: expected Running, Healthy or Succeeded"
                ));
                continue;
            }
        };
        if Some(&name) == me {
            errs.push(format!(
                "{field}.workload {:?} is invalid: a workload cannot wait for itself",
                name.as_str()
            ));
            continue;
        }
        if let Some(j) = out.iter().position(|o| o.workload == name) {
            errs.push(format!(
                "{field}.workload {:?} is named already in spec.after[{j}]",
                name.as_str()
            ));
            continue;
        }
        out.push(After {
            workload: name,
            condition,
            restart_with: a.restart_with.unwrap_or(false),
        });
    }
    out
}

/// A cycle in the "waits for" graph (`edges`: workload → the workloads it waits for), as
/// the names along it with the first repeated at the end (`a → b → a`); the one found
/// first in name order. `None`: there is none.
pub fn cycle(edges: &BTreeMap<&WorkloadName, Vec<&WorkloadName>>) -> Option<Vec<WorkloadName>> {
    // Iterative depth-first search with colours: 0 unvisited, 1 on the path, 2 done.
    let mut colour: BTreeMap<&WorkloadName, u8> = BTreeMap::new();
    for &start in edges.keys() {
        if colour.get(start).copied().unwrap_or(0) != 0 {
            continue;
        }
        let mut path: Vec<(&WorkloadName, usize)> = vec![(start, 0)];
        colour.insert(start, 1);
        while let Some((node, next)) = path.last().copied() {
            let deps = edges.get(node).map(Vec::as_slice).unwrap_or(&[]);
            if let Some(&dep) = deps.get(next) {
                if let Some(top) = path.last_mut() {
                    top.1 += 1;
                }
                match colour.get(dep).copied().unwrap_or(0) {
                    0 => {
                        colour.insert(dep, 1);
                        path.push((dep, 0));
                    }
                    1 => {
                        let from = path.iter().position(|(n, _)| *n == dep).unwrap_or(0);
                        let mut c: Vec<WorkloadName> =
                            path[from..].iter().map(|(n, _)| (*n).clone()).collect();
                        c.push(dep.clone());
                        return Some(c);
                    }
                    _ => {}
                }
            } else {
                colour.insert(node, 2);
                path.pop();
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::manifest::AfterSpec;

    fn n(s: &str) -> WorkloadName {
        WorkloadName::try_from(s).unwrap()
    }

    #[test]
    fn entries_are_checked_each_naming_field_and_value() {
        let spec = |w: &str, c: Option<&str>| AfterSpec {
            workload: w.into(),
            condition: c.map(Into::into),
            restart_with: None,
        };
        let mut errs = Vec::new();
        let got = validate(
            vec![
                spec("broker", None),
                spec("Bad_Name", None),
                spec("db", Some("Ready")),
                spec("app", None),
                spec("broker", Some("Healthy")),
                spec("init", Some("Succeeded")),
            ],
            Some(&n("app")),
            &mut errs,
        );
        assert_eq!(
            got.iter()
                .map(|a| (a.workload.as_str(), a.condition))
                .collect::<Vec<_>>(),
            [
                ("broker", Condition::Running),
                ("init", Condition::Succeeded)
            ]
        );
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs[0].starts_with("spec.after[1].workload: "), "{errs:?}");
        assert!(errs[1].starts_with("spec.after[2].condition \"Ready\" is invalid"));
        assert!(errs[2].contains("cannot wait for itself"));
        assert!(errs[3].contains("is named already in spec.after[0]"));
    }

    #[test]
    fn cycles_are_found_and_named() {
        let (a, b, c, d) = (n("a"), n("b"), n("c"), n("d"));
        let chain: BTreeMap<&WorkloadName, Vec<&WorkloadName>> =
            [(&a, vec![&b]), (&b, vec![&c]), (&d, vec![&c])].into();
        assert_eq!(cycle(&chain), None);
        let looped: BTreeMap<&WorkloadName, Vec<&WorkloadName>> =
            [(&a, vec![&b]), (&b, vec![&c]), (&c, vec![&d, &a])].into();
        let got: Vec<String> = cycle(&looped)
            .unwrap()
            .iter()
            .map(|x| x.to_string())
            .collect();
        assert_eq!(got, ["a", "b", "c", "a"]);
        // A diamond is no cycle.
        let diamond: BTreeMap<&WorkloadName, Vec<&WorkloadName>> =
            [(&a, vec![&b, &c]), (&b, vec![&d]), (&c, vec![&d])].into();
        assert_eq!(cycle(&diamond), None);
    }
}
