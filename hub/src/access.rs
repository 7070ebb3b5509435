//! Who may connect: the answer for every TLS client of the hub (HTTPS and the embedded
//! broker), from its certificate and the enrollment book, asked once per connection.
//!
//! A certificate from the fleet CA is necessary, not sufficient:
//! - a **device** must not be revoked (`shoal-hub device revoke D`, a record on the book's
//!   `revoked` shelf that nothing removes, so no token enrolls the id again), and must
//!   present the key it was last enrolled with (a certificate from an enrollment the device
//!   has since replaced, e.g. a wiped board re-enrolled, no longer works);
//! - a **named operator** (`shoal-operator:{name}`) must have a record on the `operators`
//!   shelf that pins this certificate and is not revoked; its role comes from the record;
//! - the bootstrap operator (`shoal-operator`, the hub's own `DATA_DIR/operator` bundle)
//!   must be pinned like a named one: each hub pins its bundle at start
//!   ([`pin_bootstrap`]), so `shoal-hub operator revoke shoal-operator` and a restart
//!   rotate it;
//! - the hub is who its certificate says.
//!
//! The book is read on each connection (a file, or one etcd read): a revocation made by
//! `shoal-hub` in another process holds from the next connection on, on every replica.

use crate::enrollment::{EnrollError, Enrollments, Shelf};
use serde::{Deserialize, Serialize};
use shoal_api::model::ids::{DeviceId, OperatorName};
use shoal_api::policy::acl::{Identity, Operator};
use shoal_api::policy::operator::{OperatorRecord, OperatorRefusal};
use shoal_pki::PkiError;

/// Why a certificate from the fleet CA does not get in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("its certificate names no fleet identity")]
    NoIdentity,
    #[error("device {0:?} was revoked")]
    DeviceRevoked(String),
    #[error("this certificate of device {0:?} is for a key the device no longer has: it enrolled again since")]
    StaleDevice(String),
    #[error(transparent)]
    Operator(#[from] OperatorRefusal),
}

/// A revoked device, as the book keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    pub device: DeviceId,
    pub revoked_ms: u64,
}

fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
    name: &str,
) -> Result<T, EnrollError> {
    serde_json::from_slice(bytes).map_err(|e| {
        EnrollError::Pki(PkiError::BadFile {
            what,
            path: name.to_string(),
            reason: e.to_string(),
        })
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain strings and numbers: serializing cannot fail.
    serde_json::to_vec_pretty(v).unwrap_or_default()
}

/// Revokes `device` for good; `false` if it already was.
pub fn revoke_device(
    book: &dyn Enrollments,
    device: &DeviceId,
    now_ms: u64,
) -> Result<bool, EnrollError> {
    if revoked(book, device)? {
        return Ok(false);
    }
    let r = Revocation {
        device: device.clone(),
        revoked_ms: now_ms,
    };
    book.put_entry(Shelf::Revoked, device.as_str(), &encode(&r))?;
    Ok(true)
}

pub fn revoked(book: &dyn Enrollments, device: &DeviceId) -> Result<bool, EnrollError> {
    Ok(book.entry(Shelf::Revoked, device.as_str())?.is_some())
}

pub fn operator(
    book: &dyn Enrollments,
    name: &OperatorName,
) -> Result<Option<OperatorRecord>, EnrollError> {
    book.entry(Shelf::Operators, name.as_str())?
        .map(|b| operator_record(&b, name.as_str()))
        .transpose()
}

/// A stored operator record, which must be filed under its own name.
fn operator_record(bytes: &[u8], filed_as: &str) -> Result<OperatorRecord, EnrollError> {
    let r: OperatorRecord = decode(bytes, "operator record", filed_as)?;
    if r.name.as_str() != filed_as {
        return Err(EnrollError::Pki(PkiError::BadFile {
            what: "operator record",
            path: filed_as.to_string(),
            reason: format!("it names operator {:?}", r.name.as_str()),
        }));
    }
    Ok(r)
}

pub fn put_operator(book: &dyn Enrollments, r: &OperatorRecord) -> Result<(), EnrollError> {
    book.put_entry(Shelf::Operators, r.name.as_str(), &encode(r))
}

/// Every operator the book knows, by name.
pub fn operators(book: &dyn Enrollments) -> Result<Vec<OperatorRecord>, EnrollError> {
    let mut out = Vec::new();
    for (name, bytes) in book.entries_on(Shelf::Operators)? {
        out.push(operator_record(&bytes, &name)?);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// How many certificates of the bootstrap operator a record pins (one per hub replica's
/// bundle, and their renewals).
const BOOTSTRAP_PINS: usize = 8;
/// How many revoked bootstrap certificates a record remembers.
const RETIRED_KEPT: usize = 64;

/// Pins the hub's own operator bundle (`bundle`: `DATA_DIR/operator`) in the book, as the
/// admin `shoal-operator`, at the hub's start: only bundles the hub wrote and pinned get in.
/// A revoked record whose pin is this bundle rotates it (a new certificate, so copies of the
/// old one stop working) and pins that.
pub fn pin_bootstrap(
    book: &dyn Enrollments,
    ca: &shoal_pki::ca::FleetCa,
    bundle: &std::path::Path,
    now_ms: u64,
) -> Result<(), EnrollError> {
    let fingerprint = |dir: &std::path::Path| -> Result<(String, u64), EnrollError> {
        let path = dir.join("operator.pem");
        let pem = std::fs::read_to_string(&path).map_err(|source| {
            EnrollError::Pki(PkiError::Io {
                action: "read",
                path: path.display().to_string(),
                source,
            })
        })?;
        Ok(shoal_pki::tls::pin_of_pem(&pem)?)
    };
    let name = OperatorName::bootstrap();
    let (mut mine, mut expires_ms) = fingerprint(bundle)?;
    let existing = operator(book, &name)?;
    // A bundle revoked once (by this replica's record or an earlier one) is never pinned
    // again: it is rotated.
    let revoked_mine = existing.as_ref().is_some_and(|r| {
        r.retired.contains(&mine) || (r.revoked_ms.is_some() && r.certificates.contains(&mine))
    });
    if revoked_mine {
        ca.issue_operator_bundle(bundle)?;
        (mine, expires_ms) = fingerprint(bundle)?;
        tracing::warn!(bundle = %bundle.display(), "the bootstrap operator was revoked: its bundle is rotated");
    }
    let record = match existing {
        Some(r) if r.revoked_ms.is_none() => {
            if r.certificates.first() == Some(&mine) {
                return Ok(());
            }
            let mut certificates: Vec<String> =
                r.certificates.into_iter().filter(|c| *c != mine).collect();
            certificates.insert(0, mine);
            certificates.truncate(BOOTSTRAP_PINS);
            OperatorRecord {
                certificates,
                expires_ms,
                ..r
            }
        }
        revoked => {
            // A fresh record; what the revoked one pinned stays retired.
            let mut retired: Vec<String> = revoked
                .map(|r| r.retired.into_iter().chain(r.certificates).collect())
                .unwrap_or_default();
            retired.dedup();
            let extra = retired.len().saturating_sub(RETIRED_KEPT);
            retired.drain(..extra);
            OperatorRecord {
                name,
                role: shoal_api::policy::operator::Role::Admin,
                certificates: vec![mine],
                created_ms: now_ms,
                expires_ms,
                revoked_ms: None,
                retired,
            }
        }
    };
    put_operator(book, &record)
}

/// Who the holder of `cert` (already verified against the fleet CA) is, or why it may not
/// come in. `Err`: the book could not be read.
pub fn admit(
    book: &dyn Enrollments,
    cert: &rustls::pki_types::CertificateDer<'_>,
) -> Result<Result<Identity, Refusal>, EnrollError> {
    let Some(cn) = shoal_pki::tls::common_name(cert) else {
        return Ok(Err(Refusal::NoIdentity));
    };
    if let Some(name) = shoal_api::policy::operator::named_in(&cn) {
        let Some(record) = operator(book, &name)? else {
            return Ok(Err(OperatorRefusal::Unknown(name.to_string()).into()));
        };
        let fingerprint = shoal_pki::tls::fingerprint(cert);
        return Ok(record
            .admits(&fingerprint)
            .map(|role| Identity::Operator(Operator { name, role }))
            .map_err(Refusal::from));
    }
    let Some(who) = Identity::from_common_name(&cn) else {
        return Ok(Err(Refusal::NoIdentity));
    };
    // The bootstrap bundle too gets in only as pinned (see `pin_bootstrap`).
    if let Identity::Operator(o) = &who {
        let Some(record) = operator(book, &o.name)? else {
            return Ok(Err(OperatorRefusal::Unknown(o.name.to_string()).into()));
        };
        let fingerprint = shoal_pki::tls::fingerprint(cert);
        return Ok(record
            .admits(&fingerprint)
            .map(|_| who.clone())
            .map_err(Refusal::from));
    }
    if let Identity::Device(d) = &who {
        if revoked(book, d)? {
            return Ok(Err(Refusal::DeviceRevoked(d.to_string())));
        }
        // Devices enrolled before records were kept have none: they are let in.
        if let Some(recorded) = book.enrolled_cert(d)? {
            if shoal_pki::tls::public_key_of_pem(&recorded)? != shoal_pki::tls::public_key_of(cert)?
            {
                return Ok(Err(Refusal::StaleDevice(d.to_string())));
            }
        }
    }
    Ok(Ok(who))
}

/// What a connection's client certificate gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// No client certificate.
    Anonymous,
    In(Identity),
    /// A fleet certificate that may not come in, and why (or why the book could not say).
    Out(String),
}

/// Admits the client of TLS connection `conn` ([`admit_connection`]): what it gets, its
/// certificate's fingerprint, and `verdicts` marked seen *before* the book was read (for
/// [`until_shut_out`]).
pub async fn admit_tls(
    sec: &std::sync::Arc<crate::security::Security>,
    conn: &rustls::ServerConnection,
    mut verdicts: VerdictsRx,
) -> (Admission, String, VerdictsRx) {
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());
    let fingerprint = cert
        .as_ref()
        .map(shoal_pki::tls::fingerprint)
        .unwrap_or_default();
    verdicts.mark_unchanged();
    (admit_connection(sec, cert).await, fingerprint, verdicts)
}

/// [`admit`], off the async threads (the book may be files or etcd), for a connection whose
/// client presented `cert` (verified against the fleet CA by the TLS handshake).
pub async fn admit_connection(
    sec: &std::sync::Arc<crate::security::Security>,
    cert: Option<rustls::pki_types::CertificateDer<'static>>,
) -> Admission {
    let Some(cert) = cert else {
        return Admission::Anonymous;
    };
    let sec = sec.clone();
    match tokio::task::spawn_blocking(move || admit(&*sec.enrollments, &cert)).await {
        Ok(Ok(Ok(who))) => Admission::In(who),
        Ok(Ok(Err(refused))) => Admission::Out(refused.to_string()),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot read the enrollment book to admit a client");
            Admission::Out(format!("the hub cannot check this certificate now: {e}"))
        }
        Err(e) => Admission::Out(format!("the hub cannot check this certificate now: {e}")),
    }
}

/// What the book says now about revocations and operators, for connections that were let
/// in before it changed (see [`watch`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdicts {
    /// Whether the book has been read yet (until then, nobody is shut out).
    pub loaded: bool,
    pub revoked: std::collections::BTreeSet<DeviceId>,
    pub operators: std::collections::BTreeMap<OperatorName, OperatorRecord>,
}

