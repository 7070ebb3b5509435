//! Operators are people: named identities with a role, created, renewed and revoked on the
//! hub (`shoal-hub operator …`), and the audit log of what they changed.
//!
//! An operator's certificate names it (`shoal-operator:{name}`); what it may do comes from
//! its [`OperatorRecord`] on the hub, never from the certificate alone: a record pins the
//! certificates it accepts (by SHA-256) and says when it was revoked. The hub's own
//! bootstrap bundle (`DATA_DIR/operator`, common name `shoal-operator`) is an admin that
//! only whoever can read the hub's data directory holds.

use crate::model::ids::OperatorName;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Common name prefix of a named operator's certificate; the rest is its name. A `:` never
/// occurs in a device id, so no device certificate reads as an operator.
pub const CN_PREFIX: &str = "shoal-operator:";

/// The name the bootstrap operator (the hub's `DATA_DIR/operator` bundle) goes by.
pub const BOOTSTRAP: &str = crate::policy::acl::OPERATOR;

/// What an operator may do. Ordered: each role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads the fleet: devices, workloads, events, logs, the dashboard.
    Viewer,
    /// And changes workloads: apply, delete, scale, rollouts, blobs, secrets.
    Deployer,
    /// And manages devices (labels, cordon, drain) and reads the audit log.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Deployer, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Deployer => "deployer",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("role {0:?} is unknown: expected viewer, deployer or admin")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, UnknownRole> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// An operator the hub knows, as `shoal-hub operator` keeps it (JSON in the enrollment book).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorRecord {
    pub name: OperatorName,
    pub role: Role,
    /// SHA-256 (hex) of each certificate issued to it that is still accepted: the newest
    /// first, then the one it renewed (usable until it expires).
    pub certificates: Vec<String>,
    pub created_ms: u64,
    /// When the newest certificate expires.
    pub expires_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
    /// Certificates revoked with an earlier record of this name, never accepted again (the
    /// bootstrap bundles of hub replicas that have not rotated theirs yet).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<String>,
}

/// Why a certificate that names an operator does not let it in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperatorRefusal {
    #[error("operator {0:?} is unknown to this hub")]
    Unknown(String),
    #[error("operator {0:?} was revoked")]
    Revoked(String),
    #[error("this certificate of operator {0:?} was replaced or never issued by this hub")]
    NotCurrent(String),
}

impl OperatorRecord {
    /// Checks that the certificate whose SHA-256 is `fingerprint` stands for this operator.
    pub fn admits(&self, fingerprint: &str) -> Result<Role, OperatorRefusal> {
        let name = || self.name.as_str().to_string();
        if self.revoked_ms.is_some() {
            return Err(OperatorRefusal::Revoked(name()));
        }
        if !self.certificates.iter().any(|c| c == fingerprint) {
            return Err(OperatorRefusal::NotCurrent(name()));
        }
        Ok(self.role)
    }

    /// After a renewal: `fingerprint` is the newest certificate, the previous one stays
    /// accepted (until it expires), older ones are dropped.
    pub fn renewed(mut self, fingerprint: String, expires_ms: u64) -> Self {
        self.certificates.truncate(1);
        self.certificates.insert(0, fingerprint);
        self.expires_ms = expires_ms;
        self
    }
}

/// The operator name a certificate's common name carries, if it is a named operator's.
pub fn named_in(common_name: &str) -> Option<OperatorName> {
    common_name
        .strip_prefix(CN_PREFIX)
        .and_then(|n| OperatorName::try_from(n).ok())
}

/// The common name of operator `name`'s certificates.
pub fn common_name(name: &OperatorName) -> String {
    format!("{CN_PREFIX}{name}")
}

/// One change on the hub, as the audit log keeps it (`GET /v1/audit`, `shoal get audit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// Increases by one per entry, across the hub's life and its replicas.
    pub seq: u64,
    pub time_ms: u64,
    /// Who: `operator alice (deployer)`, `shoal-operator (admin)`, `shoal-hub`, or
    /// `unknown` (an MQTT apply through an external broker, which does not say).
    pub who: String,
    /// Where from: the client's address, or `mqtt`.
    pub from: String,
    /// What was asked: `POST /v1/apply`, `mqtt apply`, …
    pub action: String,
    /// What it was about, and what came of it: `workload/web configured`, `refused: …`.
    pub outcome: String,
    /// Whether it changed the fleet (refused requests are kept too).
    pub accepted: bool,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record() -> OperatorRecord {
        OperatorRecord {
            name: OperatorName::try_from("alice").unwrap(),
            role: Role::Deployer,
            certificates: vec!["a".into()],
            created_ms: 1,
            expires_ms: 2,
            revoked_ms: None,
            retired: Vec::new(),
        }
    }

    #[test]
    fn roles_order_and_parse() {
        assert!(Role::Viewer < Role::Deployer && Role::Deployer < Role::Admin);
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        let e = "root".parse::<Role>().unwrap_err().to_string();
        assert!(e.contains("\"root\"") && e.contains("viewer"), "{e}");
    }

    #[test]
    fn a_record_admits_its_certificates_until_revoked() {
        let r = record();
        assert_eq!(r.admits("a"), Ok(Role::Deployer));
        assert!(matches!(r.admits("b"), Err(OperatorRefusal::NotCurrent(_))));
        let r = r.renewed("b".into(), 3).renewed("c".into(), 4);
        assert_eq!(r.certificates, ["c", "b"]);
        assert!(r.admits("a").is_err() && r.admits("b").is_ok() && r.admits("c").is_ok());
        let mut r = r;
        r.revoked_ms = Some(5);
        assert!(matches!(r.admits("c"), Err(OperatorRefusal::Revoked(_))));
    }

    #[test]
    fn names_come_only_from_the_prefix() {
        assert_eq!(named_in("shoal-operator:alice").unwrap().as_str(), "alice");
        for cn in [
            "shoal-operator",
            "alice",
            "shoal-operator:",
            "shoal-operator:Bob",
            "x:alice",
        ] {
            assert_eq!(named_in(cn), None, "{cn}");
        }
        let n = OperatorName::try_from("bob").unwrap();
        assert_eq!(named_in(&common_name(&n)), Some(n));
    }
}
