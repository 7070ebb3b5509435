//! MQTT topic names (protocol v1). Every Shoal topic lives under `shoal/v1/`.
//!
//! | topic | direction | retained |
//! |---|---|---|
//! | `shoal/v1/apply`, `shoal/v1/apply/{req}` | operator → hub | no |
//! | `shoal/v1/apply-as/{operator}[/{req}]` | the embedded broker → hub: an apply, with who sent it | no |
//! | `shoal/v1/results/{req}` | hub → operator | no |
//! | `shoal/v1/devices/{d}/hello` | agent → hub | yes |
//! | `shoal/v1/devices/{d}/presence` | agent (and its last will) | yes |
//! | `shoal/v1/devices/{d}/desired` | hub → agent | yes |
//! | `shoal/v1/devices/{d}/status` | agent → hub | yes |
//! | `shoal/v1/devices/{d}/logreq` | hub → agent | no |
//! | `shoal/v1/devices/{d}/logs/{req}` | agent → hub | no |
//! | `shoal/v1/hubs/{replica}/ingest` | hub replica → hub replicas | no |
//!
//! Hub replicas (a shared store, an external broker) take device statuses through the MQTT 5
//! shared subscription [`SHARED_STATUS`], so each report reaches one replica; that replica
//! passes what the others need on as an [`crate::wire::messages::IngestBatch`].

use crate::model::ids::DeviceId;

pub const PREFIX: &str = "shoal/v1";
/// Apply without a request id (no verdict is published).
pub const APPLY: &str = "shoal/v1/apply";
/// Subscription filter for applies with a request id.
pub const APPLY_WITH_REQ: &str = "shoal/v1/apply/+";
/// Subscription filter for applies the embedded broker attributed to an operator (only the
/// broker's packet guard writes these: an operator's own apply topic is rewritten to one).
pub const APPLY_AS: &str = "shoal/v1/apply-as/#";
/// Subscription filters the hub uses for device traffic.
pub const ALL_HELLO: &str = "shoal/v1/devices/+/hello";
pub const ALL_PRESENCE: &str = "shoal/v1/devices/+/presence";
pub const ALL_STATUS: &str = "shoal/v1/devices/+/status";
pub const ALL_LOGS: &str = "shoal/v1/devices/+/logs/+";
/// The MQTT 5 shared subscription hub replicas take statuses through: the broker hands
/// each report to one member of the `shoal-hub` group.
pub const SHARED_STATUS: &str = "$share/shoal-hub/shoal/v1/devices/+/status";
/// Subscription filter for the replicas' ingest batches.
pub const ALL_HUB_INGEST: &str = "shoal/v1/hubs/+/ingest";
/// Presence payloads.
pub const ONLINE: &str = "online";
pub const OFFLINE: &str = "offline";

/// The topic the embedded broker gives an apply from operator `by` (with request id `req`).
pub fn apply_as(by: &str, req: Option<&str>) -> String {
    match req {
        Some(r) => format!("{PREFIX}/apply-as/{by}/{r}"),
        None => format!("{PREFIX}/apply-as/{by}"),
    }
}

pub fn apply(req: &str) -> String {
    format!("{PREFIX}/apply/{req}")
}
pub fn results(req: &str) -> String {
    format!("{PREFIX}/results/{req}")
}
pub fn hello(d: &DeviceId) -> String {
    format!("{PREFIX}/devices/{d}/hello")
}
pub fn presence(d: &DeviceId) -> String {
    format!("{PREFIX}/devices/{d}/presence")
}
pub fn desired(d: &DeviceId) -> String {
    format!("{PREFIX}/devices/{d}/desired")
}
pub fn status(d: &DeviceId) -> String {
    format!("{PREFIX}/devices/{d}/status")
}
pub fn log_request(d: &DeviceId) -> String {
    format!("{PREFIX}/devices/{d}/logreq")
}
pub fn logs(d: &DeviceId, req: &str) -> String {
    format!("{PREFIX}/devices/{d}/logs/{req}")
}
/// Where hub replica `replica` publishes its ingest batches.
pub fn hub_ingest(replica: &str) -> String {
    format!("{PREFIX}/hubs/{replica}/ingest")
}

