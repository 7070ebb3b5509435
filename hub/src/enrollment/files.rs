//! Tokens and enrollment records as files in `DATA_DIR/pki`, for a single hub.

use super::*;
use std::path::{Path, PathBuf};

/// Tokens and records as files in `DATA_DIR/pki`, for a single hub.
#[derive(Debug, Clone)]
pub struct Files {
    /// Claims and renewals of this process, one at a time (a single hub uses files: no
    /// other process writes records).
    lock: std::sync::Arc<std::sync::Mutex<()>>,
    pki: PathBuf,
    tokens: PathBuf,
    devices: PathBuf,
    grants: PathBuf,
}

impl Files {
    pub fn new(pki_dir: &Path) -> Self {
        Files {
            lock: Default::default(),
            pki: pki_dir.to_path_buf(),
            tokens: pki_dir.join("tokens"),
            devices: pki_dir.join("devices"),
            grants: pki_dir.join("grants"),
        }
    }

    fn token_path(&self, id: &str) -> PathBuf {
        self.tokens.join(format!("{id}.json"))
    }
}

pub(super) fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> EnrollError {
    let path = path.display().to_string();
    move |source| {
        EnrollError::Pki(PkiError::Io {
            action,
            path,
            source,
        })
    }
}

/// A token file's "version": a token is claimed by renaming its file away (to `{id}.used`),
/// which only one process can do, so the version only tells unused from used.
const UNUSED: Version = 1;
const USED: Version = 2;

impl Files {
    fn used_path(&self, id: &str) -> PathBuf {
        self.tokens.join(format!("{id}.used"))
    }

    fn record_path(&self, device: &DeviceId) -> PathBuf {
        self.devices.join(format!("{device}.pem"))
    }

    /// The files in `dir` named `{name}{ext}`, as (name, path); none if `dir` is missing.
    fn list(&self, dir: &Path, ext: &str) -> Result<Vec<(String, PathBuf)>, EnrollError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("list", dir)(e)),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(io("list", dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(ext) {
                out.push((stem.to_string(), e.path()));
            }
        }
        Ok(out)
    }
}

