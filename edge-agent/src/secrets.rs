//! The device side of secrets (rules in [`shoal_api::model::secret`]): values arrive sealed to this
//! device's key inside the signed desired state; they are opened here and written, one
//! read-only file per key, to `DATA_DIR/run/secrets/{name}/{version}`.
//!
//! - `DATA_DIR/run` is owner-only (0700). A version's directory lives while the desired state,
//!   a replica or a container still stopping uses it, and is swept after every change (also
//!   across agent restarts: an adopted container keeps its bind mount). After a restart the
//!   agent re-opens what is missing from the (sealed) persisted desired state. Point the
//!   data directory's `run` at a tmpfs to keep values off the disk entirely.
//! - Each version has its own directory, written to a temporary name and renamed into place,
//!   so a replica never sees half a secret; directories of versions no replica uses are
//!   removed after every change.
//! - WASM guests get the directory preopened read-only at the mount's path; containers a
//!   read-only bind mount (files 0444 in a 0555 directory, so an image running as another
//!   user reads them too). `env` entries are read from the same files when a run starts.
//! - Nothing here logs a value: errors name the secret and the reason.

use shoal_api::model::ids::SecretName;
use shoal_api::model::secret::{DesiredSecretMount, SealedSecret, Secret};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A file operation on the secrets directory that failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what} {}: {error}", .path.display())]
pub struct FileError {
    /// What was done: `create`, `write`, `set permissions of`, `rename into`.
    pub what: &'static str,
    pub path: PathBuf,
    pub error: std::io::Error,
}

impl FileError {
    fn new(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |error| Self { what, path, error }
    }
}

