//! The local API's views (`shoal-agent ps`, `status`, `inspect`, `peers`, `restart`), read
//! from the loop's parts at once: the loop answers a [`LocalRequest`] here, between two
//! events.

use super::replicas::Replicas;
use super::Agent;
use crate::local::{self, LocalRequest};
use crate::status::{AgentStatusView, DevicePeer, HubPeer, InspectView, PeersView, ReplicaView};
use shoal_api::wire::messages::{DesiredWorkload, Phase};
use std::collections::BTreeMap;

impl Agent {
    /// Answers the local API: from state the loop owns, at once.
    pub(super) fn on_local(&mut self, request: LocalRequest) {
        match request {
            LocalRequest::Peers(reply) => {
                let _ = reply.send(self.peers_view());
            }
            LocalRequest::Status(reply) => {
                let _ = reply.send(self.status_view());
            }
            LocalRequest::Replicas(reply) => {
                let _ = reply.send(replica_views(&self.replicas));
            }
            LocalRequest::Inspect(name, reply) => {
                let desired: Vec<DesiredWorkload> = self
                    .replicas
                    .desired_workloads()
                    .iter()
                    .filter(|w| w.name == name)
                    .cloned()
                    .collect();
                let observed: Vec<ReplicaView> = replica_views(&self.replicas)
                    .into_iter()
                    .filter(|r| r.workload == name.as_str())
                    .collect();
                let view = (!desired.is_empty() || !observed.is_empty()).then(|| InspectView {
                    workload: name.to_string(),
                    desired,
                    observed,
                    logs: Vec::new(),
                });
                let _ = reply.send(view);
            }
            LocalRequest::Restart(name, reply) => {
                let _ = reply.send(self.replicas.restart(&name));
            }
        }
    }

    fn status_view(&self) -> AgentStatusView {
        let mut hub = self.link.view().clone();
        hub.broker = self.discovery.broker();
        let hello = self.link.hello();
        let allocated = self
            .replicas
            .desired_workloads()
            .iter()
            .map(|w| w.resources.memory)
            .sum();
        let data_dir = &self.config.data_dir;
        AgentStatusView {
            device: self.config.device_id.to_string(),
            fleet: self.config.fleet.clone(),
            agent_version: hello.agent_version.clone(),
            runtimes: hello.runtimes.clone(),
            hub,
            generation: self.replicas.generation(),
            last_sync_ms: self.link.last_sync_ms(),
            replicas: self.replicas.len(),
            running: self
                .replicas
                .supervised()
                .filter(|r| self.replicas.is_running(r.instance))
                .count(),
            disk: crate::host::disk(data_dir).map(|(total, available)| local::DiskView {
                path: data_dir.display().to_string(),
                total_bytes: total,
                available_bytes: available,
            }),
            memory: local::MemoryView {
                offered_bytes: hello.memory,
                allocated_bytes: allocated,
                machine_total_bytes: crate::host::total_memory(),
                machine_available_bytes: crate::host::available_memory(),
                agent_rss_bytes: crate::host::agent_rss(),
            },
            started_at_ms: self.started_at_ms,
        }
    }

    fn peers_view(&self) -> PeersView {
        let directory = self.discovery.directory();
        let hub_link = self.discovery.hub_link();
        let choice = directory.hub_choice();
        let current = hub_link.current().map(|t| t.instance.as_str());
        let pinned = self.config.broker.is_some() && self.config.hub_url.is_some();
        let state = |instance: &str| {
            let candidate = choice.candidates.iter().any(|c| c.instance == instance);
            if current == Some(instance) {
                "selected".to_string()
            } else if let Some((_, why)) = hub_link.failure(instance) {
                format!("ignored: not authenticated: {why}")
            } else if candidate && pinned {
                "ignored: --broker and --hub given".to_string()
            } else if candidate {
                "conflict".to_string()
            } else {
                choice
                    .ignored
                    .iter()
                    .find(|(i, _)| i == instance)
                    .map_or("ignored".to_string(), |(_, r)| format!("ignored: {r}"))
            }
        };
        let addrs = |a: &[std::net::IpAddr]| a.iter().map(|a| a.to_string()).collect();
        PeersView {
            mdns: self.config.mdns.is_some(),
            fleet: self.config.fleet.clone(),
            hubs: directory
                .hubs()
                .map(|h| HubPeer {
                    instance: h.hub.instance.clone(),
                    fleet: h.hub.ad.fleet.clone(),
                    addresses: addrs(&h.hub.addrs),
                    state: state(&h.hub.instance),
                    first_seen_ms: h.first_seen_ms,
                })
                .collect(),
            devices: directory
                .peers()
                .map(|p| DevicePeer {
                    device: p.ad.device.to_string(),
                    arch: p.ad.arch.clone(),
                    runtimes: p.ad.runtimes.clone(),
                    labels: p.ad.labels.clone(),
                    addresses: addrs(&p.addrs),
                    first_seen_ms: p.first_seen_ms,
                })
                .collect(),
        }
    }
}

/// Every replica supervised here, with what it uses.
pub fn replica_views(replicas: &Replicas) -> Vec<ReplicaView> {
    let desired: BTreeMap<String, &DesiredWorkload> = replicas
        .desired_workloads()
        .iter()
        .map(|w| (w.instance(), w))
        .collect();
    replicas
        .supervised()
        .map(|r| {
            let status = r.status;
            let phase = status.map_or(Phase::Pending, |s| s.phase);
            let want = desired.get(r.instance);
            ReplicaView {
                instance: r.instance.to_string(),
                workload: r.workload.to_string(),
                replica: want.map_or(0, |w| w.replica),
                revision: r.revision.to_string(),
                variant: status.map(|s| s.variant.clone()).unwrap_or_default(),
                phase: phase.to_string(),
                restarts: status.map_or(0, |s| s.restarts),
                started_at_ms: status.and_then(|s| s.started_at_ms),
                reason: status.and_then(|s| s.reason.clone()),
                healthy: status.and_then(|s| s.healthy),
                exit_code: status.and_then(|s| s.exit_code),
                memory_bytes: r.memory,
                memory_limit: want.map_or(0, |w| w.resources.memory),
                cpu_nanos: r.cpu,
            }
        })
        .collect()
}