impl Enrollments for Files {
    fn token(&self, id: &str) -> Result<Option<(TokenRecord, Version)>, EnrollError> {
        for (path, version) in [(self.token_path(id), UNUSED), (self.used_path(id), USED)] {
            match std::fs::read(&path) {
                Ok(b) => {
                    let r = TokenRecord::from_json(&b, &path.display().to_string())?;
                    return Ok(Some((r, version)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("read", &path)(e)),
            }
        }
        Ok(None)
    }

    fn create_token(&self, id: &str, record: &TokenRecord) -> Result<bool, EnrollError> {
        use std::os::unix::fs::PermissionsExt;
        // Owner-only: the directory and each token.
        std::fs::create_dir_all(&self.tokens).map_err(io("create directory", &self.tokens))?;
        std::fs::set_permissions(&self.tokens, std::fs::Permissions::from_mode(0o700))
            .map_err(io("restrict permissions of", &self.tokens))?;
        if self.used_path(id).exists() {
            return Ok(false);
        }
        Ok(shoal_pki::write_new(
            &self.token_path(id),
            &record.to_json(),
            0o600,
        )?)
    }

    fn claim_token(
        &self,
        id: &str,
        expected: Version,
        used: &TokenRecord,
        device: &DeviceId,
        cert_pem: &str,
        grant: &Grant,
    ) -> Result<bool, EnrollError> {
        if expected != UNUSED {
            return Ok(false);
        }
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = grant.fresh;
        // The rename is the atomic claim of the token.
        let (path, used_path) = (self.token_path(id), self.used_path(id));
        match std::fs::rename(&path, &used_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io("claim", &path)(e)),
        }
        let recorded = if fresh {
            shoal_pki::write_new(&self.record_path(device), cert_pem.as_bytes(), 0o644)
                .map_err(EnrollError::from)
        } else {
            self.record(device, cert_pem).map(|()| true)
        };
        match recorded {
            Ok(true) => {
                shoal_pki::write_atomic(&used_path, &used.to_json(), 0o600)?;
                // The grant is written after the claim (three files cannot change in one
                // step): a crash in between leaves the device enrolled without its labels,
                // fewer rights, never more; the operator sets them with `shoal label`.
                std::fs::create_dir_all(&self.grants)
                    .map_err(io("create directory", &self.grants))?;
                let path = self.grants.join(format!("{device}.json"));
                shoal_pki::write_atomic(&path, &grant_json(grant), 0o600)?;
                Ok(true)
            }
            other => {
                // The id was taken meanwhile (or the record could not be written): the
                // token goes back as it was.
                std::fs::rename(&used_path, &path).map_err(io("restore", &path))?;
                other
            }
        }
    }

    fn record(&self, device: &DeviceId, cert_pem: &str) -> Result<(), EnrollError> {
        // Durable before the certificate is handed out (fsync, then rename).
        let path = self.record_path(device);
        Ok(shoal_pki::write_atomic(&path, cert_pem.as_bytes(), 0o644)?)
    }

    fn renew_record(
        &self,
        device: &DeviceId,
        expected: &str,
        cert_pem: &str,
    ) -> Result<bool, EnrollError> {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.enrolled_cert(device)?.as_deref() != Some(expected) {
            return Ok(false);
        }
        self.record(device, cert_pem).map(|()| true)
    }

    fn adopt_record(&self, device: &DeviceId, cert_pem: &str) -> Result<bool, EnrollError> {
        shoal_pki::write_new(&self.record_path(device), cert_pem.as_bytes(), 0o644)
            .map_err(EnrollError::from)
    }

    fn enrolled_cert(&self, device: &DeviceId) -> Result<Option<String>, EnrollError> {
        let path = self.record_path(device);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &path)(e)),
        }
    }

    fn grant(&self, device: &DeviceId) -> Result<Option<Grant>, EnrollError> {
        let path = self.grants.join(format!("{device}.json"));
        match std::fs::read(&path) {
            Ok(b) => parse_grant(&b, &path.display().to_string()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &path)(e)),
        }
    }

    fn grants(&self) -> Result<Vec<(DeviceId, Grant)>, EnrollError> {
        let mut out = Vec::new();
        for (name, path) in self.list(&self.grants, ".json")? {
            let Ok(device) = DeviceId::try_from(name.as_str()) else {
                continue;
            };
            let b = std::fs::read(&path).map_err(io("read", &path))?;
            out.push((device, parse_grant(&b, &path.display().to_string())?));
        }
        Ok(out)
    }

    fn entry(&self, shelf: Shelf, name: &str) -> Result<Option<Vec<u8>>, EnrollError> {
        let path = self.pki.join(shelf.dir()).join(format!("{name}.json"));
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &path)(e)),
        }
    }

    fn put_entry(&self, shelf: Shelf, name: &str, bytes: &[u8]) -> Result<(), EnrollError> {
        let dir = self.pki.join(shelf.dir());
        shoal_pki::private_dir(&dir)?;
        Ok(shoal_pki::write_atomic(
            &dir.join(format!("{name}.json")),
            bytes,
            0o600,
        )?)
    }

    fn entries_on(&self, shelf: Shelf) -> Result<Vec<(String, Vec<u8>)>, EnrollError> {
        let mut out = Vec::new();
        for (name, path) in self.list(&self.pki.join(shelf.dir()), ".json")? {
            out.push((name, std::fs::read(&path).map_err(io("read", &path))?));
        }
        Ok(out)
    }
}

/// Copies the records and unused tokens of `files` (a hub's `DATA_DIR/pki`) into `book`
/// where it has none of its own (a hub moving to etcd keeps its devices); returns how many.
pub fn adopt_files(files: &Files, book: &dyn Enrollments) -> Result<usize, EnrollError> {
    let mut adopted = 0;
    for (name, path) in files.list(&files.devices, ".pem")? {
        let Ok(device) = DeviceId::try_from(name.as_str()) else {
            continue;
        };
        let cert = std::fs::read_to_string(&path).map_err(io("read", &path))?;
        adopted += usize::from(book.adopt_record(&device, &cert)?);
    }
    for (id, path) in files.list(&files.tokens, ".json")? {
        if !token::valid_id(&id) {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(io("read", &path))?;
        let record = TokenRecord::from_json(&bytes, &path.display().to_string())?;
        adopted += usize::from(book.create_token(&id, &record)?);
    }
    Ok(adopted)
}
