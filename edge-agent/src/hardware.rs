//! The device side of `resources.devices` (rules in [`shoal_api::model::hardware`]): the
//! hardware this device offers, read once at start from its config (`[devices.CLASS]`
//! `paths` and `glob`, `--device CLASS=PATH`), and what one node is to a container (its type
//! and numbers, read when a container starts).
//!
//! Only character and block device nodes are offered: anything else named (a missing node,
//! a regular file, a directory) is left out with a warning, so the hub never counts a node a
//! replica could not use. One node is offered once, however many names reach it (a
//! `/dev/serial/by-id/…` link and a glob matching its `/dev/ttyUSB0`, or two classes): by
//! its first name, in class order, so two replicas never share it. At most
//! [`MAX_PER_CLASS`] nodes per class and [`MAX_CLASSES`] classes are offered (what a hello
//! may report); the rest are left out with a warning. Globs are looked up at start only: a
//! board whose USB adapter is plugged in later needs the agent restarted (hot-plug is not
//! followed yet), and a link re-pointed after the start is not noticed.

use crate::config::DevicesFile;
use crate::core::hardware::Inventory;
use shoal_api::model::hardware::{MAX_CLASSES, MAX_PER_CLASS};
use shoal_api::model::ids::DeviceClass;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use tracing::warn;

/// The nodes the config offers that exist and are device nodes.
pub fn inventory(config: &BTreeMap<DeviceClass, DevicesFile>) -> Inventory {
    // Nodes by device number: names that reach one node count once.
    let mut seen = BTreeSet::new();
    let mut out = Inventory::new();
    for (class, d) in config {
        if out.len() >= MAX_CLASSES {
            warn!(class = %class, "more than {MAX_CLASSES} device classes: not offered");
            continue;
        }
        let mut paths: Vec<PathBuf> = d.paths.clone();
        for pattern in &d.glob {
            match glob::glob(pattern) {
                Ok(found) => paths.extend(found.filter_map(Result::ok)),
                Err(e) => {
                    warn!(class = %class, pattern, error = %e, "device glob is invalid: skipped")
                }
            }
        }
        let mut nodes = Vec::new();
        for p in paths {
            let Some(text) = p.to_str().map(str::to_string) else {
                warn!(class = %class, path = %p.display(), "device path is not UTF-8: skipped");
                continue;
            };
            let rdev = match device_node(&p) {
                Ok(rdev) => rdev,
                Err(why) => {
                    warn!(class = %class, path = %text, "device {why}: not offered");
                    continue;
                }
            };
            if !seen.insert(rdev) {
                // Named before (`paths` and a glob, a link and its target, two classes).
                continue;
            }
            if nodes.len() >= MAX_PER_CLASS as usize {
                warn!(class = %class, path = %text, "more than {MAX_PER_CLASS} {class} devices: not offered");
                continue;
            }
            nodes.push(text);
        }
        if !nodes.is_empty() {
            out.insert(class.clone(), nodes);
        }
    }
    out
}

/// The kind and number of the node `p` is (or links to), if it is a character or block
/// device node; else why not.
fn device_node(p: &Path) -> Result<(bool, u64), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(p).map_err(|e| format!("cannot be read ({e})"))?;
    let t = meta.file_type();
    if t.is_char_device() || t.is_block_device() {
        Ok((t.is_block_device(), meta.rdev()))
    } else {
        Err("is not a device node".to_string())
    }
}

/// What a container needs to be given one node: where it is, its kind and numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Where the container sees it (the same path as the agent's config names it).
    pub path: PathBuf,
    /// The node itself, links followed (what is bind-mounted).
    pub source: PathBuf,
    /// `true`: a block device; `false`: a character device.
    pub block: bool,
    pub major: u64,
    pub minor: u64,
    /// Its group (a non-root container process gets it as a supplementary group).
    pub gid: u32,
}

/// Reads a node's kind and numbers (following a link such as `/dev/serial/by-id/…`).
pub fn node_info(path: &Path) -> std::io::Result<NodeInfo> {
    use std::os::unix::fs::MetadataExt;
    let source = std::fs::canonicalize(path)?;
    let meta = std::fs::metadata(&source)?;
    let t = meta.file_type();
    if !(t.is_char_device() || t.is_block_device()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a device node", path.display()),
        ));
    }
    let rdev = meta.rdev();
    Ok(NodeInfo {
        path: path.to_path_buf(),
        source,
        block: t.is_block_device(),
        major: u64::from(rustix::fs::major(rdev)),
        minor: u64::from(rustix::fs::minor(rdev)),
        gid: meta.gid(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_device_nodes_are_offered_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-device");
        std::fs::write(&file, "x").unwrap();
        let link = dir.path().join("zero-link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let serial = DeviceClass::try_from("serial").unwrap();
        let null = DeviceClass::try_from("null").unwrap();
        let config: BTreeMap<DeviceClass, DevicesFile> = [
            (
                null.clone(),
                DevicesFile {
                    paths: vec!["/dev/null".into(), "/dev/null".into()],
                    glob: vec!["/dev/zer*".into(), "/dev/nul*".into()],
                },
            ),
            (
                serial.clone(),
                DevicesFile {
                    // /dev/zero is offered as null already; a link to it is the same node.
                    paths: vec![file, "/dev/does-not-exist".into(), "/dev/zero".into(), link],
                    glob: vec![],
                },
            ),
        ]
        .into();
        let inv = inventory(&config);
        assert_eq!(inv.get(&null).unwrap(), &["/dev/null", "/dev/zero"]);
        assert!(!inv.contains_key(&serial), "{inv:?}");
        let info = node_info(Path::new("/dev/null")).unwrap();
        assert_eq!((info.block, info.major, info.minor), (false, 1, 3));
    }
}
