//! Configs (`kind: Config`, like a Kubernetes ConfigMap): small text values workloads read
//! as files or environment variables, with values per device or per group of devices.
//!
//! ```yaml
//! apiVersion: shoal.dev/v1
//! kind: Config
//! metadata: { name: sensor }
//! data: { interval: "5", port: /dev/ttyUSB0 }
//! overrides:
//!   - selector: { site: berlin }        # devices whose operator labels match
//!     data: { interval: "10" }
//!   - device: board-7                   # one device
//!     data: { port: /dev/ttyACM0 }
//! ---
//! # in a workload's spec:
//! configs:
//!   - name: sensor                      # files /run/configs/sensor/{interval,port}
//!   - name: sensor
//!     path: /etc/sensor                 # files under another directory
//!     env: { INTERVAL: interval }       # a variable per key
//! ```
//!
//! **Which value a device gets**, key by key: `data`, then each override whose selector
//! matches the device's operator labels, from the fewest requirements to the most (equal
//! counts in list order), then the override naming the device itself. The last to set a key
//! wins, so the most specific does. Overrides change values, they add no key: a workload
//! that reads a key reads it on every device. Values are literal text (no `${…}` expansion).
//!
//! **How a change reaches replicas**: the hub pins the version of each Config a workload
//! reads into the workload's revision
//! ([`crate::model::workload::Workload::configs_pinned`]). A new Config is a new revision of
//! every workload that reads it, and rolls out like any other change (`maxUnavailable`,
//! health gates, automatic rollback); replicas not yet replaced keep the version they
//! started with, which the hub keeps until none runs it. `rollout undo` reads configs as
//! they are now (apply the earlier Config to go back to its values).

use crate::model::ids::{ConfigName, DeviceId, Digest};
use crate::model::refs::{Kind, Ref, Taken};
use crate::model::selector::{Requirement, Selector, SetRequirement, WireRequirement};
use crate::wire::manifest::{ConfigManifest, ConfigMetadata, OverrideManifest, SecretRef};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most bytes of one config as stored (JSON: keys, values, overrides and their selectors):
/// it travels inside desired states.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;

/// Most references to configs in one workload (`spec.configs`).
pub const MAX_REFS: usize = 8;

/// Most overrides in one config.
pub const MAX_OVERRIDES: usize = 256;

/// Where a config's files go when a reference names neither `path` nor `env`.
pub const DEFAULT_DIR: &str = "/run/configs";

/// Configs as workloads reference them.
pub const KIND: Kind = Kind {
    name: "config",
    field: "spec.configs",
    default_dir: DEFAULT_DIR,
};

/// How one workload reads one config (`spec.configs[]`), validated.
pub type ConfigMount = Ref<ConfigName>;

/// A validated config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    pub name: ConfigName,
    pub data: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<Override>,
}

/// Values for some devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Override {
    pub target: Target,
    pub data: BTreeMap<String, String>,
}

/// Which devices an override is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Target {
    Device(DeviceId),
    Selector(Selector),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Device(d) => write!(f, "device {d}"),
            Target::Selector(s) => write!(f, "selector {s}"),
        }
    }
}

/// Where a device's value of a key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    Data,
    /// `overrides[i]`.
    Override(usize),
}

impl Config {
    /// A short hash of the content: changes whenever any value or override does.
    pub fn version(&self) -> String {
        // Serializing plain structs and BTreeMaps cannot fail; fall back to Debug regardless.
        let bytes = serde_json::to_vec(self).unwrap_or_else(|_| format!("{self:?}").into_bytes());
        Digest::of(&bytes).hex()[..12].to_string()
    }

    /// Every key's value on `device` with operator labels `labels`, and where it comes from
    /// (the order is in the module's documentation).
    pub fn resolve(
        &self,
        device: &DeviceId,
        labels: &BTreeMap<String, String>,
    ) -> BTreeMap<String, (String, Source)> {
        let mut out: BTreeMap<String, (String, Source)> = self
            .data
            .iter()
            .map(|(k, v)| (k.clone(), (v.clone(), Source::Data)))
            .collect();
        let mut selectors: Vec<(usize, usize, &Override)> = Vec::new();
        let mut own: Vec<(usize, &Override)> = Vec::new();
        for (i, o) in self.overrides.iter().enumerate() {
            match &o.target {
                Target::Selector(s) if s.matches(labels) => selectors.push((s.0.len(), i, o)),
                Target::Device(d) if d == device => own.push((i, o)),
                _ => {}
            }
        }
        // Stable: equal requirement counts keep list order.
        selectors.sort_by_key(|(n, _, _)| *n);
        let ordered = selectors.into_iter().map(|(_, i, o)| (i, o)).chain(own);
        for (i, o) in ordered {
            for (k, v) in &o.data {
                out.insert(k.clone(), (v.clone(), Source::Override(i)));
            }
        }
        out
    }

