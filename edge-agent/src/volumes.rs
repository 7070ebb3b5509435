//! The device side of `spec.volumes` (rules in [`shoal_api::volume`]): one directory per
//! workload and volume, `DATA_DIR/volumes/{workload}/{volume}`, created before a run and
//! removed once no replica of the workload is desired or still stopping on this device.
//!
//! `DATA_DIR/volumes` is owner-only (0700), so other users of the device cannot reach into a
//! workload's data; each volume directory itself is 0777, as Kubernetes makes an `emptyDir`,
//! so a container whose image runs as a non-root user can still write to it.

use shoal_api::ids::WorkloadName;
use shoal_api::volume::Volume;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A volume as one run sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The directory on the device.
    pub host: PathBuf,
    /// Where the workload sees it.
    pub guest: String,
}

/// The volume directories of one agent.
#[derive(Debug, Clone)]
pub struct Volumes {
    root: PathBuf,
}

impl Volumes {
    /// Volumes under `root` (`DATA_DIR/volumes`).
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// Creates (or finds) the directories of `workload`'s volumes. Each volume is checked
    /// again here: its name becomes a path component.
    pub fn prepare(
        &self,
        workload: &WorkloadName,
        volumes: &[Volume],
    ) -> Result<Vec<Mount>, String> {
        if volumes.is_empty() {
            return Ok(Vec::new());
        }
        for v in volumes {
            v.check()?;
        }
        create_private(&self.root)?;
        let dir = self.root.join(workload.as_str());
        create_private(&dir)?;
        volumes
            .iter()
            .map(|v| {
                let host = dir.join(&v.name);
                std::fs::create_dir_all(&host)
                    .and_then(|()| {
                        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o777))
                    })
                    .map_err(|e| {
                        format!(
                            "cannot create volume {:?} at {}: {e}",
                            v.name,
                            host.display()
                        )
                    })?;
                Ok(Mount {
                    host,
                    guest: v.path.clone(),
                })
            })
            .collect()
    }

    /// Removes the volumes of every workload not in `keep`; returns the workloads whose
    /// volumes went. Errors are logged by the caller through the returned list's absence.
    pub fn remove_all_but(&self, keep: &BTreeSet<&str>) -> Vec<(String, Result<(), String>)> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new(); // no volume was ever made
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if keep.contains(name.as_str()) {
                continue;
            }
            let r = std::fs::remove_dir_all(e.path())
                .map_err(|err| format!("cannot remove {}: {err}", e.path().display()));
            out.push((name, r));
        }
        out
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn create_private(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vol(name: &str, path: &str) -> Volume {
        Volume {
            name: name.into(),
            path: path.into(),
        }
    }

    #[test]
    fn directories_are_made_kept_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let v = Volumes::new(tmp.path().join("volumes"));
        let web = WorkloadName::try_from("web").unwrap();
        let mounts = v.prepare(&web, &[vol("data", "/data")]).unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].guest, "/data");
        assert!(mounts[0].host.ends_with("volumes/web/data"));
        std::fs::write(mounts[0].host.join("n"), "1").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(v.root()), 0o700);
        assert_eq!(mode(&mounts[0].host), 0o777);
        // Again (a restart): the same directory, its content kept.
        let again = v.prepare(&web, &[vol("data", "/data")]).unwrap();
        assert_eq!(
            std::fs::read_to_string(again[0].host.join("n")).unwrap(),
            "1"
        );
        // Another workload's go, this one's stay.
        let db = WorkloadName::try_from("db").unwrap();
        v.prepare(&db, &[vol("x", "/x")]).unwrap();
        let gone = v.remove_all_but(&["web"].into());
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0, "db");
        assert!(gone[0].1.is_ok());
        assert!(again[0].host.join("n").exists());
        assert!(!v.root().join("db").exists());
    }

    #[test]
    fn a_bad_name_from_the_wire_makes_no_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let v = Volumes::new(tmp.path().join("volumes"));
        let web = WorkloadName::try_from("web").unwrap();
        let e = v.prepare(&web, &[vol("../../etc", "/data")]).unwrap_err();
        assert!(e.contains("volume name \"../../etc\" is invalid"), "{e}");
        assert!(!v.root().exists());
    }
}