/// Whether the hub may answer an apply on this MQTT 5 response topic: anything outside
/// `shoal/v1/`, or a results topic (never a device's or the apply topic).
pub fn response_topic_allowed(t: &str) -> bool {
    let valid = !t.is_empty() && !t.contains(['+', '#', '\0']);
    match t.strip_prefix(PREFIX) {
        Some(rest) => valid && rest.starts_with("/results/") && rest.len() > "/results/".len(),
        None => valid,
    }
}

/// A topic the hub receives, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// An apply; `req` when the topic carries a request id, `by` the operator who sent it
    /// when the embedded broker says so.
    Apply {
        req: Option<String>,
        by: Option<String>,
    },
    Hello(String),
    Presence(String),
    Status(String),
    /// Log lines: the device and the request id.
    Logs(String, String),
    /// Another hub replica's ingest batch: its replica id.
    Ingest(String),
}

/// Classifies an incoming topic; `None` for anything that is not a hub-bound Shoal topic.
/// Device ids are returned raw: callers validate them.
pub fn classify(topic: &str) -> Option<Inbound> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix('/')?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["apply"] => Some(Inbound::Apply {
            req: None,
            by: None,
        }),
        ["apply", req] if !req.is_empty() => Some(Inbound::Apply {
            req: Some((*req).to_string()),
            by: None,
        }),
        ["apply-as", by, rest @ ..] if !by.is_empty() && rest.len() <= 1 => {
            let req = rest.first().map(|r| (*r).to_string());
            if req.as_deref() == Some("") {
                return None;
            }
            Some(Inbound::Apply {
                req,
                by: Some((*by).to_string()),
            })
        }
        ["devices", d, "hello"] => Some(Inbound::Hello((*d).to_string())),
        ["devices", d, "presence"] => Some(Inbound::Presence((*d).to_string())),
        ["devices", d, "status"] => Some(Inbound::Status((*d).to_string())),
        ["devices", d, "logs", req] if !req.is_empty() => {
            Some(Inbound::Logs((*d).to_string(), (*req).to_string()))
        }
        ["hubs", r, "ingest"] if !r.is_empty() => Some(Inbound::Ingest((*r).to_string())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_table() {
        assert_eq!(
            classify("shoal/v1/apply"),
            Some(Inbound::Apply {
                req: None,
                by: None
            })
        );
        assert_eq!(
            classify("shoal/v1/apply-as/alice/r1"),
            Some(Inbound::Apply {
                req: Some("r1".into()),
                by: Some("alice".into())
            })
        );
        assert_eq!(
            classify(&apply_as("alice", None)),
            Some(Inbound::Apply {
                req: None,
                by: Some("alice".into())
            })
        );
        assert_eq!(classify("shoal/v1/apply-as/alice/"), None);
        assert_eq!(classify("shoal/v1/apply-as/alice/r1/x"), None);
        assert_eq!(
            classify("shoal/v1/apply/r1"),
            Some(Inbound::Apply {
                req: Some("r1".into()),
                by: None
            })
        );
        assert_eq!(
            classify("shoal/v1/devices/e1/status"),
            Some(Inbound::Status("e1".into()))
        );
        assert_eq!(classify("shoal/v1/devices/e1/desired"), None);
        assert_eq!(
            classify(&hub_ingest("h1")),
            Some(Inbound::Ingest("h1".into()))
        );
        assert_eq!(classify("shoal/v1/hubs//ingest"), None);
        assert_eq!(classify("shoal/v1/devices/e1/logreq"), None);
        assert_eq!(
            classify(&logs(&DeviceId::try_from("e1").unwrap(), "r7")),
            Some(Inbound::Logs("e1".into(), "r7".into()))
        );
        assert_eq!(classify("shoal/v1/devices/e1/logs/"), None);
        assert_eq!(classify("shoal/v2/apply"), None);
        assert!(response_topic_allowed("ops/replies/42"));
        assert!(response_topic_allowed("shoal/v1/results/r9"));
        assert!(!response_topic_allowed("shoal/v1/devices/e1/desired"));
        assert!(!response_topic_allowed("shoal/v1/apply"));
        assert!(!response_topic_allowed("ops/#"));
        assert_eq!(classify("shoal/v1/apply/"), None);
        let d = DeviceId::try_from("e1").unwrap();
        assert_eq!(classify(&hello(&d)), Some(Inbound::Hello("e1".into())));
        assert_eq!(
            classify(&presence(&d)),
            Some(Inbound::Presence("e1".into()))
        );
    }
}
