//! Placement: a pure function from (devices, workloads, current assignments) to assignments.
//!
//! Rules (in order):
//! 1. A replica that is already placed stays where it is while its device exists, is not lost,
//!    and still matches the workload's selector and runtime (no needless restarts), and no
//!    earlier workload (in name order) holds one of its ports there. Of those, the lowest
//!    `spec.replicas` indices stay (plus a rollout's surge, see [`InFlight`]); the rest are
//!    removed. A lost device keeps its `placement: every` replicas (they belong to that
//!    device); its other replicas move. A replica that still runs an earlier spec during a
//!    rollout is charged that spec's resources and ports.
//! 2. Missing replicas take the lowest free indices and go to an *eligible* device: online, not lost, not cordoned, meets the
//!    selector (equality and set-based), can run one of its variants (the `wasm` runtime for
//!    `spec.wasm`, or the `container` runtime and one of the image's platforms for
//!    `spec.container`; see `Workload::variant_for`), and has room: free memory
//!    and CPU (millicores, from its CPU count) for the workload's requests, a free replica slot
//!    under its limit, and none of the workload's `spec.ports` taken (replicas listen on the
//!    device's own addresses, like Kubernetes host ports).
//! 3. Among eligible devices, `strategy: spread` (default): fewest replicas of this workload
//!    in the device's `spec.spread` topology domain (e.g. its `zone` label value), then on the
//!    device, then most free memory (least loaded), then device id. `strategy: binpack`: least
//!    free memory that still fits, then id. Every tie is broken by device id.
//! 4. `placement: every` keeps one replica on each eligible device; a new device gets the
//!    lowest free replica index, so existing replicas keep their identity.
//!
//! Whatever cannot be placed is reported as pending with a reason a person can act on.
//! Workloads are placed in name order, so the result depends only on the inputs.
//!
//! Cost: per workload, one pass over the devices to find the eligible ones, then a heap
//! ordered by the score, so placing R replicas on D devices is O(D + R log D) per workload
//! (`cargo bench -p shoal-hub` measures it at fleet scale).

use shoal_api::model::ids::{DeviceId, WorkloadName};
use shoal_api::model::oci::Platform;
use shoal_api::model::quantity::format_memory;
use shoal_api::model::selector::Selector;
use shoal_api::model::workload::{Placement, Strategy, Workload};
use shoal_api::policy::fleet::Privilege;
use shoal_api::wire::messages::RUNTIME_CONTAINER;
use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::rc::Rc;

/// What the scheduler needs to know about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    pub id: DeviceId,
    pub labels: BTreeMap<String, String>,
    pub runtimes: BTreeSet<String>,
    /// CPU architecture as the agent reports it (Rust's `std::env::consts::ARCH`).
    pub arch: String,
    /// Its CPU variant (`v7`, `v8`), if the agent reported one.
    pub variant: Option<String>,
    /// Memory offered to workloads, bytes.
    pub memory: u64,
    /// CPU offered to workloads, millicores; 0: unknown (CPU requests are not checked).
    pub cpu_millis: u64,
    /// Most replicas the device takes; `None`: no limit.
    pub max_replicas: Option<u32>,
    /// Hardware nodes it offers per class (`resources.devices`).
    pub hardware: BTreeMap<String, u32>,
    /// What it lets containers ask for (`shoal-agent run --allow`).
    pub allows: BTreeSet<Privilege>,
    pub online: bool,
    /// Offline past the grace period: its replicas (except `every`) move elsewhere.
    pub lost: bool,
    /// Workloads whose own `spec.disconnect.lostAfter` has passed since the device was last
    /// heard: their replicas move (and none is placed here), whatever `lost` says.
    pub lost_for: BTreeSet<WorkloadName>,
    /// Takes no new replicas (keeps what it runs).
    pub cordoned: bool,
}

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

/// What is taken on a device by the replicas placed so far.
#[derive(Debug, Clone, Default)]
struct Load {
    memory: u64,
    cpu: u64,
    replicas: u32,
    ports: BTreeSet<u16>,
    /// Hardware nodes taken, per class.
    hardware: BTreeMap<String, u32>,
}

impl Load {
    fn add(&mut self, w: &Workload) {
        self.memory += w.resources.memory;
        self.cpu += u64::from(w.resources.cpu.unwrap_or(0));
        self.replicas += 1;
        self.ports.extend(w.ports.iter().map(|p| p.port));
        for (class, n) in &w.devices {
            *self.hardware.entry(class.to_string()).or_default() += n;
        }
    }

    /// A class of hardware `w` needs more of than `d` has free: the class and how many are.
    fn hardware_short(&self, d: &DeviceView, w: &Workload) -> Option<(String, u32)> {
        w.devices.iter().find_map(|(class, need)| {
            let class = class.as_str();
            let has = d.hardware.get(class).copied().unwrap_or(0);
            let free = has.saturating_sub(self.hardware.get(class).copied().unwrap_or(0));
            (free < *need).then(|| (class.to_string(), free))
        })
    }

    fn port_taken(&self, w: &Workload) -> Option<u16> {
        w.ports
            .iter()
            .map(|p| p.port)
            .find(|p| self.ports.contains(p))
    }
}

/// Why a device cannot take a replica of a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unfit {
    Offline,
    Cordoned,
    Label(String),
    Runtime,
    Topology(String),
    Port(u16),
    Full(u32),
    Memory(u64),
    Cpu(u64),
    /// Too few free hardware nodes of a class: the class and how many are free.
    Hardware(String, u32),
    /// Its container asks for what the device does not allow.
    Privilege(Privilege),
}

/// What an unfinished rollout, or a job's run, changes about placing one workload.
#[derive(Debug, Clone, Default)]
pub struct InFlight<'a> {
    /// Replicas still running an earlier spec: they keep its resources and ports.
    pub earlier: BTreeMap<u32, &'a Workload>,
    /// Replicas wanted beyond `spec.replicas` (`maxSurge`).
    pub surge: u32,
    /// A job's completion indices that have their result: never placed (again).
    pub done: BTreeSet<u32>,
    /// A `placement: every` job's devices that have their result: not placed there again.
    pub done_devices: BTreeSet<DeviceId>,
    /// `placement: every`: most replicas at once (a job's parallelism).
    pub cap: Option<u32>,
}

