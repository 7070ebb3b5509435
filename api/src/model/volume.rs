//! Volumes (`spec.volumes`): storage on the device that outlives a replica's runs.
//!
//! A volume is a directory the agent keeps for the workload under its data directory
//! (`DATA_DIR/volumes/{workload}/{volume}`) and shows to each run at `path`: a preopened
//! directory for a WASM guest, a bind mount for a container. It survives restarts, new
//! revisions and agent restarts; replicas of the workload on one device share it (like a
//! Kubernetes `hostPath` or a balena named volume). It is removed once the device runs no
//! replica of the workload any more (deleted, or moved elsewhere): it is device-local, not
//! replicated, and not a place for data that must survive the loss of the device.
//!
//! The rules here are shared by the hub (manifest validation) and the agent (which checks
//! the desired state again before it turns a name into a path).

use serde::{Deserialize, Serialize};

/// A validated volume.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    /// 1–63 characters of `a-z`, `0-9` and `-`, starting and ending with a letter or digit:
    /// also the directory's name on the device.
    pub name: String,
    /// Where the workload sees it: an absolute, normalized path.
    pub path: String,
}

/// Guest paths a volume may not cover: the agent's own files (`/shoal`), and what a container
/// runtime mounts itself.
const RESERVED: [&str; 4] = ["/shoal", "/proc", "/sys", "/dev"];

/// Longest accepted `path`, in bytes (Linux's `PATH_MAX` is 4096).
const MAX_PATH: usize = 1024;

impl Volume {
    /// Checks a volume as the agent receives it (the hub checked it already; the agent does not
    /// trust a name it turns into a directory).
    pub fn check(&self) -> Result<(), String> {
        check_name(&self.name)?;
        check_path(&self.path)
    }
}

/// A volume name: safe as one path component and readable in `ls`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_len = (1..=63).contains(&name.len());
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = !name.starts_with('-') && !name.ends_with('-');
    if ok_len && ok_chars && ok_ends {
        Ok(())
    } else {
        Err(format!(
            "volume name {name:?} is invalid: must be 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"
        ))
    }
}

/// A mount path: absolute and normalized (no `.`, `..` or empty components), not `/`, not
/// under a reserved directory.
pub fn check_path(path: &str) -> Result<(), String> {
    check_shape(path)?;
    for r in RESERVED {
        if path == r || path.starts_with(&format!("{r}/")) {
            return Err(format!("path {path:?} is invalid: {r} is reserved"));
        }
    }
    Ok(())
}

/// Checks that `path` is absolute, normalized, not `/`, bounded and without NUL (what
/// [`check_path`] checks besides the reserved directories).
pub fn check_shape(path: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("path {path:?} is invalid: {why}"));
    if !path.starts_with('/') {
        return bad("must be absolute");
    }
    if path == "/" {
        return bad("must not be the root directory");
    }
    if path.len() > MAX_PATH {
        return bad(&format!("must be at most {MAX_PATH} bytes"));
    }
    if path.contains('\0') {
        return bad("must not contain NUL");
    }
    if path
        .split('/')
        .skip(1)
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("must be normalized: no '.', '..', '//' or trailing '/'");
    }
    Ok(())
}

/// Validates `spec.volumes`, pushing every problem (field, value, reason) to `errs`.
pub fn validate(wire: Vec<crate::wire::manifest::Volume>, errs: &mut Vec<String>) -> Vec<Volume> {
    let mut out: Vec<Volume> = Vec::new();
    for (i, v) in wire.into_iter().enumerate() {
        let field = format!("spec.volumes[{i}]");
        let before = errs.len();
        if let Err(e) = check_name(&v.name) {
            errs.push(format!("{field}.name: {e}"));
        } else if out.iter().any(|o| o.name == v.name) {
            errs.push(format!("{field}.name {:?} is declared twice", v.name));
        }
        if let Err(e) = check_path(&v.path) {
            errs.push(format!("{field}.path: {e}"));
        } else if let Some(o) = out.iter().find(|o| nested(&o.path, &v.path)) {
            errs.push(format!(
                "{field}.path {:?} overlaps volume {:?} at {:?}: give each volume its own directory",
                v.path, o.name, o.path
            ));
        }
        if errs.len() == before {
            out.push(Volume {
                name: v.name,
                path: v.path,
            });
        }
    }
    out
}

/// Whether one path is the other or lies inside it.
pub fn nested(a: &str, b: &str) -> bool {
    let inside = |x: &str, y: &str| x == y || x.starts_with(&format!("{y}/"));
    inside(a, b) || inside(b, a)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names() {
        for ok in ["data", "a", "cache-1", &"x".repeat(63)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Data",
            "-a",
            "a-",
            "a_b",
            "a/b",
            "..",
            ".",
            &"x".repeat(64),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths() {
        for ok in ["/data", "/var/lib/app", "/shoalx", "/devices"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        let cases = [
            ("data", "must be absolute"),
            ("/", "root directory"),
            ("/a/../b", "normalized"),
            ("/a/./b", "normalized"),
            ("/a//b", "normalized"),
            ("/a/", "normalized"),
            ("/shoal", "/shoal is reserved"),
            ("/shoal/services", "/shoal is reserved"),
            ("/proc/x", "/proc is reserved"),
            ("/dev", "/dev is reserved"),
            ("/a\0b", "NUL"),
        ];
        for (bad, why) in cases {
            let e = check_path(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn a_list_is_checked_as_a_whole() {
        let wire = |n: &str, p: &str| crate::wire::manifest::Volume {
            name: n.into(),
            path: p.into(),
        };
        let mut errs = Vec::new();
        let out = validate(
            vec![
                wire("data", "/data"),
                wire("data", "/other"),
                wire("cache", "/data/cache"),
                wire("Bad", "rel"),
                wire("logs", "/logs"),
            ],
            &mut errs,
        );
        assert_eq!(
            out.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ["data", "logs"]
        );
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs[0].contains("spec.volumes[1].name \"data\" is declared twice"));
        assert!(errs[1].contains("spec.volumes[2].path \"/data/cache\" overlaps volume \"data\""));
        assert!(errs[2].starts_with("spec.volumes[3].name: volume name \"Bad\" is invalid"));
        assert!(errs[3].starts_with("spec.volumes[3].path: path \"rel\" is invalid"));
    }
}
