//! Secrets (`kind: Secret`) and how workloads use them (`spec.secrets`).
//!
//! ```yaml
//! apiVersion: shoal.dev/v1
//! kind: Secret
//! metadata: { name: db }
//! stringData: { user: app }          # text as is
//! data: { password: aHVudGVyMg== }   # base64, for any bytes
//! ---
//! # in a workload's spec:
//! secrets:
//!   - name: db                       # files /run/secrets/db/{user,password}
//!   - name: db
//!     path: /etc/db                  # files under another directory
//!     env: { DB_PASSWORD: password } # an environment variable per key
//! ```
//!
//! A secret's values never appear in an error, a `Debug` string, a view or a log line: a
//! manifest problem names the key and the reason, never the value (serde's own messages
//! would quote it, so secret documents are read by hand from the YAML tree). The hub keeps
//! them encrypted; devices receive only the secrets their workloads use, sealed to their own
//! key (see `shoal_pki::secret`), in [`SealedSecret`]s, and see files read-only.

use crate::model::ids::SecretName;
use crate::wire::manifest::Metadata;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most bytes of values in one secret: it travels inside a device's desired state.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// Where a secret's files go when a reference names neither `path` nor `env`.
pub const DEFAULT_DIR: &str = "/run/secrets";

/// A validated secret. Its `Debug` shows the keys only.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    pub name: SecretName,
    pub data: BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Secret {
    /// The canonical byte form of the values (what the hub encrypts): JSON of key → base64.
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        let map: BTreeMap<&str, String> = self
            .data
            .iter()
            .map(|(k, v)| (k.as_str(), b64::encode(v)))
            .collect();
        serde_json::to_vec(&map)
            .map_err(|_| format!("secret {:?} cannot be encoded", self.name.as_str()))
    }

    /// Reads [`Self::to_bytes`]'s form back. Errors never include the bytes.
    pub fn from_bytes(name: SecretName, bytes: &[u8]) -> Result<Self, String> {
        let map: BTreeMap<String, String> = serde_json::from_slice(bytes).map_err(|_| {
            format!(
                "secret {:?}: its stored values are malformed",
                name.as_str()
            )
        })?;
        let mut data = BTreeMap::new();
        for (k, v) in map {
            let bytes = b64::decode(&v).ok_or_else(|| {
                format!(
                    "secret {:?}: the stored value of {k:?} is malformed",
                    name.as_str()
                )
            })?;
            data.insert(k, bytes);
        }
        Ok(Self { name, data })
    }

    /// As a manifest document (values base64 in `data`), for `shoal apply` to send on.
    pub fn to_manifest(&self) -> SecretManifest {
        SecretManifest {
            api_version: crate::API_VERSION.to_string(),
            kind: "Secret".to_string(),
            metadata: Metadata {
                name: self.name.to_string(),
                labels: BTreeMap::new(),
            },
            data: self
                .data
                .iter()
                .map(|(k, v)| (k.clone(), b64::encode(v)))
                .collect(),
        }
    }
}

/// A `kind: Secret` document as rendered back to YAML. Its `Debug` shows the keys only.
#[derive(Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretManifest {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub data: BTreeMap<String, String>,
}

impl std::fmt::Debug for SecretManifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretManifest")
            .field("name", &self.metadata.name)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Checks a key: a file name inside the secret's directory (the Kubernetes rule:
/// `[-._a-zA-Z0-9]+`, at most 253 characters, not `.` or `..`).
pub fn check_key(key: &str) -> Result<(), String> {
    let ok = (1..=253).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && key != "."
        && key != "..";
    if ok {
        Ok(())
    } else {
        Err(format!(
            "key {key:?} is invalid: must be 1-253 characters of a-z, A-Z, 0-9, '-', '_' and '.', and not '.' or '..'"
        ))
    }
}

