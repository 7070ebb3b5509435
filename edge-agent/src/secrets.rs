//! The device side of secrets (rules in [`shoal_api::secret`]): values arrive sealed to this
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

use shoal_api::ids::SecretName;
use shoal_api::secret::{DesiredSecretMount, SealedSecret, Secret};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

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
    pub fn prepare(&self) -> Result<(), String> {
        let run = self.root.parent().unwrap_or(&self.root);
        for d in [run, &self.root] {
            std::fs::create_dir_all(d)
                .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)))
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
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
    ) -> Vec<(SecretName, String)> {
        let mut failed = Vec::new();
        let mut key: Option<Result<String, String>> = None;
        for s in sealed {
            if !check_version(&s.version) {
                failed.push((
                    s.name.clone(),
                    format!("version {:?} is malformed", s.version),
                ));
                continue;
            }
            if self.dir(&s.name, &s.version).is_dir() {
                continue;
            }
            let key = key.get_or_insert_with(|| match key_path {
                None => Err("this agent runs --insecure and holds no device key".to_string()),
                Some(p) => std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read the device key {}: {e}", p.display())),
            });
            let r = key.clone().and_then(|pem| {
                let sealed = shoal_pki::secret::Sealed {
                    enc: shoal_api::secret::b64::decode(&s.enc)
                        .ok_or("its encapsulated key is not base64")?,
                    ciphertext: shoal_api::secret::b64::decode(&s.ciphertext)
                        .ok_or("its ciphertext is not base64")?,
                };
                let plain = shoal_pki::secret::open_on_device(
                    &pem,
                    device,
                    s.name.as_str(),
                    &s.version,
                    &sealed,
                )
                .map_err(|e| e.to_string())?;
                let secret = Secret::from_bytes(s.name.clone(), &plain)?;
                self.write(&secret, &s.version)
            });
            if let Err(why) = r {
                failed.push((s.name.clone(), why));
            }
        }
        failed
    }

    /// Writes one version's files under a temporary name, then renames it into place.
    fn write(&self, secret: &Secret, version: &str) -> Result<(), String> {
        let parent = self.root.join(secret.name.as_str());
        let io =
            |what: &str, p: &Path, e: std::io::Error| format!("cannot {what} {}: {e}", p.display());
        std::fs::create_dir_all(&parent).map_err(|e| io("create", &parent, e))?;
        let tmp = parent.join(format!(".tmp-{version}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(|e| io("create", &tmp, e))?;
        for (k, v) in &secret.data {
            // The key was checked on the hub; check again before it becomes a file name.
            shoal_api::secret::check_key(k)?;
            let f = tmp.join(k);
            std::fs::write(&f, v).map_err(|e| io("write", &f, e))?;
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o444))
                .map_err(|e| io("set permissions of", &f, e))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555))
            .map_err(|e| io("set permissions of", &tmp, e))?;
        let dest = self.dir(&secret.name, version);
        std::fs::rename(&tmp, &dest).map_err(|e| io("rename into", &dest, e))
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
    ) -> Result<(Vec<crate::runtime::Mount>, BTreeMap<String, String>), String> {
        let mut out = Vec::new();
        let mut env = BTreeMap::new();
        for m in mounts {
            let name = &m.mount.name;
            let dir = self.dir(name, &m.version);
            if !check_version(&m.version) || !dir.is_dir() {
                return Err(format!(
                    "secret {:?} (version {}) is not on this device: it was not delivered or could not be opened (see the agent's log)",
                    name.as_str(),
                    m.version
                ));
            }
            if let Some(path) = &m.mount.path {
                out.push(crate::runtime::Mount {
                    host: dir.clone(),
                    guest: path.clone(),
                    read_only: true,
                });
            }
            for (var, key) in &m.mount.env {
                shoal_api::secret::check_key(key)?;
                let bytes = std::fs::read(dir.join(key)).map_err(|e| {
                    format!(
                        "secret {:?} has no readable key {key:?} for {var}: {e}",
                        name.as_str()
                    )
                })?;
                let text = String::from_utf8(bytes).map_err(|_| {
                    format!(
                        "secret {:?} key {key:?} is not UTF-8 text, so it cannot be the environment variable {var}: mount it as a file",
                        name.as_str()
                    )
                })?;
                if text.contains('\0') {
                    return Err(format!(
                        "secret {:?} key {key:?} contains NUL, so it cannot be the environment variable {var}",
                        name.as_str()
                    ));
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
fn remove_readonly(dir: &Path) {
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use shoal_api::secret::SecretMount;

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
            enc: shoal_api::secret::b64::encode(&x.enc),
            ciphertext: shoal_api::secret::b64::encode(&x.ciphertext),
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
            .unwrap_err();
        assert!(e.contains("not UTF-8") && !e.contains("hunter2"), "{e}");
        let e = files
            .for_run(&[mount("db", "00bb", Some("/x"), &[])])
            .unwrap_err();
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
            .contains("malformed"));
        assert!(!files.dir(&s.name, "01").exists());
    }
}
