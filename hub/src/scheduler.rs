//! Placement: a pure function from (devices, workloads, current assignments) to assignments.
//!
//! Rules (in order):
//! 1. A replica that is already placed stays where it is while its device still exists and
//!    still matches the workload's selector and runtime (no needless restarts). Replicas whose
//!    index is beyond `spec.replicas` are removed.
//! 2. Unplaced replicas go to an *eligible* device: online, carries every selector label,
//!    offers the `wasm` runtime, has free memory for the workload's request, and none of the
//!    workload's `spec.ports` is taken there (replicas listen on the device's own addresses,
//!    like Kubernetes host ports, so two replicas holding port 8080 never share a device).
//! 3. Among eligible devices: fewest replicas of this workload first (spread), then most free
//!    memory (least loaded), then device id (deterministic ties).
//! 4. `placement: every` keeps one replica on each eligible device; a new device gets the
//!    lowest free replica index, so existing replicas keep their identity.
//!
//! Whatever cannot be placed is reported as pending with a reason a person can act on.
//! Workloads are placed in name order, so the result depends only on the inputs.

use shoal_api::ids::{DeviceId, WorkloadName};
use shoal_api::quantity::format_memory;
use shoal_api::workload::{Placement, Workload};
use std::collections::{BTreeMap, BTreeSet};

/// What the scheduler needs to know about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    pub id: DeviceId,
    pub labels: BTreeMap<String, String>,
    pub runtimes: BTreeSet<String>,
    /// Memory offered to workloads, bytes.
    pub memory: u64,
    pub online: bool,
}

/// What is taken on a device by the replicas placed so far.
#[derive(Debug, Clone, Default)]
struct Load {
    memory: u64,
    ports: BTreeSet<u16>,
}

impl Load {
    fn add(&mut self, w: &Workload) {
        self.memory += w.resources.memory;
        self.ports.extend(w.ports.iter().map(|p| p.port));
    }

    fn port_taken(&self, w: &Workload) -> Option<u16> {
        w.ports
            .iter()
            .map(|p| p.port)
            .find(|p| self.ports.contains(p))
    }
}

type Used = BTreeMap<DeviceId, Load>;

/// Replica index → device, per workload.
pub type Assignments = BTreeMap<WorkloadName, BTreeMap<u32, DeviceId>>;

/// The scheduler's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Schedule {
    pub assignments: Assignments,
    /// Replicas that could not be placed, with the reason (one per workload).
    pub pending: BTreeMap<WorkloadName, Pending>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Replica indices left unplaced (empty for `placement: every` with no device at all).
    pub replicas: Vec<u32>,
    pub reason: String,
}