/// Everything of a workload that [`static_fit`] reads: two workloads with equal keys are
/// eligible on the same devices.
#[derive(Debug, PartialEq, Eq, Hash)]
struct EligibilityKey<'a> {
    selector: &'a Selector,
    spread: Option<&'a String>,
    wasm: bool,
    /// The container variant's platforms (`Some(empty)`: a container of unknown platforms).
    container: Option<&'a [Platform]>,
    /// What the container asks for beyond the defaults.
    needs: Vec<Privilege>,
}

impl<'a> EligibilityKey<'a> {
    fn of(w: &'a Workload) -> Self {
        EligibilityKey {
            selector: &w.selector,
            spread: w.spread.as_ref(),
            wasm: w.module.is_some(),
            container: w.container.as_ref().map(|c| c.platforms.as_slice()),
            needs: shoal_api::policy::fleet::needs(w),
        }
    }
}

/// Places every workload; see the module docs for the rules.
pub fn schedule(devices: &[DeviceView], workloads: &[Workload], current: &Assignments) -> Schedule {
    schedule_with(devices, workloads, current, &HashMap::new())
}

/// [`schedule`], with the rollouts in progress.
pub fn schedule_with(
    devices: &[DeviceView],
    workloads: &[Workload],
    current: &Assignments,
    inflight: &HashMap<&WorkloadName, InFlight<'_>>,
) -> Schedule {
    let none = InFlight::default();
    let by_id: HashMap<&DeviceId, usize> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| (&d.id, i))
        .collect();
    // Eligibility (`static_fit`) depends on the selector, the spread label and what the
    // variants need (see `EligibilityKey`), and fleets reuse a few of each across many
    // workloads: compute each distinct combination once.
    let mut eligible_by: HashMap<EligibilityKey<'_>, Rc<Vec<usize>>> = HashMap::new();
    let mut wl: Vec<&Workload> = workloads.iter().collect();
    wl.sort_by(|a, b| a.name.cmp(&b.name));
    let mut load: Vec<Load> = vec![Load::default(); devices.len()];
    let mut out = Schedule::default();

    // Step 1: keep what still fits, and charge it to its device.
    for w in &wl {
        let fl = inflight.get(&w.name).unwrap_or(&none);
        let mut kept = BTreeMap::new();
        let mut on_device = BTreeSet::new();
        // `placement: every` under a cap: replicas kept on devices that are not lost (one
        // on a lost device stays, but holds no slot: the job goes on elsewhere).
        let mut active = 0u32;
        for (&replica, dev) in current.get(&w.name).into_iter().flatten() {
            let Some(&i) = by_id.get(dev) else { continue };
            let in_range = match w.placement {
                Placement::Replicas(n) => (kept.len() as u32) < n.saturating_add(fl.surge),
                Placement::Every => devices[i].lost || fl.cap.is_none_or(|c| active < c),
            } && !fl.done.contains(&replica)
                && !fl.done_devices.contains(dev);
            let spec = fl.earlier.get(&replica).copied().unwrap_or(w);
            let d = &devices[i];
            let stays = match w.placement {
                Placement::Every => on_device.insert(i), // one per device: lowest index wins
                Placement::Replicas(_) => still_there(d, w),
            };
            // Hardware as the current spec asks (a request added or grown, or a device that
            // now reports fewer nodes, moves the replica rather than parking it there).
            if in_range
                && stays
                && w.selects(&d.labels)
                && runs_a_variant(d, w)
                && load[i].port_taken(spec).is_none()
                && load[i].hardware_short(d, w).is_none()
            {
                kept.insert(replica, dev.clone());
                load[i].add(spec);
                active += u32::from(!d.lost);
            }
        }
        out.assignments.insert(w.name.clone(), kept);
    }

    // Step 2: place what is missing.
    for w in &wl {
        let mut placed = out.assignments.remove(&w.name).unwrap_or_default();
        let fl = inflight.get(&w.name).unwrap_or(&none);
        let surge = fl.surge;
        let needs_more = match w.placement {
            Placement::Replicas(n) => placed.len() < n.saturating_add(surge) as usize,
            Placement::Every => true,
        };
        if !needs_more {
            out.assignments.insert(w.name.clone(), placed);
            continue;
        }
        let eligible = eligible_by
            .entry(EligibilityKey::of(w))
            .or_insert_with(|| {
                Rc::new(
                    (0..devices.len())
                        .filter(|&i| static_fit(&devices[i], w).is_ok())
                        .collect(),
                )
            })
            .clone();
        let mut unplaced = Vec::new();
        match w.placement {
            Placement::Replicas(n) => {
                let count = (n.saturating_add(surge) as usize).saturating_sub(placed.len());
                let missing: Vec<u32> = (0..)
                    .filter(|r| !placed.contains_key(r) && !fl.done.contains(r))
                    .take(count)
                    .collect();
                if !missing.is_empty() {
                    let chosen = place_replicas(
                        devices,
                        &by_id,
                        w,
                        &eligible,
                        &placed,
                        &mut load,
                        missing.len(),
                    );
                    for (k, replica) in missing.into_iter().enumerate() {
                        match chosen.get(k) {
                            Some(&i) => {
                                placed.insert(replica, devices[i].id.clone());
                            }
                            None => unplaced.push(replica),
                        }
                    }
                }
            }
            Placement::Every => {
                let have: HashSet<&DeviceId> = placed.values().collect();
                let new: Vec<usize> = eligible
                    .iter()
                    .copied()
                    .filter(|&i| !have.contains(&devices[i].id))
                    .filter(|&i| !fl.done_devices.contains(&devices[i].id))
                    .collect();
                let mut next = 0u32;
                let mut active = placed
                    .values()
                    .filter(|d| by_id.get(d).is_some_and(|&i| !devices[i].lost))
                    .count() as u32;
                for i in new {
                    if fl.cap.is_some_and(|c| active >= c) {
                        break; // the rest wait for a slot
                    }
                    if dynamic_fit(&devices[i], w, &load[i]).is_err() {
                        continue;
                    }
                    while placed.contains_key(&next) {
                        next += 1;
                    }
                    placed.insert(next, devices[i].id.clone());
                    load[i].add(w);
                    active += 1;
                }
                // Matching devices that could not take it are worth reporting (not those that
                // offer none of a hardware class it asks for: like a label, that is a choice).
                let have: HashSet<&DeviceId> = placed.values().collect();
                let at_cap = fl.cap.is_some_and(|c| active >= c);
                let blocked = !at_cap
                    && devices.iter().any(|d| {
                        d.online
                            && !d.lost
                            && !have.contains(&d.id)
                            && !fl.done_devices.contains(&d.id)
                            && w.selects(&d.labels)
                            && w.devices
                                .keys()
                                .all(|c| d.hardware.get(c.as_str()).is_some_and(|n| *n > 0))
                    });
                let done = !fl.done_devices.is_empty() || fl.cap == Some(0);
                if blocked || (placed.is_empty() && !done) {
                    out.pending.insert(
                        w.name.clone(),
                        Pending {
                            replicas: Vec::new(),
                            reason: explain(devices, w, &load),
                        },
                    );
                }
            }
        }
        if !unplaced.is_empty() {
            out.pending.insert(
                w.name.clone(),
                Pending {
                    replicas: unplaced,
                    reason: explain(devices, w, &load),
                },
            );
        }
        out.assignments.insert(w.name.clone(), placed);
    }
    out
}

