//! A fleet simulator: N devices in one process, each with its own MQTT connection speaking
//! the real wire protocol from `shoal_api` (retained hello and presence with a last will,
//! desired state by generation, status on every change and every `STATUS_PERIOD_MS`). They
//! pretend to run what they are told: a replica starts after a jittered delay, then runs —
//! or crash-loops, if its args contain `crash` or with the configured failure rate.
//!
//! It is how scale and chaos are tested without N boards (`shoal-sim`, and the scale test).

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use shoal_api::model::ids::DeviceId;
use shoal_api::wire::messages::{
    DesiredState, DeviceStatus, Hello, InstanceStatus, Phase, STATUS_PERIOD_MS,
};
use shoal_api::wire::topics;
use shoal_daemon::clock::now_ms;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub host: String,
    pub port: u16,
    /// Device ids are `{prefix}-{i:05}`.
    pub prefix: String,
    pub devices: usize,
    pub labels: BTreeMap<String, String>,
    /// Mean time from "told to run" to `Running` (uniform 0.5×–1.5×).
    pub start_delay: Duration,
    /// Chance that a started replica crash-loops instead.
    pub failure_rate: f64,
    /// Memory each device offers.
    pub memory: u64,
}

/// Counters the simulator keeps while it runs.
#[derive(Debug, Default)]
pub struct SimStats {
    pub connected: AtomicUsize,
    pub desired_received: AtomicUsize,
    pub statuses_sent: AtomicUsize,
}

/// Runs the fleet until `stop`; devices connect concurrently.
pub async fn run(cfg: SimConfig, stats: Arc<SimStats>, stop: CancellationToken) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..cfg.devices {
        let cfg = cfg.clone();
        let stats = stats.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let id = format!("{}-{i:05}", cfg.prefix);
            if let Ok(id) = id.parse::<DeviceId>() {
                device(&cfg, id, &stats, stop).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// A replica started after its delay, or crashed.
struct Started {
    instance: String,
    revision: String,
    crashed: bool,
}

async fn device(cfg: &SimConfig, id: DeviceId, stats: &SimStats, stop: CancellationToken) {
    let mut o = MqttOptions::new(format!("shoal-agent-{id}"), cfg.host.clone(), cfg.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_max_packet_size(4 << 20, 4 << 20);
    o.set_last_will(LastWill::new(
        topics::presence(&id),
        topics::OFFLINE,
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut events) = AsyncClient::new(o, 256);
    let hello = Hello {
        allows: Vec::new(),
        protocol: shoal_api::PROTOCOL_VERSION,
        device_id: id.clone(),
        arch: "sim".into(),
        variant: None,
        os: "linux".into(),
        runtimes: vec!["wasm".into()],
        cpus: 4,
        memory: cfg.memory,
        labels: cfg.labels.clone(),
        agent_version: "sim".into(),
        max_replicas: None,
        devices: Default::default(),
    };
    let (tx, mut rx) = mpsc::channel::<Started>(64);
    let mut generation = 0u64;
    let mut running: BTreeMap<String, InstanceStatus> = BTreeMap::new();
    let mut was_connected = false;
    let mut heartbeat = tokio::time::interval(Duration::from_millis(STATUS_PERIOD_MS));
    heartbeat.tick().await;
    // Strictly increasing, like an agent's (hub replicas order a device's reports by it).
    let last_ms = std::sync::atomic::AtomicU64::new(0);
    let status = |running: &BTreeMap<String, InstanceStatus>, generation: u64| DeviceStatus {
        protocol: shoal_api::PROTOCOL_VERSION,
        device_id: id.clone(),
        observed_generation: generation,
        workloads: running.values().cloned().collect(),
        time_ms: {
            let t = now_ms().max(last_ms.load(Ordering::Relaxed) + 1);
            last_ms.store(t, Ordering::Relaxed);
            t
        },
    };
    let publish_status = |running: &BTreeMap<String, InstanceStatus>, generation: u64| {
        if let Ok(p) = serde_json::to_vec(&status(running, generation)) {
            stats.statuses_sent.fetch_add(1, Ordering::Relaxed);
            let _ = client.try_publish(topics::status(&id), QoS::AtLeastOnce, true, p);
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = heartbeat.tick() => publish_status(&running, generation),
            Some(s) = rx.recv() => {
                if let Some(st) = running.get_mut(&s.instance).filter(|st| st.revision == s.revision) {
                    if s.crashed {
                        st.phase = Phase::CrashLoopBackOff;
                        st.restarts += 1;
                        st.reason = Some("exited with status 3 (simulated)".into());
                        st.exit_code = Some(3);
                    } else {
                        st.phase = Phase::Running;
                        st.started_at_ms = Some(now_ms());
                    }
                    publish_status(&running, generation);
                }
            }
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if !was_connected {
                        stats.connected.fetch_add(1, Ordering::Relaxed);
                        was_connected = true;
                    }
                    let _ = client.try_subscribe(topics::desired(&id), QoS::AtLeastOnce);
                    let _ = client.try_publish(topics::presence(&id), QoS::AtLeastOnce, true, topics::ONLINE);
                    if let Ok(h) = serde_json::to_vec(&hello) {
                        let _ = client.try_publish(topics::hello(&id), QoS::AtLeastOnce, true, h);
                    }
                    publish_status(&running, generation);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(state) = shoal_pki::sign::open(None, &p.payload) else { continue };
                    let Ok(d) = serde_json::from_slice::<DesiredState>(&state) else { continue };
                    if d.generation <= generation {
                        continue;
                    }
                    stats.desired_received.fetch_add(1, Ordering::Relaxed);
                    generation = d.generation;
                    let mut next = BTreeMap::new();
                    for w in &d.workloads {
                        let instance = w.instance();
                        match running.remove(&instance).filter(|st| st.revision == w.revision) {
                            Some(st) => {
                                next.insert(instance, st);
                            }
                            None => {
                                let crashed = w.args.iter().any(|a| a.contains("crash"))
                                    || rand::random::<f64>() < cfg.failure_rate;
                                let delay = cfg.start_delay.mul_f64(0.5 + rand::random::<f64>());
                                let tx = tx.clone();
                                let started = Started {
                                    instance: instance.clone(),
                                    revision: w.revision.clone(),
                                    crashed,
                                };
                                tokio::spawn(async move {
                                    tokio::time::sleep(delay).await;
                                    let _ = tx.send(started).await;
                                });
                                next.insert(instance, InstanceStatus {
                                    schedule: None,
                                    name: w.name.clone(),
                                    replica: w.replica,
                                    revision: w.revision.clone(),
                                    phase: Phase::Starting,
                                    restarts: 0,
                                    reason: None,
                                    exit_code: None,
                                    started_at_ms: None,
                                    backoff_ms: None,
                                    variant: "sim".into(),
                                    healthy: None,
                                    devices: Vec::new(),
                                    run: w.job.map(|j| j.run),
                                    finished_at_ms: None,
                                });
                            }
                        }
                    }
                    running = next;
                    publish_status(&running, generation);
                }
                Ok(_) => {}
                Err(_) => {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            },
        }
    }
    // A clean departure, like the real agent.
    let _ = client.try_publish(
        topics::presence(&id),
        QoS::AtLeastOnce,
        true,
        topics::OFFLINE,
    );
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        let _ = client.disconnect().await;
        while let Ok(ev) = events.poll().await {
            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
}
