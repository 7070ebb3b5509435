//! What arrives over MQTT: topics decoded into the fleet's inputs (hello, presence, status,
//! ingest batches from other replicas, applies, log chunks).

use super::*;
use crate::bus::{Bus, Outgoing};
use crate::store::Store;
use shoal_api::ids::DeviceId;
use shoal_api::messages::{now_ms, DeviceStatus, Hello, LogChunk};
use shoal_api::topics::{self, Inbound};
use tracing::{info_span, warn, Instrument};

impl<S: Store, B: Bus> MainLoop<S, B> {
    pub(super) async fn on_message(
        &mut self,
        topic: &str,
        payload: &[u8],
        response_topic: Option<String>,
        correlation: Option<bytes::Bytes>,
    ) {
        let Some(kind) = topics::classify(topic) else {
            return;
        };
        let label = match &kind {
            Inbound::Apply { .. } => "apply",
            Inbound::Hello(_) => "hello",
            Inbound::Presence(_) => "presence",
            Inbound::Status(_) => "status",
            Inbound::Logs(..) => "logs",
            Inbound::Ingest(_) => "ingest",
        };
        self.metrics
            .mqtt_received
            .get_or_create(&crate::metrics::KindLabel { kind: label.into() })
            .inc();
        match kind {
            Inbound::Apply { req, by } => {
                let text = String::from_utf8_lossy(payload);
                let span = info_span!(
                    "apply",
                    source = "mqtt",
                    req = req.as_deref().unwrap_or(""),
                    operator = by.as_deref().unwrap_or("")
                );
                let result = self.apply(&text, req.clone(), true).instrument(span).await;
                // Who sent it: the embedded broker names the operator; through an external
                // broker the hub cannot know (its ACL decides who may apply).
                let named = by
                    .as_deref()
                    .filter(|_| self.attributed_applies)
                    .and_then(|b| shoal_api::ids::OperatorName::try_from(b).ok());
                let who = match named {
                    Some(name) => format!("operator {name}"),
                    None => "unknown (an MQTT apply the broker did not attribute)".to_string(),
                };
                let change = crate::fleet::audit::Change {
                    who,
                    from: "mqtt".into(),
                    action: format!("mqtt apply {}", req.as_deref().unwrap_or(""))
                        .trim_end()
                        .to_string(),
                    outcome: crate::fleet::audit::apply_outcome(&result),
                    accepted: result.accepted,
                };
                if let Err(e) = self.record_audit(change) {
                    warn!(error = %e, "cannot record an apply in the audit log");
                }
                let body = serde_json::to_vec(&result).unwrap_or_default();
                let mut targets = Vec::new();
                if let Some(r) = &req {
                    targets.push(topics::results(r));
                }
                // The hub may publish anywhere; an operator must not steer that into Shoal's
                // own topics (e.g. another device's), so a response topic under shoal/v1/ is
                // honoured only among the results.
                match response_topic.filter(|t| !targets.contains(t)) {
                    Some(rt) if topics::response_topic_allowed(&rt) => targets.push(rt),
                    Some(rt) => {
                        warn!(response_topic = %rt, "response topic refused: inside shoal/v1/ only shoal/v1/results/… may be used")
                    }
                    None => {}
                }
                for topic in targets {
                    let msg = Outgoing {
                        topic,
                        payload: body.clone(),
                        retain: false,
                        correlation: correlation.clone(),
                    };
                    if let Err(e) = self.bus.publish(msg).await {
                        warn!(error = %e, "cannot publish apply result");
                    }
                }
            }
            Inbound::Hello(raw) => {
                let Some(hello) = decode::<Hello>(topic, payload, &raw) else {
                    return;
                };
                let publish = self.fleet(|f| f.hello(hello, now_ms()));
                self.queue(publish);
            }
            Inbound::Presence(raw) => {
                let Ok(id) = DeviceId::try_from(raw.as_str()) else {
                    warn!(topic, "presence for an invalid device id ignored");
                    return;
                };
                let online = match payload {
                    b"online" => true,
                    b"offline" | b"" => false,
                    other => {
                        warn!(device = %id, payload = %String::from_utf8_lossy(other), "unknown presence payload ignored");
                        return;
                    }
                };
                let publish = self.fleet(|f| f.presence(&id, online, now_ms()));
                self.queue(publish);
            }
            Inbound::Status(raw) => {
                if payload.is_empty() {
                    return; // a cleared retained status
                }
                if let Some(status) = decode::<DeviceStatus>(topic, payload, &raw) {
                    match self.ingest.as_mut() {
                        None => self.core.status(status, now_ms()),
                        Some(i) => match self.core.accept_status(status, now_ms()) {
                            crate::fleet::Accepted::New(s) => i.relay.changed(s),
                            crate::fleet::Accepted::Same(h)
                            | crate::fleet::Accepted::Stale { heard: h, .. } => i.relay.heard(h),
                        },
                    }
                    // Stepped in batches (see RolloutTick): one step per report would
                    // republish desired states once per freed slot.
                    self.rollout_due |= self.core.rolling() || self.core.draining();
                }
            }
            Inbound::Ingest(replica) => {
                let Some(i) = self.ingest.as_mut() else {
                    return;
                };
                if replica == i.replica {
                    return; // our own, back from the broker
                }
                let mut batch = match serde_json::from_slice::<shoal_api::messages::IngestBatch>(
                    payload,
                ) {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(%replica, error = %e, "undecodable ingest batch from a hub replica ignored");
                        return;
                    }
                };
                let mut enrolled = std::mem::take(&mut batch.enrolled);
                // Enrollments are rare: a batch naming more is not from a hub that took them.
                if enrolled.len() > crate::fleet::ingest::ENROLLED_PER_BATCH {
                    warn!(%replica, enrolled = enrolled.len(), "ingest batch names too many enrolled devices: ignored them");
                    enrolled.clear();
                }
                for again in self.core.ingest_batch(batch, now_ms()) {
                    i.relay.changed(again);
                }
                self.rollout_due |= self.core.rolling() || self.core.draining();
                if self.standby.is_some() {
                    for device in enrolled {
                        i.heard_enrolled(device, now_ms());
                    }
                } else {
                    for device in enrolled {
                        // Enrolled through another replica: its grant from the book (never
                        // from the message), its state sealed for its new key.
                        let grant = self.grant_of(&device).await;
                        let done = self.fleet(|f| f.enrolled(&device, grant, now_ms()));
                        let _ = self.published(Some(done)).await;
                    }
                }
            }
            Inbound::Logs(raw, _req) => {
                if let Some(chunk) = decode::<LogChunk>(topic, payload, &raw) {
                    let device = chunk.device_id.clone();
                    self.logs.deliver(&device, chunk);
                }
            }
        }
    }

    /// Passes what this replica heard from devices on to the other replicas.
    pub(super) async fn relay(&mut self) {
        let Some(ingest) = self.ingest.as_mut() else {
            return;
        };
        let topic = topics::hub_ingest(&ingest.replica);
        for batch in ingest.relay.take() {
            let msg = Outgoing {
                topic: topic.clone(),
                payload: serde_json::to_vec(&batch).unwrap_or_default(),
                retain: false,
                correlation: None,
            };
            if let Err(e) = self.bus.publish(msg).await {
                warn!(error = %e, "cannot pass device reports on to the other hub replicas");
            }
        }
    }
}

fn decode<T: serde::de::DeserializeOwned + HasDevice>(
    topic: &str,
    payload: &[u8],
    raw: &str,
) -> Option<T> {
    match serde_json::from_slice::<T>(payload) {
        Ok(v) if v.device().as_str() == raw => Some(v),
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
