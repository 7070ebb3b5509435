//! Join tokens and enrollment records: where they live, and the one way they are used.
//!
//! A token is issued by `shoal-hub token create` (while the hub runs, in another process)
//! and claimed once by an enrollment; an enrollment record is the latest certificate issued
//! to a device: it says the device is enrolled (renewals need it) and holds the key secrets
//! are sealed to. Both live behind [`Enrollments`]:
//!
//! - [`Files`] ([`files`]), in `DATA_DIR/pki/tokens/{id}.json` and `DATA_DIR/pki/devices/{id}.pem`, for a
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
use shoal_api::model::ids::DeviceId;
use shoal_api::model::labels::{Grant, Labels};
use shoal_pki::token::{self, JoinToken, TokenError, TokenRecord};
use shoal_pki::PkiError;
mod files;
#[cfg(test)]
mod tests;

pub use files::{adopt_files, Files};

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
