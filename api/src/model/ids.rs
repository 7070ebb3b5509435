//! Identifier newtypes: device ids, workload names, label keys and values, blob digests.
//!
//! Each one is validated on construction (`TryFrom<&str>`/`FromStr`), so holding one proves it
//! is well formed: names are safe to use in MQTT topics, file names and URLs.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Why an identifier was refused. Messages are lowercase and quote the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} {value:?} is invalid: {reason}")]
    Invalid {
        kind: &'static str,
        value: String,
        reason: &'static str,
    },
}

fn invalid(kind: &'static str, value: &str, reason: &'static str) -> IdError {
    IdError::Invalid {
        kind,
        value: value.to_string(),
        reason,
    }
}

/// A DNS-1123 label: 1–63 characters, lowercase letters, digits and `-`, starting and ending
/// with a letter or digit. Used for workload and device names.
fn check_dns_label(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(invalid(kind, s, "must not be empty"));
    }
    if s.len() > 63 {
        return Err(invalid(kind, s, "must be at most 63 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(
            kind,
            s,
            "must contain only lowercase letters, digits and '-'",
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(invalid(
            kind,
            s,
            "must start and end with a letter or digit",
        ));
    }
    Ok(())
}

macro_rules! name_newtype {
    ($(#[$m:meta])* $ty:ident, $kind:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $ty {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                check_dns_label($kind, &s)?;
                Ok(Self(s))
            }
        }
        impl TryFrom<&str> for $ty {
            type Error = IdError;
            fn try_from(s: &str) -> Result<Self, IdError> {
                Self::try_from(s.to_string())
            }
        }
        impl FromStr for $ty {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::try_from(s)
            }
        }
        impl From<$ty> for String {
            fn from(v: $ty) -> String {
                v.0
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_newtype!(
    /// A device's identity in the fleet (a DNS-1123 label, e.g. `greenhouse-pi-3`).
    DeviceId,
    "device id"
);
name_newtype!(
    /// A workload's `metadata.name` (a DNS-1123 label).
    WorkloadName,
    "workload name"
);
name_newtype!(
    /// A secret's `metadata.name` (a DNS-1123 label).
    SecretName,
    "secret name"
);
name_newtype!(
    /// A config's `metadata.name` (a DNS-1123 label).
    ConfigName,
    "config name"
);
name_newtype!(
    /// A named operator (`shoal-hub operator create NAME`; a DNS-1123 label).
    OperatorName,
    "operator name"
);

name_newtype!(
    /// A kind of hardware a device offers to workloads (`serial`, `camera`, `gpio`; a
    /// DNS-1123 label): see [`crate::model::hardware`].
    DeviceClass,
    "device class"
);

impl OperatorName {
    /// The bootstrap operator's name (`crate::policy::operator::BOOTSTRAP`, a valid label).
    pub fn bootstrap() -> Self {
        OperatorName(crate::policy::operator::BOOTSTRAP.to_string())
    }
}

/// Checks a label key: an optional DNS-subdomain prefix and `/`, then a name of 1–63
/// characters from `[A-Za-z0-9._-]` that starts and ends alphanumeric (the Kubernetes rule).
pub fn check_label_key(key: &str) -> Result<(), IdError> {
    let name = match key.rsplit_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty() || prefix.len() > 253 {
                return Err(invalid("label key", key, "prefix must be 1-253 characters"));
            }
            if !prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            {
                return Err(invalid(
                    "label key",
                    key,
                    "prefix must be a DNS subdomain (lowercase letters, digits, '-' and '.')",
                ));
            }
            name
        }
        None => key,
    };
    if name.is_empty() || name.len() > 63 {
        return Err(invalid(
            "label key",
            key,
            "name part must be 1-63 characters",
        ));
    }
    check_label_chars("label key", key, name)
}

/// Checks a label value: empty, or up to 63 characters from `[A-Za-z0-9._-]` starting and
/// ending alphanumeric.
pub fn check_label_value(value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Ok(());
    }
    if value.len() > 63 {
        return Err(invalid(
            "label value",
            value,
            "must be at most 63 characters",
        ));
    }
    check_label_chars("label value", value, value)
}

fn check_label_chars(kind: &'static str, whole: &str, part: &str) -> Result<(), IdError> {
    if !part
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(invalid(
            kind,
            whole,
            "may contain only letters, digits, '-', '_' and '.'",
        ));
    }
    let first_last_ok = part
        .bytes()
        .next()
        .zip(part.bytes().last())
        .is_some_and(|(a, b)| a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric());
    if !first_last_ok {
        return Err(invalid(
            kind,
            whole,
            "must start and end with a letter or digit",
        ));
    }
    Ok(())
}

/// Parses `k=v,k2=v2` (the agent's `--labels` flag) into a validated label map.
pub fn parse_label_list(s: &str) -> Result<std::collections::BTreeMap<String, String>, IdError> {
    let mut out = std::collections::BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(invalid("label", item, "expected key=value"));
        };
        check_label_key(k)?;
        check_label_value(v)?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// A content digest, always `sha256:<64 lowercase hex>`; the identity of a blob (a WASM module).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self(format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(bytes))
        ))
    }
    /// The 64 hex characters, without the `sha256:` prefix (safe as a file name).
    pub fn hex(&self) -> &str {
        self.0.strip_prefix("sha256:").unwrap_or(&self.0)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Digest {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        let Some(hex) = s.strip_prefix("sha256:") else {
            return Err(invalid("digest", &s, "must start with \"sha256:\""));
        };
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(invalid(
                "digest",
                &s,
                "must be \"sha256:\" followed by 64 lowercase hex digits",
            ));
        }
        Ok(Self(s))
    }
}
impl FromStr for Digest {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::try_from(s.to_string())
    }
}
impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}
impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(WorkloadName::try_from("temp-filter").is_ok());
        assert!(WorkloadName::try_from("a").is_ok());
        for bad in ["", "Temp", "-a", "a-", "a_b", "a.b", &"x".repeat(64)] {
            assert!(WorkloadName::try_from(bad).is_err(), "{bad:?}");
        }
        let e = DeviceId::try_from("Edge_1").unwrap_err().to_string();
        assert_eq!(
            e,
            "device id \"Edge_1\" is invalid: must contain only lowercase letters, digits and '-'"
        );
    }

    #[test]
    fn labels() {
        assert!(check_label_key("zone").is_ok());
        assert!(check_label_key("shoal.dev/arch").is_ok());
        assert!(check_label_key("bad key").is_err());
        assert!(check_label_key("/x").is_err());
        assert!(check_label_value("").is_ok());
        assert!(check_label_value("-x").is_err());
        let m = parse_label_list("zone=a, role=sensor").unwrap();
        assert_eq!(m.get("role").map(String::as_str), Some("sensor"));
        assert!(parse_label_list("zone").is_err());
        assert!(parse_label_list("zo ne=a").is_err());
    }

    #[test]
    fn digests() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.as_str(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.as_str().parse::<Digest>().unwrap(), d);
        assert!("sha256:xyz".parse::<Digest>().is_err());
        assert!("md5:00".parse::<Digest>().is_err());
    }
}
