//! Service discovery for workloads: which of this device's replicas to advertise, and the
//! endpoints each consuming workload sees.
//!
//! A workload that `uses: [greeter]` finds greeter's endpoints in its sandbox at
//! `/shoal/services/greeter/{port-name}`: one `ip:port` per line, sorted, rewritten atomically
//! (write then rename) whenever replicas appear, move or go. The same set is the allow-list its
//! sockets may connect to. Host side, the files live in `{data}/services/{consumer}/`, one
//! directory per consuming workload, so a workload sees only the services it declared.
//!
//! [`adverts`] and [`wanted`] are pure; [`ServiceFiles`] does the file I/O.

use crate::core::directory::Directory;
use crate::runtime::AllowList;
use shoal_api::model::ids::{DeviceId, WorkloadName};
use shoal_api::model::workload::Expose;
use shoal_api::wire::discovery::{self, ServiceAd};
use shoal_api::wire::messages::DesiredWorkload;
use shoal_daemon::mdns::Advert;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where a consumer's endpoint directory appears inside its sandbox (the runtimes preopen
/// it there).
pub use crate::runtime::SERVICES_GUEST_DIR as GUEST_DIR;

/// The mDNS advertisements this device should carry: one per exposed port of every replica
/// that is running. Keyed by instance name.
pub fn adverts<'a>(
    fleet: &str,
    device: &DeviceId,
    running: impl IntoIterator<Item = &'a DesiredWorkload>,
) -> BTreeMap<String, Advert> {
    let mut out = BTreeMap::new();
    for w in running {
        for p in w.ports.iter().filter(|p| p.expose == Expose::Mdns) {
            let ad = ServiceAd {
                protocol: shoal_api::PROTOCOL_VERSION,
                fleet: fleet.to_string(),
                device: device.clone(),
                workload: w.name.clone(),
                replica: w.replica,
                port_name: p.name.clone(),
            };
            out.insert(
                ad.instance_name(),
                Advert {
                    ty: discovery::workload_service(&w.name),
                    instance: ad.instance_name(),
                    port: p.port,
                    txt: ad.to_txt(),
                },
            );
        }
    }
    out
}

/// Endpoint sets by consumer workload, then `(service, port name)`.
pub type Wanted = BTreeMap<WorkloadName, BTreeMap<(WorkloadName, String), BTreeSet<SocketAddr>>>;

/// What every consuming workload in `desired` should see, given the LAN `dir` and this
/// device's `running` replicas.
pub fn wanted<'a>(
    desired: &[DesiredWorkload],
    running: impl IntoIterator<Item = &'a DesiredWorkload> + Clone,
    dir: &Directory,
) -> Wanted {
    let mut out = Wanted::new();
    for w in desired.iter().filter(|w| !w.uses.is_empty()) {
        let sets = out.entry(w.name.clone()).or_default();
        for svc in &w.uses {
            let local: Vec<(String, u16)> = running
                .clone()
                .into_iter()
                .filter(|r| &r.name == svc)
                .flat_map(|r| r.ports.iter())
                .filter(|p| p.expose == Expose::Mdns)
                .map(|p| (p.name.clone(), p.port))
                .collect();
            for (port, addrs) in dir.endpoints(svc, &local) {
                sets.insert((svc.clone(), port), addrs);
            }
        }
    }
    out
}

/// Keeps the endpoint files and allow-lists in line with [`Wanted`].
pub struct ServiceFiles {
    root: PathBuf,
    written: BTreeMap<PathBuf, String>,
    allow: BTreeMap<WorkloadName, AllowList>,
}

impl ServiceFiles {
    /// Starts from nothing: files a previous run left behind may be stale, and the next
    /// [`ServiceFiles::sync`] writes everything that is current.
    pub fn new(data_dir: &Path) -> Self {
        let root = data_dir.join("services");
        let _ = std::fs::remove_dir_all(&root);
        Self {
            root,
            written: BTreeMap::new(),
            allow: BTreeMap::new(),
        }
    }

