//! Who may do what on the bus: the broker's authorization rules as one pure function, used by
//! the embedded broker and mirrored by `examples/mosquitto/acl` for an external one.
//!
//! | identity | publish | subscribe |
//! |---|---|---|
//! | the hub (`shoal-hub`) | anything | anything |
//! | an operator (`shoal-operator`, `shoal-operator:{name}`) | `shoal/v1/apply[/{req}]` (deployers and admins) | anything (results, MQTT 5 response topics, device topics) |
//! | device `d` | `shoal/v1/devices/d/{hello,presence,status}`, `…/d/logs/{req}` | `shoal/v1/devices/d/{desired,logreq}` |
//!
//! A device's MQTT client id must be `shoal-agent-{d}`; nobody else may use that prefix, and
//! only the hub `shoal-hub-`, so no client can take over (and disconnect) another's session.

use crate::model::ids::{DeviceId, OperatorName};
use crate::policy::operator::Role;
use crate::wire::topics::PREFIX;
use std::fmt;

/// Who a client is, from its certificate's common name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Hub,
    Operator(Operator),
    Device(DeviceId),
}

/// A person at the fleet's controls, and what they may do (from the hub's records).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub name: OperatorName,
    pub role: Role,
}

impl Operator {
    /// The hub's own bootstrap bundle (`DATA_DIR/operator`): an admin.
    pub fn bootstrap() -> Self {
        Operator {
            name: OperatorName::bootstrap(),
            role: Role::Admin,
        }
    }
}

/// Common names the fleet CA never issues to a device.
pub const HUB: &str = "shoal-hub";
pub const OPERATOR: &str = "shoal-operator";
/// The name an external broker's certificate carries (never a device id).
pub const BROKER: &str = "shoal-broker";

/// Prefix of every agent's MQTT client id.
pub const AGENT_CLIENT_PREFIX: &str = "shoal-agent-";
/// Prefix of the hub's MQTT client id (it adds a random suffix).
pub const HUB_CLIENT_PREFIX: &str = "shoal-hub-";

impl Identity {
    /// The identity a certificate's common name stands for; `None` if it names nothing a
    /// Shoal fleet issues, or a named operator (whose role only the hub's records give).
    pub fn from_common_name(cn: &str) -> Option<Identity> {
        match cn {
            HUB => Some(Identity::Hub),
            OPERATOR => Some(Identity::Operator(Operator::bootstrap())),
            other => DeviceId::try_from(other).ok().map(Identity::Device),
        }
    }

