//! Prometheus metrics of the hub, served at `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

#[derive(Default)]
pub struct Metrics {
    pub applies: Family<ResultLabel, Counter>,
    pub desired_published: Counter,
    pub devices: Gauge,
    pub devices_online: Gauge,
    pub devices_mdns: Gauge,
    pub workloads: Gauge,
    pub replicas: Family<PhaseLabel, Gauge>,
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "shoal_hub_applies",
            "Manifests received, by result",
            self.applies.clone(),
        );
        r.register(
            "shoal_hub_desired_published",
            "Desired-state messages published to devices",
            self.desired_published.clone(),
        );
        r.register(
            "shoal_hub_devices",
            "Devices known to the hub",
            self.devices.clone(),
        );
        r.register(
            "shoal_hub_devices_online",
            "Devices currently online",
            self.devices_online.clone(),
        );
        r.register(
            "shoal_hub_devices_mdns",
            "Devices of this fleet the hub sees advertised over mDNS",
            self.devices_mdns.clone(),
        );
        r.register(
            "shoal_hub_workloads",
            "Workloads stored",
            self.workloads.clone(),
        );
        r.register(
            "shoal_hub_replicas",
            "Replicas by phase",
            self.replicas.clone(),
        );
    }
}
