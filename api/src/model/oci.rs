//! OCI artifact references as manifests write them: `oci://REGISTRY/REPOSITORY[:TAG][@sha256:HEX]`.
//!
//! The registry is always explicit (no implicit `docker.io`): an edge fleet pulls from
//! registries its operator names. A reference with a digest is *pinned*: what the hub stores
//! and sends to devices is always pinned, so every device runs the same bytes and the digest
//! travels in the desired state (`shoal apply` pins tags before sending). Pure parsing, no I/O.
//! The grammar follows the OCI distribution spec (repository path components of lowercase
//! alphanumerics with `.`, `_`, `__`, `-` separators; tags of at most 128 characters).

use crate::model::ids::Digest;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The scheme that marks a module or image as living in an OCI registry.
pub const SCHEME: &str = "oci://";

/// Why a reference was refused; quotes the reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("OCI reference {value:?} is invalid: {reason}")]
pub struct OciRefError {
    pub value: String,
    pub reason: String,
}

/// A parsed `oci://` reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OciRef {
    /// `host[:port]`.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    /// The manifest digest; `Some` means pinned.
    pub digest: Option<Digest>,
}

impl OciRef {
    pub fn is_pinned(&self) -> bool {
        self.digest.is_some()
    }

    /// The same reference pinned to `digest` (the tag is kept for people to read).
    pub fn pinned(&self, digest: Digest) -> Self {
        Self {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// Without the `oci://` scheme: what registry clients parse.
    pub fn without_scheme(&self) -> String {
        let mut s = format!("{}/{}", self.registry, self.repository);
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d.as_str());
        }
        s
    }

    /// The registry's host without the port.
    pub fn host(&self) -> &str {
        host_of(&self.registry)
    }

    /// Whether the registry is on a loopback address (`localhost`, 127.0.0.0/8): plain HTTP
    /// is allowed there without being asked, as Docker does.
    pub fn is_loopback(&self) -> bool {
        let h = self.host();
        h.eq_ignore_ascii_case("localhost")
            || h.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// `host` of `host[:port]`.
pub fn host_of(registry: &str) -> &str {
    match registry.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    }
}

fn err(value: &str, reason: impl Into<String>) -> OciRefError {
    OciRefError {
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn check_registry(value: &str, reg: &str) -> Result<(), OciRefError> {
    let host = host_of(reg);
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    {
        return Err(err(
            value,
            format!("registry {reg:?} must be a host name or IPv4 address, with an optional :port"),
        ));
    }
    if host != reg {
        let port = &reg[host.len() + 1..];
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(err(
                value,
                format!("registry port {port:?} is not a port number"),
            ));
        }
    }
    Ok(())
}

fn check_repository(value: &str, repo: &str) -> Result<(), OciRefError> {
    if repo.is_empty() {
        return Err(err(
            value,
            "the repository is missing: expected oci://REGISTRY/REPOSITORY[:TAG]",
        ));
    }
    if repo.len() > 255 {
        return Err(err(value, "the repository is longer than 255 characters"));
    }
    for part in repo.split('/') {
        let ok = !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && part
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
            && part
                .bytes()
                .last()
                .is_some_and(|b| b.is_ascii_alphanumeric());
        if !ok {
            return Err(err(
                value,
                format!(
                    "repository component {part:?} must be lowercase letters and digits, separated by '.', '_' or '-'"
                ),
            ));
        }
    }
    Ok(())
}

fn check_tag(value: &str, tag: &str) -> Result<(), OciRefError> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(err(
            value,
            format!("tag {tag:?} must be 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"),
        ))
    }
}

impl FromStr for OciRef {
    type Err = OciRefError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let rest = value
            .strip_prefix(SCHEME)
            .ok_or_else(|| err(value, "it must start with oci://"))?;
        let (rest, digest) = match rest.split_once('@') {
            Some((r, d)) => (
                r,
                Some(
                    d.parse::<Digest>()
                        .map_err(|e| err(value, format!("bad digest: {e}")))?,
                ),
            ),
            None => (rest, None),
        };
        let (registry, path) = rest.split_once('/').ok_or_else(|| {
            err(
                value,
                "the registry is missing: expected oci://REGISTRY/REPOSITORY[:TAG]",
            )
        })?;
        check_registry(value, registry)?;
        // A ':' after the last '/' starts the tag.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
            _ => (path, None),
        };
        check_repository(value, repository)?;
        if let Some(t) = tag {
            check_tag(value, t)?;
        }
        if tag.is_none() && digest.is_none() {
            return Err(err(value, "give a :TAG or an @sha256: digest"));
        }
        Ok(Self {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest,
        })
    }
}

