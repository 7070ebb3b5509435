//! Fleet identities: the fleet CA the hub owns ([`ca`]), one-time join tokens ([`token`]),
//! the rustls configurations every Shoal process uses for mTLS ([`tls`]), the hub's
//! signature over desired state ([`sign`]), the credentials a device keeps ([`device`]), and
//! secret values, encrypted at rest on the hub and sealed to one device's key ([`secret`]).
//!
//! Certificates name their holder in the subject's common name: the hub is `shoal-hub`,
//! operators are `shoal-operator`, and a device is its device id (see
//! [`shoal_api::policy::acl::Identity`]). Every server certificate the fleet CA issues also names
//! `shoal-hub`, and clients verify that fixed name rather than the address they dialled: a
//! device that found its hub over mDNS at some LAN address still checks that the peer is the
//! fleet's hub, and a device certificate (client-auth only) can never pass as one.
//!
//! This is the only crate that names rcgen, ring, x509-parser, hpke or p256.

use std::io::Write;
use std::path::{Path, PathBuf};

pub mod ca;
pub mod device;
pub mod secret;
pub mod sign;
pub mod tls;
pub mod token;
pub mod wrap;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot {action} {path:?}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what} in {path:?} is unusable: {reason}")]
    BadFile {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("cannot issue a certificate for {name:?}: {reason}")]
    Issue { name: String, reason: String },
    #[error("{0}")]
    Token(#[from] token::TokenError),
    #[error("tls configuration: {0}")]
    Tls(String),
}

pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PkiError {
    let path = path.display().to_string();
    move |source| PkiError::Io {
        action,
        path,
        source,
    }
}

pub(crate) fn read_string(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(io_err("read", path))
}

/// Writes `bytes` with `mode` to a new, synced temporary file beside `path` (creating the
/// directory); returns the temporary file's path.
fn write_aside(path: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf, PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let tmp = path.with_extension(format!("tmp{}", rand::random::<u32>()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    let written = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", &tmp));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| tmp)
}

/// Makes what was moved into `path`'s directory durable.
fn sync_dir(path: &Path) {
    if let Ok(d) = std::fs::File::open(path.parent().unwrap_or(Path::new("."))) {
        let _ = d.sync_all();
    }
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename) with `mode`, so a
/// crash leaves either the old file or the new one, never half a key.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let tmp = write_aside(path, bytes, mode)?;
    std::fs::rename(&tmp, path).map_err(io_err("rename into", path))?;
    sync_dir(path);
    Ok(())
}

/// Writes `bytes` to `path` with `mode` only if `path` does not exist, atomically (written
/// aside, then hard-linked into place: of two writers one wins, and a crash leaves no half
/// file); `false` if it existed.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<bool, PkiError> {
    let tmp = write_aside(path, bytes, mode)?;
    let linked = match std::fs::hard_link(&tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_err("create", path)(e)),
    };
    let _ = std::fs::remove_file(&tmp);
    sync_dir(path);
    linked
}

/// Creates `dir` (and parents) readable by its owner only.
pub fn private_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("restrict permissions of", dir))
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
