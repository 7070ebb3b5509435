//! The hub's MQTT client (rumqttc, MQTT 5 so that response topics and correlation data of
//! operator publishes are visible). Incoming publishes are decoded ([`super::wire`]) into
//! the loop's typed [`BusEvent`]s on a bounded channel; what the loop sends arrives as
//! [`Outbound`] through the [`Bus`] port, implemented here by [`MqttBus`].

use super::wire::{self, Raw};
use crate::app::command::{Bus, BusError, BusEvent, Outbound};
use crate::metrics::KindLabel;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use shoal_api::wire::endpoint::BrokerUrl;
use shoal_api::wire::topics;

use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// What the client task received and the loop has not taken yet: raw, so that a message a
/// newer one supersedes is never decoded.
#[derive(Debug, Clone)]
enum Entry {
    Connected,
    Message(Raw),
}

pub struct MqttBus {
    client: AsyncClient,
}

impl Bus for MqttBus {
    /// Publishes every message that carries `msg` (an apply's result may go to two
    /// topics), even after one fails; the first failure is returned.
    async fn send(&self, msg: Outbound) -> Result<(), BusError> {
        let mut first = Ok(());
        for m in wire::encode(msg) {
            if let Err(e) = self.publish(m).await {
                warn!(error = %e, "mqtt publish failed");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

impl MqttBus {
    async fn publish(&self, msg: wire::Message) -> Result<(), BusError> {
        let topic = msg.topic.clone();
        let r = match msg.correlation {
            Some(c) => {
                let props = PublishProperties {
                    correlation_data: Some(c),
                    ..Default::default()
                };
                self.client
                    .publish_with_properties(
                        msg.topic,
                        QoS::AtLeastOnce,
                        msg.retain,
                        msg.payload,
                        props,
                    )
                    .await
            }
            None => {
                self.client
                    .publish(msg.topic, QoS::AtLeastOnce, msg.retain, msg.payload)
                    .await
            }
        };
        r.map_err(|e| BusError {
            to: topic,
            reason: e.to_string(),
        })
    }
}

/// Events waiting for the main loop while its channel is full. A device's hello, presence
/// and status each carry its whole current state, so only the newest per topic is kept (a
/// join burst or a slow main loop cannot grow it past three entries per device); applies and
/// connection events are all kept, in order. Written by hand: it is a queue with one twist,
/// which no queue crate offers.
#[derive(Debug, Default)]
struct Backlog {
    queue: std::collections::VecDeque<(u64, Entry)>,
    /// Per coalescing topic: the sequence number of its newest entry in `queue`.
    newest: std::collections::HashMap<String, u64>,
    next: u64,
    /// Entries in `queue` that are not superseded.
    live: usize,
}

impl Backlog {
    /// The topic to coalesce on, for device state messages.
    fn key(e: &Entry) -> Option<&str> {
        match e {
            Entry::Message(m) if wire::coalesces(&m.topic) => Some(&m.topic),
            Entry::Message(_) | Entry::Connected => None,
        }
    }

    fn push(&mut self, e: Entry) {
        let seq = self.next;
        self.next += 1;
        let superseded = match Self::key(&e) {
            Some(topic) => self.newest.insert(topic.to_string(), seq).is_some(),
            None => false,
        };
        if !superseded {
            self.live += 1;
        }
        self.queue.push_back((seq, e));
        // Superseded entries are skipped when popped; drop them early once they dominate,
        // so memory follows the live entries.
        if self.queue.len() > 2 * self.live + 64 {
            let newest = &self.newest;
            self.queue.retain(|(seq, e)| match Self::key(e) {
                Some(topic) => newest.get(topic) == Some(seq),
                None => true,
            });
        }
    }

    fn pop(&mut self) -> Option<Entry> {
        while let Some((seq, e)) = self.queue.pop_front() {
            match Self::key(&e) {
                Some(topic) if self.newest.get(topic) != Some(&seq) => continue,
                Some(topic) => {
                    let topic = topic.to_string();
                    self.newest.remove(&topic);
                }
                None => {}
            }
            self.live -= 1;
            return Some(e);
        }
        None
    }

    fn is_empty(&self) -> bool {
        self.live == 0
    }
}

/// How the hub proves itself to the broker.
#[derive(Clone)]
pub enum BusAuth {
    /// Nothing (`--insecure`).
    None,
    /// TLS with the hub's client certificate (an external `mqtts://` broker).
    Tls(std::sync::Arc<rustls::ClientConfig>),
}

/// Counts a message the loop takes or the adapter refuses, by its topic's kind (each
/// message once: one that waits in the backlog is counted when it leaves it).
fn count(received: &Family<KindLabel, Counter>, e: &Entry) {
    if let Some(kind) = kind_of(e) {
        received
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }
}

fn kind_of(e: &Entry) -> Option<&'static str> {
    match e {
        Entry::Message(m) => wire::kind(&m.topic),
        Entry::Connected => None,
    }
}

/// The loop's event for `e`, or `None` for a message the hub does not take (logged).
fn decoded(e: Entry) -> Option<BusEvent> {
    match e {
        Entry::Connected => Some(BusEvent::Connected),
        Entry::Message(m) => wire::decode(m),
    }
}

/// How the hub's client subscribes and counts.
pub struct BusOptions {
    /// Hub replicas: statuses come through the shared subscription and the other
    /// replicas' ingest batches are subscribed to (see [`crate::fleet::ingest`]).
    pub shared_ingest: bool,
    /// Messages received by kind (`shoal_hub_mqtt_received_total`), refused ones included.
    pub received: Family<KindLabel, Counter>,
}

/// Connects to `broker` and spawns the event loop task; events go to `tx`.
pub fn connect(
    broker: &BrokerUrl,
    client_id: &str,
    auth: BusAuth,
    options: BusOptions,
    tx: mpsc::Sender<BusEvent>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> MqttBus {
    let mut opts = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    match auth {
        BusAuth::None => {}
        BusAuth::Tls(c) => {
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(c),
            ));
        }
    }
    opts.set_keep_alive(Duration::from_secs(15));
    opts.set_clean_start(true);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    opts.set_network_options(net);
    opts.set_max_packet_size(Some(crate::mqtt::broker::MAX_PAYLOAD as u32 + 1024));
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    let BusOptions {
        shared_ingest,
        received,
    } = options;
    let sub = client.clone();
    let broker = broker.to_string();
    tracker.spawn(async move {
        let mut failures = 0u32;
        // Events the main loop has not taken yet. The event loop must keep being polled
        // while the main loop is busy: it carries the hub's own publishes (the main loop may
        // be waiting on one, which would deadlock on a full channel) and the keep-alive (a
        // broker drops a client that misses it).
        let mut backlog = Backlog::default();
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = tx.reserve(), if !backlog.is_empty() => {
                    let next = backlog.pop();
                    if let Some(e) = &next {
                        count(&received, e);
                    }
                    match (permit, next.and_then(decoded)) {
                        (Ok(p), Some(e)) => p.send(e),
                        (Err(_), _) => break,
                        (Ok(_), None) => {}
                    }
                    continue;
                }
                ev = eventloop.poll() => ev,
            };
            let mut forward = |e: Entry| -> bool {
                if !backlog.is_empty() {
                    backlog.push(e);
                    return true;
                }
                // Decoded here, off the main loop; kept raw only while the loop is behind.
                let Some(event) = decoded(e.clone()) else {
                    count(&received, &e);
                    return true;
                };
                match tx.try_send(event) {
                    Ok(()) => {
                        count(&received, &e);
                        true
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        backlog.push(e);
                        true
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    failures = 0;
                    info!(%broker, "hub connected to broker");
                    let status: &[&str] = match shared_ingest {
                        true => &[topics::SHARED_STATUS, topics::ALL_HUB_INGEST],
                        false => &[topics::ALL_STATUS],
                    };
                    for f in [
                        topics::APPLY,
                        topics::APPLY_WITH_REQ,
                        topics::APPLY_AS,
                        topics::ALL_HELLO,
                        topics::ALL_PRESENCE,
                        topics::ALL_LOGS,
                    ]
                    .iter()
                    .chain(status)
                    {
                        if let Err(e) = sub.try_subscribe(*f, QoS::AtLeastOnce) {
                            warn!(filter = *f, error = %e, "subscribe failed");
                        }
                    }
                    if !forward(Entry::Connected) {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let (response_topic, correlation) = p
                        .properties
                        .map(|pr| (pr.response_topic, pr.correlation_data))
                        .unwrap_or((None, None));
                    let msg = Entry::Message(Raw {
                        topic,
                        payload: p.payload,
                        response_topic,
                        correlation,
                    });
                    if !forward(msg) {
                        break;
                    }
                }
                Ok(other) => debug!(event = ?other, "mqtt event"),
                Err(e) => {
                    failures += 1;
                    // One line per retry period, not a flood.
                    if failures == 1 || failures.is_multiple_of(30) {
                        warn!(%broker, error = %e, attempt = failures, "broker connection failed; retrying");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        // Best effort: tell the broker we are leaving.
        let _ = sub.try_disconnect();
    });
    MqttBus { client }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, payload: &str) -> Entry {
        Entry::Message(Raw {
            topic: topic.to_string(),
            payload: bytes::Bytes::from(payload.to_string()),
            response_topic: None,
            correlation: None,
        })
    }

    fn drain(b: &mut Backlog) -> Vec<String> {
        std::iter::from_fn(|| b.pop())
            .map(|e| match e {
                Entry::Connected => "connected".to_string(),
                Entry::Message(m) => {
                    format!("{}={}", m.topic, String::from_utf8_lossy(&m.payload))
                }
            })
            .collect()
    }

    #[test]
    fn messages_count_by_their_topics_kind_refused_ones_too() {
        let received: Family<KindLabel, Counter> = Family::default();
        // A hello that names another device is refused by the adapter, and still counted.
        let spoof = msg("shoal/v1/devices/d1/hello", r#"{"deviceId":"d2"}"#);
        assert!(decoded(spoof.clone()).is_none());
        count(&received, &spoof);
        count(&received, &msg(topics::APPLY, "kind: x"));
        count(&received, &msg("elsewhere/d1/hello", "{}"));
        count(&received, &Entry::Connected);
        let n = |k: &str| received.get_or_create(&KindLabel { kind: k.into() }).get();
        assert_eq!((n("hello"), n("apply"), n("status")), (1, 1, 0));
    }

    #[test]
    fn device_state_coalesces_to_the_newest_and_applies_never_do() {
        let mut b = Backlog::default();
        let status = "shoal/v1/devices/d1/status";
        b.push(msg(status, "1"));
        b.push(msg(topics::APPLY, "a"));
        b.push(msg("shoal/v1/devices/d1/presence", "online"));
        b.push(msg(status, "2"));
        b.push(msg(topics::APPLY, "b"));
        b.push(Entry::Connected);
        b.push(msg(status, "3"));
        b.push(msg("shoal/v1/devices/d2/status", "x"));
        assert!(!b.is_empty());
        assert_eq!(
            drain(&mut b),
            [
                "shoal/v1/apply=a",
                "shoal/v1/devices/d1/presence=online",
                "shoal/v1/apply=b",
                "connected",
                "shoal/v1/devices/d1/status=3",
                "shoal/v1/devices/d2/status=x",
            ]
        );
        assert!(b.is_empty());
        // Superseded entries do not count: a status storm leaves one live entry.
        for i in 0..1000 {
            b.push(msg(status, &i.to_string()));
        }
        assert_eq!(b.live, 1);
        assert!(
            b.queue.len() <= 66,
            "superseded entries dropped: {}",
            b.queue.len()
        );
        assert_eq!(drain(&mut b), [format!("{status}=999")]);
        assert!(b.is_empty() && b.queue.is_empty());
    }
}