/// Chooses devices for `count` new replicas of `w` (fewer if room runs out), charging each.
fn place_replicas(
    devices: &[DeviceView],
    by_id: &HashMap<&DeviceId, usize>,
    w: &Workload,
    eligible: &[usize],
    placed: &BTreeMap<u32, DeviceId>,
    load: &mut [Load],
    count: usize,
) -> Vec<usize> {
    let topology = |i: usize| -> Option<&str> {
        match &w.spread {
            Some(key) => devices[i].labels.get(key).map(String::as_str),
            None => Some(""),
        }
    };
    // Replicas of this workload per device and per topology domain, including kept ones.
    let mut same: HashMap<usize, u32> = HashMap::new();
    let mut domain_count: BTreeMap<&str, u32> = BTreeMap::new();
    for dev in placed.values() {
        if let Some(&i) = by_id.get(dev) {
            *same.entry(i).or_default() += 1;
            if w.spread.is_some() {
                if let Some(dom) = topology(i) {
                    *domain_count.entry(dom).or_default() += 1;
                }
            }
        }
    }
    // Candidate devices per topology domain (one domain without `spread`). Only the best
    // `count` (plus slack) of each go into its heap; the rest wait in `spare`, needed only if
    // the heap runs dry because devices fill up.
    let mut pools: BTreeMap<&str, Vec<Candidate<'_>>> = BTreeMap::new();
    for &i in eligible {
        let Some(dom) = topology(i) else { continue };
        let c = candidate(devices, w, i, load, same.get(&i).copied().unwrap_or(0));
        pools.entry(dom).or_default().push(c);
    }
    let keep = count + 8;
    // Per domain: the heap, the spare candidates, and the best spare key (the heap must not
    // serve an entry worse than it: re-pushed entries get worse as devices fill).
    let mut heaps: BTreeMap<&str, DomainHeap<'_>> = BTreeMap::new();
    for (dom, mut pool) in pools {
        domain_count.entry(dom).or_default();
        let spare = if pool.len() > keep {
            pool.select_nth_unstable_by(keep, |a, b| a.key().cmp(&b.key()));
            pool.split_off(keep)
        } else {
            Vec::new()
        };
        let best = spare.iter().map(|c| c.key()).min();
        heaps.insert(dom, (BinaryHeap::from(pool), spare, best));
    }
    let mut chosen = Vec::with_capacity(count);
    while chosen.len() < count {
        // The domain with the fewest replicas (then name) that still has a candidate.
        let Some(dom) = heaps
            .iter()
            .filter(|(_, (h, spare, _))| !h.is_empty() || !spare.is_empty())
            .map(|(d, _)| *d)
            .min_by_key(|d| (domain_count.get(d).copied().unwrap_or(0), *d))
        else {
            break;
        };
        let Some((heap, spare, spare_best)) = heaps.get_mut(dom) else {
            break;
        };
        let top_worse = match (heap.peek(), *spare_best) {
            (None, _) => true,
            (Some(top), Some(best)) => top.key() > best,
            (Some(_), None) => false,
        };
        if top_worse && !spare.is_empty() {
            heap.extend(std::mem::take(spare));
            *spare_best = None;
        }
        let Some(c) = heap.pop() else { continue };
        let i = c.device;
        let now_same = same.get(&i).copied().unwrap_or(0);
        if c.same != now_same || c.free_memory != free_memory(&devices[i], &load[i]) {
            continue; // stale: a fresher entry for this device is in the heap
        }
        if dynamic_fit(&devices[i], w, &load[i]).is_err() {
            continue; // full for this workload; it only fills further, so drop it
        }
        load[i].add(w);
        *same.entry(i).or_default() += 1;
        *domain_count.entry(dom).or_default() += 1;
        chosen.push(i);
        heap.push(candidate(devices, w, i, load, now_same + 1));
    }
    chosen
}

/// A candidate's sort key (smaller is better).
type Key<'a> = (u32, i128, &'a DeviceId);

/// One topology domain's candidates: the heap, the spare ones, and the best spare key.
type DomainHeap<'a> = (
    BinaryHeap<Candidate<'a>>,
    Vec<Candidate<'a>>,
    Option<Key<'a>>,
);

/// A device as a heap entry: the greatest entry is the best device.
struct Candidate<'a> {
    device: usize,
    id: &'a DeviceId,
    same: u32,
    free_memory: u64,
    binpack: bool,
}