    /// The host directory preopened as [`GUEST_DIR`] for `consumer` (created if missing).
    pub fn dir(&self, consumer: &WorkloadName) -> std::io::Result<PathBuf> {
        let d = self.root.join(consumer.as_str());
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// The allow-list shared with `consumer`'s running replicas.
    pub fn allow_list(&mut self, consumer: &WorkloadName) -> AllowList {
        self.allow.entry(consumer.clone()).or_default().clone()
    }

    /// Rewrites what changed. Files of services no longer wanted are emptied (a replica that
    /// still runs then sees no endpoints rather than stale ones); directories of workloads no
    /// longer desired are removed.
    pub fn sync(&mut self, wanted: &Wanted) -> std::io::Result<()> {
        let mut keep = BTreeSet::new();
        for (consumer, sets) in wanted {
            let dir = self.dir(consumer)?;
            // The allow-list first: a guest that reads a new endpoint may connect at once.
            let all: BTreeSet<SocketAddr> = sets.values().flatten().copied().collect();
            let list = self.allow_list(consumer);
            if let Ok(mut l) = list.write() {
                *l = all;
            };
            for ((svc, port), addrs) in sets {
                let path = dir.join(svc.as_str()).join(port);
                let text: String = addrs.iter().map(|a| format!("{a}\n")).collect();
                if self.written.get(&path) != Some(&text) {
                    write_atomic(&path, &text)?;
                    self.written.insert(path.clone(), text);
                }
                keep.insert(path);
            }
        }
        let stale: Vec<PathBuf> = self
            .written
            .keys()
            .filter(|p| !keep.contains(*p))
            .cloned()
            .collect();
        for path in stale {
            if self.written.get(&path).is_some_and(|t| !t.is_empty()) {
                write_atomic(&path, "")?;
            }
            self.written.insert(path, String::new());
        }
        let gone: Vec<WorkloadName> = self
            .allow
            .keys()
            .filter(|c| !wanted.contains_key(*c))
            .cloned()
            .collect();
        for c in gone {
            if let Some(list) = self.allow.remove(&c) {
                if let Ok(mut l) = list.write() {
                    l.clear();
                };
            }
            let d = self.root.join(c.as_str());
            self.written.retain(|p, _| !p.starts_with(&d));
            let _ = std::fs::remove_dir_all(d);
        }
        Ok(())
    }
}

/// Write to a temporary file in the same directory, then rename over the target: a reader
/// sees the old or the new list, never half of one.
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("endpoints")
    ));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::model::workload::{Port, Resources, Restart, RestartPolicy};

    fn dw(name: &str, replica: u32, ports: &[(u16, Expose)], uses: &[&str]) -> DesiredWorkload {
        DesiredWorkload {
            job: None,
            stop_after_ms: None,
            schedule: None,
            after: Vec::new(),
            configs: Vec::new(),
            name: WorkloadName::try_from(name).unwrap(),
            replica,
            revision: "r".into(),
            module: Some(shoal_api::model::ids::Digest::of(b"m")),
            oci: None,
            container: None,
            args: vec![],
            env: BTreeMap::new(),
            resources: Resources {
                memory: 1 << 20,
                cpu: None,
            },
            restart: Restart {
                policy: RestartPolicy::Always,
                initial_backoff_ms: 1,
                max_backoff_ms: 1,
            },
            health: None,
            ports: ports
                .iter()
                .map(|(p, e)| Port {
                    name: format!("p{p}"),
                    port: *p,
                    expose: *e,
                })
                .collect(),
            uses: uses
                .iter()
                .map(|u| WorkloadName::try_from(*u).unwrap())
                .collect(),
            volumes: vec![],
            network: vec![],
            limits: Default::default(),
            secrets: Default::default(),
            devices: Default::default(),
        }
    }

    #[test]
    fn only_exposed_ports_of_running_replicas_are_advertised() {
        let g = dw(
            "greeter",
            1,
            &[(8080, Expose::Mdns), (9000, Expose::None)],
            &[],
        );
        let dev: DeviceId = "pi".parse().unwrap();
        let ads = adverts("farm", &dev, [&g]);
        assert_eq!(ads.len(), 1);
        let ad = &ads["greeter-1-p8080@pi"];
        assert_eq!((ad.ty.as_str(), ad.port), ("_greeter._tcp.local.", 8080));
        assert!(adverts("farm", &dev, []).is_empty());
    }

    #[test]
    fn files_follow_endpoints_and_are_emptied_when_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let mut files = ServiceFiles::new(tmp.path());
        let g = dw("greeter", 0, &[(8080, Expose::Mdns)], &[]);
        let c = dw("caller", 0, &[], &["greeter"]);
        let dir = Directory::new("farm", 1, "pi".parse().unwrap());
        let desired = vec![g.clone(), c.clone()];
        files.sync(&wanted(&desired, [&g], &dir)).unwrap();
        let path = tmp.path().join("services/caller/greeter/p8080");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "127.0.0.1:8080\n");
        let allow = files.allow_list(&c.name);
        assert!(allow
            .read()
            .unwrap()
            .contains(&"127.0.0.1:8080".parse().unwrap()));
        // Greeter stops: the consumer sees an empty list and may connect nowhere.
        files.sync(&wanted(&desired, [], &dir)).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        assert!(allow.read().unwrap().is_empty());
        // The consumer goes: its directory goes too.
        files.sync(&wanted(&[g], [], &dir)).unwrap();
        assert!(!tmp.path().join("services/caller").exists());
        // A restarted agent does not trust what an earlier run left.
        std::fs::create_dir_all(tmp.path().join("services/old/svc")).unwrap();
        std::fs::write(tmp.path().join("services/old/svc/p"), "10.0.0.1:1\n").unwrap();
        let _files = ServiceFiles::new(tmp.path());
        assert!(!tmp.path().join("services/old").exists());
    }
}
