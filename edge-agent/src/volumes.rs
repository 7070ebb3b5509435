//! The device side of `spec.volumes` (rules in [`shoal_api::model::volume`]): one directory per
//! workload and volume, `DATA_DIR/volumes/{workload}/{volume}`, created before a run and
//! removed once no replica of the workload has been desired, running or stopping on this
//! device for the retention period (`shoal-agent run --volume-retention`, default 24h).
//!
//! `DATA_DIR/volumes` is owner-only (0700), so other users of the device cannot reach into a
//! workload's data; each volume directory itself is 0777, as Kubernetes makes an `emptyDir`,
//! so a container whose image runs as a non-root user can still write to it.

use shoal_api::model::ids::WorkloadName;
use shoal_api::model::volume::Volume;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A volume as one run sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The directory on the device.
    pub host: PathBuf,
    /// Where the workload sees it.
    pub guest: String,
    /// Read-only for the workload (secrets); volumes are read-write.
    pub read_only: bool,
}

/// Why a workload's volume directories cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The volume's name or path is refused (the message quotes it).
    #[error("{0}")]
    Invalid(String),
    #[error("cannot create {}: {error}", .path.display())]
    Create {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot create volume {name:?} at {}: {error}", .path.display())]
    CreateVolume {
        name: String,
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Marks a workload's volume directory as orphaned since a time (ms since the epoch).
const ORPHANED: &str = ".orphaned";

/// What a sweep did to one workload's volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swept {
    /// The workload just left: its volumes are kept for the retention period.
    Orphaned(String),
    /// Gone longer than the retention period: moved to this trash directory, to delete.
    Expired(String, PathBuf),
    Failed(String, String),
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
    ) -> Result<Vec<Mount>, VolumeError> {
        if volumes.is_empty() {
            return Ok(Vec::new());
        }
        for v in volumes {
            v.check().map_err(VolumeError::Invalid)?;
        }
        create_private(&self.root)?;
        let dir = self.root.join(workload.as_str());
        create_private(&dir)?;
        // Back within the retention period: the data is there, and no longer orphaned.
        let _ = std::fs::remove_file(dir.join(ORPHANED));
        volumes
            .iter()
            .map(|v| {
                let host = dir.join(&v.name);
                std::fs::create_dir_all(&host)
                    .and_then(|()| {
                        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o777))
                    })
                    .map_err(|error| VolumeError::CreateVolume {
                        name: v.name.clone(),
                        path: host.clone(),
                        error,
                    })?;
                Ok(Mount {
                    host,
                    guest: v.path.clone(),
                    read_only: false,
                })
            })
            .collect()
    }

    /// Looks at the volumes of every workload not in `keep` (no longer desired or running
    /// here). A workload's volumes are kept for `retention` after it left, in case it comes
    /// back (a device that was lost for a while and got its replicas back, a drain undone):
    /// the first sweep that finds them orphaned notes the time in `.orphaned`, and one after
    /// `retention` has passed moves them to `.trash-…` (a rename: instant, so the main loop
    /// never waits on a large delete) for the caller to delete in the background. A workload
    /// in `keep` loses its mark.
    pub fn sweep(&self, keep: &BTreeSet<&str>, now_ms: u64, retention: Duration) -> Vec<Swept> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new(); // no volume was ever made
        };
        let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // trash (workload names never start with a dot)
            }
            let mark = e.path().join(ORPHANED);
            if keep.contains(name.as_str()) {
                let _ = std::fs::remove_file(&mark);
                continue;
            }
            let since = match std::fs::read_to_string(&mark)
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
            {
                Some(t) => t,
                None => {
                    if let Err(err) = std::fs::write(&mark, now_ms.to_string()) {
                        out.push(Swept::Failed(
                            name,
                            format!("cannot mark {}: {err}", mark.display()),
                        ));
                        continue;
                    }
                    out.push(Swept::Orphaned(name.clone()));
                    now_ms
                }
            };
            if now_ms.saturating_sub(since) < retention_ms {
                continue;
            }
            let trash = self.root.join(format!(".trash-{name}-{now_ms}"));
            match std::fs::rename(e.path(), &trash) {
                Ok(()) => out.push(Swept::Expired(name, trash)),
                Err(err) => out.push(Swept::Failed(
                    name,
                    format!("cannot move {} aside: {err}", e.path().display()),
                )),
            }
        }
        out
    }

    /// Trash left by an earlier run (it stopped before deleting it).
    pub fn leftover_trash(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".trash-"))
            .map(|e| e.path())
            .collect()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn create_private(dir: &Path) -> Result<(), VolumeError> {
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|error| VolumeError::Create {
            path: dir.to_path_buf(),
            error,
        })
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
    fn directories_are_made_kept_and_removed_after_the_retention() {
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

        let hour = Duration::from_secs(3600);
        let db = WorkloadName::try_from("db").unwrap();
        v.prepare(&db, &[vol("x", "/x")]).unwrap();
        // web stays; db just left: marked, kept.
        let keep: BTreeSet<&str> = ["web"].into();
        assert_eq!(v.sweep(&keep, 1_000, hour), [Swept::Orphaned("db".into())]);
        assert!(
            v.sweep(&keep, 1_000 + 3_599_999, hour).is_empty(),
            "within the hour"
        );
        // Back within the hour: unmarked, data intact; leaves again: a fresh hour.
        v.prepare(&db, &[vol("x", "/x")]).unwrap();
        assert!(v.sweep(&["web", "db"].into(), 2_000_000, hour).is_empty());
        assert_eq!(
            v.sweep(&keep, 3_000_000, hour),
            [Swept::Orphaned("db".into())]
        );
        // An hour later it is moved to the trash; web is untouched.
        let swept = v.sweep(&keep, 3_000_000 + 3_600_000, hour);
        let [Swept::Expired(name, trash)] = swept.as_slice() else {
            panic!("{swept:?}")
        };
        assert_eq!(name, "db");
        assert!(trash.join("x").is_dir() && !v.root().join("db").exists());
        assert_eq!(v.leftover_trash(), std::slice::from_ref(trash));
        assert!(again[0].host.join("n").exists());
        // Without retention, gone at the first sweep.
        let logs = WorkloadName::try_from("logs").unwrap();
        v.prepare(&logs, &[vol("l", "/l")]).unwrap();
        let swept = v.sweep(&keep, 9_000_000, Duration::ZERO);
        assert_eq!(swept.len(), 2, "{swept:?}");
        assert!(
            matches!(&swept[1], Swept::Expired(n, _) if n == "logs"),
            "{swept:?}"
        );
    }

    #[test]
    fn a_bad_name_from_the_wire_makes_no_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let v = Volumes::new(tmp.path().join("volumes"));
        let web = WorkloadName::try_from("web").unwrap();
        let e = v
            .prepare(&web, &[vol("../../etc", "/data")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("volume name \"../../etc\" is invalid"), "{e}");
        assert!(!v.root().exists());
    }
}
