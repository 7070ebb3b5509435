//! `shoal describe device ID`: one device as an operator needs it when something is wrong
//! there: its state, capacity and hardware, its labels (the operator's, which placement
//! sees, and those it asked for and was not granted), the operators' annotations, what runs
//! on it (with the hardware nodes each replica holds) and its recent events. Composed from
//! the hub's read APIs.

use super::*;
use serde::Serialize;

/// What `-o json|yaml` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeviceDetail {
    device: DeviceView,
    replicas: Vec<PlacedReplica>,
    events: Vec<EventView>,
}

/// One replica placed on the device.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PlacedReplica {
    workload: String,
    #[serde(flatten)]
    replica: shoal_api::wire::views::ReplicaView,
}

/// Events shown (the newest).
const EVENTS: usize = 10;

pub(crate) async fn describe_device(hub: &Hub, id: &str, output: Output) -> anyhow::Result<()> {
    let devices: Vec<DeviceView> = hub.get("/v1/devices").await?;
    let device = devices
        .into_iter()
        .find(|d| d.id == id)
        .with_context(|| format!("device {id:?} not found"))?;
    let workloads: Vec<WorkloadView> = hub.get("/v1/workloads").await?;
    let replicas: Vec<PlacedReplica> = workloads
        .into_iter()
        .flat_map(|w| {
            let name = w.name;
            w.replicas
                .into_iter()
                .filter(|r| r.device.as_deref() == Some(id))
                .map(move |replica| PlacedReplica {
                    workload: name.clone(),
                    replica,
                })
        })
        .collect();
    let all: Vec<EventView> = hub
        .get(&format!(
            "/v1/events?after=0&object={}",
            url_escape(&format!("device/{id}"))
        ))
        .await?;
    let events = all[all.len().saturating_sub(EVENTS)..].to_vec();
    let detail = DeviceDetail {
        device,
        replicas,
        events,
    };
    if matches!(output, Output::Json | Output::Yaml) {
        return emit(&detail, output, |_| Table::new(&[]));
    }
    let d = &detail.device;
    let list = |l: &std::collections::BTreeMap<String, String>| -> String {
        if l.is_empty() {
            return "<none>".into();
        }
        let items: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
        escaped(&items.join(", ")).into_owned()
    };
    println!("Name:        {}", d.id);
    println!("Status:      {}", device_status(d));
    println!(
        "Platform:    {}/{}, runtimes {}",
        escaped(&d.os),
        escaped(&d.arch),
        if d.runtimes.is_empty() {
            "<none>".to_string()
        } else {
            escaped(&d.runtimes.join(", ")).into_owned()
        }
    );
    println!(
        "Capacity:    {} cpus, {} memory ({} allocated), {} replicas",
        d.cpus,
        format_memory_rounded(d.memory),
        format_memory_rounded(d.memory_allocated),
        d.replicas
    );
    println!(
        "Hardware:    {} (asked for / offered)",
        escaped(&hardware_use(d))
    );
    println!(
        "Labels:      {} (the operator's: placement selects on these)",
        list(&d.labels)
    );
    for (k, v) in &d.annotations {
        println!("Annotation:  {k}: {}", escaped(v));
    }
    if !d.requested_labels.is_empty() {
        println!(
            "Requested:   {} (asked for by the device, not granted)",
            list(&d.requested_labels)
        );
    }
    println!(
        "Agent:       version {}, last seen {}, generation {}/{}",
        escaped(&d.agent_version),
        ago(d.last_seen_ms),
        d.observed_generation,
        d.desired_generation
    );
    if !d.mdns_addresses.is_empty() {
        println!("mDNS:        {}", escaped(&d.mdns_addresses.join(", ")));
    }
    println!("Replicas:");
    let mut t = Table::new(&[
        "WORKLOAD", "REPLICA", "VARIANT", "PHASE", "RESTARTS", "HOLDS", "REASON",
    ]);
    for p in &detail.replicas {
        let r = &p.replica;
        t.row(vec![
            p.workload.clone(),
            r.replica.to_string(),
            if r.variant.is_empty() {
                "-".into()
            } else {
                r.variant.clone()
            },
            r.phase.to_string(),
            r.restarts.to_string(),
            if r.devices.is_empty() {
                "-".into()
            } else {
                r.devices.join(",")
            },
            r.reason.clone().unwrap_or_default(),
        ]);
    }
    print!("{t}");
    println!("Events:");
    print!("{}", events_table(&detail.events, false, true));
    Ok(())
}
