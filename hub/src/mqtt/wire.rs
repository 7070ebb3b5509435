//! Topics and payloads: what arrives ([`Raw`]) decoded into the loop's typed
//! [`BusEvent`]s, and each [`Outbound`] encoded into the messages that carry it. The only
//! place the hub's loop traffic meets topic strings and payload bytes.

use crate::app::command::{BusEvent, MqttApply, Outbound, ReplyTo};
use bytes::Bytes;
use shoal_api::model::ids::DeviceId;
use shoal_api::wire::messages::{DeviceStatus, Hello, LogChunk};
use shoal_api::wire::topics::{self, Inbound};
use tracing::warn;

/// A publish as the broker delivered it.
#[derive(Debug, Clone)]
pub struct Raw {
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5 response topic and correlation data, when the publisher set them.
    pub response_topic: Option<String>,
    pub correlation: Option<Bytes>,
}

/// One message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub correlation: Option<Bytes>,
}

/// The kind of a hub-bound topic (for metrics); `None` for any other topic.
pub fn kind(topic: &str) -> Option<&'static str> {
    Some(match topics::classify(topic)? {
        Inbound::Apply { .. } => "apply",
        Inbound::Hello(_) => "hello",
        Inbound::Presence(_) => "presence",
        Inbound::Status(_) => "status",
        Inbound::Logs(..) => "logs",
        Inbound::Ingest(_) => "ingest",
    })
}

/// The topic to coalesce a backlog on (see `bus::Backlog`): device state, where only the
/// newest message counts. Applies, ingest batches and log lines never coalesce.
pub fn coalesces(topic: &str) -> bool {
    matches!(
        topics::classify(topic),
        Some(Inbound::Hello(_) | Inbound::Presence(_) | Inbound::Status(_))
    )
}

/// What `raw` says, or `None` (logged) for anything the hub does not take: topics that are
/// not hub-bound, malformed payloads, a device's message naming another device, cleared
/// retained statuses.
pub fn decode(raw: Raw) -> Option<BusEvent> {
    let kind = topics::classify(&raw.topic)?;
    let topic = raw.topic.as_str();
    match kind {
        Inbound::Apply { req, by } => {
            let mut targets = Vec::new();
            if let Some(r) = &req {
                targets.push(topics::results(r));
            }
            // The hub may publish anywhere; an operator must not steer that into Shoal's
            // own topics (e.g. another device's), so a response topic under shoal/v1/ is
            // honoured only among the results.
            match raw.response_topic.filter(|t| !targets.contains(t)) {
                Some(rt) if topics::response_topic_allowed(&rt) => targets.push(rt),
                Some(rt) => {
                    warn!(response_topic = %rt, "response topic refused: inside shoal/v1/ only shoal/v1/results/… may be used")
                }
                None => {}
            }
            Some(BusEvent::Apply(Box::new(MqttApply {
                text: String::from_utf8_lossy(&raw.payload).into_owned(),
                req,
                by,
                reply: ReplyTo {
                    addresses: targets,
                    correlation: raw.correlation,
                },
            })))
        }
        Inbound::Hello(d) => {
            device_message::<Hello>(topic, &raw.payload, &d).map(|h| BusEvent::Hello(Box::new(h)))
        }
        Inbound::Presence(d) => {
            let Ok(device) = DeviceId::try_from(d.as_str()) else {
                warn!(topic, "presence for an invalid device id ignored");
                return None;
            };
            let online = match &raw.payload[..] {
                b"online" => true,
                b"offline" => false,
                // A cleared retained message (`shoal delete device`) says nothing.
                b"" => return None,
                other => {
                    warn!(%device, payload = %String::from_utf8_lossy(other), "unknown presence payload ignored");
                    return None;
                }
            };
            Some(BusEvent::Presence { device, online })
        }
        // An empty payload clears a retained status: nothing to take.
        Inbound::Status(_) if raw.payload.is_empty() => None,
        Inbound::Status(d) => device_message::<DeviceStatus>(topic, &raw.payload, &d)
            .map(|s| BusEvent::Status(Box::new(s))),
        Inbound::Logs(d, _req) => {
            device_message::<LogChunk>(topic, &raw.payload, &d).map(|c| BusEvent::Logs(Box::new(c)))
        }
        Inbound::Ingest(replica) => match serde_json::from_slice(&raw.payload) {
            Ok(batch) => Some(BusEvent::Ingest {
                replica,
                batch: Box::new(batch),
            }),
            Err(e) => {
                warn!(%replica, error = %e, "undecodable ingest batch from a hub replica ignored");
                None
            }
        },
    }
}