/// Places every workload; see the module docs for the rules.
pub fn schedule(devices: &[DeviceView], workloads: &[Workload], current: &Assignments) -> Schedule {
    let by_id: BTreeMap<&DeviceId, &DeviceView> = devices.iter().map(|d| (&d.id, d)).collect();
    let wl: BTreeMap<&WorkloadName, &Workload> = workloads.iter().map(|w| (&w.name, w)).collect();

    // Step 1: keep what still fits, and charge it against device memory and ports.
    let mut used = Used::new();
    let mut out = Schedule::default();
    for (name, w) in &wl {
        let mut kept = BTreeMap::new();
        if let Some(cur) = current.get(*name) {
            for (&replica, dev) in cur {
                let in_range = match w.placement {
                    Placement::Replicas(n) => replica < n,
                    Placement::Every => true,
                };
                let still_matches = by_id
                    .get(dev)
                    .is_some_and(|d| w.selects(&d.labels) && d.runtimes.contains("wasm"));
                // A clash among kept replicas (a workload gained a port, or placements made
                // before ports existed): the later workload in name order moves.
                let clash = used.get(dev).and_then(|l| l.port_taken(w)).is_some();
                // `every` keeps only online devices' replicas to mirror the eligible set; a
                // replica on an offline device stays (rescheduling lost devices is separate).
                if in_range && still_matches && !clash {
                    kept.insert(replica, dev.clone());
                    used.entry(dev.clone()).or_default().add(w);
                }
            }
        }
        if let Placement::Every = w.placement {
            // One replica per device: drop duplicates, keeping the lowest index.
            let mut seen = BTreeSet::new();
            kept.retain(|_, d| seen.insert(d.clone()));
        }
        out.assignments.insert((*name).clone(), kept);
    }

    // Step 2: place what is missing.
    for (name, w) in &wl {
        let Some(placed) = out.assignments.get(*name).cloned() else {
            continue;
        };
        let mut placed = placed;
        let mut unplaced = Vec::new();
        match w.placement {
            Placement::Replicas(n) => {
                for replica in 0..n {
                    if placed.contains_key(&replica) {
                        continue;
                    }
                    match best_device(devices, w, &placed, &used) {
                        Some(d) => {
                            used.entry(d.clone()).or_default().add(w);
                            placed.insert(replica, d);
                        }
                        None => unplaced.push(replica),
                    }
                }
            }
            Placement::Every => {
                let have: BTreeSet<DeviceId> = placed.values().cloned().collect();
                for d in devices {
                    if have.contains(&d.id) || fits(d, w, &used).is_err() {
                        continue;
                    }
                    let replica = (0u32..)
                        .find(|i| !placed.contains_key(i))
                        .unwrap_or(u32::MAX);
                    used.entry(d.id.clone()).or_default().add(w);
                    placed.insert(replica, d.id.clone());
                }
                // Matching devices that could not take it are worth reporting.
                let blocked: Vec<&DeviceView> = devices
                    .iter()
                    .filter(|d| {
                        d.online && w.selects(&d.labels) && !placed.values().any(|p| p == &d.id)
                    })
                    .collect();
                if !blocked.is_empty() || placed.is_empty() {
                    out.pending.insert(
                        (*name).clone(),
                        Pending {
                            replicas: Vec::new(),
                            reason: explain(devices, w, &used),
                        },
                    );
                }
            }
        }
        if !unplaced.is_empty() {
            out.pending.insert(
                (*name).clone(),
                Pending {
                    replicas: unplaced,
                    reason: explain(devices, w, &used),
                },
            );
        }
        out.assignments.insert((*name).clone(), placed);
    }
    out
}

/// Why `d` cannot take `w` now, or `Ok` if it can.
fn fits(d: &DeviceView, w: &Workload, used: &Used) -> Result<(), Unfit> {
    if !d.online {
        return Err(Unfit::Offline);
    }
    if let Some((k, v)) = w
        .selector
        .iter()
        .find(|(k, v)| d.labels.get(*k).is_none_or(|have| have != *v))
    {
        return Err(Unfit::Label(format!("{k}={v}")));
    }
    if !d.runtimes.contains("wasm") {
        return Err(Unfit::Runtime);
    }
    if let Some(port) = used.get(&d.id).and_then(|l| l.port_taken(w)) {
        return Err(Unfit::Port(port));
    }
    let free = free_memory(d, used);
    if free < w.resources.memory {
        return Err(Unfit::Memory(free));
    }
    Ok(())
}

fn free_memory(d: &DeviceView, used: &Used) -> u64 {
    d.memory
        .saturating_sub(used.get(&d.id).map_or(0, |l| l.memory))
}

enum Unfit {
    Offline,
    Label(String),
    Runtime,
    Port(u16),
    Memory(u64),
}

fn best_device(
    devices: &[DeviceView],
    w: &Workload,
    placed: &BTreeMap<u32, DeviceId>,
    used: &Used,
) -> Option<DeviceId> {
    devices
        .iter()
        .filter(|d| fits(d, w, used).is_ok())
        .min_by_key(|d| {
            let same = placed.values().filter(|p| **p == d.id).count();
            (same, std::cmp::Reverse(free_memory(d, used)), d.id.clone())
        })
        .map(|d| d.id.clone())
}