fn candidate<'a>(
    devices: &'a [DeviceView],
    w: &Workload,
    i: usize,
    load: &[Load],
    same: u32,
) -> Candidate<'a> {
    Candidate {
        device: i,
        id: &devices[i].id,
        same,
        free_memory: free_memory(&devices[i], &load[i]),
        binpack: w.strategy == Strategy::Binpack,
    }
}

impl<'a> Candidate<'a> {
    /// Smaller is better.
    fn key(&self) -> Key<'a> {
        if self.binpack {
            (0, i128::from(self.free_memory), self.id)
        } else {
            (self.same, -i128::from(self.free_memory), self.id)
        }
    }
}

impl PartialEq for Candidate<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for Candidate<'_> {}
impl PartialOrd for Candidate<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap pops the greatest: reverse so the smallest key wins.
        Reverse(self.key()).cmp(&Reverse(other.key()))
    }
}

/// Whether `d` can run a variant of `w` (see [`Workload::variant_for`]): its container
/// only if `d` allows what the container asks for.
fn runs_a_variant(d: &DeviceView, w: &Workload) -> bool {
    let permitted = shoal_api::policy::fleet::permits(w, |p| d.allows.contains(&p));
    w.variant_for(
        |r| d.runtimes.contains(r) && (permitted || r != RUNTIME_CONTAINER),
        &d.arch,
        d.variant.as_deref(),
    )
    .is_some()
}

/// What does not change while one workload is placed: state, labels, runtime, topology.
fn static_fit(d: &DeviceView, w: &Workload) -> Result<(), Unfit> {
    if !d.online || d.lost {
        return Err(Unfit::Offline);
    }
    if d.cordoned {
        return Err(Unfit::Cordoned);
    }
    if let Some(req) = w.selector.first_unmet(&d.labels) {
        return Err(Unfit::Label(req));
    }
    if !runs_a_variant(d, w) {
        let missing = shoal_api::policy::fleet::needs(w)
            .into_iter()
            .find(|p| !d.allows.contains(p));
        let with_them = w
            .variant_for(|r| d.runtimes.contains(r), &d.arch, d.variant.as_deref())
            .is_some();
        return Err(match missing {
            Some(p) if with_them => Unfit::Privilege(p),
            _ => Unfit::Runtime,
        });
    }
    if let Some(key) = &w.spread {
        if !d.labels.contains_key(key) {
            return Err(Unfit::Topology(key.clone()));
        }
    }
    Ok(())
}

/// Room on the device given what is placed so far.
/// Whether a replica of `w` placed on `d` stays there as far as the device's silence goes
/// (`spec.disconnect`): never moved with `replace: false`; moved after its own `lostAfter`
/// if it has one; else once the device is lost.
fn still_there(d: &DeviceView, w: &Workload) -> bool {
    match w.disconnect {
        Some(c) if !c.replace => true,
        Some(c) if c.lost_after_ms.is_some() => !d.lost_for.contains(&w.name),
        _ => !d.lost,
    }
}

fn dynamic_fit(d: &DeviceView, w: &Workload, load: &Load) -> Result<(), Unfit> {
    if d.lost_for.contains(&w.name) {
        return Err(Unfit::Offline);
    }
    if let Some(port) = load.port_taken(w) {
        return Err(Unfit::Port(port));
    }
    if let Some(max) = d.max_replicas {
        if load.replicas >= max {
            return Err(Unfit::Full(max));
        }
    }
    let free = free_memory(d, load);
    if free < w.resources.memory {
        return Err(Unfit::Memory(free));
    }
    if let Some((class, free)) = load.hardware_short(d, w) {
        return Err(Unfit::Hardware(class, free));
    }
    if let Some(cpu) = w.resources.cpu {
        let free_cpu = d.cpu_millis.saturating_sub(load.cpu);
        if d.cpu_millis > 0 && free_cpu < u64::from(cpu) {
            return Err(Unfit::Cpu(free_cpu));
        }
    }
    Ok(())
}

fn free_memory(d: &DeviceView, load: &Load) -> u64 {
    d.memory.saturating_sub(load.memory)
}