/// Parses one `kind: Secret` document from its YAML tree. Every problem is returned, each
/// naming a field or key and never a value.
pub fn parse(doc: &serde_yaml_ng::Value) -> Result<Secret, Vec<String>> {
    use serde_yaml_ng::Value;
    let mut errs = Vec::new();
    let Some(map) = doc.as_mapping() else {
        return Err(vec!["expected a mapping".into()]);
    };
    let mut name = None;
    let mut data = BTreeMap::new();
    for required in ["apiVersion", "metadata"] {
        if doc.get(required).is_none() {
            errs.push(format!("{required} is missing"));
        }
    }
    for (k, v) in map {
        let Some(field) = k.as_str() else {
            errs.push("field names must be strings".into());
            continue;
        };
        match field {
            "apiVersion" => {
                if v.as_str() != Some(crate::API_VERSION) {
                    errs.push(format!(
                        "apiVersion {:?} is not supported: expected {:?}",
                        v.as_str().unwrap_or("?"),
                        crate::API_VERSION
                    ));
                }
            }
            "kind" => {} // dispatched on by the caller
            "metadata" => {
                match v.get("name").and_then(Value::as_str) {
                    Some(n) => match SecretName::try_from(n) {
                        Ok(n) => name = Some(n),
                        Err(e) => errs.push(format!("metadata.name: {e}")),
                    },
                    None => errs.push("metadata.name is missing".into()),
                }
                for field in v.as_mapping().into_iter().flat_map(|m| m.keys()) {
                    if field.as_str() != Some("name") {
                        errs.push(format!(
                            "unknown field metadata.{}: a Secret's metadata has only a name",
                            field.as_str().unwrap_or("?")
                        ));
                    }
                }
            }
            "data" | "stringData" => {
                let Some(entries) = v.as_mapping() else {
                    if !v.is_null() {
                        errs.push(format!("{field} must be a mapping of key to value"));
                    }
                    continue;
                };
                for (key, value) in entries {
                    let Some(key) = key.as_str() else {
                        errs.push(format!("{field}: keys must be strings"));
                        continue;
                    };
                    if let Err(e) = check_key(key) {
                        errs.push(format!("{field}: {e}"));
                        continue;
                    }
                    let bytes = match (field, value.as_str()) {
                        (_, None) => {
                            errs.push(format!(
                                "{field}.{key} must be a string (quote numbers and booleans)"
                            ));
                            continue;
                        }
                        ("data", Some(s)) => match b64::decode(s) {
                            Some(b) => b,
                            None => {
                                errs.push(format!(
                                    "data.{key} is not valid base64 (put text in stringData)"
                                ));
                                continue;
                            }
                        },
                        (_, Some(s)) => s.as_bytes().to_vec(),
                    };
                    if data.insert(key.to_string(), bytes).is_some() {
                        errs.push(format!("key {key:?} is given twice (data and stringData)"));
                    }
                }
            }
            other => errs.push(format!(
                "unknown field {other:?}: a Secret has apiVersion, kind, metadata, data and stringData"
            )),
        }
    }
    let total: usize = data.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_SECRET_BYTES {
        errs.push(format!(
            "the secret holds {total} bytes: at most {MAX_SECRET_BYTES} are allowed"
        ));
    }
    if data.is_empty() && errs.is_empty() {
        errs.push("the secret has no keys: give data or stringData".into());
    }
    match name {
        Some(name) if errs.is_empty() => Ok(Secret { name, data }),
        // Never an empty error list: that would drop the document silently.
        _ if errs.is_empty() => Err(vec!["metadata.name is missing".into()]),
        _ => Err(errs),
    }
}

/// How one workload uses one secret (`spec.secrets[]`), validated (see [`crate::model::refs`]).
pub type SecretMount = crate::model::refs::Ref<SecretName>;

/// Secrets as workloads reference them.
pub const KIND: crate::model::refs::Kind = crate::model::refs::Kind {
    name: "secret",
    field: "spec.secrets",
    default_dir: DEFAULT_DIR,
};

/// Validates `spec.secrets` against the workload's own `env` and what is `taken` (its
/// volumes), pushing every problem to `errs`.
pub fn validate_mounts(
    wire: Vec<crate::wire::manifest::SecretRef>,
    env: &BTreeMap<String, String>,
    taken: &mut Vec<crate::model::refs::Taken>,
    errs: &mut Vec<String>,
) -> Vec<SecretMount> {
    crate::model::refs::validate(KIND, wire, env, taken, errs)
}

/// What each mount needs that the known secrets lack (see [`crate::model::refs::unresolved`]).
pub fn unresolved(
    mounts: &[SecretMount],
    keys_of: impl Fn(&SecretName) -> Option<Vec<String>>,
) -> Vec<String> {
    crate::model::refs::unresolved(KIND, mounts, keys_of)
}

/// A mount as a device receives it: the version of the secret to run with. A new version
/// restarts the replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredSecretMount {
    #[serde(flatten)]
    pub mount: SecretMount,
    #[serde(default)]
    pub version: String,
}

/// One secret sealed to the device whose desired state carries it (base64 fields).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SealedSecret {
    pub name: SecretName,
    pub version: String,
    /// HPKE's encapsulated key.
    pub enc: String,
    pub ciphertext: String,
}

impl std::fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSecret")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Standard base64 with padding, the encoding of Kubernetes' `data`.
pub mod b64 {
    use base64::Engine as _;