/// "0/3 devices: 1 offline, 1 no label zone=a, 1 insufficient memory (need 64Mi, max free 32Mi)".
fn explain(devices: &[DeviceView], w: &Workload, used: &Used) -> String {
    let mut offline = 0;
    let mut labels: BTreeMap<String, usize> = BTreeMap::new();
    let mut ports: BTreeMap<u16, usize> = BTreeMap::new();
    let mut runtime = 0;
    let mut memory = 0;
    let mut max_free = 0;
    let mut ok = 0;
    for d in devices {
        match fits(d, w, used) {
            Ok(()) => ok += 1,
            Err(Unfit::Offline) => offline += 1,
            Err(Unfit::Label(l)) => *labels.entry(l).or_default() += 1,
            Err(Unfit::Runtime) => runtime += 1,
            Err(Unfit::Port(p)) => *ports.entry(p).or_default() += 1,
            Err(Unfit::Memory(free)) => {
                memory += 1;
                max_free = max_free.max(free);
            }
        }
    }
    let mut parts = Vec::new();
    if offline > 0 {
        parts.push(format!("{offline} offline"));
    }
    for (l, n) in labels {
        parts.push(format!("{n} no label {l}"));
    }
    if runtime > 0 {
        parts.push(format!("{runtime} no wasm runtime"));
    }
    for (p, n) in ports {
        parts.push(format!("{n} port {p} in use"));
    }
    if memory > 0 {
        parts.push(format!(
            "{memory} insufficient memory (need {}, max free {})",
            format_memory(w.resources.memory),
            format_memory(max_free)
        ));
    }
    if devices.is_empty() {
        return "0/0 devices: no device has joined the fleet".to_string();
    }
    if parts.is_empty() {
        // Eligible devices exist but all replicas could not be spread further.
        return format!("{ok}/{} devices eligible", devices.len());
    }
    format!("{ok}/{} devices: {}", devices.len(), parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use shoal_api::ids::Digest;
    use shoal_api::workload::{ModuleRef, Resources, Restart, RestartPolicy};

    fn dev(id: &str, labels: &[(&str, &str)], mem_mi: u64) -> DeviceView {
        DeviceView {
            id: DeviceId::try_from(id).unwrap(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            runtimes: ["wasm".to_string()].into(),
            memory: mem_mi << 20,
            online: true,
        }
    }

    fn wl(name: &str, placement: Placement, sel: &[(&str, &str)], mem_mi: u64) -> Workload {
        Workload {
            name: WorkloadName::try_from(name).unwrap(),
            labels: BTreeMap::new(),
            placement,
            selector: sel
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            module: ModuleRef::Digest(Digest::of(name.as_bytes())),
            args: vec![],
            env: BTreeMap::new(),
            resources: Resources {
                memory: mem_mi << 20,
                cpu: None,
            },
            restart: Restart {
                policy: RestartPolicy::Always,
                initial_backoff_ms: 1000,
                max_backoff_ms: 60000,
            },
            ports: vec![],
            uses: vec![],
        }
    }

    fn port_decl(port: u16) -> shoal_api::workload::Port {
        shoal_api::workload::Port {
            name: port.to_string(),
            port,
            expose: shoal_api::workload::Expose::None,
        }
    }

    #[test]
    fn replicas_holding_the_same_port_never_share_a_device() {
        let devices = vec![dev("a", &[], 512), dev("b", &[], 512)];
        let mut web = wl("web", Placement::Replicas(3), &[], 16);
        web.ports.push(port_decl(8080));
        let mut api = wl("api", Placement::Every, &[], 16);
        api.ports.push(port_decl(8080));
        let s = schedule(&devices, &[web.clone()], &Assignments::new());
        assert_eq!(devices_of(&s, "web"), ["a", "b"]);
        assert_eq!(
            s.pending[&web.name].reason,
            "0/2 devices: 2 port 8080 in use"
        );
        // Another workload on the same port finds no room either; `api` sorts first, so
        // it takes the devices and `web` waits.
        let s = schedule(&devices, &[web.clone(), api.clone()], &Assignments::new());
        assert_eq!(devices_of(&s, "api"), ["a", "b"]);
        assert!(devices_of(&s, "web").is_empty());
        // A clash inherited from older placements is resolved by moving the later workload.
        let mut cur = Assignments::new();
        cur.insert(api.name.clone(), [(0, devices[0].id.clone())].into());
        cur.insert(web.name.clone(), [(0, devices[0].id.clone())].into());
        let s = schedule(&devices, &[web, api], &cur);
        assert_eq!(devices_of(&s, "api"), ["a", "b"]);
        assert!(devices_of(&s, "web").is_empty());
    }

    fn devices_of(s: &Schedule, w: &str) -> Vec<String> {
        s.assignments[&WorkloadName::try_from(w).unwrap()]
            .values()
            .map(|d| d.to_string())
            .collect()
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            devices: Vec<DeviceView>,
            workloads: Vec<Workload>,
            want: Vec<(&'static str, Vec<&'static str>)>,
            pending: Vec<(&'static str, &'static str)>,
        }
        let cases = vec![
            Case {
                name: "spread replicas over matching devices",
                devices: vec![dev("a", &[("zone", "x")], 256), dev("b", &[("zone", "x")], 256), dev("c", &[], 256)],
                workloads: vec![wl("web", Placement::Replicas(2), &[("zone", "x")], 64)],
                want: vec![("web", vec!["a", "b"])],
                pending: vec![],
            },
            Case {
                name: "every places one per matching device",
                devices: vec![dev("a", &[("role", "s")], 256), dev("b", &[], 256), dev("c", &[("role", "s")], 256)],
                workloads: vec![wl("sensor", Placement::Every, &[("role", "s")], 16)],
                want: vec![("sensor", vec!["a", "c"])],
                pending: vec![],
            },
            Case {
                name: "more replicas than devices stack, spread first",
                devices: vec![dev("a", &[], 256), dev("b", &[], 256)],
                workloads: vec![wl("w", Placement::Replicas(3), &[], 64)],
                want: vec![("w", vec!["a", "b", "a"])],
                pending: vec![],
            },
            Case {
                name: "memory exhausted leaves replicas pending with a reason",
                devices: vec![dev("a", &[], 100), dev("b", &[("zone", "y")], 256)],
                workloads: vec![wl("big", Placement::Replicas(2), &[("zone", "y")], 200)],
                want: vec![("big", vec!["b"])],
                pending: vec![("big", "0/2 devices: 1 no label zone=y, 1 insufficient memory (need 200Mi, max free 56Mi)")],
            },
            Case {
                name: "no devices",
                devices: vec![],
                workloads: vec![wl("w", Placement::Replicas(1), &[], 64)],
                want: vec![("w", vec![])],
                pending: vec![("w", "0/0 devices: no device has joined the fleet")],
            },
        ];
        for c in cases {
            let s = schedule(&c.devices, &c.workloads, &Assignments::new());
            for (w, devs) in &c.want {
                assert_eq!(devices_of(&s, w), *devs, "{}", c.name);
            }
            let got: Vec<(String, String)> = s
                .pending
                .iter()
                .map(|(k, p)| (k.to_string(), p.reason.clone()))
                .collect();
            let want: Vec<(String, String)> = c
                .pending
                .iter()
                .map(|(k, r)| (k.to_string(), r.to_string()))
                .collect();
            assert_eq!(got, want, "{}", c.name);
        }
    }

    #[test]
    fn offline_devices_get_nothing_new_but_keep_their_replicas() {
        let mut a = dev("a", &[], 256);
        let b = dev("b", &[], 256);
        let w = vec![wl("w", Placement::Replicas(1), &[], 64)];
        let s1 = schedule(&[a.clone(), b.clone()], &w, &Assignments::new());
        assert_eq!(devices_of(&s1, "w"), vec!["a"]);
        a.online = false;
        let s2 = schedule(&[a.clone(), b.clone()], &w, &s1.assignments);
        assert_eq!(
            devices_of(&s2, "w"),
            vec!["a"],
            "kept: rescheduling lost devices is not placement's job"
        );
        let s3 = schedule(
            &[a, b],
            &[wl("v", Placement::Replicas(1), &[], 64)],
            &Assignments::new(),
        );
        assert_eq!(devices_of(&s3, "v"), vec!["b"]);
    }

    #[test]
    fn every_keeps_indices_when_devices_join() {
        let w = vec![wl("s", Placement::Every, &[], 16)];
        let s1 = schedule(&[dev("b", &[], 64)], &w, &Assignments::new());
        let s2 = schedule(&[dev("a", &[], 64), dev("b", &[], 64)], &w, &s1.assignments);
        let m = &s2.assignments[&WorkloadName::try_from("s").unwrap()];
        assert_eq!(m[&0].as_str(), "b");
        assert_eq!(m[&1].as_str(), "a");
    }

    #[test]
    fn scaling_down_removes_highest_indices() {
        let ds = vec![dev("a", &[], 256), dev("b", &[], 256)];
        let s1 = schedule(
            &ds,
            &[wl("w", Placement::Replicas(3), &[], 16)],
            &Assignments::new(),
        );
        let s2 = schedule(
            &ds,
            &[wl("w", Placement::Replicas(1), &[], 16)],
            &s1.assignments,
        );
        let m = &s2.assignments[&WorkloadName::try_from("w").unwrap()];
        assert_eq!(m.keys().copied().collect::<Vec<_>>(), vec![0]);
        assert_eq!(
            m[&0],
            s1.assignments[&WorkloadName::try_from("w").unwrap()][&0]
        );
    }

    fn arb_inputs() -> impl Strategy<Value = (Vec<DeviceView>, Vec<Workload>)> {
        let devs = prop::collection::vec((0u8..3, 16u64..512, any::<bool>()), 0..6).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (zone, mem, online))| {
                    let mut d = dev(
                        &format!("d{i}"),
                        &[("zone", ["a", "b", "c"][zone as usize])],
                        mem,
                    );
                    d.online = online;
                    d
                })
                .collect::<Vec<_>>()
        });
        let wls = prop::collection::vec((0u8..4, 0u32..5, 1u64..128, any::<bool>(), 0u16..4), 0..5)
            .prop_map(|v| {
                v.into_iter()
                    .enumerate()
                    .map(|(i, (zone, n, mem, every, port))| {
                        let sel: Vec<(&str, &str)> = if zone == 3 {
                            vec![]
                        } else {
                            vec![("zone", ["a", "b", "c"][zone as usize])]
                        };
                        let p = if every {
                            Placement::Every
                        } else {
                            Placement::Replicas(n)
                        };
                        let mut w = wl(&format!("w{i}"), p, &sel, mem);
                        // Port 0 here means none; 1-3 make clashes likely.
                        if port > 0 {
                            w.ports.push(port_decl(8000 + port));
                        }
                        w
                    })
                    .collect::<Vec<_>>()
            });
        (devs, wls)
    }

    proptest! {
        #[test]
        fn invariants((devices, workloads) in arb_inputs()) {
            let s = schedule(&devices, &workloads, &Assignments::new());
            let mut used: BTreeMap<DeviceId, u64> = BTreeMap::new();
            for w in &workloads {
                let placed = &s.assignments[&w.name];
                for d in placed.values() {
                    let dv = devices.iter().find(|x| &x.id == d).unwrap();
                    prop_assert!(w.selects(&dv.labels), "selector violated");
                    prop_assert!(dv.online);
                    *used.entry(d.clone()).or_default() += w.resources.memory;
                }
                if let Placement::Replicas(n) = w.placement {
                    prop_assert!(placed.len() as u32 <= n);
                    prop_assert!(placed.len() as u32 == n || s.pending.contains_key(&w.name));
                }
            }
            for d in &devices {
                prop_assert!(used.get(&d.id).copied().unwrap_or(0) <= d.memory, "over capacity");
                let mut ports = BTreeSet::new();
                for w in &workloads {
                    let here = s.assignments[&w.name].values().filter(|p| **p == d.id).count();
                    for p in w.ports.iter().flat_map(|p| std::iter::repeat_n(p, here)) {
                        prop_assert!(ports.insert(p.port), "port {} twice on {}", p.port, d.id);
                    }
                }
            }
            // Placing again changes nothing.
            let again = schedule(&devices, &workloads, &s.assignments);
            prop_assert_eq!(again.assignments, s.assignments);
        }
    }
}