impl Verdicts {
    /// Whether `who`, whose certificate has SHA-256 `fingerprint` and was let in, still is.
    pub fn still_in(&self, who: &Identity, fingerprint: &str) -> bool {
        if !self.loaded {
            return true;
        }
        match who {
            Identity::Hub => true,
            Identity::Device(d) => !self.revoked.contains(d),
            // A record is revoked, never removed: one not read yet is not a refusal (the
            // connection's admission read the book itself).
            Identity::Operator(o) => self
                .operators
                .get(&o.name)
                .is_none_or(|r| r.admits(fingerprint).is_ok()),
        }
    }

    /// What the book says now.
    pub fn read(book: &dyn Enrollments) -> Result<Verdicts, EnrollError> {
        let mut revoked = std::collections::BTreeSet::new();
        for (name, _) in book.entries_on(Shelf::Revoked)? {
            if let Ok(d) = DeviceId::try_from(name.as_str()) {
                revoked.insert(d);
            }
        }
        // One record that cannot be read shuts its operator out (fails closed); the others
        // still count.
        let mut operators = std::collections::BTreeMap::new();
        for (name, bytes) in book.entries_on(Shelf::Operators)? {
            let Ok(filed) = OperatorName::try_from(name.as_str()) else {
                continue;
            };
            let record = operator_record(&bytes, &name).unwrap_or_else(|e| {
                tracing::warn!(operator = %filed, error = %e, "unreadable operator record: refused");
                OperatorRecord {
                    name: filed.clone(),
                    role: shoal_api::policy::operator::Role::Viewer,
                    certificates: Vec::new(),
                    created_ms: 0,
                    expires_ms: 0,
                    revoked_ms: Some(0),
                    retired: Vec::new(),
                }
            });
            operators.insert(filed, record);
        }
        Ok(Verdicts {
            loaded: true,
            revoked,
            operators,
        })
    }
}

