//! What a container may ask for beyond the confined defaults, and who agrees to it.
//!
//! Two things give a container the device itself: `privileged: true` (every capability, no
//! seccomp filter, every device node) and host device nodes named by path
//! (`container.devices`). Either is, in effect, root on the board, so both sides must agree:
//!
//! - **the fleet** ([`FleetPolicy`]), set by an admin operator (`shoal policy set`): an apply
//!   asking for what the policy does not allow is refused, naming the field and the setting;
//! - **the device** (`shoal-agent run --allow privileged,host-devices`), reported in its hello
//!   ([`Privilege`]): the scheduler places such a container only on devices that allow it (the
//!   pending reason says which devices do not), and the agent refuses to run one it did not
//!   allow, whatever the hub says.
//!
//! Hardware offered by class (`resources.devices`, see [`crate::model::hardware`]) needs
//! neither: the agent's configuration already names what it offers.

use crate::model::workload::Workload;
use serde::{Deserialize, Serialize};

/// A power beyond the confined defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Privilege {
    /// `container.privileged: true`.
    Privileged,
    /// `container.devices`: host device nodes by path.
    HostDevices,
}

impl Privilege {
    pub const ALL: [Privilege; 2] = [Privilege::Privileged, Privilege::HostDevices];

    /// The name in flags and messages: `privileged`, `host-devices`.
    pub fn name(self) -> &'static str {
        match self {
            Privilege::Privileged => "privileged",
            Privilege::HostDevices => "host-devices",
        }
    }

    /// The manifest field that asks for it.
    pub fn field(self) -> &'static str {
        match self {
            Privilege::Privileged => "spec.container.privileged",
            Privilege::HostDevices => "spec.container.devices",
        }
    }
}

impl std::fmt::Display for Privilege {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a [`Privilege`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a privilege: give privileged or host-devices")]
pub struct UnknownPrivilege(pub String);

impl std::str::FromStr for Privilege {
    type Err = UnknownPrivilege;
    fn from_str(s: &str) -> Result<Self, UnknownPrivilege> {
        Privilege::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPrivilege(s.to_string()))
    }
}

/// The privileges of a list, those this build knows: a newer agent's others are left out
/// (never granted), rather than its whole hello refused.
pub fn known_privileges<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<Privilege>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    Ok(names.iter().filter_map(|n| n.parse().ok()).collect())
}

/// The fleet's answer to [`Privilege`]s: what an admin allows workloads to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FleetPolicy {
    #[serde(default)]
    pub allow_privileged: bool,
    #[serde(default)]
    pub allow_host_devices: bool,
}

impl FleetPolicy {
    pub fn allows(&self, p: Privilege) -> bool {
        match p {
            Privilege::Privileged => self.allow_privileged,
            Privilege::HostDevices => self.allow_host_devices,
        }
    }

    /// What `w` asks for that this policy does not allow, as errors naming the field and
    /// the setting.
    pub fn refusals(&self, w: &Workload) -> Vec<String> {
        needs(w)
            .into_iter()
            .filter(|p| !self.allows(*p))
            .map(|p| {
                format!(
                    "{} is refused by the fleet's policy: an admin allows it with `shoal policy set --allow {}`",
                    p.field(),
                    p.name()
                )
            })
            .collect()
    }
}

/// Whether a device that allows `allows` may run `w`'s container variant.
pub fn permits(w: &Workload, allows: impl Fn(Privilege) -> bool) -> bool {
    needs(w).into_iter().all(allows)
}

/// The privileges `w`'s container variant asks for (none for WASM).
pub fn needs(w: &Workload) -> Vec<Privilege> {
    let Some(c) = &w.container else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if c.privileged {
        out.push(Privilege::Privileged);
    }
    if !c.host_devices.is_empty() {
        out.push(Privilege::HostDevices);
    }
    out
}
