//! The device side of configs (rules in [`shoal_api::model::config`]): the hub resolves a
//! config's values for this device and sends them in the desired state; they are written
//! here, one read-only file per key, to `DATA_DIR/run/configs/{digest}`.
//!
//! - The directory is named by the files' digest (name, path and values), so replicas with
//!   the same values share it, and a directory never changes once written: it is written
//!   under a temporary name and renamed into place, so a replica never sees half of it.
//! - A directory lives while the desired state, a replica or a container still stopping uses
//!   it, and is swept after every change.
//! - WASM guests get it preopened read-only at the reference's path; containers a read-only
//!   bind mount (files 0444 in a 0555 directory). Variables taken from configs are already
//!   in the desired environment: the hub put them there.

use shoal_api::model::config::ConfigFiles;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::secrets::remove_readonly;
pub use crate::secrets::FileError;

/// Why a replica's config files could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {name:?}: {error}")]
    Key { name: String, error: String },
    #[error("config {name:?}: {error}")]
    File { name: String, error: FileError },
}

/// How directories being written start.
const TMP: &str = ".tmp-";

/// Numbers this process's temporary directories apart.
static NEXT_TMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The config files of one agent.
#[derive(Debug, Clone)]
pub struct ConfigDirs {
    root: PathBuf,
}

impl ConfigDirs {
    /// Configs under `DATA_DIR/run/configs`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("run").join("configs"),
        }
    }

    /// Creates the directory (owner-only; what a previous agent wrote stays for the
    /// containers it ran and this agent adopts) and removes what a previous agent left
    /// half-written.
    pub fn prepare(&self) -> Result<(), FileError> {
        std::fs::create_dir_all(&self.root)
            .and_then(|()| {
                std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|error| FileError {
                what: "create",
                path: self.root.clone(),
                error,
            })?;
        for e in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(TMP) {
                remove_readonly(&e.path());
            }
        }
        Ok(())
    }

    /// The replica's config files, written if missing: one read-only mount per reference.
    pub fn for_run(
        &self,
        files: &[ConfigFiles],
    ) -> Result<Vec<crate::runtime::Mount>, ConfigError> {
        let mut mounts = Vec::new();
        for f in files {
            // Variables only: they are in the desired environment already.
            let Some(path) = &f.path else { continue };
            let dir = self.root.join(f.digest());
            if !dir.is_dir() {
                self.write(f, &dir)?;
            }
            mounts.push(crate::runtime::Mount {
                host: dir,
                guest: path.clone(),
                read_only: true,
            });
        }
        Ok(mounts)
    }

    fn write(&self, f: &ConfigFiles, dest: &Path) -> Result<(), ConfigError> {
        let name = f.name.to_string();
        let file_error = |what: &'static str, path: &Path| {
            let (name, path) = (name.clone(), path.to_path_buf());
            move |error| ConfigError::File {
                name,
                error: FileError { what, path, error },
            }
        };
        // A name no other writer uses: two replicas with the same values may start at once.
        let n = NEXT_TMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .root
            .join(format!("{TMP}{}-{}-{n}", f.digest(), std::process::id()));
        remove_readonly(&tmp);
        std::fs::create_dir(&tmp).map_err(file_error("create", &tmp))?;
        for (k, v) in &f.data {
            // The key was checked on the hub; check again before it becomes a file name.
            shoal_api::model::secret::check_key(k).map_err(|error| ConfigError::Key {
                name: name.clone(),
                error,
            })?;
            let p = tmp.join(k);
            std::fs::write(&p, v).map_err(file_error("write", &p))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444))
                .map_err(file_error("set permissions of", &p))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555))
            .map_err(file_error("set permissions of", &tmp))?;
        match std::fs::rename(&tmp, dest) {
            Ok(()) => Ok(()),
            // Another replica wrote the same files meanwhile.
            Err(_) if dest.is_dir() => {
                remove_readonly(&tmp);
                Ok(())
            }
            Err(error) => Err(file_error("rename into", dest)(error)),
        }
    }

    /// Removes every directory whose digest is not in `keep` (not those being written).
    pub fn sweep(&self, keep: &BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) && !name.starts_with(TMP) {
                remove_readonly(&e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn files(path: &str, value: &str) -> ConfigFiles {
        ConfigFiles {
            name: "site".try_into().unwrap(),
            path: Some(path.into()),
            data: [("interval".to_string(), value.to_string())].into(),
        }
    }

    #[test]
    fn files_are_read_only_shared_by_content_and_swept_when_unused() {
        let dir = tempfile::tempdir().unwrap();
        let c = ConfigDirs::new(dir.path());
        c.prepare().unwrap();
        let a = c.for_run(&[files("/etc/site", "5")]).unwrap();
        let again = c.for_run(&[files("/etc/site", "5")]).unwrap();
        assert_eq!(a[0].host, again[0].host);
        assert!(a[0].read_only);
        assert_eq!(a[0].guest, "/etc/site");
        let f = a[0].host.join("interval");
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "5");
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o444
        );
        let b = c.for_run(&[files("/etc/site", "10")]).unwrap();
        assert_ne!(a[0].host, b[0].host);
        let keep: BTreeSet<String> = [files("/etc/site", "10").digest()].into();
        c.sweep(&keep);
        assert!(!a[0].host.exists());
        assert!(b[0].host.is_dir());
    }
}