/// Why a sealed secret could not be opened and written out; never says a value.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("version {0:?} is malformed")]
    Version(String),
    #[error(transparent)]
    DeviceKey(#[from] DeviceKeyError),
    #[error("its {0} is not base64")]
    NotBase64(&'static str),
    #[error(transparent)]
    Open(#[from] shoal_pki::secret::SecretError),
    /// The opened values are malformed, or a key is not a file name (the message names
    /// the secret or quotes the key).
    #[error("{0}")]
    Malformed(String),
    #[error(transparent)]
    Write(#[from] FileError),
}

/// Why the device key cannot open secrets. Read once for all the secrets of a desired
/// state, so the same error may be said of each (hence `Clone`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceKeyError {
    #[error("this agent runs --insecure and holds no device key")]
    Insecure,
    #[error("cannot read the device key {}: {error}", .path.display())]
    Read {
        path: PathBuf,
        error: std::sync::Arc<std::io::Error>,
    },
}

/// Why a replica cannot have its secrets (mounts and environment variables).
#[derive(Debug, thiserror::Error)]
pub enum ForRunError {
    #[error("secret {:?} (version {version}) is not on this device: it was not delivered or could not be opened (see the agent's log)", .name.as_str())]
    NotHere { name: SecretName, version: String },
    /// A key that cannot be a file name (the message quotes it).
    #[error("{0}")]
    Key(String),
    #[error("secret {:?} has no readable key {key:?} for {var}: {error}", .name.as_str())]
    Unreadable {
        name: SecretName,
        key: String,
        var: String,
        error: std::io::Error,
    },
    #[error("secret {:?} key {key:?} is not UTF-8 text, so it cannot be the environment variable {var}: mount it as a file", .name.as_str())]
    NotText {
        name: SecretName,
        key: String,
        var: String,
    },
    #[error("secret {:?} key {key:?} contains NUL, so it cannot be the environment variable {var}", .name.as_str())]
    Nul {
        name: SecretName,
        key: String,
        var: String,
    },
}

/// The opened secrets of one agent.
#[derive(Debug, Clone)]
pub struct SecretFiles {
    root: PathBuf,
}

impl SecretFiles {
    /// Secrets under `DATA_DIR/run/secrets`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("run").join("secrets"),
        }
    }

    /// Creates the owner-only `run` directory (and tightens it if it exists). What a previous
    /// agent opened stays: containers it ran and this agent adopts have it bind-mounted. The
    /// first sweep removes what no replica uses.
    pub fn prepare(&self) -> Result<(), FileError> {
        let run = self.root.parent().unwrap_or(&self.root);
        for d in [run, &self.root] {
            std::fs::create_dir_all(d)
                .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)))
                .map_err(FileError::new("create", d))?;
        }
        Ok(())
    }

    /// Where version `version` of secret `name` lives.
    pub fn dir(&self, name: &SecretName, version: &str) -> PathBuf {
        self.root.join(name.as_str()).join(version)
    }

    /// Opens each sealed secret not already on disk with the device key at `key_path` and
    /// writes it out. Returns the secrets that could not be opened, with the reason.
    pub fn open_all(
        &self,
        device: &str,
        key_path: Option<&Path>,
        sealed: &[SealedSecret],
    ) -> Vec<(SecretName, OpenError)> {
        let mut failed = Vec::new();
        let mut key: Option<Result<String, DeviceKeyError>> = None;
        for s in sealed {
            if !check_version(&s.version) {
                failed.push((s.name.clone(), OpenError::Version(s.version.clone())));
                continue;
            }
            if self.dir(&s.name, &s.version).is_dir() {
                continue;
            }
            let key = key.get_or_insert_with(|| match key_path {
                None => Err(DeviceKeyError::Insecure),
                Some(p) => std::fs::read_to_string(p).map_err(|e| DeviceKeyError::Read {
                    path: p.to_path_buf(),
                    error: std::sync::Arc::new(e),
                }),
            });
            let r = match key {
                Ok(pem) => self.open(pem, device, s),
                Err(e) => Err(e.clone().into()),
            };
            if let Err(why) = r {
                failed.push((s.name.clone(), why));
            }
        }
        failed
    }

    /// Opens one sealed secret with the device key `pem` and writes it out.
    fn open(&self, pem: &str, device: &str, s: &SealedSecret) -> Result<(), OpenError> {
        let sealed = shoal_pki::secret::Sealed {
            enc: shoal_api::model::secret::b64::decode(&s.enc)
                .ok_or(OpenError::NotBase64("encapsulated key"))?,
            ciphertext: shoal_api::model::secret::b64::decode(&s.ciphertext)
                .ok_or(OpenError::NotBase64("ciphertext"))?,
        };
        let plain =
            shoal_pki::secret::open_on_device(pem, device, s.name.as_str(), &s.version, &sealed)?;
        let secret = Secret::from_bytes(s.name.clone(), &plain).map_err(OpenError::Malformed)?;
        self.write(&secret, &s.version)
    }

    /// Writes one version's files under a temporary name, then renames it into place.
    fn write(&self, secret: &Secret, version: &str) -> Result<(), OpenError> {
        let parent = self.root.join(secret.name.as_str());
        std::fs::create_dir_all(&parent).map_err(FileError::new("create", &parent))?;
        let tmp = parent.join(format!(".tmp-{version}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(FileError::new("create", &tmp))?;
        for (k, v) in &secret.data {
            // The key was checked on the hub; check again before it becomes a file name.
            shoal_api::model::secret::check_key(k).map_err(OpenError::Malformed)?;
            let f = tmp.join(k);
            std::fs::write(&f, v).map_err(FileError::new("write", &f))?;
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o444))
                .map_err(FileError::new("set permissions of", &f))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555))
            .map_err(FileError::new("set permissions of", &tmp))?;
        let dest = self.dir(&secret.name, version);
        std::fs::rename(&tmp, &dest).map_err(FileError::new("rename into", &dest))?;
        Ok(())
    }

    /// Removes every version not in `keep` (name, version).
    pub fn sweep(&self, keep: &BTreeSet<(SecretName, String)>) {
        let Ok(names) = std::fs::read_dir(&self.root) else {
            return;
        };
        for n in names.flatten() {
            let name = n.file_name().to_string_lossy().into_owned();
            let Ok(versions) = std::fs::read_dir(n.path()) else {
                continue;
            };
            let mut left = 0;
            for v in versions.flatten() {
                let version = v.file_name().to_string_lossy().into_owned();
                let kept = SecretName::try_from(name.as_str())
                    .is_ok_and(|n| keep.contains(&(n, version.clone())));
                if kept {
                    left += 1;
                } else {
                    remove_readonly(&v.path());
                }
            }
            if left == 0 {
                let _ = std::fs::remove_dir(n.path());
            }
        }
    }

    /// A replica's view of its secrets: read-only mounts, and the environment variables
    /// taken from them. `Err` names the secret that is not on this device.
    pub fn for_run(
        &self,
        mounts: &[DesiredSecretMount],
    ) -> Result<(Vec<crate::runtime::Mount>, BTreeMap<String, String>), ForRunError> {
        let mut out = Vec::new();
        let mut env = BTreeMap::new();
        for m in mounts {
            let name = &m.mount.name;
            let dir = self.dir(name, &m.version);
            if !check_version(&m.version) || !dir.is_dir() {
                return Err(ForRunError::NotHere {
                    name: name.clone(),
                    version: m.version.clone(),
                });
            }
            if let Some(path) = &m.mount.path {
                out.push(crate::runtime::Mount {
                    host: dir.clone(),
                    guest: path.clone(),
                    read_only: true,
                });
            }
            for (var, key) in &m.mount.env {
                shoal_api::model::secret::check_key(key).map_err(ForRunError::Key)?;
                let bytes =
                    std::fs::read(dir.join(key)).map_err(|error| ForRunError::Unreadable {
                        name: name.clone(),
                        key: key.clone(),
                        var: var.clone(),
                        error,
                    })?;
                let text = String::from_utf8(bytes).map_err(|_| ForRunError::NotText {
                    name: name.clone(),
                    key: key.clone(),
                    var: var.clone(),
                })?;
                if text.contains('\0') {
                    return Err(ForRunError::Nul {
                        name: name.clone(),
                        key: key.clone(),
                        var: var.clone(),
                    });
                }
                env.insert(var.clone(), text);
            }
        }
        Ok((out, env))
    }
}