impl TryFrom<String> for OciRef {
    type Error = OciRefError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<OciRef> for String {
    fn from(r: OciRef) -> String {
        r.to_string()
    }
}

impl fmt::Display for OciRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}", self.without_scheme())
    }
}

/// An image platform, `os/architecture[/variant]` as OCI image indexes name them
/// (`linux/amd64`, `linux/arm64`, `linux/arm/v7`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// Whether a device reporting `arch` (Rust's `std::env::consts::ARCH`: `x86_64`,
    /// `aarch64`, `arm`, ...) on Linux can run images of this platform.
    pub fn runs_on(&self, arch: &str) -> bool {
        self.os == "linux" && self.architecture == oci_arch(arch)
    }
}

/// The OCI architecture name of a Rust target architecture.
pub fn oci_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other, // arm, riscv64, s390x, mips64 are spelled the same
    }
}

/// The variant of this build's CPU architecture as OCI names it: `v7`/`v6`/`v5` for 32-bit
/// ARM (from the target's features), `v8` for arm64, none elsewhere.
pub fn native_variant() -> Option<&'static str> {
    if cfg!(target_arch = "aarch64") {
        Some("v8")
    } else if cfg!(target_arch = "arm") {
        if cfg!(target_feature = "v7") {
            Some("v7")
        } else if cfg!(target_feature = "v6") {
            Some("v6")
        } else {
            Some("v5")
        }
    } else {
        None
    }
}

/// Which of an image index's platforms a Linux device of `arch` (Rust's name) and `variant`
/// (see [`native_variant`]) runs: the same architecture, and for 32-bit ARM the newest
/// variant not newer than the device's (a v7 board runs v6 and v5 images, a v6 board never
/// a v7 one; no variant counts as v7, as containerd assumes). Elsewhere the device's own
/// variant first, then an entry without one, then the lowest level (`amd64/v2` before
/// `amd64/v3`: a device that does not know its level must not get the most demanding
/// build). Among equals the first wins. `None`: none fits.
pub fn choose_platform(platforms: &[Platform], arch: &str, variant: Option<&str>) -> Option<usize> {
    let want = oci_arch(arch);
    let arm_level =
        |v: Option<&str>| -> Option<u32> { v.unwrap_or("v7").strip_prefix('v')?.parse().ok() };
    let mut best: Option<(usize, u32)> = None;
    for (i, p) in platforms.iter().enumerate() {
        if p.os != "linux" || p.architecture != want {
            continue;
        }
        let rank = if want == "arm" {
            match (arm_level(p.variant.as_deref()), arm_level(variant)) {
                (Some(image), Some(device)) if image <= device => image,
                _ => continue,
            }
        } else if p.variant.as_deref() == variant {
            1001
        } else if p.variant.is_none() {
            1000
        } else {
            // Another variant of the architecture: a last resort, lowest level first.
            let level = arm_level(p.variant.as_deref()).unwrap_or(999);
            999u32.saturating_sub(level)
        };
        if best.is_none_or(|(_, r)| rank > r) {
            best = Some((i, rank));
        }
    }
    best.map(|(i, _)| i)
}

impl FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        match parts.as_slice() {
            [os, arch] | [os, arch, _] if ok(os) && ok(arch) && parts.iter().all(|p| ok(p)) => {
                Ok(Self {
                    os: (*os).to_string(),
                    architecture: (*arch).to_string(),
                    variant: parts.get(2).map(|v| (*v).to_string()),
                })
            }
            _ => Err(format!(
                "platform {s:?} is invalid: expected os/architecture[/variant], e.g. linux/arm64 or linux/arm/v7"
            )),
        }
    }
}

