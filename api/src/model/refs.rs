//! How a workload reads a Secret or a Config (`spec.secrets[]`, `spec.configs[]`): a
//! directory of read-only files, one per key, and environment variables taken from keys.
//! Both kinds share the shape and the rules here; what differs (where values come from,
//! how they travel) lives in [`crate::model::secret`] and [`crate::model::config`].

use crate::model::ids::IdError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One reference, validated: `N` is the referenced object's name type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ref<N> {
    pub name: N,
    /// Directory where each key is a read-only file; `None`: no files (env only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Environment variable → key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// What a workload's references point at: `"secret"` or `"config"`, its field in a spec, and
/// the directory files go to when a reference names neither `path` nor `env`.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub name: &'static str,
    pub field: &'static str,
    pub default_dir: &'static str,
}

/// A path or variables already given by something else of the workload (a volume, another
/// reference), for clash checks.
#[derive(Debug, Clone)]
pub struct Taken {
    pub kind: &'static str,
    pub name: String,
    pub path: Option<String>,
    pub env: Vec<String>,
}

/// Validates one list of references against the workload's own `env` and what is already
/// `taken` (volumes, the other kind's references), pushing every problem to `errs`. Each
/// valid reference is added to `taken`.
pub fn validate<N>(
    kind: Kind,
    wire: Vec<crate::wire::manifest::SecretRef>,
    env: &BTreeMap<String, String>,
    taken: &mut Vec<Taken>,
    errs: &mut Vec<String>,
) -> Vec<Ref<N>>
where
    N: for<'a> TryFrom<&'a str, Error = IdError> + AsRef<str>,
{
    let mut out: Vec<Ref<N>> = Vec::new();
    for (i, r) in wire.into_iter().enumerate() {
        let field = format!("{}[{i}]", kind.field);
        let before = errs.len();
        let name = match N::try_from(r.name.as_str()) {
            Ok(n) => Some(n),
            Err(e) => {
                errs.push(format!("{field}.name: {e}"));
                None
            }
        };
        let path = match (&r.path, r.env.is_empty()) {
            (Some(p), _) => Some(p.clone()),
            (None, true) => Some(format!("{}/{}", kind.default_dir, r.name)),
            (None, false) => None,
        };
        if let Some(p) = &path {
            if let Err(e) = crate::model::volume::check_path(p) {
                errs.push(format!("{field}.path: {e}"));
            } else if let Some((t, q)) = taken.iter().find_map(|t| {
                t.path
                    .as_deref()
                    .filter(|q| crate::model::volume::nested(q, p))
                    .map(|q| (t, q))
            }) {
                errs.push(format!(
                    "{field}.path {p:?} overlaps {} {:?} at {q:?}",
                    t.kind, t.name
                ));
            }
        }
        for (var, key) in &r.env {
            if var.is_empty() || var.contains('=') || var.contains('\0') {
                errs.push(format!(
                    "{field}.env: name {var:?} is invalid: must be non-empty without '=' or NUL"
                ));
            } else if var.starts_with(crate::model::downward::RESERVED_PREFIX) {
                errs.push(format!(
                    "{field}.env: name {var:?} is reserved: Shoal sets the {}* variables",
                    crate::model::downward::RESERVED_PREFIX
                ));
            } else if env.contains_key(var) {
                errs.push(format!(
                    "{field}.env.{var} is also set in spec.env: give it one source"
                ));
            } else if let Some(t) = taken.iter().find(|t| t.env.contains(var)) {
                errs.push(if t.kind == kind.name {
                    format!(
                        "{field}.env.{var} is set by another {} reference too",
                        kind.name
                    )
                } else {
                    format!("{field}.env.{var} is set by {} {:?} too", t.kind, t.name)
                });
            }
            if let Err(e) = crate::model::secret::check_key(key) {
                errs.push(format!("{field}.env.{var}: {e}"));
            }
        }
        if let (Some(name), true) = (name, errs.len() == before) {
            taken.push(Taken {
                kind: kind.name,
                name: name.as_ref().to_string(),
                path: path.clone(),
                env: r.env.keys().cloned().collect(),
            });
            out.push(Ref {
                name,
                path,
                env: r.env,
            });
        }
    }
    out
}

/// What each reference needs that the known objects lack: a missing object, or a key an
/// `env` entry names that the object does not have. `keys_of` gives an object's keys, or
/// `None` when no such object exists.
pub fn unresolved<N: AsRef<str>>(
    kind: Kind,
    refs: &[Ref<N>],
    keys_of: impl Fn(&N) -> Option<Vec<String>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (i, m) in refs.iter().enumerate() {
        let (field, what, name) = (kind.field, kind.name, m.name.as_ref());
        match keys_of(&m.name) {
            None => out.push(format!(
                "{field}[{i}].name: {what} {name:?} does not exist: apply it first (or in the same manifest)"
            )),
            Some(keys) => {
                for (var, key) in &m.env {
                    if !keys.contains(key) {
                        out.push(format!(
                            "{field}[{i}].env.{var}: {what} {name:?} has no key {key:?} (it has {})",
                            keys.join(", ")
                        ));
                    }
                }
            }
        }
    }
    out
}

/// The paths a workload's volumes take, to start [`validate`]'s clash checks from.
pub fn volumes(volumes: &[crate::model::volume::Volume]) -> Vec<Taken> {
    volumes
        .iter()
        .map(|v| Taken {
            kind: "volume",
            name: v.name.clone(),
            path: Some(v.path.clone()),
            env: Vec::new(),
        })
        .collect()
}
