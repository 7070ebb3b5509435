//! Device labels: who sets them, and the edits an operator makes.
//!
//! Labels steer placement (selectors, spread), and secrets follow placement, so they are the
//! operator's word, never the device's: a device's effective labels are the ones its join
//! token bound at enrollment (`shoal-hub token create --labels`) and the ones set on the hub
//! (`shoal label device D k=v`, `k-`, `--overwrite`, as `kubectl label`). What a device
//! reports in its hello (`shoal-agent run --labels`) is a request, shown beside them and
//! granted only where the operator granted the same. Keys under [`RESERVED_PREFIX`] are set
//! by operators only (a hub that trusts reports, `--insecure`, still drops them).
//!
//! Annotations (`shoal annotate device D k=text`) are edited the same way ([`Meta`]): free
//! text for people and tools (who owns the board, where it hangs, what was replaced), which
//! steers nothing.
//!
//! Pure: the hub keeps the labels, the CLI sends the edits.

use crate::model::ids::{check_label_key, check_label_value, IdError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Label key → value.
pub type Labels = BTreeMap<String, String>;

/// Keys under this prefix are the operator's alone.
pub const RESERVED_PREFIX: &str = "shoal.dev/";

/// Most labels a device has (set by operators) or reports.
pub const MAX_LABELS: usize = 64;

/// Most annotations a device has.
pub const MAX_ANNOTATIONS: usize = 64;
/// Longest annotation value, in bytes.
pub const MAX_ANNOTATION_BYTES: usize = 4096;
/// Most bytes of all of a device's annotations (keys and values): they live in its record,
/// which every hello rewrites.
pub const MAX_ANNOTATIONS_TOTAL: usize = 16 * 1024;

/// What a [`LabelChange`] edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meta {
    /// Labels: placement selects on them; values are label values.
    Label,
    /// Annotations: free text (no NUL, at most [`MAX_ANNOTATION_BYTES`]), steering nothing.
    Annotation,
}

impl Meta {
    pub fn name(self) -> &'static str {
        match self {
            Meta::Label => "label",
            Meta::Annotation => "annotation",
        }
    }

    fn max(self) -> usize {
        match self {
            Meta::Label => MAX_LABELS,
            Meta::Annotation => MAX_ANNOTATIONS,
        }
    }

    fn check_value(self, key: &str, v: &str) -> Result<(), LabelError> {
        match self {
            Meta::Label => Ok(check_label_value(v)?),
            Meta::Annotation if v.len() > MAX_ANNOTATION_BYTES => Err(LabelError::Value {
                key: key.to_string(),
                reason: format!("is longer than {MAX_ANNOTATION_BYTES} bytes"),
            }),
            Meta::Annotation if v.contains('\0') => Err(LabelError::Value {
                key: key.to_string(),
                reason: "contains NUL".to_string(),
            }),
            Meta::Annotation => Ok(()),
        }
    }
}

/// Whether `key` is under [`RESERVED_PREFIX`].
pub fn is_reserved(key: &str) -> bool {
    key.starts_with(RESERVED_PREFIX)
}