impl TryFrom<String> for Platform {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Platform> for String {
    fn from(p: Platform) -> String {
        p.to_string()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_entry_for_this_device() {
        let index: Vec<Platform> = [
            "linux/amd64",
            "linux/arm/v5",
            "linux/arm/v7",
            "linux/arm/v6",
            "linux/arm64/v8",
            "windows/amd64",
        ]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
        let pick =
            |arch, variant| choose_platform(&index, arch, variant).map(|i| index[i].to_string());
        assert_eq!(pick("x86_64", None).as_deref(), Some("linux/amd64"));
        assert_eq!(
            pick("aarch64", Some("v8")).as_deref(),
            Some("linux/arm64/v8")
        );
        assert_eq!(pick("arm", Some("v7")).as_deref(), Some("linux/arm/v7"));
        assert_eq!(pick("arm", Some("v6")).as_deref(), Some("linux/arm/v6"));
        assert_eq!(pick("arm", Some("v5")).as_deref(), Some("linux/arm/v5"));
        assert_eq!(pick("riscv64", None), None);
        // An x86 device that does not know its level gets the least demanding build.
        let levels: Vec<Platform> = ["linux/amd64/v3", "linux/amd64/v2"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(choose_platform(&levels, "x86_64", None), Some(1));
        let plain: Vec<Platform> = ["linux/arm64/v9", "linux/arm64"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(choose_platform(&plain, "aarch64", Some("v8")), Some(1));
        // A v6 board never takes a v7-only image (nor one without a variant, read as v7).
        let v7_only: Vec<Platform> = vec![
            "linux/arm/v7".parse().unwrap(),
            "linux/arm".parse().unwrap(),
        ];
        assert_eq!(choose_platform(&v7_only, "arm", Some("v6")), None);
        assert_eq!(choose_platform(&v7_only, "arm", Some("v7")), Some(0));
        // This build's own variant.
        if cfg!(target_arch = "x86_64") {
            assert_eq!(native_variant(), None);
        } else if cfg!(target_arch = "aarch64") {
            assert_eq!(native_variant(), Some("v8"));
        }
    }

    #[test]
    fn platforms_parse_and_match_device_arches() {
        let p: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm/v7");
        assert!(p.runs_on("arm") && !p.runs_on("aarch64"));
        let p: Platform = "linux/arm64".parse().unwrap();
        assert!(p.runs_on("aarch64"));
        assert!("linux/amd64".parse::<Platform>().unwrap().runs_on("x86_64"));
        assert!(!"windows/amd64"
            .parse::<Platform>()
            .unwrap()
            .runs_on("x86_64"));
        for bad in ["linux", "linux/", "Linux/amd64", "linux/arm/v7/x"] {
            let e = bad.parse::<Platform>().unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    const D: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn parses_and_prints_back() {
        for s in [
            "oci://localhost:5000/hello:v1".to_string(),
            format!("oci://registry.example.com/team/sensor@{D}"),
            format!("oci://127.0.0.1:5000/a/b-c/d_e:1.2.3@{D}"),
        ] {
            let r: OciRef = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
        }
        let r: OciRef = "oci://localhost:5000/a/hello:v1".parse().unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("localhost:5000", "a/hello", Some("v1"))
        );
        assert!(!r.is_pinned() && r.is_loopback());
        let p = r.pinned(D.parse().unwrap());
        assert_eq!(p.without_scheme(), format!("localhost:5000/a/hello:v1@{D}"));
        assert!(!"oci://r.example.com/x:1"
            .parse::<OciRef>()
            .unwrap()
            .is_loopback());
        assert!("oci://127.0.0.9:80/x:1"
            .parse::<OciRef>()
            .unwrap()
            .is_loopback());
    }

    #[test]
    fn bad_references_say_why() {
        for (s, why) in [
            ("localhost:5000/x:v1", "must start with oci://"),
            ("oci://hello:v1", "the registry is missing"),
            (
                "oci://localhost:5000/x",
                "give a :TAG or an @sha256: digest",
            ),
            (
                "oci://localhost:5000/Hello:v1",
                "repository component \"Hello\"",
            ),
            ("oci://localhost:5000/x:-v1", "tag \"-v1\""),
            ("oci://localhost:0/x:v1", "registry port \"0\""),
            ("oci://local_host/x:v1", "registry \"local_host\""),
            ("oci://localhost/x@sha256:12", "bad digest"),
            ("oci://localhost//x:1", "repository component \"\""),
        ] {
            let e = s.parse::<OciRef>().unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
            assert!(e.contains(&format!("{s:?}")), "{e}");
        }
    }
}
