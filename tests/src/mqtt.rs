//! A small MQTT client for the benchmarks: connect, subscribe, wait for a matching publish.

use anyhow::Result;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// A connected client and its event loop (polled by [`Mqtt::wait`]).
pub struct Mqtt {
    pub client: AsyncClient,
    events: rumqttc::EventLoop,
}

impl Mqtt {
    /// Connects as an operator (with the fleet's bundle, unless it runs `--insecure`).
    pub async fn connect(broker: &crate::BrokerAccess, id: &str) -> Result<Mqtt> {
        let tls = match &broker.bundle {
            Some(b) => {
                let read = |f: &str| std::fs::read_to_string(b.join(f));
                let identity = shoal_pki::tls::ClientIdentity::new(
                    &read("operator.pem")?,
                    &read("operator.key")?,
                )?;
                Some(shoal_pki::tls::mqtt_client_config(
                    &read("ca.pem")?,
                    Some(identity),
                )?)
            }
            None => None,
        };
        Self::connect_with(broker.port, id, tls).await
    }

    /// Connects as the hub (which may publish anywhere), with a client certificate the
    /// benchmark issues itself from the hub's CA: for baseline hops on a scratch topic,
    /// which an operator may not publish to.
    pub async fn connect_as_hub(port: u16, hub_data: &std::path::Path, id: &str) -> Result<Mqtt> {
        let ca = shoal_pki::ca::FleetCa::load_or_create(&hub_data.join("pki"))?;
        let (cert, key) = ca.issue(shoal_pki::ca::HUB_NAME, &shoal_pki::ca::Usage::Client)?;
        let identity = shoal_pki::tls::ClientIdentity::new(&cert, &key)?;
        let tls = shoal_pki::tls::mqtt_client_config(ca.pem(), Some(identity))?;
        Self::connect_with(port, &format!("shoal-hub-{id}"), Some(tls)).await
    }

    async fn connect_with(
        port: u16,
        id: &str,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Result<Mqtt> {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        if let Some(tls) = tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
        }
        o.set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut events) = AsyncClient::new(o, 64);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        events.set_network_options(net);
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await? {
                break;
            }
        }
        Ok(Mqtt { client, events })
    }

    pub async fn subscribe(&mut self, topic: &str) -> Result<()> {
        self.client.subscribe(topic, QoS::AtLeastOnce).await?;
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = self.events.poll().await? {
                return Ok(());
            }
        }
    }

    /// Waits for a publish on `topic` whose payload satisfies `done`.
    pub async fn wait(&mut self, topic: &str, done: impl Fn(&[u8]) -> bool) -> Result<()> {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = self.events.poll().await? {
                if p.topic == topic && done(&p.payload) {
                    return Ok(());
                }
            }
        }
    }
}

/// Whether a device status payload shows workload `name` `Running`.
pub fn running(payload: &[u8], name: &str) -> bool {
    in_phase(payload, name, "Running")
}

/// Whether a device status payload shows a replica of workload `name` in `phase`.
pub fn in_phase(payload: &[u8], name: &str, phase: &str) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return false;
    };
    v["workloads"]
        .as_array()
        .is_some_and(|ws| ws.iter().any(|w| w["name"] == name && w["phase"] == phase))
}