/// The latest [`Verdicts`], as connections hold them.
pub type VerdictsRx = tokio::sync::watch::Receiver<std::sync::Arc<Verdicts>>;

/// How often [`watch`] reads the book.
pub const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads the book every [`WATCH_EVERY`] until `shutdown` and publishes what it says when it
/// changes; the revoked devices also go to `revoked` (the main loop: it must not block), now
/// and then again every so often (a standby that becomes leader learns them too).
pub async fn watch(
    sec: std::sync::Arc<crate::security::Security>,
    tx: tokio::sync::watch::Sender<std::sync::Arc<Verdicts>>,
    revoked: impl Fn(std::collections::BTreeSet<DeviceId>) + Send + 'static,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rounds: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = sec.clone();
        let read = tokio::task::spawn_blocking(move || Verdicts::read(&*s.enrollments)).await;
        let now = match read {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the enrollment book for revocations");
                continue;
            }
            Err(_) => continue,
        };
        let changed = **tx.borrow() != now;
        // Every 15th round (30 s) the main loop hears the set again, changed or not.
        if changed || rounds.is_multiple_of(15) {
            revoked(now.revoked.clone());
        }
        rounds += 1;
        if changed {
            tx.send_replace(std::sync::Arc::new(now));
        }
    }
}

/// Resolves once the book no longer lets `who` (with certificate `fingerprint`) in: a
/// connection let in before a revocation ends with it. `rx` must have been marked seen
/// (`mark_unchanged`) *before* the connection's admission read the book, so that nothing
/// published between that read and this call is missed.
pub async fn until_shut_out(mut rx: VerdictsRx, who: Identity, fingerprint: String) {
    // The caller marked `rx` seen before its admission read the book: every reading
    // published since may be news (a revocation during the handshake included).
    loop {
        if rx.changed().await.is_err() {
            // The watch is gone (the hub is stopping): nothing more to check.
            std::future::pending::<()>().await;
        }
        if !rx.borrow_and_update().still_in(&who, &fingerprint) {
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_shut_out_revoked_devices_and_operators_only() {
        let d = DeviceId::try_from("edge-a").unwrap();
        let alice = OperatorName::try_from("alice").unwrap();
        let op = Identity::Operator(Operator {
            name: alice.clone(),
            role: shoal_api::policy::operator::Role::Viewer,
        });
        let mut v = Verdicts::default();
        assert!(
            v.still_in(&Identity::Device(d.clone()), "x"),
            "not read yet"
        );
        v.loaded = true;
        assert!(v.still_in(&Identity::Device(d.clone()), "x"));
        assert!(v.still_in(&op, "f1"), "a record not read yet");
        let mut rec = OperatorRecord {
            name: alice.clone(),
            role: shoal_api::policy::operator::Role::Viewer,
            certificates: vec!["f1".into()],
            created_ms: 0,
            expires_ms: 0,
            revoked_ms: None,
            retired: Vec::new(),
        };
        v.operators.insert(alice.clone(), rec.clone());
        assert!(v.still_in(&op, "f1") && !v.still_in(&op, "f2"));
        rec.revoked_ms = Some(1);
        v.operators.insert(alice, rec);
        assert!(!v.still_in(&op, "f1"));
        v.revoked.insert(d.clone());
        assert!(!v.still_in(&Identity::Device(d), "x"));
        assert!(v.still_in(&Identity::Hub, "x"));
    }
}