/// The messages that carry `msg`. Encoding plain message structs cannot fail; should it,
/// the payload is empty, which every receiver refuses.
pub fn encode(msg: Outbound) -> Vec<Message> {
    let plain = |topic: String, payload: Vec<u8>| Message {
        topic,
        payload,
        retain: false,
        correlation: None,
    };
    match msg {
        Outbound::Desired { device, signed } => vec![Message {
            topic: topics::desired(&device),
            payload: signed,
            retain: true,
            correlation: None,
        }],
        Outbound::ApplyResult { to, result } => {
            let body = serde_json::to_vec(&result).unwrap_or_default();
            to.addresses
                .into_iter()
                .map(|topic| Message {
                    topic,
                    payload: body.clone(),
                    retain: false,
                    correlation: to.correlation.clone(),
                })
                .collect()
        }
        Outbound::Ingest { replica, batch } => vec![plain(
            topics::hub_ingest(&replica),
            serde_json::to_vec(&batch).unwrap_or_default(),
        )],
        Outbound::LogRequest { device, req } => vec![plain(
            topics::log_request(&device),
            serde_json::to_vec(&req).unwrap_or_default(),
        )],
        // An empty retained message clears what the broker keeps for the topic.
        Outbound::Forget { device } => [
            topics::hello(&device),
            topics::status(&device),
            topics::presence(&device),
        ]
        .into_iter()
        .map(|topic| Message {
            topic,
            payload: Vec::new(),
            retain: true,
            correlation: None,
        })
        .collect(),
    }
}

/// A device's message on a device topic (`raw_device`, unvalidated): it must name that
/// device itself.
fn device_message<T: serde::de::DeserializeOwned + HasDevice>(
    topic: &str,
    payload: &[u8],
    raw_device: &str,
) -> Option<T> {
    match serde_json::from_slice::<T>(payload) {
        Ok(v) if v.device().as_str() == raw_device => Some(v),
        Ok(v) => {
            warn!(topic, claimed = %v.device(), "message for another device ignored");
            None
        }
        Err(e) => {
            warn!(topic, error = %e, "malformed message ignored");
            None
        }
    }
}

trait HasDevice {
    fn device(&self) -> &DeviceId;
}
impl HasDevice for Hello {
    fn device(&self) -> &DeviceId {
        &self.device_id
    }
}
impl HasDevice for LogChunk {
    fn device(&self) -> &DeviceId {
        &self.device_id
    }
}
impl HasDevice for DeviceStatus {
    fn device(&self) -> &DeviceId {
        &self.device_id
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn raw(topic: &str, payload: &[u8], response_topic: Option<&str>) -> Raw {
        Raw {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload),
            response_topic: response_topic.map(str::to_string),
            correlation: Some(Bytes::from_static(b"c1")),
        }
    }

    #[test]
    fn a_device_speaks_only_for_itself() {
        let hello = |id: &str| {
            let mut h = Hello::announcing(DeviceId::try_from(id).unwrap());
            h.arch = "x86_64".into();
            serde_json::to_vec(&h).unwrap()
        };
        let ok = decode(raw("shoal/v1/devices/d1/hello", &hello("d1"), None));
        assert!(matches!(ok, Some(BusEvent::Hello(h)) if h.device_id.as_str() == "d1"));
        // d2's hello on d1's topic (the broker's ACL lets d1 publish there) is dropped.
        assert!(decode(raw("shoal/v1/devices/d1/hello", &hello("d2"), None)).is_none());
        assert!(decode(raw("shoal/v1/devices/d1/hello", b"{not json", None)).is_none());
        assert!(decode(raw("shoal/v1/devices/d1/status", b"", None)).is_none());
        assert!(matches!(
            decode(raw("shoal/v1/devices/d1/presence", b"offline", None)),
            Some(BusEvent::Presence { online: false, .. })
        ));
        assert!(decode(raw("shoal/v1/devices/d1/presence", b"maybe", None)).is_none());
        // A cleared retained presence (a deleted device) says nothing.
        assert!(decode(raw("shoal/v1/devices/d1/presence", b"", None)).is_none());
        assert!(decode(raw("elsewhere/d1/hello", &hello("d1"), None)).is_none());
    }

    #[test]
    fn an_apply_answers_on_its_results_topic_and_allowed_response_topics_only() {
        let answer = |t: &str, rt: Option<&str>| -> Vec<String> {
            let Some(BusEvent::Apply(a)) = decode(raw(t, b"kind: x", rt)) else {
                panic!("not an apply");
            };
            let result = shoal_api::wire::messages::ApplyResult {
                protocol: shoal_api::PROTOCOL_VERSION,
                request_id: a.req.clone(),
                accepted: true,
                workloads: Default::default(),
                secrets: Default::default(),
                configs: Default::default(),
                errors: Vec::new(),
            };
            encode(Outbound::ApplyResult {
                to: a.reply,
                result,
            })
            .into_iter()
            .map(|m| {
                assert_eq!(m.correlation.as_deref(), Some(&b"c1"[..]));
                m.topic
            })
            .collect()
        };
        assert_eq!(answer("shoal/v1/apply/r1", None), ["shoal/v1/results/r1"]);
        assert_eq!(
            answer("shoal/v1/apply/r1", Some("ops/me")),
            ["shoal/v1/results/r1", "ops/me"]
        );
        // Steering the hub's answer onto a device's desired-state topic is refused.
        assert_eq!(
            answer("shoal/v1/apply", Some("shoal/v1/devices/d1/desired")),
            Vec::<String>::new()
        );
        assert_eq!(
            answer("shoal/v1/apply", Some("shoal/v1/results/x")),
            ["shoal/v1/results/x"]
        );
    }
}