/// "0/3 devices: 1 offline, 1 no label zone=a, 1 insufficient memory (need 64Mi, max free 32Mi)".
fn explain(devices: &[DeviceView], w: &Workload, load: &[Load]) -> String {
    if devices.is_empty() {
        return "0/0 devices: no device has joined the fleet".to_string();
    }
    let mut ok = 0;
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut labels: BTreeMap<String, usize> = BTreeMap::new();
    let mut ports: BTreeMap<u16, usize> = BTreeMap::new();
    let (mut max_free_mem, mut max_free_cpu) = (0u64, 0u64);
    let mut full = BTreeMap::<u32, usize>::new();
    // Per class: devices short of it, and the most free on any of them.
    let mut hardware = BTreeMap::<String, (usize, u32)>::new();
    let mut topology = 0;
    let mut privileges = BTreeMap::<Privilege, usize>::new();
    for (d, l) in devices.iter().zip(load) {
        match static_fit(d, w).and_then(|()| dynamic_fit(d, w, l)) {
            Ok(()) => ok += 1,
            Err(Unfit::Offline) => *counts.entry("offline").or_default() += 1,
            Err(Unfit::Cordoned) => *counts.entry("cordoned").or_default() += 1,
            Err(Unfit::Privilege(p)) => {
                *privileges.entry(p).or_default() += 1;
            }
            Err(Unfit::Runtime) => {
                let what = match (&w.module, &w.container) {
                    (Some(_), None) => "no wasm runtime",
                    (None, Some(_)) => "no container runtime for the image's platforms",
                    _ => "no wasm runtime, nor a container runtime for the image's platforms",
                };
                *counts.entry(what).or_default() += 1
            }
            Err(Unfit::Label(l)) => *labels.entry(l).or_default() += 1,
            Err(Unfit::Topology(_)) => topology += 1,
            Err(Unfit::Port(p)) => *ports.entry(p).or_default() += 1,
            Err(Unfit::Full(max)) => *full.entry(max).or_default() += 1,
            Err(Unfit::Memory(free)) => {
                *counts.entry("memory").or_default() += 1;
                max_free_mem = max_free_mem.max(free);
            }
            Err(Unfit::Cpu(free)) => {
                *counts.entry("cpu").or_default() += 1;
                max_free_cpu = max_free_cpu.max(free);
            }
            Err(Unfit::Hardware(class, free)) => {
                let e = hardware.entry(class).or_default();
                e.0 += 1;
                e.1 = e.1.max(free);
            }
        }
    }
    let mut parts = Vec::new();
    for what in ["offline", "cordoned"] {
        if let Some(n) = counts.get(what) {
            parts.push(format!("{n} {what}"));
        }
    }
    for (l, n) in labels {
        parts.push(format!("{n} no label {l}"));
    }
    if topology > 0 {
        if let Some(key) = &w.spread {
            parts.push(format!("{topology} no label {key} (spread)"));
        }
    }
    let runtime = counts
        .iter()
        .find(|(k, _)| k.starts_with("no wasm") || k.starts_with("no container"));
    if let Some((what, n)) = runtime {
        parts.push(format!("{n} {what}"));
    }
    for (p, n) in privileges {
        parts.push(format!(
            "{n} not allowing {p} containers (shoal-agent run --allow {p})"
        ));
    }
    for (p, n) in ports {
        parts.push(format!("{n} port {p} in use"));
    }
    for (max, n) in full {
        parts.push(format!("{n} at their replica limit ({max})"));
    }
    if let Some(n) = counts.get("memory") {
        parts.push(format!(
            "{n} insufficient memory (need {}, max free {})",
            format_memory(w.resources.memory),
            format_memory(max_free_mem)
        ));
    }
    if let Some(n) = counts.get("cpu") {
        parts.push(format!(
            "{n} insufficient cpu (need {}m, max free {max_free_cpu}m)",
            w.resources.cpu.unwrap_or(0)
        ));
    }
    for (class, (n, max_free)) in hardware {
        let need = w
            .devices
            .iter()
            .find(|(c, _)| c.as_str() == class)
            .map_or(0, |(_, n)| *n);
        parts.push(format!(
            "{n} insufficient {class} devices (need {need}, max free {max_free})"
        ));
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
    use proptest::strategy::Strategy as _;
    use shoal_api::model::ids::Digest;
    use shoal_api::model::selector::Selector;
    use shoal_api::model::workload::{ModuleRef, Resources, Restart, RestartPolicy};

    fn dev(id: &str, labels: &[(&str, &str)], mem_mi: u64) -> DeviceView {
        DeviceView {
            allows: Default::default(),
            id: DeviceId::try_from(id).unwrap(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            runtimes: ["wasm".to_string()].into(),
            arch: "x86_64".into(),
            variant: None,
            memory: mem_mi << 20,
            cpu_millis: 2000,
            max_replicas: None,
            hardware: BTreeMap::new(),
            online: true,
            lost: false,
            lost_for: BTreeSet::new(),
            cordoned: false,
        }
    }

    fn wl(name: &str, placement: Placement, sel: &[(&str, &str)], mem_mi: u64) -> Workload {
        Workload {
            configs: Default::default(),
            configs_pinned: Default::default(),
            secrets_pinned: Default::default(),
            completion: None,
            after: Vec::new(),
            disconnect: None,
            schedule: None,
            name: WorkloadName::try_from(name).unwrap(),
            labels: BTreeMap::new(),
            placement,
            selector: Selector::equals(
                sel.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            spread: None,
            strategy: shoal_api::model::workload::Strategy::Spread,
            module: Some(ModuleRef::Digest(Digest::of(name.as_bytes()))),
            container: None,
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
            update: Default::default(),
            health: None,
            ports: vec![],
            uses: vec![],
            volumes: vec![],
            network: vec![],
            limits: Default::default(),
            secrets: Default::default(),
            devices: Default::default(),
        }
    }

    /// A device offering `serial` hardware nodes.
    fn with_serial(mut d: DeviceView, n: u32) -> DeviceView {
        d.hardware.insert("serial".into(), n);
        d
    }

    /// A workload asking for `n` serial nodes per replica.
    fn wants_serial(mut w: Workload, n: u32) -> Workload {
        w.devices.insert(
            shoal_api::model::ids::DeviceClass::try_from("serial").unwrap(),
            n,
        );
        w
    }

    /// A container variant of the test image offering `platforms`.
    fn container(platforms: &[&str]) -> shoal_api::model::workload::Container {
        shoal_api::model::workload::Container {
            host_devices: vec![],
            privileged: false,
            image: "oci://localhost:5000/box:1".parse().unwrap(),
            command: vec![],
            read_only_root: true,
            platforms: platforms.iter().map(|p| p.parse().unwrap()).collect(),
            stop_grace_ms: 10_000,
            cap_add: vec![],
            cap_drop: vec![],
            groups: vec![],
        }
    }

    fn port_decl(port: u16) -> shoal_api::model::workload::Port {
        shoal_api::model::workload::Port {
            name: port.to_string(),
            port,
            expose: shoal_api::model::workload::Expose::None,
        }
    }

    #[test]
    fn containers_go_where_a_container_runtime_offers_the_image_platform() {
        let mut devices = vec![
            dev("wasm-only", &[], 512),
            dev("arm-box", &[], 512),
            dev("x86-box", &[], 512),
        ];
        devices[1].runtimes = ["container".to_string()].into();
        devices[1].arch = "aarch64".into();
        devices[2].runtimes = ["container".to_string()].into();
        let mut w = wl("box", Placement::Replicas(2), &[], 16);
        w.module = None;
        w.container = Some(container(&["linux/arm64"]));
        let s = schedule(&devices, &[w.clone()], &Assignments::new());
        assert_eq!(devices_of(&s, "box"), ["arm-box", "arm-box"]);
        // Only one slot for it: the reason names the runtime and platforms.
        devices[1].max_replicas = Some(1);
        let s = schedule(&devices, &[w.clone()], &Assignments::new());
        assert_eq!(
            s.pending[&w.name].reason,
            "0/3 devices: 2 no container runtime for the image's platforms, 1 at their replica limit (1)"
        );
        // With a WASM variant too, WASM devices take it.
        w.module = Some(ModuleRef::Digest(Digest::of(b"m")));
        let s = schedule(&devices, &[w.clone()], &Assignments::new());
        assert_eq!(devices_of(&s, "box"), ["arm-box", "wasm-only"]);
    }

    #[test]
    fn a_32_bit_arm_board_gets_only_images_its_cpu_runs() {
        let mut devices = vec![dev("pi-zero", &[], 512), dev("pi-3", &[], 512)];
        for (d, v) in devices.iter_mut().zip(["v6", "v7"]) {
            d.runtimes = ["container".to_string()].into();
            d.arch = "arm".into();
            d.variant = Some(v.into());
        }
        let mut w = wl("box", Placement::Every, &[], 16);
        w.module = None;
        w.container = Some(container(&["linux/arm/v7"]));
        let s = schedule(&devices, &[w], &Assignments::new());
        assert_eq!(
            devices_of(&s, "box"),
            ["pi-3"],
            "a v6 CPU cannot run a v7 build"
        );
    }

    #[test]
    fn workloads_with_one_selector_but_different_variants_are_judged_apart() {
        // Same (empty) selector and spread: eligibility must still follow each variant.
        let mut devices = vec![dev("wasm-box", &[], 512), dev("arm-box", &[], 512)];
        devices[0].runtimes = ["wasm".to_string()].into();
        devices[1].runtimes = ["container".to_string()].into();
        devices[1].arch = "aarch64".into();
        let mut arm = wl("a-arm", Placement::Replicas(1), &[], 16);
        arm.module = None;
        arm.container = Some(container(&["linux/arm64"]));
        let wasm = wl("b-wasm", Placement::Replicas(1), &[], 16);
        let mut x86 = wl("c-x86", Placement::Replicas(1), &[], 16);
        x86.module = None;
        x86.container = Some(container(&["linux/amd64"]));
        let s = schedule(&devices, &[arm, wasm, x86.clone()], &Assignments::new());
        assert_eq!(devices_of(&s, "a-arm"), ["arm-box"]);
        assert_eq!(devices_of(&s, "b-wasm"), ["wasm-box"]);
        assert!(devices_of(&s, "c-x86").is_empty());
        assert_eq!(
            s.pending[&x86.name].reason,
            "0/2 devices: 2 no container runtime for the image's platforms"
        );
    }

    #[test]
    fn a_rollout_surges_at_free_indices_and_charges_earlier_specs() {
        let devices = vec![dev("a", &[], 100), dev("b", &[], 100)];
        let mut web = wl("web", Placement::Replicas(2), &[], 40);
        let current: Assignments = [(
            web.name.clone(),
            [(1, devices[0].id.clone()), (3, devices[1].id.clone())].into(),
        )]
        .into();
        // A surge of one: the lowest free index, and the gaps stay.
        let fl: HashMap<&WorkloadName, InFlight<'_>> = [(
            &web.name,
            InFlight {
                earlier: BTreeMap::new(),
                surge: 1,
                ..Default::default()
            },
        )]
        .into();
        let s = schedule_with(&devices, &[web.clone()], &current, &fl);
        let placed: Vec<u32> = s.assignments[&web.name].keys().copied().collect();
        assert_eq!(placed, [0, 1, 3]);
        // Without it, the lowest indices stay.
        let s = schedule(&devices, &[web.clone()], &s.assignments);
        let placed: Vec<u32> = s.assignments[&web.name].keys().copied().collect();
        assert_eq!(placed, [0, 1]);
        // The new spec needs 60Mi, but replica 1 still runs the 40Mi one: device a has
        // room for one more 60Mi replica only if 1 is charged 40Mi.
        let old = web.clone();
        web.resources.memory = 60 << 20;
        let current: Assignments = [(web.name.clone(), [(1, devices[0].id.clone())].into())].into();
        let fl: HashMap<&WorkloadName, InFlight<'_>> = [(
            &web.name,
            InFlight {
                earlier: [(1, &old)].into(),
                surge: 1,
                ..Default::default()
            },
        )]
        .into();
        let only_a = vec![devices[0].clone()];
        let s = schedule_with(&only_a, &[web.clone()], &current, &fl);
        assert_eq!(s.assignments[&web.name].len(), 2, "{:?}", s.pending);
        let s = schedule(&only_a, &[web.clone()], &current);
        assert_eq!(s.assignments[&web.name].len(), 1, "charged 60Mi, no room");
    }

    #[test]
    fn a_replica_moves_when_its_device_no_longer_has_the_hardware_it_asks_for() {
        let devices = vec![
            with_serial(dev("a", &[], 256), 1),
            with_serial(dev("b", &[], 256), 1),
        ];
        let plain = wl("meter", Placement::Replicas(1), &[], 16);
        let s = schedule(&devices, std::slice::from_ref(&plain), &Assignments::new());
        let on = devices_of(&s, "meter");
        assert_eq!(on, ["a"]);
        // The request grows past what `a` has: the replica goes where it fits.
        let s2 = schedule(&devices, &[wants_serial(plain.clone(), 2)], &s.assignments);
        assert_eq!(devices_of(&s2, "meter"), Vec::<String>::new());
        assert!(s2.pending.contains_key(&plain.name));
        // `a` reports no serial any more (adapter gone): the replica moves to `b`.
        let asking = wants_serial(plain, 1);
        let s3 = schedule(&devices, std::slice::from_ref(&asking), &Assignments::new());
        assert_eq!(devices_of(&s3, "meter"), ["a"]);
        let shrunk = vec![dev("a", &[], 256), with_serial(dev("b", &[], 256), 1)];
        let s4 = schedule(&shrunk, &[asking], &s3.assignments);
        assert_eq!(devices_of(&s4, "meter"), ["b"]);
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
                name: "hardware goes only where a node is free, one replica per node",
                devices: vec![with_serial(dev("a", &[], 256), 1), dev("b", &[], 256), with_serial(dev("c", &[], 256), 2)],
                workloads: vec![wants_serial(wl("logger", Placement::Replicas(4), &[], 16), 1)],
                want: vec![("logger", vec!["a", "c", "c"])],
                pending: vec![("logger", "0/3 devices: 3 insufficient serial devices (need 1, max free 0)")],
            },
            Case {
                name: "every skips devices without the hardware and says so",
                devices: vec![with_serial(dev("a", &[], 256), 1), dev("b", &[], 256)],
                workloads: vec![wants_serial(wl("modbus", Placement::Every, &[], 16), 1), wants_serial(wl("pump", Placement::Replicas(1), &[], 16), 1)],
                want: vec![("modbus", vec!["a"]), ("pump", vec![])],
                pending: vec![
                    // b offers no serial at all: not a reason for modbus to be pending.
                    ("pump", "0/2 devices: 2 insufficient serial devices (need 1, max free 0)"),
                ],
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

    fn sel_expr(json: &str) -> Selector {
        let wire = serde_json::from_str(json).unwrap();
        let mut errs = Vec::new();
        let s = shoal_api::model::selector::validate("s", &wire, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        s
    }

    #[test]
    fn filters_and_scores() {
        let zone = |id: &str, z: &str| dev(id, &[("zone", z)], 256);
        // Set-based selector.
        let mut w = wl("w", Placement::Every, &[], 16);
        w.selector = sel_expr(r#"{"zone": {"in": ["a", "b"]}, "tier": {"notIn": ["test"]}}"#);
        let mut t = zone("t", "a");
        t.labels.insert("tier".into(), "test".into());
        let s = schedule(
            &[zone("a1", "a"), zone("c1", "c"), t],
            &[w.clone()],
            &Assignments::new(),
        );
        assert_eq!(devices_of(&s, "w"), ["a1"]);
        assert!(
            s.pending.is_empty(),
            "devices outside an every selector are not missed"
        );
        let mut w = wl("w", Placement::Replicas(1), &[], 16);
        w.selector = sel_expr(r#"{"zone": {"in": ["x", "y"]}, "tier": {"notIn": ["test"]}}"#);
        let mut t = zone("t", "a");
        t.labels.insert("tier".into(), "test".into());
        let s = schedule(
            &[zone("a1", "a"), zone("c1", "c"), t],
            &[w.clone()],
            &Assignments::new(),
        );
        assert_eq!(
            s.pending[&w.name].reason,
            "0/3 devices: 1 no label tier notin (test), 2 no label zone in (x,y)"
        );
        // CPU requests against the device's CPUs.
        let mut w = wl("w", Placement::Replicas(3), &[], 16);
        w.resources.cpu = Some(900);
        let s = schedule(&[zone("a1", "a")], &[w.clone()], &Assignments::new());
        assert_eq!(devices_of(&s, "w"), ["a1", "a1"]);
        assert_eq!(
            s.pending[&w.name].reason,
            "0/1 devices: 1 insufficient cpu (need 900m, max free 200m)"
        );
        // Replica limit and cordon.
        let mut full = zone("full", "a");
        full.max_replicas = Some(1);
        let mut cord = zone("cord", "a");
        cord.cordoned = true;
        let w = wl("w", Placement::Replicas(2), &[], 16);
        let s = schedule(&[full, cord], std::slice::from_ref(&w), &Assignments::new());
        assert_eq!(devices_of(&s, "w"), ["full"]);
        assert_eq!(
            s.pending[&w.name].reason,
            "0/2 devices: 1 cordoned, 1 at their replica limit (1)"
        );
        // Spread across zones: a, b, then a again (not a, a, b by id).
        let mut w = wl("w", Placement::Replicas(3), &[], 16);
        w.spread = Some("zone".into());
        let devs = [
            zone("a1", "a"),
            zone("a2", "a"),
            zone("b1", "b"),
            dev("x", &[], 999),
        ];
        let s = schedule(&devs, &[w.clone()], &Assignments::new());
        assert_eq!(devices_of(&s, "w"), ["a1", "b1", "a2"]);
        // Binpack fills the fullest device that fits.
        let mut w = wl("w", Placement::Replicas(3), &[], 100);
        w.strategy = shoal_api::model::workload::Strategy::Binpack;
        let s = schedule(
            &[dev("big", &[], 1000), dev("small", &[], 300)],
            &[w],
            &Assignments::new(),
        );
        assert_eq!(devices_of(&s, "w"), ["small", "small", "small"]);
    }

    #[test]
    fn spread_holds_when_the_best_candidates_are_full() {
        // 20 devices; the 9 with the most memory take nothing (replica limit 0). Two
        // replicas must still land on two different devices.
        let devices: Vec<DeviceView> = (0..20)
            .map(|i| {
                let mut d = dev(&format!("d{i:02}"), &[], 1000 - i as u64);
                d.max_replicas = (i < 9).then_some(0);
                d
            })
            .collect();
        let s = schedule(
            &devices,
            &[wl("w", Placement::Replicas(2), &[], 16)],
            &Assignments::new(),
        );
        assert_eq!(devices_of(&s, "w"), ["d09", "d10"]);
    }

    #[test]
    fn lost_devices_lose_their_replicas_but_not_every_ones() {
        let a = dev("a", &[], 256);
        let b = dev("b", &[], 256);
        let ws = vec![
            wl("w", Placement::Replicas(1), &[], 64),
            wl("e", Placement::Every, &[], 16),
        ];
        let s1 = schedule(&[a.clone(), b.clone()], &ws, &Assignments::new());
        assert_eq!(devices_of(&s1, "w"), ["a"]);
        let mut lost = a.clone();
        lost.online = false;
        lost.lost = true;
        let s2 = schedule(&[lost, b.clone()], &ws, &s1.assignments);
        assert_eq!(devices_of(&s2, "w"), ["b"], "moved off the lost device");
        assert_eq!(devices_of(&s2, "e"), ["a", "b"], "every replicas stay");
        // It comes back: nothing moves again (no churn, no duplicate).
        let s3 = schedule(&[a, b], &ws, &s2.assignments);
        assert_eq!(s3.assignments, s2.assignments);
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

    fn arb_inputs() -> impl proptest::strategy::Strategy<Value = (Vec<DeviceView>, Vec<Workload>)> {
        let devs = prop::collection::vec(
            (
                0u8..3,
                16u64..512,
                any::<bool>(),
                0u8..8,
                0u64..3000,
                0u32..4,
                0u32..3,
            ),
            0..6,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (zone, mem, online, flags, cpu, max, serial))| {
                    let mut d = dev(
                        &format!("d{i}"),
                        &[("zone", ["a", "b", "c"][zone as usize])],
                        mem,
                    );
                    d.online = online;
                    d.cordoned = flags & 1 != 0;
                    d.lost = flags & 2 != 0;
                    d.cpu_millis = cpu;
                    d.max_replicas = (max > 0).then_some(max);
                    if serial > 0 {
                        d = with_serial(d, serial);
                    }
                    d
                })
                .collect::<Vec<_>>()
        });
        let wls = prop::collection::vec(
            (0u8..4, 0u32..5, 1u64..128, any::<bool>(), 0u16..4, 0u32..3),
            0..5,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (zone, n, mem, every, port, serial))| {
                    let (cpu, strategy, spread) = match i % 4 {
                        0 => (None, shoal_api::model::workload::Strategy::Spread, None),
                        1 => (
                            Some(300),
                            shoal_api::model::workload::Strategy::Binpack,
                            None,
                        ),
                        2 => (
                            Some(700),
                            shoal_api::model::workload::Strategy::Spread,
                            Some("zone"),
                        ),
                        _ => (
                            Some(100),
                            shoal_api::model::workload::Strategy::Spread,
                            Some("rack"),
                        ),
                    };
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
                    w.resources.cpu = cpu;
                    w.strategy = strategy;
                    w.spread = spread.map(String::from);
                    // Port 0 here means none; 1-3 make clashes likely.
                    if port > 0 {
                        w.ports.push(port_decl(8000 + port));
                    }
                    if serial > 0 {
                        w = wants_serial(w, serial);
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
            let mut cpu: BTreeMap<DeviceId, u64> = BTreeMap::new();
            let mut count: BTreeMap<DeviceId, u32> = BTreeMap::new();
            let mut serial: BTreeMap<DeviceId, u32> = BTreeMap::new();
            for w in &workloads {
                let placed = &s.assignments[&w.name];
                for d in placed.values() {
                    *serial.entry(d.clone()).or_default() +=
                        w.devices.values().copied().sum::<u32>();
                    let dv = devices.iter().find(|x| &x.id == d).unwrap();
                    prop_assert!(w.selects(&dv.labels), "selector violated");
                    prop_assert!(dv.online && !dv.lost && !dv.cordoned, "ineligible device used");
                    if let Some(key) = &w.spread {
                        prop_assert!(dv.labels.contains_key(key), "spread label missing");
                    }
                    *used.entry(d.clone()).or_default() += w.resources.memory;
                    *cpu.entry(d.clone()).or_default() += u64::from(w.resources.cpu.unwrap_or(0));
                    *count.entry(d.clone()).or_default() += 1;
                }
                if let Placement::Replicas(n) = w.placement {
                    prop_assert!(placed.len() as u32 <= n);
                    prop_assert!(placed.len() as u32 == n || s.pending.contains_key(&w.name));
                }
            }
            for d in &devices {
                prop_assert!(used.get(&d.id).copied().unwrap_or(0) <= d.memory, "over capacity");
                if d.cpu_millis > 0 {
                    prop_assert!(cpu.get(&d.id).copied().unwrap_or(0) <= d.cpu_millis, "cpu over");
                }
                if let Some(max) = d.max_replicas {
                    prop_assert!(count.get(&d.id).copied().unwrap_or(0) <= max, "over replica limit");
                }
                let offered = d.hardware.get("serial").copied().unwrap_or(0);
                prop_assert!(
                    serial.get(&d.id).copied().unwrap_or(0) <= offered,
                    "more serial nodes asked for than {} offers", d.id
                );
                let mut ports = BTreeSet::new();
                for w in &workloads {
                    let here = s.assignments[&w.name].values().filter(|p| **p == d.id).count();
                    for p in w.ports.iter().flat_map(|p| std::iter::repeat_n(p, here)) {
                        prop_assert!(ports.insert(p.port), "port {} twice on {}", p.port, d.id);
                    }
                }
            }
            // The replica count is met when feasible: whatever stays unplaced fits on no
            // device even with everything else placed (load only grows while placing, so a
            // device that refused a replica earlier still refuses it at the end).
            let mut load = vec![Load::default(); devices.len()];
            for w in &workloads {
                for d in s.assignments[&w.name].values() {
                    let i = devices.iter().position(|x| &x.id == d).unwrap();
                    load[i].add(w);
                }
            }
            for w in &workloads {
                let placed = &s.assignments[&w.name];
                let short = match w.placement {
                    Placement::Replicas(n) => placed.len() < n as usize,
                    Placement::Every => true,
                };
                if !short {
                    continue;
                }
                for (i, d) in devices.iter().enumerate() {
                    if w.placement == Placement::Every && placed.values().any(|p| *p == d.id) {
                        continue;
                    }
                    let fits = static_fit(d, w).and_then(|()| dynamic_fit(d, w, &load[i]));
                    prop_assert!(fits.is_err(), "{} left short but {} has room", w.name, d.id);
                }
            }
            // Placing again changes nothing.
            let again = schedule(&devices, &workloads, &s.assignments);
            prop_assert_eq!(again.assignments, s.assignments);
        }
    }
}