    /// Whether `name` may be given to a device (enrollment refuses the reserved names).
    pub fn reserved(name: &str) -> bool {
        name == HUB || name == OPERATOR || name == BROKER || name == "shoal-hub-api"
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Hub => f.write_str(HUB),
            Identity::Operator(o) if o.name.as_str() == OPERATOR => {
                write!(f, "{OPERATOR} ({})", o.role)
            }
            Identity::Operator(o) => write!(f, "operator {} ({})", o.name, o.role),
            Identity::Device(d) => write!(f, "device {d}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Publish,
    Subscribe,
}

/// A refused action, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{who} may not {action} {topic:?}: {reason}")]
pub struct Denied {
    pub who: String,
    pub action: &'static str,
    pub topic: String,
    pub reason: &'static str,
}

/// Whether a message on `topic` may be retained by the broker: only the per-device state
/// that is level-based by design (a device's hello, presence and status, and its desired
/// state). Anything else (log chunks, applies, results, ingest batches) is a stream, and a
/// retained copy would be memory a client fills for ever; the embedded broker clears the
/// retain flag of such publishes. This bounds retained messages to four per device.
pub fn may_retain(topic: &str) -> bool {
    let Some(rest) = topic.strip_prefix(PREFIX).and_then(|r| r.strip_prefix('/')) else {
        return false;
    };
    matches!(
        rest.split('/').collect::<Vec<_>>().as_slice(),
        ["devices", d, "hello" | "presence" | "status" | "desired"] if !d.is_empty()
    )
}

/// Whether `who` may publish to (or subscribe to the filter) `topic`.
pub fn allowed(who: &Identity, access: Access, topic: &str) -> Result<(), Denied> {
    let deny = |reason| Denied {
        who: who.to_string(),
        action: match access {
            Access::Publish => "publish to",
            Access::Subscribe => "subscribe to",
        },
        topic: topic.to_string(),
        reason,
    };
    if topic.is_empty() || topic.contains('\0') {
        return Err(deny("empty topic or NUL in it"));
    }
    if access == Access::Publish && (topic.contains('+') || topic.contains('#')) {
        return Err(deny("wildcards in a topic name"));
    }
    let rest = topic.strip_prefix(PREFIX).and_then(|r| r.strip_prefix('/'));
    match who {
        Identity::Hub => Ok(()),
        Identity::Operator(o) => match (access, rest) {
            (Access::Publish, _) if o.role < Role::Deployer => {
                Err(deny("a viewer reads the fleet and changes nothing"))
            }
            (Access::Publish, Some("apply")) => Ok(()),
            (Access::Publish, Some(r))
                if r.strip_prefix("apply/")
                    .is_some_and(|q| !q.is_empty() && !q.contains('/')) =>
            {
                Ok(())
            }
            (Access::Publish, _) => Err(deny("operators publish only manifests to shoal/v1/apply")),
            // Reading is what operators do, including the response topics they name in MQTT 5
            // applies.
            (Access::Subscribe, _) => Ok(()),
        },
        Identity::Device(d) => {
            let own = rest
                .and_then(|r| r.strip_prefix("devices/"))
                .and_then(|r| r.strip_prefix(d.as_str()))
                .and_then(|r| r.strip_prefix('/'));
            match (access, own) {
                (Access::Publish, Some("hello" | "presence" | "status")) => Ok(()),
                (Access::Publish, Some(r))
                    if r.strip_prefix("logs/")
                        .is_some_and(|w| !w.is_empty() && !w.contains('/')) =>
                {
                    Ok(())
                }
                (Access::Subscribe, Some("desired" | "logreq")) => Ok(()),
                (Access::Publish, _) => Err(deny(
                    "a device publishes only its own hello, presence, status and logs",
                )),
                (Access::Subscribe, _) => Err(deny(
                    "a device reads only its own desired state and log requests",
                )),
            }
        }
    }
}

/// Whether `who` may connect with MQTT client id `client_id`.
pub fn client_id_allowed(who: &Identity, client_id: &str) -> Result<(), Denied> {
    let ok = match who {
        Identity::Device(d) => client_id
            .strip_prefix(AGENT_CLIENT_PREFIX)
            .is_some_and(|rest| rest == d.as_str()),
        Identity::Hub => !client_id.starts_with(AGENT_CLIENT_PREFIX),
        Identity::Operator(o) => {
            !client_id.starts_with(AGENT_CLIENT_PREFIX)
                && !client_id.starts_with(HUB_CLIENT_PREFIX)
                // A named operator's ids start with its name and a dot (names hold no dot),
                // so no operator takes over another's session.
                && (o.name.as_str() == OPERATOR
                    || client_id
                        .strip_prefix(o.name.as_str())
                        .is_some_and(|rest| rest.starts_with('.')))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(Denied {
            who: who.to_string(),
            action: "connect as",
            topic: client_id.to_string(),
            reason: "a device's client id is shoal-agent-{its id}, the hub's shoal-hub-…, a named operator's {its name}.…, and nobody else uses those",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Access::*;

    fn op(role: Role) -> Identity {
        Identity::Operator(Operator {
            name: OperatorName::try_from("alice").unwrap(),
            role,
        })
    }

    fn dev(s: &str) -> Identity {
        Identity::Device(DeviceId::try_from(s).unwrap())
    }

    #[test]
    fn rules_table() {
        let a = dev("edge-a");
        let cases: &[(&Identity, Access, &str, bool)] = &[
            (&a, Publish, "shoal/v1/devices/edge-a/status", true),
            (&a, Publish, "shoal/v1/devices/edge-a/hello", true),
            (&a, Publish, "shoal/v1/devices/edge-a/presence", true),
            (&a, Publish, "shoal/v1/devices/edge-a/logs/web", true),
            (&a, Publish, "shoal/v1/devices/edge-a/desired", false),
            (&a, Publish, "shoal/v1/devices/edge-b/status", false),
            (&a, Publish, "shoal/v1/devices/edge-ab/status", false),
            (&a, Publish, "shoal/v1/devices/edge-a/status/x", false),
            (&a, Publish, "shoal/v1/apply", false),
            (&a, Publish, "shoal/v1/apply/r1", false),
            (&a, Publish, "shoal/v1/devices/+/status", false),
            (&a, Subscribe, "shoal/v1/devices/edge-a/desired", true),
            (&a, Subscribe, "shoal/v1/devices/edge-b/desired", false),
            (&a, Subscribe, "shoal/v1/devices/edge-a/logreq", true),
            (&a, Subscribe, "shoal/v1/devices/edge-b/logreq", false),
            (&a, Publish, "shoal/v1/devices/edge-a/logreq", false),
            (&a, Subscribe, "shoal/v1/devices/+/desired", false),
            (&a, Subscribe, "#", false),
            (&a, Subscribe, "$SYS/#", false),
            (&op(Role::Deployer), Publish, "shoal/v1/apply", true),
            (&op(Role::Deployer), Publish, "shoal/v1/apply/r1", true),
            (&op(Role::Deployer), Publish, "shoal/v1/apply/", false),
            (&op(Role::Viewer), Publish, "shoal/v1/apply/r1", false),
            (&op(Role::Viewer), Publish, "shoal/v1/apply", false),
            (&op(Role::Viewer), Subscribe, "shoal/v1/results/r1", true),
            (&op(Role::Admin), Publish, "shoal/v1/apply/r1", true),
            (
                &op(Role::Deployer),
                Publish,
                "shoal/v1/devices/edge-a/desired",
                false,
            ),
            (
                &op(Role::Deployer),
                Publish,
                "shoal/v1/devices/edge-a/status",
                false,
            ),
            (&op(Role::Deployer), Subscribe, "shoal/v1/results/r1", true),
            (
                &op(Role::Deployer),
                Subscribe,
                "shoal/v1/devices/+/status",
                true,
            ),
            (&op(Role::Deployer), Subscribe, "ops/replies/42", true),
            (
                &Identity::Hub,
                Publish,
                "shoal/v1/devices/edge-a/desired",
                true,
            ),
            (&Identity::Hub, Subscribe, "#", true),
        ];
        for (who, access, topic, want) in cases {
            let got = allowed(who, *access, topic);
            assert_eq!(got.is_ok(), *want, "{who} {access:?} {topic}: {got:?}");
        }
        let e = allowed(&a, Publish, "shoal/v1/devices/edge-b/status").unwrap_err();
        assert!(
            e.to_string().contains("\"shoal/v1/devices/edge-b/status\""),
            "{e}"
        );
    }

    #[test]
    fn identities_and_client_ids() {
        assert_eq!(Identity::from_common_name("shoal-hub"), Some(Identity::Hub));
        assert_eq!(
            Identity::from_common_name("shoal-operator"),
            Some(Identity::Operator(Operator::bootstrap()))
        );
        assert_eq!(Identity::from_common_name("edge-a"), Some(dev("edge-a")));
        assert_eq!(Identity::from_common_name("Not A Device"), None);
        assert!(client_id_allowed(&dev("edge-a"), "shoal-agent-edge-a").is_ok());
        assert!(client_id_allowed(&dev("edge-a"), "shoal-agent-edge-b").is_err());
        assert!(client_id_allowed(&dev("edge-a"), "anything").is_err());
        let boot = Identity::Operator(Operator::bootstrap());
        assert!(client_id_allowed(&boot, "shoal-cli-1").is_ok());
        assert!(client_id_allowed(&boot, "shoal-agent-edge-a").is_err());
        assert!(client_id_allowed(&boot, "shoal-hub-1234").is_err());
        assert!(client_id_allowed(&Identity::Hub, "shoal-hub-x").is_ok());
        // A named operator's ids start with its name and a dot: none of another's.
        assert!(client_id_allowed(&op(Role::Viewer), "alice.shoal-cli-1").is_ok());
        assert!(client_id_allowed(&op(Role::Viewer), "shoal-cli-1").is_err());
        assert!(client_id_allowed(&op(Role::Viewer), "alice-b.cli").is_err());
        assert!(client_id_allowed(&op(Role::Deployer), "bob.shoal-cli-1").is_err());
    }
}
