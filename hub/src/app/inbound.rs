//! What arrives over MQTT, decoded by the adapter ([`crate::mqtt::wire`]), handed to the
//! fleet: hello, presence, status, ingest batches from other replicas, applies, log chunks.

use super::*;
use crate::app::command::{Bus, MqttApply, Outbound};
use crate::store::Store;
use shoal_daemon::clock::now_ms;
use tracing::{info_span, warn, Instrument};

impl<S: Store, B: Bus> MainLoop<S, B> {
    /// Something a device, an operator or another hub replica sent over MQTT.
    pub(super) async fn on_message(&mut self, event: BusEvent) {
        match event {
            BusEvent::Connected => {}
            BusEvent::Apply(a) => self.on_mqtt_apply(*a).await,
            BusEvent::Hello(hello) => {
                let publish = self.fleet(|f| f.hello(*hello, now_ms()));
                self.queue(publish);
            }
            BusEvent::Presence { device, online } => {
                let publish = self.fleet(|f| f.presence(&device, online, now_ms()));
                self.queue(publish);
            }
            BusEvent::Status(status) => {
                match self.ingest.as_mut() {
                    None => self.core.status(*status, now_ms()),
                    Some(i) => match self.core.accept_status(*status, now_ms()) {
                        crate::fleet::Accepted::New(s) => i.relay.changed(s),
                        crate::fleet::Accepted::Same(h)
                        | crate::fleet::Accepted::Stale { heard: h, .. } => i.relay.heard(h),
                    },
                }
                // Stepped in batches (see RolloutTick): one step per report would
                // republish desired states once per freed slot.
                self.rollout_due |=
                    self.core.rolling() || self.core.draining() || self.core.has_jobs();
            }
            BusEvent::Ingest { replica, batch } => self.on_ingest(replica, *batch).await,
            BusEvent::Logs(chunk) => {
                let device = chunk.device_id.clone();
                self.logs.deliver(&device, *chunk);
            }
        }
    }

    /// A manifest applied over MQTT: applied (or refused), recorded in the audit log, and
    /// answered where the operator asked.
    async fn on_mqtt_apply(&mut self, a: MqttApply) {
        let MqttApply {
            text,
            req,
            by,
            reply,
        } = a;
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
            .filter(|_| self.settings.attributed_applies)
            .and_then(|b| shoal_api::model::ids::OperatorName::try_from(b).ok());
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
        let answer = Outbound::ApplyResult { to: reply, result };
        if let Err(e) = self.publisher.bus.send(answer).await {
            warn!(error = %e, "cannot publish apply result");
        }
    }

    /// Another replica's ingest batch: the reports it took, and the devices that enrolled
    /// through it.
    async fn on_ingest(
        &mut self,
        replica: String,
        mut batch: shoal_api::wire::messages::IngestBatch,
    ) {
        let Some(i) = self.ingest.as_mut() else {
            return;
        };
        if replica == i.replica {
            return; // our own, back from the broker
        }
        let mut enrolled = std::mem::take(&mut batch.enrolled);
        // Enrollments are rare: a batch naming more is not from a hub that took them.
        if enrolled.len() > crate::fleet::ingest::ENROLLED_PER_BATCH {
            warn!(%replica, enrolled = enrolled.len(), "ingest batch names too many enrolled devices: ignored them");
            enrolled.clear();
        }
        for again in self.core.ingest_batch(batch, now_ms()) {
            i.relay.changed(again);
        }
        self.rollout_due |= self.core.rolling() || self.core.draining() || self.core.has_jobs();
        if matches!(self.role, Role::Standby(_)) {
            for device in enrolled {
                i.heard_enrolled(device, now_ms());
            }
        } else {
            for device in enrolled {
                // Enrolled through another replica: its grant from the book (never
                // from the message), its state sealed for its new key.
                self.enrolled(device).await;
            }
        }
    }

    /// Passes what this replica heard from devices on to the other replicas.
    pub(super) async fn relay(&mut self) {
        let Some(ingest) = self.ingest.as_mut() else {
            return;
        };
        let replica = ingest.replica.clone();
        for batch in ingest.relay.take() {
            let msg = Outbound::Ingest {
                replica: replica.clone(),
                batch,
            };
            if let Err(e) = self.publisher.bus.send(msg).await {
                warn!(error = %e, "cannot pass device reports on to the other hub replicas");
            }
        }
    }
}