    /// Every key's value on `device` (see [`Self::resolve`]).
    pub fn values_for(
        &self,
        device: &DeviceId,
        labels: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        self.resolve(device, labels)
            .into_iter()
            .map(|(k, (v, _))| (k, v))
            .collect()
    }

    /// The keys a workload may read.
    pub fn keys(&self) -> Vec<String> {
        self.data.keys().cloned().collect()
    }

    /// As a manifest document, for `shoal apply` to send on.
    pub fn to_manifest(&self) -> ConfigManifest {
        ConfigManifest {
            api_version: crate::API_VERSION.to_string(),
            kind: crate::wire::manifest::CONFIG.to_string(),
            metadata: ConfigMetadata {
                name: self.name.to_string(),
            },
            data: self.data.clone(),
            overrides: self
                .overrides
                .iter()
                .map(|o| {
                    let (device, selector) = match &o.target {
                        Target::Device(d) => (Some(d.to_string()), None),
                        Target::Selector(s) => (None, Some(selector_to_wire(s))),
                    };
                    OverrideManifest {
                        device,
                        selector,
                        data: o.data.clone(),
                    }
                })
                .collect(),
        }
    }
}

/// A validated selector in the form a manifest writes it.
fn selector_to_wire(s: &Selector) -> BTreeMap<String, WireRequirement> {
    s.0.iter()
        .map(|(k, r)| {
            let wire = match r {
                Requirement::Eq(v) => WireRequirement::Eq(v.clone()),
                Requirement::Set(set) => {
                    let (op, value) = match set {
                        SetRequirement::In(v) => ("in", serde_json::json!(v)),
                        SetRequirement::NotIn(v) => ("notIn", serde_json::json!(v)),
                        SetRequirement::Exists(b) => ("exists", serde_json::json!(b)),
                    };
                    WireRequirement::Expr([(op.to_string(), value)].into())
                }
            };
            (k.clone(), wire)
        })
        .collect()
}

impl TryFrom<ConfigManifest> for Config {
    type Error = Vec<String>;

    /// Checks a `kind: Config` document; every problem is returned, naming the field.
    fn try_from(m: ConfigManifest) -> Result<Self, Vec<String>> {
        let mut errs = Vec::new();
        if m.api_version != crate::API_VERSION {
            errs.push(format!(
                "apiVersion {:?} is not supported: expected {:?}",
                m.api_version,
                crate::API_VERSION
            ));
        }
        let name = ConfigName::try_from(m.metadata.name.as_str())
            .map_err(|e| errs.push(format!("metadata.name: {e}")))
            .ok();
        check_values("data", &m.data, &mut errs);
        if m.data.is_empty() {
            errs.push("the config has no keys: give data".into());
        }
        if m.overrides.len() > MAX_OVERRIDES {
            // Checked before anything else of them: each is compared with the others.
            errs.push(format!(
                "overrides has {} entries: at most {MAX_OVERRIDES} are allowed",
                m.overrides.len()
            ));
            return Err(errs);
        }
        let mut overrides: Vec<(usize, Override)> = Vec::new();
        for (i, o) in m.overrides.into_iter().enumerate() {
            let field = format!("overrides[{i}]");
            let target = match (o.device, o.selector) {
                (Some(d), None) => DeviceId::try_from(d.as_str())
                    .map(Target::Device)
                    .map_err(|e| errs.push(format!("{field}.device: {e}")))
                    .ok(),
                (None, Some(s)) => {
                    let before = errs.len();
                    let sel = crate::model::selector::validate(
                        &format!("{field}.selector"),
                        &s,
                        &mut errs,
                    );
                    if sel.is_empty() && errs.len() == before {
                        errs.push(format!(
                            "{field}.selector is empty: it would match every device (put such values in data)"
                        ));
                    }
                    (errs.len() == before).then_some(Target::Selector(sel))
                }
                (None, None) => {
                    errs.push(format!("{field}: give device or selector"));
                    None
                }
                (Some(_), Some(_)) => {
                    errs.push(format!("{field}: give device or selector, not both"));
                    None
                }
            };
            check_values(&format!("{field}.data"), &o.data, &mut errs);
            if o.data.is_empty() {
                errs.push(format!("{field}.data is empty: an override sets values"));
            }
            for key in o.data.keys().filter(|k| !m.data.contains_key(*k)) {
                errs.push(format!(
                    "{field}.data.{key}: key {key:?} is not in data (overrides change values, they add no key)"
                ));
            }
            let Some(target) = target else { continue };
            if let Some((j, _)) = overrides.iter().find(|(_, x)| x.target == target) {
                errs.push(format!(
                    "{field}: {target} is given already in overrides[{j}]"
                ));
            }
            overrides.push((
                i,
                Override {
                    target,
                    data: o.data,
                },
            ));
        }
        let overrides: Vec<Override> = overrides.into_iter().map(|(_, o)| o).collect();
        let (Some(name), true) = (name, errs.is_empty()) else {
            return Err(errs);
        };
        let config = Config {
            name,
            data: m.data,
            overrides,
        };
        // As stored and sent: escapes and selectors count too.
        let size = serde_json::to_vec(&config).map_or(usize::MAX, |v| v.len());
        if size > MAX_CONFIG_BYTES {
            return Err(vec![format!(
                "the config takes {size} bytes as stored: at most {MAX_CONFIG_BYTES} are allowed"
            )]);
        }
        Ok(config)
    }
}

