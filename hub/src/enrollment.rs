//! Join tokens and enrollment records: where they live, and the one way they are used.
//!
//! A token is issued by `shoal-hub token create` (while the hub runs, in another process)
//! and claimed once by an enrollment; an enrollment record is the latest certificate issued
//! to a device: it says the device is enrolled (renewals need it) and holds the key secrets
//! are sealed to. Both live behind [`Enrollments`]:
//!
//! - [`Files`], in `DATA_DIR/pki/tokens/{id}.json` and `DATA_DIR/pki/devices/{id}.pem`, for a
//!   single hub (sled locks its database to one process, so tokens cannot go there);
//! - `EtcdStore` (in [`crate::etcd`]), under `{prefix}.enroll/tokens/{id}` and
//!   `{prefix}.enroll/devices/{id}`, for hub replicas: a token created against etcd enrolls through
//!   any replica, a device enrolled through one is known to all, and it survives the loss of
//!   any replica's disk.
//!
//! Claiming is one atomic step ([`Enrollments::claim_token`]): the token's record, still
//! as it was read, becomes a used one, and the device's record is written, for an unbound
//! token only if the id has none yet. So of two enrollments racing with one token, or two
//! unbound tokens racing for one new id, on one hub or on two replicas, exactly one wins.
//! Records are written by any replica, not only the leader, and are not fenced: nothing
//! the leader decides depends on them, and enrolling must not wait for a failover.

use crate::store::StoreError;
use shoal_api::ids::DeviceId;
use shoal_api::labels::{Grant, Labels};
use shoal_pki::token::{self, JoinToken, TokenError, TokenRecord};
use shoal_pki::PkiError;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The token does not allow this enrollment (the caller's fault: 403).
    #[error(transparent)]
    Refused(#[from] TokenError),
    /// The device was revoked: no token enrolls it again (the caller's fault: 403).
    #[error("device {0:?} was revoked (`shoal-hub device revoke`): it cannot enroll again; give the board another device id")]
    Revoked(String),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A version of a token record, for [`Enrollments::claim_token`].
pub type Version = i64;

/// Where tokens and enrollment records live. Calls block (files, or a round trip to etcd):
/// async callers use `spawn_blocking`.
pub trait Enrollments: Send + Sync {
    /// Token `id`'s record and its version, if there is one. `id` is a valid token id.
    fn token(&self, id: &str) -> Result<Option<(TokenRecord, Version)>, EnrollError>;
    /// Writes a new token's record; `false` if token `id` exists (nothing written).
    fn create_token(&self, id: &str, record: &TokenRecord) -> Result<bool, EnrollError>;
    /// In one step: token `id`'s record, if still at version `expected`, becomes `used`,
    /// `cert_pem` becomes `device`'s record (if `grant.fresh` only when it has none yet), and
    /// `grant` what the token granted it. `false`: a condition failed, nothing was written.
    fn claim_token(
        &self,
        id: &str,
        expected: Version,
        used: &TokenRecord,
        device: &DeviceId,
        cert_pem: &str,
        grant: &Grant,
    ) -> Result<bool, EnrollError>;
    /// What the token `device` last enrolled with granted it.
    fn grant(&self, device: &DeviceId) -> Result<Option<Grant>, EnrollError>;
    /// Every device's grant (a new leader applies those it has not yet).
    fn grants(&self) -> Result<Vec<(DeviceId, Grant)>, EnrollError>;
    /// Records `cert_pem` as `device`'s latest certificate (a renewal), durably.
    fn record(&self, device: &DeviceId, cert_pem: &str) -> Result<(), EnrollError>;
    /// [`Enrollments::record`] only if `device`'s record is still `expected` (a renewal must
    /// not undo an enrollment that replaced the record meanwhile); `false`: it was not.
    fn renew_record(
        &self,
        device: &DeviceId,
        expected: &str,
        cert_pem: &str,
    ) -> Result<bool, EnrollError>;
    /// Records `cert_pem` for `device` unless it has a record; `false`: it had one.
    fn adopt_record(&self, device: &DeviceId, cert_pem: &str) -> Result<bool, EnrollError>;
    /// The certificate `device` was last issued, if it is enrolled.
    fn enrolled_cert(&self, device: &DeviceId) -> Result<Option<String>, EnrollError>;
    /// The record `name` on `shelf`, if there is one (see [`crate::access`]).
    fn entry(&self, shelf: Shelf, name: &str) -> Result<Option<Vec<u8>>, EnrollError>;
    /// Writes the record `name` on `shelf` (replacing it), durably.
    fn put_entry(&self, shelf: Shelf, name: &str, bytes: &[u8]) -> Result<(), EnrollError>;
    /// Every record on `shelf`, as (name, bytes).
    fn entries_on(&self, shelf: Shelf) -> Result<Vec<(String, Vec<u8>)>, EnrollError>;
}

/// The book's other records, each a JSON document under a name (see [`crate::access`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shelf {
    /// Revoked devices, by device id.
    Revoked,
    /// Named operators, by name.
    Operators,
}

impl Shelf {
    /// Its directory (files) or key segment (etcd).
    pub fn dir(self) -> &'static str {
        match self {
            Shelf::Revoked => "revoked",
            Shelf::Operators => "operators",
        }
    }
}

