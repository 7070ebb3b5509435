//! The fleet's policy on what containers may ask for beyond the confined defaults
//! (see [`shoal_api::policy::fleet`]): checked at apply, set by an admin, and never
//! withdrawn from under workloads that use it.

use super::*;
use shoal_api::policy::fleet::{needs, FleetPolicy, Privilege};
use shoal_api::wire::manifest::ManifestError;
use std::collections::BTreeSet;
use tracing::info;

/// Why a policy change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyRefusal {
    #[error("{privilege} cannot be withdrawn: workload(s) {} use it (change or delete them first)", .users.join(", "))]
    InUse {
        privilege: Privilege,
        users: Vec<String>,
    },
}

impl Fleet {
    /// What the applied `workloads` ask for that the policy does not allow, by document.
    pub fn check_policy(&self, workloads: &[(usize, &Workload)]) -> Vec<ManifestError> {
        workloads
            .iter()
            .flat_map(|(n, w)| {
                self.policy
                    .refusals(w)
                    .into_iter()
                    .map(move |message| ManifestError {
                        document: *n,
                        workload: Some(w.name.to_string()),
                        kind: None,
                        message,
                    })
            })
            .collect()
    }

    pub fn policy(&self) -> FleetPolicy {
        self.policy
    }

    /// An admin's new policy. Withdrawing what a workload (or a revision a rollout still
    /// runs) uses is refused, naming them.
    pub fn set_policy(&mut self, policy: FleetPolicy) -> Result<(), PolicyRefusal> {
        for p in Privilege::ALL.into_iter().filter(|p| !policy.allows(*p)) {
            let users: BTreeSet<String> = self
                .specs_in_use()
                .filter(|w| needs(w).contains(&p))
                .map(|w| w.name.to_string())
                .collect();
            if !users.is_empty() {
                return Err(PolicyRefusal::InUse {
                    privilege: p,
                    users: users.into_iter().collect(),
                });
            }
        }
        if policy != self.policy {
            info!(?policy, "fleet policy changed");
            self.policy = policy;
            self.changes.put_policy(policy);
        }
        Ok(())
    }
}