/// Keys are file names; values text without NUL (they may become environment variables).
fn check_values(field: &str, data: &BTreeMap<String, String>, errs: &mut Vec<String>) {
    for (k, v) in data {
        if let Err(e) = crate::model::secret::check_key(k) {
            errs.push(format!("{field}: {e}"));
        } else if v.contains('\0') {
            errs.push(format!("{field}.{k}: the value contains NUL"));
        }
    }
}

/// Validates `spec.configs` against the workload's own `env` and what is `taken` (volumes,
/// secrets), pushing every problem to `errs`.
pub fn validate_mounts(
    wire: Vec<SecretRef>,
    env: &BTreeMap<String, String>,
    taken: &mut Vec<Taken>,
    errs: &mut Vec<String>,
) -> Vec<ConfigMount> {
    if wire.len() > MAX_REFS {
        errs.push(format!(
            "spec.configs has {} entries: at most {MAX_REFS} are allowed",
            wire.len()
        ));
        return Vec::new();
    }
    crate::model::refs::validate(KIND, wire, env, taken, errs)
}

/// What each mount needs that the known configs lack (see [`crate::model::refs::unresolved`]).
pub fn unresolved(
    mounts: &[ConfigMount],
    keys_of: impl Fn(&ConfigName) -> Option<Vec<String>>,
) -> Vec<String> {
    crate::model::refs::unresolved(KIND, mounts, keys_of)
}

/// A config as one replica on one device reads it: its values resolved for that device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigFiles {
    pub name: ConfigName,
    /// Where the replica sees them as files (read-only); `None`: the reference gives
    /// variables only (then `data` holds only the keys they read, and the variables are in
    /// the desired environment already).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub data: BTreeMap<String, String>,
}

impl ConfigFiles {
    /// A short hash of name, path and values: the directory files are written to on the
    /// device, and what a replica is restarted for when it changes (also when it reads
    /// them as variables only).
    pub fn digest(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_else(|_| format!("{self:?}").into_bytes());
        Digest::of(&bytes).hex()[..16].to_string()
    }
}

/// What a replica on `device` gets from the configs it reads (`config_of` gives the
/// version its revision pinned): one [`ConfigFiles`] per reference, and the environment
/// variables taken from keys.
pub fn for_device<'a>(
    mounts: &[ConfigMount],
    config_of: impl Fn(&ConfigName) -> Option<&'a Config>,
    device: &DeviceId,
    labels: &BTreeMap<String, String>,
) -> (Vec<ConfigFiles>, BTreeMap<String, String>) {
    let mut files = Vec::new();
    let mut env = BTreeMap::new();
    for m in mounts {
        let Some(config) = config_of(&m.name) else {
            continue;
        };
        let mut values = config.values_for(device, labels);
        for (var, key) in &m.env {
            if let Some(v) = values.get(key) {
                env.insert(var.clone(), v.clone());
            }
        }
        if m.path.is_none() {
            values.retain(|k, _| m.env.values().any(|key| key == k));
        }
        files.push(ConfigFiles {
            name: m.name.clone(),
            path: m.path.clone(),
            data: values,
        });
    }
    (files, env)
}

#[cfg(test)]
mod tests;