    pub fn encode(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// `None` for anything but padded standard base64 (whitespace and newlines are skipped,
    /// as YAML block scalars carry them).
    pub fn decode(text: &str) -> Option<Vec<u8>> {
        let clean: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        base64::engine::general_purpose::STANDARD.decode(clean).ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::model::volume::Volume;

    fn yaml(s: &str) -> serde_yaml_ng::Value {
        serde_yaml_ng::from_str(s).unwrap()
    }

    #[test]
    fn base64_round_trips() {
        for n in 0..40u8 {
            let bytes: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(b64::decode(&b64::encode(&bytes)).unwrap(), bytes);
        }
        assert_eq!(b64::encode(b"hunter2"), "aHVudGVyMg==");
        assert_eq!(b64::decode("aHVu\n dGVyMg==").unwrap(), b"hunter2");
        for bad in ["a", "aHVudGVyMg=", "aH=udGVy", "aHVu!GVy", "a==="] {
            assert!(b64::decode(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn parses_data_and_string_data() {
        let s = parse(&yaml(
            "apiVersion: shoal.dev/v1\nkind: Secret\nmetadata: {name: db}\nstringData: {user: app}\ndata: {password: aHVudGVyMg==}\n",
        ))
        .unwrap();
        assert_eq!(s.name.as_str(), "db");
        assert_eq!(s.data["user"], b"app");
        assert_eq!(s.data["password"], b"hunter2");
        let dbg = format!("{s:?} {:?}", s.to_manifest());
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("aHVudGVyMg"),
            "{dbg}"
        );
        let back = Secret::from_bytes(s.name.clone(), &s.to_bytes().unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn errors_name_the_key_never_the_value() {
        let errs = parse(&yaml(
            "apiVersion: shoal.dev/v1\nkind: Secret\nmetadata: {name: Db}\nstringData: {pin: 98765, ok: x}\ndata: {password: 'hunter2!!', ok: eA==, ../x: eA==}\nextra: 1\n",
        ))
        .unwrap_err();
        let all = errs.join("\n");
        for want in [
            "metadata.name",
            "stringData.pin must be a string",
            "data.password is not valid base64",
            "key \"ok\" is given twice",
            "key \"../x\" is invalid",
            "unknown field \"extra\"",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert!(!all.contains("98765") && !all.contains("hunter2"), "{all}");
        let errs = parse(&yaml(
            "apiVersion: shoal.dev/v1\nkind: Secret\nmetadata: {name: db}\n",
        ))
        .unwrap_err();
        assert!(errs[0].contains("no keys"), "{errs:?}");
        // Nothing about it is silently dropped: no metadata, no apiVersion, extra metadata.
        let errs = parse(&yaml("kind: Secret\nstringData: {k: v}\n")).unwrap_err();
        assert_eq!(errs, vec!["apiVersion is missing", "metadata is missing"]);
        let errs = parse(&yaml(
            "apiVersion: shoal.dev/v1\nkind: Secret\nmetadata: {name: db, labels: {a: b}}\nstringData: {k: v}\n",
        ))
        .unwrap_err();
        assert!(
            errs[0].contains("unknown field metadata.labels"),
            "{errs:?}"
        );
        let big = format!(
            "apiVersion: shoal.dev/v1\nkind: Secret\nmetadata: {{name: db}}\nstringData: {{k: {}}}\n",
            "x".repeat(MAX_SECRET_BYTES)
        );
        assert!(parse(&yaml(&big)).unwrap_err()[0].contains("at most"));
    }

    fn wire(
        name: &str,
        path: Option<&str>,
        env: &[(&str, &str)],
    ) -> crate::wire::manifest::SecretRef {
        crate::wire::manifest::SecretRef {
            name: name.into(),
            path: path.map(str::to_string),
            env: env
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        }
    }

    #[test]
    fn mounts_default_to_run_secrets_and_refuse_clashes() {
        let mut errs = Vec::new();
        let env: BTreeMap<String, String> = [("MODE".to_string(), "x".to_string())].into();
        let vols = vec![Volume {
            name: "data".into(),
            path: "/data".into(),
        }];
        let ok = validate_mounts(
            vec![
                wire("db", None, &[]),
                wire("api", None, &[("TOKEN", "token")]),
                wire("tls", Some("/etc/tls"), &[]),
            ],
            &env,
            &mut crate::model::refs::volumes(&vols),
            &mut errs,
        );
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(ok[0].path.as_deref(), Some("/run/secrets/db"));
        assert_eq!(ok[1].path, None);
        assert_eq!(ok[2].path.as_deref(), Some("/etc/tls"));

        let bad = validate_mounts(
            vec![
                wire("db", Some("/data/db"), &[]),
                wire("x", Some("/etc/a"), &[("MODE", "k")]),
                wire("y", Some("/etc/a/b"), &[("A", "../k")]),
                wire("Z", None, &[]),
                wire("w", Some("rel"), &[("", "k")]),
            ],
            &env,
            &mut crate::model::refs::volumes(&vols),
            &mut errs,
        );
        assert!(bad.is_empty());
        let all = errs.join("\n");
        for want in [
            "spec.secrets[0].path \"/data/db\" overlaps volume \"data\"",
            "spec.secrets[1].env.MODE is also set in spec.env",
            "spec.secrets[2].env.A: key \"../k\" is invalid",
            "spec.secrets[3].name",
            "spec.secrets[4].path",
            "spec.secrets[4].env: name \"\" is invalid",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
    }

    #[test]
    fn unresolved_names_missing_secrets_and_keys() {
        let mut errs = Vec::new();
        let mounts = validate_mounts(
            vec![
                wire("db", None, &[("P", "password")]),
                wire("gone", None, &[]),
            ],
            &BTreeMap::new(),
            &mut Vec::new(),
            &mut errs,
        );
        let missing = unresolved(&mounts, |n| {
            (n.as_str() == "db").then(|| vec!["user".to_string()])
        });
        assert_eq!(missing.len(), 2, "{missing:?}");
        assert!(missing[0].contains("has no key \"password\" (it has user)"));
        assert!(missing[1].contains("secret \"gone\" does not exist"));
    }
}