/// Issues a join token for the CA whose hash is `ca_hash`, valid `ttl_ms` from `now_ms`,
/// bound to `device` if given, granting `labels` to the device it enrolls.
pub fn issue(
    book: &dyn Enrollments,
    ca_hash: &str,
    now_ms: u64,
    ttl_ms: u64,
    device: Option<&DeviceId>,
    labels: Labels,
) -> Result<JoinToken, EnrollError> {
    let t = JoinToken::generate(ca_hash);
    let record = TokenRecord::new(&t, now_ms, ttl_ms, device.map(DeviceId::as_str), labels);
    // A random 64-bit id is new; if it were not, the token would not be issued.
    if book.create_token(&t.id, &record)? {
        Ok(t)
    } else {
        Err(token::refused(&t.id, "a token with this id exists; create another").into())
    }
}

/// Checks token `id`/`secret` for enrolling `device` at `now_ms`, claims it (it can never be
/// used again) and records `cert_pem` as the device's certificate and what the token
/// granted it, which it returns. A refused token stays as it was, and nothing is recorded.
pub fn claim(
    book: &dyn Enrollments,
    id: &str,
    secret: &str,
    device: &DeviceId,
    cert_pem: &str,
    now_ms: u64,
) -> Result<Grant, EnrollError> {
    if !token::valid_id(id) {
        return Err(token::refused(id, token::UNKNOWN).into());
    }
    let Some((record, version)) = book.token(id)? else {
        return Err(token::refused(id, token::UNKNOWN).into());
    };
    if crate::access::revoked(book, device)? {
        return Err(EnrollError::Revoked(device.to_string()));
    }
    let enrolled = book.enrolled_cert(device)?.is_some();
    record.check(id, secret, device.as_str(), enrolled, now_ms)?;
    let fresh = record.bound_to().is_none();
    let grant = Grant {
        token: id.to_string(),
        labels: record.labels().clone(),
        fresh,
    };
    let used = record.used(device.as_str(), now_ms);
    if book.claim_token(id, version, &used, device, cert_pem, &grant)? {
        return Ok(grant);
    }
    // Lost a race: to another enrollment with this token, or for this id.
    if fresh && book.enrolled_cert(device)?.is_some() {
        Err(token::refused(id, token::ENROLLED).into())
    } else {
        Err(token::refused(id, token::USED).into())
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

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> EnrollError {
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

/// A grant as the book stores it.
pub fn grant_json(g: &Grant) -> Vec<u8> {
    // Strings and a map of strings: serializing cannot fail.
    serde_json::to_vec(g).unwrap_or_default()
}

/// A stored grant; `whence` names its file or key in the error.
pub fn parse_grant(bytes: &[u8], whence: &str) -> Result<Grant, EnrollError> {
    serde_json::from_slice(bytes).map_err(|e| {
        EnrollError::Pki(PkiError::BadFile {
            what: "label grant",
            path: whence.to_string(),
            reason: e.to_string(),
        })
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// Token records by id, certificates by device, grants by device, shelved records.
    type Books = (
        BTreeMap<String, (TokenRecord, Version)>,
        BTreeMap<DeviceId, String>,
        BTreeMap<DeviceId, Grant>,
        BTreeMap<(&'static str, String), Vec<u8>>,
    );

    /// An in-memory [`Enrollments`]: one lock makes each call atomic.
    #[derive(Default)]
    struct Fake {
        state: Mutex<Books>,
    }

    impl Enrollments for Fake {
        fn token(&self, id: &str) -> Result<Option<(TokenRecord, Version)>, EnrollError> {
            Ok(self.state.lock().unwrap().0.get(id).cloned())
        }
        fn create_token(&self, id: &str, record: &TokenRecord) -> Result<bool, EnrollError> {
            let mut s = self.state.lock().unwrap();
            if s.0.contains_key(id) {
                return Ok(false);
            }
            s.0.insert(id.to_string(), (record.clone(), 1));
            Ok(true)
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
            let mut s = self.state.lock().unwrap();
            let version = s.0.get(id).map_or(0, |(_, v)| *v);
            if version != expected || (grant.fresh && s.1.contains_key(device)) {
                return Ok(false);
            }
            s.0.insert(id.to_string(), (used.clone(), version + 1));
            s.1.insert(device.clone(), cert_pem.to_string());
            s.2.insert(device.clone(), grant.clone());
            Ok(true)
        }
        fn grant(&self, device: &DeviceId) -> Result<Option<Grant>, EnrollError> {
            Ok(self.state.lock().unwrap().2.get(device).cloned())
        }
        fn grants(&self) -> Result<Vec<(DeviceId, Grant)>, EnrollError> {
            Ok(self.state.lock().unwrap().2.clone().into_iter().collect())
        }
        fn record(&self, device: &DeviceId, cert_pem: &str) -> Result<(), EnrollError> {
            let mut s = self.state.lock().unwrap();
            s.1.insert(device.clone(), cert_pem.to_string());
            Ok(())
        }
        fn renew_record(
            &self,
            device: &DeviceId,
            expected: &str,
            cert_pem: &str,
        ) -> Result<bool, EnrollError> {
            let mut s = self.state.lock().unwrap();
            if s.1.get(device).map(String::as_str) != Some(expected) {
                return Ok(false);
            }
            s.1.insert(device.clone(), cert_pem.to_string());
            Ok(true)
        }
        fn adopt_record(&self, device: &DeviceId, cert_pem: &str) -> Result<bool, EnrollError> {
            let mut s = self.state.lock().unwrap();
            if s.1.contains_key(device) {
                return Ok(false);
            }
            s.1.insert(device.clone(), cert_pem.to_string());
            Ok(true)
        }
        fn enrolled_cert(&self, device: &DeviceId) -> Result<Option<String>, EnrollError> {
            Ok(self.state.lock().unwrap().1.get(device).cloned())
        }
        fn entry(&self, shelf: Shelf, name: &str) -> Result<Option<Vec<u8>>, EnrollError> {
            let s = self.state.lock().unwrap();
            Ok(s.3.get(&(shelf.dir(), name.to_string())).cloned())
        }
        fn put_entry(&self, shelf: Shelf, name: &str, bytes: &[u8]) -> Result<(), EnrollError> {
            let mut s = self.state.lock().unwrap();
            s.3.insert((shelf.dir(), name.to_string()), bytes.to_vec());
            Ok(())
        }
        fn entries_on(&self, shelf: Shelf) -> Result<Vec<(String, Vec<u8>)>, EnrollError> {
            let s = self.state.lock().unwrap();
            Ok(s.3
                .iter()
                .filter(|((d, _), _)| *d == shelf.dir())
                .map(|((_, n), b)| (n.clone(), b.clone()))
                .collect())
        }
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::try_from(s).unwrap()
    }

    /// The same story on every implementation: a token enrolls once and records the device,
    /// a refused one stays usable and records nothing, a bound one re-enrolls its device,
    /// a stale version claims nothing, nonsense ids name no file.
    fn tokens_are_used_once(book: &dyn Enrollments) {
        let ca = "a".repeat(64);
        let t = issue(book, &ca, 1000, 500, None, Labels::new()).unwrap();
        let e = claim(book, &t.id, &"0".repeat(32), &id("d"), "C0", 1001).unwrap_err();
        assert!(matches!(e, EnrollError::Refused(_)), "{e}");
        assert!(e.to_string().contains("wrong secret"), "{e}");
        assert_eq!(book.enrolled_cert(&id("d")).unwrap(), None);
        claim(book, &t.id, t.secret(), &id("d"), "C1", 1001).unwrap();
        assert_eq!(book.enrolled_cert(&id("d")).unwrap().as_deref(), Some("C1"));
        assert_eq!(book.enrolled_cert(&id("e")).unwrap(), None);
        let e = claim(book, &t.id, t.secret(), &id("x"), "C", 1002).unwrap_err();
        assert!(e.to_string().contains("already used"), "{e}");
        let e = claim(book, "0123456789abcdef", t.secret(), &id("x"), "C", 1002).unwrap_err();
        assert!(e.to_string().contains("no such token"), "{e}");
        // An unbound token cannot take over an enrolled id; one bound to it can.
        let u = issue(book, &ca, 1000, 500, None, Labels::new()).unwrap();
        let e = claim(book, &u.id, u.secret(), &id("d"), "C", 1001).unwrap_err();
        assert!(e.to_string().contains("enrolled already"), "{e}");
        let labels: Labels = [("role".to_string(), "vault".to_string())].into();
        let b = issue(book, &ca, 1000, 500, Some(&id("d")), labels.clone()).unwrap();
        let grant = claim(book, &b.id, b.secret(), &id("d"), "C2", 1001).unwrap();
        assert_eq!(
            (&grant.token, &grant.labels, grant.fresh),
            (&b.id, &labels, false)
        );
        // The book keeps what it granted, with the claim; the used record does too.
        assert_eq!(book.grant(&id("d")).unwrap(), Some(grant.clone()));
        assert!(book.grants().unwrap().contains(&(id("d"), grant)));
        assert_eq!(book.token(&b.id).unwrap().unwrap().0.labels(), &labels);
        assert_eq!(book.enrolled_cert(&id("d")).unwrap().as_deref(), Some("C2"));
        // A renewal replaces the record; adopting does not.
        book.record(&id("d"), "C3").unwrap();
        assert!(!book.adopt_record(&id("d"), "C4").unwrap());
        assert_eq!(book.enrolled_cert(&id("d")).unwrap().as_deref(), Some("C3"));
        // A claim against a version read before another one changed nothing; neither does
        // a fresh claim for an id that got enrolled meanwhile.
        let (rec, v) = book.token(&u.id).unwrap().unwrap();
        let used = rec.clone().used("e", 1001);
        let fresh = Grant {
            token: u.id.clone(),
            labels: Labels::new(),
            fresh: true,
        };
        assert!(!book
            .claim_token(&u.id, v, &used, &id("d"), "C", &fresh)
            .unwrap());
        assert!(book
            .claim_token(&u.id, v, &used, &id("e"), "C5", &fresh)
            .unwrap());
        assert!(!book
            .claim_token(&u.id, v, &used, &id("f"), "C", &fresh)
            .unwrap());
        assert_eq!(book.enrolled_cert(&id("f")).unwrap(), None);
        let e = claim(book, "../../etc/passwd", t.secret(), &id("d"), "C", 1000).unwrap_err();
        assert!(e.to_string().contains("no such token"), "{e}");
    }

    #[test]
    fn files_use_a_token_once() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path());
        tokens_are_used_once(&files);
        // Used tokens stay as records of who used them; no temporary files are left.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("tokens"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| n.ends_with(".used")), "{names:?}");
        assert_eq!(names.len(), 3, "{names:?}");
        let devices = std::fs::read_dir(dir.path().join("devices"))
            .unwrap()
            .count();
        assert_eq!(devices, 2, "d and e, no temporary files");
    }

    #[test]
    fn the_fake_uses_a_token_once() {
        tokens_are_used_once(&Fake::default());
    }

    #[test]
    fn a_hub_moving_to_another_store_keeps_its_devices_and_unused_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path());
        let t = issue(&files, &"a".repeat(64), 1000, 500, None, Labels::new()).unwrap();
        let used = issue(&files, &"a".repeat(64), 1000, 500, None, Labels::new()).unwrap();
        claim(&files, &used.id, used.secret(), &id("d"), "C1", 1001).unwrap();
        let book = Fake::default();
        book.record(&id("e"), "theirs").unwrap();
        files.record(&id("e"), "ours").unwrap();
        assert_eq!(adopt_files(&files, &book).unwrap(), 2, "d's record and t");
        assert_eq!(adopt_files(&files, &book).unwrap(), 0, "once");
        assert_eq!(book.enrolled_cert(&id("d")).unwrap().as_deref(), Some("C1"));
        assert_eq!(
            book.enrolled_cert(&id("e")).unwrap().as_deref(),
            Some("theirs")
        );
        claim(&book, &t.id, t.secret(), &id("f"), "C2", 1001).unwrap();
        assert!(book.token(&used.id).unwrap().is_none());
    }

    /// Four threads, one token (or four unbound tokens, one new id): one enrollment wins.
    fn one_of_racing_claims_wins(book: &(dyn Enrollments + Sync), rounds: usize) {
        for round in 0..rounds {
            let same_token = round % 2 == 0;
            let tokens: Vec<JoinToken> = (0..4)
                .map(|_| issue(book, &"a".repeat(64), 1000, 60_000, None, Labels::new()).unwrap())
                .collect();
            let start = std::sync::Barrier::new(4);
            let wins: Vec<bool> = std::thread::scope(|s| {
                let racers: Vec<_> = (0..4)
                    .map(|i| {
                        let (t, start) = (&tokens[if same_token { 0 } else { i }], &start);
                        let device = if same_token {
                            id(&format!("r{round}-d{i}"))
                        } else {
                            id(&format!("r{round}"))
                        };
                        s.spawn(move || {
                            start.wait();
                            match claim(book, &t.id, t.secret(), &device, "C", 1001) {
                                Ok(_) => true,
                                Err(EnrollError::Refused(_)) => false,
                                Err(e) => panic!("{e}"),
                            }
                        })
                    })
                    .collect();
                racers.into_iter().map(|r| r.join().unwrap()).collect()
            });
            let won = wins.iter().filter(|w| **w).count();
            assert_eq!(won, 1, "round {round} (same token: {same_token}): {wins:?}");
        }
    }

    #[test]
    fn of_claims_racing_on_files_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        one_of_racing_claims_wins(&Files::new(dir.path()), 20);
    }
}
