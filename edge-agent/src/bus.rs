//! The agent's MQTT adapter (rumqttc, MQTT 3.1.1, which every broker speaks), over TLS with
//! the device certificate unless the agent runs `--insecure`.
//!
//! On every (re)connect it subscribes to the device's desired and log-request topics and announces itself
//! (retained `online` presence, retained hello); its last will marks it `offline`. The broker
//! address comes through a watch channel: fixed with `--broker`, or whatever hub mDNS found. Incoming
//! desired states and log requests become [`BusEvent`]s; publishing goes through the [`Bus`] trait.

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use shoal_api::model::ids::DeviceId;
use shoal_api::wire::endpoint::BrokerUrl;
use shoal_api::wire::topics;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
#[error("mqtt publish to {topic:?} failed: {reason}")]
pub struct BusError {
    pub topic: String,
    pub reason: String,
}

#[derive(Debug)]
pub enum BusEvent {
    /// Connected (again): announce and republish status.
    Connected,
    /// The connection failed or was lost (said once per outage): why.
    Disconnected(String),
    /// A desired-state payload arrived on our desired topic.
    Desired(bytes::Bytes),
    /// The hub asks for log lines (`devices/{d}/logreq`).
    LogRequest(bytes::Bytes),
}

/// Cloneable so that tasks (log streams) can publish on their own.
pub trait Bus: Clone + Send + Sync + 'static {
    fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> impl Future<Output = Result<(), BusError>> + Send;
}

#[derive(Clone)]
pub struct MqttBus {
    client: AsyncClient,
}

impl Bus for MqttBus {
    /// Never waits: while the broker is unreachable the client's queue fills up, and a full
    /// queue drops the message (every message the agent sends is level-based and is sent
    /// again on reconnect).
    async fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) -> Result<(), BusError> {
        self.client
            .try_publish(topic.clone(), QoS::AtLeastOnce, retain, payload)
            .map_err(|e| BusError {
                topic,
                reason: e.to_string(),
            })
    }
}

/// Largest message the agent accepts (a desired state for a busy device).
const MAX_PACKET: usize = 4 << 20;

fn options(
    broker: &BrokerUrl,
    device: &DeviceId,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> MqttOptions {
    let mut opts = MqttOptions::new(
        format!("{}{device}", shoal_api::policy::acl::AGENT_CLIENT_PREFIX),
        broker.host.clone(),
        broker.port,
    );
    if let (true, Some(tls)) = (broker.tls, tls) {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_clean_session(true);
    opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    opts.set_last_will(LastWill::new(
        topics::presence(device),
        topics::OFFLINE,
        QoS::AtLeastOnce,
        true,
    ));
    opts
}

/// Connects (and keeps reconnecting) to the broker `target` names; events go to `tx`. While
/// `target` is `None` (no hub found yet) nothing is attempted; when it changes (the hub moved)
/// the connection is dropped and made again to the new address.
///
/// `contact` is set to the time of each packet that proves the broker receives what this
/// device sends (CONNACK, PUBACK, PINGRESP; never a message from the hub, which a one-way
/// partition could still deliver): `spec.disconnect.stopAfter` counts from it.
pub fn connect(
    mut target: watch::Receiver<Option<BrokerUrl>>,
    device: &DeviceId,
    tls: Option<Arc<rustls::ClientConfig>>,
    tx: mpsc::Sender<BusEvent>,
    contact: watch::Sender<Option<std::time::Instant>>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> MqttBus {
    let placeholder = BrokerUrl {
        host: "127.0.0.1".into(),
        port: 1883,
        tls: false,
    };
    let (client, mut eventloop) = AsyncClient::new(options(&placeholder, device, None), 256);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let sub = client.clone();
    let desired_topic = topics::desired(device);
    let logreq_topic = topics::log_request(device);
    let device = device.clone();
    tracker.spawn(async move {
        let mut current: Option<BrokerUrl> = None;
        let mut watching = true;
        let mut failures = 0u32;
        loop {
            let wanted = target.borrow_and_update().clone();
            if let (Some(b), Some(_)) = (&wanted, &tls) {
                if !b.tls && wanted != current {
                    warn!(broker = %b, "refusing plain MQTT: this agent speaks TLS only (run both hub and agent with --insecure for a plain-TCP development fleet)");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        r = target.changed() => if r.is_err() { break },
                    }
                    continue;
                }
            }
            if wanted.is_some() && wanted != current {
                if let Some(old) = &current {
                    info!(from = %old, to = ?wanted.as_ref().map(ToString::to_string), "hub moved; reconnecting");
                }
                current = wanted;
                if let Some(b) = &current {
                    eventloop.mqtt_options = options(b, &device, tls.as_ref());
                }
                // Drop the old connection. What was queued is lost with the clean session;
                // harmless, since every message is level-based and re-sent on connect.
                eventloop.clean();
                failures = 0;
            }
            let Some(broker) = current.clone() else {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = target.changed() => if r.is_err() { break },
                }
                continue;
            };
            let ev = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = target.changed(), if watching => {
                    watching = r.is_ok();
                    continue;
                }
                ev = eventloop.poll() => ev,
            };
            if let Ok(Event::Incoming(Packet::ConnAck(_) | Packet::PubAck(_) | Packet::PingResp)) = &ev {
                contact.send_replace(Some(std::time::Instant::now()));
            }
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if failures > 0 {
                        info!(%broker, after_attempts = failures, "reconnected to broker");
                    } else {
                        info!(%broker, "connected to broker");
                    }
                    failures = 0;
                    for t in [&desired_topic, &logreq_topic] {
                        if let Err(e) = sub.try_subscribe(t.clone(), QoS::AtLeastOnce) {
                            warn!(topic = %t, error = %e, "subscribe failed");
                        }
                    }
                    if tx.send(BusEvent::Connected).await.is_err() {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == desired_topic => {
                    if tx.send(BusEvent::Desired(p.payload)).await.is_err() {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == logreq_topic => {
                    if tx.send(BusEvent::LogRequest(p.payload)).await.is_err() {
                        break;
                    }
                }
                // Our own clean departure (see `leave`): nothing more to do.
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                Ok(other) => debug!(event = ?other, "mqtt event"),
                Err(e) => {
                    failures += 1;
                    // One line per retry period (about 30 s), not a flood.
                    if failures == 1 || failures.is_multiple_of(30) {
                        warn!(%broker, error = %e, attempt = failures, "broker unreachable; running from local state and retrying");
                    }
                    if failures == 1 && tx.send(BusEvent::Disconnected(e.to_string())).await.is_err() {
                        break;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        r = target.changed(), if watching => watching = r.is_ok(),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    });
    MqttBus { client }
}

impl MqttBus {
    /// Announces a clean departure: retained `offline` presence, then disconnect.
    pub async fn leave(&self, device: &DeviceId) {
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            let _ = self
                .client
                .publish(
                    topics::presence(device),
                    QoS::AtLeastOnce,
                    true,
                    topics::OFFLINE,
                )
                .await;
            let _ = self.client.disconnect().await;
        })
        .await;
    }
}
