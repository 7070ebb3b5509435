//! Join tokens and enrollment records: where they live, and the one way they are used.
//!
//! A token is issued by `shoal-hub token create` (while the hub runs, in another process)
//! and claimed once by an enrollment; an enrollment record is the latest certificate issued
//! to a device: it says the device is enrolled (renewals need it) and holds the key secrets
//! are sealed to. Both live behind [`Enrollments`]:
//!
//! - [`Files`], in `DATA_DIR/pki/tokens/{id}.json` and `DATA_DIR/pki/devices/{id}.pem`, for a
//!   single hub (sled locks its database to one process, so tokens cannot go there);
//! - `EtcdStore` (in [`crate::etcd`]), under `{prefix}/tokens/{id}` and
//!   `{prefix}/enrolled/{id}`, for hub replicas: a token created against etcd enrolls through
//!   any replica, a device enrolled through one is known to all, and it survives the loss of
//!   any replica's disk.
//!
//! Claiming is a compare-and-swap on the record ([`Enrollments::swap_token`]): of two
//! enrollments racing with one token, on one hub or on two, exactly one wins. Token records
//! are written by any replica, not only the leader, and are not fenced: nothing the leader
//! decides depends on them, and enrolling must not wait for a failover.

use crate::store::StoreError;
use shoal_api::ids::DeviceId;
use shoal_pki::token::{self, JoinToken, TokenError, TokenRecord};
use shoal_pki::PkiError;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The token does not allow this enrollment (the caller's fault: 403).
    #[error(transparent)]
    Refused(#[from] TokenError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A version of a token record for [`Enrollments::swap_token`]: `0` for "no such record".
pub type Version = i64;

/// Where tokens and enrollment records live. Calls block (files, or a round trip to etcd):
/// async callers use `spawn_blocking`.
pub trait Enrollments: Send + Sync {
    /// Token `id`'s record and its version, if there is one. `id` is a valid token id.
    fn token(&self, id: &str) -> Result<Option<(TokenRecord, Version)>, EnrollError>;
    /// Writes `record` for token `id` if its version is still `expected`; `false`: it
    /// changed meanwhile (another enrollment claimed it), nothing was written.
    fn swap_token(
        &self,
        id: &str,
        expected: Version,
        record: &TokenRecord,
    ) -> Result<bool, EnrollError>;
    /// Records `cert_pem` as `device`'s latest certificate, durably.
    fn record(&self, device: &DeviceId, cert_pem: &str) -> Result<(), EnrollError>;
    /// The certificate `device` was last issued, if it is enrolled.
    fn enrolled_cert(&self, device: &DeviceId) -> Result<Option<String>, EnrollError>;
}

/// Issues a join token for the CA whose hash is `ca_hash`, valid `ttl_ms` from `now_ms`,
/// bound to `device` if given.
pub fn issue(
    book: &dyn Enrollments,
    ca_hash: &str,
    now_ms: u64,
    ttl_ms: u64,
    device: Option<&DeviceId>,
) -> Result<JoinToken, EnrollError> {
    let t = JoinToken::generate(ca_hash);
    let record = TokenRecord::new(&t, now_ms, ttl_ms, device.map(DeviceId::as_str));
    // A random 64-bit id is new; if it were not, the token would not be issued.
    if book.swap_token(&t.id, 0, &record)? {
        Ok(t)
    } else {
        Err(token::refused(&t.id, "a token with this id exists; create another").into())
    }
}

/// Checks token `id`/`secret` for enrolling `device` at `now_ms` and claims it: it can never
/// be used again. A refused token stays as it was.
pub fn claim(
    book: &dyn Enrollments,
    id: &str,
    secret: &str,
    device: &DeviceId,
    now_ms: u64,
) -> Result<(), EnrollError> {
    if !token::valid_id(id) {
        return Err(token::refused(id, token::USED).into());
    }
    let Some((record, version)) = book.token(id)? else {
        return Err(token::refused(id, token::USED).into());
    };
    let enrolled = book.enrolled_cert(device)?.is_some();
    record.check(id, secret, device.as_str(), enrolled, now_ms)?;
    if book.swap_token(id, version, &record.used(device.as_str(), now_ms))? {
        Ok(())
    } else {
        Err(token::refused(id, token::USED).into())
    }
}

/// Tokens and records as files in `DATA_DIR/pki`, for a single hub.
#[derive(Debug, Clone)]
pub struct Files {
    tokens: PathBuf,
    devices: PathBuf,
}

impl Files {
    pub fn new(pki_dir: &Path) -> Self {
        Files {
            tokens: pki_dir.join("tokens"),
            devices: pki_dir.join("devices"),
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

/// A file's "version": a token file is claimed by renaming it away (to `{id}.used`), which
/// only one process can do, so the version only tells "exists" (1) from "gone" (0).
const ON_DISK: Version = 1;

impl Enrollments for Files {
    fn token(&self, id: &str) -> Result<Option<(TokenRecord, Version)>, EnrollError> {
        let path = self.token_path(id);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some((
                TokenRecord::from_json(&b, &path.display().to_string())?,
                ON_DISK,
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &path)(e)),
        }
    }

    fn swap_token(
        &self,
        id: &str,
        expected: Version,
        record: &TokenRecord,
    ) -> Result<bool, EnrollError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let path = self.token_path(id);
        if expected == 0 {
            // Created owner-only, and only if new (written, then linked into place: a crash
            // leaves no half token).
            std::fs::create_dir_all(&self.tokens).map_err(io("create directory", &self.tokens))?;
            std::fs::set_permissions(&self.tokens, std::fs::Permissions::from_mode(0o700))
                .map_err(io("restrict permissions of", &self.tokens))?;
            let tmp = path.with_extension(format!("tmp{}", rand::random::<u32>()));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io("create", &tmp))?;
            std::io::Write::write_all(&mut f, &record.to_json()).map_err(io("write", &tmp))?;
            f.sync_all().map_err(io("sync", &tmp))?;
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            return match linked {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(io("create", &path)(e)),
            };
        }
        // Claiming: the rename is the atomic step; the used record then replaces what moved.
        let used = self.tokens.join(format!("{id}.used"));
        match std::fs::rename(&path, &used) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io("claim", &path)(e)),
        }
        shoal_pki::write_atomic(&used, &record.to_json(), 0o600)?;
        Ok(true)
    }

    fn record(&self, device: &DeviceId, cert_pem: &str) -> Result<(), EnrollError> {
        // Durable before the certificate is handed out (fsync, then rename).
        let path = self.devices.join(format!("{device}.pem"));
        Ok(shoal_pki::write_atomic(&path, cert_pem.as_bytes(), 0o644)?)
    }

    fn enrolled_cert(&self, device: &DeviceId) -> Result<Option<String>, EnrollError> {
        let path = self.devices.join(format!("{device}.pem"));
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &path)(e)),
        }
    }
}