/// The labels of `reported` a device may ask for at all (none under the reserved prefix).
pub fn requestable(reported: &Labels) -> Labels {
    reported
        .iter()
        .filter(|(k, _)| !is_reserved(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// What of `reported` is not in `effective` (asked for, not granted), for views and logs.
pub fn ungranted(reported: &Labels, effective: &Labels) -> Labels {
    reported
        .iter()
        .filter(|(k, v)| effective.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error(transparent)]
    Invalid(#[from] IdError),
    #[error(
        "{what} {key:?} already has the value {current:?}: pass --overwrite to set it to {wanted:?}"
    )]
    Exists {
        what: &'static str,
        key: String,
        current: String,
        wanted: String,
    },
    #[error("{0} {1:?} is both set and removed in one change")]
    SetAndRemoved(&'static str, String),
    #[error("{0} change {1:?} is invalid: expected KEY=VALUE to set or KEY- to remove")]
    Syntax(&'static str, String),
    #[error("no {0} changes given: expected KEY=VALUE to set or KEY- to remove")]
    Empty(&'static str),
    #[error("{1} {0}s are too many: a device has at most {2}")]
    TooMany(&'static str, usize, usize),
    #[error("annotations of {0} bytes are too many: a device has at most {MAX_ANNOTATIONS_TOTAL}")]
    Size(usize),
    /// An annotation's value (not quoted: it may be long).
    #[error("annotation {key:?}: the value {reason}")]
    Value { key: String, reason: String },
}

/// An operator's change to a device's labels (`POST /v1/devices/{id}/labels`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelChange {
    /// Labels to set.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: Labels,
    /// Keys to remove (absent ones are no error).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
    /// Whether a label that has another value may be changed.
    #[serde(default)]
    pub overwrite: bool,
}

impl LabelChange {
    /// From the CLI's words: `KEY=VALUE` sets, `KEY-` removes.
    pub fn parse<S: AsRef<str>>(words: &[S], overwrite: bool) -> Result<Self, LabelError> {
        Self::parse_as(Meta::Label, words, overwrite)
    }

    /// [`LabelChange::parse`] for labels or annotations.
    pub fn parse_as<S: AsRef<str>>(
        meta: Meta,
        words: &[S],
        overwrite: bool,
    ) -> Result<Self, LabelError> {
        let mut c = LabelChange {
            overwrite,
            ..LabelChange::default()
        };
        for w in words {
            let w = w.as_ref();
            if let Some((k, v)) = w.split_once('=') {
                c.set.insert(k.to_string(), v.to_string());
            } else if let Some(k) = w.strip_suffix('-').filter(|k| !k.is_empty()) {
                c.remove.push(k.to_string());
            } else {
                return Err(LabelError::Syntax(meta.name(), w.to_string()));
            }
        }
        c.check_as(meta)?;
        Ok(c)
    }

    /// Checks every key and value, and that the change says something.
    pub fn check(&self) -> Result<(), LabelError> {
        self.check_as(Meta::Label)
    }

    /// [`LabelChange::check`] for labels or annotations.
    pub fn check_as(&self, meta: Meta) -> Result<(), LabelError> {
        if self.set.is_empty() && self.remove.is_empty() {
            return Err(LabelError::Empty(meta.name()));
        }
        for (k, v) in &self.set {
            check_label_key(k)?;
            meta.check_value(k, v)?;
        }
        for k in &self.remove {
            check_label_key(k)?;
            if self.set.contains_key(k) {
                return Err(LabelError::SetAndRemoved(meta.name(), k.clone()));
            }
        }
        Ok(())
    }

    /// `current` with this change made; nothing is changed if any part is refused.
    pub fn apply(&self, current: &Labels) -> Result<Labels, LabelError> {
        self.apply_as(Meta::Label, current)
    }

    /// [`LabelChange::apply`] for labels or annotations.
    pub fn apply_as(&self, meta: Meta, current: &Labels) -> Result<Labels, LabelError> {
        self.check_as(meta)?;
        let mut out = current.clone();
        for (k, v) in &self.set {
            match current.get(k) {
                Some(old) if old != v && !self.overwrite => {
                    return Err(LabelError::Exists {
                        what: meta.name(),
                        key: k.clone(),
                        current: old.clone(),
                        wanted: v.clone(),
                    })
                }
                _ => {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
        for k in &self.remove {
            out.remove(k);
        }
        if out.len() > meta.max() {
            return Err(LabelError::TooMany(meta.name(), out.len(), meta.max()));
        }
        let total: usize = out.iter().map(|(k, v)| k.len() + v.len()).sum();
        if meta == Meta::Annotation && total > MAX_ANNOTATIONS_TOTAL {
            return Err(LabelError::Size(total));
        }
        Ok(out)
    }
}

/// What a join token granted the device it enrolled, as the hub's enrollment book keeps it
/// (written with the claim, before the certificate goes out). The leader applies each grant
/// once (by token), whoever tells it of the enrollment: it reads grants from the book, never
/// from a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    /// The token's id.
    pub token: String,
    #[serde(default)]
    pub labels: Labels,
    /// Granted by an unbound token, which enrolls only ids with no enrollment record: a new
    /// identity, whose labels replace any the hub kept for that id. A bound token (the
    /// operator's choice of device) adds to them.
    #[serde(default)]
    pub fresh: bool,
}

/// Checks labels an operator binds to a join token (`token create --labels`).
pub fn check_grant(labels: &Labels) -> Result<(), LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelError::TooMany("label", labels.len(), MAX_LABELS));
    }
    for (k, v) in labels {
        check_label_key(k)?;
        check_label_value(v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn edits_as_kubectl_label_makes_them() {
        let cur = labels(&[("role", "vault"), ("zone", "a")]);
        // (words, overwrite, result or the error's words)
        type Want = Result<&'static [(&'static str, &'static str)], &'static str>;
        let cases: &[(&[&str], bool, Want)] = &[
            (
                &["site=b"],
                false,
                Ok(&[("role", "vault"), ("site", "b"), ("zone", "a")]),
            ),
            (
                &["role=vault"],
                false,
                Ok(&[("role", "vault"), ("zone", "a")]),
            ),
            (
                &["role=db"],
                false,
                Err("already has the value \"vault\": pass --overwrite"),
            ),
            (&["role=db"], true, Ok(&[("role", "db"), ("zone", "a")])),
            (&["role-"], false, Ok(&[("zone", "a")])),
            (&["nope-"], false, Ok(&[("role", "vault"), ("zone", "a")])),
            (&["role-", "role=x"], true, Err("both set and removed")),
            (
                &["role"],
                false,
                Err("\"role\" is invalid: expected KEY=VALUE"),
            ),
            (&["-"], false, Err("expected KEY=VALUE")),
            (&[], false, Err("no label changes")),
            (&["ro le=x"], false, Err("\"ro le\"")),
            (&["role=a b"], false, Err("\"a b\"")),
            (
                &["shoal.dev/ring=canary"],
                false,
                Ok(&[
                    ("role", "vault"),
                    ("shoal.dev/ring", "canary"),
                    ("zone", "a"),
                ]),
            ),
        ];
        for (words, overwrite, want) in cases {
            let got = LabelChange::parse(words, *overwrite).and_then(|c| c.apply(&cur));
            match (got, want) {
                (Ok(l), Ok(w)) => assert_eq!(l, labels(w), "{words:?}"),
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{words:?}: {e}"),
                (got, want) => panic!("{words:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_device_cannot_ask_for_reserved_labels_and_ungranted_ones_show() {
        let reported = labels(&[
            ("role", "vault"),
            ("shoal.dev/trusted", "yes"),
            ("zone", "a"),
        ]);
        assert_eq!(
            requestable(&reported),
            labels(&[("role", "vault"), ("zone", "a")])
        );
        let effective = labels(&[("zone", "a"), ("site", "x")]);
        assert_eq!(
            ungranted(&reported, &effective),
            labels(&[("role", "vault"), ("shoal.dev/trusted", "yes")])
        );
    }

    #[test]
    fn too_many_labels_are_refused() {
        let many: Labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert!(matches!(
            check_grant(&many),
            Err(LabelError::TooMany("label", 65, 64))
        ));
        let change = LabelChange {
            set: many,
            ..LabelChange::default()
        };
        assert!(matches!(
            change.apply(&Labels::new()),
            Err(LabelError::TooMany(..))
        ));
    }

    #[test]
    fn unknown_fields_in_a_change_are_errors() {
        let e = serde_json::from_str::<LabelChange>(r#"{"set":{"a":"b"},"force":true}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("force"), "{e}");
    }

    #[test]
    fn annotations_take_free_text_within_bounds() {
        let cur = labels(&[("owner", "plant 7")]);
        let c = LabelChange::parse_as(
            Meta::Annotation,
            &["note=fan replaced 2026-11-30, see ticket #41", "owner-"],
            false,
        )
        .unwrap();
        let got = c.apply_as(Meta::Annotation, &cur).unwrap();
        assert_eq!(
            got,
            labels(&[("note", "fan replaced 2026-11-30, see ticket #41")])
        );
        let long = format!("note={}", "x".repeat(MAX_ANNOTATION_BYTES + 1));
        let e = LabelChange::parse_as(Meta::Annotation, &[long], false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "annotation \"note\": the value is longer than 4096 bytes"
        );
        let e = LabelChange::parse_as(Meta::Annotation, &["owner=someone else"], false)
            .unwrap()
            .apply_as(Meta::Annotation, &cur)
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("annotation \"owner\" already has the value"),
            "{e}"
        );
        let big: Vec<String> = (0..5)
            .map(|i| format!("k{i}={}", "x".repeat(4000)))
            .collect();
        let e = LabelChange::parse_as(Meta::Annotation, &big, false)
            .unwrap()
            .apply_as(Meta::Annotation, &cur)
            .unwrap_err();
        assert!(e.to_string().contains("at most 16384"), "{e}");
        // The same text is no label value.
        assert!(LabelChange::parse(&["note=a b"], false).is_err());
    }
}