/// A version is a path component: hex digits only.
fn check_version(v: &str) -> bool {
    !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Removes a directory made read-only (0555): it must be writable to empty it.
pub(crate) fn remove_readonly(dir: &Path) {
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use shoal_api::model::secret::SecretMount;

    /// A device key and certificate from a throwaway CA.
    fn device(dir: &Path, name: &str) -> (PathBuf, String) {
        let ca = shoal_pki::ca::FleetCa::load_or_create(&dir.join("ca")).unwrap();
        let (key, csr) = shoal_pki::device::key_and_csr(name).unwrap();
        let cert = ca
            .sign_csr(&csr, name, std::time::Duration::from_secs(3600))
            .unwrap();
        let path = dir.join(format!("{name}.key"));
        std::fs::write(&path, key).unwrap();
        (path, cert)
    }

    fn sealed(
        cert: &str,
        dev: &str,
        name: &str,
        version: &str,
        data: &[(&str, &[u8])],
    ) -> SealedSecret {
        let s = Secret {
            name: SecretName::try_from(name).unwrap(),
            data: data
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
        };
        let x = shoal_pki::secret::seal_to_device(cert, dev, name, version, &s.to_bytes().unwrap())
            .unwrap();
        SealedSecret {
            name: s.name,
            version: version.into(),
            enc: shoal_api::model::secret::b64::encode(&x.enc),
            ciphertext: shoal_api::model::secret::b64::encode(&x.ciphertext),
        }
    }

    fn mount(
        name: &str,
        version: &str,
        path: Option<&str>,
        env: &[(&str, &str)],
    ) -> DesiredSecretMount {
        DesiredSecretMount {
            mount: SecretMount {
                name: SecretName::try_from(name).unwrap(),
                path: path.map(str::to_string),
                env: env
                    .iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect(),
            },
            version: version.into(),
        }
    }

    #[test]
    fn opens_writes_read_only_files_and_env_and_sweeps() {
        let tmp = tempfile::tempdir().unwrap();
        let (key, cert) = device(tmp.path(), "dev-a");
        let files = SecretFiles::new(&tmp.path().join("data"));
        files.prepare().unwrap();
        let s = sealed(
            &cert,
            "dev-a",
            "db",
            "00aa",
            &[("password", b"hunter2"), ("blob", &[0xff, 0])],
        );
        assert!(files
            .open_all("dev-a", Some(&key), std::slice::from_ref(&s))
            .is_empty());
        let dir = files.dir(&s.name, "00aa");
        assert_eq!(std::fs::read(dir.join("password")).unwrap(), b"hunter2");
        let mode = std::fs::metadata(dir.join("password"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444);
        let run = tmp.path().join("data/run");
        assert_eq!(
            std::fs::metadata(&run).unwrap().permissions().mode() & 0o777,
            0o700
        );

        let (mounts, env) = files
            .for_run(&[mount(
                "db",
                "00aa",
                Some("/etc/db"),
                &[("DB_PASSWORD", "password")],
            )])
            .unwrap();
        assert_eq!(env["DB_PASSWORD"], "hunter2");
        assert_eq!(mounts[0].guest, "/etc/db");
        assert!(mounts[0].read_only);
        // Binary values are files only; a version not delivered is said plainly.
        let e = files
            .for_run(&[mount("db", "00aa", None, &[("B", "blob")])])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not UTF-8") && !e.contains("hunter2"), "{e}");
        let e = files
            .for_run(&[mount("db", "00bb", Some("/x"), &[])])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not on this device"), "{e}");

        // Prepare keeps what is there; sweep keeps what is in use only.
        files.prepare().unwrap();
        assert!(dir.exists());
        files.sweep(&BTreeSet::from([(s.name.clone(), "00aa".to_string())]));
        assert!(dir.exists());
        files.sweep(&BTreeSet::new());
        assert!(!dir.exists());
        assert!(files.open_all("dev-a", Some(&key), &[s]).is_empty());
        assert!(dir.exists());
    }

    #[test]
    fn refuses_what_is_not_for_this_device() {
        let tmp = tempfile::tempdir().unwrap();
        let (key_a, cert_a) = device(tmp.path(), "dev-a");
        let (key_b, _) = device(tmp.path(), "dev-b");
        let files = SecretFiles::new(&tmp.path().join("data"));
        files.prepare().unwrap();
        let s = sealed(&cert_a, "dev-a", "db", "01", &[("k", b"v")]);
        // Another device's key, another device id, no key, a tampered version string.
        for (dev, key) in [
            ("dev-a", Some(key_b.as_path())),
            ("dev-b", Some(key_a.as_path())),
            ("dev-a", None),
        ] {
            let failed = files.open_all(dev, key, std::slice::from_ref(&s));
            assert_eq!(failed.len(), 1, "{dev} {key:?}");
        }
        let mut bad = s.clone();
        bad.version = "../../x".into();
        assert!(files.open_all("dev-a", Some(&key_a), &[bad])[0]
            .1
            .to_string()
            .contains("malformed"));
        assert!(!files.dir(&s.name, "01").exists());
    }
}