/// An in-memory [`Enrollments`], for tests.
#[cfg(test)]
#[derive(Default)]
pub struct Fake {
    tokens: std::sync::Mutex<std::collections::BTreeMap<String, (TokenRecord, Version)>>,
    certs: std::sync::Mutex<std::collections::BTreeMap<DeviceId, String>>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
impl Enrollments for Fake {
    fn token(&self, id: &str) -> Result<Option<(TokenRecord, Version)>, EnrollError> {
        Ok(self.tokens.lock().unwrap().get(id).cloned())
    }
    fn swap_token(
        &self,
        id: &str,
        expected: Version,
        record: &TokenRecord,
    ) -> Result<bool, EnrollError> {
        let mut t = self.tokens.lock().unwrap();
        let now = t.get(id).map_or(0, |(_, v)| *v);
        if now != expected {
            return Ok(false);
        }
        t.insert(id.to_string(), (record.clone(), now + 1));
        Ok(true)
    }
    fn record(&self, device: &DeviceId, cert_pem: &str) -> Result<(), EnrollError> {
        self.certs
            .lock()
            .unwrap()
            .insert(device.clone(), cert_pem.to_string());
        Ok(())
    }
    fn enrolled_cert(&self, device: &DeviceId) -> Result<Option<String>, EnrollError> {
        Ok(self.certs.lock().unwrap().get(device).cloned())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::try_from(s).unwrap()
    }

    /// The same story on every implementation: a token enrolls once, a refused one stays
    /// usable, a bound one re-enrolls its device, nonsense ids name no file.
    fn tokens_are_used_once(book: &dyn Enrollments) {
        let ca = "a".repeat(64);
        let t = issue(book, &ca, 1000, 500, None).unwrap();
        let e = claim(book, &t.id, &"0".repeat(32), &id("d"), 1001).unwrap_err();
        assert!(matches!(e, EnrollError::Refused(_)), "{e}");
        assert!(e.to_string().contains("wrong secret"), "{e}");
        claim(book, &t.id, t.secret(), &id("d"), 1001).unwrap();
        book.record(&id("d"), "CERT").unwrap();
        assert_eq!(
            book.enrolled_cert(&id("d")).unwrap().as_deref(),
            Some("CERT")
        );
        assert_eq!(book.enrolled_cert(&id("e")).unwrap(), None);
        let e = claim(book, &t.id, t.secret(), &id("d"), 1002).unwrap_err();
        assert!(e.to_string().contains("already used"), "{e}");
        // An unbound token cannot take over an enrolled id; one bound to it can.
        let u = issue(book, &ca, 1000, 500, None).unwrap();
        let e = claim(book, &u.id, u.secret(), &id("d"), 1001).unwrap_err();
        assert!(e.to_string().contains("enrolled already"), "{e}");
        let b = issue(book, &ca, 1000, 500, Some(&id("d"))).unwrap();
        claim(book, &b.id, b.secret(), &id("d"), 1001).unwrap();
        // The refused unbound token was left as it was: it still enrolls a new device.
        claim(book, &u.id, u.secret(), &id("e"), 1001).unwrap();
        let e = claim(book, "../../etc/passwd", t.secret(), &id("d"), 1000).unwrap_err();
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
    }

    #[test]
    fn the_fake_uses_a_token_once() {
        tokens_are_used_once(&Fake::default());
    }

    #[test]
    fn of_two_claims_racing_on_files_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path());
        for _ in 0..20 {
            let t = issue(&files, &"a".repeat(64), 1000, 500, None).unwrap();
            let wins: usize = std::thread::scope(|s| {
                let racers: Vec<_> = ["d", "e", "f", "g"]
                    .into_iter()
                    .map(|d| {
                        let (files, t) = (&files, &t);
                        s.spawn(move || claim(files, &t.id, t.secret(), &id(d), 1001).is_ok())
                    })
                    .collect();
                racers
                    .into_iter()
                    .map(|r| usize::from(r.join().unwrap()))
                    .sum()
            });
            assert_eq!(wins, 1);
        }
    }
}
