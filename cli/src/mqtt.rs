//! The CLI's MQTT client (the only code naming rumqttc here): publishes a manifest on
//! `shoal/v1/apply/{req}` and waits for the verdict on `shoal/v1/results/{req}`, as any
//! third-party MQTT client would.

use super::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Where `shoal apply` publishes: the broker, the operator's TLS client, and the start of
/// its MQTT client ids (see [`client_id_prefix`]).
pub(crate) struct MqttTarget<'a> {
    pub(crate) broker: &'a BrokerUrl,
    pub(crate) tls: &'a Result<Arc<rustls::ClientConfig>, String>,
    pub(crate) client_prefix: String,
}

/// Publishes on `shoal/v1/apply/{req}` and waits for `shoal/v1/results/{req}`.
pub(crate) async fn publish_apply(
    mqtt: &MqttTarget<'_>,
    payload: String,
    timeout: Duration,
) -> anyhow::Result<ApplyResult> {
    let (broker, tls, client_prefix) = (mqtt.broker, mqtt.tls, &mqtt.client_prefix);
    let req = format!("{:016x}", rand::random::<u64>());
    let mut opts = MqttOptions::new(
        format!("{client_prefix}shoal-cli-{req}"),
        broker.host.clone(),
        broker.port,
    );
    if broker.tls {
        let tls = tls.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_max_packet_size(8 << 20, 8 << 20);
    let (client, mut events) = AsyncClient::new(opts, 16);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    events.set_network_options(net);
    let results = topics::results(&req);
    let work = async {
        let mut published = false;
        loop {
            match events
                .poll()
                .await
                .with_context(|| format!("cannot reach the broker at {broker}"))?
            {
                Event::Incoming(Packet::ConnAck(_)) => {
                    client.subscribe(results.clone(), QoS::AtLeastOnce).await?;
                }
                Event::Incoming(Packet::SubAck(_)) if !published => {
                    client
                        .publish(
                            topics::apply(&req),
                            QoS::AtLeastOnce,
                            false,
                            payload.clone().into_bytes(),
                        )
                        .await?;
                    published = true;
                }
                Event::Incoming(Packet::Publish(p)) if p.topic == results => {
                    let r: ApplyResult = serde_json::from_slice(&p.payload)
                        .context("hub sent an unreadable verdict")?;
                    let _ = client.try_disconnect();
                    return Ok::<_, anyhow::Error>(r);
                }
                _ => {}
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => bail!(
            "no verdict from the hub on {results} within {}s: is shoal-hub running and connected to {broker}?",
            timeout.as_secs()
        ),
    }
}
